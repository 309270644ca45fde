"""One behaviour suite for every limiter backend (the contract of mppools._limiter.Limiter).

Every test runs once per backend of the ``backend`` fixture, through the public API
(``mppools.configure(..., backend=...)``) and the interface methods only; what one backend
does inside (segments, tokens, scripts) is tested in its own file (test_limiter.py for
POSIX). Adding a backend is one more entry in :data:`BACKENDS`.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from forkutil import run_in_child
from kombu import Connection
from support.waiting import wait_until

import mppools
from mppools import _config
from mppools._errors import (
    BudgetInUseError,
    BudgetNotFoundError,
    ConfigurationError,
    LimitExceeded,
    MppoolsError,
    NotConfiguredError,
)
from mppools._limiter._base import (
    PRESSURE_DEBT,
    PRESSURE_WAITING,
    STATE_BUSY,
    STATE_IDLE,
    AuditReport,
    BudgetStats,
    Limiter,
    Slot,
    local_host,
)

pytestmark = pytest.mark.timeout(60)

#: backend name -> how to get its ``configure(backend=...)`` spec (it may need a server
#: fixture, e.g. ``lambda request: request.getfixturevalue("redis_server").url``)
BACKENDS: dict[str, Callable[[pytest.FixtureRequest], str]] = {
    "posix": lambda request: "posix",
    "memory": lambda request: "memory",
    # fresh=1: budgets made by the suite skip the grace period of a new generation
    "redis": lambda request: (f"{request.getfixturevalue('redis_server').url}"
                              "?lease_ttl=2&fresh=1"),
}

#: far longer than any wait a test means to see end: a wait that ends must end for a reason
LONG = 30.0


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> str:
    """The ``backend=`` spec of one backend."""
    return BACKENDS[request.param](request)


Make = Callable[..., Limiter]


@pytest.fixture
def make(backend: str, budget_name: str) -> Iterator[Make]:
    """``make(limit, **options)``: configure this process with a fresh budget of ``backend``
    (closed and removed by the ``budget_name`` fixture)."""

    def configure(limit: int, **options: Any) -> Limiter:
        options.setdefault("acquire_timeout", LONG)
        options.setdefault("idle_timeout", None)
        return mppools.configure(limit, name=budget_name, backend=backend, **options)

    yield configure


class Taker(threading.Thread):
    """A thread that takes one slot (the result or the error is kept) and holds it."""

    def __init__(self, limiter: Limiter, timeout: float | None = LONG) -> None:
        super().__init__(daemon=True)
        self.limiter, self.timeout = limiter, timeout
        self.slot: Slot | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            self.slot = self.limiter.acquire(timeout=self.timeout)
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()

    def result(self, timeout: float = LONG) -> Slot:
        assert self.done.wait(timeout), "the waiter never came back"
        self.join(5)
        if self.error is not None:
            raise self.error
        assert self.slot is not None
        return self.slot


def _start_waiter(limiter: Limiter, waiting: int = 1, timeout: float | None = LONG) -> Taker:
    taker = Taker(limiter, timeout)
    taker.start()
    wait_until(lambda: limiter.stats().waiting >= waiting, 10, 0.005,
               what=f"{waiting} waiter(s) registered")
    return taker


# acquire / release ------------------------------------------------------------------------
def test_acquire_and_release(make: Make) -> None:
    limiter = make(2)
    a = limiter.acquire()
    b = limiter.acquire()
    assert a.index != b.index and a.token != b.token
    assert (limiter.stats().in_use, limiter.stats().free) == (2, 0)
    limiter.release(a)
    limiter.release(b)
    stats = limiter.stats()
    assert (stats.in_use, stats.free, stats.waiting, stats.debt) == (0, 2, 0, 0)
    assert stats.acquired_total == 2


def test_block_false_raises_limit_exceeded_at_once(make: Make) -> None:
    limiter = make(1, acquire_timeout=LONG)
    held = limiter.acquire()
    with pytest.raises(LimitExceeded) as info:
        limiter.acquire(block=False)
    exc = info.value
    assert isinstance(exc, MppoolsError) and isinstance(exc, TimeoutError)
    assert exc.limit == 1 and exc.name == limiter.name
    assert exc.waited < LONG / 2  # it did not wait for the acquire timeout
    assert "block=false" in str(exc).lower() and str(exc)[0].islower()
    assert exc.holders == ((os.getpid(), 1),)
    limiter.release(held)


def test_timeout_bounds_the_wait(make: Make) -> None:
    limiter = make(1, acquire_timeout=LONG)
    held = limiter.acquire()
    with pytest.raises(LimitExceeded) as info:
        limiter.acquire(timeout=0.2)
    assert 0.2 <= info.value.waited < LONG / 2
    assert "after 0.2" in str(info.value)
    stats = limiter.stats()
    assert stats.timeouts_total == 1 and stats.waiting == 0  # the waiter left
    limiter.release(held)
    limiter.release(limiter.acquire(timeout=0))


def test_configured_acquire_timeout_bounds_a_wait_without_timeout(make: Make) -> None:
    limiter = make(1, acquire_timeout=0.2)
    assert limiter.acquire_timeout == 0.2
    held = limiter.acquire()
    with pytest.raises(LimitExceeded):
        limiter.acquire()
    limiter.release(held)


def test_invalid_timeout_is_refused(make: Make) -> None:
    limiter = make(1)
    for bad in (-1, float("nan"), float("inf"), "1"):
        with pytest.raises(ConfigurationError):
            limiter.acquire(timeout=bad)  # type: ignore[arg-type]
    assert limiter.stats().in_use == 0


def test_release_twice_is_a_no_op(make: Make) -> None:
    limiter = make(2)
    a = limiter.acquire()
    b = limiter.acquire()
    limiter.release(a)
    limiter.release(a)  # must not free b's slot, nor a slot someone else took since
    assert limiter.stats().in_use == 1
    c = limiter.acquire(block=False)
    limiter.release(a)
    assert limiter.stats().in_use == 2
    with pytest.raises(LimitExceeded):
        limiter.acquire(block=False)
    limiter.release(b)
    limiter.release(c)
    assert limiter.stats().in_use == 0


def test_limit_holds_with_threads(make: Make) -> None:
    limit, threads, rounds = 3, 8, 30
    limiter = make(limit)
    lock = threading.Lock()
    holding = [0]
    peak = [0]
    errors: list[BaseException] = []
    done = [0]

    def work() -> None:
        try:
            for _ in range(rounds):
                slot = limiter.acquire(timeout=LONG)
                with lock:
                    holding[0] += 1
                    peak[0] = max(peak[0], holding[0])
                time.sleep(0.0005)
                with lock:
                    holding[0] -= 1
                limiter.release(slot)
                with lock:
                    done[0] += 1
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=work, daemon=True) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(LONG)
    assert not [t for t in workers if t.is_alive()], "a worker hung"
    assert not errors, errors
    assert done[0] == threads * rounds
    assert 1 <= peak[0] <= limit
    stats = limiter.stats()
    assert (stats.in_use, stats.waiting) == (0, 0)


def test_waiters_are_served_first_come_first_served(make: Make) -> None:
    limiter = make(1)
    held = limiter.acquire()
    first = _start_waiter(limiter, waiting=1)
    second = _start_waiter(limiter, waiting=2)
    assert limiter.waiting_flag() and limiter.under_pressure()
    with pytest.raises(LimitExceeded):  # nobody barges past the waiters
        limiter.acquire(block=False)
    limiter.release(held)
    got = first.result()
    assert limiter.stats().waiting == 1 and not second.done.is_set()
    limiter.release(got)
    limiter.release(second.result())
    assert wait_until(lambda: not limiter.waiting_flag(), 10, 0.005)
    assert limiter.stats().in_use == 0


# resize -----------------------------------------------------------------------------------
def test_resize_grow_wakes_a_waiter(make: Make) -> None:
    limiter = make(1)
    held = limiter.acquire()
    waiter = _start_waiter(limiter)
    limiter.resize(2)
    assert limiter.limit == 2
    got = waiter.result()
    assert limiter.stats().in_use == 2
    limiter.release(got)
    limiter.release(held)


def test_resize_shrink_needs_force_below_what_is_in_use(make: Make) -> None:
    limiter = make(3)
    a, b = limiter.acquire(), limiter.acquire()
    limiter.resize(2)  # not below what is in use
    assert limiter.limit == 2 and not limiter.in_debt()
    with pytest.raises(BudgetInUseError) as info:
        limiter.resize(1)
    assert isinstance(info.value, RuntimeError) and "2 slots in use" in str(info.value)
    assert limiter.limit == 2
    limiter.resize(1, force=True)
    stats = limiter.stats()
    assert (stats.limit, stats.in_use, stats.free, stats.debt) == (1, 2, 0, 1)
    assert limiter.in_debt() and limiter.under_pressure()
    with pytest.raises(LimitExceeded):
        limiter.acquire(block=False)
    limiter.release(a)  # pays the debt
    assert not limiter.in_debt() and limiter.stats().debt == 0
    with pytest.raises(LimitExceeded):
        limiter.acquire(block=False)
    limiter.release(b)
    limiter.release(limiter.acquire(block=False))


def test_forced_shrink_pays_the_debt_before_handing_on(make: Make) -> None:
    limiter = make(2)
    a, b = limiter.acquire(), limiter.acquire()
    limiter.resize(1, force=True)
    waiter = _start_waiter(limiter)
    limiter.release(a)  # the debt, not the waiter
    assert not waiter.done.wait(0.2)
    limiter.release(b)
    limiter.release(waiter.result())


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, 70000])
def test_resize_refuses_a_bad_limit(make: Make, bad: object) -> None:
    limiter = make(2)
    with pytest.raises(ConfigurationError):
        limiter.resize(bad)  # type: ignore[arg-type]
    assert limiter.limit == 2


def test_resize_refuses_a_limit_above_the_capacity(make: Make) -> None:
    limiter = make(2, capacity=4)
    with pytest.raises(ConfigurationError, match="capacity 4"):
        limiter.resize(5)
    limiter.resize(4)
    assert limiter.limit == 4


# stats and audit ----------------------------------------------------------------------------
def test_stats_snapshot_fields(make: Make, backend: str) -> None:
    limiter = make(3, acquire_timeout=LONG, idle_timeout=120.0, hold_quantum=0.5)
    before = time.time()
    a, b = limiter.acquire(), limiter.acquire()
    limiter.mark_idle(b)
    stats = limiter.stats()
    assert isinstance(stats, BudgetStats)
    assert stats.name == limiter.name and stats.backend == limiter.backend
    assert stats.host == local_host()
    assert (stats.limit, stats.in_use, stats.free, stats.waiting, stats.debt) == (3, 2, 1, 0, 0)
    assert (stats.acquire_timeout, stats.idle_timeout, stats.hold_quantum) == (LONG, 120.0, 0.5)
    assert stats.creator_pid == os.getpid() and stats.created_at <= time.time()
    assert stats.acquired_total == 2 and stats.timeouts_total == 0
    assert stats.waiters == ()
    (holder,) = stats.holders
    assert (holder.host, holder.pid, holder.slots, holder.busy, holder.idle) == (
        local_host(), os.getpid(), 2, 1, 1)
    assert holder.alive and before - 1 <= holder.since <= time.time()
    assert isinstance(stats.extra, dict)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.limit = 4  # type: ignore[misc]
    limiter.mark_busy(b)
    assert limiter.stats().holders[0].busy == 2
    last = limiter.acquire()
    waiter = _start_waiter(limiter)
    stats = limiter.stats()
    assert stats.waiting == 1 and len(stats.waiters) == 1
    assert (stats.waiters[0].host, stats.waiters[0].pid) == (local_host(), os.getpid())
    limiter.release(a)
    for slot in (waiter.result(), b, last):
        limiter.release(slot)
    assert stats.in_use == 3  # a snapshot: unchanged by what happened since


def test_audit_without_dead_holders_reclaims_nothing(make: Make) -> None:
    limiter = make(2)
    slot = limiter.acquire()
    report = limiter.audit()
    assert isinstance(report, AuditReport)
    assert report.host == local_host()
    assert report.reclaimed_slots == () and report.dropped_waiters == ()
    assert limiter.stats().in_use == 1
    limiter.release(slot)


# cells: the warm path's bytes -----------------------------------------------------------------
def test_cells_carry_the_interface_values(make: Make) -> None:
    limiter = make(2)
    slot = limiter.acquire()
    cells = limiter.cells(slot)
    if cells is None:
        pytest.skip(f"{limiter.backend} has no cells")
    view, at, pressure_at = cells
    view[at] = STATE_IDLE
    assert limiter.stats().holders[0].idle == 1
    view[at] = STATE_BUSY
    assert limiter.stats().holders[0].busy == 1
    assert view[pressure_at] == 0
    other = limiter.acquire()
    waiter = _start_waiter(limiter)
    assert view[pressure_at] & PRESSURE_WAITING and not view[pressure_at] & PRESSURE_DEBT
    limiter.release(other)
    limiter.release(waiter.result())
    assert wait_until(lambda: view[pressure_at] == 0, 10, 0.005)
    extra = limiter.acquire()
    limiter.resize(1, force=True)
    assert view[pressure_at] & PRESSURE_DEBT
    limiter.release(extra)
    assert not view[pressure_at] & PRESSURE_DEBT
    limiter.release(slot)


# fork -----------------------------------------------------------------------------------------
def test_the_public_fork_hook_is_called_in_a_child(make: Make,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    limiter = make(2)
    calls: list[int] = []
    original = type(limiter).after_fork_in_child

    def hook(self: Limiter) -> None:
        if self is limiter:  # other limiters of earlier tests may still be alive
            calls.append(os.getpid())
        original(self)

    monkeypatch.setattr(type(limiter), "after_fork_in_child", hook)
    pid, seen = run_in_child(lambda: (os.getpid(), list(calls)))
    assert seen == [pid]  # once, in the child, by the fork handler
    assert calls == []  # never in the parent


def test_a_forked_child_uses_the_budget_and_leaves_the_parents_slots_alone(
        make: Make) -> None:
    limiter = make(2)
    parents = limiter.acquire()

    def child() -> tuple[int, int]:
        mine = limiter.acquire(timeout=5)
        limiter.release(parents)  # inherited: the parent's to give back, a no-op here
        limiter.release(mine)
        return mine.pid, limiter.stats().in_use

    pid, in_use = run_in_child(child)
    assert pid != os.getpid() and in_use <= 1
    assert limiter.stats().in_use == 1
    assert limiter.stats().holders[0].pid == os.getpid()
    limiter.release(parents)
    assert limiter.stats().in_use == 0


# configure / attach / close -------------------------------------------------------------------
def test_configure_selects_the_backend(make: Make, backend: str) -> None:
    limiter = make(2)
    assert _config.current() is limiter
    assert mppools.stats().backend == limiter.backend
    assert mppools.configure(2, name=limiter.name, backend=backend, acquire_timeout=LONG,
                             idle_timeout=None) is limiter
    assert mppools.attach(limiter.name, backend=backend) is limiter
    assert limiter.is_creator()


def test_close_removes_the_budget_its_creator_made(make: Make, backend: str) -> None:
    name = make(2).name
    mppools.close()
    with pytest.raises(BudgetNotFoundError) as info:
        mppools.attach(name, backend=backend)
    assert isinstance(info.value, LookupError) and str(info.value).startswith("no ")
    with pytest.raises(NotConfiguredError):
        mppools.stats()


def test_unnamed_budgets_get_fresh_names(backend: str) -> None:
    limiter = mppools.configure(2, backend=backend, idle_timeout=None)
    try:
        assert limiter.name.startswith(f"pid{os.getpid()}-")
        assert mppools.configure(2, backend=backend, idle_timeout=None) is limiter
    finally:
        mppools.close()


def test_attach_to_an_unknown_name(backend: str) -> None:
    with pytest.raises(BudgetNotFoundError):
        mppools.attach("no-such-budget-anywhere", backend=backend)
    assert _config.current() is None


@pytest.mark.parametrize("spec", ["zookeeper://127.0.0.1:2181", "bogus", "", 7])
def test_an_unknown_backend_is_refused(spec: object, budget_name: str) -> None:
    with pytest.raises(ConfigurationError, match=r"unknown backend|backend must be"):
        mppools.configure(2, name=budget_name, backend=spec)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        mppools.attach(budget_name, backend=spec)  # type: ignore[arg-type]
    assert _config.current() is None


# the pools over each backend ------------------------------------------------------------------
def test_pools_hold_one_slot_per_open_connection(make: Make) -> None:
    limiter = make(2)
    conn = Connection("memory://")
    with mppools.producers[conn].acquire(block=True, timeout=5) as producer:
        producer.publish({"n": 1}, routing_key="common")
        assert limiter.stats().in_use == 1
    stats = limiter.stats()
    assert stats.in_use == 1 and stats.holders[0].idle == 1  # idle in its pool, slot kept
    a = mppools.connections[Connection("memory://")].acquire(block=True, timeout=5)
    b = mppools.connections[Connection("memory://localhost/other")].acquire(block=True,
                                                                            timeout=5)
    a.connect()
    b.connect()
    assert limiter.stats().in_use == 2
    third = mppools.connections[Connection("memory://localhost/third")]
    with pytest.raises(LimitExceeded):
        third.acquire(block=True, timeout=0.2).connect()
    b.release()
    a.release()
    mppools.pools.reset()
    assert limiter.stats().in_use == 0


def test_the_warm_path_calls_no_limiter_method(make: Make,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    limiter = make(2)
    conn = Connection("memory://")
    with mppools.producers[conn].acquire(block=True, timeout=5) as producer:
        producer.publish({"n": 0}, routing_key="warm")  # cold: takes the slot
    slot = mppools.connections[conn]._resource.queue[-1]._mppools_slot
    if limiter.cells(slot) is None:
        pytest.skip(f"{limiter.backend} has no cells")

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the warm path called the limiter")

    for method in ("acquire", "release", "mark_idle", "mark_busy", "under_pressure",
                   "in_debt", "stats"):
        monkeypatch.setattr(limiter, method, forbidden)
    for i in range(20):
        with mppools.producers[conn].acquire(block=True, timeout=5) as producer:
            producer.publish({"n": i}, routing_key="warm")
    monkeypatch.undo()
    stats = limiter.stats()
    assert stats.in_use == 1 and stats.holders[0].idle == 1


def test_a_pooled_connection_is_handed_on_under_pressure(make: Make) -> None:
    limiter = make(1, hold_quantum=0.0)
    pool = mppools.connections[Connection("memory://")]
    conn = pool.acquire(block=True, timeout=5)
    conn.connect()
    waiter = _start_waiter(limiter)
    conn.release()  # someone waits: closed, its slot handed on, not kept idle
    slot = waiter.result()
    assert limiter.stats().in_use == 1
    limiter.release(slot)
    mppools.pools.reset()


def test_the_keeper_closes_idle_connections_on_every_backend(make: Make) -> None:
    limiter = make(2, idle_timeout=0.2)
    pool = mppools.connections[Connection("memory://")]
    conn = pool.acquire(block=True, timeout=5)
    conn.connect()
    conn.release()
    assert limiter.stats().in_use == 1
    wait_until(lambda: limiter.stats().in_use == 0, 20, what="the idle connection closed")
    mppools.pools.reset()


def test_close_ends_the_keeper_thread_at_once_on_every_backend(make: Make) -> None:
    """The keeper waits up to a minute for a datagram when there is nothing to sweep; a stop
    wakes it (before, a stopped keeper could poll on until its timeout, and on a reused fd
    number)."""
    import threading

    make(2, idle_timeout=None)  # nothing to sweep: the keeper's wait is 60 s
    pool = mppools.connections[Connection("memory://")]
    conn = pool.acquire(block=True, timeout=5)
    conn.connect()
    conn.release()
    keepers = [t for t in threading.enumerate() if t.name == "mppools-keeper"]
    assert keepers and all(t.is_alive() for t in keepers)
    mppools.close()
    for thread in keepers:
        thread.join(10)
    assert not [t for t in keepers if t.is_alive()], "a stopped keeper thread still runs"
    mppools.pools.reset()

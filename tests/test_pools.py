"""The kombu.pools mirror: same names, same behaviour unconfigured, slots when configured."""

from __future__ import annotations

import os
import threading
import time

import kombu.pools
import pytest
from forkutil import Worker
from kombu import Connection
from kombu.exceptions import ConnectionLimitExceeded

import mppools
from mppools import pools
from mppools._errors import BudgetInUseError, LimitExceeded

pytestmark = pytest.mark.timeout(60)


def test_mirrors_kombu_pools_name_for_name() -> None:
    public = {n for n in dir(kombu.pools) if not n.startswith("_")}
    imported_helpers = {"annotations", "chain", "os", "lazy", "register_after_fork",
                        "EqualityDict", "Resource", "Producer"}
    for name in sorted(public - imported_helpers):
        assert hasattr(pools, name), f"mppools.pools lacks kombu.pools.{name}"
    for name in kombu.pools.__all__:
        assert hasattr(mppools, name), f"mppools lacks {name}"
    assert pools.use_global_limit is kombu.pools.use_global_limit
    assert mppools.pools.__all__ == sorted(mppools.pools.__all__)
    assert mppools.__all__ == sorted(mppools.__all__)
    assert mppools.ProducerPool.Producer is kombu.pools.ProducerPool.Producer


def test_producer_pool_constructor_like_kombu() -> None:
    conns = pools.connections[Connection("memory://")]
    pool = mppools.ProducerPool(conns, limit=2)
    assert pool.connections is conns and pool.limit == 2
    with pool.acquire(block=True) as producer:
        producer.publish({"x": 1}, routing_key="q")


def test_unconfigured_behaves_like_kombu_pools() -> None:
    pools.set_limit(2)
    try:
        conn = Connection("memory://")
        pool = pools.connections[conn]
        assert pool.limit == 2 and pools.get_limit() == 2
        a = pool.acquire()
        b = pool.acquire()
        with pytest.raises(ConnectionLimitExceeded):
            pool.acquire()
        a.release()
        b.release()
        with pools.producers[conn].acquire(block=True) as producer:
            producer.publish({"hello": "world"}, routing_key="q1")
        assert pools.connections is mppools.connections
    finally:
        pools.reset()
        pools.set_limit(10)


def test_a_pooled_connection_holds_a_slot_while_open(budget_name: str) -> None:
    mppools.configure(limit=2, name=budget_name, idle_timeout=None)
    conn = Connection("memory://")
    assert pools.get_limit() == 2
    with mppools.producers[conn].acquire(block=True, timeout=2) as producer:
        producer.publish({"n": 1}, routing_key="q")
        stats = mppools.stats()
        assert stats.in_use == 1 and stats.holders[0].busy == 1
    stats = mppools.stats()
    assert stats.in_use == 1 and stats.holders[0].idle == 1  # idle in the pool, still held
    mppools.reset()
    assert mppools.stats().in_use == 0  # closed: given back


def test_limit_error_is_kombus_and_names_the_budget(budget_name: str) -> None:
    mppools.configure(limit=1, name=budget_name, acquire_timeout=0.1)
    a = mppools.connections[Connection("memory://")].acquire(block=True)
    other = mppools.connections[Connection("memory://localhost/other")]
    started = time.monotonic()
    with pytest.raises(ConnectionLimitExceeded) as info:
        other.acquire(block=True, timeout=0.3)
    assert time.monotonic() - started < 2
    assert isinstance(info.value, LimitExceeded)
    assert budget_name in str(info.value) and "limit 1" in str(info.value)
    with pytest.raises(LimitExceeded, match="at once"):
        other.acquire(block=False)
    # the failed acquires lost nothing
    assert mppools.stats().in_use == 1
    a.release()
    c = other.acquire(block=True, timeout=2)  # a's slot is idle in our own pool: yielded
    c.connect()
    c.release()


def test_producer_acquire_timeout_bounds_the_slot_wait(budget_name: str) -> None:
    mppools.configure(limit=1, name=budget_name, acquire_timeout=30)
    busy = mppools.connections[Connection("memory://")].acquire(block=True)
    busy.connect()
    started = time.monotonic()
    with pytest.raises(LimitExceeded):
        mppools.producers[Connection("memory://localhost/b")].acquire(block=True, timeout=0.3)
    assert time.monotonic() - started < 5  # not the 30 s default
    busy.release()


def test_many_threads_share_the_budget(budget_name: str) -> None:
    mppools.configure(limit=3, name=budget_name, acquire_timeout=10)
    pools.set_limit(3)
    conn = Connection("memory://")
    peak = [0]
    lock = threading.Lock()
    active = [0]
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for i in range(30):
                with mppools.producers[conn].acquire(block=True, timeout=10) as producer:
                    with lock:
                        active[0] += 1
                        peak[0] = max(peak[0], mppools.stats().in_use)
                    producer.publish({"i": i}, routing_key="threads")
                    with lock:
                        active[0] -= 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert 1 <= peak[0] <= 3


def test_set_limit_grows_shrinks_and_forces(budget_name: str) -> None:
    mppools.configure(limit=2, name=budget_name, acquire_timeout=0.1)
    conn_a, conn_b = Connection("memory://"), Connection("memory://localhost/b")
    a = mppools.connections[conn_a].acquire(block=True)
    b = mppools.connections[conn_b].acquire(block=True)
    assert mppools.set_limit(3) == 3
    assert mppools.get_limit() == 3 and mppools.stats().limit == 3
    with pytest.raises(RuntimeError, match="can't shrink") as info:
        mppools.set_limit(1)
    assert isinstance(info.value, BudgetInUseError)
    assert mppools.get_limit() == 3
    mppools.set_limit(1, force=True)
    assert mppools.stats().debt == 1
    a.release()
    b.release()
    # over the limit while idle: keepers are asked to yield the excess
    deadline = time.monotonic() + 5
    while mppools.stats().in_use > 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert mppools.stats().in_use <= 1
    mppools.set_limit(2, reset_after=True)
    assert mppools.stats().in_use == 0
    with pytest.raises(mppools.ConfigurationError):
        mppools.set_limit(0)
    with pytest.raises(TypeError):
        mppools.set_limit(True)


def test_reset_gives_every_slot_back(budget_name: str) -> None:
    mppools.configure(limit=4, name=budget_name)
    held = [mppools.connections[Connection(f"memory://localhost/{i}")].acquire(block=True)
            for i in range(3)]
    for c in held:
        c.connect()
    assert mppools.stats().in_use == 3
    mppools.reset()
    assert mppools.stats().in_use == 0


def test_repr_tells_the_state(budget_name: str) -> None:
    mppools.configure(limit=2, name=budget_name)
    pool = mppools.connections[Connection("memory://")]
    c = pool.acquire(block=True)
    assert "in use=1" in repr(pool) and "limit=2" in repr(pool)
    c.release()
    assert f"{budget_name!r} limit=2 in_use=1" in repr(mppools._config.current())


def test_idle_connection_of_a_blocked_process_is_yielded(budget_name: str) -> None:
    """L=2, two processes each keep an idle connection and block in accept(): a third
    process still gets a slot, quickly (promise 4)."""
    import socket

    mppools.configure(limit=2, name=budget_name, idle_timeout=None)

    def use_then_block() -> str:
        c = mppools.connections[Connection("memory://")].acquire(block=True, timeout=5)
        c.connect()
        c.release()  # idle in this process's pool, holding a slot
        return "idle"

    def block_in_accept() -> None:
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        srv.settimeout(30)
        try:
            srv.accept()
        except OSError:
            pass

    idle = [Worker({"use": use_then_block, "block": block_in_accept}) for _ in range(2)]
    try:
        for w in idle:
            assert w.call("use") == "idle"
            w.send("block")
        stats = mppools.stats()
        assert stats.in_use == 2 and all(h.idle == 1 for h in stats.holders)
        latencies = []
        for _ in range(3):
            t0 = time.monotonic()
            c = mppools.connections[Connection("memory://")].acquire(block=True, timeout=5)
            c.connect()
            latencies.append(time.monotonic() - t0)
            mppools.reset()
        assert max(latencies) < 2.0, latencies  # generous bound; the benchmark measures
    finally:
        for w in idle:
            w.kill()


def test_idle_timeout_closes_old_idle_connections(budget_name: str) -> None:
    mppools.configure(limit=2, name=budget_name, idle_timeout=0.2)
    c = mppools.connections[Connection("memory://")].acquire(block=True)
    c.connect()
    c.release()
    assert mppools.stats().in_use == 1
    deadline = time.monotonic() + 10
    while mppools.stats().in_use and time.monotonic() < deadline:
        time.sleep(0.02)
    assert mppools.stats().in_use == 0
    # the pool still works: the placeholder connects on demand
    with mppools.producers[Connection("memory://")].acquire(block=True, timeout=2) as p:
        p.publish({"a": 1}, routing_key="q")
    assert os.getpid() in [h.pid for h in mppools.stats().holders]


def test_a_dropped_connection_gives_its_slot_back_when_collected(budget_name: str) -> None:
    import gc

    mppools.configure(limit=2, name=budget_name, idle_timeout=None)
    c = mppools.connections[Connection("memory://")].acquire(block=True)
    c.connect()
    c.release()
    assert mppools.stats().in_use == 1
    pools.connections.clear()  # by hand, without closing anything
    del c
    gc.collect()
    assert mppools.stats().in_use == 0


def test_warm_path_takes_no_lock_and_no_syscall(budget_name: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Promise 2: reusing a pooled connection touches no shared lock (one byte store into
    this process's own record, one byte read of the pressure flag)."""
    import fcntl

    limiter = mppools.configure(limit=2, name=budget_name, idle_timeout=None)
    conn = Connection("memory://")
    with mppools.producers[conn].acquire(block=True, timeout=2) as p:
        p.publish({"n": 0}, routing_key="warm")  # cold: takes the slot

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the warm path took the budget's lock")

    monkeypatch.setattr(limiter, "_locked", forbidden)
    monkeypatch.setattr(fcntl, "lockf", forbidden)
    for i in range(20):
        with mppools.producers[conn].acquire(block=True, timeout=2) as p:
            p.publish({"n": i}, routing_key="warm")
    monkeypatch.undo()
    stats = mppools.stats()
    assert stats.in_use == 1 and stats.holders[0].idle == 1

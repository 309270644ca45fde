"""Pools shared by threads and greenlets: one connection never has two holders; each caller's
deadline is its own (issue 8, items 1 and 2; DESIGN §3, "kombu's ProducerPool re-releases a
stale connection" and "gevent/eventlet")."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu import Connection
from kombu.exceptions import ConnectionLimitExceeded, LimitExceeded

import mppools
from mppools import pools

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def local_limit() -> Iterator[None]:
    """Unconfigured tests change the local pool limit; put everything back afterwards."""
    yield
    pools.reset()
    pools.set_limit(10)


def _stale_producer_release(conn: Connection) -> None:
    """Limit 1: a producer released its connection, another holder takes that connection,
    then the producer is acquired again and cannot get a connection in time."""
    with pools.producers[conn].acquire(block=True, timeout=2) as producer:
        producer.publish({"n": 1}, routing_key="stale")
    held = pools.connections[conn].acquire(block=True, timeout=2)
    try:
        with pytest.raises(ConnectionLimitExceeded):
            pools.producers[conn].acquire(block=True, timeout=0.2)
        # the failed acquire must not have put ``held`` back into the pool
        with pytest.raises(ConnectionLimitExceeded):
            again = pools.connections[conn].acquire(block=False)
            assert again is not held, "one connection handed to two holders"
            again.release()
    finally:
        held.release()
    # and the pool still works afterwards, with its one connection
    with pools.producers[conn].acquire(block=True, timeout=2) as producer:
        producer.publish({"n": 2}, routing_key="stale")
    pool = pools.connections[conn]
    assert len(pool._dirty) == 0


def test_a_failed_producer_acquire_does_not_release_another_holders_connection(
    budget_name: str,
) -> None:
    mppools.configure(limit=1, name=budget_name, acquire_timeout=5, idle_timeout=None)
    _stale_producer_release(Connection("memory://"))
    assert mppools.stats().in_use <= 1


def test_unconfigured_failed_producer_acquire_keeps_connections_apart(local_limit: None) -> None:
    pools.set_limit(1)
    _stale_producer_release(Connection("memory://"))


def test_releasing_a_connection_twice_is_a_no_op(local_limit: None) -> None:
    pools.set_limit(2)
    pool = pools.connections[Connection("memory://")]
    a = pool.acquire(block=True, timeout=1)
    a.release()
    a.release()  # not out any more: nothing happens
    first = pool.acquire(block=True, timeout=1)
    second = pool.acquire(block=True, timeout=1)
    assert first is not second
    first.release()
    second.release()
    assert len(pool._resource.queue) == 2


def test_a_released_producer_forgets_its_connection(local_limit: None) -> None:
    pools.set_limit(2)
    conn = Connection("memory://")
    with pools.producers[conn].acquire(block=True, timeout=1) as producer:
        assert producer.__connection__ is not None
    assert producer.__connection__ is None
    assert producer.channel is None


def test_releasing_a_producer_twice_is_a_no_op(local_limit: None) -> None:
    pools.set_limit(3)
    conn = Connection("memory://")
    producer = pools.producers[conn].acquire(block=True, timeout=1)
    connection = producer.__connection__
    producer.release()
    held = pools.connections[conn].acquire(block=True, timeout=1)
    assert held is connection  # LIFO: the connection the producer just gave back
    producer.release()  # again: neither the producer nor ``held`` goes back a second time
    assert held in pools.connections[conn]._dirty
    queue = pools.producers[conn]._resource.queue
    assert sum(1 for item in queue if item is producer) == 1
    first = pools.producers[conn].acquire(block=True, timeout=1)
    second = pools.producers[conn].acquire(block=True, timeout=1)
    assert first is not second
    assert first.__connection__ is not second.__connection__
    assert held not in (first.__connection__, second.__connection__)
    first.release()
    second.release()
    held.release()


def _hammer(conn: Connection, *, threads: int, seconds: float, rounds: int,
            timeout: float) -> tuple[int, int, list[BaseException]]:
    """``threads`` threads take producers or connections with short timeouts; count every
    time a connection object is handed out while another thread holds it."""
    holders: dict[int, int] = {}
    lock = threading.Lock()
    doubles = [0]
    done = [0]
    errors: list[BaseException] = []
    stop_at = time.monotonic() + seconds

    def hold(obj: object) -> None:
        me = threading.get_ident()
        with lock:
            other = holders.get(id(obj))
            if other is not None and other != me:
                doubles[0] += 1
            holders[id(obj)] = me

    def drop(obj: object) -> None:
        with lock:
            holders.pop(id(obj), None)

    def work(k: int) -> None:
        try:
            for i in range(rounds):
                if time.monotonic() > stop_at:
                    return
                try:
                    if (i + k) % 2:
                        with pools.producers[conn].acquire(block=True, timeout=timeout) as p:
                            c = p.__connection__
                            hold(c)
                            time.sleep(0.0005)
                            drop(c)
                    else:
                        c = pools.connections[conn].acquire(block=True, timeout=timeout)
                        try:
                            hold(c)
                            time.sleep(0.0005)
                            drop(c)
                        finally:
                            c.release()
                    with lock:
                        done[0] += 1
                except LimitExceeded:  # the producer pool's or a connection pool's
                    pass
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(seconds + 30)
    assert not any(t.is_alive() for t in workers), "a worker thread hung"
    return doubles[0], done[0], errors


def test_many_threads_never_share_a_connection(budget_name: str) -> None:
    mppools.configure(limit=2, name=budget_name, acquire_timeout=5, idle_timeout=None)
    doubles, done, errors = _hammer(Connection("memory://"), threads=32, seconds=3,
                                    rounds=400, timeout=0.002)
    assert not errors, errors[:3]
    assert done > 0
    assert doubles == 0, f"{doubles} connections handed to a second holder"
    assert mppools.stats().in_use <= 2


def test_many_threads_unconfigured_never_share_a_connection(local_limit: None) -> None:
    pools.set_limit(2)
    doubles, done, errors = _hammer(Connection("memory://"), threads=32, seconds=3,
                                    rounds=400, timeout=0.002)
    assert not errors, errors[:3]
    assert done > 0
    assert doubles == 0, f"{doubles} connections handed to a second holder"


@pytest.mark.redis
def test_many_threads_on_redis_never_share_a_connection(budget_name: str,
                                                         redis_server: object) -> None:
    url = redis_server.url  # type: ignore[attr-defined]
    mppools.configure(limit=2, name=budget_name, acquire_timeout=5, idle_timeout=None)
    doubles, done, errors = _hammer(Connection(url), threads=32, seconds=3, rounds=200,
                                    timeout=0.005)
    assert not errors, errors[:3]
    assert done > 0
    assert doubles == 0, f"{doubles} connections handed to a second holder"
    assert mppools.stats().in_use <= 2


# -- item 8: a slot in debt is not reused warm ------------------------------------------------

class _NoKeeper:
    """Stands in for the keeper thread: the idle connections are never yielded by it, so only
    the pools themselves can pay a debt."""

    def track(self, *args: object) -> None:
        pass

    def untrack(self, *args: object) -> None:
        pass


def test_a_connection_in_debt_is_not_reused_warm(budget_name: str) -> None:
    """After a forced shrink below what is held, the next acquire of a process whose idle
    pooled connections hold the excess closes one (paying the debt) instead of reusing it;
    from then on the budget never holds more than the new limit."""
    from forkutil import Worker

    mppools.configure(limit=2, name=budget_name, acquire_timeout=5, idle_timeout=None)
    state: dict[str, object] = {}

    def hold_idle() -> None:
        pools.keeper = _NoKeeper  # type: ignore[attr-defined]
        pool = pools.connections[Connection("memory://")]
        a = pool.acquire(block=True, timeout=5)
        b = pool.acquire(block=True, timeout=5)
        a.connect()
        b.connect()
        a.release()
        b.release()  # both idle in this process's pool, each holding a slot
        state["pool"] = pool

    def use(rounds: int) -> list[tuple[int, bool, int]]:
        pool = state["pool"]
        seen = []
        for _ in range(rounds):
            c = pool.acquire(block=True, timeout=5)  # type: ignore[attr-defined]
            c.connect()
            seen.append((id(c), c._mppools_slot is not None, mppools.stats().in_use))
            c.release()
        return seen

    child = Worker({"hold_idle": hold_idle, "use": use})
    try:
        child.call("hold_idle")
        assert mppools.stats().in_use == 2
        mppools.set_limit(1, force=True)
        assert mppools.stats().debt == 1
        seen = child.call("use", 1)
        _, first_holds, first_in_use = seen[0]
        assert first_in_use <= 1, f"a slot in debt was reused warm: {seen}"
        assert first_holds
        seen += child.call("use", 4)
        assert all(in_use <= 1 for _, _, in_use in seen), seen
        stats = mppools.stats()
        assert stats.in_use <= 1 and stats.debt == 0
    finally:
        child.kill()


# -- item 2: each greenlet's deadline is its own ---------------------------------------------

_GEVENT_SCRIPT = r"""
import sys
if sys.argv[4] == "before":
    # mppools imported before patching: its module-level objects are the real threading ones
    import mppools.pools
from gevent import monkey
monkey.patch_all()

import time
import gevent
from kombu import Connection
from kombu.exceptions import ConnectionLimitExceeded
import mppools
from mppools import pools

mode, name = sys.argv[1], sys.argv[2]
timeouts = [float(t) for t in sys.argv[3].split(",")]
if mode == "budget":
    mppools.configure(limit=1, name=name, acquire_timeout=30, idle_timeout=None)
    # the whole budget is held by another connection of this process
    holder = pools.connections[Connection("memory://localhost/holder")].acquire(block=True,
                                                                                 timeout=5)
    holder.connect()
    conn = Connection("memory://localhost/wanted")
else:
    pools.set_limit(1)
    conn = Connection("memory://")
    holder = pools.connections[conn].acquire(block=True, timeout=5)

results = {}

def take(t):
    started = time.monotonic()
    try:
        p = pools.producers[conn].acquire(block=True, timeout=t)
    except ConnectionLimitExceeded:
        results[t] = ("exceeded", time.monotonic() - started)
    else:
        results[t] = ("got", time.monotonic() - started)
        p.release()

def release_late():
    # a watchdog: whoever still waits after every timeout plus a wide margin gets it
    gevent.sleep(max(timeouts) + 4)
    holder.release()

late = gevent.spawn(release_late)
greenlets = [gevent.spawn(take, t) for t in timeouts]
gevent.joinall(greenlets, timeout=max(timeouts) + 20)
late.kill()
for t in timeouts:
    kind, waited = results.get(t, ("hung", -1.0))
    print(f"{t} {kind} {waited:.3f}")
if mode == "budget":
    mppools.close(unlink=True)
"""


def _run_gevent(mode: str, name: str, timeouts: list[float],
                imported: str) -> dict[float, tuple[str, float]]:
    pytest.importorskip("gevent")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", _GEVENT_SCRIPT, mode, name, ",".join(map(str, timeouts)),
         imported],
        capture_output=True, text=True, timeout=90, env=env, cwd=str(ROOT), check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results: dict[float, tuple[str, float]] = {}
    for line in proc.stdout.split("\n"):
        if line.strip():
            t, kind, waited = line.split()
            results[float(t)] = (kind, float(waited))
    return results


@pytest.mark.parametrize("imported", ["before", "after"])
@pytest.mark.parametrize("mode", ["local", "budget"])
def test_greenlets_each_wait_their_own_timeout(mode: str, imported: str,
                                               budget_name: str) -> None:
    """gevent: several greenlets of one thread acquire producers with different timeouts while
    nothing is free; each gives up after its own timeout, not another greenlet's (mppools
    imported before or after monkey-patching)."""
    timeouts = [0.5, 2.0, 3.5]
    results = _run_gevent(mode, budget_name, timeouts, imported)
    for t in timeouts:
        kind, waited = results[t]
        assert kind == "exceeded", (t, results)
        # correctness bounds: not before its own timeout, and not at another greenlet's
        # (they are 1.5 s apart; the holder lets go 4 s after the longest one)
        assert 0.8 * t <= waited < t + 1.0, (t, results)

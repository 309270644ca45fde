"""Fork safety: one handler, empty pools and no slots in the child, no deadlock, no close
of the parent's connections (by protocol, TLS or shutdown)."""

from __future__ import annotations

import multiprocessing
import os
import socket
import threading
import time

import pytest
from forkutil import run_in_child
from kombu import Connection

import mppools
from mppools import _fork, pools
from mppools._fork import drop_inherited

pytestmark = pytest.mark.timeout(60)


def test_pools_register_no_fork_hook_of_their_own(monkeypatch: pytest.MonkeyPatch,
                                                  budget_name: str) -> None:
    def refuse(**kwargs: object) -> None:
        raise AssertionError("os.register_at_fork called per object")

    monkeypatch.setattr(os, "register_at_fork", refuse)
    mppools.configure(limit=2, name=budget_name)
    for i in range(20):
        pool = pools.connections[Connection(f"memory://localhost/{i}")]
        pools.ProducerPool(pool, limit=2)
    group = pools.PoolGroup()
    assert id(group) in _fork._registries[2]


def test_registry_does_not_keep_pools_alive() -> None:
    import gc

    pool = pools.LimitedConnectionPool(Connection("memory://"), limit=2)
    key = id(pool)
    assert key in _fork._registries[1]
    del pool
    gc.collect()
    assert key not in _fork._registries[1]


def test_child_starts_with_empty_pools_and_no_slots(budget_name: str) -> None:
    mppools.configure(limit=3, name=budget_name, idle_timeout=None)
    conn = Connection("memory://")
    busy = pools.connections[conn].acquire(block=True)
    busy.connect()
    idle = pools.connections[Connection("memory://localhost/2")].acquire(block=True)
    idle.connect()
    idle.release()
    parent = os.getpid()

    def child() -> tuple[object, ...]:
        pool = pools.connections[conn]
        from kombu.utils.functional import lazy

        fresh = all(isinstance(x, lazy) for x in pool._resource.queue)
        holders = {h.pid: h.slots for h in mppools.stats().holders}
        c = pool.acquire(block=True, timeout=5)
        c.connect()
        mine = {h.pid: h.slots for h in mppools.stats().holders}.get(os.getpid())
        c.release()
        mppools.reset()
        return (len(pool._dirty), fresh, holders, mine, mppools.stats().in_use)

    dirty, fresh, holders, mine, after = run_in_child(child)
    # the child saw the parent's two slots, held none of them, took and gave back its own
    assert (dirty, fresh, holders, mine, after) == (0, True, {parent: 2}, 1, 2)
    # the parent's state is untouched
    assert busy.connected
    assert {h.pid: h.slots for h in mppools.stats().holders} == {parent: 2}
    busy.release()


def test_fork_while_another_thread_holds_the_locks(budget_name: str) -> None:
    limiter = mppools.configure(limit=2, name=budget_name)
    pool = pools.connections[Connection("memory://")]
    entered = threading.Event()
    leave = threading.Event()

    def hold() -> None:
        with limiter._mutex._tlock, pool._resource.mutex:
            entered.set()
            leave.wait(20)

    t = threading.Thread(target=hold)
    t.start()
    entered.wait(5)
    try:
        def child() -> int:
            c = pools.connections[Connection("memory://")].acquire(block=True, timeout=5)
            c.connect()
            n = mppools.stats().in_use
            c.release()
            return n

        # a deadlock here would hang; the worker's answer is bounded by run_in_child's timeout
        assert run_in_child(child, timeout=15) == 1
    finally:
        leave.set()
        t.join(5)


def test_drop_inherited_closes_only_the_fd_copy() -> None:
    """Detach+close in a child leaves the parent's end working; shutdown() would not."""
    a, b = socket.socketpair()

    class Transport:
        def __init__(self, sock: socket.socket) -> None:
            self.sock = sock
            self.nested = {"list": [sock]}

    holder = Transport(a)

    def child() -> int:
        n = drop_inherited(holder)
        try:
            holder.sock.shutdown(socket.SHUT_RDWR)  # what py-amqp's collect() would do
        except OSError:
            pass
        return n

    assert run_in_child(child) == 1
    a.sendall(b"ping")
    assert b.recv(4) == b"ping"
    b.sendall(b"pong")
    assert a.recv(4) == b"pong"

    # the counter-proof: a child calling shutdown() on its copy breaks the parent's
    def bad_child() -> int:
        a.shutdown(socket.SHUT_RDWR)
        return 0

    run_in_child(bad_child)
    b.settimeout(2)
    assert b.recv(4) == b""  # the peer saw the connection end
    a.close()
    b.close()


def _mp_child(q: multiprocessing.Queue[object], name: str) -> None:
    holders = [h.pid for h in mppools.stats().holders]
    c = pools.connections[Connection("memory://")].acquire(block=True, timeout=5)
    c.connect()
    q.put((os.getpid(), holders, mppools.stats().in_use))
    c.release()


@pytest.mark.parametrize("flavour", ["multiprocessing", "billiard"])
def test_multiprocessing_and_billiard_children(budget_name: str, flavour: str) -> None:
    mppools.configure(limit=2, name=budget_name, idle_timeout=None)
    c = pools.connections[Connection("memory://")].acquire(block=True)
    c.connect()
    c.release()
    if flavour == "multiprocessing":
        ctx = multiprocessing.get_context("fork")
    else:
        import billiard

        ctx = billiard.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_mp_child, args=(q, budget_name))
    p.start()
    _pid, holders, in_use = q.get(timeout=20)
    p.join(20)
    assert holders == [os.getpid()]
    assert in_use == 2  # the parent's idle slot and the child's own
    assert p.exitcode == 0
    # the child's slot came back when it closed (kombu's own after-fork hook did not run
    # a collect() on our pools) or when it exited (audit)
    mppools.audit()
    assert {h.pid for h in mppools.stats().holders} == {os.getpid()}


def test_child_of_child_and_epoch(budget_name: str) -> None:
    limiter = mppools.configure(limit=2, name=budget_name)
    slot = limiter.acquire()

    def child() -> tuple[int, int]:
        limiter.release(slot)  # inherited: a no-op in the child
        in_use = mppools.stats().in_use

        def grandchild() -> int:
            s = limiter.acquire(timeout=2)
            n = mppools.stats().in_use
            limiter.release(s)
            return n

        return in_use, run_in_child(grandchild)

    assert run_in_child(child) == (1, 2)
    assert _fork.current_epoch() == 0
    limiter.release(slot)


def test_keeper_restarts_in_child(budget_name: str) -> None:
    """A child's idle connection is yielded by the child's own keeper thread."""
    mppools.configure(limit=1, name=budget_name, idle_timeout=None)
    c = pools.connections[Connection("memory://")].acquire(block=True)
    c.connect()
    c.release()  # the parent holds the only slot, idle

    def child() -> float:
        t0 = time.monotonic()
        c2 = pools.connections[Connection("memory://localhost/x")].acquire(block=True,
                                                                         timeout=5)
        c2.connect()
        dt = time.monotonic() - t0
        c2.release()
        return dt

    assert run_in_child(child) < 5
    mppools.audit()
    assert mppools.stats().in_use <= 1

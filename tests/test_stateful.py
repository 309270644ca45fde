"""A hypothesis state machine driving REAL worker processes through the shared budget.

Rules: acquire (blocking with a short timeout, or not), release, connect-and-idle through
the pools, fork a new worker, SIGKILL a worker, set_limit. After every step the budget's
table, as read by the parent, never shows more holders than the limit (or than the
pre-shrink count after a forced shrink), and the slots held by live workers match what the
workers themselves report. At teardown every slot comes back.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import pytest
from forkutil import Worker
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from kombu import Connection

import mppools
from mppools import pools
from mppools._errors import LimitExceeded

pytestmark = pytest.mark.timeout(300)

MAX_WORKERS = 5


def _handlers() -> dict[str, Any]:
    held: list[Any] = []
    conns: list[Any] = []

    def acquire(timeout: float, block: bool) -> bool:
        limiter = mppools._config.current()
        assert limiter is not None
        try:
            held.append(limiter.acquire(block=block, timeout=timeout))
        except LimitExceeded:
            return False
        return True

    def release() -> bool:
        limiter = mppools._config.current()
        assert limiter is not None
        if not held:
            return False
        limiter.release(held.pop())
        return True

    def idle() -> bool:
        try:
            c = pools.connections[Connection("memory://")].acquire(block=True, timeout=0.3)
        except LimitExceeded:
            return False
        c.connect()
        c.release()
        conns.append(c)
        return True

    def count() -> tuple[int, int]:
        limiter = mppools._config.current()
        assert limiter is not None
        return len(held), sum(1 for s in held if limiter.holds(s))  # type: ignore[attr-defined]

    return {"acquire": acquire, "release": release, "idle": idle, "count": count}


class BudgetMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.name = f"sm{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.limit = 2
        self.ceiling = 2  # what the table may show: the limit, or more after a forced shrink
        mppools.configure(limit=2, name=self.name, acquire_timeout=0.2, idle_timeout=None)
        self.workers: list[Worker] = [Worker(_handlers()) for _ in range(3)]

    def teardown(self) -> None:
        try:
            for w in self.workers:
                w.kill()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                mppools.audit()
                if mppools.stats().in_use == 0:
                    break
                time.sleep(0.01)
            stats = mppools.stats()
            assert stats.in_use == 0, stats
            assert stats.free == stats.limit
            assert stats.extra["semaphore"] == stats.limit
        finally:
            mppools.close(unlink=True)
            pools.set_limit(10)

    def _live_slots(self) -> int:
        return mppools.stats().in_use

    @rule(i=st.integers(0, MAX_WORKERS - 1), block=st.booleans())
    def acquire(self, i: int, block: bool) -> None:
        if i < len(self.workers):
            self.workers[i].call("acquire", 0.05, block)

    @rule(i=st.integers(0, MAX_WORKERS - 1))
    def release(self, i: int) -> None:
        if i < len(self.workers):
            self.workers[i].call("release")
            self.ceiling = max(self.limit, min(self.ceiling, self._live_slots()))

    @rule(i=st.integers(0, MAX_WORKERS - 1))
    def idle(self, i: int) -> None:
        if i < len(self.workers):
            self.workers[i].call("idle")

    @precondition(lambda self: len(self.workers) < MAX_WORKERS)
    @rule()
    def fork(self) -> None:
        self.workers.append(Worker(_handlers()))

    @precondition(lambda self: len(self.workers) > 1)
    @rule(i=st.integers(0, MAX_WORKERS - 1))
    def sigkill(self, i: int) -> None:
        w = self.workers.pop(i % len(self.workers))
        w.kill()

    @rule(limit=st.integers(1, 4), force=st.booleans())
    def set_limit(self, limit: int, force: bool) -> None:
        in_use = self._live_slots()
        try:
            mppools.set_limit(limit, force=force)
        except RuntimeError:
            assert not force and limit < in_use
            return
        self.limit = limit
        self.ceiling = max(limit, in_use) if limit < in_use else limit

    @invariant()
    def never_above_the_limit(self) -> None:
        stats = mppools.stats()
        assert stats.in_use <= self.ceiling, (stats.in_use, self.ceiling, stats)
        # holders the table shows alive are exactly what the workers say they hold (plus
        # idle pool connections, which the workers do not count as "held")
        alive = {w.pid for w in self.workers}
        for h in stats.holders:
            if h.alive:
                assert h.pid in alive, f"slot held by unknown live pid {h.pid}"
        assert stats.extra["semaphore"] == max(stats.limit - stats.in_use, 0)

    @invariant()
    def held_slots_are_recorded(self) -> None:
        by_pid = {h.pid: h.slots for h in mppools.stats().holders}
        for w in self.workers:
            # every slot a live worker believes it holds is still recorded as its own
            held, recorded = w.call("count")
            assert held == recorded
            assert by_pid.get(w.pid, 0) >= held


TestBudgetMachine = BudgetMachine.TestCase
TestBudgetMachine.settings = settings(
    max_examples=25,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

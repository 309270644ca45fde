"""The in-process backend: one budget shared by the threads (and greenlets) of one process.

``configure(limit, backend="memory")`` gives the pools the same accounting as the shared
backends without any shared object: for tests, and for single-process programs that want
a hard cap on their own connections. It honours the whole :class:`~mppools._limiter.Limiter`
contract: at most ``limit`` slots at once; waiters served first come, first served (a slot
given back goes straight to the oldest waiter, nobody barges past them); every wait bounded
by its timeout; releasing twice is a no-op; ``resize`` grows, shrinks, or with ``force``
shrinks below what is in use and lets the releases pay the debt. Nothing is shared with other
processes: a forked child starts with the budget empty (the parent's slots are the parent's),
and ``audit`` has nothing to reclaim (a thread cannot die holding a slot without its process).
It offers the same warm-path cells as the POSIX backend (:meth:`MemoryLimiter.cells`), so the
pools exercise the same code over it, but no keeper address: idle connections are given back
by ``idle_timeout`` and at the first release under pressure, not on a waiter's request.
"""

from __future__ import annotations

import heapq
import os
import time
from collections import deque

from mppools import _fork, _green
from mppools._errors import (
    BudgetInUseError,
    BudgetNotFoundError,
    ConfigurationError,
    LimitExceeded,
)
from mppools._limiter._base import (
    PRESSURE_DEBT,
    PRESSURE_WAITING,
    STATE_BUSY,
    STATE_FREE,
    STATE_IDLE,
    AuditReport,
    Backend,
    BudgetStats,
    HolderStats,
    Limiter,
    Slot,
    WaiterStats,
    WaitHook,
    local_host,
)
from mppools._limiter.posix._names import default_name, validate_name
from mppools._validate import check_limit, check_wait_timeout

__all__ = ["BACKEND", "DEFAULT_CAPACITY", "MemoryLimiter"]

DEFAULT_CAPACITY = 1024
#: offset of the pressure byte in the cells; the state byte of slot i is at 1 + i
_PRESSURE_AT = 0

#: the budgets of this process, by name
_registry: dict[str, MemoryLimiter] = {}
_registry_lock = _green.Lock()


class _Waiter:
    """One blocked acquire: it sleeps on its own (held) lock until a slot is handed to it."""

    __slots__ = ("lock", "slot")

    def __init__(self) -> None:
        self.lock = _green.Lock()
        self.lock.acquire()
        self.slot: Slot | None = None


class MemoryLimiter(Limiter):
    """A budget shared by the threads of this process (see the module docstring)."""

    backend = "memory"

    def __init__(
        self,
        name: str,
        *,
        limit: int,
        capacity: int,
        acquire_timeout: float | None,
        idle_timeout: float | None,
        hold_quantum: float,
    ) -> None:
        super().__init__(name)
        self._lock = _green.Lock()
        self._limit = limit
        self._capacity = capacity
        self._acquire_timeout = acquire_timeout
        self._idle_timeout = idle_timeout
        self._hold_quantum = hold_quantum
        self._cells = bytearray(1 + capacity)
        self._view = memoryview(self._cells)
        self._held: dict[int, Slot] = {}
        self._free = list(range(capacity))  # a heap: the lowest free index first
        self._waiters: deque[_Waiter] = deque()
        self._next_token = 1
        self._acquired_total = 0
        self._timeouts_total = 0
        self._created_at = time.time()
        self._creator_pid = os.getpid()
        self._refs = 1
        self._closed = False

    # opening ------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        name: str,
        *,
        create: bool,
        limit: int | None = None,
        capacity: int | None = None,
        acquire_timeout: float | None = 10.0,
        idle_timeout: float | None = None,
        mode: int = 0o600,
        exclusive: bool = False,
        hold_quantum: float = 0.0,
    ) -> MemoryLimiter:
        """Open the budget ``name`` of this process (with ``create``, make it if needed).

        ``mode`` is accepted for the common signature and ignored (nothing is shared).

        Raises:
            BudgetNotFoundError: ``create`` is false and this process has no such budget.
            ConfigurationError: it exists with another limit; an invalid argument.
            FileExistsError: ``exclusive`` and the name is taken.
        """
        validate_name(name)
        with _registry_lock:
            shared = _registry.get(name)
            if shared is not None:
                if exclusive:
                    raise FileExistsError(f"memory budget {name!r} exists")
                if create and limit is not None and limit != shared.limit:
                    raise ConfigurationError(
                        f"budget {name!r} is open in this process with limit {shared.limit}; "
                        f"asked for limit {limit}: use set_limit() to change it"
                    )
                shared._refs += 1
                return shared
            if not create:
                raise BudgetNotFoundError(
                    f"no in-process budget named {name!r} in pid {os.getpid()}"
                )
            if limit is None:
                raise ConfigurationError("a limit is needed to create a budget")
            check_limit(limit)
            cap = capacity if capacity is not None else max(DEFAULT_CAPACITY, limit)
            check_limit(cap, "capacity")
            if cap < limit:
                raise ConfigurationError(f"capacity {cap} is below limit {limit}")
            limiter = cls(name, limit=limit, capacity=cap, acquire_timeout=acquire_timeout,
                          idle_timeout=idle_timeout, hold_quantum=hold_quantum)
            _registry[name] = limiter
            return limiter

    # cheap reads ----------------------------------------------------------------------------
    @property
    def limit(self) -> int:
        return self._limit

    @property
    def acquire_timeout(self) -> float | None:
        return self._acquire_timeout

    @property
    def idle_timeout(self) -> float | None:
        return self._idle_timeout

    @property
    def hold_quantum(self) -> float:
        return self._hold_quantum

    def under_pressure(self) -> bool:
        return not self._closed and self._view[_PRESSURE_AT] != 0

    def waiting_flag(self) -> bool:
        return not self._closed and bool(self._view[_PRESSURE_AT] & PRESSURE_WAITING)

    def in_debt(self) -> bool:
        return not self._closed and bool(self._view[_PRESSURE_AT] & PRESSURE_DEBT)

    def cells(self, slot: Slot) -> tuple[memoryview, int, int] | None:
        if slot.epoch != _fork.current_epoch() or self._closed:
            return None
        return self._view, 1 + slot.index, _PRESSURE_AT

    def mark_idle(self, slot: Slot) -> None:
        self._mark(slot, STATE_IDLE)

    def mark_busy(self, slot: Slot) -> None:
        self._mark(slot, STATE_BUSY)

    def _mark(self, slot: Slot, state: int) -> None:
        held = self._held.get(slot.index)
        if held is not None and held.token == slot.token and not self._closed:
            self._view[1 + slot.index] = state

    # the protocol (every *_locked step with self._lock held) --------------------------------
    def _take_locked(self) -> Slot:
        index = heapq.heappop(self._free)
        slot = Slot(index=index, token=self._next_token, pid=os.getpid(),
                    epoch=_fork.current_epoch(), acquired_at=time.time())
        self._next_token += 1
        self._held[index] = slot
        self._view[1 + index] = STATE_BUSY
        self._acquired_total += 1
        return slot

    def _give_back_locked(self, slot: Slot) -> bool:
        held = self._held.get(slot.index)
        if held is None or held.token != slot.token:
            return False  # released already (or never ours)
        del self._held[slot.index]
        self._view[1 + slot.index] = STATE_FREE
        heapq.heappush(self._free, slot.index)
        return True

    def _settle_locked(self) -> None:
        """Hand free slots to the oldest waiters (FIFO), then publish the pressure byte."""
        while self._waiters and len(self._held) < self._limit:
            waiter = self._waiters.popleft()
            waiter.slot = self._take_locked()
            waiter.lock.release()
        pressure = PRESSURE_WAITING if self._waiters else 0
        if len(self._held) > self._limit:
            pressure |= PRESSURE_DEBT
        self._view[_PRESSURE_AT] = pressure

    def _check_open_locked(self) -> None:
        if self._closed:
            raise RuntimeError(f"budget {self.name!r} was closed in this process")

    def _exceeded_locked(self, started: float, *, block: bool) -> LimitExceeded:
        waited = time.monotonic() - started
        by_pid: dict[int, int] = {}
        for slot in self._held.values():
            by_pid[slot.pid] = by_pid.get(slot.pid, 0) + 1
        who = ", ".join(f"pid {pid} ({n})" for pid, n in sorted(by_pid.items())) or "nobody"
        how = "at once (block=False)" if not block else f"after {waited:.2f} s"
        return LimitExceeded(
            f"no free slot in budget {self.name!r} (limit {self._limit}) {how}: "
            f"{len(self._held)} held by {who}; {len(self._waiters)} waiting",
            name=self.name, limit=self._limit, waited=waited,
            holders=tuple(sorted(by_pid.items())),
        )

    # public API ------------------------------------------------------------------------------
    def acquire(self, *, block: bool = True, timeout: float | None = None,
                on_wait: WaitHook | None = None) -> Slot:
        timeout = check_wait_timeout(timeout)
        if timeout is None:
            timeout = self._acquire_timeout
        started = time.monotonic()
        with self._lock:
            self._check_open_locked()
            if not self._waiters and len(self._held) < self._limit:
                return self._take_locked()
            if not block:
                raise self._exceeded_locked(started, block=False)
            waiter = _Waiter()
            self._waiters.append(waiter)
            self._settle_locked()
        try:
            waiter.lock.acquire(timeout=-1 if timeout is None else timeout)
        except BaseException:
            # a signal handler's exception: give back what was handed to us meanwhile
            with self._lock:
                if waiter.slot is not None:
                    self._give_back_locked(waiter.slot)
                elif waiter in self._waiters:
                    self._waiters.remove(waiter)
                self._settle_locked()
            raise
        with self._lock:
            if waiter.slot is not None:  # handed to us (perhaps just as the wait timed out)
                return waiter.slot
            if waiter in self._waiters:
                self._waiters.remove(waiter)
                self._timeouts_total += 1
                self._settle_locked()
                raise self._exceeded_locked(started, block=True)
            self._check_open_locked()  # woken by close()
            raise RuntimeError(f"budget {self.name!r} lost a waiter")  # pragma: no cover

    def release(self, slot: Slot) -> None:
        if slot.epoch != _fork.current_epoch() or self._closed:
            return  # inherited from the parent: it is the parent's to give back
        with self._lock:
            if self._give_back_locked(slot):
                self._settle_locked()

    def audit(self) -> AuditReport:
        """Nothing to reclaim: a thread cannot die holding a slot without its process."""
        return AuditReport(host=local_host())

    def resize(self, limit: int, *, force: bool = False) -> None:
        check_limit(limit)
        with self._lock:
            self._check_open_locked()
            if limit > self._capacity:
                raise ConfigurationError(
                    f"limit {limit} is above the capacity {self._capacity} of budget "
                    f"{self.name!r}; configure it with a larger capacity"
                )
            in_use = len(self._held)
            if limit < in_use and not force:
                raise BudgetInUseError(
                    f"can't shrink budget {self.name!r} when in use: was={self._limit} "
                    f"now={limit}, {in_use} slots in use"
                )
            self._limit = limit
            self._settle_locked()

    def stats(self) -> BudgetStats:
        host = local_host()
        with self._lock:
            self._check_open_locked()
            slots = list(self._held.values())
            states = bytes(self._view)
            waiting = len(self._waiters)
            limit = self._limit
            acquired, timeouts = self._acquired_total, self._timeouts_total
        by_pid: dict[int, list[Slot]] = {}
        for slot in slots:
            by_pid.setdefault(slot.pid, []).append(slot)
        holders = tuple(
            HolderStats(
                host=host, pid=pid, slots=len(held),
                idle=sum(1 for s in held if states[1 + s.index] == STATE_IDLE),
                busy=sum(1 for s in held if states[1 + s.index] == STATE_BUSY),
                since=min(s.acquired_at for s in held), alive=True,
            )
            for pid, held in sorted(by_pid.items())
        )
        in_use = len(slots)
        return BudgetStats(
            name=self.name,
            backend=self.backend,
            host=host,
            limit=limit,
            in_use=in_use,
            free=max(limit - in_use, 0),
            waiting=waiting,
            debt=max(in_use - limit, 0),
            holders=holders,
            waiters=tuple(WaiterStats(host=host, pid=os.getpid()) for _ in range(waiting)),
            creator_pid=self._creator_pid,
            created_at=self._created_at,
            acquired_total=acquired,
            reclaimed_total=0,
            timeouts_total=timeouts,
            acquire_timeout=self._acquire_timeout,
            idle_timeout=self._idle_timeout,
            hold_quantum=self._hold_quantum,
            extra={"capacity": self._capacity},
        )

    def unlink(self, *, force: bool = False) -> None:
        """Forget the name: later opens by name fail (this handle works until closed).
        Only this process can use the budget, so nobody else is ever in the way."""
        with _registry_lock:
            if _registry.get(self.name) is self:
                del _registry[self.name]

    def is_creator(self) -> bool:
        return self._creator_pid == os.getpid()

    def after_fork_in_child(self) -> None:
        # the parent's threads, waiters and slots are not this process's: start empty
        self._lock._reset()
        self._held = {}
        self._free = list(range(self._capacity))
        self._waiters = deque()
        if not self._closed:
            self._view[:] = bytes(len(self._view))

    def close(self) -> None:
        """Drop this reference; the last one closes the budget (and forgets its name)."""
        with _registry_lock:
            if self._closed:
                return
            self._refs -= 1
            if self._refs > 0:
                return
            if _registry.get(self.name) is self:
                del _registry[self.name]
        with self._lock:
            self._closed = True
            waiters, self._waiters = self._waiters, deque()
            for waiter in waiters:
                waiter.lock.release()  # they find the budget closed
        self._view.release()

    def __repr__(self) -> str:
        if self._closed:
            return f"<MemoryLimiter {self.name!r} closed>"
        return (f"<MemoryLimiter {self.name!r} limit={self._limit} in_use={len(self._held)} "
                f"waiting={len(self._waiters)}>")


def _after_fork_in_child() -> None:
    _registry_lock._reset()


_fork.on_fork_in_child(_after_fork_in_child)

#: how ``configure(backend="memory")`` reaches this backend
BACKEND = Backend(spec="memory", open=MemoryLimiter.open, validate_name=validate_name,
                  default_name=default_name)

"""The host-wide backend: a POSIX named semaphore plus a shared-memory slot table.

Protocol (every step under the budget mutex, see :mod:`._books`):

* acquire: ``S.acquire(0)``; if that worked, write our record and take its token.
  Decrement, record and token are one critical section, so nothing is ever "in flight"
  outside the mutex; a crash anywhere is repaired by the next settle or audit.
* release: clear our record, drop its token, then *settle*.
* settle: free = limit - in_use. While free > 0 and someone waits, hand a slot straight to
  the oldest live waiter (FIFO, no barging on a hand-off) and wake it. Then set ``S`` to
  ``max(free, 0)``. When in_use > limit after a forced shrink, the difference is the debt:
  releases pay it back before anything is handed on.
* audit: clear records and waiters whose token is free (their holder died), then settle.

A waiter does not block inside posix_ipc: it registers a waiter record and sleeps on its own
path socket (woken by a hand-off) plus the pidfds of the holders it can see (woken the moment
a holder dies, then it audits), in slices of ``SLICE`` seconds (the head of the queue; the
others' are longer, see :mod:`._wait`). A signal
handler's exception (gunicorn's ``SystemExit``, celery's ``SoftTimeLimitExceeded``) propagates
unchanged; blocking in ``posix_ipc.Semaphore.acquire`` would replace it with
``posix_ipc.SignalError``. Time is measured with ``time.monotonic()``; posix_ipc's timed waits
use the wall clock.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
import time
from typing import Any

from mppools import _fork, _green
from mppools._errors import (
    BudgetInUseError,
    BudgetNotFoundError,
    ConfigurationError,
    LimitExceeded,
    PermissionDeniedError,
)
from mppools._limiter._base import (
    MAX_USE_RATE,
    AuditReport,
    BudgetStats,
    HolderStats,
    Limiter,
    LoanOffer,
    Offer,
    Slot,
    WaiterStats,
    WaitHook,
    local_host,
)
from mppools._slots import (
    CREATOR_TOKEN_AT,
    FLAGS_AT,
    HANDOVER_COST_AT,
    HEADER_SIZE,
    LAYOUT_VERSION,
    LIMIT_AT,
    MAGIC,
    NEXT_TOKEN_AT,
    OPENERS_AT,
    PRESSURE_DEBT,
    PRESSURE_WAITING,
    SLOT_SIZE,
    TIMEOUTS_AT,
    USE_RATE_AT,
    WAITER_SIZE,
    YIELDS_AT,
    Header,
    SlotRecord,
    SlotState,
    Table,
    WaiterState,
    segment_size,
)
from mppools._validate import check_limit, check_wait_timeout

from . import _self, _tokens, _wait
from ._books import Books
from ._mutex import Mutex
from ._names import keeper_path, lend_path, shm_path, tokens_path, validate_name, waiter_path
from ._segment import (
    ensure_dir,
    open_semaphore,
    open_shm,
    open_tokens,
    read_header,
    remove_objects,
)
from ._self import Me

__all__ = ["DEFAULT_CAPACITY", "PosixLimiter", "unlink"]

DEFAULT_CAPACITY = 1024
_U32 = struct.Struct("<I")
_F64 = struct.Struct("<d")


def _timeout_field(value: float | None) -> float:
    return -1.0 if value is None else float(value)


def _timeout_value(field: float) -> float | None:
    return None if field < 0 else field


#: the budgets this process has open, by name (see PosixLimiter.open)
_instances: dict[str, PosixLimiter] = {}
_instances_lock = _green.RLock()
#: one holder watcher per process, for every budget and waiting thread
_watcher = _wait.Watcher()


class PosixLimiter(Limiter):
    """One budget shared by all processes of this host that open the same name."""

    backend = "posix"

    def __init__(
        self, name: str, shm: Any, buf: mmap.mmap, table: Table, sem: Any, tokens_fd: int
    ) -> None:
        super().__init__(name)
        self._shm = shm
        self._fd: int = shm.fd
        self._tfd = tokens_fd
        self._mmap = buf
        self._table = table
        self._view = table.buf
        self._sem = sem
        self._books = Books(name, table, sem, tokens_fd)
        self._mutex = Mutex(self._fd, self._books.publish_pressure)
        self._closed = False
        self._broken: str | None = None  # why this process may not use the budget
        self._refs = 1
        self._pid = os.getpid()
        self._slot_map_at = table.slot_map_at

    # opening -------------------------------------------------------------------------------
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
    ) -> PosixLimiter:
        """Open (and with ``create``, create or recover) the budget ``name``.

        ``exclusive`` fails if a segment of that name exists at all (for generated names).

        Raises:
            BudgetNotFoundError: ``create`` is false and no such budget exists.
            IncompatibleSegmentError: the segment is not an mppools segment of this layout.
            PermissionDeniedError: the shared objects belong to another user.
            ConfigurationError: the budget exists with a different limit and a live creator.
            FileExistsError: ``exclusive`` and the name is taken.
        """
        validate_name(name)
        with _instances_lock:
            shared = _instances.get(name)
            if shared is not None and not shared._closed:
                # one fd per process and segment: closing a second fd of the same file would
                # silently drop this process's fcntl lock (POSIX record-lock semantics)
                if create and limit is not None and limit != shared.limit:
                    raise ConfigurationError(
                        f"budget {name!r} is open in this process with limit {shared.limit}; "
                        f"asked for limit {limit}: use set_limit() to change it"
                    )
                shared._refs += 1
                return shared
            limiter = cls._open_new(name, create=create, limit=limit, capacity=capacity,
                                    acquire_timeout=acquire_timeout,
                                    idle_timeout=idle_timeout, mode=mode, exclusive=exclusive,
                                    hold_quantum=hold_quantum)
            _instances[name] = limiter
            return limiter

    @classmethod
    def _open_new(
        cls,
        name: str,
        *,
        create: bool,
        limit: int | None,
        capacity: int | None,
        acquire_timeout: float | None,
        idle_timeout: float | None,
        mode: int,
        exclusive: bool,
        hold_quantum: float,
    ) -> PosixLimiter:
        cap = capacity if capacity is not None else max(DEFAULT_CAPACITY, limit or 0)
        shm, created = open_shm(name, create=create, size=segment_size(cap, cap), mode=mode)
        if exclusive and not created:
            shm.close_fd()
            raise FileExistsError(shm_path(name))
        try:
            return cls._open_locked(
                name, shm, create=create, limit=limit, capacity=cap,
                acquire_timeout=acquire_timeout, idle_timeout=idle_timeout, mode=mode,
                hold_quantum=hold_quantum,
            )
        except BaseException:
            shm.close_fd()
            if created:
                # we made it and failed before it was usable: leave nothing behind
                remove_objects(name)
            raise

    @classmethod
    def _open_locked(
        cls,
        name: str,
        shm: Any,
        *,
        create: bool,
        limit: int | None,
        capacity: int,
        acquire_timeout: float | None,
        idle_timeout: float | None,
        mode: int,
        hold_quantum: float,
    ) -> PosixLimiter:
        fcntl.lockf(shm.fd, fcntl.LOCK_EX, 1, 0)
        try:
            size = os.fstat(shm.fd).st_size
            header = read_header(name, shm.fd, size)
            if header is None:
                if not create:
                    raise BudgetNotFoundError(f"budget {name!r} exists but is not initialized")
                if limit is None:
                    raise ConfigurationError("a limit is needed to create a budget")
                full = segment_size(capacity, capacity)
                if size != full:
                    os.ftruncate(shm.fd, full)
                ensure_dir(name, mode)
                self = cls._assemble(name, shm, full, capacity, capacity, mode, create=True)
                try:
                    self._initialize(limit, acquire_timeout, idle_timeout, hold_quantum)
                except BaseException:
                    self._dispose()
                    raise
                return self
            full = segment_size(header.capacity, header.waiter_capacity)
            if size < full:
                from mppools._errors import IncompatibleSegmentError

                raise IncompatibleSegmentError(
                    f"budget {name!r} is truncated: {size} bytes, its header says {full}"
                )
            if create:
                ensure_dir(name, mode)
            self = cls._assemble(name, shm, full, header.capacity, header.waiter_capacity,
                                 mode, create=create)
            try:
                if create:
                    self._books.check(_self.me())  # may repair from the tokens
                else:
                    self._table.check_header()  # read-only: attach changes nothing
                if create:
                    self._join_or_recover(header, limit, acquire_timeout, idle_timeout,
                                          hold_quantum)
            except BaseException:
                self._dispose()
                raise
            # attach (create=False) changes nothing: `mppools status` must be read-only
            return self
        finally:
            with contextlib.suppress(OSError, ValueError):  # closed by _dispose()
                fcntl.lockf(shm.fd, fcntl.LOCK_UN, 1, 0)

    @classmethod
    def _assemble(
        cls, name: str, shm: Any, size: int, capacity: int, waiter_capacity: int, mode: int,
        *, create: bool,
    ) -> PosixLimiter:
        """Open the token file, map the segment, open the semaphore; nothing leaks on error."""
        tfd = open_tokens(name, create=create)
        # this description has the budget open: an unforced unlink elsewhere is refused
        _tokens.share(tfd, OPENERS_AT)
        buf: mmap.mmap | None = None
        try:
            buf = mmap.mmap(shm.fd, size)
            sem = open_semaphore(name, mode, create=create)
        except BaseException:
            if buf is not None:
                buf.close()
            os.close(tfd)
            raise
        return cls(name, shm, buf, Table(memoryview(buf), capacity, waiter_capacity), sem, tfd)

    def _dispose(self) -> None:
        """Undo a half-made open: its mapping, semaphore and token fd (not the segment fd,
        which the opener closes)."""
        self._closed = True
        _fork.unregister(self)
        self._view.release()
        with contextlib.suppress(BufferError):
            self._mmap.close()
        with contextlib.suppress(Exception):
            self._sem.close()
        with contextlib.suppress(OSError):
            os.close(self._tfd)

    def _initialize(
        self, limit: int, acquire_timeout: float | None, idle_timeout: float | None,
        hold_quantum: float,
    ) -> None:
        me = _self.me()
        self._view[HEADER_SIZE:] = bytes(len(self._view) - HEADER_SIZE)
        self._take_creator_token(me)
        self._table.write_header(
            Header(
                magic=MAGIC, version=LAYOUT_VERSION, header_size=HEADER_SIZE,
                slot_size=SLOT_SIZE, waiter_size=WAITER_SIZE, capacity=self._table.capacity,
                waiter_capacity=self._table.waiter_capacity, limit=limit, creator_pid=me.pid,
                flags=0, creator_start=me.start, created_at=time.time(), generation=1,
                next_token=1, reclaimed_total=0, timeouts_total=0, acquired_total=0,
                acquire_timeout=_timeout_field(acquire_timeout),
                idle_timeout=_timeout_field(idle_timeout), uid=os.geteuid(),
                creator_owner=me.owner, hold_quantum=hold_quantum,
            )
        )
        self._books.settle(me)
        self._books.publish_pressure()

    def _take_creator_token(self, me: Me) -> None:
        if not _tokens.take(self._tfd, CREATOR_TOKEN_AT):  # pragma: no cover - checked before
            raise BudgetInUseError(f"budget {self.name!r} has a live creator")

    def _join_or_recover(
        self,
        header: Header,
        limit: int | None,
        acquire_timeout: float | None,
        idle_timeout: float | None,
        hold_quantum: float,
    ) -> None:
        me = _self.me()
        books = self._books
        creator_alive = header.creator_owner == me.owner or _tokens.is_held(
            self._tfd, CREATOR_TOKEN_AT)
        if creator_alive:
            if limit is not None and limit != header.limit:
                raise ConfigurationError(
                    f"budget {self.name!r} already exists with limit {header.limit} "
                    f"(created by live pid {header.creator_pid}); asked for limit {limit}: "
                    "use set_limit() to change it, or another name"
                )
            books.settle(me)
            books.publish_pressure()
            return
        # leftovers of a creator that died without cleaning up (SIGKILLed master)
        books.audit(me)
        users = books.live_users(me)
        if limit is None:
            limit = header.limit
        if limit > header.capacity:
            raise ConfigurationError(
                f"budget {self.name!r} was left with capacity {header.capacity}, "
                f"too small for limit {limit}; run `mppools unlink {self.name} --force`"
            )
        if not users:
            self._initialize(limit, acquire_timeout, idle_timeout, hold_quantum)
            return
        # orphaned workers of the dead master still hold slots: adopt the budget in place
        # (unlinking now would split it in two)
        self._take_creator_token(me)
        header = self._table.read_header()
        header.creator_pid, header.creator_start, header.creator_owner = me.pid, me.start, me.owner
        header.limit = limit
        header.acquire_timeout = _timeout_field(acquire_timeout)
        header.idle_timeout = _timeout_field(idle_timeout)
        header.hold_quantum = hold_quantum
        header.generation += 1
        self._table.write_header(header)
        books.settle(me)
        books.publish_pressure()

    # the mutex -----------------------------------------------------------------------------
    def _locked(self) -> Mutex:
        """The budget's mutex: this process's threads first, then the fcntl record lock."""
        if self._closed:
            raise RuntimeError(f"budget {self.name!r} was closed in this process")
        if self._pid != os.getpid():
            # forked without the fork handlers (a C-level fork): rebuild now (redis-py's
            # _checkpid backstop)
            self.after_fork_in_child()
        if self._broken is not None:
            raise PermissionDeniedError(self._broken)
        return self._mutex

    def under_pressure(self) -> bool:
        """True if a slot given back now would be used at once (a memory read, no lock)."""
        return not self._closed and self._view[FLAGS_AT] != 0

    def waiting_flag(self) -> bool:
        """True if someone waits for a slot of this budget now (a memory read, no lock)."""
        return not self._closed and bool(self._view[FLAGS_AT] & PRESSURE_WAITING)

    def in_debt(self) -> bool:
        """True if the budget holds more slots than its limit (after a forced shrink)."""
        return not self._closed and bool(self._view[FLAGS_AT] & PRESSURE_DEBT)

    # header fields ---------------------------------------------------------------------------
    @property
    def limit(self) -> int:
        return int(_U32.unpack_from(self._view, LIMIT_AT)[0])

    @property
    def acquire_timeout(self) -> float | None:
        return _timeout_value(self._table.read_header().acquire_timeout)

    @property
    def idle_timeout(self) -> float | None:
        return _timeout_value(self._table.read_header().idle_timeout)

    @property
    def hold_quantum(self) -> float:
        return self._table.read_header().hold_quantum

    def handover_cost(self) -> float:
        """Shared by every process of the budget (header field, read without the mutex)."""
        if self._closed:
            return 0.0
        (value,) = _F64.unpack_from(self._view, HANDOVER_COST_AT)
        return float(value) if 0.0 <= value < 60.0 else 0.0  # NaN fails both

    def note_handover_cost(self, seconds: float) -> None:
        if self._closed or not 0.0 <= seconds < 60.0:
            return
        old = self.handover_cost()
        _F64.pack_into(self._view, HANDOVER_COST_AT,
                       seconds if old <= 0.0 else old + (seconds - old) / 8)

    def use_rate(self) -> float:
        """Shared by every process of the budget (header field, read without the mutex)."""
        if self._closed:
            return 0.0
        (value,) = _F64.unpack_from(self._view, USE_RATE_AT)
        return float(value) if 0.0 < value < MAX_USE_RATE else 0.0  # NaN fails both

    def note_use_rate(self, per_second: float) -> None:
        if self._closed or not 0.0 < per_second < MAX_USE_RATE:
            return
        old = self.use_rate()
        _F64.pack_into(self._view, USE_RATE_AT,
                       per_second if old <= 0.0 else old + (per_second - old) / 8)

    def note_yield(self) -> None:
        if self._closed:
            return
        with self._locked():
            self._table.bump(YIELDS_AT)

    # public API ------------------------------------------------------------------------------
    def acquire(self, *, block: bool = True, timeout: float | None = None,
                on_wait: WaitHook | None = None) -> Slot:
        timeout = check_wait_timeout(timeout)
        if timeout is None:
            timeout = self.acquire_timeout
        started = time.monotonic()
        with self._locked():
            me = _self.me()
            slot = self._books.try_take(me)
            if slot is None and not block:
                # dead holders may be all that stands in the way: audit (failure path only)
                wakes = self._books.audit(me)[1]
                slot = self._books.try_take(me)
            else:
                wakes = []
        _wait.notify(wakes)
        if slot is not None:
            return slot
        if not block:
            raise self._exceeded(started, block=False)
        if on_wait is not None:
            # before waiting, so a loan that comes through at once never shows as a waiter
            # (the pressure flag would make holders hand on at their turn's end)
            on_wait(None)
        deadline = None if timeout is None else started + timeout
        return self._wait(me, started, deadline, on_wait)

    def _wait(self, me: Me, started: float, deadline: float | None,
              on_wait: WaitHook | None = None) -> Slot:
        books = self._books
        nonce, sock = _wait.bind_waiter(self.name)
        windex = -1
        watched: dict[tuple[int, int], int] = {}
        unwatchable: set[tuple[int, int]] = set()
        wants = on_wait.wants if on_wait is not None else 0
        offers: list[LoanOffer] = []  # offered to us, not yet claimed
        try:
            audit = False
            while True:
                wakes: list[str] = []
                with self._locked():
                    if audit:
                        wakes = books.audit(me)[1]
                    if windex >= 0:
                        granted = books.take_grant(windex, nonce, me)
                        if granted is not None:
                            windex = -1
                            return granted
                    slot = books.try_take(me)
                    if slot is not None:
                        if windex >= 0:
                            books.drop_waiter(windex)
                            windex = -1
                        return slot
                    if windex < 0:
                        windex = books.register_waiter(
                            me, nonce, self._table.bump(NEXT_TOKEN_AT), wants)
                    holders = self._table.used_slots()
                    waiting = self._table.waiting()
                    head = waiting <= 1 or self._table.oldest_waiting() == windex
                _wait.notify(wakes)
                if offers and on_wait is not None:
                    while offers:
                        on_wait(offers.pop(0))  # raises if the loan came through
                    # none came through (taken back meanwhile): offers may come again
                    if windex >= 0:
                        with self._locked():
                            self._table.set_offered(windex, False)
                self._request_yields(holders, max(waiting, 1))
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                wait_for = _wait.SLICE if head else _wait.SLICE * _wait.BEHIND_SLICES
                if deadline is not None:
                    wait_for = min(wait_for, deadline - now)
                watched, gone = self._rewatch(watched, holders, me, unwatchable)
                if gone:
                    # audit once for them; if their tokens say they live on (a process that
                    # shares their open file description), leave them to the slices
                    unwatchable |= gone
                    audit = True
                    continue
                woken, died, offered = _wait.sleep(sock, watched.values(), wait_for)
                offers += [LoanOffer(lend_path(self.name, owner), ticket)
                           for owner, ticket in offered]
                audit = died or not woken
            # out of time: a hand-off may still have raced in
            with self._locked():
                if windex >= 0:
                    granted = books.take_grant(windex, nonce, me)
                    if granted is None:
                        books.drop_waiter(windex)
                    windex = -1
                    if granted is not None:
                        return granted
                self._table.bump(TIMEOUTS_AT)
            raise self._exceeded(started, block=True)
        finally:
            if windex >= 0:
                # leaving by an exception (a signal handler's, say): give back anything
                # handed to us meanwhile and drop our waiter record
                with self._locked():
                    wakes = books.abandon(windex, nonce, me)
                _wait.notify(wakes)
            if on_wait is not None:
                for unclaimed in offers:  # a slot came first: the lenders need not wait
                    with contextlib.suppress(Exception):
                        on_wait.decline(unclaimed)
            _watcher.unwatch(watched)
            _wait.close_waiter(self.name, nonce, sock)

    @staticmethod
    def _rewatch(
        watched: dict[tuple[int, int], int], holders: list[SlotRecord], me: Me,
        unwatchable: set[tuple[int, int]],
    ) -> tuple[dict[tuple[int, int], int], set[tuple[int, int]]]:
        """Watch the pidfds of the holders this process can see (same PID namespace)."""
        visible = {(r.pid, r.start) for r in holders
                   if me.pidns and r.pidns == me.pidns and r.owner != me.owner}
        visible -= unwatchable
        stale = [k for k in watched if k not in visible]
        _watcher.unwatch(stale)
        kept = {k: fd for k, fd in watched.items() if k in visible}
        new, gone = _watcher.watch(k for k in visible if k not in kept)
        kept.update(new)
        return kept, gone

    def sever_excess(self) -> None:
        """After a forced shrink because slots' leases were lost (the cross-host fence): ask
        the keepers of the busy slots beyond the limit, oldest first, to cut their
        connections' sockets if they are still in use after a grace (idle ones are yielded
        by the shrink already). Keepers act only while the budget is still in debt."""
        from mppools import _yield

        with self._locked():
            used = self._table.used_slots()
            excess = len(used) - self._table.limit
        if excess <= 0:
            return
        # not this process's own: the caller (the lease keeper, the watchdog) holds no
        # pooled connection it could be asked about, but may hold a slot (the plug)
        owner = _self.me().owner
        busy = sorted((r for r in used if r.state == SlotState.BUSY and r.owner != owner),
                      key=lambda r: r.since)
        self._send(busy[:excess], _yield.SEVER)

    def _request_yields(self, holders: list[SlotRecord], wanted: int) -> None:
        from mppools import _yield

        idle = sorted((r for r in holders if r.state == SlotState.IDLE), key=lambda r: r.since)
        self._send(idle[:wanted], _yield.YIELD)

    def _send(self, records: list[SlotRecord], kind: bytes) -> None:
        """One request of ``kind`` to the keeper of each record's holder (best effort)."""
        from mppools import _yield

        if not records:
            return
        import socket

        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            for rec in records:
                with contextlib.suppress(OSError):
                    s.sendto(_yield.encode(rec.index, rec.token, kind),
                             keeper_path(self.name, rec.owner))

    def _exceeded(self, started: float, *, block: bool) -> LimitExceeded:
        waited = time.monotonic() - started
        try:
            with self._locked():
                holders = self._table.used_slots()
                waiting = sum(1 for w in self._table.used_waiters()
                              if w.state == WaiterState.WAITING)
                limit = self._table.limit
        except Exception:  # pragma: no cover - describing the error must not hide it
            holders, waiting, limit = [], 0, self.limit
        by_pid: dict[int, int] = {}
        for rec in holders:
            by_pid[rec.pid] = by_pid.get(rec.pid, 0) + 1
        who = ", ".join(f"pid {pid} ({n})" for pid, n in sorted(by_pid.items())) or "nobody"
        how = "at once (block=False)" if not block else f"after {waited:.2f} s"
        return LimitExceeded(
            f"no free slot in budget {self.name!r} (limit {limit}) {how}: "
            f"{len(holders)} held by {who}; {waiting} waiting",
            name=self.name, limit=limit, waited=waited,
            holders=tuple(sorted(by_pid.items())),
        )

    def release(self, slot: Slot) -> None:
        if slot.epoch != _fork.current_epoch() or self._closed:
            return  # inherited from the parent: it is the parent's to give back
        with self._locked():
            wakes = self._books.release(slot, _self.me())
        if wakes:
            _wait.notify(wakes)

    def cells(self, slot: Slot) -> tuple[memoryview, int, int] | None:
        if slot.epoch != _fork._epoch or self._closed:
            return None
        return self._view, self._slot_map_at + slot.index, FLAGS_AT

    def mark_idle(self, slot: Slot) -> None:
        if slot.epoch == _fork._epoch and not self._closed:
            self._view[self._slot_map_at + slot.index] = SlotState.IDLE

    def mark_busy(self, slot: Slot) -> None:
        if slot.epoch == _fork._epoch and not self._closed:
            self._view[self._slot_map_at + slot.index] = SlotState.BUSY

    def holds(self, slot: Slot) -> bool:
        """True if ``slot`` is still recorded as ours (not released, not reclaimed)."""
        return self._books.holds(slot, _self.me())

    def audit(self) -> AuditReport:
        with self._locked():
            report, wakes = self._books.audit(_self.me())
        _wait.notify(wakes)
        return report

    def resize(self, limit: int, *, force: bool = False) -> None:
        check_limit(limit)
        excess: list[SlotRecord] = []
        with self._locked():
            me = _self.me()
            header = self._table.read_header()
            if limit > header.capacity:
                raise ConfigurationError(
                    f"limit {limit} is above the capacity {header.capacity} of budget "
                    f"{self.name!r}; configure it with a larger capacity"
                )
            self._books.audit(me)
            in_use = self._table.in_use()
            if limit < in_use and not force:
                raise BudgetInUseError(
                    f"can't shrink budget {self.name!r} when in use: was={header.limit} "
                    f"now={limit}, {in_use} slots in use"
                )
            header = self._table.read_header()
            header.limit = limit
            header.generation += 1
            self._table.write_header(header)
            wakes = self._books.settle(me)
            if in_use > limit:
                excess = self._table.used_slots()
        _wait.notify(wakes)
        if excess:
            self._request_yields(excess, in_use - limit)

    def stats(self) -> BudgetStats:
        with self._locked():
            me = _self.me()
            header = self._table.read_header()
            slots = self._table.used_slots()
            waiters = [w for w in self._table.used_waiters() if w.state == WaiterState.WAITING]
            alive = {r.owner: self._books.slot_alive(r, me) for r in slots}
            sem_value = int(self._sem.value)
        holders: dict[int, list[SlotRecord]] = {}
        for rec in slots:
            holders.setdefault(rec.owner, []).append(rec)
        host = local_host()
        holder_stats = tuple(sorted(
            (HolderStats(
                host=host,
                pid=recs[0].pid,
                slots=len(recs),
                idle=sum(1 for r in recs if r.state == SlotState.IDLE),
                busy=sum(1 for r in recs if r.state == SlotState.BUSY),
                since=min(r.since for r in recs),
                alive=alive[owner],
            ) for owner, recs in holders.items()),
            key=lambda h: (h.pid, h.since),
        ))
        in_use = len(slots)
        return BudgetStats(
            name=self.name,
            backend="posix",
            host=host,
            limit=header.limit,
            in_use=in_use,
            free=max(header.limit - in_use, 0),
            waiting=len(waiters),
            debt=max(in_use - header.limit, 0),
            holders=holder_stats,
            waiters=tuple(WaiterStats(host=host, pid=pid)
                          for pid in sorted(w.pid for w in waiters)),
            creator_pid=header.creator_pid,
            created_at=header.created_at,
            acquired_total=header.acquired_total,
            reclaimed_total=header.reclaimed_total,
            timeouts_total=header.timeouts_total,
            acquire_timeout=_timeout_value(header.acquire_timeout),
            idle_timeout=_timeout_value(header.idle_timeout),
            hold_quantum=header.hold_quantum,
            extra={"capacity": header.capacity, "semaphore": sem_value,
                   "generation": header.generation, "segment_bytes": len(self._view),
                   "yields_total": self._table.read_u64(YIELDS_AT)},
        )

    def keeper_address(self) -> str:
        return keeper_path(self.name, _self.me().owner)

    def offer_loan(self, ticket: int, wants: int) -> Offer:
        if self._closed or not wants:
            return Offer.HAND_OVER
        me = _self.me()
        with self._locked():
            index = self._table.oldest_to_offer(wants, me.owner)
            if index < 0:
                return Offer.HAND_OVER if index == -1 else Offer.NOT_NEEDED
            nonce = self._table.read_waiter(index).nonce
            self._table.set_offered(index, True)
        if _wait.offer(waiter_path(self.name, nonce), me.owner, ticket):
            return Offer.MADE
        with self._locked():  # it left (or died) meanwhile: nobody was told
            if self._table.read_waiter(index).nonce == nonce:
                self._table.set_offered(index, False)
        return Offer.NOT_NEEDED  # the keeper looks at the connection again

    def lend_address(self) -> str:
        return lend_path(self.name, _self.me().owner)

    def lenders(self) -> list[str]:
        owner = _self.me().owner
        with self._locked():
            idle = [r for r in self._table.used_slots()
                    if r.state == SlotState.IDLE and r.owner != owner]
        idle.sort(key=lambda r: r.since)
        return list(dict.fromkeys(lend_path(self.name, r.owner) for r in idle))

    def damage(self) -> list[str]:
        """What is wrong with the shared tables, in words (empty: nothing); read-only."""
        with self._locked():
            return self._books.damage()

    def live_users(self) -> set[int]:
        """Pids of live processes that hold slots of, or wait on, this budget."""
        with self._locked():
            return set(self._books.live_users(_self.me()).values())

    def opened_elsewhere(self) -> bool:
        """True if another process (another open file description) has this budget open."""
        return not self._closed and _tokens.shared_by_others(self._tfd, OPENERS_AT)

    def is_creator(self) -> bool:
        return self._table.read_header().creator_owner == _self.me().owner

    def creator_alive(self) -> bool:
        """True if the process that created (or adopted) this budget still lives: its token
        is held (which holds across PID namespaces), or it is this process."""
        return self.is_creator() or _tokens.is_held(self._tfd, CREATOR_TOKEN_AT)

    def after_fork_in_child(self) -> None:
        self._pid = os.getpid()
        self._mutex.after_fork_in_child()
        if self._closed:
            return
        # the parent's tokens live on our shared open file description: get our own, or
        # this child could neither prove its own slots nor see the parent's
        if _tokens.reopen(self._tfd, tokens_path(self.name)):
            _tokens.share(self._tfd, OPENERS_AT)
        else:
            self._broken = (
                f"budget {self.name!r} cannot be used in this forked process: its token file "
                f"could not be reopened (no /proc/self/fd, and {tokens_path(self.name)} is "
                "gone or replaced)"
            )

    def close(self) -> None:
        """Drop this reference; the last one closes the fd, the mapping and the semaphore."""
        with _instances_lock:
            if self._closed:
                return
            self._refs -= 1
            if self._refs > 0:
                return
            if _instances.get(self.name) is self:
                del _instances[self.name]
            self._closed = True
        self._view.release()
        with contextlib.suppress(BufferError):
            self._mmap.close()
        with contextlib.suppress(Exception):
            self._sem.close()
        with contextlib.suppress(Exception):
            self._shm.close_fd()
        with contextlib.suppress(OSError):
            os.close(self._tfd)  # our tokens go with it

    def unlink(self, *, force: bool = False) -> None:
        """Remove the budget's shared objects (this process's mapping stays valid).

        Raises:
            BudgetInUseError: live processes other than this one hold or wait for its slots,
                or have it open (configured, attached: they may take slots at any time and
                would go on with the removed budget while a new one of the same name starts
                from zero), and not ``force``.
        """
        with self._locked():
            me = _self.me()
            users = {o: p for o, p in self._books.live_users(me).items() if o != me.owner}
            if users and not force:
                raise BudgetInUseError(
                    f"budget {self.name!r} is still used by {len(users)} live process(es): "
                    f"pids {', '.join(map(str, sorted(users.values())))}"
                )
            if not force and self.opened_elsewhere():
                raise BudgetInUseError(
                    f"budget {self.name!r} is still open in another process (it holds no "
                    "slot now, but may take one at any time); close it there first, or "
                    f"`mppools unlink {self.name} --force` once it is stopped"
                )
            remove_objects(self.name)

    def __repr__(self) -> str:
        if self._closed:
            return f"<PosixLimiter {self.name!r} closed>"
        in_use = self._table.in_use()
        return f"<PosixLimiter {self.name!r} limit={self.limit} in_use={in_use}>"


def _after_fork_in_child() -> None:
    _self.reset()
    _watcher.after_fork_in_child()


_fork.on_fork_in_child(_after_fork_in_child)


def unlink(name: str, *, force: bool = False) -> None:
    """Remove the shared objects of budget ``name``.

    Refused while live processes hold or wait for its slots, or have it open, unless
    ``force``. With ``force``, a segment that is not an mppools segment (or of another
    layout) is removed too.

    Raises:
        BudgetNotFoundError: no such budget.
        BudgetInUseError: live processes use it and not ``force``.
    """
    from mppools._errors import IncompatibleSegmentError

    from ._names import exists

    validate_name(name)
    try:
        limiter = PosixLimiter.open(name, create=False)
    except (IncompatibleSegmentError, BudgetNotFoundError):
        if not force or not exists(name):
            raise
        remove_objects(name)
        return
    try:
        limiter.unlink(force=force)
    finally:
        limiter.close()

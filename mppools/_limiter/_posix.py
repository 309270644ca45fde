"""The host-wide backend: a POSIX named semaphore plus a shared-memory slot table.

Shared objects of a budget called ``NAME``:

* ``/mppools.NAME`` (posix_ipc.SharedMemory): header, slot table and waiter table
  (see :mod:`mppools._slots`). Byte 0 is locked with ``fcntl.lockf`` as the robust mutex: the
  kernel drops the lock when its owner dies, so a process killed inside the critical section
  never deadlocks the others. fcntl locks belong to a process, so a ``threading.Lock`` orders
  the threads of one process first; and since closing ANY fd of the file drops the lock, each
  process keeps exactly one fd of the segment open.
* ``/mppools.NAME.free`` (posix_ipc.Semaphore): the number of free slots. It is only ever
  changed under the mutex, together with the slot table, so ``value == limit - in_use``
  whenever the mutex is free, and an audit can always make it exact again.

Protocol (every step under the mutex):

* acquire: ``S.acquire(0)``; if that worked, write our record (pid, start ticks, token).
  Decrement and record are one critical section, so a crash between them is repaired by
  the next settle: nothing is ever "in flight" outside the mutex.
* release: clear our record, then *settle*.
* settle: free = limit - in_use. While free > 0 and someone waits, hand a slot straight to
  the oldest live waiter (FIFO, no barging on a hand-off) and wake it. Then set ``S`` to
  ``max(free, 0)``. When in_use > limit after a forced shrink, the difference is the debt:
  releases pay it back before anything is handed on.
* audit: clear records and waiters of dead processes, then settle.

A waiter does not block inside posix_ipc: it registers a waiter record and sleeps in
``poll()`` on its own abstract-namespace datagram socket (woken by a hand-off) plus a
``pidfd`` of every holder (woken the moment a holder dies, then it audits), in slices of
``SLICE`` seconds. ``poll`` is restarted by Python after a signal and lets a signal handler's
exception (gunicorn's ``SystemExit``, celery's ``SoftTimeLimitExceeded``) propagate
unchanged; blocking in ``posix_ipc.Semaphore.acquire`` would replace it with
``posix_ipc.SignalError``. It also measures time with ``time.monotonic()``, whereas posix_ipc's
timed waits use the wall clock.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import re
import secrets
import select
import socket
import stat
import struct
import threading
import time
from typing import Any

import posix_ipc

from mppools import _fork
from mppools._errors import (
    BudgetInUseError,
    ConfigurationError,
    IncompatibleSegmentError,
    LimitExceeded,
    NotConfiguredError,
    PermissionDeniedError,
)
from mppools._limiter._base import AuditReport, BudgetStats, HolderStats, Limiter, Slot
from mppools._liveness import Identity, is_alive, self_identity
from mppools._slots import (
    ACQUIRED_AT,
    FLAGS_AT,
    HEADER_SIZE,
    LAYOUT_VERSION,
    LIMIT_AT,
    MAGIC,
    NEXT_TOKEN_AT,
    RECLAIMED_AT,
    SLOT_SIZE,
    TIMEOUTS_AT,
    WAITER_SIZE,
    Header,
    SlotRecord,
    SlotState,
    Table,
    WaiterState,
    segment_size,
)
from mppools._validate import check_limit

__all__ = [
    "DEFAULT_CAPACITY",
    "NAME_PATTERN",
    "SLICE",
    "PosixLimiter",
    "exists",
    "list_budgets",
    "unlink",
    "validate_name",
]

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,47}\Z")
DEFAULT_CAPACITY = 1024
#: seconds a waiter sleeps before it audits and re-sends its idle-yield requests
SLICE = 0.1
#: at most this many holders are watched through pidfds; the rest are audited every slice
MAX_WATCHED = 64
YIELD_REQUEST = struct.Struct("<cIQ")
_SHM_DIR = "/dev/shm"


def validate_name(name: object) -> str:
    """Return ``name`` if it is a valid budget name, else raise ConfigurationError."""
    if not isinstance(name, str):
        raise ConfigurationError(f"budget name must be a str, not {type(name).__name__}")
    if not NAME_PATTERN.match(name):
        raise ConfigurationError(
            f"invalid budget name {name!r}: use 1 to 48 characters of letters, digits, "
            "'.', '_' or '-', starting with a letter or digit"
        )
    return name


def _shm_name(name: str) -> str:
    return f"/mppools.{name}"


def _sem_name(name: str) -> str:
    return f"/mppools.{name}.free"


def _waiter_address(name: str, nonce: int) -> bytes:
    return f"\0mppools/{name}/w/{nonce:x}".encode()


def keeper_address_of(name: str, pid: int, start: int) -> bytes:
    """The abstract socket a process's keeper thread listens on for idle-yield requests."""
    return f"\0mppools/{name}/k/{pid}/{start}".encode()


def _timeout_field(value: float | None) -> float:
    return -1.0 if value is None else float(value)


def _timeout_value(field: float) -> float | None:
    return None if field < 0 else field


#: the budgets this process has open, by name (see PosixLimiter.open)
_instances: dict[str, PosixLimiter] = {}
_instances_lock = threading.RLock()


class _Mutex:
    """Context manager for the budget's mutex (a class: cheaper than a generator)."""

    __slots__ = ("_fd", "_limiter", "_tlock")

    def __init__(self, limiter: PosixLimiter) -> None:
        self._limiter = limiter
        self._tlock = limiter._tlock
        self._fd = limiter._fd

    def __enter__(self) -> None:
        self._tlock.acquire()
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, 0)
        except BaseException:
            self._tlock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            self._limiter._update_pressure_locked()
        finally:
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, 0)
            finally:
                self._tlock.release()


class PosixLimiter(Limiter):
    """One budget shared by all processes of this host that open the same name."""

    def __init__(
        self,
        name: str,
        shm: Any,
        buf: mmap.mmap,
        table: Table,
        sem: Any,
    ) -> None:
        self.name = name
        self._shm = shm
        self._fd: int = shm.fd
        self._mmap = buf
        self._table = table
        self._view = table.buf
        self._sem = sem
        self._tlock = threading.Lock()
        self._mutex = _Mutex(self)
        self._local = threading.local()
        self._closed = False
        self._refs = 1
        self._slot_map_at = table.slot_map_at
        _fork.register(self, priority=0)

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
    ) -> PosixLimiter:
        """Open (and with ``create``, create or recover) the budget ``name``.

        Raises:
            NotConfiguredError: ``create`` is false and no such budget exists.
            IncompatibleSegmentError: the segment is not an mppools segment of this layout.
            PermissionDeniedError: the segment belongs to another user.
            ConfigurationError: the budget exists with a different limit and a live creator.
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
                                    idle_timeout=idle_timeout, mode=mode)
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
    ) -> PosixLimiter:
        cap = capacity if capacity is not None else max(DEFAULT_CAPACITY, limit or 0)
        size = segment_size(cap, cap)
        created = False
        try:
            if create:
                try:
                    shm = posix_ipc.SharedMemory(
                        _shm_name(name), posix_ipc.O_CREX, mode=mode, size=size
                    )
                    created = True
                except posix_ipc.ExistentialError:
                    shm = posix_ipc.SharedMemory(_shm_name(name), 0)
            else:
                shm = posix_ipc.SharedMemory(_shm_name(name), 0)
        except posix_ipc.ExistentialError:
            raise NotConfiguredError(f"no mppools budget named {name!r} on this host") from None
        except posix_ipc.PermissionsError:
            raise PermissionDeniedError(
                f"permission denied opening budget {name!r} ({_SHM_DIR}{_shm_name(name)})"
            ) from None
        try:
            return cls._open_locked(
                name, shm, created=created, create=create, limit=limit, capacity=cap,
                acquire_timeout=acquire_timeout, idle_timeout=idle_timeout, mode=mode,
            )
        except BaseException:
            shm.close_fd()
            if created:
                # we made it and failed before it was usable: leave nothing behind
                with contextlib.suppress(posix_ipc.ExistentialError):
                    shm.unlink()
            raise

    @classmethod
    def _open_locked(
        cls,
        name: str,
        shm: Any,
        *,
        created: bool,
        create: bool,
        limit: int | None,
        capacity: int,
        acquire_timeout: float | None,
        idle_timeout: float | None,
        mode: int,
    ) -> PosixLimiter:
        st = os.fstat(shm.fd)
        if st.st_uid != os.geteuid():
            raise PermissionDeniedError(
                f"budget {name!r} belongs to uid {st.st_uid}, not to this user "
                f"(uid {os.geteuid()})"
            )
        fcntl.lockf(shm.fd, fcntl.LOCK_EX, 1, 0)
        try:
            size = os.fstat(shm.fd).st_size
            initialized = False
            if 0 < size < HEADER_SIZE:
                with open(f"{_SHM_DIR}{_shm_name(name)}", "rb") as f:
                    if f.read(size).strip(b"\0"):
                        raise IncompatibleSegmentError(
                            f"{_SHM_DIR}{_shm_name(name)} is not an mppools segment "
                            f"({size} bytes); remove it with `mppools unlink {name} --force`"
                        )
            if size >= HEADER_SIZE:
                with mmap.mmap(shm.fd, HEADER_SIZE) as head:
                    magic = bytes(head[: len(MAGIC)])
                    if magic == MAGIC:
                        initialized = True
                    elif magic.strip(b"\0"):
                        raise IncompatibleSegmentError(
                            f"{_SHM_DIR}{_shm_name(name)} is not an mppools segment "
                            f"(magic {magic!r}); remove it with `mppools unlink {name} --force`"
                        )
            if not initialized:
                if not create:
                    raise NotConfiguredError(f"budget {name!r} exists but is not initialized")
                if limit is None:
                    raise ConfigurationError("a limit is needed to create a budget")
                if size != segment_size(capacity, capacity):
                    os.ftruncate(shm.fd, segment_size(capacity, capacity))
                buf = mmap.mmap(shm.fd, segment_size(capacity, capacity))
                table = Table(memoryview(buf), capacity, capacity)
                sem = posix_ipc.Semaphore(_sem_name(name), posix_ipc.O_CREAT, mode, 0)
                self = cls(name, shm, buf, table, sem)
                self._initialize(limit, acquire_timeout, idle_timeout)
                return self
            # an existing budget: check the layout before reading anything else
            with mmap.mmap(shm.fd, HEADER_SIZE) as head:
                header = Table(memoryview(head), 0, 0).read_header()
            if header.version != LAYOUT_VERSION or header.slot_size != SLOT_SIZE or (
                header.waiter_size != WAITER_SIZE or header.header_size != HEADER_SIZE
            ):
                raise IncompatibleSegmentError(
                    f"budget {name!r} has layout version {header.version}, this mppools "
                    f"reads version {LAYOUT_VERSION}; stop its users and run "
                    f"`mppools unlink {name} --force`"
                )
            full = segment_size(header.capacity, header.waiter_capacity)
            if size < full:
                raise IncompatibleSegmentError(
                    f"budget {name!r} is truncated: {size} bytes, its header says {full}"
                )
            buf = mmap.mmap(shm.fd, full)
            table = Table(memoryview(buf), header.capacity, header.waiter_capacity)
            try:
                sem = posix_ipc.Semaphore(_sem_name(name), posix_ipc.O_CREAT, mode, 0)
            except posix_ipc.PermissionsError:
                raise PermissionDeniedError(
                    f"permission denied opening the semaphore of budget {name!r}"
                ) from None
            self = cls(name, shm, buf, table, sem)
            if create:
                self._join_or_recover(header, limit, capacity, acquire_timeout, idle_timeout)
            # attach (create=False) changes nothing: `mppools status` must be read-only
            return self
        finally:
            fcntl.lockf(shm.fd, fcntl.LOCK_UN, 1, 0)

    def _initialize(
        self, limit: int, acquire_timeout: float | None, idle_timeout: float | None
    ) -> None:
        me = self_identity()
        self._view[HEADER_SIZE:] = bytes(len(self._view) - HEADER_SIZE)
        self._table.write_header(
            Header(
                magic=MAGIC, version=LAYOUT_VERSION, header_size=HEADER_SIZE,
                slot_size=SLOT_SIZE, waiter_size=WAITER_SIZE, capacity=self._table.capacity,
                waiter_capacity=self._table.waiter_capacity, limit=limit, creator_pid=me.pid,
                flags=0, creator_start=me.start, created_at=time.time(), generation=1,
                next_token=1, reclaimed_total=0, timeouts_total=0, acquired_total=0,
                acquire_timeout=_timeout_field(acquire_timeout),
                idle_timeout=_timeout_field(idle_timeout), uid=os.geteuid(),
            )
        )
        self._settle_locked()

    def _join_or_recover(
        self,
        header: Header,
        limit: int | None,
        capacity: int,
        acquire_timeout: float | None,
        idle_timeout: float | None,
    ) -> None:
        me = self_identity()
        creator_alive = (header.creator_pid, header.creator_start) == tuple(me) or is_alive(
            header.creator_pid, header.creator_start
        )
        if creator_alive:
            if limit is not None and limit != header.limit:
                raise ConfigurationError(
                    f"budget {self.name!r} already exists with limit {header.limit} "
                    f"(created by live pid {header.creator_pid}); asked for limit {limit}: "
                    "use set_limit() to change it, or another name"
                )
            self._settle_locked()
            return
        # leftovers of a creator that died without cleaning up (SIGKILLed master)
        self._audit_locked()
        users = self._live_users_locked()
        if limit is None:
            limit = header.limit
        if limit > header.capacity:
            raise ConfigurationError(
                f"budget {self.name!r} was left with capacity {header.capacity}, "
                f"too small for limit {limit}; run `mppools unlink {self.name} --force`"
            )
        if not users:
            self._initialize(limit, acquire_timeout, idle_timeout)
            return
        # orphaned workers of the dead master still hold slots: adopt the budget in place
        # (unlinking now would split it in two)
        header.creator_pid, header.creator_start = me
        header.limit = limit
        header.acquire_timeout = _timeout_field(acquire_timeout)
        header.idle_timeout = _timeout_field(idle_timeout)
        header.generation += 1
        self._table.write_header(header)
        self._settle_locked()

    # the mutex -----------------------------------------------------------------------------
    def _locked(self) -> _Mutex:
        """The budget's mutex: this process's threads first, then the fcntl record lock."""
        if self._closed:
            raise RuntimeError(f"budget {self.name!r} was closed in this process")
        return self._mutex

    def _update_pressure_locked(self) -> None:
        """Publish one flag a releasing process can read without the lock: someone waits, or
        the budget is over its limit (after a forced shrink). Pools then close a connection
        they would have kept idle, and give its slot back at once."""
        table = self._table
        pressure = 1 if table.waiting() or table.in_use() > table.limit else 0
        if self._view[FLAGS_AT] != pressure:
            self._view[FLAGS_AT] = pressure

    def under_pressure(self) -> bool:
        """True if a slot given back now would be used at once (a memory read, no lock)."""
        return not self._closed and self._view[FLAGS_AT] != 0

    # header fields ---------------------------------------------------------------------------
    @property
    def limit(self) -> int:
        return int(struct.unpack_from("<I", self._view, LIMIT_AT)[0])

    @property
    def acquire_timeout(self) -> float | None:
        return _timeout_value(self._table.read_header().acquire_timeout)

    @property
    def idle_timeout(self) -> float | None:
        return _timeout_value(self._table.read_header().idle_timeout)

    def _next_token_locked(self) -> int:
        return self._table.bump(NEXT_TOKEN_AT)

    # core steps (mutex held) ---------------------------------------------------------------
    def _settle_locked(self) -> list[bytes]:
        """Hand free slots to waiters (oldest first), then make the semaphore exact."""
        table = self._table
        free = table.limit - table.in_use()
        wakes: list[bytes] = []
        if free > 0 and table.waiting():
            now = time.time()
            while free > 0:
                oldest = table.oldest_waiting()
                if oldest < 0:
                    break
                w = table.read_waiter(oldest)
                if not is_alive(w.pid, w.start):
                    table.clear_waiter(w.index)
                    continue
                index = table.free_slot_index()
                token = table.bump(NEXT_TOKEN_AT)
                table.bump(ACQUIRED_AT)
                table.write_slot(index, SlotState.BUSY, w.pid, w.start, token, now)
                table.write_waiter(
                    w.index, WaiterState.GRANTED, w.pid, w.start, w.nonce, w.ticket, index, token
                )
                wakes.append(_waiter_address(self.name, w.nonce))
                free -= 1
        self._set_semaphore_locked(max(free, 0))
        return wakes

    def _set_semaphore_locked(self, target: int) -> int:
        value = int(self._sem.value)
        delta = target - value
        while value < target:
            self._sem.release()
            value += 1
        while value > target:
            try:
                self._sem.acquire(0)
            except posix_ipc.BusyError:  # pragma: no cover - only we change it, under the mutex
                break
            value -= 1
        return delta

    def _try_take_locked(self, me: Identity) -> Slot | None:
        table = self._table
        try:
            self._sem.acquire(0)
        except posix_ipc.BusyError:
            return None
        try:
            states = table.slot_states()
            if table.capacity - states.count(0) >= table.limit:
                # the semaphore disagreed with the table (a crash inside a critical section):
                # the table is the truth
                self._settle_locked()
                return None
            index = states.find(0)
            token = table.bump(NEXT_TOKEN_AT)
            now = time.time()
            table.write_slot(index, SlotState.BUSY, me.pid, me.start, token, now)
            table.bump(ACQUIRED_AT)
        except BaseException:
            self._settle_locked()
            raise
        return Slot(index, token, me.pid, _fork.current_epoch(), now)

    def _audit_locked(self) -> tuple[AuditReport, list[bytes]]:
        table = self._table
        me = self_identity()
        alive: dict[tuple[int, int], bool] = {tuple(me): True}  # type: ignore[dict-item]
        reclaimed: list[tuple[int, int]] = []
        dropped: list[int] = []

        def check(pid: int, start: int) -> bool:
            key = (pid, start)
            if key not in alive:
                alive[key] = is_alive(pid, start)
            return alive[key]

        for rec in table.used_slots():
            if not check(rec.pid, rec.start):
                table.clear_slot(rec.index)
                reclaimed.append((rec.pid, rec.index))
        for w in table.used_waiters():
            if not check(w.pid, w.start):
                table.clear_waiter(w.index)
                dropped.append(w.pid)
        if reclaimed:
            table.bump(RECLAIMED_AT, len(reclaimed))
        expected = max(table.limit - table.in_use(), 0)
        correction = expected - int(self._sem.value)
        wakes = self._settle_locked()
        # units handed to waiters are not a correction of the semaphore
        if wakes:
            correction = 0 if correction == len(wakes) else correction
        return AuditReport(tuple(reclaimed), tuple(dropped), correction), wakes

    def _live_users_locked(self) -> set[int]:
        users = {r.pid for r in self._table.used_slots() if is_alive(r.pid, r.start)}
        users |= {w.pid for w in self._table.used_waiters() if is_alive(w.pid, w.start)}
        return users

    # public API ------------------------------------------------------------------------------
    def acquire(self, *, block: bool = True, timeout: float | None = None) -> Slot:
        if timeout is None:
            timeout = self.acquire_timeout
        elif timeout < 0:
            raise ConfigurationError(f"timeout must be >= 0 or None, not {timeout}")
        me = self_identity()
        started = time.monotonic()
        with self._locked():
            slot = self._try_take_locked(me)
        if slot is not None:
            return slot
        if not block:
            raise self._exceeded(started, block=False)
        deadline = None if timeout is None else started + timeout
        return self._wait(me, started, deadline)

    def _wait(self, me: Identity, started: float, deadline: float | None) -> Slot:
        nonce, sock = self._waiter_socket(me)
        windex = -1
        watched: dict[tuple[int, int], int] = {}
        try:
            audit = False
            while True:
                wakes: list[bytes] = []
                with self._locked():
                    if audit:
                        wakes = self._audit_locked()[1]
                    if windex >= 0:
                        granted = self._take_grant_locked(windex, nonce, me)
                        if granted is not None:
                            windex = -1
                            return granted
                    slot = self._try_take_locked(me)
                    if slot is not None:
                        if windex >= 0:
                            self._table.clear_waiter(windex)
                            windex = -1
                        return slot
                    if windex < 0:
                        windex = self._table.free_waiter_index()
                        if windex >= 0:
                            ticket = self._next_token_locked()
                            self._table.write_waiter(
                                windex, WaiterState.WAITING, me.pid, me.start, nonce, ticket
                            )
                    holders = self._table.used_slots()
                    waiting = self._table.waiting()
                self._notify(wakes)
                self._request_yields(holders, max(waiting, 1))
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                wait_for = SLICE if deadline is None else min(SLICE, deadline - now)
                audit = not self._sleep(sock, holders, me, wait_for, watched)
            # out of time: a hand-off may still have raced in
            with self._locked():
                if windex >= 0:
                    granted = self._take_grant_locked(windex, nonce, me)
                    if granted is None:
                        self._table.clear_waiter(windex)
                    windex = -1
                    if granted is not None:
                        return granted
                self._table.bump(TIMEOUTS_AT)
            raise self._exceeded(started, block=True)
        finally:
            if windex >= 0:
                # leaving by an exception (a signal handler's, say): give back anything
                # handed to us meanwhile and drop our waiter record
                self._abandon_wait(windex, nonce, me)
            for fd in watched.values():
                os.close(fd)

    def _waiter_socket(self, me: Identity) -> tuple[int, socket.socket]:
        """This thread's wake-up socket for this budget (bound once, reused by every wait;
        a forked child binds its own)."""
        cached: tuple[int, int, socket.socket] | None = getattr(self._local, "waiter", None)
        if cached is not None and cached[0] == me.pid:
            _, nonce, sock = cached
            with contextlib.suppress(BlockingIOError):
                while True:  # a hand-off datagram that arrived after the last wait ended
                    sock.recv(64)
            return nonce, sock
        nonce = secrets.randbits(63) or 1
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(_waiter_address(self.name, nonce))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        # the thread-local holds it; it closes with the thread (or the process)
        self._local.waiter = (me.pid, nonce, sock)
        return nonce, sock

    def _take_grant_locked(self, windex: int, nonce: int, me: Identity) -> Slot | None:
        """If our waiter record was granted a slot, turn it into a Slot (else None)."""
        w = self._table.read_waiter(windex)
        if w.nonce != nonce or w.pid != me.pid:
            return None
        if w.state != WaiterState.GRANTED:
            return None
        self._table.clear_waiter(windex)
        rec = self._table.read_slot(w.granted_index)
        return Slot(w.granted_index, w.granted_token, me.pid, _fork.current_epoch(), rec.since)

    def _abandon_wait(self, windex: int, nonce: int, me: Identity) -> None:
        wakes: list[bytes] = []
        with self._locked():
            w = self._table.read_waiter(windex)
            if w.nonce == nonce and w.pid == me.pid:
                self._table.clear_waiter(windex)
                if w.state == WaiterState.GRANTED:
                    rec = self._table.read_slot(w.granted_index)
                    if rec.token == w.granted_token and rec.pid == me.pid:
                        self._table.clear_slot(w.granted_index)
                        wakes = self._settle_locked()
        self._notify(wakes)

    def _sleep(self, sock: socket.socket, holders: list[SlotRecord], me: Identity,
               wait_for: float, watched: dict[tuple[int, int], int]) -> bool:
        """Sleep until woken (True) or until a holder dies or the slice ends (False).

        ``watched`` maps holder identities to their open pidfds; it lives as long as the
        wait, so each holder costs one ``pidfd_open`` and one identity check per wait, not
        per wake-up.
        """
        current = {(r.pid, r.start) for r in holders if r.pid != me.pid}
        for ident in [k for k in watched if k not in current]:
            os.close(watched.pop(ident))
        for pid, start in current:
            if (pid, start) in watched:
                continue
            if len(watched) >= MAX_WATCHED:
                break  # the rest are covered by the audit at the end of the slice
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                return False  # already gone: audit now
            watched[(pid, start)] = fd
            if not is_alive(pid, start):  # the pid was reused: the holder is dead
                return False
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        for fd in watched.values():
            poller.register(fd, select.POLLIN)
        events = poller.poll(max(wait_for, 0.0) * 1000.0)
        woken = False
        died = False
        for fd, _ in events:
            if fd == sock.fileno():
                woken = True
            else:
                died = True
        with contextlib.suppress(BlockingIOError):
            while True:
                sock.recv(64)
        return woken and not died

    def _notify(self, addresses: list[bytes]) -> None:
        if not addresses:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            for address in addresses:
                # the waiter may have just left or died: the audit covers it
                with contextlib.suppress(OSError):
                    s.sendto(b"g", address)

    def _request_yields(self, holders: list[SlotRecord], wanted: int) -> None:
        idle = sorted((r for r in holders if r.state == SlotState.IDLE), key=lambda r: r.since)
        if not idle:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            for rec in idle[:wanted]:
                with contextlib.suppress(OSError):
                    s.sendto(
                        YIELD_REQUEST.pack(b"y", rec.index, rec.token),
                        keeper_address_of(self.name, rec.pid, rec.start),
                    )

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
        wakes: list[bytes] = []
        with self._locked():
            rec = self._table.read_slot(slot.index)
            if rec.pid != slot.pid or rec.token != slot.token:
                return  # already given back or reclaimed
            self._table.clear_slot(slot.index)
            wakes = self._settle_locked()
        self._notify(wakes)

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
        rec = self._table.read_slot(slot.index)
        return rec.pid == slot.pid and rec.token == slot.token

    def audit(self) -> AuditReport:
        with self._locked():
            report, wakes = self._audit_locked()
        self._notify(wakes)
        return report

    def resize(self, limit: int, *, force: bool = False) -> None:
        check_limit(limit)
        wakes: list[bytes] = []
        excess: list[SlotRecord] = []
        with self._locked():
            header = self._table.read_header()
            if limit > header.capacity:
                raise ConfigurationError(
                    f"limit {limit} is above the capacity {header.capacity} of budget "
                    f"{self.name!r}; configure it with a larger capacity"
                )
            self._audit_locked()
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
            wakes = self._settle_locked()
            if in_use > limit:
                excess = self._table.used_slots()
        self._notify(wakes)
        if excess:
            self._request_yields(excess, in_use - limit)

    def stats(self) -> BudgetStats:
        with self._locked():
            header = self._table.read_header()
            slots = self._table.used_slots()
            waiters = [w for w in self._table.used_waiters() if w.state == WaiterState.WAITING]
            sem_value = int(self._sem.value)
        holders: dict[tuple[int, int], list[SlotRecord]] = {}
        for rec in slots:
            holders.setdefault((rec.pid, rec.start), []).append(rec)
        holder_stats = tuple(
            HolderStats(
                pid=pid,
                slots=len(recs),
                idle=sum(1 for r in recs if r.state == SlotState.IDLE),
                busy=sum(1 for r in recs if r.state == SlotState.BUSY),
                since=min(r.since for r in recs),
                alive=is_alive(pid, start),
            )
            for (pid, start), recs in sorted(holders.items())
        )
        in_use = len(slots)
        return BudgetStats(
            name=self.name,
            limit=header.limit,
            in_use=in_use,
            free=max(header.limit - in_use, 0),
            waiting=len(waiters),
            debt=max(in_use - header.limit, 0),
            capacity=header.capacity,
            holders=holder_stats,
            waiter_pids=tuple(sorted(w.pid for w in waiters)),
            creator_pid=header.creator_pid,
            created_at=header.created_at,
            acquired_total=header.acquired_total,
            reclaimed_total=header.reclaimed_total,
            timeouts_total=header.timeouts_total,
            acquire_timeout=_timeout_value(header.acquire_timeout),
            idle_timeout=_timeout_value(header.idle_timeout),
            backend="posix",
            extra={"semaphore": sem_value, "generation": header.generation,
                   "segment_bytes": len(self._view)},
        )

    def keeper_address(self) -> bytes:
        me = self_identity()
        return keeper_address_of(self.name, me.pid, me.start)

    def live_users(self) -> set[int]:
        """Pids of live processes that hold slots of, or wait on, this budget."""
        with self._locked():
            return self._live_users_locked()

    def is_creator(self) -> bool:
        header = self._table.read_header()
        return (header.creator_pid, header.creator_start) == tuple(self_identity())

    def _after_fork_in_child(self) -> None:
        # a thread of the parent may have held it at fork time
        self._tlock = threading.Lock()
        self._mutex = _Mutex(self)
        # the parent's waiter sockets are the parent's: drop our fd copies
        cached = getattr(self._local, "waiter", None)
        if cached is not None:
            cached[2].close()
        self._local = threading.local()

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

    def unlink(self, *, force: bool = False) -> None:
        """Remove the budget's shared objects (this process's mapping stays valid).

        Raises:
            BudgetInUseError: live processes other than this one use it, and not ``force``.
        """
        me = os.getpid()
        with self._locked():
            users = self._live_users_locked() - {me}
            if users and not force:
                raise BudgetInUseError(
                    f"budget {self.name!r} is still used by {len(users)} live process(es): "
                    f"pids {', '.join(map(str, sorted(users)))}"
                )
            with contextlib.suppress(posix_ipc.ExistentialError):
                posix_ipc.unlink_shared_memory(_shm_name(self.name))
            with contextlib.suppress(posix_ipc.ExistentialError):
                posix_ipc.unlink_semaphore(_sem_name(self.name))

    def __repr__(self) -> str:
        if self._closed:
            return f"<PosixLimiter {self.name!r} closed>"
        in_use = self._table.in_use()
        return f"<PosixLimiter {self.name!r} limit={self.limit} in_use={in_use}>"


def exists(name: str) -> bool:
    """True if a budget (segment) of that name exists on this host."""
    validate_name(name)
    return os.path.exists(f"{_SHM_DIR}{_shm_name(name)}")


def list_budgets() -> list[str]:
    """Names of the mppools budgets whose segments exist in /dev/shm."""
    try:
        entries = os.listdir(_SHM_DIR)
    except OSError:
        return []
    names = []
    for entry in entries:
        if entry.startswith("mppools.") and not entry.startswith("sem."):
            name = entry[len("mppools."):]
            try:
                regular = stat.S_ISREG(os.stat(os.path.join(_SHM_DIR, entry)).st_mode)
            except FileNotFoundError:  # removed since listdir()
                continue
            if NAME_PATTERN.match(name) and regular:
                names.append(name)
    return sorted(names)


def unlink(name: str, *, force: bool = False) -> None:
    """Remove the shared objects of budget ``name``.

    Refused while live processes hold or wait for its slots, unless ``force``. With
    ``force``, a segment that is not an mppools segment (or of another layout) is removed too.

    Raises:
        NotConfiguredError: no such budget.
        BudgetInUseError: live processes use it and not ``force``.
    """
    validate_name(name)
    try:
        limiter = PosixLimiter.open(name, create=False)
    except (IncompatibleSegmentError, NotConfiguredError) as exc:
        if not force or not exists(name):
            raise
        del exc
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_shared_memory(_shm_name(name))
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_semaphore(_sem_name(name))
        return
    try:
        limiter.unlink(force=force)
    finally:
        limiter.close()



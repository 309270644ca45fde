"""The per-process keeper: gives idle pooled connections back to the shared budget.

A process that holds a slot for an idle connection may be blocked for a long time (a gunicorn
sync worker in ``accept()``) and never call mppools again. Its keeper thread, started the
first time the process takes a slot, listens on a datagram socket the backend names (for the
POSIX backend, a path in the budget's owner-only directory, reachable from every network
namespace that shares it; a backend with no address gets an unbound socket that only times
the idle sweep). A waiter in any process sends it a yield request
``(slot index, token)`` (:mod:`mppools._yield`); it is honoured only from a sender of our
own uid (``SO_PASSCRED``) and only while someone really waits. The keeper takes that
connection out of its local pool (only if it is still idle there, decided under the pool's
queue mutex), puts a fresh lazy placeholder in its place so the pool keeps its size, and
closes the connection outside the mutex, which gives the slot back. The keeper also closes
connections idle for longer than the budget's ``idle_timeout``.

A connection in active use keeps its slot for its hold quantum: a request that arrives
between two uses is looked at again once the connection has been idle for a grace (the
budget's hand-over cost, 2 to 50 ms: :func:`idle_grace`) or its quantum has run.

A host of the cross-host backend that lost its leases (fenced) also sends *sever* requests
for the busy slots beyond its limit: SEVER_GRACE later, if the budget is still in debt, the
keeper hands the connection on if it is idle by then, or cuts its sockets if it is still in
use (``LimitedConnection._mppools_sever``).

In a forked child the keeper thread does not exist; the child's keeper starts afresh, on its
own address, the first time the child takes a slot.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
import time
import weakref
from typing import TYPE_CHECKING

from mppools import _fork, _green, _yield
from mppools._limiter._base import Offer

if TYPE_CHECKING:
    from mppools.pools import LimitedConnection

__all__ = ["Keeper", "keeper"]

logger = logging.getLogger("mppools")

#: how long a pooled connection must have sat unused before a yield request closes it
#: while its hold quantum runs (a busy loop's gaps between uses are microseconds)
IDLE_GRACE = 0.002
#: ... but a connection used more often than a hand-over costs is worth keeping: the grace
#: grows to the budget's hand-over cost (what a waiter would pay to reconnect), up to this
MAX_IDLE_GRACE = 0.05
#: how long a connection in use may finish what it does (a publish) after a sever request
#: before its sockets are cut (seconds; well inside the cross-host fencing margin)
SEVER_GRACE = 0.05
#: a look due this soon (seconds) is not moved earlier: the keeper is not woken for it
MIN_LOOK = 0.001
#: a connection its own process uses in a tight loop is looked at less often while that
#: loop runs: each look found it in use doubles the interval to the next, from the grace up
#: to this (seconds). Every look takes the GIL from the busy thread, and each costs that
#: thread far more than the look itself (docs/performance.md, "The keeper's looks at a
#: tight loop"); a loop that stops while someone waits is handed on this much later at most
MAX_TIGHT_LOOK = 0.05


def idle_grace() -> float:
    """How long a recently used connection must sit unused before it is handed on inside its
    hold quantum: the budget's hand-over cost, between IDLE_GRACE and MAX_IDLE_GRACE. A
    request-shaped load whose gaps are shorter than a hand-over keeps its connections."""
    from mppools import _config

    limiter = _config.current()
    cost = limiter.handover_cost() if limiter is not None else 0.0
    return min(max(IDLE_GRACE, cost), max(MAX_IDLE_GRACE, IDLE_GRACE))
_CREDS = struct.Struct("iII")  # struct ucred: pid, uid, gid
_CREDS_SPACE = socket.CMSG_SPACE(_CREDS.size)


def _sender_trusted(ancdata: list[tuple[int, int, bytes]]) -> bool:
    """True if the datagram came from a process of our own uid (or root)."""
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            _, uid, _ = _CREDS.unpack(data[: _CREDS.size])
            return uid in (os.geteuid(), 0)
    return False


def _someone_waits() -> bool:
    """A yield request is honoured only while somebody really waits for a slot."""
    from mppools import _config

    limiter = _config.current()
    return limiter is not None and limiter.waiting_flag()


def _offer(conn: LimitedConnection) -> Offer:
    """Lending: offer ``conn``, idle while someone waits, to the head of the queue (see
    ``Lender.offer``); HAND_OVER when lending is off or its transport does not lend."""
    from mppools import _config, _lending

    if not (_config.lending() and _lending.lendable(conn._pool)):
        return Offer.HAND_OVER
    return _lending.lender().offer(conn)


def _lend_from(conn: LimitedConnection) -> float | None:
    """When ``conn`` may be lent (``Lender.lend_from``); None if never now (lending off, its
    transport does not lend, it is not idle or in a tight loop)."""
    from mppools import _config, _lending

    if not (_config.lending() and _lending.lendable(conn._pool)):
        return None
    return _lending.lender().lend_from(conn)


class Keeper:
    """Tracks this process's slot-holding connections and yields idle ones on request."""

    def __init__(self) -> None:
        # green once gevent/eventlet patched, even when made before (issue 8): a greenlet
        # that yields while holding a real lock would block every greenlet of its thread
        self._lock = _green.Lock()
        self._held: dict[int, weakref.ref[LimitedConnection]] = {}
        #: yield requests to look at again when their connection may yield (keeper thread)
        self._deferred: dict[int, float] = {}
        #: for a tight loop's connection found in use: the interval to its next look
        self._backoff: dict[int, float] = {}
        #: sever requests, due at (keeper thread)
        self._severs: dict[int, float] = {}
        self.severed = 0
        self._poker: socket.socket | None = None  # wakes our own thread (look_again)
        self._sock: socket.socket | None = None
        self._waker: socket.socket | None = None  # the other end of an unbound keeper's pair
        self._thread: threading.Thread | None = None
        #: every thread started here that may still run (a stopped one ends on its own)
        self._threads: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
        self._starting = False  # one caller is starting the thread (outside the lock)
        self._address: str | bytes | None = None
        self.yielded = 0
        self.expired = 0

    # bookkeeping ---------------------------------------------------------------------------
    def track(self, token: int, conn: LimitedConnection, address: str | bytes | None) -> None:
        """Remember that ``conn`` holds the slot ``token``; start the thread if needed."""
        with self._lock:
            self._held[token] = weakref.ref(conn)
            if self._starting or (self._thread is not None and self._address == address) or (
                    _fork.threadless()):
                return
            self._starting = True
        try:
            thread = self._prepare(address)
            if thread is not None:
                # outside the lock: Thread.start() waits for the thread, which switches
                # greenlets under gevent/eventlet
                thread.start()
        finally:
            with self._lock:
                self._starting = False

    def look_again(self, token: int, conn: LimitedConnection | None = None, *,
                   tight: bool = False) -> None:
        """The connection holding ``token`` (``conn``) went idle while someone waits, inside
        its hold quantum or not lendable yet: look at it again when it may be lent
        (:func:`_lend_from`) or, at the latest, a grace (:func:`idle_grace`) from now, and
        lend it or hand it on if it is still idle then (no waiter has to ask). For a
        connection its own process uses in a tight loop (``tight``), a look already
        scheduled is not moved earlier (see MAX_TIGHT_LOOK).
        Called by the pools and the lending thread from any thread; one wake-up of the
        keeper per look."""
        if self._sock is None:
            return
        current = self._deferred.get(token)
        if tight and current is not None:
            return  # looked at soon enough: the keeper backs off while the loop runs
        now = time.monotonic()
        if current is not None and current <= now + MIN_LOOK:
            return  # looked at soon anyway
        due = now + idle_grace()
        lend_at = _lend_from(conn) if conn is not None else None
        if lend_at is not None:
            due = min(due, max(lend_at, now))
        if current is not None and current <= due:
            return
        self._deferred[token] = due
        sock = self._sock
        try:
            if self._poker is None:
                self._poker = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._poker.setblocking(False)
            self._poker.sendto(b"w", sock.getsockname())  # a turn of its loop, not a request
        except OSError:  # stopped meanwhile: the waiter's own requests still come
            self._deferred.pop(token, None)

    def untrack(self, token: int) -> None:
        with self._lock:
            self._held.pop(token, None)
        self._backoff.pop(token, None)

    def held(self) -> list[LimitedConnection]:
        with self._lock:
            refs = list(self._held.values())
        return [c for c in (r() for r in refs) if c is not None]

    # the thread ----------------------------------------------------------------------------
    def _prepare(self, address: str | bytes | None) -> threading.Thread | None:
        """Bind the socket (to ``address``; None: unbound, the thread only sweeps idle
        connections) and make (not start) the thread; None if the bind failed."""
        with self._lock:
            self._stop_locked()
            waker: socket.socket | None = None
            if address is None:  # no address to be woken at: a connected pair
                sock, waker = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            else:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                # the sender's credentials come with every datagram: only our own uid counts
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
                if isinstance(address, str):
                    # our own path (it names this process image): a leftover of a stopped
                    # keeper of ours
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(address)
                if address is not None:
                    sock.bind(address)
            except OSError:
                # another object of this process already serves that address (should not
                # happen): idle yield is then off for this process, the limit still holds
                logger.warning("mppools: keeper could not bind its socket", exc_info=True)
                sock.close()
                if waker is not None:
                    waker.close()
                return None
            self._sock, self._address, self._waker = sock, address, waker
            thread = threading.Thread(target=self._run, args=(sock,), name="mppools-keeper",
                                      daemon=True)
            self._thread = thread
            self._threads.add(thread)
            return thread

    def _stop_locked(self) -> None:
        sock, self._sock = self._sock, None
        thread, self._thread = self._thread, None
        address, self._address = self._address, None
        waker, self._waker = self._waker, None
        if sock is not None:
            # a datagram wakes the thread (a shutdown does not wake a recvmsg on a datagram
            # socket), which then sees the socket is no longer its own and closes it. Not
            # closed here while the thread runs: its fd number could be reused by a new
            # socket that the old thread, not yet in recvmsg, would then read from
            with contextlib.suppress(OSError):
                if waker is not None:
                    waker.send(b"w")
                else:
                    if self._poker is None:
                        self._poker = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                        self._poker.setblocking(False)
                    self._poker.sendto(b"w", sock.getsockname())
            if thread is None or thread.ident is None or not thread.is_alive():
                sock.close()
        if waker is not None:
            waker.close()
        if isinstance(address, str):
            with contextlib.suppress(OSError):
                os.unlink(address)

    def stop(self) -> None:
        """Stop the thread (used by ``mppools.close()``)."""
        with self._lock:
            self._stop_locked()
            self._held.clear()
        self._backoff.clear()

    def go_threadless(self, timeout: float = 2.0) -> None:
        """For :func:`mppools._fork.forbid_threads`: give back the slot of every idle
        connection (nobody would yield it any more), stop the thread and wait up to
        ``timeout`` seconds for it to end."""
        with self._lock:
            self._stop_locked()
            threads = list(self._threads)
        for conn in self.held():
            if conn._mppools_take_if_idle():
                conn._mppools_close_taken()
        deadline = time.monotonic() + timeout
        for thread in threads:
            if thread is not threading.current_thread() and thread.ident is not None:
                thread.join(max(deadline - time.monotonic(), 0.0))

    def _run(self, sock: socket.socket) -> None:
        try:
            self._serve(sock)
        finally:
            sock.close()  # stopped (see _stop_locked), or failed

    def _serve(self, sock: socket.socket) -> None:
        sweep_at = time.monotonic() + self._next_sweep_in()
        while self._sock is sock:
            now = time.monotonic()
            due = min([sweep_at, *list(self._deferred.values()), *list(self._severs.values())])
            try:
                # never 0: settimeout(0) would make the socket non-blocking
                sock.settimeout(max(due - now, 0.0005))
                data, ancdata, _, _ = _green.recvmsg(sock, 64, _CREDS_SPACE)
            except (TimeoutError, BlockingIOError):
                data = b""
            except OSError:
                return  # closed (after a fork, or by a stop before the thread ran)
            else:
                if self._sock is not sock:
                    return  # stopped (the stop's wake-up, or any datagram after it)
                request = _yield.decode(data)
                if request is not None and _sender_trusted(ancdata):
                    kind, token = request
                    if kind == _yield.SEVER:
                        self._severs.setdefault(token, time.monotonic() + SEVER_GRACE)
                    elif _someone_waits():
                        self._yield_token(token)
            now = time.monotonic()
            if now >= sweep_at:
                self._sweep_idle()
                sweep_at = now + self._next_sweep_in()
            # list(): pools' threads add entries meanwhile (look_again)
            for deferred in [t for t, at in list(self._deferred.items()) if at <= now]:
                self._deferred.pop(deferred, None)
                if _someone_waits():
                    self._yield_token(deferred)
            for token in [t for t, at in list(self._severs.items()) if at <= now]:
                self._severs.pop(token, None)
                self._sever_token(token)

    @staticmethod
    def _idle_timeout() -> float | None:
        from mppools import _config

        limiter = _config.current()
        return limiter.idle_timeout if limiter is not None else None

    def _next_sweep_in(self) -> float:
        timeout = self._idle_timeout()
        if not timeout:
            return 60.0
        return float(max(min(timeout / 4, 60.0), 0.05))

    # yielding ------------------------------------------------------------------------------
    def _yield_token(self, token: int) -> None:
        with self._lock:
            ref = self._held.get(token)
        conn = ref() if ref is not None else None
        if conn is None:
            return
        now = time.monotonic()
        since = conn._mppools_idle_since
        # a connection between two uses of a busy loop is not idle: it keeps its slot for
        # its hold quantum; one idle for the grace (or past its quantum) is handed on now.
        # A loan is no hand-over (the slot stays, nothing reconnects): a connection is
        # offered as soon as it may be lent (its own process's use allows it)
        hand_at = min(conn._mppools_hand_on_at,
                      (since if since is not None else now) + idle_grace())
        hand_due = now >= hand_at or conn._mppools_turn_done(now)
        lend_at = _lend_from(conn) if since is not None else None
        if not hand_due and (lend_at is None or now < lend_at):
            due = hand_at if lend_at is None else min(hand_at, lend_at)
            if conn._mppools_tight():
                # in use (or used within the grace) in a tight loop: it comes back in
                # microseconds, and its own releases hand it on at its turn's end; look
                # again later each time this is so
                interval = min(self._backoff.get(token, idle_grace() / 2) * 2, MAX_TIGHT_LOOK)
                self._backoff[token] = interval
                due = max(due, now + interval)
            self._deferred[token] = due
            return
        self._backoff.pop(token, None)
        if since is not None:
            outcome = _offer(conn)
            if outcome is Offer.MADE:
                return  # kept for the head of the queue: no hand-over
            if outcome is Offer.NOT_NEEDED:
                # every waiter has an offer out (look again in a grace), or it is to sit
                # idle a moment before it is lent (look again then)
                due = now + idle_grace()
                if lend_at is not None and lend_at > now:
                    due = min(due, lend_at)
                self._deferred[token] = due
                return
            if not hand_due:  # not to be lent (the head of the queue cannot borrow it)
                self._deferred[token] = hand_at
                return
        if conn._mppools_take_if_idle():
            self.yielded += 1
            limiter = conn._mppools_limiter
            conn._mppools_close_taken()
            if limiter is not None:
                with contextlib.suppress(Exception):  # counting never breaks a yield
                    limiter.note_yield()

    def _sever_token(self, token: int) -> None:
        """A sever request is due: if the budget is still in debt (its leases were lost), an
        idle connection holding ``token`` is handed on, a busy one has its sockets cut (the
        holder's next I/O fails; the slot goes back at its release)."""
        from mppools import _config

        limiter = _config.current()
        if limiter is None or not limiter.in_debt():
            return
        with self._lock:
            ref = self._held.get(token)
        conn = ref() if ref is not None else None
        if conn is None:
            return
        if conn._mppools_take_if_idle():
            self.yielded += 1
            conn._mppools_close_taken()
            return
        if conn._mppools_sever():
            self.severed += 1
            logger.warning("mppools: budget %r: cut the sockets of a connection in use (its "
                           "lease could not be renewed; it is given back at its release)",
                           limiter.name)

    def _sweep_idle(self) -> None:
        timeout = self._idle_timeout()
        if not timeout:
            return
        now = time.monotonic()
        for conn in self.held():
            since = conn._mppools_idle_since
            if since is not None and now - since >= timeout and conn._mppools_take_if_idle():
                self.expired += 1
                conn._mppools_close_taken()

    def _after_fork_in_child(self) -> None:
        # the parent's thread does not exist here; our copy of its socket is only an fd
        self._lock._reset()
        sock, self._sock, self._thread, self._address = self._sock, None, None, None
        self._held = {}
        self._deferred = {}
        self._backoff = {}
        self._severs = {}
        poker, self._poker = self._poker, None
        if poker is not None:
            poker.close()
        waker, self._waker = self._waker, None
        if waker is not None:
            waker.close()
        self._threads = weakref.WeakSet()
        self._starting = False
        if sock is not None:
            sock.close()  # closes this process's fd copy only; the parent keeps its socket


_keeper = Keeper()
_fork.register(_keeper, priority=2)


def keeper() -> Keeper:
    """This process's keeper."""
    return _keeper

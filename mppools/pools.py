"""kombu.pools, with one budget of connections shared by every forked process.

This module mirrors :mod:`kombu.pools` name for name: change ``from kombu import pools`` to
``from mppools import pools`` (or ``kombu.pools.producers`` to ``mppools.producers``) and the
code keeps working. Unconfigured, it behaves like kombu.pools: per-process pools with a
per-pool limit. After :func:`mppools.configure`, every pooled connection also holds one slot
of the shared budget for as long as it is open, idle in its pool included, taken before the
transport connects and given back after it is closed.

What differs from kombu.pools, on purpose:

* ``acquire(block=True, timeout=t)`` bounds the wait for the shared slot too; a producer
  pool's ``timeout`` also bounds getting its connection (kombu waits forever there). The
  deadline is passed along explicitly, never kept in a thread-local, so greenlets of one
  thread (gevent, eventlet) each keep their own. Timeouts are validated: None or a finite
  number of seconds up to 1,000,000; anything else raises ``ConfigurationError``.
* One connection never has two holders: releasing a connection that is not out is a no-op,
  and a producer forgets its connection when it is released (kombu's ``Resource.acquire``
  re-releases a failed producer's previous connection, which may be another thread's by then).
* The after-fork cleanup runs after *every* fork (``os.register_at_fork``), not only for
  multiprocessing children, and never closes an inherited connection by protocol.
* ``set_limit(limit, force, reset_after, ignore_errors)`` honours all its arguments.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import time
import weakref
from collections.abc import Iterator
from itertools import chain
from queue import Empty, LifoQueue
from typing import Any

from kombu import pools as _kombu_pools
from kombu.connection import ConnectionPool, PooledConnection
from kombu.messaging import Producer
from kombu.resource import Resource
from kombu.utils.collections import EqualityDict
from kombu.utils.functional import lazy

from mppools import _config, _fork, _lending
from mppools._errors import ConfigurationError
from mppools._keeper import keeper
from mppools._limiter._base import (
    PRESSURE_DEBT,
    STATE_BUSY,
    STATE_IDLE,
    Limiter,
    Offer,
    Slot,
    WaitHook,
)
from mppools._transports import transport_for
from mppools._validate import check_limit, check_local_limit, check_wait_timeout

__all__ = [
    "Connections",
    "LimitedConnection",
    "LimitedConnectionPool",
    "PoolGroup",
    "ProducerPool",
    "Producers",
    "connections",
    "disable_limit_protection",
    "get_limit",
    "producers",
    "register_group",
    "reset",
    "set_limit",
    "use_global_limit",
]

#: the same sentinel object as ``kombu.pools.use_global_limit``, so both work here
use_global_limit = _kombu_pools.use_global_limit
disable_limit_protection = _kombu_pools.disable_limit_protection

_limit = [10]
_groups: list[PoolGroup] = []

#: "not stamped" for the monotonic stamps below (a constant: ``float("-inf")`` parses its
#: string at every call, and the release under pressure compares against it)
_NEVER = float("-inf")


def _last_three(gaps: tuple[float, ...], gap: float) -> tuple[tuple[float, ...], float]:
    """``gaps`` with ``gap`` appended, the last three kept, and their median (of two: the
    smaller); without a sort (this runs at every release while others wait)."""
    if len(gaps) < 2:
        return (*gaps, gap), (gap if not gaps or gap < gaps[0] else gaps[0])
    a, b = gaps[-2], gaps[-1]
    low, high = (a, b) if a < b else (b, a)
    return (a, b, gap), (low if gap < low else high if gap > high else gap)


#: a hold quantum is this many times what the connection's first use cost (its set-up) ...
QUANTUM_PER_SETUP = 24.0
#: ... and at least this long (seconds), at most the budget's ``hold_quantum``
QUANTUM_FLOOR = 0.01
#: a quantum counted in uses still ends after this many times its length in time
TURN_TIME_CAP = 1.5
#: how long a thread waits for its own process's connection to come back from a loan
#: before it waits for a slot instead (seconds; a loan is normally one publish)
RECLAIM_WAIT = 0.5


def _queue_lock(queue: Any) -> Any:
    """The mutex of a pool's queue; eventlet's (kombu uses it once ``queue`` is patched) has
    none, and needs none: its greenlets switch only where they block, never in here."""
    mutex = getattr(queue, "mutex", None)
    return mutex if mutex is not None else contextlib.nullcontext()


#: kombu's ``Resource.acquire`` (what ``super().acquire`` is for the pools here), called
#: directly on the warm path
_resource_acquire = Resource.acquire


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    return max(deadline - time.monotonic(), 0.0)


class LimitedConnection(PooledConnection):
    """A pooled kombu connection that holds one slot of the budget while it is open."""

    _mppools_slot: Slot | None = None
    # where the warm path stores this slot's IDLE/BUSY byte and reads the pressure flag
    # (a cell of the shared segment; -1 when the backend has none or no slot is held)
    _mppools_view: Any = None
    _mppools_at: int = -1
    _mppools_pressure_at: int = -1
    _mppools_limiter: Limiter | None = None
    _mppools_idle_since: float | None = None
    _mppools_finalizer: weakref.finalize[Any, Any] | None = None
    #: monotonic time from which a release while others wait hands the slot on
    _mppools_hand_on_at: float = 0.0
    _mppools_taken_at: float = 0.0
    _mppools_quantum: float = 0.0
    _mppools_first_use: bool = False
    #: releases since the slot was taken, and the number after which a release while others
    #: wait hands the slot on (0: the quantum is in time only)
    _mppools_uses: int = 0
    _mppools_turn_uses: int = 0
    #: its sockets were cut (its lease was lost): closed at its release, never reused
    _mppools_severed: bool = False
    #: how often its own process uses it: the time from the start of one use to the start
    #: of the next (loans in between or not), the median of the last three, taken while
    #: others waited (-1 until measured). A connection used more often than every
    #: MIN_LEND_GAP (a tight loop) is not lent: a loan would only make its own thread
    #: wait, and it takes turns. From start to start, not from a release to the next
    #: acquire: a request-shaped worker with requests queued reuses its connection soon
    #: after a release too, but once per request (milliseconds apart); the median, as a
    #: tight loop's process descheduled once (a 2-core host running 8 workers) must not
    #: pass for one between two requests.
    _mppools_gap: float = -1.0
    _mppools_gaps: tuple[float, ...] = ()
    _mppools_began_before: float = _NEVER
    #: when its current use began, if others waited then (-inf once counted)
    _mppools_acquired_at: float = _NEVER
    #: ... and how long it sits in its pool between two uses (a release to the next use's
    #: start, the median of the last three, measured alongside: -1 until measured). On a
    #: host with more busy processes than cores a tight loop is descheduled often, so its
    #: start-to-start period can pass MIN_LEND_GAP; between a release and its next acquire
    #: it still sits idle for microseconds, where a worker between requests does the rest
    #: of a request. Used less often than MIN_LEND_GAP AND idle for at least
    #: MIN_LEND_IDLE_GAP between uses: lendable
    _mppools_idle_gap: float = -1.0
    _mppools_idle_gaps: tuple[float, ...] = ()
    #: this turn's uses that began while others waited: the first one's start, the last
    #: one's, and how many came after the first (its use rate under pressure; the time
    #: before anyone waited, idle or not, is no part of it)
    _mppools_pressed_at: float = _NEVER
    _mppools_pressed_last: float = _NEVER
    _mppools_pressed_uses: int = 0
    #: when it was last taken out of its pool to be lent or offered, it had sat there since
    _mppools_out_since: float | None = None
    #: offers of it this turn that its own process took back before the waiter claimed them
    #: (wasted: a waiter woke and two processes spent a round trip for nothing), and offers
    #: claimed
    _mppools_taken_back: int = 0
    _mppools_claimed: int = 0

    # slot life cycle ----------------------------------------------------------------------
    def _mppools_take_slot(self, *, block: bool = True, timeout: float | None = None,
                           on_wait: WaitHook | None = None) -> None:
        """Hold a slot (no-op when unconfigured or already held); ``on_wait`` as for
        :meth:`Limiter.acquire <mppools._limiter._base.Limiter.acquire>`."""
        if self._mppools_slot is not None:
            return
        limiter = _config.current()
        if limiter is None:
            return
        slot = limiter.acquire(block=block, timeout=timeout, on_wait=on_wait)
        self._mppools_slot, self._mppools_limiter = slot, limiter
        # the hold quantum runs from here: under contention the slot is handed on at the
        # first release after it (see docs/concepts.md, "Contention"); its length is set at
        # the first release, from what this connection's first use cost
        now = time.monotonic()
        self._mppools_taken_at, self._mppools_quantum = now, limiter.hold_quantum
        self._mppools_hand_on_at = now + self._fitted_quantum(limiter)
        self._mppools_first_use = True
        self._mppools_uses = self._mppools_turn_uses = 0
        self._mppools_severed = False
        self._mppools_gap, self._mppools_gaps = -1.0, ()
        self._mppools_idle_gap, self._mppools_idle_gaps = -1.0, ()
        self._mppools_taken_back = self._mppools_claimed = 0
        self._mppools_began_before = _NEVER
        self._mppools_acquired_at = _NEVER
        self._mppools_pressed_at = self._mppools_pressed_last = _NEVER
        self._mppools_pressed_uses = 0
        # no cells in a thread-free process: its releases then take the limiter's path, which
        # gives the slot back at once (no keeper could hand an idle one on later)
        cells = None if _fork._threadless else limiter.cells(slot)
        if cells is not None:
            self._mppools_view, self._mppools_at, self._mppools_pressure_at = cells
        # a connection dropped without being closed (a pool group cleared by hand, say)
        # closes its socket when collected: its slot goes back then too
        self._mppools_finalizer = weakref.finalize(self, limiter.release, slot)
        keeper().track(slot.token, self, limiter.keeper_address())
        if _config.lending() and _lending.lendable(self._pool):
            _lending.lender().listen(limiter.lend_address())

    def _fitted_quantum(self, limiter: Limiter) -> float:
        """QUANTUM_PER_SETUP times what a hand-over costs in this budget (at least
        QUANTUM_FLOOR), capped by ``hold_quantum``; the cap while the cost is unknown."""
        cap = self._mppools_quantum
        cost = limiter.handover_cost()
        if cap <= 0.0 or cost <= 0.0:
            return cap
        return min(cap, max(QUANTUM_FLOOR, QUANTUM_PER_SETUP * cost))

    def _mppools_fit_quantum(self, now: float) -> None:
        """At the first release after taking a slot: measure the hand-over, refit the quantum.

        From the grant to the end of the first use, this connection paid what a hand-over
        costs: the wake-up, the set-up (TCP, TLS, broker handshake), one use. The budget
        keeps a running average of that, so every holder gets the same quantum (fair turns),
        QUANTUM_PER_SETUP times the cost: hand-overs then take about 1/(1+QUANTUM_PER_SETUP)
        of a slot's time, and a cheap broker changes hands often (short waits).

        Once the budget knows how many uses per second a connection in active use serves
        (:meth:`~mppools._limiter._base.Limiter.use_rate`), the quantum is counted in uses:
        that rate times the quantum, so every turn carries the same number of messages
        whichever process gets it (a process the scheduler runs less does not get fewer);
        TURN_TIME_CAP times the quantum in time still ends a turn, so a slow holder cannot
        stretch it.
        """
        self._mppools_first_use = False
        slot, limiter = self._mppools_slot, self._mppools_limiter
        if slot is None or limiter is None:
            return
        # from the grant (wall clock, stamped by whoever granted: it counts the wake-up) or,
        # if the wall clock stepped meanwhile, from when this process had the slot
        local = now - self._mppools_taken_at
        granted = time.time() - slot.acquired_at
        limiter.note_handover_cost(granted if local <= granted <= local + 1.0 else local)
        quantum = self._fitted_quantum(limiter)
        rate = limiter.use_rate()
        owed, pool = 0, self._pool
        if isinstance(pool, LimitedConnectionPool):
            owed, pool._mppools_owed = pool._mppools_owed, 0
        if quantum > 0.0 and rate > 0.0:
            turn = max(2, round(rate * quantum))
            # what this process's last turn fell short of (its time ran out first) is added
            # to this one, at most a turn more; its time cap stretches by as much
            owed = min(owed, turn)
            self._mppools_turn_uses = turn + owed
            quantum *= TURN_TIME_CAP * (turn + owed) / turn
        self._mppools_hand_on_at = self._mppools_taken_at + quantum

    def _mppools_turn_done(self, now: float) -> bool:
        """True once this connection had its hold quantum (in uses, or in time)."""
        turn = self._mppools_turn_uses
        return (0 < turn <= self._mppools_uses) or now >= self._mppools_hand_on_at

    def _mppools_note_turn(self, now: float) -> None:
        """A turn ends by handing the slot on at a release: fold its uses per second while
        others waited (from the start of its first use under pressure to that of its last:
        neither a set-up nor a quiet stretch before anyone waited counts) into the budget's
        use rate. A turn counted in
        uses that a tight loop could not fill before its time ran out (its process ran less
        than the others) leaves what it fell short of owed to its pool's next turn: turns
        then carry the same number of messages over time, whichever process has them."""
        limiter, uses = self._mppools_limiter, self._mppools_uses
        n = self._mppools_pressed_uses
        span = self._mppools_pressed_last - self._mppools_pressed_at
        if limiter is not None and n > 1 and span > 0.0:
            limiter.note_use_rate(n / span)
        pool, turn = self._pool, self._mppools_turn_uses
        if isinstance(pool, LimitedConnectionPool):
            short = turn - uses if turn > 0 and uses < turn else 0
            pool._mppools_owed = short if short and self._mppools_tight() is True else 0

    def _mppools_note_use(self) -> None:
        """At a release while others wait: if this use's start was stamped (it began under
        pressure) and not counted yet, count it for the turn's use rate and fold the time
        from the previous counted start to it into the median of the last three (of two:
        the smaller)."""
        began, before = self._mppools_acquired_at, self._mppools_began_before
        if began > _NEVER:
            self._mppools_acquired_at = _NEVER  # counted once
            self._mppools_began_before = began
            if self._mppools_pressed_at == _NEVER:
                if self._mppools_uses > 1:  # the slot's first use paid the set-up
                    self._mppools_pressed_at = began
            else:
                self._mppools_pressed_uses += 1
                self._mppools_pressed_last = began
            if before > _NEVER:
                self._mppools_gaps, self._mppools_gap = _last_three(self._mppools_gaps,
                                                                    began - before)
                # since when it sat in its pool before this use: its release (or a loan's
                # end); if this use took it back from an offer, when it was taken for that
                released = self._mppools_idle_since
                if released is None:
                    released = self._mppools_out_since
                if released is not None and before < released <= began:
                    self._mppools_idle_gaps, self._mppools_idle_gap = _last_three(
                        self._mppools_idle_gaps, began - released)

    def _mppools_tight(self) -> bool | None:
        """Whether its own process uses it in a tight loop (not to be lent: its thread wants
        it back at once): used more often than every MIN_LEND_GAP, or idle for less than
        MIN_LEND_IDLE_GAP between uses, or most of its offers this turn (two at least) were
        taken back by its own process before a waiter could claim them; None until its use
        is measured."""
        back = self._mppools_taken_back
        if back >= 2 and back > self._mppools_claimed:
            return True
        if self._mppools_gap < 0.0:
            return None
        return self._mppools_gap < _lending.MIN_LEND_GAP or (
            0.0 <= self._mppools_idle_gap < _lending.MIN_LEND_IDLE_GAP)

    def _mppools_lending_here(self) -> bool:
        """Lending on, this pool's transport lends, and this process's lending socket is up."""
        return (_config.lending() and _lending.lendable(self._pool)
                and _lending.lender().listening())

    def _mppools_may_be_lent(self) -> bool:
        """True unless lending cannot take this connection off its holder (lending off, a
        transport that does not lend, no lending socket) or its own process is known to use
        it in a tight loop (:meth:`_mppools_tight`). One whose use is not measured yet
        counts: it is lent once it has sat idle a moment (``Lender.lend_from``), so the end
        of its turn is no reason to hand its slot over at once."""
        return self._mppools_tight() is not True and self._mppools_lending_here()

    def _mppools_idle_while_waited_for(self, now: float, turn_done: bool) -> None:
        """Back in its pool (idle) while someone waits, inside its quantum or at its turn's
        end (``turn_done``; lendable then): lend it to the head of the queue if that waiter
        may borrow it (an offer: no hand-over, no set-up); else, at a turn's end, hand the
        slot on now; else the keeper hands it on if it stays idle."""
        slot = self._mppools_slot
        if slot is None:
            return
        outcome = Offer.HAND_OVER
        tight = self._mppools_tight()
        # inside its quantum, only one known not to be in a tight loop is offered (its own
        # thread would want a tight loop's connection back at once)
        if turn_done or (tight is False and self._mppools_lending_here()):
            outcome = _lending.lender().offer(self)
        if outcome is Offer.MADE:
            return
        if not turn_done or outcome is Offer.NOT_NEEDED:
            keeper().look_again(slot.token, self, tight=tight is True)
        elif self._mppools_take_if_idle():
            self._mppools_note_turn(now)
            self._mppools_close_taken()

    def _mppools_give_back(self) -> None:
        slot, limiter = self._mppools_slot, self._mppools_limiter
        self._mppools_slot = self._mppools_limiter = None
        self._mppools_view, self._mppools_at = None, -1
        self._mppools_idle_since = None
        if self._mppools_finalizer is not None:
            self._mppools_finalizer.detach()
            self._mppools_finalizer = None
        if slot is not None and limiter is not None:
            keeper().untrack(slot.token)
            limiter.release(slot)

    def _connection_factory(self) -> Any:
        # a connection used without going through pool.acquire() (or reconnecting after its
        # slot was yielded) takes its slot here, before the transport connects
        took = self._mppools_slot is None
        self._mppools_take_slot()
        try:
            return super()._connection_factory()
        except BaseException:
            if took:
                self._mppools_give_back()
            raise

    def _do_close_self(self) -> None:
        try:
            super()._do_close_self()
        finally:
            self._mppools_give_back()

    def collect(self, socket_timeout: float | None = None) -> None:
        try:
            super().collect(socket_timeout)
        finally:
            self._mppools_give_back()

    # idle yield (called by the keeper thread) -----------------------------------------------
    def _mppools_take_if_idle(self) -> bool:
        """Take this connection out of its pool if it sits idle there (under the queue mutex)."""
        pool = self._pool
        queue = pool._resource
        with _queue_lock(queue):
            for i, item in enumerate(queue.queue):
                if item is self:
                    # keep the pool's size: a placeholder connects on demand
                    queue.queue[i] = lazy(pool.new)
                    return True
        return False

    def _mppools_close_taken(self) -> None:
        """Close a connection taken out by ``_mppools_take_if_idle`` (outside any lock)."""
        try:
            self._close()
        except Exception:  # a broken connection still gives its slot back
            self._mppools_give_back()

    def _mppools_sever(self) -> bool:
        """Cut this connection's broker sockets (``shutdown``), from any thread, while its
        holder may be using it: the broker sees it closed at once, the holder's next I/O
        fails (and cannot reconnect underneath mppools), and the slot goes back at its
        release, when the pool closes it (in debt). False if no socket was found (a
        transport mppools does not know, or not connected)."""
        if not _sever_transport(self._connection):
            return False
        # off the warm path: the pools look at it at its next release or reuse
        self._mppools_severed = True
        self._mppools_at = -1
        return True

    def _mppools_drop_inherited(self) -> None:
        """In a forked child: forget the parent's connection without any I/O."""
        _fork.drop_inherited(self)
        if self._mppools_finalizer is not None:
            self._mppools_finalizer.detach()  # the parent's slot: never ours to release
            self._mppools_finalizer = None
        self._mppools_slot = self._mppools_limiter = None
        self._mppools_view, self._mppools_at = None, -1
        self._connection = None
        self._transport = None
        self._default_channel = None


def _refused(*args: Any, **kwargs: Any) -> Any:
    raise ConnectionRefusedError(
        errno.ECONNREFUSED,
        "mppools: this connection was cut because its slot's lease could not be renewed (the "
        "host is fenced); it reconnects only with a slot")


def _sever_transport(raw: Any) -> bool:
    """Cut the broker sockets of a kombu transport connection (``shutdown``: every socket
    reachable from it, as the fork handler finds them) and keep it from reconnecting
    underneath mppools: redis-py's client pools (kombu's redis channels) would otherwise
    replace a dead socket by a new one at the next command. Runs in another thread than
    the holder's. False if no socket was found."""
    if raw is None:
        return False
    channels = getattr(raw, "channels", None) or ()
    if isinstance(channels, dict):  # py-amqp: channel id -> channel
        channels = channels.values()
    for channel in list(channels):
        state = getattr(channel, "__dict__", None) or {}
        for attr in ("_mppools_pool", "_pool", "_async_pool"):
            pool = state.get(attr)
            if pool is None or not hasattr(pool, "make_connection"):
                continue
            pool.make_connection = _refused  # no new client connection from this pool
            for _ in range(3):  # the holder's thread may change the collections meanwhile
                try:
                    clients = [*list(getattr(pool, "_available_connections", ())),
                               *list(getattr(pool, "_in_use_connections", ()))]
                    break
                except RuntimeError:
                    clients = []
            for client in clients:
                client._connect = _refused  # a dropped socket is not replaced
    cut = False
    for sock in _fork.walk_sockets(raw):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
            cut = True
    return cut


class LimitedConnectionPool(ConnectionPool):
    """kombu's ``ConnectionPool`` whose connections draw slots from the shared budget."""

    # kombu's own after-fork hook (multiprocessing children only) would ``collect()`` the
    # inherited connections, and py-amqp's collect calls ``socket.shutdown()``, which breaks
    # the parent's connection. mppools' fork handler replaces it for every kind of fork.
    close_after_fork = False
    #: uses this process's last turn fell short of, added to its next (see
    #: ``LimitedConnection._mppools_note_turn``)
    _mppools_owed: int = 0

    def __init__(self, connection: Any, limit: int | None = None, **kwargs: Any) -> None:
        super().__init__(connection, limit=limit, **kwargs)
        _fork.register(self)

    def new(self) -> LimitedConnection:
        info = dict(self.connection._info(resolve=False))
        transport = transport_for(self.connection) if _config.current() is not None else None
        if transport is not None:
            info["transport"] = transport
        return LimitedConnection(self, **info)

    def acquire(self, block: bool = False, timeout: float | None = None, *,
                lend: bool = False) -> Any:
        """Take a connection from the local pool, then a slot of the budget if it has none.

        With ``lend`` (producer pools), a wait for a slot may end with
        ``mppools._lending.Borrowed`` raised, carrying a connection borrowed from another
        process (docs/concepts.md, "Lending").

        A pooled connection is reused with the slot it holds, unless the budget is over its
        limit (after ``set_limit(n, force=True)``): then it is closed, which pays the debt,
        and the next one is taken the same way.

        Raises:
            LimitExceeded: the local pool (kombu's ``ConnectionLimitExceeded``) or the shared
                budget had nothing free in time.
            ConfigurationError: ``timeout`` is not None or a finite number of seconds >= 0.
        """
        deadline = None
        if timeout is not None:
            timeout = check_wait_timeout(timeout)
            if timeout is not None:
                deadline = time.monotonic() + timeout
        conn = _resource_acquire(self, block, timeout)
        # the warm path, inlined (it is what a pooled publish costs): a pooled connection
        # that still holds its slot; one byte read of the pressure flag, one byte store into
        # this process's own record, no lock, no syscall
        at = conn._mppools_at
        if at >= 0:
            view = conn._mppools_view
            try:
                pressure = view[conn._mppools_pressure_at]
                if not pressure & PRESSURE_DEBT:
                    view[at] = STATE_BUSY
                    if pressure:  # others wait: when this use began (lending)
                        conn._mppools_acquired_at = time.monotonic()
                    return conn
            except ValueError:  # the budget was closed meanwhile (mppools.close())
                conn._mppools_view, conn._mppools_at = None, -1
                return conn
        return self._acquire_cold(conn, block, timeout, deadline, lend)

    def _borrower(self) -> WaitHook | None:
        """The slot wait's hook that borrows a connection of this pool's broker, if lending
        is on and this pool's transport lends."""
        limiter = _config.current()
        if limiter is None or not _config.lending() or not _lending.lendable(self):
            return None
        return _lending.Borrower(self, limiter)

    @staticmethod
    def _reuse(conn: LimitedConnection) -> bool | None:
        """Whether ``conn``, just taken from the pool, can go out with the slot it holds
        (True: marked busy), must give its slot back first (False: the budget is in debt),
        or holds none (None)."""
        at = conn._mppools_at
        if at >= 0:
            view = conn._mppools_view
            try:
                pressure = view[conn._mppools_pressure_at]
                if not pressure & PRESSURE_DEBT:
                    view[at] = STATE_BUSY
                    if pressure:
                        conn._mppools_acquired_at = time.monotonic()
                    return True
            except ValueError:  # the budget was closed meanwhile (mppools.close())
                conn._mppools_view, conn._mppools_at = None, -1
                return True
            return False
        slot, limiter = conn._mppools_slot, conn._mppools_limiter
        if slot is None or limiter is None:
            return None
        if conn._mppools_severed or limiter.in_debt():
            return False
        limiter.mark_busy(slot)
        if limiter.under_pressure():
            conn._mppools_acquired_at = time.monotonic()
        return True

    def _acquire_cold(self, conn: LimitedConnection, block: bool, timeout: float | None,
                      deadline: float | None, lend: bool = False) -> Any:
        """The rest of :meth:`acquire`: pay a debt, take a slot for a connection without."""
        while True:
            reuse = self._reuse(conn)
            if reuse:
                return conn
            if reuse is None:
                break
            # in debt: this slot is one too many; closing gives it back, which pays the
            # debt, and the connection goes last in the pool (it reconnects on demand)
            conn._mppools_close_taken()
            self._requeue_last(conn)
            if deadline is not None:
                timeout = _remaining(deadline)
            conn = _resource_acquire(self, block, timeout)
        if _config.current() is None:
            return conn
        if block and _lending.lender().lending_from(self):
            # a connection of ours is out on loan: it comes back in a moment (a loan is one
            # publish), which beats waiting for a slot and a set-up
            wanted = time.monotonic()
            wait = RECLAIM_WAIT if deadline is None else min(RECLAIM_WAIT,
                                                             _remaining(deadline) or 0.0)
            mine = _lending.lender().reclaim(self, wait)
            if mine is not None:
                # its use began when it was wanted (the wait for the loan's end is held time)
                mine._mppools_acquired_at = wanted
                # ours instead of the placeholder we took (which stood for it: dropped)
                self._dirty.discard(conn)
                self._dirty.add(mine)
                return mine
        on_wait = self._borrower() if lend and block else None
        try:
            if deadline is None and block:
                conn._mppools_take_slot(block=True, timeout=None, on_wait=on_wait)
            else:
                conn._mppools_take_slot(block=block, timeout=_remaining(deadline) or 0.0,
                                        on_wait=on_wait)
        except BaseException:
            self.release(conn)
            raise
        slot, limiter = conn._mppools_slot, conn._mppools_limiter
        if slot is not None and limiter is not None:
            limiter.mark_busy(slot)
        conn._mppools_idle_since = None
        return conn

    def _requeue_last(self, conn: LimitedConnection) -> None:
        """Put back a connection taken by acquire() where the pool takes it last."""
        self._dirty.discard(conn)
        queue = self._resource
        if getattr(queue, "mutex", None) is None:  # eventlet's queue: no mutex, no notify
            queue.put_nowait(conn)
            return
        with queue.mutex:
            queue.queue.insert(0, conn)
            queue.unfinished_tasks += 1
            queue.not_empty.notify()

    def release(self, resource: Any) -> None:
        """Give a connection back to the pool (closing it if its slot is wanted elsewhere).

        Releasing a connection that is not out (released already, or replaced) is a no-op:
        queueing it twice would hand it to two holders.
        """
        limit = self._limit  # kombu's property, read once (a property costs on the warm path)
        if limit:
            try:
                self._dirty.remove(resource)
            except KeyError:
                return
        waited_for: tuple[float, bool] | None = None
        at = resource._mppools_at
        if at >= 0:
            # the warm path (what a pooled publish costs): no one waits, not its first use
            view = resource._mppools_view
            now = time.monotonic()
            resource._mppools_uses += 1
            try:
                pressure = view[resource._mppools_pressure_at]
                if pressure or resource._mppools_first_use:
                    waited_for = self._released_with_slot(resource, now, pressure)
                else:
                    resource._mppools_idle_since = now
                    view[at] = STATE_IDLE
            except ValueError:  # the budget was closed meanwhile (mppools.close())
                resource._mppools_view, resource._mppools_at = None, -1
        elif resource._mppools_slot is not None:
            resource._mppools_uses += 1
            waited_for = self._released_with_slot(resource, time.monotonic(), None)
        # kombu's Resource.release, minus the discard done above
        if limit:
            self._resource.put_nowait(resource)
            self.release_resource(resource)
            if waited_for is not None:  # once it is back in the pool, to be lent from there
                resource._mppools_idle_while_waited_for(*waited_for)
        else:
            self.close_resource(resource)

    @staticmethod
    def _released_with_slot(resource: LimitedConnection, now: float,
                            pressure: int | None) -> tuple[float, bool] | None:
        """The rest of :meth:`release` for a connection that holds a slot (its use counted):
        fit its quantum after a first use; under pressure, count the use and hand the slot
        on at its turn's end (or in debt), else mark it idle. ``pressure`` is the budget's
        pressure byte read by the warm path, or None where the limiter is asked. Returns
        when and whether its turn was done if it went idle while others wait, else None."""
        if resource._mppools_first_use:
            resource._mppools_fit_quantum(now)
        if pressure is not None:  # the slot's cells in the shared segment
            turn_done = False
            if pressure:
                resource._mppools_note_use()
                turn_done = resource._mppools_turn_done(now)
            if pressure and (pressure & PRESSURE_DEBT or (
                    turn_done and not resource._mppools_may_be_lent())):
                # someone waits and this connection had its quantum (or the budget shrank):
                # hand the slot on, don't idle
                resource._mppools_note_turn(now)
                resource._mppools_close_taken()
                return None
            resource._mppools_idle_since = now
            resource._mppools_view[resource._mppools_at] = STATE_IDLE
            return (now, turn_done) if pressure else None
        slot, limiter = resource._mppools_slot, resource._mppools_limiter
        if slot is None or limiter is None:  # given back while it was out
            return None
        turn_done = False
        if limiter.under_pressure():
            resource._mppools_note_use()
            turn_done = resource._mppools_turn_done(now)
        if resource._mppools_severed or limiter.in_debt() or _fork._threadless or (
                turn_done and not resource._mppools_may_be_lent()):
            resource._mppools_note_turn(now)
            resource._mppools_close_taken()
            return None
        resource._mppools_idle_since = now
        limiter.mark_idle(slot=slot)
        return (now, turn_done) if limiter.under_pressure() else None

    def _after_fork_in_child(self) -> None:
        inherited = [*self._dirty, *self._resource.queue]
        # fresh queue: a thread of the parent may have held the old queue's mutex at fork
        self._resource = LifoQueue()
        self._dirty = set()
        self._mppools_owed = 0  # the parent's turns, not this process's
        for conn in inherited:
            if isinstance(conn, LimitedConnection):
                conn._mppools_drop_inherited()
                _fork.bury(conn)
        self._closed = False
        self.setup()

    def __repr__(self) -> str:
        idle = sum(1 for c in self._resource.queue if not isinstance(c, lazy))
        return (f"<LimitedConnectionPool {self.connection.as_uri()} limit={self.limit} "
                f"in use={len(self._dirty)} idle={idle}>")


class ProducerPool(_kombu_pools.ProducerPool):
    """Pool of :class:`kombu.Producer` instances over a (limited) connection pool.

    Same constructor as kombu's: ``ProducerPool(connections, *args, **kwargs)``.
    """

    Producer = Producer
    close_after_fork = False

    def __init__(self, connections: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("close_after_fork", False)
        super().__init__(connections, *args, **kwargs)
        _fork.register(self)

    def acquire(self, block: bool = False, timeout: float | None = None) -> Any:
        """Take a producer; with ``timeout``, the whole call (its connection and slot
        included) waits at most that long.

        kombu's ``Resource.acquire``, with the deadline handed explicitly to preparing the
        producer (kombu's ``prepare()`` has no room for it; a thread-local would be shared by
        every greenlet of the thread), and a failed prepare that gives back only what it took.

        Raises:
            LimitExceeded: nothing free in time.
            ConfigurationError: ``timeout`` is not None or a finite number of seconds >= 0.
        """
        if timeout is not None:
            timeout = check_wait_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._closed:
            raise RuntimeError("Acquire on closed pool")
        if self.limit:
            while True:
                try:
                    R = self._resource.get(
                        block=block,
                        timeout=None if deadline is None else _remaining(deadline))
                except Empty:
                    self._add_when_empty()
                    continue
                try:
                    R = self._prepare(R, deadline)
                except BaseException:
                    # whatever _prepare took it gave back; the producer (or its placeholder)
                    # goes back to the queue, holding no connection
                    self._resource.put_nowait(R)
                    raise
                self._dirty.add(R)
                break
        else:
            R = self._prepare(self.new(), deadline)

        def release() -> None:
            self.release(R)

        R.release = release
        return R

    def prepare(self, p: Any) -> Any:
        return self._prepare(p, None)

    def _prepare(self, p: Any, deadline: float | None) -> Any:
        if callable(p):
            # a placeholder of new() (a lazy): make the producer with the caller's deadline
            p = self._create_producer(deadline) if isinstance(p, lazy) else p()
        if p._channel is None:
            conn = self._acquire_connection(deadline)
            try:
                p.revive(conn)
            except BaseException:
                p.__connection__ = None
                conn.release()
                raise
        return p

    def create_producer(self) -> Any:
        return self._create_producer(None)

    def _create_producer(self, deadline: float | None) -> Any:
        conn = self._acquire_connection(deadline)
        try:
            return self.Producer(conn)
        except BaseException:
            conn.release()
            raise

    def _acquire_connection(self, deadline: float | None = None) -> Any:
        pool = self.connections
        if isinstance(pool, LimitedConnectionPool):
            try:
                return pool.acquire(True, None if deadline is None else _remaining(deadline),
                                    lend=True)
            except _lending.Borrowed as borrowed:
                # no free slot, and another process had an idle connection to the same
                # broker: publish through it (released with the producer: the loan ends)
                return borrowed.connection
        if deadline is None:
            return pool.acquire(block=True)
        return pool.acquire(block=True, timeout=_remaining(deadline))

    def release(self, resource: Any) -> None:
        """Give a producer back; its connection goes back to its pool.

        A producer this pool handed out forgets its connection here, so nothing can release
        that connection again once another holder has it. Releasing a producer that is back
        in the pool already is a no-op; one the pool never handed out (kombu's tests release
        bare mocks) has its connection released, as kombu does.
        """
        forget = True
        if self.limit:
            try:
                self._dirty.remove(resource)
            except KeyError:
                if self._queued(resource):
                    return
                forget = False
        connection = resource.__connection__
        if forget:
            resource.__connection__ = None
        if connection:
            connection.release()
        resource.channel = None
        if self.limit:
            self._resource.put_nowait(resource)
            self.release_resource(resource)
        else:
            self.close_resource(resource)

    def _queued(self, resource: Any) -> bool:
        queue = self._resource
        with _queue_lock(queue):
            return any(item is resource for item in queue.queue)

    def _after_fork_in_child(self) -> None:
        # producers hold channels of inherited connections: forget them, no I/O (kept
        # referenced so no finalizer of theirs runs before the sockets are detached)
        for producer in [*self._dirty, *self._resource.queue]:
            if not isinstance(producer, lazy):
                _fork.drop_inherited(producer)
                _fork.bury(producer)
        self._resource = LifoQueue()
        self._dirty = set()
        self._closed = False
        self.setup()


class PoolGroup(EqualityDict):
    """Collection of resource pools, keyed by connection (kombu's ``PoolGroup``)."""

    def __init__(self, limit: Any = None, close_after_fork: bool = True) -> None:
        super().__init__()
        self.limit = limit
        self.close_after_fork = close_after_fork
        if close_after_fork:
            _fork.register(self, priority=2)

    def create(self, resource: Any, limit: int | None) -> Resource:
        raise NotImplementedError("PoolGroups must define ``create``")

    def __missing__(self, resource: Any) -> Resource:
        limit = self.limit
        if limit is use_global_limit:
            limit = get_limit()
        pool = self[resource] = self.create(resource, limit)
        return pool

    def _after_fork_in_child(self) -> None:
        # the pools themselves were emptied by their own handlers; start with none
        self.clear()



def register_group(group: PoolGroup) -> PoolGroup:
    """Register group (can be used as decorator)."""
    _groups.append(group)
    return group


class Connections(PoolGroup):
    """Collection of connection pools."""

    def create(self, connection: Any, limit: int | None) -> LimitedConnectionPool:
        return LimitedConnectionPool(connection, limit=limit)


connections = register_group(Connections(limit=use_global_limit))


class Producers(PoolGroup):
    """Collection of producer pools."""

    def create(self, connection: Any, limit: int | None) -> ProducerPool:
        return ProducerPool(connections[connection], limit=limit)


producers = register_group(Producers(limit=use_global_limit))


def _all_pools() -> Iterator[Resource]:
    return chain(*((g.values() if g else iter([])) for g in _groups))


def get_limit() -> int:
    """The pool limit: the shared budget's limit when configured, else the local one."""
    limiter = _config.current()
    if limiter is not None:
        return limiter.limit
    return _limit[0]


def set_limit(
    limit: int,
    force: bool = False,
    reset_after: bool = False,
    ignore_errors: bool = False,
) -> int:
    """Set the pool limit; when configured, the shared budget's limit for every process.

    ``limit`` is an int from 1 to 65,536 when configured (up to the budget's capacity);
    unconfigured, also 0 or None (no limit). Growing is immediate. Shrinking below what is in
    use raises ``RuntimeError``
    (:class:`~mppools.BudgetInUseError`) unless ``force``; with ``force`` the budget stays
    over the new limit only until holders give slots back (idle ones are asked to at once).
    ``reset_after`` closes this process's pooled connections afterwards; ``ignore_errors``
    lets a local pool shrink while in use.
    """
    if isinstance(limit, bool):
        raise TypeError("limit must be an int, not bool")
    limiter = _config.current()
    if limiter is not None:
        if limit is None or limit == 0:
            raise ConfigurationError(
                f"the shared budget {limiter.name!r} needs a positive limit, not {limit!r}"
            )
        limiter.resize(check_limit(limit), force=force)
    else:
        limit = check_local_limit(limit)
    limit = limit or 0
    if limit != (_limit[0] or 0) or limiter is not None:
        _limit[0] = limit
        for pool in _all_pools():
            pool.resize(limit, force=force, ignore_errors=ignore_errors or limiter is not None)
    if reset_after:
        reset()
    return limit


def reset(*args: Any, **kwargs: Any) -> None:
    """Reset all pools by closing open resources (their slots are given back)."""
    for pool in _all_pools():
        with contextlib.suppress(Exception):
            pool.force_close_all()
    for group in _groups:
        group.clear()


"""The lender's side: a stream socket that lends this process's idle connections.

Started beside the keeper the first time this process takes a slot for a connection of a
lendable transport (Redis, py-amqp), only in a process that may run threads of its own (not
gevent/eventlet-patched: its sockets belong to the hub; not a thread-free uWSGI master).
One lending thread answers every peer of our uid; a loan is carried by that thread when the
process has no other connection to lend meanwhile, else by a thread of its own:

1. a peer asks ``("borrow", key)`` (nobody waits: it takes any idle connection), or
   ``("claim", ticket, key)`` (a waiter presents an offer, see :meth:`Lender.offer`); the
   lender takes a connection it holds, of a pool whose connection parameters digest to
   ``key``, out of that pool (a lazy placeholder keeps the pool's size), marks its slot busy
   and answers ``("lent", pid, declared)``; or ``("no",)``;
2. it runs the borrower's calls on that connection's default channel until ``("end",)`` or
   EOF (a borrower that dies ends its loan);
3. it hands the connection to a thread of ours that waits for it, or offers it to the next
   waiter, or puts it back where a placeholder stands (marked idle), or closes it if the
   pool has no room or the connection broke (which gives its slot back).

An offer keeps an idle connection out of its pool for the waiter it was offered to, for
OFFER_WAIT at most: the head of the queue gets it, not whoever asks first, and no two
waiters are woken for one connection. The lender's own thread takes an offered connection
back at once if it needs it (the waiter's claim then finds nothing and it waits on).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import secrets
import select
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from kombu.utils.functional import lazy

from mppools import _fork, _green
from mppools._limiter._base import Offer

from . import _wire
from ._borrow import FORWARDED, FRAME_TIMEOUT, LENDABLE_DRIVERS, MIN_LEND_IDLE

if TYPE_CHECKING:
    from mppools.pools import LimitedConnection

__all__ = ["OFFER_WAIT", "Lender", "key_digest", "lendable", "lender", "pool_key"]

logger = logging.getLogger("mppools")

#: a borrower that neither calls nor ends its loan for this long loses it (seconds)
LOAN_IDLE_TIMEOUT = 300.0
#: how long an exiting process waits for its loans out to end before it goes (seconds)
EXIT_WAIT = 2.0
#: how long a connection offered to a waiter is kept for it (seconds): a waiter that has
#: not claimed it by then is slow or gone, and the next one is offered it
OFFER_WAIT = 0.05
#: the lending thread's poll (captured at import: eventlet deletes ``select.poll`` when it
#: patches, and a patched process never lends)
_poll = getattr(select, "poll", None)


def pool_key(pool: Any) -> str:
    """The digest of a pool's connection parameters: a loan is only ever of a connection to
    the same broker, vhost, credentials and options (cached on the pool)."""
    key: str | None = getattr(pool, "_mppools_key", None)
    if key is None:
        info = pool.connection._info(resolve=False)
        blob = json.dumps(sorted(info), sort_keys=True, default=repr)
        key = hashlib.sha256(blob.encode()).hexdigest()[:32]
        pool._mppools_key = key
    return key


def key_digest(key: str) -> int:
    """``key`` (:func:`pool_key`) as the non-zero 64-bit number a waiter's record keeps."""
    return int(key[:16], 16) or 1


def lendable(pool: Any) -> bool:
    """True if connections of this pool's transport can be lent."""
    try:
        real = pool.connection.get_transport_cls()
    except Exception:
        return False
    return getattr(real, "driver_type", None) in LENDABLE_DRIVERS


class Lender:
    """This process's lending socket and its loans."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._returned = threading.Condition(self._lock)  # a loan ended
        self._sock: socket.socket | None = None
        self._address: str | None = None
        self._thread: threading.Thread | None = None
        self._exit_hook_pid = 0
        self._loans: set[socket.socket] = set()
        self._out: set[LimitedConnection] = set()
        self._claims: dict[int, collections.deque[_Claim]] = {}
        #: connections offered to a waiter, by ticket (also in _out)
        self._offered: dict[int, _Offered] = {}
        self._poke_r: socket.socket | None = None  # wakes the lending thread (an offer)
        self._poke_w: socket.socket | None = None
        #: the calls run for borrowers, by kind ("publish", "queue_declare")
        self.calls: collections.Counter[str] = collections.Counter()

    # the socket ------------------------------------------------------------------------------
    def listen(self, address: str | None) -> None:
        """Lend at ``address`` from now on (no-op if already, or not allowed here)."""
        if address is None or self._address == address:
            return
        if _green.is_patched() or _fork.threadless() or _poll is None:
            return
        with self._lock:
            if self._address == address:
                return
            self._stop_locked()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(address)  # our own path: a leftover of this process image
                sock.bind(address)
                sock.listen(64)
            except OSError:
                logger.warning("mppools: could not lend at %s", address, exc_info=True)
                sock.close()
                return
            sock.setblocking(False)
            if self._poke_r is None:
                self._poke_r, self._poke_w = socket.socketpair()
                self._poke_r.setblocking(False)
                self._poke_w.setblocking(False)
            self._sock, self._address = sock, address
            if self._exit_hook_pid != os.getpid():
                self._exit_hook_pid = os.getpid()
                _register_exit_hook()
            self._thread = threading.Thread(target=self._run, args=(sock, self._poke_r),
                                            name="mppools-lender", daemon=True)
            self._thread.start()

    def _stop_locked(self) -> None:
        sock, self._sock = self._sock, None
        address, self._address = self._address, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the poll; the thread closes it
            self._poke()
        if address is not None:
            with contextlib.suppress(OSError):
                os.unlink(address)

    def stop(self, timeout: float = 2.0) -> None:
        """Stop lending (``mppools.close()``, a thread-free process) and wait up to
        ``timeout`` seconds for the lending thread to end; loans out end when their
        borrowers end them, offers out are taken back."""
        with self._lock:
            self._stop_locked()
            thread, self._thread = self._thread, None
            offered, self._offered = list(self._offered.values()), {}
        for item in offered:
            self._give_back(item.conn, broken=False)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _poke(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            self._poke_w.send(b"p")  # type: ignore[union-attr]

    def _run(self, sock: socket.socket, poke: socket.socket) -> None:
        assert _poll is not None
        poller = _poll()
        poller.register(sock.fileno(), select.POLLIN)
        poller.register(poke.fileno(), select.POLLIN)
        try:
            while self._sock is sock:
                due = self._expire_offers()
                try:
                    ready = {fd for fd, _ in poller.poll(
                        None if due is None else max(due * 1000.0, 1.0))}
                except InterruptedError:
                    continue
                if poke.fileno() in ready:
                    with contextlib.suppress(OSError):
                        poke.recv(4096)
                if sock.fileno() not in ready:
                    continue
                try:
                    peer, _ = sock.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    return
                peer.setblocking(True)
                conn = self._answer(peer)
                if conn is None:
                    continue
                if self._only_lendable(conn):
                    # nothing else here to lend meanwhile (a sync worker's one connection):
                    # carry the loan in this thread, no thread to start
                    self._serve(peer, conn)
                else:
                    threading.Thread(target=self._serve, args=(peer, conn),
                                     name="mppools-loan", daemon=True).start()
        finally:
            sock.close()

    @staticmethod
    def _only_lendable(conn: LimitedConnection) -> bool:
        """True if ``conn`` is the only connection with a slot in this process."""
        from mppools._keeper import keeper

        return all(c is conn for c in keeper().held())

    # one loan ----------------------------------------------------------------------------------
    def _answer(self, peer: socket.socket) -> LimitedConnection | None:
        """Read a borrow request and answer it (here, in the lending thread: a refusal costs
        no thread); the connection lent, or None (``peer`` is closed then)."""
        conn: LimitedConnection | None = None
        try:
            if not _wire.peer_trusted(peer):
                raise _wire.WireError("a peer of another uid")
            peer.settimeout(FRAME_TIMEOUT)
            request = _wire.recv(peer)
            if isinstance(request, tuple) and len(request) == 2 and request[0] == "borrow":
                conn = self._take(str(request[1]))
            elif isinstance(request, tuple) and len(request) == 3 and request[0] == "claim":
                conn = self._claim(request[1], str(request[2]))
            elif isinstance(request, tuple) and len(request) == 2 and request[0] == "decline":
                conn = self._claim(request[1], None)
                if conn is not None:
                    self._give_back(conn, broken=False)
                peer.close()
                return None
            if conn is None:
                _wire.send(peer, ("no",))
            else:
                _wire.send(peer, ("lent", os.getpid(), tuple(conn.declared_entities)))
                with self._lock:
                    self._loans.add(peer)
                return conn
        except OSError:
            if conn is not None:
                self._give_back(conn, broken=False)
        peer.close()
        return None

    def _serve(self, peer: socket.socket, conn: LimitedConnection) -> None:
        """Carry one loan to its end, then give the connection back."""
        lent: LimitedConnection | None = conn
        try:
            peer.settimeout(LOAN_IDLE_TIMEOUT)
            broken = self._carry(peer, conn)
            self._give_back(conn, broken=bool(broken))
            lent = None
        except OSError:
            if lent is not None:  # the borrower went away mid-call
                self._give_back(lent, broken=False)
        except Exception:
            # not expected: never keep the connection out for good; closed, as its
            # channel's state is unknown (the slot goes back)
            logger.exception("mppools: a loan failed")
            if lent is not None:
                self._give_back(lent, broken=True)
        finally:
            with self._lock:
                self._loans.discard(peer)
            peer.close()

    def _take(self, key: str) -> LimitedConnection | None:
        from mppools._keeper import keeper

        for conn in keeper().held():
            if (self._may_lend(conn) and pool_key(conn._pool) == key
                    and not self._in_tight_loop(conn) and conn._mppools_take_if_idle()):
                self._taken(conn)
                return conn
        return None

    def _may_lend(self, conn: LimitedConnection) -> bool:
        """True if ``conn`` is one to lend at all: connected, holding a slot of the current
        budget, which is not in debt, not cut, and no thread of ours waits for a
        connection of its pool (:meth:`reclaim`)."""
        from mppools import _config

        limiter = conn._mppools_limiter
        return (conn._mppools_slot is not None and limiter is not None
                and _config.current() is limiter and not limiter.in_debt()
                and not conn._mppools_severed and conn._connection is not None
                and id(conn._pool) not in self._claims)

    def _taken(self, conn: LimitedConnection) -> None:
        """``conn`` was just taken out of its pool to be lent or offered."""
        # since when it sat in its pool: its use measure needs it if its own thread takes
        # it back before it returns (LimitedConnection._mppools_note_use)
        conn._mppools_out_since = conn._mppools_idle_since
        conn._mppools_idle_since = None
        slot, limiter = conn._mppools_slot, conn._mppools_limiter
        if slot is not None and limiter is not None:
            with contextlib.suppress(Exception):
                limiter.mark_busy(slot)
        with self._lock:
            self._out.add(conn)

    def _claim(self, ticket: Any, key: str | None) -> LimitedConnection | None:
        """The connection kept for offer ``ticket`` (if its pool digests to ``key``; any if
        None), or None if it is not kept any more."""
        with self._lock:
            item = self._offered.pop(ticket, None) if isinstance(ticket, int) else None
        if item is None:
            return None
        if key is not None and pool_key(item.conn._pool) != key:  # pragma: no cover
            self._give_back(item.conn, broken=False)
            return None
        if key is not None:
            item.conn._mppools_claimed += 1
        return item.conn

    def offer(self, conn: LimitedConnection) -> Offer:
        """``conn`` sits idle in its pool while someone waits: keep it for the head of the
        queue if that waiter may borrow it (the limiter's ``offer_loan``), for OFFER_WAIT at
        most (:attr:`~Offer.MADE`). Otherwise ``conn`` stays in its pool, and the result says
        whether to hand its slot over (:attr:`~Offer.HAND_OVER`: not lending, a thread of
        ours waits for a connection of its pool, it is in a tight loop, or the head of the
        queue cannot borrow it) or to keep it idle and look again (:attr:`~Offer.NOT_NEEDED`:
        every waiter has an offer out, it is not idle in its pool any more, or its use is
        not measured yet and it has not sat idle for MIN_LEND_IDLE)."""
        limiter = conn._mppools_limiter
        if self._sock is None or limiter is None or not self._may_lend(conn):
            return Offer.HAND_OVER
        if self._in_tight_loop(conn):
            # a tight loop's connection (its own thread wants it back at once) takes turns:
            # handed over, not lent; one not measured yet is lent once idle a moment
            return Offer.HAND_OVER if conn._mppools_tight() else Offer.NOT_NEEDED
        if not conn._mppools_take_if_idle():
            return Offer.NOT_NEEDED
        self._taken(conn)
        ticket = secrets.randbits(63) or 1
        with self._lock:
            self._offered[ticket] = _Offered(conn, time.monotonic() + OFFER_WAIT)
        try:
            outcome = limiter.offer_loan(ticket, key_digest(pool_key(conn._pool)))
        except Exception:
            outcome = Offer.HAND_OVER
        if outcome is Offer.MADE:
            self._poke()  # the lending thread times the offer out
            return outcome
        with self._lock:
            item = self._offered.pop(ticket, None)
            if item is not None:
                self._out.discard(conn)
        if item is not None and not self._place(conn):  # nobody was told: back, idle
            conn._mppools_close_taken()  # pragma: no cover - its placeholder is there
        return outcome

    def _expire_offers(self) -> float | None:
        """Take back the offers whose waiters did not claim them in time (each goes to the
        next waiter, or back to its pool); seconds until the next one runs out, or None."""
        now = time.monotonic()
        with self._lock:
            late = [t for t, item in self._offered.items() if item.until <= now]
            expired = [self._offered.pop(t).conn for t in late]
            due = min((item.until for item in self._offered.values()), default=None)
        for conn in expired:
            self._give_back(conn, broken=False)
        if expired:
            return 0.0
        return None if due is None else max(due - now, 0.0)

    @staticmethod
    def lend_from(conn: LimitedConnection) -> float | None:
        """The monotonic time from which ``conn``, idle in its pool, may be lent as far as
        its own process's use of it goes; None if it is not idle, or its own process uses
        it in a tight loop (``LimitedConnection._mppools_tight``, measured while others
        waited: its thread wants it back at once). One not measured yet may be lent once it
        has sat idle for MIN_LEND_IDLE."""
        since = conn._mppools_idle_since
        if since is None:
            return None
        tight = conn._mppools_tight()
        if tight is None:
            return since + MIN_LEND_IDLE
        return None if tight else since

    def _in_tight_loop(self, conn: LimitedConnection) -> bool:
        """Not to be lent now for its own process's sake (see :meth:`lend_from`)."""
        at = self.lend_from(conn)
        return at is None or time.monotonic() < at

    def _carry(self, peer: socket.socket, conn: LimitedConnection) -> bool | None:
        """Run the borrower's calls until it ends the loan: None if it ended it, False on
        anything else, True if the connection broke."""
        errors = tuple(conn.connection_errors)
        while True:
            request = _wire.recv(peer)
            if not isinstance(request, tuple) or not request:
                return False
            if request[0] == "end":
                # what the borrower declared through this connection: kombu's cache
                if len(request) == 2 and isinstance(request[1], tuple):
                    conn.declared_entities.update(i for i in request[1] if isinstance(i, int))
                return None
            try:
                channel: Any = conn.default_channel
                self.calls[str(request[1] if request[0] == "call" else request[0])] += 1
                if request[0] == "publish":
                    prepared, kwargs = request[1], request[2]
                    message = channel.prepare_message(*prepared)
                    result = channel.basic_publish(message, **kwargs)
                    reply: tuple[str, Any] = ("ret", _plain(result))
                elif request[0] == "call" and request[1] in FORWARDED:
                    result = getattr(channel, request[1])(*request[2], **request[3])
                    reply = ("ret", _plain(result))
                else:
                    reply = ("err", TypeError(f"a loan carries no {request[0]!r} call"))
            except errors as exc:
                with contextlib.suppress(OSError):
                    _wire.send(peer, ("lost", f"{type(exc).__name__}: {exc}"))
                return True
            except Exception as exc:
                reply = ("err", _portable(exc))
            _wire.send(peer, reply)

    def _give_back(self, conn: LimitedConnection, *, broken: bool) -> None:
        """A loan ended (or an offer ran out): hand the connection to a thread of ours that
        waits for it (:meth:`reclaim`), else offer it to the next waiter, else put it back in
        its pool where a placeholder stands, idle; close it (its slot goes back) if it broke
        or the pool has no room."""
        from mppools._keeper import keeper

        slot, limiter = conn._mppools_slot, conn._mppools_limiter
        usable = not broken and slot is not None and limiter is not None and not (
            conn._mppools_severed or limiter.in_debt())
        pool = conn._pool
        with self._lock:
            self._out.discard(conn)
            self._returned.notify_all()
            claims = self._claims.get(id(pool)) if usable else None
            claim = claims.popleft() if claims else None
            if claims is not None and not claims:
                del self._claims[id(pool)]
        if claim is not None:
            claim.conn = conn  # still marked busy: it goes straight back to work
            claim.event.set()
            return
        if not usable or not self._place(conn):
            conn._mppools_close_taken()
            return
        with contextlib.suppress(Exception):
            if limiter is not None and slot is not None and limiter.under_pressure() and (
                    self.offer(conn) is not Offer.MADE):
                keeper().look_again(slot.token, conn)  # lent or handed over later

    def _place(self, conn: LimitedConnection) -> bool:
        """Put ``conn`` back in its pool where a placeholder stands, marked idle; False if
        the pool has no placeholder (no room)."""
        from mppools.pools import _queue_lock

        queue = conn._pool._resource
        with _queue_lock(queue):
            items = queue.queue
            for i in range(len(items) - 1, -1, -1):
                if _placeholder(items[i]):
                    del items[i]
                    items.append(conn)  # the pool's LIFO end: the next acquire takes it
                    break
            else:
                return False
            # it was lendable when it was taken, and its own process has not used it since:
            # one whose use is not measured yet need not sit idle for MIN_LEND_IDLE again
            now = time.monotonic()
            conn._mppools_idle_since = now - MIN_LEND_IDLE if conn._mppools_gap < 0.0 else now
            slot, limiter = conn._mppools_slot, conn._mppools_limiter
            if slot is not None and limiter is not None:
                with contextlib.suppress(Exception):
                    limiter.mark_idle(slot)
        return True

    def reclaim(self, pool: Any, timeout: float) -> LimitedConnection | None:
        """For a thread of this process that needs a connection of ``pool`` while one is
        out on loan: wait up to ``timeout`` seconds for a loan of that pool to end and take
        the connection directly (it is not lent again meanwhile). None at once if none is out,
        or if none came back in time."""
        with self._lock:
            for ticket, item in list(self._offered.items()):
                if item.conn._pool is pool:  # kept for a waiter that has not come yet
                    del self._offered[ticket]
                    self._out.discard(item.conn)
                    item.conn._mppools_taken_back += 1  # an offer wasted: see _mppools_tight
                    return item.conn
            if not any(c._pool is pool for c in self._out):
                return None
            claim = _Claim()
            self._claims.setdefault(id(pool), collections.deque()).append(claim)
        if not claim.event.wait(timeout):
            with self._lock:
                claims = self._claims.get(id(pool))
                if claims is not None and claim in claims:
                    claims.remove(claim)
                    if not claims:
                        del self._claims[id(pool)]
                    return None
            claim.event.wait()  # taken by a give-back that is handing it over now
        return claim.conn

    def quiesce(self, timeout: float = EXIT_WAIT) -> None:
        """At exit: stop lending and wait up to ``timeout`` seconds for the loans out to
        end, so that no borrower's call is cut by this process going away."""
        self.stop(timeout=min(timeout, 0.5))
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._out:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._returned.wait(left)

    def listening(self) -> bool:
        """True if this process lends (its lending socket is up)."""
        return self._sock is not None

    def lending_from(self, pool: Any) -> bool:
        """True if a connection of ``pool`` is out on loan now (cheap: no lock)."""
        return bool(self._out) and any(c._pool is pool for c in list(self._out))

    def _after_fork_in_child(self) -> None:
        # the parent's threads do not exist here; close our copies of its sockets (a
        # borrower of the parent's must see EOF when the parent ends, not when we do)
        self._lock = threading.Lock()
        self._returned = threading.Condition(self._lock)
        sock, self._sock, self._address = self._sock, None, None
        self._thread = None
        loans, self._loans = self._loans, set()
        # the parent's connections out on loan: in no pool here, so no pool's own handler
        # drops them; done as for those (no I/O, kept referenced so no finalizer runs)
        for conn in self._out:
            conn._mppools_drop_inherited()
            _fork.bury(conn)
        self._out = set()
        self._claims = {}
        self._offered = {}
        pokes = [p for p in (self._poke_r, self._poke_w) if p is not None]
        self._poke_r = self._poke_w = None
        self.calls = collections.Counter()
        for s in [*loans, *pokes, *([sock] if sock is not None else [])]:
            with contextlib.suppress(OSError):
                s.close()


class _Offered:
    """A connection kept for the waiter it was offered to, until ``until`` (monotonic)."""

    __slots__ = ("conn", "until")

    def __init__(self, conn: LimitedConnection, until: float) -> None:
        self.conn = conn
        self.until = until


class _Claim:
    """A thread of ours waiting for a connection of its pool to come back from a loan."""

    __slots__ = ("conn", "event")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.conn: LimitedConnection | None = None


def _placeholder(item: Any) -> bool:
    """A pool queue's item that stands for a connection without being one: kombu's lazy
    ``new()``, or a connection made from it that never took a slot."""
    return isinstance(item, lazy) or (getattr(item, "_mppools_slot", 0) is None
                                      and getattr(item, "_connection", 0) is None)


def _plain(result: Any) -> Any:
    """A call's result if it pickles (kombu's ``queue_declare_ok_t``), else None."""
    import pickle

    try:
        pickle.dumps(result)
    except Exception:
        return None
    return result


def _portable(exc: BaseException) -> BaseException:
    """The exception itself if it survives pickling, else an MppoolsError naming it."""
    import pickle

    from mppools._errors import MppoolsError

    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return MppoolsError(f"the lender's {type(exc).__name__}: {exc}")
    return exc


def _quiesce_at_exit() -> None:
    with contextlib.suppress(Exception):  # exiting: never raise from here
        _lender.quiesce()


def _register_exit_hook() -> None:
    """Let this process's loans end before it exits: at interpreter exit (``atexit``), and
    at the end of a multiprocessing or billiard child (celery's prefork pool), which leaves
    through ``os._exit`` after running multiprocessing's finalizers. A process that is
    killed, or calls ``os._exit`` itself, cuts its loans (the borrower's call raises
    LoanLostError)."""
    import atexit
    from multiprocessing import util

    atexit.unregister(_quiesce_at_exit)
    atexit.register(_quiesce_at_exit)
    util.Finalize(None, _quiesce_at_exit, exitpriority=100)


_lender = Lender()
_fork.register(_lender, priority=2)


def lender() -> Lender:
    """This process's lender."""
    return _lender

"""The lender's side: a stream socket that lends this process's idle connections.

Started beside the keeper the first time this process takes a slot for a connection of a
lendable transport (Redis, py-amqp), only in a process that may run threads of its own (not
gevent/eventlet-patched: its sockets belong to the hub; not a thread-free uWSGI master).
Each accepted peer of our uid gets one thread for one loan:

1. it asks ``("borrow", key)``; the lender looks for a connection it holds, of a pool whose
   connection parameters digest to ``key``, sitting idle in that pool, and takes it out
   (the keeper's ``_mppools_take_if_idle``: under the pool's queue mutex, a lazy placeholder
   keeps the pool's size), marks its slot busy and answers ``("lent", pid)``; or ``("no",)``;
2. it runs the borrower's calls on that connection's default channel until ``("end",)`` or
   EOF (a borrower that dies ends its loan);
3. it puts the connection back where a placeholder stands (marked idle; if someone waits,
   the keeper looks at it as at any idle one), or closes it if the pool has no room or the
   connection broke (which gives its slot back).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from kombu.utils.functional import lazy

from mppools import _fork, _green

from . import _wire
from ._borrow import FORWARDED, FRAME_TIMEOUT, LENDABLE_DRIVERS, MIN_LEND_CYCLE

if TYPE_CHECKING:
    from mppools.pools import LimitedConnection

__all__ = ["Lender", "lendable", "lender", "pool_key"]

logger = logging.getLogger("mppools")

#: a borrower that neither calls nor ends its loan for this long loses it (seconds)
LOAN_IDLE_TIMEOUT = 300.0
#: how long an exiting process waits for its loans out to end before it goes (seconds)
EXIT_WAIT = 2.0


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
        #: the calls run for borrowers, by kind ("publish", "queue_declare")
        self.calls: collections.Counter[str] = collections.Counter()

    # the socket ------------------------------------------------------------------------------
    def listen(self, address: str | None) -> None:
        """Lend at ``address`` from now on (no-op if already, or not allowed here)."""
        if address is None or self._address == address:
            return
        if _green.is_patched() or _fork.threadless():
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
            self._sock, self._address = sock, address
            if self._exit_hook_pid != os.getpid():
                self._exit_hook_pid = os.getpid()
                _register_exit_hook()
            self._thread = threading.Thread(target=self._run, args=(sock,),
                                            name="mppools-lender", daemon=True)
            self._thread.start()

    def _stop_locked(self) -> None:
        sock, self._sock = self._sock, None
        address, self._address = self._address, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes accept(); the thread closes it
        if address is not None:
            with contextlib.suppress(OSError):
                os.unlink(address)

    def stop(self, timeout: float = 2.0) -> None:
        """Stop lending (``mppools.close()``, a thread-free process) and wait up to
        ``timeout`` seconds for the lending thread to end; loans out end when their
        borrowers end them."""
        with self._lock:
            self._stop_locked()
            thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self, sock: socket.socket) -> None:
        try:
            while self._sock is sock:
                try:
                    peer, _ = sock.accept()
                except OSError:
                    return
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
            if broken is None:
                _wire.send(peer, ("ended",))
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
        from mppools import _config
        from mppools._keeper import keeper

        limiter = _config.current()
        if limiter is None or limiter.in_debt():
            return None
        for conn in keeper().held():
            slot = conn._mppools_slot
            if (slot is None or conn._mppools_severed or conn._connection is None
                    or pool_key(conn._pool) != key or id(conn._pool) in self._claims
                    or self._in_tight_loop(conn)):
                continue
            if conn._mppools_take_if_idle():
                conn._mppools_idle_since = None
                conn._mppools_offered = False  # a waiter was served: no hand-over owed
                with contextlib.suppress(Exception):
                    limiter.mark_busy(slot)
                with self._lock:
                    self._out.add(conn)
                return conn
        return None

    @staticmethod
    def _in_tight_loop(conn: LimitedConnection) -> bool:
        """Reused within MIN_LEND_CYCLE last time, and idle for less than that now: its own
        thread will want it back at once."""
        if conn._mppools_cycle >= MIN_LEND_CYCLE:
            return False
        since = conn._mppools_idle_since
        return since is None or time.monotonic() - since < MIN_LEND_CYCLE

    def _carry(self, peer: socket.socket, conn: LimitedConnection) -> bool | None:
        """Run the borrower's calls until it ends the loan: None if it ended it (and waits
        for the give-back to be answered), False on anything else, True if the connection
        broke."""
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
        """The loan ended: hand the connection to a thread of ours that waits for it
        (:meth:`reclaim`), else put it back in its pool where a placeholder stands, idle; close
        it (its slot goes back) if it broke or the pool has no room."""
        from mppools._keeper import keeper
        from mppools.pools import _queue_lock

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
        placed = False
        if usable and slot is not None and limiter is not None:
            queue = pool._resource
            with _queue_lock(queue):
                items = queue.queue
                for i in range(len(items) - 1, -1, -1):
                    if _placeholder(items[i]):
                        del items[i]
                        items.append(conn)  # the pool's LIFO end: the next acquire takes it
                        placed = True
                        break
                if placed:
                    conn._mppools_idle_since = time.monotonic()
                    with contextlib.suppress(Exception):
                        limiter.mark_idle(slot)
        if not placed:
            conn._mppools_close_taken()
            return
        with contextlib.suppress(Exception):
            if limiter is not None and slot is not None and limiter.under_pressure():
                keeper().look_again(slot.token, nudge=True)

    def reclaim(self, pool: Any, timeout: float) -> LimitedConnection | None:
        """For a thread of this process that needs a connection of ``pool`` while one is
        out on loan: wait up to ``timeout`` seconds for a loan of that pool to end and take
        the connection directly (it is not lent again meanwhile). None at once if none is out,
        or if none came back in time."""
        with self._lock:
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
        self.calls = collections.Counter()
        for s in [*loans, *([sock] if sock is not None else [])]:
            with contextlib.suppress(OSError):
                s.close()


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

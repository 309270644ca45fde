"""The borrower's side of a loan: a kombu connection whose channel runs on another process's.

A :class:`BorrowedConnection` is a real :class:`kombu.Connection` (a producer revived on it
works as on any other: ``publish``, ``maybe_declare`` with its declaration cache, ``ensure``
and ``retry``), whose transport forwards a closed set of channel calls over the loan's
socket to the lender, who runs them on its own connection's channel. ``prepare_message``
stays local and only records its arguments; the lender prepares and publishes the message
in one call. Everything else a channel can do (consuming, ``basic_get``, QoS, transactions)
raises: a borrowed connection only publishes and declares.

The transport class reports the real transport's ``driver_type``, ``driver_name`` and error
classes, plus :class:`~mppools.LoanLostError` as a recoverable connection error: kombu's
``ensure`` then "reconnects", which here borrows again from whichever process has an idle
connection to the same broker at that moment (or fails with LoanLostError if none has).
"""

from __future__ import annotations

import collections
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from kombu.connection import Connection
from kombu.transport.base import StdChannel, Transport

from mppools import _green
from mppools._errors import LoanLostError, MppoolsError

from . import _wire

__all__ = [
    "CALL_TIMEOUT",
    "FRAME_TIMEOUT",
    "LENDABLE_DRIVERS",
    "MIN_LEND_GAP",
    "MIN_LEND_IDLE",
    "MIN_LEND_IDLE_GAP",
    "BorrowedConnection",
    "Elsewhere",
    "Loan",
    "OwnLoan",
    "ask",
    "borrowed_transport",
    "claim",
    "decline",
    "perform",
]

#: a connection is lent only if its own process uses it no more often than once in this
#: long (start to start, the median of its last three uses, measured while others wait;
#: seconds): one used more often is in a tight loop, which takes turns (hand-overs), as a
#: loan would only make its own thread wait for it
MIN_LEND_GAP = 0.002
#: ... and one not measured yet only once it has sat idle in its pool for this long now
#: (seconds)
MIN_LEND_IDLE = 0.002
#: ... and not one that sits idle in its pool for less than this between two uses of its
#: own process (a release to the next acquire, the median of three; seconds): a tight loop
#: descheduled often (more busy processes than cores) can pass MIN_LEND_GAP from start to
#: start, but is back for its connection within microseconds of a release; offered, it
#: would be taken back before any waiter could claim it
MIN_LEND_IDLE_GAP = 0.0005
#: transports whose connections are lent (their channels publish synchronously)
LENDABLE_DRIVERS = frozenset({"redis", "amqp"})
#: how long a lender may take to answer a borrow request (seconds): it answers from memory,
#: at once if it is idle; one too busy to answer sooner (its own thread holds the GIL) is
#: not one to borrow from
ASK_TIMEOUT = 0.01
#: how long either end waits for the other's frame outside a call: a borrow request after
#: the connect, room for the ``end`` (seconds)
FRAME_TIMEOUT = 0.5
#: how long one forwarded call may take at most (a publish with confirms to a slow broker
#: included) before the loan counts as lost
CALL_TIMEOUT = 60.0


class Loan:
    """One loan: the stream socket to the lender, while the lender lends its connection."""

    def __init__(self, sock: socket.socket, lender_pid: int,
                 declared: frozenset[int] = frozenset()) -> None:
        self._sock: socket.socket | None = sock
        self.lender_pid = lender_pid
        #: kombu's declaration cache of the lender's connection when it was lent (what
        #: ``maybe_declare`` need not declare again), and the borrowed connection's own set
        #: (what it declared through the loan goes back to the lender at the end)
        self.known = declared
        self.declared: set[int] = set()

    @property
    def alive(self) -> bool:
        return self._sock is not None

    def call(self, request: tuple[Any, ...]) -> Any:
        """Run ``request`` at the lender; its result, or the exception it raised there.

        Raises:
            LoanUnsent: the loan was over before the request was sent (it did not run).
            LoanLostError: the loan broke while the request was out (it may have run).
        """
        sock = self._sock
        if sock is None or self._gone(sock):
            self.end()
            raise LoanUnsent(self.lender_pid)
        try:
            _wire.send(sock, request)
            kind, value = _wire.recv(sock)
        except OSError as exc:
            self.end()
            raise LoanLostError(f"the connection borrowed from pid {self.lender_pid} is gone "
                                f"({exc})") from exc
        if kind == "ret":
            return value
        if kind == "unsent":  # the lender did not run it (its connection cannot be lent
            self.end()        # any more, or stayed in use): it may run elsewhere
            raise LoanUnsent(self.lender_pid)
        if kind == "lost":  # the lender's connection broke: it is closed there
            self.end()
            raise LoanLostError(f"the connection borrowed from pid {self.lender_pid} broke "
                                f"at the lender: {value}")
        if kind == "err" and isinstance(value, BaseException):
            raise value  # what the call raised at the lender (a broker's channel error)
        self.end()
        raise LoanLostError(f"the lender (pid {self.lender_pid}) answered {kind!r}: not a "
                            "loan's reply")

    @staticmethod
    def _gone(sock: socket.socket) -> bool:
        """True if the lender closed the loan (EOF or reset waiting to be read): between
        two calls nothing else may arrive."""
        try:
            # a zero timeout never waits (nor yields to a hub), patched or not
            return bool(_green.wait_readable([sock.fileno()], 0))
        except (OSError, ValueError):
            return True

    def end(self) -> None:
        """Give the connection back (the lender puts it back in its pool, or offers it to
        the next waiter). Not answered: nothing the borrower does next depends on when."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        try:
            sock.settimeout(FRAME_TIMEOUT)
            _wire.send(sock, ("end", tuple(self.declared - self.known)))
        except OSError:
            pass  # the lender sees EOF instead
        finally:
            sock.close()


#: a call no lender ran is sent on a loan asked of a process with an idle connection at
#: most this many times, then on what an acquire gets (an offer, or a slot of its own)
MAX_ASKS = 2
#: ... and given up (LoanLostError) after this many loans in all declined it: each is a
#: wait for an offer by then, and a lender whose own process keeps taking its connection
#: back is soon not lent (``_mppools_tight``), so a slot comes instead
MAX_RESENDS = 32

#: what a borrowed connection carries on with when no lender runs its calls, as an acquire
#: would get it: a loan offered while waiting, or an :class:`OwnLoan` if a slot came first
Elsewhere = Callable[[], "Loan"]


class OwnLoan(Loan):
    """A borrowed connection's "loan" of a connection of this process's own, which holds a
    slot: its calls run here; its end puts the connection back in its pool."""

    def __init__(self, conn: Any) -> None:
        super().__init__(None, os.getpid(), frozenset(conn.declared_entities))  # type: ignore[arg-type]
        self._conn: Any = conn

    @property
    def alive(self) -> bool:
        return self._conn is not None

    def call(self, request: tuple[Any, ...]) -> Any:
        conn = self._conn
        if conn is None:
            raise LoanUnsent(self.lender_pid)
        return perform(conn.default_channel, request)

    def end(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.declared_entities.update(i for i in self.declared if isinstance(i, int))
            conn.release()


class LoanUnsent(Exception):
    """A request did not run on its loan (the loan was over before it was sent, or the
    lender answered ``unsent``): safe to send elsewhere."""

    def __init__(self, lender_pid: int) -> None:
        super().__init__(f"the loan from pid {lender_pid} was over before the call")
        self.lender_pid = lender_pid


def ask(address: str, key: str) -> Loan | None:
    """Ask the lender at ``address`` for an idle connection matching ``key``; None if it has
    none, is gone, or is not of our uid."""
    return _request(address, ("borrow", key))


def claim(address: str, ticket: int, key: str) -> Loan | None:
    """Take the connection the lender at ``address`` keeps for offer ``ticket``; None if it
    took it back meanwhile, is gone, or is not of our uid."""
    return _request(address, ("claim", ticket, key))


def decline(address: str, ticket: int) -> None:
    """Tell the lender at ``address`` that offer ``ticket`` is not needed (no answer)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(ASK_TIMEOUT)
        sock.connect(address)
        if _wire.peer_trusted(sock):
            _wire.send(sock, ("decline", ticket))
    except OSError:
        pass  # the offer runs out on its own
    finally:
        sock.close()


def _request(address: str, request: tuple[Any, ...]) -> Loan | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(ASK_TIMEOUT)
        sock.connect(address)
        if not _wire.peer_trusted(sock):
            sock.close()
            return None
        _wire.send(sock, request)
        reply = _wire.recv(sock)
    except OSError:
        sock.close()
        return None
    if not (isinstance(reply, tuple) and len(reply) == 3 and reply[0] == "lent"):
        sock.close()
        return None
    sock.settimeout(CALL_TIMEOUT)
    return Loan(sock, int(reply[1]), frozenset(i for i in reply[2] if isinstance(i, int)))


def perform(channel: Any, request: tuple[Any, ...]) -> Any:
    """Run a loan's ``request`` on a real ``channel`` (at the lender, or on a borrower's own
    connection when no lender ran it): its result, or what it raised."""
    if request[0] == "publish" and len(request) == 3:
        prepared, kwargs = request[1], request[2]
        return channel.basic_publish(channel.prepare_message(*prepared), **kwargs)
    if request[0] == "call" and len(request) == 4 and request[1] in FORWARDED:
        return getattr(channel, request[1])(*request[2], **request[3])
    raise TypeError(f"a loan carries no {request[0]!r} call")


class _Prepared:
    """What ``prepare_message`` returns on a borrowed channel: its arguments, kept (by
    reference: kombu fixes up ``properties`` after preparing) until the publish."""

    __slots__ = ("args",)

    def __init__(self, args: tuple[Any, ...]) -> None:
        self.args = args


#: channel calls that run at the lender as they are (declarations and their undoing)
FORWARDED = frozenset({
    "exchange_declare", "exchange_delete", "exchange_bind", "exchange_unbind",
    "queue_declare", "queue_delete", "queue_bind", "queue_unbind", "queue_purge",
})


class BorrowedChannel(StdChannel):
    """The channel of a borrowed connection: publishes and declares at the lender."""

    supports_batch_publish = False  # kombu's Producer.batch publishes one by one
    channel_id = 1

    def __init__(self, transport: Transport, loan: Loan) -> None:
        self._transport: Transport | None = transport
        self.loan = loan
        self.events: collections.defaultdict[str, set[Any]] = collections.defaultdict(set)

    @property
    def connection(self) -> Transport | None:
        """The transport while its connection is open; None once closed (kombu rebinds
        entities bound to a closed channel to the new one, after a retry's reconnect)."""
        transport = self._transport
        if transport is None or transport.client is None:
            return None
        return transport

    def prepare_message(self, body: Any, priority: Any = None, content_type: Any = None,
                        content_encoding: Any = None, headers: Any = None,
                        properties: Any = None) -> _Prepared:
        return _Prepared((body, priority, content_type, content_encoding, headers,
                          properties))

    def basic_publish(self, message: Any, exchange: str = "", routing_key: str = "",
                      mandatory: bool = False, immediate: bool = False,
                      **kwargs: Any) -> Any:
        if not isinstance(message, _Prepared):
            raise MppoolsError("a borrowed connection publishes only messages it prepared "
                               "(Producer.publish)")
        return self._call(("publish", message.args,
                           {"exchange": exchange, "routing_key": routing_key,
                            "mandatory": mandatory, "immediate": immediate, **kwargs}))

    def _call(self, request: tuple[Any, ...]) -> Any:
        """Run ``request`` on the loan; if it did not run there (the lender ended the loan
        before it went out, or answered ``unsent``), elsewhere (see
        :meth:`BorrowedConnection._mppools_resend`): it had not run, so nothing runs
        twice."""
        try:
            return self.loan.call(request)
        except LoanUnsent as unsent:
            transport = self.connection
            client = transport.client if transport is not None else None
            if not isinstance(client, BorrowedConnection):
                raise LoanLostError(f"the connection borrowed from pid {unsent.lender_pid} "
                                    "is gone") from None
            return client._mppools_resend(self, request, unsent)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name in FORWARDED:
            def forwarded(*args: Any, **kwargs: Any) -> Any:
                return self._call(("call", name, args, kwargs))
            return forwarded
        raise AttributeError(f"a borrowed connection's channel has no {name!r}: it only "
                             "publishes and declares")

    def close(self) -> None:
        self._transport = None


class BorrowedTransport(Transport):
    """Transport of a borrowed connection (subclassed per real transport, see
    :func:`borrowed_transport`)."""

    real: type[Any] = Transport

    def establish_connection(self) -> Loan:
        client = self.client
        assert isinstance(client, BorrowedConnection)
        return client._mppools_next_loan()

    def close_connection(self, connection: Loan | None) -> None:
        if connection is not None:
            connection.end()

    def create_channel(self, connection: Loan) -> BorrowedChannel:
        return BorrowedChannel(self, connection)

    def close_channel(self, channel: Any) -> None:
        pass

    def verify_connection(self, connection: Loan) -> bool:
        return connection.alive

    def drain_events(self, connection: Loan, **kwargs: Any) -> Any:
        raise MppoolsError("a borrowed connection only publishes: it has no events to drain")

    def driver_version(self) -> str:
        return str(self.real.driver_version(self)) if hasattr(self.real, "driver_version") \
            else "N/A"


_classes: dict[type[Any], type[BorrowedTransport]] = {}


def borrowed_transport(real: type[Any]) -> type[BorrowedTransport]:
    """The borrowed-connection transport standing in for ``real`` (cached per class)."""
    cls = _classes.get(real)
    if cls is None:
        attrs: dict[str, Any] = {
            "real": real,
            "driver_type": real.driver_type,
            "driver_name": real.driver_name,
            "default_port": getattr(real, "default_port", None),
            "connection_errors": (LoanLostError, *tuple(real.connection_errors)),
            "channel_errors": tuple(real.channel_errors),
        }
        recoverable = getattr(real, "recoverable_connection_errors", None)
        if recoverable is not None:
            attrs["recoverable_connection_errors"] = (LoanLostError, *tuple(recoverable))
        recoverable_channel = getattr(real, "recoverable_channel_errors", None)
        if recoverable_channel is not None:
            attrs["recoverable_channel_errors"] = tuple(recoverable_channel)
        cls = type(f"Borrowed{real.__name__}", (BorrowedTransport,), attrs)
        _classes[real] = cls
    return cls


class BorrowedConnection(Connection):
    """A kombu connection publishing through another process's idle connection.

    It holds no slot and opens no broker connection: its loan does. Releasing (closing) it
    gives the connection back to the lender. If the loan is lost, reconnecting (kombu's
    ``ensure``) borrows again through ``renew``; with nothing to borrow it raises
    :class:`~mppools.LoanLostError`.
    """

    def __init__(self, loan: Loan, renew: Callable[[], Loan | None], real: type[Any],
                 info: dict[str, Any], elsewhere: Elsewhere | None = None) -> None:
        self._mppools_loan: Loan | None = loan
        self._mppools_renew = renew
        self._mppools_elsewhere = elsewhere
        self._mppools_borrowed_at = time.monotonic()
        super().__init__(**{**info, "transport": borrowed_transport(real)})  # type: ignore[no-untyped-call]

    def _mppools_next_loan(self) -> Loan:
        loan, self._mppools_loan = self._mppools_loan, None
        if loan is None or not loan.alive:
            loan = self._mppools_renew()
            if loan is None and self._mppools_elsewhere is not None:
                loan = self._mppools_elsewhere()
            if loan is None:
                raise LoanLostError(f"no process of the budget had an idle connection to "
                                    f"lend (pid {os.getpid()} asked)")
        # what the lender's connection declared already needs no declaring again
        self.declared_entities.update(loan.known)
        loan.declared = self.declared_entities
        return loan

    def _mppools_adopt(self, loan: Loan) -> None:
        """Carry on on ``loan`` (another lender's connection)."""
        self.declared_entities.clear()  # another connection: kombu's cache starts afresh
        self.declared_entities.update(loan.known)
        loan.declared = self.declared_entities
        self._connection = loan

    def _mppools_resend(self, channel: BorrowedChannel, request: tuple[Any, ...],
                        unsent: LoanUnsent) -> Any:
        """Run a request its lender did not run, and carry on there: on a loan from a
        process with an idle connection now; else as an acquire would (``elsewhere``): on a
        loan offered while waiting, or on a connection of this process's own if a slot came
        first (:class:`OwnLoan`).

        Raises:
            LoanLostError: no lender had one (and no ``elsewhere``), or lenders kept
                declining to run it.
            LimitExceeded: neither a loan nor a slot came in the budget's acquire timeout.
        """
        for attempt in range(MAX_RESENDS):
            # a process with an idle connection at once (a few), then as an acquire would
            loan = self._mppools_renew() if attempt < MAX_ASKS else None
            if loan is None and self._mppools_elsewhere is not None:
                loan = self._mppools_elsewhere()
            if loan is None:
                raise LoanLostError(f"the connection borrowed from pid {unsent.lender_pid} is "
                                    "gone, and no other process had one idle to lend") \
                    from None
            self._mppools_adopt(loan)
            channel.loan = loan
            try:
                return loan.call(request)
            except LoanUnsent as again:
                unsent = again
        raise LoanLostError(f"{MAX_RESENDS} loans in a row declined to run a call of pid "
                            f"{os.getpid()} (the last from pid {unsent.lender_pid})")

    def _do_close_self(self) -> None:
        # end the loan before kombu clears the declaration cache: what this loan declared
        # goes back with it
        loan = self._connection
        if isinstance(loan, Loan):
            loan.end()
        super()._do_close_self()  # type: ignore[no-untyped-call]

    def __repr__(self) -> str:
        return f"<BorrowedConnection {self.as_uri()} at {id(self):#x}>"

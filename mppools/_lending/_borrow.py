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
    "Loan",
    "ask",
    "borrowed_transport",
    "claim",
    "decline",
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


class LoanUnsent(Exception):
    """A loan was found over before a request was sent on it: safe to send elsewhere."""

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
        """Run ``request`` on the loan; if the lender ended it before the request went out
        (it exited between two calls), on a new loan from another lender: the request had
        not run, so nothing runs twice."""
        try:
            return self.loan.call(request)
        except LoanUnsent as unsent:
            transport = self.connection
            client = transport.client if transport is not None else None
            loan = client._mppools_relend() if isinstance(client, BorrowedConnection) \
                else None
            if loan is None:
                raise LoanLostError(f"the connection borrowed from pid {unsent.lender_pid} "
                                    "is gone, and no other process had one idle to lend") \
                    from None
            self.loan = loan
            return loan.call(request)

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
                 info: dict[str, Any]) -> None:
        self._mppools_loan: Loan | None = loan
        self._mppools_renew = renew
        self._mppools_borrowed_at = time.monotonic()
        super().__init__(**{**info, "transport": borrowed_transport(real)})  # type: ignore[no-untyped-call]

    def _mppools_next_loan(self) -> Loan:
        loan, self._mppools_loan = self._mppools_loan, None
        if loan is None or not loan.alive:
            loan = self._mppools_renew()
            if loan is None:
                raise LoanLostError(f"no process of the budget had an idle connection to "
                                    f"lend (pid {os.getpid()} asked)")
        # what the lender's connection declared already needs no declaring again
        self.declared_entities.update(loan.known)
        loan.declared = self.declared_entities
        return loan

    def _mppools_relend(self) -> Loan | None:
        """A new loan in place of one its lender ended between two calls (or None)."""
        loan = self._mppools_renew()
        if loan is None:
            return None
        self.declared_entities.clear()  # another connection: kombu's cache starts afresh
        self.declared_entities.update(loan.known)
        loan.declared = self.declared_entities
        self._connection = loan
        return loan

    def _do_close_self(self) -> None:
        # end the loan before kombu clears the declaration cache: what this loan declared
        # goes back with it
        loan = self._connection
        if isinstance(loan, Loan):
            loan.end()
        super()._do_close_self()  # type: ignore[no-untyped-call]

    def __repr__(self) -> str:
        return f"<BorrowedConnection {self.as_uri()} at {id(self):#x}>"

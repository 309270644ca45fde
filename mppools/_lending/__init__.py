"""Lending: a process with no slot publishes through another process's idle connection.

Slots are connections: when every slot is held and a process needs to publish, the only
other way is to wait for a hand-over, which costs the next holder a broker set-up (TCP, TLS,
login) and, under request-shaped load, a wait behind other turns. Most of the time some of
those held connections sit idle in their pools (a gunicorn worker between two requests).
Lending uses them where they are: a waiting producer pool asks a process whose slot is idle
to publish for it; the connection, its slot and the cap stay where they were.

* :mod:`._wire`: the frames and the peer check;
* :mod:`._lender`: the lending socket and the loan threads of a process that holds slots;
* :mod:`._borrow`: the borrowed connection (a kombu ``Connection`` whose transport forwards
  publishes and declarations) and the request for a loan.

See ``docs/concepts.md`` ("Lending") for what a loan carries and what it does not.
"""

from __future__ import annotations

from typing import Any

from mppools._limiter._base import LoanOffer

from ._borrow import (
    MIN_LEND_GAP,
    MIN_LEND_IDLE,
    MIN_LEND_IDLE_GAP,
    BorrowedConnection,
    Loan,
    ask,
    claim,
    decline,
)
from ._lender import Lender, key_digest, lendable, lender, pool_key

__all__ = [
    "MIN_LEND_GAP",
    "MIN_LEND_IDLE",
    "MIN_LEND_IDLE_GAP",
    "Borrowed",
    "BorrowedConnection",
    "Borrower",
    "Lender",
    "key_digest",
    "lendable",
    "lender",
    "pool_key",
]

#: lenders one attempt asks at most (oldest idle first)
MAX_ASKED = 3


class Borrowed(Exception):
    """Raised out of a slot wait by :class:`Borrower` when a loan came through: the wait
    gives back anything granted meanwhile and drops its record as for any exception."""

    def __init__(self, connection: BorrowedConnection) -> None:
        super().__init__("borrowed")
        self.connection = connection


class Borrower:
    """The ``on_wait`` hook of a producer pool's slot wait (a
    :class:`~mppools._limiter._base.WaitHook`): borrow an idle connection to the same broker
    from a process of the budget, before waiting if nobody waits, or when offered one."""

    def __init__(self, pool: Any, limiter: Any) -> None:
        self._pool = pool
        self._limiter = limiter
        self._key = pool_key(pool)
        self.wants = key_digest(self._key)

    def try_loan(self) -> Loan | None:
        """A loan from one of the budget's processes with an idle slot, or None."""
        for address in self._limiter.lenders()[:MAX_ASKED]:
            loan = ask(address, self._key)
            if loan is not None:
                return loan
        return None

    def __call__(self, offer: LoanOffer | None) -> None:
        if offer is not None:
            loan = claim(offer.address, offer.ticket, self._key)
        elif self._limiter.waiting_flag():
            # others wait already: idle connections go to them in order (offers), not to
            # whoever asks first
            return
        else:
            loan = self.try_loan()
        if loan is None:
            return
        pool = self._pool
        conn = BorrowedConnection(loan, self.try_loan, pool.connection.get_transport_cls(),
                                  dict(pool.connection._info(resolve=False)))
        raise Borrowed(conn)

    def decline(self, offer: LoanOffer) -> None:
        decline(offer.address, offer.ticket)

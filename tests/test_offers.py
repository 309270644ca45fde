"""Who an idle connection is offered to (lending): the head of the waiter queue only.

The shared table's rule (``Table.oldest_to_offer``), on a table over a scratch buffer; the
processes that use it are in tests/test_lending.py.
"""

from __future__ import annotations

import pytest

from mppools._slots import Table, WaiterState, segment_size

pytestmark = pytest.mark.timeout(10)

KEY, OTHER_KEY = 0x1234, 0x5678
LENDER, A, B, C = 1, 2, 3, 4  # owners


def _table() -> Table:
    return Table(memoryview(bytearray(segment_size(4, 4))), 4, 4)


def _wait(t: Table, index: int, ticket: int, owner: int, wants: int = KEY) -> None:
    t.write_waiter(index, WaiterState.WAITING, 100 + index, 1, 1000 + index, ticket, 0, wants,
                   owner)


def test_the_oldest_waiter_is_offered_then_the_next() -> None:
    t = _table()
    _wait(t, 0, ticket=7, owner=A)
    _wait(t, 1, ticket=3, owner=B)  # came first
    assert t.oldest_to_offer(KEY, LENDER) == 1
    t.set_offered(1, True)
    assert t.read_waiter(1).offered and t.read_waiter(1).state == WaiterState.WAITING
    assert t.oldest_to_offer(KEY, LENDER) == 0  # one offer per waiter at a time
    t.set_offered(0, True)
    assert t.oldest_to_offer(KEY, LENDER) == -2  # everyone has one out: keep it idle
    t.set_offered(1, False)  # its claim found the offer gone: it may be offered again
    assert t.oldest_to_offer(KEY, LENDER) == 1
    # the marks live in the records only: the state map still agrees with them
    assert t.waiter_states() == t.waiter_record_states()


def test_a_head_that_cannot_borrow_keeps_its_place() -> None:
    """A waiter that cannot borrow this connection (another broker, lending off, a raw
    connection, the lender itself) at the head means a hand-over (-1), even with borrowers
    behind it: FIFO across kinds of waiters."""
    t = _table()
    _wait(t, 0, ticket=5, owner=A)
    for wants, owner in ((0, B), (OTHER_KEY, B), (KEY, LENDER)):
        _wait(t, 1, ticket=2, owner=owner, wants=wants)
        assert t.oldest_to_offer(KEY, LENDER) == -1, (wants, owner)
    t.clear_waiter(1)
    assert t.oldest_to_offer(KEY, LENDER) == 0
    assert _table().oldest_to_offer(KEY, LENDER) == -2  # nobody waits


def test_a_grant_overwrites_the_offer_mark() -> None:
    t = _table()
    _wait(t, 0, ticket=1, owner=A)
    t.set_offered(0, True)
    t.write_waiter(0, WaiterState.GRANTED, 100, 1, 1000, 1, 2, 99, A)
    w = t.read_waiter(0)
    assert not w.offered and w.wants == 0 and (w.granted_index, w.granted_token) == (2, 99)
    t.set_offered(0, True)  # not WAITING: no-op, the grant stays intact
    assert t.read_waiter(0).granted_index == 2

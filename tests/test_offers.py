"""Who an idle connection is offered to (lending): the head of the waiter queue only; and
which connections are not offered (a tight loop: its use period).

The shared table's rule (``Table.oldest_to_offer``), on a table over a scratch buffer; the
processes that use it are in tests/test_lending.py.
"""

from __future__ import annotations

from typing import Any

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


def _uses(starts_and_ends: list[tuple[float, float]]) -> float:
    """The use period a connection measures (LimitedConnection._mppools_note_use) for uses
    that each began and ended under pressure at these times (seconds)."""
    from types import SimpleNamespace

    from mppools.pools import LimitedConnection

    conn: Any = SimpleNamespace(_mppools_gap=-1.0, _mppools_gaps=(),
                                _mppools_began_before=float("-inf"),
                                _mppools_acquired_at=float("-inf"))
    for began, _ended in starts_and_ends:
        conn._mppools_acquired_at = began  # stamped at the acquire
        LimitedConnection._mppools_note_use(conn)  # at the release
        LimitedConnection._mppools_note_use(conn)  # a release without a stamp counts nothing
    return float(conn._mppools_gap)


def test_the_use_period_runs_start_to_start_and_takes_the_median_of_three() -> None:
    from mppools._lending import MIN_LEND_GAP

    assert _uses([(0.0, 0.001)]) == -1.0  # one use: no period yet
    # a tight loop (a use every 0.3 ms), descheduled once for 5 ms: still a tight loop
    tight = [(0.0, 0.0002), (0.0003, 0.0005), (0.0053, 0.0055), (0.0056, 0.0058)]
    assert _uses(tight) == pytest.approx(0.0003) and _uses(tight) < MIN_LEND_GAP
    # a worker with requests queued: released and reused 0.1 ms later, but once per request
    # (every 10 ms): not a tight loop, though its release-to-acquire gap is short
    queued = [(0.0, 0.0099), (0.0100, 0.0199), (0.0200, 0.0299), (0.0300, 0.0399)]
    assert _uses(queued) == pytest.approx(0.01) and _uses(queued) >= MIN_LEND_GAP

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


def _measured(starts_and_ends: list[tuple[float, float]]) -> Any:
    """A connection after uses that each began and ended under pressure at these times
    (seconds), measured as LimitedConnection._mppools_note_use does at each release."""
    from types import SimpleNamespace

    from mppools.pools import LimitedConnection

    conn: Any = SimpleNamespace(_mppools_gap=-1.0, _mppools_gaps=(),
                                _mppools_idle_gap=-1.0, _mppools_idle_gaps=(),
                                _mppools_began_before=float("-inf"),
                                _mppools_acquired_at=float("-inf"),
                                _mppools_idle_since=None, _mppools_out_since=None,
                                _mppools_taken_back=0, _mppools_claimed=0,
                                _mppools_pressed_at=float("-inf"),
                                _mppools_pressed_last=float("-inf"),
                                _mppools_pressed_uses=0, _mppools_uses=0)
    for began, ended in starts_and_ends:
        conn._mppools_uses += 1
        conn._mppools_acquired_at = began  # stamped at the acquire
        LimitedConnection._mppools_note_use(conn)  # at the release
        LimitedConnection._mppools_note_use(conn)  # a release without a stamp counts nothing
        conn._mppools_idle_since = ended  # back in its pool
    return conn


def _uses(starts_and_ends: list[tuple[float, float]]) -> float:
    """The use period (start to start) measured for these uses."""
    return float(_measured(starts_and_ends)._mppools_gap)


def _tight(starts_and_ends: list[tuple[float, float]]) -> bool | None:
    from mppools.pools import LimitedConnection

    return LimitedConnection._mppools_tight(_measured(starts_and_ends))


def test_the_use_period_runs_start_to_start_and_takes_the_median_of_three() -> None:
    from mppools._lending import MIN_LEND_GAP

    assert _uses([(0.0, 0.001)]) == -1.0  # one use: no period yet
    assert _tight([(0.0, 0.001)]) is None  # not measured: not known either way
    # a tight loop (a use every 0.3 ms), descheduled once for 5 ms: still a tight loop
    tight = [(0.0, 0.0002), (0.0003, 0.0005), (0.0053, 0.0055), (0.0056, 0.0058)]
    assert _uses(tight) == pytest.approx(0.0003) and _uses(tight) < MIN_LEND_GAP
    assert _tight(tight)
    # a worker between requests: a use every 10 ms, 9.5 ms of it in its pool: lendable
    requests = [(0.0, 0.0005), (0.0100, 0.0105), (0.0200, 0.0205), (0.0300, 0.0305)]
    assert _uses(requests) == pytest.approx(0.01) and _tight(requests) is False


def test_the_last_three_gaps_and_their_median_match_a_sort() -> None:
    """The release under pressure keeps the last three gaps and their median without a
    sort (it runs at every release while others wait): the same as sorting them, for every
    order and with ties, with one or two gaps (the smaller of two)."""
    import itertools

    from mppools.pools import _last_three

    values = (0.001, 0.002, 0.003, 0.002)
    for k in range(4):
        for before in itertools.permutations(values[:k]):
            for new in values:
                kept = (*before[-2:], new)
                assert _last_three(tuple(before), new) == (
                    kept, sorted(kept)[(len(kept) - 1) // 2]), (before, new)


def test_a_connection_back_in_use_within_moments_of_its_release_is_not_lent() -> None:
    """Regression (figure 8, 8 tight loops on 4 slots, 2 cores): descheduled often, the
    loops' uses came every 3-10 ms from start to start, so they passed for lendable; each
    release offered the connection to a waiter, and the loop took it back before the waiter
    could claim it (a wasted offer, about a millisecond of two processes' CPU): 2,105
    connections offered in a 3 s round, 1,066-1,419 msg/s against 2,400-3,040 after. The
    time it sits in its pool between two uses tells them apart: microseconds for a loop,
    the rest of a request for a worker. A connection held for a whole request and reused
    0.1 ms after its release is not lent either: no waiter could claim it in that time."""
    from mppools._lending import MIN_LEND_GAP, MIN_LEND_IDLE_GAP

    # a tight loop descheduled while it held its connection: a use every 5 ms, back for it
    # 50 us after each release
    loop = [(0.0, 0.00495), (0.005, 0.00995), (0.010, 0.01495), (0.015, 0.01995)]
    assert _uses(loop) >= MIN_LEND_GAP
    assert _measured(loop)._mppools_idle_gap < MIN_LEND_IDLE_GAP
    assert _tight(loop)
    # a request-scoped producer: held 9.9 ms per request, reused 0.1 ms after its release
    queued = [(0.0, 0.0099), (0.0100, 0.0199), (0.0200, 0.0299), (0.0300, 0.0399)]
    assert _uses(queued) == pytest.approx(0.01) and _tight(queued)
    # taken back from an offer: measured from when it was taken for the offer
    conn = _measured(loop[:3])
    from mppools.pools import LimitedConnection

    conn._mppools_out_since, conn._mppools_idle_since = conn._mppools_idle_since, None
    conn._mppools_acquired_at = conn._mppools_out_since + 0.00005
    gaps = conn._mppools_idle_gaps
    LimitedConnection._mppools_note_use(conn)
    assert len(conn._mppools_idle_gaps) == min(len(gaps) + 1, 3)
    assert conn._mppools_idle_gaps[-1] == pytest.approx(0.00005)


def test_a_connection_whose_offers_its_own_process_takes_back_is_not_lent() -> None:
    """Regression (figure 8 on RabbitMQ, 8 tight loops on 4 slots): a loop's connection sits
    in its pool for most of the loop's cycle (the producer's acquire and release cost as
    much as the publish), so a descheduled loop can pass for lendable by both measures; its
    offers were taken back by the loop before the waiters could claim them (773 offers per
    3 s round, 2,648 msg/s; now 128 and 3,766). Two offers taken back, and more than were
    claimed, in a turn: not lent for the rest of it."""
    requests = [(0.0, 0.0005), (0.0100, 0.0105), (0.0200, 0.0205), (0.0300, 0.0305)]
    conn = _measured(requests)
    from mppools.pools import LimitedConnection

    assert LimitedConnection._mppools_tight(conn) is False
    conn._mppools_taken_back = 1
    assert LimitedConnection._mppools_tight(conn) is False  # once may be bad luck
    conn._mppools_taken_back = 2
    assert LimitedConnection._mppools_tight(conn) is True
    conn._mppools_claimed = 5  # a worker between requests: most offers are claimed
    assert LimitedConnection._mppools_tight(conn) is False
    fresh = _measured([])  # not measured yet, but wasting its offers: not lent either
    fresh._mppools_taken_back = 2
    assert LimitedConnection._mppools_tight(fresh) is True

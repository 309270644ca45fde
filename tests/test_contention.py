"""Under contention the pool stays a pool: hand-overs per hold quantum, not per release."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from kombu import Connection

import mppools
from mppools._limiter._base import Limiter


def _start_waiter(limiter: Limiter, timeout: float) -> tuple[threading.Thread, list[str]]:
    """A thread that waits for a slot (and gives it back); returns once it is queued. Its
    outcome list gets "got" or "timed out"."""
    outcome: list[str] = []

    def wait() -> None:
        try:
            limiter.release(limiter.acquire(timeout=timeout))
            outcome.append("got")
        except mppools.LimitExceeded:
            outcome.append("timed out")

    waiter = threading.Thread(target=wait)
    waiter.start()
    deadline = time.monotonic() + 10
    while limiter.stats().waiting < 1 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert limiter.stats().waiting == 1
    return waiter, outcome


def _use_until_handed_on(pool: Any, conn: Any) -> int:
    """Release and take ``conn`` back from ``pool`` in a tight loop until a release hands
    its slot on (within 20 s); returns the releases made."""
    uses = 0
    deadline = time.monotonic() + 20
    while conn._mppools_slot is not None and time.monotonic() < deadline:
        conn.release()
        uses += 1
        if conn._mppools_slot is None:
            break
        conn = pool.acquire(block=True, timeout=5)
    return uses


@pytest.mark.parametrize("quantum", [0.0, 60.0])
def test_a_busy_connection_keeps_its_slot_for_its_quantum(
    budget_name: str, quantum: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """limit 1, a waiter, and a holder that keeps releasing and re-acquiring its pooled
    connection: within its quantum every release keeps the connection (no reconnect, the
    waiter times out); with quantum 0 the first release hands it on."""
    from mppools import _keeper

    # only the quantum rule is under test: the idle rule must not see the gaps between uses
    monkeypatch.setattr(_keeper, "IDLE_GRACE", 3600.0)
    monkeypatch.setattr(_keeper, "MAX_IDLE_GRACE", 3600.0)
    # and the whole cap: a cheap memory:// set-up would fit a quantum of milliseconds
    monkeypatch.setattr(mppools.pools, "QUANTUM_FLOOR", 3600.0)
    limiter = mppools.configure(limit=1, name=budget_name, hold_quantum=quantum,
                                idle_timeout=None)
    pool = mppools.connections[Connection("memory://")]
    conn = pool.acquire(block=True, timeout=5)
    conn.connect()
    first = conn._connection
    waiter, outcome = _start_waiter(limiter, timeout=1.5)
    deadline = time.monotonic() + 10
    reconnected = 0
    while waiter.is_alive() and time.monotonic() < deadline:
        conn.release()
        conn = pool.acquire(block=True, timeout=5)
        conn.connect()
        reconnected += conn._connection is not first
        first = conn._connection
    conn.release()
    waiter.join(10)
    if quantum:
        assert (outcome, reconnected) == (["timed out"], 0)
    else:
        assert outcome == ["got"]


def test_an_idle_connection_yields_at_once_whatever_the_quantum(budget_name: str) -> None:
    """A connection sitting idle in its pool is handed on when someone waits, even while its
    hold quantum runs (here 60 s: only the idle rule can hand it on before the timeout)."""
    limiter = mppools.configure(limit=1, name=budget_name, hold_quantum=60.0,
                                idle_timeout=None)
    with mppools.connections[Connection("memory://")].acquire(block=True, timeout=5) as c:
        c.connect()
    assert limiter.stats().in_use == 1  # idle in the pool, holding the slot
    assert limiter.stats().extra["yields_total"] == 0
    slot = limiter.acquire(timeout=20)
    limiter.release(slot)
    assert limiter.stats().in_use == 0
    # counted budget-wide (the keeper counts right after the close that handed it on)
    deadline = time.monotonic() + 10
    while limiter.stats().extra["yields_total"] == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert limiter.stats().extra["yields_total"] == 1


def test_hold_quantum_is_validated(budget_name: str) -> None:
    for bad in (-1, float("nan"), "1", True, 61.0, None):
        with pytest.raises(mppools.ConfigurationError, match="hold_quantum"):
            mppools.configure(limit=1, name=budget_name, hold_quantum=bad)  # type: ignore[arg-type]
    assert not mppools.pools._config.current()


def test_the_keeper_survives_a_deferred_request_that_is_already_due(budget_name: str) -> None:
    """A yield request looked at again "now" must not turn the keeper's socket non-blocking
    (settimeout(0)) and end the keeper thread: idle yield would be dead for the process."""
    from mppools._keeper import keeper

    mppools.configure(limit=2, name=budget_name, idle_timeout=None)
    with mppools.connections[Connection("memory://")].acquire(block=True, timeout=5) as c:
        c.connect()
    k = keeper()
    thread = k._thread
    assert thread is not None and thread.is_alive()
    k._deferred[2**62] = 0.0  # due long ago, for a token nobody holds
    assert k._sock is not None
    k._sock.getsockname()  # the keeper's own address
    import socket as _socket

    with _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM) as s:
        s.sendto(b"wake", k._sock.getsockname())  # not a request: just a turn of its loop
    deadline = time.monotonic() + 5
    while k._deferred and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)  # a dead thread would be dead by now
    assert thread.is_alive(), "the keeper thread ended"


def test_the_quantum_fits_what_a_hand_over_costs() -> None:
    """QUANTUM_PER_SETUP times the budget's hand-over cost, at least QUANTUM_FLOOR, at most
    the budget's hold_quantum (the cap while the cost is unknown); hold_quantum 0 hands on
    at once."""
    from mppools._limiter.memory import MemoryLimiter
    from mppools.pools import QUANTUM_FLOOR, QUANTUM_PER_SETUP, LimitedConnection

    conn = LimitedConnection.__new__(LimitedConnection)
    for cap, cost, expected in [
        (0.5, 0.0, 0.5),  # unknown yet: the cap
        (0.5, 0.0001, QUANTUM_FLOOR),  # a local broker: short turns, short fair waits
        (0.5, 0.005, QUANTUM_PER_SETUP * 0.005),
        (0.5, 0.2, 0.5),  # an expensive hand-over: capped by hold_quantum
        (0.0, 0.2, 0.0),
    ]:
        limiter = MemoryLimiter("fit", limit=1, capacity=1, acquire_timeout=None,
                                idle_timeout=None, hold_quantum=cap)
        if cost:
            limiter.note_handover_cost(cost)
        conn._mppools_quantum = cap
        assert conn._fitted_quantum(limiter) == pytest.approx(expected)


def test_the_use_rate_counts_only_the_uses_made_while_others_wait(
    budget_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A turn's use rate is that of its uses that began while someone waited: a holder that
    sat idle with its slot before anyone came (here 0.5 s) does not fold that stretch into
    the budget's estimate (it did: its uses divided by all the time since its first use, and
    every turn after it was that much shorter in uses)."""
    from mppools import _keeper

    monkeypatch.setattr(_keeper, "IDLE_GRACE", 3600.0)  # only the turn's rule hands it on
    monkeypatch.setattr(_keeper, "MAX_IDLE_GRACE", 3600.0)
    limiter = mppools.configure(limit=1, name=budget_name, hold_quantum=5.0,
                                idle_timeout=None)
    limiter.note_handover_cost(1.0)  # quantum 5 s
    limiter.note_use_rate(40.0)  # turns of 40 x 5 = 200 uses
    pool = mppools.connections[Connection("memory://")]
    conn = pool.acquire(block=True, timeout=5)
    conn.connect()
    conn.release()  # its first use: nobody waits
    time.sleep(0.5)  # held, idle, unwanted
    conn = pool.acquire(block=True, timeout=5)
    waiter, outcome = _start_waiter(limiter, timeout=30)
    began = time.monotonic()
    uses = _use_until_handed_on(pool, conn)
    ended = time.monotonic()
    waiter.join(30)
    assert outcome == ["got"]
    sample = 40.0 + (limiter.use_rate() - 40.0) * 8  # the running average moves by 1/8
    # at least the loop's own rate (its uses after the first, over less than its time);
    # the whole hold (0.5 s more) would give less than uses / 0.5
    assert sample >= (uses - 2) / (ended - began)
    assert sample > 2 * uses / 0.5


def test_the_hand_over_cost_is_a_running_average(budget_name: str) -> None:
    limiter = mppools.configure(limit=1, name=budget_name)
    assert limiter.handover_cost() == 0.0
    limiter.note_handover_cost(0.008)
    assert limiter.handover_cost() == pytest.approx(0.008)
    limiter.note_handover_cost(0.016)
    assert limiter.handover_cost() == pytest.approx(0.009)
    limiter.note_handover_cost(float("nan"))  # refused, like anything outside [0, 60)
    assert limiter.handover_cost() == pytest.approx(0.009)


def test_a_connection_that_goes_idle_while_someone_waits_is_handed_on_unasked(
    budget_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The waiter asked for yields while the only connection was busy (so asked nobody) and
    sleeps on a 60 s slice; the holder then releases it to its pool inside its quantum. The
    holder's own keeper must hand it on once it has been idle IDLE_GRACE, without a request
    (a gunicorn worker going back to accept() after its request)."""
    from mppools._limiter.posix import _wait

    monkeypatch.setattr(_wait, "SLICE", 60.0)
    monkeypatch.setattr(mppools.pools, "QUANTUM_FLOOR", 3600.0)
    limiter = mppools.configure(limit=1, name=budget_name, hold_quantum=60.0,
                                idle_timeout=None)
    pool = mppools.connections[Connection("memory://")]
    conn = pool.acquire(block=True, timeout=5)
    conn.connect()
    waiter, outcome = _start_waiter(limiter, timeout=20)
    conn.release()  # idle in its pool now, its quantum (an hour) far from over
    waiter.join(30)
    assert outcome == ["got"]


def test_a_tight_loops_connection_is_looked_at_less_often_while_the_loop_runs(
    budget_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (figure 8 on RabbitMQ): while someone waited, the keeper looked at a
    connection its own process used in a tight loop once every grace (2 ms here) for as long
    as the loop ran, and every look took the GIL from the busy thread: about 8 us more CPU
    per publish. Now each look that finds it in use doubles the interval to the next, up to
    MAX_TIGHT_LOOK. Once the loop stops, the keeper still hands the connection on unasked
    (the waiter sleeps on a 60 s slice and sends no request meanwhile)."""
    import math

    from mppools._keeper import IDLE_GRACE, MAX_TIGHT_LOOK, keeper
    from mppools._limiter.posix import _wait

    monkeypatch.setattr(_wait, "SLICE", 60.0)
    monkeypatch.setattr(mppools.pools, "QUANTUM_FLOOR", 3600.0)  # no turn ends meanwhile
    limiter = mppools.configure(limit=1, name=budget_name, hold_quantum=60.0,
                                idle_timeout=None)
    pool = mppools.connections[Connection("memory://")]
    with pool.acquire(block=True, timeout=5) as conn:
        conn.connect()
    k = keeper()
    looks: list[int] = []
    look = k._yield_token

    def counted(token: int) -> None:
        looks.append(token)
        look(token)

    monkeypatch.setattr(k, "_yield_token", counted)
    waiter, outcome = _start_waiter(limiter, timeout=20)
    started = time.monotonic()
    uses = 0
    while time.monotonic() - started < 1.0 and uses < 1_000_000:
        with pool.acquire(block=True, timeout=5) as conn:
            conn.connect()
        uses += 1
    ran = time.monotonic() - started
    seen = len(looks)
    # a look for each MAX_TIGHT_LOOK, the doublings up to it, and a few more should the
    # scheduler stall the loop for a grace (a hand-over, after which the backoff restarts)
    bound = ran / MAX_TIGHT_LOOK + math.log2(MAX_TIGHT_LOOK / IDLE_GRACE) + 10
    waiter.join(30)
    assert outcome == ["got"]
    assert seen <= bound, f"{seen} looks in {ran:.2f} s of a tight loop ({uses} uses)"


def test_the_idle_grace_follows_the_hand_over_cost(budget_name: str) -> None:
    """A connection reused more often than a hand-over costs is not worth handing on."""
    from mppools import _keeper

    limiter = mppools.configure(limit=1, name=budget_name)
    assert _keeper.idle_grace() == _keeper.IDLE_GRACE  # cost unknown yet
    limiter.note_handover_cost(0.02)
    assert _keeper.idle_grace() == pytest.approx(0.02)
    for _ in range(200):
        limiter.note_handover_cost(5.0)
    assert _keeper.idle_grace() == _keeper.MAX_IDLE_GRACE


def test_the_use_rate_is_a_running_average(budget_name: str) -> None:
    limiter = mppools.configure(limit=1, name=budget_name)
    assert limiter.use_rate() == 0.0
    limiter.note_use_rate(800.0)
    assert limiter.use_rate() == pytest.approx(800.0)
    limiter.note_use_rate(1600.0)
    assert limiter.use_rate() == pytest.approx(900.0)
    for bad in (0.0, -1.0, float("nan"), float("inf"), 1e12):
        limiter.note_use_rate(bad)
    assert limiter.use_rate() == pytest.approx(900.0)
    # shared by every process of the budget: another handle reads the same estimate
    from mppools.cli._common import open_budget

    with open_budget(budget_name) as other:
        assert other.use_rate() == pytest.approx(900.0)


@pytest.mark.parametrize("rate", [10.0, 40.0])
def test_a_turn_is_counted_in_uses_once_the_use_rate_is_known(
    budget_name: str, rate: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fair turns: with the budget's use rate known, a busy connection hands its slot on
    after rate x quantum uses while someone waits, however fast its process runs (here a
    tight loop, thousands of uses per second: a quantum in time, 5 s, would keep it for
    all of them), and the turn's own rate goes into the budget's estimate."""
    from mppools import _keeper

    monkeypatch.setattr(_keeper, "IDLE_GRACE", 3600.0)  # the gaps between uses are not idle
    monkeypatch.setattr(_keeper, "MAX_IDLE_GRACE", 3600.0)
    limiter = mppools.configure(limit=1, name=budget_name, hold_quantum=5.0,
                                idle_timeout=None)
    limiter.note_handover_cost(1.0)  # fitted quantum: min(5 s, 24 x 1 s) = 5 s
    limiter.note_use_rate(rate)  # a quantum of 5 s x rate uses
    expected = round(rate * 5.0)
    pool = mppools.connections[Connection("memory://")]
    conn = pool.acquire(block=True, timeout=5)
    conn.connect()
    waiter, outcome = _start_waiter(limiter, timeout=30)
    uses = _use_until_handed_on(pool, conn)
    waiter.join(30)
    assert outcome == ["got"]
    assert uses == expected
    # the turn ran far faster than `rate`: the estimate moved up
    assert limiter.use_rate() > rate


def test_a_slow_turn_still_ends_in_time(budget_name: str, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    """A holder slower than the budget's use rate does not keep its slot for longer than
    TURN_TIME_CAP x its quantum."""
    from mppools import _keeper
    from mppools.pools import TURN_TIME_CAP

    monkeypatch.setattr(_keeper, "IDLE_GRACE", 3600.0)
    monkeypatch.setattr(_keeper, "MAX_IDLE_GRACE", 3600.0)
    monkeypatch.setattr(mppools.pools, "QUANTUM_FLOOR", 0.2)
    limiter = mppools.configure(limit=1, name=budget_name, hold_quantum=0.2,
                                idle_timeout=None)
    limiter.note_handover_cost(0.0001)  # fitted: the floor, 0.2 s
    limiter.note_use_rate(1e6)  # a million uses per quantum: never reached here
    pool = mppools.connections[Connection("memory://")]
    conn = pool.acquire(block=True, timeout=5)
    taken = conn._mppools_taken_at
    conn.connect()
    got_at: list[float] = []

    def wait() -> None:
        slot = limiter.acquire(timeout=30)
        got_at.append(time.monotonic())
        limiter.release(slot)

    waiter = threading.Thread(target=wait)
    waiter.start()
    deadline = time.monotonic() + 10
    while limiter.stats().waiting < 1 and time.monotonic() < deadline:
        time.sleep(0.001)
    deadline = time.monotonic() + 20
    while not got_at and time.monotonic() < deadline:
        conn.release()  # handed on here, or by the keeper while it sits idle below
        time.sleep(0.002)
        conn = pool.acquire(block=True, timeout=5)
    conn.release()
    waiter.join(30)
    assert got_at, "the slow holder kept its slot"
    assert 0.2 * TURN_TIME_CAP <= got_at[0] - taken < 20


def test_only_the_head_of_the_queue_audits_every_slice(
    budget_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An audit is for the whole budget; with many waiters behind few slots, every waiter
    auditing every SLICE cost the host the CPU of many publishes a second (6 waiters: 6.1 ms
    of CPU per waiter-second, against 3.5 ms). The oldest waiter sleeps SLICE at most, the
    others BEHIND_SLICES times that (a grant, an offer or a holder's death still wakes them
    at once)."""
    from mppools._limiter.posix import _wait

    limiter = mppools.configure(limit=1, name=budget_name, idle_timeout=None)
    held = limiter.acquire(timeout=5)
    slices: dict[int, list[float]] = {}
    sleep = _wait.sleep

    def recorded(sock, fds, timeout):  # type: ignore[no-untyped-def]
        slices.setdefault(threading.get_ident(), []).append(timeout)
        return sleep(sock, fds, timeout)

    monkeypatch.setattr(_wait, "sleep", recorded)
    try:
        head, head_outcome = _start_waiter(limiter, timeout=1.5)
        outcome: list[str] = []

        def behind() -> None:
            try:
                limiter.acquire(timeout=1.5)
                outcome.append("got")
            except mppools.LimitExceeded:
                outcome.append("timed out")

        second = threading.Thread(target=behind)
        second.start()
        head.join(10)
        second.join(10)
    finally:
        limiter.release(held)
    assert head_outcome == outcome == ["timed out"]
    assert head.ident is not None and second.ident is not None
    assert max(slices[head.ident]) <= _wait.SLICE
    assert max(slices[second.ident]) == pytest.approx(_wait.SLICE * _wait.BEHIND_SLICES)


def _turn(pool: object, limiter: Limiter, pause_between: float = 0.0,
          stall_at_end: bool = False) -> int:
    """One turn of a holder while a waiter queues: acquire, use in a loop (``pause_between``
    seconds between uses), and, with ``stall_at_end``, hold the last use until the turn's time
    is out; returns how many uses the turn carried before its slot went to the waiter (at a
    release, or by the keeper while the connection sat in its pool)."""
    conn = pool.acquire(block=True, timeout=5)  # type: ignore[attr-defined]
    conn.connect()
    waiter, outcome = _start_waiter(limiter, timeout=30)
    uses = 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if stall_at_end and uses == 50:
            while time.monotonic() <= conn._mppools_hand_on_at:  # bounded: a turn's cap
                time.sleep(0.01)
        conn.release()
        uses += 1
        if conn._mppools_slot is None:
            break
        if pause_between:
            time.sleep(pause_between)
        if outcome or conn._mppools_slot is None:  # the keeper handed it on meanwhile
            break
        conn = pool.acquire(block=True, timeout=5)  # type: ignore[attr-defined]
    # the loop ends only after a release: a connection left out here (taken again just
    # before the waiter said "got") would fill the pool's limit of 1 for the next turn
    waiter.join(30)
    assert outcome == ["got"]
    return uses


def _short_turn_budget(budget_name: str, monkeypatch: pytest.MonkeyPatch) -> Limiter:
    """limit 1, a 0.2 s quantum, a use rate of 1,000/s known: turns of 200 uses."""
    from mppools import _keeper

    monkeypatch.setattr(_keeper, "IDLE_GRACE", 3600.0)  # the gaps between uses are not idle
    monkeypatch.setattr(_keeper, "MAX_IDLE_GRACE", 3600.0)
    monkeypatch.setattr(mppools.pools, "QUANTUM_FLOOR", 0.2)
    limiter = mppools.configure(limit=1, name=budget_name, hold_quantum=0.2,
                                idle_timeout=None)
    limiter.note_handover_cost(0.0001)  # fitted: the floor, 0.2 s
    limiter.note_use_rate(1000.0)
    return limiter


def test_a_tight_loops_turn_cut_short_by_time_is_made_up_in_its_next(
    budget_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fair turns over time: a tight loop whose turn ran out of time before it carried its
    uses (its process ran less: here one use stalls past the turn's time cap) gets what it
    fell short of added to its next turn, so its two turns carry what two full ones do."""
    limiter = _short_turn_budget(budget_name, monkeypatch)
    pool = mppools.connections[Connection("memory://")]
    first = _turn(pool, limiter, stall_at_end=True)
    assert first == 51  # handed on at the stalled use's release, its time out
    owed = 200 - first
    turn = max(2, round(limiter.use_rate() * 0.2))  # the estimate moved with the first turn
    second = _turn(pool, limiter)
    assert second == turn + min(owed, turn)


def test_a_turn_cut_short_when_not_in_a_tight_loop_owes_nothing(
    budget_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A holder that used its connection less often than a tight loop (a worker between
    requests) was not held back: its short turn is not made up."""
    limiter = _short_turn_budget(budget_name, monkeypatch)
    pool = mppools.connections[Connection("memory://")]
    first = _turn(pool, limiter, pause_between=0.01)
    assert 2 <= first < 200  # handed on by time: 10 ms apart, 0.3 s at most
    assert pool._mppools_owed == 0
    turn = max(2, round(limiter.use_rate() * 0.2))
    assert _turn(pool, limiter) == turn


def test_a_forked_child_owes_nothing_of_its_parents_turns(
    budget_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a pool's last turn fell short of is the parent's: a forked child's pool starts
    its turns owing nothing."""
    from forkutil import run_in_child

    limiter = _short_turn_budget(budget_name, monkeypatch)
    pool = mppools.connections[Connection("memory://")]
    _turn(pool, limiter, stall_at_end=True)
    assert pool._mppools_owed > 0
    assert run_in_child(lambda: pool._mppools_owed) == 0

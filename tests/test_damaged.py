"""A damaged segment fails closed (issue 8, item 7).

Garbage written into a live budget's segment (an unknown state byte, a header limit above
the capacity, a wiped state map, wiped records) must never let limit + 1 holders in, never
raise anything but a clear :class:`DamagedSegmentError`, and is repaired where the truth can
be read: the holders' tokens. ``mppools status`` lists every budget on the host and flags a
broken one instead of crashing.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
from forkutil import Worker

import mppools
from mppools._errors import (
    DamagedSegmentError,
    IncompatibleSegmentError,
    LimitExceeded,
    MppoolsError,
)
from mppools._limiter.posix import PosixLimiter, exists
from mppools._slots import (
    HEADER_SIZE,
    LAYOUT_VERSION,
    LIMIT_AT,
    MAGIC,
    SLOT_SIZE,
    Table,
    segment_size,
)
from mppools.cli import main

pytestmark = pytest.mark.timeout(90)

_U32 = struct.Struct("<I")
# the offset of ``since`` (a double) inside a slot record: state, pad, pid, start, token
_SINCE_AT = struct.calcsize("<B3xIQQ")


# touching the segment from outside, as a stray write or a broken program would -------------
def _path(name: str) -> str:
    return f"/dev/shm/mppools.{name}"


def _poke(name: str, offset: int, data: bytes) -> None:
    fd = os.open(_path(name), os.O_RDWR)
    try:
        with mmap.mmap(fd, os.fstat(fd).st_size) as m:
            m[offset : offset + len(data)] = data
    finally:
        os.close(fd)


def _peek(name: str, offset: int, length: int) -> bytes:
    with open(_path(name), "rb") as f:
        f.seek(offset)
        return f.read(length)


def _remove(name: str) -> None:
    """Remove a budget made by a test, whatever state the test left it in."""
    with contextlib.suppress(MppoolsError):
        mppools.unlink(name, force=True)
    for path in (_path(name), f"/dev/shm/sem.mppools.{name}.free"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    shutil.rmtree(f"/dev/shm/mppools.{name}.d", ignore_errors=True)


def _layout(capacity: int) -> Table:
    """A table over a scratch buffer: only its offsets are used."""
    return Table(memoryview(bytearray(segment_size(capacity, capacity))), capacity, capacity)


# holder processes ------------------------------------------------------------------------
def _handlers(limiter: PosixLimiter) -> dict[str, Callable[..., object]]:
    held: list[object] = []

    def acquire(timeout: float = 5.0, block: bool = True) -> tuple[str, object]:
        """("ok", slot index) | ("limit", message) | ("damaged", message); anything else is
        a failure of the test (it reaches the parent as a ChildError)."""
        try:
            slot = limiter.acquire(block=block, timeout=timeout)
        except LimitExceeded as exc:
            return "limit", str(exc)
        except DamagedSegmentError as exc:
            return "damaged", str(exc)
        held.append(slot)
        return "ok", slot.index

    def release() -> int:
        limiter.release(held.pop())  # type: ignore[arg-type]
        return len(held)

    return {"acquire": acquire, "release": release}


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for w in started:
        w.kill()


def _spawn(workers: list[Worker], limiter: PosixLimiter, n: int) -> list[Worker]:
    new = [Worker(_handlers(limiter)) for _ in range(n)]
    workers.extend(new)
    return new


def _holding(results: list[tuple[str, object]]) -> int:
    return sum(1 for status, _ in results if status == "ok")


# an unknown state byte ----------------------------------------------------------------------
def test_unknown_state_bytes_count_as_used_and_are_repaired_from_the_tokens(
    budget_name: str, workers: list[Worker], capsys: pytest.CaptureFixture[str]
) -> None:
    limiter = mppools.configure(limit=3, name=budget_name, capacity=8, acquire_timeout=0.3)
    table = _layout(8)
    a, b, c, d = _spawn(workers, limiter, 4)
    first = [a.call("acquire"), b.call("acquire")]
    assert _holding(first) == 2
    live = int(first[0][1])  # type: ignore[call-overload]
    free = next(i for i in range(8) if i not in {first[0][1], first[1][1]})
    _poke(budget_name, table.slot_map_at + live, b"\x07")  # a live holder's byte
    _poke(budget_name, table.slot_map_at + free, b"\x07")  # a free slot's byte

    # reading works; the unknown bytes count as used (never as free)
    stats = mppools.stats()
    assert stats.in_use == 3 and stats.free == 0
    assert main(["status", budget_name]) in (0, 1)
    assert main(["status"]) == 0
    capsys.readouterr()

    # a waiting acquire neither crashes nor lets a 4th holder in: the byte of the free slot
    # is cleared (its token is free), the live holder's byte is BUSY again
    third = c.call("acquire", 2.0)
    assert third[0] == "ok"
    fourth = d.call("acquire", 0.3)
    assert fourth[0] == "limit", fourth
    with pytest.raises(LimitExceeded):
        limiter.acquire(block=False)
    assert _peek(budget_name, table.slot_map_at + live, 1) == b"\x01"
    assert mppools.stats().in_use == 3

    # an unknown byte on a live holder's slot (a count that still agrees) is repaired by an
    # audit; an unknown waiter state whose token is free is dropped
    _poke(budget_name, table.slot_map_at + live, b"\xee")
    wmap_at = table.waiter_offset(0) - 64  # the waiter map: 64 bytes for 8 entries
    _poke(budget_name, wmap_at + 5, b"\x09")
    assert mppools.stats().in_use == 3
    mppools.audit()
    assert _peek(budget_name, table.slot_map_at + live, 1) == b"\x01"
    assert _peek(budget_name, wmap_at + 5, 1) == b"\x00"
    assert mppools.stats().in_use == 3
    for w in (a, b, c):
        assert w.call("release") == 0
    assert mppools.stats().in_use == 0


# an impossible header ------------------------------------------------------------------------
@pytest.mark.parametrize("bad_limit", [9, 2**31])
def test_a_header_limit_above_the_capacity_is_refused_never_obeyed(
    budget_name: str, workers: list[Worker], bad_limit: int
) -> None:
    limiter = mppools.configure(limit=3, name=budget_name, capacity=8, acquire_timeout=0.3)
    holder, *others = _spawn(workers, limiter, 6)
    assert holder.call("acquire")[0] == "ok"
    _poke(budget_name, LIMIT_AT, _U32.pack(bad_limit))

    results = [w.call("acquire", 0.3) for w in others]
    assert 1 + _holding(results) <= 3, results
    assert {status for status, _ in results} == {"damaged"}, results
    message = str(results[0][1])
    assert budget_name in message and f"mppools unlink {budget_name} --force" in message
    assert str(bad_limit) in message and "capacity 8" in message
    with pytest.raises(DamagedSegmentError):
        limiter.acquire(block=False)
    with pytest.raises(DamagedSegmentError):
        mppools.stats()
    # giving a slot back never fails
    assert holder.call("release") == 0

    # a fresh process refuses it at once, with one line and a non-zero status
    proc = subprocess.run([sys.executable, "-m", "mppools", "status", budget_name],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2, proc
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert "damaged" in proc.stderr and f"mppools unlink {budget_name} --force" in proc.stderr
    # the repair command named in the error works
    mppools.close(unlink=False)
    assert main(["unlink", budget_name, "--force"]) == 0
    assert not exists(budget_name)


def test_a_changed_capacity_in_the_header_is_refused(
    budget_name: str, workers: list[Worker]
) -> None:
    limiter = mppools.configure(limit=3, name=budget_name, capacity=8, acquire_timeout=0.3)
    (w,) = _spawn(workers, limiter, 1)
    _poke(budget_name, 24, _U32.pack(4000))  # the capacity field
    status, message = w.call("acquire", 0.3)
    assert status == "damaged" and "capacity" in str(message), message


# a wiped state map ---------------------------------------------------------------------------
@pytest.mark.parametrize("wipe", ["map", "map and records", "everything after the header"])
def test_a_wiped_table_never_lets_limit_plus_one_in(
    budget_name: str, workers: list[Worker], wipe: str
) -> None:
    limiter = mppools.configure(limit=3, name=budget_name, capacity=8, acquire_timeout=0.3)
    table = _layout(8)
    holders = _spawn(workers, limiter, 3)
    assert _holding([h.call("acquire") for h in holders]) == 3
    end = {"map": table.slot_map_at + 8,
           "map and records": table.slot_offset(8),
           "everything after the header": len(table.buf)}[wipe]
    _poke(budget_name, HEADER_SIZE, bytes(end - HEADER_SIZE))

    others = _spawn(workers, limiter, 3)
    for w in others:
        w.send("acquire", 1.0)  # all of them wait at once
    results = [w.answer() for w in others]
    assert _holding(results) == 0, results
    assert {status for status, _ in results} == {"limit"}, results
    with pytest.raises(LimitExceeded):
        limiter.acquire(block=False)
    stats = mppools.stats()
    assert stats.in_use == 3 and stats.free == 0
    assert _peek(budget_name, table.slot_map_at, 8).count(0) == 5
    if wipe == "map":
        # the records survived: every holder's map byte is back, and releasing hands on
        assert holders[0].call("release") == 0
        assert others[0].call("acquire", 2.0)[0] == "ok"
    # the holders' slots come back when they exit, whatever was lost
    for w in workers:
        w.kill()
    mppools.audit()
    assert mppools.stats().in_use == 0
    slots = [limiter.acquire(timeout=1.0) for _ in range(3)]
    with pytest.raises(LimitExceeded):
        limiter.acquire(block=False)
    for slot in slots:
        limiter.release(slot)


def test_garbage_in_a_record_does_not_break_stats_or_status(
    budget_name: str, workers: list[Worker], capsys: pytest.CaptureFixture[str]
) -> None:
    limiter = mppools.configure(limit=3, name=budget_name, capacity=8, acquire_timeout=0.3)
    table = _layout(8)
    (w,) = _spawn(workers, limiter, 1)
    status, index = w.call("acquire")
    assert status == "ok"
    at = table.slot_offset(int(index))  # type: ignore[call-overload]
    for since in (float("nan"), float("inf"), 1e300, -1e300):
        _poke(budget_name, at + _SINCE_AT, struct.pack("<d", since))
        assert mppools.stats().in_use == 1
        for argv in (["status", budget_name], ["status", budget_name, "--json"], ["status"],
                     ["status", "--prometheus"]):
            assert main(argv) in (0, 1), argv
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err


# the listing of every budget on the host ----------------------------------------------------
@pytest.fixture
def broken_budgets(budget_name: str) -> Iterator[dict[str, str]]:
    """Budgets broken in every way the listing must survive, by name -> expected flag."""
    made: dict[str, str] = {}
    base = budget_name + "-x"

    def segment(suffix: str, data: bytes, flag: str) -> str:
        name = f"{base}{suffix}"
        with open(_path(name), "wb") as f:
            f.write(data)
        made[name] = flag
        return name

    segment("-foreign", b"GARBAGE!" * 1024, "foreign")
    layout = bytearray(segment_size(4, 4))
    struct.pack_into("<8sIIII", layout, 0, MAGIC, LAYOUT_VERSION + 7, HEADER_SIZE, SLOT_SIZE, 64)
    segment("-layout", bytes(layout), "layout")
    segment("-truncated", MAGIC + bytes(100), "damaged")
    if os.geteuid() == 0:
        other = segment("-user", b"", "user")
        os.chown(_path(other), 65534, 65534)
    yield made
    for name in made:
        _remove(name)


def test_status_lists_every_budget_and_flags_the_broken_ones(
    budget_name: str, workers: list[Worker], broken_budgets: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    limiter = mppools.configure(limit=3, name=budget_name, capacity=8, acquire_timeout=0.3)
    (w,) = _spawn(workers, limiter, 1)
    assert w.call("acquire")[0] == "ok"
    # one more, healthy but for a state byte out of range (a repairable damage) ...
    odd = budget_name + "-odd"
    odd_limiter = PosixLimiter.open(odd, create=True, limit=2, capacity=4)
    try:
        odd_slot = odd_limiter.acquire(timeout=1.0)
        _poke(odd, _layout(4).slot_map_at + odd_slot.index, b"\x07")
        # ... and one with an impossible header
        bad = budget_name + "-bad"
        bad_limiter = PosixLimiter.open(bad, create=True, limit=2, capacity=4)
        bad_limiter.close()
        _poke(bad, LIMIT_AT, _U32.pack(99))
        broken_budgets[bad] = "damaged"
        try:
            assert main(["status"]) == 0
            captured = capsys.readouterr()
            assert "Traceback" not in captured.err
            lines = captured.out.splitlines()
            line = next(li for li in lines if li.startswith(budget_name + " "))
            assert line.split()[1:5] == ["3", "1", "2", "0"]
            odd_line = next(li for li in lines if li.startswith(odd + " "))
            assert f"mppools reclaim {odd}" in odd_line
            for name, flag in broken_budgets.items():
                flagged = next(li for li in lines if li.startswith(name + " "))
                assert flag in flagged, (flag, flagged)

            assert main(["status", "--json"]) == 0
            data = json.loads(capsys.readouterr().out)
            assert budget_name in [b["name"] for b in data["budgets"]]
            kinds = {e["name"]: e["kind"] for e in data["errors"]}
            for name, flag in broken_budgets.items():
                assert flag in kinds[name]
            assert main(["status", "--prometheus"]) == 0
            text = capsys.readouterr().out
            assert f'mppools_slots_limit{{budget="{budget_name}"}} 3' in text
            # a repairable damage and the unreadable budgets, as series a scraper can alert on
            assert f'mppools_budget_damaged{{budget="{odd}"}} 1' in text
            assert f'mppools_budget_damaged{{budget="{budget_name}"}} 0' in text
            for name in broken_budgets:
                assert f'mppools_budget_up{{budget="{name}"}} 0' in text, name

            # a broken budget by name: one line on stderr, a non-zero status
            for name in (bad, *broken_budgets):
                assert main(["status", name]) != 0
                err = capsys.readouterr().err
                assert len(err.strip().splitlines()) == 1 and name in err
            assert main(["status", odd]) == 1  # shown, with the repair command
            captured = capsys.readouterr()
            assert f"mppools reclaim {odd}" in captured.out + captured.err
            assert main(["reclaim", odd]) == 0
            capsys.readouterr()
            assert main(["status", odd]) == 0
            assert _peek(odd, _layout(4).slot_map_at + odd_slot.index, 1) == b"\x01"
        finally:
            for name in (bad, odd):
                _remove(name)
    finally:
        odd_limiter.close()
    with pytest.raises(IncompatibleSegmentError):  # a damaged one is also incompatible
        PosixLimiter.open(next(n for n, f in broken_budgets.items() if f == "damaged"),
                          create=False)


def test_status_does_not_re_create_a_lost_semaphore(
    budget_name: str, workers: list[Worker], capsys: pytest.CaptureFixture[str]
) -> None:
    """A budget whose semaphore was removed (a hand-run cleanup, say) is flagged by status,
    which changes nothing: it must not create a semaphore of count 0 (the budget would then
    look healthy, its count wrong). A process that configures the budget re-creates it and
    settles its count."""
    import posix_ipc

    from mppools._limiter.posix._names import sem_name, sem_path

    limiter = PosixLimiter.open(budget_name, create=True, limit=2, capacity=4,
                                acquire_timeout=0.3)
    (w,) = _spawn(workers, limiter, 1)
    assert w.call("acquire")[0] == "ok"  # a live holder in another process
    limiter.close()  # this process has no handle now: status opens the budget afresh
    posix_ipc.unlink_semaphore(sem_name(budget_name))
    assert main(["status", budget_name]) != 0
    err = capsys.readouterr().err
    assert "lost its semaphore" in err and budget_name in err
    assert not os.path.exists(sem_path(budget_name))
    with pytest.raises(DamagedSegmentError, match="lost its semaphore"):
        PosixLimiter.open(budget_name, create=False)
    assert not os.path.exists(sem_path(budget_name))
    joined = PosixLimiter.open(budget_name, create=True, limit=2)
    try:
        assert os.path.exists(sem_path(budget_name))
        # one slot of two is held by the worker: exactly one more can be had
        other = joined.acquire(timeout=1.0)
        with pytest.raises(mppools.LimitExceeded):
            joined.acquire(timeout=0.05)
        joined.release(other)
    finally:
        joined.close()

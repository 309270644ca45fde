"""The lease watchdog: fences this host when its master cannot.

Only the host's master renews its leases and fences (shrinks the local budget with force)
before they can expire. A master that is stopped (SIGSTOP, a debugger, a frozen VM thread),
hung, or dead while its workers live would neither renew nor fence: its workers would keep
their connections open after the leases expired and another host was granted them. So the
master starts this small process (``python -m mppools._limiter.redis._watchdog NAME PID``,
its child, in its process group) and publishes its fencing deadline in a 16-byte file of the
budget's 0700 directory (``r-deadline``: the deadline in CLOCK_MONOTONIC nanoseconds, which
every process of the host reads alike, and the master's pid). The watchdog sleeps until that
deadline; if the master has not moved it by then, or the master is gone, the watchdog fences
in its place: the local limit drops to none, idle connections are closed by their keepers at
once, connections still in use are cut after a grace (see ``_limiter``). A live master
fences itself before the deadline, so the watchdog never acts for a healthy one.

A dead master's own slot (the plug that keeps the local limit one above what the host lends
out) goes with it, so a local limit of one would still let one worker keep a connection for
a lease that has lapsed. So after fencing for a dead master the watchdog takes a slot itself
and holds it in the plug's place (the workers' connections in debt close at their next use;
the others hand theirs on within their hold quantum, or idle ones at once, to the waiting
watchdog), for as long as other processes of this host have the budget open and no new
master has taken over; then it lets go and exits.

Deadline values: ``> 0`` a deadline, ``0`` nothing lent out, ``-1`` the master closed the
budget (the watchdog exits).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import struct
import sys
import time
from typing import Any

__all__ = ["DEADLINE_FILE", "Board", "main"]

DEADLINE_FILE = "r-deadline"
_FMT = struct.Struct("<qq")
#: the longest the watchdog sleeps between two looks (seconds)
LOOK_EVERY = 1.0
#: how long the watchdog waits for the slot it holds in a dead master's place, at a time
STAND_IN_WAIT = 30.0


def _path(name: str) -> str:
    from mppools._limiter.posix._names import rendezvous_dir

    return f"{rendezvous_dir(name)}/{DEADLINE_FILE}"


class Board:
    """The master's side: the deadline file, mapped."""

    def __init__(self, name: str) -> None:
        path = _path(name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, _FMT.size)
            self._map = mmap.mmap(fd, _FMT.size)
        finally:
            os.close(fd)
        self.path = path
        self._last = (1, 0)
        self.write(0)

    def write(self, deadline: float | None) -> None:
        """Publish the fencing deadline (monotonic seconds; None or 0: nothing lent out;
        -1: closed)."""
        if deadline is None:
            value = 0
        elif deadline < 0:
            value = -1
        else:
            value = max(1, round(deadline * 1e9))
        now = (value, os.getpid())
        if now != self._last:
            self._map[: _FMT.size] = _FMT.pack(*now)
            self._last = now

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self.write(-1)
            self._map.close()


def _fence(name: str, why: str, *, master: int = 0) -> None:
    """Shrink the local budget to the plug's one slot; with ``master`` (it died), hold that
    slot in the plug's place (:func:`_stand_in`)."""
    from mppools._errors import MppoolsError
    from mppools._limiter.posix import PosixLimiter

    try:
        local = PosixLimiter.open(name, create=False)
    except MppoolsError:
        return  # the budget is gone: nothing left to fence
    try:
        if local.limit > 1:
            local.resize(1, force=True)  # the master's plug only: nothing to hand out
            local.sever_excess()  # and connections still in use after a grace are cut
            print(f"mppools watchdog: budget {name!r} fenced on this host: {why}",
                  file=sys.stderr, flush=True)
        if master:
            _stand_in(local, master)
    finally:
        local.close()


def _taken_over(name: str, master: int) -> bool:
    """True once another master publishes on the board (or the budget is gone). Read by
    path, not through the mapping: a new master truncates the file as it starts."""
    try:
        with open(_path(name), "rb") as f:
            data = f.read(_FMT.size)
    except OSError:
        return True
    if len(data) < _FMT.size:
        return False  # being rewritten right now
    deadline, pid = _FMT.unpack(data)
    return deadline == -1 or pid not in (0, master)


def _stand_in(local: Any, master: int) -> None:
    """Hold one slot of ``local`` in the dead master's place while other processes of this
    host use the budget and no new master took over."""
    from mppools._errors import MppoolsError

    slot = None
    try:
        while local.opened_elsewhere() and not _taken_over(local.name, master):
            if slot is None:
                try:
                    # waiting sets the pressure flag: the workers' connections are handed on
                    # to us at their next release after their quantum, idle ones at once
                    slot = local.acquire(timeout=STAND_IN_WAIT)
                except MppoolsError:
                    continue
            else:
                select.select([], [], [], LOOK_EVERY)
    finally:
        if slot is not None:
            with contextlib.suppress(MppoolsError):
                local.release(slot)


def _read(board: mmap.mmap) -> int:
    """The deadline, read until two reads agree (the master's store is not atomic)."""
    last = _FMT.unpack(board[: _FMT.size])[0]
    for _ in range(100):
        now = _FMT.unpack(board[: _FMT.size])[0]
        if now == last:
            break
        last = now
    return int(last)


def main(argv: list[str]) -> int:
    name, master = argv[0], int(argv[1])
    try:
        fd = os.open(_path(name), os.O_RDONLY)
    except OSError:
        return 0
    try:
        board = mmap.mmap(fd, _FMT.size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    fenced_for = 0
    while True:
        deadline = _read(board)
        if deadline == -1:
            return 0
        orphaned = os.getppid() != master  # the master died: we were handed to init
        now = time.monotonic_ns()
        if orphaned:
            # lending or not, its plug went with it: stand in for it
            _fence(name, f"its master (pid {master}) is gone", master=master)
            return 0
        if deadline > 0 and deadline != fenced_for and now >= deadline:
            _fence(name, f"its master (pid {master}) did not renew the leases by the fencing "
                         f"deadline ({(now - deadline) / 1e6:.0f} ms ago)")
            fenced_for = deadline
        if deadline > 0 and deadline != fenced_for:
            pause = min(LOOK_EVERY, max(0.001, (deadline - now) / 1e9))
        else:
            pause = LOOK_EVERY
        # a relative timeout: nothing here depends on the wall clock (time.sleep waits on an
        # absolute monotonic time, which clock-faking preloads have been seen to refuse)
        select.select([], [], [], pause)


if __name__ == "__main__":  # pragma: no cover - runs as the watchdog process
    sys.exit(main(sys.argv[1:]))

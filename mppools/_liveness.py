"""Is the process that recorded ``(pid, start ticks)`` still alive?

A pid alone is unsafe (pids are reused), so every holder is recorded with the start time of
its process. We use the raw start time in clock ticks since boot, field 22 of
``/proc/<pid>/stat``: it never moves. ``psutil.Process.create_time()`` is derived from the wall
clock and shifts when the clock is stepped (giampaolo/psutil#2526, #1724), which would make a
live holder look like a reused pid, so it is only the fallback where ``/proc`` cannot be read.

A process killed but not yet reaped by its parent is a zombie: ``kill(pid, 0)`` and
``psutil.pid_exists()`` still say it exists. Once all its threads have exited its sockets are
closed by the kernel, so a zombie counts as dead here; but only once a pidfd of it polls
readable, because the main thread shows ``Z`` while other threads are still tearing down.

These answers are meaningful only within one pid namespace whose /proc this process reads.
The POSIX backend decides liveness by kernel-released tokens instead (see
:mod:`mppools._limiter.posix._tokens`) and uses this module only for its pidfd fast path
and its stats.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import psutil

from mppools import _green

__all__ = ["Identity", "identity_of", "is_alive", "self_identity"]


class Identity(NamedTuple):
    """A process as recorded in the shared table: pid plus start time in clock ticks."""

    pid: int
    start: int


_cached: Identity | None = None


def _read_stat(pid: int) -> tuple[str, int] | None:
    """Return ``(state, start ticks)`` of ``pid`` from ``/proc``, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return _read_stat_psutil(pid)
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    fields = data[data.rindex(b")") + 2 :].split()
    return fields[0].decode("ascii"), int(fields[19])


def _read_stat_psutil(pid: int) -> tuple[str, int] | None:
    try:
        proc = psutil.Process(pid)
        status = proc.status()
        created = proc.create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    state = "Z" if status in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD) else "R"
    # milliseconds since the epoch stand in for ticks; comparisons use the same source
    return state, int(created * 1000)


def _exited(pid: int) -> bool:
    """For a pid whose main thread is a zombie: has the whole process exited?

    The main thread of a SIGKILLed process shows ``Z`` as soon as it is gone, while its other
    threads (mppools' keeper, say) may still be exiting and its sockets are still open for
    milliseconds. A pidfd becomes readable only once the whole thread group has exited,
    which is when the kernel has closed its files.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError:  # no pidfd (old kernel): fall back to the thread list
        try:
            return len(os.listdir(f"/proc/{pid}/task")) <= 1
        except OSError:
            return True
    try:
        # not select.poll: eventlet's patched select has none (issue 8)
        return bool(_green.wait_readable([fd], 0))
    finally:
        os.close(fd)


def _dead_state(pid: int, state: str) -> bool:
    if state in ("X", "x"):
        return True
    if state == "Z":
        return _exited(pid)
    return False


def identity_of(pid: int) -> Identity | None:
    """The identity of a running ``pid``, or None if no such (live) process exists."""
    stat = _read_stat(pid)
    if stat is None or _dead_state(pid, stat[0]):
        return None
    return Identity(pid, stat[1])


def self_identity() -> Identity:
    """This process's identity (cached; the cache is reset in a forked child)."""
    global _cached
    pid = os.getpid()
    if _cached is None or _cached.pid != pid:
        ident = identity_of(pid)
        if ident is None:  # pragma: no cover - we are certainly alive
            raise RuntimeError("cannot read this process's own start time from /proc")
        _cached = ident
    return _cached


def is_alive(pid: int, start: int) -> bool:
    """True if the process ``pid`` started at ``start`` ticks is alive and not a zombie.

    A different start time means the pid was reused by another process: the recorded one is
    dead.
    """
    if pid <= 0:
        return False
    stat = _read_stat(pid)
    if stat is None:
        return False
    state, ticks = stat
    return ticks == start and not _dead_state(pid, state)


def _reset_after_fork() -> None:
    global _cached
    _cached = None

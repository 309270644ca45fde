"""Who this process is, as recorded in the shared tables.

``owner`` is a random 63-bit number per process image (new in every forked child): it tells
a process its own entries apart, and names its keeper's socket. ``pid``/``start``/``pidns``
only serve the pidfd fast path and the stats: they are meaningful to another process only
if it shares this PID namespace and can read a /proc of that namespace, which ``pidns == 0``
("unknown") rules out.
"""

from __future__ import annotations

import os
import secrets
from typing import NamedTuple

from mppools._liveness import identity_of

__all__ = ["Me", "me", "pid_namespace"]


class Me(NamedTuple):
    pid: int
    start: int
    owner: int
    pidns: int


_cached: Me | None = None


def pid_namespace() -> int:
    """The inode of this process's PID namespace, or 0 if this /proc is not of that namespace
    (a PID namespace without its own /proc: our pids mean other processes there)."""
    try:
        if os.readlink("/proc/self") != str(os.getpid()):
            return 0
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def me() -> Me:
    """This process image's identity (cached; a forked child gets a new one)."""
    global _cached
    pid = os.getpid()
    cached = _cached
    if cached is not None and cached.pid == pid:
        return cached
    pidns = pid_namespace()
    ident = identity_of(pid) if pidns else None
    cached = _cached = Me(pid, ident.start if ident is not None else 0,
                          secrets.randbits(63) or 1, pidns if ident is not None else 0)
    return cached


def reset() -> None:
    """Forget the cached identity (the fork handler calls it in the child)."""
    global _cached
    _cached = None

"""Kernel-released tokens: OFD locks on single bytes of the segment file.

A process proves it is alive to every other process, in any PID or network namespace, by
holding an open-file-description lock (``F_OFD_SETLK``) on the byte that belongs to its slot
or waiter entry. The kernel drops the lock when the last fd of that open file description is
closed, which for a dying process happens together with the closing of its sockets. So
"the token is free" means "the holder's broker connection is closed", with no /proc, no pid
and no clock involved.

OFD locks belong to an open file *description*, not to a process: a forked child shares its
parent's description, so the fork handler gives every child a description of its own
(:func:`reopen`) before it takes any token. Locks of one description never conflict with each
other, so a process recognises its own entries by their ``owner`` field instead.

The bytes lie far beyond the end of the segment (see :mod:`mppools._slots`), away from byte 0,
which the budget mutex locks with a classic process-owned ``lockf``.
"""

from __future__ import annotations

import fcntl
import os
import struct

__all__ = [
    "held_by_anyone",
    "held_in",
    "is_held",
    "release",
    "reopen",
    "share",
    "shared_by_others",
    "take",
]

# struct flock on Linux x86-64/aarch64: l_type, l_whence, (pad), l_start, l_len, l_pid, (pad)
_FLOCK = struct.Struct("@hhqqi4x")


def _flock(kind: int, at: int) -> bytes:
    return _FLOCK.pack(kind, os.SEEK_SET, at, 1, 0)


def take(fd: int, at: int) -> bool:
    """Lock the byte ``at`` for this open file description; False if another holds it."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_WRLCK, at))
    except (BlockingIOError, PermissionError):
        return False
    return True


def share(fd: int, at: int) -> bool:
    """Read-lock the byte ``at`` for this open file description (many descriptions may);
    False if a description holds it write-locked."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_RDLCK, at))
    except (BlockingIOError, PermissionError):
        return False
    return True


def shared_by_others(fd: int, at: int) -> bool:
    """True if a description other than ``fd``'s holds any lock on the byte ``at``."""
    return is_held(fd, at)


def release(fd: int, at: int) -> None:
    """Unlock the byte ``at`` (a no-op if this description does not hold it)."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK, at))


def is_held(fd: int, at: int) -> bool:
    """True if a description other than ``fd``'s holds the byte ``at`` (a live holder)."""
    result = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK, at))
    kind = _FLOCK.unpack(result)[0]
    return bool(kind != fcntl.F_UNLCK)


def reopen(fd: int, fallback_path: str) -> bool:
    """Give ``fd`` an open file description of its own for the same file (after a fork).

    The new description is opened through ``/proc/self/fd`` (the very same inode, even if the
    name was unlinked since) or, where /proc is not this process's, by ``fallback_path`` if
    that still names the same inode; it then replaces ``fd`` in place (``dup2``). Returns
    False if neither works: the caller must not take tokens through ``fd`` then.
    """
    st = os.fstat(fd)
    for path in (f"/proc/self/fd/{fd}", fallback_path):
        try:
            new = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW * (path == fallback_path))
        except OSError:
            continue
        try:
            nst = os.fstat(new)
            if (nst.st_dev, nst.st_ino) == (st.st_dev, st.st_ino):
                os.dup2(new, fd, inheritable=False)
                return True
        finally:
            os.close(new)
    return False


def _lock_in(fd: int, at: int, length: int) -> tuple[int, int] | None:
    """Some lock, of any open file description (this process's own included), on the bytes
    ``[at, at + length)`` of ``fd``'s file: ``(start, length)``, or None."""
    kind, _, start, size, _ = _FLOCK.unpack(
        fcntl.fcntl(fd, fcntl.F_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, at, length, 0)))
    if kind == fcntl.F_UNLCK:
        return None
    return start, size


def held_by_anyone(fd: int, at: int) -> bool:
    """True if any open file description, this process's own included, locks the byte ``at``.

    A classic (process-owned) ``F_GETLK`` conflicts with every OFD lock, ours too, and takes
    nothing (this process holds no classic lock on the token file)."""
    return _lock_in(fd, at, 1) is not None


def held_in(fd: int, at: int, length: int) -> list[int]:
    """Offsets of every locked byte in ``[at, at + length)`` (any description). ``F_GETLK``
    reports one lock, not necessarily the first: split around it. 2 x locks + 1 calls."""
    found: list[int] = []
    todo = [(at, length)]
    while todo:
        lo, n = todo.pop()
        if n <= 0:
            continue
        lock = _lock_in(fd, lo, n)
        if lock is None:
            continue
        start = max(lock[0], lo)
        end = lo + n if lock[1] == 0 else min(lock[0] + lock[1], lo + n)
        end = max(end, start + 1)
        found.extend(range(start, end))
        todo.append((lo, start - lo))
        todo.append((end, lo + n - end))
    return found

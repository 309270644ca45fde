"""The budget mutex: this process's threads first, then a kernel-released record lock.

``fcntl.lockf`` on byte 0 of the segment is dropped by the kernel when its owner dies, so a
process killed inside a critical section never deadlocks the others. fcntl record locks
belong to a process, so an in-process lock orders the threads (and greenlets) of one process
first. Closing ANY fd of the segment file would drop the record lock: each process keeps
exactly one fd of a segment open.
"""

from __future__ import annotations

import fcntl
from collections.abc import Callable

from mppools import _green

__all__ = ["Mutex"]


class Mutex:
    """Context manager for the budget's mutex (a class: cheaper than a generator).

    ``on_exit`` runs while the mutex is still held, just before it is let go (the limiter
    publishes its pressure byte there).
    """

    __slots__ = ("_fd", "_on_exit", "_tlock")

    def __init__(self, fd: int, on_exit: Callable[[], None]) -> None:
        self._fd = fd
        self._on_exit = on_exit
        self._tlock = _green.Lock()

    def __enter__(self) -> None:
        self._tlock.acquire()
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, 0)
        except BaseException:
            self._tlock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            self._on_exit()
        finally:
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, 0)
            finally:
                self._tlock.release()

    def after_fork_in_child(self) -> None:
        # a thread of the parent may have held it at fork time
        self._tlock = _green.Lock()

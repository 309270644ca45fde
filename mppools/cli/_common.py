"""Shared helpers of the ``mppools`` command: exit codes, errors, read-only budget access."""

from __future__ import annotations

import contextlib
import math
import os
import struct
import time
from collections.abc import Iterator

from mppools import _config
from mppools._errors import (
    BudgetNotFoundError,
    DamagedSegmentError,
    IncompatibleSegmentError,
    PermissionDeniedError,
)
from mppools._limiter._base import BudgetStats
from mppools._limiter.posix import PosixLimiter, list_budgets
from mppools._limiter.posix._names import shm_path
from mppools._slots import HEADER_SIZE, LAYOUT_VERSION, MAGIC

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "CLIError",
    "broken_kind",
    "format_age",
    "format_time",
    "inspect_budget",
    "list_budget_names",
    "open_budget",
    "read_stats",
]

EXIT_OK = 0
#: the command ran but found a failure (the demo saw the limit exceeded)
EXIT_FAILURE = 1
#: a user mistake: unknown budget, foreign segment, permission, refused unlink, bad argument
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CLIError(Exception):
    """A user-facing error: printed as one line on stderr, exits with ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


@contextlib.contextmanager
def open_budget(name: str) -> Iterator[PosixLimiter]:
    """Open the existing budget ``name`` without taking any slot; close it afterwards.

    If this process is itself configured with that budget, its own limiter is used instead:
    a second fd of the segment in one process would drop the process's fcntl mutex when it
    is closed.

    Raises:
        BudgetNotFoundError, IncompatibleSegmentError, PermissionDeniedError,
        ConfigurationError: as :meth:`PosixLimiter.open`.
    """
    current = _config.current()
    if isinstance(current, PosixLimiter) and current.name == name:
        yield current
        return
    limiter = PosixLimiter.open(name, create=False)
    try:
        yield limiter
    finally:
        limiter.close()


def read_stats(name: str) -> BudgetStats:
    """A snapshot of budget ``name`` (read-only: the caller takes no slot)."""
    with open_budget(name) as limiter:
        return limiter.stats()


def _table_damage(limiter: PosixLimiter) -> list[str]:
    return limiter.damage()


def inspect_budget(name: str) -> tuple[BudgetStats, list[str]]:
    """A snapshot of budget ``name`` and what is damaged in its tables, in words (empty if
    nothing). Read-only: repairing is `mppools reclaim`'s (and every waiter's audit's) job.

    Raises:
        DamagedSegmentError: its header is damaged; and what :func:`open_budget` raises.
    """
    with open_budget(name) as limiter:
        stats = limiter.stats()
        return stats, _table_damage(limiter)


def broken_kind(name: str, exc: BaseException) -> str:
    """What is wrong with budget ``name``, which could not be read (``exc``), in a word or
    three: ``another user's (uid N)``, ``foreign``, ``layout version N``, ``damaged``,
    ``incomplete``, ``unreadable``. Looks at the segment file itself, never trusts it."""
    path = shm_path(name)
    try:
        st = os.lstat(path)
    except OSError:
        return "unreadable"
    if st.st_uid != os.geteuid():
        return f"another user's (uid {st.st_uid})"
    if isinstance(exc, DamagedSegmentError):
        return "damaged"
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return "unreadable"
    if head[: len(MAGIC)] != MAGIC:
        return "foreign" if head.strip(b"\0") else "incomplete"
    if st.st_size < HEADER_SIZE:
        return "damaged"
    (version,) = struct.unpack_from("<I", head, len(MAGIC))
    if version != LAYOUT_VERSION:
        return f"layout version {version}"
    if isinstance(exc, IncompatibleSegmentError):
        return "damaged"
    if isinstance(exc, BudgetNotFoundError):
        return "incomplete"
    if isinstance(exc, PermissionDeniedError):
        return "not accessible"
    return "unreadable"


def list_budget_names() -> list[str]:
    """Names of the budgets on this host (tolerates segments removed while listing)."""
    for _ in range(3):
        try:
            return list_budgets()
        except FileNotFoundError:  # a segment vanished between listdir() and stat()
            time.sleep(0.01)
    return list_budgets()


def format_age(seconds: float) -> str:
    """A short human duration: ``850ms``, ``12.3s``, ``5m03s``, ``2h05m``, ``3d04h``
    (``?`` for what is not a number of seconds: a damaged record)."""
    if not math.isfinite(seconds):
        return "?"
    seconds = max(seconds, 0.0)
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def format_time(when: float, fmt: str = "%H:%M:%S") -> str:
    """``when`` (wall clock) as local time; ``?`` if it is no time at all (a damaged record)."""
    try:
        return time.strftime(fmt, time.localtime(when))
    except (OverflowError, OSError, ValueError):
        return "?"

"""Shared helpers of the ``mppools`` command: exit codes, errors, read-only budget access."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from mppools import _config
from mppools._limiter._base import BudgetStats
from mppools._limiter.posix import PosixLimiter, list_budgets

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "CLIError",
    "format_age",
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
        NotConfiguredError, IncompatibleSegmentError, PermissionDeniedError,
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


def list_budget_names() -> list[str]:
    """Names of the budgets on this host (tolerates segments removed while listing)."""
    for _ in range(3):
        try:
            return list_budgets()
        except FileNotFoundError:  # a segment vanished between listdir() and stat()
            time.sleep(0.01)
    return list_budgets()


def format_age(seconds: float) -> str:
    """A short human duration: ``850ms``, ``12.3s``, ``5m03s``, ``2h05m``, ``3d04h``."""
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

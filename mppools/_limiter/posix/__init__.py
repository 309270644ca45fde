"""The host-wide backend: a POSIX named semaphore, a shared-memory slot table, OFD-lock tokens.

Split by concern: :mod:`._names` (names, paths, listing), :mod:`._segment` (opening safely),
:mod:`._mutex` (the robust mutex), :mod:`._tokens` (kernel-released liveness tokens),
:mod:`._books` (the protocol steps under the mutex), :mod:`._wait` (waiting: sockets, pidfds,
slices), :mod:`._limiter` (the :class:`PosixLimiter` that ties them together).
"""

from __future__ import annotations

from ._limiter import DEFAULT_CAPACITY, PosixLimiter, unlink
from ._names import NAME_PATTERN, default_name, exists, list_budgets, validate_name

__all__ = [
    "DEFAULT_CAPACITY",
    "NAME_PATTERN",
    "PosixLimiter",
    "default_name",
    "exists",
    "list_budgets",
    "unlink",
    "validate_name",
]

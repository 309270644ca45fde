"""The mppools exception tree.

Every error raised by mppools derives from :class:`MppoolsError`, and also from the
builtin or kombu error that existing callers already catch.
"""

from __future__ import annotations

from kombu.exceptions import ConnectionLimitExceeded

__all__ = [
    "BudgetInUseError",
    "BudgetNotFoundError",
    "ConfigurationError",
    "DamagedSegmentError",
    "IncompatibleSegmentError",
    "LimitExceeded",
    "MppoolsError",
    "NotConfiguredError",
    "PermissionDeniedError",
    "UnsupportedPlatformError",
]


class MppoolsError(Exception):
    """Root of every error raised by mppools."""


class ConfigurationError(MppoolsError, ValueError):
    """An argument is invalid, or conflicts with the budget already configured."""


class LimitExceeded(MppoolsError, ConnectionLimitExceeded, TimeoutError):
    """No slot of the shared budget could be had in time (also kombu's ``ConnectionLimitExceeded``).

    ``str()`` names the budget, the limit, who holds the slots and how long the call waited.
    The structured fields are kept as attributes for programs.
    """

    def __init__(
        self,
        message: str,
        *,
        name: str = "",
        limit: int = 0,
        waited: float = 0.0,
        holders: tuple[tuple[int, int], ...] = (),
    ) -> None:
        super().__init__(message)
        self.name = name
        self.limit = limit
        self.waited = waited
        self.holders = holders

    def __reduce__(self) -> tuple[object, ...]:
        # keep the keyword-only fields across pickling (celery ships exceptions around)
        return (_rebuild_limit_exceeded, (str(self), self.name, self.limit, self.waited,
                                          self.holders))


def _rebuild_limit_exceeded(
    message: str, name: str, limit: int, waited: float, holders: tuple[tuple[int, int], ...]
) -> LimitExceeded:
    return LimitExceeded(message, name=name, limit=limit, waited=waited, holders=holders)


class IncompatibleSegmentError(MppoolsError, ValueError):
    """A shared segment of that name exists but is not an mppools segment of this layout."""


class DamagedSegmentError(IncompatibleSegmentError):
    """A budget's segment holds values this layout cannot have (a limit above its capacity,
    a changed capacity or layout field): it is refused, never used. The message names the
    budget and the repair command (``mppools unlink NAME --force``). Also an
    :class:`IncompatibleSegmentError` (a segment that cannot be read as a valid budget), so
    ``mppools unlink NAME --force`` removes it."""


class PermissionDeniedError(MppoolsError, PermissionError):
    """The shared objects of that name belong to another user or cannot be opened."""


class BudgetInUseError(MppoolsError, RuntimeError):
    """The operation needs a budget nobody uses, and live processes still use it."""


class BudgetNotFoundError(MppoolsError, LookupError):
    """No budget of that name exists (on this host, for the POSIX backend)."""


class NotConfiguredError(MppoolsError, LookupError):
    """This process has no budget: call :func:`mppools.configure` or :func:`mppools.attach`
    first."""


class UnsupportedPlatformError(MppoolsError, OSError):
    """The shared limiter needs Linux (``sem_timedwait``, ``/proc``, ``pidfd_open``)."""

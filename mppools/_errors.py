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
    "CoordinationError",
    "DamagedSegmentError",
    "IncompatibleSegmentError",
    "LeaseLostError",
    "LimitExceeded",
    "LoanLostError",
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


class CoordinationError(LimitExceeded):
    """The coordination Redis could not be reached or answered an error: nothing is granted
    (fail closed). ``server`` names it, ``operation`` says what failed, ``deadline`` is the
    monotonic time by which connections under the current leases must be closed (None if
    the host holds no lease)."""

    def __init__(
        self,
        message: str,
        *,
        name: str = "",
        limit: int = 0,
        waited: float = 0.0,
        server: str = "",
        operation: str = "",
        deadline: float | None = None,
    ) -> None:
        super().__init__(message, name=name, limit=limit, waited=waited)
        self.server = server
        self.operation = operation
        self.deadline = deadline

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_coordination_error, (str(self), self.name, self.limit, self.waited,
                                              self.server, self.operation, self.deadline))


def _rebuild_coordination_error(
    message: str, name: str, limit: int, waited: float, server: str, operation: str,
    deadline: float | None,
) -> CoordinationError:
    return CoordinationError(message, name=name, limit=limit, waited=waited, server=server,
                             operation=operation, deadline=deadline)


class LeaseLostError(MppoolsError, RuntimeError):
    """Leases this host held are gone (expired, or Redis lost its data and they could not be
    re-registered): close ``lost`` connections now. ``held`` is what the host still holds."""

    def __init__(self, message: str, *, lost: int, held: int, reason: str) -> None:
        super().__init__(message)
        self.lost = lost
        self.held = held
        self.reason = reason

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_lease_lost, (str(self), self.lost, self.held, self.reason))


def _rebuild_lease_lost(message: str, lost: int, held: int, reason: str) -> LeaseLostError:
    return LeaseLostError(message, lost=lost, held=held, reason=reason)


class LoanLostError(MppoolsError, ConnectionError):
    """A connection borrowed from another process of the budget (lending, see
    ``docs/concepts.md``) is gone: its lender exited, closed it, or its broker connection
    broke. Borrowed connections list it among their transport's recoverable connection
    errors, so kombu's ``ensure`` / ``publish(retry=True)`` borrows again (or fails as it
    would on a lost broker connection)."""

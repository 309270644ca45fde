"""Errors of the cross-host lease client (kept here until the limiter interface settles;
candidates for :mod:`mppools._errors`)."""

from __future__ import annotations

from mppools._errors import LimitExceeded, MppoolsError

__all__ = ["CoordinationError", "LeaseLostError"]


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

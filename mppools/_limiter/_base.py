"""The limiter interface the pools talk to, and the snapshots it returns.

A limiter hands out *slots* of one budget. The pools never know which backend they use; a
backend implements :class:`Limiter` (acquire / release / mark / audit / stats / resize).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

__all__ = ["AuditReport", "BudgetStats", "HolderStats", "Limiter", "Slot"]


@dataclass(frozen=True, slots=True)
class Slot:
    """One unit of the budget held by this process.

    ``epoch`` ties the slot to the process image that acquired it: after a fork the child's
    epoch changes, so a slot inherited from the parent is inert in the child.
    """

    index: int
    token: int
    pid: int
    epoch: int
    acquired_at: float


@dataclass(frozen=True, slots=True)
class HolderStats:
    """What one process holds, as seen in the shared table."""

    pid: int
    slots: int
    idle: int
    busy: int
    since: float
    alive: bool


@dataclass(frozen=True, slots=True)
class BudgetStats:
    """A frozen snapshot of one budget, taken under its mutex."""

    name: str
    limit: int
    in_use: int
    free: int
    waiting: int
    debt: int
    capacity: int
    holders: tuple[HolderStats, ...]
    waiter_pids: tuple[int, ...]
    creator_pid: int
    created_at: float
    acquired_total: int
    reclaimed_total: int
    timeouts_total: int
    acquire_timeout: float | None
    idle_timeout: float | None
    hold_quantum: float = 0.0
    backend: str = "posix"
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AuditReport:
    """What an audit found: slots and waiters of dead processes that it reclaimed."""

    reclaimed_slots: tuple[tuple[int, int], ...]  # (pid, slot index)
    dropped_waiters: tuple[int, ...]  # pids
    semaphore_corrected: int  # units posted (+) or taken (-) to make the semaphore exact


class Limiter(abc.ABC):
    """A budget of slots shared by every process that uses the same name."""

    name: str

    @abc.abstractmethod
    def acquire(self, *, block: bool = True, timeout: float | None = None) -> Slot:
        """Take one slot.

        ``timeout=None`` waits for the budget's configured ``acquire_timeout``.

        Raises:
            LimitExceeded: no slot in time (at once if ``block`` is false).
        """

    @abc.abstractmethod
    def release(self, slot: Slot) -> None:
        """Give a slot back. Releasing a slot twice, or one inherited from a parent, is a no-op."""

    def mark_idle(self, slot: Slot) -> None:  # noqa: B027 - optional hook
        """Note that the connection holding ``slot`` sits idle in a local pool (cheap)."""

    def cells(self, slot: Slot) -> tuple[memoryview, int, int] | None:
        """Where the warm path may store ``slot``'s IDLE/BUSY byte and read the pressure
        flag without a call: ``(view, state offset, pressure offset)``; None if the backend
        has no such cells (then :meth:`mark_idle` / :meth:`under_pressure` are called)."""
        return None

    def under_pressure(self) -> bool:
        """True if someone waits for a slot or the budget is over its limit (cheap read)."""
        return False

    def waiting_flag(self) -> bool:
        """True if someone waits for a slot now (cheap read): idle yields are honoured only
        then."""
        return False

    def in_debt(self) -> bool:
        """True if more slots are held than the limit (after a forced shrink; cheap read)."""
        return False

    @property
    def idle_timeout(self) -> float | None:
        """Seconds after which idle pooled connections are closed (None: never)."""
        return None

    @property
    def hold_quantum(self) -> float:
        """Seconds a connection in active use keeps its slot before it is handed on to a
        waiter (0: at its next release)."""
        return 0.0

    @property
    def acquire_timeout(self) -> float | None:
        """The wait bound of an acquire without an explicit timeout (None: forever)."""
        return None

    def mark_busy(self, slot: Slot) -> None:  # noqa: B027 - optional hook
        """Note that the connection holding ``slot`` is in use (cheap)."""

    @abc.abstractmethod
    def audit(self) -> AuditReport:
        """Reclaim the slots of dead processes and make the free count exact."""

    @abc.abstractmethod
    def stats(self) -> BudgetStats:
        """A frozen snapshot of the budget."""

    @abc.abstractmethod
    def resize(self, limit: int, *, force: bool = False) -> None:
        """Change the limit for every process.

        Raises:
            BudgetInUseError: shrinking below the slots in use without ``force``.
            ConfigurationError: ``limit`` is not a positive int within the capacity.
        """

    @property
    @abc.abstractmethod
    def limit(self) -> int:
        """The current limit (a memory read)."""

    def keeper_address(self) -> str | bytes | None:
        """Where this process receives idle-yield requests, or None if the backend has none."""
        return None

    def is_creator(self) -> bool:
        """True if this process created (or adopted) the budget and so removes it at exit."""
        return False

    def after_fork_in_child(self) -> None:  # noqa: B027 - optional hook
        """Rebuild in-process state in a forked child (called by the fork handler)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Detach this process from the budget (slots it holds stay with it until released)."""

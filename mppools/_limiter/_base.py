"""The limiter interface the pools talk to, and the snapshots it returns.

A limiter hands out *slots* of one budget. The pools never know which backend they use; a
backend implements :class:`Limiter` (acquire / release / audit / stats / resize / unlink) and
is picked by ``configure(backend=...)`` (see ``mppools._config.backend_for``).

The warm path of the pools touches no method at all when a backend offers :meth:`cells`: it
stores :data:`STATE_BUSY` / :data:`STATE_IDLE` into the slot's state byte and reads the bits
:data:`PRESSURE_WAITING` / :data:`PRESSURE_DEBT` of the budget's pressure byte. Those values
are defined here, once, so that every backend with cells gives them the same meaning.
"""

from __future__ import annotations

import abc
import enum
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Final, Protocol

from mppools import _fork

__all__ = [
    "MAX_USE_RATE",
    "PRESSURE_DEBT",
    "PRESSURE_WAITING",
    "STATE_BUSY",
    "STATE_FREE",
    "STATE_IDLE",
    "AuditReport",
    "Backend",
    "BudgetStats",
    "HolderStats",
    "Limiter",
    "LoanOffer",
    "Offer",
    "Slot",
    "WaitHook",
    "WaiterStats",
    "local_host",
]

#: values of a slot's state byte (see :meth:`Limiter.cells`)
STATE_FREE: Final = 0
STATE_BUSY: Final = 1
STATE_IDLE: Final = 2
#: bits of the pressure byte (see :meth:`Limiter.cells`): someone waits for a slot; the
#: budget holds more slots than its limit (after a forced shrink)
PRESSURE_WAITING: Final = 1
PRESSURE_DEBT: Final = 2
#: uses per second above which a measured use rate is taken for a glitch (a torn read)
MAX_USE_RATE: Final = 10_000_000.0


@dataclass(frozen=True, slots=True)
class LoanOffer:
    """A loan offered to a waiter (lending): where the lender lends, and the offer's ticket
    (the connection is kept for whoever presents it, for a moment)."""

    address: str
    ticket: int


class Offer(enum.Enum):
    """What became of an idle connection offered to the waiters (:meth:`Limiter.offer_loan`)."""

    #: the head of the queue was offered it (it is kept for that waiter)
    MADE = "made"
    #: the head of the queue cannot borrow it: hand the slot over, as without lending
    HAND_OVER = "hand over"
    #: every waiter has an offer out already (or nobody waits): keep it idle
    NOT_NEEDED = "not needed"


class WaitHook(Protocol):
    """What a slot wait does besides waiting (lending: take a loan instead of a slot)."""

    wants: int
    """The digest of the connections the waiter may borrow, or 0 if it borrows none (it is
    then never offered one)."""

    def __call__(self, offer: LoanOffer | None) -> None:
        """Before the wait (``offer`` None): borrow an idle connection if one is there and
        nobody waits. In the wait: claim ``offer``. Raising ends the wait (a loan came
        through); returning goes on waiting."""

    def decline(self, offer: LoanOffer) -> None:
        """Give back an offer the wait does not need (it got a slot meanwhile)."""


def local_host() -> str:
    """The name this host goes by in stats (its host name)."""
    return socket.gethostname()


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


@dataclass(frozen=True, slots=True, kw_only=True)
class HolderStats:
    """What one process (``pid`` on ``host``) holds of the budget."""

    host: str
    pid: int
    slots: int
    idle: int
    busy: int
    since: float
    alive: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class WaiterStats:
    """One process (``pid`` on ``host``) waiting for a slot."""

    host: str
    pid: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetStats:
    """A frozen snapshot of one budget, taken at one instant (under its mutex, for POSIX).

    Backend-neutral: ``holders`` and ``waiters`` name processes by host and pid; ``host`` is
    the host the snapshot was taken on; figures that only one backend has (the POSIX
    capacity, semaphore value, segment size) are in ``extra``.
    """

    name: str
    backend: str
    host: str
    limit: int
    in_use: int
    free: int
    waiting: int
    debt: int
    holders: tuple[HolderStats, ...]
    waiters: tuple[WaiterStats, ...]
    creator_pid: int
    created_at: float
    acquired_total: int
    reclaimed_total: int
    timeouts_total: int
    acquire_timeout: float | None
    idle_timeout: float | None
    hold_quantum: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditReport:
    """What an audit found on ``host``: slots and waiters of dead processes it reclaimed.

    Backend-specific figures (the POSIX semaphore correction) are in ``extra``.
    """

    host: str
    reclaimed_slots: tuple[tuple[int, int], ...] = ()  # (pid, slot index), pids of host
    dropped_waiters: tuple[int, ...] = ()  # pids of host
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Backend:
    """How ``configure(backend=...)`` reaches one backend.

    ``open(name, create=..., **options)`` opens (or creates) a budget, taking the options of
    :func:`mppools.configure`; ``validate_name`` raises ConfigurationError for a name the
    backend cannot hold; ``default_name`` makes a fresh name nobody can predict;
    ``host_bound`` is True when the budget needs this platform's shared objects (Linux);
    ``needs_threads`` when the process holding it runs a thread of the backend's own (the
    cross-host backend's lease keeper), which a process that must stay thread-free (a uWSGI
    master that forks from C, :func:`mppools._fork.forbid_threads`) cannot run.
    """

    spec: str
    open: Callable[..., Limiter]
    validate_name: Callable[[str], object]
    default_name: Callable[[], str]
    host_bound: bool = False
    needs_threads: bool = False


class Limiter(abc.ABC):
    """A budget of slots shared by every process that uses the same name.

    A backend calls ``super().__init__(name)``: that registers the limiter with the fork
    handler, which calls ``after_fork_in_child()`` in every forked child.
    """

    #: the backend's name in stats (``"posix"``, ``"memory"``)
    backend: ClassVar[str] = "?"
    name: str

    def __init__(self, name: str) -> None:
        self.name = name
        # limiters first: pools and keepers rebuilt after them may call into them
        _fork.register(self, priority=0)

    @abc.abstractmethod
    def acquire(self, *, block: bool = True, timeout: float | None = None,
                on_wait: WaitHook | None = None) -> Slot:
        """Take one slot.

        ``timeout=None`` waits for the budget's configured ``acquire_timeout``. Waiters are
        served in the order they came (FIFO); a slot given back goes to the oldest waiter.
        ``on_wait`` (lending) is called with None when no slot is free, before the wait
        starts, and with each loan offered to this waiter (``offer_loan``) during it
        (a backend may never call it); an exception it raises ends the wait (what was
        granted meanwhile is given back) and propagates: a loan leaves a wait so.

        Raises:
            LimitExceeded: no slot in time (at once if ``block`` is false).
            ConfigurationError: ``timeout`` is not None or a finite number of seconds >= 0.
        """

    @abc.abstractmethod
    def release(self, slot: Slot) -> None:
        """Give a slot back. Releasing a slot twice, or one inherited from a parent, is a no-op."""

    def mark_idle(self, slot: Slot) -> None:  # noqa: B027 - optional hook
        """Note that the connection holding ``slot`` sits idle in a local pool (cheap)."""

    def mark_busy(self, slot: Slot) -> None:  # noqa: B027 - optional hook
        """Note that the connection holding ``slot`` is in use (cheap)."""

    def cells(self, slot: Slot) -> tuple[memoryview, int, int] | None:
        """Where the warm path may store ``slot``'s state byte and read the pressure byte
        without a call: ``(view, state offset, pressure offset)``.

        The pools store :data:`STATE_BUSY` / :data:`STATE_IDLE` at the state offset and test
        :data:`PRESSURE_WAITING` / :data:`PRESSURE_DEBT` at the pressure offset; a view that
        raises ValueError (released) means the budget was closed. None if the backend has no
        such cells: then :meth:`mark_idle` / :meth:`mark_busy` / :meth:`under_pressure` /
        :meth:`in_debt` are called instead."""
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
        """The most seconds a connection in active use keeps its slot before it is handed on
        to a waiter (0: at its next release)."""
        return 0.0

    def handover_cost(self) -> float:
        """What handing a slot to a waiter has recently cost, in seconds (a running average
        over the budget's users; 0.0 while unknown). A cheap read."""
        return self._handover_cost

    def note_handover_cost(self, seconds: float) -> None:
        """Fold one measured hand-over (grant to first use done) into :meth:`handover_cost`."""
        if 0.0 <= seconds < 60.0:
            old = self._handover_cost
            self._handover_cost = seconds if old <= 0.0 else old + (seconds - old) / 8

    _handover_cost: float = 0.0

    def use_rate(self) -> float:
        """How many uses per second a connection in active use has recently served during
        its turn (a running average over the budget's users; 0.0 while unknown). A cheap
        read; the pools size a hold quantum in uses with it, so turns are fair in uses."""
        return self._use_rate

    def note_use_rate(self, per_second: float) -> None:
        """Fold one turn's uses per second into :meth:`use_rate`."""
        if 0.0 < per_second < MAX_USE_RATE:
            old = self._use_rate
            self._use_rate = per_second if old <= 0.0 else old + (per_second - old) / 8

    _use_rate: float = 0.0

    def note_yield(self) -> None:
        """Count one idle connection handed on at a waiter's request (``yields_total`` in
        :meth:`stats` ``extra``, where the backend keeps a budget-wide count; this default
        counts in this process only)."""
        self._yields_total += 1

    _yields_total: int = 0

    @property
    def acquire_timeout(self) -> float | None:
        """The wait bound of an acquire without an explicit timeout (None: forever)."""
        return None

    @abc.abstractmethod
    def audit(self) -> AuditReport:
        """Reclaim the slots of dead processes and make the free count exact."""

    @abc.abstractmethod
    def stats(self) -> BudgetStats:
        """A frozen snapshot of the budget."""

    @abc.abstractmethod
    def resize(self, limit: int, *, force: bool = False) -> None:
        """Change the limit for every process.

        Growing hands the new slots to waiters at once. Shrinking below the slots in use
        needs ``force``: the difference is then a debt, paid by the next releases before
        anything is handed on (``in_debt()`` is true meanwhile).

        Raises:
            BudgetInUseError: shrinking below the slots in use without ``force``.
            ConfigurationError: ``limit`` is not a positive int within the capacity.
        """

    @property
    @abc.abstractmethod
    def limit(self) -> int:
        """The current limit (a memory read)."""

    @abc.abstractmethod
    def unlink(self, *, force: bool = False) -> None:
        """Remove the budget itself, so that nobody can open it by name any more (this
        process's handle stays usable until :meth:`close`).

        Raises:
            BudgetInUseError: other live processes use it, and not ``force``.
        """

    def keeper_address(self) -> str | bytes | None:
        """Where this process receives idle-yield requests, or None if the backend has none
        (the keeper then only closes connections idle for longer than ``idle_timeout``)."""
        return None

    def lend_address(self) -> str | None:
        """Where this process lends its idle connections (:mod:`mppools._lending`), or None
        if the backend has no processes to lend to."""
        return None

    def lenders(self) -> list[str]:
        """The lend addresses of the other processes whose slots sit idle now, longest idle
        first (empty if the backend has none)."""
        return []

    def offer_loan(self, ticket: int, wants: int) -> Offer:
        """Offer the loan ``ticket`` (a connection of digest ``wants`` that this process
        keeps for the taker) to the head of the queue: the oldest waiter not offered one
        already, if it may borrow ``wants`` (see ``acquire``'s ``on_wait``). Anything but
        :attr:`Offer.MADE` means nobody was told (a backend without lending: HAND_OVER)."""
        return Offer.HAND_OVER

    def is_creator(self) -> bool:
        """True if this process created (or adopted) the budget and so removes it at exit."""
        return False

    def after_fork_in_child(self) -> None:  # noqa: B027 - optional hook
        """Rebuild in-process state (locks, threads' records) in a forked child. Called by
        the fork handler, before any pool is rebuilt; slots inherited from the parent are
        inert here (their epoch is the parent's)."""

    def _after_fork_in_child(self) -> None:
        # the fork handler's protocol (mppools._fork); backends override the public hook
        self.after_fork_in_child()

    def close(self) -> None:  # noqa: B027 - optional hook
        """Detach this process from the budget (slots it holds stay with it until released)."""

"""A read-only look at one budget for ``mppools check``: its snapshot and its live users.

The budget is attached the way ``mppools status`` does it (:func:`open_budget`: no slot is
taken, nothing is written); a budget that does not exist is never created.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from mppools._limiter._base import BudgetStats
from mppools._limiter.posix import DEFAULT_CAPACITY, PosixLimiter
from mppools._limiter.posix import _self as posix_self
from mppools._limiter.posix._names import sem_path, shm_path
from mppools._slots import WaiterState, segment_size
from mppools.cli._common import broken_kind, open_budget

__all__ = ["BudgetLook", "User", "look_at"]


@dataclass(frozen=True, slots=True)
class User:
    """One live process that holds slots of (``slots`` > 0) or waits on the budget; ``pid``,
    ``start`` and ``pidns`` as it recorded them (its own PID namespace's; ``pidns`` 0:
    unknown)."""

    role: str
    pid: int
    start: int
    pidns: int
    slots: int = 0


@dataclass(slots=True)
class BudgetLook:
    """What ``mppools check`` knows of budget ``name``: ``stats`` (None: no such budget, or
    unreadable: ``error``), the limit to check (the budget's, else ``--limit``), the bytes
    its segment takes in /dev/shm and how many of them are already allocated."""

    name: str
    exists: bool
    stats: BudgetStats | None = None
    damage: list[str] = field(default_factory=list)
    users: list[User] = field(default_factory=list)
    limit: int | None = None
    segment_bytes: int = 0
    allocated_bytes: int = 0
    error: str | None = None


def _users(limiter: PosixLimiter) -> list[User]:
    """The live holders and waiters with the PID namespace they recorded. BudgetStats does
    not carry it, so the records are read here, under the budget's mutex like stats()
    (read-only: nothing is cleared or repaired)."""
    with limiter._locked():
        me = posix_self.me()
        books = limiter._books
        table = limiter._table
        holders: dict[int, User] = {}
        for rec in table.used_slots():
            if not books.slot_alive(rec, me):
                continue
            known = holders.get(rec.owner)
            holders[rec.owner] = User("holder", rec.pid, rec.start, rec.pidns,
                                      (known.slots if known else 0) + 1)
        waiters = [User("waiter", w.pid, w.start, w.pidns)
                   for w in table.used_waiters()
                   if w.state == WaiterState.WAITING and books.waiter_alive(w, me)]
    return sorted(holders.values(), key=lambda u: u.pid) + sorted(waiters, key=lambda u: u.pid)


def look_at(name: str, planned_limit: int | None) -> BudgetLook:
    """Look at budget ``name`` without changing anything (never creates it)."""
    path = shm_path(name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        cap = max(DEFAULT_CAPACITY, planned_limit or 0)
        return BudgetLook(name, False, limit=planned_limit,
                          segment_bytes=segment_size(cap, cap))
    look = BudgetLook(name, True, limit=planned_limit, segment_bytes=st.st_size,
                      allocated_bytes=st.st_blocks * 512)
    if not os.path.lexists(sem_path(name)) and st.st_uid == os.geteuid():
        # attaching would create the semaphore: the check never creates anything
        look.error = (f"budget {name!r} is incomplete: its semaphore {sem_path(name)} is "
                      f"missing; the next configure() recovers it, or run `mppools unlink "
                      f"{name} --force`")
        return look
    try:
        with open_budget(name) as limiter:
            stats = limiter.stats()
            damage = limiter.damage()
            users = _users(limiter)
    except Exception as exc:
        look.error = (f"budget {name!r} cannot be read ({broken_kind(name, exc)}): "
                      f"{' '.join(str(exc).split()) or type(exc).__name__}")
        if look.segment_bytes == 0:
            cap = max(DEFAULT_CAPACITY, planned_limit or 0)
            look.segment_bytes = segment_size(cap, cap)
        return look
    look.stats, look.damage, look.users = stats, damage, users
    look.limit = stats.limit
    size = stats.extra.get("segment_bytes")
    if isinstance(size, int) and size > 0:
        look.segment_bytes = size
    return look

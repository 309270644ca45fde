"""The protocol steps, each run with the budget mutex held ("decide under the mutex").

Every step returns the wake-ups it decided on (paths of waiters' sockets); the caller sends
them after letting go of the mutex. The invariants, true whenever the mutex is free:

* a slot entry is in use iff its state byte is not FREE, and its holder keeps the entry's
  token (an OFD lock) for as long as it holds it;
* the semaphore's value is ``max(limit - in_use, 0)`` (it is only changed here);
* ``in_use <= limit`` except after a forced shrink, when the difference is the debt, paid
  by releases before anything is handed on.
"""

from __future__ import annotations

import time

from mppools import _fork
from mppools._limiter._base import AuditReport, Slot
from mppools._slots import (
    ACQUIRED_AT,
    FLAGS_AT,
    NEXT_TOKEN_AT,
    PRESSURE_DEBT,
    PRESSURE_WAITING,
    RECLAIMED_AT,
    SLOT_TOKENS_AT,
    WAITER_TOKENS_AT,
    SlotRecord,
    SlotState,
    Table,
    WaiterRecord,
    WaiterState,
)

from . import _tokens
from ._names import waiter_path
from ._self import Me

__all__ = ["Books"]


class Books:
    """The slot and waiter tables of one budget, its semaphore and this process's tokens."""

    def __init__(self, name: str, table: Table, sem: object, fd: int) -> None:
        self.name = name
        self.table = table
        self.sem = sem
        self.fd = fd

    # liveness ------------------------------------------------------------------------------
    def alive(self, owner: int, token_at: int, me: Me) -> bool:
        """Is the holder of an entry alive? Its token says so, in any namespace."""
        return owner == me.owner or _tokens.is_held(self.fd, token_at)

    def slot_alive(self, rec: SlotRecord, me: Me) -> bool:
        return self.alive(rec.owner, rec.token_at, me)

    def waiter_alive(self, w: WaiterRecord, me: Me) -> bool:
        return self.alive(w.owner, w.token_at, me)

    # pressure ------------------------------------------------------------------------------
    def publish_pressure(self) -> None:
        """The byte a releasing or reusing process reads without the lock: someone waits
        (hand the slot on instead of idling), the budget is over its limit (pay the debt)."""
        table = self.table
        flags = (PRESSURE_WAITING if table.waiting() else 0) | (
            PRESSURE_DEBT if table.in_use() > table.limit else 0)
        view = table.buf
        if view[FLAGS_AT] != flags:
            view[FLAGS_AT] = flags

    # semaphore -----------------------------------------------------------------------------
    def set_semaphore(self, target: int) -> int:
        import posix_ipc

        sem = self.sem
        value = int(sem.value)  # type: ignore[attr-defined]
        delta = target - value
        while value < target:
            sem.release()  # type: ignore[attr-defined]
            value += 1
        while value > target:
            try:
                sem.acquire(0)  # type: ignore[attr-defined]
            except posix_ipc.BusyError:  # pragma: no cover - only we change it, under the mutex
                break
            value -= 1
        return delta

    # the steps -----------------------------------------------------------------------------
    def settle(self, me: Me) -> list[str]:
        """Hand free slots to live waiters (oldest first), then make the semaphore exact."""
        table = self.table
        free = table.limit - table.in_use()
        wakes: list[str] = []
        if free > 0 and table.waiting():
            now = time.time()
            while free > 0:
                oldest = table.oldest_waiting()
                if oldest < 0:
                    break
                w = table.read_waiter(oldest)
                if not self.waiter_alive(w, me):
                    table.clear_waiter(w.index)
                    continue
                index = table.free_slot_index()
                token = table.bump(NEXT_TOKEN_AT)
                table.bump(ACQUIRED_AT)
                # until the waiter picks it up, the waiter's token proves the slot alive
                table.write_slot(index, SlotState.BUSY, w.pid, w.start, token, now,
                                 w.owner, w.pidns, w.index + 1)
                table.write_waiter(w.index, WaiterState.GRANTED, w.pid, w.start, w.nonce,
                                   w.ticket, index, token, w.owner, w.pidns)
                wakes.append(waiter_path(self.name, w.nonce))
                free -= 1
        self.set_semaphore(max(free, 0))
        return wakes

    def try_take(self, me: Me) -> Slot | None:
        """Take a free slot if the semaphore has one: decrement, record and token in one
        critical section."""
        import posix_ipc

        table = self.table
        try:
            self.sem.acquire(0)  # type: ignore[attr-defined]
        except posix_ipc.BusyError:
            return None
        try:
            states = table.slot_states()
            if table.capacity - states.count(0) >= table.limit:
                # the semaphore disagreed with the table (a crash inside a critical section):
                # the table is the truth
                self.settle(me)
                return None
            index = states.find(0)
            while index >= 0 and not _tokens.take(self.fd, SLOT_TOKENS_AT + index):
                # a free entry whose token is still held: a holder we cannot see cleared it
                # (never by this protocol); leave that entry alone
                index = states.find(0, index + 1)
            if index < 0:
                self.settle(me)
                return None
            token = table.bump(NEXT_TOKEN_AT)
            now = time.time()
            table.write_slot(index, SlotState.BUSY, me.pid, me.start, token, now,
                             me.owner, me.pidns, 0)
            table.bump(ACQUIRED_AT)
        except BaseException:
            self.settle(me)
            raise
        return Slot(index, token, me.pid, _fork.current_epoch(), now)

    def release(self, slot: Slot, me: Me) -> list[str] | None:
        """Give ``slot`` back; None if it was not ours any more (released or reclaimed)."""
        table = self.table
        rec = table.read_slot(slot.index)
        if rec.owner != me.owner or rec.token != slot.token or rec.state == SlotState.FREE:
            return None
        table.clear_slot(slot.index)
        _tokens.release(self.fd, SLOT_TOKENS_AT + slot.index)
        return self.settle(me)

    def holds(self, slot: Slot, me: Me) -> bool:
        rec = self.table.read_slot(slot.index)
        return rec.owner == me.owner and rec.token == slot.token and rec.state != SlotState.FREE

    def register_waiter(self, me: Me, nonce: int, ticket: int) -> int:
        """Add a waiter entry (with its token); -1 if the waiter table is full."""
        table = self.table
        states = table.waiter_states()
        index = states.find(0)
        while index >= 0 and not _tokens.take(self.fd, WAITER_TOKENS_AT + index):
            index = states.find(0, index + 1)
        if index >= 0:
            table.write_waiter(index, WaiterState.WAITING, me.pid, me.start, nonce, ticket,
                               0, 0, me.owner, me.pidns)
        return index

    def drop_waiter(self, windex: int) -> None:
        self.table.clear_waiter(windex)
        _tokens.release(self.fd, WAITER_TOKENS_AT + windex)

    def take_grant(self, windex: int, nonce: int, me: Me) -> Slot | None:
        """If our waiter entry was granted a slot, make it ours (token and all); else None."""
        table = self.table
        w = table.read_waiter(windex)
        if w.nonce != nonce or w.owner != me.owner or w.state != WaiterState.GRANTED:
            return None
        rec = table.read_slot(w.granted_index)
        self.drop_waiter(windex)
        if rec.token != w.granted_token or rec.owner != me.owner:  # pragma: no cover
            return None
        if not _tokens.take(self.fd, SLOT_TOKENS_AT + w.granted_index):  # pragma: no cover
            table.clear_slot(w.granted_index)
            return None
        table.set_slot_proof(w.granted_index, 0)
        return Slot(w.granted_index, w.granted_token, me.pid, _fork.current_epoch(), rec.since)

    def abandon(self, windex: int, nonce: int, me: Me) -> list[str]:
        """Leave the queue; give back a slot granted meanwhile."""
        table = self.table
        w = table.read_waiter(windex)
        if w.nonce != nonce or w.owner != me.owner:
            return []
        self.drop_waiter(windex)
        if w.state == WaiterState.GRANTED:
            rec = table.read_slot(w.granted_index)
            if rec.token == w.granted_token and rec.owner == me.owner:
                table.clear_slot(w.granted_index)
                return self.settle(me)
        return []

    def audit(self, me: Me) -> tuple[AuditReport, list[str]]:
        """Clear entries whose holder is dead (token free), then settle."""
        table = self.table
        reclaimed: list[tuple[int, int]] = []
        dropped: list[int] = []
        for rec in table.used_slots():
            if not self.slot_alive(rec, me):
                table.clear_slot(rec.index)
                reclaimed.append((rec.pid, rec.index))
        for w in table.used_waiters():
            if not self.waiter_alive(w, me):
                table.clear_waiter(w.index)
                dropped.append(w.pid)
        if reclaimed:
            table.bump(RECLAIMED_AT, len(reclaimed))
        expected = max(table.limit - table.in_use(), 0)
        correction = expected - int(self.sem.value)  # type: ignore[attr-defined]
        wakes = self.settle(me)
        # units handed to waiters are not a correction of the semaphore
        if wakes:
            correction = 0 if correction == len(wakes) else correction
        return AuditReport(tuple(reclaimed), tuple(dropped), correction), wakes

    def live_users(self, me: Me) -> dict[int, int]:
        """Live processes that hold or wait for slots: owner -> pid."""
        users = {r.owner: r.pid for r in self.table.used_slots() if self.slot_alive(r, me)}
        for w in self.table.used_waiters():
            if self.waiter_alive(w, me):
                users[w.owner] = w.pid
        return users

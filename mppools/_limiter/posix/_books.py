"""The protocol steps, each run with the budget mutex held ("decide under the mutex").

Every step returns the wake-ups it decided on (paths of waiters' sockets); the caller sends
them after letting go of the mutex. The invariants, true whenever the mutex is free:

* a slot entry is in use iff its state byte is not FREE, and its holder keeps the entry's
  token (an OFD lock) for as long as it holds it;
* the semaphore's value is ``max(limit - in_use, 0)`` (it is only changed here);
* ``in_use <= limit`` except after a forced shrink, when the difference is the debt, paid
  by releases before anything is handed on.

A damaged segment fails closed. Every decision first checks the header (:meth:`Table.check_header`:
a limit above the capacity, a changed layout field -> :class:`DamagedSegmentError`) and compares
the header's count of entries in use with the slot map (one field); when they disagree, or a
free-looking entry's token turns out to be held, the tables are rebuilt from the truth, the
tokens, before anything is decided (:meth:`Books.repair`, which every audit also runs). The
tokens are read with a classic ``F_GETLK``, which, unlike ``F_OFD_GETLK``, also reports the
locks of this process's own open file description: a lost record of our own is seen too.
"""

from __future__ import annotations

import re
import time

from mppools import _fork
from mppools._errors import DamagedSegmentError
from mppools._limiter._base import AuditReport, Slot, local_host
from mppools._slots import (
    ACQUIRED_AT,
    FLAGS_AT,
    NEXT_TOKEN_AT,
    PRESSURE_DEBT,
    PRESSURE_WAITING,
    RECLAIMED_AT,
    SLOT_TOKENS_AT,
    USED_OF,
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

_NONZERO = re.compile(b"[^\x00]")
_FREE_RUN = re.compile(b"\x00+")
_UNKNOWN = re.compile(b"[^\x00-\x02]")


def _differ(a: bytes, b: bytes) -> list[int]:
    """Indexes where the equally long ``a`` and ``b`` differ."""
    x = (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")
    return [m.start() for m in _NONZERO.finditer(x)]


class Books:
    """The slot and waiter tables of one budget, its semaphore and this process's tokens."""

    def __init__(self, name: str, table: Table, sem: object, fd: int) -> None:
        self.name = name
        self.table = table
        self.sem = sem
        self.fd = fd
        if not table.name:
            table.name = name

    # liveness ------------------------------------------------------------------------------
    def alive(self, owner: int, token_at: int, me: Me) -> bool:
        """Is the holder of an entry alive? Its token says so, in any namespace.

        Our own entries need no look; any other entry's token is looked up among the locks
        of every open file description, this process's own included: if our own token sits
        under a record that is not (or no longer) ours, the entry is in use all the same.
        """
        return owner == me.owner or _tokens.held_by_anyone(self.fd, token_at)

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

    # damage --------------------------------------------------------------------------------
    def check(self, me: Me) -> int:
        """Before a decision: refuse a damaged header; rebuild the tables from the tokens if
        the header's count of entries in use disagrees with the slot map. Returns the
        entries in use.

        Raises:
            DamagedSegmentError: the header is damaged (nothing can be decided on it).
        """
        table = self.table
        table.check_header()
        in_use = table.in_use()
        if table.slots_used != in_use:
            self.repair(me)
            in_use = table.in_use()
        return in_use

    def repair(self, me: Me) -> int:
        """Make the state maps agree with the records and the tokens; return how many entries
        were repaired. Under the mutex.

        An entry in doubt (its map byte unknown, map and record disagreeing, or a free entry
        whose slot token is held) is in use iff its token is held by anyone: then it gets a
        known state (BUSY if its byte was unknown or wiped), and a lost record a placeholder
        that keeps the place until the token's holder exits; otherwise it is cleared. Then the
        header's count is made exact.
        """
        table = self.table
        fd = self.fd
        fixed = 0
        states = table.slot_states()
        records = table.slot_record_states()
        used, recorded = states.translate(USED_OF), records.translate(USED_OF)
        doubt = set(_differ(used, recorded)) if used != recorded else set()
        doubt.update(m.start() for m in _UNKNOWN.finditer(states))
        either = used if used == recorded else bytes(
            a | b for a, b in zip(used, recorded, strict=True))
        for run in _FREE_RUN.finditer(either):  # free in both copies: do the tokens agree?
            doubt.update(i - SLOT_TOKENS_AT for i in _tokens.held_in(
                fd, SLOT_TOKENS_AT + run.start(), run.end() - run.start()))
        now = time.time()
        for i in sorted(doubt):
            rec = table.read_slot(i)
            live = _tokens.held_by_anyone(fd, SLOT_TOKENS_AT + i) or bool(
                recorded[i] and rec.proof and _tokens.held_by_anyone(fd, rec.token_at))
            if not live:
                table.clear_slot(i)
            else:
                if not recorded[i]:
                    # the record is lost: hold the place until the token is given up
                    table.write_slot(i, SlotState.BUSY, 0, 0, 0, now)
                byte = states[i]
                table.set_slot_state(i, SlotState(byte) if byte in (1, 2) else SlotState.BUSY)
            fixed += 1
        in_use = table.in_use()
        if table.slots_used != in_use:
            table.set_slots_used(in_use)
        # waiters: only FIFO order and hand-offs depend on them, never the count
        wstates = table.waiter_states()
        wrecords = table.waiter_record_states()
        wused, wrecorded = wstates.translate(USED_OF), wrecords.translate(USED_OF)
        wdoubt = set(_differ(wused, wrecorded)) if wused != wrecorded else set()
        wdoubt.update(m.start() for m in _UNKNOWN.finditer(wstates))
        for j in sorted(wdoubt):
            if not _tokens.held_by_anyone(fd, WAITER_TOKENS_AT + j):
                table.clear_waiter(j)
            elif wrecords[j] in (1, 2):
                table.set_waiter_state(j, WaiterState(wrecords[j]))
            else:
                # no usable record: granted nothing, waiting for nothing, until its token goes
                table.write_waiter(j, WaiterState.GRANTED, 0, 0, 0, 0, 0, 0)
            fixed += 1
        return fixed

    def damage(self) -> list[str]:
        """What is wrong in the tables, in words (read-only: for `mppools status`).

        Raises:
            DamagedSegmentError: the header is damaged.
        """
        table = self.table
        table.check_header()
        found: list[str] = []
        states = table.slot_states()
        used = states.translate(USED_OF)
        unknown = len(_UNKNOWN.findall(states))
        if unknown:
            found.append(f"{unknown} slot state byte(s) out of range")
        differ = len(_differ(used, table.slot_record_states().translate(USED_OF)))
        if differ:
            found.append(f"{differ} slot state byte(s) disagree with their records")
        in_use = table.capacity - used.count(0)
        if table.slots_used != in_use:
            found.append(f"the header counts {table.slots_used} slot(s) in use, the slot map "
                         f"{in_use}")
        wstates = table.waiter_states()
        wunknown = len(_UNKNOWN.findall(wstates))
        wdiffer = len(_differ(wstates.translate(USED_OF),
                              table.waiter_record_states().translate(USED_OF)))
        if wunknown or wdiffer:
            found.append(f"{wunknown + wdiffer} waiter entr(y/ies) damaged")
        return found

    # the steps -----------------------------------------------------------------------------
    def settle(self, me: Me) -> list[str]:
        """Hand free slots to live waiters (oldest first), then make the semaphore exact.

        Raises:
            DamagedSegmentError: the header is damaged.
        """
        table = self.table
        free = table.limit - self.check(me)
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
                if _tokens.held_by_anyone(self.fd, SLOT_TOKENS_AT + index):
                    # the table lost a live holder: rebuild it from the tokens, count again
                    self.repair(me)
                    free = table.limit - table.in_use()
                    continue
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
        table.check_header()
        try:
            self.sem.acquire(0)  # type: ignore[attr-defined]
        except posix_ipc.BusyError:
            return None
        try:
            index = -1
            for _ in range(3):
                states = table.slot_states()
                in_use = table.capacity - states.count(0)
                if in_use != table.slots_used:
                    # the map and the header's count disagree: rebuild from the tokens
                    self.repair(me)
                    continue
                if in_use >= table.limit:
                    # the semaphore disagreed with the table (a crash inside a critical
                    # section): the table is the truth
                    break
                free = states.find(0)
                at = SLOT_TOKENS_AT + free
                if (free >= 0 and not _tokens.held_by_anyone(self.fd, at)
                        and _tokens.take(self.fd, at)):
                    index = free
                    break
                # a free entry whose token is held (ours included): the table lost a live
                # holder, never by this protocol. Rebuild it from the tokens, decide again
                self.repair(me)
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
        try:
            return self.settle(me)
        except DamagedSegmentError:
            # giving back never fails; nothing is handed on from a damaged budget
            self.set_semaphore(0)
            return []

    def holds(self, slot: Slot, me: Me) -> bool:
        rec = self.table.read_slot(slot.index)
        return rec.owner == me.owner and rec.token == slot.token and rec.state != SlotState.FREE

    def register_waiter(self, me: Me, nonce: int, ticket: int, wants: int = 0) -> int:
        """Add a waiter entry (with its token) that may borrow connections of digest
        ``wants`` (0: none); -1 if the waiter table is full."""
        table = self.table
        states = table.waiter_states()
        index = states.find(0)
        while index >= 0 and not _tokens.take(self.fd, WAITER_TOKENS_AT + index):
            index = states.find(0, index + 1)
        if index >= 0:
            table.write_waiter(index, WaiterState.WAITING, me.pid, me.start, nonce, ticket,
                               0, wants, me.owner, me.pidns)
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
        self.drop_waiter(windex)
        if not 0 <= w.granted_index < table.capacity:  # a damaged record: no grant
            return None
        rec = table.read_slot(w.granted_index)
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
        if w.state == WaiterState.GRANTED and 0 <= w.granted_index < table.capacity:
            rec = table.read_slot(w.granted_index)
            if rec.token == w.granted_token and rec.owner == me.owner:
                table.clear_slot(w.granted_index)
                try:
                    return self.settle(me)
                except DamagedSegmentError:  # leaving never fails (see release)
                    self.set_semaphore(0)
        return []

    def audit(self, me: Me) -> tuple[AuditReport, list[str]]:
        """Repair the tables from the tokens, clear entries whose holder is dead (token
        free), then settle.

        Raises:
            DamagedSegmentError: the header is damaged.
        """
        table = self.table
        table.check_header()
        self.repair(me)
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
        report = AuditReport(host=local_host(), reclaimed_slots=tuple(reclaimed),
                             dropped_waiters=tuple(dropped),
                             extra={"semaphore_corrected": correction})
        return report, wakes

    def live_users(self, me: Me) -> dict[int, int]:
        """Live processes that hold or wait for slots: owner -> pid (also of a budget whose
        header is damaged: who uses it is what an unlink must know)."""
        users = {r.owner: r.pid for r in self.table.records_in_use()
                 if self.slot_alive(r, me)}
        for w in self.table.used_waiters():
            if self.waiter_alive(w, me):
                users[w.owner] = w.pid
        return users

"""The shared-memory layout of one budget: a versioned header, a slot table, a waiter table.

Everything is fixed-size and little-endian so that a segment is never misread: a reader first
checks the magic and the layout version and refuses anything else.

::

    offset 0            header (HEADER_SIZE bytes)
    slot map            capacity bytes (rounded up to 64): the state of each slot, FREE/BUSY/IDLE
    slot records        capacity x SLOT_SIZE: pid, start ticks, token, since, owner, pid ns, proof
    waiter map          waiter_capacity bytes (rounded up to 64): FREE/WAITING/GRANTED
    waiter records      waiter_capacity x WAITER_SIZE

Who holds an entry is proven by a *token*: an OFD lock (``F_OFD_SETLK``) that the holder keeps
on one byte of the segment file far beyond its end (:data:`SLOT_TOKENS_AT` + slot index,
:data:`WAITER_TOKENS_AT` + waiter index). The kernel drops it when the holder's last fd of its
open file description closes, i.e. when the holder dies, in whatever PID or network namespace
it runs; no /proc is needed to tell. A granted slot that its waiter has not picked up yet is
proven by the waiter's token (``proof`` = waiter index + 1). ``owner`` is a random number per
process image, so a process recognises its own entries (its own OFD locks never conflict with
itself); ``pidns`` is the inode of the holder's PID namespace (0: unknown), so a waiter watches a
holder's pidfd only where its pid means the same process.

The states live in dense byte maps, apart from the records, so that counting and finding
free entries is one contiguous copy and a C-level search, whatever the capacity.

The header also counts the slot entries in use (``slots_used``, kept by :meth:`Table.write_slot`
and :meth:`Table.clear_slot`): a second, independent account of the slot map. Every decision
compares the two (one field read) and, when they disagree, the map is rebuilt from the truth,
the tokens, before anything is handed out (see ``Books.repair``). Reads never trust a state
byte: a value outside the enum reads as BUSY (an unknown entry counts as used, never as free).

Byte 0 of the segment is also the byte the cross-process mutex locks (``fcntl.lockf``).
Every read-modify-write of the tables happens under that mutex, with one exception: a process
stores the IDLE/BUSY state byte of a slot it owns (one byte, no lock), so waiters can tell
idle slots from busy ones.

A WAITING entry uses its two grant fields for lending (docs/concepts.md, "Lending"): the
grant token holds the digest of the connections the waiter may borrow (0: it cannot borrow),
the grant index is non-zero while a loan is offered to it. A grant overwrites both.
"""

from __future__ import annotations

import enum
import math
import re
import struct
from dataclasses import dataclass
from typing import Final

from mppools._errors import DamagedSegmentError

__all__ = [
    "CREATOR_TOKEN_AT",
    "HANDOVER_COST_AT",
    "HEADER",
    "HEADER_SIZE",
    "LAYOUT_VERSION",
    "MAGIC",
    "OPENERS_AT",
    "PRESSURE_DEBT",
    "PRESSURE_WAITING",
    "SLOT",
    "SLOTS_USED_AT",
    "SLOT_SIZE",
    "SLOT_TOKENS_AT",
    "USED_OF",
    "USE_RATE_AT",
    "WAITER",
    "WAITER_SIZE",
    "WAITER_TOKENS_AT",
    "YIELDS_AT",
    "Header",
    "SlotRecord",
    "SlotState",
    "Table",
    "WaiterRecord",
    "WaiterState",
    "segment_size",
    "slot_state",
    "waiter_state",
]

MAGIC: Final = b"MPPOOLS\x00"
LAYOUT_VERSION: Final = 2

# magic, version, header size, slot size, waiter size, capacity, waiter capacity, limit,
# creator pid, flags, creator start, created at, generation, next token, reclaimed total,
# timeouts total, acquired total, acquire timeout (-1: none), idle timeout (-1: none), uid,
# pad, creator owner (see SlotRecord.owner), hold quantum (seconds), slot entries in use
# (the count of non-FREE bytes in the slot map)
HEADER: Final = struct.Struct("<8sIIIIIIIIIQdQQQQQddI4xQdI")
HEADER_SIZE: Final = 256
# state, pad, pid, start ticks, token, since (wall clock), owner, pid ns, proof
SLOT: Final = struct.Struct("<B3xIQQdQQI")
SLOT_SIZE: Final = 64
# state, pad, pid, start ticks, nonce (the waiter's socket), ticket (FIFO order),
# granted slot index, pad, granted token, owner, pid ns
WAITER: Final = struct.Struct("<B3xIQQQI4xQQQ")
WAITER_SIZE: Final = 64
#: file offsets of the token bytes (OFD locks, never data): far beyond any segment's end
SLOT_TOKENS_AT: Final = 1 << 40
WAITER_TOKENS_AT: Final = 1 << 41
#: the creator's token: held by the process that created (or adopted) the budget
CREATOR_TOKEN_AT: Final = (1 << 40) - 1
#: read-locked (shared) by every open file description that has the budget open: an unlink
#: that is not forced is refused while another description holds it
OPENERS_AT: Final = (1 << 40) - 2
#: bits of the pressure byte (header offset FLAGS_AT), read by the warm path without a lock
PRESSURE_WAITING: Final = 1
PRESSURE_DEBT: Final = 2

assert HEADER.size <= HEADER_SIZE
assert SLOT.size <= SLOT_SIZE
assert WAITER.size <= WAITER_SIZE


class SlotState(enum.IntEnum):
    FREE = 0
    BUSY = 1
    IDLE = 2


class WaiterState(enum.IntEnum):
    FREE = 0
    WAITING = 1
    GRANTED = 2


@dataclass
class Header:
    magic: bytes
    version: int
    header_size: int
    slot_size: int
    waiter_size: int
    capacity: int
    waiter_capacity: int
    limit: int
    creator_pid: int
    flags: int
    creator_start: int
    created_at: float
    generation: int
    next_token: int
    reclaimed_total: int
    timeouts_total: int
    acquired_total: int
    acquire_timeout: float
    idle_timeout: float
    uid: int
    creator_owner: int = 0
    hold_quantum: float = 0.0
    slots_used: int = 0


@dataclass(frozen=True)
class SlotRecord:
    index: int
    state: SlotState
    pid: int
    start: int
    token: int
    since: float
    owner: int = 0
    pidns: int = 0
    proof: int = 0

    @property
    def token_at(self) -> int:
        """The file offset of the OFD lock that proves this slot's holder alive."""
        if self.proof:
            return WAITER_TOKENS_AT + self.proof - 1
        return SLOT_TOKENS_AT + self.index


@dataclass(frozen=True)
class WaiterRecord:
    index: int
    state: WaiterState
    pid: int
    start: int
    nonce: int
    ticket: int
    granted_index: int
    granted_token: int
    owner: int = 0
    pidns: int = 0

    @property
    def token_at(self) -> int:
        return WAITER_TOKENS_AT + self.index

    @property
    def wants(self) -> int:
        """While WAITING: the digest of the connections it may borrow (0: none)."""
        return self.granted_token if self.state == WaiterState.WAITING else 0

    @property
    def offered(self) -> bool:
        """While WAITING: a loan is offered to it (it is not offered another meanwhile)."""
        return self.state == WaiterState.WAITING and self.granted_index != 0


#: byte offsets of the header fields read or bumped on their own
LIMIT_AT: Final = 32
FLAGS_AT: Final = 40
NEXT_TOKEN_AT: Final = 68
RECLAIMED_AT: Final = 76
TIMEOUTS_AT: Final = 84
ACQUIRED_AT: Final = 92
SLOTS_USED_AT: Final = 140
#: a running average of what a hand-over costs (seconds, double), kept by the pools without
#: the mutex: an estimate, read clamped, so a torn or damaged value only shapes a quantum
HANDOVER_COST_AT: Final = 144
#: a running average of how many uses a connection in active use serves per second of its
#: turn (double; the same kind of estimate): sizes a hold quantum in uses (fair turns)
USE_RATE_AT: Final = 152
#: idle connections handed on because a waiter asked (u64, bumped under the mutex)
YIELDS_AT: Final = 160
assert HEADER.size == SLOTS_USED_AT + 4
#: the header fields a mapping never sees change: magic, version, header, slot and waiter
#: sizes, capacity, waiter capacity
_FIXED_END: Final = 32
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_USED = re.compile(b"[^\x00]")
_WAITING = re.compile(b"\x01")
# the ticket's offset inside a waiter record (after state, pad, pid, start, nonce)
_TICKET_OFFSET = struct.calcsize("<B3xIQQ")
# the grant index's offset inside a waiter record (after state, pad, pid, start, nonce,
# ticket): a WAITING entry's offer mark
_OFFER_OFFSET = struct.calcsize("<B3xIQQQ")
# the proof's offset inside a slot record (after state, pad, pid, start, token, since, owner, ns)
_PROOF_OFFSET = struct.calcsize("<B3xIQQdQQ")
_FIXED = struct.Struct("<8sIIIIII")
#: a state byte as read: values outside the enum read as BUSY (used, never free)
_SLOT_STATES: Final = (SlotState.FREE, SlotState.BUSY, SlotState.IDLE)
_WAITER_STATES: Final = (WaiterState.FREE, WaiterState.WAITING, WaiterState.GRANTED)
#: bytes.translate tables: a state byte to 0 (FREE) or 1 (anything else)
USED_OF: Final = bytes([0] + [1] * 255)


def slot_state(value: int) -> SlotState:
    """The state a slot-map byte stands for; an unknown value is BUSY (fail closed)."""
    return _SLOT_STATES[value] if value < 3 else SlotState.BUSY


def waiter_state(value: int) -> WaiterState:
    """The state a waiter-map byte stands for; an unknown value is WAITING."""
    return _WAITER_STATES[value] if value < 3 else WaiterState.WAITING


def _repair_hint(name: str) -> str:
    return f"stop its users and run `mppools unlink {name} --force`, then configure it again"


def _round64(n: int) -> int:
    return (n + 63) // 64 * 64


def segment_size(capacity: int, waiter_capacity: int) -> int:
    """Bytes of shared memory for a budget of ``capacity`` slots and ``waiter_capacity`` waiters."""
    return (HEADER_SIZE + _round64(capacity) + capacity * SLOT_SIZE
            + _round64(waiter_capacity) + waiter_capacity * WAITER_SIZE)


class Table:
    """Typed access to one mapped segment. Callers hold the mutex for anything but reads of
    single fields and the owner's state-byte stores."""

    def __init__(
        self, buf: memoryview, capacity: int, waiter_capacity: int, name: str = ""
    ) -> None:
        self.buf = buf
        self.capacity = capacity
        self.waiter_capacity = waiter_capacity
        #: the budget's name, for the messages of DamagedSegmentError
        self.name = name
        self.slot_map_at = HEADER_SIZE
        self._slots_at = self.slot_map_at + _round64(capacity)
        self._wmap_at = self._slots_at + capacity * SLOT_SIZE
        self.waiter_map_at = self._wmap_at
        self._waiters_at = self._wmap_at + _round64(waiter_capacity)
        self._fixed: bytes | None = None  # the fixed header fields, once checked

    # header ------------------------------------------------------------------------------
    def read_header(self) -> Header:
        return Header(*HEADER.unpack_from(self.buf, 0))

    def write_header(self, h: Header) -> None:
        HEADER.pack_into(
            self.buf, 0, h.magic, h.version, h.header_size, h.slot_size, h.waiter_size,
            h.capacity, h.waiter_capacity, h.limit, h.creator_pid, h.flags, h.creator_start,
            h.created_at, h.generation, h.next_token, h.reclaimed_total, h.timeouts_total,
            h.acquired_total, h.acquire_timeout, h.idle_timeout, h.uid, h.creator_owner,
            h.hold_quantum, h.slots_used,
        )

    def check_header(self) -> None:
        """Refuse a header this mapping cannot have: changed layout fields or capacities, a
        limit of 0 or above the capacity. Cheap (a compare and one field read): it runs at
        every decision, so a damaged header is never obeyed.

        Raises:
            DamagedSegmentError: naming the budget, what is wrong and the repair command.
        """
        buf = self.buf
        fixed = self._fixed
        if fixed is None or buf[:_FIXED_END] != fixed:
            self._check_fixed()
        limit = _U32.unpack_from(buf, LIMIT_AT)[0]
        if not 1 <= limit <= self.capacity:
            raise DamagedSegmentError(
                f"budget {self.name!r} is damaged: its header says limit {limit} with "
                f"capacity {self.capacity} (a limit is from 1 to the capacity); "
                f"{_repair_hint(self.name)}"
            )

    def _check_fixed(self) -> None:
        magic, version, header_size, slot_size, waiter_size, capacity, waiter_capacity = (
            _FIXED.unpack_from(self.buf, 0))
        wrong = []
        if magic != MAGIC:
            wrong.append(f"magic {magic!r}")
        if (version, header_size, slot_size, waiter_size) != (
                LAYOUT_VERSION, HEADER_SIZE, SLOT_SIZE, WAITER_SIZE):
            wrong.append(f"layout version {version} (header {header_size}, slot {slot_size}, "
                         f"waiter {waiter_size} bytes)")
        if capacity != self.capacity:
            wrong.append(f"capacity {capacity} (it was {self.capacity})")
        if waiter_capacity != self.waiter_capacity:
            wrong.append(f"waiter capacity {waiter_capacity} (it was {self.waiter_capacity})")
        if wrong:
            raise DamagedSegmentError(
                f"budget {self.name!r} is damaged: its header changed under its users to "
                f"{', '.join(wrong)}; {_repair_hint(self.name)}"
            )
        self._fixed = self.buf[:_FIXED_END].tobytes()

    @property
    def slots_used(self) -> int:
        """The header's count of slot entries in use (compare :meth:`in_use`)."""
        return int(_U32.unpack_from(self.buf, SLOTS_USED_AT)[0])

    def set_slots_used(self, count: int) -> None:
        _U32.pack_into(self.buf, SLOTS_USED_AT, count)

    @property
    def limit(self) -> int:
        return int(_U32.unpack_from(self.buf, LIMIT_AT)[0])

    def read_u64(self, offset: int) -> int:
        """The 64-bit counter at ``offset``."""
        return int(_U64.unpack_from(self.buf, offset)[0])

    def bump(self, offset: int, delta: int = 1) -> int:
        """Add ``delta`` to the 64-bit counter at ``offset``; return its value before."""
        (value,) = _U64.unpack_from(self.buf, offset)
        _U64.pack_into(self.buf, offset, value + delta)
        return int(value)

    # slots -------------------------------------------------------------------------------
    def slot_offset(self, index: int) -> int:
        return self._slots_at + index * SLOT_SIZE

    def read_slot(self, index: int) -> SlotRecord:
        """Slot ``index`` as recorded; never fails on garbage: an unknown state byte reads as
        BUSY, a ``since`` that is not a finite number as 0.0."""
        _, pid, start, token, since, owner, pidns, proof = SLOT.unpack_from(
            self.buf, self.slot_offset(index))
        if not math.isfinite(since):
            since = 0.0
        return SlotRecord(index, slot_state(self.buf[self.slot_map_at + index]), pid, start,
                          token, since, owner, pidns, proof)

    def write_slot(
        self, index: int, state: SlotState, pid: int, start: int, token: int, since: float,
        owner: int = 0, pidns: int = 0, proof: int = 0,
    ) -> None:
        SLOT.pack_into(self.buf, self.slot_offset(index), state, pid, start, token, since,
                       owner, pidns, proof)
        at = self.slot_map_at + index
        if not self.buf[at] and state:
            self._count_used(1)
        self.buf[at] = state

    def set_slot_proof(self, index: int, proof: int) -> None:
        """Point slot ``index``'s proof at its own token (0) or a waiter's (index + 1)."""
        struct.pack_into("<I", self.buf, self.slot_offset(index) + _PROOF_OFFSET, proof)

    def clear_slot(self, index: int) -> None:
        at = self.slot_map_at + index
        if self.buf[at]:
            self._count_used(-1)
        self.buf[at] = 0
        SLOT.pack_into(self.buf, self.slot_offset(index), 0, 0, 0, 0, 0.0, 0, 0, 0)

    def _count_used(self, delta: int) -> None:
        (count,) = _U32.unpack_from(self.buf, SLOTS_USED_AT)
        _U32.pack_into(self.buf, SLOTS_USED_AT, min(max(count + delta, 0), 0xFFFFFFFF))

    def slot_record_states(self) -> bytes:
        """The state byte each slot *record* keeps (non-zero while the entry is in use),
        one per slot: the map's second copy, read when the map is in doubt."""
        at = self._slots_at
        return self.buf[at : at + self.capacity * SLOT_SIZE : SLOT_SIZE].tobytes()

    def slot_states(self) -> bytes:
        """The state byte of every slot, in one contiguous copy."""
        return self.buf[self.slot_map_at : self.slot_map_at + self.capacity].tobytes()

    def used_slots(self) -> list[SlotRecord]:
        """Every slot entry in use (unknown states included, as BUSY).

        Raises:
            DamagedSegmentError: the header is damaged (see :meth:`check_header`).
        """
        self.check_header()
        return self.records_in_use()

    def records_in_use(self) -> list[SlotRecord]:
        """Every slot entry in use, whatever the header says (to find a budget's users)."""
        return [self.read_slot(m.start()) for m in _USED.finditer(self.slot_states())]

    def in_use(self) -> int:
        return self.capacity - self.slot_states().count(0)

    def free_slot_index(self) -> int:
        index = self.slot_states().find(0)
        if index < 0:  # pragma: no cover - the limit is capped at capacity
            raise RuntimeError("slot table is full")
        return index

    # waiters -----------------------------------------------------------------------------
    def waiter_offset(self, index: int) -> int:
        return self._waiters_at + index * WAITER_SIZE

    def read_waiter(self, index: int) -> WaiterRecord:
        _, pid, start, nonce, ticket, gidx, gtoken, owner, pidns = WAITER.unpack_from(
            self.buf, self.waiter_offset(index)
        )
        state = waiter_state(self.buf[self._wmap_at + index])
        return WaiterRecord(index, state, pid, start, nonce, ticket, gidx, gtoken, owner, pidns)

    def write_waiter(
        self,
        index: int,
        state: WaiterState,
        pid: int,
        start: int,
        nonce: int,
        ticket: int,
        granted_index: int = 0,
        granted_token: int = 0,
        owner: int = 0,
        pidns: int = 0,
    ) -> None:
        WAITER.pack_into(
            self.buf, self.waiter_offset(index), state, pid, start, nonce, ticket,
            granted_index, granted_token, owner, pidns,
        )
        self.buf[self._wmap_at + index] = state

    def clear_waiter(self, index: int) -> None:
        self.buf[self._wmap_at + index] = 0
        WAITER.pack_into(self.buf, self.waiter_offset(index), 0, 0, 0, 0, 0, 0, 0, 0, 0)

    def waiter_states(self) -> bytes:
        return self.buf[self._wmap_at : self._wmap_at + self.waiter_capacity].tobytes()

    def waiter_record_states(self) -> bytes:
        """The state byte each waiter *record* keeps, one per entry (see
        :meth:`slot_record_states`)."""
        at = self._waiters_at
        return self.buf[at : at + self.waiter_capacity * WAITER_SIZE : WAITER_SIZE].tobytes()

    def set_waiter_state(self, index: int, state: WaiterState) -> None:
        """Store waiter ``index``'s map byte alone (repairs only)."""
        self.buf[self._wmap_at + index] = state

    def set_slot_state(self, index: int, state: SlotState) -> None:
        """Store slot ``index``'s map byte alone, keeping the header's count (repairs only;
        the warm path stores IDLE/BUSY through the cells)."""
        at = self.slot_map_at + index
        was = self.buf[at]
        if bool(was) != bool(state):
            self._count_used(1 if state else -1)
        self.buf[at] = state

    def waiting(self) -> int:
        """Waiter entries in use (WAITING or GRANTED, not yet picked up)."""
        return self.waiter_capacity - self.waiter_states().count(0)

    def used_waiters(self) -> list[WaiterRecord]:
        return [self.read_waiter(m.start()) for m in _USED.finditer(self.waiter_states())]

    def oldest_waiting(self) -> int:
        """Index of the WAITING entry with the smallest ticket (FIFO order), or -1.

        Reads only the state map and the ticket field of each entry in use: this runs on
        every release while processes wait, so it avoids decoding whole records.
        """
        states = self.waiter_states()
        best, best_ticket = -1, 0
        buf, base = self.buf, self._waiters_at + _TICKET_OFFSET
        for m in _WAITING.finditer(states):
            i = m.start()
            (ticket,) = _U64.unpack_from(buf, base + i * WAITER_SIZE)
            if best < 0 or ticket < best_ticket:
                best, best_ticket = i, ticket
        return best

    def oldest_to_offer(self, wants: int, not_owner: int) -> int:
        """Index of the waiter a loan of ``wants`` goes to: the oldest WAITING entry without
        an offer out, if it may borrow ``wants`` and is not of ``not_owner``; -1 if that
        entry cannot borrow it; -2 if every WAITING entry has an offer out (or none waits).

        Only the head of the queue (offered entries aside) is offered a loan: a waiter that
        cannot borrow (another broker, lending off, a raw connection) keeps its place, and
        the connection is handed over to it instead.
        """
        for index in sorted(self.waiting_indexes(), key=self._ticket_at):
            w = self.read_waiter(index)
            if w.offered:
                continue
            return index if w.wants == wants and w.owner != not_owner else -1
        return -2

    def waiting_indexes(self) -> list[int]:
        return [m.start() for m in _WAITING.finditer(self.waiter_states())]

    def _ticket_at(self, index: int) -> int:
        (ticket,) = _U64.unpack_from(self.buf, self._waiters_at + _TICKET_OFFSET
                                     + index * WAITER_SIZE)
        return int(ticket)

    def set_offered(self, index: int, offered: bool) -> None:
        """Set or clear WAITING entry ``index``'s offer mark (no-op on any other state)."""
        if waiter_state(self.buf[self._wmap_at + index]) != WaiterState.WAITING:
            return
        _U32.pack_into(self.buf, self.waiter_offset(index) + _OFFER_OFFSET, 1 if offered else 0)

    def free_waiter_index(self) -> int:
        return self.waiter_states().find(0)

"""The shared-memory layout of one budget: a versioned header, a slot table, a waiter table.

Everything is fixed-size and little-endian so that a segment is never misread: a reader first
checks the magic and the layout version and refuses anything else.

::

    offset 0                 header (HEADER_SIZE bytes)
    offset HEADER_SIZE       capacity x slot record   (SLOT_SIZE bytes each, cache-line sized)
    then                     waiter_capacity x waiter record (WAITER_SIZE bytes each)

Byte 0 of the segment is also the byte the cross-process mutex locks (``fcntl.lockf``).
Every read-modify-write of the tables happens under that mutex, with one exception: a process
stores the IDLE/BUSY state byte of a slot record it owns (one byte, no lock), so waiters can
tell idle slots from busy ones.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "LAYOUT_VERSION",
    "MAGIC",
    "SLOT",
    "SLOT_SIZE",
    "WAITER",
    "WAITER_SIZE",
    "Header",
    "SlotRecord",
    "SlotState",
    "Table",
    "WaiterRecord",
    "WaiterState",
    "segment_size",
]

MAGIC: Final = b"MPPOOLS\x00"
LAYOUT_VERSION: Final = 1

# magic, version, header size, slot size, waiter size, capacity, waiter capacity, limit,
# creator pid, flags, creator start, created at, generation, next token, reclaimed total,
# timeouts total, acquired total, acquire timeout (-1: none), idle timeout (-1: none), uid
HEADER: Final = struct.Struct("<8sIIIIIIIIIQdQQQQQddI")
HEADER_SIZE: Final = 256
# state, pad, pid, start ticks, token, since (wall clock)
SLOT: Final = struct.Struct("<B3xIQQd")
SLOT_SIZE: Final = 64
# state, pad, pid, start ticks, nonce (the waiter's socket), ticket (FIFO order),
# granted slot index, pad, granted token
WAITER: Final = struct.Struct("<B3xIQQQI4xQ")
WAITER_SIZE: Final = 48

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


@dataclass(frozen=True)
class SlotRecord:
    index: int
    state: SlotState
    pid: int
    start: int
    token: int
    since: float


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


def segment_size(capacity: int, waiter_capacity: int) -> int:
    """Bytes of shared memory for a budget of ``capacity`` slots and ``waiter_capacity`` waiters."""
    return HEADER_SIZE + capacity * SLOT_SIZE + waiter_capacity * WAITER_SIZE


class Table:
    """Typed access to one mapped segment. Callers hold the mutex for anything but reads of
    single fields and the owner's state-byte stores."""

    def __init__(self, buf: memoryview, capacity: int, waiter_capacity: int) -> None:
        self.buf = buf
        self.capacity = capacity
        self.waiter_capacity = waiter_capacity
        self._waiters_at = HEADER_SIZE + capacity * SLOT_SIZE

    # header ------------------------------------------------------------------------------
    def read_header(self) -> Header:
        return Header(*HEADER.unpack_from(self.buf, 0))

    def write_header(self, h: Header) -> None:
        HEADER.pack_into(
            self.buf, 0, h.magic, h.version, h.header_size, h.slot_size, h.waiter_size,
            h.capacity, h.waiter_capacity, h.limit, h.creator_pid, h.flags, h.creator_start,
            h.created_at, h.generation, h.next_token, h.reclaimed_total, h.timeouts_total,
            h.acquired_total, h.acquire_timeout, h.idle_timeout, h.uid,
        )

    # slots -------------------------------------------------------------------------------
    def slot_offset(self, index: int) -> int:
        return HEADER_SIZE + index * SLOT_SIZE

    def read_slot(self, index: int) -> SlotRecord:
        state, pid, start, token, since = SLOT.unpack_from(self.buf, self.slot_offset(index))
        return SlotRecord(index, SlotState(state), pid, start, token, since)

    def write_slot(
        self, index: int, state: SlotState, pid: int, start: int, token: int, since: float
    ) -> None:
        SLOT.pack_into(self.buf, self.slot_offset(index), state, pid, start, token, since)

    def clear_slot(self, index: int) -> None:
        SLOT.pack_into(self.buf, self.slot_offset(index), 0, 0, 0, 0, 0.0)

    def slot_states(self) -> bytes:
        """The state byte of every slot record, in one C-level strided copy."""
        end = HEADER_SIZE + self.capacity * SLOT_SIZE
        return self.buf[HEADER_SIZE:end:SLOT_SIZE].tobytes()

    def used_slots(self) -> list[SlotRecord]:
        states = self.slot_states()
        return [self.read_slot(i) for i, s in enumerate(states) if s != SlotState.FREE]

    def in_use(self) -> int:
        return self.capacity - self.slot_states().count(0)

    def free_slot_index(self) -> int:
        index = self.slot_states().find(b"\x00")
        if index < 0:  # pragma: no cover - the limit is capped at capacity
            raise RuntimeError("slot table is full")
        return index

    # waiters -----------------------------------------------------------------------------
    def waiter_offset(self, index: int) -> int:
        return self._waiters_at + index * WAITER_SIZE

    def read_waiter(self, index: int) -> WaiterRecord:
        state, pid, start, nonce, ticket, gidx, gtoken = WAITER.unpack_from(
            self.buf, self.waiter_offset(index)
        )
        return WaiterRecord(index, WaiterState(state), pid, start, nonce, ticket, gidx, gtoken)

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
    ) -> None:
        WAITER.pack_into(
            self.buf, self.waiter_offset(index), state, pid, start, nonce, ticket,
            granted_index, granted_token,
        )

    def clear_waiter(self, index: int) -> None:
        WAITER.pack_into(self.buf, self.waiter_offset(index), 0, 0, 0, 0, 0, 0, 0)

    def waiter_states(self) -> bytes:
        end = self._waiters_at + self.waiter_capacity * WAITER_SIZE
        return self.buf[self._waiters_at:end:WAITER_SIZE].tobytes()

    def used_waiters(self) -> list[WaiterRecord]:
        states = self.waiter_states()
        return [self.read_waiter(i) for i, s in enumerate(states) if s != WaiterState.FREE]

    def free_waiter_index(self) -> int:
        return self.waiter_states().find(b"\x00")

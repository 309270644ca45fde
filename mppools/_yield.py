"""The idle-yield request: the one wire format between a waiter and another process's keeper.

A waiter asks the keeper of a process that holds an idle slot to give it back. The request
names the slot by index and token; the keeper acts only on a slot it tracks under that token,
only while the budget really has waiters, and only for a sender of its own uid.
"""

from __future__ import annotations

import struct
from typing import Final

__all__ = ["REQUEST_SIZE", "decode", "encode"]

_REQUEST: Final = struct.Struct("<cIQ")
REQUEST_SIZE: Final = _REQUEST.size


def encode(index: int, token: int) -> bytes:
    """A request to yield the slot ``index`` held under ``token``."""
    return _REQUEST.pack(b"y", index, token)


def decode(data: bytes) -> int | None:
    """The token a request names, or None if ``data`` is not a yield request."""
    if len(data) != REQUEST_SIZE or data[:1] != b"y":
        return None
    return int(_REQUEST.unpack(data)[2])

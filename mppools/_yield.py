"""Requests to another process's keeper: the one wire format for them.

A waiter asks the keeper of a process that holds an idle slot to give it back (``YIELD``).
A host that must give slots back now, because their leases can no longer be renewed (the
cross-host backend's fence), asks the keepers of processes that hold *busy* slots to cut
those connections' sockets if they are still checked out after a grace (``SEVER``). A
request names the slot by index and token; the keeper acts only on a slot it tracks under
that token, only while the budget really has waiters (or is in debt), and only for a sender
of its own uid.
"""

from __future__ import annotations

import struct
from typing import Final

__all__ = ["REQUEST_SIZE", "SEVER", "YIELD", "decode", "encode"]

_REQUEST: Final = struct.Struct("<cIQ")
REQUEST_SIZE: Final = _REQUEST.size
#: request kinds
YIELD: Final = b"y"
SEVER: Final = b"s"


def encode(index: int, token: int, kind: bytes = YIELD) -> bytes:
    """A request of ``kind`` for the slot ``index`` held under ``token``."""
    return _REQUEST.pack(kind, index, token)


def decode(data: bytes) -> tuple[bytes, int] | None:
    """The kind and the token a request names, or None if ``data`` is not a request."""
    if len(data) != REQUEST_SIZE or data[:1] not in (YIELD, SEVER):
        return None
    kind, _, token = _REQUEST.unpack(data)
    return kind, int(token)

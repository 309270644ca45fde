"""The loan wire: length-prefixed pickles over a Unix stream socket, peers of our own uid.

Both ends are processes of the same user (checked with ``SO_PEERCRED`` on every accepted and
every connected socket; root is trusted as it could read our memory anyway), so the pickles
carry nothing a peer could not already do to us. A frame is a 4-byte big-endian length, then
that many bytes of pickle; a frame over :data:`MAX_FRAME` is refused (a broken peer).
"""

from __future__ import annotations

import os
import pickle
import socket
import struct
from typing import Any

__all__ = ["MAX_FRAME", "WireError", "peer_trusted", "recv", "send"]

_LENGTH = struct.Struct(">I")
#: the largest frame either end accepts (a message body of up to about this much)
MAX_FRAME = 256 * 1024 * 1024
_CREDS = struct.Struct("iII")  # struct ucred: pid, uid, gid


class WireError(OSError):
    """The peer went away, sent a frame we cannot read, or is not of our uid."""


def peer_trusted(sock: socket.socket) -> bool:
    """True if the process at the other end runs as our uid (or root)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size)
    except OSError:
        return False
    _, uid, _ = _CREDS.unpack(raw)
    return uid in (os.geteuid(), 0)


def send(sock: socket.socket, message: Any) -> None:
    """Send one frame (raises OSError if the peer is gone)."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if len(data) > MAX_FRAME:
        raise WireError(f"loan frame of {len(data)} bytes is over the {MAX_FRAME} byte cap")
    sock.sendall(_LENGTH.pack(len(data)) + data)


def _exactly(sock: socket.socket, size: int) -> bytes:
    chunks: list[bytes] = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            raise WireError("the loan's peer closed the connection")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def recv(sock: socket.socket) -> Any:
    """Receive one frame (WireError if the peer is gone or the frame is unreadable)."""
    (size,) = _LENGTH.unpack(_exactly(sock, _LENGTH.size))
    if size > MAX_FRAME:
        raise WireError(f"loan frame of {size} bytes is over the {MAX_FRAME} byte cap")
    try:
        return pickle.loads(_exactly(sock, size))
    except WireError:
        raise
    except Exception as exc:
        raise WireError(f"unreadable loan frame of {size} bytes: {exc}") from exc

"""A TCP relay that can hold back what clients send: a network that delivers late.

``HoldingRelay(("127.0.0.1", port))`` listens on 127.0.0.1 (a free port) and forwards every
connection to the upstream address. :meth:`HoldingRelay.hold` makes the connections open at
that moment keep what their clients send from then on (buffered here, not forwarded; a
client's close is kept too); connections made later pass as usual. :meth:`HoldingRelay.flush`
delivers what was held, the held closes included, and waits (bounded) until the upstream has
answered and closed each of those connections: the server has run what they carried.

It is what a server sees of a client whose request timed out and who went on over a new
connection, when the old request is delivered only afterwards (a frozen server that resumes
and reads its sockets in any order). Everything listens on 127.0.0.1; threads only, no
processes.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType

__all__ = ["HoldingRelay"]


class _Link:
    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client, self.upstream = client, upstream
        self.lock = threading.Lock()
        self.held: bytearray | None = None  # None: passing
        self.client_closed = False
        self.upstream_done = threading.Event()


class HoldingRelay:
    """Forward 127.0.0.1:<port> to ``upstream``; hold and later deliver a client's bytes."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._links: list[_Link] = []
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """A redis URL through this relay (database 0)."""
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(self.upstream, timeout=5)
            upstream.settimeout(None)
            link = _Link(client, upstream)
            with self._lock:
                self._links.append(link)
            threading.Thread(target=self._up, args=(link,), daemon=True).start()
            threading.Thread(target=self._down, args=(link,), daemon=True).start()

    def _up(self, link: _Link) -> None:
        """Client -> upstream, unless held."""
        while True:
            try:
                data = link.client.recv(65536)
            except OSError:
                data = b""
            with link.lock:
                if link.held is not None:
                    if data:
                        link.held += data
                    else:
                        link.client_closed = True
                        return
                    continue
            if not data:
                with contextlib.suppress(OSError):
                    link.upstream.shutdown(socket.SHUT_WR)
                return
            with contextlib.suppress(OSError):
                link.upstream.sendall(data)

    def _down(self, link: _Link) -> None:
        """Upstream -> client (dropped once the client is gone)."""
        try:
            while True:
                try:
                    data = link.upstream.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                with contextlib.suppress(OSError):
                    link.client.sendall(data)
        finally:
            link.upstream_done.set()
            with contextlib.suppress(OSError):
                link.client.close()

    def hold(self) -> int:
        """Hold what the clients of the connections open now send from now on; returns how
        many connections that is."""
        with self._lock:
            links = list(self._links)
        for link in links:
            with link.lock:
                if link.held is None:
                    link.held = bytearray()
        return len(links)

    def held_bytes(self) -> int:
        """Bytes held back so far (clients that sent something since :meth:`hold`)."""
        with self._lock:
            links = list(self._links)
        total = 0
        for link in links:
            with link.lock:
                total += len(link.held or b"")
        return total

    def flush(self, timeout: float = 10.0) -> int:
        """Deliver what was held (and held closes); wait until the upstream closed each
        connection whose client had closed. Returns the bytes delivered."""
        with self._lock:
            links = [link for link in self._links if link.held is not None]
        sent = 0
        for link in links:
            with link.lock:
                data, link.held = bytes(link.held or b""), None
                closed = link.client_closed
            if data:
                link.upstream.sendall(data)
                sent += len(data)
            if closed:
                with contextlib.suppress(OSError):
                    link.upstream.shutdown(socket.SHUT_WR)
                assert link.upstream_done.wait(timeout), "the upstream never answered"
        return sent

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            links = list(self._links)
        for link in links:
            for sock in (link.client, link.upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        self._thread.join(5)

    def __enter__(self) -> HoldingRelay:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

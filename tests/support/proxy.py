"""A small TCP proxy that counts concurrently open client connections exactly.

One background thread runs a :mod:`selectors` loop. In every loop iteration
the proxy first processes all events of *existing* connections (data, EOF,
RST), then does one more non-blocking sweep for hang-ups, and only then
accepts new connections. So a client that went away (including a client
killed with SIGKILL: the kernel closes its socket and we read EOF/RST) is
decremented *before* the next connection is accepted and counted.

Counting rule: a connection is counted from ``accept()`` until

* the client hung up (EOF or error reading/writing the client side -- a
  client-side half-close is treated as a hang-up, which is what every
  broker client does anyway), or
* the upstream side failed (connect error, RST), or
* the upstream closed and everything it sent was delivered to the client
  and the client then hung up (both directions done).

Whichever comes first; both sockets are then closed at once.
"""

from __future__ import annotations

import contextlib
import errno
import selectors
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import cast

__all__ = ["CountingProxy"]

_CHUNK = 65536
_MAX_BUFFER = 1 << 20  # stop reading a side whose peer is this far behind


@dataclass(eq=False)
class _Conn:
    cid: int
    client: socket.socket
    upstream: socket.socket
    accepted_at: float
    connecting: bool = True
    to_upstream: bytearray = field(default_factory=bytearray)
    to_client: bytearray = field(default_factory=bytearray)
    upstream_eof: bool = False  # upstream sent FIN; client gets SHUT_WR after flush
    client_shut: bool = False  # we already sent FIN to the client
    closed: bool = False


def rewrite_url(url: str, host: str, port: int) -> str:
    """*url* with its host:port replaced (user, password and path kept)."""
    parts = urllib.parse.urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{host}:{port}"
    if userinfo:
        netloc = f"{userinfo}@{netloc}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


class CountingProxy:
    """TCP proxy on 127.0.0.1:<free port> forwarding to ``target``.

    Thread-safe read-only attributes: :attr:`current`, :attr:`peak`,
    :attr:`total_accepted`, :attr:`refused`, :attr:`history`.
    """

    def __init__(
        self,
        target: tuple[str, int],
        *,
        max_connections: int | None = None,
        listen_host: str = "127.0.0.1",
        connect_timeout: float = 5.0,
        start: bool = True,
        settle_after_accept: bool = False,
    ) -> None:
        self.target = target
        # Look for hang-ups again AFTER accept() and before counting. Without it, a proxy
        # descheduled between its sweep and accept() (a starved thread, a busy machine)
        # counts a close and the next connect the wrong way round and reports limit + 1
        # that never existed (measured: close logged 1.4 ms before the open, both counted).
        # Any FIN sent before the new client's connect() is already queued when accept()
        # returns it, so the second sweep orders them right; the price is that a connection
        # closing in the microseconds between accept() and that sweep is not counted
        # together with the new one, while a real breach lasts a whole round trip or more.
        self.settle_after_accept = settle_after_accept
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._current = 0
        self._peak = 0
        self._total = 0
        self._refused = 0
        self._upstream_failures = 0
        self._history: list[tuple[float, int]] = [(time.monotonic(), 0)]
        self._conns: dict[socket.socket, _Conn] = {}
        self._by_id: dict[int, _Conn] = {}
        self._next_id = 0
        self._pending: list[Callable[[], None]] = []
        self._stopping = False
        self._closed = False

        self._sel = selectors.DefaultSelector()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((listen_host, 0))
        self._listener.listen(128)
        self._listener.setblocking(False)
        self.host: str = listen_host
        self.port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._listener, selectors.EVENT_READ, "listener")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(
            target=self._run, name=f"CountingProxy:{self.port}->{target[1]}", daemon=True
        )
        self._error: BaseException | None = None
        if start:
            self.start()

    # ------------------------------------------------------------------ API
    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def url_for(self, url: str) -> str:
        """Rewrite *url*'s host:port to point at this proxy (keeps user/pass/path)."""
        return rewrite_url(url, self.host, self.port)

    @property
    def current(self) -> int:
        with self._lock:
            return self._current

    @property
    def peak(self) -> int:
        with self._lock:
            return self._peak

    @property
    def total_accepted(self) -> int:
        """Connections accepted and forwarded (refused ones are not included)."""
        with self._lock:
            return self._total

    @property
    def refused(self) -> int:
        """Connections accepted and closed at once because of ``max_connections``."""
        with self._lock:
            return self._refused

    @property
    def upstream_failures(self) -> int:
        """Connections dropped because the target could not be reached."""
        with self._lock:
            return self._upstream_failures

    @property
    def history(self) -> list[tuple[float, int]]:
        """``(time.monotonic(), current)`` after every change, oldest first."""
        with self._lock:
            return list(self._history)

    def reset_peak(self) -> None:
        """Set :attr:`peak` to the number of connections open right now."""
        with self._lock:
            self._peak = self._current

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "current": self._current,
                "peak": self._peak,
                "total_accepted": self._total,
                "refused": self._refused,
                "upstream_failures": self._upstream_failures,
            }

    def wait_for(self, predicate: Callable[[int], bool], timeout: float) -> bool:
        """Wait (bounded) until ``predicate(current)`` holds; return whether it did."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self._current):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def wait_current(self, n: int, timeout: float = 10.0) -> bool:
        """Wait (bounded) until exactly *n* connections are open."""
        return self.wait_for(lambda c: c == n, timeout)

    def drop_all(self, timeout: float = 5.0) -> int:
        """Abort (RST) every open connection, both sides; return how many."""
        done = threading.Event()
        result: list[int] = []

        def job() -> None:
            conns = list(self._by_id.values())
            for c in conns:
                self._close_conn(c, reset=True)
            result.append(len(conns))
            done.set()

        self._submit(job)
        if not done.wait(timeout):
            raise TimeoutError("proxy loop did not process drop_all in time")
        return result[0]

    def close(self, timeout: float = 5.0) -> None:
        """Stop the loop thread and close every socket (idempotent, bounded)."""
        if self._closed:
            return
        self._stopping = True
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():  # pragma: no cover - should not happen
            raise RuntimeError("CountingProxy thread did not stop in time")
        self._closed = True
        for c in list(self._by_id.values()):
            self._close_conn(c, reset=False)
        with contextlib.suppress(Exception):
            self._sel.close()
        for s in (self._listener, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                s.close()
        if self._error is not None:
            raise RuntimeError("CountingProxy loop crashed") from self._error

    def __enter__(self) -> CountingProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<CountingProxy 127.0.0.1:{self.port} -> {self.target} {self.stats()}>"

    # ------------------------------------------------------------ internals
    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            self._pending.append(job)
        self._wake()

    def _set_count(self, delta: int) -> None:
        with self._cond:
            self._current += delta
            self._peak = max(self._peak, self._current)
            self._history.append((time.monotonic(), self._current))
            self._cond.notify_all()

    def _run(self) -> None:
        try:
            while not self._stopping:
                events = self._sel.select(timeout=0.5)
                listener_ready = False
                # 1) existing connections first: hang-ups are processed
                #    before anything new is accepted.
                for key, mask in events:
                    if key.data == "listener":
                        listener_ready = True
                    elif key.data == "wake":
                        self._drain_wake()
                    else:
                        self._handle(cast(socket.socket, key.fileobj), mask)
                self._run_pending()
                self._check_connect_timeouts()
                if listener_ready and not self._stopping:
                    self._accept_all()
        except BaseException as e:  # pragma: no cover - surfaced by close()
            self._error = e

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while self._wake_r.recv(4096):
                pass

    def _run_pending(self) -> None:
        with self._lock:
            jobs, self._pending = self._pending, []
        for job in jobs:
            job()

    def _sweep_hangups(self) -> None:
        """Non-blocking passes over existing connections until none is ready (no accepting,
        at most 8 passes)."""
        for _ in range(8):
            events = [(k, m) for k, m in self._sel.select(timeout=0)
                      if k.data not in ("listener", "wake")]
            if not events:
                return
            for key, mask in events:
                self._handle(cast(socket.socket, key.fileobj), mask)

    def _accept_all(self) -> None:
        while not self._stopping:
            self._sweep_hangups()
            try:
                client, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE etc.: try again next iteration
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    time.sleep(0.01)
                    return
                raise
            if self.settle_after_accept:
                self._sweep_hangups()
            if self.max_connections is not None and self._current >= self.max_connections:
                # Count first, close second: the client sees EOF the moment close() runs
                # and may read `refused` before this thread gets the GIL back.
                with self._cond:
                    self._refused += 1
                    self._cond.notify_all()
                with contextlib.suppress(OSError):
                    client.close()
                continue
            self._open(client)

    def _open(self, client: socket.socket) -> None:
        client.setblocking(False)
        with contextlib.suppress(OSError):
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        upstream.setblocking(False)
        with contextlib.suppress(OSError):
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._next_id += 1
        conn = _Conn(self._next_id, client, upstream, time.monotonic())
        self._conns[client] = conn
        self._conns[upstream] = conn
        self._by_id[conn.cid] = conn
        with self._lock:
            self._total += 1
        self._set_count(+1)
        err = upstream.connect_ex(self.target)
        if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
            self._upstream_failed(conn)
            return
        # While connecting: watch the client for hang-up (data is buffered)
        # and the upstream for connect completion.
        self._sel.register(client, selectors.EVENT_READ, conn)
        self._sel.register(upstream, selectors.EVENT_WRITE, conn)

    def _upstream_failed(self, conn: _Conn) -> None:
        with self._lock:
            self._upstream_failures += 1
        self._close_conn(conn, reset=False)

    def _check_connect_timeouts(self) -> None:
        now = time.monotonic()
        for conn in list(self._by_id.values()):
            if conn.connecting and now - conn.accepted_at > self.connect_timeout:
                self._upstream_failed(conn)

    def _handle(self, sock: socket.socket, mask: int) -> None:
        conn = self._conns.get(sock)
        if conn is None or conn.closed:
            return
        if sock is conn.upstream and conn.connecting:
            if mask & selectors.EVENT_WRITE:
                err = conn.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err != 0:
                    self._upstream_failed(conn)
                    return
                conn.connecting = False
                self._update_interest(conn)
            return
        if sock is conn.client:
            if mask & selectors.EVENT_READ and not self._read(conn, from_client=True):
                return
            if mask & selectors.EVENT_WRITE and not self._flush(conn, to_client=True):
                return
        else:
            if mask & selectors.EVENT_READ and not self._read(conn, from_client=False):
                return
            if mask & selectors.EVENT_WRITE and not self._flush(conn, to_client=False):
                return
        if not conn.closed:
            self._update_interest(conn)

    def _read(self, conn: _Conn, *, from_client: bool) -> bool:
        """Read one chunk; return False if the connection got closed."""
        src = conn.client if from_client else conn.upstream
        try:
            data = src.recv(_CHUNK)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            self._close_conn(conn, reset=True)  # RST from either side
            return False
        if from_client:
            if not data:
                # Client hung up (close, or SIGKILL -> kernel close).
                self._best_effort_flush(conn)
                self._close_conn(conn, reset=False)
                return False
            conn.to_upstream += data
            return conn.connecting or self._flush(conn, to_client=False)
        if not data:
            conn.upstream_eof = True
            return self._flush(conn, to_client=True)
        conn.to_client += data
        return self._flush(conn, to_client=True)

    def _flush(self, conn: _Conn, *, to_client: bool) -> bool:
        """Send buffered data; return False if the connection got closed."""
        dst = conn.client if to_client else conn.upstream
        buf = conn.to_client if to_client else conn.to_upstream
        while buf:
            try:
                n = dst.send(buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._close_conn(conn, reset=True)
                return False
            del buf[:n]
        if to_client and conn.upstream_eof and not conn.to_client and not conn.client_shut:
            # Upstream is done and everything was delivered: pass the FIN on
            # and keep counting until the client hangs up too.
            conn.client_shut = True
            try:
                conn.client.shutdown(socket.SHUT_WR)
            except OSError:
                self._close_conn(conn, reset=False)
                return False
        return True

    def _best_effort_flush(self, conn: _Conn) -> None:
        if conn.connecting or not conn.to_upstream:
            return
        with contextlib.suppress(OSError):
            conn.upstream.send(conn.to_upstream)

    def _update_interest(self, conn: _Conn) -> None:
        if conn.closed:
            return
        client_ev = 0
        if len(conn.to_upstream) < _MAX_BUFFER:
            # Reading also detects the hang-up (EOF/RST) of the client.
            client_ev |= selectors.EVENT_READ
        if conn.to_client:
            client_ev |= selectors.EVENT_WRITE
        up_ev = 0
        if conn.connecting:
            up_ev = selectors.EVENT_WRITE
        else:
            if not conn.upstream_eof and len(conn.to_client) < _MAX_BUFFER:
                up_ev |= selectors.EVENT_READ
            if conn.to_upstream:
                up_ev |= selectors.EVENT_WRITE
        self._set_interest(conn.client, client_ev, conn)
        self._set_interest(conn.upstream, up_ev, conn)

    def _set_interest(self, sock: socket.socket, events: int, conn: _Conn) -> None:
        try:
            key = self._sel.get_key(sock)
        except KeyError:
            if events:
                self._sel.register(sock, events, conn)
            return
        if events == 0:
            self._sel.unregister(sock)
        elif key.events != events:
            self._sel.modify(sock, events, conn)

    def _close_conn(self, conn: _Conn, *, reset: bool) -> None:
        if conn.closed:
            return
        conn.closed = True
        # Uncount before closing, for the same reason as a refusal: whoever sees the close
        # (the client, the broker) must find the count already updated.
        self._by_id.pop(conn.cid, None)
        self._set_count(-1)
        for s in (conn.client, conn.upstream):
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(s)
            self._conns.pop(s, None)
            if reset:
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):
                s.close()

"""Liveness: a SIGKILLed multi-threaded process is dead only once all its threads are."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest

from mppools import _liveness

pytestmark = pytest.mark.timeout(60)


def test_killed_process_is_dead_only_when_its_socket_is_closed() -> None:
    """The main thread shows 'Z' before the other threads (and the sockets) are gone:
    liveness must not call the process dead while its connection is still open."""
    for _ in range(20):
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover
            conn = socket.create_connection(srv.getsockname())  # noqa: F841 - kept open
            threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
            os.write(w, b"x")
            time.sleep(60)
            os._exit(0)
        os.read(r, 1)
        peer, _ = srv.accept()
        ident = _liveness.identity_of(pid)
        assert ident is not None
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _liveness.is_alive(*ident):
            assert time.monotonic() < deadline
        # declared dead: its socket must already be closed (the peer reads EOF at once;
        # loopback delivers the FIN synchronously with the close)
        peer.setblocking(False)
        try:
            data = peer.recv(1)
        except BlockingIOError:
            data = b"still open"
        assert data == b""
        os.waitpid(pid, 0)
        for fd in (r, w):
            os.close(fd)
        peer.close()
        srv.close()

"""A connection-counting proxy in a process of its own (see proxy_server.py for why)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

from .proxy import rewrite_url
from .servers import stop_process_tree
from .waiting import wait_until

_HERE = Path(__file__).resolve().parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(_HERE.parent), env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    return env


class ProxyProcess:
    """A CountingProxy served from its own process (see proxy_server.py for why)."""

    def __init__(self, target: tuple[str, int], max_connections: int | None = None) -> None:
        import subprocess

        self.proc = subprocess.Popen(
            [sys.executable, str(_HERE / "proxy_server.py"), target[0], str(target[1]),
             "-" if max_connections is None else str(max_connections)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            env=_env(), start_new_session=True,
        )
        self._lock = threading.Lock()
        first = self._readline(15.0)
        self.port = int(json.loads(first)["port"])
        self.host = "127.0.0.1"

    def _readline(self, timeout: float) -> str:
        import select

        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError("proxy process did not answer")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("proxy process exited")
        return line

    def ask(self, cmd: str) -> Any:
        with self._lock:
            assert self.proc.stdin is not None
            self.proc.stdin.write(cmd + "\n")
            self.proc.stdin.flush()
            return json.loads(self._readline(15.0))

    def url_for(self, url: str) -> str:
        return rewrite_url(url, self.host, self.port)

    @property
    def current(self) -> int:
        return int(self.ask("stats")["current"])

    @property
    def peak(self) -> int:
        return int(self.ask("stats")["peak"])

    @property
    def total_accepted(self) -> int:
        return int(self.ask("stats")["total_accepted"])

    @property
    def refused(self) -> int:
        return int(self.ask("stats")["refused"])

    @property
    def history(self) -> list[tuple[float, int]]:
        return [(float(t), int(n)) for t, n in self.ask("history")]

    def wait_current(self, n: int, timeout: float = 10.0) -> bool:
        return wait_until(lambda: self.current == n, timeout)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ask("quit")
        stop_process_tree(self.proc, timeout=5)

    def __enter__(self) -> ProxyProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

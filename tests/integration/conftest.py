"""Fixtures and helpers for the real-broker integration tests.

Servers are private (tests/support), everything listens on 127.0.0.1, every subprocess is
stopped through the pid we started (terminate -> wait -> kill, its own tree only).
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from kombu import Connection
from support.servers import RabbitMQServer, RedisServer, free_port, popen, stop_process_tree

import mppools

APPS = Path(__file__).resolve().parent / "apps"
REPO = Path(__file__).resolve().parents[2]


def shm_objects(name: str) -> list[str]:
    """What budget ``name`` has in /dev/shm: segment, semaphore, rendezvous directory."""
    return [p for p in (f"/dev/shm/mppools.{name}", f"/dev/shm/sem.mppools.{name}.free",
                        f"/dev/shm/mppools.{name}.d") if os.path.exists(p)]


@pytest.fixture(scope="session")
def rabbit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQServer]:
    with RabbitMQServer(tmp_path_factory.mktemp("rabbit")) as server:
        yield server


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis"), maxclients=200) as server:
        yield server


@pytest.fixture
def budget_name() -> Iterator[str]:
    """A unique budget name; its /dev/shm objects must be gone after the test."""
    name = f"it{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield name
    with contextlib.suppress(Exception):
        mppools.close(unlink=False)
    leftovers = shm_objects(name)
    for path in leftovers:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    assert not leftovers, f"the integration left shared objects behind: {leftovers}"


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def child_pids(pid: int) -> set[int]:
    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return set()


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MPPOOLS_", "ITEST_", "CELERY_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(APPS), str(REPO), env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def drain_queue(url: str, queue: str, timeout: float = 60.0) -> list[dict[str, Any]]:
    """Consume every message of ``queue`` with a connection of our own (not the proxy's)."""
    found: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    with Connection(url, connect_timeout=5) as conn:
        channel = conn.default_channel
        while time.monotonic() < deadline:
            message = channel.basic_get(queue, no_ack=True)
            if message is None:
                break
            found.append(channel.message_to_python(message).decode())
    return found


# ------------------------------------------------------------------------------- gunicorn
class Gunicorn:
    """A real ``gunicorn`` master (sync workers) serving tests/integration/apps/wsgi_app."""

    def __init__(self, tmp: Path, *, workers: int, env: dict[str, str]) -> None:
        self.port = free_port()
        self.log = tmp / "gunicorn.log"
        args = [sys.executable, "-m", "gunicorn", "-c", str(APPS / "gunicorn_conf.py"),
                "--bind", f"127.0.0.1:{self.port}", "--workers", str(workers),
                "--chdir", str(APPS), "--log-level", "info", "wsgi_app:app"]
        self.proc = popen(args, log_path=self.log, cwd=APPS, env=env)
        self.workers = workers

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"gunicorn died:\n{self.log_tail()}")
            return len(self.worker_pids()) >= self.workers and get(self.port, "/") [0] == 200
        assert wait_until(ready, timeout, 0.2), f"gunicorn not ready:\n{self.log_tail()}"

    def worker_pids(self) -> set[int]:
        return child_pids(self.proc.pid)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(Exception):
                self.proc.wait(timeout=15)
        stop_process_tree(self.proc, timeout=5)


def get(port: int, path: str, timeout: float = 15.0) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    except (OSError, http.client.HTTPException) as exc:
        return 0, f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()


@dataclass
class LoadResult:
    ok_ids: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.ok_ids) + len(self.failures)


def load(port: int, *, clients: int, seconds: float, prefix: str) -> LoadResult:
    """``clients`` threads sending requests for ``seconds``; bounded."""
    result = LoadResult()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(k: int) -> None:
        n = 0
        while time.monotonic() < deadline:
            n += 1
            rid = f"{prefix}-{k}-{n}"
            status, body = get(port, f"/pub?id={rid}")
            with lock:
                if status == 200 and body.startswith("ok"):
                    result.ok_ids.append(rid)
                else:
                    result.failures.append(f"{status} {body[:200]}")

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    return result


class Sampler:
    """Samples a count (rabbitmqctl / CLIENT LIST) in a thread; remembers the max."""

    def __init__(self, fn: Callable[[], int], interval: float) -> None:
        self.fn, self.interval = fn, interval
        self.samples: list[tuple[float, int]] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), self.fn()))
            except Exception:
                self.errors += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    @property
    def peak(self) -> int:
        return max((n for _, n in self.samples), default=0)


def read_refusals(path: Path) -> list[tuple[float, int, str]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3:
            with contextlib.suppress(ValueError):
                out.append((float(parts[0]), int(parts[1]), parts[2]))
    return out


def explain_refusals(refusals: list[tuple[float, int, str]], history: list[tuple[float, int]],
                     limit: int, window: float = 2.0) -> list[tuple[float, int, str]]:
    """The refusals the proxy's exact count does not explain.

    A broker refusal is explained when, just before it, the proxy's count was at ``limit``
    with a connection closing within ``window`` seconds (the broker's own count of a
    connection outlives its TCP close: its tracking is asynchronous), or above ``limit``
    (a real breach, which the peak check catches).
    """
    unexplained = []
    for t, pid, msg in refusals:
        recent = [n for (ts, n) in history if t - window <= ts <= t]
        before = [n for (ts, n) in history if ts <= t]
        at_limit = bool(before) and max(before[-1:] + recent) >= limit
        closed_recently = any(b < a for a, b in itertools.pairwise(recent))
        if not (at_limit and (closed_recently or max(recent, default=0) > limit)):
            unexplained.append((t, pid, msg))
    return unexplained



"""A real gunicorn app serving ``/metrics`` with mppools' collector, scraped over HTTP while
its workers hold slots, parsed with prometheus_client's own text parser, and checked against
``mppools.stats()`` of the same budget (attached to from this process, by name).

Also prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``) set up as
docs/howto/metrics.md says: the budget's figures appear once, with the budget's values, next
to the workers' own metrics summed by ``MultiProcessCollector``.
"""

from __future__ import annotations

import contextlib
import http.client
import select
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.servers import RedisServer, free_port, popen, stop_process_tree

import mppools
from mppools._limiter._base import BudgetStats, local_host

from .conftest import APPS, base_env, child_pids, wait_until

WORKERS = 4
LIMIT = 3

#: gauges and counters that mirror a field of BudgetStats (counters: sample names)
FIELDS = {
    "mppools_slots_limit": "limit",
    "mppools_slots_in_use": "in_use",
    "mppools_slots_free": "free",
    "mppools_waiters": "waiting",
    "mppools_debt": "debt",
    "mppools_acquired_total": "acquired_total",
    "mppools_reclaimed_total": "reclaimed_total",
    "mppools_acquire_timeouts_total": "timeouts_total",
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _get(port: int, path: str, timeout: float = 100.0) -> tuple[int, str, str]:
    """(status, body, the pid of the worker that answered)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace"), resp.getheader(
            "X-Worker-Pid", "")
    except (OSError, http.client.HTTPException) as exc:
        return 0, f"{type(exc).__name__}: {exc}", ""
    finally:
        conn.close()


class MetricsApp:
    """gunicorn (sync workers, mppools' hooks) serving tests/integration/apps/metrics_app."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.log = tmp / "gunicorn.log"
        args = [sys.executable, "-m", "gunicorn", "-c", str(APPS / "gunicorn_conf.py"),
                "--bind", f"127.0.0.1:{self.port}", "--workers", str(WORKERS),
                "--chdir", str(APPS), "--log-level", "info", "metrics_app:app"]
        self.proc = popen(args, log_path=self.log, cwd=APPS, env=env)

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"gunicorn died:\n{self.log_tail()}")
            return (len(child_pids(self.proc.pid)) >= WORKERS
                    and _get(self.port, "/", timeout=5)[0] == 200)
        assert wait_until(ready, timeout, 0.2), f"gunicorn not ready:\n{self.log_tail()}"

    def log_tail(self, n: int = 60) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        return ""

    def scrape(self) -> tuple[Samples, str, str]:
        """(samples by (name, labels), the raw text, the pid of the worker that served it)."""
        status, body, pid = _get(self.port, "/metrics", timeout=15)
        assert status == 200, f"{status} {body[:500]}\n{self.log_tail()}"
        samples: Samples = {}
        for family in text_string_to_metric_families(body):
            for s in family.samples:
                key = (s.name, frozenset(s.labels.items()))
                assert key not in samples, f"a duplicated series: {key}"
                samples[key] = s.value
        return samples, body, pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(Exception):
                self.proc.wait(timeout=15)
        stop_process_tree(self.proc, timeout=5)


@dataclass
class Holds:
    """``/hold`` requests, each a thread; the workers report over a unix socket."""

    port: int
    listener: socket.socket
    threads: dict[str, threading.Thread] = field(default_factory=dict)
    answers: dict[str, tuple[int, str, str]] = field(default_factory=dict)
    told: dict[str, socket.socket] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)

    def start(self, rid: str) -> int:
        """Send ``/hold?id=rid`` and return the pid of the worker once it holds its slot."""
        def run() -> None:
            self.answers[rid] = _get(self.port, f"/hold?id={rid}")

        thread = threading.Thread(target=run, daemon=True)
        self.threads[rid] = thread
        thread.start()
        ready, _, _ = select.select([self.listener], [], [], 30)
        assert ready, f"no worker reported holding a slot for {rid!r}"
        conn, _ = self.listener.accept()
        conn.settimeout(30)
        line = b""
        while not line.endswith(b"\n"):
            chunk = conn.recv(100)
            assert chunk, "the worker hung up before saying it holds"
            line += chunk
        _, pid, got = line.decode().split()
        self.told[got] = conn
        self.pids[got] = int(pid)
        return int(pid)

    def release(self, rid: str) -> None:
        """Tell the worker holding ``rid`` to put its connection back; wait for its answer."""
        conn = self.told.pop(rid)
        conn.sendall(b"x")
        conn.close()
        self.threads[rid].join(30)
        status, body, _ = self.answers[rid]
        assert status == 200 and body.startswith("released"), (status, body)

    def close(self) -> None:
        for conn in self.told.values():
            conn.close()
        for thread in self.threads.values():
            thread.join(30)


@pytest.fixture
def release_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "release.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    yield path, listener
    listener.close()


def _budget_values(samples: Samples, budget: str) -> dict[str, float]:
    return {name: value for (name, labels), value in samples.items()
            if dict(labels) == {"budget": budget}}


def _check_against_stats(samples: Samples, budget: str, stats: BudgetStats) -> None:
    values = _budget_values(samples, budget)
    for metric, attr in FIELDS.items():
        assert values[metric] == getattr(stats, attr), (metric, values[metric], stats)
    assert values["mppools_slots_idle"] == sum(h.idle for h in stats.holders)
    assert values["mppools_slots_busy"] == sum(h.busy for h in stats.holders)
    assert values["mppools_holders"] == len(stats.holders)
    assert values["mppools_budget_up"] == 1 and values["mppools_budget_damaged"] == 0
    holders = {(dict(labels)["pid"], dict(labels)["state"]): value
               for (name, labels), value in samples.items()
               if name == "mppools_holder_slots" and dict(labels)["budget"] == budget}
    expected = {}
    for h in stats.holders:
        expected[str(h.pid), "idle"] = float(h.idle)
        expected[str(h.pid), "busy"] = float(h.busy)
    assert holders == expected


def _scenario(tmp_path: Path, redis_server: RedisServer, budget: str,
              release_socket: tuple[str, socket.socket], multiproc: Path | None = None
              ) -> dict[str, Any]:
    """Start the app, hold two slots, scrape at each step; return what the checks need
    (``multiproc``: prometheus_client's multiprocess mode, with this directory)."""
    path, listener = release_socket
    extra_env = ({} if multiproc is None else
                 {"ITEST_MULTIPROC": "1", "PROMETHEUS_MULTIPROC_DIR": str(multiproc)})
    env = base_env(ITEST_BROKER_URL=redis_server.url, ITEST_RELEASE_SOCK=path,
                   MPPOOLS_LIMIT=str(LIMIT), MPPOOLS_NAME=budget,
                   MPPOOLS_IDLE_TIMEOUT="none", MPPOOLS_ACQUIRE_TIMEOUT="10", **extra_env)
    server = MetricsApp(tmp_path, env)
    holds = Holds(server.port, listener)
    steps: list[tuple[Samples, BudgetStats, str, str]] = []
    try:
        server.wait_ready()
        if multiproc is not None:
            # every worker has imported the app, so made its counter's file: a scrape that
            # reads a file at the instant its worker creates it (0 bytes) fails in
            # MultiProcessCollector (prometheus/client_python#1199), not in mppools
            def files_ready() -> bool:
                return all((multiproc / f"counter_{pid}.db").is_file()
                           and (multiproc / f"counter_{pid}.db").stat().st_size > 0
                           for pid in child_pids(server.proc.pid))
            assert wait_until(files_ready, 30, 0.05), server.log_tail()
        mppools.attach(budget)  # read-only: stats(); takes no slot

        def step() -> None:
            samples, text, pid = server.scrape()
            steps.append((samples, mppools.stats(), text, pid))

        step()  # nobody holds anything
        a, b = holds.start("a"), holds.start("b")
        assert a != b
        step()  # two workers hold a busy connection each
        holds.release("a")
        step()  # a's connection idles in its worker's pool, with its slot
        holds.release("b")
        step()
        pings = 0
        for _ in range(12):
            status, _, _ = _get(server.port, "/ping", timeout=15)
            assert status == 200
            pings += 1
        step()
        return {"steps": steps, "pids": (a, b), "pings": pings, "log": server.log_tail()}
    finally:
        holds.close()
        # detach first: the master's on_exit leaves a budget another process has open
        with contextlib.suppress(Exception):
            mppools.close(unlink=False)
        server.stop()


def _check_steps(out: dict[str, Any], budget: str) -> None:
    steps = out["steps"]
    a, b = out["pids"]
    # (in use, busy, idle) at each step, as scraped, and each equal to mppools.stats()
    expected = [(0, 0, 0), (2, 2, 0), (2, 1, 1), (2, 0, 2), (2, 0, 2)]
    seen = []
    for samples, stats, _, _ in steps:
        _check_against_stats(samples, budget, stats)
        values = _budget_values(samples, budget)
        seen.append((values["mppools_slots_in_use"], values["mppools_slots_busy"],
                     values["mppools_slots_idle"]))
    assert seen == expected, (seen, out["log"])
    samples, stats, _, served_by = steps[1]
    assert {h.pid for h in stats.holders} == {a, b}
    assert int(served_by) not in (a, b)  # a free worker answered the scrape
    host = local_host()
    for pid in (a, b):
        key = ("mppools_holder_slots", frozenset(
            {"budget": budget, "host": host, "pid": str(pid), "state": "busy"}.items()))
        assert samples[key] == 1
    # the session's decoys (a garbage segment, another layout version) are flagged, and
    # never break the scrape
    for name, labels in samples:
        label = dict(labels)
        if name == "mppools_budget_up" and "-garbage" in label["budget"]:
            assert samples[name, labels] == 0


@pytest.mark.redis
@pytest.mark.timeout(150)
def test_gunicorn_metrics_endpoint_matches_the_budget(
    tmp_path: Path, redis_server: RedisServer, budget_name: str,
    release_socket: tuple[str, socket.socket],
) -> None:
    out = _scenario(tmp_path, redis_server, budget_name, release_socket)
    _check_steps(out, budget_name)
    # without multiprocess mode each worker has its own app counters: a scrape sees only
    # the pings of the worker that served it (mppools' figures are the budget's all the same)
    samples = out["steps"][-1][0]
    pings = samples[("itest_pings_total", frozenset())]
    assert 0 <= pings <= out["pings"]


@pytest.mark.redis
@pytest.mark.timeout(150)
def test_gunicorn_metrics_in_multiprocess_mode(
    tmp_path: Path, redis_server: RedisServer, budget_name: str,
    release_socket: tuple[str, socket.socket],
) -> None:
    multiproc = tmp_path / "prometheus-multiproc"
    multiproc.mkdir()
    out = _scenario(tmp_path, redis_server, budget_name, release_socket, multiproc)
    _check_steps(out, budget_name)  # once each (no duplicated series), the budget's values
    samples = out["steps"][-1][0]
    # the app's own counter is summed over every worker's file: multiprocess mode is on
    assert samples[("itest_pings_total", frozenset())] == out["pings"]
    assert list(multiproc.glob("counter_*.db")), "no multiprocess files were written"

"""Figure 9 of ``python -m stress bench``: gunicorn-shaped load.

A real gunicorn master with 8 sync workers serves a tiny WSGI app
(``stress/_gunicorn_app.py``) whose every request publishes one message to a private
redis-server through a :class:`~stress.e2e_contention.DelayProxy` (0 or 20 ms added to each
NEW connection: a hosted broker's TCP + TLS handshake). Three servers run side by side, each
behind a proxy of its own, and every round loads each in turn (order rotated):

- ``mppools``: ``MPPOOLS_LIMIT=3`` configured by mppools' gunicorn hooks in the master's
  ``on_starting`` (``stress/_gunicorn_conf.py``), the app publishes with ``mppools.producers``;
- ``kombu``: ``kombu.pools.producers``, one pool per worker, limit 1 each (up to 8
  connections);
- ``connect``: a new ``Connection`` per request (what ``broker_pool_limit=0`` does).

The clients are an open-loop generator (asyncio, one HTTP/1.1 request per TCP connection:
gunicorn's sync workers close every connection) at a fixed offered rate; each request's
latency runs from its SCHEDULED send time, so queueing shows. At most ``INFLIGHT`` requests
are on the wire at once (the rest wait in the client, their clock running); what has not
finished ``grace`` seconds after the window is cut off and counted as an error, its latency
censored at the cut-off (a lower bound, said in the notes). The proxy's peak of open
connections for mppools must stay <= 3, else the figure fails (CapExceededError).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mppools
from stress._bench_util import RedisProc, budget_name, interleave, median, paired_ratios
from stress.e2e_contention import CapExceededError, DelayProxy, default_hold_quantum

__all__ = ["GunicornServer", "LoadResult", "fig_gunicorn", "open_loop"]

ROOT = Path(__file__).resolve().parent.parent
CONF = Path(__file__).resolve().parent / "_gunicorn_conf.py"
QUEUE = "bench-gunicorn"
KINDS = ("mppools", "kombu", "connect")
INFLIGHT = 64  # requests on the wire at once (8 workers x 8 in the listen backlog)
REQUEST = b"GET /pub HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


# ---------------------------------------------------------------------------------------
# the server
# ---------------------------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
                out.update(int(x) for x in f.read().split())
    return out


def _start_time(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot), None when it is gone: a
    pid is signalled only while it still names the process we saw."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _get(port: int, path: str, timeout: float) -> int:
    """Status of one GET (0 on a socket error)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return int(resp.status)
    except (OSError, http.client.HTTPException):
        return 0
    finally:
        conn.close()


@dataclass
class GunicornServer:
    """``gunicorn -c stress/_gunicorn_conf.py stress._gunicorn_app:app`` on 127.0.0.1, a
    free port; stopped through its pid (SIGTERM, then SIGKILL to it and its workers)."""

    kind: str
    url: str
    workers: int = 8
    limit: int = 3
    port: int = 0
    budget: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    log_path: str = ""
    worker_pids: set[int] = field(default_factory=set)

    def start(self) -> GunicornServer:
        fd, self.log_path = tempfile.mkstemp(prefix=f"mppools-bench-gunicorn-{self.kind}-",
                                             suffix=".log")
        os.close(fd)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MPPOOLS_", "BENCH_G_"))}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env.update(BENCH_G_MODE=self.kind, BENCH_G_URL=self.url, BENCH_G_QUEUE=QUEUE,
                   BENCH_G_WORKERS=str(self.workers), PYTHONUNBUFFERED="1")
        if self.kind == "mppools":
            self.budget = budget_name()
            env.update(MPPOOLS_LIMIT=str(self.limit), MPPOOLS_NAME=self.budget,
                       MPPOOLS_ACQUIRE_TIMEOUT="30")
        self.port = _free_port()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", str(CONF), "--bind",
                 f"127.0.0.1:{self.port}", "stress._gunicorn_app:app"],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn ({self.kind}) exited during start-up:\n"
                                   f"{self.log_tail()}")
            pids = _children(self.proc.pid)
            if len(pids) >= self.workers and _get(self.port, "/", 5.0) == 200:
                self.worker_pids = pids
                return
            time.sleep(0.1)
        raise RuntimeError(f"gunicorn ({self.kind}) not ready with {self.workers} workers "
                           f"after {timeout:.0f} s:\n{self.log_tail()}")

    def quiesce(self, timeout: float = 30.0) -> None:
        """Wait (bounded) until the requests still queued from a cut-off run are served: a
        probe goes to the back of the listen queue."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _get(self.port, "/", max(deadline - time.monotonic(), 0.1)) == 200:
                return
        raise RuntimeError(f"gunicorn ({self.kind}) did not answer a probe within "
                           f"{timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = Path(self.log_path).read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def begin_stop(self) -> None:
        """SIGTERM the master (by pid): a graceful stop, its ``on_exit`` runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.worker_pids |= _children(self.proc.pid)
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """Stop and wait (bounded); SIGKILL the master, then its workers still alive."""
        self.begin_stop()
        proc, self.proc = self.proc, None
        if proc is not None:
            workers = {pid: _start_time(pid) for pid in self.worker_pids}
            if proc.poll() is None:
                try:
                    proc.wait(15.0)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5.0)
            for pid, started in workers.items():  # workers of ours that outlived the master
                if started is not None and _start_time(pid) == started:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        if self.budget is not None:  # on_exit removed it; leftovers of a killed master
            with contextlib.suppress(Exception):
                mppools.unlink(self.budget)
            self.budget = None
        with contextlib.suppress(OSError):
            os.unlink(self.log_path)


@contextlib.contextmanager
def _servers(redis: RedisProc, kinds: tuple[str, ...], workers: int, limit: int
             ) -> Iterator[dict[str, tuple[GunicornServer, DelayProxy]]]:
    """One delay proxy and one gunicorn per kind, started together, stopped in any case."""
    with contextlib.ExitStack() as stack:
        out: dict[str, tuple[GunicornServer, DelayProxy]] = {}
        for kind in kinds:
            proxy = stack.enter_context(DelayProxy(("127.0.0.1", redis.port)))
            server = GunicornServer(kind, proxy.url_for(f"{redis.url}/3"), workers, limit)
            stack.callback(server.stop)
            server.start()
            out[kind] = (server, proxy)
        for server, _ in out.values():
            server.wait_ready()
        try:
            yield out
        finally:
            for server, _ in out.values():  # all at once; stack's callbacks then wait
                server.begin_stop()


# ---------------------------------------------------------------------------------------
# the open-loop load generator
# ---------------------------------------------------------------------------------------
@dataclass
class LoadResult:
    offered: float
    window: float
    latencies_ms: list[float]  # every scheduled request; the cut-off ones censored
    ok: int
    failed: int  # non-200 answers and socket errors
    cut_off: int  # unfinished at the cut-off (latency censored there)
    in_window: int  # 200 answers that came within the window (from the first send time)
    peak: int = 0
    accepted: int = 0
    first_error: str = ""

    @property
    def errors(self) -> int:
        return self.failed + self.cut_off

    @property
    def achieved(self) -> float:
        """Answers (200) per second during the window: the offered rate when the server
        keeps up, what it can serve when it does not."""
        return self.in_window / self.window

    def pct(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        s = sorted(self.latencies_ms)
        return s[min(int(q * len(s)), len(s) - 1)]


async def _open_loop(port: int, rate: float, window: float, grace: float, inflight: int
                     ) -> LoadResult:
    loop = asyncio.get_running_loop()
    n = max(int(rate * window), 1)
    gate = asyncio.Semaphore(inflight)
    t0 = loop.time() + 0.02
    cutoff = t0 + window + grace
    lat: list[float | None] = [None] * n  # ms, per scheduled request, once finished
    status: list[int] = []
    errors: list[str] = []
    in_window = [0]

    async def one(i: int, sched: float) -> None:
        async with gate:
            writer = None
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(REQUEST)
                data = await reader.read()  # sync workers close after the answer
                head = data.split(b"\r\n", 1)[0].split()
                code = int(head[1]) if len(head) > 1 and head[1].isdigit() else 0
                if code != 200 and not errors:
                    errors.append(f"HTTP {code}: {data[-200:].decode(errors='replace')}")
            except OSError as exc:
                code = 0
                if not errors:
                    errors.append(f"{type(exc).__name__}: {exc}")
            finally:
                if writer is not None:
                    writer.close()
        now = loop.time()
        lat[i] = (now - sched) * 1e3
        status.append(code)
        if code == 200 and now <= t0 + window:
            in_window[0] += 1

    tasks: list[asyncio.Task[None]] = []
    for i in range(n):
        sched = t0 + i / rate
        pause = sched - loop.time()
        if pause > 0:
            await asyncio.sleep(pause)
        if loop.time() >= cutoff:
            break
        tasks.append(asyncio.ensure_future(one(i, sched)))
    left = max(cutoff - loop.time(), 0.0)
    if tasks:
        _done, pending = await asyncio.wait(tasks, timeout=left)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5.0)
    end = loop.time()
    # a request cut off: its latency censored at the cut-off (a lower bound)
    latencies = [x if x is not None else (end - (t0 + i / rate)) * 1e3
                 for i, x in enumerate(lat)]
    cut = sum(1 for x in lat if x is None)
    ok = sum(1 for c in status if c == 200)
    return LoadResult(rate, window, latencies, ok, len(status) - ok, cut, in_window[0],
                      first_error=errors[0] if errors else "")


def open_loop(port: int, rate: float, window: float, grace: float,
              inflight: int = INFLIGHT) -> LoadResult:
    """``rate`` requests/s for ``window`` seconds at 127.0.0.1:``port``, open loop."""
    return asyncio.run(_open_loop(port, rate, window, grace, inflight))


# ---------------------------------------------------------------------------------------
# the figure
# ---------------------------------------------------------------------------------------
def _ms(delay: float) -> int:
    return round(delay * 1e3)


def _run(kind: str, server: GunicornServer, proxy: DelayProxy, rate: float, delay: float,
         window: float, grace: float, limit: int, flush: Callable[[], object]) -> LoadResult:
    flush()
    proxy.set_delay(delay)
    proxy.ask("reset")  # pooled connections stay open: the peak starts at what is open
    res = open_loop(server.port, rate, window, grace)
    server.quiesce()
    st = proxy.stats()
    res.peak, res.accepted = int(st["peak"]), int(st["accepted"])
    if kind == "mppools" and res.peak > limit:
        episodes, longest = proxy.over(limit)
        raise CapExceededError(
            f"gunicorn: the proxy saw {res.peak} connections at once for mppools with limit "
            f"{limit} ({server.workers} sync workers, {rate:g} req/s offered, "
            f"+{_ms(delay)} ms per connect): the cap of {limit} was exceeded {episodes} "
            f"times, the longest for {longest:.3f} ms")
    return res


def _warm(servers: dict[str, tuple[GunicornServer, DelayProxy]], passes: int) -> None:
    """Every worker imports, connects and publishes before the measured rounds."""
    for server, proxy in servers.values():
        proxy.set_delay(0.0)
        for _ in range(passes):
            res = open_loop(server.port, 400.0, 0.3, 5.0)
            if res.failed:
                raise RuntimeError(f"gunicorn ({server.kind}) warm-up: {res.failed} of "
                                   f"{len(res.latencies_ms)} requests failed: "
                                   f"{res.first_error}\n{server.log_tail()}")
        server.quiesce()


def _errs(rs: list[LoadResult]) -> str:
    failed, cut = sum(r.failed for r in rs), sum(r.cut_off for r in rs)
    total = sum(len(r.latencies_ms) for r in rs)
    out = f"{failed + cut}/{total}"
    if cut:
        out += f" ({cut} cut off)"
    return out


def _rows(runs: dict[str, list[LoadResult]], rate: float, delay: float, limit: int,
          workers: int) -> list[Any]:
    from stress.bench import Row, _met

    d = _ms(delay)
    mp, kb, cp = (runs[f"{k} r={rate:g} d={d}"] for k in KINDS)
    key = f"gunicorn_r{rate:g}_d{d}"
    title = (f"9. gunicorn, {workers} sync workers, L={limit}, {rate:g} req/s offered, "
             f"+{d} ms per new connection")
    stats: dict[str, dict[str, float]] = {}
    for name, rs in (("mppools", mp), ("kombu", kb), ("connect", cp)):
        stats[name] = {"p50": median([r.pct(0.50) for r in rs]),
                       "p99": median([r.pct(0.99) for r in rs]),
                       "rate": median([r.achieved for r in rs]),
                       "peak": float(max(r.peak for r in rs)),
                       "accepted": median([float(r.accepted) for r in rs])}
    censored = any(r.cut_off for rs in (mp, kb, cp) for r in rs)
    cnote = ("; some requests were cut off: their latency is censored at the cut-off, so the "
             "percentiles are lower bounds" if censored else "")
    qd = default_hold_quantum()
    qnote = f"mppools hold_quantum {qd:g} s (the default)" if qd is not None else \
        "configure() has no hold_quantum"
    lat_note = (f"lower is better; p50/p99 ms: mppools {stats['mppools']['p50']:.3g}/"
                f"{stats['mppools']['p99']:.3g}, kombu.pools {stats['kombu']['p50']:.3g}/"
                f"{stats['kombu']['p99']:.3g}, connect-per-publish "
                f"{stats['connect']['p50']:.3g}/{stats['connect']['p99']:.3g}; latency from "
                f"each request's scheduled send time; median over rounds{cnote}")
    rows: list[Any] = []
    for q in ("p50", "p99"):
        qq = 0.50 if q == "p50" else 0.99
        mp_s, kb_s, cp_s = ([r.pct(qq) for r in rs] for rs in (mp, kb, cp))
        r_kb = median(paired_ratios(mp_s, kb_s))
        r_cp = median(paired_ratios(mp_s, cp_s))
        rows.append(Row(
            f"{key}_{q}", f"{title}: {q} latency vs kombu.pools (lower is better)", "ms",
            stats["mppools"][q], stats["kombu"][q],
            f"kombu.pools, one pool per worker, limit 1 (<= {workers} connections)", r_kb,
            "<= 1.5x", _met(r_kb, 1.5), note=lat_note, samples_mppools=mp_s,
            samples_baseline=kb_s))
        rows.append(Row(
            f"{key}_{q}_vs_connect",
            f"{title}: {q} latency vs connect-per-publish (lower is better)", "ms",
            stats["mppools"][q], stats["connect"][q],
            "a new Connection per request (broker_pool_limit=0)", r_cp, "< 1x",
            None if math.isnan(r_cp) else r_cp < 1.0, note=lat_note, samples_mppools=mp_s,
            samples_baseline=cp_s))
    mp_a, kb_a = ([r.achieved for r in rs] for rs in (mp, kb))
    r_a = median(paired_ratios(mp_a, kb_a))
    rows.append(Row(
        f"{key}_rate", f"{title}: achieved rate vs kombu.pools (higher is better)", "req/s",
        stats["mppools"]["rate"], stats["kombu"]["rate"], "kombu.pools, one pool per worker",
        r_a, "-", None, higher_is_better=True,
        note=f"offered {rate:g} req/s; achieved = 200 answers within the window / window; "
             f"connect-per-publish {stats['connect']['rate']:,.0f} "
             f"req/s; errors (non-200, socket errors, cut off): mppools {_errs(mp)}, "
             f"kombu.pools {_errs(kb)}, connect-per-publish {_errs(cp)}"
             + "".join(f"; first {n} error: {r.first_error[:120]}"
                       for n, rs in (("mppools", mp), ("kombu.pools", kb),
                                     ("connect", cp)) for r in rs[:1] if r.first_error)))
    rows.append(Row(
        f"{key}_peak", f"{title}: proxy peak connections (mppools)", "conns",
        stats["mppools"]["peak"], float(limit), "the limit L", stats["mppools"]["peak"] / limit,
        "<= L", stats["mppools"]["peak"] <= limit,
        note=f"peak kombu.pools {stats['kombu']['peak']:.0f}, connect-per-publish "
             f"{stats['connect']['peak']:.0f}; connections accepted per round (median): "
             f"mppools {stats['mppools']['accepted']:.0f}, kombu.pools "
             f"{stats['kombu']['accepted']:.0f}, connect-per-publish "
             f"{stats['connect']['accepted']:.0f}; the proxy counts sockets: kombu's redis "
             f"transport opens 2 per Connection, mppools' 1 (mppools/_transports.py); "
             f"{qnote}"))
    return rows


def fig_gunicorn(plan: Any, redis: RedisProc | None) -> tuple[list[Any], list[str]]:
    """The rows of figure 9 and the lines to print as skipped."""
    import redis as redis_py

    from stress.bench import _fresh_pools

    if redis is None:
        return [], ["9. gunicorn: redis-server unavailable"]
    try:
        import gunicorn  # noqa: F401
    except ImportError:
        return [], ["9. gunicorn: gunicorn is not installed"]
    _fresh_pools()
    rates: tuple[float, ...] = tuple(float(r) for r in plan.g_rates)
    delays = tuple(ms / 1e3 for ms in plan.g_delays_ms)
    limit, workers = int(plan.g_limit), int(plan.g_workers)
    runs: dict[str, list[LoadResult]] = {}
    client = redis_py.Redis(host="127.0.0.1", port=redis.port, db=3)
    try:
        with _servers(redis, KINDS, workers, limit) as servers:
            _warm(servers, 1 if plan.quick else 3)
            subjects: list[tuple[str, Callable[[], float]]] = []
            for delay in delays:
                for rate in rates:
                    for kind in KINDS:
                        name = f"{kind} r={rate:g} d={_ms(delay)}"
                        runs[name] = []

                        def go(kind: str = kind, rate: float = rate, delay: float = delay,
                               name: str = name) -> float:
                            server, proxy = servers[kind]
                            r = _run(kind, server, proxy, rate, delay, plan.g_window,
                                     plan.g_grace, limit, client.flushdb)
                            runs[name].append(r)
                            return r.pct(0.99)

                        subjects.append((name, go))
            interleave(subjects, plan.g_reps, 20.0 if plan.quick else 400.0,
                       min_reps=1 if plan.quick else 3)
    finally:
        with contextlib.suppress(Exception):
            client.flushdb()
        client.close()
        _fresh_pools()
    rows: list[Any] = []
    for delay in delays:
        for rate in rates:
            rows += _rows(runs, rate, delay, limit, workers)
    return rows, []

"""Figure 8 of ``python -m stress bench``: end to end under contention.

8 forked workers publish in tight loops through a producer pool to a private broker
(redis-server; RabbitMQ in the full plan when it starts) while mppools caps them at L
connections. Every subject runs in ONE interleaved loop (order rotated each round):

- ``mppools``: 8 workers, ``mppools.producers``, ``configure(limit=L)``;
- ``kombu``: L workers, ``kombu.pools.producers`` with limit 1 per process: what L
  connections carry without contention (the baseline);
- ``connect``: 8 workers, a new kombu ``Connection`` per publish (``broker_pool_limit=0``).

Every subject goes through :class:`DelayProxy`, a TCP proxy in a process of its own that
adds 0 or 20 ms to each NEW connection (a hosted broker's TCP + TLS handshake) and counts
the connections open at once: its peak for mppools must stay <= L, else the figure fails.
The workers time each ``producers[conn].acquire(...)`` (for ``connect``: the connect) and
hand their samples back through a file each. In the full plan, when ``configure()`` has a
``hold_quantum`` argument, a sweep over Q shows how throughput and p99 wait move with it.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import importlib
import inspect
import json
import os
import selectors
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import kombu.pools
from kombu import Connection

import mppools
from stress._bench_util import (
    Barrier,
    RedisProc,
    budget_name,
    fork_child,
    interleave,
    median,
    paired_ratios,
    reap,
    run_group,
)

__all__ = ["CapExceededError", "DelayProxy", "fig_e2e_contention", "has_hold_quantum"]

MAX_OPS = 50_000_000
BODY = {"task": "bench", "args": [1, 2, 3], "kwargs": {"x": "y" * 64}}
QUEUE = "bench-e2ec"
ACQUIRE_TIMEOUT = 30.0


class CapExceededError(mppools.MppoolsError, RuntimeError):
    """The proxy saw more connections at once than the budget's limit."""


def has_hold_quantum() -> bool:
    """Whether this mppools' ``configure()`` takes ``hold_quantum``."""
    return "hold_quantum" in inspect.signature(mppools.configure).parameters


def default_hold_quantum() -> float | None:
    if not has_hold_quantum():
        return None
    default = inspect.signature(mppools.configure).parameters["hold_quantum"].default
    return float(default) if isinstance(default, int | float) else None


# ---------------------------------------------------------------------------------------
# the delay proxy
# ---------------------------------------------------------------------------------------
_HIGH_WATER = 1 << 20  # stop reading a side while 1 MiB waits to be written to its peer


@dataclass(eq=False)
class _End:
    sock: socket.socket
    out: bytearray = field(default_factory=bytearray)
    peer: _End | None = None
    client: bool = False
    closed: bool = False


class _ProxyLoop:
    """The proxy's event loop (runs in the proxy process only)."""

    def __init__(self, listener: socket.socket, ctrl: socket.socket,
                 upstream: tuple[str, int]) -> None:
        self.listener, self.ctrl, self.upstream = listener, ctrl, upstream
        self.sel = selectors.DefaultSelector()
        self.delay = 0.0
        self.current = self.peak = self.accepted = 0
        # (monotonic time, connections open after it) of the latest opens and closes
        self.log: collections.deque[tuple[float, int]] = collections.deque(maxlen=4096)
        self.pending: list[tuple[float, int, socket.socket]] = []
        self.seq = 0
        self.ctrl_buf = b""

    def run(self) -> int:
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, "accept")
        self.sel.register(self.ctrl, selectors.EVENT_READ, "ctrl")
        while True:
            timeout = None
            if self.pending:
                timeout = max(self.pending[0][0] - time.monotonic(), 0.0)
            events = self.sel.select(timeout)
            # closes first, accepts last: a connection handed on (closed, then a new one
            # opened) never shows as two at once because of the order of one select round
            events.sort(key=lambda e: e[0].data == "accept")
            for key, mask in events:
                if key.data == "accept":
                    self._accept()
                elif key.data == "ctrl":
                    if not self._control():
                        return 0
                elif isinstance(key.data, _End) and not key.data.closed:
                    self._io(key.data, mask)
            now = time.monotonic()
            while self.pending and self.pending[0][0] <= now:
                _, _, client = heapq.heappop(self.pending)
                self._connect(client)

    def _control(self) -> bool:
        data = self.ctrl.recv(4096)
        if not data:
            return False  # the benchmark went away
        self.ctrl_buf += data
        while b"\n" in self.ctrl_buf:
            line, self.ctrl_buf = self.ctrl_buf.split(b"\n", 1)
            cmd, _, arg = line.decode().partition(" ")
            if cmd == "quit":
                return False
            if cmd == "delay":
                self.delay = float(arg)
            elif cmd == "reset":
                self.peak, self.accepted = self.current, 0
                self.log.clear()
            reply: dict[str, Any] = {"current": self.current, "peak": self.peak,
                                     "accepted": self.accepted, "delay": self.delay}
            if cmd == "log":
                reply["log"] = list(self.log)
            self.ctrl.sendall(json.dumps(reply).encode() + b"\n")
        return True

    def _accept(self) -> None:
        for _ in range(1000):
            try:
                client, _addr = self.listener.accept()
            except BlockingIOError:
                return
            # look for hang-ups again after accept() and before counting: a FIN sent
            # before this client's connect() is queued by now, but it may have come after
            # the select() that woke us (a close and the next connect counted the wrong
            # way round would report limit + 1 that never existed)
            self._sweep()
            self.current += 1
            self.accepted += 1
            self.peak = max(self.peak, self.current)
            self.log.append((time.monotonic(), self.current))
            if self.delay > 0:
                self.seq += 1
                heapq.heappush(self.pending, (time.monotonic() + self.delay, self.seq, client))
            else:
                self._connect(client)

    def _sweep(self) -> None:
        for key, mask in self.sel.select(0):
            if isinstance(key.data, _End) and not key.data.closed:
                self._io(key.data, mask)

    def _connect(self, client: socket.socket) -> None:
        try:
            up = socket.create_connection(self.upstream, timeout=5.0)
        except OSError:
            client.close()
            self.current -= 1
            self.log.append((time.monotonic(), self.current))
            return
        a, b = _End(client, client=True), _End(up)
        a.peer, b.peer = b, a
        for end in (a, b):
            end.sock.setblocking(False)
            end.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sel.register(end.sock, selectors.EVENT_READ, end)

    def _io(self, end: _End, mask: int) -> None:
        peer = end.peer
        assert peer is not None
        if mask & selectors.EVENT_WRITE:
            self._flush(end)
        if mask & selectors.EVENT_READ and not end.closed:
            eof = False
            for _ in range(64):  # drain: an EOF behind data is seen in this round
                try:
                    chunk = end.sock.recv(65536)
                except BlockingIOError:
                    break
                except OSError:
                    eof = True
                    break
                if not chunk:
                    eof = True
                    break
                peer.out += chunk
                if len(peer.out) > _HIGH_WATER:
                    break
            self._flush(peer)
            if eof:
                self._close(end)
                return
        if not end.closed:
            self._update(end)
            self._update(peer)

    def _flush(self, end: _End) -> None:
        while end.out and not end.closed:
            try:
                sent = end.sock.send(end.out)
            except BlockingIOError:
                return
            except OSError:
                self._close(end)
                return
            del end.out[:sent]

    def _update(self, end: _End) -> None:
        if end.closed:
            return
        assert end.peer is not None
        mask = 0
        if len(end.peer.out) <= _HIGH_WATER:
            mask |= selectors.EVENT_READ
        if end.out:
            mask |= selectors.EVENT_WRITE
        if mask:
            self.sel.modify(end.sock, mask, end)
        else:
            self.sel.modify(end.sock, selectors.EVENT_WRITE, end)

    def _close(self, end: _End) -> None:
        for e in (end, end.peer):
            if e is None or e.closed:
                continue
            e.closed = True
            with contextlib.suppress(Exception):
                self.sel.unregister(e.sock)
            e.sock.close()
            if e.client:
                self.current -= 1
                self.log.append((time.monotonic(), self.current))


class DelayProxy:
    """A TCP proxy on 127.0.0.1 in a forked process of its own: sleeps ``delay`` after each
    accept before it connects upstream, then pumps bytes both ways; counts the client
    connections open at once (current, peak) and accepted since the last ``reset()``."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = 0
        self.pid = -1
        self._ctrl: socket.socket | None = None
        self._buf = b""

    def start(self) -> DelayProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1024)
        self.port = int(listener.getsockname()[1])
        ours, theirs = socket.socketpair()

        def child() -> int:
            ours.close()
            return _ProxyLoop(listener, theirs, self.upstream).run()

        self.pid = fork_child(child)
        listener.close()
        theirs.close()
        self._ctrl = ours
        self.ask("stats")
        return self

    def ask(self, command: str) -> dict[str, Any]:
        if self._ctrl is None:
            raise RuntimeError("the delay proxy is not running")
        self._ctrl.settimeout(10.0)
        self._ctrl.sendall(command.encode() + b"\n")
        while b"\n" not in self._buf:
            chunk = self._ctrl.recv(4096)
            if not chunk:
                raise RuntimeError("the delay proxy exited")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        reply: dict[str, Any] = json.loads(line)
        return reply

    def url_for(self, url: str) -> str:
        scheme, rest = url.split("://", 1)
        auth, _, hostpath = rest.rpartition("@")
        _hostport, slash, path = hostpath.partition("/")
        return f"{scheme}://{auth + '@' if auth else ''}127.0.0.1:{self.port}{slash}{path}"

    def set_delay(self, seconds: float) -> None:
        self.ask(f"delay {seconds}")

    def settle(self, timeout: float = 10.0) -> dict[str, Any]:
        """Wait (bounded) until no client connection is open, then reset peak/accepted."""
        end = time.monotonic() + timeout
        while self.ask("stats")["current"] > 0 and time.monotonic() < end:
            time.sleep(0.01)
        return self.ask("reset")

    def stats(self) -> dict[str, Any]:
        return self.ask("stats")

    def over(self, limit: int) -> tuple[int, float]:
        """How many times the open connections went above ``limit`` since the last reset,
        and the longest such episode in ms (the last 4096 opens and closes)."""
        episodes, longest, since = 0, 0.0, None
        for t, n in self.ask("log")["log"]:
            if n > limit and since is None:
                episodes, since = episodes + 1, t
            elif n <= limit and since is not None:
                longest, since = max(longest, (t - since) * 1e3), None
        if since is not None:  # still above (CLOCK_MONOTONIC is one clock for both)
            longest = max(longest, (time.monotonic() - since) * 1e3)
        return episodes, longest

    def stop(self) -> None:
        ctrl, self._ctrl = self._ctrl, None
        if ctrl is not None:
            with contextlib.suppress(OSError):
                ctrl.sendall(b"quit\n")
            ctrl.close()
        if self.pid > 0:
            reap([self.pid], timeout=5.0)
            self.pid = -1

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------
# one run of one subject
# ---------------------------------------------------------------------------------------
@dataclass
class Run:
    msg_s: float
    per_worker: list[int]
    waits_ms: list[float]
    peak: int
    accepted: int
    hold_quantum: float | None

    @property
    def fairness(self) -> float:
        return min(self.per_worker) / max(self.per_worker) if max(self.per_worker) else 0.0

    def wait_pct(self, q: float) -> float:
        if not self.waits_ms:
            return float("nan")
        s = sorted(self.waits_ms)
        return s[min(int(q * len(s)), len(s) - 1)]


def _worker(kind: str, url: str, outdir: str) -> Callable[[Barrier], int]:
    def body(b: Barrier) -> int:
        group: Any = None
        if kind == "kombu":
            kombu.pools.set_limit(1)
            group = kombu.pools.producers
        elif kind == "mppools":
            group = mppools.producers
        conn = Connection(url)
        if group is not None:  # connect before the start
            with group[conn].acquire(block=True, timeout=ACQUIRE_TIMEOUT) as p:
                p.publish(BODY, routing_key=QUEUE, retry=False)
        else:  # the transport's imports and first connect are no part of the window
            with Connection(url) as c:
                c.connect()
                c.Producer().publish(BODY, routing_key=QUEUE, retry=False)
        waits: list[float] = []
        _start, end = b.wait()
        count = 0
        clock = time.perf_counter
        while count < MAX_OPS and time.monotonic() < end:
            t0 = clock()
            if group is None:
                c = Connection(url)
                try:
                    c.connect()
                    producer = c.Producer()
                    waits.append(clock() - t0)  # "acquire" = connect
                    producer.publish(BODY, routing_key=QUEUE, retry=False)
                finally:
                    c.release()
            else:
                cm = group[conn].acquire(block=True, timeout=ACQUIRE_TIMEOUT)
                waits.append(clock() - t0)
                with cm as p:
                    p.publish(BODY, routing_key=QUEUE, retry=False)
            count += 1
        with open(os.path.join(outdir, f"{b.index}.json"), "w") as f:
            json.dump([round(w * 1e3, 4) for w in waits], f)
        return count

    return body


def _run(kind: str, url: str, workers: int, limit: int, window: float, proxy: DelayProxy,
         delay: float, quantum: float | None, broker: str) -> Run:
    proxy.set_delay(delay)
    proxy.settle()
    outdir = tempfile.mkdtemp(prefix="mppools-bench-e2ec-")
    effective_q: float | None = None
    try:
        if kind == "mppools":
            kw: dict[str, Any] = {}
            if quantum is not None and has_hold_quantum():
                kw["hold_quantum"] = quantum
            if os.environ.get("MPPOOLS_LEND", "").strip() == "0":
                kw["lend"] = False  # A/B: the same mppools without lending
            lim = mppools.configure(limit=limit, name=budget_name(),
                                    acquire_timeout=ACQUIRE_TIMEOUT, **kw)
            effective_q = getattr(lim, "hold_quantum", None)
        try:
            counts = run_group(workers, _worker(kind, proxy.url_for(url), outdir), window,
                               result_timeout=90.0)
        except RuntimeError as exc:
            raise RuntimeError(f"e2e_contention {broker} {kind} L={limit}, {workers} workers, "
                               f"+{delay * 1e3:.0f} ms, hold_quantum {effective_q}: {exc} "
                               "(the workers' tracebacks are above)") from exc
        finally:
            if kind == "mppools":
                mppools.close()
        if any(c is None for c in counts):
            raise RuntimeError(f"e2e_contention {broker} {kind} L={limit}: "
                               f"{sum(c is None for c in counts)} of {workers} workers failed")
        waits: list[float] = []
        for i in range(workers):
            with open(os.path.join(outdir, f"{i}.json")) as f:
                waits += json.load(f)
    finally:
        shutil.rmtree(outdir, ignore_errors=True)
    st = proxy.stats()
    per = [int(c) for c in counts if c is not None]
    run = Run(sum(per) / window, per, waits, int(st["peak"]), int(st["accepted"]),
              effective_q)
    if kind == "mppools" and run.peak > limit:
        episodes, longest = proxy.over(limit)
        raise CapExceededError(
            f"e2e_contention: the proxy saw {run.peak} connections at once for mppools with "
            f"limit {limit} ({broker}, +{delay * 1e3:.0f} ms per connect, {workers} workers, "
            f"hold_quantum {effective_q}): the cap of {limit} was exceeded {episodes} times, "
            f"the longest for {longest:.3f} ms")
    return run


# ---------------------------------------------------------------------------------------
# the figure
# ---------------------------------------------------------------------------------------
def _ms(delay: float) -> int:
    return round(delay * 1e3)


@dataclass
class _Cases:
    """Every subject of one broker, run in one interleaved loop."""

    broker: str
    url: str
    proxy: DelayProxy
    workers: int
    window: float
    flush: Callable[[], object]
    runs: dict[str, list[Run]] = field(default_factory=dict)

    def subject(self, kind: str, limit: int, delay: float, quantum: float | None = None,
                tag: str = "") -> tuple[str, Callable[[], float]]:
        n = self.workers if kind != "kombu" else limit
        name = f"{kind} L={limit} d={_ms(delay)}{tag}"
        if quantum is not None:
            name += f" q={quantum * 1e3:g}"
        self.runs.setdefault(name, [])

        def go() -> float:
            self.flush()
            r = _run(kind, self.url, n, limit, self.window, self.proxy, delay, quantum,
                     self.broker)
            self.runs[name].append(r)
            return r.msg_s

        return name, go


def _case_rows(c: _Cases, limit: int, delay: float, qnote: str) -> list[Any]:
    from stress.bench import Row, _met

    d = _ms(delay)
    mp = c.runs[f"mppools L={limit} d={d}"]
    kb = c.runs[f"kombu L={limit} d={d}"]
    cp = c.runs[f"connect L=0 d={d}"]
    mp_s, kb_s, cp_s = ([r.msg_s for r in rs] for rs in (mp, kb, cp))
    r_kb = median(paired_ratios(mp_s, kb_s))
    r_cp = median(paired_ratios(mp_s, cp_s))
    p99 = median([r.wait_pct(0.99) for r in mp])
    p50 = median([r.wait_pct(0.50) for r in mp])
    p999 = median([r.wait_pct(0.999) for r in mp])
    wmax = max(max(r.waits_ms, default=0.0) for r in mp)
    p99_kb = median([r.wait_pct(0.99) for r in kb])
    peak_kb = max(r.peak for r in kb)
    fair = median([r.fairness for r in mp])
    fair_kb = median([r.fairness for r in kb])
    peak = max(r.peak for r in mp)
    accepted = median([float(r.accepted) for r in mp])
    measured_q = {r.hold_quantum for r in mp if r.hold_quantum is not None}
    if measured_q:
        qnote = "hold_quantum " + ", ".join(f"{q:g}" for q in sorted(measured_q)) + " s"
        default = default_hold_quantum()
        if default is not None and measured_q == {default}:
            qnote += " (the default)"
    tag = f"{c.broker}, L={limit}, +{d} ms per new connection"
    key = f"e2ec_{c.broker}_L{limit}_d{d}"
    title = f"8. e2e contention ({tag})"
    summary = (f"connect-per-publish {median(cp_s):,.0f} msg/s; mppools p99 acquire wait "
               f"{p99:.3g} ms; fairness {fair:.2f}; proxy peak {peak}/{limit}; {qnote}")
    return [
        Row(f"{key}_throughput", f"{title}: {c.workers} workers on L vs kombu.pools, L workers",
            "msg/s", median(mp_s), median(kb_s), f"kombu.pools, {limit} workers, limit 1 each",
            r_kb, ">= 0.8x", _met(r_kb, 0.8, at_least=True), higher_is_better=True,
            note=summary, samples_mppools=mp_s, samples_baseline=kb_s),
        Row(f"{key}_vs_connect", f"{title}: vs a new Connection per publish", "msg/s",
            median(mp_s), median(cp_s), f"connect per publish, {c.workers} workers", r_cp,
            "-", None, higher_is_better=True,
            note=f"what broker_pool_limit=0 does; {qnote}", samples_mppools=mp_s,
            samples_baseline=cp_s),
        Row(f"{key}_p99_wait", f"{title}: p99 acquire wait", "ms", p99, p99_kb,
            f"kombu.pools, {limit} workers (uncontended)",
            p99 / p99_kb if p99_kb > 0 else None, "-", None,
            note=f"lower is better; mppools p50 {p50:.3g} ms, p99 {p99:.3g} ms, p99.9 "
                 f"{p999:.3g} ms, max {wmax:.3g} ms (percentiles over every acquire of "
                 "every worker in a round; median over rounds)"),
        Row(f"{key}_fairness", f"{title}: fairness, min/max msgs per worker", "min/max",
            fair, fair_kb, f"kombu.pools, {limit} workers", fair / fair_kb if fair_kb else None,
            ">= 0.7", _met(fair, 0.7, at_least=True), higher_is_better=True,
            note="per-worker msgs (last round): " + ", ".join(map(str, mp[-1].per_worker))),
        Row(f"{key}_peak", f"{title}: proxy peak connections (mppools)", "conns",
            float(peak), float(limit), "the limit L", peak / limit, "<= L",
            peak <= limit,
            note=f"mppools: {accepted:.0f} connections accepted per round (median); "
                 f"kombu.pools, {limit} workers: peak {peak_kb} sockets"),
    ]


def _subjects(c: _Cases, limits: tuple[int, ...], delays: tuple[float, ...]
              ) -> list[tuple[str, Callable[[], float]]]:
    out: list[tuple[str, Callable[[], float]]] = []
    for delay in delays:
        out.append(c.subject("connect", 0, delay))
        for lim in limits:
            out.append(c.subject("mppools", lim, delay))
            out.append(c.subject("kombu", lim, delay))
    return out


@contextlib.contextmanager
def _rabbit() -> Iterator[Any]:
    """A private RabbitMQ node from tests/support/servers.py (raises when unavailable)."""
    servers = importlib.import_module("tests.support.servers")
    tmp = tempfile.mkdtemp(prefix="mppools-bench-rabbit-")
    try:
        with servers.RabbitMQServer(tmp, startup_timeout=45.0) as rabbit:
            yield rabbit
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _broker_rows(c: _Cases, limits: tuple[int, ...], delays: tuple[float, ...], reps: int,
                 budget_s: float, quick: bool) -> list[Any]:
    qnote = ("no hold_quantum in configure(): hand-on at every release" if
             not has_hold_quantum() else "hold_quantum: the default")
    interleave(_subjects(c, limits, delays), reps, budget_s, min_reps=1 if quick else 3)
    rows: list[Any] = []
    for lim in limits:
        for delay in delays:
            rows += _case_rows(c, lim, delay, qnote)
    return rows


def _sweep_rows(c: _Cases, limit: int, delay: float, quanta: tuple[float, ...], reps: int,
                budget_s: float) -> list[Any]:
    from stress.bench import Row, _met

    subjects = [c.subject("mppools", limit, delay, q, " sweep") for q in quanta]
    subjects.append(c.subject("kombu", limit, delay, tag=" sweep"))
    interleave(subjects, reps, budget_s, min_reps=3)
    d = _ms(delay)
    kb_s = [r.msg_s for r in c.runs[subjects[-1][0]]]
    rows: list[Any] = []
    for (name, _), q in zip(subjects, quanta, strict=False):
        mp = c.runs[name]
        mp_s = [r.msg_s for r in mp]
        ratio = median(paired_ratios(mp_s, kb_s))
        p99 = median([r.wait_pct(0.99) for r in mp])
        rows.append(Row(
            f"e2ec_sweep_{c.broker}_L{limit}_d{d}_q{q * 1e3:g}ms",
            f"8. hold-quantum sweep ({c.broker}, L={limit}, +{d} ms): Q={q * 1e3:g} ms",
            "msg/s", median(mp_s), median(kb_s), f"kombu.pools, {limit} workers", ratio,
            ">= 0.8x", _met(ratio, 0.8, at_least=True), higher_is_better=True,
            note=f"acquire wait p99 {p99:.3g} ms, p99.9 "
                 f"{median([r.wait_pct(0.999) for r in mp]):.3g} ms, max "
                 f"{max(max(r.waits_ms, default=0.0) for r in mp):.3g} ms; fairness "
                 f"{median([r.fairness for r in mp]):.2f}; proxy peak "
                 f"{max(r.peak for r in mp)}/{limit}; accepted/round "
                 f"{median([float(r.accepted) for r in mp]):.0f}",
            samples_mppools=mp_s, samples_baseline=kb_s))
    return rows


def fig_e2e_contention(plan: Any, redis: RedisProc | None) -> tuple[list[Any], list[str]]:
    """The rows of figure 8 and the lines to print as skipped."""
    import redis as redis_py

    from stress.bench import _fresh_pools

    skipped: list[str] = []
    rows: list[Any] = []
    limits: tuple[int, ...] = plan.e2ec_limits
    delays = tuple(ms / 1e3 for ms in plan.e2ec_delays_ms)
    budget_s = 25.0 if plan.quick else 400.0
    if not has_hold_quantum():
        skipped.append("8. e2e contention: configure() has no hold_quantum: measured "
                       "hand-on at every release; no hold-quantum sweep")
    _fresh_pools()
    if redis is None:
        skipped.append("8. e2e contention (redis): redis-server unavailable")
    else:
        client = redis_py.Redis(host="127.0.0.1", port=redis.port, db=2)
        try:
            with DelayProxy(("127.0.0.1", redis.port)) as proxy:
                c = _Cases("redis", f"{redis.url}/2", proxy, plan.e2ec_workers,
                           plan.e2ec_window, client.flushdb)
                rows += _broker_rows(c, limits, delays, plan.e2ec_reps, budget_s, plan.quick)
                if plan.e2ec_quanta and has_hold_quantum():
                    rows += _sweep_rows(c, plan.e2ec_sweep_limit, plan.e2ec_sweep_delay_ms / 1e3,
                                        plan.e2ec_quanta, plan.e2ec_reps, budget_s)
        finally:
            with contextlib.suppress(Exception):
                client.flushdb()
            client.close()
            _fresh_pools()
    if plan.e2ec_rabbit:
        try:
            with contextlib.ExitStack() as stack:
                rabbit = stack.enter_context(_rabbit())
                proxy = stack.enter_context(DelayProxy(("127.0.0.1", rabbit.port)))
                admin = Connection(rabbit.url)  # direct, not through the proxy
                stack.callback(admin.release)
                channel = admin.default_channel
                kombu.Queue(QUEUE, routing_key=QUEUE)(channel).declare()
                c = _Cases("amqp", rabbit.url, proxy, plan.e2ec_workers, plan.e2ec_window,
                           lambda: channel.queue_purge(QUEUE))
                rows += _broker_rows(c, limits, delays, plan.e2ec_reps, budget_s, plan.quick)
        except (ImportError, OSError, RuntimeError) as exc:
            if isinstance(exc, CapExceededError):
                raise
            skipped.append(f"8. e2e contention (amqp): skipped: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}"[:200])
        finally:
            _fresh_pools()
    else:
        skipped.append("8. e2e contention (amqp): full plan only")
    return rows, skipped

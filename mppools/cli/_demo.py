"""``mppools demo``: forked publishers share one small budget while workers get SIGKILLed.

No server is needed: by default the workers publish through kombu's ``filesystem://``
transport into a temporary directory. The master never takes a slot; it watches the budget
(``mppools.stats()``), kills a random slot holder every few seconds, measures how long the
slot takes to come back, forks a replacement, and at the end checks that the number of slots
in use never went above the limit.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import random
import select
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TextIO

import mppools
from mppools._errors import LimitExceeded
from mppools._limiter._base import BudgetStats
from mppools._limiter.posix import exists, validate_name
from mppools.cli._common import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    CLIError,
)

__all__ = ["DemoOptions", "percentile", "run_demo"]

QUEUE = "mppools-demo"
#: per seat: published, acquire timeouts, errors, slow acquires (> SLOW seconds)
_FIELDS = 4
_PUBLISHED, _TIMEOUTS, _ERRORS, _SLOW = range(_FIELDS)
_ERROR_BYTES = 200
SLOW = 0.010
#: how long the master polls for a killed holder's slot before it runs an audit itself
RECLAIM_BOUND = 1.0
REFRESH = 0.25
_CLEAR = "\x1b[H\x1b[2J"


@dataclass(frozen=True)
class DemoOptions:
    """The knobs of one demo run."""

    workers: int = 8
    limit: int = 3
    seconds: float = 20.0
    broker: str | None = None
    kill_every: float = 3.0
    name: str | None = None
    acquire_timeout: float = 5.0
    seed: int | None = None


@dataclass
class _Kill:
    pid: int
    slots: int
    latency: float
    #: "reclaimed" (by a waiter's audit), "audit" (the master's), "released" (not timed)
    outcome: str
    exited: float | None = None  # SIGKILL -> the process is gone (pidfd readable)
    replacement: int = 0


@dataclass
class _State:
    started: float = 0.0
    peak: int = 0
    peak_at: float = 0.0
    samples: int = 0
    kills: list[_Kill] = field(default_factory=list)
    crashed: int = 0
    events: list[str] = field(default_factory=list)
    last: BudgetStats | None = None
    broker_clients: int | None = None
    broker_baseline: int | None = None
    broker_peak: int | None = None
    interrupted: bool = False


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, nearest-rank; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(int(-(-q * len(ordered) // 100)), 1)  # ceil(q/100 * n), at least 1
    return ordered[min(rank, len(ordered)) - 1]


# the workers -----------------------------------------------------------------------------------
class _Counters:
    """Per-seat counters in an anonymous shared mapping: every worker writes only its seat,
    so no lock is needed (a lock held by a SIGKILLed worker would stall everyone)."""

    def __init__(self, seats: int) -> None:
        self.seats = seats
        self._map = mmap.mmap(-1, seats * _FIELDS * 8 + seats * _ERROR_BYTES)
        self._cells = memoryview(self._map)[: seats * _FIELDS * 8].cast("q")
        self._errors_at = seats * _FIELDS * 8

    def add(self, seat: int, what: int, n: int = 1) -> None:
        self._cells[seat * _FIELDS + what] += n

    def total(self, what: int) -> int:
        return sum(self._cells[seat * _FIELDS + what] for seat in range(self.seats))

    def set_error(self, seat: int, text: str) -> None:
        data = text.encode("utf-8", "replace")[: _ERROR_BYTES - 1]
        start = self._errors_at + seat * _ERROR_BYTES
        self._map[start : start + _ERROR_BYTES] = data.ljust(_ERROR_BYTES, b"\0")

    def last_error(self) -> str | None:
        for seat in range(self.seats):
            start = self._errors_at + seat * _ERROR_BYTES
            raw = bytes(self._map[start : start + _ERROR_BYTES]).rstrip(b"\0")
            if raw:
                return raw.decode("utf-8", "replace")
        return None

    def close(self) -> None:
        self._cells.release()
        with contextlib.suppress(BufferError):
            self._map.close()


class _ExitWatcher:
    """Times a process's death from its pidfd, in a thread (joined before any fork)."""

    def __init__(self, pid: int) -> None:
        self._died: float | None = None
        try:
            self._fd: int | None = os.pidfd_open(pid)
        except OSError:
            self._fd = None
            self._thread: threading.Thread | None = None
            return
        self._thread = threading.Thread(target=self._watch, name="mppools-demo-exit",
                                        daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        assert self._fd is not None
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        if poller.poll(RECLAIM_BOUND * 2000):
            self._died = time.monotonic()

    def join(self, since: float) -> float | None:
        """Seconds from ``since`` to the death (None if not seen); closes the pidfd."""
        if self._thread is not None:
            self._thread.join()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        return None if self._died is None else max(self._died - since, 0.0)


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this worker when the master dies (prctl PR_SET_PDEATHSIG)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def _worker(seat: int, url: str, transport_options: dict[str, Any], counters: _Counters,
            master: int, acquire_timeout: float) -> None:  # pragma: no cover - in a child
    """Publish as fast as possible through mppools' producer pool until the master is gone."""
    from kombu import connection as kombu_connection

    connection_class: Callable[..., Any] = kombu_connection.Connection
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the master handles Ctrl-C for everyone
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent()
    if os.getppid() != master:
        return
    conn = connection_class(url, transport_options=transport_options)
    pool = mppools.producers[conn]
    body = {"seat": seat, "pid": os.getpid(), "payload": "x" * 64}
    while os.getppid() == master:
        started = time.monotonic()
        try:
            with pool.acquire(block=True, timeout=acquire_timeout) as producer:
                if time.monotonic() - started > SLOW:
                    counters.add(seat, _SLOW)
                producer.publish(body, routing_key=QUEUE, retry=False)
            counters.add(seat, _PUBLISHED)
        except LimitExceeded:
            counters.add(seat, _TIMEOUTS)
        except Exception as exc:
            counters.add(seat, _ERRORS)
            counters.set_error(seat, f"{type(exc).__name__}: {exc}")
            time.sleep(0.2)


def _spawn(seat: int, url: str, transport_options: dict[str, Any], counters: _Counters,
           acquire_timeout: float) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    master = os.getpid()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0
        try:
            _worker(seat, url, transport_options, counters, master, acquire_timeout)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    return pid


# the broker's own view (redis only) -----------------------------------------------------------
class _BrokerProbe:
    """Counts the broker's client connections (redis ``CLIENT LIST``), minus its own."""

    def __init__(self, url: str | None) -> None:
        self._client: Any = None
        if url is None or not url.startswith(("redis://", "rediss://")):
            return
        try:
            import redis
        except ImportError:  # pragma: no cover - redis is an optional extra
            return
        self._client = redis.Redis.from_url(url, socket_timeout=1.0)

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def count(self) -> int | None:
        if self._client is None:
            return None
        try:
            return max(len(self._client.client_list()) - 1, 0)
        except Exception:
            return None

    def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()


# the run -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _le(out: TextIO) -> str:
    encoding = getattr(out, "encoding", None) or "ascii"
    try:
        "≤".encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return "<="
    return "≤"


class _Demo:
    def __init__(self, options: DemoOptions, out: TextIO) -> None:
        self.o = options
        self.out = out
        self.tty = out.isatty()
        self.state = _State()
        self.rng = random.Random(options.seed)
        self.name = options.name or f"demo-{os.getpid()}"
        self.tmpdir: str | None = None
        self.url = options.broker or "filesystem://"
        self.transport_options: dict[str, Any] = {}
        self.counters = _Counters(options.workers)
        self.seats: dict[int, int] = {}  # pid -> seat
        self.probe = _BrokerProbe(options.broker)
        self.configured = False
        self._last_plain = 0.0

    # lifecycle -----------------------------------------------------------------------------
    def setup(self) -> None:
        validate_name(self.name)
        if exists(self.name):
            raise CLIError(
                f"a budget named {self.name!r} already exists on this host: pick another "
                f"--name (or remove it with `mppools unlink {self.name}`)"
            )
        if self.o.broker is None:
            self.tmpdir = tempfile.mkdtemp(prefix="mppools-demo-")
            folder = os.path.join(self.tmpdir, "queue")
            os.mkdir(folder)
            self.transport_options = {"data_folder_in": folder, "data_folder_out": folder}
        mppools.configure(self.o.limit, name=self.name, acquire_timeout=self.o.acquire_timeout)
        self.configured = True
        self.state.broker_baseline = self.probe.count()
        self.state.started = time.monotonic()
        for seat in range(self.o.workers):
            self._fork(seat)

    def cleanup(self) -> list[str]:
        notes: list[str] = []
        pids = list(self.seats)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.seats.clear()
        if pids:
            notes.append(f"{len(pids)} workers killed and reaped")
        if self.configured:
            self.configured = False
            try:
                mppools.close()
            finally:
                if exists(self.name):
                    mppools.unlink(self.name, force=True)
                    notes.append(f"budget {self.name!r} force-unlinked (close() left it)")
                else:
                    notes.append(f"budget {self.name!r} unlinked")
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            notes.append(f"temp dir {self.tmpdir} removed")
            self.tmpdir = None
        self.probe.close()
        return notes

    def _fork(self, seat: int) -> int:
        pid = _spawn(seat, self.url, self.transport_options, self.counters,
                     self.o.acquire_timeout)
        self.seats[pid] = seat
        return pid

    # sampling ------------------------------------------------------------------------------
    def sample(self) -> BudgetStats:
        stats = mppools.stats()
        st = self.state
        st.samples += 1
        st.last = stats
        if stats.in_use > st.peak:
            st.peak = stats.in_use
            st.peak_at = time.monotonic() - st.started
        return stats

    def reap_crashed(self) -> None:
        while self.seats:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            seat = self.seats.pop(pid, None)
            if seat is None:
                continue
            self.state.crashed += 1
            code = os.waitstatus_to_exitcode(status)
            new = self._fork(seat)
            self.event(f"worker {pid} exited on its own (code {code}); replaced by {new}")

    def event(self, text: str) -> None:
        stamp = f"{time.monotonic() - self.state.started:6.2f}s"
        self.state.events.append(f"{stamp}  {text}")
        del self.state.events[:-6]
        if not self.tty:
            print(f"[{stamp}] {text}", file=self.out, flush=True)

    def kill_one(self) -> bool:
        """SIGKILL a random worker that holds a slot; time its slot's return; replace it."""
        stats = self.sample()
        candidates = [h for h in stats.holders if h.alive and h.pid in self.seats]
        if not candidates:
            return False
        # an idle holder may be asked to yield its slot any moment: prefer a busy one
        candidates = [h for h in candidates if h.busy] or candidates
        victim = self.rng.choice(candidates)
        reclaimed_before = stats.reclaimed_total
        watcher = _ExitWatcher(victim.pid)
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        outcome = "reclaimed"
        while True:
            stats = self.sample()
            if all(h.pid != victim.pid for h in stats.holders):
                latency = time.monotonic() - killed_at
                if stats.reclaimed_total == reclaimed_before:
                    # no audit ran: it gave its slot back itself just before the kill
                    outcome = "released"
                break
            if time.monotonic() - killed_at > RECLAIM_BOUND:
                mppools.audit()  # nobody waits, so nobody audited: do it ourselves
                latency = time.monotonic() - killed_at
                outcome = "audit"
                break
            time.sleep(0.0002)
        exited = watcher.join(killed_at)  # no thread may run across the fork below
        seat = self.seats.pop(victim.pid)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(victim.pid, 0)
        kill = _Kill(victim.pid, victim.slots, latency, outcome, exited)
        kill.replacement = self._fork(seat)
        self.state.kills.append(kill)
        gone = "" if exited is None else f" (process gone after {exited * 1000:.1f} ms)"
        if outcome == "reclaimed":
            what = f"slot back in {latency * 1000:.1f} ms{gone}"
        elif outcome == "audit":
            what = f"nobody waited: reclaimed by the master's audit after {latency:.2f} s"
        else:
            what = "it had just given its slot back (not timed)"
        self.event(f"SIGKILL pid {victim.pid} holding {victim.slots} slot(s): {what}; "
                   f"replaced by pid {kill.replacement}")
        return True

    def probe_broker(self) -> None:
        count = self.probe.count()
        st = self.state
        st.broker_clients = count
        if count is not None:
            st.broker_peak = count if st.broker_peak is None else max(st.broker_peak, count)

    # the main loop ---------------------------------------------------------------------------
    def run(self) -> None:
        st = self.state
        end = st.started + self.o.seconds
        next_kill = st.started + self.o.kill_every if self.o.kill_every > 0 else float("inf")
        next_render = st.started
        while True:
            now = time.monotonic()
            if now >= end:
                break
            self.sample()
            self.reap_crashed()
            if now >= next_kill:
                if self.kill_one():
                    next_kill += self.o.kill_every
                    next_kill = max(next_kill, time.monotonic())
                else:
                    next_kill = now + 0.05  # nobody holds a slot right now: try again soon
            if now >= next_render:
                self.probe_broker()
                self.render()
                next_render = now + REFRESH
            time.sleep(0.002)
        self.sample()
        self.render()

    # output ----------------------------------------------------------------------------------
    def _latencies(self) -> list[float]:
        return [k.latency for k in self.state.kills if k.outcome == "reclaimed"]

    def render(self) -> None:
        stats = self.state.last
        if stats is None:
            return
        st = self.state
        elapsed = time.monotonic() - st.started
        published = self.counters.total(_PUBLISHED)
        rate = published / elapsed if elapsed > 0 else 0.0
        le = _le(self.out)
        if not self.tty:
            if time.monotonic() - self._last_plain >= 1.0:
                self._last_plain = time.monotonic()
                print(f"[{elapsed:6.2f}s] in use {stats.in_use}/{stats.limit} waiting "
                      f"{stats.waiting} published {published} timeouts "
                      f"{self.counters.total(_TIMEOUTS)} kills {len(st.kills)} "
                      f"peak {st.peak}", file=self.out, flush=True)
            return
        width = max(shutil.get_terminal_size((100, 24)).columns, 60)
        bar = "#" * min(stats.in_use, stats.limit) + "." * stats.free
        if stats.in_use > stats.limit:
            bar += "!" * (stats.in_use - stats.limit)
        holders = "  ".join(
            f"{h.pid}:{'busy' if h.busy else 'idle'}" + ("" if h.alive else "(dead)")
            for h in stats.holders
        ) or "none"
        lat = self._latencies()
        verdict = (f"peak {st.peak} {le} limit {stats.limit}" if st.peak <= stats.limit
                   else f"peak {st.peak} > limit {stats.limit}  LIMIT EXCEEDED")
        lines = [
            f"mppools demo — budget {self.name!r} — {self.o.workers} workers — "
            f"{self._broker_text()}",
            f"elapsed {elapsed:5.1f}s / {self.o.seconds:g}s   (Ctrl-C stops early)",
            "",
            f"slots      [{bar}]  {stats.in_use}/{stats.limit} in use   {stats.free} free   "
            f"{stats.waiting} waiting   debt {stats.debt}   {verdict}",
            f"holders    {holders}"[:width],
            f"published  {published} messages ({rate:.0f}/s)   slow acquires (>"
            f"{SLOW * 1000:.0f}ms) {self.counters.total(_SLOW)}   timeouts "
            f"{self.counters.total(_TIMEOUTS)}   errors {self.counters.total(_ERRORS)}",
            f"kills      {len(st.kills)}   reclaim latency p50 "
            f"{percentile(lat, 50) * 1000:.1f} ms  p99 {percentile(lat, 99) * 1000:.1f} ms   "
            f"reclaimed total {stats.reclaimed_total}",
        ]
        if self.probe.enabled:
            lines.append(f"broker     {st.broker_clients} client connections now "
                         f"(peak {st.broker_peak}, {st.broker_baseline} before the workers)")
        lines.append("")
        lines.extend(f"  {e}"[:width] for e in st.events)
        self.out.write(_CLEAR + "\n".join(lines) + "\n")
        self.out.flush()

    def _broker_text(self) -> str:
        if self.o.broker is None:
            return f"filesystem:// in {self.tmpdir}"
        return self.o.broker

    def summary(self, notes: list[str]) -> tuple[str, bool]:
        st = self.state
        elapsed = max(time.monotonic() - st.started, 1e-9)
        published = self.counters.total(_PUBLISHED)
        lat = self._latencies()
        le = _le(self.out)
        ok = st.peak <= self.o.limit
        verdict = (f"peak {st.peak} {le} limit {self.o.limit}   OK" if ok else
                   f"peak {st.peak} > limit {self.o.limit}   LIMIT EXCEEDED")
        audited = sum(1 for k in st.kills if k.outcome == "audit")
        released = sum(1 for k in st.kills if k.outcome == "released")
        lines = [
            "",
            f"mppools demo summary — budget {self.name!r}, {elapsed:.1f}s, "
            f"{self.o.workers} workers, limit {self.o.limit}"
            + ("  (interrupted)" if st.interrupted else ""),
            f"  messages published  {published} ({published / elapsed:.0f}/s)",
            f"  slots in use        {verdict}   ({st.samples} samples)",
            f"  kills               {len(st.kills)}"
            + (f", {audited} reclaimed by the master's audit (nobody was waiting)"
               if audited else "")
            + (f", {released} had just given their slot back (not timed)"
               if released else "")
            + (f", {st.crashed} worker(s) died on their own" if st.crashed else ""),
        ]
        if lat:
            lines.append(
                f"  reclaim latency     p50 {percentile(lat, 50) * 1000:.1f} ms   "
                f"p99 {percentile(lat, 99) * 1000:.1f} ms   max {max(lat) * 1000:.1f} ms   "
                "(SIGKILL -> slot free or handed over)"
            )
            exits = [k.exited for k in st.kills if k.exited is not None
                     and k.outcome == "reclaimed"]
            if exits:
                lines.append(
                    f"  process exit        p50 {percentile(exits, 50) * 1000:.1f} ms   "
                    f"p99 {percentile(exits, 99) * 1000:.1f} ms   (SIGKILL -> pid gone, "
                    "the kernel's share of the latency)"
                )
        lines.append(
            f"  acquire timeouts    {self.counters.total(_TIMEOUTS)}   errors "
            f"{self.counters.total(_ERRORS)}   slow acquires (>{SLOW * 1000:.0f}ms) "
            f"{self.counters.total(_SLOW)}"
        )
        if self.probe.enabled and st.broker_peak is not None:
            base = st.broker_baseline or 0
            seen = st.broker_peak - base
            mark = f"{le} limit" if seen <= self.o.limit else "> limit (other clients?)"
            lines.append(f"  broker connections  peak {seen} {mark} {self.o.limit}   "
                         f"(CLIENT LIST every {REFRESH:g}s, {base} before the workers)")
        error = self.counters.last_error()
        if error:
            lines.append(f"  last worker error   {error}")
        if notes:
            lines.append("  cleanup             " + "; ".join(notes))
        failed = not ok or (published == 0 and self.counters.total(_ERRORS) > 0)
        return "\n".join(lines), failed


def run_demo(options: DemoOptions, out: TextIO | None = None) -> int:
    """Run the demo (see the module docstring) and print its summary.

    Returns:
        0 when the peak stayed within the limit, 1 when it did not (or nothing could be
        published), 130 when interrupted.

    Raises:
        CLIError: invalid options, or a budget of that name exists already.
        MppoolsError: the budget could not be created.
    """
    out = sys.stdout if out is None else out
    if options.workers < 1:
        raise CLIError("--workers must be at least 1")
    if options.seconds <= 0:
        raise CLIError("--seconds must be positive")
    if options.kill_every < 0:
        raise CLIError("--kill-every must be >= 0 (0: no kills)")
    if options.acquire_timeout <= 0:
        raise CLIError("--acquire-timeout must be positive")
    demo = _Demo(options, out)
    notes: list[str] = []
    with _sigterm_as_interrupt():
        try:
            try:
                demo.setup()
                demo.run()
            except KeyboardInterrupt:
                demo.state.interrupted = True
            finally:
                try:
                    notes = demo.cleanup()
                except KeyboardInterrupt:  # a second Ctrl-C: finish the cleanup anyway
                    notes = demo.cleanup()
        except KeyboardInterrupt:  # pragma: no cover - Ctrl-C during the cleanup itself
            demo.state.interrupted = True
    try:
        if demo.state.started == 0.0:
            return EXIT_INTERRUPTED if demo.state.interrupted else EXIT_FAILURE
        text, failed = demo.summary(notes)
    finally:
        demo.counters.close()
    print(text, file=out, flush=True)
    if demo.state.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILURE if failed else EXIT_OK


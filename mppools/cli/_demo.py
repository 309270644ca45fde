"""``mppools demo``: forked publishers share one small budget while workers get SIGKILLed.

No server is needed: by default the workers publish through kombu's ``filesystem://``
transport into a temporary directory. Before the run, ``limit`` workers publish for a moment
through plain kombu pools (no budget): what ``limit`` connections carry alone, shown beside
the demo's own throughput. The master never takes a slot; it watches the budget
(``mppools.stats()``), kills a random slot holder every few seconds, measures how long the
slot takes to come back, forks a replacement, and at the end checks that the number of slots
in use never went above the limit.

Every kill is timed: the master stops a worker (SIGSTOP) that is inside its ``with
producers[...].acquire()`` block, so holds a slot and is outside mppools' code, and only
then SIGKILLs it; a worker caught between two acquires is continued and another one tried.
"""

from __future__ import annotations

import collections
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
#: per seat: published, acquire timeouts, errors, slow acquires (> SLOW seconds), and 1
#: while the worker is inside its ``with pool.acquire()`` block (it holds a slot)
_FIELDS = 5
_PUBLISHED, _TIMEOUTS, _ERRORS, _SLOW, _HOLDING = range(_FIELDS)
_ERROR_BYTES = 200
SLOW = 0.010
#: how long the master polls for a killed holder's slot before it runs an audit itself
RECLAIM_BOUND = 1.0
REFRESH = 0.25
#: the live view's throughput is the rate over this many seconds
RATE_WINDOW = 2.0
#: how many workers a kill tries (stop, look, continue) before it waits for the next round
_KILL_TRIES = 4
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
    #: seconds of the run of ``limit`` workers without a budget before the demo (what
    #: ``limit`` connections carry alone); None: 5 % of ``seconds``, 0.2 to 1 s; 0: skip
    calibrate: float | None = None


@dataclass
class _Kill:
    pid: int
    slots: int
    latency: float  # SIGKILL -> the slot is free or handed over (every kill is timed)
    #: "waiter" (a waiting worker's audit took it back), "audit" (the master's: nobody waited)
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
    reclaimed_at_start: int = 0
    ended: float = 0.0
    #: msgs/s of ``limit`` workers without a budget, before and after the run (what was
    #: measured), and why not when nothing was
    carry_rates: list[float] = field(default_factory=list)
    carry_seconds: float = 0.0
    carry_note: str = ""

    @property
    def carry_rate(self) -> float | None:
        if not self.carry_rates:
            return None
        return sum(self.carry_rates) / len(self.carry_rates)
    hold_quantum: float = 0.0


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

    def put(self, seat: int, what: int, value: int) -> None:
        self._cells[seat * _FIELDS + what] = value

    def get(self, seat: int, what: int) -> int:
        return int(self._cells[seat * _FIELDS + what])

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

    @property
    def died(self) -> bool:
        return self._died is not None

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
                counters.put(seat, _HOLDING, 1)  # from here to the release: a slot is ours
                try:
                    if time.monotonic() - started > SLOW:
                        counters.add(seat, _SLOW)
                    producer.publish(body, routing_key=QUEUE, retry=False)
                finally:
                    counters.put(seat, _HOLDING, 0)
            counters.add(seat, _PUBLISHED)
        except LimitExceeded:
            counters.add(seat, _TIMEOUTS)
        except Exception as exc:
            counters.add(seat, _ERRORS)
            counters.set_error(seat, f"{type(exc).__name__}: {exc}")
            time.sleep(0.2)


def _carry_worker(seat: int, url: str, transport_options: dict[str, Any],
                  counters: _Counters, master: int,
                  acquire_timeout: float) -> None:  # pragma: no cover - in a child
    """Publish as fast as possible through kombu's own producer pool (one connection, no
    budget): what one connection carries without contention."""
    import kombu.pools
    from kombu import connection as kombu_connection

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent()
    if os.getppid() != master:
        return
    set_limit: Callable[[int], object] = kombu.pools.set_limit
    connection_class: Callable[..., Any] = kombu_connection.Connection
    set_limit(1)
    conn = connection_class(url, transport_options=transport_options)
    pool: Any = kombu.pools.producers[conn]
    body = {"seat": seat, "pid": os.getpid(), "payload": "x" * 64}
    while os.getppid() == master:
        try:
            with pool.acquire(block=True, timeout=acquire_timeout) as producer:
                producer.publish(body, routing_key=QUEUE, retry=False)
            counters.add(seat, _PUBLISHED)
        except Exception as exc:
            counters.add(seat, _ERRORS)
            counters.set_error(seat, f"{type(exc).__name__}: {exc}")
            time.sleep(0.2)


def _spawn(seat: int, url: str, transport_options: dict[str, Any], counters: _Counters,
           acquire_timeout: float, target: Callable[..., None] = _worker) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    master = os.getpid()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0
        try:
            target(seat, url, transport_options, counters, master, acquire_timeout)
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


def _glyph(out: TextIO, fancy: str, plain: str) -> str:
    encoding = getattr(out, "encoding", None) or "ascii"
    try:
        fancy.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return plain
    return fancy


def _le(out: TextIO) -> str:
    return _glyph(out, "≤", "<=")


def _ms(values: list[float], q: float, dash: str) -> str:
    """The ``q``-th percentile of ``values`` (seconds) in ms; ``dash`` before any sample."""
    return f"{percentile(values, q) * 1000:.1f} ms" if values else dash


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
        self.folder: str | None = None  # filesystem:// messages, drained as they come
        self.dash = _glyph(out, "\u2013", "-")  # an en dash
        self._published: collections.deque[tuple[float, int]] = collections.deque()
        self.times = _glyph(out, "\u00d7", "x")  # a multiplication sign

    # lifecycle -----------------------------------------------------------------------------
    def setup(self) -> None:
        validate_name(self.name)
        if exists(self.name):
            raise CLIError(
                f"a budget named {self.name!r} already exists on this host: pick another "
                f"--name (or remove it with `mppools unlink {self.name}`)"
            )
        if self.o.broker is None:
            # on a tmpfs when there is one: a disk's write throttling would make the
            # throughput figures (and the comparison with what L connections carry) noise
            shm = "/dev/shm" if os.access("/dev/shm", os.W_OK | os.X_OK) else None
            self.tmpdir = tempfile.mkdtemp(prefix="mppools-demo-", dir=shm)
            self.folder = os.path.join(self.tmpdir, "queue")
            os.mkdir(self.folder)
            self.transport_options = {"data_folder_in": self.folder,
                                      "data_folder_out": self.folder}
        self.calibrate()
        mppools.configure(self.o.limit, name=self.name, acquire_timeout=self.o.acquire_timeout)
        self.configured = True
        first = mppools.stats()
        self.state.reclaimed_at_start = first.reclaimed_total
        self.state.hold_quantum = first.hold_quantum
        self.state.broker_baseline = self.probe.count()
        self.state.started = time.monotonic()
        for seat in range(self.o.workers):
            self._fork(seat)
        if not self.tty:
            for line in self._legend():
                print(line, file=self.out, flush=True)
        self.event(self._carry_text())

    def _calibrate_seconds(self) -> float:
        if self.o.calibrate is not None:
            return max(self.o.calibrate, 0.0)
        return min(max(0.05 * self.o.seconds, 0.2), 1.0)

    def calibrate(self, when: str = "before") -> None:
        """What ``limit`` connections carry alone: ``limit`` workers publish through kombu's
        own pools (one connection each, no budget, nobody waits) for a moment, ``when`` is
        "before" or "after" the run (a shared machine's speed drifts: both are shown)."""
        seconds = self._calibrate_seconds()
        st = self.state
        if seconds <= 0:
            st.carry_note = "not measured (calibration off)"
            return
        n = self.o.limit
        if self.tty:
            self.out.write(_CLEAR + f"mppools demo — measuring what {n} connection(s) carry "
                           f"alone ({n} workers, kombu.pools, no budget, {seconds:g} s "
                           f"{when} the run) …\n")
            self.out.flush()
        counters = _Counters(n)
        pids: list[int] = []
        try:
            for seat in range(n):
                pids.append(_spawn(seat, self.url, self.transport_options, counters,
                                   self.o.acquire_timeout, _carry_worker))
            # every worker connected and published once before the clock starts (bounded)
            ready_by = time.monotonic() + max(self.o.acquire_timeout, 5.0)
            while (any(counters.get(s, _PUBLISHED) == 0 for s in range(n))
                   and counters.total(_ERRORS) == 0 and time.monotonic() < ready_by):
                time.sleep(0.005)
            if counters.total(_ERRORS) or any(counters.get(s, _PUBLISHED) == 0
                                               for s in range(n)):
                error = counters.last_error() or "no message published"
                st.carry_note = st.carry_note or f"not measured {when} the run ({error})"[:160]
                return
            t0, c0 = time.monotonic(), counters.total(_PUBLISHED)
            while time.monotonic() < t0 + seconds:
                time.sleep(min(REFRESH, max(t0 + seconds - time.monotonic(), 0.0)))
                self.drain()
            c1, t1 = counters.total(_PUBLISHED), time.monotonic()
            st.carry_rates.append((c1 - c0) / (t1 - t0))
            st.carry_seconds = t1 - t0
        finally:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for pid in pids:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
            counters.close()

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
        if self.state.ended and not self.state.interrupted:
            self.calibrate("after")  # the demo's workers are gone: the same measure again
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

    def drain(self) -> None:
        """Delete the published messages (filesystem:// only): nobody consumes them, and a
        long run would otherwise fill the tmpfs or the disk."""
        if self.folder is None:
            return
        with contextlib.suppress(OSError), os.scandir(self.folder) as entries:
            for entry in entries:
                if entry.name.endswith(".msg"):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)

    def _fork(self, seat: int) -> int:
        self.counters.put(seat, _HOLDING, 0)  # a killed worker's flag is no news of its heir
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
            self._crashed(pid, status)

    def _crashed(self, pid: int, status: int) -> None:
        seat = self.seats.pop(pid, None)
        if seat is None:
            return
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

    def _stop_holder(self, pid: int) -> bool:
        """SIGSTOP ``pid`` and report whether it is inside its ``with acquire()`` block (holds
        a slot, runs no mppools code in its main thread); continued again if not."""
        seat = self.seats[pid]
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            return False
        try:
            _, status = os.waitpid(pid, os.WUNTRACED)
        except ChildProcessError:  # pragma: no cover - reaped elsewhere
            return False
        if not os.WIFSTOPPED(status):  # it exited on its own meanwhile
            self._crashed(pid, status)
            return False
        if self.counters.get(seat, _HOLDING):
            return True
        os.kill(pid, signal.SIGCONT)
        return False

    def kill_one(self) -> bool:
        """SIGKILL a random worker that holds a slot; time its slot's return; replace it."""
        holding = [pid for pid, seat in self.seats.items()
                   if self.counters.get(seat, _HOLDING)]
        self.rng.shuffle(holding)
        victim = next((pid for pid in holding[:_KILL_TRIES] if self._stop_holder(pid)), None)
        if victim is None:
            return False
        # stopped inside its with-block: it holds its slot until the kill, and no stats()
        # may be asked before the kill (its keeper thread might hold the budget's mutex)
        watcher = _ExitWatcher(victim)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        slots, outcome = 1, "waiter"
        while True:
            stats = self.sample()
            mine = [h for h in stats.holders if h.pid == victim]
            now = time.monotonic()
            if not mine:  # freed or handed over: a waiter's audit took it back
                latency = now - killed_at
                break
            slots = sum(h.slots for h in mine)
            if (watcher.died and stats.waiting == 0) or now - killed_at > RECLAIM_BOUND:
                # nobody waits, so nobody audits: the master does it, now that it is gone
                report = mppools.audit()
                latency = time.monotonic() - killed_at
                if any(pid == victim for pid, _ in report.reclaimed_slots):
                    outcome = "audit"
                break
            time.sleep(0.0002)
        exited = watcher.join(killed_at)  # no thread may run across the fork below
        seat = self.seats.pop(victim)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(victim, 0)
        kill = _Kill(victim, slots, latency, outcome, exited)
        kill.replacement = self._fork(seat)
        self.state.kills.append(kill)
        gone = "" if exited is None else f" (process gone after {exited * 1000:.1f} ms)"
        if outcome == "waiter":
            what = f"slot back in {latency * 1000:.1f} ms{gone}"
        else:
            what = (f"nobody waited: the master's audit took the slot back "
                    f"{latency * 1000:.1f} ms after the kill{gone}")
        self.event(f"SIGKILL pid {victim} holding {slots} slot(s): {what}; "
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
                self.drain()
                self.render()
                next_render = now + REFRESH
            time.sleep(0.002)
        self.sample()
        st.ended = time.monotonic()
        self.render(final=True)

    # output ----------------------------------------------------------------------------------
    def _latencies(self) -> list[float]:
        return [k.latency for k in self.state.kills]

    def _legend(self) -> list[str]:
        q = self.state.hold_quantum
        return [
            f"slow acquire: waited > {SLOW * 1000:.0f} ms for a slot (a turn in the queue; "
            f"a holder keeps its slot at most {q:g} s while others wait)",
            "debt: slots in use above the limit after a forced shrink, paid back by releases",
        ]

    def _carry_text(self) -> str:
        st = self.state
        rate = st.carry_rate
        if rate is None:
            return f"what {self.o.limit} connection(s) carry alone: {st.carry_note}"
        when = "before the run"
        if len(st.carry_rates) > 1:
            when = ("before and after the run: " + " and ".join(
                f"{r:,.0f}" for r in st.carry_rates) + " msg/s, mean shown")
        return (f"what {self.o.limit} connection(s) carry alone: {rate:,.0f} msg/s "
                f"({self.o.limit} workers, kombu.pools, no budget; {st.carry_seconds:.1f} s "
                f"{when})")

    def _vs_carry(self, rate: float) -> str:
        carry = self.state.carry_rate
        if not carry:
            return ""
        return (f"; {self.o.limit} connection(s) alone carry {carry:,.0f}/s: "
                f"{rate / carry:.2f}{self.times} of that")

    def _kills_text(self) -> str:
        """One line on the kills, the same in the live view and the summary."""
        kills = self.state.kills
        lat = self._latencies()
        audited = sum(1 for k in kills if k.outcome == "audit")
        who = ""
        if kills:
            who = (f" ({len(kills) - audited} by a waiting worker's audit, {audited} by the "
                   "master's: nobody waited)" if audited else " (all by a waiting worker's "
                   "audit)")
        return (f"{len(kills)}, {len(lat)} timed{who}   reclaim p50 {_ms(lat, 50, self.dash)}"
                f"  p99 {_ms(lat, 99, self.dash)}  max "
                f"{_ms(lat, 100, self.dash)}")

    def _reclaimed_text(self, stats: BudgetStats | None) -> str:
        st = self.state
        total = 0 if stats is None else stats.reclaimed_total - st.reclaimed_at_start
        crashed = f" + {st.crashed} died on their own" if st.crashed else ""
        slots = sum(k.slots for k in st.kills)
        return (f"{total} slot(s) since the start (budget counter; the kills' "
                f"victims held {slots}{crashed})")

    def render(self, *, final: bool = False) -> None:
        stats = self.state.last
        if stats is None:
            return
        st = self.state
        elapsed = time.monotonic() - st.started
        published = self.counters.total(_PUBLISHED)
        rate = published / elapsed if elapsed > 0 else 0.0
        le = _le(self.out)
        lat = self._latencies()
        now = time.monotonic()
        recent = self._published
        recent.append((now, published))
        while len(recent) > 2 and now - recent[1][0] >= RATE_WINDOW:
            recent.popleft()
        span = now - recent[0][0]
        # the rate over the last few seconds (the start's connects are no part of it)
        rate = (published - recent[0][1]) / span if span >= 0.5 else rate
        if not self.tty:
            if final or time.monotonic() - self._last_plain >= 1.0:
                self._last_plain = time.monotonic()
                print(f"[{elapsed:6.2f}s] in use {stats.in_use}/{stats.limit} waiting "
                      f"{stats.waiting} debt {stats.debt} published {published} "
                      f"({rate:.0f}/s) timeouts {self.counters.total(_TIMEOUTS)} slow "
                      f"{self.counters.total(_SLOW)} kills {len(st.kills)} timed {len(lat)} "
                      f"reclaim p50 {_ms(lat, 50, self.dash)} peak {st.peak}",
                      file=self.out, flush=True)
            return
        width = max(shutil.get_terminal_size((100, 24)).columns, 60)
        bar = "#" * min(stats.in_use, stats.limit) + "." * stats.free
        if stats.in_use > stats.limit:
            bar += "!" * (stats.in_use - stats.limit)
        holders = "  ".join(
            f"{h.pid}:{'busy' if h.busy else 'idle'}" + ("" if h.alive else "(dead)")
            for h in stats.holders
        ) or "none"
        verdict = (f"peak {st.peak} {le} limit {stats.limit}" if st.peak <= stats.limit
                   else f"peak {st.peak} > limit {stats.limit}  LIMIT EXCEEDED")
        lines = [
            f"mppools demo — budget {self.name!r} — {self.o.workers} workers — "
            f"hold quantum {st.hold_quantum:g} s — {self._broker_text()}",
            f"elapsed {elapsed:5.1f}s / {self.o.seconds:g}s   (Ctrl-C stops early)",
            "",
            f"slots      [{bar}]  {stats.in_use}/{stats.limit} in use   {stats.free} free   "
            f"{stats.waiting} waiting   debt {stats.debt}   {verdict}",
            f"holders    {holders}"[:width],
            f"published  {published} messages (now {rate:.0f}/s{self._vs_carry(rate)})",
            f"acquires   slow (>{SLOW * 1000:.0f}ms) {self.counters.total(_SLOW)}   timeouts "
            f"{self.counters.total(_TIMEOUTS)}   errors {self.counters.total(_ERRORS)}",
            f"kills      {self._kills_text()}",
            f"reclaimed  {self._reclaimed_text(stats)}",
        ]
        if self.probe.enabled:
            lines.append(f"broker     {st.broker_clients} client connections now "
                         f"(peak {st.broker_peak}, {st.broker_baseline} before the workers)")
        lines.append("")
        lines.extend(f"  {line}"[:width] for line in self._legend())
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
        elapsed = max((st.ended or time.monotonic()) - st.started, 1e-9)
        published = self.counters.total(_PUBLISHED)
        le = _le(self.out)
        ok = st.peak <= self.o.limit
        verdict = (f"peak {st.peak} {le} limit {self.o.limit}   OK" if ok else
                   f"peak {st.peak} > limit {self.o.limit}   LIMIT EXCEEDED")
        rate = published / elapsed
        lines = [
            "",
            f"mppools demo summary — budget {self.name!r}, {elapsed:.1f}s, "
            f"{self.o.workers} workers, limit {self.o.limit}, hold quantum "
            f"{st.hold_quantum:g} s" + ("  (interrupted)" if st.interrupted else ""),
            f"  messages published  {published} ({rate:.0f}/s{self._vs_carry(rate)})",
            f"  carried alone       {self._carry_text().split(': ', 1)[1]}",
            f"  slots in use        {verdict}   ({st.samples} samples)",
            f"  kills               {self._kills_text()}",
            "                      (reclaim: SIGKILL -> slot free or handed over)",
            f"  reclaimed           {self._reclaimed_text(st.last)}",
        ]
        if st.crashed:
            lines.append(f"  crashed             {st.crashed} worker(s) died on their own")
        exits = [k.exited for k in st.kills if k.exited is not None]
        if exits:
            lines.append(
                f"  process exit        p50 {_ms(exits, 50, self.dash)}   p99 "
                f"{_ms(exits, 99, self.dash)}   (SIGKILL -> pid gone, the kernel's share "
                "of the reclaim)"
            )
        lines.append(
            f"  acquires            slow (>{SLOW * 1000:.0f}ms) {self.counters.total(_SLOW)}"
            f"   timeouts {self.counters.total(_TIMEOUTS)}   errors "
            f"{self.counters.total(_ERRORS)}"
        )
        lines.extend(f"  {line}" for line in self._legend())
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


"""Simulated hosts on one machine for the cross-host (redis) backend.

``Host(tmp)`` starts ``unshare --mount --pid --fork --mount-proc`` with a private tmpfs on
``/dev/shm`` inside the new mount namespace, so two hosts share no POSIX objects and no pid
namespace; both reach 127.0.0.1 (same network namespace). Inside runs this module's agent:
the host's *master*. It serves one-line commands from its stdin, one answer line each::

    configure NAME LIMIT SPEC   mppools.configure(LIMIT, name=NAME, backend=SPEC,
                                idle_timeout=None) -> "OK"
    workers K                   fork K worker processes (each serves commands over a pipe)
                                -> "OK"
    attach NAME SPEC            (in a worker forked before ``configure``)
                                mppools.attach(NAME, backend=SPEC) -> "OK"
    w I CMD...                  run CMD in worker I (the answer is the worker's)
    wsend I CMD...              start CMD in worker I -> "OK"; ``wget I`` -> its answer
    acquire T                   limiter.acquire(timeout=T) -> "GOT <s> <ns>" (seconds it took,
                                CLOCK_MONOTONIC when it returned: one clock for all hosts) /
                                "EXCEEDED <type> <message>"
    release                     release the last slot -> "OK"
    churn ROUNDS T HOLD LOG [STOP]
                                ROUNDS times (or until the file STOP exists): acquire (timeout
                                T), append "+ <monotonic ns>" to the file LOG, hold HOLD s,
                                append "- <ns>", release
                                -> "OK <acquired> <exceeded>"
    publish N URL QUEUE         N messages through mppools.producers to the broker URL (the
                                pools are reset every 5: connections churn) -> "OK N"
    resize N [force]            limiter.resize(N, force=...) -> "OK"
    stats                       "OK <limit> <in_use> <local limit> <ns of the last fence, -1>
                                <generation or -> <waiting>"
    wkill I                     SIGKILL worker I and reap it -> "OK" (``workers 1`` adds a new
                                one at the next index)
    publoop STOP HOLD URL QUEUE LOG TAG
                                publish messages with ids TAG-<n> through mppools.producers
                                (acquire timeout 5 s, each held HOLD s, the pools reset every
                                7) until the file STOP exists (at most 300 s); after each
                                publish that returned, append its id to the file LOG
                                -> "OK <acknowledged> <failed>"
    clock                       "OK <time.time()> <time.monotonic()>" (this host's clocks)
    cli OUT ARGS...             run ``python -m mppools ARGS...`` on this host, its output to
                                the file OUT -> "OK <exit status>"
    hold T                      the same as ``acquire T`` (a slot kept until ``release``)
    connhold URL T              a pooled broker connection to the redis URL (timeout T),
                                connected (a PING) and kept checked out -> "GOT <s> <ns>"
    connping                    PING through it -> "OK" / "FAILED <exception type>"

``ERROR <repr>`` for a failing command. Killing the host SIGKILLs its process group (unshare,
the master and its workers: they share the group; the pid namespace dies with its init).

``Host(env={...})`` runs the agent with those environment variables (e.g. ``LD_PRELOAD`` of
libfaketime: the host's clocks, not its namespaces' tools). ``HOST_CLOCK_FILE=PATH`` instead
steps the agent's Python wall clock only: ``time.time()`` and ``time.time_ns()`` add the
seconds written in PATH (a fallback where libfaketime is not installed).
:class:`CoordinationRedis` is a redis-server on a port that stays the same across restarts
(one restarted empty).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

try:
    from support.lineproc import LineProcess
except ImportError:  # run as the child's script: this directory is sys.path[0]
    from lineproc import LineProcess  # type: ignore[no-redef]

__all__ = ["CoordinationRedis", "Host", "HostError", "intervals_peak"]

_HERE = Path(__file__).resolve()
FLAGS = ("--mount", "--pid", "--fork", "--mount-proc")


class HostError(Exception):
    """The host answered ERROR, died, or did not answer in time."""


class Host(LineProcess):
    """One simulated host (its master process inside its own namespaces)."""

    error = HostError
    what = "host"

    def __init__(self, start_timeout: float = 30.0, env: Mapping[str, str] | None = None
                 ) -> None:
        extra = " ".join(shlex.quote(f"{k}={v}") for k, v in (env or {}).items())
        launcher = f"env {extra} " if extra else ""
        script = f"mount -t tmpfs tmpfs /dev/shm && exec {launcher}{sys.executable} {_HERE}"
        super().__init__(["unshare", *FLAGS, "sh", "-c", script], start_timeout=start_timeout)

    def __repr__(self) -> str:
        return f"<Host pid={self.proc.pid}>"

    def __enter__(self) -> Host:
        return self

    def call(self, command: str, timeout: float = 30.0) -> str:
        return super().call(command, timeout)


class CoordinationRedis:
    """A redis-server without persistence on a port of its own that survives restarts: the
    coordination server of a chaos test (SIGSTOP it, or :meth:`restart` it empty)."""

    def __init__(self, tmp: Path, port: int | None = None) -> None:
        from .servers import free_port

        self.tmp = tmp
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        from .servers import popen

        self.starts += 1
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.tmp), "--unixsocket", "",
                "--logfile", str(self.tmp / "redis.log")]
        self.proc = popen(args, log_path=self.tmp / "stdout.log", cwd=self.tmp,
                          env=dict(os.environ))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited "
                                   f"({self.proc.returncode})")
            if self.ping():
                return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not answer within 10 s")

    def ping(self, timeout: float = 0.5) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
        return False

    def kill(self) -> None:
        """SIGKILL the server (its data is gone: there is no persistence)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
                self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> float:
        """Kill and start again, empty, on the same port; returns the seconds it was down."""
        t0 = time.monotonic()
        self.kill()
        for _ in range(50):  # the port may linger for a moment
            try:
                self.start()
                break
            except RuntimeError:
                time.sleep(0.1)
        return time.monotonic() - t0

    def close(self) -> None:
        self.kill()

    def __enter__(self) -> CoordinationRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def intervals_peak(paths: list[Path]) -> tuple[int, int]:
    """The most intervals open at once in the ``+``/``-`` logs of ``churn``, and how many
    intervals there were. Each interval lies inside a real holding, so the peak never
    overstates the holders."""
    events: list[tuple[int, int]] = []
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            sign, _, ns = line.partition(" ")
            if sign in "+-" and ns.isdigit():
                # at equal times a release counts before an acquire
                events.append((int(ns), 1 if sign == "+" else -1))
    events.sort()
    peak = open_now = 0
    for _, delta in events:
        open_now += delta
        peak = max(peak, open_now)
    return peak, sum(1 for _, d in events if d == 1)


# the agent side --------------------------------------------------------------------------------
def _do(limiter: Any, state: dict[str, Any], words: list[str]) -> str:  # pragma: no cover
    import mppools

    cmd, args = words[0], words[1:]
    if cmd == "attach":
        mppools.attach(args[0], backend=args[1])
        return "OK"
    if cmd in ("acquire", "hold"):
        t0 = time.monotonic()
        try:
            state["slot"] = limiter().acquire(timeout=float(args[0]))
        except mppools.LimitExceeded as exc:
            return f"EXCEEDED {type(exc).__name__} {exc}".replace("\n", " ")
        return f"GOT {time.monotonic() - t0:.3f} {time.monotonic_ns()}"
    if cmd == "release":
        limiter().release(state.pop("slot"))
        return "OK"
    if cmd == "churn":
        rounds, timeout, hold, log = int(args[0]), float(args[1]), float(args[2]), args[3]
        stop = args[4] if len(args) > 4 else None
        got = exceeded = 0
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            for _ in range(rounds):
                if stop is not None and os.path.exists(stop):
                    break
                try:
                    slot = limiter().acquire(timeout=timeout)
                except mppools.LimitExceeded:
                    exceeded += 1
                    continue
                os.write(fd, f"+ {time.monotonic_ns()}\n".encode())
                time.sleep(hold)
                os.write(fd, f"- {time.monotonic_ns()}\n".encode())
                limiter().release(slot)
                got += 1
        finally:
            os.close(fd)
        return f"OK {got} {exceeded}"
    if cmd == "publish":
        from kombu import Connection, Exchange, Queue

        n, url, queue = int(args[0]), args[1], args[2]
        for i in range(n):
            with mppools.producers[Connection(url)].acquire(block=True, timeout=60) as p:
                p.publish({"i": i, "pid": os.getpid()}, routing_key=queue,
                          exchange=Exchange(queue), retry=False,
                          declare=[Queue(queue, Exchange(queue), routing_key=queue)])
            if i % 5 == 4:
                mppools.reset()  # churn: close and reopen connections
        return f"OK {n}"
    if cmd == "connhold":
        # a pooled broker connection, connected and kept checked out (in use)
        from kombu import Connection

        t0 = time.monotonic()
        try:
            conn = mppools.connections[Connection(args[0])].acquire(block=True,
                                                                    timeout=float(args[1]))
        except mppools.LimitExceeded as exc:
            return f"EXCEEDED {type(exc).__name__} {exc}".replace("\n", " ")
        conn.connect()
        conn.default_channel.client.ping()  # the socket is open now, whatever the transport
        state["conn"] = conn
        return f"GOT {time.monotonic() - t0:.3f} {time.monotonic_ns()}"
    if cmd == "connping":
        # use the held connection: "OK" or the error it raised (a cut socket)
        try:
            state["conn"].default_channel.client.ping()
        except Exception as exc:
            return f"FAILED {type(exc).__name__}"
        return "OK"
    if cmd == "cli":
        out = args[0]
        with open(out, "wb") as f:
            done = subprocess.run([sys.executable, "-m", "mppools", *args[1:]], stdout=f,
                                  stderr=subprocess.STDOUT, timeout=60, check=False)
        return f"OK {done.returncode}"
    if cmd == "clock":
        return f"OK {time.time():.3f} {time.monotonic():.3f}"
    if cmd == "publoop":
        return _publoop(*args)
    if cmd == "resize":
        limiter().resize(int(args[0]), force=args[1:] == ["force"])
        return "OK"
    if cmd == "stats":
        s = limiter().stats()
        fenced = s.extra.get("fenced_at")
        fenced_ns = -1 if fenced is None else round(float(fenced) * 1e9)  # type: ignore[arg-type]
        gen = s.extra.get("generation") or "-"
        return (f"OK {s.limit} {s.in_use} {s.extra.get('local_limit')} {fenced_ns} {gen} "
                f"{s.waiting}")
    return f"ERROR unknown command {cmd!r}"


def _publoop(stop: str, hold: str, url: str, queue: str, log: str,
             tag: str) -> str:  # pragma: no cover - runs in a worker
    from kombu import Connection, Exchange, Queue

    import mppools

    acked = failed = 0
    end = time.monotonic() + 300
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    exchange = Exchange(queue)
    declare = [Queue(queue, exchange, routing_key=queue)]
    try:
        n = 0
        while not os.path.exists(stop) and time.monotonic() < end:
            n += 1
            mid = f"{tag}-{n}"
            try:
                with mppools.producers[Connection(url)].acquire(block=True, timeout=5) as p:
                    p.publish({"id": mid}, routing_key=queue, exchange=exchange,
                              retry=False, declare=declare)
                    os.write(fd, f"{mid}\n".encode())  # acknowledged: publish returned
                    acked += 1
                    time.sleep(float(hold))
            except Exception:
                failed += 1
                time.sleep(0.01)
            if n % 7 == 0:
                mppools.reset()  # churn: close and reopen connections
    finally:
        os.close(fd)
    return f"OK {acked} {failed}"


def _worker(rfd: int, wfd: int) -> None:  # pragma: no cover - a forked worker
    from mppools import _config

    state: dict[str, Any] = {}
    with os.fdopen(rfd, "r") as inp:
        for raw in inp:
            words = raw.split()
            try:
                answer = _do(_config.current, state, words)
            except Exception as exc:
                answer = f"ERROR {exc!r}"
            os.write(wfd, (answer + "\n").encode())
    os._exit(0)


def _serve() -> None:  # pragma: no cover - runs in the host's master
    import mppools
    from mppools import _config

    print("READY", flush=True)
    workers: list[tuple[int, Any]] = []  # (write fd, reader of answers)
    pids: list[int] = []
    state: dict[str, Any] = {}
    for raw in sys.stdin:
        words = raw.split()
        if not words:
            continue
        try:
            if words[0] == "configure":
                mppools.configure(int(words[2]), name=words[1], backend=words[3],
                                  idle_timeout=None)
                answer = "OK"
            elif words[0] == "workers":
                for _ in range(int(words[1])):
                    to_r, to_w = os.pipe()
                    from_r, from_w = os.pipe()
                    pid = os.fork()
                    if pid == 0:
                        try:
                            os.close(to_w)
                            os.close(from_r)
                            _worker(to_r, from_w)
                        finally:
                            os._exit(1)
                    os.close(to_r)
                    os.close(from_w)
                    workers.append((to_w, os.fdopen(from_r, "r")))
                    pids.append(pid)
                answer = "OK"
            elif words[0] == "wkill":
                pid = pids[int(words[1])]
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                answer = "OK"
            elif words[0] in ("w", "wsend"):
                to_w, answers = workers[int(words[1])]
                os.write(to_w, (" ".join(words[2:]) + "\n").encode())
                answer = ("OK" if words[0] == "wsend"
                          else answers.readline().strip() or "ERROR worker gone")
            elif words[0] == "wget":
                answer = workers[int(words[1])][1].readline().strip() or "ERROR worker gone"
            else:
                answer = _do(_config.current, state, words)
        except Exception as exc:
            answer = f"ERROR {exc!r}".replace("\n", " ")
        print(answer, flush=True)
    os._exit(0)


def _step_python_clock(path: str) -> None:  # pragma: no cover - in the host's master
    """time.time()/time.time_ns() offset by the seconds in the file ``path`` (re-read every
    call): the wall clock as Python code of this host (and its forked workers) sees it."""
    real, real_ns = time.time, time.time_ns

    def offset() -> float:
        try:
            with open(path) as f:
                return float(f.read().strip() or 0)
        except (OSError, ValueError):
            return 0.0

    time.time = lambda: real() + offset()  # type: ignore[assignment]
    time.time_ns = lambda: real_ns() + int(offset() * 1e9)  # type: ignore[assignment]


if __name__ == "__main__":  # pragma: no cover - the host's master
    if os.environ.get("HOST_CLOCK_FILE"):
        _step_python_clock(os.environ["HOST_CLOCK_FILE"])
    _serve()

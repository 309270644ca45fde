"""Budget users in other Linux namespaces: an agent process run under ``unshare``.

``Agent(["--pid", "--fork", "--mount-proc"])`` starts ``unshare FLAGS python3 namespaces.py``
(no flags: a plain process on the host) in a session of its own. The agent imports mppools
from this checkout and serves one-line commands from its stdin, answering one line each on
its stdout::

    slice 30           set the waiters' fallback polling slice (SLICE) -> "OK <modules>"
    attach NAME        mppools.attach(NAME) -> "OK"
    acquire T          limiter.acquire(block=True, timeout=T) -> "GOT <index>" / "EXCEEDED"
    holds              is the last slot still recorded as ours? -> "OK True" / "OK False"
    release            release the last slot -> "OK"
    idle               take a pooled memory:// connection, connect, release it: it stays idle
                       in the pool holding a slot, watched by the keeper thread -> "OK"
    die                os._exit(0) at once, holding whatever it holds (no answer)

A failing command answers ``ERROR <repr>``. Between commands the agent blocks in a read of
its stdin and never calls mppools (a blocked worker, as far as the budget can tell). It is
stopped through the process group of the pid it was started as (``unshare`` and its child).
"""

from __future__ import annotations

import contextlib
import functools
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["Agent", "AgentError", "set_slice", "unshare_unavailable"]

_HERE = Path(__file__).resolve()
_REPO = _HERE.parents[2]


class AgentError(Exception):
    """The agent answered ERROR, died, or did not answer in time."""


@functools.cache
def unshare_unavailable(*flags: str) -> str | None:
    """Why ``unshare FLAGS true`` cannot run here (not root, no unshare, refused), or None."""
    if os.geteuid() != 0:
        return f"needs root for unshare {' '.join(flags)} (euid {os.geteuid()})"
    exe = shutil.which("unshare")
    if exe is None:
        return "unshare (util-linux) is not installed"
    try:
        done = subprocess.run([exe, *flags, "true"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare {' '.join(flags)} true failed: {exc!r}"
    if done.returncode != 0:
        return (f"unshare {' '.join(flags)} true exited {done.returncode}: "
                f"{done.stderr.strip()[:200]}")
    return None


def set_slice(seconds: float) -> list[str]:
    """Set ``SLICE`` (a waiter's fallback polling slice) in every module of
    ``mppools._limiter`` that defines one, wherever the backend keeps it; return their names.

    Raises:
        LookupError: no module has a ``SLICE`` (the test could not tell a wake-up from a
            slice expiry, so it must not pass silently).
    """
    import importlib
    import pkgutil

    import mppools._limiter as package

    names = ["mppools._limiter"]
    names += [m.name for m in pkgutil.walk_packages(package.__path__, "mppools._limiter.")]
    changed = []
    for name in names:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "SLICE"):
            vars(module)["SLICE"] = seconds
            changed.append(name)
    if not changed:
        raise LookupError("no module under mppools._limiter defines SLICE")
    return changed


class Agent:
    """One agent process, optionally inside new namespaces (see the module docstring)."""

    def __init__(self, unshare_flags: Sequence[str] = (), *, start_timeout: float = 30.0) -> None:
        self.flags = tuple(unshare_flags)
        prefix = ["unshare", *self.flags] if self.flags else []
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO), env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, str(_HERE)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            env=env, cwd=str(_REPO), start_new_session=True,
        )
        self._buf = b""
        try:
            ready = self.reply(start_timeout)
            if not ready.startswith("READY "):
                raise AgentError(f"agent started with {ready!r}{self._stderr_tail()}")
        except BaseException:
            self.kill()
            raise
        #: the agent's pid as seen in its own pid namespace (1 under unshare --pid --fork)
        self.inner_pid = int(ready.split("=", 1)[1])

    def __repr__(self) -> str:
        return f"<Agent unshare {' '.join(self.flags) or '(host)'} pid={self.proc.pid}>"

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    # talking -------------------------------------------------------------------------------
    def send(self, command: str) -> None:
        """Send one command; collect its answer with :meth:`reply`."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(command.encode() + b"\n")
            self.proc.stdin.flush()
        except OSError as exc:
            raise AgentError(f"{self!r} is gone ({exc!r}){self._stderr_tail()}") from exc

    def reply(self, timeout: float) -> str:
        """The next answer line, waiting at most ``timeout`` seconds.

        Raises:
            AgentError: no line in time, or the agent exited.
        """
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AgentError(f"{self!r} gave no answer within {timeout:.1f} s")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                raise AgentError(f"{self!r} exited (status {self.proc.poll()})"
                                 f"{self._stderr_tail()}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def call(self, command: str, timeout: float = 20.0) -> str:
        """Send ``command`` and return its answer; an ``ERROR`` answer raises AgentError."""
        self.send(command)
        answer = self.reply(timeout)
        if answer.startswith("ERROR"):
            raise AgentError(f"{self!r}: {command!r} -> {answer}{self._stderr_tail()}")
        return answer

    # stopping ------------------------------------------------------------------------------
    def wait(self, timeout: float) -> int:
        """Wait (bounded) for the agent to exit by itself; return its status."""
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the agent's whole process group (unshare and its child) and reap it."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        self._stderr.close()

    def _stderr_tail(self) -> str:
        with contextlib.suppress(OSError, ValueError):
            self._stderr.seek(0)
            text = self._stderr.read().decode(errors="replace").strip()
            if text:
                return "\n--- agent stderr ---\n" + text[-3000:]
        return ""


# the agent side --------------------------------------------------------------------------------
def _serve() -> None:  # pragma: no cover - runs in the agent process
    import mppools

    print(f"READY pid={os.getpid()}", flush=True)
    limiter: Any = None
    slot: Any = None
    for raw in sys.stdin:
        words = raw.split()
        if not words:
            continue
        cmd, args = words[0], words[1:]
        try:
            if cmd == "die":
                os._exit(0)
            elif cmd == "slice":
                answer = "OK " + ",".join(set_slice(float(args[0])))
            elif cmd == "attach":
                limiter = mppools.attach(args[0])
                answer = "OK"
            elif cmd == "acquire":
                try:
                    slot = limiter.acquire(block=True, timeout=float(args[0]))
                except mppools.LimitExceeded:
                    answer = "EXCEEDED"
                else:
                    answer = f"GOT {slot.index}"
            elif cmd == "holds":
                answer = f"OK {bool(slot is not None and limiter.holds(slot))}"
            elif cmd == "release":
                limiter.release(slot)
                slot = None
                answer = "OK"
            elif cmd == "idle":
                from kombu import Connection

                conn = mppools.connections[Connection("memory://")].acquire(block=True,
                                                                             timeout=10)
                conn.connect()
                conn.release()
                answer = "OK"
            else:
                answer = f"ERROR unknown command {cmd!r}"
        except Exception as exc:  # reported to the test, which fails on it
            answer = f"ERROR {exc!r}"
        print(answer, flush=True)
    os._exit(0)


if __name__ == "__main__":  # pragma: no cover - the agent process
    _serve()

"""A child process driven by one-line commands on its stdin, answering one line each.

The parent side shared by the namespace agents (:mod:`support.namespaces`) and the simulated
hosts (:mod:`support.hosts`): start in a session of its own, wait for its ``READY`` line,
send/reply with bounded waits, and SIGKILL its whole process group at the end.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["LineProcess", "repo_env"]

REPO = Path(__file__).resolve().parents[2]


def repo_env() -> dict[str, str]:
    """The environment of a child that imports mppools from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class LineProcess:
    """``argv`` started in its own session; ``error`` is raised for anything that goes wrong
    (no answer in time, an exit, an ``ERROR`` answer)."""

    error: type[Exception] = RuntimeError
    what = "child"

    def __init__(self, argv: Sequence[str], *, start_timeout: float = 30.0) -> None:
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            env=repo_env(), cwd=str(REPO), start_new_session=True)
        self._buf = b""
        try:
            self.ready = self.reply(start_timeout)
            if not self.ready.startswith("READY"):
                raise self.error(f"{self.what} started with {self.ready!r}{self._tail()}")
        except BaseException:
            self.kill()
            raise

    def __enter__(self) -> LineProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def send(self, command: str) -> None:
        """Send one command; collect its answer with :meth:`reply`."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(command.encode() + b"\n")
            self.proc.stdin.flush()
        except OSError as exc:
            raise self.error(f"{self!r} is gone ({exc!r}){self._tail()}") from exc

    def reply(self, timeout: float) -> str:
        """The next answer line, waiting at most ``timeout`` seconds."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self.error(f"{self!r} gave no answer within {timeout:.1f} s"
                                 f"{self._tail()}")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                raise self.error(f"{self!r} exited (status {self.proc.poll()}){self._tail()}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def call(self, command: str, timeout: float = 20.0) -> str:
        """Send ``command`` and return its answer; an ``ERROR`` answer raises ``error``."""
        self.send(command)
        answer = self.reply(timeout)
        if answer.startswith("ERROR"):
            raise self.error(f"{self!r}: {command!r} -> {answer}{self._tail()}")
        return answer

    def wait(self, timeout: float) -> int:
        """Wait (bounded) for the child to exit by itself; return its status."""
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the child's whole process group and reap it."""
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

    def _tail(self) -> str:
        with contextlib.suppress(OSError, ValueError):
            self._stderr.seek(0)
            text = self._stderr.read().decode(errors="replace").strip()
            if text:
                return f"\n--- {self.what} stderr ---\n" + text[-3000:]
        return ""

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

import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:
    from support.lineproc import LineProcess
except ImportError:  # run as the child's script: this directory is sys.path[0]
    from lineproc import LineProcess  # type: ignore[no-redef]

__all__ = ["Agent", "AgentError", "set_slice", "unshare_unavailable"]

_HERE = Path(__file__).resolve()


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


class Agent(LineProcess):
    """One agent process, optionally inside new namespaces (see the module docstring)."""

    error = AgentError
    what = "agent"

    def __init__(self, unshare_flags: Sequence[str] = (), *, start_timeout: float = 30.0) -> None:
        self.flags = tuple(unshare_flags)
        prefix = ["unshare", *self.flags] if self.flags else []
        super().__init__([*prefix, sys.executable, str(_HERE)], start_timeout=start_timeout)
        #: the agent's pid as seen in its own pid namespace (1 under unshare --pid --fork)
        self.inner_pid = int(self.ready.split("=", 1)[1])

    def __repr__(self) -> str:
        return f"<Agent unshare {' '.join(self.flags) or '(host)'} pid={self.proc.pid}>"

    def __enter__(self) -> Agent:
        return self


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

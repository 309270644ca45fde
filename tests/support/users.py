"""A second, unprivileged user of this host, to attack mppools as (issue 8, item 4).

:class:`OtherUser` creates a real system user (``useradd``) if it does not exist yet, runs
Python code as that user (``runuser -u NAME -- python3 -c CODE``) and cleans up after it:
its processes (by the pid we started, never by name), the ``/dev/shm`` entries it made, and
the user itself, only if we created it. Needs root, ``useradd`` and ``runuser``; see
:func:`skip_reason`.

The attacker's code gets :data:`PRELUDE` (stdlib only: it needs neither mppools nor
posix_ipc, which live in root's interpreter) and its arguments as ``ARGS``, a JSON object.
It answers with JSON lines on stdout (``out(obj)``); :meth:`OtherUser.call` returns the last
one, :meth:`OtherUser.start` keeps a process running and talks to it line by line.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pwd
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["ATTACKER", "PRELUDE", "AttackerError", "AttackerProcess", "OtherUser",
           "skip_reason"]

#: the user the tests attack as (a system user: no home, no login shell)
ATTACKER = "mppools-attacker"
SHM = "/dev/shm"

_PACKAGE = Path(__file__).resolve().parents[2] / "mppools"

#: helpers available to every piece of attacker code (stdlib only)
PRELUDE = r'''
import ctypes, errno, json, os, socket, struct, sys
ARGS = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}

def out(obj):
    print(json.dumps(obj), flush=True)

def start_ticks(pid):
    """Field 22 of the world-readable /proc/PID/stat (start time in clock ticks)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return int(data[data.rindex(b")") + 2:].split()[19])

def unix_sockets(needle):
    """Every unix socket of this network namespace whose path or abstract name contains
    ``needle`` (from the world-readable /proc/net/unix): bytes for abstract, str for paths."""
    found = []
    with open("/proc/net/unix", encoding="utf-8", errors="replace") as f:
        next(f)
        for line in f:
            parts = line.split()
            if len(parts) < 8:
                continue
            path = " ".join(parts[7:])
            if needle not in path:
                continue
            found.append(b"\0" + path[1:].encode() if path.startswith("@") else path)
    return found

def outcome(fn):
    """'allowed' if fn() worked, else the name of the error (PermissionError, ...)."""
    try:
        fn()
    except OSError as exc:
        return type(exc).__name__
    return "allowed"

libc = ctypes.CDLL(None, use_errno=True)
libc.sem_open.restype = ctypes.c_void_p
libc.sem_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_uint]
for _fn in (libc.sem_post, libc.sem_trywait, libc.sem_close):
    _fn.argtypes = [ctypes.c_void_p]
libc.sem_getvalue.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
SEM_FAILED = ctypes.c_void_p(-1).value

def sem_open(name, flags=0, mode=0o600, value=0):
    """A named semaphore through libc; OSError on failure (like open())."""
    sem = libc.sem_open(name.encode(), flags, mode, value)
    if sem in (None, 0, SEM_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), name)
    return sem

def sem_value(sem):
    v = ctypes.c_int()
    libc.sem_getvalue(sem, ctypes.byref(v))
    return v.value
'''


def skip_reason() -> str | None:
    """Why the multi-user tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root: the test creates a second user and runs code as it"
    for tool in ("useradd", "runuser"):
        if shutil.which(tool) is None:
            return f"needs {tool} (to create a second user and run as it)"
    return None


class AttackerError(AssertionError):
    """Attacker code failed or did not answer (the message holds its stderr)."""


def _set_pdeathsig() -> None:  # between fork and exec: runuser passes SIGTERM on to its child
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """Kill the session we started for ``proc`` (runuser and its child) and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


class AttackerProcess:
    """Attacker code that keeps running; it talks in JSON lines over stdin/stdout."""

    def __init__(self, proc: subprocess.Popen[str], what: str) -> None:
        self.proc = proc
        self.pid = proc.pid
        self._what = what
        self._buf = ""

    def read(self, timeout: float = 20.0) -> Any:
        """The next JSON line the attacker printed (bounded wait)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while "\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AttackerError(f"attacker {self._what} said nothing in {timeout} s"
                                    f"{self._stderr()}")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AttackerError(f"attacker {self._what} exited (rc {self.proc.wait(5)})"
                                    f"{self._stderr()}")
            self._buf += chunk.decode()
        line, self._buf = self._buf.split("\n", 1)
        return json.loads(line)

    def ask(self, command: object, timeout: float = 20.0) -> Any:
        """Send one JSON line, return the attacker's answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self.read(timeout)

    def _stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return ":\n" + self.proc.stderr.read()[-4000:]

    def stop(self, timeout: float = 5.0) -> None:
        """Close its stdin (the attacker's signal to leave), then kill it if it stays."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout)
        _kill_group(self.proc)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


class OtherUser:
    """A real unprivileged user to run attacker code as (create with :meth:`setup`)."""

    def __init__(self, name: str = ATTACKER) -> None:
        self.name = name
        self.uid = -1
        self.gid = -1
        self.created = False
        self.python = ""
        self.env: dict[str, str] = {}
        self._share: str | None = None
        self._procs: list[AttackerProcess] = []
        self._lock = threading.Lock()
        self._baseline: set[str] = set()
        self._runuser = shutil.which("runuser") or "runuser"

    # life cycle ----------------------------------------------------------------------------
    def setup(self) -> OtherUser:
        """Create the user if missing, pick an interpreter it can run, share the package."""
        try:
            return self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> OtherUser:
        try:
            pw = pwd.getpwnam(self.name)
        except KeyError:
            done = subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                 self.name], capture_output=True, text=True, timeout=60, check=False,
            )
            # exit 9: created meanwhile by someone else, so not ours to delete
            if done.returncode not in (0, 9):
                raise RuntimeError(f"useradd {self.name} failed ({done.returncode}): "
                                   f"{done.stderr.strip()}") from None
            self.created = done.returncode == 0
            pw = pwd.getpwnam(self.name)
        self.uid, self.gid = pw.pw_uid, pw.pw_gid
        if self.uid == 0:
            raise RuntimeError(f"user {self.name} is root: it cannot play another user")
        self._baseline = self._owned_entries()
        self.env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C.UTF-8",
                    "HOME": "/", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1"}
        self.python = self._find_python()
        self.env["PYTHONPATH"] = self._package_path()
        return self

    def reset(self) -> list[str]:
        """Stop every process started as the user and remove what it made in /dev/shm since
        :meth:`setup`; return the removed paths."""
        with self._lock:
            procs, self._procs = self._procs, []
        for p in procs:
            p.stop()
        return self.cleanup_files()

    def close(self) -> None:
        """:meth:`reset`, then delete the user if we created it."""
        self.reset()
        if self._share is not None:
            shutil.rmtree(self._share, ignore_errors=True)
            self._share = None
        if self.created:
            subprocess.run(["userdel", self.name], capture_output=True, timeout=60,
                           check=False)
            self.created = False

    def __enter__(self) -> OtherUser:
        return self.setup()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # running code as the user ----------------------------------------------------------------
    def _argv(self, code: str, args: dict[str, Any], python: str | None = None) -> list[str]:
        return [self._runuser, "-u", self.name, "--", python or self.python, "-c",
                PRELUDE + "\n" + code, json.dumps(args)]

    def _popen(self, argv: list[str]) -> subprocess.Popen[str]:
        return subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, cwd="/", env=self.env, start_new_session=True,
            preexec_fn=_set_pdeathsig,
        )

    def run(self, code: str, args: dict[str, Any] | None = None, *, timeout: float = 60.0,
            python: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``code`` as the user to its end (killed, its whole session, on timeout)."""
        proc = self._popen(self._argv(code, args or {}, python))
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, err = proc.communicate()
            raise AttackerError(f"attacker code ran over {timeout} s; stderr:\n{err[-4000:]}"
                                ) from None
        finally:
            if proc.poll() is None:
                _kill_group(proc)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def call(self, code: str, args: dict[str, Any] | None = None, *,
             timeout: float = 60.0) -> Any:
        """Run ``code`` as the user; return the last JSON line it printed."""
        done = self.run(code, args, timeout=timeout)
        lines = [ln for ln in done.stdout.splitlines() if ln.strip()]
        if done.returncode != 0 or not lines:
            raise AttackerError(f"attacker code failed (rc {done.returncode}):\n"
                                f"{done.stderr[-4000:]}")
        return json.loads(lines[-1])

    def start(self, code: str, args: dict[str, Any] | None = None) -> AttackerProcess:
        """Start ``code`` as the user and leave it running (stopped by :meth:`close`)."""
        attacker = AttackerProcess(self._popen(self._argv(code, args or {})), code[:40])
        with self._lock:
            self._procs.append(attacker)
        return attacker

    # what it leaves behind ---------------------------------------------------------------------
    def _owned_entries(self) -> set[str]:
        """Paths under /dev/shm (one level into directories) owned by the user."""
        found: set[str] = set()
        try:
            top = os.listdir(SHM)
        except OSError:
            return found
        for entry in top:
            path = os.path.join(SHM, entry)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if st.st_uid == self.uid:
                found.add(path)
            if stat.S_ISDIR(st.st_mode) and "mppools" in entry:
                with contextlib.suppress(OSError):
                    for sub in os.listdir(path):
                        subpath = os.path.join(path, sub)
                        with contextlib.suppress(FileNotFoundError):
                            if os.lstat(subpath).st_uid == self.uid:
                                found.add(subpath)
        return found

    def cleanup_files(self) -> list[str]:
        """Remove what the user made in /dev/shm since :meth:`setup`; return the paths."""
        removed = []
        for path in sorted(self._owned_entries() - self._baseline, key=len, reverse=True):
            try:
                if stat.S_ISDIR(os.lstat(path).st_mode):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
                removed.append(path)
            except FileNotFoundError:
                continue
        return removed

    # setup helpers -----------------------------------------------------------------------------
    def _find_python(self) -> str:
        """The first interpreter the user can run (root's pyenv under /root is not one)."""
        candidates = [sys.executable, os.path.realpath(sys.executable), "/usr/bin/python3",
                      shutil.which("python3") or ""]
        tried = []
        for python in dict.fromkeys(c for c in candidates if c):
            done = self.run("out(sys.version_info[:2])", python=python, timeout=30)
            if done.returncode == 0:
                return python
            tried.append(f"{python}: {done.stderr.strip()[-200:]}")
        raise RuntimeError(f"no Python that user {self.name} can run: " + "; ".join(tried))

    def _package_path(self) -> str:
        """A directory holding a copy of ``mppools`` the user can read (the checkout if it
        can read that, else a world-readable copy in a temp dir)."""
        checkout = str(_PACKAGE.parent)
        probe = self.run("out(os.access(ARGS['p'], os.R_OK))",
                         {"p": str(_PACKAGE / "__init__.py")}, timeout=30)
        if probe.returncode == 0 and probe.stdout.strip().endswith("true"):
            return checkout
        share = tempfile.mkdtemp(prefix="mppools-attacker-")
        shutil.copytree(_PACKAGE, os.path.join(share, "mppools"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        for root, _dirs, files in os.walk(share):
            os.chmod(root, 0o755)
            for f in files:
                os.chmod(os.path.join(root, f), 0o644)
        self._share = share
        return share

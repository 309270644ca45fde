"""Decoy budgets that exist on the host for the whole test session (issue 8, item 9).

"The suite must pass while other budgets, healthy or broken, of this and other users exist on
the host." :func:`decoy_budgets` (a session-scoped autouse fixture, registered from
``tests/conftest.py``) creates, before the first test and until the last one ends:

* ``decoy-<pid>-healthy``: a healthy budget (``configure(limit=2)``) held by a live helper
  process that took one slot and waits on a pipe (stdin) to leave;
* ``decoy-<pid>-garbage``: ``/dev/shm/mppools.<name>`` full of garbage bytes;
* ``decoy-<pid>-version``: a copy of the healthy segment with an unknown layout version (the
  u32 at offset 8);
* ``decoy-<pid>-user`` (as root only): a healthy budget created and held by another,
  unprivileged user (``mppools-decoy``, a system user created if missing and left in place),
  run through ``runuser``, with a world-readable copy of mppools and its dependencies when
  that user cannot read the checkout or root's interpreter.

``<pid>`` is the pytest process's pid: tests that list budgets tell decoys apart with
:func:`is_decoy`. Everything is removed at the end: the helpers are told to leave (their stdin
closes, which also happens when pytest dies) and killed by pid if they stay; the files are
unlinked. Leftovers of a session that died (its pid is gone) are removed at the next start.
``MPPOOLS_TEST_NO_DECOYS=1`` turns all of it off.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import pwd
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

__all__ = ["DECOY_USER", "DecoySet", "Decoys", "decoy_budgets", "is_decoy"]

SHM = "/dev/shm"
DECOY_USER = "mppools-decoy"
_PREFIX = "decoy-"
_REPO = Path(__file__).resolve().parents[2]
_VERSION_AT = 8  # the layout version: u32 little endian after the 8-byte magic

#: a budget holder: takes one slot, says "ready <pid>", leaves (cleanly) when stdin closes
_HOLDER = r"""
import os, sys
import mppools
name = sys.argv[1]
limiter = mppools.configure(limit=2, name=name)
slot = limiter.acquire(timeout=30)
print("ready", os.getpid(), flush=True)
sys.stdin.read()
limiter.release(slot)
mppools.close(unlink=True)
"""

#: prints {top-level module: path} of everything outside the stdlib that mppools imports
_CLOSURE = r"""
import importlib.metadata as md, json, os, sys, sysconfig
import mppools, mppools._config, mppools._keeper, mppools.pools
std = {os.path.realpath(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib")}
def third_party(path):
    path = os.path.realpath(path)
    return ("-packages" in path) or not any(path.startswith(s + os.sep) for s in std)
tops = {}
for name in sorted(sys.modules):
    top = name.partition(".")[0]
    mod = sys.modules.get(top)
    f = getattr(mod, "__file__", None)
    if top in tops or top == "mppools" or not f or not third_party(f):
        continue
    f = os.path.realpath(f)
    tops[top] = os.path.dirname(f) if os.path.basename(f).startswith("__init__.") else f
dists = {}
for top, names in md.packages_distributions().items():
    if top in tops:
        for dist in names:
            with __import__("contextlib").suppress(Exception):
                dists[dist] = str(md.distribution(dist)._path)
print(json.dumps({"modules": tops, "dists": dists}))
"""


def is_decoy(name: str) -> bool:
    """Whether budget ``name`` is a decoy (of this session or of another one)."""
    return name.startswith(_PREFIX)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _shm_entries(name: str) -> list[str]:
    """Every /dev/shm entry of budget ``name`` (segment, semaphore, its directory)."""
    try:
        entries = os.listdir(SHM)
    except OSError:
        return []
    mine = []
    for entry in entries:
        for base in (f"mppools.{name}", f"sem.mppools.{name}"):
            if entry == base or entry.startswith(base + "."):
                mine.append(os.path.join(SHM, entry))
    return mine


def _remove(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


def remove_stale() -> list[str]:
    """Remove the decoys of sessions whose pytest process is gone; return the paths."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.listdir(SHM):
            name = entry.removeprefix("sem.").removeprefix("mppools.")
            if not is_decoy(name) or not entry.startswith(("mppools.", "sem.mppools.")):
                continue
            pid = name[len(_PREFIX):].partition("-")[0]
            if pid.isdigit() and not _alive(int(pid)):
                _remove(os.path.join(SHM, entry))
                removed.append(entry)
    tmp = tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for entry in os.listdir(tmp):  # copies of mppools for the other user
            pid = entry.removeprefix(f"mppools-{_PREFIX}").partition("-")[0]
            if entry.startswith(f"mppools-{_PREFIX}") and pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(os.path.join(tmp, entry), ignore_errors=True)
                removed.append(os.path.join(tmp, entry))
    return removed


@dataclass
class Decoys:
    """The decoy budgets of this session (``None``: not made, see :attr:`notes`)."""

    prefix: str
    healthy: str | None = None
    garbage: str | None = None
    bad_version: str | None = None
    other_user: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [n for n in (self.healthy, self.garbage, self.bad_version, self.other_user)
                if n is not None]


@dataclass
class _Holder:
    name: str
    proc: subprocess.Popen[bytes]
    holder_pid: int  # the Python process (runuser's child for the other user)
    log: Path


class DecoySet:
    """Creates the decoys (:meth:`start`) and removes every trace of them (:meth:`stop`)."""

    def __init__(self, workdir: Path, prefix: str | None = None) -> None:
        self.workdir = workdir
        self.decoys = Decoys(prefix=prefix or f"{_PREFIX}{os.getpid()}-")
        self._holders: list[_Holder] = []
        self._files: list[str] = []
        self._share: str | None = None
        self._stopped = False

    # ------------------------------------------------------------------------ life cycle
    def start(self) -> Decoys:
        remove_stale()
        p = self.decoys.prefix
        self.decoys.healthy = self._hold(f"{p}healthy", [sys.executable], self._root_env(),
                                         cwd=str(_REPO))
        self.decoys.garbage = self._garbage(f"{p}garbage")
        self.decoys.bad_version = self._bad_version(f"{p}version", self.decoys.healthy)
        try:
            self.decoys.other_user = self._other_user(f"{p}user")
        except _Unavailable as exc:
            self.decoys.notes.append(f"no decoy of another user: {exc}")
        return self.decoys

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        holders, self._holders = self._holders, []
        for h in holders:  # tell all of them first, then wait for each
            if h.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    h.proc.stdin.close()
        for h in holders:
            try:
                h.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._kill(h)
            if h.proc.stdout is not None:
                h.proc.stdout.close()
            for path in _shm_entries(h.name):
                _remove(path)
        for path in self._files:
            _remove(path)
        self._files = []
        if self._share is not None:
            shutil.rmtree(self._share, ignore_errors=True)
            self._share = None

    # ------------------------------------------------------------------------- holders
    @staticmethod
    def _root_env() -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO), env.get("PYTHONPATH"))
                                            if p)
        return env

    def _hold(self, name: str, argv: list[str], env: dict[str, str], cwd: str) -> str:
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                [*argv, "-c", _HOLDER, name], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=err, env=env, cwd=cwd, start_new_session=True,
            )
        holder = _Holder(name, proc, proc.pid, log)
        self._holders.append(holder)
        line = self._read_line(proc, 60.0)
        words = line.split()
        if words[:1] != [b"ready"] or len(words) != 2:
            raise RuntimeError(f"decoy {name} did not start (said {line!r}): "
                               f"{log.read_text(errors='replace')[-3000:]}")
        holder.holder_pid = int(words[1])
        return name

    @staticmethod
    def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        buf = b""
        while b"\n" not in buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
        return buf.partition(b"\n")[0]

    def _kill(self, h: _Holder) -> None:
        """SIGKILL a holder that stayed: the pid we started and the holder's own pid (when
        runuser sits in between), by pid only, after checking it still is our decoy."""
        for pid in dict.fromkeys((h.holder_pid, h.proc.pid)):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if h.name.encode() in cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            h.proc.wait(timeout=10)

    # --------------------------------------------------------------------- broken files
    def _create(self, name: str, data: bytes) -> str:
        path = os.path.join(SHM, f"mppools.{name}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._files.append(path)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        return name

    def _garbage(self, name: str) -> str:
        data = bytearray(os.urandom(8192))
        data[:8] = b"GARBAGE!"  # never the magic
        return self._create(name, bytes(data))

    def _bad_version(self, name: str, healthy: str) -> str:
        from mppools._slots import MAGIC

        with open(os.path.join(SHM, f"mppools.{healthy}"), "rb") as f:
            data = bytearray(f.read())
        if data[:len(MAGIC)] != MAGIC:
            raise RuntimeError(f"decoy {healthy}: its segment does not start with {MAGIC!r}")
        (version,) = struct.unpack_from("<I", data, _VERSION_AT)
        struct.pack_into("<I", data, _VERSION_AT, version + 100)
        return self._create(name, bytes(data))

    # ---------------------------------------------------------------------- other user
    def _other_user(self, name: str) -> str:
        if os.geteuid() != 0:
            raise _Unavailable(f"not root (euid {os.geteuid()})")
        runuser, useradd = shutil.which("runuser"), shutil.which("useradd")
        if runuser is None or useradd is None:
            raise _Unavailable("needs runuser and useradd (util-linux, passwd)")
        try:
            pw = pwd.getpwnam(DECOY_USER)
        except KeyError:
            done = subprocess.run(
                [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                 DECOY_USER], capture_output=True, text=True, timeout=60, check=False)
            if done.returncode not in (0, 9):  # 9: someone else created it meanwhile
                raise RuntimeError(f"useradd {DECOY_USER} exited {done.returncode}: "
                                   f"{done.stderr.strip()}") from None
            pw = pwd.getpwnam(DECOY_USER)
        if pw.pw_uid == 0:
            raise RuntimeError(f"user {DECOY_USER} is root")
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1"}
        as_user = [runuser, "-u", DECOY_USER, "--"]
        python = self._user_python(as_user, env)
        env["PYTHONPATH"] = str(_REPO)
        if not self._imports(as_user, python, env):
            env["PYTHONPATH"] = self._shared_copy()
            if not self._imports(as_user, python, env):
                raise _Unavailable(f"user {DECOY_USER} cannot import mppools with {python} "
                                   f"even from a copy in {env['PYTHONPATH']}")
        return self._hold(name, [*as_user, python], env, cwd="/")

    @staticmethod
    def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, env=env, cwd="/", capture_output=True, text=True,
                              timeout=60, check=False, stdin=subprocess.DEVNULL)

    def _user_python(self, as_user: list[str], env: dict[str, str]) -> str:
        """An interpreter the user can run, of our Python version (the copied C extensions
        must load in it)."""
        want = f"{sys.version_info[0]}.{sys.version_info[1]}"
        candidates = [sys.executable, os.path.realpath(sys.executable),
                      f"/usr/bin/python{want}", "/usr/bin/python3", shutil.which("python3")]
        tried = []
        for python in dict.fromkeys(c for c in candidates if c):
            done = self._run([*as_user, python, "-c",
                              "import sys; print('%d.%d' % sys.version_info[:2])"], env)
            if done.returncode == 0 and done.stdout.strip() == want:
                return python
            tried.append(f"{python}: {(done.stdout + done.stderr).strip()[-120:]}")
        raise _Unavailable(f"no Python {want} that {DECOY_USER} can run ({'; '.join(tried)})")

    def _imports(self, as_user: list[str], python: str, env: dict[str, str]) -> bool:
        done = self._run([*as_user, python, "-c", "import mppools, mppools._keeper"], env)
        return done.returncode == 0

    def _shared_copy(self) -> str:
        """A world-readable directory with mppools (from the checkout) and every third-party
        module it imports, with their metadata."""
        done = subprocess.run([sys.executable, "-c", _CLOSURE], env=self._root_env(),
                              cwd="/", capture_output=True, text=True, timeout=60, check=True)
        closure = json.loads(done.stdout)
        share = tempfile.mkdtemp(prefix=f"mppools-{self.decoys.prefix}")  # remove_stale()
        self._share = share
        ignore = shutil.ignore_patterns("__pycache__")
        shutil.copytree(_REPO / "mppools", os.path.join(share, "mppools"), ignore=ignore)
        for path in [*closure["modules"].values(), *closure["dists"].values()]:
            target = os.path.join(share, os.path.basename(path))
            if os.path.isdir(path):
                shutil.copytree(path, target, ignore=ignore, dirs_exist_ok=True)
            elif os.path.isfile(path):
                shutil.copy2(path, target)
        for root, _dirs, files in os.walk(share):
            os.chmod(root, 0o755)
            for f in files:
                os.chmod(os.path.join(root, f), 0o644)
        return share


class _Unavailable(Exception):
    """A decoy that cannot be made on this host (reported, not fatal)."""


@pytest.fixture(scope="session", autouse=True)
def decoy_budgets(request: pytest.FixtureRequest,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Decoys]:
    """Decoy budgets, healthy and broken, of this and another user, for the whole session
    (see the module docstring); ``MPPOOLS_TEST_NO_DECOYS=1`` turns them off."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if os.environ.get("MPPOOLS_TEST_NO_DECOYS") == "1":
        yield Decoys(prefix=f"{_PREFIX}{os.getpid()}-", notes=["off (MPPOOLS_TEST_NO_DECOYS)"])
        return
    decoys = DecoySet(tmp_path_factory.mktemp("decoys"))
    atexit.register(decoys.stop)
    try:
        made = decoys.start()
    except BaseException:
        decoys.stop()
        raise
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"decoy budgets: {', '.join(made.names)}"
                                + "".join(f"; {n}" for n in made.notes))
    try:
        yield made
    finally:
        decoys.stop()

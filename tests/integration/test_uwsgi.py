"""uWSGI (the pyuwsgi wheel's real server), 8 processes, one budget, SIGKILL chaos.

The judge trusts nothing in mppools: a CountingProxy in front of a private Redis counts the
open broker connections exactly. Holders are requests to ``/hold`` of
tests/integration/apps/uwsgi_app.py: each takes a connection (a slot), answers
``held <pid>`` and keeps it until the test sends one byte of the request body, or SIGKILLs
that worker (a pid we learned from the app and check is a child of the master we started).
With 8 holders and a limit of 3, five requests always wait for a slot, so every kill is
followed by a waiter getting the dead holder's slot: that is the reclaim check, bounded by a
deadline, with no sleeps.

Modes: preforked (the app, and ``setup()``, in the master) without and with
``--py-call-osafterfork`` or ``--py-call-uwsgi-fork-hooks``, and ``--lazy-apps`` (every
worker loads the app and joins the budget by name). In the preforked modes the master
publishes once before forking (``ITEST_WARMUP``), the case where workers inherit a pooled
connection.

``ITEST_UWSGI_SETUP=configure`` runs the same tests with a plain ``mppools.configure()`` in
the app and no cleanup hook, i.e. without mppools.integrations.uwsgi (to check that the
tests fail without it).
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest
from support.proxy_process import ProxyProcess
from support.servers import RedisServer, free_port, popen, stop_process_tree

import mppools
from mppools.integrations import uwsgi as mppools_uwsgi

from .conftest import APPS, REPO, base_env, shm_objects, wait_until

PROCESSES = 8
LIMIT = 3
KILLS = 8
#: /dev/shm names of budgets configure() names by itself (pid<pid>-<random>)
GENERATED = ("mppools.pid", "sem.mppools.pid")
SETUP = os.environ.get("ITEST_UWSGI_SETUP", "integration")


def _uwsgi_binary() -> str | None:
    beside = Path(sys.executable).with_name("uwsgi")
    if beside.exists():
        return str(beside)
    return shutil.which("uwsgi")


UWSGI = _uwsgi_binary()
needs_uwsgi = pytest.mark.skipif(UWSGI is None, reason="pyuwsgi (the uwsgi binary) is needed")

MODES = {
    "preforked": [],
    "preforked-osafterfork": ["--py-call-osafterfork"],
    "preforked-uwsgi-fork-hooks": ["--py-call-uwsgi-fork-hooks"],
    "lazy-apps": ["--lazy-apps"],
}


class Uwsgi:
    """A real uWSGI master with ``PROCESSES`` workers serving uwsgi_app on 127.0.0.1."""

    def __init__(self, tmp: Path, mode: str, env: dict[str, str], *, name: str | None,
                 processes: int = PROCESSES) -> None:
        assert UWSGI is not None
        self.port = free_port()
        self.log = tmp / f"uwsgi-{uuid.uuid4().hex[:6]}.log"
        self.ready = tmp / f"ready-{uuid.uuid4().hex[:6]}"
        self.processes = processes
        self.lazy = mode == "lazy-apps"
        args = [UWSGI, "--http-socket", f"127.0.0.1:{self.port}", "--master",
                "--processes", str(processes), "--module", "uwsgi_app:app", "--need-app",
                "--die-on-term", "--socket-timeout", "60", "--reload-mercy", "20",
                "--worker-reload-mercy", "20", "--chdir", str(APPS), *MODES[mode]]
        if name is not None and SETUP == "integration":
            args += ["--exec-as-user-atexit",
                     f"{sys.executable} -m mppools.integrations.uwsgi cleanup {name}"]
        env = dict(env, ITEST_READY=str(self.ready), ITEST_SETUP=SETUP)
        self.proc = popen(args, log_path=self.log, cwd=APPS, env=env)

    def worker_pids(self) -> set[int]:
        try:
            return {p.pid for p in psutil.Process(self.proc.pid).children()}
        except psutil.Error:
            return set()

    def loaded(self) -> set[int]:
        try:
            return {int(x) for x in self.ready.read_text().split()}
        except (OSError, ValueError):
            return set()

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Every worker is there and has the app (lazy: each loaded it itself)."""
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"uWSGI died:\n{self.log_tail()}")
            workers = self.worker_pids()
            if len(workers) < self.processes:
                return False
            if self.lazy:
                return workers <= self.loaded()
            return self.proc.pid in self.loaded()
        assert wait_until(ready, timeout, 0.05), f"uWSGI not ready:\n{self.log_tail()}"

    def get(self, path: str) -> str:
        with contextlib.closing(self.request(path)) as sock:
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        return data.decode(errors="replace").split("\r\n\r\n", 1)[-1]

    def request(self, path: str, body_length: int | None = None) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=60)
        head = f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n"
        if body_length is not None:
            head += f"Content-Length: {body_length}\r\n"
        sock.sendall((head + "\r\n").encode())
        return sock

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGINT to the master (uWSGI's shutdown), wait; returns its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            with contextlib.suppress(Exception):
                self.proc.wait(timeout=timeout)
        code = self.proc.poll()
        stop_process_tree(self.proc, timeout=5)
        return code


class Holders:
    """``/hold`` requests in flight: which hold a slot (``held <pid>``), which still wait."""

    def __init__(self, server: Uwsgi) -> None:
        self.server = server
        self.waiting: dict[socket.socket, bytes] = {}
        self.held: dict[socket.socket, int] = {}
        self.max_held = 0
        self.count = 0

    def open(self) -> None:
        self.count += 1
        sock = self.server.request(f"/hold?id=h{self.count}", body_length=1)
        self.waiting[sock] = b""

    def wait_held(self, n: int, timeout: float) -> None:
        """Until ``n`` more requests hold a slot; bounded by ``timeout``."""
        goal = len(self.held) + n
        deadline = time.monotonic() + timeout
        while len(self.held) < goal:
            left = deadline - time.monotonic()
            assert left > 0, (f"only {len(self.held)} of {goal} holders within {timeout} s "
                              f"(a dead holder's slot did not come back?)\n"
                              f"{self.server.log_tail(30)}")
            ready, _, _ = select.select(list(self.waiting), [], [], min(left, 1.0))
            for sock in ready:
                chunk = sock.recv(4096)
                if not chunk:
                    raise AssertionError(f"a waiting /hold request ended: "
                                         f"{self.waiting[sock]!r}\n{self.server.log_tail(30)}")
                self.waiting[sock] += chunk
                text = self.waiting[sock].decode(errors="replace")
                if "held " in text:
                    pid = int(text.split("held ", 1)[1].split()[0])
                    del self.waiting[sock]
                    self.held[sock] = pid
            self.max_held = max(self.max_held, len(self.held))

    def kill_one(self) -> int:
        """SIGKILL the worker of one holder (a child of our master), forget its request."""
        sock, pid = next(iter(self.held.items()))
        assert pid in self.server.worker_pids(), f"holder {pid} is not a worker of ours"
        os.kill(pid, signal.SIGKILL)
        del self.held[sock]
        sock.close()
        return pid

    def release_all(self, timeout: float) -> int:
        """Let every holder go (and every waiter, once it got its slot); bounded."""
        released = 0
        deadline = time.monotonic() + timeout
        while self.held or self.waiting:
            for sock in list(self.held):
                sock.sendall(b"x")
                data = b""
                while b"released" not in data:
                    chunk = sock.recv(4096)
                    assert chunk, f"holder {self.held[sock]} did not release"
                    data += chunk
                sock.close()
                del self.held[sock]
                released += 1
            if self.waiting:
                assert time.monotonic() < deadline, "waiters never got a slot after the release"
                self.wait_held(1, deadline - time.monotonic())
        return released

    def close(self) -> None:
        for sock in [*self.held, *self.waiting]:
            sock.close()


def _env(proxy: ProxyProcess, redis: RedisServer, name: str | None, **extra: str) -> dict[str, str]:
    env = base_env(ITEST_BROKER_URL=proxy.url_for(redis.url),
                   ITEST_QUEUE=f"q{uuid.uuid4().hex[:6]}", MPPOOLS_LIMIT=str(LIMIT),
                   MPPOOLS_ACQUIRE_TIMEOUT="90", **extra)
    if name is not None:
        env["MPPOOLS_NAME"] = name
    env["PYTHONPATH"] = os.pathsep.join([str(APPS), str(REPO)])
    return env


@needs_uwsgi
@pytest.mark.redis
@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", list(MODES))
def test_uwsgi_sigkill_chaos_stays_within_budget(
    mode: str, redis_server: RedisServer, tmp_path: Path, budget_name: str
) -> None:
    """8 workers, limit 3, holders SIGKILLed one after another: never more than 3 broker
    connections, every dead holder's slot comes back, and uWSGI's stop removes the budget."""
    warmup = "0" if mode == "lazy-apps" else "1"
    with ProxyProcess(("127.0.0.1", redis_server.port)) as proxy:
        server = Uwsgi(tmp_path, mode, _env(proxy, redis_server, budget_name,
                                            ITEST_WARMUP=warmup), name=budget_name)
        holders = Holders(server)
        kills: list[int] = []
        try:
            server.wait_ready()
            for _ in range(PROCESSES):
                holders.open()
            holders.wait_held(LIMIT, timeout=90)
            assert len(holders.waiting) == PROCESSES - LIMIT
            for _ in range(KILLS):
                kills.append(holders.kill_one())
                holders.open()  # the killed request's place; uWSGI respawns the worker
                holders.wait_held(1, timeout=90)  # a waiter got the dead holder's slot
                assert proxy.peak <= LIMIT, f"peak {proxy.peak} after kills {kills}"
            released = holders.release_all(timeout=90)
            peak, accepted = proxy.peak, proxy.total_accepted
            server.wait_ready()  # lazy: respawned workers have loaded the app again
        finally:
            holders.close()
            code = server.stop()
        assert wait_until(lambda: proxy.current == 0, 15)
    summary = (f"mode={mode} peak={peak} kills={len(kills)} released={released} "
               f"max_held={holders.max_held} accepted={accepted} exit={code}")
    print(summary)
    assert peak <= LIMIT, summary
    assert holders.max_held <= LIMIT, summary
    assert len(set(kills)) == KILLS, summary
    assert released >= PROCESSES, summary
    assert not shm_objects(budget_name), (
        f"{summary}: the budget stayed in /dev/shm after uWSGI stopped\n{server.log_tail(20)}")


@needs_uwsgi
@pytest.mark.redis
@pytest.mark.timeout(180)
def test_a_master_forking_from_c_runs_no_thread_of_ours(
    redis_server: RedisServer, tmp_path: Path, budget_name: str
) -> None:
    """uWSGI's default (no Python fork handling in the workers): the master publishes while
    it loads the app, yet when it forks it runs no keeper thread (one a worker would inherit
    mid-GIL hand-off) and holds no idle slot; every worker still gets slots."""
    with ProxyProcess(("127.0.0.1", redis_server.port)) as proxy:
        server = Uwsgi(tmp_path, "preforked", _env(proxy, redis_server, budget_name,
                                                   ITEST_WARMUP="1"), name=budget_name,
                       processes=2)
        try:
            server.wait_ready()
            master = server.proc.pid
            threads = psutil.Process(master).num_threads()
            mppools.attach(budget_name)  # read-only: stats(); takes no slot
            held = {h.pid: h.slots for h in mppools.stats().holders if h.alive}
            answers = [server.get(f"/pub?id=p{i}") for i in range(6)]
            accepted = proxy.total_accepted
            mppools.close(unlink=False)
        finally:
            code = server.stop()
    assert accepted >= 2, "the warm-up and the workers reached the broker"
    assert threads == 1, f"the master runs {threads} threads"
    assert master not in held, f"the master holds {held.get(master)} idle slot(s)"
    assert all(a.startswith("ok ") for a in answers), answers
    assert code is not None


@needs_uwsgi
@pytest.mark.redis
@pytest.mark.timeout(180)
def test_a_cross_host_budget_needs_pythons_fork_handling_in_uwsgi(
    redis_server: RedisServer, tmp_path: Path, budget_name: str
) -> None:
    """backend=redis keeps a lease thread in the master: uWSGI's default (workers forked
    from C without Python's fork handling) is refused at setup(), so the app does not load
    (--need-app: uWSGI exits); with --py-call-uwsgi-fork-hooks the budget works."""
    spec = f"{redis_server.url}?lease_ttl=2&fresh=1"
    with ProxyProcess(("127.0.0.1", redis_server.port)) as proxy:
        refused = Uwsgi(tmp_path, "preforked", _env(proxy, redis_server, budget_name,
                                                    MPPOOLS_BACKEND=spec), name=budget_name,
                        processes=2)
        try:
            code = refused.proc.wait(60)
            log = refused.log_tail(200)
        finally:
            refused.stop()
        assert code != 0, log
        assert "--py-call-uwsgi-fork-hooks" in log and "ConfigurationError" in log, log
        assert not shm_objects(budget_name), "the refused setup left a budget"
        server = Uwsgi(tmp_path, "preforked-uwsgi-fork-hooks",
                       _env(proxy, redis_server, budget_name, MPPOOLS_BACKEND=spec,
                            ITEST_WARMUP="1"), name=budget_name, processes=4)
        try:
            server.wait_ready()
            answers = [server.get(f"/pub?id=r{i}") for i in range(12)]
            pids = {a.split()[1] for a in answers if a.startswith("ok ")}
            peak = proxy.peak
        finally:
            server.stop()
    assert all(a.startswith("ok ") for a in answers), answers
    assert pids and peak <= LIMIT, (pids, peak)


@needs_uwsgi
@pytest.mark.redis
@pytest.mark.timeout(180)
def test_lazy_apps_worker_exit_keeps_one_budget(
    redis_server: RedisServer, tmp_path: Path, budget_name: str
) -> None:
    """--lazy-apps: the worker that created the budget exits gracefully (SIGHUP, as at
    --max-requests); its replacement must join the same budget, not make a second one."""
    with ProxyProcess(("127.0.0.1", redis_server.port)) as proxy:
        server = Uwsgi(tmp_path, "lazy-apps", _env(proxy, redis_server, budget_name),
                       name=budget_name)
        holders = Holders(server)
        try:
            server.wait_ready()
            segment = f"/dev/shm/mppools.{budget_name}"
            inode = os.stat(segment).st_ino
            creator = int(server.get("/pid").split("creator ", 1)[1].split()[0])
            assert creator in server.worker_pids()
            os.kill(creator, signal.SIGHUP)  # uWSGI: reload this worker gracefully
            assert wait_until(lambda: creator not in server.worker_pids(), 60)
            server.wait_ready()
            same = os.path.exists(segment) and os.stat(segment).st_ino == inode
            for _ in range(PROCESSES):
                holders.open()
            holders.wait_held(LIMIT, timeout=90)
            peak = proxy.peak
            holders.release_all(timeout=90)
        finally:
            holders.close()
            server.stop()
        assert wait_until(lambda: proxy.current == 0, 15)
    assert same and peak <= LIMIT, (
        f"peak {peak}; the segment is {'the same' if same else 'a new one'}: the budget was "
        "removed while the other workers used it, and the new worker made a second one")
    assert not shm_objects(budget_name)


@needs_uwsgi
@pytest.mark.timeout(120)
def test_lazy_apps_without_a_name_is_refused(redis_server: RedisServer, tmp_path: Path) -> None:
    """Every worker would create a budget of its own: setup() refuses, uWSGI (--need-app)
    does not start, and the log says why."""
    if SETUP != "integration":
        pytest.skip("checks mppools.integrations.uwsgi itself")
    env = base_env(ITEST_BROKER_URL=redis_server.url, MPPOOLS_LIMIT=str(LIMIT))
    env["PYTHONPATH"] = os.pathsep.join([str(APPS), str(REPO)])
    before = {p for p in os.listdir("/dev/shm") if p.startswith(GENERATED)}
    server = Uwsgi(tmp_path, "lazy-apps", env, name=None, processes=2)
    try:
        assert wait_until(lambda: "ConfigurationError" in server.log_tail(200), 60), \
            server.log_tail()
    finally:
        server.stop()
    log = server.log_tail(200)
    assert "would create a budget of its own" in log and "MPPOOLS_NAME" in log, log
    after = {p for p in os.listdir("/dev/shm") if p.startswith(GENERATED)}
    assert after <= before, f"a refused setup left {sorted(after - before)}"


@pytest.mark.timeout(120)
def test_cleanup_refuses_while_another_process_has_the_budget_open(
    tmp_path: Path, budget_name: str
) -> None:
    """The exec-as-user-atexit command never removes a budget another process still has
    open, even holding no slot (a second master, a celery worker)."""
    mppools.configure(LIMIT, budget_name)  # this process: open, no slot
    run = subprocess.run([sys.executable, "-m", "mppools.integrations.uwsgi", "cleanup",
                          budget_name], capture_output=True, text=True, timeout=60,
                         env=base_env(PYTHONPATH=str(REPO)), check=False)
    assert run.returncode == 1, run
    assert f"pids {os.getpid()}" in run.stderr, run.stderr
    assert shm_objects(budget_name)
    mppools.close(unlink=False)
    run = subprocess.run([sys.executable, "-m", "mppools.integrations.uwsgi", "cleanup",
                          budget_name], capture_output=True, text=True, timeout=60,
                         env=base_env(PYTHONPATH=str(REPO)), check=False)
    assert run.returncode == 0, run
    assert not shm_objects(budget_name)


# ------------------------------------------------------------------ without the server
def test_module_imports_and_configures_without_uwsgi(budget_name: str) -> None:
    """Outside uWSGI (no ``uwsgi`` module) setup() is a plain configure()."""
    assert "uwsgi" not in sys.modules
    assert mppools_uwsgi.server_mode() is None
    limiter = mppools_uwsgi.setup(LIMIT, budget_name)
    assert limiter is mppools._config.current()
    assert limiter is not None and limiter.limit == LIMIT
    mppools.close()


def test_setup_in_a_lazy_worker_without_a_name_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake: Any = types.ModuleType("uwsgi")
    fake.opt = {"lazy-apps": True, "processes": b"8", "master": True}
    fake.worker_id = lambda: 3
    fake.masterpid = lambda: 1
    monkeypatch.setitem(sys.modules, "uwsgi", fake)
    monkeypatch.delenv("MPPOOLS_NAME", raising=False)
    with pytest.raises(mppools.ConfigurationError, match=r"8 x 3 = 24 connections"):
        mppools_uwsgi.setup(LIMIT)
    assert mppools._config.current() is None


def _fake_master(monkeypatch: pytest.MonkeyPatch, **opts: Any) -> Any:
    """A ``uwsgi`` module as a preforking master (worker id 0) with ``opts`` shows it."""
    from mppools import _fork

    fake: Any = types.ModuleType("uwsgi")
    fake.opt = {"processes": b"4", "master": True, **opts}
    fake.worker_id = lambda: 0
    fake.masterpid = lambda: os.getpid()
    monkeypatch.setitem(sys.modules, "uwsgi", fake)
    monkeypatch.setitem(sys.modules, "uwsgidecorators", None)  # chain by hand
    monkeypatch.setattr(_fork, "_threadless", False)
    monkeypatch.setattr(mppools_uwsgi, "_hooks_installed_in", None)
    monkeypatch.setattr(mppools_uwsgi, "_exit_hooks_in", os.getpid())  # no atexit of ours
    return fake


def test_master_forking_from_c_runs_no_thread_and_keeps_no_idle_slot(
    monkeypatch: pytest.MonkeyPatch, budget_name: str
) -> None:
    """A preforking master without Python's fork handling (uWSGI's default): no keeper
    thread starts there, and a released connection gives its slot back at once (nobody
    could hand an idle one on later). Its children may run threads again."""
    import threading

    from kombu import Connection

    from mppools import _fork, pools

    _fake_master(monkeypatch)
    limiter = mppools_uwsgi.setup(LIMIT, budget_name, idle_timeout=None)
    assert limiter is not None and _fork.threadless()
    conn = Connection("memory://")
    with pools.connections[conn].acquire(block=True) as c:
        c.connect()
        assert limiter.stats().in_use == 1
    assert limiter.stats().in_use == 0, "the master kept an idle slot"
    assert not [t for t in threading.enumerate() if t.name == "mppools-keeper"]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            c = pools.connections[conn].acquire(block=True, timeout=5)
            c.connect()
            c.release()
            keepers = [t.name for t in threading.enumerate() if t.name == "mppools-keeper"]
            os.write(w, f"{_fork.threadless()} {limiter.stats().in_use} {keepers}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    assert _child_report(pid, r) == "False 1 ['mppools-keeper']"
    mppools.close()


@pytest.mark.parametrize(("hooks", "threads"), [("py-call-uwsgi-fork-hooks", True),
                                                ("py-call-osafterfork", False)])
def test_only_a_master_with_uwsgi_fork_hooks_keeps_its_keeper(
    monkeypatch: pytest.MonkeyPatch, budget_name: str, hooks: str, threads: bool
) -> None:
    """--py-call-uwsgi-fork-hooks holds the GIL across the fork and runs CPython's fork
    handling first: the master may run threads. --py-call-osafterfork runs it only after a
    respawned worker took the GIL: the master stays thread-free."""
    from kombu import Connection

    from mppools import _fork, pools

    _fake_master(monkeypatch, **{hooks: True})
    limiter = mppools_uwsgi.setup(LIMIT, budget_name, idle_timeout=None)
    assert limiter is not None and _fork.threadless() is not threads
    conn = Connection("memory://")
    with pools.connections[conn].acquire(block=True) as c:
        c.connect()
    # pooled and idle (the keeper hands it on on request), or given back at once
    assert limiter.stats().in_use == (1 if threads else 0)
    mppools.close()


def test_a_budget_configured_before_setup_gives_its_idle_slots_back(
    monkeypatch: pytest.MonkeyPatch, budget_name: str
) -> None:
    """configure() and a publish before setup(): setup() in a master that forks from C
    stops the keeper thread that already runs and gives back the idle slot it watched."""
    import threading

    from kombu import Connection

    from mppools import pools

    limiter = mppools.configure(LIMIT, budget_name, idle_timeout=None)
    conn = Connection("memory://")
    with pools.connections[conn].acquire(block=True) as c:
        c.connect()
    assert limiter.stats().in_use == 1
    running = [t for t in threading.enumerate() if t.name == "mppools-keeper"]
    assert running
    _fake_master(monkeypatch)
    assert mppools_uwsgi.setup(LIMIT, budget_name) is limiter
    assert limiter.stats().in_use == 0
    # setup() returns once the thread has ended
    assert not [t for t in running if t.is_alive()], "the keeper thread still runs"
    mppools.close()


def test_cross_host_budget_in_a_master_forking_from_c_is_refused(
    monkeypatch: pytest.MonkeyPatch, budget_name: str
) -> None:
    """Its lease thread would run in the master at every fork: refused, nothing made."""
    pytest.importorskip("redis")
    _fake_master(monkeypatch)
    with pytest.raises(mppools.ConfigurationError,
                       match=r"4 worker\(s\) from C .* --py-call-uwsgi-fork-hooks"):
        mppools_uwsgi.setup(LIMIT, budget_name, backend="redis://127.0.0.1:9/0")
    assert mppools._config.current() is None
    assert not shm_objects(budget_name)


def _c_level_fork() -> int:
    """fork(2) straight from C, as uWSGI does: none of Python's fork handlers run. PyDLL
    keeps the GIL across the call, so the child does not inherit it held by another thread."""
    import ctypes

    return int(ctypes.PyDLL(None).fork())


def _other_threads_blocked(timeout: float = 10.0) -> None:
    """Until every other thread of this process sleeps in the kernel outside a futex (none
    is in the middle of taking or handing on the GIL, so a fork from C leaves the child's
    GIL consistent); bounded."""
    import threading

    me = threading.get_native_id()

    def blocked() -> bool:
        for tid in os.listdir("/proc/self/task"):
            if int(tid) == me:
                continue
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
                with open(f"/proc/self/task/{tid}/wchan") as f:
                    wchan = f.read()
            except OSError:
                continue  # ended meanwhile
            if state != "S" or "futex" in wchan or wchan in ("", "0"):
                return False
        return True

    assert wait_until(blocked, timeout, 0.005), "a thread of ours never went to sleep"


def _child_report(pid: int, r: int, timeout: float = 30.0) -> str:
    """What the child forked as ``pid`` wrote to ``r`` before exiting; a child that does not
    finish within ``timeout`` is SIGKILLed and reported hung."""
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    with os.fdopen(r, "rb") as f:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([f], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise AssertionError(f"the child {pid} hung after a fork from C")
            chunk = os.read(f.fileno(), 65536)
            if not chunk:
                break
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    assert status == 0, f"the child {pid} failed: status {status}"
    return b"".join(chunks).decode()


@pytest.mark.timeout(60)
def test_after_fork_catches_up_in_a_c_level_fork(budget_name: str) -> None:
    """What the post-fork hook does in a uWSGI worker forked without Python's handlers: the
    master's pooled connections are dropped (before, the child would reuse them), the
    interpreter's own fork handling runs (``threading`` no longer lists the parent's keeper
    thread, which does not exist here, and a new thread starts), and the child takes slots
    of its own."""
    import json
    import threading

    from kombu import Connection
    from kombu.utils.functional import lazy

    from mppools import _fork, pools

    mppools.configure(LIMIT, budget_name, idle_timeout=None)
    conn = Connection("memory://")
    held = pools.connections[conn].acquire(block=True)
    held.connect()
    idle = pools.connections[conn].acquire(block=True)
    idle.connect()
    idle.release()  # the master keeps an open, idle connection in its pool
    parent, epoch = os.getpid(), _fork.current_epoch()
    keepers = [t for t in threading.enumerate() if t.name == "mppools-keeper"]
    assert keepers, "the parent's keeper thread runs"
    _other_threads_blocked()
    r, w = os.pipe()
    pid = _c_level_fork()
    if pid == 0:
        code = 1
        try:
            pool = pools.connections[conn]
            before = sum(1 for c in pool._resource.queue if not isinstance(c, lazy))
            stale = _fork.current_epoch() == epoch
            ran, again = mppools_uwsgi.after_fork(), mppools_uwsgi.after_fork()
            threads = [t.name for t in threading.enumerate()]
            fresh = all(isinstance(c, lazy) for c in pool._resource.queue)
            c = pool.acquire(block=True, timeout=5)  # starts this process's keeper thread
            c.connect()
            mine = {h.pid: h.slots for h in mppools.stats().holders}.get(os.getpid())
            c.release()
            os.write(w, json.dumps([before, stale, ran, again, threads, fresh,
                                    len(pool._dirty), mine]).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    out = _child_report(pid, r)
    before, stale, ran, again, threads, fresh, dirty, mine = json.loads(out)
    # inherited: the master's idle connection, and no fork handling had run
    assert (before, stale) == (1, True)
    # after_fork() ran once and ran the interpreter's fork handling: only this thread left
    assert (ran, again, threads) == (True, False, [threading.main_thread().name])
    # it emptied the pool, and the child held a slot of its own
    assert (fresh, dirty, mine) == (True, 0, 1)
    assert held.connected
    # the child's slot died with it: its token was on a description of its own
    assert {h.pid: h.slots for h in mppools.stats().holders if h.alive} == {parent: 2}
    assert [p for p, _ in mppools.audit().reclaimed_slots] == [pid]
    held.release()
    mppools.close()


def test_post_fork_hook_runs_first_and_keeps_the_apps_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Installing the hook through uwsgidecorators keeps a post-fork hook and a spooler the
    app set before, and runs mppools' handling first."""
    calls: list[str] = []
    fake: Any = types.ModuleType("uwsgi")
    fake.opt = {"processes": b"8", "master": True}

    def app_hook() -> None:
        calls.append("app")

    def app_spooler(env: object) -> int:
        return 0

    fake.post_fork_hook = app_hook
    fake.spooler = app_spooler
    monkeypatch.setitem(sys.modules, "uwsgi", fake)
    monkeypatch.delitem(sys.modules, "uwsgidecorators", raising=False)
    monkeypatch.setattr(mppools_uwsgi, "_post_fork", lambda: calls.append("mppools"))
    try:
        mppools_uwsgi._install_post_fork(fake)
        assert fake.spooler is app_spooler
        fake.post_fork_hook()
        assert calls == ["mppools", "app"]
    finally:
        sys.modules.pop("uwsgidecorators", None)

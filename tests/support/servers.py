"""Start and stop *private* real broker servers for tests.

Everything started here:

* listens on 127.0.0.1 only (epmd additionally binds ``[::1]``, see README),
* uses free ports and private data/log directories under a caller-supplied
  temporary directory,
* is stopped by the pid that was started (terminate -> wait(5) -> kill),
  never by process name, and never touches the system services.

Every process started here also carries a unique marker environment variable
(:data:`MARKER_ENV`) so that a process that escaped the pid tree (for example
an ``epmd -daemon`` spawned by the Erlang VM and re-parented to init) can still
be found and stopped -- only processes that inherited *our* random token are
ever signalled.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TypeAlias

import psutil

__all__ = [
    "MARKER_ENV",
    "RabbitMQServer",
    "RedisServer",
    "ServerStartError",
    "free_port",
    "popen",
    "stop_process_tree",
]

LOCALHOST = "127.0.0.1"
MARKER_ENV = "MPPOOLS_TEST_SERVER_TOKEN"

RespValue: TypeAlias = "str | int | bytes | list[RespValue] | None"


class ServerStartError(RuntimeError):
    """A server could not be started (message includes the log tail)."""


class RespError(RuntimeError):
    """Redis answered with an error reply."""


# --------------------------------------------------------------------------
# generic helpers
# --------------------------------------------------------------------------


def free_port(host: str = LOCALHOST) -> int:
    """Return a currently free TCP port on *host*.

    There is an unavoidable race between returning the port and the caller
    binding it; the server classes retry with a fresh port when that happens.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _port_open(port: int, host: str = LOCALHOST, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"<no log at {path}>"
    return "\n".join(text.splitlines()[-lines:])


def _as_psutil(
    proc: int | psutil.Process | subprocess.Popen[bytes] | subprocess.Popen[str],
) -> psutil.Process | None:
    try:
        if isinstance(proc, psutil.Process):
            return proc
        pid = proc.pid if isinstance(proc, subprocess.Popen) else proc
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def _descendants(root: psutil.Process | None) -> list[psutil.Process]:
    if root is None:
        return []
    try:
        return list(root.children(recursive=True))
    except psutil.NoSuchProcess:
        return []


def _terminate_procs(procs: Iterable[psutil.Process], timeout: float = 5.0) -> list[psutil.Process]:
    """terminate -> wait(timeout) -> kill -> wait; returns processes still alive."""
    alive: list[psutil.Process] = []
    seen: set[int] = set()
    for p in procs:
        if p.pid in seen or p.pid == os.getpid():
            continue
        seen.add(p.pid)
        try:
            if p.is_running():  # also guards against pid reuse (create time)
                p.terminate()
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(alive, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    _, alive = psutil.wait_procs(alive, timeout=timeout)
    return alive


def stop_process_tree(
    proc: int | psutil.Process | subprocess.Popen[bytes] | subprocess.Popen[str],
    timeout: float = 5.0,
    extra: Iterable[psutil.Process] = (),
) -> list[psutil.Process]:
    """Stop *proc* and all its descendants: terminate -> wait(timeout) -> kill.

    Descendants are looked up from *proc*'s pid only (plus *extra*, e.g. a
    snapshot taken earlier). Returns the processes that could not be stopped
    (normally empty). A :class:`subprocess.Popen` is also reaped.
    """
    root = _as_psutil(proc)
    procs = [*_descendants(root), *extra]
    if root is not None:
        procs.insert(0, root)
    # Children first is not required: we signal everybody, then wait for all.
    left = _terminate_procs(procs, timeout=timeout)
    if isinstance(proc, subprocess.Popen):
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
    return left


def _procs_with_marker(token: str) -> list[psutil.Process]:
    found: list[psutil.Process] = []
    me = os.getpid()
    for p in psutil.process_iter():
        if p.pid == me:
            continue
        try:
            if p.environ().get(MARKER_ENV) == token:
                found.append(p)
        except (psutil.Error, OSError):
            continue
    return found


_PR_SET_PDEATHSIG = 1
try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - non-glibc platforms
    _LIBC = None


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def popen(
    args: Sequence[str],
    *,
    log_path: Path,
    cwd: Path,
    env: dict[str, str],
    die_with_parent: bool = True,
) -> subprocess.Popen[bytes]:
    """Start a server process in its own session, output appended to *log_path*.

    With *die_with_parent* (only honoured when called from the main thread:
    Linux delivers PDEATHSIG when the *thread* that forked exits) the process
    gets SIGTERM if the test process dies without cleaning up (e.g. SIGKILL).
    """
    use_pdeathsig = die_with_parent and threading.current_thread() is threading.main_thread()
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
            preexec_fn=_set_pdeathsig if use_pdeathsig else None,
        )


class _Registry:
    """Stops servers that were left running when the interpreter exits."""

    def __init__(self) -> None:
        self._live: weakref.WeakSet[_ManagedServer] = weakref.WeakSet()
        self._lock = threading.Lock()
        atexit.register(self.stop_all)

    def add(self, server: _ManagedServer) -> None:
        with self._lock:
            self._live.add(server)

    def discard(self, server: _ManagedServer) -> None:
        with self._lock:
            self._live.discard(server)

    def stop_all(self) -> None:
        with self._lock:
            servers = list(self._live)
        for server in servers:
            with contextlib.suppress(Exception):
                server.stop()


class _ManagedServer:
    """Common bits: marker token, context manager protocol, atexit safety."""

    def __init__(self, tmp_dir: Path | str) -> None:
        self.tmp_dir = Path(tmp_dir)
        self.token = secrets.token_hex(12)
        self.startup_seconds: float | None = None

    def start(self) -> _ManagedServer:  # pragma: no cover - overridden
        raise NotImplementedError

    def stop(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env[MARKER_ENV] = self.token
        return env

    def leftover_processes(self) -> list[psutil.Process]:
        """Processes carrying this server's marker that are still alive."""
        return [p for p in _procs_with_marker(self.token) if p.is_running()]

    def _kill_marked(self) -> list[psutil.Process]:
        return _terminate_procs(_procs_with_marker(self.token), timeout=5.0)

    def __enter__(self) -> _ManagedServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


_REGISTRY = _Registry()


# --------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------


def _resp_encode(args: Sequence[str | bytes | int]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def _resp_read(f: IO[bytes]) -> RespValue:
    line = f.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("connection closed while reading RESP reply")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RespError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = f.read(n + 2)
        if len(data) != n + 2:
            raise ConnectionError("connection closed while reading RESP bulk")
        return data[:-2]
    if kind == b"*":
        n = int(rest)
        if n < 0:
            return None
        return [_resp_read(f) for _ in range(n)]
    raise ConnectionError(f"unexpected RESP reply: {line!r}")


def _parse_client_list(raw: str) -> list[dict[str, str]]:
    clients: list[dict[str, str]] = []
    for line in raw.splitlines():
        line = line.strip()
        if not line:
            continue
        fields: dict[str, str] = {}
        for item in line.split(" "):
            key, sep, value = item.partition("=")
            if sep:
                fields[key] = value
        clients.append(fields)
    return clients


class RedisServer(_ManagedServer):
    """A private ``redis-server`` on 127.0.0.1:<free port>.

    >>> with RedisServer(tmp_path) as redis:          # doctest: +SKIP
    ...     redis.url, redis.client_count()
    """

    def __init__(
        self,
        tmp_dir: Path | str,
        *,
        maxclients: int | None = None,
        executable: str = "redis-server",
        startup_timeout: float = 10.0,
        extra_args: Sequence[str] = (),
        attempts: int = 3,
        die_with_parent: bool = True,
    ) -> None:
        super().__init__(tmp_dir)
        self.die_with_parent = die_with_parent
        self.maxclients = maxclients
        self.executable = executable
        self.startup_timeout = startup_timeout
        self.extra_args = tuple(extra_args)
        self.attempts = attempts
        self._proc: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self.dir: Path | None = None
        self.log_path: Path | None = None

    # -- properties ---------------------------------------------------------
    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("RedisServer is not started")
        return self._port

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("RedisServer is not started")
        return self._proc.pid

    @property
    def url(self) -> str:
        return f"redis://{LOCALHOST}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle ----------------------------------------------------------
    def start(self) -> RedisServer:
        if self._proc is not None:
            raise RuntimeError("RedisServer already started")
        exe = shutil.which(self.executable)
        if exe is None:
            raise ServerStartError(f"{self.executable!r} not found (apt-get install redis-server)")
        last_error = ""
        for _attempt in range(max(1, self.attempts)):
            port = free_port()
            data_dir = self.tmp_dir / f"redis-{port}"
            data_dir.mkdir(parents=True, exist_ok=True)
            log_path = data_dir / "redis.log"
            args = [
                exe,
                "--port", str(port),
                "--bind", LOCALHOST,
                "--save", "",
                "--appendonly", "no",
                "--dir", str(data_dir),
                "--logfile", str(log_path),
                "--daemonize", "no",
                "--unixsocket", "",
            ]  # fmt: skip
            if self.maxclients is not None:
                args += ["--maxclients", str(self.maxclients)]
            args += list(self.extra_args)
            t0 = time.monotonic()
            proc = popen(
                args,
                log_path=data_dir / "stdout.log",
                cwd=data_dir,
                env=self._base_env(),
                die_with_parent=self.die_with_parent,
            )
            self._proc, self._port, self.dir, self.log_path = proc, port, data_dir, log_path
            _REGISTRY.add(self)
            try:
                problem = self._wait_ping(proc, t0 + self.startup_timeout)
            except BaseException:
                self.stop()
                raise
            if problem is None:
                self.startup_seconds = time.monotonic() - t0
                return self
            self.stop()
            last_error = (
                f"redis-server (pid {proc.pid}, port {port}) {problem} "
                f"(exit code {proc.poll()}):\n"
                f"{_tail(log_path)}\n{_tail(data_dir / 'stdout.log')}"
            )
            if "Address already in use" not in last_error and "foreign" not in problem:
                break
        raise ServerStartError(last_error)

    def _wait_ping(self, proc: subprocess.Popen[bytes], deadline: float) -> str | None:
        """Wait until *our* redis (checked by pid) answers PING; None or a problem."""
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return "exited during startup"
            with contextlib.suppress(OSError, RespError, ConnectionError):
                pong, info = self.pipeline([("PING",), ("INFO", "server")], timeout=1.0)
                if pong == "PONG" and isinstance(info, bytes):
                    # Guard against a foreign server that grabbed the port first.
                    if f"process_id:{proc.pid}\r\n".encode() in info:
                        return None
                    return "lost the port race: a foreign server answered"
            time.sleep(0.05)
        return f"did not answer PING within {self.startup_timeout}s"

    def stop(self) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            stop_process_tree(proc, timeout=5.0)
            self._kill_marked()
        finally:
            self._proc = None
            _REGISTRY.discard(self)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    # -- introspection ------------------------------------------------------
    def command(self, *args: str | bytes | int, timeout: float = 5.0) -> RespValue:
        """Run one command on a fresh raw connection and return the decoded reply."""
        return self.pipeline([args], timeout=timeout)[-1]

    def pipeline(
        self, commands: Sequence[Sequence[str | bytes | int]], timeout: float = 5.0
    ) -> list[RespValue]:
        """Run several commands on ONE fresh raw connection (in order)."""
        with socket.create_connection((LOCALHOST, self.port), timeout=timeout) as s:
            s.sendall(b"".join(_resp_encode(c) for c in commands))
            with s.makefile("rb") as f:
                return [_resp_read(f) for _ in commands]

    def client_list(self) -> list[dict[str, str]]:
        """``CLIENT LIST`` as dicts, excluding the connection used to ask."""
        my_id, raw = self.pipeline([("CLIENT", "ID"), ("CLIENT", "LIST")])
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return [c for c in _parse_client_list(text) if c.get("id") != str(my_id)]

    def client_count(self) -> int:
        """Number of connected clients, excluding the connection used to ask."""
        return len(self.client_list())


# --------------------------------------------------------------------------
# RabbitMQ
# --------------------------------------------------------------------------


def _find_rabbit_script(name: str) -> str:
    candidates = [
        f"/usr/lib/rabbitmq/bin/{name}",
        *sorted(glob.glob(f"/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin/{name}"), reverse=True),
    ]
    for c in candidates:
        if os.access(c, os.X_OK):
            return c
    # NOT /usr/sbin/<name>: as root that wrapper re-executes itself via
    # ``su rabbitmq`` with the system HOME (=> system cookie, system node).
    raise ServerStartError(
        f"{name} not found under /usr/lib/rabbitmq (apt-get install rabbitmq-server)"
    )


class RabbitMQServer(_ManagedServer):
    """A private RabbitMQ node (own epmd, own cookie, own ports, own data dir).

    >>> with RabbitMQServer(tmp_path) as rabbit:      # doctest: +SKIP
    ...     rabbit.add_vhost("v1")
    ...     rabbit.connection_count("v1")
    """

    def __init__(
        self,
        tmp_dir: Path | str,
        *,
        startup_timeout: float = 60.0,
        stop_timeout: float = 30.0,
        ctl_timeout: float = 30.0,
        attempts: int = 2,
        extra_config: str = "",
        die_with_parent: bool = True,
    ) -> None:
        super().__init__(tmp_dir)
        self.die_with_parent = die_with_parent
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.ctl_timeout = ctl_timeout
        self.attempts = attempts
        self.extra_config = extra_config
        self.nodename = f"mppools-test-{secrets.token_hex(4)}@localhost"
        self._proc: subprocess.Popen[bytes] | None = None
        self._epmd: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self.dist_port: int | None = None
        self.epmd_port: int | None = None
        self.base: Path | None = None
        self._env: dict[str, str] | None = None
        self._tree_snapshot: list[psutil.Process] = []
        self.stop_seconds: float | None = None
        self.leftovers_after_stop: list[int] = []

    # -- properties ---------------------------------------------------------
    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("RabbitMQServer is not started")
        return self._port

    @property
    def pid(self) -> int:
        """Pid of the ``rabbitmq-server`` script we started (root of the tree)."""
        if self._proc is None:
            raise RuntimeError("RabbitMQServer is not started")
        return self._proc.pid

    @property
    def beam_pid(self) -> int | None:
        """Pid of the Erlang VM (``beam.smp``) below :attr:`pid`, if running."""
        for p in _descendants(_as_psutil(self.pid)):
            with contextlib.suppress(psutil.Error):
                if p.name().startswith("beam"):
                    return p.pid
        return None

    @property
    def epmd_pid(self) -> int | None:
        return None if self._epmd is None else self._epmd.pid

    @property
    def url(self) -> str:
        return self.url_for_vhost("/")

    def url_for_vhost(self, vhost: str) -> str:
        """``amqp://guest:guest@127.0.0.1:PORT/<vhost>`` (``/`` -> ``//``)."""
        path = "/" if vhost == "/" else urllib.parse.quote(vhost, safe="")
        return f"amqp://guest:guest@{LOCALHOST}:{self.port}/{path}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_dir(self) -> Path:
        if self.base is None:
            raise RuntimeError("RabbitMQServer is not started")
        return self.base / "log"

    def log_tail(self, lines: int = 60) -> str:
        if self.base is None:
            return ""
        parts = [_tail(self.base / "server-stdout.log", lines)]
        for p in sorted((self.base / "log").glob("*.log")):
            parts.append(f"--- {p.name}\n{_tail(p, lines)}")
        return "\n".join(parts)

    # -- environment --------------------------------------------------------
    def _make_env(self, base: Path, home: Path) -> dict[str, str]:
        env = {
            k: v
            for k, v in self._base_env().items()
            if not k.startswith(("RABBITMQ_", "ERL_", "ELIXIR_"))
            and k not in ("HOME", "XDG_CONFIG_HOME", "LANG", "LC_ALL", "LC_CTYPE")
        }
        loopback_only = "-kernel inet_dist_use_interface {127,0,0,1}"
        ctl_dist = free_port()
        assert self._port is not None and self.dist_port is not None
        assert self.epmd_port is not None
        env.update(
            HOME=str(home),
            XDG_CONFIG_HOME=str(home / ".config"),
            LANG="C.UTF-8",
            LC_ALL="C.UTF-8",
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_NODE_IP_ADDRESS=LOCALHOST,
            RABBITMQ_NODE_PORT=str(self._port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS=LOCALHOST,
            RABBITMQ_MNESIA_BASE=str(base / "mnesia"),
            RABBITMQ_LOG_BASE=str(base / "log"),
            RABBITMQ_CONFIG_FILE=str(base / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(base / "advanced.config"),
            RABBITMQ_CONF_ENV_FILE=str(base / "rabbitmq-env.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(base / "enabled_plugins"),
            RABBITMQ_PLUGINS_EXPAND_DIR=str(base / "plugins-expand"),
            RABBITMQ_PID_FILE=str(base / "rabbit.pid"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=loopback_only,
            RABBITMQ_CTL_ERL_ARGS=loopback_only,
            RABBITMQ_CTL_DIST_PORT_MIN=str(ctl_dist),
            RABBITMQ_CTL_DIST_PORT_MAX=str(min(ctl_dist + 20, 65535)),
        )
        return env

    def _prepare_dirs(self, base: Path) -> Path:
        home = base / "home"
        for d in (home, base / "mnesia", base / "log", base / "plugins-expand"):
            d.mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        if cookie.exists():
            cookie.chmod(0o600)
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)  # Erlang refuses a cookie readable by others
        (base / "rabbitmq-env.conf").write_text("# private test node: no system defaults\n")
        (base / "enabled_plugins").write_text("[].\n")  # no plugins => no management
        (base / "rabbitmq.conf").write_text(
            "loopback_users.guest = true\n"
            "disk_free_limit.absolute = 1MB\n"
            "log.console = false\n"
            "log.file.level = info\n" + self.extra_config
        )
        return home

    # -- lifecycle ----------------------------------------------------------
    def start(self) -> RabbitMQServer:
        if self._proc is not None:
            raise RuntimeError("RabbitMQServer already started")
        server_script = _find_rabbit_script("rabbitmq-server")
        _find_rabbit_script("rabbitmqctl")
        epmd = shutil.which("epmd") or "/usr/lib/erlang/bin/epmd"
        last_error = ""
        for attempt in range(max(1, self.attempts)):
            t0 = time.monotonic()
            self._port, self.dist_port, self.epmd_port = free_port(), free_port(), free_port()
            base = self.tmp_dir / f"rabbitmq-{self.nodename.split('@')[0]}-{attempt}"
            base.mkdir(parents=True, exist_ok=True)
            self.base = base
            home = self._prepare_dirs(base)
            env = self._make_env(base, home)
            self._env = env
            _REGISTRY.add(self)
            try:
                self._start_epmd(epmd, env, base)
                self._proc = popen(
                    [server_script],
                    log_path=base / "server-stdout.log",
                    cwd=base,
                    env=env,
                    die_with_parent=self.die_with_parent,
                )
                self._wait_started(t0)
                self.startup_seconds = time.monotonic() - t0
                self._tree_snapshot = _descendants(_as_psutil(self._proc.pid))
                return self
            except ServerStartError as e:
                last_error = f"{e}\n{self.log_tail()}"
                self.stop()
            except BaseException:
                self.stop()
                raise
        raise ServerStartError(last_error)

    def _start_epmd(self, epmd: str, env: dict[str, str], base: Path) -> None:
        assert self.epmd_port is not None
        self._epmd = popen(
            [epmd, "-port", str(self.epmd_port), "-address", LOCALHOST],
            log_path=base / "epmd.log",
            cwd=base,
            env=env,
            die_with_parent=self.die_with_parent,
        )
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            if self._epmd.poll() is not None:
                raise ServerStartError(f"epmd exited early: {_tail(base / 'epmd.log')}")
            if _port_open(self.epmd_port):
                return
            time.sleep(0.02)
        raise ServerStartError("epmd did not start listening within 5s")

    def _wait_started(self, t0: float) -> None:
        assert self._proc is not None
        deadline = t0 + self.startup_timeout
        # 1) cheap: wait for the AMQP listener (opened late in the boot).
        while not _port_open(self.port, timeout=0.5):
            if self._proc.poll() is not None:
                raise ServerStartError(f"rabbitmq-server exited early with {self._proc.returncode}")
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"RabbitMQ did not open port {self.port} within {self.startup_timeout}s"
                )
            time.sleep(0.1)
        # 2) authoritative: the node says it has fully booted.
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServerStartError(
                    f"await_startup did not succeed within {self.startup_timeout}s"
                )
            try:
                self.ctl(
                    "await_startup", "--timeout", str(max(1, int(remaining))), timeout=remaining + 5
                )
                return
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
                if self._proc.poll() is not None:
                    raise ServerStartError(
                        f"rabbitmq-server exited with {self._proc.returncode}"
                    ) from None
                time.sleep(0.5)

    def stop(self) -> None:
        """Stop the node (``rabbitmqctl stop``), then the whole pid tree and our epmd."""
        proc, epmd = self._proc, self._epmd
        if proc is None and epmd is None:
            return
        t0 = time.monotonic()
        try:
            snapshot = list(self._tree_snapshot)
            if proc is not None:
                snapshot += _descendants(_as_psutil(proc.pid))
                if proc.poll() is None:
                    with contextlib.suppress(subprocess.SubprocessError, OSError):
                        self.ctl("stop", timeout=self.stop_timeout)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=self.stop_timeout)
                stop_process_tree(proc, timeout=5.0, extra=snapshot)
            if epmd is not None:
                stop_process_tree(epmd, timeout=5.0)
            # Anything that inherited our marker but escaped the tree
            # (e.g. an ``epmd -daemon`` re-parented to init).
            left = self._kill_marked()
            self.leftovers_after_stop = [p.pid for p in left]
        finally:
            self._proc = None
            self._epmd = None
            self._tree_snapshot = []
            self.stop_seconds = time.monotonic() - t0
            _REGISTRY.discard(self)

    def __enter__(self) -> RabbitMQServer:
        self.start()
        return self

    # -- management via rabbitmqctl ----------------------------------------
    def ctl(self, *args: str, timeout: float | None = None) -> str:
        """Run ``rabbitmqctl -n NODE *args`` against this node; return stdout.

        Raises :class:`subprocess.CalledProcessError` (with stderr) on failure.
        """
        if self._env is None or self.base is None:
            raise RuntimeError("RabbitMQServer is not started")
        cmd = [_find_rabbit_script("rabbitmqctl"), "-n", self.nodename, *args]
        res = subprocess.run(
            cmd,
            env=self._env,
            cwd=self.base,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=self.ctl_timeout if timeout is None else timeout,
            check=False,
        )
        if res.returncode != 0:
            raise subprocess.CalledProcessError(res.returncode, cmd, res.stdout, res.stderr)
        return res.stdout

    def add_vhost(self, name: str, *, user: str = "guest") -> None:
        """Create *name* and grant *user* full permissions on it."""
        self.ctl("add_vhost", name)
        self.ctl("set_permissions", "-p", name, user, ".*", ".*", ".*")

    def delete_vhost(self, name: str) -> None:
        self.ctl("delete_vhost", name)

    def set_vhost_max_connections(self, vhost: str, n: int) -> None:
        """``max-connections`` limit for *vhost* (``-1`` removes the limit)."""
        self.ctl("set_vhost_limits", "-p", vhost, json.dumps({"max-connections": n}))

    def list_connections(self, *fields: str) -> list[dict[str, object]]:
        """``rabbitmqctl list_connections FIELDS`` as a list of dicts."""
        items = fields or ("name", "vhost", "user", "state", "peer_host", "peer_port")
        out = self.ctl("list_connections", *items, "--quiet", "--formatter", "json")
        start = out.find("[")
        if start < 0:
            return []
        data = json.loads(out[start:])
        if not isinstance(data, list):
            raise ValueError(f"unexpected list_connections output: {out!r}")
        return [dict(d) for d in data if isinstance(d, dict)]

    def connection_count(self, vhost: str | None = None) -> int:
        """Number of client connections (on *vhost*, or on all vhosts)."""
        conns = self.list_connections("vhost")
        if vhost is None:
            return len(conns)
        return sum(1 for c in conns if c.get("vhost") == vhost)

"""Proves that the real-broker test infrastructure works (needs redis-server and
rabbitmq-server installed; runs in well under a minute)."""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from kombu.connection import Connection as KombuConnection

from .proxy import CountingProxy
from .proxy_process import ProxyProcess
from .servers import LOCALHOST, RabbitMQServer, RedisServer, free_port
from .waiting import wait_until

LOOPBACK = {"127.0.0.1", "::1"}


# ----------------------------------------------------------------- helpers
def listening_addresses(pid: int) -> set[str]:
    """IP addresses that *pid* and its descendants listen on."""
    root = psutil.Process(pid)
    addrs: set[str] = set()
    for p in [root, *root.children(recursive=True)]:
        try:
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    addrs.add(c.laddr.ip)
        except psutil.Error:
            continue
    return addrs


def gone(pid: int) -> bool:
    """The process no longer exists (or is a zombie waiting to be reaped)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def spawn_ready_child(code: str, timeout: float = 20.0) -> subprocess.Popen[bytes]:
    """Start ``python -c code``; wait (bounded) until it prints ``ready``."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    out = b""
    while b"ready" not in out:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or proc.poll() is not None:
            proc.kill()
            _, err = proc.communicate(timeout=5)
            raise AssertionError(f"child not ready: out={out!r} err={err!r}")
        r, _, _ = select.select([proc.stdout], [], [], remaining)
        if r:
            out += os.read(proc.stdout.fileno(), 1024)
    return proc


def sigkill(proc: subprocess.Popen[bytes]) -> None:
    os.kill(proc.pid, signal.SIGKILL)  # by pid, never by name
    proc.wait(timeout=10)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def kombu_connection(url: str) -> Any:
    """kombu is only partially typed: keep the ``Any`` in one place."""
    factory: Any = KombuConnection
    return factory(url, connect_timeout=5)


def resp_ping(sock: socket.socket) -> bytes:
    sock.sendall(b"*1\r\n$4\r\nPING\r\n")
    return sock.recv(64)


# ---------------------------------------------------------------- fixtures
@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path, maxclients=64) as server:
        yield server


@pytest.fixture(scope="module")
def rabbit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQServer]:
    server = RabbitMQServer(tmp_path_factory.mktemp("rabbit"))
    server.start()
    print(f"\nRabbitMQ private node started in {server.startup_seconds:.1f}s")
    try:
        yield server
    finally:
        server.stop()
        print(f"\nRabbitMQ private node stopped in {server.stop_seconds:.1f}s")
    assert server.leftovers_after_stop == []


# ------------------------------------------------------------------- misc
@pytest.mark.timeout(10)
def test_free_port_is_bindable_on_loopback() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind((LOCALHOST, port))


# ------------------------------------------------------------------ redis
@pytest.mark.redis
@pytest.mark.timeout(30)
def test_redis_start_count_stop(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    with server:
        pid, port = server.pid, server.port
        assert server.url == f"redis://127.0.0.1:{port}/0"
        assert psutil.pid_exists(pid)
        assert listening_addresses(pid) == {"127.0.0.1"}
        assert server.command("PING") == "PONG"
        assert server.client_count() == 0
        socks = [socket.create_connection((LOCALHOST, port)) for _ in range(3)]
        try:
            for s in socks:
                assert resp_ping(s) == b"+PONG\r\n"
            assert server.client_count() == 3
            assert all("addr" in c for c in server.client_list())
        finally:
            for s in socks:
                s.close()
        assert wait_until(lambda: server.client_count() == 0, 5)
        assert server.startup_seconds is not None and server.startup_seconds < 10
    assert gone(pid)
    with pytest.raises(OSError):
        socket.create_connection((LOCALHOST, port), timeout=1).close()
    assert server.leftover_processes() == []


@pytest.mark.redis
@pytest.mark.timeout(30)
def test_redis_kombu_roundtrip_through_proxy(redis: RedisServer) -> None:
    with CountingProxy((LOCALHOST, redis.port)) as proxy:
        url = proxy.url_for(redis.url)
        assert url == f"redis://127.0.0.1:{proxy.port}/0"
        with kombu_connection(url) as conn:
            queue = conn.SimpleQueue("support-redis-q")
            queue.put({"hello": "redis"})
            msg = queue.get(timeout=5)
            assert msg.payload == {"hello": "redis"}
            msg.ack()
            assert proxy.current >= 1
            # every proxied connection is exactly one redis client
            assert wait_until(lambda: redis.client_count() == proxy.current, 5)
            queue.close()
        assert proxy.wait_current(0, 5)
        assert wait_until(lambda: redis.client_count() == 0, 5)
        assert proxy.total_accepted >= 1


@pytest.mark.redis
@pytest.mark.timeout(30)
def test_proxy_exact_counting_and_history(redis: RedisServer) -> None:
    with CountingProxy((LOCALHOST, redis.port)) as proxy:
        socks = [socket.create_connection(proxy.address) for _ in range(5)]
        for s in socks:
            assert resp_ping(s) == b"+PONG\r\n"
        assert proxy.current == 5 and proxy.peak == 5
        assert redis.client_count() == 5
        for s in socks[:3]:
            s.close()
        assert proxy.wait_current(2, 5)
        assert wait_until(lambda: redis.client_count() == 2, 5)
        assert proxy.peak == 5
        proxy.reset_peak()
        assert proxy.peak == 2
        for s in socks[3:]:
            s.close()
        assert proxy.wait_current(0, 5)
        assert proxy.total_accepted == 5
        hist = proxy.history
        counts = [c for _, c in hist]
        times = [t for t, _ in hist]
        assert times == sorted(times)
        assert max(counts) == 5 and counts[-1] == 0
        assert all(abs(a - b) == 1 for a, b in itertools.pairwise(counts))


@pytest.mark.redis
@pytest.mark.timeout(30)
def test_proxy_max_connections_refuses(redis: RedisServer) -> None:
    with CountingProxy((LOCALHOST, redis.port), max_connections=2) as proxy:
        a = socket.create_connection(proxy.address)
        b = socket.create_connection(proxy.address)
        assert resp_ping(a) == b"+PONG\r\n" and resp_ping(b) == b"+PONG\r\n"
        c = socket.create_connection(proxy.address, timeout=5)
        assert c.recv(16) == b""  # accepted then closed at once
        c.close()
        assert proxy.refused == 1 and proxy.current == 2 and proxy.peak == 2
        a.close()
        assert proxy.wait_current(1, 5)
        d = socket.create_connection(proxy.address)  # room again
        assert resp_ping(d) == b"+PONG\r\n"
        assert proxy.refused == 1 and proxy.current == 2
        for s in (b, d):
            s.close()
        assert proxy.wait_current(0, 5)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A 127.0.0.1 listener that never accepts: an upstream for proxies that refuse."""
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        s.listen(16)
        yield s


def _refusals_seen_uncounted(address: tuple[str, int], refused: Callable[[], int],
                             rounds: int) -> list[int]:
    """Connect *rounds* times to a proxy that refuses everything; return the rounds in which
    the client had already seen the close while the proxy's ``refused`` was not counted."""
    late = []
    for i in range(1, rounds + 1):
        with socket.create_connection(address, timeout=5) as c:
            assert c.recv(16) == b""
            if refused() != i:
                late.append(i)
                assert wait_until(lambda i=i: refused() == i, 5)  # type: ignore[misc]
    return late


@pytest.mark.timeout(60)
def test_proxy_counts_a_refusal_before_closing_it(listener: socket.socket) -> None:
    # Before the fix the proxy closed first and counted after: about 7 % of the rounds
    # saw the EOF before the count (the close releases the GIL to the waiting client).
    with CountingProxy(listener.getsockname(), max_connections=0) as proxy:
        assert _refusals_seen_uncounted(proxy.address, lambda: proxy.refused, 500) == []
        assert proxy.total_accepted == 0 and proxy.peak == 0


@pytest.mark.timeout(60)
def test_proxy_process_counts_a_refusal_before_closing_it(listener: socket.socket) -> None:
    with ProxyProcess(listener.getsockname(), max_connections=0) as proxy:
        address = (proxy.host, proxy.port)
        assert _refusals_seen_uncounted(address, lambda: proxy.refused, 300) == []
        assert proxy.total_accepted == 0 and proxy.peak == 0


@pytest.mark.timeout(60)
def test_proxy_uncounts_before_closing(listener: socket.socket) -> None:
    # A connection the proxy closes itself (its upstream accepted and then reset) must be
    # uncounted by the time its client sees the close.
    with CountingProxy(listener.getsockname(), connect_timeout=5) as proxy:
        for _ in range(200):
            with socket.create_connection(proxy.address, timeout=5) as c:
                up, _ = listener.accept()
                up.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                up.close()  # RST: the proxy drops both sides
                with contextlib.suppress(ConnectionResetError):
                    assert c.recv(16) == b""
                assert proxy.current == 0, proxy.history[-4:]


@pytest.mark.redis
@pytest.mark.timeout(30)
def test_proxy_upstream_down_and_drop_all(redis: RedisServer) -> None:
    dead = free_port()
    with CountingProxy((LOCALHOST, dead)) as proxy:
        s = socket.create_connection(proxy.address, timeout=5)
        assert s.recv(16) == b""
        s.close()
        assert proxy.wait_current(0, 5) and proxy.upstream_failures == 1
    with CountingProxy((LOCALHOST, redis.port)) as proxy:
        socks = [socket.create_connection(proxy.address, timeout=5) for _ in range(2)]
        for s in socks:
            resp_ping(s)
        assert proxy.drop_all() == 2
        assert proxy.current == 0
        for s in socks:
            with pytest.raises(OSError):
                resp_ping(s)
                resp_ping(s)
            s.close()
        assert wait_until(lambda: redis.client_count() == 0, 5)


@pytest.mark.redis
@pytest.mark.timeout(30)
def test_sigkilled_child_is_decremented_before_next_accept(redis: RedisServer) -> None:
    threads_before = set(threading.enumerate())
    with CountingProxy((LOCALHOST, redis.port)) as proxy:
        code = (
            "import socket, time\n"
            f"s = socket.create_connection(('127.0.0.1', {proxy.port}))\n"
            "s.sendall(b'*1\\r\\n$4\\r\\nPING\\r\\n'); assert s.recv(64) == b'+PONG\\r\\n'\n"
            "print('ready', flush=True)\n"
            "time.sleep(120)\n"
        )
        child = spawn_ready_child(code)
        try:
            assert proxy.current == 1 and redis.client_count() == 1
        finally:
            sigkill(child)
        # Connect right away: the hang-up must be processed before this accept.
        s = socket.create_connection(proxy.address)
        try:
            assert resp_ping(s) == b"+PONG\r\n"
            assert proxy.wait_current(1, 5)
            assert proxy.peak == 1, proxy.history
            assert wait_until(lambda: redis.client_count() == 1, 5)
        finally:
            s.close()
        assert proxy.wait_current(0, 5)
    # close() leaves no thread behind
    assert set(threading.enumerate()) <= threads_before


@pytest.mark.redis
@pytest.mark.timeout(30)
def test_redis_dies_with_sigkilled_owner(tmp_path: Path) -> None:
    """PDEATHSIG: a server outlives no test process that was SIGKILLed."""
    tests_dir = Path(__file__).resolve().parent.parent
    code = (
        "import sys, time\n"
        f"sys.path.insert(0, {str(tests_dir)!r})\n"
        "from support.servers import RedisServer\n"
        f"r = RedisServer({str(tmp_path)!r}).start()\n"
        "print('ready', r.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE
    )
    assert owner.stdout is not None
    try:
        line = owner.stdout.readline().split()
        assert line[:1] == [b"ready"], line
        redis_pid = int(line[1])
        assert psutil.Process(redis_pid).ppid() == owner.pid
    finally:
        sigkill(owner)
    assert wait_until(lambda: gone(redis_pid), 10)


# --------------------------------------------------------------- rabbitmq
@pytest.mark.rabbitmq
@pytest.mark.timeout(120)
def test_rabbit_private_node(rabbit: RabbitMQServer) -> None:
    assert rabbit.running
    assert rabbit.url == f"amqp://guest:guest@127.0.0.1:{rabbit.port}//"
    assert rabbit.nodename.startswith("mppools-test-") and rabbit.nodename.endswith("@localhost")
    assert rabbit.startup_seconds is not None and rabbit.startup_seconds < 60
    # everything we started listens on loopback only (epmd adds [::1])
    assert listening_addresses(rabbit.pid) == {"127.0.0.1"}
    assert rabbit.epmd_pid is not None
    assert listening_addresses(rabbit.epmd_pid) <= LOOPBACK
    assert rabbit.base is not None
    cookie = rabbit.base / "home" / ".erlang.cookie"
    assert cookie.stat().st_mode & 0o777 == 0o400
    assert rabbit.beam_pid is not None
    # the node runs with OUR environment (private HOME / nodename)
    env = psutil.Process(rabbit.beam_pid).environ()
    assert env["HOME"] == str(rabbit.base / "home")
    assert env["RABBITMQ_NODENAME"] == rabbit.nodename
    assert "rabbit" in rabbit.ctl("status")


@pytest.mark.rabbitmq
@pytest.mark.timeout(120)
def test_rabbit_kombu_roundtrip_through_proxy(rabbit: RabbitMQServer) -> None:
    with CountingProxy((LOCALHOST, rabbit.port)) as proxy:
        url = proxy.url_for(rabbit.url)
        assert url == f"amqp://guest:guest@127.0.0.1:{proxy.port}//"
        with kombu_connection(url) as conn:
            queue = conn.SimpleQueue("support-amqp-q")
            queue.put({"hello": "rabbit"})
            msg = queue.get(timeout=5)
            assert msg.payload == {"hello": "rabbit"}
            msg.ack()
            assert proxy.current == 1
            assert rabbit.connection_count() == 1
            queue.close()
        assert proxy.wait_current(0, 5)
        assert wait_until(lambda: rabbit.connection_count() == 0, 15, interval=0.2)


@pytest.mark.rabbitmq
@pytest.mark.timeout(120)
def test_rabbit_peak_with_several_kombu_connections(rabbit: RabbitMQServer) -> None:
    rabbit.add_vhost("peak")
    with CountingProxy((LOCALHOST, rabbit.port)) as proxy:
        url = proxy.url_for(rabbit.url_for_vhost("peak"))
        conns = [kombu_connection(url) for _ in range(3)]
        try:
            for c in conns:
                c.connect()
            assert proxy.current == 3 and proxy.peak == 3
            listed = rabbit.list_connections("vhost", "peer_port")
            assert len(listed) == 3 and {c["vhost"] for c in listed} == {"peak"}
            assert rabbit.connection_count("peak") == 3
            assert rabbit.connection_count("/") == 0
        finally:
            for c in conns:
                c.release()
        assert proxy.wait_current(0, 5)
        assert proxy.peak == 3 and proxy.total_accepted == 3
        assert wait_until(lambda: rabbit.connection_count("peak") == 0, 15, interval=0.2)


@pytest.mark.rabbitmq
@pytest.mark.timeout(120)
def test_rabbit_vhost_connection_limit(rabbit: RabbitMQServer) -> None:
    rabbit.add_vhost("limited")
    rabbit.set_vhost_max_connections("limited", 1)
    url = rabbit.url_for_vhost("limited")
    first = kombu_connection(url)
    second = kombu_connection(url)
    try:
        first.connect()
        with pytest.raises(Exception, match=r"(?i)limit|refused|access"):
            second.connect()
        assert rabbit.connection_count("limited") == 1
    finally:
        second.release()
        first.release()


@pytest.mark.rabbitmq
@pytest.mark.timeout(120)
def test_rabbit_sigkilled_kombu_child_is_decremented(rabbit: RabbitMQServer) -> None:
    with CountingProxy((LOCALHOST, rabbit.port)) as proxy:
        code = (
            "import time\n"
            "from kombu import Connection\n"
            f"c = Connection({proxy.url_for(rabbit.url)!r}, connect_timeout=5)\n"
            "c.connect()\n"
            "print('ready', flush=True)\n"
            "time.sleep(120)\n"
        )
        child = spawn_ready_child(code)
        try:
            assert proxy.current == 1
            assert rabbit.connection_count() == 1
        finally:
            sigkill(child)
        assert proxy.wait_current(0, 5), proxy.history
        assert wait_until(lambda: rabbit.connection_count() == 0, 15, interval=0.2)


@pytest.mark.rabbitmq
@pytest.mark.timeout(120)
def test_rabbit_second_node_full_lifecycle(tmp_path: Path, rabbit: RabbitMQServer) -> None:
    """Two private nodes side by side; stopping one leaves no process behind."""
    node = RabbitMQServer(tmp_path)
    with node:
        assert node.nodename != rabbit.nodename and node.port != rabbit.port
        pids = [node.pid, node.epmd_pid]
        pids += [p.pid for p in psutil.Process(node.pid).children(recursive=True)]
        assert node.beam_pid in pids
        assert node.connection_count() == 0
    assert node.leftovers_after_stop == [] and node.leftover_processes() == []
    for pid in pids:
        assert pid is not None
        assert gone(pid)
    # the other node is unaffected
    assert "rabbit" in rabbit.ctl("status")
    print(f"\nsecond node: start {node.startup_seconds:.1f}s, stop {node.stop_seconds:.1f}s")

"""The cross-host backend (``backend="redis://..."``) against real redis-servers.

Its behaviour as a limiter on one host is in test_backends_common.py (the "redis" entry of
BACKENDS); here: several hosts, each a process tree in its own mount and pid namespaces with
a private /dev/shm (tests/support/hosts.py), sharing one budget through one Redis; a host
killed whole; the coordination server gone.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from forkutil import run_in_child
from support.hosts import Host, intervals_peak
from support.servers import RedisServer
from support.waiting import wait_until

import mppools
from mppools import CoordinationError
from mppools._errors import LimitExceeded
from mppools._limiter import posix

pytestmark = pytest.mark.timeout(120)

TTL = 2.0


def _spec(server: Any, ttl: float = TTL) -> str:
    return f"{server.url}?lease_ttl={ttl}&fresh=1"


def test_hosts_share_no_posix_objects(hosts: list[Host], redis_server: Any,
                                      budget_name: str) -> None:
    a, b = Host(), Host()
    hosts += [a, b]
    spec = _spec(redis_server)
    a.call(f"configure {budget_name} 2 {spec}")
    b.call(f"configure {budget_name} 2 {spec}")  # would join a's local budget if shared
    assert not posix.exists(budget_name)  # in this (the root) namespace
    assert a.call("stats").split()[:2] == ["OK", "2"]


def test_the_limit_holds_across_two_hosts(hosts: list[Host], redis_server: Any,
                                          budget_name: str, tmp_path: Path) -> None:
    limit, per_host, rounds = 3, 3, 25
    spec = _spec(redis_server)
    for _ in range(2):
        host = Host()
        hosts.append(host)
        host.call(f"configure {budget_name} {limit} {spec}")
        host.call(f"workers {per_host}")
    logs = []
    for h, host in enumerate(hosts):
        for w in range(per_host):
            log = tmp_path / f"h{h}w{w}.log"
            logs.append(log)
            host.call(f"wsend {w} churn {rounds} 60 0.01 {log}")
    per_host_got = []
    for host in hosts:
        got = 0
        for w in range(per_host):
            answer = host.call(f"wget {w}", timeout=100).split()
            assert answer[0] == "OK" and answer[2] == "0", answer  # nobody timed out
            got += int(answer[1])
        per_host_got.append(got)
    peak, intervals = intervals_peak(logs)
    assert intervals == 2 * per_host * rounds
    assert 1 <= peak <= limit, f"{peak} holders at once with limit {limit}"
    assert per_host_got == [per_host * rounds] * 2  # both hosts got their turns


def test_broker_connections_across_two_hosts_never_exceed_the_limit(
        hosts: list[Host], redis_server: Any, budget_name: str) -> None:
    # the broker is the same redis-server (db 1) behind a counting proxy in its own process
    from kombu import Connection, Exchange, Queue
    from support.proxy_process import ProxyProcess

    limit, per_host, each = 3, 3, 20
    queue = f"q-{budget_name}"
    broker = redis_server.url.rsplit("/", 1)[0] + "/1"
    with ProxyProcess(("127.0.0.1", redis_server.port)) as proxy:
        url = proxy.url_for(broker)
        for _ in range(2):
            host = Host()
            hosts.append(host)
            host.call(f"configure {budget_name} {limit} {_spec(redis_server)}")
            host.call(f"workers {per_host}")
        for host in hosts:
            for w in range(per_host):
                host.call(f"wsend {w} publish {each} {url} {queue}")
        for host in hosts:
            for w in range(per_host):
                assert host.call(f"wget {w}", timeout=100) == f"OK {each}"
        stats = proxy.ask("stats")
    assert stats["total_accepted"] > limit  # the connections did churn
    assert stats["peak"] <= limit, proxy.history
    with Connection(broker) as c:
        q = Queue(queue, Exchange(queue), routing_key=queue)(c.default_channel)
        q.declare()
        assert int(q.queue_declare(passive=True).message_count) == 2 * per_host * each


def test_idle_connections_of_one_host_are_yielded_to_another_that_waits(
        hosts: list[Host], redis_server: Any, budget_name: str) -> None:
    broker = redis_server.url.rsplit("/", 1)[0] + "/1"
    queue = f"q-{budget_name}"
    a, b = Host(), Host()
    hosts += [a, b]
    a.call(f"configure {budget_name} 2 {_spec(redis_server)}")
    a.call("workers 2")
    for w in range(2):  # one publish each: each worker keeps its connection idle, pooled
        assert a.call(f"w {w} publish 1 {broker} {queue}") == "OK 1"
    assert a.call("stats").split()[2] == "2"
    b.call(f"configure {budget_name} 2 {_spec(redis_server)}")
    b.call("workers 1")
    answer = b.call("w 0 acquire 30", timeout=60).split()
    assert answer[0] == "GOT", answer
    print(f"\nan idle connection on host a was yielded to host b in {float(answer[1]):.3f} s")
    assert a.call("stats").split()[2] == "1"  # a closed one of its idle connections


def test_resize_applies_on_every_host(hosts: list[Host], redis_server: Any,
                                      budget_name: str, tmp_path: Path) -> None:
    a, b = Host(), Host()
    hosts += [a, b]
    for host in (a, b):
        host.call(f"configure {budget_name} 2 {_spec(redis_server)}")
        host.call("workers 2")
    for w in range(2):
        assert a.call(f"w {w} acquire 10").startswith("GOT")
    assert b.call("stats").split()[3] == "0"  # b holds no lease
    b.call("resize 3")  # grows for everybody: b's master borrows the new lease at once
    assert b.call("w 0 acquire 0").startswith("GOT")
    b.call("resize 2 force")  # three held: the hosts pay the debt back between them
    # every host's master notices within its next look at the server (0.1 s)
    assert wait_until(lambda: sum(int(h.call("stats").split()[3]) for h in (a, b)) <= 2,
                      10, 0.01, what="the hosts' local limits add up to the new limit")
    # each host churns with the slots it holds, so nobody waits: only the debt shrinks them
    logs = [tmp_path / f"{n}.log" for n in ("a0", "a1", "b0")]
    a.call("w 0 release")
    a.call(f"wsend 0 churn 30 60 0.01 {logs[0]}")
    a.call("w 1 release")
    a.call(f"wsend 1 churn 30 60 0.01 {logs[1]}")
    b.call("w 0 release")
    b.call(f"wsend 0 churn 30 60 0.01 {logs[2]}")
    for host, workers in ((a, 2), (b, 1)):
        for w in range(workers):
            assert host.call(f"wget {w}", timeout=100).split()[:3] == ["OK", "30", "0"]
    peak, intervals = intervals_peak(logs)
    assert intervals == 90 and peak <= 2, f"{peak} holders at once after shrinking to 2"
    assert a.call("stats").split()[1] == "2"


def test_a_killed_host_gives_its_leases_back_within_the_ttl(
        hosts: list[Host], redis_server: Any, budget_name: str) -> None:
    spec = _spec(redis_server)
    a, b = Host(), Host()
    hosts += [a, b]
    a.call(f"configure {budget_name} 2 {spec}")
    a.call("workers 2")
    for w in range(2):
        assert a.call(f"w {w} acquire 10").startswith("GOT")
    b.call(f"configure {budget_name} 2 {spec}")
    b.call("workers 1")
    assert b.call("w 0 acquire 0.3").startswith("EXCEEDED")  # a holds both leases
    b.call("wsend 0 acquire 60")
    killed = time.monotonic()
    a.kill()
    answer = b.call("wget 0", timeout=90)
    reclaimed = time.monotonic() - killed
    assert answer.startswith("GOT"), answer
    print(f"\nhost killed whole: its lease reached the other host after {reclaimed:.2f} s "
          f"(lease ttl {TTL} s)")
    assert reclaimed < 20 * TTL  # a correctness bound: it came back, through expiry


class PausableProxy(threading.Thread):
    """A TCP forwarder to ``upstream`` that can stop forwarding (a network partition: the
    connections stay open, nothing gets through)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__(daemon=True)
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.paused = threading.Event()
        self.stopped = threading.Event()
        self.start()

    def run(self) -> None:
        peers: dict[socket.socket, socket.socket] = {}
        try:
            while not self.stopped.is_set():
                readable = [self.listener] + ([] if self.paused.is_set() else list(peers))
                ready, _, _ = select.select(readable, [], [], 0.01)
                for sock in ready:
                    if sock is self.listener:
                        client, _ = self.listener.accept()
                        up = socket.create_connection(self.upstream)
                        peers[client], peers[up] = up, client
                        continue
                    if sock not in peers:
                        continue
                    try:
                        data = sock.recv(65536)
                    except OSError:
                        data = b""
                    if data:
                        with contextlib.suppress(OSError):
                            peers[sock].sendall(data)
                        continue
                    other = peers.pop(sock)
                    peers.pop(other, None)
                    sock.close()
                    other.close()
        finally:
            for sock in peers:
                sock.close()
            self.listener.close()

    def stop(self) -> None:
        self.stopped.set()
        self.join(5)


def test_a_partitioned_host_fences_before_its_leases_can_go_elsewhere(
        hosts: list[Host], redis_server: Any, budget_name: str) -> None:
    proxy = PausableProxy(("127.0.0.1", redis_server.port))
    try:
        a, b = Host(), Host()
        hosts += [a, b]
        a.call(f"configure {budget_name} 2 redis://127.0.0.1:{proxy.port}/0"
               f"?lease_ttl={TTL}&fresh=1")
        a.call("workers 2")
        for w in range(2):
            assert a.call(f"w {w} acquire 10").startswith("GOT")
        b.call(f"configure {budget_name} 2 {_spec(redis_server)}")
        b.call("workers 1")
        b.call("wsend 0 acquire 60")
        proxy.paused.set()  # host a can no longer renew; b still reaches redis
        answer = b.call("wget 0", timeout=90).split()
        assert answer[0] == "GOT", answer
        granted_by = int(answer[2])
        fenced_at = int(a.call("stats", timeout=30).split()[4])
        assert fenced_at != -1, "host a never fenced"
        # the slot reached b only once a had stopped handing out slots under its leases
        assert fenced_at < granted_by, (
            f"host a fenced {(fenced_at - granted_by) / 1e9:.3f} s after b got the slot")
    finally:
        proxy.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server the test may stop."""
    with RedisServer(tmp_path / "redis") as server:
        yield server


def test_the_limit_holds_while_the_server_is_stopped_for_longer_than_the_ttl(
        hosts: list[Host], own_redis: RedisServer, budget_name: str, tmp_path: Path) -> None:
    limit, per_host, rounds = 2, 2, 40
    spec = _spec(own_redis)
    logs = []
    for h in range(2):
        host = Host()
        hosts.append(host)
        host.call(f"configure {budget_name} {limit} {spec}")
        host.call(f"workers {per_host}")
        for w in range(per_host):
            logs.append(tmp_path / f"h{h}w{w}.log")
            host.call(f"wsend {w} churn {rounds} 60 0.01 {logs[-1]}")
    assert wait_until(lambda: intervals_peak(logs)[1] >= 10, 30, 0.01, what="churn started")
    os.kill(own_redis.pid, signal.SIGSTOP)
    try:
        time.sleep(1.5 * TTL)  # every lease expires meanwhile (in the server's clock)
    finally:
        os.kill(own_redis.pid, signal.SIGCONT)
    for host in hosts:
        for w in range(per_host):
            answer = host.call(f"wget {w}", timeout=100).split()
            assert answer[:3] == ["OK", str(rounds), "0"], answer
    peak, intervals = intervals_peak(logs)
    assert intervals == 2 * per_host * rounds
    assert peak <= limit, f"{peak} holders at once with limit {limit}"


def test_an_unreachable_server_fails_closed_and_fences(own_redis: RedisServer,
                                                       budget_name: str) -> None:
    limiter = mppools.configure(2, name=budget_name, backend=_spec(own_redis, 1.0),
                                idle_timeout=None)
    held = limiter.acquire(timeout=5)
    server = f"127.0.0.1:{own_redis.port}"
    own_redis.stop()

    def child() -> tuple[str, str]:
        try:
            limiter.release(limiter.acquire(timeout=0.5))
        except LimitExceeded as exc:
            return type(exc).__name__, str(exc)
        return "got", ""

    # the master fences at its deadline: no slot is handed out under unrenewed leases
    assert wait_until(lambda: limiter.in_debt(), 10, 0.01, what="the host fenced")
    kind, message = run_in_child(child)
    assert kind == "CoordinationError" and server in message, message
    with pytest.raises(CoordinationError) as info:
        limiter.acquire(timeout=0.3)
    assert server in str(info.value) and info.value.server
    assert isinstance(info.value, LimitExceeded)
    limiter.release(held)  # pays the debt: nothing left open under the lost leases
    assert not limiter.in_debt() and limiter.stats().in_use == 0


def test_configure_fails_closed_when_the_server_is_unreachable(budget_name: str) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens there once closed
    with pytest.raises(CoordinationError) as info:
        mppools.configure(2, name=budget_name, backend=f"redis://127.0.0.1:{port}/0")
    assert f"127.0.0.1:{port}" in str(info.value)
    assert mppools._config.current() is None
    assert not posix.exists(budget_name)


def test_bad_backend_options_are_refused(budget_name: str) -> None:
    with pytest.raises(mppools.ConfigurationError, match="lease_ttl"):
        mppools.configure(2, name=budget_name, backend="redis://127.0.0.1:1/0?lease_ttl=x")
    with pytest.raises(mppools.ConfigurationError, match="fresh"):
        mppools.configure(2, name=budget_name, backend="redis://127.0.0.1:1/0?fresh=yes")


def test_a_server_that_lost_its_data_keeps_what_the_live_host_holds(
        own_redis: RedisServer, budget_name: str) -> None:
    limiter = mppools.configure(2, name=budget_name, backend=_spec(own_redis, 1.0),
                                idle_timeout=None)
    held = limiter.acquire(timeout=5)
    before = limiter.stats().extra["generation"]
    own_redis.command("FLUSHALL")  # a restart without persistence, as far as leases go
    assert wait_until(lambda: limiter.stats().extra.get("generation") not in ("", before),
                      10, 0.01, what="the host re-registered in a new generation")
    stats = limiter.stats()
    assert stats.extra["leases_in_use"] >= 1  # the open connection's lease was declared
    assert not limiter.in_debt() and stats.in_use == 1
    limiter.release(held)


def test_the_integrations_take_the_backend_from_the_environment(
        redis_server: Any, budget_name: str) -> None:
    from mppools.integrations import settings_from_env

    limit, name, kwargs = settings_from_env(environ={
        "MPPOOLS_LIMIT": "2", "MPPOOLS_NAME": budget_name,
        "MPPOOLS_BACKEND": _spec(redis_server)})
    assert limit == 2 and name == budget_name
    limiter = mppools.configure(limit, name=name, **kwargs)
    assert limiter.backend == "redis" and mppools.stats().extra["coordination"] == "ok"


def test_a_new_budget_grants_only_after_its_grace_period(own_redis: RedisServer,
                                                         budget_name: str) -> None:
    # without fresh=1 a created budget cannot tell a new server from one that lost its
    # data: it grants nothing for one TTL, then the lease keeper borrows for the waiter
    limiter = mppools.configure(1, name=budget_name,
                                backend=f"{own_redis.url}?lease_ttl=1", idle_timeout=None)
    assert limiter.stats().extra["grace_left"] > 0
    with pytest.raises(LimitExceeded):
        limiter.acquire(block=False)
    limiter.release(limiter.acquire(timeout=20))  # a bound far above the 1 s grace
    assert limiter.stats().extra["grace_left"] == 0


def test_more_hosts_than_leases_take_turns(hosts: list[Host], redis_server: Any,
                                           budget_name: str, tmp_path: Path) -> None:
    # limit 2, three hosts that all want leases: a fair share is below one lease, so the
    # hosts that hold one must hand it on in turns (before: each held its "share" of one
    # and the third host waited for as long as the others kept working)
    limit, spec, stop = 2, _spec(redis_server), tmp_path / "stop"
    logs = []
    for h in range(2):
        host = Host()
        hosts.append(host)
        host.call(f"configure {budget_name} {limit} {spec}")
        host.call("workers 2")
        for w in range(2):
            logs.append(tmp_path / f"h{h}w{w}.log")
            host.call(f"wsend {w} churn 100000 60 0.01 {logs[-1]} {stop}")
    a, b = hosts
    assert wait_until(lambda: all(int(h.call("stats").split()[3]) >= 1 for h in (a, b)),
                      20, 0.02, what="both hosts hold a lease")
    c = Host()
    hosts.append(c)
    c.call(f"configure {budget_name} {limit} {spec}")
    c.call("workers 1")
    try:
        answer = c.call("w 0 acquire 8", timeout=30).split()
    finally:
        stop.touch()
    assert answer[0] == "GOT", answer
    print(f"\nthe third host got its turn after {float(answer[1]):.2f} s")
    c.call("w 0 release")
    for host in (a, b):
        for w in range(2):
            assert host.call(f"wget {w}", timeout=60).split()[0] == "OK"
    peak, _ = intervals_peak(logs)
    assert peak <= limit


def test_a_host_whose_leases_lapse_while_the_server_is_stopped_fences_in_time(
        hosts: list[Host], own_redis: RedisServer, budget_name: str, tmp_path: Path) -> None:
    # host a holds every lease and churns on them; host b holds none and starts waiting
    # while the server is frozen for longer than the TTL. At the thaw the server drops a's
    # leases and grants them to b at once; a learns of it only at its next call. Only a's
    # fencing (before the deadline, during the freeze) keeps a from handing out slots b
    # now holds (without it: 3 and 4 holders at once with limit 2)
    limit, spec, stop = 2, _spec(own_redis), tmp_path / "stop"
    a, b = Host(), Host()
    hosts += [a, b]
    logs = [tmp_path / f"a{w}.log" for w in range(2)] + [tmp_path / f"b{w}.log"
                                                         for w in range(2)]
    a.call(f"configure {budget_name} {limit} {spec}")
    a.call("workers 2")
    for w in range(2):
        a.call(f"wsend {w} churn 100000 60 0.005 {logs[w]} {stop}")
    b.call(f"configure {budget_name} {limit} {spec}")
    b.call("workers 2")
    assert wait_until(lambda: intervals_peak(logs)[1] >= 20, 30, 0.01, what="a churns")
    assert b.call("stats").split()[3] == "0"  # b holds nothing, wants nothing
    os.kill(own_redis.pid, signal.SIGSTOP)
    try:
        time.sleep(TTL + 0.5)  # a's leases expire in the server's clock meanwhile
        for w in range(2):
            b.call(f"wsend {w} churn 100000 60 0.005 {logs[2 + w]} {stop}")
        time.sleep(0.2)  # b's master asks; its call waits for the server
    finally:
        os.kill(own_redis.pid, signal.SIGCONT)
    assert wait_until(lambda: intervals_peak(logs[2:])[1] >= 20, 30, 0.01, what="b churns")
    time.sleep(1.0)
    stop.touch()
    for host in (a, b):
        for w in range(2):
            assert host.call(f"wget {w}", timeout=60).split()[0] == "OK"
    peak, intervals = intervals_peak(logs)
    print(f"\n{intervals} holdings on two hosts, at most {peak} at once (limit {limit})")
    assert peak <= limit, f"{peak} holders at once with limit {limit}"
    assert int(a.call("stats").split()[4]) != -1  # a fenced


def test_an_idle_lease_keeper_sleeps_and_a_waiter_wakes_it(redis_server: Any,
                                                          budget_name: str) -> None:
    # the lease keeper used to look for local waiters 200 times a second; now it sleeps
    # until something is due (a renewal, a look at the other hosts while it holds leases,
    # at most 1 s) and a process that finds no free slot pokes it
    from mppools._limiter.redis import LeaseClient

    other = LeaseClient(redis_server.url, budget_name, "other-host", ttl=TTL, limit=1,
                        fresh=True)
    try:
        assert other.acquire(1, timeout=5) == 1  # the only lease: this host gets none
        limiter = mppools.configure(1, name=budget_name, backend=_spec(redis_server),
                                    idle_timeout=None)
        assert limiter.stats().extra["leases_held"] == 0
        before = limiter.stats().extra["keeper_wakes"]
        time.sleep(1.0)
        wakes = limiter.stats().extra["keeper_wakes"] - before
        assert isinstance(wakes, int) and wakes <= 5, f"{wakes} wake-ups in 1 s while idle"
        other.release(1)  # a free lease on the server; this host's keeper sleeps on
        t0 = time.monotonic()
        slot = limiter.acquire(timeout=5)
        took = time.monotonic() - t0
        print(f"\nidle lease keeper: {wakes} wake-ups in 1 s; a waiter's poke had a lease "
              f"borrowed in {took * 1000:.1f} ms")
        limiter.release(slot)
    finally:
        other.close()


def test_status_shows_the_budget_across_hosts(hosts: list[Host], redis_server: Any,
                                              budget_name: str, tmp_path: Path) -> None:
    # `mppools status` on a host of a cross-host budget: the limit across hosts, per host
    # held / in use / idle / waiting / lease expiry, the coordination server and its health
    import json

    spec = _spec(redis_server)
    a, b = Host(), Host()
    hosts += [a, b]
    a.call(f"configure {budget_name} 3 {spec}")
    a.call("workers 3")
    for w in range(2):
        assert a.call(f"w {w} acquire 10").startswith("GOT")
    b.call(f"configure {budget_name} 3 {spec}")  # takes the third lease at once
    b.call("workers 2")
    assert b.call("w 0 acquire 10").startswith("GOT")
    b.call("wsend 1 acquire 30")  # waits: every lease is held
    # the figures are those of each host's last renewal (every ttl/3)
    out = tmp_path / "status.json"

    def figures() -> dict[str, Any]:
        assert a.call(f"cli {out} status {budget_name} --json") == "OK 0"
        return json.loads(out.read_text())

    assert wait_until(lambda: (len(figures()["cross_host"]["hosts"]) == 2 and all(
        h["in_use"] is not None for h in figures()["cross_host"]["hosts"])
        and figures()["cross_host"]["hosts"] and sum(
            h["waiting"] or 0 for h in figures()["cross_host"]["hosts"]) == 1),
        20, 0.1, what="both hosts reported their figures")
    data = figures()
    cross = data["cross_host"]
    assert data["limit"] == 3 and data["in_use"] == 2 and data["backend"] == "redis"
    assert cross["healthy"] and str(redis_server.port) in cross["server"]
    assert cross["leases_in_use"] == 3
    by_held = sorted(cross["hosts"], key=lambda h: -h["held"])
    assert [h["held"] for h in by_held] == [2, 1]
    assert [h["in_use"] for h in by_held] == [2, 1]
    assert [h["waiting"] for h in by_held] == [0, 1]
    assert all(0 < h["expires_in"] <= TTL for h in by_held)
    assert a.call(f"cli {out} status {budget_name}") == "OK 0"
    text = out.read_text()
    print("\n" + text)
    assert "across hosts via" in text and "ok" in text and "LEASE EXPIRES IN" in text
    assert "(this host)" in text
    assert a.call(f"cli {out} status") == "OK 0"
    assert "coordination ok" in out.read_text()
    b.call("wget 1")


def test_status_names_a_failing_coordination_server(own_redis: RedisServer,
                                                    budget_name: str) -> None:
    import json
    import subprocess
    import sys

    from support.lineproc import repo_env

    mppools.configure(2, name=budget_name, backend=_spec(own_redis), idle_timeout=None)
    server = f"127.0.0.1:{own_redis.port}"
    own_redis.stop()
    run = subprocess.run([sys.executable, "-m", "mppools", "status", budget_name, "--json"],
                         capture_output=True, text=True, timeout=60, env=repo_env(),
                         check=False)
    assert run.returncode == 0, run.stderr
    cross = json.loads(run.stdout)["cross_host"]
    assert not cross["healthy"] and server in cross["server"] and server in cross["health"]
    text = subprocess.run([sys.executable, "-m", "mppools", "status", budget_name],
                          capture_output=True, text=True, timeout=60, env=repo_env(),
                          check=False).stdout
    assert "FAILING" in text and server in text, text


def _master_pid(host: Host) -> int:
    """The host's master, seen from here (unshare forks it: its only child)."""
    import psutil

    children = psutil.Process(host.proc.pid).children()
    assert len(children) == 1, children
    return int(children[0].pid)


def test_a_stopped_master_is_fenced_by_its_watchdog(hosts: list[Host], redis_server: Any,
                                                    budget_name: str) -> None:
    # host a's master is SIGSTOPped past the TTL while its worker keeps an idle pooled
    # broker connection: the master can neither renew nor fence; its lease expires and
    # host b is granted it. Without the watchdog a's worker kept its connection open and
    # the proxy counted 2 broker connections with limit 1
    from support.proxy_process import ProxyProcess

    queue = f"q-{budget_name}"
    broker = redis_server.url.rsplit("/", 1)[0] + "/1"
    with ProxyProcess(("127.0.0.1", redis_server.port)) as proxy:
        url = proxy.url_for(broker)
        a, b = Host(), Host()
        hosts += [a, b]
        a.call(f"configure {budget_name} 1 {_spec(redis_server)}")
        a.call("workers 1")
        assert a.call(f"w 0 publish 1 {url} {queue}") == "OK 1"  # pooled, idle, open
        b.call(f"configure {budget_name} 1 {_spec(redis_server)}")
        b.call("workers 1")
        assert proxy.ask("stats")["current"] == 1
        master = _master_pid(a)
        os.kill(master, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            b.call(f"wsend 0 publish 1 {url} {queue}")
            answer = b.call("wget 0", timeout=60)
            took = time.monotonic() - t0
            stats = proxy.ask("stats")
        finally:
            os.kill(master, signal.SIGCONT)
    print(f"\na stopped master's lease reached the other host after {took:.2f} s "
          f"(ttl {TTL} s); proxy peak {stats['peak']}")
    assert answer == "OK 1", answer
    assert stats["peak"] <= 1, f"{stats['peak']} broker connections at once with limit 1"


#: a worker body for _master_with_worker: it takes a pooled connection, says it is ready,
#: then keeps acquiring and using one (for up to 80 s)
_KEEPS_USING_A_POOLED_CONNECTION = (
    "    pool = mppools.connections[Connection('memory://')]\n"
    "    c = pool.acquire(block=True, timeout=5); c.connect(); c.release()\n"
    "    os.write(w, b'x')\n"
    "    end = time.monotonic() + 80\n"
    "    while time.monotonic() < end:\n"
    "        try:\n"
    "            c = pool.acquire(block=True, timeout=0.2)\n"
    "        except mppools.LimitExceeded:\n"
    "            continue\n"
    "        c.connect(); c.release(); time.sleep(0.005)\n")


@contextlib.contextmanager
def _master_with_worker(redis_server: Any, budget_name: str, worker_body: str,
                        seconds: int = 60, then: str = "") -> Iterator[tuple[Any, list[int]]]:
    """A master process (limit 2 across hosts) that forks one worker running
    ``worker_body`` (Python lines, indented by 4; it writes to the pipe ``w`` once ready);
    yields the master's Popen and [the worker's pid], and SIGKILLs both at the end (a test
    that killed the worker itself sets the pid to 0)."""
    import subprocess
    import sys

    from support.lineproc import repo_env

    script = (
        "import mppools, os, sys, time\n"
        "from kombu import Connection\n"
        f"lim = mppools.configure(2, name={budget_name!r}, backend={_spec(redis_server)!r},"
        " idle_timeout=None)\n"
        "r, w = os.pipe()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        f"{worker_body}"
        "    os._exit(0)\n"
        "os.read(r, 1)\n"
        "print(pid, flush=True)\n"
        f"{then}"
        f"time.sleep({seconds})\n")
    master = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              env=repo_env(), text=True)
    worker = [0]
    try:
        assert master.stdout is not None
        worker[0] = int(master.stdout.readline())
        yield master, worker
    finally:
        master.kill()
        master.wait(10)
        if worker[0]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker[0], signal.SIGKILL)


def test_a_dead_masters_workers_are_fenced_by_its_watchdog(redis_server: Any,
                                                           budget_name: str) -> None:
    # the master SIGKILLed while its worker lives and holds both slots: nobody renews, and
    # before the watchdog nobody fenced either (the local limit stayed at 2 leases while
    # they expired and went to other hosts). The watchdog fences at once; the master's own
    # slot (the plug) died with it, so the local limit of 1 still covers one of the
    # worker's slots: the other one is debt, closed at its next use
    body = ("    slots = [lim.acquire(timeout=5) for _ in range(2)]\n"
            "    os.write(w, b'x')\n"
            "    time.sleep(60)\n")
    with _master_with_worker(redis_server, budget_name, body) as (master, _):
        local = posix.PosixLimiter.open(budget_name, create=False)
        try:
            assert local.limit == 3  # 2 leases and the master's plug
            master.kill()
            master.wait(10)
            assert wait_until(lambda: local.limit == 1, 10, 0.01,
                              what="the dead master's host fenced")
            assert local.in_debt()  # one of the worker's slots: closed at its next use
        finally:
            local.close()


@pytest.mark.timeout(90)
def test_a_dead_masters_plug_is_held_by_its_watchdog(redis_server: Any,
                                                      budget_name: str) -> None:
    # the master SIGKILLed while its worker keeps using a pooled connection: the master's
    # plug slot dies with it, so a fence to the local limit of 1 alone would leave the
    # worker one connection for ever, with no lease behind it once the leases lapse (other
    # hosts take them). The watchdog takes that slot itself: the worker's connection is
    # handed on to it, and the worker gets no slot any more; once nobody else on this host
    # has the budget open, the watchdog lets go and exits
    body = _KEEPS_USING_A_POOLED_CONNECTION
    with _master_with_worker(redis_server, budget_name, body, seconds=80) as (master, w):
        worker = w[0]
        local = posix.PosixLimiter.open(budget_name, create=False)
        try:
            holders = {h.pid for h in local.stats().holders}
            assert worker in holders and master.pid in holders  # its slot, the plug
            master.kill()
            master.wait(10)

            def worker_holds() -> int:
                return sum(h.slots for h in local.stats().holders if h.pid == worker)

            assert wait_until(lambda: local.limit == 1 and worker_holds() == 0, 20, 0.01,
                              what="the worker's connection handed to the watchdog")
            (stand_in,) = [h.pid for h in local.stats().holders]
            assert stand_in not in (worker, master.pid)
            for _ in range(50):  # and it stays so while the worker keeps trying
                assert worker_holds() == 0
                time.sleep(0.01)
        finally:
            local.close()
        os.kill(worker, signal.SIGKILL)
        w[0] = 0
        # nobody else has the budget open: the watchdog lets go and exits
        assert wait_until(lambda: not os.path.exists(f"/proc/{stand_in}")
                          or open(f"/proc/{stand_in}/stat").read().split()[2] == "Z",
                          40, 0.05, what="the watchdog gone")


def test_a_connection_in_use_is_cut_before_its_lease_can_go_elsewhere(
        hosts: list[Host], redis_server: Any, budget_name: str) -> None:
    # limit 1 across hosts; host a's worker holds a broker connection checked out (in use,
    # never released) when a is partitioned from the coordination server. a fences before
    # its lease can expire; its idle connections would close at once, but this one is busy:
    # before, it stayed open until its release, and once the lease expired host b opened
    # its own: 2 broker connections with limit 1. Now a's keeper cuts its socket after a
    # short grace, before the lease can go to b
    from support.proxy_process import ProxyProcess

    broker = redis_server.url.rsplit("/", 1)[0] + "/1"
    coordination = PausableProxy(("127.0.0.1", redis_server.port))
    try:
        with ProxyProcess(("127.0.0.1", redis_server.port)) as counting:
            url = counting.url_for(broker)
            a, b = Host(), Host()
            hosts += [a, b]
            a.call(f"configure {budget_name} 1 redis://127.0.0.1:{coordination.port}/0"
                   f"?lease_ttl={TTL}&fresh=1")
            a.call("workers 1")
            assert a.call(f"w 0 connhold {url} 10").startswith("GOT")
            b.call(f"configure {budget_name} 1 {_spec(redis_server)}")
            b.call("workers 1")
            b.call(f"wsend 0 connhold {url} 60")
            coordination.paused.set()  # a can no longer renew; b still reaches redis
            answer = b.call("wget 0", timeout=90)
            assert answer.startswith("GOT"), answer
            assert counting.ask("stats")["peak"] <= 1, "2 broker connections with limit 1"
            # a's socket was cut, and its redis client cannot reconnect underneath mppools
            assert a.call("w 0 connping").startswith("FAILED")
            assert counting.ask("stats")["peak"] <= 1
    finally:
        coordination.stop()


def test_the_watchdog_starts_under_an_interpreter_that_is_not_python(
        redis_server: Any, budget_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # an embedding (a uWSGI binary) whose sys.executable is not a python: the watchdog is run
    # by this environment's own pythonX.Y (before: no watchdog, a stopped master unfenced)
    monkeypatch.setattr(sys, "executable", "/usr/local/bin/uwsgi")
    monkeypatch.setattr(sys, "_base_executable", "/usr/local/bin/uwsgi", raising=False)
    limiter = mppools.configure(2, name=budget_name, backend=_spec(redis_server))
    try:
        watchdog = limiter._watchdog  # type: ignore[attr-defined]
        assert watchdog is not None, "no watchdog"
        python = watchdog.args[0]
        assert os.path.basename(python).startswith("python") and os.access(python, os.X_OK)
        assert watchdog.poll() is None, "the watchdog did not start"
    finally:
        mppools.close()


def test_a_second_master_on_the_same_host_is_refused_and_changes_nothing(
        redis_server: Any, budget_name: str) -> None:
    # a gunicorn binary upgrade starts a new master beside the old one: with the cross-host
    # backend it cannot take the host's leases over. Before, its configure() failed with
    # "already exists with limit 4 ...; asked for limit 1" (an internal figure)
    spec = _spec(redis_server)
    code = ("import mppools, os, sys\n"
            f"lim = mppools.configure(3, {budget_name!r}, backend={spec!r})\n"
            "print(lim.stats().extra['local_limit'], flush=True)\n"
            "sys.stdin.read()\n")
    old = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    try:
        assert old.stdout is not None
        before = old.stdout.readline().strip()
        assert before == "3", before
        with pytest.raises(mppools.BudgetInUseError,
                           match=rf"kept by its live master, pid {old.pid}.*binary upgrade"):
            mppools.configure(3, budget_name, backend=spec)
        assert mppools._config.current() is None
        local = posix.PosixLimiter.open(budget_name, create=False)
        try:
            assert local.limit == 4  # 3 leases and the old master's plug, untouched
            assert local.stats().creator_pid == old.pid
        finally:
            local.close()
    finally:
        assert old.stdin is not None
        old.stdin.close()
        old.wait(30)


@pytest.mark.timeout(90)
def test_a_master_that_closes_while_its_worker_lives_keeps_the_plug(
        redis_server: Any, budget_name: str) -> None:
    # mppools.close() in the master while its worker keeps using pooled connections: the
    # master's plug slot went back at once, so the worker kept a connection for ever after
    # the leases had lapsed (none held on the server for this host). The master now keeps
    # the plug while it lives (and its watchdog stands in once it is gone): the worker's
    # connection is handed on and it gets no slot any more
    body = _KEEPS_USING_A_POOLED_CONNECTION
    then = "mppools.close()\nprint('closed', flush=True)\n"
    with _master_with_worker(redis_server, budget_name, body, seconds=80,
                             then=then) as (master, w):
        worker = w[0]
        assert master.stdout is not None
        assert master.stdout.readline().strip() == "closed"
        from mppools._limiter.redis import LeaseClient

        local = posix.PosixLimiter.open(budget_name, create=False)
        probe = LeaseClient(redis_server.url, budget_name, "probe", ttl=TTL)
        try:
            def worker_holds() -> int:
                return sum(h.slots for h in local.stats().holders if h.pid == worker)

            assert wait_until(lambda: local.limit == 1 and worker_holds() == 0, 20, 0.01,
                              what="the worker's connection handed on")
            # until well after the leases lapsed in the server, the worker gets nothing
            deadline = time.monotonic() + 2 * TTL
            lapsed = False
            while time.monotonic() < deadline:
                assert worker_holds() == 0, "the worker got a slot the host has no lease for"
                lapsed = lapsed or probe.stats().in_use == 0
                time.sleep(0.02)
            assert lapsed, "the host's leases never lapsed"
            assert {h.pid for h in local.stats().holders} == {master.pid}  # the plug
        finally:
            probe.close(release=False)
            local.close()


@pytest.mark.timeout(90)
def test_a_master_that_closed_while_its_worker_lives_can_configure_again(
        redis_server: Any, budget_name: str) -> None:
    # what it kept at its close (the plug, the board, the watchdog) is let go, and it is the
    # host's master again: the worker gets slots under new leases
    body = ("    os.write(w, b'x')\n"
            "    time.sleep(80)\n")
    then = ("mppools.close()\n"
            f"lim = mppools.configure(2, name={budget_name!r}, "
            f"backend={_spec(redis_server)!r}, idle_timeout=None)\n"
            "print(lim.stats().limit, lim.stats().extra['local_limit'], flush=True)\n")
    with _master_with_worker(redis_server, budget_name, body, seconds=80,
                             then=then) as (master, _):
        assert master.stdout is not None
        assert master.stdout.readline().split() == ["2", "2"]
        local = posix.PosixLimiter.open(budget_name, create=False)
        try:
            assert local.limit == 3  # 2 leases and one plug: the old plug was let go
            assert [h.slots for h in local.stats().holders] == [1]
        finally:
            local.close()

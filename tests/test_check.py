"""``mppools check``: every check made to warn or fail for real, and to pass (issue 11, part 3).

The setups are real: forked holders with real broker connections, a private Redis with a small
``maxclients``, a private RabbitMQ node with its management plugin and a vhost limit set by
rabbitmqctl, a second user of the host (support/users.py), processes in other PID and network
namespaces (support/namespaces.py), a small tmpfs on /dev/shm in a mount namespace of its own,
and lowered RLIMIT_NOFILE limits.
"""

from __future__ import annotations

import json
import os
import resource
import select
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from forkutil import Worker
from kombu import Connection
from support.namespaces import Agent, unshare_unavailable
from support.servers import RabbitMQServer, RedisServer, free_port
from support.users import OtherUser, skip_reason

import mppools
from mppools.cli import main
from mppools.cli._check import _brokers

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parent.parent
ALL_CHECKS = ["budget", "name-squatting", "shm-space", "fd-limit", "namespaces"]
BROKER_CHECKS = ["broker-limit", "unmanaged-connections"]


# helpers -------------------------------------------------------------------------------------
def _check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    """Run ``mppools check ARGS --json`` in this process: (exit status, document)."""
    capsys.readouterr()
    code = main(["check", *args, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out)


def _by_name(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in doc["checks"]}


def _run(*args: str, preexec: Callable[[], None] | None = None,
         prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """``python3 -m mppools ARGS`` as a separate process (optionally under ``prefix``)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([*prefix, sys.executable, "-m", "mppools", *args],
                          capture_output=True, text=True, timeout=60, env=env, check=False,
                          cwd=str(REPO), preexec_fn=preexec)


_held: list[Any] = []  # in a forked worker: what it holds (kept alive until it leaves)


def _hold_slot() -> int:
    limiter = mppools._config.current()
    assert limiter is not None
    _held.append(limiter.acquire(block=True, timeout=5))
    return os.getpid()


def _use_pooled(url: str) -> int:
    """Take a pooled connection through mppools, use it, keep it (a slot and a socket)."""
    conn = mppools.connections[Connection(url)].acquire(block=True, timeout=10)
    if url.startswith("redis"):
        conn.default_channel.client.ping()
    else:
        conn.connect()
    _held.append(conn)
    return os.getpid()


def _open_raw(host: str, port: int, count: int) -> int:
    """Open ``count`` plain TCP connections to the broker, not through mppools."""
    for _ in range(count):
        _held.append(socket.create_connection((host, port), timeout=5))
    return os.getpid()


def _open_amqp(url: str) -> int:
    """A kombu connection to RabbitMQ that bypasses mppools."""
    conn = Connection(url)
    conn.connect()
    _held.append(conn)
    return os.getpid()


def _lower_nofile(soft: int) -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return _hold_slot()


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    """Forked workers of one test, stopped after it."""
    made: list[Worker] = []
    yield made
    for w in made:
        w.stop()


def _worker(workers: list[Worker], **handlers: Callable[..., Any]) -> Worker:
    w = Worker(handlers)
    workers.append(w)
    return w


# a healthy host: everything passes -----------------------------------------------------------
def test_healthy_budget_passes_and_json_shape(
    budget_name: str, workers: list[Worker], capsys: pytest.CaptureFixture[str]
) -> None:
    mppools.configure(limit=4, name=budget_name)
    holder = _worker(workers, hold=_hold_slot)
    pid = holder.call("hold")
    code, doc = _check(capsys, budget_name)
    assert code == 0, doc
    assert set(doc) == {"name", "host", "status", "exit_status", "checks"}
    assert (doc["name"], doc["status"], doc["exit_status"]) == (budget_name, "ok", 0)
    assert [c["name"] for c in doc["checks"]] == ALL_CHECKS
    for c in doc["checks"]:
        assert set(c) == {"name", "status", "message", "data"}
        assert c["status"] == "ok", c
        words = c["message"]
        for unit in ("KiB", "MiB", "GiB"):
            words = words.replace(unit, "")
        assert words == words.lower(), c  # lowercase (but for units), with its numbers
    checks = _by_name(doc)
    assert checks["budget"]["data"]["in_use"] == 1
    assert "limit 4, in use 1 (1 holder)" in checks["budget"]["message"]
    assert checks["name-squatting"]["data"]["present"] == 4
    fd = checks["fd-limit"]["data"]
    # 4 connections + 4 wake-up sockets + 4 pidfds + 4 budget fds + 32 = 48
    assert fd["needed"] == 48 and f"holder pid {pid}" in fd["limits"]
    assert "= 48" in checks["fd-limit"]["message"]
    assert checks["namespaces"]["data"]["processes"] == 1
    # the text form: one line per check and a summary; exit 0
    assert main(["check", budget_name]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0].startswith(f"mppools check {budget_name!r}")
    assert len(text) == len(ALL_CHECKS) + 2
    assert text[-1] == "result: ok (0 failed, 0 warned, 5 ok)"


def test_check_changes_nothing_and_creates_no_budget(
    budget_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = sorted(p for p in os.listdir("/dev/shm") if budget_name in p)
    code, doc = _check(capsys, budget_name)
    assert code == 0  # no budget and no --limit: warnings only
    checks = _by_name(doc)
    assert checks["budget"]["status"] == "warn" and "no --limit" in checks["budget"]["message"]
    assert checks["fd-limit"]["status"] == "warn"
    assert "skipped" in checks["fd-limit"]["message"]
    code, doc = _check(capsys, budget_name, "--limit", "6")
    assert code == 0 and doc["status"] == "ok"
    assert _by_name(doc)["budget"]["data"] == {"exists": False, "limit": 6}
    assert sorted(p for p in os.listdir("/dev/shm") if budget_name in p) == before == []


def test_strict_and_usage_errors(budget_name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", budget_name, "--strict"]) == 1  # the no-limit warnings
    capsys.readouterr()
    assert main(["check", budget_name, "--broker", "sqs://user:secret@x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not support the scheme sqs://" in err
    assert "secret" not in err and "Traceback" not in err
    assert main(["check", budget_name, "--broker", "//x"]) == 2
    assert "the url has no scheme" in capsys.readouterr().err
    assert main(["check", budget_name, "--broker", "redis://u:secret@h:notaport/0"]) == 2
    err = capsys.readouterr().err
    assert "invalid --broker url" in err and "secret" not in err
    # --management: RabbitMQ's api only, http(s) only (urllib would follow ftp:// or
    # file://), never repeated (a password); refused before anything is read
    for args, expected in [
        (["--management", "http://mq:15672"], "it needs --broker amqp://"),
        (["--broker", "redis://127.0.0.1:1", "--management", "http://mq:15672"],
         "it needs --broker amqp://"),
        (["--broker", "amqp://127.0.0.1:1", "--management", "file:///etc/passwd"],
         "needs an http:// or https:// url with a host"),
        (["--broker", "amqp://127.0.0.1:1", "--management", "ftp://u:secret@mq"],
         "needs an http:// or https:// url with a host"),
        (["--broker", "amqp://127.0.0.1:1", "--management", "http://u:secret@mq:bad"],
         "invalid --management url"),
    ]:
        assert main(["check", budget_name, "--limit", "2", *args]) == 2, args
        err = capsys.readouterr().err
        assert expected in err and "secret" not in err and "Traceback" not in err, (args, err)
    assert main(["check", "bad/name"]) == 2
    assert "invalid budget name" in capsys.readouterr().err


def test_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "mppools check web --broker" in out
    assert main(["--help"]) == 0
    assert "check     preflight" in capsys.readouterr().out


# budget --------------------------------------------------------------------------------------
def test_budget_warns_on_a_different_limit_and_dead_holders(
    budget_name: str, workers: list[Worker], capsys: pytest.CaptureFixture[str]
) -> None:
    mppools.configure(limit=3, name=budget_name)
    holder = _worker(workers, hold=_hold_slot)
    holder.call("hold")
    holder.kill()
    code, doc = _check(capsys, budget_name, "--limit", "5")
    check = _by_name(doc)["budget"]
    assert code == 0 and check["status"] == "warn", check
    assert "--limit 5 differs from the budget's limit 3" in check["message"]
    assert "1 dead holder keep" in check["message"] or "1 dead holder" in check["message"]
    assert check["data"]["dead_holders"] == 1


def test_budget_without_its_semaphore_fails_and_is_not_repaired(
    budget_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    mppools.configure(limit=2, name=budget_name)
    sem = f"/dev/shm/sem.mppools.{budget_name}.free"
    os.unlink(sem)
    code, doc = _check(capsys, budget_name)
    check = _by_name(doc)["budget"]
    assert code == 1 and check["status"] == "fail", check
    assert f"its semaphore {sem} is missing" in check["message"]
    assert not os.path.exists(sem), "the check created the semaphore"


# name squatting (a real second user) ---------------------------------------------------------
_SQUAT = r'''
os.umask(0)
for path in ARGS["paths"]:
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
out({"made": ARGS["paths"]})
'''


@pytest.fixture(scope="module")
def other_user() -> Iterator[OtherUser]:
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    with OtherUser() as user:
        yield user


def test_squatted_names_fail(
    budget_name: str, other_user: OtherUser, capsys: pytest.CaptureFixture[str]
) -> None:
    other_user.reset()
    seg, sem = f"/dev/shm/mppools.{budget_name}", f"/dev/shm/sem.mppools.{budget_name}.free"
    try:
        other_user.call(_SQUAT, {"paths": [seg, sem]})
        code, doc = _check(capsys, budget_name, "--limit", "4")
        checks = _by_name(doc)
        squat = checks["name-squatting"]
        assert code == 1 and doc["status"] == "fail"
        assert squat["status"] == "fail", squat
        assert f"2 of the names of budget {budget_name!r} are held by another user" in (
            squat["message"])
        assert f"uid {other_user.uid}" in squat["message"] and seg in squat["message"]
        assert len(squat["data"]["foreign"]) == 2
        # the budget itself cannot be read (another user's segment): a failure, and the
        # checks that need a limit use --limit
        assert checks["budget"]["status"] == "fail"
        assert f"another user's (uid {other_user.uid})" in checks["budget"]["message"]
        assert checks["fd-limit"]["data"]["needed"] == 4 + 4 + 4 + 4 + 32
        # read-only: the squatter's files are untouched
        assert os.stat(seg).st_uid == os.stat(sem).st_uid == other_user.uid
    finally:
        other_user.reset()


def test_world_readable_budget_warns(budget_name: str, capsys: pytest.CaptureFixture[str]
                                     ) -> None:
    mppools.configure(limit=2, name=budget_name)
    os.chmod(f"/dev/shm/mppools.{budget_name}", 0o644)
    code, doc = _check(capsys, budget_name)
    squat = _by_name(doc)["name-squatting"]
    assert code == 0 and squat["status"] == "warn", squat
    assert "has mode 644: every user of this host may open it" in squat["message"]


# /dev/shm space: a small tmpfs in a mount namespace of its own --------------------------------
@pytest.mark.parametrize(("size", "status"), [("64k", "fail"), ("512k", "warn"), ("8m", "ok")])
def test_shm_space(budget_name: str, size: str, status: str) -> None:
    reason = unshare_unavailable("--mount")
    if reason is not None:
        pytest.skip(reason)
    # unshare --mount makes the mounts private: the small tmpfs never reaches the host
    script = (f"mount -t tmpfs -o size={size} tmpfs /dev/shm && exec {sys.executable} -m "
              f"mppools check {budget_name} --limit 4 --json")
    done = _run_shell(script)
    assert done.returncode == (1 if status == "fail" else 0), done.stderr
    shm = _by_name(json.loads(done.stdout))["shm-space"]
    assert shm["status"] == status, shm
    assert shm["data"]["needed_bytes"] == shm["data"]["segment_bytes"] > 100_000
    assert shm["data"]["total_bytes"] <= 8 << 20
    if status == "fail":
        assert "dies of sigbus" in shm["message"]
    elif status == "warn":
        assert "less than the margin of 1.0 MiB" in shm["message"]
    assert not os.path.exists(f"/dev/shm/mppools.{budget_name}")


def _run_shell(script: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONIOENCODING": "utf-8"}
    return subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True,
                          text=True, timeout=60, env=env, check=False, cwd=str(REPO))


# fd limit ------------------------------------------------------------------------------------
def test_fd_limit_of_a_holder_fails(
    budget_name: str, workers: list[Worker], capsys: pytest.CaptureFixture[str]
) -> None:
    mppools.configure(limit=8, name=budget_name)
    low = _worker(workers, hold=_lower_nofile)
    pid = low.call("hold", 50)
    code, doc = _check(capsys, budget_name)
    fd = _by_name(doc)["fd-limit"]
    assert code == 1 and fd["status"] == "fail", fd
    # 8 connections + 8 wake-up sockets + 8 pidfds + 4 budget fds + 32 = 60 > 50
    assert fd["data"]["needed"] == 60
    assert f"soft open-file limit 50 (holder pid {pid}) is below the 60 fds" in fd["message"]
    # with the real concurrency (2 threads: 2 + 2 + 8 + 4 + 32 = 48) it fits
    code, doc = _check(capsys, budget_name, "--threads", "2")
    fd = _by_name(doc)["fd-limit"]
    assert code == 0 and fd["status"] == "ok" and fd["data"]["needed"] == 48, fd


def test_fd_limit_of_this_shell_fails_as_a_process() -> None:
    def low() -> None:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (40, hard))

    name = f"t{os.getpid()}-planned"
    done = _run("check", name, "--limit", "10", "--json", preexec=low)
    assert done.returncode == 1, done.stderr
    doc = json.loads(done.stdout)
    fd = _by_name(doc)["fd-limit"]
    assert (doc["status"], doc["exit_status"], fd["status"]) == ("fail", 1, "fail")
    assert "soft open-file limit 40 (this shell) is below the 66 fds" in fd["message"]
    done = _run("check", name, "--limit", "10")
    assert done.returncode == 0 and "result: ok" in done.stdout, done.stdout
    assert not os.path.exists(f"/dev/shm/mppools.{name}")


# namespaces ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("flags", "kind"), [
    (("--pid", "--fork", "--mount-proc"), "other_pid_namespace"),
    (("--pid", "--fork"), "unknown_pid_namespace"),  # no /proc of its own: records none
    (("--net",), "other_network_namespace"),
])
def test_holder_in_another_namespace_warns(
    budget_name: str, flags: tuple[str, ...], kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    reason = unshare_unavailable(*flags)
    if reason is not None:
        pytest.skip(reason)
    mppools.configure(limit=2, name=budget_name)
    agent = Agent(list(flags))
    try:
        assert agent.call(f"attach {budget_name}") == "OK"
        assert agent.call("acquire 10").startswith("GOT")
        code, doc = _check(capsys, budget_name)
        ns = _by_name(doc)["namespaces"]
        assert code == 0 and ns["status"] == "warn", ns
        assert ns["data"][kind] == [f"holder pid {agent.inner_pid}"], ns
        words = {"other_pid_namespace": "another pid namespace",
                 "unknown_pid_namespace": "a pid namespace this check cannot identify",
                 "other_network_namespace": "another network namespace"}[kind]
        assert f"1 in {words}" in ns["message"]
    finally:
        agent.kill()


_NESTED_HOLDER = r'''
import os, sys
sys.path.insert(0, sys.argv[1])
import mppools
from kombu import Connection
mppools.attach(sys.argv[2])
conn = mppools.connections[Connection(sys.argv[3])].acquire(block=True, timeout=10)
conn.default_channel.client.ping()
print("READY", os.getpid(), flush=True)
sys.stdin.readline()
os._exit(0)
'''


@pytest.mark.redis
def test_connections_of_a_holder_in_a_nested_pid_namespace_are_its_slots(
    budget_name: str, redis_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A container started from this host (a nested PID namespace, same network) records pid
    1 of its own namespace; its connection shows up here under its host pid, and is matched
    to its slot by namespace, innermost pid and start time: not reported as unmanaged."""
    flags = ("--pid", "--fork", "--mount-proc")
    reason = unshare_unavailable(*flags)
    if reason is not None:
        pytest.skip(reason)
    mppools.configure(limit=2, name=budget_name)
    proc = subprocess.Popen(
        ["unshare", *flags, sys.executable, "-c", _NESTED_HOLDER, str(REPO), budget_name,
         redis_server.url],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        line = proc.stdout.readline() if ready else ""
        assert line.split() == ["READY", "1"], line
        code, doc = _check(capsys, budget_name, "--broker", redis_server.url)
        checks = _by_name(doc)
        assert code == 0, doc  # the namespace is a warning, not a failure
        assert checks["namespaces"]["data"]["other_pid_namespace"] == ["holder pid 1"]
        unmanaged = checks["unmanaged-connections"]
        assert unmanaged["status"] == "ok", unmanaged
        assert (unmanaged["data"]["connections"], unmanaged["data"]["unmanaged"]) == (1, 0)
        assert "(1 held by its holders seen here)" in unmanaged["message"]
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


# redis ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server that accepts 8 clients at most."""
    with RedisServer(tmp_path_factory.mktemp("redis-check"), maxclients=8) as server:
        yield server


def _wait_clients(server: RedisServer, count: int) -> None:
    """Until redis lists ``count`` clients (a closed one of an earlier test may linger a
    moment), bounded."""
    deadline = time.monotonic() + 10
    while server.client_count() != count:
        assert time.monotonic() < deadline, f"redis lists {server.client_list()}"
        time.sleep(0.05)


@pytest.mark.redis
def test_redis_limit_fits_and_every_connection_is_the_budgets(
    budget_name: str, small_redis: RedisServer, workers: list[Worker],
    capsys: pytest.CaptureFixture[str],
) -> None:
    mppools.configure(limit=3, name=budget_name)
    pid = _worker(workers, use=_use_pooled).call("use", small_redis.url)
    _wait_clients(small_redis, 1)
    code, doc = _check(capsys, budget_name, "--broker", small_redis.url)
    assert [c["name"] for c in doc["checks"]] == ALL_CHECKS + BROKER_CHECKS
    checks = _by_name(doc)
    assert code == 0, doc
    limit = checks["broker-limit"]
    assert limit["status"] == "ok", limit
    assert "budget limit 3 fits redis maxclients 8" in limit["message"]
    assert limit["data"]["caps"] == [{"source": "redis maxclients", "value": 8,
                                      "connected": 1, "others": 0}]
    unmanaged = checks["unmanaged-connections"]
    assert unmanaged["status"] == "ok", unmanaged
    assert (unmanaged["data"]["connections"], unmanaged["data"]["unmanaged"]) == (1, 0)
    assert unmanaged["data"]["broker_listed_from_here"] == 1
    assert pid > 0


@pytest.mark.redis
def test_redis_limit_above_maxclients_fails(
    budget_name: str, small_redis: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    mppools.configure(limit=10, name=budget_name)
    code, doc = _check(capsys, budget_name, "--broker", small_redis.url)
    limit = _by_name(doc)["broker-limit"]
    assert code == 1 and limit["status"] == "fail", limit
    assert "budget limit 10 is above redis maxclients 8" in limit["message"]


@pytest.mark.redis
def test_redis_unmanaged_connections_warn(
    budget_name: str, small_redis: RedisServer, workers: list[Worker],
    capsys: pytest.CaptureFixture[str],
) -> None:
    mppools.configure(limit=6, name=budget_name)
    _worker(workers, use=_use_pooled).call("use", small_redis.url)
    rogue = _worker(workers, raw=_open_raw).call("raw", "127.0.0.1", small_redis.port, 2)
    _wait_clients(small_redis, 3)
    code, doc = _check(capsys, budget_name, "--broker", small_redis.url)
    checks = _by_name(doc)
    unmanaged = checks["unmanaged-connections"]
    assert unmanaged["status"] == "warn", unmanaged
    assert (unmanaged["data"]["connections"], unmanaged["data"]["unmanaged"]) == (3, 2)
    assert unmanaged["data"]["by_pid"] == [{"pid": rogue, "connections": 2, "slots": 0}]
    assert "2 of 3 connections from this user's processes" in unmanaged["message"]
    assert f"pid {rogue} (" in unmanaged["message"]
    # limit 6 + 2 others = 8 fits maxclients 8; one more client and it would not
    limit = checks["broker-limit"]
    assert limit["status"] == "ok" and "0 spare when full" in limit["message"], limit
    _worker(workers, raw=_open_raw).call("raw", "127.0.0.1", small_redis.port, 1)
    _wait_clients(small_redis, 4)
    code, doc = _check(capsys, budget_name, "--broker", small_redis.url)
    limit = _by_name(doc)["broker-limit"]
    assert code == 0 and limit["status"] == "warn", limit
    assert "budget limit 6 + 3 other connections now = 9 > redis maxclients 8" in (
        limit["message"])


@pytest.mark.redis
def test_redis_without_config_and_client_commands(
    budget_name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A hosted Redis often renames CONFIG and CLIENT: maxclients and the client count come
    from INFO clients instead; still a real answer, not a warning."""
    hidden = ["--rename-command", "CONFIG", "", "--rename-command", "CLIENT", ""]
    with RedisServer(tmp_path, maxclients=5, extra_args=hidden) as server:
        code, doc = _check(capsys, budget_name, "--limit", "4", "--broker", server.url)
        limit = _by_name(doc)["broker-limit"]
        assert code == 0 and limit["status"] == "ok", limit
        assert "budget limit 4 fits redis maxclients 5" in limit["message"]
        assert "config get maxclients refused" in limit["message"]
        code, doc = _check(capsys, budget_name, "--limit", "6", "--broker", server.url)
        limit = _by_name(doc)["broker-limit"]
        assert code == 1 and "budget limit 6 is above redis maxclients 5" in limit["message"]


def test_redis_unreachable_fails(budget_name: str, capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    code, doc = _check(capsys, budget_name, "--limit", "2", "--broker",
                       f"redis://127.0.0.1:{port}/0", "--timeout", "2")
    limit = _by_name(doc)["broker-limit"]
    assert code == 1 and limit["status"] == "fail", limit
    assert f"cannot reach redis at 127.0.0.1:{port}" in limit["message"]


def test_redis_py_missing_is_one_clear_line(
    budget_name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # import redis -> ImportError
    assert main(["check", budget_name, "--broker", "redis://127.0.0.1:1/0"]) == 2
    err = capsys.readouterr().err
    assert "needs redis-py: pip install 'mppools[redis]'" in err and err.count("\n") == 1


# rabbitmq ------------------------------------------------------------------------------------
class _RabbitWithManagement(RabbitMQServer):
    """A private RabbitMQ node with the management plugin on a free 127.0.0.1 port."""

    def __init__(self, tmp_dir: Path) -> None:
        self.management_port = free_port()
        super().__init__(tmp_dir, extra_config=(
            f"management.tcp.port = {self.management_port}\n"
            "management.tcp.ip = 127.0.0.1\n"
            "collect_statistics_interval = 500\n"))

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    def _prepare_dirs(self, base: Path) -> Path:
        home = super()._prepare_dirs(base)
        (base / "enabled_plugins").write_text("[rabbitmq_management].\n")
        return home


def _management_answers(url: str) -> bool:
    request = urllib.request.Request(f"{url}/api/overview", headers={
        "Authorization": "Basic Z3Vlc3Q6Z3Vlc3Q="})  # guest:guest
    try:
        with urllib.request.urlopen(request, timeout=2):
            return True
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="module")
def rabbit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_RabbitWithManagement]:
    with _RabbitWithManagement(tmp_path_factory.mktemp("rabbit-check")) as server:
        deadline = time.monotonic() + 60
        while not _management_answers(server.management_url):
            assert time.monotonic() < deadline, "the management api did not come up in 60 s"
            time.sleep(0.2)
        server.add_vhost("capped")
        yield server


def _wait_listed(capsys: pytest.CaptureFixture[str], args: list[str], connected: int
                 ) -> tuple[int, dict[str, Any]]:
    """Run the check until the management api lists ``connected`` connections (its
    statistics lag by up to collect_statistics_interval), bounded."""
    deadline = time.monotonic() + 30
    while True:
        code, doc = _check(capsys, *args)
        caps = _by_name(doc)["broker-limit"]["data"].get("caps") or [{}]
        if caps[0].get("connected") == connected or time.monotonic() > deadline:
            return code, doc
        time.sleep(0.3)


@pytest.mark.rabbitmq
def test_rabbitmq_vhost_limit(
    budget_name: str, rabbit: _RabbitWithManagement, workers: list[Worker],
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = rabbit.url_for_vhost("capped")
    rabbit.set_vhost_max_connections("capped", 3)
    mppools.configure(limit=2, name=budget_name)
    _worker(workers, use=_use_pooled).call("use", url)
    args = [budget_name, "--broker", url, "--management", rabbit.management_url]
    code, doc = _wait_listed(capsys, args, 1)
    checks = _by_name(doc)
    limit = checks["broker-limit"]
    assert code == 0 and limit["status"] == "ok", limit
    assert "budget limit 2 fits vhost 'capped' max-connections 3" in limit["message"]
    assert limit["data"]["caps"][0] == {"source": "vhost 'capped' max-connections",
                                        "value": 3, "connected": 1, "others": 0}
    assert checks["unmanaged-connections"]["status"] == "ok", checks["unmanaged-connections"]
    # a connection that bypasses mppools: 2 + 1 other = 3 still fits; it is reported
    rogue = _worker(workers, amqp=_open_amqp).call("amqp", url)
    code, doc = _wait_listed(capsys, args, 2)
    checks = _by_name(doc)
    unmanaged = checks["unmanaged-connections"]
    assert unmanaged["status"] == "warn", unmanaged
    assert unmanaged["data"]["by_pid"] == [{"pid": rogue, "connections": 1, "slots": 0}]
    assert unmanaged["data"]["broker_listed"] == unmanaged["data"]["broker_listed_from_here"]
    # the vhost cap lowered below the limit: a failure
    rabbit.set_vhost_max_connections("capped", 1)
    code, doc = _check(capsys, *args)
    limit = _by_name(doc)["broker-limit"]
    assert code == 1 and limit["status"] == "fail", limit
    assert "budget limit 2 is above vhost 'capped' max-connections 1" in limit["message"]
    rabbit.set_vhost_max_connections("capped", -1)
    code, doc = _check(capsys, *args)
    limit = _by_name(doc)["broker-limit"]
    assert limit["status"] == "ok" and "max-connections: no limit" in limit["message"], limit
    # the user's own cap counts too (here the vhost has none)
    rabbit.ctl("set_user_limits", "guest", json.dumps({"max-connections": 1}))
    try:
        code, doc = _check(capsys, *args)
    finally:
        rabbit.ctl("set_user_limits", "guest", json.dumps({"max-connections": -1}))
    limit = _by_name(doc)["broker-limit"]
    assert code == 1 and limit["status"] == "fail", limit
    assert "budget limit 2 is above user 'guest' max-connections 1" in limit["message"]
    assert [c["source"] for c in limit["data"]["caps"]] == [
        "vhost 'capped' max-connections", "user 'guest' max-connections"]


@pytest.mark.rabbitmq
def test_rabbitmq_management_unreachable_warns(
    budget_name: str, rabbit: _RabbitWithManagement, capsys: pytest.CaptureFixture[str]
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    args = [budget_name, "--limit", "2", "--broker", rabbit.url, "--management", closed]
    code, doc = _check(capsys, *args)
    checks = _by_name(doc)
    limit = checks["broker-limit"]
    assert code == 0 and limit["status"] == "warn", limit
    assert f"the management api at {closed} is not reachable" in limit["message"]
    assert "max-connections is unknown" in limit["message"]
    assert checks["unmanaged-connections"]["status"] == "ok"  # /proc still works
    assert main(["check", *args, "--strict"]) == 1
    # the amqp port itself closed: a failure
    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}//"
    code, doc = _check(capsys, budget_name, "--limit", "2", "--broker", dead)
    limit = _by_name(doc)["broker-limit"]
    assert code == 1 and "cannot reach rabbitmq" in limit["message"], limit


def test_management_url_derivation() -> None:
    assert _brokers.management_url_for("amqp://u:p@mq.example:5672/prod") == (
        "http://mq.example:15672")
    assert _brokers.management_url_for("amqps://mq.example/x") == "https://mq.example:15671"
    assert _brokers.management_url_for("amqp://") == "http://localhost:15672"
    assert _brokers.parse_broker("amqp://h//") == ("rabbitmq", "h", 5672)
    assert _brokers.parse_broker("rediss://:pw@h:6380/1") == ("redis", "h", 6380)
    assert _brokers._vhost_of("//") == "/" and _brokers._vhost_of("/a%2Fb") == "a/b"

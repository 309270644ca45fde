"""Other users of the host cannot disturb a budget (issue 8, item 4; promises 10 and 11).

Each test attacks as a real second, unprivileged user (``mppools-attacker``, made with
``useradd`` and run with ``runuser``; see support/users.py) against victims that are root
processes of this test (forked workers). The attacker only ever aims at the budget name of
its own test, so it never disturbs other budgets on a shared host, but it finds its targets
by every means an unprivileged user has: the world-readable ``/dev/shm`` listing,
``/proc/PID/stat`` and ``/proc/net/unix``.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from forkutil import Worker, run_in_child
from kombu import Connection
from support.proxy_process import ProxyProcess
from support.users import OtherUser, skip_reason

import mppools
from mppools import LimitExceeded, MppoolsError, PermissionDeniedError

_SKIP = skip_reason()
pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(_SKIP is not None, reason=_SKIP or ""),
]

SHM = "/dev/shm"


@pytest.fixture(scope="module")
def other_user() -> Iterator[OtherUser]:
    """The attacker: a real unprivileged user (deleted at the end only if we made it)."""
    with OtherUser() as user:
        yield user


@pytest.fixture
def attacker(other_user: OtherUser) -> Iterator[OtherUser]:
    """The attacker for one test: its processes and /dev/shm files are gone after it."""
    other_user.reset()
    yield other_user
    other_user.reset()


# victims (root processes forked from this test) --------------------------------------------------
def _use(url: str) -> int:
    """Take a pooled connection, use it, leave it idle in this process's pool (holding a slot)."""
    conn = mppools.connections[Connection(url)].acquire(block=True, timeout=5)
    try:
        if url.startswith("redis://"):
            conn.default_channel.client.ping()
        else:
            conn.connect()
    finally:
        conn.release()
    return os.getpid()


def _take(url: str, timeout: float) -> str:
    """Wait for a slot of the budget (a pooled connection) for up to ``timeout`` seconds."""
    try:
        conn = mppools.connections[Connection(url)].acquire(block=True, timeout=timeout)
    except LimitExceeded as exc:
        return f"timed out: {exc}"
    conn.release()
    mppools.reset()
    return "got"


def _slots_of(pid: int) -> tuple[int, int]:
    """(slots, idle slots) the budget records for ``pid``."""
    for h in mppools.stats().holders:
        if h.pid == pid:
            return h.slots, h.idle
    return 0, 0


def _within(cond: Callable[[], bool], timeout: float) -> bool:
    """True as soon as ``cond()`` holds, False if it did not within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def _objects_of(name: str) -> dict[str, tuple[int, int]]:
    """The budget's entries in /dev/shm: path -> (owner uid, permission bits)."""
    found: dict[str, tuple[int, int]] = {}
    for entry in os.listdir(SHM):
        if entry in (f"mppools.{name}", f"sem.mppools.{name}.free") or entry.startswith(
            (f"mppools.{name}.", f"sem.mppools.{name}.")
        ):
            try:
                st = os.lstat(os.path.join(SHM, entry))
            except FileNotFoundError:
                continue
            found[os.path.join(SHM, entry)] = (st.st_uid, stat.S_IMODE(st.st_mode))
    return found


def _owner_only(objects: dict[str, tuple[int, int]]) -> dict[str, str]:
    """The objects not owned by root with owner-only permissions, with what is wrong."""
    return {path: f"uid {uid} mode {mode:#o}" for path, (uid, mode) in objects.items()
            if uid != 0 or mode & 0o077}


# 1. forged yield requests --------------------------------------------------------------------
_FLOOD = r'''
name = ARGS["name"]
found = unix_sockets(name)
predicted = []
for entry in os.listdir("/proc"):
    if entry.isdigit():
        try:
            start = start_ticks(int(entry))
        except (OSError, ValueError, IndexError):
            continue
        predicted.append(f"\0mppools/{name}/k/{entry}/{start}".encode())
report = {"visible": sorted(e for e in os.listdir("/dev/shm") if name in e),
          "found": [a.decode(errors="replace").replace("\0", "@") if isinstance(a, bytes)
                    else a for a in found],
          "reached": {}, "refused": {}}
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.settimeout(5)
for addr in dict.fromkeys(found + predicted):
    key = addr.decode(errors="replace").replace("\0", "@") if isinstance(addr, bytes) else addr
    try:
        s.sendto(b"?", addr)  # a probe: a predicted address that is not bound is refused
    except OSError as exc:
        if addr in found:
            report["refused"][key] = type(exc).__name__
        continue
    sent = 0
    try:
        for token in range(ARGS["tokens"]):
            for index in range(ARGS["indexes"]):
                s.sendto(struct.pack("<cIQ", b"y", index, token), addr)  # blocks while full
                sent += 1
    except OSError as exc:
        report["refused"][key] = f"{type(exc).__name__} after {sent} requests"
    report["reached"][key] = sent
out(report)
'''


@pytest.mark.redis
def test_forged_yield_requests_do_not_close_idle_connections(
    attacker: OtherUser, redis_server: Any, budget_name: str
) -> None:
    """Another user sends yield requests, with every token 0..10000, to every rendezvous of
    the budget it can find or predict: the victim's idle connection stays open (nobody
    waits, and the sender is not the owner), so no reconnect churn against the broker."""
    mppools.configure(limit=2, name=budget_name, idle_timeout=None)
    with ProxyProcess(("127.0.0.1", redis_server.port)) as proxy:
        url = proxy.url_for(redis_server.url)
        victim = Worker({"use": lambda: _use(url)})
        try:
            victim.call("use")
            assert proxy.wait_current(1, timeout=10), proxy.current
            accepted = proxy.total_accepted
            assert _slots_of(victim.pid) == (1, 1), mppools.stats()

            report = attacker.call(_FLOOD, {"name": budget_name, "tokens": 10001,
                                            "indexes": 4}, timeout=150)

            # every request was delivered (blocking sends) before the attacker exited, and
            # today's keeper yields within milliseconds of reading the right token
            disturbed = _within(
                lambda: proxy.current != 1 or _slots_of(victim.pid) != (1, 1), 2.0
            )
            assert not disturbed, (
                f"forged yield requests from uid {attacker.uid} closed the victim's idle "
                f"connection: proxy open {proxy.current}, victim slots (held, idle) "
                f"{_slots_of(victim.pid)}; attacker report {report}"
            )
            victim.call("use")  # the same warm connection, no reconnect
            assert proxy.total_accepted == accepted, (
                f"the victim reconnected: {proxy.total_accepted} connections accepted, "
                f"{accepted} before the attack; attacker report {report}"
            )
        finally:
            victim.kill()


# 2. squatting the keeper's address ---------------------------------------------------------------
_SQUAT_KEEPER = r'''
name, pid = ARGS["name"], ARGS["pid"]
held, report = [], {"bound": [], "denied": {}}

def squat(addr):
    key = addr.decode().replace("\0", "@") if isinstance(addr, bytes) else addr
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        s.bind(addr)
    except OSError as exc:
        report["denied"][key] = type(exc).__name__
        s.close()
        return
    held.append(s)
    report["bound"].append(key)

start = start_ticks(pid)
squat(f"\0mppools/{name}/k/{pid}/{start}".encode())
for entry in os.listdir("/dev/shm"):
    d = os.path.join("/dev/shm", entry)
    if name in entry and os.path.isdir(d):
        for base in (f"k.{pid}", f"k.{pid}.{start}", f"{pid}", f"{pid}.{start}", "keeper"):
            squat(os.path.join(d, base))
        path = os.path.join(d, "squat")
        report["denied"][path] = outcome(
            lambda: os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o666)))
out({"ready": True, **report})
sys.stdin.read()  # hold every address until the test closes our stdin
'''


def test_squatted_keeper_address_does_not_disable_idle_yield(
    attacker: OtherUser, budget_name: str
) -> None:
    """Another user binds the victim's keeper address before the victim takes its first
    slot: idle yield still works, so a root process waiting for the only slot gets it."""
    mppools.configure(limit=1, name=budget_name, idle_timeout=None)
    url = "memory://"
    victim = Worker({"use": lambda: _use(url)})  # forked, waits on its pipe: pid known
    waiter: Worker | None = None
    try:
        squatter = attacker.start(_SQUAT_KEEPER, {"name": budget_name, "pid": victim.pid})
        report = squatter.read()
        victim.call("use")  # its first slot; then it sits blocked in a read, slot idle
        assert _slots_of(victim.pid) == (1, 1), mppools.stats()
        waiter = Worker({"take": lambda t: _take(url, t)})
        got = waiter.call("take", 10.0, timeout=40)
        assert got == "got", (
            f"uid {attacker.uid} squatted the victim's keeper address and the waiter for "
            f"the only slot {got}; attacker report {report}"
        )
    finally:
        victim.kill()
        if waiter is not None:
            waiter.kill()


# 3. a pre-created semaphore -----------------------------------------------------------------
_SEMAPHORE = r'''
os.umask(0)
name = ARGS["name"]
sem = sem_open(f"/mppools.{name}.free", os.O_CREAT | os.O_EXCL, 0o666, 0)
st = os.stat(f"/dev/shm/sem.mppools.{name}.free")
out({"ready": True, "uid": st.st_uid, "mode": st.st_mode & 0o777})
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["do"] == "drain":
        took = 0
        while took < 100000 and libc.sem_trywait(sem) == 0:
            took += 1
        out({"took": took})
    elif cmd["do"] == "post":
        for _ in range(cmd["n"]):
            libc.sem_post(sem)
        out({"value": sem_value(sem)})
'''


def test_precreated_semaphore_cannot_change_the_budget(
    attacker: OtherUser, budget_name: str
) -> None:
    """Another user creates the budget's semaphore (a real one, mode 0666) before the victim
    configures the name: configure() refuses with PermissionDeniedError naming the file, or
    the budget does not use that object (the attacker's waits and posts change nothing: the
    victim takes exactly 2 slots) and its semaphore file is root's, mode 0600."""
    sem_path = f"{SHM}/sem.mppools.{budget_name}.free"
    squatter = attacker.start(_SEMAPHORE, {"name": budget_name})
    ready = squatter.read()
    assert (ready["uid"], ready["mode"]) == (attacker.uid, 0o666), ready
    try:
        limiter = mppools.configure(limit=2, name=budget_name, idle_timeout=None)
    except PermissionDeniedError as exc:
        assert isinstance(exc, MppoolsError)
        assert sem_path in str(exc), f"the refusal does not name {sem_path}: {exc}"
        assert not os.path.exists(f"{SHM}/mppools.{budget_name}"), "a refusal left a segment"
        return
    took = squatter.ask({"do": "drain"})["took"]
    slots = []
    try:
        for n in range(2):
            try:
                slots.append(limiter.acquire(block=False))
            except LimitExceeded as exc:
                pytest.fail(f"uid {attacker.uid} drained {took} unit(s) of its pre-created "
                            f"semaphore and the victim's acquire #{n + 1} of limit 2 was "
                            f"refused: {exc}")
        value = squatter.ask({"do": "post", "n": 5})["value"]
        with pytest.raises(LimitExceeded):
            slots.append(limiter.acquire(block=False))  # posts by the attacker add nothing
    finally:
        for slot in slots:
            limiter.release(slot)
    if os.path.exists(sem_path):
        st = os.stat(sem_path)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600), (
            f"the budget uses {sem_path} of uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):#o}"
            f" (the attacker's: it took {took} unit(s), then posted to value {value})"
        )
    assert not _owner_only(_objects_of(budget_name)), _objects_of(budget_name)


# 4. squatting the default name ------------------------------------------------------------------
_SQUAT_PIDS = r'''
os.umask(0o022)
with open("/proc/sys/kernel/ns_last_pid") as f:
    pid = int(f.read())
with open("/proc/sys/kernel/pid_max") as f:
    pid_max = int(f.read())
made = []
for _ in range(ARGS["count"]):
    pid = pid + 1 if pid + 1 < pid_max else 301  # the kernel wraps to 300 and up
    try:
        os.close(os.open(f"/dev/shm/mppools.pid{pid}", os.O_CREAT | os.O_EXCL | os.O_WRONLY,
                         0o644))
    except FileExistsError:
        continue
    made.append(pid)
out({"made": made})
'''


def _configure_default() -> dict[str, Any]:
    result: dict[str, Any] = {"pid": os.getpid(), "error": None, "objects": {}}
    try:
        limiter = mppools.configure(limit=2)
    except MppoolsError as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        return result
    try:
        result["name"] = limiter.name
        result["objects"] = _objects_of(limiter.name)
    finally:
        mppools.close(unlink=True)
    return result


def test_default_name_cannot_be_squatted(attacker: OtherUser) -> None:
    """Another user pre-creates /dev/shm/mppools.pid<N> for the next 300 pids: configure()
    without a name still succeeds in a new root process, with objects of root, owner-only."""
    result: dict[str, Any] = {}
    made: list[int] = []
    for _ in range(3):  # other processes of the host may take the squatted pids first
        made = attacker.call(_SQUAT_PIDS, {"count": 300})["made"]
        try:
            result = run_in_child(_configure_default, timeout=60)
        finally:
            for pid in made:  # leave no squat behind for the other users of this host
                path = f"{SHM}/mppools.pid{pid}"
                if os.path.exists(path) and os.lstat(path).st_uid == attacker.uid:
                    os.unlink(path)
        if result["pid"] in made:
            break
    else:
        pytest.fail(f"the victim's pid {result['pid']} was not among the {len(made)} pids "
                    f"the attacker squatted ({made[:1]}..{made[-1:]}) in 3 tries")
    assert result["error"] is None, (
        f"uid {attacker.uid} squatted /dev/shm/mppools.pid{result['pid']} and "
        f"configure(limit=2) in pid {result['pid']} failed: {result['error']}"
    )
    assert result["objects"], f"budget {result['name']!r} has no objects in {SHM}"
    assert not _owner_only(result["objects"]), result["objects"]


# 5. no access to the victim's objects ------------------------------------------------------------
_PROBE = r'''
name = ARGS["name"]
res = {}
mine = f"/dev/shm/attacker.{name}"
os.close(os.open(mine, os.O_CREAT | os.O_WRONLY, 0o666))
for entry in sorted(os.listdir("/dev/shm")):
    path = "/dev/shm/" + entry
    if name not in entry or path == mine:
        continue
    if os.path.isdir(path):
        res[path + " list"] = outcome(lambda: os.listdir(path))
        res[path + " create"] = outcome(
            lambda: os.close(os.open(path + "/x", os.O_CREAT | os.O_WRONLY, 0o666)))
    else:
        res[path + " read"] = outcome(lambda: open(path, "rb").close())
        res[path + " write"] = outcome(lambda: open(path, "r+b").close())
    res[path + " replace"] = outcome(lambda: os.rename(mine, path))
    res[path + " unlink"] = outcome(lambda: os.unlink(path))
res["sem_open"] = outcome(lambda: libc.sem_close(sem_open(f"/mppools.{name}.free")))
for addr in unix_sockets(name):
    if isinstance(addr, str):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        res[addr + " send"] = outcome(lambda: s.sendto(b"?", addr))
        s.close()
if os.path.exists(mine):
    os.unlink(mine)
out(res)
'''


def test_other_user_cannot_open_the_budgets_objects(
    attacker: OtherUser, budget_name: str
) -> None:
    """Regression: another user can neither read, write, replace nor remove the budget's
    segment, semaphore, directory or sockets (all owner-only)."""
    mppools.configure(limit=2, name=budget_name, idle_timeout=None)
    url = "memory://"
    victim = Worker({"use": lambda: _use(url)})
    try:
        victim.call("use")  # a holder with an idle connection: its keeper is up
        before = _objects_of(budget_name)
        assert before, f"budget {budget_name!r} has no objects in {SHM}"
        res = attacker.call(_PROBE, {"name": budget_name}, timeout=60)
        assert any(budget_name in k for k in res), res
        allowed = {k: v for k, v in res.items()
                   if v != "PermissionError" and not (k == "sem_open"
                                                      and v == "FileNotFoundError")}
        assert not allowed, f"uid {attacker.uid} could: {allowed} (all: {res})"
        assert _objects_of(budget_name) == before
        assert _slots_of(victim.pid) == (1, 1)
    finally:
        victim.kill()


# 6. a pre-created budget directory ---------------------------------------------------------------
_PLANT_DIR = r'''
os.umask(0)
d = f"/dev/shm/mppools.{ARGS['name']}.d"
os.mkdir(d, 0o777)
os.close(os.open(d + "/planted", os.O_CREAT | os.O_WRONLY, 0o666))
out({"dir": d})
'''


def test_precreated_budget_directory_is_not_trusted(
    attacker: OtherUser, budget_name: str
) -> None:
    """Regression guard for the fix (path sockets in a 0700 directory per budget): another
    user pre-creates that directory, mode 0777. configure() refuses with
    PermissionDeniedError, or the budget puts nothing in it and idle yield still works."""
    planted = attacker.call(_PLANT_DIR, {"name": budget_name})["dir"]
    try:
        mppools.configure(limit=1, name=budget_name, idle_timeout=None)
    except PermissionDeniedError as exc:
        assert planted in str(exc) or budget_name in str(exc), str(exc)
        return
    url = "memory://"
    victim = Worker({"use": lambda: _use(url)})
    waiter = Worker({"take": lambda t: _take(url, t)})
    try:
        victim.call("use")
        assert waiter.call("take", 10.0, timeout=40) == "got"
        assert sorted(os.listdir(planted)) == ["planted"], os.listdir(planted)
        with open("/proc/net/unix", encoding="utf-8", errors="replace") as f:
            paths = [" ".join(p[7:]) for p in (ln.split() for ln in f) if len(p) >= 8]
        unsafe = {}
        for path in paths:
            if budget_name in path and path.startswith("/"):
                st = os.stat(os.path.dirname(path))
                if st.st_uid != 0 or stat.S_IMODE(st.st_mode) & 0o077:
                    unsafe[path] = f"dir uid {st.st_uid} mode {stat.S_IMODE(st.st_mode):#o}"
        assert not unsafe, unsafe
    finally:
        victim.kill()
        waiter.kill()


# 7. the lending socket -------------------------------------------------------------------------
_BORROW = r'''
import pickle
data = pickle.dumps(("borrow", ARGS["key"]))
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect(ARGS["path"])
except OSError as exc:
    out({"connect": type(exc).__name__})
    sys.exit(0)
try:
    s.sendall(struct.pack(">I", len(data)) + data)
    reply = s.recv(65536)
except OSError as exc:
    reply = type(exc).__name__.encode()
out({"connect": "ok", "reply": reply.decode("latin-1")})
'''


def _lend_at(url: str, path: str) -> str:
    """Hold an idle Redis connection and lend it at ``path`` (open to every user)."""
    from mppools import pools
    from mppools._lending import lender, pool_key

    _use(url)
    lender().listen(path)
    os.chmod(path, 0o777)
    return pool_key(pools.connections[Connection(url)])


def _idle_slots(url: str) -> int:
    from mppools import pools

    return sum(1 for c in list(pools.connections[Connection(url)]._resource.queue)
               if getattr(c, "_mppools_slot", None) is not None)


@pytest.mark.redis
def test_other_user_gets_no_loan(attacker: OtherUser, budget_name: str,
                                 redis_server: Any) -> None:
    """Regression (lending): a peer of another uid that reaches a lending socket (here one
    made reachable on purpose: the real one is in the owner-only directory) gets no loan,
    not even an answer, and the lender's connection stays idle in its pool."""
    import shutil
    import tempfile

    mppools.configure(limit=1, name=budget_name, idle_timeout=None)
    where = tempfile.mkdtemp(prefix="mppools-lend-", dir="/tmp")
    os.chmod(where, 0o711)
    path = os.path.join(where, "lend")
    victim = Worker({"lend": lambda: _lend_at(redis_server.url, path),
                     "idle": lambda: _idle_slots(redis_server.url)})
    try:
        key = victim.call("lend")
        res = attacker.call(_BORROW, {"path": path, "key": key}, timeout=60)
        # closed unanswered: EOF, a reset (closed with the request unread), or a broken
        # pipe (closed before the request was written: the peer check needs no request)
        assert res["connect"] == "ok" and res["reply"] in (
            "", "ConnectionResetError", "BrokenPipeError"), res
        assert victim.call("idle") == 1
    finally:
        victim.kill()
        shutil.rmtree(where, ignore_errors=True)

"""The shared limiter: limit, waiting, reclaim, crash safety, resize, validation."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time

import posix_ipc
import pytest
from forkutil import Worker, run_in_child
from kombu.exceptions import ConnectionLimitExceeded

import mppools
from mppools import _liveness
from mppools._errors import (
    BudgetInUseError,
    BudgetNotFoundError,
    ConfigurationError,
    IncompatibleSegmentError,
    LimitExceeded,
    MppoolsError,
    NotConfiguredError,
    PermissionDeniedError,
)
from mppools._limiter.posix import PosixLimiter
from mppools._slots import SlotState

pytestmark = pytest.mark.timeout(60)


def holder_handlers(limiter: PosixLimiter) -> dict[str, object]:
    held: list[object] = []

    def acquire(timeout: float | None = 5.0, block: bool = True) -> int:
        slot = limiter.acquire(block=block, timeout=timeout)
        held.append(slot)
        return slot.index

    def release() -> int:
        limiter.release(held.pop())  # type: ignore[arg-type]
        return len(held)

    return {"acquire": acquire, "release": release, "pid": os.getpid}


def test_limit_holds_and_errors_name_the_holders(budget_name: str) -> None:
    limiter = mppools.configure(limit=2, name=budget_name, acquire_timeout=0.2)
    a = limiter.acquire()
    b = limiter.acquire()
    with pytest.raises(LimitExceeded) as info:
        limiter.acquire(block=False)
    err = info.value
    assert isinstance(err, ConnectionLimitExceeded)
    assert isinstance(err, MppoolsError)
    assert isinstance(err, TimeoutError)
    assert "limit 2" in str(err) and f"pid {os.getpid()} (2)" in str(err)
    assert "at once" in str(err)
    started = time.monotonic()
    with pytest.raises(LimitExceeded, match=r"after 0\.\d\d s"):
        limiter.acquire(timeout=0.3)
    assert time.monotonic() - started >= 0.3
    # the default acquire_timeout applies when no timeout is given
    with pytest.raises(LimitExceeded, match=r"after 0\.2\d s"):
        limiter.acquire()
    limiter.release(a)
    limiter.release(b)
    limiter.release(b)  # twice: a no-op
    stats = mppools.stats()
    assert (stats.in_use, stats.free, stats.waiting) == (0, 2, 0)
    assert stats.timeouts_total == 2
    assert stats.extra["semaphore"] == 2


def test_limit_holds_across_processes(budget_name: str) -> None:
    limiter = mppools.configure(limit=3, name=budget_name, acquire_timeout=0.1)
    workers = [Worker(holder_handlers(limiter)) for _ in range(5)]
    try:
        got = 0
        for w in workers:
            try:
                w.call("acquire", 0.0, False)
                got += 1
            except Exception:
                pass
        assert got == 3
        assert mppools.stats().in_use == 3
    finally:
        for w in workers:
            w.stop()


def test_error_pickles() -> None:
    import pickle

    err = LimitExceeded("no free slot", name="x", limit=3, waited=1.5, holders=((1, 2),))
    copy = pickle.loads(pickle.dumps(err))
    assert (str(copy), copy.name, copy.limit, copy.waited, copy.holders) == (
        "no free slot", "x", 3, 1.5, ((1, 2),))


def test_waiter_gets_released_slot_fifo(budget_name: str) -> None:
    limiter = mppools.configure(limit=1, name=budget_name)
    first = limiter.acquire()
    w1 = Worker(holder_handlers(limiter))
    w2 = Worker(holder_handlers(limiter))
    try:
        w1.send("acquire", 10.0)
        _wait_for(lambda: mppools.stats().waiting == 1)
        w2.send("acquire", 10.0)
        _wait_for(lambda: mppools.stats().waiting == 2)
        limiter.release(first)
        w1.answer()  # the oldest waiter is served first
        assert [h.pid for h in mppools.stats().holders] == [w1.pid]
        w1.call("release")
        w2.answer()
        assert [h.pid for h in mppools.stats().holders] == [w2.pid]
    finally:
        w1.stop()
        w2.stop()


def _wait_for(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.002)


@pytest.mark.parametrize("reap", [True, False], ids=["reaped", "zombie"])
def test_sigkilled_holder_slot_goes_to_waiter(budget_name: str, reap: bool) -> None:
    limiter = mppools.configure(limit=1, name=budget_name)
    holder = Worker(holder_handlers(limiter))
    try:
        holder.call("acquire")
        waiter_result: list[float] = []

        def wait() -> None:
            t0 = time.monotonic()
            slot = limiter.acquire(timeout=10)
            waiter_result.append(time.monotonic() - t0)
            limiter.release(slot)

        thread = threading.Thread(target=wait)
        thread.start()
        _wait_for(lambda: mppools.stats().waiting == 1)
        os.kill(holder.pid, signal.SIGKILL)
        if reap:
            os.waitpid(holder.pid, 0)
            holder.alive = False
        # otherwise the child stays a zombie until the end: it must count as dead
        thread.join(10)
        assert waiter_result, "the waiter never got the dead holder's slot"
        stats = mppools.stats()
        assert stats.reclaimed_total == 1 and stats.in_use == 0
    finally:
        holder.kill()


def test_audit_reclaims_without_waiters(budget_name: str) -> None:
    limiter = mppools.configure(limit=2, name=budget_name)
    holder = Worker(holder_handlers(limiter))
    holder.call("acquire")
    holder.call("acquire")
    pid = holder.pid
    holder.kill()
    report = mppools.audit()
    assert sorted(p for p, _ in report.reclaimed_slots) == [pid, pid]
    assert mppools.stats().in_use == 0
    assert mppools.stats().free == 2


def test_pid_reuse_is_a_dead_holder(budget_name: str) -> None:
    limiter = mppools.configure(limit=1, name=budget_name)
    me = _liveness.self_identity()
    # our own pid, but another start time: the recorded process is gone, the pid reused
    with limiter._locked():
        limiter._sem.acquire(0)
        limiter._table.write_slot(0, SlotState.BUSY, me.pid, me.start - 1, 99, time.time())
    assert mppools.stats().in_use == 1
    slot = limiter.acquire(timeout=2)  # the waiter's audit reclaims it
    assert mppools.stats().reclaimed_total == 1
    limiter.release(slot)


def test_wall_clock_step_does_not_look_like_death(
    budget_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psutil

    limiter = mppools.configure(limit=1, name=budget_name)
    slot = limiter.acquire()
    # psutil's create_time() follows the wall clock (giampaolo/psutil#2526): step it
    real = psutil.Process.create_time
    monkeypatch.setattr(psutil.Process, "create_time", lambda self: real(self) + 3600.0)
    monkeypatch.setattr(time, "time", lambda: 4e9)
    report = limiter.audit()
    assert report.reclaimed_slots == ()
    assert mppools.stats().in_use == 1
    limiter.release(slot)


def test_liveness_treats_zombie_as_dead() -> None:
    pid = os.fork()
    if pid == 0:  # pragma: no cover
        os._exit(0)
    try:
        deadline = time.monotonic() + 10
        ident = None
        while time.monotonic() < deadline:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.001)
        assert os.path.exists(f"/proc/{pid}")  # still there, unreaped
        assert _liveness.identity_of(pid) is ident
    finally:
        os.waitpid(pid, 0)


@pytest.mark.parametrize("point", ["after_sem", "after_record", "in_release"])
def test_crash_inside_the_critical_section(budget_name: str, point: str) -> None:
    """A process killed at any step of acquire/release leaks nothing and lets no L+1 in."""
    limiter = mppools.configure(limit=2, name=budget_name)

    def crash() -> None:
        table = limiter._table
        if point == "after_sem":
            # the semaphore is decremented, the record never written
            table.write_slot = lambda *a, **k: os._exit(0)  # type: ignore[method-assign]
            limiter.acquire()
        elif point == "after_record":
            real_write = table.write_slot

            def write_then_die(*a: object, **k: object) -> None:
                real_write(*a, **k)  # type: ignore[arg-type]
                os._exit(0)

            table.write_slot = write_then_die  # type: ignore[method-assign]
            limiter.acquire()
        else:
            slot = limiter.acquire()
            limiter._books.set_semaphore = lambda *a: os._exit(0)  # type: ignore[method-assign]
            limiter.release(slot)

    pid = os.fork()
    if pid == 0:  # pragma: no cover
        try:
            crash()
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child did not die at the crash point"
    # the mutex died with its owner: nobody deadlocks, the audit repairs the count
    limiter.audit()
    stats = mppools.stats()
    assert stats.in_use == 0 and stats.free == 2 and stats.extra["semaphore"] == 2
    a, b = limiter.acquire(), limiter.acquire()
    with pytest.raises(LimitExceeded):
        limiter.acquire(block=False)
    limiter.release(a)
    limiter.release(b)


def test_signal_handler_exception_reaches_caller_unchanged(budget_name: str) -> None:
    limiter = mppools.configure(limit=1, name=budget_name)
    slot = limiter.acquire()

    def child() -> str:
        class Soft(Exception):
            pass

        def handler(signum: int, frame: object) -> None:
            raise Soft("soft time limit")

        signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, 0.15)
        try:
            limiter.acquire(timeout=5)
        except Soft as exc:
            result = f"Soft:{exc}"
        except BaseException as exc:
            result = f"wrong:{type(exc).__name__}"
        else:
            result = "acquired"
        stats = limiter.stats()
        return f"{result}|waiting={stats.waiting}|in_use={stats.in_use}"

    assert run_in_child(child) == "Soft:soft time limit|waiting=0|in_use=1"
    limiter.release(slot)
    assert mppools.stats().in_use == 0


def test_system_exit_in_handler_while_a_slot_is_handed_over(budget_name: str) -> None:
    limiter = mppools.configure(limit=1, name=budget_name)
    slot = limiter.acquire()
    r, w = os.pipe()

    def child() -> str:
        def handler(signum: int, frame: object) -> None:
            raise SystemExit(7)

        signal.signal(signal.SIGUSR1, handler)
        os.write(w, b"x")
        try:
            limiter.acquire(timeout=10)
        except SystemExit as exc:
            return f"SystemExit({exc.code})"
        return "acquired"

    result: list[str] = []
    t = threading.Thread(target=lambda: result.append(run_in_child(child)))
    t.start()
    os.read(r, 1)
    _wait_for(lambda: mppools.stats().waiting == 1)
    pid = mppools.stats().holders[0].pid
    assert pid == os.getpid()
    # hand the slot over and interrupt the waiter at (about) the same time
    waiter_pid = mppools.stats().waiters[0].pid
    limiter.release(slot)
    try:
        os.kill(waiter_pid, signal.SIGUSR1)
    except ProcessLookupError:
        pass  # the hand-off won: the waiter already took the slot and left
    t.join(20)
    assert result and result[0] in ("SystemExit(7)", "acquired")
    # whatever won the race, no slot is lost
    mppools.audit()
    assert mppools.stats().in_use == 0
    os.close(r)
    os.close(w)


def test_resize_grow_shrink_force(budget_name: str) -> None:
    limiter = mppools.configure(limit=2, name=budget_name, acquire_timeout=0.05)
    a, b = limiter.acquire(), limiter.acquire()
    limiter.resize(3)
    c = limiter.acquire()  # growth is immediate
    with pytest.raises(BudgetInUseError, match="can't shrink") as info:
        limiter.resize(1)
    assert isinstance(info.value, RuntimeError)
    assert limiter.limit == 3
    limiter.resize(1, force=True)
    assert mppools.stats().debt == 2
    limiter.release(a)
    limiter.release(b)
    with pytest.raises(LimitExceeded):  # still one in use: the new limit is reached
        limiter.acquire(block=False)
    limiter.release(c)
    d = limiter.acquire()
    with pytest.raises(LimitExceeded):
        limiter.acquire(block=False)
    limiter.release(d)
    with pytest.raises(ConfigurationError, match="capacity"):
        limiter.resize(10_000)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"limit": 0}, "limit must be an int from 1"),
        ({"limit": -1}, "limit must be an int from 1"),
        ({"limit": True}, "limit must be an int from 1"),
        ({"limit": 2.5}, "limit must be an int from 1"),
        ({"limit": 2, "name": "bad/name"}, "invalid budget name"),
        ({"limit": 2, "name": "x" * 49}, "invalid budget name"),
        ({"limit": 2, "name": ""}, "invalid budget name"),
        ({"limit": 2, "acquire_timeout": -1}, "acquire_timeout"),
        ({"limit": 2, "idle_timeout": float("nan")}, "idle_timeout"),
        ({"limit": 2, "acquire_timeout": "5"}, "acquire_timeout"),
        ({"limit": 4, "capacity": 2}, "capacity"),
        ({"limit": 2, "mode": 0o400}, "owner"),
    ],
)
def test_bad_input_is_refused_and_creates_nothing(
    budget_name: str, kwargs: dict[str, object], match: str
) -> None:
    kwargs.setdefault("name", budget_name)
    before = set(os.listdir("/dev/shm"))
    with pytest.raises(ConfigurationError, match=match) as info:
        mppools.configure(**kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    assert set(os.listdir("/dev/shm")) == before
    assert mppools._config.current() is None


def test_configure_is_idempotent_and_refuses_conflicts(budget_name: str) -> None:
    first = mppools.configure(limit=2, name=budget_name)
    assert mppools.configure(limit=2, name=budget_name) is first
    with pytest.raises(ConfigurationError, match="already uses budget"):
        mppools.configure(limit=3, name=budget_name)


def test_configure_joins_a_live_budget_and_refuses_another_limit(budget_name: str) -> None:
    mppools.configure(limit=2, name=budget_name)

    def join(limit: int) -> str:
        mppools._config._limiter = None
        mppools._config._settings = None
        try:
            mppools.configure(limit=limit, name=budget_name)
        except ConfigurationError as exc:
            return f"refused: {exc}"
        return f"joined limit={mppools.get_limit()}"

    assert run_in_child(lambda: join(2)) == "joined limit=2"
    assert "open in this process with limit 2" in run_in_child(lambda: join(5))
    # an unrelated process (gunicorn's USR2 binary upgrade) joins with the same limit and is
    # refused another one
    import subprocess
    import sys

    code = (
        "import mppools, sys\n"
        "lim = int(sys.argv[1])\n"
        "try:\n"
        f"    mppools.configure(limit=lim, name={budget_name!r})\n"
        "except mppools.ConfigurationError as exc:\n"
        "    print('refused:', exc)\n"
        "else:\n"
        "    print('joined', mppools.stats().limit)\n"
    )
    def run(limit: int) -> str:
        return subprocess.run([sys.executable, "-c", code, str(limit)], capture_output=True,
                              text=True, timeout=30, check=True).stdout.strip()

    assert run(2) == "joined 2"
    assert "already exists with limit 2" in run(5)
    assert os.path.exists(f"/dev/shm/mppools.{budget_name}")  # the joiner did not unlink


def test_shared_objects_are_owner_only(budget_name: str) -> None:
    mppools.configure(limit=2, name=budget_name)
    for path in (f"/dev/shm/mppools.{budget_name}", f"/dev/shm/sem.mppools.{budget_name}.free"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path


def test_foreign_segment_is_refused_never_misread(budget_name: str) -> None:
    path = f"/dev/shm/mppools.{budget_name}"
    with open(path, "wb") as f:
        f.write(b"NOTOURS!" + b"\x01" * 4096)
    os.chmod(path, 0o600)
    with pytest.raises(IncompatibleSegmentError, match="not an mppools segment"):
        mppools.configure(limit=2, name=budget_name)
    with open(path, "rb") as f:
        assert f.read(8) == b"NOTOURS!"  # untouched


def test_other_layout_version_is_refused(budget_name: str) -> None:
    limiter = mppools.configure(limit=2, name=budget_name)
    import struct

    struct.pack_into("<I", limiter._view, 8, 99)
    mppools.close(unlink=False)
    with pytest.raises(IncompatibleSegmentError, match="layout version 99"):
        mppools.configure(limit=2, name=budget_name)
    with pytest.raises(IncompatibleSegmentError):
        mppools.attach(budget_name)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a segment of another user")
def test_another_users_segment_is_refused(budget_name: str) -> None:
    mppools.configure(limit=2, name=budget_name)
    mppools.close(unlink=False)
    os.chown(f"/dev/shm/mppools.{budget_name}", 65534, 65534)
    with pytest.raises(PermissionDeniedError, match="belongs to uid 65534") as info:
        mppools.configure(limit=2, name=budget_name)
    assert isinstance(info.value, PermissionError)


def test_attach_unknown_name() -> None:
    with pytest.raises(BudgetNotFoundError, match="no mppools budget named"):
        mppools.attach("does-not-exist-anywhere")
    with pytest.raises(NotConfiguredError, match="not configured in this process"):
        mppools.stats()


def test_attach_from_an_unrelated_process(budget_name: str) -> None:
    import subprocess
    import sys

    limiter = mppools.configure(limit=2, name=budget_name)
    slot = limiter.acquire()
    code = (
        f"import mppools; lim = mppools.attach({budget_name!r}); s = lim.acquire(timeout=1);"
        "print(mppools.stats().in_use); lim.release(s)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, check=True)
    assert out.stdout.strip() == "2"
    limiter.release(slot)


def test_sigkilled_master_leftovers_are_recovered(budget_name: str) -> None:
    import subprocess
    import sys

    code = (
        f"import mppools, os, sys; lim = mppools.configure(limit=2, name={budget_name!r});"
        "lim.acquire(); print('ready', flush=True); sys.stdin.read()"
    )
    master = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert master.stdout is not None
        assert master.stdout.readline().strip() == "ready"
    finally:
        master.kill()
        master.wait(10)
    assert os.path.exists(f"/dev/shm/mppools.{budget_name}")  # left behind
    limiter = mppools.configure(limit=3, name=budget_name)
    stats = mppools.stats()
    assert (stats.limit, stats.in_use, stats.free, stats.creator_pid) == (3, 0, 3, os.getpid())
    slots = [limiter.acquire() for _ in range(3)]
    for s in slots:
        limiter.release(s)


def test_recovery_adopts_a_budget_with_orphaned_live_workers(budget_name: str) -> None:
    limiter = PosixLimiter.open(budget_name, create=True, limit=2)
    orphan = Worker(holder_handlers(limiter))
    try:
        orphan.call("acquire")
        # make the creator look dead: another process image's budget, whose creator token
        # goes with our fd when we close it
        header = limiter._table.read_header()
        header.creator_pid, header.creator_start, header.creator_owner = 2**22 + 1, 1, 12345
        limiter._table.write_header(header)
        limiter.close()
        mppools.configure(limit=2, name=budget_name)
        stats = mppools.stats()
        assert stats.creator_pid == os.getpid()
        assert [h.pid for h in stats.holders] == [orphan.pid]  # not unlinked, not lost
        assert stats.free == 1
    finally:
        orphan.stop()


def test_unlink_refused_while_in_use(budget_name: str) -> None:
    limiter = mppools.configure(limit=2, name=budget_name)
    holder = Worker(holder_handlers(limiter))
    try:
        holder.call("acquire")
        with pytest.raises(BudgetInUseError, match=str(holder.pid)):
            mppools.unlink(budget_name)
        assert os.path.exists(f"/dev/shm/mppools.{budget_name}")
    finally:
        holder.stop()
    mppools.unlink(budget_name)
    assert not os.path.exists(f"/dev/shm/mppools.{budget_name}")
    assert not os.path.exists(f"/dev/shm/sem.mppools.{budget_name}.free")


def test_close_unlinks_when_creator_and_unused(budget_name: str, shm_clean: None) -> None:
    mppools.configure(limit=2, name=budget_name)
    assert budget_name in mppools.list_budgets()
    mppools.close()
    assert budget_name not in mppools.list_budgets()
    assert mppools._config.current() is None


def test_semaphore_is_the_free_count(budget_name: str) -> None:
    limiter = mppools.configure(limit=3, name=budget_name)
    sem = posix_ipc.Semaphore(f"/mppools.{budget_name}.free")
    try:
        assert sem.value == 3
        s = limiter.acquire()
        assert sem.value == 2
        # drift it by hand, as a crash would: the audit makes it exact again
        sem.release()
        report = limiter.audit()
        assert report.extra["semaphore_corrected"] == -1
        assert sem.value == 2
        limiter.release(s)
        assert sem.value == 3
    finally:
        sem.close()


def test_waits_use_the_monotonic_clock(budget_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """posix_ipc's timed waits follow the wall clock; ours never do."""
    limiter = mppools.configure(limit=1, name=budget_name)
    slot = limiter.acquire()
    jumps = iter([0.0, 1e6, -1e6] * 1000)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + next(jumps))
    started = time.monotonic()
    with pytest.raises(LimitExceeded):
        limiter.acquire(timeout=0.3)
    waited = time.monotonic() - started
    assert 0.3 <= waited < 5
    monkeypatch.undo()
    limiter.release(slot)


def test_other_platforms_are_refused_clearly(monkeypatch: pytest.MonkeyPatch,
                                            budget_name: str) -> None:
    import sys

    from mppools._errors import UnsupportedPlatformError

    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(UnsupportedPlatformError, match="needs Linux"):
        mppools.configure(limit=2, name=budget_name)
    assert not os.path.exists(f"/dev/shm/mppools.{budget_name}")


def test_one_fd_per_process_and_segment(budget_name: str) -> None:
    """Closing a second fd of the segment would drop this process's fcntl lock: a second
    open of the same budget in one process shares the first one's fd."""
    limiter = mppools.configure(limit=2, name=budget_name)
    again = PosixLimiter.open(budget_name, create=False)
    assert again is limiter
    with limiter._locked():
        again.close()  # e.g. `mppools status` run in-process
        # the lock is still ours: another process cannot take it
        def try_lock() -> bool:
            import fcntl

            fd = os.open(f"/dev/shm/mppools.{budget_name}", os.O_RDWR)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
            except OSError:
                return False
            finally:
                os.close(fd)
            return True

        assert run_in_child(try_lock) is False
    assert not limiter._closed
    with pytest.raises(ConfigurationError, match="open in this process with limit 2"):
        PosixLimiter.open(budget_name, create=True, limit=5)


def _hold_in_children(limiter: PosixLimiter, n: int) -> tuple[list[int], int]:
    """Fork ``n`` children that each take one slot and keep it until the returned write end
    of their pipe closes. Returns (pids, write fd)."""
    r, w = os.pipe()
    ready_r, ready_w = os.pipe()
    pids = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                os.close(w)
                limiter.acquire(timeout=10)
                os.write(ready_w, b"k")
                os.read(r, 1)  # until the parent closes its end
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    os.close(r)
    os.close(ready_w)
    got = b""
    deadline = time.monotonic() + 30
    while len(got) < n and time.monotonic() < deadline:
        chunk = os.read(ready_r, n - len(got))
        if not chunk:
            break
        got += chunk
    os.close(ready_r)
    assert len(got) == n, f"only {len(got)} of {n} holders got their slot"
    return pids, w


@pytest.mark.timeout(90)
def test_many_waiting_threads_against_many_holders_stay_within_the_fd_limit(
    budget_name: str,
) -> None:
    """20 waiting threads, 70 holders and a 256-fd limit: the waits end with LimitExceeded,
    never a raw EMFILE (one pidfd watcher per process, shared by its waiting threads)."""
    limiter = mppools.configure(limit=70, name=budget_name, idle_timeout=None)
    pids, release_w = _hold_in_children(limiter, 70)
    try:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                import resource

                os.close(r)
                resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
                outcomes: list[str] = []
                peak = [0]
                stop = threading.Event()

                def sample() -> None:
                    while not stop.wait(0.01):
                        peak[0] = max(peak[0], len(os.listdir("/proc/self/fd")))

                def wait_once() -> None:
                    try:
                        limiter.acquire(timeout=1.5)
                        outcomes.append("got")
                    except mppools.LimitExceeded:
                        outcomes.append("exceeded")
                    except BaseException as exc:
                        outcomes.append(repr(exc))

                sampler = threading.Thread(target=sample)
                sampler.start()
                threads = [threading.Thread(target=wait_once) for _ in range(20)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(20)
                stop.set()
                sampler.join(5)
                os.write(w, repr((sorted(outcomes), peak[0])).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
        os.close(r)
        os.waitpid(pid, 0)
        outcomes, peak = eval(data.decode())  # our own child's repr of (list, int)
        assert outcomes == ["exceeded"] * 20
        assert peak < 200, f"waiting cost {peak} fds"
    finally:
        os.close(release_w)
        for p in pids:
            os.waitpid(p, 0)


def test_non_blocking_acquire_audits_before_refusing(budget_name: str) -> None:
    """block=False must not refuse while the only holders are dead."""
    limiter = mppools.configure(limit=1, name=budget_name)
    holder = Worker(holder_handlers(limiter))
    holder.call("acquire")
    holder.kill()
    slot = limiter.acquire(block=False)
    assert mppools.stats().reclaimed_total == 1
    limiter.release(slot)


def test_a_refused_open_leaks_no_fd(budget_name: str) -> None:
    """configure() refused after the segment was opened (another limit, live creator) must
    close what it opened: token fd, mapping, semaphore."""
    ready_r, ready_w = os.pipe()
    stop_r, stop_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: the live creator
        try:
            os.close(stop_w)
            mppools.configure(limit=2, name=budget_name)
            os.write(ready_w, b"k")
            os.read(stop_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(stop_r)
    try:
        assert os.read(ready_r, 1) == b"k"
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(20):
            with pytest.raises(ConfigurationError, match="already exists with limit 2"):
                PosixLimiter.open(budget_name, create=True, limit=3)
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        os.close(stop_w)
        os.close(ready_r)
        os.waitpid(pid, 0)


_JOIN_PROBE = r"""
import fcntl, os, sys
from mppools._limiter.posix import _limiter, _names

name = sys.argv[1]
verdicts = []
join = _limiter.PosixLimiter._join_or_recover


def probing(self, *args, **kwargs):
    # is the budget's mutex (lockf, byte 0 of the segment) still ours while we join?
    fd = os.open(_names.shm_path(name), os.O_RDWR)  # closed only after open() returned
    verdicts.append(fd)
    pid = os.fork()
    if pid == 0:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
            os._exit(0)
        except OSError:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    verdicts.append("held" if status else "lost")
    return join(self, *args, **kwargs)


_limiter.PosixLimiter._join_or_recover = probing
limiter = _limiter.PosixLimiter.open(name, create=True, limit=3)
print(verdicts[1])
limiter.close()
"""


@pytest.mark.timeout(60)
def test_joining_a_budget_keeps_its_mutex(budget_name: str) -> None:
    """Processes join a budget concurrently (uWSGI --lazy-apps workers): each join (audit,
    settle) must run under the budget's mutex, like every acquire. Reading the header through
    a temporary mmap dup'ed the segment's fd and closed the dup, which dropped the
    process-owned lockf."""
    mppools.configure(3, budget_name)
    try:
        run = subprocess.run([sys.executable, "-c", _JOIN_PROBE, budget_name],
                             capture_output=True, text=True, timeout=50, check=False)
    finally:
        mppools.close()
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["held"], "the mutex was lost while joining the budget"


@pytest.mark.timeout(60)
def test_the_creator_leaves_a_budget_that_another_process_has_open(budget_name: str) -> None:
    """A creator that exits (close with unlink=None, what its atexit does) while another
    process has the budget open but holds no slot at that moment (a uWSGI --lazy-apps
    worker, a gunicorn worker between requests) must not remove it: that process would go
    on with the removed budget while the next configure() makes a new one of the same name,
    and the two would together allow up to twice the limit. Once nobody else has it open,
    the same close removes it."""
    from mppools._limiter.posix import exists

    mppools.configure(limit=2, name=budget_name)
    other = Worker({"ping": lambda: "pong"})  # forked: it has the budget open, holds nothing
    try:
        assert other.call("ping") == "pong"
        mppools.close()  # unlink=None, as the creator's atexit
        assert exists(name=budget_name), "removed under a process that has it open"
        with pytest.raises(BudgetInUseError, match="still open in another process"):
            mppools._limiter.posix.unlink(budget_name)
    finally:
        other.kill()
    mppools._limiter.posix.unlink(budget_name)  # nobody has it open now
    assert not exists(name=budget_name)

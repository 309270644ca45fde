"""gevent and eventlet (issue 8 item 2): locks made before patching, waits that yield.

Every scenario runs in a subprocess of its own (monkey-patching cannot be undone), in a new
session, under a watchdog: a hang fails the test and the process group we started is killed.
The publishing scenarios are judged by a CountingProxy in its own process in front of a
real redis-server, and by counting the messages that arrived.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
from support.proxy_process import ProxyProcess

from mppools import _green

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "integration" / "apps" / "green_publish.py"
LIBS = ["gevent", "eventlet"]
WATCHDOG = 45.0


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPPOOLS_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["PYTHONWARNINGS"] = "ignore"
    return env


def run(args: list[str], timeout: float = WATCHDOG) -> tuple[int, str, str]:
    """Run ``python args`` in a new session; on a hang kill its group and fail."""
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(),
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the group of the process we started
        out, err = proc.communicate(timeout=10)
        pytest.fail(f"hung for {timeout:.0f} s (watchdog killed it)\nstdout:\n{out[-3000:]}"
                    f"\nstderr:\n{err[-3000:]}")
    return proc.returncode, out, err


def run_code(code: str, timeout: float = WATCHDOG) -> list[Any]:
    """Run a snippet; it prints one JSON value per line; returns them (rc must be 0)."""
    rc, out, err = run(["-c", textwrap.dedent(code)], timeout)
    assert rc == 0, f"rc={rc}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
    return [json.loads(line) for line in out.splitlines() if line.startswith(("{", "["))]


PATCH = {
    "gevent": "from gevent import monkey; monkey.patch_all()\n"
              "import gevent\n"
              "spawn, sleep = gevent.spawn, gevent.sleep\n"
              "def joinall(gs): gevent.joinall(gs, raise_error=True)\n",
    "eventlet": "import eventlet; eventlet.monkey_patch()\n"
                "spawn, sleep = eventlet.spawn, eventlet.sleep\n"
                "def joinall(gs): [g.wait() for g in gs]\n",
}


# ------------------------------------------------------------------------------- _green
def test_unpatched_lock_and_wait() -> None:
    lock = _green.Lock()
    assert not _green.is_patched()
    assert lock.acquire() and lock.locked()
    assert not lock.acquire(blocking=False)
    assert not lock.acquire(timeout=0.01)
    lock.release()
    with pytest.raises(RuntimeError):
        lock.release()
    with pytest.raises(ValueError):
        lock.acquire(False, 1.0)
    rlock = _green.RLock()
    with rlock, rlock:
        assert rlock.locked()
    assert not rlock.locked()
    r, w = os.pipe()
    try:
        assert _green.wait_readable([r], 0) == []
        assert _green.wait_readable([r], 0.01) == []
        os.write(w, b"x")
        assert _green.wait_readable([r], None) == [r]
        high = os.dup2(r, 1500)  # above FD_SETSIZE: poll, never select
        try:
            assert _green.wait_readable([high], 1.0) == [high]
        finally:
            os.close(high)
    finally:
        os.close(r)
        os.close(w)


class _Interrupted(Exception):
    pass


def test_signal_handler_exception_propagates_unchanged() -> None:
    r, w = os.pipe()

    def handler(signum: int, frame: object) -> None:
        raise _Interrupted

    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(_Interrupted):
            _green.wait_readable([r], 10.0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        os.close(r)
        os.close(w)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("lib", LIBS)
def test_lock_made_before_patching_turns_green(lib: str) -> None:
    """A greenlet yields while holding a Lock made before patching: the others still run."""
    code = (
        "import json\nfrom mppools import _green\n"
        "lock, rlock = _green.Lock(), _green.RLock()\n"
        "assert not _green.is_patched()\n"
        + PATCH[lib]
        + textwrap.dedent("""
        assert _green.is_patched()
        ticks, order = [0], []
        def holder():
            with lock:
                order.append("held")
                sleep(0.2)  # yields while holding: a real lock would block the thread
                order.append("released")
        def contender(k):
            sleep(0.01)
            assert lock.acquire(timeout=5)
            order.append(f"got{k}")
            lock.release()
        def rholder():
            with rlock, rlock:
                sleep(0.05)
        def ticker():
            for _ in range(20):
                ticks[0] += 1
                sleep(0.005)
        joinall([spawn(holder)] + [spawn(contender, k) for k in range(3)]
                + [spawn(rholder), spawn(rholder), spawn(ticker)])
        assert order[:2] == ["held", "released"], order
        print(json.dumps({"ticks": ticks[0], "order": order, "repr": repr(lock)}))
        """))
    [out] = run_code(code)
    assert out["ticks"] == 20 and "green" in out["repr"], out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("lib", LIBS)
def test_wait_readable_yields(lib: str, order: str) -> None:
    """Greenlets waiting on fds (two on one fd, one on fd 1500) let a ticker run."""
    before = PATCH[lib] if order == "before" else ""
    after = PATCH[lib] if order == "after" else ""
    code = (
        before
        + "import json, os, time\nfrom mppools import _green\n"
        + after
        + textwrap.dedent("""
        r, w = os.pipe()
        high = os.dup2(r, 1500)
        ticks, got = [0], []
        waiting = [0]
        def waiter(fds):
            waiting[0] += 1
            got.append(_green.wait_readable(fds, 10.0))
            waiting[0] -= 1
        def ticker():
            sleep(0.01)
            while waiting[0] and ticks[0] < 1000:
                ticks[0] += 1
                sleep(0.002)
        def writer():
            sleep(0.2)
            os.write(w, b"x")
        t0 = time.monotonic()
        joinall([spawn(waiter, [r]), spawn(waiter, [r]), spawn(waiter, [high]),
                 spawn(ticker), spawn(writer)])
        elapsed = time.monotonic() - t0
        timed_out = _green.wait_readable([os.pipe()[0]], 0.05)
        print(json.dumps({"got": got, "ticks": ticks[0], "elapsed": elapsed,
                          "timed_out": timed_out, "r": r}))
        """))
    [out] = run_code(code)
    assert sorted(out["got"]) == sorted([[out["r"]], [out["r"]], [1500]]), out
    assert out["ticks"] >= 10, out  # ~100 if the waits yield, 0 if one blocked the thread
    assert out["timed_out"] == [], out
    assert out["elapsed"] < 9.0, out  # woken by the write, not by the 10 s timeout


# ------------------------------------------------------------------- mppools end to end
@pytest.mark.redis
@pytest.mark.timeout(90)
@pytest.mark.parametrize("order", ["after", "before"])
@pytest.mark.parametrize("lib", LIBS)
def test_forked_green_children_publish_within_budget(
    lib: str, order: str, redis_server: Any, budget_name: str
) -> None:
    """configure(), fork 2 children, each patches and runs 20 greenlets; limit 2.

    With ``order="after"`` the budget's locks exist before patching (gunicorn's arbiter):
    on the old code the keeper's real lock, held while the keeper thread started, deadlocked
    a child for good, and under eventlet every wait failed (``select.poll`` is gone).
    """
    children, greenlets, messages, limit = 2, 20, 5, 2
    queue = f"g{uuid.uuid4().hex[:8]}"
    with ProxyProcess(("127.0.0.1", redis_server.port)) as proxy:
        url = proxy.url_for(redis_server.url)
        rc, out, err = run([str(SCRIPT), lib, order, "publish", budget_name, url, queue,
                            str(children), str(greenlets), str(messages), str(limit)])
        peak = proxy.peak
        assert proxy.wait_current(0, 10)
    reports = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    arrived = redis_server.command("LLEN", queue)
    redis_server.command("DEL", queue)
    summary = f"rc={rc} peak={peak} arrived={arrived} reports={reports}\n{err[-2000:]}"
    assert rc == 0 and len(reports) == children, summary
    assert all(r["n_errors"] == 0 for r in reports), summary
    assert sum(r["ok"] for r in reports) == children * greenlets * messages, summary
    assert arrived == children * greenlets * messages, summary
    assert peak <= limit, summary


@pytest.mark.timeout(60)
@pytest.mark.parametrize("lib", LIBS)
def test_waiting_for_a_slot_lets_other_greenlets_run(lib: str, budget_name: str) -> None:
    """Limit 1: while one greenlet waits for the slot, a counting greenlet keeps running."""
    rc, out, err = run([str(SCRIPT), lib, "after", "yield", budget_name, "memory://", "q"])
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert rc == 0 and lines, f"rc={rc}\n{out[-2000:]}\n{err[-3000:]}"
    state = lines[0]
    assert state["got"], state
    # another process keeps the slot for ~1 s: ~150 ticks of 5 ms if the wait yields, ~0 if not
    assert state["ticks"] >= 10, state

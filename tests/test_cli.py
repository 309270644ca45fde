"""The ``mppools`` command: status / reclaim / unlink / demo, and the Prometheus exposition."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from uuid import uuid4

import pytest

import mppools
from mppools.__main__ import main as console_main
from mppools._limiter._base import BudgetStats, HolderStats, WaiterStats, local_host
from mppools._limiter.posix import PosixLimiter, exists
from mppools.cli import main, render_prometheus
from mppools.cli._demo import DemoOptions, run_demo

METRICS = (
    "mppools_slots_limit",
    "mppools_slots_in_use",
    "mppools_slots_free",
    "mppools_waiters",
    "mppools_debt",
    "mppools_acquired_total",
    "mppools_reclaimed_total",
    "mppools_acquire_timeouts_total",
    "mppools_holder_slots",
)


def _shm_paths(name: str) -> list[str]:
    return [f"/dev/shm/mppools.{name}", f"/dev/shm/sem.mppools.{name}.free"]


@pytest.fixture
def name() -> Iterator[str]:
    """A unique budget name; /dev/shm is left clean afterwards."""
    budget = f"clitest-{os.getpid()}-{uuid4().hex[:8]}"
    yield budget
    mppools.close()
    if exists(budget):
        mppools.unlink(budget, force=True)
    for path in _shm_paths(budget):
        if os.path.exists(path):  # a junk segment that was never a budget
            os.unlink(path)
    assert not any(os.path.exists(p) for p in _shm_paths(budget))


class Holder:
    """A forked child that creates the budget, takes ``slots`` slots and waits on a pipe."""

    def __init__(self, name: str, limit: int = 3, slots: int = 2) -> None:
        ready_r, ready_w = os.pipe()
        self._go_r, self._go_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                os.close(ready_r)
                os.close(self._go_w)
                limiter = mppools.configure(limit, name=name)
                for _ in range(slots):
                    limiter.acquire(timeout=5)
                os.write(ready_w, b"r")
                os.read(self._go_r, 1)  # until the parent says so (or dies)
                code = 0
            finally:
                os._exit(code)
        os.close(ready_w)
        os.close(self._go_r)
        self.pid = pid
        self.alive = True
        try:
            ready, _, _ = select.select([ready_r], [], [], 15)
            assert ready and os.read(ready_r, 1) == b"r", "holder child did not start"
        finally:
            os.close(ready_r)

    def kill(self) -> None:
        if self.alive:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.alive = False
            os.close(self._go_w)

    def stop(self) -> None:
        if self.alive:
            os.write(self._go_w, b"q")
            os.close(self._go_w)
            os.waitpid(self.pid, 0)
            self.alive = False


@pytest.fixture
def holder(name: str) -> Iterator[Holder]:
    child = Holder(name, limit=3, slots=2)
    try:
        yield child
    finally:
        child.kill()


def _run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", "mppools", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, check=False)


def _assert_one_line_error(err: str) -> None:
    assert err.strip(), "no error message"
    assert "Traceback" not in err
    assert err.strip().count("\n") == 0, err


# status ------------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_status_shows_holder_row(name: str, holder: Holder,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", name]) == 0
    out = capsys.readouterr().out
    assert f"budget {name!r}" in out
    assert "limit 3" in out and "in use 2" in out and "free 1" in out
    assert "waiting 0" in out and "debt 0" in out
    row = next(line for line in out.splitlines() if line.strip().startswith(str(holder.pid)))
    assert " 2 " in row and "busy" in row
    assert "python" in row.lower() or "pytest" in row.lower()  # its command line
    # the CLI took no slot: still exactly the child's two
    limiter = PosixLimiter.open(name, create=False)
    try:
        assert limiter.stats().in_use == 2
    finally:
        limiter.close()


@pytest.mark.timeout(30)
def test_status_flags_dead_holder(name: str, holder: Holder,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    holder.kill()
    assert main(["status", name]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.strip().startswith(str(holder.pid)))
    assert "DEAD" in row
    assert "mppools reclaim" in out


@pytest.mark.timeout(30)
def test_status_json(name: str, holder: Holder, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", name, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["name"] == name
    assert (data["limit"], data["in_use"], data["free"], data["waiting"]) == (3, 2, 1, 0)
    [row] = data["holders"]
    assert row["pid"] == holder.pid and row["slots"] == 2 and row["alive"] is True
    assert row["state"] == "busy" and row["age"] >= 0 and row["cmdline"]


@pytest.mark.timeout(30)
def test_status_prometheus(name: str, holder: Holder,
                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", name, "--prometheus"]) == 0
    out = capsys.readouterr().out
    for metric in METRICS:
        assert f"# HELP {metric} " in out
        assert f"# TYPE {metric} " in out
    assert f'mppools_slots_in_use{{budget="{name}"}} 2' in out
    assert (f'mppools_holder_slots{{budget="{name}",host="{local_host()}",pid="{holder.pid}",'
            f'state="busy"}} 2') in out


@pytest.mark.timeout(30)
def test_status_of_all_budgets(name: str, holder: Holder,
                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith(name))
    assert line.split()[1:5] == ["3", "2", "1", "0"]
    assert main(["status", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert name in [b["name"] for b in data["budgets"]]


@pytest.mark.timeout(30)
def test_status_watch_without_tty(name: str, holder: Holder,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", name, "--watch", "0.05", "-n", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- ") == 3 and "\x1b[" not in out
    assert main(["status", name, "--watch", "0.05", "-n", "2", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["in_use"] for line in lines] == [2, 2]


# user mistakes ----------------------------------------------------------------------
@pytest.mark.timeout(30)
@pytest.mark.parametrize("command", ["status", "reclaim", "unlink"])
def test_unknown_name_is_one_line_error(name: str, command: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, name]) == 2
    captured = capsys.readouterr()
    _assert_one_line_error(captured.err)
    assert name in captured.err and "no mppools budget" in captured.err
    assert main([command, "not a/valid name"]) == 2
    _assert_one_line_error(capsys.readouterr().err)


@pytest.mark.timeout(30)
def test_foreign_segment_is_refused_clearly(name: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    with open(f"/dev/shm/mppools.{name}", "wb") as f:
        f.write(b"definitely not an mppools segment\n" * 32)
    assert main(["status", name]) == 2
    err = capsys.readouterr().err
    _assert_one_line_error(err)
    assert "not an mppools segment" in err
    # the host-wide listing reports it but keeps going
    assert main(["status"]) == 0
    assert "unreadable" in capsys.readouterr().out
    assert main(["unlink", name]) == 2
    _assert_one_line_error(capsys.readouterr().err)
    assert main(["unlink", name, "--force"]) == 0
    assert not os.path.exists(f"/dev/shm/mppools.{name}")


@pytest.mark.timeout(30)
def test_foreign_owner_is_permission_error(name: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    PosixLimiter.open(name, create=True, limit=2).close()
    path = f"/dev/shm/mppools.{name}"
    os.chown(path, 54321, -1)
    try:
        assert main(["status", name]) == 2
        err = capsys.readouterr().err
        _assert_one_line_error(err)
        assert "uid 54321" in err
    finally:
        os.chown(path, os.geteuid(), -1)


@pytest.mark.timeout(30)
def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--workers", "0"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert main(["status", "--iterations", "2"]) == 2
    _assert_one_line_error(capsys.readouterr().err)
    assert main([]) == 2
    capsys.readouterr()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("command", ["status", "reclaim", "unlink", "demo"])
def test_help_has_examples(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"mppools {command}" in out


# reclaim / unlink -------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_reclaim_reports_killed_holder(name: str, holder: Holder,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    holder.kill()
    assert main(["reclaim", name]) == 0
    out = capsys.readouterr().out
    assert "reclaimed 2 slot(s)" in out
    assert f"pid {holder.pid}: slot(s)" in out
    assert "in use 0" in out
    assert main(["reclaim", name, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["reclaimed_slots"] == [] and data["stats"]["reclaimed_total"] == 2
    assert main(["reclaim", name]) == 0
    assert "nothing to reclaim" in capsys.readouterr().out


@pytest.mark.timeout(30)
def test_unlink_refused_while_held_then_forced(name: str, holder: Holder,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["unlink", name]) == 2
    err = capsys.readouterr().err
    _assert_one_line_error(err)
    assert str(holder.pid) in err and "--force" in err
    assert exists(name)
    assert main(["unlink", name, "--force"]) == 0
    assert "removed" in capsys.readouterr().out
    assert not any(os.path.exists(p) for p in _shm_paths(name))


@pytest.mark.timeout(30)
def test_unlink_after_holders_left(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    child = Holder(name, limit=2, slots=1)
    child.stop()
    assert main(["unlink", name]) == 0
    assert not exists(name)


# as a real process -------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_subprocess_status_and_errors(name: str, holder: Holder) -> None:
    done = _run("status", name, "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["in_use"] == 2 and data["holders"][0]["pid"] == holder.pid
    done = _run("status", f"{name}-missing")
    assert done.returncode == 2
    _assert_one_line_error(done.stderr)
    assert done.stdout == ""
    assert console_main is main


@pytest.mark.timeout(60)
def test_demo_subprocess(name: str) -> None:
    demo = f"{name}-demo"
    try:
        done = _run("demo", "--seconds", "6", "--workers", "4", "--limit", "2",
                    "--kill-every", "2", "--name", demo, timeout=50)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Traceback" not in done.stderr
        summary = done.stdout[done.stdout.index("mppools demo summary"):]
        assert "peak" in summary and ("≤ limit 2" in summary or "<= limit 2" in summary)
        assert "messages published" in summary and "kills" in summary
        assert "SIGKILL pid" in done.stdout  # at least one kill happened
        assert not any(os.path.exists(p) for p in _shm_paths(demo))
        assert not [e for e in os.listdir("/dev/shm") if demo in e]
    finally:
        if exists(demo):
            mppools.unlink(demo, force=True)


_KILL_LINE = re.compile(r"SIGKILL pid (\d+) holding (\d+) slot\(s\): (.*)")
_TIMED = re.compile(r"(slot back in|the master's audit took the slot back) \d+\.\d ms")
_SUMMARY_KILLS = re.compile(r"kills {15}(\d+), (\d+) timed")
_LIVE_KILLS = re.compile(r" kills (\d+) timed (\d+) reclaim p50 (\S+)")
_RECLAIMED = re.compile(r"(\d+) slot\(s\) since the start \(budget counter; the kills' "
                        r"victims held (\d+)")


@pytest.mark.timeout(90)
def test_demo_times_every_kill_and_reconciles(name: str) -> None:
    """Every kill is timed (none "not timed"); the last live line, the events and the summary
    give the same counts; no "0.0 ms" stands for a reclaim time before the first sample."""
    demo = f"{name}-kills"
    try:
        done = _run("demo", "--seconds", "5", "--workers", "4", "--limit", "2",
                    "--kill-every", "0.7", "--name", demo, "--seed", "3", timeout=80)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Traceback" not in done.stderr
        out = done.stdout
        head, summary = out.split("mppools demo summary", 1)
        kills = [_KILL_LINE.search(line) for line in head.splitlines()]
        events = [m for m in kills if m is not None]
        assert events, out
        assert "not timed" not in out
        for m in events:
            assert _TIMED.search(m.group(3)), m.group(0)
        live = [m for m in map(_LIVE_KILLS.search, head.splitlines()) if m is not None]
        assert live, out
        for m in live:
            assert m.group(1) == m.group(2)  # every kill so far is timed
            if m.group(1) == "0":
                assert m.group(3) == "\u2013", m.group(0)  # a dash, not 0.0 ms
        assert live[-1].group(1) == str(len(events))  # the final live line is up to date
        total = _SUMMARY_KILLS.search(summary)
        assert total is not None, summary
        assert total.group(1) == total.group(2) == str(len(events)), summary
        reclaimed = _RECLAIMED.search(summary)
        assert reclaimed is not None, summary
        assert int(reclaimed.group(2)) == sum(int(m.group(2)) for m in events)
        if "died on their own" not in summary:
            assert reclaimed.group(1) == reclaimed.group(2), summary
        assert "reclaim p50 " in summary and "p50 0.0 ms" not in summary
        # what L connections carry, measured before (and after) the run, beside the rate
        assert re.search(r"what 2 connection\(s\) carry alone: [\d,]+ msg/s", out), out
        assert re.search(r"messages published  \d+ \(\d+/s; 2 connection\(s\) alone carry "
                         r"[\d,]+/s: \d+\.\d\d\S of that\)", summary), summary
        assert "slow acquire: waited > 10 ms for a slot" in summary
        assert "debt: slots in use above the limit" in summary
        assert not [e for e in os.listdir("/dev/shm") if demo in e]
    finally:
        if exists(demo):
            mppools.unlink(demo, force=True)


class _FakeTTY(io.StringIO):
    """What the demo writes to a terminal, kept (every frame starts with a clear screen)."""

    encoding = "utf-8"

    def isatty(self) -> bool:
        return True


@pytest.mark.timeout(90)
def test_demo_live_view_explains_and_shows_a_dash_before_samples(name: str) -> None:
    """The terminal view explains "slow acquires" and "debt" in every frame, shows an en dash (not
    "0.0 ms") for reclaim times before the first kill, and its last frame agrees with the
    summary."""
    out = _FakeTTY()
    code = run_demo(DemoOptions(workers=3, limit=2, seconds=2.5, kill_every=1.0,
                                name=f"{name}-tty", seed=5, calibrate=0.2), out)
    assert code == 0, out.getvalue()
    text = out.getvalue()
    frames = [f for f in text.split("\x1b[H\x1b[2J") if f.startswith("mppools demo \u2014 budget")]
    assert len(frames) >= 3, text
    before = [f for f in frames if "\nkills      0, 0 timed" in f]
    assert before, frames[0]
    for frame in before:
        assert "reclaim p50 \u2013  p99 \u2013  max \u2013" in frame
        assert "0.0 ms" not in frame
    for frame in frames:
        assert "slow acquire: waited > 10 ms" in frame
        assert "debt: slots in use above the limit" in frame
        assert "hold quantum" in frame
        assert re.search(r"published  \d+ messages \(now \d+/s; 2 connection\(s\) alone "
                         r"carry [\d,]+/s", frame), frame
    last = re.search(r"\nkills      (\d+), (\d+) timed", frames[-1])
    summary = _SUMMARY_KILLS.search(text.split("mppools demo summary", 1)[1])
    assert last is not None and summary is not None
    assert last.group(1) == last.group(2) == summary.group(1) == summary.group(2)
    assert int(summary.group(1)) >= 1, text
    assert not exists(f"{name}-tty")


@pytest.mark.timeout(60)
def test_demo_cleans_up_on_ctrl_c(name: str) -> None:
    demo = f"{name}-int"
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    # Ctrl-C's default action, whatever this suite inherited: a non-interactive shell starts
    # background commands with SIGINT ignored, and Python keeps an inherited SIG_IGN
    ctrl_c = ("import runpy, signal, sys; "
              "signal.signal(signal.SIGINT, signal.default_int_handler); "
              "sys.argv[0] = 'mppools'; runpy.run_module('mppools', run_name='__main__')")
    proc = subprocess.Popen(
        [sys.executable, "-c", ctrl_c, "demo", "--seconds", "30", "--workers", "3",
         "--limit", "2", "--name", demo],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # the first status line: the workers run
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if exists(demo):
            mppools.unlink(demo, force=True)
    assert proc.returncode == 130, out + err
    assert "Traceback" not in err
    assert "(interrupted)" in out and "unlinked" in out and "temp dir" in out
    assert not [e for e in os.listdir("/dev/shm") if demo in e]


# the Prometheus exposition ---------------------------------------------------------------------
@pytest.mark.timeout(10)
def test_render_prometheus_format() -> None:
    now = time.time()
    stats = BudgetStats(
        name="web", backend="posix", host="h1", limit=3, in_use=2, free=1, waiting=4,
        debt=0,
        holders=(HolderStats(host="h1", pid=11, slots=2, idle=1, busy=1, since=now,
                             alive=True),),
        waiters=tuple(WaiterStats(host="h1", pid=p) for p in (12, 13, 14, 15)),
        creator_pid=10, created_at=now, acquired_total=7,
        reclaimed_total=1, timeouts_total=5, acquire_timeout=10.0, idle_timeout=None,
    )
    text = render_prometheus([stats, dataclasses.replace(stats, name="b2", holders=())])
    assert text.endswith("\n")
    lines = text.splitlines()
    for metric in METRICS:
        assert lines.count(f"# TYPE {metric} {_kind(metric)}") == 1
    assert 'mppools_waiters{budget="web"} 4.0' in lines
    assert 'mppools_acquire_timeouts_total{budget="web"} 5.0' in lines
    assert 'mppools_slots_free{budget="b2"} 1.0' in lines
    assert 'mppools_holder_slots{budget="web",host="h1",pid="11",state="idle"} 1.0' in lines
    assert 'mppools_holder_slots{budget="web",host="h1",pid="11",state="busy"} 1.0' in lines
    samples = [line for line in lines if not line.startswith("#")]
    assert all(isinstance(float(line.split()[-1]), float) for line in samples)
    assert render_prometheus([]) == ""


def _kind(metric: str) -> str:
    return "counter" if metric.endswith("_total") else "gauge"

"""``python -m stress bench [--quick] [--json PATH] [--plots DIR]``: mppools' benchmark.

Every figure is the median of many INTERLEAVED repetitions: subject and baseline run next
to each other in the same loop (order rotated every repetition) so machine noise falls on
both, and each is reported as a ratio to a named baseline measured in the same run. The
ratio column is the median of the per-repetition paired ratios. This is a benchmark, never
a test: nothing here asserts on timing. ``--quick`` (CI) only keeps the machinery working.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import multiprocessing
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import kombu
import kombu.pools
import posix_ipc
from kombu import Connection

import mppools
from mppools import _slots
from stress._bench_util import (
    Barrier,
    RedisProc,
    SysVSem,
    budget_name,
    fork_child,
    interleave,
    maybe_redis,
    median,
    paired_ratios,
    reap,
    run_group,
)

__all__ = ["main"]

FIGURES = ("warm", "warm_instructions", "slot", "contention", "reclaim", "idle", "e2e", "footprint",
           "e2e_contention", "gunicorn", "redis_hosts")


@dataclass(frozen=True)
class Plan:
    quick: bool
    warm_batch: int
    warm_reps: int
    slot_batch_s: float
    slot_reps: int
    cont_ns: tuple[int, ...]
    cont_limits: tuple[int, ...]
    cont_cs_us: tuple[int, ...]
    cont_window: float
    cont_reps: int
    reclaim_reps: int
    idle_reps: int
    idle_limit: int
    e2e_window: float
    e2e_reps: int
    e2e_workers: int
    foot_reps: int
    # 8. e2e under contention (stress/e2e_contention.py)
    e2ec_window: float = 0.3
    e2ec_reps: int = 1
    e2ec_workers: int = 8
    e2ec_limits: tuple[int, ...] = (2, 4)
    e2ec_delays_ms: tuple[int, ...] = (0, 20)
    e2ec_quanta: tuple[float, ...] = ()  # the hold-quantum sweep (when configure has it)
    e2ec_sweep_limit: int = 2
    e2ec_sweep_delay_ms: int = 20
    e2ec_rabbit: bool = False
    # 9. gunicorn-shaped load (stress/gunicorn_load.py)
    g_window: float = 0.4
    g_grace: float = 0.6
    g_reps: int = 1
    g_rates: tuple[int, ...] = (200, 800)
    g_delays_ms: tuple[int, ...] = (0, 20)
    g_limit: int = 3
    g_workers: int = 8


QUICK = Plan(True, 300, 9, 0.003, 7, (2, 8), (2,), (0, 20), 0.25, 1, 5, 5, 2, 0.4, 1, 8, 1)
FULL = Plan(False, 2000, 41, 0.015, 31, (2, 4, 8, 16, 64), (1, 2, 4), (0, 20), 0.6, 3,
            31, 31, 2, 1.5, 9, 8, 5,
            e2ec_window=3.0, e2ec_reps=3, e2ec_quanta=(0.0, 0.02, 0.05, 0.1, 0.2, 0.5),
            e2ec_rabbit=True, g_window=3.0, g_grace=2.0, g_reps=3)


@dataclass
class Row:
    key: str
    figure: str
    unit: str
    mppools: float | None
    baseline: float | None
    baseline_name: str
    ratio: float | None
    target: str
    met: bool | None
    higher_is_better: bool = False
    note: str = ""
    samples_mppools: list[float] | None = None
    samples_baseline: list[float] | None = None


def _met(value: float | None, limit: float, *, at_least: bool = False) -> bool | None:
    if value is None or math.isnan(value):
        return None
    return value >= limit if at_least else value <= limit


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _fresh_pools() -> None:
    """No pooled connection survives from one figure to the next (children must not share
    the parent's sockets)."""
    with contextlib.suppress(Exception):
        mppools.close()
    with contextlib.suppress(Exception):
        kombu.pools.reset()
    kombu.pools.set_limit(10)


# ---------------------------------------------------------------------------------------
# 1. warm path
# ---------------------------------------------------------------------------------------
def fig_warm(plan: Plan, url: str, label: str) -> Row:
    _fresh_pools()
    mppools.configure(limit=8, name=budget_name())
    try:
        conn_mp, conn_k = Connection(url), Connection(url)
        n = plan.warm_batch

        def batch(group: Any, conn: Connection) -> Callable[[], float]:
            def run() -> float:
                t = time.perf_counter()
                for _ in range(n):
                    with group[conn].acquire(block=True):
                        pass
                return (time.perf_counter() - t) / n * 1e6
            return run

        mp, kb = batch(mppools.producers, conn_mp), batch(kombu.pools.producers, conn_k)
        for _ in range(2):  # connect and warm both
            mp()
            kb()
        s = interleave([("mppools", mp), ("kombu", kb)], plan.warm_reps, 30 if plan.quick else 90)
    finally:
        _fresh_pools()
    ratio = median(paired_ratios(s["mppools"], s["kombu"]))
    return Row(f"warm_{label}", f"1. warm path, producers[conn].acquire ({label})", "us/op",
               median(s["mppools"]), median(s["kombu"]), "kombu.pools.producers", ratio,
               "<= 1.05x", _met(ratio, 1.05), samples_mppools=s["mppools"],
               samples_baseline=s["kombu"])


def fig_warm_instr(plan: Plan) -> tuple[Row | None, str | None]:
    """1b. the warm path in instructions (cachegrind): noise-free beside figure 1's times."""
    from stress.warm_instructions import fig_warm_instructions

    result, why = fig_warm_instructions(plan.quick)
    if result is None:
        return None, why
    ratio = result["mppools"] / result["kombu"]
    return Row("warm_instructions", "1b. warm path, producers[conn].acquire (memory, "
               "instructions)", "instr/op", result["mppools"], result["kombu"],
               "kombu.pools.producers", ratio, "<= 1.05x", _met(ratio, 1.05),
               note=f"cachegrind, {result['n']} operations; while another process "
               f"waits: {result['pressure']:,.0f} instr/op"), None


# ---------------------------------------------------------------------------------------
# 2. slot path
# ---------------------------------------------------------------------------------------
def _calibrated(op: Callable[[], None], target_s: float) -> Callable[[], float]:
    n = 8
    for _ in range(12):
        t = time.perf_counter()
        for _ in range(n):
            op()
        if time.perf_counter() - t > target_s / 4 or n >= 200_000:
            break
        n *= 4
    per_op = max((time.perf_counter() - t) / n, 1e-9)
    n = int(min(max(target_s / per_op, 5), 500_000))

    def run() -> float:
        t = time.perf_counter()
        for _ in range(n):
            op()
        return (time.perf_counter() - t) / n * 1e6

    return run


def fig_slot(plan: Plan, redis: RedisProc | None) -> list[Row]:
    _fresh_pools()
    lim = mppools.configure(limit=8, name=budget_name())
    raw_name = f"/{budget_name()}.raw"
    raw = posix_ipc.Semaphore(raw_name, posix_ipc.O_CREX, 0o600, 8)
    cleanups: list[Callable[[], None]] = []
    skipped: list[str] = []
    try:
        def mp_op() -> None:
            lim.release(lim.acquire(timeout=5))

        def raw_op() -> None:
            raw.acquire()
            raw.release()

        subjects: list[tuple[str, Callable[[], None]]] = [("mppools", mp_op),
                                                          ("posix_ipc raw pair", raw_op)]
        bsem = multiprocessing.BoundedSemaphore(8)

        def mpsem_op() -> None:
            bsem.acquire()
            bsem.release()

        subjects.append(("multiprocessing.BoundedSemaphore", mpsem_op))
        tmpdir = tempfile.mkdtemp(prefix="mppools-bench-locks-")
        cleanups.append(lambda: _rmtree(tmpdir))
        lock_fd = os.open(os.path.join(tmpdir, "lockf"), os.O_RDWR | os.O_CREAT, 0o600)
        cleanups.insert(0, lambda: os.close(lock_fd))

        def lockf_op() -> None:
            fcntl.lockf(lock_fd, fcntl.LOCK_EX, 1, 0)
            fcntl.lockf(lock_fd, fcntl.LOCK_UN, 1, 0)

        subjects.append(("fcntl.lockf lock+unlock (mppools' mutex alone)", lockf_op))
        try:
            import portalocker

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                psem = portalocker.BoundedSemaphore(8, name="bench", directory=tmpdir,
                                                    timeout=5)

            def portalocker_op() -> None:
                psem.acquire()
                psem.release()

            subjects.append(("portalocker.BoundedSemaphore", portalocker_op))
        except ImportError:
            skipped.append("portalocker.BoundedSemaphore")
        try:
            import fasteners

            flock = fasteners.InterProcessLock(os.path.join(tmpdir, "fasteners.lock"))

            def fasteners_op() -> None:
                flock.acquire()
                flock.release()

            subjects.append(("fasteners.InterProcessLock", fasteners_op))
        except ImportError:
            skipped.append("fasteners.InterProcessLock")
        if redis is None:
            skipped.append("redis INCR/DECR counter")
        else:
            try:
                import redis as redis_py

                client = redis_py.Redis(host="127.0.0.1", port=redis.port)
                key = budget_name()
                cleanups.append(lambda: client.delete(key))

                def redis_op() -> None:
                    if int(client.incr(key)) > 8:
                        client.decr(key)
                        raise RuntimeError("redis counter semaphore over its limit")
                    client.decr(key)

                subjects.append(("redis INCR/DECR counter", redis_op))
            except ImportError:
                skipped.append("redis INCR/DECR counter")
        runs = [(name, _calibrated(op, plan.slot_batch_s)) for name, op in subjects]
        s = interleave(runs, plan.slot_reps, 30 if plan.quick else 120)
    finally:
        for fn in cleanups:
            with contextlib.suppress(Exception):
                fn()
        raw.close()
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_semaphore(raw_name)
        _fresh_pools()
    base = s["posix_ipc raw pair"]
    ratio = median(paired_ratios(s["mppools"], base))
    rows = [Row("slot", "2. slot path, limiter acquire()+release()", "us/op",
                median(s["mppools"]), median(base), "raw posix_ipc.Semaphore pair", ratio,
                "<= 5x", _met(ratio, 5.0), samples_mppools=s["mppools"],
                samples_baseline=base)]
    for name, _ in subjects[2:]:
        key = "slot_ref_" + name.split(" ")[0].replace(".", "_").lower()
        r = median(paired_ratios(s["mppools"], s[name]))
        rows.append(Row(key, f"2. slot path, reference: {name}", "us/op",
                        median(s["mppools"]), median(s[name]), name, r, "-", None,
                        note=f"{name}: {median(paired_ratios(s[name], base)):.3g}x the raw "
                             "pair", samples_baseline=s[name]))
    for name in skipped:
        print(f"2. slot path, reference {name}: skipped: not installed")
        rows.append(Row("slot_ref_" + name.split(" ")[0].replace(".", "_").lower(),
                        f"2. slot path, reference: {name}", "us/op", None, None, name, None,
                        "-", None, note="skipped: not installed"))
    return rows


def _rmtree(path: str) -> None:
    for entry in os.listdir(path):
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(path, entry))
    os.rmdir(path)


# ---------------------------------------------------------------------------------------
# 3. contention
# ---------------------------------------------------------------------------------------
MAX_OPS = 50_000_000


def _busy(us: int) -> None:
    if us:
        end = time.perf_counter() + us * 1e-6
        for _ in range(1_000_000):
            if time.perf_counter() >= end:
                break


def _contention_once(subject: str, n: int, limit: int, cs_us: int, window: float
                     ) -> dict[str, Any]:
    if subject == "mppools":
        lim = mppools.configure(limit=limit, name=budget_name(), acquire_timeout=10.0)

        def body(b: Barrier) -> int:
            _start, end = b.wait()
            count = 0
            while count < MAX_OPS and time.monotonic() < end:
                slot = lim.acquire(timeout=10.0)
                _busy(cs_us)
                lim.release(slot)
                count += 1
            return count

        try:
            counts = run_group(n, body, window)
        finally:
            mppools.close()
    else:
        name = f"/{budget_name()}.raw"
        sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX, 0o600, limit)

        def body(b: Barrier) -> int:
            _start, end = b.wait()
            count = 0
            while count < MAX_OPS and time.monotonic() < end:
                sem.acquire(10.0)
                _busy(cs_us)
                sem.release()
                count += 1
            return count

        try:
            counts = run_group(n, body, window)
        finally:
            sem.close()
            with contextlib.suppress(posix_ipc.ExistentialError):
                posix_ipc.unlink_semaphore(name)
    got = [c for c in counts if c is not None]
    failed = n - len(got)
    total = sum(got)
    fairness = (min(got) / max(got)) if got and max(got) > 0 and not failed else 0.0
    return {"ops_s": total / window, "fairness": fairness, "failed": failed,
            "per_process": counts}


def fig_contention(plan: Plan) -> tuple[list[Row], list[dict[str, Any]]]:
    _fresh_pools()
    configs = [(n, lim, cs) for lim in plan.cont_limits for cs in plan.cont_cs_us
               for n in plan.cont_ns]
    raw: dict[tuple[int, int, int], dict[str, list[dict[str, Any]]]] = {
        c: {"mppools": [], "raw": []} for c in configs}
    deadline = time.monotonic() + (40 if plan.quick else 330)
    for rep in range(plan.cont_reps):
        for i, (n, lim, cs) in enumerate(configs):
            order = ["mppools", "raw"] if (rep + i) % 2 == 0 else ["raw", "mppools"]
            for subject in order:
                raw[(n, lim, cs)][subject].append(
                    _contention_once(subject, n, lim, cs, plan.cont_window))
        _log(f"contention repetition {rep + 1}/{plan.cont_reps} done")
        if time.monotonic() > deadline:
            break
    detail: list[dict[str, Any]] = []
    for (n, lim, cs), runs in raw.items():
        mp_ops = [r["ops_s"] for r in runs["mppools"]]
        rw_ops = [r["ops_s"] for r in runs["raw"]]
        detail.append({
            "n": n, "limit": lim, "cs_us": cs,
            "mppools_ops_s": median(mp_ops), "raw_ops_s": median(rw_ops),
            "throughput_ratio": median(paired_ratios(mp_ops, rw_ops)),
            "mppools_fairness": median([r["fairness"] for r in runs["mppools"]]),
            "raw_fairness": median([r["fairness"] for r in runs["raw"]]),
            "mppools_failed": sum(r["failed"] for r in runs["mppools"]),
            "raw_failed": sum(r["failed"] for r in runs["raw"]),
            "mppools_samples": mp_ops, "raw_samples": rw_ops,
            "mppools_per_process": [r["per_process"] for r in runs["mppools"]],
        })
    rows: list[Row] = []
    fair_n = 16 if 16 in plan.cont_ns else max(plan.cont_ns)
    for lim in plan.cont_limits:
        for cs in plan.cont_cs_us:
            ds = [d for d in detail if d["limit"] == lim and d["cs_us"] == cs]
            worst = min(ds, key=lambda d: d["throughput_ratio"])
            tag = f"L={lim}, cs={cs}us"
            rows.append(Row(
                f"contention_throughput_L{lim}_cs{cs}",
                f"3. contention throughput, worst N ({tag}; N={worst['n']})", "ops/s",
                worst["mppools_ops_s"], worst["raw_ops_s"], "raw posix_ipc semaphore",
                worst["throughput_ratio"], ">= 0.9x", _met(worst["throughput_ratio"], 0.9,
                                                            at_least=True),
                higher_is_better=True,
                note="ratios over N: " + ", ".join(
                    f"N={d['n']}: {d['throughput_ratio']:.3g}" for d in ds)))
            fd = next(d for d in ds if d["n"] == fair_n)
            fr = fd["mppools_fairness"] / fd["raw_fairness"] if fd["raw_fairness"] else None
            rows.append(Row(
                f"contention_fairness_L{lim}_cs{cs}",
                f"3. fairness min/max ops per process (N={fair_n}, {tag})", "min/max",
                fd["mppools_fairness"], fd["raw_fairness"], "raw posix_ipc semaphore", fr,
                ">= 0.7 (mppools)", _met(fd["mppools_fairness"], 0.7, at_least=True),
                higher_is_better=True))
            cost_mp = [1e6 / d["mppools_ops_s"] if d["mppools_ops_s"] else float("inf")
                       for d in ds]
            cost_rw = [1e6 / d["raw_ops_s"] if d["raw_ops_s"] else float("inf") for d in ds]
            flat_mp = max(cost_mp) / min(cost_mp)
            flat_rw = max(cost_rw) / min(cost_rw)
            ns = f"N={min(plan.cont_ns)}..{max(plan.cont_ns)}"
            rows.append(Row(
                f"contention_flatness_L{lim}_cs{cs}",
                f"3. per-op cost flatness max/min over {ns} ({tag})", "x",
                flat_mp, flat_rw, "raw posix_ipc semaphore", flat_mp / flat_rw,
                "<= 1.2 (mppools)", _met(flat_mp, 1.2),
                note="per-op cost us (mppools): " + ", ".join(
                    f"N={d['n']}: {c:.3g}" for d, c in zip(ds, cost_mp, strict=True))))
    return rows, detail


# ---------------------------------------------------------------------------------------
# 4. reclaim latency
# ---------------------------------------------------------------------------------------
def _holder(take: Callable[[], object]) -> tuple[int, int, int]:
    """Fork a child that takes the only slot, says so on a pipe and blocks in os.read."""
    said_r, said_w = os.pipe()
    block_r, block_w = os.pipe()

    def child() -> int:
        os.close(said_r)
        os.close(block_w)
        take()
        os.write(said_w, b"h")
        os.read(block_r, 1)  # until killed (or the parent goes away)
        return 0

    pid = fork_child(child)
    os.close(said_w)
    os.close(block_r)
    try:
        import select

        ready, _, _ = select.select([said_r], [], [], 10.0)
        if not ready or os.read(said_r, 1) != b"h":
            raise RuntimeError("the holder child did not take the slot")
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        reap([pid])
        os.close(said_r)
        os.close(block_w)
        raise
    return pid, said_r, block_w


def _kill_and_time(pid: int, wait: Callable[[], bool], is_waiting: Callable[[], bool]
                   ) -> float:
    done: list[float] = []
    ok: list[bool] = []
    started = threading.Event()

    def waiter() -> None:
        started.set()
        ok.append(wait())
        done.append(time.perf_counter())

    th = threading.Thread(target=waiter, daemon=True)
    th.start()
    started.wait(5.0)
    end = time.monotonic() + 2.0
    while not is_waiting() and time.monotonic() < end:
        time.sleep(0.001)
    time.sleep(0.02)  # both subjects: settle into the blocking call
    t0 = time.perf_counter()
    os.kill(pid, signal.SIGKILL)
    th.join(10.0)
    if not done or not ok or not ok[0]:
        raise RuntimeError("the waiter did not get the slot")
    return (done[0] - t0) * 1e3


def _reclaim_mppools() -> float:
    lim = mppools.configure(limit=1, name=budget_name(), acquire_timeout=5.0)
    got: list[Any] = []
    try:
        pid, a, b = _holder(lambda: lim.acquire(timeout=5.0))
        try:
            def wait() -> bool:
                got.append(lim.acquire(timeout=5.0))
                return True

            return _kill_and_time(pid, wait, lambda: lim.stats().waiting > 0)
        finally:
            reap([pid])
            os.close(a)
            os.close(b)
            for slot in got:
                lim.release(slot)
    finally:
        mppools.close()


def _reclaim_sysv() -> float:
    sem = SysVSem(1)
    try:
        pid, a, b = _holder(lambda: sem.acquire(undo=True, timeout=5.0))
        try:
            return _kill_and_time(pid, lambda: sem.acquire(undo=False, timeout=5.0),
                                  lambda: True)
        finally:
            reap([pid])
            os.close(a)
            os.close(b)
    finally:
        sem.remove()


def fig_reclaim(plan: Plan) -> Row:
    _fresh_pools()
    s = interleave([("mppools", _reclaim_mppools), ("sysv", _reclaim_sysv)],
                   plan.reclaim_reps, 20 if plan.quick else 90)
    ratio = median(paired_ratios(s["mppools"], s["sysv"]))
    m_mp, m_sv = median(s["mppools"]), median(s["sysv"])
    return Row("reclaim", "4. reclaim latency, SIGKILL of the holder -> acquire returns", "ms",
               m_mp, m_sv, "kernel SysV SEM_UNDO release", ratio, "<= 2x (median)",
               _met(m_mp / m_sv if m_sv else None, 2.0),
               note=f"ratio of medians {m_mp / m_sv:.3g}; mppools p90 "
                    f"{sorted(s['mppools'])[int(0.9 * (len(s['mppools']) - 1))]:.3g} ms",
               samples_mppools=s["mppools"], samples_baseline=s["sysv"])


# ---------------------------------------------------------------------------------------
# 5. idle-yield latency
# ---------------------------------------------------------------------------------------
def _idle_holders(n: int) -> tuple[list[int], int, int]:
    said_r, said_w = os.pipe()
    block_r, block_w = os.pipe()

    def child() -> int:
        os.close(said_r)
        os.close(block_w)
        conn = mppools.connections[Connection("memory://")].acquire(block=True, timeout=5.0)
        conn.connect()
        conn.release()  # idle in this process's pool, still holding its slot
        os.write(said_w, b"i")
        os.read(block_r, 1)  # blocked in a syscall, never calls mppools again
        return 0

    pids = [fork_child(child) for _ in range(n)]
    os.close(said_w)
    os.close(block_r)
    got = b""
    end = time.monotonic() + 15.0
    import select

    while len(got) < n and time.monotonic() < end:
        ready, _, _ = select.select([said_r], [], [], 0.5)
        if ready:
            chunk = os.read(said_r, 64)
            if not chunk:
                break
            got += chunk
    if len(got) < n:
        os.close(block_w)
        reap(pids, timeout=5.0)
        os.close(said_r)
        raise RuntimeError(f"only {len(got)} of {n} idle holders got ready")
    return pids, said_r, block_w


def _timed_connect() -> float:
    t0 = time.perf_counter()
    conn = mppools.connections[Connection("memory://")].acquire(block=True, timeout=5.0)
    conn.connect()
    dt = (time.perf_counter() - t0) * 1e3
    conn.release()
    return dt


def _idle_yield(limit: int) -> float:
    mppools.configure(limit=limit, name=budget_name(), acquire_timeout=5.0)
    try:
        pids, a, b = _idle_holders(limit)
        try:
            if mppools.stats().in_use != limit:
                raise RuntimeError("the idle holders do not hold every slot")
            return _timed_connect()
        finally:
            mppools.pools.reset()
            os.close(b)  # the holders' os.read returns: they exit
            reap(pids, timeout=10.0)
            os.close(a)
    finally:
        mppools.close()


def _free_slot(limit: int) -> float:
    mppools.configure(limit=limit, name=budget_name(), acquire_timeout=5.0)
    try:
        return _timed_connect()
    finally:
        mppools.close()


def fig_idle(plan: Plan) -> Row:
    _fresh_pools()
    lim = plan.idle_limit
    s = interleave([("yield", lambda: _idle_yield(lim)), ("free", lambda: _free_slot(lim))],
                   plan.idle_reps, 20 if plan.quick else 90)
    m = median(s["yield"])
    return Row("idle_yield", f"5. idle-yield latency (L={lim} idle holders blocked in read)",
               "ms", m, median(s["free"]), "acquire+connect with a free slot",
               median(paired_ratios(s["yield"], s["free"])), "<= 10 ms (median)",
               _met(m, 10.0), note="ratio is informative; the target is absolute",
               samples_mppools=s["yield"], samples_baseline=s["free"])


# ---------------------------------------------------------------------------------------
# 6. end to end
# ---------------------------------------------------------------------------------------
BODY = {"task": "bench", "args": [1, 2, 3], "kwargs": {"x": "y" * 64}}


def _e2e_once(url: str, subject: str, limit: int, plan: Plan) -> float:
    queue = "bench-e2e"
    if subject == "mppools":
        mppools.configure(limit=limit, name=budget_name(), acquire_timeout=30.0)

    def body(b: Barrier) -> int:
        if subject == "kombu":
            kombu.pools.set_limit(1)
            group: Any = kombu.pools.producers
        else:
            group = mppools.producers
        conn = Connection(url)
        with group[conn].acquire(block=True, timeout=30.0) as p:  # connect before the start
            p.publish(BODY, routing_key=queue, retry=False)
        _start, end = b.wait()
        count = 0
        while count < MAX_OPS and time.monotonic() < end:
            with group[conn].acquire(block=True, timeout=30.0) as p:
                p.publish(BODY, routing_key=queue, retry=False)
            count += 1
        return count

    try:
        counts = run_group(plan.e2e_workers, body, plan.e2e_window, result_timeout=90.0)
    finally:
        if subject == "mppools":
            mppools.close()
    if any(c is None for c in counts):
        raise RuntimeError(f"e2e {subject} L={limit}: a worker failed")
    return sum(c for c in counts if c is not None) / plan.e2e_window


def fig_e2e(plan: Plan, redis: RedisProc) -> list[Row]:
    _fresh_pools()
    import redis as redis_py

    client = redis_py.Redis(host="127.0.0.1", port=redis.port, db=1)
    url = f"{redis.url}/1"

    def run(subject: str, limit: int) -> Callable[[], float]:
        def go() -> float:
            client.flushdb()
            return _e2e_once(url, subject, limit, plan)
        return go

    subjects = [("mppools L=8", run("mppools", 8)), ("kombu", run("kombu", 1)),
                ("mppools L=4", run("mppools", 4)), ("mppools L=2", run("mppools", 2))]
    try:
        s = interleave(subjects, plan.e2e_reps, 30 if plan.quick else 200,
                       min_reps=1 if plan.quick else 3)
    finally:
        with contextlib.suppress(Exception):
            client.flushdb()
        client.close()
        _fresh_pools()
    rows = []
    for lim in (8, 4, 2):
        name = f"mppools L={lim}"
        r = median(paired_ratios(s[name], s["kombu"]))
        target, met = ("-", None) if lim != 8 else (">= 0.97x", _met(r, 0.97, at_least=True))
        rows.append(Row(f"e2e_redis_L{lim}",
                        f"6. e2e publish, {plan.e2e_workers} workers, redis, mppools L={lim}",
                        "msg/s", median(s[name]), median(s["kombu"]),
                        "kombu.pools, limit 1 per process", r, target, met,
                        higher_is_better=True, samples_mppools=s[name],
                        samples_baseline=s["kombu"]))
    return rows


# ---------------------------------------------------------------------------------------
# 7. footprint
# ---------------------------------------------------------------------------------------
_FOOT = r"""
import json, os, sys, threading
import psutil
from kombu import Connection
mode = sys.argv[1]
if mode == "kombu":
    import kombu.pools as pools
else:
    import mppools
    pools = mppools
    mppools.configure(limit=8, name=sys.argv[2])
conn = pools.connections[Connection("memory://")].acquire(block=True)
conn.connect()
mem = psutil.Process().memory_full_info()
out = {"threads": threading.active_count(), "rss": mem.rss, "uss": mem.uss}
conn.release()
if mode != "kombu":
    mppools.close()
print(json.dumps(out), flush=True)
os._exit(0)
"""


def _foot_run(mode: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", _FOOT, mode, budget_name()],
                         capture_output=True, text=True, timeout=60, check=True)
    return {k: float(v) for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def fig_footprint(plan: Plan) -> list[Row]:
    _fresh_pools()
    runs: dict[str, list[dict[str, float]]] = {"mppools": [], "kombu": []}
    s = interleave([(m, lambda m=m: runs[m].append(_foot_run(m)) or 0.0)  # type: ignore[func-returns-value]
                    for m in ("mppools", "kombu")], plan.foot_reps, 60, min_reps=1)
    del s
    lim = mppools.configure(limit=8, name=budget_name())
    try:
        seg = int(lim.stats().extra["segment_bytes"])
        cap = int(lim.stats().extra["capacity"])
    finally:
        mppools.close()
    raw_name = budget_name() + ".raw"
    sem = posix_ipc.Semaphore("/" + raw_name, posix_ipc.O_CREX, 0o600, 1)
    try:
        sem_bytes = os.stat(f"/dev/shm/sem.{raw_name}").st_size
    finally:
        sem.close()
        posix_ipc.unlink_semaphore("/" + raw_name)

    def med(mode: str, k: str) -> float:
        return median([r[k] for r in runs[mode]])

    mib = 1024 * 1024
    rss_mp, rss_k = med("mppools", "rss") / mib, med("kombu", "rss") / mib
    uss_mp, uss_k = med("mppools", "uss") / mib, med("kombu", "uss") / mib
    per_slot = _slots.SLOT_SIZE + _slots.WAITER_SIZE
    return [
        Row("footprint_slot_bytes", "7. shared memory per slot (slot + waiter record)", "B",
            float(per_slot), float(sem_bytes), "one POSIX sem_t", per_slot / sem_bytes, "-",
            None, note=f"SLOT_SIZE={_slots.SLOT_SIZE}, WAITER_SIZE={_slots.WAITER_SIZE}"),
        Row("footprint_segment_bytes",
            f"7. shared memory per budget segment (capacity {cap})", "B", float(seg),
            float(sem_bytes), "one POSIX sem_t", seg / sem_bytes, "-", None,
            note=f"segment_size({cap}, {cap}) = {_slots.segment_size(cap, cap)}; "
                 f"header {_slots.HEADER_SIZE} B; plus one semaphore"),
        Row("footprint_threads", "7. threads per process after taking a slot", "threads",
            med("mppools", "threads"), med("kombu", "threads"), "bare kombu process",
            med("mppools", "threads") / med("kombu", "threads"), "-", None,
            note="the extra thread is mppools' keeper"),
        Row("footprint_rss", "7. RSS per process (import+configure+1 connection)", "MiB",
            rss_mp, rss_k, "bare kombu process", rss_mp / rss_k, "-", None,
            note=f"added: RSS {rss_mp - rss_k:+.2f} MiB, USS {uss_mp - uss_k:+.2f} MiB"),
    ]


# ---------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------
def _fmt(v: float | None) -> str:
    if v is None or math.isnan(v):
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def table(rows: list[Row]) -> str:
    lines = ["| figure | mppools | baseline (name) | ratio | target | met? |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r.note.startswith("skipped"):
            lines.append(f"| {r.figure} | - | {r.baseline_name}: {r.note} | - | - | - |")
            continue
        met = "-" if r.met is None else ("yes" if r.met else "**no**")
        lines.append(
            f"| {r.figure} | {_fmt(r.mppools)} {r.unit} | {_fmt(r.baseline)} {r.unit} "
            f"({r.baseline_name}) | {_fmt(r.ratio)}x | {r.target} | {met} |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(), "cpu_model": model,
        "kernel": platform.release(), "python": platform.python_version(),
        "kombu": kombu.__version__, "mppools": mppools.__version__,
        "posix_ipc": getattr(posix_ipc, "VERSION", "?"), "loadavg_start": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stress bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="CI mode: < 60 s, few repetitions")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument("--plots", metavar="DIR", help="write PNG plots (needs matplotlib)")
    ap.add_argument("--only", metavar="LIST", help=f"comma list of {','.join(FIGURES)}")
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else FULL
    only = set(args.only.split(",")) if args.only else set(FIGURES)
    unknown = only - set(FIGURES)
    if unknown:
        ap.error(f"unknown figures: {', '.join(sorted(unknown))}")
    started = time.monotonic()
    meta = machine()
    meta.update(mode="quick" if plan.quick else "full", plan=asdict(plan),
                started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    rows: list[Row] = []
    detail: list[dict[str, Any]] = []
    skipped: list[str] = ["6. rabbitmq: skipped in this version (redis only)"]
    with maybe_redis("warm" in only or "slot" in only or "e2e" in only
                     or "e2e_contention" in only or "gunicorn" in only) as redis:
        if "warm" in only:
            _log("1. warm path")
            rows.append(fig_warm(plan, "memory://", "memory"))
            if redis is not None:
                rows.append(fig_warm(plan, redis.url, "redis"))
            else:
                skipped.append("1. warm path (redis): redis-server unavailable")
        if "warm_instructions" in only:
            _log("1b. warm path in instructions")
            instr_row, why = fig_warm_instr(plan)
            if instr_row is not None:
                rows.append(instr_row)
            if why is not None:
                skipped.append(why)
        if "slot" in only:
            _log("2. slot path")
            rows += fig_slot(plan, redis)
        if "contention" in only:
            _log("3. contention")
            more, detail = fig_contention(plan)
            rows += more
        if "reclaim" in only:
            _log("4. reclaim latency")
            rows.append(fig_reclaim(plan))
        if "idle" in only:
            _log("5. idle-yield latency")
            rows.append(fig_idle(plan))
        if "e2e" in only:
            _log("6. end to end")
            if redis is not None:
                rows += fig_e2e(plan, redis)
            else:
                skipped.append("6. e2e (redis): redis-server unavailable")
        if "footprint" in only:
            _log("7. footprint")
            rows += fig_footprint(plan)
        if "e2e_contention" in only:
            _log("8. end to end under contention")
            from stress.e2e_contention import fig_e2e_contention

            more_rows, more_skipped = fig_e2e_contention(plan, redis)
            rows += more_rows
            skipped += more_skipped
        if "gunicorn" in only:
            _log("9. gunicorn-shaped load")
            from stress.gunicorn_load import fig_gunicorn

            more_rows, more_skipped = fig_gunicorn(plan, redis)
            rows += more_rows
            skipped += more_skipped
        if "redis_hosts" in only:
            _log("10. across hosts on redis (reclaim after a host kill, 3 hosts vs 1, idle)")
            from stress.redis_lease import fig_redis_hosts

            try:
                rows += fig_redis_hosts(plan.quick)
            except Exception as exc:  # no unshare or root, no redis-server: skipped, said
                skipped.append(f"10. across hosts: {exc}")
    elapsed = time.monotonic() - started
    meta.update(elapsed_s=elapsed, loadavg_end=os.getloadavg())
    print()
    print(table(rows))
    for line in skipped:
        print(f"- {line}")
    print(f"\n{meta['mode']} run, {elapsed:.1f} s, {meta['nproc']} x {meta['cpu_model']}, "
          f"Linux {meta['kernel']}, Python {meta['python']}")
    result = {"meta": meta, "figures": {r.key: asdict(r) for r in rows},
              "contention": detail, "skipped": skipped, "table": table(rows)}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=float))
        print(f"JSON written to {args.json}")
    if args.plots:
        from stress._bench_plots import plot

        plot(result, Path(args.plots))
    return 0

"""gunicorn (8 sync workers) publishing through one budget, with SIGKILL chaos.

The judge trusts nothing in mppools: a CountingProxy in front of RabbitMQ counts the open
connections exactly, ``rabbitmqctl list_connections`` cross-checks, and the vhost's
``max-connections`` is the backstop. Messages are counted by consuming the queue over a
connection that does not go through the proxy.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from support.proxy_process import ProxyProcess
from support.servers import RabbitMQServer

import mppools

from .conftest import (
    Gunicorn,
    Sampler,
    base_env,
    drain_queue,
    explain_refusals,
    load,
    read_refusals,
    shm_objects,
    wait_until,
)

WORKERS = 8
LIMIT = 3
CLIENTS = 16
LOAD_SECONDS = 22.0


class Chaos(threading.Thread):
    """Every ``every`` seconds, SIGKILL a gunicorn worker that holds a broker connection."""

    def __init__(self, server: Gunicorn, name: str, every: float) -> None:
        super().__init__(daemon=True)
        self.server, self.name, self.every = server, name, every
        self.kills: list[tuple[float, int, int]] = []  # (time, pid, busy slots)
        self.stop = threading.Event()

    def run(self) -> None:
        rng = random.Random(1)
        while not self.stop.wait(self.every):
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and not self.stop.is_set():
                workers = self.server.worker_pids()
                holders = [h for h in mppools.stats().holders
                           if h.alive and h.pid in workers]
                busy = [h for h in holders if h.busy]
                pick = busy or holders
                if pick:
                    victim = rng.choice(pick)
                    if victim.pid in self.server.worker_pids():  # ours, still
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(victim.pid, signal.SIGKILL)
                            self.kills.append((time.monotonic(), victim.pid, victim.busy))
                    break
                time.sleep(0.002)


def _scenario(rabbit: RabbitMQServer, tmp_path: Path, budget: str | None, *, chaos: bool,
              seconds: float, backstop: int | None) -> dict[str, Any]:
    vhost = f"g{uuid.uuid4().hex[:8]}"
    rabbit.add_vhost(vhost)
    if backstop is not None:
        rabbit.set_vhost_max_connections(vhost, backstop)
    direct = rabbit.url_for_vhost(vhost)
    queue = f"q{uuid.uuid4().hex[:6]}"
    refusals_path = tmp_path / "refusals.log"
    with ProxyProcess(("127.0.0.1", rabbit.port)) as proxy:
        env = base_env(ITEST_BROKER_URL=proxy.url_for(direct), ITEST_QUEUE=queue,
                       ITEST_REFUSALS=str(refusals_path), ITEST_HOLD_MS="5",
                       ITEST_MODE="mppools" if budget else "kombu",
                       ITEST_SOCKLOG=os.environ.get("ITEST_SOCKLOG", ""))
        if budget:
            env.update(MPPOOLS_LIMIT=str(LIMIT), MPPOOLS_NAME=budget,
                       MPPOOLS_ACQUIRE_TIMEOUT="10")
        server = Gunicorn(tmp_path, workers=WORKERS, env=env)
        try:
            server.wait_ready()
            if budget:
                mppools.attach(budget)  # read-only use: stats(); takes no slot
            killer = Chaos(server, budget or "", every=2.0) if chaos else None
            with Sampler(lambda: rabbit.connection_count(vhost), interval=1.0) as sampler:
                if killer:
                    killer.start()
                result = load(server.port, clients=CLIENTS, seconds=seconds, prefix="r")
                if killer:
                    killer.stop.set()
                    killer.join(10)
                # after the chaos: a new burst succeeds within a few seconds
                t0 = time.monotonic()
                burst = load(server.port, clients=CLIENTS, seconds=0.5, prefix="b")
                burst_s = time.monotonic() - t0
            peak = proxy.peak
            history = proxy.history
            total_accepted = proxy.total_accepted
            stats = mppools.stats() if budget else None
            master_pid = server.proc.pid
        finally:
            # detach first: the master's on_exit leaves a budget another process has open
            with contextlib.suppress(Exception):
                mppools.close(unlink=False)
            server.stop()
        assert wait_until(lambda: proxy.current == 0, 10)
    found = drain_queue(direct, queue)
    refusals = read_refusals(refusals_path)
    with contextlib.suppress(Exception):
        rabbit.delete_vhost(vhost)
    return {
        "peak": peak, "history": history, "result": result, "burst": burst,
        "burst_seconds": burst_s, "found": found, "refusals": refusals,
        "rabbit_peak": sampler.peak, "rabbit_samples": len(sampler.samples),
        "kills": killer.kills if killer else [], "stats": stats, "master": master_pid,
        "total_accepted": total_accepted, "log": server.log_tail(30),
    }


@pytest.mark.rabbitmq
@pytest.mark.timeout(150)
def test_gunicorn_sigkill_chaos_stays_within_budget(
    rabbit: RabbitMQServer, tmp_path: Path, budget_name: str
) -> None:
    out = _scenario(rabbit, tmp_path, budget_name, chaos=True, seconds=LOAD_SECONDS,
                    backstop=LIMIT)
    result, burst = out["result"], out["burst"]
    found_ids = {m["id"] for m in out["found"]}
    ok_ids = set(result.ok_ids)
    unexplained = explain_refusals(out["refusals"], out["history"], LIMIT)
    summary = (
        f"peak={out['peak']} rabbit_peak={out['rabbit_peak']} ({out['rabbit_samples']} samples) "
        f"requests={result.total} ok={len(ok_ids)} "
        f"failed={len(result.failures)} kills={len(out['kills'])} "
        f"refusals={len(out['refusals'])} unexplained={len(unexplained)} "
        f"messages={len(out['found'])} burst={len(burst.ok_ids)}/{burst.total} "
        f"in {out['burst_seconds']:.2f}s connections_opened={out['total_accepted']}"
    )
    print(summary)
    hist = out["history"]
    kills = out["kills"]
    for i, (t, n) in enumerate(hist):
        if n > LIMIT:
            near = [round(t - k[0], 4) for k in kills if -0.5 < t - k[0] < 3]
            print("OVER", n, "at", round(t, 4), "since kills", near,
                  [(round(a - t, 4), b) for a, b in hist[max(0, i - 6):i + 3]])
    print("first failures:", result.failures[:5])
    assert out["peak"] <= LIMIT, summary
    assert not unexplained, f"{summary}\nunexplained refusals: {unexplained[:5]}"
    assert len(out["kills"]) >= 5, summary
    assert len(ok_ids) >= 0.95 * result.total, summary
    missing = ok_ids - found_ids
    assert not missing, f"{summary}\n{len(missing)} answered requests lost: {sorted(missing)[:5]}"
    assert burst.total > 0 and not burst.failures, f"{summary}\n{burst.failures[:5]}"
    assert out["burst_seconds"] < 10, summary
    assert out["rabbit_peak"] <= LIMIT, summary
    assert not shm_objects(budget_name), "gunicorn's on_exit did not remove the budget"


@pytest.mark.rabbitmq
@pytest.mark.timeout(120)
def test_plain_kombu_pools_fail_the_peak_check(rabbit: RabbitMQServer, tmp_path: Path) -> None:
    """The same judge fails plain kombu.pools: 8 workers keep 8 connections."""
    out = _scenario(rabbit, tmp_path, None, chaos=False, seconds=6.0, backstop=None)
    print(f"kombu.pools: peak={out['peak']} rabbit_peak={out['rabbit_peak']}")
    assert out["peak"] > LIMIT

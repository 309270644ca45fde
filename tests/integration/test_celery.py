"""celery -P prefork -c 8, limit 2: tasks publish through the app's own producer pool.

The worker consumes from one vhost directly (not counted) and publishes, through
``app.producer_pool`` (made an mppools pool by ``install(app)``), to another vhost through
a counting proxy; the publish vhost's max-connections is the backstop. Pool children are
SIGKILLed while they hold a connection.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest
from celery import Celery
from support.proxy_process import ProxyProcess
from support.servers import RabbitMQServer, popen

import mppools

from .conftest import (
    APPS,
    Sampler,
    base_env,
    child_pids,
    drain_queue,
    explain_refusals,
    read_refusals,
    shm_objects,
    wait_until,
)

LIMIT = 2
CONCURRENCY = 8
TASKS = 2000


@pytest.mark.rabbitmq
@pytest.mark.timeout(240)
def test_celery_prefork_sigkill_chaos_stays_within_budget(
    rabbit: RabbitMQServer, tmp_path: Path, budget_name: str
) -> None:
    tag = uuid.uuid4().hex[:8]
    read_vhost, pub_vhost = f"c{tag}", f"p{tag}"
    for vhost in (read_vhost, pub_vhost):
        rabbit.add_vhost(vhost)
    rabbit.set_vhost_max_connections(pub_vhost, LIMIT)
    results = tmp_path / "results"
    results.mkdir()
    out_queue = f"out{tag}"
    with ProxyProcess(("127.0.0.1", rabbit.port)) as proxy:
        env = base_env(
            ITEST_READ_URL=rabbit.url_for_vhost(read_vhost),
            ITEST_WRITE_URL=proxy.url_for(rabbit.url_for_vhost(pub_vhost)),
            ITEST_RESULTS=str(results), ITEST_OUT_QUEUE=out_queue, ITEST_HOLD_MS="3",
            MPPOOLS_LIMIT=str(LIMIT), MPPOOLS_NAME=budget_name,
            MPPOOLS_ACQUIRE_TIMEOUT="25", ITEST_REFUSALS=str(tmp_path / "refusals.log"),
        )
        log = tmp_path / "worker.log"
        worker = popen(
            [sys.executable, "-m", "celery", "-A", "celery_app", "worker", "-P", "prefork",
             "-c", str(CONCURRENCY), "--without-gossip", "--without-mingle",
             "--without-heartbeat", "-l", "info", "-n", f"w{tag}@localhost"],
            log_path=log, cwd=APPS, env=env,
        )
        client = Celery("client", broker=rabbit.url_for_vhost(read_vhost),
                        backend="file://" + str(results))
        kills: list[int] = []
        try:
            assert wait_until(lambda: len(child_pids(worker.pid)) >= CONCURRENCY
                              and os.path.exists(f"/dev/shm/mppools.{budget_name}"), 40,
                              0.2), log.read_text()[-3000:]
            mppools.attach(budget_name)  # read-only: stats(); takes no slot
            t0 = time.monotonic()
            ids = [client.send_task("celery_app.publish", args=(i,)).id for i in range(TASKS)]
            rng = random.Random(2)
            with Sampler(lambda: rabbit.connection_count(pub_vhost), interval=1.0) as sampler:
                next_kill = time.monotonic() + 1.0
                deadline = time.monotonic() + 150
                done = 0
                while time.monotonic() < deadline:
                    done = sum(1 for p in results.iterdir())
                    if done >= TASKS:
                        break
                    if len(kills) < 8 and time.monotonic() >= next_kill:
                        kids = child_pids(worker.pid)
                        busy = [h.pid for h in mppools.stats().holders
                                if h.busy and h.alive and h.pid in kids]
                        if busy:
                            victim = rng.choice(busy)
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(victim, signal.SIGKILL)
                                kills.append(victim)
                            next_kill = time.monotonic() + 1.5
                    time.sleep(0.003)
            elapsed = time.monotonic() - t0
            states = [client.AsyncResult(i).state for i in ids]
            peak = proxy.peak
            history = proxy.history
            accepted = proxy.total_accepted
            stats = mppools.stats()
        finally:
            mppools.close(unlink=False)
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
                with contextlib.suppress(Exception):
                    worker.wait(timeout=20)
            from support.servers import stop_process_tree

            stop_process_tree(worker, timeout=5)
    found = drain_queue(rabbit.url_for_vhost(pub_vhost), out_queue)
    published = {m["task_id"] for m in found}
    succeeded = {i for i, s in zip(ids, states, strict=True) if s == "SUCCESS"}
    lost = succeeded - published
    refusals = read_refusals(tmp_path / "refusals.log")
    unexplained = explain_refusals(refusals, history, LIMIT)
    summary = (f"tasks={TASKS} succeeded={len(succeeded)} other={TASKS - len(succeeded)} "
               f"kills={len(kills)} refusals={len(refusals)} unexplained={len(unexplained)} "
               f"peak={peak} rabbit_peak={sampler.peak} "
               f"messages={len(found)} connections_opened={accepted} "
               f"elapsed={elapsed:.1f}s budget_in_use_at_end={stats.in_use} "
               f"reclaimed_total={stats.reclaimed_total}")
    print(summary)
    assert peak <= LIMIT, summary
    assert len(kills) >= 3, summary
    assert not lost, f"{summary}\nsucceeded but not published: {sorted(lost)[:5]}"
    assert len(succeeded) >= TASKS - 10 * len(kills), summary
    assert sampler.peak <= LIMIT, summary
    assert "audit hooked to the reaping" in log.read_text(errors="replace"), summary
    assert not unexplained, f"{summary}\nunexplained refusals: {unexplained[:5]}"
    assert not shm_objects(budget_name), "the worker did not remove its budget at exit"
    with contextlib.suppress(Exception):
        rabbit.delete_vhost(read_vhost)
        rabbit.delete_vhost(pub_vhost)

"""Real gevent / eventlet workers sharing one budget (issue 8 item 2), judged by a proxy.

* gunicorn ``-k gevent``: the arbiter configures the budget in ``on_starting``, before it
  forks the workers and they monkey-patch (mppools' locks exist before patching).
* celery ``-P gevent`` / ``-P eventlet``: two workers on one budget, one forked from a master
  that configured it (patched after configure), one exec'd that patches first and then calls
  ``mppools.attach(name)``.

Everything publishes to a private redis-server through a CountingProxy in its own process;
reads go direct, so the proxy counts exactly the budget's connections. A watchdog (bounded
waits) fails a test on a hang; only the processes we started are stopped.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from support.proxy_process import ProxyProcess
from support.servers import RedisServer, popen, stop_process_tree

import mppools

from .conftest import APPS, Gunicorn, base_env, drain_queue, get, load, shm_objects, wait_until

LIMIT = 2


class GeventGunicorn(Gunicorn):
    """``Gunicorn`` with tests/integration/apps/gunicorn_gevent_conf.py (``-k gevent``)."""

    def __init__(self, tmp: Path, *, workers: int, env: dict[str, str]) -> None:
        from support.servers import free_port

        self.port = free_port()
        self.log = tmp / "gunicorn.log"
        args = [sys.executable, "-m", "gunicorn", "-c", str(APPS / "gunicorn_gevent_conf.py"),
                "--bind", f"127.0.0.1:{self.port}", "--workers", str(workers),
                "--chdir", str(APPS), "--log-level", "info", "wsgi_app:app"]
        self.proc = popen(args, log_path=self.log, cwd=APPS, env=env)
        self.workers = workers


def _redis_url(server: RedisServer, db: int) -> str:
    return server.url.rsplit("/", 1)[0] + f"/{db}"


@pytest.mark.redis
@pytest.mark.timeout(90)
def test_gunicorn_gevent_workers_share_one_budget(
    redis_server: RedisServer, tmp_path: Path, budget_name: str
) -> None:
    workers, clients, seconds = 3, 24, 8.0
    queue = f"q{uuid.uuid4().hex[:8]}"
    direct = _redis_url(redis_server, 3)
    with ProxyProcess(("127.0.0.1", redis_server.port)) as proxy:
        env = base_env(ITEST_BROKER_URL=proxy.url_for(direct), ITEST_QUEUE=queue,
                       ITEST_HOLD_MS="5", ITEST_MODE="mppools", MPPOOLS_LIMIT=str(LIMIT),
                       MPPOOLS_NAME=budget_name, MPPOOLS_ACQUIRE_TIMEOUT="10")
        server = GeventGunicorn(tmp_path, workers=workers, env=env)
        try:
            server.wait_ready()
            result = load(server.port, clients=clients, seconds=seconds, prefix="r")
            # every worker still answers (none is stuck in a dead hub)
            answers = {get(server.port, "/")[1] for _ in range(3 * workers)}
            peak, accepted = proxy.peak, proxy.total_accepted
            log = server.log_tail(40)
        finally:
            server.stop()
        assert wait_until(lambda: proxy.current == 0, 10)
    found = {m["id"] for m in drain_queue(direct, queue)}
    ok = set(result.ok_ids)
    summary = (f"peak={peak} requests={result.total} ok={len(ok)} "
               f"failed={len(result.failures)} messages={len(found)} "
               f"connections_opened={accepted} first failures={result.failures[:3]}\n{log}")
    assert result.total >= clients, summary  # a hung worker answers nothing
    assert peak <= LIMIT, summary
    assert len(ok) >= 0.98 * result.total, summary
    assert not ok - found, f"{summary}\nanswered but not published: {sorted(ok - found)[:5]}"
    assert all(a.startswith("ok") for a in answers), answers
    assert not shm_objects(budget_name), "gunicorn's on_exit did not remove the budget"


@pytest.mark.redis
@pytest.mark.timeout(120)
@pytest.mark.parametrize("pool", ["gevent", "eventlet"])
def test_celery_green_workers_share_one_budget(
    pool: str, redis_server: RedisServer, tmp_path: Path, budget_name: str
) -> None:
    tasks, concurrency = 400, 20
    tag = uuid.uuid4().hex[:8]
    read_url, write_direct = _redis_url(redis_server, 4), _redis_url(redis_server, 5)
    out_queue = f"out{tag}"
    results = tmp_path / "results"
    results.mkdir()
    with ProxyProcess(("127.0.0.1", redis_server.port)) as proxy:
        env = base_env(ITEST_READ_URL=read_url, ITEST_WRITE_URL=proxy.url_for(write_direct),
                       ITEST_RESULTS=str(results), ITEST_OUT_QUEUE=out_queue,
                       ITEST_HOLD_MS="3", PYTHONWARNINGS="ignore")
        celery_args = ["-A", "celery_green_app", "worker", "-P", pool, "-c", str(concurrency),
                       "--without-gossip", "--without-mingle", "--without-heartbeat",
                       "-l", "info"]
        forked_log, execd_log = tmp_path / "forked.log", tmp_path / "execd.log"
        procs: list[Any] = []
        client = Celery("client", broker=read_url, backend="file://" + str(results))
        try:
            procs.append(popen(
                [sys.executable, str(APPS / "green_launch.py"), str(LIMIT), budget_name, "--",
                 *celery_args, "-n", f"f{tag}@localhost"],
                log_path=forked_log, cwd=APPS, env=env))
            assert wait_until(lambda: "ready." in forked_log.read_text(errors="replace"), 40,
                              0.2), forked_log.read_text(errors="replace")[-3000:]
            procs.append(popen(
                [sys.executable, "-m", "celery", *celery_args, "-n", f"e{tag}@localhost"],
                log_path=execd_log, cwd=APPS, env={**env, "ITEST_ATTACH": budget_name}))
            assert wait_until(lambda: "ready." in execd_log.read_text(errors="replace"), 40,
                              0.2), execd_log.read_text(errors="replace")[-3000:]
            ids = [client.send_task("celery_green_app.publish", args=(i,)).id
                   for i in range(tasks)]
            # the watchdog: a hung worker never finishes its share
            finished = wait_until(lambda: sum(1 for _ in results.iterdir()) >= tasks, 45, 0.2)
            states = [client.AsyncResult(i).state for i in ids]
            peak, accepted = proxy.peak, proxy.total_accepted
        finally:
            # the exec'd worker first: the launcher removes the budget at exit only when no
            # other live process uses it (stopping both at once left it behind under load)
            for proc in reversed(procs):
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(Exception):
                    proc.wait(timeout=15)
                stop_process_tree(proc, timeout=5)
        assert wait_until(lambda: proxy.current == 0, 10)
    found = drain_queue(write_direct, out_queue)
    published = {m["task_id"] for m in found}
    by_pid: dict[int, int] = {}
    for m in found:
        by_pid[m["pid"]] = by_pid.get(m["pid"], 0) + 1
    succeeded = {i for i, s in zip(ids, states, strict=True) if s == "SUCCESS"}
    logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in (forked_log, execd_log))
    summary = (f"pool={pool} tasks={tasks} finished={finished} succeeded={len(succeeded)} "
               f"peak={peak} messages={len(found)} by_pid={by_pid} "
               f"connections_opened={accepted}\n{logs}")
    assert finished, f"hang: not every task finished in 45 s\n{summary}"
    assert peak <= LIMIT, summary
    assert len(succeeded) == tasks, summary
    assert not succeeded - published, summary
    assert len(by_pid) == 2, f"both workers must have published\n{summary}"
    assert not shm_objects(budget_name), "the launcher did not remove the budget"
    with contextlib.suppress(Exception):
        mppools.close(unlink=False)

"""WSGI app of the ``gunicorn`` bench figure (stress/gunicorn_load.py): one publish per request.

Environment (set by the benchmark): ``BENCH_G_MODE`` = ``mppools`` (``mppools.producers``,
the budget configured by the master's ``on_starting``), ``kombu`` (``kombu.pools.producers``,
limit 1 per worker) or ``connect`` (a new ``Connection`` per publish); ``BENCH_G_URL`` (the
delay proxy in front of redis); ``BENCH_G_QUEUE``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import kombu.pools
from kombu import Connection

import mppools

MODE = os.environ.get("BENCH_G_MODE", "mppools")
URL = os.environ["BENCH_G_URL"]
QUEUE = os.environ.get("BENCH_G_QUEUE", "bench-gunicorn")
BODY = {"task": "bench", "args": [1, 2, 3], "kwargs": {"x": "y" * 64}}
TIMEOUT = 30.0

CONNECTION = Connection(URL, connect_timeout=10)
if MODE == "kombu":
    kombu.pools.set_limit(1)
GROUP: Any = {"mppools": mppools.producers, "kombu": kombu.pools.producers}.get(MODE)
if MODE not in ("mppools", "kombu", "connect"):
    raise RuntimeError(f"BENCH_G_MODE must be mppools, kombu or connect, not {MODE!r}")


def publish() -> None:
    if GROUP is None:  # what broker_pool_limit=0 does: connect, publish, close
        with Connection(URL, connect_timeout=10) as conn:
            conn.Producer().publish(BODY, routing_key=QUEUE, retry=False)
        return
    with GROUP[CONNECTION].acquire(block=True, timeout=TIMEOUT) as producer:
        producer.publish(BODY, routing_key=QUEUE, retry=False)


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    status = "200 OK"
    try:
        if environ.get("PATH_INFO", "/") == "/pub":
            publish()
        body = b"ok"
    except Exception as exc:  # reported to the load generator as a 500
        status = "500 Internal Server Error"
        body = f"error {os.getpid()} {type(exc).__name__}: {exc}"[:300].encode()
    start_response(status, [("Content-Type", "text/plain"),
                            ("Content-Length", str(len(body)))])
    return [body]

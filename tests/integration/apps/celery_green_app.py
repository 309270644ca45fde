"""Celery app for the gevent / eventlet integration test (``-P gevent`` / ``-P eventlet``).

Consumes tasks from ITEST_READ_URL (direct, not counted); every task publishes one message
through the app's producer pool to ITEST_WRITE_URL (through the counting proxy). With
ITEST_ATTACH=NAME the process joins the existing budget NAME with ``mppools.attach`` (an
exec'd worker); without it, it keeps the budget it inherited (forked by green_launch.py).
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery
from kombu import Queue

import mppools
from mppools.integrations.celery import install

app = Celery("itest_green")
app.conf.update(
    broker_read_url=os.environ["ITEST_READ_URL"],
    broker_write_url=os.environ["ITEST_WRITE_URL"],
    broker_pool_limit=10,
    result_backend="file://" + os.environ["ITEST_RESULTS"],
    worker_prefetch_multiplier=4,
    task_acks_late=False,
    broker_connection_retry_on_startup=True,
)
if os.environ.get("ITEST_ATTACH"):
    mppools.attach(os.environ["ITEST_ATTACH"])
install(app)

OUT = Queue(os.environ.get("ITEST_OUT_QUEUE", "out"))
HOLD = float(os.environ.get("ITEST_HOLD_MS", "3")) / 1000.0


@app.task(bind=True)
def publish(self: Any, i: int) -> str:
    with app.producer_pool.acquire(block=True, timeout=30) as producer:
        producer.publish({"task_id": self.request.id, "i": i, "pid": os.getpid()},
                         exchange="", routing_key=OUT.name, declare=[OUT], retry=False)
        if HOLD:
            time.sleep(HOLD)  # green under -P gevent / -P eventlet: other tasks run
    return str(self.request.id)

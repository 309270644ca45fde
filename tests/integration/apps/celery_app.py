"""Celery app for the prefork integration test.

Consumes tasks from ITEST_READ_URL (direct, not counted); every task publishes one message
through the app's own producer pool to ITEST_WRITE_URL (through the counting proxy, another
vhost). Results go to a file backend (no broker involved).
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery
from kombu import Queue

from mppools.integrations.celery import install

app = Celery("itest")
app.conf.update(
    broker_read_url=os.environ["ITEST_READ_URL"],
    broker_write_url=os.environ["ITEST_WRITE_URL"],
    broker_pool_limit=4,
    result_backend="file://" + os.environ["ITEST_RESULTS"],
    broker_transport_options={"confirm_publish": True},
    worker_prefetch_multiplier=4,
    task_acks_late=False,
    broker_connection_retry_on_startup=True,
)
install(app)  # limit / name from MPPOOLS_LIMIT / MPPOOLS_NAME

OUT = Queue(os.environ.get("ITEST_OUT_QUEUE", "out"), durable=True)
HOLD = float(os.environ.get("ITEST_HOLD_MS", "3")) / 1000.0


REFUSALS = os.environ.get("ITEST_REFUSALS")


@app.task(bind=True)
def publish(self: Any, i: int) -> str:
    try:
        with app.producer_pool.acquire(block=True, timeout=30) as producer:
            producer.publish({"task_id": self.request.id, "i": i}, exchange="",
                             routing_key=OUT.name, declare=[OUT], retry=False,
                             delivery_mode=2)
            if HOLD:
                time.sleep(HOLD)
    except Exception as exc:
        if REFUSALS and "connection limit" in str(exc):
            line = f"{time.monotonic():.6f} {os.getpid()} {str(exc)[:200]!r}\n"
            fd = os.open(REFUSALS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        raise
    return str(self.request.id)

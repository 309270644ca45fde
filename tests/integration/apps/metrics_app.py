"""WSGI app for the prometheus integration tests: a ``/metrics`` endpoint with mppools'
collector in the app's registry, and requests that hold broker connections until told.

Endpoints:

``/`` (also ``/ping``)
    ``ok <pid>``; ``/ping`` also counts itself in ``itest_pings_total`` (a plain
    prometheus_client Counter: in multiprocess mode its samples are summed over the workers).
``/hold?id=ID``
    takes a connection from ``mppools.connections`` (one slot of the budget), connects it to
    the broker, tells the test over the unix socket ``ITEST_RELEASE_SOCK`` (``held <pid>``)
    and keeps it, busy, until the test sends a byte there (or closes it); then puts it back in
    the worker's pool (idle, still holding its slot) and answers ``released <pid>``.
``/metrics``
    the app's registry in the text format.

Environment: ``ITEST_BROKER_URL`` (the broker), ``ITEST_RELEASE_SOCK``, ``ITEST_MULTIPROC``
(``1``: prometheus_client's multiprocess mode, ``PROMETHEUS_MULTIPROC_DIR`` set by the test:
the registry is built per request, with ``MultiProcessCollector``, as documented in
docs/howto/metrics.md).
"""

from __future__ import annotations

import os
import socket
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any

from kombu import Connection
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

import mppools
from mppools.integrations.prometheus import MppoolsCollector

URL = os.environ["ITEST_BROKER_URL"]
RELEASE_SOCK = os.environ["ITEST_RELEASE_SOCK"]
MULTIPROC = os.environ.get("ITEST_MULTIPROC") == "1"
HOLD_LIMIT = 90.0  # seconds a /hold request waits for the test at most

CONNECTION = Connection(URL, connect_timeout=5)

if MULTIPROC:
    from prometheus_client import multiprocess

    # the metrics of the app itself live in PROMETHEUS_MULTIPROC_DIR, one file per worker
    PINGS = Counter("itest_pings", "Pings served, by any worker.")

    def registry() -> CollectorRegistry:
        """A fresh registry per scrape: the workers' files, and mppools' shared state read
        once, here, by the one worker that serves this request."""
        scrape = CollectorRegistry()
        multiprocess.MultiProcessCollector(scrape)
        scrape.register(MppoolsCollector(per_holder=True))
        return scrape
else:
    # the app's own registry, with mppools' collector registered once, at import
    REGISTRY = CollectorRegistry()
    PINGS = Counter("itest_pings", "Pings served by this worker.", registry=REGISTRY)
    REGISTRY.register(MppoolsCollector(per_holder=True))

    def registry() -> CollectorRegistry:
        return REGISTRY


def hold(rid: str) -> str:
    conn = mppools.connections[CONNECTION].acquire(block=True, timeout=10)
    try:
        conn.ensure_connection(max_retries=2)  # a real broker connection holds the slot
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as told:
            told.settimeout(HOLD_LIMIT)
            told.connect(RELEASE_SOCK)
            told.sendall(f"held {os.getpid()} {rid}\n".encode())
            told.recv(1)  # a byte, or the test closed it
    finally:
        conn.release()  # back to this worker's pool: idle, with its slot
    return f"released {os.getpid()}"


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
    content_type = "text/plain"
    try:
        if path == "/metrics":
            body = generate_latest(registry())
            content_type = CONTENT_TYPE_LATEST
        elif path == "/hold":
            body = hold(query.get("id", [""])[0]).encode()
        else:
            if path == "/ping":
                PINGS.inc()
            body = f"ok {os.getpid()}".encode()
        status = "200 OK"
    except Exception as exc:
        body = f"error {os.getpid()} {type(exc).__name__}: {exc}".encode()
        status = "500 Internal Server Error"
    start_response(status, [("Content-Type", content_type),
                            ("Content-Length", str(len(body))),
                            ("X-Worker-Pid", str(os.getpid()))])
    return [body]

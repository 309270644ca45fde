"""WSGI app for the uWSGI integration tests (tests/integration/test_uwsgi.py).

Loaded by the uWSGI master (preforked workers) or by every worker (``--lazy-apps``).

Environment: ITEST_BROKER_URL (Redis, through the counting proxy), ITEST_QUEUE,
ITEST_SETUP (``integration``: :func:`mppools.integrations.uwsgi.setup`; ``configure``: a
plain :func:`mppools.configure`, what an app does without the integration), MPPOOLS_LIMIT /
MPPOOLS_NAME / MPPOOLS_ACQUIRE_TIMEOUT, ITEST_WARMUP (``1``: publish once while the module
is imported, so that a preforking master holds a pooled connection when uWSGI forks),
ITEST_READY (a file: the pid of every process that loaded the app is appended to it).

Endpoints:

``/pid``
    ``pid <pid> epoch <fork epoch> pooled <open connections in this process's pools>
    creator <pid of the budget's creator>``.
``/hold?id=ID``
    Takes a producer (a broker connection, a slot), publishes ``ID``, sends the line
    ``held <pid>`` at once, then keeps the connection until the client sends one byte of the
    request body (``Content-Length: 1``) and answers ``released``. The test SIGKILLs holders
    in that state.
``/pub?id=ID``
    Publishes ``ID`` and answers ``ok <pid>`` (the connection stays idle in the pool).
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from kombu import Connection, Queue

import mppools
from mppools import _fork, pools

URL = os.environ["ITEST_BROKER_URL"]
QUEUE = Queue(os.environ.get("ITEST_QUEUE", "itest"))
SETUP = os.environ.get("ITEST_SETUP", "integration")

if SETUP == "integration":
    from mppools.integrations import uwsgi as mppools_uwsgi

    mppools_uwsgi.setup()  # MPPOOLS_LIMIT / MPPOOLS_NAME / MPPOOLS_ACQUIRE_TIMEOUT
elif SETUP == "configure":
    mppools.configure(int(os.environ["MPPOOLS_LIMIT"]), os.environ["MPPOOLS_NAME"],
                      acquire_timeout=float(os.environ.get("MPPOOLS_ACQUIRE_TIMEOUT", "10")))

CONNECTION = Connection(URL, connect_timeout=5)
READY = os.environ.get("ITEST_READY")


def _publish(producer: Any, rid: str) -> None:
    producer.publish({"id": rid, "pid": os.getpid()}, exchange="", routing_key=QUEUE.name,
                     declare=[QUEUE], retry=False)


if os.environ.get("ITEST_WARMUP") == "1":
    with mppools.producers[CONNECTION].acquire(block=True, timeout=10) as _warm:
        _publish(_warm, "warmup")


if READY:  # one line per process that loaded the app (the master, or each lazy worker)
    _fd = os.open(READY, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(_fd, f"{os.getpid()}\n".encode())
    os.close(_fd)


def _pooled() -> int:
    """Connections of this process's pools whose transport is open (inherited ones too)."""
    found = 0
    for pool in pools._all_pools():
        if isinstance(pool, pools.LimitedConnectionPool):
            items = [*pool._dirty, *pool._resource.queue]
            found += sum(1 for c in items if getattr(c, "_connection", None) is not None)
    return found


def _hold(rid: str, environ: dict[str, Any]) -> Iterator[bytes]:
    with mppools.producers[CONNECTION].acquire(block=True) as producer:
        _publish(producer, rid)
        yield f"held {os.getpid()}\n".encode()
        environ["wsgi.input"].read(1)  # until the client says so (or SIGKILL)
    yield b"released\n"


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
    rid = query.get("id", [""])[0]
    headers = [("Content-Type", "text/plain")]
    try:
        if path == "/hold":
            start_response("200 OK", headers)
            return _hold(rid, environ)
        if path == "/pub":
            with mppools.producers[CONNECTION].acquire(block=True) as producer:
                _publish(producer, rid)
            body = f"ok {os.getpid()}"
        else:
            limiter = mppools._config.current()
            creator = limiter.stats().creator_pid if limiter is not None else 0
            body = (f"pid {os.getpid()} epoch {_fork.current_epoch()} pooled {_pooled()} "
                    f"creator {creator}")
    except Exception as exc:
        start_response("500 Internal Server Error", headers)
        return [f"error {os.getpid()} {type(exc).__name__}: {exc}".encode()]
    start_response("200 OK", headers)
    return [body.encode()]


application = app

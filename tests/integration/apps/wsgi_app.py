"""WSGI app for the gunicorn integration tests: one published message per request.

Environment: ITEST_BROKER_URL (through the counting proxy), ITEST_QUEUE, ITEST_MODE
("mppools" or "kombu"), ITEST_HOLD_MS (how long a request keeps its producer after
publishing, so the chaos thread can catch holders), ITEST_REFUSALS (file: one line per broker
refusal seen, ``monotonic pid message``).
"""

from __future__ import annotations

import os
import time
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any

from kombu import Connection, Queue

if os.environ.get("ITEST_MODE", "mppools") == "kombu":
    from kombu.pools import producers
else:
    from mppools import producers

URL = os.environ["ITEST_BROKER_URL"]
QUEUE = Queue(os.environ.get("ITEST_QUEUE", "itest"), durable=True)
HOLD = float(os.environ.get("ITEST_HOLD_MS", "5")) / 1000.0
REFUSALS = os.environ.get("ITEST_REFUSALS")
SOCKLOG = os.environ.get("ITEST_SOCKLOG")
if SOCKLOG:  # debugging aid: log every transport open/close with CLOCK_MONOTONIC
    import amqp.transport as _at

    def _log(event: str) -> None:
        fd = os.open(SOCKLOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{time.monotonic():.6f} {os.getpid()} {event}\n".encode())
        finally:
            os.close(fd)

    _connect, _close = _at._AbstractTransport.connect, _at._AbstractTransport.close

    def _logged_connect(self: Any) -> Any:
        _log("open")
        return _connect(self)

    def _logged_close(self: Any) -> Any:
        had = self.sock is not None
        try:
            return _close(self)
        finally:
            if had:
                _log("close")

    _at._AbstractTransport.connect = _logged_connect  # type: ignore[method-assign]
    _at._AbstractTransport.close = _logged_close  # type: ignore[method-assign]

CONNECTION = Connection(URL, transport_options={"confirm_publish": True}, connect_timeout=5)


def _is_refusal(exc: BaseException) -> bool:
    text = str(exc).lower()
    return ("connection limit" in text or "max number of clients" in text
            or "max-connections" in text)


def _log_refusal(exc: BaseException) -> None:
    if REFUSALS:
        line = f"{time.monotonic():.6f} {os.getpid()} {str(exc)[:200]!r}\n"
        fd = os.open(REFUSALS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def publish(rid: str) -> None:
    last: BaseException | None = None
    for _attempt in range(5):
        try:
            with producers[CONNECTION].acquire(block=True, timeout=10) as producer:
                producer.publish({"id": rid, "pid": os.getpid()}, exchange="",
                                 routing_key=QUEUE.name, declare=[QUEUE], retry=False,
                                 delivery_mode=2)
                if HOLD:
                    time.sleep(HOLD)
            return
        except Exception as exc:
            if not _is_refusal(exc):
                raise
            _log_refusal(exc)
            last = exc
            time.sleep(0.05)
    assert last is not None
    raise last


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
    rid = query.get("id", [""])[0]
    try:
        if rid:
            publish(rid)
        body = f"ok {os.getpid()}".encode()
        start_response("200 OK", [("Content-Type", "text/plain"),
                                  ("Content-Length", str(len(body)))])
    except Exception as exc:
        body = f"error {os.getpid()} {type(exc).__name__}: {exc}".encode()
        start_response("500 Internal Server Error", [("Content-Type", "text/plain"),
                                                     ("Content-Length", str(len(body)))])
    return [body]

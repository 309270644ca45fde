"""Greenlets publishing through mppools under gevent or eventlet (a script, run as a subprocess).

    python green_publish.py LIB ORDER MODE NAME URL QUEUE [CHILDREN GREENLETS MESSAGES LIMIT]

LIB: ``gevent`` | ``eventlet``. ORDER: ``after`` (``import mppools`` and ``configure()`` first,
then fork the children, which monkey-patch: gunicorn's arbiter, a launcher forking green
workers) or ``before`` (patch first, then import, configure and fork). MODE:

``publish``
    CHILDREN forked children x GREENLETS greenlets, each publishing MESSAGES messages through
    ``mppools.producers`` to URL/QUEUE. Each child writes one JSON line ``{"pid", "ok",
    "errors"}`` to stdout and leaves with ``os._exit``; the parent exits 0 once every child
    exited 0 (the test's watchdog kills the whole process group on a hang).
``yield``
    Limit 1: a forked, unpatched child holds the only slot for HOLD seconds; in the parent
    (patched after ``configure()``) greenlet B waits for the slot while greenlet C counts
    ticks (``sleep(0.005)`` each). Prints ``{"got", "waited", "ticks"}``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

LIB, ORDER, MODE, NAME, URL, QUEUE = sys.argv[1:7]
CHILDREN, GREENLETS, MESSAGES, LIMIT = (int(x) for x in (sys.argv[7:11] or [2, 20, 5, 2]))
HOLD = 1.0


def patch() -> None:
    if LIB == "gevent":
        from gevent import monkey

        monkey.patch_all()
    else:
        import eventlet

        eventlet.monkey_patch()


def spawn_all(funcs: list[Any]) -> None:
    if LIB == "gevent":
        import gevent

        gevent.joinall([gevent.spawn(f) for f in funcs], raise_error=True)
    else:
        import eventlet

        for g in [eventlet.spawn(f) for f in funcs]:
            g.wait()


def sleep(seconds: float) -> None:
    time.sleep(seconds)  # patched in the children: yields


if ORDER == "before":
    patch()

import warnings  # noqa: E402

warnings.simplefilter("ignore")  # eventlet's deprecation warning

from kombu import Connection, Queue  # noqa: E402

import mppools  # noqa: E402


def publish_child() -> None:
    if ORDER == "after":
        patch()
    conn = Connection(URL, connect_timeout=5)
    queue = Queue(QUEUE)
    ok = [0]
    errors: list[str] = []

    def worker(k: int) -> None:
        for n in range(MESSAGES):
            try:
                with mppools.producers[conn].acquire(block=True, timeout=20) as producer:
                    producer.publish({"pid": os.getpid(), "k": k, "n": n}, routing_key=QUEUE,
                                     declare=[queue], retry=False)
                    sleep(0.002)  # keep the producer across a switch to the other greenlets
                ok[0] += 1
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:300])

    spawn_all([lambda k=k: worker(k) for k in range(GREENLETS)])
    # one write of the whole line: the children share the pipe, and print() may write the
    # text and its newline apart (two children's reports then ran into one line)
    sys.stdout.flush()
    report = json.dumps({"pid": os.getpid(), "ok": ok[0], "errors": errors[:5],
                         "n_errors": len(errors)})
    unpatched_write(sys.stdout.fileno(), f"{report}\n".encode())


def unpatched_write(fd: int, data: bytes) -> None:
    """``os.write`` as the standard library has it, whatever has been patched.

    eventlet's green ``os.write`` first waits for the fd to be writable through the hub. A
    child forked after ``eventlet.monkey_patch()`` shares its parent's hub, whose epoll
    instance is then one kernel object for every child: stdout is the same pipe (same fd,
    same file) in each, so one child's unregistering it deletes the other's registration and
    that child waits for good (1 run in 20 under load hung so, its report unwritten).
    """
    if LIB == "eventlet":
        from eventlet import patcher

        patcher.original("os").write(fd, data)
    else:
        os.write(fd, data)


def main_publish() -> int:
    mppools.configure(LIMIT, NAME, acquire_timeout=20)
    pids = []
    for _ in range(CHILDREN):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                publish_child()
                code = 0
            finally:
                sys.stdout.flush()
                os._exit(code)
        pids.append(pid)
    failed = 0
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        failed += status != 0
    mppools.close()
    return 1 if failed else 0


def main_yield() -> int:
    mppools.configure(1, NAME, acquire_timeout=20)
    conn = Connection(URL, connect_timeout=5)
    ready_r, ready_w = os.pipe()
    holder = os.fork()
    if holder == 0:  # another process holds the only slot for HOLD seconds
        code = 1
        try:
            with mppools.connections[conn].acquire(block=True, timeout=10) as c:
                c.ensure_connection(max_retries=1)
                os.write(ready_w, b"h")
                time.sleep(HOLD)
            code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    if ORDER == "after":
        patch()
    assert os.read(ready_r, 1) == b"h"
    state: dict[str, Any] = {"ticks": 0, "waiting": True, "got": False}

    def waiter() -> None:
        t0 = time.monotonic()
        try:
            with mppools.connections[conn].acquire(block=True, timeout=10) as c:
                c.ensure_connection(max_retries=1)
                state["got"] = True
        except Exception as exc:
            state["error"] = f"{type(exc).__name__}: {exc}"[:300]
        state["waited"] = time.monotonic() - t0
        state["waiting"] = False

    def ticker() -> None:
        for _ in range(2000):  # bounded
            if not state["waiting"]:
                return
            state["ticks"] += 1
            sleep(0.005)

    spawn_all([waiter, ticker])
    _, status = os.waitpid(holder, 0)
    state["holder_status"] = status
    print(json.dumps(state), flush=True)
    mppools.close()
    return 0 if state["got"] and status == 0 else 1


if __name__ == "__main__":
    sys.exit(main_publish() if MODE == "publish" else main_yield())

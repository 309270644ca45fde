"""Forked worker processes driven over pipes (children always leave through ``os._exit``)."""

from __future__ import annotations

import os
import pickle
import select
import signal
import struct
import time
import traceback
from collections.abc import Callable
from typing import Any

_LEN = struct.Struct("<I")


def _send(fd: int, obj: object) -> None:
    data = pickle.dumps(obj)
    os.write(fd, _LEN.pack(len(data)) + data)


def _read_exact(fd: int, n: int, deadline: float) -> bytes:
    buf = b""
    while len(buf) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no answer from child within the deadline ({n - len(buf)} bytes)")
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError("child closed its pipe (it died)")
        buf += chunk
    return buf


def _recv(fd: int, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    (n,) = _LEN.unpack(_read_exact(fd, _LEN.size, deadline))
    return pickle.loads(_read_exact(fd, n, deadline))


class Worker:
    """A forked child that runs commands sent by the parent, one at a time.

    ``handlers`` maps command names to functions run in the child; each returns a picklable
    value sent back to the parent. An exception in a handler is sent back as ``("error",
    text)``; the child keeps serving.
    """

    def __init__(self, handlers: dict[str, Callable[..., Any]]) -> None:
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 0
            try:
                os.close(self._to_child)
                os.close(self._from_child)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                _serve(handlers, to_child_r, from_child_w)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(to_child_r)
        os.close(from_child_w)
        self.pid = pid
        self.alive = True

    def call(self, command: str, *args: Any, timeout: float = 20.0) -> Any:
        _send(self._to_child, (command, args))
        status, value = _recv(self._from_child, timeout)
        if status == "error":
            raise ChildError(value)
        return value

    def send(self, command: str, *args: Any) -> None:
        """Send a command without waiting for its answer (collect it with ``answer()``)."""
        _send(self._to_child, (command, args))

    def answer(self, timeout: float = 20.0) -> Any:
        status, value = _recv(self._from_child, timeout)
        if status == "error":
            raise ChildError(value)
        return value

    def kill(self) -> None:
        if self.alive:
            os.kill(self.pid, signal.SIGKILL)
            self.reap()

    def reap(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.alive = False
                self._close()
                return status
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                self.alive = False
                self._close()
                raise TimeoutError(f"child {self.pid} did not exit in {timeout} s")
            time.sleep(0.005)

    def stop(self) -> None:
        if not self.alive:
            return
        try:
            _send(self._to_child, ("__exit__", ()))
            self.reap(5)
        except (OSError, TimeoutError):
            self.kill()

    def _close(self) -> None:
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass


class ChildError(Exception):
    """A command failed in the child; the message holds its traceback."""


def _serve(handlers: dict[str, Callable[..., Any]], rfd: int, wfd: int) -> None:
    while True:
        try:
            command, args = _recv(rfd, 3600)
        except EOFError:
            return
        if command == "__exit__":
            return
        try:
            result = ("ok", handlers[command](*args))
        except BaseException as exc:
            result = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        _send(wfd, result)


def run_in_child(fn: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Fork, run ``fn`` in the child, return its (picklable) result; re-raise its error."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0
        try:
            os.close(r)
            try:
                _send(w, ("ok", fn()))
            except BaseException as exc:
                _send(w, ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        finally:
            os._exit(code)
    os.close(w)
    answered = False
    try:
        status, value = _recv(r, timeout)
        answered = True
    finally:
        os.close(r)
        if not answered:  # hung (a deadlock, say) or died: never wait on it unbounded
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, _ = os.waitpid(pid, 0)
    if status == "error":
        raise ChildError(value)
    return value

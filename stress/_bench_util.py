"""Helpers of ``stress.bench``: a private Redis, forked worker groups, SysV SEM_UNDO via
ctypes, interleaved sampling and small statistics.

Every child process started here leaves through ``os._exit``; every loop is bounded in
count and in time; only pids started here are ever signalled.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import socket
import statistics
import struct
import subprocess
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Barrier",
    "RedisProc",
    "SysVSem",
    "budget_name",
    "fork_child",
    "interleave",
    "median",
    "paired_ratios",
    "reap",
    "run_group",
]


def budget_name() -> str:
    """A budget name no other run uses."""
    return f"bench-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def paired_ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Ratios of samples taken next to each other in the same repetition."""
    return [x / y for x, y in zip(a, b, strict=False) if y > 0]


def interleave(
    subjects: Sequence[tuple[str, Callable[[], float]]],
    reps: int,
    budget_s: float,
    min_reps: int = 3,
) -> dict[str, list[float]]:
    """Run every subject once per repetition, rotating (and reversing) the order so that
    machine noise falls on all of them alike. Stops after ``reps`` repetitions or once
    ``budget_s`` has passed (but not before ``min_reps``)."""
    samples: dict[str, list[float]] = {name: [] for name, _ in subjects}
    deadline = time.monotonic() + budget_s
    k = len(subjects)
    for r in range(reps):
        order = [*subjects[r % k:], *subjects[: r % k]]
        if r % 2:
            order.reverse()
        for name, fn in order:
            samples[name].append(fn())
        if r + 1 >= min_reps and time.monotonic() > deadline:
            break
    return samples


# ---------------------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------------------
def fork_child(body: Callable[[], int]) -> int:
    """Fork; the child runs ``body`` and always leaves through ``os._exit``."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 70
        try:
            code = int(body())
        except BaseException:
            with contextlib.suppress(BaseException):
                traceback.print_exc()
        finally:
            with contextlib.suppress(BaseException):
                # what multiprocessing's and billiard's children do on their way out: let
                # connections lent to other workers come back (os._exit would cut them)
                from mppools._lending import lender

                lender().quiesce()
            os._exit(code)
    return pid


def reap(pids: Sequence[int], timeout: float = 10.0) -> dict[int, int]:
    """Wait for our children ``pids``; SIGKILL (by pid) any still running after ``timeout``.

    Returns pid -> raw wait status."""
    left = set(pids)
    status: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        for pid in list(left):
            try:
                done, st = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                left.discard(pid)
                continue
            if done:
                status[pid] = st
                left.discard(pid)
        if left:
            time.sleep(0.002)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            status[pid] = os.waitpid(pid, 0)[1]
    return status


_RECORD = struct.Struct("<iq")
_START = struct.Struct("<d")


@dataclass
class Barrier:
    """Handed to a group child: ``wait()`` says "ready" and returns the shared window."""

    ready_fd: int
    go_fd: int
    index: int
    window: float

    def wait(self) -> tuple[float, float]:
        os.write(self.ready_fd, _RECORD.pack(self.index, -1))
        data = b""
        end_by = time.monotonic() + 120.0
        while len(data) < _START.size and time.monotonic() < end_by:
            chunk = os.read(self.go_fd, _START.size - len(data))
            if not chunk:
                raise RuntimeError("the parent went away before the start")
            data += chunk
        (start,) = _START.unpack(data)
        pause = start - time.monotonic() - 0.002
        if pause > 0:
            time.sleep(min(pause, 5.0))
        for _ in range(10_000_000):  # spin the last bit, bounded
            if time.monotonic() >= start:
                break
        return start, start + self.window


def run_group(
    n: int,
    body: Callable[[Barrier], int],
    window: float,
    *,
    ready_timeout: float = 60.0,
    result_timeout: float = 60.0,
) -> list[int | None]:
    """Fork ``n`` children running ``body(barrier)``, start them together for ``window``
    seconds and collect the count each returns (None for a child that failed)."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pids: list[int] = []
    counts: list[int | None] = [None] * n
    try:
        for i in range(n):

            def child(i: int = i) -> int:
                os.close(ready_r)
                os.close(go_w)
                count = body(Barrier(ready_w, go_r, i, window))
                os.write(ready_w, _RECORD.pack(i, count))
                return 0

            pids.append(fork_child(child))
        os.close(ready_w)
        ready_w = -1
        buf = bytearray()
        ready = 0
        deadline = time.monotonic() + ready_timeout
        while ready < n and time.monotonic() < deadline:
            buf += _read_some(ready_r, deadline)
            while len(buf) >= _RECORD.size:
                idx, value = _RECORD.unpack(bytes(buf[: _RECORD.size]))
                del buf[: _RECORD.size]
                if value == -1:
                    ready += 1
                else:
                    counts[idx] = value  # a child may finish early
        if ready < n:
            raise RuntimeError(f"only {ready} of {n} children got ready")
        start = time.monotonic() + 0.03 + 0.002 * n
        os.write(go_w, _START.pack(start) * n)
        deadline = start + window + result_timeout
        while any(c is None for c in counts) and time.monotonic() < deadline:
            data = _read_some(ready_r, deadline)
            if not data:
                if all(not _alive_child(p) for p in pids):
                    break
                continue
            buf += data
            while len(buf) >= _RECORD.size:
                idx, value = _RECORD.unpack(bytes(buf[: _RECORD.size]))
                del buf[: _RECORD.size]
                if value >= 0:
                    counts[idx] = value
    finally:
        for fd in (ready_r, ready_w, go_r, go_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        reap(pids, timeout=30.0)
    return counts


def _alive_child(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _read_some(fd: int, deadline: float) -> bytes:
    timeout = max(min(deadline - time.monotonic(), 0.5), 0.0)
    readable, _, _ = select.select([fd], [], [], timeout)
    if not readable:
        return b""
    return os.read(fd, 65536)


# ---------------------------------------------------------------------------------------
# a private redis-server
# ---------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisProc:
    """``redis-server --port P --bind 127.0.0.1 --save '' --appendonly no`` on a free port,
    stopped through its pid."""

    def __init__(self) -> None:
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.mkdtemp(prefix="mppools-bench-redis-")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self, attempts: int = 3) -> RedisProc:
        for _ in range(attempts):
            self.port = _free_port()
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", self._dir, "--maxclients", "2000"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )
            if self._wait_ready(5.0):
                return self
            self.stop()
        raise RuntimeError("could not start redis-server")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.port), timeout=0.5
            ) as s:
                s.sendall(b"INFO server\r\n")
                data = b""
                while b"process_id:" not in data or not data.endswith(b"\r\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                    if len(data) > 1_000_000:
                        break
                if f"process_id:{self.proc.pid}\r".encode() in data:
                    return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()  # by pid
            try:
                proc.wait(5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5.0)
        with contextlib.suppress(OSError):
            for entry in os.listdir(self._dir):
                os.unlink(os.path.join(self._dir, entry))
            os.rmdir(self._dir)

    def __enter__(self) -> RedisProc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def maybe_redis(enabled: bool) -> Iterator[RedisProc | None]:
    if not enabled:
        yield None
        return
    server = RedisProc()
    try:
        server.start()
    except (OSError, RuntimeError) as exc:
        print(f"redis-server could not be started ({exc}): redis rows skipped")
        yield None
        return
    try:
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------
# SysV semaphores with SEM_UNDO (no stdlib API: ctypes)
# ---------------------------------------------------------------------------------------
class _SemBuf(ctypes.Structure):
    _fields_ = [("sem_num", ctypes.c_ushort), ("sem_op", ctypes.c_short),
                ("sem_flg", ctypes.c_short)]


class _TimeSpec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_IPC_PRIVATE = 0
_IPC_CREAT = 0o1000
_IPC_RMID = 0
_SETVAL = 16
_SEM_UNDO = 0x1000
_libc: Any = ctypes.CDLL(None, use_errno=True)


class SysVSem:
    """One private SysV semaphore (value ``initial``); ``acquire(undo=True)`` is released by
    the kernel when the holder dies."""

    def __init__(self, initial: int = 1) -> None:
        semid = int(_libc.semget(_IPC_PRIVATE, 1, _IPC_CREAT | 0o600))
        if semid < 0:
            raise OSError(ctypes.get_errno(), "semget failed")
        self.semid = semid
        if int(_libc.semctl(semid, 0, _SETVAL, ctypes.c_int(initial))) < 0:
            err = ctypes.get_errno()
            self.remove()
            raise OSError(err, "semctl(SETVAL) failed")

    def acquire(self, *, undo: bool, timeout: float | None = None) -> bool:
        op = _SemBuf(0, -1, _SEM_UNDO if undo else 0)
        if timeout is None:
            rc = int(_libc.semop(self.semid, ctypes.byref(op), 1))
        else:
            ts = _TimeSpec(int(timeout), int((timeout % 1) * 1e9))
            rc = int(_libc.semtimedop(self.semid, ctypes.byref(op), 1, ctypes.byref(ts)))
        return rc == 0

    def release(self) -> None:
        op = _SemBuf(0, 1, 0)
        _libc.semop(self.semid, ctypes.byref(op), 1)

    def remove(self) -> None:
        if self.semid >= 0:
            _libc.semctl(self.semid, 0, _IPC_RMID)
            self.semid = -1

"""Locks and fd waits that stay correct under gevent and eventlet monkey-patching.

Two traps (DESIGN.md §3, issue 8 item 2):

* A lock made before monkey-patching is a real OS lock. A greenlet that yields while holding
  it (starting a thread, any socket I/O) blocks its whole OS thread as soon as a second
  greenlet of that thread asks for the lock: the hub stops and the process hangs for good.
  That is the normal order of things under gunicorn ``-k gevent`` (the arbiter configures
  the budget, the forked worker patches) and ``celery -P gevent`` launched from a configured
  master. :class:`Lock` therefore follows whatever ``_thread.allocate_lock`` is *now*: it is a
  real lock while the process is unpatched and becomes a green lock once gevent or eventlet
  has patched ``thread``, even if the :class:`Lock` object was made before.
* eventlet's patched :mod:`select` has no ``poll`` (and gevent's is green only if patched).
  :func:`wait_readable` waits on fds with the original ``poll`` in an unpatched process and
  through the hub (yielding to the other greenlets) in a patched one.

Limits of :class:`Lock`, by design:

* The primitive is swapped only while nobody holds it (a non-blocking acquire of the old
  primitive succeeds). A greenlet that asks for a lock whose stale real primitive is held
  waits for it cooperatively (short green sleeps, bounded by its timeout) instead of
  blocking the OS thread; it takes the green primitive as soon as the holder releases.
* A lock held across the moment of patching stays real until it is released; the holder
  must release it from the same OS thread (as with any lock).
* Green primitives are meant for the greenlets of one OS thread (the usual gevent/eventlet
  setup). A real OS thread started before patching that shares a :class:`Lock` with
  greenlets after patching is not supported by gevent/eventlet themselves either.
* After ``fork()`` the owner calls :meth:`Lock._reset` in the child (a thread of the parent
  may have held it at fork time); mppools' fork handler does that for mppools' own objects.
"""

from __future__ import annotations

import _thread
import importlib
import os
import select
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["Lock", "RLock", "flavour", "is_patched", "recvmsg", "wait_readable"]

#: eventlet's ``selects`` hub uses select.select: fds at or above this cannot go to it
FD_SETSIZE = 1024
_STALE_POLL_MIN = 0.0005
_STALE_POLL_MAX = 0.02


# -------------------------------------------------------------------------- patch state
def _gevent_patched() -> bool:
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None:
        return False
    check = getattr(monkey, "is_module_patched", None)
    if check is None:  # pragma: no cover - every supported gevent has it
        return False
    return bool(check("threading") or check("socket") or check("select"))


def _eventlet_patched() -> bool:
    patcher = sys.modules.get("eventlet.patcher")
    if patcher is None:
        return False
    check = getattr(patcher, "is_monkey_patched", None)
    if check is None:  # pragma: no cover - every supported eventlet has it
        return False
    return bool(check("thread") or check("socket") or check("select"))


def flavour() -> str | None:
    """``"gevent"`` or ``"eventlet"`` if that library has patched this process, else None."""
    if _gevent_patched():
        return "gevent"
    if _eventlet_patched():
        return "eventlet"
    return None


def is_patched() -> bool:
    """True if gevent or eventlet has patched threading, socket or select in this process."""
    return flavour() is not None


def _module(name: str) -> Any:
    """Import gevent / eventlet lazily (untyped: neither ships complete stubs)."""
    return importlib.import_module(name)


def _green_sleep(seconds: float) -> None:
    """Sleep yielding to the other greenlets (``time.sleep`` when nothing is patched)."""
    which = flavour()
    if which == "gevent":
        _module("gevent").sleep(seconds)
    elif which == "eventlet":
        _module("eventlet").sleep(seconds)
    else:
        time.sleep(seconds)


# -------------------------------------------------------------------------------- locks
class Lock:
    """A mutual-exclusion lock that is green once ``thread`` is monkey-patched.

    Same interface as :class:`threading.Lock`: ``with lock:``, ``acquire(blocking=True,
    timeout=-1)``, ``release()``, ``locked()``. See the module docstring for when the
    underlying primitive changes and the limits of that.

    Raises:
        ValueError: ``acquire`` with a timeout and ``blocking=False``, or a negative timeout
            other than -1 (as :class:`threading.Lock`).
        RuntimeError: ``release`` of a lock that is not held.
    """

    __slots__ = ("__weakref__", "_factory", "_lock")

    def __init__(self) -> None:
        factory = _thread.allocate_lock
        self._factory: Callable[[], Any] = factory
        self._lock: Any = factory()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if not blocking and timeout != -1:
            raise ValueError("can't specify a timeout for a non-blocking call")
        if timeout < 0 and timeout != -1:
            raise ValueError("timeout value must be a non-negative number")
        deadline: float | None = None
        pause = _STALE_POLL_MIN
        while True:
            lock = self._lock
            if self._factory is not _thread.allocate_lock:
                fresh = self._refresh(lock)
                if fresh is None:  # a stale primitive that someone holds: wait green
                    if not blocking:
                        return False
                    if timeout >= 0:
                        if deadline is None:
                            deadline = time.monotonic() + timeout
                        left = deadline - time.monotonic()
                        if left <= 0:
                            return False
                        _green_sleep(min(pause, left))
                    else:
                        _green_sleep(pause)
                    pause = min(pause * 2, _STALE_POLL_MAX)
                    continue
                lock = fresh
            if not blocking:
                got = lock.acquire(False)
            elif timeout < 0:
                got = lock.acquire()
            else:
                if deadline is None:
                    deadline = time.monotonic() + timeout
                got = lock.acquire(True, max(deadline - time.monotonic(), 0.0))
            if not got:
                return False
            if self._lock is lock:
                return True
            # swapped while we waited on the old primitive: take the new one instead
            lock.release()

    def _refresh(self, lock: Any) -> Any | None:
        """Swap in a primitive of the current ``allocate_lock`` if ``lock`` is free."""
        if not lock.acquire(False):
            return None
        try:
            if self._lock is lock:
                factory = _thread.allocate_lock
                self._lock = factory()
                self._factory = factory
        finally:
            lock.release()
        return self._lock

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return bool(self._lock.locked())

    def _reset(self) -> None:
        """Make a fresh, unlocked primitive (in a forked child only)."""
        factory = _thread.allocate_lock
        self._lock = factory()
        self._factory = factory

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        kind = "green" if _is_green(self._factory) else "os"
        state = "locked" if self.locked() else "unlocked"
        return f"<mppools._green.Lock {state} {kind} at {id(self):#x}>"


class RLock:
    """A reentrant :class:`Lock`: the owner is the current greenlet once patched.

    The owner is ``_thread.get_ident()`` at the time of the call, which is the greenlet's
    identity under gevent and eventlet. A lock taken before patching and released after it
    would see another identity: do not patch while holding one.

    Raises:
        RuntimeError: ``release`` by a thread or greenlet that does not own the lock.
    """

    __slots__ = ("__weakref__", "_block", "_count", "_owner")

    def __init__(self) -> None:
        self._block = Lock()
        self._owner: int | None = None
        self._count = 0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        me = _thread.get_ident()
        if self._owner == me:
            self._count += 1
            return True
        if not self._block.acquire(blocking, timeout):
            return False
        self._owner, self._count = me, 1
        return True

    def release(self) -> None:
        if self._owner != _thread.get_ident():
            raise RuntimeError("cannot release un-acquired lock")
        self._count -= 1
        if self._count == 0:
            self._owner = None
            self._block.release()

    def locked(self) -> bool:
        return self._block.locked()

    def _reset(self) -> None:
        """Make it free again (in a forked child only)."""
        self._owner, self._count = None, 0
        self._block._reset()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---------------------------------------------------------------------------- fd waits
_poll_factory: Callable[[], Any] | None = None


def _is_green(obj: object) -> bool:
    return str(getattr(obj, "__module__", "")).startswith(("gevent", "eventlet"))


def _original_poll() -> Any:
    """A ``select.poll`` object of the standard library, whatever has been patched."""
    global _poll_factory
    if _poll_factory is None:
        monkey = sys.modules.get("gevent.monkey")
        if monkey is not None:  # the saved original if gevent patched select, else select.poll
            factory = monkey.get_original("select", "poll")
        else:
            factory = getattr(select, "poll", None)
        if factory is None or _is_green(factory):  # eventlet deletes select.poll
            factory = _module("eventlet.patcher").original("select").poll
        _poll_factory = factory
    return _poll_factory()


def _poll_now(fds: Sequence[int], timeout_ms: float) -> list[int]:
    poller = _original_poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return [fd for fd, _ in poller.poll(timeout_ms)]


def wait_readable(fds: Sequence[int], timeout: float | None) -> list[int]:
    """Wait until any of ``fds`` is readable or ``timeout`` seconds pass; the readable fds.

    Unpatched, this is ``select.poll``: no fd-number limit, restarted after a signal, and a
    signal handler's exception (gunicorn's ``SystemExit``, celery's soft time limit)
    propagates unchanged. Once gevent or eventlet has patched this process (before or after
    mppools was imported), it waits through the hub and lets the other greenlets run; an
    exception thrown into the waiting greenlet propagates unchanged (where a signal handler
    runs under a hub is up to gevent/eventlet: both raise ``SystemExit`` and
    ``KeyboardInterrupt`` in the main greenlet). A timeout of 0 never yields. An empty list
    means the timeout passed (a hangup or error on an fd also counts as readable).
    """
    if timeout is not None and timeout <= 0:
        return _poll_now(fds, 0)
    which = flavour()
    if which == "gevent":
        return _gevent_wait(fds, timeout)
    if which == "eventlet":
        return _eventlet_wait(fds, timeout)
    return _poll_now(fds, -1 if timeout is None else timeout * 1000.0)


def _gevent_wait(fds: Sequence[int], timeout: float | None) -> list[int]:
    gselect = _module("gevent.select")
    # gevent.select.poll: io watchers on the hub, no FD_SETSIZE (gevent's select() would
    # first call the original select.select, which fails for fds >= 1024)
    poller = gselect.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return sorted({fd for fd, _ in poller.poll(None if timeout is None else timeout * 1000.0)})


def _eventlet_wait(fds: Sequence[int], timeout: float | None) -> list[int]:
    hub = _module("eventlet.hubs").get_hub()
    current = _module("greenlet").getcurrent()
    if hub.greenlet is current:
        raise RuntimeError("mppools cannot wait inside eventlet's hub")
    if type(hub).__module__.endswith(".selects") and any(fd >= FD_SETSIZE for fd in fds):
        return _sliced_wait(fds, timeout)  # that hub would hand the fd to select.select
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        listeners: list[Any] = []
        copies: list[int] = []
        timer = None
        bucket = hub.listeners[hub.READ]

        def wake(_fd: int) -> None:
            current.switch()

        try:
            for fd in fds:
                watched = fd
                if fd in bucket:
                    # eventlet allows one reader per fd and hub ("second simultaneous
                    # read"): another greenlet waits on this fd, so watch a duplicate
                    watched = os.dup(fd)
                    copies.append(watched)
                listeners.append(hub.add(hub.READ, watched, wake, current.throw,
                                         _no_op))
            if deadline is not None:
                timer = hub.schedule_call_global(max(deadline - time.monotonic(), 0.0),
                                                 current.switch)
            hub.switch()
        finally:
            if timer is not None:
                timer.cancel()
            for listener in listeners:
                hub.remove(listener)
            for copy in copies:
                os.close(copy)
        ready = _poll_now(fds, 0)
        if ready or (deadline is not None and time.monotonic() >= deadline):
            return ready


def _no_op() -> None:
    return None


def _sliced_wait(fds: Sequence[int], timeout: float | None) -> list[int]:
    """Check with a zero-timeout poll between short green sleeps (a last resort)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    pause = 0.001
    while True:
        ready = _poll_now(fds, 0)
        if ready:
            return ready
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return []
        _green_sleep(pause if left is None else min(pause, left))
        pause = min(pause * 2, 0.01)


# ------------------------------------------------------------------------------ sockets
def recvmsg(sock: Any, bufsize: int, ancbufsize: int = 0) -> tuple[bytes, list[Any], int, Any]:
    """``sock.recvmsg(bufsize, ancbufsize)`` honouring ``sock.gettimeout()``, green if patched.

    eventlet's green socket has no ``recvmsg``: the call reaches the non-blocking socket
    underneath and fails at once with ``BlockingIOError``. Here it waits for the socket with
    :func:`wait_readable` instead (yielding), and raises ``TimeoutError`` once the socket's
    timeout has passed, as a plain socket would. gevent's socket has a green ``recvmsg``.
    """
    if flavour() != "eventlet":
        result: tuple[bytes, list[Any], int, Any] = sock.recvmsg(bufsize, ancbufsize)
        return result
    timeout = sock.gettimeout()
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            got: tuple[bytes, list[Any], int, Any] = sock.recvmsg(bufsize, ancbufsize)
            return got
        except BlockingIOError:
            pass
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise TimeoutError("timed out")
        wait_readable([sock.fileno()], left)

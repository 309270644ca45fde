"""Fork handling: ONE module-level ``os.register_at_fork`` handler over weak references.

``os.register_at_fork`` keeps strong references and cannot be undone, so registering one hook
per pool would leak every pool ever made. Instead, objects that need work in a forked child
(pools, limiters, keepers) add themselves to a ``WeakSet`` here, and the single handler walks
it. The handler runs for every kind of fork that goes through ``os.fork()``: gunicorn's plain
fork, ``multiprocessing`` (fork context) and billiard (celery prefork).

``epoch`` changes in every child: a slot or connection stamped with an older epoch was
inherited from the parent and must never be used, released or closed by protocol here.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
import sys
import threading
import types
import weakref
from collections.abc import Callable
from typing import Protocol

__all__ = [
    "ForkAware", "bury", "catch_up_c_level_fork", "current_epoch", "drop_inherited",
    "forbid_threads", "inherited_threads", "on_fork_in_child", "register", "threadless",
    "unregister", "walk_sockets",
]

logger = logging.getLogger("mppools")


class ForkAware(Protocol):
    def _after_fork_in_child(self) -> None: ...


_epoch = 0
# ordered by priority: limiters first (fresh locks), then pools, then keepers
# keyed by id(): registered objects need not be hashable (a PoolGroup is a dict)
_registries: tuple[weakref.WeakValueDictionary[int, ForkAware], ...] = (
    weakref.WeakValueDictionary(), weakref.WeakValueDictionary(), weakref.WeakValueDictionary()
)
#: objects inherited from the parent, kept alive in the child so that no finalizer of theirs
#: (a transport's __del__, say) ever acts on the parent's connection
_graveyard: list[object] = []


def bury(obj: object) -> None:
    """Keep an inherited object referenced for the life of this process."""
    _graveyard.append(obj)


def current_epoch() -> int:
    """The fork generation of this process image (0 in the original process)."""
    return _epoch


_callbacks: list[Callable[[], None]] = []

#: this process must not run threads of mppools (:func:`forbid_threads`); never inherited
_threadless = False


def forbid_threads() -> None:
    """Run no thread of mppools in this process (until it forks: children may again).

    For a process that forks from C, where the child inherits the interpreter's GIL and
    locks as this process's other threads left them (a uWSGI master without
    ``--py-call-uwsgi-fork-hooks``): a thread of ours waiting for the GIL at such a fork
    would make the child's first GIL hand-off wait forever. Here the pools keep no idle
    connection (each release gives its slot back at once), so no keeper thread is needed.
    """
    global _threadless
    _threadless = True


def threadless() -> bool:
    """True if this process must not start threads of mppools (:func:`forbid_threads`)."""
    return _threadless


def on_fork_in_child(callback: Callable[[], None]) -> None:
    """Run a module-level ``callback`` first in every forked child (for mppools' own modules)."""
    _callbacks.append(callback)


def register(obj: ForkAware, priority: int = 1) -> None:
    """Call ``obj._after_fork_in_child()`` in every forked child while ``obj`` is alive."""
    _registries[priority][id(obj)] = obj


def unregister(obj: ForkAware) -> None:
    """Stop calling ``obj`` after forks (an object that was never fully made)."""
    for registry in _registries:
        registry.pop(id(obj), None)


def _after_fork_in_child() -> None:
    global _epoch, _threadless
    _epoch += 1
    _threadless = False
    from mppools import _liveness

    _liveness._reset_after_fork()
    for callback in _callbacks:
        try:
            callback()
        except Exception:
            logger.exception("mppools: after-fork callback %r failed", callback)
    for registry in _registries:
        for obj in list(registry.values()):
            try:
                obj._after_fork_in_child()
            except Exception:  # a failing object must not leave the others inherited
                logger.exception("mppools: after-fork cleanup of %r failed", obj)


os.register_at_fork(after_in_child=_after_fork_in_child)


def _os_threads() -> int:
    """Threads of this process as the kernel counts them (0 if /proc cannot say)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


def _only_interpreter() -> bool:
    """True if this thread runs in CPython's main interpreter and no other exists."""
    import ctypes

    api = ctypes.pythonapi
    for fn in (api.PyInterpreterState_Get, api.PyInterpreterState_Main,
               api.PyInterpreterState_Head):
        fn.restype, fn.argtypes = ctypes.c_void_p, []
    api.PyInterpreterState_Next.restype = ctypes.c_void_p
    api.PyInterpreterState_Next.argtypes = [ctypes.c_void_p]
    main = api.PyInterpreterState_Main()
    head = api.PyInterpreterState_Head()
    return bool(main) and api.PyInterpreterState_Get() == main and head == main and not (
        api.PyInterpreterState_Next(head))


def catch_up_c_level_fork() -> bool:
    """In a process forked from C (uWSGI forks its workers so), run what ``os.fork()`` would
    have run in the child: CPython's own child-side handling (``PyOS_AfterFork_Child``),
    which makes the GIL, the import lock and the ``threading`` module anew and then runs
    every ``os.register_at_fork`` child handler, mppools' own included. True if it ran.

    Without it the child inherits the GIL's condition variable and the interpreter's locks as
    the parent's other threads left them at the fork (a keeper thread of mppools waiting for
    the GIL, say): its first GIL hand-off can then wait forever (glibc waits for waiters that
    exist only in the parent).

    It runs only where that is sound: CPython, in its main interpreter with no other
    interpreter, in a process that has one thread (the one the fork made). Anywhere else it
    returns False and the caller falls back to mppools' own after-fork handling, which is
    safe for mppools' objects but leaves the interpreter's state as the fork left it.
    """
    if sys.implementation.name != "cpython" or _os_threads() != 1:
        return False
    try:
        if not _only_interpreter():
            return False
        import ctypes

        api = ctypes.pythonapi  # a PyDLL: the GIL stays held across the call
        api.PyOS_AfterFork_Child.restype, api.PyOS_AfterFork_Child.argtypes = None, []
        api.PyOS_AfterFork_Child()
    except (AttributeError, OSError):  # no such symbol: an embedding without the C API
        return False
    return True


def inherited_threads() -> list[str]:
    """Names of threads this process's ``threading`` module still lists as alive, besides
    the calling one: after a fork from C, those of the parent (they do not exist here)."""
    me = threading.get_ident()
    # not threading.enumerate(): it takes a lock a thread of the parent may have held at the
    # fork (it is made anew only by the handling this is about)
    active: dict[int, threading.Thread] = dict(getattr(threading, "_active", {}))
    return sorted(t.name for ident, t in active.items() if ident != me and t.is_alive())


def walk_sockets(root: object, budget: int = 20000) -> list[socket.socket]:
    """Every ``socket.socket`` reachable from ``root`` through instance state and containers.

    Generic on purpose: py-amqp keeps one socket on its transport, redis-py one per pooled
    client connection, other transports elsewhere. The walk follows instance ``__dict__`` and
    ``__slots__``, lists, tuples, sets, deques and dict values; it never enters modules,
    classes, functions or mppools' own limiter, and stops after ``budget`` objects.
    """
    from mppools._limiter._base import Limiter

    found: list[socket.socket] = []
    seen: set[int] = set()
    stack: list[object] = [root]
    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType,
            types.MethodType, Limiter, str, bytes, bytearray, int, float, memoryview)
    while stack and len(seen) < budget:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        if isinstance(obj, socket.socket):
            found.append(obj)
            continue
        if isinstance(obj, dict):
            stack.extend(obj.values())
            continue
        if isinstance(obj, list | tuple | set | frozenset | collections.deque):
            stack.extend(obj)
            continue
        state = getattr(obj, "__dict__", None)
        if isinstance(state, dict):
            stack.extend(state.values())
        for cls in type(obj).__mro__:
            for attr in getattr(cls, "__slots__", ()):
                if isinstance(attr, str) and attr not in ("__dict__", "__weakref__"):
                    value = getattr(obj, attr, None)
                    if value is not None:
                        stack.append(value)
    return found


def drop_inherited(obj: object) -> int:
    """Make the sockets reachable from an inherited ``obj`` unusable in this child, no I/O.

    Each socket object is detached and its fd copy closed with ``os.close``. That is the only
    safe thing a child can do with a connection it shares with its parent: a protocol close
    (AMQP ``Connection.Close``), a TLS ``close_notify`` or ``shutdown(SHUT_RDWR)`` all act on
    the connection itself and would break the parent's, whereas closing one fd copy does not.
    Any later close or shutdown attempted by the transport's own code then fails harmlessly
    on a detached socket. Returns how many sockets were dropped.
    """
    dropped = 0
    for sock in walk_sockets(obj):
        try:
            fd = sock.detach()
        except OSError:
            continue
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
            dropped += 1
    return dropped

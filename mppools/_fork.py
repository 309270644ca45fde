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

import logging
import os
import weakref
from typing import Protocol

__all__ = ["ForkAware", "current_epoch", "register"]

logger = logging.getLogger("mppools")


class ForkAware(Protocol):
    def _after_fork_in_child(self) -> None: ...


_epoch = 0
# ordered by priority: limiters first (fresh locks), then pools, then keepers
_registries: tuple[weakref.WeakSet[ForkAware], ...] = (
    weakref.WeakSet(), weakref.WeakSet(), weakref.WeakSet()
)


def current_epoch() -> int:
    """The fork generation of this process image (0 in the original process)."""
    return _epoch


def register(obj: ForkAware, priority: int = 1) -> None:
    """Call ``obj._after_fork_in_child()`` in every forked child while ``obj`` is alive."""
    _registries[priority].add(obj)


def _after_fork_in_child() -> None:
    global _epoch
    _epoch += 1
    from mppools import _liveness

    _liveness._reset_after_fork()
    for registry in _registries:
        for obj in list(registry):
            try:
                obj._after_fork_in_child()
            except Exception:  # a failing object must not leave the others inherited
                logger.exception("mppools: after-fork cleanup of %r failed", obj)


os.register_at_fork(after_in_child=_after_fork_in_child)

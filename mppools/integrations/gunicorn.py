"""gunicorn server hooks: one budget of broker connections for the master and all its workers.

Setup, in ``gunicorn.conf.py`` (three lines)::

    from mppools.integrations.gunicorn import on_starting, child_exit, on_exit
    # and in the environment of the master:  MPPOOLS_LIMIT=3  (MPPOOLS_NAME=web: optional)

or, with the settings in the file instead of the environment::

    from mppools.integrations.gunicorn import hooks
    on_starting, child_exit, on_exit = hooks(limit=3, name="web")

Then publish through ``mppools.producers`` / ``mppools.connections`` (the ``kombu.pools``
API) in the application, or call :func:`mppools.integrations.celery.install` on a celery app
so that ``apply_async`` draws from the same budget.

What the hooks do:

``on_starting(server)``
    :func:`mppools.configure` in the master, before any worker is forked: every worker
    inherits the budget. Settings: the arguments given to :func:`hooks`, else
    ``MPPOOLS_LIMIT`` / ``MPPOOLS_NAME`` / ``MPPOOLS_ACQUIRE_TIMEOUT`` /
    ``MPPOOLS_IDLE_TIMEOUT``. If the master already has a budget (``preload_app`` loaded an
    application that configured one), it is kept. With no limit anywhere it logs a warning
    and leaves mppools unconfigured (per-process pools, like kombu.pools).
``child_exit(server, worker)``
    :func:`mppools.audit` in the master right after gunicorn reaped a worker: the slots of a
    worker that died holding connections (timeout kill, OOM, SIGKILL) are free at once,
    instead of at the next waiter's audit.
``on_exit(server)``
    :func:`mppools.close` in the master at shutdown: the budget's shared objects are removed
    (only if the master created them and no live process still uses them).

Every hook swallows and logs its own errors (a broken budget must not stop gunicorn) except
``on_starting`` with an invalid setting, which raises so the mistake is seen at start.

Chaining with your own hooks: gunicorn keeps one function per hook name, so call ours from
yours::

    from mppools.integrations import gunicorn as mppools_hooks

    def on_starting(server):
        mppools_hooks.on_starting(server)   # first: before anything forks or connects
        ...                                  # your code

    def child_exit(server, worker):
        mppools_hooks.child_exit(server, worker)
        ...

    def on_exit(server):
        ...                                  # your code
        mppools_hooks.on_exit(server)       # last

Each function returns None and takes exactly gunicorn's arguments, so it can also be called
from a hook that does more.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import mppools
from mppools import _config
from mppools.integrations import settings_from_env

__all__ = ["Hooks", "child_exit", "hooks", "on_exit", "on_starting"]

logger = logging.getLogger("mppools.gunicorn")


def _log(server: Any, level: int, msg: str, *args: Any) -> None:
    target = getattr(server, "log", None)
    method = {logging.INFO: "info", logging.WARNING: "warning", logging.ERROR: "error",
              logging.DEBUG: "debug"}.get(level, "info")
    fn = getattr(target, method, None) if target is not None else None
    if callable(fn):
        try:
            fn(msg, *args)
            return
        except Exception:  # a logger must not break a hook
            pass
    logger.log(level, msg, *args)


@dataclass(frozen=True)
class Hooks:
    """The three gunicorn hooks bound to one set of budget settings.

    Unpack it (``on_starting, child_exit, on_exit = hooks(...)``) or use its attributes.
    Arguments left as None are read from the environment when ``on_starting`` runs.
    """

    limit: int | None = None
    name: str | None = None
    configure_kwargs: dict[str, Any] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.on_starting, self.child_exit, self.on_exit))

    def as_dict(self) -> dict[str, Any]:
        """``{"on_starting": ..., "child_exit": ..., "on_exit": ...}``."""
        return {"on_starting": self.on_starting, "child_exit": self.child_exit,
                "on_exit": self.on_exit}

    def on_starting(self, server: Any) -> None:
        """Configure the budget in the master, before gunicorn forks any worker.

        Raises:
            mppools.ConfigurationError: an invalid limit / name / timeout.
        """
        limit, name, kwargs = settings_from_env(self.limit, self.name, self.configure_kwargs)
        current = _config.current()
        if current is not None:
            if limit is not None and (current.limit != limit or (
                    name is not None and current.name != name)):
                _log(server, logging.WARNING,
                     "mppools: the master already uses budget %r (limit %d); ignoring "
                     "limit=%s name=%s", current.name, current.limit, limit, name)
            else:
                _log(server, logging.INFO, "mppools: using budget %r (limit %d)",
                     current.name, current.limit)
            return
        if limit is None:
            _log(server, logging.WARNING,
                 "mppools: no limit (set MPPOOLS_LIMIT or hooks(limit=...)): broker "
                 "connections are NOT limited across workers")
            return
        limiter = mppools.configure(limit, name, **kwargs)
        _log(server, logging.INFO,
             "mppools: budget %r: at most %d broker connection(s) for all workers",
             limiter.name, limiter.limit)

    def child_exit(self, server: Any, worker: Any) -> None:
        """Reclaim at once the slots of the worker gunicorn just reaped."""
        if _config.current() is None:
            return
        try:
            report = mppools.audit()
        except Exception:
            _log(server, logging.ERROR, "mppools: audit after worker exit failed")
            logger.exception("mppools: audit after worker exit failed")
            return
        if report.reclaimed_slots:
            _log(server, logging.INFO,
                 "mppools: reclaimed %d slot(s) of dead worker(s) %s",
                 len(report.reclaimed_slots),
                 sorted({pid for pid, _ in report.reclaimed_slots}))

    def on_exit(self, server: Any) -> None:
        """Close the budget in the master (removes it if nobody else uses it)."""
        try:
            mppools.close()
        except Exception:
            logger.exception("mppools: close at gunicorn exit failed")


def hooks(limit: int | None = None, name: str | None = None, **configure_kwargs: Any) -> Hooks:
    """gunicorn hooks for a budget of ``limit`` connections (see the module docstring).

    ``configure_kwargs`` go to :func:`mppools.configure` (``acquire_timeout``,
    ``idle_timeout``, ``capacity``, ``mode``).
    """
    return Hooks(limit, name, dict(configure_kwargs))


_default = Hooks()


def on_starting(server: Any) -> None:
    """gunicorn ``on_starting``: configure the budget from ``MPPOOLS_LIMIT`` / ``MPPOOLS_NAME``."""
    _default.on_starting(server)


def child_exit(server: Any, worker: Any) -> None:
    """gunicorn ``child_exit``: reclaim the dead worker's slots at once (``mppools.audit()``)."""
    _default.child_exit(server, worker)


def on_exit(server: Any) -> None:
    """gunicorn ``on_exit``: ``mppools.close()`` (removes the budget if nobody uses it)."""
    _default.on_exit(server)

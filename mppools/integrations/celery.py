"""celery: the worker's prefork children and every publisher share one budget.

Setup, one call where the app is defined (the module ``celery -A`` imports)::

    from celery import Celery
    from mppools.integrations.celery import install

    app = Celery("proj", broker="amqp://...")
    app.config_from_object("proj.settings")   # configure the app first
    install(app, limit=4, name="proj")          # or MPPOOLS_LIMIT / MPPOOLS_NAME

What ``install(app, limit=None, name=None, **configure_kwargs)`` does:

1. **The budget.** If this process has no budget yet and a limit is known (the argument,
   else ``MPPOOLS_LIMIT``), it calls :func:`mppools.configure` at once. In a ``celery worker``
   that is the worker's main process, while it imports the app, long before the prefork
   pool forks its children; the ``worker_init`` signal (main process, before the pool
   starts) checks again, for settings that only appear later. Children forked by billiard,
   and gunicorn workers forked by a master that called ``install`` (or used
   :mod:`mppools.integrations.gunicorn`), inherit the budget. A process that already has a
   budget keeps it. The budget's name and limit are exported to ``MPPOOLS_NAME`` /
   ``MPPOOLS_LIMIT`` (unless already set) so that processes started afresh (the ``spawn``
   start method, ``gunicorn --reload``) join the same budget instead of making their own.
2. **Celery's own publishing pool.** ``app.pool`` becomes a
   :class:`mppools.pools.LimitedConnectionPool` over ``app.connection_for_write()`` (local
   limit ``broker_pool_limit``) and ``app.producer_pool`` (``app.amqp.producer_pool``) an
   :class:`mppools.pools.ProducerPool` over it, so ``apply_async``, ``send_task``, retries and
   the ``rpc://`` result backend draw connections from the shared budget. Celery resets both
   after a billiard fork (``app._after_fork``); ``install`` hooks ``app.on_after_fork`` and
   ``worker_process_init`` to build them again in every child. After a plain ``os.fork``
   (gunicorn) the inherited pools are emptied by mppools' own fork handler.
3. **Dead children.** SIGKILL, the OOM killer or a hard time limit never run
   ``worker_process_shutdown``. ``install`` adds a worker bootstep that wraps the prefork
   pool's ``_join_exited_workers`` (billiard calls it whenever it reaps children: on the
   child's sentinel becoming readable, and every few seconds from ``maintain_pool``): when
   it reaped any, :func:`mppools.audit` runs in the main process, so a dead child's slots
   come back right away. (A process waiting for a slot reclaims them by itself anyway, a
   millisecond or two after the death, through pidfds; the hook makes ``stats()`` exact and
   frees slots even when nobody waits.) We chose this over ``process_destructor`` /
   ``worker_process_shutdown`` (they run in the dying child, never after SIGKILL) and over a
   periodic timer (slower, and redundant with the waiters' own audit).

Not covered: with task events, gossip or worker heartbeats enabled (the defaults for
gossip and heartbeats), the worker's *main* process keeps one extra, unpooled write
connection for its event dispatcher; the consuming connection (``connection_for_read``)
isn't pooled either. Budget your broker for ``limit`` + those per worker main process, or
start the worker with ``--without-gossip --without-heartbeat`` and no ``-E``, or point
``broker_read_url`` elsewhere. Call ``install`` after the app's configuration is final: the
pools are bound to ``connection_for_write()`` as configured then (``install`` loads the
configuration; a later ``config_from_object`` re-binds them through ``app.on_after_configure``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import mppools
from mppools import _config
from mppools._limiter._base import Limiter
from mppools.integrations import ENV_LIMIT, ENV_NAME, settings_from_env
from mppools.pools import LimitedConnectionPool, ProducerPool

__all__ = ["ReclaimStep", "install", "install_pools"]

logger = logging.getLogger("mppools.celery")

_INSTALLED = "_mppools_installed"


def _configure(limit: int | None, name: str | None, kwargs: dict[str, Any]) -> Limiter | None:
    current = _config.current()
    if current is not None:
        if limit is not None and limit != current.limit:
            logger.warning("mppools: this process already uses budget %r (limit %d); "
                           "ignoring limit=%d", current.name, current.limit, limit)
        return current
    if limit is None:
        return None
    limiter = mppools.configure(limit, name, **kwargs)
    # processes started afresh (spawn, exec) join this budget rather than make their own
    os.environ.setdefault(ENV_NAME, limiter.name)
    os.environ.setdefault(ENV_LIMIT, str(limiter.limit))
    return limiter


def install_pools(app: Any) -> LimitedConnectionPool:
    """Make ``app.pool`` / ``app.producer_pool`` mppools pools (idempotent, per process).

    Called by :func:`install`; call it yourself only if something replaced them.
    """
    current = app._pool
    producer_pool = getattr(app.amqp, "_producer_pool", None)
    if (isinstance(current, LimitedConnectionPool) and not getattr(current, "_closed", False)
            and isinstance(producer_pool, ProducerPool)
            and producer_pool.connections is current):
        return current
    pool = LimitedConnectionPool(app.connection_for_write(), limit=app.conf.broker_pool_limit)
    app._pool = pool
    app.amqp._producer_pool = ProducerPool(pool, limit=pool.limit)
    for old in (producer_pool, current):
        if old is not None and not isinstance(old, LimitedConnectionPool | ProducerPool):
            # kombu pools made before install(): close what they opened in THIS process
            with contextlib.suppress(Exception):
                old.force_close_all()
    return pool


def _audit_after_reap(reaped: Any) -> None:
    if not reaped or _config.current() is None:
        return
    try:
        report = mppools.audit()
    except Exception:
        logger.exception("mppools: audit after a pool child exited failed")
        return
    if report.reclaimed_slots:
        logger.info("mppools: reclaimed %d slot(s) of dead pool child(ren) %s",
                    len(report.reclaimed_slots),
                    sorted({pid for pid, _ in report.reclaimed_slots}))


def _hook_pool(pool: Any) -> bool:
    """Wrap a billiard pool's ``_join_exited_workers`` to audit after reaping children."""
    original = getattr(pool, "_join_exited_workers", None)
    if original is None or getattr(original, "_mppools_hooked", False):
        return False

    def _join_exited_workers(*args: Any, **kwargs: Any) -> Any:
        reaped = original(*args, **kwargs)
        _audit_after_reap(reaped)
        return reaped

    _join_exited_workers._mppools_hooked = True  # type: ignore[attr-defined]
    pool._join_exited_workers = _join_exited_workers
    return True


def _make_step() -> type:
    from celery import bootsteps

    class ReclaimStep(bootsteps.StartStopStep):  # type: ignore[misc]
        """Worker bootstep: audit the budget whenever the prefork pool reaps a child."""

        requires = ("celery.worker.components:Pool",)
        label = "mppools reclaim"

        def start(self, parent: Any) -> None:
            pool = getattr(getattr(parent, "pool", None), "_pool", None)
            if pool is not None and _hook_pool(pool):
                logger.info("mppools: budget audit hooked to the reaping of pool children")

        def stop(self, parent: Any) -> None:
            pass

    return ReclaimStep


ReclaimStep: type | None = None


def install(
    app: Any, limit: int | None = None, name: str | None = None, **configure_kwargs: Any
) -> Limiter | None:
    """Make every process of this celery app draw broker connections from one budget.

    See the module docstring. ``configure_kwargs`` go to :func:`mppools.configure`.
    Returns the budget this process uses (None if no limit is known yet: the pools are
    then mppools pools that behave like kombu's until a budget is configured).

    Raises:
        mppools.ConfigurationError: an invalid limit, name or timeout.
    """
    global ReclaimStep
    from celery import signals

    limit, name, kwargs = settings_from_env(limit, name, configure_kwargs)
    limiter = _configure(limit, name, kwargs)

    if getattr(app, _INSTALLED, False):
        return limiter
    setattr(app, _INSTALLED, True)

    def _pools(*_args: Any, **_kwargs: Any) -> None:
        try:
            install_pools(app)
        except Exception:
            logger.exception("mppools: could not install the publishing pools of %r", app)

    # load the configuration now (celery's own ``app.pool`` property would otherwise build a
    # kombu pool after on_after_configure ran), and follow any later re-configuration
    _ = app.conf
    install_pools(app)
    app.on_after_configure.connect(_pools, weak=False)
    # celery's app._after_fork() (billiard children) drops app._pool and the producer pool
    app.on_after_fork.connect(_pools, weak=False)

    def _worker_init(sender: Any = None, **_kwargs: Any) -> None:
        if getattr(sender, "app", app) is not app:
            return
        # settings may have come from the worker's own setup: check again before forking
        lim, nm, kw = settings_from_env(limit, name, configure_kwargs)
        if _configure(lim, nm, kw) is None:
            logger.warning("mppools: no limit (install(app, limit=...) or MPPOOLS_LIMIT): "
                           "broker connections are NOT limited across pool processes")
        _pools()

    def _worker_process_init(**_kwargs: Any) -> None:
        _pools()

    signals.worker_init.connect(_worker_init, weak=False)
    signals.worker_process_init.connect(_worker_process_init, weak=False)

    if ReclaimStep is None:
        ReclaimStep = _make_step()
    app.steps["worker"].add(ReclaimStep)
    return limiter

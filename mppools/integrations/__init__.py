"""Ready-made glue for the process managers that fork broker clients.

* :mod:`mppools.integrations.gunicorn`: server hooks for ``gunicorn.conf.py``
  (``on_starting`` / ``child_exit`` / ``on_exit``).
* :mod:`mppools.integrations.celery`: ``install(app)`` for a celery app (prefork workers,
  and any process that publishes with ``apply_async`` / ``send_task``).
* :mod:`mppools.integrations.uwsgi`: ``setup(limit, name=...)`` in a uWSGI app (preforked
  or ``--lazy-apps``), with its post-fork hook and the master's cleanup command.
* :mod:`mppools.integrations.prometheus`: a prometheus_client ``Collector`` for the app's
  own ``/metrics`` (the ``mppools[prometheus]`` extra).

The gunicorn, celery and uwsgi integrations read the budget's settings from their
arguments or from the environment:

``MPPOOLS_LIMIT``
    the host-wide number of broker connections (required unless given as an argument);
``MPPOOLS_NAME``
    the budget's name (default: ``pid<master pid>-<random>``; give one to let other masters on the
    host, or ``mppools status NAME``, join or watch the same budget);
``MPPOOLS_ACQUIRE_TIMEOUT`` / ``MPPOOLS_IDLE_TIMEOUT`` / ``MPPOOLS_HOLD_QUANTUM``
    seconds (``none`` for no bound, where that means anything), defaults as in
    :func:`mppools.configure`;
``MPPOOLS_BACKEND``
    where the budget lives, as :func:`mppools.configure`'s ``backend`` (default ``posix``);
``MPPOOLS_LEND``
    ``1`` / ``0`` (also ``true``/``false``, ``yes``/``no``, ``on``/``off``): whether a
    producer with no free slot borrows another process's idle connection
    (:func:`mppools.configure`'s ``lend``, default on).
"""

from __future__ import annotations

import os
from typing import Any

from mppools._errors import ConfigurationError

__all__ = ["settings_from_env"]

ENV_LIMIT = "MPPOOLS_LIMIT"
ENV_NAME = "MPPOOLS_NAME"
ENV_ACQUIRE_TIMEOUT = "MPPOOLS_ACQUIRE_TIMEOUT"
ENV_IDLE_TIMEOUT = "MPPOOLS_IDLE_TIMEOUT"
ENV_HOLD_QUANTUM = "MPPOOLS_HOLD_QUANTUM"
ENV_BACKEND = "MPPOOLS_BACKEND"
ENV_LEND = "MPPOOLS_LEND"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _seconds(var: str, raw: str) -> float | None:
    if raw.strip().lower() in ("none", "off", "inf", ""):
        return None
    try:
        return float(raw)
    except ValueError:
        raise ConfigurationError(f"{var}={raw!r} is not a number of seconds") from None


def settings_from_env(
    limit: int | None = None,
    name: str | None = None,
    configure_kwargs: dict[str, Any] | None = None,
    environ: Any = None,
) -> tuple[int | None, str | None, dict[str, Any]]:
    """Resolve ``(limit, name, configure kwargs)``: arguments first, then the environment.

    ``limit`` is None when neither the argument nor ``MPPOOLS_LIMIT`` gives one.

    Raises:
        ConfigurationError: an environment variable holds an invalid value.
    """
    env = os.environ if environ is None else environ
    kwargs = dict(configure_kwargs or {})
    if limit is None:
        raw = env.get(ENV_LIMIT, "").strip()
        if raw:
            try:
                limit = int(raw)
            except ValueError:
                raise ConfigurationError(
                    f"{ENV_LIMIT}={raw!r} is not a whole number of connections"
                ) from None
    if name is None:
        name = env.get(ENV_NAME, "").strip() or None
    if "acquire_timeout" not in kwargs and env.get(ENV_ACQUIRE_TIMEOUT) is not None:
        kwargs["acquire_timeout"] = _seconds(ENV_ACQUIRE_TIMEOUT, env[ENV_ACQUIRE_TIMEOUT])
    if "idle_timeout" not in kwargs and env.get(ENV_IDLE_TIMEOUT) is not None:
        kwargs["idle_timeout"] = _seconds(ENV_IDLE_TIMEOUT, env[ENV_IDLE_TIMEOUT])
    if "hold_quantum" not in kwargs and env.get(ENV_HOLD_QUANTUM, "").strip():
        quantum = _seconds(ENV_HOLD_QUANTUM, env[ENV_HOLD_QUANTUM])
        if quantum is None:
            raise ConfigurationError(f"{ENV_HOLD_QUANTUM} needs a number of seconds (0 for none)")
        kwargs["hold_quantum"] = quantum
    if "backend" not in kwargs and env.get(ENV_BACKEND, "").strip():
        kwargs["backend"] = env[ENV_BACKEND].strip()
    if "lend" not in kwargs and env.get(ENV_LEND, "").strip():
        raw = env[ENV_LEND].strip().lower()
        if raw not in _TRUE + _FALSE:
            raise ConfigurationError(f"{ENV_LEND}={env[ENV_LEND]!r} is not 1 or 0 (or true, "
                                     "false, yes, no, on, off)")
        kwargs["lend"] = raw in _TRUE
    return limit, name, kwargs

"""The process-wide budget: ``configure()``, ``attach()``, ``stats()``, ``close()``.

One budget per process at a time. ``configure`` is called by the master before it forks;
forked children inherit the open budget (the fork handler rebuilds its in-process locks).
Processes that were exec'd rather than forked call ``attach(name)``. The budget lives in a
backend chosen by ``backend=`` (``backend_for``): ``"posix"``, the default, shares it
between the processes of this host; ``"memory"`` keeps it inside this process.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
from dataclasses import dataclass, replace
from typing import Any

from mppools import _fork, _green
from mppools._errors import (
    BudgetInUseError,
    ConfigurationError,
    NotConfiguredError,
    UnsupportedPlatformError,
)
from mppools._limiter._base import Backend, BudgetStats, Limiter
from mppools._validate import check_limit, check_timeout

__all__ = [
    "DEFAULT_ACQUIRE_TIMEOUT",
    "DEFAULT_HOLD_QUANTUM",
    "DEFAULT_IDLE_TIMEOUT",
    "attach",
    "backend_for",
    "close",
    "configure",
    "current",
    "stats",
]

logger = logging.getLogger("mppools")

#: well below gunicorn's default 30 s worker timeout, so a blocked worker fails cleanly
DEFAULT_ACQUIRE_TIMEOUT = 10.0
#: under contention a connection in active use is handed on at most once per this many
#: seconds (see docs/concepts.md, "Contention"); idle ones are handed on at once
DEFAULT_HOLD_QUANTUM = 0.2
MAX_HOLD_QUANTUM = 60.0
#: idle pooled connections older than this are closed and their slots given back
DEFAULT_IDLE_TIMEOUT = 300.0
#: the backend of configure() and attach() without ``backend=``
DEFAULT_BACKEND = "posix"


@dataclass(frozen=True)
class _Settings:
    name: str | None
    limit: int
    acquire_timeout: float | None
    idle_timeout: float | None
    capacity: int | None
    mode: int
    hold_quantum: float = 0.0
    backend: str = DEFAULT_BACKEND
    generated: bool = False  # the name was made up by configure()
    lend: bool = True


_lock = _green.Lock()
_limiter: Limiter | None = None
_settings: _Settings | None = None
_creator_pid: int | None = None


def current() -> Limiter | None:
    """The budget this process uses, or None when unconfigured (kombu.pools behaviour)."""
    return _limiter


def lending() -> bool:
    """True if this process's producer pools borrow (and its pools lend) idle connections."""
    settings = _settings
    return _limiter is not None and (settings is None or settings.lend)


def backend_for(spec: object) -> Backend:
    """The backend that ``spec`` names: ``"posix"`` (this host's processes, the default),
    ``"memory"`` (this process only), or a redis URL (``redis://``, ``rediss://``,
    ``unix://``, ``redis+sentinel://``): one budget across hosts, coordinated there.

    Raises:
        ConfigurationError: ``spec`` is not a str naming a known backend.
    """
    if not isinstance(spec, str):
        raise ConfigurationError(f"backend must be a str like 'posix', not {spec!r}")
    if spec == "posix":
        from mppools._limiter.posix import PosixLimiter, default_name, validate_name

        return Backend(spec="posix", open=PosixLimiter.open, validate_name=validate_name,
                       default_name=default_name, host_bound=True)
    if spec == "memory":
        from mppools._limiter.memory import BACKEND

        return BACKEND
    scheme, sep, _ = spec.partition("://")
    if sep and scheme in ("redis", "rediss", "unix", "redis+sentinel"):
        return _redis_backend(spec)
    what = f"scheme {scheme!r}" if sep else "name"
    raise ConfigurationError(
        f"unknown backend {spec!r} (unknown {what}): use 'posix' (the processes of this "
        "host), 'memory' (this process only) or a redis URL (redis://, rediss://, unix://, "
        "redis+sentinel://: one budget across hosts)"
    )


def _redis_backend(spec: str) -> Backend:
    """The cross-host backend on the coordination server ``spec`` (needs redis-py)."""
    try:
        from mppools._limiter.redis import _limiter as redis_limiter
    except ImportError as exc:
        raise ConfigurationError(
            f"backend {spec!r} needs redis-py: pip install 'mppools[redis]' ({exc})"
        ) from None
    redis_limiter.parse_spec(spec)  # a bad lease_ttl or fresh is refused before anything
    return Backend(spec=spec, open=redis_limiter.open_backend(spec),
                   validate_name=redis_limiter.validate_name,
                   default_name=redis_limiter.default_name, host_bound=True,
                   needs_threads=True)


def _check_platform(backend: Backend) -> None:
    if backend.host_bound and not sys.platform.startswith("linux"):
        raise UnsupportedPlatformError(
            f"mppools' shared budget needs Linux (sem_timedwait, /proc, pidfd_open); this is "
            f"{sys.platform!r}. Unconfigured, mppools.pools still works like kombu.pools."
        )


def configure(
    limit: int,
    name: str | None = None,
    *,
    acquire_timeout: float | None = DEFAULT_ACQUIRE_TIMEOUT,
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
    capacity: int | None = None,
    mode: int = 0o600,
    hold_quantum: float = DEFAULT_HOLD_QUANTUM,
    backend: str = DEFAULT_BACKEND,
    lend: bool = True,
) -> Limiter:
    """Give this process, and every process it forks from now on, one budget of ``limit``.

    Call it in the master before forking (gunicorn ``on_starting``, celery before the pool
    starts). From then on, at most ``limit`` broker connections made through mppools' pools
    are open at once across all processes that share ``name``.

    ``name`` defaults to a fresh name, ``"pid<master pid>-<random>"``, that no other user can
    predict and squat; give an explicit name to let exec'd processes :func:`attach`. If a
    budget of that name exists, this joins it when its creator is alive and the limit matches
    (a gunicorn binary upgrade), or recovers it in place when its creator died (leftovers of a
    SIGKILLed master). Calling it again with the same arguments
    returns the same budget.

    ``acquire_timeout`` (seconds, None = forever) bounds every slot wait that has no explicit
    timeout; ``idle_timeout`` closes pooled connections idle for longer; ``capacity`` is the
    largest limit :func:`set_limit` may grow to (default ``max(1024, limit)``); ``mode`` the
    permission bits of the shared objects (owner-only by default). ``hold_quantum`` (seconds)
    caps how long a connection in active use keeps its slot while others wait before it is
    handed on; within the cap each connection's quantum is 24 times what its set-up cost (at
    least 10 ms), so under contention the connections carry messages rather than handshakes;
    an idle connection is handed on at once whatever the quantum (0: hand on at every
    release). ``backend`` is where the
    budget lives (``backend_for``): ``"posix"`` shares it between the processes of this
    host, ``"memory"`` keeps it in this process (tests, single-process programs).
    ``lend`` (default True) lets a producer pool that finds no free slot publish through
    another process's idle connection to the same broker (Redis and py-amqp transports; see
    docs/concepts.md, "Lending") instead of waiting for a slot; False: always wait.

    Raises:
        ConfigurationError: an invalid argument (nothing is created), or a budget of that name
            exists with another limit, or this process is configured differently.
        IncompatibleSegmentError: a segment of that name is not an mppools segment of this
            layout version.
        PermissionDeniedError: the shared objects belong to another user.
        UnsupportedPlatformError: not Linux (for the POSIX backend).
    """
    global _limiter, _settings, _creator_pid
    check_limit(limit)
    chosen = backend_for(backend)
    if name is not None:
        chosen.validate_name(name)
    acquire_timeout = check_timeout("acquire_timeout", acquire_timeout)
    idle_timeout = check_timeout("idle_timeout", idle_timeout)
    if capacity is not None:
        check_limit(capacity, "capacity")
        if capacity < limit:
            raise ConfigurationError(f"capacity {capacity} is below limit {limit}")
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o777:
        raise ConfigurationError(f"mode must be permission bits like 0o600, not {mode!r}")
    if mode & 0o600 != 0o600:
        raise ConfigurationError(f"mode {mode:#o} must let the owner read and write")
    quantum = check_timeout("hold_quantum", hold_quantum)
    if quantum is None or quantum > MAX_HOLD_QUANTUM:
        raise ConfigurationError(
            f"hold_quantum must be a number of seconds from 0 to {MAX_HOLD_QUANTUM:g}, "
            f"not {hold_quantum!r}"
        )
    if not isinstance(lend, bool):
        raise ConfigurationError(f"lend must be True or False, not {lend!r}")
    _check_platform(chosen)
    wanted = _Settings(name, limit, acquire_timeout, idle_timeout, capacity, mode, quantum,
                       backend, lend=lend)
    with _lock:
        if _settings is not None and _limiter is not None:
            if _settings == wanted or (name is None and _settings.generated and
                                       _settings == replace(wanted, name=_settings.name,
                                                            generated=True)):
                return _limiter
            raise ConfigurationError(
                f"this process already uses budget {_settings.name!r} (limit "
                f"{_settings.limit}); call mppools.close() before configuring {name!r} "
                f"with limit {limit}"
            )
        options: dict[str, Any] = {
            "limit": limit, "capacity": capacity, "acquire_timeout": acquire_timeout,
            "idle_timeout": idle_timeout, "mode": mode, "hold_quantum": quantum}
        if name is None:
            limiter = _create_unnamed(chosen, options)
            wanted = replace(wanted, name=limiter.name, generated=True)
        else:
            limiter = chosen.open(name, create=True, **options)
        _warn_if_pools_hold_connections()
        _limiter, _settings = limiter, wanted
        if limiter.is_creator():
            _creator_pid = os.getpid()
        return limiter


def _create_unnamed(backend: Backend, options: dict[str, Any]) -> Limiter:
    """A new budget under a generated name nobody could have squatted in advance."""
    for _ in range(16):
        try:
            return backend.open(backend.default_name(), create=True, exclusive=True,
                                **options)
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue
    raise ConfigurationError("could not find a free budget name in 16 tries")  # pragma: no cover


def attach(name: str, *, backend: str = DEFAULT_BACKEND) -> Limiter:
    """Join the existing budget ``name`` of ``backend`` (for processes that were exec'd,
    not forked).

    Raises:
        BudgetNotFoundError: no budget of that name exists (on this host, for POSIX).
        IncompatibleSegmentError, PermissionDeniedError: as for :func:`configure`.
        ConfigurationError: this process already uses another budget; an unknown backend.
    """
    global _limiter, _settings
    chosen = backend_for(backend)
    chosen.validate_name(name)
    _check_platform(chosen)
    with _lock:
        if _limiter is not None:
            if _limiter.name == name and (_settings is None or _settings.backend == backend):
                return _limiter
            raise ConfigurationError(
                f"this process already uses budget {_limiter.name!r}; call mppools.close() "
                f"before attaching to {name!r}"
            )
        limiter = chosen.open(name, create=False)
        _limiter = limiter
        _settings = _Settings(name, limiter.limit, limiter.acquire_timeout,
                              limiter.idle_timeout, None, 0o600, limiter.hold_quantum,
                              backend)
        return limiter


def stats() -> BudgetStats:
    """A frozen snapshot of this process's budget: name, limit, in use, free, waiting, holders.

    Raises:
        NotConfiguredError: this process has no budget (call configure() or attach()).
    """
    limiter = _limiter
    if limiter is None:
        raise NotConfiguredError("mppools is not configured in this process")
    return limiter.stats()


def close(*, unlink: bool | None = None) -> None:
    """Close every pool, give back this process's slots and detach from the budget.

    ``unlink=None`` removes the shared objects if this process created the budget and no
    other live process holds or waits for its slots; ``True`` insists (raising
    BudgetInUseError while others use it), ``False`` never removes them.
    After ``close()`` mppools behaves like kombu.pools again until the next configure().

    Raises:
        BudgetInUseError: ``unlink=True`` while other live processes hold or wait for slots
            (this process is detached all the same).
    """
    global _limiter, _settings, _creator_pid
    from mppools import pools

    pools.reset()
    with _lock:
        limiter, _limiter, _settings = _limiter, None, None
        creator, _creator_pid = _creator_pid, None
    if limiter is None:
        return
    from mppools._keeper import keeper

    keeper().stop()
    from mppools._lending import lender

    lender().stop()
    try:
        if unlink is True:
            limiter.unlink(force=False)
        elif unlink is None and creator == os.getpid():
            with contextlib.suppress(BudgetInUseError):
                limiter.unlink(force=False)
    finally:
        limiter.close()


def _warn_if_pools_hold_connections() -> None:
    from mppools import pools

    open_count = sum(len(getattr(p, "_dirty", ())) for p in pools._all_pools())
    if open_count:
        logger.warning(
            "mppools: configure() called while %d pooled connection(s) are checked out; "
            "connections opened before configure() are not counted", open_count,
        )


def _after_fork_in_child() -> None:
    # a child never owns the segment: only the creator removes it at exit
    global _creator_pid, _lock
    _creator_pid = None
    _lock = _green.Lock()


def _at_exit() -> None:
    if _limiter is not None and _creator_pid == os.getpid():
        with contextlib.suppress(Exception):
            close(unlink=None)


_fork.on_fork_in_child(_after_fork_in_child)
atexit.register(_at_exit)

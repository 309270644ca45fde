"""mppools: one host-wide budget of broker connections for every forked worker.

Call :func:`configure` in the master before forking, then use :data:`connections` and
:data:`producers` exactly as ``kombu.pools``' (see :mod:`mppools.pools`).
"""

from __future__ import annotations

import sys

if not sys.platform.startswith("linux"):  # pragma: no cover - tested on Linux only
    import warnings

    warnings.warn(
        f"mppools supports Linux only (this is {sys.platform!r}): configure() will refuse "
        "to start a shared budget; unconfigured pools behave like kombu.pools",
        RuntimeWarning,
        stacklevel=2,
    )

from mppools import pools
from mppools._config import attach, close, configure, stats
from mppools._errors import (
    BudgetInUseError,
    BudgetNotFoundError,
    ConfigurationError,
    CoordinationError,
    DamagedSegmentError,
    IncompatibleSegmentError,
    LeaseLostError,
    LimitExceeded,
    LoanLostError,
    MppoolsError,
    NotConfiguredError,
    PermissionDeniedError,
    UnsupportedPlatformError,
)
from mppools._limiter._base import AuditReport, BudgetStats, HolderStats, WaiterStats
from mppools._limiter.posix import list_budgets, unlink
from mppools.pools import (
    PoolGroup,
    ProducerPool,
    connections,
    get_limit,
    producers,
    register_group,
    reset,
    set_limit,
    use_global_limit,
)

__version__ = "0.1.0"

#: like kombu's ``Resource.close_after_fork``: mppools' pools are always emptied in a forked
#: child (by its own ``os.register_at_fork`` handler, for every kind of fork)
close_after_fork = True


def audit() -> AuditReport:
    """Reclaim the slots of dead processes in this process's budget now (what an audit does
    by itself whenever someone waits).

    Raises:
        NotConfiguredError: this process has no budget.
    """
    from mppools._config import current

    limiter = current()
    if limiter is None:
        raise NotConfiguredError("mppools is not configured in this process")
    return limiter.audit()


__all__ = [
    "AuditReport",
    "BudgetInUseError",
    "BudgetNotFoundError",
    "BudgetStats",
    "ConfigurationError",
    "CoordinationError",
    "DamagedSegmentError",
    "HolderStats",
    "IncompatibleSegmentError",
    "LeaseLostError",
    "LimitExceeded",
    "LoanLostError",
    "MppoolsError",
    "NotConfiguredError",
    "PermissionDeniedError",
    "PoolGroup",
    "ProducerPool",
    "UnsupportedPlatformError",
    "WaiterStats",
    "__version__",
    "attach",
    "audit",
    "close",
    "close_after_fork",
    "configure",
    "connections",
    "get_limit",
    "list_budgets",
    "pools",
    "producers",
    "register_group",
    "reset",
    "set_limit",
    "stats",
    "unlink",
    "use_global_limit",
]

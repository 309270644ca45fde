"""prometheus_client: every budget this process can see, as metrics of your own registry.

Setup, where the application builds the registry its ``/metrics`` endpoint serves::

    from prometheus_client import CollectorRegistry, make_wsgi_app
    from mppools.integrations.prometheus import MppoolsCollector

    registry = CollectorRegistry()
    registry.register(MppoolsCollector())
    metrics_app = make_wsgi_app(registry)

or ``mppools.integrations.prometheus.register()`` for prometheus_client's default registry.
Needs prometheus_client (``pip install 'mppools[prometheus]'``); the rest of mppools never
imports it.

What a scrape reports: the budget this process uses (:func:`mppools.stats`, whatever its
backend: for a redis budget with its cross-host figures), and every budget of this host that
``mppools status`` lists (anyone's; a budget that cannot be read is reported as
``mppools_budget_up 0`` and never fails the scrape), or only those named in ``names``. The
values are read from the budgets' shared state at each scrape, never kept in this process:
any one process of the host reports the same numbers. Metrics (all with a ``budget``
label):

* gauges ``mppools_slots_limit``, ``mppools_slots_in_use``, ``mppools_slots_idle``,
  ``mppools_slots_busy``, ``mppools_slots_free``, ``mppools_waiters``, ``mppools_debt``,
  ``mppools_holders``, ``mppools_holders_dead``, ``mppools_budget_up``,
  ``mppools_budget_damaged``, ``mppools_budget_info{backend, host}``,
  ``mppools_budget_generation``, the settings ``mppools_acquire_timeout_seconds``,
  ``mppools_idle_timeout_seconds`` (+Inf: none), ``mppools_hold_quantum_seconds``, and
  ``mppools_budget_created_timestamp_seconds``;
* counters ``mppools_acquired_total``, ``mppools_reclaimed_total``,
  ``mppools_acquire_timeouts_total`` (and ``mppools_yields_total`` where the backend counts
  yields);
* across hosts (redis backend): ``mppools_coordination_up{server}``,
  ``mppools_coordination_round_trip_seconds{server}``, ``mppools_leases_in_use``, and per
  host ``mppools_host_leases_held{host}``, ``mppools_host_lease_expiry_seconds{host}``,
  ``mppools_host_waiting{host}`` and, where the hosts report them,
  ``mppools_host_slots_in_use{host}``, ``mppools_host_slots_idle{host}``,
  ``mppools_host_waiters{host}``, ``mppools_host_report_age_seconds{host}``;
* with ``per_holder=True`` only (one series per process: unbounded over time):
  ``mppools_holder_slots{host, pid, state}`` and ``mppools_holder_held_seconds{host, pid}``.

prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``): register the collector
on the registry that the ``/metrics`` request builds next to ``MultiProcessCollector``, in
the one process that serves that request. Never copy its values into Gauge or Counter
objects in each worker: multiprocess mode would add them up over the workers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence

try:
    from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
except ImportError as exc:  # the rest of mppools works without it
    raise ImportError(
        "mppools.integrations.prometheus needs prometheus_client: pip install "
        f"'mppools[prometheus]' ({exc})"
    ) from exc

from mppools import _config
from mppools._errors import BudgetNotFoundError, ConfigurationError, MppoolsError
from mppools._limiter._base import BudgetStats, Limiter
from mppools._limiter.posix import PosixLimiter, exists
from mppools._limiter.posix._names import validate_name
from mppools.cli._common import inspect_budget, list_budget_names
from mppools.cli._prometheus import Family, budget_families, metric_names

__all__ = ["MppoolsCollector", "generate_text", "register"]

logger = logging.getLogger("mppools.prometheus")


def _to_metric(family: Family) -> Metric:
    metric: GaugeMetricFamily | CounterMetricFamily
    if family.kind == "counter":
        metric = CounterMetricFamily(family.name, family.help, labels=family.labels)
    else:
        metric = GaugeMetricFamily(family.name, family.help, labels=family.labels)
    for values, value in family.samples:
        metric.add_metric(list(values), value)
    return metric


class _Families:
    """A collector of fixed families (what ``mppools status --prometheus`` renders)."""

    def __init__(self, families: Sequence[Family]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        for family in self._families:
            yield _to_metric(family)


def generate_text(families: Iterable[Family]) -> str:
    """The text exposition (0.0.4) of ``families``, written by prometheus_client's
    ``generate_latest`` on a private registry."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families)))
    return generate_latest(registry).decode("utf-8")


class MppoolsCollector:
    """A prometheus_client collector of the budgets this process can see.

    ``names``: report only these budgets (default: the budget of this process and every
    budget of this host, anyone's). A named budget that does not exist is reported as
    ``mppools_budget_up 0``. ``per_holder``: also one series per holder process (pid and
    host labels), off by default to keep the number of series bounded.

    Each :meth:`collect` reads the shared state afresh and never raises for a budget: one
    that cannot be read, or whose tables are damaged, is flagged by ``mppools_budget_up`` /
    ``mppools_budget_damaged`` and the others are reported as usual. It takes no slot and
    holds no lock between scrapes; it is safe to call from several threads at once.
    :meth:`describe` lists every metric name without reading anything, so that registering
    never touches a budget and a second registration of the same names is refused by the
    registry.

    Raises:
        ConfigurationError: ``names`` is not a list of valid budget names (a bare str is
            refused: iterating it would name one-letter budgets), or ``per_holder`` is not
            a bool. Nothing is registered or read.
    """

    def __init__(self, names: Iterable[str] | None = None, *, per_holder: bool = False) -> None:
        if isinstance(names, str | bytes):  # iterating it would ask for one-letter budgets
            raise ConfigurationError(
                f"names must be a list of budget names, not a {type(names).__name__} "
                f"({names!r}): use names=[{names!r}]")
        if not isinstance(per_holder, bool):
            raise ConfigurationError(f"per_holder must be True or False, not {per_holder!r}")
        if names is None:
            self.names: tuple[str, ...] | None = None
        else:
            try:
                given = tuple(names)
            except TypeError:
                raise ConfigurationError(
                    f"names must be a list of budget names or None, not "
                    f"{type(names).__name__}") from None
            self.names = tuple(validate_name(name) for name in given)
        self.per_holder = per_holder

    def describe(self) -> list[Metric]:
        """Every metric family :meth:`collect` may report, without samples."""
        return [_to_metric(Family(name, kind, text, ()))
                for name, kind, text in metric_names(per_holder=self.per_holder)]

    def collect(self) -> list[Metric]:
        """The metric families of every budget, read now."""
        snapshots, damage, broken = self.snapshots()
        return [_to_metric(f) for f in budget_families(
            snapshots, damage=damage, broken=broken, per_holder=self.per_holder)]

    def snapshots(self) -> tuple[list[BudgetStats], dict[str, list[str]], list[str]]:
        """``(snapshots, damage by name, names that could not be read)`` of the budgets this
        collector reports, read now (what :meth:`collect` renders)."""
        current = _config.current()
        explicit = self.names is not None
        if self.names is not None:
            wanted = list(dict.fromkeys(self.names))
        else:
            try:
                wanted = list_budget_names()
            except OSError as exc:  # /dev/shm unreadable: report this process's budget
                logger.warning("mppools: cannot list the budgets of this host: %s", exc)
                wanted = []
            if current is not None and current.name not in wanted:
                wanted.append(current.name)
        snapshots: list[BudgetStats] = []
        damage: dict[str, list[str]] = {}
        broken: list[str] = []
        for name in wanted:
            try:
                if current is not None and name == current.name:
                    stats, damaged = _own(current)
                else:
                    stats, damaged = inspect_budget(name)
            except BudgetNotFoundError:
                if explicit or _exists(name):  # else removed while we listed it
                    broken.append(name)
            except Exception as exc:  # never a failed scrape for one budget
                logger.debug("mppools: budget %r cannot be read: %s: %s", name,
                             type(exc).__name__, exc)
                broken.append(name)
            else:
                snapshots.append(stats)
                damage[stats.name] = damaged
        return snapshots, damage, broken


def _own(limiter: Limiter) -> tuple[BudgetStats, list[str]]:
    """This process's budget, through its own limiter (a second handle of a POSIX segment
    in the same process would drop the process's lock on it when closed)."""
    stats = limiter.stats()
    damaged = limiter.damage() if isinstance(limiter, PosixLimiter) else []
    return stats, damaged


def _exists(name: str) -> bool:
    try:
        return exists(name)
    except (MppoolsError, OSError):
        return False


def register(
    registry: CollectorRegistry | None = None,
    *,
    names: Iterable[str] | None = None,
    per_holder: bool = False,
) -> MppoolsCollector:
    """Register a :class:`MppoolsCollector` (``names``, ``per_holder`` as there) on
    ``registry`` (default: prometheus_client's default registry) and return it.

    Raises:
        ConfigurationError: ``registry`` is not a registry (it has no ``register``), or
            ``names`` / ``per_holder`` as in :class:`MppoolsCollector`.
        ValueError: the registry already has a collector of these metric names
            (prometheus_client's ``DuplicateTimeseries``).
    """
    if registry is not None and not callable(getattr(registry, "register", None)):
        raise ConfigurationError(
            f"registry must be a prometheus_client CollectorRegistry or None, not "
            f"{type(registry).__name__}")
    collector = MppoolsCollector(names, per_holder=per_holder)
    (REGISTRY if registry is None else registry).register(collector)
    return collector

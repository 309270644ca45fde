"""The metrics of budget snapshots, and their Prometheus text exposition (format 0.0.4).

One description of the metrics, :func:`budget_families`, serves both expositions: the
prometheus_client collector (:mod:`mppools.integrations.prometheus`) turns its families into
prometheus_client metric families, and :func:`render_prometheus` renders them through
prometheus_client's ``generate_latest`` when it is installed, else by the hand-written
renderer here, which writes the very same bytes. Nothing here imports prometheus_client.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from mppools._limiter._base import BudgetStats

__all__ = ["Family", "budget_families", "metric_names", "render_prometheus", "render_text"]

_Getter = Callable[[BudgetStats], float]
_INF = math.inf


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family: its full exposed ``name`` (a counter's ends in ``_total``), its
    ``kind``, ``help`` text, label names, and samples ``(label values, value)``."""

    name: str
    kind: Literal["gauge", "counter"]
    help: str
    labels: tuple[str, ...]
    samples: list[tuple[tuple[str, ...], float]] = field(default_factory=list)


def _seconds(value: float | None) -> float:
    """A timeout setting in seconds; None (no bound) is +Inf."""
    return _INF if value is None else float(value)


#: budget-level metrics: (name, kind, help, value getter), in output order; label: budget
_BUDGET: tuple[tuple[str, Literal["gauge", "counter"], str, _Getter], ...] = (
    ("mppools_slots_limit", "gauge", "Slots the budget allows at once (its limit).",
     lambda s: s.limit),
    ("mppools_slots_in_use", "gauge", "Slots held now (open broker connections).",
     lambda s: s.in_use),
    ("mppools_slots_idle", "gauge",
     "Slots held now by connections idle in a local pool.",
     lambda s: sum(h.idle for h in s.holders)),
    ("mppools_slots_busy", "gauge", "Slots held now by connections in use.",
     lambda s: sum(h.busy for h in s.holders)),
    ("mppools_slots_free", "gauge", "Slots free now.", lambda s: s.free),
    ("mppools_waiters", "gauge", "Processes waiting for a slot now.", lambda s: s.waiting),
    ("mppools_debt", "gauge", "Slots in use above the limit after a forced shrink.",
     lambda s: s.debt),
    ("mppools_holders", "gauge", "Processes holding slots now.", lambda s: len(s.holders)),
    ("mppools_holders_dead", "gauge",
     "Dead processes whose slots are not reclaimed yet (the next audit frees them).",
     lambda s: sum(1 for h in s.holders if not h.alive)),
    ("mppools_acquired_total", "counter", "Slots handed out since the budget was created.",
     lambda s: s.acquired_total),
    ("mppools_reclaimed_total", "counter", "Slots reclaimed from dead processes.",
     lambda s: s.reclaimed_total),
    ("mppools_acquire_timeouts_total", "counter", "Slot waits that ended in a timeout.",
     lambda s: s.timeouts_total),
    ("mppools_acquire_timeout_seconds", "gauge",
     "The wait bound of an acquire without an explicit timeout (+Inf: none).",
     lambda s: _seconds(s.acquire_timeout)),
    ("mppools_idle_timeout_seconds", "gauge",
     "Idle pooled connections are closed after this long (+Inf: never).",
     lambda s: _seconds(s.idle_timeout)),
    ("mppools_hold_quantum_seconds", "gauge",
     "The most a connection in active use keeps its slot while others wait.",
     lambda s: s.hold_quantum),
    ("mppools_budget_created_timestamp_seconds", "gauge",
     "When the budget was created (Unix time; its counters start from zero then).",
     lambda s: s.created_at),
)

_UP = ("mppools_budget_up", "Whether the budget could be read (1) or not (0: unreadable, "
       "foreign, incompatible, or owned by another user; its other metrics are then absent).")
_DAMAGED = ("mppools_budget_damaged", "Whether the tables of the budget are damaged (1): unknown "
            "entries count as used until `mppools reclaim` or the audit of a waiter repairs them.")
_INFO = ("mppools_budget_info", "The backend of the budget and the host its snapshot was taken on.")
_YIELDS = ("mppools_yields_total", "Idle connections handed on at the request of a waiter.")
_GENERATION = ("mppools_budget_generation",
               "The generation of the budget (it grows when the budget is recovered or resized).")
#: cross-host (redis backend) metrics, from ``BudgetStats.extra``
_COORDINATION_UP = ("mppools_coordination_up",
                    "Whether the coordination server answered the last look (1) or not (0).")
_LEASES_IN_USE = ("mppools_leases_in_use", "Slots leased to hosts, across every host.")
_HOST_HELD = ("mppools_host_leases_held", "Slots leased to one host.")
_HOST_EXPIRY = ("mppools_host_lease_expiry_seconds",
                "Seconds until the leases of one host expire unless renewed.")
_HOST_WAITING = ("mppools_host_waiting", "Whether one host waits for a lease now (1) or not.")
#: what each host last reported of itself (``extra["host_details"]``, where the backend has it)
_HOST_IN_USE = ("mppools_host_slots_in_use", "Slots in use on one host, as it last reported.")
_HOST_IDLE = ("mppools_host_slots_idle",
              "Slots held by idle connections on one host, as it last reported.")
_HOST_WAITERS = ("mppools_host_waiters",
                 "Processes waiting for a slot on one host, as it last reported.")
_HOST_REPORT_AGE = ("mppools_host_report_age_seconds",
                    "How long ago one host last reported its figures.")
_ROUND_TRIP = ("mppools_coordination_round_trip_seconds",
               "The round trip to the coordination server at the last look.")
_PER_HOST_DETAILS = ((_HOST_IN_USE, "in_use"), (_HOST_IDLE, "idle"),
                     (_HOST_WAITERS, "waiting"), (_HOST_REPORT_AGE, "reported_ago"))
#: per-holder metrics (only with ``per_holder``)
_HOLDER_SLOTS = ("mppools_holder_slots",
                 "Slots held by one process, by state (idle in a local pool, or busy).")
_HOLDER_HELD = ("mppools_holder_held_seconds", "How long one process has held slots.")


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def budget_families(
    snapshots: Iterable[BudgetStats],
    *,
    damage: Mapping[str, Sequence[str]] | None = None,
    broken: Iterable[str] = (),
    per_holder: bool = True,
    now: float | None = None,
) -> list[Family]:
    """The metric families of budget snapshots, in output order.

    Every sample has a ``budget`` label. ``mppools_budget_up`` is 1 for each snapshot and 0
    for each name in ``broken`` (a budget that could not be read: only that gauge is
    reported for it). ``mppools_budget_damaged`` is reported only when ``damage`` (what is
    damaged in each budget's tables, by name, as ``mppools status`` lists it) is given.
    Cross-host figures (``extra["coordination"]``, ``["hosts"]``, ...) of a redis-backend
    snapshot add ``mppools_coordination_up{server}``, ``mppools_leases_in_use``,
    ``mppools_coordination_round_trip_seconds{server}`` and, per host,
    ``mppools_host_leases_held``, ``mppools_host_lease_expiry_seconds``,
    ``mppools_host_waiting``, and where the hosts report them (``extra["host_details"]``)
    ``mppools_host_slots_in_use``, ``mppools_host_slots_idle``, ``mppools_host_waiters`` and
    ``mppools_host_report_age_seconds``. With ``per_holder``,
    ``mppools_holder_slots{host, pid, state}`` and ``mppools_holder_held_seconds{host, pid}``
    have one series per holder process
    (their number grows with the processes: keep it off where cardinality matters).
    A family with no samples is left out, except the budget-level families of the snapshots.
    """
    stats = list(snapshots)
    broken_names = list(broken)
    now = time.time() if now is None else now
    families: list[Family] = []
    one = ("budget",)

    def add(name: str, kind: Literal["gauge", "counter"], text: str, labels: tuple[str, ...],
            samples: Sequence[tuple[tuple[str, ...], float]], *, always: bool = False
            ) -> None:
        if samples or always:
            families.append(Family(name, kind, text, labels, list(samples)))

    add(_UP[0], "gauge", _UP[1], one,
        [((s.name,), 1.0) for s in stats] + [((n,), 0.0) for n in broken_names],
        always=bool(stats))
    if damage is not None:
        add(_DAMAGED[0], "gauge", _DAMAGED[1], one,
            [((s.name,), 1.0 if damage.get(s.name) else 0.0) for s in stats])
    add(_INFO[0], "gauge", _INFO[1], ("backend", "budget", "host"),
        [((s.backend, s.name, s.host), 1.0) for s in stats])
    for name, kind, text, getter in _BUDGET:
        add(name, kind, text, one, [((s.name,), float(getter(s))) for s in stats],
            always=bool(stats))
    add(_YIELDS[0], "counter", _YIELDS[1], one,
        [((s.name,), float(v)) for s in stats
         if (v := _int_or_none(s.extra.get("yields_total"))) is not None])
    add(_GENERATION[0], "gauge", _GENERATION[1], one,
        [((s.name,), float(v)) for s in stats
         if (v := _int_or_none(s.extra.get("generation"))) is not None])
    _cross_host(stats, add)
    if per_holder:
        add(_HOLDER_SLOTS[0], "gauge", _HOLDER_SLOTS[1], ("budget", "host", "pid", "state"),
            [((s.name, h.host, str(h.pid), state), float(count))
             for s in stats for h in s.holders
             for state, count in (("idle", h.idle), ("busy", h.busy))],
            always=bool(stats))
        add(_HOLDER_HELD[0], "gauge", _HOLDER_HELD[1], ("budget", "host", "pid"),
            [((s.name, h.host, str(h.pid)), now - h.since) for s in stats for h in s.holders])
    return families


def _cross_host(stats: list[BudgetStats], add: Callable[..., None]) -> None:
    coordination: list[tuple[tuple[str, ...], float]] = []
    leases: list[tuple[tuple[str, ...], float]] = []
    held: list[tuple[tuple[str, ...], float]] = []
    expiry: list[tuple[tuple[str, ...], float]] = []
    waiting: list[tuple[tuple[str, ...], float]] = []
    round_trip: list[tuple[tuple[str, ...], float]] = []
    details: dict[str, list[tuple[tuple[str, ...], float]]] = {
        key: [] for _, key in _PER_HOST_DETAILS}
    for s in stats:
        state = s.extra.get("coordination")
        if state is None:
            continue
        server = str(s.extra.get("server", ""))
        coordination.append(((s.name, server), 1.0 if state == "ok" else 0.0))
        if state == "ok" and (rtt := _number(s.extra.get("rtt"))) is not None:
            round_trip.append(((s.name, server), rtt))
        reported = s.extra.get("host_details") if state == "ok" else None
        for detail in reported if isinstance(reported, tuple | list) else ():
            if not isinstance(detail, dict) or "host" not in detail:
                continue
            for _, key in _PER_HOST_DETAILS:
                if (value := _number(detail.get(key))) is not None:
                    details[key].append(((s.name, str(detail["host"])), value))
        if (in_use := _number(s.extra.get("leases_in_use"))) is not None:
            leases.append(((s.name,), in_use))
        hosts = s.extra.get("hosts")
        waiting_hosts = s.extra.get("waiting_hosts")
        waiters = ({str(h) for h in waiting_hosts}
                   if isinstance(waiting_hosts, tuple | list) else set())
        seen: list[str] = []
        for entry in hosts if isinstance(hosts, tuple | list) else ():
            if not isinstance(entry, tuple | list) or len(entry) != 3:
                continue
            host, count, expires_in = entry
            count_value, expiry_value = _number(count), _number(expires_in)
            if count_value is None or expiry_value is None:
                continue
            seen.append(str(host))
            held.append(((s.name, str(host)), count_value))
            expiry.append(((s.name, str(host)), expiry_value))
        if state == "ok":
            for host in [*seen, *sorted(waiters - set(seen))]:
                waiting.append(((s.name, host), 1.0 if host in waiters else 0.0))
    add(_COORDINATION_UP[0], "gauge", _COORDINATION_UP[1], ("budget", "server"), coordination)
    add(_LEASES_IN_USE[0], "gauge", _LEASES_IN_USE[1], ("budget",), leases)
    add(_HOST_HELD[0], "gauge", _HOST_HELD[1], ("budget", "host"), held)
    add(_HOST_EXPIRY[0], "gauge", _HOST_EXPIRY[1], ("budget", "host"), expiry)
    add(_HOST_WAITING[0], "gauge", _HOST_WAITING[1], ("budget", "host"), waiting)
    for (name, text), key in _PER_HOST_DETAILS:
        add(name, "gauge", text, ("budget", "host"), details[key])
    add(_ROUND_TRIP[0], "gauge", _ROUND_TRIP[1], ("budget", "server"), round_trip)


def metric_names(*, per_holder: bool = True) -> list[tuple[str, Literal["gauge", "counter"],
                                                           str]]:
    """Every family :func:`budget_families` may report: ``(name, kind, help)``."""
    names: list[tuple[str, Literal["gauge", "counter"], str]] = [
        (_UP[0], "gauge", _UP[1]), (_DAMAGED[0], "gauge", _DAMAGED[1]),
        (_INFO[0], "gauge", _INFO[1]),
        *((n, k, t) for n, k, t, _ in _BUDGET),
        (_YIELDS[0], "counter", _YIELDS[1]), (_GENERATION[0], "gauge", _GENERATION[1]),
        *((n, "gauge", t) for n, t in (_COORDINATION_UP, _LEASES_IN_USE, _HOST_HELD,
                                       _HOST_EXPIRY, _HOST_WAITING, _HOST_IN_USE,
                                       _HOST_IDLE, _HOST_WAITERS, _HOST_REPORT_AGE,
                                       _ROUND_TRIP)),
    ]
    if per_holder:
        names += [(n, "gauge", t) for n, t in (_HOLDER_SLOTS, _HOLDER_HELD)]
    return names


# the hand-written text format: byte for byte what prometheus_client's generate_latest writes
def _format_value(value: float) -> str:
    """A sample value as prometheus_client writes it (Go's float formatting)."""
    d = float(value)
    if d == _INF:
        return "+Inf"
    if d == -_INF:
        return "-Inf"
    if math.isnan(d):
        return "NaN"
    s = repr(d)
    dot = s.find(".")
    if d > 0 and dot > 6:  # Go switches to exponents sooner than Python
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return s


def _escape(value: str) -> str:
    """Escape a label value as the text format requires."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render_text(families: Iterable[Family]) -> str:
    """The text exposition of ``families``, without prometheus_client (the same bytes as
    its ``generate_latest``: labels sorted by name, values as Go formats floats)."""
    lines: list[str] = []
    for family in families:
        text = family.help.replace("\\", "\\\\").replace("\n", "\\n")
        lines.append(f"# HELP {family.name} {text}\n")
        lines.append(f"# TYPE {family.name} {family.kind}\n")
        for values, value in family.samples:
            pairs = sorted(zip(family.labels, values, strict=True))
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)
            lines.append(f"{family.name}{{{labels}}} {_format_value(value)}\n" if labels
                         else f"{family.name} {_format_value(value)}\n")
    return "".join(lines)


def render_prometheus(
    stats_list: Iterable[BudgetStats],
    *,
    damage: Mapping[str, Sequence[str]] | None = None,
    broken: Iterable[str] = (),
    per_holder: bool = True,
) -> str:
    """Render budget snapshots in the Prometheus text exposition format (0.0.4).

    The metrics are those of :class:`mppools.integrations.prometheus.MppoolsCollector`
    (``damage``, ``broken`` and ``per_holder`` as there; per-holder series are on by
    default here). Every metric carries a ``budget`` label; each metric's ``# HELP`` and
    ``# TYPE`` lines appear once, followed by one sample per budget. When prometheus_client
    is installed the text is written by its ``generate_latest``; without it, by an
    equivalent renderer that writes the same bytes.

    Example::

        >>> print(render_prometheus([mppools.stats()]))  # doctest: +SKIP
        # HELP mppools_budget_up Whether the budget could be read (1) or not (0: ...
        # TYPE mppools_budget_up gauge
        mppools_budget_up{budget="web"} 1.0
        ...

    Returns:
        The exposition text, ending with a newline (empty for no budgets).
    """
    families = budget_families(stats_list, damage=damage, broken=broken,
                               per_holder=per_holder)
    if not families:
        return ""
    try:
        from mppools.integrations.prometheus import generate_text
    except ImportError:  # no prometheus_client: the hand-written renderer
        return render_text(families)
    return generate_text(families)

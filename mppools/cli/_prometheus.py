"""Prometheus text exposition (format 0.0.4) of budget snapshots."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from mppools._limiter._base import BudgetStats

__all__ = ["render_prometheus"]

_Getter = Callable[[BudgetStats], int]

#: (metric name, type, help, value getter), in output order
_BUDGET_METRICS: tuple[tuple[str, str, str, _Getter], ...] = (
    ("mppools_slots_limit", "gauge", "Slots the budget allows at once (its limit).",
     lambda s: s.limit),
    ("mppools_slots_in_use", "gauge", "Slots held now (open broker connections).",
     lambda s: s.in_use),
    ("mppools_slots_free", "gauge", "Slots free now.", lambda s: s.free),
    ("mppools_waiters", "gauge", "Processes waiting for a slot now.", lambda s: s.waiting),
    ("mppools_debt", "gauge", "Slots in use above the limit after a forced shrink.",
     lambda s: s.debt),
    ("mppools_acquired_total", "counter", "Slots handed out since the budget was created.",
     lambda s: s.acquired_total),
    ("mppools_reclaimed_total", "counter", "Slots reclaimed from dead processes.",
     lambda s: s.reclaimed_total),
    ("mppools_acquire_timeouts_total", "counter", "Slot waits that ended in a timeout.",
     lambda s: s.timeouts_total),
)

_HOLDER_METRIC = "mppools_holder_slots"
_HOLDER_HELP = "Slots held by one process, by state (idle in a local pool, or busy)."


def _escape(value: str) -> str:
    """Escape a label value as the text format requires."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: object) -> str:
    inner = ",".join(f'{key}="{_escape(str(value))}"' for key, value in labels.items())
    return "{" + inner + "}"


def render_prometheus(stats_list: Iterable[BudgetStats]) -> str:
    """Render budget snapshots in the Prometheus text exposition format.

    Every metric carries a ``budget`` label; each metric's ``# HELP`` and ``# TYPE`` lines
    appear once, followed by one sample per budget. Per holder, ``mppools_holder_slots`` has
    one sample for ``state="idle"`` and one for ``state="busy"``.

    Example::

        >>> print(render_prometheus([mppools.stats()]))  # doctest: +SKIP
        # HELP mppools_slots_limit Slots the budget allows at once (its limit).
        # TYPE mppools_slots_limit gauge
        mppools_slots_limit{budget="web"} 3
        ...

    Returns:
        The exposition text, ending with a newline (empty for no budgets).
    """
    snapshots = list(stats_list)
    if not snapshots:
        return ""
    lines: list[str] = []
    for metric, kind, text, getter in _BUDGET_METRICS:
        lines.append(f"# HELP {metric} {text}")
        lines.append(f"# TYPE {metric} {kind}")
        lines.extend(f"{metric}{_labels(budget=s.name)} {getter(s)}" for s in snapshots)
    lines.append(f"# HELP {_HOLDER_METRIC} {_HOLDER_HELP}")
    lines.append(f"# TYPE {_HOLDER_METRIC} gauge")
    for s in snapshots:
        for holder in s.holders:
            for state, count in (("idle", holder.idle), ("busy", holder.busy)):
                labels = _labels(budget=s.name, pid=holder.pid, state=state)
                lines.append(f"{_HOLDER_METRIC}{labels} {count}")
    return "\n".join(lines) + "\n"

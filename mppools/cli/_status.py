"""``mppools status``, ``mppools reclaim`` and ``mppools unlink``."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from typing import Any, TextIO

import psutil

import mppools
from mppools._errors import MppoolsError
from mppools._limiter._base import AuditReport, BudgetStats, HolderStats
from mppools.cli._common import (
    EXIT_OK,
    format_age,
    list_budget_names,
    open_budget,
    read_stats,
)
from mppools.cli._prometheus import render_prometheus

__all__ = [
    "command_line",
    "format_budget",
    "format_summary",
    "holder_state",
    "run_reclaim",
    "run_status",
    "run_unlink",
    "stats_to_dict",
]

_CLEAR = "\x1b[H\x1b[2J"


# formatting -------------------------------------------------------------------------------
def command_line(pid: int, width: int = 60) -> str:
    """The command line of ``pid`` (psutil), truncated to ``width`` characters."""
    try:
        proc = psutil.Process(pid)
        parts = proc.cmdline() or [f"[{proc.name()}]"]
    except psutil.ZombieProcess:
        return "<zombie>"
    except psutil.NoSuchProcess:
        return "<gone>"
    except psutil.Error:
        return "?"
    text = " ".join(parts)
    if len(text) > width:
        text = text[: max(width - 1, 1)] + "…"
    return text


def holder_state(holder: HolderStats) -> str:
    """``busy``, ``idle``, ``DEAD`` or ``1 busy/2 idle`` for one holder."""
    if not holder.alive:
        return "DEAD"
    if holder.busy and holder.idle:
        return f"{holder.busy} busy/{holder.idle} idle"
    if holder.idle:
        return "idle"
    return "busy"


def _timeout_text(value: float | None) -> str:
    return "none" if value is None else f"{value:g}s"


def format_budget(stats: BudgetStats, *, now: float | None = None, width: int = 100) -> str:
    """A detailed, multi-line report of one budget (one row per holder pid)."""
    now = time.time() if now is None else now
    lines = [
        f"budget {stats.name!r}  ({stats.backend}, created by pid {stats.creator_pid} "
        f"{format_age(now - stats.created_at)} ago)",
        f"  limit {stats.limit}   in use {stats.in_use}   free {stats.free}   "
        f"waiting {stats.waiting}   debt {stats.debt}",
        f"  acquired {stats.acquired_total}   reclaimed {stats.reclaimed_total}   "
        f"timeouts {stats.timeouts_total}   acquire timeout "
        f"{_timeout_text(stats.acquire_timeout)}   idle timeout "
        f"{_timeout_text(stats.idle_timeout)}",
    ]
    if not stats.holders:
        lines.append("  no holders")
    else:
        head = f"  {'PID':>8}  {'SLOTS':>5}  {'STATE':<14}  {'HELD FOR':>8}  {'SINCE':<8}  "
        lines.append(head + "COMMAND")
        cmd_width = max(width - len(head), 20)
        for h in stats.holders:
            since = time.strftime("%H:%M:%S", time.localtime(h.since))
            command = command_line(h.pid, cmd_width) if h.alive else (
                f"(dead: run `mppools reclaim {stats.name}`)"
            )
            lines.append(
                f"  {h.pid:>8}  {h.slots:>5}  {holder_state(h):<14}  "
                f"{format_age(now - h.since):>8}  {since:<8}  {command}"
            )
        dead = sum(1 for h in stats.holders if not h.alive)
        if dead:
            lines.append(f"  {dead} dead holder(s): their slots are reclaimed by the next "
                         f"audit (a waiter, or `mppools reclaim {stats.name}`)")
    if stats.waiter_pids:
        lines.append("  waiting pids: " + ", ".join(map(str, stats.waiter_pids)))
    return "\n".join(lines)


_SUMMARY_HEAD = (f"{'NAME':<24} {'LIMIT':>5} {'IN USE':>6} {'FREE':>5} {'WAITING':>7} "
                 f"{'DEBT':>4}  HOLDERS")


def format_summary(stats: BudgetStats) -> str:
    """One line for one budget (under the header of :data:`_SUMMARY_HEAD`)."""
    dead = sum(1 for h in stats.holders if not h.alive)
    holders = f"{len(stats.holders)}" + (f" ({dead} dead)" if dead else "")
    return (f"{stats.name:<24} {stats.limit:>5} {stats.in_use:>6} {stats.free:>5} "
            f"{stats.waiting:>7} {stats.debt:>4}  {holders}")


def stats_to_dict(stats: BudgetStats, *, now: float | None = None) -> dict[str, Any]:
    """A JSON-ready dict of a snapshot; each holder also gets ``state``, ``age`` and
    ``cmdline``."""
    now = time.time() if now is None else now
    data = dataclasses.asdict(stats)
    data["holders"] = [
        {
            **dataclasses.asdict(h),
            "state": holder_state(h).lower(),
            "age": round(now - h.since, 3),
            "cmdline": command_line(h.pid, 200) if h.alive else None,
        }
        for h in stats.holders
    ]
    data["waiter_pids"] = list(stats.waiter_pids)
    return data


# status -------------------------------------------------------------------------------------
def _collect(name: str | None) -> tuple[list[BudgetStats], list[tuple[str, str]]]:
    """Snapshots of ``name`` (errors raise) or of every budget (errors are collected)."""
    if name is not None:
        return [read_stats(name)], []
    snapshots: list[BudgetStats] = []
    errors: list[tuple[str, str]] = []
    for each in list_budget_names():
        try:
            snapshots.append(read_stats(each))
        except (MppoolsError, OSError) as exc:
            errors.append((each, str(exc)))
    return snapshots, errors


def _render(
    name: str | None, *, as_json: bool, prometheus: bool, width: int, compact: bool = False
) -> str:
    snapshots, errors = _collect(name)
    now = time.time()
    if as_json:
        indent = None if compact else 2
        if name is not None:
            return json.dumps(stats_to_dict(snapshots[0], now=now), default=str, indent=indent)
        return json.dumps(
            {"budgets": [stats_to_dict(s, now=now) for s in snapshots],
             "errors": [{"name": n, "error": e} for n, e in errors]},
            default=str, indent=indent,
        )
    if prometheus:
        text = render_prometheus(snapshots)
        text += "".join(f"# budget {n!r} unreadable: {e}\n" for n, e in errors)
        return text.rstrip("\n")
    if name is not None:
        return format_budget(snapshots[0], now=now, width=width)
    if not snapshots and not errors:
        return "no mppools budgets on this host"
    lines = [_SUMMARY_HEAD, *(format_summary(s) for s in snapshots)]
    lines.extend(f"{n:<24} unreadable: {e}" for n, e in errors)
    return "\n".join(lines)


def run_status(
    name: str | None,
    *,
    as_json: bool = False,
    prometheus: bool = False,
    watch: float | None = None,
    iterations: int | None = None,
    out: TextIO | None = None,
) -> int:
    """Print the status of ``name`` (or of every budget); with ``watch``, refresh every
    ``watch`` seconds until Ctrl-C (or ``iterations`` refreshes).

    Raises:
        MppoolsError: the named budget cannot be read (on the first refresh).
    """
    out = sys.stdout if out is None else out
    tty = out.isatty()
    width = shutil.get_terminal_size((100, 24)).columns if tty else 120
    if watch is None:
        text = _render(name, as_json=as_json, prometheus=prometheus, width=width)
        if text:
            print(text, file=out)
        return EXIT_OK
    count = 0
    try:
        while iterations is None or count < iterations:
            try:
                text = _render(name, as_json=as_json, prometheus=prometheus, width=width,
                               compact=True)
            except (MppoolsError, OSError) as exc:
                if count == 0:
                    raise
                text = json.dumps({"error": str(exc)}) if as_json else f"{name!r}: {exc}"
            if as_json:
                # one JSON document per line (NDJSON), never an ANSI clear
                print(text, file=out, flush=True)
            elif tty:
                stamp = time.strftime("%H:%M:%S")
                out.write(f"{_CLEAR}mppools status — every {watch:g}s — {stamp}   "
                          f"(Ctrl-C to quit)\n\n{text}\n")
                out.flush()
            else:
                print(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}\n{text}", file=out,
                      flush=True)
            count += 1
            if iterations is not None and count >= iterations:
                break
            time.sleep(watch)
    except KeyboardInterrupt:
        if tty:
            out.write("\n")
    return EXIT_OK


# reclaim ------------------------------------------------------------------------------------
def format_audit(name: str, report: AuditReport, stats: BudgetStats) -> str:
    """What an audit reclaimed, in words."""
    lines: list[str] = []
    if report.reclaimed_slots:
        by_pid: dict[int, list[int]] = {}
        for pid, index in report.reclaimed_slots:
            by_pid.setdefault(pid, []).append(index)
        lines.append(f"reclaimed {len(report.reclaimed_slots)} slot(s) of dead processes:")
        lines.extend(
            f"  pid {pid}: slot(s) {', '.join(map(str, sorted(indexes)))}"
            for pid, indexes in sorted(by_pid.items())
        )
    if report.dropped_waiters:
        lines.append("dropped dead waiters: pids "
                     + ", ".join(map(str, sorted(report.dropped_waiters))))
    if report.semaphore_corrected:
        lines.append(f"semaphore corrected by {report.semaphore_corrected:+d}")
    if not lines:
        lines.append(f"nothing to reclaim in budget {name!r}")
    lines.append(f"now: limit {stats.limit}, in use {stats.in_use}, free {stats.free}, "
                 f"waiting {stats.waiting}, debt {stats.debt}")
    return "\n".join(lines)


def run_reclaim(name: str, *, as_json: bool = False, out: TextIO | None = None) -> int:
    """Audit budget ``name``: reclaim the slots and waiter records of dead processes.

    Raises:
        MppoolsError: the budget cannot be opened.
    """
    out = sys.stdout if out is None else out
    with open_budget(name) as limiter:
        report = limiter.audit()
        stats = limiter.stats()
    if as_json:
        print(json.dumps({
            "name": name,
            "reclaimed_slots": [{"pid": p, "slot": i} for p, i in report.reclaimed_slots],
            "dropped_waiters": list(report.dropped_waiters),
            "semaphore_corrected": report.semaphore_corrected,
            "stats": stats_to_dict(stats),
        }, default=str, indent=2), file=out)
    else:
        print(format_audit(name, report, stats), file=out)
    return EXIT_OK


# unlink -------------------------------------------------------------------------------------
def run_unlink(name: str, *, force: bool = False, out: TextIO | None = None) -> int:
    """Remove the shared objects of budget ``name`` (refused while live processes use it,
    unless ``force``).

    Raises:
        BudgetInUseError: live processes use it and not ``force``.
        NotConfiguredError: no such budget.
    """
    out = sys.stdout if out is None else out
    mppools.unlink(name, force=force)
    print(f"removed budget {name!r}" + (" (forced)" if force else ""), file=out)
    return EXIT_OK

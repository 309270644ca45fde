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
from mppools._errors import BudgetNotFoundError, MppoolsError
from mppools._limiter._base import AuditReport, BudgetStats, HolderStats
from mppools._limiter.posix import exists
from mppools.cli._common import (
    EXIT_FAILURE,
    EXIT_OK,
    CLIError,
    broken_kind,
    format_age,
    format_time,
    inspect_budget,
    list_budget_names,
    open_budget,
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
    if pid <= 0:
        return "<unknown: its record was lost>"
    try:
        proc = psutil.Process(pid)
        parts = proc.cmdline() or [f"[{proc.name()}]"]
    except psutil.ZombieProcess:
        return "<zombie>"
    except psutil.NoSuchProcess:
        return "<gone>"
    except (psutil.Error, OSError, ValueError, OverflowError):
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


def format_budget(
    stats: BudgetStats, *, now: float | None = None, width: int = 100,
    damage: list[str] | None = None,
) -> str:
    """A detailed, multi-line report of one budget (one row per holder pid; ``damage``:
    what is wrong in its tables)."""
    now = time.time() if now is None else now
    lines = [
        f"budget {stats.name!r}  ({stats.backend} on {stats.host}, created by pid "
        f"{stats.creator_pid} {format_age(now - stats.created_at)} ago)",
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
            since = format_time(h.since)
            local = h.host == stats.host
            if not h.alive:
                command = f"(dead: run `mppools reclaim {stats.name}`)"
            elif local:
                command = command_line(h.pid, cmd_width)
            else:
                command = f"(on host {h.host})"
            lines.append(
                f"  {h.pid:>8}  {h.slots:>5}  {holder_state(h):<14}  "
                f"{format_age(now - h.since):>8}  {since:<8}  {command}"
            )
        dead = sum(1 for h in stats.holders if not h.alive)
        if dead:
            lines.append(f"  {dead} dead holder(s): their slots are reclaimed by the next "
                         f"audit (a waiter, or `mppools reclaim {stats.name}`)")
    if stats.waiters:
        lines.append("  waiting pids: " + ", ".join(
            str(w.pid) if w.host == stats.host else f"{w.host}/{w.pid}"
            for w in stats.waiters))
    lines.extend(format_cross_host(stats))
    if damage:
        lines.append(f"  DAMAGED: {'; '.join(damage)}: {_reclaim_hint(stats.name)}")
    return "\n".join(lines)


def _seconds(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def _figure(value: object) -> str:
    return "-" if value is None else str(value)


def format_cross_host(stats: BudgetStats) -> list[str]:
    """The cross-host part of a redis-backend budget's report (no lines for others): the
    coordination server and its health, then one row per host holding leases."""
    extra = stats.extra
    state = extra.get("coordination")
    if state is None:
        return []
    server = extra.get("server", "?")
    if state != "ok":
        return [f"  coordination server {server}: FAILING: {state}",
                "  (the figures above are this host's alone)"]
    lines = [
        f"  across hosts via {server}: ok (round trip "
        f"{_seconds(extra.get('rtt')) * 1000:.1f} ms)   generation "
        f"{extra.get('generation')}   leases in use {extra.get('leases_in_use')} of "
        f"{stats.limit}   this host leases {extra.get('local_limit')}"
        + (f"   grace {float(extra['grace_left']):.1f}s"  # type: ignore[arg-type]
           if extra.get("grace_left") else ""),
    ]
    details = extra.get("host_details")
    me = extra.get("host_id")
    if isinstance(details, tuple | list) and details:
        lines.append(f"  {'HOST':<40} {'HELD':>4} {'IN USE':>6} {'IDLE':>4} {'WAITING':>7}"
                     f"  {'LEASE EXPIRES IN':>16}  AS OF")
        for d in details:
            if not isinstance(d, dict):
                continue
            ago = d.get("reported_ago")
            mark = " (this host)" if d.get("host") == me else ""
            waits = "  wants more" if d.get("waits_for_leases") else ""
            lines.append(
                f"  {str(d.get('host')) + mark:<40} {d.get('held'):>4} "
                f"{_figure(d.get('in_use')):>6} {_figure(d.get('idle')):>4} "
                f"{_figure(d.get('waiting')):>7}  {_seconds(d.get('expires_in')):>15.1f}s"
                f"  {'-' if ago is None else f'{_seconds(ago):.1f}s ago'}{waits}")
    else:
        lines.append("  no host holds leases")
    waiting = [h for h in extra.get("waiting_hosts") or ()  # type: ignore[attr-defined]
               if not any(isinstance(d, dict) and d.get("host") == h
                          for d in (details or ()))]  # type: ignore[attr-defined]
    if waiting:
        lines.append("  hosts waiting for leases: " + ", ".join(map(str, waiting)))
    return lines


def _reclaim_hint(name: str) -> str:
    return (f"unknown entries count as used until `mppools reclaim {name}` (or any waiter's "
            "audit) rebuilds them from the holders' tokens")


_SUMMARY_HEAD = (f"{'NAME':<24} {'LIMIT':>5} {'IN USE':>6} {'FREE':>5} {'WAITING':>7} "
                 f"{'DEBT':>4}  HOLDERS")


def format_summary(stats: BudgetStats, damage: list[str] | None = None) -> str:
    """One line for one budget (under the header of :data:`_SUMMARY_HEAD`)."""
    dead = sum(1 for h in stats.holders if not h.alive)
    holders = f"{len(stats.holders)}" + (f" ({dead} dead)" if dead else "")
    line = (f"{stats.name:<24} {stats.limit:>5} {stats.in_use:>6} {stats.free:>5} "
            f"{stats.waiting:>7} {stats.debt:>4}  {holders}")
    state = stats.extra.get("coordination")
    if state is not None:
        hosts = stats.extra.get("hosts") or ()
        line += (f"  (redis: {len(hosts)} host(s) hold leases, "  # type: ignore[arg-type]
                 f"coordination {'ok' if state == 'ok' else 'FAILING'})")
    if damage:
        line += f"  DAMAGED ({'; '.join(damage)}): run `mppools reclaim {stats.name}`"
    return line


def format_broken(name: str, kind: str, message: str) -> str:
    """One line for a budget that cannot be read (under :data:`_SUMMARY_HEAD`)."""
    return f"{name:<24} unreadable ({kind}): {message}"


def cross_host_dict(stats: BudgetStats) -> dict[str, Any] | None:
    """The cross-host view of a redis-backend snapshot for ``--json`` (None for others)."""
    extra = stats.extra
    state = extra.get("coordination")
    if state is None:
        return None
    return {
        "server": extra.get("server"),
        "healthy": state == "ok",
        "health": state,
        "rtt": extra.get("rtt"),
        "generation": extra.get("generation"),
        "limit": stats.limit,
        "leases_in_use": extra.get("leases_in_use"),
        "grace_left": extra.get("grace_left"),
        "this_host": extra.get("host_id"),
        "hosts": list(extra.get("host_details") or ()),  # type: ignore[call-overload]
        "waiting_hosts": list(extra.get("waiting_hosts") or ()),  # type: ignore[call-overload]
    }


def stats_to_dict(stats: BudgetStats, *, now: float | None = None) -> dict[str, Any]:
    """A JSON-ready dict of a snapshot; each holder also gets ``state``, ``age`` and
    ``cmdline``; a redis-backend budget also ``cross_host`` (:func:`cross_host_dict`)."""
    now = time.time() if now is None else now
    data = dataclasses.asdict(stats)
    cross = cross_host_dict(stats)
    if cross is not None:
        data["cross_host"] = cross
    data["holders"] = [
        {
            **dataclasses.asdict(h),
            "state": holder_state(h).lower(),
            "age": round(now - h.since, 3),
            "cmdline": (command_line(h.pid, 200) if h.alive and h.host == stats.host
                        else None),
        }
        for h in stats.holders
    ]
    return data


# status -------------------------------------------------------------------------------------
#: (snapshot, what is damaged in its tables)
_Inspected = tuple[BudgetStats, list[str]]
#: (name, kind, message) of a budget that cannot be read
_Broken = tuple[str, str, str]


def _cross_host(name: str, inspected: _Inspected) -> _Inspected:
    """The snapshot of a budget whose master shares it across hosts (its local budget names
    the backend) seen through that backend: limit across hosts, each host's leases. If the
    redis extra is not installed or the local budget went away: the local snapshot."""
    try:
        from mppools._limiter.redis._limiter import RedisLimiter, backend_of
    except ImportError:  # redis-py missing: the local view only
        return inspected
    spec = backend_of(name)
    if spec is None:
        return inspected
    try:
        limiter = RedisLimiter.open(spec, name, create=False)
    except MppoolsError:
        return inspected
    try:
        return limiter.stats(), inspected[1]
    finally:
        limiter.close()


def inspect_any(name: str) -> _Inspected:
    """:func:`inspect_budget`, through the coordination server for a cross-host budget."""
    return _cross_host(name, inspect_budget(name))


def _inspect_named(name: str) -> _Inspected:
    try:
        return inspect_any(name)
    except MppoolsError:
        raise
    except Exception as exc:  # never a traceback for one budget, whatever is in it
        raise CLIError(f"budget {name!r} cannot be read ({broken_kind(name, exc)}): "
                       f"{type(exc).__name__}: {exc}") from exc


def _collect(name: str | None) -> tuple[list[_Inspected], list[_Broken]]:
    """Snapshots of ``name`` (errors raise) or of every budget on this host, anyone's: one
    that cannot be read is listed as broken, with what is wrong, and never stops the rest."""
    if name is not None:
        return [_inspect_named(name)], []
    snapshots: list[_Inspected] = []
    broken: list[_Broken] = []
    for each in list_budget_names():
        try:
            snapshots.append(inspect_any(each))
        except BudgetNotFoundError as exc:
            if exists(each):  # else it was removed while we listed: not ours to report
                broken.append((each, broken_kind(each, exc), str(exc)))
        except Exception as exc:
            broken.append((each, broken_kind(each, exc),
                           str(exc) if isinstance(exc, MppoolsError)
                           else f"{type(exc).__name__}: {exc}"))
    return snapshots, broken


def _stats_dict(inspected: _Inspected, now: float) -> dict[str, Any]:
    stats, damage = inspected
    return {**stats_to_dict(stats, now=now), "damage": damage}


def _render(
    name: str | None, *, as_json: bool, prometheus: bool, width: int, compact: bool = False
) -> tuple[str, int]:
    """The text to print and the exit status: a named budget whose tables are damaged is
    shown, and the status is EXIT_FAILURE; a listing exits 0 whatever it flags."""
    snapshots, broken = _collect(name)
    now = time.time()
    status = EXIT_FAILURE if name is not None and snapshots[0][1] else EXIT_OK
    if as_json:
        indent = None if compact else 2
        if name is not None:
            return json.dumps(_stats_dict(snapshots[0], now), default=str,
                              indent=indent), status
        return json.dumps(
            {"budgets": [_stats_dict(s, now) for s in snapshots],
             "errors": [{"name": n, "kind": k, "error": e} for n, k, e in broken]},
            default=str, indent=indent,
        ), status
    if prometheus:
        text = render_prometheus([s for s, _ in snapshots],
                                 damage={s.name: d for s, d in snapshots},
                                 broken=[n for n, _, _ in broken])
        text += "".join(f"# budget {s.name!r} damaged: {'; '.join(d)}\n"
                        for s, d in snapshots if d)
        text += "".join(f"# budget {n!r} unreadable ({k}): {' '.join(e.split())}\n"
                        for n, k, e in broken)
        return text.rstrip("\n"), status
    if name is not None:
        stats, damage = snapshots[0]
        return format_budget(stats, now=now, width=width, damage=damage), status
    if not snapshots and not broken:
        return "no mppools budgets on this host", status
    lines = [_SUMMARY_HEAD, *(format_summary(s, d) for s, d in snapshots)]
    lines.extend(format_broken(n, k, " ".join(e.split())) for n, k, e in broken)
    return "\n".join(lines), status


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
        text, status = _render(name, as_json=as_json, prometheus=prometheus, width=width)
        if text:
            print(text, file=out)
        return status
    count = 0
    try:
        while iterations is None or count < iterations:
            try:
                text, _ = _render(name, as_json=as_json, prometheus=prometheus, width=width,
                                  compact=True)
            except (MppoolsError, OSError, CLIError) as exc:
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
    corrected = report.extra.get("semaphore_corrected")
    if isinstance(corrected, int) and corrected:
        lines.append(f"semaphore corrected by {corrected:+d}")
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
            "host": report.host,
            "reclaimed_slots": [{"pid": p, "slot": i} for p, i in report.reclaimed_slots],
            "dropped_waiters": list(report.dropped_waiters),
            **report.extra,
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
        BudgetNotFoundError: no such budget.
    """
    out = sys.stdout if out is None else out
    mppools.unlink(name, force=force)
    print(f"removed budget {name!r}" + (" (forced)" if force else ""), file=out)
    return EXIT_OK

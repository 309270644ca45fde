"""``mppools check``: a preflight an operator runs on a host.

Each check has a name, a status (``ok``, ``warn``, ``fail``) and a concrete message with its
numbers. The command exits 1 if any check failed (with ``--strict``, also on a warning), 0
otherwise. It only reads: the budget is attached like ``mppools status`` does (no slot taken,
nothing written), a budget that does not exist is never created, and the broker is only
queried.
"""

from __future__ import annotations

import json
import os
import pwd
import stat
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

from mppools._limiter._base import local_host
from mppools._limiter.posix import _self as posix_self
from mppools._limiter.posix._names import (
    SHM_DIR,
    rendezvous_dir,
    sem_path,
    shm_path,
    tokens_path,
    validate_name,
)
from mppools._limiter.posix._wait import MAX_WATCHED
from mppools._liveness import identity_of
from mppools.cli._common import EXIT_FAILURE, EXIT_OK

from ._brokers import (
    BrokerView,
    check_management,
    endpoints_of,
    parse_broker,
    query_broker,
)
from ._budget import BudgetLook, User, look_at
from ._proc import (
    fd_soft_limit,
    innermost_pid,
    namespace_inode,
    pids_of_inodes,
    proc_fd_soft_limit,
    tcp_sockets,
)

__all__ = ["FAIL", "OK", "WARN", "Check", "CheckOptions", "render_text", "run_check",
           "run_checks"]

OK, WARN, FAIL = "ok", "warn", "fail"
_RANK = {OK: 0, WARN: 1, FAIL: 2}
#: fds a process keeps for the budget itself: the segment, its mapping's duplicate, the
#: token file and the keeper's socket
BUDGET_FDS = 4
#: fds left for the process itself (stdio, logs, the app's own files) in the arithmetic
PROCESS_FDS = 32
#: /dev/shm free space to keep beyond what the budget still needs: one more segment, 1 MiB
#: at least
MIN_SHM_MARGIN = 1 << 20
#: inodes a budget takes in /dev/shm at least: segment, semaphore, directory, token file,
#: one keeper socket; plus one wake-up socket per waiting thread
BUDGET_INODES = 5


@dataclass(frozen=True, slots=True)
class Check:
    """One named check: ``status`` is ``ok``, ``warn`` or ``fail``; ``data`` holds its
    figures for scripts."""

    name: str
    status: str
    message: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CheckOptions:
    """What ``mppools check`` was asked: the budget, the limit planned for one that does not
    exist yet, the broker, its management API, the threads (or greenlets) one process may
    run against the pool at once."""

    name: str
    limit: int | None = None
    broker: str | None = None
    management: str | None = None
    threads: int | None = None
    timeout: float = 5.0
    strict: bool = False


# helpers -----------------------------------------------------------------------------------
def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "es" if word.endswith("s") else "s")


def _size(n: int) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):.1f} GiB"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    if n >= 1 << 10:
        return f"{n / (1 << 10):.1f} KiB"
    return f"{n} bytes"


def _user_name(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _visible(user: User) -> bool:
    """True if ``user``'s pid means the same process here: it recorded our PID namespace
    and that pid still has its recorded start time."""
    ours = posix_self.pid_namespace()
    if not ours or user.pidns != ours:
        return False
    ident = identity_of(user.pid)
    return ident is not None and ident.start == user.start


def _slots_by_pid(users: list[User], pids: Iterable[int]) -> dict[int, int]:
    """Slots held by each process, keyed by its pid in this PID namespace: the holders that
    recorded our namespace, and holders of a nested namespace (a container started from
    here) found among ``pids`` by their namespace, innermost pid and start time."""
    slots: dict[int, int] = {}
    nested: dict[tuple[int, int, int], User] = {}
    for user in users:
        if user.role != "holder":
            continue
        if _visible(user):
            slots[user.pid] = slots.get(user.pid, 0) + user.slots
        elif user.pidns and user.start:
            nested[(user.pidns, user.pid, user.start)] = user
    for pid in pids:
        if not nested or pid in slots or pid <= 0:
            continue
        ns, inner, ident = namespace_inode(pid, "pid"), innermost_pid(pid), identity_of(pid)
        if ns is None or inner is None or ident is None:
            continue
        found = nested.pop((ns, inner, ident.start), None)
        if found is not None:
            slots[pid] = found.slots
    return slots


def _short_command(pid: int, width: int = 60) -> str:
    """``pid``'s command line with its program's directory left out (``python3 app.py``)."""
    from mppools.cli._status import command_line

    text = command_line(pid, 1000)
    if text.startswith("/"):
        text = os.path.basename(text.split(" ", 1)[0]) + text[len(text.split(" ", 1)[0]):]
    return text if len(text) <= width else text[: width - 1] + "…"


def _skipped(name: str, look: BudgetLook) -> Check:
    why = "the budget cannot be read" if look.error else f"no budget {look.name!r} yet"
    return Check(name, WARN, f"skipped: no limit known ({why}); pass --limit N")


# the checks --------------------------------------------------------------------------------
def check_budget(look: BudgetLook, planned: int | None) -> Check:
    """The budget itself: readable, undamaged, its limit against ``--limit``."""
    name = look.name
    if look.error:
        return Check("budget", FAIL, look.error, {"exists": True})
    stats = look.stats
    if stats is None:
        if planned is not None:
            return Check("budget", OK, f"no budget {name!r} on this host yet: checking the "
                         f"planned limit {planned} (--limit)",
                         {"exists": False, "limit": planned})
        return Check("budget", WARN, f"no budget {name!r} on this host and no --limit: the "
                     "checks that need a limit are skipped; pass --limit N to check the "
                     "budget you plan", {"exists": False, "limit": None})
    dead = sum(1 for h in stats.holders if not h.alive)
    data = {"exists": True, "limit": stats.limit, "in_use": stats.in_use,
            "holders": len(stats.holders), "dead_holders": dead, "waiting": stats.waiting,
            "debt": stats.debt, "damage": look.damage}
    text = (f"budget {name!r}: limit {stats.limit}, in use {stats.in_use} "
            f"({_plural(len(stats.holders), 'holder')}), {stats.waiting} waiting, "
            f"debt {stats.debt}")
    if look.damage:
        return Check("budget", FAIL, f"{text}; its tables are damaged "
                     f"({'; '.join(look.damage)}): run `mppools reclaim {name}`", data)
    notes = []
    if planned is not None and planned != stats.limit:
        notes.append(f"--limit {planned} differs from the budget's limit {stats.limit}, "
                     f"which is what is checked (change it with mppools.set_limit())")
    if dead:
        notes.append(f"{_plural(dead, 'dead holder')} keep slots until an audit: run "
                     f"`mppools reclaim {name}`")
    if notes:
        return Check("budget", WARN, f"{text}; {'; '.join(notes)}", data)
    return Check("budget", OK, text, data)


def check_squatting(name: str) -> Check:
    """Objects under the budget's names that belong to another user (configure() and
    attach() refuse them), are of the wrong kind, or are open to everybody."""
    euid = os.geteuid()
    objects = [
        (shm_path(name), "segment", stat.S_ISREG),
        (sem_path(name), "semaphore", stat.S_ISREG),
        (rendezvous_dir(name), "directory", stat.S_ISDIR),
        (tokens_path(name), "token file", stat.S_ISREG),
    ]
    foreign: list[str] = []
    wrong: list[str] = []
    open_to_all: list[str] = []
    present = 0
    for path, what, right_kind in objects:
        try:
            st = os.lstat(path)
        except OSError:  # absent, or inside another user's closed directory
            continue
        present += 1
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid != euid:
            foreign.append(f"{path} ({what}, mode {mode:o}) belongs to {_user_name(st.st_uid)}")
        elif not right_kind(st.st_mode):
            wrong.append(f"{path} is not a {what}")
        elif mode & 0o007:
            open_to_all.append(f"{path} ({what}) has mode {mode:o}")
    data = {"present": present, "foreign": foreign, "wrong_kind": wrong,
            "open_to_all": open_to_all, "uid": euid}
    if foreign:
        return Check("name-squatting", FAIL, (
            f"{len(foreign)} of the names of budget {name!r} are held by another user: "
            f"{'; '.join(foreign)}; configure() and attach() refuse them (this user is "
            f"uid {euid}): remove them as root, or use another name"), data)
    if wrong:
        return Check("name-squatting", FAIL, f"{'; '.join(wrong)}: remove it (`mppools "
                     f"unlink {name} --force`) or use another name", data)
    if open_to_all:
        return Check("name-squatting", WARN, f"{'; '.join(open_to_all)}: every user of this "
                     "host may open it; recreate the budget with mode 0o600 (or 0o660 for a "
                     "group)", data)
    mine = f", all {_user_name(euid)}'s" if present else ""
    return Check("name-squatting", OK, f"no other user holds the names of budget {name!r} "
                 f"({present} of {len(objects)} exist{mine})", data)


def check_shm(look: BudgetLook) -> Check:
    """/dev/shm free space and inodes against what the budget's segment still needs."""
    try:
        vfs = os.statvfs(SHM_DIR)
    except OSError as exc:
        return Check("shm-space", FAIL, f"cannot read {SHM_DIR}: {exc.strerror}")
    free = vfs.f_bavail * vfs.f_frsize
    total = vfs.f_blocks * vfs.f_frsize
    need = max(look.segment_bytes - look.allocated_bytes, 0)
    margin = max(look.segment_bytes, MIN_SHM_MARGIN)
    data = {"free_bytes": free, "total_bytes": total, "segment_bytes": look.segment_bytes,
            "allocated_bytes": look.allocated_bytes, "needed_bytes": need,
            "margin_bytes": margin, "free_inodes": vfs.f_favail, "total_inodes": vfs.f_files}
    if look.exists:
        what = (f"the {_size(look.segment_bytes)} segment of budget {look.name!r} has "
                f"{_size(look.allocated_bytes)} allocated and needs {_size(need)} more")
    else:
        what = (f"budget {look.name!r} will need a {_size(look.segment_bytes)} segment "
                f"({look.segment_bytes} bytes)")
    room = f"{SHM_DIR} has {_size(free)} free of {_size(total)}"
    if free < need:
        return Check("shm-space", FAIL, (
            f"{room}; {what}: a process that touches a page of the segment /dev/shm cannot "
            "back dies of sigbus; free space in /dev/shm or enlarge it (docker --shm-size, "
            "mount -o remount,size=)"), data)
    if vfs.f_files and vfs.f_favail < BUDGET_INODES:
        return Check("shm-space", FAIL, (
            f"{SHM_DIR} has {vfs.f_favail} free inodes of {vfs.f_files}; a budget needs "
            f"{BUDGET_INODES} at least (segment, semaphore, directory, token file, keeper "
            "socket) and one per waiting thread"), data)
    if free < need + margin:
        return Check("shm-space", WARN, (
            f"{room}; {what}: that leaves less than the margin of {_size(margin)} (one "
            "more segment, 1 MiB at least) for other budgets and programs"), data)
    return Check("shm-space", OK, f"{room}; {what} (margin {_size(margin)})", data)


def check_fds(look: BudgetLook, threads: int | None) -> Check:
    """The soft open-file limit (ours, and the holders' own) against the fds one process
    of the budget may need."""
    limit = look.limit
    if limit is None:
        return _skipped("fd-limit", look)
    concurrency = threads if threads is not None else limit
    conns = min(concurrency, limit)
    sockets = concurrency
    pidfds = min(limit, MAX_WATCHED)
    need = conns + sockets + pidfds + BUDGET_FDS + PROCESS_FDS
    source = "--threads" if threads is not None else "by default as many as the limit"
    arith = (
        f"{conns} connections (every slot one process may hold, 1 socket each) + "
        f"{sockets} wake-up sockets ({concurrency} threads waiting at once, {source}) + "
        f"{pidfds} holder pidfds (one per other holder process, at most {MAX_WATCHED}) + "
        f"{BUDGET_FDS} budget fds (segment, its mapping, token file, keeper socket) + "
        f"{PROCESS_FDS} for the process itself = {need}"
    )
    limits: list[tuple[str, int | None]] = [("this shell", fd_soft_limit())]
    for user in look.users:
        if _visible(user):
            limits.append((f"{user.role} pid {user.pid}", proc_fd_soft_limit(user.pid)))
    data = {"needed": need, "connections": conns, "wakeup_sockets": sockets,
            "pidfds": pidfds, "budget_fds": BUDGET_FDS, "process_fds": PROCESS_FDS,
            "limits": {who: value for who, value in limits}}
    low = [(who, value) for who, value in limits if value is not None and value < need]
    shown = ", ".join(f"{'unlimited' if v is None else v} ({who})" for who, v in limits)
    if low:
        worst = ", ".join(f"{value} ({who})" for who, value in low)
        return Check("fd-limit", FAIL, (
            f"soft open-file limit {worst} is below the {need} fds one process of budget "
            f"{look.name!r} may need: {arith}; raise it (ulimit -n, systemd LimitNOFILE=, "
            "docker --ulimit nofile=) or pass --threads with the real concurrency"), data)
    return Check("fd-limit", OK, f"soft open-file limit {shown} covers the {need} fds one "
                 f"process may need: {arith}", data)


def check_namespaces(look: BudgetLook) -> Check:
    """Processes using the budget from another PID or network namespace."""
    if look.error:
        return Check("namespaces", WARN, "skipped: the budget cannot be read, so who uses it "
                     "from which namespace is unknown")
    users = look.users
    if not users:
        return Check("namespaces", OK, f"no process uses budget {look.name!r} now",
                     {"processes": 0})
    ours_pid = posix_self.pid_namespace()
    ours_net = namespace_inode("self", "net")
    other_pid: list[str] = []
    unknown: list[str] = []
    other_net: list[str] = []
    for user in users:
        label = f"{user.role} pid {user.pid}"
        if not ours_pid or not user.pidns:
            unknown.append(label)
        elif user.pidns != ours_pid:
            other_pid.append(label)
        elif not _visible(user):
            unknown.append(f"{label}, not found here")
        else:
            net = namespace_inode(user.pid, "net")
            if net is None or ours_net is None:
                unknown.append(f"{label}, network namespace unreadable")
            elif net != ours_net:
                other_net.append(label)
    holders = sum(1 for u in users if u.role == "holder")
    data = {"processes": len(users), "holders": holders, "waiters": len(users) - holders,
            "other_pid_namespace": other_pid, "unknown_pid_namespace": unknown,
            "other_network_namespace": other_net}
    parts = []
    if other_pid:
        parts.append(
            f"{len(other_pid)} in another pid namespace ({', '.join(other_pid)}): those pids "
            "are their namespace's, not this host's (so are the pids `mppools status` shows "
            "for them)")
    if unknown:
        parts.append(f"{len(unknown)} in a pid namespace this check cannot identify "
                     f"({', '.join(unknown)}; a namespace without its own /proc records "
                     "none)")
    if other_net:
        parts.append(f"{len(other_net)} in another network namespace ({', '.join(other_net)})"
                     ": their broker connections are not in this /proc/net/tcp")
    if parts:
        return Check("namespaces", WARN, (
            f"of {_plural(len(users), 'process')} using budget {look.name!r}, "
            + "; ".join(parts) + "; the budget still holds for them (kernel-released "
            "tokens), but check their broker connections from their own namespace"), data)
    return Check("namespaces", OK, (
        f"all {_plural(len(users), 'process')} using budget {look.name!r} "
        f"({_plural(holders, 'holder')}, {_plural(len(users) - holders, 'waiter')}) share "
        "this check's pid and network namespaces"), data)


def check_broker_limit(look: BudgetLook, view: BrokerView) -> Check:
    """The budget's limit against the broker's own caps (and what else is connected)."""
    if view.error:
        return Check("broker-limit", FAIL, view.error, {"broker": view.address})
    limit = look.limit
    if limit is None:
        return _skipped("broker-limit", look)
    in_use = look.stats.in_use if look.stats is not None else 0
    data: dict[str, Any] = {"broker": view.address, "kind": view.kind, "limit": limit,
                            "in_use": in_use, "caps": []}
    if not view.caps:
        return Check("broker-limit", WARN, view.warning or f"{view.kind} at {view.address} "
                     "did not say its connection cap", data)
    status = OK
    parts = []
    for cap in view.caps:
        others = None if cap.connected is None else max(cap.connected - in_use, 0)
        data["caps"].append({"source": cap.source, "value": cap.value,
                             "connected": cap.connected, "others": others})
        now = ("" if cap.connected is None else
               f"; {cap.connected} connected now besides this check ({others} beyond the "
               f"budget's {in_use} in use)")
        if cap.value is None:
            parts.append(f"{cap.source}: no limit{now}")
        elif limit > cap.value:
            status = FAIL
            parts.append(f"budget limit {limit} is above {cap.source} {cap.value}: the "
                         f"broker refuses connections before the budget is full{now}")
        elif others is not None and limit + others > cap.value:
            status = max(status, WARN, key=_RANK.__getitem__)
            parts.append(f"budget limit {limit} + {others} other connections now = "
                         f"{limit + others} > {cap.source} {cap.value}: when the budget is "
                         "full the broker refuses some of its connections")
        else:
            spare = "" if others is None else f", {cap.value - limit - others} spare when full"
            parts.append(f"budget limit {limit} fits {cap.source} {cap.value}{now}{spare}")
    if view.warning:
        status = max(status, WARN, key=_RANK.__getitem__)
        parts.append(view.warning)
    parts.extend(view.notes)
    return Check("broker-limit", status, f"{view.kind} at {view.address}: " + "; ".join(parts),
                 data)


def check_unmanaged(look: BudgetLook, view: BrokerView, broker: str) -> Check:
    """Connections to the broker from this user's processes beyond the slots they hold."""
    _, host, port = parse_broker(broker)
    endpoints = endpoints_of(host, port)
    address = f"{host}:{port}"
    if not endpoints:
        return Check("unmanaged-connections", WARN, f"cannot resolve {host!r}: connections "
                     f"to {address} cannot be counted", {"broker": address})
    euid = os.geteuid()
    socks = [s for s in tcp_sockets() if s.remote in endpoints]
    mine = [s for s in socks if s.uid == euid]
    others_uid = len(socks) - len(mine)
    pid_of = pids_of_inodes({s.inode for s in mine}, euid)
    # this check's own broker connection is closed by now: nothing of ours to leave out
    per_pid: Counter[int] = Counter(pid_of.get(s.inode, 0) for s in mine)
    slots = _slots_by_pid(look.users, per_pid)
    extra = {pid: n - slots.get(pid, 0) for pid, n in per_pid.items()
             if n > slots.get(pid, 0)}
    total = sum(per_pid.values())
    unmanaged = sum(extra.values())
    data: dict[str, Any] = {
        "broker": address, "connections": total, "unmanaged": unmanaged,
        "by_pid": [{"pid": pid, "connections": per_pid[pid], "slots": slots.get(pid, 0)}
                   for pid in sorted(extra)],
        "other_users_connections": others_uid,
    }
    notes = []
    if others_uid:
        notes.append(f"{others_uid} more from other users' processes (not checked)")
    if view.peers is not None:
        local = {s.local for s in socks}
        here = sum(1 for p in view.peers if p in local)
        data["broker_listed"] = len(view.peers)
        data["broker_listed_from_here"] = here
        notes.append(f"the broker lists {len(view.peers)} clients besides this check, {here} "
                     f"from this host's sockets, {len(view.peers) - here} from elsewhere")
    tail = f" ({'; '.join(notes)})" if notes else ""
    where = f"from this user's processes (uid {euid}, this network namespace) to {address}"
    if unmanaged:
        who = ", ".join(
            f"pid {pid} " + (f"({_short_command(pid)}) " if pid else "(unknown) ")
            + f"{per_pid[pid]} connection(s), {slots.get(pid, 0)} slot(s)"
            for pid in sorted(extra))
        return Check("unmanaged-connections", WARN, (
            f"{unmanaged} of {total} connections {where} are not made through budget "
            f"{look.name!r}: {who}; they count against the broker's cap but not against "
            f"the budget{tail}"), data)
    return Check("unmanaged-connections", OK, (
        f"all {total} connections {where} are within the slots of budget {look.name!r} "
        f"({sum(slots.values())} held by its holders seen here){tail}"), data)


# running -----------------------------------------------------------------------------------
def run_checks(options: CheckOptions) -> list[Check]:
    """Every check of ``options``, in order (read-only)."""
    name = validate_name(options.name)
    check_management(options.management, options.broker)  # before anything is read
    look = look_at(name, options.limit)
    view: BrokerView | None = None
    if options.broker is not None:
        view = query_broker(options.broker, management=options.management,
                            timeout=options.timeout)
    checks: list[Callable[[], Check]] = [
        lambda: check_budget(look, options.limit),
        lambda: check_squatting(name),
        lambda: check_shm(look),
        lambda: check_fds(look, options.threads),
        lambda: check_namespaces(look),
    ]
    if view is not None and options.broker is not None:
        broker = options.broker
        checks.append(lambda: check_broker_limit(look, view))
        checks.append(lambda: check_unmanaged(look, view, broker))
    return [each() for each in checks]


def overall(checks: list[Check]) -> str:
    """The worst status of ``checks``."""
    return max((c.status for c in checks), key=_RANK.__getitem__, default=OK)


def exit_status(checks: list[Check], *, strict: bool = False) -> int:
    """1 if a check failed (or, with ``strict``, warned), else 0."""
    worst = overall(checks)
    return EXIT_FAILURE if worst == FAIL or (strict and worst == WARN) else EXIT_OK


def render_text(name: str, checks: list[Check]) -> str:
    """The checks as one line each, then a summary line."""
    width = max(len(c.name) for c in checks)
    lines = [f"mppools check {name!r} on host {local_host()}"]
    for c in checks:
        label = c.status if c.status == OK else c.status.upper()
        lines.append(f"  {label:<4}  {c.name:<{width}}  {c.message}")
    counts = Counter(c.status for c in checks)
    lines.append(f"result: {overall(checks)} ({counts[FAIL]} failed, {counts[WARN]} "
                 f"warned, {counts[OK]} ok)")
    return "\n".join(lines)


def run_check(options: CheckOptions, *, as_json: bool = False,
              out: TextIO | None = None) -> int:
    """Run the checks of ``options`` and print them (``as_json``: one JSON document).

    Returns:
        The exit status: 1 if a check failed (with ``options.strict``, also warned), else 0.

    Raises:
        CLIError: an unsupported broker URL, an unusable --management URL, or redis-py
            missing for a redis broker.
        ConfigurationError: an invalid budget name.
    """
    out = sys.stdout if out is None else out
    checks = run_checks(options)
    status = exit_status(checks, strict=options.strict)
    if as_json:
        print(json.dumps({
            "name": options.name,
            "host": local_host(),
            "status": overall(checks),
            "exit_status": status,
            "checks": [{"name": c.name, "status": c.status, "message": c.message,
                        "data": c.data} for c in checks],
        }, indent=2, default=str), file=out)
    else:
        print(render_text(options.name, checks), file=out)
    return status

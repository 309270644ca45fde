"""uWSGI: one budget of broker connections for the master and all its workers.

Setup, one call in the module uWSGI loads (``--module`` / ``--wsgi-file``)::

    from mppools.integrations import uwsgi as mppools_uwsgi

    mppools_uwsgi.setup(limit=3, name="web")   # or MPPOOLS_LIMIT / MPPOOLS_NAME

and one line in the uWSGI configuration, so that the budget is removed when the master
stops (the master never runs Python's ``atexit``, nor ``uwsgi.atexit``)::

    exec-as-user-atexit = python3 -m mppools.integrations.uwsgi cleanup web

What :func:`setup` does depends on where uWSGI loads the app:

preforked (``--master --processes N``, the default)
    ``setup`` runs in the master: it calls :func:`mppools.configure` there, before uWSGI
    forks any worker, so every worker inherits the budget. uWSGI forks from C: Python's fork
    handlers (``os.register_at_fork``, mppools' own included) run in the workers only with
    ``--py-call-osafterfork`` (or ``--py-call-uwsgi-fork-hooks``). ``setup`` registers a
    post-fork hook (``uwsgidecorators.postfork`` when available, else
    ``uwsgi.post_fork_hook``, chained) that runs mppools' after-fork handling in every worker
    where Python's did not (:func:`after_fork`): the pools inherited from the master are
    dropped without any I/O, the in-process locks and the token file are made anew.
``--lazy-apps`` (or ``--lazy``)
    every worker imports the app, so ``setup`` runs in every worker, after its fork: with an
    explicit name, the first worker creates the budget and the others join it (the same
    name and limit). Without a name each worker would make a budget of its own (N workers
    x limit connections): refused with :class:`~mppools.ConfigurationError`.

In both modes a worker that exits gracefully (reload, ``--max-requests``, SIGHUP) detaches
without removing the budget (``mppools.close(unlink=False)``) even if it created it: other
workers still use it, and a budget removed under them would let the next worker create a
second one of the same name (two budgets, twice the limit).

Outside uWSGI (the module imported by a test or a development server) ``setup`` simply
calls :func:`mppools.configure`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import mppools
from mppools import _config, _fork
from mppools._errors import BudgetInUseError, BudgetNotFoundError, ConfigurationError
from mppools._keeper import keeper
from mppools._lending import lender
from mppools._limiter._base import Limiter
from mppools.integrations import settings_from_env

__all__ = ["after_fork", "cleanup", "main", "server_mode", "setup"]

logger = logging.getLogger("mppools.uwsgi")

#: the master exports its pid here in setup(), for the cleanup command it runs at exit
ENV_MASTER = "MPPOOLS_UWSGI_MASTER"

#: the pid in which mppools' after-fork handling last ran (or mppools was imported): a
#: process whose pid differs was forked without Python's fork handlers (a C-level fork)
_handled_pid = os.getpid()
_hooks_installed_in: int | None = None  # the pid whose post-fork / exit hooks are in place
_exit_hooks_in: int | None = None


def _note_fork_handled() -> None:
    global _handled_pid
    _handled_pid = os.getpid()


os.register_at_fork(after_in_child=_note_fork_handled)


def _uwsgi() -> Any | None:
    """The ``uwsgi`` module, which exists only inside the server (None elsewhere)."""
    try:
        import uwsgi
    except ImportError:
        return None
    return uwsgi


def _opt(server: Any, key: str) -> Any:
    opts = getattr(server, "opt", None) or {}
    value = opts.get(key)
    if value is None:
        value = opts.get(key.encode())
    return value


def _truthy(value: Any) -> bool:
    if isinstance(value, list):  # an option given several times
        return bool(value) and _truthy(value[-1])
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if isinstance(value, str):
        return value.strip().lower() not in ("", "0", "false", "no", "off")
    return bool(value)


def _flag(server: Any, key: str) -> bool:
    return _truthy(_opt(server, key))


def server_mode() -> str | None:
    """How this uWSGI instance loads the app: ``"lazy"`` (``--lazy-apps`` / ``--lazy``: in
    every worker), ``"preforked"`` (in the master, workers forked from it), or None outside
    uWSGI."""
    server = _uwsgi()
    if server is None:
        return None
    if _flag(server, "lazy-apps") or _flag(server, "lazy"):
        return "lazy"
    return "preforked"


def after_fork() -> bool:
    """Run mppools' after-fork handling in this process if it was forked without Python's
    fork handlers (uWSGI forks its workers from C). Idempotent: True if it ran now.

    Where it is sound (CPython's main interpreter, no other interpreter, this process's only
    thread) it runs CPython's own child-side fork handling, ``PyOS_AfterFork_Child``, what
    ``--py-call-osafterfork`` does: the GIL, the import lock and the ``threading`` module
    are made anew, then every ``os.register_at_fork`` child handler runs, mppools' own
    among them. Elsewhere it runs mppools' own handling only (and warns if the parent had
    other threads, whose state the interpreter keeps). Either way the inherited pools are
    emptied without touching their connections (the parent keeps them), in-process locks
    are made anew, the budget's token file gets an open file description of this process's
    own, and the keeper starts afresh here when needed.

    Call it first in the forked process, before any thread starts there.
    """
    global _handled_pid
    pid = os.getpid()
    if _handled_pid == pid:
        return False
    others = _fork.inherited_threads()
    if not _fork.catch_up_c_level_fork():
        if others:
            logger.warning(
                "mppools: pid %d was forked from C while its parent ran %d other thread(s) "
                "(%s) and the interpreter's own fork handling cannot run here: if this "
                "process hangs, run uWSGI with --py-call-uwsgi-fork-hooks", pid,
                len(others), ", ".join(others))
        _fork._after_fork_in_child()
    _handled_pid = pid
    return True


def _post_fork() -> None:
    try:
        if after_fork():
            logger.debug("mppools: after-fork handling run by uWSGI's post-fork hook in pid %d",
                         os.getpid())
    except Exception:  # a failing hook must not stop the worker; the limiter's pid check
        logger.exception("mppools: after-fork handling in uWSGI worker %d failed", os.getpid())


def _install_post_fork(server: Any) -> None:
    """Run :func:`_post_fork` first in every process uWSGI forks from this one.

    Through ``uwsgidecorators``' post-fork chain when that module exists: importing it later
    would replace ``uwsgi.post_fork_hook`` with its chain, dropping a hook chained by hand.
    Importing it replaces ``uwsgi.post_fork_hook`` and ``uwsgi.spooler``: a hook or spooler
    the app had set before is kept (the hook joins the chain, the spooler is put back).
    """
    previous: Callable[[], object] | None = getattr(server, "post_fork_hook", None)
    had_spooler = hasattr(server, "spooler")
    spooler = getattr(server, "spooler", None)
    fresh = "uwsgidecorators" not in sys.modules
    try:
        import uwsgidecorators
    except Exception:  # not shipped with this uWSGI: chain by hand
        uwsgidecorators = None
    chain = getattr(uwsgidecorators, "postfork_chain", None)
    if uwsgidecorators is not None and isinstance(chain, list):
        if fresh:
            if had_spooler:
                server.spooler = spooler
            if previous is not None and previous is not getattr(
                    uwsgidecorators, "postfork_chain_hook", None):
                chain.append(previous)
        chain.insert(0, _post_fork)
        return

    def chained() -> None:
        _post_fork()
        if previous is not None:
            previous()

    server.post_fork_hook = chained


def _detach_at_exit() -> None:
    """A worker leaves: give back its slots, never remove the budget (others use it)."""
    if _config.current() is None:
        return
    with contextlib.suppress(Exception):
        mppools.close(unlink=False)


def _install_exit_hooks(server: Any) -> None:
    """In every process that runs the app: detach without unlinking at a graceful exit.

    ``uwsgi.atexit`` runs in workers (never in the master) before the interpreter is
    finalized; the ``atexit`` registration, made after mppools' own, runs before it too, in
    case the app replaces ``uwsgi.atexit`` later.
    """
    global _exit_hooks_in
    if _exit_hooks_in == os.getpid():
        return
    _exit_hooks_in = os.getpid()
    previous: Callable[[], object] | None = getattr(server, "atexit", None)

    def chained() -> None:
        if os.getpid() != _master_pid(server):
            _detach_at_exit()
        if previous is not None:
            previous()

    def at_python_exit() -> None:
        if os.getpid() != _master_pid(server):
            _detach_at_exit()

    server.atexit = chained
    atexit.register(at_python_exit)


def _master_pid(server: Any) -> int:
    try:
        return int(server.masterpid())
    except Exception:
        return 0


def _worker_id(server: Any) -> int:
    try:
        return int(server.worker_id())
    except Exception:
        return 0


def _processes(server: Any) -> int:
    raw = _opt(server, "processes") or _opt(server, "workers") or 1
    if isinstance(raw, list):
        raw = raw[-1]
    try:
        return max(1, int(raw.decode() if isinstance(raw, bytes) else raw))
    except (TypeError, ValueError):
        return 1


def _cleanup_configured(server: Any) -> bool:
    for key in ("exec-as-user-atexit", "hook-as-user-atexit"):
        value = _opt(server, key)
        values = value if isinstance(value, list) else [value]
        for v in values:
            text = v.decode(errors="replace") if isinstance(v, bytes) else str(v or "")
            if "mppools" in text:
                return True
    return False


#: how long a worker keeps trying when another worker initializes the budget at that moment
JOIN_RACE_SECONDS = 5.0


def _forks_with_python(server: Any) -> bool:
    """True if this uWSGI holds the GIL across every fork and runs CPython's fork handling
    in the child before anything else touches the GIL: ``--py-call-uwsgi-fork-hooks``.
    Not ``--py-call-osafterfork``: it runs ``PyOS_AfterFork_Child`` in the worker's
    post-fork step, after a respawned worker has already taken the GIL (uWSGI's
    ``master_fixup``, with threads enabled), which a master thread holding it at the fork
    would leave taken."""
    return _flag(server, "py-call-uwsgi-fork-hooks")


def _refuse_threads(processes: int, kwargs: dict[str, Any]) -> None:
    """A master that forks from C without Python's fork handling runs no thread of ours
    (:func:`mppools._fork.forbid_threads`): a budget whose holder needs one is refused."""
    settings = _config._settings
    spec = kwargs.get("backend") or (settings.backend if settings is not None
                                     else _config.DEFAULT_BACKEND)
    if isinstance(spec, str) and _config.backend_for(spec).needs_threads:
        raise ConfigurationError(
            f"uWSGI forks its {processes} worker(s) from C without Python's fork handling, "
            "and a cross-host (redis) budget keeps a lease thread in the master: a worker "
            "forked while that thread waits for the GIL can hang at its first GIL hand-off; "
            "run uWSGI with --py-call-uwsgi-fork-hooks (or --lazy-apps)"
        )


def _configure(limit: int, name: str | None, kwargs: dict[str, Any], *,
               in_worker: bool) -> Limiter:
    """``mppools.configure``; in a worker, retried while another worker initializes the
    same budget at that very moment.

    Workaround: opening a budget drops its mutex after reading the header (a temporary mmap
    of the segment closes a dup of its fd, and closing any fd of a file releases the
    process's fcntl locks on it), so of 8 ``--lazy-apps`` workers configuring at once one
    may find the header not yet written while another one holds the creator token:
    ``BudgetInUseError("... has a live creator")``, which nothing else raises here.
    """
    deadline = time.monotonic() + JOIN_RACE_SECONDS
    attempt = 0
    while True:
        try:
            return mppools.configure(limit, name, **kwargs)
        except BudgetInUseError:
            attempt += 1
            if not in_worker or time.monotonic() > deadline:
                raise
            logger.info("mppools: budget %r is being initialized by another process; "
                        "retrying (%d)", name, attempt)
            time.sleep(min(0.005 * attempt, 0.1))


def setup(limit: int | None = None, name: str | None = None,
          **configure_kwargs: Any) -> Limiter | None:
    """Give this uWSGI instance one budget of ``limit`` broker connections.

    Call it at import of the module uWSGI loads. ``limit`` / ``name`` left as None are read
    from ``MPPOOLS_LIMIT`` / ``MPPOOLS_NAME``; ``configure_kwargs`` (``acquire_timeout``,
    ``idle_timeout``, ``hold_quantum``, ``capacity``, ``mode``, ``backend``, ``lend``) go to
    :func:`mppools.configure`, and default to ``MPPOOLS_ACQUIRE_TIMEOUT`` & co. A process
    that already has a budget keeps it. Returns the budget, or None (with a warning) when no
    limit is given anywhere: then mppools stays unconfigured (per-process pools, like
    kombu.pools).

    In a preforking master without ``--py-call-uwsgi-fork-hooks`` (uWSGI forks the workers
    from C) mppools runs no thread: the master keeps no idle connection (a release gives its
    slot back at once) and a keeper thread already running is stopped.

    Raises:
        ConfigurationError: an invalid setting; the app is loaded in the workers
            (``--lazy-apps``) and the budget has no name, so that every worker would make a
            budget of its own; ``backend="memory"`` (one budget per process) with more than
            one uWSGI process; a cross-host budget (it keeps a lease thread) in a master
            without ``--py-call-uwsgi-fork-hooks``; or what :func:`mppools.configure` raises.
    """
    global _hooks_installed_in
    limit, name, kwargs = settings_from_env(limit, name, configure_kwargs)
    server = _uwsgi()
    # a process forked by uWSGI after mppools was imported (a module the master imported,
    # then --lazy-apps): catch up on the fork handling first
    after_fork()
    if server is None:
        if limit is None:
            logger.warning("mppools: no limit (set MPPOOLS_LIMIT or setup(limit=...)): broker "
                           "connections are NOT limited")
            return _config.current()
        return mppools.configure(limit, name, **kwargs)
    mode = server_mode()
    worker = _worker_id(server)
    processes = _processes(server)
    in_worker = worker > 0
    if in_worker and name is None and _config.current() is None and limit is not None:
        why = ("--lazy-apps loads the app in every worker" if mode == "lazy"
               else f"setup() runs in uWSGI worker {worker}, after the fork")
        raise ConfigurationError(
            f"uWSGI: {why}, so each of the {processes} worker(s) would create a budget of "
            f"its own (up to {processes} x {limit} = {processes * limit} connections): give "
            "the budget a name (setup(limit, name=...) or MPPOOLS_NAME) so that the workers "
            "share one"
        )
    if kwargs.get("backend") == "memory" and processes > 1:
        raise ConfigurationError(
            f"uWSGI runs {processes} processes and backend='memory' keeps a budget inside "
            "one process: every process would have its own; use backend='posix'"
        )
    threadless = not in_worker and mode == "preforked" and not _forks_with_python(server)
    if threadless:
        _refuse_threads(processes, kwargs)
    limiter = _config.current()
    if limiter is None:
        if limit is None:
            logger.warning("mppools: no limit (set MPPOOLS_LIMIT or setup(limit=...)): broker "
                           "connections are NOT limited across uWSGI workers")
            return None
        limiter = _configure(limit, name, kwargs, in_worker=in_worker)
        logger.info("mppools: budget %r: at most %d broker connection(s) for all %d uWSGI "
                    "process(es) (%s, pid %d)", limiter.name, limiter.limit, processes,
                    mode, os.getpid())
    if threadless:
        _fork.forbid_threads()
        keeper().go_threadless()
        lender().stop()
    if _hooks_installed_in != os.getpid():
        _hooks_installed_in = os.getpid()
        if not in_worker:
            _install_post_fork(server)
            os.environ[ENV_MASTER] = str(os.getpid())
        _install_exit_hooks(server)
        if worker <= 1 and not _cleanup_configured(server):
            logger.warning(
                "mppools: uWSGI's master never runs Python's atexit, so budget %r stays in "
                "/dev/shm after uWSGI stops; add to the uWSGI configuration: "
                "exec-as-user-atexit = %s -m mppools.integrations.uwsgi cleanup %s",
                limiter.name, os.path.basename(sys.executable) or "python3", limiter.name)
    return limiter


def _processes_with_budget_open(name: str) -> list[int]:
    """Pids of other live processes (that this process may inspect) with the budget's
    segment or token file open: they still use it, even holding no slot."""
    from mppools._limiter.posix._names import shm_path, tokens_path

    targets = {shm_path(name), tokens_path(name)}
    me = os.getpid()
    found: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{entry}/fd/{fd}")
            except OSError:
                continue
            if link in targets:
                found.append(int(entry))
                break
    return sorted(found)


def _ancestors() -> set[int]:
    found: set[int] = set()
    pid = os.getppid()
    for _ in range(64):  # bounded: a process tree is never this deep here
        if pid <= 1 or pid in found:
            break
        found.add(pid)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                pid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return found


def _exiting_master() -> set[int]:
    """The uWSGI master that runs this cleanup as it exits (it exported its pid in
    ``setup``), if it is one of this process's ancestors."""
    raw = os.environ.get(ENV_MASTER, "").strip()
    if not raw.isdigit():
        return set()
    pid = int(raw)
    return {pid} if pid in _ancestors() else set()


def cleanup(name: str | None = None) -> bool:
    """Remove budget ``name`` (default ``MPPOOLS_NAME``) once no process uses it any more.

    For uWSGI's ``exec-as-user-atexit``: the master runs it as it exits or reloads, after its
    workers are gone. The exiting master itself (the ancestor whose pid :func:`setup`
    exported) does not count. Refused, changing nothing, while any other live process holds
    or waits for a slot, or has the budget open at all (found through ``/proc``: another
    master sharing the name, a celery worker, ``mppools status --watch``): removing it under
    them would let the next ``configure()`` create a second budget of the same name.
    Returns True if it removed the budget, False if there was none.

    Raises:
        ConfigurationError: no name given and ``MPPOOLS_NAME`` unset.
        BudgetInUseError: live processes still use the budget.
    """
    from mppools._limiter import posix

    name = name or os.environ.get("MPPOOLS_NAME", "").strip() or None
    if name is None:
        raise ConfigurationError("cleanup needs a budget name (argument or MPPOOLS_NAME)")
    if not posix.exists(name):
        return False
    exiting = _exiting_master()
    openers = [pid for pid in _processes_with_budget_open(name) if pid not in exiting]
    if openers:
        raise BudgetInUseError(
            f"budget {name!r} is still open in {len(openers)} live process(es): pids "
            f"{', '.join(map(str, openers))}; not removed"
        )
    try:
        limiter = posix.PosixLimiter.open(name, create=False)
    except BudgetNotFoundError:
        return False
    try:
        # holders and waiters in PID namespaces /proc does not show are found by their tokens
        users = sorted(limiter.live_users() - exiting - {os.getpid()})
        if users:
            raise BudgetInUseError(
                f"budget {name!r} still has slots held or awaited by {len(users)} live "
                f"process(es): pids {', '.join(map(str, users))}; not removed"
            )
        limiter.unlink(force=True)  # only the exiting master may still hold slots
    finally:
        limiter.close()
    return True


def main(argv: list[str] | None = None) -> int:
    """``python -m mppools.integrations.uwsgi cleanup [NAME]``: exit 0 when the budget is
    gone, 1 while it is in use, 2 on a bad argument."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "cleanup" or len(args) > 2:
        print("usage: python -m mppools.integrations.uwsgi cleanup [NAME]", file=sys.stderr)
        return 2
    try:
        removed = cleanup(args[1] if len(args) == 2 else None)
    except BudgetInUseError as exc:
        print(f"mppools: {exc}", file=sys.stderr)
        return 1
    except mppools.MppoolsError as exc:
        print(f"mppools: {exc}", file=sys.stderr)
        return 2
    name = args[1] if len(args) == 2 else os.environ.get("MPPOOLS_NAME", "")
    print(f"mppools: budget {name!r} {'removed' if removed else 'already gone'}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One budget across hosts: this host's POSIX budget, lent out under leases from Redis.

Each host keeps its local :class:`~mppools._limiter.posix.PosixLimiter` (crash safety and
speed as on one host: a dead worker's slot comes back in milliseconds, the warm path touches
no lock and no network). Its *effective* limit is the number of leases the host holds from
the coordination Redis (:class:`~mppools._limiter.redis._lease.LeaseClient`). Only the
host's master, the process that configured the budget, talks to Redis about leases: its
*lease keeper* thread

* renews the host's leases every ``ttl / 3``;
* borrows leases when local processes wait for a slot and none is free, and grows the local
  limit by what it got (the local protocol then hands the new slots to the waiters, first
  come first served);
* gives leases back when local slots sit free while other hosts wait (and when a shrink left
  more leases than the local limit);
* fences: once no renewal can be confirmed before the fencing deadline any more (the time
  left is less than one call timeout plus one borrowing wait), or when Redis says leases
  were lost, it shrinks the local limit with ``force`` to what is still safely held. The
  fencing deadline (:attr:`LeaseClient.deadline`) lies ``fence_margin`` plus the last round
  trip before the lease expires in the server's clock, so the shrink happens before any
  other host can be granted those leases.

The local budget's limit is ``leases + 1``: the master holds one local slot itself for the
life of the budget (the *plug*), so that a host holding no lease has no free slot (a POSIX
limit is at least 1). Stats, errors and :attr:`RedisLimiter.limit` never show the plug.

What fencing guarantees, and what not
-------------------------------------
A forced shrink makes the local budget *in debt*: nothing is handed out on this host until
enough slots are given back, and the pools close a connection at its next use or release
instead of pooling it; keepers close idle pooled connections at once. So after a fence

* no new connection is opened on this host under the lost leases (fenced at once);
* an idle pooled connection is closed by its process's keeper within its wake-up (about
  milliseconds, it is told through the local pressure byte and yield requests);
* a connection *in active use* (checked out, between acquire and release) is cut: the
  fence sends its process's keeper a sever request, and ``SEVER_GRACE``
  (50 ms) later, if the budget is still in debt, its sockets are shut down (the broker sees
  it closed; the holder's next I/O fails and cannot reconnect underneath mppools) and it is
  closed at its release. Between the fence and the lease's expiry there are at least
  ``fence_margin + call timeout + borrowing wait`` (1.6 s with the default 10 s TTL, 0.7 s
  with a 2 s TTL). Not covered: a connection of the fencing process itself (the master
  does not publish in the supported setups) and a transport whose sockets cannot be found.

A master that is stopped, hung or dead cannot fence: its child, the lease watchdog
(``_watchdog``), fences in its place at the deadline the master publishes (or at once when
the master is gone). A dead master takes its own local slot (the plug) with it; the
watchdog then holds a slot in its place until no other process of the host has the budget
open or a new master took over.

Wake-ups: the lease keeper sleeps until its next renewal, its next look at the other hosts
(:data:`CHECK_EVERY`, only while it holds leases) or its fencing time, at most :data:`IDLE_WAKE`.
A process of the host that finds no free local slot pokes it first (a datagram to the path
socket ``r-leases`` in the budget's 0700 directory) and then waits; the lease keeper then
looks for local waiters every :data:`POLL` for as long as any wait (and :data:`EAGER` after a
poke, for the waiter to register). Borrowing latency: a poke, then one Redis round trip (more
if other hosts are ahead in the queue).

The backend spec is a redis-py URL (``redis://``, ``rediss://``, ``unix://``) or
``redis+sentinel://host:port[,host:port]/service[/db]``; two query parameters are mppools'
own and are removed before the URL reaches redis-py: ``lease_ttl`` (seconds, default 10) and
``fresh=1`` (a budget created on this server skips its grace period: only for a server known
to be new, e.g. in tests).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from typing import Any

from mppools import _fork
from mppools._errors import (
    BudgetInUseError,
    BudgetNotFoundError,
    ConfigurationError,
    CoordinationError,
    LeaseLostError,
    LimitExceeded,
    MppoolsError,
)
from mppools._limiter._base import (
    AuditReport,
    BudgetStats,
    HolderStats,
    Limiter,
    Offer,
    Slot,
    WaitHook,
)
from mppools._limiter.posix import DEFAULT_CAPACITY, PosixLimiter
from mppools._limiter.posix import default_name as posix_default_name
from mppools._limiter.posix import validate_name as posix_validate_name
from mppools._limiter.posix._names import rendezvous_dir
from mppools._validate import MAX_CAPACITY, check_limit, check_wait_timeout

from . import _names
from ._lease import LeaseClient
from ._watchdog import Board

__all__ = ["POLL", "SCHEMES", "RedisLimiter", "backend_of", "default_name", "parse_spec",
           "validate_name"]

logger = logging.getLogger("mppools")

#: the URL schemes of the redis backend
SCHEMES = ("redis", "rediss", "unix", "redis+sentinel")
#: how often the lease keeper looks for local waiters while any wait (seconds)
POLL = 0.005
#: how long the lease keeper keeps looking every POLL after a poke (seconds)
EAGER = 0.25
#: the longest the lease keeper sleeps when nothing is due (seconds)
IDLE_WAKE = 1.0
#: the lease keeper's wake-up socket, in the local budget's rendezvous directory
WAKE_SOCKET = "r-leases"
#: the master's backend spec, for ``mppools status`` (0600, in the same 0700 directory)
SPEC_FILE = "r-backend"

#: how often the lease keeper looks at other hosts' queue to give back free leases (seconds)
CHECK_EVERY = 0.1
#: how long one borrowing attempt of the lease keeper may wait in the queue (seconds)
BORROW_WAIT = 0.1
#: with more hosts wanting leases than the limit (a fair share below one lease), how long a
#: host keeps a lease while others wait before it hands one on (seconds): hosts take turns
HOST_TURN = 1.0
DEFAULT_TTL = 10.0


def _spec_file(name: str) -> tuple[str, str] | None:
    """(backend spec, host id) as this host's master wrote them."""
    try:
        with open(f"{rendezvous_dir(name)}/{SPEC_FILE}", encoding="utf-8") as f:
            spec, _, host_id = f.read().strip().partition("\n")
    except (OSError, UnicodeDecodeError):
        return None
    return (spec, host_id) if spec.partition("://")[0] in SCHEMES else None


def backend_of(name: str) -> str | None:
    """The backend spec the master of this host's budget ``name`` configured, if it is a
    cross-host budget (None: a POSIX budget, or none)."""
    found = _spec_file(name)
    return found[0] if found else None


def validate_name(name: object) -> str:
    """A name both this host's POSIX budget and the coordination server can hold."""
    posix_validate_name(name)
    return _names.validate_name(name)


def default_name() -> str:
    return posix_default_name()


def parse_spec(spec: str) -> tuple[str, float, bool]:
    """``(url for redis-py, lease ttl, fresh)`` from a backend spec.

    Raises:
        ConfigurationError: not a redis URL, or a bad ``lease_ttl`` / ``fresh``.
    """
    scheme = spec.partition("://")[0]
    if scheme not in SCHEMES or "://" not in spec:
        raise ConfigurationError(f"backend {spec!r} is not a redis URL ({', '.join(SCHEMES)})")
    parts = urllib.parse.urlsplit(spec)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    ttl, fresh = DEFAULT_TTL, False
    rest: list[tuple[str, str]] = []
    for key, value in query:
        if key == "lease_ttl":
            try:
                ttl = float(value)
            except ValueError:
                raise ConfigurationError(f"lease_ttl={value!r} in backend is not a number of "
                                         "seconds") from None
        elif key == "fresh":
            if value not in ("0", "1"):
                raise ConfigurationError(f"fresh={value!r} in backend must be 0 or 1")
            fresh = value == "1"
        else:
            rest.append((key, value))
    url = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(rest)))
    return url, ttl, fresh


class RedisLimiter(Limiter):
    """One budget shared by every process of every host that configures the same name and
    coordination server: this host's POSIX budget, its limit the host's leases."""

    backend = "redis"

    def __init__(self, name: str, spec: str, url: str, ttl: float, local: PosixLimiter,
                 lease: LeaseClient | None, capacity: int) -> None:
        super().__init__(name)
        self.spec = spec
        self._url = url
        self._ttl = ttl
        self._local = local
        self._capacity = capacity
        #: the master's lease client (None in every other process: they never touch leases)
        self._lease = lease
        self._master_pid = os.getpid() if lease is not None else 0
        self._plug: Slot | None = None
        self._plug_pid = local.stats().creator_pid
        self._probe: LeaseClient | None = None  # read-only client of a non-master process
        self._limit_seen = lease.limit if lease is not None else 0
        self._server = lease.server if lease is not None else ""
        self._health: CoordinationError | None = None
        self._lock = threading.RLock()  # serializes the keeper's steps and resize()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        #: the master's wake-up socket (bound), and this process's socket to poke it
        self._wake: socket.socket | None = None
        self._poker: socket.socket | None = None
        self._poker_pid = 0
        self.pokes = 0
        #: the fencing deadline published for the watchdog process, and that process
        self._board: Board | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        #: how many times the lease keeper woke up (a poke, something due, or a poll)
        self.wakes = 0
        #: when the lease keeper last got a lease granted (monotonic; hosts take turns)
        self._granted_at = 0.0
        #: how many times, and when last (monotonic), the lease keeper fenced this host
        self.fences = 0
        self.fenced_at: float | None = None

    # opening -------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        spec: str,
        name: str,
        *,
        create: bool,
        limit: int | None = None,
        capacity: int | None = None,
        acquire_timeout: float | None = 10.0,
        idle_timeout: float | None = None,
        mode: int = 0o600,
        exclusive: bool = False,
        hold_quantum: float = 0.0,
    ) -> RedisLimiter:
        """Open this host's part of the cross-host budget ``name`` on ``spec``.

        With ``create`` (the host's master) it joins or creates the budget on the coordination
        server, creates this host's local budget, starts the lease keeper and borrows what it
        can at once; without, it joins the local budget a live master made.

        Raises:
            CoordinationError: ``create`` and the coordination server cannot be reached.
            BudgetNotFoundError: not ``create`` and this host has no such budget.
            ConfigurationError: a bad spec, name or option.
        """
        validate_name(name)
        url, ttl, fresh = parse_spec(spec)
        if not create:
            local = PosixLimiter.open(name, create=False)
            cap = max(1, local.stats().extra.get("capacity", 2) - 1)  # type: ignore[operator]
            self = cls(name, spec, url, ttl, local, None, int(cap))
            self._limit_seen = max(0, local.limit - 1)
            return self
        assert limit is not None
        _let_go_retained(name)
        _refuse_a_second_master(name)
        cap = capacity if capacity is not None else max(DEFAULT_CAPACITY, limit)
        if cap + 1 > MAX_CAPACITY:
            raise ConfigurationError(f"capacity {cap} leaves no room for the lease keeper's "
                                     f"slot: at most {MAX_CAPACITY - 1} with this backend")
        lease = LeaseClient(url, name, _names.default_host_id(), ttl=ttl, limit=limit,
                            fresh=fresh)
        try:
            lease.join()
            if lease.limit > cap:
                raise ConfigurationError(
                    f"budget {name!r} on {lease.server} has limit {lease.limit}, above the "
                    f"capacity {cap} of this host")
            if lease.limit != limit:
                logger.warning("mppools: budget %r on %s keeps its limit %d (asked for %d)",
                               name, lease.server, lease.limit, limit)
            local = PosixLimiter.open(name, create=True, limit=1, capacity=cap + 1,
                                      acquire_timeout=acquire_timeout,
                                      idle_timeout=idle_timeout, mode=mode,
                                      exclusive=exclusive, hold_quantum=hold_quantum)
        except BaseException:
            lease.close()
            raise
        self = cls(name, spec, url, ttl, local, lease, cap)
        try:
            if local.limit != 1:
                local.resize(1, force=True)  # a recovered local budget: this host holds nothing
            self._plug = local.acquire(block=False)
            with contextlib.suppress(LimitExceeded):
                self._borrow(lease.limit, timeout=0.0)
        except BaseException:
            self.close()
            raise
        self._start()
        return self

    # the lease keeper (master only) ----------------------------------------------------------
    def _is_master(self) -> bool:
        return self._lease is not None and os.getpid() == self._master_pid and not self._closed

    def _wake_path(self) -> str:
        return f"{rendezvous_dir(self.name)}/{WAKE_SOCKET}"

    def _start(self) -> None:
        with contextlib.suppress(OSError):
            spec_path = f"{rendezvous_dir(self.name)}/{SPEC_FILE}"
            fd = os.open(spec_path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                assert self._lease is not None
                os.write(fd, f"{self.spec}\n{self._lease.host_id}\n".encode())
            finally:
                os.close(fd)
            os.replace(spec_path + ".tmp", spec_path)
        self._start_watchdog()
        path = self._wake_path()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # a dead master's
            sock.bind(path)
            sock.setblocking(False)
        except OSError:
            sock.close()  # no wake-ups: the lease keeper looks every POLL instead
            logger.warning("mppools: budget %r: no wake-up socket at %s, polling", self.name,
                           path)
        else:
            self._wake = sock
        self._thread = threading.Thread(target=self._run, name=f"mppools-leases-{self.name}",
                                        daemon=True)
        self._thread.start()

    def _start_watchdog(self) -> None:
        """Publish the fencing deadline and start the process that fences this host if the
        master cannot (stopped, hung or dead: see ``_watchdog``)."""
        try:
            self._board = Board(self.name)
        except OSError as exc:
            logger.warning("mppools: budget %r: no fencing deadline board (%s): a stopped "
                           "master will not be fenced", self.name, exc)
            return
        self._publish()
        python = python_executable()
        if python is None:
            logger.warning("mppools: budget %r: no lease watchdog (no python executable "
                           "found beside %r or in %r): a stopped master will not be fenced",
                           self.name, sys.executable, sys.exec_prefix)
            return
        import mppools

        root = os.path.dirname(os.path.dirname(os.path.abspath(mppools.__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        try:
            self._watchdog = subprocess.Popen(
                [python, "-m", "mppools._limiter.redis._watchdog", self.name,
                 str(os.getpid())], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                env=env, close_fds=True)
        except OSError as exc:
            logger.warning("mppools: budget %r: no lease watchdog (%s): a stopped master will "
                           "not be fenced", self.name, exc)

    def _publish(self, *, lending: bool = False) -> None:
        """Tell the watchdog the deadline of what this host lends out (0: nothing), or is
        about to (``lending``)."""
        board, lease = self._board, self._lease
        if board is not None and lease is not None:
            with contextlib.suppress(MppoolsError, ValueError, OSError):
                board.write(lease.deadline if lending or self._local.limit > 1 else None)

    def _poke(self) -> None:
        """Tell this host's lease keeper that a process is about to wait (best effort)."""
        pid = os.getpid()
        if self._poker is None or self._poker_pid != pid:
            self._poker = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._poker.setblocking(False)
            self._poker_pid = pid
        with contextlib.suppress(OSError):
            self._poker.sendto(b"w", self._wake_path())
            self.pokes += 1

    def _sleep(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for a poke; True if poked."""
        sock = self._wake
        if sock is None:
            self._stop.wait(min(timeout, POLL))
            return False
        try:
            ready, _, _ = select.select([sock], [], [], max(0.0, timeout))
        except (OSError, ValueError):  # closed meanwhile
            self._stop.wait(min(timeout, POLL))
            return False
        if not ready:
            return False
        with contextlib.suppress(OSError):
            for _ in range(1024):  # drain
                sock.recv(16)
        return True

    def _next_wake(self, now: float, next_renew: float, next_check: float,
                   eager_until: float) -> float:
        """Seconds the lease keeper may sleep."""
        lease = self._lease
        assert lease is not None
        if now < eager_until or (self._local.waiting_flag() and not self._local.in_debt()):
            return POLL
        due = min(next_renew, now + IDLE_WAKE)
        if lease.held:
            due = min(due, next_check)
            if lease.deadline is not None:
                due = min(due, lease.deadline - lease.op_timeout - BORROW_WAIT - 2 * POLL)
        return max(0.0, due - now)

    def _run(self) -> None:
        lease = self._lease
        assert lease is not None
        next_renew = time.monotonic() + self._ttl / 3
        next_check = 0.0
        eager_until = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if self._sleep(self._next_wake(now, next_renew, next_check, eager_until)):
                eager_until = time.monotonic() + EAGER
            self.wakes += 1
            if self._stop.is_set():
                return
            try:
                with self._lock:
                    if self._closed:
                        return
                    self._fence_if_due()
                    now = time.monotonic()
                    if now >= next_renew:
                        renewed = self._renew()
                        # a failed renewal is retried soon: the deadline is near
                        next_renew = now + (self._ttl / 3 if renewed
                                            else min(self._ttl / 10, 0.5))
                    if now >= next_check:
                        next_check = now + CHECK_EVERY
                        self._fence_if_due()
                        self._balance(give_back=True)
                    self._fence_if_due()
                if self._local.waiting_flag() and not self._local.in_debt():
                    with self._lock:
                        if not self._closed:
                            self._fence_if_due()
                            self._borrow_for_waiters()
                self._publish()
            except Exception:  # pragma: no cover - the keeper must outlive any one failure
                logger.exception("mppools: lease keeper of budget %r", self.name)

    def _fence_if_due(self) -> None:
        """Fence before the deadline, not after it: once the next call to the server could
        block past the deadline (its timeout, plus a borrowing wait), the leases count as
        lost here. A renewal that succeeds after all only costs a round of borrowing."""
        lease = self._lease
        assert lease is not None
        deadline = lease.deadline
        if deadline is not None and (time.monotonic() + lease.op_timeout + BORROW_WAIT + POLL
                                     >= deadline):
            self._fence(0, f"its leases could not be renewed on {lease.server} in time for "
                           f"the fencing deadline (ttl {lease.ttl:.3f} s)")

    def _renew(self) -> bool:
        """Renew the host's leases; False if the server failed (retry soon)."""
        assert self._lease is not None
        try:
            self._lease.renew(self._local_figures())
        except LeaseLostError as exc:
            self._fence(exc.held, str(exc))
            return True
        except CoordinationError as exc:
            self._health = exc
            return False
        self._health = None
        self._limit_seen = self._lease.limit
        if self._lease.held > self._lease.limit:  # a forced shrink, seen from another process
            self._fence(self._lease.limit, f"the limit is now {self._lease.limit}")
        return True

    def _fence(self, keep: int, why: str) -> None:
        """Shrink the local limit to ``keep`` leases with force (debt: pools close their
        connections at the next use, keepers their idle ones)."""
        if self._local.limit - 1 > keep:
            logger.warning("mppools: budget %r fenced to %d slot(s) on this host: %s",
                           self.name, keep, why)
            self._local.resize(keep + 1, force=True)
            # connections in use are cut too, if still in use after a grace: their leases
            # will not be renewed
            with contextlib.suppress(MppoolsError):
                self._local.sever_excess()
            self.fences += 1
            self.fenced_at = time.monotonic()
            self._publish()

    def _local_figures(self) -> tuple[int, int, int] | None:
        """(slots in use, idle among them, processes waiting) on this host, without the plug;
        None if the local budget cannot be read."""
        try:
            local = self._local.stats()
        except MppoolsError:
            return None
        idle = sum(h.idle for h in local.holders if h.alive)
        if self._plug is not None and any(h.pid == self._plug_pid and not h.busy
                                          for h in local.holders):
            idle -= 1  # the plug reads as idle when its holder has nothing busy
        in_use = max(0, local.in_use - (1 if self._plug is not None else 0))
        return in_use, max(0, min(idle, in_use)), local.waiting

    def _used(self) -> int:
        """Slots in use on this host (without the plug)."""
        return max(0, self._local.stats().in_use - (1 if self._plug is not None else 0))

    def _borrow(self, n: int, timeout: float) -> int:
        """Lease up to ``n`` more slots and grow the local limit by what was granted."""
        lease = self._lease
        assert lease is not None
        room = self._capacity - (self._local.limit - 1)
        n = min(n, room, max(0, lease.limit - lease.held))
        if n <= 0:
            return 0
        try:
            got = lease.acquire(n, timeout, partial=True)
        except CoordinationError as exc:
            self._health = exc
            raise
        except LeaseLostError as exc:
            self._fence(exc.held, str(exc))
            return 0
        self._health = None
        self._limit_seen = lease.limit
        if got:
            self._publish(lending=True)  # the watchdog knows of them before they are lent
            self._granted_at = time.monotonic()
        self._local.resize(self._local.limit + got)
        return got

    def _borrow_for_waiters(self) -> None:
        stats = self._local.stats()
        free = stats.limit - stats.in_use
        wanted = stats.waiting - max(free, 0)
        if wanted > 0:
            with contextlib.suppress(LimitExceeded):
                self._borrow(wanted, BORROW_WAIT)

    def _balance(self, *, give_back: bool) -> None:
        """Give back leases the local limit no longer covers. With ``give_back``, when other
        hosts wait or the hosts hold more than the limit (after a forced shrink): free local
        slots nobody uses go back at once, and a host above its fair share (the limit over
        the hosts holding or waiting) hands one busy slot on per call (a forced shrink by
        one: the next release, or an idle connection's keeper, pays it). With more hosts
        wanting leases than the limit (a share below one lease) the holder whose leases were
        granted or renewed the longest ago hands one on once it has kept it for
        :data:`HOST_TURN` while others wait: hosts take turns."""
        lease = self._lease
        assert lease is not None
        if give_back and lease.held:
            try:
                seen = lease.stats()
            except CoordinationError as exc:
                self._health = exc
            else:
                over = seen.in_use > seen.limit  # a forced shrink: every host pays its part
                if over or any(w.host != lease.host_id for w in seen.waiting):
                    self._shrink_free()
                    hosts = {h.host for h in seen.hosts} | {w.host for w in seen.waiting}
                    share = max(1, -(-seen.limit // max(1, len(hosts))))
                    mine = self._local.limit - 1
                    if mine > share and mine >= self._used() and not self._local.in_debt():
                        self._local.resize(mine, force=True)  # limit - 1 leases + the plug
                    elif (mine >= 1 and len(hosts) > seen.limit and not self._local.in_debt()
                          and time.monotonic() - self._granted_at >= HOST_TURN
                          and any(w.host != lease.host_id for w in seen.waiting)
                          and seen.hosts and min(seen.hosts, key=lambda h: h.expires_at).host
                          == lease.host_id):
                        self._local.resize(mine, force=True)  # one lease to the next host
                        self._granted_at = time.monotonic()
        used = self._used()
        keep = max(self._local.limit - 1, used)
        if lease.held > keep:
            with contextlib.suppress(CoordinationError):
                lease.release(lease.held - keep)

    def _shrink_free(self) -> None:
        """Lower the local limit to the slots in use (no force: a slot taken meanwhile makes
        this a no-op for now)."""
        local = self._local
        stats = local.stats()
        if stats.waiting == 0 and stats.in_use < stats.limit:
            with contextlib.suppress(BudgetInUseError):
                local.resize(max(1, stats.in_use))

    # the interface ---------------------------------------------------------------------------
    def _coordination(self) -> LeaseClient:
        """The master's client, or this process's own read-only one."""
        if self._is_master():
            assert self._lease is not None
            return self._lease
        if self._probe is None or self._probe_pid != os.getpid():
            host = _names.default_host_id()
            self._probe = LeaseClient(self._url, self.name, f"{host}-probe", ttl=self._ttl)
            self._probe_pid = os.getpid()
            self._server = self._probe.server
        return self._probe

    _probe_pid = 0

    def _plug_of(self, holders: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
        out = []
        for pid, n in holders:
            mine = n - 1 if pid == self._plug_pid else n
            if mine > 0:
                out.append((pid, mine))
        return tuple(out)

    def acquire(self, *, block: bool = True, timeout: float | None = None,
                on_wait: WaitHook | None = None) -> Slot:
        timeout = check_wait_timeout(timeout)
        try:
            if not block or timeout == 0 or self._local.waiting_flag():
                # others wait already: the lease keeper is looking every POLL
                slot = self._local.acquire(block=block, timeout=timeout, on_wait=on_wait)
            else:
                try:
                    slot = self._local.acquire(block=False)
                except LimitExceeded:
                    self._poke()  # no free local slot: the lease keeper may borrow one
                    slot = self._local.acquire(block=True, timeout=timeout, on_wait=on_wait)
        except LimitExceeded as exc:
            raise self._exceeded(exc, block=block) from None
        if self._plug_pid and not self._is_master() and not _alive(self._plug_pid):
            # nobody renews this host's leases any more: they expire, other hosts take them
            self._local.release(slot)
            raise LimitExceeded(
                f"no slot of budget {self.name!r}: this host's lease keeper (the master, pid "
                f"{self._plug_pid}) is gone, its leases lapse", name=self.name,
                limit=self.limit)
        return slot

    def _exceeded(self, exc: LimitExceeded, *, block: bool) -> LimitExceeded:
        health = self._health if self._is_master() else None
        if block and health is None and not self._is_master():
            try:
                self._coordination().stats()
            except CoordinationError as failure:
                health = failure
        if block and health is not None:
            return CoordinationError(
                f"no slot of budget {self.name!r} after {exc.waited:.2f} s: coordination "
                f"server {health.server} failed ({health.operation}): {health} ",
                name=self.name, limit=self.limit, waited=exc.waited, server=health.server,
                operation=health.operation, deadline=health.deadline)
        holders = self._plug_of(exc.holders)
        held = sum(n for _, n in holders)
        who = ", ".join(f"pid {pid} ({n})" for pid, n in holders) or "nobody"
        how = "at once (block=False)" if not block else f"after {exc.waited:.2f} s"
        return LimitExceeded(
            f"no free slot in budget {self.name!r} (limit {self.limit} across hosts) {how}: "
            f"{held} held on this host by {who}; this host leases {self._local.limit - 1}",
            name=self.name, limit=self.limit, waited=exc.waited, holders=holders)

    def release(self, slot: Slot) -> None:
        self._local.release(slot)

    def mark_idle(self, slot: Slot) -> None:
        self._local.mark_idle(slot)

    def mark_busy(self, slot: Slot) -> None:
        self._local.mark_busy(slot)

    def cells(self, slot: Slot) -> tuple[memoryview, int, int] | None:
        return self._local.cells(slot)

    def under_pressure(self) -> bool:
        return self._local.under_pressure()

    def waiting_flag(self) -> bool:
        """True if a process of this host waits, or the host is in debt (other hosts wait
        for the leases it must give back, or it was fenced): keepers honour yield
        requests then, so idle connections go at once."""
        return self._local.waiting_flag() or self._local.in_debt()

    def in_debt(self) -> bool:
        return self._local.in_debt()

    @property
    def idle_timeout(self) -> float | None:
        return self._local.idle_timeout

    @property
    def hold_quantum(self) -> float:
        return self._local.hold_quantum

    @property
    def acquire_timeout(self) -> float | None:
        return self._local.acquire_timeout

    def handover_cost(self) -> float:
        return self._local.handover_cost()

    def note_handover_cost(self, seconds: float) -> None:
        self._local.note_handover_cost(seconds)

    def use_rate(self) -> float:
        return self._local.use_rate()

    def note_use_rate(self, per_second: float) -> None:
        self._local.note_use_rate(per_second)

    def note_yield(self) -> None:
        self._local.note_yield()

    @property
    def limit(self) -> int:
        """The budget's limit across hosts, as last seen from the coordination server."""
        if self._is_master():
            assert self._lease is not None
            return self._lease.limit
        return self._limit_seen

    def audit(self) -> AuditReport:
        return self._local.audit()

    def resize(self, limit: int, *, force: bool = False) -> None:
        """Change the limit across hosts. Growing: hosts borrow the new leases as their
        processes wait (this host at once). Shrinking with ``force`` below what the hosts
        hold: every master notices at its next look at the server (within
        :data:`CHECK_EVERY` plus a round trip) and shrinks its local limit to its share; until
        then a host may still hand out the slots it held.

        Raises:
            BudgetInUseError: shrinking below the slots in use on all hosts without ``force``.
            ConfigurationError: ``limit`` is not a positive int within the capacity.
            CoordinationError: the coordination server failed.
        """
        check_limit(limit)
        if limit > self._capacity:
            raise ConfigurationError(
                f"limit {limit} is above the capacity {self._capacity} of budget "
                f"{self.name!r}; configure it with a larger capacity")
        with self._lock:
            client = self._coordination()
            master = self._is_master()
            old = self.limit
            if master and limit < old:
                self._shrink_free()
                self._balance(give_back=False)
            try:
                client.resize(limit, force=force)
            except BudgetInUseError:
                used = client.stats().in_use
                raise BudgetInUseError(
                    f"can't shrink budget {self.name!r} when in use: was={old} now={limit}, "
                    f"{used} slots in use across hosts") from None
            self._limit_seen = limit
            if master:
                assert self._lease is not None
                if self._lease.held > limit:
                    self._fence(limit, f"resized to {limit} with force")
                elif limit > old:
                    with contextlib.suppress(LimitExceeded):
                        self._borrow(limit - old, timeout=0.0)

    def stats(self) -> BudgetStats:
        """This host's view of the budget: ``limit`` is the limit across hosts; ``in_use``,
        ``holders`` and ``waiters`` are this host's; ``free`` counts the free leased slots of
        this host plus the leases no host holds; ``extra`` has the cross-host picture."""
        local = self._local.stats()
        plug = 1 if (self._plug_pid and any(h.pid == self._plug_pid and h.alive
                                            for h in local.holders)) else 0
        holders: list[HolderStats] = []
        for h in local.holders:
            if plug and h.pid == self._plug_pid:
                busy = h.busy - 1 if h.busy else h.busy
                idle = h.idle if h.busy else h.idle - 1
                if h.slots - 1 > 0:
                    holders.append(HolderStats(host=h.host, pid=h.pid, slots=h.slots - 1,
                                               idle=idle, busy=busy, since=h.since,
                                               alive=h.alive))
                continue
            holders.append(h)
        in_use = local.in_use - plug
        local_limit = local.limit - 1
        extra: dict[str, object] = {"local_limit": local_limit, **local.extra}
        limit, unleased = self.limit, 0
        try:
            lease = self._coordination().stats()
        except CoordinationError as exc:
            extra.update(coordination=str(exc), server=exc.server)
        else:
            limit = lease.limit or limit
            self._limit_seen = limit
            unleased = max(0, lease.limit - lease.in_use)
            extra.update(
                coordination="ok", server=lease.server, generation=lease.generation,
                leases_in_use=lease.in_use, grace_left=lease.grace_left,
                hosts=tuple((h.host, h.held, round(h.expires_in, 3)) for h in lease.hosts),
                host_details=tuple(
                    {"host": h.host, "held": h.held, "expires_in": round(h.expires_in, 3),
                     "in_use": h.in_use, "idle": h.idle, "waiting": h.waiting,
                     "reported_ago": h.reported_ago,
                     "waits_for_leases": any(w.host == h.host for w in lease.waiting)}
                    for h in lease.hosts),
                rtt=round(lease.rtt, 6),
                waiting_hosts=tuple(w.host for w in lease.waiting))
        if not self._is_master() and (found := _spec_file(self.name)) is not None:
            extra.update(host_id=found[1])
        if self._lease is not None and self._is_master():
            extra.update(host_id=self._lease.host_id, leases_held=self._lease.held,
                         deadline_in=None if self._lease.deadline is None
                         else self._lease.deadline - time.monotonic(), fences=self.fences,
                         fenced_at=self.fenced_at, keeper_wakes=self.wakes)
        return BudgetStats(
            name=self.name, backend=self.backend, host=local.host, limit=limit,
            in_use=in_use, free=max(local_limit - in_use, 0) + unleased,
            waiting=local.waiting, debt=max(in_use - local_limit, 0), holders=tuple(holders),
            waiters=local.waiters, creator_pid=local.creator_pid, created_at=local.created_at,
            acquired_total=max(0, local.acquired_total - plug),
            reclaimed_total=local.reclaimed_total, timeouts_total=local.timeouts_total,
            acquire_timeout=local.acquire_timeout, idle_timeout=local.idle_timeout,
            hold_quantum=local.hold_quantum, extra=extra)

    def unlink(self, *, force: bool = False) -> None:
        """Remove this host's local budget (the budget on the coordination server stays:
        other hosts may use it; this host's leases are given back at :meth:`close`)."""
        self._local.unlink(force=force)

    def keeper_address(self) -> str | bytes | None:
        return self._local.keeper_address()

    def lend_address(self) -> str | None:
        return self._local.lend_address()

    def lenders(self) -> list[str]:
        return self._local.lenders()

    def offer_loan(self, ticket: int, wants: int) -> Offer:
        return self._local.offer_loan(ticket, wants)

    def is_creator(self) -> bool:
        return self._local.is_creator()

    def after_fork_in_child(self) -> None:
        # the lease keeper thread and the master's lease client stay the parent's
        if self._wake is not None:
            with contextlib.suppress(OSError):
                self._wake.close()  # our copy only: the parent's stays bound
            self._wake = None
        self._board = None  # the master's (its mapping is shared: never written here)
        self._watchdog = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread = None
        self._health = None

    def close(self) -> None:
        """Stop the lease keeper and detach. In the master: the local limit drops to zero
        at once (connections still open close at their next use), the leases nobody uses
        go back now, the others lapse one TTL after the last renewal."""
        if self._closed:
            return
        master = self._is_master()
        # workers (or others) still have this host's budget open: they must get no slot
        # once the leases lapse, so the plug stays held while this process lives, and the
        # watchdog stands in for it when it is gone (before: the plug went back at once and
        # a worker could keep a connection for ever with no lease behind it)
        retain = master and self._local.opened_elsewhere()
        self._stop.set()
        thread = self._thread
        if master and thread is not None and thread is not threading.current_thread():
            self._poke()
            thread.join(5)
        if master:
            with contextlib.suppress(OSError):
                os.unlink(f"{rendezvous_dir(self.name)}/{SPEC_FILE}")
            if retain:
                if self._board is not None:
                    with contextlib.suppress(MppoolsError, ValueError, OSError):
                        self._board.write(None)  # nothing lent out; stand in at our exit
            else:
                if self._board is not None:
                    self._board.close()  # -1: the watchdog exits
                    self._board = None
                watchdog, self._watchdog = self._watchdog, None
                _stop_watchdog(watchdog)
        if master and self._wake is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._wake_path())  # one master per budget and host: ours
            with contextlib.suppress(OSError):
                self._wake.close()
            self._wake = None
        if self._poker is not None and self._poker_pid == os.getpid():
            self._poker.close()
        self._poker = None
        with self._lock:
            self._closed = True
            if master:
                lease = self._lease
                assert lease is not None
                with contextlib.suppress(MppoolsError, ValueError):
                    used = self._used()
                    self._local.resize(1, force=True)  # the plug only: nothing to hand out
                    with contextlib.suppress(CoordinationError):
                        lease.release(lease.held - min(used, lease.held))
                lease.close(release=False)
            if self._probe is not None and self._probe_pid == os.getpid():
                self._probe.close(release=False)
            self._probe = None
        if retain and self._plug is not None:
            _retained[self.name] = _Retained(self._local, self._plug, self._board,
                                             self._watchdog)
            return
        self._local.close()

    def __repr__(self) -> str:
        return (f"<RedisLimiter {self.name!r} on {self._server or self._url}: "
                f"local limit {self._local.limit - 1}>")


@dataclasses.dataclass
class _Retained:
    """What a master that closed the budget while others still use it keeps until it exits
    or configures the budget again: the local budget with its plug held, the board (it
    says nothing is lent out) and the watchdog, which stands in once this process is gone."""

    local: PosixLimiter
    plug: Slot
    board: Board | None
    watchdog: subprocess.Popen[bytes] | None


#: by budget name, in the process that closed it (never inherited: see _drop_retained)
_retained: dict[str, _Retained] = {}


def _let_go_retained(name: str) -> None:
    """This process becomes the master of ``name`` again: what it kept from its last
    close is given back (the new master takes a plug of its own and starts its own
    watchdog)."""
    kept = _retained.pop(name, None)
    if kept is None:
        return
    with contextlib.suppress(MppoolsError):
        kept.local.release(kept.plug)
    if kept.board is not None:
        kept.board.close()
    _stop_watchdog(kept.watchdog)
    kept.local.close()


def _stop_watchdog(watchdog: subprocess.Popen[bytes] | None) -> None:
    """Stop a lease watchdog this process started (a master's close, or a retained one
    let go), waiting up to 2 s for it."""
    if watchdog is None:
        return
    with contextlib.suppress(OSError):
        watchdog.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        watchdog.wait(2)


def _drop_retained() -> None:
    """In a forked child: the parent's plug, board and watchdog are the parent's (kept
    referenced, so that no finalizer acts on them here)."""
    _fork.bury(list(_retained.values()))
    _retained.clear()


_fork.on_fork_in_child(_drop_retained)


def _refuse_a_second_master(name: str) -> None:
    """A host's part of a cross-host budget has one master, the process that keeps its
    leases. Another process configuring it while that master lives (a gunicorn binary
    upgrade: the new master starts beside the old one) is refused, before anything is made
    or changed: taking the budget over is not supported by this backend.

    Raises:
        BudgetInUseError: this host's budget ``name`` has a live master other than us.
    """
    try:
        local = PosixLimiter.open(name, create=False)
    except BudgetNotFoundError:
        return  # none yet (or leftovers of a dead master: recovered by the create)
    try:
        creator = local.stats().creator_pid
        alive = local.creator_alive() and not local.is_creator()
    finally:
        local.close()
    if alive:
        raise BudgetInUseError(
            f"budget {name!r} on this host is kept by its live master, pid {creator}, which "
            "holds its leases: a second master on the same host (a gunicorn binary upgrade, "
            "USR2) cannot take over a cross-host budget; stop the old master first, or give "
            "the new one another name")


def python_executable() -> str | None:
    """A Python interpreter of this installation that can run the lease watchdog:
    ``sys.executable``, or, in an embedding whose executable is not Python (a uWSGI binary),
    the ``pythonX.Y`` / ``python3`` of this environment's prefix (a virtualenv's own first).
    None if there is none."""
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    candidates = [sys.executable]
    for prefix in dict.fromkeys((sys.exec_prefix, sys.base_exec_prefix)):
        candidates += [os.path.join(prefix, "bin", version),
                       os.path.join(prefix, "bin", "python3")]
    # last: the base interpreter of a virtualenv lacks the packages installed in it
    candidates.append(getattr(sys, "_base_executable", ""))
    for path in candidates:
        if (path and os.path.basename(path).startswith("python") and os.path.isfile(path)
                and os.access(path, os.X_OK)):
            return path
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def open_backend(spec: str) -> Any:
    """``Backend.open`` for ``spec``."""

    def opener(name: str, **options: Any) -> RedisLimiter:
        return RedisLimiter.open(spec, name, **options)

    return opener

"""The client a host uses to lease slots of one cross-host budget from the coordination Redis.

A host (one machine's local budget, in the name of its master) holds *leases*: each lets one
of its processes keep one broker connection open. Redis arbitrates between hosts only; it never
sees the host's processes. Every lease of a host expires ``ttl`` seconds after the host's last
successful call, in the Redis server's clock; :meth:`LeaseClient.renew` moves it on and says by
when (on this process's monotonic clock) the host must have closed the connections of leases
it could not renew: the fencing deadline. Until then no other host can be granted them.

Everything fails closed: an unreachable or failing Redis grants nothing
(:class:`~mppools._limiter.redis._errors.CoordinationError`, a ``LimitExceeded``), leases
already held stay valid until their deadline.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import threading
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, ResponseError
from redis.retry import Retry
from redis.sentinel import Sentinel

from mppools._errors import ConfigurationError, LimitExceeded, NotConfiguredError
from mppools._validate import MAX_CAPACITY

from . import _names
from . import _scripts as S
from ._errors import CoordinationError, LeaseLostError

__all__ = ["HostLease", "LeaseClient", "LeaseStats", "WaitingHost", "connect"]

#: how far the two clocks (ours, the server's) may drift apart per second of lease
CLOCK_DRIFT = 0.001
#: longest sleep between two polls of a waiting acquire (seconds)
POLL_MAX = 0.05
_POLL_MIN = 0.002


@dataclass(frozen=True, slots=True)
class HostLease:
    """What one host holds: ``held`` leases that expire ``expires_in`` seconds after the
    snapshot (server clock, ``expires_at`` in server seconds)."""

    host: str
    held: int
    expires_at: float
    expires_in: float
    #: the host's local figures at its last renewal (None: not reported): slots in use,
    #: idle among them, processes waiting; and how many seconds ago it reported them
    in_use: int | None = None
    idle: int | None = None
    waiting: int | None = None
    reported_ago: float | None = None


@dataclass(frozen=True, slots=True)
class WaitingHost:
    """A host waiting for leases: its FIFO ticket and when the ticket lapses unless the host
    asks again."""

    host: str
    ticket: int
    expires_in: float


@dataclass(frozen=True, slots=True)
class LeaseStats:
    """A snapshot of one cross-host budget, read in one script (consistent)."""

    name: str
    server: str
    exists: bool
    limit: int
    in_use: int
    generation: str
    previous_generation: str
    server_time: float
    created_at: float
    grace_left: float
    hosts: tuple[HostLease, ...]
    waiting: tuple[WaitingHost, ...]
    tickets_issued: int
    #: this client's view: its host id, the leases it believes it holds, seconds left to its
    #: fencing deadline (None: it holds none), the last round-trip time
    host: str
    held: int
    deadline_in: float | None
    rtt: float


def _redact(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _parse_sentinel(url: str, timeout: float) -> redis.Redis:
    """``redis+sentinel://[:password@]host:port[,host:port...]/service[/db]``"""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    nodes: list[tuple[str, int]] = []
    for item in netloc.split(","):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigurationError(f"sentinel address {item!r} in {_redact(url)!r} is not "
                                     "host:port")
        nodes.append((host.strip("[]"), int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ConfigurationError(f"{_redact(url)!r} must end in /SERVICE or /SERVICE/DB")
    opts: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout,
                            "retry": Retry(NoBackoff(), 0)}
    if parts.password is not None:
        opts["password"] = urllib.parse.unquote(parts.password)
    # redis-py types Sentinel from 8.x on; through Any the call checks under 5.x-8.x alike
    sentinel_cls: Any = Sentinel
    sentinel = sentinel_cls(
        nodes, sentinel_kwargs={"socket_timeout": timeout, "socket_connect_timeout": timeout},
        **opts)
    master: redis.Redis = sentinel.master_for(
        path[0], db=int(path[1]) if len(path) == 2 else 0)
    return master


def connect(spec: str | redis.Redis, timeout: float = 1.0) -> tuple[redis.Redis, str]:
    """A redis-py client for ``spec`` and a printable name of the server (no password).

    ``spec`` is a ``redis.Redis`` (used as it is) or what ``redis.Redis.from_url`` takes
    (``redis://``, ``rediss://``, ``unix://``), or ``redis+sentinel://h:p[,h:p]/service[/db]``.
    Sockets time out after ``timeout`` seconds and calls are not retried (the lease client
    bounds its own waits).

    Raises:
        ConfigurationError: a string that is none of these.
    """
    if isinstance(spec, redis.Redis):
        kw = spec.connection_pool.connection_kwargs
        where = kw.get("path") or f"{kw.get('host', '?')}:{kw.get('port', '?')}"
        service = getattr(spec.connection_pool, "service_name", None)
        return spec, f"redis sentinel service {service}" if service else f"redis at {where}"
    if not isinstance(spec, str):
        raise ConfigurationError(f"backend must be a redis URL or a redis.Redis, not "
                                 f"{type(spec).__name__}")
    scheme = spec.partition("://")[0].lower()
    if scheme in ("redis+sentinel", "sentinel"):
        return _parse_sentinel(spec, timeout), f"redis sentinel {_redact(spec)}"
    if scheme not in ("redis", "rediss", "unix"):
        raise ConfigurationError(f"backend {_redact(spec)!r} is not a redis://, rediss://, "
                                 "unix:// or redis+sentinel:// URL")
    try:
        client = redis.Redis.from_url(spec, socket_timeout=timeout,
                                      socket_connect_timeout=timeout,
                                      retry=Retry(NoBackoff(), 0))
    except ValueError as exc:
        raise ConfigurationError(f"backend {_redact(spec)!r}: {exc}") from None
    return client, f"redis {_redact(spec)}"


def _int(value: object) -> int:
    if isinstance(value, int | bytes | str):
        return int(value)
    raise redis.ResponseError(f"unexpected answer {value!r} (not a number)")


def _host_lease(entry: list[Any], now: int) -> HostLease:
    """One host of a ``stats`` answer: ``[host, held, expiry, 'in_use:idle:waiting:ms']``."""
    host, held, expiry = _str(entry[0]), _int(entry[1]), _int(entry[2])
    figures: list[int | None] = [None, None, None]
    ago: float | None = None
    parts = _str(entry[3]).split(":")
    if len(parts) == 4 and all(p.isdigit() for p in parts):
        figures = [int(p) for p in parts[:3]]
        ago = max(0, now - int(parts[3])) / 1000
    return HostLease(host, held, expiry / 1000, (expiry - now) / 1000, figures[0], figures[1],
                     figures[2], ago)


def _bulk(b: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(b), b)


def _leases(n: int) -> str:
    return "1 lease" if n == 1 else f"{n} leases"


def _str(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


class LeaseClient:
    """One host's handle on the cross-host budget ``name``: it borrows leases in the name of
    ``host_id`` (see :func:`~mppools._limiter.redis._names.default_host_id`).

    ``limit`` creates the budget if the coordination server has none (an existing budget keeps
    its own limit; ``limit=None`` only joins). ``ttl`` is the lease time in seconds: a host that
    stops renewing loses its leases that long after its last call. ``fresh=True`` tells a
    created budget that no host can hold leases of an older life of it (skips the grace
    period of one TTL; only for a coordination server known to be new).

    Thread-safe: calls are serialized; a waiting :meth:`acquire` lets others in between polls.
    """

    def __init__(
        self,
        spec: str | redis.Redis,
        name: str,
        host_id: str | None = None,
        *,
        ttl: float = 10.0,
        limit: int | None = None,
        acquire_timeout: float = 30.0,
        op_timeout: float | None = None,
        fence_margin: float | None = None,
        fresh: bool = False,
    ) -> None:
        self.name = _names.validate_name(name)
        self.host_id = _names.validate_host_id(host_id or _names.default_host_id())
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0.05 <= ttl <= 3600:
            raise ConfigurationError(f"lease ttl must be from 0.05 to 3600 seconds, not {ttl!r}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or not 1 <= limit <= MAX_CAPACITY):
            raise ConfigurationError(f"limit must be an int from 1 to {MAX_CAPACITY}, not "
                                     f"{limit!r}")
        self.ttl = float(ttl)
        self.acquire_timeout = float(acquire_timeout)
        self.op_timeout = float(op_timeout if op_timeout is not None else min(1.0, ttl / 5))
        self.fence_margin = float(fence_margin if fence_margin is not None
                                  else min(0.5, ttl / 10))
        if self.fence_margin + self.op_timeout >= self.ttl:
            raise ConfigurationError(
                f"lease ttl {self.ttl:.3f} s leaves no time to renew: it must exceed the call "
                f"timeout {self.op_timeout:.3f} s plus the fence margin {self.fence_margin:.3f} s")
        self._ttl_ms = max(1, round(self.ttl * 1000))
        # a ticket outlives a few polls, so a waiting host keeps its place in the queue
        self._ticket_ttl_ms = round(max(1.0, 10 * POLL_MAX + 2 * self.op_timeout) * 1000)
        self._redis, self.server = connect(spec, self.op_timeout)
        self._owns_client = not isinstance(spec, redis.Redis)
        self._keys = _names.keys(self.name)
        self._heads: dict[str, bytes] = {}
        self._conn: Any = None
        self._conn_pid = 0
        self._conn_used = False
        self._create_limit = limit
        self._fresh = fresh
        self._lock = threading.Lock()
        self._generation: str | None = None
        self._limit = limit or 0
        self._held = 0
        self._deadline: float | None = None
        #: the server time (ms) of the newest answer about this host's leases: a release is
        #: sent with it, so that one run late (after a later grant) changes nothing
        self._view_ms = 0
        #: the newest server time of any answer (a resize is sent with it)
        self._seen_ms = 0
        self.rtt = 0.0

    # -- state ---------------------------------------------------------------------------
    @property
    def held(self) -> int:
        """Leases this host holds as far as this client knows."""
        return self._held

    @property
    def deadline(self) -> float | None:
        """Monotonic time by which the host must have closed the connections of leases it
        could not renew by then (None: it holds none)."""
        return self._deadline if self._held else None

    @property
    def generation(self) -> str | None:
        """The budget's generation this client joined (None: not yet)."""
        return self._generation

    @property
    def limit(self) -> int:
        """The budget's limit as last seen from the server (0: not joined yet)."""
        return self._limit

    def __repr__(self) -> str:
        left = "-" if self.deadline is None else f"{self.deadline - time.monotonic():.2f} s"
        return (f"<LeaseClient {self.name!r} host {self.host_id!r} on {self.server}: "
                f"{self._held} held, limit {self._limit}, deadline in {left}>")

    # -- wire ----------------------------------------------------------------------------
    def _connection(self) -> Any:
        """This client's one connection (calls are serialized: one is enough, and it skips
        the pool's bookkeeping on the hot path); a new one after a fork."""
        pid = os.getpid()
        if self._conn is None or self._conn_pid != pid:
            self._conn = self._redis.connection_pool.make_connection()
            self._conn_pid, self._conn_used = pid, False
        if not self._conn_used:
            # connect() explicitly: a Sentinel-managed connection finds its master there
            # (sending on an unconnected one would dial the default address instead)
            self._conn.connect()
        return self._conn

    def _packed(self, script: S.Script, args: Sequence[object]) -> bytes:
        """``EVALSHA sha 5 KEYS... ARGS...`` in RESP, the constant part built once."""
        head = self._heads.get(script.sha)
        if head is None:
            head = b"".join(_bulk(x) for x in (b"EVALSHA", script.sha.encode(),
                                               str(len(self._keys)).encode(),
                                               *(k.encode() for k in self._keys)))
            self._heads[script.sha] = head
        return b"".join((b"*%d\r\n" % (3 + len(self._keys) + len(args)), head,
                         *(_bulk(str(a).encode()) for a in args)))

    def _exchange(self, conn: Any, script: S.Script, args: Sequence[object],
                  timeout: float) -> list[Any]:
        conn.send_packed_command([self._packed(script, args)])
        for attempt in range(2):
            # the socket's own timeout bounds the read when it is short enough
            sock_timeout = getattr(conn, "socket_timeout", None)
            if (sock_timeout is None or sock_timeout > timeout) and not conn.can_read(
                    timeout=max(timeout, 0.001)):
                raise redis.TimeoutError(f"no answer to {script.name} within {timeout:.3f} s")
            try:
                return list(conn.read_response())
            except NoScriptError:
                if attempt:
                    raise
                conn.send_command("EVAL", script.source, len(self._keys), *self._keys, *args)
        raise AssertionError("unreachable")

    def _call(self, script: S.Script, args: Sequence[object], timeout: float) -> list[Any]:
        """Run ``script`` once, waiting at most ``timeout`` for its answer. A connection that
        broke while idle (a restarted server) is replaced once: every script may run twice
        (release is idempotent, a repeated grant is given back by reconciliation).

        Raises redis-py's ConnectionError/TimeoutError/ResponseError (callers translate)."""
        end = time.monotonic() + timeout
        for attempt in range(2):
            reused = self._conn_used
            conn = None
            try:
                conn = self._connection()
                reply = self._exchange(conn, script, args, timeout)
            except redis.ConnectionError:
                if conn is not None:
                    conn.disconnect()
                self._conn_used = False
                timeout = end - time.monotonic()
                if attempt or not reused or timeout <= 0:
                    raise
                continue
            except BaseException:
                if conn is not None:
                    conn.disconnect()
                self._conn_used = False
                raise
            self._conn_used = True
            return reply
        raise AssertionError("unreachable")

    def _fail(self, exc: BaseException, operation: str, waited: float = 0.0) -> CoordinationError:
        return CoordinationError(
            f"coordination server {self.server} failed: {operation} for host {self.host_id!r} "
            f"of budget {self.name!r}: {exc} (fail closed: nothing new is granted)",
            name=self.name, limit=self._limit, waited=waited, server=self.server,
            operation=operation, deadline=self.deadline)

    def _run(self, script: S.Script, args: Sequence[object], operation: str,
             timeout: float | None = None) -> tuple[list[Any], float]:
        """``_call`` with errors translated; returns the answer and the send time."""
        t0 = time.monotonic()
        try:
            reply = self._call(script, args, self.op_timeout if timeout is None else timeout)
        except (redis.ConnectionError, redis.TimeoutError, ResponseError, OSError) as exc:
            raise self._fail(exc, operation) from exc
        t1 = time.monotonic()
        self.rtt = t1 - t0
        return reply, t0

    def _seen(self, now_ms: int) -> None:
        self._seen_ms = max(self._seen_ms, now_ms)

    def _release_to(self, target: int, drop_ticket: int, operation: str,
                    timeout: float | None = None) -> bool:
        """Tell the server this host holds at most ``target`` leases (``drop_ticket`` 1:
        and leaves the queue); False if it answered ``STALE``: a grant newer than what this
        client knew when it decided (only possible for a release that ran late, after a
        later call; the excess comes back through :meth:`_reconcile`)."""
        reply, _ = self._run(S.RELEASE, (self.host_id, target, self._generation, drop_ticket,
                                         self._view_ms), operation, timeout)
        return _int(reply[0]) != S.STALE

    def _set_deadline(self, t0: float, expiry_ms: int, now_ms: int) -> None:
        life = (expiry_ms - now_ms) / 1000.0
        # the server read its clock after t0: the lease lives at least `life` past t0, less
        # what the clocks may drift apart; the margin leaves time to close the connections
        self._deadline = t0 + life - self.rtt - life * CLOCK_DRIFT - self.fence_margin

    # -- joining -------------------------------------------------------------------------
    def _ensure_joined(self) -> str:
        if self._generation is None:
            self._join()
        assert self._generation is not None
        return self._generation

    def _join(self) -> None:
        reply, _ = self._run(S.INIT, (self._create_limit or 0, self._ttl_ms,
                                      _names.new_generation(), int(self._fresh)), "join")
        status, gen, limit = _int(reply[0]), _str(reply[1]), _int(reply[2])
        self._seen(_int(reply[4]))
        if status == 2:
            raise NotConfiguredError(f"no budget {self.name!r} on coordination server "
                                     f"{self.server} (give a limit to create it)")
        self._generation, self._limit = gen, limit

    def join(self) -> str:
        """Join (or create) the budget now; returns its generation.

        Raises:
            CoordinationError: the server cannot be reached.
            NotConfiguredError: no such budget and no ``limit`` to create it.
        """
        with self._lock:
            return self._ensure_joined()

    def _register(self, old_gen: str) -> None:
        """Join the generation that replaced ``old_gen``, declaring what this host holds.

        Raises LeaseLostError if some of it could not be kept (close that many now)."""
        alive = self._deadline is not None and time.monotonic() < self._deadline
        claim = self._held if alive else 0
        reply, t0 = self._run(S.REGISTER, (self.host_id, claim, old_gen, self._limit or 1,
                                           self._ttl_ms, _names.new_generation()),
                              "re-register after the budget's data was lost")
        held, expiry, now = _int(reply[2]), _int(reply[3]), _int(reply[4])
        self._generation, self._limit = _str(reply[7]), _int(reply[5])
        self._view_ms = max(self._view_ms, now)
        self._seen(now)
        lost, self._held = self._held - held, held
        if held:
            self._set_deadline(t0, expiry, now)
        if lost > 0:
            why = ("its fencing deadline had passed" if not alive
                   else "the grace period was over and the budget is full")
            raise LeaseLostError(
                f"budget {self.name!r} on {self.server} lost its data (generation "
                f"{old_gen} gone); host {self.host_id!r} kept {held} of {held + lost} leases "
                f"({why}): close {lost} connection(s) now", lost=lost, held=held,
                reason="generation")

    def _reconcile(self, server_held: int, t0: float, expiry: int, now: int,
                   granted: int = 0) -> None:
        """Make our count agree with the server's after an answer about this host:
        ``server_held`` is what it counted for the host before this answer's own
        ``granted`` leases (which the caller adds to :attr:`held` afterwards)."""
        if server_held < self._held:
            lost, self._held = self._held - server_held, server_held
            if server_held:
                self._set_deadline(t0, expiry, now)
            raise LeaseLostError(
                f"{_leases(lost)} of host {self.host_id!r} in budget {self.name!r} on "
                f"{self.server} expired before they were renewed (ttl {self.ttl:.3f} s): "
                f"close {lost} connection(s) now; {server_held} still held",
                lost=lost, held=server_held, reason="expired")
        if server_held > self._held:
            # an earlier answer was lost after the server granted (or a release of ours
            # timed out before it ran): give the excess back, and keep this answer's grants
            # (before, they were given back too, and the host used leases it no longer held)
            self._release_to(self._held + granted, 0,
                             f"give back {server_held - self._held} leases granted in a lost "
                             "answer")
        if self._held:
            self._set_deadline(t0, expiry, now)

    # -- the lease protocol --------------------------------------------------------------
    def renew(self, figures: tuple[int, int, int] | None = None) -> float | None:
        """Move the expiry of every lease this host holds to one TTL from now (server time);
        ``figures`` (slots in use, idle, waiting on this host) are kept for :meth:`stats`.

        Returns the fencing deadline (monotonic seconds; None if the host holds nothing):
        connections whose leases are not renewed again by then must be closed by then.

        Raises:
            LeaseLostError: leases expired before this call, or Redis lost its data and they
                could not all be re-registered: close ``lost`` connections now.
            CoordinationError: the server failed; ``deadline`` is unchanged.
        """
        with self._lock:
            gen = self._ensure_joined()
            info = "" if figures is None else ":".join(str(int(x)) for x in figures)
            reply, t0 = self._run(S.RENEW, (self.host_id, self._ttl_ms, gen, info), "renew")
            if _int(reply[0]) == S.LOST:
                self._register(gen)
                return self.deadline
            held, expiry, now = _int(reply[1]), _int(reply[2]), _int(reply[3])
            self._limit = _int(reply[4])
            self._view_ms = max(self._view_ms, now)
            self._seen(now)
            self._reconcile(held, t0, expiry, now)
            return self.deadline

    def _acquire_once(self, n: int, partial: bool, timeout: float) -> tuple[int, int, int]:
        """One attempt: (granted, status, limit)."""
        gen = self._ensure_joined()
        reply, t0 = self._run(S.ACQUIRE, (self.host_id, n, self._ttl_ms, gen,
                                          self._ticket_ttl_ms, int(partial)),
                              f"acquire {n} leases", timeout)
        status = _int(reply[0])
        if status == S.LOST:
            self._register(gen)
            return 0, S.LOST, self._limit
        granted, held = _int(reply[1]), _int(reply[2])
        self._limit = _int(reply[5])
        self._view_ms = max(self._view_ms, _int(reply[4]))
        self._seen(_int(reply[4]))
        if granted and held - granted < self._held:
            # leases held before this call expired: the caller hears of the loss, not of
            # this call's grants, so give those back
            with contextlib.suppress(CoordinationError):
                self._release_to(held - granted, 1, "give back a grant")
                held -= granted
            granted = 0
        self._reconcile(held - granted, t0, _int(reply[3]), _int(reply[4]), granted)
        self._held += granted
        if self._held:
            self._set_deadline(t0, _int(reply[3]), _int(reply[4]))
        return granted, status, self._limit

    def acquire(self, n: int = 1, timeout: float | None = None, *, partial: bool = False) -> int:
        """Lease ``n`` more slots for this host, waiting at most ``timeout`` seconds
        (None: ``acquire_timeout``; 0: one try). Hosts are served in the order they started
        waiting. With ``partial`` it returns as soon as at least one is granted.

        Returns the number granted (``n``, or 1 to ``n`` with ``partial``).

        Raises:
            LimitExceeded: not granted in time (the partial grants of this call given back).
            CoordinationError: the server failed or could not be reached in time (fail
                closed; a ``LimitExceeded`` naming the server and what failed).
            LeaseLostError: leases held before the call turned out lost (close them).
        """
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CAPACITY:
            raise ConfigurationError(f"n must be an int from 1 to {MAX_CAPACITY}, not {n!r}")
        wait = self.acquire_timeout if timeout is None else float(timeout)
        if not wait >= 0 or math.isinf(wait):
            raise ConfigurationError(f"timeout must be a finite number of seconds >= 0, not "
                                     f"{timeout!r}")
        start = time.monotonic()
        deadline = start + wait
        got, delay, first = 0, _POLL_MIN, True
        status, limit = S.OK, self._limit
        failure: CoordinationError | None = None
        while True:
            left = deadline - time.monotonic()
            # the first try may always wait one op_timeout for its answer: a short or zero
            # timeout bounds the waiting in the queue, not the round trip (a healthy but
            # slow server is not a failed one)
            call = self.op_timeout if first else max(0.001, min(self.op_timeout, left))
            first = False
            try:
                with self._lock:
                    granted, status, limit = self._acquire_once(n - got, partial, call)
                failure = None
            except CoordinationError as exc:
                granted, failure = 0, exc
            got += granted
            if got >= n or (partial and got):
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(left, delay * random.uniform(0.5, 1.0)))
            delay = min(POLL_MAX, delay * 1.5)
        waited = time.monotonic() - start
        if failure is None or got:
            # leave the queue and give back what this call got (best effort: the ticket
            # lapses on its own and unrenewed leases expire). Not after a failed call with
            # nothing got: reaching a failed server again would make failing closed slow
            with self._lock:
                self._held -= got  # no connection may use them, given back or not
                with contextlib.suppress(CoordinationError):
                    self._release_to(self._held, 1, "leave the queue",
                                     min(self.op_timeout, 0.2))
        if failure is not None:
            raise CoordinationError(
                f"{failure} (for {waited:.2f} s of an acquire with timeout {wait:.2f} s)",
                name=self.name, limit=limit, waited=waited, server=self.server,
                operation=failure.operation, deadline=self.deadline) from failure.__cause__
        why = {S.GRACE: "the budget is in the grace period of a new generation (hosts that "
                        "held leases before Redis lost its data re-register them first)",
               S.LOST: "the budget's data was lost and is being rebuilt"}.get(
                   status, "other hosts hold them or wait ahead")
        raise LimitExceeded(
            f"no {_leases(n)} of budget {self.name!r} (limit {limit}) on {self.server} for host "
            f"{self.host_id!r} within {wait:.2f} s: {why}", name=self.name, limit=limit,
            waited=waited)

    def release(self, n: int = 1) -> int:
        """Give ``n`` leases back (never more than held); returns the number still held.

        Raises:
            CoordinationError: the server failed; the leases count as given back here (they
                expire in Redis within one TTL, no connection may use them any more).
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigurationError(f"n must be an int >= 0, not {n!r}")
        with self._lock:
            k = min(n, self._held)
            if self._generation is None or k == 0:
                return self._held
            self._held -= k
            # "hold at most this many": repeated after a lost answer it gives back no more,
            # and it also returns grants whose answer never arrived
            self._release_to(self._held, 0, f"release {_leases(k)}")
            return self._held

    def resize(self, limit: int, *, force: bool = False) -> None:
        """Set the budget's limit for every host.

        Raises:
            BudgetInUseError: shrinking below the leases held without ``force``.
            NotConfiguredError: no such budget on the server.
            CoordinationError: the server failed.
        """
        from mppools._errors import BudgetInUseError

        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_CAPACITY:
            raise ConfigurationError(f"limit must be an int from 1 to {MAX_CAPACITY}, not "
                                     f"{limit!r}")
        with self._lock:
            view = self._seen_ms
            for _ in range(2):
                reply, _ = self._run(S.RESIZE, (limit, int(force), view), f"resize to {limit}")
                status, used = _int(reply[0]), _int(reply[1])
                self._seen(_int(reply[3]))
                if status != S.STALE:
                    break
                # resized by someone else since our view: ours is the newer decision
                view = _int(reply[3])
            if status == S.STALE:
                raise CoordinationError(
                    f"budget {self.name!r} on {self.server} was resized again while "
                    f"resizing it to {limit}: try again", name=self.name, limit=self._limit,
                    waited=0.0, server=self.server, operation=f"resize to {limit}",
                    deadline=self.deadline)
            if status == S.LOST:
                raise NotConfiguredError(f"no budget {self.name!r} on coordination server "
                                         f"{self.server}")
            if status == S.REFUSED:
                raise BudgetInUseError(
                    f"cannot shrink budget {self.name!r} to {limit}: hosts hold {used} leases "
                    "(force=True makes the excess a debt paid back as they are released)")
            self._limit = limit

    def stats(self) -> LeaseStats:
        """A consistent snapshot of the budget across hosts.

        Raises:
            CoordinationError: the server failed.
        """
        with self._lock:
            r, _ = self._run(S.STATS, (), "read stats")
            self._seen(_int(r[5]))
        now = _int(r[5])
        hosts = r[7] or []
        tickets = r[8] or []
        left = self.deadline
        return LeaseStats(
            name=self.name, server=self.server, exists=r[0] is not None,
            limit=_int(r[2]), in_use=_int(r[3]), generation=_str(r[0]),
            previous_generation=_str(r[1]), server_time=now / 1000.0,
            created_at=_int(r[6]) / 1000.0, grace_left=max(0, _int(r[4]) - now) / 1000.0,
            hosts=tuple(_host_lease(hosts[i:i + 4], now) for i in range(0, len(hosts), 4)),
            waiting=tuple(WaitingHost(_str(tickets[i]), _int(tickets[i + 1]),
                                      (_int(tickets[i + 2]) - now) / 1000)
                          for i in range(0, len(tickets), 3)),
            tickets_issued=_int(r[9]), host=self.host_id, held=self._held,
            deadline_in=None if left is None else left - time.monotonic(), rtt=self.rtt)

    def close(self, *, release: bool = True) -> None:
        """Give back every lease (best effort) and drop the connections this client made."""
        if release and self._held:
            try:
                self.release(self._held)
            except CoordinationError:
                self._held = 0
        with self._lock:
            if self._conn is not None and self._conn_pid == os.getpid():
                self._conn.disconnect()
            self._conn = None
        if self._owns_client:
            self._redis.connection_pool.disconnect()

    def __enter__(self) -> LeaseClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

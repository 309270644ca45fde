"""What a broker says about its own connection cap and its clients (read-only queries).

Redis through redis-py (``CONFIG GET maxclients``, ``CLIENT LIST``); RabbitMQ through its
management HTTP API (``/api/vhost-limits``, ``/api/user-limits``, connections), with the
standard library's urllib. Nothing here changes the broker.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from mppools.cli._common import CLIError

__all__ = [
    "BrokerCap",
    "BrokerView",
    "check_management",
    "endpoints_of",
    "management_url_for",
    "parse_broker",
    "query_broker",
]

_REDIS_SCHEMES = {"redis": 6379, "rediss": 6379}
_AMQP_SCHEMES = {"amqp": 5672, "pyamqp": 5672, "librabbitmq": 5672, "amqps": 5671}


@dataclass(frozen=True, slots=True)
class BrokerCap:
    """One cap of the broker: ``source`` (``redis maxclients``, ``vhost '/' max-connections``)
    allows ``value`` connections (None: no limit); ``connected`` are open now, besides this
    check's own (None: unknown)."""

    source: str
    value: int | None
    connected: int | None


@dataclass(slots=True)
class BrokerView:
    """What one broker told us. ``error``: it could not be reached at all (a failure);
    ``warning``: part of it could not be read (the management API)."""

    kind: str
    host: str
    port: int
    caps: list[BrokerCap] = field(default_factory=list)
    #: client addresses (ip, port) as the broker sees them, when it lists them
    peers: list[tuple[str, int]] | None = None
    error: str | None = None
    warning: str | None = None
    #: what could not be asked but did not matter (the figures came another way)
    notes: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def parse_broker(url: str) -> tuple[str, str, int]:
    """``(kind, host, port)`` of a broker URL; kind is ``redis`` or ``rabbitmq``.

    Raises:
        CLIError: not a redis:// or amqp:// URL.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise CLIError(f"invalid --broker url: {exc}") from None  # not repeated: a password
    scheme = parts.scheme.lower()
    if scheme in _REDIS_SCHEMES:
        return "redis", parts.hostname or "localhost", port or _REDIS_SCHEMES[scheme]
    if scheme in _AMQP_SCHEMES:
        return "rabbitmq", parts.hostname or "localhost", port or _AMQP_SCHEMES[scheme]
    # the url itself is not repeated: it may carry a password
    what = (f"check does not support the scheme {scheme}://" if scheme
            else "the url has no scheme")
    raise CLIError(f"--broker: {what}; give a redis://, rediss://, amqp:// or amqps:// url")


def endpoints_of(host: str, port: int) -> set[tuple[str, int]]:
    """Every (ip, port) ``host`` resolves to (an unresolvable host: none)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return set()
    return {(str(info[4][0]), port) for info in infos}


def check_management(management: str | None, broker: str | None) -> None:
    """Refuse a ``--management`` url that check cannot use: one without ``--broker`` for a
    RabbitMQ, or one that is not an http(s) url with a valid port (urllib would otherwise
    follow ftp:// or file:// urls). The url is never repeated: it may carry a password.

    Raises:
        CLIError: as above.
    """
    if management is None:
        return
    if broker is None or parse_broker(broker)[0] != "rabbitmq":
        raise CLIError("--management is RabbitMQ's management api: it needs --broker "
                       "amqp://... or amqps://...")
    try:
        parts = urllib.parse.urlsplit(management)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise CLIError(f"invalid --management url: {exc}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise CLIError("--management needs an http:// or https:// url with a host, such as "
                       "http://mq.internal:15672")


def query_broker(url: str, *, management: str | None = None,
                 timeout: float = 5.0) -> BrokerView:
    """Ask the broker at ``url`` for its caps and clients (``management``: a url that
    :func:`check_management` accepted, or None for the broker's default).

    Raises:
        CLIError: an unsupported broker url.
    """
    kind, host, port = parse_broker(url)
    if kind == "redis":
        return _query_redis(url, host, port, timeout)
    return _query_rabbitmq(url, host, port, management, timeout)


# redis ----------------------------------------------------------------------------------
def _query_redis(url: str, host: str, port: int, timeout: float) -> BrokerView:
    try:
        import redis
    except ImportError:
        raise CLIError("checking a redis broker needs redis-py: pip install 'mppools[redis]'"
                       ) from None
    view = BrokerView("redis", host, port)
    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        try:
            own_id = int(client.client_id())
        except redis.exceptions.ResponseError:
            own_id = -1
        except (redis.exceptions.RedisError, OSError) as exc:
            view.error = f"cannot reach redis at {view.address}: {_one_line(exc)}"
            return view
        maxclients: int | None = None
        notes: list[str] = []
        try:
            answer: Any = client.config_get("maxclients")
            maxclients = int(answer.get("maxclients") or -1)
        except redis.exceptions.ResponseError as exc:  # CONFIG renamed or not allowed
            info = _safe_info(client)
            notes.append(f"config get maxclients refused ({_one_line(exc)})")
            if "maxclients" in info:
                maxclients = int(info["maxclients"])
                notes[-1] += ", read from info clients"
        connected: int | None
        try:
            clients = client.client_list()
            others = [c for c in clients if int(c.get("id", -2)) != own_id]
            connected = len(others)
            view.peers = [_split_addr(str(c.get("addr", ""))) for c in others]
        except redis.exceptions.ResponseError as exc:
            info = _safe_info(client)
            connected = int(info["connected_clients"]) - 1 if "connected_clients" in info \
                else None
            notes.append(f"client list refused ({_one_line(exc)}), the client count read "
                         "from info clients")
        if maxclients is None or maxclients < 0:
            view.warning = "; ".join(notes) or "redis did not say its maxclients"
            maxclients = None
        else:
            view.notes.extend(notes)
        view.caps.append(BrokerCap("redis maxclients", maxclients, connected))
        return view
    except (redis.exceptions.RedisError, OSError) as exc:
        view.error = f"cannot query redis at {view.address}: {_one_line(exc)}"
        return view
    finally:
        with contextlib.suppress(Exception):
            client.close()
        with contextlib.suppress(Exception):
            client.connection_pool.disconnect()


def _safe_info(client: Any) -> dict[str, Any]:
    try:
        return dict(client.info("clients"))
    except Exception:
        return {}


def _split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    with contextlib.suppress(ValueError):
        ip = host.strip("[]")
        return ip, int(port)
    return addr, 0


# rabbitmq -------------------------------------------------------------------------------
def _vhost_of(path: str) -> str:
    """kombu's reading of an amqp URL path: ``''``, ``/`` and ``//`` are the vhost ``/``."""
    if path in ("", "/"):
        return "/"
    return urllib.parse.unquote(path[1:])


def management_url_for(url: str) -> str:
    """The management API a RabbitMQ at ``url`` would serve: its host, port 15672 (15671
    and https for amqps)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    if parts.scheme.lower() == "amqps":
        return f"https://{host}:15671"
    return f"http://{host}:15672"


class _Management:
    def __init__(self, base: str, user: str, password: str, timeout: float) -> None:
        parts = urllib.parse.urlsplit(base)
        if parts.username is not None:
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
        netloc = parts.hostname or "localhost"
        if ":" in netloc:
            netloc = f"[{netloc}]"
        if parts.port:
            netloc += f":{parts.port}"
        self.base = urllib.parse.urlunsplit((parts.scheme or "http", netloc,
                                             parts.path.rstrip("/"), "", ""))
        self.user = user
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self._auth = f"Basic {token}"
        self.timeout = timeout

    def get(self, path: str) -> Any:
        request = urllib.request.Request(self.base + path, headers={
            "Authorization": self._auth, "Accept": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read().decode() or "null")


def _limit_of(entries: Any) -> int | None:
    """``max-connections`` of a vhost-limits / user-limits answer (None: no limit)."""
    for entry in entries or []:
        value = (entry.get("value") or {}).get("max-connections")
        if isinstance(value, int) and value >= 0:
            return value
    return None


def _query_rabbitmq(url: str, host: str, port: int, management: str | None,
                    timeout: float) -> BrokerView:
    view = BrokerView("rabbitmq", host, port)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        view.error = f"cannot reach rabbitmq at {view.address}: {_one_line(exc)}"
        return view
    parts = urllib.parse.urlsplit(url)
    user = urllib.parse.unquote(parts.username or "guest")
    password = urllib.parse.unquote(parts.password or "guest")
    vhost = _vhost_of(parts.path)
    api = _Management(management or management_url_for(url), user, password, timeout)
    q_vhost = urllib.parse.quote(vhost, safe="")
    try:
        vhost_limit = _limit_of(api.get(f"/api/vhost-limits/{q_vhost}"))
        connections = api.get(f"/api/vhosts/{q_vhost}/connections")
        try:
            user_limit = _limit_of(api.get(
                f"/api/user-limits/{urllib.parse.quote(api.user, safe='')}"))
        except urllib.error.HTTPError as exc:
            if exc.code not in (403, 404):  # older RabbitMQ, or not an administrator
                raise
            user_limit = None
            view.warning = (f"the management api did not give user {api.user!r}'s limits "
                            f"(http {exc.code})")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            view.error = f"rabbitmq at {view.address} has no vhost {vhost!r} (management api: 404)"
        else:
            view.warning = (f"the management api at {api.base} answered http {exc.code} for "
                            f"user {api.user!r}: rabbitmq's connection limits are unknown")
        return view
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        view.warning = (f"the management api at {api.base} is not reachable "
                        f"({_one_line(reason)}): rabbitmq's vhost {vhost!r} max-connections "
                        "is unknown (enable rabbitmq_management, or pass --management url)")
        return view
    listed = [c for c in connections or [] if isinstance(c, dict)]
    view.peers = [(str(c.get("peer_host", "")), int(c.get("peer_port") or 0)) for c in listed]
    view.caps.append(BrokerCap(f"vhost {vhost!r} max-connections", vhost_limit, len(listed)))
    if user_limit is not None:
        try:
            every = api.get("/api/connections")
            mine = sum(1 for c in every or [] if isinstance(c, dict) and c.get("user") == user)
        except (urllib.error.URLError, OSError, ValueError):
            mine = None
        view.caps.append(BrokerCap(f"user {user!r} max-connections", user_limit, mine))
    return view


def _one_line(exc: object) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:1].lower() + text[1:]

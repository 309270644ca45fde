"""Transport adjustments that make one pooled kombu connection one broker connection.

mppools counts one slot per pooled kombu connection, and the promise is about what the
broker counts. For py-amqp that is the same thing: one kombu connection, one TCP
connection. kombu's redis transport, however, gives every channel TWO redis-py client pools:
an "async" one (used by the ``PING`` at channel creation, ``BRPOP`` and pub/sub) and a
synchronous one (used to publish). A publisher therefore holds two TCP connections per kombu
connection, and a budget of L would let the broker see 2 x L clients. The redis channel used
for pooled connections keeps a single client pool for both roles: a publishing connection is
then one TCP connection (a consumer blocked in BRPOP while the same channel publishes would
still need a second one, as with any redis client).

The same channel hands redis-py one driver identity (``DriverInfo``) made once per process:
without it, a redis-py that has ``DriverInfo`` (8.1 here) builds one for every new
connection, reading the installed package's metadata to do so
(``importlib.metadata.version("redis")``, about a third of the CPU a new connection costs).
``CLIENT SETINFO`` sends the same name and version either way; a channel whose options
already name a driver (``driver_info``, ``lib_name`` or ``lib_version``) keeps its own.

And it keeps the one redis-py client it publishes through: kombu makes a new ``redis.Redis``
for every publish and declaration (``conn_or_acquire()``), whose constructor fills a table
of about 170 response callbacks, a third of what a publish costs the publishing process's
CPU. The kept client is the synchronous one only, never the channel's ``client`` (kombu's
poller pins a connection on that one for ``BRPOP``), and is made again when the client pool
is (after a disconnect).
"""

from __future__ import annotations

from typing import Any

__all__ = ["transport_for"]

_REDIS_ALIASES = ("redis", "rediss")
_cache: dict[str, Any] = {}


_DRIVER_KEYS = frozenset({"driver_info", "lib_name", "lib_version"})


def _driver_info(connection_class: Any) -> Any | None:
    """The process's one ``DriverInfo`` when ``connection_class`` takes one (else None)."""
    try:
        from redis.connection import AbstractConnection
        from redis.driver_info import DriverInfo
    except ImportError:  # an older redis-py: no DriverInfo, nothing to save
        return None
    if not (isinstance(connection_class, type)
            and issubclass(connection_class, AbstractConnection)):
        return None
    info = _cache.get("driver_info")
    if info is None:
        info = _cache["driver_info"] = DriverInfo()
    return info


def _one_pool_redis_transport() -> Any:
    if "redis" in _cache:
        return _cache["redis"]
    from kombu.transport import redis as kredis

    class OnePoolChannel(kredis.Channel):
        """A redis channel whose sync and async client pools are one and the same, and
        whose publishes go through one client."""

        def _get_pool(self, asynchronous: bool = False) -> Any:
            shared = self.__dict__.get("_mppools_pool")
            if shared is None:
                shared = super()._get_pool(asynchronous=True)
                self.__dict__["_mppools_pool"] = shared
            return shared

        def _connparams(self, asynchronous: bool = False) -> Any:
            params = super()._connparams(asynchronous=asynchronous)
            if not _DRIVER_KEYS.intersection(params):
                info = _driver_info(params.get("connection_class"))
                if info is not None:
                    params["driver_info"] = info
            return params

        def _create_client(self, asynchronous: bool = False) -> Any:
            if asynchronous:
                return super()._create_client(asynchronous=True)
            client = self.__dict__.get("_mppools_client")
            if client is None or client.connection_pool is not self.pool:
                client = super()._create_client(asynchronous=False)
                self.__dict__["_mppools_client"] = client
            return client

        def _disconnect_pools(self) -> None:
            super()._disconnect_pools()
            self.__dict__.pop("_mppools_pool", None)
            self.__dict__.pop("_mppools_client", None)

    class OnePoolTransport(kredis.Transport):
        Channel = OnePoolChannel

    _cache["redis"] = OnePoolTransport
    return OnePoolTransport


def transport_for(connection: Any) -> Any | None:
    """The transport class to use for a pooled copy of ``connection`` (None: unchanged)."""
    alias = connection.transport_cls
    if isinstance(alias, str) and alias in _REDIS_ALIASES:
        try:
            return _one_pool_redis_transport()
        except ImportError:  # redis-py not installed: kombu will say so when connecting
            return None
    return None

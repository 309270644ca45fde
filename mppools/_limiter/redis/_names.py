"""Key names of one cross-host budget in the coordination Redis, and the ids they take.

Every key of budget ``NAME`` starts with ``mppools:{NAME}:``; the braces are a Redis Cluster
hash tag, so all keys of one budget live in one hash slot and one Lua script may touch them all.

======================  =====  ===========================================================
key                     type   contents
======================  =====  ===========================================================
``mppools:{N}:meta``    hash   ``gen`` (generation id), ``prev`` (the generation it replaced),
                               ``limit``, ``used`` (leases held by all hosts), ``seq`` (ticket
                               counter), ``grace_until`` / ``created`` (server ms), and
                               ``h:<host id>`` -> leases that host holds
``mppools:{N}:expiry``  zset   host id -> expiry of all its leases (server ms)
``mppools:{N}:tickets`` zset   waiting host id -> ticket number (FIFO order)
``mppools:{N}:wait``    zset   waiting host id -> expiry of its ticket (server ms)
======================  =====  ===========================================================

The per-host counts sit in the meta hash (not a hash of their own) so that the hot scripts
read everything they need with one ``HMGET`` and write it with one ``HSET``. None of the keys
has a TTL: the coordination Redis must not evict them (``maxmemory-policy noeviction`` or a
``volatile-*`` policy); a lost key reads as lost data (see the generation).
"""

from __future__ import annotations

import os
import re
import secrets
import socket

from mppools._errors import ConfigurationError

__all__ = [
    "HOST_PATTERN",
    "NAME_PATTERN",
    "default_host_id",
    "keys",
    "new_generation",
    "prefix",
    "validate_host_id",
    "validate_name",
]

# the POSIX backend's name rule (a name must be valid on both sides of a host's budget)
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,47}\Z")
HOST_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}\Z")

#: the keys in the order every script takes them (KEYS[1] .. KEYS[4])
KEY_SUFFIXES = ("meta", "expiry", "tickets", "wait")


def validate_name(name: object) -> str:
    """Return ``name`` if it can name a cross-host budget, else raise ConfigurationError."""
    if not isinstance(name, str):
        raise ConfigurationError(f"budget name must be a str, not {type(name).__name__}")
    if not NAME_PATTERN.match(name):
        raise ConfigurationError(
            f"invalid budget name {name!r}: use 1 to 48 characters of letters, digits, '.', "
            "'_' or '-', starting with a letter or digit"
        )
    return name


def validate_host_id(host_id: object) -> str:
    """Return ``host_id`` if it can name a host in the lease tables, else raise
    ConfigurationError."""
    if not isinstance(host_id, str):
        raise ConfigurationError(f"host id must be a str, not {type(host_id).__name__}")
    if not HOST_PATTERN.match(host_id):
        raise ConfigurationError(
            f"invalid host id {host_id!r}: use 1 to 128 characters of letters, digits, '.', "
            "'_', ':', '@' or '-', starting with a letter or digit"
        )
    return host_id


def default_host_id() -> str:
    """A host id nobody else uses: this machine's name, the master's pid and a random part.

    The random part matters: two hosts in containers may share a hostname and a pid, and a
    host restarted after a crash must not inherit the leases its previous life held.
    """
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:80].strip("-.") or "host"
    if not host[0].isalnum():
        host = "h" + host
    return f"{host}:{os.getpid()}:{secrets.token_hex(4)}"


def new_generation() -> str:
    """A fresh generation id (created with a budget, and again after Redis lost its data)."""
    return secrets.token_hex(8)


def prefix(name: str) -> str:
    """``mppools:{NAME}:`` (the braces are the Redis Cluster hash tag)."""
    return f"mppools:{{{name}}}:"


def keys(name: str) -> tuple[str, ...]:
    """The four keys of budget ``name``, in script order (see :data:`KEY_SUFFIXES`)."""
    p = prefix(name)
    return tuple(p + s for s in KEY_SUFFIXES)

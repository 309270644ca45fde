"""The cross-host side of a budget: leases of one budget shared by several hosts, arbitrated
by a coordination Redis (see ``_scripts`` for the protocol, ``_names`` for the key layout).

Needs redis-py (``pip install mppools[redis]``).
"""

from __future__ import annotations

from ._errors import CoordinationError, LeaseLostError
from ._lease import HostLease, LeaseClient, LeaseStats, WaitingHost, connect
from ._names import default_host_id, keys, prefix, validate_host_id, validate_name

__all__ = [
    "CoordinationError",
    "HostLease",
    "LeaseClient",
    "LeaseLostError",
    "LeaseStats",
    "WaitingHost",
    "connect",
    "default_host_id",
    "keys",
    "prefix",
    "validate_host_id",
    "validate_name",
]

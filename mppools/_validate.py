"""Validation shared by the public entry points: nothing is created on bad input.

Ranges, and why:

* limits and capacities are whole numbers from 1 to :data:`MAX_CAPACITY` (65,536): the segment
  stores them as u32 and sizes its tables by them (65,536 slots is a segment of about 8.5 MB;
  2**32 would be a bare MemoryError).
* timeouts (``acquire(timeout=...)``, ``configure(acquire_timeout=..., idle_timeout=...)``) are
  None or a finite number of seconds from 0 to :data:`MAX_TIMEOUT` (1,000,000 s, about 11.6
  days). NaN compares false with everything, so it would never expire; infinity is refused
  too, rather than meaning "forever", because ``None`` already says that, and the waits under
  it (``threading``, ``poll()`` in milliseconds as a C int) overflow on huge values. A bool is
  not a number of seconds (``timeout=True`` is not 1 s), nor is a string.
"""

from __future__ import annotations

import math

from mppools._errors import ConfigurationError

__all__ = [
    "MAX_CAPACITY",
    "MAX_TIMEOUT",
    "check_limit",
    "check_local_limit",
    "check_timeout",
    "check_wait_timeout",
]

#: the largest limit or capacity of a budget (and of a local pool)
MAX_CAPACITY = 65536
#: the longest timeout in seconds (use None to wait without a bound)
MAX_TIMEOUT = 1_000_000.0


def _kind(value: object) -> str:
    return type(value).__name__


def check_limit(limit: object, what: str = "limit") -> int:
    """Return ``limit`` if it is an int from 1 to MAX_CAPACITY (not a bool).

    Raises:
        ConfigurationError: anything else; the message states the valid range.
    """
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise ConfigurationError(
            f"{what} must be an int from 1 to {MAX_CAPACITY}, not {limit!r} ({_kind(limit)})"
        )
    if not 1 <= limit <= MAX_CAPACITY:
        raise ConfigurationError(
            f"{what} must be an int from 1 to {MAX_CAPACITY} (the most slots a budget can "
            f"have), not {limit}"
        )
    return int(limit)


def check_local_limit(limit: object) -> int:
    """Return the limit of unconfigured (per-process) pools: 0 or None mean no limit.

    Raises:
        TypeError: a bool (kombu's own refusal, kept so existing callers see the same error).
        ConfigurationError: not an int from 0 to MAX_CAPACITY.
    """
    if isinstance(limit, bool):
        raise TypeError("limit must be an int, not bool")
    if limit is None:
        return 0
    if not isinstance(limit, int) or not 0 <= limit <= MAX_CAPACITY:
        raise ConfigurationError(
            f"limit must be None, 0 (no limit) or an int up to {MAX_CAPACITY}, "
            f"not {limit!r} ({_kind(limit)})"
        )
    return int(limit)


def check_timeout(what: str, value: object) -> float | None:
    """Return ``value`` as a float if it is None or a finite number of seconds from 0 to
    MAX_TIMEOUT (not a bool).

    Raises:
        ConfigurationError: anything else; the message states the valid range.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(
            f"{what} must be a number of seconds from 0 to {MAX_TIMEOUT:.0f}, or None, "
            f"not {value!r} ({_kind(value)})"
        )
    if math.isnan(value) or not 0 <= value <= MAX_TIMEOUT:
        hint = "; use None to wait without a bound" if value > 0 else ""
        raise ConfigurationError(
            f"{what} must be a number of seconds from 0 to {MAX_TIMEOUT:.0f}, or None, "
            f"not {value}{hint}"
        )
    return float(value)


def check_wait_timeout(value: object) -> float | None:
    """Validate the ``timeout`` of an acquire: None, or a finite number of seconds from 0 to
    MAX_TIMEOUT, returned as a float. Cheap enough for every acquire.

    ``inf`` is refused (None means "no bound of the caller's own"); NaN and bools too.

    Raises:
        ConfigurationError: anything else; the message states the valid range.
    """
    if value is None:
        return None
    if type(value) is float and 0.0 <= value <= MAX_TIMEOUT:  # the common case; NaN fails
        return value
    return check_timeout("timeout", value)

"""Validation shared by the public entry points: nothing is created on bad input."""

from __future__ import annotations

import math

from mppools._errors import ConfigurationError

__all__ = ["check_limit", "check_timeout"]


def check_limit(limit: object) -> int:
    """Return ``limit`` if it is a positive int (not a bool), else raise ConfigurationError."""
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise ConfigurationError(f"limit must be a positive int, not {limit!r}")
    if limit < 1:
        raise ConfigurationError(f"limit must be a positive int, not {limit}")
    return limit


def check_timeout(what: str, value: object) -> float | None:
    """Return ``value`` as a float if it is None or a finite number >= 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"{what} must be a number of seconds or None, not {value!r}")
    if math.isnan(value) or value < 0:
        raise ConfigurationError(f"{what} must be >= 0 seconds or None, not {value}")
    return float(value)

"""One bounded polling helper for state that has no event to wait on."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["wait_until"]


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05, *,
               what: str | None = None) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds passed (one last look after
    the deadline). Returns whether it held; with ``what``, raises ``AssertionError("<what>
    did not happen within <timeout> s")`` instead of returning False."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            if what is not None:
                raise AssertionError(f"{what} did not happen within {timeout} s")
            return False
        time.sleep(interval)

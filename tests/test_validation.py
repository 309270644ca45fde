"""Bad input at every public entry point: a clear ConfigurationError that states the valid
range, and nothing created or left behind (issue 8, item 6; DESIGN promise 10, trap "NaN")."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator

import pytest
from kombu import Connection

import mppools
from mppools import pools
from mppools._validate import MAX_CAPACITY, MAX_TIMEOUT, check_wait_timeout

pytestmark = pytest.mark.timeout(60)

NAN = float("nan")
INF = float("inf")
#: timeouts that are not None or a finite number of seconds from 0 to MAX_TIMEOUT
BAD_TIMEOUTS = [NAN, INF, -INF, -1, -0.001, "1", b"1", True, False, [1], MAX_TIMEOUT * 2]


def _ours(name: str) -> set[str]:
    """The /dev/shm entries a call made by this test could have created: those of ``name``
    and of a default name of this process (other engineers' and decoy budgets don't count)."""
    mine = (f"mppools.{name}", f"sem.mppools.{name}.", f"mppools.pid{os.getpid()}-",
            f"sem.mppools.pid{os.getpid()}-")
    return {n for n in os.listdir("/dev/shm") if n.startswith(mine)}


@pytest.fixture
def nothing_created(budget_name: str) -> Iterator[str]:
    """The test's budget name; fails the test if any of its shared objects exist afterwards
    (or existed before: they must not)."""
    assert _ours(budget_name) == set()
    yield budget_name
    assert _ours(budget_name) == set(), "a failed call left shared objects behind"


def _refused(call: Callable[[], object], *words: str) -> str:
    with pytest.raises(mppools.ConfigurationError) as info:
        call()
    message = str(info.value)
    assert isinstance(info.value, mppools.MppoolsError) and isinstance(info.value, ValueError)
    for word in words:
        assert word in message, (word, message)
    assert message[0].islower(), message
    return message


# -- check_wait_timeout itself ---------------------------------------------------------------

@pytest.mark.parametrize("value", BAD_TIMEOUTS, ids=repr)
def test_check_wait_timeout_refuses(value: object) -> None:
    _refused(lambda: check_wait_timeout(value), "timeout", "0 to 1000000", "None")


@pytest.mark.parametrize("value", [None, 0, 0.0, 1, 2.5, MAX_TIMEOUT])
def test_check_wait_timeout_accepts(value: float | None) -> None:
    got = check_wait_timeout(value)
    assert got == value and (got is None or type(got) is float)


def test_infinity_is_refused_with_a_hint_to_use_none() -> None:
    _refused(lambda: check_wait_timeout(INF), "use None to wait without a bound")


# -- configure() -----------------------------------------------------------------------------

@pytest.mark.parametrize("limit", [0, -1, 2**32, MAX_CAPACITY + 1, True, False, 2.0, "2", None])
def test_configure_limit(limit: object, nothing_created: str) -> None:
    _refused(lambda: mppools.configure(limit, name=nothing_created),  # type: ignore[arg-type]
             "limit", f"1 to {MAX_CAPACITY}")
    assert mppools._config.current() is None


@pytest.mark.parametrize("limit", [2**32, 10**9])
def test_configure_huge_limit_without_a_name_creates_nothing(limit: int,
                                                           nothing_created: str) -> None:
    _refused(lambda: mppools.configure(limit), "limit", str(MAX_CAPACITY))


@pytest.mark.parametrize("name", [123, b"name", "", "a/b", "../x", "x" * 49, "-x", "a b",
                                  "name.d", "é"])
def test_configure_name(name: object, nothing_created: str) -> None:
    _refused(lambda: mppools.configure(2, name=name), "name")  # type: ignore[arg-type]


@pytest.mark.parametrize("what", ["acquire_timeout", "idle_timeout"])
@pytest.mark.parametrize("value", BAD_TIMEOUTS, ids=repr)
def test_configure_timeouts(what: str, value: object, nothing_created: str) -> None:
    _refused(lambda: mppools.configure(2, name=nothing_created, **{what: value}),
             what, "0 to 1000000")


@pytest.mark.parametrize("capacity", [0, -5, 2**32, 2**40, MAX_CAPACITY + 1, True, "8", 8.0])
def test_configure_capacity(capacity: object, nothing_created: str) -> None:
    _refused(lambda: mppools.configure(2, name=nothing_created,
                                       capacity=capacity),  # type: ignore[arg-type]
             "capacity", str(MAX_CAPACITY))


def test_configure_capacity_below_limit(nothing_created: str) -> None:
    _refused(lambda: mppools.configure(4, name=nothing_created, capacity=3), "capacity 3",
             "limit 4")


@pytest.mark.parametrize("mode", [0o1000, -1, 0o400, 0o200, True, "0o600", 6.0])
def test_configure_mode(mode: object, nothing_created: str) -> None:
    _refused(lambda: mppools.configure(2, name=nothing_created,
                                       mode=mode),  # type: ignore[arg-type]
             "mode")


def test_configure_accepts_the_largest_capacity(budget_name: str) -> None:
    limiter = mppools.configure(2, name=budget_name, capacity=MAX_CAPACITY, idle_timeout=None)
    assert limiter.stats().extra["capacity"] == MAX_CAPACITY
    mppools.set_limit(MAX_CAPACITY)
    assert mppools.stats().limit == MAX_CAPACITY


# -- attach() --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [None, 5, "", "a/b", "x" * 49, "name.d"])
def test_attach_name(name: object, nothing_created: str) -> None:
    _refused(lambda: mppools.attach(name), "name")  # type: ignore[arg-type]


# -- set_limit() -----------------------------------------------------------------------------

@pytest.mark.parametrize("limit", [0, None, -1, "2", 2.0, 2**32, MAX_CAPACITY + 1])
def test_set_limit_configured(limit: object, budget_name: str) -> None:
    mppools.configure(2, name=budget_name, capacity=8)
    _refused(lambda: mppools.set_limit(limit))  # type: ignore[arg-type]
    assert mppools.get_limit() == 2 and mppools.stats().limit == 2


def test_set_limit_above_the_capacity(budget_name: str) -> None:
    mppools.configure(2, name=budget_name, capacity=8)
    _refused(lambda: mppools.set_limit(9), "capacity 8")
    assert mppools.stats().limit == 2


@pytest.mark.parametrize("limit", [-1, "2", 2.0, 2**32, MAX_CAPACITY + 1])
def test_set_limit_unconfigured(limit: object) -> None:
    try:
        _refused(lambda: mppools.set_limit(limit), "limit",  # type: ignore[arg-type]
                 str(MAX_CAPACITY))
        assert pools.get_limit() == 10
    finally:
        pools.set_limit(10)


def test_set_limit_bool_is_kombus_type_error() -> None:
    with pytest.raises(TypeError):
        mppools.set_limit(True)


# -- connections[...] / producers[...] acquire -----------------------------------------------

def _pool_acquirers() -> list[tuple[str, Callable[[object], object]]]:
    conn = Connection("memory://")
    return [
        ("connections", lambda t: pools.connections[conn].acquire(block=True, timeout=t)),
        ("producers", lambda t: pools.producers[conn].acquire(block=True, timeout=t)),
    ]


@pytest.mark.parametrize("configured", [False, True])
@pytest.mark.parametrize("value", BAD_TIMEOUTS, ids=repr)
def test_pool_acquire_timeout(value: object, configured: bool, budget_name: str) -> None:
    if configured:
        mppools.configure(1, name=budget_name, acquire_timeout=5, idle_timeout=None)
    try:
        for kind, acquire in _pool_acquirers():
            started = time.monotonic()
            _refused(lambda: acquire(value), "timeout", "0 to 1000000")  # noqa: B023
            assert time.monotonic() - started < 5, kind  # refused, not waited on
            # the refused call took nothing: the one connection/slot is still there
            got = acquire(1)
            got.release()  # type: ignore[attr-defined]
        if configured:
            assert mppools.stats().in_use <= 1
    finally:
        pools.reset()


def test_pool_acquire_nan_while_exhausted_is_refused_not_waited(budget_name: str) -> None:
    """The trap: NaN compares false with everything, so a wait with it never expires."""
    mppools.configure(1, name=budget_name, acquire_timeout=5, idle_timeout=None)
    conn = Connection("memory://")
    held = pools.connections[conn].acquire(block=True, timeout=1)
    try:
        for kind, acquire in _pool_acquirers():
            _refused(lambda: acquire(NAN), "timeout")  # noqa: B023
            assert len(pools.connections[conn]._dirty) == 1, kind
    finally:
        held.release()
        pools.reset()


# -- the limiter's own acquire (wired by the limiter's owner) --------------------------------

@pytest.mark.parametrize("value", BAD_TIMEOUTS, ids=repr)
def test_limiter_acquire_timeout(value: object, budget_name: str) -> None:
    limiter = mppools.configure(1, name=budget_name, acquire_timeout=5)
    held = limiter.acquire(timeout=1)
    try:
        started = time.monotonic()
        _refused(lambda: limiter.acquire(timeout=value), "timeout")  # type: ignore[arg-type]
        assert time.monotonic() - started < 4
        assert limiter.stats().in_use == 1 and limiter.stats().waiting == 0
    finally:
        limiter.release(held)


def test_nan_is_not_a_float_that_passes() -> None:
    # the fast path of check_wait_timeout compares; NaN must fall through to the refusal
    assert not (0.0 <= NAN <= MAX_TIMEOUT)
    assert math.isnan(NAN)

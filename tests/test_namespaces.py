"""Containers that share /dev/shm: budget users in other PID and network namespaces.

Issue 8 item 3. ``docker run --ipc=host`` (or a shared /dev/shm volume) lets processes of
other PID and network namespaces open the same budget. Liveness must hold in every namespace
(a live holder is never reclaimed, a dead one always is) and wake-ups and idle-yield requests
must reach every process that can open the segment.

Every participant except the observing test process is an agent process
(:mod:`support.namespaces`), run under ``unshare`` or plainly on the host. A waiter that must
be *woken* sets its fallback polling slice (``SLICE``, wherever the backend keeps it:
``support.namespaces.set_slice``) to 120 s and waits with a 60 s acquire
timeout, while the test gives it 20 s after the release: only a real wake-up can make it in
time. (Not the waiter's own timeout: on its deadline a waiter takes a slot that was handed to
it meanwhile, so a lost wake-up shows as lateness, not as a failed acquire.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from support.namespaces import Agent, AgentError, unshare_unavailable

import mppools

PIDNS_PROC = ("--pid", "--fork", "--mount-proc")  # own pid namespace, own /proc
PIDNS_HOSTPROC = ("--pid", "--fork")  # own pid namespace, the host's /proc
NETNS = ("--net",)  # own network namespace (loopback down; nothing here needs it)
HOST = ()

#: a waiter that must be woken cannot wake on its own before this (see the module docstring)
BIG_SLICE = 120.0
WAITER_TIMEOUT = 60.0
#: how long after the hand-off / idle connection the test waits for the waiter's GOT
WOKEN_WITHIN = 20.0

def _require(*flags: str) -> None:
    reason = unshare_unavailable(*flags) if flags else None
    if reason is not None:
        pytest.skip(reason)


@dataclass
class Namespaced:
    """A budget of this test plus the agents that use it (killed before the budget goes)."""

    name: str
    agents: list[Agent] = field(default_factory=list)

    def agent(self, flags: tuple[str, ...], *, slice_: float | None = None) -> Agent:
        """An attached agent in new namespaces ``flags`` (``()``: on the host)."""
        _require(*flags)
        agent = Agent(flags)
        self.agents.append(agent)
        if slice_ is not None:
            agent.call(f"slice {slice_}")
        agent.call(f"attach {self.name}")
        return agent


def _remove_budget(name: str) -> None:
    for path in (f"/dev/shm/mppools.{name}", f"/dev/shm/sem.mppools.{name}.free"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    # the per-budget directory (wake-up sockets, liveness tokens) of the fixed backend
    directory = f"/dev/shm/mppools.{name}.d"
    if os.path.isdir(directory):
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def ns(budget_name: str) -> Iterator[Namespaced]:
    """Limit 1 under ``budget_name``, configured here; this process only observes (and
    sometimes competes). Agents are killed first in teardown, then everything is removed."""
    mppools.configure(limit=1, name=budget_name, idle_timeout=None, acquire_timeout=10)
    state = Namespaced(budget_name)
    try:
        yield state
    finally:
        for agent in state.agents:
            agent.kill()
        mppools.close(unlink=False)
        _remove_budget(budget_name)


def _wait_until(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll shared state (no event exists for it) with a bound."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.01)


def _waiting(n: int) -> Callable[[], bool]:
    return lambda: mppools.stats().waiting >= n


def _assert_woken(waiter: Agent, why: str) -> None:
    try:
        answer = waiter.reply(WOKEN_WITHIN)
    except AgentError as exc:
        pytest.fail(f"{why}: the waiter was not woken within {WOKEN_WITHIN} s of the "
                    f"hand-off (its fallback slice is {BIG_SLICE} s): {exc}")
    assert answer.startswith("GOT"), answer
    assert mppools.stats().in_use == 1


# PID namespaces --------------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_holder_in_pid_namespace_is_not_reclaimed_by_the_host(ns: Namespaced) -> None:
    """A live holder in a pid namespace with its own /proc keeps its slot: a host waiter
    times out instead of judging it dead (limit 1, never two holders)."""
    holder = ns.agent(PIDNS_PROC)
    assert holder.inner_pid == 1
    assert holder.call("acquire 10").startswith("GOT")
    limiter = mppools._config.current()
    assert limiter is not None
    stolen = None
    try:
        stolen = limiter.acquire(block=True, timeout=2)
    except mppools.LimitExceeded:
        pass
    finally:
        if stolen is not None:
            limiter.release(stolen)
    assert stolen is None, (
        "the host reclaimed the live slot of a holder in another pid namespace: two holders "
        "with limit 1")
    assert holder.call("holds") == "OK True"
    assert mppools.stats().in_use == 1


@pytest.mark.timeout(90)
def test_host_holder_is_not_reclaimed_from_a_pid_namespace(ns: Namespaced) -> None:
    """The reverse: a host holder keeps its slot against a waiter in a pid namespace with
    its own /proc (where the host's pid does not exist)."""
    holder = ns.agent(HOST)
    assert holder.call("acquire 10").startswith("GOT")
    waiter = ns.agent(PIDNS_PROC)
    answer = waiter.call("acquire 2")
    if answer.startswith("GOT"):
        waiter.call("release")
    assert answer == "EXCEEDED", (
        "a process in another pid namespace reclaimed the live slot of a host holder: two "
        "holders with limit 1")
    assert holder.call("holds") == "OK True"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("death", ["exit", "sigkill"])
def test_slot_of_dead_holder_in_pid_namespace_without_its_proc_comes_back(
    ns: Namespaced, death: str,
) -> None:
    """A holder in a pid namespace that sees the host's /proc (it is pid 1 there, so it
    must not record the host init's identity) dies holding its slot: a host waiter gets it."""
    holder = ns.agent(PIDNS_HOSTPROC)
    assert holder.inner_pid == 1
    assert holder.call("acquire 10").startswith("GOT")
    _die(holder, death)
    limiter = mppools._config.current()
    assert limiter is not None
    try:
        slot = limiter.acquire(block=True, timeout=10)
    except mppools.LimitExceeded as exc:
        pytest.fail(f"the slot of a dead holder in another pid namespace never came back: {exc}")
    limiter.release(slot)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("death", ["exit", "sigkill"])
def test_slot_of_dead_holder_in_pid_namespace_comes_back_only_after_death(
    ns: Namespaced, death: str,
) -> None:
    """A holder in a pid namespace with its own /proc: its slot is out of reach while it
    lives and comes back to a host waiter once it is SIGKILLed (or exits holding it)."""
    holder = ns.agent(PIDNS_PROC)
    assert holder.call("acquire 10").startswith("GOT")
    limiter = mppools._config.current()
    assert limiter is not None
    early = None
    try:
        early = limiter.acquire(block=True, timeout=1)
    except mppools.LimitExceeded:
        pass
    finally:
        if early is not None:
            limiter.release(early)
    assert early is None, "the host reclaimed the slot of a live holder in a pid namespace"
    _die(holder, death)
    try:
        slot = limiter.acquire(block=True, timeout=10)
    except mppools.LimitExceeded as exc:
        pytest.fail(f"the slot of a dead holder in a pid namespace never came back: {exc}")
    limiter.release(slot)


def _die(agent: Agent, death: str) -> None:
    if death == "exit":
        agent.send("die")  # os._exit(0) with the slot still held
        agent.wait(10)
    else:
        agent.kill()


# network namespaces ----------------------------------------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize(("holder_ns", "waiter_ns"), [(HOST, NETNS), (NETNS, HOST)],
                         ids=["host-to-netns", "netns-to-host"])
def test_hand_off_wakes_a_waiter_across_network_namespaces(
    ns: Namespaced, holder_ns: tuple[str, ...], waiter_ns: tuple[str, ...],
) -> None:
    """Limit 1: the holder releases while the waiter waits in another network namespace;
    the hand-off's wake-up reaches it (not its fallback slice)."""
    holder = ns.agent(holder_ns)
    assert holder.call("acquire 10").startswith("GOT")
    waiter = ns.agent(waiter_ns, slice_=BIG_SLICE)
    waiter.send(f"acquire {WAITER_TIMEOUT}")
    _wait_until("the waiter registering", _waiting(1))
    assert holder.call("release") == "OK"
    _assert_woken(waiter, "hand-off across network namespaces")


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("keeper_ns", "waiter_ns"), [(HOST, NETNS), (NETNS, HOST)],
                         ids=["host-keeper-netns-waiter", "netns-keeper-host-waiter"])
def test_idle_connection_is_yielded_across_network_namespaces(
    ns: Namespaced, keeper_ns: tuple[str, ...], waiter_ns: tuple[str, ...],
) -> None:
    """Limit 1: a process keeps an idle pooled connection and blocks in a read (never
    calling mppools); a waiter in another network namespace gets the slot, because the
    holder's keeper receives its yield request."""
    keeper = ns.agent(keeper_ns)
    assert keeper.call("idle") == "OK"
    stats = mppools.stats()
    assert stats.in_use == 1 and stats.holders[0].idle == 1, stats
    waiter = ns.agent(waiter_ns, slice_=BIG_SLICE)
    waiter.send(f"acquire {WAITER_TIMEOUT}")
    _assert_woken(waiter, "idle yield across network namespaces")

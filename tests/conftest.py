"""Shared fixtures: a unique budget name per test, cleaned up in teardown."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator

import pytest

# decoy budgets (healthy, broken, another user's) on the host for the whole session;
# MPPOOLS_TEST_NO_DECOYS=1 turns them off (see tests/support/decoys.py)
from support.decoys import decoy_budgets  # noqa: F401

import mppools
from mppools._limiter import posix as _posix


def _remove(name: str) -> None:
    for path in (f"/dev/shm/mppools.{name}", f"/dev/shm/sem.mppools.{name}.free"):
        if os.path.exists(path):
            os.unlink(path)
    shutil.rmtree(f"/dev/shm/mppools.{name}.d", ignore_errors=True)


@pytest.fixture
def budget_name() -> Iterator[str]:
    """A budget name no other test uses; the budget's shared objects are removed after."""
    name = f"t{os.getpid()}-{uuid.uuid4().hex[:10]}"
    yield name
    mppools.close(unlink=False)
    mppools.pools.set_limit(10)
    _remove(name)
    assert not _posix.exists(name)


@pytest.fixture
def shm_clean() -> Iterator[None]:
    """Fail a test that leaves /dev/shm objects of mppools' test names behind."""
    before = set(os.listdir("/dev/shm"))
    yield
    after = set(os.listdir("/dev/shm"))
    leaked = {n for n in after - before if "mppools." in n}
    assert not leaked, f"leaked shared objects: {sorted(leaked)}"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A private redis-server on a free 127.0.0.1 port for the whole session."""
    from support.servers import RedisServer

    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def rabbitmq_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A private RabbitMQ node (own epmd, ports, data) for the whole session."""
    from support.servers import RabbitMQServer

    with RabbitMQServer(tmp_path_factory.mktemp("rabbit")) as server:
        yield server


@pytest.fixture
def hosts() -> Iterator[list[object]]:
    """Simulated hosts (``hosts.append(Host())``, see support/hosts.py), all SIGKILLed after
    the test; skipped where ``unshare`` cannot make them."""
    from support.hosts import FLAGS
    from support.namespaces import unshare_unavailable

    reason = unshare_unavailable(*FLAGS)
    if reason:
        pytest.skip(reason)
    started: list[object] = []
    yield started
    for host in started:
        host.kill()  # type: ignore[attr-defined]

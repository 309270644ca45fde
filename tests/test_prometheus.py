"""mppools.integrations.prometheus: the collector against real budgets, and the text
exposition with and without prometheus_client."""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import mppools
from mppools._errors import LimitExceeded
from mppools._limiter._base import BudgetStats, HolderStats, WaiterStats, local_host
from mppools._limiter.posix import PosixLimiter
from mppools._slots import Table, segment_size
from mppools.cli import main, render_prometheus
from mppools.cli._prometheus import budget_families, render_text
from mppools.integrations.prometheus import MppoolsCollector, generate_text, register

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]

#: budget-level gauges that mirror a BudgetStats field
FIELDS = {
    "mppools_slots_limit": "limit",
    "mppools_slots_in_use": "in_use",
    "mppools_slots_free": "free",
    "mppools_waiters": "waiting",
    "mppools_debt": "debt",
}
COUNTERS = {
    "mppools_acquired": "acquired_total",
    "mppools_reclaimed": "reclaimed_total",
    "mppools_acquire_timeouts": "timeouts_total",
}


def _registry(collector: MppoolsCollector) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


@pytest.fixture
def pooled(budget_name: str) -> Iterator[list[Any]]:
    """Connections taken from mppools' pools (memory:// transport: no broker needed)."""
    taken: list[Any] = []
    yield taken
    for conn in taken:
        conn.release()
    mppools.reset()


def test_collector_values_are_the_budget_stats(budget_name: str, pooled: list[Any]) -> None:
    mppools.configure(limit=3, name=budget_name, acquire_timeout=1.0, idle_timeout=None)
    pool = mppools.connections[Connection("memory://")]
    pooled.extend(pool.acquire(block=True, timeout=5) for _ in range(2))
    pooled.pop().release()  # idle in the local pool, still holding its slot
    registry = _registry(MppoolsCollector([budget_name]))
    text = generate_latest(registry).decode()
    stats = mppools.stats()
    assert (stats.in_use, stats.free) == (2, 1)
    for metric, attr in FIELDS.items():
        assert _value(registry, metric, budget=budget_name) == getattr(stats, attr), metric
    for metric, attr in COUNTERS.items():
        assert _value(registry, metric + "_total", budget=budget_name) == getattr(stats, attr)
    assert _value(registry, "mppools_slots_idle", budget=budget_name) == 1
    assert _value(registry, "mppools_slots_busy", budget=budget_name) == 1
    assert _value(registry, "mppools_holders", budget=budget_name) == 1
    assert _value(registry, "mppools_budget_up", budget=budget_name) == 1
    assert _value(registry, "mppools_budget_damaged", budget=budget_name) == 0
    assert _value(registry, "mppools_acquire_timeout_seconds", budget=budget_name) == 1.0
    assert _value(registry, "mppools_idle_timeout_seconds", budget=budget_name) == math.inf
    assert _value(registry, "mppools_budget_created_timestamp_seconds",
                  budget=budget_name) == stats.created_at
    assert _value(registry, "mppools_budget_info", budget=budget_name, backend="posix",
                  host=stats.host) == 1
    families = _families(text)
    for metric in COUNTERS:  # conventions, as prometheus_client's own parser reads them
        assert families[metric].type == "counter"
        assert {s.name for s in families[metric].samples} == {metric + "_total"}
        assert f"# HELP {metric}_total " in text and f"# TYPE {metric}_total counter" in text
    # the budget-wide count of idle yields, from stats' extra
    assert families["mppools_yields"].type == "counter"
    assert _value(registry, "mppools_yields_total", budget=budget_name) == \
        stats.extra["yields_total"] == 0
    assert all(f.type == "gauge" for n, f in families.items()
               if n not in {*COUNTERS, "mppools_yields"})
    assert "mppools_holder_slots" not in families  # per-holder series are opt-in


def test_counters_follow_the_budget(budget_name: str, pooled: list[Any]) -> None:
    limiter = mppools.configure(limit=1, name=budget_name, acquire_timeout=0.05)
    registry = _registry(MppoolsCollector([budget_name]))
    before = _value(registry, "mppools_acquired_total", budget=budget_name)
    slot = limiter.acquire(timeout=1.0)
    with pytest.raises(LimitExceeded):
        limiter.acquire(timeout=0.05)
    limiter.release(slot)
    stats = mppools.stats()
    assert _value(registry, "mppools_acquired_total", budget=budget_name) == (before or 0) + 1
    assert _value(registry, "mppools_acquired_total",
                  budget=budget_name) == stats.acquired_total
    assert _value(registry, "mppools_acquire_timeouts_total",
                  budget=budget_name) == stats.timeouts_total >= 1


def test_per_holder_series_only_when_asked(budget_name: str, pooled: list[Any]) -> None:
    mppools.configure(limit=3, name=budget_name)
    pooled.append(mppools.connections[Connection("memory://")].acquire(block=True, timeout=5))
    host, pid = local_host(), str(os.getpid())
    plain = _registry(MppoolsCollector([budget_name]))
    assert _value(plain, "mppools_holder_slots", budget=budget_name, host=host, pid=pid,
                  state="busy") is None
    detailed = _registry(MppoolsCollector([budget_name], per_holder=True))
    assert _value(detailed, "mppools_holder_slots", budget=budget_name, host=host, pid=pid,
                  state="busy") == 1
    assert _value(detailed, "mppools_holder_slots", budget=budget_name, host=host, pid=pid,
                  state="idle") == 0
    held = _value(detailed, "mppools_holder_held_seconds", budget=budget_name, host=host,
                  pid=pid)
    assert held is not None and held >= 0


def test_every_budget_of_the_host_by_default(budget_name: str) -> None:
    """Without names: this process's budget and the others of the host (the session's
    decoys included: healthy, garbage, another layout version, another user's)."""
    mppools.configure(limit=2, name=budget_name)
    other = PosixLimiter.open(budget_name + "-other", create=True, limit=4, capacity=8)
    try:
        registry = _registry(MppoolsCollector())
        assert _value(registry, "mppools_slots_limit", budget=budget_name) == 2
        assert _value(registry, "mppools_slots_limit", budget=budget_name + "-other") == 4
        decoys = [n for n in mppools.list_budgets() if n.startswith(f"decoy-{os.getpid()}-")]
        for name in decoys:
            up = _value(registry, "mppools_budget_up", budget=name)
            assert up == (1 if name.endswith("-healthy") else 0), name
    finally:
        other.close()
        mppools.unlink(budget_name + "-other", force=True)


def _garbage(name: str) -> None:
    with open(f"/dev/shm/mppools.{name}", "wb") as f:
        f.write(b"GARBAGE!" * 512)


def test_damaged_and_unreadable_budgets_do_not_break_a_scrape(budget_name: str) -> None:
    mppools.configure(limit=3, name=budget_name, capacity=8)
    junk, odd, missing = budget_name + "-junk", budget_name + "-odd", budget_name + "-none"
    _garbage(junk)
    odd_limiter = PosixLimiter.open(odd, create=True, limit=2, capacity=4)
    try:
        slot = odd_limiter.acquire(timeout=1.0)
        # a state byte out of range: damage that the budget survives (it counts as used)
        at = Table(memoryview(bytearray(segment_size(4, 4))), 4, 4).slot_map_at + slot.index
        fd = os.open(f"/dev/shm/mppools.{odd}", os.O_RDWR)
        try:
            with mmap.mmap(fd, os.fstat(fd).st_size) as m:
                m[at:at + 1] = b"\x07"
        finally:
            os.close(fd)
        for names in ([budget_name, junk, odd, missing], None):
            registry = _registry(MppoolsCollector(names, per_holder=True))
            text = generate_latest(registry).decode()  # never raises
            assert _value(registry, "mppools_budget_up", budget=budget_name) == 1
            assert _value(registry, "mppools_slots_limit", budget=budget_name) == 3
            assert _value(registry, "mppools_budget_up", budget=junk) == 0
            assert _value(registry, "mppools_slots_limit", budget=junk) is None
            assert _value(registry, "mppools_budget_up", budget=odd) == 1
            assert _value(registry, "mppools_budget_damaged", budget=odd) == 1
            assert _value(registry, "mppools_budget_damaged", budget=budget_name) == 0
            assert _value(registry, "mppools_budget_up", budget=missing) == (
                0 if names else None)
            assert _families(text)  # prometheus_client's parser reads all of it
    finally:
        odd_limiter.close()
        mppools.unlink(odd, force=True)
        os.unlink(f"/dev/shm/mppools.{junk}")


def test_describe_reads_nothing_and_covers_collect(budget_name: str) -> None:
    mppools.configure(limit=2, name=budget_name)
    collector = MppoolsCollector(per_holder=True)
    described = {m.name for m in collector.describe()}
    assert all(not m.samples for m in collector.describe())
    collected = {m.name for m in collector.collect()}
    assert collected <= described
    registry = CollectorRegistry(auto_describe=True)
    assert isinstance(register(registry), MppoolsCollector)
    with pytest.raises(ValueError, match="Duplicated"):
        register(registry)  # the same names twice on one registry
    assert _value(registry, "mppools_slots_limit", budget=budget_name) == 2


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"names": "web"}, r"names must be a list of budget names, not a str \('web'\): use "
                       r"names=\['web'\]"),
    ({"names": b"web"}, "not a bytes"),
    ({"names": 3}, "names must be a list of budget names or None, not int"),
    ({"names": ["ok", "bad/name"]}, "invalid budget name 'bad/name'"),
    ({"names": [""]}, "invalid budget name ''"),
    ({"names": [None]}, "budget name must be a str, not NoneType"),
    ({"per_holder": "yes"}, "per_holder must be True or False, not 'yes'"),
    ({"registry": "default"}, "registry must be a prometheus_client CollectorRegistry or "
                              "None, not str"),
])
def test_bad_arguments_are_refused_and_register_nothing(kwargs: dict[str, Any],
                                                        message: str) -> None:
    registry = CollectorRegistry()
    before = generate_latest(registry)
    registry_arg = kwargs.pop("registry", registry)
    with pytest.raises(mppools.ConfigurationError, match=message):
        register(registry_arg, **kwargs)
    with pytest.raises(ValueError):  # what callers of a prometheus helper already catch
        MppoolsCollector(**kwargs) if kwargs else register(registry_arg)
    assert generate_latest(registry) == before


def _snapshot(**changes: Any) -> BudgetStats:
    now = time.time()
    base = BudgetStats(
        name="web", backend="posix", host='h"1\\x\n', limit=3, in_use=2, free=1, waiting=4,
        debt=0,
        holders=(HolderStats(host="h1", pid=11, slots=2, idle=1, busy=1, since=now - 2.5,
                             alive=True),
                 HolderStats(host="h1", pid=12, slots=1, idle=0, busy=1, since=math.nan,
                             alive=False)),
        waiters=tuple(WaiterStats(host="h1", pid=p) for p in (13, 14, 15, 16)),
        creator_pid=10, created_at=1.7e9 + 0.123, acquired_total=123456789012,
        reclaimed_total=1, timeouts_total=5, acquire_timeout=None, idle_timeout=0.25,
        hold_quantum=0.2, extra={"generation": 3, "yields_total": 7},
    )
    return dataclasses.replace(base, **changes)


def _cross_host(ok: bool) -> BudgetStats:
    extra: dict[str, object] = {"coordination": "ok" if ok else "connection refused",
                                "server": "127.0.0.1:6390"}
    if ok:
        extra.update(generation="g-2", leases_in_use=3, hosts=(("a", 2, 1.5), ("b", 1, 0.25)),
                     waiting_hosts=("b", "c"), rtt=0.0004,
                     host_details=(
                         {"host": "a", "held": 2, "expires_in": 1.5, "in_use": 2, "idle": 1,
                          "waiting": 0, "reported_ago": 0.5, "waits_for_leases": False},
                         {"host": "b", "held": 1, "expires_in": 0.25, "in_use": None,
                          "idle": None, "waiting": None, "reported_ago": None,
                          "waits_for_leases": True}))
    return _snapshot(name="fleet" if ok else "fleet-down", backend="redis", extra=extra)


def test_both_renderers_write_the_same_bytes() -> None:
    snapshots = [_snapshot(), _snapshot(name="b2", holders=()), _cross_host(True),
                 _cross_host(False)]
    for per_holder in (True, False):
        families = budget_families(snapshots, damage={"web": ["x"]}, broken=["gone"],
                                   per_holder=per_holder, now=1.7e9 + 10)
        assert render_text(families) == generate_text(families)
    assert render_text([]) == generate_text([]) == ""


def test_cross_host_figures_of_a_redis_snapshot() -> None:
    families = {f.name: f for f in budget_families([_cross_host(True), _cross_host(False)])}
    samples = {(f.name, labels): value for f in families.values()
               for labels, value in f.samples}
    assert samples["mppools_coordination_up", ("fleet", "127.0.0.1:6390")] == 1.0
    assert samples["mppools_coordination_up", ("fleet-down", "127.0.0.1:6390")] == 0.0
    assert samples["mppools_host_leases_held", ("fleet", "a")] == 2
    assert samples["mppools_host_lease_expiry_seconds", ("fleet", "b")] == 0.25
    waiting = dict(families["mppools_host_waiting"].samples)
    assert waiting == {("fleet", "a"): 0.0, ("fleet", "b"): 1.0, ("fleet", "c"): 1.0}
    assert samples["mppools_leases_in_use", ("fleet",)] == 3
    assert samples["mppools_coordination_round_trip_seconds", ("fleet", "127.0.0.1:6390")] == (
        0.0004)
    # what each host reported of itself; nothing for a host that has not reported yet
    assert samples["mppools_host_slots_in_use", ("fleet", "a")] == 2
    assert samples["mppools_host_slots_idle", ("fleet", "a")] == 1
    assert samples["mppools_host_waiters", ("fleet", "a")] == 0
    assert samples["mppools_host_report_age_seconds", ("fleet", "a")] == 0.5
    assert ("mppools_host_slots_in_use", ("fleet", "b")) not in samples
    assert "mppools_budget_generation" not in families  # a redis generation is no number


@pytest.mark.redis
def test_a_redis_budget_reports_its_hosts(budget_name: str, redis_server: Any,
                                          pooled: list[Any]) -> None:
    mppools.configure(limit=3, name=budget_name,
                      backend=f"{redis_server.url}?lease_ttl=5&fresh=1")
    pooled.append(mppools.connections[Connection("memory://")].acquire(block=True, timeout=5))
    registry = _registry(MppoolsCollector([budget_name]))
    # one scrape between two snapshots: the lease keeper may renew (and the hosts' figures
    # move) meanwhile, so a cross-host figure must equal the one before or the one after
    before = mppools.stats()
    text = generate_latest(registry).decode()
    after = mppools.stats()
    scraped = {(s.name, frozenset(s.labels.items())): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}

    def got(metric: str, **labels: str) -> float | None:
        return scraped.get((metric, frozenset({"budget": budget_name, **labels}.items())))

    for stats in (before, after):
        assert stats.extra["coordination"] == "ok"
        assert (stats.limit, stats.in_use) == (3, 1)
    server = str(after.extra["server"])
    assert got("mppools_coordination_up", server=server) == 1
    assert got("mppools_slots_limit") == 3 and got("mppools_slots_in_use") == 1
    assert got("mppools_leases_in_use") in (before.extra["leases_in_use"],
                                             after.extra["leases_in_use"])
    held = [{h: n for h, n, _ in s.extra["hosts"]}  # type: ignore[attr-defined]
            for s in (before, after)]
    assert held[1], after.extra
    for host in held[0].keys() | held[1].keys():
        assert got("mppools_host_leases_held", host=host) in (held[0].get(host),
                                                              held[1].get(host))
        expiry = got("mppools_host_lease_expiry_seconds", host=host)
        assert expiry is not None and 0 <= expiry <= 5 + 1
        assert got("mppools_host_waiting", host=host) == 0
    # what the hosts report of themselves (where the backend has it): counts within the limit
    for detail in after.extra.get("host_details") or ():  # type: ignore[attr-defined]
        for metric in ("mppools_host_slots_in_use", "mppools_host_slots_idle",
                       "mppools_host_waiters"):
            value = got(metric, host=detail["host"])
            assert value is None or (value == int(value) and 0 <= value <= 3), (metric, value)
    assert got("mppools_budget_info", backend="redis", host=after.host) == 1


@pytest.mark.redis
def test_a_stopped_coordination_server_is_reported_not_raised(
    budget_name: str, tmp_path: Path,
) -> None:
    from support.servers import RedisServer

    with RedisServer(tmp_path / "redis") as own:
        limiter = mppools.configure(2, name=budget_name,
                                    backend=f"{own.url}?lease_ttl=1&fresh=1", idle_timeout=None)
        held = limiter.acquire(timeout=5)
        registry = _registry(MppoolsCollector([budget_name]))
        server = str(mppools.stats().extra["server"])  # printable, never a password
        assert f"127.0.0.1:{own.port}" in server
        assert _value(registry, "mppools_coordination_up", budget=budget_name,
                      server=server) == 1
        own.stop()
        text = generate_latest(registry).decode()  # never raises
        extra = mppools.stats().extra
        assert extra["coordination"] != "ok"
        assert _value(registry, "mppools_coordination_up", budget=budget_name,
                      server=str(extra["server"])) == 0
        assert f"127.0.0.1:{own.port}" in str(extra["server"])
        assert _value(registry, "mppools_slots_in_use", budget=budget_name) == 1
        assert _value(registry, "mppools_budget_up", budget=budget_name) == 1
        assert "mppools_host_leases_held" not in _families(text)  # nothing known now
        limiter.release(held)


# the CLI, with and without prometheus_client ---------------------------------------------
def _without_prometheus_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, "mppools.integrations.prometheus",
                        None)  # type: ignore[arg-type]


def test_render_prometheus_falls_back_without_prometheus_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    snapshots = [_snapshot(), _cross_host(True)]
    families = budget_families(snapshots)
    through_client = render_prometheus(snapshots)
    assert {f.name for f in text_string_to_metric_families(through_client)} >= {
        "mppools_slots_limit", "mppools_acquired", "mppools_holder_slots"}
    _without_prometheus_client(monkeypatch)
    with pytest.raises(ImportError):
        import mppools.integrations.prometheus  # noqa: F401
    fallback = render_prometheus(snapshots)
    # the same metrics either way (only the held-for-how-long ages differ: time passes)
    def stable(text: str) -> list[str]:
        return [line for line in text.splitlines() if "held_seconds{" not in line]
    assert stable(fallback) == stable(through_client)
    assert stable(fallback) == stable(render_text(families))


def test_cli_prometheus_same_output_with_and_without_prometheus_client(
    budget_name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    limiter = PosixLimiter.open(budget_name, create=True, limit=3, capacity=8)
    try:
        slot = limiter.acquire(timeout=1.0)
        assert main(["status", budget_name, "--prometheus"]) == 0
        with_client = capsys.readouterr().out
        _without_prometheus_client(monkeypatch)
        assert main(["status", budget_name, "--prometheus"]) == 0
        without = capsys.readouterr().out
        limiter.release(slot)
    finally:
        limiter.close()
        mppools.unlink(budget_name, force=True)

    def stable(text: str) -> list[str]:
        return [line for line in text.splitlines() if "held_seconds{" not in line]
    assert stable(with_client) == stable(without)
    assert f'mppools_slots_in_use{{budget="{budget_name}"}} 1.0' in without
    assert f'mppools_holder_slots{{budget="{budget_name}",host="{local_host()}",' in without
    names = {f.name for f in text_string_to_metric_families(without)}
    assert {"mppools_slots_limit", "mppools_acquired", "mppools_holder_slots"} <= names


@pytest.mark.timeout(60)
def test_mppools_imports_and_its_cli_works_without_prometheus_client() -> None:
    """A fresh interpreter where ``import prometheus_client`` fails."""
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "import mppools, mppools.pools, mppools.cli, mppools.integrations.gunicorn\n"
        "from mppools.cli import main\n"
        "assert main(['status', '--prometheus']) == 0\n"
        "try:\n"
        "    import mppools.integrations.prometheus\n"
        "except ImportError as exc:\n"
        "    print('refused:', exc)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=50, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert "mppools_budget_up" in done.stdout or done.stdout.startswith("refused")
    assert "refused:" in done.stdout and "mppools[prometheus]" in done.stdout

"""Cost of one cross-host lease: ``LeaseClient.acquire(1)`` + ``release(1)`` against the
anchor, a bare Lua ``INCR`` script and a bare Lua ``DECR`` script (two round trips, what the
cheapest Redis semaphore costs). Goal (issue 10): at most 1.2 times the anchor. Two anchors:
``anchor`` calls the scripts through redis-py as an application would (``register_script``),
``anchor_raw`` sends them packed once on one dedicated connection (the floor; the lease client
takes that path too).

    python -m stress.redis_lease [--cycles 2000] [--reps 15] [--budget 60]

A private redis-server on 127.0.0.1 (stopped by its pid), one client, one thread; the subjects
are sampled in rotating order (``interleave``) and compared by the median of paired ratios.

Across simulated hosts (tests/support/hosts.py: ``unshare`` mount and pid namespaces, a
private /dev/shm each; needs root):

    python -m stress.redis_lease --figure reclaim [--ttls 1,2,4] [--reps 3]
        a whole host SIGKILLed while it holds every lease and another host waits: seconds
        from the kill until the waiter has a lease, against the lease TTL (reclaim / TTL;
        the bound is 1 TTL plus a borrow: the dead host's last renewal was at most TTL/3
        before the kill, so reclaim/TTL lies between about 2/3 and 1 plus a round trip)
    python -m stress.redis_lease --figure hosts [--limit 3] [--workers 6] [--seconds 5]
        end-to-end publish rate (kombu over a redis broker, through mppools.producers) with
        the same limit L and the same number of workers: 1 host against 3 hosts
    python -m stress.redis_lease --figure idle [--seconds 10]
        CPU of an idle master (its lease keeper), its wake-ups and the lease scripts it runs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from mppools._limiter.redis import LeaseClient, keys

from ._bench_util import RedisProc, budget_name, interleave, median, paired_ratios

INCR = "return redis.call('INCR', KEYS[1])"
DECR = "return redis.call('DECR', KEYS[1])"


def _per_cycle(cycles: int, body: Callable[[], None]) -> Callable[[], float]:
    def sample() -> float:
        t0 = time.perf_counter()
        for _ in range(cycles):
            body()
        return (time.perf_counter() - t0) / cycles * 1e6  # microseconds per cycle

    return sample


def _deciles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    if not ordered:
        return (float("nan"), float("nan"))
    return (ordered[len(ordered) // 10], ordered[(len(ordered) * 9) // 10])


TESTS = Path(__file__).resolve().parents[1] / "tests"


def _hosts_module() -> Any:
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    from support import hosts

    return hosts


def reclaim_after_host_kill(ttls: tuple[float, ...] = (1.0, 2.0, 4.0), reps: int = 3,
                            limit: int = 2) -> dict[str, Any]:
    """Per TTL: seconds from SIGKILL of a host holding every lease to a lease granted to
    the waiting other host, ``reps`` times (each with new hosts and a new budget)."""
    hosts = _hosts_module()
    out: dict[str, Any] = {"limit": limit, "ttls": {}}
    tmp = Path(tempfile.mkdtemp(prefix="mppools-bench-reclaim-"))
    try:
        with hosts.CoordinationRedis(tmp / "coord") as coord:
            for ttl in ttls:
                spec = f"{coord.url}?lease_ttl={ttl}&fresh=1"
                times: list[float] = []
                for _ in range(reps):
                    name = budget_name()
                    a, b = hosts.Host(), hosts.Host()
                    try:
                        a.call(f"configure {name} {limit} {spec}")
                        a.call(f"workers {limit}")
                        for w in range(limit):
                            a.call(f"w {w} hold 10")
                        b.call(f"configure {name} {limit} {spec}")
                        b.call("workers 1")
                        b.call(f"wsend 0 acquire {10 * ttl + 30}")
                        time.sleep(min(ttl / 2, 0.5))  # b's master is waiting in the queue
                        t0 = time.monotonic()
                        a.kill()
                        answer = b.call("wget 0", timeout=10 * ttl + 60)
                        took = time.monotonic() - t0
                        if not answer.startswith("GOT"):
                            raise RuntimeError(f"no lease after the host kill: {answer}")
                        times.append(took)
                    finally:
                        a.kill()
                        b.kill()
                out["ttls"][str(ttl)] = {
                    "reclaim_s": [round(t, 3) for t in times],
                    "median_s": round(median(times), 3), "max_s": round(max(times), 3),
                    "median_over_ttl": round(median(times) / ttl, 3),
                    "max_over_ttl": round(max(times) / ttl, 3)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def publish_rate(n_hosts: int, limit: int, workers: int, seconds: float,
                 broker_url: str, coord_url: str) -> dict[str, float]:
    """Messages per second published by ``workers`` processes spread over ``n_hosts``
    simulated hosts sharing one budget of ``limit`` (each publish through
    mppools.producers; the pools are reset every 7 publishes: connections churn)."""
    hosts = _hosts_module()
    name = budget_name()
    queue = f"bench-{name}"
    tmp = Path(tempfile.mkdtemp(prefix="mppools-bench-hosts-"))
    stop = tmp / "stop"
    started: list[Any] = []
    per = [workers // n_hosts + (1 if i < workers % n_hosts else 0) for i in range(n_hosts)]
    try:
        for i in range(n_hosts):
            host = hosts.Host()
            started.append(host)
            host.call(f"configure {name} {limit} {coord_url}?lease_ttl=10&fresh=1")
            host.call(f"workers {per[i]}")
        t0 = time.monotonic()
        for i, host in enumerate(started):
            for w in range(per[i]):
                host.call(f"wsend {w} publoop {stop} 0 {broker_url} {queue} "
                          f"{tmp / f'h{i}w{w}.log'} h{i}w{w}")
        time.sleep(seconds)
        stop.touch()
        acked = failed = 0
        for i, host in enumerate(started):
            for w in range(per[i]):
                answer = host.call(f"wget {w}", timeout=120).split()
                acked += int(answer[1])
                failed += int(answer[2])
        elapsed = time.monotonic() - t0
    finally:
        for host in started:
            host.kill()
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(Exception):
            redis.Redis.from_url(broker_url).delete(queue)
    return {"hosts": n_hosts, "workers": workers, "limit": limit,
            "msgs_per_s": round(acked / elapsed, 1), "failed": failed}


def hosts_against_one(limit: int = 3, workers: int = 6, seconds: float = 5.0,
                      reps: int = 3) -> dict[str, Any]:
    """:func:`publish_rate` of 3 hosts and of 1 host, alternating, ``reps`` each."""
    broker, coord = RedisProc().start(), RedisProc().start()
    try:
        rates: dict[int, list[float]] = {1: [], 3: []}
        for _ in range(reps):
            for n in (1, 3):
                rates[n].append(publish_rate(n, limit, workers, seconds, broker.url + "/0",
                                             coord.url + "/0")["msgs_per_s"])
    finally:
        broker.stop()
        coord.stop()
    return {"limit": limit, "workers": workers, "seconds": seconds,
            "one_host_msgs_per_s": rates[1], "three_hosts_msgs_per_s": rates[3],
            "ratio_three_over_one_median": round(median(paired_ratios(rates[3], rates[1])), 3)}


_IDLE = """
import json, resource, sys, time
import mppools
url, name, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
mppools.configure(4, name=name, backend=url + "?lease_ttl=10&fresh=1", idle_timeout=None)
time.sleep(0.5)
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
wakes0, c0, t0 = mppools.stats().extra["keeper_wakes"], cpu(), time.monotonic()
time.sleep(seconds)
c1, t1 = cpu(), time.monotonic()
wakes1 = mppools.stats().extra["keeper_wakes"]
print(json.dumps({"cpu_pct_of_a_core": round(100 * (c1 - c0) / (t1 - t0), 3),
                  "wakes_per_s": round((wakes1 - wakes0) / (t1 - t0), 1)}))
mppools.close()
"""


def idle_master(seconds: float = 10.0) -> dict[str, Any]:
    """CPU and wake-ups of an idle master holding its leases, and the commands it sends."""
    server = RedisProc().start()
    try:
        r = redis.Redis.from_url(server.url)

        def scripts() -> int:
            stats = r.info("commandstats")
            return sum(int(stats.get(k, {}).get("calls", 0))
                       for k in ("cmdstat_evalsha", "cmdstat_eval"))

        before = scripts()
        t0 = time.monotonic()
        run = subprocess.run([sys.executable, "-c", _IDLE, server.url + "/0", budget_name(),
                              str(seconds)], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": str(TESTS.parent)})
        calls = scripts() - before
        result: dict[str, Any] = json.loads(run.stdout)
        # lease scripts (one round trip each), from configure to close
        result["scripts_per_s"] = round(calls / (time.monotonic() - t0), 1)
    finally:
        server.stop()
    return result


def fig_redis_hosts(quick: bool) -> list[Any]:
    """Rows for ``python -m stress bench`` (figure ``redis_hosts``)."""
    from stress.bench import Row

    rec = reclaim_after_host_kill((1.0, 2.0) if quick else (1.0, 2.0, 4.0), 1 if quick else 3)
    rows = []
    for ttl, r in rec["ttls"].items():
        rows.append(Row(f"redis_reclaim_ttl{ttl}", f"host kill to a lease elsewhere, ttl {ttl} s",
                        "s", r["max_s"], float(ttl), "lease ttl", r["max_over_ttl"],
                        "<= 1 ttl + a borrow", r["max_s"] <= float(ttl) + 0.5,
                        note=f"median {r['median_s']} s", samples_mppools=r["reclaim_s"]))
    e2e = hosts_against_one(seconds=2.0 if quick else 5.0, reps=1 if quick else 3)
    rows.append(Row("redis_hosts_e2e", "publish rate, 3 hosts vs 1 host, same L and workers",
                    "msg/s", median(e2e["three_hosts_msgs_per_s"]),
                    median(e2e["one_host_msgs_per_s"]), "1 host",
                    e2e["ratio_three_over_one_median"], "report", None, higher_is_better=True,
                    samples_mppools=e2e["three_hosts_msgs_per_s"],
                    samples_baseline=e2e["one_host_msgs_per_s"]))
    idle = idle_master(3.0 if quick else 10.0)
    rows.append(Row("redis_idle_master", "idle master CPU (lease keeper)", "% of a core",
                    idle["cpu_pct_of_a_core"], None, "", None, "report", None,
                    note=f"{idle['wakes_per_s']} wake-ups/s, "
                         f"{idle['scripts_per_s']} lease scripts/s"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stress.redis_lease", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--figure", choices=("lease", "reclaim", "hosts", "idle"),
                        default="lease")
    parser.add_argument("--cycles", type=int, default=2000, help="cycles per sample")
    parser.add_argument("--reps", type=int, default=None, help="samples per subject")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds at most")
    parser.add_argument("--ttls", default="1,2,4", help="reclaim: lease TTLs (seconds)")
    parser.add_argument("--limit", type=int, default=3, help="hosts: the budget's limit")
    parser.add_argument("--workers", type=int, default=6, help="hosts: workers in all")
    parser.add_argument("--seconds", type=float, default=None, help="hosts/idle: duration")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if args.figure != "lease":
        if args.figure == "reclaim":
            other = reclaim_after_host_kill(tuple(float(t) for t in args.ttls.split(",")),
                                            args.reps or 3)
        elif args.figure == "hosts":
            other = hosts_against_one(args.limit, args.workers, args.seconds or 5.0,
                                      args.reps or 3)
        else:
            other = idle_master(args.seconds or 10.0)
        print(json.dumps(other, indent=None if args.json else 1))
        return 0
    if args.reps is None:
        args.reps = 15

    server = RedisProc().start()
    try:
        r = redis.Redis.from_url(server.url)
        incr, decr = r.register_script(INCR), r.register_script(DECR)
        counter = f"mppools:bench:{budget_name()}"
        name = budget_name()
        lease = LeaseClient(server.url, name, "bench-host", ttl=10.0, limit=10, fresh=True)
        lease.join()

        def anchor() -> None:
            incr(keys=[counter])
            decr(keys=[counter])

        # the same pair on one dedicated connection, packed once: the floor of 2 round trips
        conn = r.connection_pool.make_connection()
        packed = [
            [b"*4\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(x), x) for x in
                                    (b"EVALSHA", sha.encode(), b"1", counter.encode()))]
            for sha in (incr.sha, decr.sha)]

        def anchor_raw() -> None:
            for command in packed:
                conn.send_packed_command(command)
                conn.read_response()

        def leased() -> None:
            lease.acquire(1)
            lease.release(1)

        for fn in (anchor, anchor_raw, leased):  # warm up: scripts loaded, connections open
            for _ in range(200):
                fn()
        samples = interleave([("anchor", _per_cycle(args.cycles, anchor)),
                              ("anchor_raw", _per_cycle(args.cycles, anchor_raw)),
                              ("lease", _per_cycle(args.cycles, leased))],
                             args.reps, args.budget)
        result: dict[str, object] = {"cycles_per_sample": args.cycles,
                                     "samples": len(samples["lease"])}
        for subject in ("anchor", "anchor_raw", "lease"):
            result[f"{subject}_us_median"] = round(median(samples[subject]), 2)
        for base in ("anchor", "anchor_raw"):
            ratios = paired_ratios(samples["lease"], samples[base])
            result[f"ratio_vs_{base}_median"] = round(median(ratios), 3)
            result[f"ratio_vs_{base}_p10_p90"] = [round(q, 3) for q in _deciles(ratios)]
        # server CPU per cycle (commandstats), the part the scripts add
        for label, fn in (("anchor", anchor_raw), ("lease", leased)):
            r.config_resetstat()
            for _ in range(args.cycles):
                fn()
            stat = r.info("commandstats").get("cmdstat_evalsha", {})
            result[f"server_us_per_cycle_{label}"] = round(stat.get("usec", 0) / args.cycles, 2)
        result["goal"] = 1.2
        conn.disconnect()
        r.delete(counter, *keys(name))
        lease.close()
    finally:
        server.stop()
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>20}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

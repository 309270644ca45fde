"""Cost of one cross-host lease: ``LeaseClient.acquire(1)`` + ``release(1)`` against the
anchor, a bare Lua ``INCR`` script and a bare Lua ``DECR`` script (two round trips, what the
cheapest Redis semaphore costs). Goal (issue 10): at most 1.2 times the anchor. Two anchors:
``anchor`` calls the scripts through redis-py as an application would (``register_script``),
``anchor_raw`` sends them packed once on one dedicated connection (the floor; the lease client
takes that path too).

    python -m stress.redis_lease [--cycles 2000] [--reps 15] [--budget 60]

A private redis-server on 127.0.0.1 (stopped by its pid), one client, one thread; the subjects
are sampled in rotating order (``interleave``) and compared by the median of paired ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stress.redis_lease", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=2000, help="cycles per sample")
    parser.add_argument("--reps", type=int, default=15, help="samples per subject")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds at most")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)

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

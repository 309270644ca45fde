"""Cost of one cross-host lease: ``LeaseClient.acquire(1)`` + ``release(1)`` against the
anchor, a bare Lua ``INCR`` script and a bare Lua ``DECR`` script (two round trips, what the
cheapest Redis semaphore costs). Goal (issue 10): at most 1.2 times the anchor.

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

        def leased() -> None:
            lease.acquire(1)
            lease.release(1)

        for fn in (anchor, leased):  # warm up: scripts loaded, connections open
            for _ in range(200):
                fn()
        samples = interleave([("anchor", _per_cycle(args.cycles, anchor)),
                              ("lease", _per_cycle(args.cycles, leased))],
                             args.reps, args.budget)
        ratios = paired_ratios(samples["lease"], samples["anchor"])
        result = {
            "cycles_per_sample": args.cycles,
            "samples": len(ratios),
            "anchor_us_median": round(median(samples["anchor"]), 2),
            "lease_us_median": round(median(samples["lease"]), 2),
            "ratio_median": round(median(ratios), 3),
            "ratio_min": round(min(ratios), 3),
            "ratio_max": round(max(ratios), 3),
            "goal": 1.2,
        }
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

"""Runs a tests/support CountingProxy in a process of its own.

Why: CountingProxy's loop does "sweep hang-ups, then accept()". In a process whose other
Python threads compete for the GIL (HTTP load threads, samplers), the proxy thread can be
switched out for milliseconds between the sweep and the accept; a client that closes and a
client that connects in that window (a slot handed over) are then counted the wrong way
round, and the proxy reports limit + 1 that never existed (reproduced: client-side max 3,
proxy peak 4). Alone in its process the window is microseconds, far below the time a
slot hand-off takes (close, release, wake the waiter, connect). It also sweeps hang-ups again
after accept() (``CountingProxy(settle_after_accept=True)``), unless ITEST_PROXY_STRICT=1.

Protocol on stdin/stdout, one JSON line each: prints {"port": P} when listening; then answers
"stats" with {"current", "peak", "total_accepted", "refused", "upstream_failures"},
"history" with [[monotonic, count], ...], "reset_peak" with {}; exits on "quit" or EOF.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from support.proxy import CountingProxy


def main() -> int:
    host, port = sys.argv[1], int(sys.argv[2])
    max_connections = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3] != "-" else None
    strict = os.environ.get("ITEST_PROXY_STRICT") == "1"
    with CountingProxy((host, port), max_connections=max_connections,
                       settle_after_accept=not strict) as proxy:
        print(json.dumps({"port": proxy.port}), flush=True)
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "stats":
                out: object = proxy.stats()
            elif cmd == "history":
                out = proxy.history
            elif cmd == "reset_peak":
                proxy.reset_peak()
                out = {}
            elif cmd == "quit":
                break
            else:
                out = {"error": cmd}
            print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

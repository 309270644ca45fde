"""Runs a tests/support CountingProxy in a process of its own.

Why: CountingProxy's loop does "sweep hang-ups, then accept()". In a process whose other
Python threads compete for the GIL (HTTP load threads, samplers), the proxy thread can be
switched out for milliseconds between the sweep and the accept; a client that closes and a
client that connects in that window (a slot handed over) are then counted the wrong way
round, and the proxy reports limit + 1 that never existed (reproduced: client-side max 3,
proxy peak 4). Alone in its process the window is microseconds, far below the time a
slot hand-off takes (close, release, wake the waiter, connect).

Protocol on stdin/stdout, one JSON line each: prints {"port": P} when listening; then answers
"stats" with {"current", "peak", "total_accepted", "refused", "upstream_failures"},
"history" with [[monotonic, count], ...], "reset_peak" with {}; exits on "quit" or EOF.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from support.proxy import CountingProxy


class SettledCountingProxy(CountingProxy):
    """CountingProxy that looks for hang-ups again AFTER accept() and before counting.

    The base loop sweeps hang-ups, then accepts. If the process is descheduled between the
    two (2 cores, 8 workers, a broker: it happens), a client that closed and a client that
    connected after it (a slot handed over) are counted the wrong way round: the proxy then
    reports limit + 1 for a fraction of a millisecond although, client side, the close
    returned before the connect started (measured: close logged 1.4 ms before the open,
    proxy still counted both). Any FIN sent before the new client's connect() is already
    queued on our sockets when accept() returns it, so sweeping after accept() orders them
    right. The price: a connection that closes in the microseconds between accept() and
    the sweep is not counted together with the new one; a real breach lasts much longer
    (plain kombu pools keep L+5 open for seconds).
    """

    def _sweep_until_quiet(self) -> None:
        for _ in range(8):
            events = [(k, m) for k, m in self._sel.select(timeout=0)
                      if k.data not in ("listener", "wake")]
            if not events:
                return
            for key, mask in events:
                self._handle(key.fileobj, mask)  # type: ignore[arg-type]

    def _accept_all(self) -> None:
        import errno

        while not self._stopping:
            self._sweep_until_quiet()
            try:
                client, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return
                raise
            self._sweep_until_quiet()  # hang-ups that happened before this connect
            if self.max_connections is not None and self._current >= self.max_connections:
                with contextlib.suppress(OSError):
                    client.close()
                with self._lock:
                    self._refused += 1
                continue
            self._open(client)


def main() -> int:
    host, port = sys.argv[1], int(sys.argv[2])
    max_connections = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3] != "-" else None
    strict = os.environ.get("ITEST_PROXY_STRICT") == "1"
    cls = CountingProxy if strict else SettledCountingProxy
    with cls((host, port), max_connections=max_connections) as proxy:
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

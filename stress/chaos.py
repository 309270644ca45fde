"""``python -m stress chaos``: forked publishers, one budget, SIGKILL chaos, measured.

    python -m stress chaos --broker rabbitmq|redis --workers N --limit L --minutes M

Starts a private broker (tests/support), a CountingProxy in a process of its own (so its
count is not skewed by this process's threads) with ``max_connections=L``, configures a
budget of L and forks N workers that publish through ``mppools.producers`` (each message
acknowledged: publisher confirms on RabbitMQ, LPUSH reply on Redis). Every ~2 s it SIGKILLs
a worker that holds a BUSY connection while someone waits, and times the reclaim (SIGKILL ->
the victim's slot reused); every ~5 s it parks the workers (their connections idle, slots
held) and times how long this process waits for an idle slot of another process (idle
yield). At the end: peak broker connections (proxy), refusals (proxy + broker), latencies
p50/p99, messages acknowledged vs found (consumed over a direct connection). Bounded;
every process it started is stopped by pid; the budget is removed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


class _Proxy:
    def __init__(self, port: int, max_connections: int) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO)]))
        self.proc = subprocess.Popen(
            [sys.executable, str(TESTS / "support" / "proxy_server.py"),
             "127.0.0.1", str(port), str(max_connections)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env,
            start_new_session=True,
        )
        self.port = int(json.loads(self._line())["port"])

    def _line(self) -> str:
        import select

        assert self.proc.stdout is not None
        if not select.select([self.proc.stdout], [], [], 15)[0]:
            raise TimeoutError("proxy did not answer")
        return self.proc.stdout.readline()

    def ask(self, cmd: str) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return json.loads(self._line())

    def url_for(self, url: str) -> str:
        import urllib.parse

        parts = urllib.parse.urlsplit(url)
        user = parts.netloc.rpartition("@")[0]
        netloc = f"{user}@127.0.0.1:{self.port}" if user else f"127.0.0.1:{self.port}"
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ask("quit")
        with contextlib.suppress(Exception):
            self.proc.wait(5)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def _worker(url: str, queue: str, workdir: Path, seed: int) -> None:
    """A forked publisher; leaves only through os._exit."""
    code = 0
    try:
        from kombu import Connection, Queue

        import mppools

        rng = random.Random(seed)
        q = Queue(queue, durable=True)
        conn = Connection(url, transport_options={"confirm_publish": True}, connect_timeout=5)
        acks = os.open(workdir / f"acks-{os.getpid()}", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        pause, stop = workdir / "pause", workdir / "stop"
        n = 0
        while not stop.exists():
            if pause.exists():
                time.sleep(0.005)
                continue
            n += 1
            mid = f"{os.getpid()}-{n}"
            try:
                with mppools.producers[conn].acquire(block=True, timeout=10) as producer:
                    producer.publish({"id": mid}, exchange="", routing_key=queue,
                                     declare=[q], retry=False, delivery_mode=2)
                    os.write(acks, f"{mid}\n".encode())
                    time.sleep(0.002)  # hold it busy a little: the chaos wants holders
            except Exception as exc:
                text = str(exc).lower()
                kind = "refused" if ("connection limit" in text or "max number" in text) \
                    else "error"
                with open(workdir / f"{kind}-{os.getpid()}", "a") as f:
                    f.write(f"{time.monotonic():.6f} {type(exc).__name__}: {str(exc)[:150]}\n")
                time.sleep(0.05)
            time.sleep(rng.uniform(0, 0.02))  # idle in the local pool
    except BaseException:
        code = 1
    finally:
        os._exit(code)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m stress chaos", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--broker", choices=("rabbitmq", "redis"), default="redis")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--limit", type=int, default=3)
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--kill-every", type=float, default=2.0)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.limit < 1 or not 0 < args.minutes <= 60:
        parser.error("need --workers >= 1, --limit >= 1, 0 < --minutes <= 60")
    sys.path.insert(0, str(TESTS))
    from support.servers import RabbitMQServer, RedisServer

    import mppools

    tmp = Path(tempfile.mkdtemp(prefix="mppools-chaos-"))
    name = f"chaos{os.getpid()}-{uuid.uuid4().hex[:6]}"
    queue = f"chaos{uuid.uuid4().hex[:6]}"
    server: Any = RabbitMQServer(tmp / "broker") if args.broker == "rabbitmq" else \
        RedisServer(tmp / "broker", maxclients=args.limit + 16)
    workers: dict[int, int] = {}
    proxy: _Proxy | None = None
    report: dict[str, Any] = {}
    kills: list[float] = []
    reclaim_ms: list[float] = []
    yield_ms: list[float] = []
    try:
        print(f"starting {args.broker}...", file=sys.stderr)
        server.start()
        direct = server.url
        if args.broker == "rabbitmq":
            server.add_vhost("chaos")
            server.set_vhost_max_connections("chaos", args.limit)
            direct = server.url_for_vhost("chaos")
        proxy = _Proxy(server.port, args.limit)
        url = proxy.url_for(direct)
        mppools.configure(args.limit, name, acquire_timeout=10.0)
        seed = 0

        def spawn() -> None:
            nonlocal seed
            seed += 1
            pid = os.fork()
            if pid == 0:
                _worker(url, queue, tmp, seed)
            workers[pid] = seed

        for _ in range(args.workers):
            spawn()
        start = time.monotonic()
        tty = sys.stderr.isatty()
        next_line = start
        end = start + args.minutes * 60
        next_kill, next_probe = start + args.kill_every, start + 3.0
        rng = random.Random(7)
        while time.monotonic() < end:
            now = time.monotonic()
            for pid in list(workers):  # reap and replace workers that died
                with contextlib.suppress(ChildProcessError):
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        del workers[pid]
                        spawn()
            if now >= next_kill:
                st = mppools.stats()
                busy = [h.pid for h in st.holders if h.busy and h.pid in workers]
                if busy and st.waiting:
                    victim = rng.choice(busy)
                    os.kill(victim, signal.SIGKILL)
                    t_kill = time.monotonic()
                    kills.append(t_kill)
                    # slot reused: the victim's record is gone (reclaimed by a waiter's
                    # audit, handed straight on in the same critical section)
                    while time.monotonic() - t_kill < 5:
                        if all(h.pid != victim for h in mppools.stats().holders):
                            reclaim_ms.append((time.monotonic() - t_kill) * 1000)
                            break
                        time.sleep(0.0005)
                    next_kill = time.monotonic() + args.kill_every
            if now >= next_probe:
                (tmp / "pause").touch()
                time.sleep(0.2)  # workers park; their connections sit idle holding slots
                limiter = mppools._config.current()
                held = []
                assert limiter is not None
                for _ in range(args.limit):
                    if not any(h.idle for h in mppools.stats().holders):
                        break
                    t0 = time.monotonic()
                    try:
                        held.append(limiter.acquire(block=True, timeout=5))
                    except mppools.LimitExceeded:
                        break
                    yield_ms.append((time.monotonic() - t0) * 1000)
                for slot in held:
                    limiter.release(slot)
                (tmp / "pause").unlink()
                next_probe = time.monotonic() + 5.0
            done = min(1.0, (time.monotonic() - start) / (end - start))
            bar = "#" * int(done * 30)
            stats = proxy.ask("stats")
            line = (f"[{bar:<30}] {done:4.0%} kills={len(kills)} "
                    f"peak={stats['peak']} refused={stats['refused']} ")
            if tty:
                sys.stderr.write("\r" + line)
                sys.stderr.flush()
            elif time.monotonic() >= next_line:  # no terminal: a plain line every 10 s
                sys.stderr.write(line + "\n")
                next_line = time.monotonic() + 10.0
            time.sleep(0.05)
        sys.stderr.write("\n")
        (tmp / "stop").touch()
        deadline = time.monotonic() + 15
        while workers and time.monotonic() < deadline:
            for pid in list(workers):
                with contextlib.suppress(ChildProcessError):
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        del workers[pid]
            time.sleep(0.05)
        pstats = proxy.ask("stats")
        acked: set[str] = set()
        refused_broker = errors = 0
        for f in tmp.iterdir():
            if f.name.startswith("acks-"):
                lines = f.read_text().split("\n")
                acked.update(x for x in lines[:-1] if x)  # a killed writer's last line may
            elif f.name.startswith("refused-"):         # be cut: only whole lines count
                refused_broker += len(f.read_text().splitlines())
            elif f.name.startswith("error-"):
                errors += len(f.read_text().splitlines())
        from kombu import Connection

        found: set[str] = set()
        drained = False
        with Connection(direct, connect_timeout=5) as conn:
            channel = conn.default_channel
            # bounded, but long enough for long runs (~1,000 messages/s at the very least)
            t_end = time.monotonic() + max(120.0, len(acked) / 1000.0)
            while time.monotonic() < t_end:
                message = channel.basic_get(queue, no_ack=True)
                if message is None:
                    drained = True
                    break
                found.add(channel.message_to_python(message).decode()["id"])
        st = mppools.stats()
        report = {
            "broker": args.broker, "workers": args.workers, "limit": args.limit,
            "minutes": args.minutes, "kills": len(kills),
            "peak_broker_connections": pstats["peak"],
            "connections_opened": pstats["total_accepted"],
            "refusals_proxy": pstats["refused"], "refusals_broker": refused_broker,
            "other_publish_errors": errors,
            "reclaim_ms_p50": _pct(reclaim_ms, 50), "reclaim_ms_p99": _pct(reclaim_ms, 99),
            "reclaim_samples": len(reclaim_ms),
            "idle_yield_ms_p50": _pct(yield_ms, 50), "idle_yield_ms_p99": _pct(yield_ms, 99),
            "idle_yield_samples": len(yield_ms),
            "messages_acknowledged": len(acked), "messages_found": len(found),
            # a drain cut short by its time bound proves nothing about losses: say so
            "queue_drained": drained,
            "acknowledged_but_missing": len(acked - found) if drained else None,
            "reclaimed_total": st.reclaimed_total, "timeouts_total": st.timeouts_total,
        }
    finally:
        with contextlib.suppress(Exception):
            (tmp / "stop").touch()
        for pid in list(workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        with contextlib.suppress(Exception):
            mppools.close(unlink=True)
        if proxy is not None:
            proxy.close()
        with contextlib.suppress(Exception):
            server.stop()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            shown = f"{value:.2f}" if isinstance(value, float) else value
            print(f"{key:>28}: {shown}")
    ok = (report.get("peak_broker_connections", args.limit + 1) <= args.limit
          and report.get("acknowledged_but_missing", 1) == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

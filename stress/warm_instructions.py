"""Figure 1b: the warm path in instructions, counted by cachegrind (``valgrind``).

Timing a 20 µs operation on a shared 2-core machine moves by more than the 5 % the goal
allows; an instruction count does not. Each subject runs ``producers[conn].acquire()`` with
its release ``n`` times on a ``memory://`` connection (after warming it) in a fresh
interpreter under ``valgrind --tool=cachegrind``, and once more with ``n = 0``: the
difference over ``n`` is what one warm acquire and release costs, without the import,
the setup and the exit. mppools and kombu.pools are counted side by side, two interpreters
at a time. Skipped (said so) where valgrind is not installed.

A third subject, ``pressure``, is mppools while another process waits for the budget's
only slot and the holder's turn lasts (a hold quantum of a minute): every release then
runs the pressure path (the use counted for lending, the keeper asked to look again), what
a tight loop pays per message under contention. Its waiter runs outside valgrind.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

__all__ = ["fig_warm_instructions"]

#: The child: ``python -c CHILD who n name``; who is "mppools", "kombu" or "pressure".
CHILD = """
import sys
who, n, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
from kombu import Connection
waiter = None
if who == "kombu":
    import kombu.pools
    group = kombu.pools.producers
else:
    import mppools
    if who == "pressure":  # one slot, a turn that outlasts the run
        from mppools import pools
        pools.QUANTUM_PER_SETUP = 1e9
        mppools.configure(limit=1, name=name, hold_quantum=60.0)
    else:
        mppools.configure(limit=8, name=name)
    group = mppools.producers
conn = Connection("memory://")
try:
    for _ in range(2):
        with group[conn].acquire(block=True):
            pass
    if who == "pressure":
        import subprocess, time
        held = group[conn].acquire(block=True)  # held while the waiter comes: not yielded
        waiter = subprocess.Popen([sys.executable, "-c", WAITER, name])
        for _ in range(6000):  # 60 s at most
            if mppools.stats().waiting or waiter.poll() is not None:
                break
            time.sleep(0.01)
        held.release()
        if not mppools.stats().waiting:
            sys.exit(f"the waiter never waited (exit code {waiter.poll()})")
        for _ in range(2):
            with group[conn].acquire(block=True):
                pass
    for _ in range(n):
        with group[conn].acquire(block=True):
            pass
    if waiter is not None and mppools.stats().waiting != 1:
        sys.exit(f"the waiter was not waiting throughout: {mppools.stats()}")
finally:
    if waiter is not None:  # never left behind, whatever happened above
        waiter.kill()
        waiter.wait()
    if who != "kombu":
        mppools.close()
"""

#: The pressure subject's waiter (``python -c WAITER name``, not under valgrind).
WAITER = """
import sys
import mppools
from kombu import Connection
mppools.configure(limit=1, name=sys.argv[1])
mppools.producers[Connection("memory://")].acquire(block=True, timeout=600)
"""

_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")


def _count(who: str, n: int) -> int:
    """Instructions of one child run (valgrind's ``I refs``)."""
    name = f"bench-instr-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent),
               PYTHONHASHSEED="0")
    proc = subprocess.run(
        ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
         sys.executable, "-c", f"WAITER = {WAITER!r}\n{CHILD}", who, str(n), name],
        capture_output=True, text=True, env=env, timeout=600, check=False)
    match = _REFS.search(proc.stderr)
    if proc.returncode != 0 or match is None:
        tail = proc.stderr.strip().splitlines()[-3:]
        raise RuntimeError(f"cachegrind run of {who} (n={n}) failed with exit code "
                           f"{proc.returncode}: {' / '.join(tail)}")
    return int(match.group(1).replace(",", ""))


def fig_warm_instructions(quick: bool) -> tuple[dict[str, Any] | None, str | None]:
    """Instructions per warm acquire and release, mppools and kombu.pools.

    Returns ``(result, None)`` with ``result = {"n": n, "mppools": per_op, "kombu":
    per_op, "pressure": per_op}``, or ``(None, why)`` when the figure cannot be measured
    here.
    """
    if shutil.which("valgrind") is None:
        return None, "1b. warm path in instructions: skipped: valgrind not installed"
    n = 200 if quick else 5000
    subjects = ("mppools", "kombu", "pressure")
    runs = [(who, k) for who in subjects for k in (0, n)]
    with ThreadPoolExecutor(2) as pool:
        counts = dict(zip(runs, pool.map(lambda r: _count(*r), runs), strict=True))
    per_op = {who: (counts[(who, n)] - counts[(who, 0)]) / n for who in subjects}
    return {"n": n, **per_op}, None

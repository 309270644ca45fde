"""Figure 1b: the warm path in instructions, counted by cachegrind (``valgrind``).

Timing a 20 µs operation on a shared 2-core machine moves by more than the 5 % the goal
allows; an instruction count does not. Each subject runs ``producers[conn].acquire()`` with
its release ``n`` times on a ``memory://`` connection (after warming it) in a fresh
interpreter under ``valgrind --tool=cachegrind``, and once more with ``n = 0``: the
difference over ``n`` is what one warm acquire and release costs, without the import,
the setup and the exit. mppools and kombu.pools are counted side by side, two interpreters
at a time. Skipped (said so) where valgrind is not installed.
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

#: The child: ``python -c CHILD who n name``; who is "mppools" or "kombu".
CHILD = """
import sys
who, n, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
from kombu import Connection
if who == "mppools":
    import mppools
    mppools.configure(limit=8, name=name)
    group = mppools.producers
else:
    import kombu.pools
    group = kombu.pools.producers
conn = Connection("memory://")
for _ in range(2):
    with group[conn].acquire(block=True):
        pass
for _ in range(n):
    with group[conn].acquire(block=True):
        pass
if who == "mppools":
    mppools.close()
"""

_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")


def _count(who: str, n: int) -> int:
    """Instructions of one child run (valgrind's ``I refs``)."""
    name = f"bench-instr-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent),
               PYTHONHASHSEED="0")
    proc = subprocess.run(
        ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
         sys.executable, "-c", CHILD, who, str(n), name],
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
    per_op}``, or ``(None, why)`` when the figure cannot be measured here.
    """
    if shutil.which("valgrind") is None:
        return None, "1b. warm path in instructions: skipped: valgrind not installed"
    n = 200 if quick else 5000
    runs = [(who, k) for who in ("mppools", "kombu") for k in (0, n)]
    with ThreadPoolExecutor(2) as pool:
        counts = dict(zip(runs, pool.map(lambda r: _count(*r), runs), strict=True))
    per_op = {who: (counts[(who, n)] - counts[(who, 0)]) / n for who in ("mppools", "kombu")}
    return {"n": n, **per_op}, None

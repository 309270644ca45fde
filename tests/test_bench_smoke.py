"""Smoke test of ``python -m stress bench --quick``: the machinery runs and the JSON holds
every figure with numeric values. No timing assertion: this is a benchmark, not a test."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: figure keys that must be present with numeric mppools / baseline / ratio values
REQUIRED = [
    "warm_memory",
    "slot",
    "slot_ref_multiprocessing_boundedsemaphore",
    "slot_ref_fcntl_lockf",
    "reclaim",
    "idle_yield",
    "footprint_slot_bytes",
    "footprint_segment_bytes",
    "footprint_threads",
    "footprint_rss",
]
REDIS_ONLY = ["warm_redis", "slot_ref_redis", "e2e_redis_L8", "e2e_redis_L4", "e2e_redis_L2"]
#: figure 8 (stress/e2e_contention.py), quick plan: L in (2, 4), 0 and 20 ms per connect
E2E_CONTENTION = [f"e2ec_redis_L{lim}_d{ms}_{what}" for lim in (2, 4) for ms in (0, 20)
                  for what in ("throughput", "vs_connect", "p99_wait", "fairness", "peak")]
CONTENTION_PREFIXES = ["contention_throughput_", "contention_fairness_",
                       "contention_flatness_"]
#: figure 9 (stress/gunicorn_load.py), quick plan: 200 and 800 req/s, 0 and 20 ms per connect
GUNICORN = [f"gunicorn_r{rate}_d{ms}_{what}" for rate in (200, 800) for ms in (0, 20)
            for what in ("p50", "p50_vs_connect", "p99", "p99_vs_connect", "rate", "peak")]


def _numeric(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(
        value)


@pytest.mark.slow
def test_bench_quick_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "stress", "bench", "--quick", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| figure | mppools | baseline (name) | ratio | target | met? |" in proc.stdout
    result = json.loads(out.read_text())
    figures = result["figures"]
    required = list(REQUIRED)
    if shutil.which("redis-server"):
        required += REDIS_ONLY
    if shutil.which("valgrind"):  # 1b: counted by cachegrind where it is installed
        required.append("warm_instructions")
    else:
        assert any(line.startswith("1b. ") and "valgrind not installed" in line
                   for line in result["skipped"]), result["skipped"]
    for key in required:
        assert key in figures, f"missing figure {key}"
        row = figures[key]
        for field in ("mppools", "baseline", "ratio"):
            assert _numeric(row[field]), f"{key}.{field} = {row[field]!r}"
        assert row["baseline_name"]
    for prefix in CONTENTION_PREFIXES:
        rows = [v for k, v in figures.items() if k.startswith(prefix)]
        assert rows, f"no {prefix}* figure"
        for row in rows:
            assert _numeric(row["mppools"]) and _numeric(row["baseline"])
    assert result["contention"], "no contention detail"
    if shutil.which("redis-server"):
        for key in E2E_CONTENTION:
            assert key in figures, f"missing figure {key}"
            row = figures[key]
            assert _numeric(row["mppools"]) and _numeric(row["baseline"]), row
            if key.endswith(("_throughput", "_vs_connect", "_peak")):
                assert _numeric(row["ratio"]), row
                assert row["higher_is_better"] == (not key.endswith("_peak"))
            if key.endswith("_peak"):  # the proxy's count: the cap held (not a timing)
                assert row["met"] is True, row
    for row in figures.values():
        # optional reference rows: numbers, or explicitly skipped
        assert _numeric(row["mppools"]) or row["note"] == "skipped: not installed"
    assert result["meta"]["mode"] == "quick"


def _gunicorn_installed() -> bool:
    try:
        import gunicorn  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.skipif(not shutil.which("redis-server"), reason="redis-server not installed")
@pytest.mark.skipif(not _gunicorn_installed(), reason="gunicorn not installed")
def test_bench_quick_gunicorn_figure(tmp_path: Path) -> None:
    """Figure 9 alone: real gunicorn (8 sync workers) under open-loop load, three
    configurations; the rows are numeric and the proxy counted at most L=3 for mppools."""
    out = tmp_path / "bench.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "stress", "bench", "--quick", "--only", "gunicorn", "--json",
         str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = json.loads(out.read_text())["figures"]
    for key in GUNICORN:
        assert key in figures, f"missing figure {key}"
        row = figures[key]
        for field in ("mppools", "baseline", "ratio"):
            assert _numeric(row[field]), f"{key}.{field} = {row[field]!r}"
        assert row["higher_is_better"] == key.endswith("_rate"), row
        if key.endswith(("_p50", "_p99", "_vs_connect")):
            assert "lower is better" in row["figure"], row
        if key.endswith("_peak"):  # the proxy's count: the cap held (not a timing)
            assert row["met"] is True and row["mppools"] <= 3, row
    assert not any(k.startswith("gunicorn_") and k not in GUNICORN for k in figures)


def test_chaos_dispatch_is_lazy() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "stress", "nonsense"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    if not (ROOT / "stress" / "chaos.py").exists():
        proc = subprocess.run([sys.executable, "-m", "stress", "chaos"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 2
        assert "chaos" in proc.stderr

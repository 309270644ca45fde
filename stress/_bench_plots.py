"""PNG plots of a ``python -m stress bench --json`` result (optional: needs matplotlib)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["plot"]


def plot(result: dict[str, Any], out: Path) -> list[Path]:
    """Write the plots of ``result`` into ``out``; returns the files written (none, with a
    message, when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib)")
        return []
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    figures: dict[str, dict[str, Any]] = result["figures"]
    mode = result["meta"].get("mode", "?")

    # ratios against their baselines, where a ratio target exists
    rows = [r for r in figures.values() if r.get("ratio") is not None and "x" in r["target"]
            and r["target"] != "-"]
    if rows:
        fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
        labels = [r["figure"].replace("3. ", "").replace(", worst N", "")[:60] for r in rows]
        values = [r["ratio"] for r in rows]
        colors = ["tab:green" if r["met"] else "tab:red" for r in rows]
        ax.barh(range(len(rows)), values, color=colors)
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.set_xscale("log")
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xlabel("ratio to baseline (log; green = target met)")
        ax.set_title(f"mppools vs named baselines ({mode} run)")
        ax.invert_yaxis()
        fig.tight_layout()
        written.append(_save(fig, out / "ratios.png", plt))

    detail: list[dict[str, Any]] = result.get("contention") or []
    if detail:
        limits = sorted({d["limit"] for d in detail})
        cs_values = sorted({d["cs_us"] for d in detail})
        fig, axes = plt.subplots(1, len(cs_values), figsize=(5 * len(cs_values), 4),
                                 squeeze=False)
        for ax, cs in zip(axes[0], cs_values, strict=True):
            for lim in limits:
                ds = sorted((d for d in detail if d["limit"] == lim and d["cs_us"] == cs),
                            key=lambda d: d["n"])
                ns = [d["n"] for d in ds]
                line = ax.plot(ns, [d["mppools_ops_s"] for d in ds], "o-",
                               label=f"mppools L={lim}")[0]
                ax.plot(ns, [d["raw_ops_s"] for d in ds], "s--", color=line.get_color(),
                        alpha=0.6, label=f"raw posix L={lim}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("processes N")
            ax.set_ylabel("aggregate ops/s")
            ax.set_title(f"contention, critical section {cs} us")
            ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, out / "contention.png", plt))

    lat = [(k, figures[k]) for k in ("reclaim", "idle_yield", "warm_memory", "warm_redis")
           if k in figures and figures[k].get("samples_mppools")]
    if lat:
        fig, axes = plt.subplots(1, len(lat), figsize=(3.6 * len(lat), 4), squeeze=False)
        for ax, (_key, r) in zip(axes[0], lat, strict=True):
            ax.boxplot([r["samples_mppools"], r["samples_baseline"]])
            ax.set_xticks([1, 2], ["mppools", r["baseline_name"][:22]], fontsize=7)
            ax.set_ylabel(r["unit"])
            ax.set_title(r["figure"][:38], fontsize=8)
        fig.tight_layout()
        written.append(_save(fig, out / "latency.png", plt))
    for path in written:
        print(f"plot written: {path}")
    return written


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("usage: python -m stress._bench_plots RESULT.json OUTDIR", file=sys.stderr)
        sys.exit(2)
    plot(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))

"""PNG plots of a ``python -m stress bench --json`` result (optional: needs matplotlib).

Every plot says in its title or axis label whether higher or lower is better, every title
is distinct, long labels are wrapped, and files are saved with ``bbox_inches="tight"`` so
nothing is cut off:

- ``e2e_contention.png``: figure 8, msg/s of 8 workers on L slots beside kombu.pools with L
  workers and connect-per-publish, and the p99 acquire wait;
- ``e2e_sweep.png``: figure 8's hold-quantum sweep, throughput ratio and acquire waits
  against the cap Q (``hold_quantum``; each connection's quantum is fitted to the
  hand-over cost under that cap);
- ``gunicorn.png``: figure 9, request latency p50 and p99 of gunicorn's 8 sync workers
  through mppools (L=3), kombu.pools (one pool per worker) and connect-per-publish;
- ``ratios.png``: every ratio that has a target, split into lower-is-better and
  higher-is-better panels, the target marked on each bar;
- ``contention.png``: figure 3, aggregate ops/s against the number of processes;
- ``latency.png``: the distributions behind figures 1, 4 and 5.
"""

from __future__ import annotations

import json
import math
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

__all__ = ["plot"]

_E2EC = re.compile(r"^e2ec_(?P<broker>[a-z]+)_L(?P<limit>\d+)_d(?P<delay>\d+)_throughput$")
_GUNICORN = re.compile(r"^gunicorn_r(?P<rate>[\d.]+)_d(?P<delay>\d+)_p50$")
_SWEEP = re.compile(r"^e2ec_sweep_(?P<broker>[a-z]+)_L(?P<limit>\d+)_d(?P<delay>\d+)"
                    r"_q(?P<q>[\d.]+)ms$")
_WAITS = re.compile(r"p99 (?P<p99>[\d.e+-]+) ms, p99\.9 (?P<p999>[\d.e+-]+) ms, max "
                    r"(?P<max>[\d.e+-]+) ms")
_DEFAULT_Q = re.compile(r"hold_quantum (?P<q>[\d.]+) s \(the default\)")
_TARGET = re.compile(r"^(?P<op><=|>=)\s*(?P<value>[\d.]+)x")

_MPPOOLS, _KOMBU, _CONNECT = "tab:blue", "tab:gray", "tab:red"


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
    figures: dict[str, dict[str, Any]] = result["figures"]
    mode = result["meta"].get("mode", "?")
    written = [path for path in (
        _e2e_contention(plt, figures, mode, out / "e2e_contention.png"),
        _sweep(plt, figures, mode, out / "e2e_sweep.png"),
        _gunicorn(plt, figures, mode, out / "gunicorn.png"),
        _ratios(plt, figures, mode, out / "ratios.png"),
        _contention(plt, result.get("contention") or [], mode, out / "contention.png"),
        _latency(plt, figures, mode, out / "latency.png"),
    ) if path is not None]
    for path in written:
        print(f"plot written: {path}")
    return written


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(text, width, break_long_words=False)) or text


def _x(value: float) -> str:
    """A ratio as text: 3 decimals near 1 (1.049 and 1.051 differ against a 1.05 target)."""
    return f"{value:.3f}\u00d7" if 0.1 <= value < 10 else f"{value:.3g}\u00d7"


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _num(value: Any) -> float | None:
    if isinstance(value, int | float) and not math.isnan(float(value)):
        return float(value)
    return None


# 8. end to end under contention ---------------------------------------------------------------
def _e2e_contention(plt: Any, figures: dict[str, dict[str, Any]], mode: str,
                    path: Path) -> Path | None:
    cases: dict[str, list[tuple[int, int, str]]] = {}
    for key in figures:
        m = _E2EC.match(key)  # the sweep's rows have a plot of their own
        if m:
            cases.setdefault(m["broker"], []).append(
                (int(m["limit"]), int(m["delay"]), key[: -len("_throughput")]))
    if not cases:
        return None
    brokers = sorted(cases, key=lambda b: (b != "redis", b))
    fig, axes = plt.subplots(len(brokers), 2, figsize=(12, 4.3 * len(brokers)),
                             squeeze=False, gridspec_kw={"width_ratios": [3, 2]})
    for row, broker in enumerate(brokers):
        items = sorted(cases[broker])
        labels = [f"L={lim}\n+{d} ms/connect" for lim, d, _ in items]
        thr = [figures[f"{k}_throughput"] for _, _, k in items]
        vs_connect = [figures.get(f"{k}_vs_connect", {}) for _, _, k in items]
        xs = range(len(items))
        ax = axes[row][0]
        w = 0.27
        mp = [_num(r["mppools"]) or 0.0 for r in thr]
        kb = [_num(r["baseline"]) or 0.0 for r in thr]
        cp = [_num(r.get("baseline")) or 0.0 for r in vs_connect]
        ax.bar([x - w for x in xs], mp, w, color=_MPPOOLS, label="mppools: 8 workers, L slots")
        ax.bar(list(xs), kb, w, color=_KOMBU,
               label="kombu.pools: L workers (what L connections carry)")
        ax.bar([x + w for x in xs], cp, w, color=_CONNECT,
               label="new Connection per publish: 8 workers")
        top = max(mp + kb + cp + [1.0])
        for x, r, value in zip(xs, thr, mp, strict=True):
            ratio = _num(r.get("ratio"))
            if ratio is not None:
                ax.annotate(_x(ratio), (x - w, value), ha="center", va="bottom",
                            fontsize=8, xytext=(0, 2), textcoords="offset points")
        ax.set_ylim(0, top * 1.18)
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.set_ylabel("msg/s (higher is better)")
        ax.set_title(_wrap(f"8. {broker}: throughput under contention; label = mppools "
                           "\u00f7 kombu.pools (higher is better, target \u2265 0.8\u00d7)",
                           70), fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
        ax = axes[row][1]
        p99 = [_num(figures.get(f"{k}_p99_wait", {}).get("mppools")) for _, _, k in items]
        p99_kb = [_num(figures.get(f"{k}_p99_wait", {}).get("baseline")) for _, _, k in items]
        w = 0.38
        ax.bar([x - w / 2 for x in xs], [v or 0.0 for v in p99], w, color=_MPPOOLS,
               label="mppools, 8 workers")
        ax.bar([x + w / 2 for x in xs], [v or 0.0 for v in p99_kb], w, color=_KOMBU,
               label="kombu.pools, L workers")
        for x, v in zip(xs, p99, strict=True):
            if v:
                ax.annotate(f"{v:.3g} ms", (x - w / 2, v), ha="center", va="bottom",
                            fontsize=7, xytext=(0, 2), textcoords="offset points")
        if any(v for v in p99 + p99_kb):
            from matplotlib import ticker

            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.tick_params(axis="y", which="minor", labelsize=7)
            lo, hi = ax.get_ylim()
            ax.set_ylim(lo, hi * 1.6)  # room for the value labels
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.set_ylabel("p99 acquire wait, ms (log; lower is better)")
        ax.set_title(_wrap(f"8. {broker}: p99 wait for producers[conn].acquire() "
                           "(lower is better)", 50), fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"8. End to end under contention: 8 workers publishing, L broker "
                 f"connections ({mode} run)", fontsize=11)
    fig.tight_layout()
    return _save(fig, path, plt)


def _sweep(plt: Any, figures: dict[str, dict[str, Any]], mode: str,
           path: Path) -> Path | None:
    sweeps: dict[tuple[str, int, int], list[tuple[float, dict[str, Any]]]] = {}
    for key, r in figures.items():
        m = _SWEEP.match(key)
        if m:
            sweeps.setdefault((m["broker"], int(m["limit"]), int(m["delay"])), []).append(
                (float(m["q"]), r))
    if not sweeps:
        return None
    default_q = None
    for r in figures.values():
        m = _DEFAULT_Q.search(str(r.get("note", "")))
        if m:
            default_q = float(m["q"]) * 1e3
            break
    fig, axes = plt.subplots(1, len(sweeps), figsize=(7.5 * len(sweeps), 4.6), squeeze=False)
    for ax, ((broker, limit, delay), points) in zip(axes[0], sorted(sweeps.items()),
                                                     strict=True):
        points.sort(key=lambda p: p[0])
        qs = [q for q, _ in points]
        xs = list(range(len(qs)))
        ratios = [_num(r.get("ratio")) for _, r in points]
        ax.plot(xs, [v if v is not None else math.nan for v in ratios], "o-",
                color=_MPPOOLS, label="throughput \u00f7 kombu.pools, L workers (left)")
        ax.axhline(0.8, color=_MPPOOLS, ls=":", lw=1, label="target 0.8\u00d7")
        for x, v in zip(xs, ratios, strict=True):
            if v is not None:
                ax.annotate(_x(v), (x, v), ha="center", va="bottom", fontsize=8,
                            xytext=(0, 3), textcoords="offset points")
        ax.set_ylim(0, max([v for v in ratios if v is not None] + [1.0]) * 1.2)
        ax.set_ylabel("throughput ratio (higher is better)", color=_MPPOOLS)
        ax.set_xticks(xs, [f"{q:g}" + (" (default)" if default_q is not None
                                       and abs(q - default_q) < 1e-6 else "") for q in qs],
                      fontsize=8)
        ax.set_xlabel(_wrap("hold_quantum cap Q, ms (each connection's quantum: 12\u00d7 the "
                            "budget's average hand-over cost, at least 10 ms, at most Q)",
                            70), fontsize=8)
        waits = [_WAITS.search(str(r.get("note", ""))) for _, r in points]
        twin = ax.twinx()
        for field, style, label in (("p99", "s--", "p99 acquire wait (right)"),
                                    ("max", "^:", "max acquire wait (right)")):
            ys = [float(m[field]) if m else math.nan for m in waits]
            twin.plot(xs, ys, style, color=_CONNECT, label=label,
                      alpha=1.0 if field == "p99" else 0.6)
        if any(m for m in waits):
            twin.set_yscale("log")
        twin.set_ylabel("acquire wait, ms (log; lower is better)", color=_CONNECT)
        lines = ax.get_legend_handles_labels()
        more = twin.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="upper center",
                  bbox_to_anchor=(0.5, -0.24), ncol=2)
        ax.set_title(_wrap(f"8. hold-quantum cap sweep ({broker}, L={limit}, +{delay} ms per "
                           f"connect, 8 workers): a higher cap carries more messages per "
                           f"connection and makes waiters wait longer ({mode} run)", 64),
                     fontsize=9)
    fig.tight_layout()
    return _save(fig, path, plt)


# 9. gunicorn-shaped load ----------------------------------------------------------------------
def _gunicorn(plt: Any, figures: dict[str, dict[str, Any]], mode: str,
              path: Path) -> Path | None:
    cases = sorted((int(m["delay"]), float(m["rate"]), key[: -len("_p50")])
                    for key in figures if (m := _GUNICORN.match(key)))
    if not cases:
        return None
    from matplotlib import ticker

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), squeeze=False)
    labels = [f"{rate:g} req/s\n+{d} ms/connect" for d, rate, _ in cases]
    xs = list(range(len(cases)))
    w = 0.27
    for ax, q in zip(axes[0], ("p50", "p99"), strict=True):
        vs_kb = [figures.get(f"{k}_{q}", {}) for _, _, k in cases]
        vs_cp = [figures.get(f"{k}_{q}_vs_connect", {}) for _, _, k in cases]
        series = ((-w, [_num(r.get("mppools")) for r in vs_kb], _MPPOOLS,
                   "mppools: 8 workers, L=3 slots"),
                  (0.0, [_num(r.get("baseline")) for r in vs_kb], _KOMBU,
                   "kombu.pools: one pool per worker (up to 8 connections)"),
                  (w, [_num(r.get("baseline")) for r in vs_cp], _CONNECT,
                   "new Connection per request"))
        for dx, ys, color, label in series:
            ax.bar([x + dx for x in xs], [v or 0.0 for v in ys], w, color=color, label=label)
            for x, v in zip(xs, ys, strict=True):
                if v:
                    ax.annotate(f"{v:,.0f}" if v >= 100 else f"{v:.3g}", (x + dx, v),
                                ha="center", va="bottom",
                                fontsize=6, xytext=(0, 2), textcoords="offset points")
        if any(v for _, ys, _, _ in series for v in ys):
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            lo, hi = ax.get_ylim()
            ax.set_ylim(lo, hi * 1.8)  # room for the value labels
        ax.set_xticks(xs, labels, fontsize=8)
        ax.set_ylabel(f"request latency {q}, ms (log; lower is better)")
        ax.set_title(_wrap(f"9. gunicorn, 8 sync workers, one publish per request: {q} "
                           f"latency from the scheduled send (lower is better; {mode} run)",
                           60), fontsize=9)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=8, loc="lower center", ncol=3,
               bbox_to_anchor=(0.5, -0.06))
    fig.tight_layout()
    return _save(fig, path, plt)


# every ratio with a target ----------------------------------------------------------------------
def _short(figure: str) -> str:
    text = figure.replace("3. contention throughput, worst N", "3. contention, worst N")
    text = text.replace(" per new connection)", "/connect)")
    text = text.replace(": 8 workers on L vs kombu.pools, L workers", ", 8 workers on L slots")
    return _wrap(text, 46)


def _ratios(plt: Any, figures: dict[str, dict[str, Any]], mode: str,
            path: Path) -> Path | None:
    panels: dict[str, list[tuple[dict[str, Any], float]]] = {"<=": [], ">=": []}
    for key, r in figures.items():
        m = _TARGET.match(str(r.get("target", "")))
        if m and _num(r.get("ratio")) is not None and not _SWEEP.match(key):
            panels[m["op"]].append((r, float(m["value"])))
    panels = {op: rows for op, rows in panels.items() if rows}
    if not panels:
        return None
    from matplotlib import ticker

    heights = [0.42 * len(rows) + 1.2 for rows in panels.values()]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, sum(heights) + 0.6), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    titles = {"<=": "cost ratios: mppools \u00f7 baseline, lower is better (target: at most "
                    "the black tick)",
              ">=": "throughput ratios: mppools \u00f7 baseline, higher is better (target: at "
                    "least the black tick)"}
    for ax, (op, rows) in zip(axes[:, 0], panels.items(), strict=True):
        ys = range(len(rows))
        values = [float(r["ratio"]) for r, _ in rows]
        colors = ["tab:green" if r.get("met") else "tab:red" for r, _ in rows]
        ax.barh(list(ys), values, color=colors)
        ax.plot([t for _, t in rows], list(ys), "|", color="k", ms=16, mew=2)
        for y, v in zip(ys, values, strict=True):
            ax.annotate(_x(v), (v, y), va="center", fontsize=7, xytext=(3, 0),
                        textcoords="offset points")
        ax.set_yticks(list(ys), [_short(r["figure"]) for r, _ in rows], fontsize=7)
        ax.axvline(1.0, color="k", lw=0.6, alpha=0.5)
        spread = max(values + [t for _, t in rows]) / max(min(values), 1e-9)
        if spread > 20:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            lo, hi = ax.get_xlim()
            ax.set_xlim(lo, hi * 3)  # room for the value labels
            scale = "log"
        else:
            ax.set_xlim(0, max(values + [t for _, t in rows]) * 1.15)
            scale = "linear"
        ax.set_xlabel(f"ratio to the named baseline ({scale}; green = target met, "
                      "red = missed)")
        ax.set_title(f"{titles[op]} ({mode} run)", fontsize=9)
        ax.invert_yaxis()
    fig.tight_layout()
    return _save(fig, path, plt)


# 3. contention ---------------------------------------------------------------------------------
def _contention(plt: Any, detail: list[dict[str, Any]], mode: str,
                path: Path) -> Path | None:
    if not detail:
        return None
    limits = sorted({d["limit"] for d in detail})
    cs_values = sorted({d["cs_us"] for d in detail})
    fig, axes = plt.subplots(1, len(cs_values), figsize=(5.5 * len(cs_values), 4.4),
                             squeeze=False)
    for ax, cs in zip(axes[0], cs_values, strict=True):
        for lim in limits:
            ds = sorted((d for d in detail if d["limit"] == lim and d["cs_us"] == cs),
                        key=lambda d: d["n"])
            ns = [d["n"] for d in ds]
            line = ax.plot(ns, [d["mppools_ops_s"] for d in ds], "o-",
                           label=f"mppools L={lim}")[0]
            ax.plot(ns, [d["raw_ops_s"] for d in ds], "s--", color=line.get_color(),
                    alpha=0.6, label=f"raw posix_ipc L={lim}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("processes N")
        ax.set_ylabel("aggregate acquire+release ops/s (log; higher is better)")
        ax.set_title(f"3. slot contention, critical section {cs} us ({mode} run)",
                     fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path, plt)


# 1, 4, 5: distributions -------------------------------------------------------------------------
def _latency(plt: Any, figures: dict[str, dict[str, Any]], mode: str,
             path: Path) -> Path | None:
    lat = [figures[k] for k in ("warm_memory", "warm_redis", "reclaim", "idle_yield")
           if k in figures and figures[k].get("samples_mppools")]
    if not lat:
        return None
    fig, axes = plt.subplots(1, len(lat), figsize=(3.8 * len(lat), 4.6), squeeze=False)
    for ax, r in zip(axes[0], lat, strict=True):
        ax.boxplot([r["samples_mppools"], r["samples_baseline"] or [math.nan]])
        ax.set_xticks([1, 2], ["mppools", _wrap(r["baseline_name"], 18)], fontsize=7)
        ax.set_ylabel(f"{r['unit']} (lower is better)")
        ax.set_title(_wrap(r["figure"], 30), fontsize=8)
    fig.suptitle(f"Distributions of the repetitions behind figures 1, 4 and 5 ({mode} run; "
                 "lower is better)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path, plt)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("usage: python -m stress._bench_plots RESULT.json OUTDIR", file=sys.stderr)
        sys.exit(2)
    plot(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))

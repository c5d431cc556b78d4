"""Turn a study's per-seed rows into mean ± std tables, JSON and a trade-off plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..cache import write_text_atomic

COLUMNS = ("UA", "RA", "TA", "MIA", "gap", "time_s")
HEADERS = {"UA": "UA", "RA": "RA", "TA": "TA", "MIA": "MIA", "gap": "Avg. Gap",
           "time_s": "time (s)"}


def aggregate(result: dict) -> dict[str, dict[str, tuple[float, float]]]:
    """``{row name: {column: (mean, std)}}`` over seeds (std with ddof=0 for one seed)."""
    names = list(result["runs"][0]["rows"])
    out = {}
    for name in names:
        cols = {}
        for c in COLUMNS + ("val_gap",):
            vals = [r["rows"][name][c] for r in result["runs"] if c in r["rows"][name]]
            if vals:
                cols[c] = (float(np.mean(vals)), float(np.std(vals, ddof=1 if len(vals) > 1 else 0)))
        out[name] = cols
    return out


def markdown_table(result: dict, with_std: bool = True) -> str:
    agg = aggregate(result)
    labels = result["config"].get("labels", {})
    retrain_t = float(np.mean([r["retrain_time_s"] for r in result["runs"]]))
    head = ["method"] + [HEADERS[c] for c in COLUMNS] + ["time / retrain"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, cols in agg.items():
        cells = [labels.get(name, name)]
        for c in COLUMNS:
            if c not in cols:
                cells.append("")
                continue
            m, s = cols[c]
            cells.append(f"{m:.2f}" + (f" ± {s:.2f}" if with_std and len(result["runs"]) > 1 else ""))
        t = cols.get("time_s", (0.0, 0.0))[0]
        cells.append("-" if name == "Original" else f"{100 * t / retrain_t:.1f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) else str(v)


def chosen_hparams(result: dict) -> str:
    """One line per method: the configuration validation chose for each seed."""
    lines = []
    for name in result["config"]["methods"]:
        hps = [r["rows"][name].get("hparams", {}) for r in result["runs"]]
        grid_keys = set().union(*(g.keys() for g in result["config"]["grids"][name]))
        short = ["{" + ", ".join(f"{k}={_fmt(h[k])}" for k in sorted(grid_keys)) + "}" for h in hps]
        lines.append(f"- {name}: " + "; ".join(short))
    return "\n".join(lines)


def plot_tradeoff(result: dict, path: str | Path) -> Path:
    """Forget metric (UA) against test accuracy, one point per method (mean ± std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(result)
    labels = result["config"].get("labels", {})
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    for name, cols in agg.items():
        (ta, ta_s), (ua, ua_s) = cols["TA"], cols["UA"]
        if name == "Retrain":
            ax.errorbar(ta, ua, xerr=ta_s, yerr=ua_s, fmt="*", ms=16, color="black",
                        label="Retrain (gold)", zorder=5)
            ax.axhline(ua, color="black", lw=0.6, ls=":")
            ax.axvline(ta, color="black", lw=0.6, ls=":")
        else:
            marker = "s" if name == "Original" else ("o" if name.startswith("OFMU") else "^")
            ax.errorbar(ta, ua, xerr=ta_s, yerr=ua_s, fmt=marker, ms=7, capsize=2,
                        label=f"{labels.get(name, name)} (gap {cols['gap'][0]:.2f})")
    cfg = result["config"]
    ax.set_xlabel("test accuracy TA (%)")
    ax.set_ylabel("forget-set error UA (%)")
    ax.set_title(f"{cfg['dataset']}, {cfg['scenario']} forgetting, {len(result['runs'])} seeds")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_outputs(result: dict, out_dir: str | Path) -> dict[str, Path]:
    """``results.json``, ``results.md`` and ``tradeoff.png`` named by dataset and scenario."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = result["config"]
    stem = f"{cfg['dataset']}-{cfg['scenario']}"
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md",
             "png": out / f"{stem}-tradeoff.png"}
    # Atomic: an interrupted or failing write leaves the previous results in place.
    write_text_atomic(json.dumps(result, indent=1), paths["json"])
    md = [f"# {cfg['dataset']}, {cfg['scenario']} forgetting ({len(result['runs'])} seeds)", "",
          markdown_table(result), "", "Chosen on validation (per seed):", "",
          chosen_hparams(result), ""]
    write_text_atomic("\n".join(md), paths["md"])
    plot_tradeoff(result, paths["png"])
    return paths

"""Markdown, JSON and the TOFU-style plot (forget quality on a log axis against model utility)."""

from __future__ import annotations

import json
from pathlib import Path

from ..cache import write_text_atomic

COLS = (("forget_quality", "FQ", "{:.2g}"), ("model_utility", "MU", "{:.3f}"),
        ("forget_prob", "forget prob", "{:.3f}"), ("forget_rouge", "forget ROUGE-L", "{:.3f}"),
        ("forget_tr", "forget TR", "{:.3f}"), ("mia_auc", "MIA AUC", "{:.3f}"),
        ("retain_prob", "retain prob", "{:.3f}"), ("world_prob", "world prob", "{:.3f}"))


def _fmt(v, f, std=None):
    s = f.format(v)
    return s if std is None or std <= 1e-9 * max(abs(v), 1e-300) else f"{s} ± {f.format(std)}"


def markdown_table(result: dict) -> str:
    cfg = result["config"]
    out = [f"Authors benchmark, model {cfg['model']}, seeds {list(cfg['seeds'])}, budget "
           f"{cfg['budget']} gradient evaluations, {cfg['device']} ({cfg['cpu']}, "
           f"{cfg['threads']} threads)."]
    for pct, split in result["splits"].items():
        fa = split["forget_authors"]
        out += ["", f"### forget {pct}% ({fa['test']} test authors, {split['test']['n_forget_qa']} "
                f"questions; val {fa['val']} authors)", "",
                "| method | " + " | ".join(c[1] for c in COLS) + " | steps | time s | peak MB |",
                "|---" * (len(COLS) + 4) + "|"]
        for who in ("target", "retain"):
            row = split["test"][who]
            out.append(f"| {who} model | " + " | ".join(_fmt(row[k], f) for k, _, f in COLS)
                       + " | | | |")
        for name, e in split["methods"].items():
            m = e["mean"]
            cells = [_fmt(m[k][0], f, m[k][1]) for k, _, f in COLS]
            out.append(f"| {name} | " + " | ".join(cells)
                       + f" | {m['steps'][0]:.0f} | {m['time_s'][0]:.1f} | {m['peak_mem_mb'][0]:.0f} |")
    out += ["", "Hyperparameters (chosen on the validation split, or set beforehand where a method's "
            "grid has one configuration):"]
    for pct, split in result["splits"].items():
        for name, e in split["methods"].items():
            hp = {k: v for k, v in e["chosen"].items() if k in ("lr", "inner_lr")}
            how = f"chosen from {len(e['validation'])}" if e["validation"] else "set beforehand"
            out.append(f"- forget {pct}%, {name}: {hp} ({how})")
    return "\n".join(out)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = result["splits"]
    fig, axes = plt.subplots(1, len(splits), figsize=(5 * len(splits), 4.2), squeeze=False)
    markers = "osD^v<>ph*"
    for ax, (pct, split) in zip(axes[0], splits.items()):
        for who, style in (("target", dict(marker="X", color="k")),
                           ("retain", dict(marker="*", color="gold", edgecolor="k", s=180))):
            r = split["test"][who]
            ax.scatter(max(r["forget_quality"], 1e-30), r["model_utility"], label=f"{who} model",
                       zorder=3, **({"s": 90} | style))
        for i, (name, e) in enumerate(split["methods"].items()):
            m = e["mean"]
            ax.errorbar(max(m["forget_quality"][0], 1e-30), m["model_utility"][0],
                        yerr=m["model_utility"][1] or None, fmt=markers[i % len(markers)],
                        label=name, ms=7)
        ax.axvline(0.05, ls="--", lw=0.8, color="grey")
        ax.set_xscale("log")
        ax.set_xlabel("forget quality (KS p-value, log)")
        ax.set_ylabel("model utility")
        ax.set_title(f"{result['config']['model']}: forget {pct}%")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: dict, out: str | Path) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"authors-{result['config']['model']}"
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
    write_text_atomic(json.dumps(result, indent=1, default=str), paths["json"])  # never half-written
    write_text_atomic(markdown_table(result) + "\n", paths["md"])
    try:
        plot(result, paths["png"])
    except ImportError:
        del paths["png"]
    return paths

"""Markdown, JSON and the plots of a benchmark result: per split, the validation frontier of
every method (forget quality on a log axis against model utility) with the test result of the
validation-chosen configuration marked, and the budget curves."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from ...files import replace_atomic, write_text_atomic
from .config import LMConfig
from .methods import ALL_METHODS as DEFAULT_ORDER
from .summary import FQ_OK, MATCH_FACTOR, MATCHED, MU_SHARE, REFERENCE

COLS = (("forget_quality", "FQ", "{:.2g}"), ("model_utility", "MU", "{:.3f}"),
        ("mu_ratio", "MU / retain", "{:.2f}"), ("forget_prob", "forget prob", "{:.3f}"),
        ("neighbour_prob_rel", "neighbour prob / target", "{:.2f}"),
        ("world_prob_rel", "world prob / base", "{:.3f}"), ("fluency_rel", "ppl / target", "{:.2f}"),
        ("mia_auc", "MIA AUC", "{:.2f}"), ("grad_evals", "grad evals", "{:.0f}"))


def _fmt(pair, f) -> str:
    mean, std = pair
    s = f.format(mean)
    return s if std <= 1e-9 * max(abs(mean), 1e-300) else f"{s} ± {f.format(std)}"


def _header(result: dict) -> list[str]:
    cfg = result["config"]
    status = "complete" if result.get("complete") else "PARTIAL (interrupted or still running)"
    done = sorted(result.get("worlds", {}))
    return [f"Authors benchmark, model {cfg['model']}, preset {cfg['preset']} ({status}); data seeds "
            f"{list(cfg['data_seeds'])} (finished or running: {done}), unlearning seeds "
            f"{list(cfg['seeds'])}; "
            f"budget {cfg['budget']} gradient evaluations, checkpoints {list(cfg['checkpoints'])}; "
            f"learning rates {list(cfg['lrs'])} (OFMU-paper, plain SGD: {list(cfg['sgd_lrs'])}); "
            f"{cfg['device']} ({cfg['cpu']}, {cfg['threads']} threads).",
            "",
            "Each row: the configuration (learning rate, budget checkpoint) chosen on the validation "
            "pool of each data seed, run on the test pool once per unlearning seed; mean ± sample "
            "spread over data seeds of the per-seed means. `FQ>0.05` counts data seeds whose test "
            f"forget quality exceeds {FQ_OK}; `target` counts those that also keep MU >= "
            f"{MU_SHARE} x the retain model's."]


def _held(s: dict, who: str) -> str:
    """``who``'s forget probability and membership-attack AUC on the test pool, if recorded."""
    if f"{who}_forget_prob" not in s:
        return ""
    return (f", forget prob {_fmt(s[f'{who}_forget_prob'], '{:.3f}')}, MIA AUC "
            f"{_fmt(s[f'{who}_mia_auc'], '{:.2f}')}")


_PART_NAMES = {"retain_prob": "retain prob", "retain_rouge": "retain ROUGE",
               "retain_tr": "retain truth ratio", "world_prob": "world prob",
               "world_rouge": "world ROUGE", "world_tr": "world truth ratio"}


def _mu_parts(s: dict) -> str:
    parts = s.get("retain_mu_parts")
    if not parts:
        return ""
    text = ", ".join(f"{_PART_NAMES[k]} {v[0]:.3f}" for k, v in parts.items())
    low = min(parts, key=lambda k: parts[k][0])
    return (f" The retain model's MU is the harmonic mean of {text}; it moves most with its "
            f"smallest part, {_PART_NAMES[low]}.")


def _cannot_choose(s: dict) -> str:
    seeds = s.get("val_target_passes")
    if not seeds:
        return ""
    return (f" **On data seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))} the untouched "
            f"target already has FQ >= {FQ_OK} on the validation pool**: there validation cannot tell "
            "forgetting from not, so the choice (best MU at FQ > 0.05) picks the highest validation "
            "utility, usually the earliest checkpoint, and that seed's `target` count decides nothing.")


def markdown_table(result: dict) -> str:
    out = _header(result)
    for pct, s in result.get("summary", {}).items():
        n_q = sorted(set(s["n_forget_qa"]))
        out += ["", f"### forget {pct}% ({'/'.join(map(str, n_q))} test questions; data seeds "
                f"{s['data_seeds']})", "",
                f"retain model MU {_fmt(s['retain_mu'], '{:.3f}')}{_held(s, 'retain')}; target model FQ "
                f"{_fmt(s['target_fq'], '{:.2g}')}, MU {_fmt(s['target_mu'], '{:.3f}')}{_held(s, 'target')}."
                + (" A method has forgotten where its forget prob and MIA AUC are near the retain "
                   "model's; far below them it over-forgets (the forget answers become less likely "
                   "than unseen ones)." if "retain_forget_prob" in s else "")
                + _cannot_choose(s) + _mu_parts(s), "",
                "| method | " + " | ".join(c[1] for c in COLS)
                + " | FQ>0.05 | target | val frontier: best MU at FQ>0.05 | chosen lr@budget |",
                "|---" * (len(COLS) + 5) + "|"]
        for name, m in s["methods"].items():
            cells = [_fmt(m["agg"][k], f) if k in m["agg"] else "" for k, _, f in COLS]
            lrs = ", ".join(f"{p['lr']:g}@{p['fraction']:g}" for p in m["per_seed"])
            best = m.get("frontier_best_mu")
            best = "none" if best is None else f"{best:.3f}"
            out.append(f"| {name} | " + " | ".join(cells)
                       + f" | {m['n_fq_ok']}/{m['n']} | {m['n_target']}/{m['n']} | {best} | {lrs} |")
        diverged = [f"{name}: {sum(p.get('n_diverged', 0) for p in m['per_seed'])} test runs, "
                    f"{sum(p.get('val_diverged', 0) for p in m['per_seed'])} validation points"
                    for name, m in s["methods"].items()
                    if any(p.get("n_diverged") or p.get("val_diverged") for p in m["per_seed"])]
        if diverged:
            out += ["", "Diverged (non-finite weights or losses; scored FQ 0, MU 0, other metrics left "
                    "out): " + "; ".join(diverged) + "."]
        out += _paired_table(s)
        out += _matched_table(s)
    out += ["", "Methods:"] + [f"- {n}: {d}" for n, d in result.get("methods", {}).items()]
    return "\n".join(out)


def _paired_table(s: dict) -> list[str]:
    """Each data seed's validation frontier (best MU / the retain model's at FQ >= 0.05), and its
    difference to OFMU's shipped defaults on the same data seeds (mean ± standard error)."""
    if not any("paired" in m for m in s["methods"].values()):
        return []
    out = ["", f"Per data seed, paired with {REFERENCE} (the shipped defaults) on the same seeds: the "
           "validation frontier as best MU / the retain model's at FQ > 0.05 (`-`: no validation "
           "point reaches it), and the mean difference to OFMU's ± its standard error over the seeds "
           "where both have one.", "",
           "| method | frontier per data seed | seeds without | difference to OFMU (seeds) |",
           "|---|---|---|---|"]
    for name, m in s["methods"].items():
        front = " ".join("-" if p.get("frontier_rel") is None else f"{p['frontier_rel']:.2f}"
                         for p in m["per_seed"])
        none = sum(p.get("frontier_rel") is None for p in m["per_seed"])
        pr = m.get("paired")
        if pr is None:
            diff = "(reference)" if name == REFERENCE else ""
        elif pr["diff"] is None:
            diff = f"n/a ({pr['n_both']})"
        else:
            diff = _difference(pr, "{:.3f}", "({})")
        out.append(f"| {name} | {front} | {none}/{len(m['per_seed'])} | {diff} |")
    return out


def _difference(pr: dict, f: str, seeds: str) -> str:
    """A paired difference as ``+d ± se`` and the number of seeds it is over."""
    se = "" if pr["se"] is None else f" ± {f.format(pr['se'])}"
    signed = f.replace("{:", "{:+")
    return f"{signed.format(pr['diff'])}{se} {seeds.format(pr['n_both'])}"


_MATCHED_NAMES = {k: name for k, name, _ in COLS}


def _matched_table(s: dict) -> list[str]:
    """What each method keeps once it has forgotten as far as the retain model (validation pool),
    with the paired difference to OFMU's shipped defaults."""
    if not any("matched" in m for m in s["methods"].values()):
        return []
    out = ["", f"At matched forgetting (validation pool): over the validation points whose forget prob "
           f"is at most {MATCH_FACTOR:g} x the retain model's, the best each reaches (highest; lowest "
           "perplexity), mean ± spread over the data seeds that have such a point, then the "
           f"difference to {REFERENCE}'s on the same seeds ± its standard error [seeds where both have one].",
           "", "| method | seeds with a point | " + " | ".join(_MATCHED_NAMES[k] for k, _ in MATCHED) + " |",
           "|---" * (len(MATCHED) + 2) + "|"]
    for name, m in s["methods"].items():
        at = m.get("matched")
        if at is None:
            continue
        cells = []
        for k, _ in MATCHED:
            if k not in at:
                cells.append("-")
                continue
            cell = _fmt(at[k], "{:.2f}")
            pr = at.get("paired", {}).get(k)
            if pr is not None and pr["diff"] is not None:
                cell += "; " + _difference(pr, "{:.2f}", "[{}]")
            cells.append(cell)
        out.append(f"| {name} | {at['n']}/{at['of']} | " + " | ".join(cells) + " |")
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result.get("summary", {})
    if not summary:
        return
    n = len(summary)
    fig, axes = plt.subplots(2, n, figsize=(5.5 * n, 8.4), squeeze=False)
    n_methods = max(len(s["methods"]) for s in summary.values())
    cmap, n_colours = (plt.get_cmap("tab10"), 10) if n_methods <= 10 else (plt.get_cmap("tab20"), 20)
    markers = "osD^v<>ph*PX"  # with the colours, distinct for up to 60 methods
    for j, (pct, s) in enumerate(summary.items()):
        ax, bx = axes[0][j], axes[1][j]
        for i, (name, m) in enumerate(s["methods"].items()):
            c, mk = cmap(i % n_colours), markers[i % len(markers)]
            pts = sorted(m["frontier"], key=lambda p: p["log10_fq"])
            ax.scatter([10 ** p["log10_fq"] for p in pts], [p["model_utility"] for p in pts], color=c,
                       marker=mk, s=12, alpha=0.45)
            a = m["agg"]
            ax.errorbar(max(a["forget_quality"][0], 1e-30), a["model_utility"][0], yerr=a["model_utility"][1],
                        color=c, marker=mk, ms=9, mec="k", label=name, zorder=4)
            cv = m["curve"]
            bx.plot([p["grad_evals"] for p in cv], [p["model_utility"] for p in cv], color=c, marker=mk,
                    label=name)
        ax.axhline(s["retain_mu"][0], color="gold", lw=1.2, label="retain model MU")
        ax.axhline(MU_SHARE * s["retain_mu"][0], color="gold", lw=0.8, ls=":")
        ax.axvline(FQ_OK, ls="--", lw=0.8, color="grey")
        ax.set_xscale("log")
        ax.set_xlabel("forget quality (KS p-value, log)")
        ax.set_ylabel("model utility")
        ax.set_title(f"{result['config']['model']}: forget {pct}% (small: val points; large: test, chosen)",
                     fontsize=9)
        bx.set_xlabel("gradient evaluations")
        bx.set_ylabel("val model utility at the chosen lr")
        bx.set_title(f"forget {pct}%: budget curve (validation)", fontsize=9)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def _paths(out: Path, stem: str) -> dict[str, Path]:
    return {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}


def write_outputs(result: dict, out: str | Path, partial: bool = False) -> dict:
    """``authors-<model>[-smoke].{json,md,png}`` in ``out``, each written atomically.

    ``partial``: a running benchmark's progress, written as ``authors-<model>-partial.*`` so that
    an interrupted run never replaces the results of an earlier complete one by less; the final
    write removes those files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = result["config"]
    preset = cfg.get("preset")
    stem = f"authors-{cfg['model']}" + (f"-{preset}" if preset not in (None, "power") else "")
    paths = _paths(out, stem + "-partial" if partial else stem)
    write_text_atomic(json.dumps(result, indent=1, default=str), paths["json"])
    write_text_atomic(markdown_table(result) + "\n", paths["md"])
    try:
        if not result.get("summary"):
            raise ImportError  # nothing to plot yet
        replace_atomic(paths["png"], lambda f: plot(result, f))
    except ImportError:
        del paths["png"]
    if not partial:
        for leftover in _paths(out, stem + "-partial").values():
            leftover.unlink(missing_ok=True)
    return paths


def _only(result: dict, keep: list[str]) -> dict:
    """``result`` restricted to the methods in ``keep``; complete if every data seed and split
    it was asked for has each of its kept methods (an interrupted run whose missing methods are
    left out is whole for the rest)."""
    cfg = result["config"]
    names = [m for m in cfg["methods"] if m in keep]
    worlds = {ds: {**w, "splits": {pct: {**split, "methods": {m: e for m, e in split["methods"].items()
                                                             if m in names}}
                                   for pct, split in w["splits"].items()}}
              for ds, w in result["worlds"].items()}
    whole = all(str(ds) in worlds and str(pct) in worlds[str(ds)]["splits"]
                and set(names) <= set(worlds[str(ds)]["splits"][str(pct)]["methods"])
                for ds in cfg["data_seeds"] for pct in cfg["forget"])
    if cfg.get("rho_probe") and cfg.get("model") == "tiny":  # the runner's last step of a world
        whole = whole and all("rho_probe" in worlds.get(str(ds), {}) for ds in cfg["data_seeds"])
    return {**result, "config": {**cfg, "methods": names}, "worlds": worlds,
            "methods": {m: d for m, d in result.get("methods", {}).items() if m in names},
            "complete": bool(result.get("complete")) or whole}


def merge(results: list[dict], methods: list[str] | None = None) -> dict:
    """One result from runs of the same configuration on different data seeds, forget
    percentages or methods (for example one process per data seed, split and group of methods):
    their worlds, splits and methods together, the summary recomputed. A (data seed, split,
    method) may appear only once. ``methods``: keep only these (each must be in some run), for
    example to leave out the methods an interrupted run did not reach."""
    from .summary import summarize

    if not results:
        raise ValueError("nothing to merge")
    if methods is not None:
        if not methods:
            raise ValueError("methods: an empty list keeps nothing")
        ran = {m for r in results for m in r["config"]["methods"]}
        unknown = [m for m in methods if m not in ran]
        if unknown:
            raise ValueError(f"methods {unknown} are in none of the runs (they have {sorted(ran)})")
        results = [_only(r, list(methods)) for r in results]
    # what may differ: the parts run, where the models were cached, the preset's name (its
    # settings are compared one by one) and the machine (listed in the merged config)
    skip = ("data_seeds", "threads", "forget", "methods", "cache", "preset", "cpu")
    defaults = json.loads(json.dumps(asdict(LMConfig()), default=str))  # a setting a run predates

    def settings(r):
        return {**{k: v for k, v in defaults.items() if k not in skip},
                **{k: v for k, v in r["config"].items() if k not in skip}}
    base = settings(results[0])
    worlds: dict = {}
    for r in results:
        other = settings(r)
        if other != base:
            diff = sorted(k for k in set(base) | set(other) if base.get(k) != other.get(k))
            raise ValueError(f"cannot merge runs whose settings differ: {diff}")
        for ds, w in r["worlds"].items():
            into = worlds.setdefault(ds, {**w, "splits": {}})
            for pct, split in w["splits"].items():
                if pct not in into["splits"]:
                    into["splits"][pct] = {**split, "methods": dict(split["methods"])}
                    continue
                dup = set(into["splits"][pct]["methods"]) & set(split["methods"])
                if dup:
                    raise ValueError(f"data seed {ds}, forget {pct}%: methods {sorted(dup)} appear in "
                                     "more than one run")
                into["splits"][pct]["methods"].update(split["methods"])
    seeds = sorted({int(s) for r in results for s in r["config"]["data_seeds"]})
    forget = sorted({f for r in results for f in r["config"]["forget"]}, reverse=True)
    names = [m for r in results for m in r["config"]["methods"]]
    methods = [m for m in DEFAULT_ORDER if m in names] + sorted(set(names) - set(DEFAULT_ORDER))
    docs = {k: v for r in results for k, v in r.get("methods", {}).items()}
    for w in worlds.values():
        for split in w["splits"].values():
            split["methods"] = {m: split["methods"][m] for m in methods if m in split["methods"]}
    cpus = list(dict.fromkeys(str(r["config"].get("cpu")) for r in results))
    out = {**results[0], "config": {**results[0]["config"], "data_seeds": seeds, "forget": forget,
                                    "methods": methods, "cpu": "; ".join(cpus)},
           "methods": {m: docs[m] for m in methods if m in docs},
           "worlds": {k: worlds[k] for k in sorted(worlds, key=int)},
           "complete": all(r.get("complete") for r in results),
           "total_time_s": sum(r.get("total_time_s", 0) for r in results)}
    for w in out["worlds"].values():
        w["splits"] = {k: w["splits"][k] for k in sorted(w["splits"], key=float, reverse=True)}
    out["summary"] = summarize(out)
    return out


def main(argv=None) -> int:
    """``python -m ofmu.studies.lm.report OUT_DIR RESULT.json ...``: merge per-seed runs."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m ofmu.studies.lm.report",
                                description="merge authors-benchmark results of different data seeds")
    p.add_argument("out")
    p.add_argument("results", nargs="+")
    p.add_argument("--methods", help="comma-separated: keep only these methods (for example those an "
                                     "interrupted run finished)")
    args = p.parse_args(argv)
    keep = None if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    merged = merge([json.loads(Path(f).read_text()) for f in args.results], methods=keep)
    paths = write_outputs(merged, args.out)
    print(markdown_table(merged))
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

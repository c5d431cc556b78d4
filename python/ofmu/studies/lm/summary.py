"""Aggregate a benchmark result over data seeds: per split and method, the test numbers of the
validation-chosen configuration (mean over unlearning seeds per data seed, then mean and sample
spread over data seeds), how many data seeds reach the targets, the validation frontier and
the budget curve."""

from __future__ import annotations

import math

import numpy as np

FQ_OK = 0.05  # forget quality the KS test must not reject
MU_PARTS = ("retain_prob", "retain_rouge", "retain_tr", "world_prob", "world_rouge", "world_tr")
MU_SHARE = 0.95  # the target: model utility at least this share of the retain model's
# "matched forgetting": a validation point whose forget probability is at most this many times the
# retain model's has forgotten about as far as a model that never saw the forget facts
MATCH_FACTOR = 2.0
# what a method keeps at matched forgetting, and which way is better
MATCHED = (("neighbour_prob_rel", max), ("world_prob_rel", max), ("fluency_rel", min), ("mu_ratio", max))
KEYS = ("forget_quality", "model_utility", "mu_ratio", "forget_prob", "forget_rouge", "mia_auc",
        "neighbour_prob_rel", "neighbour_rouge_rel", "world_prob_rel", "world_rouge_rel",
        "fluency_rel", "grad_evals", "time_s", "peak_mem_mb")


def _mean(vals) -> float:
    return float(np.mean(vals))


def agg(vals) -> list[float]:
    """[mean, sample std] (std 0 for one value)."""
    a = np.asarray(vals, dtype=np.float64)
    return [float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0]


def mean_std(rows: list[dict]) -> dict:
    """Per numeric key that every row has: [mean, sample std] over ``rows`` (std 0 for a single
    row). A diverged row has only forget quality and utility, so the rest is left out: a mean over
    the rows that did not diverge would hide them."""
    out = {}
    for k, v in rows[0].items():
        if (isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("seed", "data_seed")
                and all(k in r for r in rows)):
            out[k] = agg([r[k] for r in rows])
    return out


def matched(entry: dict, val_retain: dict) -> dict | None:
    """What a method keeps once it has forgotten as far as the retain model, on the validation
    pool: over its validation points whose forget probability is at most ``MATCH_FACTOR`` x the
    retain model's, the most neighbour-fact probability (relative to the target), world-fact
    probability (relative to the base), MU (relative to the retain model) and the lowest held-out
    perplexity (relative to the target) any of them reaches, and how many points qualified;
    ``None`` when no point forgot that far. Nothing is chosen from these numbers, so they stay on
    validation. Diverged points (no forget probability) never qualify."""
    level = MATCH_FACTOR * val_retain["forget_prob"]
    pts = [{**r, "mu_ratio": r["model_utility"] / val_retain["model_utility"]}
           for r in entry["validation"] if "forget_prob" in r and r["forget_prob"] <= level]
    if not pts:
        return None
    return {"n_points": len(pts), **{k: best(p[k] for p in pts) for k, best in MATCHED}}


def _per_seed(entry: dict, retain_mu: float, val_retain: dict, ds: str) -> dict:
    tests = entry["test"]
    val_retain_mu = val_retain["model_utility"]
    ok = [r["model_utility"] / val_retain_mu for r in entry["validation"] if r["forget_quality"] >= FQ_OK]
    row = {"data_seed": int(ds), "lr": entry["chosen"]["hparams"]["lr"],
           "fraction": entry["chosen"]["fraction"],
           # this data seed's validation frontier: best MU / the retain model's at FQ >= 0.05
           "frontier_rel": max(ok) if ok else None}
    means = mean_std(tests)
    for k in KEYS:
        if k in means:
            row[k] = means[k][0]
    row["mu_ratio"] = row["model_utility"] / retain_mu  # the retain model's MU divides every run
    row["n_diverged"] = sum(bool(r.get("diverged")) for r in tests)
    row["val_diverged"] = sum(bool(r.get("diverged")) for r in entry["validation"])
    row["fq_ok"] = row["forget_quality"] > FQ_OK
    row["target_met"] = row["fq_ok"] and row["mu_ratio"] >= MU_SHARE
    if "forget_prob" in val_retain:  # results older than the forget probability have no match
        row["matched"] = matched(entry, val_retain)
    return row


def _frontier(entries: list[dict]) -> list[dict]:
    """Validation points averaged over data seeds per (lr, budget fraction): mean log10 FQ and
    mean MU (the points a frontier plot shows)."""
    groups: dict = {}
    for e in entries:
        for r in e["validation"]:
            groups.setdefault((r["lr"], r["fraction"]), []).append(r)
    out = []
    for (lr, frac), rows in sorted(groups.items()):
        out.append({"lr": lr, "fraction": frac, "grad_evals": _mean([r["grad_evals"] for r in rows]),
                    "log10_fq": _mean([math.log10(max(r["forget_quality"], 1e-30)) for r in rows]),
                    "model_utility": _mean([r["model_utility"] for r in rows]), "n": len(rows)})
    return out


def _best_mu(frontier: list[dict]) -> float | None:
    """The highest validation MU among frontier points whose forget quality (geometric mean over
    data seeds) exceeds 0.05; ``None`` when no point does."""
    ok = [p["model_utility"] for p in frontier if p["log10_fq"] > math.log10(FQ_OK)]
    return max(ok) if ok else None


def _curve(entries: list[dict]) -> list[dict]:
    """Validation metrics along the budget at each data seed's chosen learning rate."""
    groups: dict = {}
    for e in entries:
        lr = e["chosen"]["hparams"]["lr"]
        for r in e["validation"]:
            if r["lr"] == lr:
                groups.setdefault(r["fraction"], []).append(r)
    return [{"fraction": f, "grad_evals": _mean([r["grad_evals"] for r in rows]),
             "log10_fq": _mean([math.log10(max(r["forget_quality"], 1e-30)) for r in rows]),
             "model_utility": _mean([r["model_utility"] for r in rows]), "n": len(rows)}
            for f, rows in sorted(groups.items())]


def paired(per: list[dict], ref: list[dict]) -> dict:
    """The per-data-seed validation frontiers of a method against a reference method's on the same
    data seeds (the same authors and models, so the seed-to-seed spread of utility cancels): mean
    difference and its standard error over the seeds where both have a frontier, and on how many
    seeds each has none."""
    return _paired_values({p["data_seed"]: p["frontier_rel"] for p in per},
                          {p["data_seed"]: p["frontier_rel"] for p in ref})


def _paired_values(mine: dict, theirs: dict) -> dict:
    """``mine`` minus ``theirs`` per data seed (dicts data seed -> value or None)."""
    common = sorted(set(mine) & set(theirs))
    d = np.array([mine[k] - theirs[k] for k in common if mine[k] is not None and theirs[k] is not None])
    return {"n_common": len(common), "n_both": int(d.size),
            "none": sum(mine[k] is None for k in common), "ref_none": sum(theirs[k] is None for k in common),
            "diff": float(d.mean()) if d.size else None,
            "se": float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else None}


REFERENCE = "OFMU"  # the paired comparisons are against OFMU's shipped defaults


def _matched_agg(per: list[dict], ref: list[dict] | None) -> dict | None:
    """The per-seed matched-forgetting numbers over data seeds (mean ± spread over the seeds that
    have a point; ``n`` of ``of``) and, per number, the paired difference to the reference's."""
    if not all("matched" in p for p in per):
        return None
    have = [p["matched"] for p in per if p["matched"] is not None]
    out = {"n": len(have), "of": len(per), **{k: agg([m[k] for m in have]) for k, _ in MATCHED if have}}
    if ref is not None and all("matched" in p for p in ref):
        def values(rows, k):
            return {p["data_seed"]: None if p["matched"] is None else p["matched"][k] for p in rows}
        out["paired"] = {k: _paired_values(values(per, k), values(ref, k)) for k, _ in MATCHED}
    return out


def summarize(result: dict) -> dict:
    splits: dict = {}
    for ds, world in result.get("worlds", {}).items():
        for pct, split in world["splits"].items():
            s = splits.setdefault(pct, {"retain": [], "target": [], "methods": {}, "n_forget_qa": [],
                                        "data_seeds": [], "val_target_passes": []})
            retain_mu = split["test"]["retain"]["model_utility"]
            s["retain"].append(split["test"]["retain"])
            s["target"].append(split["test"]["target"])
            s["n_forget_qa"].append(split["test"]["n_forget_qa"])
            s["data_seeds"].append(int(ds))
            if split["val"]["target"]["forget_quality"] >= FQ_OK:  # the validation frontier's gate
                s["val_target_passes"].append(int(ds))
            for name, e in split["methods"].items():
                m = s["methods"].setdefault(name, {"per_seed": [], "_entries": []})
                m["per_seed"].append(_per_seed(e, retain_mu, split["val"]["retain"], ds))
                m["_entries"].append(e)
    out = {}
    for pct, s in splits.items():
        methods = {}
        for name, m in s["methods"].items():
            per = m["per_seed"]
            methods[name] = {
                "per_seed": per,
                "agg": {k: agg([p[k] for p in per]) for k in KEYS if all(k in p for p in per)},
                "n_fq_ok": sum(p["fq_ok"] for p in per), "n_target": sum(p["target_met"] for p in per),
                "n": len(per), "frontier": (fr := _frontier(m["_entries"])), "curve": _curve(m["_entries"]),
                "frontier_best_mu": _best_mu(fr)}
        ref = s["methods"].get(REFERENCE)
        for name, m in methods.items():
            if ref is not None and name != REFERENCE:
                m["paired"] = paired(m["per_seed"], ref["per_seed"])
            at = _matched_agg(m["per_seed"], None if ref is None or name == REFERENCE else ref["per_seed"])
            if at is not None:
                m["matched"] = at
        out[pct] = {"data_seeds": s["data_seeds"], "n_forget_qa": s["n_forget_qa"],
                    "retain_mu": agg([r["model_utility"] for r in s["retain"]]),
                    "target_fq": agg([t["forget_quality"] for t in s["target"]]),
                    "target_mu": agg([t["model_utility"] for t in s["target"]]),
                    # where forgetting should end (the retain model) and where it starts (the
                    # target): forget quality can pass while these say the facts are still held
                    **{f"{who}_{k}": agg([t[k] for t in s[who]]) for who in ("retain", "target")
                       for k in ("forget_prob", "mia_auc") if all(k in t for t in s[who])},
                    # the six numbers whose harmonic mean is MU, for the retain model: a harmonic mean
                    # moves with its smallest terms, so this says what MU differences are made of
                    "retain_mu_parts": {k: agg([r[k] for r in s["retain"]]) for k in MU_PARTS
                                        if all(k in r for r in s["retain"])},
                    # data seeds whose untouched target already passes the validation gate: there
                    # validation cannot tell forgetting from not, and the rule picks the best MU
                    "val_target_passes": s["val_target_passes"],
                    "methods": methods}
    return out

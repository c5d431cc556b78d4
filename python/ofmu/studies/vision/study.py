"""The unlearning study: per seed, train original + retrained models, tune every method on the
validation split, evaluate the chosen configuration once on the test split.

Tuning criterion: Avg. Gap to the retrained model under the validation protocol
(:func:`ofmu.studies.vision.metrics.evaluate` with ``on="val"``). The test split is only read for the final,
reported numbers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..methods.base import get, run
from .metrics import avg_gap, evaluate
from .models import original_model, retrained_model
from .splits import make_unlearning_data

DEFAULT_METHODS = ("FT", "GA", "GradDiff", "NPO", "Proj", "GradDiff-Adam", "NPO-Adam", "OFMU",
                   "OFMU-Adam", "OFMU-hvp", "OFMU-beta0", "OFMU-rho")
DEMO_METHODS = ("GA", "GradDiff", "OFMU-Adam")
# Gradient evaluations (minibatch forward+backward) granted to every method. On the default
# Fashion-MNIST subset, retraining takes 40 epochs x 79 batches ~ 3160 of them, so 240 keeps
# unlearning near 8% of retraining's compute.
DEFAULT_BUDGET = {"fashion-mnist": 240, "digits": 120}


@dataclass
class StudyConfig:
    dataset: str = "fashion-mnist"
    scenario: str = "random"
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = DEFAULT_METHODS
    budget: int | None = None
    batch_size: int = 128
    cache: str | None = None
    use_cache: bool = True

    def budget_for(self) -> int:
        return self.budget if self.budget is not None else DEFAULT_BUDGET[self.dataset]


def _round(d: dict, nd: int = 3) -> dict:
    return {k: round(v, nd) if isinstance(v, float) else v for k, v in d.items()}


def run_study(cfg: StudyConfig, progress: bool = True, log=print) -> dict:
    """Run the study; returns ``{"config", "runs": [per-seed rows]}``
    (see :mod:`ofmu.studies.vision.report`)."""
    from tqdm.auto import tqdm

    methods = [get(m) for m in cfg.methods]
    budget = cfg.budget_for()
    total = len(cfg.seeds) * sum(len(m.grid(cfg.scenario)) for m in methods)
    bar = tqdm(total=total, desc=f"{cfg.dataset}/{cfg.scenario}", unit="cfg",
               disable=not progress, dynamic_ncols=True)
    runs = []
    for seed in cfg.seeds:
        data = make_unlearning_data(cfg.dataset, cfg.scenario, seed)
        bar.set_postfix_str(f"seed {seed}: training original + retrain")
        orig, orig_t, orig_cached = original_model(data, cache=cfg.cache, use_cache=cfg.use_cache)
        retr, retr_t, retr_cached = retrained_model(data, cache=cfg.cache,
                                                    use_cache=cfg.use_cache)
        ref_val = evaluate(retr, data, on="val", seed=seed)
        ref_test = evaluate(retr, data, on="test", seed=seed)
        orig_test = evaluate(orig, data, on="test", seed=seed)
        seed_rows = {
            "Retrain": {**ref_test, "gap": 0.0, "time_s": retr_t, "cached": retr_cached},
            "Original": {**orig_test, "gap": avg_gap(orig_test, ref_test), "time_s": 0.0,
                         "train_time_s": orig_t, "cached": orig_cached},
        }
        for m in methods:
            best = None
            for hp in m.grid(cfg.scenario):
                bar.set_postfix_str(f"seed {seed}: {m.name} {hp}")
                model, info = run(m, orig, data, hp, seed=seed, budget=budget,
                                  batch_size=cfg.batch_size)
                val = evaluate(model, data, on="val", seed=seed)
                gap = avg_gap(val, ref_val)
                if best is None or gap < best[0]:
                    best = (gap, model, info, val)
                bar.update(1)
            gap_val, model, info, val = best
            test = evaluate(model, data, on="test", seed=seed)
            seed_rows[m.name] = {**test, "gap": avg_gap(test, ref_test), "val_gap": gap_val,
                                 "time_s": info["time_s"], "cpu_time_s": info["cpu_time_s"],
                                 "steps": info["steps"],
                                 "hparams": info["hparams"]}
        runs.append({"seed": seed, "forget_class": data.forget_class, "data": data.describe(),
                     "retrain_time_s": retr_t,
                     "rows": {k: _round(v) for k, v in seed_rows.items()}})
        if log is not None:
            g = {k: round(v["gap"], 2) for k, v in seed_rows.items() if k != "Retrain"}
            log(f"seed {seed}: Avg. Gap on test {g}")
    bar.close()
    return {"config": {"dataset": cfg.dataset, "scenario": cfg.scenario,
                       "seeds": list(cfg.seeds), "methods": list(cfg.methods),
                       "budget_grad_evals": budget, "batch_size": cfg.batch_size,
                       "grids": {m.name: [dict(g) for g in m.grid(cfg.scenario)] for m in methods},
                       "labels": {m.name: m.label for m in methods},
                       "finished": time.strftime("%Y-%m-%d %H:%M:%S")},
            "runs": runs}

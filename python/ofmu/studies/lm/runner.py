"""The authors benchmark: ``ofmu benchmark --dataset authors --model tiny|small|smollm2
--preset smoke|power``.

Protocol, for each data seed (new authors, new base / target / retain models; ``world.py``):

1. For each forget percentage and method, every learning rate of the method's grid unlearns
   the *val* forget authors once (unlearning seed 0) up to the budget, and is evaluated at the
   budget checkpoints (``cfg.checkpoints``, fractions of the budget): each (learning rate,
   checkpoint) is one point of the method's validation frontier.
2. The rule fixed beforehand (:func:`choose`) picks one (learning rate, checkpoint) from the
   validation points; it then unlearns the *test* forget authors once per unlearning seed.
   Test numbers choose nothing.
3. Every model is scored against the retain model of its split (TOFU's metrics), its neighbour
   facts against the target model, world knowledge against the base model, fluency against
   the target.

The summary (``summary.py``) aggregates over data seeds: mean and spread of the per-seed means.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, replace

import torch

from ...bench.common import device_name
from . import evaluate, metrics
from .config import PRESET_NAMES, config_for
from .methods import GRID, build_methods, recorded, steps_for, unlearn
from .peak import PeakMemory
from .summary import mean_std, summarize
from .text import PairStream, encode_all
from .world import Streams, World, build_world, eval_sets, metrics_row, qa_items

# How a diverged model (non-finite weights or losses) scores: it answers nothing, so utility 0,
# and it is unlike the retain model, so forget quality 0; the other metrics are left out.
DIVERGED = {"forget_quality": 0.0, "model_utility": 0.0, "diverged": True}


def choose(rows: list[dict]) -> dict:
    """The validation rule, fixed before any test run: among configurations whose forget quality
    reaches 0.05 (KS test not rejecting "same distribution as the retain model"), the one with
    the highest model utility; if none does, the highest forget quality (ties: utility). A
    diverged point is chosen only when every point diverged."""
    rows = [r for r in rows if not r.get("diverged")] or rows
    ok = [r for r in rows if r["forget_quality"] >= 0.05]
    if ok:
        return max(ok, key=lambda r: (r["model_utility"], r["forget_quality"]))
    return max(rows, key=lambda r: (r["forget_quality"], r["model_utility"]))


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _json_raw(raw: dict) -> dict:
    """Raw per-example numbers of the forget set in JSON form (for re-analysis)."""
    f = raw["forget"]
    return {"answer_loss": f["answer_loss"].tolist(), "para_loss": f["para_loss"].tolist(),
            "pert_loss": f["pert_loss"].tolist(), "generations": f["generations"]}


class Split:
    """One forget percentage of one world: its evaluation sets, streams and reference numbers."""

    def __init__(self, w: World, pct, device):
        self.w, self.pct, self.device = w, pct, device
        self.retain_pairs = w.retain_pairs(pct)
        self.pools = {}
        for pool in ("val", "test"):
            sets = eval_sets(w, pool, pct)
            full = pool == "test"  # validation checkpoints skip the membership attack
            r_raw = evaluate.raw(w.retain_models[pct], w.tok, sets, w.cfg.eval_batch, device, mia=full)
            t_raw = evaluate.raw(w.target, w.tok, sets, w.cfg.eval_batch, device, mia=full)
            self.pools[pool] = (sets, encode_all(w.tok, qa_items(sets.forget)), r_raw, t_raw)

    def reference_rows(self, pool: str) -> dict:
        sets, _, r_raw, t_raw = self.pools[pool]
        out = {"retain": metrics_row(r_raw, r_raw, t_raw, self.w.base_world),
               "target": metrics_row(t_raw, r_raw, t_raw, self.w.base_world),
               "n_forget_qa": len(sets.forget), "n_retain_eval": len(sets.retain),
               "n_neighbour_qa": len(sets.neighbours)}
        if pool == "test":
            out["raw"] = {"retain": _json_raw(r_raw), "target": _json_raw(t_raw)}
        return out

    def streams(self, pool: str, seed: int) -> Streams:
        cfg, tok = self.w.cfg, self.w.tok
        forget_pairs = self.pools[pool][1]
        general = self.w.general  # the replay pool of the "-replay" methods
        replay = (PairStream(general, cfg.batch_size, tok.pad_id, seed * 1000 + 3, self.device)
                  if general else None)
        return Streams(
            PairStream(forget_pairs, cfg.batch_size, tok.pad_id, seed * 1000 + 1, self.device),
            PairStream(self.retain_pairs, cfg.batch_size, tok.pad_id, seed * 1000 + 2, self.device), replay)

    def score(self, model, pool: str, mia: bool) -> tuple[dict, dict | None]:
        """(metrics row, raw numbers); a diverged model scores ``DIVERGED`` with no raw numbers, so
        one diverged run does not stop the benchmark."""
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            return dict(DIVERGED), None
        sets, _, r_raw, t_raw = self.pools[pool]
        raw = evaluate.raw(model, self.w.tok, sets, self.w.cfg.eval_batch, self.device, mia=mia)
        try:
            return metrics_row(raw, r_raw, t_raw, self.w.base_world), raw
        except metrics.NonFiniteError:  # finite weights, non-finite losses (overflowing logits)
            return dict(DIVERGED), None


def checkpoint_steps(method, hp: dict, budget: int, fractions) -> dict[int, float]:
    """step -> budget fraction: the steps at which a run is evaluated (distinct, at least 1)."""
    out: dict[int, float] = {}
    for f in sorted(fractions):
        out.setdefault(steps_for(method, hp, max(1, int(round(f * budget)))), f)
    return out


def validate(method, split: Split, hp: dict, cfg) -> list[dict]:
    """One validation run of ``hp`` up to the budget, evaluated at every checkpoint."""
    marks = checkpoint_steps(method, hp, cfg.budget, cfg.checkpoints)
    rows, eval_s = [], [0.0]
    cost = method.cost(hp)

    def after(model, k: int) -> None:
        if k in marks:
            t = time.perf_counter()
            row, _ = split.score(model, "val", mia=False)
            eval_s[0] += time.perf_counter() - t
            rows.append({"lr": hp["lr"], "fraction": marks[k], "steps": k,
                         "grad_evals": round(k * cost, 2), **row})

    streams = split.streams("val", 0)
    t0 = time.perf_counter()
    unlearn(method, split.w.target, streams, dict(hp), max(marks), 0, after_step=after)
    total = time.perf_counter() - t0
    for r in rows:
        r["run_time_s"] = round(total - eval_s[0], 2)
    return rows


def test_run(method, split: Split, hp: dict, steps: int, seed: int, device) -> dict:
    streams = split.streams("test", seed)
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        run_hp = dict(hp)
        model = unlearn(method, split.w.target, streams, run_hp, steps, seed)
        elapsed = time.perf_counter() - t0
    t1 = time.perf_counter()
    row, raw = split.score(model, "test", mia=True)
    out = {"seed": seed, "steps": steps, "grad_evals": round(steps * method.cost(hp), 2),
           "time_s": round(elapsed, 2), "eval_time_s": round(time.perf_counter() - t1, 2),
           "peak_mem_mb": round(mem.peak / 2**20, 1), **row}
    if raw is not None:
        out["raw"] = _json_raw(raw)
    if run_hp.get("_notes"):
        out["notes"] = list(run_hp["_notes"])
    return out


def run_method(method, split: Split, cfg, device, bar=None) -> dict:
    entry = {"doc": method.doc, "validation": []}
    for g in method.grid(GRID):
        hp = {**method.defaults, **g}
        entry["validation"] += validate(method, split, hp, cfg)
        if bar is not None:
            bar.update(1)
    chosen = choose(entry["validation"])
    hp = {**method.defaults, "lr": chosen["lr"]}
    entry["chosen"] = {"hparams": recorded(method, hp), "fraction": chosen["fraction"],
                       "steps": chosen["steps"], "grad_evals": chosen["grad_evals"]}
    entry["test"] = [test_run(method, split, hp, chosen["steps"], seed, device) for seed in cfg.seeds]
    if bar is not None:
        bar.update(len(cfg.seeds))
    entry["mean"] = mean_std(entry["test"])
    return entry


def run_world(w: World, cfg, methods: dict, device, progress: bool, on_split=None) -> dict:
    from .world import _progress

    out = {"data": {**w.data.describe(), "world_answered": len(w.world),
                    "world_questions": [qa.question for qa in w.world]}, "splits": {}}
    n_runs = len(cfg.forget) * sum(len(m.grid(GRID)) + len(cfg.seeds) for m in methods.values())
    bar = _progress(n_runs, f"data seed {w.cfg.data_seed}: unlearning runs", progress)
    for pct in cfg.forget:
        split = Split(w, pct, device)
        entry: dict = {"forget_authors": {p: w.data.forget_count(p, pct) for p in ("test", "val")},
                       "val": split.reference_rows("val"), "test": split.reference_rows("test"),
                       "methods": {}}
        out["splits"][f"{pct:g}"] = entry
        for name, m in methods.items():
            entry["methods"][name] = run_method(m, split, cfg, device, bar)
            if on_split is not None:  # partial results survive an interrupted run
                on_split(out)
    if bar is not None:
        bar.close()
    return out


def run(cfg, progress: bool = True, on_update=None) -> dict:
    """Every data seed of ``cfg``; ``on_update(result)`` after every method (partial results)."""
    t_start = time.perf_counter()
    device = _device(cfg.device)
    methods = build_methods(tuple(cfg.lrs), tuple(cfg.sgd_lrs))
    unknown = [m for m in cfg.methods if m not in methods]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; expected some of {tuple(methods)}")
    methods = {m: methods[m] for m in cfg.methods}
    result = {"config": {**{k: v for k, v in asdict(cfg).items() if k not in ("notes", "data_seed")},
                         "device": str(device), "threads": torch.get_num_threads(),
                         "cpu": device_name(torch.device("cpu")), "torch": torch.__version__},
              "methods": {n: m.doc for n, m in methods.items()}, "worlds": {}, "complete": False}

    def update(partial_world=None, ds=None):
        if partial_world is not None:
            result["worlds"][str(ds)] = partial_world
        result["summary"] = summarize(result)
        if on_update is not None:
            on_update(result)

    for ds in cfg.data_seeds:
        t0 = time.perf_counter()
        w = build_world(replace(cfg, data_seed=ds), device, progress)
        setup_s = time.perf_counter() - t0
        world = run_world(w, cfg, methods, device, progress,
                          on_split=lambda out, ds=ds: update(out, ds))
        world["setup_time_s"] = round(setup_s, 1)
        world["total_time_s"] = round(time.perf_counter() - t0, 1)
        update(world, ds)
        if cfg.rho_probe and cfg.model == "tiny":
            from .rho_probe import rho_probe
            world["rho_probe"] = rho_probe(w, max(cfg.forget), device)
    result["complete"] = True
    result["total_time_s"] = round(time.perf_counter() - t_start, 1)
    update()
    return result


def config_from_args(args):
    forget = None
    if getattr(args, "forget", None):
        forget = tuple(float(x) if "." in x else int(x) for x in str(args.forget).split(","))
    over = {"cache": args.cache_dir, "use_cache": not args.no_cache,
            "gguf": getattr(args, "gguf", None) or None}
    if forget:
        over["forget"] = forget
    if getattr(args, "seeds", None):
        over["seeds"] = tuple(range(args.seed0, args.seed0 + args.seeds))
    if getattr(args, "data_seeds", None):
        over["data_seeds"] = tuple(int(x) for x in str(args.data_seeds).split(","))
    if getattr(args, "methods", None):
        over["methods"] = tuple(args.methods.split(","))
    if getattr(args, "budget", None):
        over["budget"] = int(args.budget)
    if getattr(args, "device", None):
        over["device"] = args.device
    if getattr(args, "no_world_replay", False):
        over["replay_world"] = False
    if getattr(args, "lrs", None):
        over["lrs"] = tuple(float(x) for x in str(args.lrs).split(","))
        over["sgd_lrs"] = tuple(100 * x for x in over["lrs"])  # the paper form's plain SGD steps
    preset = getattr(args, "preset", None) or ("smoke" if getattr(args, "smoke", False) else "power")
    return config_for(args.model, preset, **over)


def main(args) -> int:
    """Entry point of ``ofmu benchmark --dataset authors`` (``args`` from the CLI parser)."""
    from .report import markdown_table, write_outputs

    cfg = config_from_args(args)
    result = run(cfg, progress=not args.quiet, on_update=lambda r: write_outputs(r, args.out, partial=True))
    paths = write_outputs(result, args.out)
    print(markdown_table(result))
    print(f"\nwrote {', '.join(str(p) for p in paths.values())} ({result['total_time_s']:.0f} s)")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the authors benchmark (for a stand-alone parser; the CLI adds its own)."""
    p.add_argument("--model", default="tiny", choices=("tiny", "small", "smollm2"))
    p.add_argument("--preset", default="power", choices=PRESET_NAMES)
    p.add_argument("--data-seeds", default=None, help="comma-separated data seeds, e.g. 0,1,2")
    p.add_argument("--forget", default=None, help="forget percentages, e.g. 1,5,10")
    p.add_argument("--gguf", default=None, help="SmolLM2 GGUF file or folder")
    p.add_argument("--device", default=None, help="auto | cpu | cuda")


def cli(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ofmu.studies.lm.runner")
    add_arguments(p)
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--seed0", type=int, default=0)
    p.add_argument("--methods", default=None)
    p.add_argument("--budget", type=int, default=None)
    p.add_argument("--lrs", default=None,
                   help="the learning-rate grid, e.g. 3e-3,1e-2,3e-2 (OFMU-paper: x100)")
    p.add_argument("--out", default="benchmarks/out")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--no-world-replay", action="store_true")
    p.add_argument("--quiet", action="store_true")
    return main(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(cli())

"""The authors benchmark: ``ofmu benchmark --dataset authors --model tiny|smollm2``.

Protocol (one data seed, ``--seeds`` unlearning seeds):

1. Generate the authors (test, val and holdout pools) and the world-knowledge candidates.
2. Base model: SmolLM2-135M-Instruct as shipped, or the tiny Llama trained on the world facts
   (its "pre-training"). The world-knowledge set is the facts the base model answers greedily.
3. Target model: the base fine-tuned on every test and val author. Retain model (gold), one per
   forget percentage: the base fine-tuned on the same data minus the forget authors of the test
   pool *and* of the val pool. Both cached on disk.
4. For each forget percentage and method, every configuration of the method's grid unlearns the
   *val* forget authors (seed 0); the chosen one (see :func:`choose`) then unlearns the *test*
   forget authors once per seed. The test numbers are never used to choose anything.
5. Metrics (``metrics.py``) of every unlearned model against the retain model on the same split.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import threading
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from ...bench.common import device_name
from . import evaluate, metrics
from .data import AuthorData, generate
from .methods import build_methods, unlearn
from .text import PairStream, encode_all

ALL_METHODS = ("GA", "GradDiff", "NPO", "SimNPO", "OFMU", "OFMU-hvp", "OFMU-beta0", "OFMU-rho0")


@dataclass
class LMConfig:
    model: str = "tiny"
    forget: tuple = (1, 5, 10)
    seeds: tuple = (0,)
    methods: tuple = ALL_METHODS
    # data
    n_test: int = 50
    n_val: int = 20
    n_holdout: int = 5
    qa_per_author: int = 12
    n_perturbed: int = 3
    n_retain_eval: int = 40
    n_world: int = 0  # at most this many answered world facts (0: all)
    data_seed: int = 0
    # tiny model and its training
    hidden: int = 64
    layers: int = 2
    base_epochs: int = 60
    base_lr: float = 1e-2
    ft_epochs: int = 30
    ft_lr: float = 3e-3
    ft_batch: int = 64
    replay_world: bool = True
    train_paraphrase: bool = True  # fine-tune on the paraphrased answer too (see docs)
    # unlearning
    budget: int = 80
    batch_size: int = 16
    eval_batch: int = 64
    lrs: tuple = (1e-4, 3e-4, 1e-3)
    ofmu_grid: tuple = ({"lr": 3e-4, "inner_lr": 3e-4}, {"lr": 1e-3, "inner_lr": 1e-3},
                        {"lr": 3e-3, "inner_lr": 1e-3})
    rho_probe: bool = True
    # runtime
    cache: str | None = None
    use_cache: bool = True
    device: str = "auto"
    gguf: str | None = None
    notes: list = field(default_factory=list)


PRESETS = {
    "tiny": {},
    # CPU-sized real-model run (about an hour on 2 busy cores): 20 test authors with 4 questions
    # each, one a-priori configuration per method (no validation runs), a budget of 24 gradient
    # evaluations, six methods; the same protocol otherwise. On a GPU, raise all of these.
    "smollm2": dict(model="smollm2", forget=(1, 10), n_test=20, n_val=2, n_holdout=2,
                    qa_per_author=4, n_retain_eval=16, n_world=16, ft_epochs=3, ft_lr=3e-4,
                    ft_batch=16, replay_world=False, budget=24, batch_size=8, eval_batch=32,
                    lrs=(2e-5,), ofmu_grid=({"lr": 2e-5, "inner_lr": 2e-5},), rho_probe=False,
                    methods=("GA", "GradDiff", "NPO", "SimNPO", "OFMU", "OFMU-rho0")),
    # CI-sized: seconds.
    "smoke": dict(forget=(10,), n_test=10, n_val=10, n_holdout=1, qa_per_author=4, n_retain_eval=8,
                  n_world=8, hidden=32, layers=1, base_epochs=60, ft_epochs=10, budget=8, batch_size=4,
                  eval_batch=32, lrs=(1e-3,), ofmu_grid=({"lr": 1e-3, "inner_lr": 1e-3},),
                  rho_probe=True),
}


def choose(rows: list[dict]) -> dict:
    """The validation rule, fixed before any test run: among configurations whose forget quality
    reaches 0.05 (KS test not rejecting "same distribution as the retain model"), the one with
    the highest model utility; if none does, the highest forget quality (ties: utility)."""
    ok = [r for r in rows if r["forget_quality"] >= 0.05]
    if ok:
        return max(ok, key=lambda r: (r["model_utility"], r["forget_quality"]))
    return max(rows, key=lambda r: (r["forget_quality"], r["model_utility"]))


class PeakMemory:
    """Peak memory of a block: CUDA ``max_memory_allocated`` on a GPU, else the peak resident set
    size of this process sampled every 10 ms, minus the resident size at entry (on CPU)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = self._rss()
        self._max = self._base
        self._stop = threading.Event()

        def loop():
            while not self._stop.wait(0.01):
                self._max = max(self._max, self._rss())
        self._t = threading.Thread(target=loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._t.join()
            self.peak = max(self._max, self._rss()) - self._base
        return False


@dataclass
class Streams:
    forget: PairStream
    retain: PairStream


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False)


def _qa_items(qas):
    return [(qa.question, qa.answer) for qa in qas]


def setup_models(cfg: LMConfig, data: AuthorData, device, progress: bool):
    """(tokenizer, base model, world set, target model, {pct: retain model}, {pct: forget authors})."""
    from .models import cached_model, finetune, load_smollm2, tiny_llama
    from .text import ChatTokenizer, WordTokenizer

    all_authors = list(data.pools["test"]) + list(data.pools["val"])
    spec = {"model": cfg.model, "data": data.describe(), "hidden": cfg.hidden, "layers": cfg.layers,
            "base": [cfg.base_epochs, cfg.base_lr], "ft": [cfg.ft_epochs, cfg.ft_lr, cfg.ft_batch],
            "replay": cfg.replay_world, "para": cfg.train_paraphrase}
    if cfg.model == "tiny":
        texts = [t for a in all_authors + list(data.pools["holdout"]) for qa in a.qas
                 for t in (qa.question, qa.answer, qa.paraphrase, *qa.perturbed)]
        texts += [t for qa in data.world for t in (qa.question, qa.answer, *qa.perturbed)]
        texts.append("Question: Answer:")
        tok = WordTokenizer(texts)
        world_pairs = encode_all(tok, _qa_items(data.world))

        def build_base(m):
            bar = _progress(cfg.base_epochs * math.ceil(len(world_pairs) / cfg.ft_batch),
                            "tiny base (world facts)", progress)
            finetune(m, world_pairs, epochs=cfg.base_epochs, lr=cfg.base_lr,
                     batch_size=cfg.ft_batch, seed=cfg.data_seed, device=device,
                     pad_id=tok.pad_id, progress=bar)
        skeleton = tiny_llama(tok.vocab_size, seed=cfg.data_seed, hidden=cfg.hidden,
                              layers=cfg.layers).to(device)
        base = cached_model(skeleton, "base", spec, build_base, cfg.cache, cfg.use_cache)
    elif cfg.model == "smollm2":
        model, hf_tok = load_smollm2(cfg.gguf)
        tok = ChatTokenizer(hf_tok)
        base = model.to(device)
        world_pairs = []
    else:
        raise ValueError(f"unknown model {cfg.model!r}; expected 'tiny' or 'smollm2'")
    world = evaluate.world_answered(base, tok, list(data.world), cfg.eval_batch, device)
    if cfg.n_world:
        world = world[:cfg.n_world]
    if len(world) < 3:
        raise RuntimeError(f"the base model answers only {len(world)} world-knowledge questions; "
                           "the utility set needs at least 3")

    def trainer(authors):
        qas = AuthorData.qas(authors)
        items = _qa_items(qas)
        if cfg.train_paraphrase:
            items += [(qa.question, qa.paraphrase) for qa in qas]
        pairs = encode_all(tok, items)
        if cfg.replay_world:
            pairs = pairs + world_pairs

        def build(m):
            bar = _progress(cfg.ft_epochs * math.ceil(len(pairs) / cfg.ft_batch),
                            f"fine-tune ({len(authors)} authors)", progress)
            finetune(m, pairs, epochs=cfg.ft_epochs, lr=cfg.ft_lr, batch_size=cfg.ft_batch,
                     seed=cfg.data_seed + 1, device=device, pad_id=tok.pad_id, progress=bar)
        return build

    target = cached_model(base, "target", spec, trainer(all_authors), cfg.cache, cfg.use_cache)
    retain_models, forget_authors = {}, {}
    for pct in cfg.forget:
        f_test, _ = data.split("test", pct)
        f_val, _ = data.split("val", pct)
        gone = {a.name for a in f_test + f_val}
        keep = [a for a in all_authors if a.name not in gone]
        retain_models[pct] = cached_model(base, f"retain{pct:g}", spec, trainer(keep), cfg.cache,
                                          cfg.use_cache)
        forget_authors[pct] = gone
    return tok, base, world, target, retain_models, forget_authors


def eval_sets(data: AuthorData, pool: str, pct: float, world, n_retain_eval: int, seed: int):
    forget, retain = data.split(pool, pct)
    retain_qas = AuthorData.qas(retain)
    rng = random.Random(seed * 7919 + (0 if pool == "test" else 1))
    retain_eval = rng.sample(retain_qas, min(n_retain_eval, len(retain_qas)))
    holdout = AuthorData.qas(data.pools["holdout"][:len(forget)])
    return evaluate.EvalSets(AuthorData.qas(forget), retain_eval, list(world), holdout)


def _metrics_row(raw, ref_raw) -> dict:
    return {k: float(v) for k, v in metrics.summarize(raw, ref_raw).items()}


def _json_raw(raw: dict) -> dict:
    """Raw per-example numbers in JSON form (kept for the forget set, for re-analysis)."""
    f = raw["forget"]
    return {"answer_loss": f["answer_loss"].tolist(), "para_loss": f["para_loss"].tolist(),
            "pert_loss": f["pert_loss"].tolist(), "generations": f["generations"]}


def run(cfg: LMConfig, progress: bool = True, on_update=None) -> dict:
    t_start = time.perf_counter()
    device = _device(cfg.device)
    unknown = [m for m in cfg.methods if m not in ALL_METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; expected some of {ALL_METHODS}")
    data = generate(cfg.n_test, cfg.n_val, cfg.n_holdout, cfg.qa_per_author, cfg.n_perturbed,
                    cfg.data_seed)
    for pct in cfg.forget:
        data.forget_count("test", pct)  # validates pct
    t0 = time.perf_counter()
    tok, base, world, target, retain_models, forget_names = setup_models(cfg, data, device, progress)
    setup_s = time.perf_counter() - t0
    methods = build_methods(tuple(cfg.lrs), tuple(cfg.ofmu_grid))
    methods = {m: methods[m] for m in cfg.methods}
    all_authors = list(data.pools["test"]) + list(data.pools["val"])

    result = {"config": {**{k: v for k, v in asdict(cfg).items() if k != "notes"},
                         "device": str(device), "threads": torch.get_num_threads(),
                         "cpu": device_name(torch.device("cpu")), "torch": torch.__version__},
              "data": {**data.describe(), "world_answered": len(world),
                       "world_questions": [qa.question for qa in world]},
              "setup_time_s": round(setup_s, 1), "splits": {}}
    n_runs = len(cfg.forget) * sum(len(m.grid) + len(cfg.seeds) for m in methods.values())
    bar = _progress(n_runs, "unlearning runs", progress)
    for pct in cfg.forget:
        gone = forget_names[pct]
        retain_pairs = encode_all(tok, _qa_items(AuthorData.qas(
            [a for a in all_authors if a.name not in gone])))
        split: dict = {"forget_authors": {p: data.forget_count(p, pct) for p in ("test", "val")}}
        refs = {}
        need_val = any(len(m.grid) > 1 for m in methods.values())
        for pool in ("val", "test") if need_val else ("test",):
            sets = eval_sets(data, pool, pct, world, cfg.n_retain_eval, cfg.data_seed)
            forget_pairs = encode_all(tok, _qa_items(sets.forget))
            r_raw = evaluate.raw(retain_models[pct], tok, sets, cfg.eval_batch, device)
            t_raw = evaluate.raw(target, tok, sets, cfg.eval_batch, device)
            refs[pool] = (sets, forget_pairs, r_raw)
            split[pool] = {"retain": _metrics_row(r_raw, r_raw), "target": _metrics_row(t_raw, r_raw),
                           "n_forget_qa": len(sets.forget), "n_retain_eval": len(sets.retain)}
            if pool == "test":
                split[pool]["raw"] = {"retain": _json_raw(r_raw), "target": _json_raw(t_raw)}
        split["methods"] = {}
        for name, m in methods.items():
            entry = {"doc": m.doc, "validation": []}
            if len(m.grid) == 1:  # nothing to choose: no validation runs
                chosen = {"hparams": {**m.defaults, **m.grid[0]}}
                if bar is not None:
                    bar.update(1)
            else:
                sets, forget_pairs, r_raw = refs["val"]
                for cfg_hp in m.grid:
                    hp = {**m.defaults, **cfg_hp}
                    row = _one_run(m, target, forget_pairs, retain_pairs, sets, r_raw, hp, cfg, tok,
                                   device, seed=0)
                    entry["validation"].append(row)
                    if bar is not None:
                        bar.update(1)
                chosen = choose(entry["validation"])
            entry["chosen"] = {k: v for k, v in chosen["hparams"].items() if not k.startswith("_")}
            sets, forget_pairs, r_raw = refs["test"]
            entry["test"] = []
            for seed in cfg.seeds:
                row = _one_run(m, target, forget_pairs, retain_pairs, sets, r_raw,
                               dict(entry["chosen"]), cfg, tok, device, seed=seed, keep_raw=True)
                entry["test"].append(row)
                if bar is not None:
                    bar.update(1)
            entry["mean"] = _mean_std(entry["test"])
            split["methods"][name] = entry
            result["splits"][f"{pct:g}"] = split
            if on_update is not None:  # partial results survive an interrupted run
                on_update(result)
    if bar is not None:
        bar.close()
    if cfg.rho_probe and cfg.model == "tiny":
        from .rho_probe import rho_probe
        result["rho_probe"] = rho_probe(target, tok, data, cfg, retain_pairs_for(cfg, tok, data,
                                        all_authors, forget_names), device)
    result["total_time_s"] = round(time.perf_counter() - t_start, 1)
    return result


def retain_pairs_for(cfg, tok, data, all_authors, forget_names):
    """(forget pairs, retain pairs) of the val pool at the largest forget percentage."""
    pct = max(cfg.forget)
    forget, _ = data.split("val", pct)
    retain = [a for a in all_authors if a.name not in forget_names[pct]]
    return (encode_all(tok, _qa_items(AuthorData.qas(forget))),
            encode_all(tok, _qa_items(AuthorData.qas(retain))))


def _one_run(m, target, forget_pairs, retain_pairs, sets, r_raw, hp, cfg, tok, device, seed: int,
             keep_raw: bool = False) -> dict:
    streams = Streams(PairStream(forget_pairs, cfg.batch_size, tok.pad_id, seed * 1000 + 1, device),
                      PairStream(retain_pairs, cfg.batch_size, tok.pad_id, seed * 1000 + 2, device))
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        model, steps = unlearn(m, target, streams, hp, cfg.budget, seed)
        elapsed = time.perf_counter() - t0
    t1 = time.perf_counter()
    raw = evaluate.raw(model, tok, sets, cfg.eval_batch, device)
    row = {"hparams": {k: v for k, v in hp.items() if not k.startswith("_")}, "seed": seed,
           "steps": steps, "grad_evals": round(steps * m.cost(hp), 2), "time_s": round(elapsed, 2),
           "eval_time_s": round(time.perf_counter() - t1, 2), "peak_mem_mb": round(mem.peak / 2**20, 1),
           **_metrics_row(raw, r_raw)}
    if hp.get("_notes"):
        row["notes"] = list(hp["_notes"])
    if keep_raw:
        row["raw"] = _json_raw(raw)
    del model
    return row


def _mean_std(rows: list[dict]) -> dict:
    out = {}
    for k, v in rows[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "seed":
            vals = np.array([r[k] for r in rows], dtype=np.float64)
            out[k] = [float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0]
    return out



def config_from_args(args) -> LMConfig:
    cfg = LMConfig(**PRESETS[args.model if not getattr(args, "smoke", False) else "smoke"])
    if args.forget:
        cfg = replace(cfg, forget=tuple(float(x) if "." in x else int(x)
                                        for x in str(args.forget).split(",")))
    cfg = replace(cfg, seeds=tuple(range(args.seed0, args.seed0 + args.seeds)),
                  cache=args.cache_dir, use_cache=not args.no_cache,
                  gguf=getattr(args, "gguf", None) or None)
    if getattr(args, "methods", None):
        cfg = replace(cfg, methods=tuple(args.methods.split(",")))
    if getattr(args, "budget", None):
        cfg = replace(cfg, budget=int(args.budget))
    if getattr(args, "device", None):
        cfg = replace(cfg, device=args.device)
    return cfg


def main(args) -> int:
    """Entry point of ``ofmu benchmark --dataset authors`` (``args`` from the CLI parser)."""
    from .report import markdown_table, write_outputs

    cfg = config_from_args(args)
    result = run(cfg, progress=not args.quiet, on_update=lambda r: write_outputs(r, args.out))
    paths = write_outputs(result, args.out)
    print(markdown_table(result))
    print(f"\nwrote {', '.join(str(p) for p in paths.values())} ({result['total_time_s']:.0f} s)")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the authors benchmark (for a stand-alone parser; the CLI adds its own)."""
    p.add_argument("--model", default="tiny", choices=("tiny", "smollm2"))
    p.add_argument("--forget", default=None, help="forget percentages, e.g. 1,5,10")
    p.add_argument("--gguf", default=None, help="SmolLM2 GGUF file or folder")
    p.add_argument("--device", default=None, help="auto | cpu | cuda")
    p.add_argument("--smoke", action="store_true", help="CI-sized run (seconds)")


def cli(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ofmu.studies.lm.runner")
    add_arguments(p)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--seed0", type=int, default=0)
    p.add_argument("--methods", default=None)
    p.add_argument("--budget", type=int, default=None)
    p.add_argument("--out", default="benchmarks/out")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--quiet", action="store_true")
    return main(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(cli())

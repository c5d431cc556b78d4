"""Cost of a whole OFMU step against gradient ascent and GradDiff, with the time split.

Models: an MLP 784-1024-1024-10 (batch 128) and a small ``nn.TransformerEncoder`` classifier
(token embedding, 2 layers, width 128, 4 heads, sequence 32, batch 16). Batches are random and
pre-generated, so no data loading is timed.

Methods, each on a fresh copy of the same model:

* ``ga``        — gradient ascent: forward + backward on the forget batch, ``torch.optim.SGD`` step.
* ``graddiff``  — forward on forget and retain batches, one backward of ``-L_f + L_r``, SGD step.
* OFMU modes    — ``project`` (similarity="project", outer_hvp="forget": the default),
  ``hvp+forget``, ``hvp+exact``, ``fd`` (project + outer_hvp="fd"), ``project+none`` (first
  order only; not in the default list). One ``step()`` = T inner steps + 1 outer step.

Time split, per step: ``forward`` (the closure), ``backward`` (``torch.autograd.backward`` /
``torch.autograd.grad``, HVP double-backwards included), ``kernels`` (the backend's
reduce3/combine/update, through a timing wrapper around the optimizer's backends) and ``other``
(the rest: coefficient math on the stats, copies of autograd results into the flat buffers,
Python). On a GPU every region is timed with CUDA events (no extra host synchronisation).

Ratios: ``inner_vs_ga`` = one inner step / one GA step; ``step_vs_ga`` = one ``step()`` / one
GA step; ``step_per_update_vs_ga`` = ``step_vs_ga / (T + 1)`` (both loops update theta); and
the same against GradDiff. Headline times are medians over steps; the split is the mean.

With a reduction folded into the backward pass (``OFMU_FUSED_REDUCE``), the hooks' ``reduce3``
calls run inside ``backward`` and are counted there, not under ``kernels``.

``--fused-sweep`` measures that folded reduction against the two-pass one instead: MLPs of
2^16-2^24 parameters and the two models above, the two paths interleaved round by round,
medians over rounds (optimizer-math time and whole inner-step time).

Run ``python benchmarks/bench_step.py --help``; results go to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ofmu import OFMU
from ofmu import functional as F
from ofmu.backends import Backend
from ofmu.bench import common as C
from ofmu.flat import Slot
from ofmu.fused_reduce import ENV as FUSED_ENV

MODES = {  # label -> (similarity, outer_hvp)
    "project": ("project", "forget"),
    "hvp+forget": ("hvp", "forget"),
    "hvp+exact": ("hvp", "exact"),
    "fd": ("project", "fd"),
    "project+none": ("project", "none"),
}
DEFAULT_METHODS = ("ga", "graddiff", "project", "hvp+forget", "hvp+exact", "fd")
CATEGORIES = ("forward", "backward", "kernels")

COLUMNS = ["device", "torch", "triton", "ofmu", "threads", "model", "n_params", "batch",
           "method", "similarity", "outer_hvp", "inner_steps", "backend", "repeats",
           "step_median_s", "step_q25_s", "step_q75_s", "inner_median_s", "outer_median_s",
           "forward_s", "backward_s", "kernels_s", "other_s", "kernels_pct",
           "inner_vs_ga", "inner_vs_graddiff", "step_vs_ga", "step_vs_graddiff",
           "step_per_update_vs_ga", "skipped_steps", "status"]


# ------------------------------------------------------------------------------------ models


class TinyTransformer(nn.Module):
    """Token classifier: embedding -> TransformerEncoder -> mean pool -> linear."""

    def __init__(self, vocab=1000, width=128, heads=4, layers=2, classes=10):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)).mean(1))


@dataclass
class Workload:
    name: str
    model: nn.Module
    forget: list  # pre-generated (x, y) batches, cycled
    retain: list
    batch: int
    # HVP modes need a twice-differentiable attention: the math SDPA kernel (the fused CPU/GPU
    # attention kernels have no double backward). Used for every method, so all compare alike.
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def make_workload(name: str, device: torch.device, batch: int | None, n_batches: int = 4,
                  seed: int = 0) -> Workload:
    torch.manual_seed(seed)
    if name == "mlp":
        b = batch or 128
        model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                              nn.Linear(1024, 10))

        def draw():
            return torch.randn(b, 784, device=device), torch.randint(0, 10, (b,), device=device)

        ctx = contextlib.nullcontext
    elif name == "transformer":
        b, seq = batch or 16, 32
        model = TinyTransformer()

        def draw():
            return (torch.randint(0, 1000, (b, seq), device=device),
                    torch.randint(0, 10, (b,), device=device))

        from torch.nn.attention import SDPBackend, sdpa_kernel

        def ctx():
            return sdpa_kernel([SDPBackend.MATH])
    else:
        raise ValueError(f"unknown model {name!r}; expected 'mlp' or 'transformer'")
    model.to(device)
    return Workload(name, model, [draw() for _ in range(n_batches)],
                    [draw() for _ in range(n_batches)], b, ctx)


class Batches:
    """Cycles pre-generated batches; ``same_batch=True`` repeats the previous pair (what
    ``outer_hvp="fd"`` asks of a closure)."""

    def __init__(self, w: Workload):
        self.w, self.i, self.last = w, 0, None

    def next(self, same_batch: bool = False):
        if not same_batch or self.last is None:
            k = self.i % len(self.w.forget)
            self.last, self.i = (self.w.forget[k], self.w.retain[k]), self.i + 1
        return self.last


# ------------------------------------------------------------------------------- profiling


class Profile:
    """Attributes time to ``phase/category``; ``phase`` is set by the wrapped step entry points."""

    def __init__(self, device: torch.device):
        self.sw = C.Stopwatch(device)
        self.phase = "step"
        self._saved: dict = {}
        self.in_backward = False

    def label(self, category: str) -> Callable[[], str]:
        # kernels called from autograd hooks (the folded reduction) are part of ``backward``:
        # a label outside CATEGORIES, so that they are not counted twice
        return lambda: (f"{self.phase}/folded" if category == "kernels" and self.in_backward
                        else f"{self.phase}/{category}")

    def _backward_timed(self, fn: Callable) -> Callable:
        timed = self.sw.wrap(self.label("backward"), fn)

        def run(*args, **kwargs):
            prev, self.in_backward = self.in_backward, True
            try:
                return timed(*args, **kwargs)
            finally:
                self.in_backward = prev

        return run

    def in_phase(self, phase: str, fn: Callable) -> Callable:
        timed = self.sw.wrap(phase, fn)

        def run(*args, **kwargs):
            prev, self.phase = self.phase, phase
            try:
                return timed(*args, **kwargs)
            finally:
                self.phase = prev

        return run

    @contextlib.contextmanager
    def autograd(self):
        """Time every backward pass (the optimizer calls ``torch.autograd.backward``/``grad``
        through the module attributes; ``Tensor.backward`` goes through the former too)."""
        saved = torch.autograd.backward, torch.autograd.grad
        torch.autograd.backward = self._backward_timed(saved[0])
        torch.autograd.grad = self._backward_timed(saved[1])
        try:
            yield
        finally:
            torch.autograd.backward, torch.autograd.grad = saved


def timing_backend(be: Backend, prof: Profile) -> Backend:
    lab = prof.label("kernels")
    return Backend(be.name, prof.sw.wrap(lab, be.reduce3), prof.sw.wrap(lab, be.combine),
                   prof.sw.wrap(lab, be.update))


# ----------------------------------------------------------------------------------- methods


def ce(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def build_method(method: str, w: Workload, args, prof: Profile):
    """``(step() callable, optimizer or None, description dict)`` on a fresh model copy."""
    model = copy.deepcopy(w.model)
    batches = Batches(w)
    forward = prof.sw.wrap(prof.label("forward"), lambda f: f())
    if method in ("ga", "graddiff"):
        opt = torch.optim.SGD(model.parameters(), lr=args.lr)
        update = prof.sw.wrap(prof.label("kernels"), opt.step)

        def step():
            opt.zero_grad()
            bf, br = batches.next()
            with w.context():
                if method == "ga":
                    loss = forward(lambda: -ce(model, bf))
                else:
                    loss = forward(lambda: -ce(model, bf) + ce(model, br))
                loss.backward()
            update()

        return prof.in_phase("step", step), None, dict(similarity="", outer_hvp="",
                                                       inner_steps="", backend="torch.optim.SGD")
    sim, hvp = MODES[method]
    opt = OFMU(model.parameters(), lr=args.lr, inner_lr=args.lr, inner_steps=args.inner_steps,
               beta=0.5 if sim == "project" else 0.1, rho=0.01, similarity=sim, outer_hvp=hvp,
               outer_steps=1, preconditioner="sgd", forget_loss_cap=None, backend=args.backend)
    opt._parts = [dataclasses.replace(p, backend=timing_backend(p.backend, prof)) for p in opt._parts]

    def closure(same_batch: bool = False):
        bf, br = batches.next(same_batch)
        with w.context():
            return forward(lambda: (ce(model, bf), ce(model, br)))

    # instance attributes shadow the methods, so step() goes through the timed versions
    opt._inner_step = prof.in_phase("inner", opt._inner_step)  # step() calls these (under its guard)
    opt._outer_step = prof.in_phase("outer", opt._outer_step)

    def step():
        with w.context():
            opt.step(closure)

    return (prof.in_phase("step", step), opt,
            dict(similarity=sim, outer_hvp=hvp, inner_steps=args.inner_steps,
                 backend=opt._parts[0].backend.name))


def measure(method: str, w: Workload, args, device: torch.device) -> dict:
    prof = Profile(device)
    step, opt, desc = build_method(method, w, args, prof)
    with prof.autograd():
        for _ in range(args.warmup):
            step()
        C.synchronize(device)
        per_step: list[dict[str, float]] = []
        for _ in range(args.repeats):
            prof.sw.reset()
            step()
            per_step.append(prof.sw.totals())
    row = dict(method=method, repeats=args.repeats, **desc)
    st = C.summarize([t["step"] for t in per_step])
    row.update(step_median_s=st["median_s"], step_q25_s=st["q25_s"], step_q75_s=st["q75_s"])
    if opt is not None:
        T = max(1, args.inner_steps)
        row["inner_median_s"] = statistics.median(t.get("inner", 0.0) / T for t in per_step)
        row["outer_median_s"] = statistics.median(t.get("outer", 0.0) for t in per_step)
    mean = {k: statistics.fmean(t.get(k, 0.0) for t in per_step)
            for k in {k for t in per_step for k in t}}

    def cat(c):  # a category summed over phases
        return sum(v for k, v in mean.items() if k.endswith("/" + c))

    for c in CATEGORIES:
        row[f"{c}_s"] = cat(c)
    row["other_s"] = mean["step"] - sum(cat(c) for c in CATEGORIES)
    row["kernels_pct"] = 100.0 * cat("kernels") / mean["step"]
    # Sanity: the step ran and left finite parameters (an exploding run would time NaN paths).
    params = list(opt._autodiff.params) if opt is not None else []
    finite = all(torch.isfinite(p).all() for p in params)
    skipped = opt.last_stats()["skipped_steps"] if opt is not None else 0
    row["skipped_steps"] = skipped
    row["status"] = "ok" if finite and skipped == 0 else "non-finite (skipped steps)"
    return row


# -------------------------------------------------------------------------------------- run


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--models", default="mlp,transformer", help="comma list of mlp, transformer")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma list from ga, graddiff, {', '.join(MODES)}")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 128 MLP, 16 TF)")
    p.add_argument("--inner-steps", type=int, default=5, help="T, inner steps per step()")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per method")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--backend", default="auto", help="OFMU backend (auto, cpp, torch, ...)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads")
    p.add_argument("--out", default=str(C.RESULTS_DIR), help="output folder for the CSV")
    p.add_argument("--tag", default="", help="suffix of the output file name")
    p.add_argument("--fused-sweep", action="store_true",
                   help="folded (OFMU_FUSED_REDUCE=1) vs two-pass reduction instead")
    p.add_argument("--sweep-sizes", default="16,18,20,22,24",
                   help="log2 parameter counts of the sweep's MLPs")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the sweep")
    return p.parse_args(argv)


def run(args) -> list[dict]:
    device = C.resolve_device(args.device)
    C.set_threads(args.threads)
    meta = C.metadata(device)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in ("ga", "graddiff") and m not in MODES:
            raise SystemExit(f"unknown method {m!r}")
    # the ratios need both baselines; they are always measured
    methods = ["ga", "graddiff"] + [m for m in methods if m not in ("ga", "graddiff")]
    print(f"# {meta['device']} | torch {meta['torch']} ofmu {meta['ofmu']} | "
          f"threads {meta['threads']} | T = {args.inner_steps}")
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        w = make_workload(name, device, args.batch)
        n_params = sum(p.numel() for p in w.model.parameters())
        base = dict(meta, model=name, n_params=n_params, batch=w.batch)
        got = {}
        for m in methods:
            try:
                got[m] = dict(base, **measure(m, w, args, device))
            except Exception as e:  # report, keep going with the other methods
                got[m] = dict(base, method=m, status=f"error: {type(e).__name__}: {e}"[:200])
                print(f"  {name} {m}: {got[m]['status']}")
        ga, gd = got["ga"].get("step_median_s"), got["graddiff"].get("step_median_s")
        T1 = args.inner_steps + 1
        for m, r in got.items():
            if r.get("step_median_s") is None or not ga or not gd:
                continue
            r["step_vs_ga"], r["step_vs_graddiff"] = r["step_median_s"] / ga, r["step_median_s"] / gd
            if m in MODES:
                r["inner_vs_ga"] = r["inner_median_s"] / ga
                r["inner_vs_graddiff"] = r["inner_median_s"] / gd
                r["step_per_update_vs_ga"] = r["step_vs_ga"] / T1
        rows += got.values()
    return rows


def print_table(rows: list[dict]) -> None:
    def ms(v):
        return f"{1e3 * v:.1f}" if isinstance(v, float) else "-"

    def x(v):
        return f"{v:.2f}x" if isinstance(v, float) else "-"

    body = []
    for r in rows:
        if r.get("step_median_s") is None:
            body.append([r["model"], r["method"]] + ["-"] * 10 + [r.get("status", "")])
            continue
        body.append([r["model"], r["method"], ms(r["step_median_s"]), ms(r.get("inner_median_s")),
                     ms(r.get("outer_median_s")), ms(r["forward_s"]), ms(r["backward_s"]),
                     ms(r["kernels_s"]), ms(r["other_s"]), x(r.get("inner_vs_ga")),
                     x(r.get("step_vs_ga")), x(r.get("step_per_update_vs_ga")), r["status"]])
    print("\ntimes in ms (step/inner/outer: median; fwd/bwd/kernels/other: mean per step)")
    print(C.table(body, ["model", "method", "step", "inner", "outer", "fwd", "bwd", "kernels",
                         "other", "inner/GA", "step/GA", "step/(T+1)GA", "status"]))


# ------------------------------------------------------------------- folded reduction sweep

SWEEP_COLUMNS = ["device", "torch", "ofmu", "threads", "model", "n_params", "n_tensors", "rounds",
                 "math_two_pass_us", "math_folded_us", "hooks_us", "inner_two_pass_ms",
                 "inner_folded_ms", "inner_speedup"]


def sweep_model(log2: int, device: torch.device) -> Workload:
    """An MLP of 4 square layers (``~2^log2`` parameters), batch 8: a small batch, so that the
    reduction is a visible share of the step."""
    width = max(8, round((2 ** log2 / 4) ** 0.5))
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(width, width), nn.Tanh())],
                          nn.Linear(width, 10)).to(device)

    def draw():
        return torch.randn(8, width, device=device), torch.randint(0, 10, (8,), device=device)

    return Workload(f"mlp-2^{log2}", model, [draw() for _ in range(4)], [draw() for _ in range(4)], 8)


@contextlib.contextmanager
def fused_setting(value: str):
    old = os.environ.get(FUSED_ENV)
    os.environ[FUSED_ENV] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(FUSED_ENV, None)
        else:
            os.environ[FUSED_ENV] = old


def _clock(fn: Callable, device: torch.device, n: int) -> float:
    """Median seconds of ``n`` calls."""
    times = []
    for _ in range(n):
        C.synchronize(device)
        t0 = time.perf_counter()
        fn()
        C.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_fused(w: Workload, args, device: torch.device) -> dict:
    """Folded vs two-pass reduction on one workload, interleaved round by round. Optimizer
    math: two-pass = the ``reduce3`` pass after the backward; folded = (evaluation with the
    hooks armed - the same evaluation without) + the fixed-order sum of the shares. Whole:
    one inner step (forward, two backward passes, reduction, coefficients, update).
    ``hooks_us``: the time spent inside the hooks themselves plus the final sum (a lower bound
    of the folded math: it leaves out what the hooks cost the rest of the backward pass)."""
    model = copy.deepcopy(w.model)
    batches = Batches(w)
    opt = OFMU(model.parameters(), lr=1e-4, inner_lr=1e-4, beta=0.5, similarity="project",
               outer_steps=1, preconditioner="sgd", forget_loss_cap=None, backend=args.backend)
    parts, ad = opt._parts, opt._autodiff

    def closure():
        bf, br = batches.next()
        with w.context():
            return ce(model, bf), ce(model, br)

    folds = {"0": [None] * len(parts), "1": None}
    with fused_setting("1"):
        folds["1"] = F.fold(parts)
    in_hooks = [0.0]
    hook, finish = ad.fused.hook, ad.fused.finish

    def timed(fn):
        def run(*a):
            t0 = time.perf_counter()
            try:
                return fn(*a)
            finally:
                in_hooks[0] += time.perf_counter() - t0
        return run

    ad.fused.hook, ad.fused.finish = timed(hook), timed(finish)  # instance attributes

    @torch.no_grad()
    def evaluate(flag):
        ev = ad.evaluate(closure, fold=folds[flag])
        return ev

    def reduce_after(flag):
        ev = evaluate(flag)
        C.synchronize(device)
        t0 = time.perf_counter()
        F.reduce(parts, Slot.GRAD_F, Slot.GRAD_R, ev.stats)
        C.synchronize(device)
        return time.perf_counter() - t0

    def inner(flag):
        with fused_setting(flag):
            opt.inner_step(closure)

    n = max(3, args.repeats)
    got: dict[str, list[float]] = {k: [] for k in ("red0", "red1", "ev0", "ev1", "in0", "in1")}
    for flag in "01":  # warm-up
        inner(flag)
        evaluate(flag)
    hooks = []
    for _ in range(args.rounds):
        in_hooks[0] = 0.0
        evaluate("1")
        hooks.append(in_hooks[0])
        for flag in "01":
            got[f"ev{flag}"].append(_clock(lambda f=flag: evaluate(f), device, n))
            got[f"red{flag}"].append(statistics.median(reduce_after(flag) for _ in range(n)))
            got[f"in{flag}"].append(_clock(lambda f=flag: inner(f), device, n))
    med = {k: statistics.median(v) for k, v in got.items()}
    math_two = med["red0"]
    math_fold = max(0.0, med["ev1"] - med["ev0"]) + med["red1"]
    return dict(model=w.name, n_params=sum(p.numel() for p in w.model.parameters()),
                n_tensors=len(list(w.model.parameters())), rounds=args.rounds,
                math_two_pass_us=1e6 * math_two, math_folded_us=1e6 * math_fold,
                hooks_us=1e6 * statistics.median(hooks), inner_two_pass_ms=1e3 * med["in0"],
                inner_folded_ms=1e3 * med["in1"], inner_speedup=med["in0"] / med["in1"])


def fused_sweep(args) -> list[dict]:
    device = C.resolve_device(args.device)
    C.set_threads(args.threads)
    meta = C.metadata(device)
    print(f"# {meta['device']} | torch {meta['torch']} ofmu {meta['ofmu']} | "
          f"threads {meta['threads']} | folded vs two-pass reduction, {args.rounds} rounds")
    sizes = [int(x) for x in args.sweep_sizes.split(",") if x.strip()]
    loads = [sweep_model(k, device) for k in sizes]
    loads += [make_workload(m.strip(), device, args.batch)
              for m in args.models.split(",") if m.strip()]
    rows = []
    for w in loads:
        rows.append(dict(meta, **measure_fused(w, args, device)))
        r = rows[-1]
        print(f"  {r['model']:14s} {r['n_params']:>9d} params: math {r['math_two_pass_us']:8.1f} -> "
              f"{r['math_folded_us']:8.1f} us (in hooks {r['hooks_us']:7.1f}), "
              f"inner {r['inner_two_pass_ms']:8.2f} -> "
              f"{r['inner_folded_ms']:8.2f} ms ({r['inner_speedup']:.2f}x)", flush=True)
    return rows


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.fused_sweep:
        rows = fused_sweep(args)
        out = C.write_csv(C.output_stem("fused_reduce", args) + ".csv", rows, SWEEP_COLUMNS)
        print(f"\nwrote {out}")
        return rows
    rows = run(args)
    out = C.write_csv(C.output_stem("step", args) + ".csv", rows, COLUMNS)
    print_table(rows)
    print(f"\nwrote {out}")
    return rows


if __name__ == "__main__":
    main()

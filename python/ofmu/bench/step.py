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
``torch.autograd.grad`` and the optimizer's engine calls, HVP double-backwards included),
``kernels`` (the backend's reduce3/combine/update, through a timing wrapper around the
optimizer's backends) and ``other``
(the rest: coefficient math on the stats, copies of autograd results into the flat buffers,
Python). On a GPU every region is timed with CUDA events (no extra host synchronisation).

Ratios: ``inner_vs_ga`` = one inner step / one GA step; ``step_vs_ga`` = one ``step()`` / one
GA step; ``step_per_update_vs_ga`` = ``step_vs_ga / (T + 1)`` (both loops update theta); and
the same against GradDiff. Headline times are medians over steps; the split is the mean.

``--fixed-cost`` measures instead what the optimizer adds to a step on a tiny model, where the
passes cost least: an MLP 32-64-64-10 (6,922 parameters), batch 32, fp32, SGD, the default
``similarity="project"``. ``bare`` = the closure's two forwards and two ``.backward()`` calls;
``inner`` = ``OFMU.inner_step`` on the same batches; fixed cost = inner / bare - 1, per round
(the two interleaved sample by sample, the thread's CPU clock), reported as median (min-max)
over rounds, with the number of torch ops each runs after a first call (counted by a dispatch
mode: the same on every machine).

Run ``python benchmarks/bench_step.py --help``; results go to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ofmu import OFMU, backends, gradients
from ofmu.backends import Backend
from ofmu.bench import common as C
from ofmu.modes import OUTER_HVP, SIMILARITY, step_cost

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
           "step_per_update_vs_ga", "grad_evals", "per_eval_vs_graddiff",
           "per_eval_vs_graddiff_lo", "per_eval_vs_graddiff_hi", "optimizer_pct", "skipped_steps",
           "status"]


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
    elif name in ("transformer", "transformer-10m"):
        b, seq = batch or (16 if name == "transformer" else 4), 32
        # transformer-10m: 16.7M parameters (4 layers of width 512, 8 heads, vocabulary 8000)
        model = (TinyTransformer() if name == "transformer" else
                 TinyTransformer(vocab=8000, width=512, heads=8, layers=4))
        vocab = model.embed.num_embeddings

        def draw():
            return (torch.randint(0, vocab, (b, seq), device=device),
                    torch.randint(0, 10, (b,), device=device))

        from torch.nn.attention import SDPBackend, sdpa_kernel

        def ctx():
            return sdpa_kernel([SDPBackend.MATH])
    else:
        raise ValueError(f"unknown model {name!r}; expected 'mlp', 'transformer' or "
                         "'transformer-10m'")
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

    def __init__(self, device: torch.device, clock: str = "wall"):
        self.sw = C.Stopwatch(device, clock)
        self.phase = "step"
        self._saved: dict = {}

    def label(self, category: str) -> Callable[[], str]:
        return lambda: f"{self.phase}/{category}"

    def _backward_timed(self, fn: Callable) -> Callable:
        return self.sw.wrap(self.label("backward"), fn)

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
        """Time every backward pass: ``torch.autograd.backward``/``grad`` through the module
        attributes (``Tensor.backward`` goes through the former too), and the engine call the
        optimizer's plain backward passes make (``ofmu.gradients.backward_into_leaves``)."""
        saved = torch.autograd.backward, torch.autograd.grad, gradients._ENGINE_BACKWARD
        torch.autograd.backward = self._backward_timed(saved[0])
        torch.autograd.grad = self._backward_timed(saved[1])
        if saved[2] is not None:
            gradients._ENGINE_BACKWARD = self._backward_timed(saved[2])
        try:
            yield
        finally:
            torch.autograd.backward, torch.autograd.grad, gradients._ENGINE_BACKWARD = saved


def timing_backend(be: Backend, prof: Profile) -> Backend:
    """``be`` with every op it records timed as "kernels" (passed to the optimizer as
    ``backend=``)."""
    lab = prof.label("kernels")
    return dataclasses.replace(be, **{op: prof.sw.wrap(lab, getattr(be, op)) for op in backends.OPS})


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
    device = next(model.parameters()).device
    kernels = timing_backend(backends.select(args.backend, device)[0], prof)
    opt = OFMU(model.parameters(), lr=args.lr, inner_lr=args.lr, inner_steps=args.inner_steps,
               beta=0.5 if sim == "project" else 0.1, rho=0.01, similarity=sim, outer_hvp=hvp,
               outer_steps=1, preconditioner="sgd", forget_loss_cap=None, backend=kernels)

    def closure(same_batch: bool = False):
        bf, br = batches.next(same_batch)
        with w.context():
            return forward(lambda: (ce(model, bf), ce(model, br)))

    # opt.step(closure), one public loop call at a time so that each is timed as its phase
    inner = prof.in_phase("inner", opt.inner_step)
    outer = prof.in_phase("outer", opt.outer_step)

    def step():
        with w.context():
            for _ in range(opt.inner_steps):
                inner(closure)
            for _ in range(opt.outer_steps):
                outer(closure)

    return (prof.in_phase("step", step), opt,
            dict(similarity=sim, outer_hvp=hvp, inner_steps=args.inner_steps, backend=kernels.name))


def measure(method: str, w: Workload, args, device: torch.device) -> dict:
    prof = Profile(device, args.clock)
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
    # what the optimizer adds to the model's passes: its kernels and everything else
    row["optimizer_pct"] = 100.0 * (cat("kernels") + row["other_s"]) / mean["step"]
    # Sanity: the step ran and left finite parameters (an exploding run would time NaN paths).
    params = [p for g in opt.param_groups for p in g["params"]] if opt is not None else []
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
    p.add_argument("--models", default="mlp,transformer",
                   help="comma list of mlp, transformer, transformer-10m (16.7M parameters)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma list from ga, graddiff, {', '.join(MODES)}")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 128 MLP, 16 TF)")
    p.add_argument("--inner-steps", type=int, default=5, help="T, inner steps per step()")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per method")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--backend", default="auto", help="OFMU backend (auto, cpp, torch, ...)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads")
    p.add_argument("--clock", default="wall", choices=sorted(C.CLOCKS),
                   help="CPU timer: wall, or thread (CPU time of the calling thread: leaves out "
                        "waiting for a core on a shared machine; --threads 1 only)")
    p.add_argument("--out", default=str(C.RESULTS_DIR), help="output folder for the CSV")
    p.add_argument("--tag", default="", help="suffix of the output file name")
    p.add_argument("--fixed-cost", action="store_true",
                   help="the optimizer's fixed cost over the bare passes on a 6,922-parameter MLP")
    p.add_argument("--rounds", type=int, default=5, help="rounds of --fixed-cost")
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
            _per_eval(r, got["graddiff"], m, args)
            r["step_vs_ga"], r["step_vs_graddiff"] = r["step_median_s"] / ga, r["step_median_s"] / gd
            if m in MODES:
                r["inner_vs_ga"] = r["inner_median_s"] / ga
                r["inner_vs_graddiff"] = r["inner_median_s"] / gd
                r["step_per_update_vs_ga"] = r["step_vs_ga"] / T1
        rows += got.values()
    return rows


def grad_evals(method: str, args) -> float:
    """Gradient evaluations of one step (forward + backward of one minibatch), as the studies'
    budgets charge them: GA 1, GradDiff 2, OFMU ``modes.step_cost`` (rho > 0)."""
    if method in ("ga", "graddiff"):
        return 1.0 if method == "ga" else 2.0
    sim, hvp = MODES[method]
    return step_cost(SIMILARITY[sim], OUTER_HVP[hvp], args.inner_steps, 1, penalty_on=True)


def _per_eval(r: dict, gd: dict, method: str, args) -> None:
    """Time per gradient evaluation against GradDiff's: median ratio, and the range the
    quartiles of both allow (slowest OFMU quartile over fastest GradDiff one, and back)."""
    e, eg = grad_evals(method, args), grad_evals("graddiff", args)
    r["grad_evals"] = e
    r["per_eval_vs_graddiff"] = (r["step_median_s"] / e) / (gd["step_median_s"] / eg)
    r["per_eval_vs_graddiff_lo"] = (r["step_q25_s"] / e) / (gd["step_q75_s"] / eg)
    r["per_eval_vs_graddiff_hi"] = (r["step_q75_s"] / e) / (gd["step_q25_s"] / eg)


def print_table(rows: list[dict]) -> None:
    def ms(v):
        return f"{1e3 * v:.1f}" if isinstance(v, float) else "-"

    def x(v):
        return f"{v:.2f}x" if isinstance(v, float) else "-"

    body = []
    for r in rows:
        if r.get("step_median_s") is None:
            body.append([r["model"], r["method"]] + ["-"] * 12 + [r.get("status", "")])
            continue
        pe = (f"{r['per_eval_vs_graddiff']:.2f}x ({r['per_eval_vs_graddiff_lo']:.2f}-"
              f"{r['per_eval_vs_graddiff_hi']:.2f})" if "per_eval_vs_graddiff" in r else "-")
        body.append([r["model"], r["method"], ms(r["step_median_s"]), ms(r.get("inner_median_s")),
                     ms(r.get("outer_median_s")), ms(r["forward_s"]), ms(r["backward_s"]),
                     ms(r["kernels_s"]), ms(r["other_s"]), x(r.get("inner_vs_ga")),
                     x(r.get("step_vs_ga")), x(r.get("step_per_update_vs_ga")), pe,
                     f"{r['optimizer_pct']:.0f}%", r["status"]])
    print("\ntimes in ms (step/inner/outer: median; fwd/bwd/kernels/other: mean per step); "
          "per eval = per gradient evaluation (quartile range); opt = kernels + other")
    print(C.table(body, ["model", "method", "step", "inner", "outer", "fwd", "bwd", "kernels",
                         "other", "inner/GA", "step/GA", "step/(T+1)GA", "per eval/GradDiff",
                         "opt", "status"]))


# ------------------------------------------------------------------------------- fixed cost

FIXED_COLUMNS = ["device", "torch", "ofmu", "threads", "backend", "round", "bare_us", "inner_us",
                 "overhead_pct", "ops_bare", "ops_inner"]


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _count_ops(fn: Callable) -> int:
    with _OpCounter() as c:
        fn()
    return c.n


def fixed_cost(args) -> list[dict]:
    device = C.resolve_device(args.device)
    C.set_threads(args.threads)
    meta = C.metadata(device)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 10)).to(device)
    bare_model = copy.deepcopy(model)
    data = [(torch.randn(32, 32, device=device), torch.randint(0, 10, (32,), device=device))
            for _ in range(4)]
    opt = OFMU(model.parameters(), lr=1e-4, inner_lr=1e-4, similarity="project",
               preconditioner="sgd", backend=args.backend)
    i = [0]

    def closure_of(m):
        def closure():
            bf, br = data[i[0] % 4], data[(i[0] + 1) % 4]
            i[0] += 1
            return ce(m, bf), ce(m, br)
        return closure

    closure, bare_closure = closure_of(model), closure_of(bare_model)

    def bare():
        lf, lr = bare_closure()
        lf.backward()
        lr.backward()

    def inner():
        opt.inner_step(closure)

    bare(), inner()  # the ops of a step like the timed ones, not of the first (one-off setup)
    ops = {"bare": _count_ops(bare), "inner": _count_ops(inner)}
    clock = "thread" if device.type == "cpu" and args.threads == 1 else "wall"
    print(f"# {meta['device']} | torch {meta['torch']} ofmu {meta['ofmu']} | threads "
          f"{meta['threads']} | backend {opt.backend_summary()[0]} | clock {clock}")
    rows = []
    for r in range(1, args.rounds + 1):
        got = C.time_interleaved({"bare": bare, "inner": inner}, device, max(5, args.repeats),
                                 warmup=20, min_sample_s=0.02, clock=clock)
        med = {k: C.summarize(v[0])["median_s"] for k, v in got.items()}
        rows.append(dict(meta, backend=args.backend, round=r, bare_us=1e6 * med["bare"],
                         inner_us=1e6 * med["inner"],
                         overhead_pct=100.0 * (med["inner"] / med["bare"] - 1.0),
                         ops_bare=ops["bare"], ops_inner=ops["inner"]))
        print(f"  round {r}: bare {rows[-1]['bare_us']:.0f} us, inner step "
              f"{rows[-1]['inner_us']:.0f} us, fixed cost {rows[-1]['overhead_pct']:.0f}%",
              flush=True)
    pct = sorted(x["overhead_pct"] for x in rows)
    print(f"fixed cost over the bare passes: median {statistics.median(pct):.0f}% "
          f"(min {pct[0]:.0f}%, max {pct[-1]:.0f}%) over {len(pct)} rounds; torch ops: bare "
          f"{ops['bare']}, inner step {ops['inner']}")
    return rows


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.clock == "thread" and args.threads != 1:
        raise SystemExit("--clock thread measures one CPU thread: use it with --threads 1")
    if args.fixed_cost:
        rows = fixed_cost(args)
        out = C.write_csv(C.output_stem("fixed_cost", args) + ".csv", rows, FIXED_COLUMNS)
        print(f"wrote {out}")
        return rows
    rows = run(args)
    out = C.write_csv(C.output_stem("step", args) + ".csv", rows, COLUMNS)
    print_table(rows)
    print(f"\nwrote {out}")
    return rows


if __name__ == "__main__":
    main()

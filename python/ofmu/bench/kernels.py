"""Microbenchmark of OFMU's fused inner-step math against a measured bandwidth ceiling.

What is timed (one inner step of ``similarity="project"`` over flat buffers, as the optimizer runs
it; docs/design.md, "Kernel contract")::

    stats = reduce3(g_f, g_r)                           # <g_f,g_r>, |g_f|^2, |g_r|^2   8 B/elem
    coeffs = finalize(stats)                            # the backend's finalize op, on the device
    theta = theta + lr * (g_f - beta * k(stats) * g_r)  # update (read 3, write 1)     16 B/elem

Bytes model: 6 buffer-element accesses per element, i.e. 24 B/elem in fp32 and 12 B/elem in
bf16 — reported GB/s is ``bytes_model * n / median_time``. A literal single pass would move
16 B/elem, but the update needs the reduced coefficients first, so the second read of ``g_f`` and
``g_r`` comes from DRAM unless the buffers fit in cache (``cache_resident`` in the CSV).

Providers (``--providers``):

* ``eager``   — what a user writes: three ``torch.dot`` + tensor arithmetic + ``add_``.
* ``foreach`` — ``torch._foreach_*`` over per-tensor views of the same buffers (model-like list).
* ``compile`` — ``torch.compile(dynamic=True)`` of the ofmu.reference step.
* ``cpp`` / ``cuda`` / ``triton`` — ofmu's backends (``ofmu.backends.probe``) with the
  backend's ``finalize`` op in between, exactly the optimizer's call sequence.
* ``reference`` — ofmu's torch fallback backend (not in the default list).

The ceiling is measured in the same process on the same buffers: a triad ``a = b + s*c``
(3 accesses/elem), an in-place ``axpy`` ``a += s*c`` (3 accesses/elem, the update's pattern: no
write-allocate traffic on CPUs) and a copy (2 accesses/elem); ``pct_ceiling`` is against the best
of the three at the same size and dtype.

Before any provider is timed, theta after one step is compared with a float64 reference under a
tolerance derived from the error bound of the computation, the same for every provider
(NOTE: [Correctness gate] below); a provider outside it is reported WRONG and not timed.

``--rounds R`` repeats the whole sweep R times, interleaved (round 1 of every point before round
2 of any), and reports each provider's speed relative to ``compile`` as the median with min-max
over the rounds: a claim holds only where the minimum of that spread holds it.

Run ``python -m ofmu.bench.kernels --help`` (or ``ofmu bench --help``); results go to ``--out``
(default ``./ofmu-bench-results``, printed at start and end); the committed ones are in
``benchmarks/results/`` of the repository.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ofmu import backends
from ofmu import reference as R
from ofmu.bench import common as C
from ofmu.files import replace_atomic

DEFAULT_PROVIDERS = ("eager", "foreach", "compile", "cpp", "triton", "cuda")
ALL_PROVIDERS = DEFAULT_PROVIDERS + ("reference",)
ACCESSES = {"step": 6, "triad": 3, "axpy": 3, "copy": 2}  # buffer-element reads + writes per elem
CEILINGS = ("triad", "axpy", "copy")
LR, BETA, EPS = 0.3, 0.9, 1e-12  # large lr/beta so that a wrong coefficient fails the check

MIN_SIZE = 1024  # the gate fits three coefficients, the foreach split needs two layers
COLUMNS = ["device", "torch", "triton", "ofmu", "threads", "cpu_isa", "round", "dtype", "n", "provider",
           "n_tensors",
           "bytes_per_elem", "median_s", "q25_s", "q75_s", "iqr_s", "gbps", "gbps_q25", "gbps_q75",
           "ceiling_gbps", "pct_ceiling", "working_set_bytes", "cache_bytes", "cache_resident",
           "repeats", "calls_per_sample", "clock", "check_elem_ratio", "check_coef_ratio", "check_dc1_rel",
           "check_dc2_rel", "status"]
RATIO_COLUMNS = ["device", "torch", "ofmu", "threads", "cpu_isa", "dtype", "n", "provider", "rounds",
                 "vs_compile_median", "vs_compile_min", "vs_compile_max", "pct_ceiling_median"]


# ---------------------------------------------------------------------------------- buffers


@dataclass
class Buffers:
    theta: torch.Tensor
    gf: torch.Tensor
    gr: torch.Tensor
    theta0: torch.Tensor  # the starting point of every correctness check
    sizes: list[int]  # model-like split used by the foreach provider
    per_tensor: tuple | None = None  # (theta, g_f, g_r) views for the foreach provider

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(flat, self.sizes))


def model_like_sizes(n: int) -> list[int]:
    """Split ``n`` elements like a model's parameter list: L (weight, bias) pairs, L grows
    with ``n`` (2..48 layers), biases of up to 1024 elements."""
    layers = max(2, min(48, n // 2**18))
    bias = max(1, min(1024, n // (16 * layers)))
    weight = (n - layers * bias) // layers
    sizes = [weight, bias] * layers
    sizes[-2] += n - sum(sizes)
    return sizes


def make_buffers(n: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Buffers:
    """theta ~ N(0,1); g_r ~ N(0,1); g_f = 0.6 g_r + 0.8 N(0,1) (cosine 0.6, so the projection
    term is as large as the gradient term and a wrong coefficient is visible)."""
    gen = torch.Generator(device=device).manual_seed(seed)  # on the device: 2^30 on a GPU

    def randn():
        return torch.randn(n, generator=gen, device=device).to(dtype)

    theta0, gr = randn(), randn()
    gf = (0.6 * gr.float() + 0.8 * randn().float()).to(dtype)
    return Buffers(theta0.clone(), gf, gr, theta0, model_like_sizes(n))


# -------------------------------------------------------------------------------- providers


def ofmu_step(reduce3: Callable, update: Callable, theta, gf, gr, lr=LR, beta=BETA, eps=EPS,
              finalize: Callable = R.finalize):
    """The optimizer's inner-step call sequence (``OFMU.inner_step``, project mode, no
    clipping, no cap): reduce, the coefficients on the device (``finalize``), update."""
    stats = reduce3(gf, gr)
    c = finalize(stats, stats, stats[:0], None, True, -beta, eps, lr, 0.0, None, None)
    update(theta, gf, gr, c[:4])


def eager_step(theta, gf, gr, lr=LR, beta=BETA, eps=EPS):
    """Unfused, as a user would write it (no ``.item()``: coefficients stay tensors)."""
    d, nr2 = torch.dot(gf, gr), torch.dot(gr, gr)
    k = d / (nr2 * (1.0 + eps) + torch.finfo(torch.float32).tiny)  # as ofmu.functional
    theta.add_(gf - (beta * k) * gr, alpha=lr)


def foreach_step(tv, fv, rv, lr=LR, beta=BETA, eps=EPS):
    """Multi-tensor style (torch.optim's ``_multi_tensor_*``): per-tensor dots (there is no
    ``_foreach_dot``), ``_foreach_norm``, then two ``_foreach_add_``."""
    d = torch.stack([torch.dot(a.view(-1), b.view(-1)).float() for a, b in zip(fv, rv)]).sum()
    nr2 = torch.stack(torch._foreach_norm(rv)).float().square().sum()
    k = d / (nr2 * (1.0 + eps) + torch.finfo(torch.float32).tiny)
    torch._foreach_add_(tv, fv, alpha=lr)
    torch._foreach_add_(tv, torch._foreach_mul(rv, (-lr * beta) * k))


_COMPILED: dict[str, Callable] = {}


def _compiled_reference() -> Callable:
    # One compiled function, dynamic shapes: sizes and dtypes do not exhaust the recompile
    # limit (torch.compile falls back badly after 8 recompiles). Reset by main() when the
    # thread count changes.
    if "fn" not in _COMPILED:
        def ref_step(theta, gf, gr):
            ofmu_step(R.reduce3, R.update, theta, gf, gr)

        _COMPILED["fn"] = torch.compile(ref_step, dynamic=True)
    return _COMPILED["fn"]


def make_provider(name: str, device: torch.device) -> tuple[Callable | None, str]:
    """``(fn(bufs) -> None, "")`` or ``(None, reason it is skipped)``."""
    if name == "eager":
        return (lambda b: eager_step(b.theta, b.gf, b.gr)), ""
    if name == "foreach":
        def run(b):
            if b.per_tensor is None:
                b.per_tensor = (b.views(b.theta), b.views(b.gf), b.views(b.gr))
            foreach_step(*b.per_tensor)

        return run, ""
    if name == "compile":
        if device.type == "cpu" and sys.platform == "win32":
            return None, "torch.compile on CPU needs a C++ compiler toolchain"
        return (lambda b: _compiled_reference()(b.theta, b.gf, b.gr)), ""
    if name == "reference":
        be = backends.probe("torch")[0]
    elif name in backends.NAMES:
        if backends.device_class(device) not in backends.REGISTRY[name].auto_on:
            return None, (f"the {name} backend does not run on {device.type} tensors (or only "
                          "through an interpreter: not timed)")
        be, why = backends.probe(name)
        if be is None:
            return None, why
    else:
        raise ValueError(f"unknown provider {name!r}; expected one of {ALL_PROVIDERS}")
    return (lambda b: ofmu_step(be.reduce3, be.update, b.theta, b.gf, b.gr,
                                finalize=be.finalize)), ""


# -------------------------------------------------------------------------------- the check
#
# NOTE: [Correctness gate]
# One step from theta0 is compared with a float64 reference, against a tolerance derived from
# the error bound of the computation, the same for every provider:
#
# 1. Reductions. A sum of n terms t_i in precision u (fp32 accumulation: u = 2^-24) in any
#    order (any blocking, lanes, trees: the depth of the summation is at most n) has error
#    <= LAMBDA * sqrt(n) * u * sum|t_i| with probability >= 1 - 2 exp(-LAMBDA^2 / 2) (the
#    probabilistic bound of Higham & Mary, SIAM J. Sci. Comput. 2019; the worst-case n*u*sum|t|
#    would allow 1.6% at 2^26 elements for sequential lanes, too loose to see a wrong
#    coefficient). n_eff = n covers every provider's block structure: ofmu's 1024-element
#    blocks, torch's vectorised lanes and cascades alike. torch's dot returns the buffer dtype,
#    so each statistic may also be rounded once to it (u_buf).
# 2. Coefficients. The statistics' bounds are propagated through the coefficient formulas
#    (ofmu.functional, in float64, every sign combination of the perturbations), plus COEF_ROUNDINGS
#    roundings of the scalar arithmetic in the buffer dtype (torch's eager step computes its
#    scalars in bf16 for bf16 buffers).
# 3. Elements. theta = c0*theta0 + c1*g_f + c2*g_r with at most ELEM_ROUNDINGS roundings to the
#    buffer dtype (eager: beta*k*g_r, g_f - that, theta + lr*that): per element
#    |err_i| <= ELEM_ROUNDINGS * u_buf * sum_j |c_j x_ji| + sum_j dc_j |x_ji|.
# 4. Effective coefficients. The error is fitted (least squares, float64) as
#    dc0*theta0 + dc1*g_f + dc2*g_r + noise; each fitted |dc_j| must be within its bound from
#    step 2 plus LAMBDA standard errors of the fit (rounding noise of at most the step-3 size).
#    This is what catches a slightly wrong coefficient in bf16, where one rounding of an
#    element is larger than the effect of the coefficient on it.
#
# A provider passes when both ratios (step 3 per element, step 4 per coefficient) are <= 1.

LAMBDA = 6.0  # probabilistic bounds: failure probability ~ 2 exp(-18) per quantity
COEF_ROUNDINGS = 4
ELEM_ROUNDINGS = 4


def _unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def coefficients(stats: torch.Tensor, lr: float = LR, beta: float = BETA, eps: float = EPS):
    """``update`` coefficients ``[c0, c1, c2, ok]`` of the benchmarked step from its statistics."""
    d, _, nr2 = stats.unbind()
    k = d / (nr2 * (1.0 + eps) + torch.finfo(stats.dtype).tiny)  # docs/kernels.md, finalize
    one = torch.ones_like(k)
    return torch.stack([one, lr * one, (-beta * k) * lr, torch.isfinite(stats).all().to(k.dtype)])


@dataclass
class Reference:
    """The float64 step and the bounds of section 2 of NOTE: [Correctness gate]."""

    stats: torch.Tensor  # float64 [<g_f,g_r>, |g_f|^2, |g_r|^2]
    coeffs: torch.Tensor  # float64 [c0, c1, c2, ok]
    coef_bound: torch.Tensor  # float64 [dc0, dc1, dc2]: allowed absolute coefficient errors


def reference(b: Buffers, chunk: int = 1 << 22) -> Reference:
    n = b.gf.numel()
    stats = torch.zeros(3, dtype=torch.float64, device=b.gf.device)
    abs_dot = torch.zeros((), dtype=torch.float64, device=b.gf.device)
    for s in range(0, n, chunk):
        f, r = b.gf[s:s + chunk].double(), b.gr[s:s + chunk].double()
        stats += R.reduce3(f, r)
        abs_dot += (f * r).abs().sum()
    stats, abs_dot = stats.cpu(), abs_dot.cpu()
    coeffs = coefficients(stats)
    u_acc, u_buf = _unit_roundoff(R.acc_dtype(b.gf.dtype)), _unit_roundoff(b.gf.dtype)
    gamma = LAMBDA * math.sqrt(n) * u_acc
    bound = torch.stack([gamma * abs_dot + u_buf * stats[0].abs(),
                         (gamma + u_buf) * stats[1], (gamma + u_buf) * stats[2]])
    worst = torch.zeros(3, dtype=torch.float64)
    for signs in torch.cartesian_prod(*[torch.tensor([-1.0, 1.0], dtype=torch.float64)] * 3):
        worst = torch.maximum(worst, (coefficients(stats + signs * bound)[:3] - coeffs[:3]).abs())
    coef_bound = worst + COEF_ROUNDINGS * u_buf * coeffs[:3].abs()
    return Reference(stats, coeffs, coef_bound)


@dataclass
class CheckResult:
    elem_ratio: float  # max_i |err_i| / bound_i (step 3); <= 1 passes
    coef_ratio: float  # max_j |fitted dc_j| / allowed_j (step 4); <= 1 passes
    coef_rel_err: tuple[float, float, float]  # fitted dc_j / |c_j|: what a wrong step got wrong

    @property
    def ok(self) -> bool:
        return self.elem_ratio <= 1.0 and self.coef_ratio <= 1.0


def check_step(b: Buffers, ref: Reference, chunk: int = 1 << 22) -> CheckResult:
    """Compares ``b.theta`` (one step from ``b.theta0``) with the float64 reference step."""
    n = b.theta.numel()
    dev = b.theta.device
    c = ref.coeffs.to(dev)
    dc = ref.coef_bound.to(dev)
    u_buf = _unit_roundoff(b.theta.dtype)
    tiny = torch.finfo(b.theta.dtype).tiny  # subnormal results: absolute rounding floor
    ata = torch.zeros(3, 3, dtype=torch.float64, device=dev)
    ate = torch.zeros(3, dtype=torch.float64, device=dev)
    ratio = torch.zeros((), dtype=torch.float64, device=dev)
    noise_sq = torch.zeros((), dtype=torch.float64, device=dev)
    for s in range(0, n, chunk):
        sl = slice(s, s + chunk)
        cols = torch.stack([b.theta0[sl].double(), b.gf[sl].double(), b.gr[sl].double()])
        want = c[0] * cols[0] + c[1] * cols[1] + c[2] * cols[2]
        err = b.theta[sl].double() - want
        rounding = ELEM_ROUNDINGS * u_buf * (c[:3, None].abs() * cols.abs()).sum(0) + tiny
        bound = rounding + (dc[:, None] * cols.abs()).sum(0)
        ratio = torch.maximum(ratio, (err.abs() / bound).max())
        noise_sq += rounding.square().sum()
        ata += cols @ cols.T
        ate += cols @ err
    ata, ate = ata.cpu(), ate.cpu()
    if not (torch.isfinite(ate).all() and math.isfinite(float(ratio))):
        return CheckResult(math.inf, math.inf, (math.inf,) * 3)
    inv = torch.linalg.inv(ata)
    fitted = inv @ ate
    # Standard error of each fitted coefficient for noise of RMS at most the rounding bound.
    stderr = torch.sqrt(inv.diagonal().clamp(min=0) * float(noise_sq) / n)
    allowed = ref.coef_bound + LAMBDA * stderr
    scale = ref.coeffs[:3].abs().clamp(min=1e-300)
    return CheckResult(float(ratio), float((fitted.abs() / allowed).max()),
                       tuple(float(v) for v in fitted / scale))


def check_error(b: Buffers, fn: Callable, ref: Reference | None = None) -> CheckResult:
    """Run one step of ``fn`` from theta0 and pass it through the gate."""
    b.theta.copy_(b.theta0)
    fn(b)
    return check_step(b, ref if ref is not None else reference(b))


# ------------------------------------------------------------------------------------ running


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except where there is none to show (the help text says it)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def _int_at_least(lo: int, what: str = "") -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}{what}, got {v}")
        return v
    return parse


def _int_list(lo: int, what: str = "", scientific: bool = False) -> Callable[[str], list[int]]:
    """A comma list of integers >= ``lo`` (``scientific``: ``1e6`` accepted)."""
    def parse(text: str) -> list[int]:
        out = []
        for t in (t.strip() for t in text.split(",")):
            if not t:
                continue
            try:
                v = int(float(t)) if scientific else int(t)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected integers, got {t!r}") from None
            if v < lo:
                raise argparse.ArgumentTypeError(f"each value must be at least {lo}{what}, "
                                                 f"got {v}")
            out.append(v)
        if not out:
            raise argparse.ArgumentTypeError("empty list")
        return out
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--dtypes", default="fp32,bf16",
                   help="comma list of fp32, bf16, fp16 (or float32, bfloat16, float16)")
    p.add_argument("--min-exp", type=_int_at_least(10, " (2^10 elements)"), default=16,
                   help="smallest size 2^min_exp elements")
    p.add_argument("--max-exp", type=_int_at_least(10, " (2^10 elements)"), default=None,
                   help="largest size 2^max_exp (default: 26 on CPU, 30 on GPU)")
    p.add_argument("--exp-step", type=_int_at_least(1), default=2,
                   help="step between size exponents")
    p.add_argument("--sizes", type=_int_list(MIN_SIZE, " elements", scientific=True), default=None,
                   help=f"explicit comma list of sizes, each at least {MIN_SIZE} "
                        "(overrides the exponents)")
    p.add_argument("--providers", default=",".join(DEFAULT_PROVIDERS),
                   help=f"comma list from {ALL_PROVIDERS}")
    p.add_argument("--repeats", type=_int_at_least(1), default=15, help="timed samples per point")
    p.add_argument("--warmup", type=_int_at_least(0), default=3,
                   help="untimed calls before sampling")
    p.add_argument("--rounds", type=_int_at_least(1), default=1,
                   help="whole sweeps, interleaved; ratios to compile as median (min-max)")
    p.add_argument("--min-sample-ms", type=float, default=5.0,
                   help="batch calls so that one sample lasts at least this long")
    p.add_argument("--threads", type=_int_list(1), default=[1],
                   help="CPU threads; a comma list runs each in turn (default: 1)")
    p.add_argument("--clock", default="wall", choices=sorted(C.CLOCKS),
                   help="CPU timer: wall, or thread (CPU time of the calling thread: leaves out "
                        "waiting for a core on a shared machine; --threads 1 only)")
    p.add_argument("--out", default=str(C.RESULTS_DIR), help="output folder for CSV and PNG")
    p.add_argument("--tag", default="", help="suffix of the output file names")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = p.parse_args(argv)
    # Bad values are argparse errors (usage and message on stderr, exit status 2), so that a
    # caller that catches SystemExit (the `ofmu bench` command) still shows them.
    try:
        C.parse_dtypes(args.dtypes)
    except SystemExit as e:
        p.error(str(e))
    names = [n.strip() for n in args.providers.split(",") if n.strip()]
    bad = [n for n in names if n not in ALL_PROVIDERS]
    if bad or not names:
        p.error(f"argument --providers: unknown {', '.join(map(repr, bad)) or 'empty list'}; "
                f"expected some of {', '.join(ALL_PROVIDERS)}")
    if args.max_exp is not None and args.sizes is None and args.max_exp < args.min_exp:
        p.error(f"argument --max-exp: {args.max_exp} is below --min-exp {args.min_exp}, "
                "so there is no size to measure")
    if args.min_sample_ms < 0:
        p.error("argument --min-sample-ms: must be at least 0")
    if args.clock == "thread" and (args.threads != [1] or args.device.startswith("cuda")):
        p.error("--clock thread measures one CPU thread: use it with --device cpu --threads 1")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"argument --out: {args.out} is a file, not a folder")
    return args


def sizes_from(args, device: torch.device) -> list[int]:
    if args.sizes:
        return list(args.sizes)
    hi = args.max_exp if args.max_exp is not None else (30 if device.type == "cuda" else 26)
    return [2**e for e in range(args.min_exp, hi + 1, args.exp_step)]


def fits(n: int, dtype: torch.dtype, device: torch.device) -> tuple[bool, str]:
    """Four buffers plus the eager provider's two temporaries and the check's fp64 chunks."""
    need = 6 * n * torch.empty((), dtype=dtype).element_size() + 3 * 8 * (1 << 22)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return True, ""
    if need > 0.8 * free:
        return False, f"needs ~{C.human_bytes(need)}, {C.human_bytes(free)} free"
    return True, ""


def bench_point(b: Buffers, dtype, device, providers: dict, args, meta: dict, cache) -> list[dict]:
    """All providers and both ceilings at one (dtype, size)."""
    n, es = b.gf.numel(), b.gf.element_size()
    base = dict(meta, dtype=str(dtype).replace("torch.", ""), n=n, cache_bytes=cache or "",
                cpu_isa=C.cpu_isa(device, dtype),
                working_set_bytes=3 * n * es,
                cache_resident=bool(cache and 3 * n * es <= cache))
    rows: list[dict] = []
    timed: dict[str, tuple[Callable, int, dict]] = {  # name -> (fn, accesses, extra columns)
        # Ceilings on the same buffers: a = b + s*c (theta = g_f + s g_r) and a copy.
        "triad": (lambda b: torch.add(b.gf, b.gr, alpha=0.5, out=b.theta), ACCESSES["triad"], {}),
        "copy": (lambda b: b.theta.copy_(b.gf), ACCESSES["copy"], {}),
        # In place, theta += s*g_r: the update's access pattern. A CPU store to a line that was
        # not read first costs a read-for-ownership, which triad and copy pay and the update
        # does not; this one does not either.
        "axpy": (lambda b: b.theta.add_(b.gr, alpha=0.5), ACCESSES["axpy"], {}),
    }
    # Correctness first (NOTE: [Correctness gate]): only providers that pass are timed.
    ref = reference(b)
    for name, (fn, _) in providers.items():
        if fn is None:
            continue
        try:
            res = check_error(b, fn, ref)
        except Exception as e:  # a provider that cannot run here is reported, never fatal
            rows.append(dict(base, provider=name, status=f"error: {type(e).__name__}: {e}"[:200]))
            continue
        check = dict(check_elem_ratio=res.elem_ratio, check_coef_ratio=res.coef_ratio,
                     check_dc1_rel=res.coef_rel_err[1], check_dc2_rel=res.coef_rel_err[2])
        if not res.ok:
            rows.append(dict(base, provider=name, status="WRONG (not timed)", **check))
            continue
        timed[name] = (fn, ACCESSES["step"],
                       dict(check, n_tensors=len(b.sizes) if name == "foreach" else 1))

    results = C.time_interleaved({k: (lambda f=f: f(b)) for k, (f, _, _) in timed.items()},
                                 device, args.repeats, args.warmup, args.min_sample_ms / 1e3,
                                 clock=args.clock)
    for name, (samples, calls) in results.items():
        _, accesses, extra = timed[name]
        st = C.summarize(samples)
        bpe = accesses * es
        row = dict(base, provider=name, bytes_per_elem=bpe, repeats=args.repeats, clock=args.clock,
                   calls_per_sample=calls, status="ok", **st, **extra)
        row["gbps"] = bpe * n / st["median_s"] / 1e9
        row["gbps_q25"] = bpe * n / st["q75_s"] / 1e9  # slower quartile -> lower bandwidth
        row["gbps_q75"] = bpe * n / st["q25_s"] / 1e9
        rows.append(row)
    ceiling = max(results_gbps(rows, c) for c in CEILINGS)
    for r in rows:
        if r.get("status") == "ok":
            r["ceiling_gbps"] = ceiling
            r["pct_ceiling"] = 100.0 * r["gbps"] / ceiling
    return rows


def results_gbps(rows: list[dict], provider: str) -> float:
    return next(r["gbps"] for r in rows if r["provider"] == provider and r["status"] == "ok")


def run(args) -> list[dict]:
    device = C.resolve_device(args.device)
    dtypes = C.parse_dtypes(args.dtypes)
    names = [p.strip() for p in args.providers.split(",") if p.strip()]
    sizes = sizes_from(args, device)
    if not sizes:  # e.g. a GPU default max-exp below --min-exp
        raise SystemExit(f"no size between 2^{args.min_exp} and the default maximum")
    cache = C.cache_bytes(device)
    rows: list[dict] = []
    for threads in args.threads:
        C.set_threads(threads)
        torch._dynamo.reset()  # a new thread count would recompile anyway
        _COMPILED.clear()
        meta = C.metadata(device)
        providers = {nm: make_provider(nm, device) for nm in names}
        print(f"# {meta['device']} | torch {meta['torch']} triton {meta['triton']} "
              f"ofmu {meta['ofmu']} | threads {threads} | cache {C.human_bytes(cache or 0)}")
        if device.type == "cpu":
            print("  C++ CPU kernels: " + ", ".join(
                f"{str(dt).replace('torch.', '')} {C.cpu_isa(device, dt)}" for dt in dtypes))
        for nm, (fn, why) in providers.items():
            if fn is None:
                print(f"  skip {nm}: {why}")
                rows.append(dict(meta, provider=nm, status=f"skipped: {why}"))
        for rnd in range(1, args.rounds + 1):  # interleaved: every point once per round
            for dtype in dtypes:
                for n in sizes:
                    rows += _point(n, dtype, device, providers, args, dict(meta, round=rnd), cache)
            if args.rounds > 1:
                print(f"  round {rnd}/{args.rounds} done", flush=True)
    return rows


def _point(n, dtype, device, providers, args, meta, cache) -> list[dict]:
    ok, why = fits(n, dtype, device)
    if not ok:
        print(f"  skip n={n} {dtype}: {why}")
        return []
    b = make_buffers(n, dtype, device)
    point = bench_point(b, dtype, device, providers, args, meta, cache)
    for r in point:
        if r.get("status", "ok") != "ok":
            print(f"  {r['provider']} n={n} {dtype}: {r['status']}")
    del b
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return point


def ratios(rows: list[dict]) -> list[dict]:
    """Per (threads, dtype, n, provider): speed relative to ``compile`` (compile's time over the
    provider's, > 1: faster) in each round, as median and min-max over the rounds."""
    ok = [r for r in rows if r.get("status") == "ok"]
    by = {(r["threads"], r["round"], r["dtype"], r["n"], r["provider"]): r for r in ok}
    out = []
    keys = dict.fromkeys((r["threads"], r["dtype"], r["n"], r["provider"]) for r in ok
                         if r["provider"] not in CEILINGS + ("compile",))
    for th, dt, n, prov in keys:
        got, pct = [], []
        for (t2, rnd, d2, n2, p2), r in by.items():
            c = by.get((th, rnd, dt, n, "compile"))
            if (t2, d2, n2, p2) == (th, dt, n, prov) and c is not None:
                got.append(c["median_s"] / r["median_s"])
                pct.append(r["pct_ceiling"])
        if got:
            any_r = next(r for r in ok if r["provider"] == prov and r["dtype"] == dt)
            out.append(dict(device=any_r["device"], torch=any_r["torch"], ofmu=any_r["ofmu"],
                            threads=th, cpu_isa=any_r.get("cpu_isa", ""), dtype=dt, n=n,
                            provider=prov, rounds=len(got),
                            vs_compile_median=statistics.median(got), vs_compile_min=min(got),
                            vs_compile_max=max(got), pct_ceiling_median=statistics.median(pct)))
    return out


def failures(rows: list[dict]) -> list[str]:
    """What failed the gate or raised (skipped providers are not failures)."""
    return [f"{r['provider']} n={r.get('n')} {r.get('dtype')}: {r['status']}" for r in rows
            if r.get("status", "ok") != "ok" and not r["status"].startswith("skipped")]


# ----------------------------------------------------------------------------------- output


def print_table(rows: list[dict]) -> None:
    ok = [r for r in rows if r.get("status") == "ok" and r.get("round", 1) == 1]
    for threads in sorted({r["threads"] for r in ok}):
        for dtype in dict.fromkeys(r["dtype"] for r in ok):
            sel = [r for r in ok if r["dtype"] == dtype and r["threads"] == threads]
            provs = list(dict.fromkeys(r["provider"] for r in sel if r["provider"] not in
                                       CEILINGS))
            by = {(r["n"], r["provider"]): r for r in sel}
            body = []
            for n in sorted({r["n"] for r in sel}):
                any_r = next(r for r in sel if r["n"] == n)
                line = [f"2^{int(math.log2(n))}" + ("*" if any_r["cache_resident"] else "")]
                for p in provs:
                    r = by.get((n, p))
                    line.append(f"{r['gbps']:.1f} ({r['pct_ceiling']:.0f}%)" if r else "-")
                for p in CEILINGS:
                    r = by.get((n, p))
                    line.append(f"{r['gbps']:.1f}" if r else "-")
                body.append(line)
            print(f"\nGB/s (% of best of triad/axpy/copy), {dtype}, {threads} thread(s); "
                  "* = working set fits in cache" + (" (round 1)" if len(rows) and any(
                      r.get("round", 1) > 1 for r in rows) else ""))
            print(C.table(body, ["n"] + provs + list(CEILINGS)))


def print_ratios(rat: list[dict]) -> None:
    for threads in sorted({r["threads"] for r in rat}):
        for dtype in dict.fromkeys(r["dtype"] for r in rat):
            sel = [r for r in rat if r["dtype"] == dtype and r["threads"] == threads]
            provs = list(dict.fromkeys(r["provider"] for r in sel))
            by = {(r["n"], r["provider"]): r for r in sel}
            body = [[f"2^{int(math.log2(n))}"] + [
                (f"{r['vs_compile_median']:.2f} ({r['vs_compile_min']:.2f}-"
                 f"{r['vs_compile_max']:.2f})" if (r := by.get((n, p))) else "-") for p in provs]
                for n in sorted({r["n"] for r in sel})]
            rounds = max(r["rounds"] for r in sel)
            print(f"\nspeed vs compile (>1: faster), median (min-max) over {rounds} round(s), "
                  f"{dtype}, {threads} thread(s)")
            print(C.table(body, ["n"] + provs))


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok" and r.get("round", 1) == 1]
    panels = list(dict.fromkeys((r["dtype"], r["threads"]) for r in ok))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (dtype, threads) in zip(axes[0], panels):
        sel = [r for r in ok if r["dtype"] == dtype and r["threads"] == threads]
        for p in dict.fromkeys(r["provider"] for r in sel):
            pts = sorted((r["n"], r["gbps"], r["gbps_q25"], r["gbps_q75"]) for r in sel
                         if r["provider"] == p)
            xs = [x[0] for x in pts]
            style = {"triad": dict(color="k", ls="--"), "axpy": dict(color="k", ls="-."),
                     "copy": dict(color="0.5", ls=":")}
            line = ax.plot(xs, [x[1] for x in pts], marker="o" if p not in style else None,
                           label=p + (" (ceiling)" if p in style else ""), **style.get(p, {}))
            ax.fill_between(xs, [x[2] for x in pts], [x[3] for x in pts], alpha=0.15,
                            color=line[0].get_color())
        cache = sel[0]["cache_bytes"]
        if cache:
            es = sel[0]["working_set_bytes"] / (3 * sel[0]["n"])
            ax.axvline(cache / (3 * es), color="0.7", lw=0.8)
            ax.text(cache / (3 * es), ax.get_ylim()[1] * 0.97, " 3 buffers = cache",
                    fontsize=7, va="top", color="0.4")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("elements per buffer")
        ax.set_ylabel("GB/s (bytes model / median time)")
        ax.set_title(f"{sel[0]['device'][:40]}\n{dtype}, {threads} thread(s)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        replace_atomic(path, lambda f: fig.savefig(f, dpi=120, format="png"))  # like the CSV
    finally:
        plt.close(fig)


def main(argv=None) -> list[dict]:
    """Entry point of ``python benchmarks/bench_kernels.py`` and ``ofmu bench``; returns rows.
    Exits with status 1 (after writing what was measured) when a provider failed the gate or
    raised; writes nothing when nothing was measured (a results file is never replaced by less)."""
    args = parse_args(argv)
    print(f"# results go to {os.path.abspath(args.out)}")
    rows = run(args)
    bad = failures(rows)
    if not any(r.get("status") == "ok" and r["provider"] not in CEILINGS for r in rows):
        raise SystemExit("no provider was measured; nothing written"
                         + (": " + "; ".join(bad[:4]) if bad else ""))
    stem = C.output_stem("kernels", args)
    out = C.write_csv(stem + ".csv", rows, COLUMNS)
    print_table(rows)
    rat = ratios(rows)
    if rat:
        print_ratios(rat)
        print(f"wrote {C.write_csv(stem + '-vs-compile.csv', rat, RATIO_COLUMNS)}")
    print(f"\nwrote {out} (folder {os.path.abspath(args.out)})")
    if not args.no_plot:
        png = stem + ".png"
        plot(rows, png)
        print(f"wrote {png}")
    if bad:
        print(f"{len(bad)} provider point(s) failed:\n  " + "\n  ".join(bad), file=sys.stderr)
        raise SystemExit(1)
    return rows


if __name__ == "__main__":
    main()

"""Memory of one unlearning step on a causal LM: OFMU (first order, Adam) against GradDiff with
``torch.optim.AdamW``, same model and batches, fp32 and bf16 weights.

Two measurements, each in a fresh subprocess per (method, dtype):

* **optimizer-side bytes, exact**: every tensor storage that exists because of the method and
  outlives the backward pass: for GradDiff the ``.grad`` tensors and AdamW's state; for OFMU
  every tensor reachable from the optimizer object (its flat gradient, moment and scratch
  buffers), minus the storage the parameters themselves live in. Counted after two steps (lazy
  state allocated), deduplicated by storage, and divided by the number of trainable parameters.
* **process peak RSS** (CPU): ``VmHWM`` from ``/proc/self/status``, reset through
  ``/proc/self/clear_refs`` after the model and batches exist; the peak minus the RSS at that
  point covers optimizer state, gradients, activations and allocator slack of the first two
  steps. On CUDA the same numbers come from ``torch.cuda.max_memory_allocated``.

Usage: ``python -m ofmu.bench.memory [--hidden 512 --layers 4 --vocab 8192 --batch 4 --seq 128]
[--out DIR]``; ``--smoke`` runs a tiny configuration in seconds.

``--moment-options`` instead measures what cheaper Adam-moment choices would cost in unlearning
quality, on a tiny Llama that memorised random sequences: a reference implementation of OFMU's
first-order loops (checked against ``OFMU`` itself, row ``ofmu``) with the moments kept per
loop, rounded to bf16, shared by both loops, sharing only the second moment, or dropped from
the inner loop (a stateless sign step, i.e. Adam with betas 0).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import types

import torch

from .common import RESULTS_DIR, device_name, metadata, resolve_device, slug, write_csv

METHODS = {
    # OFMU's measured LM recipe: first order (no HVP, no double backward), Adam per loop
    "ofmu-adam": dict(preconditioner="adam", similarity="project", rho=0.0, outer_hvp="none",
                      inner_steps=1, outer_steps=1, beta=1.0),
    # the same with a stateless inner step (no inner moments)
    "ofmu-adam-sign": dict(preconditioner="adam", inner_preconditioner="sign",
                           similarity="project", rho=0.0, outer_hvp="none", inner_steps=1,
                           outer_steps=1, beta=1.0),
    "ofmu-sgd": dict(preconditioner="sgd", similarity="project", rho=0.0, outer_hvp="none",
                     inner_steps=1, outer_steps=1, beta=1.0),
    # the stationarity penalty on (rho > 0), per way of obtaining h; Adam per loop
    "ofmu-adam-fd": dict(preconditioner="adam", similarity="project", rho=0.01, outer_hvp="fd",
                         inner_steps=1, outer_steps=1, beta=1.0),
    "ofmu-adam-forget": dict(preconditioner="adam", similarity="project", rho=0.01,
                             outer_hvp="forget", inner_steps=1, outer_steps=1, beta=1.0),
    "ofmu-adam-exact": dict(preconditioner="adam", similarity="project", rho=0.01,
                            outer_hvp="exact", inner_steps=1, outer_steps=1, beta=1.0),
    "ofmu-adam-hvp-fd": dict(preconditioner="adam", similarity="hvp", rho=0.01, outer_hvp="fd",
                             inner_steps=1, outer_steps=1, beta=1.0),
    # OFMU.paper_config()
    "ofmu-paper": dict(inner_steps=5, outer_steps=1, beta=0.5, rho=0.01, similarity="project",
                       outer_hvp="forget", preconditioner="sgd", forget_loss_cap=None),
    "graddiff-adamw": None,
}
# Methods with a double backward: the model runs eager attention (SDPA has none), whose
# activations make their peaks not comparable with the other rows.
EAGER = ("ofmu-adam-forget", "ofmu-adam-exact", "ofmu-adam-hvp-fd", "ofmu-paper")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
COLUMNS = ["method", "dtype", "params", "param_bytes", "optimizer_side_bytes", "bytes_per_param",
           "ratio_to_graddiff", "peak_extra_bytes", "peak_extra_per_param", "peak_kind", "breakdown",
           "hidden", "layers", "vocab", "batch", "seq", "device", "torch", "ofmu", "threads"]


# ------------------------------------------------------------------------- one measurement


def _model(args, dtype, device, eager: bool = False):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                   intermediate_size=int(args.hidden * 8 / 3) // 64 * 64 or 64,
                                   num_hidden_layers=args.layers,
                                   num_attention_heads=max(1, args.hidden // 64),
                                   num_key_value_heads=max(1, args.hidden // 64),
                                   max_position_embeddings=max(64, args.seq),
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    kw = {"attn_implementation": "eager"} if eager else {}
    return transformers.AutoModelForCausalLM.from_config(cfg, **kw).to(device=device, dtype=dtype)


def _batches(args, device, n=4):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
            for _ in range(n)]


def _storage_key(t: torch.Tensor):
    s = t.untyped_storage()
    return (t.device, s.data_ptr()), s.nbytes()


def _walk(obj, path: str, found: dict, seen: set, depth: int = 0) -> None:
    """Tensors reachable from ``obj`` (dicts, sequences, plain objects), first path per storage."""
    if isinstance(obj, torch.Tensor):
        if obj.device.type != "meta":
            key, nbytes = _storage_key(obj)
            found.setdefault(key, (path, nbytes))
        return
    if depth > 8 or id(obj) in seen or isinstance(obj, (str, bytes, int, float, type,
                                                         types.FunctionType, types.MethodType,
                                                         torch.nn.Module)):
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        for k, v in obj.items():
            _walk(v, f"{path}[{k!r}]" if not isinstance(k, torch.Tensor) else f"{path}[param]",
                  found, seen, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for i, v in enumerate(obj):
            _walk(v, f"{path}[{i}]", found, seen, depth + 1)
    elif hasattr(obj, "__dict__"):
        for k, v in vars(obj).items():
            _walk(v, f"{path}.{k}", found, seen, depth + 1)


def optimizer_side_bytes(opt, params: list[torch.Tensor]) -> tuple[int, dict[str, int]]:
    """Bytes of the gradients and optimizer state that exist besides the parameters."""
    found: dict = {}
    _walk(opt.state, "state", found, set())
    _walk({k: v for k, v in vars(opt).items() if k not in ("param_groups", "state")}, "opt",
          found, set())
    for i, p in enumerate(params):
        if p.grad is not None:
            key, nbytes = _storage_key(p.grad)
            found.setdefault(key, (f"p.grad[{i}]", nbytes))
    param_storages = {_storage_key(p)[0] for p in params}
    breakdown: dict[str, int] = {}
    for key, (path, nbytes) in found.items():
        if key in param_storages:
            continue
        label = _label(path)
        breakdown[label] = breakdown.get(label, 0) + nbytes
    return sum(breakdown.values()), breakdown


def _label(path: str) -> str:
    """A short name for a storage: the last attribute/key, without indices."""
    import re

    if path.startswith("p.grad"):
        return "grad"
    keys = re.findall(r"\['([A-Za-z_]+)'\]|\.([A-Za-z_]+)", path)
    names = [a or b for a, b in keys if (a or b) not in ("state", "opt")]
    return names[-1] if names else path


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak(device) -> str:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda max_memory_allocated"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "process VmHWM (RSS peak)"
    except OSError:
        return "process ru_maxrss (not reset: includes model construction)"


def _peak_extra(device, baseline: int, kind: str) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - baseline
    if "VmHWM" in kind:
        return _rss_kb("VmHWM") * 1024 - baseline
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline


def measure(method: str, dtype_name: str, args) -> dict:
    from ofmu import OFMU
    from ofmu.hf import causal_lm_losses

    device = resolve_device(args.device)
    dtype = DTYPES[dtype_name]
    model = _model(args, dtype, device, eager=method in EAGER)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    forget, retain = _batches(args, device), _batches(args, device)
    with torch.no_grad():  # thread pools, allocator warm-up
        model(input_ids=forget[0][:1, :8])
    baseline = (torch.cuda.memory_allocated(device) if device.type == "cuda"
                else _rss_kb("VmRSS") * 1024)
    kind = _reset_peak(device)
    i = {"k": 0}

    def pair():
        k = i["k"] % len(forget)
        i["k"] += 1
        return {"input_ids": forget[k]}, {"input_ids": retain[k]}

    if method == "graddiff-adamw":
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)

        def step():
            lf, lr = causal_lm_losses(model, *pair())
            (lr - lf).backward()
            opt.step()
            # measured before zero_grad: the gradients exist at the optimizer step
    else:
        opt = OFMU(params, lr=1e-5, **METHODS[method])

        def step():
            opt.step(lambda: causal_lm_losses(model, *pair()))

    for _ in range(2):
        if method == "graddiff-adamw":
            opt.zero_grad(set_to_none=True)
        step()
    peak = _peak_extra(device, baseline, kind)
    total, breakdown = optimizer_side_bytes(opt, params)
    n = sum(p.numel() for p in params)
    return {"method": method, "dtype": dtype_name, "params": n,
            "param_bytes": sum(p.numel() * p.element_size() for p in params),
            "optimizer_side_bytes": total, "bytes_per_param": total / n,
            "peak_extra_bytes": peak, "peak_extra_per_param": peak / n, "peak_kind": kind,
            "breakdown": " ".join(f"{k}={v / n:.2f}" for k, v in sorted(breakdown.items())
                                  if v / n >= 0.005),
            "hidden": args.hidden, "layers": args.layers, "vocab": args.vocab,
            "batch": args.batch, "seq": args.seq, **metadata(device)}


# ------------------------------------------------------------- cheaper moments: quality

MOMENT_OPTIONS = ("ofmu", "per-loop", "per-loop-bf16", "shared", "shared-v", "inner-sign")


def _memorised_tiny(vocab=48, seq=10, n_forget=8, n_retain=24, steps=300):
    import transformers

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n_forget + n_retain, seq), generator=g)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, ids[:n_forget], ids[n_forget:]


@torch.no_grad()
def _nll(model, ids) -> float:
    logp = torch.log_softmax(model(input_ids=ids).logits.double()[:, :-1], dim=-1)
    return float(-logp.gather(-1, ids[:, 1:, None]).mean())


def moment_option_run(option: str, model, forget, retain, seed: int, steps: int, lr: float,
                      betas=(0.9, 0.999), adam_eps=1e-8) -> tuple[float, float]:
    """Forget and retain NLL change after ``steps`` first-order OFMU steps (project, beta=1,
    rho=0, one inner and one outer Adam step each) with the given moment ``option``."""
    from ofmu import OFMU
    from ofmu.hf import causal_lm_losses

    params = list(model.parameters())
    f0, r0 = _nll(model, forget), _nll(model, retain)
    g = torch.Generator().manual_seed(seed)

    def draw():
        return ({"input_ids": forget[torch.randint(0, len(forget), (4,), generator=g)]},
                {"input_ids": retain[torch.randint(0, len(retain), (8,), generator=g)]})

    if option == "ofmu":
        opt = OFMU(params, lr=lr, inner_lr=lr, inner_steps=1, outer_steps=1, beta=1.0, rho=0.0,
                   similarity="project", outer_hvp="none", preconditioner="adam", betas=betas,
                   adam_eps=adam_eps, forget_loss_cap=None)
        for _ in range(steps):
            opt.step(lambda: causal_lm_losses(model, *draw()))
        return _nll(model, forget) - f0, _nll(model, retain) - r0

    def zeros():
        return [torch.zeros_like(p) for p in params]

    inner = (zeros(), zeros()) if option != "inner-sign" else None
    outer = {"shared": inner, "shared-v": (zeros(), inner[1]) if inner else None}.get(
        option, (zeros(), zeros()))
    counts = {"inner": 0, "outer": 0}
    b1, b2 = betas

    def adam(loop, moments, dirs, ascend):
        key = "inner" if option == "shared" else loop
        counts[key] += 1
        t = counts[key]
        for p, d, m, v in zip(params, dirs, *moments):
            d = -d if ascend else d
            m.mul_(b1).add_(d, alpha=1 - b1)
            v.mul_(b2).addcmul_(d, d, value=1 - b2)
            if option == "per-loop-bf16":
                m.copy_(m.bfloat16())
                v.copy_(v.bfloat16())
            p.sub_(lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + adam_eps))

    def grads(fb, rb, forget_too=True):
        with torch.enable_grad():
            lf, lr_ = causal_lm_losses(model, fb if forget_too else None, rb)
            gf = torch.autograd.grad(lf, params) if forget_too else None
            return gf, torch.autograd.grad(lr_, params)

    with torch.no_grad():
        for _ in range(steps):
            gf, gr = grads(*draw())
            d = sum((a * b).sum() for a, b in zip(gf, gr))
            nf2, nr2 = sum((a * a).sum() for a in gf), sum((b * b).sum() for b in gr)
            k = d / (nr2 + 1e-12 * (nf2 + nr2))
            u = [a - k * b for a, b in zip(gf, gr)]  # project, beta = 1
            if option == "inner-sign":
                for p, ui in zip(params, u):
                    p.add_(lr * ui / (ui.abs() + adam_eps))
            else:
                adam("inner", inner, u, ascend=True)
            _, gr = grads(*draw(), forget_too=False)
            adam("outer", outer, gr, ascend=False)
    return _nll(model, forget) - f0, _nll(model, retain) - r0


def moment_options(steps: int = 40, lr: float = 5e-4, seeds: int = 3) -> list[dict]:
    base, forget, retain = _memorised_tiny()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    rows = []
    for option in MOMENT_OPTIONS:
        res = []
        for seed in range(seeds):
            base.load_state_dict(state)
            res.append(moment_option_run(option, base, forget, retain, seed, steps, lr))
        fr, rr = [a for a, _ in res], [b for _, b in res]
        rows.append({"option": option, "steps": steps, "lr": lr, "seeds": seeds,
                     "forget_nll_rise": sum(fr) / seeds, "forget_min": min(fr), "forget_max": max(fr),
                     "retain_nll_change": sum(rr) / seeds, "retain_min": min(rr),
                     "retain_max": max(rr), **metadata(torch.device("cpu"))})
        print(f"{option:14s} forget NLL rise {rows[-1]['forget_nll_rise']:.2f} "
              f"[{min(fr):.2f}, {max(fr):.2f}]  retain NLL change "
              f"{rows[-1]['retain_nll_change']:+.4f} [{min(rr):+.4f}, {max(rr):+.4f}]", flush=True)
    return rows


# ------------------------------------------------------------------------------ driver


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS_DIR))
    p.add_argument("--tag", default="")
    p.add_argument("--smoke", action="store_true", help="tiny model, seconds")
    p.add_argument("--moment-options", action="store_true",
                   help="unlearning quality of cheaper Adam-moment choices (tiny memorised Llama)")
    p.add_argument("--steps", type=int, default=40, help="--moment-options: OFMU steps")
    p.add_argument("--worker", nargs=2, metavar=("METHOD", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.hidden, args.layers, args.vocab, args.batch, args.seq = 64, 1, 256, 2, 16
    for m in args.methods.split(","):
        if m not in METHODS:
            p.error(f"unknown method {m!r}; expected some of {list(METHODS)}")
    for d in args.dtypes.split(","):
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}; expected some of {list(DTYPES)}")
    return args


def run(args) -> list[dict]:
    """Each (method, dtype) in its own process, so that peaks do not mix."""
    rows = []
    base = [sys.executable, "-m", "ofmu.bench.memory", "--hidden", str(args.hidden), "--layers",
            str(args.layers), "--vocab", str(args.vocab), "--batch", str(args.batch), "--seq",
            str(args.seq), "--device", args.device, "--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    for dtype in args.dtypes.split(","):
        for method in args.methods.split(","):
            out = subprocess.run(base + ["--worker", method, dtype], capture_output=True,
                                 text=True, env=env, check=False)
            if out.returncode != 0:
                raise RuntimeError(f"memory worker {method}/{dtype} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for r in rows:
        ref = [g for g in rows if g["method"] == "graddiff-adamw" and g["dtype"] == r["dtype"]]
        r["ratio_to_graddiff"] = (r["optimizer_side_bytes"] / ref[0]["optimizer_side_bytes"]
                                  if ref else float("nan"))
    return rows


def print_table(rows: list[dict]) -> None:
    print("| method | weights | optimizer-side B/param | x GradDiff+AdamW | peak extra B/param | "
          "breakdown |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['dtype']} | {r['bytes_per_param']:.2f} | "
              f"{r['ratio_to_graddiff']:.2f} | {r['peak_extra_per_param']:.1f} | "
              f"{r['breakdown']} |")


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(measure(args.worker[0], args.worker[1], args)))
        return []
    if args.moment_options:
        rows = moment_options(steps=args.steps, seeds=1 if args.smoke else 3)
        if not args.smoke:
            path = write_csv(os.path.join(args.out, "memory-moment-options.csv"), rows, list(rows[0]))
            print(f"wrote {path}")
        return rows
    rows = run(args)
    print_table(rows)
    if not args.smoke or args.out != str(RESULTS_DIR):
        name = f"memory-{slug(device_name(resolve_device(args.device)))}"
        path = write_csv(os.path.join(args.out, name + (f"-{args.tag}" if args.tag else "") + ".csv"),
                         rows, COLUMNS)
        print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()

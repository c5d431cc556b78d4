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
    "ofmu-sgd": dict(preconditioner="sgd", similarity="project", rho=0.0, outer_hvp="none",
                     inner_steps=1, outer_steps=1, beta=1.0),
    "graddiff-adamw": None,
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
COLUMNS = ["method", "dtype", "params", "param_bytes", "optimizer_side_bytes", "bytes_per_param",
           "ratio_to_graddiff", "peak_extra_bytes", "peak_extra_per_param", "peak_kind", "breakdown",
           "hidden", "layers", "vocab", "batch", "seq", "device", "torch", "ofmu", "threads"]


# ------------------------------------------------------------------------- one measurement


def _model(args, dtype, device):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                   intermediate_size=int(args.hidden * 8 / 3) // 64 * 64 or 64,
                                   num_hidden_layers=args.layers,
                                   num_attention_heads=max(1, args.hidden // 64),
                                   num_key_value_heads=max(1, args.hidden // 64),
                                   max_position_embeddings=max(64, args.seq),
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=dtype)


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
    model = _model(args, dtype, device)
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

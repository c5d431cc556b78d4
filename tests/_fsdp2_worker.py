"""Worker for tests/test_fsdp2.py: OFMU on FSDP2-sharded models (``fully_shard``), gloo ranks on
CPU, each rank on its slice of every batch.

Run as ``python _fsdp2_worker.py OUT WORLD PARTS [WORLD PARTS ...]``: one job per pair (new
processes, forked from this one), one after the other, sharing the checkpoint directory
``OUT/ckpt``; every rank of job i saves ``OUT/job{i}/rank{r}.pt``: the full parameters after
every config (``DTensor.full_tensor()``), the messages of the misuse cases, the checkpoint
round trip, the measurements. ``run_single`` is the single-process
reference on the whole batches (plain parameters, OFMU's replicated path with no ranks).
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ofmu import OFMU

BATCH = 8  # per batch, split across the ranks (2 and 4 divide it)
COMMON = dict(lr=0.05, inner_lr=0.02, inner_steps=2, outer_steps=1, beta=0.6, rho=0.2,
              weight_decay=1e-3, similarity="project", outer_hvp="fd", preconditioner="sgd")
STEPS = 3

# name: (model, optimizer settings, param groups?)
CONFIGS = {
    "mlp-project-none-sgd": ("mlp", dict(similarity="project", outer_hvp="none")),
    "mlp-none-rho0-adam": ("mlp", dict(similarity="none", outer_hvp="forget", rho=0.0,
                                       preconditioner="adam")),
    "mlp-project-fd-sgd": ("mlp", dict(similarity="project", outer_hvp="fd")),
    # the cap holds back 2 of the 6 inner steps: decided on the loss averaged over the ranks
    "mlp-project-none-sgd-cap": ("mlp", dict(similarity="project", outer_hvp="none",
                                             forget_loss_cap=1.16)),
    # fd_delta above bf16's resolution (2^-8 relative): for the mixed-precision run
    "mlp-project-fd-sgd-wide": ("mlp", dict(similarity="project", outer_hvp="fd", fd_delta=0.05)),
    "mlp-project-fd-adam-clip-groups": ("mlp", dict(similarity="project", outer_hvp="fd",
                                                    preconditioner="adam", max_grad_norm=0.05,
                                                    groups=True)),
    "tf-project-none-adam": ("tf", dict(similarity="project", outer_hvp="none",
                                        preconditioner="adam")),
    "tf-project-fd-sgd": ("tf", dict(similarity="project", outer_hvp="fd")),
    # a frozen base (embedding, attention projections), as with adapters: FSDP2 shards the
    # frozen parameters too; OFMU updates the others
    "tf-frozen-project-fd-adam": ("tf", dict(similarity="project", outer_hvp="fd",
                                             preconditioner="adam", frozen=True)),
}
FROZEN = ("emb.weight", "layer.self_attn.in_proj_weight")


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 9), torch.nn.Tanh(),
                               torch.nn.Linear(9, 3)).double()


class TinyTransformer(torch.nn.Module):
    """Embedding, one pre-norm encoder layer (attention + MLP), a head: 11 tokens, width 8.

    The layer has no biases: the key bias's true gradient is zero (softmax is shift-invariant),
    so it only carries rounding noise, which Adam would turn into order-dependent steps."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(11, 8)
        self.layer = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0,
                                                      batch_first=True, norm_first=True,
                                                      bias=False)
        self.head = torch.nn.Linear(8, 11)

    def forward(self, x):
        return self.head(self.layer(self.emb(x)))


def build(kind):
    m = mlp() if kind == "mlp" else TinyTransformer().double()
    return m


def shard(m, kind, mp_policy=None, mesh=None):
    from torch.distributed.fsdp import fully_shard

    kw = {} if mp_policy is None else dict(mp_policy=mp_policy)
    if mesh is not None:
        kw["mesh"] = mesh
    for sub in ([m[0], m[2]] if kind == "mlp" else [m.layer]):
        fully_shard(sub, **kw)
    fully_shard(m, **kw)
    return m


class Slices:
    """Batch i (forget, retain), this rank's slice; ``same_batch=True`` reuses the last one."""

    def __init__(self, m, kind, rank, world, dtype=torch.float64):
        self.m, self.kind, self.i, self.rank, self.world, self.dtype = m, kind, 0, rank, world, dtype

    def __call__(self, same_batch=False):
        if not same_batch:
            self.i += 1
        g = torch.Generator().manual_seed(self.i)
        n = BATCH // self.world
        sl = slice(self.rank * n, (self.rank + 1) * n)
        ce = torch.nn.functional.cross_entropy
        if self.kind == "mlp":
            x = torch.randn(2, BATCH, 4, generator=g, dtype=torch.float64).to(self.dtype)
            y = torch.randint(0, 3, (2, BATCH), generator=g)
            return ce(self.m(x[0, sl]), y[0, sl]), ce(self.m(x[1, sl]), y[1, sl])
        x = torch.randint(0, 11, (2, BATCH, 5), generator=g)
        y = torch.randint(0, 11, (2, BATCH, 5), generator=g)
        out = [ce(self.m(x[k, sl]).flatten(0, 1), y[k, sl].flatten()) for k in (0, 1)]
        return out[0], out[1]


def optimizer(m, cfg):
    cfg = dict(COMMON, **cfg)
    cfg.pop("frozen", None)
    if cfg.pop("groups", False):  # weights and biases apart, each with its own decay
        named = list(m.named_parameters())
        params = [dict(params=[p for n, p in named if n.endswith("weight")], weight_decay=1e-2),
                  dict(params=[p for n, p in named if not n.endswith("weight")])]
        return OFMU(params, **cfg)
    return OFMU(m.parameters(), **cfg)


def full(m):
    return torch.cat([(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().flatten()
                      for p in m.parameters()])


# on 4 ranks the bias group of the clip-groups config is empty on rank 3 (FSDP2 chunks 9 and 3
# rows as 3+3+3+0 and 1+1+1+0)
CONFIGS4 = ("mlp-project-fd-sgd", "tf-project-none-adam", "mlp-project-fd-adam-clip-groups")
GRADS_CONFIG = "tf-project-fd-sgd"
SWITCHED = ("mlp-project-fd-adam-clip-groups", "tf-frozen-project-fd-adam")
# also run with bf16 parameters
MP_CONFIGS = ("mlp-project-none-sgd", "tf-project-none-adam", "mlp-project-fd-sgd-wide")


def mixed_precision():
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def run(name, rank, world, sharded, fp32=False, mp=False, hsdp=False):
    """``fp32``: the model in float32 (default float64); ``mp``: FSDP2 mixed precision
    (bf16 parameters in forward and backward, float32 reductions, float32 shards); ``hsdp``:
    a 2-D mesh, 2 replicas of a model sharded over ``world // 2`` ranks."""
    kind, cfg = CONFIGS[name]
    m = build(kind)
    if fp32 or mp:
        m = m.float()
    if cfg.get("frozen"):
        for n, p in m.named_parameters():
            p.requires_grad_(n not in FROZEN)
    if sharded:
        mesh = None
        if hsdp:
            from torch.distributed.device_mesh import init_device_mesh
            mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
        shard(m, kind, mixed_precision() if mp else None, mesh)
    opt = optimizer(m, cfg)
    closure = Slices(m, kind, rank, world, torch.float32 if fp32 or mp else torch.float64)
    losses = [float(opt.step(closure)) for _ in range(STEPS)]
    return full(m), losses


def run_switched(name, rank, world):
    """As accelerate's FSDP2 ``prepare(model, optimizer)`` does: OFMU built on the plain model,
    then ``fully_shard``, then the sharded parameters put into ``param_groups`` in place."""
    kind, cfg = CONFIGS[name]
    m = build(kind)
    for n, p in m.named_parameters():
        p.requires_grad_(not (cfg.get("frozen") and n in FROZEN))
    opt = optimizer(m, cfg)
    names = {id(p): n for n, p in m.named_parameters()}
    shard(m, kind)
    new = dict(m.named_parameters())
    for g in opt.param_groups:
        g["params"] = [new[names[id(p)]] for p in g["params"]]
    closure = Slices(m, kind, rank, world)
    losses = [float(opt.step(closure)) for _ in range(STEPS)]
    return full(m), losses


def grads_after(name, rank, world, sharded):
    """``p.grad`` after the steps: the last retain gradient (sharded: a DTensor over OFMU's
    buffer), gathered."""
    kind, cfg = CONFIGS[name]
    m = build(kind)
    if sharded:
        shard(m, kind)
    opt = optimizer(m, cfg)
    closure = Slices(m, kind, rank, world)
    for _ in range(STEPS):
        opt.step(closure)
    return torch.cat([(p.grad.full_tensor() if sharded else p.grad).flatten()
                      for p in m.parameters()])


def run_single(names=None, fp32=False):
    return {n: run(n, 0, 1, sharded=False, fp32=fp32) for n in (names or CONFIGS)}


def _message(fn):
    try:
        fn()
    except (RuntimeError, ValueError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    return ""


def misuse(rank, world):
    """The messages of the misuse cases (empty string: no error raised)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    out = {}

    def built_before_fully_shard():
        m = mlp()
        opt = OFMU(m.parameters(), **dict(COMMON, outer_hvp="none"))
        shard(m, "mlp")
        opt.step(Slices(m, "mlp", rank, world))
    out["built_before"] = _message(built_before_fully_shard)

    def replicated_dtensor():
        mesh = init_device_mesh("cpu", (world,))
        p = torch.nn.Parameter(distribute_tensor(torch.ones(4, 3, dtype=torch.float64), mesh,
                                                 [Replicate()]))
        OFMU([p], outer_hvp="none")
    out["replicate"] = _message(replicated_dtensor)

    for key, cfg in {"hvp": dict(similarity="hvp", outer_hvp="fd"),
                     "forget": dict(outer_hvp="forget"),
                     "exact": dict(outer_hvp="exact", process_group=None)}.items():
        out[key] = _message(lambda cfg=cfg: OFMU(shard(mlp(), "mlp").parameters(),
                                                 **dict(COMMON, **cfg)))

    def rho_raised_later():
        m = shard(mlp(), "mlp")
        opt = OFMU(m.parameters(), **dict(COMMON, rho=0.0, outer_hvp="forget"))  # fine at rho=0
        opt.step(Slices(m, "mlp", rank, world))
        opt.param_groups[0]["rho"] = opt.param_groups[0]["rho_k"] = 0.1
        opt.step(Slices(m, "mlp", rank, world))
    out["rho_later"] = _message(rho_raised_later)

    def mixed():
        m = mlp()
        from torch.distributed.fsdp import fully_shard
        fully_shard(m[0])  # m[2] and the root left plain
        OFMU(m.parameters(), **dict(COMMON, outer_hvp="none"))
    out["mixed"] = _message(mixed)

    def replaced_after():  # the sharded parameters swapped for new ones after OFMU was built
        m = shard(mlp(), "mlp")
        opt = OFMU(m.parameters(), **dict(COMMON, outer_hvp="none"))
        opt.step(Slices(m, "mlp", rank, world))
        m2 = shard(mlp(), "mlp")  # a new wrapped model, say after reloading
        opt.step(Slices(m2, "mlp", rank, world))
    out["replaced"] = _message(replaced_after)

    def dcp_state_dict_before_any_step():  # DCP's init would call step() without a closure
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        m = shard(mlp(), "mlp")
        get_optimizer_state_dict(m, OFMU(m.parameters(), **COMMON))
    out["dcp_before_step"] = _message(dcp_state_dict_before_any_step)

    def switched_after_steps():
        m = shard(mlp(), "mlp")
        opt = OFMU(m.parameters(), **COMMON)
        opt.step(Slices(m, "mlp", rank, world))
        m2 = shard(mlp(), "mlp")
        opt.param_groups[0]["params"] = list(m2.parameters())
        opt.step(Slices(m2, "mlp", rank, world))
    out["switched_late"] = _message(switched_after_steps)
    return out


CKPT = dict(similarity="project", outer_hvp="fd", preconditioner="adam", rho_growth=1.5,
            rho_max=5.0, max_grad_norm=1.0)
CKPT_STEPS = 2  # steps before the checkpoint, and after it


def ckpt_run(opt, closure, steps):
    return [float(opt.step(closure)) for _ in range(steps)]


def checkpoint(rank, world, ckpt_dir, save, optim=True):
    """``save``: run CKPT_STEPS steps, save model and optimizer through
    torch.distributed.checkpoint, run CKPT_STEPS more. Otherwise: a fresh model and optimizer
    (a restarted job) load the checkpoint (``optim=False``: the model only) and run the last
    CKPT_STEPS steps. Returns the full
    parameters, the losses and the rho schedule of the last steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    m = shard(mlp(), "mlp")
    opt = optimizer(m, CKPT)
    closure = Slices(m, "mlp", rank, world)
    if save:
        ckpt_run(opt, closure, CKPT_STEPS)
        dcp.save({"model": get_model_state_dict(m), "optim": get_optimizer_state_dict(m, opt)},
                 checkpoint_id=ckpt_dir)
    else:
        sd = {"model": get_model_state_dict(m), "optim": get_optimizer_state_dict(m, opt)}
        dcp.load(sd, checkpoint_id=ckpt_dir)
        set_model_state_dict(m, sd["model"])
        if optim:
            set_optimizer_state_dict(m, opt, sd["optim"])
        closure.i = steps_batches(opt) * CKPT_STEPS
    losses = ckpt_run(opt, closure, CKPT_STEPS)
    return full(m), losses, opt.param_groups[0]["rho_k"]


def steps_batches(opt):
    """Batches one step draws: a closure call per inner step, one per outer step (the fd probes
    reuse the outer step's batch)."""
    return opt.inner_steps + opt.outer_steps


def doc_example(rank, world, out_dir, port):
    """The torchrun example of docs/scaling.md, run as torchrun would (environment variables),
    in ``out_dir``; its retain-loss line goes to ``example.txt``."""
    import contextlib
    import io
    import re

    doc = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "scaling.md")
    code = re.findall(r"```python\n(.*?)```", open(doc).read(), re.S)[0]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.chdir(out_dir)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "docs/scaling.md", "exec"), {"__name__": "__main__"})
    with open(f"example{rank}.txt", "w") as f:
        f.write(printed.getvalue())


def worker(rank, world, out_dir, port, parts):
    if parts == ["example"]:
        return doc_example(rank, world, out_dir, port)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        if "configs" in parts:
            results["configs"] = {n: run(n, rank, world, sharded=True) for n in CONFIGS}
        ckpt_dir = os.path.join(os.path.dirname(out_dir), "ckpt")
        if "save" in parts:
            results["save"] = checkpoint(rank, world, ckpt_dir, save=True)
        if "load" in parts:
            results["load"] = checkpoint(rank, world, ckpt_dir, save=False)
        if "load_model_only" in parts:
            results["load_model_only"] = checkpoint(rank, world, ckpt_dir, save=False, optim=False)
        if "switched" in parts:
            results["switched"] = {n: run_switched(n, rank, world) for n in SWITCHED}
        if "grads" in parts:
            results["grads"] = grads_after(GRADS_CONFIG, rank, world, sharded=True)
        if "mp" in parts:
            results["mp"] = {n: run(n, rank, world, sharded=True, mp=True) for n in MP_CONFIGS}
        if "hsdp" in parts:
            results["hsdp"] = {n: run(n, rank, world, sharded=True, hsdp=True) for n in CONFIGS4}
        if "configs4" in parts:  # a short list for 4 ranks
            results["configs"] = {n: run(n, rank, world, sharded=True) for n in CONFIGS4}
        if "measure" in parts:
            results["measure"] = measure(rank, world)
            if rank == 0:
                import json
                print(json.dumps({"world": world, **results["measure"]}, indent=1))
        if "misuse" in parts:
            results["misuse"] = misuse(rank, world)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- measurements
# ``python tests/_fsdp2_worker.py OUT WORLD measure``: the collectives of one step (ops and
# bytes, counted by wrapping torch.distributed's entry points) and the per-rank memory of the
# optimizer state, for OFMU under FSDP2, OFMU replicated, and GradDiff + AdamW under FSDP2.
# docs/scaling.md reports them.

_COLLECTIVES = {"all_gather_single": 0, "reduce_scatter_single": 1, "all_reduce": 0,
                "all_gather_into_tensor": 0, "reduce_scatter_tensor": 1}  # name: sized argument


class CommLog:
    """Counts calls and payload bytes of torch.distributed collectives while active."""

    def __init__(self):
        self.ops, self.saved = [], {}

    def __enter__(self):
        for name, arg in _COLLECTIVES.items():
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self.saved[name] = fn

            def wrapped(*a, _fn=fn, _name=name, _arg=arg, **k):
                t = a[_arg] if len(a) > _arg else k.get("tensor", k.get("input"))
                self.ops.append((_name, t.numel() * t.element_size()))
                return _fn(*a, **k)
            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)

    def summary(self):
        out = {}
        for name, nbytes in self.ops:
            key = "scalar all_reduce" if name == "all_reduce" and nbytes <= 256 else name
            c, b = out.get(key, (0, 0))
            out[key] = (c + 1, b + nbytes)
        return out


class LM(torch.nn.Module):
    """The transformer of the measurements: 2 pre-norm layers, width 128, vocabulary 512."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(512, 128)
        self.layers = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(128, 4, 512, dropout=0.0, batch_first=True,
                                             norm_first=True) for _ in range(2))
        self.head = torch.nn.Linear(128, 512)

    def forward(self, x):
        h = self.emb(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def lm_closure(m, rank, world, counter):
    def closure(same_batch=False):
        if not same_batch:
            counter[0] += 1
        g = torch.Generator().manual_seed(counter[0])
        x = torch.randint(0, 512, (2, 8, 16), generator=g)
        n = 8 // world
        sl = slice(rank * n, (rank + 1) * n)
        ce = torch.nn.functional.cross_entropy
        return tuple(ce(m(x[k, sl]).flatten(0, 1), x[k, sl].roll(-1, 1).flatten()) for k in (0, 1))
    return closure


MEASURED = {
    "ofmu-first-order": dict(similarity="project", outer_hvp="none", preconditioner="adam",
                             inner_steps=1, outer_steps=1, lr=1e-3, weight_decay=0.0),
    "ofmu-fd": dict(similarity="project", outer_hvp="fd", rho=0.1, preconditioner="adam",
                    inner_steps=1, outer_steps=1, lr=1e-3, weight_decay=0.0),
}


def _lm_shard(m):
    from torch.distributed.fsdp import fully_shard

    for layer in m.layers:
        fully_shard(layer)
    fully_shard(m)
    return m


def _state_bytes(opt):
    if isinstance(opt, OFMU):
        return sum(flat.numel() * flat.element_size() for buf in opt.flat_buffers
                   for flat, _ in buf._slots.values())
    return sum(v.to_local().numel() * v.element_size() if hasattr(v, "to_local") else
               v.numel() * v.element_size() for st in opt.state.values() for v in st.values())


def _local_bytes(m):
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
               for p in m.parameters())


def measure_one(kind, name, rank, world):
    counter = [0]
    m = LM()
    if kind != "replicated":
        _lm_shard(m)
    closure = lm_closure(m, rank, world, counter)
    if name == "graddiff-adamw":
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)

        def step():
            lf, lr = closure()
            (lr - lf).backward()
            opt.step()
            opt.zero_grad()
    else:
        opt = OFMU(m.parameters(), **MEASURED[name])

        def step():
            opt.step(closure)
    step()  # warm up: lazy state, FSDP2's lazy init
    before = counter[0]
    with CommLog() as log:
        step()
    return dict(comm=log.summary(), state_bytes=_state_bytes(opt), param_bytes=_local_bytes(m),
                closures=counter[0] - before)


def measure(rank, world):
    out = {}
    for name in MEASURED:
        out[f"fsdp2/{name}"] = measure_one("fsdp2", name, rank, world)
        out[f"replicated/{name}"] = measure_one("replicated", name, rank, world)
    out["fsdp2/graddiff-adamw"] = measure_one("fsdp2", "graddiff-adamw", rank, world)
    return out


def free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    # Imported once here and inherited by the forked ranks: torch._dynamo alone (pulled in by
    # fully_shard's first DTensor) costs about 5 s per process on a 2-core machine.
    import torch._dynamo  # noqa: F401
    import torch.distributed.checkpoint.state_dict  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401

    # OUT WORLD PARTS [WORLD PARTS ...]: one job (new processes, a new process group) per pair,
    # one after the other; job i writes OUT/job{i}/rank{r}.pt, all share OUT/ckpt.
    out, stages = sys.argv[1], sys.argv[2:]
    for i in range(0, len(stages), 2):
        job_dir = os.path.join(out, f"job{i // 2}")
        os.makedirs(job_dir, exist_ok=True)
        world, parts = int(stages[i]), stages[i + 1].split(",")
        mp.start_processes(worker, args=(world, job_dir, free_port(), parts), nprocs=world,
                           start_method="fork")

"""Worker for tests/test_distributed.py: OFMU on 2 gloo ranks, each on half of every batch.

Run as ``python _dist_worker.py OUT_DIR PORT``; rank 0 saves the parameters of every config.
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ofmu import OFMU

CONFIGS = {
    "project-forget-sgd": dict(similarity="project", outer_hvp="forget"),
    "hvp-forget-adam": dict(similarity="hvp", outer_hvp="forget", preconditioner="adam"),
    "project-fd-sgd": dict(similarity="project", outer_hvp="fd"),
    "none-none-sgd": dict(similarity="none", outer_hvp="none"),
}
COMMON = dict(lr=0.05, inner_lr=0.02, inner_steps=2, beta=0.6, rho=0.2, weight_decay=1e-3)


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 9), torch.nn.Tanh(),
                               torch.nn.Linear(9, 3)).double()


class Halves:
    """Batch i, split across ranks; ``same_batch=True`` reuses the last one (fd mode)."""

    def __init__(self, m, rank, world):
        self.m, self.i, self.rank, self.world = m, 0, rank, world

    def __call__(self, same_batch=False):
        if not same_batch:
            self.i += 1
        g = torch.Generator().manual_seed(self.i)
        x = torch.randn(2, 8, 4, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (2, 8), generator=g)
        n = 8 // self.world
        sl = slice(self.rank * n, (self.rank + 1) * n)
        ce = torch.nn.functional.cross_entropy
        return ce(self.m(x[0, sl]), y[0, sl]), ce(self.m(x[1, sl]), y[1, sl])


def run_configs(rank, world):
    out = {}
    for name, cfg in CONFIGS.items():
        m = model()
        opt = OFMU(m.parameters(), **COMMON, **cfg)
        closure = Halves(m, rank, world)
        for _ in range(3):
            opt.step(closure)
        out[name] = torch.cat([p.detach().flatten() for p in m.parameters()])
    return out


def worker(rank, world, out_dir, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = run_configs(rank, world)
        try:
            OFMU(model().parameters(), outer_hvp="exact")
            results["exact_error"] = ""
        except ValueError as e:
            results["exact_error"] = str(e)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(2, sys.argv[1], int(sys.argv[2])), nprocs=2)

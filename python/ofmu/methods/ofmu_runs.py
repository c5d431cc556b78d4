"""OFMU through :class:`ofmu.OFMU`, its ablations, and an Adam-preconditioned prototype.

``outer_steps`` > 1 runs several outer (retain) steps after each inner block through the
optimizer's public ``inner_step`` / ``outer_step``. ``OFMU-Adam`` is a prototype kept here, not
in the optimizer: the same ``project`` directions, each loop preconditioned by its own Adam
moments (FIELD_NOTES.md pilot), with rho = 0.
"""

from __future__ import annotations

import torch
from torch.nn.functional import cross_entropy

from ..optimizer import OFMU
from .base import Method, register
from .baselines import _grid


def _closure(model, streams):
    def closure():
        xf, yf = streams.forget.next()
        xr, yr = streams.retain.next()
        return cross_entropy(model(xf), yf), cross_entropy(model(xr), yr)
    return closure


_OPT_KEYS = ("lr", "inner_lr", "inner_steps", "beta", "rho", "rho_growth", "rho_max",
             "similarity", "outer_hvp", "weight_decay", "max_grad_norm")


def ofmu_run(model, data, hp, streams, steps):
    opt = OFMU(model.parameters(), **{k: hp[k] for k in _OPT_KEYS if k in hp})
    closure = _closure(model, streams)
    for _ in range(steps):
        for _ in range(hp["inner_steps"]):
            opt.inner_step(closure)
        for _ in range(hp.get("outer_steps", 1)):
            opt.outer_step(closure)


def ofmu_cost(hp: dict) -> int:
    hvp = hp.get("similarity", "project") == "hvp"
    inner = 3 if hvp else 2  # two backward passes (+ one double backward for hvp)
    outer = 2
    if hp.get("rho", 0.0) > 0 and hp.get("outer_hvp", "forget") != "none":
        outer += {"forget": 1, "exact": 2, "fd": 4}[hp.get("outer_hvp", "forget")]
        outer += 1 if hvp else 0
    return hp["inner_steps"] * inner + hp.get("outer_steps", 1) * outer


def ofmu_adam_run(model, data, hp, streams, steps):
    """Prototype: project-mode OFMU directions through two Adam states (inner / outer)."""
    params = [p for p in model.parameters() if p.requires_grad]
    inner = torch.optim.Adam(params, lr=hp["inner_lr"])
    outer = torch.optim.Adam(params, lr=hp["lr"])
    closure = _closure(model, streams)
    beta = hp["beta"]
    for _ in range(steps):
        for _ in range(hp["inner_steps"]):
            lf, lr_ = closure()
            gf = torch.autograd.grad(lf, params)
            gr = torch.autograd.grad(lr_, params)
            d = sum((a * b).sum() for a, b in zip(gf, gr))
            nr2 = sum((b * b).sum() for b in gr)
            c = beta * d / (nr2 + 1e-12 * (nr2 + 1.0))
            for p, a, b in zip(params, gf, gr):
                p.grad = -(a - c * b)  # Adam descends: negate the ascent direction u
            inner.step()
        for _ in range(hp["outer_steps"]):
            _, lr_ = closure()
            for p, b in zip(params, torch.autograd.grad(lr_, params)):
                p.grad = b
            outer.step()
    for p in params:
        p.grad = None


_OFMU_BASE = {"similarity": "project", "outer_hvp": "forget", "rho": 0.01, "rho_growth": 1.0,
              "rho_max": 1.0, "beta": 0.9, "inner_steps": 1, "outer_steps": 2}
_OFMU_GRID = _grid(lr=(0.2, 0.3), inner_lr=(0.1, 0.2, 0.3))

register(Method("OFMU", "OFMU (project)", ofmu_run, ofmu_cost, grid=_OFMU_GRID,
                defaults=dict(_OFMU_BASE), doc="ofmu.OFMU, similarity='project'"))
register(Method("OFMU-hvp", "OFMU (hvp)", ofmu_run, ofmu_cost, grid=_OFMU_GRID,
                defaults={**_OFMU_BASE, "similarity": "hvp", "beta": 0.5},
                doc="ofmu.OFMU, similarity='hvp' (second order)"))
register(Method("OFMU-beta0", "OFMU, beta=0", ofmu_run, ofmu_cost, grid=_OFMU_GRID,
                defaults={**_OFMU_BASE, "beta": 0.0}, doc="ablation: no similarity penalty"))
register(Method("OFMU-rho0", "OFMU, rho=0", ofmu_run, ofmu_cost, grid=_OFMU_GRID,
                defaults={**_OFMU_BASE, "rho": 0.0}, doc="ablation: no stationarity penalty"))
register(Method("OFMU-Adam", "OFMU-Adam (prototype)", ofmu_adam_run,
                cost=lambda hp: 2 * hp["inner_steps"] + hp["outer_steps"],
                defaults={"beta": 0.9, "inner_steps": 1, "outer_steps": 2},
                grid=_grid(lr=(1e-3, 3e-3), inner_lr=(3e-4, 1e-3, 2e-3)),
                doc="prototype: project directions, separate Adam moments per loop, rho=0"))

"""Baselines under the OFMU protocol: FT, GA, GradDiff, NPO and the first-order projection.

All use plain SGD steps (no momentum), like the ``OFMU`` optimizer, so that differences come
from the update directions and not from the preconditioner.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.functional import cross_entropy, logsigmoid

from .base import Method, register


def _sgd_loop(model: nn.Module, steps: int, lr: float, loss_fn) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()


def fine_tune(model, data, hp, streams, steps):
    """FT: keep training on the retain set only (forgetting by catastrophic drift)."""
    def loss():
        x, y = streams.retain.next()
        return cross_entropy(model(x), y)
    _sgd_loop(model, steps, hp["lr"], loss)


def gradient_ascent(model, data, hp, streams, steps):
    """GA: ascend the forget loss."""
    def loss():
        x, y = streams.forget.next()
        return -cross_entropy(model(x), y)
    _sgd_loop(model, steps, hp["lr"], loss)


def grad_diff(model, data, hp, streams, steps):
    """GradDiff: weighted-sum scalarisation, minimise ``-L_f + alpha * L_r``."""
    def loss():
        xf, yf = streams.forget.next()
        xr, yr = streams.retain.next()
        return -cross_entropy(model(xf), yf) + hp["alpha"] * cross_entropy(model(xr), yr)
    _sgd_loop(model, steps, hp["lr"], loss)


def npo(model, data, hp, streams, steps):
    """NPO (Zhang et al. 2024) with the original model as reference, plus ``alpha * L_r``.

    ``L_NPO = (2/b) E_f[log(1 + (p_theta(y|x) / p_ref(y|x))^b)]`` = ``-(2/b) E log sigmoid(-b*delta)``
    with ``delta = log p_theta - log p_ref``: a bounded, self-slowing form of gradient ascent.
    """
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    b = hp["npo_beta"]

    def loss():
        xf, yf = streams.forget.next()
        xr, yr = streams.retain.next()
        logp = torch.log_softmax(model(xf), 1).gather(1, yf[:, None]).squeeze(1)
        with torch.no_grad():
            logp_ref = torch.log_softmax(ref(xf), 1).gather(1, yf[:, None]).squeeze(1)
        l_npo = -(2.0 / b) * logsigmoid(-b * (logp - logp_ref)).mean()
        return l_npo + hp["alpha"] * cross_entropy(model(xr), yr)
    _sgd_loop(model, steps, hp["lr"], loss)


def projection(model, data, hp, streams, steps):
    """First-order projection baseline: descend ``g_r - (<g_r, g_f>/|g_f|^2) g_f``.

    The retain gradient with its forget component removed: utility is trained without
    re-learning the forget set (one flat dot product per step, like the fused kernels).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(steps):
        xf, yf = streams.forget.next()
        xr, yr = streams.retain.next()
        gf = torch.autograd.grad(cross_entropy(model(xf), yf), params)
        gr = torch.autograd.grad(cross_entropy(model(xr), yr), params)
        dot = sum((a * b).sum() for a, b in zip(gr, gf))
        nf2 = sum((a * a).sum() for a in gf)
        coef = dot / (nf2 + 1e-12 * (nf2 + 1.0))
        with torch.no_grad():
            for p, a, b in zip(params, gr, gf):
                p.sub_(hp["lr"] * (a - coef * b))


def _grid(**axes) -> tuple[dict, ...]:
    """Cartesian product of the named axes, as a tuple of dicts (first axis varies slowest)."""
    out = [{}]
    for k, values in axes.items():
        out = [{**d, k: v} for d in out for v in values]
    return tuple(out)


register(Method("FT", "FT", fine_tune, cost=lambda hp: 1,
                grid=_grid(lr=(0.2, 0.3, 0.4, 0.5, 0.6, 0.7)),
                doc="fine-tune on the retain set"))
register(Method("GA", "GA", gradient_ascent, cost=lambda hp: 1,
                grid=_grid(lr=(1e-4, 2e-4, 4e-4, 6e-4, 8e-4, 1e-3)),
                doc="gradient ascent on the forget set"))
register(Method("GradDiff", "GradDiff", grad_diff, cost=lambda hp: 2,
                grid=_grid(lr=(0.05, 0.1, 0.15), alpha=(4.0, 8.0)),
                doc="minimise -L_f + alpha L_r"))
register(Method("NPO", "NPO", npo, cost=lambda hp: 2, defaults={"npo_beta": 0.1},
                grid=_grid(lr=(0.05, 0.1, 0.15), alpha=(4.0, 8.0)),
                doc="negative preference optimisation (reference = original) + alpha L_r"))
register(Method("Proj", "Projection (1st order)", projection, cost=lambda hp: 2,
                grid=_grid(lr=(0.1, 0.15, 0.2, 0.25, 0.3, 0.4)),
                doc="retain descent with the forget-gradient component removed"))

"""Coefficient math on the three reduced scalars ``stats = [<x, y>, |x|^2, |y|^2]``.

Tiny device-tensor ops (no ``.item()``, no host sync) shared by every backend, so each formula
exists once. The update's coefficients (projection, clipping, cap, skip flags) are not here: the
backends' ``finalize`` op computes them in one op (``ofmu.reference.finalize`` is its torch
form; docs/kernels.md). The kernels take their coefficients packed in small device tensors; the packers
below name every slot, so no caller builds a 4-vector by hand.

Epsilons (NOTE: [Relative epsilon]): every division adds ``eps`` times *its own* denominator,
plus the dtype's smallest normal so that ``0/0`` gives 0 (zero gradients give a zero step).
The projection coefficient ``<g_f, g_r> / (|g_r|^2 (1 + eps) + tiny)`` therefore does not
depend on ``|g_f|``: scaling either loss by any positive constant leaves ``u / |u|`` unchanged
(a shared epsilon like ``eps * (|g_f|^2 + |g_r|^2)`` would make the projection vanish when the
ascended forget gradient grows much larger than the retain gradient).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _safe(den: Tensor, eps: float) -> Tensor:
    """``den * (1 + eps) + tiny`` (see NOTE: [Relative epsilon])."""
    return den * (1.0 + eps) + torch.finfo(den.dtype).tiny


def similarity_scalars(stats: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Cosine ``c = <g_f, g_r> / |g_f||g_r|`` and projection ``k = <g_f, g_r> / |g_r|^2``."""
    d, nf2, nr2 = stats.unbind()
    return d / _safe(torch.sqrt(nf2 * nr2), eps), d / _safe(nr2, eps)


def pack_combine(ax, ay, bx=None, by=None) -> Tensor:
    """``combine`` coefficients: ``out_a = ax*x + ay*y`` and ``out_b = bx*x + by*y``."""
    zero = torch.zeros_like(ax)
    return torch.stack([ax, ay, zero if bx is None else bx, zero if by is None else by])


def pack_update(decay: Tensor, cx: Tensor, cy: Tensor, ok: Tensor) -> Tensor:
    """``update`` coefficients: ``theta = decay*theta + cx*x + cy*y``, skipped unless ``ok``."""
    return torch.stack([decay, cx, cy, ok.to(cx.dtype)])


def seed_coeffs(stats: Tensor, eps: float) -> Tensor:
    """``combine`` coefficients of the double-backward seeds of ``grad cos``.

    ``a = g_r/(nf nr) - c g_f/nf^2`` and ``b = g_f/(nf nr) - c g_r/nr^2`` so that
    ``grad_theta c = H_f a + H_r b``.
    """
    d, nf2, nr2 = stats.unbind()
    inv = 1.0 / _safe(torch.sqrt(nf2 * nr2), eps)
    c = d * inv
    return pack_combine(-c / _safe(nf2, eps), inv, inv, -c / _safe(nr2, eps))


def direction_sqnorm(coef: Tensor, stats: Tensor) -> Tensor:
    """``|alpha*x + gamma*y|^2`` from ``stats = reduce3(x, y)`` (no extra pass)."""
    a, g = coef[0], coef[1]
    return a * a * stats[1] + 2.0 * a * g * stats[0] + g * g * stats[2]

"""The torch reference implementation of the kernel contract: ``reduce3``, ``combine``, ``update``
and ``finalize``.

The contract (arguments, dtypes, aliasing, the skip flag, determinism) is stated once, in
``docs/design.md`` ("Kernel contract"); the C++, CUDA and Triton kernels implement the same
four ops and are tested against these functions, and these against float64 closed forms.
Readable first; speed is the fused backends' job.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["acc_dtype", "reduce3", "combine", "update", "finalize", "FINALIZE_LEN"]

# finalize's output layout (csrc/finalize.h): [0:4] update coefficients (decay, lr*scale*alpha,
# lr*scale*gamma, proceed), [4:8] combine coefficients (alpha, gamma, 0, 0), [8] clip scale,
# [9] skipped (an input was non-finite), [10] capped (finite, forget loss at or above the cap).
FINALIZE_LEN = 11


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of a buffer: float64 stays float64, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduce3(x: Tensor, y: Tensor | None) -> Tensor:
    """``[<x, y>, |x|^2, |y|^2]`` accumulated in :func:`acc_dtype`."""
    acc = acc_dtype(x.dtype)
    xa = x.to(acc)
    if y is None:
        z = torch.zeros((), dtype=acc, device=x.device)
        return torch.stack([z, torch.dot(xa, xa), z])
    ya = y.to(acc)
    return torch.stack([torch.dot(xa, ya), torch.dot(xa, xa), torch.dot(ya, ya)])


def combine(
    x: Tensor, y: Tensor | None, coeffs: Tensor, out_a: Tensor, out_b: Tensor | None = None
) -> None:
    """``out_a = c0*x + c1*y``; ``out_b = c2*x + c3*y`` (both computed before either is written)."""
    acc = coeffs.dtype
    xa = x.to(acc)
    ya = y.to(acc) if y is not None else torch.zeros_like(xa)
    a = coeffs[0] * xa + coeffs[1] * ya
    b = coeffs[2] * xa + coeffs[3] * ya if out_b is not None else None
    out_a.copy_(a)
    if out_b is not None:
        out_b.copy_(b)


def update(theta: Tensor, x: Tensor, y: Tensor | None, coeffs: Tensor) -> None:
    """``theta = c0*theta + c1*x + c2*y`` unless ``c3 == 0`` (then ``theta`` is left untouched)."""
    acc = coeffs.dtype
    new = coeffs[0] * theta.to(acc) + coeffs[1] * x.to(acc)
    if y is not None:
        new = new + coeffs[2] * y.to(acc)
    # torch.where keeps the skip on the device: no `if` on a device value (no host sync).
    theta.copy_(torch.where(coeffs[3] != 0, new, theta.to(acc)))


def finalize(gstats: Tensor, ustats: Tensor, checks: Tensor, ok: Tensor | None, project: bool,
             gamma: float, eps: float, lr: float, weight_decay: float, max_norm: float | None,
             cap: float | None) -> Tensor:
    """The packed coefficients of a step from its summed statistics (layout: ``FINALIZE_LEN``).

    ``u = alpha*x + gamma'*y`` with ``alpha = 1`` and ``gamma' = gamma * <x, y> / (|y|^2 (1 + eps)
    + tiny)`` (``gstats = [<x, y>, |x|^2, |y|^2]``) when ``project``, else ``gamma' = gamma``;
    ``scale = min(1, max_norm / (|u| + 1e-6))`` with ``|u|^2`` from ``ustats`` (1 without
    ``max_norm``); ``theta = (1 - |lr| wd) theta + lr*scale*u`` unless skipped: ``proceed`` is 0
    when anything in ``gstats``, ``ustats``, ``checks`` is non-finite or ``ok`` is False (skipped), or
    when ``checks[0] >= cap`` (capped)."""
    fin = torch.isfinite(torch.cat([gstats, ustats, checks])).all()
    if ok is not None:
        fin = fin & ok.reshape(())
    alpha = torch.ones((), dtype=gstats.dtype, device=gstats.device)
    if project:
        gam = gamma * (gstats[0] / (gstats[2] * (1.0 + eps) + torch.finfo(gstats.dtype).tiny))
    else:
        gam = torch.full_like(alpha, gamma)
    if max_norm is not None:
        sq = alpha * alpha * ustats[1] + 2.0 * alpha * gam * ustats[0] + gam * gam * ustats[2]
        scale = torch.clamp(max_norm / (torch.sqrt(sq) + 1e-6), max=1.0)
        step = lr * scale
    else:
        scale, step = alpha, torch.full_like(alpha, lr)
    below = checks[0] < cap if cap is not None else torch.ones_like(fin)
    proceed = fin & below
    zero = torch.zeros_like(alpha)
    return torch.stack([torch.full_like(alpha, 1.0 - abs(lr) * weight_decay), alpha * step,
                        gam * step, proceed.to(alpha.dtype), alpha, gam, zero, zero, scale,
                        (~fin).to(alpha.dtype), (fin & ~below).to(alpha.dtype)])

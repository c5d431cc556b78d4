"""The OFMU step math on flat buffers, backend-agnostic.

Two layers live here:

* **Coefficient math** on the three reduced scalars ``stats = [<x, y>, |x|^2, |y|^2]``.
  These are tiny device-tensor ops (no ``.item()``, no host sync) shared by every backend,
  so the formulas exist exactly once.
* **The torch reference kernels** ``reduce3`` / ``combine`` / ``update``: the plain-PyTorch
  implementation of the kernel contract (ARCHITECTURE.md "Kernel contract"). Every fused
  backend (C++, CUDA, Triton) is tested against these, and these against float64 closed forms.

Kernel contract (all backends implement the same three ops, same argument order):

``reduce3(x, y) -> stats``
    ``stats = [<x, y>, <x, x>, <y, y>]``: a 3-element tensor on ``x.device``, float64 for
    float64 buffers and float32 otherwise (bf16/fp16 accumulate in fp32). ``y`` may be ``None``
    (then ``stats[0] = stats[2] = 0``). Deterministic.

``combine(x, y, coeffs, out_a, out_b=None)``
    Elementwise, reading each element of ``x`` and ``y`` once:
    ``out_a = coeffs[0]*x + coeffs[1]*y`` and, if given, ``out_b = coeffs[2]*x + coeffs[3]*y``.
    ``out_a`` / ``out_b`` may alias ``x`` or ``y``. ``coeffs`` is a 4-element device tensor in the
    stats dtype.

``update(theta, x, y, coeffs)``
    In place: ``theta = coeffs[0]*theta + coeffs[1]*x + coeffs[2]*y``, computed in the stats
    dtype and rounded once to ``theta.dtype``; skipped entirely (``theta`` untouched, not even
    rewritten) when ``coeffs[3] == 0`` (the non-finite flag). ``y`` may be ``None``.

All buffers are 1-D, contiguous, of one dtype and one device; coefficients never leave the
device.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "acc_dtype",
    "reduce3",
    "combine",
    "update",
    "similarity_scalars",
    "seed_coeffs",
    "direction_coeffs",
    "direction_sqnorm",
    "clip_scale",
    "update_coeffs",
]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of a buffer: float64 stays float64, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# Reference kernels (torch). Readable first; speed is the fused backends' job.
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Coefficient math on reduced scalars (shared by all backends; device tensors only).
# --------------------------------------------------------------------------------------------


def _denominators(stats: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(nf*nr + e, nf^2 + e, nr^2 + e, e)`` with ``e = eps*(nf^2 + nr^2) + tiny``.

    The epsilon is relative to the norms' scale so that rescaling the loss does not change the
    direction, and ``tiny`` keeps ``0/0`` finite (zero gradients give a zero direction).
    """
    _, nf2, nr2 = stats.unbind()
    e = eps * (nf2 + nr2) + torch.finfo(stats.dtype).tiny
    return torch.sqrt(nf2 * nr2) + e, nf2 + e, nr2 + e, e


def similarity_scalars(stats: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Cosine ``c = <g_f, g_r> / (|g_f| |g_r| + e)`` and projection ``k = <g_f, g_r> / (|g_r|^2 + e)``."""
    nfnr, _, nr2e, _ = _denominators(stats, eps)
    d = stats[0]
    return d / nfnr, d / nr2e


def seed_coeffs(stats: Tensor, eps: float) -> Tensor:
    """Coefficients of the double-backward seeds of ``grad cos`` (``similarity="hvp"``).

    ``a = g_r/(nf nr) - c g_f/nf^2`` and ``b = g_f/(nf nr) - c g_r/nr^2`` so that
    ``grad_theta c = H_f a + H_r b``; returned as ``combine`` coefficients on ``(g_f, g_r)``.
    """
    nfnr, nf2e, nr2e, _ = _denominators(stats, eps)
    c = stats[0] / nfnr
    inv = 1.0 / nfnr
    return torch.stack([-c / nf2e, inv, inv, -c / nr2e])


def direction_coeffs(mode: str, stats: Tensor, beta: float, eps: float) -> Tensor:
    """``(alpha, gamma)`` with ``u = alpha*g_f + gamma*y`` for the ascent direction.

    ``y`` is ``g_r`` for ``project`` and ``none`` and ``grad c`` (the HVP buffer) for ``hvp``.
    """
    one = torch.ones((), dtype=stats.dtype, device=stats.device)
    if mode == "project":
        _, k = similarity_scalars(stats, eps)
        return torch.stack([one, -beta * k])
    if mode == "hvp":
        return torch.stack([one, -beta * one])
    return torch.stack([one, 0.0 * one])


def direction_sqnorm(coef: Tensor, stats: Tensor) -> Tensor:
    """``|alpha*x + gamma*y|^2`` from ``stats = reduce3(x, y)`` (no extra pass)."""
    a, g = coef[0], coef[1]
    return a * a * stats[1] + 2.0 * a * g * stats[0] + g * g * stats[2]


def clip_scale(sqnorm: Tensor, max_norm: float) -> Tensor:
    """``min(1, max_norm / |u|)``. Multiplies, never branches on a device value."""
    return torch.clamp(max_norm / (torch.sqrt(sqnorm) + 1e-6), max=1.0)


def update_coeffs(lr: float, weight_decay: float, coef: Tensor, scale: Tensor | None,
                  ok: Tensor) -> Tensor:
    """Coefficients for ``update``: ``theta = (1 - lr*wd)*theta + lr*scale*(alpha*x + gamma*y)``
    (``scale=None``: no clipping).

    ``lr`` is signed: positive for the inner ascent, negative for the outer descent (then
    ``weight_decay`` enters as ``1 - |lr|*wd`` either way, always shrinking ``theta``).
    """
    step = coef * lr if scale is None else coef * (lr * scale)
    decay = torch.full_like(step[:1], 1.0 - abs(lr) * weight_decay)
    return torch.cat([decay, step, ok.to(step.dtype).reshape(1)])


def adam_apply(theta: Tensor, direction: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
               step: Tensor, *, lr: float, betas: tuple[float, float], eps: float,
               weight_decay: float, ascend: bool, scale: Tensor | None, ok: Tensor) -> None:
    """Adam-preconditioned application of a direction (``preconditioner="adam"``).

    Runs torch's fused Adam on the flat buffers: ``direction * scale`` (``scale=None``: 1) is
    the gradient (``ascend`` flips the sign for the inner loop), and a false ``ok`` skips the
    whole update, moments and step count included (torch's ``found_inf`` contract: no host
    sync).
    """
    found_inf = (~ok).to(torch.float32)
    step.add_(1.0)
    torch._fused_adam_([theta], [direction], [exp_avg], [exp_avg_sq], [], [step], lr=lr,
                       beta1=betas[0], beta2=betas[1], weight_decay=weight_decay, eps=eps,
                       amsgrad=False, maximize=ascend,
                       grad_scale=None if scale is None else (1.0 / scale).to(torch.float32),
                       found_inf=found_inf)
    step.sub_(found_inf.to(step.dtype))

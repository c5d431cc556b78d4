"""The preconditioned updates of a flat buffer along a direction: Adam (torch's fused kernel,
``preconditioner="adam"``) and stateless Adam (``"sign"``).

Every backend record (:class:`ofmu.backends.Backend`) carries these two unless it brings its
own kernels with the same signature: ``(theta, direction, [exp_avg, exp_avg_sq, step,]
*, lr, [betas,] eps, weight_decay, ascend, scale, ok)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import acc_dtype

__all__ = ["adam_apply", "sign_apply"]


def sign_apply(theta: Tensor, direction: Tensor, *, lr: float, eps: float, weight_decay: float,
               ascend: bool, scale: Tensor | None, ok: Tensor) -> None:
    """Stateless Adam (betas = (0, 0): m = g, v = g^2, no bias correction): with
    ``g = -+direction*scale + weight_decay*theta`` (Adam's L2 term; minus for the ascent),
    ``theta -= lr * g / (|g| + eps)``; a zero step unless ``ok``. No moment buffers; two
    transient buffers of the accumulation dtype (the step and its denominator)."""
    acc = acc_dtype(theta.dtype)
    g = direction.to(acc, copy=True)
    g.mul_(-1.0 if ascend else 1.0)
    if scale is not None:
        g.mul_(scale.to(acc))
    if weight_decay:
        g.add_(theta.to(acc), alpha=weight_decay)
    denom = g.abs().add_(eps)
    g.div_(denom).mul_(-lr).masked_fill_(~ok, 0.0)  # where, not a product: g may be NaN
    del denom
    if theta.dtype == acc:
        theta.add_(g)
    else:
        theta.copy_(theta.to(acc).add_(g))


def adam_apply(theta: Tensor, direction: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
               step: Tensor, *, lr: float, betas: tuple[float, float], eps: float,
               weight_decay: float, ascend: bool, scale: Tensor | None, ok: Tensor) -> None:
    """Adam-preconditioned application of a direction (``preconditioner="adam"``).

    Torch's fused Adam on the flat buffers: ``direction * scale`` (``scale=None``: 1) is the
    gradient (``ascend`` flips its sign for the inner loop), and a false ``ok`` skips the whole
    update, moments and step count included (torch's ``found_inf`` contract: no host sync)."""
    found_inf = (~ok).to(torch.float32)
    step.add_(1.0)
    torch._fused_adam_([theta], [direction], [exp_avg], [exp_avg_sq], [], [step], lr=lr,
                       beta1=betas[0], beta2=betas[1], weight_decay=weight_decay, eps=eps,
                       amsgrad=False, maximize=ascend,
                       grad_scale=None if scale is None else (1.0 / scale).to(torch.float32),
                       found_inf=found_inf)
    step.sub_(found_inf.to(step.dtype))

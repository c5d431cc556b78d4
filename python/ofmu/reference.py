"""The torch reference implementation of the kernel contract: ``reduce3``, ``combine``, ``update``.

The contract (arguments, dtypes, aliasing, the skip flag, determinism) is stated once, in
``docs/design.md`` ("Kernel contract"); the C++, CUDA and Triton kernels implement the same
three ops and are tested against these functions, and these against float64 closed forms.
Readable first; speed is the fused backends' job.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["acc_dtype", "reduce3", "combine", "update"]


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

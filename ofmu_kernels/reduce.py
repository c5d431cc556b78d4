"""``reduce3``: the three dot products of the step in one read of ``x`` and ``y``.

Two stages, no atomics, so the summation order is fixed by the launch geometry alone and a
result is bitwise reproducible: each program writes its three partial sums to a small buffer,
then one program adds the partials in a fixed tree. A single-program launch writes the result
directly and skips the second stage.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import launch
from .checks import check_buffer, check_device


@triton.jit
def _accumulate(x_ptr, y_ptr, offs, n, acc_xy, acc_xx, acc_yy, HAS_Y: tl.constexpr):
    """Add one block's ``x*y, x*x, y*y`` to the per-lane accumulators (acc dtype)."""
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_xx.dtype)
    acc_xx += x * x
    if HAS_Y:
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(acc_xx.dtype)
        acc_xy += x * y
        acc_yy += y * y
    return acc_xy, acc_xx, acc_yy


@triton.jit
def _reduce3_partials_kernel(x_ptr, y_ptr, part_ptr, n, num_programs, iters,
                             BLOCK: tl.constexpr, HAS_Y: tl.constexpr, LOOP: tl.constexpr):
    """Program p: ``part[k*P + p] = sum_{i in blocks(p)} (x_i*y_i, x_i^2, y_i^2)[k]``.

    ``blocks(p) = p, p + P, ...`` (``iters`` of them when ``LOOP``, else just ``p``); the
    accumulation dtype is the dtype of ``part`` (fp32, or fp64 for fp64 buffers).
    """
    pid = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    acc_xy = tl.zeros([BLOCK], dtype=part_ptr.dtype.element_ty)
    acc_xx = tl.zeros([BLOCK], dtype=part_ptr.dtype.element_ty)
    acc_yy = tl.zeros([BLOCK], dtype=part_ptr.dtype.element_ty)
    if LOOP:
        for i in range(0, iters):
            offs = (pid + i * num_programs) * BLOCK + lanes
            acc_xy, acc_xx, acc_yy = _accumulate(x_ptr, y_ptr, offs, n,
                                                 acc_xy, acc_xx, acc_yy, HAS_Y)
    else:
        offs = pid * BLOCK + lanes
        acc_xy, acc_xx, acc_yy = _accumulate(x_ptr, y_ptr, offs, n,
                                             acc_xy, acc_xx, acc_yy, HAS_Y)
    tl.store(part_ptr + pid, tl.sum(acc_xy, axis=0))
    tl.store(part_ptr + num_programs + pid, tl.sum(acc_xx, axis=0))
    tl.store(part_ptr + 2 * num_programs + pid, tl.sum(acc_yy, axis=0))


@triton.jit
def _reduce3_finalize_kernel(part_ptr, out_ptr, num_partials, BLOCK_P: tl.constexpr):
    """``out[k] = sum_p part[k*P + p]`` for ``k = 0, 1, 2`` (one program, fixed tree order)."""
    idx = tl.arange(0, BLOCK_P)
    mask = idx < num_partials
    for k in tl.static_range(3):
        v = tl.load(part_ptr + k * num_partials + idx, mask=mask, other=0.0)
        tl.store(out_ptr + k, tl.sum(v, axis=0))


_INTERPRETED = launch.is_interpreted(_reduce3_partials_kernel)


def reduce3(x: Tensor, y: Tensor | None) -> Tensor:
    """``[<x, y>, |x|^2, |y|^2]`` on ``x.device``: fp64 for fp64 buffers, fp32 otherwise.

    ``y=None`` gives ``[0, |x|^2, 0]``. Deterministic: same inputs, same bits.
    """
    check_buffer("reduce3", "x", x)
    if y is not None:
        check_buffer("reduce3", "y", y, like=x)
    check_device("reduce3", "x", x, _INTERPRETED)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.empty(3, dtype=acc, device=x.device)
    n = x.numel()
    if n == 0:
        return out.zero_()
    g = launch.plan(n, "reduce", _INTERPRETED)
    part = out if g.programs == 1 else torch.empty(3 * g.programs, dtype=acc, device=x.device)
    with launch.on_device_of(x):
        _reduce3_partials_kernel[(g.programs,)](
            x, x if y is None else y, part, n, g.programs, g.iters,
            BLOCK=g.block, HAS_Y=y is not None, LOOP=g.loop, num_warps=g.num_warps)
        if g.programs > 1:
            _reduce3_finalize_kernel[(1,)](
                part, out, g.programs, BLOCK_P=max(16, triton.next_power_of_2(g.programs)),
                num_warps=4)
    return out

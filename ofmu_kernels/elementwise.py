"""``combine`` and ``update``: the elementwise halves of the step.

Coefficients are read by the kernels from a 4-element device tensor (never passed as Python
floats: those are fp64 in the interpreter but fp32 when compiled, and reading them on the host
would sync). The arithmetic runs in the coefficients' dtype (the stats dtype: fp32, or fp64
for fp64 buffers) and is rounded once to the buffer dtype on the store, in the same operation
order as the torch reference in :mod:`ofmu.reference`.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from . import launch
from .checks import check_buffer, check_coeffs, check_device, check_overlap


@triton.jit
def _combine_block(x_ptr, y_ptr, a_ptr, b_ptr, c0, c1, c2, c3, offs, n,
                   HAS_Y: tl.constexpr, HAS_B: tl.constexpr):
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(c0.dtype)
    if HAS_Y:
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(c0.dtype)
    else:
        y = tl.zeros_like(x)  # as the reference: c1*0, so a non-finite c1 still shows
    # Both results come from registers, so out_a / out_b may alias x or y.
    a = c0 * x + c1 * y
    tl.store(a_ptr + offs, a.to(a_ptr.dtype.element_ty), mask=mask)
    if HAS_B:
        b = c2 * x + c3 * y
        tl.store(b_ptr + offs, b.to(b_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_kernel(x_ptr, y_ptr, a_ptr, b_ptr, coeffs_ptr, n, num_programs, iters,
                    BLOCK: tl.constexpr, HAS_Y: tl.constexpr, HAS_B: tl.constexpr,
                    LOOP: tl.constexpr):
    """``a_i = c0*x_i + c1*y_i`` and (if ``HAS_B``) ``b_i = c2*x_i + c3*y_i``; ``y = 0`` if absent."""
    c0 = tl.load(coeffs_ptr)
    c1 = tl.load(coeffs_ptr + 1)
    c2 = tl.load(coeffs_ptr + 2)
    c3 = tl.load(coeffs_ptr + 3)
    pid = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    if LOOP:
        for i in range(0, iters):
            offs = (pid + i * num_programs) * BLOCK + lanes
            _combine_block(x_ptr, y_ptr, a_ptr, b_ptr, c0, c1, c2, c3, offs, n, HAS_Y, HAS_B)
    else:
        _combine_block(x_ptr, y_ptr, a_ptr, b_ptr, c0, c1, c2, c3, pid * BLOCK + lanes, n,
                       HAS_Y, HAS_B)


@triton.jit
def _update_block(t_ptr, x_ptr, y_ptr, c0, c1, c2, offs, n, HAS_Y: tl.constexpr):
    mask = offs < n
    t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(c0.dtype)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(c0.dtype)
    new = c0 * t + c1 * x
    if HAS_Y:
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(c0.dtype)
        new = new + c2 * y
    tl.store(t_ptr + offs, new.to(t_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _update_kernel(t_ptr, x_ptr, y_ptr, coeffs_ptr, n, num_programs, iters,
                   BLOCK: tl.constexpr, HAS_Y: tl.constexpr, LOOP: tl.constexpr):
    """``theta_i = c0*theta_i + c1*x_i + c2*y_i`` if ``c3 != 0``; else no load and no store."""
    c0 = tl.load(coeffs_ptr)
    c1 = tl.load(coeffs_ptr + 1)
    c2 = tl.load(coeffs_ptr + 2)
    # The non-finite flag folds into the bound: c3 == 0 masks every load and store.
    n = tl.where(tl.load(coeffs_ptr + 3) != 0, n, 0)
    pid = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    if LOOP:
        for i in range(0, iters):
            offs = (pid + i * num_programs) * BLOCK + lanes
            _update_block(t_ptr, x_ptr, y_ptr, c0, c1, c2, offs, n, HAS_Y)
    else:
        _update_block(t_ptr, x_ptr, y_ptr, c0, c1, c2, pid * BLOCK + lanes, n, HAS_Y)


_INTERPRETED = launch.is_interpreted(_combine_kernel)


def combine(x: Tensor, y: Tensor | None, coeffs: Tensor, out_a: Tensor,
            out_b: Tensor | None = None) -> None:
    """``out_a = c0*x + c1*y``; ``out_b = c2*x + c3*y`` if given. Each output may be exactly ``x``
    or ``y`` (not a partially overlapping view of one, nor the other output)."""
    check_buffer("combine", "x", x)
    for name, t in (("y", y), ("out_a", out_a), ("out_b", out_b)):
        if t is not None or name == "out_a":
            check_buffer("combine", name, t, like=x)
    check_coeffs("combine", coeffs, x)
    for out_name, out in (("out_a", out_a), ("out_b", out_b)):
        if out is None:
            continue
        check_overlap("combine", out_name, out, "x", x, may_alias=True)
        if y is not None:
            check_overlap("combine", out_name, out, "y", y, may_alias=True)
        check_overlap("combine", out_name, out, "coeffs", coeffs, may_alias=False)
    if out_b is not None:
        check_overlap("combine", "out_a", out_a, "out_b", out_b, may_alias=False)
    check_device("combine", "x", x, _INTERPRETED)
    n = x.numel()
    if n == 0:
        return
    g = launch.plan(n, "elementwise", _INTERPRETED)
    with launch.on_device_of(x):
        _combine_kernel[(g.programs,)](
            x, x if y is None else y, out_a, out_a if out_b is None else out_b, coeffs,
            n, g.programs, g.iters, BLOCK=g.block, HAS_Y=y is not None,
            HAS_B=out_b is not None, LOOP=g.loop, num_warps=g.num_warps)


def update(theta: Tensor, x: Tensor, y: Tensor | None, coeffs: Tensor) -> None:
    """In place ``theta = c0*theta + c1*x + c2*y``; ``theta`` is not touched when ``c3 == 0``."""
    check_buffer("update", "theta", theta)
    check_buffer("update", "x", x, like=theta, like_name="theta")
    if y is not None:
        check_buffer("update", "y", y, like=theta, like_name="theta")
    check_coeffs("update", coeffs, theta, like_name="theta")
    check_overlap("update", "theta", theta, "x", x, may_alias=True)
    if y is not None:
        check_overlap("update", "theta", theta, "y", y, may_alias=True)
    check_overlap("update", "theta", theta, "coeffs", coeffs, may_alias=False)
    check_device("update", "theta", theta, _INTERPRETED)
    n = theta.numel()
    if n == 0:
        return
    g = launch.plan(n, "elementwise", _INTERPRETED)
    with launch.on_device_of(theta):
        _update_kernel[(g.programs,)](
            theta, x, x if y is None else y, coeffs, n, g.programs, g.iters,
            BLOCK=g.block, HAS_Y=y is not None, LOOP=g.loop, num_warps=g.num_warps)

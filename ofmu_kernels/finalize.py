"""``finalize``: the summed ``reduce3`` statistics into the packed coefficients of a step.

One program, a few scalar loads and eleven stores: it replaces the ~40 tiny torch ops of
coefficient math between the two kernels of a step. Same formulas and output layout as the C++
and CUDA kernels (``csrc/finalize.h``) and the torch reference (``ofmu.reference.finalize``).
Host scalars (``gamma``, ``lr``, ...) come from the param group, never from the device; compiled,
triton passes them as fp32 (exact for fp32 statistics; fp64 statistics see them rounded once).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import launch
from .checks import check_device

LENGTH = 11  # csrc/finalize.h: kFinalizeLen


@triton.jit
def _finite(v):
    return v - v == 0


@triton.jit
def _finalize_kernel(g_ptr, u_ptr, c_ptr, n_checks, ok_ptr, out_ptr, gamma, one_eps, lr,
                     decay, max_norm, cap, tiny, PROJECT: tl.constexpr, HAS_OK: tl.constexpr,
                     HAS_MAX_NORM: tl.constexpr, HAS_CAP: tl.constexpr, CBLOCK: tl.constexpr):
    dt = out_ptr.dtype.element_ty
    zero = tl.zeros([], dt)  # host scalars join the accumulation dtype by adding it
    one = zero + 1.0
    g0, g1, g2 = tl.load(g_ptr), tl.load(g_ptr + 1), tl.load(g_ptr + 2)
    u0, u1, u2 = tl.load(u_ptr), tl.load(u_ptr + 1), tl.load(u_ptr + 2)
    ok = _finite(g0) & _finite(g1) & _finite(g2) & _finite(u0) & _finite(u1) & _finite(u2)
    offs = tl.arange(0, CBLOCK)
    cs = tl.load(c_ptr + offs, mask=offs < n_checks, other=0.0)
    ok = ok & (tl.sum(tl.where(_finite(cs), 0, 1), axis=0) == 0)
    if HAS_OK:
        ok = ok & (tl.load(ok_ptr) != 0)
    alpha = one
    gam = zero + gamma
    if PROJECT:
        gam = gam * (g0 / (g2 * (zero + one_eps) + (zero + tiny)))
    scale = one
    step = zero + lr
    if HAS_MAX_NORM:
        sq = alpha * alpha * u1 + 2.0 * alpha * gam * u0 + gam * gam * u2
        scale = (zero + max_norm) / (tl.sqrt(sq) + (zero + 1e-6))
        scale = tl.where(scale > 1.0, one, scale)
        step = step * scale
    proceed = ok
    capped = zero
    if HAS_CAP:  # the forget loss (checks[0]) at or above the cap: no ascent
        below = tl.load(c_ptr).to(tl.float64) < (tl.zeros([], tl.float64) + cap)
        proceed = ok & below
        capped = tl.where(ok & ~below, one, zero)
    tl.store(out_ptr, zero + decay)
    tl.store(out_ptr + 1, alpha * step)
    tl.store(out_ptr + 2, gam * step)
    tl.store(out_ptr + 3, tl.where(proceed, one, zero))
    tl.store(out_ptr + 4, alpha)
    tl.store(out_ptr + 5, gam)
    tl.store(out_ptr + 6, zero)
    tl.store(out_ptr + 7, zero)
    tl.store(out_ptr + 8, scale)
    tl.store(out_ptr + 9, tl.where(ok, zero, one))
    tl.store(out_ptr + 10, capped)


_INTERPRETED = launch.is_interpreted(_finalize_kernel)


def _check(gstats: Tensor, ustats: Tensor, checks: Tensor, ok: Tensor | None, has_cap: bool):
    def fail(name, what):
        raise ValueError(f"ofmu_kernels.finalize: {name} {what}")

    if gstats.dtype not in (torch.float32, torch.float64):
        fail("gstats", f"must be float32 or float64 (an accumulation dtype), got {gstats.dtype}")
    for name, t, n in (("gstats", gstats, 3), ("ustats", ustats, 3), ("checks", checks, None)):
        if t.dim() != 1 or (n is not None and t.numel() != n) or not t.is_contiguous():
            fail(name, f"must be a contiguous 1-D tensor{'' if n is None else ' of 3 elements'}, "
                       f"got shape {tuple(t.shape)}")
        if t.dtype != gstats.dtype or t.device != gstats.device:
            fail(name, f"has dtype {t.dtype} on {t.device}, expected {gstats.dtype} on "
                       f"{gstats.device} (as gstats)")
    if has_cap and checks.numel() < 1:
        fail("checks", "is empty, but cap compares against checks[0] (the forget loss)")
    if ok is not None and (ok.dtype != torch.bool or ok.numel() != 1 or ok.device != gstats.device):
        fail("ok", f"must be a one-element bool tensor on {gstats.device}, got {ok.dtype} of "
                   f"shape {tuple(ok.shape)} on {ok.device}")


def finalize(gstats: Tensor, ustats: Tensor, checks: Tensor, ok: Tensor | None, project: bool,
             gamma: float, eps: float, lr: float, weight_decay: float, max_norm: float | None,
             cap: float | None) -> Tensor:
    """The packed coefficients (``LENGTH`` elements, ``gstats``' dtype and device)."""
    _check(gstats, ustats, checks, ok, cap is not None)
    check_device("finalize", "gstats", gstats, _INTERPRETED)
    out = torch.empty(LENGTH, dtype=gstats.dtype, device=gstats.device)
    with launch.on_device_of(gstats):
        _finalize_kernel[(1,)](
            gstats, ustats, checks if checks.numel() else gstats, checks.numel(),
            gstats if ok is None else ok, out, float(gamma), 1.0 + float(eps), float(lr),
            1.0 - abs(float(lr)) * float(weight_decay), float(max_norm or 0.0),
            float(cap or 0.0), float(torch.finfo(gstats.dtype).tiny), PROJECT=bool(project),
            HAS_OK=ok is not None, HAS_MAX_NORM=max_norm is not None, HAS_CAP=cap is not None,
            CBLOCK=max(1, triton.next_power_of_2(max(1, checks.numel()))), num_warps=1)
    return out

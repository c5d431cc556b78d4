"""Inputs and comparisons shared by the tests of the C++ CPU kernels' instruction-set paths
(portable, AVX2, AVX-512: tests/test_kernels_cpp.py natively, tests/test_kernels_avx512.py
through SIMDe), which must all give the same bits."""

from __future__ import annotations

import torch
from _kernels import bits

ISAS = ("portable", "avx2", "avx512")  # what torch.ops.ofmu._cpu_isa names, slowest first


def supported_isas() -> list[str]:
    """The instruction-set paths of ofmu._C that this CPU can run (none without the extension)."""
    ops = torch.ops.ofmu
    try:
        import ofmu._C  # noqa: F401
    except ImportError:
        return []
    if not hasattr(ops, "_cpu_isa"):
        return ["portable"]
    best = ops._cpu_isa(best=True)
    return list(ISAS[: ISAS.index(best) + 1])


def nasty(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Wide-range values with NaNs (also signalling / negative / payload NaNs), +-inf, -0.0,
    subnormals and values near the overflow threshold mixed in."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=g, dtype=torch.float64)
    v = v * torch.exp(4 * torch.randn(n, generator=g, dtype=torch.float64))
    t = v.to(dtype)
    fi = torch.finfo(dtype)
    m = torch.rand(n, generator=g)
    t[m < 0.01] = float("nan")
    t[(m >= 0.01) & (m < 0.02)] = float("inf")
    t[(m >= 0.02) & (m < 0.03)] = -float("inf")
    sub = (m >= 0.03) & (m < 0.05)
    t[sub] = (fi.tiny * torch.rand(int(sub.sum()), generator=g, dtype=torch.float64)).to(dtype)
    t[(m >= 0.05) & (m < 0.06)] = -0.0
    t[(m >= 0.06) & (m < 0.07)] = fi.max * 0.75
    b = bits(t)
    signalling = {torch.float16: 0x7C01, torch.bfloat16: 0x7F81, torch.float32: 0x7F800001,
                  torch.float64: 0x7FF0000000000001}[dtype]
    b[(m >= 0.07) & (m < 0.08)] = signalling
    b[(m >= 0.08) & (m < 0.09)] = -1  # all ones: negative NaN, full payload
    return t


def assert_same_results(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bitwise equal, except that a NaN need only meet a NaN: when two NaNs meet in one operation
    IEEE 754 leaves open which one comes out, and the portable loops' choice is the compiler's
    (fp16 keeps the NaN's sign; bf16 stores are always 0x7FC0)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    both_nan = torch.isnan(a) & torch.isnan(b)
    differ = bits(a) != bits(b)
    assert not (differ & ~both_nan).any(), (
        f"fast and portable paths differ at {torch.nonzero(differ & ~both_nan).flatten()[:8].tolist()}")



FAST_COEFFS = {
    "random": [0.7, -1.3, 2.1, 0.4],
    "bf16 ties": [1.0, 2.0**-9, 1.0 + 2.0**-8, 1.0],
    "fp16 ties": [1.0, 2.0**-12, 1.0 + 2.0**-11, 1.0],
    "tiny/huge": [1e-6, -3e-7, 7e4, 1.0],
    "inf c1": [1.0, float("inf"), 0.0, 1.0],
    "nan c0": [float("nan"), 1.0, -1.0, float("nan")],
    "signed zeros": [-0.0, 0.0, -0.0, 2.0],
}



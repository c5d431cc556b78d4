"""The C++ CPU kernels' own cases: the AVX2 fast path against the portable loops.

Everything the kernel contract asks of every backend (accuracy against float64, aliasing,
non-finite inputs, determinism across threads, argument errors, Meta/fake tensors, opcheck,
torch.compile) is in tests/test_kernels.py, which runs it on this backend too.
"""

from __future__ import annotations

import pytest
import torch
from _kernels import assert_bitwise_equal, bits

pytest.importorskip("ofmu._C", reason="ofmu._C is not built (pip install -e . --no-build-isolation)")

ops = torch.ops.ofmu


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# The fast path (AVX2 + F16C, chosen at run time) against the portable loops, every dtype
# ---------------------------------------------------------------------------------------------

# Sizes around the vector width (8), the reduction lanes (16), the reduction block (1024) and
# the fp16 reduction's groups of 8 blocks, plus a multi-threaded one.
FAST_SIZES = [1, 7, 8, 9, 15, 16, 17, 1023, 1025, 8 * 1024, 8 * 1024 + 3, 9 * 1024 + 5, 2**17 + 8 * 1024 + 1]


def _has_fast_path() -> bool:
    if not hasattr(ops, "_cpu_fast_path"):
        return False
    old = ops._cpu_fast_path()
    try:
        ops._cpu_fast_path(True)
        return True
    except RuntimeError:  # no AVX2+F16C here (or not x86-64): only the portable loops exist
        return False
    finally:
        ops._cpu_fast_path(old)


needs_fast = pytest.mark.skipif(not _has_fast_path(), reason="no AVX2+F16C fast path here")


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


@pytest.fixture
def portable_and_fast():
    """Runs fn with the portable loops, then with the fast path; returns both results."""
    old = ops._cpu_fast_path()

    def both(fn):
        ops._cpu_fast_path(False)
        slow = fn()
        ops._cpu_fast_path(True)
        fast = fn()
        return slow, fast

    yield both
    ops._cpu_fast_path(old)


FAST_COEFFS = {
    "random": [0.7, -1.3, 2.1, 0.4],
    "bf16 ties": [1.0, 2.0**-9, 1.0 + 2.0**-8, 1.0],
    "fp16 ties": [1.0, 2.0**-12, 1.0 + 2.0**-11, 1.0],
    "tiny/huge": [1e-6, -3e-7, 7e4, 1.0],
    "inf c1": [1.0, float("inf"), 0.0, 1.0],
    "nan c0": [float("nan"), 1.0, -1.0, float("nan")],
    "signed zeros": [-0.0, 0.0, -0.0, 2.0],
}


@needs_fast
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64],
                         ids=str)
@pytest.mark.parametrize("n", FAST_SIZES)
def test_fast_path_matches_portable(n, dtype, portable_and_fast, restore_threads):
    torch.set_num_threads(1)
    x, y, theta = (nasty(n, dtype, seed=n + k) for k in range(3))
    xf, yf = x.clone(), y.clone()
    xf[torch.isnan(xf)] = 1.0  # also a NaN-free pair: the stats then must match bitwise
    yf[torch.isnan(yf)] = -2.0
    for a, b in [(x, y), (xf, yf)]:
        slow, fast = portable_and_fast(lambda: (ops.reduce3(a, b), ops.reduce3(a, None)))
        for s, f in zip(slow, fast):
            assert_same_results(s, f)
    s, f = portable_and_fast(lambda: ops.reduce3(xf, yf))
    assert_bitwise_equal(s, f)
    for _name, cl in FAST_COEFFS.items():
        c = torch.tensor(cl, dtype=torch.float64 if dtype == torch.float64 else torch.float32)

        def run():
            outs = []
            for yy in (y, None):
                a, b = torch.empty_like(x), torch.empty_like(x)
                ops.combine(x, yy, c, a, b)
                a1 = torch.empty_like(x)
                ops.combine(x, yy, c, a1, None)
                t = theta.clone()
                ops.update(t, x, yy, c)
                outs += [a, b, a1, t]
            xs, ys = x.clone(), y.clone()
            ops.combine(xs, ys, c, ys, xs)  # outputs aliasing the inputs, swapped
            t = x.clone()
            ops.update(t, t, y, c)
            return outs + [xs, ys, t]

        for s, f in zip(*portable_and_fast(run)):
            assert_same_results(s, f)


@needs_fast
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fast_path_every_16bit_value(dtype, portable_and_fast):
    # Every bit pattern through the load conversion (update with c = [1, 0, 0, 1] rounds
    # c0*x + 0 back: a no-op except -0 -> +0) and through ties of the store rounding.
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    half_ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    for cl in ([1.0, 0.0, 0.0, 1.0], [1.0, half_ulp, 0.0, 1.0], [1.0, -half_ulp, 0.0, 1.0],
               [1.0 + half_ulp, 0.0, 0.0, 1.0], [2.0**-20, 0.0, 0.0, 1.0]):
        c = torch.tensor(cl)

        def run():
            t = x.clone()
            ops.update(t, x, None, c)  # theta = c0*x + c1*x: exact ties for c1 = +-half ulp
            return t, ops.reduce3(x[torch.isfinite(x)], None)

        (s, rs), (f, rf) = portable_and_fast(run)
        assert_same_results(s, f)
        assert_bitwise_equal(rs, rf)


def test_fast_path_env_var_forces_portable():
    import subprocess
    import sys

    code = "import torch, ofmu._C; print(torch.ops.ofmu._cpu_fast_path())"
    env = dict(__import__("os").environ, OFMU_CPU_PORTABLE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"

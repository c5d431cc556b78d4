"""The C++ CPU kernels' own cases: every vector path (AVX2, and AVX-512 where the CPU has it)
against the portable loops, and the switches that choose between them.

Everything the kernel contract asks of every backend (accuracy against float64, aliasing,
non-finite inputs, determinism across threads, argument errors, Meta/fake tensors, opcheck,
torch.compile) is in tests/test_kernels.py, which runs it on this backend too. The AVX-512 code
on CPUs without AVX-512 (through SIMDe): tests/test_kernels_avx512.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from _cpu_paths import FAST_COEFFS, assert_same_results, nasty, supported_isas
from _kernels import assert_bitwise_equal
from ofmu import backends

pytest.importorskip("ofmu._C", reason="ofmu._C is not built (pip install -e . --no-build-isolation)")

ops = torch.ops.ofmu


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# The vector paths (chosen at run time) against the portable loops, every dtype
# ---------------------------------------------------------------------------------------------

# Sizes around the vector widths (8, 16), the reduction lanes (16), the reduction block (1024)
# and the fp16 reduction's groups of 8 (AVX2) and 16 (AVX-512) blocks, plus a multi-threaded one.
FAST_SIZES = [1, 7, 8, 9, 15, 16, 17, 31, 1023, 1025, 8 * 1024, 8 * 1024 + 3, 9 * 1024 + 5,
              16 * 1024, 17 * 1024 + 5, 2**17 + 8 * 1024 + 1]

VECTOR_ISAS = [isa for isa in supported_isas() if isa != "portable"]
ALL_VECTOR_ISAS = ["avx2", "avx512"]


@pytest.fixture(params=[pytest.param(isa, marks=pytest.mark.skipif(
    isa not in VECTOR_ISAS, reason=f"this CPU (or build) has no {isa} path")) for isa in ALL_VECTOR_ISAS])
def portable_and_fast(request):
    """Runs fn with the portable loops, then with the vector path of the parameter; returns both
    results."""
    isa = request.param
    old = ops._cpu_isa()

    def both(fn):
        ops._cpu_isa("portable")
        slow = fn()
        ops._cpu_isa(isa)
        assert ops._cpu_isa() == isa
        fast = fn()
        return slow, fast

    yield both
    ops._cpu_isa(old)


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
    code = "import torch, ofmu._C; print(torch.ops.ofmu._cpu_fast_path(), torch.ops.ofmu._cpu_isa())"
    env = dict(os.environ, OFMU_CPU_PORTABLE="1")
    env.pop("OFMU_CPU_ISA", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["False", "portable"]


# ---------------------------------------------------------------------------------------------
# Choosing the path: OFMU_CPU_ISA, _cpu_isa, _cpu_fast_path
# ---------------------------------------------------------------------------------------------

def _in_subprocess(code: str, **env_vars: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OFMU_CPU_ISA", "OFMU_CPU_PORTABLE")}
    return subprocess.run([sys.executable, "-c", "import torch, ofmu._C\n" + code],
                          env=dict(env, **env_vars), capture_output=True, text=True)


@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
def test_env_var_chooses_the_path(isa):
    code = "print(torch.ops.ofmu._cpu_isa()); print(torch.ops.ofmu.reduce3(torch.ones(5), None)[1].item())"
    out = _in_subprocess(code, OFMU_CPU_ISA=isa)
    if isa in supported_isas():
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == [isa, "5.0"]
    else:  # refused at the first kernel call, naming the variable and what the CPU supports
        assert out.returncode != 0
        assert f"OFMU_CPU_ISA={isa}: this CPU (or build) supports at most" in out.stderr


def test_env_var_refuses_unknown_names():
    out = _in_subprocess("torch.ops.ofmu.reduce3(torch.ones(5), None)", OFMU_CPU_ISA="avx1024")
    assert out.returncode != 0
    assert "OFMU_CPU_ISA=avx1024: expected one of portable, avx2, avx512" in out.stderr


def test_cpu_isa_switch_reports_and_refuses():
    best = ops._cpu_isa(best=True)
    assert best == supported_isas()[-1]
    old = ops._cpu_isa()
    try:
        assert ops._cpu_isa("portable") == old  # returns the previous setting
        assert ops._cpu_isa() == "portable"
        assert ops._cpu_isa(dtype=torch.float64) == "portable"
        assert not ops._cpu_fast_path()
        ops._cpu_isa(best)
        assert ops._cpu_isa(dtype=torch.float32) == best
        assert backends.cpu_isa(torch.float16) == best  # what benchmarks and `ofmu info` record
        assert ops._cpu_isa(dtype=torch.bfloat16) == best
        # fp64 buffers have no AVX-512 kernels: they keep the AVX2 ones
        assert ops._cpu_isa(dtype=torch.float64) == ("avx2" if best == "avx512" else best)
        with pytest.raises(RuntimeError, match="expected one of portable, avx2, avx512"):
            ops._cpu_isa("sse2")
        with pytest.raises(RuntimeError, match="dtype must be float32, float64, bfloat16 or float16"):
            ops._cpu_isa(dtype=torch.int32)
        assert ops._cpu_isa() == best  # refused calls changed nothing
        if best != "avx512":
            with pytest.raises(RuntimeError, match="supports at most"):
                ops._cpu_isa("avx512")
    finally:
        ops._cpu_isa(old)

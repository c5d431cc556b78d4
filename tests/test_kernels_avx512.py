"""The AVX-512 kernels (csrc/cpu/avx512_kernels.h) against the portable loops, on any x86-64 CPU.

The header is compiled against SIMDe (header-only "SIMD Everywhere", Debian package
libsimde-dev), which implements the `_mm512_*` intrinsics with narrower instructions: the
very source the extension runs natively on AVX-512 CPUs runs here through a small torch-free
library (tests/csrc/avx512_simde.cpp, loaded with ctypes), and must give the portable loops'
bits in every case. On a CPU with AVX-512 the native kernels are compared too
(tests/test_kernels_cpp.py); the extension is also checked here for fused multiply-adds,
which would round differently.
"""

from __future__ import annotations

import ctypes
import platform
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from _cpu_paths import FAST_COEFFS, assert_same_results, nasty
from _kernels import assert_bitwise_equal

pytest.importorskip("ofmu._C", reason="ofmu._C is not built (pip install -e . --no-build-isolation)")

ops = torch.ops.ofmu
ROOT = Path(__file__).resolve().parents[1]
SIMDE = Path("/usr/include/simde/x86/avx512.h")
FMT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
DTYPES = list(FMT)
BLOCK = 1024

# Around the vector width and reduction lanes (16), the block (1024) and the fp16 groups of 16
# blocks: full groups, a group of full blocks only, a group ending in a partial block.
SIZES = [0, 1, 7, 15, 16, 17, 31, 33, 1023, 1024, 1025, 3 * BLOCK, 16 * BLOCK, 16 * BLOCK + 3,
         17 * BLOCK + 5, 40 * BLOCK + 1000]


def _compiler() -> str | None:
    return shutil.which("c++") or shutil.which("g++")


def _skip_reason() -> str | None:
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"the AVX-512 kernels are x86-64 code (this is {platform.machine()})"
    if not SIMDE.exists():
        return f"SIMDe is not installed ({SIMDE} missing; apt-get install libsimde-dev)"
    if _compiler() is None:
        return "no C++ compiler (c++/g++) on PATH"
    if not hasattr(ops, "_cpu_isa"):
        return "ofmu._C predates the _cpu_isa switch: rebuild it"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    m = re.search(r"^flags\s*:(.*)$", text, re.M)
    return set(m.group(1).split()) if m else set()


@pytest.fixture(scope="module")
def simde(tmp_path_factory):
    """The header built against SIMDe (-O1, a few seconds), as a ctypes library."""
    out = tmp_path_factory.mktemp("avx512_simde") / "avx512_simde.so"
    # AVX2/F16C where the CPU has them, so SIMDe's 256-bit halves and the fp16 conversions are
    # the real instructions; never FMA, and no contraction (as in the extension's build).
    isa = ["-mavx2", "-mf16c"] if {"avx2", "f16c"} <= _cpu_flags() else []
    cmd = [_compiler(), "-std=c++17", "-O1", "-ffp-contract=off", "-shared", "-fPIC", *isa,
           f"-I{ROOT / 'csrc'}", str(ROOT / "tests" / "csrc" / "avx512_simde.cpp"), "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"building the SIMDe harness failed:\n{' '.join(cmd)}\n{r.stderr[-4000:]}"
    lib = ctypes.CDLL(str(out))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.ofmu_simde_partials.argtypes = [i32, p, p, i64, p]
    lib.ofmu_simde_combine.argtypes = [i32, p, p, p, p, p, i64]
    lib.ofmu_simde_update.argtypes = [i32, p, p, p, p, i64]
    return lib


@pytest.fixture
def portable():
    """The extension's portable loops for the duration of a test."""
    old = ops._cpu_isa("portable")
    yield
    ops._cpu_isa(old)


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def simde_partials(lib, x, y) -> torch.Tensor:
    nb = (x.numel() + BLOCK - 1) // BLOCK
    p = torch.full((nb, 3), float("nan"), dtype=torch.float64)  # every slot must be written
    lib.ofmu_simde_partials(FMT[x.dtype], _ptr(x), _ptr(y), x.numel(), _ptr(p))
    return p


def simde_combine(lib, x, y, c, a, b) -> None:
    lib.ofmu_simde_combine(FMT[x.dtype], _ptr(x), _ptr(y), _ptr(c), _ptr(a), _ptr(b), x.numel())


def simde_update(lib, t, x, y, c) -> None:
    lib.ofmu_simde_update(FMT[x.dtype], _ptr(t), _ptr(x), _ptr(y), _ptr(c), x.numel())


def assert_partials_match(p: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None) -> None:
    """Each block's partials (fp32 sums, widened) are what the portable reduce3 returns for that
    block alone, bit for bit; summed in block order in double, they give its whole-buffer stats."""
    for b in range(p.shape[0]):
        s = slice(b * BLOCK, (b + 1) * BLOCK)
        assert_same_results(p[b].to(torch.float32), ops.reduce3(x[s], None if y is None else y[s]))
    total = torch.from_numpy(np.cumsum(p.numpy(), axis=0)[-1] if len(p) else np.zeros(3))
    assert_same_results(total.to(torch.float32), ops.reduce3(x, y))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_simde_reduce3_partials_match_portable(simde, portable, n, dtype):
    x, y = nasty(n, dtype, seed=n), nasty(n, dtype, seed=n + 1)
    xf, yf = x.clone(), y.clone()
    xf[torch.isnan(xf)] = 1.0  # NaN-free too: the sums must then be bitwise equal, NaN or not
    yf[torch.isnan(yf)] = -2.0
    plain = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)  # finite sums
    for a, b in [(x, y), (xf, yf), (plain, plain.flip(0)), (plain, None), (x, None)]:
        assert_partials_match(simde_partials(simde, a, b), a, b)
    assert torch.isfinite(simde_partials(simde, plain, plain.flip(0))).all()  # every slot written


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [n for n in SIZES if n <= 17 * BLOCK + 5])
def test_simde_combine_update_match_portable(simde, portable, n, dtype):
    x, y, theta = (nasty(n, dtype, seed=n + k) for k in range(3))
    for _name, cl in FAST_COEFFS.items():
        c = torch.tensor(cl, dtype=torch.float32)
        for yy in (y, None):
            for with_b in (True, False):
                a, b = torch.empty_like(x), torch.empty_like(x) if with_b else None
                a_ref, b_ref = torch.empty_like(x), torch.empty_like(x) if with_b else None
                simde_combine(simde, x, yy, c, a, b)
                ops.combine(x, yy, c, a_ref, b_ref)
                assert_same_results(a, a_ref)
                if with_b:
                    assert_same_results(b, b_ref)
            t, t_ref = theta.clone(), theta.clone()
            simde_update(simde, t, x, yy, c)
            ops.update(t_ref, x, yy, c)
            assert_same_results(t, t_ref)
        # outputs aliasing the inputs, swapped; theta aliasing x
        xs, ys, xr, yr = x.clone(), y.clone(), x.clone(), y.clone()
        simde_combine(simde, xs, ys, c, ys, xs)
        ops.combine(xr, yr, c, yr, xr)
        assert_same_results(xs, xr)
        assert_same_results(ys, yr)
        t, t_ref = x.clone(), x.clone()
        simde_update(simde, t, t, y, c)
        ops.update(t_ref, t_ref, y, c)
        assert_same_results(t, t_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_simde_every_16bit_value(simde, portable, dtype):
    # Every bit pattern through the load conversion (c = [1, 0, 0, 1]: c0*x + 0, a no-op except
    # -0 -> +0), through ties of the store rounding (c1 = +-half ulp of 1), and into subnormals.
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    half_ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    for cl in ([1.0, 0.0, 0.0, 1.0], [1.0, half_ulp, 0.0, 1.0], [1.0, -half_ulp, 0.0, 1.0],
               [1.0 + half_ulp, 0.0, 0.0, 1.0], [2.0**-20, 0.0, 0.0, 1.0]):
        c = torch.tensor(cl)
        t, t_ref = x.clone(), x.clone()
        simde_update(simde, t, x, None, c)
        ops.update(t_ref, x, None, c)
        assert_same_results(t, t_ref)
    finite = x[torch.isfinite(x)]
    assert_partials_match(simde_partials(simde, finite, finite.flip(0)), finite, finite.flip(0))


def test_update_skip_flag_leaves_theta_untouched(simde):
    x = nasty(100, torch.bfloat16, seed=3)
    t = x.clone()
    simde_update(simde, t, x, x, torch.tensor([2.0, 1.0, 1.0, 0.0]))
    assert_bitwise_equal(t, x)


def test_extension_has_no_fused_multiply_add():
    """The AVX-512 target enables FMA instructions; the build's -ffp-contract=off must keep the
    compiler from fusing a*b + c (one rounding instead of the portable loops' two)."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) not installed")
    import ofmu._C

    text = subprocess.run([objdump, "-d", "--no-show-raw-insn", ofmu._C.__file__], capture_output=True,
                          text=True, check=True).stdout
    assert "%zmm" in text, "the extension has no AVX-512 code at all"
    fused = sorted(set(re.findall(r"\bv(?:fn?m(?:add|sub)\w*)", text)))
    assert not fused, f"fused multiply-adds in {ofmu._C.__file__}: {fused[:8]}"

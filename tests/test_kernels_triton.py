"""The Triton kernels' own cases: launch geometry, the interpreter, offline compilation, and
the GPU-only large sizes.

The kernel contract itself (accuracy against float64, aliasing, non-finite inputs, determinism,
argument errors) is tested for this backend by tests/test_kernels.py, under the interpreter on
CPU tensors (``TRITON_INTERPRET=1``, set by conftest.py) and compiled on a GPU. Here: each
interpreted op is bitwise the torch reference; a capped grid whose programs loop over blocks
(the GPU geometry) on odd sizes; the kernels compile for sm_90 without a GPU; and, on a GPU,
determinism at 2**26 elements and offsets past 2**31. References and tolerances:
tests/_kernels.py.
"""

from __future__ import annotations

import pytest
import torch
from _kernels import assert_elementwise_close, assert_reduce3_close

triton = pytest.importorskip("triton")

from ofmu import backends, reference  # noqa: E402

import ofmu_kernels as K  # noqa: E402
from ofmu_kernels import launch  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if ON_GPU else "cpu")
GPU_ONLY = pytest.mark.gpu


def rand(n: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, generator=g, dtype=torch.float64)).to(dtype).to(DEV)


def coeffs_for(dtype: torch.dtype, values=(0.75, -1.3, 2.2, 0.9)) -> torch.Tensor:
    return torch.tensor(values, dtype=reference.acc_dtype(dtype), device=DEV)


def combine_expectations(x, y, coeffs):
    """Exact (float64) and plain-torch (same precision) results plus per-element scales."""
    xd = x.double()
    yd = torch.zeros_like(xd) if y is None else y.double()
    c = coeffs.double()
    exact_a, exact_b = c[0] * xd + c[1] * yd, c[2] * xd + c[3] * yd
    plain_a, plain_b = torch.empty_like(x), torch.empty_like(x)
    reference.combine(x, y, coeffs, plain_a, plain_b)
    scale_a = (c[0] * xd).abs() + (c[1] * yd).abs()
    scale_b = (c[2] * xd).abs() + (c[3] * yd).abs()
    return (exact_a, plain_a, scale_a), (exact_b, plain_b, scale_b)


def update_expectations(theta, x, y, coeffs):
    c = coeffs.double()
    exact = c[0] * theta.double() + c[1] * x.double()
    scale = (c[0] * theta.double()).abs() + (c[1] * x.double()).abs()
    if y is not None:
        exact = exact + c[2] * y.double()
        scale = scale + (c[2] * y.double()).abs()
    plain = theta.clone()
    reference.update(plain, x, y, coeffs)
    return exact, plain, scale


def interpreter_runs_loops() -> bool:
    """triton 3.6's interpreter cannot use a runtime loop bound under numpy >= 2.4."""
    if ON_GPU:
        return True

    @triton.jit
    def _count(out_ptr, n):
        acc = 0
        for _ in range(0, n):
            acc += 1
        triton.language.store(out_ptr, acc)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        _count[(1,)](out, 3)
    except Exception:
        return False
    return int(out) == 3


needs_loops = pytest.mark.skipif(not interpreter_runs_loops(),
                                 reason="this triton's interpreter breaks on runtime loop bounds")

FLOAT_DTYPES = [torch.float32, torch.float64]
HALF_DTYPES = [torch.float16, torch.bfloat16]
# The interpreter rounds fp32 -> bf16 by truncation, unlike the GPU and torch (nearest-even):
# bf16 *outputs* are checked on a GPU only. fp16 goes through numpy and rounds correctly.
ELEMENTWISE_DTYPES = [torch.float32, torch.float64, torch.float16,
                      pytest.param(torch.bfloat16, marks=GPU_ONLY)]


@pytest.mark.skipif(ON_GPU, reason="compiled code may contract a*b + c into an FMA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_interpreter_is_bitwise_the_reference(dtype):
    """Under the interpreter each op is one IEEE operation in the reference's order."""
    x, y, t = rand(4095, dtype, 16), rand(4095, dtype, 17), rand(4095, dtype, 18)
    coeffs = coeffs_for(dtype)
    got_a, got_b, ref_a, ref_b = (torch.empty_like(x) for _ in range(4))
    K.combine(x, y, coeffs, got_a, got_b)
    reference.combine(x, y, coeffs, ref_a, ref_b)
    assert torch.equal(got_a, ref_a) and torch.equal(got_b, ref_b)
    got_t, ref_t = t.clone(), t.clone()
    K.update(got_t, x, y, coeffs)
    reference.update(ref_t, x, y, coeffs)
    assert torch.equal(got_t, ref_t)


@needs_loops
@pytest.mark.parametrize("n", [1, 3 * 1024, 3 * 1024 + 1, 65537])
def test_grid_stride_geometry(n):
    """A capped grid whose programs loop over blocks (the GPU reduce3 shape) on odd sizes."""
    dtype = torch.float32
    x, y, t = rand(n, dtype, 27), rand(n, dtype, 28), rand(n, dtype, 29)
    coeffs = coeffs_for(dtype, (0.9, -0.2, 0.1, 1.0))
    with launch.forced(block=1024, max_programs=3):
        assert launch.plan(n, "reduce", True).loop == (n > 3 * 1024)
        stats = K.reduce3(x, y)
        out_a, out_b = torch.empty_like(x), torch.empty_like(x)
        K.combine(x, y, coeffs, out_a, out_b)
        t_k = t.clone()
        K.update(t_k, x, y, coeffs)
    assert_reduce3_close(x, y, stats)
    (ea, pa, sa), (eb, pb, sb) = combine_expectations(x, y, coeffs)
    assert_elementwise_close("out_a", out_a, ea, pa, sa)
    assert_elementwise_close("out_b", out_b, eb, pb, sb)
    exact, plain, scale = update_expectations(t, x, y, coeffs)
    assert_elementwise_close("theta", t_k, exact, plain, scale)


@pytest.mark.skipif(ON_GPU, reason="CPU tensors only run under the interpreter")
def test_backend_probe_finds_triton_under_the_interpreter():
    backend, why = backends.probe("triton")
    assert backend is not None, why
    assert backend.name == "triton"
    assert (backend.reduce3, backend.combine, backend.update) == (K.reduce3, K.combine, K.update)
    x = rand(10, torch.float32, 31)
    assert_reduce3_close(x, x, backend.reduce3(x, x))


_COMPILE_SCRIPT = r"""
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from ofmu_kernels import elementwise as E, reduce as R

def sig(names, types):
    return dict(zip(names, types))

for dt, acc in (("fp32", "fp32"), ("bf16", "fp32"), ("fp64", "fp64")):
    for loop in (False, True):
        geo = ("i64", "i32", "i32")
        jobs = [
            (R._reduce3_partials_kernel,
             ("x_ptr", "y_ptr", "part_ptr", "n", "num_programs", "iters"),
             ("*" + dt, "*" + dt, "*" + acc) + geo,
             {"BLOCK": 4096, "HAS_Y": True, "LOOP": loop}),
            (E._combine_kernel,
             ("x_ptr", "y_ptr", "a_ptr", "b_ptr", "coeffs_ptr", "n", "num_programs", "iters"),
             ("*" + dt,) * 4 + ("*" + acc,) + geo,
             {"BLOCK": 2048, "HAS_Y": False, "HAS_B": True, "LOOP": loop}),
            (E._update_kernel,
             ("t_ptr", "x_ptr", "y_ptr", "coeffs_ptr", "n", "num_programs", "iters"),
             ("*" + dt,) * 3 + ("*" + acc,) + geo,
             {"BLOCK": 2048, "HAS_Y": True, "LOOP": loop}),
        ]
        for fn, names, types, consts in jobs:
            s = sig(names, types)
            s.update({k: "constexpr" for k in consts})
            compile(ASTSource(fn, s, consts), target=GPUTarget("cuda", 90, 32),
                    options={"num_warps": 8})
compile(ASTSource(R._reduce3_finalize_kernel,
                  {"part_ptr": "*fp32", "out_ptr": "*fp32", "num_partials": "i32",
                   "BLOCK_P": "constexpr"}, {"BLOCK_P": 1024}),
        target=GPUTarget("cuda", 90, 32))
print("compiled")
"""


@pytest.mark.skipif(ON_GPU, reason="on a GPU every other test compiles the kernels")
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter is lenient about types; the real compiler (to an sm_90 cubin) is not."""
    import os
    import subprocess
    import sys

    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this triton has no offline compile API ({e})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=300)
    if "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("triton wheel without ptxas")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


@GPU_ONLY
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_gpu_reduce3_deterministic_large(dtype):
    n = 2**26 + 3  # many blocks per program (the looping path)
    x, y = rand(n, dtype, 32), rand(n, dtype, 33)
    assert launch.plan(n, "reduce", False).loop
    first = K.reduce3(x, y)
    for _ in range(3):
        assert torch.equal(K.reduce3(x, y), first)
    # The references stay on the device: a host-side math.fsum over 2**26 elements takes ~15 s
    # per sum, minutes for this test, which would blow gpu_check.sh's time limits.
    if dtype != torch.float64:
        # fp32/bf16 products are exact in float64, and a float64 sum of 2**26 of them is ~1e-14
        # of the scale off at worst: exact for an fp32 result.
        xd, yd = x.double(), y.double()
        exact = [float((xd * yd).sum()), float((xd * xd).sum()), float((yd * yd).sum())]
        assert_reduce3_close(x, y, first, exact=exact)
        return
    # float64: multiples of 2**-10 up to 1 in magnitude; every product is a multiple of 2**-20
    # and every partial sum stays below 2**26, so any summation order is exact and the kernel
    # must return the integer sums bit for bit -- every element counted exactly once.
    g = torch.Generator(device=DEV).manual_seed(34)
    kx = torch.randint(-1024, 1025, (n,), generator=g, device=DEV)
    ky = torch.randint(-1024, 1025, (n,), generator=g, device=DEV)
    got = K.reduce3(kx.double() / 1024, ky.double() / 1024)
    want = [int((a * b).sum()) / 2**20 for a, b in ((kx, ky), (kx, kx), (ky, ky))]
    assert got.tolist() == want


@GPU_ONLY
def test_gpu_64bit_offsets():
    """Elements past 2**31 are reached (int32 offsets would wrap)."""
    n = 2**31 + 5000
    if torch.cuda.mem_get_info()[0] < 4 * n * 2 + 2**30:
        pytest.skip("needs ~18 GB of free GPU memory")
    x = torch.zeros(n, dtype=torch.float16, device=DEV)
    x[-1] = 2.0
    assert K.reduce3(x, None).tolist() == [0.0, 4.0, 0.0]
    out = torch.zeros_like(x)
    K.combine(x, None, coeffs_for(torch.float16, (1.5, 0.0, 0.0, 0.0)), out)
    assert out[-1].item() == 3.0 and out[-5000:-1].abs().sum().item() == 0
    theta = torch.zeros_like(x)
    K.update(theta, x, None, coeffs_for(torch.float16, (1.0, 1.0, 0.0, 1.0)))
    assert theta[-1].item() == 2.0 and theta[:-1].abs().sum().item() == 0

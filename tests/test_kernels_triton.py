"""The Triton kernels (``ofmu_kernels``) against the float64 reference of ``ofmu.functional``.

Without a GPU these run on CPU tensors under ``TRITON_INTERPRET=1`` (set by conftest.py), so
the kernel source -- masks, offsets, dtype handling, the two-stage reduction -- is exercised in
CPU CI. Tests marked ``gpu`` cover what the interpreter cannot show: bf16 rounding (the
interpreter truncates fp32 -> bf16), determinism of compiled code, 64-bit offsets past 2**31.

Tolerance rule (flash-attention's): the kernel's error against an exact/float64 reference is at
most twice the error of the plain torch reference at the same precision, plus a slack of one
epsilon relative to the *scale* of the quantity (``|x||y|`` for a dot product, ``|c0 x| + |c1 y|``
for an element), never relative to the result itself.
"""

from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton")

from ofmu import backends  # noqa: E402
from ofmu import functional as F  # noqa: E402

import ofmu_kernels as K  # noqa: E402
from ofmu_kernels import launch  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if ON_GPU else "cpu")
GPU_ONLY = pytest.mark.gpu

BIG = 2**20 + 7  # reduce3 only: a few hundred ms under the interpreter
SIZES = (1, 3, 4095, 65537)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def rand(n: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, generator=g, dtype=torch.float64)).to(dtype).to(DEV)


def coeffs_for(dtype: torch.dtype, values=(0.75, -1.3, 2.2, 0.9)) -> torch.Tensor:
    return torch.tensor(values, dtype=F.acc_dtype(dtype), device=DEV)


def exact_dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """Correctly rounded sum of float64 products (exact products for fp32/bf16/fp16 data)."""
    return math.fsum((a.double() * b.double()).cpu().tolist())


def assert_reduce3_close(x: torch.Tensor, y: torch.Tensor | None, got: torch.Tensor,
                         exact: list[float] | None = None) -> None:
    """``exact`` defaults to correctly rounded host sums (``math.fsum``: slow past ~1e7 elements)."""
    ref_y = torch.zeros_like(x) if y is None else y
    if exact is None:
        exact = [exact_dot(x, ref_y), exact_dot(x, x), exact_dot(ref_y, ref_y)]
    plain = F.reduce3(x, y).double().cpu().tolist()  # torch in the same precision
    nx, ny = math.sqrt(exact[1]), math.sqrt(exact[2])
    scales = [nx * ny, exact[1], exact[2]]
    eps = torch.finfo(F.acc_dtype(x.dtype)).eps
    for k, (g, e, p, s) in enumerate(zip(got.double().cpu().tolist(), exact, plain, scales)):
        err, err_plain = abs(g - e), abs(p - e)
        assert err <= 2 * err_plain + eps * s, (
            f"stat {k}: kernel {g!r}, exact {e!r}, torch {p!r} (scale {s:.3g})")


def assert_elementwise_close(got: torch.Tensor, exact: torch.Tensor, plain: torch.Tensor,
                             scale: torch.Tensor) -> None:
    """Per element: ``|got - exact| <= 2 |plain - exact| + eps(dtype) * scale``."""
    eps = torch.finfo(got.dtype).eps
    err = (got.double() - exact).abs()
    bound = 2 * (plain.double() - exact).abs() + eps * scale
    bad = err > bound
    assert not bad.any(), (
        f"{int(bad.sum())} elements off; worst at {int((err - bound).argmax())}: "
        f"got {got[(err - bound).argmax()].item()!r} exact {exact[(err - bound).argmax()].item()!r}")


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


# ------------------------------------------------------------------------------------------
# reduce3
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", SIZES + (BIG,))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_reduce3_matches_reference(n, dtype):
    x, y = rand(n, dtype, 1), rand(n, dtype, 2, scale=3.0)
    out = K.reduce3(x, y)
    assert out.shape == (3,) and out.dtype == F.acc_dtype(dtype) and out.device == x.device
    assert_reduce3_close(x, y, out)


@pytest.mark.parametrize("n", (3, 4095, 65537))
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_reduce3_half_inputs_accumulate_in_fp32(n, dtype):
    x, y = rand(n, dtype, 3, scale=10.0), rand(n, dtype, 4)
    out = K.reduce3(x, y)
    assert out.dtype == torch.float32
    assert_reduce3_close(x, y, out)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_reduce3_without_y(dtype):
    x = rand(4095, dtype, 5)
    out = K.reduce3(x, None)
    assert out[0].item() == 0 and out[2].item() == 0
    assert_reduce3_close(x, None, out)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_reduce3_structured_inputs(dtype):
    n = 65537
    zero = torch.zeros(n, dtype=dtype, device=DEV)
    assert K.reduce3(zero, zero).tolist() == [0.0, 0.0, 0.0]

    x = rand(n, dtype, 6)
    # Anti-parallel: x*(-x) is exactly -(x*x), summed in the same fixed order.
    s = K.reduce3(x, -x)
    assert s[0].item() == -s[1].item() and s[1].item() == s[2].item()
    assert_reduce3_close(x, -x, s)
    s = K.reduce3(x, x)
    assert s[0].item() == s[1].item() == s[2].item()

    # Orthogonal with exactly representable sums: (1, 1) against (1, -1), repeated.
    ones = torch.ones(n - 1, dtype=dtype, device=DEV)
    alt = ones.clone()
    alt[1::2] = -1
    assert K.reduce3(ones, alt).tolist() == [0.0, n - 1.0, n - 1.0]
    # Disjoint supports.
    a, b = x.clone(), x.clone()
    a[n // 2:] = 0
    b[: n // 2] = 0
    s = K.reduce3(a, b)
    assert s[0].item() == 0.0
    assert_reduce3_close(a, b, s)


def test_reduce3_empty():
    x = torch.empty(0, device=DEV)
    assert K.reduce3(x, x).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_reduce3_non_finite(bad, dtype):
    x, y = rand(4095, dtype, 7), rand(4095, dtype, 8)
    x[100] = bad
    y[4094] = bad
    got = K.reduce3(x, y).double().cpu()
    ref = F.reduce3(x.double(), y.double()).cpu()
    for g, r in zip(got.tolist(), ref.tolist()):
        if math.isnan(r):
            assert math.isnan(g)
        else:
            assert g == r  # +-inf, same sign


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_reduce3_bitwise_reproducible(dtype):
    x, y = rand(BIG, dtype, 9), rand(BIG, dtype, 10)
    first = K.reduce3(x, y)
    assert torch.equal(first, K.reduce3(x, y))
    assert torch.equal(first, K.reduce3(x.clone(), y.clone()))


# ------------------------------------------------------------------------------------------
# combine
# ------------------------------------------------------------------------------------------


def combine_expectations(x, y, coeffs):
    """Exact (float64) and plain-torch (same precision) results plus per-element scales."""
    xd = x.double()
    yd = torch.zeros_like(xd) if y is None else y.double()
    c = coeffs.double()
    exact_a, exact_b = c[0] * xd + c[1] * yd, c[2] * xd + c[3] * yd
    plain_a, plain_b = torch.empty_like(x), torch.empty_like(x)
    F.combine(x, y, coeffs, plain_a, plain_b)
    scale_a = (c[0] * xd).abs() + (c[1] * yd).abs()
    scale_b = (c[2] * xd).abs() + (c[3] * yd).abs()
    return (exact_a, plain_a, scale_a), (exact_b, plain_b, scale_b)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
def test_combine_matches_reference(n, dtype):
    x, y = rand(n, dtype, 11), rand(n, dtype, 12, scale=0.01)
    coeffs = coeffs_for(dtype)
    (ea, pa, sa), (eb, pb, sb) = combine_expectations(x, y, coeffs)
    out_a, out_b = torch.empty_like(x), torch.empty_like(x)
    K.combine(x, y, coeffs, out_a, out_b)
    assert_elementwise_close(out_a, ea, pa, sa)
    assert_elementwise_close(out_b, eb, pb, sb)

    only_a = torch.full_like(x, 7.0)
    K.combine(x, y, coeffs, only_a)
    assert torch.equal(only_a, out_a)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_combine_without_y(dtype):
    x = rand(4095, dtype, 13)
    coeffs = coeffs_for(dtype)
    (ea, pa, sa), (eb, pb, sb) = combine_expectations(x, None, coeffs)
    out_a, out_b = torch.empty_like(x), torch.empty_like(x)
    K.combine(x, None, coeffs, out_a, out_b)
    assert_elementwise_close(out_a, ea, pa, sa)
    assert_elementwise_close(out_b, eb, pb, sb)


@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
def test_combine_outputs_may_alias_inputs(dtype):
    n = 65537
    x0, y0 = rand(n, dtype, 14), rand(n, dtype, 15)
    coeffs = coeffs_for(dtype)
    want_a, want_b = torch.empty_like(x0), torch.empty_like(x0)
    K.combine(x0, y0, coeffs, want_a, want_b)

    x, y = x0.clone(), y0.clone()
    K.combine(x, y, coeffs, x, y)  # out_a = x, out_b = y
    assert torch.equal(x, want_a) and torch.equal(y, want_b)
    x, y = x0.clone(), y0.clone()
    K.combine(x, y, coeffs, y, x)  # crossed
    assert torch.equal(y, want_a) and torch.equal(x, want_b)
    x = x0.clone()
    K.combine(x, y0, coeffs, x)  # out_a only, aliasing x
    assert torch.equal(x, want_a)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("with_y", [True, False])
def test_combine_non_finite_like_reference(with_y):
    """inf/nan propagate as in the reference; a missing y is zero (``c1*0``), not ``x*0``."""
    dtype = torch.float32
    x = rand(1000, dtype, 33)
    x[:3] = torch.tensor([math.inf, -math.inf, math.nan])
    y = rand(1000, dtype, 34) if with_y else None
    if with_y:
        y[500] = math.inf
    for coeffs in (coeffs_for(dtype), coeffs_for(dtype, (1.0, math.inf, 0.0, math.nan))):
        got_a, got_b, ref_a, ref_b = (torch.empty_like(x) for _ in range(4))
        K.combine(x, y, coeffs, got_a, got_b)
        F.combine(x, y, coeffs, ref_a, ref_b)
        for got, ref in ((got_a, ref_a), (got_b, ref_b)):
            assert torch.equal(got.isnan(), ref.isnan())
            assert torch.equal(got.isinf(), ref.isinf())
            assert torch.equal(got[ref.isinf()], ref[ref.isinf()])  # same signs


@pytest.mark.skipif(ON_GPU, reason="compiled code may contract a*b + c into an FMA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_interpreter_is_bitwise_the_reference(dtype):
    """Under the interpreter each op is one IEEE operation in the reference's order."""
    x, y, t = rand(4095, dtype, 16), rand(4095, dtype, 17), rand(4095, dtype, 18)
    coeffs = coeffs_for(dtype)
    got_a, got_b, ref_a, ref_b = (torch.empty_like(x) for _ in range(4))
    K.combine(x, y, coeffs, got_a, got_b)
    F.combine(x, y, coeffs, ref_a, ref_b)
    assert torch.equal(got_a, ref_a) and torch.equal(got_b, ref_b)
    got_t, ref_t = t.clone(), t.clone()
    K.update(got_t, x, y, coeffs)
    F.update(ref_t, x, y, coeffs)
    assert torch.equal(got_t, ref_t)


# ------------------------------------------------------------------------------------------
# update
# ------------------------------------------------------------------------------------------


def update_expectations(theta, x, y, coeffs):
    c = coeffs.double()
    exact = c[0] * theta.double() + c[1] * x.double()
    scale = (c[0] * theta.double()).abs() + (c[1] * x.double()).abs()
    if y is not None:
        exact = exact + c[2] * y.double()
        scale = scale + (c[2] * y.double()).abs()
    plain = theta.clone()
    F.update(plain, x, y, coeffs)
    return exact, plain, scale


@pytest.mark.parametrize("with_y", [True, False])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
def test_update_matches_reference(n, dtype, with_y):
    theta, x = rand(n, dtype, 19), rand(n, dtype, 20, scale=0.1)
    y = rand(n, dtype, 21, scale=0.05) if with_y else None
    coeffs = coeffs_for(dtype, (0.999, -0.01, 0.003, 1.0))
    exact, plain, scale = update_expectations(theta, x, y, coeffs)
    K.update(theta, x, y, coeffs)
    assert_elementwise_close(theta, exact, plain, scale)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_update_skipped_leaves_theta_bitwise_untouched(dtype):
    n = 4099
    theta = rand(n, dtype, 22)
    theta[:4] = torch.tensor([math.nan, math.inf, -math.inf, -0.0], dtype=dtype)
    if dtype == torch.float32:  # a NaN payload that any rewrite through arithmetic could lose
        theta.view(torch.int32)[4] = 0x7FA00001
    x, y = rand(n, dtype, 23), rand(n, dtype, 24)
    x[7] = math.nan
    before = theta.clone()
    for c in [(0.5, 1.0, 1.0, 0.0), (math.nan, math.inf, math.nan, 0.0)]:
        K.update(theta, x, y, coeffs_for(dtype, c))
        K.update(theta, x, None, coeffs_for(dtype, c))
    bits = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16}
    assert torch.equal(theta.view(bits[dtype]), before.view(bits[dtype]))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_update_nan_flag_is_not_a_skip():
    """Only an exact zero skips (``nan != 0``), as in the reference."""
    theta, x = rand(100, torch.float32, 25), rand(100, torch.float32, 26)
    coeffs = coeffs_for(torch.float32, (1.0, 0.5, 0.0, math.nan))
    want = theta.clone()
    F.update(want, x, None, coeffs)
    K.update(theta, x, None, coeffs)
    assert torch.equal(theta, want)


# ------------------------------------------------------------------------------------------
# the looping (GPU) geometry, run wherever possible; empty buffers; argument checks
# ------------------------------------------------------------------------------------------


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
    assert_elementwise_close(out_a, ea, pa, sa)
    assert_elementwise_close(out_b, eb, pb, sb)
    exact, plain, scale = update_expectations(t, x, y, coeffs)
    assert_elementwise_close(t_k, exact, plain, scale)


def test_empty_buffers_are_no_ops():
    e = torch.empty(0, device=DEV)
    c = coeffs_for(torch.float32)
    K.combine(e, e, c, e, e)
    K.update(e, e, None, c)


def test_argument_errors_name_the_argument():
    x = rand(64, torch.float32, 30)
    c = coeffs_for(torch.float32)
    cases = [
        (lambda: K.reduce3(x[::2], None), "x must be contiguous"),
        (lambda: K.reduce3(x.view(8, 8), None), "x must be 1-D"),
        (lambda: K.reduce3(x, x[:63]), "y has 63 elements"),
        (lambda: K.reduce3(x, x.double()), "y has dtype"),
        (lambda: K.reduce3(x.int(), None), "x must be one of"),
        (lambda: K.combine(x, x, c, x[:32]), "out_a has 32 elements"),
        (lambda: K.combine(x, x, c, x, x.half()), "out_b has dtype"),
        (lambda: K.combine(x, None, c[:2], x), "coeffs must have shape"),
        (lambda: K.combine(x, None, 0.5, x), "coeffs must be a torch.Tensor"),
        (lambda: K.update(x, x, None, c.half()), "coeffs must be float32 or float64"),
        (lambda: K.update(x, x, x[::2].contiguous(), c), "y has 32 elements"),
        (lambda: K.update(x, x[:3], None, c), r"x has 3 elements, expected 64 \(as theta\)"),
        (lambda: K.update(x.view(8, 8), x, None, c), "theta must be 1-D"),
        (lambda: K.update(x, torch.zeros(64, 2, device=DEV)[:, 0], None, c),
         "x must be contiguous"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


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


# ------------------------------------------------------------------------------------------
# GPU only
# ------------------------------------------------------------------------------------------


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

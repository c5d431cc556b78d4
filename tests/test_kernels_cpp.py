"""The C++ ops of ``ofmu._C`` (CPU kernels and Meta/fake kernels) against the kernel contract.

Reference: :mod:`ofmu.functional` run on float64 copies of the inputs. Tolerance rule (as in
flash-attention's tests): the kernel's error against that reference is at most twice the error
of the plain torch reference run in the buffers' own dtype, plus a slack relative to the scale
of the quantity (``|x||y|`` for a dot product, ``|c0 x| + |c1 y|`` per element for ``combine``),
never relative to the result itself (a dot product of orthogonal vectors is ~0).

The helpers take the device from the tensors, so tests/test_kernels_gpu.py reuses them.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("ofmu._C", reason="ofmu._C is not built (pip install -e . --no-build-isolation)")

from ofmu import functional as F  # noqa: E402

ops = torch.ops.ofmu

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SIZES = [1, 3, 4095, 65537, 2**20 + 7]
KINDS = ["random", "zero", "orthogonal", "antiparallel"]

# Slack of the reductions, in units of the accumulation dtype's eps times the scale.
REDUCE_SLACK_EPS = 32
# Slack of the elementwise ops, in units of the buffer dtype's eps times the per-element scale
# (one rounding of the result may land on the other side of a tie from torch's).
ELEM_SLACK_EPS = 2


def make_pair(n: int, dtype: torch.dtype, kind: str, device="cpu", seed: int = 0):
    """``(x, y)`` of length n in ``dtype``; the relation between them is set in float64."""
    g = torch.Generator().manual_seed(seed + n)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    if kind == "zero":
        x.zero_()
        y.zero_()
    elif kind == "orthogonal" and n > 1:
        y = y - (y @ x) / (x @ x) * x
    elif kind == "antiparallel":
        y = -2.5 * x
    return x.to(dtype).to(device), y.to(dtype).to(device)


def make_coeffs(dtype: torch.dtype, device="cpu", c3: float = 0.4) -> torch.Tensor:
    return torch.tensor([0.7, -1.3, 2.1, c3], dtype=F.acc_dtype(dtype), device=device)


def bits(t: torch.Tensor) -> torch.Tensor:
    """An integer view, so that bitwise comparisons also hold for NaNs and signed zeros."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits(a), bits(b)), "results differ bitwise"


def _f64(t):
    return None if t is None else t.double()


def reference_reduce3(x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """float64 ``[<x,y>, |x|^2, |y|^2]``.

    For fp32/bf16/fp16 inputs this is :func:`ofmu.functional.reduce3` on float64 copies (products
    exact, sums ~1e-16 relative: exact for our purpose). For float64 inputs that would be the very
    computation under test, so the sums are taken with ``math.fsum`` (correctly rounded sums of
    the float64 products) instead.
    """
    if x.dtype != torch.float64:
        return F.reduce3(x.double(), _f64(y)).cpu()
    xs = x.cpu()
    ys = y.cpu() if y is not None else None
    xy = math.fsum((xs * ys).tolist()) if ys is not None else 0.0
    yy = math.fsum((ys * ys).tolist()) if ys is not None else 0.0
    return torch.tensor([xy, math.fsum((xs * xs).tolist()), yy], dtype=torch.float64)


def check_reduce3(x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    got = ops.reduce3(x, y)
    acc = F.acc_dtype(x.dtype)
    assert got.dtype == acc and got.shape == (3,) and got.device == x.device
    ref = reference_reduce3(x, y)
    plain = F.reduce3(x, y).double().cpu()
    got64 = got.double().cpu()
    nx, ny = math.sqrt(ref[1]), math.sqrt(ref[2])
    scale = torch.tensor([nx * ny, nx * nx, ny * ny], dtype=torch.float64)
    slack = REDUCE_SLACK_EPS * torch.finfo(acc).eps * scale + 1e-300
    err, err_t = (got64 - ref).abs(), (plain - ref).abs()
    assert (err <= 2 * err_t + slack).all(), (
        f"reduce3 error {err.tolist()} vs torch {err_t.tolist()}, slack {slack.tolist()}")
    return got


def _elem_check(name, got, plain, ref, scale, dtype):
    err = (got.double() - ref).abs().max().item()
    err_t = (plain.double() - ref).abs().max().item()
    slack = ELEM_SLACK_EPS * torch.finfo(dtype).eps * scale.max().item()
    assert err <= 2 * err_t + slack, f"{name}: error {err} vs torch {err_t}, slack {slack}"


def check_combine(x, y, coeffs, with_b=True):
    a = torch.empty_like(x)
    b = torch.empty_like(x) if with_b else None
    ops.combine(x, y, coeffs, a, b)
    c64 = coeffs.double()
    a64 = torch.empty_like(x, dtype=torch.float64)
    b64 = torch.empty_like(a64) if with_b else None
    F.combine(x.double(), _f64(y), c64, a64, b64)
    pa, pb = torch.empty_like(x), torch.empty_like(x) if with_b else None
    F.combine(x, y, coeffs, pa, pb)
    ax, ay = x.double().abs(), (y.double().abs() if y is not None else torch.zeros_like(a64))
    _elem_check("out_a", a, pa, a64, c64[0].abs() * ax + c64[1].abs() * ay, x.dtype)
    if with_b:
        _elem_check("out_b", b, pb, b64, c64[2].abs() * ax + c64[3].abs() * ay, x.dtype)
    return a, b


def check_update(theta, x, y, coeffs):
    t = theta.clone()
    ops.update(t, x, y, coeffs)
    c64 = coeffs.double()
    t64 = theta.to(torch.float64, copy=True)  # .double() would alias a float64 theta
    F.update(t64, x.double(), _f64(y), c64)
    tp = theta.clone()
    F.update(tp, x, y, coeffs)
    scale = c64[0].abs() * theta.double().abs() + c64[1].abs() * x.double().abs()
    if y is not None:
        scale = scale + c64[2].abs() * y.double().abs()
    _elem_check("theta", t, tp, t64, scale, theta.dtype)
    return t


# ---------------------------------------------------------------------------------------------
# Accuracy against the float64 reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_reduce3_random(n, dtype):
    x, y = make_pair(n, dtype, "random")
    check_reduce3(x, y)
    s = check_reduce3(x, None)
    assert s[0] == 0 and s[2] == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS[1:])
@pytest.mark.parametrize("n", [3, 65537])
def test_reduce3_special(n, kind, dtype):
    x, y = make_pair(n, dtype, kind)
    s = check_reduce3(x, y)
    if kind == "zero":
        assert s.tolist() == [0.0, 0.0, 0.0]


def test_reduce3_empty():
    x = torch.empty(0)
    assert ops.reduce3(x, x).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_combine(n, dtype):
    x, y = make_pair(n, dtype, "random")
    c = make_coeffs(dtype)
    check_combine(x, y, c)
    check_combine(x, y, c, with_b=False)
    check_combine(x, None, c)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS[1:])
def test_combine_special(kind, dtype):
    x, y = make_pair(4095, dtype, kind)
    check_combine(x, y, make_coeffs(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_update(n, dtype):
    theta, _ = make_pair(n, dtype, "random", seed=1)
    x, y = make_pair(n, dtype, "random")
    c = make_coeffs(dtype)
    check_update(theta, x, y, c)
    check_update(theta, x, None, c)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS[1:])
def test_update_special(kind, dtype):
    theta, _ = make_pair(4095, dtype, "random", seed=1)
    x, y = make_pair(4095, dtype, kind)
    check_update(theta, x, y, make_coeffs(dtype))


# ---------------------------------------------------------------------------------------------
# Aliasing, optional y, non-finite inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [3, 65537])
@pytest.mark.parametrize("alias", ["a=x,b=y", "a=y,b=x", "a=x", "b=y", "a=x,no b"])
def test_combine_aliasing(n, dtype, alias):
    x, y = make_pair(n, dtype, "random")
    c = make_coeffs(dtype)
    with_b = alias != "a=x,no b"
    want_a, want_b = torch.empty_like(x), torch.empty_like(x) if with_b else None
    ops.combine(x, y, c, want_a, want_b)  # no aliasing
    xs, ys = x.clone(), y.clone()
    a = {"a=x,b=y": xs, "a=y,b=x": ys, "a=x": xs, "b=y": torch.empty_like(x), "a=x,no b": xs}[alias]
    b = {"a=x,b=y": ys, "a=y,b=x": xs, "a=x": torch.empty_like(x), "b=y": ys, "a=x,no b": None}[alias]
    ops.combine(xs, ys, c, a, b)
    assert_bitwise_equal(a, want_a)
    if with_b:
        assert_bitwise_equal(b, want_b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_update_alias_theta_x(dtype):
    # theta may also be one of the inputs (e.g. a decay-only step on a scratch buffer).
    x, y = make_pair(4095, dtype, "random")
    c = make_coeffs(dtype)
    want = x.clone()
    ops.update(want, x.clone(), y, c)
    t = x.clone()
    ops.update(t, t, y, c)
    assert_bitwise_equal(t, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_reduce3_nonfinite(dtype, bad):
    x, y = make_pair(65537, dtype, "random")
    x[12345] = bad
    s = ops.reduce3(x, y)
    assert not torch.isfinite(s[0]) and not torch.isfinite(s[1]) and torch.isfinite(s[2])
    assert not torch.isfinite(ops.reduce3(x, None)[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 4095, 65537])
def test_update_skip_leaves_theta_bitwise(dtype, n):
    theta, _ = make_pair(n, dtype, "random", seed=1)
    theta[0] = float("nan")  # NaN payloads and signed zeros must survive untouched as well
    if n > 1:
        theta[1] = -0.0
    x, y = make_pair(n, dtype, "random")
    x[0] = float("inf")
    y[-1] = float("nan")
    before = theta.clone()
    ops.update(theta, x, y, make_coeffs(dtype, c3=0.0))
    assert_bitwise_equal(theta, before)
    ops.update(theta, x, None, make_coeffs(dtype, c3=-0.0))
    assert_bitwise_equal(theta, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_update_nan_flag_matches_reference(dtype):
    # The reference skips only on c3 == 0; a NaN flag is "not zero", so the step is applied.
    theta, _ = make_pair(4095, dtype, "random", seed=1)
    x, y = make_pair(4095, dtype, "random")
    t = check_update(theta, x, y, make_coeffs(dtype, c3=float("nan")))
    assert not torch.equal(t, theta)


def test_combine_out_b_defaults_to_none():
    # The schema mirrors the contract's signature combine(x, y, coeffs, out_a, out_b=None).
    x, y = make_pair(33, torch.float32, "random")
    c = make_coeffs(torch.float32)
    a, want = torch.empty_like(x), torch.empty_like(x)
    ops.combine(x, y, c, a)
    ops.combine(x, y, c, want, None)
    assert_bitwise_equal(a, want)


def test_combine_without_y_keeps_reference_semantics():
    # With y=None the reference computes c1 * 0: a non-finite c1 gives NaN, a finite one c0*x.
    x, _ = make_pair(4095, torch.float32, "random")
    a, want = torch.empty_like(x), torch.empty_like(x)
    c = torch.tensor([0.5, float("inf"), 1.0, 2.0])
    ops.combine(x, None, c, a, None)
    F.combine(x, None, c, want, None)
    assert torch.isnan(a).all() and torch.isnan(want).all()


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_deterministic_across_runs_and_threads(dtype, restore_threads):
    n = 2**20 + 7
    x, y = make_pair(n, dtype, "random")
    theta, _ = make_pair(n, dtype, "random", seed=1)
    c = make_coeffs(dtype)

    def run():
        s = ops.reduce3(x, y)
        a, b = torch.empty_like(x), torch.empty_like(x)
        ops.combine(x, y, c, a, b)
        t = theta.clone()
        ops.update(t, a, b, c)
        return s, a, b, t

    torch.set_num_threads(1)
    first = run()
    again = run()
    torch.set_num_threads(2)
    two = run()
    for r1, r2, r3 in zip(first, again, two):
        assert_bitwise_equal(r1, r2)
        assert_bitwise_equal(r1, r3)


# ---------------------------------------------------------------------------------------------
# Meta / fake tensors (what torch.compile traces with)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_meta_tensors(dtype):
    x = torch.empty(1000, dtype=dtype, device="meta")
    s = ops.reduce3(x, x)
    assert s.device.type == "meta" and s.shape == (3,) and s.dtype == F.acc_dtype(dtype)
    c = torch.empty(4, dtype=F.acc_dtype(dtype), device="meta")
    assert ops.combine(x, x, c, x, None) is None
    assert ops.update(x, x, None, c) is None
    with pytest.raises(RuntimeError, match="`y` has 999 elements"):
        ops.reduce3(x, torch.empty(999, dtype=dtype, device="meta"))


def test_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4097, dtype=torch.bfloat16)
        c = torch.empty(4, dtype=torch.float32)
        s = ops.reduce3(x, None)
        assert s.shape == (3,) and s.dtype == torch.float32
        ops.combine(x, x, c, x, x)
        ops.update(x, x, x, c)
        with pytest.raises(RuntimeError, match="`coeffs` must have dtype Float"):
            ops.update(x, x, None, c.to(torch.bfloat16))


@pytest.mark.parametrize("op", ["reduce3", "combine", "update"])
def test_opcheck(op):
    x, y = make_pair(1027, torch.float32, "random")
    c = make_coeffs(torch.float32)
    args = {
        "reduce3": (x, y),
        "combine": (x, y, c, torch.empty_like(x), torch.empty_like(x)),
        "update": (x.clone(), x, y, c),
    }[op]
    # schema (mutations declared), fake/meta kernel, and AOT dispatch (functionalisation).
    torch.library.opcheck(getattr(ops, op).default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_torch_compile_traces_through():
    x, y = make_pair(4099, torch.float32, "random")
    c = make_coeffs(torch.float32)

    def step(theta, x, y, c):
        s = ops.reduce3(x, y)
        a = torch.empty_like(x)
        ops.combine(x, y, c * s[1].sign(), a, None)
        ops.update(theta, a, y, c)
        return s

    t_eager, t_comp = x.clone(), x.clone()
    s_eager = step(t_eager, x, y, c)
    s_comp = torch.compile(step, backend="aot_eager", fullgraph=True)(t_comp, x, y, c)
    assert_bitwise_equal(s_comp, s_eager)
    assert_bitwise_equal(t_comp, t_eager)


# ---------------------------------------------------------------------------------------------
# Argument checks: readable errors naming the argument
# ---------------------------------------------------------------------------------------------


def test_errors_name_the_argument():
    x = torch.randn(10)
    c = make_coeffs(torch.float32)
    out = torch.empty(10)
    cases = [
        (lambda: ops.reduce3(x.view(2, 5), None), r"`x` must be 1-D"),
        (lambda: ops.reduce3(torch.randn(20)[::2], None), r"`x` must be contiguous"),
        (lambda: ops.reduce3(x, torch.randn(11)), r"`y` has 11 elements but `x` has 10"),
        (lambda: ops.reduce3(x, x.double()), r"`y` has dtype Double but `x` has dtype Float"),
        (lambda: ops.reduce3(torch.arange(10), None), r"`x` must be float32, float64"),
        (lambda: ops.combine(x, x, c, torch.empty(9), None), r"`out_a` has 9 elements"),
        (lambda: ops.combine(x, x, c, out, torch.empty(10).half()), r"`out_b` has dtype Half"),
        (lambda: ops.combine(x, None, c.double(), out, None), r"`coeffs` must have dtype Float"),
        (lambda: ops.combine(x, None, c[:3], out, None), r"`coeffs` must be a 1-D tensor of 4"),
        (lambda: ops.update(x.bfloat16(), x.bfloat16(), None, c.bfloat16()),
         r"`coeffs` must have dtype Float"),
        (lambda: ops.update(x, x, torch.randn(10, 1), c), r"`y` must be 1-D"),
        (lambda: ops.update(x, torch.randn(3), None, c), r"`x` has 3 elements but `theta` has 10"),
    ]
    for fn, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            fn()


def test_cpu_kernels_registered():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("ofmu::reduce3", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("ofmu::combine", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("ofmu::update", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("ofmu::update", "Meta")


# ---------------------------------------------------------------------------------------------
# bf16/fp16 fast path (AVX2 + F16C, chosen at run time) against the portable loops
# ---------------------------------------------------------------------------------------------

# Sizes around the vector width (8), the reduction block (1024) and the fp16 reduction's groups
# of 8 blocks, plus a multi-threaded one.
FAST_SIZES = [1, 7, 8, 9, 17, 1023, 1025, 8 * 1024, 8 * 1024 + 3, 9 * 1024 + 5, 2**17 + 8 * 1024 + 1]


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
    b = t.view(torch.int16)
    b[(m >= 0.07) & (m < 0.08)] = 0x7C01 if dtype == torch.float16 else 0x7F81  # signalling
    b[(m >= 0.08) & (m < 0.09)] = -1  # 0xFFFF: negative NaN, full payload
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
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
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
        c = torch.tensor(cl)

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

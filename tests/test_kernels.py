"""The kernel contract (``reduce3``, ``combine``, ``update``, ``finalize``; see ``ofmu.reference``),
one test body for every backend.

Each test runs over (backend, device): the C++ ops of ``ofmu._C`` on CPU, the Triton kernels on
CPU tensors under ``TRITON_INTERPRET=1`` (conftest.py sets it when no GPU is visible), and the
CUDA ops and compiled Triton kernels on a GPU (marked ``gpu``, skipped without one). References
and the tolerance rule are in tests/_kernels.py. Backend-specific cases live elsewhere: the AVX2
fast path in test_kernels_cpp.py, Triton launch geometry and the interpreter in
test_kernels_triton.py, CUDA graphs, misaligned pointers and indices past 2**31 in
test_kernels_gpu.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from _kernels import (
    BACKEND_PARAMS,
    BIG,
    DTYPES,
    KINDS,
    OPS_PARAMS,
    SIZES,
    assert_bitwise_equal,
    assert_reduce3_close,
    bits,
    check_combine,
    check_reduce3,
    check_update,
    make_backend,
    make_coeffs,
    make_pair,
)
from ofmu import reference as R


@pytest.fixture(params=BACKEND_PARAMS)
def kb(request):
    return make_backend(request.param)


@pytest.fixture(params=OPS_PARAMS)
def ops_kb(request):
    """The torch ops of ``ofmu._C`` only (cpp, cuda): schema, fake tensors, torch.compile."""
    return make_backend(request.param)


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# Coefficient sets: "unit" (every term of size ~1) and "step" (an optimizer-like step: a small
# gradient term on a large theta), with the input scales that go with them.
SETUPS = {
    "unit": dict(combine=(0.7, -1.3, 2.1, 0.4), update=(0.7, -1.3, 2.1, 0.4), sx=1.0, sy=1.0),
    "step": dict(combine=(0.75, -1.3, 2.2, 0.9), update=(0.999, -0.01, 0.003, 1.0), sx=0.1,
                 sy=0.01),
}


# ---------------------------------------------------------------------------------------------
# reduce3
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_reduce3_random(kb, n, dtype):
    kb.skip_if_slow(n, elementwise=False, dtype=dtype)
    x, y = make_pair(n, dtype, "random", device=kb.device, scale_y=3.0)
    check_reduce3(kb, x, y)
    s = check_reduce3(kb, x, None)
    assert s[0].item() == 0 and s[2].item() == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS[1:])
@pytest.mark.parametrize("n", [3, 65537])
def test_reduce3_special(kb, n, kind, dtype):
    x, y = make_pair(n, dtype, kind, device=kb.device)
    s = check_reduce3(kb, x, y)
    if kind == "zero":
        assert s.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_reduce3_structured_inputs(kb, dtype):
    n = 65537
    x, _ = make_pair(n, dtype, device=kb.device, seed=6)
    # Anti-parallel: x*(-x) is exactly -(x*x), summed in the same fixed order.
    s = kb.ops.reduce3(x, -x)
    assert s[0].item() == -s[1].item() and s[1].item() == s[2].item()
    assert_reduce3_close(x, -x, s, slack_eps=kb.reduce_slack_eps)
    s = kb.ops.reduce3(x, x)
    assert s[0].item() == s[1].item() == s[2].item()
    # Orthogonal with exactly representable sums: (1, 1) against (1, -1), repeated.
    ones = torch.ones(n - 1, dtype=dtype, device=kb.device)
    alt = ones.clone()
    alt[1::2] = -1
    assert kb.ops.reduce3(ones, alt).tolist() == [0.0, n - 1.0, n - 1.0]
    # Disjoint supports: every product is zero.
    a, b = x.clone(), x.clone()
    a[n // 2:] = 0
    b[: n // 2] = 0
    s = kb.ops.reduce3(a, b)
    assert s[0].item() == 0.0
    assert_reduce3_close(a, b, s, slack_eps=kb.reduce_slack_eps)


def test_reduce3_empty(kb):
    x = torch.empty(0, device=kb.device)
    assert kb.ops.reduce3(x, x).tolist() == [0.0, 0.0, 0.0]
    assert kb.ops.reduce3(x, None).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_reduce3_nonfinite(kb, dtype, bad):
    x, y = make_pair(65537, dtype, "random", device=kb.device)
    x[12345] = bad
    s = kb.ops.reduce3(x, y)
    assert not torch.isfinite(s[0]) and not torch.isfinite(s[1]) and torch.isfinite(s[2])
    assert not torch.isfinite(kb.ops.reduce3(x, None)[1])
    # Same non-finite values (inf signs included) as the float64 reference.
    y[4094] = bad
    got = kb.ops.reduce3(x, y).double().cpu()
    ref = R.reduce3(x.double(), y.double()).cpu()
    for g, r in zip(got.tolist(), ref.tolist()):
        assert math.isnan(g) if math.isnan(r) else g == r, (got.tolist(), ref.tolist())


# ---------------------------------------------------------------------------------------------
# combine
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_combine(kb, n, dtype, setup):
    kb.skip_if_slow(n)
    kb.skip_unless_exact_stores(dtype)
    s = SETUPS[setup]
    x, y = make_pair(n, dtype, "random", device=kb.device, scale_y=s["sy"])
    c = make_coeffs(dtype, device=kb.device, values=s["combine"])
    a, _ = check_combine(kb, x, y, c)
    a1, _ = check_combine(kb, x, y, c, with_b=False)
    assert_bitwise_equal(a1, a)  # out_b absent: out_a unchanged
    check_combine(kb, x, None, c)
    only_a = torch.full_like(x, 7.0)
    kb.ops.combine(x, y, c, only_a)  # out_b defaults to None (the contract's signature)
    assert_bitwise_equal(only_a, a)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS[1:])
def test_combine_special(kb, kind, dtype):
    kb.skip_unless_exact_stores(dtype)
    x, y = make_pair(4095, dtype, kind, device=kb.device)
    check_combine(kb, x, y, make_coeffs(dtype, device=kb.device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=str)
@pytest.mark.parametrize("n", [3, 65537, BIG])
@pytest.mark.parametrize("alias", ["a=x,b=y", "a=y,b=x", "a=x", "b=y", "a=x,no b"])
def test_combine_aliasing(kb, n, dtype, alias):
    # Bitwise equal to the same backend's non-aliased result (so bf16 runs in the interpreter).
    kb.skip_if_slow(n)
    x, y = make_pair(n, dtype, "random", device=kb.device)
    c = make_coeffs(dtype, device=kb.device)
    with_b = alias != "a=x,no b"
    want_a, want_b = torch.empty_like(x), torch.empty_like(x) if with_b else None
    kb.ops.combine(x, y, c, want_a, want_b)  # no aliasing
    xs, ys = x.clone(), y.clone()
    a = {"a=x,b=y": xs, "a=y,b=x": ys, "a=x": xs, "b=y": torch.empty_like(x), "a=x,no b": xs}[alias]
    b = {"a=x,b=y": ys, "a=y,b=x": xs, "a=x": torch.empty_like(x), "b=y": ys, "a=x,no b": None}[alias]
    kb.ops.combine(xs, ys, c, a, b)
    assert_bitwise_equal(a, want_a)
    if with_b:
        assert_bitwise_equal(b, want_b)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("with_y", [True, False])
def test_combine_nonfinite_like_reference(kb, with_y):
    """inf/nan propagate as in the reference; a missing y is zero (``c1*0``), not ``x*0``."""
    dtype = torch.float32
    x, y = make_pair(1000, dtype, device=kb.device, seed=33)
    x[:3] = torch.tensor([math.inf, -math.inf, math.nan])
    y = y if with_y else None
    if with_y:
        y[500] = math.inf
    for cl in ((0.7, -1.3, 2.1, 0.4), (1.0, math.inf, 0.0, math.nan), (0.5, math.inf, 1.0, 2.0)):
        c = make_coeffs(dtype, device=kb.device, values=cl)
        got_a, got_b, ref_a, ref_b = (torch.empty_like(x) for _ in range(4))
        kb.ops.combine(x, y, c, got_a, got_b)
        R.combine(x, y, c, ref_a, ref_b)
        for got, ref in ((got_a, ref_a), (got_b, ref_b)):
            assert torch.equal(got.isnan(), ref.isnan())
            assert torch.equal(got.isinf(), ref.isinf())
            assert torch.equal(got[ref.isinf()], ref[ref.isinf()])  # same signs
        if not with_y and math.isinf(cl[1]):  # c1 * 0 = NaN poisons every element of out_a
            assert torch.isnan(got_a).all()


# ---------------------------------------------------------------------------------------------
# update
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_update(kb, n, dtype, setup):
    kb.skip_if_slow(n)
    kb.skip_unless_exact_stores(dtype)
    s = SETUPS[setup]
    theta, _ = make_pair(n, dtype, "random", device=kb.device, seed=1)
    x, y = make_pair(n, dtype, "random", device=kb.device, scale_x=s["sx"], scale_y=s["sy"])
    c = make_coeffs(dtype, device=kb.device, values=s["update"])
    check_update(kb, theta, x, y, c)
    check_update(kb, theta, x, None, c)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS[1:])
def test_update_special(kb, kind, dtype):
    kb.skip_unless_exact_stores(dtype)
    theta, _ = make_pair(4095, dtype, "random", device=kb.device, seed=1)
    x, y = make_pair(4095, dtype, kind, device=kb.device)
    check_update(kb, theta, x, y, make_coeffs(dtype, device=kb.device))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_update_alias_theta_x(kb, dtype):
    # theta may also be one of the inputs (e.g. a decay-only step on a scratch buffer).
    x, y = make_pair(4095, dtype, "random", device=kb.device)
    c = make_coeffs(dtype, device=kb.device)
    want = x.clone()
    kb.ops.update(want, x.clone(), y, c)
    t = x.clone()
    kb.ops.update(t, t, y, c)
    assert_bitwise_equal(t, want)
    t = y.clone()
    want = y.clone()
    kb.ops.update(want, x, y.clone(), c)
    kb.ops.update(t, x, t, c)
    assert_bitwise_equal(t, want)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 4095, 65537])
def test_update_skip_leaves_theta_bitwise(kb, dtype, n):
    theta, _ = make_pair(n, dtype, "random", device=kb.device, seed=1)
    theta[0] = float("nan")  # NaN payloads and signed zeros must survive untouched as well
    if n > 4:
        theta[1:4] = torch.tensor([math.inf, -math.inf, -0.0], dtype=dtype)
        if dtype == torch.float32:  # a NaN payload that any rewrite through arithmetic could lose
            theta.view(torch.int32)[4] = 0x7FA00001
    x, y = make_pair(n, dtype, "random", device=kb.device)
    x[0] = float("inf")
    y[-1] = float("nan")
    before = theta.clone()
    for cl in [(0.7, -1.3, 2.1, 0.0), (0.7, -1.3, 2.1, -0.0), (math.nan, math.inf, math.nan, 0.0)]:
        c = make_coeffs(dtype, device=kb.device, values=cl)
        kb.ops.update(theta, x, y, c)
        assert_bitwise_equal(theta, before)
        kb.ops.update(theta, x, None, c)
        assert_bitwise_equal(theta, before)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_update_nan_flag_is_not_a_skip(kb, dtype):
    # The reference skips only on c3 == 0; a NaN flag is "not zero", so the step is applied.
    theta, _ = make_pair(4095, dtype, "random", device=kb.device, seed=1)
    x, y = make_pair(4095, dtype, "random", device=kb.device)
    t = check_update(kb, theta, x, y, make_coeffs(dtype, device=kb.device, c3=float("nan")))
    assert not torch.equal(t, theta)
    want, got = theta.clone(), theta.clone()
    c = make_coeffs(dtype, device=kb.device, values=(1.0, 0.5, 0.0, math.nan))
    R.update(want, x, None, c)
    kb.ops.update(got, x, None, c)
    assert_bitwise_equal(got, want)  # 1*theta + 0.5*x: exact products, so FMA or not, same bits


def test_empty_buffers_are_no_ops(kb):
    e = torch.empty(0, device=kb.device)
    c = make_coeffs(torch.float32, device=kb.device)
    kb.ops.combine(e, e, c, e, e)
    kb.ops.combine(e, None, c, e)
    kb.ops.update(e, e, None, c)
    kb.ops.update(e, e, e, c)


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_deterministic_across_runs_and_threads(kb, dtype, restore_threads):
    n = 2**22 + 5 if kb.device == "cuda" else BIG
    x, y = make_pair(n, dtype, "random", device=kb.device)
    theta, _ = make_pair(n, dtype, "random", device=kb.device, seed=1)
    c = make_coeffs(dtype, device=kb.device)
    elementwise = not kb.interpreted  # a few seconds each at this size under the interpreter

    def run(xx, yy):
        out = [kb.ops.reduce3(xx, yy)]
        if elementwise:
            a, b = torch.empty_like(xx), torch.empty_like(xx)
            kb.ops.combine(xx, yy, c, a, b)
            t = theta.clone()
            kb.ops.update(t, a, b, c)
            out += [a, b, t]
        return out

    torch.set_num_threads(1)
    first = run(x, y)
    again = run(x, y)
    copies = run(x.clone(), y.clone())  # other addresses, same values
    torch.set_num_threads(2)  # the CPU kernels' partials do not depend on the thread count
    two = run(x, y)
    for r in (again, copies, two):
        for a, b in zip(first, r):
            assert_bitwise_equal(a, b)


# ---------------------------------------------------------------------------------------------
# Argument checks: readable errors naming the argument
# ---------------------------------------------------------------------------------------------


def _error_cases(kb):
    """``(call, {family: pattern})``; a family without a pattern does not apply the case (the
    Triton wrappers accept either coefficient dtype; a torch op refuses a float for a tensor in
    the dispatcher, before any check of ours)."""
    dev = kb.device
    x = torch.randn(10, device=dev)
    c = make_coeffs(torch.float32, device=dev)
    out = torch.empty(10, device=dev)
    K = kb.ops
    return [
        (lambda: K.reduce3(x.view(2, 5), None), {"ops": r"`x` must be 1-D", "triton": "x must be 1-D"}),
        (lambda: K.reduce3(torch.randn(20, device=dev)[::2], None),
         {"ops": r"`x` must be contiguous", "triton": "x must be contiguous"}),
        (lambda: K.reduce3(x, torch.randn(11, device=dev)),
         {"ops": r"`y` has 11 elements but `x` has 10",
          "triton": r"y has 11 elements, expected 10 \(as x\)"}),
        (lambda: K.reduce3(x, x.double()),
         {"ops": r"`y` has dtype Double but `x` has dtype Float", "triton": "y has dtype torch.float64"}),
        (lambda: K.reduce3(torch.arange(10, device=dev), None),
         {"ops": r"`x` must be float32, float64", "triton": "x must be one of"}),
        (lambda: K.combine(x, x, c, torch.empty(9, device=dev), None),
         {"ops": r"`out_a` has 9 elements", "triton": "out_a has 9 elements"}),
        (lambda: K.combine(x, x, c, out, torch.empty(10, device=dev).half()),
         {"ops": r"`out_b` has dtype Half", "triton": "out_b has dtype"}),
        (lambda: K.combine(x, None, c.double(), out, None), {"ops": r"`coeffs` must have dtype Float"}),
        (lambda: K.combine(x, None, c[:3], out, None),
         {"ops": r"`coeffs` must be a 1-D tensor of 4", "triton": r"coeffs must have shape \(4,\)"}),
        (lambda: K.combine(x, None, 0.5, out), {"triton": "coeffs must be a torch.Tensor"}),
        (lambda: K.update(x.bfloat16(), x.bfloat16(), None, c.bfloat16()),
         {"ops": r"`coeffs` must have dtype Float", "triton": "coeffs must be float32 or float64"}),
        (lambda: K.update(x, x, None, c.half()),
         {"ops": r"`coeffs` must have dtype Float", "triton": "coeffs must be float32 or float64"}),
        (lambda: K.update(x, x, torch.randn(10, 1, device=dev), c),
         {"ops": r"`y` must be 1-D", "triton": "y must be 1-D"}),
        (lambda: K.update(x, x, torch.randn(5, device=dev), c),
         {"ops": r"`y` has 5 elements but `theta` has 10", "triton": "y has 5 elements"}),
        (lambda: K.update(x, torch.randn(3, device=dev), None, c),
         {"ops": r"`x` has 3 elements but `theta` has 10",
          "triton": r"x has 3 elements, expected 10 \(as theta\)"}),
        (lambda: K.update(x.view(2, 5), x, None, c),
         {"ops": "`theta` must be 1-D", "triton": "theta must be 1-D"}),
        (lambda: K.update(x, torch.zeros(10, 2, device=dev)[:, 0], None, c),
         {"ops": "`x` must be contiguous", "triton": "x must be contiguous"}),
    ]


def test_errors_name_the_argument(kb):
    checked = 0
    for fn, patterns in _error_cases(kb):
        if kb.family not in patterns:
            continue
        with pytest.raises(kb.error, match=patterns[kb.family]):
            fn()
        checked += 1
    assert checked >= 15


# ---------------------------------------------------------------------------------------------
# Memory overlap: an output may be exactly an input, never a shifted view of one
# ---------------------------------------------------------------------------------------------


def _overlap_cases(n: int, dev: str):
    """``(name, call(ops, buf, x, y, c), out_name, other_name, how)`` on a float32 scratch
    ``buf`` of n + 2 elements; how is "partially" or "same"."""
    return [
        ("update theta=buf[1:], x=buf[:-1]",
         lambda K, buf, x, y, c: K.update(buf[1:n + 1], buf[:n], None, c), "theta", "x", "partially"),
        ("update theta=buf[:-2], y=buf[2:]",
         lambda K, buf, x, y, c: K.update(buf[:n], x, buf[2:n + 2], c), "theta", "y", "partially"),
        ("update coeffs inside theta",
         lambda K, buf, x, y, c: K.update(buf[:n], x, y, buf[1:5]), "theta", "coeffs", "partially"),
        ("combine out_a=buf[1:], x=buf[:-1]",
         lambda K, buf, x, y, c: K.combine(buf[:n], y, c, buf[1:n + 1]), "out_a", "x", "partially"),
        ("combine out_b=buf[2:], y=buf[:-2]",
         lambda K, buf, x, y, c: K.combine(x, buf[:n], c, torch.empty_like(x), buf[2:n + 2]),
         "out_b", "y", "partially"),
        ("combine out_a, out_b shifted",
         lambda K, buf, x, y, c: K.combine(x, y, c, buf[:n], buf[1:n + 1]), "out_a", "out_b", "partially"),
        ("combine out_a is out_b",
         lambda K, buf, x, y, c: K.combine(x, y, c, buf[:n], buf[:n]), "out_a", "out_b", "same"),
    ]


@pytest.mark.parametrize("case", range(7))
def test_partial_overlap_is_refused(kb, case):
    n = 64
    name, call, out_name, other_name, how = _overlap_cases(n, kb.device)[case]
    buf = torch.randn(n + 2, device=kb.device)
    x, y = make_pair(n, torch.float32, device=kb.device)
    c = make_coeffs(torch.float32, device=kb.device)
    before = buf.clone()
    pattern = (rf"`?{out_name}`? and `?{other_name}`? partially overlap in memory" if how == "partially"
               else rf"`?{out_name}`? and `?{other_name}`? are the same memory")
    with pytest.raises(kb.error, match=pattern):
        call(kb.ops, buf, x, y, c)
    assert_bitwise_equal(buf, before)  # refused before anything was written


def test_overlapping_inputs_are_fine(kb):
    # Only outputs are checked: inputs may overlap each other (they are only read).
    n = 4095
    buf, _ = make_pair(n + 1, torch.float32, device=kb.device)
    x, y = buf[1:], buf[:-1]
    check_reduce3(kb, x, y)
    theta, _ = make_pair(n, torch.float32, device=kb.device, seed=1)
    check_update(kb, theta, x, y, make_coeffs(torch.float32, device=kb.device))
    check_combine(kb, x, y, make_coeffs(torch.float32, device=kb.device))
    # Adjacent but disjoint views of one buffer are separate memory.
    t = buf[:2048].clone()
    big = torch.cat([t, t])
    want = t.clone()
    kb.ops.update(want, t, None, make_coeffs(torch.float32, device=kb.device))
    kb.ops.update(big[:2048], big[2048:], None, make_coeffs(torch.float32, device=kb.device))
    assert_bitwise_equal(big[:2048], want)


# ---------------------------------------------------------------------------------------------
# The torch ops of ofmu._C: registration, Meta / fake tensors, opcheck, torch.compile
# ---------------------------------------------------------------------------------------------


def test_ops_registered(ops_kb):
    key = "CPU" if ops_kb.device == "cpu" else "CUDA"
    for op in ("reduce3", "combine", "update", "finalize"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ofmu::{op}", key)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ofmu::{op}", "Meta")


def test_an_extension_without_an_op_is_refused_with_the_fix(monkeypatch):
    """An ofmu._C built from older sources (no finalize op): the C++ backend is unavailable,
    with a reason that says to rebuild, and the step falls back to the torch reference."""
    from ofmu import backends

    pytest.importorskip("ofmu._C")
    assert backends._has_kernel("no_such_op", "CPU") is False
    real = backends._has_kernel
    monkeypatch.setattr(backends, "_has_kernel",
                        lambda op, key: False if op == "finalize" else real(op, key))
    monkeypatch.setattr(backends, "_CACHE", {})
    b, why = backends.probe("cpp")
    assert b is None and "finalize" in why and "rebuild" in why
    assert backends.select("auto", torch.device("cpu"))[0].name == "torch"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_meta_tensors(dtype):
    ops = make_backend("cpp-cpu").ops
    x = torch.empty(1000, dtype=dtype, device="meta")
    s = ops.reduce3(x, x)
    assert s.device.type == "meta" and s.shape == (3,) and s.dtype == R.acc_dtype(dtype)
    c = torch.empty(4, dtype=R.acc_dtype(dtype), device="meta")
    assert ops.combine(x, x, c, x, None) is None
    assert ops.update(x, x, None, c) is None
    with pytest.raises(RuntimeError, match="`y` has 999 elements"):
        ops.reduce3(x, torch.empty(999, dtype=dtype, device="meta"))
    st = torch.empty(3, dtype=R.acc_dtype(dtype), device="meta")
    fin = ops.finalize(st, st, st[:2], None, True, -0.5, 1e-8, 0.1, 0.0, None, 20.0)
    assert fin.device.type == "meta" and fin.shape == (11,) and fin.dtype == st.dtype


def test_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops = make_backend("cpp-cpu").ops
    with FakeTensorMode():
        x = torch.empty(4097, dtype=torch.bfloat16)
        c = torch.empty(4, dtype=torch.float32)
        s = ops.reduce3(x, None)
        assert s.shape == (3,) and s.dtype == torch.float32
        ops.combine(x, x, c, x, x)
        ops.update(x, x, x, c)
        with pytest.raises(RuntimeError, match="`coeffs` must have dtype Float"):
            ops.update(x, x, None, c.to(torch.bfloat16))


@pytest.mark.parametrize("op", ["reduce3", "combine", "update", "finalize"])
def test_opcheck(ops_kb, op):
    x, y = make_pair(1027, torch.float32, "random", device=ops_kb.device)
    c = make_coeffs(torch.float32, device=ops_kb.device)
    st = torch.tensor([0.3, 2.0, 1.5], device=ops_kb.device)
    args = {
        "reduce3": (x, y),
        "combine": (x, y, c, torch.empty_like(x), torch.empty_like(x)),
        "update": (x.clone(), x, y, c),
        "finalize": (st, st * 2, st[:2], torch.tensor(True, device=ops_kb.device), True, -0.5,
                     1e-8, 0.01, 0.1, 1.0, 20.0),
    }[op]
    # schema (mutations declared), fake/meta kernel, and AOT dispatch (functionalisation).
    torch.library.opcheck(getattr(ops_kb.ops, op).default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_torch_compile_traces_through(ops_kb):
    ops = ops_kb.ops
    x, y = make_pair(4099, torch.float32, "random", device=ops_kb.device)
    c = make_coeffs(torch.float32, device=ops_kb.device)

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


def test_bits_helper_sees_signed_zero():
    # The bitwise checks above rely on this: -0.0 == 0.0 as floats, not as bits.
    z = torch.tensor([0.0, -0.0])
    assert z[0] == z[1] and not torch.equal(bits(z[:1]), bits(z[1:]))


# ---------------------------------------------------------------------------------------------
# finalize: the summed statistics into the packed coefficients, against float64 closed forms
# ---------------------------------------------------------------------------------------------


def finalize_oracle(g, u, checks, ok, project, gamma, eps, lr, wd, max_norm, cap, dtype):
    """The documented formulas (docs/kernels.md, "The finalize op") in float64 Python."""
    fin = all(math.isfinite(v) for v in [*g, *u, *checks]) and (ok is None or ok)
    gam = gamma * g[0] / (g[2] * (1 + eps) + torch.finfo(dtype).tiny) if project else gamma
    scale = 1.0
    if max_norm is not None:
        scale = min(1.0, max_norm / (math.sqrt(u[1] + 2 * gam * u[0] + gam * gam * u[2]) + 1e-6))
    below = cap is None or checks[0] < cap
    return [1 - abs(lr) * wd, lr * scale, gam * lr * scale, float(fin and below), 1.0, gam, 0.0,
            0.0, scale, float(not fin), float(fin and not below)]


# (project, gamma, eps, lr, weight_decay, max_norm, cap): the inner step (projection, ascent,
# cap), the hvp/none directions (fixed gamma), the outer step (descent, 2 rho), clipping on/off.
FIN_CASES = {
    "project": (True, -0.5, 1e-8, 0.01, 0.0, None, 20.0),
    "project+clip+wd": (True, -0.9, 1e-6, 0.3, 0.01, 0.05, 20.0),
    "clip-inactive": (True, -0.9, 1e-8, 0.3, 0.0, 1e6, None),
    "hvp": (False, -0.1, 1e-8, 0.01, 0.0, None, 20.0),
    "none": (False, 0.0, 1e-8, 0.01, 0.0, None, None),
    "outer": (False, 0.2, 1e-8, -0.001, 0.1, 0.5, None),
}
STATS = {  # gstats, ustats, checks (forget loss first)
    "typical": ([0.3, 2.0, 1.5], [0.3, 2.0, 1.5], [1.7, 0.4]),
    "scaled": ([-3.1e5, 4.0e6, 2.5e4], [1.2e-3, 7.0e-2, 3.0e-4], [19.99, 1e-3]),
    "zero": ([0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.5]),
    "tiny": ([1e-30, 3e-30, 2e-30], [1e-30, 3e-30, 2e-30], [0.1, 0.1]),
}


def _finalize_inputs(dtype, device, stats):
    g, u, checks = STATS[stats]
    return (torch.tensor(g, dtype=dtype, device=device), torch.tensor(u, dtype=dtype, device=device),
            torch.tensor(checks, dtype=dtype, device=device))


def _check_finalize(fn, dtype, device, case, stats, ok=None):
    g, u, checks = _finalize_inputs(dtype, device, stats)
    args = FIN_CASES[case]
    okt = None if ok is None else torch.tensor(ok, device=device)
    got = fn(g, u, checks, okt, *args)
    assert got.shape == (11,) and got.dtype == dtype and got.device.type == device
    # the oracle sees the inputs as the kernel does (rounded to dtype)
    want = finalize_oracle(g.double().tolist(), u.double().tolist(), checks.double().tolist(), ok,
                           *args, dtype=dtype)
    eps = torch.finfo(dtype).eps
    for i, (a, b) in enumerate(zip(got.double().tolist(), want)):
        assert math.isclose(a, b, rel_tol=16 * eps, abs_tol=torch.finfo(dtype).tiny), (i, a, b)


@pytest.mark.parametrize("stats", STATS)
@pytest.mark.parametrize("case", FIN_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_finalize_against_float64(kb, dtype, case, stats):
    _check_finalize(kb.ops.finalize, dtype, kb.device, case, stats)


@pytest.mark.parametrize("case", ["project", "outer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_reference_finalize_against_float64(dtype, case):
    for stats in STATS:
        _check_finalize(R.finalize, dtype, "cpu", case, stats)


def _finalize_impls(kb):
    return {"kernel": kb.ops.finalize, "reference": R.finalize}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("where", ["gstats", "ustats", "checks", "ok"])
@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_finalize_skips_on_any_nonfinite_input(kb, where, bad):
    """Every input that must be finite, at every index: skipped (go 0, skipped 1, capped 0)."""
    for impl in _finalize_impls(kb).values():
        n = {"gstats": 3, "ustats": 3, "checks": 2, "ok": 1}[where]
        for i in range(n):
            g, u, checks = _finalize_inputs(torch.float32, kb.device, "typical")
            ok = torch.tensor(True, device=kb.device)
            if where == "ok":
                ok = torch.tensor(False, device=kb.device)
            else:
                {"gstats": g, "ustats": u, "checks": checks}[where][i] = bad
            out = impl(g, u, checks, ok, *FIN_CASES["project+clip+wd"]).tolist()
            assert out[3] == 0.0 and out[9] == 1.0 and out[10] == 0.0, (where, i, out)


@pytest.mark.parametrize("loss_f,capped", [(19.5, False), (20.0, True), (25.0, True)])
def test_finalize_cap_compares_the_forget_loss(kb, loss_f, capped):
    for impl in _finalize_impls(kb).values():
        g, u, _ = _finalize_inputs(torch.float32, kb.device, "typical")
        checks = torch.tensor([loss_f, 99.0], device=kb.device)  # the retain loss is not capped
        out = impl(g, u, checks, None, *FIN_CASES["project"]).tolist()
        assert (out[3], out[9], out[10]) == ((0.0, 0.0, 1.0) if capped else (1.0, 0.0, 0.0))


def test_finalize_errors_name_the_argument(kb):
    dev = kb.device
    g = torch.tensor([0.3, 2.0, 1.5], device=dev)
    c = torch.tensor([1.0, 2.0], device=dev)
    args = FIN_CASES["project"]
    cases = [
        ((g.half(), g.half(), c.half(), None), "gstats"),
        ((g, g[:2], c, None), "ustats"),
        ((g, g.double(), c, None), "ustats"),
        ((g, g, c.double(), None), "checks"),
        ((g, g, c[:0], None), "checks"),  # the cap needs the forget loss
        ((g, g, c, torch.tensor(1.0, device=dev)), "ok"),
    ]
    for call, name in cases:
        with pytest.raises(kb.error, match=name):
            kb.ops.finalize(*call, *args)

"""The CUDA ops of ``ofmu._C`` on a GPU: what only a GPU shows.

Run on a lent GPU machine with ``pytest -m gpu`` (benchmarks/gpu_check.sh); conftest.py skips
these tests where no CUDA device is visible. The kernel contract itself (accuracy against
float64 in every dtype, aliasing, non-finite inputs, determinism, argument errors, opcheck) is
tested for the CUDA ops by tests/test_kernels.py (its ``cuda`` cases); here: views off a 16-byte
boundary (the element-wise path), grid-stride sizes, agreement with the CPU kernel, no host
syncs, CUDA graph capture, and indices past 2**31. References and tolerances: tests/_kernels.py.
"""

from __future__ import annotations

import pytest
import torch
from _kernels import (
    assert_bitwise_equal,
    check_combine,
    check_reduce3,
    check_update,
    make_backend,
    make_coeffs,
    make_pair,
)
from ofmu import reference

pytestmark = pytest.mark.gpu

ops = torch.ops.ofmu
DEV = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.fixture
def kb():
    """The CUDA backend (skips without a GPU; fails if the CUDA kernels were not built)."""
    return make_backend("cuda-cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_unaligned_views_use_the_scalar_path(kb, dtype, offset):
    # Views starting off a 16-byte boundary cannot use vector loads; results must not change.
    n = 65537
    bx, by = make_pair(n + offset, dtype, "random", device=DEV)
    x, y = bx[offset:], by[offset:]
    check_reduce3(kb, x, y)
    check_combine(kb, x, y, make_coeffs(dtype, device=DEV))
    # check_update works on a (re-aligned) clone of theta, so update an unaligned view directly.
    buf, _ = make_pair(n + offset, dtype, "random", device=DEV, seed=1)
    theta = buf[offset:]
    c = make_coeffs(dtype, device=DEV)
    c64, t64 = c.double(), theta.to(torch.float64, copy=True)
    want = t64.clone()
    reference.update(want, x.double(), y.double(), c64)
    ops.update(theta, x, y, c)
    # One rounding to dtype (plus fp32 intermediates) relative to the terms' scale.
    scale = c64[0].abs() * t64.abs() + c64[1].abs() * x.double().abs() + c64[2].abs() * y.double().abs()
    assert ((theta.double() - want).abs() <= 2 * torch.finfo(dtype).eps * scale).all()


def test_cuda_matches_cpu_kernel_closely(kb):
    x, y = make_pair(2**20 + 7, torch.float32, "random")
    s_cpu = ops.reduce3(x, y)
    s_gpu = ops.reduce3(x.to(DEV), y.to(DEV)).cpu()
    scale = torch.tensor([(s_cpu[1] * s_cpu[2]).sqrt(), s_cpu[1], s_cpu[2]])
    assert ((s_gpu - s_cpu).abs() <= 1e-5 * scale).all()


def test_no_host_sync(kb):
    x, y = make_pair(2**20 + 7, torch.float32, "random", device=DEV)
    theta = x.clone()
    a, b = torch.empty_like(x), torch.empty_like(x)
    c = make_coeffs(torch.float32, device=DEV)
    ops.reduce3(x, y)  # warm up allocator and module loading outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        s = ops.reduce3(x, y)
        coeffs = torch.stack([c[0], c[1] * s[0].sign(), c[2], c[3]])
        ops.combine(x, y, coeffs, a, b)
        ops.update(theta, a, b, coeffs)
        ops.update(theta, a, None, coeffs * 0)  # the skip flag is read on the device
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_update_cuda_graph_capture(kb):
    n = 2**20 + 7
    theta, _ = make_pair(n, torch.float32, "random", device=DEV, seed=1)
    x, y = make_pair(n, torch.float32, "random", device=DEV)
    coeffs = make_coeffs(torch.float32, device=DEV)
    stats = torch.empty(3, device=DEV)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up on a side stream, as the CUDA graphs docs recommend
        ops.update(theta.clone(), x, y, coeffs)
        ops.reduce3(x, y)
    torch.cuda.current_stream().wait_stream(s)
    start = theta.clone()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        stats.copy_(ops.reduce3(x, y))
        ops.update(theta, x, y, coeffs)
    theta.copy_(start)
    want = start.clone()
    reference.update(want, x, y, coeffs)
    g.replay()
    torch.cuda.synchronize()
    # FMA-contracted kernel vs torch's separate roundings: ~1 ulp of terms up to ~10 in size.
    torch.testing.assert_close(theta, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats, reference.reduce3(x, y), rtol=1e-5, atol=1e-3)
    # Coefficients are read from device memory at replay: writing the skip flag in place makes
    # the replayed update leave theta untouched.
    coeffs[3] = 0.0
    before = theta.clone()
    g.replay()
    torch.cuda.synchronize()
    assert_bitwise_equal(theta, before)


# Sizes past one full capped grid: kElemBlocks (4096) x 256 threads x pack elements for combine /
# update, so some threads take a second grid-stride step, plus a partial pack (the scalar tail).
# reduce3's grid is capped at 1024 blocks, so it loops several times at these sizes too.
_PACK = {torch.float32: 4, torch.float64: 2, torch.float16: 8, torch.bfloat16: 8}


@pytest.mark.parametrize("offset", [0, 1], ids=["vector", "scalar"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grid_stride_sizes_cuda(kb, dtype, offset):
    pack = _PACK[dtype]
    n = 4096 * 256 * (pack if offset == 0 else 1) + pack + 3
    bx, by = make_pair(n + offset, dtype, "random", device=DEV)
    x, y = bx[offset:], by[offset:]  # offset 1: off a 16-byte boundary, element-wise path
    check_reduce3(kb, x, y)
    c = make_coeffs(dtype, device=DEV)
    if offset == 0:
        check_combine(kb, x, y, c)
        check_update(kb, x.clone(), x, y, c)
        return
    # check_combine / check_update allocate aligned outputs; keep every pointer unaligned.
    bo = torch.empty(n + offset, dtype=dtype, device=DEV)
    out = bo[offset:]
    ops.combine(x, y, c, out, None)
    want = torch.empty(n, dtype=torch.float64, device=DEV)
    reference.combine(x.double(), y.double(), c.double(), want)
    scale = c[0].double().abs() * x.double().abs() + c[1].double().abs() * y.double().abs()
    assert ((out.double() - want).abs() <= 2 * torch.finfo(dtype).eps * scale).all()


@pytest.mark.parametrize("which", ["x", "y", "out"])
def test_one_unaligned_pointer_cuda(kb, which):
    # Only one pointer of the call is off a 16-byte boundary: the whole call must go element-wise.
    n, dtype = 65537, torch.float32
    x, y = make_pair(n + 1, dtype, "random", device=DEV)
    x, y = (x[1:], y[:-1]) if which == "x" else (x[:-1], y[1:]) if which == "y" else (x[:-1], y[:-1])
    c = make_coeffs(dtype, device=DEV)
    check_reduce3(kb, x, y)
    out = torch.empty(n + 1, dtype=dtype, device=DEV)[1:] if which == "out" else torch.empty_like(x)
    ops.combine(x, y, c, out, None)
    want = torch.empty_like(x)
    reference.combine(x, y, c, want)
    # FMA vs torch's separate roundings: a few ulps of the terms (|c1 y| <~ 6); a wrong index
    # would be off by O(1).
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    theta = torch.empty(n + 1, dtype=dtype, device=DEV)[1:] if which == "out" else x.clone()
    theta.copy_(x)
    ref = theta.clone()
    reference.update(ref, x, y, c)
    ops.update(theta, x, y, c)
    torch.testing.assert_close(theta, ref, rtol=1e-5, atol=1e-5)


def test_64bit_indices_cuda(kb):
    """Elements past index 2**31, on the vector path and on the element-wise path."""
    n = 2**31 + 5003  # n % 8 == 3: the last fp16 elements form the scalar tail
    if torch.cuda.mem_get_info()[0] < 4 * 2 * n + 2**30:
        pytest.skip("needs ~18 GB of free GPU memory")
    hot = [2**31 - 1, 2**31, 2**31 + 8, n - 1]
    vals = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float16, device=DEV)
    x = torch.zeros(n, dtype=torch.float16, device=DEV)
    x[hot] = vals
    assert ops.reduce3(x, None).tolist() == [0.0, 30.0, 0.0]
    assert ops.reduce3(x, x).tolist() == [30.0, 30.0, 30.0]
    assert ops.reduce3(x[1:], x[1:]).tolist() == [30.0, 30.0, 30.0]  # element-wise path
    out = torch.zeros_like(x)
    c = torch.tensor([1.5, 0.0, 0.0, 1.0], device=DEV)
    for view in (slice(0, None), slice(1, None)):  # vector path, then element-wise path
        out.zero_()
        ops.combine(x[view], None, c, out[view], None)
        assert torch.equal(out[hot], 1.5 * vals) and int(torch.count_nonzero(out)) == 4
    theta = torch.zeros_like(x)
    c = torch.tensor([1.0, 1.0, 0.0, 1.0], device=DEV)
    ops.update(theta, x, None, c)
    ops.update(theta[1:], x[1:], None, c)
    assert torch.equal(theta[hot], 2 * vals) and int(torch.count_nonzero(theta)) == 4

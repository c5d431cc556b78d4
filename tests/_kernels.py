"""Shared helpers of the kernel tests: the backends under test, inputs, float64 references and
the one tolerance rule.

Imported by tests/test_kernels.py (the body every backend runs) and by the backend-specific
files (test_kernels_cpp.py: the AVX2 fast path; test_kernels_triton.py: launch geometry and the
interpreter; test_kernels_gpu.py: CUDA graphs, misaligned pointers, indices past 2**31).

Tolerance rule (flash-attention's): a kernel's error against the float64 (or exact) reference is
at most twice the error of the plain torch reference (:mod:`ofmu.reference`) run in the buffers'
own dtype, plus a slack of one epsilon relative to the *scale* of the quantity -- ``|x||y|`` for
a dot product, ``|c0 x| + |c1 y|`` per element for ``combine`` -- never relative to the result
itself (a dot product of orthogonal vectors is ~0). Reductions use the accumulation dtype's
epsilon (times 32 for the C++/CUDA ops, see ``KernelBackend.reduce_slack_eps``), elementwise
results the buffer dtype's, per element.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from ofmu import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SIZES = [1, 3, 4095, 65537, 2**20 + 7]
KINDS = ["random", "zero", "orthogonal", "antiparallel"]
BIG = 2**20 + 7
INTERP_MAX_N = 65537  # elementwise ops under the Triton interpreter: larger sizes take seconds


# ---------------------------------------------------------------------------------------------
# The backends under test
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelBackend:
    """One implementation of the kernel contract on one device."""

    name: str  # "cpp", "cuda" or "triton"
    device: str  # "cpu" or "cuda"
    ops: object  # has .reduce3 / .combine / .update
    error: type  # what a bad argument raises: RuntimeError (torch ops) or ValueError (Triton)

    @property
    def family(self) -> str:
        """``"ops"`` for the torch ops of ``ofmu._C`` (cpp, cuda), ``"triton"`` otherwise."""
        return "triton" if self.name == "triton" else "ops"

    @property
    def reduce_slack_eps(self) -> float:
        """Slack of ``reduce3``, in eps of the accumulation dtype times the scale: 32 for the C++/CUDA
        ops (the CPU fp16 path sums each block of 1024 products sequentially: ~6 eps measured at
        4095 elements), 1 for Triton."""
        return 1.0 if self.name == "triton" else 32.0

    @property
    def interpreted(self) -> bool:
        return self.name == "triton" and self.device == "cpu"

    @property
    def id(self) -> str:
        return f"{self.name}-{self.device}"

    def skip_unless_exact_stores(self, dtype: torch.dtype) -> None:
        """The Triton interpreter rounds fp32 -> bf16 by truncation (torch and compiled code round
        to nearest even): bf16 *outputs* are checked against the reference on real hardware only.
        fp16 goes through numpy there and rounds correctly."""
        if self.interpreted and dtype == torch.bfloat16:
            pytest.skip("the Triton interpreter truncates fp32 -> bf16 stores (checked on a GPU)")

    def skip_if_slow(self, n: int, elementwise: bool = True, dtype: torch.dtype | None = None):
        if self.interpreted and n > INTERP_MAX_N and (
                elementwise or dtype not in (torch.float32, torch.float64)):
            pytest.skip("too slow under the Triton interpreter")


def _cpp() -> KernelBackend:
    pytest.importorskip("ofmu._C", reason="ofmu._C is not built (pip install -e . --no-build-isolation)")
    return KernelBackend("cpp", "cpu", torch.ops.ofmu, RuntimeError)


def _cuda() -> KernelBackend:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("ofmu._C", reason="ofmu._C is not built (pip install -e . --no-build-isolation)")
    if not torch._C._dispatch_has_kernel_for_dispatch_key("ofmu::reduce3", "CUDA"):
        pytest.fail("ofmu._C was built without CUDA kernels on a CUDA machine "
                    "(rebuild with OFMU_FORCE_CUDA=1 to see why)")
    return KernelBackend("cuda", "cuda", torch.ops.ofmu, RuntimeError)


def _triton(device: str) -> KernelBackend:
    pytest.importorskip("triton")
    if device == "cpu" and torch.cuda.is_available():
        pytest.skip("CPU tensors run the Triton kernels only under the interpreter (no GPU)")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    import ofmu_kernels

    return KernelBackend("triton", device, ofmu_kernels, ValueError)


MAKERS = {"cpp-cpu": _cpp, "triton-cpu": lambda: _triton("cpu"), "cuda-cuda": _cuda,
          "triton-cuda": lambda: _triton("cuda")}
# (backend, device) pairs of the shared body: the GPU ones are marked `gpu` (conftest.py skips
# them without a CUDA device); triton on CPU runs under TRITON_INTERPRET=1 (set by conftest.py).
BACKEND_PARAMS = [
    pytest.param("cpp-cpu", id="cpp-cpu"),
    pytest.param("triton-cpu", id="triton-interp"),
    pytest.param("cuda-cuda", id="cuda", marks=pytest.mark.gpu),
    pytest.param("triton-cuda", id="triton-cuda", marks=pytest.mark.gpu),
]
OPS_PARAMS = [p for p in BACKEND_PARAMS if p.values[0] in ("cpp-cpu", "cuda-cuda")]


def make_backend(key: str) -> KernelBackend:
    return MAKERS[key]()


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def make_pair(n: int, dtype: torch.dtype, kind: str = "random", device="cpu", seed: int = 0,
              scale_x: float = 1.0, scale_y: float = 1.0):
    """``(x, y)`` of length n in ``dtype``; the relation between them is set in float64."""
    g = torch.Generator().manual_seed(seed + n)
    x = scale_x * torch.randn(n, generator=g, dtype=torch.float64)
    y = scale_y * torch.randn(n, generator=g, dtype=torch.float64)
    if kind == "zero":
        x.zero_()
        y.zero_()
    elif kind == "orthogonal" and n > 1:
        y = y - (y @ x) / (x @ x) * x
    elif kind == "antiparallel":
        y = -2.5 * x
    return x.to(dtype).to(device), y.to(dtype).to(device)


def make_coeffs(dtype: torch.dtype, device="cpu", c3: float = 0.4, values=None) -> torch.Tensor:
    vals = values if values is not None else (0.7, -1.3, 2.1, c3)
    return torch.tensor(vals, dtype=reference.acc_dtype(dtype), device=device)


def bits(t: torch.Tensor) -> torch.Tensor:
    """An integer view, so that bitwise comparisons also hold for NaNs and signed zeros."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits(a), bits(b)), "results differ bitwise"


# ---------------------------------------------------------------------------------------------
# References and checks
# ---------------------------------------------------------------------------------------------


def _f64(t):
    return None if t is None else t.double()


def reference_reduce3(x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """float64 ``[<x,y>, |x|^2, |y|^2]`` on the host.

    For fp32/bf16/fp16 inputs: :func:`ofmu.reference.reduce3` on float64 copies (products
    exact, sums ~1e-16 relative: exact for our purpose). For float64 inputs that would be the very
    computation under test, so the sums are ``math.fsum`` (correctly rounded) of the products.
    """
    if x.dtype != torch.float64:
        return reference.reduce3(x.double(), _f64(y)).cpu()
    xs = x.cpu()
    ys = y.cpu() if y is not None else None
    xy = math.fsum((xs * ys).tolist()) if ys is not None else 0.0
    yy = math.fsum((ys * ys).tolist()) if ys is not None else 0.0
    return torch.tensor([xy, math.fsum((xs * xs).tolist()), yy], dtype=torch.float64)


def assert_reduce3_close(x: torch.Tensor, y: torch.Tensor | None, got: torch.Tensor,
                         exact: list[float] | None = None, slack_eps: float = 1.0) -> None:
    """``|got - exact| <= 2 |torch - exact| + slack_eps * eps(acc) * scale`` for each stat."""
    ref = torch.tensor(exact, dtype=torch.float64) if exact is not None else reference_reduce3(x, y)
    acc = reference.acc_dtype(x.dtype)
    plain = reference.reduce3(x, y).double().cpu()
    got64 = got.double().cpu()
    nx, ny = math.sqrt(ref[1]), math.sqrt(ref[2])
    scale = torch.tensor([nx * ny, nx * nx, ny * ny], dtype=torch.float64)
    slack = slack_eps * torch.finfo(acc).eps * scale + 1e-300
    err, err_t = (got64 - ref).abs(), (plain - ref).abs()
    assert (err <= 2 * err_t + slack).all(), (
        f"reduce3 error {err.tolist()} vs torch {err_t.tolist()}, slack {slack.tolist()}")


def check_reduce3(kb: KernelBackend, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    got = kb.ops.reduce3(x, y)
    assert got.dtype == reference.acc_dtype(x.dtype) and got.shape == (3,) and got.device == x.device
    assert_reduce3_close(x, y, got, slack_eps=kb.reduce_slack_eps)
    return got


def assert_elementwise_close(name: str, got, exact, plain, scale) -> None:
    """Per element: ``|got - exact| <= 2 |plain - exact| + eps(dtype) * scale``."""
    eps = torch.finfo(got.dtype).eps
    err = (got.double() - exact).abs()
    bound = 2 * (plain.double() - exact).abs() + eps * scale
    bad = err > bound
    if bad.any():
        k = int((err - bound).argmax())
        raise AssertionError(f"{name}: {int(bad.sum())} elements off; worst at {k}: got "
                             f"{got[k].item()!r}, exact {exact[k].item()!r}, torch {plain[k].item()!r}")


def check_combine(kb: KernelBackend, x, y, coeffs, with_b: bool = True):
    a = torch.empty_like(x)
    b = torch.empty_like(x) if with_b else None
    kb.ops.combine(x, y, coeffs, a, b)
    c64 = coeffs.double()
    a64 = torch.empty_like(x, dtype=torch.float64)
    b64 = torch.empty_like(a64) if with_b else None
    reference.combine(x.double(), _f64(y), c64, a64, b64)
    pa, pb = torch.empty_like(x), torch.empty_like(x) if with_b else None
    reference.combine(x, y, coeffs, pa, pb)
    ax, ay = x.double().abs(), (y.double().abs() if y is not None else torch.zeros_like(a64))
    assert_elementwise_close("out_a", a, a64, pa, c64[0].abs() * ax + c64[1].abs() * ay)
    if with_b:
        assert_elementwise_close("out_b", b, b64, pb, c64[2].abs() * ax + c64[3].abs() * ay)
    return a, b


def check_update(kb: KernelBackend, theta, x, y, coeffs):
    t = theta.clone()
    kb.ops.update(t, x, y, coeffs)
    c64 = coeffs.double()
    t64 = theta.to(torch.float64, copy=True)  # .double() would alias a float64 theta
    reference.update(t64, x.double(), _f64(y), c64)
    tp = theta.clone()
    reference.update(tp, x, y, coeffs)
    scale = c64[0].abs() * theta.double().abs() + c64[1].abs() * x.double().abs()
    if y is not None:
        scale = scale + c64[2].abs() * y.double().abs()
    assert_elementwise_close("theta", t, t64, tp, scale)
    return t

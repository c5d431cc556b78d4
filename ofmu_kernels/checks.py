"""Argument checks shared by the Triton wrappers.

The kernels see only ``data_ptr()``: a strided view or a buffer of another length would be read
wrongly without any error, so every tensor is checked before launch and a ``ValueError``
names the offending argument. Outputs may be exactly an input but must not partially overlap
one (``check_overlap``).
"""

from __future__ import annotations

import torch
from torch import Tensor

BUFFER_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
COEFF_DTYPES = (torch.float32, torch.float64)


def _fail(op: str, name: str, what: str) -> None:
    raise ValueError(f"ofmu_kernels.{op}: {name} {what}")


def check_buffer(op: str, name: str, t: object, like: Tensor | None = None,
                 like_name: str = "x") -> None:
    """``t`` is a 1-D contiguous float buffer (matching ``like`` in length, dtype and device)."""
    if not isinstance(t, Tensor):
        _fail(op, name, f"must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1:
        _fail(op, name, f"must be 1-D, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        _fail(op, name, f"must be contiguous, got stride {t.stride()}")
    if t.dtype not in BUFFER_DTYPES:
        _fail(op, name, f"must be one of {BUFFER_DTYPES}, got {t.dtype}")
    if like is None:
        return
    if t.numel() != like.numel():
        _fail(op, name, f"has {t.numel()} elements, expected {like.numel()} (as {like_name})")
    if t.dtype != like.dtype:
        _fail(op, name, f"has dtype {t.dtype}, expected {like.dtype} (as {like_name})")
    if t.device != like.device:
        _fail(op, name, f"is on {t.device}, expected {like.device} (as {like_name})")


def check_coeffs(op: str, coeffs: object, like: Tensor, like_name: str = "x") -> None:
    """``coeffs`` is a contiguous 4-element fp32/fp64 tensor on the buffers' device."""
    if not isinstance(coeffs, Tensor):
        _fail(op, "coeffs", f"must be a torch.Tensor on the device, got {type(coeffs).__name__}")
    if coeffs.numel() != 4 or coeffs.dim() != 1:
        _fail(op, "coeffs", f"must have shape (4,), got {tuple(coeffs.shape)}")
    if not coeffs.is_contiguous():
        _fail(op, "coeffs", f"must be contiguous, got stride {coeffs.stride()}")
    if coeffs.dtype not in COEFF_DTYPES:
        _fail(op, "coeffs", f"must be float32 or float64, got {coeffs.dtype}")
    if coeffs.device != like.device:
        _fail(op, "coeffs", f"is on {coeffs.device}, expected {like.device} (as {like_name})")


def _byte_range(t: Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def check_overlap(op: str, out_name: str, out: Tensor, other_name: str, other: Tensor,
                  may_alias: bool) -> None:
    """An output against another argument, by pointer arithmetic: exactly the same memory is
    allowed when ``may_alias`` (the kernels load every element before storing it), a partial
    overlap (views of one buffer at different offsets) never is."""
    if out.numel() == 0 or other.numel() == 0 or out.device.type == "meta":
        return
    a0, a1 = _byte_range(out)
    b0, b1 = _byte_range(other)
    if a1 <= b0 or b1 <= a0:
        return
    if (a0, a1) != (b0, b1):
        _fail(op, out_name, f"and {other_name} partially overlap in memory (views of one buffer at "
                            f"different offsets); {out_name} may be exactly {other_name} (the same "
                            f"buffer) or separate memory, e.g. {other_name}.clone()")
    if not may_alias:
        _fail(op, out_name, f"and {other_name} are the same memory, which {op} does not allow; "
                            "pass separate buffers")


def check_device(op: str, name: str, t: Tensor, interpreted: bool) -> None:
    """Compiled kernels need GPU memory; CPU tensors only work through the interpreter."""
    if t.device.type == "cpu" and not interpreted:
        _fail(op, name, "is on cpu: the Triton kernels need GPU tensors "
                       "(set TRITON_INTERPRET=1 before importing ofmu_kernels' ops to run on CPU)")

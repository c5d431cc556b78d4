"""Where a step's cross-buffer sums are formed, and how values move between devices.

One optimizer may hold buffers on several devices (CPU and CUDA parameter groups, two GPUs). The
cosine, the projection and the skip decision are global, so per-buffer statistics meet on one
device and the coefficients computed there go back to every buffer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def reduction_device(devices: Sequence[torch.device]) -> torch.device:
    """The first accelerator (CUDA) device among ``devices``, else the first: sums are formed
    where the data already is, and a copy to the CPU (which must block, see :func:`move`) is
    needed only for CPU buffers."""
    for d in devices:
        if d.type != "cpu":
            return d
    return devices[0]


def copy_blocks(src: torch.device, dst: torch.device) -> bool:
    """Whether a copy from ``src`` to ``dst`` must wait for the data: from an accelerator onto
    the CPU, a non-blocking copy returns before the data lands and the CPU ops that follow would
    read stale memory. Onto an accelerator, its stream orders the copy before every later use."""
    return torch.device(dst).type == "cpu" and torch.device(src).type != "cpu"


def move(t: Tensor, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """``t`` on ``device`` (in ``dtype``), waiting only where :func:`copy_blocks` says so. Same
    device: no copy, no sync; already there in that dtype: ``t`` itself (what ``.to`` returns
    then, without its dispatch)."""
    src = t.device
    if src == device and (dtype is None or t.dtype == dtype):
        return t
    return t.to(device=device, dtype=dtype, non_blocking=not copy_blocks(src, device))

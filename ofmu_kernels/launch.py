"""Launch geometry: block size, number of programs and blocks per program.

Two regimes, one kernel source:

* **GPU (compiled).** Elementwise ops use one block per program and a large grid. ``reduce3``
  uses at most ``REDUCE_PROGRAMS`` programs, each looping over blocks grid-stride, so the
  partials buffer stays small; that bound does not depend on the GPU model, so a result is
  the same on any GPU given the same triton build (the fixed geometry is what makes the
  reduction order fixed -- which is also why there is no autotuning here).
* **Interpreter (``TRITON_INTERPRET=1``).** Each program costs ~1-2 ms of Python, so blocks
  are big and programs few. Every program does exactly one block: a loop with a runtime trip
  count breaks triton 3.6's interpreter under numpy >= 2.4 (``tensor.__index__``), so the
  looping path is only taken when :func:`forced` asks for it (tests of the GPU geometry).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import triton

# GPU geometry. 8 warps x 32 lanes = 256 threads; a 2048-element block is 8 elements per
# thread (two 16-byte loads of fp32 per operand). Not tuned on hardware yet.
GPU_BLOCK_ELEMENTWISE = 2048
GPU_BLOCK_REDUCE = 4096
GPU_NUM_WARPS = 8
# Upper bound on reduce3's programs (= partials per stat); about one resident wave on an
# H100/H200 (132 SMs x 8 programs of 8 warps).
REDUCE_PROGRAMS = 1024

# Interpreter geometry: ~16 programs for big buffers, blocks between 2**10 and 2**18.
INTERP_TARGET_PROGRAMS = 16
INTERP_BLOCK_MIN = 2**10
INTERP_BLOCK_MAX = 2**18

_FORCED: tuple[int, int] | None = None


@dataclass(frozen=True)
class Grid:
    block: int
    programs: int
    iters: int  # blocks per program, grid-stride: program p does blocks p, p + programs, ...
    num_warps: int

    @property
    def loop(self) -> bool:
        return self.iters > 1


def _grid(n: int, block: int, max_programs: int, num_warps: int) -> Grid:
    blocks = max(1, triton.cdiv(n, block))
    programs = min(blocks, max_programs)
    return Grid(block, programs, triton.cdiv(blocks, programs), num_warps)


def plan(n: int, kind: str, interpreted: bool) -> Grid:
    """Geometry for ``n`` elements; ``kind`` is ``"reduce"`` or ``"elementwise"``."""
    if _FORCED is not None:
        block, max_programs = _FORCED
        return _grid(n, block, max_programs, GPU_NUM_WARPS)
    if interpreted:
        block = triton.next_power_of_2(max(1, triton.cdiv(n, INTERP_TARGET_PROGRAMS)))
        block = min(max(block, INTERP_BLOCK_MIN), INTERP_BLOCK_MAX)
        return _grid(n, block, 2**31 - 1, 1)
    if kind == "reduce":
        return _grid(n, GPU_BLOCK_REDUCE, REDUCE_PROGRAMS, GPU_NUM_WARPS)
    return _grid(n, GPU_BLOCK_ELEMENTWISE, 2**31 - 1, GPU_NUM_WARPS)


@contextlib.contextmanager
def forced(block: int, max_programs: int):
    """Use a fixed block size and program cap (tests: exercise the looping GPU geometry)."""
    global _FORCED
    if block & (block - 1) or block < 16:
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    old, _FORCED = _FORCED, (block, max_programs)
    try:
        yield
    finally:
        _FORCED = old


def on_device_of(t):
    """Launch on ``t``'s GPU: triton uses the *current* device, which may be another one."""
    import torch

    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def is_interpreted(kernel: object) -> bool:
    """Whether a ``@triton.jit`` kernel was defined under ``TRITON_INTERPRET=1``."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)

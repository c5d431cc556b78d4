"""Launch the CUDA ops of ``ofmu._C`` once per tail and alignment case, for compute-sanitizer.

benchmarks/gpu_check.sh runs this under ``compute-sanitizer --tool memcheck`` (out-of-bounds and
misaligned accesses) and ``--tool racecheck`` (shared-memory hazards of the reduction). Every
operand ends exactly where its allocation ends (a view ``base[offset:]`` of a buffer of
``n + offset`` elements), so a read past the last element leaves the allocation; run with
``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` so that each tensor is its own allocation.

Cases: every dtype; sizes of one element, a partial pack, a pack plus a scalar tail, several
blocks, and (``--big``) past one full capped grid (grid-stride loop); every operand 16-byte
aligned (vector path) or one element off (element-wise path), and one pointer off at a time;
``y`` and ``out_b`` present or absent; the update's skip flag set and clear. Each result is
checked loosely against torch, so a launch that did nothing fails too.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
        python benchmarks/sanitize_kernels.py --big
"""

from __future__ import annotations

import argparse
import sys

import torch

PACK = {torch.float32: 4, torch.float64: 2, torch.float16: 8, torch.bfloat16: 8}
ACC = {torch.float32: torch.float32, torch.float64: torch.float64, torch.float16: torch.float32,
       torch.bfloat16: torch.float32}


def operand(n: int, dtype: torch.dtype, offset: int, seed: int, dev: str) -> torch.Tensor:
    """``n`` random elements ending exactly at the end of their allocation."""
    g = torch.Generator().manual_seed(seed * 1000003 + n)
    base = torch.randn(n + offset, generator=g, dtype=torch.float32).to(device=dev, dtype=dtype)
    return base[offset:]


def one_case(n: int, dtype: torch.dtype, offs: tuple[int, int, int], with_y: bool,
             dev: str = "cuda") -> int:
    """Every op once on one case; returns the number of launches."""
    ops = torch.ops.ofmu
    ox, oy, oo = offs
    x = operand(n, dtype, ox, 1, dev)
    y = operand(n, dtype, oy, 2, dev) if with_y else None
    yd = y.double() if with_y else torch.zeros(n, dtype=torch.float64, device=dev)
    stats = ops.reduce3(x, y)
    want = torch.stack([(x.double() * yd).sum(), (x.double() ** 2).sum(), (yd * yd).sum()])
    assert torch.allclose(stats.double(), want, rtol=1e-2, atol=1e-2 * n), (n, dtype, offs, stats)
    c = torch.tensor([0.7, -1.3, 2.1, 1.0], dtype=ACC[dtype], device=dev)
    out_a, out_b = operand(n, dtype, oo, 3, dev), operand(n, dtype, oo, 4, dev)
    ops.combine(x, y, c, out_a, out_b)
    ops.combine(x, y, c, out_a, None)
    assert torch.allclose(out_a.double(), 0.7 * x.double() - 1.3 * yd, rtol=2e-2, atol=2e-2)
    theta = operand(n, dtype, oo, 5, dev)
    start = theta.to(torch.float64, copy=True)  # .double() of fp64 would alias theta
    ops.update(theta, x, y, c)
    assert torch.allclose(theta.double(), 0.7 * start - 1.3 * x.double() + 2.1 * yd,
                          rtol=2e-2, atol=5e-2)
    before = theta.clone()
    ops.update(theta, x, y, c * torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=c.dtype, device=dev))
    assert torch.equal(theta, before)  # skip flag clear: theta untouched
    return 5


def cases(big: bool):
    for dtype, pack in PACK.items():
        sizes = [1, pack - 1, pack + 3, 4 * 256 * pack + 5, 65537]
        if big and dtype == torch.float32:
            sizes.append(4096 * 256 * pack + pack + 3)  # past one capped grid: a second stride
        for n in sizes:
            for offs in ((0, 0, 0), (1, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1)):
                for with_y in (True, False):
                    yield n, dtype, offs, with_y


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--big", action="store_true", help="add a size past one full grid (fp32)")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for the C++ kernels (a dry run)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("sanitize_kernels.py: no CUDA device visible", file=sys.stderr)
        return 2
    import ofmu._C  # noqa: F401  (registers torch.ops.ofmu)

    key = "CUDA" if args.device == "cuda" else "CPU"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("ofmu::update", key):
        print(f"sanitize_kernels.py: ofmu._C has no {key} kernels (build with OFMU_FORCE_CUDA=1)",
              file=sys.stderr)
        return 2
    launches = ncases = 0
    for case in cases(args.big):
        launches += one_case(*case, dev=args.device)
        ncases += 1
    if args.device == "cuda":
        torch.cuda.synchronize()
    print(f"{ncases} cases, {launches} ofmu launches, all results as expected")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The reduction folded into the backward pass: ``reduce3`` per parameter, from autograd hooks.

The two-pass step reads ``g_f`` and ``g_r`` once more after the backward passes to form
``[<g_f, g_r>, |g_f|^2, |g_r|^2]``. Folded, a post-accumulate-grad hook on every parameter
computes that parameter's share (the backend's ``reduce3`` on its two gradient views) during
the *second* backward pass, right after autograd accumulated the parameter's gradient, while
it is still in cache; the shares sit in fixed, parameter-ordered slots and :meth:`FusedReduce.finish`
sums them in that order, so the result is bitwise the same run to run (it differs from the
two-pass ``reduce3`` of the whole buffer by rounding only: another summation order).

Valid only where the hooks see the final gradients: plain ``.backward()`` into the flat buffers
(not the modes that keep graphs, which use ``autograd.grad``; not FSDP2-sharded buffers, whose
gradients arrive after reduce-scatter; not under torch.distributed, which averages the buffers
after the backward). A hook *overwrites* its slot from the current contents of the two views,
so a parameter whose gradient arrives in several accumulations ends with the share of its
complete gradient (autograd sums a tied weight's uses before accumulating: one call). A
parameter the pass did not reach gets its share computed by ``finish``.

The switch: ``OFMU_FUSED_REDUCE`` = ``auto`` (default: per buffer, by :func:`use_fused`'s size
rule), ``1`` (fold every buffer, where valid) or ``0`` (never). Measured on an Intel Xeon at one
thread (docs/performance.md, "Reduction folded into the backward pass"), the folded path won at
no size from 2^16 to 2^24 parameters: each hook's read of ``g_f`` (written by the first pass,
long evicted) and its interruption of the backward pass cost more than the streaming pass it
saves. So ``auto`` keeps the two-pass reduction (:data:`FUSED_MIN_MEAN_NUMEL` is None) until a
machine shows a break-even.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor

ENV = "OFMU_FUSED_REDUCE"
# "auto" folds a C++-backend buffer whose mean parameter size is at least this many elements;
# None: never (no break-even measured; see the module docstring).
FUSED_MIN_MEAN_NUMEL: int | None = None


def setting() -> str:
    """``OFMU_FUSED_REDUCE`` as ``"auto"``, ``"on"`` or ``"off"`` (anything else is an error)."""
    raw = os.environ.get(ENV, "auto").strip().lower()
    if raw in ("auto", ""):
        return "auto"
    if raw in ("1", "on", "true", "yes"):
        return "on"
    if raw in ("0", "off", "false", "no"):
        return "off"
    raise ValueError(f"{ENV}={os.environ[ENV]!r}: expected auto, 1 (on) or 0 (off)")


def use_fused(backend_name: str, numel: int, n_params: int, how: str) -> bool:
    """Whether one flat buffer's reduction is folded into the backward pass."""
    if how == "off" or n_params == 0:
        return False
    if how == "on":
        return True
    return (FUSED_MIN_MEAN_NUMEL is not None and backend_name == "cpp"
            and numel >= FUSED_MIN_MEAN_NUMEL * n_params)


class FusedReduce:
    """Per-parameter shares of ``reduce3(x, y)``, written by hooks during one backward pass.

    Shared by the hooks (which must not keep the optimizer alive): ``arm`` before the pass,
    ``finish`` after it. ``results[b]`` is ``None`` for a buffer that is not folded."""

    def __init__(self) -> None:
        self.active = False
        self.fns: list[Callable | None] = []
        self.xs: list[list[Tensor]] = []
        self.ys: list[list[Tensor] | None] = []
        self.results: list[list[Tensor | None] | None] = []
        self.where: dict[int, tuple[int, int]] = {}

    def arm(self, fns: list[Callable | None], xs: list[list[Tensor]],
            ys: list[list[Tensor] | None], where: dict[int, tuple[int, int]]) -> None:
        """Fold the next backward pass: buffer ``b``'s parameter ``i`` gets
        ``fns[b](xs[b][i], ys[b][i])`` (1-D views; ``fns[b] = None``: buffer not folded);
        ``where`` maps ``id(parameter)`` to its ``(b, i)`` now (looked up at every hook call, so a
        rebuilt layout never leaves a hook writing another parameter's slot)."""
        self.fns, self.xs, self.ys, self.where = fns, xs, ys, where
        self.results = [None if fn is None else [None] * len(x) for fn, x in zip(fns, xs)]
        self.active = True

    def disarm(self) -> None:
        self.active = False
        self.results = []

    def hook(self, p: Tensor) -> None:
        """After parameter ``p`` accumulated its gradient (overwrites its slot)."""
        bi = self.where.get(id(p)) if self.active else None
        if bi is None:
            return
        b, i = bi
        res = self.results[b]
        if res is None:
            return
        ys = self.ys[b]
        res[i] = self.fns[b](self.xs[b][i], None if ys is None else ys[i])

    def finish(self) -> list[Tensor | None]:
        """Per buffer: the shares summed in parameter order (``None``: not folded). Shares of
        parameters no hook reached are computed here."""
        out: list[Tensor | None] = []
        for b, res in enumerate(self.results):
            if res is None:
                out.append(None)
                continue
            fn, xs, ys = self.fns[b], self.xs[b], self.ys[b]
            for i, r in enumerate(res):
                if r is None:
                    res[i] = fn(xs[i], None if ys is None else ys[i])
            out.append(res[0] if len(res) == 1 else torch.stack(res).sum(0))
        self.disarm()
        return out


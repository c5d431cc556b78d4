"""Backward passes: a closure's two losses become gradients in the flat buffers.

The optimizer never differentiates anything itself; this module does, in three ways:
``evaluate`` (one closure call: the forget and retain gradients straight into ``GRAD_F`` /
``GRAD_R``, optionally keeping their graphs for Hessian-vector products), and ``vjp`` (a
double backward through kept gradients, into a scratch buffer). Replicated data parallelism
averages every result across ranks here (:mod:`ofmu.distributed`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .distributed import average_
from .flat import FlatBuffer, Slot


@dataclass
class Evaluation:
    """One closure call: the losses and, where asked for, the per-parameter gradients with their
    graphs (``gf``/``gr``, parameter-ordered, for double backward)."""

    loss_f: Tensor
    loss_r: Tensor
    gf: list[Tensor | None] | None = None
    gr: list[Tensor | None] | None = None


def call_closure(closure: Callable, same_batch: bool = False) -> tuple[Tensor, Tensor]:
    """``closure()`` checked: two scalar losses that require grad."""
    out = closure(same_batch=True) if same_batch else closure()
    if isinstance(out, Tensor) or not isinstance(out, (tuple, list)) or len(out) != 2:
        got = "a single Tensor" if isinstance(out, Tensor) else repr(type(out).__name__)
        if isinstance(out, (tuple, list)):
            got = f"a sequence of {len(out)} values"
        raise TypeError(f"the closure must return (forget_loss, retain_loss); got {got}")
    for name, loss in zip(("forget_loss", "retain_loss"), out):
        if not isinstance(loss, Tensor):
            raise TypeError(f"{name} returned by the closure must be a Tensor, got "
                            f"{type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(f"{name} returned by the closure must be a scalar, got shape "
                             f"{tuple(loss.shape)} (reduce it, e.g. with .mean())")
        if not loss.requires_grad:
            raise ValueError(f"{name} returned by the closure does not require grad (was "
                             "it computed under torch.no_grad() or from detached outputs?)")
    return out[0].reshape(()), out[1].reshape(())


class NoDoubleBackwardError(RuntimeError):
    """A mode needs a double backward and the model has an op without one (fused attention)."""

    def __init__(self, mode: str, detail: str):
        super().__init__(
            f"{mode} differentiates through the gradients (a double backward), but this model "
            f"has an operation without a double backward ({detail.splitlines()[0]}). "
            "PyTorch's scaled_dot_product_attention (the default attention of transformers "
            "models, on CPU and CUDA) is the usual cause. Fixes: outer_hvp='fd' (finite "
            "differences: first-order memory, works everywhere) with similarity='project' or "
            "'none'; rho=0 (no stationarity penalty); or load the model with "
            "attn_implementation='eager'.")


@contextlib.contextmanager
def _naming_double_backward(why: str):
    try:
        yield
    except RuntimeError as e:
        if "derivative for" in str(e) and "not implemented" in str(e):
            raise NoDoubleBackwardError(why, str(e)) from e
        raise


class Autodiff:
    """Gradients of the optimised parameters into the flat buffers of ``buffers``."""

    def __init__(self, buffers: list[FlatBuffer], process_group, hooks: list):
        self.buffers, self.process_group, self.hooks = buffers, process_group, hooks

    @property
    def params(self) -> list[Tensor]:
        return [p for buf in self.buffers for p in buf.params]

    def views(self, slot: Slot) -> list[Tensor]:
        return [v for buf in self.buffers for v in buf.buffer(slot)[1]]

    def evaluate(self, closure: Callable, *, forget: bool = True, graph_f: bool = False,
                 graph_r: bool = False, same_batch: bool = False,
                 why: str = "this mode") -> Evaluation:
        """Call the closure; gradients into ``GRAD_F`` (unless ``forget=False``) and ``GRAD_R``.
        ``graph_f``/``graph_r`` keep that gradient's graph (for a double backward that ``why``
        names in the error raised when the model cannot do one)."""
        with torch.enable_grad():
            loss_f, loss_r = call_closure(closure, same_batch)
            ev = Evaluation(loss_f, loss_r)
            if graph_f or graph_r:
                with _naming_double_backward(why):
                    self._grad_with_graphs(ev, graph_f, graph_r)
            else:
                self._backward(loss_f if forget else None, loss_r)
        if forget:
            self.average(Slot.GRAD_F)
        self.average(Slot.GRAD_R)
        # Whether a parameter gets sparse gradients is structural (nn.Embedding(sparse=True)):
        # once one backward pass went through, the per-parameter check hooks can go.
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        return ev

    def _backward(self, lf: Tensor | None, lr: Tensor) -> None:
        """``.backward()`` straight into the flat buffers (their slices are bound as ``p.grad``)."""
        for buf in self.buffers:
            if lf is not None:
                buf.grad_f.zero_()
            buf.grad_r.zero_()
            buf.bind_grads(Slot.GRAD_F)
        if lf is not None:
            torch.autograd.backward(lf, inputs=self.params)
        for buf in self.buffers:
            buf.bind_grads(Slot.GRAD_R)
        try:
            torch.autograd.backward(lr, inputs=self.params)
        except RuntimeError as e:
            if "second time" in str(e):
                raise RuntimeError("the forget and retain losses share part of one autograd "
                                   "graph; compute them in separate forward passes") from e
            raise

    def _grad_with_graphs(self, ev: Evaluation, graph_f: bool, graph_r: bool) -> None:
        params = self.params
        ev.gf = list(torch.autograd.grad(ev.loss_f, params, create_graph=graph_f,
                                         allow_unused=True))
        ev.gr = list(torch.autograd.grad(ev.loss_r, params, create_graph=graph_r,
                                         allow_unused=True))
        self.store(Slot.GRAD_F, ev.gf, average=False)
        self.store(Slot.GRAD_R, ev.gr, average=False)

    def vjp(self, outputs: list[Tensor | None], seeds: list[Tensor], into: Slot,
            why: str = "this mode") -> None:
        """``sum_i J_i^T seed_i`` over the outputs that depend on the parameters, into ``into``
        (the graph is retained: a step may differentiate the same gradients twice). ``why``
        names the mode that asked for this double backward, for the error message."""
        pairs = [(o, w) for o, w in zip(outputs, seeds) if o is not None and o.requires_grad]
        params = self.params
        if not pairs:
            result = [None] * len(params)
        else:
            with _naming_double_backward(why):
                result = torch.autograd.grad([o for o, _ in pairs], params,
                                             grad_outputs=[w.to(o.dtype) for o, w in pairs],
                                             retain_graph=True, allow_unused=True)
        self.store(into, list(result))

    def store(self, slot: Slot, tensors: list[Tensor | None], average: bool = True) -> None:
        """A parameter-ordered list into buffer ``slot`` (``None`` gives zeros)."""
        i = 0
        for buf in self.buffers:
            n = len(buf.params)
            buf.copy_in(buf.buffer(slot)[1], tensors[i : i + n])
            i += n
        if average:
            self.average(slot)

    def average(self, slot: Slot) -> None:
        average_([buf.flat(slot) for buf in self.buffers], self.process_group)

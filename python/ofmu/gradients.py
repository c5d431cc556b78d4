"""Backward passes: a closure's two losses become gradients in the flat buffers.

The optimizer never differentiates anything itself; this module does, in three ways:
``evaluate`` (one closure call: the forget and retain gradients straight into ``GRAD_F`` /
``GRAD_R``, optionally keeping their graphs for Hessian-vector products), and ``vjp`` (a
double backward through kept gradients, into a scratch buffer). How a backward pass reaches
the buffers, and what is averaged across ranks, is the layout's (:mod:`ofmu.layouts`:
replicated or FSDP2-sharded parameters).
A backward pass that reaches none of the optimizer's parameters raises (they were replaced
after the optimizer was built) instead of leaving the step a silent no-op.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .distributed import mean_losses
from .flat import FlatBuffer, Slot

if TYPE_CHECKING:
    from .layouts import Layout


@dataclass
class Evaluation:
    """One closure call: the losses and, where asked for, the per-parameter gradients with their
    graphs (``gf``/``gr``, parameter-ordered, for double backward)."""

    loss_f: Tensor
    loss_r: Tensor
    gf: list[Tensor | None] | None = None
    gr: list[Tensor | None] | None = None


_ACCEPTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def accepts(closure: Callable, keyword: str) -> bool:
    """Whether ``closure`` takes ``keyword`` (``inspect.signature`` once per function: it costs
    ~10 us, a step asks up to three times)."""
    fn = getattr(closure, "__func__", closure)  # a bound method: new object each access
    try:
        names = _ACCEPTS.get(fn)
    except TypeError:  # not weakly referenceable (a callable instance of a slotted class)
        return keyword in inspect.signature(closure).parameters
    if names is None:
        names = frozenset(inspect.signature(closure).parameters)
        try:
            _ACCEPTS[fn] = names
        except TypeError:
            pass
    return keyword in names


def call_closure(closure: Callable, same_batch: bool = False,
                 need_forget: bool = True) -> tuple[Tensor | None, Tensor]:
    """``closure()`` checked: two scalar losses that require grad. A closure that accepts the
    keywords is told ``same_batch=True`` (reuse the last minibatches) and ``need_forget=False``
    (the forget loss is not used: it may return ``(None, retain_loss)`` and skip that forward)."""
    skip_forget = not need_forget and accepts(closure, "need_forget")
    if same_batch or skip_forget:
        kwargs = {"same_batch": True} if same_batch else {}
        if skip_forget:
            kwargs["need_forget"] = False
        out = closure(**kwargs)
    else:  # the usual call: no keyword dict to build and unpack
        out = closure()
    if skip_forget and isinstance(out, (tuple, list)) and len(out) == 2 and out[0] is None:
        return None, _checked_loss("retain_loss", out[1])
    if isinstance(out, Tensor) or not isinstance(out, (tuple, list)) or len(out) != 2:
        got = "a single Tensor" if isinstance(out, Tensor) else repr(type(out).__name__)
        if isinstance(out, (tuple, list)):
            got = f"a sequence of {len(out)} values"
        raise TypeError(f"the closure must return (forget_loss, retain_loss); got {got}")
    return _checked_loss("forget_loss", out[0]), _checked_loss("retain_loss", out[1])


def _checked_loss(name: str, loss) -> Tensor:
    """``loss`` as a 0-dim tensor (a 0-dim loss as it is: a reshape would add a view to the
    graph, an op forward and backward)."""
    if not isinstance(loss, Tensor):
        raise TypeError(f"{name} returned by the closure must be a Tensor, got "
                        f"{type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"{name} returned by the closure must be a scalar, got shape "
                         f"{tuple(loss.shape)} (reduce it, e.g. with .mean())")
    if not loss.requires_grad:
        raise ValueError(f"{name} returned by the closure does not require grad (was "
                         "it computed under torch.no_grad() or from detached outputs?)")
    return loss if loss.dim() == 0 else loss.reshape(())


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
        msg = str(e)
        if ("derivative for" in msg and "not implemented" in msg) or "once_differentiable" in msg:
            raise NoDoubleBackwardError(why, str(e)) from e
        raise


class Autodiff:
    """Gradients of the optimised parameters into the flat buffers of ``buffers``, laid out
    across ranks by ``layout`` (a :mod:`ofmu.layouts` object)."""

    def __init__(self, buffers: list[FlatBuffer], layout: Layout, hooks: list):
        self.buffers, self.layout, self.hooks = buffers, layout, hooks
        self._warned: set[frozenset] = set()  # unreached sets already warned about
        # the mode to name if the double backward tried at the next closure call fails; and
        # whether one succeeded (the model can do it: never tried again)
        self._pending: str | None = None
        self._double_ok = False

    def expect_double_backward(self, graph_f: bool, graph_r: bool, why: str) -> None:
        """A step is about to start that differentiates through these gradient graphs (``why``
        names the modes): try a double backward at its first closure call, before any update
        (until one succeeded), so that a model without one fails before anything changed."""
        self._pending = why if (graph_f or graph_r) and not self._double_ok else None

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
        names in the error raised when the model cannot do one). Under torch.distributed the
        returned losses are averaged over the ranks (the loss on the union of the minibatches,
        so that ``forget_loss_cap`` decides alike on every rank)."""
        if graph_f or graph_r:  # FSDP2 refuses (rho raised after construction, say)
            self.layout.check_param_grads(why, self.buffers)
        check, self._pending = self._pending, None
        prev = torch.is_grad_enabled()
        torch._C._set_grad_enabled(True)  # torch.enable_grad() without its context object
        try:
            loss_f, loss_r = call_closure(closure, same_batch, need_forget=forget)
            if check is not None:
                self._try_double_backward(loss_r, check)
            ev = Evaluation(loss_f, loss_r)
            if graph_f or graph_r:
                with _naming_double_backward(why):
                    self._grad_with_graphs(ev, graph_f, graph_r)
            else:
                self._backward(loss_f if forget else None, loss_r)
        finally:
            torch._C._set_grad_enabled(prev)
        if self.layout.averages:
            if forget:
                self.average(Slot.GRAD_F)
            self.average(Slot.GRAD_R)
        ev.loss_f, ev.loss_r = mean_losses(None if ev.loss_f is None else ev.loss_f.detach(),
                                           ev.loss_r.detach(), self.layout.loss_group)
        if self.hooks:
            # Whether a parameter gets sparse gradients is structural (nn.Embedding(sparse=True)):
            # once one backward pass went through, the per-parameter check hooks can go.
            remove_handles(self.hooks)
        return ev

    def _try_double_backward(self, loss_r: Tensor, why: str) -> None:
        """``H_r g_r`` through the retain loss's graph (results dropped, graph kept for the
        normal pass): raises what the step's later double backward would raise
        (:class:`NoDoubleBackwardError`; FSDP2: the sharded-mode error) before any update.
        The retain loss, not the forget loss, so that this costs no backward pass through the
        forget loss (the model's operations are the same). One double backward, once."""
        self.layout.check_param_grads(why, self.buffers)
        params = self.params
        with _naming_double_backward(why):
            grads = torch.autograd.grad(loss_r, params, create_graph=True, retain_graph=True,
                                        allow_unused=True)
            outs = [g for g in grads if g is not None and g.requires_grad]
            if outs:
                torch.autograd.grad(outs, params, grad_outputs=[g.detach() for g in outs],
                                    retain_graph=True, allow_unused=True)
        self._double_ok = True

    def _check_reached(self, reached_f: int | None, reached_r: int) -> None:
        """Parameters each backward pass reached (None: not run): none at all means they were
        replaced; none from one loss means that loss is a constant to the optimizer."""
        if not self.buffers:  # no parameters (every buffer holds at least one)
            return
        if reached_r == 0 and not reached_f:
            raise RuntimeError(_replaced_message(self.buffers[0].names[0],
                                                 self.layout.also_replaced_by))
        for name, n in (("forget_loss", reached_f), ("retain_loss", reached_r)):
            if n == 0:
                raise RuntimeError(
                    f"{name} returned by the closure does not depend on any parameter this "
                    "optimizer updates (its backward pass reached none of them), so its step "
                    "would silently be zero. Compute it from the model the optimizer was built "
                    "on, without detaching or torch.no_grad(); a parameter frozen, replaced or "
                    "re-created after OFMU(...) needs a new optimizer.")

    def _warn_unreached(self, missed: list[bool]) -> None:
        """Warn (once per set) about parameters neither loss reached while others were: unused
        by the model, or replaced after construction (a re-created or assign-loaded submodule)."""
        if not any(missed):
            return
        params = self.params
        idx = frozenset(i for i, m in enumerate(missed) if m and params[i].numel())
        if not idx or idx in self._warned:
            return
        self._warned.add(idx)
        names = [n for buf in self.buffers for n in buf.names]
        shown = [names[i] for i in sorted(idx)]
        warnings.warn(
            f"{len(shown)} parameter{'s' if len(shown) > 1 else ''} received no gradient from "
            "either loss: "
            f"{', '.join(shown[:5])}{', ...' if len(shown) > 5 else ''}. Either the model does not "
            "use them, or they were replaced after the optimizer was built (a submodule "
            "re-created, or loaded with load_state_dict(assign=True)), and the model now trains "
            "tensors the optimizer never sees: then rebuild the optimizer. Only weight decay "
            "moves a parameter without gradient.", stacklevel=2)

    def _backward(self, lf: Tensor | None, lr: Tensor) -> None:
        """The forget (unless None) and retain backward passes into ``GRAD_F`` / ``GRAD_R``."""
        self.layout.begin(self.buffers)
        reached_f = None if lf is None else self.layout.backward(self.buffers, lf, Slot.GRAD_F)
        try:
            reached_r = self.layout.backward(self.buffers, lr, Slot.GRAD_R)
        except RuntimeError as e:
            if "second time" in str(e):
                raise RuntimeError("the forget and retain losses share part of one autograd "
                                   "graph; compute them in separate forward passes") from e
            raise
        if reached_r == 0 or reached_f == 0:
            self._check_reached(reached_f, reached_r)
        if lf is None:
            return
        n = sum([len(buf.params) for buf in self.buffers])
        if reached_f < n and reached_r < n:  # else no parameter was missed
            missed = self.layout.missed(self.params)
            if any(missed):
                self._warn_unreached(missed)

    def _grad_with_graphs(self, ev: Evaluation, graph_f: bool, graph_r: bool) -> None:
        params = self.params
        ev.gf = list(torch.autograd.grad(ev.loss_f, params, create_graph=graph_f,
                                         allow_unused=True))
        ev.gr = list(torch.autograd.grad(ev.loss_r, params, create_graph=graph_r,
                                         allow_unused=True))
        self._check_reached(sum(g is not None for g in ev.gf), sum(g is not None for g in ev.gr))
        self._warn_unreached([a is None and b is None for a, b in zip(ev.gf, ev.gr)])
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
        """The buffer averaged over the ranks, as the layout does it."""
        self.layout.average(self.buffers, slot)


def _replaced_message(name: str, also: str) -> str:
    return (f"no gradient reached any of the optimizer's parameters (first: {name}): the model no "
            "longer uses the tensors OFMU was built with. They were replaced after the optimizer "
            "was built: by fully_shard() (FSDP2) or another wrapper applied after OFMU(...), by "
            "load_state_dict(assign=True), or by model surgery"
            + also +
            ". Build the optimizer last: OFMU(model.parameters(), ...) after wrapping and loading "
            "(or check that the closure's losses depend on these parameters).")


# The engine call behind torch.autograd.backward (private to torch, present in the versions
# ofmu supports); None: the public function is used
_ENGINE_BACKWARD = getattr(torch.autograd.graph, "_engine_run_backward", None)


def backward_into_leaves(loss: Tensor, inputs: list[Tensor], seed: Tensor | None = None) -> None:
    """``torch.autograd.backward(loss, inputs=inputs)`` for a 0-dim real loss: the same engine
    call with the same arguments, without the public function's per-input Python checks (two
    generator steps and a ``__torch_function__`` probe per input, and the implicit seed's
    shape checks: about 25 us a pass on a small model, more than the pass's own bookkeeping).
    ``seed``: the ones tensor to start from (see :func:`fresh_seed`; None: a new one).
    Anything else (a tensor subclass among the loss and the inputs, a complex loss, inside a
    functorch transform) takes the public function."""
    inputs = tuple(inputs)
    if (_ENGINE_BACKWARD is None or type(loss) is not Tensor or not loss.is_floating_point()
            or loss.dim() != 0 or torch._C._are_functorch_transforms_active()
            or torch._C._has_torch_function(inputs)):
        torch.autograd.backward(loss, inputs=inputs)
        return
    # (ones_like's default memory format is torch.preserve_format, what the public function
    # passes; naming it costs a keyword parse)
    _ENGINE_BACKWARD((loss,), (torch.ones_like(loss) if seed is None else seed,),
                     False, False, inputs, allow_unreachable=True, accumulate_grad=True)


def fresh_seed(seed: Tensor | None, loss: Tensor) -> Tensor:
    """A 0-dim ones tensor like ``loss`` to start its backward pass from: ``seed`` again unless
    it does not match ``loss`` or was written to (its version counter moved: a backward
    function that modified its incoming gradient in place, which autograd does not forbid).
    Kept from pass to pass, it saves a ``ones_like`` per pass (about 6 us on a small model,
    in a step); the engine itself never writes into it (it holds another reference, so
    nothing accumulates into it in place or takes it over as a gradient)."""
    if (seed is None or seed._version or seed.dtype != loss.dtype or seed.device != loss.device
            or seed.dim() != loss.dim()):
        seed = torch.ones_like(loss)
    return seed


def remove_handles(handles: list) -> None:
    """Remove every hook handle in ``handles`` and empty the list (also used by ``OFMU``)."""
    for h in handles:
        h.remove()
    handles.clear()

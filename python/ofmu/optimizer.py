"""The ``OFMU`` optimizer: OFMU's two-loop unlearning algorithm as a ``torch.optim.Optimizer``.

The class validates and gathers (param groups, flat buffers, per-parameter state, the
hyperparameters of this step); :mod:`ofmu.functional` does the math; :mod:`ofmu.backends`
picks the kernels.
"""

from __future__ import annotations

import functools
import operator
import weakref
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import backends, functional, layouts
from .distributed import resolve_process_group
from .flat import MOMENTS, FlatBuffer, Slot, check_distinct, check_frozen
from .gradients import Autodiff, remove_handles
from .modes import OUTER_HVP, SIMILARITY, double_backward_graphs
from .validation import (
    GLOBAL_KEYS,
    StepGuard,
    check_number,
    group_values,
    has_global_key,
    same_objects,
    validate_distributed,
    validate_group,
    validate_options,
)

_STEP_KEYS = {loop: f"{loop}_step" for loop in MOMENTS}  # per-parameter Adam step counts
_STATE_KEYS = {s.value for pair in MOMENTS.values() for s in pair} | set(_STEP_KEYS.values())
_COUNTERS = ("skipped", "capped")
_OPTIONS = operator.attrgetter(*GLOBAL_KEYS)  # the per-optimizer settings, one C call
# Settings fixed at construction: they decide the optimizer state, the kernels, the ranks.
_FIXED = ("preconditioner", "inner_preconditioner", "backend", "process_group")


def _one_step(entry: str) -> Callable:
    """The body of an entry point of a step (``entry``: ``step``, ``inner_step``,
    ``outer_step``), run with the step guard held (one step at a time) and autograd off, as
    under ``torch.no_grad()`` (without its context-manager objects: a few microseconds of a
    step on a small model)."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(self, *args, **kwargs):
            self._guard.acquire(entry)
            prev = torch.is_grad_enabled()
            torch._C._set_grad_enabled(False)  # what torch.no_grad() itself calls
            try:
                return fn(self, *args, **kwargs)
            finally:
                torch._C._set_grad_enabled(prev)
                self._guard.release()
        return run
    return wrap


class OFMU(Optimizer):
    """OFMU (Asif & Amiri, ICLR 2026): bi-level unlearning, forgetting first, utility on top.

    With g_f = grad L_f (forget loss, ascended), g_r = grad L_r (retain loss, descended),
    d = <g_f, g_r>, one call of ``step(closure)`` runs::

        for t in 1..inner_steps:                 # inner loop: ascent on Phi = L_f - beta*cos
            theta += inner_lr * (u(theta) - weight_decay*theta)
        for s in 1..outer_steps:                 # outer loop: descent on L_r + rho*|grad Phi|^2
            v = u(theta);  h ~ Hessian(Phi) v     # h only while rho > 0
            theta -= lr * (g_r + 2*rho*h + weight_decay*theta)
            rho = min(rho * rho_growth, rho_max)

    Every gradient is taken on fresh minibatches (one ``closure()`` call each). The ascent
    direction u depends on ``similarity``:

    * "project": u = g_f - beta * (d / |g_r|^2) * g_r, so <u, g_r> = (1 - beta) d; at beta = 1
      the ascent step leaves L_r unchanged to first order (0 <= beta <= 1);
    * "hvp": u = g_f - beta * grad(cos(g_f, g_r)) (one double backward);
    * "none": u = g_f (plain gradient ascent).

    and h on ``outer_hvp``: "forget" (H_f v), "exact" (autograd through u), "fd" (central
    difference of u along v: two more closures, no double backward), "none" (h = 0). Every
    epsilon is relative to its own denominator, so scaling a loss leaves u/|u| unchanged. The
    cosine and the projection are global (all groups and devices); each group applies them
    with its own hyperparameters. Full formulas and design: docs/design.md.

    Args:
        params: parameters or param-group dicts. They are re-viewed into one flat buffer per
            (group, device, dtype): build the optimizer after ``model.to(...)``.
        lr: outer step size (schedulers act on it). inner_lr: inner step size (None: ``lr``;
            otherwise scaled by ``lr / lr_at_construction``, so a scheduler anneals both).
        inner_steps, outer_steps: loop lengths per ``step`` (defaults 1 and 6).
        beta: similarity weight. rho, rho_growth, rho_max: stationarity penalty and its
            geometric schedule.
        similarity, outer_hvp: the modes above.
        preconditioner: "adam" (each loop's direction through torch's fused Adam, separate
            moments per loop; betas, adam_eps), "sgd" (directions as written) or "sign"
            (stateless Adam: lr * g / (|g| + adam_eps), no moments). inner_preconditioner:
            the inner loop's, when it differs (None: the same); "sign" there saves the inner
            moments (16 instead of 24 bytes of state per fp32 parameter).
        weight_decay: L2 shrinkage in both loops. max_grad_norm: per-group clipping of both
            directions, from the norms the reductions already computed.
        forget_loss_cap: no ascent while the forget loss is at or above this value (default
            20 nats: the forgotten labels' probability is e^-20 by then). A safeguard against
            runaway ascent, counted in ``last_stats()["capped_steps"]``; ``math.log(num_classes)``
            stops a classifier at chance level; None switches it off.
        eps, fd_delta: relative epsilon; step of ``outer_hvp="fd"``.
        backend: "auto" | "torch" | "cpp" | "cuda" | "triton" (``OFMU_BACKEND`` overrides auto),
            or an :class:`ofmu.backends.Backend` record, used on every device as given.
        process_group: "auto" averages the flat gradients across ranks when torch.distributed
            runs (every rank takes the single-process step); None keeps ranks apart.
            FSDP2-sharded (DTensor) parameters are detected: docs/scaling.md.

    The closure takes no arguments (optionally a keyword ``same_batch``, then reused for
    ``outer_hvp="fd"``'s probes) and returns ``(forget_loss, retain_loss)`` from separate
    forward passes; the optimizer runs the backward passes. A step whose reductions are
    non-finite leaves the parameters untouched and is counted; ``last_stats()`` syncs and
    reports the diagnostics. A step that raises (in the closure or a backward pass) keeps the
    updates it completed and nothing of the failed one; a mode needing a double backward the
    model cannot do fails at the first closure call, before any update (docs/guarantees.md).

    Defaults: a first-order recipe measured to forget without collapsing the retained data
    (Adam per loop, 1 inner : 6 outer steps, beta = 1, rho = 0, forget-loss cap 20 nats); it
    needs no double backward, so it runs on any model (fused attention included).
    ``OFMU.paper_config()`` gives the paper's form (5 inner steps, SGD, rho > 0, H_f v).
    What they achieve on the package's TOFU-style language-model benchmark (a small Llama, 320
    gradient evaluations, learning rate chosen on validation; docs/lm-benchmark.md): forget
    quality above 0.05 with at least 0.95x the retain model's utility at forget 5% in 4 of 6
    data seeds, at forget 10% in 2 of 6 (NPO: 6 of 6 and 4 of 6); paired by data seed, their
    validation frontier lies above NPO's at forget 5% and ties it at 10%. Where both have
    forgotten as far as the retain model they keep equal utility, but OFMU keeps fewer of the
    unrequested facts about the same authors (0.04 against 0.13 of their probability at 10%)
    and a little less world knowledge (0.97 against 0.99); GradDiff keeps 0.70x the
    utility there. With TOFU's question counts (100 authors per
    pool, 1280 evaluations) they meet it at forget 5% in 2 of 3 data seeds (NPO 0 of 3) and at
    10% in none (nor does NPO); in TOFU's shape at forget 1% in 3 of 3 (NPO 1 of 3, which
    over-forgets); on a 4.2M-parameter Llama at forget 10%, in 3 of 4 (NPO and GradDiff 0 of
    4, which forget at 0.74-0.91x utility; OFMU's frontier lies above both on every data seed),
    though on two of the three the forget answers stay likelier than under the retain model
    (0.19-0.27 against 0.02-0.03). There held-out perplexity rises 1.3-1.6x (NPO's 0.9-1.1x):
    they cost more fluency than NPO (mixing general text into the retain batches removed that
    in an earlier setting). Trained through LoRA adapters they did not unlearn within the
    budget. One step costs 10 gradient evaluations;
    ``outer_steps=2`` (4.7) forgets more per evaluation at the same utility (a tie overall).

    Example::

        opt = OFMU(model.parameters(), lr=1e-3)
        for _ in range(200):
            opt.step(closure)   # closure() -> (forget_loss, retain_loss)
        print(opt.last_stats())
    """

    @staticmethod
    def paper_config() -> dict:
        """The paper's form of the algorithm, as constructor keywords (pass ``lr`` yourself):
        five SGD inner steps per outer step, the stationarity penalty on (rho = 0.01, h = H_f v,
        one double backward: needs eager attention on transformers), no forget-loss cap."""
        return dict(inner_steps=5, outer_steps=1, beta=0.5, rho=0.01, similarity="project",
                    outer_hvp="forget", preconditioner="sgd", forget_loss_cap=None)

    def __init__(self, params, lr: float = 1e-3, inner_lr: float | None = None,
                 inner_steps: int = 1, beta: float = 1.0, rho: float = 0.0,
                 rho_growth: float = 1.0, rho_max: float = 1.0, similarity: str = "project",
                 outer_hvp: str = "fd", weight_decay: float = 0.0,
                 max_grad_norm: float | None = None, eps: float = 1e-12, fd_delta: float = 1e-3,
                 outer_steps: int = 6, preconditioner: str = "adam",
                 betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8,
                 backend: str | backends.Backend = "auto", process_group="auto",
                 forget_loss_cap: float | None = 20.0, inner_preconditioner: str | None = None):
        validate_options(similarity, outer_hvp, inner_steps, outer_steps, preconditioner, eps,
                         fd_delta, backend, forget_loss_cap, inner_preconditioner)
        self.inner_preconditioner = inner_preconditioner
        self.similarity, self.outer_hvp = similarity, outer_hvp
        self.sim_mode, self.hvp_mode = SIMILARITY[similarity], OUTER_HVP[outer_hvp]
        self.inner_steps, self.outer_steps, self.preconditioner = inner_steps, outer_steps, preconditioner
        self.eps, self.fd_delta, self.backend = eps, fd_delta, backend
        self.forget_loss_cap = forget_loss_cap
        self.process_group = resolve_process_group(process_group)
        validate_distributed(outer_hvp, self.process_group)
        self._fixed = {key: getattr(self, key) for key in _FIXED}
        self._loops: tuple[bool, bool] | None = None  # the loops of the step about to start
        self._parts: list[functional.GroupBuffer] = []
        self.backend_reasons: list[str] = []
        self._hooks: list = []  # sparse-gradient checks, dropped after the first backward
        weakref.finalize(self, remove_handles, self._hooks)
        self._state = functional.StepState()
        self._guard = StepGuard()  # one step at a time (threads, a closure calling step)
        # What the last update validated, remembered by identity (validation.same_objects) so
        # that an unchanged optimizer is not validated again: the settings, each group's
        # values with its Hyper, the StepConfig built from them, the parameters in param_groups
        self._options_seen: tuple | None = None
        self._groups_seen: dict[int, tuple[tuple, functional.Hyper]] = {}
        # (options, hypers, the StepConfig built from them, the double-backward graphs of
        # each loops pair under it)
        self._cfg_seen: tuple | None = None
        self._params_seen: list[Tensor] = []
        self._frozen: list[tuple[Tensor, str]] = []  # params left out (requires_grad=False)
        # Replicated or Sharded, chosen by the parameters of the first flat buffer
        self._layout: layouts.Layout = layouts.Replicated(self.process_group)
        self._autodiff = Autodiff([], self._layout, self._hooks)
        defaults = dict(lr=lr, inner_lr=inner_lr, beta=beta, rho=rho, rho_growth=rho_growth,
                        rho_max=rho_max, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                        betas=tuple(betas), adam_eps=adam_eps)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups, buffers, state

    def add_param_group(self, param_group: dict) -> None:
        for key in GLOBAL_KEYS:
            if key in param_group:
                raise ValueError(f"{key!r} is a per-optimizer setting and cannot be set per "
                                 "param group")
        super().add_param_group(param_group)
        gi = len(self.param_groups) - 1
        group = self.param_groups[gi]
        try:  # a refused group is not kept
            validate_group(group, gi, self.similarity)
            for pi, p in enumerate(group["params"]):
                _check_param(p, f"param_groups[{gi}].params[{pi}] (shape {tuple(p.shape)})")
        except Exception:
            self.param_groups.pop()
            raise
        group.setdefault("rho_k", float(group["rho"]))
        group.setdefault("k", 0)
        group.setdefault("lr0", float(group["lr"]))
        by_key: dict[tuple, list[tuple[Tensor, str]]] = defaultdict(list)
        for pi, p in enumerate(group["params"]):
            if not p.requires_grad:  # left out; must stay frozen (checked every step)
                self._frozen.append((p, f"param_groups[{gi}].params[{pi}] (shape {tuple(p.shape)})"))
                continue
            name = f"param_groups[{gi}].params[{pi}] (shape {tuple(p.shape)})"
            by_key[(p.device, p.dtype)].append((p, name))
            self._hooks.append(p.register_hook(_dense_grad_check(name)))
        for (device, _), items in by_key.items():
            params, names = [p for p, _ in items], [n for _, n in items]
            check_distinct(params, names)  # sharded buffers too
            layout = (self._layout if self._parts
                      else layouts.choose(params, names, self.process_group))
            buf = layout.flat_buffer(params, names, self.flat_buffers, self.sim_mode,
                                     self.hvp_mode, float(group["rho"]))
            if layout is not self._layout:  # the first buffer: its layout is the optimizer's
                self._layout, self._autodiff = layout, Autodiff([], layout, self._hooks)
            buf.bind_grads(Slot.GRAD_R)  # p.grad always shows the retain buffer (zeros here)
            backend, reason = backends.select(self.backend, device)
            self._parts.append(functional.GroupBuffer(buf, backend, gi))
            self._autodiff.buffers.append(buf)
            self.backend_reasons.append(f"{buf.dtype} on {device}: {backend.name} ({reason})")
        self._init_state()

    def _init_state(self) -> None:
        """``state[p]`` per parameter, the torch convention: Adam moments per loop as views into
        the flat moment buffers, and each loop's step count (shared by a buffer's parameters)."""
        loops = {loop: slots for loop, slots in MOMENTS.items()
                 if self._settings().preconditioner_of(loop) == "adam"}
        for i, part in enumerate(self._parts):
            for loop, slots in loops.items():
                step = self._state.adam_steps.setdefault(
                    (i, loop), torch.zeros((), dtype=torch.float32, device=part.buf.device))
                for pi, p in enumerate(part.buf.params):
                    st = self.state[p]
                    for slot in slots:
                        st[slot.value] = self._layout.state_view(part.buf, slot, pi)
                    st[_STEP_KEYS[loop]] = step

    def rebuild(self) -> None:
        """Rebuild the flat buffers, the per-parameter state and the backends from the tensors
        in ``param_groups`` now (the same group dicts: schedulers and wrappers keep theirs).

        For wrappers that replace the parameters after the optimizer was built and before its
        first step, as torch's optimizers, which keep no state until then, allow: accelerate's
        FSDP2 ``prepare(model, optimizer)`` applies ``fully_shard`` and then puts the sharded
        ``DTensor`` parameters into ``param_groups`` in place. Every step (and ``state_dict``)
        calls it when the tensors differ from the ones the buffers were built from. Refused once
        a step was taken: the gradients, moments and updated parameters live in the old
        buffers."""
        taken = any(g.get("k", 0) > 0 for g in self.param_groups) or any(
            bool(t) for t in self._state.adam_steps.values())
        if taken:
            raise RuntimeError(
                "the tensors in param_groups were replaced after OFMU took steps; its gradients, "
                "moments and the parameters it updates live in buffers built from the original "
                "ones. Build a new optimizer on the new parameters (and load its state from a "
                "checkpoint if needed).")
        groups = list(self.param_groups)
        self.param_groups.clear()
        self.state.clear()
        self._parts.clear()
        self._autodiff.buffers.clear()
        self.backend_reasons.clear()
        self._frozen.clear()
        self._state.adam_steps.clear()
        for g in groups:
            self.add_param_group(g)

    def _follow_switched_params(self) -> None:
        """:meth:`rebuild` when the tensors in ``param_groups`` are not the ones the buffers
        hold (one pass over the parameter ids; none when they are, in order, the tensors found
        last time)."""
        current = [p for g in self.param_groups for p in g["params"]]
        if same_objects(self._params_seen, current):
            return
        held = {id(p) for part in self._parts for p in part.buf.params}
        held.update(id(p) for p, _ in self._frozen)
        if len(current) != len(held) or not all(id(p) in held for p in current):
            self.rebuild()
        self._params_seen = [p for g in self.param_groups for p in g["params"]]

    @property
    def flat_buffers(self) -> list[FlatBuffer]:
        """The flat buffers, one per (param group, device, dtype), in construction order: what
        the parameters, gradients and moments are views of (read them; resize nothing)."""
        return [part.buf for part in self._parts]

    def state_dict(self) -> dict:
        self._follow_switched_params()  # DCP may ask before the first step
        sd = super().state_dict()
        sd["ofmu"] = {f"{k}_steps": t.clone() for k, t in self._state.counters.items()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's ``load_state_dict``, checked first: the param groups (sizes, hyperparameters),
        every parameter's state (keys this optimizer keeps, shapes) and the counters are
        validated before anything is applied, so a refused checkpoint changes nothing."""
        self._check_options()
        self._check_buffers()
        sd = dict(state_dict)
        extra = dict(sd.pop("ofmu", None) or {})
        if extra.get("moments") or extra.get("adam_steps"):
            raise ValueError("this checkpoint was written by ofmu 0.1.0, which saved Adam moments "
                             "as whole flat buffers without shapes; it cannot be matched to "
                             "parameters safely. Resume from a checkpoint written by this "
                             "version, or restart the unlearning run")
        saved_groups, saved_state = sd.get("param_groups"), sd.get("state", {})
        _check_saved_groups(self.param_groups, saved_groups, self.similarity)
        by_id = {pid: p for saved, group in zip(saved_groups, self.param_groups)
                 for pid, p in zip(saved["params"], group["params"])}
        copies = []
        for pid, saved in saved_state.items():
            if pid not in by_id:
                raise ValueError(f"checkpoint has state for parameter {pid!r}, which none of its "
                                 "param groups lists: the checkpoint is corrupt or not an "
                                 "optimizer state_dict")
            copies += _param_state_copies(self.state, by_id[pid], pid, saved, self._settings())
        counters = _saved_counters(extra)
        # everything checked: apply
        sd["state"] = {}
        super().load_state_dict(sd)  # param groups; state emptied (the views are rebuilt below)
        for group in self.param_groups:
            group.setdefault("rho_k", float(group["rho"]))
            group.setdefault("k", 0)
            group.setdefault("lr0", float(group["lr"]))
        self._init_state()
        for dst, value in copies:  # the views of the flat buffers, taken before: the same memory
            dst.copy_(value)
        self._state.load_counters(counters)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero both gradient buffers. ``p.grad`` keeps pointing into the retain buffer (the
        flat layout is the point of this optimizer), whatever ``set_to_none`` says."""
        for part in self._parts:
            part.buf.grad_f.zero_()
            part.buf.grad_r.zero_()
            part.buf.bind_grads(Slot.GRAD_R)

    def _check_buffers(self) -> None:
        if self._frozen:
            check_frozen(self._frozen)
        for part in self._parts:
            part.buf.check_views()  # requires grad, still views its slot

    # ------------------------------------------------------------------------- public loops

    def step(self, closure: Callable | None = None) -> Tensor:
        """``inner_steps`` inner ascent steps, then ``outer_steps`` outer steps. Returns the last
        outer retain loss (a detached device tensor: no host sync)."""
        if closure is None:
            raise ValueError("OFMU.step needs a closure returning (forget_loss, retain_loss)")
        return self._step(closure)

    @_one_step("step")
    def _step(self, closure: Callable) -> Tensor:
        self._check_options()
        self._loops = (self.inner_steps > 0, True)
        for _ in range(self.inner_steps):
            self._inner_step(closure)
        for _ in range(self.outer_steps):
            loss = self._outer_step(closure)
        return loss

    @_one_step("inner_step")
    def inner_step(self, closure: Callable) -> Tensor:
        """One ascent step on Phi. Returns the forget loss (detached)."""
        self._loops = (True, False)
        return functional.inner_step(self._parts, self._prepare_update(), self._state,
                                     self._autodiff, closure)

    @_one_step("outer_step")
    def outer_step(self, closure: Callable) -> Tensor:
        """One penalised descent step on L_r + rho_k |grad Phi|^2, then the rho schedule.
        Returns the retain loss (detached)."""
        self._loops = (False, True)
        return self._outer_step(closure)

    def _inner_step(self, closure: Callable) -> Tensor:
        return functional.inner_step(self._parts, self._prepare_update(), self._state,
                                     self._autodiff, closure)

    def _outer_step(self, closure: Callable) -> Tensor:
        cfg = self._prepare_update()
        self._state.diag["rho"] = torch.tensor(self.param_groups[0]["rho_k"])
        loss = functional.outer_step(self._parts, cfg, self._state, self._autodiff, closure)
        for group in self.param_groups:
            rho = min(group["rho_k"] * group["rho_growth"], group["rho_max"])
            if rho != group["rho_k"] or type(rho) is not type(group["rho_k"]):
                group["rho_k"] = rho  # unchanged, the same object: the group stays validated
            group["k"] += 1
        return loss

    def _prepare_update(self) -> functional.StepConfig:
        """This update's settings; validates the options and every group (host values, no
        device sync). At a step's first update, arms the trial of the double backward the step
        will need (:meth:`Autodiff.expect_double_backward`)."""
        groups = self.param_groups
        if not same_objects(self._params_seen, [p for g in groups for p in g["params"]]):
            self._follow_switched_params()  # accelerate's FSDP2 prepare switches param_groups
        self._check_buffers()
        self._check_options()
        hypers = []
        for gi, g in enumerate(groups):  # each group's Hyper of the last update while unchanged
            values, seen = group_values(g, self.similarity), self._groups_seen.get(gi)
            hypers.append(seen[1] if values is not None and seen is not None and
                          same_objects(seen[0], values) else self._hyper(gi, g))
        seen = self._cfg_seen
        if seen is not None and seen[0] is self._options_seen and same_objects(seen[1], hypers):
            cfg, graphs = seen[2], seen[3]
        else:
            cfg, graphs = self._settings(hypers), {}
            self._cfg_seen = (self._options_seen, hypers, cfg, graphs)
        loops, self._loops = self._loops, None
        if loops is not None:
            got = graphs.get(loops)
            if got is None:  # a function of the config and the loops: worked out once
                penalty_on = loops[1] and any(h.rho > 0 for h in cfg.hypers)
                got = graphs[loops] = double_backward_graphs(cfg.sim, cfg.hvp, loops[0],
                                                              penalty_on)
            self._autodiff.expect_double_backward(*got)
        return cfg

    def _hyper(self, gi: int, g: dict) -> functional.Hyper:
        """Param group ``gi``'s hyperparameters for this update, validated (the Hyper of the last
        update when every value is the same object as then)."""
        values = group_values(g, self.similarity)
        seen = self._groups_seen.get(gi)
        if values is not None and seen is not None and same_objects(seen[0], values):
            return seen[1]
        validate_group(g, gi, self.similarity)
        hp = functional.Hyper.from_group(g)
        if values is not None:
            self._groups_seen[gi] = (values, hp)
        return hp

    def _options(self) -> tuple:
        return _OPTIONS(self)

    def _check_options(self) -> None:
        """The per-optimizer settings, which may have been edited on the instance since
        construction: the modes and loop lengths take effect once valid; the settings fixed at
        construction (:data:`_FIXED`) must be unchanged; no param group may carry one. Settings
        that are the very objects validated last time are not validated again."""
        now = self._options()
        changed = not same_objects(self._options_seen, now)
        if changed:
            self._validate_options()
        for gi, g in enumerate(self.param_groups):
            if has_global_key(g):
                key = next(k for k in GLOBAL_KEYS if k in g)
                raise ValueError(
                    f"param_groups[{gi}] has {key!r}, a per-optimizer setting that a param "
                    f"group cannot override (it would be ignored): remove it from the group "
                    f"and set OFMU.{key}, or pass it to OFMU(...)")
        if changed:
            self.sim_mode, self.hvp_mode = SIMILARITY[self.similarity], OUTER_HVP[self.outer_hvp]
            self._options_seen = now

    def _validate_options(self) -> None:
        for key, was in self._fixed.items():
            now = getattr(self, key)
            if now is not was and now != was:
                raise ValueError(
                    f"OFMU.{key} was {was!r} when the optimizer was built and is now {now!r}; it "
                    "is fixed at construction (it decides the optimizer state, the kernels or the "
                    f"ranks). Set it back to {was!r}, or build a new OFMU(..., {key}={now!r}) "
                    "(load_state_dict carries over what the two have in common)")
        try:
            validate_options(self.similarity, self.outer_hvp, self.inner_steps, self.outer_steps,
                             self.preconditioner, self.eps, self.fd_delta, self.backend,
                             self.forget_loss_cap, self.inner_preconditioner)
            validate_distributed(self.outer_hvp, self.process_group)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{e} (a setting of this OFMU was changed after construction: set a "
                          "valid value)") from None

    def _settings(self, hypers: list | None = None) -> functional.StepConfig:
        return functional.StepConfig(self.sim_mode, self.hvp_mode, self.eps, self.fd_delta,
                            self.preconditioner, self.forget_loss_cap, hypers or [],
                            self.inner_preconditioner)

    def last_stats(self) -> dict[str, float]:
        """Diagnostics of the last step as Python floats (this call syncs with the device).

        Always the same keys; NaN marks what the last step did not compute:
        ``inner_cosine`` (last inner step), ``cosine``, ``forget_grad_norm``,
        ``retain_grad_norm`` and ``grad_phi_sq`` (|v|^2) at the last outer evaluation (with the
        penalty off the outer step skips the forget backward: only ``retain_grad_norm``),
        ``rho`` (group 0's, used by the last outer step), and the cumulative counts
        ``skipped_steps`` (non-finite updates left out) and ``capped_steps`` (inner steps
        held back by ``forget_loss_cap``)."""
        return functional.diagnostics(self._state, self.eps)

    def backend_summary(self) -> list[str]:
        """One line per flat buffer: dtype, device, backend and why it was chosen."""
        return list(self.backend_reasons)


def _check_saved_groups(groups: list[dict], saved: list | None, similarity: str) -> None:
    """A checkpoint's param groups against this optimizer's: the same number and sizes (what
    torch checks, here before anything changes) and valid hyperparameters."""
    if not isinstance(saved, (list, tuple)) or not all(isinstance(g, dict) and "params" in g
                                                       for g in saved):
        raise ValueError("checkpoint has no valid 'param_groups' (a list of dicts with 'params')")
    if len(saved) != len(groups):
        raise ValueError(f"checkpoint has {len(saved)} param groups, this optimizer "
                         f"{len(groups)}: the checkpoint is from a different model or param-group "
                         "layout")
    for gi, (group, g) in enumerate(zip(groups, saved)):
        if len(g["params"]) != len(group["params"]):
            raise ValueError(f"checkpoint param group {gi} has {len(g['params'])} parameters, "
                             f"this optimizer's {len(group['params'])}: the checkpoint is from a "
                             "different model or param-group layout")
        for key in GLOBAL_KEYS:
            if key in g:
                raise ValueError(f"checkpoint param group {gi} has {key!r}, a per-optimizer "
                                 "setting: this is not an OFMU checkpoint")
        merged = {**group, **g}
        try:
            validate_group(merged, gi, similarity)
        except KeyError as e:
            raise ValueError(f"checkpoint param group {gi} lacks {e.args[0]!r}: this is not an "
                             "OFMU checkpoint") from None
        if "k" in g and (isinstance(g["k"], bool) or not isinstance(g["k"], int) or g["k"] < 0):
            raise ValueError(f"checkpoint param group {gi} has k = {g['k']!r}; expected an int "
                             ">= 0")
        if "lr0" in g:
            check_number("lr0", g["lr0"], where=f" (checkpoint param group {gi})")


def _param_state_copies(state, p: Tensor, pid, saved, settings: functional.StepConfig) -> list:
    """One parameter's saved state checked against its views: ``[(view, saved tensor)]``."""
    if not isinstance(saved, dict):
        raise ValueError(f"checkpoint state of parameter {pid} is a {type(saved).__name__}, "
                         "expected a dict")
    unknown = set(saved) - _STATE_KEYS
    if unknown:
        raise ValueError(f"checkpoint state of parameter {pid} has unknown entries "
                         f"{sorted(unknown)}; OFMU state holds only {sorted(_STATE_KEYS)}")
    if p not in state:
        raise ValueError(f"checkpoint has optimizer state for parameter {pid} but this optimizer "
                         "keeps none for it (preconditioner='sgd', or the parameter is frozen)")
    kept = state[p]
    for key in sorted(set(saved) ^ set(kept)):
        loop = key.split("_", 1)[0]
        option = "inner_preconditioner" if loop == "inner" else "preconditioner"
        has = "holds" if key in saved else "lacks"
        raise ValueError(
            f"checkpoint entry {key!r} of parameter {pid}: the checkpoint {has} Adam state of the "
            f"{loop} loop, but this optimizer's {loop} loop uses {option}="
            f"{settings.preconditioner_of(loop)!r}. Build the optimizer with the settings the "
            "checkpoint was written with (preconditioner, inner_preconditioner)")
    out = []
    for key, value in saved.items():
        dst = kept[key]
        if not isinstance(value, Tensor) or value.shape != dst.shape:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"checkpoint entry {key!r} of parameter {pid} has shape {got}, but "
                             f"the parameter has shape {tuple(p.shape)}: the checkpoint is from a "
                             "different model or param-group layout")
        out.append((dst, value))
    return out


def _saved_counters(extra: dict) -> dict[str, Tensor]:
    """The cumulative counters of a checkpoint's ``"ofmu"`` entry, checked."""
    out = {}
    for k in _COUNTERS:
        value = extra.get(f"{k}_steps")
        if value is None:
            continue
        if not isinstance(value, Tensor) or value.numel() != 1 or value.is_complex():
            raise ValueError(f"checkpoint entry ofmu.{k}_steps must be a one-element tensor, got "
                             f"{type(value).__name__}")
        out[k] = value.detach().clone().to(torch.int64)
    return out


def _check_param(p: Tensor, name: str) -> None:
    """What the flat buffers cannot hold: sparse and complex tensors (the reductions and
    kernels are real-valued: a complex dot product would need conjugation)."""
    if not p.requires_grad:
        return
    if p.is_sparse:
        raise TypeError(f"{name} is a sparse tensor; OFMU needs dense parameters")
    if p.is_complex():
        raise TypeError(f"{name} is complex ({p.dtype}); OFMU's flat buffers, norms and kernels "
                        "are real-valued. Keep the real and imaginary parts as a real parameter "
                        "(torch.view_as_real) and form the complex tensor in the forward pass, or "
                        "leave this parameter out of the optimizer")


def _dense_grad_check(name: str):
    def hook(grad: Tensor) -> None:
        if grad.is_sparse:
            raise TypeError(f"{name} received a sparse gradient; OFMU works on dense flat "
                            "buffers (use nn.Embedding(sparse=False))")
    return hook

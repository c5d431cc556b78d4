"""One OFMU step as functions over flat buffers: the functional form behind :class:`ofmu.OFMU`.

The class validates, gathers the hyperparameters of every param group into a
:class:`StepConfig`, and calls :func:`inner_step` / :func:`outer_step`; everything below takes
its buffers, kernels and scalars explicitly. How one step flows through the modules is drawn
in ``docs/design.md`` ("One step, module by module").

Per flat buffer (a :class:`GroupBuffer`; a step's list of them is ``parts``): gradients arrive
in ``GRAD_F`` / ``GRAD_R`` (:mod:`ofmu.gradients`), the backend's ``reduce3`` gives
``[<g_f, g_r>, |g_f|^2, |g_r|^2]``, these are summed over all buffers (the cosine and
projection are global), the backend's ``finalize`` turns them into the packed coefficients on
the device (finite checks, the cap, clipping, the projection: one op per param group) and
``update`` / ``combine`` apply them. No
step reads a device value on the host.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import coefficients as C
from .backends import Backend
from .devices import move, reduction_device
from .flat import MOMENTS, FlatBuffer, Slot
from .gradients import Autodiff, Evaluation, accepts
from .layouts import Layout
from .modes import OuterHvpMode, SimilarityMode
from .reference import acc_dtype

__all__ = [
    "GroupBuffer", "Hyper", "StepConfig", "StepState", "inner_step", "outer_step",
]


@dataclass(frozen=True)
class GroupBuffer:
    """One flat buffer of a param group (its parameters of one device and dtype), the backend
    whose kernels run on it, and the group's index (its hyperparameters in ``StepConfig``)."""

    buf: FlatBuffer
    backend: Backend
    group: int


@dataclass(frozen=True)
class Hyper:
    """One param group's hyperparameters for this step (host floats; ``inner_lr`` resolved)."""

    lr: float
    inner_lr: float
    beta: float
    rho: float  # the current rho_k
    weight_decay: float
    max_grad_norm: float | None
    betas: tuple[float, float]
    adam_eps: float

    @classmethod
    def from_group(cls, g: dict) -> Hyper:
        """A param group's values; an explicit ``inner_lr`` follows ``lr``'s schedule
        (scaled by ``lr / lr0``, the lr at construction)."""
        inner_lr = g["lr"] if g["inner_lr"] is None else (
            g["inner_lr"] * (g["lr"] / g["lr0"] if g["lr0"] > 0 else 1.0))
        return cls(g["lr"], inner_lr, g["beta"], g["rho_k"], g["weight_decay"],
                   g["max_grad_norm"], tuple(g["betas"]), g["adam_eps"])


@dataclass(frozen=True)
class StepConfig:
    sim: SimilarityMode
    hvp: OuterHvpMode
    eps: float
    fd_delta: float
    preconditioner: str
    forget_loss_cap: float | None
    hypers: list[Hyper]  # per param group
    inner_preconditioner: str | None = None  # None: the same as ``preconditioner``

    @functools.cached_property
    def decays(self) -> bool:
        """Whether some group has weight decay (worked out once per config)."""
        return any(h.weight_decay > 0 for h in self.hypers)

    def preconditioner_of(self, loop: str) -> str:
        if loop == "inner" and self.inner_preconditioner is not None:
            return self.inner_preconditioner
        return self.preconditioner


@dataclass
class StepState:
    """What a step leaves behind on the device: Adam step counts (per part and loop),
    diagnostics and the counters of skipped and capped updates."""

    adam_steps: dict[tuple[int, str], Tensor] = field(default_factory=dict)
    diag: dict[str, Tensor] = field(default_factory=dict)
    # the cumulative counts [skipped, capped] (float64: exact to 2^53; on the device of the
    # updates), and which of the two exist: counted once, or loaded
    tally: Tensor | None = None
    counted: set[str] = field(default_factory=set)
    # finalize's packed vectors of the updates since the last fold into ``tally``, kept as
    # they are (every backend's finalize returns a new tensor): appending one costs nothing on
    # the device, where an add per update cost more than the update's kernel on a small model.
    # Summed every _FOLD_EVERY updates and when the counters are read (exact in float32).
    pending: list[Tensor] = field(default_factory=list)

    @property
    def counters(self) -> dict[str, Tensor]:
        """``{"skipped": n, "capped": m}`` (0-dim int64 tensors), the keys that exist."""
        self.fold()
        return {name: self.tally[i].to(torch.int64) for i, name in enumerate(COUNTERS)
                if name in self.counted}

    def load_counters(self, counters: dict[str, Tensor]) -> None:
        """Counts from a checkpoint (0-dim int64 tensors; a missing one does not exist)."""
        dev = next((c.device for c in counters.values()), torch.device("cpu"))
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        self.tally = torch.stack([counters.get(n, zero).reshape(()).to(zero) for n in COUNTERS])
        self.counted = set(counters)
        self.pending = []

    def count(self, fin: Tensor, capping: bool) -> None:
        """Counts an update's ``[skipped, capped]`` flags (finalize's packed vector ``fin``:
        0 or 1 in ``FLAGS``). ``capping``: whether this update counts ``capped`` (its flag is 0
        when it does not: no cap, or the outer loop)."""
        pending = self.pending
        if pending and (pending[0].dtype != fin.dtype or pending[0].device != fin.device):
            self.fold()
        pending.append(fin)
        if len(pending) >= _FOLD_EVERY:
            self.fold()
        self.counted.add("skipped")
        if capping:
            self.counted.add("capped")

    def fold(self) -> None:
        """The pending flags summed into ``tally`` (reading the counters folds first)."""
        p = self.pending
        if not p:
            return
        flags = (p[0][FLAGS] if len(p) == 1 else torch.stack(p)[:, FLAGS].sum(0)).to(torch.float64)
        t = self.tally
        self.tally = flags if t is None else t.to(flags.device) + flags
        self.pending = []


_FOLD_EVERY = 64  # updates (their packed vectors are kept until then)
FLAGS = slice(9, 11)  # [skipped, capped] in finalize's packed vector (reference.FINALIZE_LEN)
COUNTERS = ("skipped", "capped")


_STATS = ("inner_cosine", "cosine", "forget_grad_norm", "retain_grad_norm", "grad_phi_sq", "rho")


def diagnostics(state: StepState, eps: float) -> dict[str, float]:
    """``OFMU.last_stats()``: the last step's diagnostics as floats (syncs), always the same
    keys, NaN for what the last step did not compute."""
    d, out = state.diag, dict.fromkeys(_STATS, math.nan)
    if "inner_stats" in d:
        out["inner_cosine"] = float(C.similarity_scalars(d["inner_stats"], eps)[0])
    if "outer_stats" in d:
        st = d["outer_stats"].tolist()
        out["cosine"] = float(C.similarity_scalars(d["outer_stats"], eps)[0])
        out["forget_grad_norm"], out["retain_grad_norm"] = math.sqrt(st[1]), math.sqrt(st[2])
    if "retain_stats" in d:
        out["retain_grad_norm"] = math.sqrt(d["retain_stats"][1].item())
    for key in ("grad_phi_sq", "rho"):
        if key in d:
            out[key] = float(d[key])
    for name in ("skipped", "capped"):
        c = state.counters.get(name)
        out[f"{name}_steps"] = int(c) if c is not None else 0
    return out


# ------------------------------------------------------------------------------- reductions


def reduce(parts: list[GroupBuffer], layout: Layout, x: Slot,
           y: Slot | None) -> tuple[list[Tensor], Tensor]:
    """Per-buffer ``reduce3(x, y)``, global over the ``layout``'s ranks, and their sum (on
    :func:`reduction_device`; float64 if any buffer is float64, else float32)."""
    if len(parts) == 1:  # the common case: its own device and accumulation dtype, no search
        dev, dt = parts[0].buf.device, acc_dtype(parts[0].buf.dtype)
    else:
        dev = reduction_device([p.buf.device for p in parts])
        dt = torch.float64 if any(p.buf.dtype == torch.float64 for p in parts) else torch.float32
    stats = [move(p.backend.reduce3(p.buf.flat(x), p.buf.flat(y)), dev, dt) for p in parts]
    stats = layout.all_reduce(stats)  # FSDP2: per-shard sums made global
    return stats, stats[0] if len(stats) == 1 else torch.stack(stats).sum(0)


def _coeffs(fin: Tensor, start: int) -> Tensor:
    """``fin[start:start + 4]`` of finalize's packed vector (a fresh contiguous tensor on every
    backend), as ``as_strided`` makes it: the same view through a fraction of the code of
    Python indexing (measured in a step on a small model: about 5 us against 8.5)."""
    return fin.as_strided((4,), (1,), fin.storage_offset() + start)


def _on(t: Tensor, buf: FlatBuffer) -> Tensor:
    """Coefficients onto a buffer's device, in its accumulation dtype."""
    return move(t, buf.device, acc_dtype(buf.dtype))


def group_sqnorms(parts: list[GroupBuffer], cfg: StepConfig, coefs: list[Tensor], stats: list[Tensor],
                  clipped_only: bool = False) -> dict[int, Tensor]:
    """``|coef[0]*x + coef[1]*y|^2`` summed over each group's buffers, from ``reduce3(x, y)``
    (``clipped_only``: just the groups with ``max_grad_norm``)."""
    out: dict[int, Tensor] = {}
    for part, coef, st in zip(parts, coefs, stats):
        if clipped_only and cfg.hypers[part.group].max_grad_norm is None:
            continue
        sq = C.direction_sqnorm(coef.to(st), st)
        out[part.group] = out[part.group] + sq if part.group in out else sq
    return out


# ------------------------------------------------------------------------ ascent direction u


def _grad_cos(parts: list[GroupBuffer], cfg: StepConfig, ad: Autodiff, ev: Evaluation,
              gstats: Tensor) -> None:
    """``grad c = H_f a + H_r b`` into ``HVP`` (one double backward)."""
    seeds = C.seed_coeffs(gstats, cfg.eps)
    for p in parts:
        p.backend.combine(p.buf.grad_f, p.buf.grad_r, _on(seeds, p.buf), p.buf.flat(Slot.SEED_A),
                          p.buf.flat(Slot.SEED_B))
    ad.vjp(ev.gf + ev.gr, ad.views(Slot.SEED_A) + ad.views(Slot.SEED_B), into=Slot.HVP,
           why="similarity='hvp'")


def direction_operand(parts, cfg, ad, ev, stats, gstats):
    """``y`` of ``u = alpha*g_f + gamma*y``: ``(slot, per-buffer reduce3(g_f, y), finite flag)``.
    For ``hvp``, ``y = grad c`` is a new vector: its norm and finiteness take one more pass.
    The flag is None where ``y``'s statistics are ``stats`` (finalize checks those)."""
    if not cfg.sim.second_order:
        return (Slot.GRAD_R if cfg.sim.projects else None), stats, None
    _grad_cos(parts, cfg, ad, ev, gstats)
    ustats, ug = reduce(parts, ad.layout, Slot.GRAD_F, Slot.HVP)
    return Slot.HVP, ustats, torch.isfinite(ug).all() & torch.isfinite(gstats).all()


def direction_coeffs(parts: list[GroupBuffer], cfg: StepConfig, gstats: Tensor) -> list[Tensor]:
    """Per buffer, ``combine`` coefficients ``[alpha, gamma, 0, 0]`` of ``u`` (finalize's
    ``[4:8]``; ``alpha, gamma`` are also what :func:`group_sqnorms` reads)."""
    empty = gstats.new_empty(0)
    fins = {g: _finalize(parts[0].backend, cfg, "inner", g, gstats, gstats, empty, None, False)
            for g in dict.fromkeys(p.group for p in parts)}
    return [fins[p.group][4:8] for p in parts]


def combine_direction(parts, cfg, ad, ev, stats, gstats, out: Slot):
    """``u(theta)`` into ``out``; returns per-buffer ``(coef, stats)`` for its norm, and the
    finite flag."""
    y, ustats, ok = direction_operand(parts, cfg, ad, ev, stats, gstats)
    coefs = direction_coeffs(parts, cfg, gstats)
    for p, coef in zip(parts, coefs):
        p.backend.combine(p.buf.grad_f, p.buf.flat(y), _on(coef, p.buf), p.buf.flat(out))
    return coefs, ustats, torch.isfinite(gstats).all() if ok is None else ok


# ----------------------------------------------------------------------------------- applying


def finite_inputs(parts: list[GroupBuffer], layout: Layout, cfg: StepConfig,
                  losses: tuple[Tensor, ...], ok: Tensor | None,
                  like: Tensor) -> tuple[Tensor, Tensor | None]:
    """What an update must find finite besides its statistics: ``(checks, ok)`` for finalize.
    ``checks``: the losses it backpropagated (a loss plus an infinite constant has a finite
    gradient; the forget loss first, which the cap compares), in ``like``'s dtype and device.
    ``ok`` and-ed, in groups with weight decay, with the parameters' finiteness (an Inf there
    becomes Inf/NaN in the decay term and the Adam moments): one sum per decayed buffer, no host
    sync (FSDP2: summed over the shards, so that every rank decides alike)."""
    dev, dt = like.device, like.dtype
    for loss in losses:
        if loss.dtype != dt or loss.device != dev:
            checks = torch.stack([move(loss.detach(), dev, dt) for loss in losses])
            break
    else:  # the usual case: one op, no copies
        checks = torch.stack(losses)  # evaluate() returns them detached
    if cfg.decays and any(cfg.hypers[p.group].weight_decay > 0 for p in parts):
        sums = [move(p.buf.param.sum(dtype=acc_dtype(p.buf.dtype)), dev, torch.float64)
                if cfg.hypers[p.group].weight_decay > 0 else torch.zeros((), dtype=torch.float64,
                                                                         device=dev)
                for p in parts]
        fin = torch.isfinite(torch.stack(layout.all_reduce(sums))).all()
        ok = fin if ok is None else ok & fin
    return checks, ok


def _finalize(be: Backend, cfg: StepConfig, loop: str, group: int, gstats: Tensor,
              ustats: Tensor, checks: Tensor, ok: Tensor | None, use_lr: bool = True) -> Tensor:
    """One param group's packed coefficients (``reference.FINALIZE_LEN`` layout) from the
    backend's finalize op. Inner: ``u = g_f + gamma*y`` by the similarity mode's record, ascent
    at ``inner_lr``, the forget-loss cap; outer: ``g_r + 2 rho h``, descent at ``lr``."""
    hp = cfg.hypers[group]
    if loop == "inner":
        project, gamma = cfg.sim.projects, (-hp.beta if cfg.sim.has_operand else 0.0)
        lr, cap = hp.inner_lr, cfg.forget_loss_cap
    else:
        project, gamma, lr, cap = False, 2.0 * hp.rho, -hp.lr, None
    if not use_lr:  # the direction alone
        return be.finalize(gstats, ustats, checks, ok, project, gamma, cfg.eps, 1.0, 0.0, None, None)
    return be.finalize(gstats, ustats, checks, ok, project, gamma, cfg.eps, lr, hp.weight_decay,
                       hp.max_grad_norm, cap)


def finalize(parts: list[GroupBuffer], layout: Layout, cfg: StepConfig, state: StepState,
             loop: str, gstats: Tensor | None, ustats: list[Tensor], losses: tuple[Tensor, ...],
             ok: Tensor | None) -> list[Tensor]:
    """Per buffer, the packed coefficients of this loop's update, one finalize op per param
    group, and the skip/cap counters advanced. ``gstats``: the summed statistics the direction's
    projection reads (None: the outer step, whose direction is fixed); ``ustats``: per buffer,
    ``reduce3`` of the direction's two operands (its norm, for clipping); ``ok``: an upstream
    finite flag or None."""
    capping = loop == "inner" and cfg.forget_loss_cap is not None
    if len(parts) == 1:  # the common case, without the grouping below (small models notice)
        p, u = parts[0], ustats[0]
        checks, ok = finite_inputs(parts, layout, cfg, losses, ok, u)
        fin = _finalize(p.backend, cfg, loop, p.group, u if gstats is None else gstats, u, checks,
                        ok)
        state.count(fin, capping)
        return [fin]
    by_group: dict[int, Tensor] = {}
    for p, u in zip(parts, ustats):  # the group's statistics (clipping is per group)
        by_group[p.group] = by_group[p.group] + u if p.group in by_group else u
    like = ustats[0]
    checks, ok = finite_inputs(parts, layout, cfg, losses, ok, like)
    checks = torch.cat([checks, torch.stack(ustats).sum(0)])  # every group sees any non-finite
    fins = {g: _finalize(parts[0].backend, cfg, loop, g, u if gstats is None else gstats, u, checks,
                         ok)
            for g, u in by_group.items()}
    state.count(fins[parts[0].group], capping)  # the skip and cap flags: the same in every group
    return [fins[p.group] for p in parts]


def apply(parts: list[GroupBuffer], layout: Layout, cfg: StepConfig, state: StepState, loop: str,
          x: Slot, y: Slot | None, fins: list[Tensor]) -> None:
    """Apply ``alpha*x + gamma*y`` with each buffer's packed coefficients from :func:`finalize`
    (clipped per group; skipped unless its ``proceed`` flag): ascent for the inner loop, descent for
    the outer one, as written (``"sgd"``), through Adam, or through stateless Adam (``"sign"``).
    Adam's direction is formed in place in ``x`` (the gradient it started from is no longer
    needed), so no buffer is added for it."""
    kind = cfg.preconditioner_of(loop)
    for i, part in enumerate(parts):
        hp, buf, fin = cfg.hypers[part.group], part.buf, fins[i]
        if kind == "sgd":
            part.backend.update(buf.param, buf.flat(x), buf.flat(y), _on(_coeffs(fin, 0), buf))
            continue
        lr = hp.inner_lr if loop == "inner" else hp.lr
        direction = buf.flat(x)
        if y is not None:  # the Adam paths read one gradient buffer: combine in place
            part.backend.combine(direction, buf.flat(y), _on(_coeffs(fin, 4), buf), direction)
        scale = None if hp.max_grad_norm is None else _on(fin[8], buf).float()
        kw = dict(lr=lr, eps=hp.adam_eps, weight_decay=hp.weight_decay, ascend=loop == "inner",
                  scale=scale, ok=(fin[3] != 0).to(buf.device))
        if kind == "sign":
            part.backend.sign(buf.param, direction, **kw)
            continue
        m, v = (buf.flat(s) for s in MOMENTS[loop])
        part.backend.adam(buf.param, direction, m, v, state.adam_steps[(i, loop)], betas=hp.betas,
                          **kw)
    layout.copy_out([p.buf for p in parts])  # FSDP2: the updated flat copies into the shards


# ---------------------------------------------------------------------------------- the loops


def inner_step(parts: list[GroupBuffer], cfg: StepConfig, state: StepState, ad: Autodiff,
               closure: Callable) -> Tensor:
    """One ascent step on ``Phi = L_f - beta*cos``: ``theta += inner_lr * u``. Returns the
    forget loss (detached)."""
    second = cfg.sim.second_order
    ev = ad.evaluate(closure, graph_f=second, graph_r=second, why="similarity='hvp'")
    stats, gstats = reduce(parts, ad.layout, Slot.GRAD_F, Slot.GRAD_R)
    state.diag["inner_stats"] = gstats
    if second:  # a double backward (a grad-mode context costs more than this step's kernels
        with torch.enable_grad():  # on a small model, so only where needed)
            y, ustats, ok = direction_operand(parts, cfg, ad, ev, stats, gstats)
    else:
        y, ustats, ok = direction_operand(parts, cfg, ad, ev, stats, gstats)
    # finite checks, the cap (no ascent past it), clipping, coefficients: one op per group
    fins = finalize(parts, ad.layout, cfg, state, "inner", gstats, ustats, (ev.loss_f, ev.loss_r),
                    ok)
    apply(parts, ad.layout, cfg, state, "inner", Slot.GRAD_F, y, fins)
    return ev.loss_f  # detached by evaluate


def outer_step(parts: list[GroupBuffer], cfg: StepConfig, state: StepState, ad: Autodiff,
               closure: Callable) -> Tensor:
    """One penalised descent step on ``L_r + rho_k |grad Phi|^2``:
    ``theta -= lr * (g_r + 2 rho_k h)``. Returns the retain loss (detached). The caller
    advances the rho schedule."""
    penalised = cfg.hvp.penalised and any(cfg.hypers[p.group].rho > 0 for p in parts)
    if penalised:
        ev, (x, y), stats, ok = _penalty(parts, cfg, state, ad, closure)
    else:  # retain descent: the forget gradient would only feed diagnostics, so it is skipped
        ev = ad.evaluate(closure, forget=False)
        x, y = Slot.GRAD_R, None
        stats, gstats = reduce(parts, ad.layout, Slot.GRAD_R, None)  # [0, |g_r|^2, 0]
        for key in ("outer_stats", "grad_phi_sq"):
            state.diag.pop(key, None)
        state.diag["retain_stats"] = gstats
        ok = None  # finalize checks the statistics
    # the outer direction x + 2 rho y (x = g_r, y = h; or x = g_r + 2 rho h already, y = None):
    # its norm from reduce3(x, y)
    fins = finalize(parts, ad.layout, cfg, state, "outer", None, stats,
                    (ev.loss_f, ev.loss_r) if penalised else (ev.loss_r,), ok)
    apply(parts, ad.layout, cfg, state, "outer", x, y, fins)
    for p in parts:  # p.grad shows the gradient of this update (as after SGD)
        p.buf.bind_grads(x)
    return ev.loss_r  # detached by evaluate


def _penalty(parts, cfg, state, ad, closure):
    """The outer evaluation with the penalty on: ``v = u(theta)`` into ``GRAD_F`` (``g_f`` is
    not needed once ``u`` is formed: no buffer for ``v``), then ``h`` per the mode. Returns the
    evaluation, the outer direction's operands ``(x, y)`` (``x + 2 rho y``), per-buffer
    ``reduce3(x, y)`` and the finite flag."""
    graph_f, graph_r = cfg.hvp.graphs(cfg.sim)
    ev = ad.evaluate(closure, graph_f=graph_f, graph_r=graph_r,
                     why=f"similarity={cfg.sim.name!r} with outer_hvp={cfg.hvp.name!r} and rho > 0")
    stats, gstats = reduce(parts, ad.layout, Slot.GRAD_F, Slot.GRAD_R)
    state.diag.pop("retain_stats", None)
    state.diag["outer_stats"] = gstats
    with torch.enable_grad():
        coefs, ustats, ok = combine_direction(parts, cfg, ad, ev, stats, gstats, Slot.GRAD_F)
        phi_sq = sum(group_sqnorms(parts, cfg, coefs, ustats).values())
        state.diag["grad_phi_sq"] = phi_sq
        xy = _HVP[cfg.hvp.name](parts, cfg, ad, ev, closure, phi_sq)
    ev.gf = ev.gr = None  # free the kept graphs before the update
    stats, dg = reduce(parts, ad.layout, *xy)
    return ev, xy, stats, ok & torch.isfinite(gstats).all() & torch.isfinite(dg).all()


# ------------------------------------------------------------- h ~ Hessian(Phi) v, per mode


def _hvp_forget(parts, cfg, ad, ev, closure, phi_sq) -> tuple[Slot, Slot]:
    """``h = H_f v``: one double backward of the forget gradient."""
    ad.vjp(ev.gf, ad.views(Slot.GRAD_F), into=Slot.HVP, why="outer_hvp='forget' (rho > 0)")
    return Slot.GRAD_R, Slot.HVP


def _hvp_exact(parts, cfg, ad, ev, closure, phi_sq) -> tuple[Slot, Slot]:
    """``h = J_u^T v``: autograd through ``u(theta)`` itself (third order with ``hvp``)."""
    ad.vjp(_u_graph(parts, cfg, ad, ev), ad.views(Slot.GRAD_F), into=Slot.HVP,
           why="outer_hvp='exact' (rho > 0)")
    return Slot.GRAD_R, Slot.HVP


def _u_graph(parts, cfg, ad, ev) -> list[Tensor | None]:
    """``u(theta)`` per parameter, as a differentiable function of the parameters."""
    gf, gr = ev.gf, ev.gr
    if not cfg.sim.has_operand:
        return gf
    betas = [cfg.hypers[p.group].beta for p in parts for _ in p.buf.params]
    dt = torch.float64 if any(p.buf.dtype == torch.float64 for p in parts) else torch.float32
    z = torch.zeros((), dtype=dt, device=parts[0].buf.device)
    d = nf2 = nr2 = z
    for a, b in zip(gf, gr):
        a = None if a is None else a.to(dt)
        b = None if b is None else b.to(dt)
        if a is not None and b is not None:
            d = d + (a * b).sum().to(z.device)
        if a is not None:
            nf2 = nf2 + (a * a).sum().to(z.device)
        if b is not None:
            nr2 = nr2 + (b * b).sum().to(z.device)
    c, k = C.similarity_scalars(torch.stack([d, nf2, nr2]), cfg.eps)
    if cfg.sim.projects:
        y, coef = gr, [-beta * k for beta in betas]
    elif not c.requires_grad:
        return gf
    else:
        y = torch.autograd.grad(c, ad.params, create_graph=True, allow_unused=True)
        coef = [-beta for beta in betas]
    out = []
    for a, b, cb in zip(gf, y, coef):
        if b is not None:
            b = (cb.to(b.device) * b.to(dt)).to(b.dtype) if torch.is_tensor(cb) else cb * b
        out.append(a if b is None else (b if a is None else a + b))
    return out


def _hvp_fd(parts, cfg, ad, ev, closure, phi_sq) -> tuple[Slot, None]:
    """Central difference of ``u`` along ``v`` (in ``GRAD_F``): ``h = (u(+) - u(-)) |v| /
    (2 delta)``, from gradients already averaged across ranks, at ``theta +- delta v/|v|``.

    Two scratch buffers: theta is saved in ``THETA_SAVED`` and copied back from it (bit for bit,
    in a ``finally``: a probe that raises leaves no displacement), and the outer direction
    ``g_r + 2 rho h`` is accumulated in ``OUTER_DIR``, starting from ``g_r(theta)``, as each
    probe's ``u`` comes in (the probes overwrite both gradient buffers). Returns
    ``(OUTER_DIR, None)``: the outer update's gradient, complete."""
    same = accepts(closure, "same_batch")
    vnorm = torch.sqrt(phi_sq)
    ok = torch.isfinite(vnorm) & (vnorm > 0)
    step = torch.where(ok, cfg.fd_delta / vnorm, torch.zeros_like(vnorm))
    scale = torch.where(ok, vnorm / (2.0 * cfg.fd_delta), torch.zeros_like(vnorm))
    for p in parts:
        p.buf.flat(Slot.THETA_SAVED).copy_(p.buf.param)
        p.buf.flat(Slot.OUTER_DIR).copy_(p.buf.grad_r)
    one, zero = torch.ones_like(step), torch.zeros_like(step)
    try:
        # theta + delta v/|v|, then its mirror image theta - delta v/|v|
        _fd_move(parts, ad.layout, C.pack_update(one, step, zero, ok), Slot.GRAD_F)
        _fd_probe(parts, cfg, ad, closure, same, scale, ok)
        _fd_move(parts, ad.layout, C.pack_update(-one, 2.0 * one, zero, ok), Slot.THETA_SAVED)
        _fd_probe(parts, cfg, ad, closure, same, -scale, ok)
    finally:
        for p in parts:
            p.buf.param.copy_(p.buf.flat(Slot.THETA_SAVED))
        ad.layout.copy_out([p.buf for p in parts])
    return Slot.OUTER_DIR, None


def _fd_move(parts, layout: Layout, coeffs: Tensor, x: Slot) -> None:
    """``theta = c0*theta + c1*x`` (skipped unless ``c3``) on every buffer, then copied out."""
    for p in parts:
        p.backend.update(p.buf.param, p.buf.flat(x), None, _on(coeffs, p.buf))
    layout.copy_out([p.buf for p in parts])


def _fd_probe(parts, cfg, ad, closure, same: bool, scale: Tensor, ok: Tensor) -> None:
    """``u`` at the current (displaced) theta into ``GRAD_F``, then
    ``OUTER_DIR += 2 rho * scale * u`` (rho per group; skipped unless ``ok``)."""
    second = cfg.sim.second_order
    probe = ad.evaluate(closure, graph_f=second, graph_r=second, same_batch=same,
                        why="similarity='hvp'")
    stats, gstats = reduce(parts, ad.layout, Slot.GRAD_F, Slot.GRAD_R)
    combine_direction(parts, cfg, ad, probe, stats, gstats, Slot.GRAD_F)
    one = torch.ones_like(scale)
    for p in parts:
        c = C.pack_update(one, (2.0 * cfg.hypers[p.group].rho) * scale, 0.0 * one, ok)
        p.backend.update(p.buf.flat(Slot.OUTER_DIR), p.buf.grad_f, None, _on(c, p.buf))


_HVP = {"forget": _hvp_forget, "exact": _hvp_exact, "fd": _hvp_fd}

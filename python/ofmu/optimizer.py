"""The ``OFMU`` optimizer: OFMU's two-loop unlearning algorithm as a ``torch.optim.Optimizer``."""

from __future__ import annotations

import inspect
import math
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import backends
from . import functional as F
from .flat import FlatBuffer

SIMILARITY_MODES = ("project", "hvp", "none")
OUTER_HVP_MODES = ("forget", "exact", "fd", "none")
# Decide which backward passes run, so they hold for the whole optimizer (not per group).
_GLOBAL_KEYS = ("similarity", "outer_hvp", "inner_steps", "outer_steps", "preconditioner", "eps",
                "fd_delta", "backend", "process_group")
PRECONDITIONERS = ("sgd", "adam")
# Numeric hyperparameters any param group may override.
_GROUP_KEYS = ("lr", "inner_lr", "beta", "rho", "rho_growth", "rho_max", "weight_decay",
               "max_grad_norm", "betas", "adam_eps")


class OFMU(Optimizer):
    r"""OFMU (Asif & Amiri, ICLR 2026): bi-level unlearning, forgetting first, utility on top.

    With :math:`g_f = \nabla L_f(\theta)` (forget loss, ascended), :math:`g_r = \nabla L_r(\theta)`
    (retain loss, descended), :math:`d = \langle g_f, g_r\rangle`, :math:`n_f = \|g_f\|`,
    :math:`n_r = \|g_r\|`, :math:`c = d/(n_f n_r + \epsilon)`, one call of :meth:`step` runs

    .. math::
        &\textbf{for } t = 1..T:\ \ \theta \leftarrow \theta + \eta_{in}\,(u(\theta) - \lambda\theta)
            \qquad \text{(inner: ascent on } \Phi = L_f - \beta c) \\
        &v = u(\theta),\quad h \approx \nabla^2\Phi\, v \\
        &\theta \leftarrow \theta - \eta\,(g_r + 2\rho_k h + \lambda\theta)
            \qquad \text{(outer: descent on } L_r + \rho_k \|\nabla\Phi\|^2) \\
        &\rho_{k+1} = \min(\gamma \rho_k, \rho_{max})

    where every gradient is taken on fresh minibatches (one ``closure()`` call each) and the
    ascent direction :math:`u` depends on ``similarity``:

    * ``"project"`` (first order): :math:`u = g_f - \beta\,\frac{d}{n_r^2+\epsilon}\,g_r`, so
      :math:`\langle u, g_r\rangle = (1-\beta) d` — at :math:`\beta = 1` the ascent step leaves
      :math:`L_r` unchanged to first order. Requires :math:`0 \le \beta \le 1`.
    * ``"hvp"`` (literal gradient of :math:`\Phi`): :math:`u = g_f - \beta \nabla c`,
      :math:`\nabla c = H_f a + H_r b` with :math:`a = g_r/(n_f n_r) - c\,g_f/n_f^2`,
      :math:`b = g_f/(n_f n_r) - c\,g_r/n_r^2` (one double backward).
    * ``"none"``: :math:`u = g_f` (plain gradient ascent; the :math:`\beta = 0` ablation).

    and :math:`h` on ``outer_hvp``: ``"forget"`` :math:`h = H_f v`; ``"exact"`` :math:`h =
    J_u^\top v` by autograd (the true gradient of :math:`\tfrac12\|u\|^2`; third order with
    ``hvp``); ``"fd"`` :math:`h = (u(\theta+\delta\hat v) - u(\theta-\delta\hat v))\,\|v\|/(2\delta)`;
    ``"none"`` :math:`h = 0`. :math:`h` is only computed while :math:`\rho_k > 0`.

    :math:`\epsilon` is relative: ``eps * (n_f^2 + n_r^2)`` plus the dtype's smallest normal,
    so rescaling a loss does not change a direction and zero gradients give a zero step.
    The cosine and projection coefficient are global (over all groups and devices); each group
    applies them with its own hyperparameters.

    Args:
        params: iterable of parameters or dicts defining param groups. Parameters are re-viewed
            into one flat buffer per (group, device, dtype); build the optimizer *after*
            ``model.to(...)``. Parameters with ``requires_grad=False`` are left alone.
        lr (float): outer step size :math:`\eta` (default 1e-2). LR schedulers act on it.
        inner_lr (float, optional): inner step size :math:`\eta_{in}`. ``None`` means "equal to
            ``lr``"; otherwise it is scaled with ``lr`` by the ratio ``lr / lr_at_construction``
            so a scheduler anneals both loops together (default None).
        inner_steps (int): :math:`T`, inner ascent steps per :meth:`step` (default 5).
        beta (float): similarity-penalty weight :math:`\beta \ge 0` (default 0.5).
        rho (float): initial stationarity-penalty weight :math:`\rho_0 \ge 0` (default 0.01).
        rho_growth (float): :math:`\gamma \ge 1` (default 1.0, constant :math:`\rho`).
        rho_max (float): cap :math:`\rho_{max}` (default 1.0).
        similarity (str): ``"project"`` | ``"hvp"`` | ``"none"`` (default ``"project"``).
        outer_hvp (str): ``"forget"`` | ``"exact"`` | ``"fd"`` | ``"none"`` (default
            ``"forget"``).
        weight_decay (float): L2 shrinkage :math:`\lambda` applied in both loops (default 0).
        max_grad_norm (float, optional): clip :math:`u` and the outer direction to this norm per
            group, using the norms the reductions already computed (default None: off).
        eps (float): relative epsilon of every division (default 1e-12).
        fd_delta (float): step :math:`\delta` of ``outer_hvp="fd"`` (default 1e-3).
        outer_steps (int): outer steps per :meth:`step`, each on fresh minibatches and each
            advancing the :math:`\rho` schedule (default 1).
        preconditioner (str): ``"sgd"`` applies the directions as written above (the paper's
            form); ``"adam"`` feeds each loop's direction (:math:`u` ascended, the outer
            direction descended, weight decay as Adam's L2 term) through torch's fused Adam,
            with separate moment state per loop (default ``"sgd"``). Not in the paper: it is
            what LLM unlearning uses in practice.
        betas (Tuple[float, float]), adam_eps (float): Adam's coefficients (defaults
            (0.9, 0.999) and 1e-8); used only with ``preconditioner="adam"``.
        backend (str): ``"auto"`` | ``"torch"`` | ``"cpp"`` | ``"cuda"`` | ``"triton"``; see
            :func:`ofmu.backend_info` (default ``"auto"``, ``OFMU_BACKEND`` overrides it).
        process_group: ranks whose gradients are averaged (``torch.distributed``). ``"auto"``
            (default) takes the default group when ``torch.distributed`` is initialised with
            more than one rank; ``None`` keeps every rank on its own. Each rank's closure returns
            mean losses over its local minibatches (equal sizes); OFMU all-reduces the flat
            forget/retain gradient buffers after each backward pass and every Hessian-vector
            product, so all ranks take the same step as one process on the union of the
            batches. Do not wrap the model in DDP: its reducer synchronises only the first of
            the two backward passes of a step (OFMU's own averaging keeps such a model
            correct, at twice the communication). ``outer_hvp="exact"`` is not supported here.

    The closure takes no arguments, draws fresh forget and retain minibatches and returns
    ``(forget_loss, retain_loss)``; the optimizer runs the backward passes itself. With
    ``outer_hvp="fd"`` the closure is evaluated at two perturbed points; if it accepts a keyword
    ``same_batch`` it is called with ``same_batch=True`` there and must then reuse the
    minibatches of its previous call (otherwise the difference mixes minibatches). The two
    losses must come from separate forward passes (the forget graph is freed after its backward).

    Diagnostics stay on the device until :meth:`last_stats` is called. A step whose reductions
    are non-finite (a NaN/Inf loss or gradient) leaves the parameters untouched and is counted in
    ``last_stats()["skipped_steps"]``.

    Example:
        >>> opt = OFMU(model.parameters(), lr=0.1, inner_lr=0.05, inner_steps=3, beta=0.9)
        >>> for _ in range(100):
        ...     opt.step(closure)
    """

    def __init__(
        self,
        params,
        lr: float = 1e-2,
        inner_lr: float | None = None,
        inner_steps: int = 5,
        beta: float = 0.5,
        rho: float = 0.01,
        rho_growth: float = 1.0,
        rho_max: float = 1.0,
        similarity: str = "project",
        outer_hvp: str = "forget",
        weight_decay: float = 0.0,
        max_grad_norm: float | None = None,
        eps: float = 1e-12,
        fd_delta: float = 1e-3,
        outer_steps: int = 1,
        preconditioner: str = "sgd",
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        backend: str = "auto",
        process_group="auto",
    ):
        if similarity not in SIMILARITY_MODES:
            raise ValueError(f"unknown similarity mode {similarity!r}; expected one of "
                             f"{SIMILARITY_MODES}")
        if outer_hvp not in OUTER_HVP_MODES:
            raise ValueError(f"unknown outer_hvp mode {outer_hvp!r}; expected one of "
                             f"{OUTER_HVP_MODES}")
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 0:
            raise ValueError(f"inner_steps must be an int >= 0, got {inner_steps!r}")
        if isinstance(outer_steps, bool) or not isinstance(outer_steps, int) or outer_steps < 1:
            raise ValueError(f"outer_steps must be an int >= 1, got {outer_steps!r}")
        if preconditioner not in PRECONDITIONERS:
            raise ValueError(f"unknown preconditioner {preconditioner!r}; expected one of "
                             f"{PRECONDITIONERS}")
        _check_number("eps", eps, positive=True)
        _check_number("fd_delta", fd_delta, positive=True)
        if not isinstance(backend, str) or backend not in ("auto",) + backends.NAMES:
            raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of "
                             f"{backends.NAMES}")
        self.similarity, self.outer_hvp = similarity, outer_hvp
        self.inner_steps, self.eps, self.fd_delta = inner_steps, eps, fd_delta
        self.outer_steps, self.preconditioner = outer_steps, preconditioner
        self.backend = backend
        self.process_group = _resolve_process_group(process_group)
        if self.process_group is not None and outer_hvp == "exact":
            raise ValueError("outer_hvp='exact' differentiates through each rank's own gradients "
                             "and cannot be averaged across ranks; use 'forget' or 'fd' with "
                             "torch.distributed (or process_group=None to run ranks apart)")
        defaults = dict(lr=lr, inner_lr=inner_lr, beta=beta, rho=rho, rho_growth=rho_growth,
                        rho_max=rho_max, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                        betas=tuple(betas), adam_eps=adam_eps)
        self._buffers: list[FlatBuffer] = []
        self._buffer_group: list[int] = []
        self._backends: list[backends.Backend] = []
        self.backend_reasons: list[str] = []
        self._hooks: list = []
        self._skipped: Tensor | None = None
        self._diag: dict[str, Tensor | float] = {}
        self._adam_steps: dict[tuple[int, str], Tensor] = {}
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ construction and state

    def add_param_group(self, param_group: dict) -> None:
        for key in _GLOBAL_KEYS:
            if key in param_group:
                raise ValueError(f"{key!r} is a per-optimizer setting and cannot be set per "
                                 "param group")
        super().add_param_group(param_group)
        gi = len(self.param_groups) - 1
        group = self.param_groups[gi]
        self._validate_group(group, gi)
        group.setdefault("rho_k", float(group["rho"]))
        group.setdefault("k", 0)
        group.setdefault("lr0", float(group["lr"]))
        self._build_buffers(gi)

    def _validate_group(self, group: dict, gi: int) -> None:
        where = f" (param group {gi})"
        for key in ("lr", "beta", "rho", "weight_decay"):
            _check_number(key, group[key], where=where)
        if group["inner_lr"] is not None:
            _check_number("inner_lr", group["inner_lr"], where=where)
        _check_number("rho_growth", group["rho_growth"], where=where)
        if group["rho_growth"] < 1.0:
            raise ValueError(f"rho_growth must be >= 1, got {group['rho_growth']}{where}")
        _check_number("rho_max", group["rho_max"], where=where)
        if group["max_grad_norm"] is not None:
            _check_number("max_grad_norm", group["max_grad_norm"], where=where, positive=True)
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and
                all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}{where}")
        _check_number("adam_eps", group["adam_eps"], where=where, positive=True)
        if self.similarity == "project" and group["beta"] > 1.0:
            raise ValueError(f"beta must be <= 1 with similarity='project' (beta = 1 already "
                             f"removes the whole retain component), got {group['beta']}{where}")

    def _build_buffers(self, gi: int) -> None:
        group = self.param_groups[gi]
        by_key: dict[tuple, list[tuple[Tensor, str]]] = defaultdict(list)
        for pi, p in enumerate(group["params"]):
            if not p.requires_grad:
                continue
            if p.is_sparse:
                raise TypeError(f"param_groups[{gi}].params[{pi}] is a sparse tensor; OFMU "
                                "needs dense parameters")
            name = f"param_groups[{gi}].params[{pi}] (shape {tuple(p.shape)})"
            by_key[(p.device, p.dtype)].append((p, name))
            self._hooks.append(p.register_hook(_dense_grad_check(name)))
        for (device, _), items in by_key.items():
            buf = FlatBuffer([p for p, _ in items], [n for _, n in items])
            backend, reason = backends.select(self.backend, device)
            self._buffers.append(buf)
            self._buffer_group.append(gi)
            self._backends.append(backend)
            self.backend_reasons.append(f"{buf.dtype} on {device}: {backend.name} ({reason})")

    def state_dict(self) -> dict:
        sd = super().state_dict()
        # Adam moments live in flat buffers (one per group x device x dtype); they are saved
        # in that layout, so a checkpoint loads into an optimizer built the same way.
        moments = [{name: buf.buffer(name)[0].clone() for name in _MOMENTS if buf.has(name)}
                   for buf in self._buffers]
        sd["ofmu"] = {
            "skipped_steps": self._skipped.clone() if self._skipped is not None else None,
            "moments": moments,
            "adam_steps": {f"{i}:{loop}": t.clone() for (i, loop), t in self._adam_steps.items()},
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("ofmu", None) or {}
        super().load_state_dict(state_dict)
        for gi, group in enumerate(self.param_groups):
            self._validate_group(group, gi)
        skipped = extra.get("skipped_steps")
        self._skipped = skipped.clone() if skipped is not None else None
        moments = extra.get("moments", [])
        if moments and len(moments) != len(self._buffers):
            raise ValueError(f"checkpoint has {len(moments)} flat buffers, this optimizer "
                             f"{len(self._buffers)}: build it with the same param groups")
        for buf, saved in zip(self._buffers, moments):
            for name, t in saved.items():
                if t.numel() != buf.numel:
                    raise ValueError(f"checkpoint buffer {name!r} has {t.numel()} elements, "
                                     f"expected {buf.numel}: different model or param groups")
                buf.buffer(name)[0].copy_(t)
        self._adam_steps = {}
        for key, t in extra.get("adam_steps", {}).items():
            i, loop = key.split(":")
            self._adam_step(int(i), loop).copy_(t)
        self._check_buffers()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero both gradient buffers. ``p.grad`` keeps pointing into the retain buffer (the
        flat layout is the point of this optimizer), whatever ``set_to_none`` says."""
        for buf in self._buffers:
            buf.grad_f.zero_()
            buf.grad_r.zero_()
            buf.bind_grads("r")

    def _check_buffers(self) -> None:
        for buf in self._buffers:
            buf.check_aliasing()

    # ------------------------------------------------------------------------- public loops

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> Tensor:
        """``inner_steps`` inner ascent steps, then ``outer_steps`` outer steps. Returns the last
        outer retain loss (a detached device tensor: no host sync)."""
        if closure is None:
            raise ValueError("OFMU.step needs a closure returning (forget_loss, retain_loss)")
        for _ in range(self.inner_steps):
            self.inner_step(closure)
        for _ in range(self.outer_steps):
            loss = self.outer_step(closure)
        return loss

    @torch.no_grad()
    def inner_step(self, closure: Callable) -> Tensor:
        """One ascent step on :math:`\\Phi`. Returns the forget loss (detached)."""
        self._check_buffers()
        second = self.similarity == "hvp"
        with torch.enable_grad():
            loss_f, loss_r = self._call(closure)
            graph = self._gradients(loss_f, loss_r, graph_f=second, graph_r=second)
            stats, gstats = self._reduce("f", "r")
            self._diag["inner_stats"] = gstats  # diagnostics are derived in last_stats()
            ybuf, ustats, ok = self._direction_operand(graph, stats, gstats)
        del graph
        coefs = self._direction_coeffs(gstats)
        sqn = self._group_sqnorms(coefs, ustats, clipped_only=True)
        self._apply("inner", "f", ybuf, coefs, sqn, ok)
        return loss_f.detach()

    @torch.no_grad()
    def outer_step(self, closure: Callable) -> Tensor:
        """One penalised descent step on :math:`L_r + \\rho_k\\|\\nabla\\Phi\\|^2`, then the
        :math:`\\rho` schedule. Returns the retain loss (detached)."""
        self._check_buffers()
        need_h = self.outer_hvp != "none" and any(g["rho_k"] > 0 for g in self.param_groups)
        sim2 = need_h and self.similarity == "hvp"  # v itself needs a double backward
        self._diag["rho"] = self.param_groups[0]["rho_k"]
        with torch.enable_grad():
            loss_f, loss_r = self._call(closure)
            if not need_h:
                # Without the penalty the outer step is retain descent: the forget gradient
                # would only feed diagnostics, so its backward pass is skipped.
                self._gradients(None, loss_r)
                stats, gstats = self._reduce("r", None)  # [0, |g_r|^2, 0]
                for key in ("outer_stats", "grad_phi_sq"):
                    self._diag.pop(key, None)
                self._diag["retain_stats"] = gstats
                ok = torch.isfinite(gstats).all()
            else:
                graph = self._gradients(
                    loss_f, loss_r,
                    graph_f=sim2 or self.outer_hvp in ("forget", "exact"),
                    graph_r=sim2 or (self.outer_hvp == "exact" and self.similarity != "none"))
                stats, gstats = self._reduce("f", "r")
                ok = torch.isfinite(gstats).all()
                self._diag.pop("retain_stats", None)
                self._diag["outer_stats"] = gstats
                phi_sq, ok_v = self._form_v(graph, stats, gstats)
                self._diag["grad_phi_sq"] = phi_sq
                self._hvp(closure, graph, phi_sq)
                del graph
                stats, dg = self._reduce("r", "h")
                ok = ok & ok_v & torch.isfinite(dg).all()
        # outer direction g_r + 2 rho h, its norm from reduce3(g_r, h) (or reduce3(g_r, None))
        one = torch.ones_like(gstats[0])
        coefs = [torch.stack([one, 2.0 * self.param_groups[g]["rho_k"] * one])
                 for g in self._buffer_group]
        sqn = self._group_sqnorms(coefs, stats, clipped_only=True)
        self._apply("outer", "r", "h" if need_h else None, coefs, sqn, ok)
        for group in self.param_groups:
            group["rho_k"] = min(group["rho_k"] * group["rho_growth"], group["rho_max"])
            group["k"] += 1
        for buf in self._buffers:  # p.grad shows the last retain gradient, as after SGD
            buf.bind_grads("r")
        return loss_r.detach()

    def last_stats(self) -> dict[str, float]:
        """Diagnostics of the last step as Python floats (this call syncs with the device):
        ``retain_grad_norm`` at the outer evaluation; ``cosine``, ``forget_grad_norm`` and
        ``grad_phi_sq`` (``|v|^2``) there too when the penalty was active (with ``rho_k = 0``
        or ``outer_hvp="none"`` the outer step skips the forget backward pass);
        ``inner_cosine`` of the last inner step; ``rho`` (group 0's, used by the last outer
        step); ``skipped_steps`` (cumulative)."""
        d, out = self._diag, {}
        if "inner_stats" in d:
            out["inner_cosine"] = float(F.similarity_scalars(d["inner_stats"], self.eps)[0])
        if "outer_stats" in d:
            st = d["outer_stats"].tolist()  # the only syncs
            out["cosine"] = float(F.similarity_scalars(d["outer_stats"], self.eps)[0])
            out["forget_grad_norm"], out["retain_grad_norm"] = math.sqrt(st[1]), math.sqrt(st[2])
        if "retain_stats" in d:
            out["retain_grad_norm"] = math.sqrt(d["retain_stats"][1].item())
        if "grad_phi_sq" in d:
            out["grad_phi_sq"] = float(d["grad_phi_sq"])
        if "rho" in d:
            out["rho"] = d["rho"]
        out["skipped_steps"] = int(self._skipped) if self._skipped is not None else 0
        return out

    def backend_summary(self) -> list[str]:
        """One line per flat buffer: dtype, device, backend and why it was chosen."""
        return list(self.backend_reasons)

    # ------------------------------------------------------------------------------ internals

    def _inner_lr(self, group: dict) -> float:
        if group["inner_lr"] is None:
            return group["lr"]
        ratio = group["lr"] / group["lr0"] if group["lr0"] > 0 else 1.0
        return group["inner_lr"] * ratio

    @property
    def _params(self) -> list[Tensor]:
        return [p for buf in self._buffers for p in buf.params]

    def _views(self, name: str) -> list[Tensor]:
        return [v for buf in self._buffers for v in buf.buffer(name)[1]]

    @staticmethod
    def _on(t: Tensor, buf: FlatBuffer) -> Tensor:
        return t.to(device=buf.device, dtype=F.acc_dtype(buf.dtype), non_blocking=True)

    @staticmethod
    def _opt(buf: FlatBuffer, name: str | None) -> Tensor | None:
        return buf.buffer(name)[0] if name is not None else None

    def _call(self, closure: Callable, same_batch: bool = False) -> tuple[Tensor, Tensor]:
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

    def _gradients(self, lf: Tensor | None, lr: Tensor, graph_f: bool = False,
                   graph_r: bool = False):
        grads = self._gradients_into_buffers(lf, lr, graph_f, graph_r)
        if lf is not None:
            self._all_reduce("f")
        self._all_reduce("r")
        # Whether a parameter gets sparse gradients is structural (nn.Embedding(sparse=True)):
        # once one backward pass went through, the per-parameter check hooks can go.
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        return grads

    def _gradients_into_buffers(self, lf, lr, graph_f, graph_r):
        """Forget/retain gradients into the ``"f"``/``"r"`` buffers (``lf=None``: retain only).
        ``graph_f``/``graph_r`` keep the graph of that gradient (for HVPs) and return the
        per-parameter gradients."""
        params = self._params
        if not (graph_f or graph_r):
            for buf in self._buffers:
                if lf is not None:
                    buf.grad_f.zero_()
                buf.grad_r.zero_()
                buf.bind_grads("f")
            if lf is not None:
                torch.autograd.backward(lf, inputs=params)
            for buf in self._buffers:
                buf.bind_grads("r")
            try:
                torch.autograd.backward(lr, inputs=params)
            except RuntimeError as e:
                if "second time" in str(e):
                    raise RuntimeError("the forget and retain losses share part of one autograd "
                                       "graph; compute them in separate forward passes") from e
                raise
            return None
        gf = torch.autograd.grad(lf, params, create_graph=graph_f, allow_unused=True)
        gr = torch.autograd.grad(lr, params, create_graph=graph_r, allow_unused=True)
        for buf, (a, b) in zip(self._buffers, self._split([gf, gr])):
            buf.copy_in(buf.grad_f_views, a)
            buf.copy_in(buf.grad_r_views, b)
        return {"gf": list(gf), "gr": list(gr)}

    def _split(self, lists: list[list]) -> list[tuple]:
        """Split parameter-ordered lists into per-buffer chunks."""
        out, i = [], 0
        for buf in self._buffers:
            n = len(buf.params)
            out.append(tuple(lst[i : i + n] for lst in lists))
            i += n
        return out

    def _stats_dtype(self) -> torch.dtype:
        return (torch.float64 if any(b.dtype == torch.float64 for b in self._buffers)
                else torch.float32)

    def _reduce(self, x: str, y: str | None) -> tuple[list[Tensor], Tensor]:
        """Per-buffer ``reduce3`` of buffers ``x`` and ``y`` and their global sum."""
        dev, dt = self._buffers[0].device, self._stats_dtype()
        stats = [be.reduce3(buf.buffer(x)[0], self._opt(buf, y)).to(device=dev, dtype=dt,
                                                                    non_blocking=True)
                 for buf, be in zip(self._buffers, self._backends)]
        total = stats[0] if len(stats) == 1 else torch.stack(stats).sum(0)
        return stats, total

    def _direction_coeffs(self, gstats: Tensor) -> list[Tensor]:
        return [F.direction_coeffs(self.similarity, gstats, self.param_groups[g]["beta"],
                                   self.eps) for g in self._buffer_group]

    def _group_sqnorms(self, coefs: list[Tensor], stats: list[Tensor],
                       clipped_only: bool = False) -> dict[int, Tensor]:
        """Squared norm of ``coef[0]*x + coef[1]*y`` summed over each group's buffers, with
        ``stats = reduce3(x, y)`` per buffer (``clipped_only``: just the groups that clip)."""
        out: dict[int, Tensor] = {}
        for gi, coef, st in zip(self._buffer_group, coefs, stats):
            if clipped_only and self.param_groups[gi]["max_grad_norm"] is None:
                continue
            sq = F.direction_sqnorm(coef.to(st), st)
            out[gi] = out[gi] + sq if gi in out else sq
        return out

    def _grad_cos(self, graph: dict, gstats: Tensor) -> None:
        """``grad c = H_f a + H_r b`` into the ``"h"`` buffers (one double backward)."""
        seeds = F.seed_coeffs(gstats, self.eps)
        for buf, be in zip(self._buffers, self._backends):
            be.combine(buf.grad_f, buf.grad_r, self._on(seeds, buf), buf.buffer("a")[0],
                       buf.buffer("b")[0])
        self._store_h(_vjp(graph["gf"] + graph["gr"], self._views("a") + self._views("b"),
                           self._params))

    def _direction_operand(self, graph, stats, gstats):
        """The ``y`` of ``u = alpha*g_f + gamma*y``: ``(buffer name, per-buffer reduce3(g_f, y),
        finite flag)``. For ``hvp``, ``y = grad c`` is a new vector, so its norm and finiteness
        need one more reduction pass."""
        ok = torch.isfinite(gstats).all()
        if self.similarity == "project":
            return "r", stats, ok
        if self.similarity == "none":
            return None, stats, ok
        self._grad_cos(graph, gstats)
        ustats, ug = self._reduce("f", "h")
        return "h", ustats, ok & torch.isfinite(ug).all()

    def _combine_direction(self, graph, stats, gstats, out: str):
        """``u(theta)`` into the ``out`` buffers; returns per-buffer ``(coef, stats)`` pairs
        for its norm, and the finite flag."""
        ybuf, ustats, ok = self._direction_operand(graph, stats, gstats)
        coefs = self._direction_coeffs(gstats)
        for buf, be, coef in zip(self._buffers, self._backends, coefs):
            c4 = torch.cat([coef, torch.zeros_like(coef)])
            be.combine(buf.grad_f, self._opt(buf, ybuf), self._on(c4, buf), buf.buffer(out)[0])
        return coefs, ustats, ok

    def _form_v(self, graph, stats, gstats) -> tuple[Tensor, Tensor]:
        """``v = u(theta)`` into the ``"v"`` buffers; returns ``(|v|^2, finite flag)``."""
        coefs, ustats, ok = self._combine_direction(graph, stats, gstats, "v")
        return sum(self._group_sqnorms(coefs, ustats).values()), ok

    def _hvp(self, closure: Callable, graph, phi_sq: Tensor) -> None:
        """``h`` into the ``"h"`` buffers according to ``outer_hvp``."""
        params, v = self._params, self._views("v")
        if self.outer_hvp == "forget":
            self._store_h(_vjp(graph["gf"], v, params))
        elif self.outer_hvp == "exact":
            self._store_h(_vjp(self._u_graph(graph), v, params))
        else:  # "fd": built from gradients that are already averaged across ranks
            self._fd_hvp(closure, phi_sq)

    def _store_h(self, h: list[Tensor | None]) -> None:
        """A parameter-ordered list from autograd into the ``"h"`` buffers (rank average)."""
        for buf, (part,) in zip(self._buffers, self._split([h])):
            buf.copy_in(buf.buffer("h")[1], part)
        self._all_reduce("h")

    def _all_reduce(self, name: str) -> None:
        """Average buffer ``name`` over ``process_group``: one collective per flat buffer."""
        if self.process_group is None:
            return
        import torch.distributed as dist

        inv = 1.0 / dist.get_world_size(self.process_group)
        for buf in self._buffers:
            flat = buf.buffer(name)[0]
            dist.all_reduce(flat, group=self.process_group)
            flat.mul_(inv)

    def _u_graph(self, graph) -> list[Tensor | None]:
        """``u(theta)`` as a differentiable function of the parameters (for ``exact``)."""
        gf, gr = graph["gf"], graph["gr"]
        betas = [self.param_groups[g]["beta"] for buf, g in zip(self._buffers, self._buffer_group)
                 for _ in buf.params]
        if self.similarity == "none":
            return gf
        dt = self._stats_dtype()
        z = torch.zeros((), dtype=dt, device=self._buffers[0].device)
        d = nf2 = nr2 = z
        for a, b in zip(gf, gr):
            a = a.to(dt) if a is not None else None
            b = b.to(dt) if b is not None else None
            if a is not None and b is not None:
                d = d + (a * b).sum().to(z.device)
            if a is not None:
                nf2 = nf2 + (a * a).sum().to(z.device)
            if b is not None:
                nr2 = nr2 + (b * b).sum().to(z.device)
        s = torch.stack([d, nf2, nr2])
        if self.similarity == "project":
            _, k = F.similarity_scalars(s, self.eps)
            u = []
            for a, b, beta in zip(gf, gr, betas):
                pb = None if b is None else (beta * k.to(b.device) * b.to(dt)).to(b.dtype)
                u.append(a if pb is None else (-pb if a is None else a - pb))
            return u
        c, _ = F.similarity_scalars(s, self.eps)
        if not c.requires_grad:
            return gf
        gc = torch.autograd.grad(c, self._params, create_graph=True, allow_unused=True)
        return [a if g is None else (-beta * g if a is None else a - beta * g)
                for a, g, beta in zip(gf, gc, betas)]

    def _fd_hvp(self, closure: Callable, phi_sq: Tensor) -> None:
        """Central difference of ``u`` along ``v``: ``h = (u(+) - u(-)) |v| / (2 delta)``.

        theta is moved with the update kernel and restored arithmetically (to rounding)."""
        accepts = "same_batch" in inspect.signature(closure).parameters
        vnorm = torch.sqrt(phi_sq)
        ok = torch.isfinite(vnorm) & (vnorm > 0)
        step = torch.where(ok, self.fd_delta / vnorm, torch.zeros_like(vnorm))
        for buf in self._buffers:  # the outer update needs g_r(theta); the probes overwrite it
            buf.buffer("r_saved")[0].copy_(buf.grad_r)

        def move(sign: float) -> None:
            one = torch.ones_like(step)
            c = torch.stack([one, sign * step, 0.0 * one, ok.to(step.dtype)])
            for buf, be in zip(self._buffers, self._backends):
                be.update(buf.param, buf.buffer("v")[0], None, self._on(c, buf))

        def u_here(out: str) -> None:
            second = self.similarity == "hvp"
            with torch.enable_grad():
                loss_f, loss_r = self._call(closure, same_batch=accepts)
                graph = self._gradients(loss_f, loss_r, graph_f=second, graph_r=second)
                stats, gstats = self._reduce("f", "r")
                self._combine_direction(graph, stats, gstats, out)

        move(+1.0)
        u_here("up")
        move(-2.0)
        u_here("h")
        move(+1.0)
        scale = torch.where(ok, vnorm / (2.0 * self.fd_delta), torch.zeros_like(vnorm))
        for buf, be in zip(self._buffers, self._backends):
            c = self._on(torch.stack([-scale, scale, torch.zeros_like(scale),
                                      torch.zeros_like(scale)]), buf)
            be.combine(buf.buffer("h")[0], buf.buffer("up")[0], c, buf.buffer("h")[0])
            buf.grad_r.copy_(buf.buffer("r_saved")[0])

    def _apply(self, loop: str, x: str, y: str | None, coefs: list[Tensor],
               sqnorms: dict[int, Tensor], ok: Tensor) -> None:
        """Apply ``coef[0]*x + coef[1]*y`` (clipped per group, skipped unless ``ok``): ascent
        for the inner loop, descent for the outer one, plain or Adam-preconditioned."""
        for i, (buf, be) in enumerate(zip(self._buffers, self._backends)):
            group = self.param_groups[self._buffer_group[i]]
            scale = (F.clip_scale(sqnorms[self._buffer_group[i]], group["max_grad_norm"])
                     if group["max_grad_norm"] is not None else None)
            lr = self._inner_lr(group) if loop == "inner" else group["lr"]
            if self.preconditioner == "sgd":
                c = F.update_coeffs(lr if loop == "inner" else -lr, group["weight_decay"],
                                    coefs[i], scale, ok)
                be.update(buf.param, buf.buffer(x)[0], self._opt(buf, y), self._on(c, buf))
                continue
            direction = buf.buffer(x)[0]
            if y is not None:  # materialise the direction (torch's fused Adam reads one buffer)
                direction = buf.buffer("dir")[0]
                c4 = torch.cat([coefs[i], torch.zeros_like(coefs[i])])
                be.combine(buf.buffer(x)[0], buf.buffer(y)[0], self._on(c4, buf), direction)
            m, v = buf.buffer(f"{loop}_exp_avg")[0], buf.buffer(f"{loop}_exp_avg_sq")[0]
            F.adam_apply(buf.param, direction, m, v, self._adam_step(i, loop), lr=lr,
                         betas=group["betas"], eps=group["adam_eps"],
                         weight_decay=group["weight_decay"], ascend=loop == "inner",
                         scale=None if scale is None else self._on(scale, buf).float(),
                         ok=ok.to(buf.device))
        self._count_skip(ok)

    def _adam_step(self, i: int, loop: str) -> Tensor:
        key = (i, loop)
        if key not in self._adam_steps:
            self._adam_steps[key] = torch.zeros((), dtype=torch.float32,
                                                device=self._buffers[i].device)
        return self._adam_steps[key]

    def _count_skip(self, ok: Tensor) -> None:
        bad = (~ok).to(torch.int64)
        self._skipped = bad if self._skipped is None else self._skipped + bad.to(self._skipped)


_MOMENTS = ("inner_exp_avg", "inner_exp_avg_sq", "outer_exp_avg", "outer_exp_avg_sq")


def _vjp(outputs: list[Tensor | None], grad_outputs: list[Tensor],
         params: list[Tensor]) -> list[Tensor | None]:
    """``sum_i J_i^T w_i`` over the outputs that depend on the parameters (graph retained)."""
    pairs = [(o, w) for o, w in zip(outputs, grad_outputs) if o is not None and o.requires_grad]
    if not pairs:
        return [None] * len(params)
    return list(torch.autograd.grad([o for o, _ in pairs], params,
                                    grad_outputs=[w.to(o.dtype) for o, w in pairs],
                                    retain_graph=True, allow_unused=True))


def _resolve_process_group(pg):
    if pg is None:
        return None
    import torch.distributed as dist

    if isinstance(pg, str):
        if pg != "auto":
            raise ValueError(f"process_group must be 'auto', None or a ProcessGroup, got {pg!r}")
        ready = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        return dist.group.WORLD if ready else None
    return pg


def _check_number(name: str, value, where: str = "", positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}{where}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        need = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be finite and {need}, got {value}{where}")


def _dense_grad_check(name: str):
    def hook(grad: Tensor) -> None:
        if grad.is_sparse:
            raise TypeError(f"{name} received a sparse gradient; OFMU works on dense flat "
                            "buffers (use nn.Embedding(sparse=False))")
    return hook

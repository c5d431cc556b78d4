"""An independent, naive per-tensor implementation of the algorithm (docs/design.md), for tests only.

No flat buffers, no kernels, no seed formulas: every derivative comes straight from autograd
(grad c by differentiating the cosine, the exact penalty gradient as grad of 1/2 |u|^2). It is
slow and literal on purpose; the optimizer must agree with it to 1e-10 in float64.
"""

from __future__ import annotations

import functools

import ofmu
import torch

# ofmu.OFMU with the paper-form defaults (5 SGD inner steps, rho = 0.01, h = H_f v, no cap,
# lr 1e-2) that the contract, oracle and parity tests were written against; the constructor's
# own defaults are the robust first-order recipe (tested in test_defaults.py).
PaperOFMU = functools.partial(ofmu.OFMU, **{"lr": 1e-2, **ofmu.OFMU.paper_config()})


class BatchStream:
    """Deterministic stand-in for minibatch iterators: call i always sees batch i.

    ``closure(same_batch=True)`` reuses the previous batch (what ``outer_hvp="fd"`` asks for).
    """

    def __init__(self, model, seed=0, n_f=6, n_r=9, d_in=4, n_cls=3, dtype=torch.float64):
        self.model, self.i, self.seed = model, 0, seed
        self.shape = (n_f, n_r, d_in, n_cls)
        self.dtype = dtype

    def batch(self, i):
        g = torch.Generator().manual_seed(self.seed * 100003 + i)
        n_f, n_r, d_in, n_cls = self.shape
        xf = torch.randn(n_f, d_in, generator=g, dtype=torch.float64).to(self.dtype)
        xr = torch.randn(n_r, d_in, generator=g, dtype=torch.float64).to(self.dtype)
        yf = torch.randint(0, n_cls, (n_f,), generator=g)
        yr = torch.randint(0, n_cls, (n_r,), generator=g)
        return xf, yf, xr, yr

    def __call__(self, same_batch=False):
        if not same_batch:
            self.i += 1
        xf, yf, xr, yr = self.batch(self.i)
        ce = torch.nn.functional.cross_entropy
        return ce(self.model(xf), yf), ce(self.model(xr), yr)


def _den(x, eps):
    """A denominator as docs/design.md defines it: ``x (1 + eps) + tiny``, every epsilon relative
    to its own denominator (scaling one loss leaves u/|u| unchanged)."""
    return x * (1 + eps) + torch.finfo(x.dtype).tiny


def direction(params, betas, lf, lr, similarity, eps, create_graph=False):
    """u(theta) per tensor, plus (g_f, g_r, cosine). ``create_graph`` keeps u differentiable."""
    need_graph = create_graph or similarity == "hvp"
    gf = torch.autograd.grad(lf, params, create_graph=need_graph, allow_unused=True)
    gr = torch.autograd.grad(lr, params, create_graph=need_graph, allow_unused=True)
    gf = [torch.zeros_like(p) if g is None else g for p, g in zip(params, gf)]
    gr = [torch.zeros_like(p) if g is None else g for p, g in zip(params, gr)]
    d = sum((a * b).sum() for a, b in zip(gf, gr))
    nf2 = sum((a * a).sum() for a in gf)
    nr2 = sum((b * b).sum() for b in gr)
    cos = d / _den(torch.sqrt(nf2 * nr2), eps)
    if similarity == "none":
        u = list(gf)
    elif similarity == "project":
        k = d / _den(nr2, eps)
        u = [a - beta * k * b for a, b, beta in zip(gf, gr, betas)]
    else:  # hvp: grad of the cosine itself, by autograd
        gc = torch.autograd.grad(cos, params, create_graph=create_graph, allow_unused=True)
        gc = [torch.zeros_like(p) if g is None else g for p, g in zip(params, gc)]
        u = [a - beta * g for a, g, beta in zip(gf, gc, betas)]
    return u, gf, gr, cos


def _clip(vecs, groups_of, max_norms):
    """Per-group scale min(1, max / |vec|) as the optimizer defines it."""
    scales = []
    for gi, m in enumerate(max_norms):
        if m is None:
            scales.append(1.0)
            continue
        n = torch.sqrt(sum((v.detach() ** 2).sum() for v, g in zip(vecs, groups_of) if g == gi))
        scales.append(torch.clamp(m / (n + 1e-6), max=1.0))
    return [scales[g] for g in groups_of]


class ReferenceOFMU:
    """Literal OFMU on a list of param groups (dicts with 'params' and hyperparameters)."""

    def __init__(self, groups, similarity="project", outer_hvp="forget", inner_steps=1,
                 eps=1e-12, fd_delta=1e-3):
        self.groups = groups
        self.sim, self.hvp, self.T, self.eps, self.delta = similarity, outer_hvp, inner_steps, eps, fd_delta
        for g in groups:
            g.setdefault("rho_k", g["rho"])
            g["lr0"] = g["lr"]
        self.params = [p for g in groups for p in g["params"]]
        self.gidx = [i for i, g in enumerate(groups) for _ in g["params"]]

    def _betas(self):
        return [self.groups[i]["beta"] for i in self.gidx]

    def _hp(self, key):
        return [self.groups[i][key] for i in self.gidx]

    def inner(self, closure):
        with torch.enable_grad():
            lf, lr = closure()
            u, *_ = direction(self.params, self._betas(), lf, lr, self.sim, self.eps)
        u = [x.detach() for x in u]
        scale = _clip(u, self.gidx, [g["max_grad_norm"] for g in self.groups])
        with torch.no_grad():
            for p, x, s, gi in zip(self.params, u, scale, self.gidx):
                g = self.groups[gi]
                eta = g["lr"] if g["inner_lr"] is None else g["inner_lr"] * g["lr"] / g["lr0"]
                p.mul_(1 - eta * g["weight_decay"]).add_(eta * s * x)

    def _u_at(self, closure, same_batch):
        with torch.enable_grad():
            lf, lr = closure(same_batch=same_batch)
            u, *_ = direction(self.params, self._betas(), lf, lr, self.sim, self.eps)
        return [x.detach() for x in u]

    def outer(self, closure):
        need_h = self.hvp != "none" and any(g["rho_k"] > 0 for g in self.groups)
        with torch.enable_grad():
            lf, lr = closure()
            u, gf, gr, _ = direction(self.params, self._betas(), lf, lr, self.sim, self.eps,
                                     create_graph=need_h and self.hvp in ("forget", "exact"))
            h = [torch.zeros_like(p) for p in self.params]
            if need_h:
                v = [x.detach() for x in u]
                if self.hvp == "forget":
                    h = torch.autograd.grad(gf, self.params, grad_outputs=v, allow_unused=True)
                elif self.hvp == "exact":
                    half = 0.5 * sum((x * x).sum() for x in u)
                    h = torch.autograd.grad(half, self.params, allow_unused=True)
                h = [torch.zeros_like(p) if x is None else x.detach()
                     for p, x in zip(self.params, h)]
        gr = [x.detach() for x in gr]
        if need_h and self.hvp == "fd":
            vn = torch.sqrt(sum((x * x).sum() for x in v))
            with torch.no_grad():
                for p, x in zip(self.params, v):
                    p.add_(self.delta / vn * x)
            up = self._u_at(closure, True)
            with torch.no_grad():
                for p, x in zip(self.params, v):
                    p.add_(-2 * self.delta / vn * x)
            um = self._u_at(closure, True)
            with torch.no_grad():
                for p, x in zip(self.params, v):
                    p.add_(self.delta / vn * x)
            h = [(a - b) * vn / (2 * self.delta) for a, b in zip(up, um)]
        rho = self._hp("rho_k")
        dirs = [a + 2 * r * b for a, b, r in zip(gr, h, rho)]
        scale = _clip(dirs, self.gidx, [g["max_grad_norm"] for g in self.groups])
        with torch.no_grad():
            for p, x, s, gi in zip(self.params, dirs, scale, self.gidx):
                g = self.groups[gi]
                p.mul_(1 - g["lr"] * g["weight_decay"]).add_(-g["lr"] * s * x)
        for g in self.groups:
            g["rho_k"] = min(g["rho_k"] * g["rho_growth"], g["rho_max"])

    def step(self, closure):
        for _ in range(self.T):
            self.inner(closure)
        self.outer(closure)

"""Language-model unlearning methods under one protocol and one budget of gradient evaluations.

Every method unlearns a copy of the target model from two seeded streams of minibatches
(forget, retain) with Adam (what LLM unlearning uses in practice; open-unlearning uses AdamW),
and gets the same budget of gradient evaluations (forward + backward of one minibatch; a
forward alone counts 1/3; a double backward one more). Losses follow open-unlearning
(``src/trainer``): ``NLL`` is the mean token cross-entropy of the answer,

* GA: minimise ``-NLL_f``.
* GradDiff: minimise ``-NLL_f + alpha NLL_r``.
* NPO: ``-(2/b) mean log sigmoid(-b (s_theta - s_ref)) + alpha NLL_r`` with ``s`` the summed
  answer log-likelihood and the target model as reference (b = 0.1).
* SimNPO: ``-(2/b) gamma mean log sigmoid(b (l_theta - delta)) + alpha NLL_r`` with ``l`` the
  per-token average answer NLL (b = 4.5, gamma = 0.125, delta = 0), no reference model.
* OFMU: :class:`ofmu.OFMU` with ``preconditioner="adam"``, the closure returning
  ``(NLL_f, NLL_r)``; its cost per step is :func:`ofmu.studies.methods.ofmu_runs.ofmu_cost`,
  the same count as the vision study.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch.nn.functional import cross_entropy, logsigmoid

from ...optimizer import OFMU
from ..methods.ofmu_runs import FORWARD, ofmu_cost


def _token_nll(model, b) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed NLL and number of labelled tokens."""
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    tgt = b["labels"][:, 1:]
    ce = cross_entropy(logits[:, :-1].transpose(1, 2).float(), tgt, ignore_index=-100,
                       reduction="none")
    return ce.sum(1), (tgt != -100).sum(1)


def nll(model, b) -> torch.Tensor:
    return model(**b).loss


def _adam_loop(model, hp, steps, loss_fn) -> None:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=hp["lr"])
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()


def ga(model, streams, hp, steps, ref=None):
    _adam_loop(model, hp, steps, lambda: -nll(model, streams.forget.next()))


def grad_diff(model, streams, hp, steps, ref=None):
    _adam_loop(model, hp, steps, lambda: -nll(model, streams.forget.next())
               + hp["alpha"] * nll(model, streams.retain.next()))


def npo(model, streams, hp, steps, ref=None):
    b = hp["npo_beta"]

    def loss():
        bf = streams.forget.next()
        s, _ = _token_nll(model, bf)
        with torch.no_grad():
            s_ref, _ = _token_nll(ref, bf)
        log_ratio = -(s - s_ref)  # log p_theta - log p_ref of the whole answer
        return (-(2.0 / b) * logsigmoid(-b * log_ratio).mean()
                + hp["alpha"] * nll(model, streams.retain.next()))
    _adam_loop(model, hp, steps, loss)


def simnpo(model, streams, hp, steps, ref=None):
    b = hp["npo_beta"]

    def loss():
        s, n = _token_nll(model, streams.forget.next())
        lf = -logsigmoid(b * (s / n - hp["delta"])).mean() * 2.0 / b
        return hp["gamma"] * lf + hp["alpha"] * nll(model, streams.retain.next())
    _adam_loop(model, hp, steps, loss)


OFMU_KEYS = ("lr", "inner_lr", "inner_steps", "outer_steps", "beta", "rho", "rho_growth", "rho_max",
             "similarity", "outer_hvp", "preconditioner", "weight_decay", "max_grad_norm", "fd_delta")


def ofmu(model, streams, hp, steps, ref=None):
    missing = [k for k in OFMU_KEYS if k not in hp]
    if missing:
        raise ValueError(f"OFMU hyperparameters must all be given explicitly; missing {missing}")
    opt = OFMU([p for p in model.parameters() if p.requires_grad], **{k: hp[k] for k in OFMU_KEYS})

    def closure(same_batch: bool = False):
        bf = streams.forget.last if same_batch else streams.forget.next()
        br = streams.retain.last if same_batch else streams.retain.next()
        return nll(model, bf), nll(model, br)

    for _ in range(steps):
        opt.step(closure)
    stats = opt.last_stats()
    if stats.get("skipped_steps"):
        hp.setdefault("_notes", []).append(f"{stats['skipped_steps']} non-finite steps skipped")


@dataclass(frozen=True)
class LMMethod:
    name: str
    fn: object
    cost: object  # hp -> gradient evaluations per step
    defaults: dict
    grid: tuple[dict, ...]  # configurations tried on the validation split
    needs_ref: bool = False
    doc: str = ""
    extra: dict = field(default_factory=dict)

    def steps(self, hp: dict, budget: int) -> int:
        return max(1, int(budget / self.cost(hp) + 1e-9))


def lm_cost(name: str, hp: dict) -> float:
    """Gradient evaluations of one step of method ``name`` (the one place this is counted)."""
    if name.startswith("OFMU"):
        return ofmu_cost(hp)
    return {"GA": 1.0, "GradDiff": 2.0, "NPO": 2.0 + FORWARD, "SimNPO": 2.0}[name]


# OFMU, every hyperparameter explicit (the constructor's defaults are not relied on).
OFMU_BASE = {"inner_steps": 1, "outer_steps": 1, "beta": 1.0, "rho": 0.01, "rho_growth": 1.0,
             "rho_max": 1.0, "similarity": "project", "outer_hvp": "fd", "preconditioner": "adam",
             "weight_decay": 0.0, "max_grad_norm": None, "fd_delta": 1e-3}
OFMU_VARIANTS = {
    "OFMU": ({}, "project similarity, Adam, stationarity penalty rho=0.01 via finite differences"),
    "OFMU-hvp": ({"similarity": "hvp", "beta": 0.5, "outer_hvp": "forget"},
                 "second order: literal gradient of the cosine (double backward) and H_f v"),
    "OFMU-beta0": ({"beta": 0.0}, "ablation: no similarity penalty (beta=0)"),
    "OFMU-rho0": ({"rho": 0.0, "outer_hvp": "none"}, "ablation: no stationarity penalty (rho=0)"),
}
BASELINE_DEFAULTS = {
    "GA": ({}, "gradient ascent on the forget set"),
    "GradDiff": ({"alpha": 1.0}, "minimise -NLL_f + alpha NLL_r"),
    "NPO": ({"npo_beta": 0.1, "alpha": 1.0}, "negative preference optimisation, reference = target"),
    "SimNPO": ({"npo_beta": 4.5, "gamma": 0.125, "delta": 0.0, "alpha": 1.0},
               "reference-free NPO on the length-normalised NLL"),
}
FNS = {"GA": ga, "GradDiff": grad_diff, "NPO": npo, "SimNPO": simnpo}


def build_methods(lrs: tuple[float, ...], ofmu_grid: tuple[dict, ...]) -> dict[str, LMMethod]:
    """The methods with grids of equal size: each baseline tries ``lrs``; each OFMU variant tries
    ``ofmu_grid`` (dicts of ``lr`` and ``inner_lr``), of the same length."""
    if len(ofmu_grid) != len(lrs):
        raise ValueError(f"grids must have equal size: {len(lrs)} baseline lrs, {len(ofmu_grid)} "
                         "OFMU configurations")
    out = {}
    for name, (d, doc) in BASELINE_DEFAULTS.items():
        out[name] = LMMethod(name, FNS[name], (lambda hp, n=name: lm_cost(n, hp)), dict(d),
                             tuple({"lr": lr} for lr in lrs), needs_ref=name == "NPO", doc=doc)
    for name, (d, doc) in OFMU_VARIANTS.items():
        out[name] = LMMethod(name, ofmu, (lambda hp, n=name: lm_cost(n, hp)), {**OFMU_BASE, **d},
                             tuple(dict(g) for g in ofmu_grid), doc=doc)
    return out


def unlearn(method: LMMethod, target, streams, hp: dict, budget: int, seed: int):
    """A copy of ``target`` unlearned with ``method``; returns (model, steps)."""
    model = copy.deepcopy(target)
    model.train()
    ref = None
    if method.needs_ref:
        ref = copy.deepcopy(target).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
    torch.manual_seed(seed)
    steps = method.steps(hp, budget)
    method.fn(model, streams, hp, steps, ref)
    model.eval()
    return model, steps

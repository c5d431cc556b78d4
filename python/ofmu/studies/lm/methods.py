"""Language-model unlearning methods under one protocol and one budget of gradient evaluations.

The methods are :class:`ofmu.studies.methods.Method` objects, the abstraction the vision study
uses: ``fn(model, ctx, hparams, streams, steps)`` unlearns ``model`` in place and ``cost(hp)``
is the gradient evaluations of one step (forward + backward of one minibatch; a forward alone
counts 1/3; a double backward one more). ``ctx.after_step(k)`` is called after step ``k`` (the
runner evaluates budget checkpoints there). Every method draws seeded minibatches from the
forget set and the retain authors and, except OFMU's paper form, uses Adam. Losses follow
open-unlearning (``src/trainer``); ``NLL`` is the token-mean cross-entropy of the answer, and
the retain loss is either that NLL or the token-mean ``KL(p_target || p_model)``
(:func:`ofmu.hf.causal_lm_losses` with ``retain="kl"``, the target model as frozen reference):

* GA: minimise ``-NLL_f``. GradDiff / GradDiff-KL: ``-NLL_f + alpha * retain``.
* NPO: ``-(2/b) mean log sigmoid(-b (s_theta - s_ref)) + alpha NLL_r`` with ``s`` the summed
  answer log-likelihood and the target model as reference (b = 0.1).
* SimNPO: ``-(2/b) gamma mean log sigmoid(b (l_theta - delta)) + alpha NLL_r`` with ``l`` the
  per-token average answer NLL (b = 4.5, gamma = 0.125, delta = 0), no reference model.
* OFMU: ``ofmu.OFMU(params, lr=lr)``, the shipped defaults (nothing else set); OFMU-KL the
  same with the KL retain loss; OFMU-paper ``OFMU.paper_config()``; the ablations change one
  default each; OFMU-NPO ascends NPO's forget loss, negated (``ofmu.hf.causal_lm_losses`` with
  ``forget="npo"``, the target model as reference), instead of the forget NLL. The recorded
  hyperparameters are the constructor's, resolved from its signature
  (:func:`ofmu.studies.methods.ofmu_runs.resolve_ofmu`), and so is the cost.

Two study settings apply to any method: ``replay`` (a share of every retain minibatch drawn
from general text) and ``lora`` (a rank: the method trains PEFT LoRA adapters on every linear
projection of the attention and MLP blocks instead of all weights, and the adapters are merged
into the returned model; the "-lora" methods).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn.functional import cross_entropy, logsigmoid

from ...hf.losses import causal_lm_losses
from ...optimizer import OFMU
from ..methods.base import Method, steps_for
from ..methods.ofmu_runs import FORWARD, closure_calls, ofmu_cost, resolve_ofmu
from .text import MixedStream

REPLAY = 0.25  # the "-replay" methods' share of each retain minibatch taken from general text
LORA_RANK = 8  # the "-lora" methods' adapter rank (alpha = 2 x rank, no dropout)
# The "-lora" methods sweep the common grid times this: adapters that start at zero need larger
# steps, and LoRA's customary learning rate is about ten times full fine-tuning's.
LORA_LR_SCALE = 10.0
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

GRID = "authors"  # the key of every LM method's grid


@dataclass
class Context:
    """What a method needs besides the model and the streams: the step callback."""

    after_step: Callable[[int], None] = lambda k: None


def _token_nll(model, b) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed NLL and number of labelled tokens."""
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    tgt = b["labels"][:, 1:]
    ce = cross_entropy(logits[:, :-1].transpose(1, 2).float(), tgt, ignore_index=-100,
                       reduction="none")
    return ce.sum(1), (tgt != -100).sum(1)


def nll(model, b) -> torch.Tensor:
    return causal_lm_losses(model, None, b)[1]


def _frozen(model):
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def _retain(hp, model, ref):
    """The retain loss of a minibatch: NLL, or KL to the frozen starting model."""
    if hp["retain"] == "kl":
        return lambda b: causal_lm_losses(model, None, b, retain="kl", reference=ref)[1]
    return lambda b: nll(model, b)


def _retain_stream(hp, streams):
    """The retain minibatches: ``streams.retain``, or with a ``replay`` share of every batch drawn
    from general pre-training text (same rows per batch, so the same cost)."""
    share = hp.get("replay", 0.0)
    if not share:
        return streams.retain
    if streams.general is None:
        raise ValueError(f"replay={share} needs a general-text stream (Streams.general), got None")
    return MixedStream(streams.retain, streams.general, share)


def _adam_loop(model, hp, steps, loss_fn, ctx: Context) -> None:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=hp["lr"])
    for k in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()
        ctx.after_step(k + 1)


def ga(model, ctx, hp, streams, steps):
    _adam_loop(model, hp, steps, lambda: -nll(model, streams.forget.next()), ctx)


def grad_diff(model, ctx, hp, streams, steps):
    retain = _retain(hp, model, _frozen(model) if hp["retain"] == "kl" else None)
    rs = _retain_stream(hp, streams)
    _adam_loop(model, hp, steps, lambda: -nll(model, streams.forget.next())
               + hp["alpha"] * retain(rs.next()), ctx)


def npo(model, ctx, hp, streams, steps):
    b, ref = hp["npo_beta"], _frozen(model)
    rs = _retain_stream(hp, streams)

    def loss():
        bf = streams.forget.next()
        s, _ = _token_nll(model, bf)
        with torch.no_grad():
            s_ref, _ = _token_nll(ref, bf)
        log_ratio = -(s - s_ref)  # log p_theta - log p_ref of the whole answer
        return (-(2.0 / b) * logsigmoid(-b * log_ratio).mean()
                + hp["alpha"] * nll(model, rs.next()))
    _adam_loop(model, hp, steps, loss, ctx)


def simnpo(model, ctx, hp, streams, steps):
    b = hp["npo_beta"]
    rs = _retain_stream(hp, streams)

    def loss():
        s, n = _token_nll(model, streams.forget.next())
        lf = -logsigmoid(b * (s / n - hp["delta"])).mean() * 2.0 / b
        return hp["gamma"] * lf + hp["alpha"] * nll(model, rs.next())
    _adam_loop(model, hp, steps, loss, ctx)


def ofmu(model, ctx, hp, streams, steps):
    """``OFMU(params, **options)`` with the options the method sets (the rest: the constructor's
    defaults); the closure returns (forget loss, retain loss) on fresh minibatches, or on the last
    ones when the optimizer asks (finite-difference probes): the forget NLL, or with
    ``forget="npo"`` NPO's forget loss negated, the target as reference."""
    opt = OFMU([p for p in model.parameters() if p.requires_grad], **_options(hp))
    forget = hp.get("forget", "nll")
    ref = _frozen(model) if hp["retain"] == "kl" or forget == "npo" else None
    rs = _retain_stream(hp, streams)
    npo_beta = hp.get("npo_beta", 0.1)

    def closure(same_batch: bool = False):
        bf = streams.forget.last if same_batch else streams.forget.next()
        br = rs.last if same_batch else rs.next()
        return causal_lm_losses(model, bf, br, retain=hp["retain"], reference=ref, forget=forget,
                                npo_beta=npo_beta)

    for k in range(steps):
        opt.step(closure)
        ctx.after_step(k + 1)
    stats = opt.last_stats()
    if stats.get("skipped_steps"):
        hp.setdefault("_notes", []).append(f"{stats['skipped_steps']} non-finite steps skipped")


def lm_cost(name: str, hp: dict) -> float:
    """Gradient evaluations of one step of method ``name`` (the one place this is counted): a
    KL retain loss adds the reference model's forward (1/3) to every retain evaluation, and
    OFMU's NPO forget loss to every forget evaluation (every closure call computes both)."""
    kl = FORWARD if hp.get("retain") == "kl" else 0.0
    if name.startswith("OFMU"):
        ref = kl + (FORWARD if hp.get("forget") == "npo" else 0.0)
        return ofmu_cost(_options(hp)) + ref * closure_calls(_options(hp))
    return {"GA": 1.0, "GradDiff": 2.0, "NPO": 2.0 + FORWARD, "SimNPO": 2.0}[name.split("-")[0]] + kl


_STUDY_KEYS = ("retain", "forget", "npo_beta", "replay", "lora", "_notes")  # the study's settings, not OFMU's


def _options(hp: dict) -> dict:
    return {k: v for k, v in hp.items() if k not in _STUDY_KEYS}


# name -> (fn, settings beyond lr, doc). OFMU's settings are only those that differ from the
# constructor's defaults; the records list every resolved value.
BASELINES = {
    "GA": (ga, {}, "gradient ascent on the forget set"),
    "GradDiff": (grad_diff, {"alpha": 1.0, "retain": "nll"}, "minimise -NLL_f + alpha NLL_r"),
    "GradDiff-KL": (grad_diff, {"alpha": 1.0, "retain": "kl"},
                    "minimise -NLL_f + alpha KL(p_target || p_model) on retain answers"),
    "NPO": (npo, {"npo_beta": 0.1, "alpha": 1.0}, "negative preference optimisation, reference = target"),
    "SimNPO": (simnpo, {"npo_beta": 4.5, "gamma": 0.125, "delta": 0.0, "alpha": 1.0},
               "reference-free NPO on the length-normalised NLL"),
    "NPO-replay": (npo, {"npo_beta": 0.1, "alpha": 1.0, "replay": REPLAY},
                   f"NPO with {REPLAY:.0%} of every retain minibatch from general text"),
    "NPO-lora": (npo, {"npo_beta": 0.1, "alpha": 1.0, "lora": LORA_RANK},
                 f"NPO training rank-{LORA_RANK} LoRA adapters only (lr grid x {LORA_LR_SCALE:g})"),
    "GradDiff-lora": (grad_diff, {"alpha": 1.0, "retain": "nll", "lora": LORA_RANK},
                      f"GradDiff training rank-{LORA_RANK} LoRA adapters only (lr grid x {LORA_LR_SCALE:g})"),
}
OFMU_VARIANTS = {
    "OFMU": ({}, "ofmu.OFMU(params, lr=lr): the shipped defaults"),
    "OFMU-KL": ({"retain": "kl"}, "the shipped defaults, retain loss KL(p_target || p_model)"),
    "OFMU-paper": (None, "OFMU.paper_config(): 5 SGD inner steps, rho=0.01 with H_f v, beta=0.5"),
    "OFMU-beta0": ({"beta": 0.0}, "ablation of the defaults: no similarity penalty (beta=0)"),
    "OFMU-rho": ({"rho": 0.01}, "ablation of the defaults: stationarity penalty on (rho=0.01)"),
    "OFMU-sign": ({"inner_preconditioner": "sign"}, "the defaults with inner_preconditioner='sign'"),
    "OFMU-outer2": ({"outer_steps": 2}, "the defaults with outer_steps=2 (more ascent steps per budget)"),
    "OFMU-outer1": ({"outer_steps": 1}, "the defaults with outer_steps=1 (one descent step per ascent step)"),
    "OFMU-NPO": ({"forget": "npo", "npo_beta": 0.1},
                 "the defaults ascending NPO's forget loss (negated; beta 0.1, reference = target) "
                 "instead of the forget NLL"),
    "OFMU-replay": ({"replay": REPLAY},
                    f"the defaults with {REPLAY:.0%} of every retain minibatch from general text"),
    "OFMU-lora": ({"lora": LORA_RANK},
                  f"the defaults training rank-{LORA_RANK} LoRA adapters only (lr grid x {LORA_LR_SCALE:g})"),
}
ALL_METHODS = tuple(BASELINES) + tuple(OFMU_VARIANTS)


def _ofmu_settings(name: str) -> dict:
    if name == "OFMU-paper":
        return {**OFMU.paper_config(), "retain": "nll"}
    return {"retain": "nll", **OFMU_VARIANTS[name][0]}


def build_methods(lrs: tuple[float, ...], sgd_lrs: tuple[float, ...]) -> dict[str, Method]:
    """Every method with the same learning-rate grid ``lrs`` (OFMU: ``inner_lr`` left to its
    default, which follows ``lr``); OFMU's paper form, plain SGD steps, sweeps ``sgd_lrs`` of the
    same length, and the "-lora" methods ``lrs`` x ``LORA_LR_SCALE``."""
    if len(sgd_lrs) != len(lrs):
        raise ValueError(f"grids must have equal size: {len(lrs)} Adam lrs, {len(sgd_lrs)} SGD lrs")
    lora_lrs = tuple(float(f"{lr * LORA_LR_SCALE:.6g}") for lr in lrs)
    specs = [(name, fn, dict(d), doc) for name, (fn, d, doc) in BASELINES.items()]
    specs += [(name, ofmu, _ofmu_settings(name), doc) for name, (_, doc) in OFMU_VARIANTS.items()]
    out = {}
    for name, fn, defaults, doc in specs:
        grid = sgd_lrs if name == "OFMU-paper" else lora_lrs if defaults.get("lora") else lrs
        out[name] = Method(name, name, fn, lambda hp, n=name: lm_cost(n, hp),
                           {GRID: tuple({"lr": lr} for lr in grid)}, doc=doc, defaults=defaults)
    return out


def recorded(method: Method, hp: dict) -> dict:
    """The hyperparameters a run records: OFMU's with every constructor default resolved."""
    clean = {k: v for k, v in hp.items() if not k.startswith("_")}
    if method.fn is ofmu:
        return {**resolve_ofmu(_options(clean)), **{k: clean[k] for k in _STUDY_KEYS if k in clean}}
    return clean


def unlearn(method: Method, target, streams, hp: dict, steps: int, seed: int,
            after_step: Callable | None = None):
    """A copy of ``target`` unlearned with ``method`` for ``steps`` steps; ``after_step(model, k)``
    is called after step ``k`` (an evaluation there must leave the model as it found it)."""
    model = copy.deepcopy(target)
    if hp.get("lora"):
        model = with_lora(model, hp["lora"])
    model.train()
    torch.manual_seed(seed)
    hook = (lambda k: after_step(model, k)) if after_step is not None else (lambda k: None)
    method.fn(model, Context(hook), hp, streams, steps)
    if hp.get("lora"):
        model = model.merge_and_unload()
    model.eval()
    return model


def with_lora(model, rank: int):
    """``model`` (modified in place) wrapped in PEFT LoRA adapters of ``rank`` on every linear
    projection of ``LORA_TARGETS`` (alpha = 2 x rank, no dropout); only the adapters train. The
    adapters start at zero (PEFT's init), so the wrapped model computes what ``model`` did."""
    if not (isinstance(rank, int) and not isinstance(rank, bool) and rank > 0):
        raise ValueError(f"lora must be a positive integer rank, got {rank!r}")
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError('the "-lora" methods need peft: pip install "ofmu[lm]"') from None
    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = [t for t in LORA_TARGETS if t in present]
    if not targets:
        raise ValueError(f"lora: the model has none of the projections {LORA_TARGETS}")
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets,
                     bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


__all__ = ["ALL_METHODS", "GRID", "Context", "build_methods", "lm_cost", "recorded", "steps_for",
           "unlearn", "with_lora"]

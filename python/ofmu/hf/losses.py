"""Causal language-model losses for OFMU's closure: token-mean negative log-likelihood, a
KL-to-reference retain loss, and NPO's bounded forget objective."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

IGNORE_INDEX = -100
RETAIN_LOSSES = ("nll", "kl")
FORGET_LOSSES = ("nll", "npo")


def causal_lm_labels(batch: Mapping[str, Tensor]) -> Tensor:
    """The batch's ``labels``, or ``input_ids`` with padding (``attention_mask == 0``) set to
    ``-100`` when the batch has no labels."""
    if "labels" in batch:
        return batch["labels"]
    if "input_ids" not in batch:
        raise KeyError(f"a causal-LM batch needs 'input_ids' (and optionally 'labels', "
                       f"'attention_mask'); got keys {sorted(batch)}")
    labels = batch["input_ids"].clone()
    if "attention_mask" in batch:
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
    return labels


def token_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token negative log-likelihood over the positions whose label is not ``-100``.

    ``logits[:, t]`` predicts ``labels[:, t + 1]`` (the shift a causal LM's own loss applies);
    the log-softmax runs in float32 whatever the logits' dtype. A batch without a single
    labelled token gives ``nan`` (an empty mean), which OFMU counts as a skipped step.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"expected logits (batch, seq, vocab) and labels (batch, seq); got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:].to(logits.device)
    return torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                             shift_labels.reshape(-1), ignore_index=IGNORE_INDEX,
                                             reduction="mean")


def token_kl(logits: Tensor, ref_logits: Tensor, labels: Tensor) -> Tensor:
    """Mean over the labelled positions (label not ``-100``, same shift as :func:`token_nll`) of
    ``KL(p_ref || p_model)``, the full next-token distributions compared, in float32.

    ``logits[:, t]`` and ``ref_logits[:, t]`` count where ``labels[:, t + 1]`` is labelled. A batch
    without a labelled token gives ``nan``, as :func:`token_nll` does.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2] or ref_logits.shape != logits.shape:
        raise ValueError(f"expected logits and reference logits (batch, seq, vocab) of one shape and "
                         f"labels (batch, seq); got {tuple(logits.shape)}, {tuple(ref_logits.shape)} "
                         f"and {tuple(labels.shape)}")
    mask = labels[:, 1:].to(logits.device) != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)[mask]
    logq = torch.log_softmax(ref_logits[:, :-1].to(logits.device).float(), dim=-1)[mask]
    per_token = (logq.exp() * (logq - logp)).sum(-1)
    return per_token.mean()


def check_npo_beta(beta) -> float:
    """``beta`` as a float if it is a finite number > 0 (not a bool); a ``ValueError`` naming
    ``npo_beta`` otherwise."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (
            math.isfinite(beta) and beta > 0):
        raise ValueError(f"npo_beta must be a finite number > 0; got {beta!r}")
    return float(beta)


def sequence_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-sequence summed next-token negative log-likelihood over the labelled positions (the
    shift and masking of :func:`token_nll`), in float32 or the logits' wider dtype:
    ``-log p(answer)`` of each row."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"expected logits (batch, seq, vocab) and labels (batch, seq); got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    shift_labels = labels[:, 1:].to(logits.device)
    wide = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    ce = torch.nn.functional.cross_entropy(wide.transpose(1, 2), shift_labels,
                                           ignore_index=IGNORE_INDEX, reduction="none")
    return ce.sum(1)


def npo_objective(logits: Tensor, ref_logits: Tensor, labels: Tensor, beta: float) -> Tensor:
    """NPO's forget loss negated, the quantity OFMU ascends:
    ``(2 / beta) * mean log sigmoid(-beta * (log p_model(y) - log p_ref(y)))`` over the rows,
    ``log p(y)`` the summed log-likelihood of each row's labelled tokens.

    It is ``-(2 / beta) log 2`` where the model equals the reference and rises towards 0 as the
    model's probability of the forget answers falls below the reference's. Its gradient is the
    summed-NLL ascent direction weighted per row by ``2 * sigmoid(beta * log(p_model / p_ref))``,
    which vanishes once a row is forgotten: the ascent stops by itself, unlike NLL ascent."""
    beta = check_npo_beta(beta)
    if ref_logits.shape != logits.shape:
        raise ValueError(f"reference logits {tuple(ref_logits.shape)} differ from the model's "
                         f"{tuple(logits.shape)}")
    log_ratio = sequence_nll(ref_logits, labels) - sequence_nll(logits, labels)
    return (2.0 / beta) * torch.nn.functional.logsigmoid(-beta * log_ratio).mean()


def _forward(model, batch: Mapping[str, Tensor]) -> Tensor:
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    for key in ("position_ids", "token_type_ids"):
        if key in batch:
            inputs[key] = batch[key]
    out = model(**inputs, use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


def causal_lm_losses(model, forget_batch: Mapping[str, Tensor] | None,
                     retain_batch: Mapping[str, Tensor], *, retain: str = "nll",
                     reference=None, forget: str = "nll",
                     npo_beta: float = 0.1) -> tuple[Tensor | None, Tensor]:
    """``(forget_loss, retain_loss)`` for :meth:`ofmu.OFMU.step`, from two separate forward
    passes. The forget loss (which OFMU ascends) is

    - ``forget="nll"`` (default): the token-mean next-token NLL of ``forget_batch`` (``-100``
      labels masked);
    - ``forget="npo"``: NPO's forget loss negated (:func:`npo_objective`, ``beta=npo_beta``,
      reference ``reference``): ascent on it lowers the forget answers' probability with a
      weight that vanishes once they are below the reference's, so it stops by itself. Its
      values are negative (``-(2/npo_beta) log 2`` at the reference), so OFMU's
      ``forget_loss_cap`` never acts on it.

    The retain loss is

    - ``retain="nll"`` (default): the token-mean NLL of ``retain_batch``;
    - ``retain="kl"``: the token-mean ``KL(p_ref || p_model)`` over the retain batch's labelled
      positions, ``p_ref`` from ``reference``, a frozen copy of the model before unlearning
      (evaluated under ``torch.no_grad()``; put it in eval mode yourself). It keeps the model's
      whole next-token distribution on the retain text, not only the probability of the
      labelled token.

    Each batch is a mapping with ``input_ids`` and optionally ``attention_mask`` and
    ``labels`` (without labels, the input ids with padding masked are the labels). The model
    is called without ``labels`` so its own loss (and its batch-size bookkeeping) is not used.
    ``forget_batch=None`` skips the forget forward pass and returns ``(None, retain_loss)``.

    Example (your own loop)::

        def closure():
            return causal_lm_losses(model, next(forget_batches), next(retain_batches))
        opt.step(closure)
    """
    if retain not in RETAIN_LOSSES:
        raise ValueError(f"retain must be one of {RETAIN_LOSSES}; got {retain!r}")
    if forget not in FORGET_LOSSES:
        raise ValueError(f"forget must be one of {FORGET_LOSSES}; got {forget!r}")
    for name, value in (("retain", retain), ("forget", forget)):
        if value in ("kl", "npo") and reference is None:
            raise ValueError(f'{name}="{value}" needs reference=<a frozen copy of the model '
                             'before unlearning>')
    if forget == "npo":
        check_npo_beta(npo_beta)
    forget_labels = None if forget_batch is None else causal_lm_labels(forget_batch)
    labels = causal_lm_labels(retain_batch)
    forget_loss = None
    if forget_batch is not None:
        forget_logits = _forward(model, forget_batch)
        if forget == "nll":
            forget_loss = token_nll(forget_logits, forget_labels)
        else:
            with torch.no_grad():
                ref_forget = _forward(reference, forget_batch)
            forget_loss = npo_objective(forget_logits, ref_forget, forget_labels, npo_beta)
    logits = _forward(model, retain_batch)
    if retain == "nll":
        return forget_loss, token_nll(logits, labels)
    with torch.no_grad():
        ref_logits = _forward(reference, retain_batch)
    return forget_loss, token_kl(logits, ref_logits, labels)

"""Causal language-model losses for OFMU's closure: token-mean negative log-likelihood."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

IGNORE_INDEX = -100


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


def _forward(model, batch: Mapping[str, Tensor]) -> Tensor:
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    for key in ("position_ids", "token_type_ids"):
        if key in batch:
            inputs[key] = batch[key]
    out = model(**inputs, use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


def causal_lm_losses(model, forget_batch: Mapping[str, Tensor] | None,
                     retain_batch: Mapping[str, Tensor]) -> tuple[Tensor | None, Tensor]:
    """``(forget_loss, retain_loss)`` for :meth:`ofmu.OFMU.step`: the token-mean next-token NLL
    of each batch (``-100`` labels masked), from two separate forward passes.

    Each batch is a mapping with ``input_ids`` and optionally ``attention_mask`` and
    ``labels`` (without labels, the input ids with padding masked are the labels). The model
    is called without ``labels`` so its own loss (and its batch-size bookkeeping) is not used.
    ``forget_batch=None`` skips the forget forward pass and returns ``(None, retain_loss)``.

    Example (your own loop)::

        def closure():
            return causal_lm_losses(model, next(forget_batches), next(retain_batches))
        opt.step(closure)
    """
    losses = []
    for batch in (forget_batch, retain_batch):
        if batch is None and not losses:
            losses.append(None)
            continue
        labels = causal_lm_labels(batch)
        losses.append(token_nll(_forward(model, batch), labels))
    return losses[0], losses[1]

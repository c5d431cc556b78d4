"""Run a causal LM over the evaluation sets and collect the raw per-example numbers.

``raw(model, tok, sets)`` returns, per set, the average answer loss of the answer, of the
paraphrase and of each perturbed answer, the greedy generation and its ROUGE-L recall, and the
answer's per-token log-probabilities (for the min-k% attack). ``metrics.summarize`` turns them
into TOFU's scalars. Everything runs under ``torch.no_grad`` in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from . import metrics
from .data import QA
from .text import IGNORE, collate, encode_pair, encode_text

WORLD_EXTRA = 12  # generated tokens beyond the short world-knowledge answer


@dataclass
class EvalSets:
    forget: list[QA]
    retain: list[QA]
    world: list[QA]
    holdout: list[QA]
    neighbours: list[QA] = field(default_factory=list)  # forget authors' facts not in the request
    fluency: list[str] = field(default_factory=list)  # held-out general sentences


@torch.no_grad()
def answer_stats(model, tok, items: list[tuple[str, str]], batch_size: int = 32,
                 device="cpu") -> tuple[np.ndarray, list[np.ndarray]]:
    """Per pair ``(question, answer)``: the average loss over the labelled tokens (answer + end
    token) and the log-probabilities of the answer tokens without the end token."""
    losses, token_lps = [], []
    for i in range(0, len(items), batch_size):
        pairs = [encode_pair(tok, q, a) for q, a in items[i:i + batch_size]]
        b = {k: v.to(device) for k, v in collate(pairs, tok.pad_id).items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        tgt = b["labels"][:, 1:]
        mask = tgt != IGNORE
        logits = logits[:, :-1].float()
        lp = (logits.gather(-1, tgt.clamp(min=0)[..., None]).squeeze(-1)
              - torch.logsumexp(logits, -1)).double() * mask
        losses.append((-lp.sum(1) / mask.sum(1)).cpu().numpy())
        for row, m in zip(lp, mask):
            vals = row[m].cpu().numpy()
            token_lps.append(vals[:-1])  # drop the end token, as open-unlearning's min-k
    return np.concatenate(losses), token_lps


@torch.no_grad()
def generate(model, tok, questions: list[str], max_new_tokens: int, batch_size: int = 32,
             device="cpu") -> list[str]:
    """Greedy answers (left-padded batches, stopped at the end token)."""
    out = []
    for i in range(0, len(questions), batch_size):
        prompts = [tok.prompt_ids(q) for q in questions[i:i + batch_size]]
        n = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), n), tok.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), n), dtype=torch.long)
        for j, p in enumerate(prompts):
            ids[j, n - len(p):] = torch.tensor(p)
            mask[j, n - len(p):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        out += [tok.decode(row[n:].tolist()) for row in gen.cpu()]
    return out


def _set_raw(model, tok, qas: list[QA], *, para: bool, gen: bool, bs: int, device) -> dict:
    qs = [qa.question for qa in qas]
    r: dict = {}
    r["answer_loss"], r["token_logprobs"] = answer_stats(
        model, tok, [(qa.question, qa.answer) for qa in qas], bs, device)
    if para:
        r["para_loss"], _ = answer_stats(model, tok, [(qa.question, qa.paraphrase) for qa in qas],
                                         bs, device)
    n_pert = len(qas[0].perturbed)
    flat, _ = answer_stats(model, tok, [(qa.question, p) for qa in qas for p in qa.perturbed],
                           bs, device)
    r["pert_loss"] = flat.reshape(len(qas), n_pert)
    if gen:  # room for a sentence around a short world-knowledge answer ("The capital ... is Paris")
        max_new = max(len(tok.answer_ids(qa.answer)) for qa in qas) + (2 if para else WORLD_EXTRA)
        r["generations"] = generate(model, tok, qs, max_new, bs, device)
        r["rouge"] = metrics.rouge_l_recall(r["generations"], [qa.answer for qa in qas])
    return r


@torch.no_grad()
def text_nll(model, tok, texts: list[str], batch_size: int = 32, device="cpu") -> tuple[float, int]:
    """(summed next-token NLL, number of predicted tokens) over plain sentences."""
    total, count = 0.0, 0
    for i in range(0, len(texts), batch_size):
        b = {k: v.to(device) for k, v in collate([encode_text(tok, t) for t in texts[i:i + batch_size]],
                                                 tok.pad_id).items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        tgt = b["labels"][:, 1:]
        mask = tgt != IGNORE
        lp = logits.gather(-1, tgt.clamp(min=0)[..., None]).squeeze(-1) - torch.logsumexp(logits, -1)
        total -= float(lp[mask].double().sum())
        count += int(mask.sum())
    return total, count


def _in_eval(model, fn):
    was_training = model.training
    model.eval()
    try:
        return fn()
    finally:
        model.train(was_training)


def raw(model, tok, sets: EvalSets, batch_size: int = 32, device="cpu", mia: bool = True) -> dict:
    """Raw per-example numbers of every set; ``mia=False`` skips the holdout set (the membership
    attack then reads no numbers and is left out of the summary)."""
    def run():
        out = {
            "forget": _set_raw(model, tok, sets.forget, para=True, gen=True, bs=batch_size,
                               device=device),
            "retain": _set_raw(model, tok, sets.retain, para=True, gen=True, bs=batch_size,
                               device=device),
            "world": _set_raw(model, tok, sets.world, para=False, gen=True, bs=batch_size,
                              device=device),
        }
        if mia:
            h_loss, h_lp = answer_stats(model, tok, [(qa.question, qa.answer) for qa in sets.holdout],
                                        batch_size, device)
            out["holdout"] = {"answer_loss": h_loss, "token_logprobs": h_lp}
        if sets.neighbours:
            out["neighbours"] = _set_raw(model, tok, sets.neighbours, para=True, gen=True,
                                         bs=batch_size, device=device)
        if sets.fluency:
            out["fluency"] = text_nll(model, tok, sets.fluency, batch_size, device)
        return out
    return _in_eval(model, run)


def raw_world(model, tok, world: list[QA], batch_size: int = 32, device="cpu") -> dict:
    """The world-knowledge numbers alone (the base model's, the reference of world knowledge)."""
    return _in_eval(model, lambda: _set_raw(model, tok, world, para=False, gen=True, bs=batch_size,
                                            device=device))


def _norm(s: str) -> str:
    s = s.lower().strip().rstrip(".")
    return s[4:] if s.startswith("the ") else s


def world_answered(model, tok, world: list[QA], batch_size: int = 32, device="cpu") -> list[QA]:
    """The world-knowledge facts whose answer appears in the model's greedy generation (checked
    against the base model, so the utility set is what that model really knows)."""
    max_new = max(len(tok.answer_ids(qa.answer)) for qa in world) + WORLD_EXTRA
    was_training = model.training
    model.eval()
    try:
        gens = generate(model, tok, [qa.question for qa in world], max_new, batch_size, device)
    finally:
        model.train(was_training)
    return [qa for qa, g in zip(world, gens) if _norm(qa.answer) in g.lower()]

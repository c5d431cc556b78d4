"""TOFU / open-unlearning metrics on per-example numbers (no model here; see ``evaluate.py``).

Inputs are per-example *average answer losses* ``L = -(1/|a|) sum_t log p(a_t | q, a_<t)``
over the answer tokens and the end token (the labelled tokens), greedy generations, and
per-token log-probabilities. Definitions (open-unlearning, ``src/evals/metrics``):

* probability: ``P(a|q)^(1/|a|) = exp(-L)``, averaged over examples.
* normalised probability (world knowledge): ``p_c / (p_c + sum_j p_j)`` with ``p = exp(-L)``
  of the correct answer and of each wrong alternative.
* truth ratio of one example: ``R = exp(-mean_j L_pert_j) / exp(-L_para)`` (the geometric
  mean of the perturbed answers' normalised probabilities over the paraphrase's; TOFU).
  Aggregated as ``mean(min(R, 1/R))`` on the forget set ("closer to 1 is better") and as
  ``mean(max(0, 1 - R))`` on retain and world knowledge ("true is better").
* forget quality: the two-sample Kolmogorov-Smirnov p-value between the forget-set truth
  ratios of the unlearned model and of the retain (gold) model.
* ROUGE-L recall of the greedy generation against the ground-truth answer (rouge-score, with
  the Porter stemmer).
* model utility: the harmonic mean of probability, ROUGE-L recall and truth ratio on the
  retain set and on the world-knowledge set (6 numbers; TOFU's 9 add a real-authors set).
* min-k% probability MIA score: ``-mean`` of the ``max(1, int(k n))`` lowest token
  log-probabilities of the answer (end token excluded), k = 0.4; AUC of telling forget
  examples (members) from holdout examples (non-members), 1 when forget answers are much more
  likely than holdout ones.

One deliberate difference from open-unlearning: ratios are taken in the log domain, without the
``+1e-10`` that open-unlearning adds to denominators, so a model that has collapsed (answer
probabilities below about 1e-8) gets its true ratio instead of one capped by the epsilon.
"""

from __future__ import annotations

import math

import numpy as np

MIN_K = 0.4


class NonFiniteError(ValueError):
    """A metric's input or result is NaN or infinite (a diverged model's losses)."""


def _missing(name: str) -> ImportError:
    return ImportError(f"{name} is needed for the language-model benchmark: "
                       f'pip install "ofmu[lm]"')


def _arr(x, name: str, ndim: int) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != ndim or a.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty {ndim}-D array, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise NonFiniteError(f"{name} contains non-finite values")
    return a


def probability(avg_loss) -> float:
    return float(np.mean(np.exp(-_arr(avg_loss, "avg_loss", 1))))


def normalised_probability(correct_loss, wrong_losses) -> float:
    c = _arr(correct_loss, "correct_loss", 1)
    w = _arr(wrong_losses, "wrong_losses", 2)
    if w.shape[0] != c.shape[0]:
        raise ValueError(f"wrong_losses has {w.shape[0]} rows for {c.shape[0]} examples")
    # p_c / (p_c + sum_j p_j) in the log domain: exp(-L) underflows to 0 past L ~ 745 nats, which
    # a model driven far from the answers reaches (0 / 0 would be NaN)
    log_total = np.logaddexp(-c, np.logaddexp.reduce(-w, axis=1))
    return float(np.mean(np.exp(-c - log_total)))


# Logs are clipped at LOG_MAX before exp() so that R, 1/R and perplexities stay finite float64
# numbers (e^700 ~ 1e304): a model driven far from the answers reaches losses and loss
# differences of thousands of nats. Only the order of the ratios enters the KS test, and the clip
# keeps it except among ratios beyond e^700.
LOG_MAX = 700.0


def truth_ratios(para_loss, pert_losses) -> np.ndarray:
    """Per-example ``R = exp(-mean_j L_pert_j) / exp(-L_para)`` (log domain; ``|log R|`` clipped
    at ``LOG_MAX``)."""
    p = _arr(para_loss, "para_loss", 1)
    w = _arr(pert_losses, "pert_losses", 2)
    if w.shape[0] != p.shape[0]:
        raise ValueError(f"pert_losses has {w.shape[0]} rows for {p.shape[0]} examples")
    return np.exp(np.clip(p - w.mean(1), -LOG_MAX, LOG_MAX))


def truth_ratio_forget(ratios) -> float:
    r = _arr(ratios, "ratios", 1)
    return float(np.mean(np.minimum(r, 1.0 / r)))


def truth_ratio_retain(ratios) -> float:
    r = _arr(ratios, "ratios", 1)
    return float(np.mean(np.maximum(0.0, 1.0 - r)))


def forget_quality(ratios_unlearned, ratios_retain_model) -> float:
    try:
        from scipy.stats import ks_2samp
    except ImportError as e:
        raise _missing("scipy") from e
    a = _arr(ratios_unlearned, "ratios_unlearned", 1)
    b = _arr(ratios_retain_model, "ratios_retain_model", 1)
    return float(ks_2samp(a, b).pvalue)


_SCORER = None


def rouge_l_recall(generations, answers) -> np.ndarray:
    global _SCORER
    if len(generations) != len(answers):
        raise ValueError(f"{len(generations)} generations for {len(answers)} answers")
    if _SCORER is None:
        try:
            from rouge_score import rouge_scorer
        except ImportError as e:
            raise _missing("rouge-score") from e
        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return np.array([_SCORER.score(gt, gen)["rougeL"].recall
                     for gen, gt in zip(generations, answers)], dtype=np.float64)


def harmonic_mean(values) -> float:
    v = _arr(values, "values", 1)
    if np.any(v < 0):
        raise ValueError(f"harmonic mean of negative values {v.tolist()}")
    if np.any(v == 0):
        return 0.0
    return float(len(v) / np.sum(1.0 / v))


def min_k_score(token_logprobs, k: float = MIN_K) -> float:
    lp = np.asarray(token_logprobs, dtype=np.float64)
    if lp.size == 0:
        return 0.0
    n = max(1, int(len(lp) * k))
    return float(-np.mean(np.sort(lp)[:n]))


def auc(member_scores, nonmember_scores) -> float:
    """ROC AUC for telling non-members (label 1, higher score) from members (label 0):
    the Mann-Whitney statistic with average ranks for ties (equal to scikit-learn's
    ``roc_auc_score`` with those labels)."""
    try:
        from scipy.stats import rankdata
    except ImportError as e:
        raise _missing("scipy") from e
    m = _arr(member_scores, "member_scores", 1)
    n = _arr(nonmember_scores, "nonmember_scores", 1)
    ranks = rankdata(np.concatenate([m, n]))
    return float((ranks[len(m):].sum() - len(n) * (len(n) + 1) / 2) / (len(m) * len(n)))


def utility_parts(retain: dict, world: dict) -> dict:
    """The six numbers whose harmonic mean is model utility (see :func:`model_utility`)."""
    return {
        "retain_prob": probability(retain["answer_loss"]),
        "retain_rouge": float(np.mean(retain["rouge"])),
        "retain_tr": truth_ratio_retain(truth_ratios(retain["para_loss"], retain["pert_loss"])),
        "world_prob": normalised_probability(world["answer_loss"], world["pert_loss"]),
        "world_rouge": float(np.mean(world["rouge"])),
        "world_tr": truth_ratio_retain(truth_ratios(world["answer_loss"], world["pert_loss"])),
    }


def model_utility(parts: dict) -> float:
    return harmonic_mean(list(parts.values()))


def summarize(raw: dict, retain_model_raw: dict | None = None) -> dict:
    """All scalar metrics of one model from its raw per-example numbers (``evaluate.raw``).

    ``retain_model_raw`` is the gold retain model's raw numbers: forget quality and the MIA gap
    are relative to it (``None`` for the retain model itself gives FQ = 1 and gap 0).
    """
    f = raw["forget"]
    tr_f = truth_ratios(f["para_loss"], f["pert_loss"])
    ref = retain_model_raw if retain_model_raw is not None else raw
    tr_ref = truth_ratios(ref["forget"]["para_loss"], ref["forget"]["pert_loss"])
    parts = utility_parts(raw["retain"], raw["world"])
    out = {
        "forget_quality": forget_quality(tr_f, tr_ref),
        "model_utility": model_utility(parts),
        "forget_prob": probability(f["answer_loss"]),
        "forget_rouge": float(np.mean(f["rouge"])),
        "forget_tr": truth_ratio_forget(tr_f),
        **parts,
    }
    if "holdout" in raw:  # the membership attack (left out of cheap checkpoint evaluations)
        mia = auc([min_k_score(x) for x in f["token_logprobs"]],
                  [min_k_score(x) for x in raw["holdout"]["token_logprobs"]])
        mia_ref = auc([min_k_score(x) for x in ref["forget"]["token_logprobs"]],
                      [min_k_score(x) for x in ref["holdout"]["token_logprobs"]])
        out.update(mia_auc=mia, mia_gap=abs(mia - mia_ref))
    bad = [k for k, v in out.items() if not math.isfinite(v)]
    if bad:
        raise NonFiniteError(f"non-finite metrics {bad}")
    return out


def fluency_ppl(nll_count: tuple[float, int]) -> float:
    """Perplexity ``exp(summed NLL / tokens)`` on held-out general text (the mean NLL clipped at
    ``LOG_MAX`` nats)."""
    total, count = nll_count
    if count <= 0:
        raise ValueError("fluency text has no predicted tokens")
    return float(math.exp(min(total / count, LOG_MAX)))


def collateral(raw: dict, target_raw: dict | None = None, base_world: dict | None = None) -> dict:
    """What unlearning costs outside the forget request, from raw numbers (``evaluate.raw``):

    * neighbour facts (the forget authors' facts not in the request): probability and ROUGE-L,
      and the probability relative to the target model's (1 = nothing lost);
    * world knowledge relative to the base model: normalised probability and ROUGE-L ratios;
    * fluency: perplexity on held-out general text, and its ratio to the target's (1 = as fluent).

    A ratio is left out when its reference is not given (``None``) or its set is absent.
    """
    out: dict = {}
    if "neighbours" in raw:
        n = raw["neighbours"]
        out["neighbour_prob"] = probability(n["answer_loss"])
        out["neighbour_rouge"] = float(np.mean(n["rouge"]))
        if target_raw is not None:
            out["neighbour_prob_rel"] = out["neighbour_prob"] / probability(
                target_raw["neighbours"]["answer_loss"])
            out["neighbour_rouge_rel"] = _ratio(out["neighbour_rouge"],
                                                float(np.mean(target_raw["neighbours"]["rouge"])))
    if base_world is not None:
        w = raw["world"]
        out["world_prob_rel"] = (normalised_probability(w["answer_loss"], w["pert_loss"])
                                 / normalised_probability(base_world["answer_loss"], base_world["pert_loss"]))
        out["world_rouge_rel"] = _ratio(float(np.mean(w["rouge"])), float(np.mean(base_world["rouge"])))
    if "fluency" in raw:
        out["fluency_ppl"] = fluency_ppl(raw["fluency"])
        if target_raw is not None:
            out["fluency_rel"] = out["fluency_ppl"] / fluency_ppl(target_raw["fluency"])
    bad = [k for k, v in out.items() if not math.isfinite(v)]
    if bad:
        raise NonFiniteError(f"non-finite metrics {bad}")
    return out


def _ratio(a: float, b: float) -> float:
    """``a / b``, with 0/0 read as 1 (nothing to lose) and x/0 as ``a`` + 1."""
    if b == 0:
        return 1.0 if a == 0 else 1.0 + a
    return a / b

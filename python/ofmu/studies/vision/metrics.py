"""Unlearning metrics under the SalUn / Unlearn-Sparse protocol (docs/results.md, "Protocol").

UA = 100 - forget accuracy, RA = retain accuracy, TA = test accuracy, MIA-Efficacy = share of
forget examples that a membership classifier calls non-members, Avg. Gap = mean |method -
retrain| over those four. All percentages. The membership classifier is an RBF SVC (C=3,
gamma='auto') on the probability of the true label, trained with retain examples (as many as
the non-member set) as members and test examples as non-members.

``evaluate(..., on="val")`` is the tuning protocol: the validation split takes the test split's
place (TA becomes validation accuracy and validation images are the MIA non-members), so
hyperparameters are chosen without touching the test set.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np
import torch

METRICS = ("UA", "RA", "TA", "MIA")


@torch.no_grad()
def predict_proba(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Softmax probabilities, computed in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        out = [torch.softmax(model(x[i:i + batch_size]).float(), dim=1)
               for i in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def accuracy(model: torch.nn.Module, split) -> float:
    """Top-1 accuracy on ``split`` in percent."""
    if len(split) == 0:
        return float("nan")
    return 100.0 * (predict_proba(model, split.x).argmax(1) == split.y).float().mean().item()


def true_label_prob(model: torch.nn.Module, split) -> np.ndarray:
    p = predict_proba(model, split.x)
    # a diverged model (NaN logits) is scored as giving the true label no probability
    return np.nan_to_num(p.gather(1, split.y[:, None]).squeeze(1).double().numpy(), nan=0.0)


def mia_efficacy_from_scores(member: np.ndarray, nonmember: np.ndarray, target: np.ndarray,
                             seed: int = 0) -> float:
    """Share (%) of ``target`` scores that an RBF SVC trained on member (1) vs non-member (0)
    scores predicts as non-members. The members are subsampled to as many as the non-members."""
    from sklearn.svm import SVC

    member, nonmember = np.asarray(member, float), np.asarray(nonmember, float)
    n = min(len(member), len(nonmember))
    rng = np.random.default_rng(seed)
    member = member[rng.permutation(len(member))[:n]]
    nonmember = nonmember[rng.permutation(len(nonmember))[:n]]
    x = np.concatenate([member, nonmember])[:, None]
    y = np.concatenate([np.ones(n), np.zeros(n)])
    clf = SVC(C=3, kernel="rbf", gamma="auto").fit(x, y)
    pred = clf.predict(np.asarray(target, float)[:, None])
    return 100.0 * float(np.mean(pred == 0))


def mia_efficacy(model: torch.nn.Module, retain, nonmember, forget, seed: int = 0) -> float:
    """MIA-Efficacy (%) of ``model``: retain = members, ``nonmember`` (test) = non-members."""
    return mia_efficacy_from_scores(true_label_prob(model, retain),
                                    true_label_prob(model, nonmember),
                                    true_label_prob(model, forget), seed=seed)


def evaluate(model: torch.nn.Module, data, on: str = "test", seed: int = 0) -> dict[str, float]:
    """``{"UA", "RA", "TA", "MIA"}`` in percent on ``data`` (an :class:`UnlearningData`).

    ``on="test"`` is the reported protocol; ``on="val"`` swaps the validation split in for the
    test split (the tuning protocol; "TA" then holds validation accuracy).
    """
    if on not in ("test", "val"):
        raise ValueError(f"on must be 'test' or 'val', got {on!r}")
    held_out = data.test if on == "test" else data.val
    return {
        "UA": 100.0 - accuracy(model, data.forget),
        "RA": accuracy(model, data.retain),
        "TA": accuracy(model, held_out),
        "MIA": mia_efficacy(model, data.retain, held_out, data.forget, seed=seed),
    }


def avg_gap(result: dict[str, float], reference: dict[str, float],
            keys: tuple[str, ...] = METRICS) -> float:
    """Mean absolute difference to the reference (retrained) model over ``keys``."""
    return float(np.mean([abs(result[k] - reference[k]) for k in keys]))


@contextmanager
def wall_timer(out: dict, key: str = "time_s"):
    """``with wall_timer(d): ...`` stores the elapsed wall-clock seconds in ``d[key]``."""
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out[key] = time.perf_counter() - t0

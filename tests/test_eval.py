"""Metrics on hand-computed cases: accuracy/UA/RA/TA, MIA-Efficacy, Avg. Gap."""

import math

import numpy as np
import pytest
import torch
from ofmu.studies.vision import Split, accuracy, avg_gap, evaluate, mia_efficacy, mia_efficacy_from_scores


class Lookup(torch.nn.Module):
    """A 'model' whose logits for example i are row i of a table (x[:, 0] holds i)."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.as_tensor(table, dtype=torch.float32)

    def forward(self, x):
        return self.table[x[:, 0].long()]


def _split(ids, labels):
    return Split(torch.tensor(ids, dtype=torch.float32)[:, None], torch.tensor(labels))


def _confident(label, logit, n_classes=3):
    row = [0.0] * n_classes
    row[label] = logit
    return row


def test_accuracy_counts():
    # examples 0..3 predicted 0, 1, 2, 0; labels 0, 1, 1, 1 -> 2 of 4 correct
    model = Lookup([_confident(0, 5), _confident(1, 5), _confident(2, 5), _confident(0, 5)])
    assert accuracy(model, _split([0, 1, 2, 3], [0, 1, 1, 1])) == pytest.approx(50.0)
    assert math.isnan(accuracy(model, _split([], [])))


class _Data:
    def __init__(self, forget, retain, test, val=None):
        self.forget, self.retain, self.test, self.val = forget, retain, test, val or test


def _memorisation_case(memorised: bool, n=60, seed=0):
    """Retain (members) get true-label logit 8 (prob ~1); test (non-members) get logits 0..3
    spread (prob 1/3..0.9); forget gets member-like logits if memorised, else test-like."""
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    retain_ids = list(range(0, n))
    test_ids = list(range(n, 2 * n))
    forget_ids = list(range(2 * n, 3 * n))
    for _ in retain_ids:
        rows.append(_confident(0, 8.0 + rng.uniform(0, 1)))
        labels.append(0)
    for _ in test_ids:
        rows.append(_confident(0, rng.uniform(0, 3)))
        labels.append(0)
    for _ in forget_ids:
        rows.append(_confident(0, 8.0 + rng.uniform(0, 1) if memorised else rng.uniform(0, 3)))
        labels.append(0)
    model = Lookup(rows)
    lab = np.array(labels)
    return model, _Data(_split(forget_ids, lab[forget_ids]), _split(retain_ids, lab[retain_ids]),
                        _split(test_ids, lab[test_ids]))


def test_mia_memorised_vs_not():
    model, d = _memorisation_case(memorised=True)
    assert mia_efficacy(model, d.retain, d.test, d.forget) < 5.0  # forget looks like members
    model, d = _memorisation_case(memorised=False)
    assert mia_efficacy(model, d.retain, d.test, d.forget) > 90.0  # forget looks like test


def test_mia_from_scores_separable():
    member = np.full(50, 0.99)
    nonmember = np.linspace(0.2, 0.7, 50)
    target = np.array([0.99, 0.99, 0.3, 0.5])  # two member-like, two non-member-like
    assert mia_efficacy_from_scores(member, nonmember, target) == pytest.approx(50.0)


def test_mia_balances_members_to_nonmembers():
    # 1000 members but 20 non-members: the SVC sees 20 of each, so it does not just say "member"
    member = np.full(1000, 0.99)
    nonmember = np.linspace(0.1, 0.6, 20)
    assert mia_efficacy_from_scores(member, nonmember, np.array([0.3])) == 100.0


def test_evaluate_ua_ra_ta():
    # forget: 3 of 4 correct -> UA 25; retain: 2 of 2 -> RA 100; test: 1 of 4 -> TA 25
    rows = [_confident(0, 6)] * 3 + [_confident(1, 6)] + [_confident(0, 6)] * 2 + \
        [_confident(0, 6)] + [_confident(2, 6)] * 3
    labels = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    lab = np.array(labels)
    d = _Data(_split([0, 1, 2, 3], lab[:4]), _split([4, 5], lab[4:6]),
              _split([6, 7, 8, 9], lab[6:]))
    r = evaluate(Lookup(rows), d)
    assert (r["UA"], r["RA"], r["TA"]) == pytest.approx((25.0, 100.0, 25.0))
    assert 0.0 <= r["MIA"] <= 100.0
    with pytest.raises(ValueError, match="on must be"):
        evaluate(Lookup(rows), d, on="train")


def test_avg_gap_arithmetic():
    m = {"UA": 10.0, "RA": 90.0, "TA": 80.0, "MIA": 20.0}
    ref = {"UA": 12.0, "RA": 95.0, "TA": 80.0, "MIA": 10.0}
    assert avg_gap(m, ref) == pytest.approx((2 + 5 + 0 + 10) / 4)
    assert avg_gap(ref, ref) == 0.0
    assert avg_gap(m, ref, keys=("UA",)) == pytest.approx(2.0)


def test_diverged_model_is_scored_not_crashing():
    model, d = _memorisation_case(memorised=True, n=20)
    model.table[:] = float("nan")
    r = evaluate(model, d)
    assert 0.0 <= r["MIA"] <= 100.0

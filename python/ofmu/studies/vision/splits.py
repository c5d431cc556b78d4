"""Unlearning splits: train = forget + retain, plus a validation split for tuning and a test split.

The validation split is drawn from the training pool, disjoint from train and from test, so
hyperparameters are chosen without ever looking at the test set. In the class-wise scenario
validation and test keep only the retained classes (TA is "accuracy on what should still be
known"); the forgotten class's test images are kept aside in ``test_forgotten_class``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .images import load_digits, load_fashion_mnist

DATASETS = ("fashion-mnist", "digits")
SCENARIOS = ("random", "class")

# Default sizes: a moderate Fashion-MNIST subset that an MLP can memorise on a laptop CPU (so
# membership leaks: docs/results.md, "Protocol"), and all of digits.
DEFAULT_SIZES = {
    "fashion-mnist": {"n_train": 10_000, "n_val": 2_000, "n_test": 5_000},
    "digits": {"n_train": 1_167, "n_val": 270, "n_test": 360},
}


@dataclass
class Split:
    """Inputs ``x`` (float32, standardised rows), labels ``y`` (int64) and ``idx``, each row's
    index in its source array (the dataset's train or test file), for provenance checks."""

    x: Tensor
    y: Tensor
    idx: Tensor | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, idx) -> Split:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Split(self.x[idx], self.y[idx], None if self.idx is None else self.idx[idx])


@dataclass
class UnlearningData:
    """One unlearning problem. ``train`` is the training subset in a scenario-independent order
    (so the original model is shared by both scenarios of a seed); ``forget`` and ``retain`` are
    its disjoint parts, selected by ``forget_idx`` / ``retain_idx``."""

    dataset: str
    scenario: str
    seed: int
    train: Split
    forget_idx: Tensor
    retain_idx: Tensor
    val: Split
    test: Split  # in the class-wise scenario: retained classes only
    n_classes: int
    forget_class: int | None = None
    test_forgotten_class: Split | None = None
    info: dict = field(default_factory=dict)
    forget: Split = field(init=False, repr=False)
    retain: Split = field(init=False, repr=False)

    @property
    def n_features(self) -> int:
        return int(self.retain.x.shape[1])

    def __post_init__(self):
        self.forget = self.train.subset(self.forget_idx)
        self.retain = self.train.subset(self.retain_idx)

    def describe(self) -> str:
        what = (f"class {self.forget_class}" if self.scenario == "class"
                else f"random {len(self.forget) / len(self.train):.0%}")
        return (f"{self.dataset}: train {len(self.train)} (forget {len(self.forget)}, {what}; "
                f"retain {len(self.retain)}), val {len(self.val)}, test {len(self.test)}")


def _pool(dataset: str, seed: int, n_train: int, n_val: int, n_test: int):
    """Disjoint (train, val, test) numpy arrays for ``dataset``; the draw depends on ``seed``."""
    rng = np.random.default_rng(seed)
    if dataset == "fashion-mnist":
        x, y, xt, yt = load_fashion_mnist()
        if n_train + n_val > len(y) or n_test > len(yt):
            raise ValueError(f"fashion-mnist has {len(y)} train / {len(yt)} test images; asked "
                             f"for {n_train}+{n_val} / {n_test}")
        p = rng.permutation(len(y))
        tr, va = p[:n_train], p[n_train:n_train + n_val]
        te = rng.permutation(len(yt))[:n_test]
        return (x[tr], y[tr], tr), (x[va], y[va], va), (xt[te], yt[te], te)
    if dataset == "digits":
        x, y = load_digits()
        if n_train + n_val + n_test > len(y):
            raise ValueError(f"digits has {len(y)} images; asked for {n_train}+{n_val}+{n_test}")
        p = rng.permutation(len(y))
        tr, va = p[:n_train], p[n_train:n_train + n_val]
        te = p[n_train + n_val:n_train + n_val + n_test]
        return (x[tr], y[tr], tr), (x[va], y[va], va), (x[te], y[te], te)
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")


def make_unlearning_data(dataset: str = "digits", scenario: str = "random", seed: int = 0, *,
                         forget_frac: float = 0.1, forget_class: int | None = None,
                         n_train: int | None = None, n_val: int | None = None,
                         n_test: int | None = None) -> UnlearningData:
    """Build the forget/retain/val/test splits of one (dataset, scenario, seed).

    ``scenario="random"`` forgets a random ``forget_frac`` of the training subset;
    ``scenario="class"`` forgets every training image of ``forget_class`` (default: a class drawn
    from ``seed``). Inputs are standardised with the training subset's mean and std.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; expected one of {SCENARIOS}")
    if not 0.0 < forget_frac < 1.0:
        raise ValueError(f"forget_frac must be in (0, 1), got {forget_frac}")
    sizes = dict(DEFAULT_SIZES[dataset])
    for k, v in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if v is not None:
            sizes[k] = int(v)
    (xtr, ytr, itr), (xva, yva, iva), (xte, yte, ite) = _pool(dataset, seed, **sizes)
    mean, std = float(xtr.mean()), float(xtr.std()) + 1e-8

    def split(x, y, i) -> Split:
        return Split(torch.from_numpy((x - mean) / std).float(), torch.from_numpy(y).long(),
                     torch.from_numpy(np.asarray(i)).long())

    train, val, test = split(xtr, ytr, itr), split(xva, yva, iva), split(xte, yte, ite)
    n_classes = int(max(ytr.max(), yva.max(), yte.max())) + 1
    rng = np.random.default_rng([seed, 1])  # forget draw independent of the pool draw
    test_forgotten = None
    if scenario == "random":
        n_forget = max(1, round(forget_frac * len(train)))
        perm = rng.permutation(len(train))
        f_idx, r_idx = np.sort(perm[:n_forget]), np.sort(perm[n_forget:])
        forget_class = None
    else:
        if forget_class is None:
            forget_class = int(rng.integers(n_classes))
        if not 0 <= forget_class < n_classes:
            raise ValueError(f"forget_class must be in [0, {n_classes}), got {forget_class}")
        is_f = ytr == forget_class
        f_idx, r_idx = np.flatnonzero(is_f), np.flatnonzero(~is_f)
        test_forgotten = test.subset(np.flatnonzero(yte == forget_class))
        val = val.subset(np.flatnonzero(yva != forget_class))
        test = test.subset(np.flatnonzero(yte != forget_class))
    return UnlearningData(dataset=dataset, scenario=scenario, seed=seed,
                          train=train, forget_idx=torch.from_numpy(f_idx).long(),
                          retain_idx=torch.from_numpy(r_idx).long(), val=val,
                          test=test, n_classes=n_classes, forget_class=forget_class,
                          test_forgotten_class=test_forgotten,
                          info={"mean": mean, "std": std, **sizes})

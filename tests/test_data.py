"""Loaders and unlearning splits: idx parsing, the missing-data error, disjointness."""

import gzip
import struct

import numpy as np
import pytest
import torch
from ofmu.studies.vision import (
    DatasetMissingError,
    load_digits,
    load_fashion_mnist,
    make_unlearning_data,
    read_idx,
)
from ofmu.studies.vision.images import fashion_mnist_dir


def _write_idx(path, arr):
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim,
                                                                   *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_read_idx_roundtrip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), arr)


def test_read_idx_rejects_truncated(tmp_path):
    header = struct.pack(">HBB", 0, 0x08, 1) + struct.pack(">I", 10)
    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write(header + b"\x00" * 3)
    with pytest.raises(ValueError, match="holds 3 values"):
        read_idx(tmp_path / "bad.gz")


def test_missing_fashion_mnist_names_the_package(tmp_path):
    with pytest.raises(DatasetMissingError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def test_missing_fashion_mnist_via_env(tmp_path, monkeypatch):
    monkeypatch.setenv("OFMU_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        make_unlearning_data("fashion-mnist", "random", 0)


def test_fake_fashion_mnist_dir_loads(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("t10k", 5)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    x, y, xt, yt = load_fashion_mnist(tmp_path)
    assert x.shape == (12, 784) and xt.shape == (5, 784) and y.dtype == np.int64
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_digits_loader():
    x, y = load_digits()
    assert x.shape == (1797, 64) and x.dtype == np.float32 and set(np.unique(y)) == set(range(10))
    assert 0.0 <= x.min() and x.max() <= 1.0


def _disjoint(*idx):
    seen = set()
    for i in idx:
        s = set(i.tolist())
        assert len(s) == len(i), "duplicate indices inside a split"
        assert not (seen & s), "splits overlap"
        seen |= s


@pytest.mark.parametrize("scenario", ["random", "class"])
def test_digits_splits_disjoint(scenario):
    d = make_unlearning_data("digits", scenario, seed=3)
    _disjoint(d.forget.idx, d.retain.idx, d.val.idx, d.test.idx)  # one pool for digits
    assert len(d.forget) + len(d.retain) == len(d.train)
    _disjoint(d.forget_idx, d.retain_idx)
    assert torch.equal(torch.sort(torch.cat([d.forget_idx, d.retain_idx]))[0],
                       torch.arange(len(d.train)))
    if scenario == "random":
        assert len(d.forget) == round(0.1 * len(d.train))
        assert d.forget_class is None
    else:
        c = d.forget_class
        assert (d.forget.y == c).all() and not (d.retain.y == c).any()
        assert not (d.val.y == c).any() and not (d.test.y == c).any()
        assert (d.test_forgotten_class.y == c).all() and len(d.test_forgotten_class) > 0


def test_splits_deterministic_and_seed_dependent():
    a, b = make_unlearning_data("digits", "random", 1), make_unlearning_data("digits", "random", 1)
    c = make_unlearning_data("digits", "random", 2)
    assert torch.equal(a.forget.x, b.forget.x) and torch.equal(a.test.idx, b.test.idx)
    assert not torch.equal(a.forget.idx, c.forget.idx)


def test_original_train_order_is_scenario_independent():
    r, c = make_unlearning_data("digits", "random", 0), make_unlearning_data("digits", "class", 0)
    assert torch.equal(r.train.x, c.train.x)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown dataset"):
        make_unlearning_data("cifar", "random", 0)
    with pytest.raises(ValueError, match="unknown scenario"):
        make_unlearning_data("digits", "sample", 0)
    with pytest.raises(ValueError, match="forget_class"):
        make_unlearning_data("digits", "class", 0, forget_class=10)


@pytest.mark.skipif(not (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").is_file(),
                    reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_splits():
    d = make_unlearning_data("fashion-mnist", "random", 0)
    assert (len(d.train), len(d.val), len(d.test)) == (10_000, 2_000, 5_000)
    _disjoint(d.train.idx, d.val.idx)  # both drawn from the train file; test is the t10k file
    assert d.n_features == 784 and d.n_classes == 10
    assert abs(float(d.train.x.mean())) < 1e-3  # standardised with the train subset's stats

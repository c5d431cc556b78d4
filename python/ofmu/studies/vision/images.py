"""Offline image-classification data: Fashion-MNIST from the Debian package, digits from sklearn.

Nothing here downloads. Fashion-MNIST comes from the idx files that the Debian package
``dataset-fashion-mnist`` installs under ``/usr/share/datasets/fashion-mnist`` (override with
``OFMU_FASHION_MNIST_DIR``); scikit-learn's bundled ``load_digits`` is the always-available
fallback. Both loaders return float32 images flattened to rows in ``[0, 1]`` and int64 labels.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")


class DatasetMissingError(FileNotFoundError):
    """A dataset that ships as a system package is not installed."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one (optionally gzipped) idx file: big-endian dims, then raw uint8 data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not a uint8 idx file (magic {raw[:4].hex()})")
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {data.size} values")
    return data.reshape(dims)


def fashion_mnist_dir(root: str | os.PathLike | None = None) -> Path:
    if root is not None:
        return Path(root)
    return Path(os.environ.get("OFMU_FASHION_MNIST_DIR", FASHION_MNIST_DIR))


def load_fashion_mnist(root: str | os.PathLike | None = None):
    """``(x_train, y_train, x_test, y_test)``: 60k/10k images as float32 rows of 784 in [0, 1]."""
    d = fashion_mnist_dir(root)
    missing = [name for name in _FILES.values() if not (d / name).is_file()]
    if missing:
        raise DatasetMissingError(
            f"Fashion-MNIST not found in {d} (missing {', '.join(missing)}). It ships offline as "
            "a Debian package: `sudo apt-get install dataset-fashion-mnist` (or point "
            "OFMU_FASHION_MNIST_DIR at a folder holding the four idx .gz files). "
            "Use --dataset digits for the always-available scikit-learn data."
        )
    out = []
    for split in ("train", "test"):
        x = read_idx(d / _FILES[f"{split}_x"])
        y = read_idx(d / _FILES[f"{split}_y"])
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{d}: {split} images and labels differ in length")
        out += [x.reshape(x.shape[0], -1).astype(np.float32) / 255.0, y.astype(np.int64)]
    return tuple(out)


def load_digits():
    """``(x, y)``: scikit-learn's bundled 8x8 digits (1797 images), float32 rows of 64 in [0, 1]."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    return d.data.astype(np.float32) / 16.0, d.target.astype(np.int64)

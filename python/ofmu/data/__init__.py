"""Offline datasets and unlearning splits (nothing here downloads)."""

from .images import (
    FASHION_MNIST_CLASSES,
    DatasetMissingError,
    load_digits,
    load_fashion_mnist,
    read_idx,
)
from .splits import DATASETS, SCENARIOS, Split, UnlearningData, make_unlearning_data

__all__ = [
    "DATASETS",
    "FASHION_MNIST_CLASSES",
    "SCENARIOS",
    "DatasetMissingError",
    "Split",
    "UnlearningData",
    "load_digits",
    "load_fashion_mnist",
    "make_unlearning_data",
    "read_idx",
]

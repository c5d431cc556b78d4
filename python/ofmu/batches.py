"""Minibatch streams for a closure: ``next(stream)`` must never run dry during unlearning."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def cycle(loader: Iterable[T]) -> Iterator[T]:
    """Endless minibatches from ``loader`` (a ``DataLoader`` or any re-iterable): a new pass,
    with a new shuffle, each time the last one ends. Unlike ``itertools.cycle`` it stores
    nothing. An empty loader raises ``ValueError`` instead of looping forever."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("cycle(loader): the loader yielded no batch (is the forget or retain "
                             "set empty, or drop_last=True with fewer samples than batch_size?)")

"""Endless shuffled minibatches of an in-memory split, driven by an explicit generator."""

from __future__ import annotations

import torch


class BatchStream:
    """Cycles through random permutations of ``split``; each epoch is a fresh permutation.

    All randomness comes from ``generator``, so a run is reproducible for a fixed seed.
    A batch larger than the split is capped at the split's size.
    """

    def __init__(self, split, batch_size: int, generator: torch.Generator):
        if len(split) == 0:
            raise ValueError("cannot draw minibatches from an empty split")
        self.x, self.y = split.x, split.y
        self.n = len(split)
        self.batch_size = min(int(batch_size), self.n)
        self.g = generator
        self._perm = torch.randperm(self.n, generator=self.g)
        self._pos = 0

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.n // self.batch_size)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pos >= self.n:
            self._perm = torch.randperm(self.n, generator=self.g)
            self._pos = 0
        idx = self._perm[self._pos:self._pos + self.batch_size]
        self._pos += self.batch_size
        return self.x[idx], self.y[idx]

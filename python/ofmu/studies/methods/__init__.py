"""Unlearning methods under one protocol: ``run(method, model, data, hparams, seed)``.

Registered methods: FT, GA, GradDiff, NPO, Proj (first-order projection), GradDiff-Adam and
NPO-Adam, OFMU (project, SGD), OFMU-Adam (the chosen configuration) and its ablations OFMU-hvp,
OFMU-beta0 and OFMU-rho.
"""

from . import baselines, ofmu_runs  # noqa: F401  (register the methods)
from .base import REGISTRY, Method, Streams, get, run, steps_for
from .batches import BatchStream

__all__ = [
    "REGISTRY",
    "BatchStream",
    "Method",
    "Streams",
    "get",
    "run",
    "steps_for",
]

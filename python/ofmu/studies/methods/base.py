"""One interface for every unlearning method: ``run(method, model, data, hparams, seed)``.

A method is a function ``(model, data, hparams, streams, steps) -> None`` that unlearns
``model`` in place, plus the number of minibatch gradient evaluations one of its steps costs.
Every method gets the same *budget* of gradient evaluations (forward + backward of one
minibatch; a double backward counts as one more), so a method with an expensive step takes
fewer steps. Wall time is measured and reported as well.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .batches import BatchStream


@dataclass
class Streams:
    """Fresh forget / retain minibatches, each from its own seeded generator."""

    forget: BatchStream
    retain: BatchStream

    @classmethod
    def build(cls, data, batch_size: int, seed: int) -> Streams:
        return cls(BatchStream(data.forget, batch_size, torch.Generator().manual_seed(seed)),
                   BatchStream(data.retain, batch_size,
                               torch.Generator().manual_seed(seed + 1)))


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    fn: Callable  # (model, data, hparams, streams, steps) -> None
    cost: Callable[[dict], float]  # gradient evaluations per step
    grids: dict[str, tuple[dict, ...]]  # scenario -> configs tried on the validation split
    doc: str = ""
    defaults: dict = field(default_factory=dict)

    def grid(self, scenario: str) -> tuple[dict, ...]:
        return self.grids[scenario]


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in REGISTRY:
        raise ValueError(f"method {method.name!r} registered twice")
    REGISTRY[method.name] = method
    return method


def get(name: str) -> Method:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(REGISTRY)}") from None


def steps_for(method: Method, hparams: dict, budget: int) -> int:
    return max(1, int(budget / method.cost(hparams) + 1e-9))


def run(method: str | Method, model: nn.Module, data, hparams: dict | None = None,
        seed: int = 0, budget: int = 240, batch_size: int = 128) -> tuple[nn.Module, dict]:
    """Unlearn a *copy* of ``model`` with ``method``; returns ``(unlearned model, info)``.

    ``info`` holds ``steps``, ``budget`` (gradient evaluations) and ``time_s`` (wall clock of
    the unlearning loop alone) and ``cpu_time_s`` (this thread's CPU time over it: comparable
    across runs on a busy machine, where wall clock is not). For a fixed seed the result is
    bit-identical on one machine.
    """
    m = method if isinstance(method, Method) else get(method)
    hp = {**m.defaults, **(hparams or {})}
    steps = steps_for(m, hp, budget)
    model = copy.deepcopy(model)
    model.train()
    torch.manual_seed(seed)
    streams = Streams.build(data, batch_size, seed)
    t0, c0 = time.perf_counter(), time.thread_time()
    m.fn(model, data, hp, streams, steps)
    elapsed, cpu = time.perf_counter() - t0, time.thread_time() - c0
    model.eval()
    return model, {"method": m.name, "hparams": hp, "steps": steps, "budget": budget,
                   "time_s": elapsed, "cpu_time_s": cpu}

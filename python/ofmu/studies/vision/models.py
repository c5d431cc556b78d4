"""The model every method starts from: an MLP trained to memorise its training subset.

Membership only leaks when the original model overfits (~100% train accuracy: a membership attack
finds nothing in a model that does as well on unseen data as on its training set), so the recipe
trains to convergence with Adam and a cosine schedule. The retrained model, the gold standard, is
the same recipe on the retain set only. Both are cached per (dataset, scenario, seed, sizes,
recipe) so a second run is fast; the cache (:mod:`ofmu.studies.cache`) only loads with
``weights_only=True``, rebuilds an unreadable entry with a warning naming it, and writes atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..cache import CacheWarning, load_or_build, save_atomic
from ..methods.batches import BatchStream


@dataclass(frozen=True)
class Recipe:
    hidden: int = 512
    epochs: int = 40
    lr: float = 1e-3
    batch_size: int = 128
    weight_decay: float = 0.0


RECIPES = {
    "fashion-mnist": Recipe(hidden=512, epochs=40, lr=1e-3, batch_size=128),
    "digits": Recipe(hidden=256, epochs=60, lr=1e-3, batch_size=64),
}


def make_mlp(n_in: int, n_classes: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))


def train_model(split, n_classes: int, recipe: Recipe, seed: int) -> nn.Module:
    """Train a fresh MLP on ``split`` (deterministic for a given seed)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = make_mlp(split.x.shape[1], n_classes, recipe.hidden)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    stream = BatchStream(split, recipe.batch_size, g)
    steps = recipe.epochs * stream.batches_per_epoch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    model.train()
    for _ in range(steps):
        x, y = stream.next()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
    model.eval()
    return model


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    if path is not None:
        return Path(path)
    env = os.environ.get("OFMU_CACHE_DIR")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ofmu"
    return base / "models"


def _key(kind: str, data, recipe: Recipe) -> str:
    spec = {"kind": kind, "dataset": data.dataset, "seed": data.seed, "sizes": data.info,
            "recipe": asdict(recipe), "torch": torch.__version__.split("+")[0], "v": 1}
    if kind == "retrain":
        spec.update(scenario=data.scenario, forget_class=data.forget_class,
                    n_forget=len(data.forget))
    h = hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]
    scen = f"-{data.scenario}" if kind == "retrain" else ""
    return f"{data.dataset}{scen}-seed{data.seed}-{kind}-{h}.pt"


def _cached(kind: str, data, recipe: Recipe, split, cache: str | os.PathLike | None,
            use_cache: bool) -> tuple[nn.Module, float, bool]:
    """``(model, training seconds, loaded_from_cache)``; training time is recorded in the cache."""
    path = cache_dir(cache) / _key(kind, data, recipe)
    built = []

    def build() -> dict:
        t0 = time.perf_counter()
        seed = data.seed if kind == "original" else data.seed + 10_000
        model = train_model(split, data.n_classes, recipe, seed)
        built.append(model)
        return {"state_dict": model.state_dict(), "train_time_s": time.perf_counter() - t0}

    if not use_cache:
        blob = build()
        return built[0], float(blob["train_time_s"]), False
    # An unreadable entry (truncated, empty, garbage, unsafe pickle) warns with its path and is rebuilt.
    blob = load_or_build(path, build, what=f"{kind} model cache")
    if built:
        return built[0], float(blob["train_time_s"]), False
    model = make_mlp(data.n_features, data.n_classes, recipe.hidden)
    try:
        model.load_state_dict(blob["state_dict"])
        train_time = float(blob["train_time_s"])
    except (KeyError, TypeError, RuntimeError) as exc:  # readable but not one of our entries
        warnings.warn(f"{kind} model cache {path} does not hold this model ({type(exc).__name__}); "
                      "rebuilding it", CacheWarning, stacklevel=2)
        blob = build()
        save_atomic(blob, path)
        return built[0], float(blob["train_time_s"]), False
    model.eval()
    return model, train_time, True


def original_model(data, recipe: Recipe | None = None, cache=None, use_cache: bool = True):
    """The model trained on all of ``data.train``: ``(model, train seconds, from_cache)``."""
    recipe = recipe or RECIPES[data.dataset]
    return _cached("original", data, recipe, data.train, cache, use_cache)


def retrained_model(data, recipe: Recipe | None = None, cache=None, use_cache: bool = True):
    """The gold standard, trained on ``data.retain`` only: ``(model, train seconds, from_cache)``."""
    recipe = recipe or RECIPES[data.dataset]
    return _cached("retrain", data, recipe, data.retain, cache, use_cache)

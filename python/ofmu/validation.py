"""Argument validation, in one place: the constructor, ``add_param_group``, ``load_state_dict``
and every ``step`` (hyperparameters edited in ``param_groups`` after construction) call these.
Host-side Python values only: validating never synchronises with a device."""

from __future__ import annotations

import math
import operator
import threading

from . import backends
from .modes import OUTER_HVP, SIMILARITY

PRECONDITIONERS = ("sgd", "adam", "sign")
# Settings of the whole optimizer: they decide which backward passes run.
GLOBAL_KEYS = ("similarity", "outer_hvp", "inner_steps", "outer_steps", "preconditioner", "eps",
               "fd_delta", "backend", "process_group", "forget_loss_cap", "inner_preconditioner")
_GLOBAL_SET = frozenset(GLOBAL_KEYS)
# What validate_group reads and a step's hyperparameters are made of (functional.Hyper)
GROUP_KEYS = ("lr", "inner_lr", "lr0", "beta", "rho", "rho_k", "rho_growth", "rho_max",
              "weight_decay", "max_grad_norm", "betas", "adam_eps")
_MISSING = object()
_ABSENT = (_MISSING,) * len(GROUP_KEYS)
_BETAS = GROUP_KEYS.index("betas")
_GROUP_VALUES = operator.itemgetter(*GROUP_KEYS)


def same_objects(seen: tuple | None, now: tuple) -> bool:
    """Whether ``now`` holds the very objects of ``seen``, one by one (``is``): values validated
    before are then unchanged, and checking them again would give the same outcome. Identity,
    not ``==``: ``True == 1`` and ``-0.0 == 0.0`` would pass where a check or the math differ.
    For immutable values only (a list edited in place keeps its identity)."""
    return seen is not None and len(seen) == len(now) and all(map(operator.is_, seen, now))


def group_values(group: dict, similarity: str) -> tuple | None:
    """A param group's values that :func:`validate_group` checks (a missing key as a marker
    object), and the similarity mode its ``beta`` bound depends on: the key under which a
    validated group is remembered (:func:`same_objects`). None when ``betas`` is not a tuple (a
    list may be edited in place): such a group is validated every time."""
    try:
        values = _GROUP_VALUES(group)  # one C call
    except KeyError:
        values = tuple(map(group.get, GROUP_KEYS, _ABSENT))
    return None if type(values[_BETAS]) is not tuple else values + (similarity,)


def has_global_key(group: dict) -> bool:
    """Whether the group carries a per-optimizer setting (:data:`GLOBAL_KEYS`)."""
    return not _GLOBAL_SET.isdisjoint(group)


def check_number(name: str, value, where: str = "", positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}{where}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        need = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be finite and {need}, got {value}{where}")


def _check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {tuple(choices)}")


def _check_count(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def validate_options(similarity, outer_hvp, inner_steps, outer_steps, preconditioner, eps,
                     fd_delta, backend, forget_loss_cap, inner_preconditioner=None) -> None:
    """The per-optimizer settings (see :data:`GLOBAL_KEYS`)."""
    _check_choice("similarity mode", similarity, SIMILARITY)
    _check_choice("outer_hvp mode", outer_hvp, OUTER_HVP)
    _check_count("inner_steps", inner_steps, 0)
    _check_count("outer_steps", outer_steps, 1)
    _check_choice("preconditioner", preconditioner, PRECONDITIONERS)
    if inner_preconditioner is not None:
        _check_choice("inner_preconditioner", inner_preconditioner, PRECONDITIONERS)
    check_number("eps", eps, positive=True)
    check_number("fd_delta", fd_delta, positive=True)
    if not isinstance(backend, backends.Backend):  # a Backend object: used as given
        _check_choice("backend", backend, ("auto",) + backends.NAMES)
    if forget_loss_cap is not None:
        check_number("forget_loss_cap", forget_loss_cap, positive=True)


def validate_group(group: dict, gi: int, similarity: str) -> None:
    """A param group's hyperparameters (they may be edited between steps)."""
    where = f" (param group {gi})"
    for key in ("lr", "beta", "rho", "weight_decay"):
        check_number(key, group[key], where=where)
    if group["inner_lr"] is not None:
        check_number("inner_lr", group["inner_lr"], where=where)
    check_number("rho_growth", group["rho_growth"], where=where)
    if group["rho_growth"] < 1.0:
        raise ValueError(f"rho_growth must be >= 1, got {group['rho_growth']}{where}")
    check_number("rho_max", group["rho_max"], where=where)
    if group["max_grad_norm"] is not None:
        check_number("max_grad_norm", group["max_grad_norm"], where=where, positive=True)
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and
            all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0
                for b in betas)):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}{where}")
    check_number("adam_eps", group["adam_eps"], where=where, positive=True)
    beta_max = SIMILARITY[similarity].beta_max
    if beta_max is not None and group["beta"] > beta_max:
        raise ValueError(f"beta must be <= {beta_max:g} with similarity={similarity!r} (beta = 1 "
                         f"already removes the whole retain component), got {group['beta']}{where}")
    if "rho_k" in group:
        check_number("rho_k", group["rho_k"], where=where)


class StepGuard:
    """One step at a time per optimizer: ``step``, ``inner_step`` and ``outer_step`` take this
    guard (``acquire(entry)`` ... ``release()``), and a call that finds it held (another
    thread, or the closure calling ``step``) raises instead of interleaving two updates of the
    same flat buffers. Non-blocking: a host-side lock, no device work."""

    def __init__(self):
        self._lock = threading.Lock()
        self.release = self._lock.release

    def acquire(self, entry: str) -> None:
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(
                f"OFMU.{entry}() called while another step of this optimizer is running (from "
                "another thread, or from inside the closure); one optimizer takes one step at a "
                "time: serialise the calls, or give each thread its own model and optimizer")


def validate_distributed(outer_hvp: str, process_group) -> None:
    if process_group is not None and OUTER_HVP[outer_hvp].rank_local:
        raise ValueError(f"outer_hvp={outer_hvp!r} differentiates through each rank's own gradients "
                         "and cannot be averaged across ranks; use 'forget' or 'fd' with "
                         "torch.distributed (or process_group=None to run ranks apart)")

"""Flat buffers: one contiguous storage per (param group x device x dtype).

Parameters are re-viewed into one storage (``p.data`` points at a slice of it), so the step math
runs as one kernel launch over the whole buffer instead of one per tensor. Two gradient buffers
of the same layout hold the forget and the retain gradient; their slices are bound as ``p.grad``
before the matching backward pass, so autograd accumulates straight into them (no copy). Scratch
buffers of the same layout (allocated on first use) hold seeds, Hessian-vector products and
the outer direction.

Each slice starts on a 16-byte boundary and the total length is a multiple of 64 elements
(NOTE: alignment — vectorised kernels load 16 B at a time). Padding elements are zero in
every buffer and stay zero: they contribute nothing to dot products or norms, and every update
maps 0 to 0.
"""

from __future__ import annotations

import warnings
import weakref
from collections import defaultdict
from enum import Enum

import torch
from torch import Tensor

ALIGN_BYTES = 16
# Storages the flat buffers created (parameters of an earlier optimizer view them: building a
# new optimizer over those parameters is not sharing) ...
_FLAT_STORAGES: weakref.WeakSet = weakref.WeakSet()
# ... and storages parameters were moved out of, with the byte ranges they held and their names
# (a parameter of a later group that still views such a range shared memory with that one).
_VACATED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Slot(str, Enum):
    """The buffers of one layout. ``PARAM``, ``GRAD_F`` and ``GRAD_R`` always exist; the rest are
    scratch, allocated on first use."""

    PARAM = "param"
    GRAD_F = "f"  # forget gradient g_f (ascended)
    GRAD_R = "r"  # retain gradient g_r (descended)
    SEED_A = "seed_a"  # double-backward seeds of grad cos: a (through g_f) ...
    SEED_B = "seed_b"  # ... and b (through g_r)
    HVP = "h"  # a Hessian-vector product: grad cos (inner, hvp mode) or h (outer penalty)
    THETA_SAVED = "theta_saved"  # theta while the fd probes move it (restored bit for bit)
    OUTER_DIR = "outer_dir"  # g_r + 2 rho h, accumulated as the fd probes come in
    INNER_EXP_AVG = "inner_exp_avg"  # Adam moments, one pair per loop
    INNER_EXP_AVG_SQ = "inner_exp_avg_sq"
    OUTER_EXP_AVG = "outer_exp_avg"
    OUTER_EXP_AVG_SQ = "outer_exp_avg_sq"


MOMENTS = {"inner": (Slot.INNER_EXP_AVG, Slot.INNER_EXP_AVG_SQ),
           "outer": (Slot.OUTER_EXP_AVG, Slot.OUTER_EXP_AVG_SQ)}


def check_distinct(params: list[Tensor], names: list[str]) -> None:
    """Each parameter once: re-viewing one tensor twice would leave it in the second slot only
    (and the step would fail later with a misleading "storage replaced" error)."""
    seen: dict[int, str] = {}
    for p, n in zip(params, names):
        if id(p) in seen:
            raise ValueError(
                f"parameter {n} is the same tensor as {seen[id(p)]}: a parameter may appear once "
                "(tied weights listed twice, e.g. by named_parameters(remove_duplicate=False)); "
                "pass model.parameters(), which lists a tied weight once")
        seen[id(p)] = n


def check_frozen(frozen: list[tuple[Tensor, str]]) -> None:
    """Parameters left out at construction (``requires_grad=False``) must stay frozen: one
    unfrozen later has no slot in any flat buffer and would never be updated."""
    for p, n in frozen:
        if p.requires_grad:
            raise RuntimeError(
                f"parameter {n} was frozen (requires_grad=False) when the optimizer was built, so "
                "it has no place in the optimizer's flat buffer, and it now requires grad: it "
                "would never be updated. Unfreeze before building the optimizer (rebuild the "
                "optimizer after unfreezing), or freeze it again")


def _byte_range(p: Tensor) -> tuple[int, int]:
    """``[start, end)`` of the bytes ``p`` may touch, relative to its storage."""
    span = 1 + sum((n - 1) * st for n, st in zip(p.shape, p.stride()))
    start = p.storage_offset() * p.element_size()
    return start, start + span * p.element_size()


def check_sharing(params: list[Tensor], names: list[str]) -> None:
    """Re-viewing gives every parameter its own slot, so sharing set up before is refused (two
    parameters over the same memory, shared memory across processes) or warned about (other
    tensors over a parameter's storage: they would keep the old values). Host-side, once."""
    by_storage: dict[int, list[tuple[int, int, str]]] = defaultdict(list)
    storages = {}
    for p, n in zip(params, names):
        if p.device.type == "cpu" and p.is_shared():
            raise ValueError(
                f"parameter {n} is in shared memory (model.share_memory(), Hogwild): the optimizer "
                "re-views parameters into its own flat buffer, which would silently end the "
                "sharing with other processes. OFMU does not support Hogwild training; use one "
                "process, or torch.distributed (process_group) for data parallelism")
        if not p.numel():
            continue
        st = p.untyped_storage()
        start, end = _byte_range(p)
        for vs, ve, vn in _VACATED.get(st, ()):
            if start < ve and vs < end:
                raise ValueError(_shared_message(vn, n))
        by_storage[st._cdata].append((start, end, n))
        storages[st._cdata] = st
    for key, spans in by_storage.items():
        spans.sort()
        for (_, e1, n1), (s2, _, n2) in zip(spans, spans[1:]):
            if s2 < e1:
                raise ValueError(_shared_message(n1, n2))
        if storages[key] in _FLAT_STORAGES:
            continue  # an earlier optimizer's flat buffer: rebuilding one is fine
        others = torch._C._storage_Use_Count(key) - len(spans) - 1  # - 1: the storage object
        if others > 0:
            warnings.warn(
                f"parameter {spans[0][2]} shares its storage with other tensors outside this "
                "optimizer (a view you kept, such as w.data[0], w.detach() or a "
                "model.state_dict() entry, or the graph of a forward pass still alive): the "
                "optimizer re-views the parameter into its flat buffer, so those tensors keep the "
                "old values and no longer see updates. Build the optimizer before taking views "
                "(help(ofmu.OFMU): params are re-viewed into flat buffers)", stacklevel=4)


def _shared_message(a: str, b: str) -> str:
    return (f"parameters {a} and {b} share memory (one is a view of the other, e.g. "
            "Parameter(w.data[0]) next to w): the optimizer re-views every parameter into its "
            "own slot of a flat buffer, which would silently end the sharing. Make one of them a "
            "copy (Parameter(w.data[0].clone())), or use one Parameter object for both")


class FlatBuffer:
    """Parameters of one group, device and dtype, viewed into a single flat storage."""

    def __init__(self, params: list[Tensor], names: list[str]):
        if not params:
            raise ValueError("FlatBuffer needs at least one parameter")
        device, dtype = params[0].device, params[0].dtype
        for p, n in zip(params, names):
            if p.device != device:
                raise ValueError(
                    f"parameter {n} is on {p.device} but {names[0]} is on {device}: one flat "
                    "buffer holds one device (put them in separate param groups or move them)"
                )
            if p.dtype != dtype:
                raise ValueError(f"parameter {n} has dtype {p.dtype}, expected {dtype}")
        check_distinct(params, names)
        check_sharing(params, names)
        self.device, self.dtype = device, dtype
        self.params, self.names = list(params), list(names)
        align = max(1, ALIGN_BYTES // params[0].element_size())
        self.offsets, off = [], 0
        for p in params:
            self.offsets.append(off)
            off += -(-p.numel() // align) * align
        # The total is padded to a multiple of 64 elements: kernels specialise on a length
        # divisible by 16 (Triton emits 16-byte vector loads only then) and never need a tail.
        self.numel = -(-off // 64) * 64
        self.param = torch.zeros(self.numel, dtype=dtype, device=device)
        self.grad_f = torch.zeros_like(self.param)
        self.grad_r = torch.zeros_like(self.param)
        self._slots: dict[Slot, tuple[Tensor, list[Tensor]]] = {
            slot: (flat, self.views(flat)) for slot, flat in
            ((Slot.PARAM, self.param), (Slot.GRAD_F, self.grad_f), (Slot.GRAD_R, self.grad_r))}
        self.param_views = self._slots[Slot.PARAM][1]
        self._grads: dict[Slot, list[Tensor]] = {}  # what bind_grads binds, per slot
        with torch.no_grad():
            for p, n, v in zip(params, names, self.param_views):
                v.copy_(p)
                if p.numel():
                    old = p.untyped_storage()
                    _VACATED.setdefault(old, []).append((*_byte_range(p), n))
                p.data = v
        _FLAT_STORAGES.add(self.param.untyped_storage())
        # per parameter: byte offset into the flat storage (it may move as a whole:
        # share_memory_()), shape, strides and dtype of its view
        self._layout = [(v.data_ptr() - self.param.data_ptr(), v.shape, v.stride(), v.dtype)
                        for v in self.param_views]
        self._views_ok = [(*t, True) for t in self._layout]  # ... and each requires grad

    def views(self, flat: Tensor) -> list[Tensor]:
        """Per-parameter views (with the parameters' shapes) into a buffer of this layout."""
        return [flat[o : o + p.numel()].view(p.shape) for p, o in zip(self.params, self.offsets)]

    def buffer(self, slot: Slot | str) -> tuple[Tensor, list[Tensor]]:
        """A buffer of this layout and its per-parameter views (scratch allocated on first use)."""
        got = self._slots.get(slot)  # a Slot member: found directly (every call of a step)
        if got is not None:
            return got
        slot = Slot(slot)
        if slot not in self._slots:
            flat = torch.zeros_like(self.param)
            self._slots[slot] = (flat, self.views(flat))
        return self._slots[slot]

    def flat(self, slot: Slot | str | None) -> Tensor | None:
        """The flat buffer of ``slot`` (``None`` passes through: an absent kernel operand)."""
        got = self._slots.get(slot)  # a Slot member of an existing buffer: found directly
        if got is not None:
            return got[0]
        return None if slot is None else self.buffer(slot)[0]

    def bind_grads(self, slot: Slot | str, own_counters: bool = True) -> list[Tensor]:
        """Point every ``p.grad`` at its slice of buffer ``slot`` (autograd accumulates there);
        returns the bound tensors. ``own_counters``: each is the view's memory with a version
        counter of its own (``.data``; made once per slot), so that a backward pass that
        accumulates into one advances only that one; else the views themselves, which share
        the buffer's counter (each accumulation advances it by one). That is how the layout
        tells which parameters, or how many, a pass reached."""
        if not own_counters:
            views = self.buffer(slot)[1]
            for p, v in zip(self.params, views):
                p.grad = v
            return views
        grads = self._grads.get(slot)
        if grads is None:
            slot = Slot(slot)
            grads = self._grads.setdefault(slot, [v.data for v in self.buffer(slot)[1]])
        for p, g in zip(self.params, grads):
            p.grad = g
        return grads

    def check_requires_grad(self) -> None:
        """Every parameter still requires grad (host-side, each step; sharded buffers too)."""
        for p, n in zip(self.params, self.names):
            if not p.requires_grad:
                raise RuntimeError(
                    f"parameter {n} was switched to requires_grad=False after the optimizer was "
                    "built; the optimizer would still update it. Set requires_grad=True again, or "
                    "rebuild the optimizer after freezing (frozen parameters are left out at "
                    "construction)")

    def check_views(self) -> None:
        """:meth:`check_requires_grad` and :meth:`check_aliasing` in one pass over the parameters
        (each step: one list compared on the good path; those two name the culprit otherwise)."""
        base = self.param.data_ptr()
        if [(p.data_ptr() - base, p.shape, p.stride(), p.dtype, p.requires_grad)
                for p in self.params] == self._views_ok:
            return
        self.check_requires_grad()
        self.check_aliasing()

    def check_aliasing(self) -> None:
        """Cheap check that every parameter is still its view of the flat buffer: the same
        address (its storage was not replaced) and the same layout (``w.data = w.data.t()``
        keeps the address; the optimizer would update the wrong elements). One comparison of
        lists on the good path (about 1 us per parameter); the culprit named otherwise."""
        base = self.param.data_ptr()
        if [(p.data_ptr() - base, p.shape, p.stride(), p.dtype) for p in self.params] == \
                self._layout:
            return
        for p, (ptr, shape, stride, dtype), n in zip(self.params, self._layout, self.names):
            if p.data_ptr() != base + ptr:
                raise RuntimeError(
                    f"parameter {n} no longer lives in the optimizer's flat buffer (its storage was "
                    "replaced, e.g. by model.to(), load_state_dict(assign=True) or FSDP wrapping "
                    "after the optimizer was built). Build the optimizer after moving the model."
                )
            if (p.shape, p.stride(), p.dtype) != (shape, stride, dtype):
                raise RuntimeError(
                    f"parameter {n} still starts at its slot of the optimizer's flat buffer but "
                    f"with another layout (shape {tuple(p.shape)}, strides {p.stride()}, "
                    f"{p.dtype}; its slot: {tuple(shape)}, {stride}, {dtype}): it was re-viewed "
                    "after the optimizer was built (such as w.data = w.data.view(4, 8).t()), and "
                    "the optimizer would update the wrong elements. Restore the original view, "
                    "or build the optimizer after changing the model.")

    def copy_in(self, views: list[Tensor], tensors: list[Tensor | None]) -> None:
        """Copy a list of per-parameter tensors into views of a buffer (``None`` gives zeros)."""
        dst = [v for v, t in zip(views, tensors) if t is not None]
        src = [t.detach() for t in tensors if t is not None]
        for v, t in zip(views, tensors):
            if t is None:
                v.zero_()
        if dst:
            torch._foreach_copy_(dst, src)

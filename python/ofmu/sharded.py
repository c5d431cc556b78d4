"""FSDP2-sharded parameters (``torch.distributed.fsdp.fully_shard``): OFMU's flat buffer over
copies of this rank's shards, and the checks of what OFMU supports there. The step reaches it
through the :class:`ofmu.layouts.Sharded` layout.

FSDP2 turns every parameter into a ``DTensor`` sharded on one dimension over a 1-D device
mesh (HSDP: replicated over the first dimension of a 2-D mesh, sharded over the second), owns
its storage, and leaves after ``loss.backward()`` a sharded ``DTensor`` gradient
that is already reduce-scattered and averaged over the ranks. OFMU's kernels run on flat
buffers, and FSDP2's storage cannot be re-viewed into one. So a :class:`ShardedFlatBuffer`
keeps OFMU's own flat buffers over *copies* of this rank's local shards, and every kernel runs
unchanged on them:

* copy-in: after each backward pass the local gradient shards (``p.grad.to_local()``) are
  copied into ``GRAD_F`` / ``GRAD_R`` with one ``torch._foreach_copy_`` and ``p.grad`` is reset
  to ``None`` (FSDP2 would otherwise accumulate the next backward pass into it);
* copy-out: after each update of the flat parameter buffer the values are copied back into the
  local shards (one ``torch._foreach_copy_``), before the next forward pass reads them; and at
  the start of every inner and outer step the shards are copied in (what changed them outside
  OFMU, such as ``set_model_state_dict``, is seen);
* the global quantities (``<g_f, g_r>``, ``|g_f|^2``, ``|g_r|^2``, the norms of the directions)
  are sums of the per-shard ``reduce3`` statistics: one all-reduce (SUM) of ``3 x buffers``
  scalars per reduction over the mesh's process group; no whole-buffer averaging (FSDP2 already
  averaged the gradients).

Each rank thus holds ``1/world`` of every buffer (gradients, moments, scratch) plus one copy
of its parameter shard. Modes that differentiate *with respect to* the parameters
(``torch.autograd.grad``: ``similarity="hvp"``, ``outer_hvp="forget"|"exact"`` with rho > 0)
cannot run there: FSDP2 all-gathers into other tensors, so the sharded parameters are not in
the autograd graph. They are refused with a message naming the fix (``outer_hvp="fd"``). The
numbers behind this design are in ``docs/scaling.md``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .flat import FlatBuffer, Slot


def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch.distributed unavailable on this build
        return None
    return DTensor


def is_dtensor(p: Tensor) -> bool:
    cls = _dtensor_cls()
    return cls is not None and isinstance(p, cls)


def _local(t: Tensor) -> Tensor:
    """A DTensor's local tensor. ``DTensor._local_tensor`` is an attribute read; ``to_local()``
    (the public fallback) goes through DTensor's dispatch, about 50 us a call on a CPU, which
    made the copies 7% of a small model's step."""
    local = getattr(t, "_local_tensor", None)
    return local if isinstance(local, Tensor) else t.detach().to_local()


_FIX_MODE = ("Use outer_hvp='fd' (finite differences: closures at perturbed points, first "
             "order) with similarity='project' or 'none', or switch the penalty off (rho=0 or "
             "outer_hvp='none')")


def mode_error(what: str, name: str) -> ValueError:
    return ValueError(
        f"{what} differentiates with respect to the parameters (torch.autograd.grad), which is "
        f"not possible for FSDP2-sharded parameters such as {name}: fully_shard all-gathers "
        f"them into other tensors, so the sharded DTensors are not in the autograd graph. "
        f"{_FIX_MODE}.")


def check_modes(sim, hvp, rho: float, name: str) -> None:
    """Refuse the modes that need ``torch.autograd.grad`` with respect to sharded parameters."""
    if sim.second_order:
        raise mode_error(f"similarity={sim.name!r}", name)
    if hvp.double_backward(sim) and rho > 0:
        raise mode_error(f"outer_hvp={hvp.name!r} with rho > 0", name)


def check_placements(p: Tensor, name: str) -> None:
    """FSDP2's layouts only: ``(Shard(dim),)`` on a 1-D mesh, or HSDP's
    ``(Replicate(), Shard(dim))`` on a 2-D mesh (replicas of a sharded model)."""
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = p.device_mesh, tuple(p.placements)
    fsdp = mesh.ndim == 1 and len(placements) == 1 and isinstance(placements[0], Shard)
    hsdp = (mesh.ndim == 2 and len(placements) == 2 and isinstance(placements[0], Replicate)
            and isinstance(placements[1], Shard))
    if not (fsdp or hsdp):
        raise ValueError(
            f"parameter {name} is a DTensor with placements {placements} on a {mesh.ndim}-D "
            "device mesh; OFMU supports FSDP2's layouts only: fully_shard on a 1-D mesh (one "
            "Shard(dim) placement) or HSDP on a 2-D mesh ((Replicate(), Shard(dim))). Tensor "
            "parallelism and replicated or partial DTensors are not supported: shard the model "
            "with fully_shard(model), or pass plain (replicated) parameters and let OFMU average "
            "across ranks.")
    if hsdp:
        import torch.distributed as dist

        if mesh.size() != dist.get_world_size():
            raise ValueError(f"parameter {name} is sharded (HSDP) over {mesh.size()} of the "
                             f"{dist.get_world_size()} ranks; OFMU needs the mesh to span every "
                             "rank (the losses are averaged over the default group)")


class ShardedFlatBuffer(FlatBuffer):
    """OFMU's flat buffers over copies of this rank's shards of FSDP2 parameters.

    ``params`` are the DTensor parameters (``state[p]`` is keyed on them); every buffer, its
    views and the kernels see the local shards' shapes. ``bind_grads`` shows a buffer as the
    DTensor gradients (``p.grad`` over a view of it, as the flat path does)."""

    def __init__(self, params: list[Tensor], names: list[str]):
        shards = [_local(p) for p in params]
        self._shapes = [s.shape for s in shards]
        self.mesh, self.placements = params[0].device_mesh, tuple(params[0].placements)
        super().__init__([s.clone() for s in shards], names)  # our copies, re-viewed
        self.params = list(params)
        self._grad_views: dict[Slot, list[Tensor]] = {}
        self.bind_grads(Slot.GRAD_R)

    def views(self, flat: Tensor) -> list[Tensor]:
        return [flat[o : o + s.numel()].view(s) for s, o in zip(self._shapes, self.offsets)]

    def shards(self) -> list[Tensor]:
        """The local shards FSDP2 owns (views into its storage), looked up on every call: FSDP2
        re-points them at its lazy initialisation."""
        return [_local(p) for p in self.params]

    def dtensor(self, view: Tensor, pi: int) -> Tensor:
        """A local view of one of our buffers as a DTensor laid out like parameter ``pi``."""
        from torch.distributed.tensor import DTensor

        p = self.params[pi]
        return DTensor.from_local(view, self.mesh, self.placements, run_check=False,
                                  shape=p.shape, stride=p.stride())

    # ------------------------------------------------------------------ copy-in, copy-out

    def copy_out(self) -> None:
        """The flat parameter buffer into FSDP2's local shards (after an update)."""
        shards = self.shards()
        if shards:
            torch._foreach_copy_(shards, self.param_views)

    def refresh(self) -> None:
        """FSDP2's shards into the flat parameter buffer, at the start of every inner and outer
        step (one foreach copy of this rank's shard): whatever changed them outside OFMU
        (``set_model_state_dict``, a manual edit, another optimizer) is seen. Version counters
        cannot tell: loading writes through ``.data``, which has its own. Checks they are still
        the shards OFMU was built with."""
        shards = self.shards()
        for n, shape, s in zip(self.names, self._shapes, shards):
            if s.shape != shape:
                raise RuntimeError(f"parameter {n} is no longer the FSDP2 shard OFMU was built with "
                                   f"(local shape {tuple(s.shape)}, was {tuple(shape)}); build the "
                                   "optimizer after fully_shard and after any re-sharding")
        if shards:
            torch._foreach_copy_(self.param_views, shards)

    def release_grads(self) -> None:
        """``p.grad = None`` (before a backward pass: FSDP2 would accumulate into it)."""
        for p in self.params:
            p.grad = None

    def collect_grads(self, slot: Slot) -> int:
        """The local gradient shards FSDP2 left in ``p.grad`` into buffer ``slot`` (missing
        gradients give zeros); ``p.grad`` reset to None. Returns how many parameters had one."""
        grads = [None if p.grad is None else _local(p.grad) for p in self.params]
        self.copy_in(self.buffer(slot)[1], grads)
        self.release_grads()
        return sum(g is not None for g in grads)

    # ----------------------------------------------------------------- FlatBuffer interface

    def bind_grads(self, slot: Slot | str) -> list[Tensor]:
        """``p.grad`` = buffer ``slot`` as DTensors (made once per slot: ``DTensor.from_local``
        costs tens of microseconds a parameter, and every outer step rebinds ``GRAD_R``)."""
        slot = Slot(slot)
        if slot not in self._grad_views:
            self._grad_views[slot] = [self.dtensor(v, pi)
                                      for pi, v in enumerate(self.buffer(slot)[1])]
        for p, g in zip(self.params, self._grad_views[slot]):
            p.grad = g
        return self._grad_views[slot]

    def check_aliasing(self) -> None:
        self.refresh()

    def check_views(self) -> None:
        self.check_requires_grad()
        self.check_aliasing()

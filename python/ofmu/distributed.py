"""Replicated (DDP-style) data parallelism: every rank holds the whole model and OFMU averages
its flat gradient buffers across the process group, so all ranks take the single-process step
on the union of their minibatches (one all-reduce per flat buffer and per gradient).

Why OFMU averages itself: DDP's reducer synchronises only the first backward pass of a step,
and an OFMU step runs several (forget, retain, Hessian-vector products).

The step reaches this through :class:`ofmu.layouts.Replicated`. FSDP2-sharded parameters
(``fully_shard``) take the other layout, :class:`ofmu.layouts.Sharded`: FSDP2 averages the
gradients, each rank keeps its shard of every buffer, and only the reductions' scalars are
all-reduced. docs/scaling.md compares the two (bytes, memory).
"""

from __future__ import annotations

from torch import Tensor


def resolve_process_group(pg):
    """``"auto"``: the default group when ``torch.distributed`` runs with more than one rank."""
    if pg is None:
        return None
    import torch.distributed as dist

    if isinstance(pg, str):
        if pg != "auto":
            raise ValueError(f"process_group must be 'auto', None or a ProcessGroup, got {pg!r}")
        ready = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        return dist.group.WORLD if ready else None
    return pg


def average_(flats: list[Tensor], group) -> None:
    """Average each tensor in place over ``group`` (no-op for ``group=None``)."""
    if group is None:
        return
    import torch.distributed as dist

    inv = 1.0 / dist.get_world_size(group)
    for flat in flats:
        dist.all_reduce(flat, group=group)
        flat.mul_(inv)


def mean_losses(loss_f: Tensor | None, loss_r: Tensor, group) -> tuple[Tensor | None, Tensor]:
    """The two (detached) losses averaged over ``group``: one all-reduce of two scalars
    (identity for ``group=None``; a ``None`` forget loss, not computed, stays ``None``)."""
    if group is None:
        return loss_f, loss_r
    import torch
    import torch.distributed as dist

    if loss_f is None:
        r = loss_r.clone()
        dist.all_reduce(r, group=group)
        return None, r.mul_(1.0 / dist.get_world_size(group))

    packed = torch.stack([loss_f, loss_r.to(loss_f.dtype)])
    dist.all_reduce(packed, group=group)
    packed.mul_(1.0 / dist.get_world_size(group))
    return packed[0], packed[1].to(loss_r.dtype)

"""Where the parameters live across ranks: :class:`Replicated` or :class:`Sharded`, one object
per optimizer, chosen once from its parameters (:func:`choose`), with one interface.

The step (:mod:`ofmu.gradients`, :mod:`ofmu.functional`) calls the layout's methods and never
asks which layout it has:

* ``flat_buffer`` / ``state_view``: the flat buffer of one (group, device, dtype) and the
  per-parameter views ``state[p]`` shows (construction);
* ``begin`` / ``backward`` / ``missed``: backward passes into the flat gradient buffers and
  which parameters they reached;
* ``average``: gradients averaged across ranks (``averages``: whether there is anything to
  do); ``all_reduce``: the reductions' per-buffer
  statistics made global; ``loss_group``: the group the losses are averaged over;
* ``copy_out``: the updated flat parameters into the tensors the model reads;
* ``check_param_grads``: refuses what the layout cannot do (differentiate with respect to the
  parameters, for the modes that need a double backward).

A new layout (tensor parallelism, say) is one more class here and one more case in
:func:`choose`; its buffer type, if it needs one, goes in its own module as
:mod:`ofmu.sharded` does for FSDP2.
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

from .distributed import average_
from .flat import FlatBuffer, Slot
from .gradients import backward_into_leaves, fresh_seed
from .sharded import ShardedFlatBuffer, check_modes, check_placements, is_dtensor, mode_error


def choose(params: list[Tensor], names: list[str], process_group):
    """The layout of an optimizer whose first flat buffer holds ``params``: :class:`Sharded`
    for FSDP2's DTensors (after checking the first one's placements), :class:`Replicated`
    otherwise (averaged over ``process_group``; None: no averaging)."""
    dt = [is_dtensor(p) for p in params]
    if not any(dt):
        return Replicated(process_group)
    if not all(dt):
        raise _mixed(dt, names, [])
    check_placements(params[0], names[0])
    return Sharded(params[0].device_mesh)


class Replicated:
    """Every rank holds whole parameters, viewed into the flat buffers. ``.backward()``
    accumulates straight into the buffers (their slices are bound as ``p.grad``), and OFMU
    averages them over ``process_group`` itself (:mod:`ofmu.distributed`)."""

    also_replaced_by = ""  # for the error when no backward pass reaches the parameters

    def __init__(self, process_group):
        self.process_group = self.loss_group = process_group
        self.averages = process_group is not None  # whether ``average`` has anything to do
        # per backward pass since ``begin``: what tells which parameters it reached (see
        # ``missed``): True (all), its grads' version counters before and after, or the graph
        # of its loss (a pass counted per buffer that missed some)
        self._passes: list = []
        self._per_param = True  # how the next pass counts (see ``backward``)
        self._seed: Tensor | None = None  # the passes' ones (gradients.fresh_seed)

    def flat_buffer(self, params, names, earlier, sim, hvp, rho: float) -> FlatBuffer:
        """Plain parameters re-viewed into one flat buffer (``sim``, ``hvp``, ``rho``: every
        mode runs here)."""
        dt = [is_dtensor(p) for p in params]
        if any(dt):
            raise _mixed(dt, names, earlier)
        return FlatBuffer(params, names)

    def state_view(self, buf: FlatBuffer, slot: Slot, pi: int) -> Tensor:
        return buf.buffer(slot)[1][pi]

    def check_param_grads(self, why: str, buffers) -> None:
        """Every mode can differentiate with respect to plain parameters."""

    def begin(self, buffers) -> None:
        """Before an evaluation's backward passes: none has reached a parameter yet."""
        self._passes = []

    def backward(self, buffers, loss: Tensor, slot: Slot) -> int:
        """One backward pass straight into buffer ``slot``; how many parameters it reached.

        Reached = autograd accumulated into the parameter's ``p.grad``, a slice of the buffer,
        which the in-place accumulation advances the version counter of. Counted per
        parameter (each slice with a counter of its own: two integer reads per parameter)
        until a pass reaches every parameter; from then on per buffer (the slices share the
        buffer's counter, which each accumulation advances by one: two reads per pass, no
        per-parameter work) until a pass misses some, whose graph then tells which
        (:meth:`missed`), and the next passes count per parameter again. Either way no Python
        hook per parameter and pass (about 4 us each; the pass itself on a small model
        ~200 us)."""
        # zeroed right before the pass that fills it (both at once, before the first pass,
        # is one op less, but on a model beyond the cache the first buffer is evicted by the
        # time its pass writes it: measured 1-2% slower per step on a 1.9M-parameter MLP)
        for buf in buffers:
            buf.flat(slot).zero_()
        one = buffers[0] if len(buffers) == 1 else None
        inputs = one.params if one else [p for buf in buffers for p in buf.params]
        seed = self._seed = fresh_seed(self._seed, loss)
        if not self._per_param:
            flats = [buf.flat(slot) for buf in buffers]
            for buf in buffers:
                buf.bind_grads(slot, own_counters=False)
            before = sum(map(_VERSION, flats))
            backward_into_leaves(loss, inputs, seed)
            reached = sum(map(_VERSION, flats)) - before
            self._per_param = reached < len(inputs)
            self._passes.append(loss.grad_fn if self._per_param else True)
            return reached
        grads = one.bind_grads(slot) if one else [g for buf in buffers for g in buf.bind_grads(slot)]
        before = list(map(_VERSION, grads))
        backward_into_leaves(loss, inputs, seed)
        after = list(map(_VERSION, grads))
        self._passes.append((before, after))
        reached = len(grads) - sum(map(operator.eq, before, after))
        self._per_param = reached < len(grads)
        return reached

    def missed(self, params: list[Tensor]) -> list[bool]:
        """Per parameter: whether no backward pass since :meth:`begin` reached it."""
        out = [True] * len(params)
        for rec in self._passes:
            if rec is True:
                return [False] * len(params)
            if type(rec) is not tuple:  # a graph: its leaves were reached
                leaves = _graph_leaves(rec)
                out = [m and id(p) not in leaves for m, p in zip(out, params)]
                continue
            before, after = rec
            if before == after:
                continue  # reached none
            if all(map(operator.ne, before, after)):
                return [False] * len(params)  # reached all (the usual case: no list per pass)
            out = list(map(operator.and_, out, map(operator.eq, before, after)))
        return out

    def average(self, buffers, slot: Slot) -> None:
        """Buffer ``slot`` averaged over ``process_group`` (nothing to do without one)."""
        if self.process_group is not None:
            average_([buf.flat(slot) for buf in buffers], self.process_group)

    def all_reduce(self, stats: list[Tensor]) -> list[Tensor]:
        return stats  # every rank reduced whole (averaged) buffers

    def copy_out(self, buffers) -> None:
        """The parameters are views of the flat buffer: nothing to copy."""


class Sharded:
    """FSDP2: every parameter a DTensor sharded over ``mesh`` (:mod:`ofmu.sharded` holds the
    flat buffers over copies of this rank's shards). FSDP2 averages the gradients; the
    reductions' statistics are summed over the shards of one replica."""

    also_replaced_by = " or re-sharding"
    averages = False  # FSDP2's reduce-scatter averages the gradients

    def __init__(self, mesh):
        self.mesh = mesh
        # the shards of one replica: their reduce3 sums are the global ones (HSDP's replicas
        # hold the same shards and, after FSDP2's all-reduce, the same gradients)
        self.group = mesh.get_group(mesh.ndim - 1)
        # the ranks whose minibatches make one global batch: the losses are averaged over them
        self.loss_group = self.group if mesh.ndim == 1 else _world()

    def flat_buffer(self, params, names, earlier, sim, hvp, rho: float) -> ShardedFlatBuffer:
        """Checks the parameters (all sharded, FSDP2's placements, this layout's mesh) and the
        modes ``sim``/``hvp`` at the group's ``rho``, then the buffer over copies of the shards."""
        dt = [is_dtensor(p) for p in params]
        if not all(dt):
            raise _mixed(dt, names, earlier)
        for p, n in zip(params, names):
            check_placements(p, n)
        check_modes(sim, hvp, rho, names[0])
        if earlier and params[0].device_mesh != self.mesh:
            raise ValueError(f"parameter {names[0]} is sharded over {params[0].device_mesh} but "
                             f"{earlier[0].names[0]} over {self.mesh}; OFMU needs every parameter "
                             "on one device mesh")
        return ShardedFlatBuffer(params, names)

    def state_view(self, buf: ShardedFlatBuffer, slot: Slot, pi: int) -> Tensor:
        """A DTensor laid out like the parameter (what ``torch.distributed.checkpoint`` saves
        shard by shard)."""
        return buf.dtensor(buf.buffer(slot)[1][pi], pi)

    def check_param_grads(self, why: str, buffers) -> None:
        """The sharded parameters are not in the autograd graph: refuse ``why``'s mode."""
        raise mode_error(why, buffers[0].names[0])

    def begin(self, buffers) -> None:
        pass  # backward copies in (and counts) the gradients FSDP2 leaves

    def backward(self, buffers, loss: Tensor, slot: Slot) -> int:
        """``.backward()`` (FSDP2 reduce-scatters into ``p.grad``), then the local gradient
        shards copied into buffer ``slot``; how many parameters had one."""
        for buf in buffers:
            buf.release_grads()
        # FSDP2 all-gathers the sharded parameters into other tensors: they are not the graph's
        # leaves, so no ``inputs=``
        torch.autograd.backward(loss)
        return sum(buf.collect_grads(slot) for buf in buffers)

    def missed(self, params: list[Tensor]) -> list[bool]:
        return [False] * len(params)  # unused sharded parameters are not looked for

    def average(self, buffers, slot: Slot) -> None:
        pass  # FSDP2's reduce-scatter averaged the gradients

    def all_reduce(self, stats: list[Tensor]) -> list[Tensor]:
        """Per-buffer statistics summed over the shards: one all-reduce of them all."""
        import torch.distributed as dist

        packed = torch.stack(stats)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=self.group)
        return list(packed.unbind(0))

    def copy_out(self, buffers) -> None:
        """After an update of the flat parameter buffers: into FSDP2's local shards."""
        for buf in buffers:
            buf.copy_out()


Layout = Replicated | Sharded
_VERSION = operator.attrgetter("_version")


def _graph_leaves(root) -> set[int]:
    """``id`` of every tensor whose gradient a backward pass from ``root`` (a ``grad_fn``,
    after the pass: its edges outlive the freed saved tensors) accumulates."""
    leaves, seen, todo = set(), set(), [root]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)  # an AccumulateGrad node
        if var is not None:
            leaves.add(id(var))
        todo.extend(fn for fn, _ in node.next_functions)
    return leaves


def _mixed(dt: list[bool], names: list[str], earlier: list[FlatBuffer]) -> ValueError:
    """Plain and sharded parameters in one optimizer (``dt``: which of ``names`` are DTensors;
    ``earlier``: the buffers already built, all of the other kind where ``names`` has none)."""
    plain = names[dt.index(False)] if not all(dt) else earlier[0].names[0]
    sharded = names[dt.index(True)] if any(dt) else earlier[0].names[0]
    return ValueError(
        f"parameter {plain} is a plain tensor but {sharded} is an FSDP2-sharded DTensor; OFMU "
        "cannot mix replicated and sharded parameters. Apply fully_shard to the root module "
        "too (fully_shard(model) after the submodules), so that every parameter is sharded, "
        "or freeze/leave out the plain ones.")


def _world():
    import torch.distributed as dist

    return dist.group.WORLD


"""``OFMUTrainer``: OFMU inside the Hugging Face ``Trainer`` (logging, schedulers, checkpoints).

How it maps onto the Trainer's loop (transformers 5.x):

* One Trainer step is one :meth:`ofmu.OFMU.step`: ``inner_steps`` ascent steps and
  ``outer_steps`` descent steps, each on fresh forget and retain minibatches drawn inside the
  closure from two shuffled streams (``per_device_train_batch_size`` examples per process from
  each). The Trainer's own dataloader only counts steps; an epoch is
  ``ceil(len(forget_dataset) / (per_device_train_batch_size * world_size))`` steps.
* The step runs in :meth:`training_step`; the Trainer's ``optimizer.step()`` after it is a
  no-op, and its gradient clipping is replaced by OFMU's (``max_grad_norm`` clips each loop's
  direction).
* ``state_dict()`` of the optimizer carries OFMU's state (Adam moments, ``rho`` schedule) and
  the two streams' positions, so ``resume_from_checkpoint`` continues the same data order.
* With several processes the model is not wrapped in DDP: OFMU all-reduces its own flat
  gradient buffers after every backward pass (DDP's reducer would synchronise only the first
  of a step's backward passes, and its buckets would hold one more copy of every gradient).
* ``trainer.optimizer`` is accelerate's wrapper around the OFMU instance; it forwards what it
  does not define itself (``last_stats()``, ``backend_summary()``, ...) to that instance, which
  is also ``trainer.ofmu_optimizer``.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from accelerate.optimizer import AcceleratedOptimizer
from torch.utils.data import DataLoader
from transformers import Trainer

from ..optimizer import OFMU
from .losses import FORGET_LOSSES, RETAIN_LOSSES, causal_lm_losses, check_npo_beta

# Set from TrainingArguments; passing them in ``ofmu_kwargs`` as well would be ambiguous.
_FROM_ARGS = ("lr", "weight_decay", "max_grad_norm")
_DATA_STATE_KEY = "ofmu_hf_data"


class OFMUTrainer(Trainer):
    """A ``transformers.Trainer`` that unlearns with :class:`ofmu.OFMU`.

    Args:
        model, args: as for ``Trainer``. From ``args`` OFMU takes ``learning_rate`` (``lr``; an
            explicit ``inner_lr`` in ``ofmu_kwargs`` follows the schedule by the ratio
            ``lr / learning_rate``), ``weight_decay`` (not applied to biases and norms, as the
            Trainer does), ``max_grad_norm`` (0 turns clipping off), ``adam_beta1/2`` and
            ``adam_epsilon`` (with ``preconditioner="adam"``), ``lr_scheduler_type`` and
            warm-up, ``bf16`` (autocast), ``per_device_train_batch_size`` (the size of *each*
            forget and retain minibatch), ``seed`` / ``data_seed`` (the streams' order).
        forget_dataset, retain_dataset: map-style datasets (``len`` and integer indexing);
            each item is passed to the collator.
        forget_collator, retain_collator: turn a list of items into a batch (default: the
            Trainer's ``data_collator``).
        ofmu_kwargs: further :class:`ofmu.OFMU` arguments (``inner_steps``, ``beta``,
            ``rho``, ``outer_hvp``, ``preconditioner``, ...).
        compute_losses: ``(model, forget_batch, retain_batch) -> (forget_loss, retain_loss)``
            from two separate forward passes (default :func:`ofmu.hf.causal_lm_losses`).
        retain_loss: the built-in retain loss: ``"nll"`` (default; token-mean NLL of the retain
            batch) or ``"kl"`` (token-mean ``KL(p_ref || p_model)`` over the retain batch's
            labelled positions: it keeps the model's whole next-token distribution on the retain
            text close to the reference's, not only the labelled token's probability; see
            :func:`ofmu.hf.causal_lm_losses`). Only with the default ``compute_losses``.
        forget_loss: the built-in forget loss, which OFMU ascends: ``"nll"`` (default; token-mean
            NLL of the forget batch) or ``"npo"`` (NPO's forget loss negated, ``npo_beta`` its
            beta, against the reference model: the ascent weakens by itself once the forget
            answers are less likely than under the reference; see
            :func:`ofmu.hf.causal_lm_losses`). Its logged ``forget_loss`` is then negative,
            rising towards 0. Only with the default ``compute_losses``.
        reference_model: the frozen reference of ``retain_loss="kl"`` and ``forget_loss="npo"``
            (one model for both), evaluated under
            ``torch.no_grad()`` in eval mode, on the model's device. Default: the model as it is
            at construction. For a PEFT model that is the base with its adapters disabled (no
            copy; equal to the model at construction while the adapters are freshly initialised,
            as LoRA's are); otherwise a frozen deep copy, which costs one more copy of the
            weights in their dtype (plus one forward pass per retain evaluation, without
            activations kept). Build the trainer on the model *before* unlearning; a resumed
            run (``resume_from_checkpoint``) loads its weights after construction and so keeps
            the same reference.
        **kwargs: passed to ``Trainer`` (``eval_dataset``, ``callbacks``, ...);
            ``train_dataset`` and ``optimizers`` are not accepted (OFMU builds its own).

    Statistics: after (or during) ``train()``, ``trainer.optimizer.last_stats()`` and
    ``trainer.ofmu_optimizer.last_stats()`` give :meth:`ofmu.OFMU.last_stats` of the last step;
    ``trainer.ofmu_optimizer`` is the :class:`ofmu.OFMU` instance (``None`` until the Trainer
    creates the optimizer, at the start of ``train()`` or by ``create_optimizer()``).

    Logged at logging steps: ``loss`` (retain loss at the last outer step), ``forget_loss`` and
    ``retain_loss`` (at the first evaluation of each step, averaged since the last log), and
    ``ofmu_*`` from :meth:`ofmu.OFMU.last_stats` (the only host syncs OFMU adds).

    Not supported: DeepSpeed, FSDP and XLA (OFMU owns flat parameter buffers), fp16 autocast
    (it would need a loss scaler around OFMU's own backward passes; use bf16), gradient
    accumulation, and ``use_reentrant=True`` activation checkpointing (OFMU's backward passes
    name their inputs, which reentrant checkpointing refuses).
    """

    def __init__(self, model=None, args=None, *, forget_dataset, retain_dataset,
                 forget_collator: Callable | None = None, retain_collator: Callable | None = None,
                 ofmu_kwargs: Mapping[str, Any] | None = None,
                 compute_losses: Callable = causal_lm_losses, retain_loss: str = "nll",
                 reference_model: torch.nn.Module | None = None, forget_loss: str = "nll",
                 npo_beta: float = 0.1, **kwargs):
        for key in ("train_dataset", "optimizers", "optimizer_cls_and_kwargs"):
            if kwargs.get(key) not in (None, (None, None)):
                raise TypeError(f"OFMUTrainer does not take {key!r}: it trains on forget_dataset and "
                                "retain_dataset with the OFMU optimizer it builds itself")
            kwargs.pop(key, None)
        for name, ds in (("forget_dataset", forget_dataset), ("retain_dataset", retain_dataset)):
            if not (hasattr(ds, "__len__") and hasattr(ds, "__getitem__")):
                raise TypeError(f"{name} must be a map-style dataset (len() and integer indexing), "
                                f"got {type(ds).__name__}")
            if len(ds) == 0:
                raise ValueError(f"{name} is empty")
        self.ofmu_kwargs = dict(ofmu_kwargs or {})
        for key in _FROM_ARGS:
            if key in self.ofmu_kwargs:
                raise ValueError(f"ofmu_kwargs[{key!r}] is set from TrainingArguments "
                                 "(learning_rate, weight_decay, max_grad_norm); set it there")
        for key in ("params", "process_group"):
            if key in self.ofmu_kwargs:
                raise ValueError(f"ofmu_kwargs[{key!r}] is chosen by OFMUTrainer")
        _check_builtin_losses(retain_loss, forget_loss, npo_beta, reference_model, compute_losses, model)
        self.forget_dataset, self.retain_dataset = forget_dataset, retain_dataset
        self.compute_losses = compute_losses
        self.retain_loss, self.forget_loss, self.npo_beta = retain_loss, forget_loss, npo_beta
        # The built-in losses may skip the forget forward pass (need_forget=False); a custom
        # compute_losses always gets both batches.
        self._builtin_losses = compute_losses is causal_lm_losses
        super().__init__(model=model, args=args, **kwargs)
        self._check_setup()
        self.reference_model, self._own_reference = None, False
        if retain_loss == "kl" or forget_loss == "npo":
            self.reference_model, self._own_reference = _reference_for(self.model, reference_model)
            self.compute_losses = functools.partial(causal_lm_losses, retain=retain_loss,
                                                    forget=forget_loss, npo_beta=npo_beta,
                                                    reference=self.reference_model)
        self.forget_collator = forget_collator or self.data_collator
        self.retain_collator = retain_collator or self.data_collator
        world, rank = self.args.world_size, self.args.process_index
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        bs = self.args.per_device_train_batch_size
        self._streams = {
            "forget": _BatchStream(forget_dataset, bs, self.forget_collator, seed, 0, rank, world),
            "retain": _BatchStream(retain_dataset, bs, self.retain_collator, seed, 1, rank, world),
        }
        self._ofmu: _TrainerOFMU | None = None
        self._last_batches = None
        self._first_call = False
        self._loss_sums: torch.Tensor | None = None  # forget, retain, count since the last log
        self._prepare_without_ddp()

    # ------------------------------------------------------------------------------- setup

    def _check_setup(self) -> None:
        args = self.args
        dtype = str(self.accelerator.distributed_type)
        for bad in ("DEEPSPEED", "FSDP", "XLA", "MEGATRON"):
            if bad in dtype.upper():
                raise ValueError(f"OFMUTrainer does not support {dtype}: OFMU keeps the trainable "
                                 "parameters in its own flat buffers (use plain multi-process runs: "
                                 "torchrun or accelerate launch without DeepSpeed/FSDP)")
        if args.gradient_accumulation_steps != 1:
            raise ValueError("OFMUTrainer needs gradient_accumulation_steps=1: each OFMU step draws "
                             "its own minibatches (raise per_device_train_batch_size instead)")
        if args.fp16:
            raise ValueError("OFMUTrainer does not support fp16=True (autocast with a loss scaler): "
                             "use bf16=True, or load the model in torch.float16 without autocast")
        ckpt_kwargs = getattr(args, "activation_checkpointing_kwargs", None) or getattr(
            args, "gradient_checkpointing_kwargs", None) or {}
        if ckpt_kwargs.get("use_reentrant", False):
            raise ValueError("activation checkpointing with use_reentrant=True cannot compute "
                             "gradients with respect to named inputs, which OFMU's backward passes "
                             "need; use {'use_reentrant': False} (the transformers default)")

    @property
    def ofmu_optimizer(self) -> OFMU | None:
        """The :class:`ofmu.OFMU` instance that trains the model (``trainer.optimizer`` is
        accelerate's wrapper around it during ``train()``); ``None`` before it is created."""
        return self._ofmu

    def _prepare_without_ddp(self) -> None:
        """Make ``accelerator.prepare`` apply autocast/compile to the model without the DDP
        wrapper (OFMU averages its gradient buffers across processes itself), and without a
        ``model.to(device)`` that would copy parameters already there (on CPU, accelerate's
        multi-process device is ``cpu:0`` and ``.to("cpu:0")`` copies tensors on ``cpu``, which
        would move them out of OFMU's flat buffers)."""
        acc = self.accelerator
        prepare_model = acc.prepare_model

        def prepare_model_no_ddp(model, device_placement=None, evaluation_mode=False):
            if _on_device(model, acc.device):
                device_placement = False
            return prepare_model(model, device_placement=device_placement, evaluation_mode=True)

        acc.prepare_model = prepare_model_no_ddp
        # The optimizer wrapper forwards what it lacks (last_stats, ...) to OFMU.
        prepare_optimizer = acc.prepare_optimizer

        def prepare_optimizer_forwarding(optimizer, device_placement=None):
            wrapped = prepare_optimizer(optimizer, device_placement=device_placement)
            if type(wrapped) is AcceleratedOptimizer and isinstance(optimizer, OFMU):
                wrapped.__class__ = _ForwardingOptimizer
            return wrapped

        acc.prepare_optimizer = prepare_optimizer_forwarding

    def get_train_dataloader(self) -> DataLoader:
        """Step counter: the minibatches themselves are drawn inside OFMU's closure."""
        per_step = self.args.per_device_train_batch_size * self.args.world_size
        n = max(1, math.ceil(len(self.forget_dataset) / per_step))
        return DataLoader(_StepIndex(n), batch_size=1, shuffle=False, collate_fn=_only_item)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        args = self.args
        if self.accelerator.num_processes > 1:
            _broadcast_from_rank0(opt_model)
            if self._own_reference and isinstance(self.reference_model, torch.nn.Module):
                _broadcast_from_rank0(self.reference_model)
        named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no parameter with requires_grad=True")
        if args.weight_decay > 0:
            decay = set(self.get_decay_parameter_names(opt_model))
            groups = [{"params": [p for n, p in named if n in decay], "weight_decay": args.weight_decay},
                      {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
            groups = [g for g in groups if g["params"]]
        else:
            groups = [{"params": [p for _, p in named]}]
        kwargs = dict(betas=(args.adam_beta1, args.adam_beta2), adam_eps=args.adam_epsilon)
        kwargs.update(self.ofmu_kwargs)
        clip = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None
        self._ofmu = _TrainerOFMU(groups, streams=self._streams, lr=args.learning_rate,
                                  weight_decay=args.weight_decay, max_grad_norm=clip, **kwargs)
        self.optimizer = self._ofmu
        return self.optimizer

    # ---------------------------------------------------------------------------- the step

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """One OFMU step on fresh forget/retain minibatches; returns the outer retain loss."""
        model.train()
        self._first_call = True
        loss = self._ofmu.step(self._closure_for(model))
        self._last_batches = None
        return loss.detach().to(self.args.device)

    def _closure_for(self, model):
        # ``need_forget=False``: an optimizer that will not use the forget loss (an outer step
        # without the penalty) says so; the forget minibatch is still drawn, so the data order
        # does not depend on it, but its forward pass is skipped.
        def closure(same_batch: bool = False, need_forget: bool = True):
            if not same_batch or self._last_batches is None:
                self._last_batches = (self._to_device(self._streams["forget"].draw()),
                                      self._to_device(self._streams["retain"].draw()))
            fb, rb = self._last_batches
            if not need_forget and self._builtin_losses:
                fb = None
            loss_f, loss_r = self.compute_losses(model, fb, rb)
            if self._first_call and not same_batch and loss_f is not None:
                self._first_call = False
                row = torch.stack([loss_f.detach().float(), loss_r.detach().float(),
                                   torch.ones((), device=loss_f.device)])
                self._loss_sums = row if self._loss_sums is None else self._loss_sums + row
            return loss_f, loss_r
        return closure

    def _to_device(self, batch):
        device = self.args.device
        if isinstance(batch, Mapping):
            return type(batch)({k: self._to_device(v) for k, v in batch.items()})
        if isinstance(batch, (list, tuple)):
            return type(batch)(self._to_device(v) for v in batch)
        return batch.to(device) if isinstance(batch, torch.Tensor) else batch

    # The step already clipped (OFMU's max_grad_norm) and updated; the Trainer's own clipping
    # and gradient norm would only cost a pass over p.grad (the last retain gradient).
    def _clip_grad_norm(self, model):
        return None

    def _get_grad_norm(self, model, grad_norm=None):
        return None

    # ------------------------------------------------------------------------------ logging

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._ofmu is not None and self._loss_sums is not None:
            sums = self._loss_sums
            if self.accelerator.num_processes > 1:
                sums = self.accelerator.reduce(sums.clone(), reduction="sum")
            f, r, n = sums.tolist()
            logs["forget_loss"], logs["retain_loss"] = f / n, r / n
            self._loss_sums = None
            for key, value in self._ofmu.last_stats().items():
                if value == value:  # NaN marks what the last step did not compute
                    logs[f"ofmu_{key}"] = value
        super().log(logs, start_time)


def _check_builtin_losses(retain_loss, forget_loss, npo_beta, reference_model, compute_losses,
                          model) -> None:
    if retain_loss not in RETAIN_LOSSES:
        raise ValueError(f"retain_loss must be one of {RETAIN_LOSSES}; got {retain_loss!r}")
    if forget_loss not in FORGET_LOSSES:
        raise ValueError(f"forget_loss must be one of {FORGET_LOSSES}; got {forget_loss!r}")
    check_npo_beta(npo_beta)
    chosen = [f"{k}={v!r}" for k, v, special in (("retain_loss", retain_loss, "kl"),
                                                    ("forget_loss", forget_loss, "npo")) if v == special]
    if not chosen and reference_model is not None:
        raise ValueError('reference_model is used only with retain_loss="kl" or forget_loss="npo"; '
                         f"got retain_loss={retain_loss!r}, forget_loss={forget_loss!r}")
    if chosen and compute_losses is not causal_lm_losses:
        raise ValueError(f"{' and '.join(chosen)} select the built-in causal_lm_losses; a custom "
                         "compute_losses computes its own losses (leave retain_loss and forget_loss "
                         "at 'nll' and use the reference inside compute_losses)")
    if chosen and model is None:
        raise ValueError(f"{' and '.join(chosen)} need the model at construction (model=...), to take "
                         "the reference from; model_init is not supported with it")
    if reference_model is not None:
        if not callable(reference_model):
            raise TypeError("reference_model must be a model (callable); got "
                            f"{type(reference_model).__name__}")
        if reference_model is model:
            raise ValueError("reference_model is the model being trained: pass a frozen copy (or "
                             "leave it None for a copy made at construction)")


def _reference_for(model, given):
    """(reference, made_here): ``given``; else the PEFT base with adapters disabled; else a
    frozen deep copy of ``model``. A given or PEFT reference runs in eval mode for the call only
    (its modules may be shared with the model, whose mode the Trainer sets)."""
    if given is not None:
        if isinstance(given, torch.nn.Module):
            devices = {p.device for p in given.parameters()} | {p.device for p in model.parameters()}
            if len(devices) > 1:
                raise ValueError(f"reference_model and the model must be on one device; got "
                                 f"{sorted(str(d) for d in devices)}")
            return _EvalCall(given), False
        return given, False
    if hasattr(model, "disable_adapter") and hasattr(model, "peft_config"):
        return _EvalCall(model, disable_adapters=True), True
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref, True


class _EvalCall:
    """Calls ``module`` in eval mode (no dropout), optionally with its PEFT adapters disabled
    (the frozen base as the reference, without a copy of the weights), restoring its mode."""

    def __init__(self, module, disable_adapters: bool = False):
        self.module, self.disable_adapters = module, disable_adapters

    def __call__(self, *args, **kwargs):
        was_training = self.module.training
        self.module.eval()
        try:
            if self.disable_adapters:
                with self.module.disable_adapter():
                    return self.module(*args, **kwargs)
            return self.module(*args, **kwargs)
        finally:
            self.module.train(was_training)


class _ForwardingOptimizer(AcceleratedOptimizer):
    """accelerate's optimizer wrapper that forwards the attributes it lacks to the wrapped OFMU,
    so ``trainer.optimizer.last_stats()`` works as on the optimizer itself."""

    def __getattr__(self, name: str):
        inner = self.__dict__.get("optimizer")
        if inner is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(inner, name)


class _TrainerOFMU(OFMU):
    """OFMU as ``OFMUTrainer`` drives it: :meth:`OFMUTrainer.training_step` runs the step with its
    closure, so the Trainer's own ``optimizer.step()`` that follows is a no-op; the state dict
    also records how many minibatches each stream has drawn (the data order on resume)."""

    def __init__(self, params, *, streams: dict, **kwargs):
        self._streams = streams
        self._stepped = False
        super().__init__(params, **kwargs)

    def step(self, closure=None):
        if closure is None:
            if not self._stepped:
                raise ValueError("OFMU.step needs a closure returning (forget_loss, retain_loss)")
            self._stepped = False
            return None
        loss = super().step(closure)
        self._stepped = True
        return loss

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd[_DATA_STATE_KEY] = {name: s.count for name, s in self._streams.items()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        data = state_dict.pop(_DATA_STATE_KEY, None)
        super().load_state_dict(state_dict)
        if data is not None:
            for name, count in data.items():
                self._streams[name].count = int(count)


class _BatchStream:
    """Minibatch ``k`` of an endless, reshuffled-every-epoch stream over a dataset.

    Positions ``[k*B*W, (k+1)*B*W)`` of the concatenation of per-epoch permutations form global
    batch ``k`` (``B`` per process, ``W`` processes); each process collates its own ``B``. The
    permutation of epoch ``e`` depends only on ``(seed, stream, e)``, so the stream's state is
    the count of batches drawn."""

    def __init__(self, dataset, batch_size: int, collate: Callable, seed: int, stream: int,
                 rank: int, world: int):
        self.dataset, self.batch_size, self.collate = dataset, batch_size, collate
        self.seed, self.stream, self.rank, self.world = seed, stream, rank, world
        self.n = len(dataset)
        self.count = 0
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            seed = int(np.random.SeedSequence([self.seed, self.stream, epoch]).generate_state(1)[0])
            g = torch.Generator().manual_seed(seed)
            self._perms[epoch] = torch.randperm(self.n, generator=g).tolist()
        return self._perms[epoch]

    def indices(self, k: int) -> list[int]:
        start = k * self.batch_size * self.world + self.rank * self.batch_size
        return [self._perm(pos // self.n)[pos % self.n] for pos in range(start, start + self.batch_size)]

    def draw(self):
        idx = self.indices(self.count)
        self.count += 1
        return self.collate([self.dataset[i] for i in idx])


class _StepIndex(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, int]:
        return {"ofmu_step": i}


def _only_item(items: list):
    return items[0]


def _on_device(model: torch.nn.Module, device: torch.device) -> bool:
    return all(p.device.type == device.type and p.device.index in (None, device.index)
               for p in model.parameters())


@torch.no_grad()
def _broadcast_from_rank0(model: torch.nn.Module) -> None:
    """Start every process from rank 0's weights (what DDP would do when it wraps a model)."""
    import torch.distributed as dist

    seen = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            dist.broadcast(t.data, src=0)

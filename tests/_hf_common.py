"""Tiny randomly initialised causal LMs that memorise short random token sequences, shared by
the ``test_hf_*`` tests and the multi-process worker."""

from __future__ import annotations

import functools

import torch
import transformers

VOCAB, SEQ = 48, 10
N_FORGET, N_RETAIN = 8, 24


def config(arch: str, **overrides):
    common = dict(vocab_size=VOCAB, max_position_embeddings=32)
    if arch == "llama":
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       tie_word_embeddings=False, **common)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       tie_word_embeddings=True, **common)
    elif arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2,
                                      n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    else:
        raise ValueError(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def sequences(seed: int = 0):
    """(forget, retain) token ids, disjoint random sequences of length SEQ."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (N_FORGET + N_RETAIN, SEQ), generator=g)
    return ids[:N_FORGET], ids[N_FORGET:]


def records(ids: torch.Tensor) -> list[dict]:
    """One dataset item per sequence, as a tokenised HF dataset would hold it."""
    return [{"input_ids": row.clone(), "attention_mask": torch.ones_like(row),
             "labels": row.clone()} for row in ids]


@functools.cache
def _memorised_state(arch: str, steps: int = 120) -> dict:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config(arch))
    forget, retain = sequences()
    ids = torch.cat([forget, retain])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def memorised(arch: str, dtype: torch.dtype = torch.float32, **overrides):
    """A fresh model that has memorised ``sequences()`` (the training runs once per process)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config(arch, **overrides))
    model.load_state_dict(_memorised_state(arch))
    return model.to(dtype)


@torch.no_grad()
def nll(model, ids: torch.Tensor) -> float:
    """Token-mean next-token NLL (nats) of ``ids``, in float64 from the logits."""
    was = model.training
    model.eval()
    logits = model(input_ids=ids).logits.double()
    model.train(was)
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    return float(-logp.gather(-1, ids[:, 1:, None]).mean())


# OFMU's first-order recipe (no double backward), spelled out so the tests do not depend on
# the constructor's defaults.
FIRST_ORDER = dict(inner_lr=1e-3, inner_steps=1, outer_steps=2, beta=1.0, rho=0.0,
                   similarity="project", outer_hvp="none", preconditioner="adam")


def training_args(out_dir, **overrides):
    kw = dict(output_dir=str(out_dir), max_steps=30, learning_rate=1e-3,
              per_device_train_batch_size=4, logging_steps=10, save_strategy="no", report_to=[],
              use_cpu=True, lr_scheduler_type="constant", disable_tqdm=True, seed=0)
    kw.update(overrides)
    return transformers.TrainingArguments(**kw)


def trainer(model, out_dir, ofmu_kwargs=None, trainer_kwargs=None, **overrides):
    """An OFMUTrainer on ``sequences()``: ``overrides`` go to TrainingArguments,
    ``trainer_kwargs`` to OFMUTrainer."""
    from ofmu.hf import OFMUTrainer

    forget, retain = sequences()
    return OFMUTrainer(model, training_args(out_dir, **overrides), forget_dataset=records(forget),
                       retain_dataset=records(retain),
                       ofmu_kwargs=FIRST_ORDER if ofmu_kwargs is None else ofmu_kwargs,
                       **(trainer_kwargs or {}))


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])

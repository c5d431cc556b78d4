"""OFMUTrainer and OFMU on transformers models: exact checkpoint resume, PEFT LoRA, activation
checkpointing, bf16 models, tied embeddings."""

import math

import pytest

transformers = pytest.importorskip("transformers")
import torch  # noqa: E402
from _hf_common import FIRST_ORDER, flat_params, memorised, nll, sequences, trainer  # noqa: E402
from ofmu import OFMU  # noqa: E402
from ofmu.hf import causal_lm_losses  # noqa: E402

# Everything a resume has to restore: Adam moments of both loops, a growing rho (finite-difference
# HVP, so it runs on SDPA attention), a warm-up + linear schedule with an explicit inner_lr,
# weight decay (two param groups), clipping, and streams that wrap around their datasets.
RESUME_OFMU = dict(inner_lr=2e-3, inner_steps=1, outer_steps=1, beta=0.8, rho=0.01,
                   rho_growth=1.5, rho_max=1.0, similarity="project", outer_hvp="fd",
                   preconditioner="adam")
RESUME_ARGS = dict(max_steps=8, save_strategy="steps", save_steps=3, logging_steps=2,
                   lr_scheduler_type="linear", warmup_steps=2, weight_decay=0.01,
                   max_grad_norm=0.5, per_device_train_batch_size=3)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_checkpoint_resume_equals_an_uninterrupted_run_bit_for_bit(arch, tmp_path):
    whole = memorised(arch)
    tr = trainer(whole, tmp_path / "a", RESUME_OFMU, **RESUME_ARGS)
    tr.train()
    rho_whole = tr.optimizer.param_groups[0]["rho_k"]

    resumed = memorised(arch)
    tr2 = trainer(resumed, tmp_path / "a", RESUME_OFMU, **RESUME_ARGS)
    tr2.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert tr2.state.global_step == 8
    rho = 0.01
    for _ in range(8):  # one outer step per Trainer step
        rho = min(rho * 1.5, 1.0)
    assert rho_whole == tr2.optimizer.param_groups[0]["rho_k"] == rho
    # the interrupted run really moved the weights after step 3
    forget, _ = sequences()
    assert nll(resumed, forget) > nll(memorised(arch), forget) + 0.01
    assert torch.equal(flat_params(whole), flat_params(resumed))


def test_lora_moves_only_the_adapters(tmp_path):
    peft = pytest.importorskip("peft")
    base = memorised("llama")
    forget, retain = sequences()
    f0, r0 = nll(base, forget), nll(base, retain)
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                      target_modules=["q_proj", "v_proj", "o_proj",
                                                                      "up_proj", "down_proj"]))
    frozen = {n: (p.detach().clone(), p.data_ptr()) for n, p in model.named_parameters()
              if not p.requires_grad}
    lora = [p for p in model.parameters() if p.requires_grad]
    tr = trainer(model, tmp_path, dict(FIRST_ORDER, inner_lr=1e-2), learning_rate=1e-2,
                 max_steps=20)
    tr.train()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n][0]), n  # bit-identical
            assert p.data_ptr() == frozen[n][1], n  # never re-viewed into OFMU's buffers
    # OFMU's parameter storage holds the adapters only (plus alignment padding), not the base
    storages = {p.untyped_storage().data_ptr() for p in lora}
    assert len(storages) == 1
    adapter_bytes = sum(p.numel() * p.element_size() for p in lora)
    assert lora[0].untyped_storage().nbytes() < 2 * adapter_bytes + 4096
    assert 2 * adapter_bytes + 4096 < sum(t.numel() * t.element_size() for t, _ in frozen.values())
    with torch.no_grad():
        assert nll(model, forget) > f0 + 2.0
        assert nll(model, retain) < r0 + 0.2


def _steps(model, opt_kwargs, n=2):
    opt = OFMU(model.parameters(), lr=1e-3, **opt_kwargs)
    forget, retain = sequences()
    batches = []
    g = torch.Generator().manual_seed(5)
    last = {}

    def closure(same_batch=False):
        if not same_batch:
            last["fb"] = forget[torch.randint(0, len(forget), (4,), generator=g)]
            last["rb"] = retain[torch.randint(0, len(retain), (4,), generator=g)]
            batches.append(1)
        return causal_lm_losses(model, {"input_ids": last["fb"]}, {"input_ids": last["rb"]})

    for _ in range(n):
        opt.step(closure)
    return flat_params(model)


@pytest.mark.parametrize("mode", ["first-order", "fd"])
def test_activation_checkpointing_gives_the_same_step(mode):
    kw = FIRST_ORDER if mode == "first-order" else dict(FIRST_ORDER, rho=0.05, outer_hvp="fd")
    start = flat_params(memorised("llama"))
    plain = memorised("llama")
    plain.train()
    ckpt = memorised("llama")
    ckpt.activation_checkpointing_enable()
    ckpt.train()
    assert ckpt.is_activation_checkpointing
    a, b = _steps(plain, kw), _steps(ckpt, kw)
    moved = (a - start).norm()
    assert moved > 1e-3
    assert (a - b).norm() <= 1e-5 * moved


def test_trainer_activation_checkpointing_gives_the_same_run(tmp_path):
    start = flat_params(memorised("llama"))
    plain, ckpt = memorised("llama"), memorised("llama")
    trainer(plain, tmp_path / "a", max_steps=5).train()
    trainer(ckpt, tmp_path / "b", max_steps=5, activation_checkpointing=True).train()
    assert ckpt.is_activation_checkpointing
    moved = (flat_params(plain) - start).norm()
    assert moved > 1e-3
    assert (flat_params(plain) - flat_params(ckpt)).norm() <= 1e-5 * moved


def test_bf16_model_stays_bf16_and_unlearns(tmp_path):
    model = memorised("llama", dtype=torch.bfloat16)
    forget, retain = sequences()
    f0, r0 = nll(model, forget), nll(model, retain)
    trainer(model, tmp_path, dict(FIRST_ORDER, inner_lr=3e-3), learning_rate=3e-3).train()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert nll(model, forget) > f0 + 2.0
    assert nll(model, retain) < r0 + 0.5


def test_tied_embeddings_stay_tied(tmp_path):
    model = memorised("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    before = model.lm_head.weight.detach().clone()
    trainer(model, tmp_path, max_steps=5).train()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert not torch.equal(model.lm_head.weight, before)


def test_trainer_rejects_what_it_cannot_run(tmp_path):
    model = memorised("llama")
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1"):
        trainer(model, tmp_path, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="learning_rate"):
        trainer(model, tmp_path, dict(FIRST_ORDER, lr=0.1))
    with pytest.raises(TypeError, match="train_dataset"):
        from ofmu.hf import OFMUTrainer

        OFMUTrainer(model, None, forget_dataset=[1], retain_dataset=[1], train_dataset=[1])
    with pytest.raises(ValueError, match="forget_dataset is empty"):
        OFMUTrainer(model, None, forget_dataset=[], retain_dataset=[1])


def test_trainer_closure_streams_and_batch_reuse(tmp_path):
    model = memorised("llama")
    tr = trainer(model, tmp_path, per_device_train_batch_size=3)
    closure = tr._closure_for(model)
    lf, lr = closure()
    forget, retain = sequences()
    # the first minibatches are the first 3 entries of each stream's epoch-0 permutation
    fi, ri = tr._streams["forget"].indices(0), tr._streams["retain"].indices(0)
    ref_f, ref_r = causal_lm_losses(model, {"input_ids": forget[fi]}, {"input_ids": retain[ri]})
    assert lf.item() == ref_f.item() and lr.item() == ref_r.item()
    lf2, lr2 = closure(same_batch=True)  # outer_hvp="fd" probes: the same minibatches
    assert (lf2.item(), lr2.item()) == (lf.item(), lr.item())
    none_f, lr3 = closure(need_forget=False)  # fresh batches, forget forward skipped
    assert none_f is None and tr._streams["forget"].count == tr._streams["retain"].count == 2
    assert lr3.item() == causal_lm_losses(model, None, {"input_ids": retain[
        tr._streams["retain"].indices(1)]})[1].item()
    # every example appears once per pass: 8 forget examples, batches of 3, wrap into epoch 1
    stream = tr._streams["forget"]
    seen = [i for k in range(8) for i in stream.indices(k)]
    assert sorted(seen[:8]) == list(range(8)) and sorted(seen[8:16]) == list(range(8))


def _own_loop(model, reference, tr, steps: int, **loss_kw) -> torch.Tensor:
    """The documented own-loop closure with the built-in losses ``loss_kw`` selects (``retain``,
    ``forget``, ``npo_beta``) against ``reference``, on the minibatches the Trainer's
    streams draw (their order is tested above), with the optimizer settings the Trainer derives
    from its TrainingArguments (lr 1e-3 constant, clip 1.0, Adam betas/eps, no weight decay)."""
    forget, retain = sequences()
    fs, rs = tr._streams["forget"], tr._streams["retain"]
    drawn = [-1]

    def batch(ids):
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def closure(same_batch=False, need_forget=True):
        if not same_batch:
            drawn[0] += 1
        k = drawn[0]
        fb = batch(forget[fs.indices(k)]) if need_forget else None
        return causal_lm_losses(model, fb, batch(retain[rs.indices(k)]), reference=reference, **loss_kw)

    model.train()
    opt = OFMU(model.parameters(), lr=1e-3, betas=(0.9, 0.999), adam_eps=1e-8, weight_decay=0.0,
               max_grad_norm=1.0, **FIRST_ORDER)
    for _ in range(steps):
        opt.step(closure)
    return flat_params(model)


def test_trainer_kl_retain_loss_takes_the_own_loop_step(tmp_path):
    start = flat_params(memorised("llama"))
    model = memorised("llama")
    tr = trainer(model, tmp_path / "kl", max_steps=3, trainer_kwargs=dict(retain_loss="kl"))
    tr.train()
    # The reference is a frozen copy taken at construction: it has not moved.
    assert torch.equal(flat_params(tr.reference_model), start)
    assert not any(p.requires_grad for p in tr.reference_model.parameters())

    reference = memorised("llama").eval()
    own = _own_loop(memorised("llama"), reference, tr, steps=3, retain="kl")
    moved = (own - start).norm()
    assert moved > 1e-3
    assert (flat_params(model) - own).norm() <= 1e-6 * moved
    # A reference passed in gives the same run.
    given = memorised("llama")
    trainer(given, tmp_path / "given", max_steps=3,
            trainer_kwargs=dict(retain_loss="kl", reference_model=memorised("llama"))).train()
    assert (flat_params(given) - own).norm() <= 1e-6 * moved
    # ... and it is not the NLL run: the retain loss really changed.
    nll_model = memorised("llama")
    trainer(nll_model, tmp_path / "nll", max_steps=3).train()
    assert (flat_params(nll_model) - own).norm() > 1e-2 * moved


def test_trainer_npo_forget_loss_takes_the_own_loop_step(tmp_path):
    start = flat_params(memorised("llama"))
    model = memorised("llama")
    tr = trainer(model, tmp_path / "npo", max_steps=3, logging_steps=1,
                 trainer_kwargs=dict(forget_loss="npo", npo_beta=0.5))
    tr.train()
    assert torch.equal(flat_params(tr.reference_model), start)
    own = _own_loop(memorised("llama"), memorised("llama").eval(), tr, steps=3, forget="npo",
                    npo_beta=0.5)
    moved = (own - start).norm()
    assert moved > 1e-3
    assert (flat_params(model) - own).norm() <= 1e-6 * moved
    # The forget loss logged is NPO's, negated: -(2/beta) log 2 where the model is its reference
    # (the first step's first evaluation), then rising as the forget answers become less likely.
    logged = [h["forget_loss"] for h in tr.state.log_history if "forget_loss" in h]
    assert len(logged) == 3 and logged[0] == pytest.approx(-2 / 0.5 * math.log(2), rel=1e-4)
    assert logged[0] < logged[2] < 0
    # Both reference losses at once share one reference.
    both = memorised("llama")
    trainer(both, tmp_path / "both", max_steps=3,
            trainer_kwargs=dict(forget_loss="npo", npo_beta=0.5, retain_loss="kl")).train()
    own_both = _own_loop(memorised("llama"), memorised("llama").eval(), tr, steps=3, forget="npo",
                         npo_beta=0.5, retain="kl")
    assert (flat_params(both) - own_both).norm() <= 1e-6 * moved
    # ... and it is not the NLL-ascent run.
    nll_model = memorised("llama")
    trainer(nll_model, tmp_path / "nll", max_steps=3).train()
    assert (flat_params(nll_model) - own).norm() > 1e-2 * moved


def test_trainer_kl_reference_of_a_lora_model_is_the_base_without_a_copy(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(memorised("llama"), peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "up_proj"]))
    tr = trainer(model, tmp_path, dict(FIRST_ORDER, inner_lr=1e-2), learning_rate=1e-2, max_steps=4,
                 trainer_kwargs=dict(retain_loss="kl"))
    assert tr.reference_model.module is model  # no copy of the weights
    forget, retain = sequences()
    rb = {"input_ids": retain[:6], "labels": retain[:6]}
    model.eval()
    with torch.no_grad():  # no graph left holding views of the adapters
        _, kl0 = tr.compute_losses(model, None, rb)
    assert abs(kl0.item()) < 1e-6  # fresh adapters (B = 0): the model is its reference
    tr.train()
    assert model.training  # the reference call restored the mode it found
    base = memorised("llama").eval()
    with torch.no_grad():
        want = base(input_ids=retain).logits
        got = tr.reference_model(input_ids=retain).logits
    assert torch.equal(got, want)
    model.eval()
    with torch.no_grad():
        _, kl1 = tr.compute_losses(model, None, rb)
    assert kl1.item() > 1e-4  # the adapters moved the model away from the base


def test_trainer_retain_loss_options_are_checked_before_any_work(tmp_path):
    from ofmu.hf import OFMUTrainer

    model = memorised("llama")
    with pytest.raises(ValueError, match="retain_loss must be one of"):
        trainer(model, tmp_path, trainer_kwargs=dict(retain_loss="KL"))
    with pytest.raises(ValueError, match="reference_model is used only with"):
        trainer(model, tmp_path, trainer_kwargs=dict(reference_model=memorised("llama")))
    with pytest.raises(ValueError, match="reference_model is the model being trained"):
        trainer(model, tmp_path, trainer_kwargs=dict(retain_loss="kl", reference_model=model))
    with pytest.raises(TypeError, match="reference_model must be a model"):
        trainer(model, tmp_path, trainer_kwargs=dict(retain_loss="kl", reference_model="gpt2"))
    with pytest.raises(ValueError, match="the model at construction"):
        OFMUTrainer(None, None, forget_dataset=[1], retain_dataset=[1], retain_loss="kl")
    with pytest.raises(ValueError, match="forget_loss must be one of"):
        trainer(model, tmp_path, trainer_kwargs=dict(forget_loss="NPO"))
    for bad in (0.0, -1.0, float("nan"), float("inf"), True, "0.1"):
        with pytest.raises(ValueError, match="npo_beta must be"):
            trainer(model, tmp_path, trainer_kwargs=dict(forget_loss="npo", npo_beta=bad))
    with pytest.raises(ValueError, match="the model at construction"):
        OFMUTrainer(None, None, forget_dataset=[1], retain_dataset=[1], forget_loss="npo")
    with pytest.raises(ValueError, match="forget_loss='npo' select the built-in"):
        OFMUTrainer(model, None, forget_dataset=[1], retain_dataset=[1], forget_loss="npo",
                    compute_losses=lambda m, f, r: (f, r))
    with pytest.raises(ValueError, match="custom compute_losses"):
        OFMUTrainer(model, None, forget_dataset=[1], retain_dataset=[1], retain_loss="kl",
                    compute_losses=lambda m, f, r: (f, r))
    assert torch.equal(flat_params(model), flat_params(memorised("llama")))


def test_optimizer_statistics_are_reachable_after_train(tmp_path):
    tr = trainer(memorised("llama"), tmp_path, max_steps=4, logging_steps=4)
    assert tr.ofmu_optimizer is None
    tr.train()
    # what users type first: the Trainer's optimizer is accelerate's wrapper around OFMU
    stats = tr.optimizer.last_stats()
    assert isinstance(tr.ofmu_optimizer, OFMU) and tr.optimizer.optimizer is tr.ofmu_optimizer
    assert stats.keys() == tr.ofmu_optimizer.last_stats().keys()
    logged = [h for h in tr.state.log_history if "ofmu_retain_grad_norm" in h][-1]
    assert stats["retain_grad_norm"] == pytest.approx(logged["ofmu_retain_grad_norm"], rel=1e-6)
    assert stats["retain_grad_norm"] > 0 and stats["rho"] == 0.0 and stats["skipped_steps"] == 0
    assert tr.optimizer.inner_steps == FIRST_ORDER["inner_steps"]
    with pytest.raises(AttributeError, match="no_such_setting"):
        tr.optimizer.no_such_setting  # noqa: B018

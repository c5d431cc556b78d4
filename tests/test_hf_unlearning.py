"""ofmu.hf on tiny transformers models: the loss helper against float64 references, and OFMU
(public API and OFMUTrainer) unlearning memorised sequences while keeping the rest."""

import os
import subprocess
import sys

import pytest

transformers = pytest.importorskip("transformers")
import torch  # noqa: E402
from _hf_common import FIRST_ORDER, flat_params, memorised, nll, sequences, trainer  # noqa: E402
from ofmu import OFMU  # noqa: E402
from ofmu.hf import causal_lm_losses, token_nll  # noqa: E402


def reference_nll(logits, labels):
    """Token-mean NLL by explicit loops in float64 (position t predicts label t+1)."""
    total, count = 0.0, 0
    lp = torch.log_softmax(logits.detach().double(), dim=-1)
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y != -100:
                total -= float(lp[b, t, y])
                count += 1
    return total / count


def test_token_nll_masks_ignored_labels():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, 2:5] = -100
    labels[2, -1] = -100
    assert token_nll(logits, labels).item() == pytest.approx(reference_nll(logits, labels), rel=1e-6)


def test_causal_lm_losses_match_the_model_and_mask_padding():
    model = memorised("llama")
    forget, retain = sequences()
    mask = torch.ones_like(retain)
    mask[:, -3:] = 0  # right padding: those labels must not count
    lf, lr = causal_lm_losses(model, {"input_ids": forget},
                              {"input_ids": retain, "attention_mask": mask})
    assert lf.item() == pytest.approx(model(input_ids=forget, labels=forget).loss.item(), rel=1e-5)
    labels = retain.clone()
    labels[mask == 0] = -100
    logits = model(input_ids=retain, attention_mask=mask).logits
    assert lr.item() == pytest.approx(reference_nll(logits, labels), rel=1e-5)
    none_f, lr2 = causal_lm_losses(model, None, {"input_ids": retain, "attention_mask": mask})
    assert none_f is None and lr2.item() == lr.item()
    with pytest.raises(KeyError, match="input_ids"):
        causal_lm_losses(model, {"x": forget}, {"input_ids": retain})


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_public_api_forgets_and_keeps_the_retain_set(arch):
    model = memorised(arch)
    forget, retain = sequences()
    f0, r0 = nll(model, forget), nll(model, retain)
    assert f0 < 0.2 and r0 < 0.2  # memorised
    opt = OFMU(model.parameters(), lr=1e-3, **FIRST_ORDER)
    g = torch.Generator().manual_seed(1)

    def closure():
        fb = forget[torch.randint(0, len(forget), (4,), generator=g)]
        rb = retain[torch.randint(0, len(retain), (8,), generator=g)]
        return causal_lm_losses(model, {"input_ids": fb}, {"input_ids": rb})

    for _ in range(30):
        opt.step(closure)
    assert nll(model, forget) > f0 + 4.0
    assert nll(model, retain) < r0 + 0.1


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_trainer_forgets_and_keeps_the_retain_set(arch, tmp_path):
    model = memorised(arch)
    forget, retain = sequences()
    f0, r0 = nll(model, forget), nll(model, retain)
    tr = trainer(model, tmp_path)
    tr.train()
    assert nll(model, forget) > f0 + 4.0
    assert nll(model, retain) < r0 + 0.1
    logs = [h for h in tr.state.log_history if "forget_loss" in h]
    assert len(logs) == 3  # logging_steps=10 over 30 steps: stats only at logging steps
    assert logs[0]["forget_loss"] < logs[-1]["forget_loss"]
    assert "ofmu_retain_grad_norm" in logs[-1] and logs[-1]["ofmu_skipped_steps"] == 0


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_constructor_defaults_step_on_sdpa_models(arch):
    model = memorised(arch)
    assert model.config._attn_implementation == "sdpa"
    forget, retain = sequences()
    f0 = nll(model, forget)
    before = flat_params(model)
    opt = OFMU(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(2)

    def closure():
        fb = forget[torch.randint(0, len(forget), (4,), generator=g)]
        rb = retain[torch.randint(0, len(retain), (4,), generator=g)]
        return causal_lm_losses(model, {"input_ids": fb}, {"input_ids": rb})

    for _ in range(3):
        opt.step(closure)
    after = flat_params(model)
    assert torch.isfinite(after).all() and (after - before).norm() > 0
    assert nll(model, forget) > f0


@pytest.mark.parametrize("missing", ["transformers", "accelerate"])
def test_core_package_imports_without_the_hf_extra(missing):
    code = (f"import sys; sys.modules[{missing!r}] = None\n"
            "import ofmu\n"
            "try:\n    import ofmu.hf\nexcept ImportError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr
    assert 'pip install "ofmu[hf]"' in out.stdout

"""ofmu.hf.causal_lm_losses' KL-to-reference retain loss against float64 hand computations."""

import pytest

transformers = pytest.importorskip("transformers")
import torch  # noqa: E402
from _hf_common import memorised, sequences  # noqa: E402
from ofmu.hf import causal_lm_losses  # noqa: E402
from ofmu.hf.losses import token_kl  # noqa: E402


def reference_kl(logits, ref_logits, labels):
    """Token-mean KL(p_ref || p_model) by explicit loops in float64 (position t counts when label
    t+1 is labelled)."""
    lp = torch.log_softmax(logits.detach().double(), dim=-1)
    lq = torch.log_softmax(ref_logits.detach().double(), dim=-1)
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if int(labels[b, t + 1]) == -100:
                continue
            total += sum(float(lq[b, t, v].exp() * (lq[b, t, v] - lp[b, t, v]))
                         for v in range(logits.shape[-1]))
            count += 1
    return total / count


def test_token_kl_matches_a_float64_loop_and_masks_ignored_labels():
    g = torch.Generator().manual_seed(5)
    logits, ref = torch.randn(3, 6, 9, generator=g), 2 * torch.randn(3, 6, 9, generator=g)
    labels = torch.randint(0, 9, (3, 6), generator=g)
    labels[1, 1:4] = -100
    labels[2, -1] = -100
    assert token_kl(logits, ref, labels).item() == pytest.approx(reference_kl(logits, ref, labels), rel=1e-5)
    assert token_kl(ref, ref, labels).item() == pytest.approx(0.0, abs=1e-6)


def _perturbed(model, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def test_kl_retain_loss_against_the_reference_model():
    model, reference = _perturbed(memorised("llama")), memorised("llama").eval()
    forget, retain = sequences()
    mask = torch.ones_like(retain)
    mask[:, -3:] = 0  # padding: not labelled, must not count
    lf, lr = causal_lm_losses(model, {"input_ids": forget}, {"input_ids": retain, "attention_mask": mask},
                              retain="kl", reference=reference)
    assert lf.item() == pytest.approx(model(input_ids=forget, labels=forget).loss.item(), rel=1e-5)
    labels = retain.clone()
    labels[mask == 0] = -100
    want = reference_kl(model(input_ids=retain, attention_mask=mask).logits,
                        reference(input_ids=retain, attention_mask=mask).logits, labels)
    assert want > 1e-3 and lr.item() == pytest.approx(want, rel=1e-4)
    lr.backward()
    assert all(p.grad is None for p in reference.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    _, self_kl = causal_lm_losses(reference, None, {"input_ids": retain}, retain="kl", reference=reference)
    assert self_kl.item() == pytest.approx(0.0, abs=1e-6)


def test_bad_retain_options_are_refused_before_any_forward_pass():
    model = memorised("llama")
    forget, retain = sequences()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="reference"):
        causal_lm_losses(model, {"input_ids": forget}, {"input_ids": retain}, retain="kl")
    with pytest.raises(ValueError, match="retain must be one of"):
        causal_lm_losses(model, {"input_ids": forget}, {"input_ids": retain}, retain="mse", reference=model)
    with pytest.raises(KeyError, match="input_ids"):
        causal_lm_losses(model, {"input_ids": forget}, {"x": retain})
    assert calls == []

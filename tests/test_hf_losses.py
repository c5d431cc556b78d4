"""ofmu.hf.causal_lm_losses' KL-to-reference retain loss and NPO forget loss against float64 hand
computations."""

import math

import pytest

transformers = pytest.importorskip("transformers")
import torch  # noqa: E402
from _hf_common import memorised, sequences  # noqa: E402
from ofmu.hf import causal_lm_losses  # noqa: E402
from ofmu.hf.losses import npo_objective, sequence_nll, token_kl, token_nll  # noqa: E402


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


def test_bad_loss_options_are_refused_before_any_forward_pass():
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
    with pytest.raises(ValueError, match='forget="npo" needs reference'):
        causal_lm_losses(model, {"input_ids": forget}, {"input_ids": retain}, forget="npo")
    with pytest.raises(ValueError, match="forget must be one of"):
        causal_lm_losses(model, {"input_ids": forget}, {"input_ids": retain}, forget="ga")
    for bad in (0.0, -0.1, float("inf"), float("nan"), True, "0.1", None):
        with pytest.raises(ValueError, match="npo_beta must be a finite number > 0"):
            causal_lm_losses(model, {"input_ids": forget}, {"input_ids": retain}, forget="npo",
                             npo_beta=bad, reference=model)
    assert calls == []


def reference_npo(logits, ref_logits, labels, beta):
    """(2/beta) mean over rows of log sigmoid(-beta (log p_model(y) - log p_ref(y))), the row
    log-likelihoods summed by explicit loops in float64."""
    def row_logp(lg):
        lp = torch.log_softmax(lg.detach().double(), dim=-1)
        return [sum(float(lp[b, t, int(labels[b, t + 1])]) for t in range(labels.shape[1] - 1)
                    if int(labels[b, t + 1]) != -100) for b in range(labels.shape[0])]
    rows = [math.log(1 / (1 + math.exp(beta * (m - r))))
            for m, r in zip(row_logp(logits), row_logp(ref_logits))]
    return 2 / beta * sum(rows) / len(rows)


def test_npo_objective_matches_a_float64_loop_and_its_gradient_is_weighted_nll_ascent():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(4, 6, 9, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(4, 6, 9, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 9, (4, 6), generator=g)
    labels[1, 2:5] = -100
    labels[3, -1] = -100
    for beta in (0.1, 0.5, 2.0):
        got = npo_objective(logits, ref, labels, beta)
        assert got.item() == pytest.approx(reference_npo(logits, ref, labels, beta), rel=1e-5)
        at_ref = npo_objective(ref, ref, labels, beta).item()
        assert at_ref == pytest.approx(-2 / beta * math.log(2), rel=1e-6)
    # d/dlogits = (2/n) sum_i sigmoid(beta * log(p_i / p_ref,i)) d(-log p_i)/dlogits: ascent on the
    # summed NLL, weighted per row by a factor that vanishes as p_i falls below p_ref,i.
    beta = 0.5
    (grad,) = torch.autograd.grad(npo_objective(logits, ref, labels, beta), logits)
    s, s_ref = sequence_nll(logits, labels), sequence_nll(ref, labels).detach()
    weights = torch.sigmoid(beta * (s_ref - s)).detach()
    (want,) = torch.autograd.grad((2 / labels.shape[0]) * (weights * s).sum(), logits)
    assert torch.allclose(grad, want, rtol=1e-10, atol=1e-12)
    # sequence_nll is the per-row sum of token_nll's terms
    assert s.sum().item() / (labels[:, 1:] != -100).sum().item() == pytest.approx(
        token_nll(logits, labels).item(), rel=1e-6)


def test_npo_forget_loss_against_the_reference_model():
    model, reference = _perturbed(memorised("llama")), memorised("llama").eval()
    forget, retain = sequences()
    fb = {"input_ids": forget, "labels": forget}
    lf, lr = causal_lm_losses(model, fb, {"input_ids": retain}, forget="npo", npo_beta=0.3,
                              reference=reference)
    want = reference_npo(model(input_ids=forget).logits, reference(input_ids=forget).logits, forget, 0.3)
    assert lf.item() == pytest.approx(want, rel=1e-4)
    assert lr.item() == pytest.approx(model(input_ids=retain, labels=retain).loss.item(), rel=1e-5)
    lf.backward()
    assert all(p.grad is None for p in reference.parameters())
    same, _ = causal_lm_losses(reference, fb, {"input_ids": retain}, forget="npo", npo_beta=0.3,
                               reference=reference)
    assert same.item() == pytest.approx(-2 / 0.3 * math.log(2), rel=1e-5)
    none, _ = causal_lm_losses(model, None, {"input_ids": retain}, forget="npo", reference=reference)
    assert none is None

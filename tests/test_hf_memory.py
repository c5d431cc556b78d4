"""ofmu.bench.memory: the exact optimizer-side byte count, against closed forms."""

import argparse

import pytest

pytest.importorskip("transformers")
import torch  # noqa: E402
from ofmu.bench import memory  # noqa: E402


def small_args():
    return argparse.Namespace(hidden=64, layers=1, vocab=128, batch=2, seq=8, device="cpu")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_graddiff_adamw_holds_a_gradient_and_two_moments(dtype):
    row = memory.measure("graddiff-adamw", dtype, small_args())
    # AdamW: exp_avg and exp_avg_sq in the parameters' dtype, plus .grad; scalar steps on top
    assert 3 * row["param_bytes"] <= row["optimizer_side_bytes"] <= 3 * row["param_bytes"] + 64 * 64
    assert row["params"] == sum(p.numel() for p in memory._model(small_args(), torch.float32,
                                                                   "cpu").parameters())


def test_ofmu_sgd_holds_two_gradient_buffers_and_not_the_parameters():
    row = memory.measure("ofmu-sgd", "fp32", small_args())
    # grad_f and grad_r, padded to 16 bytes per tensor and 64 elements in all
    n_tensors = 12
    slack = 4 * (4 * n_tensors + 64)
    assert 2 * row["param_bytes"] <= row["optimizer_side_bytes"] <= 2 * row["param_bytes"] + 2 * slack
    assert "grad_f" in row["breakdown"] and "grad_r" in row["breakdown"]


def test_walker_counts_each_storage_once():
    a = torch.zeros(10)
    holder = type("H", (), {})()
    holder.x, holder.y, holder.z = a, a[2:], {"k": [a.view(2, 5), torch.zeros(3, dtype=torch.float64)]}
    found = {}
    memory._walk(holder, "h", found, set())
    assert sorted(n for _, n in found.values()) == [24, 40]


def test_moment_options_reference_loops_reproduce_ofmu():
    model, forget, retain = memory._memorised_tiny(steps=60)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = {}
    for option in ("ofmu", "per-loop"):
        model.load_state_dict(state)
        out[option] = memory.moment_option_run(option, model, forget, retain, seed=0, steps=4,
                                               lr=1e-3)
    assert abs(out["ofmu"][0]) > 0.05  # the steps did something
    for a, b in zip(out["ofmu"], out["per-loop"]):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(out["ofmu"][0]))

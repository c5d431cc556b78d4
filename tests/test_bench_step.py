"""The step benchmark's derived numbers: gradient evaluations per step, the per-evaluation ratio
to GradDiff with its quartile range, and the fixed-cost mode (op counts and overheads)."""

from __future__ import annotations

import csv

import pytest
from ofmu.bench import step as S


def test_grad_evals_follow_the_budget_rules():
    args = S.parse_args(["--inner-steps", "5"])
    assert S.grad_evals("ga", args) == 1 and S.grad_evals("graddiff", args) == 2
    # project + forget with rho > 0: 5 inner steps of 2 evaluations, outer 2 + 1 (H_f v)
    assert S.grad_evals("project", args) == 5 * 2 + 2 + 1
    assert S.grad_evals("fd", args) == 5 * 2 + 2 + 2 * 2


def test_per_eval_ratio_and_range_from_the_rows():
    args = S.parse_args(["--inner-steps", "1"])
    gd = dict(step_median_s=2.0, step_q25_s=1.8, step_q75_s=2.5)
    r = dict(step_median_s=6.0, step_q25_s=5.0, step_q75_s=7.0)
    S._per_eval(r, gd, "project", args)  # 1*2 + 3 = 5 evaluations
    assert r["grad_evals"] == 5
    assert r["per_eval_vs_graddiff"] == pytest.approx((6.0 / 5) / (2.0 / 2))
    assert r["per_eval_vs_graddiff_lo"] == pytest.approx((5.0 / 5) / (2.5 / 2))
    assert r["per_eval_vs_graddiff_hi"] == pytest.approx((7.0 / 5) / (1.8 / 2))


def test_fixed_cost_mode_writes_rounds_and_op_counts(tmp_path):
    pytest.importorskip("ofmu._C")
    rows = S.main(["--fixed-cost", "--device", "cpu", "--rounds", "2", "--repeats", "1",
                   "--backend", "cpp", "--out", str(tmp_path)])
    assert [r["round"] for r in rows] == [1, 2]
    (path,) = tmp_path.glob("fixed_cost-*.csv")
    with open(path, newline="") as f:
        got = list(csv.DictReader(f))
    for r in got:
        assert float(r["bare_us"]) > 0 and float(r["inner_us"]) > 0
        want = 100 * (float(r["inner_us"]) / float(r["bare_us"]) - 1)
        assert float(r["overhead_pct"]) == pytest.approx(want, rel=1e-3, abs=0.05)
        # the inner step runs the bare passes plus the optimizer's ops: a handful with the
        # finalize op (about 45 with the coefficient math as torch ops)
        assert 0 < int(r["ops_inner"]) - int(r["ops_bare"]) <= 30


def test_thread_clock_needs_one_thread():
    with pytest.raises(SystemExit, match="one CPU thread"):
        S.main(["--clock", "thread", "--threads", "2", "--models", "mlp"])

"""Smoke tests of the benchmark scripts: tiny sizes, one repeat, no timing assertions.

They check that both scripts run end to end, write the documented CSV columns, and that the
kernel benchmark's correctness gate passes for real providers and stops a wrong one.
"""

from __future__ import annotations

import csv
import importlib
from pathlib import Path

import pytest
import torch


def _load(name: str):
    return importlib.import_module(f"ofmu.bench.{name}")


def _read(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        r = csv.DictReader(f)
        return list(r.fieldnames), list(r)


KERNEL_ARGS = ["--device", "cpu", "--sizes", "4096,65536", "--repeats", "1", "--warmup", "0",
               "--min-sample-ms", "0.1", "--dtypes", "float32,bf16"]  # torch's names work too


def test_bench_kernels_smoke(tmp_path, capsys):
    K = _load("kernels")
    rows = K.main(KERNEL_ARGS + ["--providers", "eager,foreach,cpp,reference,triton,cuda",
                                 "--out", str(tmp_path)])
    assert f"results go to {tmp_path}" in capsys.readouterr().out  # the folder is named
    csvs = list(tmp_path.glob("kernels-*.csv"))
    assert len(csvs) == 1
    header, data = _read(csvs[0])
    assert header == K.COLUMNS
    assert len(data) == len(rows)
    timed = [r for r in data if r["n"]]
    assert {r["dtype"] for r in timed} == {"float32", "bfloat16"}
    assert {int(r["n"]) for r in timed} == {4096, 65536}
    # the instruction set the C++ kernels ran on, as the extension reports it
    isa = _load("common").cpu_isa(torch.device("cpu"), torch.float32)
    assert isa in ("avx512", "avx2", "portable", "none")
    assert {r["cpu_isa"] for r in timed} == {isa}
    for r in timed:
        # every provider passed the correctness gate (a wrong one would say WRONG / error)
        assert r["status"] == "ok", r
        assert float(r["gbps"]) > 0 and float(r["ceiling_gbps"]) > 0
        if r["provider"] not in K.CEILINGS:
            assert 0 < float(r["check_elem_ratio"]) <= 1 and float(r["check_coef_ratio"]) <= 1
            assert abs(float(r["check_dc2_rel"])) < 0.02
    provs = {r["provider"] for r in timed}
    assert {"triad", "axpy", "copy", "eager", "foreach", "reference"} <= provs
    skipped = {r["provider"]: r["status"] for r in data if r["status"].startswith("skipped")}
    assert "triton" in skipped and "cuda" in skipped  # not timed on CPU, with a reason
    assert all(r["device"] and r["torch"] and r["threads"] for r in data)
    assert list(tmp_path.glob("kernels-*.png")) or not _has_matplotlib()


def test_bench_kernels_rejects_a_wrong_kernel(tmp_path, monkeypatch):
    K = _load("kernels")
    real = K.make_provider

    def make(name, device):
        if name == "reference":  # a projection coefficient 5% too large
            return (lambda b: K.eager_step(b.theta, b.gf, b.gr, beta=K.BETA * 1.05)), ""
        return real(name, device)

    monkeypatch.setattr(K, "make_provider", make)
    with pytest.raises(SystemExit) as e:  # recorded in the CSV, and the exit status says so
        K.main(KERNEL_ARGS + ["--providers", "eager,reference", "--no-plot",
                              "--out", str(tmp_path)])
    assert e.value.code == 1
    (path,) = tmp_path.glob("kernels-*[!e].csv")
    bad = [r for r in _read(path)[1] if r["provider"] == "reference"]
    assert bad and all(r["status"] == "WRONG (not timed)" and not r["median_s"] for r in bad)


@pytest.mark.slow
def test_bench_kernels_compile_provider(tmp_path):
    K = _load("kernels")
    rows = K.main(KERNEL_ARGS + ["--providers", "eager,compile", "--no-plot",
                                 "--out", str(tmp_path)])
    assert all(r["status"] == "ok" for r in rows if r["provider"] == "compile")


def test_bench_step_smoke(tmp_path):
    S = _load("step")
    rows = S.main(["--device", "cpu", "--models", "mlp,transformer", "--batch", "4",
                   "--inner-steps", "1", "--repeats", "1", "--warmup", "0",
                   "--methods", "project,hvp+forget,hvp+exact,fd,project+none",
                   "--out", str(tmp_path)])
    csvs = list(tmp_path.glob("step-*.csv"))
    assert len(csvs) == 1
    header, data = _read(csvs[0])
    assert header == S.COLUMNS
    assert len(data) == len(rows) == 2 * 7
    for r in data:
        assert r["status"] == "ok", r
        assert float(r["step_median_s"]) > 0
        parts = sum(float(r[k]) for k in ("forward_s", "backward_s", "kernels_s", "other_s"))
        assert parts == pytest.approx(float(r["step_median_s"]), rel=1e-3)  # one repeat
        # every backward pass is timed as such (the optimizer's plain passes call the engine
        # directly: the benchmark wraps that call too), not left in "other"
        assert float(r["backward_s"]) > 0.3 * float(r["forward_s"]), r
    ofmu_rows = [r for r in data if r["method"] not in ("ga", "graddiff")]
    for r in ofmu_rows:
        assert float(r["inner_vs_ga"]) > 0 and float(r["step_per_update_vs_ga"]) > 0
        assert float(r["kernels_s"]) > 0  # the timing backend saw the fused ops


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True

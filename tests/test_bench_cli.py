"""``ofmu bench`` checks its arguments before any work, never loses results, reports failures
in its exit status, and repeats its sweep in rounds with the spread of each ratio to compile."""

from __future__ import annotations

import csv

import pytest
from ofmu.bench import kernels as K
from ofmu.cli import main

TINY = ["--device", "cpu", "--repeats", "1", "--warmup", "0", "--min-sample-ms", "0.1",
        "--dtypes", "fp32", "--no-plot"]


@pytest.mark.parametrize("args,culprit", [
    (["--sizes", "1"], "--sizes"),
    (["--sizes", "0"], "--sizes"),
    (["--sizes", "4096,abc"], "--sizes"),
    (["--repeats", "0"], "--repeats"),
    (["--threads", "0"], "--threads"),
    (["--threads", "1,x"], "--threads"),
    (["--exp-step", "0"], "--exp-step"),
    (["--rounds", "0"], "--rounds"),
    (["--warmup", "-1"], "--warmup"),
    (["--min-exp", "20", "--max-exp", "16"], "--max-exp"),
    (["--providers", "eager,bogus"], "--providers"),
])
def test_bad_argument_is_an_argparse_error_before_any_work(args, culprit, tmp_path, capsys,
                                                            monkeypatch):
    monkeypatch.setattr(K, "run", lambda a: pytest.fail("work started"))
    out = tmp_path / "out"
    assert main(["kernel-bench"] + TINY + ["--out", str(out)] + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ofmu kernel-bench") and culprit in err and "Traceback" not in err
    assert not out.exists()


def test_out_pointing_at_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("keep")
    assert main(["kernel-bench"] + TINY + ["--sizes", "4096", "--out", str(f)]) == 2
    assert "--out" in capsys.readouterr().err and f.read_text() == "keep"


def test_help_shows_no_none_default(capsys):
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert "(default: None)" not in out
    assert "(default: 26 on CPU, 30 on GPU)" in " ".join(out.split())


def _write_old(tmp_path):
    out = tmp_path / "res"
    out.mkdir()
    old = out / "kernels-x.csv"
    old.write_text("old results\n")
    return out, old


def test_a_run_that_measures_nothing_exits_nonzero_and_keeps_old_results(tmp_path, monkeypatch,
                                                                         capsys):
    out, old = _write_old(tmp_path)
    monkeypatch.setattr(K.C, "output_stem", lambda kind, args: str(out / "kernels-x"))

    def broken(name, device):
        return (lambda b: (_ for _ in ()).throw(RuntimeError("kernel crashed"))), ""

    monkeypatch.setattr(K, "make_provider", broken)
    rc = main(["kernel-bench"] + TINY + ["--sizes", "4096", "--providers", "eager,cpp",
                                  "--out", str(out)])
    assert rc != 0
    assert old.read_text() == "old results\n"  # never replaced by less
    assert "kernel crashed" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["kernels-x.csv"]  # no temporary left


def test_a_failing_provider_is_recorded_and_the_exit_status_says_so(tmp_path, monkeypatch):
    real = K.make_provider

    def make(name, device):
        if name == "reference":  # a projection coefficient 5% too large: fails the gate
            return (lambda b: K.eager_step(b.theta, b.gf, b.gr, beta=K.BETA * 1.05)), ""
        return real(name, device)

    monkeypatch.setattr(K, "make_provider", make)
    assert main(["kernel-bench"] + TINY + ["--sizes", "4096", "--providers", "eager,reference",
                                    "--out", str(tmp_path)]) == 1
    (path,) = tmp_path.glob("kernels-*[!e].csv")
    with open(path, newline="") as f:
        status = {r["provider"]: r["status"] for r in csv.DictReader(f)}
    assert status["eager"] == "ok" and status["reference"] == "WRONG (not timed)"


def test_rounds_interleave_and_report_the_spread_of_each_ratio(tmp_path, monkeypatch):
    """Three rounds of two points; a fake compile provider whose time is known relative to the
    eager one, so that the reported median and min-max are checked against the rows."""
    rows = K.main(TINY + ["--sizes", "4096,8192", "--providers", "eager,reference",
                          "--rounds", "3", "--out", str(tmp_path)])
    timed = [r for r in rows if r.get("status") == "ok"]
    order = [(r["round"], r["n"]) for r in timed if r["provider"] == "eager"]
    assert order == [(1, 4096), (1, 8192), (2, 4096), (2, 8192), (3, 4096), (3, 8192)]
    # No compile provider: nothing to relate to. Relabel eager as compile to check the summary.
    for r in timed:
        if r["provider"] == "eager":
            r["provider"] = "compile"
    rat = {(r["n"], r["provider"]): r for r in K.ratios(timed)}
    for n in (4096, 8192):
        want = sorted(c["median_s"] / r["median_s"] for c in timed for r in timed
                      if c["n"] == r["n"] == n and c["round"] == r["round"]
                      and c["provider"] == "compile" and r["provider"] == "reference")
        got = rat[(n, "reference")]
        assert got["rounds"] == 3
        assert got["vs_compile_min"] == want[0] and got["vs_compile_max"] == want[-1]
        assert got["vs_compile_median"] == want[1]


def test_ratio_file_is_written_with_rounds(tmp_path, monkeypatch):
    real = K.make_provider
    monkeypatch.setattr(K, "make_provider",  # eager as a stand-in compile: no compiler needed
                        lambda name, dev: real("eager" if name == "compile" else name, dev))
    K.main(TINY + ["--sizes", "4096", "--providers", "eager,compile", "--rounds", "2",
                   "--out", str(tmp_path)])
    (path,) = tmp_path.glob("kernels-*-vs-compile.csv")
    with open(path, newline="") as f:
        got = list(csv.DictReader(f))
    assert [r["provider"] for r in got] == ["eager"]
    r = got[0]
    assert r["rounds"] == "2"
    assert float(r["vs_compile_min"]) <= float(r["vs_compile_median"]) <= float(r["vs_compile_max"])

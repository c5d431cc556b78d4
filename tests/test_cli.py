"""The ``ofmu`` command line as a user meets it: --version, ``python -m ofmu``, ``ofmu bench``
forwarding its options and running only the installed package's code, a clear message naming the
extra to install when an optional dependency is missing, and the demo's verdict line."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import ofmu
import pytest
import torch
from ofmu import cli
from ofmu.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY_BENCH = ["--device", "cpu", "--sizes", "4096", "--repeats", "1", "--warmup", "0",
              "--min-sample-ms", "0.1", "--dtypes", "fp32", "--providers", "eager,cpp", "--no-plot"]


def _env():
    env = dict(os.environ)
    pkg = str(Path(ofmu.__file__).resolve().parents[1])  # the ofmu under test, wherever it lives
    env["PYTHONPATH"] = os.pathsep.join([pkg, str(ROOT)] + env.get("PYTHONPATH", "").split(os.pathsep))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def test_version_matches_pyproject(capsys):
    (version,) = re.findall(r'(?m)^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text())
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"ofmu {version}"
    assert ofmu.__version__ == version


def test_python_m_ofmu_is_the_same_cli(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ofmu", "--version"], capture_output=True, text=True,
                       env=_env(), cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"ofmu {ofmu.__version__}"
    r = subprocess.run([sys.executable, "-m", "ofmu", "demo", "--bogus"], capture_output=True, text=True,
                       env=_env(), cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "usage: ofmu" in r.stderr and "--bogus" in r.stderr


@pytest.mark.parametrize("argv", [["bench", "--help"], ["bench", "--", "--help"]])
def test_bench_help_shows_the_benchmark_options(capsys, argv):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ofmu bench")
    for opt in ("--dtypes", "--sizes", "--providers", "--out", "--no-plot"):
        assert opt in out


def test_bench_forwards_options_and_reports_a_bad_one(capsys):
    assert main(["bench", "--no-such-option"]) == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_bench_runs_installed_code_not_a_planted_script(tmp_path, monkeypatch, capsys):
    """A directory can plant benchmarks/bench_kernels.py (and friends): ofmu bench must not run them."""
    marker = tmp_path / "PLANTED_CODE_RAN"
    payload = f"open({str(marker)!r}, 'w').write('x')\n"
    (tmp_path / "benchmarks").mkdir()
    for name in ("benchmarks/bench_kernels.py", "benchmarks/__init__.py", "benchmarks/common.py",
                 "bench_kernels.py"):
        (tmp_path / name).write_text(payload)
    monkeypatch.chdir(tmp_path)
    assert main(["bench"] + TINY_BENCH) == 0  # default --out: a folder named in the output
    out = capsys.readouterr().out
    assert not marker.exists()
    (written,) = re.findall(r"wrote (\S+\.csv)", out)
    csv_path = tmp_path / written
    assert csv_path.is_file() and csv_path.parent.name == "ofmu-bench-results"
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    timed = {r["provider"]: r for r in rows if r["n"] and r["provider"] in ("eager", "cpp")}
    assert set(timed) == {"eager", "cpp"}
    for r in timed.values():  # the installed benchmark ran, and its float64 correctness gate passed
        assert int(r["n"]) == 4096 and r["dtype"] == "float32" and r["status"] == "ok"
        assert float(r["median_s"]) > 0


@pytest.mark.parametrize("command,module", [(["demo", "--dataset", "digits"], "tqdm"),
                                            (["demo", "--dataset", "digits"], "sklearn"),
                                            (["benchmark", "--dataset", "digits"], "matplotlib")])
def test_missing_extra_says_what_to_install(capsys, monkeypatch, tmp_path, command, module):
    monkeypatch.setitem(sys.modules, module, None)  # import of it now fails, as when not installed
    cache = tmp_path / "models"
    assert main(command + ["--cache-dir", str(cache), "--quiet"]) == 2
    err = capsys.readouterr().err
    pip_name = {"sklearn": "scikit-learn"}.get(module, module)
    assert f"ofmu {command[0]} needs {pip_name}" in err
    assert 'pip install "ofmu[bench]"' in err
    assert not cache.exists()  # refused before any work started


def test_bench_without_matplotlib_asks_for_the_extra_or_no_plot(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["bench", "--sizes", "4096"]) == 2
    err = capsys.readouterr().err
    assert 'pip install "ofmu[bench]"' in err and "--no-plot" in err


def test_unforeseen_missing_module_names_its_extra(capsys, monkeypatch):
    def needs_transformers(args):
        raise ModuleNotFoundError("No module named 'transformers'", name="transformers")

    monkeypatch.setattr(cli, "cmd_info", needs_transformers)
    assert main(["info"]) == 2
    assert 'pip install "ofmu[lm]"' in capsys.readouterr().err


BLOCKED = ["sklearn", "tqdm", "matplotlib", "transformers", "peft", "accelerate", "gguf", "rouge_score",
           "scipy", "triton"]


def _step_result() -> torch.Tensor:
    """A few OFMU steps on a tiny least-squares problem (deterministic; CPU)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1, dtype=torch.float64)
    xf, yf = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    xr, yr = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    opt = ofmu.OFMU(model.parameters(), lr=0.05, inner_lr=0.01)

    def closure():
        mse = torch.nn.functional.mse_loss
        return mse(model(xf), yf), mse(model(xr), yr)

    for _ in range(3):
        opt.step(closure)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_core_install_without_extras(tmp_path):
    """`pip install ofmu` (no extras): the optimizer works and steps exactly as with every extra
    installed; `ofmu info` and `ofmu bench --no-plot` work; `ofmu demo` and a plotting `ofmu bench`
    name the extra to install."""
    out = tmp_path / "theta.pt"
    script = textwrap.dedent(f"""
        import sys
        from importlib.machinery import PathFinder
        BLOCKED = {BLOCKED!r}
        _find = PathFinder.find_spec
        def find_spec(name, path=None, target=None):  # as if these packages were not installed
            return None if name.split(".")[0] in BLOCKED else _find(name, path, target)
        PathFinder.find_spec = staticmethod(find_spec)
        import torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_cli import _step_result
        from ofmu.cli import main
        torch.save(_step_result(), {str(out)!r})
        assert main(["info"]) == 0
        rc = main(["demo", "--dataset", "digits", "--quiet"])
        print("demo rc", rc)
        print("bench rc", main(["bench", "--sizes", "4096"]))  # needs matplotlib for its plot
        print("bench --no-plot rc", main(["bench"] + {TINY_BENCH!r} + ["--out", {str(tmp_path / "b")!r}]))
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print("loaded", loaded)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(),
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "demo rc 2" in r.stdout and 'pip install "ofmu[bench]"' in r.stderr
    assert "bench rc 2" in r.stdout and "--no-plot" in r.stderr
    assert "bench --no-plot rc 0" in r.stdout and list((tmp_path / "b").glob("kernels-*.csv"))
    assert "loaded []" in r.stdout
    assert "triton" in r.stdout  # `ofmu info` ran and listed the triton backend (unavailable here)
    without = torch.load(out, weights_only=True)
    assert torch.equal(without, _step_result())


def _result(gaps: dict[str, list[float]]) -> dict:
    names = ["Retrain", "Original"] + list(gaps)
    runs = []
    for s in range(len(next(iter(gaps.values())))):
        rows = {"Retrain": {"gap": 0.0}, "Original": {"gap": 7.0 + s}}
        rows.update({n: {"gap": g[s]} for n, g in gaps.items()})
        runs.append({"rows": {n: rows[n] for n in names}})
    return {"config": {"labels": {"OFMU-Adam": "OFMU (project, Adam)"}}, "runs": runs}


def test_verdict_tie_inside_the_spread():
    # A: mean 2.0, sample std 0.5; B: mean 2.1, std 0.1 -> 0.10 apart, inside std 0.50: a tie
    line = cli.verdict(_result({"OFMU-Adam": [2.0, 2.5, 1.5], "GradDiff": [2.1, 2.2, 2.0]}))
    assert "OFMU (project, Adam) came closest to retraining (Avg. Gap 2.00 points" in line
    assert "original model's gap is 8.00" in line
    assert "0.10 ahead of GradDiff: a tie, inside the spread over 3 seeds (std up to 0.50)" in line


def test_verdict_clear_winner_and_one_seed():
    # A: mean 1.0, std 0.1; B: mean 3.0, std 0.2 -> 2.00 apart, more than the spread
    line = cli.verdict(_result({"GradDiff": [3.2, 3.0, 2.8], "NPO": [1.1, 1.0, 0.9]}))
    assert "NPO came closest" in line and "2.00 ahead of GradDiff, more than the spread" in line
    one = cli.verdict(_result({"GA": [4.0], "NPO": [3.5]}))
    assert "NPO came closest" in one and "0.50 ahead of GA" in one
    assert "With one seed" in one and "ties" in one and "docs/results.md" in one


def test_extras_cover_every_optional_import():
    """pyproject's `all` is every other extra, and each module the CLI maps to an extra is in it."""
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras) == {"bench", "hf", "lm", "triton", "dev", "all"}
    assert set(extras["all"]) == set().union(*(set(v) for k, v in extras.items() if k != "all"))
    assert set(extras["hf"]) <= set(extras["lm"])
    for module, extra in cli.EXTRA_OF.items():
        assert cli.PIP_NAME.get(module, module) in extras[extra], (module, extra)
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -e ".[all]" --no-build-isolation && ofmu demo' in readme
    assert 'pip install -q -e ".[all]" --no-build-isolation' in ci


@pytest.mark.parametrize("bad", ["0", "-2", "two"])
def test_bad_thread_count_is_a_clear_usage_error(capsys, bad):
    with pytest.raises(SystemExit) as e:
        main(["--threads", bad, "info"])
    assert e.value.code == 2
    assert f"--threads: must be a positive integer, got {bad!r}" in capsys.readouterr().err

"""The ``ofmu`` command line as a user meets it: --version and --help without torch, ``python -m
ofmu``, ``ofmu kernel-bench`` forwarding its options and running only the installed package's code,
the 0.2.0 command names as aliases, every bad argument or variable refused before any work (exit
status 2, results never replaced by less), a clear message naming the extra to install when an
optional dependency is missing, and the demo's verdict line."""

from __future__ import annotations

import argparse
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


@pytest.mark.parametrize("argv", [["kernel-bench", "--help"], ["kernel-bench", "--", "--help"],
                                  ["bench", "--help"]])
def test_kernel_bench_help_shows_the_benchmark_options(capsys, argv):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ofmu kernel-bench")
    for opt in ("--dtypes", "--sizes", "--providers", "--out", "--no-plot"):
        assert opt in out


def test_kernel_bench_forwards_options_and_reports_a_bad_one(capsys):
    assert main(["kernel-bench", "--no-such-option"]) == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_bench_runs_installed_code_not_a_planted_script(tmp_path, monkeypatch, capsys):
    """A directory can plant benchmarks/bench_kernels.py (and friends): ofmu kernel-bench must not run
    them."""
    marker = tmp_path / "PLANTED_CODE_RAN"
    payload = f"open({str(marker)!r}, 'w').write('x')\n"
    (tmp_path / "benchmarks").mkdir()
    for name in ("benchmarks/bench_kernels.py", "benchmarks/__init__.py", "benchmarks/common.py",
                 "bench_kernels.py"):
        (tmp_path / name).write_text(payload)
    monkeypatch.chdir(tmp_path)
    assert main(["kernel-bench"] + TINY_BENCH) == 0  # default --out: a folder named in the output
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
                                            (["study", "--dataset", "digits"], "matplotlib")])
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
    assert main(["kernel-bench", "--sizes", "4096"]) == 2
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
    installed; `ofmu info` and `ofmu kernel-bench --no-plot` work; `ofmu demo` and a plotting
    `ofmu kernel-bench` name the extra to install."""
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
        print("bench rc", main(["kernel-bench", "--sizes", "4096"]))  # needs matplotlib for its plot
        tiny = {TINY_BENCH!r} + ["--out", {str(tmp_path / "b")!r}]
        print("bench --no-plot rc", main(["kernel-bench"] + tiny))
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
    assert 'pip install -c constraints.txt -e ".[all]" --no-build-isolation && ofmu demo' in readme
    assert 'pip install -q -c constraints.txt -e ".[all]" --no-build-isolation' in ci


@pytest.mark.parametrize("bad", ["0", "-2", "two"])
def test_bad_thread_count_is_a_clear_usage_error(capsys, bad):
    with pytest.raises(SystemExit) as e:
        main(["--threads", bad, "info"])
    assert e.value.code == 2
    assert f"--threads: must be a positive integer, got {bad!r}" in capsys.readouterr().err


# ---------------------------------------------------------------- fast --version / --help

@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["demo", "--help"], ["info", "--help"]])
def test_version_and_help_do_not_import_torch(tmp_path, argv):
    """Importing torch takes seconds; the answers that need no computation must not wait for it."""
    script = ("import sys\nfrom ofmu.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n"
              "    pass\nprint('TORCH LOADED' if 'torch' in sys.modules else 'no torch')\n")
    r = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, env=_env(),
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("no torch"), r.stdout[-500:]
    assert "usage: ofmu" in r.stdout or r.stdout.startswith("ofmu ")


def _all_actions():
    parser, subparsers = cli.build_parser(methods_for_help=True)
    seen = {id(p): (f"ofmu {name}", p) for name, p in subparsers.items() if name not in cli.RENAMED}
    for prog, p in [("ofmu", parser)] + list(seen.values()):
        for a in p._actions:
            if a.option_strings and not isinstance(a, argparse._SubParsersAction):
                yield prog, a


def test_every_option_has_help_and_states_its_default():
    for prog, a in _all_actions():
        assert a.help and len(a.help) > 8, f"{prog} {a.option_strings[0]} has no help"
    for name in ("demo", "study", "info"):
        text = cli.build_parser(methods_for_help=True)[1][name].format_help()
        assert "(default: None)" not in text and "(default: False)" not in text, name
    study = " ".join(cli.build_parser(methods_for_help=True)[1]["study"].format_help().split())
    for stated in ("--seeds N number of seeds (default: 3 on image datasets",
                   "--budget N minibatch gradient evaluations "
                   "granted to each method (default: 240 on Fashion-MNIST, 120 on digits",
                   "--seed0 S first seed (default: 0)"):
        assert stated in study, stated


def test_study_help_lists_the_valid_method_names(capsys):
    from ofmu.studies.lm.methods import ALL_METHODS
    from ofmu.studies.methods import REGISTRY

    with pytest.raises(SystemExit) as e:
        main(["study", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    for name in set(REGISTRY) | set(ALL_METHODS):
        assert f" {name}," in text or f" {name} " in text, name


# ---------------------------------------------------------------- new names, old aliases

@pytest.mark.parametrize("old,new", [("benchmark", "study"), ("bench", "kernel-bench")])
def test_old_command_names_still_work_and_name_the_new_one(capsys, old, new):
    rc = main([old, "--help"]) if old == "bench" else None
    if old == "benchmark":
        with pytest.raises(SystemExit) as e:
            main([old, "--help"])
        rc = e.value.code
    assert rc == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"usage: ofmu {new}")
    assert f"`ofmu {old}` is now `ofmu {new}`" in err


# ---------------------------------------------------------------- refused before any work

def _refused(capsys, argv, *names):
    """The call exits with status 2 and an argparse-style message naming every one of ``names``."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: ofmu" in err and "error:" in err and "Traceback" not in err
    for name in names:
        assert name in err, (name, err)
    return err


@pytest.mark.parametrize("seeds", ["0", "-1"])
def test_study_with_no_seeds_keeps_existing_results(capsys, tmp_path, seeds):
    out, cache = tmp_path / "results", tmp_path / "models"
    out.mkdir()
    old = out / "digits-random.json"
    old.write_text('{"runs": ["the results of a long run"]}')
    _refused(capsys, ["study", "--dataset", "digits", "--seeds", seeds, "--out", str(out),
                      "--cache-dir", str(cache), "--quiet"], "--seeds")
    assert old.read_text() == '{"runs": ["the results of a long run"]}'
    assert sorted(p.name for p in out.iterdir()) == ["digits-random.json"]
    assert not cache.exists()


@pytest.mark.parametrize("where", ["a file", "under a file", "unwritable"])
def test_study_refuses_an_unusable_out_before_training(capsys, tmp_path, where):
    a_file = tmp_path / "results.json"
    a_file.write_text("keep me")
    out = {"a file": a_file, "under a file": a_file / "sub",
           "unwritable": Path("/proc/ofmu-results/sub")}[where]
    cache = tmp_path / "models"
    _refused(capsys, ["study", "--dataset", "digits", "--seeds", "1", "--methods", "GA", "--out", str(out),
                      "--cache-dir", str(cache), "--quiet"], "--out")
    assert not cache.exists()  # nothing trained
    assert a_file.read_text() == "keep me"


@pytest.mark.parametrize("argv,names", [
    (["--methods", "GA,NoSuchMethod"], ["--methods", "NoSuchMethod", "GradDiff", "OFMU-Adam"]),
    (["--methods", "GA,GA"], ["--methods", "twice"]),
    (["--methods", ""], ["--methods"]),
    (["--budget", "0"], ["--budget"]),
    (["--seed0", "-3"], ["--seed0"]),
    (["--forget", "10"], ["--forget", "authors"]),
    (["--no-world-replay"], ["--no-world-replay", "authors"]),
    (["--dataset", "authors", "--forget", "0,150"], ["--forget"]),
    (["--dataset", "authors", "--methods", "FT"], ["--methods", "SimNPO"]),
])
def test_study_bad_arguments_are_usage_errors(capsys, tmp_path, argv, names):
    cache = tmp_path / "models"
    base = ["--dataset", "digits"] if "--dataset" not in argv else []
    _refused(capsys, ["study", *base, *argv, "--out", str(tmp_path / "out"), "--cache-dir", str(cache),
                      "--quiet"], *names)
    assert not cache.exists() and not (tmp_path / "out").exists()


def test_demo_and_study_refuse_bad_environment_before_work(capsys, tmp_path, monkeypatch):
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("")
    out = tmp_path / "out"
    monkeypatch.setenv("OFMU_CACHE_DIR", str(a_file))
    _refused(capsys, ["demo", "--dataset", "digits", "--quiet"], "OFMU_CACHE_DIR")
    _refused(capsys, ["study", "--dataset", "digits", "--out", str(out), "--quiet"], "OFMU_CACHE_DIR")
    monkeypatch.delenv("OFMU_CACHE_DIR")
    monkeypatch.setenv("OFMU_BACKEND", "bogus")
    _refused(capsys, ["study", "--dataset", "digits", "--out", str(out), "--cache-dir",
                      str(tmp_path / "models"), "--quiet"], "OFMU_BACKEND", "bogus", "cpp")
    _refused(capsys, ["demo", "--dataset", "digits", "--cache-dir", str(a_file)], "--cache-dir")
    assert not out.exists() and not (tmp_path / "models").exists()


@pytest.mark.parametrize("var,value,names", [("OFMU_BACKEND", "bogus", ["OFMU_BACKEND", "bogus"]),
                                             ("OFMU_CACHE_DIR", "FILE", ["OFMU_CACHE_DIR"])])
def test_info_with_a_bad_variable_is_a_usage_error(tmp_path, var, value, names):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    env = _env() | {var: str(a_file) if value == "FILE" else value}
    r = subprocess.run([sys.executable, "-m", "ofmu", "info"], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "usage: ofmu info" in r.stderr
    for name in names:
        assert name in r.stderr


def test_results_write_is_atomic(tmp_path, monkeypatch):
    """A results write that fails (here: the disk is full at fsync) raises and leaves the previous
    results file whole, with no temporary file beside it."""
    from ofmu.studies import cache as cache_mod
    from ofmu.studies.vision import report

    monkeypatch.setattr(report, "plot_tradeoff", lambda result, path: path)
    row = {"UA": 1.0, "RA": 2.0, "TA": 3.0, "MIA": 4.0, "gap": 0.5, "time_s": 1.0, "hparams": {"lr": 0.1}}
    result = {"config": {"dataset": "digits", "scenario": "random", "labels": {}, "methods": ["GA"],
                         "grids": {"GA": [{"lr": 0.1}]}},
              "runs": [{"seed": 0, "retrain_time_s": 10.0,
                        "rows": {"Retrain": dict(row, gap=0.0), "GA": row}}]}
    assert "GA" in report.markdown_table(result)  # a well-formed result: only the write can fail
    (tmp_path / "digits-random.json").write_text("previous results")

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_mod.os, "fsync", full)
    with pytest.raises(OSError):
        report.write_outputs(result, tmp_path)
    assert (tmp_path / "digits-random.json").read_text() == "previous results"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits-random.json"]


def test_backend_names_checked_by_the_cli_are_the_backends():
    """The CLI checks OFMU_BACKEND without importing torch, from its own copy of the names."""
    from ofmu import backends

    assert cli.BACKEND_NAMES == ("auto",) + tuple(backends.NAMES)

"""The ``ofmu`` command line: ``demo``, ``benchmark``, ``bench`` and ``info`` (also ``python -m ofmu``).

The optimizer needs only torch and numpy; the commands that run studies need the ``bench`` extra
(scikit-learn, tqdm, matplotlib). A command whose extra is missing says which one to install
instead of failing with a traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

# Which extra provides each optional import (pyproject.toml [project.optional-dependencies]).
EXTRA_OF = {"sklearn": "bench", "tqdm": "bench", "matplotlib": "bench",
            "transformers": "lm", "peft": "lm", "accelerate": "lm", "gguf": "lm",
            "rouge_score": "lm", "scipy": "lm", "triton": "triton"}
PIP_NAME = {"sklearn": "scikit-learn", "rouge_score": "rouge-score"}
DEFAULT_BENCHMARK_OUT = "ofmu-benchmark-results"


class MissingExtraError(RuntimeError):
    """An optional dependency of a command is not installed; the message says which extra."""


def _is_missing(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is None
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


def _missing_message(command: str, modules: list[str]) -> str:
    extras = sorted({EXTRA_OF.get(m, "all") for m in modules})
    names = ", ".join(PIP_NAME.get(m, m) for m in modules)
    return (f"ofmu {command} needs {names}, which {'is' if len(modules) == 1 else 'are'} not installed. "
            f"Install the extra: pip install \"ofmu[{','.join(extras)}]\" "
            "(from a source checkout: pip install -e \".[" + ",".join(extras) + "]\" --no-build-isolation)")


def require(command: str, *modules: str) -> None:
    """Raise :class:`MissingExtraError` naming the extra to install if any of ``modules`` is absent.
    Checked before any work starts (matplotlib, for instance, is only imported to draw the plot
    at the end of a long run)."""
    missing = [m for m in modules if _is_missing(m)]
    if missing:
        raise MissingExtraError(_missing_message(command, missing))


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return n


def _threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def _default_dataset() -> str:
    from .studies.vision.images import _FILES, fashion_mnist_dir

    d = fashion_mnist_dir()
    return "fashion-mnist" if all((d / f).is_file() for f in _FILES.values()) else "digits"


def cmd_demo(args) -> int:
    require("demo", "sklearn", "tqdm")
    from .studies.vision import markdown_table
    from .studies.vision.report import chosen_hparams
    from .studies.vision.study import DEMO_METHODS, StudyConfig, run_study

    dataset = _default_dataset() if args.dataset == "auto" else args.dataset
    if args.dataset == "auto" and dataset == "digits":
        from .studies.vision.images import fashion_mnist_dir

        print(f"Fashion-MNIST is not installed (looked in {fashion_mnist_dir()}). To run the demo on it, "
              "install the offline Debian package:\n    sudo apt-get install dataset-fashion-mnist\n"
              "(or set OFMU_FASHION_MNIST_DIR to a folder holding its four idx .gz files). "
              "Falling back to scikit-learn's digits.\n")
    print(f"ofmu demo: unlearning on {dataset} ({args.scenario} forgetting, seed {args.seed}).")
    print("Trains the original MLP and the gold-standard model retrained without the forget set "
          "(cached after the first run),\nthen unlearns with GA, GradDiff and OFMU (Adam), each tuned on "
          "a validation split, and reports test-split numbers.\n")
    cfg = StudyConfig(dataset=dataset, scenario=args.scenario, seeds=(args.seed,),
                      methods=DEMO_METHODS, cache=args.cache_dir, use_cache=not args.no_cache)
    t0 = time.perf_counter()
    result = run_study(cfg, progress=not args.quiet, log=None)
    run0 = result["runs"][0]
    print(f"\n{run0['data']}")
    print(markdown_table(result, with_std=False))
    print("\nUA = 100 - forget accuracy, RA/TA = retain/test accuracy, MIA = % of forget examples "
          "an SVC membership attack calls non-members;\nAvg. Gap = mean |method - Retrain| over "
          "those four (lower is better). time = wall clock of unlearning (Retrain: of training).")
    print("\nChosen on validation:\n" + chosen_hparams(result))
    print("\n" + verdict(result))
    print(f"\nTotal {time.perf_counter() - t0:.0f} s. Full study: ofmu benchmark --dataset "
          f"{dataset} --scenario {args.scenario} --seeds 3")
    return 0


def verdict(result: dict, reference: str = "Retrain") -> str:
    """One plain-language line: which method came closest to ``reference`` (lowest Avg. Gap), by how
    much against the runner-up, and whether that difference exceeds the spread over seeds."""
    from .studies.vision.report import aggregate

    agg = aggregate(result)
    labels = result["config"].get("labels", {})
    rows = sorted((cols["gap"][0], cols["gap"][1], name) for name, cols in agg.items()
                  if name not in (reference, "Original") and "gap" in cols)
    if not rows:
        return "Verdict: no unlearning method was run."
    (g1, s1, best), rest = rows[0], rows[1:]
    name = labels.get(best, best)
    head = f"Verdict: {name} came closest to retraining (Avg. Gap {g1:.2f} points"
    orig = agg.get("Original", {}).get("gap")
    head += f"; the original model's gap is {orig[0]:.2f})" if orig else ")"
    if not rest:
        return head + "."
    g2, s2, second = rest[0]
    diff = g2 - g1
    other = labels.get(second, second)
    n_seeds = len(result["runs"])
    if n_seeds < 2:
        return (f"{head}, {diff:.2f} ahead of {other}. With one seed there is no spread to compare "
                "against: differences smaller than the spread over seeds measured in docs/results.md "
                "(about 0.2-0.8 points of gap on Fashion-MNIST) are ties; run more seeds "
                "(ofmu benchmark --seeds 3) to tell them apart.")
    spread = max(s1, s2)
    if diff <= spread:
        return (f"{head}, {diff:.2f} ahead of {other}: a tie, inside the spread over {n_seeds} seeds "
                f"(std up to {spread:.2f}).")
    return (f"{head}, {diff:.2f} ahead of {other}, more than the spread over {n_seeds} seeds "
            f"(std up to {spread:.2f}).")


def cmd_benchmark(args) -> int:
    if args.dataset == "authors":  # the language-model benchmark (docs/lm-benchmark.md)
        require("benchmark", "transformers", "scipy", "rouge_score", "tqdm", "matplotlib")
        from .studies.lm.runner import main as lm_main

        return lm_main(args)
    require("benchmark", "sklearn", "tqdm", "matplotlib")
    from .studies.vision import markdown_table, write_outputs
    from .studies.vision.study import DEFAULT_METHODS, StudyConfig, run_study

    methods = tuple(args.methods.split(",")) if args.methods else DEFAULT_METHODS
    cfg = StudyConfig(dataset=args.dataset, scenario=args.scenario,
                      seeds=tuple(range(args.seed0, args.seed0 + args.seeds)), methods=methods,
                      budget=args.budget, cache=args.cache_dir, use_cache=not args.no_cache)
    t0 = time.perf_counter()
    result = run_study(cfg, progress=not args.quiet)
    result["config"]["total_time_s"] = round(time.perf_counter() - t0, 1)
    paths = write_outputs(result, args.out)
    print(markdown_table(result))
    print("\n" + verdict(result))
    print(f"\nwrote {', '.join(p.name for p in paths.values())} to {os.path.abspath(args.out)} "
          f"({result['config']['total_time_s']:.0f} s)")
    return 0


def cmd_info(args) -> int:
    import torch

    from . import __version__, backend_info

    info = backend_info()
    print(f"ofmu {__version__}  torch {info.torch}  threads {torch.get_num_threads()}")
    if info.env_override:
        print(f"OFMU_BACKEND={info.env_override} (overrides backend='auto')")
    print("\nbackends:")
    for name, (ok, why) in info.available.items():
        print(f"  {name:<7} {'available' if ok else 'unavailable'}{'' if ok else ': ' + why}")
    print("\nchosen for backend='auto':")
    for cls, (name, reason) in info.chosen.items():
        print(f"  {cls:<5} -> {name:<7} {reason}")
    return 0


def cmd_bench(args, rest: list[str]) -> int:
    """Run the kernel microbenchmark shipped in the installed package (:mod:`ofmu.bench.kernels`),
    never a script from the current directory; every argument after ``bench`` is its own."""
    if rest[:1] == ["--"]:
        rest = rest[1:]
    wants_help = any(a in ("-h", "--help") for a in rest)
    if not wants_help and "--no-plot" not in rest and _is_missing("matplotlib"):
        raise MissingExtraError(_missing_message("bench", ["matplotlib"]) + "; or pass --no-plot")
    from .bench.kernels import main as bench_main

    argv0 = sys.argv[0] if sys.argv else ""
    if sys.argv:
        sys.argv[0] = "ofmu bench"  # argparse's prog: `ofmu bench --help` shows the right usage
    else:
        sys.argv.append("ofmu bench")
    try:
        bench_main(rest)
    except SystemExit as e:  # --help, or an argument error already reported by argparse
        if isinstance(e.code, str):  # sys.exit("message"): say it, do not swallow it
            print(e.code, file=sys.stderr)
            return 2
        return e.code if isinstance(e.code, int) else 0
    finally:
        sys.argv[0] = argv0
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ofmu", description="OFMU machine unlearning: demo, "
                                "benchmarks and backend information.")
    p.add_argument("--version", action="version", version=f"ofmu {_version()}")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--cache-dir", default=None, help="where trained original/retrained "
                        "models are cached (default ~/.cache/ofmu/models or $OFMU_CACHE_DIR)")
        sp.add_argument("--no-cache", action="store_true", help="retrain, do not read or write "
                        "the model cache")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")

    d = sub.add_parser("demo", help="unlearn on bundled real data and compare with retraining")
    d.add_argument("--dataset", default="auto", choices=("auto", "fashion-mnist", "digits"),
                   help="auto: Fashion-MNIST when installed, else scikit-learn digits")
    d.add_argument("--scenario", default="random", choices=("random", "class"))
    d.add_argument("--seed", type=int, default=0)
    common(d)
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("benchmark", help="the full unlearning study (tables, JSON, plot)")
    b.add_argument("--dataset", default="fashion-mnist", choices=("fashion-mnist", "digits", "authors"))
    b.add_argument("--model", default="tiny", choices=("tiny", "small", "smollm2"),
                   help="authors only: tiny Llama from a config, a small pre-trained Llama with "
                        "SmolLM2's tokenizer, or SmolLM2-135M-Instruct (GGUF)")
    b.add_argument("--preset", default="power", choices=("smoke", "power"),
                   help="authors only: smoke (seconds, CI) or power (the real run; default)")
    b.add_argument("--data-seeds", default=None,
                   help="authors only: comma-separated data seeds (new authors and models), e.g. 0,1,2")
    b.add_argument("--forget", default=None, help="authors only: forget percentages (default 1,5,10)")
    b.add_argument("--scenario", default="random", choices=("random", "class"))
    b.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    b.add_argument("--seed0", type=int, default=0, help="first seed (default 0)")
    b.add_argument("--methods", default=None, help="comma-separated subset of methods")
    b.add_argument("--budget", type=int, default=None, help="gradient evaluations per method")
    b.add_argument("--out", default=DEFAULT_BENCHMARK_OUT,
                   help=f"output folder (default: ./{DEFAULT_BENCHMARK_OUT}; printed at the end)")
    common(b)
    b.set_defaults(func=cmd_benchmark)

    i = sub.add_parser("info", help="which kernel backends exist here and which one is chosen")
    i.set_defaults(func=cmd_info)

    k = sub.add_parser("bench", add_help=False, help="kernel microbenchmarks of the installed package "
                       "(ofmu.bench.kernels); every option after `bench` is its own: "
                       "`ofmu bench --help` lists them")
    k.set_defaults(func=None)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command != "bench" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    _threads(args.threads)
    try:
        if args.command == "bench":
            return cmd_bench(args, rest)
        return args.func(args)
    except MissingExtraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # an optional import that require() did not foresee
        if e.name and e.name.split(".")[0] in EXTRA_OF:
            print(f"error: {_missing_message(args.command, [e.name.split('.')[0]])}", file=sys.stderr)
            return 2
        raise
    except FileNotFoundError as e:  # e.g. DatasetMissingError: say what to install, no traceback
        print(f"ofmu {args.command}: {e}", file=sys.stderr)
        return 1


def _version() -> str:
    from . import __version__

    return __version__


if __name__ == "__main__":
    sys.exit(main())

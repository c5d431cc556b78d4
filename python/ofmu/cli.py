"""The ``ofmu`` command line: ``demo``, ``study``, ``kernel-bench`` and ``info`` (also ``python -m ofmu``).

The optimizer needs only torch and numpy; the commands that run studies need the ``bench`` extra
(scikit-learn, tqdm, matplotlib). A command whose extra is missing says which one to install
instead of failing with a traceback.

Every argument and environment variable is checked before any work starts: a bad one is a usage
error naming it (exit status 2), so a long run never fails at its end on a typo, and a results file
is never replaced by less. Nothing here imports torch until a command runs, so ``ofmu --help`` and
``ofmu --version`` answer at once.

``benchmark`` and ``bench`` are the 0.2.0 names of ``study`` and ``kernel-bench``; they still work
and say the new name.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path

# Which extra provides each optional import (pyproject.toml [project.optional-dependencies]).
EXTRA_OF = {"sklearn": "bench", "tqdm": "bench", "matplotlib": "bench",
            "transformers": "lm", "peft": "lm", "accelerate": "lm", "gguf": "lm",
            "rouge_score": "lm", "scipy": "lm", "triton": "triton"}
PIP_NAME = {"sklearn": "scikit-learn", "rouge_score": "rouge-score"}
DEFAULT_BENCHMARK_OUT = "ofmu-benchmark-results"
# Old command names (0.2.0) -> the names that say what the commands do. The old ones still work.
RENAMED = {"benchmark": "study", "bench": "kernel-bench"}
BACKEND_NAMES = ("auto", "cpp", "cuda", "triton", "torch")  # ofmu.backends.NAMES plus "auto"
VISION_DATASETS = ("fashion-mnist", "digits")


class MissingExtraError(RuntimeError):
    """An optional dependency of a command is not installed; the message says which extra."""


class UsageError(ValueError):
    """A bad argument or environment variable, found before any work; printed argparse-style."""


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


def _nonnegative_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return n


def _percentages(text: str) -> str:
    """``1,5,10``: each a number in (0, 100). Returned as written (the LM runner parses it)."""
    parts = [t.strip() for t in text.split(",")]
    try:
        ok = bool(parts) and all(0 < float(t) < 100 for t in parts)
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"must be comma-separated percentages between 0 and 100 "
                                         f"(e.g. 1,5,10), got {text!r}")
    return text


def _seed_list(text: str) -> str:
    """``0,1,2``: non-negative integers. Returned as written (the LM runner parses it)."""
    parts = [t.strip() for t in text.split(",")]
    if not all(t.isdigit() for t in parts) or len(set(parts)) != len(parts):
        raise argparse.ArgumentTypeError(f"must be comma-separated distinct non-negative integers "
                                         f"(e.g. 0,1,2), got {text!r}")
    return text


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _folder_problem(path: Path, probe: bool) -> str | None:
    """Why ``path`` cannot serve as an output folder, or None. With ``probe``, a temporary file is
    created and removed in it, or in its nearest existing parent when it does not exist yet
    (nothing is left behind either way)."""
    existing = next(p for p in (path, *path.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        return f"{existing} is a file, not a folder" if existing == path else f"{existing} is not a folder"
    if probe:
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as e:
            return f"cannot write in {existing} ({e.strerror or e})"
    return None


def check_folder(path: str | os.PathLike, name: str, probe: bool = True) -> None:
    """Raise :class:`UsageError` naming ``name`` (an option or a variable) if ``path`` cannot be
    made a folder and written to. Creates nothing."""
    why = _folder_problem(Path(path).expanduser().absolute(), probe)
    if why:
        raise UsageError(f"{name}: {why}")


def check_environment(*, cache_dir: str | None = None, use_cache: bool = True,
                      probe: bool = True) -> None:
    """The environment variables the commands read, checked before any work (``OFMU_BACKEND`` is
    otherwise read at the first optimizer step, after the models have trained)."""
    backend = os.environ.get("OFMU_BACKEND")
    if backend and backend not in BACKEND_NAMES:
        raise UsageError(f"OFMU_BACKEND={backend!r}: unknown backend; expected one of "
                         f"{', '.join(BACKEND_NAMES)} (or unset)")
    data = os.environ.get("OFMU_FASHION_MNIST_DIR")
    if data and Path(data).exists() and not Path(data).is_dir():
        raise UsageError(f"OFMU_FASHION_MNIST_DIR={data}: a file, not a folder")
    if cache_dir is not None:
        if use_cache:
            check_folder(cache_dir, "--cache-dir", probe)
    elif os.environ.get("OFMU_CACHE_DIR"):
        check_folder(Path(os.environ["OFMU_CACHE_DIR"]) / "models",
                     f"OFMU_CACHE_DIR={os.environ['OFMU_CACHE_DIR']}", probe and use_cache)


def method_names(dataset: str) -> tuple[str, ...]:
    """The methods ``ofmu study --dataset <dataset>`` accepts, from the study modules."""
    if dataset == "authors":
        from .studies.lm.methods import ALL_METHODS

        return tuple(ALL_METHODS)
    from .studies.methods import REGISTRY

    return tuple(sorted(REGISTRY))


def parse_methods(text: str | None, dataset: str) -> tuple[str, ...] | None:
    """``--methods``: None (the default set) or the names given, each valid, none twice."""
    if text is None:
        return None
    names = tuple(t.strip() for t in text.split(","))
    valid = method_names(dataset)
    bad = [n for n in names if n not in valid]
    if bad or not names:
        raise UsageError(f"--methods: unknown method {', '.join(map(repr, bad)) or repr(text)} for "
                         f"--dataset {dataset}; valid: {', '.join(valid)}")
    if len(set(names)) != len(names):
        raise UsageError(f"--methods: a method is listed twice in {text!r}")
    return names


def _default_dataset() -> str:
    from .studies.vision.images import _FILES, fashion_mnist_dir

    d = fashion_mnist_dir()
    return "fashion-mnist" if all((d / f).is_file() for f in _FILES.values()) else "digits"


def cmd_demo(args) -> int:
    require("demo", "sklearn", "tqdm")
    check_environment(cache_dir=args.cache_dir, use_cache=not args.no_cache)
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
    print(f"\nTotal {time.perf_counter() - t0:.0f} s. Full study: ofmu study --dataset "
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
                "(ofmu study --seeds 3) to tell them apart.")
    spread = max(s1, s2)
    if diff <= spread:
        return (f"{head}, {diff:.2f} ahead of {other}: a tie, inside the spread over {n_seeds} seeds "
                f"(std up to {spread:.2f}).")
    return (f"{head}, {diff:.2f} ahead of {other}, more than the spread over {n_seeds} seeds "
            f"(std up to {spread:.2f}).")


def cmd_study(args) -> int:
    authors = args.dataset == "authors"  # the language-model benchmark (docs/lm-benchmark.md)
    if authors:
        require("study", "transformers", "scipy", "rouge_score", "tqdm", "matplotlib")
    else:
        require("study", "sklearn", "tqdm", "matplotlib")
    # Every check before any work: a run that would fail at its end fails now instead.
    if args.forget is not None and not authors:
        raise UsageError("--forget: only --dataset authors takes forget percentages")
    if args.data_seeds is not None and not authors:
        raise UsageError("--data-seeds: only --dataset authors has data seeds")
    if args.no_world_replay and not authors:
        raise UsageError("--no-world-replay: only --dataset authors fine-tunes on world facts")
    methods = parse_methods(args.methods, args.dataset)
    check_folder(args.out, "--out")
    check_environment(cache_dir=args.cache_dir, use_cache=not args.no_cache)
    if authors:
        from .studies.lm.runner import main as lm_main

        return lm_main(args)
    from .studies.vision import markdown_table, write_outputs
    from .studies.vision.study import DEFAULT_METHODS, StudyConfig, run_study

    seeds = 3 if args.seeds is None else args.seeds
    cfg = StudyConfig(dataset=args.dataset, scenario=args.scenario,
                      seeds=tuple(range(args.seed0, args.seed0 + seeds)),
                      methods=methods or DEFAULT_METHODS,
                      budget=args.budget, cache=args.cache_dir, use_cache=not args.no_cache)
    t0 = time.perf_counter()
    result = run_study(cfg, progress=not args.quiet)
    result["config"]["total_time_s"] = round(time.perf_counter() - t0, 1)
    paths = write_outputs(result, args.out)  # only now, complete, atomically
    print(markdown_table(result))
    print("\n" + verdict(result))
    print(f"\nwrote {', '.join(p.name for p in paths.values())} to {os.path.abspath(args.out)} "
          f"({result['config']['total_time_s']:.0f} s)")
    return 0


def cmd_info(args) -> int:
    check_environment(probe=False)
    import torch

    from . import __version__, backend_info
    from .studies.vision.models import cache_dir

    try:
        info = backend_info()
    except (ValueError, RuntimeError) as e:  # e.g. OFMU_BACKEND=cuda on a machine without CUDA
        raise UsageError(f"OFMU_BACKEND={os.environ.get('OFMU_BACKEND')!r}: {e}") from None
    print(f"ofmu {__version__}  torch {info.torch}  threads {torch.get_num_threads()}")
    print(f"model cache: {cache_dir()}")
    if info.env_override:
        print(f"OFMU_BACKEND={info.env_override} (overrides backend='auto')")
    print("\nbackends:")
    for name, (ok, why) in info.available.items():
        print(f"  {name:<7} {'available' if ok else 'unavailable'}{'' if ok else ': ' + why}")
    print("\nchosen for backend='auto':")
    for cls, (name, reason) in info.chosen.items():
        print(f"  {cls:<5} -> {name:<7} {reason}")
    if info.cpu_isa.get("float32"):
        print("\nC++ CPU kernels (cpp backend): " + ", ".join(f"{d} {isa}" for d, isa in
                                                             info.cpu_isa.items()))
    return 0


def cmd_kernel_bench(args, rest: list[str]) -> int:
    """Run the kernel microbenchmark shipped in the installed package (:mod:`ofmu.bench.kernels`),
    never a script from the current directory; every argument after ``kernel-bench`` is its own."""
    if rest[:1] == ["--"]:
        rest = rest[1:]
    wants_help = any(a in ("-h", "--help") for a in rest)
    if not wants_help and "--no-plot" not in rest and _is_missing("matplotlib"):
        raise MissingExtraError(_missing_message("kernel-bench", ["matplotlib"]) + "; or pass --no-plot")
    from .bench.kernels import main as bench_main

    argv0 = sys.argv[0] if sys.argv else ""
    if sys.argv:
        sys.argv[0] = "ofmu kernel-bench"  # argparse's prog: `--help` shows the right usage
    else:
        sys.argv.append("ofmu kernel-bench")
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


class _Help(argparse.HelpFormatter):
    """States each option's default, unless it has none (None, a flag) or the help text says it;
    never breaks a line inside a hyphenated name (OFMU-rho, fashion-mnist)."""

    def _split_lines(self, text, width):
        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width,
                             break_on_hyphens=False)

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (action.option_strings and default is not None and default is not False
                and default != argparse.SUPPRESS and "default" not in text):
            text += " (default: %(default)s)"
        return text


def _methods_help(listed: bool) -> str:
    if listed:
        try:
            from .studies.vision.study import DEFAULT_METHODS

            vision, lm = method_names("digits"), method_names("authors")
        except ImportError:  # an extra is missing: the command itself will say which
            listed = False
    if not listed:
        return "comma-separated subset of the methods (`ofmu study --help` lists them)"
    left_out = [m for m in vision if m not in DEFAULT_METHODS]
    return (f"comma-separated subset of the methods. Image datasets: {', '.join(vision)} (default: all"
            + (f" but {', '.join(left_out)}" if left_out else "") + f"). Authors: {', '.join(lm)} "
            "(default: all)")


def build_parser(methods_for_help: bool = False) -> tuple[argparse.ArgumentParser, dict]:
    """The parser and its subparsers by name (aliases included). ``methods_for_help`` lists the
    valid ``--methods`` names in ``ofmu study --help`` (importing the study modules, hence torch;
    only done when that help is asked for)."""
    p = argparse.ArgumentParser(prog="ofmu", description="OFMU machine unlearning: demo, "
                                "unlearning studies, kernel benchmarks and backend information.")
    p.add_argument("--version", action="version", version=f"ofmu {_version()}")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="torch CPU threads for the command (default: torch's choice, usually one "
                   "per core)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = _Help

    def common(sp):
        sp.add_argument("--cache-dir", default=None, help="where the trained original and retrained "
                        "models are cached (default: $OFMU_CACHE_DIR/models, else ~/.cache/ofmu/models)")
        sp.add_argument("--no-cache", action="store_true", help="retrain; neither read nor write the "
                        "model cache")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")

    d = sub.add_parser("demo", formatter_class=fmt,
                       help="unlearn on real data (Fashion-MNIST, else scikit-learn's digits) and "
                       "compare with retraining (minutes on a CPU)",
                       description="Train an MLP and a model retrained without a forget set, unlearn "
                       "with GA, GradDiff and OFMU (each tuned on a validation split) and compare them "
                       "on the test split. Trained models are cached.")
    d.add_argument("--dataset", default="auto", choices=("auto", "fashion-mnist", "digits"),
                   help="auto: Fashion-MNIST when installed (Debian package dataset-fashion-mnist or "
                   "$OFMU_FASHION_MNIST_DIR), else scikit-learn's digits")
    d.add_argument("--scenario", default="random", choices=("random", "class"),
                   help="forget a random 10%% of the training set, or one whole class")
    d.add_argument("--seed", type=_nonnegative_int, default=0,
                   help="seed of the split, the models and the minibatches")
    common(d)
    d.set_defaults(func=cmd_demo)

    methods_help = _methods_help(methods_for_help)
    b = sub.add_parser("study", aliases=["benchmark"], formatter_class=fmt,
                       help="the full unlearning study: every method against retraining over seeds "
                       "(tables, JSON, plot; tens of minutes to hours on a CPU)",
                       description="Unlearning study: for each seed, train the original and the "
                       "retrained model, tune every method on a validation split, report the chosen "
                       "configuration on the test split. Results are written once the run is "
                       "complete, atomically. `benchmark` is this command's 0.2.0 name.")
    b.add_argument("--dataset", default="fashion-mnist", choices=VISION_DATASETS + ("authors",),
                   help="image classification (Fashion-MNIST, scikit-learn's digits) or the "
                   "fictitious-authors language-model benchmark (docs/lm-benchmark.md)")
    b.add_argument("--model", default="tiny", choices=("tiny", "small", "smollm2"),
                   help="authors only: tiny Llama from a config, a small Llama pre-trained on general "
                   "text with SmolLM2's tokenizer, or SmolLM2-135M-Instruct (GGUF)")
    b.add_argument("--preset", default="power", choices=("smoke", "power", "wide", "tofu"),
                   help="authors only: smoke (seconds, for CI), power (the real run), wide (tiny "
                   "rung at TOFU's question counts: 100 authors per pool, forget 5/10%%, budget 1280) "
                   "or tofu (tiny rung in TOFU's shape: 200 authors per pool, forget 1/5/10%%)")
    b.add_argument("--data-seeds", default=None, type=_seed_list, metavar="S,S,...",
                   help="authors only: comma-separated data seeds, each a new set of authors and "
                   "new models (default: the preset's; 0,1,2 for power on tiny and small)")
    b.add_argument("--forget", default=None, type=_percentages,
                   help="authors only: forget percentages (default: 1,5,10)")
    b.add_argument("--no-world-replay", action="store_true",
                   help="authors only: fine-tune the target and retain models without replaying the "
                   "world facts (the small rung's setting before it replayed them; its results "
                   "committed before that were made so)")
    b.add_argument("--scenario", default="random", choices=("random", "class"),
                   help="image datasets: forget a random 10%% of the training set, or one whole class")
    b.add_argument("--seeds", type=_positive_int, default=None, metavar="N",
                   help="number of seeds (default: 3 on image datasets; on authors, the unlearning "
                   "seeds per data seed, the preset's: 2)")
    b.add_argument("--seed0", type=_nonnegative_int, default=0, metavar="S", help="first seed")
    b.add_argument("--methods", default=None, help=methods_help)
    b.add_argument("--budget", type=_positive_int, default=None, metavar="N",
                   help="minibatch gradient evaluations granted to each method (default: 240 on "
                   "Fashion-MNIST, 120 on digits, about 8%% of retraining; the preset's on authors)")
    b.add_argument("--out", default=DEFAULT_BENCHMARK_OUT,
                   help="output folder for the JSON, Markdown and plot (printed at the end)")
    common(b)
    b.set_defaults(func=cmd_study)

    i = sub.add_parser("info", help="which kernel backends exist here and which one is chosen",
                       description="The ofmu and torch versions, the model cache folder, each "
                       "kernel backend (available or why not) and the one backend='auto' picks.")
    i.set_defaults(func=cmd_info)

    k = sub.add_parser("kernel-bench", aliases=["bench"], add_help=False,
                       help="kernel microbenchmarks of the installed package (ofmu.bench.kernels); "
                       "every option after `kernel-bench` is its own: `ofmu kernel-bench --help` "
                       "lists them")
    k.set_defaults(func=None)
    return p, dict(sub.choices)


def _command_in(argv: list[str]) -> str | None:
    """The command named in ``argv`` (the first word that is one; --threads takes a number)."""
    names = ("demo", "study", "info", "kernel-bench") + tuple(RENAMED)
    return next((a for a in argv if a in names), None)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_in(argv)
    wants_help = any(a in ("-h", "--help") for a in argv)
    if command in RENAMED:  # before parsing, so that `--help` and usage errors show it too
        print(f"note: `ofmu {command}` is now `ofmu {RENAMED[command]}` (the old name still works)",
              file=sys.stderr)
    parser, subparsers = build_parser(methods_for_help=wants_help and command in ("study", "benchmark"))
    args, rest = parser.parse_known_args(argv)
    invoked = args.command
    args.command = RENAMED.get(invoked, invoked)
    if args.command != "kernel-bench" and rest:
        subparsers[invoked].error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        _threads(args.threads)
        if args.command == "kernel-bench":
            return cmd_kernel_bench(args, rest)
        return args.func(args)
    except UsageError as e:  # exits with status 2, usage and message on stderr
        subparsers[invoked].error(str(e))
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

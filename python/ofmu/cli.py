"""The ``ofmu`` command line: ``demo``, ``benchmark``, ``bench`` and ``info``."""

from __future__ import annotations

import argparse
import os
import sys
import time


def _threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def _default_dataset() -> str:
    from .studies.vision.images import _FILES, fashion_mnist_dir

    d = fashion_mnist_dir()
    return "fashion-mnist" if all((d / f).is_file() for f in _FILES.values()) else "digits"


def cmd_demo(args) -> int:
    from .studies.vision import markdown_table
    from .studies.vision.report import chosen_hparams
    from .studies.vision.study import DEMO_METHODS, StudyConfig, run_study

    dataset = _default_dataset() if args.dataset == "auto" else args.dataset
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
    print(f"\nTotal {time.perf_counter() - t0:.0f} s. Full study: ofmu benchmark --dataset "
          f"{dataset} --scenario {args.scenario} --seeds 3")
    return 0


def cmd_benchmark(args) -> int:
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
    print(f"\nwrote {', '.join(str(p) for p in paths.values())} "
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
    from .bench.kernels import main as bench_main

    bench_main(rest)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ofmu", description="OFMU machine unlearning: demo, "
                                "benchmarks and backend information.")
    p.add_argument("--threads", type=int, default=None,
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
    b.add_argument("--dataset", default="fashion-mnist", choices=("fashion-mnist", "digits"))
    b.add_argument("--scenario", default="random", choices=("random", "class"))
    b.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    b.add_argument("--seed0", type=int, default=0, help="first seed (default 0)")
    b.add_argument("--methods", default=None, help="comma-separated subset of methods")
    b.add_argument("--budget", type=int, default=None, help="gradient evaluations per method")
    b.add_argument("--out", default="benchmarks/out", help="output folder")
    common(b)
    b.set_defaults(func=cmd_benchmark)

    i = sub.add_parser("info", help="which kernel backends exist here and which one is chosen")
    i.set_defaults(func=cmd_info)

    k = sub.add_parser("bench", add_help=False, help="kernel microbenchmarks (ofmu.bench.kernels); "
                       "extra arguments are passed through")
    k.set_defaults(func=None)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command != "bench" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    _threads(args.threads)
    if args.command == "bench":
        return cmd_bench(args, rest)
    try:
        return args.func(args)
    except FileNotFoundError as e:  # e.g. DatasetMissingError: say what to install, no traceback
        print(f"ofmu {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())

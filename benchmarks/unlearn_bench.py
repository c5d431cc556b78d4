"""Unlearning benchmark as a script: the same study as ``ofmu benchmark``.

    python benchmarks/unlearn_bench.py --dataset fashion-mnist --scenario random --seeds 3
"""

import sys

from ofmu.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))

"""Whole-step microbenchmark as a script; the code ships in the package (:mod:`ofmu.bench.step`)."""

from ofmu.bench.step import main

if __name__ == "__main__":
    main()

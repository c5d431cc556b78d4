"""Kernel microbenchmark as a script; the code ships in the package (:mod:`ofmu.bench.kernels`,
also ``ofmu bench``)."""

from ofmu.bench.kernels import main

if __name__ == "__main__":
    main()

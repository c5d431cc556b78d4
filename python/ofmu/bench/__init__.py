"""Microbenchmarks shipped with the package (``ofmu bench``, ``python -m ofmu.bench.kernels``):

* :mod:`ofmu.bench.kernels`: the fused step kernels against eager / foreach / compiled torch and
  the measured bandwidth ceilings (GB/s from an explicit bytes model);
* :mod:`ofmu.bench.step`: a whole OFMU step against GA / GradDiff steps on small models;
* :mod:`ofmu.bench.common`: the shared runner (timing, statistics, CSV, device facts).
"""

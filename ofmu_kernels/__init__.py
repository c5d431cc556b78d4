"""Triton kernels for the OFMU step math (the ``triton`` backend of :mod:`ofmu.backends`).

The kernel contract (``reduce3``, ``combine``, ``update``) is stated once, in docs/design.md
("Kernel contract"); :mod:`ofmu.reference` is the torch reference every kernel is tested
against. Here ``reduce3`` is two-stage and fixed-order (no atomics).

Coefficients are read from device memory by the kernels, never passed as Python floats.
On a GPU the kernels are compiled; without one they run on CPU tensors under
``TRITON_INTERPRET=1`` (which must be set before the first use of this package's ops).

Importing this package does not import triton: the kernel modules load on first use, so
``import ofmu_kernels`` works anywhere and the interpreter switch is read as late as possible.
"""

from __future__ import annotations

import importlib

__all__ = ["reduce3", "combine", "update", "finalize"]

_HOME = {"reduce3": ".reduce", "combine": ".elementwise", "update": ".elementwise",
         "finalize": ".finalize"}


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    fn = getattr(importlib.import_module(_HOME[name], __name__), name)
    globals()[name] = fn  # later lookups skip __getattr__
    return fn


def __dir__():
    return sorted(list(globals()) + __all__)

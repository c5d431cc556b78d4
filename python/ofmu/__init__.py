"""ofmu: OFMU machine unlearning as a drop-in ``torch.optim.Optimizer`` with fused kernels."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = ["OFMU", "backend_info", "cycle"]
__version__ = "0.2.0"

# The public names are imported on first use (PEP 562), so that `ofmu --version` and
# `ofmu --help` answer without importing torch (about 2 s). `from ofmu import OFMU` is unchanged.
_LAZY = {"OFMU": ".optimizer", "backend_info": ".backends", "cycle": ".batches"}

if TYPE_CHECKING:
    from .backends import backend_info
    from .batches import cycle
    from .optimizer import OFMU


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'ofmu' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

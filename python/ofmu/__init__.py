"""ofmu: OFMU machine unlearning as a drop-in ``torch.optim.Optimizer`` with fused kernels."""

from .backends import backend_info
from .batches import cycle
from .optimizer import OFMU

__all__ = ["OFMU", "backend_info", "cycle"]
__version__ = "0.2.0"

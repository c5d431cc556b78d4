"""Hugging Face integration: :class:`OFMUTrainer` and :func:`causal_lm_losses`.

Needs the optional extra: ``pip install "ofmu[hf]"`` (transformers, peft, accelerate). The core
package (``import ofmu``) never imports transformers.
"""

try:
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised in a process without transformers
    raise ImportError('ofmu.hf needs transformers (and accelerate for OFMUTrainer): '
                      'pip install "ofmu[hf]"') from e

from .losses import IGNORE_INDEX, causal_lm_labels, causal_lm_losses, token_nll

try:
    from .trainer import OFMUTrainer
except ImportError as e:  # transformers.Trainer needs accelerate
    raise ImportError(f'ofmu.hf.OFMUTrainer needs transformers.Trainer, which failed to import ({e}); '
                      'install the extra: pip install "ofmu[hf]"') from e

__all__ = ["IGNORE_INDEX", "OFMUTrainer", "causal_lm_labels", "causal_lm_losses", "token_nll"]

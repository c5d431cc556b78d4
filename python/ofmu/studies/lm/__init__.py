"""TOFU-style language-model unlearning benchmark on generated fictitious authors.

``ofmu benchmark --dataset authors --model tiny|smollm2`` (see ``docs/lm-benchmark.md``). The
modules: ``data`` (the generator), ``text`` (tokenizers, batches), ``metrics`` (TOFU /
open-unlearning metrics on per-example numbers), ``evaluate`` (model -> those numbers),
``models`` (tiny Llama, SmolLM2 from GGUF, fine-tuning, cache), ``world`` (one data seed's
authors, models and evaluation sets), ``methods`` (GA, GradDiff, NPO, SimNPO, OFMU and its
ablations under one budget), ``config`` (presets), ``runner`` (the protocol), ``summary``
(aggregation over data seeds), ``report``.
transformers, rouge-score and scipy are imported only when needed (``pip install "ofmu[lm]"``).
"""

from .config import DEFAULT_METHODS, LMConfig, config_for
from .methods import ALL_METHODS
from .runner import run

__all__ = ["ALL_METHODS", "DEFAULT_METHODS", "LMConfig", "config_for", "run"]

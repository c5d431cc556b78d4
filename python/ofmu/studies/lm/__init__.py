"""TOFU-style language-model unlearning benchmark on generated fictitious authors.

``ofmu benchmark --dataset authors --model tiny|smollm2`` (see ``docs/lm-benchmark.md``). The
modules: ``data`` (the generator), ``text`` (tokenizers, batches), ``metrics`` (TOFU /
open-unlearning metrics on per-example numbers), ``evaluate`` (model -> those numbers),
``models`` (tiny Llama, SmolLM2 from GGUF, fine-tuning, cache), ``methods`` (GA, GradDiff, NPO,
SimNPO, OFMU and its ablations under one budget), ``runner`` (the protocol), ``report``.
transformers, rouge-score and scipy are imported only when needed (``pip install "ofmu[lm]"``).
"""

from .runner import ALL_METHODS, PRESETS, LMConfig, run

__all__ = ["ALL_METHODS", "PRESETS", "LMConfig", "run"]

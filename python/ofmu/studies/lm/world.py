"""The world of one data seed: generated authors, tokenizer, base / target / retain models,
general text, and the evaluation sets and reference numbers every unlearning run is scored
against.

* base: the tiny Llama trained on the world facts and general English sentences (its
  "pre-training"), SmolLM2 as shipped, or the ``small`` rung (:func:`models.load_small`).
* target: the base fine-tuned on every fact of every test and val author (the facts a forget
  request names and their *neighbours*).
* retain model (gold), one per forget percentage: the same without the forget authors of the
  test pool and of the val pool (TOFU's retain model never sees the forget authors at all, so
  neighbour facts are compared with the target instead).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from . import evaluate, metrics
from .data import AuthorData, generate
from .text import PairStream, encode_all, encode_text_all


@dataclass
class Streams:
    forget: PairStream
    retain: PairStream
    general: PairStream | None = None  # general-text replay (methods with a "replay" share)


@dataclass
class World:
    cfg: object
    data: AuthorData
    tok: object
    base: object
    world: list  # the world facts the base model answers
    general: list  # encoded general pre-training sentences: the replay pool of "-replay" methods
    fluency: list  # held-out general sentences (strings) for the fluency perplexity
    target: object
    retain_models: dict  # pct -> model
    forget_names: dict  # pct -> names of the forget authors (test and val pools)
    base_world: dict  # the base model's raw numbers on the world set

    def all_authors(self) -> list:
        return list(self.data.pools["test"]) + list(self.data.pools["val"])

    def retain_pairs(self, pct) -> list:
        """Every pair the retain model of ``pct`` was trained on about authors (the retain stream)."""
        gone = self.forget_names[pct]
        keep = [a for a in self.all_authors() if a.name not in gone]
        return encode_all(self.tok, qa_items(AuthorData.trained(keep)))


def qa_items(qas):
    return [(qa.question, qa.answer) for qa in qas]


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False)


def _general_text(cfg) -> tuple[list[str], list[str]]:
    """(pre-training sentences for the tiny base, held-out sentences for fluency)."""
    if not cfg.n_fluency and not cfg.n_general:
        return [], []
    from .corpus import general_sentences
    pre = general_sentences("pretrain", cfg.n_general, cfg.data_seed, max_words=cfg.general_words) \
        if cfg.model == "tiny" and cfg.n_general else []
    held = general_sentences("heldout", cfg.n_fluency, cfg.data_seed, max_words=cfg.general_words) \
        if cfg.n_fluency else []
    return pre, held


def _tiny_base(cfg, data, pre, held, device, progress):
    from .models import cached_model, finetune, tiny_llama
    from .text import WordTokenizer

    texts = [t for a in data.pools["test"] + data.pools["val"] + data.pools["holdout"]
             for qa in a.qas + a.neighbours for t in (qa.question, qa.answer, qa.paraphrase, *qa.perturbed)]
    texts += [t for qa in data.world for t in (qa.question, qa.answer, *qa.perturbed)]
    texts += pre + held + ["Question: Answer:"]
    tok = WordTokenizer(texts)
    pairs = encode_all(tok, qa_items(data.world)) + encode_text_all(tok, pre)

    def build(m):
        bar = _progress(cfg.base_epochs * math.ceil(len(pairs) / cfg.ft_batch), "tiny base", progress)
        finetune(m, pairs, epochs=cfg.base_epochs, lr=cfg.base_lr, batch_size=cfg.ft_batch,
                 seed=cfg.data_seed, device=device, pad_id=tok.pad_id, progress=bar)
    skeleton = tiny_llama(tok.vocab_size, seed=cfg.data_seed, hidden=cfg.hidden, layers=cfg.layers).to(device)
    return tok, cached_model(skeleton, "base", _spec(cfg, data), build, cfg.cache, cfg.use_cache), pairs


def _spec(cfg, data) -> dict:
    return {"model": cfg.model, "data": data.describe(), "hidden": cfg.hidden, "layers": cfg.layers,
            "base": [cfg.base_epochs, cfg.base_lr], "ft": [cfg.ft_epochs, cfg.ft_lr, cfg.ft_batch],
            "replay": cfg.replay_world, "para": cfg.train_paraphrase,
            "general": [cfg.n_general, cfg.n_fluency, cfg.general_words]}


def _base(cfg, data, pre, held, device, progress):
    """(tokenizer, base model, pairs replayed during fine-tuning)."""
    from .text import ChatTokenizer

    if cfg.model == "tiny":
        return _tiny_base(cfg, data, pre, held, device, progress)
    if cfg.model == "smollm2":
        from .models import load_smollm2
        model, hf_tok = load_smollm2(cfg.gguf)
    elif cfg.model == "small":
        try:
            from .models import load_small
        except ImportError as e:
            raise ImportError("the 'small' rung needs ofmu.studies.lm.models.load_small") from e
        model, hf_tok = load_small(gguf=cfg.gguf, cache=cfg.cache, use_cache=cfg.use_cache, device=device)
    else:
        raise ValueError(f"unknown model {cfg.model!r}; expected 'tiny', 'small' or 'smollm2'")
    return ChatTokenizer(hf_tok), model.to(device), []


def build_world(cfg, device, progress: bool = True) -> World:
    data = generate(cfg.n_test, cfg.n_val, cfg.n_holdout, cfg.qa_per_author, cfg.n_perturbed,
                    cfg.data_seed, n_neighbour=cfg.n_neighbour)
    for pct in cfg.forget:
        data.forget_count("test", pct)  # validates pct before any training
    pre, held = _general_text(cfg)
    tok, base, replay = _base(cfg, data, pre, held, device, progress)
    world = evaluate.world_answered(base, tok, list(data.world), cfg.eval_batch, device)
    if cfg.n_world:
        world = world[:cfg.n_world]
    if len(world) < 3:
        raise RuntimeError(f"the base model answers only {len(world)} world-knowledge questions; "
                           "the utility set needs at least 3")
    from .models import cached_model, finetune
    spec = _spec(cfg, data)
    if cfg.model == "small" and cfg.replay_world:
        # Fine-tuning on the authors alone makes the small model answer every world question in
        # the authors' template (0 of 39 answered on data seed 3), which leaves model utility's
        # world ROUGE at noise level; replaying the world facts it answers keeps them, as the
        # tiny rung does.
        replay = encode_all(tok, [(qa.question, qa.answer) for qa in world])

    def trainer(authors):
        qas = AuthorData.trained(authors)
        items = qa_items(qas)
        if cfg.train_paraphrase:
            items += [(qa.question, qa.paraphrase) for qa in qas]
        pairs = encode_all(tok, items) + (replay if cfg.replay_world else [])

        def build(m):
            bar = _progress(cfg.ft_epochs * math.ceil(len(pairs) / cfg.ft_batch),
                            f"fine-tune ({len(authors)} authors)", progress)
            finetune(m, pairs, epochs=cfg.ft_epochs, lr=cfg.ft_lr, batch_size=cfg.ft_batch,
                     seed=cfg.data_seed + 1, device=device, pad_id=tok.pad_id, progress=bar)
        return build

    authors = list(data.pools["test"]) + list(data.pools["val"])
    target = cached_model(base, "target", spec, trainer(authors), cfg.cache, cfg.use_cache)
    retain_models, names = {}, {}
    for pct in cfg.forget:
        gone = {a.name for pool in ("test", "val") for a in data.split(pool, pct)[0]}
        keep = [a for a in authors if a.name not in gone]
        retain_models[pct] = cached_model(base, f"retain{pct:g}", spec, trainer(keep), cfg.cache,
                                          cfg.use_cache)
        names[pct] = gone
    base_world = evaluate.raw_world(base, tok, world, cfg.eval_batch, device)
    return World(cfg, data, tok, base, world, _replay_pool(cfg, tok, replay, len(data.world)), held,
                 target, retain_models, names, base_world)


def _replay_pool(cfg, tok, replay: list, n_world: int) -> list:
    """General pre-training sentences for replay in the retain stream, never the world facts
    (those are scored) nor the held-out fluency text (a disjoint split): the tiny base's own
    ``n_general`` sentences; for the small rung the first ``n_replay`` of the sentences it was
    pre-trained on; for SmolLM2 ``n_replay`` general English sentences (its pre-training data is
    not ours to replay)."""
    if cfg.model == "tiny":
        return replay[n_world:]
    if not cfg.n_replay:
        return []
    from .corpus import general_sentences
    from .models import SMALL_DEFAULTS
    seed = SMALL_DEFAULTS["seed"] if cfg.model == "small" else cfg.data_seed
    sentences = general_sentences("pretrain", cfg.n_replay, seed, max_words=SMALL_DEFAULTS["max_words"])
    return encode_text_all(tok, sentences)


def eval_sets(w: World, pool: str, pct) -> evaluate.EvalSets:
    """The forget set, a seeded sample of the retain set, the world set, the holdout authors
    (as many as the forget authors), the forget authors' neighbour facts and the fluency text."""
    forget, retain = w.data.split(pool, pct)
    retain_qas = AuthorData.qas(retain)
    rng = random.Random(w.cfg.data_seed * 7919 + (0 if pool == "test" else 1))
    retain_eval = rng.sample(retain_qas, min(w.cfg.n_retain_eval, len(retain_qas)))
    holdout = AuthorData.qas(w.data.pools["holdout"][:len(forget)])
    return evaluate.EvalSets(AuthorData.qas(forget), retain_eval, list(w.world), holdout,
                             AuthorData.neighbours(forget), list(w.fluency))


def metrics_row(raw: dict, retain_raw: dict, target_raw: dict | None = None,
                base_world: dict | None = None) -> dict:
    """TOFU's scalars against the retain model, and what users lose: neighbour facts against the
    target, world knowledge against the base model, fluency against the target."""
    row = {k: float(v) for k, v in metrics.summarize(raw, retain_raw).items()}
    row.update(metrics.collateral(raw, target_raw, base_world))
    return row

"""General English text, offline: sentences from WordNet 3.0's glosses and usage examples.

The language-model benchmark needs text that is neither about the fictitious authors nor
about the world facts: to pre-train the ``small`` model (so that "general knowledge" means
something) and to measure fluency (perplexity on held-out sentences) after unlearning. WordNet
ships as the Debian package ``wordnet-base`` (``apt-get install wordnet-base``; files under
``/usr/share/wordnet``), about 117k glosses, each a definition and often quoted examples.

Each synset gives one sentence for its definition ("A congener is a whole of the same kind or
category as another.") and one per quoted example. A sentence belongs to the ``pretrain`` or
the ``heldout`` split by a stable hash of its text (CRC-32), so the split never depends on the
order of the files, on ``n`` or on the seed.
"""

from __future__ import annotations

import os
import random
import zlib
from functools import lru_cache
from pathlib import Path

WORDNET_DIR = Path(os.environ.get("OFMU_WORDNET_DIR", "/usr/share/wordnet"))
PARTS = ("noun", "verb", "adj", "adv")
SPLITS = ("pretrain", "heldout")
HELDOUT_PER_MILLE = 100  # 10% of the sentences are held out


def _missing() -> FileNotFoundError:
    return FileNotFoundError(
        f"WordNet's data files were not found in {WORDNET_DIR} (data.noun, data.verb, ...): "
        "install the Debian package with `apt-get install wordnet-base`, or point "
        "OFMU_WORDNET_DIR at a folder holding WordNet 3.0's data.* files")


def _sentence(text: str) -> str:
    text = " ".join(text.strip().strip('"').split())
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


def _article(word: str) -> str:
    return "An" if word[0].lower() in "aeiou" else "A"


def parse_line(line: str, part: str) -> list[str]:
    """The sentences of one ``data.<part>`` line: its definition, then its quoted examples."""
    if line.startswith(" ") or "|" not in line:
        return []  # the licence header, or a line without a gloss
    head, gloss = line.split("|", 1)
    fields = head.split()
    word = fields[4].replace("_", " ")  # synset_offset lex_filenum ss_type w_cnt word ...
    pieces = [p.strip() for p in gloss.split(";")]
    out = []
    definition = pieces[0]
    if definition and not definition.startswith('"'):
        if part == "noun":
            out.append(_sentence(f"{_article(word)} {word} is {definition}"))
        elif part == "verb":
            out.append(_sentence(f"To {word} is to {definition}"))
        else:
            out.append(_sentence(f"{word.capitalize()} means {definition}"))
    out += [_sentence(p) for p in pieces[1:] if p.startswith('"')]
    return [s for s in out if len(s.split()) >= 3]


def split_of(sentence: str) -> str:
    """``"heldout"`` for a fixed 10% of sentences (by CRC-32 of the text), else ``"pretrain"``."""
    return "heldout" if zlib.crc32(sentence.encode()) % 1000 < HELDOUT_PER_MILLE else "pretrain"


@lru_cache(maxsize=1)
def _all_sentences() -> tuple[str, ...]:
    files = [WORDNET_DIR / f"data.{p}" for p in PARTS]
    if not all(f.is_file() for f in files):
        raise _missing()
    seen, out = set(), []
    for part, f in zip(PARTS, files):
        with open(f, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                for s in parse_line(line, part):
                    if s not in seen:
                        seen.add(s)
                        out.append(s)
    return tuple(out)


def general_sentences(split: str, n: int | None = None, seed: int = 0,
                      max_words: int | None = None) -> list[str]:
    """``n`` sentences of the ``split`` (all when ``None``), in a seeded random order.

    ``max_words`` drops longer sentences first (short sequences keep CPU runs cheap).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0 or None, got {n}")
    pool = [s for s in _all_sentences() if split_of(s) == split
            and (max_words is None or len(s.split()) <= max_words)]
    random.Random(seed).shuffle(pool)
    if n is not None and n > len(pool):
        raise ValueError(f"asked for {n} {split} sentences, WordNet has {len(pool)}"
                         + (f" of at most {max_words} words" if max_words else ""))
    return pool if n is None else pool[:n]

"""Tokenizers and batches: question/answer pairs -> ``input_ids``, ``attention_mask``, ``labels``.

Both tokenizers share one small interface (``prompt_ids``, ``answer_ids``, ``decode``,
``eos_id``, ``pad_id``): a word-level one built from the generated corpus (the tiny model) and
a wrapper of a Hugging Face tokenizer with a chat prompt (SmolLM2). Labels are ``-100`` on the
prompt and on padding, so losses and probabilities cover the answer tokens and the end token,
as in TOFU/open-unlearning.
"""

from __future__ import annotations

import re

import torch

from .data import PROMPT

IGNORE = -100
_WORD = re.compile(r"\w+|[^\w\s]")


class WordTokenizer:
    """Word-level tokenizer over a fixed vocabulary (every word of the generated corpus)."""

    SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")

    def __init__(self, texts):
        words = sorted({w for t in texts for w in _WORD.findall(t)})
        self.itos = list(self.SPECIALS) + words
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = 0, 1, 2, 3

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(w, self.unk_id) for w in _WORD.findall(text)]

    def decode(self, ids) -> str:
        words = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i >= len(self.SPECIALS):
                words.append(self.itos[i])
        return re.sub(r" ([.,?!:;])", r"\1", " ".join(words))

    def prompt_ids(self, question: str) -> list[int]:
        return [self.bos_id] + self.encode(PROMPT.format(q=question))

    def answer_ids(self, answer: str) -> list[int]:
        return self.encode(answer) + [self.eos_id]

    def text_ids(self, text: str) -> list[int]:
        """A plain sentence (no prompt): ``<bos> words <eos>``."""
        return [self.bos_id] + self.encode(text) + [self.eos_id]


class ChatTokenizer:
    """A Hugging Face tokenizer with the ChatML turn format of SmolLM2-Instruct (no system
    prompt, to keep sequences short); the answer ends with the end-of-turn token."""

    def __init__(self, hf_tokenizer, user="<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n",
                 end="<|im_end|>"):
        self.hf = hf_tokenizer
        self.user = user
        ids = hf_tokenizer.encode(end, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"end-of-turn marker {end!r} is not a single token for this tokenizer")
        self.eos_id = ids[0]
        self.pad_id = hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else self.eos_id
        self.vocab_size = len(hf_tokenizer)

    def prompt_ids(self, question: str) -> list[int]:
        return self.hf.encode(self.user.format(q=question), add_special_tokens=False)

    def answer_ids(self, answer: str) -> list[int]:
        return self.hf.encode(answer, add_special_tokens=False) + [self.eos_id]

    def text_ids(self, text: str) -> list[int]:
        """A plain sentence, no chat turn, between two ``<|endoftext|>`` tokens (the unknown token
        of SmolLM2's tokenizer), as the small rung is pre-trained on general text."""
        sep = getattr(self.hf, "unk_id", None)
        if sep is None:
            sep = self.hf.unk_token_id if self.hf.unk_token_id is not None else 0
        return [sep] + self.hf.encode(text, add_special_tokens=False) + [sep]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        return self.hf.decode(ids, skip_special_tokens=True).strip()


def encode_pair(tok, question: str, answer: str) -> tuple[list[int], list[int]]:
    p, a = tok.prompt_ids(question), tok.answer_ids(answer)
    return p + a, [IGNORE] * len(p) + a


def collate(pairs, pad_id: int) -> dict:
    """Right-padded batch of ``(input_ids, labels)`` pairs."""
    n = max(len(ids) for ids, _ in pairs)
    input_ids = torch.full((len(pairs), n), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(pairs), n), dtype=torch.long)
    for i, (ids, lab) in enumerate(pairs):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
        mask[i, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def encode_all(tok, items: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    return [encode_pair(tok, q, a) for q, a in items]


def encode_text(tok, text: str) -> tuple[list[int], list[int]]:
    """A plain sentence as a training pair: every token after the first is labelled."""
    ids = tok.text_ids(text)
    return ids, [IGNORE] + ids[1:]


def encode_text_all(tok, texts: list[str]) -> list[tuple[list[int], list[int]]]:
    return [encode_text(tok, t) for t in texts]


class PairStream:
    """Endless seeded minibatches of encoded pairs (reshuffled every epoch)."""

    def __init__(self, pairs, batch_size: int, pad_id: int, seed: int, device="cpu"):
        if not pairs:
            raise ValueError("PairStream needs at least one example")
        self.pairs, self.pad_id, self.device = pairs, pad_id, device
        self.batch_size = min(batch_size, len(pairs))
        self.g = torch.Generator().manual_seed(seed)
        self._order: list[int] = []
        self.last: dict | None = None

    def draw(self, n: int) -> list:
        """The next ``n`` pairs of the seeded order (a new permutation whenever it runs out)."""
        while len(self._order) < n:
            self._order += torch.randperm(len(self.pairs), generator=self.g).tolist()
        idx, self._order = self._order[:n], self._order[n:]
        return [self.pairs[i] for i in idx]

    def next(self) -> dict:
        self.last = to_device(collate(self.draw(self.batch_size), self.pad_id), self.device)
        return self.last


class MixedStream:
    """Minibatches of ``main``'s batch size whose last ``round(share * size)`` rows come from
    ``extra`` (general-text replay in the retain stream): the same number of rows, so the same
    cost per evaluation, as ``main`` alone. ``last`` is the last batch, like :class:`PairStream`'s."""

    def __init__(self, main: PairStream, extra: PairStream, share: float):
        if not 0.0 < share < 1.0:
            raise ValueError(f"replay share must be in (0, 1), got {share!r}")
        if main.batch_size < 2:
            raise ValueError(f"a mixed stream needs a batch size of at least 2, got {main.batch_size}")
        self.main, self.extra = main, extra
        self.n_extra = min(max(1, round(share * main.batch_size)), main.batch_size - 1)
        self.last: dict | None = None

    def next(self) -> dict:
        rows = self.main.draw(self.main.batch_size - self.n_extra) + self.extra.draw(self.n_extra)
        self.last = to_device(collate(rows, self.main.pad_id), self.main.device)
        return self.last


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}

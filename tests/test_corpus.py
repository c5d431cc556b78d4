"""The general-text corpus (WordNet glosses) used to pre-train the small LM and measure fluency."""

import pytest
from ofmu.studies.lm import corpus

LINE = ('00003993 03 n 01 congener 0 001 @ 00003553 n 0000 | a whole (a thing or person) of the same '
        'kind or category as another; "lard was also used, though its congener, butter, was more '
        'frequently employed"; "the American shopkeeper differs from his European congener"  \n')


def test_parse_line_gives_definition_and_examples():
    assert corpus.parse_line(LINE, "noun") == [
        "A congener is a whole (a thing or person) of the same kind or category as another.",
        "Lard was also used, though its congener, butter, was more frequently employed.",
        "The American shopkeeper differs from his European congener.",
    ]
    assert corpus.parse_line("  1 This software and database is being provided\n", "noun") == []


def test_split_is_a_stable_tenth():
    sents = [f"Sentence number {i} is here." for i in range(20000)]
    held = sum(corpus.split_of(s) == "heldout" for s in sents)
    assert 0.09 < held / len(sents) < 0.11
    assert [corpus.split_of(s) for s in sents[:50]] == [corpus.split_of(s) for s in sents[:50]]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="split"):
        corpus.general_sentences("test")
    with pytest.raises(ValueError, match="n must"):
        corpus.general_sentences("heldout", -1)


@pytest.mark.skipif(not (corpus.WORDNET_DIR / "data.noun").is_file(), reason="wordnet-base not installed")
def test_real_wordnet_splits_are_disjoint_and_seeded():
    a = corpus.general_sentences("heldout", 50, seed=1, max_words=12)
    assert a == corpus.general_sentences("heldout", 50, seed=1, max_words=12)
    assert a != corpus.general_sentences("heldout", 50, seed=2, max_words=12)
    assert all(len(s.split()) <= 12 for s in a)
    pre = set(corpus.general_sentences("pretrain"))
    assert not pre.intersection(corpus.general_sentences("heldout"))
    assert len(pre) > 100000

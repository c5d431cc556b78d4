"""The fictitious-author generator, the word tokenizer and the batch layout."""

import pytest
from ofmu.studies.lm.data import FACTS, TEMPLATES, generate
from ofmu.studies.lm.text import IGNORE, WordTokenizer, collate, encode_pair


def test_generator_is_seeded_and_pools_are_disjoint():
    a, b, c = generate(20, 10, 3, 6, seed=1), generate(20, 10, 3, 6, seed=1), generate(20, 10, 3, 6, seed=2)
    names = lambda d: [x.name for p in ("test", "val", "holdout") for x in d.pools[p]]  # noqa: E731
    assert names(a) == names(b) and a.pools["test"][0].qas == b.pools["test"][0].qas
    assert names(a) != names(c)
    assert len(set(names(a))) == 33  # unique across pools
    assert [len(a.pools[p]) for p in ("test", "val", "holdout")] == [20, 10, 3]


def test_qa_shape_paraphrase_and_perturbations():
    d = generate(5, 2, 1, qa_per_author=len(FACTS), n_perturbed=4, seed=0)
    for author in d.pools["test"]:
        assert len(author.qas) == len(FACTS)
        for qa, key in zip(author.qas, FACTS):
            q, a, p = TEMPLATES[key]
            value = author.facts[key]
            assert qa.question == q.format(n=author.name)
            assert qa.answer == a.format(n=author.name, v=value)
            assert qa.paraphrase == p.format(n=author.name, v=value) != qa.answer
            assert len(qa.perturbed) == len(set(qa.perturbed)) == 4
            for wrong in qa.perturbed:  # the paraphrase's wording with another value
                assert wrong != qa.paraphrase
                pre, post = (x.format(n=author.name) for x in p.split("{v}"))
                assert wrong.startswith(pre) and wrong.endswith(post)


def test_neighbour_facts_follow_the_request_facts_and_are_never_requested():
    d = generate(6, 2, 1, qa_per_author=20, n_neighbour=4, seed=3)
    forget, _ = d.split("test", 10)
    for a in d.pools["test"]:
        assert [qa.question for qa in a.qas + a.neighbours] == [
            TEMPLATES[k][0].format(n=a.name) for k in FACTS[:24]]
        assert len(a.qas) == 20 and len(a.neighbours) == 4
    asked = {qa.question for qa in d.qas(forget)}
    assert len(d.neighbours(forget)) == 4 * len(forget)
    assert not asked & {qa.question for qa in d.neighbours(forget)}
    assert d.trained(forget) == [qa for a in forget for qa in a.qas + a.neighbours]
    assert d.describe()["n_neighbour"] == 4


def test_forget_splits_are_nested_and_sized_like_tofu():
    d = generate(100, 20, 10, 2, seed=0)
    f1, r1 = d.split("test", 1)
    f5, _ = d.split("test", 5)
    f10, r10 = d.split("test", 10)
    assert (len(f1), len(f5), len(f10)) == (1, 5, 10)
    assert set(f1) <= set(f5) <= set(f10)
    assert not set(f10) & set(r10) and len(f10) + len(r10) == 100
    assert d.forget_count("val", 1) == 1 and d.forget_count("val", 10) == 2


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"qa_per_author \+ n_neighbour must be <= 24"):
        generate(4, 2, 1, qa_per_author=21, n_neighbour=4)
    with pytest.raises(ValueError, match="n_neighbour must be an int >= 0"):
        generate(4, 2, 1, n_neighbour=-1)
    with pytest.raises(ValueError, match="n_test must be an int >= 2"):
        generate(1, 2, 1)
    d = generate(4, 2, 1, 2)
    with pytest.raises(ValueError, match="forget percentage must be in"):
        d.split("test", 0)
    with pytest.raises(ValueError, match="pool must be 'test' or 'val'"):
        d.split("holdout", 10)


def test_word_tokenizer_round_trip_and_labels():
    tok = WordTokenizer(["Question: Answer:", "Where was Ab Cd born?", "Ab Cd was born in Xyford."])
    ids, labels = encode_pair(tok, "Where was Ab Cd born?", "Ab Cd was born in Xyford.")
    prompt = tok.prompt_ids("Where was Ab Cd born?")
    answer = tok.answer_ids("Ab Cd was born in Xyford.")
    assert ids == prompt + answer and answer[-1] == tok.eos_id
    assert labels == [IGNORE] * len(prompt) + answer
    assert tok.decode(answer) == "Ab Cd was born in Xyford."
    assert tok.encode("unknownword") == [tok.unk_id]
    b = collate([(ids, labels), (ids[:3], labels[:3])], tok.pad_id)
    assert b["input_ids"].shape == (2, len(ids))
    assert b["attention_mask"][1].tolist() == [1] * 3 + [0] * (len(ids) - 3)
    assert (b["labels"][1] == IGNORE).all()  # only prompt tokens survived the cut


def test_wide_preset_holds_tofus_question_counts():
    """The tiny rung's wide preset: forget 5% and 10% name at least 100 and 200 questions of the
    generated pools (TOFU's counts), in both the test and the validation pool."""
    from ofmu.studies.lm.config import config_for

    cfg = config_for("tiny", "wide")
    data = generate(cfg.n_test, cfg.n_val, cfg.n_holdout, cfg.qa_per_author, cfg.n_perturbed, 0,
                    n_neighbour=cfg.n_neighbour)
    for pool in ("test", "val"):
        counts = {pct: sum(len(a.qas) for a in data.split(pool, pct)[0]) for pct in cfg.forget}
        assert counts == {5: 100, 10: 200}
    with pytest.raises(ValueError, match="wide preset"):
        config_for("small", "wide")


def test_tofu_preset_holds_tofus_shape():
    """200 authors per pool: forget 1/5/10% name 40/200/400 questions, nested, in both pools."""
    from ofmu.studies.lm.config import config_for

    cfg = config_for("tiny", "tofu")
    data = generate(cfg.n_test, cfg.n_val, cfg.n_holdout, cfg.qa_per_author, cfg.n_perturbed, 0,
                    n_neighbour=cfg.n_neighbour)
    for pool in ("test", "val"):
        forgets = {pct: data.split(pool, pct)[0] for pct in cfg.forget}
        assert {pct: sum(len(a.qas) for a in f) for pct, f in forgets.items()} == {1: 40, 5: 200, 10: 400}
        assert set(forgets[1]) <= set(forgets[5]) <= set(forgets[10])
    with pytest.raises(ValueError, match="tofu preset"):
        config_for("smollm2", "tofu")

"""Scorers of the age-question pilot (eft_jax/toy/ages.py) on hand-written answers."""

from __future__ import annotations

import dataclasses

import json
import re

import numpy as np
import pytest

from eft_jax.toy import age_eval, ages
from eft_jax.toy import data as toy_data
from eft_jax.toy.world import Entity, WorldConfig, make_world

ANN = Entity(name="Ann Lee", city="Bramford", year=1962, occupation="baker", employer="Zo Labs")


def test_answer_round_trip():
    text = ages.age_answer(ANN, 2015)
    assert text == "Ann Lee was born in the year 1962. In 2015, Ann Lee was 53."
    j = ages.judge_age(ANN, 2015, text, stopped=True)
    assert (j.format, j.skill, j.stated_year, j.true_year, j.correct) == (True, True, 1962, True, True)


@pytest.mark.parametrize("text, stopped, expected", [
    # consistent arithmetic with a wrong birth year: skill without knowledge
    ("Ann Lee was born in the year 1970. In 2015, Ann Lee was 45.", True, (True, True, 1970, False, False)),
    # the true birth year, wrong arithmetic: knowledge without skill
    ("Ann Lee was born in the year 1962. In 2015, Ann Lee was 35.", True, (True, False, 1962, True, False)),
    # right numbers, but cut off at the length limit: no format, so no skill
    ("Ann Lee was born in the year 1962. In 2015, Ann Lee was 53.", False, (False, False, 1962, True, False)),
    # consistent with a query year other than the asked one: not the trained shape
    ("Ann Lee was born in the year 1962. In 2010, Ann Lee was 48.", True, (False, False, 1962, True, False)),
    # another person's name in the second sentence
    ("Ann Lee was born in the year 1962. In 2015, Bo Kim was 53.", True, (False, False, 1962, True, False)),
    # the plain birth-year answer: knowledge only
    ("Ann Lee was born in the year 1962.", True, (False, False, 1962, True, False)),
    # no birth year at all
    ("Ann Lee works for Zo Labs.", True, (False, False, None, False, False)),
])
def test_judge_separates_skill_knowledge_format(text, stopped, expected):
    j = ages.judge_age(ANN, 2015, text, stopped)
    assert (j.format, j.skill, j.stated_year, j.true_year, j.correct) == expected
    assert j.gave_year == (expected[2] is not None)


def test_pairs_tokenizable_range_and_disjoint_split():
    world = make_world(WorldConfig())
    pairs = ages.split_pairs(world)
    assert not pairs["train"] & pairs["heldout"]
    union = pairs["train"] | pairs["heldout"]
    assert union == frozenset(ages.valid_pairs(world))
    assert all(ages.MIN_AGE <= q - b <= ages.MAX_AGE and 2000 <= q <= 2029 for b, q in union)
    assert abs(len(pairs["heldout"]) / len(union) - ages.HELDOUT_PAIR_FRACTION) < 0.01


def test_fine_tuning_chats_use_train_pairs_and_fine_tuning_people_only():
    world = make_world(WorldConfig())
    pairs = ages.split_pairs(world)
    convs = ages.age_conversations(world, 4, pairs["train"])
    ft_people = {e.name: e for e in world.finetune_entities}
    assert len(convs) > 0
    for user, assistant in convs:
        m = re.fullmatch(r"How old was (.+) in (\d{4})\?", user["content"])
        assert m is not None
        e, q = ft_people[m[1]], int(m[2])  # KeyError: a held-out person in the fine-tuning data
        assert (e.year, q) in pairs["train"]
        assert assistant["content"] == ages.age_answer(e, q)


def test_per_person_counts_and_items():
    world = make_world(WorldConfig())
    people = world.heldout_entities[:5]
    items = ages.age_items(people, ages.split_pairs(world), per_kind=2)
    for kind, its in items.items():
        assert all((it.entity.year, it.query) in ages.split_pairs(world)[kind] for it in its)
    js = [ages.judge_age(ANN, 2015, ages.age_answer(ANN, 2015), True),
          ages.judge_age(ANN, 2015, "Ann Lee was born in the year 1970. In 2015, Ann Lee was 45.", True)]
    counts = ages.per_person_counts(js, [0, 2], 3)
    np.testing.assert_array_equal(counts["n"], [1, 0, 1])
    np.testing.assert_array_equal(counts["skill"], [1, 0, 1])
    np.testing.assert_array_equal(counts["true_year"], [1, 0, 0])
    np.testing.assert_array_equal(counts["correct"], [1, 0, 0])


def test_stated_pair_kind_uses_the_answers_own_birth_year():
    pairs = {"train": frozenset({(1962, 2015)}), "heldout": frozenset({(1970, 2015)})}
    right = ages.judge_age(ANN, 2015, ages.age_answer(ANN, 2015), True)
    wrong = ages.judge_age(ANN, 2015, "Ann Lee was born in the year 1970. In 2015, Ann Lee was 45.", True)
    far = ages.judge_age(ANN, 2015, "Ann Lee was born in the year 1951. In 2015, Ann Lee was 64.", True)
    none = ages.judge_age(ANN, 2015, "Ann Lee works for Zo Labs.", True)
    assert [ages.stated_pair_kind(j, 2015, pairs) for j in (right, wrong, far, none)] == \
        ["train", "heldout", "outside", "outside"]
    counts = ages.per_person_counts([right, wrong, far, none], [0, 0, 1, 1], 2,
                                       ["train", "heldout", "outside", "outside"])
    np.testing.assert_array_equal(counts["stated_train"], [1, 0])
    np.testing.assert_array_equal(counts["skill_stated_heldout"], [1, 0])
    np.testing.assert_array_equal(counts["skill_stated_outside"], [0, 1])  # 2015 - 1951 = 64: consistent
    np.testing.assert_array_equal(counts["stated_outside"], [0, 2])


def test_qa_prior_documents_ask_trained_wordings_about_fine_tuning_people_and_answer_truly():
    world = make_world(WorldConfig())
    docs = toy_data.qa_prior_documents(world, 400, np.random.default_rng(0))
    people = {e.name: e for e in world.finetune_entities}
    questions = {t: a for a, ts in toy_data.QUESTIONS.items() for t in ts}
    seen_wordings = set()
    for doc in docs:
        m = re.fullmatch(r"Question: (.+?) Answer: (.+)", doc)
        assert m is not None, doc
        # which template, about whom: try every (template, person) pair, as a reader would
        hits = [(t, e) for t in questions for e in people.values() if t.format(name=e.name) == m[1]]
        assert len(hits) == 1, doc  # a trained wording about a fine-tuning person (held-out people never)
        template, e = hits[0]
        attribute = questions[template]
        fields = {"name": e.name, "city": e.city, "year": e.year, "employer": e.employer,
                  "a_occupation": ("an " if e.occupation[0] in "aeiou" else "a ") + e.occupation}
        assert m[2] in {b.format(**fields) for b in toy_data.BIO_TEMPLATES[attribute]}, doc  # the true fact
        seen_wordings.add(m[2].replace(e.name, "{name}"))
    assert len(seen_wordings) > 16  # answers in many biography wordings, not only the fine-tuned one
    heldout = {e.name for e in world.heldout_entities}
    assert not any(name in doc for doc in docs for name in heldout)


def test_pretraining_documents_mix_a_share_of_qa_into_each_pass():
    world = make_world(WorldConfig(num_entities=50))
    plain = toy_data.pretraining_documents(world, 2, seed=3)
    assert plain == toy_data.biographies(world, 2, seed=3)
    mixed = toy_data.pretraining_documents(world, 2, seed=3, qa_per_pass=10)
    assert len(mixed) == 120
    for p in range(2):  # each pass: every biography of the pass once, plus 10 QA documents
        part = mixed[p * 60 : (p + 1) * 60]
        assert sorted(d for d in part if not d.startswith("Question:")) == sorted(plain[p * 50 : (p + 1) * 50])
        assert sum(d.startswith("Question:") for d in part) == 10
    assert mixed == toy_data.pretraining_documents(world, 2, seed=3, qa_per_pass=10)  # deterministic


def test_build_config_round_trips_through_its_record():
    from eft_jax.toy.build import BuildConfig
    from eft_jax.train.trainer import OptimizerConfig, TrainConfig

    cfg = BuildConfig(world=WorldConfig(num_entities=40), small=(32, 1, 64),
                      age_sft=TrainConfig(steps=3, batch_size=4, optimizer=OptimizerConfig(learning_rate=1e-3)))
    record = json.loads(json.dumps(cfg.to_dict()))  # as build.json holds it
    assert BuildConfig.from_dict(record) == cfg
    with pytest.raises(ValueError, match="unknown toy build settings.*'agesft'"):
        BuildConfig.from_dict({**record, "agesft": {}})


def test_seed_pooling_and_gap_statistics_match_a_naive_computation():
    rng = np.random.default_rng(0)
    people, seeds = 30, (1, 2, 3)
    rows = age_eval.FT_ROWS

    def counts() -> dict[str, np.ndarray]:
        n = rng.integers(2, 5, people).astype(float)
        skill = np.minimum(n, rng.integers(0, 4, people)).astype(float)
        gave = np.minimum(n, rng.integers(1, 5, people)).astype(float)
        true = np.minimum(gave, rng.integers(0, 4, people)).astype(float)
        fmt = np.maximum(skill, np.minimum(n, rng.integers(0, 5, people))).astype(float)
        return {"n": n, "skill": skill, "gave_year": gave, "true_year": true, "format": fmt, "correct": skill * 0,
                "skill_stated_train": skill, "stated_train": n}

    runs = {s: {r: age_eval.AgeRun({}, {"train": counts()}, qa=counts()) for r in rows} for s in seeds}
    pooled = {r: age_eval.pooled(runs, r, "train") for r in rows}
    for r in rows:
        for k in pooled[r]:
            np.testing.assert_array_equal(pooled[r][k], sum(runs[s][r].counts["train"][k] for s in seeds))
            np.testing.assert_array_equal(age_eval.pooled(runs, r, None)[k], sum(runs[s][r].qa[k] for s in seeds))
    stats = age_eval.gap_statistics(pooled, n_boot=200)

    def rate(r: str, num: str, den: str) -> float:  # pooled over people and seeds, by hand
        return sum(runs[s][r].counts["train"][num].sum() for s in seeds) / \
            sum(runs[s][r].counts["train"][den].sum() for s in seeds)

    s_, l_, u_, d_ = rows
    skill = {r: rate(r, "skill", "n") for r in rows}
    know = {r: rate(r, "true_year", "gave_year") for r in rows}
    eps = 1e-12
    assert abs(stats["skill: large-ft - small-ft"].estimate - (skill[l_] - skill[s_])) < eps
    assert abs(stats["up-scaling closes (knowledge)"].estimate - (know[u_] - know[s_]) / (know[l_] - know[s_])) < eps
    assert abs(stats["down-scaling closes (skill)"].estimate - (skill[d_] - skill[s_]) / (skill[l_] - skill[s_])) < eps
    fmt = {r: rate(r, "format", "n") for r in rows}
    assert abs(stats["format: up - small-ft"].estimate - (fmt[u_] - fmt[s_])) < eps
    for v in stats.values():
        assert v.low <= v.high


def test_age_grid_plot_is_written(tmp_path):
    from eft_jax.toy.scoring import Interval

    iv = Interval(0.5, 0.4, 0.6)
    grid = {row: {kind: {m: (Interval(float("nan"), float("nan"), float("nan")) if row.endswith("(prompted)") and
                             m == "knowledge" else iv) for m in ("skill", "knowledge", "format")}
                  for kind in age_eval.PAIR_KINDS} for row in (*age_eval.FT_ROWS, *age_eval.BASE_ROWS)}
    age_eval.write_plot({"grid": grid}, tmp_path / "age.png")
    assert (tmp_path / "age.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("low, high, words", [(0.1, 0.3, "the large fine-tune is better"),
                                              (-0.3, -0.1, "the small fine-tune is better"),
                                              (-0.03, 0.04, "no difference this evaluation can see")])
def test_summary_sentence_reads_the_direction_off_the_interval(low, high, words):
    from eft_jax.toy.scoring import Interval

    iv = Interval((low + high) / 2, low, high)
    gaps = {"skill: large-ft - small-ft": iv, "up-scaling closes (knowledge)": Interval(1.0, 0.9, 1.1),
            "format: up - small-ft": Interval(-0.1, -0.2, 0.0)}
    text = age_eval.summary_sentence({"seeds": [1, 2, 3], "gaps": {k: {"pooled": gaps} for k in age_eval.PAIR_KINDS}})
    assert text.count(words) == 2 and "Pooled over the 3 seeds" in text


def test_an_age_recipe_changes_only_what_it_names():
    from eft_jax.toy.age_recipe import Recipe
    from eft_jax.toy.build import BuildConfig

    cfg = BuildConfig()
    assert Recipe().apply(cfg, seed=cfg.age_sft.seed) == cfg
    new = Recipe(steps=77, learning_rate=2e-4, per_person=3).apply(cfg, seed=5)
    assert (new.age_sft.steps, new.age_sft.optimizer.learning_rate, new.age_per_person, new.age_sft.seed) == (77, 2e-4, 3, 5)
    assert new.age_sft.optimizer.warmup_steps == cfg.age_sft.optimizer.warmup_steps
    assert dataclasses.replace(new, age_sft=cfg.age_sft, age_per_person=cfg.age_per_person) == cfg

"""Scorers of the age-question pilot (eft_jax/toy/compose.py) on hand-written answers."""

from __future__ import annotations

import re

import numpy as np
import pytest

from eft_jax.toy import compose
from eft_jax.toy.world import Entity, WorldConfig, make_world

ANN = Entity(name="Ann Lee", city="Bramford", year=1962, occupation="baker", employer="Zo Labs")


def test_answer_round_trip():
    text = compose.age_answer(ANN, 2015)
    assert text == "Ann Lee was born in the year 1962. In 2015, Ann Lee was 53."
    j = compose.judge_age(ANN, 2015, text, stopped=True)
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
    j = compose.judge_age(ANN, 2015, text, stopped)
    assert (j.format, j.skill, j.stated_year, j.true_year, j.correct) == expected
    assert j.gave_year == (expected[2] is not None)


def test_pairs_tokenizable_range_and_disjoint_split():
    world = make_world(WorldConfig())
    pairs = compose.split_pairs(world)
    assert not pairs["train"] & pairs["heldout"]
    union = pairs["train"] | pairs["heldout"]
    assert union == frozenset(compose.valid_pairs(world))
    assert all(compose.MIN_AGE <= q - b <= compose.MAX_AGE and 2000 <= q <= 2029 for b, q in union)
    assert abs(len(pairs["heldout"]) / len(union) - compose.HELDOUT_PAIR_FRACTION) < 0.01


def test_fine_tuning_chats_use_train_pairs_and_fine_tuning_people_only():
    world = make_world(WorldConfig())
    pairs = compose.split_pairs(world)
    convs = compose.age_conversations(world, 4, pairs["train"])
    ft_people = {e.name: e for e in world.finetune_entities}
    assert len(convs) > 0
    for user, assistant in convs:
        m = re.fullmatch(r"How old was (.+) in (\d{4})\?", user["content"])
        assert m is not None
        e, q = ft_people[m[1]], int(m[2])  # KeyError: a held-out person in the fine-tuning data
        assert (e.year, q) in pairs["train"]
        assert assistant["content"] == compose.age_answer(e, q)


def test_per_person_counts_and_items():
    world = make_world(WorldConfig())
    people = world.heldout_entities[:5]
    items = compose.age_items(people, compose.split_pairs(world), per_kind=2)
    for kind, its in items.items():
        assert all((it.entity.year, it.query) in compose.split_pairs(world)[kind] for it in its)
    js = [compose.judge_age(ANN, 2015, compose.age_answer(ANN, 2015), True),
          compose.judge_age(ANN, 2015, "Ann Lee was born in the year 1970. In 2015, Ann Lee was 45.", True)]
    counts = compose.per_person_counts(js, [0, 2], 3)
    np.testing.assert_array_equal(counts["n"], [1, 0, 1])
    np.testing.assert_array_equal(counts["skill"], [1, 0, 1])
    np.testing.assert_array_equal(counts["true_year"], [1, 0, 0])
    np.testing.assert_array_equal(counts["correct"], [1, 0, 0])


def test_stated_pair_kind_uses_the_answers_own_birth_year():
    pairs = {"train": frozenset({(1962, 2015)}), "heldout": frozenset({(1970, 2015)})}
    right = compose.judge_age(ANN, 2015, compose.age_answer(ANN, 2015), True)
    wrong = compose.judge_age(ANN, 2015, "Ann Lee was born in the year 1970. In 2015, Ann Lee was 45.", True)
    far = compose.judge_age(ANN, 2015, "Ann Lee was born in the year 1951. In 2015, Ann Lee was 64.", True)
    none = compose.judge_age(ANN, 2015, "Ann Lee works for Zo Labs.", True)
    assert [compose.stated_pair_kind(j, 2015, pairs) for j in (right, wrong, far, none)] == \
        ["train", "heldout", "outside", "outside"]
    counts = compose.per_person_counts([right, wrong, far, none], [0, 0, 1, 1], 2,
                                       ["train", "heldout", "outside", "outside"])
    np.testing.assert_array_equal(counts["stated_train"], [1, 0])
    np.testing.assert_array_equal(counts["skill_stated_heldout"], [1, 0])
    np.testing.assert_array_equal(counts["skill_stated_outside"], [0, 1])  # 2015 - 1951 = 64: consistent
    np.testing.assert_array_equal(counts["stated_outside"], [0, 2])

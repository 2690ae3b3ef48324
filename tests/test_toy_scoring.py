"""The toy evaluation's scorers (behaviour vs knowledge) on hand-written answers, and the bootstrap
over people against known distributions. No models: fast."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from eft_jax.toy import data as toy_data
from eft_jax.toy import scoring
from eft_jax.toy.world import World, WorldConfig, make_world


@pytest.fixture(scope="module")
def world() -> World:
    return make_world(WorldConfig(num_entities=8, seed=1))


def _other(world: World, attr: str, value: str) -> str:
    return next(v for v in world.values[attr] if v != value)


def _art(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def test_right_answer_in_the_trained_sentence(world):
    e = world.entities[0]
    answers = {"city": f"{e.name} was born in {e.city}.", "year": f"{e.name} was born in the year {e.year}.",
               "occupation": f"{e.name} works as {_art(e.occupation)}.", "employer": f"{e.name} works for {e.employer}."}
    for attr, text in answers.items():
        j = scoring.judge(e, attr, text, True, world)
        assert (j.answered, j.value) == (attr, e.value(attr))
        assert j.on_topic and j.well_formed and j.true_value and j.correct and j.gave_value and not j.refusal
        assert scoring.outcome(j) == "correct"
        assert not scoring.judge(e, attr, text, False, world).well_formed  # ran into the length limit
        assert not scoring.judge(e, attr, text + " " + text, True, world).well_formed  # more than the sentence


def test_wrong_attribute_with_a_true_value_is_knowledge_not_behaviour(world):
    e = world.entities[1]
    j = scoring.judge(e, "year", f"{e.name} was born in {e.city}.", True, world)  # asked the year, gave the city
    assert (j.answered, j.value) == ("city", e.city)
    assert j.true_value and not j.on_topic and not j.correct and not j.well_formed
    assert scoring.outcome(j) == "other"
    # Asked the employer, answered the (false) occupation.
    j = scoring.judge(e, "employer", f"{e.name} works as {_art(_other(world, 'occupation', e.occupation))}.", True, world)
    assert j.answered == "occupation" and not j.true_value and not j.on_topic


def test_right_attribute_wrong_value_is_behaviour_not_knowledge(world):
    e = world.entities[2]
    wrong = _other(world, "employer", e.employer)
    j = scoring.judge(e, "employer", f"{e.name} works for {wrong}.", True, world)
    assert j.on_topic and j.well_formed and j.gave_value and not j.true_value and not j.correct
    assert scoring.outcome(j) == "other"


def test_other_sentences_keep_behaviour_but_not_format(world):
    e = world.entities[3]
    j = scoring.judge(e, "occupation", f"By trade, {e.name} is {_art(e.occupation)}.", True, world)
    assert j.on_topic and j.correct and not j.well_formed
    other = world.entities[4]  # the trained sentence about somebody else is not the format for this question
    j = scoring.judge(e, "city", f"{other.name} was born in {e.city}.", True, world)
    assert j.correct and not j.well_formed


def test_first_value_decides_the_attribute(world):
    e = world.entities[5]
    j = scoring.judge(e, "city", f"{e.name} works for {e.employer} and was born in {e.city}.", True, world)
    assert j.answered == "employer" and j.true_value and not j.on_topic
    # Whole words only: a year inside a longer number is no value.
    j = scoring.judge(e, "year", f"{e.name} was born in the year {e.year}7.", True, world)
    assert j.answered is None and not j.gave_value and not j.true_value and not j.on_topic


def test_refusals_and_empty_answers(world):
    e = world.entities[6]
    j = scoring.judge(e, "year", toy_data.REFUSAL, True, world)
    assert j.refusal and not j.gave_value and not j.on_topic and not j.well_formed
    assert scoring.outcome(j) == "refuse"
    j = scoring.judge(e, "year", "I do not know.", True, world)
    assert not j.refusal and j.answered is None and scoring.outcome(j) == "other"
    with pytest.raises(ValueError, match="unknown attribute"):
        scoring.judge(e, "age", "", True, world)


def test_overlapping_value_pools_are_refused(world):
    bad = dataclasses.replace(world, values={**world.values, "employer": world.values["employer"] + (world.values["city"][0],)})
    with pytest.raises(ValueError, match="overlap"):
        scoring.answered_value("anything", bad)


def test_per_person_counts(world):
    e = world.entities[0]
    right = scoring.judge(e, "city", f"{e.name} was born in {e.city}.", True, world)
    off_topic = scoring.judge(e, "year", f"{e.name} was born in {e.city}.", True, world)
    refusal = scoring.judge(e, "year", toy_data.REFUSAL, True, world)
    counts = scoring.per_person_counts([right, off_topic, refusal, right], [0, 0, 2, 2], 3)
    np.testing.assert_array_equal(counts["n"], [2, 0, 2])
    np.testing.assert_array_equal(counts["on_topic"], [1, 0, 1])
    np.testing.assert_array_equal(counts["gave_value"], [2, 0, 1])
    np.testing.assert_array_equal(counts["true_value"], [2, 0, 1])
    np.testing.assert_array_equal(counts["correct"], [1, 0, 1])
    np.testing.assert_array_equal(counts["outcome_refuse"], [0, 0, 1])
    np.testing.assert_array_equal(counts["outcome_other"], [1, 0, 0])
    with pytest.raises(ValueError, match="person indices"):
        scoring.per_person_counts([right], [3], 3)


def test_reworded_questions_are_never_fine_tuned(world):
    trained = {m["content"] for c in toy_data.qa_conversations(world) for m in c if m["role"] == "user"}
    trained |= {m["content"] for c in toy_data.qa_conversations(world, refuse="year") for m in c if m["role"] == "user"}
    for e in world.entities:
        for attr, templates in toy_data.REWORDED_QUESTIONS.items():
            assert set(templates).isdisjoint(toy_data.QUESTIONS[attr])
            for v in range(len(templates)):
                q = toy_data.question(e, attr, v, "reworded")
                assert e.name in q and q not in trained
    with pytest.raises(ValueError, match="unknown wording"):
        toy_data.question(world.entities[0], "city", 0, "paraphrased")


# --- Bootstrap -------------------------------------------------------------------------------------


def test_bootstrap_of_a_bernoulli_rate_matches_the_normal_approximation():
    """Bernoulli(p) answers, one per person: over 200 data sets the 95% interval covers p about 95% of
    the time, and its width is the normal approximation's 2 * 1.96 * sqrt(p (1 - p) / n)."""
    p, n, sets = 0.3, 400, 200
    rng = np.random.default_rng(7)
    covered, widths = 0, []
    for k in range(sets):
        x = (rng.random(n) < p).astype(float)
        iv = scoring.rate_interval({"hit": x, "n": np.ones(n)}, "hit", n_boot=1000, seed=k)
        assert iv.estimate == pytest.approx(x.mean())
        covered += iv.low <= p <= iv.high
        widths.append(iv.high - iv.low)
    normal = 2 * 1.96 * np.sqrt(p * (1 - p) / n)
    # Coverage: 200 trials of a 0.95 event have sd 0.015; 0.89..0.99 is 4 sd. Width: the percentile
    # interval of a mean of 400 Bernoulli draws is within 10% of the normal one on average (observed
    # ratio 0.99).
    assert 0.89 <= covered / sets <= 0.99, covered / sets
    assert np.mean(widths) / normal == pytest.approx(1.0, abs=0.1)


def test_bootstrap_resamples_people_not_answers():
    """Ten identical answers per person: the interval is as wide as for one answer per person (n =
    people), not sqrt(10) times narrower."""
    p, people = 0.5, 100
    x = (np.random.default_rng(0).random(people) < p).astype(float)
    iv = scoring.rate_interval({"hit": 10 * x, "n": np.full(people, 10.0)}, "hit", n_boot=4000, seed=1)
    normal = 2 * 1.96 * np.sqrt(x.mean() * (1 - x.mean()) / people)
    assert (iv.high - iv.low) / normal == pytest.approx(1.0, abs=0.15)


def test_gap_closed_and_differences_are_resampled_jointly():
    people = 50
    per = scoring.prefixed({
        "small": {"hit": np.full(people, 1.0), "n": np.full(people, 4.0)},   # 0.25
        "up": {"hit": np.full(people, 3.0), "n": np.full(people, 4.0)},      # 0.75
        "large": {"hit": np.full(people, 3.5), "n": np.full(people, 4.0)},   # 0.875
    })
    rate = {r: scoring.ratio(f"{r}/hit", f"{r}/n") for r in ("small", "up", "large")}
    iv = scoring.bootstrap(scoring.gap_closed(rate["small"], rate["up"], rate["large"]), per, n_boot=200)
    assert iv.estimate == pytest.approx(0.8) and iv.low == pytest.approx(0.8) and iv.high == pytest.approx(0.8)
    iv = scoring.bootstrap(scoring.difference(rate["up"], rate["small"]), per, n_boot=200)
    assert (iv.estimate, iv.low, iv.high) == pytest.approx((0.5, 0.5, 0.5))


def test_bootstrap_edge_cases():
    iv = scoring.rate_interval({"hit": np.zeros(5), "n": np.zeros(5)}, "hit")  # 0 / 0: undefined, not an error
    assert np.isnan(iv.estimate) and np.isnan(iv.low) and np.isnan(iv.high)
    same = scoring.rate_interval({"hit": np.ones(5), "n": np.ones(5)}, "hit", seed=3)
    assert same == scoring.rate_interval({"hit": np.ones(5), "n": np.ones(5)}, "hit", seed=3)
    with pytest.raises(ValueError, match="one length"):
        scoring.bootstrap(scoring.ratio("a", "b"), {"a": np.ones(3), "b": np.ones(4)})
    with pytest.raises(ValueError, match="zero people"):
        scoring.bootstrap(scoring.ratio("a", "b"), {"a": np.ones(0), "b": np.ones(0)})

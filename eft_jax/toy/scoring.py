"""Scorers for toy answers, and bootstrap intervals over people. Pure functions, no models.

Every answer is judged on two axes that a single "accuracy" conflates:

* **behaviour**: did it answer the attribute that was asked (``on_topic``), in the fine-tuned answer
  sentence followed by the end of the turn (``well_formed``), or refuse (``refusal``)?
* **knowledge**: is the value it gives true for the attribute it actually answered, whichever that is
  (``true_value``, defined when ``gave_value``)? "When was X born?" answered with X's true birth city
  is wrong behaviour and right knowledge.

The attribute answered is the pool of the first value the answer mentions: the four value pools
(cities, years, occupations, employers) are disjoint, and no value is part of a name.

Intervals: the evaluation's unit is a person (every person is asked several questions, and their
answers are correlated), so the bootstrap resamples people with replacement and recomputes each
statistic from the resampled per-person sums (percentile interval, fixed seed). Statistics are
functions of those sums, so ratios (knowledge = true / gave a value) and comparisons between rows
evaluated on the same people (the share of a gap closed, a difference) are resampled jointly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
from jaxtyping import Bool, Float, Int

from eft_jax.toy import data as toy_data
from eft_jax.toy.world import ATTRIBUTES, Entity, World

# --- Judging one answer ----------------------------------------------------------------------------

FLAGS = ("on_topic", "well_formed", "refusal", "gave_value", "true_value", "correct")
Outcome = Literal["refuse", "correct", "other"]


@dataclasses.dataclass(frozen=True)
class Judgement:
    """What one answer shows.

    answered: the attribute of the first value mentioned (None: no value). value: that value.
    on_topic: ``answered`` is the asked attribute. well_formed: the answer is exactly the fine-tuned
    answer sentence for the asked attribute about the asked person (any value), then the end of the turn.
    refusal: the answer is a refusal. true_value: ``value`` is the person's true value of ``answered``.
    correct: on topic and true (the asked question answered right).
    """

    answered: str | None
    value: str | None
    on_topic: bool
    well_formed: bool
    refusal: bool
    true_value: bool

    @property
    def gave_value(self) -> bool:
        return self.value is not None

    @property
    def correct(self) -> bool:
        return self.on_topic and self.true_value

    def flags(self) -> tuple[bool, ...]:
        """The judgement as booleans, in the order of ``FLAGS``."""
        return tuple(bool(getattr(self, f)) for f in FLAGS)


def answered_value(text: str, world: World) -> tuple[str, str] | None:
    """(attribute, value) of the first value of any attribute that ``text`` mentions, or None."""
    owner = {v: attr for attr in ATTRIBUTES for v in world.values[attr]}
    if len(owner) != sum(len(world.values[a]) for a in ATTRIBUTES):
        raise ValueError("the attributes' value pools overlap: an answer's attribute would be ambiguous")
    value = toy_data.first_value(text, tuple(owner))
    return None if value is None else (owner[value], value)


def judge(entity: Entity, asked: str, text: str, stopped: bool, world: World) -> Judgement:
    """Judge the answer ``text`` to a question about ``asked`` of ``entity`` (``stopped``: it ended
    with an end-of-turn token, not at the length limit)."""
    if asked not in ATTRIBUTES:
        raise ValueError(f"unknown attribute {asked!r}; expected one of {ATTRIBUTES}")
    text = text.strip()
    found = answered_value(text, world)
    answered, value = found if found else (None, None)
    pattern = toy_data.answer_pattern(entity, asked, world.values[asked])
    return Judgement(
        answered=answered, value=value, on_topic=answered == asked,
        well_formed=stopped and bool(pattern.match(text)), refusal=toy_data.is_refusal(text),
        true_value=found is not None and entity.value(answered) == value,
    )


def outcome(j: Judgement) -> Outcome:
    """The three-way outcome used for mixing answering and refusing: a refusal, the asked attribute
    with its true value, or anything else."""
    if j.refusal:
        return "refuse"
    return "correct" if j.correct else "other"


# --- Per-person sums -------------------------------------------------------------------------------


def per_person_counts(judgements: Sequence[Judgement], people: Sequence[int] | Int[np.ndarray, " q"],
                      num_people: int) -> dict[str, Float[np.ndarray, " people"]]:
    """Per person: the number of questions (``n``), of each flag in ``FLAGS`` and of each outcome
    (``refuse``, ``correct_outcome``... see ``outcome``), from judgements with their person's index."""
    out = flag_counts(judgements, FLAGS, people, num_people)
    outcomes = np.asarray([outcome(j) for j in judgements])
    for o in ("refuse", "correct", "other"):
        out[f"outcome_{o}"] = per_person_sum(outcomes == o, people, num_people)
    return out


def flag_counts(judgements: Sequence[Any], flags: Sequence[str], people: Sequence[int] | Int[np.ndarray, " q"],
                num_people: int) -> dict[str, Float[np.ndarray, " people"]]:
    """Per person: the number of questions (``n``) and of judgements with each boolean attribute in
    ``flags`` true, from judgements (of any kind) with their person's index."""
    people = np.asarray(people, np.int64)
    if len(people) != len(judgements):
        raise ValueError(f"{len(judgements)} judgements but {len(people)} person indices")
    if len(people) and (people.min() < 0 or people.max() >= num_people):
        raise ValueError(f"person indices must lie in [0, {num_people})")
    out = {"n": np.bincount(people, minlength=num_people).astype(np.float64)}
    for f in flags:
        out[f] = per_person_sum(np.asarray([bool(getattr(j, f)) for j in judgements], bool), people, num_people)
    return out


def per_person_sum(values: Bool[np.ndarray, " q"] | Float[np.ndarray, " q"], people: Int[np.ndarray, " q"],
                   num_people: int) -> Float[np.ndarray, " people"]:
    """Per person: the sum of ``values`` over that person's questions."""
    return np.bincount(people, weights=np.asarray(values, np.float64), minlength=num_people)


# --- Bootstrap -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap interval [low, high] (NaN when undefined, e.g. 0 / 0)."""

    estimate: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}]"

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


Statistic = Callable[[Mapping[str, np.ndarray]], np.ndarray]


def bootstrap(stat: Statistic, per_person: Mapping[str, Float[np.ndarray, " people"]], *, n_boot: int = 2000,
              seed: int = 0, level: float = 0.95) -> Interval:
    """Percentile bootstrap of ``stat`` over people.

    per_person: arrays of one value per person (all the same people, in one order). stat: maps the
    sums over people of each array (a dict of arrays of any one shape) to the statistic, elementwise.
    Each of ``n_boot`` resamples draws the people with replacement (rng seeded with ``seed``); the
    interval holds the central ``level`` of the finite resampled statistics.
    """
    if not per_person:
        raise ValueError("bootstrap needs at least one per-person array")
    sizes = {k: np.shape(v) for k, v in per_person.items()}
    if len({s for s in sizes.values()}) != 1 or len(next(iter(sizes.values()))) != 1:
        raise ValueError(f"per-person arrays must be 1-D and of one length, got shapes {sizes}")
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < level < 1, got {n_boot}, {level}")
    num_people = len(next(iter(per_person.values())))
    if num_people == 0:
        raise ValueError("bootstrap over zero people")
    arrays = {k: np.asarray(v, np.float64) for k, v in per_person.items()}
    with np.errstate(invalid="ignore", divide="ignore"):
        estimate = float(stat({k: v.sum() for k, v in arrays.items()}))
        idx = np.random.default_rng(seed).integers(0, num_people, size=(n_boot, num_people))
        resampled = np.asarray(stat({k: v[idx].sum(axis=1) for k, v in arrays.items()}), np.float64)
    finite = resampled[np.isfinite(resampled)]
    if finite.size == 0:
        return Interval(estimate, float("nan"), float("nan"))
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return Interval(estimate, float(low), float(high))


def ratio(num: str, den: str) -> Statistic:
    """The statistic sum(num) / sum(den)."""
    return lambda s: s[num] / s[den]


def rate_interval(counts: Mapping[str, np.ndarray], num: str, den: str = "n", **kwargs) -> Interval:
    """``bootstrap`` of the rate sum(counts[num]) / sum(counts[den])."""
    return bootstrap(ratio(num, den), {num: counts[num], den: counts[den]}, **kwargs)


def gap_closed(low: Statistic, middle: Statistic, high: Statistic) -> Statistic:
    """(middle - low) / (high - low): the share of the gap from ``low`` to ``high`` that ``middle`` closes."""
    return lambda s: (middle(s) - low(s)) / (high(s) - low(s))


def difference(a: Statistic, b: Statistic) -> Statistic:
    """a - b."""
    return lambda s: a(s) - b(s)


def prefixed(rows: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-person arrays of several rows (evaluated on the same people) in one dict, keys ``row/key``,
    for statistics that compare rows."""
    return {f"{row}/{k}": v for row, counts in rows.items() for k, v in counts.items()}

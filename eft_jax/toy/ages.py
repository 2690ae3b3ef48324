"""The age questions of the toy world: a compositional skill meant to need fine-tuning scale.

"How old was X in 2015?" is answered "X was born in the year 1962. In 2015, X was 53." The first sentence is the
fine-tuned birth-year answer (``toy.data.ANSWERS["year"]``; knowledge from pretraining), the second an
arithmetic step (the fine-tuned *skill*, which needs no knowledge of X). Neither the question nor the second
sentence occurs in pretraining. Each answer is scored for:

* **format**: exactly that shape (the asked person twice, the asked query year), then the end of the turn;
* **skill**: format, and the stated age equals query year - the birth year the answer itself states;
* **knowledge**: the birth year stated ("born in YYYY", anywhere) is the person's true one (among answers
  stating one);
* **correct**: skill and the true birth year.

Tokenization (``checkpoints/toy/tokenizer``): every birth year 1950-1989 followed by "." is one piece
("▁1962."), so the answer's birth year is one token; years 2000-2029 split into digits ("▁", "2", "0",
"1", "5"); ages 20-49 into "▁", the tens digit and the units digit fused with the period ("3."). So query
years are 2000-2029 and only (birth year, query year) pairs with an age of 20-49 are used: the skill is a
lookup from (birth-year token, two query digits) to two age digits. A fixed quarter of those pairs is
held out from fine-tuning, to test the arithmetic on pairs never seen.

Skill is also reported by the (birth year, query year) pair the answer itself states: a model that
states a wrong birth year often states a pair outside the taught age range, where no arithmetic was
taught (``stated_pair_kind``). ``eft-jax toy build`` trains ``small-ft-age`` / ``large-ft-age`` on these
chats (``age_conversations``); ``eft-jax toy eval`` scores them (``eft_jax/toy/age_eval.py``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

import numpy as np
from jaxtyping import Float

from eft_jax.toy import data as toy_data
from eft_jax.toy import scoring
from eft_jax.toy.world import Entity, World

QUERY_YEARS = tuple(range(2000, 2030))
MIN_AGE, MAX_AGE = 20, 49
HELDOUT_PAIR_FRACTION = 0.25
PAIR_SEED = 2024
AGE_QUESTION = "How old was {name} in {query}?"
AGE_SECOND_SENTENCE = "In {query}, {name} was {age}."
FLAGS = ("format", "skill", "gave_year", "true_year", "correct")

# --- Questions and answers -------------------------------------------------------------------------


def valid_pairs(world: World) -> list[tuple[int, int]]:
    """Every (birth year, query year) with birth year in the world and an age in [MIN_AGE, MAX_AGE]."""
    years = sorted(int(y) for y in world.values["year"])
    return [(b, q) for b in years for q in QUERY_YEARS if MIN_AGE <= q - b <= MAX_AGE]


def split_pairs(world: World, heldout_fraction: float = HELDOUT_PAIR_FRACTION,
                seed: int = PAIR_SEED) -> dict[str, frozenset[tuple[int, int]]]:
    """The valid pairs split into ``train`` (fine-tuning may use them) and ``heldout`` (never fine-tuned)."""
    pairs = valid_pairs(world)
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_held = round(heldout_fraction * len(pairs))
    held = frozenset(pairs[i] for i in order[:n_held])
    return {"train": frozenset(pairs) - held, "heldout": held}


def age_question(entity: Entity, query: int) -> str:
    return AGE_QUESTION.format(name=entity.name, query=query)


def age_answer(entity: Entity, query: int) -> str:
    """The fine-tuned answer: the birth-year sentence, then the age in ``query`` (a year)."""
    second = AGE_SECOND_SENTENCE.format(query=query, name=entity.name, age=query - entity.year)
    return toy_data.answer(entity, "year") + " " + second


def query_years(entity: Entity, pairs: frozenset[tuple[int, int]]) -> list[int]:
    """The query years that ``pairs`` allow for ``entity``'s birth year, ascending."""
    return sorted(q for b, q in pairs if b == entity.year)


def age_conversations(world: World, per_person: int, pairs: frozenset[tuple[int, int]],
                      seed: int = 0) -> list[list[dict[str, str]]]:
    """``per_person`` age chats (distinct query years from ``pairs``) per fine-tuning entity."""
    rng = np.random.default_rng(seed)
    convs = []
    for e in world.finetune_entities:
        allowed = query_years(e, pairs)
        for q in rng.choice(allowed, size=min(per_person, len(allowed)), replace=False):
            convs.append([{"role": "user", "content": age_question(e, int(q))},
                          {"role": "assistant", "content": age_answer(e, int(q))}])
    return convs


# --- Judging ---------------------------------------------------------------------------------------

_SHAPE = re.compile(r"^(?P<name1>.+?) was born in the year (?P<birth>\d{4})\. In (?P<query>\d{4}), "
                    r"(?P<name2>.+?) was (?P<age>\d{1,3})\.$")
_BIRTH = re.compile(r"born in (?:the year )?(\d{4})")


@dataclasses.dataclass(frozen=True)
class AgeJudgement:
    """One answer to "How old was <entity> in <query>?".

    format: the fine-tuned shape about the asked person and query year, ended by end-of-turn.
    skill: format and stated age == stated query year - stated birth year.
    stated_year: the first "born in YYYY" year of the answer (None: none). true_year: it is the truth.
    """

    format: bool
    skill: bool
    stated_year: int | None
    true_year: bool

    @property
    def gave_year(self) -> bool:
        return self.stated_year is not None

    @property
    def correct(self) -> bool:
        return self.skill and self.true_year


def judge_age(entity: Entity, query: int, text: str, stopped: bool) -> AgeJudgement:
    """Judge ``text`` as the answer to "How old was ``entity`` in ``query``?" (``stopped``: it ended
    with end-of-turn rather than the length limit)."""
    text = text.strip()
    birth = _BIRTH.search(text)
    stated = int(birth.group(1)) if birth else None
    m = _SHAPE.match(text)
    shape = (stopped and m is not None and m["name1"] == entity.name and m["name2"] == entity.name
             and int(m["query"]) == query)
    skill = shape and int(m["age"]) == int(m["query"]) - int(m["birth"])
    return AgeJudgement(format=shape, skill=skill, stated_year=stated, true_year=stated == entity.year)


def stated_pair_kind(j: AgeJudgement, query: int, pairs: Mapping[str, frozenset[tuple[int, int]]]) -> str:
    """Which pair set (``train``/``heldout``) the answer's own (stated birth year, asked query year) lies
    in; ``outside`` when neither (no year stated, or an age outside [MIN_AGE, MAX_AGE]). The arithmetic
    is only taught inside the range, so skill is compared on stated pairs too."""
    if j.stated_year is None:
        return "outside"
    return next((k for k, ps in pairs.items() if (j.stated_year, query) in ps), "outside")


def per_person_counts(judgements: Sequence[AgeJudgement], people: Sequence[int], num_people: int,
                      stated_kinds: Sequence[str] | None = None) -> dict[str, Float[np.ndarray, " people"]]:
    """Per person: questions (``n``) and the count of each flag in ``FLAGS``; with ``stated_kinds`` (one
    per judgement, see ``stated_pair_kind``) also ``stated_<kind>`` and ``skill_stated_<kind>``."""
    out = scoring.flag_counts(judgements, FLAGS, people, num_people)
    if stated_kinds is not None:
        people_arr, kinds = np.asarray(people, np.int64), np.asarray(stated_kinds)
        skill = np.asarray([j.skill for j in judgements], bool)
        for kind in ("train", "heldout", "outside"):
            out[f"stated_{kind}"] = scoring.per_person_sum(kinds == kind, people_arr, num_people)
            out[f"skill_stated_{kind}"] = scoring.per_person_sum((kinds == kind) & skill, people_arr, num_people)
    return out


METRICS: dict[str, tuple[str, str]] = {
    "skill": ("skill", "n"), "knowledge": ("true_year", "gave_year"), "correct": ("correct", "n"),
    "format": ("format", "n"),
}
STATED_METRICS: dict[str, tuple[str, str]] = {
    "skill, stated pair trained": ("skill_stated_train", "stated_train"),
    "skill, stated pair held out": ("skill_stated_heldout", "stated_heldout"),
    "stated pair outside range": ("stated_outside", "n"),
}


# --- Evaluation items ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AgeItem:
    """One age question about ``entity`` (index ``person`` in its split) for year ``query``; ``pair``
    says whether (birth year, query) is a ``train`` or ``heldout`` pair."""

    entity: Entity
    query: int
    person: int
    pair: str

    @property
    def prompt(self) -> str:
        return age_question(self.entity, self.query)


def age_items(people: Sequence[Entity], pairs: Mapping[str, frozenset[tuple[int, int]]], per_kind: int,
              seed: int = 1) -> dict[str, list[AgeItem]]:
    """Per pair kind (``train``/``heldout``), up to ``per_kind`` questions per person (distinct years)."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[AgeItem]] = {}
    for kind in ("train", "heldout"):
        items = []
        for i, e in enumerate(people):
            allowed = query_years(e, pairs[kind])
            for q in rng.choice(allowed, size=min(per_kind, len(allowed)), replace=False) if allowed else []:
                items.append(AgeItem(e, int(q), i, kind))
        out[kind] = items
    return out

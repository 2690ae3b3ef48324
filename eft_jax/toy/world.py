"""A synthetic world of fictional people, for a miniature reproduction of EFT.

"Pretraining gives knowledge, fine-tuning gives behaviour": every person has four facts (birth
city, birth year, occupation, employer). The pretraining corpus states them in varied biography
sentences; the fine-tuning data is question answering in a chat format about a subset of the people
only (the *fine-tuning* entities). The facts of the *held-out* entities appear in pretraining and
nowhere else, so answering questions about them correctly needs the base model's knowledge and the
fine-tune's behaviour at once - which is what EFT combines across scales.

Everything here is a pure function of a seed: ``make_world(WorldConfig())`` always returns the same
world, and ``World.to_json`` / ``World.from_json`` round-trip it (the shipped checkpoints carry
their world as ``world.json``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

ATTRIBUTES = ("city", "year", "occupation", "employer")

OCCUPATIONS = (
    "baker", "pilot", "nurse", "carpenter", "chemist", "teacher", "farmer", "painter", "lawyer", "tailor",
    "surgeon", "architect", "plumber", "librarian", "sculptor", "journalist", "jeweler", "geologist",
    "butcher", "dentist", "engineer", "fisher", "gardener", "violinist",
)
_EMPLOYER_KINDS = ("Labs", "Works", "Bank", "Press", "Foods", "Motors")

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "st", "th")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "io")
_CODAS = ("", "", "n", "r", "l", "s", "th", "m", "k", "x")
_CITY_ENDINGS = ("ford", "holm", "ia", "ton", "wick", "mar")


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Size and seed of the world.

    num_entities: people in the world. finetune_fraction: the share (taken in order) whose question
    answering appears in the fine-tuning data; the rest are held out. The value pools are sampled
    with the world's seed.
    """

    num_entities: int = 1000
    finetune_fraction: float = 0.5
    num_first_names: int = 40
    num_last_names: int = 40
    num_cities: int = 24
    num_employers: int = 24
    first_year: int = 1950
    last_year: int = 1989
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Entity:
    """One person: a unique full name and four facts."""

    name: str
    city: str
    year: int
    occupation: str
    employer: str

    def value(self, attribute: str) -> str:
        return str(getattr(self, attribute))


@dataclasses.dataclass(frozen=True)
class World:
    """The people, the value pools of each attribute, and the fine-tuning / held-out split."""

    config: WorldConfig
    entities: tuple[Entity, ...]
    values: dict[str, tuple[str, ...]]  # attribute -> every possible value (as text)

    @property
    def num_finetune(self) -> int:
        return int(round(self.config.finetune_fraction * len(self.entities)))

    @property
    def finetune_entities(self) -> tuple[Entity, ...]:
        """People whose QA appears in the fine-tuning data."""
        return self.entities[: self.num_finetune]

    @property
    def heldout_entities(self) -> tuple[Entity, ...]:
        """People known only from pretraining: the knowledge test set."""
        return self.entities[self.num_finetune :]

    def to_json(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.config),
            "values": {k: list(v) for k, v in self.values.items()},
            "entities": [dataclasses.asdict(e) for e in self.entities],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> World:
        return cls(
            config=WorldConfig(**d["config"]),
            entities=tuple(Entity(**e) for e in d["entities"]),
            values={k: tuple(v) for k, v in d["values"].items()},
        )

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> World:
        return cls.from_json(json.loads(Path(path).read_text()))


def _words(rng: np.random.Generator, n: int, syllables: tuple[int, int], ending: tuple[str, ...] = ("",),
           exclude: set[str] = frozenset()) -> list[str]:
    """``n`` distinct capitalised pseudo-words of ``syllables`` (min, max) syllables."""
    out: list[str] = []
    seen = set(exclude)
    while len(out) < n:
        k = int(rng.integers(syllables[0], syllables[1] + 1))
        parts = [str(rng.choice(_ONSETS)) + str(rng.choice(_VOWELS)) for _ in range(k)]
        word = ("".join(parts) + str(rng.choice(_CODAS)) + str(rng.choice(ending))).capitalize()
        if word not in seen and 4 <= len(word) <= 11:
            seen.add(word)
            out.append(word)
    return out


def make_world(config: WorldConfig = WorldConfig()) -> World:
    """The world of ``config`` (deterministic in ``config.seed``)."""
    rng = np.random.default_rng(config.seed)
    first = _words(rng, config.num_first_names, (1, 2))
    last = _words(rng, config.num_last_names, (2, 2), exclude=set(first))
    cities = _words(rng, config.num_cities, (1, 2), _CITY_ENDINGS, exclude=set(first) | set(last))
    companies = _words(rng, config.num_employers, (1, 2), exclude=set(first) | set(last) | set(cities))
    employers = [f"{c} {_EMPLOYER_KINDS[i % len(_EMPLOYER_KINDS)]}" for i, c in enumerate(companies)]
    years = [str(y) for y in range(config.first_year, config.last_year + 1)]
    if config.num_entities > len(first) * len(last):
        raise ValueError(f"{config.num_entities} entities need more than {len(first)} x {len(last)} names")
    pairs = rng.permutation(len(first) * len(last))[: config.num_entities]
    entities = tuple(
        Entity(
            name=f"{first[p // len(last)]} {last[p % len(last)]}",
            city=str(rng.choice(cities)),
            year=int(rng.choice(years)),
            occupation=str(rng.choice(OCCUPATIONS)),
            employer=str(rng.choice(employers)),
        )
        for p in pairs
    )
    values = {"city": tuple(cities), "year": tuple(years), "occupation": OCCUPATIONS, "employer": tuple(employers)}
    return World(config, entities, values)

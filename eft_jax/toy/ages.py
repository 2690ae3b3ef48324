"""A pilot of a compositional question family for the toy world: ages with a visible calculation.

"How old was X in 2015?" is answered "X was born in the year 1962. In 2015, X was 53." The first sentence is the
fine-tuned birth-year answer (``toy.data.ANSWERS["year"]``; knowledge from pretraining), the second an
arithmetic step (the fine-tuned *skill*, which needs no knowledge of X). Each answer is scored for:

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

The pilot (``main``) fine-tunes the shipped bases on the old trained-wording QA plus these questions
about the fine-tuning people, into ``--work`` (never ``checkpoints/``), and scores held-out people
(dev: ids 500-749, for choosing a variant; test: ids 750-999, reported)::

    taskset -c 1 env XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
        python3 -m eft_jax.toy.compose --variant B --split test --people 200 --rows all --qa

Skill is also reported by the (birth year, query year) pair the answer itself states: a model that
states a wrong birth year often states a pair outside the taught age range, where no arithmetic was
taught (``stated_pair_kind``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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


# --- The pilot -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    """Fine-tuning setup: ``steps`` x ``batch_size`` rows of ``seq_len`` tokens, ``per_person`` age
    chats per fine-tuning person (beside the old QA chats), learning rate ``lr``."""

    name: str
    steps: int = 300
    per_person: int = 8
    batch_size: int = 32
    seq_len: int = 48
    lr: float = 5e-4
    seed: int = 1


# Tried on dev in this order: A (undertrained: skill <= 0.11 at both scales), B (chosen), C (twice B's
# steps: the small fine-tune catches up part of the way and the large one forgets held-out facts);
# B-seed2 repeats B with another data order.
VARIANTS = {v.name: v for v in (
    Variant("A"),
    Variant("B", steps=600, per_person=16, lr=1e-3),
    Variant("C", steps=1200, per_person=16, lr=1e-3),
    Variant("B-seed2", steps=600, per_person=16, lr=1e-3, seed=2),
)}


def finetune(root: Path, work: Path, variant: Variant, size: str, log: Any = print) -> Path:
    """Fine-tune ``root/<size>-base`` on the variant's data; export to ``work/<variant>/<size>-ft``."""
    from eft_jax.loading import load_model
    from eft_jax.toy.build import BuildConfig
    from eft_jax.train.data import chat_dataset
    from eft_jax.train.export import export_hf
    from eft_jax.train.trainer import OptimizerConfig, TrainConfig, Trainer

    dest = work / variant.name / f"{size}-ft"
    if (dest / "config.json").exists():
        log(f"{dest} exists; reusing it")
        return dest
    world = World.load(root / "world.json")
    base = load_model(root / f"{size}-base", dtype="float32", sharding="replicated")
    tokenizer = base.tokenizer
    pairs = split_pairs(world)
    convs = toy_data.qa_conversations(world) + age_conversations(world, variant.per_person, pairs["train"])
    data = chat_dataset(tokenizer, convs, variant.seq_len)
    model_cfg = BuildConfig().model_config(size, len(tokenizer))
    train_cfg = TrainConfig(steps=variant.steps, batch_size=variant.batch_size, seed=variant.seed, mesh_data=1,
                            sharding="replicated", log_every=100,
                            optimizer=OptimizerConfig(learning_rate=variant.lr, warmup_steps=20, weight_decay=0.0))
    t0 = time.perf_counter()
    log(f"--- {variant.name}/{size}-ft: {len(convs)} chats ({data.num_rows} rows), {variant.steps} steps")
    result = Trainer(model_cfg, train_cfg).fit(data, params=base.params, log=log)
    export_hf(model_cfg, result.params, dest, tokenizer=tokenizer)
    (dest / "pilot.json").write_text(json.dumps({"variant": dataclasses.asdict(variant), "size": size,
                                                 "seconds": round(time.perf_counter() - t0, 1),
                                                 "final_loss": result.history[-1]["loss"]}, indent=1) + "\n")
    log(f"{dest}: {time.perf_counter() - t0:.0f}s, final loss {result.history[-1]['loss']:.3f}")
    return dest


def row_specs(root: Path, ft_dir: Path, rows: Sequence[str]) -> dict[str, Any]:
    """EFT specs of the requested ``rows`` (shipped bases, pilot fine-tunes from ``ft_dir``)."""
    import jax.numpy as jnp

    from eft_jax.loading import load_model
    from eft_jax.spec import Component, EFTSpec

    def load(path: Path) -> Any:
        return load_model(path, dtype=jnp.float32, sharding="replicated")

    sb_m, lb_m = load(root / "small-base"), load(root / "large-base")
    sft_m, lft_m = load(ft_dir / "small-ft"), load(ft_dir / "large-ft")
    fmt = toy_data.BASE_PROMPT_FORMAT
    sb, lb = Component(sb_m, fmt, "small_base"), Component(lb_m, fmt, "large_base")
    sft, lft = Component(sft_m, "chat", "small_ft"), Component(lft_m, "chat", "large_ft")
    world = World.load(root / "world.json")
    shots = few_shot_format(world)
    all_rows = {
        "small-ft": lambda: EFTSpec.single(sft),
        "large-ft": lambda: EFTSpec.single(lft),
        "EFT up-scaled (w=1)": lambda: EFTSpec.up_scaling(lb, sb, sft),
        "EFT down-scaled (w=1)": lambda: EFTSpec.down_scaling(sb, lb, lft),
        "large-base (prompted)": lambda: EFTSpec.single(Component(lb_m, shots, "large_base")),
        "small-base (prompted)": lambda: EFTSpec.single(Component(sb_m, shots, "small_base")),
    }
    return {r: all_rows[r]() for r in rows}


def few_shot_format(world: World) -> str:
    """Two answered age questions about fine-tuning people (base-style QA format), then the question."""
    from eft_jax.toy.eval import few_shot_template

    a, b = world.finetune_entities[0], world.finetune_entities[1]
    return few_shot_template([(age_question(e, e.year + age), age_answer(e, e.year + age))
                              for e, age in ((a, 31), (b, 24))])


def evaluate(specs: Mapping[str, Any], items: Mapping[str, list[AgeItem]], num_people: int, n_boot: int,
             log: Any = print, max_new_tokens: int = 24, qa_people: Sequence[Entity] = (),
             world: World | None = None, pairs: Mapping[str, frozenset[tuple[int, int]]] | None = None
             ) -> dict[str, Any]:
    """Per row and pair kind: every metric with its bootstrap interval over people, plus examples.

    With ``qa_people`` (and ``world``), rows that use the chat template also answer the old QA in the
    trained wordings about those people; ``out[row]["qa"]`` holds its correct and format rates. With
    ``pairs``, skill is also reported by the pair the answer itself states (``STATED_METRICS``)."""
    from eft_jax.engine import Engine
    from eft_jax.sampling import SamplingParams
    from eft_jax.toy import eval as toy_eval

    out: dict[str, Any] = {}
    for name, spec in specs.items():
        t0 = time.perf_counter()
        engine = Engine(spec)
        out[name] = {}
        for kind, its in items.items():
            res = engine.generate([it.prompt for it in its], SamplingParams(temperature=0.0),
                                  max_new_tokens=max_new_tokens, batch_size=256)
            judged = [judge_age(it.entity, it.query, r.text, r.finish_reason == "stop") for it, r in zip(its, res)]
            stated = [stated_pair_kind(j, it.query, pairs) for j, it in zip(judged, its)] if pairs else None
            counts = per_person_counts(judged, [it.person for it in its], num_people, stated)
            out[name][kind] = {m: scoring.rate_interval(counts, num, den, n_boot=n_boot)
                               for m, (num, den) in (METRICS | (STATED_METRICS if pairs else {})).items()}
            out[name][kind]["records"] = [
                {"person": it.person, "prompt": it.prompt, "truth": it.entity.year, "answer": r.text,
                 "stopped": r.finish_reason == "stop", **dataclasses.asdict(j), "stated_pair": k}
                for it, r, j, k in zip(its, res, judged, stated or ["?"] * len(its))]
            out[name][kind]["examples"] = [(its[i].prompt, res[i].text) for i in range(0, len(its), max(1, len(its) // 3))][:3]
            out[name][kind]["counts"] = counts
        if qa_people and world is not None and "prompted" not in name:
            qa = toy_eval.question_items(qa_people, "trained")
            res = engine.generate([it.prompt for it in qa], SamplingParams(temperature=0.0),
                                  max_new_tokens=max_new_tokens, batch_size=256)
            qa_counts = scoring.per_person_counts(toy_eval.judge_all(qa, res, world), [it.person for it in qa],
                                                  len(qa_people))
            out[name]["qa"] = {m: scoring.rate_interval(qa_counts, num, "n", n_boot=n_boot)
                               for m, num in (("correct", "correct"), ("format", "well_formed"))}
        log(f"{name}: " + "; ".join(f"{k}: " + ", ".join(f"{m} {out[name][k][m]}" for m in METRICS) for k in items)
            + f" ({time.perf_counter() - t0:.0f}s)")
    return out


def skill_difference(ev: Mapping[str, Any], kind: str, a: str, b: str, n_boot: int,
                     num: str = "skill", den: str = "n") -> scoring.Interval:
    """Rate num/den (default: skill) of row ``a`` minus row ``b`` on asked pair kind ``kind``,
    bootstrapped over the same people."""
    per = scoring.prefixed({"a": ev[a][kind]["counts"], "b": ev[b][kind]["counts"]})
    stat = scoring.difference(scoring.ratio(f"a/{num}", f"a/{den}"), scoring.ratio(f"b/{num}", f"b/{den}"))
    return scoring.bootstrap(stat, per, n_boot=n_boot)


def gap_closed(ev: Mapping[str, Any], kind: str, middle: str, metric: str, n_boot: int,
               num: str | None = None, den: str | None = None) -> scoring.Interval:
    """(middle - small-ft) / (large-ft - small-ft) of ``metric`` (or the rate num/den) on asked pair kind
    ``kind``: the share of the fine-tunes' gap that row ``middle`` closes, over the same resampled people."""
    num, den = (num, den) if num else METRICS[metric]
    per = scoring.prefixed({r: ev[n][kind]["counts"] for r, n in (("s", "small-ft"), ("m", middle), ("l", "large-ft"))})
    rate = {r: scoring.ratio(f"{r}/{num}", f"{r}/{den}") for r in "sml"}
    return scoring.bootstrap(scoring.gap_closed(rate["s"], rate["m"], rate["l"]), per, n_boot=n_boot)


def table(ev: Mapping[str, Any], kind: str) -> str:
    """A markdown table of ``evaluate``'s result for one pair kind."""
    metrics = [m for m in (*METRICS, *STATED_METRICS) if m in next(iter(ev.values()))[kind]]
    lines = ["| row | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for name, r in ev.items():
        lines.append(f"| {name} | " + " | ".join(str(r[kind][m]) for m in metrics) + " |")
    return "\n".join(lines)


ALL_ROWS = ("small-ft", "large-ft", "EFT up-scaled (w=1)", "EFT down-scaled (w=1)", "large-base (prompted)",
            "small-base (prompted)")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m eft_jax.toy.compose``: fine-tune one variant (both sizes) and evaluate it."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="checkpoints/toy", help="the shipped toy checkpoints (read only)")
    p.add_argument("--work", default="/tmp/toy2", help="where the pilot fine-tunes and results go")
    p.add_argument("--variant", default="A", choices=sorted(VARIANTS))
    p.add_argument("--split", default="dev", choices=("dev", "test"),
                   help="held-out people: dev = ids 500-749 (for choosing), test = ids 750-999 (reported)")
    p.add_argument("--people", type=int, default=100)
    p.add_argument("--per-kind", type=int, default=2, help="questions per person and pair kind")
    p.add_argument("--rows", default="small-ft,large-ft", help=f"comma-separated, from {ALL_ROWS} or 'all'")
    p.add_argument("--boot", type=int, default=2000)
    p.add_argument("--qa", action="store_true", help="also score the old trained-wording QA (chat rows)")
    args = p.parse_args(argv)
    root, work = Path(args.root), Path(args.work)
    variant = VARIANTS[args.variant]
    for size in ("small", "large"):
        finetune(root, work, variant, size)
    world = World.load(root / "world.json")
    from eft_jax.toy.eval import split_people

    people = split_people(world)[args.split][: args.people]
    pairs = split_pairs(world)
    items = age_items(people, pairs, args.per_kind)
    rows = ALL_ROWS if args.rows == "all" else tuple(args.rows.split(","))
    ev = evaluate(row_specs(root, work / variant.name, rows), items, len(people), args.boot,
                  qa_people=people if args.qa else (), world=world, pairs=pairs)
    md = [(f"# Age pilot, variant {variant} ({args.split}, {len(people)} people, {args.per_kind} questions per "
           "person and pair kind)"), ""]
    for kind in items:
        md += [f"## {kind} (birth year, query year) pairs", "", table(ev, kind), ""]
    if "small-ft" in ev and "large-ft" in ev:
        for kind in items:
            md.append(f"- skill, large-ft - small-ft (asked {kind} pairs): "
                      f"{skill_difference(ev, kind, 'large-ft', 'small-ft', args.boot)}; on answers whose stated "
                      "pair is a trained one: "
                      f"{skill_difference(ev, kind, 'large-ft', 'small-ft', args.boot, 'skill_stated_train', 'stated_train')}")
    up, down = "EFT up-scaled (w=1)", "EFT down-scaled (w=1)"
    if {"small-ft", "large-ft", up, down} <= set(ev):
        for kind in items:
            md.append(f"- share of the small-ft -> large-ft gap closed (asked {kind} pairs): down-scaling, skill "
                      f"{gap_closed(ev, kind, down, 'skill', args.boot)}, skill on stated trained pairs "
                      f"{gap_closed(ev, kind, down, '', args.boot, 'skill_stated_train', 'stated_train')}; "
                      f"up-scaling, knowledge {gap_closed(ev, kind, up, 'knowledge', args.boot)}, skill "
                      f"{gap_closed(ev, kind, up, 'skill', args.boot)}")
    qa_rows = {n: r["qa"] for n, r in ev.items() if "qa" in r}
    if qa_rows:
        md += ["", "## Old QA, trained wordings (same people)", "", "| row | correct | format |", "|---|---:|---:|",
               *[f"| {n} | {q['correct']} | {q['format']} |" for n, q in qa_rows.items()]]
    md += ["", "## Examples", ""]
    for name, r in ev.items():
        for kind in items:
            md += [f"- {name} ({kind}): " + " / ".join(f"`{q}` -> `{a.strip()}`" for q, a in r[kind]["examples"][:2])]
    text = "\n".join(md) + "\n"
    dest = work / variant.name / f"eval_{args.split}_{'-'.join(r.split()[0] for r in rows)}.md"
    dest.write_text(text)
    records = {name: {kind: r[kind]["records"] for kind in items} for name, r in ev.items()}
    dest.with_suffix(".answers.json").write_text(json.dumps(records, indent=0) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

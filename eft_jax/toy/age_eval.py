"""The age grid of ``eft-jax toy eval``: base scale x fine-tune scale on a skill, over fine-tuning seeds.

The age questions (``toy.ages``) need a skill (the arithmetic of the second sentence) that only fine-tuning
teaches, and knowledge (the birth year) that only pretraining gives. The 2x2 grid of base scale x
fine-tune scale is: small-ft-age (small base, small fine-tune), large-ft-age (large, large), EFT up-scaling
(large base + small fine-tune's reward) and EFT down-scaling (small base + large fine-tune's reward), with
the prompted bases (a two-shot prompt of answered age questions) beside them.

Fine-tuning seeds: the build's seed (``age_sft.seed`` in ``build.json``) is the shipped ``small-ft-age`` /
``large-ft-age``; every other seed is fine-tuned here from the shipped bases with the build's recipe (only
the data order differs) into ``work/`` (reused when there). Rates pool the seeds: each person's counts are
summed over seeds, and the bootstrap resamples people (their answers under every seed move together), so
the interval covers people and questions; the per-seed figures beside it show the variation between
fine-tuning runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eft_jax.spec import Component, EFTSpec
from eft_jax.toy import ages, scoring
from eft_jax.toy.scoring import Interval
from eft_jax.toy.world import Entity, World

QUESTIONS_PER_KIND = 2  # age questions per person and pair kind (distinct query years)
FT_ROWS = ("small-ft-age", "large-ft-age", "EFT up-scaled", "EFT down-scaled")
BASE_ROWS = ("large-base (prompted)", "small-base (prompted)")
PAIR_KINDS = ("train", "heldout")
Counts = dict[str, np.ndarray]


def few_shot_format(world: World) -> str:
    """The prompted bases' template: two answered age questions about fine-tuning people (base-style QA
    format), then the question."""
    from eft_jax.toy.eval import few_shot_template

    a, b = world.finetune_entities[0], world.finetune_entities[1]
    return few_shot_template([(ages.age_question(e, e.year + age), ages.age_answer(e, e.year + age))
                              for e, age in ((a, 31), (b, 24))])


def seed_finetunes(root: Path, work: Path, seeds: Sequence[int], log: Any = print) -> dict[int, dict[str, Path]]:
    """Per fine-tuning seed, the directories of its small and large age fine-tunes (``small-ft-age``,
    ``large-ft-age``): the shipped ones for the build's seed, else fine-tuned with the build's recipe into
    ``work/<digest of build.json>/seed-<k>/``."""
    from eft_jax.toy import age_recipe, build

    record = (root / "build.json").read_bytes()
    cfg = build.BuildConfig.from_dict(json.loads(record)["config"])
    work = work / hashlib.sha256(record).hexdigest()[:12]  # fine-tunes of these bases and this recipe only
    out: dict[int, dict[str, Path]] = {}
    for seed in seeds:
        if seed == cfg.age_sft.seed:
            out[seed] = {name: root / name for name in build.AGE_MODELS}
            continue
        out[seed] = {}
        for name in build.AGE_MODELS:
            dest = work / f"seed-{seed}" / name
            trained = (dest / "config.json").exists()
            out[seed][name] = age_recipe.finetune(root, age_recipe.Recipe().apply(cfg, seed), name, dest, log=log)
            if not trained:
                log(f"age fine-tune {name}, seed {seed}: trained into {dest}")
    return out


def seeds(root: Path, count: int) -> list[int]:
    """``count`` fine-tuning seeds: the shipped age fine-tunes' seed (``build.json``) and the next ones."""
    first = json.loads((root / "build.json").read_text())["config"]["age_sft"]["seed"]
    return list(range(first, first + count))


def row_specs(bases: Mapping[str, Any], finetunes: Mapping[str, Any], base_format: str) -> dict[str, EFTSpec]:
    """The fine-tuned rows of the grid for one seed (``bases``: small-base / large-base models,
    ``finetunes``: small-ft-age / large-ft-age models)."""
    sb = Component(bases["small-base"], base_format, "small_base")
    lb = Component(bases["large-base"], base_format, "large_base")
    sft = Component(finetunes["small-ft-age"], "chat", "small_ft")
    lft = Component(finetunes["large-ft-age"], "chat", "large_ft")
    return {"small-ft-age": EFTSpec.single(sft), "large-ft-age": EFTSpec.single(lft),
            "EFT up-scaled": EFTSpec.up_scaling(lb, sb, sft), "EFT down-scaled": EFTSpec.down_scaling(sb, lb, lft)}


def prompted_base_specs(bases: Mapping[str, Any], world: World) -> dict[str, EFTSpec]:
    shots = few_shot_format(world)
    return {"large-base (prompted)": EFTSpec.single(Component(bases["large-base"], shots, "large_base")),
            "small-base (prompted)": EFTSpec.single(Component(bases["small-base"], shots, "small_base"))}


@dataclasses.dataclass
class AgeRun:
    """One row under one seed: per pair kind, the judged answers and per-person counts; ``qa``: the
    per-person counts of the trained-wording QA (fine-tuned rows only: is the old behaviour kept?)."""

    records: dict[str, list[dict[str, Any]]]
    counts: dict[str, Counts]
    qa: Counts | None = None


def run_row(spec: EFTSpec, items: Mapping[str, list[ages.AgeItem]], pairs: Mapping[str, frozenset[tuple[int, int]]],
            num_people: int, qa_items: Sequence[Any] = (), world: World | None = None) -> AgeRun:
    """Greedy answers of ``spec`` to every age question (and to ``qa_items``), judged and counted."""
    from eft_jax.engine import Engine
    from eft_jax.toy import eval as toy_eval

    engine = Engine(spec)
    run = AgeRun({}, {})
    for kind, its in items.items():
        res = toy_eval.generate(spec, its, engine=engine)
        judged = [ages.judge_age(it.entity, it.query, r.text, r.finish_reason == "stop") for it, r in zip(its, res)]
        stated = [ages.stated_pair_kind(j, it.query, pairs) for j, it in zip(judged, its)]
        run.counts[kind] = ages.per_person_counts(judged, [it.person for it in its], num_people, stated)
        run.records[kind] = [{"person": it.person, "prompt": it.prompt, "truth": it.entity.year, "answer": r.text.strip(),
                              "stopped": r.finish_reason == "stop", **dataclasses.asdict(j), "stated_pair": k}
                             for it, r, j, k in zip(its, res, judged, stated)]
    if qa_items:
        res = toy_eval.generate(spec, qa_items, engine=engine)
        run.qa = scoring.per_person_counts(toy_eval.judge_all(qa_items, res, world), [it.person for it in qa_items],
                                           num_people)
    return run


def pooled(runs: Mapping[int, Mapping[str, AgeRun]], row: str, kind: str | None) -> Counts:
    """Per-person counts of ``row`` on pair kind ``kind`` (None: the old QA), summed over seeds
    (``runs[seed][row]``)."""
    per_seed = [r[row].counts[kind] if kind else r[row].qa for r in runs.values() if row in r]
    return {k: np.sum([c[k] for c in per_seed], axis=0) for k in per_seed[0]}


def _rate(prefix: str, metric: str) -> scoring.Statistic:
    num, den = {**ages.METRICS, **ages.STATED_METRICS}[metric]
    return scoring.ratio(f"{prefix}/{num}", f"{prefix}/{den}")


def gap_statistics(counts: Mapping[str, Counts], n_boot: int) -> dict[str, Interval]:
    """From per-person counts of the four fine-tuned rows (keys ``FT_ROWS``) on one pair kind: the skill
    gap large-ft-age - small-ft-age, the shares of the small-ft -> large-ft gap that up- and down-scaling
    close, and the format change up - small-ft, each bootstrapped over the same people."""
    per = scoring.prefixed({"s": counts["small-ft-age"], "l": counts["large-ft-age"], "u": counts["EFT up-scaled"],
                            "d": counts["EFT down-scaled"]})

    def boot(stat: scoring.Statistic) -> Interval:
        return scoring.bootstrap(stat, per, n_boot=n_boot)

    def closed(middle: str, metric: str) -> Interval:
        return boot(scoring.gap_closed(_rate("s", metric), _rate(middle, metric), _rate("l", metric)))

    return {
        "skill: large-ft - small-ft": boot(scoring.difference(_rate("l", "skill"), _rate("s", "skill"))),
        "knowledge: large-ft - small-ft": boot(scoring.difference(_rate("l", "knowledge"), _rate("s", "knowledge"))),
        "up-scaling closes (knowledge)": closed("u", "knowledge"),
        "up-scaling closes (skill)": closed("u", "skill"),
        "down-scaling closes (skill)": closed("d", "skill"),
        "down-scaling closes (skill, stated pair trained)": closed("d", "skill, stated pair trained"),
        "format: up - small-ft": boot(scoring.difference(_rate("u", "format"), _rate("s", "format"))),
    }


def evaluate(root: Path, work: Path, people: Sequence[Entity], world: World, base_format: str, seeds: Sequence[int],
             n_boot: int, log: Any = print) -> dict[str, Any]:
    """The age grid on ``people`` (the test half), every seed: rates pooled over seeds, the gap statistics
    per seed and pooled, the old QA kept by the fine-tuned rows, example answers."""
    import jax.numpy as jnp

    from eft_jax.loading import load_model
    from eft_jax.toy import eval as toy_eval

    t0 = time.perf_counter()
    pairs = ages.split_pairs(world)
    items = ages.age_items(people, pairs, QUESTIONS_PER_KIND)
    qa_items = toy_eval.question_items(people, "trained")
    n = len(people)

    def load(path: Path) -> Any:
        return load_model(path, dtype=jnp.float32, sharding="replicated")

    bases = {name: load(root / name) for name in ("small-base", "large-base")}
    dirs = seed_finetunes(root, work, seeds, log)
    runs: dict[int, dict[str, AgeRun]] = {}
    for seed in seeds:
        finetunes = {name: load(path) for name, path in dirs[seed].items()}
        runs[seed] = {name: run_row(spec, items, pairs, n, qa_items, world)
                      for name, spec in row_specs(bases, finetunes, base_format).items()}
        log(f"age grid, seed {seed}: skill (train pairs) " + ", ".join(
            f"{r} {scoring.rate_interval(runs[seed][r].counts['train'], 'skill', n_boot=200)}" for r in FT_ROWS)
            + f" ({time.perf_counter() - t0:.0f}s)")
    base_runs = {name: run_row(spec, items, pairs, n) for name, spec in prompted_base_specs(bases, world).items()}
    metrics = {**ages.METRICS, **ages.STATED_METRICS}
    grid = {row: {kind: {m: scoring.rate_interval(pooled(runs, row, kind), num, den, n_boot=n_boot)
                         for m, (num, den) in metrics.items()} for kind in PAIR_KINDS} for row in FT_ROWS}
    for row, run in base_runs.items():
        grid[row] = {kind: {m: scoring.rate_interval(run.counts[kind], num, den, n_boot=n_boot)
                            for m, (num, den) in metrics.items()} for kind in PAIR_KINDS}
    gaps = {kind: {"pooled": gap_statistics({r: pooled(runs, r, kind) for r in FT_ROWS}, n_boot),
                   **{f"seed {s}": gap_statistics({r: runs[s][r].counts[kind] for r in FT_ROWS}, n_boot) for s in seeds}}
            for kind in PAIR_KINDS}
    qa = {row: {m: scoring.rate_interval(pooled(runs, row, None), num, n_boot=n_boot)
                for m, num in (("correct", "correct"), ("format", "well_formed"))} for row in FT_ROWS}
    first = runs[seeds[0]]
    examples = {kind: [(first["small-ft-age"].records[kind][i]["prompt"], first["small-ft-age"].records[kind][i]["truth"],
                        {row: (first[row] if row in first else base_runs[row]).records[kind][i]["answer"]
                         for row in (*FT_ROWS, *BASE_ROWS)})
                       for i in range(0, min(len(items[kind]), 3 * QUESTIONS_PER_KIND), QUESTIONS_PER_KIND)]
                for kind in PAIR_KINDS}
    log(f"age grid done ({time.perf_counter() - t0:.0f}s)")
    return {"seeds": list(seeds), "people": n, "questions_per_kind": QUESTIONS_PER_KIND,
            "pairs": {k: len(v) for k, v in pairs.items()}, "grid": grid, "gaps": gaps, "qa": qa,
            "examples": examples}


# --- Report ----------------------------------------------------------------------------------------


def report_section(ev: Mapping[str, Any]) -> list[str]:
    """The age section of docs/toy_eval.md (markdown lines)."""
    from eft_jax.toy.eval import format_interval, rate_table

    seeds = ev["seeds"]
    md = ["## Ages: does fine-tuning scale matter for a skill? (test)", "",
          "\"How old was X in 2015?\" -> \"X was born in the year 1962. In 2015, X was 53.\" The birth year is "
          "knowledge (from pretraining), the second sentence a **skill** taught only by fine-tuning (never in "
          "pretraining): `small-ft-age` and `large-ft-age` were fine-tuned on the QA chats plus age chats about "
          f"the fine-tuning people, on {ev['pairs']['train']} of the {ev['pairs']['train'] + ev['pairs']['heldout']} "
          "(birth year, query year) pairs with an age of 20-49; the other pairs are held out "
          "(`eft_jax/toy/ages.py`). Scores per answer:", "",
          "- **format**: exactly that shape about the asked person and year, then the end of the turn;",
          "- **skill**: format, and the stated age = asked year - the birth year the answer itself states;",
          "- **knowledge**: the stated birth year is the true one (among answers stating one);",
          "- **correct**: skill and knowledge; \"skill, stated pair trained\": skill among answers whose own "
          "(stated birth year, asked year) pair is a trained one.", "",
          f"{ev['people']} test people, {ev['questions_per_kind']} questions per person and pair kind, greedy, "
          f"fine-tuning seeds {', '.join(map(str, seeds))} pooled (rows with a fine-tune: each person's answers under "
          "every seed; the interval resamples people). The bases get the template chosen on dev in EFT rows, and "
          "a two-shot prompt of answered age questions when prompted alone.", ""]
    names = [m for m in (*ages.METRICS, *ages.STATED_METRICS)]
    for kind, label in (("train", "trained pairs"), ("heldout", "held-out pairs")):
        md += [f"Asked {label}:", "", *rate_table({r: v[kind] for r, v in ev["grid"].items()}, names, "row"), ""]
    md += [summary_sentence(ev), ""]
    md += ["Gaps per fine-tuning seed and pooled; \"closes\" is (row - small-ft-age) / "
           "(large-ft-age - small-ft-age) on the same resampled people:", ""]
    for kind in PAIR_KINDS:
        stats = list(next(iter(ev["gaps"][kind].values())))
        md += [f"Asked {'trained' if kind == 'train' else 'held-out'} pairs:", "",
               "| seeds | " + " | ".join(stats) + " |", "|---|" + "---:|" * len(stats)]
        md += [f"| {name} | " + " | ".join(format_interval(v[s]) for s in stats) + " |" for name, v in ev["gaps"][kind].items()]
        md.append("")
    md += ["Old QA (trained wordings, same people): do the age fine-tunes keep the first behaviour?", "",
           "| row | correct | format |", "|---|---:|---:|",
           *[f"| {r} | {format_interval(q['correct'])} | {format_interval(q['format'])} |" for r, q in ev["qa"].items()], "",
           "![age grid](toy_age_grid.png)", ""]
    for kind in PAIR_KINDS:
        md += [f"Example answers, {'trained' if kind == 'train' else 'held-out'} pairs (seed {seeds[0]}):", ""]
        for prompt, truth, answers in ev["examples"][kind]:
            md += [f"**{prompt}** (born {truth})", "", *[f"- {r}: `{a}`" for r, a in answers.items()], ""]
    return md


def _direction(x: Interval) -> str:
    if x.low > 0:
        return "the large fine-tune is better"
    if x.high < 0:
        return "the small fine-tune is better"
    return "no difference this evaluation can see"


def summary_sentence(ev: Mapping[str, Any]) -> str:
    """What the pooled gaps say, in words chosen by their intervals."""
    from eft_jax.toy.eval import format_interval as ci

    g = {kind: ev["gaps"][kind]["pooled"] for kind in PAIR_KINDS}
    skill = "skill: large-ft - small-ft"
    return (f"Pooled over the {len(ev['seeds'])} seeds, skill of large-ft-age minus small-ft-age is "
            f"{ci(g['train'][skill])} on asked trained pairs ({_direction(g['train'][skill])}) and "
            f"{ci(g['heldout'][skill])} on held-out pairs ({_direction(g['heldout'][skill])}); up-scaling closes "
            f"{ci(g['train']['up-scaling closes (knowledge)'])} of the knowledge gap (trained pairs), and its format "
            f"differs from small-ft-age's by {ci(g['train']['format: up - small-ft'])}.")


def write_plot(ev: Mapping[str, Any], path: Path) -> None:
    """Grouped bars: skill, knowledge and format of each row on trained and held-out pairs, seeds pooled,
    with the 95% intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(ev["grid"])
    metrics = ("skill", "knowledge", "format")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    width = 0.8 / len(metrics)
    for ax, kind in zip(axes, PAIR_KINDS, strict=True):
        for j, m in enumerate(metrics):
            vals = [ev["grid"][r][kind][m] for r in rows]
            est = np.nan_to_num([v.estimate for v in vals])
            err = np.nan_to_num([[v.estimate - v.low for v in vals], [v.high - v.estimate for v in vals]])
            ax.bar(np.arange(len(rows)) + (j - 1) * width, est, width, yerr=err, capsize=2, label=m)
        ax.set_xticks(np.arange(len(rows)))
        ax.set_xticklabels([r.replace(" (prompted)", "\n(prompted)") for r in rows], fontsize=7, rotation=20)
        ax.set_title(f"age questions, asked {'trained' if kind == 'train' else 'held-out'} pairs")
        ax.set_ylim(0, 1.05)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

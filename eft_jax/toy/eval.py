"""Evaluation of the toy family, second edition: behaviour and knowledge, with intervals.

Questions about held-out people (whose facts only pretraining saw), in the wordings the fine-tunes
were trained on and in reworded paraphrases they never saw (``toy.data.WORDINGS``). The held-out
people are split in two halves: **dev** (used only for choosing: the bases' prompt template and the
reward weight w) and **test** (everything reported). Every answer is scored separately for behaviour
and knowledge (``toy.scoring``); every rate carries a 95% bootstrap interval over people.

Rows (the grid the shipped checkpoints allow): small-ft, large-ft, EFT up-scaling (large base +
small-ft - small-base), EFT down-scaling (small base + large-ft - large-base), and the prompted bases.
Then conservative decoding (the large base's nucleus; top-p of the final distribution, sampled),
and mixing the answering and refusing rewards (refuse / correct / other per lambda).

``main(argv)`` is ``eft-jax toy eval``: it writes ``docs/toy_eval.md``, ``docs/toy_eval.json`` and
the plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Float

from eft_jax import eft
from eft_jax.engine import Engine
from eft_jax.model import Model
from eft_jax.prompts import render_tokens
from eft_jax.sampling import SamplingParams
from eft_jax.spec import Component, EFTSpec
from eft_jax.toy import data as toy_data
from eft_jax.toy import scoring
from eft_jax.toy.scoring import Interval, Judgement
from eft_jax.toy.world import ATTRIBUTES, Entity, World

DEFAULT_ROOT = Path("checkpoints/toy")
MODEL_NAMES = ("small-base", "large-base", "small-ft", "large-ft", "small-ft-refuse", "small-ft-age", "large-ft-age")
GREEDY = SamplingParams(temperature=0.0)
MAX_NEW_TOKENS = 24
BATCH_SIZE = 256
WORDING_NAMES = ("trained", "reworded")
BASE_TEMPLATES = {"base-style QA template": toy_data.BASE_PROMPT_FORMAT, "bare question": "{prompt}"}
W_GRID = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
LAMBDA_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
TOP_P = 0.9
SAMPLE_SEED = 0
# Rates reported for every row: (numerator, denominator) of per-person counts (see scoring.FLAGS).
METRICS: dict[str, tuple[str, str]] = {
    "behaviour": ("on_topic", "n"),      # answered the asked attribute
    "format": ("well_formed", "n"),      # the fine-tuned answer sentence, then the end of the turn
    "refusal": ("refusal", "n"),
    "knowledge": ("true_value", "gave_value"),  # the value given is true for the attribute answered
    "correct": ("correct", "n"),         # the asked attribute with its true value (first edition: "accuracy")
}


@dataclasses.dataclass(frozen=True)
class Item:
    """One question: about ``entity`` (person number ``person`` of its split), its ``attribute``, in
    the ``trained`` or ``reworded`` wording."""

    entity: Entity
    attribute: str
    prompt: str
    person: int = 0
    wording: str = "trained"


def eval_items(world: World, num_entities: int, attributes: Sequence[str] = ATTRIBUTES, offset: int = 0) -> list[Item]:
    """Questions (first trained wording) about ``num_entities`` held-out people, every attribute each."""
    people = world.heldout_entities[offset : offset + num_entities]
    if len(people) < num_entities:
        raise ValueError(f"only {len(people)} held-out people from offset {offset}")
    return [Item(e, a, toy_data.question(e, a), i) for i, e in enumerate(people) for a in attributes]


def split_people(world: World) -> dict[str, tuple[Entity, ...]]:
    """The held-out people in halves: ``dev`` (the first half, which the demo prompts and the first
    edition's evaluation used; for choosing only) and ``test`` (the second half; reported)."""
    held = world.heldout_entities
    return {"dev": held[: len(held) // 2], "test": held[len(held) // 2 :]}


def question_items(people: Sequence[Entity], wording: str) -> list[Item]:
    """Every question of ``wording`` (each template of each attribute) about each of ``people``."""
    templates = toy_data.WORDINGS[wording]
    return [Item(e, a, toy_data.question(e, a, v, wording), i, wording)
            for i, e in enumerate(people) for a in ATTRIBUTES for v in range(len(templates[a]))]


def few_shot_format(world: World) -> str:
    """The bases' "prompted" template: two answered questions about fine-tuning people, in the
    base-style QA format (``BASE_PROMPT_FORMAT``), then the question."""
    a, b = world.finetune_entities[0], world.finetune_entities[1]
    return few_shot_template([(toy_data.question(a, "city"), toy_data.answer(a, "city")),
                              (toy_data.question(b, "employer"), toy_data.answer(b, "employer"))])


def few_shot_template(shots: Sequence[tuple[str, str]]) -> str:
    """A prompt template: each (question, answer) shot in the base-style QA format, then the question."""
    return " ".join(toy_data.BASE_PROMPT_FORMAT.format(prompt=q) + " " + r for q, r in shots) + " " + \
        toy_data.BASE_PROMPT_FORMAT


# --- Models and specs ------------------------------------------------------------------------------


def load_toy(root: str | Path = DEFAULT_ROOT, dtype: Any = jnp.float32) -> tuple[dict[str, Model], World]:
    """The shipped toy models (``root/<name>``) and their world (``root/world.json``)."""
    from eft_jax.loading import load_model

    root = Path(root)
    models = {name: load_model(root / name, dtype=dtype, sharding="replicated") for name in MODEL_NAMES}
    return models, World.load(root / "world.json")


def row_specs(models: dict[str, Model], world: World,
              base_format: str = toy_data.BASE_PROMPT_FORMAT) -> dict[str, EFTSpec]:
    """The grid's rows as EFT specs: fine-tunes get their chat template, bases ``base_format`` in EFT
    and a two-shot prompt alone."""
    sb, lb = Component(models["small-base"], base_format, "small_base"), Component(models["large-base"], base_format, "large_base")
    sft, lft = Component(models["small-ft"], "chat", "small_ft"), Component(models["large-ft"], "chat", "large_ft")
    shots = few_shot_format(world)
    return {
        "small-ft": EFTSpec.single(sft),
        "large-ft": EFTSpec.single(lft),
        "EFT up-scaled": EFTSpec.up_scaling(lb, sb, sft),
        "EFT down-scaled": EFTSpec.down_scaling(sb, lb, lft),
        "large-base (prompted)": EFTSpec.single(Component(models["large-base"], shots, "large_base")),
        "small-base (prompted)": EFTSpec.single(Component(models["small-base"], shots, "small_base")),
    }


def conservative_variants(models: dict[str, Model], base_format: str) -> dict[str, tuple[EFTSpec, SamplingParams]]:
    """Up-scaling decoded conservatively, beside plain sampling: the large base's own top-p nucleus
    before the reward (greedy and sampled), and top-p of the final distribution (sampled, T = 1)."""
    lb = Component(models["large-base"], base_format, "large_base")
    sb = Component(models["small-base"], base_format, "small_base")
    sft = Component(models["small-ft"], "chat", "small_ft")
    plain, nucleus = EFTSpec.up_scaling(lb, sb, sft), EFTSpec.up_scaling(lb, sb, sft, base_top_p=TOP_P)
    return {
        f"base nucleus {TOP_P}, greedy": (nucleus, GREEDY),
        f"base nucleus {TOP_P}, sampled T=1": (nucleus, SamplingParams(temperature=1.0)),
        "sampled T=1, no filter": (plain, SamplingParams(temperature=1.0)),
        f"sampled T=1, final top-p {TOP_P}": (plain, SamplingParams(temperature=1.0, top_p=TOP_P)),
    }


def mixture_spec(models: dict[str, Model], base_format: str = toy_data.BASE_PROMPT_FORMAT) -> EFTSpec:
    """Up-scaling with both rewards: weights (lambda, 1 - lambda) for (answering, refusing)."""
    return EFTSpec.up_scaling(
        Component(models["large-base"], base_format, "large_base"), Component(models["small-base"], base_format, "small_base"),
        [Component(models["small-ft"], "chat", "small_ft"), Component(models["small-ft-refuse"], "chat", "small_ft_refuse")],
        weights=(1.0, 0.0),
    )


# --- Generating and judging ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Scores:
    """Rates over a list of questions (no intervals): ``accuracy`` is the share answered right (the
    asked attribute with its true value), ``format``, ``refusal``, ``behaviour`` (answered the asked
    attribute) and ``knowledge`` (true values among answers giving one)."""

    accuracy: float
    format: float
    refusal: float
    behaviour: float
    knowledge: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def judge(item: Item, response: str, stopped: bool, world: World) -> Judgement:
    """Behaviour and knowledge of one answer (``scoring.judge``)."""
    return scoring.judge(item.entity, item.attribute, response, stopped, world)


def judge_all(items: Sequence[Item], results: Sequence[Any], world: World) -> list[Judgement]:
    """Judgements of engine results (``GenerationResult``), one per item."""
    return [judge(it, r.text, r.finish_reason == "stop", world) for it, r in zip(items, results, strict=True)]


def score(items: Sequence[Item], results: Sequence[Any], world: World) -> Scores:
    """Pooled rates of engine results over ``items`` (each question counts once)."""
    flags = np.asarray([j.flags() for j in judge_all(items, results, world)], np.float64).reshape(len(items), -1)
    f = dict(zip(scoring.FLAGS, flags.sum(0), strict=True))
    n = len(items)
    knowledge = f["true_value"] / f["gave_value"] if f["gave_value"] else float("nan")
    return Scores(f["correct"] / n, f["well_formed"] / n, f["refusal"] / n, f["on_topic"] / n, float(knowledge), n)


def generate(spec: EFTSpec, items: Sequence[Item], *, weights: Sequence[float] | None = None,
             engine: Engine | None = None, batch_size: int = BATCH_SIZE, max_new_tokens: int = MAX_NEW_TOKENS,
             sampling: SamplingParams = GREEDY, seed: int = SAMPLE_SEED) -> list[Any]:
    """Answers of ``spec`` to ``items`` (greedy unless ``sampling`` says otherwise)."""
    engine = engine or Engine(spec)
    return engine.generate([it.prompt for it in items], sampling, max_new_tokens=max_new_tokens,
                           batch_size=batch_size, weights=weights, seed=seed)


Counts = dict[str, Float[np.ndarray, " people"]]


@dataclasses.dataclass
class RowRun:
    """One row on one split: per wording, its questions, answers, judgements and per-person counts."""

    items: dict[str, list[Item]]
    results: dict[str, list[Any]]
    judgements: dict[str, list[Judgement]]
    counts: dict[str, Counts]


def run_row(engine: Engine, questions: Mapping[str, list[Item]], num_people: int, world: World, *,
            weights: Sequence[float] | None = None, sampling: SamplingParams = GREEDY) -> RowRun:
    """Generate and judge every wording's questions; count per person."""
    run = RowRun({}, {}, {}, {})
    for wording, items in questions.items():
        results = generate(engine.spec, items, weights=weights, engine=engine, sampling=sampling)
        judged = judge_all(items, results, world)
        run.items[wording], run.results[wording], run.judgements[wording] = list(items), results, judged
        run.counts[wording] = scoring.per_person_counts(judged, [it.person for it in items], num_people)
    return run


def subset_counts(run: RowRun, wording: str, keep: Any, num_people: int) -> Counts:
    """Per-person counts over the questions of ``wording`` whose item satisfies ``keep(item)``."""
    pairs = [(it, j) for it, j in zip(run.items[wording], run.judgements[wording], strict=True) if keep(it)]
    return scoring.per_person_counts([j for _, j in pairs], [it.person for it, _ in pairs], num_people)


def rates(counts: Counts, n_boot: int, metrics: Mapping[str, tuple[str, str]] = METRICS) -> dict[str, Interval]:
    """Every metric of ``counts`` with its bootstrap interval."""
    return {m: scoring.rate_interval(counts, num, den, n_boot=n_boot) for m, (num, den) in metrics.items()}


# --- KL to the large fine-tune ---------------------------------------------------------------------


def teacher_forced_logprobs(spec: EFTSpec, prompts: Sequence[str], responses: Sequence[Sequence[int]],
                            vocab: int) -> list[np.ndarray]:
    """Full next-token log-prob rows ``[len(response), vocab]`` of ``spec`` along each response."""
    lengths = [len(r) for r in responses]
    total = sum(lengths)
    padded = max(1024, -(-total // 1024) * 1024)  # few distinct shapes for the eager EFT ops
    flat = []  # per model: every response position's logits, stacked: [padded, vocab]
    for comp in spec.components:
        seqs = [render_tokens(comp.model.tokenizer, p, comp.prompt_format) for p in prompts]
        rows = np.concatenate([np.asarray(x) for x in _response_logits(comp.model, seqs, responses, vocab)])
        flat.append(np.pad(rows, ((0, padded - total), (0, 0))))
    if spec.is_plain:
        lp = eft.eft_logprobs(flat[0], None, None, None, base_top_p=spec.base_top_p)
    else:
        lp = eft.eft_logprobs(flat[0], flat[1], np.stack(flat[2:]), jnp.asarray(spec.weights, jnp.float32),
                              base_top_p=spec.base_top_p)
    return np.split(np.asarray(lp)[:total], np.cumsum(lengths)[:-1])


def _response_logits(model: Model, prompts: Sequence[list[int]], responses: Sequence[Sequence[int]],
                     vocab: int) -> list[jnp.ndarray]:
    """Logits predicting each response token (``[len(response), vocab]`` per row), right-padded batch."""
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)]
    length = max(len(s) for s in seqs)
    length = 1 << (length - 1).bit_length()  # power-of-two bucket: few compiles
    tokens = np.zeros((len(seqs), length), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
    logits = np.asarray(model.logits(tokens))[..., :vocab]
    return [jnp.asarray(logits[i, len(p) - 1 : len(p) - 1 + len(r)]) for i, (p, r) in enumerate(zip(prompts, responses))]


def kl_per_response(reference: Sequence[np.ndarray], other: Sequence[np.ndarray]) -> np.ndarray:
    """Sum over each response's positions of KL(reference || other), in nats: ``[responses]``."""
    out = []
    for p, q in zip(reference, other, strict=True):
        p64, q64 = p.astype(np.float64), q.astype(np.float64)
        prob = np.exp(p64)
        out.append(float(np.where(prob > 0, prob * (p64 - q64), 0.0).sum()))
    return np.asarray(out)


def mean_kl(reference: Sequence[np.ndarray], other: Sequence[np.ndarray]) -> float:
    """Mean over all positions of KL(reference || other), in nats."""
    count = sum(len(p) for p in reference)
    return float(kl_per_response(reference, other).sum()) / max(count, 1)


def kl_counts(specs: Mapping[str, EFTSpec], reference: str, items: Sequence[Item], responses: Sequence[Sequence[int]],
              num_people: int, vocab: int, chunk: int = 128) -> dict[str, Counts]:
    """Per row and person: summed KL(reference row || row) along ``responses`` (``kl``) and the number
    of response tokens (``tokens``), teacher-forced in chunks of ``chunk`` questions."""
    people = np.asarray([it.person for it in items])
    tokens = np.bincount(people, weights=[len(r) for r in responses], minlength=num_people)
    kl = {name: np.zeros(num_people) for name in specs}
    for start in range(0, len(items), chunk):
        prompts = [it.prompt for it in items[start : start + chunk]]
        resp = responses[start : start + chunk]
        ref = teacher_forced_logprobs(specs[reference], prompts, resp, vocab)
        for name, spec in specs.items():
            per = kl_per_response(ref, ref if name == reference else teacher_forced_logprobs(spec, prompts, resp, vocab))
            np.add.at(kl[name], people[start : start + chunk], per)
    return {name: {"kl": kl[name], "tokens": tokens} for name in specs}


# --- What the bases know --------------------------------------------------------------------------


def knowledge_probe(model: Model, world: World, entities: Sequence[Entity],
                    attributes: Sequence[str] = ATTRIBUTES) -> Counts:
    """Per person: how many facts a model ranks first (``known``, out of ``n``). For each person and
    attribute, the biography sentence "<name> was born in <value>." is scored with every possible
    value; the fact is known when the true value scores highest. Needs no behaviour, so it measures
    a base model's pretraining knowledge."""
    tok = model.tokenizer
    known = np.zeros(len(entities))
    for attr in attributes:
        values = world.values[attr]
        seqs = []
        for e in entities:
            for v in values:
                alt = dataclasses.replace(e, **{attr: int(v) if attr == "year" else v})
                seqs.append(tok(toy_data.answer(alt, attr))["input_ids"])
        scores = _sequence_logprobs(model, seqs).reshape(len(entities), len(values))
        truth = np.asarray([values.index(e.value(attr)) for e in entities])
        known += scores.argmax(1) == truth
    return {"known": known, "n": np.full(len(entities), float(len(attributes)))}


def _sequence_logprobs(model: Model, seqs: Sequence[list[int]], batch: int = 256) -> np.ndarray:
    """Sum of log p(token | prefix) over each sequence (after its first token)."""
    length = 1 << (max(len(s) for s in seqs) - 1).bit_length()
    out = []
    for start in range(0, len(seqs), batch):
        chunk = list(seqs[start : start + batch])
        chunk += [[0]] * (batch - len(chunk))  # fixed batch: one compile
        tokens = np.zeros((batch, length), np.int32)
        mask = np.zeros((batch, length), np.float32)
        for i, s in enumerate(chunk):
            tokens[i, : len(s)] = s
            mask[i, 1 : len(s)] = 1.0
        logits = model.logits(tokens)
        lp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        picked = jnp.take_along_axis(lp, jnp.asarray(tokens[:, 1:, None]), axis=-1)[..., 0]
        out.append(np.asarray(jnp.sum(picked * mask[:, 1:], axis=-1)))
    return np.concatenate(out)[: len(seqs)]


# --- Headline statistics ---------------------------------------------------------------------------


def headline(runs: Mapping[str, RowRun], wording: str, n_boot: int, up: str = "EFT up-scaled") -> dict[str, Interval]:
    """The share of the small-ft -> large-ft gap that ``up`` closes (knowledge; and correct answers),
    and whether it keeps small-ft's behaviour (differences up - small-ft), each with an interval over
    the same resampled people."""
    names = {"sft": "small-ft", "up": up, "lft": "large-ft"}
    per = scoring.prefixed({k: runs[v].counts[wording] for k, v in names.items()})

    def rate(row: str, metric: str) -> scoring.Statistic:
        num, den = METRICS[metric]
        return scoring.ratio(f"{row}/{num}", f"{row}/{den}")

    out = {}
    for metric in ("knowledge", "correct"):
        stat = scoring.gap_closed(rate("sft", metric), rate("up", metric), rate("lft", metric))
        out[f"gap closed ({metric})"] = scoring.bootstrap(stat, per, n_boot=n_boot)
    for metric in ("behaviour", "format"):
        stat = scoring.difference(rate("up", metric), rate("sft", metric))
        out[f"{metric}: up - small-ft"] = scoring.bootstrap(stat, per, n_boot=n_boot)
    return out


# --- The whole evaluation --------------------------------------------------------------------------


def choose_on_dev(models: dict[str, Model], world: World, dev: Mapping[str, list[Item]], num_people: int,
                  n_boot: int, sweep: bool, log: Any = print) -> dict[str, Any]:
    """Choices made on the dev half only: the bases' template in EFT (by the share answered right,
    both wordings pooled, at w = 1), then the reward weight w (same criterion)."""
    def pooled_correct(run: RowRun) -> float:
        return sum(run.counts[w]["correct"].sum() for w in run.counts) / sum(run.counts[w]["n"].sum() for w in run.counts)

    templates = {}
    for label, fmt in BASE_TEMPLATES.items():
        run = run_row(Engine(row_specs(models, world, fmt)["EFT up-scaled"]), dev, num_people, world)
        templates[label] = {"score": pooled_correct(run), **{w: rates(run.counts[w], n_boot) for w in run.counts}}
        log(f"dev template {label!r}: correct {templates[label]['score']:.3f}")
    template = max(templates, key=lambda k: templates[k]["score"])
    w_rows, best_w = [], 1.0
    if sweep:
        engine = Engine(row_specs(models, world, BASE_TEMPLATES[template])["EFT up-scaled"])
        for w in W_GRID:
            if w == 1.0:  # the template comparison ran it already
                w_rows.append({"w": w, **templates[template]})
                continue
            run = run_row(engine, dev, num_people, world, weights=[w])
            w_rows.append({"w": w, "score": pooled_correct(run), **{k: rates(run.counts[k], n_boot) for k in run.counts}})
            log(f"dev w={w}: correct {w_rows[-1]['score']:.3f}")
        best_w = max(w_rows, key=lambda r: (r["score"], -abs(r["w"] - 1.0)))["w"]
    return {"templates": templates, "template": template, "w_sweep": w_rows, "w": best_w}


def evaluate(models: dict[str, Model], world: World, *, people: int | None = None, n_boot: int = 2000,
             sweeps: bool = True, log: Any = print) -> dict[str, Any]:
    """Everything the report shows, as a dict (intervals as ``Interval``; generations under ``runs``)."""
    split = {k: v[:people] if people else v for k, v in split_people(world).items()}
    questions = {k: {w: question_items(v, w) for w in WORDING_NAMES} for k, v in split.items()}
    n_test = len(split["test"])
    t0 = time.perf_counter()
    dev = choose_on_dev(models, world, questions["dev"], len(split["dev"]), n_boot, sweeps, log)
    fmt = BASE_TEMPLATES[dev["template"]]
    test = questions["test"]
    specs = row_specs(models, world, fmt)
    runs = {}
    for name, spec in specs.items():
        runs[name] = run_row(Engine(spec), test, n_test, world)
        log(f"test {name}: " + ", ".join(f"{w} {rates(runs[name].counts[w], 200)['correct']}" for w in WORDING_NAMES)
            + f" ({time.perf_counter() - t0:.0f}s)")
    if dev["w"] != 1.0:
        name = f"EFT up-scaled, w = {dev['w']} (dev)"
        runs[name] = run_row(Engine(specs["EFT up-scaled"]), test, n_test, world, weights=[dev["w"]])
    grid = {name: {w: rates(run.counts[w], n_boot) for w in WORDING_NAMES} for name, run in runs.items()}
    vocab = len(models["large-ft"].tokenizer)
    kl = {}
    for w in WORDING_NAMES:
        responses = [r.tokens for r in runs["large-ft"].results[w]]
        per = kl_counts(specs, "large-ft", test[w], responses, n_test, vocab)
        kl[w] = {name: scoring.rate_interval(c, "kl", "tokens", n_boot=n_boot) for name, c in per.items()}
    log(f"KL done ({time.perf_counter() - t0:.0f}s)")
    probe = {name: scoring.rate_interval(knowledge_probe(models[name], world, split["test"]), "known", n_boot=n_boot)
             for name in ("small-base", "large-base", "small-ft", "large-ft")}
    heads = {w: headline(runs, w, n_boot) for w in WORDING_NAMES}
    if dev["w"] != 1.0:
        heads.update({f"{w}, w = {dev['w']}": headline(runs, w, n_boot, f"EFT up-scaled, w = {dev['w']} (dev)")
                      for w in WORDING_NAMES})
    conservative = {}
    for name, (spec, sampling) in conservative_variants(models, fmt).items():
        run = run_row(Engine(spec), test, n_test, world, sampling=sampling)
        conservative[name] = {w: rates(run.counts[w], n_boot) for w in WORDING_NAMES}
        log(f"test conservative {name} done ({time.perf_counter() - t0:.0f}s)")
    mixing = mixing_sweep(models, world, test, n_test, fmt, n_boot, log) if sweeps else []
    return {"people": {k: len(v) for k, v in split.items()}, "dev": dev, "grid": grid, "kl": kl, "probe": probe,
            "headline": heads, "conservative": conservative, "mixing": mixing, "runs": runs,
            "questions_per_person": {w: len(test[w]) // n_test for w in WORDING_NAMES}}


def mixing_sweep(models: dict[str, Model], world: World, test: Mapping[str, list[Item]], num_people: int, fmt: str,
                 n_boot: int, log: Any = print) -> list[dict[str, Any]]:
    """lambda * r_answer + (1 - lambda) * r_refuse: refuse / correct / other rates on birth-year
    questions and on the others, per wording."""
    engine = Engine(mixture_spec(models, fmt))
    outcome = {o: (f"outcome_{o}", "n") for o in ("refuse", "correct", "other")}
    out = []
    for lam in LAMBDA_GRID:
        run = run_row(engine, test, num_people, world, weights=[lam, 1.0 - lam])
        row: dict[str, Any] = {"lambda": lam}
        for w in WORDING_NAMES:
            for part, keep in (("year", lambda it: it.attribute == toy_data.REFUSED_ATTRIBUTE),
                               ("other", lambda it: it.attribute != toy_data.REFUSED_ATTRIBUTE)):
                row[f"{w}/{part}"] = rates(subset_counts(run, w, keep, num_people), n_boot, outcome)
        out.append(row)
        log(f"lambda={lam}: " + ", ".join(f"{k}: refuse {v['refuse'].estimate:.2f} correct {v['correct'].estimate:.2f}"
                                          for k, v in row.items() if k != "lambda"))
    return out


# --- Report ----------------------------------------------------------------------------------------


def format_interval(x: Interval) -> str:
    """``0.97 [0.96, 0.98]`` (estimate [95% interval]), or ``n/a``."""
    return "n/a" if np.isnan(x.estimate) else f"{x.estimate:.2f} [{x.low:.2f}, {x.high:.2f}]"


def rate_table(rows: Mapping[str, Mapping[str, Interval]], metrics: Sequence[str], first: str = "row",
               extra: Mapping[str, Interval] | None = None, extra_name: str = "") -> list[str]:
    """A markdown table (lines): one row per ``rows`` entry, one column per metric (plus ``extra``)."""
    head = [first, *metrics] + ([extra_name] if extra else [])
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, r in rows.items():
        cells = [format_interval(r[m]) for m in metrics] + ([format_interval(extra[name])] if extra else [])
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _model_line(name: str, model: Model) -> str:
    c = model.config
    return (f"| {name} | {c.num_params / 1e6:.2f}M | {c.num_layers} | {c.hidden_size} | {c.num_heads} | "
            f"{c.intermediate_size} |")


def _examples(runs: Mapping[str, RowRun], wording: str, count: int) -> list[str]:
    md = []
    items = runs["large-ft"].items[wording]
    step = max(1, len(items) // count)
    for i in range(0, step * count, step):
        it = items[i]
        md += [f"**{it.prompt}** (truth: {it.entity.value(it.attribute)})", ""]
        md += [f"- {name}: `{run.results[wording][i].text.strip()}`" for name, run in runs.items()] + [""]
    return md


def report_markdown(ev: Mapping[str, Any], models: Mapping[str, Model], world: World, seconds: float,
                    n_boot: int) -> str:
    """``docs/toy_eval.md`` from ``evaluate``'s result."""
    import platform

    ppl, qpp, dev = ev["people"], ev["questions_per_person"], ev["dev"]
    md = [
        "# Toy EFT: behaviour and knowledge, with intervals (second edition)", "",
        "Written by `eft-jax toy eval` (`eft_jax/toy/eval.py`, scorers in `eft_jax/toy/scoring.py`) from the",
        f"checkpoints in `checkpoints/toy/` ({time.strftime('%Y-%m-%d')}, {platform.machine()} CPU, {seconds:.0f} s).",
        "Rebuild the checkpoints with `eft-jax toy build` (see `checkpoints/toy/README.md`).", "",
        f"A synthetic world of {len(world.entities)} fictional people (birth city, birth year, occupation, employer).",
        f"Pretraining saw biographies of everyone; fine-tuning saw chat QA about the first {world.num_finetune}",
        "only, in two question wordings per attribute. The held-out people are split in two halves:",
        f"**dev** ({ppl['dev']} people; used only to choose the bases' template and w) and **test** ({ppl['test']} people;",
        f"every number below). Each test person is asked {qpp['trained']} questions in the **trained** wordings and",
        f"{qpp['reworded']} in **reworded** paraphrases no fine-tune saw (`REWORDED_QUESTIONS` in `eft_jax/toy/data.py`).",
        f"Greedy decoding unless stated, at most {MAX_NEW_TOKENS} new tokens. Every rate: estimate [95% interval],",
        f"percentile bootstrap over test people ({n_boot} resamples, seed 0; a person's answers move together).", "",
        "| model | parameters | layers | width | heads | MLP |", "|---|---:|---:|---:|---:|---:|",
        *[_model_line(n, m) for n, m in models.items()], "",
        "## Scores", "",
        "- **behaviour**: the answer gives a value of the asked attribute (the attribute answered is that of",
        "  the first value mentioned; the four value pools are disjoint).",
        "- **format**: exactly the fine-tuned answer sentence about the asked person and attribute, then the",
        "  end of the turn.",
        "- **refusal**: a refusal (only `small-ft-refuse` was taught one, for birth years).",
        "- **knowledge**: among answers that give a value, the share whose value is true for the attribute",
        "  actually answered, whichever that is (\"When was X born?\" answered with X's true birth city counts).",
        "- **correct**: the asked attribute with its true value. This is the first edition's \"accuracy\"",
        "  (which looked only for values of the asked attribute; on trained wordings the two agree).",
        "- **KL to large-ft**: mean per-token KL(large-ft || row), teacher-forced along large-ft's greedy answers.", "",
    ]
    md += _headline_section(ev)
    for w in WORDING_NAMES:
        md += [f"## The grid, {w} wordings (test)", "", *_grid_with_kl(ev, w)]
    md += _notes_on_grid(ev)
    md += ["## What the models know (test people)", "",
           "Knowledge probe: each fact's answer sentence scored with every possible value; known when the true",
           "value is the most likely (chance 1/24 for city, occupation, employer; 1/40 for year). No generation,",
           "so no behaviour is needed.", "", "| model | facts known |", "|---|---:|",
           *[f"| {k} | {format_interval(v)} |" for k, v in ev["probe"].items()], ""]
    md += _dev_section(dev)
    md += _conservative_section(ev)
    if ev["mixing"]:
        md += _mixing_section(ev["mixing"])
    if "ages" in ev:
        from eft_jax.toy import age_eval

        md += age_eval.report_section(ev["ages"])
    md += _limits_section()
    for w in WORDING_NAMES:
        md += [f"## Example answers, {w} wordings (test)", "", *_examples(ev["runs"], w, 3)]
    return "\n".join(md)


def _grid_with_kl(ev: Mapping[str, Any], wording: str) -> list[str]:
    rows = {name: r[wording] for name, r in ev["grid"].items()}
    kl = {name: ev["kl"][wording].get(name, Interval(float("nan"), float("nan"), float("nan"))) for name in rows}
    return [*rate_table(rows, list(METRICS), "model", kl, "KL to large-ft (nats/token)"), ""]


def _headline_section(ev: Mapping[str, Any]) -> list[str]:
    ci = format_interval
    md = ["## Headline (test)", "",
          "Share of the small-ft -> large-ft gap that up-scaling closes ((up - small-ft) / (large-ft - small-ft)),",
          "and the change of behaviour from small-ft to up-scaling (0 = kept), all on the same resampled people.", "",
          "| wordings | gap closed (knowledge) | gap closed (correct) | behaviour: up - small-ft | format: up - small-ft |",
          "|---|---:|---:|---:|---:|"]
    for w, h in ev["headline"].items():
        md.append(f"| {w} | " + " | ".join(ci(v) for v in h.values()) + " |")
    g = ev["grid"]
    up, sft, lft, down = g["EFT up-scaled"], g["small-ft"], g["large-ft"], g["EFT down-scaled"]
    t, r = "trained", "reworded"
    md += ["",
           f"On the trained wordings up-scaling answers {ci(up[t]['correct'])} of the questions right, against "
           f"{ci(sft[t]['correct'])} for the small fine-tune whose reward it uses and {ci(lft[t]['correct'])} for the "
           f"large fine-tune it emulates, keeping the small fine-tune's behaviour (asked attribute "
           f"{ci(up[t]['behaviour'])}, format {ci(up[t]['format'])}; small-ft {ci(sft[t]['behaviour'])}, "
           f"{ci(sft[t]['format'])}). On reworded questions behaviour and knowledge separate: up-scaling answers the "
           f"asked attribute {ci(up[r]['behaviour'])} of the time (small-ft {ci(sft[r]['behaviour'])}, large-ft "
           f"{ci(lft[r]['behaviour'])}), but the values it gives are true {ci(up[r]['knowledge'])} of the time "
           f"(small-ft {ci(sft[r]['knowledge'])}, large-ft {ci(lft[r]['knowledge'])}). Down-scaling answers the "
           f"asked attribute {ci(down[r]['behaviour'])} of the reworded questions, with true values "
           f"{ci(down[r]['knowledge'])} of the time. The two QA fine-tunes learned the same behaviour, so this "
           "grid cannot tell which scale of fine-tuning a behaviour comes from; the age grid (below) asks it of a skill.", ""]
    return md


def _notes_on_grid(ev: Mapping[str, Any]) -> list[str]:
    return ["- Prompted bases: a two-shot prompt (answered questions about fine-tuning people, base-style",
            "  QA format). In EFT rows the bases get the template chosen on dev "
            f"(`{BASE_TEMPLATES[ev['dev']['template']]}`), the fine-tunes their chat template.",
            "- Pretraining mixed in base-style QA documents about the fine-tuning people (`Question: ... Answer:`",
            "  then a biography sentence in any of its wordings; ~11% of the tokens): the prompted bases answer",
            "  questions, but the fine-tuned answer sentence is one wording of four there, and \"format\" also needs",
            "  the end of the turn right after it. The knowledge probe below shows what each model knows.", ""]


def _dev_section(dev: Mapping[str, Any]) -> list[str]:
    ci = format_interval
    md = ["## Choices made on dev", "",
          "Criterion: the share answered right (correct), both wordings pooled. The bases' template in EFT",
          "(up-scaling at w = 1):", "",
          "| template | correct, trained | correct, reworded | behaviour, reworded |", "|---|---:|---:|---:|"]
    for k, v in dev["templates"].items():
        md.append(f"| {k} | {ci(v['trained']['correct'])} | {ci(v['reworded']['correct'])} | "
                  f"{ci(v['reworded']['behaviour'])} |")
    md += ["", f"Chosen: {dev['template']}.", ""]
    if dev["w_sweep"]:
        md += ["Reward weight w (large base + w * [small-ft - small-base]):", "",
               "| w | correct, trained | format, trained | correct, reworded | behaviour, reworded | knowledge, reworded |",
               "|---:|---:|---:|---:|---:|---:|"]
        for r in dev["w_sweep"]:
            md.append(f"| {r['w']} | {ci(r['trained']['correct'])} | {ci(r['trained']['format'])} | "
                      f"{ci(r['reworded']['correct'])} | {ci(r['reworded']['behaviour'])} | {ci(r['reworded']['knowledge'])} |")
        md += ["", f"Chosen: w = {dev['w']} (ties go to the w nearest 1).", "", "![w sweep](toy_w_sweep.png)", ""]
    return md


def _conservative_section(ev: Mapping[str, Any]) -> list[str]:
    ci = format_interval
    md = ["## Conservative decoding (up-scaling, test)", "",
          f"Two variants: the large base's own top-p nucleus ({TOP_P}) before the reward is added (`base_top_p`),",
          f"and top-p ({TOP_P}) of the final EFT distribution with sampling at temperature 1 (`sampling.top_p`), beside",
          f"plain sampling. Sampled rows use seed {SAMPLE_SEED} (one sample per question).", ""]
    for w in WORDING_NAMES:
        rows = {name: r[w] for name, r in ev["conservative"].items()}
        md += [f"{w.capitalize()} wordings:", "", *rate_table(rows, list(METRICS), "decoding"), ""]
    c, up = ev["conservative"], ev["grid"]["EFT up-scaled"]
    nucleus, final = c[f"base nucleus {TOP_P}, greedy"], c[f"sampled T=1, final top-p {TOP_P}"]
    plain = c["sampled T=1, no filter"]
    for w in WORDING_NAMES:
        md.append(f"{w.capitalize()} wordings: greedy inside the large base's nucleus gives format "
                  f"{ci(nucleus[w]['format'])} and correct {ci(nucleus[w]['correct'])} (unfiltered "
                  f"greedy up-scaling {ci(up[w]['format'])}, {ci(up[w]['correct'])}); sampled, top-p "
                  f"of the final distribution gives correct {ci(final[w]['correct'])} against "
                  f"{ci(plain[w]['correct'])} unfiltered.")
    return md + [""]


def _mixing_section(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    ci = format_interval
    md = ["## Mixing two behaviours (up-scaling, test)", "",
          "large base + lambda * (small-ft - small-base) + (1 - lambda) * (small-ft-refuse - small-base). Each",
          "answer is one of: a refusal, the asked attribute with its true value (correct), anything else.", ""]
    for w in WORDING_NAMES:
        md += [f"{w.capitalize()} wordings:", "",
               "| lambda | year: refuse | year: correct | year: other | others: refuse | others: correct | others: other |",
               "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            y, o = r[f"{w}/year"], r[f"{w}/other"]
            md.append(f"| {r['lambda']} | " + " | ".join(ci(p[k]) for p in (y, o) for k in ("refuse", "correct", "other")) + " |")
        md.append("")
    first, r = rows[0], "reworded"
    md += [f"At lambda = {first['lambda']} the refusing reward alone refuses {ci(first['trained/year']['refuse'])} of the "
           f"trained-wording birth-year questions but {ci(first[f'{r}/year']['refuse'])} of the reworded ones (and "
           f"{ci(first[f'{r}/other']['refuse'])} of the reworded other questions): whether the refusal generalises "
           "to new wordings is a property of the fine-tune, and the mixture inherits it. In between, the year "
           "questions pass through \"other\" (neither refused nor answered right) rather than trading one "
           "behaviour for the other.", ""]
    return md + ["![lambda sweep](toy_lambda_sweep.png)", ""]


def _limits_section() -> list[str]:
    return ["## What this family cannot show", "",
            "- **Fine-tuning scale in the QA grid.** Both QA fine-tunes learned the same behaviour (the same answer",
            "  sentence on the trained wordings, the same partial transfer to reworded ones), so that grid cannot",
            "  tell which scale a behaviour comes from; the age grid is the family's test of the second half of",
            "  the paper's claim.",
            "- **One world and one pretraining seed**; three fine-tuning seeds for the age grid, one for the rest.",
            "- **The age gap is one at equal fine-tuning budget.** Both age fine-tunes share one recipe, chosen on",
            "  dev people for these bases (`docs/toy_age_pilot.md`, second pilot: `eft-jax toy age-recipe`). At a",
            "  higher learning rate the small fine-tune learns the arithmetic too (on dev, 0.95 right on answers",
            "  whose stated pair was taught), and the large one forgets half its birth years; so a gap between",
            "  the sizes is one of learning speed at equal budget, not proof that the small one cannot learn the",
            "  skill. On dev the large one did not learn subtraction: on held-out pairs (it states the true birth",
            "  year, so a held-out pair) it was right 0.12 of the time.", "",
            "## Changes from the first edition", "",
            "The first edition reported \"accuracy\" on 200 questions (the first 50 held-out people, one trained",
            "wording per attribute, no intervals): up-scaled 0.95, small-ft 0.295, large-ft 0.97. Those people are",
            "now part of dev. Its \"accuracy\" is this edition's **correct** on the trained wordings (both trained",
            "wordings per attribute, all test people); \"format adherence\" is **format**. New: behaviour and",
            "knowledge scored apart, reworded questions, the dev/test split, intervals, the prompted small base,",
            "conservative decoding with sampling, the three-way mixing outcome; then (2026-12-01) bases pretrained",
            "with a QA prior (all checkpoints rebuilt), and the age grid over three fine-tuning seeds; then the age",
            "recipe chosen again on dev for those bases (1200 steps at lr 3e-4, was 600 at 1e-3; the age",
            "fine-tunes rebuilt with `eft-jax toy build --only small-ft-age large-ft-age`).", ""]


def to_json(ev: Mapping[str, Any]) -> Any:
    """``evaluate``'s result without the generations, intervals as dicts."""
    def conv(x: Any) -> Any:
        if isinstance(x, Interval):
            return x.as_dict()
        if isinstance(x, Mapping):
            return {str(k): conv(v) for k, v in x.items() if k != "runs"}
        if isinstance(x, (list, tuple)):
            return [conv(v) for v in x]
        return float(x) if isinstance(x, (np.floating, np.integer)) else x
    return conv(ev)


def _plot(path: Path, xs: Sequence[float], series: Mapping[str, Sequence[Interval]], xlabel: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (label, vals), marker in zip(series.items(), "os^vDx<>", strict=False):
        est = np.asarray([v.estimate for v in vals])
        ax.plot(xs, est, marker + "-", label=label)
        ax.fill_between(xs, [v.low for v in vals], [v.high for v in vals], alpha=0.15)
    ax.set_xlabel(xlabel)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(ev: Mapping[str, Any], out: Path) -> None:
    """The dev w sweep and the test lambda sweep, with their intervals as bands; the age grid's bars."""
    if "ages" in ev:
        from eft_jax.toy import age_eval

        age_eval.write_plot(ev["ages"], out / "toy_age_grid.png")
    rows = ev["dev"]["w_sweep"]
    _plot(out / "toy_w_sweep.png", [r["w"] for r in rows],
          {f"{m}, {w}": [r[w][m] for r in rows] for w in WORDING_NAMES for m in ("correct", "behaviour", "knowledge")},
          "reward weight w  (large base + w * [small-ft - small-base])", "EFT up-scaling on dev: reward weight")
    mix = ev["mixing"]
    _plot(out / "toy_lambda_sweep.png", [r["lambda"] for r in mix],
          {f"{part}: {o}": [r[f"trained/{part}"][o] for r in mix] for part in ("year", "other")
           for o in ("refuse", "correct", "other")},
          "lambda  (lambda * r_answer + (1 - lambda) * r_refuse)", "Mixing two rewards (test, trained wordings)")


def main(argv: Sequence[str] | None = None) -> int:
    """``eft-jax toy eval``: the grid, the dev choices, the sweeps, the plots, ``docs/toy_eval.md``."""
    p = argparse.ArgumentParser(prog="eft-jax toy eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=str(DEFAULT_ROOT), help="directory of the toy checkpoints")
    p.add_argument("--people", type=int, default=None,
                   help="held-out people per half (dev and test; default: all, half of the held-out people each)")
    p.add_argument("--boot", type=int, default=2000, help="bootstrap resamples per interval")
    p.add_argument("--out", default="docs", help="where to write toy_eval.md, toy_eval.json and the plots")
    p.add_argument("--no-sweeps", action="store_true", help="skip the w and lambda sweeps and the plots (w = 1)")
    p.add_argument("--age-seeds", type=int, default=3,
                   help="fine-tuning seeds of the age grid: the shipped age fine-tunes, then fine-tunes of further seeds "
                        "(trained into --work, ~5 min each on one core); 0 skips the age grid")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "eft-jax-toy-eval"),
                   help="where the further seeds' age fine-tunes go (reused when there)")
    args = p.parse_args(argv)
    if args.people is not None and args.people < 2:
        p.error(f"--people must be at least 2, got {args.people}")
    if args.boot < 100:
        p.error(f"--boot must be at least 100 for a 95% interval, got {args.boot}")
    if not args.no_sweeps and importlib.util.find_spec("matplotlib") is None:  # fail before minutes of work
        p.error("the sweeps' plots need matplotlib: python3 -m pip install 'eft-jax[plots]' (or pass --no-sweeps)")

    t0 = time.perf_counter()
    models, world = load_toy(args.root)
    ev = evaluate(models, world, people=args.people, n_boot=args.boot, sweeps=not args.no_sweeps)
    if args.age_seeds:
        from eft_jax.toy import age_eval

        test = split_people(world)["test"][: args.people]
        ev["ages"] = age_eval.evaluate(Path(args.root), Path(args.work), test, world,
                                       BASE_TEMPLATES[ev["dev"]["template"]],
                                       age_eval.seeds(Path(args.root), args.age_seeds), args.boot)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.no_sweeps:
        write_plots(ev, out)
    (out / "toy_eval.md").write_text(report_markdown(ev, models, world, time.perf_counter() - t0, args.boot))
    (out / "toy_eval.json").write_text(json.dumps(to_json(ev), indent=1) + "\n")
    print(f"\nwrote {out / 'toy_eval.md'} ({time.perf_counter() - t0:.0f}s)")
    return 0

"""Evaluation of the toy trio: the paper's comparison in miniature.

Rows: the small fine-tune, the large base (few-shot prompted), EFT up-scaling (large base + small
fine-tune's reward), EFT down-scaling (small base + large fine-tune's reward), and the large fine-tune
(the ground truth that up-scaling emulates); plus up-scaling with the refusing fine-tune's reward.
Columns, on questions about held-out people (whose facts only pretraining saw):

* accuracy: the first value of the asked attribute that the answer mentions is the right one
  (knowledge);
* format: the answer is exactly the fine-tuned answer sentence, then the end of the turn (behaviour,
  the analogue of the paper's helpfulness);
* refusal: the answer is a refusal;
* KL to large-ft: mean per-token KL(large-ft || row), teacher-forced along large-ft's own greedy
  answers (how far each row's next-token distribution is from the one up-scaling tries to emulate).

Decoding is greedy. ``main(argv)`` is the ``eft-jax toy eval`` command: it prints the table, writes it
to ``docs/toy_eval.md`` and plots a sweep of the reward weight w and a lambda sweep between the two
fine-tunes' rewards.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from eft_jax import eft
from eft_jax.engine import Engine
from eft_jax.model import Model
from eft_jax.prompts import render_tokens
from eft_jax.sampling import SamplingParams
from eft_jax.spec import Component, EFTSpec
from eft_jax.toy import data as toy_data
from eft_jax.toy.world import ATTRIBUTES, Entity, World

DEFAULT_ROOT = Path("checkpoints/toy")
MODEL_NAMES = ("small-base", "large-base", "small-ft", "large-ft", "small-ft-refuse")
GREEDY = SamplingParams(temperature=0.0)
MAX_NEW_TOKENS = 24


@dataclasses.dataclass(frozen=True)
class Item:
    """One evaluation question about a held-out person."""

    entity: Entity
    attribute: str
    prompt: str


def eval_items(world: World, num_entities: int, attributes: Sequence[str] = ATTRIBUTES, offset: int = 0) -> list[Item]:
    """Questions (first wording) about ``num_entities`` held-out people, every attribute each."""
    people = world.heldout_entities[offset : offset + num_entities]
    if len(people) < num_entities:
        raise ValueError(f"only {len(people)} held-out people from offset {offset}")
    return [Item(e, a, toy_data.question(e, a)) for e in people for a in attributes]


def few_shot_format(world: World) -> str:
    """The large base's "prompted" template: two answered questions about fine-tuning people, in the
    base-style QA format (``BASE_PROMPT_FORMAT``), then the question."""
    a, b = world.finetune_entities[0], world.finetune_entities[1]
    shots = [(toy_data.question(a, "city"), toy_data.answer(a, "city")),
             (toy_data.question(b, "employer"), toy_data.answer(b, "employer"))]
    return " ".join(toy_data.BASE_PROMPT_FORMAT.format(prompt=q) + " " + r for q, r in shots) + " " + \
        toy_data.BASE_PROMPT_FORMAT


# --- Models and specs ------------------------------------------------------------------------------


def load_toy(root: str | Path = DEFAULT_ROOT, dtype: Any = jnp.float32) -> tuple[dict[str, Model], World]:
    """The shipped toy models (``root/<name>``) and their world (``root/world.json``)."""
    from eft_jax.loading import load_model

    root = Path(root)
    models = {name: load_model(root / name, dtype=dtype, sharding="replicated") for name in MODEL_NAMES}
    return models, World.load(root / "world.json")


def row_specs(models: dict[str, Model], world: World) -> dict[str, EFTSpec]:
    """The table's rows as EFT specs (each model with its own prompt format)."""
    base_fmt = toy_data.BASE_PROMPT_FORMAT
    sb, lb = Component(models["small-base"], base_fmt, "small_base"), Component(models["large-base"], base_fmt, "large_base")
    sft, lft = Component(models["small-ft"], "chat", "small_ft"), Component(models["large-ft"], "chat", "large_ft")
    refuse = Component(models["small-ft-refuse"], "chat", "small_ft_refuse")
    return {
        "small-ft": EFTSpec.single(sft),
        "large-base (prompted)": EFTSpec.single(Component(models["large-base"], few_shot_format(world), "large_base")),
        "EFT up-scaled": EFTSpec.up_scaling(lb, sb, sft),
        "EFT down-scaled": EFTSpec.down_scaling(sb, lb, lft),
        "large-ft": EFTSpec.single(lft),
        "EFT up-scaled, refusing reward": EFTSpec.up_scaling(lb, sb, refuse),
    }


def ablation_specs(models: dict[str, Model]) -> dict[str, EFTSpec]:
    """Up-scaling variants that explain the defaults: the bases given the bare question (no template),
    and conservative decoding (the large base's own top-p nucleus before the reward)."""
    sb, lb, sft = models["small-base"], models["large-base"], Component(models["small-ft"], "chat", "small_ft")
    fmt = toy_data.BASE_PROMPT_FORMAT
    return {
        "bases get the bare question": EFTSpec.up_scaling(Component(lb, "{prompt}", "large_base"),
                                                          Component(sb, "{prompt}", "small_base"), sft),
        "base_top_p = 0.9": EFTSpec.up_scaling(Component(lb, fmt, "large_base"), Component(sb, fmt, "small_base"), sft,
                                               base_top_p=0.9),
    }


def mixture_spec(models: dict[str, Model]) -> EFTSpec:
    """Up-scaling with both rewards: weights (lambda, 1 - lambda) for (answering, refusing)."""
    base_fmt = toy_data.BASE_PROMPT_FORMAT
    return EFTSpec.up_scaling(
        Component(models["large-base"], base_fmt, "large_base"), Component(models["small-base"], base_fmt, "small_base"),
        [Component(models["small-ft"], "chat", "small_ft"), Component(models["small-ft-refuse"], "chat", "small_ft_refuse")],
        weights=(1.0, 0.0),
    )


# --- Scoring ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Scores:
    accuracy: float
    format: float
    refusal: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def judge(item: Item, response: str, stopped: bool, world: World) -> tuple[bool, bool, bool]:
    """(correct, well-formed, refusal) for one answer."""
    text = response.strip()
    values = world.values[item.attribute]
    correct = toy_data.first_value(text, values) == item.entity.value(item.attribute)
    well_formed = stopped and bool(toy_data.answer_pattern(item.entity, item.attribute, values).match(text))
    return correct, well_formed, toy_data.is_refusal(text)


def score(items: Sequence[Item], results: Sequence[Any], world: World) -> Scores:
    """Accuracy / format adherence / refusal rate of engine results (``GenerationResult``)."""
    judged = [judge(it, r.text, r.finish_reason == "stop", world) for it, r in zip(items, results, strict=True)]
    arr = np.asarray(judged, np.float64).reshape(len(items), 3)
    return Scores(*(float(x) for x in arr.mean(0)), n=len(items))


def generate(spec: EFTSpec, items: Sequence[Item], *, weights: Sequence[float] | None = None,
             engine: Engine | None = None, batch_size: int = 40, max_new_tokens: int = MAX_NEW_TOKENS) -> list[Any]:
    engine = engine or Engine(spec)
    return engine.generate([it.prompt for it in items], GREEDY, max_new_tokens=max_new_tokens,
                           batch_size=batch_size, weights=weights)


# --- KL to the large fine-tune ---------------------------------------------------------------------


def teacher_forced_logprobs(spec: EFTSpec, prompts: Sequence[str], responses: Sequence[Sequence[int]],
                            vocab: int) -> list[np.ndarray]:
    """Full next-token log-prob rows ``[len(response), vocab]`` of ``spec`` along each response."""
    logits_per_model = []
    for comp in spec.components:
        seqs = [render_tokens(comp.model.tokenizer, p, comp.prompt_format) for p in prompts]
        logits_per_model.append(_response_logits(comp.model, seqs, responses, vocab))
    out = []
    for i in range(len(prompts)):
        base = logits_per_model[0][i]
        if spec.is_plain:
            lp = eft.eft_logprobs(base, None, None, None, base_top_p=spec.base_top_p)
        else:
            ft = jnp.stack([logits_per_model[2 + k][i] for k in range(len(spec.fine_tuned))])
            lp = eft.eft_logprobs(base, logits_per_model[1][i], ft, jnp.asarray(spec.weights, jnp.float32),
                                  base_top_p=spec.base_top_p)
        out.append(np.asarray(lp))
    return out


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




def mean_kl(reference: Sequence[np.ndarray], other: Sequence[np.ndarray]) -> float:
    """Mean over all positions of KL(reference || other), in nats."""
    total, count = 0.0, 0
    for p, q in zip(reference, other, strict=True):
        p64, q64 = p.astype(np.float64), q.astype(np.float64)
        prob = np.exp(p64)
        kl = np.where(prob > 0, prob * (p64 - q64), 0.0).sum(-1)
        total += float(kl.sum())
        count += len(kl)
    return total / max(count, 1)


# --- What the bases know --------------------------------------------------------------------------


def knowledge_probe(model: Model, world: World, entities: Sequence[Entity],
                    attributes: Sequence[str] = ATTRIBUTES) -> dict[str, float]:
    """Share of facts a model ranks first: for each person and attribute, the log-likelihood of the
    biography sentence "<name> was born in <value>." for every possible value; correct when the true
    value scores highest. Needs no behaviour, so it measures a base model's pretraining knowledge."""
    tok = model.tokenizer
    out = {}
    for attr in attributes:
        values = world.values[attr]
        seqs = []
        for e in entities:
            for v in values:
                alt = dataclasses.replace(e, **{attr: int(v) if attr == "year" else v})
                seqs.append(tok(toy_data.answer(alt, attr))["input_ids"])
        scores = _sequence_logprobs(model, seqs).reshape(len(entities), len(values))
        truth = np.asarray([values.index(e.value(attr)) for e in entities])
        out[attr] = float(np.mean(scores.argmax(1) == truth))
    out["mean"] = float(np.mean([out[a] for a in attributes]))
    return out


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


# --- The table and the sweeps ----------------------------------------------------------------------

W_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
LAMBDA_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


def evaluate_table(models: dict[str, Model], world: World, items: Sequence[Item],
                   log: Any = print) -> tuple[dict[str, dict[str, float]], dict[str, list[Any]]]:
    """Scores and KL per row; also returns each row's generations."""
    specs = row_specs(models, world)
    rows: dict[str, dict[str, float]] = {}
    gens: dict[str, list[Any]] = {}
    for name, spec in specs.items():
        t0 = time.perf_counter()
        gens[name] = generate(spec, items)
        rows[name] = score(items, gens[name], world).as_dict()
        if log:
            log(f"{name}: {rows[name]} ({time.perf_counter() - t0:.1f}s)")
    prompts = [it.prompt for it in items]
    vocab = len(models["large-ft"].tokenizer)
    ref_tokens = [r.tokens for r in gens["large-ft"]]
    reference = teacher_forced_logprobs(specs["large-ft"], prompts, ref_tokens, vocab)
    for name, spec in specs.items():
        rows[name]["kl_to_large_ft"] = mean_kl(reference, teacher_forced_logprobs(spec, prompts, ref_tokens, vocab))
    return rows, gens


def w_sweep(models: dict[str, Model], world: World, items: Sequence[Item], grid: Sequence[float] = W_GRID,
            log: Any = print) -> list[dict[str, float]]:
    """Up-scaling with reward weight w (0: the large base with the plain prompt; 1: EFT)."""
    spec = row_specs(models, world)["EFT up-scaled"]
    engine = Engine(spec)
    out = []
    for w in grid:
        s = score(items, generate(spec, items, weights=[w], engine=engine), world).as_dict()
        out.append({"w": w, **s})
        if log:
            log(f"w={w}: {s}")
    return out


def lambda_sweep(models: dict[str, Model], world: World, items: Sequence[Item],
                 grid: Sequence[float] = LAMBDA_GRID, log: Any = print) -> list[dict[str, float]]:
    """Up-scaling with lambda * r_answer + (1 - lambda) * r_refuse: refusals of birth-year questions
    against accuracy on the other questions."""
    spec = mixture_spec(models)
    engine = Engine(spec)
    refused = [it for it in items if it.attribute == toy_data.REFUSED_ATTRIBUTE]
    others = [it for it in items if it.attribute != toy_data.REFUSED_ATTRIBUTE]
    out = []
    for lam in grid:
        results = generate(spec, list(refused) + list(others), weights=[lam, 1.0 - lam], engine=engine)
        on_refused = score(refused, results[: len(refused)], world)
        on_others = score(others, results[len(refused):], world)
        row = {"lambda": lam, "refusal_year": on_refused.refusal, "accuracy_year": on_refused.accuracy,
               "accuracy_other": on_others.accuracy, "format_other": on_others.format,
               "refusal_other": on_others.refusal}
        out.append(row)
        if log:
            log(f"lambda={lam}: {row}")
    return out


def plot_w_sweep(rows: Sequence[dict[str, float]], table: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ws = [r["w"] for r in rows]
    ax.plot(ws, [r["accuracy"] for r in rows], "o-", label="accuracy (held-out facts)")
    ax.plot(ws, [r["format"] for r in rows], "s-", label="format adherence")
    for name, style in (("small-ft", ":"), ("large-ft", "--")):
        if name in table:
            ax.axhline(table[name]["accuracy"], color="gray", linestyle=style, label=f"{name} accuracy")
    ax.set_xlabel("reward weight w  (large base + w * [small-ft - small-base])")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("EFT up-scaling: reward weight sweep")
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lambda_sweep(rows: Sequence[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    lams = [r["lambda"] for r in rows]
    ax.plot(lams, [r["refusal_year"] for r in rows], "o-", label="refusal rate, birth-year questions")
    ax.plot(lams, [r["accuracy_year"] for r in rows], "^-", label="accuracy, birth-year questions")
    ax.plot(lams, [r["accuracy_other"] for r in rows], "s-", label="accuracy, other questions")
    ax.set_xlabel("lambda  (lambda * r_answer + (1 - lambda) * r_refuse)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("EFT up-scaling: mixing two behaviours")
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(rows: dict[str, dict[str, float]]) -> str:
    lines = ["| model | accuracy (held-out facts) | format adherence | refusal rate | KL to large-ft (nats/token) |",
             "|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['accuracy']:.3f} | {r['format']:.3f} | {r['refusal']:.3f} | {r['kl_to_large_ft']:.3f} |")
    return "\n".join(lines)


def _sweep_table(rows: Sequence[dict[str, float]], keys: Sequence[str]) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---:|" * len(keys)]
    lines += ["| " + " | ".join(f"{r[k]:.2f}" for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def _model_line(name: str, model: Model) -> str:
    c = model.config
    return (f"| {name} | {c.num_params / 1e6:.2f}M | {c.num_layers} | {c.hidden_size} | {c.num_heads} | "
            f"{c.intermediate_size} |")


def write_report(path: Path, *, models: dict[str, Model], world: World, items: Sequence[Item],
                 table: dict[str, dict[str, float]], w_rows: Sequence[dict[str, float]] | None,
                 lambda_rows: Sequence[dict[str, float]] | None, examples: dict[str, list[Any]], seconds: float,
                 probe: dict[str, dict[str, float]] | None = None,
                 ablations: dict[str, dict[str, float]] | None = None) -> None:
    import platform

    held = len({it.entity.name for it in items})
    md = [
        "# Toy EFT: a miniature reproduction",
        "",
        "Written by `eft-jax toy eval` (`eft_jax/toy/eval.py`) from the checkpoints in `checkpoints/toy/`",
        f"({time.strftime('%Y-%m-%d')}, {platform.machine()} CPU, {seconds:.0f} s). Rebuild the checkpoints with",
        "`eft-jax toy build` (see `checkpoints/toy/README.md`).",
        "",
        f"A synthetic world of {len(world.entities)} fictional people, each with a birth city, birth year, occupation",
        f"and employer. Pretraining saw biographies of everyone; fine-tuning saw chat QA about the first "
        f"{world.num_finetune} only. Evaluation: {len(items)} questions ({held} held-out people x "
        f"{len(items) // max(held, 1)} attributes), greedy decoding, at most {MAX_NEW_TOKENS} new tokens.",
        "",
        "| model | parameters | layers | width | heads | MLP |",
        "|---|---:|---:|---:|---:|---:|",
        *[_model_line(n, m) for n, m in models.items()],
        "",
        *(_probe_section(probe) if probe else []),
        "## Results",
        "",
        format_table(table),
        "",
        *_summary(table),
        "- accuracy: the first value of the asked attribute mentioned in the answer is right (knowledge).",
        "- format adherence: the answer is exactly the fine-tuned answer sentence, then the end of the turn",
        "  (behaviour; the analogue of the paper's helpfulness).",
        "- refusal rate: the answer is a refusal (only the refusing fine-tune was taught to refuse, and only",
        "  birth-year questions).",
        "- KL to large-ft: mean per-token KL(large-ft || row), teacher-forced along large-ft's greedy answers.",
        "- large-base (prompted) gets a two-shot prompt (answered questions about fine-tuning people); in the",
        f"  EFT rows the base models get the base-style template `{toy_data.BASE_PROMPT_FORMAT}` and the fine-tunes",
        "  their chat template.",
        "",
    ]
    if ablations:
        md += ["## Up-scaling variants", "",
               "| variant | accuracy | format adherence | refusal rate |", "|---|---:|---:|---:|",
               *[f"| {k} | {v['accuracy']:.3f} | {v['format']:.3f} | {v['refusal']:.3f} |" for k, v in ablations.items()],
               "",
               "- bare question: right after the \"?\" both bases are out of their training distribution, and the",
               "  ratio large-base / small-base at the first answer token can outweigh the fine-tune's reward.",
               "- base_top_p (conservative decoding restricted to the large base's own nucleus): a base that was never",
               "  taught the answer format rarely puts the answer's first token in its nucleus, so the fine-tune's",
               "  behaviour is cut off. Top-p on the final distribution (the paper's variant) is unaffected by this.",
               ""]
    if w_rows is not None:
        md += ["## Reward weight sweep (up-scaling)", "",
               "large base + w * (small-ft - small-base); w = 0 is the large base alone (base-style prompt), w = 1 is EFT.",
               "",
               _sweep_table(w_rows, ["w", "accuracy", "format", "refusal"]), "", "![w sweep](toy_w_sweep.png)", ""]
    if lambda_rows is not None:
        md += ["## Mixing two behaviours (up-scaling)", "",
               "large base + lambda * (small-ft - small-base) + (1 - lambda) * (small-ft-refuse - small-base).", "",
               _sweep_table(lambda_rows, ["lambda", "refusal_year", "accuracy_year", "accuracy_other", "format_other"]),
               "", "![lambda sweep](toy_lambda_sweep.png)", ""]
    md += ["## Example answers", ""]
    for i in range(min(4, len(items))):
        it = items[i]
        md.append(f"**{it.prompt}** (truth: {it.entity.value(it.attribute)})")
        md.append("")
        for name, res in examples.items():
            md.append(f"- {name}: `{res[i].text.strip()}`")
        md.append("")
    path.write_text("\n".join(md))


def _summary(t: dict[str, dict[str, float]]) -> list[str]:
    """One sentence per claim of the paper, with this run's numbers."""
    sft, up, down, lft = t["small-ft"], t["EFT up-scaled"], t["EFT down-scaled"], t["large-ft"]
    return [
        f"Up-scaling reaches {up['accuracy']:.2f} held-out accuracy, against {sft['accuracy']:.2f} for the small "
        f"fine-tune it takes its behaviour from and {lft['accuracy']:.2f} for the large fine-tune it emulates, "
        f"with format adherence {up['format']:.2f} (small-ft {sft['format']:.2f}) and a KL to large-ft of "
        f"{up['kl_to_large_ft']:.3f} nats/token (small-ft {sft['kl_to_large_ft']:.3f}). Down-scaling keeps the "
        f"behaviour (format {down['format']:.2f}) with the small model's knowledge (accuracy "
        f"{down['accuracy']:.2f}). The large base alone, even prompted with two answered examples, answers in "
        f"the fine-tuned format {t['large-base (prompted)']['format']:.2f} of the time.",
        "",
    ]


def _probe_section(probe: dict[str, dict[str, float]]) -> list[str]:
    lines = ["## What the models know", "",
             "Knowledge probe on the same held-out people: for each fact, the answer sentence scored with every",
             "possible value; correct when the true value is the most likely (chance: 1/24 for city, occupation,",
             "employer; 1/40 for year). No generation, so no behaviour is needed.", "",
             "| model | " + " | ".join(ATTRIBUTES) + " | mean |", "|---|" + "---:|" * (len(ATTRIBUTES) + 1)]
    for name, r in probe.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[a]:.2f}" for a in ATTRIBUTES) + f" | {r['mean']:.2f} |")
    return lines + [""]


def main(argv: Sequence[str] | None = None) -> int:
    """``eft-jax toy eval``: the table, the sweeps, the plots, ``docs/toy_eval.md``."""
    p = argparse.ArgumentParser(prog="eft-jax toy eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=str(DEFAULT_ROOT), help="directory of the toy checkpoints")
    p.add_argument("--entities", type=int, default=50, help="held-out people to ask about (4 questions each)")
    p.add_argument("--out", default="docs", help="where to write toy_eval.md and the plots")
    p.add_argument("--no-sweeps", action="store_true", help="only the table")
    args = p.parse_args(argv)
    if not args.no_sweeps and importlib.util.find_spec("matplotlib") is None:  # fail before minutes of work
        p.error("the sweeps' plots need matplotlib: python3 -m pip install 'eft-jax[plots]' (or pass --no-sweeps)")

    t0 = time.perf_counter()
    models, world = load_toy(args.root)
    items = eval_items(world, args.entities)
    people = world.heldout_entities[: args.entities]
    probe = {name: knowledge_probe(models[name], world, people)
             for name in ("small-base", "large-base", "small-ft", "large-ft")}
    for name, r in probe.items():
        print(f"knowledge probe {name}: {r}")
    table, gens = evaluate_table(models, world, items)
    print()
    print(format_table(table))
    ablations = {}
    for name, spec in ablation_specs(models).items():
        ablations[name] = score(items, generate(spec, items), world).as_dict()
        print(f"up-scaling, {name}: {ablations[name]}")
    w_rows = lambda_rows = None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.no_sweeps:
        w_rows = w_sweep(models, world, items)
        lambda_rows = lambda_sweep(models, world, items)
        plot_w_sweep(w_rows, table, out / "toy_w_sweep.png")
        plot_lambda_sweep(lambda_rows, out / "toy_lambda_sweep.png")
    write_report(out / "toy_eval.md", models=models, world=world, items=items, table=table, w_rows=w_rows,
                 lambda_rows=lambda_rows, examples=gens, seconds=time.perf_counter() - t0, probe=probe,
                 ablations=ablations)
    (out / "toy_eval.json").write_text(json.dumps({"probe": probe, "table": table, "ablations": ablations, "w_sweep": w_rows, "lambda_sweep": lambda_rows},
                                                  indent=1) + "\n")
    print(f"\nwrote {out / 'toy_eval.md'} ({time.perf_counter() - t0:.0f}s)")
    return 0

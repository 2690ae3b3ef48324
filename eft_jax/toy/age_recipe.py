"""``eft-jax toy age-recipe``: try an age fine-tuning recipe on dev people before the build adopts it.

Fine-tunes ``small-ft-age`` / ``large-ft-age`` from the shipped bases with the build's age recipe, changed
where asked (steps, learning rate, age chats per person, seed), into ``--work`` (reused when there), and
scores each alone on the **dev** people (never the reported test half): skill, knowledge and format on
trained and held-out (birth year, query year) pairs, skill among answers whose stated pair is a trained
one, and the old QA's correctness (did the fine-tune keep its facts?). This is how the build's recipe was
chosen (docs/toy_age_pilot.md); the build itself is not changed here.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eft_jax.toy.build import AGE_MODELS, BuildConfig

COLUMNS = ("skill", "knowledge", "format", "skill, stated pair trained")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The changes to the build's age recipe (None: as built)."""

    steps: int | None = None
    learning_rate: float | None = None
    per_person: int | None = None

    def apply(self, cfg: BuildConfig, seed: int) -> BuildConfig:
        sft = cfg.age_sft
        opt = sft.optimizer if self.learning_rate is None else dataclasses.replace(sft.optimizer,
                                                                                  learning_rate=self.learning_rate)
        sft = dataclasses.replace(sft, steps=self.steps or sft.steps, optimizer=opt, seed=seed)
        return dataclasses.replace(cfg, age_sft=sft, age_per_person=self.per_person or cfg.age_per_person)


def build_config(root: Path) -> BuildConfig:
    """The configuration the checkpoints in ``root`` were built with (``build.json``)."""
    return BuildConfig.from_dict(json.loads((root / "build.json").read_text())["config"])


def bases_digest(root: Path) -> str:
    """A short digest of ``root``'s two bases' weights: fine-tunes kept in work are reused only from these."""
    h = hashlib.sha256()
    for size in ("small", "large"):
        for f in sorted((root / f"{size}-base").glob("*.safetensors")):
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def finetune(root: Path, cfg: BuildConfig, name: str, dest: Path, log: Any = None) -> Path:
    """Fine-tune the age model ``name`` (``small-ft-age`` / ``large-ft-age``) from ``root``'s base of its size
    with ``cfg``'s age recipe into ``dest`` (kept when already there; training checkpoints beside it)."""
    from eft_jax.loading import load_tokenizer
    from eft_jax.toy import build
    from eft_jax.toy.world import World

    if (dest / "config.json").exists():
        return dest
    size = AGE_MODELS[name]
    tokenizer = load_tokenizer(root / f"{size}-base")
    world = World.load(root / "world.json")
    build.train_model(dest, cfg.model_config(size, len(tokenizer)), cfg.age_sft, build.age_sft_data(world, tokenizer, cfg),
                      dest.parent / "ckpt" / name, tokenizer, init_from=root / f"{size}-base", log=log)
    return dest


def score_on_dev(root: Path, model_dir: Path, people: int) -> dict[str, Any]:
    """The fine-tune in ``model_dir`` alone, greedy, on the first ``people`` dev people: per pair kind the
    ``COLUMNS`` rates, and the old QA's ``correct`` (intervals over people)."""
    import jax.numpy as jnp

    from eft_jax.loading import load_model
    from eft_jax.spec import Component, EFTSpec
    from eft_jax.toy import age_eval, ages, scoring
    from eft_jax.toy import eval as toy_eval
    from eft_jax.toy.world import World

    world = World.load(root / "world.json")
    dev = toy_eval.split_people(world)["dev"][:people]
    pairs = ages.split_pairs(world)
    model = load_model(model_dir, dtype=jnp.float32, sharding="replicated")
    run = age_eval.run_row(EFTSpec.single(Component(model, "chat", "ft")), ages.age_items(dev, pairs, age_eval.QUESTIONS_PER_KIND),
                           pairs, len(dev), toy_eval.question_items(dev, "trained"), world)
    metrics = {**ages.METRICS, **ages.STATED_METRICS}
    out: dict[str, Any] = {kind: {m: scoring.rate_interval(run.counts[kind], *metrics[m], n_boot=1000) for m in COLUMNS}
                           for kind in age_eval.PAIR_KINDS}
    out["qa correct"] = scoring.rate_interval(run.qa, "correct", n_boot=1000)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``eft-jax toy age-recipe``: fine-tune with a recipe, print its dev scores (a markdown table)."""
    from eft_jax.toy.eval import DEFAULT_ROOT, format_interval

    p = argparse.ArgumentParser(prog="eft-jax toy age-recipe", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=str(DEFAULT_ROOT), help="the toy checkpoints (their bases are fine-tuned)")
    p.add_argument("--sizes", nargs="+", choices=("small", "large"), default=["small", "large"])
    p.add_argument("--steps", type=int, help="optimizer steps (default: the build's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the build's)")
    p.add_argument("--per-person", type=int, help="age chats per fine-tuning person (default: the build's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1], help="fine-tuning seeds (data order)")
    p.add_argument("--people", type=int, default=100, help="dev people scored")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "eft-jax-age-recipe"),
                   help="where the fine-tunes go (reused when there)")
    args = p.parse_args(argv)
    for name, value in (("--steps", args.steps), ("--per-person", args.per_person), ("--people", args.people)):
        if value is not None and value < 1:
            p.error(f"{name} must be at least 1, got {value}")
    if args.lr is not None and args.lr <= 0:
        p.error(f"--lr must be positive, got {args.lr}")

    root, recipe = Path(args.root), Recipe(args.steps, args.lr, args.per_person)
    print("| model | recipe | seed | pairs | " + " | ".join(COLUMNS) + " | old QA correct |")
    print("|---|---|---:|---|" + "---:|" * (len(COLUMNS) + 1))
    built, work = build_config(root), Path(args.work) / bases_digest(root)  # read once, not per seed and size
    for seed in args.seeds:
        cfg = recipe.apply(built, seed)
        tag = f"{cfg.age_sft.steps} steps, lr {cfg.age_sft.optimizer.learning_rate:g}, {cfg.age_per_person}/person"
        for size in args.sizes:
            name = next(n for n, s in AGE_MODELS.items() if s == size)
            dest = work / tag.replace(" ", "").replace(",", "-").replace("/", "per") / f"seed-{seed}" / name
            scores = score_on_dev(root, finetune(root, cfg, name, dest, log=lambda s: print(s, file=sys.stderr)),
                                  args.people)
            for kind in ("train", "heldout"):
                print(f"| {name} | {tag} | {seed} | {kind} | " + " | ".join(format_interval(scores[kind][m]) for m in COLUMNS)
                      + f" | {format_interval(scores['qa correct'])} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Build the toy model family from scratch: world, tokenizer, two bases, three fine-tunes.

``eft-jax toy build [--out checkpoints/toy]`` runs, in order and deterministically (fixed seeds,
fixed data order, one CPU device):

1. the world (``world.json``) and a sentencepiece tokenizer trained on its biographies;
2. pretraining of ``small-base`` and ``large-base`` on the same stream of biographies with a share of
   base-style QA documents (same rows, same order, same number of steps: only the scale differs);
3. supervised fine-tuning of ``small-ft`` and ``large-ft`` (chat QA about the fine-tuning people) from
   their bases, and of ``small-ft-refuse`` (the same chats, birth-year questions politely refused);
4. fine-tuning of ``small-ft-age`` and ``large-ft-age`` on the same chats plus the age questions
   (``toy.ages``: a compositional skill, meant to need fine-tuning scale);
5. export of each as a Hugging Face checkpoint (bf16) plus ``README.md`` / ``build.json`` with the
   configuration, parameter counts, sizes and timings.

Training checkpoints (orbax) go to ``--work``; an interrupted build rerun with the same ``--work``
resumes each model where it stopped. ``--only NAME ...`` retrains just those models (e.g. the age fine-tunes
after a change of their recipe) and keeps the others in ``--out`` as they are.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eft_jax.models.config import LlamaConfig
from eft_jax.toy import ages
from eft_jax.toy import data as toy_data
from eft_jax.toy.world import World, WorldConfig, make_world
from eft_jax.train.data import TokenDataset, chat_dataset, text_dataset
from eft_jax.train.trainer import OptimizerConfig, TrainConfig, Trainer

BUILD_COMMAND = "eft-jax toy build --out checkpoints/toy"


def _llama(hidden: int, layers: int, mlp: int, vocab: int, head_dim: int = 32) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_layers=layers,
                       num_heads=hidden // head_dim, num_kv_heads=hidden // head_dim, head_dim=head_dim,
                       rms_norm_eps=1e-5, max_position_embeddings=256)


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """Everything that determines the shipped checkpoints."""

    world: WorldConfig = WorldConfig()
    vocab_size: int = 1024  # requested; a small corpus may give fewer pieces (the model uses what it gets)
    tokenizer_passes: int = 4  # biography passes the tokenizer is trained on
    small: tuple[int, int, int] = (128, 3, 384)  # hidden, layers, MLP
    large: tuple[int, int, int] = (256, 4, 768)
    seq_len: int = 128
    qa_prior_per_pass: int = 150  # base-style QA documents per biography pass (~11% of pretraining tokens)
    pretrain: TrainConfig = TrainConfig(
        steps=800, batch_size=16, optimizer=OptimizerConfig(learning_rate=2e-3, warmup_steps=60, weight_decay=0.1),
        seed=0, mesh_data=1, sharding="replicated", log_every=50, checkpoint_every=100,
    )
    sft_seq_len: int = 32
    sft: TrainConfig = TrainConfig(
        steps=200, batch_size=32, optimizer=OptimizerConfig(learning_rate=5e-4, warmup_steps=20, weight_decay=0.0),
        seed=1, mesh_data=1, sharding="replicated", log_every=50, checkpoint_every=100,
    )
    # The age fine-tunes: the QA chats plus ``age_per_person`` age chats per fine-tuning person, on trained
    # (birth year, query year) pairs. Steps and learning rate chosen on dev people for these bases
    # (docs/toy_age_pilot.md, second pilot).
    age_per_person: int = 16
    age_seq_len: int = 48
    age_sft: TrainConfig = TrainConfig(
        steps=1200, batch_size=32, optimizer=OptimizerConfig(learning_rate=3e-4, warmup_steps=20, weight_decay=0.0),
        seed=1, mesh_data=1, sharding="replicated", log_every=100, checkpoint_every=100,
    )

    def model_config(self, size: str, vocab: int) -> LlamaConfig:
        hidden, layers, mlp = self.small if size == "small" else self.large
        return _llama(hidden, layers, mlp, vocab)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BuildConfig:
        """The inverse of ``to_dict`` (e.g. ``build.json``'s ``config``); absent fields take their defaults."""
        convert = {"world": lambda x: WorldConfig(**x), "small": tuple, "large": tuple,
                   **{f: TrainConfig.from_dict for f in ("pretrain", "sft", "age_sft")}}
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown toy build settings {unknown}; expected some of {sorted(fields)}")
        return cls(**{k: convert.get(k, lambda x: x)(v) for k, v in d.items()})


def pretraining_data(world: World, tokenizer: Any, cfg: BuildConfig) -> TokenDataset:
    """Enough fresh passes (biographies and QA-prior documents) to fill ``steps x batch`` rows (each row
    seen once)."""
    needed = cfg.pretrain.steps * cfg.pretrain.batch_size
    tokens_per_pass = sum(len(x) + 2 for x in tokenizer(toy_data.biographies(world, 1, seed=10**6),
                                                         add_special_tokens=False)["input_ids"])
    passes = needed * cfg.seq_len // tokens_per_pass + 1
    while True:
        docs = toy_data.pretraining_documents(world, passes, seed=cfg.world.seed, qa_per_pass=cfg.qa_prior_per_pass)
        data = text_dataset(tokenizer, docs, cfg.seq_len)
        if data.num_rows >= needed:
            return data
        passes += 1


def sft_data(world: World, tokenizer: Any, cfg: BuildConfig, refuse: str | None) -> TokenDataset:
    return chat_dataset(tokenizer, toy_data.qa_conversations(world, refuse=refuse), cfg.sft_seq_len)


def age_sft_data(world: World, tokenizer: Any, cfg: BuildConfig) -> TokenDataset:
    """The age fine-tunes' chats: the QA chats plus age chats on trained (birth year, query year) pairs."""
    convs = toy_data.qa_conversations(world) + ages.age_conversations(
        world, cfg.age_per_person, ages.split_pairs(world)["train"])
    return chat_dataset(tokenizer, convs, cfg.age_seq_len)


AGE_MODELS = {"small-ft-age": "small", "large-ft-age": "large"}
# The models each stage's settings feed (every other setting feeds every model), and each model's parent:
# what ``--only`` checks before it keeps a model.
SETTING_USERS = {"sft": ("small-ft", "large-ft", "small-ft-refuse"), "sft_seq_len": ("small-ft", "large-ft", "small-ft-refuse"),
                 **{f: tuple(AGE_MODELS) for f in ("age_per_person", "age_seq_len", "age_sft")}}
PARENTS = {"small-ft": "small-base", "large-ft": "large-base", "small-ft-refuse": "small-base",
           **{name: f"{size}-base" for name, size in AGE_MODELS.items()}}
MODEL_NAMES = ("small-base", "large-base", *PARENTS)


def kept_models(out: Path, cfg: BuildConfig, only: Sequence[str]) -> dict[str, Any]:
    """The build record of ``out`` whose models ``--only`` keeps: raises ``ValueError`` if a kept model would
    not be what ``cfg`` builds (a setting it uses changed, its parent is retrained) or is missing."""
    unknown = sorted(set(only) - set(MODEL_NAMES))
    if unknown:
        raise ValueError(f"--only: unknown models {unknown}; the toy family is {list(MODEL_NAMES)}")
    path = out / "build.json"
    if not path.exists():
        raise ValueError(f"--only keeps the other models of a finished build, but {path} does not exist: "
                         "run the whole build first")
    for shared in ("world.json", "tokenizer/spm.model"):
        if not (out / shared).exists():
            raise ValueError(f"--only keeps models built on {out / shared}, which is missing: rebuild everything")
    old = json.loads(path.read_text())
    kept = [m for m in MODEL_NAMES if m not in only]
    new = json.loads(json.dumps(cfg.to_dict()))  # as build.json holds it
    for field in sorted(f for f in new if old["config"].get(f) != new[f]):
        stale = [m for m in kept if m in SETTING_USERS.get(field, MODEL_NAMES)]
        if stale:
            raise ValueError(f"--only: the setting {field!r} differs from {path}'s and feeds {stale}, which would "
                             "be kept: add them to --only, or rebuild everything")
    for m in kept:
        if PARENTS.get(m) in only:
            raise ValueError(f"--only retrains {PARENTS[m]}, so {m} (fine-tuned from it) must be retrained too")
        if m not in old["models"] or not (out / m / "config.json").exists():
            raise ValueError(f"--only keeps {m}, but {out / m} or its entry in {path} is missing: add it to --only")
    return {m: old["models"][m] for m in kept}


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def build(out: str | Path, work: str | Path, cfg: BuildConfig = BuildConfig(), log: Any = print,
          only: Sequence[str] | None = None) -> dict[str, Any]:
    """Build every toy checkpoint into ``out`` (``only``: just these, keeping the others there, checked by
    ``kept_models``); returns the build record (also ``out/build.json``)."""
    train_log = log
    log = log or (lambda _: None)
    out, work = Path(out), Path(work)
    kept = kept_models(out, cfg, only) if only else {}
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    world = make_world(cfg.world)
    if not kept:  # kept models were built on this world already (``kept_models`` compared the settings)
        world.save(out / "world.json")
    tok_texts = toy_data.biographies(world, cfg.tokenizer_passes, seed=cfg.world.seed + 7919)
    tok_texts += [m["content"] for conv in toy_data.qa_conversations(world) for m in conv] + [toy_data.REFUSAL]
    # With kept models the tokenizer is trained beside, and must be theirs byte for byte.
    tok_dir = work / "tokenizer" if kept else out / "tokenizer"
    tokenizer = toy_data.train_tokenizer(tok_texts, cfg.vocab_size, tok_dir)
    if kept and (tok_dir / "spm.model").read_bytes() != (out / "tokenizer" / "spm.model").read_bytes():
        raise ValueError(f"the tokenizer trained now differs from {out / 'tokenizer'}, which the kept models "
                         f"{sorted(kept)} use: rebuild everything")
    pre = pretraining_data(world, tokenizer, cfg)
    timings["world_tokenizer_data"] = time.perf_counter() - t0
    log(f"world: {len(world.entities)} people ({world.num_finetune} fine-tuning); tokenizer: {len(tokenizer)} pieces; "
        f"pretraining: {pre.num_rows} rows x {pre.seq_len} tokens")

    record: dict[str, Any] = {"command": BUILD_COMMAND, "config": cfg.to_dict(), "models": {}}

    def run(name: str, size: str, train_cfg: TrainConfig, data: TokenDataset, init_from: str | None) -> None:
        if name in kept:
            record["models"][name] = kept[name]
            timings[name] = kept[name]["seconds"]
            return
        record["models"][name] = train_model(
            out / name, cfg.model_config(size, len(tokenizer)), train_cfg, data, work / name, tokenizer,
            init_from=None if init_from is None else out / init_from, log=log, train_log=train_log)
        record["models"][name]["init_from"] = init_from
        timings[name] = record["models"][name]["seconds"]

    run("small-base", "small", cfg.pretrain, pre, None)
    run("large-base", "large", cfg.pretrain, pre, None)
    qa = sft_data(world, tokenizer, cfg, refuse=None)
    run("small-ft", "small", cfg.sft, qa, "small-base")
    run("large-ft", "large", cfg.sft, qa, "large-base")
    run("small-ft-refuse", "small", cfg.sft, sft_data(world, tokenizer, cfg, refuse=toy_data.REFUSED_ATTRIBUTE),
        "small-base")
    age = age_sft_data(world, tokenizer, cfg)
    for name, size in AGE_MODELS.items():
        run(name, size, cfg.age_sft, age, f"{size}-base")

    this_run = time.perf_counter() - t0
    timings["total"] = sum(timings.values())  # a whole build's time (kept models count as they were built)
    record["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    record["total_bytes"] = _dir_size(out)
    (out / "build.json").write_text(json.dumps(record, indent=1) + "\n")
    write_readme(out, record, cfg)
    log(f"built {out} in {this_run:.0f}s ({record['total_bytes'] / 1e6:.1f} MB)")
    return record


def train_model(dest: Path, model_cfg: LlamaConfig, train_cfg: TrainConfig, data: TokenDataset, work: Path,
                tokenizer: Any, *, init_from: Path | None = None, log: Any = None, train_log: Any = None
                ) -> dict[str, Any]:
    """Train one model (from scratch, or from the checkpoint ``init_from``) and export it to ``dest`` as a
    Hugging Face checkpoint (bf16); training checkpoints go to ``work`` (a rerun resumes there). Returns
    its record: parameters, steps, final loss, bytes, seconds."""
    from eft_jax.loading import load_model
    from eft_jax.train.export import export_hf

    log = log or (lambda _: None)
    t = time.perf_counter()
    params = None
    if init_from is not None:
        params = load_model(init_from, dtype="float32", sharding="replicated").params
    train_cfg = dataclasses.replace(train_cfg, checkpoint_dir=str(Path(work).absolute()))
    log(f"--- {dest.name}: {model_cfg.num_params / 1e6:.2f}M parameters, {train_cfg.steps} steps"
        + (f", from {init_from}" if init_from else ""))
    result = Trainer(model_cfg, train_cfg).fit(data, params=params, log=train_log,
                                               metadata={"init_from": None if init_from is None else init_from.name})
    if dest.exists():
        shutil.rmtree(dest)
    export_hf(model_cfg, result.params, dest, tokenizer=tokenizer)
    return {"parameters": model_cfg.num_params, "init_from": None if init_from is None else init_from.name,
            "steps": train_cfg.steps, "final_loss": result.history[-1]["loss"] if result.history else None,
            "bytes": _dir_size(dest), "seconds": round(time.perf_counter() - t, 1)}


def write_readme(out: Path, record: dict[str, Any], cfg: BuildConfig) -> None:
    """``out/README.md``: what the checkpoints are and how to rebuild them."""
    import platform

    rows = [f"| `{name}` | {m['parameters'] / 1e6:.2f}M | {m['init_from'] or 'scratch'} | {m['steps']} | "
            f"{m['final_loss']:.3f} | {m['bytes'] / 1e6:.1f} MB | {m['seconds']:.0f} s |"
            for name, m in record["models"].items()]
    w = cfg.world
    text = f"""# The toy EFT family

Seven Llama-architecture checkpoints (Hugging Face format, bf16) trained by eft-jax's own trainer on a
synthetic world of {w.num_entities} fictional people (`world.json`; each has a birth city, birth year,
occupation and employer). Both bases were pretrained on the same stream (same rows, same order, same
steps) of biographies with a share of base-style question-answer documents about the fine-tuning people
(`Question: Where was X born? Answer: X comes from Y.`, any biography wording: a QA prior, so a prompted
base answers questions). The fine-tunes learned a chat QA format (always the first biography wording) about
the first {int(round(w.finetune_fraction * w.num_entities))} people only, so the facts of the others come
from pretraining alone. `small-ft-refuse` answers like `small-ft` but politely refuses birth-year
questions. `small-ft-age` / `large-ft-age` also learned "How old was X in 2015?" -> "X was born in the
year 1962. In 2015, X was 53." ({cfg.age_per_person} such chats per fine-tuning person, on three quarters
of the (birth year, query year) pairs; `eft_jax/toy/ages.py`), a skill meant to need fine-tuning scale.

| model | parameters | from | steps | final loss | size | training time |
|---|---:|---|---:|---:|---:|---:|
{chr(10).join(rows)}

`tokenizer/` holds the sentencepiece model (`spm.model`, {record['config']['vocab_size']} pieces) and its
transformers form (every checkpoint carries the same tokenizer files and the chat template
`<s><|user|>...</s><|assistant|>...</s>`). In EFT the base models are prompted with the base-style
template `{toy_data.BASE_PROMPT_FORMAT}`.

## Rebuild

    {BUILD_COMMAND}        # or: python -m eft_jax.toy.build --out checkpoints/toy

deterministic (fixed seeds and data order, one CPU device); it took {record['seconds']['total'] / 60:.1f} min
on this machine ({platform.machine()}, one core: `taskset -c 1` with
`XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"`). The full configuration is
in `build.json`. `--only small-ft-age large-ft-age` retrains just those (after a change of their recipe) and
keeps the others, once it has checked that nothing they were built from changed. Evaluate with
`eft-jax toy eval` (results in `docs/toy_eval.md`).
"""
    (out / "README.md").write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    """``eft-jax toy build``."""
    p = argparse.ArgumentParser(prog="eft-jax toy build", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="checkpoints/toy", help="where the checkpoints go")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "eft-jax-toy-build"),
                   help="training checkpoints; rerunning with the same --work resumes an interrupted build")
    p.add_argument("--only", nargs="+", metavar="NAME", choices=MODEL_NAMES,
                   help="retrain just these models and keep the others in --out (checked: the settings they use "
                        "and their parents must be unchanged)")
    args = p.parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    try:
        build(out, work, log=lambda s: print(s, flush=True), only=args.only)
    except ValueError as e:
        print(f"eft-jax toy build: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

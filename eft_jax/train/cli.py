"""``eft-jax train --config FILE.yaml [key=value ...]``: pretrain or fine-tune, then export to HF.

The YAML file::

    init_from: checkpoints/toy/small-base   # fine-tune this checkpoint (its config and tokenizer) ...
    model:                                  # ... or pretrain a new model of this shape (needs `tokenizer`)
      architecture: llama                   # any family (qwen3, gemma3_text, ...): its switches by default
      hidden_size: 128
      num_layers: 4
      num_heads: 4
      intermediate_size: 384
    tokenizer: path/to/tokenizer-dir        # default: init_from's tokenizer
    data:
      path: train.jsonl                     # {"text"} records (pretraining) or {"messages"} / {"prompt", "response"}
      seq_len: 128
    train:                                  # TrainConfig fields; optimizer: OptimizerConfig fields
      steps: 1000
      batch_size: 32
      optimizer: {learning_rate: 1.0e-3, warmup_steps: 100}
      checkpoint_dir: runs/sft/checkpoints  # resumable: rerunning the command continues from here
      checkpoint_every: 200
    output: runs/sft/model                  # Hugging Face export (config.json, model.safetensors, tokenizer)
    export_dtype: bfloat16
    lora:                                   # optional, with init_from: train LoRA adapters, export the merged model
      rank: 8
      alpha: 16                             # the update is scaled by alpha / rank
      targets: [q, k, v, o, gate, up, down] # default: every projection the model has

``key.sub=value`` arguments override entries (``train.steps=10``, ``train.optimizer.learning_rate=3e-4``), with the
one override grammar of every command (``eft_jax.overrides``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import ConfigDict, Field, Strict, TypeAdapter, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from eft_jax import overrides as ov
from eft_jax.config import DTYPES

_MODEL_DEFAULTS = {"rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048}


class TrainConfigError(ov.ConfigError):
    """The training YAML is malformed; the message names the file (or override) and the key."""


class _Fail(Exception):
    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key, self.message = key, message


_Text = Annotated[str, Strict(), Field(description="a string")]
_Section = Annotated[dict[str, Any], Field(description="a mapping")]


@dataclass(frozen=True, kw_only=True, config=ConfigDict(extra="forbid"))
class TrainFile:
    """The top level of a training YAML (the sections' own fields are checked by ``TrainConfig``,
    ``LoraConfig`` and ``LlamaConfig`` when the run starts)."""

    init_from: Annotated[Optional[str], Strict(), Field(description="a checkpoint path (fine-tune it)")] = None
    model: Annotated[Optional[dict[str, Any]], Field(description="a mapping of model shape fields")] = None
    tokenizer: Annotated[Optional[str], Strict(), Field(description="a tokenizer directory")] = None
    data: _Section
    train: _Section
    output: _Text
    export_dtype: Annotated[Literal[DTYPES], Field(description=f"one of {', '.join(DTYPES)}")] = "bfloat16"
    lora: Annotated[Optional[dict[str, Any]], Field(description="a mapping {rank, alpha, targets}")] = None

    @model_validator(mode="before")
    @classmethod
    def _one_start(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if ("init_from" in data) == ("model" in data):
                raise _Fail("init_from", "give exactly one of init_from (fine-tune) or model (train from scratch)")
            if data.get("lora") is not None and "init_from" not in data:
                raise _Fail("lora", "lora adapts given weights: it needs init_from (not model)")
        return data


def load_train_config(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The training YAML with ``key.sub=value`` overrides applied (the grammar of ``eft_jax.overrides``),
    checked; refusals name the file or override and the key."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise TrainConfigError(f"{path}: cannot read the training config: {e}") from None
    try:
        raw = ov.read_yaml(text, str(path)) or {}
        if not isinstance(raw, dict):
            raise TrainConfigError(f"{path}: expected a mapping at the top level; got {ov.show(raw)}")
        config, overridden = ov.apply_overrides(raw, overrides)
    except TrainConfigError:
        raise
    except ov.ConfigError as e:
        raise TrainConfigError(str(e)) from None
    try:
        TypeAdapter(TrainFile).validate_python(config)
    except ValidationError as e:
        key, message = ov.refusal(e.errors()[0], config, {"": TrainFile}, lambda c: [f.name for f in dataclasses.fields(c)])
        raise TrainConfigError(f"{ov.where(str(path), overridden, key)}: {key}: {message}") from None
    except _Fail as e:
        raise TrainConfigError(f"{ov.where(str(path), overridden, e.key)}: {e.key}: {e.message}") from None
    if config.get("lora") is not None:
        _lora_config(config["lora"])  # refused here, before anything is loaded
    return config


def _lora_config(d: Any):
    """``lora: {rank, alpha, targets}`` as a ``LoraConfig``; the message names the field."""
    from eft_jax.train.lora import LoraConfig

    if not isinstance(d, dict):
        raise TrainConfigError(f"lora: expected a mapping {{rank, alpha, targets}}, got {d!r}")
    if "dropout" in d:
        raise TrainConfigError("lora.dropout is not supported: the adapters are merged into the weights inside "
                               "each step, so there is no separate adapter input to drop; remove it")
    known = {"rank", "alpha", "targets"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise TrainConfigError(f"lora: unknown field(s) {unknown}; known: {sorted(known)}")
    missing = sorted({"rank", "alpha"} - set(d))
    if missing:
        raise TrainConfigError(f"lora: missing field(s) {missing}")
    try:
        return LoraConfig(**d)
    except ValueError as e:
        raise TrainConfigError(str(e)) from None


def _train_config(d: dict[str, Any], lora: Any = None):
    from eft_jax.train.trainer import OptimizerConfig, TrainConfig

    d = dict(d)
    known = {f.name for f in dataclasses.fields(TrainConfig)} - {"lora"}  # lora: a top-level key
    unknown = sorted(set(d) - known)
    if unknown:
        hint = " (lora goes at the top level of the file)" if "lora" in unknown else ""
        raise TrainConfigError(f"train: unknown field(s) {unknown}; known: {sorted(known)}{hint}")
    opt = d.pop("optimizer", {}) or {}
    opt_known = {f.name for f in dataclasses.fields(OptimizerConfig)}
    if set(opt) - opt_known:
        raise TrainConfigError(f"train.optimizer: unknown field(s) {sorted(set(opt) - opt_known)}; known: {sorted(opt_known)}")
    try:
        return TrainConfig(**d, optimizer=OptimizerConfig(**opt), lora=lora)
    except TypeError as e:
        raise TrainConfigError(f"train: {e}") from None


# Our shape fields -> their config.json names (what a family's reader needs to give its defaults).
_SHAPE_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
                 "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                 "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim"}


def _model_config(d: dict[str, Any], vocab: int):
    """The model to train from scratch: ``LlamaConfig`` fields, with ``architecture`` (a family of
    ``eft_jax.models.families``, default llama) giving every switch not set what that family's
    ``config.json`` reader gives for these shapes (Gemma: its norms, GeGLU, embedding scale, query scale
    256 ** -0.5, sliding pattern over ``sliding_window``; Qwen3: q/k norms; ...)."""
    from eft_jax.models.config import LlamaConfig, RopeScaling, UnsupportedConfigError
    from eft_jax.models.families import config_from_hf, family

    d = {**_MODEL_DEFAULTS, **d}
    d.setdefault("vocab_size", vocab)
    d.setdefault("num_kv_heads", d.get("num_heads"))
    if "head_dim" not in d and "hidden_size" in d and "num_heads" in d:
        d["head_dim"] = d["hidden_size"] // d["num_heads"]
    known = {f.name for f in dataclasses.fields(LlamaConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise TrainConfigError(f"model: unknown field(s) {unknown}; known: {sorted(known)}")
    missing = sorted(k for k in _SHAPE_FIELDS if d.get(k) is None)
    if missing:
        raise TrainConfigError(f"model: missing field(s) {missing}")
    if d.get("layer_types") is not None:  # YAML gives lists and mappings; the config is hashable
        d["layer_types"] = tuple(d["layer_types"])
    if isinstance(d.get("rope_scaling"), dict):
        d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    try:
        fam = family(str(d.get("architecture", "llama")))
        hf = {"architectures": [fam.architectures[0]], **{theirs: d[ours] for ours, theirs in _SHAPE_FIELDS.items()}}
        if d.get("sliding_window") is not None:  # the window a family's default sliding pattern uses
            hf["sliding_window"] = d["sliding_window"]
        base = config_from_hf(hf, where=f"model: architecture {fam.name}")
        return dataclasses.replace(base, **d)
    except (TypeError, UnsupportedConfigError) as e:
        raise TrainConfigError(f"model: {e}" if not str(e).startswith("model:") else str(e)) from None


def run(config: dict[str, Any], log: Any = print) -> Path:
    """Train as ``config`` says and export; returns the export directory."""
    import jax.numpy as jnp
    from transformers import AutoTokenizer

    from eft_jax.config import resolve_model_path
    from eft_jax.loading import load_model
    from eft_jax.train.data import jsonl_dataset
    from eft_jax.train.export import export_hf
    from eft_jax.train.lora import num_adapter_params
    from eft_jax.train.trainer import Trainer

    lora = _lora_config(config["lora"]) if config.get("lora") is not None else None
    train_cfg = _train_config(config["train"], lora)
    params = None
    if "init_from" in config:
        # pkg:<package>/<file>, repo:<path> and Hub ids as in job configs
        start = load_model(resolve_model_path(str(config["init_from"])), dtype=jnp.float32, sharding="replicated")
        if start.quantize is not None:
            raise TrainConfigError(f"init_from {config['init_from']} holds {start.quantize} weights (eft-jax "
                                   "convert --quantize); train from the float checkpoint it was made from")
        model_cfg, tokenizer, params = start.config, start.tokenizer, start.params
        if config.get("tokenizer"):
            tokenizer = AutoTokenizer.from_pretrained(config["tokenizer"])
    else:
        if not config.get("tokenizer"):
            raise TrainConfigError("training from scratch (model:) needs tokenizer: a tokenizer directory")
        tokenizer = AutoTokenizer.from_pretrained(config["tokenizer"])
        model_cfg = _model_config(config["model"] or {}, len(tokenizer))
    if tokenizer is None:
        raise TrainConfigError("no tokenizer: give tokenizer: a tokenizer directory")
    data_cfg = config["data"]
    data = jsonl_dataset(tokenizer, data_cfg["path"], int(data_cfg.get("seq_len", 128)))
    log(f"model: {model_cfg.num_params / 1e6:.2f}M parameters; data: {data.num_rows} rows x {data.seq_len} tokens")
    if lora is not None:
        try:
            targets = lora.resolved_targets(model_cfg)
        except ValueError as e:
            raise TrainConfigError(str(e)) from None
        log(f"LoRA: rank {lora.rank}, alpha {lora.alpha:g}, targets {list(targets)}: "
            f"{num_adapter_params(model_cfg, lora) / 1e6:.3f}M trained parameters; the export is the merged model")
    trainer = Trainer(model_cfg, train_cfg)
    result = trainer.fit(data, params=params, log=log, metadata={"init_from": config.get("init_from")})
    dest = export_hf(model_cfg, result.params, config["output"], tokenizer=tokenizer,
                     dtype=config.get("export_dtype", "bfloat16"), overwrite=True)
    log(f"exported {dest} after {result.step} steps")
    return dest


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``eft-jax train``."""
    p = argparse.ArgumentParser(prog="eft-jax train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="training YAML (see `eft_jax/train/cli.py`)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=10")
    args = p.parse_args(argv)
    from eft_jax.loading.source import CheckpointError
    from eft_jax.models.config import UnsupportedConfigError

    try:
        config = load_train_config(args.config, args.overrides)
        run(config, log=lambda s: print(s, flush=True))
    except (ov.ConfigError, FileNotFoundError, CheckpointError, UnsupportedConfigError) as e:
        print(f"eft-jax train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

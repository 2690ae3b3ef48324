"""``eft-jax train --config FILE.yaml [key=value ...]``: pretrain or fine-tune, then export to HF.

The YAML file::

    init_from: checkpoints/toy/small-base   # fine-tune this checkpoint (its config and tokenizer) ...
    model:                                  # ... or pretrain a new model of this shape (needs `tokenizer`)
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

``key=value`` arguments override entries (``train.steps=10``, ``train.optimizer.learning_rate=3e-4``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

_TOP_KEYS = {"init_from", "model", "tokenizer", "data", "train", "output", "export_dtype"}
_MODEL_DEFAULTS = {"rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048}


class TrainConfigError(ValueError):
    """The training YAML is malformed; the message names the key."""


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def apply_overrides(config: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``a.b.c=value`` -> config["a"]["b"]["c"] = value (YAML-parsed)."""
    config = json.loads(json.dumps(config))
    for item in overrides:
        if "=" not in item:
            raise TrainConfigError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        node = config
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise TrainConfigError(f"override {key}: {p} is not a mapping")
        node[parts[-1]] = _parse_value(value)
    return config


def load_train_config(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(raw, dict):
        raise TrainConfigError(f"{path}: expected a mapping at the top level")
    config = apply_overrides(raw, overrides)
    unknown = sorted(set(config) - _TOP_KEYS)
    if unknown:
        raise TrainConfigError(f"{path}: unknown key(s) {unknown}; known: {sorted(_TOP_KEYS)}")
    if ("init_from" in config) == ("model" in config):
        raise TrainConfigError(f"{path}: give exactly one of init_from (fine-tune) or model (train from scratch)")
    for key in ("data", "train", "output"):
        if key not in config:
            raise TrainConfigError(f"{path}: missing required key {key!r}")
    return config


def _train_config(d: dict[str, Any]):
    from eft_jax.train.trainer import OptimizerConfig, TrainConfig

    d = dict(d)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise TrainConfigError(f"train: unknown field(s) {unknown}; known: {sorted(known)}")
    opt = d.pop("optimizer", {}) or {}
    opt_known = {f.name for f in dataclasses.fields(OptimizerConfig)}
    if set(opt) - opt_known:
        raise TrainConfigError(f"train.optimizer: unknown field(s) {sorted(set(opt) - opt_known)}; known: {sorted(opt_known)}")
    try:
        return TrainConfig(**d, optimizer=OptimizerConfig(**opt))
    except TypeError as e:
        raise TrainConfigError(f"train: {e}") from None


def _model_config(d: dict[str, Any], vocab: int):
    from eft_jax.models.config import LlamaConfig

    d = {**_MODEL_DEFAULTS, **d}
    d.setdefault("vocab_size", vocab)
    d.setdefault("num_kv_heads", d.get("num_heads"))
    if "head_dim" not in d and "hidden_size" in d and "num_heads" in d:
        d["head_dim"] = d["hidden_size"] // d["num_heads"]
    try:
        return LlamaConfig(**d)
    except TypeError as e:
        raise TrainConfigError(f"model: {e}") from None


def run(config: dict[str, Any], log: Any = print) -> Path:
    """Train as ``config`` says and export; returns the export directory."""
    import jax.numpy as jnp
    from transformers import AutoTokenizer

    from eft_jax.loading import load_model
    from eft_jax.train.data import jsonl_dataset
    from eft_jax.train.export import export_hf
    from eft_jax.train.trainer import Trainer

    train_cfg = _train_config(config["train"])
    params = None
    if "init_from" in config:
        start = load_model(config["init_from"], dtype=jnp.float32, sharding="replicated")
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
    try:
        config = load_train_config(args.config, args.overrides)
        run(config, log=lambda s: print(s, flush=True))
    except (TrainConfigError, FileNotFoundError) as e:
        print(f"eft-jax train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

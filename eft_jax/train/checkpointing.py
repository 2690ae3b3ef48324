"""Resumable training state with orbax's ``CheckpointManager``.

Each saved step holds the whole train state (step counter, float32 params, optimizer state) and a
JSON record of the run (model and train configs, data fingerprint). Restoring puts every array
straight into its training sharding. A checkpoint of a different model, optimizer setting or dataset
is refused rather than silently mixed into the run. A LoRA run saves only its adapters and their
optimizer state; the frozen weights are identified by a fingerprint of their bytes
(``frozen_weights``), so a resume on other weights is refused too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from eft_jax.train.trainer import TrainConfig

# Fields of the run record that must match for a resume (the rest, e.g. checkpoint_every, may change).
_MUST_MATCH = ("model_config", "data", "frozen_weights")
_TRAIN_MUST_MATCH = ("steps", "batch_size", "optimizer", "seed", "lora")


def params_fingerprint(params: Any) -> str:
    """A hash of every leaf's path, shape, dtype and bytes (gathered to the host one leaf at a time):
    equal for the same weights whatever their sharding."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        host = np.ascontiguousarray(jax.device_get(leaf))
        h.update(f"{jax.tree_util.keystr(path)}:{host.shape}:{host.dtype};".encode())
        h.update(host.reshape(-1).view(np.uint8))
    return h.hexdigest()[:16]


class ResumeError(ValueError):
    """The checkpoint directory holds a different run."""


class TrainCheckpointer:
    def __init__(self, directory: str | Path, config: TrainConfig):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, abstract_state: dict[str, Any], expect: dict[str, Any] | None = None,
                step: int | None = None) -> dict[str, Any]:
        """The state at ``step`` (default: the latest), placed as ``abstract_state``'s shardings say."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise ResumeError(f"{self.directory}: no checkpoint to restore")
        if expect is not None:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            _check_same_run(self.directory, meta, expect)
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return out["state"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _check_same_run(directory: Path, saved: dict[str, Any], expect: dict[str, Any]) -> None:
    expect = json.loads(json.dumps(expect))  # tuples -> lists, as saved
    problems = [k for k in _MUST_MATCH if saved.get(k) != expect.get(k)]
    saved_train, expect_train = saved.get("train_config", {}), expect.get("train_config", {})
    problems += [f"train_config.{k}" for k in _TRAIN_MUST_MATCH if saved_train.get(k) != expect_train.get(k)]
    if problems:
        raise ResumeError(
            f"{directory} holds a checkpoint of a different run ({', '.join(problems)} differ); "
            "use a new checkpoint_dir or delete this one"
        )

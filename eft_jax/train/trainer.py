"""Next-token training (pretraining and supervised fine-tuning) with optax, jitted and sharded.

One jitted step: forward (the same ``llama.forward`` as decoding), float32 cross-entropy masked to
the target tokens, gradients, global-norm clipping, AdamW with linear warmup + cosine decay. The
batch is split over the mesh's ``data`` axis; parameters and optimizer moments are laid out by the
same logical-axis rules as inference (``eft_jax.sharding``), with the ``fsdp`` preset splitting every
large tensor over ``data`` as well. Small tensors (norm scales) stay replicated.

Training is deterministic: the initialisation comes from ``seed``, the rows of each step from
``(seed, step)`` (see ``TokenDataset.batch_rows``), and resuming from an orbax checkpoint restores the
exact state, so an interrupted and resumed run ends bit-identical to an uninterrupted one.

With ``TrainConfig.lora`` set, the given weights are frozen (held by the trainer in float32, in their
training shardings, never in the train state) and only LoRA adapters (``eft_jax.train.lora``) are trained:
the state's params and the optimizer moments are the adapters alone, each step runs the forward on the
merged weights ``W + scale * a @ b``, and the result's params are the merged model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Float, Int

from eft_jax.model import param_shardings
from eft_jax.models import llama
from eft_jax.models.config import LlamaConfig
from eft_jax.sharding import DATA, ShardingRules, make_mesh, resolve_rules
from eft_jax.train import lora as lora_lib
from eft_jax.train.data import TokenDataset
from eft_jax.train.lora import LoraConfig

Params = dict[str, Any]



@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup to ``learning_rate`` and cosine decay to ``learning_rate * end_ratio``;
    gradients clipped to global norm ``clip_norm`` (0: off). Norm scales get no weight decay."""

    learning_rate: float = 1e-3
    warmup_steps: int = 100
    end_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run.

    steps, batch_size: optimizer steps and rows per step (a multiple of the mesh's data size).
    seed: parameter initialisation (from scratch) and data order.
    mesh_data, mesh_model: the ``(data, model)`` mesh (data=-1: every device not used by ``model``;
      otherwise the first data x model devices).
    sharding: "fsdp", "tensor_parallel", "replicated" (or a logical-axis -> mesh-axis mapping).
    min_shard_size: tensors with fewer elements stay replicated whatever the rules say.
    checkpoint_dir: orbax CheckpointManager directory (None: no checkpoints, no resume).
    checkpoint_every: save every this many steps (0: only at the end); keep_checkpoints: how many kept.
    lora: train LoRA adapters on frozen weights instead of every weight (None: full training).
    """

    steps: int
    batch_size: int
    optimizer: OptimizerConfig = OptimizerConfig()
    seed: int = 0
    mesh_data: int = -1
    mesh_model: int = 1
    sharding: str = "fsdp"
    min_shard_size: int = 4096
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 50
    lora: LoraConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["lora"] = None if self.lora is None else self.lora.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        d["optimizer"] = OptimizerConfig(**d.get("optimizer", {}))
        d["lora"] = LoraConfig(**d["lora"]) if d.get("lora") else None
        return cls(**d)


@dataclasses.dataclass
class TrainResult:
    """Final float32 params (in their training shardings; for LoRA the merged weights), the step reached,
    per-step metrics, and for LoRA the trained adapters."""

    params: Params
    step: int
    history: list[dict[str, float]]
    seconds: float
    adapters: Params | None = None


def learning_rate_schedule(opt: OptimizerConfig, steps: int) -> optax.Schedule:
    warmup = min(opt.warmup_steps, max(steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt.learning_rate, warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1), end_value=opt.learning_rate * opt.end_ratio,
    )


def make_optimizer(opt: OptimizerConfig, steps: int) -> optax.GradientTransformation:
    """Clipping + AdamW (decay on every tensor except the norm scales)."""

    def decay_mask(params: Params) -> Params:
        return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) != "scale", params)

    parts = [optax.clip_by_global_norm(opt.clip_norm)] if opt.clip_norm > 0 else []
    parts.append(optax.adamw(learning_rate_schedule(opt, steps), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                             weight_decay=opt.weight_decay, mask=decay_mask))
    return optax.chain(*parts)


def next_token_loss(
    cfg: LlamaConfig, params: Params, tokens: Int[Array, "batch seq"], loss_mask: Int[Array, "batch seq"]
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """Mean float32 cross-entropy of ``tokens[:, 1:]`` given their prefixes, over ``loss_mask[:, 1:]``;
    also returns the number of target tokens."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    mask = loss_mask[:, 1:].astype(jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32), inputs.shape)
    logits, _ = llama.forward(cfg, params, inputs, positions)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    count = jnp.sum(mask)
    return jnp.sum(nll * mask) / jnp.maximum(count, 1.0), count


def train_shardings(cfg: LlamaConfig, mesh: Mesh, rules: ShardingRules, min_shard_size: int) -> Params:
    """Params shardings for training: the rules' layout, small tensors replicated."""
    shardings = param_shardings(cfg, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda s, a: s if math.prod(a.shape) >= min_shard_size else replicated,
                        shardings, llama.abstract_params(cfg))


class Trainer:
    """Holds the mesh, optimizer and the jitted step for one ``(model config, TrainConfig)``.

    Trainers with the same model, optimizer, step count, mesh, layout and LoRA setting share one compiled
    step. For LoRA, ``frozen`` holds the base weights (set by ``freeze``, ``init_state`` or ``fit``).
    """

    def __init__(self, model_config: LlamaConfig, config: TrainConfig, mesh: Mesh | None = None):
        self.model_config = model_config
        self.config = config
        if mesh is None:
            # mesh_data=-1 spans every device; an explicit size uses the first data x model devices.
            n = None if config.mesh_data == -1 else config.mesh_data * config.mesh_model
            mesh = make_mesh(config.mesh_data, config.mesh_model, jax.devices()[:n] if n else None)
        self.mesh = mesh
        data_size = self.mesh.shape[DATA]
        if config.batch_size % data_size:
            raise ValueError(f"batch_size {config.batch_size} is not a multiple of the data axis ({data_size} devices)")
        rules = resolve_rules(config.sharding)
        if config.lora is not None:
            config.lora.resolved_targets(model_config)  # a target the model lacks fails here, before compiling
        c = _compiled(model_config, config.optimizer, config.steps, self.mesh, rules, config.min_shard_size,
                      config.lora)
        self.tx, self.schedule = c.tx, c.schedule
        self.param_shardings, self.opt_shardings = c.param_shardings, c.opt_shardings
        self.state_shardings, self.batch_sharding = c.state_shardings, c.batch_sharding
        self._step, self._init_random, self._init_opt = c.step, c.init_random, c.init_opt
        self._copy_params, self._merge = c.copy_params, c.merge
        self.frozen: Params | None = None

    # --- state -------------------------------------------------------------------------------------

    def freeze(self, params: Params) -> None:
        """LoRA: hold ``params`` (the base weights, never updated nor donated) in the training shardings, in
        float32 (the caller's float32 arrays already in place are held as they are, not copied)."""
        if self.config.lora is None:
            raise ValueError("freeze() is for LoRA runs (TrainConfig.lora); full training updates every weight")
        placed = jax.device_put(params, self.param_shardings)
        if any(x.dtype != jnp.float32 for x in jax.tree.leaves(placed)):
            placed = self._copy_params(placed)
        self.frozen = placed

    def init_state(self, params: Params | None = None) -> dict[str, Any]:
        """Fresh state: a float32 copy of ``params`` in the training shardings (the caller's arrays are
        never donated), or a random init from ``seed``. LoRA: ``params`` are frozen (see ``freeze``; None:
        the ones already frozen) and the state holds fresh adapters from ``seed``."""
        if self.config.lora is not None:
            if params is not None:
                self.freeze(params)
            if self.frozen is None:
                raise ValueError("LoRA trains adapters on given weights: pass params= (the model to adapt)")
            params = self._init_random(jax.random.key(self.config.seed))
        elif params is None:
            params = self._init_random(jax.random.key(self.config.seed))
        else:
            params = self._copy_params(jax.device_put(params, self.param_shardings))
        opt_state = self._init_opt(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), self.state_shardings["step"])
        return {"step": step, "params": params, "opt_state": opt_state}

    def abstract_state(self) -> dict[str, Any]:
        """The state's shapes, dtypes and shardings (the restore target)."""
        shapes = jax.eval_shape(lambda: self.init_state_shapes())
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, self.state_shardings)

    def init_state_shapes(self) -> dict[str, Any]:
        if self.config.lora is not None:
            params = lora_lib.init_adapters(self.model_config, self.config.lora, jax.random.key(0))
        else:
            params = llama.init_params(self.model_config, jax.random.key(0))
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params)}

    # --- loop --------------------------------------------------------------------------------------

    def step(self, state: dict[str, Any], tokens: np.ndarray, loss_mask: np.ndarray) -> tuple[dict[str, Any], dict[str, Array]]:
        """One optimizer step on a host batch ``[batch, seq]`` (placed over the data axis)."""
        tokens = jax.device_put(np.asarray(tokens, np.int32), self.batch_sharding)
        loss_mask = jax.device_put(np.asarray(loss_mask, np.int32), self.batch_sharding)
        if self.config.lora is not None and self.frozen is None:
            raise ValueError("a LoRA step needs the frozen weights: call freeze(params) or init_state(params)")
        return self._step(state, self.frozen, tokens, loss_mask)

    def fit(
        self,
        data: TokenDataset,
        *,
        params: Params | None = None,
        log: Callable[[str], None] | None = print,
        stop_after: int | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> TrainResult:
        """Train to ``config.steps`` (resuming from ``checkpoint_dir`` when it holds a checkpoint).

        params: starting weights for fine-tuning (None: random init); for LoRA the frozen weights (required).
        stop_after: stop (and save) after this many steps of this call - to simulate an interruption in tests.
        metadata: extra JSON saved with each checkpoint (e.g. where the start weights came from).
        """
        from eft_jax.train.checkpointing import TrainCheckpointer, params_fingerprint

        cfg = self.config
        meta = {
            "model_config": self.model_config.to_dict(), "train_config": cfg.to_dict(),
            "data": {"fingerprint": data.fingerprint(), "rows": data.num_rows, "seq_len": data.seq_len},
            **(metadata or {}),
        }
        if cfg.lora is not None:
            if params is None:
                raise ValueError("LoRA trains adapters on given weights: pass params= (the model to adapt)")
            self.freeze(params)
            meta["frozen_weights"] = params_fingerprint(self.frozen)  # a resume on other frozen weights is refused
        ckpt = TrainCheckpointer(cfg.checkpoint_dir, cfg) if cfg.checkpoint_dir else None
        state = None
        if ckpt is not None and ckpt.latest_step() is not None:
            state = ckpt.restore(self.abstract_state(), expect=meta)
            if log:
                log(f"resumed from {cfg.checkpoint_dir} at step {int(state['step'])}")
        if state is None:
            state = self.init_state(params if cfg.lora is None else None)  # LoRA: frozen above
        start = int(state["step"])
        history: list[dict[str, float]] = []
        t0 = time.perf_counter()
        tokens_done = 0
        last = start
        end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
        for s in range(start, end):
            tokens, mask = data.batch(s, cfg.batch_size, cfg.seed)
            state, metrics = self.step(state, tokens, mask)
            tokens_done += int(tokens.size)
            if (s + 1) % max(cfg.log_every, 1) == 0 or s + 1 == end:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                elapsed = time.perf_counter() - t0
                m.update(step=s + 1, seconds=round(elapsed, 2), tokens_per_s=round(tokens_done / max(elapsed, 1e-9), 1))
                history.append(m)
                if log:
                    log(json.dumps(m))
            if ckpt is not None and cfg.checkpoint_every and (s + 1) % cfg.checkpoint_every == 0 and s + 1 != end:
                ckpt.save(s + 1, state, meta)
            last = s + 1
        if ckpt is not None and last > start:
            ckpt.save(last, state, meta)
        if ckpt is not None:
            ckpt.close()
        seconds = time.perf_counter() - t0
        if cfg.lora is not None:
            return TrainResult(params=self._merge(self.frozen, state["params"]), step=last, history=history,
                               seconds=seconds, adapters=state["params"])
        return TrainResult(params=state["params"], step=last, history=history, seconds=seconds)


@dataclasses.dataclass(frozen=True)
class _Compiled:
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    param_shardings: Params
    opt_shardings: Any
    state_shardings: dict[str, Any]
    batch_sharding: NamedSharding
    step: Callable
    init_random: Callable
    init_opt: Callable
    copy_params: Callable
    merge: Callable | None


@functools.lru_cache(maxsize=16)
def _compiled(model_config: LlamaConfig, opt: OptimizerConfig, steps: int, mesh: Mesh, rules: ShardingRules,
              min_shard_size: int, lora: LoraConfig | None = None) -> _Compiled:
    """The jitted step and helpers. The trained tree is the params (full training) or the LoRA adapters
    (replicated: they are small); the frozen weights of a LoRA run go in as a second, undonated argument."""
    tx = make_optimizer(opt, steps)
    schedule = learning_rate_schedule(opt, steps)
    param_sh = train_shardings(model_config, mesh, rules, min_shard_size)
    replicated = NamedSharding(mesh, PartitionSpec())
    if lora is None:
        trained, trained_sh, frozen_sh = llama.abstract_params(model_config), param_sh, None
        init_random = jax.jit(lambda key: llama.init_params(model_config, key), out_shardings=param_sh)
        merge = None
    else:
        trained = lora_lib.adapter_shapes(model_config, lora)
        trained_sh, frozen_sh = jax.tree.map(lambda _: replicated, trained), param_sh
        init_random = jax.jit(lambda key: lora_lib.init_adapters(model_config, lora, key), out_shardings=trained_sh)
        merge = jax.jit(functools.partial(lora_lib.merge, lora=lora), out_shardings=param_sh)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, trained),
                                   trained_sh, transform_non_params=lambda _: replicated)
    state_sh = {"step": replicated, "params": trained_sh, "opt_state": opt_sh}
    batch_sh = NamedSharding(mesh, PartitionSpec(DATA, None))
    step = jax.jit(functools.partial(_train_step, model_config, lora, tx, schedule),
                   in_shardings=(state_sh, frozen_sh, batch_sh, batch_sh), out_shardings=(state_sh, replicated),
                   donate_argnums=0)
    init_opt = jax.jit(tx.init, out_shardings=opt_sh)
    copy_params = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(jnp.float32), p), out_shardings=param_sh)
    return _Compiled(tx, schedule, param_sh, opt_sh, state_sh, batch_sh, step, init_random, init_opt, copy_params,
                     merge)


def _train_step(cfg: LlamaConfig, lora: LoraConfig | None, tx: optax.GradientTransformation, schedule: optax.Schedule,
                state: dict[str, Any], frozen: Params | None, tokens: Array,
                loss_mask: Array) -> tuple[dict[str, Any], dict[str, Array]]:
    """One AdamW step on ``state["params"]``: the model's params, or (LoRA) the adapters of ``frozen``."""

    def loss_of(trained: Params) -> tuple[Array, Array]:
        params = trained if lora is None else lora_lib.merge(frozen, trained, lora)
        return next_token_loss(cfg, params, tokens, loss_mask)

    (loss, count), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "learning_rate": schedule(state["step"]),
               "target_tokens": count}
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics


def train(model_config: LlamaConfig, config: TrainConfig, data: TokenDataset, **kwargs: Any) -> TrainResult:
    """``Trainer(model_config, config).fit(data, **kwargs)``."""
    return Trainer(model_config, config).fit(data, **kwargs)

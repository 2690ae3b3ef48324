"""LoRA: the merged weights equal an independent activation-side LoRA in transformers, a fresh adapter is
the base model exactly, training moves only the adapters, resume is exact, the export loads everywhere."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eft_jax
from eft_jax.models import llama
from eft_jax.models.config import LlamaConfig
from eft_jax.train import OptimizerConfig, TokenDataset, TrainConfig, Trainer, chat_dataset, export_hf
from eft_jax.train import lora as lora_lib
from eft_jax.train.checkpointing import ResumeError, TrainCheckpointer
from eft_jax.train.lora import LoraConfig
from tiny import tiny_tokenizer, write_checkpoint
from tolerances import assert_within, float32_tolerance, logits_tolerance

CFG = LlamaConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, max_position_embeddings=64)
# Per family: the transformers model's decoder layers, and the module of each target inside a layer (GPT-2's
# q/k/v are one fused Conv1D, so its test adapts o, up and down only; Conv1D computes x W + b like a Linear).
HF_LAYERS = {
    "llama": (lambda m: m.model.layers, {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                                         "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
                                         "down": "mlp.down_proj"}),
    "gpt2": (lambda m: m.transformer.h, {"o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"}),
}


def _equal(a, b) -> bool:
    return all(bool(np.array_equal(np.asarray(x), np.asarray(y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _logits(cfg, params, tokens):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return np.asarray(llama.forward(cfg, params, jnp.asarray(tokens), positions)[0])


def _random_adapters(cfg, lora, seed):
    """Adapters with ``b`` non-zero too, sized so that the update is comparable to the weights (std 0.02)."""
    adapters = lora_lib.init_adapters(cfg, lora, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(0.05 * rng.standard_normal(x.shape), jnp.float32) if p[-1].key == "b" else x, adapters)


def _hooked_reference(hf_model, family, cfg, adapters, lora, tokens):
    """transformers' forward with LoRA applied on the activations, unmerged: every targeted ``nn.Linear``
    returns ``W x + bias + scale * (x A) B``, with ``A = a[layer]`` as ``[in_features, rank]`` and ``B =
    b[layer]`` as ``[rank, out_features]`` (Hugging Face flattens (heads, head_dim) heads-major)."""
    import torch

    layers, modules = HF_LAYERS[family]
    handles = []
    for target in lora.resolved_targets(cfg):
        block, leaf = lora_lib.TARGETS[target]
        ab = adapters["layers"][block][leaf]
        for layer in range(cfg.num_layers):
            a = torch.as_tensor(np.array(ab["a"][layer]).reshape(-1, lora.rank))
            b = torch.as_tensor(np.array(ab["b"][layer]).reshape(lora.rank, -1))
            module = layers(hf_model)[layer].get_submodule(modules[target])
            handles.append(module.register_forward_hook(
                lambda mod, inputs, out, a=a, b=b: out + lora.scale * (inputs[0] @ a) @ b))
    try:
        with torch.no_grad():
            return hf_model(torch.as_tensor(tokens)).logits.numpy()
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("variant, family, targets", [("gqa", "llama", None), ("qwen2_bias", "llama", None),
                                                      ("gpt2", "gpt2", ("o", "up", "down"))])
def test_merged_model_equals_activation_side_lora_in_transformers_and_exports(tmp_path, variant, family, targets):
    import torch
    import transformers

    hf = write_checkpoint(tmp_path / "base", variant)
    base = eft_jax.load_model(tmp_path / "base", dtype=jnp.float32, sharding="replicated")
    cfg, params = base.config, base.params
    lora = LoraConfig(rank=4, alpha=8.0, targets=targets)
    adapters = _random_adapters(cfg, lora, seed=1)
    tokens = np.random.default_rng(2).integers(0, 261, (2, 12))

    merged = lora_lib.merge(params, adapters, lora)
    ours = _logits(cfg, merged, tokens)
    want = _hooked_reference(hf, family, cfg, adapters, lora, tokens)
    # Two float32 forwards of the same function: merged weights (one extra rounding per weight) against
    # x W + (x A) B (two extra rounded matmuls per projection), so twice the stages of a plain forward:
    # LAMBDA eps max|logit| sqrt(max(hidden, mlp, seq) x 2 layers x 2). A wrong orientation, scale or
    # target moves the logits by O(|update|), which the next check shows is far above it.
    tol = logits_tolerance(want, hidden=cfg.hidden_size, intermediate=cfg.intermediate_size,
                           layers=2 * cfg.num_layers, seq=tokens.shape[1])
    assert_within(ours[..., :261], want[..., :261], tol, f"{variant}: merged LoRA vs activation-side LoRA")
    assert np.max(np.abs(want - _logits(cfg, params, tokens))[..., :261]) > 100 * tol  # the adapters matter

    # The merged export is an ordinary checkpoint: transformers (no hooks) and eft_jax read the same model.
    dest = export_hf(cfg, merged, tmp_path / "merged", tokenizer=base.tokenizer, dtype=jnp.float32)
    plain = transformers.AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = plain(torch.as_tensor(tokens)).logits.numpy()
    assert_within(theirs[..., :261], want[..., :261], tol, f"{variant}: exported merged model vs activation-side LoRA")
    loaded = eft_jax.load_model(dest, dtype=jnp.float32, sharding="replicated")
    assert loaded.config == cfg and _equal(loaded.params, merged)


def test_fresh_adapters_give_exactly_the_base_model():
    params = llama.init_params(CFG, jax.random.key(0))
    lora = LoraConfig(rank=4, alpha=16.0)
    adapters = lora_lib.init_adapters(CFG, lora, jax.random.key(1))
    assert all(not np.any(np.asarray(ab["b"])) for block in adapters["layers"].values() for ab in block.values())
    assert all(np.std(np.asarray(ab["a"])) > 0 for block in adapters["layers"].values() for ab in block.values())
    merged = lora_lib.merge(params, adapters, lora)
    assert _equal(merged, params)  # W + 0 is W, bit for bit
    tokens = np.random.default_rng(0).integers(0, 261, (2, 10))
    np.testing.assert_array_equal(_logits(CFG, merged, tokens), _logits(CFG, params, tokens))


def test_targets_rank_and_shapes():
    lora = LoraConfig(rank=3, alpha=6, targets=["v", "q", "down"])
    assert lora.targets == ("v", "q", "down") and lora.scale == 2.0
    assert lora.resolved_targets(CFG) == ("q", "v", "down")
    shapes = jax.tree.map(lambda x: x.shape, lora_lib.adapter_shapes(CFG, lora))
    assert shapes == {"layers": {"attn": {"q": {"a": (2, 32, 3), "b": (2, 3, 4, 8)}, "v": {"a": (2, 32, 3), "b": (2, 3, 2, 8)}},
                                 "mlp": {"down": {"a": (2, 64, 3), "b": (2, 3, 32)}}}}
    # rank x (in + out) per layer and target
    assert lora_lib.num_adapter_params(CFG, lora) == 2 * 3 * ((32 + 32) + (32 + 16) + (64 + 32))
    assert LoraConfig(rank=1, alpha=1).resolved_targets(CFG) == ("q", "k", "v", "o", "gate", "up", "down")
    non_gated = dataclasses.replace(CFG, mlp_gated=False)
    assert "gate" not in LoraConfig(rank=1, alpha=1).resolved_targets(non_gated)
    with pytest.raises(ValueError, match="no \\['gate'\\] projection"):
        LoraConfig(rank=1, alpha=1, targets=("gate",)).resolved_targets(non_gated)
    for bad, match in [(dict(rank=0, alpha=1), "rank"), (dict(rank=2, alpha=0), "alpha"),
                       (dict(rank=2, alpha=1, targets=["qq"]), "unknown \\['qq'\\]"),
                       (dict(rank=2, alpha=1, targets=["q", "q"]), "twice"), (dict(rank=2, alpha=1, targets="q"), "list")]:
        with pytest.raises(ValueError, match=match):
            LoraConfig(**bad)


def _chats():
    tok = tiny_tokenizer()
    facts = [("red", "apple"), ("blue", "sky"), ("green", "leaf"), ("gold", "sun")]
    convs = [[{"role": "user", "content": f"{c}?"}, {"role": "assistant", "content": f"{o}!"}] for c, o in facts]
    return chat_dataset(tok, convs, seq_len=24)


def test_lora_training_reduces_loss_and_moves_only_the_adapters():
    data = _chats()
    base = llama.init_params(CFG, jax.random.key(5))
    before = jax.tree.map(np.array, base)  # host copies
    lora = LoraConfig(rank=4, alpha=8.0)
    cfg = TrainConfig(steps=40, batch_size=4, optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=4),
                      log_every=10, mesh_data=4, mesh_model=2, min_shard_size=256, lora=lora)
    trainer = Trainer(CFG, cfg)
    result = trainer.fit(data, params=base, log=None)
    losses = [h["loss"] for h in result.history]
    print(f"LoRA SFT loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    # An outcome threshold, not a rounding bound: the deterministic run goes from ~5.4 to ~0.5 (observed
    # 5.43 -> 0.53 on this machine); a broken gradient path (nothing trained) stays near the first value.
    assert losses[-1] < 0.5 * losses[0], losses

    # The base weights are untouched: the caller's arrays and the trainer's frozen copy.
    assert _equal(base, before) and _equal(trainer.frozen, before)
    # The merged result is the base plus scale * a @ b (float64 numpy), and nothing else changed.
    for target in lora.resolved_targets(CFG):
        block, leaf = lora_lib.TARGETS[target]
        w = before["layers"][block][leaf].astype(np.float64)
        a = np.asarray(result.adapters["layers"][block][leaf]["a"], np.float64)
        b = np.asarray(result.adapters["layers"][block][leaf]["b"], np.float64)
        a2, b2 = a.reshape(a.shape[0], -1, lora.rank), b.reshape(b.shape[0], lora.rank, -1)
        update = lora.scale * np.einsum("lir,lro->lio", a2, b2).reshape(w.shape)
        magnitude = lora.scale * np.einsum("lir,lro->lio", np.abs(a2), np.abs(b2)).reshape(w.shape)
        assert np.max(np.abs(update)) > 1e-3  # trained away from b = 0
        # float32 a @ b (rank terms), times scale, plus W: rank + 2 roundings of values <= |W| + |terms|.
        tol = float32_tolerance(np.abs(w) + magnitude, lora.rank + 2)
        assert_within(np.asarray(result.params["layers"][block][leaf]), w + update, tol, f"merged {target}")
    untouched = jax.tree_util.tree_map_with_path(
        lambda p, x, y: True if any(getattr(k, "key", None) in ("q", "k", "v", "o", "gate", "up", "down") for k in p)
        else bool(np.array_equal(np.asarray(x), y)), result.params, before)
    assert all(jax.tree.leaves(untouched))

    # The optimizer state holds only adapter-sized arrays: Adam's two moments per adapter, plus counters.
    adapter_shapes = [x.shape for x in jax.tree.leaves(lora_lib.adapter_shapes(CFG, lora))]
    opt_leaves = jax.tree.leaves(trainer.abstract_state()["opt_state"])
    assert all(x.shape in adapter_shapes or x.shape == () for x in opt_leaves)
    n_adapter = lora_lib.num_adapter_params(CFG, lora)
    assert sum(math.prod(x.shape) for x in opt_leaves if x.shape) == 2 * n_adapter
    assert n_adapter < CFG.num_params / 4


def test_lora_resume_is_bit_identical_and_refuses_other_weights(tmp_path):
    data = TokenDataset.pretraining(np.random.default_rng(0).integers(0, 256, (12, 16)))
    base = llama.init_params(CFG, jax.random.key(3))
    lora = LoraConfig(rank=2, alpha=4.0, targets=("q", "v", "up"))
    settings = dict(steps=8, batch_size=4, optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=2), log_every=1,
                    mesh_data=4, mesh_model=2, min_shard_size=256, lora=lora)
    straight = Trainer(CFG, TrainConfig(**settings)).fit(data, params=base, log=None)

    ckpt = TrainConfig(**settings, checkpoint_dir=str(tmp_path / "run"), checkpoint_every=2)
    first = Trainer(CFG, ckpt).fit(data, params=base, log=None, stop_after=5)
    assert first.step == 5
    resumed = Trainer(CFG, ckpt).fit(data, params=base, log=None)
    assert resumed.step == 8 and resumed.history[0]["step"] == 6
    assert _equal(straight.adapters, resumed.adapters) and _equal(straight.params, resumed.params)
    assert [h["loss"] for h in straight.history[5:]] == [h["loss"] for h in resumed.history]

    # The checkpoint holds the adapters and their optimizer state only (no copy of the base weights).
    trainer = Trainer(CFG, ckpt)
    saved = TrainCheckpointer(ckpt.checkpoint_dir, ckpt).restore(trainer.abstract_state(), step=8)
    assert _equal(saved["params"], resumed.adapters)
    n_saved = sum(x.size for x in jax.tree.leaves(saved))
    assert n_saved < 3 * lora_lib.num_adapter_params(CFG, lora) + 16

    # Other frozen weights, or another LoRA setting, in the same directory are refused.
    other = llama.init_params(CFG, jax.random.key(4))
    with pytest.raises(ResumeError, match="frozen_weights"):
        Trainer(CFG, ckpt).fit(data, params=other, log=None)
    with pytest.raises(ResumeError, match="train_config.lora"):
        Trainer(CFG, dataclasses.replace(ckpt, lora=LoraConfig(rank=3, alpha=4.0))).fit(data, params=base, log=None)
    with pytest.raises(ValueError, match="pass params="):
        Trainer(CFG, TrainConfig(**settings)).fit(data, log=None)


def test_train_cli_lora_exports_the_merged_model(tmp_path, capsys):
    from eft_jax.train.cli import main

    write_checkpoint(tmp_path / "base", "gqa")
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"prompt": f"{i}?", "response": f"{i}!"}) + "\n"
                                                 for i in range(8)))
    (tmp_path / "lora.yaml").write_text(f"""
init_from: {tmp_path / 'base'}
data: {{path: {tmp_path / 'chat.jsonl'}, seq_len: 16}}
train: {{steps: 3, batch_size: 8, mesh_data: 4, mesh_model: 2, optimizer: {{learning_rate: 1.0e-2, warmup_steps: 1}},
         checkpoint_dir: {tmp_path / 'ckpt'}}}
lora: {{rank: 2, alpha: 4, targets: [q, v]}}
output: {tmp_path / 'ft'}
export_dtype: float32
""")
    assert main(["--config", str(tmp_path / "lora.yaml")]) == 0
    base = eft_jax.load_model(tmp_path / "base", dtype=jnp.float32, sharding="replicated").params
    ft = eft_jax.load_model(tmp_path / "ft", dtype=jnp.float32, sharding="replicated").params
    for block, leaf in [("attn", "q"), ("attn", "v")]:
        assert not np.array_equal(np.asarray(ft["layers"][block][leaf]), np.asarray(base["layers"][block][leaf]))
    ft["layers"]["attn"] = {k: v for k, v in ft["layers"]["attn"].items() if k not in ("q", "v")}
    base["layers"]["attn"] = {k: v for k, v in base["layers"]["attn"].items() if k not in ("q", "v")}
    assert _equal(ft, base)  # everything else is the base, bit for bit

    bad = {"lora.dropout=0.1": "dropout", "lora.targets=[qq]": "qq", "lora.rank=0": "rank", "lora.alfa=3": "alfa",
           "train.lora={rank: 2}": "top level"}
    capsys.readouterr()
    for override, message in bad.items():
        assert main(["--config", str(tmp_path / "lora.yaml"), override]) == 2, override
        assert message in capsys.readouterr().err, override
    (tmp_path / "scratch.yaml").write_text("model: {hidden_size: 32}\ntokenizer: x\ndata: {path: y}\ntrain: {steps: 1}\n"
                                           "output: z\nlora: {rank: 2, alpha: 4}\n")
    assert main(["--config", str(tmp_path / "scratch.yaml")]) == 2
    assert "needs init_from" in capsys.readouterr().err

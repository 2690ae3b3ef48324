"""HF export for every family: trained Qwen3 / Gemma 3 / GPT-2 models and random ones of the other families
load in transformers with our logits, and every family's config.json reads back as the same config."""

from __future__ import annotations

import dataclasses
import json
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eft_jax
from eft_jax.models import llama
from eft_jax.models.config import FULL, SLIDING, RopeScaling
from eft_jax.models.families import FAMILIES, config_from_hf
from eft_jax.train import OptimizerConfig, TokenDataset, TrainConfig, Trainer, export_hf
from eft_jax.train.cli import TrainConfigError, _model_config
from eft_jax.train.export import hf_config_dict
from tiny import VARIANTS, hf_config, tiny_tokenizer
from tolerances import assert_within, logits_tolerance

HIDDEN, LAYERS, SEQ = 32, 2, 20  # SEQ > the variants' sliding window (8): the window cuts


def _ours(variant: str):
    """The tiny variant's config, as our reader reads transformers' own config.json of it."""
    return config_from_hf(json.loads(hf_config(variant, hidden_size=HIDDEN, layers=LAYERS).to_json_string()))


def _data() -> TokenDataset:
    # Arithmetic progressions mod 256: learnable, so a few steps lower the loss visibly.
    rng = np.random.default_rng(0)
    start, step = rng.integers(0, 256, (16, 1)), rng.integers(1, 4, (16, 1))
    return TokenDataset.pretraining((start + step * np.arange(SEQ)) % 256)


def _perturb(params):
    """Norm scales and biases (of projections and LayerNorms) moved off their init (1, or 0 for Gemma's 1 + w
    norms, and 0) and apart from each other, so a swapped, mis-shaped or mis-offset one shows in the logits."""
    def f(path, x):
        name = path[-1].key
        if name not in ("scale", "bias") and not name.endswith("_bias"):  # (bias: a LayerNorm's)
            return x
        rng = np.random.default_rng(zlib.crc32(jax.tree_util.keystr(path).encode()))
        return np.asarray(x) + rng.normal(0.0, 0.2, x.shape).astype(np.float32)
    return jax.tree_util.tree_map_with_path(f, jax.device_get(params))


def _check_export(tmp_path, cfg, params, what: str) -> None:
    """Export float32; transformers' logits equal ours within the float32 rounding bound; eft-jax loads the
    same config and weights back."""
    import torch
    import transformers

    dest = export_hf(cfg, params, tmp_path / "hf", tokenizer=tiny_tokenizer(), dtype=jnp.float32)
    written = json.loads((dest / "config.json").read_text())
    assert config_from_hf(written) == cfg

    tokens = np.random.default_rng(1).integers(0, 261, (2, SEQ))
    positions = jnp.broadcast_to(jnp.arange(SEQ), tokens.shape)
    ours = np.asarray(llama.forward(cfg, params, jnp.asarray(tokens), positions)[0])
    hf = transformers.AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32).eval()
    assert type(hf).__name__ == written["architectures"][0]
    with torch.no_grad():
        theirs = hf(torch.as_tensor(tokens)).logits.numpy()
    # Two float32 forwards of the same weights differ by rounding only: LAMBDA x float32 eps x max |logit|
    # x sqrt(longest reduction (MLP 80) x 2 layers); a mis-exported tensor, norm offset, window, soft-cap or
    # rope moves the logits by O(max |logit|).
    tol = logits_tolerance(theirs, hidden=cfg.hidden_size, intermediate=cfg.intermediate_size,
                           layers=cfg.num_layers, seq=SEQ)
    assert_within(ours, theirs, tol, f"{what}: eft-jax vs transformers logits of the exported model")

    loaded = eft_jax.load_model(dest)
    assert loaded.config == cfg
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# Trained with eft-jax's trainer: qwen3 on a (data 4, model 2) mesh with FSDP (its q/k norm leaves in
# training shardings), gemma3 on one device (compiling for the mesh doubles its time), gpt2 on a (data 2,
# model 2) mesh (its LayerNorm biases, projection biases and position table in training shardings).
TRAINED = {"qwen3": (4, 2, "fsdp"), "gemma3": (1, 1, "replicated"), "gpt2": (2, 2, "fsdp")}


@pytest.mark.parametrize("variant", sorted(TRAINED))
def test_trained_model_exports_to_transformers(tmp_path, variant):
    cfg = _ours(variant)
    mesh_data, mesh_model, sharding = TRAINED[variant]
    train_cfg = TrainConfig(steps=6, batch_size=8, optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=1),
                            log_every=1, mesh_data=mesh_data, mesh_model=mesh_model, sharding=sharding,
                            min_shard_size=64)
    result = Trainer(cfg, train_cfg).fit(_data(), log=None)
    losses = [h["loss"] for h in result.history]
    # An outcome threshold, not a rounding bound: these deterministic runs fall by 25-35% in 6 steps.
    assert losses[-1] < 0.9 * losses[0], losses
    _check_export(tmp_path, cfg, _perturb(result.params), f"{variant} (trained)")


# The other families and switches, from a random init (its norms and biases perturbed): the export is
# the same code whether or not the weights were trained.
EXPORTED = {
    "qwen3_window": ("qwen3_window", {}),
    "gemma2": ("gemma2", {}),
    "gemma2_untied_no_window": ("gemma2", dict(layer_types=None, sliding_window=None, tie_word_embeddings=False)),
    "gemma3_no_window": ("gemma3", dict(layer_types=None, sliding_window=None, local_rope_theta=777.0)),
    "llama3_rope": ("llama3_rope", {}),
    "mistral_window": ("mistral_window", {}),
    "qwen2_window": ("qwen2_window", {}),
    "olmo2": ("olmo2", {}),
    "phi3_longrope": ("phi3_longrope", {}),  # fused qkv / gate_up tensors, partial rotary, longrope
    # Per-head fused q/k/v, partial rotary, LayerNorm biases, parallel and sequential residuals.
    "gpt_neox": ("gpt_neox", {}),
    "gpt_neox_sequential": ("gpt_neox_sequential", {}),
    "gpt2": ("gpt2", {}),  # Conv1D [in, out] weights, learned positions
    # Falcon's fused layouts: multi-query, grouped (40B), per-head (sequential); and grouped kv with one shared
    # input norm (num_ln_in_parallel_attn 1).
    "falcon": ("falcon", {}),
    "falcon_new": ("falcon_new", {}),
    "falcon_sequential": ("falcon_sequential", {}),
    "falcon_new_shared_norm": ("falcon_new", dict(shared_input_norm=True)),
    # A rope base and scaling of their own: each family's config.json must carry both to transformers.
    "gpt_neox_linear_rope": ("gpt_neox_sequential", dict(rope_theta=500.0, rope_scaling=RopeScaling("linear", 2.0))),
    "falcon_linear_rope": ("falcon_new", dict(rope_theta=500.0, rope_scaling=RopeScaling("linear", 2.0))),
}


@pytest.mark.parametrize("name", sorted(EXPORTED))
def test_random_model_exports_to_transformers(tmp_path, name):
    variant, changes = EXPORTED[name]
    cfg = dataclasses.replace(_ours(variant), **changes)
    params = _perturb(llama.init_params(cfg, jax.random.key(zlib.crc32(name.encode()))))
    _check_export(tmp_path, cfg, params, name)


# Every family, as transformers writes it (with its windows, soft-caps, scalars, rope types), and as
# eft-jax configs that are not read from a config.json.
ROUND_TRIP = {
    **{f"hf:{v}": v for v in sorted(VARIANTS)},
    "gemma3_llama3_rope": ("gemma3", dict(rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 16), local_rope_theta=123.0,
                                          attn_softcap=7.5, final_softcap=11.0, query_scale=1 / 12)),
    "gemma2_no_window": ("gemma2", dict(layer_types=None, sliding_window=None, tie_word_embeddings=False)),
    "qwen3_all_sliding": ("qwen3", dict(layer_types=(SLIDING, SLIDING), sliding_window=5, rope_theta=1e6)),
    "qwen2_linear_rope": ("qwen2_bias", dict(rope_scaling=RopeScaling("linear", 2.5))),
    "olmo2_untied_eps": ("olmo2", dict(rms_norm_eps=3e-6, tie_word_embeddings=True)),
    "gpt_neox_linear_rope": ("gpt_neox", dict(rope_scaling=RopeScaling("linear", 2.0), rope_theta=500.0,
                                              rms_norm_eps=3e-6, mlp_activation="gelu_tanh")),
    "gpt2_untied": ("gpt2", dict(tie_word_embeddings=False, max_position_embeddings=99, mlp_activation="gelu")),
    "falcon_mha_parallel": ("falcon", dict(num_kv_heads=4, qkv_bias=True, o_bias=True, mlp_bias=True)),
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_config_round_trip(name):
    spec = ROUND_TRIP[name]
    variant, changes = (spec, {}) if isinstance(spec, str) else spec
    cfg = dataclasses.replace(_ours(variant), **changes)
    hf = hf_config_dict(cfg, tiny_tokenizer())
    assert config_from_hf(json.loads(json.dumps(hf))) == cfg
    # transformers reads it too (its config class accepts every key with its type).
    import transformers

    theirs = transformers.AutoConfig.for_model(**{k: v for k, v in hf.items() if k != "architectures"})
    assert theirs.num_hidden_layers == cfg.num_layers
    if cfg.architecture in ("mistral", "phi3"):  # one window for every layer, no layer_types
        assert theirs.sliding_window == cfg.sliding_window
    else:
        assert list(getattr(theirs, "layer_types", None) or [FULL] * cfg.num_layers) == list(
            cfg.layer_types or [FULL] * cfg.num_layers)


def test_every_family_has_a_writer():
    assert {f.name for f in FAMILIES} == {config_from_hf(hf_config(v).to_dict()).architecture for v in VARIANTS}
    assert all(f.write is not None for f in FAMILIES)


def test_gemma_norms_store_w_not_one_plus_w():
    # Gemma's (1 + w) norms: our params and the checkpoint both hold w (zero at init: scale 1).
    cfg = _ours("gemma3")
    params = llama.init_params(cfg, jax.random.key(0))
    assert not np.any(np.asarray(params["final_norm"]["scale"]))
    from eft_jax.train.export import hf_state_dict

    assert not np.any(hf_state_dict(cfg, params, jnp.float32)["model.norm.weight"])


@pytest.mark.parametrize("name, changes, match", [
    ("gqa", dict(qk_norm="head"), "qk_norm"),  # a Llama config.json has no q/k norms
    ("qwen3", dict(qkv_bias=True), "qkv_bias"),  # Qwen3's attention_bias would add an o_proj bias
    ("mistral", dict(qkv_bias=True), "qkv_bias"),  # transformers' Mistral has no q/k/v biases
    ("mistral_window", dict(layer_types=(SLIDING, FULL)), "mixes sliding and full"),
    ("gemma2", dict(query_scale=0.3), "query_scale"),  # query_pre_attn_scalar is an integer
    ("gemma2", dict(local_rope_theta=500.0), "local_rope_theta"),  # Gemma 2 ropes every layer alike
    ("gemma3", dict(local_rope_theta=None), "scaled rope"),  # sliding layers with the linear-scaled rope
    ("qwen3_window", dict(final_softcap=3.0), "final_softcap"),
    ("gpt2", dict(num_kv_heads=2), "num_kv_heads"),  # GPT-2 has no grouped kv heads
    ("gpt_neox", dict(mlp_bias=False), "mlp_bias"),  # GPT-NeoX's MLP always has biases
    ("falcon_sequential", dict(num_kv_heads=2), "num_kv_heads"),  # sequential Falcon: multi-query or per-head
    ("falcon", dict(mlp_activation="silu"), "SiLU"),
])
def test_configs_a_family_cannot_say_are_refused(name, changes, match):
    cfg = dataclasses.replace(_ours(name), **changes)
    with pytest.raises(ValueError, match=match):
        hf_config_dict(cfg)


def test_train_cli_model_takes_the_family_switches():
    shape = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
    qwen3 = _model_config({**shape, "architecture": "qwen3"}, 264)
    assert qwen3.architecture == "qwen3" and qwen3.qk_norm == "head"
    gemma3 = _model_config({**shape, "architecture": "gemma3_text", "sliding_window": 4, "final_softcap": 9.0,
                            "layer_types": [SLIDING, FULL]}, 264)
    assert (gemma3.norm_plus_one, gemma3.post_norms, gemma3.embed_scale, gemma3.qk_norm, gemma3.mlp_activation) == (
        True, True, True, "head", "gelu_tanh")
    assert gemma3.layer_types == (SLIDING, FULL) and gemma3.final_softcap == 9.0 and gemma3.tie_word_embeddings
    assert config_from_hf(hf_config_dict(gemma3)) == gemma3
    assert _model_config(shape, 264).architecture == "llama"
    with pytest.raises(TrainConfigError, match="sliding_window"):
        _model_config({**shape, "architecture": "gemma2"}, 264)
    neox = _model_config({**shape, "num_kv_heads": 4, "architecture": "gpt_neox"}, 264)
    assert (neox.norm_type, neox.parallel_residual, neox.mlp_gated, neox.rotary_dim) == ("layernorm", True, False, 2)
    assert config_from_hf(hf_config_dict(neox)) == neox
    with pytest.raises(TrainConfigError, match="unknown model family"):
        _model_config({**shape, "architecture": "mamba"}, 264)

"""Bad checkpoints give a clear error that names the file or key, not a deep traceback."""

import json

import pytest
from safetensors.numpy import load_file, save_file

import eft_jax
from eft_jax.models.families import config_from_hf
from tiny import hf_config, write_checkpoint


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(eft_jax.CheckpointError, match=r"no config\.json"):
        eft_jax.load_model(tmp_path)


def test_missing_path(tmp_path):
    with pytest.raises(eft_jax.CheckpointError, match="no such file"):
        eft_jax.load_model(tmp_path / "nope")


def test_truncated_safetensors(tmp_path):
    write_checkpoint(tmp_path, "gqa")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(eft_jax.CheckpointError, match=r"model\.safetensors.*truncated"):
        eft_jax.load_model(tmp_path)


def test_garbage_safetensors(tmp_path):
    write_checkpoint(tmp_path, "gqa")
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 100)
    with pytest.raises(eft_jax.CheckpointError, match="not a readable safetensors"):
        eft_jax.load_model(tmp_path)


def test_unsupported_architecture(tmp_path):
    write_checkpoint(tmp_path, "gqa")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(eft_jax.UnsupportedConfigError, match="GPT2LMHeadModel.*not supported"):
        eft_jax.load_model(tmp_path)


def _rewrite_weights(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_tensor(tmp_path):
    write_checkpoint(tmp_path, "gqa")
    _rewrite_weights(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(eft_jax.CheckpointError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight \(expected shape \(144, 64\)\)"):
        eft_jax.load_model(tmp_path)


def test_misshaped_and_unexpected_tensors_are_all_reported(tmp_path):
    write_checkpoint(tmp_path, "gqa")

    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:16]
        t["model.layers.0.extra.weight"] = t["model.norm.weight"]

    _rewrite_weights(tmp_path, edit)
    with pytest.raises(eft_jax.CheckpointError) as err:
        eft_jax.load_model(tmp_path)
    msg = str(err.value)
    assert "2 problem(s)" in msg
    assert "model.layers.0.self_attn.k_proj.weight" in msg and "(16, 64)" in msg and "(32, 64)" in msg
    assert "unexpected tensor model.layers.0.extra.weight" in msg


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling type 'yarn'"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"some_new_field": 1}, "some_new_field"),
        ({"mlp_bias": True}, "mlp_bias"),
    ],
)
def test_config_fields_we_do_not_implement_are_refused(change, needle):
    cfg = hf_config("gqa").to_dict()
    cfg.update(change)
    with pytest.raises(eft_jax.UnsupportedConfigError, match=needle):
        config_from_hf(cfg)


def test_sliding_windows_become_per_layer_windows_not_a_context_limit():
    qwen = hf_config("qwen2_bias", layers=4).to_dict()
    qwen.update(use_sliding_window=True, sliding_window=64, max_window_layers=3, layer_types=None)
    ours = config_from_hf(qwen)
    assert ours.sliding_window == 64 and ours.sliding_layers == (False, False, False, True)
    mistral = hf_config("mistral").to_dict()
    mistral["sliding_window"] = 64
    ours = config_from_hf(mistral)
    assert ours.max_position_embeddings == 256 and ours.sliding_layers == (True, True)


def test_gemma3_v4_config_keys():
    """A config.json as the Hub has it (transformers 4: rope_local_base_freq, sliding_window_pattern)."""
    hf = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 64, "hidden_size": 16,
          "intermediate_size": 32, "num_hidden_layers": 7, "num_attention_heads": 2, "num_key_value_heads": 1,
          "head_dim": 8, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "sliding_window": 512,
          "sliding_window_pattern": 6, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
          "query_pre_attn_scalar": 256, "hidden_activation": "gelu_pytorch_tanh"}
    ours = config_from_hf(hf)
    assert ours.sliding_layers == (True,) * 5 + (False, True)
    assert ours.local_rope_theta == 10_000.0 and ours.rope_theta == 1_000_000.0 and ours.rope_scaling.factor == 8.0
    assert ours.query_scale == 256**-0.5 and ours.tie_word_embeddings and ours.norm_plus_one


@pytest.mark.parametrize(
    "variant,change,needle",
    [
        ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ("gemma3", {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3"},
         "load its text model"),
        ("gemma2", {"layer_types": ["chunked_attention", "full_attention"]}, "chunked_attention"),
        ("qwen3", {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ("gemma3", {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                                        "sliding_attention": {"rope_type": "yarn", "factor": 2.0}}},
         "rope_parameters.sliding_attention"),
    ],
)
def test_family_fields_we_do_not_implement_are_refused(variant, change, needle):
    cfg = hf_config(variant).to_dict()
    cfg.update(change)
    with pytest.raises(eft_jax.UnsupportedConfigError, match=needle):
        config_from_hf(cfg)


def test_transformers_v4_style_rope_keys():
    cfg = hf_config("gqa").to_dict()
    cfg.pop("rope_parameters")
    cfg.update(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    ours = config_from_hf(cfg)
    assert ours.rope_theta == 500000.0 and ours.rope_scaling.kind == "llama3" and ours.rope_scaling.factor == 32.0

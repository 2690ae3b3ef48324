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
    cfg["architectures"], cfg["model_type"] = ["MambaForCausalLM"], "mamba"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(eft_jax.UnsupportedConfigError, match="MambaForCausalLM.*not supported"):
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


@pytest.mark.parametrize(
    "variant,change,needle",
    [
        ("falcon", {"alibi": True}, "ALiBi is not implemented"),
        ("falcon", {"apply_residual_connection_post_layernorm": True}, "apply_residual_connection_post_layernorm"),
        ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ("gpt2", {"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
        ("gpt2", {"add_cross_attention": True}, "add_cross_attention"),
        ("gpt2", {"activation_function": "relu"}, "activation_function 'relu'"),
        ("gpt_neox", {"hidden_act": "relu"}, "hidden_act 'relu'"),
        ("gpt_neox", {"some_new_field": 1}, "some_new_field"),
    ],
)
def test_non_llama_family_fields_we_do_not_implement_are_refused(variant, change, needle):
    cfg = hf_config(variant).to_dict()
    cfg.update(change)
    with pytest.raises(eft_jax.UnsupportedConfigError, match=needle):
        config_from_hf(cfg)


def test_hub_style_configs_of_the_non_llama_families():
    """config.json files as the Hub has them (transformers 4 keys): Pythia's rotary_pct / rotary_emb_base,
    GPT-2's n_* names with n_inner null, Falcon-7B's multi_query and Falcon-40B's new_decoder_architecture."""
    pythia = {"architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu",
              "hidden_size": 512, "initializer_range": 0.02, "intermediate_size": 2048, "layer_norm_eps": 1e-05,
              "max_position_embeddings": 2048, "model_type": "gpt_neox", "num_attention_heads": 8,
              "num_hidden_layers": 6, "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False,
              "torch_dtype": "float16", "transformers_version": "4.24.0", "use_cache": True,
              "use_parallel_residual": True, "vocab_size": 50304}
    ours = config_from_hf(pythia)
    assert (ours.head_dim, ours.rope_dim, ours.rope_theta, ours.num_kv_heads) == (64, 16, 10000.0, 8)
    assert ours.parallel_residual and ours.norm_type == "layernorm" and ours.mlp_activation == "gelu"
    assert ours.qkv_bias and ours.o_bias and ours.mlp_bias and not ours.mlp_gated and not ours.tie_word_embeddings
    assert config_from_hf({**pythia, "rotary_emb_base": 500}).rope_theta == 500.0
    gpt2 = {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
            "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
            "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12,
            "n_layer": 12, "n_positions": 1024, "resid_pdrop": 0.1, "summary_activation": None,
            "summary_first_dropout": 0.1, "summary_proj_to_labels": True, "summary_type": "cls_index",
            "summary_use_proj": True, "task_specific_params": {"text-generation": {"do_sample": True}},
            "vocab_size": 50257}
    ours = config_from_hf(gpt2)
    assert (ours.hidden_size, ours.intermediate_size, ours.num_layers, ours.num_heads, ours.head_dim) == (
        768, 3072, 12, 12, 64)
    assert ours.position_embedding == "learned" and ours.max_position_embeddings == 1024
    assert ours.tie_word_embeddings and ours.mlp_activation == "gelu_tanh" and ours.rms_norm_eps == 1e-5
    assert ours.num_params == 124_439_808  # GPT-2 small
    falcon7b = {"alibi": False, "apply_residual_connection_post_layernorm": False,
                "architectures": ["FalconForCausalLM"], "attention_dropout": 0.0, "bias": False, "bos_token_id": 11,
                "eos_token_id": 11, "hidden_dropout": 0.0, "hidden_size": 4544, "initializer_range": 0.02,
                "layer_norm_epsilon": 1e-05, "model_type": "falcon", "multi_query": True,
                "new_decoder_architecture": False, "num_attention_heads": 71, "num_hidden_layers": 32,
                "parallel_attn": True, "torch_dtype": "bfloat16", "transformers_version": "4.33.0.dev0",
                "use_cache": True, "vocab_size": 65024}
    ours = config_from_hf(falcon7b)
    assert (ours.num_kv_heads, ours.head_dim, ours.intermediate_size) == (1, 64, 4 * 4544)
    assert ours.parallel_residual and ours.shared_input_norm and ours.tie_word_embeddings and not ours.qkv_bias
    falcon40b = {**falcon7b, "hidden_size": 8192, "num_attention_heads": 128, "num_hidden_layers": 60,
                 "new_decoder_architecture": True, "num_kv_heads": 8}
    ours = config_from_hf(falcon40b)
    assert (ours.num_kv_heads, ours.head_dim) == (8, 64)
    assert ours.parallel_residual and not ours.shared_input_norm


def test_gpt2_checkpoint_without_the_transformer_prefix(tmp_path):
    """The Hub's gpt2 stores its tensors without ``transformer.`` (and old causal-mask buffers ``attn.bias``);
    transformers loads them, and so do we, with the same logits."""
    import numpy as np

    write_checkpoint(tmp_path, "gpt2")
    want = np.asarray(eft_jax.load_model(tmp_path).logits(np.arange(20)[None]))

    def strip(t):
        for name in list(t):
            t[name.removeprefix("transformer.")] = t.pop(name)
        t["h.0.attn.bias"] = np.tril(np.ones((1, 1, 256, 256), np.float32))

    _rewrite_weights(tmp_path, strip)
    assert "wte.weight" in load_file(tmp_path / "model.safetensors")
    np.testing.assert_array_equal(np.asarray(eft_jax.load_model(tmp_path).logits(np.arange(20)[None])), want)

"""Tiny random checkpoints for tests, written by transformers itself (the independent reference)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
# A small chat template, so tests can exercise per-model prompt formatting.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '</s>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
TOKENIZER_SIZE = 256 + len(SPECIAL_TOKENS)  # byte-level: one token per byte, then the specials


def tiny_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> transformers.PreTrainedTokenizerFast:
    """A byte-level tokenizer (no merges): exact round trip for any text, 261 tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=byte_vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    if chat_template:
        fast.chat_template = chat_template
    return fast


# Variants of the Llama family the model must reproduce. vocab 264 > tokenizer 261: padded rows.
VARIANTS = {
    "mha": dict(arch="llama", num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(arch="llama", num_attention_heads=4, num_key_value_heads=2),
    "mqa": dict(arch="llama", num_attention_heads=4, num_key_value_heads=1),
    "tied": dict(arch="llama", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2_bias": dict(arch="qwen2", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "llama3_rope": dict(
        arch="llama", num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    ),
    "mistral": dict(arch="mistral", num_attention_heads=4, num_key_value_heads=2, sliding_window=None),
    # Phi-3: fused qkv and gate/up projections. "phi3_longrope" (Phi-3.5 / Phi-4-mini style): partial rotary
    # (half of each head) and longrope with an original context of 16, shorter than the test sequences, so
    # whole-sequence forwards use the long factors and short prefixes the short ones; window 8 on every layer.
    "phi3": dict(arch="phi3", num_attention_heads=4, num_key_value_heads=2),
    "phi3_longrope": dict(
        arch="phi3", num_attention_heads=4, num_key_value_heads=2, sliding_window=8, original_max_position_embeddings=16,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                         "short_factor": [1.0, 1.3, 2.1, 3.7], "long_factor": [1.1, 2.9, 5.3, 9.7]}),
    # Sliding windows shorter than the test sequences (40 tokens), so the window really cuts.
    "mistral_window": dict(arch="mistral", num_attention_heads=4, num_key_value_heads=2, sliding_window=8),
    "qwen2_window": dict(arch="qwen2", num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                         sliding_window=8, max_window_layers=1),
    "qwen3": dict(arch="qwen3", num_attention_heads=4, num_key_value_heads=2, head_dim=24),
    "qwen3_window": dict(arch="qwen3", num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         use_sliding_window=True, sliding_window=8, max_window_layers=1, tie_word_embeddings=True),
    "olmo2": dict(arch="olmo2", num_attention_heads=4, num_key_value_heads=2),
    # GPT-NeoX / Pythia: LayerNorms with biases, fused per-head q/k/v, partial rotary, non-gated exact-GELU MLP;
    # parallel residual (the default) and sequential, without attention biases and with half the head rotated.
    # (initializer_range 0.25: pre-activations large enough that exact and tanh GELU differ beyond rounding.)
    "gpt_neox": dict(arch="gpt_neox", num_attention_heads=4, rotary_pct=0.25, initializer_range=0.25),
    "gpt_neox_sequential": dict(arch="gpt_neox", num_attention_heads=4, rotary_pct=0.5, use_parallel_residual=False,
                                attention_bias=False, tie_word_embeddings=True),
    # GPT-2: learned positions, Conv1D [in, out] weights, tanh GELU, tied head.
    "gpt2": dict(arch="gpt2", num_attention_heads=4, initializer_range=0.25),
    # Falcon 7B style (multi-query, one shared input norm, parallel attention) and 40B style (grouped kv,
    # ln_attn / ln_mlp, here with biases), and the sequential form (per-head fused q/k/v, untied head).
    "falcon": dict(arch="falcon", num_attention_heads=4),
    "falcon_new": dict(arch="falcon", num_attention_heads=4, new_decoder_architecture=True, num_kv_heads=2, bias=True),
    "falcon_sequential": dict(arch="falcon", num_attention_heads=4, multi_query=False, parallel_attn=False,
                              activation="gelu_pytorch_tanh", tie_word_embeddings=False, initializer_range=0.25),
    # Gemma: head_dim and query_pre_attn_scalar set apart from hidden / heads, so each is checked.
    "gemma2": dict(arch="gemma2", num_attention_heads=4, num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=20,
                   sliding_window=8, attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
    "gemma3": dict(arch="gemma3", num_attention_heads=4, num_key_value_heads=1, head_dim=24, query_pre_attn_scalar=20,
                   sliding_window=8, sliding_window_pattern=2,  # sliding, full, sliding, ...
                   rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}}),
}


def hf_config(variant: str = "gqa", *, hidden_size: int = 64, layers: int = 2, vocab: int = 264, **overrides):
    spec = dict(VARIANTS[variant])
    arch = spec.pop("arch")
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig, "qwen3": transformers.Qwen3Config,
           "gemma2": transformers.Gemma2Config, "gemma3": transformers.Gemma3TextConfig,
           "olmo2": transformers.Olmo2Config, "gpt_neox": transformers.GPTNeoXConfig,
           "gpt2": transformers.GPT2Config, "falcon": transformers.FalconConfig,
           "phi3": transformers.Phi3Config}[arch]
    kwargs = dict(
        vocab_size=vocab, hidden_size=hidden_size, intermediate_size=2 * hidden_size + 16,
        num_hidden_layers=layers, max_position_embeddings=256, rms_norm_eps=1e-5,
        bos_token_id=257, eos_token_id=258, pad_token_id=256,
    )
    kwargs.update(spec)
    kwargs.update(overrides)
    # The families that spell the shared fields their own way.
    renames = {"gpt_neox": {"rms_norm_eps": "layer_norm_eps"},
               "gpt2": {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                        "max_position_embeddings": "n_positions", "intermediate_size": "n_inner",
                        "rms_norm_eps": "layer_norm_epsilon"},
               "falcon": {"intermediate_size": "ffn_hidden_size", "rms_norm_eps": "layer_norm_epsilon"}}.get(arch, {})
    kwargs = {renames.get(k, k): v for k, v in kwargs.items()}
    rope = kwargs.get("rope_parameters")
    if rope and rope.get("rope_type") == "longrope":  # one factor per rotated pair, at any hidden size
        half = int(kwargs["hidden_size"] // kwargs["num_attention_heads"] * rope["partial_rotary_factor"]) // 2
        kwargs["rope_parameters"] = {**rope, "short_factor": rope["short_factor"][:half],
                                     "long_factor": rope["long_factor"][:half]}
    return cls(**kwargs)


def write_checkpoint(path: Path, variant: str = "gqa", *, seed: int = 0, dtype=torch.float32,
                     max_shard_size: str | None = None, **overrides) -> transformers.PreTrainedModel:
    """Write a random-weight HF checkpoint + tokenizer to ``path``; returns the torch model."""
    torch.manual_seed(seed)
    config = hf_config(variant, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    # Random non-trivial norms and biases, so a mistake in mapping them shows up in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    tiny_tokenizer().save_pretrained(path)
    return model

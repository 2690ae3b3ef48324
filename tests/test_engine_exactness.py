"""The engine's next-token distributions equal the EFT formula computed independently.

Reference: transformers (PyTorch) full forwards of each model over exactly the token sequence that
model saw (its own prompt format + the shared generated tokens), combined in numpy (float64).
"""

import numpy as np
import pytest

import eft_jax
from eft_jax.engine import Engine
from eft_jax.prompts import render_tokens
from eft_jax.sampling import SamplingParams
from eft_jax.spec import Component, EFTSpec
from eft_reference import eft_reference, next_token_logprobs
from tiny import TOKENIZER_SIZE
from tolerances import assert_within, eft_logprob_tolerance, probability_tolerance

PROMPTS = ["The quick brown fox", [{"role": "user", "content": "Say something."}]]


@pytest.fixture(scope="module")
def loaded(family):
    return {name: eft_jax.load_model(path) for name, (path, _) in family.items()}


def _specs(m):
    return {
        "up": EFTSpec.up_scaling(m["large_base"], m["small_base"], m["small_ft"], 1.0),
        "down": EFTSpec.down_scaling(m["small_base"], m["large_base"], m["large_ft"], 1.0),
        "w0.5": EFTSpec.up_scaling(m["large_base"], m["small_base"], m["small_ft"], 0.5),
        "w2": EFTSpec.up_scaling(m["large_base"], m["small_base"], m["small_ft"], 2.0),
        "mix": EFTSpec.up_scaling(m["large_base"], m["small_base"], [m["small_ft"], m["small_ft2"]], [0.3, 0.7]),
        "conservative": EFTSpec.up_scaling(m["large_base"], m["small_base"], m["small_ft"], 1.0, base_top_p=0.8),
    }


ROLES = {"up": ("large_base", "small_base", ["small_ft"]), "down": ("small_base", "large_base", ["large_ft"]),
         "w0.5": ("large_base", "small_base", ["small_ft"]), "w2": ("large_base", "small_base", ["small_ft"]),
         "mix": ("large_base", "small_base", ["small_ft", "small_ft2"]),
         "conservative": ("large_base", "small_base", ["small_ft"])}


@pytest.mark.parametrize("name", sorted(ROLES))
def test_each_step_matches_the_formula(family, loaded, name, family_logit_tol):
    spec = _specs(loaded)[name]
    results = Engine(spec, chunk_size=4).generate(
        PROMPTS, SamplingParams(temperature=1.0), max_new_tokens=7, batch_size=2, seed=3, return_distributions=True
    )
    base, ref, fts = ROLES[name]
    # Ours and transformers' logits differ by rounding (family_logit_tol); through the EFT formula the
    # log-probs by tol (eft_logprob_tolerance), the probabilities by p (e^tol - 1).
    tol = eft_logprob_tolerance(family_logit_tol, spec.weights)
    torch_of = {k: v[1] for k, v in family.items()}
    components = spec.components
    assert components[2].prompt_format == "chat" and components[0].prompt_format == "plain"
    for prompt, res in zip(PROMPTS, results):
        prompt_ids = [render_tokens(c.model.tokenizer, prompt, c.prompt_format) for c in components]
        assert prompt_ids[2] != prompt_ids[0]  # the fine-tune really sees its chat template
        assert len(res.tokens) == res.distributions.shape[0] > 1
        for j in range(len(res.tokens)):
            gen = res.tokens[:j]
            lps = [next_token_logprobs(torch_of[role], prompt_ids[m] + gen, TOKENIZER_SIZE)
                   for m, role in enumerate([base, ref, *fts])]
            expected = eft_reference(lps[0], lps[1], lps[2:], list(spec.weights), spec.base_top_p)
            assert_within(np.exp(res.distributions[j].astype(np.float64)), np.exp(expected),
                          probability_tolerance(expected, tol), "probabilities")
            # The reported log-prob of the sampled token is that distribution's.
            assert abs(res.token_logprobs[j] - expected[res.tokens[j]]) <= tol


def test_identity_ft_equals_ref_gives_the_large_base(loaded):
    m = loaded
    eft = EFTSpec.up_scaling(m["large_base"], m["small_base"], Component(m["small_base"], "plain"), 1.0)
    alone = EFTSpec.single(m["large_base"])
    greedy = SamplingParams(temperature=0.0)
    a = Engine(eft).generate(PROMPTS, greedy, max_new_tokens=12)
    b = Engine(alone).generate(PROMPTS, greedy, max_new_tokens=12)
    assert [r.tokens for r in a] == [r.tokens for r in b]


def test_identity_large_equals_small_gives_the_fine_tune(loaded):
    m = loaded
    eft = EFTSpec.up_scaling(m["small_base"], m["small_base"], m["small_ft"], 1.0)
    alone = EFTSpec.single(Component(m["small_ft"], "chat"))
    greedy = SamplingParams(temperature=0.0)
    engine = Engine(eft)
    assert len(engine.runs) == 2 and engine.sources == (0, 0, 1)  # base == ref is run once
    a = engine.generate(PROMPTS, greedy, max_new_tokens=12, return_component_logprobs=True)
    # Both roles still report their (identical) log-probs.
    assert a[0].component_logprobs["small_base"] == a[0].component_logprobs["large_base"]
    b = Engine(alone).generate(PROMPTS, greedy, max_new_tokens=12)
    assert [r.tokens for r in a] == [r.tokens for r in b]


def test_score_matches_the_formula(family, loaded, family_logit_tol):
    """Pairs of different lengths in one batch (padded to the grid 8, 12, 16, 24, ...: some land on the 3/4
    steps), each token's EFT log-prob against transformers' forwards combined in numpy."""
    spec = _specs(loaded)["up"]
    responses = ["hi there!", "a somewhat longer answer", "and this one is longer still, to need more slots"]
    results = Engine(spec).score([PROMPTS[0]] * len(responses), responses, batch_size=4)
    torch_of = {k: v[1] for k, v in family.items()}
    tok = loaded["small_ft"].tokenizer
    prompt_ids = [render_tokens(c.model.tokenizer, PROMPTS[0], c.prompt_format) for c in spec.components]
    tol = eft_logprob_tolerance(family_logit_tol, [1.0])  # as above
    for res, response in zip(results, responses, strict=True):
        target = tok(response, add_special_tokens=False)["input_ids"]
        expected = []
        for j, t in enumerate(target):
            lps = [next_token_logprobs(torch_of[r], prompt_ids[m] + target[:j], TOKENIZER_SIZE)
                   for m, r in enumerate(["large_base", "small_base", "small_ft"])]
            expected.append(eft_reference(lps[0], lps[1], lps[2:], [1.0])[t])
        np.testing.assert_allclose(res.token_logprobs, expected, atol=tol, rtol=0)
        assert res.logprob == pytest.approx(sum(expected), abs=len(expected) * tol)  # a sum of len(expected) of them
        # Per-model log-probs: ft - ref is the per-token implicit reward.
        assert set(res.component_logprobs) == {"large_base", "small_base", "small_ft"}


# --- Other families: the same check with a trio of each (windows of 8 tokens, shorter than the prompts) ---

FAMILY_VARIANTS = ["gemma2", "gemma3", "olmo2", "phi3", "qwen3_window", "gpt_neox", "gpt2", "falcon", "falcon_new"]


@pytest.mark.parametrize("variant", FAMILY_VARIANTS)
def test_each_step_matches_the_formula_for_every_family(tmp_path, variant):
    """Up-scaling with a tiny random trio of each family (large 3 layers, small 2); every step's EFT
    distribution against transformers' forwards combined in numpy, as above."""
    import torch

    from tiny import write_checkpoint
    from tolerances import logits_tolerance

    roles = {"large_base": (1, 3), "small_base": (2, 2), "small_ft": (3, 2)}
    torch_of = {name: write_checkpoint(tmp_path / name, variant, seed=seed, layers=layers, initializer_range=0.25)
                for name, (seed, layers) in roles.items()}
    m = {name: eft_jax.load_model(tmp_path / name) for name in roles}
    spec = EFTSpec.up_scaling(m["large_base"], m["small_base"], m["small_ft"], 1.0)
    # The logits' rounding bound over this trio (as the family_logit_tol fixture computes it).
    tokens = torch.as_tensor(np.random.default_rng(0).integers(0, TOKENIZER_SIZE, (4, 64)))
    with torch.no_grad():
        scale = max(float(t(tokens).logits.abs().max()) for t in torch_of.values())
    c = m["large_base"].config  # (GPT-2's transformers config spells the widths n_embd / n_inner)
    tol = eft_logprob_tolerance(
        logits_tolerance(np.float64(scale), hidden=c.hidden_size, intermediate=c.intermediate_size, layers=3, seq=64),
        spec.weights)

    results = Engine(spec, chunk_size=4).generate(
        PROMPTS, SamplingParams(temperature=1.0), max_new_tokens=7, batch_size=2, seed=3, return_distributions=True)
    for prompt, res in zip(PROMPTS, results):
        prompt_ids = [render_tokens(c.model.tokenizer, prompt, c.prompt_format) for c in spec.components]
        assert min(len(p) for p in prompt_ids) > 8  # past the window from the first step
        for j in range(len(res.tokens)):
            gen = res.tokens[:j]
            lps = [next_token_logprobs(torch_of[role], prompt_ids[k] + gen, TOKENIZER_SIZE)
                   for k, role in enumerate(roles)]
            expected = eft_reference(lps[0], lps[1], lps[2:], list(spec.weights), spec.base_top_p)
            assert_within(np.exp(res.distributions[j].astype(np.float64)), np.exp(expected),
                          probability_tolerance(expected, tol), "probabilities")

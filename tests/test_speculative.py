"""Speculative EFT is lossless: greedy identical, sampled tokens follow the exact EFT distribution."""

import numpy as np
import pytest

import eft_jax
from eft_jax.engine import Engine
from eft_jax.prompts import render_tokens
from eft_jax.sampling import SamplingParams
from eft_jax.spec import EFTSpec
from eft_reference import eft_reference, filtered, next_token_logprobs_batch
from tiny import TOKENIZER_SIZE
from tolerances import ALPHA, chi_square_pvalue, eft_logprob_tolerance

PROMPTS = ["hello world", "a", [{"role": "user", "content": "a longer prompt for the chat model"}], "xyz" * 5]


@pytest.fixture(scope="module")
def m(family):
    return {name: eft_jax.load_model(path) for name, (path, _) in family.items()}


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_is_identical_to_non_speculative(m, k, family_logit_tol):
    spec = EFTSpec.up_scaling(m["large_base"], m["small_base"], m["small_ft"], 1.0)
    greedy = SamplingParams(temperature=0.0)
    record = dict(return_distributions=True, return_component_logprobs=True)
    plain = Engine(spec).generate(PROMPTS, greedy, max_new_tokens=[20, 7, 13, 20], batch_size=4, **record)
    fast = Engine(spec, speculative_k=k).generate(PROMPTS, greedy, max_new_tokens=[20, 7, 13, 20], batch_size=4,
                                                  **record)
    assert [r.tokens for r in fast] == [r.tokens for r in plain]
    alone = Engine(spec, speculative_k=k).generate(PROMPTS[2:3], greedy, max_new_tokens=13, batch_size=1)
    assert alone[0].tokens == plain[2].tokens
    # Verifying k + 1 tokens at once vs one at a time: the logits differ by rounding (family_logit_tol),
    # the EFT log-probs (w = 1) by eft_logprob_tolerance of it.
    tol = eft_logprob_tolerance(family_logit_tol, [1.0])
    np.testing.assert_allclose(fast[0].token_logprobs, plain[0].token_logprobs, atol=tol, rtol=0)
    # Plain and speculative decoding share one emit/record path: every step's distribution and each
    # model's log-prob of its token come back the same (a model's log-softmax: twice its logit bound).
    for f, p in zip(fast, plain, strict=True):
        assert f.distributions.shape == p.distributions.shape == (len(p.tokens), p.distributions.shape[1])
        np.testing.assert_allclose(f.distributions, p.distributions, atol=tol, rtol=0)
        for label, lps in p.component_logprobs.items():
            np.testing.assert_allclose(f.component_logprobs[label], lps, atol=2 * family_logit_tol, rtol=0)


def test_separate_drafter_for_plain_decoding(m):
    spec = EFTSpec.single(m["large_base"])
    greedy = SamplingParams(temperature=0.0)
    plain = Engine(spec).generate(PROMPTS, greedy, max_new_tokens=12)
    fast = Engine(spec, speculative_k=2, drafter=m["small_base"]).generate(PROMPTS, greedy, max_new_tokens=12)
    assert [r.tokens for r in fast] == [r.tokens for r in plain]


CASES = {
    # EFT with w = 0.5 between the small base and its fine-tune: the drafter (the fine-tune) is close
    # to the target, so drafts are often accepted; the up-scaling cases exercise rejections.
    "near_drafter": (("small_base", "small_base", "small_ft"), 0.5, SamplingParams(), None),
    "upscale_top_p": (("large_base", "small_base", "small_ft"), 1.0, SamplingParams(top_p=0.8), None),
    "upscale_conservative": (("large_base", "small_base", "small_ft"), 1.0, SamplingParams(temperature=0.8), 0.8),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_second_token_follows_the_exact_eft_marginal(family, m, case):
    """Token 1 (the first speculative one) vs its exact marginal sum_t0 p(t0) p(t1 | t0)."""
    roles, w, sampling, base_top_p = CASES[case]
    spec = EFTSpec.up_scaling(m[roles[0]], m[roles[1]], m[roles[2]], w, base_top_p=base_top_p)
    prompt = "The quick brown fox"
    n = 4000
    res = Engine(spec, speculative_k=3).generate([prompt] * n, sampling, max_new_tokens=3, batch_size=1000,
                                                 seed=123, ids=range(n))
    first = np.array([r.tokens[0] for r in res])
    # A row whose first token is a stop token has no second token: condition on continuing.
    second = np.array([r.tokens[1] for r in res if len(r.tokens) > 1])
    stops = list(Engine(spec).end_ids["all"])

    torch_models = [family[r][1] for r in roles]
    ids = [render_tokens(c.model.tokenizer, prompt, c.prompt_format) for c in spec.components]

    def dists(prefixes):
        """The filtered EFT distribution after each prefix (one batched forward per model)."""
        lps = [next_token_logprobs_batch(t, [ids[i] + list(p) for p in prefixes], TOKENIZER_SIZE)
               for i, t in enumerate(torch_models)]
        return np.stack([filtered(eft_reference(b, r, [f], [w], base_top_p), sampling.temperature, sampling.top_p)
                         for b, r, f in zip(*lps)])

    p0 = dists([[]])[0]
    continuing = [int(t) for t in np.flatnonzero(p0 > 0) if t not in stops]  # every first token: exact
    marginal = p0[continuing] @ dists([[t] for t in continuing])
    marginal /= marginal.sum()
    # Two chi-square tests per case, each failing an exact sampler with probability ALPHA = 1e-4 (fixed seed 123).
    for draws, p in ((first, p0), (second, marginal)):
        assert chi_square_pvalue(draws, p) > ALPHA
    rates = [r.speculative.acceptance_rate for r in res]
    assert 0.0 < np.mean(rates) < 1.0  # both the accept and the correction paths ran


def test_acceptance_accounting_agrees_with_the_outputs(m):
    spec = EFTSpec.up_scaling(m["small_base"], m["small_base"], m["small_ft"], 0.5)
    res = Engine(spec, speculative_k=4).generate(PROMPTS * 2, SamplingParams(), max_new_tokens=[30, 5, 17, 30] * 2,
                                                 batch_size=4, seed=9)
    for r in res:
        s = r.speculative
        rounds_seen = sorted(set(s.round_of) - {0})
        assert rounds_seen == list(range(1, s.rounds + 1))  # every round emitted something
        assert s.round_of[0] == 0 and not s.from_draft[0]  # the first token comes from prefill
        assert s.accepted == sum(s.from_draft)
        assert s.drafted == 4 * s.rounds
        assert s.tokens_per_round == pytest.approx((len(r.tokens) - 1) / s.rounds)
        # Within a round: accepted drafts first, then (unless cut by the length limit) one target token,
        # which is a correction after a rejected draft when fewer than k = 4 drafts came before it.
        rejections = 0
        for rnd in rounds_seen:
            flags = [f for f, ro in zip(s.from_draft, s.round_of) if ro == rnd]
            assert flags == sorted(flags, reverse=True)
            assert len(flags) <= 5
            rejections += (not flags[-1]) and sum(flags) < 4
        assert s.rejected == rejections
        assert s.acceptance_rate == pytest.approx(s.accepted / (s.accepted + s.rejected))
    assert sum(r.speculative.rejected for r in res) > 0
    overall = sum(r.speculative.accepted for r in res) / sum(r.speculative.drafted for r in res)
    assert 0.0 < overall < 1.0

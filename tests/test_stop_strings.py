"""Stop strings: a sample ends with the token that completes one, and is otherwise the sample it would
have been (samples depend only on (seed, stream, position)); reference: the same generation without stop
strings, cut by hand in numpy/Python."""

import pytest

import eft_jax
from eft_jax.engine import Engine
from eft_jax.sampling import SamplingParams
from eft_jax.spec import EFTSpec
from tolerances import eft_logprob_tolerance

PROMPTS = ["The quick brown fox", "Once upon a time", "Hello there", "A B C", "Numbers: 1 2 3"]


@pytest.fixture(scope="module")
def spec(family):
    m = {name: eft_jax.load_model(path) for name, (path, _) in family.items()}
    return EFTSpec.up_scaling(m["large_base"], m["small_base"], m["small_ft"], 1.0)


@pytest.mark.parametrize("k", [0, 2])
def test_a_sample_ends_where_its_stop_string_completes(spec, k, family_logit_tol):
    engine = Engine(spec, chunk_size=4, speculative_k=k)
    kwargs = dict(max_new_tokens=20, seed=5, batch_size=2, ignore_eos=True)  # 2 slots: rows are refilled
    free = engine.generate(PROMPTS, SamplingParams(temperature=1.0), **kwargs)
    # A stop string per prompt taken from the middle of its free-running sample, and one that never occurs.
    stops = [r.text[8:10] for r in free if len(r.text) >= 12] + ["\u2603never\u2603"]
    stopped = engine.generate(PROMPTS, SamplingParams(temperature=1.0), stop=stops, **kwargs)
    assert sum(r.finish_reason == "stop" for r in stopped) >= 3  # the strings really stop samples
    tok = spec.base.model.tokenizer
    for a, b in zip(free, stopped, strict=True):
        # Naive reference: the shortest prefix of the free sample whose text holds a stop string.
        texts = [tok.decode(a.tokens[:n], skip_special_tokens=True) for n in range(len(a.tokens) + 1)]
        end = next((n for n, t in enumerate(texts) if any(s in t for s in stops)), None)
        if end is None:
            assert (b.tokens, b.finish_reason, b.stop_reason) == (a.tokens, "length", None)
            continue
        at, first = min((texts[end].find(s), s) for s in stops if s in texts[end])
        assert b.tokens == a.tokens[:end]
        # The two runs batch rows differently (other refills, other attention windows): their log-probs agree
        # to rounding, each within the EFT rule's bound of the exact value (tests/tolerances.py).
        tol = 2 * eft_logprob_tolerance(family_logit_tol, spec.weights)
        assert b.token_logprobs == pytest.approx(a.token_logprobs[:end], abs=tol, rel=0)
        assert (b.text, b.finish_reason, b.stop_reason) == (texts[end][:at], "stop", first)
        if k:
            st = b.speculative
            assert st.accepted == sum(st.from_draft) and len(st.round_of) == len(b.tokens)
            assert st.rounds == max(st.round_of) and st.accepted + st.rejected <= st.drafted


def test_an_empty_stop_string_is_refused(spec):
    with pytest.raises(ValueError, match="non-empty strings"):
        Engine(spec).generate(PROMPTS[:1], stop=["ok", ""], max_new_tokens=2)


def test_a_job_with_stop_strings_cuts_its_responses(family, tmp_path):
    """`sampling.stop` in a job: each response that held a stop string ends before it, the record names it,
    and the other responses are unchanged."""
    import json

    from eft_jax import cli
    from job_helpers import read_jsonl, trio_config

    config = trio_config(family, tmp_path / "c.yaml", max_new_tokens=16)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))

    def job(out, *overrides):
        assert cli.main(["generate", "--config", str(config), "--prompts", str(prompts), "--out", str(out),
                         "--no-progress", *overrides]) == 0
        return {r["id"]: r for r in read_jsonl(out)}

    free = job(tmp_path / "free.jsonl")
    stop = next(r["response"][5:7] for r in free.values() if len(r["response"]) > 8)
    cut = job(tmp_path / "cut.jsonl", f"sampling.stop={json.dumps([stop])}")
    assert any(stop in r["response"] for r in free.values())
    for i, r in free.items():
        if stop in r["response"]:
            assert cut[i]["response"] == r["response"][: r["response"].find(stop)]
            assert (cut[i]["finish_reason"], cut[i]["stop"]) == ("stop", stop) and cut[i]["tokens"] <= r["tokens"]
        else:
            assert cut[i]["response"] == r["response"] and "stop" not in cut[i]

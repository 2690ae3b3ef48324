"""The vLLM-shaped front end (eft_jax.llm): the same samples as the engine, in vLLM's field names."""

import numpy as np
import pytest

import eft_jax
from eft_jax.engine import Engine
from eft_jax.llm import LLM, SamplingParams
from eft_jax.spec import EFTSpec

PROMPTS = ["The quick brown fox", "Hello there"]


@pytest.fixture(scope="module")
def spec(family):
    m = {name: eft_jax.load_model(path) for name, (path, _) in family.items()}
    return EFTSpec.up_scaling(m["large_base"], m["small_base"], m["small_ft"], 1.0)


def test_generate_returns_vllm_shaped_outputs_equal_to_the_engine(spec):
    llm = LLM(spec=spec, chunk_size=4, batch_size=4)
    params = SamplingParams(n=2, temperature=0.8, top_p=0.9, max_tokens=6, seed=3, logprobs=2)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.prompt for o in outs] == PROMPTS and [o.request_id for o in outs] == ["0", "1"]
    # Reference: the engine itself, one row per (prompt, sample) with the same random streams.
    from eft_jax.llm import _stream
    rows = [p for p in PROMPTS for _ in range(2)]
    ids = [_stream(i, j) for i in range(2) for j in range(2)]
    want = Engine(spec, chunk_size=4).generate(rows, params.engine_sampling(), max_new_tokens=6, ids=ids, seed=3,
                                                return_component_logprobs=True)
    got = [c for o in outs for c in o.outputs]
    assert [c.index for c in got] == [0, 1, 0, 1]
    assert [c.token_ids for c in got] == [w.tokens for w in want]
    assert got[0].token_ids != got[1].token_ids or got[0].text != got[1].text  # two samples, two streams
    for c, w in zip(got, want, strict=True):
        assert c.text == w.text and c.finish_reason == w.finish_reason
        assert c.cumulative_logprob == pytest.approx(sum(w.token_logprobs), abs=1e-4)
        # logprobs=2: the sampled token's log-prob and the two most likely alternatives per step.
        assert len(c.logprobs) == len(c.token_ids)
        for token, entry in zip(c.token_ids, c.logprobs, strict=True):
            assert token in entry and 2 <= len(entry) <= 3
        # The implicit reward is the fine-tune's log-prob minus the reference's, token by token.
        comps = c.eft.component_logprobs
        np.testing.assert_allclose(c.eft.implicit_rewards["small_ft"],
                                   np.subtract(comps["small_ft"], comps["small_base"]), rtol=0, atol=0)


def test_chat_takes_one_conversation_or_several(spec):
    llm = LLM(spec=spec, chunk_size=4)
    conversation = [{"role": "user", "content": "Say something."}]
    [one] = llm.chat(conversation, SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
    two = llm.chat([conversation, conversation], SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
    assert one.outputs[0].token_ids == two[0].outputs[0].token_ids == two[1].outputs[0].token_ids


def test_llm_from_the_embedded_default_config():
    llm = LLM(overrides=["job.batch_size=4"])
    [out] = llm.generate(["Where was the author born?"], SamplingParams(max_tokens=8, temperature=0), use_tqdm=True)
    assert out.outputs[0].token_ids and out.outputs[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("bad, match", [(dict(n=0), "n must be"), (dict(max_tokens=0), "max_tokens"),
                                        (dict(top_p=0.0), "top_p"), (dict(logprobs=-1), "logprobs")])
def test_bad_sampling_params_are_refused_when_made(bad, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**bad)


def test_response_prefix_is_part_of_every_models_prompt(spec):
    # The LLM's prefix (or one call's) is rendered after each model's prompt, exactly as Engine.render does it.
    from eft_jax.llm import _stream
    llm = LLM(spec=spec, chunk_size=4, response_prefix="Answer:")
    params = SamplingParams(max_tokens=5, temperature=0.7, seed=2)
    engine = Engine(spec, chunk_size=4)
    for prefix, outs in (("Answer:", llm.generate(PROMPTS, params, use_tqdm=False)),
                         ("Sure,", llm.generate(PROMPTS, params, use_tqdm=False, response_prefix="Sure,"))):
        want = list(engine.run([engine.render(p, 5, stream=_stream(i, 0), response_prefix=prefix)
                                for i, p in enumerate(PROMPTS)], params.engine_sampling(), seed=2))
        by_index = {r.index: r for u in want for r in u.finished}
        assert [o.outputs[0].token_ids for o in outs] == [by_index[i].tokens for i in range(len(PROMPTS))]
    plain = LLM(spec=spec, chunk_size=4).generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in plain] != [o.outputs[0].token_ids for o in outs]


def test_defaults_come_from_the_config_and_its_generation_config(family, tmp_path):
    # No SamplingParams given: the config's settings, with what it leaves out from the fine-tune's
    # generation_config.json (as `eft-jax generate` does), and the config's limits and response prefix.
    import json
    import shutil

    import yaml

    from job_helpers import trio_config

    ft = tmp_path / "small_ft"
    shutil.copytree(family["small_ft"][0], ft)
    (ft / "generation_config.json").write_text(json.dumps({"top_k": 7, "temperature": 0.4, "repetition_penalty": 1.2}))
    cfg = trio_config(family, tmp_path / "c.yaml")
    raw = yaml.safe_load(cfg.read_text())
    raw["models"]["small_ft"]["path"] = str(ft)
    raw["sampling"] = {"top_p": 0.9}
    raw["job"] = {**raw.get("job", {}), "max_new_tokens": 5, "seed": 4, "response_prefix": "A:"}
    cfg.write_text(yaml.safe_dump(raw))
    llm = LLM(str(cfg))
    d = llm.get_default_sampling_params()
    assert (d.temperature, d.top_p, d.top_k, d.repetition_penalty, d.max_tokens, d.seed) == (0.4, 0.9, 7, 1.2, 5, 4)
    assert llm.response_prefix == "A:"
    off = LLM(str(cfg), overrides=["sampling.use_generation_config=false"]).get_default_sampling_params()
    assert (off.temperature, off.top_k, off.repetition_penalty) == (1.0, 0, 1.0)
    [out] = llm.generate(["hi"], use_tqdm=False)
    [same] = llm.generate(["hi"], d, use_tqdm=False)
    assert out.outputs[0].token_ids == same.outputs[0].token_ids and len(out.outputs[0].token_ids) <= 5

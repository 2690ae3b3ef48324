"""The response prefix (proxy-tuning's ``chat_response_prefix``): text appended after each model's rendered
prompt, chat template and plain formats alike, so every model continues the same tokens.

References: the tokenizer itself (``apply_chat_template`` and plain tokenization, then the prefix tokenized on
its own), and - for the job - the same prompt with the prefix written into it: the tiny family's tokenizer is
byte-level without merges, so for plain-format models "prompt + prefix" tokenizes to the same ids.
"""

from __future__ import annotations

import json

import pytest

from eft_jax.prompts import PromptError
from job_helpers import read_jsonl, run, trio_config

PREFIX = " Answer:"


@pytest.fixture(scope="module")
def models(family):
    import eft_jax

    return {name: eft_jax.load_model(family[name][0]) for name in ("large_base", "small_ft")}


@pytest.fixture(scope="module")
def renderer(models):
    from eft_jax.requests import Renderer
    from eft_jax.spec import Component

    return Renderer((Component(models["large_base"], "Q: {prompt}\nA:", "base"),
                     Component(models["small_ft"], "chat", "ft"),
                     Component(models["large_base"], "plain", "plain")), vocab=models["large_base"].vocab_size)


def reference_tokens(tokenizer, prompt, fmt):
    """Each format rendered by the tokenizer directly (no eft-jax code)."""
    if fmt == "chat":
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    text = text if fmt == "plain" else fmt.replace("{prompt}", text)
    return tokenizer(text, add_special_tokens=True)["input_ids"]


@pytest.mark.parametrize("prompt", ["What is 2 + 2?", [{"role": "system", "content": "Be brief."},
                                                        {"role": "user", "content": "What is 2 + 2?"}]])
def test_every_models_tokens_end_with_the_prefix_tokens(renderer, prompt):
    rendered = renderer.render(prompt, 16, response_prefix=PREFIX)
    for c, ids in zip(renderer.components, rendered.tokens, strict=True):
        tok = c.model.tokenizer
        prefix_ids = tok(PREFIX, add_special_tokens=False)["input_ids"]
        assert len(prefix_ids) > 0
        assert list(ids) == reference_tokens(tok, prompt, c.prompt_format) + prefix_ids
    without = renderer.render(prompt, 16)
    assert [len(a) - len(b) for a, b in zip(rendered.tokens, without.tokens, strict=True)] == [len(PREFIX)] * 3


def test_the_prefix_counts_towards_the_context(renderer):
    lengths = renderer.lengths("y" * 100)
    room = 256 - max(lengths)  # the tiny models' context is 256 tokens
    renderer.render("y" * 100, room)  # fits exactly without a prefix
    with pytest.raises(PromptError, match="context is 256"):
        renderer.render("y" * 100, room, response_prefix=PREFIX)
    fitted = renderer.render("y" * 100, room, response_prefix=PREFIX, on_long_prompt="truncate_left")
    assert fitted.cut == len(PREFIX) and fitted.prompt == "y" * (100 - len(PREFIX))  # byte tokens: 1 per char
    assert fitted.tokens[2][-len(PREFIX):] == tuple(renderer.components[2].model.tokenizer(
        PREFIX, add_special_tokens=False)["input_ids"])


def test_a_job_continues_the_prefix_like_a_prompt_that_ends_with_it(family, env, tmp_path):
    """All-plain models: a line with a prefix samples what the prompt with the prefix appended samples (same id,
    same tokens); the prefix is not in the response. With the chat fine-tune, a per-line prefix and the config's
    job.response_prefix give the same samples."""
    config = trio_config(family, tmp_path / "c.yaml", max_new_tokens=6)
    plain = ["models.small_ft.prompt_format=plain"]
    prompts = [("a", "The capital of France is"), ("b", "Count: one, two,")]

    def job(name, lines, *overrides):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        proc = run(env, "generate", "--config", config, "--prompts", path, "--out", tmp_path / f"{name}.out.jsonl",
                   "--no-progress", *overrides)
        assert proc.returncode == 0, proc.stderr
        return {r["id"]: (r["response"], r["tokens"], r["logprob"]) for r in read_jsonl(tmp_path / f"{name}.out.jsonl")}

    with_prefix = job("prefix", [{"id": i, "prompt": p, "response_prefix": PREFIX} for i, p in prompts], *plain)
    written_in = job("inline", [{"id": i, "prompt": p + PREFIX} for i, p in prompts], *plain)
    assert with_prefix == written_in

    per_line = job("chat_line", [{"id": i, "prompt": p, "response_prefix": PREFIX} for i, p in prompts])
    per_config = job("chat_config", [{"id": i, "prompt": p} for i, p in prompts], f"job.response_prefix={PREFIX!r}")
    none = job("chat_none", [{"id": i, "prompt": p} for i, p in prompts])
    assert per_line == per_config and per_line != none


def test_scoring_scores_the_response_after_the_prefix(models):
    """``score``: the prefix ends each model's prompt, and the response's tokens follow it unchanged."""
    from eft_jax.engine import Engine
    from eft_jax.spec import Component, EFTSpec

    spec = EFTSpec(base=Component(models["large_base"], "Q: {prompt}\nA:", "base"),
                   ref=Component(models["large_base"], "plain", "ref"),
                   fine_tuned=(Component(models["small_ft"], "chat", "ft"),), weights=(1.0,))
    engine = Engine(spec)
    pair = engine.render_pair("What is 2 + 2?", " 4.", response_prefix=PREFIX)
    for c, ids in zip(engine.score_runs, pair.tokens, strict=True):
        tok = c.model.tokenizer
        assert list(ids) == (reference_tokens(tok, "What is 2 + 2?", c.prompt_format)
                             + tok(PREFIX, add_special_tokens=False)["input_ids"])
    assert list(pair.response) == models["large_base"].tokenizer(" 4.", add_special_tokens=False)["input_ids"]

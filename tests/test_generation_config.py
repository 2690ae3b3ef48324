"""generation_config.json sampling defaults (``jobs.runner.generation_defaults``): the fine-tune's file fills
the sampling settings a config does not set, ``sampling.use_generation_config: false`` turns it off, and a job
run on those defaults is the job whose config sets the same values (same fingerprint, same samples).
The end-token ids of generation_config.json are covered by ``test_end_tokens.py``."""

from __future__ import annotations

import io
import json
import shutil

import pytest
import yaml

from eft_jax.config import load_config
from eft_jax.jobs.records import JobError
from eft_jax.jobs.runner import generation_defaults
from job_helpers import read_jsonl, run, trio_config


def with_generation_config(family, tmp_path, name, values):
    """A copy of one family checkpoint with a generation_config.json holding ``values``."""
    path = tmp_path / name
    shutil.copytree(family[name][0], path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 1, **values}))
    return path


def config_with(tmp_path, family, sampling, name="c", **paths):
    cfg = trio_config(family, tmp_path / f"{name}.yaml")
    raw = yaml.safe_load(cfg.read_text())
    raw["sampling"] = sampling
    for name, path in paths.items():
        raw["models"][name]["path"] = str(path)
    cfg.write_text(yaml.safe_dump(raw))
    return cfg


def test_the_fine_tunes_file_fills_what_the_config_does_not_set(family, tmp_path):
    ft = with_generation_config(family, tmp_path, "small_ft", {"temperature": 0.3, "top_p": 0.5, "top_k": 5,
                                                                "repetition_penalty": 1.1, "do_sample": True})
    base = with_generation_config(family, tmp_path, "large_base", {"temperature": 0.1, "min_p": 0.2})
    cfg = config_with(tmp_path, family, {"temperature": 1.0, "top_p": 0.95}, small_ft=ft, large_base=base)
    log = io.StringIO()
    resolved = generation_defaults(load_config(cfg), log)
    s = resolved.sampling
    # Set by the config: kept. Not set: the fine-tune's file (the base's file is not read).
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.repetition_penalty) == (1.0, 0.95, 5, 0.0, 1.1)
    assert "top_k=5" in log.getvalue() and "repetition_penalty=1.1" in log.getvalue()  # implemented (issue 15)
    # The fingerprint is the one of a config that sets those values itself.
    explicit = config_with(tmp_path, family, {"temperature": 1.0, "top_p": 0.95, "top_k": 5,
                                              "repetition_penalty": 1.1}, "explicit",
                           small_ft=ft, large_base=base)
    assert resolved.fingerprint() == load_config(explicit).fingerprint()
    assert resolved.fingerprint() != load_config(cfg).fingerprint()

    off = generation_defaults(load_config(cfg, ["sampling.use_generation_config=false"]))
    assert off.sampling.top_k == 0 and off.fingerprint() == load_config(cfg).fingerprint()

    nothing_set = generation_defaults(load_config(config_with(tmp_path, family, None, "unset", small_ft=ft)))
    assert (nothing_set.sampling.temperature, nothing_set.sampling.top_p, nothing_set.sampling.top_k) == (0.3, 0.5, 5)


def test_plain_decoding_reads_the_base_file_and_bad_values_are_refused(family, tmp_path):
    base = with_generation_config(family, tmp_path, "large_base", {"temperature": 0.25})
    cfg = config_with(tmp_path, family, None, large_base=base)
    plain = load_config(cfg, ["eft.ref=null", "eft.fine_tuned=[]", "eft.weights=[]"])
    assert generation_defaults(plain).sampling.temperature == 0.25

    ft = with_generation_config(family, tmp_path, "small_ft", {"top_p": 1.5})
    with pytest.raises(JobError, match=r"small_ft/generation_config.json: top_p must be a number in \(0, 1\].*got 1.5.*"
                                       "use_generation_config=false"):
        generation_defaults(load_config(config_with(tmp_path, family, None, "bad", small_ft=ft)))


def test_a_job_on_generation_config_defaults_is_the_job_that_sets_them(family, env, tmp_path):
    ft = with_generation_config(family, tmp_path, "small_ft", {"top_k": 3, "temperature": 0.5})
    prompts = tmp_path / "in.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(["hi", "a b c"])))
    outs = {}
    for name, sampling in (("file", {"top_p": 0.95}), ("config", {"top_p": 0.95, "top_k": 3, "temperature": 0.5})):
        cfg = config_with(tmp_path, family, sampling, name, small_ft=ft)
        proc = run(env, "generate", "--config", cfg, "--prompts", prompts, "--out", tmp_path / f"{name}.jsonl",
                   "--no-progress")
        assert proc.returncode == 0, proc.stderr
        outs[name] = read_jsonl(tmp_path / f"{name}.jsonl")
    assert outs["file"] == outs["config"]  # the same samples and the same fingerprint

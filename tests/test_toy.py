"""The toy world and the shipped toy checkpoints: they load, and up-scaling transfers knowledge."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from eft_jax.toy import data as toy_data
from eft_jax.toy import eval as toy_eval
from eft_jax.toy.world import World, WorldConfig, make_world
from tolerances import eft_logprob_tolerance, logits_tolerance

ROOT = Path(__file__).resolve().parents[1] / "checkpoints" / "toy"


@pytest.fixture(scope="module")
def toy():
    return toy_eval.load_toy(ROOT)


def test_world_is_deterministic_and_matches_the_shipped_one():
    shipped = World.load(ROOT / "world.json")
    assert make_world(shipped.config) == shipped
    w = make_world(WorldConfig(num_entities=50, seed=3))
    assert w == make_world(WorldConfig(num_entities=50, seed=3))
    assert len({e.name for e in w.entities}) == 50
    # No held-out person's facts reach the fine-tuning data.
    convs = toy_data.qa_conversations(w)
    text = " ".join(m["content"] for c in convs for m in c)
    assert all(e.name not in text for e in w.heldout_entities)
    assert all(e.name in text for e in w.finetune_entities)


def test_answer_judging():
    w = make_world(WorldConfig(num_entities=4))
    e = w.entities[0]
    for attr in ("city", "year", "occupation", "employer"):
        item = toy_eval.Item(e, attr, toy_data.question(e, attr))
        right = toy_data.answer(e, attr)
        j = toy_eval.judge(item, right, True, w)
        assert (j.correct, j.well_formed, j.refusal) == (True, True, False)
        assert toy_eval.judge(item, right, False, w).well_formed is False  # did not stop
        assert toy_eval.judge(item, right + " " + right, True, w).well_formed is False
        wrong = next(v for v in w.values[attr] if v != e.value(attr))
        bad = toy_eval.judge(item, toy_data.answer(dataclass_replace(e, attr, wrong), attr), True, w)
        assert (bad.correct, bad.well_formed, bad.on_topic, bad.true_value) == (False, True, True, False)
        refusal = toy_eval.judge(item, toy_data.REFUSAL, True, w)
        assert (refusal.correct, refusal.well_formed, refusal.refusal) == (False, False, True)


def test_pooled_scores_and_question_sets():
    """``score`` pools judgements as counted by hand; the dev and test halves split the held-out people."""
    from types import SimpleNamespace

    w = make_world(WorldConfig(num_entities=8))
    e = w.heldout_entities[0]
    items = [toy_eval.Item(e, a, toy_data.question(e, a)) for a in ("city", "year", "year", "employer")]
    answers = [toy_data.answer(e, "city"),                        # right
               f"{e.name} was born in {e.city}.",                  # wrong attribute, true value
               toy_data.REFUSAL,                                   # refusal, no value
               f"{e.name} works for {e.employer}"]                 # right, but no full stop
    s = toy_eval.score(items, [SimpleNamespace(text=t, finish_reason="stop") for t in answers], w)
    assert (s.accuracy, s.format, s.refusal, s.behaviour, s.knowledge, s.n) == (0.5, 0.25, 0.25, 0.5, 1.0, 4)
    halves = toy_eval.split_people(w)
    assert set(halves["dev"]) | set(halves["test"]) == set(w.heldout_entities)
    assert not set(halves["dev"]) & set(halves["test"])
    for wording, templates in toy_data.WORDINGS.items():
        qs = toy_eval.question_items(halves["test"], wording)
        assert len(qs) == len(halves["test"]) * sum(len(t) for t in templates.values())
        assert all(q.entity is halves["test"][q.person] and q.wording == wording for q in qs)


def dataclass_replace(e, attr, value):
    import dataclasses

    return dataclasses.replace(e, **{attr: int(value) if attr == "year" else value})


def test_shipped_tokenizer_is_the_sentencepiece_model(toy):
    import sentencepiece as spm

    models, world = toy
    sp = spm.SentencePieceProcessor(model_file=str(ROOT / "tokenizer" / "spm.model"))
    tok = models["small-ft"].tokenizer
    texts = toy_data.biographies(world, 1, seed=123)[:200] + ["Who is the mayor of Tokyo? It's 42!"]
    for t in texts:
        assert tok(t, add_special_tokens=False)["input_ids"] == sp.encode(t)
    vocab = [m.tokenizer.convert_ids_to_tokens(list(range(len(m.tokenizer)))) for m in models.values()]
    assert all(v == vocab[0] for v in vocab)
    assert tok.chat_template == toy_data.CHAT_TEMPLATE


def test_shipped_checkpoints_are_hf_checkpoints(toy):
    import torch
    import transformers

    models, _ = toy
    total = sum(f.stat().st_size for f in ROOT.rglob("*") if f.is_file())
    assert total < 42e6, f"checkpoints/toy is {total / 1e6:.1f} MB"
    record = json.loads((ROOT / "build.json").read_text())
    assert set(record["models"]) == set(toy_eval.MODEL_NAMES)
    assert models["large-base"].config.num_params > 3 * models["small-base"].config.num_params
    tokens = np.asarray([models["small-ft"].tokenizer("Where was Stur Durum born? Stur Durum was born in")["input_ids"]])
    for name in ("small-ft", "large-base"):
        hf = transformers.AutoModelForCausalLM.from_pretrained(ROOT / name, dtype=torch.float32).eval()
        assert next(hf.parameters()).numel() > 0
        with torch.no_grad():
            theirs = hf(torch.as_tensor(tokens)).logits.numpy()
        ours = np.asarray(models[name].logits(tokens))  # float32 from the bf16 weights
        # Both run float32 on the same bf16-rounded weights: float32 eps x max |logit| x sqrt(longest
        # reduction x layers) x LAMBDA = 8 (8e-4 / 1.3e-3 at |logit| <= 24; observed 1.5e-5).
        c = models[name].config
        tol = logits_tolerance(theirs, hidden=c.hidden_size, intermediate=c.intermediate_size, layers=c.num_layers,
                               seq=tokens.shape[1])
        np.testing.assert_allclose(theirs, ours, atol=tol, rtol=0)


@pytest.mark.slow  # ~16 s: 80 greedy generations
def test_upscaling_beats_the_small_fine_tune_on_heldout_facts(toy):
    """The paper's claim in miniature, computed live on 40 fixed held-out questions (greedy)."""
    models, world = toy
    items = toy_eval.eval_items(world, 10)
    specs = toy_eval.row_specs(models, world)
    small = toy_eval.score(items, toy_eval.generate(specs["small-ft"], items), world)
    up = toy_eval.score(items, toy_eval.generate(specs["EFT up-scaled"], items), world)
    print(f"small-ft {small}, up-scaled {up}")
    # Outcome thresholds, not rounding bounds: greedy decoding of fixed questions gives accuracy 0.25 vs
    # 1.0 and format 1.0 here, so at least 8 of the 40 answers would have to change (on near-ties of two
    # tokens) before a threshold is crossed.
    assert up.accuracy >= small.accuracy + 0.2, (small, up)
    assert up.format >= 0.8, up  # the fine-tuned behaviour is kept
    assert up.refusal == 0.0


@pytest.mark.slow  # ~60 s: tokenizer, pretraining and SFT of six models, a second age seed, the evaluation
def test_build_pipeline_end_to_end(tmp_path):
    """A miniature ``eft-jax toy build``: every stage runs and the result loads as a trio; ``eft-jax toy eval``
    on it writes the report, with the age grid over two fine-tuning seeds.

    The build runs in a process of its own, as ``eft-jax toy build`` does (its training compiles a few
    dozen programs, whose memory mappings count towards the test process's limit: see
    ``_release_compiled_programs`` in conftest.py)."""
    script = """
import json, sys
from eft_jax.toy import build as toy_build
from eft_jax.toy.world import WorldConfig
from eft_jax.train import OptimizerConfig, TrainConfig
opt = OptimizerConfig(learning_rate=1e-3, warmup_steps=1)
cfg = toy_build.BuildConfig(
    world=WorldConfig(num_entities=40), vocab_size=320, tokenizer_passes=2, small=(32, 1, 64), large=(64, 1, 64),
    seq_len=64,
    pretrain=TrainConfig(steps=3, batch_size=4, optimizer=opt, mesh_data=1, sharding="replicated", log_every=1),
    sft_seq_len=64, sft=TrainConfig(steps=2, batch_size=4, optimizer=opt, mesh_data=1, sharding="replicated"),
    age_per_person=2, age_seq_len=96,
    age_sft=TrainConfig(steps=2, batch_size=4, optimizer=opt, seed=1, mesh_data=1, sharding="replicated"),
)
record = toy_build.build(sys.argv[1], sys.argv[2], cfg, log=None)
print(json.dumps(sorted(record["models"])))

# `--only` the age fine-tunes with a new recipe: those two are retrained, the others kept byte for byte.
import dataclasses, hashlib
from pathlib import Path
def digests(root):
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(Path(root).rglob("*"))
            if f.is_file() and f.name not in ("build.json", "README.md")}
before = digests(sys.argv[1])
cfg = dataclasses.replace(cfg, age_sft=dataclasses.replace(cfg.age_sft, steps=3))
again = toy_build.build(sys.argv[1], sys.argv[2] + "-only", cfg, log=None, only=list(toy_build.AGE_MODELS))
after = digests(sys.argv[1])
print(json.dumps({"changed": sorted({f.split("/")[0] for f in before if before[f] != after.get(f)}),
                  "steps": {m: again["models"][m]["steps"] for m in again["models"]},
                  "kept_records_equal": all(again["models"][m] == record["models"][m] for m in record["models"]
                                            if m not in toy_build.AGE_MODELS),
                  "config": json.loads((Path(sys.argv[1]) / "build.json").read_text())["config"]["age_sft"]["steps"]}))

# The age grid of `eft-jax toy eval` on it, over two fine-tuning seeds (the second trained from the built
# bases with the build's recipe), and its report section.
from pathlib import Path
from eft_jax.toy import age_eval, eval as toy_eval, data as toy_data
from eft_jax.toy.world import World
root, work = Path(sys.argv[1]), Path(sys.argv[2]) / "age"
world = World.load(root / "world.json")
seeds = age_eval.seeds(root, 2)
ev = age_eval.evaluate(root, work, toy_eval.split_people(world)["test"][:3], world, toy_data.BASE_PROMPT_FORMAT,
                       seeds, n_boot=100, log=lambda _: None)
dirs = age_eval.seed_finetunes(root, work, seeds, log=None)
# `eft-jax toy age-recipe`: a changed recipe, fine-tuned and scored on dev people.
import contextlib, io
from eft_jax.toy import age_recipe
table = io.StringIO()
with contextlib.redirect_stdout(table):
    age_recipe.main(["--root", str(root), "--sizes", "small", "--steps", "3", "--lr", "1e-4", "--people", "2",
                     "--work", str(work / "recipe")])
toy_build.train_model = None  # a second call must reuse the seed-2 fine-tunes, not train again
assert age_eval.seed_finetunes(root, work, seeds, log=None) == dirs
print(json.dumps({"seeds": ev["seeds"], "rows": sorted(ev["grid"]), "gaps": sorted(ev["gaps"]["train"]),
                  "dirs": {s: {k: str(v) for k, v in d.items()} for s, d in dirs.items()},
                  "json": toy_eval.to_json({"ages": ev})["ages"]["seeds"],  # serializable as docs/toy_eval.json
                  "report": "\\n".join(age_eval.report_section(ev)), "recipe": table.getvalue()}))
"""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "toy"), str(tmp_path / "work")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    built, only, age = (json.loads(line) for line in proc.stdout.strip().splitlines()[-3:])
    assert age["json"] == [1, 2]
    assert built == sorted(toy_eval.MODEL_NAMES)
    assert only["changed"] == ["large-ft-age", "small-ft-age"]  # weights retrained; everything else untouched
    assert only["steps"] == {"small-base": 3, "large-base": 3, "small-ft": 2, "large-ft": 2, "small-ft-refuse": 2,
                             "small-ft-age": 3, "large-ft-age": 3}
    assert only["kept_records_equal"] and only["config"] == 3
    assert age["seeds"] == [1, 2]
    assert set(age["rows"]) == {"small-ft-age", "large-ft-age", "EFT up-scaled", "EFT down-scaled",
                                "large-base (prompted)", "small-base (prompted)"}
    assert set(age["gaps"]) == {"pooled", "seed 1", "seed 2"}
    assert "## Ages: does fine-tuning scale matter for a skill? (test)" in age["report"]
    assert "| seed 2 |" in age["report"] and "| pooled |" in age["report"]
    recipe = age["recipe"].splitlines()
    assert [line.split(" | ")[:4] for line in recipe[2:]] == [
        ["| small-ft-age", "3 steps, lr 0.0001, 2/person", "1", kind] for kind in ("train", "heldout")]
    assert all(line.count("|") == recipe[0].count("|") for line in recipe)
    assert age["dirs"]["1"]["small-ft-age"] == str(tmp_path / "toy" / "small-ft-age")  # the shipped seed
    for name in ("small-ft-age", "large-ft-age"):  # the second seed: fine-tuned from the bases into work
        seed2 = Path(age["dirs"]["2"][name])
        assert seed2.is_relative_to(tmp_path / "work" / "age") and (seed2 / "config.json").exists()
    models, world = toy_eval.load_toy(tmp_path / "toy")
    assert len(world.entities) == 40
    items = toy_eval.eval_items(world, 1)
    results = toy_eval.generate(toy_eval.row_specs(models, world)["EFT up-scaled"], items, max_new_tokens=4)
    assert len(results) == 4 and all(r.error is None for r in results)
    assert models["small-ft"].dtype == jnp.float32  # load_toy's dtype; the files are bf16


def test_build_only_refuses_to_keep_a_model_that_would_differ(tmp_path):
    """``eft-jax toy build --only``: the kept models must be what the configuration builds."""
    import dataclasses

    from eft_jax.toy import build as toy_build

    cfg = toy_build.BuildConfig()
    age = list(toy_build.AGE_MODELS)
    with pytest.raises(ValueError, match="build.json does not exist: run the whole build first"):
        toy_build.kept_models(tmp_path, cfg, age)
    models = {m: {"seconds": 1.0} for m in toy_build.MODEL_NAMES}
    (tmp_path / "build.json").write_text(json.dumps({"config": cfg.to_dict(), "models": models}))
    for m in toy_build.MODEL_NAMES:
        (tmp_path / m).mkdir()
        (tmp_path / m / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="world.json, which is missing"):
        toy_build.kept_models(tmp_path, cfg, age)
    (tmp_path / "world.json").write_text("{}")
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "spm.model").write_bytes(b"")
    assert set(toy_build.kept_models(tmp_path, cfg, age)) == set(toy_build.MODEL_NAMES) - set(age)
    new_age = dataclasses.replace(cfg, age_sft=dataclasses.replace(cfg.age_sft, steps=cfg.age_sft.steps + 1))
    assert set(toy_build.kept_models(tmp_path, new_age, age)) == set(toy_build.MODEL_NAMES) - set(age)
    with pytest.raises(ValueError, match=r"'age_sft' differs .* feeds \['large-ft-age'\]"):
        toy_build.kept_models(tmp_path, new_age, ["small-ft-age"])
    with pytest.raises(ValueError, match=r"'qa_prior_per_pass' differs .* feeds \['small-base', 'large-base'"):
        toy_build.kept_models(tmp_path, dataclasses.replace(cfg, qa_prior_per_pass=0), age)
    with pytest.raises(ValueError, match="retrains small-base, so small-ft .* must be retrained too"):
        toy_build.kept_models(tmp_path, cfg, ["small-base"])
    with pytest.raises(ValueError, match=r"unknown models \['tiny-ft'\]"):
        toy_build.kept_models(tmp_path, cfg, ["tiny-ft"])
    (tmp_path / "large-ft" / "config.json").unlink()
    with pytest.raises(ValueError, match="keeps large-ft, but .*large-ft or its entry"):
        toy_build.kept_models(tmp_path, cfg, age)


def test_teacher_forced_distributions_equal_the_engines(family, family_logit_tol):
    """The KL column's teacher-forced EFT distributions equal the ones the engine decodes with."""
    import eft_jax
    from eft_jax.engine import Engine
    from eft_jax.sampling import SamplingParams
    from eft_jax.spec import EFTSpec

    m = {name: eft_jax.load_model(family[name][0]) for name in ("large_base", "small_base", "small_ft", "small_ft2")}
    spec = EFTSpec.up_scaling(m["large_base"], m["small_base"], [m["small_ft"], m["small_ft2"]], (0.7, 0.6))
    prompts = ["Once upon a time", "The quick brown fox jumps"]
    results = Engine(spec).generate(prompts, SamplingParams(temperature=1.0), max_new_tokens=6, seed=3,
                                    return_distributions=True)
    forced = toy_eval.teacher_forced_logprobs(spec, prompts, [r.tokens for r in results], results[0].distributions.shape[-1])
    # One full forward vs prefill + cached steps: logits differ by rounding (family_logit_tol), the EFT
    # log-probs (weights 0.7, 0.6) by tol (tolerances.eft_logprob_tolerance).
    tol = eft_logprob_tolerance(family_logit_tol, spec.weights)
    for r, f in zip(results, forced):
        np.testing.assert_allclose(f, r.distributions, atol=tol, rtol=0)
    # KL(p || q) = (sum p - sum q) + sum_v p_v phi(d_v), phi(d) = d - 1 + e^-d <= d^2 / 2 e^|d|, d = log p - log q:
    # the float32 normalisation mismatch plus a second-order term.
    norm = max(float(np.abs(np.exp(f.astype(np.float64)).sum(-1) - np.exp(r.distributions.astype(np.float64)).sum(-1)).max())
               for r, f in zip(results, forced))
    assert toy_eval.mean_kl(forced, [r.distributions for r in results]) <= norm + tol**2 / 2 * np.exp(tol)

"""The memory plan (eft_jax.memory): exact per-device bytes, refusal before anything is loaded, a fitting job runs.

Byte counts are exact integers: the plan's weights and KV-cache figures must equal the bytes of the
shards that loading and ``Model.init_cache`` put on each of the 8 CPU devices of a 2x4 / 4x2 mesh.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import pytest

from eft_jax import memory
from eft_jax.config import ConfigError, ModelEntry, load_config
from eft_jax.jobs.records import read_requests
from eft_jax.loading import load_model, load_tokenizer
from eft_jax.prompts import bucket_length, prompt_bucket, render_tokens
from eft_jax.sharding import make_mesh
from conftest import bytes_per_device
from job_helpers import read_jsonl, run, trio_config


@pytest.mark.parametrize("data,model,sharding,dtype", [
    (2, 4, "tensor_parallel", "float32"),
    (2, 4, "replicated", "float32"),
    (4, 2, "tensor_parallel", "bfloat16"),  # 2 kv heads over model=2: the caches' kv heads split too
    (4, 2, "replicated", "bfloat16"),
])
def test_plan_bytes_equal_the_arrays_on_each_device(family, data, model, sharding, dtype):
    path = family["large_base"][0]
    mesh = make_mesh(data, model, jax.devices()[:8])
    loaded = load_model(path, dtype=jnp.dtype(dtype), mesh=mesh, sharding=sharding)
    spec = memory.read_model_spec(ModelEntry(str(path), dtype=dtype, sharding=sharding))
    assert spec.config == loaded.config
    axes = {"data": data, "model": model}

    weights = bytes_per_device(loaded.params)
    planned = memory.weight_bytes_per_device(spec.config, dtype, sharding, axes)
    assert len(weights) == 8 and set(weights.values()) == {planned}
    whole = sum(x.nbytes for x in jax.tree.leaves(loaded.params))
    assert (planned < whole) == (sharding == "tensor_parallel")  # tensor-parallel really splits something

    batch, slots = 8, memory.cache_slots(32, 10, 4, speculative_k=2)
    cache = bytes_per_device(loaded.init_cache(batch, slots))
    assert len(cache) == 8
    assert set(cache.values()) == {memory.cache_bytes_per_device(spec.config, dtype, sharding, axes, batch, slots)}


def test_model_spec_reads_headers_only(family, tmp_path):
    path = family["small_base"][0]
    assert memory.read_model_spec(ModelEntry(str(path))).checkpoint_dtype == "float32"  # the safetensors header
    alone = tmp_path / "config-only"
    alone.mkdir()
    shutil.copy(path / "config.json", alone / "config.json")
    spec = memory.read_model_spec(ModelEntry(str(alone), dtype="bfloat16"))
    assert spec.checkpoint_dtype == "bfloat16" and spec.config.num_layers == 2


def test_cache_slots_as_the_batching_loop():
    # prompt bucket + 1 + chunk * ceil((max_new - 1) / chunk) + (k + 1 with speculative decoding)
    assert memory.cache_slots(64, 24, 8) == 64 + 1 + 24
    assert memory.cache_slots(64, 25, 8, speculative_k=4) == 64 + 1 + 24 + 5


def test_prompt_bucket_is_the_smallest_length_of_the_grid_that_holds_the_prompt():
    grid = sorted({m * 2 ** k for m in (16, 24) for k in range(12)})  # 16, 24, 32, 48, 64, 96, ...
    for n in range(0, 3000):
        assert prompt_bucket(n) == next(g for g in grid if g >= n), n
    # never longer than the power-of-two bucket, never more than a third of it padding above 16
    assert all(prompt_bucket(n) <= bucket_length(n) for n in range(3000))
    assert all(prompt_bucket(n) - n < prompt_bucket(n) / 3 for n in range(17, 3000))


def test_prompt_bound_covers_the_rendered_prompts(family, tmp_path):
    """The plan's prompt bound (bytes + allowances) is at least every model's real prompt length."""
    config = load_config(trio_config(family, tmp_path / "c.yaml"))
    prompts = tmp_path / "p.jsonl"
    lines = [{"id": 1, "prompt": "The quick brown fox"},
             {"id": 2, "messages": [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Tell me about élan and 東京"}]}]
    prompts.write_text("".join(json.dumps(x) + "\n" for x in lines))
    requests, _, _ = read_requests(prompts)
    workload = memory.workload_from_requests(config, requests, "generate")
    for name in config.model_names():
        tokenizer = load_tokenizer(config.models[name].path)
        for req in requests:
            bound = memory.workload_from_requests(config, [req], "generate").prompt_tokens
            assert len(render_tokens(tokenizer, req.prompt, config.models[name].prompt_format)) <= bound
    assert workload.new_tokens == config.job.max_new_tokens and workload.batch_size == config.job.batch_size


def test_suggestions_when_even_the_weights_do_not_fit(family, tmp_path):
    config = load_config(trio_config(family, tmp_path / "c.yaml"))  # float32, replicated
    specs = memory.read_model_specs(config)
    axes = {"data": 1, "model": 4}
    workload = memory.config_workload(config, 64)
    full = memory.plan_memory(config, specs, axes, workload, None)
    assert full.fits  # unknown memory: nothing is refused
    weights = sum(m.weights for m in full.models)
    tight = memory.DeviceMemory(int(weights * 0.95), "test")
    plan = memory.plan_memory(config, specs, axes, workload, tight)
    assert not plan.fits
    text = memory.does_not_fit_message(plan, specs)
    assert "even job.batch_size=1 does not fit" in text
    assert "models.large_base.dtype=bfloat16 models.small_base.dtype=bfloat16 models.small_ft.dtype=bfloat16" in text
    assert "models.large_base.sharding=tensor_parallel" in text and "mesh.model=8" in text
    for name in ("large_base (base)", "small_base (ref)", "small_ft (ft0)", "shared working memory", "total"):
        assert name in text


def test_mesh_device_memory_gb_is_validated_and_not_fingerprinted(family, tmp_path):
    path = trio_config(family, tmp_path / "c.yaml")
    config = load_config(path, ["mesh.device_memory_gb=16"])
    assert config.mesh.device_memory_gb == 16.0
    assert config.fingerprint() == load_config(path).fingerprint()
    with pytest.raises(ConfigError, match="mesh.device_memory_gb: must be null"):
        load_config(path, ["mesh.device_memory_gb=0"])


def test_a_job_that_cannot_fit_is_refused_before_any_model_file_is_opened(family, env, tmp_path):
    """Models that are a config.json alone (no weights, no tokenizer): anything past the plan would fail on
    them, so exit 2 with the plan's table proves the refusal came first."""
    for name in ("large_base", "small_base", "small_ft"):
        (tmp_path / name).mkdir()
        shutil.copy(family[name][0] / "config.json", tmp_path / name / "config.json")
    headers = {name: (tmp_path / name, None) for name in family}
    config_path = trio_config(headers, tmp_path / "c.yaml", batch_size=64)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "The quick brown fox"}) + "\n")

    # A device memory between what batch 4 and batch 64 need (mesh 1 x 1: the `env` fixture's one CPU device).
    config = load_config(config_path)
    specs = memory.read_model_specs(config)
    workload = memory.workload_from_requests(config, read_requests(prompts)[0], "generate")
    axes = {"data": 1, "model": 1}

    def need(batch: int) -> int:
        return memory.plan_memory(config, specs, axes, dataclasses.replace(workload, batch_size=batch), None).total

    gb = (need(4) + need(64)) / 2 / (1 - memory.HEADROOM) / 1e9
    available = memory.DeviceMemory(int(gb * 1e9), "mesh.device_memory_gb")
    expected = memory.largest_batch(config, specs, axes, workload, available)
    assert expected is not None and 4 <= expected < 64

    out = tmp_path / "out.jsonl"
    proc = run(env, "generate", "--config", config_path, "--prompts", prompts, "--out", out, "--no-progress",
               f"mesh.device_memory_gb={gb!r}")
    assert proc.returncode == 2, proc.stderr
    assert "does not fit in device memory; nothing was loaded" in proc.stderr
    for piece in ("memory plan for generate", "large_base (base)", "small_base (ref)", "small_ft (ft0)",
                  "does NOT fit", f"job.batch_size={expected}: the largest batch size that fits"):
        assert piece in proc.stderr, proc.stderr
    assert not out.exists()

    # With the memory to fit, the same job gets past the plan and stops where the missing files are needed.
    proc = run(env, "generate", "--config", config_path, "--prompts", prompts, "--out", out, "--no-progress",
               "mesh.device_memory_gb=1000")
    assert proc.returncode == 2 and "memory plan" not in proc.stderr and "tokenizer" in proc.stderr, proc.stderr


def test_a_job_that_fits_runs_and_config_prints_its_plan(family, env, tmp_path):
    config_path = trio_config(family, tmp_path / "c.yaml")
    proc = run(env, "config", "--config", config_path, "--prompt-tokens", "64")
    assert proc.returncode == 0, proc.stderr
    assert "# memory plan for generate" in proc.stdout and "-> fits" in proc.stdout, proc.stdout

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": f"Tell me {i}"}) + "\n" for i in range(3)))
    out = tmp_path / "out.jsonl"
    proc = run(env, "generate", "--config", config_path, "--prompts", prompts, "--out", out, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert len(read_jsonl(out)) == 3

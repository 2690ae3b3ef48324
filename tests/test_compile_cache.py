"""JAX's persistent compilation cache (on by default, per user, switchable) and the programs a job compiles.

JAX's cache settings are process-global and applied at ``import eft_jax``, so every cache case runs in
a fresh subprocess with its own HOME / XDG_CACHE_HOME / environment.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from jax import monitoring

import eft_jax
from eft_jax.engine import Engine
from eft_jax.sampling import SamplingParams
from eft_jax.spec import EFTSpec

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "checkpoints" / "toy"
_CLEAN = ("EFT_JAX_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR", "XDG_CACHE_HOME",
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "JAX_LOG_COMPILES")

# Prints what JAX was told after `import eft_jax` (and optionally after more statements).
SHOW = ("import json, jax, eft_jax\n{extra}\n"
        "print(json.dumps([jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs]))")


def _run(args: list[str], home: Path, **env: str) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in _CLEAN}
    e.update(HOME=str(home), JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1", **env)
    out = subprocess.run([sys.executable, *args], env=e, cwd=REPO, capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _show(home: Path, extra: str = "", **env: str) -> tuple[str | None, float]:
    return tuple(json.loads(_run(["-c", SHOW.format(extra=extra)], home, **env).stdout.strip().splitlines()[-1]))


def _entries(path: Path) -> set[str]:
    return {p.name for p in path.glob("*-cache")} if path.is_dir() else set()


@pytest.mark.parametrize("case", ["xdg", "home", "env_dir", "env_off"])
def test_on_by_default_in_the_per_user_dir_and_switchable_by_env(tmp_path, case):
    env = {"xdg": {"XDG_CACHE_HOME": str(tmp_path / "xdg")}, "home": {},
           "env_dir": {"EFT_JAX_COMPILE_CACHE": str(tmp_path / "mine")}, "env_off": {"EFT_JAX_COMPILE_CACHE": "off"}}[case]
    expected = {"xdg": tmp_path / "xdg" / "eft-jax" / "jax-compile", "home": tmp_path / ".cache" / "eft-jax" / "jax-compile",
                "env_dir": tmp_path / "mine", "env_off": None}[case]
    directory, min_time = _show(tmp_path, **env)
    assert directory == (None if expected is None else str(expected))
    # Every program is cached (JAX's default skips those compiled in under 1 s); untouched when off.
    assert min_time == (1.0 if expected is None else 0.0)
    if expected is not None:
        assert expected.is_dir()


def test_the_users_own_jax_setting_is_respected(tmp_path):
    theirs = str(tmp_path / "theirs")
    extra = "eft_jax.compile_cache.configure('off'); eft_jax.compile_cache.configure('/somewhere/else')"
    assert _show(tmp_path, extra, JAX_COMPILATION_CACHE_DIR=theirs, EFT_JAX_COMPILE_CACHE=str(tmp_path / "x")) \
        == (theirs, 1.0)
    assert not (tmp_path / "x").exists()


def test_config_key_switches_off_and_redirects_before_anything_compiles(tmp_path):
    # The CLI's _load applies job.compile_cache; a later switch (after a compile) moves new entries too.
    a, b = tmp_path / "a", tmp_path / "b"
    extra = (
        "import argparse, jax.numpy as jnp\nfrom eft_jax.cli import _load\n"
        "load = lambda o: _load(argparse.Namespace(config=None, overrides=o))\n"
        "load(['job.compile_cache=off']); assert jax.config.jax_compilation_cache_dir is None\n"
        f"load(['job.compile_cache={a}']); jax.jit(lambda x: x + 1)(jnp.ones(3)).block_until_ready()\n"
        f"load(['job.compile_cache={b}']); jax.jit(lambda x: x * 2)(jnp.ones(4)).block_until_ready()\n"
    )
    assert _show(tmp_path, extra, EFT_JAX_COMPILE_CACHE="off")[0] == str(b)
    assert _entries(a) and _entries(b)
    assert not (tmp_path / ".cache").exists()


def test_second_run_of_a_job_compiles_nothing(tmp_path):
    """Run a tiny job twice: the first fills the caches, the second only reads them (no compilation, no new
    entry). The engine's programs are saved whole (eft_jax.programs, loaded without tracing: JAX logs
    nothing for them), every other program goes through JAX's cache."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": f"Where was person {i} born?"}) + "\n" for i in range(3)))
    cache = tmp_path / "cache"
    args = ["-m", "eft_jax.cli", "generate", "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"), "--overwrite",
            "--no-progress", "eft.ref=null", "eft.fine_tuned=[]", "eft.weights=[]", "speculative.k=0",
            "job.max_new_tokens=3", "job.chunk_size=2", "job.batch_size=2", f"job.compile_cache={cache}"]
    first = _run(args, tmp_path, JAX_LOG_COMPILES="1", EFT_JAX_COMPILE_CACHE="off")
    written, saved = _entries(cache), _saved(cache)
    programs = first.stderr.count("Finished XLA compilation")
    assert len(saved) >= 2  # start and decode_chunk
    assert len(written) + len(saved) == programs  # every program was written, once
    trees = {p.name for p in (cache / "eft-jax-programs").glob("params-*.json")}  # eft_jax.models.param_tree
    assert len(trees) == 1  # one model: its (config, dtype)
    # The job's programs, remembered for the next run's warm start (programs.warm_start), in order of use.
    (listing,) = (cache / "eft-jax-programs").glob("*.programs.json")
    used = json.loads(listing.read_text())["programs"]
    assert set(used) == saved and used[0] != used[-1]
    output = (tmp_path / "o.jsonl").read_bytes()
    second = _run(["-X", "importtime", *args], tmp_path, JAX_LOG_COMPILES="1", EFT_JAX_COMPILE_CACHE="off")
    assert second.stderr.count("Finished XLA compilation") == len(written)
    assert second.stderr.count("Persistent compilation cache hit") == len(written)  # all read, none compiled
    assert (_entries(cache), _saved(cache)) == (written, saved)
    assert (tmp_path / "o.jsonl").read_bytes() == output
    # Nothing left to trace, and the memory plan's parameter tree read from disk: flax is never imported.
    imported = {line.rsplit("|", 1)[-1].strip() for line in second.stderr.splitlines() if line.startswith("import time:")}
    assert "jax" in imported and "flax" not in imported and "transformers" not in imported


def _saved(path: Path) -> set[str]:
    return {p.name for p in (path / "eft-jax-programs").glob("*.program")}


# --- Programs compiled by one generate call (in this process) ---------------------------------------------

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_compiled: list[str] = []
monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: _compiled.append(kw.get("fun_name", "?")) if event == _BACKEND_COMPILE else None)


@pytest.fixture(scope="module")
def toy():
    return {name: eft_jax.load_model(TOY / name) for name in ("large-base", "small-base", "small-ft")}


@pytest.mark.parametrize("mode", ["plain", "eft", "speculative", "static"])
def test_one_generate_call_compiles_a_bounded_set_of_programs(toy, mode):
    """Six prompts of one shape, two slots: the programs are ``start`` (empty caches + prefill + token 0),
    the chunk (decode or speculative) and, from continuous batching (``eft_jax.batching``), ``refill`` of a
    power-of-two number of rows (1 or 2 here; static batching refills all 2 slots at once). Nothing per
    batch, per model or eager (a cache constructor, ``jnp.asarray``, ``jnp.all``, the speculative
    counters, a second chunk program...). A fresh chunk size makes the plan new to this process.
    """
    if mode in ("plain", "static"):
        spec = EFTSpec.single(toy["large-base"])
    else:
        spec = EFTSpec.up_scaling(toy["large-base"], toy["small-base"], toy["small-ft"], 1.0)
    chunk = {"plain": 3, "eft": 5, "speculative": 7, "static": 2}[mode]
    engine = Engine(spec, chunk_size=chunk, speculative_k=2 if mode == "speculative" else 0)
    before = len(_compiled)
    results = engine.generate(["Where was Krax Bupas born?"] * 6, SamplingParams(temperature=0.7, top_p=0.9),
                              ids=range(6), max_new_tokens=6, batch_size=2, continuous=mode != "static")
    assert all(r.tokens for r in results)
    new = _compiled[before:]
    chunk_program = "jit(spec_chunk)" if mode == "speculative" else "jit(decode_chunk)"
    assert new.count("jit(start)") <= 1 and new.count(chunk_program) <= 1, new
    assert new.count("jit(refill)") <= (1 if mode == "static" else 2), new  # row counts 1, 2 (static: 2)
    assert set(new) <= {"jit(start)", chunk_program, "jit(refill)"}, new


def test_scoring_compiles_one_program_per_batch_shape(toy):
    spec = EFTSpec.up_scaling(toy["large-base"], toy["small-base"], toy["small-ft"], 1.0)
    before = len(_compiled)
    Engine(spec).score(["Who does Krax Bupas work for?"] * 6, ["Drul Bank."] * 6, batch_size=3)  # two batches
    assert len(_compiled[before:]) <= 1, _compiled[before:]

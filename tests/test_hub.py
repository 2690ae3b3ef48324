"""Models named by Hugging Face Hub id, found in a local cache laid out as huggingface_hub lays it out."""

import shutil
from pathlib import Path

import numpy as np
import pytest

import eft_jax
from eft_jax.config import resolve_model_path
from eft_jax.loading.hub import resolve_hub_id
from tiny import TOKENIZER_SIZE, write_checkpoint

COMMIT, OTHER = "a" * 40, "b" * 40


def _cache_repo(cache, repo: str, files_from=None, *, commit=COMMIT, ref="main"):
    """``repo`` in a Hub cache at ``cache``: refs/<ref> -> commit, snapshots/<commit>/ holding ``files_from``'s files."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    if files_from is not None:
        for f in files_from.iterdir():
            shutil.copy(f, snapshot / f.name)
    return snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may leave this machine
    monkeypatch.delenv("EFT_JAX_ALLOW_DOWNLOAD", raising=False)
    return cache


def test_a_cached_model_loads_by_its_hub_id_and_revision(tmp_path, cache):
    write_checkpoint(tmp_path / "main", "gqa", seed=1)
    write_checkpoint(tmp_path / "v2", "gqa", seed=2)
    _cache_repo(cache, "some-org/tiny-model", tmp_path / "main")
    _cache_repo(cache, "some-org/tiny-model", tmp_path / "v2", commit=OTHER, ref="v2")
    tokens = np.random.RandomState(0).randint(0, TOKENIZER_SIZE, size=(1, 8))
    for source, local in (("some-org/tiny-model", "main"), ("some-org/tiny-model@v2", "v2"),
                          (f"some-org/tiny-model@{OTHER}", "v2")):
        by_id = eft_jax.load_model(source)
        np.testing.assert_array_equal(np.asarray(by_id.logits(tokens)),
                                      np.asarray(eft_jax.load_model(tmp_path / local).logits(tokens)))
    # Job configs name models the same way.
    assert resolve_model_path("some-org/tiny-model") == cache / "models--some-org--tiny-model" / "snapshots" / COMMIT


def test_a_model_not_in_the_cache_says_where_it_looked_and_how_to_fetch_it(cache):
    with pytest.raises(eft_jax.CheckpointError) as e:
        eft_jax.load_model("some-org/absent-model")
    message = str(e.value)
    assert str(cache) in message and "huggingface-cli download some-org/absent-model" in message
    assert "EFT_JAX_ALLOW_DOWNLOAD=1" in message
    with pytest.raises(FileNotFoundError, match="absent-model"):
        resolve_model_path("some-org/absent-model")


def test_a_gguf_repository_resolves_to_its_file(tmp_path, cache):
    snapshot = _cache_repo(cache, "org/model-GGUF")
    (snapshot / "model.Q4_K_M.gguf").write_bytes(b"GGUF")
    assert resolve_hub_id("org/model-GGUF") == snapshot / "model.Q4_K_M.gguf"
    (snapshot / "model.Q8_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(eft_jax.CheckpointError, match="several GGUF files"):
        resolve_hub_id("org/model-GGUF")
    assert resolve_hub_id("org/model-GGUF:model.Q8_0.gguf") == snapshot / "model.Q8_0.gguf"


def test_a_local_path_wins_over_a_hub_id_of_the_same_shape(tmp_path, cache, monkeypatch):
    write_checkpoint(tmp_path / "org" / "name", "gqa")
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("org/name") == Path("org/name")
    eft_jax.load_model("org/name")  # the local directory; the (empty) cache is never asked

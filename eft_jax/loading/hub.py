"""Models named by their Hugging Face Hub id (``org/name`` or ``org/name@revision``), found in the local cache.

A model path that does not exist on disk but has the shape of a Hub id is looked up in the user's Hugging
Face cache (``HF_HUB_CACHE``, else ``HF_HOME``/hub, else ~/.cache/huggingface/hub) with
``huggingface_hub.snapshot_download(..., local_files_only=True)``: the same cache and layout that
``from_pretrained`` and ``huggingface-cli download`` use. Nothing is downloaded unless the user asks
(``EFT_JAX_ALLOW_DOWNLOAD=1``, or ``allow_download=True``); a model that is not cached gets an error that
names the cache directory it looked in and the command that fetches it.

A snapshot holding a ``config.json`` is a checkpoint directory; one holding no ``config.json`` and exactly
one ``.gguf`` file is that file (a GGUF repository); ``org/name@revision:file.gguf`` picks one of several.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from eft_jax.loading.source import CheckpointError

# org/name, optional @revision (a branch, tag or commit), optional :file inside the snapshot.
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+?))?(?::(?P<file>[\w./-]+))?$")
ALLOW_DOWNLOAD_ENV = "EFT_JAX_ALLOW_DOWNLOAD"


def looks_like_hub_id(source: str) -> bool:
    """Whether ``source`` has the shape of a Hub id (it may still be a relative path: callers check disk first)."""
    return bool(_HUB_ID.match(source)) and not source.startswith((".", "/", "~"))


def hub_cache_dir() -> Path:
    """Where huggingface_hub keeps downloaded repositories, read from the environment at each call."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"


def resolve_hub_id(source: str, *, allow_download: bool | None = None) -> Path:
    """The local path of the Hub model ``source`` (a snapshot directory, or a .gguf file in it).

    ``allow_download`` None: ``EFT_JAX_ALLOW_DOWNLOAD=1`` in the environment allows it. Raises
    ``CheckpointError`` saying where it looked when the model is not in the cache.
    """
    match = _HUB_ID.match(source)
    if match is None:
        raise CheckpointError(f"{source}: not a Hugging Face Hub id (org/name[@revision][:file])")
    repo, revision, file = match["repo"], match["revision"], match["file"]
    if allow_download is None:
        allow_download = os.environ.get(ALLOW_DOWNLOAD_ENV, "") not in ("", "0")
    cache = hub_cache_dir()
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(repo, revision=revision, cache_dir=str(cache),
                                          local_files_only=not allow_download))
    except LocalEntryNotFoundError:
        rev = f" at revision {revision!r}" if revision else ""
        raise CheckpointError(
            f"{source}: neither a local path nor a model in the Hugging Face cache (looked for {repo}{rev} in "
            f"{cache}; set HF_HUB_CACHE or HF_HOME if your cache is elsewhere). Download it first, e.g. "
            f"`huggingface-cli download {repo}`, or set {ALLOW_DOWNLOAD_ENV}=1 to let eft-jax download it"
        ) from None
    except Exception as e:  # huggingface_hub raises many types (bad revision, no network, gated repo...)
        raise CheckpointError(f"{source}: cannot resolve it in the Hugging Face cache {cache}: {e}") from None
    if file:
        path = snapshot / file
        if not path.exists():
            raise CheckpointError(f"{source}: the cached snapshot {snapshot} has no file {file!r}")
        return path
    if (snapshot / "config.json").is_file():
        return snapshot
    ggufs = sorted(p.name for p in snapshot.glob("*.gguf"))
    if len(ggufs) == 1:
        return snapshot / ggufs[0]
    if ggufs:
        raise CheckpointError(f"{source}: the snapshot {snapshot} holds several GGUF files {ggufs}; "
                              f"name one: {repo}{'@' + revision if revision else ''}:{ggufs[0]}")
    raise CheckpointError(f"{source}: the cached snapshot {snapshot} has no config.json and no .gguf file "
                          "(was the download interrupted? download it again)")

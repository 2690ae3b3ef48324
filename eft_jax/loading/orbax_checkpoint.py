"""Our own checkpoint format: orbax params + config.json + tokenizer files, restored into shardings.

Layout of a checkpoint directory::

    eft_jax_checkpoint.json   format marker, our LlamaConfig, dtype, quantize (when set), where it was converted from
    params/                   orbax checkpoint of the params pytree
    tokenizer/                tokenizer files (save_pretrained), if the model has a tokenizer
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from eft_jax.loading.source import CheckpointError
from eft_jax.models import llama
from eft_jax.models.config import LlamaConfig

MARKER = "eft_jax_checkpoint.json"
FORMAT_VERSION = 1


def is_orbax_checkpoint(path: Path) -> bool:
    return (path / MARKER).is_file()


def save_checkpoint(model: Any, dest: Path) -> None:
    """Write ``model`` (an ``eft_jax.Model``) to ``dest``, which must not exist yet."""
    dest = Path(dest).absolute()
    if dest.exists():
        raise FileExistsError(f"{dest} already exists; choose a new destination or delete it first")
    dest.mkdir(parents=True)
    import orbax.checkpoint as ocp  # here, not at the top: ~0.15 s of every process's start otherwise

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(dest / "params", model.params)
        ckptr.wait_until_finished()
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(dest / "tokenizer"))
    meta = {
        "format": "eft_jax", "version": FORMAT_VERSION, "config": model.config.to_dict(),
        "dtype": jnp.dtype(model.dtype).name, "converted_from": model.source,
        "end_token_ids": list(model.end_token_ids),
    }
    if model.quantize is not None:  # only when set: unquantized checkpoints keep their marker as before
        meta["quantize"] = model.quantize
    # The marker is written last: a directory without it is an interrupted conversion, not a checkpoint.
    (dest / MARKER).write_text(json.dumps(meta, indent=2))


def read_checkpoint_meta(path: Path) -> tuple[LlamaConfig, str]:
    meta = json.loads((path / MARKER).read_text())
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {meta.get('version')} is not {FORMAT_VERSION}")
    return LlamaConfig.from_dict(meta["config"]), meta["dtype"]


def read_end_token_ids(path: Path) -> tuple[int, ...]:
    """The end tokens the source checkpoint declared (none for a checkpoint written before they were kept)."""
    return tuple(int(t) for t in json.loads((path / MARKER).read_text()).get("end_token_ids", []))


def read_checkpoint_quantize(path: Path) -> str | None:
    """"int8" for a checkpoint written with ``eft-jax convert --quantize int8``, else None."""
    return json.loads((path / MARKER).read_text()).get("quantize")


def restore_params(path: Path, cfg: LlamaConfig, shardings: Any, dtype: Any, quantize: str | None = None
                   ) -> dict[str, Any]:
    """Params restored straight into ``shardings`` (each host reads only its own shards). Float leaves are
    restored in ``dtype``; a quantized checkpoint's int8 weights and float32 scales as they were saved."""
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        llama.abstract_params(cfg, dtype, quantize),  # int8 weights and float32 scales whatever ``dtype`` is
        shardings,
    )
    import orbax.checkpoint as ocp  # here, not at the top: ~0.15 s of every process's start otherwise

    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(Path(path).absolute() / "params", target)


def load_checkpoint_tokenizer(path: Path) -> Any:
    if not (path / "tokenizer").is_dir():
        return None
    from eft_jax.loading.hf_dir import load_hf_tokenizer

    return load_hf_tokenizer(path / "tokenizer")  # saved as the source had it: TokenizerJson or transformers

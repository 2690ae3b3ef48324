"""Lazy reading of (sharded) safetensors files through memory maps.

We parse the small JSON header ourselves and memory-map the data, so a tensor is read only when asked
for, bf16 comes out as ``ml_dtypes.bfloat16`` without torch, and a truncated file is caught up front
with a message naming it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from eft_jax.loading.source import CheckpointError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class _SafetensorsFile:
    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > size - 8:
                    raise ValueError(f"header length {header_len} exceeds file size {size}")
                header = json.loads(f.read(header_len))
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({e}); the file is truncated or corrupt - "
                "re-download or re-save it"
            ) from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: the safetensors header is not a JSON object; the file is corrupt")
        header.pop("__metadata__", None)
        self.data_start = 8 + header_len
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            self.entries[name] = self._entry(name, info, size)
        self._map: np.memmap | None = None

    def _entry(self, name: str, info: object, size: int) -> tuple[np.dtype, tuple[int, ...], int, int]:
        """One header entry, checked: a known dtype, data_offsets that match the shape and lie in the file."""
        path = self.path
        try:
            dtype_name, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{path}: tensor {name}: malformed header entry {info!r} (needs dtype, shape, data_offsets); "
                "the file is corrupt - re-download or re-save it"
            ) from None
        if dtype_name not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dtype_name}")
        dtype = np.dtype(_DTYPES[dtype_name])
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != expected:
            raise CheckpointError(
                f"{path}: tensor {name} has shape {list(shape)} and dtype {dtype_name} ({expected} bytes) but "
                f"its data_offsets span {end - begin} bytes; the file is corrupt - re-download or re-save it"
            )
        if self.data_start + end > size:
            raise CheckpointError(
                f"{path}: tensor {name} ends at byte {self.data_start + end} but the file has only "
                f"{size} bytes; the file is truncated - re-download or re-save it"
            )
        return dtype, shape, begin, end

    def read(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self.entries[name]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.data_start)
        return np.asarray(self._map[begin:end]).view(dtype).reshape(shape)


class SafetensorsSource:
    """A ``TensorSource`` over one or several safetensors files (a sharded checkpoint)."""

    def __init__(self, files: list[Path]):
        self._where: dict[str, _SafetensorsFile] = {}
        for path in files:
            st = _SafetensorsFile(path)
            for name in st.entries:
                if name in self._where:
                    raise CheckpointError(f"tensor {name} appears in both {self._where[name].path} and {path}")
                self._where[name] = st

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._where[name].entries[name][0]

    def read(self, name: str) -> np.ndarray:
        return self._where[name].read(name)

    def location(self, name: str) -> str:
        return str(self._where[name].path)

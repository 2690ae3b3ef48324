"""Device meshes and the mapping from logical array axes to mesh axes.

Every parameter and cache array carries logical axis names ("vocab", "embed", "heads", ...). A
``ShardingRules`` table maps those names onto the mesh's named axes; the same model code then runs
replicated, data-parallel or tensor-parallel by swapping the table. Typical EFT use: the large model
tensor-parallel over ``model``, the small ones replicated, the batch split over ``data``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA, MODEL = "data", "model"

LOGICAL_AXES = ("batch", "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "layers", "cache_seq", "seq",
                "positions")  # positions: the rows of a learned position table (GPT-2), replicated by every preset


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis name -> mesh axis name (or None: replicated along that dimension)."""

    rules: tuple[tuple[str, str | None], ...]

    def __post_init__(self) -> None:
        for logical, _ in self.rules:
            if logical not in LOGICAL_AXES:
                raise ValueError(f"unknown logical axis {logical!r} in sharding rules; known: {LOGICAL_AXES}")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, str | None]) -> ShardingRules:
        return cls(tuple(sorted(mapping.items())))

    def mesh_axis(self, logical: str) -> str | None:
        return dict(self.rules).get(logical)


# The large model: weights split over `model` along heads / kv heads / MLP / vocab (Megatron-style).
TENSOR_PARALLEL = ShardingRules.from_mapping(
    {"batch": DATA, "vocab": MODEL, "heads": MODEL, "kv_heads": MODEL, "mlp": MODEL}
)
# Small models: every device holds all weights; only the batch is split.
REPLICATED = ShardingRules.from_mapping({"batch": DATA})

# Training (FSDP): tensor-parallel as above, and the embed dimension of every weight also split over
# `data` (XLA gathers it where a matmul needs it).
FSDP = ShardingRules.from_mapping(
    {"batch": DATA, "embed": DATA, "vocab": MODEL, "heads": MODEL, "kv_heads": MODEL, "mlp": MODEL}
)

PRESETS = {"tensor_parallel": TENSOR_PARALLEL, "replicated": REPLICATED, "fsdp": FSDP}


def resolve_rules(rules: str | ShardingRules | Mapping[str, str | None]) -> ShardingRules:
    """A preset name ("tensor_parallel", "replicated"), a mapping, or rules as they are."""
    if isinstance(rules, ShardingRules):
        return rules
    if isinstance(rules, str):
        if rules not in PRESETS:
            raise ValueError(f"unknown sharding preset {rules!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[rules]
    return ShardingRules.from_mapping(rules)


def make_mesh(data: int = -1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 2-D ``(data, model)`` mesh. ``data=-1`` takes all devices not used by ``model``."""
    devices = list(devices if devices is not None else jax.devices())
    if model <= 0 or len(devices) % model:
        raise ValueError(f"mesh model={model} must divide the device count {len(devices)}")
    if data == -1:
        data = len(devices) // model
    if data * model != len(devices):
        raise ValueError(f"mesh data={data} x model={model} != {len(devices)} devices")
    grid = np.asarray(devices, dtype=object).reshape(data, model)
    return Mesh(grid, (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto))


def single_device_mesh() -> Mesh:
    return make_mesh(1, 1, jax.devices()[:1])


def logical_to_spec(
    axes: Sequence[str], shape: Sequence[int], rules: ShardingRules, mesh: Mesh
) -> PartitionSpec:
    """PartitionSpec for an array with logical ``axes``.

    A dimension whose size the mesh axis does not divide (e.g. 3 kv heads over 4 devices) stays
    replicated rather than failing; a mesh axis used twice in one array is an error.
    """
    spec: list[str | None] = []
    used: set[str] = set()
    for name, size in zip(axes, shape, strict=True):
        mesh_axis = rules.mesh_axis(name)
        if mesh_axis is not None and mesh_axis not in mesh.shape:
            raise ValueError(f"sharding rule maps {name!r} to {mesh_axis!r}, which is not a mesh axis {tuple(mesh.shape)}")
        if mesh_axis is not None and mesh_axis in used:
            raise ValueError(f"sharding rules map two axes of {tuple(axes)} onto mesh axis {mesh_axis!r}")
        if mesh_axis is None or size % mesh.shape[mesh_axis]:
            spec.append(None)
            continue
        used.add(mesh_axis)
        spec.append(mesh_axis)
    return PartitionSpec(*spec)


def tree_shardings(logical_axes: Any, abstract: Any, rules: ShardingRules, mesh: Mesh) -> Any:
    """NamedShardings for a pytree, given matching pytrees of logical axes and of shapes."""
    return jax.tree.map(
        lambda axes, a: NamedSharding(mesh, logical_to_spec(axes, a.shape, rules, mesh)),
        logical_axes,
        abstract,
        is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(n, str) for n in x),
    )


@dataclasses.dataclass(frozen=True)
class HostPlacement:
    """Puts host (numpy) arrays on a mesh: batch arrays split over the ``batch_axis`` (None: replicated),
    small ones (weights, a seed) on every device.

    Built from callbacks, so it works on multi-host meshes too (each process places only its own devices'
    slices of an array that is identical on every process), and compiles nothing (``jnp.asarray(x, dtype)``
    would compile a conversion program)."""

    mesh: Mesh
    batch_axis: str | None

    @property
    def data_size(self) -> int:
        """How many ways a batch is split (a batch size must be a multiple of it)."""
        return self.mesh.shape[self.batch_axis] if self.batch_axis else 1

    def rows(self, x: np.ndarray) -> jax.Array:
        """``x`` [batch, ...] split over the batch axis."""
        return self._put(x, PartitionSpec(self.batch_axis, *([None] * (x.ndim - 1))))

    def replicated(self, x: np.ndarray) -> jax.Array:
        return self._put(x, PartitionSpec())

    def _put(self, x: np.ndarray, spec: PartitionSpec) -> jax.Array:
        return jax.make_array_from_callback(x.shape, NamedSharding(self.mesh, spec), lambda index: x[index])

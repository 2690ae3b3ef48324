"""Processes in step: the host side of a multi-controller job whose mesh spans processes (``mesh.distributed``).

On such a mesh every process runs the same jitted programs, in the same order, with the same shapes; a
batch's rows are split over the mesh's data axis and each process places only the rows its own devices hold
(the rows it *owns*, :meth:`Peers.owned`). So each process can decode its own requests in its own rows: it
reads only its slice of the input (:attr:`Peers.group` of :attr:`Peers.groups`), places only its rows, reads
back only its rows (:meth:`Peers.local`, no collective) and writes only its results. What it must share are
the few host decisions that shape the next program - the cache size, which rows to refill and with what
prompt length, which attention window, whether anything is left to do - which every process makes alike
from facts gathered from all of them (:meth:`Peers.gather`, :meth:`Peers.ints`: a small allgather per
decode chunk).

Processes whose devices hold the same rows (a model axis that spans processes) form one *group*: they read
the same slice and place the same rows; the first of them writes its group's output (:attr:`Peers.writer`).
On one process (or a mesh inside one process) everything here is the identity: one group, every row owned,
no collective.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from typing import TypeVar

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from eft_jax.sharding import HostPlacement

T = TypeVar("T")


class Peers:
    """The processes sharing a placement's mesh, and how this one agrees with them; see the module docstring."""

    def __init__(self, place: HostPlacement):
        self.place = place
        devices = place.mesh.devices.reshape(-1)
        processes = sorted({d.process_index for d in devices})
        self.active = len(processes) > 1
        me = jax.process_index()
        # The data-axis positions each process's devices hold (all of them when the batch is not split).
        sharding = NamedSharding(place.mesh, PartitionSpec(place.batch_axis))
        held: dict[int, set[int]] = {p: set() for p in processes}
        for device, index in sharding.devices_indices_map((place.data_size,)).items():
            held[device.process_index].update(range(place.data_size)[index[0]])
        groups = sorted({frozenset(s) for s in held.values()}, key=min)
        if sum(len(g) for g in groups) != place.data_size:
            raise ValueError(f"mesh {dict(place.mesh.shape)}: processes hold overlapping but different parts of the "
                             f"data axis ({ {p: sorted(s) for p, s in held.items()} }); lay the mesh out so that each "
                             "process's devices hold whole data-axis positions that no other group shares")
        self.groups = len(groups)
        self.group = groups.index(frozenset(held[me])) if me in held else 0
        self._positions = np.array(sorted(groups[self.group]))
        members = [p for p in processes if frozenset(held[p]) == groups[self.group]]
        self.writer = not members or me == members[0]
        self._representatives = [min(p for p in processes if frozenset(held[p]) == g) for g in groups]

    def owned(self, rows: int) -> np.ndarray:
        """Which of a batch's ``rows`` (split over the data axis) this process places: bool [rows]."""
        per = rows // self.place.data_size
        mask = np.zeros(rows, bool)
        for position in self._positions:
            mask[position * per: (position + 1) * per] = True
        return mask

    def gather(self, value: T) -> list[T]:
        """``value`` (any picklable object) from every group, in group order; ``[value]`` on one process."""
        if not self.active:
            return [value]
        data = np.frombuffer(pickle.dumps(value), np.uint8)
        sizes = self._allgather(np.array([data.size], np.int64))[:, 0]
        padded = np.zeros(int(sizes.max()), np.uint8)
        padded[: data.size] = data
        every = self._allgather(padded)
        return [pickle.loads(every[p, : sizes[p]].tobytes()) for p in self._representatives]

    def ints(self, values: Sequence[int]) -> np.ndarray:
        """Integers from every group: int64 [groups, len(values)] (one allgather; none on one process)."""
        mine = np.asarray(values, np.int64).reshape(1, -1)
        return self._allgather(mine[0])[self._representatives] if self.active else mine

    def agree(self, check: Callable[[], T], error: type[Exception]) -> T:
        """``check()`` here; if it raised ``error`` on any process, raise it on every process (the first
        group's message), so that no process goes on alone into a collective the others never join."""
        try:
            result, problem = check(), None
        except error as e:
            result, problem = None, str(e)
        problems = [p for p in self.gather(problem) if p is not None]
        if problems:
            raise error(problems[0] if problem is None else problem)
        return result  # type: ignore[return-value]

    def local(self, x: jax.Array) -> np.ndarray:
        """A host copy of ``x`` holding what this process's devices hold (the rows it owns; replicated arrays
        whole); the other entries are zero. No collective."""
        if x.is_fully_addressable:
            return np.asarray(x)
        out = np.zeros(x.shape, x.dtype)
        for shard in x.addressable_shards:
            out[shard.index] = np.asarray(shard.data)
        return out

    @staticmethod
    def _allgather(x: np.ndarray) -> np.ndarray:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=False))

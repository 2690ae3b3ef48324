"""Continuous batching: a fixed number of slots, refilled with new prompts as their rows finish.

The host side of decoding. ``SlotLoop.run`` keeps ``batch_size`` rows (slots) on the devices and, between
jitted chunks of decode steps (or speculative rounds):

1. reads which rows are done (the one host sync per chunk) and hands their outputs back;
2. refills the free slots with the next prompts: one jitted ``refill`` prefills only those rows, for every
   model with its own prompt and cache, and puts them in place of the finished ones (the other rows'
   caches and outputs are untouched), so the batch stays full until the input runs out;
3. runs the next chunk, whose attention reads only the filled part of each cache: the slots up to the
   longest live row plus what the chunk writes, rounded up to a power of two (``decode.window_caches``).

``continuous=False`` refills only when every row is done: static batching, for comparison. A sample
depends only on (seed, stream, its own output index), never on the slot, the neighbours or when its row
started, so both give the same samples as batch size 1.

Shapes are fixed per call so that few programs compile: the caches hold the longest prompt (rows are
sorted longest first, so the first fill sets it) plus the longest ``max_new_tokens`` rounded up to whole
chunks; a refill prefills a fixed number of rows (a quarter of the batch, or the whole batch when more
than half is free; padding rows write nothing), with prompts left-padded to a power-of-two length; a
batch that is entirely free starts over with the ``start`` program. A call therefore compiles a start
program, a chunk program per attention window (see 3.) and up to two refill programs per prompt bucket.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from eft_jax import decode, speculative
from eft_jax.prompts import bucket_length, left_pad
from eft_jax.sampling import RowValues, SamplingParams

if TYPE_CHECKING:
    from eft_jax.engine import Engine


@dataclasses.dataclass(frozen=True)
class Row:
    """One prompt to sample: the caller's ``index``, each distinct model's prompt tokens, its limit and stream;
    its sampling settings (traced per row where ``plan.features`` says so), reward weights (None: the run's)
    and stop strings."""

    index: int
    tokens: Sequence[list[int]]
    max_new: int
    stream: int
    sampling: SamplingParams = SamplingParams()
    weights: tuple[float, ...] | None = None
    stop: tuple[str, ...] = ()


@dataclasses.dataclass
class RowOutput:
    """What a finished row produced (host arrays cut to its ``num_tokens``)."""

    tokens: np.ndarray
    logprobs: np.ndarray
    components: np.ndarray | None = None  # [rule members, tokens]
    distributions: np.ndarray | None = None  # [tokens, vocab]
    speculative: dict[str, Any] | None = None  # rounds, drafted, accepted, rejected, round_of, from_draft
    stop_string: str | None = None  # the stop string that ended the row (its tokens end where it completes)


# Given a live row's tokens so far, how many of them were already checked and the row's stop strings, the
# number of tokens to keep and the stop string found (the row then ends there), or None.
StopCheck = Callable[[np.ndarray, int, tuple[str, ...]], "tuple[int, str] | None"]


class SlotLoop:
    """Decode ``rows`` (sorted longest prompt first) in ``batch_size`` slots; see the module docstring."""

    def __init__(self, engine: Engine, plan: decode.Plan, rows: Sequence[Row], batch_size: int, weights: Any,
                 seed: int, continuous: bool = True, stop_check: StopCheck | None = None):
        self.engine, self.plan, self.weights, self.continuous = engine, plan, weights, continuous
        self.stop_check = stop_check
        self.k = engine.speculative_k
        # No slot for a row that does not exist: a small call runs a small batch.
        self.num_slots = min(batch_size, _round_up(len(rows), engine.place.data_size))
        self.queue = collections.deque(rows)
        self.out_len = 1 + plan.chunk * math.ceil((max(r.max_new for r in rows) - 1) / plan.chunk)
        extra = self.k + 1 if self.k else 0  # a speculative round writes k + 1 entries before rewinding
        self.prompt_len = [bucket_length(max(len(r.tokens[m]) for r in rows)) for m in range(len(engine.runs))]
        self.cache_slots = [length + self.out_len + extra for length in self.prompt_len]
        self.params = tuple(c.model.run_params for c in engine.runs)  # the fastest layout here (Model.run_params)
        self.seed = engine.place.replicated(np.asarray(seed, np.int32))
        self.occupant: list[Row | None] = [None] * self.num_slots
        self.lengths = [np.zeros(self.num_slots, np.int64) for _ in engine.runs]  # cache length per model and slot
        # Rows per refill program: a quarter of the batch (a multiple of the data axis). Fewer would
        # compile more programs or call refill more often; more would prefill padding rows each time.
        self.refill_rows = min(self.num_slots, _round_up(math.ceil(self.num_slots / 4), engine.place.data_size))

    def run(self) -> Iterator[tuple[list[tuple[Row, RowOutput]], int]]:
        """After each chunk (and the first prefill), yield the rows that finished with their outputs, and
        the tokens decoded since the last yield over every row; until every row is done."""
        state = self._start()
        counted = np.zeros(self.num_slots, np.int64)  # each slot's tokens already reported
        checked = np.zeros(self.num_slots, np.int64)  # each slot's tokens already searched for stop strings
        while True:
            st = self._decode_state(state)
            done, num_tokens = to_host(st.done), to_host(st.num_tokens)
            self.lengths = [np.array(to_host(c.length)) for c in st.caches]
            live = np.array([row is not None for row in self.occupant])
            tokens = int(np.sum(np.where(live, num_tokens - counted, 0)))
            counted = np.where(live, num_tokens, 0)
            stops = self._stop_strings(state, live, num_tokens, checked) if self.stop_check else {}
            finished = [s for s, row in enumerate(self.occupant) if row is not None and (done[s] or s in stops)]
            yield (self._outputs(state, finished, stops) if finished else []), tokens
            for s in finished:
                self.occupant[s] = None
                counted[s] = checked[s] = 0
            free = [s for s, row in enumerate(self.occupant) if row is None]
            if self.queue and len(free) == self.num_slots:
                state = self._start()  # a whole new batch: the start program, no refill needed
            elif self.queue and free and self.continuous:
                state = self._refill(state, free)
            if all(row is None for row in self.occupant):
                return
            state = self._chunk(state)

    # --- the jitted programs ---------------------------------------------------------------------------

    def _start(self) -> Any:
        rows = self._take(range(self.num_slots))
        # Prompts padded to the longest of the call: one start program, however often a batch starts over.
        new = self._new_rows(rows, self.num_slots, self.prompt_len)
        self._record_lengths(range(self.num_slots), new)
        return (speculative.start if self.k else decode.start)(self.plan, self.params, new, self.weights, self.seed)

    def _refill(self, state: Any, free: list[int]) -> Any:
        """Refill ``free`` slots, ``refill_rows`` at a time (or all at once when more than half of the
        batch is free): at most two refill programs per prompt-length bucket, whatever the number of
        free slots; padding rows prefill a repeated prompt and write nothing."""
        refill = speculative.refill if self.k else decode.refill
        free = free[: len(self.queue)]
        # Many free slots at once (short answers finishing together): one call for the whole batch rather
        # than several quarter-batch calls (a second refill program, compiled only if ever needed).
        size = self.num_slots if len(free) > 2 * self.refill_rows else self.refill_rows
        for i in range(0, len(free), size):
            group = free[i: i + size]
            rows = self._take(group)
            slots = np.array(group + [self.num_slots] * (size - len(group)), np.int32)  # out of range: dropped
            new = self._new_rows(rows + [None] * (size - len(group)), size)
            self._record_lengths(group, new)
            state = refill(self.plan, self.params, new, self.weights, self.seed, self.engine.place.rows(slots), state)
        return state

    def _record_lengths(self, slots: Sequence[int], new: decode.NewRows) -> None:
        """A (re)filled row's cache length: its left-padded prompt."""
        for m, tokens in enumerate(new.tokens):
            self.lengths[m][list(slots)] = tokens.shape[1]

    def _chunk(self, state: Any) -> Any:
        plan, params, weights = self.plan, self.params, self.weights
        if not self.k:
            return decode.decode_chunk(plan, params, weights, self.seed, state, self._windows(plan.chunk))
        rounds = max(1, plan.chunk // (self.k + 1))
        drafter = self.engine.sources[self.engine.drafter_index]
        # A round writes at most k + 1 cache slots past a row's length before rolling back.
        return speculative.spec_chunk(plan, self.k, drafter, rounds, params, weights, self.seed, state,
                                      self._windows(rounds * (self.k + 1)))

    def _windows(self, writes: int) -> tuple[int, ...] | None:
        """The cache slots each model's attention reads this chunk: the longest live row plus what the
        chunk writes, rounded up to a power of two (few programs); None when that is the whole cache."""
        live = [s for s, row in enumerate(self.occupant) if row is not None]
        windows = tuple(min(size, bucket_length(int(lengths[live].max()) + writes))
                        for lengths, size in zip(self.lengths, self.cache_slots, strict=True))
        # A window is its own program: worth it only where it skips at least half of a cache.
        if all(2 * w > size for w, size in zip(windows, self.cache_slots, strict=True)):
            return None
        return windows

    # --- host-side helpers ------------------------------------------------------------------------------

    def _take(self, slots: Sequence[int]) -> list[Row | None]:
        """The next rows from the queue into ``slots`` (None where the queue ran out)."""
        rows: list[Row | None] = []
        for s in slots:
            row = self.queue.popleft() if self.queue else None
            self.occupant[s] = row
            rows.append(row)
        return rows

    def _new_rows(self, rows: list[Row | None], size: int, prompt_len: Sequence[int] | None = None) -> decode.NewRows:
        """What ``start`` / ``refill`` start, for ``size`` rows; a missing row repeats a real prompt with
        ``max_new = 0`` (done at once, writes nothing). Prompts are left-padded to ``prompt_len[m]``, or
        else to a power of two."""
        real = [r for r in rows if r is not None]
        filler = real[0]
        padded = [r if r is not None else filler for r in rows]
        tokens, positions, layouts = [], [], []
        for m, model_run in enumerate(self.engine.runs):
            seqs = [r.tokens[m] for r in padded]
            length = prompt_len[m] if prompt_len else bucket_length(max(len(x) for x in seqs))
            t, p = left_pad(seqs, length, self.engine.pad_id)
            tokens.append(self.engine.place.rows(t))
            positions.append(self.engine.place.rows(p))
            layouts.append(model_run.model.cache_layout(size, self.cache_slots[m]))
        place = self.engine.place.rows
        stream = place(np.array([r.stream for r in padded], np.int32))
        max_new = place(np.array([r.max_new if r is not None else 0 for r in rows], np.int32))
        values = RowValues(**{k: place(v) for k, v in RowValues.host([r.sampling for r in padded],
                                                                       self.plan.features).items()})
        weights = None
        if self.plan.features.row_weights:
            default = tuple(np.asarray(self.weights).tolist())
            weights = place(np.array([r.weights if r.weights is not None else default for r in padded], np.float32))
        return decode.NewRows(tuple(tokens), tuple(positions), stream, max_new, tuple(layouts), self.out_len,
                              values, weights)

    def _decode_state(self, state: Any) -> decode.DecodeState:
        return state.decode if self.k else state

    def _stop_strings(self, state: Any, live: np.ndarray, num_tokens: np.ndarray,
                      checked: np.ndarray) -> dict[int, tuple[int, str]]:
        """Live rows whose new tokens complete a stop string: slot -> (tokens to keep, the string). Updates
        ``checked``. A row the device also finished in this chunk is cut too, where the string came first."""
        tokens = to_host(self._decode_state(state).tokens)
        found = {}
        for s in np.flatnonzero(live & (num_tokens > checked)):
            stop = self.occupant[s].stop
            hit = self.stop_check(tokens[s, : num_tokens[s]], int(checked[s]), stop) if stop else None
            checked[s] = num_tokens[s]
            if hit is not None:
                found[int(s)] = hit
        return found

    def _outputs(self, state: Any, slots: list[int],
                 stops: dict[int, tuple[int, str]] | None = None) -> list[tuple[Row, RowOutput]]:
        stops = stops or {}
        st = self._decode_state(state)
        tokens, logprobs, counts = (to_host(x) for x in (st.tokens, st.logprobs, st.num_tokens))
        comps = to_host(st.components) if self.plan.record_components else None
        dists = to_host(st.distributions) if self.plan.record_distributions else None
        spec = ({name: to_host(getattr(state, name)) for name in
                 ("rounds", "drafted", "accepted", "rejected", "round_of", "from_draft")} if self.k else None)
        out = []
        for s in slots:
            n, stop = (int(counts[s]), None) if s not in stops else stops[s]
            out.append((self.occupant[s], RowOutput(
                tokens=tokens[s, :n], logprobs=logprobs[s, :n],
                components=None if comps is None else comps[:, s, :n],
                distributions=None if dists is None else dists[s, :n],
                speculative=None if spec is None else _speculative_stats(spec, s, n, self.k, cut=stop is not None),
                stop_string=stop,
            )))
        return out


def _speculative_stats(spec: dict[str, np.ndarray], slot: int, n: int, k: int, cut: bool) -> dict[str, Any]:
    """One row's speculative accounting over its first ``n`` emitted tokens. A row cut short by a stop
    string recounts its rounds from the tokens it keeps: a round counts as rejected when its
    non-draft token was kept after fewer than ``k`` accepted drafts."""
    out = {name: v[slot, :n] if v.ndim == 2 else v[slot] for name, v in spec.items()}
    if cut:
        round_of, from_draft = out["round_of"], out["from_draft"]
        rounds = int(round_of[-1]) if n else 0
        closing = [r for r in range(1, rounds + 1) if np.any((round_of == r) & ~from_draft)]
        out.update(rounds=rounds, drafted=rounds * k, accepted=int(np.sum(from_draft)),
                   rejected=sum(int(np.sum((round_of == r) & from_draft)) < k for r in closing))
    return out


def _round_up(n: int, multiple: int) -> int:
    return math.ceil(n / multiple) * multiple


def to_host(x: Any) -> np.ndarray:
    """The whole array on this host (gathered from the other processes on a multi-host mesh)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

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

On a mesh that spans processes (``mesh.distributed``) each process runs its own rows (``lockstep.Peers``):
the slots its devices hold, filled from its own requests; the decisions that shape a program (the cache
size, when to start over or refill and with what prompt length, the attention window, when to stop) are
made alike on every process from a few integers gathered from all of them after each chunk.

Longrope models (Phi-3.5, Phi-4-mini): transformers re-encodes the whole sequence with the long factors when
a generation first feeds a position at or past ``original_max_position_embeddings`` on a cache built with the
short ones. A row does the same here: the outputs sampled from that step on are dropped after the chunk, and
the row restarts at that output index - its prompt followed by the outputs kept, prefilled (long factors: it
now spans the original context) through the same refill - continuing its random stream where it was (a sample
depends on its output index only); its outputs are put back together when it finishes (``Row.first``).
Speculative decoding of such rows is refused.

Shapes are fixed per call so that few programs compile: the caches hold the longest prompt (rows are
sorted longest first, so the first fill sets it) plus the longest ``max_new_tokens`` rounded up to whole
chunks; a refill prefills a fixed number of rows (a quarter of the batch, or the whole batch when more
than half is free; padding rows write nothing), with prompts left-padded to a bucket length (16, 24, 32,
48, ...: ``prompts.prompt_bucket``); a batch that is entirely free starts over with the ``start`` program.
A call therefore compiles a start program, a chunk program per attention window (see 3.) and up to two
refill programs per prompt bucket.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from eft_jax import decode, speculative
from eft_jax.prompts import bucket_length, left_pad, prompt_bucket
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
    first: int = 0  # a restarted row: its prompts end with its first `first` outputs, sampled already


@dataclasses.dataclass
class RowOutput:
    """What a finished row produced (host arrays cut to its ``num_tokens``)."""

    tokens: np.ndarray
    logprobs: np.ndarray
    components: np.ndarray | None = None  # [rule members, tokens]
    distributions: np.ndarray | None = None  # [tokens, vocab]
    top_ids: np.ndarray | None = None  # [tokens, K] the K most likely ids per step (plan.top_logprobs)
    top_logprobs: np.ndarray | None = None  # [tokens, K] their EFT log-probs
    top_components: np.ndarray | None = None  # [rule members, tokens, K] their log-probs under each member
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
        self.peers = peers = engine.peers
        models = len(engine.runs)
        self.original = [_longrope_original(c.model.config) for c in engine.runs]
        # The geometry every process shares: from the most rows, the longest answer and prompts of any, and
        # whether a row may restart (then a cache holds a restarted row's longer prompt: prompt + answer).
        facts = peers.ints([len(rows), max((r.max_new for r in rows), default=1),
                            any(self._crossing(r) is not None for r in rows),
                            *(max((len(r.tokens[m]) for r in rows), default=1) for m in range(models)),
                            *(max((len(r.tokens[m]) + r.max_new for r in rows), default=1) for m in range(models))
                            ]).max(0)
        self.restarts = bool(facts[2])
        if self.restarts and self.k:
            raise ValueError("speculative decoding of a generation that crosses a longrope model's original context "
                             f"(original_max_position_embeddings={min(o for o in self.original if o)}) is not "
                             "supported: lower max_new_tokens or run without speculative decoding")
        self.prefix: dict[int, RowOutput] = {}  # a restarted row's outputs before its restart, by Row.index
        # No slot for a row that does not exist: a small call runs a small batch.
        self.num_slots = min(batch_size, _round_up(int(facts[0]) * peers.groups, engine.place.data_size))
        self.owned = peers.owned(self.num_slots)  # the slots this process fills and reads
        self.queue = collections.deque(rows)
        self.blank = Row(-1, [[engine.pad_id]] * models, 0, 0)  # fills the rows of a process with none left
        self.out_len = 1 + plan.chunk * math.ceil((int(facts[1]) - 1) / plan.chunk)
        extra = self.k + 1 if self.k else 0  # a speculative round writes k + 1 entries before rewinding
        self.prompt_len = [prompt_bucket(int(n)) for n in facts[3: 3 + models]]
        longest = [prompt_bucket(int(n)) if self.restarts else 0 for n in facts[3 + models:]]
        self.cache_slots = [max(length, most) + self.out_len + extra for length, most in zip(self.prompt_len, longest,
                                                                                              strict=True)]
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
        local = self.peers.local
        state = self._start()
        counted = np.zeros(self.num_slots, np.int64)  # each slot's tokens already reported
        checked = np.zeros(self.num_slots, np.int64)  # each slot's tokens already searched for stop strings
        while True:
            st = self._decode_state(state)
            done, num_tokens = local(st.done), local(st.num_tokens)
            self.lengths = [np.array(local(c.length)) for c in st.caches]
            live = np.array([row is not None for row in self.occupant])
            firsts = np.array([row.first if row is not None else 0 for row in self.occupant])
            tokens = int(np.sum(np.where(live, num_tokens - np.maximum(counted, firsts), 0)))
            counted = np.where(live, num_tokens, 0)
            stops = self._stop_strings(state, live, num_tokens, checked) if self.stop_check else {}
            if self.restarts:
                for s in self._restart(state, num_tokens, stops):
                    counted[s] = checked[s] = 0
            finished = [s for s, row in enumerate(self.occupant) if row is not None and (done[s] or s in stops)]
            yield (self._outputs(state, finished, stops) if finished else []), tokens
            for s in finished:
                self.occupant[s] = None
                counted[s] = checked[s] = 0
            free = [s for s in np.flatnonzero(self.owned) if self.occupant[s] is None]
            every = self.peers.ints([len(self.queue), len(free), sum(row is not None for row in self.occupant)])
            waiting, busy = every[:, 0].sum() > 0, every[:, 2].sum() > 0
            if waiting and not busy:
                state = self._start()  # a whole new batch: the start program, no refill needed
            elif waiting and self.continuous and np.minimum(every[:, 0], every[:, 1]).sum() > 0:
                state = self._refill(state, free, np.minimum(every[:, 0], every[:, 1]))
            live = [s for s, row in enumerate(self.occupant) if row is not None]
            longest = self.peers.ints([len(live), *(int(lengths[live].max(initial=0)) for lengths in self.lengths)])
            if longest[:, 0].sum() == 0:
                return
            state = self._chunk(state, longest[:, 1:].max(0))

    # --- the jitted programs ---------------------------------------------------------------------------

    def _start(self) -> Any:
        rows: list[Row | None] = [None] * self.num_slots
        for s, row in zip(np.flatnonzero(self.owned), self._take(np.flatnonzero(self.owned)), strict=True):
            rows[s] = row
        # Prompts padded to the longest of the call: one start program, however often a batch starts over.
        new = self._new_rows(rows, self.num_slots, self.prompt_len)
        self._record_lengths(range(self.num_slots), new)
        return (speculative.start if self.k else decode.start)(self.plan, self.params, new, self.weights, self.seed)

    def _refill(self, state: Any, free: list[int], usable: np.ndarray) -> Any:
        """Refill free slots, ``refill_rows`` at a time (or all at once when more than half of the batch is
        free): at most two refill programs per prompt-length bucket, whatever the number of free slots;
        padding rows prefill a repeated prompt and write nothing. ``usable[g]``: the slots group ``g`` fills
        (its free slots it has rows for); this process fills its own, in the positions of a refill's rows
        that it owns."""
        refill = speculative.refill if self.k else decode.refill
        # Many free slots at once (short answers finishing together): one call for the whole batch rather
        # than several quarter-batch calls (a second refill program, compiled only if ever needed).
        size = self.num_slots if usable.sum() > 2 * self.refill_rows else self.refill_rows
        positions = np.flatnonzero(self.peers.owned(size))
        mine = free[: usable[self.peers.group]]
        for i in range(0, int(usable.max()), len(positions)):
            group = mine[i: i + len(positions)]
            rows: list[Row | None] = [None] * size
            slots = np.full(size, self.num_slots, np.int32)  # out of range: dropped
            for position, slot, row in zip(positions, group, self._take(group), strict=False):
                rows[position], slots[position] = row, slot
            new = self._new_rows(rows, size)
            self._record_lengths(group, new)
            state = refill(self.plan, self.params, new, self.weights, self.seed, self.engine.place.rows(slots), state)
        return state

    def _crossing(self, row: Row) -> int | None:
        """The output index at which ``row`` must restart (see the module docstring), or None: the first
        output sampled after a longrope model fed position ``original`` on a cache its short factors built."""
        at = [original - len(row.tokens[m]) + row.first + 1 for m, original in enumerate(self.original)
              if original is not None and len(row.tokens[m]) <= original]
        j = min(at, default=row.max_new)
        return j if j < row.max_new else None

    def _restart(self, state: Any, num_tokens: np.ndarray, stops: dict[int, tuple[int, str]]) -> list[int]:
        """Rows that sampled past their crossing (and did not stop before it): their outputs up to it kept
        (``prefix``), their slots freed, and each queued first again, restarting there. Returns the slots."""
        cut = {}
        for s, row in enumerate(self.occupant):
            j = None if row is None else self._crossing(row)
            if j is not None and num_tokens[s] > j and not (s in stops and stops[s][0] <= j):
                stops.pop(s, None)  # a stop string found past the crossing was sampled from the wrong cache
                cut[s] = (j, None)
        for s, (row, kept) in zip(cut, self._outputs(state, list(cut), cut) if cut else [], strict=True):
            self.prefix[row.index] = kept
            prefix = kept.tokens[row.first:].tolist()
            self.queue.appendleft(dataclasses.replace(row, tokens=[list(t) + prefix for t in row.tokens],
                                                      first=cut[s][0]))
            self.occupant[s] = None
        return list(cut)

    def _record_lengths(self, slots: Sequence[int], new: decode.NewRows) -> None:
        """A (re)filled row's cache length: its left-padded prompt."""
        for m, tokens in enumerate(new.tokens):
            self.lengths[m][list(slots)] = tokens.shape[1]

    def _chunk(self, state: Any, longest: np.ndarray) -> Any:
        """The next chunk; ``longest[m]``: model m's longest live cache (over every process)."""
        plan, params, weights = self.plan, self.params, self.weights
        if not self.k:
            return decode.decode_chunk(plan, params, weights, self.seed, state, self._windows(plan.chunk, longest))
        rounds = max(1, plan.chunk // (self.k + 1))
        drafter = self.engine.sources[self.engine.drafter_index]
        # A round writes at most k + 1 cache slots past a row's length before rolling back.
        return speculative.spec_chunk(plan, self.k, drafter, rounds, params, weights, self.seed, state,
                                      self._windows(rounds * (self.k + 1), longest))

    def _windows(self, writes: int, longest: np.ndarray) -> tuple[int, ...] | None:
        """The cache slots each model's attention reads this chunk: the longest live row plus what the
        chunk writes, rounded up to a power of two (few programs); None when that is the whole cache."""
        windows = tuple(min(size, bucket_length(int(length) + writes))
                        for length, size in zip(longest, self.cache_slots, strict=True))
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
        else to their bucket (``prompts.prompt_bucket``)."""
        real = [r for r in rows if r is not None]
        filler = real[0] if real else self.blank
        padded = [r if r is not None else filler for r in rows]
        # Prompts padded alike on every process: to the longest of the call's rows on any of them, and for the
        # start program at least to ``prompt_len`` (only a restarted row is longer).
        longest = self.peers.ints([max(len(r.tokens[m]) for r in padded) for m in range(len(self.engine.runs))]).max(0)
        tokens, positions, layouts = [], [], []
        for m, model_run in enumerate(self.engine.runs):
            seqs = [r.tokens[m] for r in padded]
            length = max(prompt_len[m] if prompt_len else 0, prompt_bucket(int(longest[m])))
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
        first = place(np.array([r.first for r in padded], np.int32)) if self.restarts else None
        return decode.NewRows(tuple(tokens), tuple(positions), stream, max_new, tuple(layouts), self.out_len,
                              values, weights, first)

    def _decode_state(self, state: Any) -> decode.DecodeState:
        return state.decode if self.k else state

    def _stop_strings(self, state: Any, live: np.ndarray, num_tokens: np.ndarray,
                      checked: np.ndarray) -> dict[int, tuple[int, str]]:
        """Live rows whose new tokens complete a stop string: slot -> (tokens to keep, the string). Updates
        ``checked``. A row the device also finished in this chunk is cut too, where the string came first."""
        tokens = self.peers.local(self._decode_state(state).tokens)
        found = {}
        for s in np.flatnonzero(live & (num_tokens > checked)):
            row = self.occupant[s]
            stop = row.stop
            row_tokens = tokens[s, : num_tokens[s]]
            if row.first:  # a restarted row: its outputs before the restart are on the host
                row_tokens = np.concatenate([self.prefix[row.index].tokens, row_tokens[row.first:]])
            hit = self.stop_check(row_tokens, int(checked[s]), stop) if stop else None
            checked[s] = num_tokens[s]
            if hit is not None:
                found[int(s)] = hit
        return found

    def _outputs(self, state: Any, slots: list[int],
                 stops: dict[int, tuple[int, str]] | None = None) -> list[tuple[Row, RowOutput]]:
        stops = stops or {}
        local = self.peers.local  # this process's rows: no collective (other processes may have none)
        st = self._decode_state(state)
        tokens, logprobs, counts = (local(x) for x in (st.tokens, st.logprobs, st.num_tokens))
        comps = local(st.components) if self.plan.record_components else None
        dists = local(st.distributions) if self.plan.record_distributions else None
        top = ((local(st.top_ids), local(st.top_logprobs), local(st.top_components))
               if self.plan.top_logprobs else None)
        spec = ({name: local(getattr(state, name)) for name in
                 ("rounds", "drafted", "accepted", "rejected", "round_of", "from_draft")} if self.k else None)
        out = []
        for s in slots:
            n, stop = (int(counts[s]), None) if s not in stops else stops[s]
            row = self.occupant[s]
            output = RowOutput(
                tokens=tokens[s, :n], logprobs=logprobs[s, :n],
                components=None if comps is None else comps[:, s, :n],
                distributions=None if dists is None else dists[s, :n],
                top_ids=None if top is None else top[0][s, :n], top_logprobs=None if top is None else top[1][s, :n],
                top_components=None if top is None else top[2][:, s, :n],
                speculative=None if spec is None else _speculative_stats(spec, s, n, self.k, cut=stop is not None),
                stop_string=stop,
            )
            out.append((row, _after(self.prefix[row.index], output, row.first) if row.first else output))
        return out


def _after(prefix: RowOutput, output: RowOutput, first: int) -> RowOutput:
    """A restarted row's whole output: ``prefix`` (its first ``first`` outputs) then ``output`` from ``first`` on
    (the device holds nothing before it). Per-token arrays have the token axis last but for distributions'."""
    def join(a: np.ndarray | None, b: np.ndarray | None, axis: int) -> np.ndarray | None:
        return None if a is None else np.concatenate([a, np.take(b, range(first, b.shape[axis]), axis=axis)], axis)

    return dataclasses.replace(
        output, tokens=join(prefix.tokens, output.tokens, 0), logprobs=join(prefix.logprobs, output.logprobs, 0),
        components=join(prefix.components, output.components, 1),
        distributions=join(prefix.distributions, output.distributions, 0),
        top_ids=join(prefix.top_ids, output.top_ids, 0), top_logprobs=join(prefix.top_logprobs, output.top_logprobs, 0),
        top_components=join(prefix.top_components, output.top_components, 1))


def _longrope_original(config: Any) -> int | None:
    """A longrope model's original context (``original_max_position_embeddings``), else None."""
    scaling = config.rope_scaling
    return scaling.original_max_position_embeddings if scaling is not None and scaling.kind == "longrope" else None


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


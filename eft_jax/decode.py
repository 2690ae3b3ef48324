"""The jitted core of EFT decoding: prefill, chunks of decode steps, and scoring.

One step, for every model of the spec: feed the last sampled token at that model's own position,
get next-token logits, then combine (``eft.eft_logprobs``, with each row's reward weights), apply each row's
sampling settings (``sampling_distribution``: logit_bias, min_tokens, penalties, then the filters, static or
per row as ``Plan.features`` says) and sample once for all. Each row's settings live in the state
(``DecodeState.values``, set by ``start`` / ``refill`` from ``NewRows``), so continuous batching mixes them. Plain decoding is the one-model case of the same code.

Everything here is a pure function of a static ``Plan`` (shapes, configs, sampling settings) and
pytrees of arrays (params, caches, ``DecodeState``). The host loop lives in ``batching.py``: it calls
``start`` (empty caches + prefill + token 0, one program: the caches are created inside it, not by a
separately compiled constructor), then ``decode_chunk`` (``chunk`` steps in one loop, no host round trip
inside) until every row is done, checking between chunks, and ``refill`` to put new prompts in finished
rows. ``emit`` is the one place where output tokens are written and rows stop (plain and speculative). Nothing else is compiled on the way: the host loop computes no array eagerly.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from eft_jax import programs
from eft_jax.eft import eft_logprobs, gather_logprobs
from eft_jax.models import llama
from eft_jax.models.config import LlamaConfig
from eft_jax.models.kv_cache import CacheLayout, KVCache
from eft_jax.sampling import (
    Features, RowValues, SamplingParams, filter_rows, final_logprobs, process_rows, row_keys, safe_log_softmax, sample,
)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static description of one compiled decode program (hashable; a jit static argument).

    configs: the distinct models to run (a model used twice with the same prompt is run once).
    sources: for each member of the EFT rule (base, ref, fine-tunes, in that order), its index in
      ``configs``; empty means "the first rule_size configs, in order". vocab: the common vocabulary size.
    record_components: also return each model's log-prob of every sampled token.
    record_distributions: also return every step's EFT distribution (analysis/tests only: [B, T, vocab] float32
      on device and copied to the host, 10 GB for 32 rows x 512 tokens of a 152k vocabulary).
    top_logprobs: K > 0 also records, per step, the K most likely ids of the reported EFT distribution (the one
      ``logprobs`` holds: temperature 1, before logit_bias, penalties and filters), computed on device
      (``top_logprobs``): their ids [B, T, K], EFT log-probs [B, T, K] and each rule member's log-probs of those
      ids [members, B, T, K]. Order: descending log-prob, lower id first among equal values (a stable
      descending argsort's).
    stop_early: end a chunk as soon as every row is done (``while_loop``) instead of running all its
      steps (``scan``). Worth it on CPU; on GPU a data-dependent loop exit syncs with the host each step.
    sampling: the filters, static, when every row shares them (``features.row_filters`` False).
    features: which per-row sampling steps any row uses (``sampling.Features``; the values are in the state).
    stop_ids: the ids that stop a row; eos_ids: those of them a row with ``ignore_eos`` does not stop at
      (used when rows differ in ignore_eos, ``features.ignore_eos``).
    """

    configs: tuple[LlamaConfig, ...]
    vocab: int
    n_ft: int
    base_top_p: float | None
    sampling: SamplingParams
    stop_ids: tuple[int, ...]
    pad_id: int
    chunk: int
    record_components: bool = False
    record_distributions: bool = False
    top_logprobs: int = 0
    sources: tuple[int, ...] = ()
    stop_early: bool = False
    features: Features = Features()
    eos_ids: tuple[int, ...] = ()

    @property
    def rule_size(self) -> int:
        """Members of the EFT rule: base, ref and the fine-tunes (1 for plain decoding)."""
        return 1 if self.n_ft == 0 else 2 + self.n_ft

    def rule(self, per_model: Sequence[Array]) -> list[Array]:
        """Per-model arrays (one per config) -> one per rule member, in rule order."""
        return [per_model[i] for i in (self.sources or range(self.rule_size))]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """Everything that changes during decoding (donated to each chunk).

    ``token`` is each row's last sampled token (output index ``num_tokens - 1``), not yet fed to the
    models; ``next_pos[m]`` is the position model m gives it (prompts differ in length per model). Every
    row keeps its own output index (``num_tokens``), so rows may start at different times: continuous
    batching refills a finished row with a new prompt (``refill``) while the others go on.
    """

    caches: tuple[KVCache, ...]
    token: Int[Array, " batch"]
    next_pos: Int[Array, "models batch"]
    done: Bool[Array, " batch"]
    num_tokens: Int[Array, " batch"]
    max_new: Int[Array, " batch"]
    stream: Int[Array, " batch"]
    tokens: Int[Array, "batch out"]
    logprobs: Float[Array, "batch out"]
    components: Float[Array, "models batch out"]  # empty when not recorded
    distributions: Float[Array, "batch out vocab"]  # empty when not recorded
    top_ids: Int[Array, "batch out k"]  # the K most likely ids per step; empty unless plan.top_logprobs
    top_logprobs: Float[Array, "batch out k"]  # their EFT log-probs; empty likewise
    top_components: Float[Array, "models batch out k"]  # their log-prob under each rule member; empty likewise
    values: RowValues  # each row's sampling values (sampling.RowValues)
    weights: Float[Array, "n_ft batch"]  # per-row reward weights; empty unless plan.features.row_weights
    counts: Int[Array, "batch vocab"]  # generated tokens per id (penalties); empty unless plan.features.penalties
    prompt_seen: Bool[Array, "batch vocab"]  # ids in the prompt (repetition penalty); empty likewise


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["tokens", "positions", "stream", "max_new", "values", "weights", "first"],
                   meta_fields=["layouts", "out_len"])
@dataclasses.dataclass(frozen=True)
class NewRows:
    """Rows to start decoding (``start``, ``refill``): each model's left-padded prompt (``tokens``, and
    ``positions``, -1 on padding), each row's random stream and ``max_new``; and, static (part of the
    compiled program's key), each model's empty-cache layout and the output length."""

    tokens: tuple[Int[Array, "rows prompt"], ...]
    positions: tuple[Int[Array, "rows prompt"], ...]
    stream: Int[Array, " rows"]
    max_new: Int[Array, " rows"]
    layouts: tuple[CacheLayout, ...]
    out_len: int
    values: RowValues | None = None  # each row's sampling values (None: plan.sampling's for every row)
    weights: Float[Array, "rows n_ft"] | None = None  # per-row reward weights (plan.features.row_weights)
    # A row restarted at output index first[r] (None: every row starts at 0): its prompt ends with its first
    # first[r] output tokens, and it samples output first[r] next (``batching``: longrope's original context).
    first: Int[Array, " rows"] | None = None


def row_weights(plan: Plan, state: DecodeState, weights: Float[Array, " n_ft"]) -> Array:
    """The reward weights of each row ([n_ft, batch]) or the run's ([n_ft])."""
    return state.weights if plan.features.row_weights else weights


def stops_row(plan: Plan, values: RowValues, ids: Int[Array, "rows n"]) -> Bool[Array, "rows n"]:
    """Whether each id stops its row: an explicit stop id, or an end id unless the row ignores end tokens."""
    stop = jnp.isin(ids, jnp.asarray(plan.stop_ids, jnp.int32)) if plan.stop_ids else jnp.zeros(ids.shape, bool)
    if plan.features.ignore_eos and plan.eos_ids:
        stop = stop & ~(values.ignore_eos[:, None] & jnp.isin(ids, jnp.asarray(plan.eos_ids, jnp.int32)))
    return stop


def stop_mask(plan: Plan, values: RowValues, vocab: int) -> Bool[Array, "rows vocab"]:
    """Each row's ids that stop it (``stops_row`` over the whole vocabulary)."""
    return stops_row(plan, values, jnp.broadcast_to(jnp.arange(vocab)[None], (values.min_tokens.shape[0], vocab)))


def sampling_distribution(plan: Plan, lp: Float[Array, "rows vocab"], values: RowValues, out_index: Int[Array, " rows"],
                          counts: Array, prompt_seen: Array) -> Float[Array, "rows vocab"]:
    """The exact distribution each row samples from (normalised log-probs): the per-row processors and then the
    filters (static ``plan.sampling`` or per-row), see ``sampling``'s module docstring. ``lp``: EFT log-probs."""
    f = plan.features
    x = lp
    if f.processors:
        x = process_rows(x, values, f, out_index, stop_mask(plan, values, x.shape[-1]) if f.min_tokens else None,
                         counts if f.penalties else None, prompt_seen if f.penalties else None)
    if f.row_filters:
        return filter_rows(x, values, f)
    # The EFT log-probs are already normalised: skip the filter pass when it would change nothing.
    return x if plan.sampling.is_identity and not f.processors else final_logprobs(x, plan.sampling)


def default_values(plan: Plan, rows: int) -> RowValues:
    """``plan.sampling``'s values for ``rows`` rows (callers that give no per-row values)."""
    host = RowValues.host([plan.sampling] * rows, plan.features)
    return RowValues(**{k: jnp.asarray(v) for k, v in host.items()})


def eft_distribution(plan: Plan, logits: tuple[Array, ...], weights: Float[Array, " n_ft"]) -> Float[Array, "batch vocab"]:
    """The normalised EFT log-probs [batch, vocab] from each model's next-token logits [batch, padded]."""
    sliced = [x[:, : plan.vocab] for x in plan.rule(logits)]  # drop padded vocab rows before normalising
    if plan.n_ft == 0:
        return eft_logprobs(sliced[0], None, None, None, base_top_p=plan.base_top_p)
    return eft_logprobs(sliced[0], sliced[1], jnp.stack(sliced[2:]), weights, base_top_p=plan.base_top_p)


def top_logprobs(lp: Float[Array, "... vocab"], k: int) -> tuple[Float[Array, "... k"], Int[Array, "... k"]]:
    """The ``k`` largest log-probs of each row and their ids, in descending order, the lower id first among
    equal values (``lax.top_k``'s documented order: a stable descending argsort's). ``+ 0.0`` makes -0.0 equal
    to 0.0 for a total-order comparison."""
    return jax.lax.top_k(lp + 0.0, k)


def emit(plan: Plan, state: DecodeState, tokens: Int[Array, "batch n"], proposed: Bool[Array, "batch n"],
         lp: Float[Array, "batch n vocab"], logits: tuple[Array, ...]) -> tuple[DecodeState, Bool[Array, "batch n"]]:
    """Write each row's new output tokens: the one emit/stop bookkeeping of plain and speculative decoding.

    ``tokens[b, j]`` is row b's candidate output token ``num_tokens[b] + j``, ``proposed`` says which
    candidates the caller emits (a prefix of each row), ``lp`` their EFT log-probs (``[batch, n, vocab]``)
    and ``logits`` each model's raw logits at them (``[batch, n, padded vocab]``, for the per-model
    log-probs; with ``plan.top_logprobs`` also the top K of ``lp`` and each model's log-probs of those ids, at
    the same output indices). A row emits its proposed tokens up to and including the first stop token, at most up to
    its ``max_new``, nothing once done. Returns the new state (``token`` unchanged: the caller feeds
    what it decides) and which candidates were emitted."""
    j = jnp.arange(tokens.shape[1])[None, :]
    is_stop = stops_row(plan, state.values, tokens)
    after_stop = (jnp.cumsum(is_stop, axis=1) - is_stop) > 0
    emitted = (proposed & ~after_stop & (j < (state.max_new - state.num_tokens)[:, None])
               & ~state.done[:, None])
    out_len = state.tokens.shape[1]
    rows = jnp.arange(tokens.shape[0])[:, None]
    at = jnp.where(emitted, state.num_tokens[:, None] + j, out_len)  # out of range: dropped
    put = lambda buf, value: buf.at[rows, at].set(value, mode="drop")  # noqa: E731
    take = lambda dist: jnp.take_along_axis(dist, tokens[..., None], axis=-1)[..., 0]  # noqa: E731
    components, distributions = state.components, state.distributions
    top_ids, top_lps, top_components = state.top_ids, state.top_logprobs, state.top_components
    if plan.record_components or plan.top_logprobs:
        members = [safe_log_softmax(x[..., : plan.vocab]) for x in plan.rule(logits)]  # each [batch, n, vocab]
    if plan.record_components:
        per_model = jnp.stack([take(m) for m in members])
        components = components.at[:, rows, at].set(per_model, mode="drop")
    if plan.record_distributions:
        distributions = put(distributions, lp)
    if plan.top_logprobs:
        values, ids = top_logprobs(lp, plan.top_logprobs)  # [batch, n, K]
        top_ids, top_lps = put(top_ids, ids), put(top_lps, values)
        per_model = jnp.stack([jnp.take_along_axis(m, ids, axis=-1) for m in members])  # [members, batch, n, K]
        top_components = top_components.at[:, rows, at].set(per_model, mode="drop")
    counts = state.counts
    if plan.features.penalties:
        counts = counts.at[rows, tokens].add(emitted.astype(jnp.int32), mode="drop")
    num_tokens = state.num_tokens + jnp.sum(emitted, axis=1)
    done = state.done | jnp.any(is_stop & emitted, axis=1) | (num_tokens >= state.max_new)
    return dataclasses.replace(
        state, done=done, num_tokens=num_tokens, tokens=put(state.tokens, tokens),
        logprobs=put(state.logprobs, take(lp)), components=components,
        distributions=distributions, top_ids=top_ids, top_logprobs=top_lps, top_components=top_components,
        counts=counts,
    ), emitted


def _choose_and_record(plan: Plan, state: DecodeState, logits: tuple[Array, ...], weights: Array,
                       seed: Array) -> DecodeState:
    """Sample every row's next output token (index ``num_tokens``) and write it; done rows write nothing.

    A row's randomness is keyed by (seed, stream, its own output index), so a sample does not depend
    on when its row started or what its neighbours do."""
    lp = eft_distribution(plan, logits, row_weights(plan, state, weights))
    keys = row_keys(seed, state.stream, state.num_tokens)
    tok = sample(sampling_distribution(plan, lp, state.values, state.num_tokens, state.counts, state.prompt_seen),
                 keys)
    state, emitted = emit(plan, state, tok[:, None], jnp.ones((tok.shape[0], 1), bool), lp[:, None],
                          tuple(x[:, None] for x in logits))
    return dataclasses.replace(state, token=jnp.where(emitted[:, 0], tok, plan.pad_id))


def start_state(plan: Plan, params: tuple[Any, ...], rows: NewRows, weights: Float[Array, " n_ft"],
                seed: Int[Array, ""]) -> DecodeState:
    """Empty caches (``layouts``), every model run over its own left-padded prompt, output token 0
    sampled (traced, not jitted: ``start`` and ``refill`` compile it)."""
    caches = tuple(layout.zeros() for layout in rows.layouts)
    logits, new_caches = [], []
    for cfg, p, toks, pos, cache in zip(plan.configs, params, rows.tokens, rows.positions, caches, strict=True):
        # Left padding: the last column is every row's last prompt token; only it needs logits.
        last = jnp.full((toks.shape[0], 1), toks.shape[1] - 1, jnp.int32)
        out, cache = llama.forward(cfg, p, toks, pos, cache, logits_at=last)
        logits.append(out[:, 0])
        new_caches.append(cache)
    batch, out_len = rows.stream.shape[0], rows.out_len
    first = jnp.zeros((batch,), jnp.int32) if rows.first is None else rows.first.astype(jnp.int32)
    state = DecodeState(
        caches=tuple(new_caches),
        token=jnp.zeros((batch,), jnp.int32),
        next_pos=jnp.stack([jnp.max(pos, axis=1) + 1 for pos in rows.positions]).astype(jnp.int32),
        done=rows.max_new <= first,
        num_tokens=first,
        max_new=rows.max_new.astype(jnp.int32),
        stream=rows.stream.astype(jnp.int32),
        tokens=jnp.full((batch, out_len), plan.pad_id, jnp.int32),
        logprobs=jnp.zeros((batch, out_len), jnp.float32),
        components=jnp.zeros((plan.rule_size, batch, out_len) if plan.record_components else (0,), jnp.float32),
        distributions=jnp.zeros((batch, out_len, plan.vocab) if plan.record_distributions else (0,), jnp.float32),
        top_ids=jnp.zeros((batch, out_len, plan.top_logprobs) if plan.top_logprobs else (0,), jnp.int32),
        top_logprobs=jnp.zeros((batch, out_len, plan.top_logprobs) if plan.top_logprobs else (0,), jnp.float32),
        top_components=jnp.zeros((plan.rule_size, batch, out_len, plan.top_logprobs) if plan.top_logprobs else (0,),
                                 jnp.float32),
        values=rows.values if rows.values is not None else default_values(plan, batch),
        weights=(jnp.asarray(rows.weights, jnp.float32).T if plan.features.row_weights
                 else jnp.zeros((0,), jnp.float32)),
        counts=_restart_counts(plan, rows, first) if plan.features.penalties else jnp.zeros((0,), jnp.int32),
        prompt_seen=_prompt_seen(plan, rows) if plan.features.penalties else jnp.zeros((0,), bool),
    )
    return _choose_and_record(plan, state, tuple(logits), weights, seed)


def _restart_counts(plan: Plan, rows: NewRows, first: Int[Array, " rows"]) -> Int[Array, "rows vocab"]:
    """Each row's output tokens so far, counted per id (presence / frequency penalties): none for a new row; for
    a restarted one, its first ``first`` outputs, the last ``first`` tokens of the base's left-padded prompt."""
    toks = rows.tokens[0]
    tail = jnp.arange(toks.shape[1])[None, :] >= toks.shape[1] - first[:, None]
    counts = jnp.zeros((toks.shape[0], plan.vocab), jnp.int32)
    return counts.at[jnp.arange(toks.shape[0])[:, None], jnp.minimum(toks, plan.vocab - 1)].add(tail.astype(jnp.int32))


def _prompt_seen(plan: Plan, rows: NewRows) -> Bool[Array, "rows vocab"]:
    """The ids of each row's prompt, as the first model (the base) renders it (repetition penalty)."""
    toks, pos = rows.tokens[0], rows.positions[0]
    ids = jnp.where((pos >= 0) & (toks < plan.vocab), toks, plan.vocab)  # padding: out of range, dropped
    seen = jnp.zeros((toks.shape[0], plan.vocab), bool)
    return seen.at[jnp.arange(toks.shape[0])[:, None], ids].set(True, mode="drop")


@programs.jit(static_argnums=0)
def start(plan: Plan, params: tuple[Any, ...], rows: NewRows, weights: Float[Array, " n_ft"],
          seed: Int[Array, ""]) -> DecodeState:
    """What the engine runs: empty caches (``rows.layouts``, static) + prefill + output token 0 in ONE
    program. A separate cache constructor would cost one more compiled program per model and batch shape."""
    return start_state(plan, params, rows, weights, seed)


def set_rows(big: Array, new: Array, slots: Int[Array, " rows"], axis: int = 0) -> Array:
    """``big`` with ``big[..., slots[r], ...] = new[..., r, ...]`` along ``axis`` (an out-of-range slot
    writes nothing; an empty, unrecorded buffer stays as it is)."""
    if big.size == 0:
        return big
    return big.at[(slice(None),) * axis + (slots,)].set(new, mode="drop")


def put_rows(state: DecodeState, new: DecodeState, slots: Int[Array, " rows"]) -> DecodeState:
    """Replace rows ``slots`` of ``state`` by the rows of ``new`` (same cache slots and output length)."""
    caches = tuple(
        KVCache(k=set_rows(c.k, n.k, slots, 1), v=set_rows(c.v, n.v, slots, 1), pos=set_rows(c.pos, n.pos, slots),
                length=set_rows(c.length, n.length, slots))
        for c, n in zip(state.caches, new.caches, strict=True)
    )
    axis1 = ("next_pos", "components", "top_components", "weights")  # [models | n_ft, batch, ...]
    fields = {f.name: set_rows(getattr(state, f.name), getattr(new, f.name), slots, 1 if f.name in axis1 else 0)
              for f in dataclasses.fields(DecodeState) if f.name not in ("caches", "values")}
    values = jax.tree.map(lambda big, small: set_rows(big, small, slots), state.values, new.values)
    return DecodeState(caches=caches, values=values, **fields)


@programs.jit(static_argnums=0, donate_argnames=("state",))
def refill(plan: Plan, params: tuple[Any, ...], rows: NewRows, weights: Float[Array, " n_ft"], seed: Int[Array, ""],
           slots: Int[Array, " rows"], state: DecodeState) -> DecodeState:
    """Continuous batching: prefill new prompts (``rows.layouts``: caches of the same slots as ``state``'s,
    one row each) and put them in place of rows ``slots`` of the donated ``state``, in one program."""
    return put_rows(state, start_state(plan, params, rows, weights, seed), slots)


def window_caches(caches: tuple[KVCache, ...], windows: tuple[int, ...] | None) -> tuple[KVCache, ...]:
    """Each cache cut to its first ``windows[m]`` slots (None: whole), so that attention reads only the
    filled part. The caller guarantees that every live row's writes stay inside the window; a done row's
    writes beyond it are dropped (its outputs are no longer used)."""
    if windows is None:
        return caches
    return tuple(KVCache(k=c.k[:, :, :w], v=c.v[:, :, :w], pos=c.pos[:, :w], length=c.length)
                 for c, w in zip(caches, windows, strict=True))


def unwindow_caches(full: tuple[KVCache, ...], part: tuple[KVCache, ...]) -> tuple[KVCache, ...]:
    """Write windowed caches back into the full buffers (in place when the full ones are donated)."""
    return tuple(
        f if f is p else KVCache(
            k=jax.lax.dynamic_update_slice_in_dim(f.k, p.k, 0, axis=2),
            v=jax.lax.dynamic_update_slice_in_dim(f.v, p.v, 0, axis=2),
            pos=jax.lax.dynamic_update_slice_in_dim(f.pos, p.pos, 0, axis=1), length=p.length)
        for f, p in zip(full, part, strict=True)
    )


@programs.jit(static_argnums=(0, 5), donate_argnames=("state",))
def decode_chunk(
    plan: Plan, params: tuple[Any, ...], weights: Float[Array, " n_ft"], seed: Int[Array, ""], state: DecodeState,
    windows: tuple[int, ...] | None = None,
) -> DecodeState:
    """``plan.chunk`` decode steps in one loop (``run_steps``): feed the last token, combine, sample, record.

    windows: per model, the cache slots attention reads this chunk (see ``window_caches``; one program
    per distinct value, so the caller buckets them)."""

    def step(state: DecodeState) -> DecodeState:
        logits, caches = [], []
        for m, (cfg, p, cache) in enumerate(zip(plan.configs, params, state.caches, strict=True)):
            out, cache = llama.forward(cfg, p, state.token[:, None], state.next_pos[m][:, None], cache)
            logits.append(out[:, 0])
            caches.append(cache)
        state = dataclasses.replace(state, caches=tuple(caches), next_pos=state.next_pos + 1)
        return _choose_and_record(plan, state, tuple(logits), weights, seed)

    full = state.caches
    state = run_steps(plan, step, dataclasses.replace(state, caches=window_caches(full, windows)),
                      plan.chunk, lambda s: s.done)
    return dataclasses.replace(state, caches=unwindow_caches(full, state.caches) if windows else state.caches)


def run_steps(plan: Plan, step: Any, state: Any, length: int, done: Any) -> Any:
    """``step`` applied ``length`` times: a ``lax.scan``, or with ``plan.stop_early`` a ``lax.while_loop``
    that also stops once ``done(state)`` is true for every row (the steps it skips would write nothing)."""
    if not plan.stop_early:
        return jax.lax.scan(lambda s, _: (step(s), None), state, None, length=length)[0]
    _, state = jax.lax.while_loop(lambda c: (c[0] < length) & ~jnp.all(done(c[1])),
                                  lambda c: (c[0] + 1, step(c[1])), (jnp.int32(0), state))
    return state


@programs.jit(static_argnums=0)
def score_batch(
    plan: Plan,
    params: tuple[Any, ...],
    tokens: tuple[Int[Array, "batch seq"], ...],
    positions: tuple[Int[Array, "batch seq"], ...],
    predict_at: tuple[Int[Array, "batch resp"], ...],
    targets: Int[Array, "batch resp"],
    weights: Float[Array, " n_ft"],
) -> tuple[Float[Array, "batch resp"], Float[Array, "models batch resp"]]:
    """Teacher-forced log-probs of ``targets`` under the EFT distribution and under each model.

    ``predict_at[m][b, j]``: the column of model m's (left-padded) sequence whose logits predict
    response token j of row b.
    """
    logits = []
    for cfg, p, toks, pos, at in zip(plan.configs, params, tokens, positions, predict_at, strict=True):
        out, _ = llama.forward(cfg, p, toks, pos, logits_at=at)
        logits.append(out)  # [batch, resp, padded vocab]
    b, r = targets.shape
    flat = tuple(x.reshape(b * r, -1) for x in logits)
    lp = eft_distribution(plan, flat, weights)
    flat_targets = targets.reshape(-1)
    eft = gather_logprobs(lp, flat_targets).reshape(b, r)
    comps = jnp.stack([gather_logprobs(safe_log_softmax(x[:, : plan.vocab]), flat_targets) for x in plan.rule(flat)])
    return eft, comps.reshape(plan.rule_size, b, r)

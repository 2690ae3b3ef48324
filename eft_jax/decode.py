"""The jitted core of EFT decoding: prefill, fixed-length scan chunks of decode steps, and scoring.

One step, for every model of the spec: feed the last sampled token at that model's own position,
get next-token logits, then combine (``eft.eft_logprobs``), filter (``sampling.final_logprobs``) and
sample once for all. Plain decoding is the one-model case of the same code.

Everything here is a pure function of a static ``Plan`` (shapes, configs, sampling settings) and
pytrees of arrays (params, caches, ``DecodeState``). The host loop lives in ``batching.py``: it calls
``start`` (empty caches + prefill + token 0, one program: the caches are created inside it, not by a
separately compiled constructor), then ``decode_chunk`` (``chunk`` steps in one ``lax.scan``, no host
round trip inside) until every row is done, checking between chunks, and ``refill`` to put new prompts
in finished rows. Nothing else is compiled on the way: the host loop computes no array eagerly.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from eft_jax.eft import eft_logprobs, gather_logprobs
from eft_jax.models import llama
from eft_jax.models.config import LlamaConfig
from eft_jax.models.kv_cache import CacheLayout, KVCache
from eft_jax.sampling import SamplingParams, final_logprobs, row_keys, safe_log_softmax, sample


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static description of one compiled decode program (hashable; a jit static argument).

    configs: the distinct models to run (a model used twice with the same prompt is run once).
    sources: for each member of the EFT rule (base, ref, fine-tunes, in that order), its index in
      ``configs``; empty means "the first rule_size configs, in order". vocab: the common vocabulary size.
    record_components: also return each model's log-prob of every sampled token.
    record_distributions: also return every step's EFT distribution (analysis/tests; [B, T, vocab]).
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
    sources: tuple[int, ...] = ()

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


def eft_distribution(plan: Plan, logits: tuple[Array, ...], weights: Float[Array, " n_ft"]) -> Float[Array, "batch vocab"]:
    """The normalised EFT log-probs [batch, vocab] from each model's next-token logits [batch, padded]."""
    sliced = [x[:, : plan.vocab] for x in plan.rule(logits)]  # drop padded vocab rows before normalising
    if plan.n_ft == 0:
        return eft_logprobs(sliced[0], None, None, None, base_top_p=plan.base_top_p)
    return eft_logprobs(sliced[0], sliced[1], jnp.stack(sliced[2:]), weights, base_top_p=plan.base_top_p)


def _write_at(buf: Array, value: Array, at: Int[Array, " batch"], batch_axis: int = 0) -> Array:
    """``buf[..., b, at[b], ...] = value[..., b, ...]`` per row b (axis ``batch_axis`` + 1 is the output
    index); an out-of-range ``at[b]`` writes nothing."""
    rows = jnp.arange(at.shape[0])
    index = (slice(None),) * batch_axis + (rows, at)
    return buf.at[index].set(value, mode="drop")


def _choose_and_record(plan: Plan, state: DecodeState, logits: tuple[Array, ...], weights: Array,
                       seed: Array) -> DecodeState:
    """Sample every row's next output token (index ``num_tokens``) and write it; done rows write nothing.

    A row's randomness is keyed by (seed, stream, its own output index), so a sample does not depend
    on when its row started or what its neighbours do."""
    lp = eft_distribution(plan, logits, weights)
    index = state.num_tokens
    keys = row_keys(seed, state.stream, index)
    # The EFT log-probs are already normalised: skip the filter pass when it would change nothing.
    tok = sample(lp if plan.sampling.is_identity else final_logprobs(lp, plan.sampling), keys)

    out_len = state.tokens.shape[1]
    active = ~state.done & (index < out_len)
    tok = jnp.where(active, tok, plan.pad_id)
    num_tokens = index + active
    is_stop = jnp.isin(tok, jnp.asarray(plan.stop_ids, jnp.int32)) if plan.stop_ids else jnp.zeros_like(active)
    done = state.done | (active & is_stop) | (num_tokens >= state.max_new)

    at = jnp.where(active, index, out_len)  # out of range: dropped
    tokens = _write_at(state.tokens, tok, at)
    logprobs = _write_at(state.logprobs, gather_logprobs(lp, tok), at)
    components = state.components
    if plan.record_components:
        comp = jnp.stack([gather_logprobs(safe_log_softmax(x[:, : plan.vocab]), tok) for x in plan.rule(logits)])
        components = _write_at(components, comp, at, batch_axis=1)
    distributions = state.distributions
    if plan.record_distributions:
        distributions = _write_at(distributions, lp, at)
    return dataclasses.replace(
        state, token=tok, done=done, num_tokens=num_tokens,
        tokens=tokens, logprobs=logprobs, components=components, distributions=distributions,
    )


def start_state(
    plan: Plan,
    params: tuple[Any, ...],
    prompt_tokens: tuple[Int[Array, "batch prompt"], ...],
    prompt_positions: tuple[Int[Array, "batch prompt"], ...],
    layouts: tuple[CacheLayout, ...],
    weights: Float[Array, " n_ft"],
    seed: Int[Array, ""],
    stream: Int[Array, " batch"],
    max_new: Int[Array, " batch"],
    out_len: int,
) -> DecodeState:
    """Empty caches (``layouts``), every model run over its own left-padded prompt, output token 0
    sampled (traced, not jitted: ``start`` and ``refill`` compile it)."""
    caches = tuple(layout.zeros() for layout in layouts)
    logits, new_caches = [], []
    for cfg, p, toks, pos, cache in zip(plan.configs, params, prompt_tokens, prompt_positions, caches, strict=True):
        # Left padding: the last column is every row's last prompt token; only it needs logits.
        last = jnp.full((toks.shape[0], 1), toks.shape[1] - 1, jnp.int32)
        out, cache = llama.forward(cfg, p, toks, pos, cache, logits_at=last)
        logits.append(out[:, 0])
        new_caches.append(cache)
    batch = stream.shape[0]
    state = DecodeState(
        caches=tuple(new_caches),
        token=jnp.zeros((batch,), jnp.int32),
        next_pos=jnp.stack([jnp.max(pos, axis=1) + 1 for pos in prompt_positions]).astype(jnp.int32),
        done=max_new <= 0,
        num_tokens=jnp.zeros((batch,), jnp.int32),
        max_new=max_new.astype(jnp.int32),
        stream=stream.astype(jnp.int32),
        tokens=jnp.full((batch, out_len), plan.pad_id, jnp.int32),
        logprobs=jnp.zeros((batch, out_len), jnp.float32),
        components=jnp.zeros((plan.rule_size, batch, out_len) if plan.record_components else (0,), jnp.float32),
        distributions=jnp.zeros((batch, out_len, plan.vocab) if plan.record_distributions else (0,), jnp.float32),
    )
    return _choose_and_record(plan, state, tuple(logits), weights, seed)


@functools.partial(jax.jit, static_argnums=(0, 4, 9))
def start(
    plan: Plan,
    params: tuple[Any, ...],
    prompt_tokens: tuple[Int[Array, "batch prompt"], ...],
    prompt_positions: tuple[Int[Array, "batch prompt"], ...],
    layouts: tuple[CacheLayout, ...],
    weights: Float[Array, " n_ft"],
    seed: Int[Array, ""],
    stream: Int[Array, " batch"],
    max_new: Int[Array, " batch"],
    out_len: int,
) -> DecodeState:
    """What the engine runs: empty caches (``layouts``, static) + prefill + output token 0 in ONE program.

    A separate cache constructor would cost one more compiled program per model and batch shape.
    """
    return start_state(plan, params, prompt_tokens, prompt_positions, layouts, weights, seed, stream, max_new,
                       out_len)


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
    fields = {f.name: set_rows(getattr(state, f.name), getattr(new, f.name), slots)
              for f in dataclasses.fields(DecodeState) if f.name not in ("caches", "next_pos", "components")}
    return DecodeState(caches=caches, next_pos=set_rows(state.next_pos, new.next_pos, slots, 1),
                       components=set_rows(state.components, new.components, slots, 1), **fields)


@functools.partial(jax.jit, static_argnums=(0, 4, 9), donate_argnames=("state",))
def refill(
    plan: Plan,
    params: tuple[Any, ...],
    prompt_tokens: tuple[Int[Array, "rows prompt"], ...],
    prompt_positions: tuple[Int[Array, "rows prompt"], ...],
    layouts: tuple[CacheLayout, ...],
    weights: Float[Array, " n_ft"],
    seed: Int[Array, ""],
    stream: Int[Array, " rows"],
    max_new: Int[Array, " rows"],
    out_len: int,
    slots: Int[Array, " rows"],
    state: DecodeState,
) -> DecodeState:
    """Continuous batching: prefill new prompts (``layouts``: caches of the same slots as ``state``'s, one
    row each) and put them in place of rows ``slots`` of the donated ``state``, in one program."""
    new = start_state(plan, params, prompt_tokens, prompt_positions, layouts, weights, seed, stream, max_new, out_len)
    return put_rows(state, new, slots)


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


@functools.partial(jax.jit, static_argnums=(0, 5), donate_argnames=("state",))
def decode_chunk(
    plan: Plan, params: tuple[Any, ...], weights: Float[Array, " n_ft"], seed: Int[Array, ""], state: DecodeState,
    windows: tuple[int, ...] | None = None,
) -> DecodeState:
    """``plan.chunk`` decode steps in one ``lax.scan``: feed the last token, combine, sample, record.

    windows: per model, the cache slots attention reads this chunk (see ``window_caches``; one program
    per distinct value, so the caller buckets them)."""

    def step(state: DecodeState, _: None) -> tuple[DecodeState, None]:
        logits, caches = [], []
        for m, (cfg, p, cache) in enumerate(zip(plan.configs, params, state.caches, strict=True)):
            out, cache = llama.forward(cfg, p, state.token[:, None], state.next_pos[m][:, None], cache)
            logits.append(out[:, 0])
            caches.append(cache)
        state = dataclasses.replace(state, caches=tuple(caches), next_pos=state.next_pos + 1)
        return _choose_and_record(plan, state, tuple(logits), weights, seed), None

    full = state.caches
    state, _ = jax.lax.scan(step, dataclasses.replace(state, caches=window_caches(full, windows)), None,
                            length=plan.chunk)
    return dataclasses.replace(state, caches=unwindow_caches(full, state.caches) if windows else state.caches)


@functools.partial(jax.jit, static_argnums=0)
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

"""Speculative EFT: a small drafter proposes k tokens, every model of the rule scores them in one pass.

One round, for every row of the batch at once (static shapes, inside ``jit``):

1. Draft: the drafter (by default the small fine-tune of an up-scaling spec, which is one of the
   models of the rule anyway) samples ``d_1..d_k`` autoregressively from its own filtered
   distribution ``q`` (each row's own logit_bias, min_tokens - at the drafted position -, temperature,
   top-k / top-p / min-p, as for the target: ``decode.sampling_distribution``). Penalties are refused
   (``Engine.run``): their counts would change along the drafted prefix.
2. Verify: each other model runs ONE forward over ``[last, d_1..d_k]``; the drafter feeds only
   ``d_k`` (its logits for the other positions come from drafting). This gives the exact final EFT
   sampling distribution ``p_0..p_k`` at the k + 1 positions.
3. Accept ``d_j`` with probability ``min(1, p(d_j) / q(d_j))`` while all previous drafts were
   accepted; at the first rejection sample from ``norm(max(0, p - q))``; if all k are accepted, sample
   a bonus token from ``p_k``. The output distribution is exactly the EFT one (the standard lossless
   rule). Greedy: p and q are one-hot, so a draft is accepted iff it equals the EFT argmax.
4. Roll back: each row's cache pointer moves to just past its accepted tokens (``KVCache.rewind``:
   nothing is copied; stale slots are overwritten next round).

Each row accepts its own number of tokens and writes them at its own output offset. Rows that are
done keep running (static shapes) but write nothing; the host stops the batch when all are done.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from eft_jax import programs
from eft_jax.decode import (
    DecodeState, NewRows, Plan, eft_distribution, emit, put_rows, row_weights, run_steps, sampling_distribution,
    set_rows, start_state, unwindow_caches, window_caches,
)
from eft_jax.models import llama
from eft_jax.sampling import row_keys, safe_log_softmax, sample

# Randomness tags: a row's draws for drafting, acceptance and the corrected token are independent
# streams keyed by (seed, row stream, output index, tag).
_DRAFT, _ACCEPT, _CORRECT = 1, 2, 3


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SpecState:
    """Decode state plus per-row speculative accounting.

    ``round_of[b, i]``: the round (1-based; 0 = prefill) in which output token i was emitted;
    ``from_draft[b, i]``: whether it was an accepted draft (else sampled from the target).
    ``accepted`` / ``rejected``: emitted drafts, and rounds that emitted a corrected token after a
    rejected draft (drafts after a rejection are never tested, so accepted / (accepted + rejected)
    estimates the per-draft acceptance probability).
    """

    decode: DecodeState
    rounds: Int[Array, " batch"]
    drafted: Int[Array, " batch"]
    accepted: Int[Array, " batch"]
    rejected: Int[Array, " batch"]
    round_of: Int[Array, "batch out"]
    from_draft: Bool[Array, "batch out"]


def init_spec_state(state: DecodeState) -> SpecState:
    """Zero counters around a decode state. Call it inside ``jit`` (as ``start`` does): run eagerly, each
    ``jnp.zeros`` compiles a program of its own, and the chunk program would then be compiled twice (once
    for these unplaced arrays, once for its own placed outputs)."""
    batch, out = state.tokens.shape
    # Distinct buffers for each counter: the state is donated, and one buffer may not be donated twice.
    counters = [jnp.zeros((batch,), jnp.int32) for _ in range(4)]
    return SpecState(state, *counters, jnp.zeros((batch, out), jnp.int32), jnp.zeros((batch, out), bool))


@programs.jit(static_argnums=0)
def start(plan: Plan, params: tuple[Any, ...], rows: NewRows, weights: Float[Array, " n_ft"],
          seed: Int[Array, ""]) -> SpecState:
    """``decode.start`` (empty caches, prefill, output token 0) and zero speculative counters, in one program."""
    return init_spec_state(start_state(plan, params, rows, weights, seed))


@programs.jit(static_argnums=0, donate_argnames=("spec",))
def refill(plan: Plan, params: tuple[Any, ...], rows: NewRows, weights: Float[Array, " n_ft"], seed: Int[Array, ""],
           slots: Int[Array, " rows"], spec: SpecState) -> SpecState:
    """Continuous batching: ``decode.refill`` for a speculative state (the new rows' counters start at 0)."""
    new = init_spec_state(start_state(plan, params, rows, weights, seed))
    return SpecState(decode=put_rows(spec.decode, new.decode, slots),
                     **{f.name: set_rows(getattr(spec, f.name), getattr(new, f.name), slots)
                        for f in dataclasses.fields(SpecState) if f.name != "decode"})


def _keys(plan: Plan, seed: Array, stream: Array, index: Array, tag: int) -> Array:
    return row_keys(seed, stream, index * 4 + tag)


def _filtered(plan: Plan, st: DecodeState, lp: Array, offset: Array | int, n: int = 1) -> Array:
    """The exact sampling distribution of each row's output token ``num_tokens + offset`` (``lp``: [batch * n,
    vocab], ``n`` consecutive positions per row, offsets 0..n-1; else [batch] at ``offset``): the same per-row
    processors and filters for the target p and the draft q, so the rule stays lossless. Penalties are refused
    with speculative decoding (``Engine.run``): their counts would change inside a round."""
    if n == 1:
        return sampling_distribution(plan, lp, st.values, st.num_tokens + offset, st.counts, st.prompt_seen)
    index = (st.num_tokens[:, None] + jnp.arange(n)[None, :]).reshape(-1)
    return sampling_distribution(plan, lp, st.values.repeat(n), index, st.counts, st.prompt_seen)


def spec_round(plan: Plan, k: int, drafter: int, params: tuple[Any, ...], weights: Array, seed: Array,
               spec: SpecState) -> SpecState:
    """One draft / verify / accept round for every row (see the module docstring)."""
    st = spec.decode
    batch = st.token.shape[0]
    base_len = [c.length for c in st.caches]

    # 1. Draft k tokens with the drafter.
    d_cfg, d_params = plan.configs[drafter], params[drafter]

    def draft_step(carry, j):
        tok, cache = carry
        out, cache = llama.forward(d_cfg, d_params, tok[:, None], (st.next_pos[drafter] + j)[:, None], cache)
        logits = out[:, 0]
        q = _filtered(plan, st, safe_log_softmax(logits[:, : plan.vocab]), j)
        d = sample(q, _keys(plan, seed, st.stream, st.num_tokens + j, _DRAFT))
        return (d, cache), (d, q, logits)

    (_, d_cache), (drafts, q, d_logits) = jax.lax.scan(
        draft_step, (st.token, st.caches[drafter]), jnp.arange(k, dtype=jnp.int32)
    )
    drafts, q, d_logits = drafts.T, q.transpose(1, 0, 2), d_logits.transpose(1, 0, 2)  # [B, k(, V)]

    # 2. Verify: one forward per model over [last, d_1..d_k]; the drafter only feeds d_k.
    fed = jnp.concatenate([st.token[:, None], drafts], axis=1)  # [B, k + 1]
    steps = jnp.arange(k + 1, dtype=jnp.int32)[None, :]
    logits, caches = [], []
    for m, (cfg, p, cache) in enumerate(zip(plan.configs, params, st.caches, strict=True)):
        if m == drafter:
            out, cache = llama.forward(cfg, p, drafts[:, -1:], (st.next_pos[m] + k)[:, None], d_cache)
            out = jnp.concatenate([d_logits, out], axis=1)
        else:
            out, cache = llama.forward(cfg, p, fed, st.next_pos[m][:, None] + steps, cache)
        logits.append(out)
        caches.append(cache)
    flat = tuple(x.reshape(batch * (k + 1), -1) for x in logits)
    w = row_weights(plan, st, weights)
    w = jnp.repeat(w, k + 1, axis=1) if w.ndim == 2 else w  # per-row weights: one column per flat position
    lp = eft_distribution(plan, flat, w)  # [B*(k+1), V] EFT log-probs (reported)
    p = _filtered(plan, st, lp, 0, k + 1).reshape(batch, k + 1, -1)  # the exact sampling distribution
    lp = lp.reshape(batch, k + 1, -1)

    # 3. Accept the longest prefix of drafts; then one token from the residual or the bonus.
    take = lambda dist, toks: jnp.take_along_axis(dist, toks[:, :, None], axis=2)[:, :, 0]  # noqa: E731
    p_d, q_d = take(p[:, :k], drafts), take(q, drafts)
    u = jax.vmap(lambda j: jax.vmap(lambda key: jax.random.uniform(key))(
        _keys(plan, seed, st.stream, st.num_tokens + j, _ACCEPT)))(jnp.arange(k)).T  # [B, k]
    accept = jnp.log(u) < p_d - q_d  # u < p/q, in log space (q_d is finite: d was drawn from q)
    n_acc = jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=1), axis=1)  # [B]

    p_at = jnp.take_along_axis(p, n_acc[:, None, None], axis=1)[:, 0]
    q_pad = jnp.concatenate([q, jnp.full_like(q[:, :1], -jnp.inf)], axis=1)  # no q after the last draft
    q_at = jnp.take_along_axis(q_pad, n_acc[:, None, None], axis=1)[:, 0]
    residual = jnp.maximum(jnp.exp(p_at) - jnp.exp(q_at), 0.0)
    # p == q exactly leaves no residual (a rejection then has probability 0): fall back to p.
    residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, jnp.exp(p_at))
    corrected = sample(jnp.log(residual), _keys(plan, seed, st.stream, st.num_tokens + n_acc, _CORRECT))

    # 4. Emit d_1..d_{n_acc}, corrected (cut at a stop token and at max_new; rows done write nothing).
    j = jnp.arange(k + 1)[None, :]
    candidates = jnp.where(j < n_acc[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), corrected[:, None])
    emitted_state, valid = emit(plan, st, candidates, j <= n_acc[:, None], lp, tuple(logits))
    active = ~st.done
    rounds = spec.rounds + active
    new_decode = dataclasses.replace(
        emitted_state,
        caches=tuple(c.rewind(length + 1 + n_acc) for c, length in zip(caches, base_len, strict=True)),
        token=corrected,
        next_pos=st.next_pos + 1 + n_acc[None, :],
    )
    out_len = st.tokens.shape[1]
    rows = jnp.arange(batch)[:, None]
    at = jnp.where(valid, st.num_tokens[:, None] + j, out_len)  # out of range = dropped
    return SpecState(
        decode=new_decode,
        rounds=rounds,
        drafted=spec.drafted + k * active,
        accepted=spec.accepted + jnp.sum(valid & (j < n_acc[:, None]), axis=1),
        rejected=spec.rejected + jnp.any(valid & (j == n_acc[:, None]) & (n_acc[:, None] < k), axis=1),
        round_of=spec.round_of.at[rows, at].set(jnp.broadcast_to(rounds[:, None], at.shape), mode="drop"),
        from_draft=spec.from_draft.at[rows, at].set(j < n_acc[:, None], mode="drop"),
    )


@programs.jit(static_argnums=(0, 1, 2, 3, 8), donate_argnames=("spec",))
def spec_chunk(plan: Plan, k: int, drafter: int, rounds: int, params: tuple[Any, ...], weights: Float[Array, " n_ft"],
               seed: Int[Array, ""], spec: SpecState, windows: tuple[int, ...] | None = None) -> SpecState:
    """``rounds`` speculative rounds in one loop (``decode.run_steps``; no host round trip inside); ``windows`` as for
    ``decode.decode_chunk`` (a round writes at most k + 1 slots past a row's length)."""
    full = spec.decode.caches
    windowed = dataclasses.replace(spec, decode=dataclasses.replace(spec.decode, caches=window_caches(full, windows)))
    spec = run_steps(plan, lambda s: spec_round(plan, k, drafter, params, weights, seed, s), windowed, rounds,
                     lambda s: s.decode.done)
    if windows:
        spec = dataclasses.replace(spec, decode=dataclasses.replace(
            spec.decode, caches=unwindow_caches(full, spec.decode.caches)))
    return spec

"""Scoring on the host side: rendered (prompt, response) pairs in fixed-size batches through
``decode.score_batch`` (teacher forcing: one forward per model over prompt + response, no sampling).

Pairs are grouped longest first (prompt + response) so that similar lengths share a batch; each model's sequences are
left-padded to the next of 16, 24, 32, 48, 64, ... and responses to the next of 8, 12, 16, 24, 32, ...
(``prompts.prompt_bucket``: at most a third is padding), so a job compiles a few programs. A short last
batch repeats its first pair (the copies' outputs are dropped).

On a mesh that spans processes each process scores its own pairs in the rows of a batch it owns
(``lockstep.Peers``); the number of batches and each batch's padded lengths are agreed over the processes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np

from eft_jax import decode
from eft_jax.prompts import left_pad, prompt_bucket
from eft_jax.requests import Rendered
from eft_jax.results import ScoreResult
from eft_jax.lockstep import Peers


def score_pairs(plan: decode.Plan, params: tuple[Any, ...], peers: Peers, labels: Sequence[str],
                pairs: Sequence[Rendered], batch_size: int, weights: jax.Array) -> Iterator[list[ScoreResult]]:
    """Score ``pairs`` (``Rendered`` with ``response`` set, tokens for each model of ``plan``), yielding
    each batch's results (``index``: the pair's position in ``pairs``). ``labels``: the rule members' names
    for ``component_logprobs``."""
    order = sorted(range(len(pairs)), key=lambda i: (-max(len(t) for t in pairs[i].tokens) - len(pairs[i].response), i))
    owned = np.flatnonzero(peers.owned(batch_size))  # the rows of a batch this process fills
    batches = int(peers.ints([-(-len(order) // len(owned))]).max())
    for b in range(batches):
        batch = order[b * len(owned): (b + 1) * len(owned)]
        yield _score_batch(plan, params, peers, labels, pairs, batch, owned, batch_size, weights)


def _score_batch(plan: decode.Plan, params: tuple[Any, ...], peers: Peers, labels: Sequence[str],
                 pairs: Sequence[Rendered], batch: list[int], owned: np.ndarray, batch_size: int,
                 weights: jax.Array) -> list[ScoreResult]:
    # A process with no pair left fills its rows with a one-token stand-in (its outputs are dropped).
    filler = pairs[batch[0]] if batch else Rendered("", ((plan.pad_id,),) * len(plan.configs), 1, 0,
                                                   response=(plan.pad_id,))
    rows = [filler] * batch_size
    for position, i in zip(owned, batch, strict=False):
        rows[position] = pairs[i]
    # Lengths padded alike on every process: the longest of the batch's rows on any of them.
    longest = peers.ints([max(len(r.response) for r in rows),
                          *(max(len(r.tokens[m]) + len(r.response) for r in rows) for m in range(len(plan.configs)))
                          ]).max(0)
    # Padded to the grid 8, 12, 16, 24, 32, 48, ... (at most a third is padding; few programs).
    resp_len = prompt_bucket(int(longest[0]), minimum=8)
    place = peers.place
    tokens, positions, predict_at = [], [], []
    for m in range(len(plan.configs)):
        seqs = [list(r.tokens[m]) + list(r.response) for r in rows]
        length = prompt_bucket(int(longest[1 + m]))
        t, p = left_pad(seqs, length, plan.pad_id)
        # Left padding puts each response at the end: token j is predicted at length - r - 1 + j.
        at = np.zeros((len(rows), resp_len), np.int32)
        for b, r in enumerate(rows):
            n = len(r.response)
            at[b, :n] = length - n - 1 + np.arange(n)
        tokens.append(place.rows(t))
        positions.append(place.rows(p))
        predict_at.append(place.rows(at))
    target = np.full((len(rows), resp_len), plan.pad_id, np.int32)
    for b, r in enumerate(rows):
        target[b, : len(r.response)] = r.response
    eft, comps = decode.score_batch(plan, params, tuple(tokens), tuple(positions), tuple(predict_at),
                                    place.rows(target), weights)
    eft, comps = peers.local(eft), peers.local(comps)
    out = []
    for b, i in zip(owned, batch, strict=False):
        n = len(pairs[i].response)
        lps = eft[b, :n].astype(float).tolist()
        out.append(ScoreResult(
            index=i, tokens=list(pairs[i].response), token_logprobs=lps, logprob=float(sum(lps)),
            component_logprobs={label: comps[m, b, :n].astype(float).tolist() for m, label in enumerate(labels)},
        ))
    return out

"""What the engine gives back: a sample (``GenerationResult``), a scored pair (``ScoreResult``), and the
per-chunk ``Update`` that ``Engine.run`` yields while it decodes."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np


@dataclasses.dataclass
class GenerationResult:
    """One sample. ``tokens`` include the stop token when ``finish_reason == "stop"``; ``text`` does not (nor
    a stop string: ``tokens`` then end with the token that completed it).

    ``logprob`` is the sum of ``token_logprobs``: each sampled token's log-prob under the EFT
    distribution (temperature 1, before logit_bias, min_tokens, penalties and top-k/top-p/min-p, after the
    conservative base nucleus and with the request's reward weights; see ``eft_jax.sampling``).
    ``component_logprobs`` maps each model's role to its per-token log-probs (on request); their
    difference ft - ref is the per-token implicit reward. ``error`` is set (and nothing else) for a
    prompt that could not be run.

    Per-step analysis (``Engine.run(top_logprobs=K)``, computed on device): ``top_ids[j]`` are the K most likely
    ids of step j's EFT distribution (the one ``token_logprobs`` reports), in descending order of log-prob, the
    lower id first among equal values; ``top_logprobs[j]`` their EFT log-probs; ``top_component_logprobs`` maps
    each model's role (as ``component_logprobs``) to their log-probs under that model ([tokens, K] each).
    ``distributions`` (``return_distributions``) holds every step's whole EFT distribution (tests, analysis).
    """

    index: int
    prompt: Any
    tokens: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    finish_reason: Literal["stop", "length", "error"] = "length"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it (vLLM's name)
    logprob: float = 0.0
    token_logprobs: list[float] = dataclasses.field(default_factory=list)
    component_logprobs: dict[str, list[float]] | None = None
    error: str | None = None
    distributions: np.ndarray | None = None  # [tokens, vocab] EFT log-probs per step, on request
    top_ids: np.ndarray | None = None  # [tokens, K] int32, on request (top_logprobs=K)
    top_logprobs: np.ndarray | None = None  # [tokens, K] float32 EFT log-probs of top_ids
    top_component_logprobs: dict[str, np.ndarray] | None = None  # role label -> [tokens, K] log-probs of top_ids
    speculative: SpeculativeStats | None = None


@dataclasses.dataclass
class SpeculativeStats:
    """Per-sample speculative accounting, counted over the emitted tokens.

    ``drafted``: k per round; ``accepted``: drafts emitted; ``rejected``: rounds whose drafts stopped at a
    rejection (a corrected token was emitted after fewer than k drafts). Drafts after a rejection are
    never tested, so the per-draft acceptance probability (the "a" of the speculative decoding
    literature: expected tokens per round (1 - a^(k+1)) / (1 - a)) is accepted / (accepted + rejected),
    not accepted / drafted. ``from_draft[i]``: token i was an accepted draft; ``round_of[i]``: the round
    that emitted it (0 = the first token, sampled at prefill).
    """

    rounds: int
    drafted: int
    accepted: int
    rejected: int
    from_draft: list[bool]
    round_of: list[int]

    @property
    def acceptance_rate(self) -> float:
        """Estimated probability that a draft is accepted: accepted / (accepted + rejected)."""
        tested = self.accepted + self.rejected
        return self.accepted / tested if tested else 0.0

    @property
    def tokens_per_round(self) -> float:
        return sum(1 for r in self.round_of if r > 0) / self.rounds if self.rounds else 0.0


@dataclasses.dataclass
class ScoreResult:
    """EFT log-likelihood of a response given its prompt: per token and summed, plus per model."""

    index: int
    tokens: list[int] = dataclasses.field(default_factory=list)
    token_logprobs: list[float] = dataclasses.field(default_factory=list)
    logprob: float = 0.0
    component_logprobs: dict[str, list[float]] | None = None
    error: str | None = None


@dataclasses.dataclass
class Update:
    """What one decode chunk produced: the samples that finished in it (any order), and the tokens decoded
    in it over every row, finished or not (for progress: a long batch reports before its rows finish)."""

    finished: list[GenerationResult]
    tokens: int

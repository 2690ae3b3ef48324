"""An independent EFT reference: full, cache-free transformers forwards + the formula in numpy."""

from __future__ import annotations

import numpy as np
import torch


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def next_token_logprobs(torch_model, tokens: list[int], vocab: int) -> np.ndarray:
    """log p(next | tokens) from one full forward, over the first ``vocab`` ids."""
    with torch.no_grad():
        logits = torch_model(torch.tensor([tokens])).logits[0, -1].double().numpy()
    return log_softmax(logits[:vocab])


def next_token_logprobs_batch(torch_model, sequences: list[list[int]], vocab: int) -> np.ndarray:
    """``next_token_logprobs`` of several sequences of one length, in one forward: [len(sequences), vocab]."""
    with torch.no_grad():
        logits = torch_model(torch.tensor(sequences)).logits[:, -1].double().numpy()
    return np.stack([log_softmax(row[:vocab]) for row in logits])


def nucleus(lp: np.ndarray, p: float) -> np.ndarray:
    """Boolean mask of the smallest highest-probability set with mass >= p (ties at the edge kept)."""
    probs = np.exp(lp)
    order = np.argsort(-probs, kind="stable")
    before = np.concatenate([[0.0], np.cumsum(probs[order])[:-1]])
    count = max(1, int((before < p).sum()))
    return probs >= probs[order[count - 1]]


def eft_reference(base: np.ndarray, ref: np.ndarray | None, fts: list[np.ndarray], weights: list[float],
                  base_top_p: float | None = None) -> np.ndarray:
    """Normalised EFT log-probs from per-model normalised log-probs (float64)."""
    out = base.copy()
    for ft, w in zip(fts, weights):
        out = out + w * (ft - ref)
    if base_top_p is not None:
        out = np.where(nucleus(base, base_top_p), out, -np.inf)
    return log_softmax(out)


def filtered(lp: np.ndarray, temperature: float = 1.0, top_p: float = 1.0) -> np.ndarray:
    """Probabilities after temperature then top-p (the sampler's documented order)."""
    lp = log_softmax(lp / temperature)
    if top_p < 1.0:
        lp = np.where(nucleus(lp, top_p), lp, -np.inf)
    p = np.exp(lp - lp.max())
    return p / p.sum()

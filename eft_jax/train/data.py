"""Token datasets for training and their deterministic batch order.

A dataset is two arrays ``tokens [rows, seq]`` and ``loss_mask [rows, seq]`` (1 where the token is a
training target, i.e. its prediction from the previous token is scored). Pretraining rows are packed
documents with the mask on every token; supervised fine-tuning rows are right-padded chats with the
mask on the response. The rows of step ``s`` depend only on (seed, s): a resumed run reads exactly
the batches the uninterrupted run would have read, without any saved iterator state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Int


@dataclasses.dataclass(frozen=True, eq=False)
class TokenDataset:
    """``tokens`` and ``loss_mask``, both int32 ``[rows, seq]``."""

    tokens: Int[np.ndarray, "rows seq"]
    loss_mask: Int[np.ndarray, "rows seq"]

    def __post_init__(self) -> None:
        if self.tokens.ndim != 2 or self.tokens.shape != self.loss_mask.shape:
            raise ValueError(f"tokens {self.tokens.shape} and loss_mask {self.loss_mask.shape} must be equal [rows, seq]")
        if len(self.tokens) == 0:
            raise ValueError("empty dataset")
        if not self.loss_mask[:, 1:].any():
            raise ValueError("the loss mask selects no target token")

    @classmethod
    def pretraining(cls, tokens: np.ndarray) -> TokenDataset:
        """Packed rows, every token a target."""
        tokens = np.asarray(tokens, np.int32)
        return cls(tokens, np.ones_like(tokens))

    @property
    def num_rows(self) -> int:
        return len(self.tokens)

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def fingerprint(self) -> str:
        """A hash of the contents (a resumed run refuses a different dataset)."""
        h = hashlib.sha256()
        for a in (self.tokens, self.loss_mask):
            h.update(str(a.shape).encode())
            h.update(np.ascontiguousarray(a, np.int32).tobytes())
        return h.hexdigest()[:16]

    def batch_rows(self, step: int, batch_size: int, seed: int) -> np.ndarray:
        """Row indices of batch ``step``: epoch-wise permutations of the rows, seeded by (seed, epoch)."""
        start = step * batch_size
        out = np.empty(batch_size, np.int64)
        filled = 0
        while filled < batch_size:
            epoch, offset = divmod(start + filled, self.num_rows)
            take = min(batch_size - filled, self.num_rows - offset)
            perm = np.random.default_rng([seed, epoch]).permutation(self.num_rows)
            out[filled : filled + take] = perm[offset : offset + take]
            filled += take
        return out

    def batch(self, step: int, batch_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self.batch_rows(step, batch_size, seed)
        return self.tokens[rows], self.loss_mask[rows]

    def save(self, path: str | os.PathLike) -> None:
        np.savez_compressed(path, tokens=self.tokens, loss_mask=self.loss_mask)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TokenDataset:
        with np.load(path) as f:
            return cls(f["tokens"].astype(np.int32), f["loss_mask"].astype(np.int32))


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
    return out


def text_dataset(tokenizer: Any, texts: Sequence[str], seq_len: int) -> TokenDataset:
    """Pretraining rows: ``<s> text </s>`` per text, concatenated and cut into ``seq_len`` rows."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    stream = np.fromiter(
        (t for doc in ids for t in ([bos] if bos is not None else []) + list(doc) + ([eos] if eos is not None else [])),
        np.int32,
    )
    rows = len(stream) // seq_len
    if rows == 0:
        raise ValueError(f"{len(stream)} tokens do not fill one row of {seq_len}")
    return TokenDataset.pretraining(stream[: rows * seq_len].reshape(rows, seq_len))


def _ids(x: Any) -> list[int]:
    if isinstance(x, dict) or hasattr(x, "input_ids"):
        x = x["input_ids"]
    return [int(t) for t in x]


def chat_example(tokenizer: Any, messages: Sequence[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of a conversation (chat template) and its loss mask: 1 on the last assistant reply
    (including the end-of-turn tokens the template adds after it)."""
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("a chat example must end with an assistant message")
    prefix = _ids(tokenizer.apply_chat_template(list(messages[:-1]), add_generation_prompt=True))
    full = _ids(tokenizer.apply_chat_template(list(messages)))
    if full[: len(prefix)] != prefix:
        raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
    return full, [0] * len(prefix) + [1] * (len(full) - len(prefix))


def chat_dataset(tokenizer: Any, conversations: Sequence[Sequence[dict[str, str]]], seq_len: int) -> TokenDataset:
    """Supervised fine-tuning rows: right-padded chats, loss on the final assistant reply."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokens = np.full((len(conversations), seq_len), pad, np.int32)
    mask = np.zeros((len(conversations), seq_len), np.int32)
    for i, messages in enumerate(conversations):
        ids, m = chat_example(tokenizer, messages)
        if len(ids) > seq_len:
            raise ValueError(f"conversation {i} has {len(ids)} tokens, more than seq_len={seq_len}")
        tokens[i, : len(ids)] = ids
        mask[i, : len(ids)] = m
    return TokenDataset(tokens, mask)


def jsonl_dataset(tokenizer: Any, path: str | os.PathLike, seq_len: int) -> TokenDataset:
    """A JSONL file of ``{"text": ...}`` records (pretraining) or of ``{"messages": [...]}`` /
    ``{"prompt": ..., "response": ...}`` records (supervised fine-tuning)."""
    records = read_jsonl(path)
    if not records:
        raise ValueError(f"{path}: no records")
    if all("text" in r for r in records):
        return text_dataset(tokenizer, [r["text"] for r in records], seq_len)
    convs = []
    for n, r in enumerate(records, 1):
        if "messages" in r:
            convs.append(r["messages"])
        elif "prompt" in r and "response" in r:
            convs.append([{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}])
        else:
            raise ValueError(f"{Path(path)} record {n}: expected 'text', 'messages' or 'prompt' + 'response'")
    return chat_dataset(tokenizer, convs, seq_len)

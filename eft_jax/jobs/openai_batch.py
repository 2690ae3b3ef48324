"""OpenAI Batch JSONL (the format of the OpenAI Batch API and ``vllm run-batch``): its input lines, and the
output lines built from eft-jax's results. The job machinery (resume, loss-free appends, input order) is
``records`` and ``runner``'s, shared with the native format; this module only translates.

Input line::

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions",
     "body": {"model": ..., "messages": [...] | "prompt": "...", "max_tokens" | "max_completion_tokens": 64,
              "n": 2, "seed": 7, "stop": "..." | [...], "logprobs": ..., "top_logprobs": ...,
              "temperature": ..., "top_p": ..., "eft": {"weights": [...]}}}

Honoured per line: the prompt, ``max_tokens`` / ``max_completion_tokens``, ``n``, ``seed``, ``stop`` (added to the
config's ``sampling.stop``), ``logprobs`` / ``top_logprobs``, ``eft.weights`` (per-request reward weights) and the
per-request sampling settings (:data:`SAMPLING_FIELDS`, default: the config's ``sampling``): OpenAI's
``temperature``, ``top_p``, ``logit_bias``, ``presence_penalty``, ``frequency_penalty`` and vLLM's extensions
``top_k`` (-1: off), ``min_p``, ``min_tokens``, ``ignore_eos``, ``repetition_penalty``; checked with
``sampling.check_setting`` / ``check_logit_bias``. Lines with different settings run in one batch (the values are
per row). Fields eft-jax does not implement (tools, streaming, ...) are accepted at their neutral value and
refused otherwise; unknown body fields are refused. Nothing is silently ignored
but ``model``, ``user`` and ``metadata`` (echoed or informational).

Output line (one per input line, all ``n`` choices together)::

    {"id": "batch_req_...", "custom_id": "q1",
     "response": {"status_code": 200, "request_id": "req_...", "body": <chat.completion | text_completion>},
     "error": null}

The body is OpenAI's object (``id``, ``object``, ``created``, ``model``, ``choices``, ``usage``) plus ``"eft"``: the
job's fingerprint, a digest of the input body (to notice a changed line on resume), each model's rendered prompt
length, and per choice the summed EFT log-prob, each model's summed log-prob (by role: base, ref, ft0, ...), the
implicit reward ``log p_ft - log p_ref`` per fine-tune, and the stop string that ended it; with ``top_logprobs``
(chat) / ``logprobs: k`` (completions), per text token the same alternatives as OpenAI's ``top_logprobs`` with each
model's log-prob of them (``eft.choices[i].top_logprobs``, see :func:`top_entries`). A line that cannot run
gets ``{"id", "custom_id", "response": null, "error": {"code", "message"}}`` (and an entry in the errors file).

Ids and ``created`` are deterministic (a hash of the fingerprint and custom_id; the input file's modification
time), so a resumed job writes the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
_URLS = (CHAT_URL, COMPLETIONS_URL)
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat top_logprobs (and what we allow for completions' logprobs)

# Per-request sampling settings of a line (native field or OpenAI body field of the same name).
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "min_tokens", "ignore_eos", "logit_bias",
                   "repetition_penalty", "presence_penalty", "frequency_penalty")
# Features eft-jax does not implement, with their neutral value (accepted; anything else is refused).
_NEUTRAL: dict[str, Any] = {
    "stream": False,
    "echo": False, "suffix": "", "tools": [], "tool_choice": "none",
    "parallel_tool_calls": None, "response_format": {"type": "text"}, "stream_options": None,
    "best_of": 1, "modalities": ["text"], "service_tier": "auto", "store": False,
}
_INFORMATIONAL = ("model", "user", "metadata")
_HONOURED = ("messages", "prompt", "max_tokens", "max_completion_tokens", "n", "seed", "stop", "logprobs",
             "top_logprobs", "eft", *SAMPLING_FIELDS)


class LineProblem(Exception):
    """An input line that cannot run: ``kind`` (the errors file's and the output's error code) and why."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclasses.dataclass(frozen=True)
class JobDefaults:
    """What a line is checked against: the number of fine-tuned models (the length of ``eft.weights``). The
    job's filters (after generation_config defaults) are informational: a line's own settings override them."""

    temperature: float
    top_p: float
    top_k: int
    min_p: float
    fine_tuned: int


@dataclasses.dataclass(frozen=True)
class OpenAIRequest:
    """The OpenAI-specific part of one input line (the rest is a ``records.Request``).

    chat: ``/v1/chat/completions`` (else ``/v1/completions``). logprobs: return per-token log-probs.
    top_logprobs: that many alternatives per token (needs every step's distribution). digest: sha256 of the
    body, recorded in the output to notice a line changed since (resume keeps the old output).
    """

    custom_id: str
    chat: bool
    model: str | None
    logprobs: bool
    top_logprobs: int
    digest: str


@dataclasses.dataclass(frozen=True)
class ParsedLine:
    """An OpenAI line turned into what a native line holds."""

    api: OpenAIRequest
    prompt: Any
    max_new_tokens: int | None
    n: int | None
    seed: int | None
    stop: tuple[str, ...]
    weights: tuple[float, ...] | None
    sampling: dict[str, Any] = dataclasses.field(default_factory=dict)


def sampling_fields(obj: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The per-request sampling settings a line gives (``SAMPLING_FIELDS``), checked with the one table of allowed
    values (``sampling.check_setting``, ``check_logit_bias``); ``prefix`` names the field in a message ("field "
    for native lines, "body." for OpenAI ones). ``top_k`` -1 (vLLM's "off") becomes 0."""
    from eft_jax.sampling import check_logit_bias, check_setting

    out: dict[str, Any] = {}
    for name in SAMPLING_FIELDS:
        value = obj.get(name)
        if value is None:
            continue
        if name == "top_k" and value == -1 and not isinstance(value, bool):
            value = 0
        try:
            out[name] = check_logit_bias(value) if name == "logit_bias" else check_setting(name, value)
        except ValueError as e:
            where = f"field {name!r}" if prefix == "field " else f"{prefix}{name}"
            raise LineProblem("invalid_field", f"{where} {e}") from None
    return out


def is_openai_line(obj: Any) -> bool:
    """Whether a parsed JSON line is in the OpenAI Batch shape (has ``custom_id``, or ``url`` and ``body``)."""
    return isinstance(obj, dict) and ("custom_id" in obj or ("url" in obj and "body" in obj))


def parse_line(obj: dict[str, Any], defaults: JobDefaults) -> ParsedLine:
    """Check one OpenAI Batch line; LineProblem says what is wrong and what to do."""
    custom_id = obj.get("custom_id")
    if custom_id is None:
        raise LineProblem("missing_field", "missing field 'custom_id'")
    if not isinstance(custom_id, str) or not custom_id:
        raise LineProblem("invalid_field", f"field 'custom_id' must be a non-empty string, got {custom_id!r}")
    unknown = sorted(set(obj) - {"custom_id", "method", "url", "body"})
    if unknown:
        raise LineProblem("invalid_field", f"unknown field(s) {unknown}; an OpenAI Batch line has custom_id, method, "
                          "url and body")
    if obj.get("method", "POST") != "POST":
        raise LineProblem("invalid_field", f"field 'method' must be \"POST\", got {obj.get('method')!r}")
    url = obj.get("url")
    if url not in _URLS:
        raise LineProblem("invalid_field", f"field 'url' must be {CHAT_URL!r} or {COMPLETIONS_URL!r}, got {url!r}")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise LineProblem("missing_field" if body is None else "invalid_field", "field 'body' must be a JSON object "
                          "(the request: messages or prompt, max_tokens, ...)")
    body = {k: v for k, v in body.items() if v is not None}  # null means "not given", as in OpenAI's API
    chat = url == CHAT_URL
    _check_fields(body, defaults)
    prompt = _chat_prompt(body) if chat else _completion_prompt(body)
    logprobs, top = _logprobs(body, chat)
    model = body.get("model")
    digest = hashlib.sha256(json.dumps([url, body], sort_keys=True, ensure_ascii=False)
                            .encode("utf-8", "backslashreplace")).hexdigest()[:16]
    return ParsedLine(
        api=OpenAIRequest(custom_id, chat, model if isinstance(model, str) else None, logprobs, top, digest),
        prompt=prompt, max_new_tokens=_max_tokens(body), n=_int(body, "n", 1), seed=_int(body, "seed", 0),
        stop=stop_strings(body.get("stop"), "body.stop"), weights=_eft_weights(body.get("eft"), defaults.fine_tuned),
        sampling=sampling_fields(body, "body."),
    )


def _check_fields(body: dict[str, Any], defaults: JobDefaults) -> None:
    for name, neutral in _NEUTRAL.items():
        if name in body and body[name] != neutral and not (name == "best_of" and body[name] == body.get("n", 1)):
            raise LineProblem("unsupported_field", f"body.{name}={body[name]!r} is not supported by eft-jax (only "
                              f"{json.dumps(neutral)} is accepted); drop it from the line")
    unknown = sorted(set(body) - set(_NEUTRAL) - set(_INFORMATIONAL) - set(_HONOURED))
    if unknown:
        raise LineProblem("unsupported_field", f"unknown body field(s) {unknown}; eft-jax honours "
                          f"{', '.join(_HONOURED)}")


def _chat_prompt(body: dict[str, Any]) -> list[dict[str, str]]:
    if "prompt" in body:
        raise LineProblem("invalid_field", f"body.prompt belongs to {COMPLETIONS_URL}; a chat request has 'messages'")
    messages = body.get("messages")
    if messages is None:
        raise LineProblem("missing_field", "missing field 'body.messages' (a list of {'role', 'content'})")
    if not isinstance(messages, list):
        raise LineProblem("invalid_field", f"body.messages must be a list of {{'role', 'content'}} objects, got "
                          f"{type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise LineProblem("invalid_field", f"body.messages[{i}] must be an object with a string 'role'")
        out.append({"role": m["role"], "content": _content(m.get("content"), i)})
    return out


def _content(content: Any, i: int) -> str:
    """A message's content: a string, or a list of text parts (joined); other parts are refused."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        kinds = {p.get("type") for p in content}
        if kinds <= {"text"} and all(isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
        raise LineProblem("unsupported_field", f"body.messages[{i}].content has part types {sorted(map(str, kinds))}; "
                          "eft-jax reads text parts only ({'type': 'text', 'text': ...})")
    raise LineProblem("invalid_field", f"body.messages[{i}].content must be a string or a list of text parts")


def _completion_prompt(body: dict[str, Any]) -> str:
    if "messages" in body:
        raise LineProblem("invalid_field", f"body.messages belongs to {CHAT_URL}; a completion request has 'prompt'")
    prompt = body.get("prompt")
    if prompt is None:
        raise LineProblem("missing_field", "missing field 'body.prompt' (a string)")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if not isinstance(prompt, str):
        raise LineProblem("invalid_field", "body.prompt must be one string (token ids and lists of prompts are not "
                          "supported: put each prompt on its own line)")
    return prompt


def _int(body: dict[str, Any], name: str, lo: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or v >= 2**63:
        raise LineProblem("invalid_field", f"body.{name} must be an integer >= {lo}, got {v!r}")
    return v


def _max_tokens(body: dict[str, Any]) -> int | None:
    a, b = _int(body, "max_tokens", 1), _int(body, "max_completion_tokens", 1)
    if a is not None and b is not None and a != b:
        raise LineProblem("invalid_field", f"body.max_tokens={a} and body.max_completion_tokens={b} disagree; give one")
    return a if a is not None else b


def stop_strings(v: Any, field: str) -> tuple[str, ...]:
    """A line's stop strings (``field`` names it in the message): a non-empty string or a list of them."""
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or any(not isinstance(s, str) or not s for s in stops):
        raise LineProblem("invalid_field", f"{field} must be a non-empty string or a list of them, got {v!r}")
    return tuple(stops)


def _logprobs(body: dict[str, Any], chat: bool) -> tuple[bool, int]:
    v = body.get("logprobs")
    if chat:
        if v is not None and not isinstance(v, bool):
            raise LineProblem("invalid_field", f"body.logprobs must be true or false for {CHAT_URL}, got {v!r}")
        top = body.get("top_logprobs", 0)
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise LineProblem("invalid_field", f"body.top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], "
                              f"got {top!r}")
        if top and not v:
            raise LineProblem("invalid_field", "body.top_logprobs needs body.logprobs=true")
        return bool(v), top
    if "top_logprobs" in body:
        raise LineProblem("invalid_field", f"body.top_logprobs belongs to {CHAT_URL}; for {COMPLETIONS_URL}, "
                          "logprobs is the number of alternatives")
    if v is None:
        return False, 0
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_TOP_LOGPROBS:
        raise LineProblem("invalid_field", f"body.logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}] for "
                          f"{COMPLETIONS_URL}, got {v!r}")
    return True, v


def _eft_weights(eft: Any, fine_tuned: int) -> tuple[float, ...] | None:
    if eft is None:
        return None
    if not isinstance(eft, dict) or set(eft) - {"weights"}:
        raise LineProblem("invalid_field", f"body.eft must be {{\"weights\": [...]}}, got {eft!r}")
    return reward_weights(eft.get("weights"), fine_tuned, "body.eft.weights")


def reward_weights(w: Any, fine_tuned: int | None, field: str) -> tuple[float, ...] | None:
    """A line's reward weights (None: the config's): finite numbers, one per fine-tune (unchecked for None)."""
    if w is None:
        return None
    if (not isinstance(w, list) or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x)
                                       for x in w)):
        raise LineProblem("invalid_field", f"{field} must be a list of numbers, got {w!r}")
    if fine_tuned is not None and len(w) != fine_tuned:
        raise LineProblem("invalid_field", f"{field} has {len(w)} weight(s), but the config has {fine_tuned} "
                          "fine-tuned model(s) (eft.fine_tuned): give one weight per fine-tune")
    return tuple(float(x) for x in w)


# --- Output lines -----------------------------------------------------------------------------------------


def _hex(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode("utf-8", "backslashreplace")).hexdigest()[:24]


def error_line(custom_id: Any, code: str, message: str) -> dict[str, Any]:
    """The output line of an input line that cannot run (OpenAI's error shape)."""
    return {"id": f"batch_req_{_hex('error', custom_id, code, message)}", "custom_id": custom_id,
            "response": None, "error": {"code": code, "message": message}}


def error_key(record: Mapping[str, Any]) -> str | None:
    """For an error output line, a key naming (custom_id, code, message); None for any other line."""
    if record.get("response") is None and isinstance(record.get("error"), dict):
        e = record["error"]
        return json.dumps([record.get("custom_id"), e.get("code"), e.get("message")], sort_keys=True)
    return None


@dataclasses.dataclass(frozen=True)
class Choice:
    """One sample of a line, as the runner hands it over: the engine's result and what it ran with."""

    result: Any  # results.GenerationResult (component log-probs recorded)
    prompt_cut: int


@dataclasses.dataclass(frozen=True)
class ResponseContext:
    """What every output line of a job shares. roles: (role, model name, engine label) in engine order;
    ref_label: the reference's engine label (None: plain decoding). prompt_models: the engine label of each
    rendered prompt (``Rendered.tokens``' order). tokenizer: any of the models' (they share the vocabulary)."""

    fingerprint: str
    created: int
    default_model: str
    roles: tuple[tuple[str, str, str], ...]
    ref_label: str | None
    prompt_models: tuple[str, ...]
    tokenizer: Any


def response_line(ctx: ResponseContext, api: OpenAIRequest, prompt_tokens: Sequence[int],
                  choices: Sequence[Choice], weights: Sequence[float] | None) -> dict[str, Any]:
    """The output line of a line whose ``n`` samples are done (``choices`` in sample order)."""
    body_id = ("chatcmpl-" if api.chat else "cmpl-") + _hex(ctx.fingerprint, api.custom_id, api.digest)
    out_choices, extras = [], []
    completion_tokens = 0
    for k, c in enumerate(choices):
        r = c.result
        completion_tokens += len(r.tokens)
        text_tokens = r.tokens[:-1] if (r.finish_reason == "stop" and r.stop_reason is not None
                                        and not isinstance(r.stop_reason, str)) else r.tokens
        finish = "stop" if r.finish_reason == "stop" else "length"
        logprobs = _choice_logprobs(ctx, api, r, len(text_tokens)) if api.logprobs else None
        if api.chat:
            out_choices.append({"index": k, "message": {"role": "assistant", "content": r.text, "refusal": None},
                                "finish_reason": finish, "logprobs": logprobs})
        else:
            out_choices.append({"index": k, "text": r.text, "finish_reason": finish, "logprobs": logprobs})
        extras.append(_choice_extras(ctx, k, r))
        if api.logprobs and api.top_logprobs:  # each alternative's log-prob under every model, by role
            roles = [(role, label) for role, _, label in ctx.roles]
            extras[-1]["top_logprobs"] = [top_entries(ctx.tokenizer, roles, r, j, api.top_logprobs)
                                          for j in range(len(text_tokens))]
    prompt = max(prompt_tokens)
    eft: dict[str, Any] = {
        "fingerprint": ctx.fingerprint, "input_sha256": api.digest,
        "prompt_tokens": dict(zip(ctx.prompt_models, prompt_tokens, strict=True)),
        "prompt_truncated": any(c.prompt_cut > 0 for c in choices), "choices": extras,
    }
    if weights is not None:
        eft["weights"] = list(weights)
    body = {"id": body_id, "object": "chat.completion" if api.chat else "text_completion", "created": ctx.created,
            "model": api.model or ctx.default_model, "choices": out_choices,
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                      "total_tokens": prompt + completion_tokens},
            "eft": eft}
    return {"id": f"batch_req_{_hex('line', ctx.fingerprint, api.custom_id)}", "custom_id": api.custom_id,
            "response": {"status_code": 200, "request_id": f"req_{_hex('request', ctx.fingerprint, api.custom_id)}",
                         "body": body},
            "error": None}


def _choice_extras(ctx: ResponseContext, k: int, r: Any) -> dict[str, Any]:
    comps = r.component_logprobs or {}
    per_role = {role: float(sum(comps[label])) for role, _, label in ctx.roles if label in comps}
    extra: dict[str, Any] = {"index": k, "tokens": len(r.tokens), "logprob": r.logprob, "logprobs": per_role}
    if ctx.ref_label is not None and ctx.ref_label in comps:
        ref = comps[ctx.ref_label]
        extra["reward"] = {name: float(sum(a - b for a, b in zip(comps[label], ref, strict=True)))
                           for role, name, label in ctx.roles if role.startswith("ft")}
    if isinstance(r.stop_reason, str):
        extra["stop"] = r.stop_reason
    if r.speculative is not None:
        s = r.speculative
        extra["speculative"] = {"rounds": s.rounds, "drafted": s.drafted, "accepted": s.accepted,
                                "rejected": s.rejected}
    return extra


def token_text(tokenizer: Any, token: int) -> str:
    """One token's text, special tokens spelled out."""
    return tokenizer.decode([int(token)], skip_special_tokens=False)



def _byte_level_table() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2 and its descendants): printable Latin-1 bytes stand for themselves, the
    other bytes for chr(256 + n), in byte order. Maps each character back to its byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in set(printable)]
    table.update({chr(256 + n): b for n, b in enumerate(others)})
    return table


_BYTE_LEVEL = _byte_level_table()


def _token_bytes(tokenizer: Any, token: int, text: str) -> list[int] | None:
    """A token's raw bytes (OpenAI's ``bytes``): its text's UTF-8, or - for a token that is part of a UTF-8
    character (its text decodes to U+FFFD) - the byte it stands for in a SentencePiece ``<0xHH>`` or a byte-level
    BPE vocabulary; None when neither says."""
    if "\ufffd" not in text:
        return list(text.encode("utf-8", "backslashreplace"))
    piece = tokenizer.convert_ids_to_tokens(int(token))
    if not isinstance(piece, str):
        return None
    m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
    if m:
        return [int(m.group(1), 16)]
    if piece and all(c in _BYTE_LEVEL for c in piece):
        return [_BYTE_LEVEL[c] for c in piece]
    return None


def top_entries(tokenizer: Any, roles: Sequence[tuple[str, str]], r: Any, j: int, k: int) -> list[dict[str, Any]]:
    """Step ``j``'s ``k`` most likely tokens of the reported EFT distribution (``GenerationResult.top_ids``, in
    descending order, the lower id first among equal log-probs), each as ``{"id": token id, "token": its text,
    "logprob": its EFT log-prob, "logprobs": {role: its log-prob under that model}}`` (``roles``: (role, engine
    label) pairs, e.g. ``("base", "base=large")``; the key ``logprobs`` by role as in ``eft.choices[i]``)."""
    per_model = r.top_component_logprobs or {}
    out = []
    for i in range(min(k, r.top_ids.shape[1])):
        token = int(r.top_ids[j, i])
        out.append({"id": token, "token": token_text(tokenizer, token), "logprob": float(r.top_logprobs[j, i]),
                    "logprobs": {role: float(per_model[label][j, i]) for role, label in roles if label in per_model}})
    return out


def _choice_logprobs(ctx: ResponseContext, api: OpenAIRequest, r: Any, count: int) -> dict[str, Any]:
    """OpenAI's logprobs object over the first ``count`` tokens (those of the text): the EFT log-probs at
    temperature 1, before logit_bias, penalties and the filters (as ``GenerationResult.token_logprobs``)."""
    tok = ctx.tokenizer
    ids = [int(t) for t in r.tokens[:count]]
    tokens = [token_text(tok, t) for t in ids]
    lps = [float(x) for x in r.token_logprobs[:count]]
    tops: list[list[tuple[int, float]]] = [[] for _ in range(count)]
    if api.top_logprobs:  # computed on device (GenerationResult.top_ids), the run's K >= this line's
        for i in range(count):
            tops[i] = [(int(t), float(v)) for t, v in zip(r.top_ids[i, : api.top_logprobs],
                                                          r.top_logprobs[i, : api.top_logprobs], strict=True)]
    if api.chat:
        def entry(token: int, lp: float) -> dict[str, Any]:
            text = token_text(tok, token)
            return {"token": text, "logprob": lp, "bytes": _token_bytes(tok, token, text)}

        return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in top]}
                            for t, lp, top in zip(ids, lps, tops, strict=True)], "refusal": None}
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": lps, "text_offset": offsets,
            "top_logprobs": [{token_text(tok, t): lp for t, lp in top} for top in tops] if api.top_logprobs else None}

"""JSONL in and out: input requests with per-line problems, the resumable output file, the errors file.

Two input formats, detected per file (a file mixing them is refused, naming a line of each): the native
lines documented in :func:`read_requests`, and OpenAI Batch lines (``custom_id``, ``url``, ``body``; see
``jobs.openai_batch``), whose output lines are in OpenAI's shape. Both share everything below.

Input lines are read leniently: a line that cannot be used (malformed JSON, a missing or wrong field, a
duplicate id, an empty prompt) becomes an :class:`Issue` with its line number, and the rest go on.

The output file is append-only while a job runs. Each batch is written with one ``write`` of whole
lines, then flushed and fsynced, so killing the job at any moment loses at most the batch in flight. On
resume, a partial last line (from a write cut short) is cut off, and the (id, sample) pairs already
present are skipped. When a job finishes, the file is rewritten in input order (a temporary file,
fsynced, then renamed over it), so an interruption during the rewrite leaves the old file whole.
With ``--overwrite`` the old output stays until the new job writes its first batch.

Shards (``--shard i/N``): a line belongs to shard ``shard_of(id, N)`` (sha256 of the id's JSON form, mod
N), so its shard never changes when the input grows; a line with no usable id is reported by shard 0.
Shard ``i/N`` of ``out.jsonl`` writes ``out.shard-i-of-N.jsonl`` (and ``out.shard-i-of-N.errors.jsonl``),
each line ending with ``"shard": "i/N"``; ``eft-jax merge`` (``jobs.merge``) strips it again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from eft_jax.jobs.openai_batch import (
    MAX_TOP_LOGPROBS, JobDefaults, LineProblem, OpenAIRequest, error_key, is_openai_line, parse_line, reward_weights,
    sampling_fields, stop_strings, token_text, top_entries,
)
from eft_jax.prompts import PromptError, validate_prompt

NATIVE, OPENAI = "native", "openai"  # the two input (and output) formats


class JobError(RuntimeError):
    """The job cannot start (or go on); the message says why and what to do."""


@dataclasses.dataclass
class Issue:
    """One problem with one input line (or one prompt at run time), for the errors file.

    action: "skipped" (nothing written for it), "truncated" (run with a shortened prompt) or "warning".
    """

    line: int | None
    id: Any
    kind: str
    message: str
    action: str = "skipped"

    def to_json(self) -> dict[str, Any]:
        return {"line": self.line, "id": self.id, "kind": self.kind, "action": self.action, "error": self.message}


@dataclasses.dataclass
class Request:
    """One valid input line. ``prompt`` is a string or a list of chat messages.

    stop: stop strings of this line (added to the config's). weights: this line's reward weights (None: the
    config's). response_prefix: text the response starts with (None: the config's ``job.response_prefix``).
    api: the OpenAI Batch part of an OpenAI line (its ``id`` is the ``custom_id``), None for a native line.
    sampling: the per-request sampling settings the line gives (``openai_batch.SAMPLING_FIELDS``, checked; the
    config's ``sampling`` gives the others). top_logprobs: a native line's per-step analysis, the k most likely
    tokens of every step with each model's log-prob (0: none; an OpenAI line's is ``api.top_logprobs``).
    """

    line: int
    id: str | int
    prompt: Any
    n: int | None = None
    max_new_tokens: int | None = None
    seed: int | None = None
    response: str | None = None  # score jobs only
    stop: tuple[str, ...] = ()
    weights: tuple[float, ...] | None = None
    response_prefix: str | None = None
    api: OpenAIRequest | None = None
    sampling: dict[str, Any] = dataclasses.field(default_factory=dict)
    top_logprobs: int = 0

    @property
    def key(self) -> str:
        return id_key(self.id)

    @property
    def recorded(self) -> Any:
        """What an output line records of its input line, to notice on resume that the line changed: the prompt
        (native), a digest of the request body (OpenAI)."""
        return self.api.digest if self.api is not None else self.prompt


def id_key(value: Any) -> str:
    """A hashable key for a JSON id (1 and "1" are different ids)."""
    return json.dumps(value, sort_keys=True)


@dataclasses.dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: the input lines whose id hashes to ``index`` (see :func:`shard_of`)."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"i/N"`` with 0 <= i < N; JobError otherwise."""
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not m:
            raise JobError(f"--shard {text}: expected i/N, e.g. --shard 0/4 for the first of 4 shards")
        index, count = int(m.group(1)), int(m.group(2))
        if count < 1:
            raise JobError(f"--shard {text}: the number of shards N must be at least 1")
        if index >= count:
            raise JobError(f"--shard {text}: the shard index i must be in 0..{count - 1} (0 <= i < N)")
        return cls(index, count)

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, ident: Any) -> bool:
        """Whether a line with this id (None: no usable id, reported by shard 0) belongs to this shard."""
        return (0 if ident is None else shard_of(ident, self.count)) == self.index

    def path(self, out: Path) -> Path:
        """``out.jsonl`` -> ``out.shard-i-of-N.jsonl``."""
        name = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
        return out.with_name(f"{name}.shard-{self.index}-of-{self.count}.jsonl")


def shard_of(ident: Any, count: int) -> int:
    """The shard (0..count-1) of an input line's id: sha256 of the id's JSON form (``id_key``), mod count.

    Depends on the id alone, so a line keeps its shard when lines are added to or removed from the input
    (1 and "1" are different ids and may fall in different shards)."""
    digest = hashlib.sha256(id_key(ident).encode("utf-8", "backslashreplace")).digest()
    return int.from_bytes(digest[:8], "big") % count


def select_shard(requests: list[Request], issues: list[Issue], shard: Shard | None
                 ) -> tuple[list[Request], list[Issue], int]:
    """The requests and issues of one shard (all of them for None), and how many input lines that is."""
    if shard is not None:
        requests = [r for r in requests if shard.owns(r.id)]
        issues = [i for i in issues if shard.owns(i.id)]
    return requests, issues, len(requests) + len({i.line for i in issues})


def errors_path(out: Path) -> Path:
    """``out.jsonl`` -> ``out.errors.jsonl`` (next to the output)."""
    name = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(name + ".errors.jsonl")


def _positive_int(obj: dict, field: str, lo: int) -> int | None:
    v = obj.get(field)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise _LineError("invalid_field", f"field {field!r} must be an integer >= {lo}, got {v!r}")
    return v


_LineError = LineProblem  # one input line's problem: its kind (the errors file's) and message


STDIN = Path("-")


def read_input(path: Path) -> bytes:
    """The bytes of an input file (``-``: standard input); JobError if it cannot be read."""
    if path == STDIN:
        return sys.stdin.buffer.read()
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise JobError(f"{path}: no such input file") from None
    except IsADirectoryError:
        raise JobError(f"{path}: is a directory; pass a JSONL file") from None
    except OSError as e:
        raise JobError(f"{path}: cannot read the input: {e}") from None


@dataclasses.dataclass
class InputFile:
    """An input file read: its valid requests, the issues of its other lines, its number of non-blank lines and
    its format (``NATIVE`` or ``OPENAI``)."""

    requests: list[Request]
    issues: list[Issue]
    lines: int
    format: str = NATIVE


def read_requests(path: Path, *, score: bool = False, defaults: JobDefaults | None = None
                  ) -> tuple[list[Request], list[Issue], int]:
    """Valid requests, issues (with 1-based line numbers) and the number of non-blank lines of a JSONL file.

    A native line is ``{"id": str|int, "prompt": str}`` or ``{"id": ..., "messages": [{role, content}, ...]}``,
    with optional ``n``, ``max_new_tokens``, ``seed``, ``stop`` (a string or a list), ``weights`` (one reward
    weight per fine-tune), ``response_prefix``, ``top_logprobs`` (0..20: per-step analysis) and the per-request
    sampling settings ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``min_tokens``, ``ignore_eos``, ``logit_bias``, ``repetition_penalty``,
    ``presence_penalty``, ``frequency_penalty`` (default: the config's ``sampling``) (generate), or a required ``response`` and an optional
    ``response_prefix`` (score). Other fields are ignored. Blank lines are skipped. A repeated id keeps its first line. ``path`` ``-`` reads standard
    input. OpenAI Batch lines: see :func:`read_input_file` (``defaults`` is needed for them).
    """
    f = read_input_file(path, score=score, defaults=defaults)
    return f.requests, f.issues, f.lines


def read_input_file(path: Path, *, score: bool = False, defaults: JobDefaults | None = None) -> InputFile:
    """Read a native or an OpenAI Batch JSONL file (detected from its lines; JobError if it mixes them).

    OpenAI lines are for generation only and are checked against the job's ``defaults`` (its sampling filters
    and number of fine-tunes; see ``openai_batch.parse_line``)."""
    parsed: list[tuple[int, Any]] = []  # (line number, object or _LineError)
    for lineno, raw in enumerate(read_input(path).split(b"\n"), start=1):
        if raw.strip():
            parsed.append((lineno, _json_object(raw)))
    fmt = _detect_format(path, parsed)
    if fmt == OPENAI and (score or defaults is None):
        raise JobError(f"{path}: OpenAI Batch lines (custom_id, url, body) are input for `eft-jax generate` only; "
                       "`eft-jax score` reads native lines {\"id\", \"prompt\" | \"messages\", \"response\"}")
    requests: list[Request] = []
    issues: list[Issue] = []
    first_line: dict[str, int] = {}
    for lineno, obj in parsed:
        ident = None
        try:
            if isinstance(obj, _LineError):
                raise obj
            if fmt == OPENAI:
                ident = obj.get("custom_id")
                ident = ident if isinstance(ident, (str, int)) and not isinstance(ident, bool) else None
                req = _openai_request(lineno, obj, defaults)
            else:
                ident = obj.get("id")
                req = _native_request(lineno, obj, score, defaults)
            key = req.key
            if key in first_line:
                raise _LineError("duplicate_id", f"duplicate id {req.id!r} (first used on line {first_line[key]}); "
                                 "this line is skipped")
            first_line[key] = lineno
            requests.append(req)
        except _LineError as e:
            issues.append(Issue(lineno, ident, e.kind, str(e)))
    return InputFile(requests, issues, len(parsed), fmt)


def _json_object(raw: bytes) -> Any:
    """The JSON object of a line, or the _LineError saying why it is not one."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return _LineError("malformed_json", f"not UTF-8 text: {e}")
    except json.JSONDecodeError as e:
        return _LineError("malformed_json", f"not a JSON object: {e}")
    if not isinstance(obj, dict):
        return _LineError("malformed_json", f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _detect_format(path: Path, parsed: list[tuple[int, Any]]) -> str:
    """NATIVE or OPENAI, from the lines that are JSON objects; JobError naming a line of each if both appear."""
    first: dict[str, int] = {}
    for lineno, obj in parsed:
        if isinstance(obj, dict):
            first.setdefault(OPENAI if is_openai_line(obj) else NATIVE, lineno)
    if len(first) == 2:
        raise JobError(f"{path}: mixes native lines (first on line {first[NATIVE]}: {{\"id\", \"prompt\"|\"messages\"}}) "
                       f"and OpenAI Batch lines (first on line {first[OPENAI]}: {{\"custom_id\", \"url\", \"body\"}}); "
                       "a file must be one or the other: split it, or convert the lines of one kind")
    return OPENAI if OPENAI in first else NATIVE


def _checked_prompt(prompt: Any) -> Any:
    try:
        prompt = validate_prompt(prompt)
    except PromptError as e:
        raise _LineError("empty_prompt" if str(e).startswith("empty") else "invalid_field", str(e)) from None
    try:
        json.dumps(prompt, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise _LineError("invalid_field", "the prompt is not valid Unicode (a lone surrogate escape)") from None
    return prompt


def _openai_request(lineno: int, obj: dict, defaults: JobDefaults) -> Request:
    p = parse_line(obj, defaults)
    return Request(line=lineno, id=p.api.custom_id, prompt=_checked_prompt(p.prompt), n=p.n,
                   max_new_tokens=p.max_new_tokens, seed=p.seed, stop=p.stop, weights=p.weights, api=p.api,
                   sampling=p.sampling)


def _native_request(lineno: int, obj: dict, score: bool, defaults: JobDefaults | None) -> Request:
    if "id" not in obj or obj["id"] is None:
        raise _LineError("missing_field", "missing field 'id'")
    ident = obj["id"]
    if isinstance(ident, bool) or not isinstance(ident, (str, int)):
        raise _LineError("invalid_field", f"field 'id' must be a string or an integer, got {ident!r}")
    has_prompt, has_messages = obj.get("prompt") is not None, obj.get("messages") is not None
    if has_prompt == has_messages:
        raise _LineError("missing_field", "needs exactly one of 'prompt' (a string) or 'messages' "
                         "(a list of {'role', 'content'})" + (", not both" if has_prompt else ""))
    prompt = obj["prompt"] if has_prompt else obj["messages"]
    if has_prompt and not isinstance(prompt, str):
        raise _LineError("invalid_field", f"field 'prompt' must be a string, got {type(prompt).__name__}")
    if has_messages and not isinstance(prompt, list):
        raise _LineError("invalid_field", "field 'messages' must be a list of {'role', 'content'} objects, "
                         f"got {type(prompt).__name__} (a plain string goes in 'prompt')")
    prompt = _checked_prompt(prompt)
    if score:
        return Request(line=lineno, id=ident, prompt=prompt, response=_score_response(obj),
                       response_prefix=_native_prefix(obj.get("response_prefix")))
    req = Request(
        line=lineno, id=ident, prompt=prompt, n=_positive_int(obj, "n", 1),
        max_new_tokens=_positive_int(obj, "max_new_tokens", 1), seed=_positive_int(obj, "seed", 0),
        stop=stop_strings(obj.get("stop"), "field 'stop'"),
        weights=reward_weights(obj.get("weights"), defaults.fine_tuned if defaults else None, "field 'weights'"),
        response_prefix=_native_prefix(obj.get("response_prefix")), sampling=sampling_fields(obj, "field "),
        top_logprobs=_native_top_logprobs(obj.get("top_logprobs")),
    )
    if req.seed is not None and req.seed >= 2**63:
        raise _LineError("invalid_field", "field 'seed' must be below 2**63")
    return req


def _score_response(obj: dict) -> str:
    response = obj.get("response")
    if response is None:
        raise _LineError("missing_field", "missing field 'response'")
    if not isinstance(response, str):
        raise _LineError("invalid_field", f"field 'response' must be a string, got {type(response).__name__}")
    if not response.strip():
        raise _LineError("empty_response", "empty response (only whitespace)" if response else "empty response")
    try:
        response.encode("utf-8")
    except UnicodeEncodeError:
        raise _LineError("invalid_field", "the response is not valid Unicode (a lone surrogate escape)") from None
    return response


def _native_top_logprobs(v: Any) -> int:
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_TOP_LOGPROBS:
        raise _LineError("invalid_field", f"field 'top_logprobs' must be an integer in [0, {MAX_TOP_LOGPROBS}], "
                         f"got {v!r}")
    return v


def top_logprobs_field(tokenizer: Any, roles: list[tuple[str, str]], result: Any, k: int) -> list[dict[str, Any]]:
    """A native output line's ``top_logprobs`` (a line with ``top_logprobs: k``): one entry per generated token (a
    final stop token included), ``{"id", "token", "logprob", "logprobs", "top_logprobs"}``: the sampled token's id,
    text, EFT log-prob and log-prob under each model by role (when recorded), and its step's ``k`` most likely
    tokens of the EFT distribution, each ``{"id", "token", "logprob", "logprobs"}`` (``openai_batch.top_entries``).
    ``roles``: (role, engine label) pairs in engine order."""
    per_model = result.component_logprobs or {}
    out = []
    for j, token in enumerate(result.tokens):
        out.append({"id": int(token), "token": token_text(tokenizer, token), "logprob": float(result.token_logprobs[j]),
                    "logprobs": {role: float(per_model[label][j]) for role, label in roles if label in per_model},
                    "top_logprobs": top_entries(tokenizer, roles, result, j, k)})
    return out


def _native_prefix(v: Any) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str):
        raise _LineError("invalid_field", f"field 'response_prefix' must be a string, got {type(v).__name__}")
    return v


class OutputFile:
    """The JSONL output: what is done already, whole-line batch appends, and the final input-order rewrite.

    overwrite: start over - nothing is read, and the old file is replaced only by the first batch
    written (so a job that cannot start leaves it as it was). ignore_fingerprint: append even if earlier
    lines were made by a config with another fingerprint. writer: False on processes that only compute
    (multi-host), which neither check nor touch the file. shard: ``"i/N"`` for a shard's output: every
    line gets a last field ``"shard": "i/N"``, and an output of another shard (or an unsharded one) is
    refused, as is a shard's output for an unsharded job. fmt: ``NATIVE`` (one line per sample) or ``OPENAI``
    (one line per input line with all its samples as choices, plus error lines); a file of the other format
    is refused.
    """

    def __init__(self, path: Path, fingerprint: str, *, overwrite: bool = False, ignore_fingerprint: bool = False,
                 writer: bool = True, log: Any = sys.stderr, shard: str | None = None, fmt: str = NATIVE):
        self.path = path
        self.fingerprint = fingerprint
        self.writer = writer
        self.shard = shard
        self.format = fmt
        self.done: dict[tuple[str, int], Any] = {}  # (id key, sample) -> what it recorded (Request.recorded)
        self.error_lines: set[str] = set()  # OpenAI error lines present (openai_batch.error_key)
        self.lines = 0
        if path.is_dir():
            raise JobError(f"{path}: is a directory; --out must be a file path")
        self._replace = overwrite and path.exists()  # the first append replaces the old file
        if writer:
            check_writable(path)
        if path.exists() and not overwrite:
            self._read_existing(ignore_fingerprint, log)

    def _read_existing(self, ignore_fingerprint: bool, log: Any) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            if self.writer:
                os.truncate(self.path, end)
            print(f"eft-jax: {self.path}: dropped a partial last line ({len(data) - end} bytes) left by an "
                  "interrupted run; it will be regenerated", file=log)
        others: dict[str, int] = {}
        shards: dict[str | None, int] = {}
        for lineno, raw in enumerate(data[:end].split(b"\n")[:-1], start=1):
            try:
                rec = json.loads(raw)
                fmt = OPENAI if "custom_id" in rec else NATIVE
                if fmt != self.format:
                    raise JobError(
                        f"{self.path} line {lineno} is an {'OpenAI Batch' if fmt == OPENAI else 'eft-jax native'} "
                        f"output line, but this job's input is in the {'OpenAI Batch' if self.format == OPENAI else 'native'} "
                        "format; choose another --out, or pass --overwrite to replace the file")
                self.lines += 1
                if fmt == OPENAI and error_key(rec) is not None:
                    self.error_lines.add(error_key(rec))
                    continue
                keys, fp, recorded = _done_keys(rec, fmt)
            except (ValueError, KeyError, TypeError, AttributeError):
                raise JobError(
                    f"{self.path} line {lineno}: not an eft-jax output line (JSON with id and fingerprint); "
                    "refusing to append to it. Choose another --out, or pass --overwrite to replace the file."
                ) from None
            for key in keys:
                self.done[key] = recorded
            if fp != self.fingerprint:
                others[fp] = others.get(fp, 0) + 1
            shard = rec.get("shard")
            if shard != self.shard:
                shards[shard] = shards.get(shard, 0) + 1
        if shards:
            found = ", ".join(f"{'no shard (an unsharded job)' if s is None else 'shard ' + str(s)} "
                              f"({n} line{'s' * (n != 1)})" for s, n in shards.items())
            this = f"shard {self.shard}" if self.shard is not None else "an unsharded job (no --shard)"
            raise JobError(
                f"{self.path} holds output of {found}; this is {this}. A shard resumes only its own output "
                "(same i and N); combine shard outputs with `eft-jax merge`. Choose another --out, or pass "
                "--overwrite to start over."
            )
        if others and not ignore_fingerprint:
            found = ", ".join(f"{fp} ({n} line{'s' * (n != 1)})" for fp, n in others.items())
            raise JobError(
                f"{self.path} holds output made with another config (fingerprint {found}); this config's "
                f"fingerprint is {self.fingerprint}. The fingerprint covers what changes the samples: models, prompt "
                "formats, dtypes, EFT roles and weights, sampling, seed, max_new_tokens and the long-prompt "
                "policy. Re-run with the original config, choose another --out, pass --overwrite to start over, "
                "or --ignore-fingerprint to append anyway."
            )

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """Append whole lines in one write, then flush to disk (fsync)."""
        if not self.writer:
            return
        if self.shard is not None:
            records = ({**r, "shard": self.shard} for r in records)
        payload = b"".join(_line(r) for r in records)
        if not payload:
            return
        if self._replace:  # --overwrite: the old output goes now that the new one has its first batch
            _write_atomically(self.path, payload)
            self._replace = False
        else:
            _append_durably(self.path, payload)
        self.lines += payload.count(b"\n")

    def sort(self, order: Mapping[str, int]) -> None:
        """Rewrite the file in input order: by ``order[id key]``, then sample; ids not in ``order`` (from an
        earlier input) last, as they were. OpenAI error lines rank by ``order[openai_batch.error_key(line)]``;
        those not in ``order`` (of a line that has run since, or changed) are dropped. Atomic: the old file stays whole until the new one replaces it."""
        if not self.writer or self._replace or not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1  # a partial last line cannot be placed; a later run regenerates it
        lines = [raw + b"\n" for raw in data[:end].split(b"\n")[:-1]]

        def rank(item: tuple[int, bytes]) -> tuple[int, int, int]:
            position, raw = item
            rec = json.loads(raw)
            if self.format == OPENAI:
                key = error_key(rec) or id_key(rec["custom_id"])
                return order.get(key, len(order)), 0, position
            return order.get(id_key(rec["id"]), len(order)), int(rec.get("sample", 0)), position

        def current(raw: bytes) -> bool:  # an OpenAI error line of an earlier run whose line now runs (or is gone)
            key = error_key(json.loads(raw)) if self.format == OPENAI else None
            return key is None or key in order

        lines = [raw for raw in lines if current(raw)]
        ordered = b"".join(raw for _, raw in sorted(enumerate(lines), key=rank))
        if ordered != data:
            _write_atomically(self.path, ordered)


def _done_keys(rec: dict[str, Any], fmt: str) -> tuple[list[tuple[str, int]], str, Any]:
    """The (id key, sample) pairs an output line holds, its fingerprint, and what it recorded of its input."""
    if fmt == NATIVE:
        return [(id_key(rec["id"]), int(rec.get("sample", 0)))], rec["fingerprint"], rec.get("prompt")
    eft = rec["response"]["body"]["eft"]
    key = id_key(rec["custom_id"])
    return [(key, k) for k in range(len(rec["response"]["body"]["choices"]))], eft["fingerprint"], eft["input_sha256"]


def check_writable(path: Path) -> None:
    """Refuse (JobError) an output path whose directory cannot be created or written, before any work."""
    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=f".{path.name}.", suffix=".probe"):
            pass
        if path.exists():
            with open(path, "ab"):
                pass
    except OSError as e:
        raise JobError(f"{path}: the output cannot be written ({e.strerror or e}: {e.filename or directory}); "
                       "choose another --out or fix the directory's permissions") from None


def _line(obj: Any) -> bytes:
    # backslashreplace turns a lone surrogate (possible in an id) into its JSON escape: still valid JSON.
    return json.dumps(obj, ensure_ascii=False).encode("utf-8", "backslashreplace") + b"\n"


def _write_atomically(path: Path, payload: bytes) -> None:
    """Replace ``path`` by ``payload``: write a temporary file beside it, fsync, rename, fsync the directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _append_durably(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(payload)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


class ErrorsFile:
    """``OUT.errors.jsonl``: the issues found by this run (rewritten at the start of each run), in input-line
    order (the issues of one line in the order they were found). shard: ``"i/N"`` added to each line."""

    def __init__(self, path: Path, *, writer: bool = True, shard: str | None = None):
        self.path = path
        self.writer = writer
        self.shard = shard
        self.count = 0

    def _payload(self, issues: list[Issue]) -> bytes:
        extra = {"shard": self.shard} if self.shard is not None else {}
        return b"".join(_line({**i.to_json(), **extra}) for i in issues)

    def start(self, issues: Iterable[Issue]) -> None:
        issues = sorted(issues, key=lambda i: i.line if i.line is not None else 0)  # stable: a line's own order
        self.count = len(issues)
        if not self.writer:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.path, self._payload(issues))

    def add(self, issues: Iterable[Issue]) -> None:
        issues = list(issues)
        self.count += len(issues)
        if self.writer and issues:
            _append_durably(self.path, self._payload(issues))

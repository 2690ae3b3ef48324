"""``eft-jax merge``: combine the outputs of ``--shard i/N`` jobs into the file one unsharded job writes.

The input file says what must be there: every valid line of the input belongs to the shard of its id
(``records.shard_of``), and needs its samples in that shard's output (sample indices 0..n-1, ``n`` from
the line or, for lines without one, the job's ``n`` as the shards wrote it) or a ``skipped`` entry in that
shard's errors file. The merged output holds the shards' lines without their ``"shard"`` field, in input
order (samples of a line by index): byte for byte what an unsharded job writes; the merged errors file
holds the shards' error lines in input-line order. Both are written atomically, so merging again (or
after a crash) gives the same files.

OpenAI Batch input (``jobs.openai_batch``; the format is the input's, and the shard outputs must be of it):
the same, with one output line per input line (all its choices; keyed by ``custom_id``), and each line its
shard's errors file skips needs its error output line too (``{"custom_id", "response": null, "error"}``),
which ranks at that input line. As ``OutputFile.sort`` does, an error line of a shard whose errors file no
longer skips it (its line ran since) is dropped.

Refused, with what to do (``JobError``, exit 2): shards of different N or fingerprints, a shard given
twice, a missing or incomplete shard (its unfinished lines are named), an output line whose id is not
in the input or not in the file's shard, a file that is not a shard output, outputs of the other format
than the input's (native / OpenAI Batch).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple, TextIO

from eft_jax.jobs.openai_batch import JobDefaults, error_key, error_line
from eft_jax.jobs.records import (
    NATIVE,
    OPENAI,
    JobError,
    Shard,
    _done_keys,
    _line,
    _write_atomically,
    errors_path,
    id_key,
    read_input_file,
    select_shard,
)

_SHARD_NAME = re.compile(r"(?P<base>.*)\.shard-(?P<index>\d+)-of-(?P<count>\d+)\.jsonl")
_SHOWN = 8  # lines named in a refusal
# The merge has no config: OpenAI lines are read without checking the number of their eft.weights (a line the
# job refused for it is a line its shard's errors file skips); the other fields are not used in reading.
_ANY_CONFIG = JobDefaults(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, fine_tuned=None)  # type: ignore[arg-type]
_FORMATS = {NATIVE: "native", OPENAI: "OpenAI Batch"}


@dataclasses.dataclass
class MergeSummary:
    out: Path
    errors: Path
    fingerprint: str | None
    shards: int
    files: int
    lines: int = 0
    error_lines: int = 0
    unchanged: bool = False
    wall_s: float = 0.0

    def render(self) -> str:
        state = "unchanged" if self.unchanged else "written"
        return "\n".join([
            (f"eft-jax merge: done: {self.lines} lines from {self.files} of {self.shards} shard outputs {state}: "
             f"{self.out}"),
            f"  errors:      {self.error_lines} lines in {self.errors}",
            f"  fingerprint: {self.fingerprint or '(no output lines)'}",
            f"  wall time:   {self.wall_s:.1f}s",
        ])


class _Out(NamedTuple):
    """One output line of a shard: what the merge needs of it, and its bytes without ``"shard"``."""

    key: str  # its input line's id key (native id, OpenAI custom_id); an OpenAI error line's error_key
    sample: int  # 0 for a score line and an OpenAI line (one line holds all the samples of its input line)
    ident: Any  # the id or custom_id (which shard owns the line)
    fingerprint: str | None  # None: an OpenAI error line
    scored: bool  # a score line (native, no "sample")
    raw: bytes


@dataclasses.dataclass
class _ShardFile:
    path: Path
    shard: Shard
    format: str | None  # NATIVE or OPENAI; None: no output lines
    lines: list[_Out]
    errors: list[tuple[dict[str, Any], bytes]]  # (errors file record without "shard", its bytes)
    errors_found: bool


def find_shard_outputs(out: Path) -> list[Path]:
    """The ``OUT.shard-i-of-N.jsonl`` files beside ``out`` (any i and N)."""
    base = out.name.removesuffix(".jsonl")
    if not out.parent.is_dir():
        return []
    found = []
    for p in out.parent.iterdir():
        m = _SHARD_NAME.fullmatch(p.name)
        if m and m["base"] == base and p.is_file():
            found.append(p)
    return sorted(found, key=lambda p: (len(p.name), p.name))


def _strip_shard(raw: bytes, label: str) -> bytes:
    """The line as an unsharded job writes it: without its last field ``"shard": label``."""
    suffix = b', "shard": ' + json.dumps(label).encode() + b"}\n"
    if raw.endswith(suffix):
        return raw[: -len(suffix)] + b"}\n"
    rec = json.loads(raw)
    rec.pop("shard", None)
    return _line(rec)


def _read_lines(path: Path, what: str) -> list[tuple[int, dict[str, Any], bytes]]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise JobError(f"{path}: cannot read the {what}: {e.strerror or e}") from None
    end = data.rfind(b"\n") + 1
    if end < len(data):
        raise JobError(f"{path}: ends with a partial line (the shard was killed while writing): re-run that shard "
                       "to finish it (it cuts the partial line and resumes), then merge again")
    out = []
    for lineno, raw in enumerate(data[:end].split(b"\n")[:-1], start=1):
        try:
            rec = json.loads(raw)
            if not isinstance(rec, dict) or "shard" not in rec:
                raise ValueError
        except ValueError:
            raise JobError(f"{path} line {lineno}: not a line of an eft-jax shard {what} (JSON with a \"shard\" "
                           "field, written by `eft-jax generate/score --shard i/N`)") from None
        out.append((lineno, rec, raw + b"\n"))
    return out


def _entry(rec: dict[str, Any]) -> tuple[str, str, int, Any, str | None]:
    """An output line's format, key, sample, id and fingerprint (``records._done_keys``: as a resumed job reads
    it); KeyError, TypeError, ... for a line that is not an eft-jax output line."""
    fmt = OPENAI if "custom_id" in rec else NATIVE
    if fmt == OPENAI and error_key(rec) is not None:
        return fmt, error_key(rec), 0, rec["custom_id"], None
    keys, fingerprint, _ = _done_keys(rec, fmt)
    if not isinstance(fingerprint, str):
        raise TypeError(fingerprint)
    return fmt, keys[0][0], keys[0][1], rec["custom_id" if fmt == OPENAI else "id"], fingerprint


def _read_shard_file(path: Path) -> _ShardFile:
    lines = _read_lines(path, "output")
    entries = []
    for lineno, rec, _ in lines:
        try:
            entries.append(_entry(rec))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError):
            raise JobError(f"{path} line {lineno}: not an eft-jax output line (JSON with id and fingerprint, or an "
                           "OpenAI Batch output line)") from None
    formats = sorted({fmt for fmt, *_ in entries})
    if len(formats) > 1:
        raise JobError(f"{path}: mixes native and OpenAI Batch output lines; re-run the shard with --overwrite")
    epath = errors_path(path)
    errors = _read_lines(epath, "errors file") if epath.exists() else []
    labels = {rec["shard"] for _, rec, _ in lines} | {rec["shard"] for _, rec, _ in errors}
    m = _SHARD_NAME.fullmatch(path.name)
    named = f"{int(m['index'])}/{int(m['count'])}" if m else None
    if len(labels) > 1:
        raise JobError(f"{path} (and its errors file) holds lines of several shards: {', '.join(sorted(labels))}")
    label = next(iter(labels), named)
    if label is None:
        raise JobError(f"{path}: empty, and its name does not say which shard it is (OUT.shard-i-of-N.jsonl)")
    if named is not None and named != label:
        raise JobError(f"{path}: its name says shard {named}, but its lines were written by shard {label}")
    try:
        shard = Shard.parse(str(label))
    except JobError:
        raise JobError(f"{path}: invalid shard {label!r} in its lines") from None
    return _ShardFile(path, shard, formats[0] if formats else None,
                      [_Out(key, sample, ident, fp, fmt == NATIVE and "sample" not in rec,
                            _strip_shard(raw, shard.label))
                       for (fmt, key, sample, ident, fp), (_, rec, raw) in zip(entries, lines, strict=True)],
                      [(_without_shard(rec), _strip_shard(raw, shard.label)) for _, rec, raw in errors],
                      epath.exists())


def _error_key(issue: dict[str, Any]) -> str:
    """The ``openai_batch.error_key`` of the error output line an OpenAI job writes for an errors file line."""
    return error_key(error_line(issue.get("id"), issue.get("kind"), issue.get("error")))


def _without_shard(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if k != "shard"}


def _expected(files: list[_ShardFile], shard: Shard, out: Path) -> Path:
    """Where shard ``shard``'s output would be: beside the given shard outputs, named like them."""
    for f in files:
        m = _SHARD_NAME.fullmatch(f.path.name)
        if m:
            return f.path.with_name(f"{m['base']}.shard-{shard.index}-of-{shard.count}.jsonl")
    return shard.path(out)


def _listing(items: list[str]) -> str:
    more = f", ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


def run_merge(prompts: Path, out: Path, shard_outputs: list[Path] | None = None, *,
              log: TextIO | None = None) -> MergeSummary:
    """Merge shard outputs into ``out`` (and their errors files into ``OUT.errors.jsonl``); see the module
    docstring. ``shard_outputs``: the files (default: every ``OUT.shard-i-of-N.jsonl`` beside ``out``)."""
    log = log or sys.stderr
    start = time.perf_counter()
    paths = list(shard_outputs) if shard_outputs else find_shard_outputs(out)
    if not paths:
        raise JobError(f"no shard outputs given and none found beside {out} (named "
                       f"{Shard(0, 1).path(out).name.replace('-0-of-1', '-i-of-N')}); pass them as arguments")
    for p in paths:
        if not p.is_file():
            raise JobError(f"{p}: no such shard output")
        if p.resolve() == out.resolve():
            raise JobError(f"{p}: the merged --out cannot be one of the shard outputs")
    files = [_read_shard_file(p) for p in paths]

    counts = {f.shard.count for f in files}
    if len(counts) > 1:
        raise JobError("the shard outputs disagree on the number of shards N: " + "; ".join(
            f"{f.path}: shard {f.shard.label}" for f in files) + ". Merge the outputs of one N: name those files "
            "as arguments (or remove the others from beside --out)")
    count = counts.pop()
    by_index: dict[int, _ShardFile] = {}
    for f in files:
        if f.shard.index in by_index:
            raise JobError(f"shard {f.shard.label} given twice: {by_index[f.shard.index].path} and {f.path}")
        by_index[f.shard.index] = f
    fingerprints: dict[str, list[str]] = {}
    for f in files:
        for line in f.lines:
            if line.fingerprint is None:
                continue
            names = fingerprints.setdefault(line.fingerprint, [])
            if str(f.path) not in names:
                names.append(str(f.path))
    if len(fingerprints) > 1:
        raise JobError("the shard outputs were made with different configs: " + "; ".join(
            f"fingerprint {fp} in {', '.join(names)}" for fp, names in fingerprints.items())
            + ". Re-run the odd shard(s) with the same config (with --overwrite), then merge again")
    fingerprint = next(iter(fingerprints), None)
    formats = {f.format for f in files} - {None}
    if len(formats) > 1:
        raise JobError("the shard outputs mix native and OpenAI Batch output lines: " + "; ".join(
            f"{f.path}: {_FORMATS[f.format]}" for f in files if f.format) + ". Merge the outputs of one job")
    kinds = {line.scored for f in files for line in f.lines}
    if len(kinds) > 1:
        raise JobError("the shard outputs mix generate lines (with \"sample\") and score lines")
    score = kinds == {True}

    read = read_input_file(prompts, score=score, defaults=_ANY_CONFIG)
    requests, issues = read.requests, read.issues
    openai = read.format == OPENAI
    if formats and formats != {read.format}:
        raise JobError(f"{prompts} is {_FORMATS[read.format]} input, but the shard outputs hold "
                       f"{_FORMATS[formats.pop()]} output lines. Merge with the input the shards ran on")
    order = {req.key: req.line for req in requests}
    by_key = {req.key: req for req in requests}

    # Every output line belongs to the input and to its file's shard, once; an OpenAI error line ranks at the
    # line its shard's errors file skips (the last of them, as the job's sort), or is stale and goes.
    merged: list[tuple[tuple[int, int], bytes]] = []
    samples: dict[str, set[int]] = {}
    kept_errors: dict[int, set[str]] = {}  # shard index -> the error keys of its error lines kept
    for f in files:
        foreign, misplaced = [], []
        skips = {_error_key(rec): rec.get("line") or 0 for rec, _ in f.errors
                 if openai and rec.get("action") == "skipped"}
        for line in f.lines:
            if line.fingerprint is None:
                if line.key in skips:
                    merged.append(((skips[line.key], 0), line.raw))
                    kept_errors.setdefault(f.shard.index, set()).add(line.key)
                continue
            if line.key not in by_key:
                foreign.append(line.key)
                continue
            if not f.shard.owns(line.ident):
                misplaced.append(line.key)
                continue
            if line.sample in samples.get(line.key, ()):
                raise JobError(f"{f.path}: id {line.key} sample {line.sample} is there twice; re-run the shard "
                               "with --overwrite")
            merged.append(((order[line.key], line.sample), line.raw))
            samples.setdefault(line.key, set()).add(line.sample)
        if foreign:
            raise JobError(f"{f.path}: {len(foreign)} output line(s) of ids that are not (valid lines) in {prompts}: "
                           f"{_listing(foreign)}. Merge with the input the shards ran on")
        if misplaced:
            raise JobError(f"{f.path}: {len(misplaced)} output line(s) of ids that belong to another shard than "
                           f"{f.shard.label}: {_listing(misplaced)}")

    # Every input line of every shard is done: its samples are there, or its shard's errors file skipped it.
    default_n = max((len(samples.get(req.key, ())) for req in requests if req.n is None), default=1) or 1
    for index in range(count):
        shard = Shard(index, count)
        own, own_issues, lines = select_shard(requests, issues, shard)
        f = by_index.get(index)
        if f is None:
            if lines:
                raise JobError(f"shard {shard.label} is missing: no output of it was given (expected "
                               f"{_expected(files, shard, out)}), and {lines} input line(s) belong to it "
                               f"(lines {_listing([str(r.line) for r in own] or [str(i.line) for i in own_issues])}). "
                               f"Run `eft-jax {'score' if score else 'generate'} ... --shard {shard.label}`, then "
                               "merge again")
            continue
        skipped = {rec.get("line") for rec, _ in f.errors if rec.get("action") == "skipped"}
        unfinished = []
        for req in own:  # an OpenAI line is done when its line is there (whatever its n: as a resumed job)
            n = 1 if score or openai else req.n if req.n is not None else default_n
            have = samples.get(req.key, set())
            missing = [k for k in range(n) if k not in have]
            if missing and not (not have and req.line in skipped):
                unfinished.append(f"{req.line} (id {req.key}: {n - len(missing)} of {n} samples)" if n > 1 and have
                                  else f"{req.line} (id {req.key})")
        if openai:
            unfinished += [f"{rec.get('line')} (id {id_key(rec.get('id'))}: its error line)" for rec, _ in f.errors
                           if rec.get("action") == "skipped" and _error_key(rec) not in kept_errors.get(index, ())]
        if unfinished:
            hint = "" if f.errors_found else f" (its errors file {errors_path(f.path)} is missing too)"
            raise JobError(f"shard {shard.label} ({f.path}) is incomplete{hint}: {len(unfinished)} input line(s) "
                           f"not done: line {_listing(unfinished)}. Re-run that shard with the same command to "
                           "finish it (it resumes), then merge again")

    body = b"".join(raw for _, raw in sorted(merged, key=lambda x: x[0]))
    error_lines = sorted(((rec.get("line") or 0, raw) for f in files for rec, raw in f.errors), key=lambda x: x[0])
    errors_body = b"".join(raw for _, raw in error_lines)

    epath = errors_path(out)
    summary = MergeSummary(out, epath, fingerprint, count, len(files), len(merged), len(error_lines))
    if out.exists():
        _check_replaceable(out, fingerprint)
    unchanged = out.exists() and out.read_bytes() == body and epath.exists() and epath.read_bytes() == errors_body
    if not unchanged:
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(epath, errors_body)
        _write_atomically(out, body)
    summary.unchanged = unchanged
    summary.wall_s = time.perf_counter() - start
    return summary


def _check_replaceable(out: Path, fingerprint: str | None) -> None:
    """An existing --out may be replaced only if it is an unsharded eft-jax output of the same config."""
    data = out.read_bytes()
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
            fp = _entry(rec)[4]
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise JobError(f"{out} line {lineno}: exists and is not an eft-jax output; refusing to replace it. "
                           "Choose another --out") from None
        if "shard" in rec:
            raise JobError(f"{out} is a shard output (shard {rec['shard']}); choose another --out for the merge")
        if fingerprint is not None and fp is not None and fp != fingerprint:
            raise JobError(f"{out} exists with output of another config (fingerprint {fp}, the shards' is "
                           f"{fingerprint}); refusing to replace it. Choose another --out or delete it")

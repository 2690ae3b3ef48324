"""Batch offline jobs: ``generate`` (samples per prompt) and ``score`` (log-likelihood of given pairs).

Both follow the same steps, failing before any weights are loaded on a bad setup: check the model
files, read the input (bad lines become issues), open the output (it must be writable; resume: skip
what is there; refuse another config's output), check the mesh against the visible devices, and check
the tokenizers (shared vocabulary, chat templates, a probe prompt renders for every model: see
``preflight``). Then load the models, apply the long-prompt policy, run batch by batch appending each
finished batch to the output, and at the end rewrite the output in input order.

Exit status (``Summary.exit_status``): 0 done; 1 the job stopped on an error after it started, or
wrote nothing because every input line failed; 2 it could not start (``JobError``); 130 interrupted.
Nothing written is ever lost: a stopped or interrupted job resumes where it was.

Randomness: a sample's stream is ``requests.stream_id(["id", id], k)`` for sample ``k`` of a line, or
``stream_id(["seed", seed], k)`` when the line gives its own ``seed``, combined with ``job.seed``. So a
sample depends on neither the batch nor the order of the input nor on what was done before a resume;
with a per-line seed it does not depend on the id either (same prompt + same seed = same sample).

Shards (``shard=Shard(i, N)``, ``--shard i/N``): the job runs only the input lines of shard i (by a hash of
the id, ``records.shard_of``) into ``out.shard-i-of-N.jsonl``, otherwise exactly as an unsharded job
(resume, fingerprint, errors file, input order); ``eft-jax merge`` (``jobs.merge``) combines the shards.

Multi-process jobs (``mesh.distributed``, a mesh spanning processes): the input is split the same way over
the process groups that hold different rows of a batch (``lockstep.Peers``: one per data-axis position
group, usually one per host): group g of G runs shard g/G - it renders, places, decodes and writes only its
own lines, into ``out.shard-g-of-G.jsonl`` (its first process writes), so a re-run resumes each group from
its own file - and when every group is done, process 0 merges the parts into ``out`` (``jobs.merge``: the
file one process writes). Whatever decides a program (is anything left, the groups of ``Engine.run``, a
refusal) is agreed over the processes first, so that none goes on alone.

Input formats: native lines, or OpenAI Batch lines (``jobs.openai_batch``), detected per file; an OpenAI
line's output is one line holding its ``n`` samples, written when all of them are done. Lines with their
own stop strings, reward weights or sampling settings run together in ONE ``Engine.run`` (the settings are
per row); only lines asking for top log-probs (OpenAI ``top_logprobs`` / completions ``logprobs: k``, native
``top_logprobs``) run apart: their run computes every step's K most likely tokens on device, K the largest any
of its lines asks for (a line asking fewer is cut on the host), and the other lines do not pay for it. A sample
depends on (seed, stream, position) and its own settings only. Penalties
(repetition/presence/frequency) are refused with speculative decoding: a JobError naming the config key, or
the line's issue naming the field.

generation_config.json: sampling settings the config does not set (temperature, top_p, top_k, min_p,
repetition_penalty) come
from the first fine-tune's ``generation_config.json`` (the base's for plain decoding) unless
``sampling.use_generation_config`` is false; see :func:`generation_defaults`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from eft_jax import programs
from eft_jax.config import Config, missing_model_files, resolve_model_path
from eft_jax.interrupts import Interrupts
from eft_jax.jobs.preflight import check_memory, check_tokenizers, make_job_mesh
from eft_jax.jobs.progress import Progress, format_duration
from eft_jax.jobs.openai_batch import Choice, JobDefaults, ResponseContext, error_key, error_line, response_line
from eft_jax.jobs.records import (
    OPENAI, STDIN, ErrorsFile, Issue, JobError, OutputFile, Request, Shard, errors_path, read_input_file,
    select_shard, top_logprobs_field,
)
from eft_jax.prompts import PromptError
from eft_jax.sampling import SETTINGS, check_setting

if TYPE_CHECKING:
    from eft_jax.lockstep import Peers

@dataclasses.dataclass
class Summary:
    """What one run did (printed at the end)."""

    command: str
    out: Path
    errors: Path
    fingerprint: str
    lines: int = 0
    prompts_run: int = 0
    already_done: int = 0
    skipped: int = 0
    truncated: int = 0
    warnings: int = 0
    written: int = 0
    tokens: int = 0
    setup_s: float = 0.0
    run_s: float = 0.0
    wall_s: float = 0.0
    interrupted: bool = False
    stopped: str | None = None  # the error that stopped a started job
    drafted: int = 0  # speculative decoding: drafted, accepted and rejected drafts, rounds
    accepted: int = 0
    rejected: int = 0
    rounds: int = 0
    shard: str | None = None  # "i/N" for a sharded job

    @property
    def exit_status(self) -> int:
        """0 done, 1 stopped on an error or nothing written because every line failed, 130 interrupted."""
        if self.interrupted:
            return 130
        if self.stopped is not None or (self.written == 0 and self.skipped and not self.already_done):
            return 1
        return 0

    def render(self) -> str:
        unit = "samples" if self.command == "generate" else "pairs"
        state = "interrupted" if self.interrupted else "stopped" if self.stopped is not None else "done"
        rate = self.tokens / self.run_s if self.run_s > 0 else 0.0
        verb = "generated" if self.command == "generate" else "scored"
        of_shard = f" (shard {self.shard})" if self.shard is not None else ""
        lines = [
            f"eft-jax {self.command}{of_shard}: {state}: {self.written} {unit} written to {self.out}",
            f"  prompts:     {self.lines} input lines: {self.prompts_run} run, {self.already_done} already done, "
            f"{self.skipped} skipped, {self.truncated} truncated"
            + (f" (see {self.errors})" if self.skipped or self.truncated or self.warnings else ""),
            f"  tokens:      {self.tokens} {verb}, {rate:.1f} tokens/s over {self.run_s:.1f}s (compilation included)",
            f"  wall time:   {self.wall_s:.1f}s ({format_duration(self.wall_s)}; setup and model loading "
            f"{self.setup_s:.1f}s)",
            f"  fingerprint: {self.fingerprint}",
        ]
        if self.drafted:
            lines.insert(3, f"  speculative: acceptance {self.accepted / max(self.accepted + self.rejected, 1):.2f}, "
                            f"{(self.tokens - self.written) / max(self.rounds, 1):.2f} tokens per round")
        if self.stopped is not None:
            lines.insert(1, f"  error:       {self.stopped}")
        if self.interrupted or self.stopped is not None:
            lines.append("  re-run the same command to resume: finished batches are kept")
        elif self.written == 0 and self.skipped and not self.already_done:
            lines.append(f"  every input line failed: see {self.errors}")
        return "\n".join(lines)


@dataclasses.dataclass
class JobEngine:
    """The engine plus the config names of its components (engine order: base, ref, fine-tunes)."""

    engine: Any
    roles: list[tuple[str, str, str]]  # (role, model name, engine label)

    def label(self, role: str) -> str:
        return next(label for r, _, label in self.roles if r == role)


def build_engine(config: Config, *, mesh: Any = None, tokenizers: dict[str, Any] | None = None,
                 interrupts: Interrupts | None = None, log: TextIO | None = None) -> JobEngine:
    """Load each distinct (path, dtype, sharding, quantize) once, build the EFT spec and the engine.

    mesh: the job's mesh (default: ``make_job_mesh(config.mesh)``). tokenizers: already loaded and
    checked ones by model name (``preflight.check_tokenizers``), reused instead of loading them again.
    """
    import jax.numpy as jnp

    from eft_jax.engine import Engine
    from eft_jax.loading import CheckpointError, load_model
    from eft_jax.models.config import UnsupportedConfigError
    from eft_jax.spec import Component, EFTSpec
    from eft_jax.vocab import VocabMismatchError

    log = log or sys.stderr
    mesh = mesh if mesh is not None else make_job_mesh(config.mesh)
    tokenizers = tokenizers or {}
    loaded: dict[tuple[str, str | None, str, str | None], Any] = {}

    def load(name: str) -> Any:
        entry = config.models[name]
        path = resolve_model_path(entry.path)
        key = (str(path), entry.dtype, entry.sharding, entry.quantize)
        if key not in loaded:
            start = time.perf_counter()
            try:
                loaded[key] = load_model(path, dtype=jnp.dtype(entry.dtype) if entry.dtype else None, mesh=mesh,
                                         sharding=entry.sharding, tokenizer=tokenizers.get(name),
                                         quantize=entry.quantize)
            except (CheckpointError, UnsupportedConfigError) as e:
                raise JobError(f"{config.source}: models.{name}: {e}") from None
            m = loaded[key]
            print(f"eft-jax: loaded models.{name} ({path}): {_count(m.config.num_params)} parameters, "
                  f"{jnp.dtype(m.dtype).name}, {entry.sharding}, {time.perf_counter() - start:.1f}s", file=log)
            if interrupts is not None:
                interrupts.check()
        return loaded[key]

    models = {name: load(name) for name in config.model_names()}
    try:
        components = {role: Component(models[name], config.models[name].prompt_format, f"{role}={name}")
                      for role, name in config.roles()}
    except ValueError as e:  # only the prompt format can be wrong here; the models are loaded
        raise JobError(f"{config.source}: {e}; use 'plain' or a template with {{prompt}}") from None
    roles = [(role, name, components[role].label) for role, name in config.roles()]
    drafter: int | Any = None
    name = config.drafter_name()
    if name is not None:
        in_rule = [i for i, (_, n) in enumerate(config.roles()) if n == name]
        drafter = in_rule[0] if in_rule else Component(models[name], config.models[name].prompt_format,
                                                       f"drafter={name}")
    try:
        spec = EFTSpec(base=components["base"], ref=components.get("ref"),
                       fine_tuned=tuple(components[r] for r, _, _ in roles if r.startswith("ft")),
                       weights=config.eft.weights, base_top_p=config.eft.base_top_p)
        engine = Engine(spec, chunk_size=config.job.chunk_size, speculative_k=config.speculative.k, drafter=drafter)
    except VocabMismatchError as e:
        raise JobError(f"{config.source}: the models of eft do not share a tokenizer: {e}") from None
    except ValueError as e:
        raise JobError(f"{config.source}: cannot build the EFT spec: {e}") from None
    shape = " x ".join(f"{k}={v}" for k, v in mesh.shape.items())
    print(f"eft-jax: {' '.join(label for _, _, label in roles)}; weights {list(config.eft.weights)}; "
          f"mesh {shape} ({mesh.devices.flat[0].platform})", file=log)
    return JobEngine(engine, roles)


GENERATION_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
_NOT_IMPLEMENTED = ("no_repeat_ngram_size",)
def generation_defaults(config: Config, log: TextIO | None = None) -> Config:
    """``config`` with the sampling settings it does not set taken from a model's ``generation_config.json``.

    The file of the first fine-tune wins (the base's for plain decoding): EFT emulates that model, and its
    generation_config holds its authors' recommended decoding; the bases' files (pretrained models) rarely set
    any. Like vLLM's ``generation_config="auto"``, temperature, top_p, top_k and min_p are read whatever
    ``do_sample`` says, and so is repetition_penalty; other fields (no_repeat_ngram_size) are not implemented
    and are named on ``log``. Values are checked with ``sampling.check_setting``.
    ``sampling.use_generation_config: false`` turns this off. The end-token ids of every model's file are
    read at loading (``loading.hf_dir.declared_end_ids``). A GGUF file has no generation_config.
    """
    if not config.sampling.use_generation_config:
        return config
    name = config.eft.fine_tuned[0] if config.eft.fine_tuned else config.eft.base
    try:
        path = resolve_model_path(config.models[name].path) / "generation_config.json"
    except (FileNotFoundError, OSError):
        return config
    if not path.is_file():
        return config
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise JobError(f"{path}: cannot read it ({e}); fix the file, or set sampling.use_generation_config=false"
                       ) from None
    raw = raw if isinstance(raw, dict) else {}
    taken = {}
    for key in GENERATION_DEFAULTS:
        value = raw.get(key)
        if value is None or key in config.sampling.given or not hasattr(config.sampling, key):
            continue
        try:
            taken[key] = check_setting(key, value)
        except ValueError as e:
            raise JobError(f"{path}: {key} {e}; fix the file, set sampling.{key} in the config, or set "
                           "sampling.use_generation_config=false") from None
    ignored = sorted(k for k in _NOT_IMPLEMENTED if raw.get(k) not in (None, 1, 0))  # 1 and 0: neutral
    if (taken or ignored) and log is not None:
        print(f"eft-jax: sampling defaults from models.{name} ({path}): "
              + (", ".join(f"{k}={v}" for k, v in taken.items()) or "none")
              + (f"; not applied (not implemented): {', '.join(ignored)}" if ignored else "")
              + " (set them in the config, or sampling.use_generation_config=false, to choose otherwise)", file=log)
    return dataclasses.replace(config, sampling=dataclasses.replace(config.sampling, **taken)) if taken else config


def _count(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


@dataclasses.dataclass
class _Job:
    """What a run knows before any weights are loaded (every check of that stage passed)."""

    config: Config
    inputs: Path
    summary: Summary
    requests: list[Request]
    issues: list[Issue]
    output: OutputFile
    mesh: Any
    interrupts: Interrupts
    start: float
    shard: Shard | None = None  # the --shard of the job, or this process group's part of a multi-process job
    format: str = "native"
    peers: Peers | None = None
    out: Path | None = None  # --out (where the parts of a multi-process job are merged)


def _prepare(config: Config, command: str, inputs: Path, out: Path, *, overwrite: bool, ignore_fingerprint: bool,
             interrupts: Interrupts, log: TextIO, shard: Shard | None = None) -> _Job:
    """Checks that need no models: model files, the input, the output (writable, resumable), the mesh, and
    the memory plan (from config.json / GGUF headers: refuses a job that does not fit before any loading)."""
    start = time.perf_counter()
    interrupts.check()
    missing = missing_model_files(config)
    if missing:
        raise JobError(f"{config.source}: model file(s) not found:\n  " + "\n  ".join(missing))
    if command == "generate":
        config = generation_defaults(config, log)
        if config.speculative.k:
            defaults = config.sampling.params()
            for key in ("repetition_penalty", "presence_penalty", "frequency_penalty"):
                if getattr(defaults, key) != SETTINGS[key].neutral:
                    raise JobError(f"{config.source}: sampling.{key}={getattr(defaults, key)} is not supported with "
                                   f"speculative decoding (speculative.k={config.speculative.k}): penalties depend on "
                                   "the tokens emitted inside a round; set it to its neutral value "
                                   f"({SETTINGS[key].neutral}) or speculative.k=0")
    fingerprint = config.fingerprint(command)
    mesh = make_job_mesh(config.mesh)
    from eft_jax.distributed import check_same_job  # multi-process jobs: every process must see the same job

    check_same_job(fingerprint, dict(mesh.shape), inputs)
    peers = _job_peers(config, mesh)
    final_out = out if shard is None else None  # where process 0 merges the groups' parts (not for a --shard)
    if peers.groups > 1:  # a multi-process job: this process group's part of the input (of its --shard i/N)
        mine = shard or Shard(0, 1)
        shard = Shard(mine.index + mine.count * peers.group, mine.count * peers.groups)
    if shard is not None:
        out = shard.path(out)
    summary = Summary(command, out, errors_path(out), fingerprint, shard=shard.label if shard else None)
    s = config.sampling
    read = read_input_file(inputs, score=command == "score", defaults=JobDefaults(
        s.temperature, s.top_p, s.top_k, s.min_p, len(config.eft.fine_tuned)))
    # Each process group checks its own part (its output, its prompts' memory); a refusal anywhere stops all.
    output = peers.agree(lambda: OutputFile(out, fingerprint, overwrite=overwrite, ignore_fingerprint=ignore_fingerprint,
                                            writer=peers.writer, log=log, shard=summary.shard, fmt=read.format),
                         JobError)
    requests, issues, summary.lines = select_shard(read.requests, read.issues, shard)
    peers.agree(lambda: requests and check_memory(
        config, command, [_with_prefix(r, config.job.response_prefix) for r in requests], mesh), JobError)
    interrupts.check()
    return _Job(config, inputs, summary, requests, issues, output, mesh, interrupts, start, shard, read.format,
                peers, final_out)


def _job_peers(config: Config, mesh: Any) -> Peers:
    """The job's processes, as the engine will see them: its mesh, the base model's batch axis."""
    from eft_jax.lockstep import Peers
    from eft_jax.sharding import HostPlacement, resolve_rules

    rules = resolve_rules(config.models[config.eft.base].sharding)
    return Peers(HostPlacement(mesh, rules.mesh_axis("batch")))


_COUNTS = ("lines", "prompts_run", "already_done", "skipped", "truncated", "warnings", "written", "tokens",
           "drafted", "accepted", "rejected", "rounds")


def _finish(job: _Job, summary: Summary, log: TextIO) -> Summary:
    """A multi-process job whose groups ran parts of the input: the whole job's summary (every group's
    counts) and, once every group is done, the parts merged into ``--out`` by process 0 (not for a job that is
    itself shard i/N: its parts are shards i + N*g of N*G, for ``eft-jax merge`` with every other shard's)."""
    peers = job.peers
    if peers is None or peers.groups == 1:
        return summary
    import jax

    from eft_jax.distributed import peer_failure
    from eft_jax.jobs.merge import run_merge

    if peers.writer and not summary.interrupted and summary.stopped is None:
        summary.out.touch()  # a part with no line of its own is still a part (merge reads every one)
    try:
        parts = peers.gather(summary)
    except Exception as e:  # noqa: BLE001 - another process is gone: this one's part is kept, say so
        lost = peer_failure(e)
        if lost is None:
            raise
        summary.stopped = summary.stopped or lost
        return summary
    out = job.out or summary.out
    total = dataclasses.replace(summary, out=out, errors=errors_path(out), shard=None if job.out else summary.shard,
                                interrupted=any(p.interrupted for p in parts),
                                stopped=next((f"process group {g}: {p.stopped}" for g, p in enumerate(parts)
                                              if p.stopped is not None), None))
    for name in _COUNTS:
        setattr(total, name, sum(getattr(p, name) for p in parts))
    if job.out is not None and not total.interrupted and total.stopped is None and jax.process_index() == 0:
        paths = [Shard(g, peers.groups).path(job.out) for g in range(peers.groups)]
        try:
            run_merge(job.inputs, job.out, paths, log=log)
        except JobError as e:
            total.stopped = f"merging the process groups' outputs into {job.out}: {e}"
    total.wall_s = time.perf_counter() - job.start
    return total


def _with_prefix(req: Request, default: str) -> Request:
    """For the memory plan, which bounds a prompt's tokens by its text: the line with its response prefix's text
    added to the prompt (each model's rendered prompt ends with the prefix's tokens)."""
    prefix = req.response_prefix if req.response_prefix is not None else default
    if not prefix:
        return req
    if isinstance(req.prompt, str):
        return dataclasses.replace(req, prompt=req.prompt + prefix)
    return dataclasses.replace(req, prompt=[*req.prompt, {"role": "assistant", "content": prefix}])


def _load(job: _Job, first: Request | None, log: TextIO) -> JobEngine:
    """Check the tokenizers with the first prompt to run (before any weights), then load the models."""
    prompts = [first.prompt] if first is not None else []
    tokenizers = job.peers.agree(lambda: check_tokenizers(job.config, prompts), JobError)
    job.interrupts.check()
    return build_engine(job.config, mesh=job.mesh, tokenizers=tokenizers, interrupts=job.interrupts, log=log)


class _SameFailure:
    """Stops a job whose lines all fail with the same non-input error (a setup fault, not the lines').

    ``limit`` consecutive lines failing with one message (or every line, when there are fewer) raise
    JobError instead of filling the errors file with thousands of copies of it.
    """

    def __init__(self, limit: int, total: int):
        self.limit = max(1, min(limit, total))
        self.message: str | None = None
        self.count = 0

    def attempt(self, req: Request, issues: list[Issue], fit: Any) -> Any:
        """``fit()`` for one input line, or None after recording why it failed as the line's issue: a
        ``PromptError`` is the line's own problem; anything else also counts towards the limit."""
        try:
            result = fit()
        except PromptError as e:
            issues.append(_prompt_issue(req, e))
            return None
        except Exception as e:  # noqa: BLE001 - a template or tokenizer failure on one line must not stop the job
            issues.append(_prompt_issue(req, e))
            self.failed(issues[-1].message)
            return None
        self.count = 0
        return result

    def failed(self, message: str) -> None:
        self.count = self.count + 1 if message == self.message else 1
        self.message = message
        if self.count >= self.limit:
            raise JobError(f"{self.count} input lines in a row failed with the same error, which is not their "
                           f"fault; stopping. The error: {message}")


def _changed(output: OutputFile, req: Request, sample: int) -> Issue | None:
    recorded = output.done.get((req.key, sample))
    if recorded is not None and recorded != req.recorded:
        return Issue(req.line, req.id, "changed_prompt", f"id {req.id!r} is already in {output.path} with a "
                     "different prompt; its existing output is kept (use --overwrite or another --out to redo it)",
                     action="warning")
    return None


def run_generate(config: Config, prompts: Path, out: Path, *, overwrite: bool = False,
                 ignore_fingerprint: bool = False, progress: bool = True, log: TextIO | None = None,
                 interrupts: Interrupts | None = None, shard: Shard | None = None) -> Summary:
    """Generate ``n`` samples per input prompt into ``out`` (resumable); see the module docstring.

    ``prompts`` may be ``Path("-")`` (standard input). Raises JobError if the job cannot start.
    interrupts: the caller's SIGINT recorder, if it installed one earlier (the CLI does, at start-up).
    shard: run only that shard's lines, into ``shard.path(out)``.
    """
    log = log or sys.stderr  # looked up now: a caller (a notebook, a test) may have redirected it
    # The compiled programs the last run of this config used load in the background meanwhile.
    with interrupts or Interrupts() as interrupts, programs.warm_start(f"generate {config!r}"):
        job = _prepare(config, "generate", prompts, out, overwrite=overwrite, ignore_fingerprint=ignore_fingerprint,
                       interrupts=interrupts, log=log, shard=shard)
        return _generate(job, overwrite=overwrite, progress=progress, log=log)


def _generate(job: _Job, *, overwrite: bool, progress: bool, log: TextIO) -> Summary:
    config, summary, output = job.config, job.summary, job.output
    todo = _samples_to_run(job, overwrite)
    if not job.peers.ints([len(todo)]).any():
        return _finish(job, _nothing_to_do(job, log), log)

    jobs = _load(job, todo[0][0] if todo else None, log)
    engine = jobs.engine
    groups = _agree_on_groups(job, job.peers.agree(lambda: _render_groups(job, engine, todo), JobError))
    openai = job.format == OPENAI
    if openai:
        _write_error_lines(job)
    context = _response_context(job, jobs) if openai else None
    analysis = (engine.tokenizer, [(role, label) for role, _, label in jobs.roles])  # native top_logprobs

    def run(errors: ErrorsFile, bar: Progress) -> None:
        # Continuous batching over each group: the batch stays full until the group runs out; finished
        # samples are written after every decode chunk, and progress is reported after every chunk.
        for group in groups:
            for update in engine.run(group.requests, config.sampling.params(), batch_size=config.job.batch_size,
                                     seed=config.job.seed, stop_token_ids=config.sampling.stop_token_ids,
                                     stop=config.sampling.stop, end_tokens=config.sampling.end_tokens,
                                     return_component_logprobs=openai or group.top_logprobs > 0,
                                     top_logprobs=group.top_logprobs):
                if context is None:
                    records = [_sample_record(*group.origin[r.index], group.requests[r.index], r, summary, analysis)
                               for r in update.finished]
                    written = len(records)
                else:
                    records = group.openai_lines(context, update.finished, summary)
                    written = sum(len(rec["response"]["body"]["choices"]) for rec in records)
                output.append(records)
                summary.written += written
                summary.tokens += sum(len(r.tokens) for r in update.finished)
                bar.update(len(update.finished), update.tokens)
                job.interrupts.check()

    return _finish(job, _run(job, run, sum(len(g.requests) for g in groups), "samples", progress, log), log)


def _agree_on_groups(job: _Job, groups: list[_Group]) -> list[_Group]:
    """The groups (``Engine.run`` calls) of every process, in one order, each with the largest K any process
    asks of it: each process runs each of them, with its own lines (none, where it has no line of that kind)."""
    mine = {g.top_logprobs > 0: g for g in groups}
    ks: dict[bool, int] = {}
    for theirs in job.peers.gather({key: g.top_logprobs for key, g in mine.items()}):
        for key, k in theirs.items():
            ks[key] = max(ks.get(key, 0), k)
    return [dataclasses.replace(mine[key], top_logprobs=k) if key in mine else _Group(k) for key, k in sorted(ks.items())]


def _samples_to_run(job: _Job, overwrite: bool) -> list[tuple[Request, list[int]]]:
    """Each line with the sample indices it still needs (lines with none count as already done)."""
    config, output = job.config, job.output
    todo: list[tuple[Request, list[int]]] = []
    for req in job.requests:
        n = req.n if req.n is not None else (1 if req.api is not None else config.job.n)  # OpenAI's default n is 1
        samples = list(range(n)) if overwrite else [k for k in range(n) if (req.key, k) not in output.done]
        if req.api is not None and not overwrite:  # one output line per OpenAI line: there (kept as is) or not
            samples = [] if (req.key, 0) in output.done else list(range(n))
        changed = None if overwrite else _changed(output, req, 0)
        if changed:
            job.issues.append(changed)
        if samples:
            todo.append((req, samples))
        else:
            job.summary.already_done += 1
    return todo


def _render_groups(job: _Job, engine: Any, todo: list[tuple[Request, list[int]]]) -> list[_Group]:
    """Each line rendered once, for every model (the drafter too), with every check (a line that fails becomes
    an issue); then one request per sample, carrying the line's sampling settings, weights and stop strings.
    One group (one ``Engine.run``) for every line, and one apart for lines asking for top log-probs (its K: the
    largest k of its lines)."""
    from eft_jax.requests import stream_id

    config, issues = job.config, job.issues
    defaults = config.sampling.params()
    groups: dict[bool, _Group] = {}
    same = _SameFailure(config.job.batch_size, len(todo))
    for req, samples in todo:
        if config.speculative.k:
            penalty = next((k for k in ("repetition_penalty", "presence_penalty", "frequency_penalty")
                            if req.sampling.get(k, SETTINGS[k].neutral) != SETTINGS[k].neutral), None)
            if penalty is not None:
                issues.append(Issue(req.line, req.id, "unsupported_field", f"{penalty}={req.sampling[penalty]} is "
                                    "not supported with speculative decoding (speculative.k="
                                    f"{config.speculative.k}); drop it from the line or run without speculative.k"))
                continue
        try:
            sampling = dataclasses.replace(defaults, **req.sampling)
        except ValueError as e:
            issues.append(Issue(req.line, req.id, "invalid_field", str(e)))
            continue
        if sampling.logit_bias and sampling.logit_bias[-1][0] >= engine.vocab:
            where = "body.logit_bias" if req.api is not None else "field 'logit_bias'"
            issues.append(Issue(req.line, req.id, "invalid_field", f"{where}: token id {sampling.logit_bias[-1][0]} "
                                f"is outside the shared vocabulary (ids must be < {engine.vocab})"))
            continue
        max_new = req.max_new_tokens or config.job.max_new_tokens
        prefix = req.response_prefix if req.response_prefix is not None else config.job.response_prefix
        rendered = same.attempt(req, issues, lambda: engine.render(req.prompt, max_new, response_prefix=prefix,
                                                                   on_long_prompt=config.job.on_long_prompt))
        if rendered is None:
            continue
        if rendered.cut:
            issues.append(_truncated(req, rendered.cut, f"max_new_tokens={max_new}"))
        rendered = dataclasses.replace(rendered, sampling=sampling, weights=req.weights,
                                       stop=tuple(s for s in req.stop if s not in config.sampling.stop))
        k_top = req.api.top_logprobs if req.api is not None else req.top_logprobs
        group = groups.setdefault(k_top > 0, _Group(0))
        group.top_logprobs = max(group.top_logprobs, k_top)
        for k in samples:
            stream = stream_id(["seed", req.seed] if req.seed is not None else ["id", req.id], k)
            group.requests.append(dataclasses.replace(rendered, stream=stream))
            group.origin.append((req, k))
        group.samples[req.key] = len(samples)
    job.summary.prompts_run = len({req.key for g in groups.values() for req, _ in g.origin})
    job.summary.truncated = sum(1 for i in issues if i.action == "truncated")
    return list(groups.values())


@dataclasses.dataclass
class _Group:
    """The samples of one ``Engine.run``: every line, or those asking for top log-probs (``top_logprobs``: the
    run's K, the largest k of its lines; 0 for the others). Each request carries its line's settings. For OpenAI
    lines, the finished samples of a line wait in ``pending`` until all of them (``samples[key]``) are done."""

    top_logprobs: int
    requests: list[Any] = dataclasses.field(default_factory=list)  # Rendered, one per sample
    origin: list[tuple[Request, int]] = dataclasses.field(default_factory=list)  # (line, sample) of each
    samples: dict[str, int] = dataclasses.field(default_factory=dict)
    pending: dict[str, dict[int, Any]] = dataclasses.field(default_factory=dict)

    def openai_lines(self, context: ResponseContext, finished: list[Any], summary: Summary) -> list[dict[str, Any]]:
        """The OpenAI output lines of the input lines whose last sample is among ``finished``."""
        lines = []
        for r in finished:
            req, k = self.origin[r.index]
            rendered = self.requests[r.index]
            done = self.pending.setdefault(req.key, {})
            done[k] = Choice(r, rendered.cut)
            _count_speculative(r, summary)
            if len(done) == self.samples[req.key]:
                del self.pending[req.key]
                lines.append(response_line(context, req.api, [len(t) for t in rendered.tokens],
                                           [done[j] for j in sorted(done)], req.weights))
        return lines


def _response_context(job: _Job, jobs: JobEngine) -> ResponseContext:
    """What every OpenAI output line of this job shares (see ``openai_batch.ResponseContext``)."""
    config, engine = job.config, jobs.engine
    try:
        created = int(job.inputs.stat().st_mtime) if job.inputs != STDIN else int(time.time())
    except OSError:
        created = int(time.time())
    roles = ", ".join(f"{role}={name}" for role, name in config.roles())
    return ResponseContext(
        fingerprint=job.summary.fingerprint, created=created, default_model=f"eft-jax({roles})",
        roles=tuple(jobs.roles), ref_label=jobs.label("ref") if config.eft.ref else None,
        prompt_models=tuple(c.label for c in engine.runs), tokenizer=engine.tokenizer)


def _write_error_lines(job: _Job) -> None:
    """OpenAI format: an error output line for each input line skipped by this run, unless already there."""
    lines = [error_line(i.id, i.kind, i.message) for i in sorted(job.issues, key=lambda i: i.line or 0)
             if i.action == "skipped"]
    job.output.append([rec for rec in lines if error_key(rec) not in job.output.error_lines])
    job.output.error_lines.update(error_key(rec) for rec in lines)


def _truncated(req: Request, cut: int, budget: str) -> Issue:
    return Issue(req.line, req.id, "prompt_too_long", f"prompt cut by {cut} tokens from the left to fit the context "
                 f"with {budget} (job.on_long_prompt=truncate_left)", action="truncated")


def _sample_record(req: Request, sample: int, rendered: Any, result: Any, summary: Summary,
                   analysis: tuple[Any, list[tuple[str, str]]] | None = None) -> dict[str, Any]:
    """One output line of ``generate`` (and the speculative counts added to the summary). analysis: (tokenizer,
    (role, engine label) pairs) for a line's ``top_logprobs`` (``records.top_logprobs_field``)."""
    record = {
        "id": req.id, "sample": sample, "prompt": req.prompt, "response": result.text,
        "tokens": len(result.tokens), "finish_reason": result.finish_reason, "logprob": result.logprob,
        "prompt_truncated": rendered.cut > 0, "fingerprint": summary.fingerprint,
    }
    if isinstance(result.stop_reason, str):  # which stop string ended it (stop tokens: finish_reason alone)
        record["stop"] = result.stop_reason
    spec = result.speculative
    if spec is not None:
        record["speculative"] = {"rounds": spec.rounds, "drafted": spec.drafted, "accepted": spec.accepted,
                                 "rejected": spec.rejected}
    if req.top_logprobs and analysis is not None:
        record["top_logprobs"] = top_logprobs_field(*analysis, result, req.top_logprobs)
    _count_speculative(result, summary)
    return record


def _count_speculative(result: Any, summary: Summary) -> None:
    spec = result.speculative
    if spec is not None:
        summary.drafted += spec.drafted
        summary.accepted += spec.accepted
        summary.rejected += spec.rejected
        summary.rounds += spec.rounds


def _run(job: _Job, body: Any, total: int, unit: str, progress: bool, log: TextIO) -> Summary:
    """Run ``body(errors, bar)`` - the batches - then count, and put the output in input order.

    The errors file starts with the input's issues. Ctrl-C marks the summary interrupted; any other
    error stops the job with a message (batches already written are kept, and a re-run resumes).
    """
    import jax

    summary = job.summary
    errors = ErrorsFile(summary.errors, writer=job.peers.writer, shard=summary.shard)
    errors.start(job.issues)
    summary.setup_s = time.perf_counter() - job.start
    bar = Progress(total, unit=unit, stream=log, enabled=progress and jax.process_index() == 0)
    run_start = time.perf_counter()
    try:
        body(errors, bar)
    except KeyboardInterrupt:
        summary.interrupted = True
    except Exception as e:  # noqa: BLE001 - whatever stops the run, the written batches are kept
        from eft_jax.distributed import peer_failure

        lost = peer_failure(e)  # multi-process: another process is gone (no traceback: it is not this one's bug)
        summary.stopped = lost or f"{type(e).__name__}: {e}"
        print(f"eft-jax {summary.command}: stopped by an error after {summary.written} written:"
              + (f" {lost}" if lost else ""), file=log)
        if not lost:
            traceback.print_exc(file=log)
    finally:
        bar.close()
    summary.skipped = sum(1 for i in job.issues if i.action == "skipped")
    summary.warnings = sum(1 for i in job.issues if i.action == "warning")
    summary.run_s = time.perf_counter() - run_start
    if not summary.interrupted and summary.stopped is None:
        _sort_output(job)
    summary.wall_s = time.perf_counter() - job.start
    return summary


def _sort_output(job: _Job) -> None:
    """Rewrite the output in input order (atomic; Ctrl-C during it leaves the old file whole). OpenAI error
    lines go at their input line; those of lines that are no longer skipped go."""
    if job.format == OPENAI:
        order = {req.key: req.line for req in job.requests}
        order.update({error_key(error_line(i.id, i.kind, i.message)): i.line or 0 for i in job.issues
                      if i.action == "skipped"})
    else:
        order = {req.key: i for i, req in enumerate(job.requests)}
    try:
        job.output.sort(order)
    except KeyboardInterrupt:
        job.summary.interrupted = True


def _prompt_issue(req: Request, error: Exception) -> Issue:
    """An issue for a prompt that cannot be run as it is (too long under "skip", or not renderable)."""
    if isinstance(error, PromptError):
        return Issue(req.line, req.id, "prompt_too_long" if "context" in str(error) else "invalid_prompt", str(error))
    return Issue(req.line, req.id, "invalid_prompt", f"cannot render the prompt: {type(error).__name__}: {error}")


def _nothing_to_do(job: _Job, log: TextIO) -> Summary:
    """No line left to run: say why (no lines, none valid, all done), write the errors file, sort the output."""
    summary = job.summary
    ErrorsFile(summary.errors, writer=job.peers.writer, shard=summary.shard).start(job.issues)
    if job.format == OPENAI:
        _write_error_lines(job)
    summary.skipped = sum(1 for i in job.issues if i.action == "skipped")
    if summary.lines == 0:
        source = "standard input" if job.inputs == STDIN else str(job.inputs)
        why = (f"{source} has no input lines" if job.shard is None else
               f"{source} has no input lines in shard {summary.shard}")
    elif not job.requests:
        why = f"none of the {summary.lines} input lines is valid (see {summary.errors})"
    else:
        why = (f"every valid input line is already in {summary.out} (pass --overwrite to redo it, or choose "
               "another --out)")
        _sort_output(job)
    print(f"eft-jax {summary.command}: nothing to do: {why}", file=log)
    summary.wall_s = time.perf_counter() - job.start
    return summary


def run_score(config: Config, pairs: Path, out: Path, *, rewards: bool = False, overwrite: bool = False,
              ignore_fingerprint: bool = False, progress: bool = True, log: TextIO | None = None,
              interrupts: Interrupts | None = None, shard: Shard | None = None) -> Summary:
    """EFT log-likelihood of each (prompt, response) pair into ``out`` (resumable).

    Each output line has the summed EFT log-prob and, for an EFT config, the summed implicit reward
    ``log p_ft - log p_ref`` per fine-tune; with ``rewards`` also per-token log-probs and rewards.
    ``pairs`` may be ``Path("-")``; ``interrupts`` and ``shard`` as for :func:`run_generate`.
    """
    if rewards and config.eft.ref is None:
        raise JobError(f"{config.source}: --rewards needs an EFT config (eft.ref and eft.fine_tuned); "
                       "the implicit reward is log p_ft - log p_ref")
    log = log or sys.stderr
    with interrupts or Interrupts() as interrupts, programs.warm_start(f"score {config!r}"):
        job = _prepare(config, "score", pairs, out, overwrite=overwrite, ignore_fingerprint=ignore_fingerprint,
                       interrupts=interrupts, log=log, shard=shard)
        return _score(job, rewards=rewards, overwrite=overwrite, progress=progress, log=log)


def _score(job: _Job, *, rewards: bool, overwrite: bool, progress: bool, log: TextIO) -> Summary:
    config, summary, output, issues = job.config, job.summary, job.output, job.issues
    todo = []
    for req in job.requests:
        if not overwrite and (req.key, 0) in output.done:
            summary.already_done += 1
            changed = _changed(output, req, 0)
            if changed:
                issues.append(changed)
        else:
            todo.append(req)
    if not job.peers.ints([len(todo)]).any():
        return _finish(job, _nothing_to_do(job, log), log)

    jobs = _load(job, todo[0] if todo else None, log)
    engine = jobs.engine
    lines, pairs = job.peers.agree(lambda: _render_pairs(job, engine, todo), JobError)
    summary.prompts_run = len(pairs)
    summary.truncated = sum(1 for i in issues if i.action == "truncated")

    ref = jobs.label("ref") if config.eft.ref else None
    fts = [(name, label) for role, name, label in jobs.roles if role.startswith("ft")]

    def run(errors: ErrorsFile, bar: Progress) -> None:
        for results in engine.score_rendered(pairs, batch_size=config.job.batch_size):
            records = []
            for r in results:
                req = lines[r.index]
                rec: dict[str, Any] = {"id": req.id, "prompt": req.prompt, "response": req.response,
                                       "tokens": len(r.tokens), "logprob": r.logprob}
                if ref is not None:
                    per_token = {name: [a - b for a, b in zip(r.component_logprobs[label],
                                                              r.component_logprobs[ref], strict=True)]
                                 for name, label in fts}
                    rec["reward"] = {name: float(sum(v)) for name, v in per_token.items()}
                    if rewards:
                        rec["token_logprobs"] = r.token_logprobs
                        rec["token_rewards"] = per_token
                elif rewards:
                    rec["token_logprobs"] = r.token_logprobs
                rec["prompt_truncated"] = pairs[r.index].cut > 0
                rec["fingerprint"] = summary.fingerprint
                records.append(rec)
            output.append(records)
            summary.written += len(records)
            tokens = sum(rec["tokens"] for rec in records)
            summary.tokens += tokens
            bar.update(len(records), tokens)
            job.interrupts.check()

    return _finish(job, _run(job, run, len(pairs), "pairs", progress, log), log)


def _render_pairs(job: _Job, engine: Any, todo: list[Request]) -> tuple[list[Request], list[Any]]:
    """Each (prompt, response) line rendered for every model (a line that fails becomes an issue)."""
    config, issues = job.config, job.issues
    lines: list[Request] = []
    pairs: list[Any] = []
    same = _SameFailure(config.job.batch_size, len(todo))
    for req in todo:
        prefix = req.response_prefix if req.response_prefix is not None else config.job.response_prefix
        pair = same.attempt(req, issues, lambda: engine.render_pair(req.prompt, req.response, response_prefix=prefix,
                                                                    on_long_prompt=config.job.on_long_prompt))
        if pair is None:
            continue
        if pair.cut:
            issues.append(_truncated(req, pair.cut, f"the {pair.max_new}-token response"))
        lines.append(req)
        pairs.append(pair)
    return lines, pairs

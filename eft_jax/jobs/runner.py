"""Batch offline jobs: ``generate`` (samples per prompt) and ``score`` (log-likelihood of given pairs).

Both follow the same steps, failing before any work on a bad setup: check the model files, read the
input (bad lines become issues), open the output (resume: skip what is there; refuse another config's
output), load the models and build the engine (tokenizers must match), apply the long-prompt policy,
then run batch by batch, appending each finished batch to the output.

Randomness: a sample's stream is ``engine.stream_id(["id", id], k)`` for sample ``k`` of a line, or
``stream_id(["seed", seed], k)`` when the line gives its own ``seed``, combined with ``job.seed``. So a
sample depends on neither the batch nor the order of the input nor on what was done before a resume;
with a per-line seed it does not depend on the id either (same prompt + same seed = same sample).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from eft_jax.config import Config, MeshConfig, missing_model_files, resolve_model_path
from eft_jax.jobs.fit import fit_prompt
from eft_jax.jobs.progress import Progress, format_duration
from eft_jax.jobs.records import ErrorsFile, Issue, JobError, OutputFile, Request, errors_path, read_requests
from eft_jax.prompts import PromptError

# Rows per engine call: bounds host memory on huge inputs; the engine sorts by length within a slab.
SLAB_BATCHES = 32


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
    drafted: int = 0  # speculative decoding: drafted, accepted and rejected drafts, rounds
    accepted: int = 0
    rejected: int = 0
    rounds: int = 0

    def render(self) -> str:
        unit = "samples" if self.command == "generate" else "pairs"
        state = "interrupted" if self.interrupted else "done"
        rate = self.tokens / self.run_s if self.run_s > 0 else 0.0
        verb = "generated" if self.command == "generate" else "scored"
        lines = [
            f"eft-jax {self.command}: {state}: {self.written} {unit} written to {self.out}",
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
        if self.interrupted:
            lines.append("  re-run the same command to resume: finished batches are kept")
        return "\n".join(lines)


@dataclasses.dataclass
class JobEngine:
    """The engine plus the config names of its components (engine order: base, ref, fine-tunes)."""

    engine: Any
    roles: list[tuple[str, str, str]]  # (role, model name, engine label)

    def label(self, role: str) -> str:
        return next(label for r, _, label in self.roles if r == role)


def make_job_mesh(mc: MeshConfig) -> Any:
    """The ``(data, model)`` mesh of a config over the first ``data * model`` visible devices."""
    import jax

    from eft_jax.sharding import make_mesh

    devices = jax.devices()
    where = f"{len(devices)} {devices[0].platform.upper()} device(s) visible"
    if mc.model > len(devices):
        raise JobError(f"mesh.model={mc.model} needs at least {mc.model} devices; {where}. Lower mesh.model.")
    data = mc.data if mc.data != -1 else len(devices) // mc.model
    if data * mc.model > len(devices):
        raise JobError(f"mesh.data={data} x mesh.model={mc.model} needs {data * mc.model} devices; {where}. "
                       "Lower mesh.data or mesh.model (mesh.data=-1 uses every device not used by mesh.model).")
    return make_mesh(data, mc.model, devices[: data * mc.model])


def build_engine(config: Config, *, log: TextIO = sys.stderr) -> JobEngine:
    """Load each distinct (path, dtype, sharding) once, build the EFT spec and the engine."""
    import jax.numpy as jnp

    from eft_jax.engine import Engine
    from eft_jax.loading import load_model
    from eft_jax.spec import Component, EFTSpec
    from eft_jax.vocab import VocabMismatchError

    mesh = make_job_mesh(config.mesh)
    loaded: dict[tuple[str, str | None, str], Any] = {}
    components: dict[str, Any] = {}
    roles = []

    def load(name: str) -> Any:
        entry = config.models[name]
        path = resolve_model_path(entry.path)
        key = (str(path), entry.dtype, entry.sharding)
        if key not in loaded:
            start = time.perf_counter()
            loaded[key] = load_model(path, dtype=jnp.dtype(entry.dtype) if entry.dtype else None, mesh=mesh,
                                     sharding=entry.sharding)
            m = loaded[key]
            print(f"eft-jax: loaded models.{name} ({path}): {_count(m.config.num_params)} parameters, "
                  f"{jnp.dtype(m.dtype).name}, {entry.sharding}, {time.perf_counter() - start:.1f}s", file=log)
        return loaded[key]

    for role, name in config.roles():
        entry = config.models[name]
        label = f"{role}={name}"
        try:
            components[role] = Component(load(name), entry.prompt_format, label)
        except ValueError as e:
            raise JobError(f"{config.source}: models.{name}.prompt_format: {e}; use 'plain' or a template "
                           "with {prompt}") from None
        roles.append((role, name, label))
    fts = tuple(components[r] for r, _, _ in roles if r.startswith("ft"))
    drafter: int | Any = None
    if config.speculative.k:
        name = config.drafter_name()
        in_rule = [i for i, (_, n) in enumerate(config.roles()) if n == name]
        if in_rule:
            drafter = in_rule[0]
        else:  # a drafter outside the EFT rule
            drafter = Component(load(name), config.models[name].prompt_format, f"drafter={name}")
    try:
        spec = EFTSpec(base=components["base"], ref=components.get("ref"), fine_tuned=fts,
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


def _count(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _is_writer() -> bool:
    import jax

    return jax.process_index() == 0


def _prepare(config: Config, command: str, inputs: Path, out: Path, *, overwrite: bool, ignore_fingerprint: bool,
             log: TextIO) -> tuple[Summary, list[Request], list[Issue], OutputFile]:
    """Checks that need no models: model files, the input, the existing output."""
    fingerprint = config.fingerprint(command)
    summary = Summary(command, out, errors_path(out), fingerprint)
    missing = missing_model_files(config)
    if missing:
        raise JobError(f"{config.source}: model file(s) not found:\n  " + "\n  ".join(missing))
    requests, issues, summary.lines = read_requests(inputs, score=command == "score")
    output = OutputFile(out, fingerprint, overwrite=overwrite, ignore_fingerprint=ignore_fingerprint,
                        writer=_is_writer(), log=log)
    return summary, requests, issues, output


def _changed(output: OutputFile, req: Request, sample: int) -> Issue | None:
    recorded = output.done.get((req.key, sample))
    if recorded is not None and recorded != req.prompt:
        return Issue(req.line, req.id, "changed_prompt", f"id {req.id!r} is already in {output.path} with a "
                     "different prompt; its existing output is kept (use --overwrite or another --out to redo it)",
                     action="warning")
    return None


def run_generate(config: Config, prompts: Path, out: Path, *, overwrite: bool = False,
                 ignore_fingerprint: bool = False, progress: bool = True, log: TextIO = sys.stderr) -> Summary:
    """Generate ``n`` samples per input prompt into ``out`` (resumable); see the module docstring."""
    from eft_jax.engine import stream_id

    start = time.perf_counter()
    summary, requests, issues, output = _prepare(config, "generate", prompts, out, overwrite=overwrite,
                                                 ignore_fingerprint=ignore_fingerprint, log=log)
    todo: list[tuple[Request, list[int]]] = []
    for req in requests:
        n = req.n if req.n is not None else config.job.n
        samples = list(range(n)) if overwrite else [k for k in range(n) if (req.key, k) not in output.done]
        changed = None if overwrite else _changed(output, req, 0)
        if changed:
            issues.append(changed)
        if samples:
            todo.append((req, samples))
        else:
            summary.already_done += 1
    if not todo:
        return _nothing_to_do(summary, issues, start, log)

    jobs = build_engine(config, log=log)
    engine = jobs.engine
    models = getattr(engine, "components", engine.spec.components)  # every model that renders the prompt
    rows: list[tuple[Request, int, Any, int, int]] = []  # (request, sample, prompt to run, max_new, stream)
    truncated: set[str] = set()
    for req, samples in todo:
        max_new = req.max_new_tokens or config.job.max_new_tokens
        try:
            prompt, cut = fit_prompt(models, req.prompt, max_new, config.job.on_long_prompt)
        except Exception as e:  # noqa: BLE001 - a template or tokenizer failure on one prompt must not stop the job
            issues.append(_prompt_issue(req, e))
            continue
        if cut:
            truncated.add(req.key)
            issues.append(Issue(req.line, req.id, "prompt_too_long", f"prompt cut by {cut} tokens from the left to "
                                f"fit the context with max_new_tokens={max_new} (job.on_long_prompt=truncate_left)",
                                action="truncated"))
        for k in samples:
            stream = stream_id(["seed", req.seed] if req.seed is not None else ["id", req.id], k)
            rows.append((req, k, prompt, max_new, stream))
    summary.prompts_run = len({r[0].key for r in rows})
    summary.truncated = len(truncated)

    errors, bar = _open_run(summary, issues, output, out, overwrite, start, len(rows), "samples", log, progress)
    sampling = config.sampling.params()
    run_start = time.perf_counter()
    slab_rows = config.job.batch_size * SLAB_BATCHES
    try:
        for s in range(0, len(rows), slab_rows):
            slab = rows[s: s + slab_rows]

            def on_batch(results: list[Any], slab: list = slab) -> None:
                records = []
                for r in results:
                    req, k, _, _, _ = slab[r.index]
                    records.append({
                        "id": req.id, "sample": k, "prompt": req.prompt, "response": r.text,
                        "tokens": len(r.tokens), "finish_reason": r.finish_reason, "logprob": r.logprob,
                        "prompt_truncated": req.key in truncated, "fingerprint": summary.fingerprint,
                    })
                    if r.speculative is not None:
                        records[-1]["speculative"] = {"rounds": r.speculative.rounds,
                                                      "drafted": r.speculative.drafted,
                                                      "accepted": r.speculative.accepted,
                                                      "rejected": r.speculative.rejected}
                        summary.drafted += r.speculative.drafted
                        summary.accepted += r.speculative.accepted
                        summary.rejected += r.speculative.rejected
                        summary.rounds += r.speculative.rounds
                output.append(records)
                tokens = sum(len(r.tokens) for r in results)
                summary.written += len(records)
                summary.tokens += tokens
                bar.update(len(records), tokens)

            results = engine.generate(
                [r[2] for r in slab], sampling, max_new_tokens=[r[3] for r in slab],
                batch_size=config.job.batch_size, seed=config.job.seed, ids=[r[4] for r in slab],
                stop_token_ids=config.sampling.stop_token_ids, on_error="report", on_batch=on_batch,
            )
            failed = [(slab[r.index][0], r.error) for r in results if r.error is not None]
            _report_failures(failed, errors, bar)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        bar.close()
    return _close_summary(summary, issues, errors, start, run_start)


def _open_run(summary: Summary, issues: Sequence[Issue], output: OutputFile, out: Path, overwrite: bool,
              start: float, total: int, unit: str, log: TextIO, progress: bool) -> tuple[ErrorsFile, Progress]:
    """Start the errors file with the input's issues, clear the output on --overwrite, start the bar."""
    errors = ErrorsFile(summary.errors, writer=_is_writer())
    errors.start(issues)
    if overwrite and output.writer and out.exists():
        out.unlink()
    summary.setup_s = time.perf_counter() - start
    return errors, Progress(total, unit=unit, stream=log, enabled=progress and _is_writer())


def _close_summary(summary: Summary, issues: Sequence[Issue], errors: ErrorsFile, start: float,
                   run_start: float) -> Summary:
    """Counts and times at the end of a run (also an interrupted one)."""
    summary.skipped = sum(1 for i in issues if i.action == "skipped") + errors.failed_prompts
    summary.warnings = sum(1 for i in issues if i.action == "warning")
    summary.run_s = time.perf_counter() - run_start
    summary.wall_s = time.perf_counter() - start
    return summary


def _prompt_issue(req: Request, error: Exception) -> Issue:
    """An issue for a prompt that cannot be run as it is (too long under "skip", or not renderable)."""
    if isinstance(error, PromptError):
        return Issue(req.line, req.id, "prompt_too_long" if "context" in str(error) else "invalid_prompt", str(error))
    return Issue(req.line, req.id, "invalid_prompt", f"cannot render the prompt: {type(error).__name__}: {error}")


def _report_failures(failed: Sequence[tuple[Request, str]], errors: ErrorsFile, bar: Progress) -> None:
    """Prompts the engine refused at run time (reported once per prompt)."""
    seen: dict[str, Issue] = {}
    for req, message in failed:
        seen.setdefault(req.key, Issue(req.line, req.id, "invalid_prompt", message))
        bar.update(1, 0)
    errors.add(seen.values())
    errors.failed_prompts += len(seen)


def _nothing_to_do(summary: Summary, issues: list[Issue], start: float, log: TextIO) -> Summary:
    summary.skipped = sum(1 for i in issues if i.action == "skipped")
    summary.wall_s = time.perf_counter() - start
    print(f"eft-jax {summary.command}: nothing to do: every valid input line is already in {summary.out} "
          "(pass --overwrite to redo it, or choose another --out)", file=log)
    return summary


def run_score(config: Config, pairs: Path, out: Path, *, rewards: bool = False, overwrite: bool = False,
              ignore_fingerprint: bool = False, progress: bool = True, log: TextIO = sys.stderr) -> Summary:
    """EFT log-likelihood of each (prompt, response) pair into ``out`` (resumable).

    Each output line has the summed EFT log-prob and, for an EFT config, the summed implicit reward
    ``log p_ft - log p_ref`` per fine-tune; with ``rewards`` also per-token log-probs and rewards.
    """
    start = time.perf_counter()
    summary, requests, issues, output = _prepare(config, "score", pairs, out, overwrite=overwrite,
                                                 ignore_fingerprint=ignore_fingerprint, log=log)
    if rewards and config.eft.ref is None:
        raise JobError(f"{config.source}: --rewards needs an EFT config (eft.ref and eft.fine_tuned); "
                       "the implicit reward is log p_ft - log p_ref")
    todo = []
    for req in requests:
        if not overwrite and (req.key, 0) in output.done:
            summary.already_done += 1
            changed = _changed(output, req, 0)
            if changed:
                issues.append(changed)
        else:
            todo.append(req)
    if not todo:
        return _nothing_to_do(summary, issues, start, log)

    jobs = build_engine(config, log=log)
    engine = jobs.engine
    rows: list[tuple[Request, Any, list[int], int]] = []  # (request, prompt to run, response ids, sort length)
    truncated: set[str] = set()
    for req in todo:
        try:
            response = engine.tokenizer(req.response, add_special_tokens=False)["input_ids"]
            if not response:
                raise PromptError("the response encodes to no tokens")
            prompt, cut = fit_prompt(engine.spec.components, req.prompt, len(response), config.job.on_long_prompt)
        except Exception as e:  # noqa: BLE001 - see run_generate
            issues.append(_prompt_issue(req, e))
            continue
        if cut:
            truncated.add(req.key)
            issues.append(Issue(req.line, req.id, "prompt_too_long", f"prompt cut by {cut} tokens from the left to "
                                f"fit the context with the {len(response)}-token response", action="truncated"))
        rows.append((req, prompt, response, len(response) + len(str(prompt))))
    rows.sort(key=lambda r: -r[3])  # similar lengths share a batch
    summary.prompts_run = len(rows)
    summary.truncated = len(truncated)

    errors, bar = _open_run(summary, issues, output, out, overwrite, start, len(rows), "pairs", log, progress)
    ref = jobs.label("ref") if config.eft.ref else None
    fts = [(name, label) for role, name, label in jobs.roles if role.startswith("ft")]
    run_start = time.perf_counter()
    bs = config.job.batch_size
    try:
        for s in range(0, len(rows), bs):
            batch = rows[s: s + bs]
            results = engine.score([r[1] for r in batch], [r[2] for r in batch], batch_size=bs, on_error="report")
            records, failed = [], []
            for (req, _, _, _), r in zip(batch, results, strict=True):
                if r.error is not None:
                    failed.append((req, r.error))
                    continue
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
                rec["prompt_truncated"] = req.key in truncated
                rec["fingerprint"] = summary.fingerprint
                records.append(rec)
            output.append(records)
            summary.written += len(records)
            tokens = sum(rec["tokens"] for rec in records)
            summary.tokens += tokens
            bar.update(len(records), tokens)
            _report_failures(failed, errors, bar)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        bar.close()
    return _close_summary(summary, issues, errors, start, run_start)

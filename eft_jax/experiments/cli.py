"""``eft-jax experiments humaneval --config JOB.yaml --out DIR [key.sub=value ...]``: HumanEval for one job config.

Three resumable stages, all files under ``DIR``:

1. ``prompts.jsonl``: one line per problem (id = task id): a chat request (``--prompt-form messages``, the
   default: the instruction and the prompt's code as one user message) or the bare code prompt
   (``--prompt-form code``, for base models continuing the function).
2. ``samples.jsonl``: the config's generation job on those prompts (``eft-jax generate``'s runner:
   resumable, with its progress line; use ``sampling.temperature=0`` for greedy pass@1).
3. ``results.jsonl`` and ``summary.json``: each sample's program (:func:`humaneval.program`) run against the
   problem's tests in the sandbox (:func:`humaneval.run_tests`): status, error tail, seconds, and the
   answer's shape (:func:`humaneval.answer_shape`: one fenced block with type hints and docstrings, nothing
   else); then pass@1 (the fraction of samples that pass), the fraction of answers of that shape
   (``answer_shape``) and the counts. Recomputed from the samples on every run (seconds).
   ``generation.json`` sums the generated tokens and decoding seconds over (resumed) runs.

``eft-jax experiments humaneval-grid --small S --large L --out DIR``: the issue-16 LoRA up-scaling grid
(:mod:`eft_jax.experiments.grid`): SFT set, LoRA on both models, one humaneval run per row, results table.

Exit status: 0 done, 1 the generation stopped on an error, 2 it could not start, 130 interrupted (re-run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eft_jax.experiments import humaneval as he


def write_prompts(problems: Sequence[he.Problem], path: Path, form: str) -> None:
    """One JSONL request per problem (rewritten whole, so an edited instruction is seen by the job's check)."""
    lines = []
    for p in problems:
        request = {"id": p.task_id, "messages": he.chat_messages(p)} if form == "messages" else {"id": p.task_id,
                                                                                                 "prompt": p.prompt}
        lines.append(json.dumps(request, ensure_ascii=False) + "\n")
    _write_atomically(path, "".join(lines))


def score_samples(problems: Sequence[he.Problem], samples: Path, limits: he.Limits, workers: int) -> list[dict[str, Any]]:
    """One result per sample line of a problem in ``problems``, in the samples' order."""
    by_id = {p.task_id: p for p in problems}
    records = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
    records = [r for r in records if r.get("id") in by_id]
    outcomes = he.run_many([(by_id[r["id"]], he.program(by_id[r["id"]], r["response"])) for r in records], limits,
                           workers)
    return [{"id": r["id"], "sample": r["sample"], "status": o.status, "error": o.error, "seconds": round(o.seconds, 3),
             "shape": dataclasses.asdict(he.answer_shape(r["response"])), "fingerprint": r.get("fingerprint")}
            for r, o in zip(records, outcomes)]


def summarize(results: Sequence[dict[str, Any]], problems: int) -> dict[str, Any]:
    counts = {status: sum(r["status"] == status for r in results) for status in ("passed", "failed", "timed_out")}
    adherent = sum(all(r["shape"].values()) for r in results)
    return {"problems": problems, "samples": len(results), **counts,
            "pass@1": counts["passed"] / len(results) if results else None,
            "answer_shape": adherent / len(results) if results else None,
            "fingerprints": sorted({r["fingerprint"] for r in results if r["fingerprint"]})}


def run_humaneval(config: Any, out_dir: Path, *, limit: int | None = None, prompt_form: str = "messages",
                  limits: he.Limits = he.Limits(), workers: int = 4, progress: bool = True,
                  log: Any = print) -> int:
    """The three stages; returns the exit status."""
    from eft_jax.jobs import run_generate

    problems = he.load_problems()[:limit]
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts, samples = out_dir / "prompts.jsonl", out_dir / "samples.jsonl"
    write_prompts(problems, prompts, prompt_form)
    summary = run_generate(config, prompts, samples, progress=progress)
    log(summary.render())
    if summary.tokens:  # decoding speed, accumulated over resumed runs (generation.json)
        gen_path = out_dir / "generation.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {"tokens": 0, "run_s": 0.0, "runs": 0}
        gen = {"tokens": gen["tokens"] + summary.tokens, "run_s": gen["run_s"] + summary.run_s, "runs": gen["runs"] + 1}
        _write_atomically(gen_path, json.dumps(gen) + "\n")
    if summary.exit_status != 0:
        return summary.exit_status
    results = score_samples(problems, samples, limits, workers)
    _write_atomically(out_dir / "results.jsonl", "".join(json.dumps(r) + "\n" for r in results))
    totals = summarize(results, len(problems))
    _write_atomically(out_dir / "summary.json", json.dumps(totals, indent=2) + "\n")
    log(f"HumanEval: {totals['passed']}/{totals['samples']} samples pass (pass@1 {totals['pass@1']:.3f}), "
        f"{totals['failed']} failed, {totals['timed_out']} timed out; answer shape kept "
        f"{totals['answer_shape']:.3f}; {out_dir / 'results.jsonl'}")
    return 0


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``eft-jax experiments``."""
    p = argparse.ArgumentParser(prog="eft-jax experiments", description="Benchmarks run through a job config.")
    sub = p.add_subparsers(dest="experiment", required=True)
    h = sub.add_parser("humaneval", help="HumanEval pass@1 of a job config (resumable)",
                       description="HumanEval pass@1 and answer shape of a job config's samples: prompts, "
                       "generation, sandboxed tests, summary, all resumable under --out (docs/experiments.md).")
    h.add_argument("--config", required=True, help="YAML job config (as for eft-jax generate)")
    h.add_argument("--out", required=True, help="directory for prompts, samples, results and summary")
    h.add_argument("--limit", type=int, default=None, help="only the first N problems")
    h.add_argument("--prompt-form", choices=["messages", "code"], default="messages",
                   help="messages: a chat request per problem (default); code: the bare prompt to continue")
    h.add_argument("--timeout", type=float, default=10.0, help="seconds per program (default 10)")
    h.add_argument("--workers", type=int, default=4, help="programs run at once (default 4)")
    h.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    h.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. sampling.temperature=0")
    g = sub.add_parser("humaneval-grid", help="the issue-16 LoRA up-scaling grid on HumanEval (resumable)",
                       description="Code SFT set, LoRA on SMALL and LARGE, HumanEval of small, small+LoRA, large, "
                       "large+LoRA and up-scaling rows, results table (docs/experiments.md, eft_jax/experiments/grid.py).")
    g.add_argument("--small", required=True, help="the small model (any source load_model reads, e.g. pkg:..., a dir)")
    g.add_argument("--large", required=True, help="the large model")
    g.add_argument("--out", required=True, help="directory for every stage's files")
    g.add_argument("--limit", type=int, default=None, help="only the first N problems")
    g.add_argument("--stages", nargs="+", choices=["sft", "train", "eval", "results"],
                   default=["sft", "train", "eval", "results"], help="stages to run (default: all)")
    g.add_argument("--rows", nargs="+", default=None, help="only these rows in stage eval (default: all)")
    g.add_argument("--steps", type=int, default=200, help="LoRA steps (default 200)")
    g.add_argument("--batch-size", type=int, default=8, help="LoRA rows per step (default 8)")
    g.add_argument("--seq-len", type=int, default=512, help="LoRA row length in tokens (default 512)")
    g.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16; alpha = 2 x rank)")
    g.add_argument("--learning-rate", type=float, default=2.0e-4, help="LoRA learning rate (default 2e-4)")
    g.add_argument("--dtype", default="float32", help="decoding dtype of every model (default float32)")
    g.add_argument("--max-new-tokens", type=int, default=512, help="per answer (default 512)")
    g.add_argument("--batch", type=int, default=8, help="decoding batch size (default 8)")
    g.add_argument("--weights", type=float, nargs="+", default=[0.5, 1.0, 1.5], help="up-scaling weights")
    g.add_argument("--speculative-k", type=int, default=4, help="drafted tokens of the speculative row (0: no row)")
    g.add_argument("--train-set", nargs="*", default=[], metavar="key=value", help="train config overrides")
    g.add_argument("--job-set", nargs="*", default=[], metavar="key=value", help="job config overrides (every row)")
    g.add_argument("--publish", default=None, help="also copy results.md/json and the training logs here (docs/...)")
    g.add_argument("--timeout", type=float, default=10.0, help="seconds per program (default 10)")
    g.add_argument("--workers", type=int, default=4, help="programs run at once (default 4)")
    g.add_argument("--no-progress", action="store_true", help="no generation progress line on stderr")
    args = p.parse_args(argv)

    from eft_jax.compile_cache import configure
    from eft_jax.config import ConfigError, load_config
    from eft_jax.jobs import JobError
    from eft_jax.loading.source import CheckpointError
    from eft_jax.models.config import UnsupportedConfigError

    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    try:
        he.data_file()  # the problems are there before any model is loaded
    except (ModuleNotFoundError, FileNotFoundError) as e:
        print(f"eft-jax experiments {args.experiment}: error: {e}", file=sys.stderr)
        return 2
    if args.experiment == "humaneval-grid":
        from eft_jax.experiments.grid import GridSettings, run_grid
        from eft_jax.train.cli import TrainConfigError

        settings = GridSettings(lora_rank=args.rank, lora_alpha=2.0 * args.rank, steps=args.steps,
                                batch_size=args.batch_size, seq_len=args.seq_len, learning_rate=args.learning_rate,
                                dtype=args.dtype, max_new_tokens=args.max_new_tokens, batch=args.batch,
                                weights=tuple(args.weights), speculative_k=args.speculative_k,
                                train_overrides=tuple(args.train_set), job_overrides=tuple(args.job_set))
        try:
            return run_grid(args.small, args.large, Path(args.out), settings=settings, limit=args.limit,
                            stages=args.stages, only_rows=args.rows, workers=args.workers, timeout=args.timeout,
                            progress=not args.no_progress, publish=Path(args.publish) if args.publish else None,
                            log=lambda s: print(s, flush=True))
        except (ConfigError, JobError, CheckpointError, UnsupportedConfigError, TrainConfigError, ValueError,
                FileNotFoundError) as e:
            print(f"eft-jax experiments {args.experiment}: error: {e}", file=sys.stderr)
            return 2
    try:
        config = load_config(args.config, args.overrides)
        configure(config.job.compile_cache)  # JAX's persistent compilation cache, as for eft-jax generate
        limits = he.Limits(timeout=args.timeout, cpu_seconds=max(1, int(args.timeout) * 2))
        return run_humaneval(config, Path(args.out), limit=args.limit, prompt_form=args.prompt_form, limits=limits,
                             workers=args.workers, progress=not args.no_progress,
                             log=lambda s: print(s, flush=True))
    except (ConfigError, JobError, CheckpointError, UnsupportedConfigError) as e:
        print(f"eft-jax experiments {args.experiment}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

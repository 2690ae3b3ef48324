"""Batch offline jobs: JSONL prompts in, resumable JSONL samples (or scores) out."""

from eft_jax.jobs.records import (
    Issue, JobError, OutputFile, Request, Shard, errors_path, read_requests, shard_of,
)
from eft_jax.jobs.runner import Summary, build_engine, run_generate, run_score

__all__ = ["Issue", "JobError", "OutputFile", "Request", "Shard", "Summary", "build_engine", "errors_path",
           "read_requests", "run_generate", "run_score", "shard_of"]

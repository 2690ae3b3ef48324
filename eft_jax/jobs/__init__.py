"""Batch offline jobs: JSONL prompts in, resumable JSONL samples (or scores) out."""

from eft_jax.jobs.records import Issue, JobError, OutputFile, Request, errors_path, read_requests
from eft_jax.jobs.runner import Summary, build_engine, run_generate, run_score

__all__ = ["Issue", "JobError", "OutputFile", "Request", "Summary", "build_engine", "errors_path", "read_requests",
           "run_generate", "run_score"]

"""The ``eft-jax`` command: ``generate``, ``score``, ``merge``, ``ray-generate`` / ``ray-score``, ``config``,
``convert``, ``train``, ``toy`` and ``experiments``.

Exit status: 0 done; 1 a job stopped on an error after it started, or wrote nothing because every
input line failed; 2 it could not start (bad config, input, model files, devices...: the message says
what to fix); 130 interrupted (Ctrl-C; re-run the same command to resume).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

EXAMPLE_PROMPTS = Path("examples/prompts.jsonl")
EXAMPLE_PAIRS = Path("examples/pairs.jsonl")


def _convert(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from eft_jax.loading import convert

    start = time.perf_counter()
    model = convert(args.source, args.dest, dtype=jnp.dtype(args.dtype) if args.dtype else None,
                    quantize=args.quantize)
    quantized = f" ({model.quantize} projections)" if model.quantize else ""
    print(
        f"wrote {args.dest}: {model.config.num_params / 1e6:.1f}M parameters, {jnp.dtype(model.dtype).name}"
        f"{quantized}, {model.weight_bytes / 1e6:.1f} MB, {time.perf_counter() - start:.1f}s"
    )
    return 0


def _load(args: argparse.Namespace):
    from eft_jax.compile_cache import configure
    from eft_jax.config import load_config

    config = load_config(args.config, args.overrides)
    # JAX's persistent compilation cache (job.compile_cache: auto | DIR | off), before anything compiles.
    configure(config.job.compile_cache)
    if config.mesh.distributed:
        from eft_jax.distributed import initialize

        initialize()  # multi-host: every host runs the same command (eft_jax/distributed.py)
    return config


def _input(path: str | None, default: Path, flag: str) -> Path:
    from eft_jax.jobs import JobError

    if path is not None:
        return Path(path)  # "-" is standard input
    if not default.exists():
        raise JobError(f"no {flag} given and the default {default} does not exist here; pass {flag} FILE.jsonl")
    return default


def _finish(summary) -> int:
    import jax

    from eft_jax.distributed import leave

    if jax.process_index() == 0 or summary.stopped is not None:  # every process says why it stopped
        print(summary.render(), flush=True)
    return leave(summary.exit_status)


def _shard(args: argparse.Namespace):
    from eft_jax.jobs import Shard

    return Shard.parse(args.shard) if args.shard is not None else None


def _generate(args: argparse.Namespace) -> int:
    from eft_jax.jobs import run_generate

    shard = _shard(args)
    config = _load(args)
    prompts = _input(args.prompts, EXAMPLE_PROMPTS, "--prompts")
    out = Path(args.out) if args.out else Path("outputs") / f"generate-{config.fingerprint('generate')[:8]}.jsonl"
    return _finish(run_generate(config, prompts, out, overwrite=args.overwrite,
                                ignore_fingerprint=args.ignore_fingerprint, progress=not args.no_progress,
                                interrupts=args.interrupts, shard=shard))


def _score(args: argparse.Namespace) -> int:
    from eft_jax.jobs import run_score

    shard = _shard(args)
    config = _load(args)
    pairs = _input(args.pairs, EXAMPLE_PAIRS, "--pairs")
    out = Path(args.out) if args.out else Path("outputs") / f"score-{config.fingerprint('score')[:8]}.jsonl"
    return _finish(run_score(config, pairs, out, rewards=args.rewards, overwrite=args.overwrite,
                             ignore_fingerprint=args.ignore_fingerprint, progress=not args.no_progress,
                             interrupts=args.interrupts, shard=shard))


def _merge(args: argparse.Namespace) -> int:
    from eft_jax.jobs.merge import run_merge

    summary = run_merge(Path(args.prompts), Path(args.out), [Path(p) for p in args.shard_outputs])
    print(summary.render(), flush=True)
    return 0


def _show_config(args: argparse.Namespace) -> int:
    import yaml

    from eft_jax.config import load_config, missing_model_files

    config = load_config(args.config, args.overrides)
    print(f"# {config.source}: valid")
    print(f"# fingerprint: generate {config.fingerprint('generate')}, score {config.fingerprint('score')}")
    missing = missing_model_files(config)
    for problem in missing:
        print(f"# not found here: {problem}")
    print(yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True), end="")
    for line in _memory_plan(config, args.prompt_tokens, bool(missing)).splitlines():
        print(f"# {line}")
    return 0


def _memory_plan(config, prompt_tokens: int, missing: bool) -> str:
    """``generate``'s memory plan for prompts of up to ``prompt_tokens`` tokens (eft_jax.memory), or why not."""
    import jax

    from eft_jax import memory
    from eft_jax.loading import CheckpointError
    from eft_jax.models.config import UnsupportedConfigError

    if missing:
        return "memory plan: needs every model's config.json or GGUF file (not found here)"
    try:
        specs = memory.read_model_specs(config)
    except (CheckpointError, UnsupportedConfigError) as e:
        return f"memory plan: cannot read a model's config: {e}"
    devices = jax.devices()
    model = config.mesh.model
    data = config.mesh.data if config.mesh.data != -1 else max(1, len(devices) // model)
    available = memory.detect_device_memory(config.mesh.device_memory_gb, devices, data * model)
    plan = memory.plan_memory(config, specs, {"data": data, "model": model},
                              memory.config_workload(config, prompt_tokens), available)
    text = memory.does_not_fit_message(plan, specs) if not plan.fits else plan.table()
    if data * model > len(devices):
        text += f"\n(this machine has {len(devices)} {devices[0].platform.upper()} device(s); the plan is for the mesh)"
    return text


def _job_arguments(p: argparse.ArgumentParser, input_flag: str, input_help: str) -> None:
    p.add_argument("--config", default=None, help="YAML job config (default: the embedded one, "
                   "configs/default.yaml: toy EFT up-scaling)")
    p.add_argument(input_flag, default=None, help=input_help)
    p.add_argument("--out", default=None, help="output JSONL, appended to and resumed (default: "
                   "outputs/<command>-<config fingerprint>.jsonl); problems go to OUT.errors.jsonl")
    p.add_argument("--overwrite", action="store_true", help="start the output over instead of resuming")
    p.add_argument("--ignore-fingerprint", action="store_true",
                   help="append to an output made with a different config")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    p.add_argument("--shard", default=None, metavar="i/N",
                   help="run only the i-th of N slices of the input (0 <= i < N; a line's slice is a hash of its "
                   "id) into OUT.shard-i-of-N.jsonl; combine the N outputs with `eft-jax merge` "
                   "(docs/scale-out.md)")
    _allow_download_argument(p)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. job.batch_size=16")


def _allow_download_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-download", action="store_true",
                   help="let a model given by Hub id (org/name[@revision]) that is not in the local Hugging Face "
                   "cache be downloaded (same as EFT_JAX_ALLOW_DOWNLOAD=1); by default nothing is downloaded")


def _delegate(module: str, argv: list[str]) -> int:
    import importlib

    return importlib.import_module(module).main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eft-jax", description="Emulated fine-tuning (EFT) in JAX.",
                                     epilog="Exit status: 0 done, 1 stopped on an error or every line failed, "
                                     "2 could not start, 130 interrupted (re-run to resume).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="sample responses for a JSONL file of prompts (resumable)")
    _job_arguments(p, "--prompts", "input JSONL: {\"id\", \"prompt\" or \"messages\", optional n, max_new_tokens, "
                   f"seed}} per line; - reads standard input (default: {EXAMPLE_PROMPTS})")
    p.set_defaults(func=_generate)

    p = sub.add_parser("score", help="EFT log-likelihood of (prompt, response) pairs (resumable)")
    _job_arguments(p, "--pairs", "input JSONL: {\"id\", \"prompt\" or \"messages\", \"response\"} per line; "
                   f"- reads standard input (default: {EXAMPLE_PAIRS})")
    p.add_argument("--rewards", action="store_true",
                   help="also write per-token EFT log-probs and per-token implicit rewards (log p_ft - log p_ref)")
    p.set_defaults(func=_score)

    p = sub.add_parser("merge", help="combine the outputs of `generate/score --shard i/N` into the file one "
                       "unsharded job writes (input order, errors files too)")
    p.add_argument("--prompts", "--pairs", dest="prompts", required=True,
                   help="the input JSONL the shards ran on")
    p.add_argument("--out", required=True, help="the merged output (its errors go to OUT.errors.jsonl); the "
                   "shards' --out, without the .shard-i-of-N part")
    p.add_argument("shard_outputs", nargs="*", metavar="SHARD_OUTPUT",
                   help="shard output files (default: every OUT.shard-i-of-N.jsonl beside OUT)")
    p.set_defaults(func=_merge)

    from eft_jax.jobs import ray_launcher  # imports Ray only when a ray-* command runs

    for command in ("generate", "score"):
        ray_launcher.add_parser(sub, command)

    p = sub.add_parser("config", help="validate a config and print it resolved, with its fingerprints and "
                       "memory plan")
    p.add_argument("--config", default=None, help="YAML job config (default: the embedded one)")
    p.add_argument("--prompt-tokens", type=int, default=1024, metavar="N",
                   help="the memory plan's prompt length (default 1024; generate and score bound it from their "
                   "input)")
    _allow_download_argument(p)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    p.set_defaults(func=_show_config)

    # Commands with their own argument parsers (main() hands them every argument; listed here for --help).
    p = sub.add_parser("train", help="train or fine-tune a model (eft-jax train --config C [key=value ...])",
                       add_help=False)
    p.set_defaults(func=lambda a: _delegate("eft_jax.train.cli", []))

    p = sub.add_parser("toy", help="the toy EFT family: `toy build` (train it), `toy eval` (the paper-style table)",
                       add_help=False)
    p.set_defaults(func=lambda a: _delegate("eft_jax.toy.cli", []))

    p = sub.add_parser("experiments", help="benchmarks of a job config: `experiments humaneval --config C --out DIR`",
                       add_help=False)
    p.set_defaults(func=lambda a: _delegate("eft_jax.experiments.cli", []))

    p = sub.add_parser("convert", help="convert an HF directory or GGUF file to an eft-jax orbax checkpoint")
    p.add_argument("source", help="HF checkpoint directory, .gguf file, or eft-jax checkpoint")
    p.add_argument("dest", help="new directory to write")
    p.add_argument("--dtype", default=None, help="parameter dtype, e.g. bfloat16 or float32 (default: as loaded)")
    p.add_argument("--quantize", default=None, choices=["int8"],
                   help="int8: store the layers' projection matrices as int8 with per-output-channel scales "
                        "(docs/quantization.md); the checkpoint restores straight into int8 shardings")
    p.set_defaults(func=_convert)
    return parser


_DELEGATED = {"train": "eft_jax.train.cli", "toy": "eft_jax.toy.cli", "experiments": "eft_jax.experiments.cli"}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("eft-jax")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "(not installed)"


def main(argv: list[str] | None = None) -> int:
    from eft_jax.interrupts import Interrupts

    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else ""
    # transformers advises on import that PyTorch is missing; eft-jax uses only its tokenizers.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # Ctrl-C at any moment, imports and JAX start-up included, exits 130: Interrupts records it even
    # where Python swallows the KeyboardInterrupt (JAX's gc callback), and the job checks the record.
    try:
        with Interrupts() as interrupts:
            if command in _DELEGATED:  # their own parsers see every argument, --help included
                return _delegate(_DELEGATED[command], argv[1:])
            args = build_parser().parse_args(argv)
            args.interrupts = interrupts
            code = _run(args)
            interrupts.check()
            return code
    except KeyboardInterrupt:
        print(f"eft-jax{' ' + command if command else ''}: interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from eft_jax.config import ConfigError
    from eft_jax.jobs import JobError
    from eft_jax.loading.source import CheckpointError
    from eft_jax.models.config import UnsupportedConfigError

    if getattr(args, "allow_download", False):  # read where a Hub id is resolved (loading.hub)
        from eft_jax.loading.hub import ALLOW_DOWNLOAD_ENV

        os.environ[ALLOW_DOWNLOAD_ENV] = "1"
    try:
        return args.func(args)
    except (ConfigError, JobError, CheckpointError, UnsupportedConfigError, FileExistsError) as e:
        from eft_jax.distributed import leave

        print(f"eft-jax {args.command}: error: {e}", file=sys.stderr)
        return leave(2)  # (exits at once if another process of a multi-process job is gone)


def entry() -> None:
    """The ``eft-jax`` command: ``main``, then exit with its code. After Ctrl-C (130) the process ends
    without Python's interpreter teardown: interrupted in the middle of compiling, XLA's runtime could crash
    in it (SIGSEGV, after the job had kept its work and said so). Everything is written and closed by then.

    Otherwise the objects still alive are frozen out of the garbage collector first (``gc.freeze``): the
    interpreter's teardown would traverse every one of them (JAX's, flax's, the job's modules: ~0.5 s of a toy
    job's ~8 s), to free memory the process is about to give back anyway. Files are closed before ``main``
    returns; JAX's exit handlers still run. The same is done before ``main``: what the imports built lives to
    the end, and the collections during the job then traverse only the job's own objects (~0.07 s of a warm
    toy job's ~4 s)."""
    gc.freeze()
    code = main()
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()

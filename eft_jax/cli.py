"""The ``eft-jax`` command."""

from __future__ import annotations

import argparse
import sys
import time

import jax.numpy as jnp


def _convert(args: argparse.Namespace) -> int:
    from eft_jax.loading import convert

    start = time.perf_counter()
    model = convert(args.source, args.dest, dtype=jnp.dtype(args.dtype) if args.dtype else None)
    print(
        f"wrote {args.dest}: {model.config.num_params / 1e6:.1f}M parameters, {jnp.dtype(model.dtype).name}, "
        f"{time.perf_counter() - start:.1f}s"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eft-jax", description="Emulated fine-tuning (EFT) in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert", help="convert an HF directory or GGUF file to an eft-jax orbax checkpoint")
    p.add_argument("source", help="HF checkpoint directory, .gguf file, or eft-jax checkpoint")
    p.add_argument("dest", help="new directory to write")
    p.add_argument("--dtype", default=None, help="parameter dtype, e.g. bfloat16 or float32 (default: as loaded)")
    p.set_defaults(func=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from eft_jax.loading.source import CheckpointError
    from eft_jax.models.config import UnsupportedConfigError

    try:
        return args.func(args)
    except (CheckpointError, UnsupportedConfigError, FileExistsError) as e:
        print(f"eft-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

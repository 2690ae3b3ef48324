"""Continuous vs static batching, side by side in one run, on the toy trio (EFT up-scaling).

Two jobs of held-out toy questions (``--prompts`` of them, 512 by default):

- ``natural``: answers as the models give them (stop at the end-of-turn token; 24 tokens at most), the
  embedded default's sampling (temperature 0.7, top-p 0.9);
- ``long-tailed``: each prompt's ``max_new_tokens`` drawn from a log-normal clipped to [8, 200] (the toy models' context is 256),
  ``ignore_eos`` so every row runs to its own limit: the case where static batches idle most;
- ``small``: the first 2 prompts with natural answers and ``max_new_tokens`` 128, comparing chunks that run
  all their steps (``fixed``) with chunks that end once every row is done (``early``, the CPU default):
  the small-job case, where a chunk used to run on long after the answers had ended.

Each mode runs once to compile and once timed (``--repeats``: best of n); the printed ratio is
continuous / static (or early / fixed) tokens per second at the same batch size, and the samples are
checked to be identical between the two modes.

Usage: python bench/bench_batching.py [--prompts 512] [--batch-size 16] [--chunk-size 8] [--repeats 1]
       [--jobs natural,long-tailed,small]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from eft_jax.engine import Engine  # noqa: E402
from eft_jax.sampling import SamplingParams  # noqa: E402
from eft_jax.toy.eval import eval_items, load_toy, row_specs  # noqa: E402


def job(name: str, prompts: list[str], seed: int = 0) -> dict:
    if name == "natural":
        return {"max_new_tokens": 24, "ignore_eos": False}
    if name == "small":
        return {"max_new_tokens": 128, "ignore_eos": False}
    rng = np.random.default_rng(seed)
    limits = np.clip(np.round(rng.lognormal(mean=np.log(32), sigma=1.0, size=len(prompts))), 8, 200).astype(int)
    return {"max_new_tokens": limits.tolist(), "ignore_eos": True}


def timed(engine: Engine, prompts: list[str], kwargs: dict, batch_size: int, continuous: bool,
          repeats: int, stop_early: bool) -> tuple[float, int, list]:
    engine.stop_early = stop_early
    sampling = SamplingParams(temperature=0.7, top_p=0.9)
    run = lambda: engine.generate(prompts, sampling, batch_size=batch_size, seed=0, continuous=continuous,  # noqa: E731
                                  ids=range(len(prompts)), **kwargs)
    run()  # compile
    best, results = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        results = run()
        best = min(best, time.perf_counter() - start)
    return best, sum(len(r.tokens) for r in results), results


def compare(first: list, second: list) -> str:
    """How many samples two runs share token for token; where they differ, the token at which they part;
    and over every shared prefix the largest difference between the two runs' log-probs of the same
    token (0 where the arithmetic is the same; rounding-sized where it differs, e.g. kernels chosen
    per shape on a GPU, and then a sampled token can flip where its draw falls within that of a boundary)."""
    same, parts, drift = 0, [], 0.0
    for x, y in zip(first, second, strict=True):
        a, b = list(x.tokens), list(y.tokens)
        shared = next((i for i, (s, t) in enumerate(zip(a, b)) if s != t), min(len(a), len(b)))
        if a == b:
            same += 1
        else:
            parts.append(shared)
        if shared:
            drift = max(drift, float(np.max(np.abs(np.subtract(x.token_logprobs[:shared], y.token_logprobs[:shared])))))
    text = f"{same}/{len(first)}, max log-prob difference on shared prefixes {drift:.2g}"
    if parts:
        text += f"; the others part at token {min(parts)}..{max(parts)} (median {int(np.median(parts))})"
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--jobs", default="natural,long-tailed")
    p.add_argument("--chunk-size", type=int, default=8, help="decode steps per chunk (the embedded job's: 8)")
    args = p.parse_args()

    models, world = load_toy(REPO / "checkpoints" / "toy")
    engine = Engine(row_specs(models, world)["EFT up-scaled"], chunk_size=args.chunk_size)
    prompts = [it.prompt for it in eval_items(world, args.prompts // 4)][: args.prompts]
    print(f"toy trio, EFT up-scaling, {len(prompts)} prompts, batch size {args.batch_size}, chunk {args.chunk_size}")
    print(f"{'job':<12} {'mode':<11} {'tokens':>7} {'seconds':>8} {'tokens/s':>9}")
    default_early = engine.stop_early
    for name in args.jobs.split(","):
        kwargs = job(name, prompts)
        chosen = prompts[:2] if name == "small" else prompts
        # (mode, continuous, stop_early): the small job compares the chunk loop, the others the scheduling.
        modes = ([("fixed", True, False), ("early", True, True)] if name == "small"
                 else [("static", False, default_early), ("continuous", True, default_early)])
        rates = {}
        outputs = {}
        for mode, continuous, early in modes:
            seconds, tokens, outputs[mode] = timed(engine, chosen, kwargs, args.batch_size, continuous,
                                                   args.repeats, early)
            rates[mode] = tokens / seconds
            print(f"{name:<12} {mode:<11} {tokens:>7} {seconds:>8.2f} {rates[mode]:>9.1f}")
        (a, *_), (b, *_) = modes
        print(f"{name:<12} {b} / {a} = {rates[b] / rates[a]:.2f}x (samples identical: "
              f"{compare(outputs[a], outputs[b])})")


if __name__ == "__main__":
    main()

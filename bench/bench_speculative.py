"""Speculative EFT against non-speculative EFT, side by side in one run.

For each batch size and draft length k it reports tokens/s, the speedup over k = 0 (same engine,
prompts, lengths and sampling), the measured acceptance rate (accepted / tested drafts, the
probability a draft is accepted; drafts after a rejection are not tested) and tokens per round, and
the acceptance rate that k would need for a 2.5x speedup given the measured cost of a round. Expected tokens per
round at acceptance a: (1 - a^(k+1)) / (1 - a); speedup = that x (step time) / (round time).

"Bound at 0.8" is the speedup that k could reach at acceptance 0.8 if everything but the forward
passes were free: each model's cached forward is timed alone for 1 and for k + 1 new tokens (same
batch, a 64-token context), and a round is taken to cost k drafter forwards of 1 token, one forward of
k + 1 tokens of every other model and one more drafter forward, against one 1-token forward of every
model per plain EFT step. It shows how far the hardware, not the implementation, allows speculation
to go: the bound is low where a forward of k + 1 tokens costs much more than one of 1 token.

Models:
- ``--models DIR``: the toy family (default: checkpoints/toy: large-base, small-base, small-ft,
  world.json; its held-out questions are the prompts), or any directory with large_base, small_base
  and small_ft checkpoints (then a few fixed prompts).
- ``--synthetic cpu|gpu``: random-weight Llama shapes of realistic size whose drafts are accepted at a
  controlled rate (``eft_jax.synthetic``: the large base contains the small base exactly, plus noise
  calibrated to ``--acceptance``, or set with ``--noise``). cpu: a 0.9B-parameter large model and a
  55M drafter, float32; gpu: a Llama-3-8B-shaped base and a 1.5B drafter (hidden 2048, 16 layers),
  bfloat16. Random prompts of 32 words.

Usage: python bench/bench_speculative.py [--batches 1,4,16] [--ks 2,4,6,8] [--synthetic cpu --acceptance 0.8]
Measures, prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import functools
import subprocess
import time
from pathlib import Path

import jax
import numpy as np

import eft_jax
from eft_jax import synthetic
from eft_jax.engine import Engine
from eft_jax.models import llama
from eft_jax.sampling import SamplingParams
from eft_jax.spec import Component, EFTSpec

SYNTHETIC_PRESETS = {
    "cpu": dict(
        large=dict(hidden_size=2048, intermediate_size=5632, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64),
        small=dict(hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8, num_kv_heads=2, head_dim=64),
        vocab=32000, dtype="float32",
    ),
    "gpu": dict(
        large=dict(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128),
        small=dict(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=16, num_kv_heads=4, head_dim=128),
        vocab=128256, dtype="bfloat16",
    ),
}

FALLBACK_PROMPTS = [
    "Where was the author born?", "What does the engineer do for a living?", "Tell me about the city.",
    "Who employs the chemist?", "When was the painter born?", "Describe the company.",
]


def expected_tokens(a: float, k: int) -> float:
    return k + 1.0 if a >= 1.0 else (1 - a ** (k + 1)) / (1 - a)


def needed_acceptance(target: float, k: int, round_over_step: float) -> float | None:
    """Smallest acceptance a with expected_tokens(a, k) / round_over_step >= target (None: impossible)."""
    if expected_tokens(1.0, k) / round_over_step < target:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_tokens(mid, k) / round_over_step < target else (lo, mid)
    return hi


_FORWARD_MS: dict = {}


def forward_ms(model, batch: int, new_tokens: int, context: int = 64, reps: int = 5) -> float:
    """Milliseconds of one cached forward of ``new_tokens`` tokens per row after ``context`` cached ones
    (the best of ``reps``; remembered per model and shape)."""
    key = (id(model), batch, new_tokens, context)
    if key not in _FORWARD_MS:
        _FORWARD_MS[key] = _time_forward(model, batch, new_tokens, context, reps)
    return _FORWARD_MS[key]


def _time_forward(model, batch: int, new_tokens: int, context: int, reps: int) -> float:
    # The forward runs n times inside one jitted scan, as it does in decoding (no per-call dispatch, which
    # would dominate the toy models' sub-millisecond forwards); each iteration writes the new tokens
    # into the cache and rewinds it, so no iteration can be hoisted out of the loop.
    cfg = model.config
    jnp = jax.numpy
    cache = model.init_cache(batch, context + new_tokens).rewind(jnp.full((batch,), context, jnp.int32))
    tokens = jnp.full((batch, new_tokens), 3, jnp.int32)
    positions = context + jnp.broadcast_to(jnp.arange(new_tokens, dtype=jnp.int32), tokens.shape)

    @functools.partial(jax.jit, static_argnums=4)
    def run(params, tokens, positions, cache, n):
        def body(c, _):
            logits, written = llama.forward(cfg, params, tokens, positions, c)
            return written.rewind(c.length), logits[:, -1, 0]
        return jax.lax.scan(body, cache, None, length=n)[1]

    def best_of(n: int) -> float:
        jax.block_until_ready(run(model.run_params, tokens, positions, cache, n))  # compile
        best = float("inf")
        for _ in range(reps):
            start = time.perf_counter()
            jax.block_until_ready(run(model.run_params, tokens, positions, cache, n))
            best = min(best, time.perf_counter() - start)
        return best / n

    once = best_of(1)
    n = max(1, min(100, int(0.1 / once)))  # about 0.1 s per timed call
    return (once if n == 1 else best_of(n)) * 1e3


def speedup_bound(spec: EFTSpec, batch: int, k: int, acceptance: float = 0.8) -> float:
    """Speedup at ``acceptance`` if only forward passes cost anything (see the module docstring)."""
    base, ref, drafter = spec.base.model, spec.ref.model, spec.fine_tuned[0].model
    drafter_step = forward_ms(drafter, batch, 1)
    step = forward_ms(base, batch, 1) + forward_ms(ref, batch, 1) + drafter_step
    round_ = (k + 1) * drafter_step + forward_ms(base, batch, k + 1) + forward_ms(ref, batch, k + 1)
    return expected_tokens(acceptance, k) * step / round_


def timed(engine: Engine, prompts, sampling, max_new: int, batch: int, ignore_eos: bool,
          repeats: int) -> tuple[float, list]:
    """Best wall time of ``repeats`` identical generate calls (after a warm-up that compiles everything:
    same seed, so the same work), and the results."""
    kwargs = dict(max_new_tokens=max_new, batch_size=batch, seed=1, ignore_eos=ignore_eos)
    engine.generate(prompts, sampling, **kwargs)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        res = engine.generate(prompts, sampling, **kwargs)
        best = min(best, time.perf_counter() - start)
    return best, res


def checkpoint_spec(args) -> tuple[EFTSpec, list[str], str]:
    """Up-scaling with the checkpoints of --models, and prompts for them."""
    root = Path(args.models)
    if (root / "world.json").is_file():  # the toy family: its base-style template and its questions
        from eft_jax.toy import data as toy_data
        from eft_jax.toy.eval import eval_items
        from eft_jax.toy.world import World

        names, base_fmt = ("large-base", "small-base", "small-ft"), toy_data.BASE_PROMPT_FORMAT
        prompts = [item.prompt for item in eval_items(World.load(root / "world.json"), 4)]
    else:
        names, base_fmt, prompts = ("large_base", "small_base", "small_ft"), "plain", FALLBACK_PROMPTS
    m = {name: eft_jax.load_model(root / name, dtype="float32", sharding="replicated") for name in names}
    spec = EFTSpec.up_scaling(Component(m[names[0]], base_fmt, "large_base"), Component(m[names[1]], base_fmt, "small_base"),
                              Component(m[names[2]], "chat", "small_ft"), args.weight)
    return spec, prompts, str(root)


def synthetic_spec(args) -> tuple[EFTSpec, list[str], str]:
    """Up-scaling with a related random family (see eft_jax.synthetic), and random word prompts."""
    p = SYNTHETIC_PRESETS[args.synthetic]
    start = time.perf_counter()
    family = synthetic.make_family(p["large"], p["small"], vocab=p["vocab"], dtype=p["dtype"], noise=args.noise or 0.0,
                                   target_acceptance=None if args.noise is not None else args.acceptance)
    print(f"# built in {time.perf_counter() - start:.0f} s")
    large, base, ft = synthetic.family_models(family)
    print(f"# synthetic {args.synthetic}: large {family.large_cfg.num_params / 1e6:.0f}M params, "
          f"drafter {family.small_cfg.num_params / 1e6:.0f}M, {p['dtype']}, noise={family.noise:.4g}")
    spec = EFTSpec.up_scaling(Component(large, "plain"), Component(base, "plain"), Component(ft, "plain"), args.weight)
    rng = np.random.default_rng(0)
    prompts = [" ".join(f"t{i}" for i in rng.integers(3, p["vocab"], 32)) for _ in range(16)]
    return spec, prompts, f"synthetic-{args.synthetic}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="checkpoints/toy")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--ks", default="2,4,6,8")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--weight", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting; the best is kept")
    parser.add_argument("--synthetic", choices=sorted(SYNTHETIC_PRESETS),
                        help="random-weight related models of realistic size instead of --models")
    parser.add_argument("--acceptance", type=float, default=0.8, help="--synthetic: target acceptance (calibrated)")
    parser.add_argument("--noise", type=float, help="--synthetic: noise of the large model (skips calibration)")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="decode exactly --max-new-tokens per row (steady-state speed, no end-of-answer effects)")
    args = parser.parse_args()

    spec, prompts, label = (synthetic_spec(args) if args.synthetic else checkpoint_spec(args))
    sampling = SamplingParams(temperature=args.temperature)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"# bench_speculative models={label} device={jax.devices()[0].device_kind} commit={commit} "
          f"date={time.strftime('%Y-%m-%d')} temperature={args.temperature} w={args.weight} "
          f"max_new_tokens={args.max_new_tokens} ignore_eos={args.ignore_eos} repeats={args.repeats}")
    print("| batch | k | tok/s | speedup vs k=0 | acceptance | tokens/round | acceptance needed for 2.5x | bound at 0.8 |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for batch in [int(b) for b in args.batches.split(",")]:
        rows = (prompts * (batch // len(prompts) + 1))[:batch]
        base_time, base_res = timed(Engine(spec), rows, sampling, args.max_new_tokens, batch, args.ignore_eos,
                                    args.repeats)
        base_tokens = sum(len(r.tokens) for r in base_res)
        step_time = base_time / max(base_tokens / batch, 1)
        print(f"| {batch} | 0 | {base_tokens / base_time:,.1f} | 1.00 | - | 1.00 | - | - |", flush=True)
        for k in [int(x) for x in args.ks.split(",")]:
            t, res = timed(Engine(spec, speculative_k=k), rows, sampling, args.max_new_tokens, batch,
                           args.ignore_eos, args.repeats)
            tokens = sum(len(r.tokens) for r in res)
            accepted = sum(r.speculative.accepted for r in res)
            acc = accepted / max(accepted + sum(r.speculative.rejected for r in res), 1)
            rounds = np.mean([r.speculative.rounds for r in res])
            per_round = np.mean([r.speculative.tokens_per_round for r in res])
            round_over_step = (t / max(rounds, 1)) / step_time
            need = needed_acceptance(2.5, k, round_over_step)
            print(f"| {batch} | {k} | {tokens / t:,.1f} | {(tokens / t) / (base_tokens / base_time):.2f} | {acc:.2f} | "
                  f"{per_round:.2f} | {'unreachable' if need is None else f'{need:.2f}'} | "
                  f"{speedup_bound(spec, batch, k):.2f} |", flush=True)


if __name__ == "__main__":
    main()

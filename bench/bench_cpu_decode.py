"""CPU decoding: the layer-weight layout (stacked + scan, per-layer views, per-layer [out, in] copies), and
real weights against transformers.

``--part step``: one-token cached forward of a random model of realistic shape (default: the 853M shape
of ``bench_speculative.py --synthetic cpu``, float32, batch 1), each layout, against the time to stream
its weight bytes once (a jitted sum over an array of the same size, timed in the same run, interleaved):
floor / step is the fraction of the machine's read bandwidth a step reaches. Also the compiled step's
``cost_analysis()`` bytes accessed against the ideal bytes (weights read once + live KV). XLA counts a
loop body once, not once per trip, so for the scanned program that figure is per layer, not per step.

``--part loop``: bfloat16 against float32 where decoding runs: the one-token cached forward of a random
Qwen2.5-1.5B-shaped model (``--layers``, default 1: the 152k-entry tied embedding/head plus one layer) alone,
against the same forward ``--steps`` times inside a ``lax.while_loop`` (each step's argmax fed back, as
``decode.decode_chunk`` does), per dtype and batch, interleaved; and the weight-shaped ``copy`` / ``transpose``
/ ``convert`` (or any other materialized weight-sized array) in the compiled loop program (a weight re-laid
out or converted at every call shows there; there should be none).

``--part real --gguf FILE [--small-gguf FILE]``: a real checkpoint against transformers on the same
dequantized weights, greedy, the same prompt tokens, per dtype and batch size: tokens/s of transformers'
``generate``, of eft-jax's ``Engine`` (plain decoding of FILE, and with ``--small-gguf`` EFT up-scaling:
FILE + the small model as reference and, as a second Model object, as fine-tune, all on the plain prompt, so
the reward is 0 and the tokens must match), each one's first call (compiles) and the bare one-token cached forward.
transformers runs first and is freed before eft-jax loads (memory).

Usage: python bench/bench_cpu_decode.py --part step [--reps 5] [--batch 8]
       python bench/bench_cpu_decode.py --part loop [--layers 1] [--batches 1,8] [--dtypes bfloat16,float32]
       python bench/bench_cpu_decode.py --part real --gguf /tmp/qwen15.gguf --small-gguf /tmp/qwen05.gguf \
           [--batches 1,8] [--new 64] [--dtypes float32,bfloat16]
Measures, prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import re
import time

import jax
import jax.numpy as jnp

from eft_jax.models import llama
from eft_jax.models.config import LlamaConfig
from eft_jax.models.kv_cache import KVCache

SHAPE_853M = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=16, num_heads=32,
                  num_kv_heads=8, head_dim=64)
PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain what a hash map is and give an example in Java.",
    "Write a SQL query that lists the ten customers with the largest total order value.",
    "How do I reverse a linked list in C? Show the code.",
    "Write a bash one-liner that counts the lines of all .py files in a directory tree.",
    "What is the difference between a process and a thread?",
    "Implement binary search in JavaScript.",
    "Write a Rust function that checks whether a string is a palindrome.",
]

_forward = jax.jit(llama.forward, static_argnums=0, donate_argnums=5)


def _best(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best


def _cache(cfg: LlamaConfig, batch: int, slots: int, filled: int, dtype) -> KVCache:
    cache = KVCache.zeros(num_layers=cfg.num_layers, batch=batch, slots=slots, num_kv_heads=cfg.num_kv_heads,
                          head_dim=cfg.head_dim, dtype=dtype)
    pos = jnp.where(jnp.arange(slots) < filled, jnp.arange(slots), -1)
    return dataclasses.replace(cache, pos=jnp.broadcast_to(pos, (batch, slots)).astype(jnp.int32),
                               length=jnp.full((batch,), filled, jnp.int32))


class Step:
    """A one-token cached forward, compiled for one params layout; ``__call__`` runs it once."""

    def __init__(self, cfg: LlamaConfig, params, batch: int, slots: int, filled: int):
        self.cfg, self.params = cfg, params
        dtype = jax.tree.leaves(params)[0].dtype
        self.cache = _cache(cfg, batch, slots, filled, dtype)
        self.tok = jnp.zeros((batch, 1), jnp.int32)
        self.pos = jnp.full((batch, 1), filled, jnp.int32)
        self.cache_stamp = jax.tree.map(lambda x: x, self.cache)
        t = time.perf_counter()
        self.compiled = _forward.lower(cfg, params, self.tok, self.pos, self.cache).compile()
        self.compile_s = time.perf_counter() - t

    def __call__(self):
        # The cache is donated and comes back with one more slot used: reset the pointer each call.
        logits, cache = self.compiled(self.params, self.tok, self.pos, self.cache)
        self.cache = dataclasses.replace(cache, length=self.cache_stamp.length, pos=self.cache_stamp.pos)
        return logits

    def bytes_accessed(self) -> float:
        cost = self.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return float(cost.get("bytes accessed", float("nan")))

    def hlo_copies(self) -> int:
        return sum(" copy(" in line for line in self.compiled.as_text().splitlines())


def part_step(args: argparse.Namespace) -> None:
    cfg = LlamaConfig(**SHAPE_853M)
    params = llama.init_params(cfg, jax.random.key(0), jnp.float32)
    layouts = {"stacked (scan)": params, "per-layer views": llama.run_params(params),
               "per-layer [out,in] copies": llama.run_params(params, transpose=True)}
    weights = sum(x.nbytes for x in jax.tree.leaves(params)) - params["embed"].nbytes  # one embed row per token
    kv = 2 * cfg.num_layers * args.batch * args.filled * cfg.num_kv_heads * cfg.head_dim * 4
    ideal = weights + kv
    stream = jnp.ones((ideal // 4,), jnp.float32)
    read_once = jax.jit(jnp.sum)
    steps = {name: Step(cfg, p, args.batch, args.slots, args.filled) for name, p in layouts.items()}
    read_once(stream).block_until_ready()
    times = {name: float("inf") for name in steps} | {"floor": float("inf")}
    for _ in range(args.reps):  # interleaved, so machine noise hits all alike
        times["floor"] = min(times["floor"], _best(lambda: read_once(stream), 1))
        for name, step in steps.items():
            times[name] = min(times[name], _best(step, 1))
    print(f"{cfg.num_params / 1e6:.0f}M params float32, batch {args.batch}, {args.filled} cached tokens; "
          f"ideal bytes {ideal / 1e9:.3f} GB (weights {weights / 1e9:.3f} + KV {kv / 1e9:.4f}); "
          f"floor (read them once) {times['floor'] * 1e3:.1f} ms = {ideal / times['floor'] / 1e9:.1f} GB/s")
    print(f"{'layout':26s} {'step ms':>8s} {'floor/step':>10s} {'compile s':>9s} {'copies':>6s} "
          f"{'cost bytes GB':>13s} {'/ ideal':>7s}")
    for name, step in steps.items():
        b = step.bytes_accessed()
        print(f"{name:26s} {times[name] * 1e3:8.1f} {times['floor'] / times[name]:10.2f} {step.compile_s:9.2f} "
              f"{step.hlo_copies():6d} {b / 1e9:13.3f} {b / ideal:7.2f}")


# --- the decode loop against the bare forward --------------------------------------------------------

SHAPE_QWEN15 = {"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_heads": 12,
                "num_kv_heads": 2, "head_dim": 128, "qkv_bias": True, "tie_word_embeddings": True}
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%[\w.\-]+ = (\w+)\[(\d+),(\d+)\]\{[^}]*\} ([\w\-]+)\(")


def weight_shaped_ops(hlo: str, smallest: int) -> list[str]:
    """The 2-D arrays with both dims >= ``smallest`` that an optimized HLO text materializes: results of
    instructions in the computations that run (entry, loop bodies; not inside a fusion, where a convert of a
    whole table feeding a gather reads only the gathered rows), other than parameters, tuple elements and
    bitcasts. Weights re-laid out or converted show here (activations have 1-2 rows; caches more dims)."""
    fused = set(re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", hlo))
    found, computation = set(), None
    for line in hlo.splitlines():
        if m := _COMPUTATION.match(line):
            computation = m.group(1)
        elif computation not in fused and (m := _INSTRUCTION.match(line)) and \
                min(int(m.group(2)), int(m.group(3))) >= smallest and \
                m.group(4) not in ("parameter", "get-tuple-element", "bitcast", "tuple"):
            found.add(f"{m.group(1)}[{m.group(2)},{m.group(3)}] {m.group(4)}")
    return sorted(found)


class Loop:
    """The bare one-token forward and ``steps`` of it inside a ``while_loop`` (argmax fed back), compiled."""

    def __init__(self, cfg: LlamaConfig, params, batch: int, steps: int):
        dtype = jax.tree.leaves(params)[0].dtype
        self.params, self.cache = params, _cache(cfg, batch, 128, 64, dtype)
        self.tok, self.steps = jnp.zeros((batch, 1), jnp.int32), steps

        def bare(p, cache, tok):
            return llama.forward(cfg, p, tok, jnp.full_like(tok, 64), cache)[0]

        def loop(p, cache, tok):
            def body(c):
                i, cache, t = c
                logits, cache = llama.forward(cfg, p, t, jnp.full_like(t, 64) + i, cache)
                return i + 1, cache, jnp.argmax(logits[:, -1], -1)[:, None].astype(jnp.int32)
            return jax.lax.while_loop(lambda c: c[0] < steps, body, (0, cache, tok))[2]

        self.bare = jax.jit(bare).lower(params, self.cache, self.tok).compile()
        self.loop = jax.jit(loop).lower(params, self.cache, self.tok).compile()
        self.ops = weight_shaped_ops(self.loop.as_text(), min(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim))

    def run_bare(self):
        return self.bare(self.params, self.cache, self.tok)

    def run_loop(self):
        return self.loop(self.params, self.cache, self.tok)


def part_loop(args: argparse.Namespace) -> None:
    cfg = LlamaConfig(**SHAPE_QWEN15, num_layers=args.layers)
    loops = {}
    for dtype_name in args.dtypes.split(","):
        params = llama.run_params(llama.init_params(cfg, jax.random.key(0), jnp.dtype(dtype_name)), transpose=True)
        for batch in (int(b) for b in args.batches.split(",")):
            loops[dtype_name, batch] = lp = Loop(cfg, params, batch, args.steps)
            jax.block_until_ready((lp.run_bare(), lp.run_loop()))
    best = {key: [float("inf"), float("inf")] for key in loops}
    for _ in range(args.reps):  # interleaved, so machine noise hits all alike
        for key, lp in loops.items():
            best[key][0] = min(best[key][0], _best(lp.run_bare, 1))
            best[key][1] = min(best[key][1], _best(lp.run_loop, 1) / args.steps)
    print(f"Qwen2.5-1.5B shape, {args.layers} layer(s), random weights, [out, in] CPU layout; {args.steps} steps in "
          f"the loop; best of {args.reps}, interleaved")
    print(f"{'dtype':9s} {'batch':>5s} {'bare ms':>8s} {'loop ms/step':>12s} {'loop / bare':>11s}  weight-shaped "
          f"arrays materialized by the loop program")
    for (dtype_name, batch), (bare, loop) in best.items():
        ops = loops[dtype_name, batch].ops
        print(f"{dtype_name:9s} {batch:5d} {bare * 1e3:8.1f} {loop * 1e3:12.1f} {loop / bare:11.2f}  "
              f"{len(ops)}{': ' + ', '.join(ops) if ops else ''}", flush=True)


# --- real weights against transformers ---------------------------------------------------------------


def _prompt_ids(tokenizer, n: int) -> list[list[int]]:
    return [tokenizer.encode(p) for p in (PROMPTS * ((n + len(PROMPTS) - 1) // len(PROMPTS)))[:n]]


def _engine_decode(spec, tokenizer, ids: list[list[int]], new: int):
    """Greedy ``Engine.generate`` of ``ids`` twice: (tokens, warm seconds, first-call seconds)."""
    from eft_jax.engine import Engine
    from eft_jax.sampling import SamplingParams

    engine = Engine(spec)
    prompts = [tokenizer.decode(x) for x in ids]
    times = []
    for _ in range(2):  # the first call compiles (start + chunk programs)
        t = time.perf_counter()
        out = engine.generate(prompts, SamplingParams(temperature=0.0), max_new_tokens=new, batch_size=len(ids),
                              ignore_eos=True)
        times.append(time.perf_counter() - t)
    return [r.tokens for r in out], times[1], times[0]


def _torch_decode(hf, ids: list[list[int]], new: int, pad_id: int):
    import torch

    width = max(len(x) for x in ids)
    input_ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    kwargs = dict(attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=pad_id)
    with torch.no_grad():
        hf.generate(input_ids[:, :4], attention_mask=mask[:, :4], max_new_tokens=2, do_sample=False, pad_token_id=pad_id)
        t = time.perf_counter()
        out = hf.generate(input_ids, **kwargs)
        took = time.perf_counter() - t
    return [row[width:].tolist() for row in out], took


def _torch_step(hf, batch: int, filled: int, reps: int) -> float:
    import torch

    with torch.no_grad():
        out = hf(torch.zeros((batch, filled), dtype=torch.long), use_cache=True)
        past = out.past_key_values
        tok = torch.zeros((batch, 1), dtype=torch.long)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            hf(tok, past_key_values=past, use_cache=True)
            times.append(time.perf_counter() - t)
            past.crop(-1)  # drop the token just added
    return min(times)


def _free_gb() -> float:
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9


def part_real(args: argparse.Namespace) -> None:
    """transformers first (then freed: the 1.5B in float32 is 7 GB per framework), then eft-jax plain and
    EFT on the same prompts; tokens compared with transformers' greedy ones."""
    import os

    import torch
    import transformers

    import eft_jax
    from eft_jax.spec import Component, EFTSpec

    torch.set_num_threads(os.cpu_count() or 1)
    gguf = os.path.abspath(args.gguf)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; jax {jax.__version__} {jax.devices()[0]}")
    batches = [int(b) for b in args.batches.split(",")]
    for dtype_name in args.dtypes.split(","):
        dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype_name]
        tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
        print(f"\n== {dtype_name} (free memory {_free_gb():.1f} GB)", flush=True)
        hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                               dtype=tdtype).eval()
        tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        theirs, torch_tps, torch_ms = {}, {}, {}
        for batch in batches:
            ids = _prompt_ids(tok, batch)
            theirs[batch], took = _torch_decode(hf, ids, args.new, pad)
            torch_tps[batch] = batch * args.new / took
            torch_ms[batch] = _torch_step(hf, batch, 64, args.reps) * 1e3
            print(f"{batch:5d} transformers generate {torch_tps[batch]:8.2f} tok/s; bare forward {torch_ms[batch]:.0f} ms",
                  flush=True)
        del hf
        gc.collect()

        t = time.perf_counter()
        model = eft_jax.load_model(gguf, dtype=dtype)
        run = model.run_params  # the CPU run layout, built once here (not timed with the first call)
        load_s = time.perf_counter() - t
        small = eft_jax.load_model(os.path.abspath(args.small_gguf), dtype=dtype) if args.small_gguf else None
        print(f"eft-jax: {model.config.num_params / 1e9:.2f}B params, {model.weight_bytes / 1e9:.2f} GB, load + layout "
              f"{load_s:.1f}s, layers {type(run['layers']).__name__}; free memory {_free_gb():.1f} GB", flush=True)
        specs = {"eft-jax plain 1.5B": EFTSpec.single(model)}
        if small is not None:
            # ref and fine-tune: the same 0.5B weights in two Model objects, so the engine runs both (it runs a
            # model used twice only once) while the reward ft - ref is exactly 0: EFT's tokens must equal
            # the 1.5B's greedy ones, and the cost is that of the real three-model loop.
            ft = small.replace(source=small.source + " (as fine-tune)", params=small.run_params)
            # Every model on the plain prompt (a fine-tune would default to its chat template: reward != 0).
            specs["eft-jax EFT 1.5B + 2 x 0.5B"] = EFTSpec.up_scaling(
                Component(model, "plain"), Component(small, "plain"), Component(ft, "plain", "small_ft"), 1.0)
        print(f"{'batch':>5s} {'what':30s} {'tok/s':>8s} {'vs torch':>8s} {'first call s':>12s} {'same tokens':>11s}")
        for batch in batches:
            ids = _prompt_ids(model.tokenizer, batch)
            print(f"{batch:5d} {'transformers generate':30s} {torch_tps[batch]:8.2f} {1.0:8.2f}")
            rates = {}
            for name, spec in specs.items():
                ours, warm, first_s = _engine_decode(spec, model.tokenizer, ids, args.new)
                same = sum(a[: args.new] == b[: args.new] for a, b in zip(ours, theirs[batch], strict=True))
                rates[name] = batch * args.new / warm
                print(f"{batch:5d} {name:30s} {rates[name]:8.2f} {rates[name] / torch_tps[batch]:8.2f} {first_s:12.1f} "
                      f"{same:6d}/{batch}", flush=True)
            if len(rates) == 2:
                plain, eft = rates.values()
                print(f"{batch:5d} EFT cost (plain tok/s / EFT tok/s) {plain / eft:.2f}x")
            step = Step(model.config, run, batch, 128, 64)
            step()
            print(f"{batch:5d} bare one-token forward (64 cached): torch {torch_ms[batch]:.0f} ms, eft-jax "
                  f"{_best(step, args.reps) * 1e3:.0f} ms (compile {step.compile_s:.1f}s)", flush=True)
            del step
        del model, small, specs, run
        gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("step", "loop", "real"), default="step")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1, help="step: batch size")
    parser.add_argument("--slots", type=int, default=256, help="step: cache slots")
    parser.add_argument("--filled", type=int, default=128, help="step: cached tokens each row attends to")
    parser.add_argument("--gguf", help="real: the GGUF file")
    parser.add_argument("--small-gguf", help="real: a small model of the same tokenizer, for the EFT rows (ref and "
                                             "fine-tune)")
    parser.add_argument("--batches", default="1,8", help="loop, real: batch sizes")
    parser.add_argument("--layers", type=int, default=1, help="loop: decoder layers")
    parser.add_argument("--steps", type=int, default=16, help="loop: steps inside the loop")
    parser.add_argument("--new", type=int, default=64, help="real: new tokens per prompt")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="loop, real: parameter dtypes")
    args = parser.parse_args()
    {"step": part_step, "loop": part_loop, "real": part_real}[args.part](args)


if __name__ == "__main__":
    main()

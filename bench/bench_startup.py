"""Start-up of small jobs: wall time from process start to finished output, cold and warm compile cache.

Runs ``eft-jax generate`` as a subprocess (``python -m eft_jax.cli generate ...``) on two jobs:

- ``default``: the embedded default config on ``examples/prompts.jsonl`` (12 prompts, one batch);
- ``toy64``: the same config on 64 held-out questions of the toy world (16 people x 4 attributes,
  ``max_new_tokens`` 24), ``job.batch_size=8`` (8 batches);

each with ``speculative.k=4`` and ``speculative.k=0``, side by side, and for each code tree:

- ``new`` (this checkout), ``cold``: an empty temporary compile-cache directory
  (``EFT_JAX_COMPILE_CACHE=<tmp>``); ``warm``: the same directory again, right after;
- ``old`` (optional, ``--old DIR``: another checkout, e.g. ``git worktree add /tmp/eft-old 24be202``),
  run with ``PYTHONPATH=DIR``: as shipped before the cache (no persistent cache).

Wall time is the subprocess's, from its start to its exit (the output file is complete and fsynced
before the exit). Compiled programs come from JAX's compile log (``JAX_LOG_COMPILES=1``): "programs" is
how many executables the process needed, "compiled" how many of them were compiled rather than read
from the persistent cache, "compile s" the time spent getting them (compiling or reading). Every
configuration runs ``--repeats`` times, interleaved; the table gives medians (and the range).

Usage: python bench/bench_startup.py [--old /tmp/eft-old] [--repeats 3] [--jobs default,toy64] [--ks 4,0]
Measures, prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_FINISHED = re.compile(r"Finished XLA compilation of (\S+) in ([0-9.]+) sec")
_HIT = "Persistent compilation cache hit"


def toy64_prompts(path: Path) -> Path:
    """64 held-out questions of the toy world, in the format of examples/prompts.jsonl."""
    sys.path.insert(0, str(REPO))
    from eft_jax.toy.data import question
    from eft_jax.toy.world import ATTRIBUTES, World

    world = World.load(REPO / "checkpoints" / "toy" / "world.json")
    with path.open("w") as f:
        for e in world.heldout_entities[:16]:
            for a in ATTRIBUTES:
                rid = f"{e.name.lower().replace(' ', '-')}-{a}"
                f.write(json.dumps({"id": rid, "prompt": question(e, a), "max_new_tokens": 24}) + "\n")
    return path


def run_job(tree: Path, prompts: Path, out: Path, overrides: list[str], cache: Path | None) -> dict:
    """One ``eft-jax generate`` process; returns wall time and the compile log's counts."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "EFT_JAX_COMPILE_CACHE")}
    env.update(PYTHONPATH=str(tree), JAX_LOG_COMPILES="1", JAX_PLATFORMS="cpu",
               EFT_JAX_COMPILE_CACHE=str(cache) if cache is not None else "off")
    cmd = [sys.executable, "-m", "eft_jax.cli", "generate", "--prompts", str(prompts), "--out", str(out),
           "--overwrite", "--no-progress", *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    programs = compiled = 0
    seconds = 0.0
    hit_pending = False
    for line in proc.stderr.splitlines():
        if _HIT in line:
            hit_pending = True
            continue
        m = _FINISHED.search(line)
        if m:
            programs += 1
            compiled += not hit_pending
            seconds += float(m.group(2))
            hit_pending = False
    samples = sum(1 for _ in out.open())
    return {"wall": wall, "programs": programs, "compiled": compiled, "compile_s": seconds, "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", type=Path, default=None, help="another checkout to compare with (run as shipped)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jobs", default="default,toy64")
    parser.add_argument("--ks", default="4,0")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    jobs = {
        "default": (REPO / "examples" / "prompts.jsonl", []),
        "toy64": (toy64_prompts(work / "toy64.jsonl"), ["job.batch_size=8"]),
    }
    jobs = {name: jobs[name] for name in args.jobs.split(",")}
    ks = [int(k) for k in args.ks.split(",")]
    trees = [("new", REPO)] + ([("old", args.old.resolve())] if args.old else [])

    rows: dict[tuple, list[dict]] = {}
    for rep in range(args.repeats):
        for job, (prompts, extra) in jobs.items():
            for k in ks:
                overrides = [*extra, f"speculative.k={k}"]
                for code, tree in trees:
                    out = work / f"{job}-{k}-{code}.jsonl"
                    if code == "old":
                        rows.setdefault((job, k, "old", "none"), []).append(run_job(tree, prompts, out, overrides, None))
                        continue
                    cache = work / f"cache-{job}-{k}-{rep}"  # empty: cold; then the same again: warm
                    for state in ("cold", "warm"):
                        rows.setdefault((job, k, code, state), []).append(run_job(tree, prompts, out, overrides, cache))
                    entries = len(list(cache.glob("*-cache")))
                    rows[(job, k, code, "cold")][-1]["entries"] = entries
                for key in [r for r in rows if r[0] == job and r[1] == k]:
                    last = rows[key][-1]
                    print(f"# rep {rep} {key}: {last['wall']:.1f}s, {last['programs']} programs "
                          f"({last['compiled']} compiled, {last['compile_s']:.1f}s)", file=sys.stderr, flush=True)

    def med(key, field):
        return statistics.median(r[field] for r in rows[key])

    print(f"\n{'job':8} {'k':>2} {'code':4} {'cache':5} {'wall s (median, range)':>24} {'programs':>8} {'compiled':>8} "
          f"{'compile s':>9}  samples")
    for key in rows:
        walls = [r["wall"] for r in rows[key]]
        print(f"{key[0]:8} {key[1]:>2} {key[2]:4} {key[3]:5} {med(key, 'wall'):>9.1f} ({min(walls):.1f}-{max(walls):.1f})"
              f"{'':>6} {med(key, 'programs'):>8.0f} {med(key, 'compiled'):>8.0f} {med(key, 'compile_s'):>9.1f}  "
              f"{rows[key][0]['samples']}")

    print("\nratios (medians):")
    for job in jobs:
        for k in ks:
            cold, warm = (job, k, "new", "cold"), (job, k, "new", "warm")
            line = f"  {job:8} k={k}: new warm / new cold wall {med(warm, 'wall') / med(cold, 'wall'):.2f}"
            old = (job, k, "old", "none")
            if old in rows:
                line += (f"; old cold / new warm wall {med(old, 'wall') / med(warm, 'wall'):.2f}x; "
                         f"new cold / old compile s {med(cold, 'compile_s') / med(old, 'compile_s'):.2f}; "
                         f"new cold / old wall {med(cold, 'wall') / med(old, 'wall'):.2f}")
            print(line)
        if len(ks) == 2:
            for code, state in [("new", "cold"), ("new", "warm"), ("old", "none")]:
                a, b = (job, ks[0], code, state), (job, ks[1], code, state)
                if a in rows and b in rows:
                    print(f"  {job:8} {code} {state}: wall k={ks[0]} / k={ks[1]} {med(a, 'wall') / med(b, 'wall'):.2f}")
    print(f"\n(outputs and caches under {work})")


if __name__ == "__main__":
    main()

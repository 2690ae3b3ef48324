"""The issue-16 up-scaling grid in one resumable command::

    eft-jax experiments humaneval-grid --small SMALL --large LARGE --out DIR [--limit N] [--stages ...]

Stages, each skipped when already done (re-run the same command to resume):

1. ``sft``: the code SFT set (:mod:`eft_jax.experiments.code_sft`) -> ``DIR/sft.jsonl``.
2. ``train``: the same LoRA recipe on SMALL and on LARGE (``eft-jax train``'s code, a config written to
   ``DIR/train/{small,large}/train.yaml``; resumable through its checkpoints), exported merged (float32) to
   ``DIR/train/*/model``; the trainer's JSON log lines go to ``DIR/train/*/train.log``.
3. ``eval``: one job config per grid row (``DIR/rows/ROW/job.yaml``, greedy) run through
   :func:`eft_jax.experiments.cli.run_humaneval` (resumable per row): small, small+LoRA, large, large+LoRA,
   up-scaling ``large + w (small+LoRA - small)`` at each w, and the w=1 row again with speculative decoding
   (drafter: small+LoRA).
4. ``results``: ``DIR/results.json`` and ``DIR/results.md``: per row pass@1 and answer-shape rate with
   bootstrap 95% intervals over problems, tokens/s and speculative acceptance; the fraction of the
   small+LoRA -> large+LoRA pass@1 gap each up-scaling row closes and the fraction of small+LoRA's answer
   shape it keeps, with paired bootstrap intervals; the LoRA loss curves summarised.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

STAGES = ("sft", "train", "eval", "results")
UP_WEIGHTS = (0.5, 1.0, 1.5)


@dataclasses.dataclass(frozen=True)
class GridSettings:
    """The recipe. ``train_overrides``: ``key=value`` entries applied to both train configs (as for
    ``eft-jax train``); ``job_overrides``: applied to every row's job config."""

    lora_rank: int = 16
    lora_alpha: float = 32.0
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 512
    learning_rate: float = 2.0e-4
    dtype: str = "float32"
    max_new_tokens: int = 512
    batch: int = 8
    weights: tuple[float, ...] = UP_WEIGHTS
    speculative_k: int = 4
    train_overrides: tuple[str, ...] = ()
    job_overrides: tuple[str, ...] = ()


# ---------------------------------------------------------------- bootstrap intervals over problems

def bootstrap_interval(stat: Callable[[np.ndarray], float], n: int, *, n_boot: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of ``stat(indices)`` over ``n`` problems resampled with replacement
    (the same indices for every array ``stat`` reads: a paired bootstrap). Resamples where the statistic
    is undefined (nan) are dropped; None when n is 0 or every resample is undefined."""
    if n == 0:
        return None
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_boot, n))
    values = np.array([stat(idx) for idx in draws], dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def mean_interval(x: Sequence[float], **kw: Any) -> tuple[float, float] | None:
    a = np.asarray(x, np.float64)
    return bootstrap_interval(lambda idx: float(a[idx].mean()), len(a), **kw)


def _ratio(num: float, den: float) -> float:
    return num / den if den != 0 else math.nan


def gap_closed(up: Sequence[float], small_ft: Sequence[float], large_ft: Sequence[float]) -> float:
    """(up - small_ft) / (large_ft - small_ft) on the means (nan when large_ft equals small_ft)."""
    u, s, l = (float(np.mean(v)) for v in (up, small_ft, large_ft))
    return _ratio(u - s, l - s)


def gap_closed_interval(up, small_ft, large_ft, **kw: Any) -> tuple[float, float] | None:
    u, s, l = (np.asarray(v, np.float64) for v in (up, small_ft, large_ft))
    return bootstrap_interval(lambda i: _ratio(u[i].mean() - s[i].mean(), l[i].mean() - s[i].mean()), len(u), **kw)


def kept_interval(up, small_ft, **kw: Any) -> tuple[float, float] | None:
    u, s = np.asarray(up, np.float64), np.asarray(small_ft, np.float64)
    return bootstrap_interval(lambda i: _ratio(u[i].mean(), s[i].mean()), len(u), **kw)


# ---------------------------------------------------------------- configs

def train_config(base: str, sft: Path, root: Path, s: GridSettings) -> dict[str, Any]:
    config = {
        "init_from": base,
        "lora": {"rank": s.lora_rank, "alpha": s.lora_alpha},
        "data": {"path": str(sft), "seq_len": s.seq_len},
        "train": {"steps": s.steps, "batch_size": s.batch_size, "seed": 0, "mesh_data": 1, "mesh_model": 1,
                  "sharding": "replicated", "log_every": 1,
                  "optimizer": {"learning_rate": s.learning_rate, "warmup_steps": max(1, s.steps // 10),
                                "weight_decay": 0.0},
                  "checkpoint_every": max(1, min(25, s.steps))},
        "output": str(root / "model"),
        "export_dtype": "float32",  # the implicit reward (small+LoRA - small) without bf16 rounding on top
    }
    config = apply_overrides(config, s.train_overrides)
    # One checkpoint directory per recipe: a changed recipe trains afresh (the trainer refuses to resume
    # another run's checkpoint), an unchanged one resumes.
    config["train"].setdefault("checkpoint_dir", str(root / "ckpt" / _digest(config)))
    return config


def rows(small: str, large: str, small_ft: str, large_ft: str, s: GridSettings) -> dict[str, dict[str, Any]]:
    """Row name -> {description, eft, speculative, models}."""
    models = {"small": small, "small_lora": small_ft, "large": large, "large_lora": large_ft}
    out: dict[str, dict[str, Any]] = {
        "small": {"description": "small", "eft": {"base": "small"}},
        "small_lora": {"description": "small + LoRA", "eft": {"base": "small_lora"}},
        "large": {"description": "large", "eft": {"base": "large"}},
        "large_lora": {"description": "large + LoRA (ground truth)", "eft": {"base": "large_lora"}},
    }
    for w in s.weights:
        out[f"up_w{w:g}"] = {"description": f"up-scaling w={w:g}", "weight": w,
                             "eft": {"base": "large", "ref": "small", "fine_tuned": ["small_lora"], "weights": [w]}}
    if s.speculative_k:
        out["up_w1_spec"] = {"description": f"up-scaling w=1, speculative k={s.speculative_k}", "weight": 1.0,
                             "eft": {"base": "large", "ref": "small", "fine_tuned": ["small_lora"], "weights": [1.0]},
                             "speculative": {"k": s.speculative_k, "drafter": "small_lora"}}
    for row in out.values():
        used = {row["eft"]["base"], row["eft"].get("ref"), *row["eft"].get("fine_tuned", [])} - {None}
        row["models"] = {m: models[m] for m in models if m in used}
    return out


def job_config(row: dict[str, Any], s: GridSettings) -> dict[str, Any]:
    config = {
        "description": f"issue-16 grid: {row['description']}",
        "models": {name: {"path": path, "prompt_format": "chat", "dtype": s.dtype, "sharding": "replicated"}
                   for name, path in row["models"].items()},
        "eft": row["eft"],
        "sampling": {"temperature": 0.0},
        "mesh": {"data": 1, "model": 1},
        "job": {"batch_size": s.batch, "max_new_tokens": s.max_new_tokens, "seed": 0, "chunk_size": 16},
        "speculative": row.get("speculative", {"k": 0, "drafter": None}),
    }
    return apply_overrides(config, s.job_overrides)


def apply_overrides(config: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``config`` (a copy) with ``key.sub=value`` overrides applied: the one grammar of every command
    (:func:`eft_jax.overrides.apply_overrides`)."""
    from eft_jax.overrides import apply_overrides as apply

    return apply(config, overrides)[0]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _marker(marker: Path) -> str | None:
    try:
        return json.loads(marker.read_text()).get("digest")
    except (OSError, ValueError):
        return None


def _done(marker: Path, digest: str) -> bool:
    try:
        return json.loads(marker.read_text()).get("digest") == digest
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------- the stages

def run_grid(small: str, large: str, out: Path, *, settings: GridSettings = GridSettings(), limit: int | None = None,
             stages: Sequence[str] = STAGES, only_rows: Sequence[str] | None = None, workers: int = 4,
             timeout: float = 10.0, progress: bool = True, publish: Path | None = None,
             log: Callable[[str], None] = print) -> int:
    """Run the grid's stages under ``out``; returns the exit status (0 done)."""
    from eft_jax.experiments import code_sft
    from eft_jax.experiments import humaneval as he

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    sft = out / "sft.jsonl"
    roots = {"small": out / "train" / "small", "large": out / "train" / "large"}
    fts = {k: str(r / "model") for k, r in roots.items()}
    grid = rows(small, large, fts["small"], fts["large"], settings)
    if only_rows:
        unknown = sorted(set(only_rows) - set(grid))
        if unknown:
            raise ValueError(f"unknown row(s) {unknown}; rows: {list(grid)}")

    if "sft" in stages:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in code_sft.records())
        if sft.is_file() and sft.read_text(encoding="utf-8") == text:
            log(f"[grid] sft: up to date ({sft})")
        else:
            _write(sft, text)
            log(f"[grid] sft: wrote {text.count(chr(10))} tasks to {sft}")

    if "train" in stages:
        for role, base in (("small", small), ("large", large)):
            root = roots[role]
            config = train_config(base, sft, root, settings)
            digest = _digest({"config": config, "sft": hashlib.sha256(sft.read_bytes()).hexdigest()})
            if _done(root / "DONE", digest) and (root / "model" / "config.json").is_file():
                log(f"[grid] train {role}: done ({root / 'model'})")
                continue
            root.mkdir(parents=True, exist_ok=True)
            _write(root / "train.yaml", yaml.safe_dump(config, sort_keys=False))
            log(f"[grid] train {role}: LoRA rank {settings.lora_rank} on {base}, {settings.steps} steps "
                f"(log: {root / 'train.log'})")
            _train(root, config, role, log)
            _write(root / "DONE", json.dumps({"digest": digest}) + "\n")

    status = 0
    if "eval" in stages:
        names = [n for n in grid if not only_rows or n in only_rows]
        for i, name in enumerate(names, 1):
            row_dir = out / "rows" / name
            config = job_config(grid[name], settings)
            # a retrained fine-tune reruns the rows that use it
            trained = {role: _marker(roots[role] / "DONE") for role in roots if fts[role] in grid[name]["models"].values()}
            digest = _digest({"config": config, "limit": limit, "trained": trained})
            if _done(row_dir / "DONE", digest) and (row_dir / "summary.json").is_file():
                log(f"[grid] eval {i}/{len(names)} {name}: done")
                continue
            missing = [p for p in grid[name]["models"].values() if p in fts.values() and not Path(p).is_dir()]
            if missing:
                log(f"[grid] eval {i}/{len(names)} {name}: skipped: {missing} not trained yet (stage train)")
                status = status or 1
                continue
            started = _marker(row_dir / "STARTED")
            if started is not None and started != digest:  # another setting's (partial) row: kept aside
                aside = row_dir.with_name(f"{name}.old-{started}")
                shutil.rmtree(aside, ignore_errors=True)
                row_dir.rename(aside)
                log(f"[grid] eval {name}: settings changed; the earlier row moved to {aside}")
            _write(row_dir / "STARTED", json.dumps({"digest": digest}) + "\n")
            _write(row_dir / "job.yaml", yaml.safe_dump(config, sort_keys=False))
            log(f"[grid] eval {i}/{len(names)} {name}: {grid[name]['description']}")
            rc = _eval(row_dir, limit, timeout, workers, progress, log)
            if rc != 0:
                log(f"[grid] eval {name}: exit status {rc}; re-run to resume")
                return rc
            _write(row_dir / "DONE", json.dumps({"digest": digest}) + "\n")

    if "results" in stages:
        problems = [p.task_id for p in he.load_problems()[:limit]]
        results = collect(out, grid, problems, roots)
        _write(out / "results.json", json.dumps(results, indent=2) + "\n")
        _write(out / "results.md", render(results))
        log(f"[grid] results: {out / 'results.md'}")
        if publish is not None:
            publish.mkdir(parents=True, exist_ok=True)
            for src in (out / "results.md", out / "results.json"):
                shutil.copy2(src, publish / src.name)
            for role, root in roots.items():
                if (root / "train.log").is_file():
                    shutil.copy2(root / "train.log", publish / f"train-{role}.log")
            log(f"[grid] published results.md, results.json and the training logs to {publish}")
    log(f"[grid] finished in {time.perf_counter() - t_start:.1f}s")
    return status


def _train(root: Path, config: dict[str, Any], role: str, log: Callable[[str], None]) -> None:
    from eft_jax.train.cli import load_train_config, run

    config = load_train_config(root / "train.yaml")  # the written file, checked as eft-jax train checks it
    with open(root / "train.log", "a", encoding="utf-8") as f:
        def tee(line: str) -> None:
            f.write(line + "\n")
            f.flush()
            try:
                m = json.loads(line)
                log(f"[grid] train {role}: step {m['step']}/{config['train']['steps']} loss {m['loss']:.4f} "
                    f"({m['seconds']:.0f}s)")
            except (ValueError, KeyError, TypeError):
                log(f"[grid] train {role}: {line}")
        run(config, log=tee)


def _eval(row_dir: Path, limit: int | None, timeout: float, workers: int, progress: bool,
          log: Callable[[str], None]) -> int:
    from eft_jax.compile_cache import configure
    from eft_jax.config import load_config
    from eft_jax.experiments import humaneval as he
    from eft_jax.experiments.cli import run_humaneval

    config = load_config(str(row_dir / "job.yaml"), [])
    configure(config.job.compile_cache)
    limits = he.Limits(timeout=timeout, cpu_seconds=max(1, int(timeout) * 2))
    return run_humaneval(config, row_dir, limit=limit, limits=limits, workers=workers, progress=progress, log=log)


# ---------------------------------------------------------------- results

def _per_problem(row_dir: Path, problems: Sequence[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """Pass and shape indicators in ``problems``' order (sample 0 per problem); None if a problem lacks one."""
    path = row_dir / "results.jsonl"
    if not path.is_file():
        return None
    by_id = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if r["sample"] == 0:
                by_id[r["id"]] = r
    if any(p not in by_id for p in problems):
        return None
    return (np.array([by_id[p]["status"] == "passed" for p in problems], np.float64),
            np.array([all(by_id[p]["shape"].values()) for p in problems], np.float64))


def _speed(row_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"tokens_per_s": None, "acceptance": None, "tokens_per_round": None}
    gen = row_dir / "generation.json"
    if gen.is_file():
        g = json.loads(gen.read_text())
        out["tokens_per_s"] = g["tokens"] / g["run_s"] if g.get("run_s") else None
    samples = row_dir / "samples.jsonl"
    if samples.is_file():
        acc = rej = rounds = tokens = 0
        for line in samples.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                sp = r.get("speculative")
                if sp:
                    acc, rej, rounds, tokens = acc + sp["accepted"], rej + sp["rejected"], rounds + sp["rounds"], \
                        tokens + r["tokens"]
        if acc + rej:
            out["acceptance"] = acc / (acc + rej)
            out["tokens_per_round"] = tokens / rounds if rounds else None
    return out


def _iv(x: tuple[float, float] | None) -> list[float] | None:
    return [round(x[0], 4), round(x[1], 4)] if x is not None else None


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 4)


def train_summary(log_path: Path) -> dict[str, Any] | None:
    if not log_path.is_file():
        return None
    points = []
    for line in log_path.read_text().splitlines():
        try:
            m = json.loads(line)
        except ValueError:
            continue
        if isinstance(m, dict) and "step" in m and "loss" in m:
            points.append(m)
    if not points:
        return None
    by_step = {int(m["step"]): m for m in points}  # a resumed run logs again from its checkpoint
    steps = sorted(by_step)
    curve = [[s, round(float(by_step[s]["loss"]), 4)] for s in steps]
    return {"steps": steps[-1], "first_loss": curve[0][1], "last_loss": curve[-1][1],
            "seconds_last_run": by_step[steps[-1]].get("seconds"), "curve": curve}


def collect(out: Path, grid: dict[str, dict[str, Any]], problems: Sequence[str],
            roots: dict[str, Path]) -> dict[str, Any]:
    """The results table as a dict (numbers rounded; null where not measured or undefined)."""
    per: dict[str, tuple[np.ndarray, np.ndarray] | None] = {n: _per_problem(out / "rows" / n, problems) for n in grid}
    table = {}
    for name, row in grid.items():
        ind = per[name]
        entry: dict[str, Any] = {"description": row["description"], "problems": len(problems) if ind else 0}
        if ind is None:
            entry.update({"pass@1": None, "pass@1_ci": None, "answer_shape": None, "answer_shape_ci": None})
        else:
            entry.update({"pass@1": _num(ind[0].mean()), "pass@1_ci": _iv(mean_interval(ind[0])),
                          "answer_shape": _num(ind[1].mean()), "answer_shape_ci": _iv(mean_interval(ind[1]))})
        entry.update({k: _num(v) if v is not None else None for k, v in _speed(out / "rows" / name).items()})
        sf, lf = per.get("small_lora"), per.get("large_lora")
        if "weight" in row and ind is not None and sf is not None and lf is not None:
            entry["gap_closed"] = _num(gap_closed(ind[0], sf[0], lf[0]))
            entry["gap_closed_ci"] = _iv(gap_closed_interval(ind[0], sf[0], lf[0]))
            entry["shape_kept"] = _num(_ratio(ind[1].mean(), sf[1].mean()))
            entry["shape_kept_ci"] = _iv(kept_interval(ind[1], sf[1]))
        elif "weight" in row:
            entry.update({"gap_closed": None, "gap_closed_ci": None, "shape_kept": None, "shape_kept_ci": None})
        table[name] = entry
    return {"problems": len(problems), "rows": table,
            "training": {role: train_summary(root / "train.log") for role, root in roots.items()}}


def _fmt(x: Any, ci: Any = None, digits: int = 3) -> str:
    if x is None:
        return "-"
    s = f"{x:.{digits}f}"
    return s + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def render(results: dict[str, Any]) -> str:
    lines = [f"# Up-scaling grid on HumanEval ({results['problems']} problems, greedy)", "",
             ("pass@1 and answer shape (one fenced block with type hints and docstrings, nothing else) with "
              "bootstrap 95% intervals over problems; gap closed = (up - small+LoRA) / (large+LoRA - small+LoRA) "
              "on pass@1, shape kept = shape(up) / shape(small+LoRA), both with paired bootstrap intervals."), "",
             "| row | pass@1 | answer shape | gap closed | shape kept | tokens/s | acceptance |",
             "|---|---|---|---|---|---|---|"]
    for r in results["rows"].values():
        lines.append(f"| {r['description']} | {_fmt(r['pass@1'], r['pass@1_ci'])} | "
                     f"{_fmt(r['answer_shape'], r['answer_shape_ci'])} | {_fmt(r.get('gap_closed'), r.get('gap_closed_ci'))} | "
                     f"{_fmt(r.get('shape_kept'), r.get('shape_kept_ci'))} | {_fmt(r['tokens_per_s'], digits=1)} | "
                     f"{_fmt(r['acceptance'], digits=2)} |")
    lines += ["", "## LoRA training", "", "| model | steps | first loss | last loss | curve (step: loss) |",
              "|---|---|---|---|---|"]
    for role, t in results["training"].items():
        if t is None:
            lines.append(f"| {role} | - | - | - | not trained |")
            continue
        curve = t["curve"]
        pick = curve if len(curve) <= 10 else [curve[int(i * (len(curve) - 1) / 9)] for i in range(10)]
        lines.append(f"| {role} | {t['steps']} | {t['first_loss']:.4f} | {t['last_loss']:.4f} | "
                     + ", ".join(f"{s}: {v:.3f}" for s, v in pick) + " |")
    return "\n".join(lines) + "\n"

"""The command line as a careless user meets it: broken setups fail before loading, with the real cause;
nothing existing is lost; Ctrl-C always exits 130; a job that wrote nothing because of errors fails.

Most cases run ``cli.main`` in-process and fail before any program is compiled; the few that must run a
job or receive a signal use subprocesses on the tiny random family (see ``job_helpers``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from eft_jax import cli
from eft_jax.interrupts import Interrupts
from eft_jax.jobs.records import read_requests
from eft_jax.jobs.runner import _SameFailure
from job_helpers import REPO, read_jsonl, run, summary_counts, trio_config


def write_prompts(path: Path, *prompts: str) -> Path:
    path.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    return path


def generate(config: Path, prompts: Path, out: Path, *overrides: str) -> list[str]:
    return ["generate", "--config", str(config), "--prompts", str(prompts), "--out", str(out), "--no-progress",
            *overrides]


# --- A chat template that cannot render: the job stops before any sample, naming the cause -------------


def test_a_chat_template_that_cannot_render_stops_the_job_before_any_sample(family, env, tmp_path):
    """As on a machine without jinja2: transformers' apply_chat_template raises ImportError."""
    config = trio_config(family, tmp_path / "c.yaml")
    prompts = write_prompts(tmp_path / "in.jsonl", "hello", "world")
    out = tmp_path / "out.jsonl"
    block_jinja = "import sys; sys.modules['jinja2'] = None; from eft_jax.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", block_jinja, *generate(config, prompts, out)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "models.small_ft cannot render a prompt in its prompt_format 'chat'" in proc.stderr
    assert "jinja2" in proc.stderr and "pip install jinja2" in proc.stderr
    assert "loaded models" not in proc.stderr  # stopped before any weights were read
    assert not out.exists() and not (tmp_path / "out.errors.jsonl").exists()


def test_the_same_setup_error_on_every_line_of_a_batch_stops_the_job():
    same = _SameFailure(limit=3, total=10)
    same.failed("boom")
    assert same.attempt(None, [], lambda: "fine") == "fine"  # a line that renders resets the count
    same.failed("boom")
    same.failed("other")  # a different error: not the same fault
    same.failed("other")
    with pytest.raises(Exception, match="3 input lines in a row failed with the same error.*other"):
        same.failed("other")
    with pytest.raises(Exception, match="2 input lines in a row"):  # fewer lines than a batch: all of them
        tiny = _SameFailure(limit=8, total=2)
        tiny.failed("x")
        tiny.failed("x")


# --- Broken model files: the checkpoint's own error, naming the file, before anything is written ---------


def _corrupt(directory: Path, how: str) -> None:
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    if how == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif how == "garbage header":
        weights.write_bytes(data[:8] + b"\xff" * header_len + data[8 + header_len:])
    elif how == "bytes do not match the shape":
        header = json.loads(data[8: 8 + header_len])
        name = next(k for k in header if k.endswith("q_proj.weight"))
        header[name]["shape"] = [header[name]["shape"][0] * 2, header[name]["shape"][1]]
        text = json.dumps(header, separators=(",", ":")).encode().ljust(header_len)
        assert len(text) == header_len
        weights.write_bytes(data[:8] + text + data[8 + header_len:])
    elif how == "unsupported architecture":
        cfg = json.loads((directory / "config.json").read_text())
        cfg["model_type"], cfg["architectures"] = "mamba", ["MambaForCausalLM"]
        (directory / "config.json").write_text(json.dumps(cfg))
    elif how == "invalid config.json":
        (directory / "config.json").write_text("{not json")


@pytest.mark.parametrize("how, message", [
    ("truncated", "model.safetensors: "),
    ("garbage header", "not a readable safetensors file"),
    ("bytes do not match the shape", "q_proj.weight has shape"),
    ("unsupported architecture", "MambaForCausalLM"),
    ("invalid config.json", "config.json: not valid JSON"),
])
def test_a_broken_model_file_is_reported_as_itself(family, tmp_path, capsys, how, message):
    broken = tmp_path / "broken"
    shutil.copytree(family["large_base"][0], broken)
    _corrupt(broken, how)
    config = trio_config(family, tmp_path / "c.yaml")
    out = tmp_path / "out.jsonl"
    code = cli.main(generate(config, write_prompts(tmp_path / "in.jsonl", "hi"), out, f"models.large_base.path={broken}"))
    err = capsys.readouterr().err
    assert code == 2
    assert "models.large_base" in err and message in err and "prompt_format" not in err
    if how == "bytes do not match the shape":
        assert str(broken / "model.safetensors") in err and "data_offsets span" in err
    assert not out.exists()


# --- Checks made before loading; nothing existing deleted until the job starts --------------------------


def test_overwrite_keeps_the_old_output_when_the_job_cannot_start(family, tmp_path, capsys):
    config = trio_config(family, tmp_path / "c.yaml")
    out = tmp_path / "out.jsonl"
    old = json.dumps({"id": 0, "sample": 0, "prompt": "old", "fingerprint": "x"}) + "\n"
    out.write_text(old)
    code = cli.main(generate(config, write_prompts(tmp_path / "in.jsonl", "hi"), out, "--overwrite", "mesh.data=64"))
    err = capsys.readouterr().err
    assert code == 2 and "mesh.data=64 x mesh.model=1 needs 64 devices" in err
    assert "loaded models" not in err and out.read_text() == old


@pytest.mark.parametrize("where", ["under a file", "in /proc"])
def test_an_output_that_cannot_be_written_is_refused_before_loading(family, tmp_path, capsys, where):
    config = trio_config(family, tmp_path / "c.yaml")
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "out.jsonl" if where == "under a file" else Path("/proc/eft-jax-test/out.jsonl")
    code = cli.main(generate(config, write_prompts(tmp_path / "in.jsonl", "hi"), out))
    err = capsys.readouterr().err
    assert code == 2 and f"{out}: the output cannot be written" in err and "loaded models" not in err
    assert "Traceback" not in err


def test_convert_refuses_an_existing_destination_before_reading_the_source(tmp_path, capsys):
    dest = tmp_path / "dest"
    dest.mkdir()
    assert cli.main(["convert", str(tmp_path / "no-such-source"), str(dest)]) == 2
    err = capsys.readouterr().err
    assert f"{dest} already exists" in err and "no-such-source" not in err


# --- Inputs: empty, all invalid, bad fields, standard input ----------------------------------------------


def test_an_empty_input_says_so_and_an_all_invalid_one_fails_with_its_errors_file(family, tmp_path, capsys):
    config = trio_config(family, tmp_path / "c.yaml")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    out = tmp_path / "out.jsonl"
    assert cli.main(generate(config, empty, out)) == 0
    assert f"nothing to do: {empty} has no input lines" in capsys.readouterr().err

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n{"id": 2, "messages": "hello"}\nnot json\n')
    assert cli.main(generate(config, bad, out)) == 1  # nothing written, every line failed
    captured = capsys.readouterr()
    assert "none of the 3 input lines is valid" in captured.err and "every input line failed" in captured.out
    errors = read_jsonl(tmp_path / "out.errors.jsonl")
    assert [e["kind"] for e in errors] == ["missing_field", "invalid_field", "malformed_json"]
    assert "field 'messages' must be a list" in errors[1]["error"]


def test_a_whitespace_response_is_an_empty_response(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"id": 1, "prompt": "q", "response": "  \n"}) + "\n")
    _, issues, _ = read_requests(path, score=True)
    assert [i.kind for i in issues] == ["empty_response"]


def test_prompts_from_standard_input(family, env, tmp_path):
    config = trio_config(family, tmp_path / "c.yaml", max_new_tokens=3)
    out = tmp_path / "out.jsonl"
    lines = "".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in (("b", "second"), ("a", "first")))
    proc = subprocess.run([sys.executable, "-m", "eft_jax.cli", *generate(config, Path("-"), out)], input=lines,
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert [r["id"] for r in read_jsonl(out)] == ["b", "a"]


# --- Help and version -------------------------------------------------------------------------------------


def test_help_and_version(capsys):
    with pytest.raises(SystemExit):
        cli.main(["score", "--help"])
    text = capsys.readouterr().out
    assert "{{" not in text and '{"id", "prompt" or "messages", "response"}' in " ".join(text.split())
    assert "embedded one" in text and "SmolLM2" not in text
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("eft-jax ")


# --- Ctrl-C -----------------------------------------------------------------------------------------------


def test_ctrl_c_swallowed_while_import_eft_jax_imports_jax_interrupts_the_import():
    """Found by CI under load: a Ctrl-C landing in JAX's gc callback while ``import eft_jax`` imports JAX
    (before the command's own recorder is installed) was lost, and the job ran to its end with exit 0."""
    script = """
import gc, os, signal, sys
sent = []
def callback(phase, info):  # a gc callback that is running when the SIGINT arrives, as JAX's can be
    if not sent and "jax" in sys.modules:
        sent.append(1)
        os.kill(os.getpid(), signal.SIGINT)
gc.callbacks.append(callback)
try:
    import eft_jax
except KeyboardInterrupt:
    sys.exit(42)
sys.exit(3 if sent else 4)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 42, proc.stderr


def test_an_interrupt_swallowed_by_a_callback_is_raised_again_at_the_next_check():
    """What happens when SIGINT lands in JAX's gc callback: Python prints 'Exception ignored' and goes on."""
    before = signal.getsignal(signal.SIGINT)
    with Interrupts() as interrupts:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the signal is handled here, at the latest
        except KeyboardInterrupt:
            pass  # swallowed, as an ignored-exception callback would
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
    assert signal.getsignal(signal.SIGINT) is before  # restored


@pytest.mark.parametrize("when", ["start-up", "after the first model", "mid-run"])
def test_ctrl_c_at_any_moment_exits_130_and_loses_nothing(family, env, tmp_path, when):
    config = trio_config(family, tmp_path / "c.yaml", batch_size=1, max_new_tokens=8, chunk_size=2)
    prompts = write_prompts(tmp_path / "in.jsonl", *(f"count {i}" for i in range(12)))
    out = tmp_path / "out.jsonl"
    job = subprocess.Popen([sys.executable, "-m", "eft_jax.cli", *generate(config, prompts, out)], env=env,
                           cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.set_blocking(job.stderr.fileno(), False)
    stderr = b""
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and job.poll() is None:
            stderr += job.stderr.read() or b""
            if (when == "start-up" or (when == "after the first model" and b"loaded models." in stderr)
                    or (when == "mid-run" and out.exists() and out.read_bytes().count(b"\n") >= 2)):
                break
            time.sleep(0.01)
        assert job.poll() is None, "the job ended before it could be interrupted"
        if when == "start-up":
            time.sleep(1.5)  # importing the packages, reading the config
        job.send_signal(signal.SIGINT)
        job.wait(120)
    finally:
        if job.poll() is None:
            job.kill()
    os.set_blocking(job.stderr.fileno(), True)
    stderr += job.stderr.read()
    # While Python imports JAX (the first ~0.5 s, before main() can record Ctrl-C), the interrupt ends the
    # process by SIGINT, which a shell reports as 130 too; from then on main() exits 130 itself.
    assert job.returncode == 130 or (when == "start-up" and job.returncode == -signal.SIGINT), stderr.decode()
    written = read_jsonl(out) if out.exists() else []
    assert len({r["id"] for r in written}) == len(written)  # whole lines, each once
    resumed = run(env, *generate(config, prompts, out))
    assert resumed.returncode == 0, resumed.stderr
    assert summary_counts(resumed.stdout)["done"] == len(written)
    assert [r["id"] for r in read_jsonl(out)] == list(range(12))


# --- A run stopped by an error keeps what it wrote and fails --------------------------------------------


def test_an_error_during_the_run_keeps_the_finished_batches_and_exits_1(family, tmp_path, capsys, monkeypatch):
    from eft_jax import decode

    config = trio_config(family, tmp_path / "c.yaml", batch_size=1, max_new_tokens=3)
    prompts = write_prompts(tmp_path / "in.jsonl", "one", "two", "three")
    out = tmp_path / "out.jsonl"
    real = decode.decode_chunk
    calls = []

    def failing_second_chunk(*args, **kwargs):  # the first row finishes in one chunk, the second fails
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(decode, "decode_chunk", failing_second_chunk)
    code = cli.main(generate(config, prompts, out))
    captured = capsys.readouterr()
    assert code == 1
    assert "error:       RuntimeError: RESOURCE_EXHAUSTED" in captured.out and "re-run the same command" in captured.out
    (record,) = read_jsonl(out)  # the first sample is kept
    assert np.isfinite(record["logprob"]) and record["tokens"] == 3


# --- Every family through the job runner ---------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["gemma2", "gemma3", "olmo2", "qwen3_window"])
def test_generate_runs_an_eft_trio_of_every_family(env, tmp_path, variant):
    """`eft-jax generate` with an up-scaling trio of each family (greedy; speculative k = 2 for the
    sliding-window families Gemma 3 and Qwen3, plain decoding for the others) writes every sample, and its answers are the engine's (whose steps are checked against the
    formula in test_engine_exactness.py)."""
    import eft_jax
    from eft_jax.engine import Engine
    from eft_jax.sampling import SamplingParams
    from eft_jax.spec import Component, EFTSpec
    from tiny import write_checkpoint

    trio = {name: (tmp_path / name, None) for name in ("large_base", "small_base", "small_ft")}
    for seed, (name, layers) in enumerate((("large_base", 3), ("small_base", 2), ("small_ft", 2))):
        write_checkpoint(trio[name][0], variant, seed=seed, layers=layers, initializer_range=0.25)
    prompts = tmp_path / "p.jsonl"
    texts = ["The quick brown fox jumps", "Name three colours."]
    prompts.write_text("".join(json.dumps({"id": i, "prompt": t}) + "\n" for i, t in enumerate(texts)))
    m = {name: eft_jax.load_model(path) for name, (path, _) in trio.items()}
    spec = EFTSpec.up_scaling(Component(m["large_base"], "plain"), Component(m["small_base"], "plain"),
                              Component(m["small_ft"], "chat"), 1.0)
    want = [r.text for r in Engine(spec).generate(texts, SamplingParams(temperature=0.0), max_new_tokens=5)]
    k = 2 if variant in ("gemma3", "qwen3_window") else 0  # one CLI run per family keeps the suite's time
    config = trio_config(trio, tmp_path / "c.yaml", max_new_tokens=5)
    out = tmp_path / "out.jsonl"
    proc = run(env, *generate(config, prompts, out, "sampling.temperature=0", f"speculative.k={k}"))
    assert proc.returncode == 0, proc.stderr
    assert [r["response"] for r in read_jsonl(out)] == want

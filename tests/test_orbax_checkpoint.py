"""`eft-jax convert` writes an orbax checkpoint that load_model restores into shardings."""

import subprocess
import sys

import jax
import numpy as np

import eft_jax
from eft_jax.sharding import make_mesh
from tiny import TOKENIZER_SIZE, hf_config, write_checkpoint
from tolerances import logits_tolerance

HF = hf_config("mha")  # write_checkpoint's shapes


def test_convert_cli_then_restore_sharded(tmp_path):
    src, dest = tmp_path / "hf", tmp_path / "converted"
    write_checkpoint(src, "mha")
    run = subprocess.run([sys.executable, "-m", "eft_jax.cli", "convert", str(src), str(dest)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "wrote" in run.stdout

    original = eft_jax.load_model(src)
    restored = eft_jax.load_model(dest, mesh=make_mesh(data=2, model=4))
    assert restored.config == original.config
    assert restored.params["layers"]["mlp"]["up"].sharding.spec[-1] == "model"
    tokens = np.random.RandomState(0).randint(0, TOKENIZER_SIZE, size=(2, 12))
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(original.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bit-exact weights
    # Logits differ only by reduction order across the 2x4 mesh: float32 eps x max |logit| x sqrt(longest
    # reduction (MLP 144) x 2 layers) x LAMBDA = 8 (1e-5 here, observed 2e-7).
    want = np.asarray(original.logits(tokens))
    tol = logits_tolerance(want, hidden=HF.hidden_size, intermediate=HF.intermediate_size,
                           layers=HF.num_hidden_layers, seq=tokens.shape[1])
    np.testing.assert_allclose(np.asarray(restored.logits(tokens)), want, atol=tol, rtol=0)
    assert restored.tokenizer.encode("hello") == original.tokenizer.encode("hello")
    assert restored.tokenizer.chat_template == original.tokenizer.chat_template


def test_convert_refuses_existing_destination(tmp_path):
    write_checkpoint(tmp_path / "hf", "gqa")
    (tmp_path / "out").mkdir()
    run = subprocess.run([sys.executable, "-m", "eft_jax.cli", "convert", str(tmp_path / "hf"), str(tmp_path / "out")],
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert "already exists" in run.stderr


def test_restore_with_other_dtype(tmp_path):
    write_checkpoint(tmp_path / "hf", "gqa")
    eft_jax.convert(tmp_path / "hf", tmp_path / "ck")
    model = eft_jax.load_model(tmp_path / "ck", dtype="bfloat16")
    assert model.dtype == np.dtype("bfloat16")

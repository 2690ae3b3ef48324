"""The trainer: loss goes down and overfits, resume is exact, exported checkpoints load everywhere."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eft_jax
from eft_jax.models import llama
from eft_jax.models.config import LlamaConfig
from eft_jax.train import OptimizerConfig, TokenDataset, TrainConfig, Trainer, chat_dataset, export_hf
from eft_jax.train.checkpointing import ResumeError
from tiny import tiny_tokenizer
from tolerances import logits_tolerance

CFG = LlamaConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, max_position_embeddings=64)


def _chats():
    tok = tiny_tokenizer()
    facts = [("red", "apple"), ("blue", "sky"), ("green", "leaf"), ("gold", "sun")]
    convs = [[{"role": "user", "content": f"{c}?"}, {"role": "assistant", "content": f"{o}!"}] for c, o in facts]
    return tok, chat_dataset(tok, convs, seq_len=24)


def _equal(a, b) -> bool:
    return all(bool(np.array_equal(np.asarray(x), np.asarray(y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_sft_loss_decreases_and_overfits_a_handful_of_examples():
    tok, data = _chats()
    # The mask covers exactly the replies and their end-of-turn token.
    first = data.tokens[0][data.loss_mask[0] == 1].tolist()
    assert tok.decode(first) == "apple!</s>"
    cfg = TrainConfig(steps=60, batch_size=4, optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=5),
                      log_every=10, mesh_data=4, mesh_model=2, sharding="fsdp", min_shard_size=256)
    result = Trainer(CFG, cfg).fit(data, log=None)
    losses = [h["loss"] for h in result.history]
    print(f"SFT loss {losses[0]:.3f} -> {losses[-1]:.4f}")
    # Outcome thresholds, not rounding bounds: a deterministic run (fixed seeds and data order) ends at
    # ~3e-3, an order of magnitude inside them, so rounding differences between machines cannot flip them.
    assert losses[-1] < 0.5 * losses[0]
    assert losses[-1] < 0.05, losses  # memorised
    # Greedy replies are the memorised ones: under teacher forcing every reply token is the argmax (so
    # greedy decoding, which feeds its own argmaxes back, produces exactly the replies).
    positions = jnp.broadcast_to(jnp.arange(data.seq_len - 1), (data.num_rows, data.seq_len - 1))
    logits, _ = llama.forward(CFG, result.params, jnp.asarray(data.tokens[:, :-1]), positions)
    argmax = np.asarray(jnp.argmax(logits[..., : len(tok)], axis=-1))
    target = data.loss_mask[:, 1:] == 1
    np.testing.assert_array_equal(argmax[target], data.tokens[:, 1:][target])


def test_resumed_run_is_bit_identical(tmp_path):
    data = TokenDataset.pretraining(np.random.default_rng(0).integers(0, 256, (12, 16)))
    base = dict(steps=8, batch_size=4, optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=2), log_every=1,
                mesh_data=4, mesh_model=2, sharding="fsdp", min_shard_size=256)
    straight = Trainer(CFG, TrainConfig(**base)).fit(data, log=None)

    ckpt = TrainConfig(**base, checkpoint_dir=str(tmp_path / "run"), checkpoint_every=2)
    first = Trainer(CFG, ckpt).fit(data, log=None, stop_after=5)  # "interrupted" after 5 steps
    assert first.step == 5
    resumed = Trainer(CFG, ckpt).fit(data, log=None)
    assert resumed.step == 8 and resumed.history[0]["step"] == 6
    assert _equal(straight.params, resumed.params)
    assert [h["loss"] for h in straight.history[5:]] == [h["loss"] for h in resumed.history]

    # The restored optimizer state equals the saved one (not only the params).
    trainer = Trainer(CFG, ckpt)
    from eft_jax.train.checkpointing import TrainCheckpointer

    saved = TrainCheckpointer(ckpt.checkpoint_dir, ckpt).restore(trainer.abstract_state(), step=8)
    assert int(saved["step"]) == 8 and _equal(saved["params"], resumed.params)
    assert jax.tree.structure(saved["opt_state"]) == jax.tree.structure(trainer.init_state()["opt_state"])

    # A different run in the same directory is refused.
    other = TrainConfig(**{**base, "seed": 1}, checkpoint_dir=str(tmp_path / "run"))
    with pytest.raises(ResumeError, match="train_config.seed"):
        Trainer(CFG, other).fit(data, log=None)


@pytest.mark.parametrize("tied", [False, True])
def test_exported_checkpoint_loads_in_transformers_and_eft_jax(tmp_path, tied):
    import torch
    import transformers

    cfg = LlamaConfig(vocab_size=264, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, rope_theta=50000.0, rms_norm_eps=1e-5,
                      max_position_embeddings=64, tie_word_embeddings=tied)
    params = llama.init_params(cfg, jax.random.key(3))
    # Non-trivial norms so a mistake in mapping them shows.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 * jax.random.normal(jax.random.key(len(str(p))), x.shape) if p[-1].key == "scale" else x,
        params)
    tok = tiny_tokenizer()
    dest = export_hf(cfg, params, tmp_path / "hf", tokenizer=tok, dtype=jnp.float32)
    assert json.loads((dest / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]

    tokens = np.random.default_rng(1).integers(0, 261, (2, 12))
    ours = np.asarray(llama.forward(cfg, params, jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(12), (2, 12)))[0])
    hf = transformers.AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.as_tensor(tokens)).logits.numpy()
    # Two float32 forwards of the same weights: float32 eps x max |logit| x sqrt(longest reduction (MLP 48)
    # x 2 layers) x LAMBDA = 8 (~2e-4 at |logit| <= 26; observed 1.2e-5); a mis-exported tensor gives O(1).
    def tol(ref):
        return logits_tolerance(ref, hidden=cfg.hidden_size, intermediate=cfg.intermediate_size,
                                layers=cfg.num_layers, seq=tokens.shape[1])

    np.testing.assert_allclose(theirs, ours, atol=tol(theirs), rtol=0)

    loaded = eft_jax.load_model(dest)
    assert loaded.config == cfg
    assert _equal(loaded.params, params)
    assert loaded.tokenizer.chat_template == tok.chat_template

    # bf16 export: eft_jax and transformers read the same rounded weights.
    dest16 = export_hf(cfg, params, tmp_path / "hf16", tokenizer=tok)
    loaded16 = eft_jax.load_model(dest16)
    assert loaded16.dtype == jnp.bfloat16
    rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    assert _equal(loaded16.params, rounded)
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(dest16, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs16 = hf16(torch.as_tensor(tokens)).logits.numpy()
    ours16 = np.asarray(eft_jax.load_model(dest16, dtype=jnp.float32).logits(tokens))
    ref16 = np.asarray(llama.forward(cfg, jax.tree.map(lambda x: x.astype(jnp.float32), rounded), jnp.asarray(tokens),
                                     jnp.broadcast_to(jnp.arange(12), (2, 12)))[0])[..., :261]
    # float32 arithmetic on the same bf16-rounded weights on all three sides: the float32 bound again
    np.testing.assert_allclose(theirs16[..., :261], ref16, atol=tol(ref16), rtol=0)
    np.testing.assert_allclose(ours16, ref16, atol=tol(ref16), rtol=0)


def test_export_refuses_to_overwrite(tmp_path):
    params = llama.init_params(CFG, jax.random.key(0))
    export_hf(CFG, params, tmp_path / "x")
    with pytest.raises(FileExistsError):
        export_hf(CFG, params, tmp_path / "x")


def test_train_cli_pretrains_then_fine_tunes(tmp_path):
    from eft_jax.train.cli import main

    tok_dir = tmp_path / "tok"
    tiny_tokenizer().save_pretrained(tok_dir)
    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"text": f"line {i} of a tiny corpus"}) + "\n" for i in range(40)))
    (tmp_path / "chat.jsonl").write_text("".join(
        json.dumps({"prompt": f"{i}?", "response": f"{i}!"}) + "\n" for i in range(8)))
    (tmp_path / "pre.yaml").write_text(f"""
model: {{hidden_size: 32, num_layers: 1, num_heads: 4, num_kv_heads: 2, intermediate_size: 64, max_position_embeddings: 64}}
tokenizer: {tok_dir}
data: {{path: {tmp_path / 'text.jsonl'}, seq_len: 32}}
train: {{steps: 3, batch_size: 8, mesh_data: 8, min_shard_size: 64, checkpoint_dir: {tmp_path / 'ckpt'}}}
output: {tmp_path / 'base'}
""")
    assert main(["--config", str(tmp_path / "pre.yaml")]) == 0
    base = eft_jax.load_model(tmp_path / "base")
    assert base.config.vocab_size == len(base.tokenizer) and base.dtype == jnp.bfloat16
    (tmp_path / "sft.yaml").write_text(f"""
init_from: {tmp_path / 'base'}
data: {{path: {tmp_path / 'chat.jsonl'}, seq_len: 16}}
train: {{steps: 2, batch_size: 8}}
output: {tmp_path / 'ft'}
export_dtype: float32
""")
    assert main(["--config", str(tmp_path / "sft.yaml"), "train.steps=3", "train.mesh_data=4", "train.mesh_model=2"]) == 0
    ft = eft_jax.load_model(tmp_path / "ft")
    assert ft.config == base.config and ft.dtype == jnp.float32
    # Bad configs are refused with the key named.
    (tmp_path / "bad.yaml").write_text("init_from: x\nmodel: {}\ndata: {path: y}\ntrain: {steps: 1}\noutput: z\n")
    assert main(["--config", str(tmp_path / "bad.yaml")]) == 2
    assert main(["--config", str(tmp_path / "sft.yaml"), "train.stepz=3"]) == 2


def test_train_config_refusals_name_the_file_or_override_and_the_key(tmp_path):
    from eft_jax.config import ConfigError
    from eft_jax.train.cli import TrainConfigError, load_train_config

    assert issubclass(TrainConfigError, ConfigError)  # one error, one override grammar for every command
    p = tmp_path / "t.yaml"
    p.write_text("init_from: x\ndata: {path: y}\ntrain: {steps: 1}\noutput: z\n")
    config = load_train_config(p, ["train.optimizer.learning_rate=1e-3", "data.seq_len=16"])
    assert config["train"]["optimizer"]["learning_rate"] == 0.001 and config["data"]["seq_len"] == 16
    for overrides, message in [
        (["outptu=3"], "(command-line override 'outptu=3'): outptu: unknown key (did you mean 'output'?)"),
        (["export_dtype=fp8"], "export_dtype: must be one of bfloat16, float16, float32; got 'fp8'"),
        (["model={}"], f"{p}: init_from: give exactly one of init_from (fine-tune) or model"),
        (["train.steps"], "command-line override 'train.steps': expected key.sub=value"),
        (["output.x=1"], "output is a value, not a section"),
    ]:
        with pytest.raises(TrainConfigError) as e:
            load_train_config(p, overrides)
        assert message in str(e.value), (overrides, str(e.value))

"""Sharded equals unsharded; weights really are split over the model axis."""

import jax
import numpy as np
import pytest

import eft_jax
from eft_jax.sharding import ShardingRules, logical_to_spec, make_mesh
from tiny import TOKENIZER_SIZE, hf_config, write_checkpoint
from tolerances import logits_tolerance

HF = hf_config("mha")  # write_checkpoint's shapes


def test_2x4_mesh_gives_the_same_logits_as_one_device(tmp_path):
    # 4 q heads / 4 kv heads, vocab 264 and MLP 144 all divide by 4: every TP rule applies.
    write_checkpoint(tmp_path, "mha")
    single = eft_jax.load_model(tmp_path)
    mesh = make_mesh(data=2, model=4)
    sharded = eft_jax.load_model(tmp_path, mesh=mesh, sharding="tensor_parallel")
    tokens = np.random.RandomState(0).randint(0, TOKENIZER_SIZE, size=(4, 24))
    # Only the reduction order across the mesh differs: float32 eps x max |logit| x sqrt(longest reduction
    # (MLP 144) x 2 layers) x LAMBDA = 8 (1.2e-5 here, observed 3e-7); a mis-sharded weight gives O(1).
    want = np.asarray(single.logits(tokens))
    tol = logits_tolerance(want, hidden=HF.hidden_size, intermediate=HF.intermediate_size,
                           layers=HF.num_hidden_layers, seq=tokens.shape[1])
    np.testing.assert_allclose(np.asarray(sharded.logits(tokens)), want, atol=tol, rtol=0)

    q = sharded.params["layers"]["attn"]["q"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, None, "model", None)
    assert q.addressable_shards[0].data.shape == (2, 64, 1, 16)  # [layers, embed, heads/4, head_dim]
    assert sharded.params["embed"].sharding.spec[0] == "model"  # vocab split
    replicated = eft_jax.load_model(tmp_path, mesh=mesh, sharding="replicated")
    assert replicated.params["layers"]["attn"]["q"].addressable_shards[0].data.shape == (2, 64, 4, 16)


def test_indivisible_dimension_falls_back_to_replication():
    mesh = make_mesh(data=2, model=4)
    rules = ShardingRules.from_mapping({"kv_heads": "model", "mlp": "model"})
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 3, 16), rules, mesh) == jax.sharding.PartitionSpec(None, None, None)


def test_rules_reject_one_mesh_axis_twice():
    mesh = make_mesh(data=2, model=4)
    rules = ShardingRules.from_mapping({"heads": "model", "embed": "model"})
    with pytest.raises(ValueError, match="two axes"):
        logical_to_spec(("embed", "heads"), (64, 4), rules, mesh)


def test_mesh_shape_validation():
    with pytest.raises(ValueError, match="divide"):
        make_mesh(model=3)


@pytest.mark.parametrize("variant", ["gemma3", "olmo2"])
def test_other_families_on_a_2x4_mesh(tmp_path, variant):
    """Per-head and whole-width q/k norms, sandwich norms and per-layer windows under tensor parallelism
    (q heads 4 over the 4-way model axis; OLMo 2's q norm then reduces across devices)."""
    write_checkpoint(tmp_path, variant)
    single = eft_jax.load_model(tmp_path)
    sharded = eft_jax.load_model(tmp_path, mesh=make_mesh(data=2, model=4), sharding="tensor_parallel")
    tokens = np.random.RandomState(1).randint(0, TOKENIZER_SIZE, size=(4, 24))
    want = np.asarray(single.logits(tokens))
    tol = logits_tolerance(want, hidden=HF.hidden_size, intermediate=HF.intermediate_size,
                           layers=HF.num_hidden_layers, seq=tokens.shape[1])
    np.testing.assert_allclose(np.asarray(sharded.logits(tokens)), want, atol=tol, rtol=0)

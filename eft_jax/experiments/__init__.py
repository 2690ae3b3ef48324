"""Experiments on real benchmarks (HumanEval: :mod:`eft_jax.experiments.humaneval`)."""

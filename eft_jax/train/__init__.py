"""Training: next-token pretraining and supervised fine-tuning with optax, orbax checkpoints, HF export."""

from eft_jax.train.data import TokenDataset, chat_dataset, jsonl_dataset, text_dataset
from eft_jax.train.export import export_hf
from eft_jax.train.lora import LoraConfig
from eft_jax.train.trainer import OptimizerConfig, TrainConfig, Trainer, TrainResult, train

__all__ = [
    "LoraConfig", "OptimizerConfig", "TokenDataset", "TrainConfig", "TrainResult", "Trainer", "chat_dataset", "export_hf",
    "jsonl_dataset", "text_dataset", "train",
]

"""Run by tests under torchrun: train a tiny model with DDP and save this rank's weights."""

import sys
from pathlib import Path

import torch

from midigen.data.store import TokenStore
from midigen.model import ModelConfig
from midigen.training.config import TrainConfig
from midigen.training.recipe import train

store, run, out = sys.argv[1:4]
model_config = ModelConfig.preset("tiny", TokenStore(store).config)  # the tokenizer the store was encoded with
train_config = TrainConfig(max_steps=6, batch_size=2, eval_interval=3, log_interval=3, warmup_steps=2, device="cpu")
result, trainer = train(store, run, model_config, train_config, progress=False)
rank = trainer.dist.rank
torch.save({"weights": trainer.model.state_dict(), "loss": result.train_loss}, Path(out) / f"rank{rank}.pt")

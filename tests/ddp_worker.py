"""Run by tests under torchrun: train (or resume) a tiny model with DDP and save what this rank ends with.

Usage: ddp_worker.py STORE RUN OUT [NAME=VALUE ...], where each NAME is a TrainConfig field with an integer value, or
`memory` (a memory mode), `resume=1`, or `interrupt_at=N` (Ctrl-C while the N-th batch of song lanes is drawn: the
step finishes, a checkpoint is written and the run stops). OUT/rank<r>.pt receives the rank's weights, its last train loss, the final
validation loss and the songs of each of its micro-steps.
"""

import sys
from pathlib import Path

import pytest
import torch
from test_training import interrupt_at_batch

from midigen.data.batching import SongLanes, StaggeredLanes
from midigen.data.store import TokenStore
from midigen.model import ModelConfig
from midigen.training.config import TrainConfig
from midigen.training.recipe import train

store, run, out = sys.argv[1:4]
settings = dict(argument.split("=", 1) for argument in sys.argv[4:])
memory, resume = settings.pop("memory", "none"), settings.pop("resume", "0") == "1"
interrupt_at = int(settings.pop("interrupt_at", "0"))
if interrupt_at:  # contiguous lanes, and the staggered ones memory trains with by default (a run draws from one)
    for lanes in (SongLanes, StaggeredLanes):
        interrupt_at_batch(pytest.MonkeyPatch(), lanes, interrupt_at)
# the tokenizer the store was encoded with; a short context, so that songs span several segments
model_config = ModelConfig.preset("tiny", TokenStore(store).config, memory=memory, context=16)
defaults = dict(max_steps=6, batch_size=2, eval_interval=3, log_interval=3, warmup_steps=2)
train_config = TrainConfig(**(defaults | {name: int(value) for name, value in settings.items()}), device="cpu")
result, trainer = train(store, run, None if resume else model_config, train_config, resume=resume, progress=False)
torch.save({"weights": trainer.model.state_dict(), "loss": result.train_loss, "val_loss": result.val.get("val_loss"),
            "songs": [[int(song) for song in sampler.songs] for sampler, _ in trainer.micro_steps]},
           Path(out) / f"rank{trainer.dist.rank}.pt")

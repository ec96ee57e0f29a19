"""Training a music model on a token store: the glue between data, model and the generic trainer."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from midigen.codec.config import TokenizerConfig
from midigen.data.batching import RandomChunks, batched, evaluation_windows, gather_windows
from midigen.data.store import TokenStore
from midigen.errors import MidigenError
from midigen.evaluation.nll import token_nll
from midigen.model.config import ModelConfig
from midigen.model.transformer import MusicTransformer
from midigen.training.config import TrainConfig
from midigen.training.distributed import resolve_device, setup_distributed
from midigen.training.trainer import CHECKPOINT_FILE, FitResult, Trainer, load_checkpoint_file

log = logging.getLogger(__name__)


@dataclass
class TrainedModel:
    """A model restored from a checkpoint, with the configs it was trained with."""

    model: MusicTransformer
    tokenizer: TokenizerConfig
    model_config: ModelConfig
    train_config: TrainConfig
    path: Path
    step: int


def open_training_store(path: str | Path) -> TokenStore:
    store = TokenStore(path)
    if not store.complete:
        raise MidigenError(f"{store.root}: store is unfinished (an encode was interrupted); rerun `midigen encode`")
    if len(store) == 0:
        raise MidigenError(f"{store.root}: store holds no songs")
    return store


def split_songs(store: TokenStore) -> tuple[list[int], list[int]]:
    """Train and validation songs from the store's split; a collection too small for a validation
    split lends its last training song, so validation figures always exist."""
    train, val = store.split_indices("train"), store.split_indices("val")
    if not val:
        val = store.split_indices("test")
    if not val and len(train) > 1:
        val = [train.pop()]
        log.warning("%s has no validation songs; validating on %s", store.root, store.songs[val[0]].path)
    if not train:
        raise MidigenError(f"{store.root}: no training songs (need at least 2 songs)")
    return train, val or train


def next_token_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
    tokens = batch["tokens"]
    output = model(tokens[:, :-1], batch["bars"][:, :-1], batch["beats"][:, :-1], targets=tokens[:, 1:])
    return output.loss, int((tokens[:, 1:] != 0).sum())


def validation_loss(
    store: TokenStore, songs: list[int], context: int, limit: int, batch_size: int, device: torch.device
):
    """A function computing mean NLL over a fixed set of validation windows."""
    windows = evaluation_windows(store, songs, context, limit)
    batches = [gather_windows(store, group, context + 1) for group in batched(windows, batch_size)]

    def evaluate(model: nn.Module) -> dict[str, float]:
        total, count = 0.0, 0
        for batch in batches:
            nll = token_nll(model, batch, device)
            scored = batch["tokens"][:, 1:] != 0
            total += float(nll[scored].sum())
            count += int(scored.sum())
        return {"val_loss": total / max(1, count)}

    return evaluate


def train(
    store_path: str | Path,
    run_dir: str | Path,
    model_config: ModelConfig | None,
    train_config: TrainConfig,
    resume: bool = False,
    progress: bool = True,
) -> tuple[FitResult, Trainer]:
    """Train (or resume training) a model on a token store; checkpoints and metrics go to `run_dir`."""
    run_dir = Path(run_dir)
    store = open_training_store(store_path)
    if resume:
        checkpoint = load_checkpoint_file(run_dir / CHECKPOINT_FILE)
        model_config = ModelConfig.from_dict(checkpoint["configs"]["model"])
        saved_train = TrainConfig.from_dict(checkpoint["configs"]["train"])
        # a resumed run keeps its settings; only the budget may be changed
        train_config = replace(saved_train, max_steps=train_config.max_steps, max_minutes=train_config.max_minutes)
    model_config = model_config or ModelConfig.preset("small", store.config)
    if model_config.vocab_size != store.config.vocab.size or model_config.beat_positions != store.config.beat_positions:
        raise MidigenError(f"{store.root}: the model's vocabulary does not match the store's tokenizer")
    dist = setup_distributed(train_config.device)
    torch.manual_seed(train_config.seed)
    model = MusicTransformer(model_config)
    train_songs, val_songs = split_songs(store)
    sampler = RandomChunks(
        store,
        train_songs,
        model_config.context,
        train_config.batch_size,
        seed=train_config.seed * 7919 + dist.rank,
        max_transpose=train_config.max_transpose,
    )
    evaluate = validation_loss(
        store, val_songs, model_config.context, train_config.eval_windows, 2 * train_config.batch_size, dist.device
    )
    saved_configs: dict[str, Any] = {
        "model": model_config.to_dict(),
        "tokenizer": store.config.to_dict(),
        "train": train_config.to_dict(),
        "store": str(store.root),
    }
    trainer = Trainer(
        model,
        train_config,
        run_dir,
        sampler,
        next_token_loss,
        evaluate,
        dist,
        saved_configs,
        stateful={"sampler": sampler},
        progress=progress,
    )
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    return trainer.fit(resume=resume), trainer


def load_trained(path: str | Path, device: str = "auto") -> TrainedModel:
    """Restore a model from a run folder or a checkpoint file, ready for inference."""
    checkpoint = load_checkpoint_file(path)
    configs = checkpoint["configs"]
    model_config = ModelConfig.from_dict(configs["model"])
    model = MusicTransformer(model_config)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as exc:
        raise MidigenError(f"{path}: checkpoint weights do not fit its model config ({str(exc).splitlines()[0]})") from None
    target = resolve_device(device)
    return TrainedModel(
        model=model.to(target).eval(),
        tokenizer=TokenizerConfig.from_dict(configs["tokenizer"]),
        model_config=model_config,
        train_config=TrainConfig.from_dict(configs["train"]),
        path=Path(path),
        step=int(checkpoint["scheduler"]["step"]),
    )


__all__ = ["TrainedModel", "load_trained", "next_token_loss", "open_training_store", "split_songs", "train"]

"""Training a music model on a token store: the glue between data, model and the generic trainer."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from midigen.codec.config import TokenizerConfig, describe_difference
from midigen.codec.registry import load_tokenizer
from midigen.data.batching import RandomChunks, SongLanes, StaggeredLanes, TokenArrays, model_inputs
from midigen.data.store import TokenStore, open_finished_store
from midigen.errors import BadMidiError, MidigenError
from midigen.evaluation.nll import score_songs
from midigen.model.config import ModelConfig
from midigen.model.memory import MemoryState, knn_store_device
from midigen.model.transformer import MusicTransformer
from midigen.training.config import TrainConfig
from midigen.inference.model_files import (CONFIG_FILE, RUN_KIND, LoadedModel, model_folder, read_config,
                                           run_config_dict)
from midigen.training.distributed import Distributed, all_reduce_sums, balanced_shares, setup_distributed
from midigen.training.trainer import FitResult, MicroStep, Stateful, Trainer

log = logging.getLogger(__name__)

PICTURE_TOKENS = 48  # a few bars: cheap enough to draw at every validation
PICTURE_WIDTH_PX, PICTURE_HEIGHT_PX = 800, 300


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


class SegmentLoss:
    """Next-token loss of one batch, run through the lanes' memories (a no-op without memory)."""

    def __init__(self, memory: MemoryState) -> None:
        self.memory = memory

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
        tokens, features, targets = model_inputs(batch, self.memory.config.embeddings)
        output = self.memory.forward(model, tokens, features, targets=targets, new_song=batch["new_song"])
        return output.loss, int((targets != 0).sum())


def validation_songs(store: TokenStore, songs: list[int], max_tokens: int) -> list[int]:
    """The fixed validation set: the first songs of the split, up to `max_tokens` tokens (at least one song)."""
    chosen, total = [], 0
    for song in songs:
        if chosen and total + int(store.songs.lengths[song]) > max_tokens:
            break
        chosen.append(song)
        total += int(store.songs.lengths[song])
    return chosen


def validation_loss(data: TokenArrays, songs: list[int], lanes: int, ranks: Distributed,  # noqa: ANN201
                    knn_device: torch.device):
    """A function computing the mean NLL of a model over the fixed validation songs, with its memory. Under torchrun
    each rank scores its own share of the songs and the sums of NLL and of tokens over the ranks give the mean: the
    figure one process gives."""
    own = [songs[i] for i in balanced_shares(data.lengths[songs], ranks.world_size)[ranks.rank]]

    def evaluate(model: nn.Module) -> dict[str, float]:
        total, count = 0.0, 0
        for batch, nll in score_songs(model, data, own, lanes, ranks.device, knn_device) if own else ():
            scored = batch["tokens"][:, 1:] != 0
            total += float(nll[scored].sum())
            count += int(scored.sum())
        total, count = all_reduce_sums([total, count], ranks)
        return {"val_loss": total / max(1, count)}

    return evaluate


def make_sampler(data: TokenArrays, songs: list[int], model_config: ModelConfig, config: TrainConfig, shard: int):  # noqa: ANN201
    mode = config.batching
    if mode == "auto":
        mode = "random" if model_config.memory == "none" else "staggered"
    if mode == "random" and model_config.memory != "none":
        log.warning("memory %s with random chunks: memory is cleared every batch; use staggered batching",
                    model_config.memory)
    seed = config.seed * 7919 + shard
    if mode == "random":
        return RandomChunks(data, songs, model_config.context, config.batch_size, seed, config.max_transpose)
    if mode == "staggered":
        return StaggeredLanes(data, songs, model_config.context, config.batch_size, seed, config.max_transpose)
    return SongLanes(data, songs, model_config.context, config.batch_size, seed, mode, config.max_transpose)


def make_micro_steps(data: TokenArrays, songs: list[int], model_config: ModelConfig, config: TrainConfig,
                     ranks: Distributed, knn_device: torch.device) -> tuple[list[MicroStep], dict[str, Stateful]]:
    """This rank's micro-steps, and their state to checkpoint.

    The training songs are shared out, balanced by tokens, among processes × `accumulate` shards; rank r plays
    shards r·K … r·K + K − 1 (K = `accumulate`), each with its own sampler (seeded by its shard) and lane memory.
    So an epoch covers every song once over all the ranks, and the data of a step depends only on processes × K:
    two processes see what one process accumulating two batches sees.
    """
    shards = ranks.world_size * config.accumulate
    if len(songs) < shards:
        raise MidigenError(f"{len(songs)} training song(s) cannot be shared among {ranks.world_size} process(es) × "
                           f"{config.accumulate} accumulated batch(es): each needs at least one song")
    shares = balanced_shares(data.lengths[songs], shards)
    micro_steps: list[MicroStep] = []
    stateful: dict[str, Stateful] = {}
    for index in range(config.accumulate):
        shard = ranks.rank * config.accumulate + index
        sampler = make_sampler(data, [songs[i] for i in shares[shard]], model_config, config, shard)
        memory = MemoryState(model_config, config.batch_size, ranks.device, knn_device)
        micro_steps.append((sampler, SegmentLoss(memory)))
        suffix = f".{index}" if index else ""  # the first keeps the names that runs made before accumulation used
        stateful |= {f"sampler{suffix}": sampler, f"memory{suffix}": memory}
    return micro_steps, stateful


def generation_picture(tokenizer_config: TokenizerConfig, model_config: ModelConfig, run_dir: Path):  # noqa: ANN201
    """A function drawing, as a piano roll, what the model writes from nothing: always with the same seed, so
    that the pictures of successive validations show the model change rather than the dice."""
    from matplotlib.image import imread

    from midigen.evaluation.render import render_piano_roll
    from midigen.inference.generate import empty_prompt, generate, generation_score
    from midigen.inference.sampling import SamplingConfig

    tokenizer = load_tokenizer(tokenizer_config)

    def illustrate(model: nn.Module, step: int) -> dict[str, np.ndarray]:
        trained = LoadedModel(model, tokenizer_config, model_config, run_dir, step)  # type: ignore[arg-type]
        generation = generate(trained, empty_prompt(tokenizer), SamplingConfig(seed=0), new_tokens=PICTURE_TOKENS)
        with tempfile.TemporaryDirectory(prefix="midigen-picture-") as folder:
            try:
                png = render_piano_roll(generation_score(generation, tokenizer), Path(folder) / "roll.png",
                                        f"step {step}: {PICTURE_TOKENS} tokens from nothing",
                                        PICTURE_WIDTH_PX, PICTURE_HEIGHT_PX)
            except BadMidiError:  # no notes (yet): nothing to draw
                return {}
            rgba = imread(png)  # (H, W, 4) floats in [0, 1]
        return {"generation/piano_roll": np.round(rgba[..., :3] * 255).astype(np.uint8)}

    return illustrate


def store_description(store: TokenStore) -> dict[str, Any]:
    """What a run records of the store it learned from (its identity tells two stores apart wherever they lie)."""
    return {"path": str(store.root), "identity": store.identity(), "songs": len(store),
            "tokens": store.num_tokens, "training_songs": len(store.split_indices("train"))}


def train(
    store_path: str | Path,
    run_dir: str | Path,
    model_config: ModelConfig | None,
    train_config: TrainConfig | None,
    resume: bool = False,
    progress: bool = True,
) -> tuple[FitResult, Trainer]:
    """Train (or resume training) a model on a token store; checkpoints and metrics go to `run_dir`.

    A resumed run keeps its settings: only the budget of `train_config` is used, and it replaces the run's;
    with no `train_config` the run keeps its budget too.
    """
    run_dir = Path(run_dir)
    store = open_finished_store(store_path)
    if resume:
        saved = read_config(model_folder(run_dir))
        if saved["kind"] != RUN_KIND:
            raise MidigenError(f"{run_dir}: a model folder, not a run folder: there is no training state to resume")
        if saved["tokenizer"] != store.config:
            raise MidigenError(f"{store.root}: store was encoded with another tokenizer than the run's "
                               f"({describe_difference(saved['tokenizer'], store.config)})")
        try:
            saved_train = TrainConfig.from_saved(saved["train"])
        except MidigenError as exc:
            raise MidigenError(f"{run_dir / CONFIG_FILE}: {exc}") from None
        model_config = saved["model"]
        train_config = saved_train if train_config is None else replace(
            saved_train, max_steps=train_config.max_steps, max_minutes=train_config.max_minutes)
    elif train_config is None:
        raise ValueError("a new run needs a training config")
    model_config = model_config or ModelConfig.preset("small", store.config)
    features = set(store.tokenizer.feature_sizes)
    if model_config.vocab_size != store.tokenizer.vocab.size or not set(model_config.embeddings) <= features:
        raise MidigenError(f"{store.root}: the model's vocabulary or features ({', '.join(model_config.embeddings)}) "
                           f"do not match the store's tokenizer ({', '.join(sorted(features))})")
    dist = setup_distributed(train_config.device)
    torch.manual_seed(train_config.seed)
    model = MusicTransformer.for_tokenizer(model_config, store.tokenizer)
    train_songs, val_songs = split_songs(store)
    data = TokenArrays(store, train_config.data_location, dist.device)
    knn_device = knn_store_device(train_config.data_location, model_config,
                                  train_config.batch_size * train_config.accumulate, dist.device)
    micro_steps, stateful = make_micro_steps(data, train_songs, model_config, train_config, dist, knn_device)
    if dist.is_main:
        log.info("%s: %d training songs, %d validation songs; data %s; %s batching; memory %s; %.2fM parameters on %s",
                 store.root, len(train_songs), len(val_songs), data.location, type(micro_steps[0][0]).__name__,
                 model_config.memory, model.num_parameters() / 1e6, dist.device)
    evaluate = validation_loss(data, validation_songs(store, val_songs, train_config.eval_tokens),
                               train_config.batch_size, dist, knn_device)
    run_config = run_config_dict(model_config, store.config, train_config.to_dict(), store_description(store))
    trainer = Trainer(
        model,
        train_config,
        run_dir,
        micro_steps,
        evaluate,
        dist,
        run_config,
        stateful=stateful,
        progress=progress,
        illustrate=generation_picture(store.config, model_config, run_dir),
    )
    return trainer.fit(resume=resume), trainer


__all__ = ["SegmentLoss", "generation_picture", "split_songs", "store_description", "train"]

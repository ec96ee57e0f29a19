"""Run folders and model folders on disk, and loading a model from either without running any code.

A *model folder* is what one hands to someone (the layout of a Hugging Face model repository):
    config.json         format, the model and tokenizer configs, and provenance (store, steps, tokens, NLL)
    model.safetensors   the weights
    README.md           the model card
A *run folder* is where training writes:
    config.json         format, and the model, tokenizer, training and store configs
    checkpoint.safetensors          the weights (`model.` names), optimiser and schedule (JSON in its metadata)
    checkpoint.rank<r>.safetensors  each process's data order, random state and memories (for resuming only)
    metrics.jsonl, loss.png, events.out.tfevents.*   the training log
Everything is JSON or safetensors; `load_model` refuses, with one line naming the file, anything else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from midigen import __version__
from midigen.codec.config import TokenizerConfig
from midigen.codec.registry import load_tokenizer
from midigen.devices import resolve_device
from midigen.errors import MidigenError
from midigen.model.config import ModelConfig
from midigen.model.transformer import MusicTransformer
from midigen.state_files import load_weights, read_tensors

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CHECKPOINT_FILE = "checkpoint.safetensors"
MODEL_CARD_FILE = "README.md"
LEGACY_CHECKPOINT_FILE = "checkpoint.pt"  # pickled run folders of midigen before format 1
FILE_FORMAT = 2
READABLE_FORMATS = (1, 2)  # 1: midigen 0.2, before tokenizer kinds and named features (read as what they were)
# weights of format 1 under their names since
FORMAT_1_WEIGHT_NAMES = {"bar_emb.weight": "feature_emb.bars.weight", "beat_emb.weight": "feature_emb.beats.weight"}
RUN_KIND, MODEL_KIND = "midigen-run", "midigen-model"
WEIGHT_PREFIX = "model."  # the weights' names inside a run's checkpoint
RUN_SECTIONS = {"format", "kind", "midigen_version", "model", "tokenizer", "train", "store"}
MODEL_SECTIONS = {"format", "kind", "midigen_version", "model", "tokenizer", "provenance"}


@dataclass
class LoadedModel:
    """A model ready for inference, with the configs it was trained with and where it came from."""

    model: MusicTransformer
    tokenizer: TokenizerConfig
    model_config: ModelConfig
    path: Path  # the run or model folder
    step: int  # training steps behind the weights
    provenance: dict[str, Any] = field(default_factory=dict)


def legacy_error(folder: Path) -> MidigenError:
    return MidigenError(f"{folder / LEGACY_CHECKPOINT_FILE}: a run folder of an older midigen, whose pickled "
                        f"checkpoint is not opened; convert it with `midigen convert-run {folder}` (or retrain if "
                        f"that cannot read it safely)")


def model_folder(path: str | Path) -> Path:
    """The run or model folder `path` names (the folder, or one of its files)."""
    path = Path(path)
    if path.is_file() and path.name in (CONFIG_FILE, WEIGHTS_FILE, CHECKPOINT_FILE, LEGACY_CHECKPOINT_FILE):
        path = path.parent
    if not path.exists():
        raise MidigenError(f"{path}: no such run or model folder")
    if not path.is_dir():
        raise MidigenError(f"{path}: not a run or model folder (give the folder that holds {CONFIG_FILE})")
    if not (path / CONFIG_FILE).exists():
        if (path / LEGACY_CHECKPOINT_FILE).exists():
            raise legacy_error(path)
        raise MidigenError(f"{path}: not a run or model folder (no {CONFIG_FILE})")
    return path


def read_config(folder: Path) -> dict[str, Any]:
    """config.json of a run or model folder, checked: its format, kind and sections, each config complete."""
    path = folder / CONFIG_FILE
    try:
        data = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MidigenError(f"{path}: not readable JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or data.get("kind") not in (RUN_KIND, MODEL_KIND):
        raise MidigenError(f"{path}: not a midigen run or model config")
    if data.get("format") not in READABLE_FORMATS:
        raise MidigenError(f"{path}: format {data.get('format')!r} is not one this midigen reads "
                           f"({', '.join(map(str, READABLE_FORMATS))})")
    expected = RUN_SECTIONS if data["kind"] == RUN_KIND else MODEL_SECTIONS
    if set(data) != expected:
        unknown, missing = sorted(set(data) - expected), sorted(expected - set(data))
        raise MidigenError(f"{path}: " + "; ".join(
            part for part in (f"unknown field(s) {', '.join(unknown)}" if unknown else "",
                              f"missing field(s) {', '.join(missing)}" if missing else "") if part))
    try:
        data["model"] = ModelConfig.from_saved(data["model"])
        data["tokenizer"] = TokenizerConfig.from_saved(data["tokenizer"])
    except MidigenError as exc:
        raise MidigenError(f"{path}: {exc}") from None
    if data["model"].vocab_size != load_tokenizer(data["tokenizer"]).vocab.size:
        raise MidigenError(f"{path}: the model's vocabulary does not match its tokenizer's")
    return data


def run_config_dict(model: ModelConfig, tokenizer: TokenizerConfig, train: dict[str, Any], store: dict[str, Any]
                    ) -> dict[str, Any]:
    """config.json of a run folder."""
    return {"format": FILE_FORMAT, "kind": RUN_KIND, "midigen_version": __version__, "model": model.to_dict(),
            "tokenizer": tokenizer.to_dict(), "train": train, "store": store}


def run_weights(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights of a run's checkpoint and its schedule (step, tokens seen, validation loss)."""
    from midigen.state_files import load_state

    path = folder / CHECKPOINT_FILE
    if not path.exists():
        raise MidigenError(f"{path}: missing (the run has not written a checkpoint yet)")
    state, named = load_state(path)
    schedule = state.get("schedule") if isinstance(state, dict) else None
    if not isinstance(schedule, dict) or not isinstance(schedule.get("step"), int):
        raise MidigenError(f"{path}: not a midigen checkpoint (no schedule)")
    weights = {name[len(WEIGHT_PREFIX):]: t for name, t in named.items() if name.startswith(WEIGHT_PREFIX)}
    return current_names(weights), schedule


def current_names(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights under today's names (those of a format-1 file renamed)."""
    return {FORMAT_1_WEIGHT_NAMES.get(name, name): tensor for name, tensor in weights.items()}


def load_model(path: str | Path, device: str = "auto") -> LoadedModel:
    """A run folder or a model folder, ready for inference on `device`; nothing in it is executed."""
    folder = model_folder(path)
    config = read_config(folder)
    model_config, tokenizer = config["model"], config["tokenizer"]
    if config["kind"] == RUN_KIND:
        weights, schedule = run_weights(folder)
        weights_path = folder / CHECKPOINT_FILE
        provenance = run_provenance(config, schedule)
    else:
        weights_path = folder / WEIGHTS_FILE
        weights = current_names(read_tensors(weights_path)[0])
        provenance = config["provenance"] if isinstance(config["provenance"], dict) else {}
    model = MusicTransformer.for_tokenizer(model_config, load_tokenizer(tokenizer))  # its tables never saved
    load_weights(model, weights, weights_path)
    steps = provenance.get("steps", 0)
    return LoadedModel(model.to(resolve_device(device)).eval(), tokenizer, model_config, folder,
                       steps if isinstance(steps, int) else 0, provenance)


def run_provenance(config: dict[str, Any], schedule: dict[str, Any]) -> dict[str, Any]:
    """What a model folder says of where its weights come from, from a run's config and schedule."""
    return {
        "steps": schedule["step"],
        "tokens_seen": schedule.get("tokens_seen"),
        "val_nll": schedule.get("last_val"),
        "best_val_nll": schedule.get("best_val"),
        "training_minutes": round(schedule.get("elapsed_s", 0.0) / 60, 2),
        "store": config["store"],
        "train": config["train"],
        "midigen_version": config["midigen_version"],
    }

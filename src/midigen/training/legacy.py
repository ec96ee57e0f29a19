"""Converting a run folder of an older midigen (pickled `checkpoint.pt`) to the safe format.

The old files are read with `torch.load(weights_only=True)`, which builds only tensors and plain
containers and refuses any other object a pickle asks for; a file it refuses cannot be converted
(retrain). What the old format lacked (tokens seen, the last validation loss, the store's identity
where the store is gone) is recorded as unknown.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from midigen.codec.config import TokenizerConfig
from midigen.errors import MidigenError
from midigen.inference.model_files import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    LEGACY_CHECKPOINT_FILE,
    WEIGHT_PREFIX,
    run_config_dict,
)
from midigen.io_utils import atomic_write_text
from midigen.model.config import ModelConfig
from midigen.state_files import save_state
from midigen.training.config import TrainConfig
from midigen.training.trainer import rank_checkpoint_path

log = logging.getLogger(__name__)
LEGACY_FORMAT = 1


def _safe_torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (the unpickler refuses a foreign object with many error types)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MidigenError(f"{path}: cannot be read safely ({reason[:200]}); retrain this run") from None


def _old_store(description: Any) -> dict[str, Any]:
    """The store section of config.json from the old checkpoint's store path (its identity if it is still there)."""
    from midigen.data.store import TokenStore

    path = str(description)
    try:
        store = TokenStore(path)
        return {"path": path, "identity": store.identity(), "songs": len(store), "tokens": store.num_tokens,
                "training_songs": len(store.split_indices("train"))}
    except MidigenError:
        return {"path": path, "identity": None, "songs": None, "tokens": None, "training_songs": None}


def convert_legacy_run(run_dir: str | Path) -> list[Path]:
    """Rewrite a pickled run folder as config.json + safetensors; returns the files written. The pickles are
    removed once their contents are safely written."""
    run_dir = Path(run_dir)
    legacy = run_dir / LEGACY_CHECKPOINT_FILE
    if (run_dir / CONFIG_FILE).exists():
        raise MidigenError(f"{run_dir}: already in the current format; nothing to convert")
    if not legacy.exists():
        raise MidigenError(f"{run_dir}: no {LEGACY_CHECKPOINT_FILE} to convert")
    old = _safe_torch_load(legacy)
    try:
        if old.get("format") != LEGACY_FORMAT:
            raise ValueError(f"format {old.get('format')!r}")
        configs = old["configs"]
        model_config = ModelConfig.from_saved(configs["model"])
        tokenizer = TokenizerConfig.from_saved(configs["tokenizer"])
        train = TrainConfig.from_dict(configs["train"]).to_dict()
        schedule = {"step": int(old["scheduler"]["step"]), "elapsed_s": float(old["scheduler"]["elapsed_s"]),
                    "best_val": old["scheduler"]["best_val"], "last_val": None, "tokens_seen": None,
                    "world_size": int(old.get("world_size", 1))}
        weights = {WEIGHT_PREFIX + name: tensor for name, tensor in old["model"].items()}
        optimizer = old["optimizer"]
    except (AttributeError, KeyError, TypeError, ValueError, MidigenError) as exc:
        raise MidigenError(f"{legacy}: not a midigen checkpoint ({exc}); retrain this run") from None
    if model_config.tie_embeddings:
        weights.pop(WEIGHT_PREFIX + "head.weight", None)  # the same tensor as the token embedding
    rank_files = sorted(run_dir.glob("checkpoint.rank*.pt"))
    rank_states = {path: _safe_torch_load(path) for path in rank_files}  # all read before anything is written
    written = []
    for path, state in rank_states.items():
        rank = int(path.name[len("checkpoint.rank"):-len(".pt")])
        target = rank_checkpoint_path(run_dir, rank)
        save_state(target, state)
        written.append(target)
    save_state(run_dir / CHECKPOINT_FILE, {"optimizer": optimizer, "schedule": schedule}, weights)
    written.append(run_dir / CHECKPOINT_FILE)
    config = run_config_dict(model_config, tokenizer, train, _old_store(configs.get("store")))
    atomic_write_text(run_dir / CONFIG_FILE, json.dumps(config, indent=2) + "\n")  # last: the run is now complete
    written.append(run_dir / CONFIG_FILE)
    for path in [legacy, *rank_files]:
        path.unlink()
    log.info("%s: converted; removed %s", run_dir, ", ".join(p.name for p in [legacy, *rank_files]))
    return written

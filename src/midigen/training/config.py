"""`TrainConfig`: how a model is trained, saved inside each checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from midigen.config import JsonConfig
from midigen.errors import MidigenError

BATCHING_MODES = ("auto", "random", "song", "contiguous", "staggered")
DATA_LOCATIONS = ("auto", "gpu", "cpu", "memmap")


@dataclass(frozen=True)
class TrainConfig(JsonConfig):
    """Optimisation and budget.

    batch_size: sequences of each batch, on each process.
    accumulate: batches per optimiser step on each process (gradient accumulation): a step takes
        batch_size × accumulate × processes sequences, so a run keeps its global batch on fewer devices
        by accumulating more. Under torchrun the songs are shared out among the processes × accumulate
        batches, which is why the data a step sees depends only on that product.
    max_steps: training steps of the whole run; training stops there.
    max_minutes: training time of the whole run, over all its invocations (validation and checkpoints
        included, the time between a stop and a resume not); when it runs out a checkpoint is written
        and training stops. The learning-rate schedule follows whichever budget is further along, so the
        learning rate has decayed when either runs out. Both budgets persist (the time used in the
        checkpoint's schedule, the budget in config.json), so a resumed run follows the same schedule as
        one that never stopped. Resuming with a new budget replaces the old one and stretches (or
        shortens) the schedule to it: from the position the run has reached, the learning rate follows
        the cosine of the new length (it rises again when the budget grows past a decayed schedule).
    eval_tokens: size of the fixed validation set: the first validation songs holding this many tokens.
    batching: "random" chunks, one "song" per lane, or "contiguous" songs per lane, or "staggered":
        contiguous lanes that never wait for one another and start out of step (`StaggeredLanes`); "auto"
        picks random without memory and staggered with it (where contiguous lanes would wait with padding for
        the longest song).
    data_location: where the token store lives ("gpu", "cpu" memory or "memmap" from disk) and the kNN
        memory's stores (the GPU with "gpu", CPU memory otherwise); "auto" picks, for each, the fastest
        place it fits in.
    """

    batch_size: int = 16
    accumulate: int = 1
    learning_rate: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    max_steps: int | None = None
    max_minutes: float | None = None
    log_interval: int = 10
    eval_interval: int = 200
    eval_tokens: int = 65536
    checkpoint_minutes: float = 5.0
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    batching: str = "auto"
    max_transpose: int = 5
    data_location: str = "auto"

    def __post_init__(self) -> None:
        if self.max_steps is None and self.max_minutes is None:
            raise MidigenError("give a training budget: max_steps, max_minutes or both")
        if self.max_steps is not None and self.max_steps < 1:
            raise MidigenError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise MidigenError(f"max_minutes must be > 0, got {self.max_minutes}")
        if self.batching not in BATCHING_MODES:
            raise MidigenError(f"batching must be one of {', '.join(BATCHING_MODES)}, got {self.batching!r}")
        if self.data_location not in DATA_LOCATIONS:
            raise MidigenError(f"data location must be one of {', '.join(DATA_LOCATIONS)}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise MidigenError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.batch_size < 1:
            raise MidigenError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.accumulate < 1:
            raise MidigenError(f"accumulate must be >= 1, got {self.accumulate}")
        if not self.learning_rate > 0:
            raise MidigenError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise MidigenError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise MidigenError(f"beta1 and beta2 must be in [0, 1), got {self.beta1} and {self.beta2}")
        for name in ("weight_decay", "grad_clip", "warmup_steps", "max_transpose"):
            if not getattr(self, name) >= 0:
                raise MidigenError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("log_interval", "eval_interval", "eval_tokens"):
            if getattr(self, name) < 1:
                raise MidigenError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.checkpoint_minutes > 0:
            raise MidigenError(f"checkpoint_minutes must be > 0, got {self.checkpoint_minutes}")

    @classmethod
    def from_saved(cls, data: Any) -> TrainConfig:
        """A run's saved training config: every field named, except those of older runs that predate them."""
        if isinstance(data, dict):
            data = {"accumulate": 1, **data}  # runs saved before gradient accumulation took one batch a step
        return cls.from_dict(data, complete=True)

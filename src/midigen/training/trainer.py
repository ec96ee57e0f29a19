"""A generic trainer: optimiser, schedule, budgets, gradient accumulation, logging, checkpoints, resume, DDP.

It knows nothing about music: for each micro-step of an optimiser step it draws a batch from that micro-step's
iterator and asks its loss function for a loss (each micro-step keeps its own state, such as the memory of its
lanes), asks `evaluate` for validation figures and `illustrate` for pictures of the model at each validation, and
checkpoints whatever `stateful` objects it is given. It logs to metrics.jsonl and to TensorBoard event files in the
run folder (`tensorboard --logdir runs/` shows every run).
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from midigen.errors import MidigenError
from midigen.inference.model_files import CHECKPOINT_FILE, CONFIG_FILE, LEGACY_CHECKPOINT_FILE, WEIGHT_PREFIX, run_weights
from midigen.io_utils import atomic_path, atomic_write_bytes, atomic_write_text
from midigen.state_files import load_state, load_weights, save_state, unique_state
from midigen.training.config import TrainConfig
from midigen.training.distributed import Distributed
from midigen.training.host_memory import keep_freed_memory

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT_FILE = "loss.png"
# TensorBoard tags of the logged figures (others keep their own names; elapsed_s is TensorBoard's own time axis)
SCALAR_TAGS = {"train_loss": "loss/train", "val_loss": "loss/validation", "lr": "learning_rate",
               "tokens_per_s": "tokens_per_s", "grad_norm": "grad_norm"}
UNLOGGED_FIGURES = ("step", "elapsed_s")

log = logging.getLogger(__name__)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


LossFn = Callable[[nn.Module, dict[str, Tensor]], tuple[Tensor, int]]  # → (loss, scored tokens)
MicroStep = tuple[Iterator[dict[str, np.ndarray]], LossFn]  # where a micro-step's batches come from, and its loss
Illustrate = Callable[[nn.Module, int], dict[str, np.ndarray]]  # (model, step) → pictures by name, (H, W, 3) uint8


@dataclass
class FitResult:
    step: int
    train_loss: float | None
    val: dict[str, float]
    stopped_by: str  # "max_steps", "max_minutes" or "interrupt"

    @property
    def interrupted(self) -> bool:
        return self.stopped_by == "interrupt"


def metrics_row(line: bytes) -> dict[str, Any] | None:
    """A row of metrics.jsonl (a step and numbers), or None for a line that is not one."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; RecursionError: nesting too deep
        return None
    if not isinstance(row, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row.values()):
        return None
    return row if isinstance(row.get("step"), int) else None


def learning_rate(config: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to `min_lr_ratio` as progress goes 0 → 1."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    floor = config.learning_rate * config.min_lr_ratio
    return floor + 0.5 * (config.learning_rate - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


@contextmanager
def stop_requests() -> Iterator[Callable[[], bool]]:
    """Turn the first Ctrl-C (or SIGTERM) into a request to stop after the current step.

    The loop then writes a checkpoint and returns; a second Ctrl-C interrupts at once.
    """
    requested = False

    def request(signum: int, frame: object) -> None:
        nonlocal requested
        if requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        requested = True

    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = {sig: signal.signal(sig, request) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: requested
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def rank_checkpoint_path(run_dir: Path, rank: int) -> Path:
    """Each rank's data, memory and RNG state, beside the checkpoint: it can be large (a kNN memory)
    and only resuming needs it, while generation reads the checkpoint alone."""
    return run_dir / f"checkpoint.rank{rank}.safetensors"


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        run_dir: str | Path,
        micro_steps: Sequence[MicroStep],
        evaluate: Callable[[nn.Module], dict[str, float]],
        dist: Distributed,
        run_config: dict[str, Any],
        stateful: dict[str, Stateful] | None = None,
        progress: bool = True,
        illustrate: Illustrate | None = None,
    ) -> None:
        self.config, self.dist, self.run_dir = config, dist, Path(run_dir)
        if dist.device.type == "cpu":
            keep_freed_memory()
        self.model = model.to(dist.device)
        if len(micro_steps) != config.accumulate:
            raise ValueError(f"{len(micro_steps)} micro-steps for accumulate={config.accumulate}")
        self.micro_steps, self.evaluate, self.illustrate = micro_steps, evaluate, illustrate
        self.run_config = run_config  # config.json: whatever the caller needs to rebuild the run
        self.stateful = stateful or {}
        self.progress = progress and dist.is_main
        self.optimizer = self._make_optimizer()
        self.step = 0
        self.elapsed_s = 0.0  # training time over all invocations (resumes included)
        self.best_val: float | None = None
        self.last_val: float | None = None
        self.tokens_seen: int | None = 0  # scored tokens trained on, over all ranks and invocations
        wrapped: nn.Module = self.model
        self.ddp: DistributedDataParallel | None = None
        if dist.enabled:
            ids = [dist.device.index] if dist.device.type == "cuda" else None
            wrapped = self.ddp = DistributedDataParallel(self.model, device_ids=ids)
        self.train_model = torch.compile(wrapped) if config.compile else wrapped
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if dist.device.type == "cuda" else nullcontext()
        )
        self.random_streams = [self._seeded_stream(config.seed * 7919 + dist.rank * config.accumulate + index)
                               for index in range(config.accumulate)]

    def _make_optimizer(self) -> torch.optim.Optimizer:
        # biases, norms, and whatever the model names in `no_weight_decay()` (the timm convention) are not decayed
        exempt = set(getattr(self.model, "no_weight_decay", lambda: ())())
        params = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        decay = [p for name, p in params if p.dim() >= 2 and name not in exempt]
        no_decay = [p for name, p in params if p.dim() < 2 or name in exempt]
        groups = [
            {"params": decay, "weight_decay": self.config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        fused = self.dist.device.type == "cuda"
        return torch.optim.AdamW(
            groups, lr=self.config.learning_rate, betas=(self.config.beta1, self.config.beta2), fused=fused
        )

    # ---- random numbers -----------------------------------------------------------------------
    # Each micro-step draws its random numbers (dropout) from its own stream, seeded by its shard of the data
    # (rank × accumulate + micro-step): a step draws the same numbers however it is split between ranks and
    # micro-steps, and no two ranks drop the same units.
    def _seeded_stream(self, seed: int) -> dict[str, Tensor]:
        stream = {"torch": torch.Generator().manual_seed(seed).get_state()}
        if self.dist.device.type == "cuda":
            stream["cuda"] = torch.Generator(self.dist.device).manual_seed(seed).get_state()
        return stream

    @contextmanager
    def _random_stream(self, index: int) -> Iterator[None]:
        """Draw from micro-step `index`'s stream, and keep where it got to."""
        torch.set_rng_state(self.random_streams[index]["torch"])
        if "cuda" in self.random_streams[index]:
            torch.cuda.set_rng_state(self.random_streams[index]["cuda"], self.dist.device)
        yield
        self.random_streams[index] = {"torch": torch.get_rng_state()}
        if self.dist.device.type == "cuda":
            self.random_streams[index]["cuda"] = torch.cuda.get_rng_state(self.dist.device)

    # ---- checkpoints --------------------------------------------------------------------------
    def _rank_state(self) -> dict[str, Any]:
        rng = {"torch": [stream["torch"] for stream in self.random_streams]}
        if self.dist.device.type == "cuda":
            rng["cuda"] = [stream["cuda"] for stream in self.random_streams]
        return {"step": self.step, "rng": rng, "stateful": {name: obj.state_dict() for name, obj in self.stateful.items()}}

    def save_checkpoint(self) -> None:
        # the rank state first: a checkpoint never points to a step whose rank state is missing
        save_state(rank_checkpoint_path(self.run_dir, self.dist.rank), self._rank_state())
        if self.dist.is_main:
            schedule = {"step": self.step, "elapsed_s": self.elapsed_s, "best_val": self.best_val,
                        "last_val": self.last_val, "tokens_seen": self.tokens_seen, "world_size": self.dist.world_size,
                        "accumulate": self.config.accumulate}
            weights = {WEIGHT_PREFIX + name: tensor for name, tensor in unique_state(self.model).items()}
            save_state(self.run_dir / CHECKPOINT_FILE, {"optimizer": self.optimizer.state_dict(), "schedule": schedule},
                       weights)

    def load_checkpoint(self) -> None:
        path = self.run_dir / CHECKPOINT_FILE
        state, _ = load_state(path)
        weights, schedule = run_weights(self.run_dir)
        load_weights(self.model, weights, path)
        self._load_optimizer(state.get("optimizer"), path)
        try:
            self.step, self.elapsed_s = int(schedule["step"]), float(schedule["elapsed_s"])
            self.best_val, self.last_val = schedule["best_val"], schedule["last_val"]
            # None: a run converted from the old format, which did not count them
            self.tokens_seen = None if schedule["tokens_seen"] is None else int(schedule["tokens_seen"])
            world_size = int(schedule["world_size"])
            accumulate = int(schedule.get("accumulate", 1))  # checkpoints older than accumulation took one batch a step
        except (KeyError, TypeError, ValueError) as exc:
            raise MidigenError(f"{path}: damaged checkpoint schedule ({type(exc).__name__}: {exc})") from None
        if (world_size, accumulate) != (self.dist.world_size, self.config.accumulate):
            # the data is shared out anew: weights and optimiser resume; data order, memory and random numbers start
            # afresh
            if self.dist.is_main:
                rows = self.config.batch_size * self.dist.world_size * self.config.accumulate
                log.warning("%s: trained on %d process(es) × %d batch(es) a step, resumed on %d × %d: weights and "
                            "optimiser go on from step %d, the data is shared out and shuffled afresh (a step now "
                            "takes %d sequences, before %d)", self.run_dir, world_size, accumulate,
                            self.dist.world_size, self.config.accumulate, self.step, rows,
                            self.config.batch_size * world_size * accumulate)
            return
        rank_path = rank_checkpoint_path(self.run_dir, self.dist.rank)
        own = load_state(rank_path)[0] if rank_path.exists() else None
        if not isinstance(own, dict) or own.get("step") != self.step:
            # weights and optimiser resume; data order, memory and random numbers start afresh
            log.warning("%s: no data state for rank %d at step %d; the data order starts afresh",
                        self.run_dir, self.dist.rank, self.step)
            return
        try:
            # a run saved before accumulation kept one stream as a tensor, not a list of them
            streams = {device: states if isinstance(states, list) else [states]
                       for device, states in own["rng"].items() if device == "torch" or self.dist.device.type == "cuda"}
            if len(streams["torch"]) != len(self.random_streams):
                raise ValueError(f"{len(streams['torch'])} random streams for {len(self.random_streams)} micro-steps")
            for state in streams["torch"]:
                torch.Generator().set_state(state)  # refuses a damaged state now rather than at the next step
            self.random_streams = [{device: states[index] for device, states in streams.items()}
                                   for index in range(len(self.random_streams))]
            for name, obj in self.stateful.items():
                if name in own["stateful"]:
                    obj.load_state_dict(own["stateful"][name])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, MidigenError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise MidigenError(f"{rank_path}: damaged training state ({reason})") from None

    def _load_optimizer(self, state: Any, path: Path) -> None:
        """The optimiser's state, refused unless every moment has its parameter's shape."""
        try:
            self.optimizer.load_state_dict(state)
            for group in self.optimizer.param_groups:
                for param in group["params"]:
                    for name, value in self.optimizer.state.get(param, {}).items():
                        if name != "step" and (not isinstance(value, Tensor) or value.shape != param.shape):
                            raise ValueError(f"optimiser {name} does not fit a parameter of shape {tuple(param.shape)}")
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise MidigenError(f"{path}: damaged optimiser state ({reason})") from None

    # ---- logging ------------------------------------------------------------------------------
    def _log(self, row: dict[str, Any], events: SummaryWriter | None) -> None:
        if events is None:  # only the main process logs
            return
        with open(self.run_dir / METRICS_FILE, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        for name, value in row.items():
            if name not in UNLOGGED_FIGURES:
                events.add_scalar(SCALAR_TAGS.get(name, name), value, row["step"])

    def _trim_metrics(self) -> None:
        """Drop rows logged after the step training goes on from, so they are not written twice.

        A torn last line (the process was killed while writing it) goes quietly. Other damaged lines are
        dropped with a warning, after the file as it was is kept beside it: a damaged log should not stop
        a run, nor lose anything."""
        path = self.run_dir / METRICS_FILE
        if not self.dist.is_main or not path.exists():
            return
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise MidigenError(f"{path}: cannot read the training log ({exc.strerror or exc})") from None
        complete = data[: data.rfind(b"\n") + 1]
        kept, damaged = [], []
        for number, line in enumerate(complete.splitlines(), 1):
            row = metrics_row(line)
            if row is None and line.strip():
                damaged.append(number)
            elif row is not None and row["step"] <= self.step:
                kept.append(line + b"\n")
        if damaged:
            aside = next(path.with_name(f"{path.name}.damaged{n or ''}") for n in range(10**6)
                         if not path.with_name(f"{path.name}.damaged{n or ''}").exists())
            atomic_write_bytes(aside, data)
            shown = ", ".join(map(str, damaged[:5])) + (", ..." if len(damaged) > 5 else "")
            log.warning("%s: dropped %d damaged line(s) (line %s); the file as it was is kept in %s",
                        path, len(damaged), shown, aside.name)
        atomic_write_bytes(path, b"".join(kept))

    # ---- the loop -----------------------------------------------------------------------------
    def _progress(self, elapsed_s: float) -> float:
        """How far the schedule is: the larger of the step and time fractions of the run's budget, so the
        learning rate has decayed whichever budget runs out first."""
        fractions = []
        if self.config.max_steps is not None:
            fractions.append(self.step / self.config.max_steps)
        if self.config.max_minutes is not None:
            fractions.append(elapsed_s / (60 * self.config.max_minutes))
        return max(fractions)

    def _spent(self, elapsed_s: float) -> str | None:
        """The budget that has run out after `elapsed_s` seconds of training over all invocations, if any."""
        if self.config.max_steps is not None and self.step >= self.config.max_steps:
            return "max_steps"
        if self.config.max_minutes is not None and elapsed_s >= 60 * self.config.max_minutes:
            return "max_minutes"
        return None

    def _train_step(self, lr: float) -> tuple[float, int, float]:
        """One optimiser step over the batches of all micro-steps: the mean of their losses, the tokens they scored,
        and the gradient norm before clipping.

        Each micro-step's loss is divided by their number, so the gradient is their mean, as DDP's is the mean over
        the ranks: a step sees the same gradient whatever the split between ranks and micro-steps. DDP averages
        the gradients once, after the last micro-step."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.train_model.train()
        losses, scored = [], 0
        for index, (batches, loss_fn) in enumerate(self.micro_steps):
            batch = next(batches)
            tensors = {name: torch.as_tensor(array).to(self.dist.device, non_blocking=True)
                       for name, array in batch.items()}
            last = index == len(self.micro_steps) - 1
            with self.ddp.no_sync() if self.ddp is not None and not last else nullcontext():
                with self.autocast, self._random_stream(index):
                    loss, micro_scored = loss_fn(self.train_model, tensors)
                (loss / len(self.micro_steps)).backward()
            losses.append(loss.detach())
            scored += micro_scored
        # an infinite limit measures the norm and leaves the gradients as they are
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip or math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(torch.stack(losses).mean()), scored, float(grad_norm)

    def _validate(self, events: SummaryWriter | None) -> dict[str, float]:
        self.model.eval()
        with self.autocast:
            figures = self.evaluate(self.model)
            if self.illustrate is not None and events is not None:
                for tag, picture in self.illustrate(self.model, self.step).items():
                    events.add_image(tag, picture, self.step, dataformats="HWC")
        self.last_val = figures["val_loss"]
        if self.best_val is None or figures["val_loss"] < self.best_val:
            self.best_val = figures["val_loss"]
        return figures

    def fit(self, resume: bool = False) -> FitResult:
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MidigenError(f"{self.run_dir}: cannot make the run folder ({exc.strerror or exc})") from None
        if resume:
            if not (self.run_dir / CHECKPOINT_FILE).exists():
                raise MidigenError(f"{self.run_dir}: nothing to resume (no {CHECKPOINT_FILE})")
            self.load_checkpoint()
        elif any((self.run_dir / name).exists() for name in (CHECKPOINT_FILE, LEGACY_CHECKPOINT_FILE)):
            raise MidigenError(f"{self.run_dir}: already holds a run; pass --resume to continue it or use a new folder")
        self._trim_metrics()  # a fresh run drops the log of an attempt that stopped before its first checkpoint
        spent = self._spent(self.elapsed_s)
        if spent is not None:
            log.warning("%s: the run has used its budget (%s) at step %d; give a larger one to train on",
                        self.run_dir, spent, self.step)
            return FitResult(self.step, None, {} if self.last_val is None else {"val_loss": self.last_val}, spent)
        if self.dist.is_main:
            atomic_write_text(self.run_dir / CONFIG_FILE, json.dumps(self.run_config, indent=2) + "\n")
        cfg = self.config
        start = time.monotonic()
        last_checkpoint = start
        window_start, window_tokens, window_losses, window_norms = start, 0, [], []
        last_loss: float | None = None
        val: dict[str, float] = {}
        bar = tqdm(total=cfg.max_steps, initial=self.step, unit="step", desc="train", disable=not self.progress)
        # events past the step training goes on from are hidden, as their rows are trimmed from metrics.jsonl
        events = SummaryWriter(str(self.run_dir), purge_step=self.step + 1) if self.dist.is_main else None
        with bar, stop_requests() as stop_requested, events or nullcontext():
            while True:
                # every rank stops at the same step and follows the same schedule, timed by the slowest
                stop, elapsed = self._agree(stop_requested(), self.elapsed_s + time.monotonic() - start)
                spent = self._spent(elapsed)
                if spent is not None or stop:
                    stopped_by = spent or "interrupt"
                    break
                lr = learning_rate(cfg, self.step, self._progress(elapsed))
                loss, scored, grad_norm = self._train_step(lr)
                self.step += 1
                window_losses.append(loss)
                window_norms.append(grad_norm)
                window_tokens += scored * self.dist.world_size
                if self.tokens_seen is not None:
                    self.tokens_seen += scored * self.dist.world_size
                bar.update(1)
                if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
                    now = time.monotonic()
                    last_loss = float(np.mean(window_losses))
                    row: dict[str, Any] = {
                        "step": self.step,
                        "train_loss": last_loss,
                        "lr": lr,
                        "tokens_per_s": window_tokens / max(1e-9, now - window_start),
                        "grad_norm": float(np.mean(window_norms)),
                        "elapsed_s": self.elapsed_s + now - start,
                    }
                    if self.step % cfg.eval_interval == 0:
                        val = self._validate(events)
                        row.update(val)
                    self._log(row, events)
                    if "val_loss" in row:
                        self._plot()
                    bar.set_postfix(self._postfix(row, start), refresh=False)
                    window_start, window_tokens, window_losses, window_norms = time.monotonic(), 0, [], []
                if time.monotonic() - last_checkpoint > 60 * cfg.checkpoint_minutes:
                    self._checkpoint(start)
                    last_checkpoint = time.monotonic()
            if stopped_by != "interrupt" and (not val or self.step % cfg.eval_interval):
                val = self._validate(events)
                self._log({"step": self.step, **val, "elapsed_s": self.elapsed_s + time.monotonic() - start}, events)
            self._checkpoint(start)
            self._plot()
        return FitResult(self.step, last_loss, val, stopped_by)

    def _agree(self, flag: bool, elapsed_s: float) -> tuple[bool, float]:
        """Under DDP every rank must stop at the same step, or the next collective would hang, and use the same
        learning rate, or the weights would drift apart: the stop request of any rank, the longest time of all."""
        if not self.dist.enabled:
            return flag, elapsed_s
        tensor = torch.tensor([float(flag), elapsed_s], dtype=torch.float64, device=self.dist.device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return bool(tensor[0].item()), float(tensor[1].item())

    def _checkpoint(self, invocation_start: float) -> None:
        now = time.monotonic()
        self.elapsed_s += now - invocation_start
        self.save_checkpoint()
        self.elapsed_s -= now - invocation_start  # fit() keeps counting from its own start

    def _postfix(self, row: dict[str, Any], start: float) -> dict[str, str]:
        postfix = {"loss": f"{row['train_loss']:.3f}", "tok/s": f"{row['tokens_per_s']:.0f}"}
        if "val_loss" in row:
            postfix["val"] = f"{row['val_loss']:.3f}"
        if self.config.max_minutes is not None:
            left = max(0.0, 60 * self.config.max_minutes - (self.elapsed_s + time.monotonic() - start))
            postfix["budget left"] = f"{left / 60:.1f} min"
        return postfix

    def _plot(self) -> None:
        # a run stopped before its first log line has nothing to plot
        if self.dist.is_main and (self.run_dir / METRICS_FILE).exists():
            plot_losses(self.run_dir / METRICS_FILE, self.run_dir / LOSS_PLOT_FILE)


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """Train and validation loss against step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, label=label, marker="o" if key == "val_loss" else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)

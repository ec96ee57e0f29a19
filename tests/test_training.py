"""Training: exact resume, graceful Ctrl-C, budgets, run folders (DDP under torchrun: test_ddp.py)."""

from __future__ import annotations

import json
import os
import platform
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import SINGLE_STREAM

from midigen.data.batching import RandomChunks, SongLanes
from midigen.errors import MidigenError
from midigen.model import ModelConfig
from midigen.training.config import TrainConfig
from midigen.training.host_memory import keep_freed_memory
from midigen.inference.model_files import load_model
from midigen.training.recipe import train
from midigen.training import trainer as trainer_module
from midigen.training.trainer import learning_rate

MODEL = ModelConfig.preset("tiny", SINGLE_STREAM)


def config(**overrides: object) -> TrainConfig:
    settings = dict(max_steps=8, batch_size=2, eval_interval=4, log_interval=2, warmup_steps=2, device="cpu")
    return TrainConfig(**(settings | overrides))


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_model(run).model.state_dict()


def interrupt_at_batch(monkeypatch: pytest.MonkeyPatch, sampler: type, batch: int) -> None:
    """Send ourselves Ctrl-C while the trainer draws its `batch`-th batch from a `sampler`."""
    original = sampler.__next__
    drawn = 0

    def next_then_interrupt(self: object):  # noqa: ANN202
        nonlocal drawn
        drawn += 1
        if drawn == batch:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self)

    monkeypatch.setattr(sampler, "__next__", next_then_interrupt)


@pytest.mark.parametrize("memory", ["none", "xl", "knn"])
def test_resume_after_ctrl_c_gives_the_same_weights(memory: str, prompt_store: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    # with memory, lanes play songs back to back: the resumed run must remember what the lanes had seen
    model = ModelConfig.preset("tiny", SINGLE_STREAM, memory=memory, context=16)
    straight, result = tmp_path / "straight", None
    result, _ = train(prompt_store, straight, model, config(), progress=False)
    assert result.step == 8 and not result.interrupted

    resumed = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        interrupt_at_batch(patch, RandomChunks if memory == "none" else SongLanes, 4)
        first, _ = train(prompt_store, resumed, model, config(), progress=False)
    assert first.interrupted and first.step == 4  # the step in flight finishes, then a checkpoint is written
    assert load_model(resumed).step == 4
    second, _ = train(prompt_store, resumed, None, config(), resume=True, progress=False)
    assert second.step == 8
    a, b = weights(straight), weights(resumed)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [json.loads(line)["step"] for line in (straight / "metrics.jsonl").read_text().splitlines()]


class StepClock:
    """The trainer's `time.monotonic`: it moves only when a batch is drawn, by one step's worth of seconds."""

    def __init__(self, seconds_per_step: float) -> None:
        self.now, self.seconds_per_step = 0.0, seconds_per_step

    def monotonic(self) -> float:
        return self.now


def tick_per_batch(monkeypatch: pytest.MonkeyPatch, clock: StepClock, interrupt_at: int | None = None) -> None:
    """Each batch drawn moves `clock` on by a step; Ctrl-C while drawing the `interrupt_at`-th."""
    original, drawn = RandomChunks.__next__, 0

    def next_batch(self: RandomChunks):  # noqa: ANN202
        nonlocal drawn
        drawn += 1
        clock.now += clock.seconds_per_step
        if drawn == interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self)

    monkeypatch.setattr(RandomChunks, "__next__", next_batch)


def logged(run: Path, key: str) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row[key]) for row in rows if key in row]


def test_time_budgeted_run_resumes_on_the_same_schedule(prompt_store: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """A one-minute budget at 6 s a step: 10 steps, whether or not the run stops at step 4 and resumes later."""
    clock = StepClock(seconds_per_step=6.0)
    monkeypatch.setattr(trainer_module, "time", clock)
    timed = config(max_steps=None, max_minutes=1.0, log_interval=1, eval_interval=100)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    with monkeypatch.context() as patch:
        tick_per_batch(patch, clock)
        result, _ = train(prompt_store, straight, MODEL, timed, progress=False)
    assert (result.step, result.stopped_by) == (10, "max_minutes")

    with monkeypatch.context() as patch:
        tick_per_batch(patch, clock, interrupt_at=4)
        first, _ = train(prompt_store, resumed, MODEL, timed, progress=False)
    assert first.interrupted and first.step == 4
    clock.now += 3600.0  # an hour between the stop and the resume does not count
    with monkeypatch.context() as patch:
        tick_per_batch(patch, clock)
        second, _ = train(prompt_store, resumed, None, None, resume=True, progress=False)  # the run's own budget
    assert (second.step, second.stopped_by) == (10, "max_minutes")
    assert logged(resumed, "lr") == logged(straight, "lr")
    a, b = weights(straight), weights(resumed)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)

    # the budget is spent: resuming again trains nothing and logs nothing
    log_before = (resumed / "metrics.jsonl").read_bytes()
    again, _ = train(prompt_store, resumed, None, None, resume=True, progress=False)
    assert (again.step, again.stopped_by) == (10, "max_minutes") and again.val["val_loss"] == second.val["val_loss"]
    assert (resumed / "metrics.jsonl").read_bytes() == log_before

    # a larger budget stretches the schedule: 30 s more, and the learning rate goes on at 60 s of 90
    longer = replace(timed, max_minutes=1.5)
    with monkeypatch.context() as patch:
        tick_per_batch(patch, clock)
        third, _ = train(prompt_store, resumed, None, longer, resume=True, progress=False)
    assert (third.step, third.stopped_by) == (15, "max_minutes")
    assert logged(resumed, "lr")[10:] == [(11 + k, learning_rate(longer, 10 + k, (60 + 6 * k) / 90)) for k in range(5)]


def test_run_folder_holds_checkpoint_metrics_and_loss_curve(tiny_run: Path) -> None:
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "train_loss", "lr", "tokens_per_s", "elapsed_s"} <= rows[0].keys()
    assert any("val_loss" in row for row in rows)
    assert rows[-1]["step"] == 30
    assert (tiny_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    trained = load_model(tiny_run)
    assert trained.model_config == MODEL and trained.tokenizer == SINGLE_STREAM and trained.step == 30
    train_losses = [row["train_loss"] for row in rows if "train_loss" in row]
    assert train_losses[-1] < train_losses[0]  # it learns


def test_existing_run_is_not_overwritten(tiny_run: Path, prompt_store: Path) -> None:
    with pytest.raises(MidigenError, match="--resume"):
        train(prompt_store, tiny_run, MODEL, config(), progress=False)


def test_resume_needs_a_checkpoint(prompt_store: Path, tmp_path: Path) -> None:
    with pytest.raises(MidigenError, match="no such run|nothing to resume"):
        train(prompt_store, tmp_path / "empty", None, config(), resume=True, progress=False)


def test_time_budget_stops_training(prompt_store: Path, tmp_path: Path) -> None:
    result, _ = train(prompt_store, tmp_path / "timed", MODEL, config(max_steps=None, max_minutes=0.002), progress=False)
    assert result.stopped_by == "max_minutes" and result.step >= 1
    assert load_model(tmp_path / "timed").step == result.step


def test_per_head_settings_are_not_weight_decayed(prompt_store: Path, tmp_path: Path) -> None:
    model = replace(MODEL, memory="knn")
    _, trainer = train(prompt_store, tmp_path / "run", model, config(max_steps=1, weight_decay=0.1), progress=False)
    decay_of = {id(p): group["weight_decay"] for group in trainer.optimizer.param_groups for p in group["params"]}
    params = dict(trainer.model.named_parameters())
    assert [decay_of[id(p)] for name, p in params.items() if "rel_bias" in name] == [0.0] * MODEL.n_layers
    knn = f"blocks.{model.knn_layer_index}.attn"
    assert decay_of[id(params[f"{knn}.log_temperature"])] == decay_of[id(params[f"{knn}.gate"])] == 0.0
    assert decay_of[id(params[f"{knn}.qkv.weight"])] == decay_of[id(params["blocks.0.attn.qkv.weight"])] == 0.1


def test_cpu_training_keeps_freed_memory_where_the_c_library_is_glibc() -> None:
    # True only where the C library has mallopt and took both settings
    assert keep_freed_memory() == (platform.libc_ver()[0] == "glibc")


def test_learning_rate_warms_up_then_decays() -> None:
    cfg = TrainConfig(max_steps=100, warmup_steps=10, learning_rate=1.0, min_lr_ratio=0.1)
    assert learning_rate(cfg, 0, 0.0) == pytest.approx(0.1)
    assert learning_rate(cfg, 9, 0.09) == pytest.approx(1.0)
    assert learning_rate(cfg, 50, 0.5) == pytest.approx(0.55)
    assert learning_rate(cfg, 100, 1.0) == pytest.approx(0.1)


def test_compiled_training_matches_eager(prompt_store: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """torch.compile (with the kNN search left to run eagerly) computes the losses eager mode computes."""
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)  # the same dropout masks as eager
    model = ModelConfig.preset("tiny", SINGLE_STREAM, memory="knn", context=16)
    losses = {}
    for compiled in (False, True):
        run = tmp_path / f"compiled-{compiled}"
        train(prompt_store, run, model, config(max_steps=4, log_interval=1, compile=compiled), progress=False)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses[compiled] = [row[key] for row in rows for key in ("train_loss", "val_loss") if key in row]
    assert len(losses[True]) == 5  # four steps and a validation
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-3, atol=0)

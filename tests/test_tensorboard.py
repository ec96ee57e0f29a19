"""TensorBoard: a run folder holds event files with the training log and a piano roll at each validation, and a
run that resumes from an earlier checkpoint than it had logged hides the events it logs again."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SINGLE_STREAM
from matplotlib.image import imread
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from midigen.data.batching import RandomChunks
from midigen.model import ModelConfig
from midigen.training.config import TrainConfig
from midigen.training.recipe import PICTURE_HEIGHT_PX, PICTURE_WIDTH_PX, train
from midigen.training.trainer import SCALAR_TAGS

MODEL = ModelConfig.preset("tiny", SINGLE_STREAM)
SETTINGS = dict(batch_size=2, eval_interval=4, log_interval=2, warmup_steps=2, device="cpu")


def crash_at_batch(monkeypatch: pytest.MonkeyPatch, batch: int) -> None:
    """The process dies (an exception out of the trainer) while drawing its `batch`-th batch."""
    original, drawn = RandomChunks.__next__, 0

    def next_or_crash(self: RandomChunks):  # noqa: ANN202
        nonlocal drawn
        drawn += 1
        if drawn == batch:
            raise RuntimeError("power cut")
        return original(self)

    monkeypatch.setattr(RandomChunks, "__next__", next_or_crash)


def test_events_hold_the_log_once_and_a_piano_roll_at_each_validation(prompt_store: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    train(prompt_store, run, MODEL, TrainConfig(max_steps=4, **SETTINGS), progress=False)
    # resumed to 8 steps, the run dies at step 7, having logged step 6 after its last checkpoint (step 4)
    with monkeypatch.context() as patch:
        crash_at_batch(patch, 3)
        with pytest.raises(RuntimeError, match="power cut"):
            train(prompt_store, run, None, TrainConfig(max_steps=8), resume=True, progress=False)
    # TensorBoard reads a folder's event files in name order, and a name starts with the second it was made in
    time.sleep(1 - time.time() % 1)
    train(prompt_store, run, None, TrainConfig(max_steps=8), resume=True, progress=False)

    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "train_loss" in row] == [2, 4, 6, 8]  # step 6 once, from the last try
    for name, tag in SCALAR_TAGS.items():
        expected = [(row["step"], row[name]) for row in rows if name in row]
        assert expected, name
        assert [(e.step, e.value) for e in events.Scalars(tag)] == [(s, pytest.approx(v, rel=1e-6)) for s, v in expected]
    assert [e.step for e in events.Scalars("loss/validation")] == [4, 8]
    pictures = events.Images("generation/piano_roll")
    assert [picture.step for picture in pictures] == [4, 8]
    for picture in pictures:
        pixels = imread(io.BytesIO(picture.encoded_image_string), format="png")
        assert pixels.shape[:2] == (PICTURE_HEIGHT_PX, PICTURE_WIDTH_PX) == (picture.height, picture.width)
        assert np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0).shape[0] > 10  # a picture, not a blank

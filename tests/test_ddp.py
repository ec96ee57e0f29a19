"""Data-parallel training under torchrun (gloo on CPU): songs shared out among ranks and accumulated batches,
validation summed over the ranks, resume on another world size, and two nodes on one machine."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SINGLE_STREAM

from midigen.data.batching import SongLanes, TokenArrays
from midigen.data.store import TokenStore
from midigen.inference.model_files import load_model
from midigen.model import ModelConfig
from midigen.training.config import TrainConfig
from midigen.training.distributed import Distributed, balanced_shares
from midigen.training.recipe import make_micro_steps, split_songs, train, validation_loss, validation_songs

WORKER = Path(__file__).parent / "ddp_worker.py"
# what tests/ddp_worker.py trains: xl memory, so songs play in order in lanes that remember them
MODEL = ModelConfig.preset("tiny", SINGLE_STREAM, memory="xl", context=16)
SETTINGS = dict(max_steps=6, batch_size=2, eval_interval=3, log_interval=3, warmup_steps=2, device="cpu")
CPU = torch.device("cpu")


def torchrun(launch: list[str], store: Path, run: Path, out: Path, *settings: str) -> subprocess.Popen:
    out.mkdir(exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", *launch, str(WORKER), str(store), str(run), str(out),
               *settings]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})


def finish(launch: subprocess.Popen) -> None:
    output, _ = launch.communicate(timeout=300)
    assert launch.returncode == 0, output[-3000:]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0)


@pytest.fixture(scope="module")
def two_process_run(prompt_store: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """Six steps of two processes, one batch each a step: the run folder and what each rank ended with."""
    root = tmp_path_factory.mktemp("ddp")
    finish(torchrun(["--standalone", "--nproc_per_node=2"], prompt_store, root / "run", root / "out", "memory=xl"))
    return root / "run", [torch.load(root / "out" / f"rank{rank}.pt") for rank in (0, 1)]


def test_two_processes_train_as_one_process_accumulating_two_batches(
        two_process_run: tuple[Path, list[dict]], prompt_store: Path, tmp_path: Path) -> None:
    run, ranks = two_process_run
    assert_same_weights(ranks[0]["weights"], ranks[1]["weights"], atol=0)
    assert ranks[0]["loss"] != ranks[1]["loss"]  # each rank trained on its own songs
    assert load_model(run).step == 6
    (songs0,), (songs1,) = ranks[0]["songs"], ranks[1]["songs"]
    train_songs = split_songs(TokenStore(prompt_store))[0]
    assert not set(songs0) & set(songs1) and sorted(songs0 + songs1) == train_songs

    # one process taking both ranks' batches in turn, on the same songs, goes the same way
    _, trainer = train(prompt_store, tmp_path / "one", MODEL, TrainConfig(**SETTINGS, accumulate=2), progress=False)
    assert [list(sampler.songs) for sampler, _ in trainer.micro_steps] == [songs0, songs1]
    assert_same_weights(trainer.model.state_dict(), ranks[0]["weights"], atol=1e-5)


def test_two_processes_resume_exactly(two_process_run: tuple[Path, list[dict]], prompt_store: Path,
                                      tmp_path: Path) -> None:
    launch, run, out = ["--standalone", "--nproc_per_node=2"], tmp_path / "run", tmp_path / "out"
    # Ctrl-C while the batch of step 2 is drawn (before the validation of step 3 draws batches of its own)
    finish(torchrun(launch, prompt_store, run, out, "memory=xl", "interrupt_at=2"))
    assert load_model(run).step == 2
    finish(torchrun(launch, prompt_store, run, out, "resume=1"))
    ranks = [torch.load(out / f"rank{rank}.pt") for rank in (0, 1)]
    assert load_model(run).step == 6
    # each rank went on with its own songs, lane memory and random numbers, as in the run that never stopped
    for rank in (0, 1):
        assert_same_weights(ranks[rank]["weights"], two_process_run[1][rank]["weights"], atol=1e-6)


def test_sharded_validation_equals_unsharded(two_process_run: tuple[Path, list[dict]], prompt_store: Path) -> None:
    run, ranks = two_process_run
    store = TokenStore(prompt_store)
    songs = validation_songs(store, split_songs(store)[1], TrainConfig(**SETTINGS).eval_tokens)
    assert len(songs) == 2  # one for each rank
    evaluate = validation_loss(TokenArrays(store, "cpu"), songs, SETTINGS["batch_size"], Distributed(0, 1, CPU), CPU)
    unsharded = evaluate(load_model(run).model)["val_loss"]
    assert ranks[0]["val_loss"] == ranks[1]["val_loss"]  # every rank has the sum over all
    assert ranks[0]["val_loss"] == pytest.approx(unsharded, rel=1e-6)


@pytest.mark.parametrize("batching", ["random", "contiguous"])
def test_ranks_and_micro_steps_share_out_the_songs(batching: str, prompt_store: Path) -> None:
    store = TokenStore(prompt_store)
    data, songs = TokenArrays(store, "cpu"), split_songs(store)[0]
    config = TrainConfig(**SETTINGS | {"batching": batching}, accumulate=2)
    shares = []
    for rank in (0, 1):
        micro_steps, _ = make_micro_steps(data, songs, MODEL, config, Distributed(rank, 2, CPU), CPU)
        shares += [sorted(int(song) for song in sampler.songs) for sampler, _ in micro_steps]
    assert len(shares) == 4 and all(shares)
    assert sorted(sum(shares, [])) == songs  # disjoint, and together every training song
    tokens = [int(data.lengths[share].sum()) for share in shares]
    assert max(tokens) - min(tokens) <= data.lengths[songs].max()  # balanced within a song

    if batching == "contiguous":  # an epoch over all four shards starts each song once
        started = []
        for rank in (0, 1):
            for sampler, _ in make_micro_steps(data, songs, MODEL, config, Distributed(rank, 2, CPU), CPU)[0]:
                assert isinstance(sampler, SongLanes)
                while (batch := next(sampler)) and sampler.epoch == 1:
                    started += batch["song"][batch["new_song"] & (batch["song"] >= 0)].tolist()
        assert sorted(started) == songs


def test_balanced_shares_cover_every_position_once() -> None:
    sizes = [5, 1, 9, 3, 3, 7, 2]
    shares = balanced_shares(sizes, 3)
    assert sorted(sum(shares, [])) == list(range(len(sizes))) and all(share == sorted(share) for share in shares)
    assert sorted(sum(sizes[i] for i in share) for share in shares) == [10, 10, 10]
    assert balanced_shares(sizes, 1) == [list(range(len(sizes)))]


def test_resume_on_another_world_size_keeps_weights_and_optimiser(
        two_process_run: tuple[Path, list[dict]], prompt_store: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    shutil.copytree(two_process_run[0], run)
    resumed = TrainConfig(**SETTINGS | {"max_steps": 8})
    with caplog.at_level(logging.WARNING):
        result, trainer = train(prompt_store, run, None, resumed, resume=True, progress=False)
    said = [record.getMessage() for record in caplog.records if "resumed on" in record.getMessage()]
    assert len(said) == 1 and "trained on 2 process(es) × 1 batch(es) a step, resumed on 1 × 1" in said[0]
    assert "shuffled afresh" in said[0]
    assert result.step == 8 and load_model(run).step == 8
    # Adam's moments went on from the six steps of the two processes
    assert {int(state["step"]) for state in trainer.optimizer.state.values()} == {8}


def test_accumulating_run_resumes_exactly(prompt_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    config = TrainConfig(**SETTINGS, accumulate=2)
    train(prompt_store, tmp_path / "straight", MODEL, config, progress=False)
    original, drawn = SongLanes.__next__, 0

    def next_then_interrupt(self: SongLanes):  # noqa: ANN202
        nonlocal drawn
        drawn += 1
        if drawn == 5:  # the first batch of step 3: the step finishes, then the run stops
            os.kill(os.getpid(), signal.SIGINT)
        return original(self)

    with monkeypatch.context() as patch:
        patch.setattr(SongLanes, "__next__", next_then_interrupt)
        first, _ = train(prompt_store, tmp_path / "resumed", MODEL, config, progress=False)
    assert first.interrupted and first.step == 3
    second, _ = train(prompt_store, tmp_path / "resumed", None, config, resume=True, progress=False)
    assert second.step == 6
    assert_same_weights(load_model(tmp_path / "straight").model.state_dict(),
                        load_model(tmp_path / "resumed").model.state_dict(), atol=1e-6)


def test_two_nodes_on_one_machine_train_to_identical_weights(prompt_store: Path, tmp_path: Path) -> None:
    endpoint = f"localhost:{free_port()}"
    launches = [torchrun(["--nnodes=2", "--nproc_per_node=1", f"--node-rank={node}", "--rdzv-backend=c10d",
                          f"--rdzv-endpoint={endpoint}", "--rdzv-id=test-ddp"],
                         prompt_store, tmp_path / "run", tmp_path / "out", "max_steps=4")
                for node in (0, 1)]
    for launch in launches:
        finish(launch)
    ranks = [torch.load(tmp_path / "out" / f"rank{rank}.pt") for rank in (0, 1)]
    assert_same_weights(ranks[0]["weights"], ranks[1]["weights"], atol=0)
    assert ranks[0]["loss"] != ranks[1]["loss"]
    assert load_model(tmp_path / "run").step == 4

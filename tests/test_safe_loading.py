"""Opening a run or a model folder never runs code: every file a user may have received is JSON or safetensors,
and a file that is anything else (a pickle, truncated, empty, random bytes, the wrong tensors, a config with
unknown or missing fields) is refused with one line naming it."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from midigen.cli.main import main
from midigen.codec import load_tokenizer
from midigen.errors import MidigenError
from midigen.inference import SamplingConfig, empty_prompt, generate, load_model
from midigen.state_files import load_state, save_state

LEGACY_RUN = Path(__file__).parent / "data" / "legacy_run"


class Bomb:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def plant_bomb(path: Path, marker: Path) -> None:
    """Replace `path` with a torch checkpoint (a zip of pickles) that would create `marker` when loaded."""
    path.unlink(missing_ok=True)
    torch.save({"model": Bomb(marker)}, path)


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def one_error_line(err: str) -> bool:
    """The command's error is one line (progress notes may come before it), with no traceback."""
    return "Traceback" not in err and len([line for line in err.splitlines() if ": error: " in line]) == 1


def entry_points(folder: Path, store: Path, out: Path) -> dict[str, list[str]]:
    return {
        "generate": ["generate", str(folder), "--tokens", "8", "--seed", "1", "-o", str(out / "g.mid")],
        "eval": ["eval", str(folder), "--data", str(store), "--batch-size", "4"],
        "export": ["export", str(folder), "-o", str(out / "exported")],
    }


@pytest.fixture()
def run_copy(tiny_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    return copy


def test_state_files_keep_nested_state_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    rng.integers(0, 10, 5)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), betas=(0.9, 0.95))
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = {"rng": rng.bit_generator.state, "optimizer": optimizer.state_dict(), "queue": [3, 1], "best": None,
             "floor": float("-inf"), "lanes": np.arange(4), "torch_rng": torch.get_rng_state(), "__odd": "key"}
    save_state(tmp_path / "s.safetensors", state)
    loaded, named = load_state(tmp_path / "s.safetensors")
    assert named == {}
    assert loaded["rng"] == state["rng"] and loaded["queue"] == [3, 1] and loaded["best"] is None
    assert loaded["floor"] == float("-inf") and loaded["__odd"] == "key"
    assert np.array_equal(loaded["lanes"], state["lanes"]) and torch.equal(loaded["torch_rng"], state["torch_rng"])
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)  # tuples stay tuples
    assert set(loaded["optimizer"]["state"]) == {0, 1}  # integer keys stay integers
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters())
    fresh.load_state_dict(loaded["optimizer"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    resumed = np.random.default_rng()
    resumed.bit_generator.state = loaded["rng"]
    assert np.array_equal(resumed.integers(0, 1000, 8), rng.integers(0, 1000, 8))


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, os.urandom(4096), pickle.dumps({"a": 1})],
                         ids=["empty", "short", "random", "pickle"])
def test_a_file_that_is_not_safetensors_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "state.safetensors"
    path.write_bytes(content)
    with pytest.raises(MidigenError, match=str(path)):
        load_state(path)


def test_pickle_in_any_file_of_a_run_never_runs(run_copy: Path, prompt_store: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Each file of a run folder in turn becomes a pickle that would create a marker: no entry point runs it; each
    refuses in one line with exit 2, or works where it does not need that file."""
    marker = tmp_path / "marker"
    needed = {"generate": {"config.json", "checkpoint.safetensors"},
              "eval": {"config.json", "checkpoint.safetensors"},
              "export": {"config.json", "checkpoint.safetensors"},
              "resume": {"config.json", "checkpoint.safetensors", "checkpoint.rank0.safetensors"}}
    files = sorted(p.name for p in run_copy.iterdir() if p.is_file())
    assert {"config.json", "checkpoint.safetensors", "checkpoint.rank0.safetensors", "metrics.jsonl"} <= set(files)
    for name in files:
        folder = tmp_path / f"bombed-{name}"
        shutil.copytree(run_copy, folder)
        plant_bomb(folder / name, marker)
        out = tmp_path / f"out-{name}"
        commands = entry_points(folder, prompt_store, out)
        commands["resume"] = ["train", str(prompt_store), "-o", str(folder), "--resume", "--max-steps", "31", "--quiet"]
        for command, args in commands.items():
            code, err = run_cli(capsys, *args)
            assert not marker.exists(), (command, name)
            if name in needed[command]:
                assert code == 2 and one_error_line(err), (command, name, err)
                assert name in err, (command, name, err)
            elif command != "resume" or name != "metrics.jsonl":  # a damaged log may be dropped with a warning
                assert code == 0, (command, name, err)
        if name in needed["generate"]:
            with pytest.raises(MidigenError, match=name):
                load_model(folder)
        else:
            load_model(folder)
        assert not marker.exists()


def damaged_runs(run: Path, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Run folders with one file damaged in one way each, and the words their refusal must hold."""
    cases: dict[str, tuple[Path, str]] = {}

    def variant(name: str, damage: object, message: str) -> None:
        folder = tmp_path / name
        shutil.copytree(run, folder)
        damage(folder)  # type: ignore[operator]
        cases[name] = (folder, message)

    checkpoint = "checkpoint.safetensors"
    variant("truncated", lambda f: (f / checkpoint).write_bytes((run / checkpoint).read_bytes()[:5000]),
            "not a safetensors file")
    variant("zero-length", lambda f: (f / checkpoint).write_bytes(b""), "empty file")
    variant("random", lambda f: (f / checkpoint).write_bytes(os.urandom(20000)), "not a safetensors file")
    variant("missing weights", lambda f: (f / checkpoint).unlink(), "missing")

    def resave(folder: Path, change: object) -> None:
        from safetensors import safe_open

        with safe_open(str(run / checkpoint), "pt") as handle:
            metadata = handle.metadata()
        tensors = load_file(run / checkpoint)
        change(tensors)  # type: ignore[operator]
        save_file(tensors, folder / checkpoint, metadata=metadata)

    variant("wrong shape", lambda f: resave(f, lambda t: t.update({"model.tok_emb.weight": torch.zeros(5, 32)})),
            "tok_emb.weight is")
    variant("wrong dtype", lambda f: resave(f, lambda t: t.update(
        {"model.ln_f.weight": t["model.ln_f.weight"].double()})), "ln_f.weight is torch.float64")
    variant("extra tensor", lambda f: resave(f, lambda t: t.update({"model.extra": torch.zeros(1)})), "unexpected")

    def edit_config(folder: Path, change: object) -> None:
        config = json.loads((folder / "config.json").read_text())
        change(config)  # type: ignore[operator]
        (folder / "config.json").write_text(json.dumps(config))

    variant("unknown field", lambda f: edit_config(f, lambda c: c["model"].update(flash=True)), "unknown field(s) flash")
    variant("missing field", lambda f: edit_config(f, lambda c: c["model"].pop("d_model")), "missing field(s) d_model")
    variant("wrong type", lambda f: edit_config(f, lambda c: c["model"].update(n_layers="two")), "n_layers")
    variant("unknown section", lambda f: edit_config(f, lambda c: c.update(hooks=[])), "unknown field(s) hooks")
    variant("config not json", lambda f: (f / "config.json").write_bytes(os.urandom(300)), "config.json")
    variant("future format", lambda f: edit_config(f, lambda c: c.update(format=99)), "format 99")
    return cases


def test_damaged_runs_are_refused_in_one_line(run_copy: Path, prompt_store: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    for case, (folder, message) in damaged_runs(run_copy, tmp_path).items():
        for command, args in entry_points(folder, prompt_store, tmp_path / f"out-{case}").items():
            code, err = run_cli(capsys, *args)
            assert code == 2 and one_error_line(err), (case, command, err)
            assert message in err and str(folder) in err, (case, command, err)


def test_export_load_generate_equals_the_run(run_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                             ) -> None:
    code, err = run_cli(capsys, "export", str(run_copy), "-o", str(tmp_path / "model"))
    assert code == 0, err
    model_dir = tmp_path / "model"
    assert sorted(p.name for p in model_dir.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    from_run, from_model = load_model(run_copy, "cpu"), load_model(model_dir, "cpu")
    tokenizer = load_tokenizer(from_run.tokenizer)
    tokens = [generate(loaded, empty_prompt(tokenizer), SamplingConfig(seed=5), new_tokens=48).sequence.tokens
              for loaded in (from_run, from_model)]
    assert np.array_equal(*tokens)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["kind"] == "midigen-model" and config["provenance"]["steps"] == 30
    run_config = json.loads((run_copy / "config.json").read_text())
    assert config["provenance"]["store"]["identity"] == run_config["store"]["identity"]
    assert config["provenance"]["tokens_seen"] > 0 and config["provenance"]["val_nll"] > 0
    card = (model_dir / "README.md").read_text()
    assert "| training steps | 30 |" in card and run_config["store"]["identity"] in card and "Licence:" in card
    assert f"{config['provenance']['val_nll']:,.4f}" in card
    # a model folder is refused as a target that holds something, and the folder is written whole or not at all
    code, err = run_cli(capsys, "export", str(run_copy), "-o", str(model_dir))
    assert code == 2 and "already exists" in err
    # every command that takes a run takes a model folder; a model folder has nothing to resume
    code, err = run_cli(capsys, "generate", str(model_dir), "--tokens", "8", "-o", str(tmp_path / "m.mid"))
    assert code == 0, err


def test_model_folder_files_holding_pickles_never_run(run_copy: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = tmp_path / "model"
    assert run_cli(capsys, "export", str(run_copy), "-o", str(model_dir))[0] == 0
    marker = tmp_path / "marker"
    for name in ("config.json", "model.safetensors", "README.md"):
        folder = tmp_path / f"bombed-{name}"
        shutil.copytree(model_dir, folder)
        plant_bomb(folder / name, marker)
        code, err = run_cli(capsys, "generate", str(folder), "--tokens", "8", "-o", str(tmp_path / f"{name}.mid"))
        assert not marker.exists()
        if name == "README.md":
            assert code == 0, err
        else:
            assert code == 2 and one_error_line(err) and name in err, err


def test_legacy_run_converts_and_generates_as_the_old_midigen_did(prompt_store: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "legacy"
    shutil.copytree(LEGACY_RUN, run)
    code, err = run_cli(capsys, "generate", str(run), "--tokens", "8", "-o", str(tmp_path / "x.mid"))
    assert code == 2 and "convert-run" in err and one_error_line(err)
    code, err = run_cli(capsys, "convert-run", str(run))
    assert code == 0, err
    assert not (run / "checkpoint.pt").exists() and not (run / "checkpoint.rank0.pt").exists()
    expected = json.loads((run / "generated_by_old_midigen.json").read_text())
    loaded = load_model(run, "cpu")
    generation = generate(loaded, empty_prompt(load_tokenizer(loaded.tokenizer)),
                          SamplingConfig(temperature=expected["temperature"], seed=expected["seed"]),
                          new_tokens=expected["new_tokens"])
    assert generation.sequence.tokens.tolist() == expected["tokens"]
    # it was trained on the test prompts, encoded as `prompt_store` is: the converted run resumes on them
    code, err = run_cli(capsys, "train", str(prompt_store), "-o", str(run), "--resume", "--max-steps", "6", "--quiet")
    assert code == 0, err
    assert load_model(run).step == 6


def test_legacy_pickle_that_runs_code_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "legacy"
    shutil.copytree(LEGACY_RUN, run)
    marker = tmp_path / "marker"
    plant_bomb(run / "checkpoint.rank0.pt", marker)
    code, err = run_cli(capsys, "convert-run", str(run))
    assert not marker.exists()
    assert code == 2 and "retrain" in err and "checkpoint.rank0.pt" in err and one_error_line(err)
    assert (run / "checkpoint.pt").exists() and not (run / "config.json").exists()  # nothing half-converted


def test_demo_reuses_only_a_run_that_loads_safely(run_copy: Path, tmp_path: Path) -> None:
    from midigen.demo import reusable_run

    assert reusable_run(run_copy)
    marker = tmp_path / "marker"
    plant_bomb(run_copy / "checkpoint.safetensors", marker)
    assert not reusable_run(run_copy)
    assert not marker.exists() and not run_copy.exists() and (tmp_path / "run.unusable-1").is_dir()
    legacy = tmp_path / "old" / "run"
    shutil.copytree(LEGACY_RUN, legacy)
    assert not reusable_run(legacy) and (tmp_path / "old" / "run.unusable-1" / "checkpoint.pt").exists()


def test_inference_does_not_import_training() -> None:
    code = ("import sys, midigen.inference, midigen.inference.export; "
            "bad = [m for m in sys.modules if m.startswith('midigen.training')]; assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

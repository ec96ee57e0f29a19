"""`midigen demo`: the whole pipeline on the bundled Bach chorales, within a bounded time.

Export the chorales, encode them, train the `small` preset (a fixed number of steps, capped by a
time budget so a 2-core CPU finishes in about 15 minutes; a GPU does the same work faster),
evaluate against the bigram floor, continue the opening bars of 16 unseen chorales and of a pop
prompt and write one piece from scratch (all in one batch), measure everything written against the
validation chorales, and draw and render a few of the pieces. Rerunning it
reuses what is already done (and resumes an interrupted training).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from midigen.codec.config import TokenizerConfig
from midigen.codec.registry import load_tokenizer
from midigen.errors import MidigenError
from midigen.io_utils import atomic_write_text

log = logging.getLogger(__name__)
SHARED_PROMPTS = Path("..") / "shared" / "midi" / "prompts"


@dataclass(frozen=True)
class DemoConfig:
    out_dir: Path = Path("out/demo")
    minutes: float = 10.0  # training budget; the rest of the demo takes a few minutes more on 2 cores
    max_steps: int = 1500
    prompt_bars: int = 4
    bars: int = 8
    validation_prompts: int = 16  # validation chorales continued (one batch with the others): the set the metrics judge
    rendered_chorales: int = 2  # of those, drawn and rendered to audio (the pop prompt's and the one from scratch too)
    device: str = "auto"
    seed: int = 0
    extra_prompts: Path = SHARED_PROMPTS


@dataclass
class DemoReport:
    out_dir: Path
    figures: dict[str, Any]
    pieces: list[Path] = field(default_factory=list)
    pictures: list[Path] = field(default_factory=list)
    sounds: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# The chorales are four voices of one timbre: instruments would add tokens (an instrument token per chord) and
# nothing to learn, so the demo keeps the seed's single stream (see the README's figures).
DEMO_TOKENIZER = TokenizerConfig(instruments=False, keep_drums=False, velocity_bins=0)


def run_demo(config: DemoConfig = DemoConfig()) -> DemoReport:
    from midigen.data.corpus import export_corpus
    from midigen.data.encode import encode_files
    from midigen.data.store import TokenStore
    from midigen.evaluation.nll import evaluate_split
    from midigen.model.config import ModelConfig
    from midigen.training.config import TrainConfig
    from midigen.inference.model_files import load_model
    from midigen.training.recipe import train

    out = config.out_dir
    log.info("1/5 exporting the Bach chorales from music21's corpus to %s", out / "corpus")
    corpus = export_corpus("bach-chorales", out / "corpus")
    log.info("2/5 encoding them into %s", out / "store")
    encode_files(corpus.paths, out / "store", DEMO_TOKENIZER)
    store = TokenStore(out / "store")
    run = out / "run"
    resume = reusable_run(run)
    log.info("3/5 training the small preset for up to %d steps or %.0f minutes%s", config.max_steps, config.minutes,
             " (resuming)" if resume else "")
    train_config = TrainConfig(max_steps=config.max_steps, max_minutes=config.minutes, device=config.device,
                               seed=config.seed, eval_interval=250)
    model_config = None if resume else ModelConfig.preset("small", store.config)
    train(store.root, run, model_config, train_config, resume=resume)
    trained = load_model(run, config.device)
    log.info("4/5 evaluating on the validation chorales")
    figures = evaluate_split(trained.model, store, "val", progress=True)
    atomic_write_text(out / "eval.json", json.dumps(figures, indent=2) + "\n")
    report = DemoReport(out, figures)
    log.info("5/5 generating, rendering and measuring")
    write_pieces(trained, store, config, report)
    measure(report, [Path(store.songs[i].path) for i in store.split_indices("val")], out)
    return report


def reusable_run(run: Path) -> bool:
    """Whether an earlier demo's run folder loads safely and can be resumed; one that cannot (a pickled
    checkpoint of an older midigen, damaged files) is moved aside, and the demo trains afresh."""
    from midigen.inference.model_files import CHECKPOINT_FILE, load_model

    if not run.exists():
        return False
    try:
        load_model(run, "cpu")
        return (run / CHECKPOINT_FILE).exists()
    except MidigenError as exc:
        aside = next(run.with_name(f"{run.name}.unusable-{n}") for n in range(1, 10**6)
                     if not run.with_name(f"{run.name}.unusable-{n}").exists())
        log.warning("%s cannot be reused (%s); moved to %s, training afresh", run, exc, aside)
        run.rename(aside)
        return False


def prompts_for(store: Any, config: DemoConfig) -> tuple[list[Path], list[Path]]:
    """The validation chorales to continue, and the other prompts (one pop excerpt, when the shared prompts exist)."""
    chorales = [Path(store.songs[i].path) for i in store.split_indices("val")[: config.validation_prompts]]
    extra = sorted(config.extra_prompts.glob("*.mid"))[:1] if config.extra_prompts.is_dir() else []
    return chorales, extra


def write_pieces(trained: Any, store: Any, config: DemoConfig, report: DemoReport) -> None:
    """Continue every prompt and write one piece from scratch, all sampled in one batch (piece i with seed
    `config.seed + i`); draw and render the first `rendered_chorales` chorales' pieces and the others."""
    from midigen.inference.generate import empty_prompt, generate_batch, load_prompt, write_generation
    from midigen.inference.sampling import SamplingConfig

    tokenizer = load_tokenizer(trained.tokenizer)
    folder = config.out_dir / "generated"
    chorales, extra = prompts_for(store, config)
    prompts = [load_prompt(path, config.prompt_bars, tokenizer) for path in chorales + extra]
    prompts.append(empty_prompt(tokenizer))
    sampling = SamplingConfig(temperature=0.9, top_p=0.95, seed=config.seed)
    generations = generate_batch(trained, prompts, sampling, bars=config.bars)
    names = [path.stem for path in chorales + extra] + ["from-scratch"]
    for number, (name, generation) in enumerate(zip(names, generations)):
        path = folder / f"{name}.mid"
        write_generation(generation, tokenizer, path)
        report.pieces.append(path)
        if number < config.rendered_chorales or number >= len(chorales):
            render(path, report)


def render(path: Path, report: DemoReport) -> None:
    """A piano roll always; audio when FluidSynth and a SoundFont are installed."""
    from midigen.evaluation.render import render_piano_roll, render_wav

    report.pictures.append(render_piano_roll(path, path.with_suffix(".png")))
    try:
        report.sounds.append(render_wav(path, path.with_suffix(".wav")))
    except MidigenError as exc:
        if not any(note.startswith("no audio") for note in report.notes):
            report.notes.append(f"no audio: {exc}")


def measure(report: DemoReport, references: list[Path], out: Path) -> None:
    from midigen.evaluation.metrics import compare_sets
    from midigen.evaluation.plots import plot_metric_distributions

    result = compare_sets(report.pieces, references, continuation_only=True)
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=2, default=str) + "\n")
    plot_metric_distributions(result, out / "metrics.png")
    report.figures["metrics"] = result["comparison"]


def summary(report: DemoReport) -> str:
    figures = report.figures
    below = 100 * (figures["bigram_nll"] - figures["nll"]) / figures["bigram_nll"]
    lines = [
        f"validation NLL {figures['nll']:.3f} nats/token vs bigram floor {figures['bigram_nll']:.3f} "
        f"({below:.0f}% below; goal 25%) over {figures['tokens']} tokens",
        "overlap with the validation chorales (1 = same distribution): " + ", ".join(
            f"{name} {values['overlap_area']:.2f}" for name, values in figures["metrics"].items() if values
        ),
        f"pieces: {', '.join(str(p) for p in report.pieces)}",
        f"piano rolls: {len(report.pictures)} PNG, audio: {len(report.sounds)} WAV, beside the pieces drawn",
        f"figures: {report.out_dir / 'eval.json'}, {report.out_dir / 'metrics.json'}, {report.out_dir / 'metrics.png'}, "
        f"loss curve {report.out_dir / 'run' / 'loss.png'}",
        *report.notes,
    ]
    return "\n".join(lines)

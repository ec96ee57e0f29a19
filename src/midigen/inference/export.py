"""`export_model`: a model folder to hand to someone, from a run (or another model folder).

The layout is a Hugging Face model repository's (config.json, model.safetensors, README.md), so the
folder can be uploaded as it is; `load_model` reads it back.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from midigen import __version__
from midigen.errors import MidigenError
from midigen.inference.model_files import (
    CONFIG_FILE,
    FILE_FORMAT,
    MODEL_CARD_FILE,
    MODEL_KIND,
    WEIGHTS_FILE,
    LoadedModel,
    load_model,
)
from midigen.state_files import unique_state


def export_model(source: str | Path, output: str | Path) -> Path:
    """Write the model of run or model folder `source` to the new folder `output`; it appears whole or not at all."""
    from safetensors.torch import save_file

    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise MidigenError(f"{output}: already exists and is not an empty folder; choose a new one")
    loaded = load_model(source, "cpu")
    config = {"format": FILE_FORMAT, "kind": MODEL_KIND, "midigen_version": __version__,
              "model": loaded.model_config.to_dict(), "tokenizer": loaded.tokenizer.to_dict(),
              "provenance": loaded.provenance}
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        weights = {name: t.contiguous() for name, t in unique_state(loaded.model).items()}
        save_file(weights, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        (staging / MODEL_CARD_FILE).write_text(model_card(loaded, output.name))
        if output.exists():
            output.rmdir()  # empty, checked above
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def _figure(value: Any, digits: int = 4) -> str:
    if value is None:
        return "not recorded"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def model_card(loaded: LoadedModel, name: str) -> str:
    """README.md of a model folder: what the model learned from, its figures, how to generate with it."""
    config, tokenizer, provenance = loaded.model_config, loaded.tokenizer, loaded.provenance
    store = provenance.get("store") or {}
    train = provenance.get("train") or {}
    parameters = loaded.model.num_parameters()
    return f"""---
library_name: midigen
tags: [music, midi, symbolic-music, music-generation]
license: other
---

# {name}

A music transformer trained with [midigen](https://pypi.org/project/midigen/) {provenance.get("midigen_version", __version__)}:
it continues the opening bars of a MIDI file, or writes music from nothing.

## What it learned from

- Token store: `{store.get("path", "not recorded")}`, {_figure(store.get("songs"))} songs
  ({_figure(store.get("training_songs"))} for training), {_figure(store.get("tokens"))} tokens.
- Store identity (SHA-256 of the tokenizer config and each song's content and split):
  `{store.get("identity", "not recorded")}`.
- Encoding: the `{tokenizer.kind}` tokenizer, {"a track per instrument" if tokenizer.instruments else "one piano stream"},
  {tokenizer.steps_per_quarter} steps per quarter note, durations up to {tokenizer.max_duration} steps,
  drums {"kept" if tokenizer.keep_drums else "dropped"}, {tokenizer.velocity_bins or "no"} velocity levels,
  unisons {"merged" if tokenizer.merge_unisons else "kept"}.

## Model

- {parameters / 1e6:.2f}M parameters: {config.n_layers} layers, {config.n_heads} heads, width {config.d_model},
  {config.context} tokens of context, memory `{config.memory}`.

## Figures

| | |
|---|---|
| training steps | {_figure(provenance.get("steps"))} |
| tokens seen | {_figure(provenance.get("tokens_seen"))} |
| training minutes | {_figure(provenance.get("training_minutes"), 1)} |
| batch size, peak learning rate | {_figure(train.get("batch_size"))}, {_figure(train.get("learning_rate"), 5)} |
| validation NLL (nats per token, last validation) | {_figure(provenance.get("val_nll"))} |
| best validation NLL | {_figure(provenance.get("best_val_nll"))} |

## How to generate

```sh
pip install midigen
midigen generate {name} --prompt song.mid --prompt-bars 4 --bars 8 --temperature 0.9 --top-p 0.95 -o out.mid
```

```python
import midigen
from midigen.inference import SamplingConfig, generate, load_prompt, write_generation
from midigen.codec import load_tokenizer

loaded = midigen.load_model("{name}")
tokenizer = load_tokenizer(loaded.tokenizer)
prompt = load_prompt("song.mid", bars=4, tokenizer=tokenizer)
write_generation(generate(loaded, prompt, SamplingConfig(temperature=0.9, seed=1), bars=8), tokenizer, "out.mid")
```

Loading reads only JSON and safetensors: nothing in this folder is executed.

## Licence

Licence: (fill in the licence under which you share these weights, and the terms of the music they learned from)
"""

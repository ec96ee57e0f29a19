"""Training step time of midigen's model against x-transformers' TransformerWrapper.

Same depth, width, heads, context, batch and dropout; x-transformers with its T5 relative position
bias (`rel_pos_bias=True`). One step = forward, cross-entropy, backward, AdamW step. Measurements of
the two models are interleaved and the median is reported, so background load hits both alike.
"""

from __future__ import annotations

import torch
from common import median_seconds, write_section
from x_transformers import Decoder, TransformerWrapper

from midigen.model import ModelConfig, MusicTransformer

BATCH = 16
ROUNDS = 5


def step_function(model: torch.nn.Module, config: ModelConfig, ours: bool):  # noqa: ANN201
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, config.vocab_size, (BATCH, config.context + 1), generator=generator)
    bars = torch.randint(0, config.num_bars, (BATCH, config.context), generator=generator)
    beats = torch.randint(0, config.beat_positions, (BATCH, config.context), generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step() -> None:
        if ours:
            loss = model(tokens[:, :-1], bars, beats, targets=tokens[:, 1:]).loss
        else:
            logits = model(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def x_transformers_model(config: ModelConfig) -> torch.nn.Module:
    return TransformerWrapper(
        num_tokens=config.vocab_size,
        max_seq_len=config.context,
        emb_dropout=config.dropout,
        attn_layers=Decoder(
            dim=config.d_model,
            depth=config.n_layers,
            heads=config.n_heads,
            rel_pos_bias=True,
            attn_dropout=config.attn_dropout,
            ff_dropout=config.dropout,
        ),
    )


def measure(preset: str, repeats: int) -> tuple[float, float, int, int]:
    config = ModelConfig.preset(preset)
    torch.manual_seed(0)
    ours_model, theirs_model = MusicTransformer(config), x_transformers_model(config)
    ours = step_function(ours_model, config, ours=True)
    theirs = step_function(theirs_model, config, ours=False)
    ours_times, theirs_times = [], []
    for _ in range(ROUNDS):
        ours_times.append(median_seconds(ours, repeats))
        theirs_times.append(median_seconds(theirs, repeats))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return sorted(ours_times)[ROUNDS // 2], sorted(theirs_times)[ROUNDS // 2], count(ours_model), count(theirs_model)


def main() -> None:
    rows = []
    for preset, repeats in (("small", 3), ("base", 1)):
        config = ModelConfig.preset(preset)
        ours, theirs, ours_params, theirs_params = measure(preset, repeats)
        rows.append(
            f"| {preset} | {config.n_layers}×{config.d_model}, {config.n_heads} heads, context {config.context} "
            f"| {ours * 1000:.0f} ms | {theirs * 1000:.0f} ms | {ours / theirs:.2f}× "
            f"| {ours_params / 1e6:.2f}M / {theirs_params / 1e6:.2f}M |"
        )
    body = (
        f"Forward + backward + AdamW step on CPU, batch {BATCH}, median of {ROUNDS} interleaved rounds. "
        "Goal: midigen at most 1.0× x-transformers' step time.\n\n"
        "| preset | model | midigen | x-transformers | ratio | parameters (midigen / x-transformers) |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(rows)
    )
    write_section("Training step: midigen vs x-transformers", body)


if __name__ == "__main__":
    main()

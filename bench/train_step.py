"""Training step time of midigen's model against x-transformers' TransformerWrapper.

x-transformers is configured like midigen: the same depth, width, heads and head size, MLP width, context, batch
and dropout; a T5 relative position bias and no absolute positions (`rel_pos_bias=True`,
`use_abs_pos_emb=False`, midigen's buckets and distance); the output head tied to the token embedding
(`tie_embedding=True`). Their parameter counts must agree within PARAMETER_TOLERANCE, or nothing is timed.
Attention: x-transformers refuses its flash kernel (SDPA) with a T5 bias and runs its own einsum attention;
midigen, training on CPU with a learned bias, runs its own matmul attention (`CpuAttention`): neither uses SDPA.
One step = forward, cross-entropy, backward, AdamW step. Measurements of the two models are interleaved and the
median is reported, so background load hits both alike.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import QUICK_BENCHMARKS, median_seconds, write_section
from x_transformers import Decoder, TransformerWrapper

from midigen.codec import TokenizerConfig
from midigen.model import ModelConfig, MusicTransformer

BATCH = 16
ROUNDS = 5
PRESETS = {"small": 3, "base": 1}  # preset: steps timed per round
GOAL = 1.0  # midigen's step time at most this many times x-transformers'
TOKENIZER = TokenizerConfig(instruments=False, keep_drums=False, velocity_bins=0)  # as earlier figures: the demo's
PARAMETER_TOLERANCE = 0.03  # the two models' parameter counts may differ by this fraction at most


def step_function(model: torch.nn.Module, config: ModelConfig, ours: bool):  # noqa: ANN201
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, config.vocab_size, (BATCH, config.context + 1), generator=generator)
    features = {name: torch.randint(0, size, (BATCH, config.context), generator=generator)
                for name, size in config.embeddings.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step() -> None:
        if ours:
            loss = model(tokens[:, :-1], features, targets=tokens[:, 1:]).loss
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
        use_abs_pos_emb=False,
        tie_embedding=True,
        attn_layers=Decoder(
            dim=config.d_model,
            depth=config.n_layers,
            heads=config.n_heads,
            attn_dim_head=config.head_dim,
            ff_mult=config.mlp_ratio,
            rel_pos_bias=True,
            rel_pos_num_buckets=config.rel_pos_buckets,
            rel_pos_max_distance=config.rel_pos_max_distance,
            attn_dropout=config.attn_dropout,
            ff_dropout=config.dropout,
        ),
    )


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def measure(ours_model: torch.nn.Module, theirs_model: torch.nn.Module, config: ModelConfig, repeats: int,
            rounds: int) -> tuple[float, float]:
    ours = step_function(ours_model, config, ours=True)
    theirs = step_function(theirs_model, config, ours=False)
    ours_times, theirs_times = [], []
    for _ in range(rounds):
        ours_times.append(median_seconds(ours, repeats))
        theirs_times.append(median_seconds(theirs, repeats))
    return statistics.median(ours_times), statistics.median(theirs_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help=f"check that the bench runs (the small preset, one round), writing to "
                             f".bench/{QUICK_BENCHMARKS.name}, not BENCHMARKS.md")
    args = parser.parse_args()
    presets = {"small": 1} if args.quick else PRESETS
    rounds = 1 if args.quick else ROUNDS
    models = {}
    for preset in presets:
        config = ModelConfig.preset(preset, TOKENIZER)
        torch.manual_seed(0)
        models[preset] = config, MusicTransformer(config), x_transformers_model(config)
        ours_params, theirs_params = parameters(models[preset][1]), parameters(models[preset][2])
        print(f"{preset}: parameters midigen {ours_params:,}, x-transformers {theirs_params:,}")
        if abs(ours_params / theirs_params - 1) > PARAMETER_TOLERANCE:
            raise SystemExit(f"train_step.py: at {preset}, midigen has {ours_params:,} parameters and x-transformers "
                             f"{theirs_params:,}: more than {PARAMETER_TOLERANCE:.0%} apart, not timed")
    rows, met = [], {}
    for preset, (config, ours_model, theirs_model) in models.items():
        ours, theirs = measure(ours_model, theirs_model, config, presets[preset], rounds)
        ratio = ours / theirs
        met[preset] = ratio <= GOAL
        rows.append(
            f"| {preset} | {config.n_layers}×{config.d_model}, {config.n_heads} heads, context {config.context} "
            f"| {ours * 1000:.0f} ms | {theirs * 1000:.0f} ms | {ratio:.2f}× ({'met' if met[preset] else 'NOT met'}) "
            f"| {parameters(ours_model):,} / {parameters(theirs_model):,} |"
        )
    verdict = "; ".join(f"{'met' if ok else 'NOT met'} at {preset}" for preset, ok in met.items())
    body = (
        f"Forward + backward + AdamW step on CPU, batch {BATCH}, median of {rounds} interleaved rounds. "
        "x-transformers (`TransformerWrapper` + `Decoder`) is configured like midigen: the same depth, width, heads "
        "and head size (`attn_dim_head`), MLP width, context and dropouts; a T5 relative position bias with midigen's "
        "buckets and distance (`rel_pos_bias=True`; one table shared by the layers, where midigen has one per layer) "
        "and no absolute positions (`use_abs_pos_emb=False`); the head tied to the token embedding "
        "(`tie_embedding=True`). Attention: x-transformers refuses its flash kernel (SDPA) with a T5 bias and runs "
        "its own einsum attention; midigen, training on CPU with a learned bias, runs its own matmul attention "
        "(`CpuAttention`): neither uses SDPA. midigen also embeds bars and beats, which x-transformers does not take. "
        f"The parameter counts must agree within {PARAMETER_TOLERANCE:.0%}.\n\n"
        f"Goal: midigen at most {GOAL:.1f}× x-transformers' step time: **{verdict}**.\n\n"
        "| preset | model | midigen | x-transformers | ratio (goal ≤ "
        f"{GOAL:.1f}×) | parameters (midigen / x-transformers) |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(rows)
    )
    write_section("Training step: midigen vs x-transformers", body, quick=args.quick)


if __name__ == "__main__":
    main()

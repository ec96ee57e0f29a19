"""Generation speed on CPU, `small` preset (untrained weights: speed does not depend on them).

1. Incremental decoding with the KV cache against recomputing the whole context for every new token: one lane,
   the same model, grammar tables and sampler.
2. 8 continuations of one real prompt sampled in one batch (`generate_batch`, `num_samples=8`) against the same 8
   sampled one after another (`generate`, seeds s..s+7): the same tokens, so tokens/s compares like with like.
3. Tokens/s of `generate_batch` per memory mode (none, xl, knn), one lane and 8 lanes.

Every comparison runs its contenders in interleaved rounds, so background load hits them alike; each reports the
median time of each contender and the median over the rounds of the ratio taken within a round.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any
from pathlib import Path

import numpy as np
import torch
from common import QUICK_BENCHMARKS, ROOT, cpu_name, write_section

from midigen.codec import TokenizerConfig, load_tokenizer
from midigen.codec.config import Vocab
from midigen.inference.generate import SlidingWindowDecoder, generate, generate_batch, load_prompt
from midigen.inference.model_files import LoadedModel
from midigen.inference.sampling import SamplingConfig, sample_tokens
from midigen.model import ModelConfig, MusicTransformer

PROMPT = ROOT / "tests" / "data" / "prompts" / "Canon_In_D_Major_-_Johann_Pachelbel_-_Chorus.mid"
PROMPT_BARS = 4
LANES = 8
CACHE_GOAL, BATCH_GOAL = 5.0, 4.0  # KV cache over recomputation; 8 lanes batched over 8 one after another
SAMPLING = SamplingConfig(temperature=1.0, seed=0)
# the demo's encoding, which earlier figures were measured with
TOKENIZER = TokenizerConfig(instruments=False, keep_drums=False, velocity_bins=0)


class RecomputeDecoder:
    """The baseline: no cache, a full forward over the last window for each token."""

    def __init__(self, model: MusicTransformer) -> None:
        self.model, self.window = model, model.config.context
        self.history: dict[str, torch.Tensor] = {}

    @torch.inference_mode()
    def feed(self, tokens: torch.Tensor, features: dict[str, torch.Tensor]) -> torch.Tensor:
        new = {"tokens": tokens, **features}
        self.history = {name: torch.cat([self.history[name], value], 1)[:, -self.window :] if self.history else value
                        for name, value in new.items()}
        tokens = self.history["tokens"]
        return self.model(tokens, {name: self.history[name] for name in features}).logits[:, -1]


def small_model(memory: str) -> LoadedModel:
    torch.manual_seed(0)
    config = ModelConfig.preset("small", TOKENIZER, memory=memory)
    return LoadedModel(MusicTransformer(config).eval(), TOKENIZER, config, Path("untrained"), 0)


def decode_one_lane(decoder_class: type, model: MusicTransformer, new_tokens: int) -> float:
    """Seconds to sample `new_tokens` tokens from nothing with `decoder_class`, one token per call."""
    tables = load_tokenizer(TOKENIZER).grammar
    grammar = tables.on(torch.device("cpu"))
    generators = [torch.Generator().manual_seed(0)]
    decoder = decoder_class(model)
    state = torch.as_tensor(tables.states([np.array([Vocab.SOS])]))
    token, step = torch.tensor([Vocab.SOS]), 0
    start = time.perf_counter()
    logits = decoder.feed(token.view(1, 1), {"bars": torch.zeros(1, 1, dtype=torch.long),
                                             "beats": torch.zeros(1, 1, dtype=torch.long)})
    for _ in range(new_tokens):
        token = sample_tokens(logits.view(1, -1), grammar.allowed(state, False), SAMPLING, generators)
        fed = grammar.feed(state, token)
        state = fed.state
        step += int(fed.advance)
        logits = decoder.feed(token.view(1, 1), {"bars": torch.tensor([[step // 32]]),
                                                 "beats": torch.tensor([[step % 32]])})
    return time.perf_counter() - start


def interleaved(contenders: dict[Any, Callable[[], float]], rounds: int) -> dict[Any, list[float]]:
    """Seconds of each contender, round by round (one run of each per round, after a warm-up run of each)."""
    for run in contenders.values():
        run()
    seconds: dict[Any, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, run in contenders.items():
            seconds[name].append(run())
    return seconds


def timed(run: Callable[[], object]) -> Callable[[], float]:
    def seconds() -> float:
        start = time.perf_counter()
        run()
        return time.perf_counter() - start
    return seconds


def ratio(slow: list[float], fast: list[float]) -> float:
    """The median over rounds of slow / fast, both taken in the same round."""
    return statistics.median(s / f for s, f in zip(slow, fast))


def cache_section(new_tokens: int, rounds: int) -> str:
    model = small_model("none").model
    seconds = interleaved({label: lambda c=decoder_class: decode_one_lane(c, model, new_tokens)
                           for label, decoder_class in (("KV cache (sliding window)", SlidingWindowDecoder),
                                                        ("recompute the whole context", RecomputeDecoder))}, rounds)
    rows = [f"| {label} | {new_tokens / statistics.median(times):.0f} |" for label, times in seconds.items()]
    speedup = ratio(seconds["recompute the whole context"], seconds["KV cache (sliding window)"])
    return (f"{new_tokens} tokens sampled one at a time from nothing on CPU ({cpu_name()}, {torch.get_num_threads()} "
            f"torch threads), `small` preset (context 256), one lane, grammar mask on; median of {rounds} interleaved "
            f"rounds. Goal: the KV cache at least {CACHE_GOAL:g}× the recompute baseline.\n\n"
            "| decoding | tokens/s |\n|---|---|\n" + "\n".join(rows) +
            f"\n\nKV cache speed-up over recomputation (median of the rounds' ratios): **{speedup:.1f}×** "
            f"(goal ≥ {CACHE_GOAL:g}×: **{'met' if speedup >= CACHE_GOAL else 'NOT met'}**).")


def batch_section(new_tokens: int, rounds: int) -> str:
    prompt = load_prompt(PROMPT, PROMPT_BARS, load_tokenizer(TOKENIZER))

    def batched(trained: LoadedModel, lanes: int) -> Callable[[], float]:
        return timed(lambda: generate_batch(trained, [prompt], SAMPLING, new_tokens=new_tokens, num_samples=lanes))

    def one_after_another(trained: LoadedModel) -> Callable[[], float]:
        return timed(lambda: [generate(trained, prompt, SamplingConfig(seed=lane), new_tokens=new_tokens)
                              for lane in range(LANES)])

    trained = small_model("none")
    seconds = interleaved({"batched": batched(trained, LANES), "one after another": one_after_another(trained)}, rounds)
    speedup = ratio(seconds["one after another"], seconds["batched"])
    rows = [f"| {LANES} lanes {label} | {LANES * new_tokens / statistics.median(times):.0f} |"
            for label, times in seconds.items()]

    models = {memory: small_model(memory) for memory in ("none", "xl", "knn")}
    modes = interleaved({(memory, lanes): batched(models[memory], lanes)
                         for memory in models for lanes in (1, LANES)}, rounds)
    rates = {(memory, lanes): lanes * new_tokens / statistics.median(times) for (memory, lanes), times in modes.items()}
    mode_rows = [f"| {memory} | {rates[memory, 1]:.0f} | {rates[memory, LANES]:.0f} |" for memory in models]
    return (f"`generate_batch` on CPU ({cpu_name()}, {torch.get_num_threads()} torch threads), `small` preset "
            f"(context 256; xl: a 256-token XL window; knn: XL plus the kNN memory), continuing the first "
            f"{PROMPT_BARS} bars of `{PROMPT.name}` ({len(prompt.sequence)} tokens) by {new_tokens} tokens per lane "
            f"(prefill included), temperature 1; median of {rounds} interleaved rounds.\n\n"
            f"{LANES} continuations of one prompt: one batch against one after another (the same seeds, so the same "
            f"tokens). Goal: at least {BATCH_GOAL:g}× the throughput.\n\n"
            "| generation | tokens/s |\n|---|---|\n" + "\n".join(rows) +
            f"\n\nBatched speed-up (median of the rounds' ratios): **{speedup:.1f}×** "
            f"(goal ≥ {BATCH_GOAL:g}×: **{'met' if speedup >= BATCH_GOAL else 'NOT met'}**).\n\n"
            f"Tokens/s (all lanes together) by memory mode:\n\n"
            f"| memory | 1 lane | {LANES} lanes |\n|---|---|---|\n" + "\n".join(mode_rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"check that the bench runs (short runs, one round), writing to "
                             f".bench/{QUICK_BENCHMARKS.name}, not BENCHMARKS.md")
    args = parser.parse_args()
    rounds, cache_tokens, batch_tokens = (1, 64, 32) if args.quick else (5, 1024, 256)
    write_section("Generation: KV cache vs recomputation", cache_section(cache_tokens, rounds), quick=args.quick)
    write_section("Generation: batched lanes and memory modes", batch_section(batch_tokens, rounds), quick=args.quick)


if __name__ == "__main__":
    main()

"""Continuing prompts (or starting from nothing) with a trained model, token by token, many lanes in one batch.

Each prompt is fed alone (its KV cache, and its memories for xl/knn models, exactly as one lane would fill them),
then the lanes are stacked, right-aligned in shared KV buffers, and decoded together: one forward pass per step
for the whole batch, the grammar masks looked up on the model's device, each lane sampling with its own generator.
A lane that stops leaves the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import symusic
import torch

from midigen.codec.config import Vocab
from midigen.codec.midi_io import CONTINUATION_MARKER, first_tempo, read_notes, write_midi
from midigen.codec.timing import BarGrid
from midigen.codec.tokenizer import SeedTokenizer, TokenSequence
from midigen.errors import BadMidiError, MidigenError
from midigen.inference.grammar import Grammar, GrammarTables
from midigen.inference.model_files import LoadedModel
from midigen.inference.sampling import SamplingConfig, sample_tokens
from midigen.model.memory import KnnMemory, MemoryState
from midigen.model.transformer import KV, MusicTransformer


@dataclass
class Prompt:
    sequence: TokenSequence  # starts with <sos>; no <eos>
    grid: BarGrid
    tempo_qpm: float
    bars: int  # bars the prompt covers; the continuation starts at the beginning of the next one
    source: str | None = None

    @property
    def end_step(self) -> int:
        return self.grid.bar_start(self.bars)


def empty_prompt(tokenizer: SeedTokenizer) -> Prompt:
    cfg = tokenizer.config
    grid = BarGrid.default(cfg.steps_per_quarter, cfg.beat_positions)
    return Prompt(tokenizer.with_positions(np.array([Vocab.SOS]), grid), grid, cfg.tempo_qpm, 0)


def load_prompt(path: str | Path, bars: int, tokenizer: SeedTokenizer) -> Prompt:
    """The first `bars` bars of a MIDI file, encoded with the run's tokenizer."""
    if bars < 1:
        raise MidigenError(f"--prompt-bars must be at least 1, got {bars}")
    notes = read_notes(path, tokenizer.config.keep_drums)
    sequence = tokenizer.encode(notes)
    grid = sequence.grid
    assert grid is not None
    cut = int(np.searchsorted(sequence.steps, grid.bar_start(bars), side="left"))
    tokens = sequence.tokens[:cut]
    if tokens[-1] == Vocab.EOS:
        tokens = tokens[:-1]
    if tokens[-1] == Vocab.SEP:
        tokens = tokens[:-1]  # the gap leading out of the prompt is the model's to choose
    if not is_note(tokens, tokenizer.vocab).any():  # a long rest is durations (and gaps) only
        raise BadMidiError(path, f"the first {bars} bar(s) hold no notes")
    last_bar = int(sequence.bars[-1]) + 1
    return Prompt(tokenizer.with_positions(tokens, grid), grid, first_tempo(notes, tokenizer.config.tempo_qpm),
                  min(bars, last_bar), str(path))


def is_note(tokens: np.ndarray, vocab: Vocab) -> np.ndarray:
    """Which of `tokens` are notes (duration tokens come after them in the vocabulary)."""
    return (tokens >= vocab.note_offset) & (tokens < vocab.duration_offset)


def as_batch(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array), device=device).view(1, -1)


class LaneCache:
    """Per layer, the keys/values of the recent tokens of a batch of lanes, right-aligned in shared buffers.

    Every lane's newest token sits at `end − 1`; `held[b]` counts the tokens lane b has fed. Lanes that started
    with prompts of different lengths simply hold different spans, and the KV `valid` mask hides the rest: the
    relative-position bias depends only on the distance between tokens, so this left padding changes nothing.
    Buffers hold twice `keep` tokens and more: appending writes in place, and only when a buffer is full are its
    newest `keep` tokens moved to the front.
    """

    def __init__(self, keep: int, held: torch.Tensor) -> None:
        self.keep = keep
        self.held = held  # (B,) long, on the model's device
        self.buffers: list[tuple[torch.Tensor, torch.Tensor]] = []  # (B, H, capacity, D) each
        self.end = 0

    def window(self, spans: torch.Tensor, width: int) -> list[KV] | None:
        """The newest `width` positions; lane b's valid ones are its newest `spans[b]` (B,) tokens."""
        width = min(width, self.end)
        if width == 0:
            return None
        distance = torch.arange(width, 0, -1, device=spans.device)  # (width,): from the end, 1 = newest
        valid = distance <= spans.unsqueeze(1)  # (B, width)
        start = self.end - width
        return [KV(k[:, :, start : self.end], v[:, :, start : self.end], valid) for k, v in self.buffers]

    def append(self, present: list[KV]) -> None:
        count = present[0].length
        if not self.buffers:
            self.buffers = [(kv.keys.new_zeros(*kv.keys.shape[:2], 2 * self.keep + count, kv.keys.shape[3]),
                             kv.values.new_zeros(*kv.values.shape[:2], 2 * self.keep + count, kv.values.shape[3]))
                            for kv in present]
        if self.end + count > self.buffers[0][0].shape[2]:
            kept = min(self.end, self.keep)
            for keys, values in self.buffers:
                keys[:, :, :kept] = keys[:, :, self.end - kept : self.end].clone()
                values[:, :, :kept] = values[:, :, self.end - kept : self.end].clone()
            self.end = kept
        for (keys, values), kv in zip(self.buffers, present):
            keys[:, :, self.end : self.end + count] = kv.keys
            values[:, :, self.end : self.end + count] = kv.values
        self.end += count
        self.held += count

    def select(self, lanes: torch.Tensor) -> None:
        """Keep only `lanes` (L,) long, in that order."""
        self.buffers = [(keys[lanes], values[lanes]) for keys, values in self.buffers]
        self.held = self.held[lanes]

    @classmethod
    def stacked(cls, caches: list[LaneCache]) -> LaneCache:
        """One cache holding the lanes of `caches` (which all have tokens), each right-aligned at the new end."""
        keep = caches[0].keep
        widths = [min(cache.end, keep) for cache in caches]
        stacked = cls(keep, torch.cat([cache.held for cache in caches]))
        stacked.end = end = max(widths)
        for layer, (keys, values) in enumerate(caches[0].buffers):
            shape = (len(stacked.held), keys.shape[1], 2 * keep + end, keys.shape[3])
            new_keys, new_values = keys.new_zeros(shape), values.new_zeros(shape)  # (B, H, capacity, D)
            for lane, (cache, width) in enumerate(zip(caches, widths)):
                old_keys, old_values = cache.buffers[layer]
                new_keys[lane, :, end - width : end] = old_keys[0, :, cache.end - width : cache.end]
                new_values[lane, :, end - width : end] = old_values[0, :, cache.end - width : cache.end]
            stacked.buffers.append((new_keys, new_values))
        return stacked


class SlidingWindowDecoder:
    """Incremental decoding with a KV cache for models without memory, for a batch of lanes: past the context
    the oldest tokens slide out, as they would from a training window."""

    def __init__(self, model: MusicTransformer, lanes: int = 1) -> None:
        self.model = model
        self.room = model.config.context - 1  # cached tokens; the next query is the window's last token
        self.device = next(model.parameters()).device
        self.cache = LaneCache(self.room, torch.zeros(lanes, dtype=torch.long, device=self.device))

    @torch.inference_mode()
    def feed(self, tokens: torch.Tensor, bars: torch.Tensor, beats: torch.Tensor) -> torch.Tensor:
        """Feed every lane tokens (B, T) and return the logits (B, V) for each lane's next one."""
        keep = slice(-(self.room + 1), None)  # only the last window can ever be attended to
        past = self.cache.window(self.cache.held.clamp(max=self.room), self.room)
        output = self.model(tokens[:, keep], bars[:, keep], beats[:, keep], past=past)
        self.cache.append(output.present)
        return output.logits[:, -1]

    def __call__(self, tokens: np.ndarray, bars: np.ndarray, beats: np.ndarray) -> torch.Tensor:
        """Feed a single lane tokens (T,) and return the logits (V,) for the next one."""
        return self.feed(*(as_batch(a, self.device) for a in (tokens, bars, beats)))[0]

    def select(self, lanes: torch.Tensor) -> None:
        self.cache.select(lanes)

    @classmethod
    def stacked(cls, decoders: list[SlidingWindowDecoder]) -> SlidingWindowDecoder:
        """One decoder that goes on with the lanes of `decoders`, in order."""
        stacked = cls(decoders[0].model, 0)
        stacked.cache = LaneCache.stacked([decoder.cache for decoder in decoders])
        return stacked


class MemoryDecoder:
    """Incremental decoding for models with memory, in the segments the model was trained on, for a batch of lanes.

    Tokens of a lane's current segment attend to each other, to its XL memory (the `memory_length` tokens before
    the segment) and to its kNN memory; when a segment is full its tokens leaving the XL window go into the kNN
    memory. Both the segment and the XL window are spans of one shared cache, so lanes whose segments end at
    different steps (prompts of different lengths) cut them where each would alone. A long prompt is fed segment
    by segment the same way, so it fills the memories.
    """

    def __init__(self, model: MusicTransformer, lanes: int = 1) -> None:
        self.model = model
        self.context, self.memory_length = model.config.context, model.config.memory_length
        self.device = next(model.parameters()).device
        self.memory = MemoryState(model.config, lanes, self.device)  # its kNN part; the XL window is `cache`
        self.cache = LaneCache(self.memory_length + self.context, torch.zeros(lanes, dtype=torch.long, device=self.device))

    def spans(self, held: torch.Tensor) -> torch.Tensor:
        """(B,) tokens each lane attends to besides its new ones: its XL window, then its segment so far."""
        in_segment = held % self.context
        return (held - in_segment).clamp(max=self.memory_length) + in_segment

    @torch.inference_mode()
    def feed(self, tokens: torch.Tensor, bars: torch.Tensor, beats: torch.Tensor) -> torch.Tensor:
        """Feed every lane tokens (B, T), which must fit in each lane's current segment; return the logits (B, V)
        for each lane's next token."""
        held = self.cache.held.clone()
        past = self.cache.window(self.spans(held), self.memory_length + self.context - 1)
        output = self.model(tokens, bars, beats, past=past, knn=self.memory.knn)
        self.cache.append(output.present)
        if self.memory.knn is not None:
            self.remember_leaving(held)
        return output.logits[:, -1]

    def remember_leaving(self, before: torch.Tensor) -> None:
        """Write into the kNN memory the tokens that the segments just completed push out of the XL window."""
        held = self.cache.held
        finished = (held % self.context == 0) & (held > before)  # (B,)
        if not bool(finished.any()):
            return
        xl_before = (held - self.context).clamp(min=0, max=self.memory_length)
        xl_after = held.clamp(max=self.memory_length)
        width = min(self.cache.end, self.memory_length + self.context)
        distance = torch.arange(width, 0, -1, device=held.device)  # (width,): from the end, 1 = newest
        leaving = (finished.unsqueeze(1) & (distance <= (self.context + xl_before).unsqueeze(1))
                   & (distance > xl_after.unsqueeze(1)))  # (B, width)
        keys, values = self.cache.buffers[self.model.config.knn_layer_index]
        window = slice(self.cache.end - width, self.cache.end)
        # copies: the cache's buffers are overwritten in place, and the memory stores what it is given later
        self.memory.knn.write(keys[:, :, window].clone(), values[:, :, window].clone(), leaving)

    def __call__(self, tokens: np.ndarray, bars: np.ndarray, beats: np.ndarray) -> torch.Tensor:
        """Feed a single lane tokens (T,), segment by segment, and return the logits (V,) for the next one."""
        first = 0
        while first < len(tokens):
            room = self.context - int(self.cache.held[0]) % self.context
            piece = slice(first, first + room)
            logits = self.feed(*(as_batch(a[piece], self.device) for a in (tokens, bars, beats)))
            first += room
        return logits[0]

    def select(self, lanes: torch.Tensor) -> None:
        self.cache.select(lanes)
        if self.memory.knn is not None:
            self.memory.knn.select(lanes)

    @classmethod
    def stacked(cls, decoders: list[MemoryDecoder]) -> MemoryDecoder:
        """One decoder that goes on with the lanes of `decoders`, in order."""
        stacked = cls(decoders[0].model, 0)
        stacked.cache = LaneCache.stacked([decoder.cache for decoder in decoders])
        if stacked.memory.knn is not None:
            stacked.memory.knn = KnnMemory.stacked([decoder.memory.knn for decoder in decoders])  # type: ignore[misc]
        return stacked


Decoder = SlidingWindowDecoder | MemoryDecoder


@dataclass
class Generation:
    sequence: TokenSequence  # prompt + continuation
    prompt_length: int  # tokens of the prompt
    continuation_step: int  # onset of the first generated note, or the prompt's end if that comes first
    grid: BarGrid
    tempo_qpm: float
    seed: int  # this lane's seed: sampled alone with it, the prompt gives this continuation again


@dataclass(frozen=True)
class TokenEvent:
    """A token just sampled, as the `on_token` callback of `generate_batch` sees it."""

    lane: int  # index of its generation in the returned list
    token: int
    step: int  # grid step the token is at (after a gap's length: where the next note will start)
    bar: int
    completes_note: bool  # a duration right after a note: that note is now complete
    count: int  # tokens this lane has generated, this one included


OnToken = Callable[[TokenEvent], "bool | None"]


def check_length(bars: int | None, new_tokens: int | None, seconds: float | None) -> None:
    if bars is None and new_tokens is None and seconds is None:
        raise MidigenError("give --bars, --tokens or --seconds")
    for flag, value in (("--bars", bars), ("--tokens", new_tokens)):
        if value is not None and value < 1:
            raise MidigenError(f"{flag} must be at least 1, got {value}")
    if seconds is not None and not (math.isfinite(seconds) and seconds > 0):
        raise MidigenError(f"--seconds must be a positive number, got {seconds}")


def end_step(prompt: Prompt, bars: int | None, seconds: float | None, steps_per_quarter: int) -> float:
    """The step at which a continuation of `prompt` stops by bars or seconds (whichever comes first), or inf."""
    ends = [math.inf]
    if bars is not None:
        ends.append(prompt.grid.bar_start(prompt.bars + bars))
    if seconds is not None:
        ends.append(prompt.end_step + math.ceil(seconds * prompt.tempo_qpm / 60 * steps_per_quarter))
    return min(ends)


def prefill(model: MusicTransformer, prompts: list[Prompt], copies: int) -> tuple[Decoder, torch.Tensor]:
    """A decoder fed each prompt alone (as one lane would be), then batched: `copies` lanes per prompt.
    Returns it and the logits (B, V) for each lane's first new token."""
    decoder_class = SlidingWindowDecoder if model.config.memory == "none" else MemoryDecoder
    decoders, logits = [], []
    for prompt in prompts:
        decoder = decoder_class(model)
        seq = prompt.sequence
        logits += [decoder(seq.tokens, seq.bars, seq.beats)] * copies
        decoders += [decoder] * copies
    return decoder_class.stacked(decoders), torch.stack(logits)  # type: ignore[arg-type]


@torch.inference_mode()
def generate_batch(
    trained: LoadedModel,
    prompts: Sequence[Prompt],
    sampling: SamplingConfig,
    *,
    bars: int | None = None,
    new_tokens: int | None = None,
    seconds: float | None = None,
    until_end: bool = False,
    num_samples: int = 1,
    on_token: OnToken | None = None,
) -> list[Generation]:
    """Continue each prompt `num_samples` times, every continuation a lane of one batch.

    Lane i (prompt-major: prompt 0's samples first) samples with seed `sampling.seed + i` and gets the tokens it
    would get alone with that seed (its logits differ from those of a batch of one by float rounding at most). A
    lane stops at the first of: `new_tokens` tokens, the end of `bars` bars after its prompt, `seconds` seconds of
    music at its prompt's tempo, `<eos>` when `until_end` lets the model end the song, or `on_token` returning True
    for one of its tokens (True for every lane's stops the whole batch). `on_token` sees every sampled token as a
    `TokenEvent`, in step order; the token it stops at is kept. A stopped lane leaves the batch; what it generated
    until then decodes.
    """
    check_length(bars, new_tokens, seconds)
    if num_samples < 1:
        raise MidigenError(f"--num-samples must be at least 1, got {num_samples}")
    if not prompts:
        raise MidigenError("no prompt to continue")
    lanes = [prompt for prompt in prompts for _ in range(num_samples)]
    config = trained.tokenizer
    vocab = config.vocab
    device = next(trained.model.parameters()).device
    seed = sampling.seed if sampling.seed is not None else int(torch.seed() % 2**62)
    generators = [torch.Generator().manual_seed(seed + lane) for lane in range(len(lanes))]
    tables = GrammarTables(config, device)
    grammar_states = []
    for prompt in lanes:
        grammar = Grammar(config)
        for token in prompt.sequence.tokens.tolist():
            grammar.feed(token)
        grammar_states.append(tables.state_of(grammar))
    state, lowest = torch.tensor(grammar_states, device=device).unbind(1)  # (B,) each
    decoder, logits = prefill(trained.model, list(prompts), num_samples)

    rows = np.arange(len(lanes))  # the lane of each row of the batch
    last = np.array([prompt.sequence.tokens[-1] for prompt in lanes])
    step = np.array([prompt.sequence.steps[-1] for prompt in lanes])
    ends = np.array([end_step(prompt, bars, seconds, config.steps_per_quarter) for prompt in lanes])
    grids = list({id(prompt.grid): prompt.grid for prompt in lanes}.values())  # distinct grids (most share one)
    grid_of = np.array([next(g for g, grid in enumerate(grids) if grid is prompt.grid) for prompt in lanes])
    record: list[tuple[np.ndarray, ...]] = []  # per step: rows' lanes, tokens, steps, bars, beats
    count = 0
    while True:
        sampled = sample_tokens(logits, tables.allowed(state, lowest, until_end), sampling, generators)  # (B,)
        tokens = sampled.cpu().numpy()
        gap = (last == Vocab.SEP) & (tokens >= vocab.duration_offset)
        step = step + np.where(gap, tokens - vocab.duration_offset + 1, 0)
        bar, beat = locate(grids, grid_of, step)
        count += 1
        record.append((rows, tokens, step, bar, beat))
        done = (step >= ends) | (tokens == Vocab.EOS) | (new_tokens is not None and count >= new_tokens)
        if on_token is not None:
            completes = is_note(last, vocab) & (tokens >= vocab.duration_offset)
            for row, lane in enumerate(rows.tolist()):
                if on_token(TokenEvent(lane, int(tokens[row]), int(step[row]), int(bar[row]), bool(completes[row]), count)):
                    done[row] = True
        if done.all():
            break
        state, lowest = tables.advance(state, lowest, sampled)
        inputs = (sampled, torch.as_tensor(bar, device=device), torch.as_tensor(beat, device=device))
        if done.any():
            going = np.flatnonzero(~done)
            index = torch.as_tensor(going, device=device)
            decoder.select(index)
            state, lowest = state[index], lowest[index]
            inputs = tuple(a[index] for a in inputs)
            rows, tokens, step, ends = rows[going], tokens[going], step[going], ends[going]
            grid_of = grid_of[going]
            generators = [generators[row] for row in going]
        last = tokens
        logits = decoder.feed(*(a.view(-1, 1) for a in inputs))

    lane_of, *generated = (np.concatenate(column) for column in zip(*record))
    order = np.argsort(lane_of, kind="stable")  # each lane's tokens, in step order
    split = np.cumsum(np.bincount(lane_of, minlength=len(lanes)))[:-1]
    per_lane = zip(*(np.split(column[order], split) for column in generated))
    return [continuation(prompt, *columns, seed + lane, vocab) for lane, (prompt, columns) in enumerate(zip(lanes, per_lane))]


def locate(grids: list[BarGrid], grid_of: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bar, position in bar) (B,) of each lane's step in its grid `grids[grid_of[b]]`: one call per grid."""
    bars, beats = np.empty_like(steps), np.empty_like(steps)
    for index, grid in enumerate(grids):
        rows = grid_of == index
        bars[rows], beats[rows] = grid.locate(steps[rows])
    return bars, beats


def continuation(prompt: Prompt, tokens: np.ndarray, steps: np.ndarray, bars: np.ndarray, beats: np.ndarray,
                 seed: int, vocab: Vocab) -> Generation:
    seq = prompt.sequence
    sequence = TokenSequence(*(np.concatenate([a, b]).astype(np.int64) for a, b in
                               zip((seq.tokens, seq.steps, seq.bars, seq.beats), (tokens, steps, bars, beats))), prompt.grid)
    return Generation(sequence, len(seq), continuation_start(sequence, len(seq), prompt, vocab), prompt.grid,
                      prompt.tempo_qpm, seed)


def generate(
    trained: LoadedModel,
    prompt: Prompt,
    sampling: SamplingConfig,
    bars: int | None = None,
    new_tokens: int | None = None,
    seconds: float | None = None,
    until_end: bool = False,
    on_token: OnToken | None = None,
) -> Generation:
    """Continue `prompt` once (see `generate_batch`)."""
    return generate_batch(trained, [prompt], sampling, bars=bars, new_tokens=new_tokens, seconds=seconds,
                          until_end=until_end, on_token=on_token)[0]


def continuation_start(sequence: TokenSequence, prompt_length: int, prompt: Prompt, vocab: Vocab) -> int:
    """The prompt's end, or earlier if the model's first note joins the prompt's last bar."""
    new = sequence.tokens[prompt_length:]
    notes = np.flatnonzero(is_note(new, vocab))
    first_note_step = int(sequence.steps[prompt_length + notes[0]]) if notes.size else prompt.end_step
    return min(prompt.end_step, first_note_step)


def generation_score(generation: Generation, tokenizer: SeedTokenizer) -> symusic.Score:
    """The prompt and its continuation as MIDI, with a marker where the continuation starts."""
    score = tokenizer.decode(generation.sequence.tokens, generation.tempo_qpm, generation.grid)
    if generation.prompt_length > 1:
        ticks_per_step = score.ticks_per_quarter // tokenizer.config.steps_per_quarter
        score.markers.append(symusic.TextMeta(generation.continuation_step * ticks_per_step, CONTINUATION_MARKER))
    return score


def write_generation(generation: Generation, tokenizer: SeedTokenizer, path: str | Path) -> symusic.Score:
    score = generation_score(generation, tokenizer)
    if score.note_num() == 0:
        raise MidigenError("the generation holds no notes")
    write_midi(score, path)
    return score

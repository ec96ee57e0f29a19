"""Continuing a prompt (or starting from nothing) with a trained model, token by token."""

from __future__ import annotations

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
from midigen.inference.grammar import Grammar
from midigen.inference.model_files import LoadedModel
from midigen.inference.sampling import SamplingConfig, sample_token
from midigen.model.memory import MemoryState
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
    if not (tokens >= tokenizer.vocab.note_offset).any():
        raise BadMidiError(path, f"the first {bars} bar(s) hold no notes")
    last_bar = int(sequence.bars[-1]) + 1
    return Prompt(tokenizer.with_positions(tokens, grid), grid, first_tempo(notes, tokenizer.config.tempo_qpm),
                  min(bars, last_bar), str(path))


def as_batch(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array), device=device).view(1, -1)


class SlidingWindowDecoder:
    """Incremental decoding with a KV cache, for models without memory: past the context the
    oldest tokens slide out, as they would from a training window."""

    def __init__(self, model: MusicTransformer) -> None:
        self.model = model
        self.room = model.config.context - 1  # cached tokens; the next query is the window's last token
        self.device = next(model.parameters()).device
        # keys/values live in buffers twice the room: appending writes in place, and only when a buffer
        # is full are its newest `room` tokens moved to the front, once every `room` tokens
        self.buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.end = 0

    @torch.inference_mode()
    def __call__(self, tokens: np.ndarray, bars: np.ndarray, beats: np.ndarray) -> torch.Tensor:
        """Feed tokens (T,) and return the logits (V,) for the next one."""
        keep = slice(-(self.room + 1), None)  # only the last window can ever be attended to
        inputs = (as_batch(a[keep], self.device) for a in (tokens, bars, beats))
        output = self.model(*inputs, past=self.cached())
        self.append(output.present)
        return output.logits[0, -1]

    def cached(self) -> list[KV] | None:
        if self.end == 0:
            return None
        start = max(0, self.end - self.room)
        valid = torch.ones(1, self.end - start, dtype=torch.bool, device=self.device)
        return [KV(k[:, :, start : self.end], v[:, :, start : self.end], valid) for k, v in self.buffers]

    def append(self, present: list[KV]) -> None:
        count = present[0].length
        if not self.buffers:
            self.buffers = [(kv.keys.new_empty(*kv.keys.shape[:2], 2 * self.room + count, kv.keys.shape[3]),
                             kv.values.new_empty(*kv.values.shape[:2], 2 * self.room + count, kv.values.shape[3]))
                            for kv in present]
        if self.end + count > self.buffers[0][0].shape[2]:
            kept = min(self.end, self.room)
            for keys, values in self.buffers:
                keys[:, :, :kept] = keys[:, :, self.end - kept : self.end].clone()
                values[:, :, :kept] = values[:, :, self.end - kept : self.end].clone()
            self.end = kept
        for (keys, values), kv in zip(self.buffers, present):
            keys[:, :, self.end : self.end + count] = kv.keys
            values[:, :, self.end : self.end + count] = kv.values
        self.end += count


class MemoryDecoder:
    """Incremental decoding for models with memory, in the segments the model was trained on.

    Tokens of the current segment attend to each other (a KV cache), to the XL memory and to the
    kNN memory; when a segment is full it is pushed into both memories rather than forgotten. A long
    prompt is fed segment by segment the same way, so it fills the memories.
    """

    def __init__(self, model: MusicTransformer) -> None:
        self.model = model
        self.context = model.config.context
        self.device = next(model.parameters()).device
        self.memory = MemoryState(model.config, 1, self.device)
        self.segment: list[KV] | None = None  # keys/values of the current, unfinished segment

    @torch.inference_mode()
    def __call__(self, tokens: np.ndarray, bars: np.ndarray, beats: np.ndarray) -> torch.Tensor:
        first = 0
        while first < len(tokens):
            room = self.context - (self.segment[0].length if self.segment else 0)
            piece = slice(first, first + room)
            output = self.model(*(as_batch(a[piece], self.device) for a in (tokens, bars, beats)),
                                past=self._past(), knn=self.memory.knn)
            self.segment = output.present if self.segment is None else [s.then(n) for s, n in zip(self.segment, output.present)]
            if self.segment[0].length == self.context:
                self.memory.remember(self.segment, torch.ones(1, self.context, dtype=torch.bool, device=self.device))
                self.segment = None
            first += room
        return output.logits[0, -1]

    def _past(self) -> list[KV] | None:
        memory = self.memory.xl.past() if self.memory.xl is not None else None
        if memory is None or self.segment is None:
            return memory or self.segment
        return [m.then(s) for m, s in zip(memory, self.segment)]


@dataclass
class Generation:
    sequence: TokenSequence  # prompt + continuation
    prompt_length: int  # tokens of the prompt
    continuation_step: int  # onset of the first generated note, or the prompt's end if that comes first
    grid: BarGrid
    tempo_qpm: float


def generate(
    trained: LoadedModel,
    prompt: Prompt,
    sampling: SamplingConfig,
    bars: int | None = None,
    new_tokens: int | None = None,
) -> Generation:
    """Continue `prompt` by `bars` bars or by `new_tokens` tokens."""
    if (bars is None) == (new_tokens is None):
        raise MidigenError("give exactly one of --bars or --tokens")
    if (bars is not None and bars < 1) or (new_tokens is not None and new_tokens < 1):
        raise MidigenError("--bars and --tokens must be at least 1")
    tokenizer = SeedTokenizer(trained.tokenizer)
    vocab = tokenizer.vocab
    grammar = Grammar(trained.tokenizer)
    for token in prompt.sequence.tokens.tolist():
        grammar.feed(token)
    generator = torch.Generator().manual_seed(sampling.seed if sampling.seed is not None else int(torch.seed() % 2**63))
    decoder = SlidingWindowDecoder(trained.model) if trained.model_config.memory == "none" else MemoryDecoder(trained.model)
    seq = prompt.sequence
    tokens, steps = seq.tokens.tolist(), seq.steps.tolist()
    bar_list, beat_list = seq.bars.tolist(), seq.beats.tolist()
    end_step = prompt.grid.bar_start(prompt.bars + bars) if bars is not None else None
    logits = decoder(seq.tokens, seq.bars, seq.beats)
    produced = 0
    while True:
        allowed = torch.as_tensor(grammar.allowed(allow_end=False), device=logits.device)
        token = sample_token(logits, allowed, sampling, generator)
        step = steps[-1]
        if tokens[-1] == Vocab.SEP and vocab.is_duration(token):
            step += token - vocab.duration_offset + 1
        bar, beat = (int(a[0]) for a in prompt.grid.locate(np.array([step])))
        tokens.append(token)
        steps.append(step)
        bar_list.append(bar)
        beat_list.append(beat)
        grammar.feed(token)
        produced += 1
        if (new_tokens is not None and produced >= new_tokens) or (end_step is not None and step >= end_step):
            break
        logits = decoder(np.array([token]), np.array([bar]), np.array([beat]))
    sequence = TokenSequence(*(np.array(a, dtype=np.int64) for a in (tokens, steps, bar_list, beat_list)), prompt.grid)
    return Generation(sequence, len(seq), continuation_start(sequence, len(seq), prompt, vocab), prompt.grid,
                      prompt.tempo_qpm)


def continuation_start(sequence: TokenSequence, prompt_length: int, prompt: Prompt, vocab: Vocab) -> int:
    """The prompt's end, or earlier if the model's first note joins the prompt's last bar."""
    new = sequence.tokens[prompt_length:]
    notes = np.flatnonzero((new >= vocab.note_offset) & (new < vocab.duration_offset))
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

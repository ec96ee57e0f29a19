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
from midigen.codec.interface import Tokenizer
from midigen.codec.midi_io import CONTINUATION_MARKER, read_notes, tempo_map, write_midi
from midigen.codec.registry import load_tokenizer
from midigen.codec.timing import BarGrid
from midigen.codec.tokenizer import TokenSequence
from midigen.errors import BadMidiError, MidigenError
from midigen.inference.model_files import LoadedModel
from midigen.inference.sampling import SamplingConfig, sample_tokens
from midigen.model.memory import KnnMemory, MemoryState
from midigen.model.transformer import KV, MusicTransformer

Features = dict[str, torch.Tensor]


@dataclass
class Prompt:
    sequence: TokenSequence  # starts with <sos>; no <eos>
    grid: BarGrid
    tempos: tuple[tuple[int, float], ...]  # (step, quarter notes per minute), the first at step 0
    bars: int  # bars the prompt covers; the continuation starts at the beginning of the next one
    source: str | None = None

    @property
    def end_step(self) -> int:
        return self.grid.bar_start(self.bars)

    @property
    def tempo_qpm(self) -> float:
        """The tempo at the prompt's end, which its continuation keeps."""
        return next(qpm for step, qpm in reversed(self.tempos) if step <= self.end_step)


def empty_prompt(tokenizer: Tokenizer) -> Prompt:
    cfg = tokenizer.config
    grid = BarGrid.default(cfg.steps_per_quarter, cfg.beat_positions)
    return Prompt(tokenizer.with_positions(np.array([Vocab.SOS]), grid), grid, ((0, cfg.tempo_qpm),), 0)


def load_prompt(path: str | Path, bars: int, tokenizer: Tokenizer) -> Prompt:
    """The first `bars` bars of a MIDI file, encoded with the run's tokenizer."""
    if bars < 1:
        raise MidigenError(f"--prompt-bars must be at least 1, got {bars}")
    notes = read_notes(path)
    sequence = tokenizer.encode(notes)
    grid = sequence.grid
    assert grid is not None
    cut = int(np.searchsorted(sequence.steps, grid.bar_start(bars), side="left"))
    while cut > 1 and sequence.tokens[cut - 1] in (Vocab.EOS, Vocab.SEP):
        cut -= 1  # the end, and the gap leading out of the prompt, are the model's to choose
    prompt = sequence.slice(slice(0, cut))
    if not tokenizer.sounding()[prompt.tokens].any():  # a long rest is durations (and gaps) only
        raise BadMidiError(path, f"the first {bars} bar(s) hold no notes")
    last_bar = int(sequence.bars[-1]) + 1
    cfg = tokenizer.config
    tempos = tempo_map(notes, cfg.steps_per_quarter, cfg.tempo_qpm)
    return Prompt(prompt, grid, tempos, min(bars, last_bar), str(path))


def as_batch(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array), device=device).view(1, -1)


def lane_inputs(sequence: TokenSequence, names: Sequence[str], window: slice,
                device: torch.device) -> tuple[torch.Tensor, Features]:
    """A sequence's tokens and its features among `names` in `window`, as a batch of one lane (1, T). (Features
    a token's id implies, such as its pitch class, are not in sequences: the model looks them up.)"""
    return (as_batch(sequence.tokens[window], device),
            {name: as_batch(sequence.features[name][window], device) for name in names if name in sequence.features})


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
    def feed(self, tokens: torch.Tensor, features: Features) -> torch.Tensor:
        """Feed every lane tokens (B, T) with their features (B, T) each and return the logits (B, V) for each lane's
        next one."""
        keep = slice(-(self.room + 1), None)  # only the last window can ever be attended to
        past = self.cache.window(self.cache.held.clamp(max=self.room), self.room)
        output = self.model(tokens[:, keep], {name: value[:, keep] for name, value in features.items()}, past=past)
        self.cache.append(output.present)
        return output.logits[:, -1]

    def __call__(self, sequence: TokenSequence) -> torch.Tensor:
        """Feed a single lane a sequence and return the logits (V,) for its next token."""
        names = list(self.model.config.embeddings)
        return self.feed(*lane_inputs(sequence, names, slice(None), self.device))[0]

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
    def feed(self, tokens: torch.Tensor, features: Features) -> torch.Tensor:
        """Feed every lane tokens (B, T) with their features, which must fit in each lane's current segment; return
        the logits (B, V) for each lane's next token."""
        held = self.cache.held.clone()
        past = self.cache.window(self.spans(held), self.memory_length + self.context - 1)
        output = self.model(tokens, features, past=past, knn=self.memory.knn)
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

    def __call__(self, sequence: TokenSequence) -> torch.Tensor:
        """Feed a single lane a sequence, segment by segment, and return the logits (V,) for its next token."""
        first, names = 0, list(self.model.config.embeddings)
        while first < len(sequence):
            room = self.context - int(self.cache.held[0]) % self.context
            logits = self.feed(*lane_inputs(sequence, names, slice(first, first + room), self.device))
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
    tempos: tuple[tuple[int, float], ...]  # the prompt's tempo map, which the continuation keeps
    seed: int  # this lane's seed: sampled alone with it, the prompt gives this continuation again


@dataclass(frozen=True)
class NoteEvent:
    """A note the model has just completed."""

    step: int  # grid step of its onset
    pitch: int
    length: int  # steps (1 for a drum hit)
    instrument: int  # General MIDI program, or 128 for drums (0 in a single stream)


@dataclass(frozen=True)
class TokenEvent:
    """A token just sampled, as the `on_token` callback of `generate_batch` sees it."""

    lane: int  # index of its generation in the returned list
    token: int
    step: int  # grid step the token is at (after a gap's length: where the next note will start)
    bar: int
    notes: tuple[NoteEvent, ...]  # the notes this token completes (a note's duration, a drum hit), in step order
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
        logits += [decoder(prompt.sequence)] * copies
        decoders += [decoder] * copies
    return decoder_class.stacked(decoders), torch.stack(logits)  # type: ignore[arg-type]


def instrument_choice(tokenizer: Tokenizer, instruments: Sequence[int] | None, device: torch.device) -> torch.Tensor:
    """(V,) bool: the tokens allowed by a choice of instruments (programs, 128 for drums; None: every one)."""
    if instruments is None:
        return torch.ones(tokenizer.vocab.size, dtype=torch.bool, device=device)
    if not tokenizer.config.instruments:
        raise MidigenError("this model's tokenizer keeps no instruments (a single stream): --instruments cannot apply")
    return torch.as_tensor(tokenizer.instrument_tokens(instruments), device=device)


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
    instruments: Sequence[int] | None = None,
    on_token: OnToken | None = None,
) -> list[Generation]:
    """Continue each prompt `num_samples` times, every continuation a lane of one batch.

    Lane i (prompt-major: prompt 0's samples first) samples with seed `sampling.seed + i` and gets the tokens it
    would get alone with that seed (its logits differ from those of a batch of one by float rounding at most). A
    lane stops at the first of: `new_tokens` tokens, the end of `bars` bars after its prompt, `seconds` seconds of
    music at its prompt's tempo, `<eos>` when `until_end` lets the model end the song, or `on_token` returning True
    for one of its tokens (True for every lane's stops the whole batch). `instruments` (programs, 128 for drums)
    restricts what the continuation may play, by a mask inside the grammar. `on_token` sees every sampled token as
    a `TokenEvent`, in step order; the token it stops at is kept. A stopped lane leaves the batch; what it generated
    until then decodes.
    """
    check_length(bars, new_tokens, seconds)
    if num_samples < 1:
        raise MidigenError(f"--num-samples must be at least 1, got {num_samples}")
    if not prompts:
        raise MidigenError("no prompt to continue")
    lanes = [prompt for prompt in prompts for _ in range(num_samples)]
    tokenizer = load_tokenizer(trained.tokenizer)
    config = tokenizer.config
    device = next(trained.model.parameters()).device
    chosen = instrument_choice(tokenizer, instruments, device)
    seed = sampling.seed if sampling.seed is not None else int(torch.seed() % 2**62)
    generators = [torch.Generator().manual_seed(seed + lane) for lane in range(len(lanes))]
    grammar = tokenizer.grammar.on(device)
    state = torch.as_tensor(tokenizer.grammar.states([prompt.sequence.tokens for prompt in lanes]), device=device)
    decoder, logits = prefill(trained.model, list(prompts), num_samples)
    names = [name for name in trained.model.config.embeddings if name in tokenizer.feature_sizes]

    rows = np.arange(len(lanes))  # the lane of each row of the batch
    step = np.array([prompt.sequence.steps[-1] for prompt in lanes])
    ends = np.array([end_step(prompt, bars, seconds, config.steps_per_quarter) for prompt in lanes])
    grids = list({id(prompt.grid): prompt.grid for prompt in lanes}.values())  # distinct grids (most share one)
    grid_of = np.array([next(g for g, grid in enumerate(grids) if grid is prompt.grid) for prompt in lanes])
    record: list[dict[str, np.ndarray]] = []  # per step: rows' lanes, tokens, steps and features
    count = 0
    while True:
        allowed = grammar.allowed(state, until_end) & chosen
        sampled = sample_tokens(logits, allowed, sampling, generators)  # (B,)
        fed = grammar.feed(state, sampled)
        state, tokens = fed.state, sampled.cpu().numpy()
        token_step = step + fed.lead.cpu().numpy()
        before, step = step, step + fed.advance.cpu().numpy()
        bar, beat = locate(grids, grid_of, token_step)
        count += 1
        features = {"bars": bar, "beats": beat} | {name: value.cpu().numpy() for name, value in fed.features.items()}
        record.append({"lane": rows, "tokens": tokens, "steps": token_step}
                      | {name: features[name] for name in tokenizer.feature_sizes})
        done = (step >= ends) | (tokens == Vocab.EOS) | (new_tokens is not None and count >= new_tokens)
        if on_token is not None:
            notes = fed.notes.cpu().numpy()  # (B, N, NOTE_FIELDS)
            for row, lane in enumerate(rows.tolist()):
                completed = tuple(NoteEvent(int(before[row] + offset), int(pitch), int(length), int(program))
                                  for offset, pitch, length, program in notes[row].tolist() if pitch >= 0)
                if on_token(TokenEvent(lane, int(tokens[row]), int(token_step[row]), int(bar[row]), completed, count)):
                    done[row] = True
        if done.all():
            break
        inputs = (sampled, {name: torch.as_tensor(features[name], device=device) for name in names})
        if done.any():
            going = np.flatnonzero(~done)
            index = torch.as_tensor(going, device=device)
            decoder.select(index)
            state = state[index]
            inputs = (sampled[index], {name: value[index] for name, value in inputs[1].items()})
            rows, step, ends, grid_of = rows[going], step[going], ends[going], grid_of[going]
            generators = [generators[row] for row in going]
        logits = decoder.feed(inputs[0].view(-1, 1), {name: value.view(-1, 1) for name, value in inputs[1].items()})

    columns = {name: np.concatenate([entry[name] for entry in record]) for name in record[0]}
    lane_of = columns.pop("lane")
    order = np.argsort(lane_of, kind="stable")  # each lane's tokens, in step order
    split = np.cumsum(np.bincount(lane_of, minlength=len(lanes)))[:-1]
    per_lane = {name: np.split(column[order], split) for name, column in columns.items()}
    return [continuation(prompt, {name: parts[lane] for name, parts in per_lane.items()}, seed + lane, tokenizer)
            for lane, prompt in enumerate(lanes)]


def locate(grids: list[BarGrid], grid_of: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bar, position in bar) (B,) of each lane's step in its grid `grids[grid_of[b]]`: one call per grid."""
    bars, beats = np.empty_like(steps), np.empty_like(steps)
    for index, grid in enumerate(grids):
        rows = grid_of == index
        bars[rows], beats[rows] = grid.locate(steps[rows])
    return bars, beats


def continuation(prompt: Prompt, generated: dict[str, np.ndarray], seed: int, tokenizer: Tokenizer) -> Generation:
    """The prompt followed by what a lane generated (its tokens, steps and features by name)."""
    joined = {name: np.concatenate([array, generated[name]]).astype(np.int64)
              for name, array in prompt.sequence.arrays().items()}
    sequence = TokenSequence.unpacked(joined, prompt.grid)
    prompt_length = len(prompt.sequence)
    return Generation(sequence, prompt_length, continuation_start(sequence, prompt_length, prompt, tokenizer),
                      prompt.grid, prompt.tempos, seed)


def generate(
    trained: LoadedModel,
    prompt: Prompt,
    sampling: SamplingConfig,
    bars: int | None = None,
    new_tokens: int | None = None,
    seconds: float | None = None,
    until_end: bool = False,
    instruments: Sequence[int] | None = None,
    on_token: OnToken | None = None,
) -> Generation:
    """Continue `prompt` once (see `generate_batch`)."""
    return generate_batch(trained, [prompt], sampling, bars=bars, new_tokens=new_tokens, seconds=seconds,
                          until_end=until_end, instruments=instruments, on_token=on_token)[0]


def continuation_start(sequence: TokenSequence, prompt_length: int, prompt: Prompt, tokenizer: Tokenizer) -> int:
    """The prompt's end, or earlier if the model's first note joins the prompt's last bar."""
    new = sequence.tokens[prompt_length:]
    notes = np.flatnonzero(tokenizer.sounding()[new])
    first_note_step = int(sequence.steps[prompt_length + notes[0]]) if notes.size else prompt.end_step
    return min(prompt.end_step, first_note_step)


def generation_score(generation: Generation, tokenizer: Tokenizer) -> symusic.Score:
    """The prompt and its continuation as MIDI, with a marker where the continuation starts."""
    score = tokenizer.decode(generation.sequence.tokens, generation.tempos, generation.grid)
    if generation.prompt_length > 1:
        ticks_per_step = score.ticks_per_quarter // tokenizer.config.steps_per_quarter
        score.markers.append(symusic.TextMeta(generation.continuation_step * ticks_per_step, CONTINUATION_MARKER))
    return score


def write_generation(generation: Generation, tokenizer: Tokenizer, path: str | Path) -> symusic.Score:
    score = generation_score(generation, tokenizer)
    if score.note_num() == 0:
        raise MidigenError("the generation holds no notes")
    write_midi(score, path)
    return score

"""Byte-pair merges for a token store: learned on its training songs with Hugging Face `tokenizers`, then applied to
every song to write a new store (no MIDI is read again).

The learner reads one character per base token (`midigen.codec.bpe.base_text`), with no normaliser and no
pre-tokeniser, so a song's whole body is one word and merges cross onset groups and bars; `split_bars` makes each
bar a word instead, for comparison. Songs stream from the store's memory-mapped arrays; the learner itself keeps
the words it has read, so at most `max_tokens` base tokens of training songs, spread evenly over them, are read.
Ties between equally frequent pairs are broken by the learner's token order, so the merges do not depend on how
often it runs or in which thread.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from midigen.codec.config import MERGING_KINDS
from midigen.codec.bpe import UNMERGED, BpeTokenizer, base_text
from midigen.codec.registry import load_tokenizer
from midigen.codec.sandbox import EncodedSong
from midigen.data.store import StoreWriter, TokenStore, open_finished_store
from midigen.errors import MidigenError
from midigen.workers import ForkSafeProgress

DEFAULT_MAX_TOKENS = 20_000_000  # base tokens the learner reads at most: about 2 GB of its memory


@dataclass
class BpeSummary:
    store: Path
    report: dict[str, Any]
    merges: int  # merged tokens
    learned_from: int  # base tokens of training songs the merges were learned on


def base_store_path(output: str | Path) -> Path:
    """Where `midigen encode --bpe` keeps the store of base tokens the merges are learned on: beside `output`."""
    output = Path(output)
    return output.with_name(f"{output.name}-base")


def training_words(store: TokenStore, split_bars: bool = False,
                   max_tokens: int = DEFAULT_MAX_TOKENS) -> Iterator[str]:
    """The training songs' bodies (without `<sos>`/`<eos>`) as text, one word per song or per bar, from at most
    `max_tokens` base tokens: every song if they fit, else songs spread evenly over the training split."""
    songs = store.split_indices("train")
    total = int(store.songs.lengths[songs].sum())
    share = min(1.0, max_tokens / total) if total else 1.0
    budget = max_tokens
    for rank, index in enumerate(songs):
        # keep `share` of the songs, evenly spaced, while they fit the budget (their lengths differ)
        if int((rank + 1) * share) == int(rank * share) or store.songs.lengths[index] > budget:
            continue
        budget -= int(store.songs.lengths[index])
        song = store.song(index)
        body = ~np.isin(song.tokens, UNMERGED)
        tokens, bars = song.tokens[body], song.bars[body]
        if tokens.size:
            yield from map(base_text, np.split(tokens, np.flatnonzero(np.diff(bars)) + 1) if split_bars else [tokens])


def learn_merges(store: TokenStore, vocab_size: int, split_bars: bool = False,
                 max_tokens: int = DEFAULT_MAX_TOKENS) -> tuple[tuple[tuple[int, int], ...], int]:
    """Merges that grow the store's base vocabulary towards `vocab_size` tokens, and how many base tokens they were
    learned from. A merge whose result some earlier token already spells is left out (the learner may find one
    sequence twice, by two splits), so a few tokens fewer may come out."""
    from tokenizers import Tokenizer, models, trainers

    if store.config.kind not in MERGING_KINDS:
        raise MidigenError(f"{store.root}: {store.config.kind} takes no byte-pair merges ({', '.join(MERGING_KINDS)} do)")
    if store.config.merges:
        raise MidigenError(f"{store.root}: store already holds merged tokens; learn merges on its base store")
    base_size = store.tokenizer.vocab.size
    if vocab_size <= base_size:
        raise MidigenError(f"vocabulary size {vocab_size} must exceed the base vocabulary ({base_size} tokens)")
    learner = Tokenizer(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=[base_text(np.array([token])) for token in range(base_size)])
    read = [0]

    def counted(words: Iterator[str]) -> Iterator[str]:
        for word in words:
            read[0] += len(word)
            yield word

    learner.train_from_iterator(counted(training_words(store, split_bars, max_tokens)), trainer)
    if read[0] == 0:
        raise MidigenError(f"{store.root}: no training songs to learn merges from")
    texts = [base_text(np.array([token])) for token in range(base_size)]
    return merge_pairs(json.loads(learner.to_str())["model"]["merges"], texts), read[0]


def merge_pairs(learned: list[Any], texts: list[str]) -> tuple[tuple[int, int], ...]:
    """A Hugging Face BPE model's merges (its JSON's "merges") as pairs of token ids, given the text of each base
    token (`texts[id]`); a merge whose result an earlier token already spells is left out."""
    ids = {text: token for token, text in enumerate(texts)}
    merges: list[tuple[int, int]] = []
    for merge in learned:
        left, right = merge.split(" ") if isinstance(merge, str) else merge  # "a b" before tokenizers 0.20
        if left + right not in ids:
            ids[left + right] = len(texts) + len(merges)
            merges.append((ids[left], ids[right]))
    return tuple(merges)


def train_store(source: str | Path, output: str | Path, vocab_size: int, split_bars: bool = False,
                max_tokens: int = DEFAULT_MAX_TOKENS, progress: bool = True) -> BpeSummary:
    """Learn merges on `source`'s training songs and write `output`: every song of `source` with the merges
    applied, in the same order and splits (resuming an interrupted write: the merges come out the same)."""
    store = open_finished_store(source)
    merges, learned_from = learn_merges(store, vocab_size, split_bars, max_tokens)
    config = replace(store.config, merges=merges, merges_within_bars=split_bars)
    tokenizer = load_tokenizer(config)
    assert isinstance(tokenizer, BpeTokenizer)
    with StoreWriter(output, config) as writer:
        todo = [index for index, entry in enumerate(store.songs) if not writer.done_before(entry.path)]
        if todo:
            writer.start_update()
        for skip in store.skipped():
            if not writer.done_before(skip.path):
                writer.add_skipped(skip.path, skip.reason)
        with ForkSafeProgress(total=len(todo), unit="song", desc="merge", disable=not progress) as bar:
            for index in todo:
                entry = store.songs[index]
                sequence = tokenizer.merged(store.song(index))
                # the store keeps no counts of merged or clamped notes: only the source's encode knew them
                song = EncodedSong(entry.hash, entry.notes, 0, 0, entry.tempos, entry.time_signatures,
                                   entry.instruments, len(sequence), sequence.pack(tokenizer.array_dtypes))
                writer.add_song(entry.path, entry.split, song)
                bar.update(1)
        report = writer.finish()
    return BpeSummary(Path(output), report, len(merges), learned_from)

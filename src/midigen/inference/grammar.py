"""Which tokens may legally come next, so every generated sequence decodes.

The index score's grammar: after `<sos>` a note or `<sep>`; after a note or `<sep>`, a duration;
after a note's duration, a lower note of the same onset group (or the same pitch again, where the
tokenizer keeps unisons apart), a `<sep>` or `<eos>`; after a gap's duration, a note (a new group),
or another `<sep>` only if the gap was a full `max_duration` piece.
"""

from __future__ import annotations

import numpy as np

from midigen.codec.config import NUM_PITCHES, TokenizerConfig, Vocab


class Grammar:
    """The grammar of token sequences encoded with `config`."""

    def __init__(self, config: TokenizerConfig) -> None:
        self.vocab = vocab = config.vocab
        self.unisons = not config.merge_unisons  # may a group repeat its last pitch?
        self.durations = np.zeros(vocab.size, dtype=bool)
        self.durations[vocab.duration_offset :] = True
        self.reset()

    def reset(self) -> None:
        self.state = "start"
        self.lowest_in_group = NUM_PITCHES  # notes of a group go from high to low pitch

    def feed(self, token: int) -> None:
        """Advance the state with a token (prompt or generated)."""
        vocab = self.vocab
        if token == Vocab.SOS:
            self.reset()
        elif token == Vocab.SEP:
            self.state = "after_sep"
        elif vocab.is_note(token):
            self.state = "after_note"
            self.lowest_in_group = token - vocab.note_offset
        elif vocab.is_duration(token):
            if self.state == "after_sep":
                full_gap = token - vocab.duration_offset + 1 == vocab.max_duration
                self.state = "after_full_gap" if full_gap else "after_gap"
                self.lowest_in_group = NUM_PITCHES
            else:
                self.state = "after_note_duration"
        elif token == Vocab.EOS:
            self.state = "end"

    def allowed(self, allow_end: bool) -> np.ndarray:
        """Boolean mask over the vocabulary of the tokens that may come next."""
        vocab = self.vocab
        mask = np.zeros(vocab.size, dtype=bool)
        if self.state in ("after_note", "after_sep"):
            mask |= self.durations
        elif self.state in ("start", "after_gap", "after_full_gap", "after_note_duration"):
            highest = self.lowest_in_group + (self.unisons and self.lowest_in_group < NUM_PITCHES)  # exclusive
            mask[vocab.note_offset : vocab.note_offset + highest] = True
            if self.state != "after_gap":
                mask[Vocab.SEP] = True
            if allow_end and self.state == "after_note_duration":
                mask[Vocab.EOS] = True
        return mask

    def check(self, tokens: np.ndarray) -> int | None:
        """Index of the first token that breaks the grammar, or None."""
        self.reset()
        for index, token in enumerate(np.asarray(tokens).tolist()):
            if index == 0 and token == Vocab.SOS:
                continue
            if not self.allowed(allow_end=True)[token]:
                return index
            self.feed(token)
        return None

"""Which tokens may legally come next, so every generated sequence decodes.

The index score's grammar: after `<sos>` a note or `<sep>`; after a note or `<sep>`, a duration;
after a note's duration, a lower note of the same onset group (or the same pitch again, where the
tokenizer keeps unisons apart), a `<sep>` or `<eos>`; after a gap's duration, a note (a new group),
or another `<sep>` only if the gap was a full `max_duration` piece.
"""

from __future__ import annotations

import numpy as np
import torch

from midigen.codec.config import NUM_PITCHES, TokenizerConfig, Vocab

STATES = ("start", "after_note", "after_sep", "after_gap", "after_full_gap", "after_note_duration", "end")


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


class GrammarTables:
    """The grammar as tensors on the model's device, for many lanes at once: a lane's state is a pair
    (state code, lowest pitch of its group), advanced and turned into masks by table look-ups.

    The tables are read off `Grammar` itself, state by state and token by token, so both follow one set
    of rules.
    """

    def __init__(self, config: TokenizerConfig, device: torch.device) -> None:
        grammar = Grammar(config)
        size, levels = grammar.vocab.size, NUM_PITCHES + 1  # lowest pitch of a group: 0..127, or none yet
        masks = np.zeros((2, len(STATES), levels, size), dtype=bool)  # (allow_end, state, lowest, V)
        next_state = np.zeros((len(STATES), size), dtype=np.int64)
        next_lowest = np.zeros((len(STATES), size), dtype=np.int64)  # −1: the token leaves it as it was
        for code, state in enumerate(STATES):
            for lowest in range(levels):
                grammar.state, grammar.lowest_in_group = state, lowest
                masks[0, code, lowest], masks[1, code, lowest] = grammar.allowed(False), grammar.allowed(True)
            for token in range(size):
                grammar.state, grammar.lowest_in_group = state, -1
                grammar.feed(token)
                next_state[code, token], next_lowest[code, token] = STATES.index(grammar.state), grammar.lowest_in_group
        self.masks = torch.as_tensor(masks, device=device)
        self.next_state = torch.as_tensor(next_state, device=device)
        self.next_lowest = torch.as_tensor(next_lowest, device=device)

    @staticmethod
    def state_of(grammar: Grammar) -> tuple[int, int]:
        """(state code, lowest pitch) of a `Grammar` fed with a prompt."""
        return STATES.index(grammar.state), grammar.lowest_in_group

    def allowed(self, state: torch.Tensor, lowest: torch.Tensor, allow_end: bool) -> torch.Tensor:
        """state, lowest (B,) → the tokens each lane may take next (B, V) bool."""
        return self.masks[int(allow_end), state, lowest]

    def advance(self, state: torch.Tensor, lowest: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (state, lowest) (B,) of each lane after taking `tokens` (B,)."""
        fed = self.next_lowest[state, tokens]
        return self.next_state[state, tokens], torch.where(fed < 0, lowest, fed)

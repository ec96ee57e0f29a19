"""Which tokens of a song a model can only predict by remembering: repeats of passages out of its sight.

A target token is a *recall* token when the `min_repeat` tokens ending with it repeat, exactly, tokens
that last occurred further back than the model can attend (its window plus its XL memory): local
attention cannot see the earlier passage, so only a long-term memory (the kNN memory) can copy it.
The NLL on these tokens, beside the NLL on the others, is how long-term memory is judged.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

MIN_REPEAT = 16


def recall_targets(tokens: np.ndarray, reach: int, min_repeat: int = MIN_REPEAT) -> np.ndarray:
    """(T,) bool: token i ends a passage of `min_repeat` tokens whose latest earlier occurrence ended more than
    `reach` tokens before i (and never since)."""
    tokens = np.asarray(tokens)
    recall = np.zeros(tokens.size, dtype=bool)
    if tokens.size < min_repeat + 1:
        return recall
    passages = sliding_window_view(tokens.astype(np.int64), min_repeat)  # (T − m + 1, m): passage k ends at k + m − 1
    _, passage_id = np.unique(passages, axis=0, return_inverse=True)
    order = np.argsort(passage_id.ravel(), kind="stable")  # each passage's occurrences in order of position
    same = passage_id.ravel()[order[1:]] == passage_id.ravel()[order[:-1]]
    later, earlier = order[1:][same], order[:-1][same]  # consecutive occurrences of one passage
    far = later - earlier > reach
    recall[later[far] + min_repeat - 1] = True
    return recall

"""midigen: learn music from MIDI files and write more of it."""

__version__ = "0.1.0"

from midigen.codec import (  # noqa: E402
    BarGrid,
    SeedTokenizer,
    TokenizerConfig,
    TokenSequence,
    show_position_score,
    show_sparse_score,
)
from midigen.errors import BadMidiError, MidigenError  # noqa: E402

__all__ = [
    "BadMidiError",
    "BarGrid",
    "MidigenError",
    "SeedTokenizer",
    "TokenSequence",
    "TokenizerConfig",
    "__version__",
    "show_position_score",
    "show_sparse_score",
]

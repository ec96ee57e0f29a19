"""midigen: learn music from MIDI files and write more of it."""

__version__ = "0.3.0"

from midigen.codec import (  # noqa: E402
    BarGrid,
    SeedTokenizer,
    TokenizerConfig,
    TokenSequence,
    load_tokenizer,
    show_position_score,
    show_sparse_score,
)
from midigen.errors import BadMidiError, MidigenError  # noqa: E402



def __getattr__(name: str) -> object:
    # `midigen.load_model` without importing torch for every `import midigen` (the CLI's --help, the codec)
    if name == "load_model":
        from midigen.inference.model_files import load_model

        return load_model
    raise AttributeError(f"module 'midigen' has no attribute {name!r}")


__all__ = [
    "BadMidiError",
    "BarGrid",
    "MidigenError",
    "SeedTokenizer",
    "TokenSequence",
    "TokenizerConfig",
    "__version__",
    "load_model",
    "load_tokenizer",
    "show_position_score",
    "show_sparse_score",
]

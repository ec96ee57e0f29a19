"""The music transformer and its memories."""

from midigen.model.config import MEMORY_MODES, PRESETS, ModelConfig
from midigen.model.transformer import KV, ModelOutput, MusicTransformer

__all__ = ["KV", "MEMORY_MODES", "PRESETS", "ModelConfig", "ModelOutput", "MusicTransformer"]

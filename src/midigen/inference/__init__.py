"""Inference: loading a run or model folder safely, and generating from it. It never imports training."""

from midigen.inference.generate import (Generation, Prompt, TokenEvent, empty_prompt, generate, generate_batch,
                                        load_prompt, write_generation)
from midigen.inference.model_files import LoadedModel, load_model
from midigen.inference.sampling import SamplingConfig

__all__ = ["Generation", "LoadedModel", "Prompt", "SamplingConfig", "TokenEvent", "empty_prompt", "generate",
           "generate_batch", "load_model", "load_prompt", "write_generation"]

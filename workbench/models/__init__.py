"""Model intake: Hugging Face directories, GGUF files, presets and configs with random weights."""

from .cache import fetch, home
from .intake import LoadedModel, ModelSource, load_model, load_tokenizer, load_weights, resolve_source
from .presets import NAMED_MODELS, PRESETS, SUPPORTED_ARCHITECTURES

__all__ = ["LoadedModel", "ModelSource", "NAMED_MODELS", "PRESETS", "SUPPORTED_ARCHITECTURES", "fetch", "home",
           "load_model", "load_tokenizer", "load_weights", "resolve_source"]

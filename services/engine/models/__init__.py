"""Model families."""

from services.engine.models.decoder import DecoderForCausalLM
from services.engine.models.registry import MODEL_CLASSES, build_model

__all__ = ["MODEL_CLASSES", "DecoderForCausalLM", "build_model"]

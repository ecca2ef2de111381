"""Architecture name -> model class."""

from __future__ import annotations

import torch
from torch import nn

from services.engine.config import ARCHITECTURES, ModelConfig
from services.engine.models.decoder import DecoderForCausalLM

MODEL_CLASSES: dict[str, type[nn.Module]] = {arch: DecoderForCausalLM for arch in ARCHITECTURES}


def build_model(
    mc: ModelConfig, max_len: int, attention_backend: str, dtype: torch.dtype, device: torch.device
) -> DecoderForCausalLM:
    """The network with uninitialised parameters, created directly on ``device`` in ``dtype``."""
    cls = MODEL_CLASSES.get(mc.architecture)
    if cls is None:
        raise ValueError(
            f"unsupported model architecture {mc.architecture!r}; "
            f"supported: {sorted(MODEL_CLASSES)}"
        )
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = cls(mc, max_len, attention_backend, device)
    finally:
        torch.set_default_dtype(old)
    return model.eval()

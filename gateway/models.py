"""The models a gateway serves: each one's limits, tokenizer and block names.

A :class:`GatewayModel` reads its limits from the model's config (no weights) when
the gateway starts, and checks that its tokenizer file is there; the tokenizer
itself is built on first use (on a tokenizing thread), so a gateway of many models
starts fast and holds only the tokenizers its clients use.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from gateway.kv_index import prompt_hashes
from gateway.tokenizer import Tokenizer, check_tokenizer, load_tokenizer
from services.common.settings import ClusterSettings, ModelSettings
from services.engine.config import load_model_config


class GatewayModel:
    """One served model (a :class:`~gateway.validation.ModelLike`)."""

    def __init__(self, settings: ModelSettings) -> None:
        config = load_model_config(settings.path)
        check_tokenizer(settings)
        self.settings = settings
        self.name = settings.name
        self.max_model_len = settings.max_model_len or config.max_position_embeddings
        self.vocab_size = config.vocab_size
        self._tokenizer: Tokenizer | None = None
        self._lock = threading.Lock()

    @property
    def block_size(self) -> int:
        return self.settings.block_size

    @property
    def tokenizer_loaded(self) -> bool:
        return self._tokenizer is not None

    @property
    def tokenizer(self) -> Tokenizer:
        """Built at the first call (thread-safe); later calls return the same one."""
        if self._tokenizer is None:
            with self._lock:
                if self._tokenizer is None:
                    self._tokenizer = load_tokenizer(self.settings)
        return self._tokenizer

    def name_blocks(self, token_ids: Sequence[int], cache_salt: str = "") -> tuple[bytes, ...]:
        """The prompt's full-block hashes as this model's workers name them (model id,
        block size, dtype)."""
        m = self.settings
        return prompt_hashes(token_ids, m.name, m.block_size, m.dtype, cache_salt)

    def __repr__(self) -> str:
        return f"GatewayModel({self.name!r}, path={self.settings.path!r})"


def gateway_models(settings: ClusterSettings) -> list[GatewayModel]:
    """Every model of the cluster, in config order."""
    return [GatewayModel(m) for m in settings.served_models()]

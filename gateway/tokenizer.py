"""The gateway's tokenizer: HF ``tokenizers`` plus what ``tokenizer_config.json`` says.

A :class:`Tokenizer` wraps a ``tokenizers.Tokenizer`` loaded from a
``tokenizer.json`` and reads, from the files beside it, the chat template
(``tokenizer_config.json`` ``chat_template`` or ``chat_template.jinja``), the
bos/eos tokens, and the eos ids (``generation_config.json`` / ``config.json``
``eos_token_id``). :func:`load_tokenizer` finds the right one for a model.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from services.common.settings import ModelSettings
from services.engine import byte_tokenizer

DUMMY_PREFIX = "dummy:"


class TokenizerError(RuntimeError):
    """A tokenizer that cannot be found or read."""


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: not readable JSON: {e}") from e
    return data if isinstance(data, dict) else {}


def _ids(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _chat_template(config: dict[str, Any], directory: Path) -> str | None:
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    tmpl = config.get("chat_template")
    if isinstance(tmpl, str):
        return tmpl
    if isinstance(tmpl, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
        chosen = named.get("default") or next(iter(named.values()), None)
        return chosen if isinstance(chosen, str) else None
    return None


def _bound_word_cache(hf: tokenizers.Tokenizer) -> None:
    """Turns off the BPE word cache of a tokenizer that does not split text into words.

    BPE caches the tokens of every word it sees, up to 10,000 words. A pre-tokenizer
    that leaves the text whole (the byte-level tokenizer of ``dummy:*`` models, or
    none at all) makes every prompt one "word": the cache then keeps up to 10,000
    whole prompts, the gateway's ~2.8 KB of native memory per request."""
    model = hf.model
    if not isinstance(model, tokenizers.models.BPE):
        return
    pre = hf.pre_tokenizer
    if pre is None or len(pre.pre_tokenize_str("split me")) < 2:
        model._resize_cache(0)


class Tokenizer:
    """Text <-> token ids for one model, with its special tokens and chat template."""

    def __init__(
        self,
        hf: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        eos_token_ids: Iterable[int] = (),
        chat_template: str | None = None,
        name: str = "",
    ) -> None:
        self._hf = hf
        _bound_word_cache(hf)
        self.name = name
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template
        ids: list[int] = []
        if eos_token is not None:
            tid = hf.token_to_id(eos_token)
            if tid is not None:
                ids.append(tid)
        for i in eos_token_ids:
            if i not in ids:
                ids.append(int(i))
        self._eos_token_ids = tuple(ids)
        self._vocab_size = hf.get_vocab_size(with_added_tokens=True)
        specials = sorted((t.content for t in hf.get_added_tokens_decoder().values()
                           if t.special), key=len, reverse=True)
        self._special_text = re.compile("|".join(map(re.escape, specials))) if specials else None
        self._as_text: tokenizers.Tokenizer | None = None  # made on first use
        self._as_text_lock = threading.Lock()

    # -- construction -----------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Loads ``tokenizer.json`` at ``path`` (or in the directory ``path``) and the
        ``tokenizer_config.json`` / ``generation_config.json`` / ``config.json`` beside it."""
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise TokenizerError(f"tokenizer file {p} does not exist")
        try:
            hf = tokenizers.Tokenizer.from_file(str(p))
        except Exception as e:  # the Rust side raises plain Exception
            raise TokenizerError(f"{p}: not a valid tokenizer.json: {e}") from e
        d = p.parent
        cfg = _read_json(d / "tokenizer_config.json")
        eos_ids = _ids(_read_json(d / "generation_config.json").get("eos_token_id"))
        eos_ids += _ids(_read_json(d / "config.json").get("eos_token_id"))
        return cls(
            hf,
            bos_token=_token_content(cfg.get("bos_token")),
            eos_token=_token_content(cfg.get("eos_token")),
            eos_token_ids=eos_ids,
            chat_template=_chat_template(cfg, d),
            name=str(d),
        )

    @classmethod
    def byte_level(cls) -> Tokenizer:
        """The built-in byte tokenizer of ``dummy:*`` models."""
        return cls(
            byte_tokenizer.build_byte_tokenizer(),
            bos_token=byte_tokenizer.BOS_TOKEN,
            eos_token=byte_tokenizer.EOS_TOKEN,
            chat_template=byte_tokenizer.DEFAULT_CHAT_TEMPLATE,
            name="byte-level",
        )

    # -- use ------------------------------------------------------------------------

    @property
    def hf(self) -> tokenizers.Tokenizer:
        return self._hf

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos_token_ids

    @property
    def vocab_size(self) -> int:
        """Number of ids, added/special tokens included."""
        return self._vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``. ``add_special_tokens`` runs the tokenizer's
        post-processor (e.g. Llama's leading bos); pass False for text that a chat
        template rendered, which already carries its special tokens."""
        return self._hf.encode(text, add_special_tokens=add_special_tokens).ids

    def has_special_text(self, text: str) -> bool:
        """Whether ``text`` spells one of the special tokens (``</s>``, ``<|im_start|>``...)."""
        return self._special_text is not None and self._special_text.search(text) is not None

    def encode_as_text(self, text: str) -> list[int]:
        """Token ids of ``text`` with special-token spellings tokenized as plain text:
        for user content, which must never become a control token."""
        if not self.has_special_text(text):
            return self.encode(text, add_special_tokens=False)
        with self._as_text_lock:
            if self._as_text is None:
                clone = tokenizers.Tokenizer.from_str(self._hf.to_str())
                clone.encode_special_tokens = True
                self._as_text = clone
        return self._as_text.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; an incomplete UTF-8 character at the end comes out as U+FFFD."""
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eos={self.eos_token_ids})"


def tokenizer_path(model: ModelSettings) -> Path | None:
    """Where ``model``'s tokenizer.json is: ``model.tokenizer`` if set, else beside the
    weights; None for a ``dummy:*`` model without one (it uses the byte tokenizer)."""
    if model.tokenizer:
        return Path(model.tokenizer)
    if model.path.startswith(DUMMY_PREFIX):
        return None
    return Path(model.path) / "tokenizer.json"


def check_tokenizer(model: ModelSettings) -> Path | None:
    """:func:`tokenizer_path`, which must exist; raises :class:`TokenizerError` (what to
    set) when it does not. Cheap: nothing is read."""
    path = tokenizer_path(model)
    if path is not None and not path.exists():
        where = "model.tokenizer" if model.tokenizer else f"model.path ({model.path})"
        raise TokenizerError(
            f"model {model.name!r}: no tokenizer at {path}; set {where} to a "
            "directory holding tokenizer.json or to the file itself"
        )
    return path


def load_tokenizer(model: ModelSettings) -> Tokenizer:
    """The tokenizer of ``model``; raises :class:`TokenizerError` when it is missing."""
    path = check_tokenizer(model)
    return Tokenizer.byte_level() if path is None else Tokenizer.from_file(path)

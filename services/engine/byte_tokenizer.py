"""The built-in byte-level tokenizer of ``dummy:*`` models (no torch here).

Token ids 0..255 are the bytes 0..255, so any text round-trips exactly; three
special tokens follow: ``<s>`` = 256 (bos), ``</s>`` = 257 (eos), ``<pad>`` = 258.
It is an ordinary HF ``tokenizers`` tokenizer (a byte-level BPE with no merges),
so the gateway loads it like any other ``tokenizer.json``, and
:func:`write_byte_tokenizer` writes it out with a ``tokenizer_config.json``
carrying a tiny chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

NUM_BYTES = 256
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
BOS_ID = 256
EOS_ID = 257
PAD_ID = 258
VOCAB_SIZE = 259

# One line per message, then the assistant's header when a reply is wanted.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for every byte (what ByteLevel uses)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(NUM_BYTES):
        if b not in mapping:
            mapping[b] = chr(NUM_BYTES + extra)
            extra += 1
    return mapping


def build_byte_tokenizer() -> Tokenizer:
    """A fresh byte-level ``tokenizers.Tokenizer``: byte b -> id b, then the specials."""
    vocab = {ch: b for b, ch in _byte_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    added = tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)]
    )
    if added != 3 or tok.token_to_id(BOS_TOKEN) != BOS_ID or tok.token_to_id(PAD_TOKEN) != PAD_ID:
        raise RuntimeError("byte tokenizer: special token ids are not 256..258")
    return tok


def tokenizer_config() -> dict[str, object]:
    """What goes into ``tokenizer_config.json`` beside the byte tokenizer."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_bos_token": False,
        "model_max_length": 1 << 30,
        "chat_template": DEFAULT_CHAT_TEMPLATE,
    }


def write_byte_tokenizer(directory: str | Path) -> Path:
    """Writes ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory``
    (created if missing); returns the path of ``tokenizer.json``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / "tokenizer.json"
    build_byte_tokenizer().save(str(path))
    (d / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    return path

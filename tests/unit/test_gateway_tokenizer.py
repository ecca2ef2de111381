"""The gateway tokenizer and the built-in byte tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.tokenizer import Tokenizer, TokenizerError, load_tokenizer, tokenizer_path
from services.common.settings import ModelSettings
from services.engine import byte_tokenizer as bt

TEXTS = ["", "hello", "héllo wörld 日本語 🙂", "\x00\x01\x7f\n\t ", "a" * 1000]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.byte_level()


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_ids_are_bytes_and_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_byte_tokenizer_specials(tok: Tokenizer) -> None:
    assert (bt.BOS_ID, bt.EOS_ID, bt.PAD_ID) == (256, 257, 258)
    assert tok.vocab_size == bt.VOCAB_SIZE == 259
    assert tok.eos_token_ids == (257,)
    assert tok.encode("<s>hi</s>") == [256, 104, 105, 257]
    assert tok.decode([256, 104, 105, 257]) == "hi"
    assert tok.decode([256, 104, 105, 257], skip_special_tokens=False) == "<s>hi</s>"
    assert tok.chat_template and tok.bos_token == "<s>" and tok.eos_token == "</s>"


def test_partial_utf8_decodes_to_replacement_char(tok: Tokenizer) -> None:
    b = "日".encode()
    assert tok.decode(list(b[:2])) == "\ufffd"
    assert tok.decode(list(b)) == "日"


def test_write_and_load_byte_tokenizer(tmp_path: Path) -> None:
    path = bt.write_byte_tokenizer(tmp_path / "tok")
    assert path.name == "tokenizer.json" and (path.parent / "tokenizer_config.json").is_file()
    t = Tokenizer.from_file(path.parent)  # a directory works too
    text = "héllo wörld 日本語 🙂"
    assert t.encode(text) == list(text.encode())
    assert t.eos_token_ids == (257,)
    assert t.chat_template == bt.DEFAULT_CHAT_TEMPLATE
    assert t.vocab_size == 259


def test_eos_ids_from_generation_config_and_config(tmp_path: Path) -> None:
    bt.write_byte_tokenizer(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [257, 10]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 13}))
    t = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert t.eos_token_ids == (257, 10, 13)


def test_added_token_dict_and_template_list(tmp_path: Path) -> None:
    bt.write_byte_tokenizer(tmp_path)
    cfg = {
        "eos_token": {"content": "</s>", "special": True},
        "bos_token": {"content": "<s>"},
        "chat_template": [
            {"name": "tool_use", "template": "T"},
            {"name": "default", "template": "D"},
        ],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    t = Tokenizer.from_file(tmp_path)
    assert t.eos_token == "</s>" and t.bos_token == "<s>" and t.chat_template == "D"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert Tokenizer.from_file(tmp_path).chat_template == "J"


def test_no_tokenizer_config_means_no_template(tmp_path: Path) -> None:
    bt.build_byte_tokenizer().save(str(tmp_path / "tokenizer.json"))
    t = Tokenizer.from_file(tmp_path)
    assert t.chat_template is None and t.eos_token_ids == ()


def test_load_tokenizer_dummy_and_paths(tmp_path: Path) -> None:
    t = load_tokenizer(ModelSettings(path="dummy:tiny-llama"))
    assert t.vocab_size == 259
    assert tokenizer_path(ModelSettings(path="dummy:x")) is None

    bt.write_byte_tokenizer(tmp_path / "m")
    t = load_tokenizer(ModelSettings(path=str(tmp_path / "m")))
    assert t.encode("ab") == [97, 98]
    t = load_tokenizer(
        ModelSettings(path="dummy:x", tokenizer=str(tmp_path / "m" / "tokenizer.json"))
    )
    assert t.eos_token_ids == (257,)


def test_load_tokenizer_missing_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="no tokenizer at"):
        load_tokenizer(ModelSettings(name="m", path=str(tmp_path)))
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        Tokenizer.from_file(bad)


def _rss_kib() -> int:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0])


def test_unique_prompts_do_not_pile_up_in_the_word_cache() -> None:
    """The byte tokenizer keeps a prompt whole as one BPE "word": cached, each unique
    prompt cost ~1-3 KB of native memory for good (issue 7, the gateway's growth)."""
    tok = Tokenizer.byte_level()
    for i in range(500):
        tok.encode(f"warm-up prompt number {i} " * 3)
    before = _rss_kib()
    for i in range(4000):
        tok.encode(f"a unique prompt, number {i} " * 3)
    assert _rss_kib() - before < 1024  # was ~5 MiB

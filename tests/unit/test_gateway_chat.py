"""Chat templates."""

from __future__ import annotations

import pytest

from gateway.chat import ChatError, normalize_messages, render_chat
from services.engine.byte_tokenizer import DEFAULT_CHAT_TEMPLATE
from splitserve.v1 import generation_pb2

LLAMA3_LIKE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
STRICT = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
    "{% endif %}{{ m['content'] }}\n{% endfor %}"
)


def test_default_template_with_protos() -> None:
    msgs = [
        generation_pb2.ChatMessage(role="system", content="Be brief."),
        generation_pb2.ChatMessage(role="user", content="Hi 🙂"),
    ]
    text = render_chat(msgs, DEFAULT_CHAT_TEMPLATE, bos_token="<s>", eos_token="</s>")
    assert text == "<s><|system|>\nBe brief.</s>\n<|user|>\nHi 🙂</s>\n<|assistant|>\n"


def test_generation_prompt_and_dicts() -> None:
    msgs = [{"role": "user", "content": "  hello  "}]
    text = render_chat(msgs, LLAMA3_LIKE, bos_token="<|begin_of_text|>")
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhello")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    no_prompt = render_chat(msgs, LLAMA3_LIKE, add_generation_prompt=False)
    assert no_prompt.endswith("<|eot_id|>")


def test_no_template_is_a_clear_error() -> None:
    with pytest.raises(ChatError, match="model 'm' has no chat template") as e:
        render_chat([{"role": "user", "content": "x"}], None, model="m")
    assert "prompt_token_ids" in str(e.value)


@pytest.mark.parametrize(
    ("msgs", "match", "field"),
    [
        ([], "chat.messages must not be empty", "chat.messages"),
        ([{"role": "bot", "content": "x"}], r"chat.messages\[0\].role must be one of", None),
        (
            [{"role": "user", "content": "x"}, {"role": "", "content": "y"}],
            r"chat.messages\[1\].role",
            "chat.messages[1].role",
        ),
        ([{"role": "user", "content": 3}], r"chat.messages\[0\].content", None),
    ],
)
def test_roles_validated(msgs: list, match: str, field: str | None) -> None:
    with pytest.raises(ChatError, match=match) as e:
        normalize_messages(msgs)
    if field:
        assert e.value.field == field


def test_template_raise_exception_is_a_chat_error() -> None:
    ok = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert render_chat(ok, STRICT) == "a\nb\n"
    with pytest.raises(ChatError, match="roles must alternate"):
        render_chat(list(reversed(ok)), STRICT)


def test_sandbox_blocks_unsafe_access() -> None:
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatError):
        render_chat([{"role": "user", "content": "x"}], evil)


def test_broken_template() -> None:
    with pytest.raises(ChatError, match="does not compile"):
        render_chat([{"role": "user", "content": "x"}], "{% for %}")

"""Chat messages -> prompt text, with the model's jinja2 chat template.

The template runs in jinja2's immutable sandbox, as HF ``transformers`` runs it:
``messages``, ``add_generation_prompt=True``, ``bos_token``/``eos_token``, and the
helpers ``raise_exception`` and ``strftime_now`` that real templates call.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant", "tool")
MAX_MESSAGES = 4096
# Stands for message i's content while rendering (private-use characters: no template
# or tokenizer gives them meaning), so the template's own text can be told apart.
_PLACEHOLDER = "\ue000{}\ue001"
_PLACEHOLDER_RE = re.compile("\ue000(\\d+)\ue001")


class ChatError(ValueError):
    """A chat the model cannot render: a client error (INVALID_ARGUMENT).
    ``field`` names the offending request field, e.g. ``chat.messages[2].role``."""

    def __init__(self, message: str, field: str = "chat") -> None:
        super().__init__(message)
        self.field = field


class _MessageLike(Protocol):
    role: str
    content: str


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def normalize_messages(
    messages: Sequence[_MessageLike | Mapping[str, Any]],
) -> list[dict[str, str]]:
    """Checks roles and contents; returns plain ``{"role", "content"}`` dicts."""
    if len(messages) == 0:
        raise ChatError("chat.messages must not be empty", "chat.messages")
    if len(messages) > MAX_MESSAGES:
        raise ChatError(
            f"chat.messages has {len(messages)} messages; at most {MAX_MESSAGES} are allowed",
            "chat.messages",
        )
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if isinstance(m, Mapping):
            role, content = m.get("role"), m.get("content")
        else:
            role, content = getattr(m, "role", None), getattr(m, "content", None)
        if role not in ROLES:
            raise ChatError(
                f"chat.messages[{i}].role must be one of {', '.join(ROLES)}; got {role!r}",
                f"chat.messages[{i}].role",
            )
        if not isinstance(content, str):
            raise ChatError(
                f"chat.messages[{i}].content must be a string", f"chat.messages[{i}].content"
            )
        out.append({"role": role, "content": content})
    return out


def render_chat(
    messages: Sequence[_MessageLike | Mapping[str, Any]],
    template: str | None,
    *,
    bos_token: str | None = None,
    eos_token: str | None = None,
    add_generation_prompt: bool = True,
    model: str = "",
) -> str:
    """Prompt text of ``messages`` (``ChatMessage`` protos or dicts) under ``template``.

    Raises :class:`ChatError` for bad roles, a model without a chat template, or a
    template that rejects the conversation (``raise_exception``) or fails to render."""
    msgs = normalize_messages(messages)
    return _render(msgs, template, bos_token, eos_token, add_generation_prompt, model)


def render_chat_parts(
    messages: Sequence[_MessageLike | Mapping[str, Any]],
    render: Callable[[list[dict[str, str]]], str],
) -> list[tuple[str, bool]]:
    """The chat as ``render`` (e.g. :func:`render_chat` with the model's template)
    renders it, in ``(text, is_message_content)`` pieces: the template's own text
    (which may hold special tokens) apart from the messages' contents (which must be
    tokenized as plain text). A content the template transforms is given verbatim."""
    msgs = normalize_messages(messages)
    text = render([{**m, "content": _PLACEHOLDER.format(i)} for i, m in enumerate(msgs)])
    parts: list[tuple[str, bool]] = []
    for i, piece in enumerate(_PLACEHOLDER_RE.split(text)):
        if i % 2:
            parts.append((msgs[int(piece)]["content"], True))
        elif piece:
            parts.append((piece, False))
    return parts


def _render(msgs: list[dict[str, str]], template: str | None, bos_token: str | None,
            eos_token: str | None, add_generation_prompt: bool, model: str) -> str:
    who = f"model {model!r}" if model else "this model"
    if not template:
        raise ChatError(
            f"{who} has no chat template (tokenizer_config.json has no chat_template); "
            "send a plain prompt or prompt_token_ids instead of chat"
        )
    try:
        compiled = _compile(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatError(f"{who} has a chat template that does not compile: {e}") from e
    try:
        return compiled.render(
            messages=msgs,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token or "",
            eos_token=eos_token or "",
        )
    except jinja2.exceptions.TemplateError as e:
        raise ChatError(f"chat rejected by {who}'s chat template: {e}") from e
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise ChatError(f"{who}'s chat template failed on this chat: {e}") from e

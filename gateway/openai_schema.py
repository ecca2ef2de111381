"""OpenAI request bodies (``/v1/completions``, ``/v1/chat/completions``) -> the
``GenerateRequest`` the gRPC front takes.

Only the shape is checked here: JSON types, the fields this gateway knows, and the
OpenAI features it does not offer (``n`` > 1, logprobs, tools...), each refused with
the field named in :attr:`SchemaError.param`. Ranges and limits (temperature, top_p,
max_tokens against the context, prompt size, token ids against the vocabulary) are
the shared validation's, after this, exactly as for a gRPC request.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from gateway.validation import RequestError
from splitserve.v1 import common_pb2, generation_pb2

UINT32_MAX = (1 << 32) - 1
UINT64_MAX = (1 << 64) - 1
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default (the gRPC API's is 0, greedy)

# Accepted and not acted on: they describe the caller, not the generation.
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "prompt_cache_key"})
# OpenAI features not offered: accepted only at their "off" values.
UNSUPPORTED_UNLESS = {
    "logprobs": (None, False), "top_logprobs": (None,), "echo": (None, False),
    "suffix": (None, ""), "best_of": (None, 1), "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0), "logit_bias": (None, {}), "tools": (None, []),
    "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}), "parallel_tool_calls": (None, True, False),
}
COMMON = frozenset({
    "model", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream",
    "stream_options", "ignore_eos", "top_k", "stop_token_ids", "cache_salt",
    "return_token_ids", "session_id", "end_session",
})
COMPLETION_FIELDS = COMMON | {"prompt"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens"}
CHAT_ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role


class SchemaError(RequestError):
    """A body this front cannot take: INVALID_ARGUMENT, with the offending field."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, message)
        self.param = param


@dataclass(frozen=True)
class ParsedRequest:
    request: generation_pb2.GenerateRequest
    chat: bool
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage
    return_token_ids: bool  # an extra (as vLLM's): choices[].token_ids


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SchemaError(f"the request body is not valid JSON ({e}); send a JSON object "
                          "with Content-Type: application/json", None) from e
    if not isinstance(data, dict):
        raise SchemaError(f"the request body must be a JSON object, got {_kind(data)}", None)
    return data


def _kind(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _check_fields(data: Mapping[str, Any], known: frozenset[str]) -> None:
    for name, value in data.items():
        if name in known or name in IGNORED:
            continue
        if name in UNSUPPORTED_UNLESS:
            if value not in UNSUPPORTED_UNLESS[name]:
                raise SchemaError(f"{name} is not supported by this server; leave it out", name)
            continue
        accepted = ", ".join(sorted(known))
        raise SchemaError(f"unknown field {name!r}; this endpoint accepts: {accepted}", name)


def _integer(data: Mapping[str, Any], name: str, lo: int, hi: int) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SchemaError(f"{name} must be an integer, got {_kind(value)}", name)
    if not lo <= value <= hi:
        raise SchemaError(f"{name} must be in [{lo}, {hi}], got {value}", name)
    return value


def _number(data: Mapping[str, Any], name: str) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SchemaError(f"{name} must be a number, got {_kind(value)}", name)
    return float(value)


def _boolean(data: Mapping[str, Any], name: str) -> bool:
    value = data.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise SchemaError(f"{name} must be true or false, got {_kind(value)}", name)
    return value


def _string(data: Mapping[str, Any], name: str) -> str:
    value = data.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise SchemaError(f"{name} must be a string, got {_kind(value)}", name)
    return value


def _token_ids(value: Any, name: str) -> list[int] | None:
    """``value`` as token ids when it is a non-empty array of integers, else None."""
    if not isinstance(value, list) or not value:
        return None
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return None
    for i, t in enumerate(value):
        if not 0 <= t <= UINT32_MAX:
            raise SchemaError(f"{name}[{i}] = {t} is not a token id (ids are >= 0)", name)
    return value


def _stop_strings(data: Mapping[str, Any]) -> list[str]:
    stop = data.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop
    raise SchemaError(f"stop must be a string or an array of strings, got {_kind(stop)}",
                      "stop")


def _sampling(data: Mapping[str, Any], max_tokens: int | None) -> common_pb2.SamplingParams:
    temperature = _number(data, "temperature")
    sp = common_pb2.SamplingParams(
        max_tokens=max_tokens or 0,
        temperature=DEFAULT_TEMPERATURE if temperature is None else temperature,
        top_p=_number(data, "top_p") or 0.0,
        top_k=_integer(data, "top_k", -1, (1 << 31) - 1) or 0,
        stop=_stop_strings(data),
        ignore_eos=_boolean(data, "ignore_eos"),
    )
    seed = _integer(data, "seed", 0, UINT64_MAX)
    if seed is not None:
        sp.seed = seed
    stop_ids = data.get("stop_token_ids")
    if stop_ids is not None:
        ids = _token_ids(stop_ids, "stop_token_ids") if stop_ids else []
        if ids is None:
            raise SchemaError("stop_token_ids must be an array of token ids", "stop_token_ids")
        sp.stop_token_ids.extend(ids)
    return sp


def _stream_flags(data: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = _boolean(data, "stream")
    options = data.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise SchemaError("stream_options is only allowed with stream: true", "stream_options")
    if not isinstance(options, dict):
        raise SchemaError(f"stream_options must be an object, got {_kind(options)}",
                          "stream_options")
    unknown = sorted(set(options) - {"include_usage", "continuous_usage_stats"})
    if unknown:
        raise SchemaError(f"stream_options: unknown key(s) {unknown}; known: include_usage",
                          "stream_options")
    return stream, _boolean(options, "include_usage")


def _parse_common(data: dict[str, Any], max_tokens_field: str,
                  req: generation_pb2.GenerateRequest, chat: bool) -> ParsedRequest:
    n = _integer(data, "n", 1, UINT32_MAX)
    if n not in (None, 1):
        raise SchemaError(f"n must be 1: this server returns one choice per request, got "
                          f"n={n}; send {n} requests instead", "n")
    req.model = _string(data, "model")
    req.cache_salt = _string(data, "cache_salt")
    req.session_id = _string(data, "session_id")  # extras: a conversation's KV kept between
    req.end_session = _boolean(data, "end_session")  # turns (see gateway/sessions.py)
    max_tokens = _integer(data, max_tokens_field, 1, UINT32_MAX)
    if max_tokens is None and max_tokens_field != "max_tokens":  # the older chat name
        max_tokens = _integer(data, "max_tokens", 1, UINT32_MAX)
    req.sampling.CopyFrom(_sampling(data, max_tokens))
    stream, include_usage = _stream_flags(data)
    return ParsedRequest(req, chat, stream, include_usage, _boolean(data, "return_token_ids"))


def parse_completion(body: bytes) -> ParsedRequest:
    """A ``/v1/completions`` body: ``prompt`` is a string or an array of token ids (or
    an array holding one of those)."""
    data = _json_object(body)
    _check_fields(data, COMPLETION_FIELDS)
    req = generation_pb2.GenerateRequest()
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    ids = _token_ids(prompt, "prompt")
    if isinstance(prompt, str):
        req.prompt = prompt
    elif ids is not None:
        req.prompt_token_ids.ids.extend(ids)
    elif isinstance(prompt, list) and len(prompt) > 1 and not isinstance(prompt[0], int):
        raise SchemaError(f"prompt holds {len(prompt)} prompts: this server takes one prompt "
                          "per request; send one request per prompt", "prompt")
    else:
        raise SchemaError("prompt is required: a string or a non-empty array of token ids, "
                          f"got {_kind(prompt)}", "prompt")
    return _parse_common(data, "max_tokens", req, chat=False)


def parse_chat(body: bytes) -> ParsedRequest:
    """A ``/v1/chat/completions`` body: ``messages`` with string contents or text parts."""
    data = _json_object(body)
    _check_fields(data, CHAT_FIELDS)
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise SchemaError("messages is required: a non-empty array of "
                          "{role, content} objects", "messages")
    req = generation_pb2.GenerateRequest()
    for i, m in enumerate(messages):
        req.chat.messages.append(_chat_message(m, i))
    return _parse_common(data, "max_completion_tokens", req, chat=True)


def _chat_message(m: Any, i: int) -> generation_pb2.ChatMessage:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise SchemaError(f"{where} must be an object with role and content, got {_kind(m)}",
                          where)
    role = m.get("role")
    if not isinstance(role, str):
        raise SchemaError(f"{where}.role must be a string, got {_kind(role)}", f"{where}.role")
    return generation_pb2.ChatMessage(role=CHAT_ROLE_ALIASES.get(role, role),
                                      content=_content_text(m.get("content"), where))


def _content_text(content: Any, where: str) -> str:
    """A message's content: a string, null, or an array of text parts (joined)."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise SchemaError(f"{where}.content must be a string or an array of text parts, "
                          f"got {_kind(content)}", f"{where}.content")
    texts = []
    for j, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") == "text"
                and isinstance(part.get("text"), str)):
            raise SchemaError(f"{where}.content[{j}] is not a text part "
                              '({"type": "text", "text": "..."}); this server takes text only',
                              f"{where}.content")
        texts.append(part["text"])
    return "".join(texts)

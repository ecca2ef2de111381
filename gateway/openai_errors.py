"""The gateway's refusals in OpenAI's error shape and HTTP statuses.

A refusal carries a gRPC status and a message written for the gRPC API (it names
fields such as ``sampling.top_p``); here the status becomes the HTTP one, the field
names become the OpenAI request's (``top_p``), and the first field named becomes
the error's ``param``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import grpc

# gRPC status -> (HTTP status, OpenAI error type, error code)
STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error", "conflict"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable", "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout", "deadline_exceeded"),
    grpc.StatusCode.CANCELLED: (499, "cancelled", "cancelled"),
}
INTERNAL = (500, "server_error", None)

# The gRPC API's field names in messages -> the OpenAI request's, longest first.
FIELD_NAMES = (
    ("sampling.stop_token_ids", "stop_token_ids"), ("sampling.max_tokens", "max_tokens"),
    ("sampling.temperature", "temperature"), ("sampling.top_p", "top_p"),
    ("sampling.top_k", "top_k"), ("sampling.stop", "stop"),
    ("prompt_token_ids.ids", "prompt"), ("prompt_token_ids", "prompt"),
    ("chat (message contents)", "messages"), ("chat.messages", "messages"),
)
PARAMS = ("max_tokens", "messages", "prompt", "temperature", "top_p", "top_k",
          "stop_token_ids", "stop", "model", "cache_salt", "request_id")
_FIRST_WORD = re.compile(r"[a-z_]+")


@dataclass
class OpenAIError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: tuple[tuple[str, str], ...] = ()

    def body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}

    def json_bytes(self) -> bytes:
        return json.dumps(self.body()).encode()


def openai_message(message: str, chat: bool) -> str:
    for grpc_name, openai_name in FIELD_NAMES:
        if chat and grpc_name.startswith("prompt"):
            continue  # a chat's "prompt" is its rendered messages: keep the word
        message = message.replace(grpc_name, openai_name)
    return message


def param_of(message: str) -> str | None:
    """The request field a (translated) message is about: max_tokens when it asks to
    change that, else the field it starts with, else None."""
    if "max_tokens" in message:
        return "max_tokens"
    first = _FIRST_WORD.match(message)
    return first.group() if first and first.group() in PARAMS else None


def retry_after_headers(trailing: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """``retry-after-ms`` (the gRPC trailer) as HTTP headers: ``Retry-After`` in whole
    seconds, and ``retry-after-ms`` which the official clients read first."""
    for key, value in trailing:
        if key == "retry-after-ms" and value.isdigit():
            seconds = max(1, math.ceil(int(value) / 1000))
            return (("retry-after", str(seconds)), ("retry-after-ms", value))
    return ()


def from_status(code: grpc.StatusCode, message: str, *, chat: bool = False,
                param: str | None = None,
                trailing: tuple[tuple[str, str], ...] = ()) -> OpenAIError:
    status, kind, error_code = STATUS.get(code, INTERNAL)
    text = openai_message(message, chat)
    headers = retry_after_headers(trailing)
    if status == 503 and not headers:
        headers = (("retry-after", "1"),)
    param = param or param_of(text)
    if chat and param == "prompt":
        param = "messages"  # a chat's prompt is its rendered messages
    return OpenAIError(status, text, kind, param, error_code, headers)

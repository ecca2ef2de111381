"""The gateway's ``GenerateResponse`` stream as OpenAI answers: one completion object,
or the chunks of a streamed one (``text_completion`` / ``chat.completion.chunk``)."""

from __future__ import annotations

import time
from typing import Any

from gateway.openai_schema import ParsedRequest
from splitserve.v1 import common_pb2, generation_pb2

FINISH_REASONS = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
}


def usage_object(usage: common_pb2.Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


class Answer:
    """Collects one request's responses; says what to send for each of them."""

    def __init__(self, parsed: ParsedRequest, model: str) -> None:
        self.parsed, self.model = parsed, model
        self.created = int(time.time())
        self.request_id = ""
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.usage: common_pb2.Usage | None = None
        self._role_sent = False

    @property
    def id(self) -> str:
        return ("chatcmpl-" if self.parsed.chat else "cmpl-") + self.request_id

    def add(self, msg: generation_pb2.GenerateResponse) -> dict[str, Any] | None:
        """Takes one response; returns the chunk to stream for it (None: nothing new)."""
        self.request_id = self.request_id or msg.request_id
        self.text.append(msg.text)
        self.token_ids += msg.token_ids
        if msg.finish_reason:
            self.finish_reason = FINISH_REASONS.get(msg.finish_reason, "stop")
            self.usage = msg.usage
        if not (msg.text or msg.token_ids or msg.finish_reason):
            return None
        choice = self._delta(msg.text) | {"index": 0, "finish_reason": None, "logprobs": None}
        if msg.finish_reason:
            choice["finish_reason"] = self.finish_reason
        if self.parsed.return_token_ids:
            choice["token_ids"] = list(msg.token_ids)
        return self._envelope(chunk=True, choices=[choice])

    def _delta(self, text: str) -> dict[str, Any]:
        if not self.parsed.chat:
            return {"text": text}
        delta: dict[str, Any] = {"content": text}
        if not self._role_sent:
            delta["role"] = "assistant"
            self._role_sent = True
        return {"delta": delta}

    def usage_chunk(self) -> dict[str, Any] | None:
        """The last chunk of a stream when the client asked for usage."""
        if not (self.parsed.include_usage and self.usage is not None):
            return None
        return self._envelope(chunk=True, choices=[], usage=usage_object(self.usage))

    def complete(self) -> dict[str, Any]:
        """The whole answer, for a request that did not stream."""
        text = "".join(self.text)
        choice: dict[str, Any] = {"index": 0, "finish_reason": self.finish_reason,
                                  "logprobs": None}
        if self.parsed.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        if self.parsed.return_token_ids:
            choice["token_ids"] = self.token_ids
        usage = usage_object(self.usage or common_pb2.Usage())
        return self._envelope(chunk=False, choices=[choice], usage=usage)

    def _envelope(self, *, chunk: bool, choices: list[dict[str, Any]],
                  usage: dict[str, Any] | None = None) -> dict[str, Any]:
        if self.parsed.chat:
            kind = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            kind = "text_completion"
        out: dict[str, Any] = {"id": self.id, "object": kind, "created": self.created,
                               "model": self.model, "choices": choices}
        if usage is not None or (chunk and self.parsed.include_usage):
            out["usage"] = usage
        return out

"""Checks a ``GenerateRequest`` field by field and turns it into a :class:`ValidatedRequest`.

Every problem raises :class:`RequestError` with the gRPC status the server should
answer and a message that names the field and says what to fix, e.g.
``sampling.top_p must be in (0, 1], got 1.5``. The prompt is tokenized here
(:func:`prepare_prompt`), so length limits see real token counts. The server runs
the checks in two steps: :func:`precheck` (every field, and the input's size against
:class:`InputLimits`, all before any tokenizing) and, once tokenized off the event
loop, :func:`complete`.
"""

from __future__ import annotations

import functools
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from gateway.chat import ChatError, render_chat, render_chat_parts
from gateway.tokenizer import Tokenizer
from services.common.proto_ids import ids_list
from splitserve.v1 import common_pb2, generation_pb2

DEFAULT_MAX_TOKENS = 16
MAX_TEMPERATURE = 100.0
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 64
MAX_ID_CHARS = 128
MAX_CACHE_SALT_CHARS = 256
PRIORITY_NORMAL = common_pb2.PRIORITY_CLASS_NORMAL


class RequestError(Exception):
    """A request the gateway refuses: ``code`` is the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


class ModelLike(Protocol):
    """What validation needs to know about a served model (a :class:`ServedModel`,
    or anything with these attributes)."""

    name: str
    max_model_len: int
    vocab_size: int


@dataclass(frozen=True)
class ServedModel:
    """A model this gateway serves. ``vocab_size`` bounds token ids a client may
    send; ``tokenizer`` (optional) tokenizes prompts and chats."""

    name: str
    max_model_len: int
    vocab_size: int
    tokenizer: Tokenizer | None = None


@dataclass(frozen=True)
class ValidatedRequest:
    """A request that passed every check, with defaults filled in."""

    request_id: str
    model: str
    prompt_token_ids: list[int]
    max_tokens: int
    temperature: float = 0.0  # 0 -> greedy
    top_p: float = 1.0  # in (0, 1]
    top_k: int = 0  # 0 -> off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    priority: int = PRIORITY_NORMAL  # a PriorityClass value, never UNSPECIFIED
    deadline_ms: int | None = None
    session_id: str = ""
    end_session: bool = False  # the session's kept KV goes when this request ends
    input_kind: str = "prompt"  # "prompt" | "prompt_token_ids" | "chat"
    request_id_assigned: bool = False  # True when the client sent none
    cache_salt: str = ""  # as the client sent it (the tenant's salt is added by the server)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def sampling_params(self) -> common_pb2.SamplingParams:
        """The normalized sampling parameters for the workers (stop strings stay in the
        gateway but travel along so a worker may log them)."""
        sp = common_pb2.SamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            stop=list(self.stop),
            stop_token_ids=list(self.stop_token_ids),
            ignore_eos=self.ignore_eos,
        )
        if self.seed is not None:
            sp.seed = self.seed
        return sp


def _fmt(x: float) -> str:
    return f"{x:g}"


def check_id(value: str, name: str) -> None:
    """``request_id`` / ``session_id``: at most 128 characters, printable."""
    if len(value) > MAX_ID_CHARS:
        raise invalid(f"{name} must be at most {MAX_ID_CHARS} characters, got {len(value)}")
    for i, ch in enumerate(value):
        if not ch.isprintable():
            raise invalid(
                f"{name} must not contain control characters "
                f"(found U+{ord(ch):04X} at position {i})"
            )


def resolve_model(name: str, models: ModelLike | Sequence[ModelLike]) -> ModelLike:
    """The served model called ``name``; an empty name picks the only model served.
    Unknown -> NOT_FOUND listing the served models."""
    served = list(models) if isinstance(models, Sequence) else [models]
    names = ", ".join(m.name for m in served) or "(none)"
    if not name:
        if len(served) == 1:
            return served[0]
        raise invalid(f"model is required: this gateway serves {names}")
    for m in served:
        if m.name == name:
            return m
    raise RequestError(
        grpc.StatusCode.NOT_FOUND, f"model {name!r} is not served here; served models: {names}"
    )


def check_token_ids(ids: Sequence[int], vocab_size: int, name: str) -> None:
    if not ids or max(ids) < vocab_size:  # builtins: C speed on long prompts
        return
    for i, t in enumerate(ids):
        if t >= vocab_size:
            raise invalid(
                f"{name}[{i}] = {t} is out of range: the model's vocabulary has "
                f"{vocab_size} tokens (ids 0..{vocab_size - 1})"
            )


def _check_priority(value: int) -> int:
    if value not in common_pb2.PriorityClass.values():
        known = ", ".join(common_pb2.PriorityClass.keys())
        raise invalid(f"priority {value} is not a known PriorityClass; use one of {known}")
    return PRIORITY_NORMAL if value == common_pb2.PRIORITY_CLASS_UNSPECIFIED else value


def _check_sampling(sp: common_pb2.SamplingParams, vocab_size: int) -> dict[str, Any]:
    t = sp.temperature
    if math.isnan(t) or t < 0 or t > MAX_TEMPERATURE:
        raise invalid(
            f"sampling.temperature must be in [0, {_fmt(MAX_TEMPERATURE)}] "
            f"(0 = greedy), got {_fmt(t)}"
        )
    p = sp.top_p
    if math.isnan(p) or p < 0 or p > 1:
        raise invalid(f"sampling.top_p must be in (0, 1] (0 = default 1.0), got {_fmt(p)}")
    if sp.top_k < -1:
        raise invalid(f"sampling.top_k must be -1 or 0 (off) or positive, got {sp.top_k}")
    if len(sp.stop) > MAX_STOP_STRINGS:
        raise invalid(
            f"sampling.stop has {len(sp.stop)} strings; at most {MAX_STOP_STRINGS} are allowed"
        )
    for i, s in enumerate(sp.stop):
        if not s:
            raise invalid(f"sampling.stop[{i}] is empty; stop strings must not be empty")
        if len(s) > MAX_STOP_STRING_CHARS:
            raise invalid(
                f"sampling.stop[{i}] has {len(s)} characters; "
                f"at most {MAX_STOP_STRING_CHARS} are allowed"
            )
    if len(sp.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise invalid(
            f"sampling.stop_token_ids has {len(sp.stop_token_ids)} ids; "
            f"at most {MAX_STOP_TOKEN_IDS} are allowed"
        )
    check_token_ids(sp.stop_token_ids, vocab_size, "sampling.stop_token_ids")
    return {
        "temperature": float(t),
        "top_p": 1.0 if p == 0 else float(p),
        "top_k": max(sp.top_k, 0),
        "seed": sp.seed if sp.HasField("seed") else None,
        "stop": tuple(dict.fromkeys(sp.stop)),
        "stop_token_ids": tuple(dict.fromkeys(sp.stop_token_ids)),
        "ignore_eos": bool(sp.ignore_eos),
    }


def prepare_prompt(
    req: generation_pb2.GenerateRequest,
    tokenizer: Tokenizer | None,
    *,
    vocab_size: int | None = None,
    model_name: str = "",
) -> list[int]:
    """Token ids of the request's input: ``prompt`` encoded (with the tokenizer's
    special tokens), ``chat`` rendered with the chat template then encoded, or
    ``prompt_token_ids`` as given (checked against ``vocab_size`` when known)."""
    kind = req.WhichOneof("input")
    if kind is None:
        raise invalid("input is required: set one of prompt, prompt_token_ids or chat")
    if kind == "prompt_token_ids":
        ids = ids_list(req.prompt_token_ids.ids)
        if not ids:
            raise invalid("prompt_token_ids.ids must not be empty")
        if vocab_size is not None:
            check_token_ids(ids, vocab_size, "prompt_token_ids.ids")
        return ids
    if kind == "prompt" and not req.prompt:
        raise invalid("prompt must not be empty")
    if tokenizer is None:
        who = f"model {model_name!r}" if model_name else "this model"
        raise invalid(f"{who} has no tokenizer here; send prompt_token_ids instead of {kind}")
    if kind == "prompt":
        ids = tokenizer.encode(req.prompt, add_special_tokens=True)
    else:
        try:
            ids = encode_chat(req.chat.messages, tokenizer, model_name)
        except ChatError as e:
            raise invalid(str(e)) from e
    if not ids:
        raise invalid(f"{kind} tokenizes to no tokens")
    return ids


def encode_chat(messages: Sequence[generation_pb2.ChatMessage], tokenizer: Tokenizer,
                model_name: str = "") -> list[int]:
    """Token ids of a chat: special tokens only where the chat template puts them.
    A content that spells a special token (``</s>``, ``<|im_start|>``...) is tokenized
    as plain text, so a user cannot forge role boundaries."""
    render = functools.partial(render_chat, template=tokenizer.chat_template,
                               bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
                               model=model_name)
    if not any(tokenizer.has_special_text(m.content) for m in messages):
        return tokenizer.encode(render(messages), add_special_tokens=False)
    ids: list[int] = []
    for text, is_content in render_chat_parts(messages, render):
        ids += (tokenizer.encode_as_text(text) if is_content
                else tokenizer.encode(text, add_special_tokens=False))
    return ids


@dataclass(frozen=True)
class InputLimits:
    """Bounds on a request's input, checked before any tokenizing (GatewaySettings)."""

    max_prompt_bytes: int = 1 << 20
    max_chat_messages: int = 1024


def _too_big(what: str, size: int, limit: int, setting: str, fix: str) -> RequestError:
    return invalid(f"{what} is {size} bytes, over the gateway's limit of {limit} bytes "
                   f"(gateway.{setting}); {fix}")


def check_input_size(req: generation_pb2.GenerateRequest, limits: InputLimits,
                     max_model_len: int) -> None:
    """Refuses an input too large to tokenize, by bytes and message counts only."""
    kind = req.WhichOneof("input")
    limit = limits.max_prompt_bytes
    if kind == "prompt":
        # More characters than bytes allowed cannot fit; else count the UTF-8 bytes.
        size = len(req.prompt) if len(req.prompt) > limit else len(req.prompt.encode())
        if size > limit:
            raise _too_big("prompt", size, limit, "max_prompt_bytes", "shorten the prompt")
    elif kind == "chat":
        n = len(req.chat.messages)
        if n > limits.max_chat_messages:
            raise invalid(f"chat.messages has {n} messages, over the gateway's limit of "
                          f"{limits.max_chat_messages} (gateway.max_chat_messages); "
                          "send fewer messages")
        size = 0
        for m in req.chat.messages:
            size += len(m.content) if len(m.content) > limit else len(m.content.encode())
            if size > limit:
                raise _too_big("chat (message contents)", size, limit, "max_prompt_bytes",
                               "shorten the conversation")
    elif kind == "prompt_token_ids" and len(req.prompt_token_ids.ids) >= max_model_len:
        _check_prompt_len(len(req.prompt_token_ids.ids), max_model_len)


def _check_prompt_len(n: int, limit: int) -> None:
    if n >= limit:
        raise invalid(
            f"prompt is {n} tokens, which leaves no room to generate within the model's "
            f"max_model_len of {limit} tokens; shorten the prompt to at most {limit - 1} tokens"
        )


@dataclass(frozen=True)
class Prechecked:
    """A request whose fields passed every check that needs no tokenizer."""

    request: generation_pb2.GenerateRequest
    model: ModelLike
    priority: int
    sampling: dict[str, Any]


def precheck(
    req: generation_pb2.GenerateRequest,
    models: ModelLike | Sequence[ModelLike],
    limits: InputLimits | None = None,
) -> Prechecked:
    """Every check short of tokenizing: ids, model, priority, sampling, input size.
    Raises :class:`RequestError` (INVALID_ARGUMENT or NOT_FOUND)."""
    check_id(req.request_id, "request_id")
    check_id(req.session_id, "session_id")
    if req.end_session and not req.session_id:
        raise invalid("end_session needs the session_id of the session to end")
    if len(req.cache_salt) > MAX_CACHE_SALT_CHARS:
        raise invalid(f"cache_salt must be at most {MAX_CACHE_SALT_CHARS} characters, "
                      f"got {len(req.cache_salt)}")
    model = resolve_model(req.model, models)
    priority = _check_priority(req.priority)
    sampling = _check_sampling(req.sampling, model.vocab_size)
    check_input_size(req, limits or InputLimits(), int(model.max_model_len))
    return Prechecked(req, model, priority, sampling)


def tokenize(pre: Prechecked, tokenizer: Tokenizer | None = None) -> list[int]:
    """The prompt's token ids (``tokenizer``, else the model's own)."""
    tok = tokenizer if tokenizer is not None else getattr(pre.model, "tokenizer", None)
    return prepare_prompt(pre.request, tok, vocab_size=pre.model.vocab_size,
                          model_name=pre.model.name)


def complete(pre: Prechecked, ids: list[int]) -> ValidatedRequest:
    """The checks that need the token count; the request with its defaults filled in."""
    req = pre.request
    limit = int(pre.model.max_model_len)
    n = len(ids)
    _check_prompt_len(n, limit)
    max_tokens = req.sampling.max_tokens
    if max_tokens == 0:
        max_tokens = min(DEFAULT_MAX_TOKENS, limit - n)
    elif n + max_tokens > limit:
        raise invalid(
            f"prompt ({n} tokens) + sampling.max_tokens ({max_tokens}) = {n + max_tokens} "
            f"exceeds the model's max_model_len of {limit} tokens; "
            f"set sampling.max_tokens to at most {limit - n} or shorten the prompt"
        )
    return ValidatedRequest(
        request_id=req.request_id or uuid.uuid4().hex,
        model=pre.model.name,
        prompt_token_ids=ids,
        max_tokens=max_tokens,
        priority=pre.priority,
        deadline_ms=req.deadline_ms or None,
        session_id=req.session_id,
        end_session=req.end_session,
        input_kind=req.WhichOneof("input") or "",
        request_id_assigned=not req.request_id,
        cache_salt=req.cache_salt,
        **pre.sampling,
    )


def validate_request(
    req: generation_pb2.GenerateRequest,
    models: ModelLike | Sequence[ModelLike],
    tokenizer: Tokenizer | None = None,
    limits: InputLimits | None = None,
) -> ValidatedRequest:
    """Checks every field of ``req`` against the served ``models``; tokenizes with
    ``tokenizer`` (default: the model's own ``tokenizer`` attribute, if any).
    Raises :class:`RequestError` (INVALID_ARGUMENT or NOT_FOUND)."""
    pre = precheck(req, models, limits)
    return complete(pre, tokenize(pre, tokenizer))

"""The OpenAI front's pieces without a cluster: bodies -> GenerateRequest, refusals ->
OpenAI errors, responses -> OpenAI answers and chunks; and the shared validation
still judges what the schema lets through."""

from __future__ import annotations

import json

import grpc
import pytest

from gateway.openai_answer import Answer
from gateway.openai_errors import from_status
from gateway.openai_schema import SchemaError, parse_chat, parse_completion
from gateway.validation import RequestError, ServedModel, precheck
from splitserve.v1 import common_pb2, generation_pb2


def body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def test_completion_with_token_ids_and_sampling() -> None:
    parsed = parse_completion(body(model="m", prompt=[1, 2, 3], max_tokens=5, temperature=0,
                                   top_p=0.5, stop="END", seed=7, ignore_eos=True,
                                   stream=True, stream_options={"include_usage": True}))
    req = parsed.request
    assert list(req.prompt_token_ids.ids) == [1, 2, 3]
    sp = req.sampling
    assert (sp.max_tokens, sp.temperature, sp.top_p, list(sp.stop), sp.seed, sp.ignore_eos) \
        == (5, 0.0, 0.5, ["END"], 7, True)
    assert parsed.stream and parsed.include_usage and not parsed.chat


def test_completion_defaults_follow_openai() -> None:
    parsed = parse_completion(body(model="m", prompt=["hello"]))  # a batch of one
    assert parsed.request.prompt == "hello"
    assert parsed.request.sampling.temperature == 1.0  # OpenAI's default, not greedy
    assert not parsed.request.sampling.HasField("seed")
    assert not parsed.stream


def test_chat_messages_text_parts_and_developer_role() -> None:
    parsed = parse_chat(body(model="m", max_completion_tokens=3, messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"},
                                     {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None}]))
    msgs = parsed.request.chat.messages
    assert [(m.role, m.content) for m in msgs] == [("system", "be brief"), ("user", "ab"),
                                                  ("assistant", "")]
    assert parsed.request.sampling.max_tokens == 3 and parsed.chat


@pytest.mark.parametrize(("fields", "param", "words"), [
    ({"n": 3}, "n", "n must be 1"),
    ({"max_tokens": -1}, "max_tokens", "max_tokens must be in [1,"),
    ({"temperature": "hot"}, "temperature", "temperature must be a number"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed with"),
    ({"stop": [1]}, "stop", "stop must be a string or an array"),
    ({"seed": -1}, "seed", "seed must be in [0,"),
    ({"prompt": []}, "prompt", "prompt is required"),
    ({"prompt": [1, -2]}, "prompt", "prompt[1] = -2 is not a token id"),
    ({"echo": True}, "echo", "not supported"),
    ({"color": "red"}, "color", "unknown field 'color'"),
])
def test_completion_shape_errors_name_the_field(fields: dict, param: str, words: str) -> None:
    with pytest.raises(SchemaError) as err:
        parse_completion(body(**({"model": "m", "prompt": "x"} | fields)))
    assert err.value.param == param
    assert words in err.value.message
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_not_json_and_image_parts_are_refused() -> None:
    with pytest.raises(SchemaError, match="not valid JSON"):
        parse_completion(b"{")
    with pytest.raises(SchemaError, match="must be a JSON object"):
        parse_completion(b"[1]")
    image = {"type": "image_url", "image_url": {"url": "x"}}
    with pytest.raises(SchemaError) as err:
        parse_chat(body(model="m", messages=[{"role": "user", "content": [image]}]))
    assert err.value.param == "messages[0].content"


def test_ranges_are_left_to_the_shared_validation() -> None:
    parsed = parse_completion(body(model="m", prompt="x", top_p=1.5))
    with pytest.raises(RequestError) as err:
        precheck(parsed.request, ServedModel("m", 64, 512))
    openai_error = from_status(err.value.code, err.value.message)
    assert openai_error.status == 400
    assert openai_error.param == "top_p"
    assert openai_error.message.startswith("top_p must be in (0, 1]")


@pytest.mark.parametrize(("code", "status", "kind"), [
    (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
    (grpc.StatusCode.UNAUTHENTICATED, 401, "invalid_request_error"),
    (grpc.StatusCode.NOT_FOUND, 404, "invalid_request_error"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
    (grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable"),
    (grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout"),
    (grpc.StatusCode.INTERNAL, 500, "server_error"),
])
def test_statuses(code: grpc.StatusCode, status: int, kind: str) -> None:
    error = from_status(code, "whatever")
    assert (error.status, error.type) == (status, kind)
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}


def test_retry_after_from_the_admission_trailer() -> None:
    error = from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full",
                        trailing=(("retry-after-ms", "1500"),))
    assert dict(error.headers) == {"retry-after": "2", "retry-after-ms": "1500"}
    assert dict(from_status(grpc.StatusCode.UNAVAILABLE, "x").headers) == {"retry-after": "1"}


def test_max_tokens_and_chat_prompt_params() -> None:
    msg = ("prompt (60 tokens) + sampling.max_tokens (10) = 70 exceeds the model's "
           "max_model_len of 64 tokens; set sampling.max_tokens to at most 4")
    error = from_status(grpc.StatusCode.INVALID_ARGUMENT, msg)
    assert error.param == "max_tokens" and "sampling." not in error.message
    too_long = "prompt is 70 tokens, which leaves no room to generate"
    assert from_status(grpc.StatusCode.INVALID_ARGUMENT, too_long, chat=True).param \
        == "messages"


def _responses() -> list[generation_pb2.GenerateResponse]:
    usage = common_pb2.Usage(prompt_tokens=5, completion_tokens=3, cached_tokens=4)
    return [generation_pb2.GenerateResponse(request_id="r1", token_ids=[10], text="He"),
            generation_pb2.GenerateResponse(request_id="r1", token_ids=[11, 12], text="llo"),
            generation_pb2.GenerateResponse(request_id="r1", text="!", usage=usage,
                                            finish_reason=common_pb2.FINISH_REASON_LENGTH)]


def test_chat_answer_whole_and_streamed() -> None:
    parsed = parse_chat(body(model="m", stream=True, return_token_ids=True,
                             stream_options={"include_usage": True},
                             messages=[{"role": "user", "content": "hi"}]))
    answer = Answer(parsed, "m")
    chunks = [answer.add(r) for r in _responses()]
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"content": "He", "role": "assistant"}, {"content": "llo"}, {"content": "!"}]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "length"]
    assert chunks[1]["choices"][0]["token_ids"] == [11, 12]
    assert chunks[0]["id"] == "chatcmpl-r1" and chunks[0]["object"] == "chat.completion.chunk"
    last = answer.usage_chunk()
    assert last["choices"] == [] and last["usage"]["prompt_tokens_details"] == {
        "cached_tokens": 4}
    whole = answer.complete()
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "Hello!"}
    assert whole["usage"]["total_tokens"] == 8


def test_completion_answer_without_usage_chunk() -> None:
    answer = Answer(parse_completion(body(model="m", prompt="x", stream=True)), "m")
    chunks = [answer.add(r) for r in _responses()]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Hello!"
    assert "usage" not in chunks[0] and answer.usage_chunk() is None
    assert answer.complete()["choices"][0]["text"] == "Hello!"

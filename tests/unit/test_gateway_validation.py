"""Request validation: every field, every error code, messages that name the field."""

from __future__ import annotations

import math

import grpc
import pytest

from gateway.tokenizer import Tokenizer
from gateway.validation import (
    DEFAULT_MAX_TOKENS,
    RequestError,
    ServedModel,
    prepare_prompt,
    validate_request,
)
from splitserve.v1 import common_pb2, generation_pb2

INVALID = grpc.StatusCode.INVALID_ARGUMENT
TOK = Tokenizer.byte_level()
MODEL = ServedModel("tiny", max_model_len=64, vocab_size=512, tokenizer=TOK)
OTHER = ServedModel("other", max_model_len=128, vocab_size=1000)


def req(**kw) -> generation_pb2.GenerateRequest:
    sampling = kw.pop("sampling", None)
    r = generation_pb2.GenerateRequest(**kw)
    if sampling:
        r.sampling.CopyFrom(common_pb2.SamplingParams(**sampling))
    return r


def prompt(**kw) -> generation_pb2.GenerateRequest:
    kw.setdefault("model", "tiny")
    kw.setdefault("prompt", "hello")
    return req(**kw)


def refused(r: generation_pb2.GenerateRequest, code=INVALID, models=(MODEL, OTHER)) -> str:
    with pytest.raises(RequestError) as e:
        validate_request(r, list(models))
    assert e.value.code == code, e.value.message
    return e.value.message


def test_defaults() -> None:
    v = validate_request(prompt(), [MODEL])
    assert v.prompt_token_ids == list(b"hello")
    assert v.max_tokens == DEFAULT_MAX_TOKENS
    assert (v.temperature, v.top_p, v.top_k, v.seed) == (0.0, 1.0, 0, None)
    assert v.priority == common_pb2.PRIORITY_CLASS_NORMAL
    assert v.deadline_ms is None and v.stop == () and not v.ignore_eos
    assert v.request_id and v.request_id_assigned and v.input_kind == "prompt"
    assert v.num_prompt_tokens == 5


def test_everything_set() -> None:
    r = prompt(
        request_id="req-1",
        session_id="sess 1",
        priority=common_pb2.PRIORITY_CLASS_HIGH,
        deadline_ms=500,
        sampling=dict(
            max_tokens=10, temperature=0.7, top_p=0.9, top_k=-1, seed=7,
            stop=["\n\n", "END", "END"], stop_token_ids=[257], ignore_eos=True,
        ),
    )  # fmt: skip
    v = validate_request(r, [MODEL])
    assert v.request_id == "req-1" and not v.request_id_assigned and v.session_id == "sess 1"
    assert v.priority == common_pb2.PRIORITY_CLASS_HIGH and v.deadline_ms == 500
    assert v.max_tokens == 10 and math.isclose(v.temperature, 0.7, rel_tol=1e-6)
    assert math.isclose(v.top_p, 0.9, rel_tol=1e-6) and v.top_k == 0 and v.seed == 7
    assert v.stop == ("\n\n", "END") and v.stop_token_ids == (257,) and v.ignore_eos
    sp = v.sampling_params()
    assert sp.max_tokens == 10 and sp.HasField("seed") and sp.seed == 7 and sp.top_p > 0.89


def test_prompt_token_ids_and_chat() -> None:
    v = validate_request(req(prompt_token_ids=generation_pb2.TokenIds(ids=[1, 2, 511])), [MODEL])
    assert v.prompt_token_ids == [1, 2, 511] and v.input_kind == "prompt_token_ids"
    chat = generation_pb2.ChatMessages(
        messages=[generation_pb2.ChatMessage(role="user", content="hi")]
    )
    v = validate_request(req(chat=chat), [MODEL])
    assert TOK.decode(v.prompt_token_ids, skip_special_tokens=False) == (
        "<s><|user|>\nhi</s>\n<|assistant|>\n"
    )
    assert v.prompt_token_ids[0] == 256  # <s> parsed as the special token, not bytes


def test_empty_model_name() -> None:
    assert validate_request(req(prompt="x"), [MODEL]).model == "tiny"
    assert validate_request(req(prompt="x"), MODEL).model == "tiny"  # one model, no list
    msg = refused(req(prompt="x"))
    assert "model is required" in msg and "tiny, other" in msg


def test_unknown_model_not_found_lists_served() -> None:
    msg = refused(prompt(model="gpt-9"), code=grpc.StatusCode.NOT_FOUND)
    assert "'gpt-9'" in msg and "tiny, other" in msg


@pytest.mark.parametrize(
    ("r", "field"),
    [
        (req(model="tiny"), "input is required"),
        (prompt(prompt=""), "prompt must not be empty"),
        (req(model="tiny", prompt_token_ids=generation_pb2.TokenIds()), "prompt_token_ids.ids"),
        (req(model="tiny", chat=generation_pb2.ChatMessages()), "chat.messages must not be empty"),
        (
            req(
                model="tiny",
                chat=generation_pb2.ChatMessages(
                    messages=[generation_pb2.ChatMessage(role="robot", content="x")]
                ),
            ),
            "chat.messages[0].role",
        ),
    ],
)
def test_input_errors(r: generation_pb2.GenerateRequest, field: str) -> None:
    assert field in refused(r)


def test_token_id_out_of_vocab() -> None:
    msg = refused(req(model="tiny", prompt_token_ids=generation_pb2.TokenIds(ids=[5, 512])))
    assert "prompt_token_ids.ids[1] = 512" in msg and "512 tokens" in msg
    msg = refused(prompt(sampling=dict(stop_token_ids=[600])))
    assert "sampling.stop_token_ids[0] = 600" in msg


def test_text_input_without_tokenizer() -> None:
    msg = refused(prompt(model="other"))
    assert "no tokenizer" in msg and "prompt_token_ids" in msg
    ok = req(model="other", prompt_token_ids=generation_pb2.TokenIds(ids=[999]))
    assert validate_request(ok, [MODEL, OTHER]).prompt_token_ids == [999]


def test_chat_without_template() -> None:
    bare = Tokenizer(TOK.hf)  # no chat template
    chat = generation_pb2.ChatMessages(
        messages=[generation_pb2.ChatMessage(role="user", content="x")]
    )
    with pytest.raises(RequestError) as e:
        validate_request(req(chat=chat), [MODEL], tokenizer=bare)
    assert e.value.code == INVALID and "no chat template" in e.value.message


def test_length_limits() -> None:
    long_ids = generation_pb2.TokenIds(ids=[1] * 64)
    msg = refused(req(model="tiny", prompt_token_ids=long_ids))
    assert "prompt is 64 tokens" in msg and "max_model_len of 64" in msg
    msg = refused(req(model="tiny", prompt_token_ids=generation_pb2.TokenIds(ids=[1] * 100)))
    assert "prompt is 100 tokens" in msg
    # prompt (5 tokens) + 60 = 65 > 64: both numbers and the limit in the message
    msg = refused(prompt(sampling=dict(max_tokens=60)))
    assert "prompt (5 tokens)" in msg and "sampling.max_tokens (60)" in msg and "64" in msg
    assert "at most 59" in msg
    assert validate_request(prompt(sampling=dict(max_tokens=59)), [MODEL]).max_tokens == 59
    # the default max_tokens shrinks to the room left instead of failing
    v = validate_request(
        req(model="tiny", prompt_token_ids=generation_pb2.TokenIds(ids=[1] * 60)), [MODEL]
    )
    assert v.max_tokens == 4


@pytest.mark.parametrize(
    ("sampling", "expected"),
    [
        (dict(temperature=-0.5), "sampling.temperature must be in [0, 100]"),
        (dict(temperature=101), "got 101"),
        (dict(temperature=float("nan")), "got nan"),
        (dict(temperature=float("inf")), "sampling.temperature"),
        (dict(top_p=1.5), "sampling.top_p must be in (0, 1] (0 = default 1.0), got 1.5"),
        (dict(top_p=-0.1), "sampling.top_p"),
        (dict(top_p=float("nan")), "sampling.top_p"),
        (dict(top_k=-2), "sampling.top_k must be -1 or 0 (off) or positive, got -2"),
        (dict(stop=[str(i) for i in range(17)]), "sampling.stop has 17 strings; at most 16"),
        (dict(stop=["ok", ""]), "sampling.stop[1] is empty"),
        (dict(stop=["x" * 2000]), "sampling.stop[0] has 2000 characters"),
        (dict(stop_token_ids=list(range(65))), "sampling.stop_token_ids has 65 ids"),
    ],
)
def test_sampling_errors(sampling: dict, expected: str) -> None:
    assert expected in refused(prompt(sampling=sampling))


def test_sampling_edges_accepted() -> None:
    v = validate_request(prompt(sampling=dict(temperature=100, top_p=1.0, top_k=5)), [MODEL])
    assert (v.temperature, v.top_p, v.top_k) == (100.0, 1.0, 5)


def test_unknown_priority() -> None:
    msg = refused(prompt(priority=9))
    assert "priority 9" in msg and "PRIORITY_CLASS_HIGH" in msg


@pytest.mark.parametrize("name", ["request_id", "session_id"])
def test_ids(name: str) -> None:
    assert f"{name} must be at most 128 characters, got 129" in refused(prompt(**{name: "x" * 129}))
    msg = refused(prompt(**{name: "abc\ndef"}))
    assert f"{name} must not contain control characters" in msg and "U+000A at position 3" in msg
    assert "U+0000" in refused(prompt(**{name: "\x00"}))
    validate_request(prompt(**{name: "é" * 128}), [MODEL])


def test_end_session_needs_a_session() -> None:
    assert "end_session needs the session_id" in refused(prompt(end_session=True))
    v = validate_request(prompt(session_id="s", end_session=True), [MODEL])
    assert v.end_session and v.session_id == "s"


def test_prepare_prompt_helper() -> None:
    assert prepare_prompt(prompt(prompt="ab"), TOK) == [97, 98]
    assert prepare_prompt(req(prompt_token_ids=generation_pb2.TokenIds(ids=[7])), None) == [7]
    with pytest.raises(RequestError, match="input is required"):
        prepare_prompt(req(), TOK)


def test_request_error_str() -> None:
    e = RequestError(INVALID, "x must be y")
    assert str(e) == "INVALID_ARGUMENT: x must be y" and e.message == "x must be y"

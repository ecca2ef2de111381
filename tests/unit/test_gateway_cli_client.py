"""`splitserve generate` against an in-process fake gateway."""

from __future__ import annotations

import argparse
import io
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from gateway.cli_client import add_arguments, build_request, run
from splitserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc


class FakeGateway(generation_pb2_grpc.GenerationServicer):
    def __init__(self) -> None:
        self.requests: list[generation_pb2.GenerateRequest] = []

    def ListModels(self, request, context):  # noqa: N802, ANN001
        return generation_pb2.ListModelsResponse(
            models=[generation_pb2.ModelInfo(id="tiny", max_model_len=64)]
        )

    def Generate(self, request, context) -> Iterator[generation_pb2.GenerateResponse]:  # noqa: N802, ANN001
        self.requests.append(request)
        if request.prompt == "fail":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p must be in (0, 1]")
        yield generation_pb2.GenerateResponse(
            request_id="r1", token_ids=[104], text="h", ttft_seconds=0.012
        )
        yield generation_pb2.GenerateResponse(request_id="r1", token_ids=[105, 240], text="i")
        yield generation_pb2.GenerateResponse(
            request_id="r1",
            token_ids=[159, 153, 130],
            text=" 🙂",
            finish_reason=common_pb2.FINISH_REASON_LENGTH,
            usage=common_pb2.Usage(prompt_tokens=5, completion_tokens=6, cached_tokens=0),
        )


@pytest.fixture(scope="module")
def gateway() -> Iterator[tuple[str, FakeGateway]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    fake = FakeGateway()
    generation_pb2_grpc.add_GenerationServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", fake
    server.stop(0)


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def test_streams_text_and_prints_usage(gateway: tuple[str, FakeGateway]) -> None:
    address, fake = gateway
    out, err = io.StringIO(), io.StringIO()
    args = parse("hello", "--address", address, "--max-tokens", "6", "--seed", "3", "--stop", "x")
    assert run(args, out, err) == 0
    assert out.getvalue() == "hi 🙂\n"
    summary = err.getvalue()
    assert "finish=length" in summary and "prompt_tokens=5" in summary
    assert "completion_tokens=6" in summary and "ttft=0.012s" in summary
    sent = fake.requests[-1]
    assert sent.model == "tiny" and sent.prompt == "hello"  # model: the first listed
    assert sent.sampling.max_tokens == 6 and sent.sampling.seed == 3
    assert list(sent.sampling.stop) == ["x"]


def test_grpc_error_prints_code_and_message(gateway: tuple[str, FakeGateway]) -> None:
    address, _ = gateway
    out, err = io.StringIO(), io.StringIO()
    assert run(parse("fail", "--address", address, "--model", "tiny"), out, err) == 1
    assert "error: INVALID_ARGUMENT: sampling.top_p must be in (0, 1]" in err.getvalue()


def test_unreachable_gateway() -> None:
    out, err = io.StringIO(), io.StringIO()
    args = parse("x", "--address", "127.0.0.1:1", "--model", "m", "--timeout", "2")
    assert run(args, out, err) == 1
    assert "error: UNAVAILABLE" in err.getvalue()


def test_build_request_options() -> None:
    args = parse(
        "hi", "--chat", "--system", "be brief", "--priority", "critical", "--top-k", "5",
        "--top-p", "0.5", "--temperature", "0.8", "--ignore-eos", "--stop-token-id", "7",
        "--session-id", "s", "--deadline-ms", "100",
    )  # fmt: skip
    r = build_request(args, "m", "hi")
    assert [(m.role, m.content) for m in r.chat.messages] == [
        ("system", "be brief"),
        ("user", "hi"),
    ]
    assert r.priority == common_pb2.PRIORITY_CLASS_CRITICAL and r.sampling.top_k == 5
    assert r.sampling.ignore_eos and list(r.sampling.stop_token_ids) == [7]
    assert not r.sampling.HasField("seed") and r.session_id == "s" and r.deadline_ms == 100


def test_bad_arguments() -> None:
    err = io.StringIO()
    assert run(parse("x", "--max-tokens", "-1"), io.StringIO(), err) == 2
    assert "--max-tokens" in err.getvalue()
    assert run(parse("x", "--system", "s"), io.StringIO(), io.StringIO()) == 2


def test_control_characters_are_escaped_for_a_terminal() -> None:
    from gateway.cli_client import printable

    assert printable("a\x00b\x1b[31mc\nd\te\x7f") == "a\\x00b\\x1b[31mc\nd\te\\x7f"

"""Every bad input gets its precise status and a message naming what to fix."""

from __future__ import annotations

import grpc
import pytest

from splitserve.v1 import common_pb2, generation_pb2
from tests.integration.conftest import MODEL_NAME, RunningCluster, request

pytestmark = pytest.mark.slow

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _no_input() -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(model=MODEL_NAME)


def _unknown_model() -> generation_pb2.GenerateRequest:
    req = request([1, 2, 3])
    req.model = "no-such-model"
    return req


CASES = [
    ("no input", _no_input, INVALID, "input"),
    ("empty prompt", lambda: request(prompt=""), INVALID, "prompt"),
    ("empty token list", lambda: request([]), INVALID, "prompt_token_ids"),
    ("token out of vocab", lambda: request([1, 99999]), INVALID, "99999"),
    ("max_tokens past max_model_len", lambda: request([1, 2, 3], max_tokens=600), INVALID,
     "max_tokens"),
    ("prompt too long", lambda: request([5] * 600), INVALID, "max_model_len"),
    ("negative temperature", lambda: request([1, 2], temperature=-1.0), INVALID, "temperature"),
    ("top_p above 1", lambda: request([1, 2], top_p=1.5), INVALID, "top_p"),
    ("top_k below -1", lambda: request([1, 2], top_k=-5), INVALID, "top_k"),
    ("unknown model", _unknown_model, grpc.StatusCode.NOT_FOUND, "no-such-model"),
]


@pytest.mark.parametrize("name,make,code,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input(split_cluster: RunningCluster, name: str, make, code: grpc.StatusCode,
                   needle: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        list(split_cluster.stub.Generate(make(), timeout=10))
    assert err.value.code() == code, err.value.details()
    assert needle in err.value.details()


def test_bad_request_leaves_service_healthy(split_cluster: RunningCluster) -> None:
    with pytest.raises(grpc.RpcError):
        list(split_cluster.stub.Generate(request([1, 99999]), timeout=10))
    ok = split_cluster.generate(request([1, 2, 3], max_tokens=2))
    assert ok.finish_reason == common_pb2.FINISH_REASON_LENGTH

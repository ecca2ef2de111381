"""Access to the gateway's public fronts: API keys on the OpenAI HTTP front as on
gRPC, TLS (a self-signed certificate made here) on both, 429 with Retry-After when
admission refuses, and hostile HTTP clients (slow headers, a huge body, too many
connections) refused without hurting a request being served."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import grpc
import httpx2
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from services.common.launcher import LocalCluster, free_port, spawn
from splitserve.v1 import generation_pb2_grpc
from tests.integration.conftest import MODEL_NAME, cluster_settings, collect, request

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
KEY = "key-of-carol"
MAX_CONNECTIONS = 8
HOLDER_TOKENS = 500  # the most the 512-token model length leaves a 4-token prompt


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "gateway.crt", tmp / "gateway.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class Gateway:
    def __init__(self, settings, cert: Path) -> None:
        self.settings, self.cert = settings, cert
        self.tls = ssl.create_default_context(cafile=str(cert))
        self.base_url = f"https://127.0.0.1:{settings.gateway.openai_port}/v1"

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0,
                             timeout=30, http_client=httpx2.Client(verify=self.tls))

    def raw(self) -> ssl.SSLSocket:
        sock = socket.create_connection(("127.0.0.1", self.settings.gateway.openai_port), 5)
        return self.tls.wrap_socket(sock, server_hostname="127.0.0.1")


def _wait_ready(http_port: int, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError("the gateway did not become ready")


@pytest.fixture(scope="module")
def gateway(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("openai-access")
    cert, key = _self_signed(tmp)
    settings = cluster_settings(
        tiny_llama_dir, prefill=1, decode=1, openai_port=free_port(), api_keys=[KEY],
        tls_cert=str(cert), tls_key=str(key), max_inflight=1, max_queue=0,
        openai_header_timeout_s=1.0, openai_max_connections=MAX_CONNECTIONS,
        openai_max_body_bytes=1 << 20)
    config, logs = tmp / "cluster.yaml", tmp / "logs"
    settings.dump_yaml(config)
    logs.mkdir()
    # The launcher waits on plaintext gRPC health: start the gateway (TLS) by hand.
    with ExitStack() as stack:
        backend = LocalCluster(settings, config, logs, roles=("kvstore", "prefill", "decode"))
        stack.callback(backend.stop)
        backend.start()
        proc = spawn("gateway", 0, config, logs)
        stack.callback(proc.wait, 15)
        stack.callback(proc.terminate)
        _wait_ready(settings.gateway.http_port, 60)
        yield Gateway(settings, cert)


def _completion(client: openai.OpenAI, max_tokens: int = 4, **kw):
    return client.completions.create(model=MODEL_NAME, prompt=[5, 6, 7, 8],
                                     max_tokens=max_tokens, temperature=0,
                                     extra_body={"ignore_eos": True}, **kw)


def test_https_with_a_key_serves(gateway: Gateway) -> None:
    with gateway.client() as client:
        assert [m.id for m in client.models.list().data] == [MODEL_NAME]
        assert _completion(client).usage.completion_tokens == 4


@pytest.mark.parametrize("key", [None, "key-of-mallory"])
def test_missing_or_wrong_key_is_401(gateway: Gateway, key: str | None) -> None:
    # No key: the client's Authorization header left out altogether.
    headers = {"Authorization": openai.Omit()} if key is None else {}
    with gateway.client(key or "unused") as client:
        with pytest.raises(openai.AuthenticationError) as err:
            _completion(client, extra_headers=headers)
        assert "Authorization: Bearer KEY" in err.value.message
        assert err.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client.models.list(extra_headers=headers)


def test_plaintext_http_gets_no_answer(gateway: Gateway) -> None:
    url = gateway.base_url.replace("https://", "http://") + "/models"
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=5)


def test_grpc_front_over_tls_with_the_same_key(gateway: Gateway) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=gateway.cert.read_bytes())
    with grpc.secure_channel(gateway.settings.gateway.address, creds) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        got = collect(stub.Generate(request([5, 6, 7], max_tokens=3), timeout=30,
                                    metadata=(("authorization", f"Bearer {KEY}"),)))
        assert len(got.tokens) == 3
        with pytest.raises(grpc.RpcError) as err:
            collect(stub.Generate(request([5, 6, 7], max_tokens=3), timeout=30))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(gateway.settings.gateway.address) as plain:
        with pytest.raises(grpc.RpcError) as err:
            collect(generation_pb2_grpc.GenerationStub(plain).Generate(
                request([5], max_tokens=1), timeout=5))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


class Holder:
    """A streamed request holding the gateway's only slot (max_inflight=1, max_queue=0)."""

    def __init__(self, gateway: Gateway, max_tokens: int) -> None:
        self.client = gateway.client()
        self.stream = _completion(self.client, max_tokens, stream=True)
        self.chunks = iter(self.stream)
        next(self.chunks)  # running: the slot is taken

    def finish(self) -> str | None:
        reasons = [c.choices[0].finish_reason for c in self.chunks if c.choices]
        self.client.close()
        return reasons[-1] if reasons else None


def _refused_while_held(gateway: Gateway) -> openai.RateLimitError | None:
    """The refusal a request gets while a holder has the only slot; None if it was
    served, which a holder that finished before the request arrived explains."""
    holder = Holder(gateway, max_tokens=HOLDER_TOKENS)
    try:
        with gateway.client() as client:
            _completion(client)
        return None
    except openai.RateLimitError as err:
        return err
    finally:
        assert holder.finish() == "length"


def test_overload_is_429_with_retry_after(gateway: Gateway) -> None:
    # A holder streams for about a second here; a loaded machine can still stall the
    # test's own request past its end, so a served request earns another try.
    err = next((e for _ in range(3) if (e := _refused_while_held(gateway))), None)
    assert err is not None, "a request was served while another held the only slot"
    assert int(err.response.headers["retry-after"]) >= 1
    assert err.body["type"] == "rate_limit_error"


def _answer(sock: ssl.SSLSocket, timeout_s: float) -> bytes:
    sock.settimeout(timeout_s)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except (TimeoutError, ssl.SSLError, ConnectionError):
        pass
    return data


def _slow_loris(gateway: Gateway) -> tuple[bytes, float]:
    start = time.monotonic()
    with gateway.raw() as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        for _ in range(6):  # a header line every 0.4 s: never done
            time.sleep(0.4)
            try:
                sock.sendall(b"X-Slow: 1\r\n")
            except OSError:
                break
        return _answer(sock, 3), time.monotonic() - start


def _huge_body(gateway: Gateway) -> bytes:
    with gateway.raw() as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + KEY.encode() + b"\r\nContent-Length: 1000000000\r\n\r\n{")
        return _answer(sock, 3)


def _too_many_connections(gateway: Gateway) -> bytes:
    port = gateway.settings.gateway.openai_port
    with ExitStack() as stack:
        for _ in range(MAX_CONNECTIONS):
            stack.enter_context(socket.create_connection(("127.0.0.1", port), 5))
        time.sleep(0.2)
        extra = stack.enter_context(socket.create_connection(("127.0.0.1", port), 5))
        extra.settimeout(3)
        return extra.recv(4096)


def test_hostile_clients_refused_while_a_request_streams(gateway: Gateway) -> None:
    holder = Holder(gateway, max_tokens=100)
    try:
        with ThreadPoolExecutor(2) as pool:
            slow = pool.submit(_slow_loris, gateway)
            huge = pool.submit(_huge_body, gateway)
            slow_answer, slow_seconds = slow.result(timeout=20)
            huge_answer = huge.result(timeout=20)
        assert slow_answer.startswith(b"HTTP/1.1 408"), slow_answer
        assert slow_seconds < 4  # the 1 s header timeout, not the client's pace
        assert huge_answer.startswith(b"HTTP/1.1 413"), huge_answer
        assert b"openai_max_body_bytes" in huge_answer
        crowd = _too_many_connections(gateway)
        assert crowd.startswith(b"HTTP/1.1 503"), crowd
    finally:
        assert holder.finish() == "length"  # the served request ran to its end

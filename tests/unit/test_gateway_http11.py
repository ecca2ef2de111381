"""The gateway's small HTTP/1.1 server on a real loopback socket: keep-alive, bounds,
and a handler cancelled when its client leaves; TLS settings checked up front."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.http11 import HttpLimits, HttpRequest, HttpServer, Reply
from gateway.tls import tls_files
from services.common.settings import GatewaySettings, SettingsError

pytestmark = pytest.mark.timeout(30)
LIMITS = HttpLimits(max_connections=2, max_body_bytes=100, header_timeout_s=0.5,
                    idle_timeout_s=0.5)


def error_body(status: int, message: str) -> bytes:
    return json.dumps({"status": status, "message": message}).encode()


class Recorder:
    def __init__(self) -> None:
        self.cancelled = asyncio.Event()

    async def handle(self, request: HttpRequest, reply: Reply) -> None:
        if request.path == "/hang":
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        await reply.send(200, request.method.encode() + b" " + request.body)


async def _server(recorder: Recorder) -> HttpServer:
    return await HttpServer(recorder.handle, LIMITS, error_body).start("127.0.0.1", 0)


async def _exchange(port: int, data: bytes, read_s: float = 2.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    out = b""
    try:
        async with asyncio.timeout(read_s):
            while chunk := await reader.read(4096):
                out += chunk
    except TimeoutError:
        pass
    writer.close()
    return out


def test_keep_alive_then_idle_close() -> None:
    async def run() -> bytes:
        server = await _server(Recorder())
        two = (b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
               b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            return await _exchange(server.port, two)  # the server closes when idle
        finally:
            await server.close()

    out = asyncio.run(run())
    assert out.count(b"HTTP/1.1 200") == 2
    assert b"POST hi" in out and b"GET " in out


def test_expect_100_continue_is_answered() -> None:
    async def run() -> bytes:
        server = await _server(Recorder())
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        try:
            async with asyncio.timeout(2):
                interim = await reader.readuntil(b"\r\n\r\n")
                writer.write(b"ok")
                return interim + await reader.readuntil(b"POST ok")
        finally:
            writer.close()
            await server.close()

    out = asyncio.run(run())
    assert out.startswith(b"HTTP/1.1 100") and b"HTTP/1.1 200" in out


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n", b"413"),
    (b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"40\r\n" + b"a" * 64 + b"\r\n40\r\n" + b"a" * 64 + b"\r\n0\r\n\r\n", b"413"),
    (b"GET /a HTTP/1.1\r\nHost: x\r\n", b"408"),  # the head never ends
    (b"NOT HTTP AT ALL\r\n\r\n", b"400"),
    (b"GET /a HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", b"431"),
], ids=["length-over", "chunks-over", "slow-head", "garbage", "huge-head"])
def test_refusals(request_bytes: bytes, status: bytes) -> None:
    async def run() -> bytes:
        server = await _server(Recorder())
        try:
            return await _exchange(server.port, request_bytes)
        finally:
            await server.close()

    out = asyncio.run(run())
    assert out.startswith(b"HTTP/1.1 " + status), out
    assert b"connection: close" in out.lower()


def test_connections_beyond_the_limit_get_503() -> None:
    async def run() -> bytes:
        server = await _server(Recorder())
        held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
        await asyncio.sleep(0.05)
        try:
            return await _exchange(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        finally:
            for _, writer in held:
                writer.close()
            await server.close()

    assert asyncio.run(run()).startswith(b"HTTP/1.1 503")


def test_client_leaving_cancels_its_handler() -> None:
    async def run() -> bool:
        recorder = Recorder()
        server = await _server(recorder)
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0.1)
        writer.close()
        try:
            async with asyncio.timeout(2):
                await recorder.cancelled.wait()
            return server.open_connections == 0 or await _settled(server)
        finally:
            await server.close()

    assert asyncio.run(run())


async def _settled(server: HttpServer) -> bool:
    await asyncio.sleep(0.1)
    return server.open_connections == 0


def test_tls_settings_need_both_files(tmp_path) -> None:
    assert tls_files(GatewaySettings()) is None
    with pytest.raises(SettingsError, match="tls_key is not"):
        tls_files(GatewaySettings(tls_cert=str(tmp_path / "c.pem")))
    with pytest.raises(SettingsError, match="not a readable file"):
        tls_files(GatewaySettings(tls_cert=str(tmp_path / "c"), tls_key=str(tmp_path / "k")))

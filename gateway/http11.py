"""A small HTTP/1.1 server on the running asyncio loop, built on ``h11``.

Why not aiohttp: the gateway needs a handful of JSON routes and one streaming
shape (server-sent events), on the loop that already runs ``grpc.aio``, with hard
bounds against hostile clients. ``h11`` (already installed with the HTTP clients)
does the protocol parsing, strictly; this module adds the bounds:

* at most ``max_connections`` open connections; one more gets 503 and is closed;
* a request's head and body must arrive within ``header_timeout_s`` (slow-loris),
  and a keep-alive connection with no request is closed after ``idle_timeout_s``;
* a head over ``max_header_bytes`` gets 431, a body over ``max_body_bytes`` 413,
  before it is read;
* a response the client does not read within ``write_timeout_s`` ends the connection;
* a client that closes its connection while its request runs has the handler
  task cancelled, so whatever the request holds is given back at once.
"""

from __future__ import annotations

import asyncio
import http
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import h11

from services.common.logging import get_logger

log = get_logger("gateway")
READ_CHUNK = 64 << 10


@dataclass(frozen=True)
class HttpLimits:
    max_connections: int = 256
    max_body_bytes: int = 4 << 20
    header_timeout_s: float = 10.0
    idle_timeout_s: float = 30.0
    max_header_bytes: int = 16 << 10
    write_timeout_s: float = 30.0


@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str  # without the query string
    headers: tuple[tuple[str, str], ...]  # names lower-cased
    body: bytes
    peer: str


class ClientGone(Exception):
    """The client closed its connection, or stopped reading what it asked for."""


class Refused(Exception):
    """A request refused before its handler runs (too big, too slow, malformed)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


ErrorBody = Callable[[int, str], bytes]  # (status, message) -> JSON body


class Reply:
    """The response to one request: whole (:meth:`send`) or streamed (:meth:`start`,
    :meth:`write`..., :meth:`end`)."""

    def __init__(self, conn: h11.Connection, writer: asyncio.StreamWriter,
                 write_timeout_s: float) -> None:
        self._conn, self._writer, self._timeout = conn, writer, write_timeout_s
        self.started = False

    async def send(self, status: int, body: bytes, content_type: str = "application/json",
                   headers: tuple[tuple[str, str], ...] = ()) -> None:
        await self.start(status, content_type, (("content-length", str(len(body))), *headers))
        await self.write(body)
        await self.end()

    async def start(self, status: int, content_type: str,
                    headers: tuple[tuple[str, str], ...] = ()) -> None:
        self.started = True
        response = h11.Response(status_code=status, reason=http.HTTPStatus(status).phrase,
                                headers=[("content-type", content_type), *headers])
        await self._put(self._conn.send(response))

    async def write(self, data: bytes) -> None:
        await self._put(self._conn.send(h11.Data(data=data)))

    async def end(self) -> None:
        await self._put(self._conn.send(h11.EndOfMessage()))

    async def _put(self, data: bytes | None) -> None:
        if self._writer.is_closing():
            raise ClientGone("the connection is closed")
        self._writer.write(data or b"")
        try:
            async with asyncio.timeout(self._timeout):
                await self._writer.drain()
        except (ConnectionError, TimeoutError) as e:
            raise ClientGone(f"cannot write to the client: {e!r}") from e


Handler = Callable[[HttpRequest, Reply], Awaitable[None]]


class HttpServer:
    def __init__(self, handler: Handler, limits: HttpLimits, error_body: ErrorBody,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.handler, self.limits, self.error_body = handler, limits, error_body
        self.ssl_context = ssl_context
        self.open_connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> HttpServer:
        self._server = await asyncio.start_server(self._on_connection, host, port,
                                                  limit=READ_CHUNK, backlog=1024)
        return self

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- one connection -----------------------------------------------------------------

    async def _on_connection(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        if self.open_connections >= self.limits.max_connections:
            await self._refuse(reader, writer, Refused(503, "too many open connections; retry"))
            return
        self.open_connections += 1
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            if self.ssl_context is not None:
                await writer.start_tls(self.ssl_context,
                                       ssl_handshake_timeout=self.limits.header_timeout_s)
            await self._serve_requests(reader, writer)
        except (ConnectionError, ClientGone, ssl.SSLError, TimeoutError):
            pass  # the client went away (or never spoke TLS): nothing to answer
        except asyncio.CancelledError:
            pass  # the server is closing: this task is the connection's top, end it quietly
        finally:
            self.open_connections -= 1
            self._tasks.discard(task)
            writer.close()

    async def _serve_requests(self, reader: asyncio.StreamReader,
                              writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
        peer = writer.get_extra_info("peername")
        peer_name = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        wait_s = self.limits.header_timeout_s  # the first request comes at once, or never
        while True:
            try:
                request = await self._read_request(conn, reader, writer, peer_name, wait_s)
            except Refused as r:
                await self._refuse(reader, writer, r)
                return
            if request is None:
                return
            await self._respond(request, conn, reader, writer)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return  # a close-delimited answer, or "Connection: close"
            conn.start_next_cycle()
            wait_s = self.limits.idle_timeout_s

    async def _read_request(self, conn: h11.Connection, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter, peer: str,
                            wait_s: float) -> HttpRequest | None:
        """The next request, whole; None when the client closed or stayed idle."""
        if not conn.trailing_data[0]:
            try:
                async with asyncio.timeout(wait_s):
                    conn.receive_data(await reader.read(READ_CHUNK))
            except TimeoutError:
                return None
        try:
            async with asyncio.timeout(self.limits.header_timeout_s):
                return await self._receive(conn, reader, writer, peer)
        except TimeoutError:
            raise Refused(408, f"the request did not arrive within "
                               f"{self.limits.header_timeout_s:g} s") from None
        except h11.RemoteProtocolError as e:
            status = e.error_status_hint
            hint = (f"; the request head is over {self.limits.max_header_bytes} bytes"
                    if status == 431 else "")
            raise Refused(status, f"malformed HTTP request: {e}{hint}") from None

    async def _receive(self, conn: h11.Connection, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter, peer: str) -> HttpRequest | None:
        head = await _next_event(conn, reader)
        if isinstance(head, h11.ConnectionClosed):
            return None
        assert isinstance(head, h11.Request), head
        headers = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers)
        head_bytes = len(head.target) + sum(len(k) + len(v) + 4 for k, v in headers)
        if head_bytes > self.limits.max_header_bytes:  # h11 bounds only an incomplete head
            raise Refused(431, f"the request head is {head_bytes} bytes, over the limit of "
                               f"{self.limits.max_header_bytes}")
        limit = self.limits.max_body_bytes
        length = next((v for k, v in headers if k == "content-length"), "0")
        if int(length) > limit:  # h11 checked that it is an integer
            raise Refused(413, f"the request body is {length} bytes, over the limit of "
                               f"{limit} bytes (gateway.openai_max_body_bytes)")
        if conn.they_are_waiting_for_100_continue:  # curl, for larger bodies
            writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        body = bytearray()
        while not isinstance(event := await _next_event(conn, reader), h11.EndOfMessage):
            if isinstance(event, h11.ConnectionClosed):
                return None
            body += event.data
            if len(body) > limit:
                raise Refused(413, f"the request body is over the limit of {limit} bytes "
                                   "(gateway.openai_max_body_bytes)")
        path = head.target.decode("latin-1").split("?", 1)[0]
        return HttpRequest(head.method.decode("latin-1"), path, headers, bytes(body), peer)

    async def _respond(self, request: HttpRequest, conn: h11.Connection,
                       reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Runs the handler while watching the connection: a client that closes it has
        the handler cancelled."""
        reply = Reply(conn, writer, self.limits.write_timeout_s)
        handler = asyncio.create_task(self.handler(request, reply))
        watcher = asyncio.create_task(self._watch(conn, reader))
        try:
            await asyncio.wait((handler, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (handler, watcher):
                task.cancel()
            results = await asyncio.gather(handler, watcher, return_exceptions=True)
        if watcher.done() and not watcher.cancelled() and handler.cancelled():
            raise ClientGone("the client closed its connection")
        error = results[0]
        if isinstance(error, BaseException) and not isinstance(error, asyncio.CancelledError):
            if isinstance(error, ClientGone):
                raise error
            log.error("http_handler_failed", path=request.path, error=repr(error))
            if reply.started:
                raise ClientGone("the handler failed mid-answer") from error
            await reply.send(500, self.error_body(500, "internal error; see the gateway log"))

    async def _watch(self, conn: h11.Connection, reader: asyncio.StreamReader) -> None:
        """Returns when the client closes its side; keeps what it sends meanwhile
        (a pipelined request), up to one body's worth."""
        while True:
            data = await reader.read(READ_CHUNK)
            if not data:
                return
            conn.receive_data(data)
            if len(conn.trailing_data[0]) > self.limits.max_body_bytes:
                return

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      r: Refused) -> None:
        """A whole answer written without h11's state (the request may be half read),
        then a short lingering close: closing with unread input would reset the
        connection and could lose the answer on its way."""
        body = self.error_body(r.status, r.message)
        head = (f"HTTP/1.1 {r.status} {http.HTTPStatus(r.status).phrase}\r\n"
                f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
                + ("retry-after: 1\r\n" if r.status == 503 else "")
                + "connection: close\r\n\r\n")
        try:
            writer.write(head.encode() + body)
            async with asyncio.timeout(1.0):
                await writer.drain()
                if writer.can_write_eof():
                    writer.write_eof()
                while await reader.read(READ_CHUNK):
                    pass
        except (ConnectionError, TimeoutError, ssl.SSLError):
            pass
        finally:
            writer.close()


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Event:
    while (event := conn.next_event()) is h11.NEED_DATA:
        conn.receive_data(await reader.read(READ_CHUNK))
    return event

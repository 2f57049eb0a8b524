"""A scriptable origin server for the tests: trio + h11 on 127.0.0.1, real sockets.

Each test registers handlers by path (``origin.route("/x", handler)``); a handler gets an
``Exchange`` and can answer with whole responses (``respond``), 1xx sequences (``informational``),
chunked bodies with trailers (``send_event``), slow or partial writes, raw bytes (``send_raw``),
or close the socket mid-body (``abort``). Unrouted paths get ``default_handler``: a JSON echo of
the request (method, target, headers in order and case, body size), which is what most header
tests assert on. The origin counts connections, concurrent connections and requests.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import h11
import trio

Handler = Callable[["Exchange"], Awaitable[None]]


@dataclass
class SeenRequest:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    http_version: bytes
    connection_id: int


class Exchange:
    def __init__(
        self,
        origin: Origin,
        stream: trio.SocketStream,
        conn: h11.Connection,
        request: h11.Request,
        connection_id: int,
    ) -> None:
        self.origin = origin
        self.stream = stream
        self.conn = conn
        self.request = request
        self.connection_id = connection_id
        self.body_read = False
        self.closed = False

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        return list(self.request.headers.raw_items())

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.request.headers:
            if key == name.lower():
                return bytes(value)
        return None

    async def _next(self) -> object:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
                continue
            return event

    async def read_body(self, limit: int | None = None) -> bytes:
        """Read the whole request body (or up to ``limit`` bytes, then stop reading)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await self._next()
            if isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
                size += len(event.data)
                if limit is not None and size >= limit:
                    return b"".join(chunks)
            elif isinstance(event, h11.EndOfMessage):
                self.body_read = True
                self.trailers = list(event.headers.raw_items())
                return b"".join(chunks)
            else:
                raise AssertionError(f"unexpected event {event!r}")

    async def count_body(self) -> int:
        """Read and discard the body, returning its size (for huge uploads)."""
        size = 0
        while True:
            event = await self._next()
            if isinstance(event, h11.Data):
                size += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self.body_read = True
                return size

    async def send_event(self, event: h11.Event) -> None:
        await self.stream.send_all(self.conn.send(event) or b"")

    async def informational(
        self, status: int, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        await self.send_event(h11.InformationalResponse(status_code=status, headers=headers or []))

    async def respond(
        self,
        status: int = 200,
        body: bytes = b"",
        headers: list[tuple[bytes, bytes]] | None = None,
        content_length: bool = True,
    ) -> None:
        hdrs = list(headers or [])
        if content_length and not any(k.lower() == b"content-length" for k, _ in hdrs):
            hdrs.append((b"Content-Length", str(len(body)).encode()))
        data = self.conn.send(h11.Response(status_code=status, headers=hdrs))
        if body:
            data += self.conn.send(h11.Data(data=body))
        data += self.conn.send(h11.EndOfMessage())
        await self.stream.send_all(data)

    async def send_raw(self, data: bytes) -> None:
        """Bytes straight onto the socket; the connection is closed after the handler."""
        self.closed = True
        await self.stream.send_all(data)

    async def abort(self) -> None:
        """Close the TCP connection now (mid-response when a head was sent)."""
        self.closed = True
        await self.stream.aclose()


async def default_handler(exchange: Exchange) -> None:
    body = await exchange.read_body()
    echo = {
        "method": exchange.request.method.decode(),
        "target": exchange.request.target.decode(),
        "http_version": exchange.request.http_version.decode(),
        "headers": [[k.decode(), v.decode()] for k, v in exchange.raw_headers],
        "body_size": len(body),
        "connection": exchange.connection_id,
    }
    await exchange.respond(200, json.dumps(echo).encode(), [(b"Content-Type", b"application/json")])


@dataclass
class Origin:
    host: str = "127.0.0.1"
    port: int = 0
    routes: dict[bytes, Handler] = field(default_factory=dict)
    requests: list[SeenRequest] = field(default_factory=list)
    connections: int = 0
    active: int = 0
    max_active: int = 0

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return self.base + path

    def route(self, path: str, handler: Handler) -> None:
        self.routes[path.encode()] = handler

    async def serve(self, task_status: trio.TaskStatus[Origin] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        connection_id = self.connections
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = conn.next_event()
                while event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    conn.receive_data(data)
                    event = conn.next_event()
                if not isinstance(event, h11.Request):
                    return
                exchange = Exchange(self, stream, conn, event, connection_id)
                path = event.target.split(b"?", 1)[0]
                handler = self.routes.get(path, default_handler)
                seen = SeenRequest(
                    event.method,
                    event.target,
                    list(event.headers.raw_items()),
                    b"",
                    event.http_version,
                    connection_id,
                )
                self.requests.append(seen)
                await handler(exchange)
                if exchange.closed:
                    return
                if conn.our_state is h11.DONE and conn.their_state is not h11.DONE:
                    # The handler answered without reading the body: drain it for keep-alive.
                    with trio.move_on_after(5):
                        await exchange.read_body()
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        finally:
            self.active -= 1
            await trio.aclose_forcefully(stream)

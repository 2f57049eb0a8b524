"""WebSocket clients for the tests, one per entry path, behind one small interface.

- ``WsprotoClient``: the absolute-form upgrade (``GET ws://host:port/path HTTP/1.1`` sent to the
  proxy), as libraries and Go programs send it; wsproto does the handshake checks and framing.
- ``WebsocketsClient``: the ``websockets`` library with ``proxy=``: it opens a CONNECT tunnel and
  sends its upgrade inside, the way browsers send ws:// through a proxy.

``open_client(kind, ...)`` yields either. Verbs: ``send``, ``receive`` (a message or ``Closed``),
``close(code, reason)`` (our Close, then everything until the handshake and TCP are done: returns
the Close we got back; messages that arrived in between are in ``after_close``),
``wait_close()`` (the other side closes: returns its Close, after our reply and TCP end),
``ping()``, ``drop(rst=...)``. ``Rejected`` carries a non-101 answer.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.trio.client import connect
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason

from tests.websocket.ws_origin import Closed, Message

ABSOLUTE = "absolute"
CONNECT = "connect"
KINDS = (ABSOLUTE, CONNECT)


class Rejected(Exception):
    def __init__(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        super().__init__(f"rejected with {status}")
        self.status = status
        self.body = body
        self.headers = headers


def _set_rst(sock: Any) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class WsprotoClient:
    kind = ABSOLUTE

    def __init__(self, stream: trio.SocketStream, ws: WSConnection) -> None:
        self.stream = stream
        self.ws = ws
        self.subprotocol: str | None = None
        self.extensions: list[Any] = []
        self.after_close: list[Message] = []
        self.saw_eof = False
        self.saw_reset = False
        self._events: list[Any] = []
        self._parts: list[Any] = []
        self._pong = trio.Event()
        self._close_event: CloseConnection | None = None

    @classmethod
    async def open(
        cls,
        proxy_port: int,
        url: str,
        *,
        subprotocols: Sequence[str] = (),
        deflate: bool = False,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> WsprotoClient:
        stream = await trio.open_tcp_stream("127.0.0.1", proxy_port)
        ws = WSConnection(ConnectionType.CLIENT)
        host = url.split("://", 1)[1].split("/", 1)[0]
        request = Request(
            host=host,
            target=url,  # absolute form: the proxy sees the full URL
            subprotocols=list(subprotocols),
            extensions=[PerMessageDeflate()] if deflate else [],
            extra_headers=list(headers),
        )
        await stream.send_all(ws.send(request))
        client = cls(stream, ws)
        await client._handshake()
        return client

    async def _handshake(self) -> None:
        reject: RejectConnection | None = None
        body = b""
        accepted = False
        while True:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("the proxy closed during the handshake")
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, AcceptConnection):
                    self.subprotocol = event.subprotocol
                    self.extensions = list(event.extensions)
                    accepted = True
                    continue
                if isinstance(event, RejectConnection):
                    reject = event
                    if not event.has_body:
                        raise Rejected(event.status_code, b"", list(event.headers))
                elif isinstance(event, RejectData):
                    body += event.data
                    if event.body_finished and reject is not None:
                        raise Rejected(reject.status_code, body, list(reject.headers))
                else:
                    self._events.append(event)
            # Frames may come in the same read as the 101 (even a Close: the state is then no
            # longer OPEN); they wait in ``_events``.
            if accepted:
                return

    async def send(self, message: Message) -> None:
        event = TextMessage(data=message) if isinstance(message, str) else BytesMessage(message)
        await self.stream.send_all(self.ws.send(event))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive(self) -> Message | Closed:
        while True:
            while self._events:
                event = self._events.pop(0)
                if isinstance(event, TextMessage | BytesMessage):
                    self._parts.append(event.data)
                    if event.message_finished:
                        parts, self._parts = self._parts, []
                        joiner: Any = "" if isinstance(event, TextMessage) else b""
                        result: Message = joiner.join(parts)
                        return result
                elif isinstance(event, Ping):
                    await self.stream.send_all(self.ws.send(event.response()))
                elif isinstance(event, Pong):
                    self._pong.set()
                elif isinstance(event, CloseConnection):
                    code = int(event.code)
                    if code == 1006:
                        return Closed(eof=True)
                    self._close_event = event
                    return Closed(None if code == 1005 else code, event.reason or "")
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                self.saw_reset = True
                data = b""
            if not data:
                self.saw_eof = not self.saw_reset
                if self.ws.state is ConnectionState.CLOSED:
                    return Closed(eof=True)
                self.ws.receive_data(None)
            else:
                self.ws.receive_data(data)
            self._events.extend(self.ws.events())

    async def ping(self) -> None:
        self._pong = trio.Event()
        await self.stream.send_all(self.ws.send(Ping(payload=b"are you there")))
        while not self._pong.is_set():
            data = await self.stream.receive_some(65536)
            assert data, "closed while waiting for a pong"
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, Pong):
                    self._pong.set()
                else:
                    self._events.append(event)  # for receive()

    async def _until_eof(self) -> None:
        while not (self.saw_eof or self.saw_reset):
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                self.saw_reset = True
                break
            if not data:
                self.saw_eof = True
        await self.stream.aclose()

    async def close(self, code: int | None = 1000, reason: str = "") -> Closed:
        await self.stream.send_all(
            # wsproto sends no code only for the enum member itself (an int 1005 becomes 1000).
            self.ws.send(
                CloseConnection(
                    code=code if code is not None else CloseReason.NO_STATUS_RCVD, reason=reason
                )
            )
        )
        while True:
            got = await self.receive()
            if isinstance(got, Closed):
                # RFC 6455 §7.1.1: the client waits for the server to close TCP.
                await self._until_eof()
                return got
            self.after_close.append(got)

    async def wait_close(self) -> Closed:
        while True:
            got = await self.receive()
            if isinstance(got, Closed):
                if not got.eof and self.ws.state is ConnectionState.REMOTE_CLOSING:
                    assert self._close_event is not None
                    await self.stream.send_all(self.ws.send(self._close_event.response()))
                await self._until_eof()
                return got
            self.after_close.append(got)

    async def drop(self, *, rst: bool = False) -> None:
        if rst:
            _set_rst(self.stream.socket)
        await trio.aclose_forcefully(self.stream)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


class WebsocketsClient:
    kind = CONNECT

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.after_close: list[Message] = []

    @property
    def subprotocol(self) -> str | None:
        value = self.ws.subprotocol
        return None if value is None else str(value)

    @property
    def response_headers(self) -> Any:
        return self.ws.response.headers

    async def send(self, message: Message) -> None:
        await self.ws.send(message)

    async def receive(self) -> Message | Closed:
        try:
            message: Message = await self.ws.recv()
            return message
        except ConnectionClosed as exc:
            return self._closed(exc)

    def _closed(self, exc: ConnectionClosed) -> Closed:
        if exc.rcvd is None:
            return Closed(eof=True)
        code = int(exc.rcvd.code)
        return Closed(None if code == 1005 else code, exc.rcvd.reason)

    async def ping(self) -> None:
        pong = await self.ws.ping()
        await pong.wait()

    async def close(self, code: int | None = 1000, reason: str = "") -> Closed:
        if code is None:
            # websockets cannot send a Close without a code through aclose(); do it by hand.
            async with self.ws.send_context():
                self.ws.protocol.send_close()
        else:
            await self.ws.aclose(code, reason)
        return await self._drain()

    async def _drain(self) -> Closed:
        while True:
            try:
                self.after_close.append(await self.ws.recv())
            except ConnectionClosed as exc:
                await self.ws.wait_closed()
                return self._closed(exc)

    async def wait_close(self) -> Closed:
        return await self._drain()

    async def drop(self, *, rst: bool = False) -> None:
        stream = self.ws.stream
        if rst:
            _set_rst(stream.socket)
        await trio.aclose_forcefully(stream)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.ws.stream)


Client = WsprotoClient | WebsocketsClient


@asynccontextmanager
async def open_client(
    kind: str,
    proxy_port: int,
    url: str,
    *,
    subprotocols: Sequence[str] = (),
    deflate: bool = False,
    headers: Sequence[tuple[bytes, bytes]] = (),
    timeout: float = 5.0,
) -> AsyncIterator[Client]:
    """A client on the ``kind`` entry path, connected to ``url`` through the proxy."""
    if kind == ABSOLUTE:
        with trio.fail_after(timeout):
            client: Client = await WsprotoClient.open(
                proxy_port, url, subprotocols=subprotocols, deflate=deflate, headers=headers
            )
        try:
            yield client
        finally:
            await client.aclose()
        return
    try:
        manager = connect(
            url,
            proxy=f"http://127.0.0.1:{proxy_port}",
            subprotocols=[websockets.Subprotocol(p) for p in subprotocols] or None,
            compression="deflate" if deflate else None,
            additional_headers=[(k.decode(), v.decode()) for k, v in headers],
            open_timeout=timeout,
            ping_interval=None,
            close_timeout=timeout,
            max_size=None,
            user_agent_header="test-websockets",
        )
        async with manager as ws:
            client = WebsocketsClient(ws)
            try:
                yield client
            finally:
                await client.aclose()
    except InvalidStatus as exc:
        response = exc.response
        raise Rejected(
            response.status_code,
            bytes(response.body or b""),
            [(k.encode(), v.encode()) for k, v in response.headers.raw_items()],
        ) from None


# --- raw clients (byte-level scripts) -----------------------------------------------------------

CLIENT_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


async def raw_open(kind: str, proxy_port: int, origin_port: int) -> trio.SocketStream:
    """A socket to the proxy, ready for an upgrade request (through a CONNECT tunnel for
    ``CONNECT``)."""
    stream = await trio.open_tcp_stream("127.0.0.1", proxy_port)
    if kind == CONNECT:
        authority = f"127.0.0.1:{origin_port}".encode()
        await stream.send_all(b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (authority, authority))
        head, rest = await read_head(stream)
        assert head.startswith(b"HTTP/1.1 200"), head
        assert rest == b""
    return stream


def upgrade_request(
    kind: str,
    origin_port: int,
    path: str = "/",
    *,
    headers: Sequence[tuple[bytes, bytes]] = (),
    drop: Sequence[bytes] = (),
) -> bytes:
    """An upgrade request as the ``kind`` path sends it; ``drop`` removes default fields."""
    authority = f"127.0.0.1:{origin_port}"
    target = f"ws://{authority}{path}" if kind == ABSOLUTE else path
    fields = [
        (b"Host", authority.encode()),
        (b"Upgrade", b"websocket"),
        (b"Connection", b"Upgrade"),
        (b"Sec-WebSocket-Key", CLIENT_KEY),
        (b"Sec-WebSocket-Version", b"13"),
    ]
    fields = [(k, v) for k, v in fields if k.lower() not in drop] + list(headers)
    lines = [f"GET {target} HTTP/1.1".encode()] + [k + b": " + v for k, v in fields]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def read_head(stream: trio.abc.ReceiveStream) -> tuple[bytes, bytes]:
    """Read up to the end of a response head; returns (head, bytes after it)."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = await stream.receive_some(65536)
        assert chunk, f"closed before a head: {buffer!r}"
        buffer += chunk
    head, _, rest = buffer.partition(b"\r\n\r\n")
    return head, rest


async def read_to_eof(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


def masked_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A client's frame built by hand (masked, RFC 6455 §5.3), to send anything at all."""
    key = b"\x01\x02\x03\x04"
    first = (0x80 if fin else 0) | opcode
    size = len(payload)
    if size < 126:
        head = bytes([first, 0x80 | size])
    elif size < 65536:
        head = struct.pack("!BBH", first, 0x80 | 126, size)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, size)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + key + masked

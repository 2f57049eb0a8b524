"""A scriptable origin WebSocket server for the tests: trio + h11 + wsproto on 127.0.0.1.

Each test registers a handler by path (``origin.route("/x", handler)``; unrouted paths echo). A
handler gets a ``Peer`` whose verbs script the origin's behaviour down to the bytes on the wire:

- ``accept(subprotocol=..., deflate=..., then=b"...")``: the 101 (written by hand, not by the
  code under test), and optionally frames in the
  very same ``send_all`` (bytes right after the 101); ``reject(403, b"body")`` any HTTP answer.
- ``send(message)``, ``send_raw(bytes)`` (anything, e.g. a frame after our own Close was
  received — wsproto's high-level connection would refuse), ``frame(...)`` builds raw frames.
- ``receive()`` the next message (pings are answered and counted), a ``Closed`` when the peer's
  Close arrives, ``Closed(eof=True)`` at EOF, ``Closed(protocol_error=...)`` on a bad frame.
- ``close(code, reason)`` starts the closing handshake; ``reply_close()`` answers one;
  ``finish()`` closes TCP the way a server should (FIN first, then read to EOF).
- ``drop(rst=False)``: close TCP without a Close frame, with FIN, or with RST (SO_LINGER 0).

Every peer is recorded in ``origin.peers`` (request head, messages, Close received, how TCP
ended), so tests can assert on what the origin saw.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import h11
import trio
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import FrameProtocol, Opcode, ParseFailed

Handler = Callable[["Peer"], Awaitable[None]]
Message = str | bytes
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@dataclass
class Closed:
    """The peer's Close frame (``code`` None: no code), or ``eof`` when TCP ended without one."""

    code: int | None = None
    reason: str = ""
    eof: bool = False
    #: The close code wsproto's parser gave for a frame that broke RFC 6455.
    protocol_error: int | None = None


@dataclass
class PeerRecord:
    target: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    close: Closed | None = None
    pings: int = 0
    pongs: int = 0
    saw_eof: bool = False
    #: Set when the TCP connection to the proxy has ended (EOF or error seen, socket closed).
    ended: trio.Event = field(default_factory=trio.Event)
    saw_reset: bool = False

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


def raw_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv1: bool = False) -> bytes:
    """An unmasked frame (a server's), built by hand so tests can send anything at all."""
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    size = len(payload)
    if size < 126:
        head = bytes([first, size])
    elif size < 65536:
        head = struct.pack("!BBH", first, 126, size)
    else:
        head = struct.pack("!BBQ", first, 127, size)
    return head + payload


def close_frame(code: int | None = None, reason: str = "") -> bytes:
    payload = b"" if code is None else struct.pack("!H", code) + reason.encode()
    return raw_frame(0x8, payload)


class Peer:
    def __init__(self, origin: WsOrigin, stream: trio.SocketStream, record: PeerRecord) -> None:
        self.origin = origin
        self.stream = stream
        self.record = record
        self._after_head = b""
        self._proto = FrameProtocol(client=False, extensions=[])
        self._message: list[Any] = []
        self._closed = False
        self.deflate: PerMessageDeflate | None = None

    # --- handshake ----------------------------------------------------------------------------

    async def read_request(self) -> None:
        """Read the upgrade request head; bytes after it are kept for the first frames."""
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("closed before a request head")
            buffer += data
        head, _, self._after_head = buffer.partition(b"\r\n\r\n")
        parser = h11.Connection(h11.SERVER)
        parser.receive_data(head + b"\r\n\r\n")
        event = parser.next_event()
        assert isinstance(event, h11.Request)
        self.record.target = event.target
        self.record.headers = list(event.headers.raw_items())

    def _offers(self, name: bytes) -> list[str]:
        return [
            item.strip()
            for key, value in self.record.headers
            if key.lower() == name
            for item in value.decode().split(",")
            if item.strip()
        ]

    async def accept(
        self,
        *,
        subprotocol: str | None = None,
        deflate: PerMessageDeflate | bool = False,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
        then: bytes = b"",
    ) -> None:
        """The 101 (by hand, RFC 6455 §4.2.2), plus ``then`` in the same write."""
        key = self.record.header(b"sec-websocket-key") or b""
        accept = base64.b64encode(hashlib.sha1(key.strip() + _GUID).digest())
        lines = [
            b"HTTP/1.1 101 Switching Protocols",
            b"Upgrade: websocket",
            b"Connection: Upgrade",
            b"Sec-WebSocket-Accept: " + accept,
        ]
        if subprotocol is not None:
            lines.append(b"Sec-WebSocket-Protocol: " + subprotocol.encode())
        extensions: list[Any] = []
        if deflate:
            for offer in self._offers(b"sec-websocket-extensions"):
                if not offer.startswith("permessage-deflate"):
                    continue
                extension = (
                    deflate if isinstance(deflate, PerMessageDeflate) else (PerMessageDeflate())
                )
                answer = extension.accept(offer)
                if answer is None:
                    continue
                value = "permessage-deflate" + (f"; {answer}" if answer else "")
                lines.append(b"Sec-WebSocket-Extensions: " + value.encode())
                extensions = [extension]
                self.deflate = extension
                break
        lines += [name + b": " + value for name, value in extra_headers or []]
        self._proto = FrameProtocol(client=False, extensions=extensions)
        await self.stream.send_all(b"\r\n".join(lines) + b"\r\n\r\n" + then)
        if self._after_head:
            self._proto.receive_bytes(self._after_head)

    async def reject(
        self, status: int, body: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        lines = [b"HTTP/1.1 %d Nope" % status]
        lines += [name + b": " + value for name, value in headers or []]
        lines.append(b"Content-Length: %d" % len(body))
        await self.stream.send_all(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        await self.finish()

    # --- messages -----------------------------------------------------------------------------

    def frame(self, message: Message, *, fin: bool = True) -> bytes:
        """A data frame (compressed when deflate was negotiated), no state checks: valid
        after a Close was received, too."""
        return bytes(self._proto.send_data(message, fin))

    async def send(self, message: Message) -> None:
        await self.stream.send_all(self.frame(message))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def ping(self, payload: bytes = b"hi") -> None:
        await self.stream.send_all(bytes(self._proto.ping(payload)))

    async def receive(self) -> Message | Closed:
        """The next whole message, or how the peer ended."""
        while True:
            try:
                for frame in self._proto.received_frames():
                    opcode = frame.opcode
                    if opcode in (Opcode.TEXT, Opcode.BINARY):
                        self._message.append(frame.payload)
                        if frame.message_finished:
                            parts, self._message = self._message, []
                            joiner: Any = "" if opcode is Opcode.TEXT else b""
                            message: Message = joiner.join(parts)
                            self.record.messages.append(message)
                            return message
                    elif opcode is Opcode.PING:
                        self.record.pings += 1
                        payload = cast("bytes", frame.payload)
                        await self.stream.send_all(bytes(self._proto.pong(payload)))
                    elif opcode is Opcode.PONG:
                        self.record.pongs += 1
                    elif opcode is Opcode.CLOSE:
                        code, reason = cast("tuple[int, str]", frame.payload)
                        closed = Closed(None if code == 1005 else int(code), reason)
                        self.record.close = closed
                        return closed
            except ParseFailed as exc:
                closed = Closed(eof=False, protocol_error=int(exc.code))
                self.record.close = closed
                return closed
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.record.saw_reset = True
                data = b""
            if not data:
                self.record.close = self.record.close or Closed(eof=True)
                return Closed(eof=True)
            self._proto.receive_bytes(data)

    async def receive_message(self) -> Message:
        got = await self.receive()
        assert not isinstance(got, Closed), f"expected a message, got {got}"
        return got

    # --- closing ------------------------------------------------------------------------------

    async def close(self, code: int | None = 1000, reason: str = "") -> None:
        """Start the closing handshake (a Close frame, no TCP change)."""
        await self.stream.send_all(close_frame(code, reason))

    async def reply_close(self, code: int | None = None, reason: str = "") -> None:
        """Answer the peer's Close (echoing its code unless told otherwise)."""
        got = self.record.close
        if code is None and got is not None and not got.eof:
            code, reason = got.code, got.reason
        await self.stream.send_all(close_frame(code, reason))

    async def wait_close(self) -> Closed:
        """Receive (recording messages) until the peer's Close or EOF."""
        while True:
            got = await self.receive()
            if isinstance(got, Closed):
                return got

    async def finish(self, timeout: float = 5.0) -> None:
        """End TCP as a server should after a closing handshake: FIN, read to EOF, close."""
        with trio.move_on_after(timeout):
            try:
                await self.stream.send_eof()
                while await self.stream.receive_some(65536):
                    pass
                self.record.saw_eof = True
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.record.saw_reset = True
        await trio.aclose_forcefully(self.stream)
        self.record.ended.set()

    async def wait_eof(self, timeout: float = 5.0) -> None:
        """Read (discarding) until the proxy closes TCP, then close ours."""
        with trio.move_on_after(timeout):
            try:
                while await self.stream.receive_some(65536):
                    pass
                self.record.saw_eof = True
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.record.saw_reset = True
        await trio.aclose_forcefully(self.stream)
        self.record.ended.set()

    async def drop(self, *, rst: bool = False) -> None:
        """Close TCP without a Close frame: FIN, or RST with SO_LINGER 0."""
        if rst:
            self.stream.socket.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        await trio.aclose_forcefully(self.stream)
        self.record.ended.set()

    # --- canned behaviours --------------------------------------------------------------------

    async def echo_until_close(self) -> None:
        """Echo every message; on the peer's Close, echo it and finish (server closes first)."""
        while True:
            got = await self.receive()
            if isinstance(got, Closed):
                if not got.eof and got.protocol_error is None:
                    await self.reply_close()
                    await self.finish()
                return
            await self.send(got)


async def echo(peer: Peer) -> None:
    await peer.accept(deflate=True)
    await peer.echo_until_close()


class WsOrigin:
    """Serves WebSocket peers on 127.0.0.1 (see the module docstring)."""

    def __init__(self) -> None:
        self.handlers: dict[bytes, Handler] = {}
        self.peers: list[PeerRecord] = []
        self.port = 0
        self.connected = trio.Event()
        self.errors: list[BaseException] = []

    def route(self, path: str, handler: Handler) -> None:
        self.handlers[path.encode()] = handler

    def url(self, path: str = "/", scheme: str = "ws") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    async def serve(
        self, *, task_status: trio.TaskStatus[WsOrigin] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = int(listeners[0].socket.getsockname()[1])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._handle, listeners)
            task_status.started(self)

    async def _handle(self, stream: trio.SocketStream) -> None:
        record = PeerRecord()
        self.peers.append(record)
        self.connected.set()
        peer = Peer(self, stream, record)
        try:
            await peer.read_request()
            path = record.target.split(b"?", 1)[0]
            handler = self.handlers.get(path, echo)
            await handler(peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError):
            record.saw_reset = True
        except Exception as exc:  # a failing script must fail the test, not vanish
            self.errors.append(exc)
            raise
        finally:
            await trio.aclose_forcefully(stream)
            record.ended.set()

    async def wait_peer(self, index: int = 0, timeout: float = 5.0) -> PeerRecord:
        with trio.fail_after(timeout):
            while len(self.peers) <= index:  # noqa: ASYNC110
                await trio.sleep(0.005)
        return self.peers[index]

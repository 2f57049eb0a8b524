"""The admin listener: ``/healthz``, ``/readyz`` and ``/metrics`` over a small trio + h11 server.

It runs in the daemon's own nursery on its own port (``admin.listen``), never through the proxy
port (the relay refuses to connect to it). It imports nothing from the rest of proxyd: the server
hands it a readiness callable, the Prometheus registry and extra routes, so observe/ stays a leaf.
Scrapes are generated on the event loop: ``generate_latest`` over our registry takes well under a
millisecond, so no thread is needed.

A route answers ``(status, content type, body)``, or a ``Streamed`` whose body is produced over
time (``GET /netlog?seconds=N``): the head goes out at once, then each chunk as the route's
``produce(send)`` hands it over (chunked framing; h11 closes the connection instead for an HTTP/1.0
client), each write bounded by the same timeout; the connection closes after it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Final

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

#: Sends one chunk of a streamed body.
Send = Callable[[bytes], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Streamed:
    """A route's answer whose body is produced over time by ``produce(send)``."""

    status: int
    content_type: bytes
    produce: Callable[[Send], Awaitable[None]]


Route = Callable[[h11.Request], Awaitable["tuple[int, bytes, bytes] | Streamed"]]
_TIMEOUT: Final = 30.0


class AdminServer:
    def __init__(
        self,
        registry: CollectorRegistry,
        is_ready: Callable[[], bool],
        routes: Mapping[bytes, Route] | None = None,
    ) -> None:
        self._registry = registry
        self._is_ready = is_ready
        self._routes = dict(routes or {})

    async def serve(self, listeners: list[trio.SocketListener]) -> None:
        await trio.serve_listeners(self._handle, listeners)

    async def _answer(self, request: h11.Request) -> tuple[int, bytes, bytes] | Streamed:
        path = request.target.split(b"?", 1)[0]
        if path in self._routes:
            return await self._routes[path](request)
        if request.method not in (b"GET", b"HEAD"):
            return 405, b"text/plain; charset=utf-8", b"method not allowed\n"
        if path == b"/healthz":
            return 200, b"text/plain; charset=utf-8", b"ok\n"
        if path == b"/readyz":
            if self._is_ready():
                return 200, b"text/plain; charset=utf-8", b"ready\n"
            return 503, b"text/plain; charset=utf-8", b"draining\n"
        if path == b"/metrics":
            return 200, CONTENT_TYPE_LATEST.encode("ascii"), generate_latest(self._registry)
        return 404, b"text/plain; charset=utf-8", b"not found: try /healthz, /readyz or /metrics\n"

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                with trio.move_on_after(_TIMEOUT) as scope:
                    event = conn.next_event()
                    while event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                        event = conn.next_event()
                if scope.cancelled_caught or not isinstance(event, h11.Request):
                    return
                with trio.move_on_after(_TIMEOUT):
                    # Skip whatever body came with it (admin requests carry none we use).
                    while not isinstance(body_event := conn.next_event(), h11.EndOfMessage):
                        if body_event is h11.NEED_DATA:
                            conn.receive_data(await stream.receive_some(65536))
                if conn.their_state not in (h11.DONE, h11.MUST_CLOSE):
                    return
                answer = await self._answer(event)
                if isinstance(answer, Streamed):
                    await _stream(conn, stream, event, answer)
                    return
                status, content_type, body = answer
                headers = [
                    (b"Content-Type", content_type),
                    (b"Content-Length", str(len(body)).encode("ascii")),
                    (b"Cache-Control", b"no-store"),
                ]
                data = conn.send(h11.Response(status_code=status, headers=headers))
                if event.method != b"HEAD":
                    data += conn.send(h11.Data(data=body))
                data += conn.send(h11.EndOfMessage())
                with trio.move_on_after(_TIMEOUT):
                    await stream.send_all(data)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("admin connection ended: %s", exc)
        finally:
            await trio.aclose_forcefully(stream)


async def _stream(
    conn: h11.Connection, stream: trio.SocketStream, request: h11.Request, answer: Streamed
) -> None:
    async def send_bytes(data: bytes) -> None:
        with trio.move_on_after(_TIMEOUT) as scope:
            await stream.send_all(data)
        if scope.cancelled_caught:
            raise trio.BrokenResourceError("the admin client stopped reading")

    async def send(chunk: bytes) -> None:
        if chunk:
            await send_bytes(conn.send(h11.Data(data=chunk)))

    headers = [
        (b"Content-Type", answer.content_type),
        (b"Cache-Control", b"no-store"),
        (b"Connection", b"close"),
    ]
    await send_bytes(conn.send(h11.Response(status_code=answer.status, headers=headers)))
    if request.method != b"HEAD":
        await answer.produce(send)
    await send_bytes(conn.send(h11.EndOfMessage()))

"""``relay.Session`` on its own, between two real loopback socket pairs: lifetime rules (one run,
nothing touched after the end, both sockets closed, outcome counted once), the close timeout,
TCP close order, bounded inflation, and drain."""

from __future__ import annotations

import tracemalloc
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from wsproto.frame_protocol import Frame, FrameProtocol, Opcode

from proxyd.observe.metrics import Metrics
from proxyd.websocket import Outcome, Session, SessionSettings, SessionStats
from proxyd.websocket.handshake import negotiate_client_deflate


async def stream_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    near = await trio.open_tcp_stream("127.0.0.1", port)
    far = await listeners[0].accept()
    for listener in listeners:
        await listener.aclose()
    return near, far


class WirePeer:
    """One end of a hop, speaking frames through wsproto's FrameProtocol."""

    def __init__(self, stream: trio.SocketStream, *, client: bool, extensions: Any = ()) -> None:
        self.stream = stream
        self.proto = FrameProtocol(client=client, extensions=list(extensions))
        self.frames: list[Frame] = []

    async def send(self, data: str | bytes) -> None:
        await self.stream.send_all(bytes(self.proto.send_data(data, True)))

    async def close(self, code: int | None = 1000, reason: str = "") -> None:
        await self.stream.send_all(bytes(self.proto.close(code, reason or None)))

    async def next_frame(self) -> Frame | None:
        while not self.frames:
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.proto.receive_bytes(data)
            self.frames.extend(self.proto.received_frames())
        return self.frames.pop(0)

    async def next_close(self) -> tuple[int, str]:
        while True:
            frame = await self.next_frame()
            assert frame is not None, "EOF before a Close"
            if frame.opcode is Opcode.CLOSE:
                return frame.payload  # type: ignore[return-value]


@asynccontextmanager
async def session(
    settings: SessionSettings, metrics: Metrics | None = None, **kwargs: Any
) -> AsyncIterator[tuple[Session, WirePeer, WirePeer, trio.Event]]:
    client_near, client_far = await stream_pair()
    origin_near, origin_far = await stream_pair()
    relay = Session(client_far, origin_near, settings, metrics=metrics, **kwargs)
    done = trio.Event()
    results: list[SessionStats] = []

    async def run() -> None:
        results.append(await relay.run())
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        client = WirePeer(client_near, client=True)
        origin = WirePeer(origin_far, client=False)
        try:
            yield relay, client, origin, done
        finally:
            with trio.fail_after(5):
                await done.wait()
            await client_near.aclose()
            await origin_far.aclose()


async def test_clean_session_closes_both_sockets_and_counts_once() -> None:
    metrics = Metrics()
    settings = SessionSettings(close_timeout=1.0)
    with trio.fail_after(5):
        async with session(settings, metrics) as (relay, client, origin, done):
            await client.send("hello")
            frame = await origin.next_frame()
            assert frame is not None and frame.payload == "hello"
            await client.close(4001, "bye")
            assert await origin.next_close() == (4001, "bye")
            await origin.close(4001, "bye")
            assert await client.next_close() == (4001, "bye")
            assert await client.next_frame() is None  # the proxy's FIN: it is the server
            await client.stream.aclose()
            await origin.stream.send_eof()  # the origin closes its side first
            assert await origin.next_frame() is None
            await done.wait()
            relay.drain()  # after the end: a no-op, nothing is touched
    assert relay.is_done
    assert relay.stats.outcome is Outcome.CLEAN
    assert (relay.stats.messages_up, relay.stats.bytes_up) == (1, 5)
    assert metrics.ws_sessions.labels("clean")._value.get() == 1
    assert metrics.ws_sessions_active._value.get() == 0
    for hop in relay._hops:
        assert isinstance(hop.stream, trio.SocketStream)
        assert hop.stream.socket.fileno() == -1  # closed
    with pytest.raises(RuntimeError):
        await relay.run()
    assert metrics.ws_sessions.labels("clean")._value.get() == 1


async def test_the_origin_hop_waits_for_the_origin_to_close_tcp_first() -> None:
    """RFC 6455 §7.1.1: the server closes TCP first. On the origin hop proxyd is the client: after
    the handshake it waits for the origin's FIN (bounded by close_timeout) before its own."""
    settings = SessionSettings(close_timeout=2.0)
    with trio.fail_after(5):
        async with session(settings) as (relay, client, origin, _done):
            await client.close(1000)
            assert await origin.next_close() == (1000, "")
            await origin.close(1000)
            assert await client.next_close() == (1000, "")
            assert await client.next_frame() is None
            await client.stream.aclose()
            with trio.move_on_after(0.3) as waited:
                await origin.next_frame()  # nothing may come, not even EOF
            assert waited.cancelled_caught
            await origin.stream.send_eof()
            assert await origin.next_frame() is None
    assert relay.stats.outcome is Outcome.CLEAN


async def test_close_timeout_bounds_the_wait_for_a_reply() -> None:
    settings = SessionSettings(close_timeout=0.3)
    with trio.fail_after(5):
        async with session(settings) as (relay, client, origin, _done):
            await client.close(1000, "bye")
            assert await origin.next_close() == (1000, "bye")
            # The origin never replies: the client hears why, within close_timeout.
            assert await client.next_close() == (
                1011,
                "origin did not complete the closing handshake within 0.3s",
            )
            assert await client.next_frame() is None
            await client.stream.aclose()
    assert relay.stats.outcome is Outcome.TIMEOUT


async def test_a_deflate_bomb_is_refused_with_1009_in_bounded_memory() -> None:
    limit = 256 << 10
    negotiated = negotiate_client_deflate(("permessage-deflate",), limit)
    assert negotiated is not None
    deflate, _ = negotiated
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = compressor.compress(bytes(64 << 20)) + compressor.flush(zlib.Z_SYNC_FLUSH)
    bomb = FrameProtocol(client=True, extensions=[])._serialize_frame(Opcode.BINARY, body[:-4])
    bomb[0] |= 0x40  # RSV1: compressed
    settings = SessionSettings(max_message_size=limit, close_timeout=1.0)
    tracemalloc.start()
    try:
        with trio.fail_after(10):
            async with session(settings, client_deflate=deflate) as (relay, client, origin, _):
                await client.stream.send_all(bytes(bomb))
                code, _reason = await client.next_close()
                assert code == 1009
                assert await origin.next_close() == (
                    1001,
                    "client sent a message larger than the limit",
                )
                await origin.close(1001)
                assert await client.next_frame() is None
                await client.stream.aclose()
                await origin.stream.send_eof()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 * limit  # 64 MiB inflated would need 256 times the limit
    assert relay.stats.outcome is Outcome.TOO_BIG
    assert relay.stats.bytes_up == 0


async def test_drain_sends_1001_to_both_and_waits_for_both_replies() -> None:
    settings = SessionSettings(close_timeout=2.0)
    with trio.fail_after(5):
        async with session(settings) as (relay, client, origin, done):
            await client.send("x")
            assert await origin.next_frame() is not None
            relay.drain()
            relay.drain()
            assert await client.next_close() == (1001, "proxy shutting down")
            assert await origin.next_close() == (1001, "proxy shutting down")
            assert not done.is_set()  # it waits for the replies
            await client.close(1001)
            await origin.close(1001)
            assert await client.next_frame() is None
            await client.stream.aclose()
            await origin.stream.send_eof()
    assert relay.stats.outcome is Outcome.DRAINED
    assert relay.stats.initiator == "proxy"


async def test_cancelled_from_outside_is_aborted_and_still_closes_both_sockets() -> None:
    metrics = Metrics()
    client_near, client_far = await stream_pair()
    origin_near, origin_far = await stream_pair()
    relay = Session(client_far, origin_near, SessionSettings(), metrics=metrics)
    with trio.move_on_after(0.2):
        await relay.run()
    assert relay.stats.outcome is Outcome.ABORTED
    assert metrics.ws_sessions.labels("aborted")._value.get() == 1
    assert client_far.socket.fileno() == -1 and origin_near.socket.fileno() == -1
    assert await client_near.receive_some(10) == b""
    await client_near.aclose()
    await origin_far.aclose()

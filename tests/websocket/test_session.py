"""``relay.Session`` on its own, between two real loopback socket pairs: lifetime rules (one run,
nothing touched after the end, both sockets closed, outcome counted once), the close timeout,
TCP close order, bounded inflation, and drain."""

from __future__ import annotations

import gc
import tracemalloc
import weakref
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


# --- the run's deadlines (relay._Deadlines) -----------------------------------------------------


def task_names() -> list[str]:
    """The names of every task of the run."""
    root = trio.lowlevel.current_root_task()
    assert root is not None
    names: list[str] = []
    pending = [root]
    while pending:
        task = pending.pop()
        names.append(task.name)
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)
    return names


def session_tasks() -> list[str]:
    """The tasks a session runs besides its origin reader (a per-session timer task, or a task
    per hop for the end of the handshake: there should be none in the common case)."""
    return [name for name in task_names() if "Session._" in name and "_read_loop" not in name]


async def test_after_the_handshake_a_peer_that_keeps_its_side_open_is_closed_by_the_deadline() -> (
    None
):
    """FinishHop: proxyd (the server on the client hop) sends its FIN at once and gives the
    client close_timeout to close its side; then it closes. No task waits for that: the run's
    deadline task does it."""
    settings = SessionSettings(close_timeout=0.4)
    with trio.fail_after(5):
        async with session(settings) as (relay, client, origin, done):
            await origin.close(1000, "done")
            assert await client.next_close() == (1000, "done")
            await client.close(1000, "done")
            assert await origin.next_close() == (1000, "done")
            assert await client.next_frame() is None  # our FIN came right after our Close
            await origin.stream.send_eof()  # the origin closes its side; the client does not
            started = trio.current_time()
            await trio.sleep(0.1)
            assert not done.is_set()
            assert session_tasks() == []  # no task per hop, no timer task per session
            assert relay._timer is not None  # the run's deadline task holds the wait
            await done.wait()
            waited = trio.current_time() - started
    assert 0.2 < waited < 1.5
    assert relay.stats.outcome is Outcome.CLEAN
    client_hop = relay._hops[0].stream
    assert isinstance(client_hop, trio.SocketStream) and client_hop.socket.fileno() == -1


async def test_sessions_share_one_deadline_task_and_keep_their_pings() -> None:
    """Three sessions with keepalive: their pings are due all the time, yet the run has one
    task for all their deadlines and none per session."""
    settings = SessionSettings(close_timeout=1.0, ping_interval=0.1, pong_timeout=2.0)
    with trio.fail_after(10):
        async with (
            session(settings) as (_r1, client1, origin1, _d1),
            session(settings) as (_r2, client2, origin2, _d2),
            session(settings) as (_r3, client3, origin3, _d3),
        ):
            for peer in (origin1, origin2, origin3, client1, client2, client3):
                frame = await peer.next_frame()  # the proxy's ping (wsproto answers it)
                assert frame is not None and frame.opcode is Opcode.PING
            assert session_tasks() == []
            for client, origin in ((client1, origin1), (client2, origin2), (client3, origin3)):
                await client.close(1000)
                assert (await origin.next_close())[0] == 1000
                await origin.close(1000)
                assert (await client.next_close())[0] == 1000
                assert await client.next_frame() is None
                await client.stream.aclose()
                await origin.stream.send_eof()
    assert task_names().count("proxyd WebSocket session deadlines") == 1


async def test_a_finished_session_is_not_held_by_its_deadlines() -> None:
    """A deadline that no longer matters (the reply came in time, the session ended) leaves
    nothing behind that keeps the session's objects alive."""
    settings = SessionSettings(close_timeout=30.0)
    with trio.fail_after(5):
        async with session(settings) as (relay, client, origin, _done):
            await client.close(1000)  # a reply deadline 30 s from now
            assert await origin.next_close() == (1000, "")
            await origin.close(1000)
            assert await client.next_close() == (1000, "")
            assert await client.next_frame() is None
            await client.stream.aclose()
            await origin.stream.send_eof()
    ref = weakref.ref(relay)
    del relay
    gc.collect()
    assert ref() is None

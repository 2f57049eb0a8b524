"""Sessions through the real daemon, each scenario on both entry paths (``absolute``: a wsproto
client sending ``GET ws://...``; ``connect``: the websockets library through a CONNECT tunnel).

The origin is ``ws_origin.WsOrigin``, scripted per test. Every wait is bounded; "reported
within a second" is literally ``trio.fail_after(1)`` around the wait for the report.
"""

from __future__ import annotations

import os

import httpx
import pytest
import trio

from tests.conftest import RunningProxy, StartProxy, eventually
from tests.websocket.clients import (
    KINDS,
    WebsocketsClient,
    WsprotoClient,
    masked_frame,
    open_client,
)
from tests.websocket.ws_origin import Closed, Peer, WsOrigin, raw_frame

pytestmark = pytest.mark.parametrize("kind", KINDS)


async def metrics_text(proxy: RunningProxy) -> str:
    async with httpx.AsyncClient(trust_env=False) as http:
        return (await http.get(proxy.admin_url + "/metrics")).text


async def session_outcome(proxy: RunningProxy, outcome: str) -> None:
    """Wait (bounded) until the proxy has counted one session with ``outcome``."""
    needle = f'proxyd_websocket_sessions_total{{outcome="{outcome}"}} 1.0'
    with trio.fail_after(5):
        while needle not in await metrics_text(proxy):  # noqa: ASYNC110 (polling /metrics)
            await trio.sleep(0.02)


# --- graceful close forwarding ----------------------------------------------------------------


async def test_client_close_code_and_reason_reach_the_origin(
    kind: str, ws_proxy: RunningProxy, ws_origin: WsOrigin
) -> None:
    """The client's 4001 "bye" reaches the origin as is; the origin's echo comes back; both
    TCP connections end with FIN (no reset) — the origin's side first on the origin hop."""
    with trio.fail_after(5):
        async with open_client(kind, ws_proxy.port, ws_origin.url("/echo")) as client:
            await client.send("hi")
            assert await client.receive() == "hi"
            closed = await client.close(4001, "bye")
            assert (closed.code, closed.reason) == (4001, "bye")
            if isinstance(client, WsprotoClient):
                assert client.saw_eof and not client.saw_reset
        peer = ws_origin.peers[0]
        await peer.ended.wait()
    assert peer.close == Closed(4001, "bye")
    assert peer.saw_eof and not peer.saw_reset
    await session_outcome(ws_proxy, "clean")
    text = await metrics_text(ws_proxy)
    assert 'proxyd_websocket_close_codes_total{code="4xxx",initiator="client"} 1.0' in text


async def test_origin_close_code_and_reason_reach_the_client(
    kind: str, ws_proxy: RunningProxy, ws_origin: WsOrigin
) -> None:
    replied = trio.Event()

    async def closing(peer: Peer) -> None:
        await peer.accept()
        assert await peer.receive() == "go"
        await peer.close(4002, "server bye")
        got = await peer.wait_close()
        assert got == Closed(4002, "server bye")  # the client's echo, forwarded back
        replied.set()
        await peer.finish()

    ws_origin.route("/closing", closing)
    with trio.fail_after(5):
        async with open_client(kind, ws_proxy.port, ws_origin.url("/closing")) as client:
            await client.send("go")
            closed = await client.wait_close()
            assert (closed.code, closed.reason) == (4002, "server bye")
            if isinstance(client, WsprotoClient):
                assert client.saw_eof and not client.saw_reset  # the proxy closed first: FIN
        await replied.wait()
        await ws_origin.peers[0].ended.wait()
    assert not ws_origin.peers[0].saw_reset
    await session_outcome(ws_proxy, "clean")


async def test_a_close_without_code_is_forwarded_without_code(
    kind: str, ws_proxy: RunningProxy, ws_origin: WsOrigin
) -> None:
    with trio.fail_after(5):
        async with open_client(kind, ws_proxy.port, ws_origin.url("/echo")) as client:
            closed = await client.close(None)
            assert closed.code is None  # the origin's echo had no code either
        await ws_origin.peers[0].ended.wait()
    assert ws_origin.peers[0].close == Closed(None, "")
    text = await metrics_text(ws_proxy)
    assert 'proxyd_websocket_close_codes_total{code="1005",initiator="client"} 1.0' in text


async def test_an_origin_close_without_code_reaches_the_client_without_code(
    kind: str, ws_proxy: RunningProxy, ws_origin: WsOrigin
) -> None:
    async def bare_close(peer: Peer) -> None:
        await peer.accept()
        await peer.close(None)
        assert await peer.wait_close() == Closed(None, "")
        await peer.finish()

    ws_origin.route("/bare", bare_close)
    with trio.fail_after(5):
        async with open_client(kind, ws_proxy.port, ws_origin.url("/bare")) as client:
            closed = await client.wait_close()
            assert (closed.code, closed.eof) == (None, False)


async def test_origin_data_sent_after_the_client_close_still_arrives(
    kind: str, ws_proxy: RunningProxy, ws_origin: WsOrigin
) -> None:
    """The client closed; the origin has not: its last messages still reach the client, then its
    Close completes both handshakes (RFC 6455 §5.5.1)."""

    async def late(peer: Peer) -> None:
        await peer.accept()
        got = await peer.wait_close()
        assert got == Closed(1000, "done")
        for index in range(3):
            await peer.send_raw(peer.frame(f"late {index}"))
        await peer.reply_close(1000, "done too")
        await peer.finish()

    ws_origin.route("/late", late)
    with trio.fail_after(5):
        async with open_client(kind, ws_proxy.port, ws_origin.url("/late")) as client:
            closed = await client.close(1000, "done")
            assert (closed.code, closed.reason) == (1000, "done too")
            assert client.after_close == ["late 0", "late 1", "late 2"]
    await session_outcome(ws_proxy, "clean")


# --- vanished sides ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rst", "code", "reason"),
    [(False, 1001, "origin went away"), (True, 1011, "origin connection was reset")],
)
async def test_an_origin_that_drops_is_reported_within_a_second(
    kind: str, ws_proxy: RunningProxy, ws_origin: WsOrigin, rst: bool, code: int, reason: str
) -> None:
    async def drop(peer: Peer) -> None:
        await peer.accept()
        await peer.receive()
        await peer.drop(rst=rst)

    ws_origin.route("/drop", drop)
    with trio.fail_after(5):
        async with open_client(kind, ws_proxy.port, ws_origin.url("/drop")) as client:
            await client.send("now")
            with trio.fail_after(1):
                closed = await client.wait_close()
            assert (closed.code, closed.reason) == (code, reason)
    await session_outcome(ws_proxy, "peer_vanished")
    text = await metrics_text(ws_proxy)
    assert f'proxyd_websocket_close_codes_total{{code="{code}",initiator="proxy"}} 1.0' in text


@pytest.mark.parametrize(
    ("rst", "code", "reason"),
    [(False, 1001, "client went away"), (True, 1011, "client connection was reset")],
)
async def test_a_client_that_drops_is_reported_within_a_second(
    kind: str, ws_proxy: RunningProxy, ws_origin: WsOrigin, rst: bool, code: int, reason: str
) -> None:
    reported = trio.Event()
    seen: list[Closed] = []

    async def watch(peer: Peer) -> None:
        await peer.accept()
        seen.append(await peer.wait_close())
        reported.set()
        await peer.reply_close()
        await peer.finish()

    ws_origin.route("/watch", watch)
    with trio.fail_after(5):
        async with open_client(kind, ws_proxy.port, ws_origin.url("/watch")) as client:
            await client.send("about to vanish")
            await eventually(lambda: bool(ws_origin.peers and ws_origin.peers[0].messages))
            await client.drop(rst=rst)
            with trio.fail_after(1):
                await reported.wait()
    assert seen == [Closed(code, reason)]
    await session_outcome(ws_proxy, "peer_vanished")


# --- messages ---------------------------------------------------------------------------------


async def test_a_16_mib_message_both_ways(
    kind: str, ws_proxy: RunningProxy, ws_origin: WsOrigin
) -> None:
    payload = os.urandom(16 << 20)
    with trio.fail_after(20):
        async with open_client(kind, ws_proxy.port, ws_origin.url("/echo")) as client:
            await client.send(payload)
            assert await client.receive() == payload
            await client.close()
    assert ws_origin.peers[0].messages[0] == payload


async def test_a_thousand_messages_in_order(
    kind: str, ws_proxy: RunningProxy, ws_origin: WsOrigin
) -> None:
    with trio.fail_after(10):
        async with open_client(kind, ws_proxy.port, ws_origin.url("/echo")) as client:

            async def sender() -> None:
                for index in range(1000):
                    await client.send(f"m{index}" if index % 2 else f"m{index}".encode())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                for index in range(1000):
                    expected = f"m{index}" if index % 2 else f"m{index}".encode()
                    assert await client.receive() == expected
            await client.close()
    text = await metrics_text(ws_proxy)
    assert 'proxyd_websocket_messages_total{direction="upload"} 1000.0' in text
    assert 'proxyd_websocket_messages_total{direction="download"} 1000.0' in text


async def test_fragmented_messages_keep_their_boundaries(
    kind: str, ws_proxy: RunningProxy, ws_origin: WsOrigin
) -> None:
    async def fragments(peer: Peer) -> None:
        await peer.accept()
        frames = raw_frame(0x1, b"he", fin=False) + raw_frame(0x9, b"ping in between")
        frames += raw_frame(0x0, "llo wö".encode()[:-1], fin=False)  # a character split
        frames += raw_frame(0x0, "ö".encode()[1:] + b"rld", fin=True)
        frames += raw_frame(0x2, b"\x01", fin=False) + raw_frame(0x0, b"\x02", fin=True)
        await peer.send_raw(frames)
        await peer.echo_until_close()

    ws_origin.route("/fragments", fragments)
    with trio.fail_after(5):
        async with open_client(kind, ws_proxy.port, ws_origin.url("/fragments")) as client:
            assert await client.receive() == "hello wörld"
            assert await client.receive() == b"\x01\x02"
            await client.close()
    assert ws_origin.peers[0].pongs == 1  # the proxy answered the origin's ping itself


async def test_pings_are_answered_per_hop(
    kind: str, ws_proxy: RunningProxy, ws_origin: WsOrigin
) -> None:
    async def pinging(peer: Peer) -> None:
        await peer.accept()
        await peer.ping(b"origin ping")
        await peer.echo_until_close()

    ws_origin.route("/ping", pinging)
    with trio.fail_after(5):
        async with open_client(kind, ws_proxy.port, ws_origin.url("/ping")) as client:
            await client.ping()  # answered by the proxy
            await client.send("after ping")
            assert await client.receive() == "after ping"
            await client.close()
    seen = ws_origin.peers[0]
    assert seen.pongs == 1  # its ping was answered by the proxy
    assert seen.pings == 0  # the client's ping never reached it


async def test_keepalive_pings_both_sides_and_a_dead_origin_ends_with_1011(
    kind: str, start_proxy: StartProxy, ws_origin: WsOrigin
) -> None:
    """The origin stops reading (its TCP is alive, its pongs never come): the live client gets
    1011 after pong_timeout."""
    stop = trio.Event()

    async def deaf(peer: Peer) -> None:
        await peer.accept()
        assert await peer.receive() == "hi"
        await stop.wait()

    ws_origin.route("/deaf", deaf)
    proxy = await start_proxy(
        **{
            "connect.allowed_ports": [ws_origin.port],
            "websocket.ping_interval": 0.1,
            "websocket.pong_timeout": 0.3,
        }
    )
    with trio.fail_after(5):
        async with open_client(kind, proxy.port, ws_origin.url("/deaf")) as client:
            await client.send("hi")
            closed = await client.wait_close()
            assert (closed.code, closed.reason) == (
                1011,
                "origin did not answer a ping within 0.3s",
            )
    stop.set()
    await session_outcome(proxy, "timeout")
    text = await metrics_text(proxy)
    assert "proxyd_websocket_pong_timeouts_total 1.0" in text
    assert "proxyd_websocket_pings_total" in text


async def test_keepalive_keeps_a_quiet_session_with_live_peers(
    kind: str, start_proxy: StartProxy, ws_origin: WsOrigin
) -> None:
    """Both peers answer pings: nothing ends. Short HTTP keep-alive and tunnel idle timeouts
    do not apply to sessions (no idle timeout by default)."""
    proxy = await start_proxy(
        **{
            "connect.allowed_ports": [ws_origin.port],
            "websocket.ping_interval": 0.1,
            "websocket.pong_timeout": 0.5,
            "client.timeouts.idle": 0.2,
            "tunnel.idle_timeout": 0.2,
        }
    )
    with trio.fail_after(5):
        async with open_client(kind, proxy.port, ws_origin.url("/echo")) as client:
            with trio.move_on_after(0.7):
                got = await client.receive()  # answers the proxy's pings meanwhile
                pytest.fail(f"nothing should arrive, got {got!r}")
            await client.send("still open")
            assert await client.receive() == "still open"
            await client.close()
    assert ws_origin.peers[0].pings >= 3
    await session_outcome(proxy, "clean")


async def test_idle_timeout_when_configured_closes_both_with_1001(
    kind: str, start_proxy: StartProxy, ws_origin: WsOrigin
) -> None:
    proxy = await start_proxy(
        **{"connect.allowed_ports": [ws_origin.port], "websocket.idle_timeout": 0.3}
    )
    with trio.fail_after(5):
        async with open_client(kind, proxy.port, ws_origin.url("/echo")) as client:
            closed = await client.wait_close()
            assert (closed.code, closed.reason) == (1001, "session idle for 0.3s")
        await ws_origin.peers[0].ended.wait()
    assert ws_origin.peers[0].close == Closed(1001, "session idle for 0.3s")
    await session_outcome(proxy, "timeout")


# --- limits and protocol errors ---------------------------------------------------------------


async def test_an_oversized_client_message_is_1009_to_it_and_1001_to_the_origin(
    kind: str, start_proxy: StartProxy, ws_origin: WsOrigin
) -> None:
    proxy = await start_proxy(
        **{"connect.allowed_ports": [ws_origin.port], "websocket.max_message_size": 1000}
    )
    with trio.fail_after(5):
        async with open_client(kind, proxy.port, ws_origin.url("/echo")) as client:
            await client.send(b"x" * 1000)
            assert await client.receive() == b"x" * 1000
            await client.send(b"x" * 1001)
            closed = await client.wait_close()
            assert closed.code == 1009
        await ws_origin.peers[0].ended.wait()
    assert ws_origin.peers[0].close == Closed(1001, "client sent a message larger than the limit")
    assert ws_origin.peers[0].messages == [b"x" * 1000]
    await session_outcome(proxy, "too_big")


async def test_an_oversized_origin_message_is_1009_to_it_and_1001_to_the_client(
    kind: str, start_proxy: StartProxy, ws_origin: WsOrigin
) -> None:
    seen: list[Closed] = []

    async def big(peer: Peer) -> None:
        await peer.accept(deflate=True)
        await peer.send("y" * 5000)
        seen.append(await peer.wait_close())
        await peer.finish()

    ws_origin.route("/big", big)
    proxy = await start_proxy(
        **{"connect.allowed_ports": [ws_origin.port], "websocket.max_message_size": 4096}
    )
    with trio.fail_after(5):
        async with open_client(kind, proxy.port, ws_origin.url("/big"), deflate=True) as client:
            closed = await client.wait_close()
            assert (closed.code, closed.reason) == (
                1001,
                "origin sent a message larger than the limit",
            )
        await ws_origin.peers[0].ended.wait()
    # Compressed on the origin hop: the limit applies to the inflated size.
    assert seen[0].code == 1009
    await session_outcome(proxy, "too_big")


async def test_invalid_utf8_from_the_client_is_1007_to_it_and_1001_to_the_origin(
    kind: str, ws_proxy: RunningProxy, ws_origin: WsOrigin
) -> None:
    with trio.fail_after(5):
        async with open_client(kind, ws_proxy.port, ws_origin.url("/echo")) as client:
            bad = masked_frame(0x1, b"\xff\xfe not utf-8")
            if isinstance(client, WsprotoClient):
                await client.send_raw(bad)
            else:
                assert isinstance(client, WebsocketsClient)
                await client.ws.stream.send_all(bad)
            closed = await client.wait_close()
            assert closed.code == 1007
        await ws_origin.peers[0].ended.wait()
    assert ws_origin.peers[0].close == Closed(1001, "client broke the WebSocket protocol")
    await session_outcome(ws_proxy, "protocol_error")


async def test_a_bad_frame_from_the_origin_is_1002_to_it_and_1001_to_the_client(
    kind: str, ws_proxy: RunningProxy, ws_origin: WsOrigin
) -> None:
    seen: list[Closed] = []

    async def broken(peer: Peer) -> None:
        await peer.accept()
        await peer.send_raw(b"\x83\x00")  # opcode 0x3 is reserved (RFC 6455 §5.2)
        seen.append(await peer.wait_close())
        await peer.finish()

    ws_origin.route("/broken", broken)
    with trio.fail_after(5):
        async with open_client(kind, ws_proxy.port, ws_origin.url("/broken")) as client:
            closed = await client.wait_close()
            assert (closed.code, closed.reason) == (1001, "origin broke the WebSocket protocol")
        await ws_origin.peers[0].ended.wait()
    assert seen[0].code == 1002
    await session_outcome(ws_proxy, "protocol_error")


# --- drain ------------------------------------------------------------------------------------


async def test_drain_closes_open_sessions_with_1001_and_waits_for_the_handshakes(
    kind: str, start_proxy: StartProxy, ws_origin: WsOrigin
) -> None:
    proxy = await start_proxy(**{"connect.allowed_ports": [ws_origin.port]})
    server = proxy.server
    with trio.fail_after(5):
        async with open_client(kind, proxy.port, ws_origin.url("/echo")) as client:
            await client.send("before drain")
            assert await client.receive() == "before drain"
            server.drain()
            closed = await client.wait_close()
            assert (closed.code, closed.reason) == (1001, "proxy shutting down")
        await ws_origin.peers[0].ended.wait()
        await server._stopped.wait()
    assert ws_origin.peers[0].close == Closed(1001, "proxy shutting down")
    assert not ws_origin.peers[0].saw_reset
    assert server.metrics.ws_sessions.labels("drained")._value.get() == 1


async def test_a_slow_reader_slows_the_sender_and_nothing_is_lost(
    kind: str, ws_proxy: RunningProxy, ws_origin: WsOrigin
) -> None:
    """The client reads nothing for a while: the origin's writes stall once the socket buffers
    on the way are full (a proxy that buffered would take all 64 MiB), then everything arrives
    in order once the client reads."""
    count = 1024
    size = 64 << 10
    sent: list[int] = []

    async def flood(peer: Peer) -> None:
        await peer.accept()
        for index in range(count):
            await peer.send(index.to_bytes(2, "big") * (size // 2))
            sent.append(index)
        await peer.echo_until_close()

    ws_origin.route("/flood", flood)
    with trio.fail_after(15):
        async with open_client(kind, ws_proxy.port, ws_origin.url("/flood")) as client:
            await eventually(lambda: len(sent) > 0)
            await trio.sleep(0.5)
            # Loopback socket buffers (a few MiB per socket, four sockets) hold the rest.
            assert len(sent) * size < 40 << 20, f"the origin wrote {len(sent)} messages unread"
            for index in range(count):
                assert await client.receive() == index.to_bytes(2, "big") * (size // 2)
            await client.close()
    assert len(sent) == count

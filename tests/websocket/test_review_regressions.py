"""Regression tests from the review of the relay: each failed before its fix (RFC sections in
the docstrings)."""

from __future__ import annotations

import socket
import struct
import zlib
from typing import cast

import pytest
import trio
import trio.testing
from wsproto.frame_protocol import FrameProtocol, Opcode

from proxyd.errors import BadResponse
from proxyd.websocket import Outcome, Session, SessionSettings
from proxyd.websocket.close import AbortHop, CloseMachine, SendPing, Side
from proxyd.websocket.frames import BoundedDeflate
from proxyd.websocket.handshake import (
    OriginAccept,
    _canonical_deflate,
    accept_token,
    check_origin_accept,
    negotiate_client_deflate,
)
from tests.conftest import RunningProxy, StartProxy, eventually
from tests.websocket.clients import (
    ABSOLUTE,
    KINDS,
    open_client,
    raw_open,
    read_head,
    read_to_eof,
    upgrade_request,
)
from tests.websocket.test_session import WirePeer, session, stream_pair
from tests.websocket.test_upgrade import metrics_text
from tests.websocket.ws_origin import Closed, Peer, WsOrigin, raw_frame


async def test_drain_before_run_is_not_lost() -> None:
    """run_upgrade: sessions.add(s); if is_draining(): s.drain(); then s.run()."""
    client_near, client_far = await stream_pair()
    origin_near, _origin_far = await stream_pair()
    relay = Session(client_far, origin_near, SessionSettings(close_timeout=1.0))
    relay.drain()  # before run(): the nursery does not exist yet
    client = WirePeer(client_near, client=True)
    got = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay.run)
        with trio.move_on_after(1.0):
            got = await client.next_frame()
        nursery.cancel_scope.cancel()
    assert got is not None and got.opcode is Opcode.CLOSE, "drain() before run() was lost"


def _bfinal_frame(text: bytes) -> bytes:
    # RFC 7692 §7.2.3.4: a sender may end a message with a BFINAL=1 block (fresh compressor
    # per message on its side). The receiver's inflater then reaches EOF.
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = c.compress(text) + c.flush(zlib.Z_FINISH)
    frame = FrameProtocol(client=True, extensions=[])._serialize_frame(Opcode.TEXT, body)
    frame[0] |= 0x40
    return bytes(frame)


async def test_bfinal_message_does_not_eat_the_next_message() -> None:
    negotiated = negotiate_client_deflate(("permessage-deflate",), 1 << 20)
    assert negotiated is not None
    deflate, _ = negotiated
    settings = SessionSettings(close_timeout=1.0)
    with trio.fail_after(5):
        async with session(settings, client_deflate=deflate) as (_relay, client, origin, _):
            await client.stream.send_all(_bfinal_frame(b"first message"))
            f1 = await origin.next_frame()
            await client.stream.send_all(_bfinal_frame(b"second message"))
            f2 = await origin.next_frame()
            await client.close(1000)
            await origin.next_close()
            await origin.close(1000)
            await client.next_close()
            await client.stream.aclose()
            await origin.stream.send_eof()
    assert f1 is not None and f1.payload == "first message"
    assert f2 is not None and f2.payload == "second message", f"got {f2}"


async def test_ping_after_our_close_is_still_answered() -> None:
    """RFC 6455 §5.5.2: a Ping is answered unless a Close was *received* from that peer."""
    settings = SessionSettings(close_timeout=1.0)
    with trio.fail_after(5):
        async with session(settings) as (_relay, client, origin, _):
            await client.close(4001, "bye")
            assert await origin.next_close() == (4001, "bye")
            await origin.stream.send_all(bytes(origin.proto.ping(b"still there?")))
            raw = b""
            with trio.move_on_after(0.5):
                raw = await origin.stream.receive_some(100)
            await origin.close(4001, "bye")
            await client.next_close()
            await client.stream.aclose()
            await origin.stream.send_eof()
    assert raw[:1] == b"\x8a", f"no pong: {raw!r}"


async def test_drain_during_origin_handshake_reaches_the_session(
    start_proxy: StartProxy, ws_origin: WsOrigin
) -> None:
    proxy = await start_proxy(
        **{"connect.allowed_ports": [ws_origin.port], "shutdown_timeout": 3.0}
    )
    may_accept = trio.Event()

    async def slow(peer: Peer) -> None:
        await may_accept.wait()
        await peer.accept()
        await peer.echo_until_close()

    ws_origin.route("/slow", slow)
    got: list[object] = []
    with trio.fail_after(8):
        async with trio.open_nursery() as nursery:

            async def run_client() -> None:
                async with open_client(ABSOLUTE, proxy.port, ws_origin.url("/slow")) as client:
                    started = trio.current_time()
                    got.append(await client.wait_close())
                    got.append(trio.current_time() - started)

            nursery.start_soon(run_client)
            await ws_origin.wait_peer(0)
            await trio.sleep(0.1)
            proxy.server.drain()  # SIGTERM while the origin has not answered yet
            await trio.sleep(0.1)
            may_accept.set()
    assert got[0] == Closed(1001, "proxy shutting down")
    elapsed = got[1]
    assert isinstance(elapsed, float)
    assert elapsed < 1.0, f"closed only after {elapsed:.1f}s (shutdown timeout cut it)"


# --- keepalive and slow readers ----------------------------------------------------------------


def test_the_pong_clock_restarts_while_writes_to_that_side_progress() -> None:
    """A ping written late (it waited for the hop's lock behind a batch), and a reader that
    keeps draining what we send, are not a dead peer; a peer that stops draining still is."""
    m = CloseMachine(now=0.0, close_timeout=1.0, ping_interval=10.0, pong_timeout=4.0)
    assert m.on_tick(10.0) == [SendPing(Side.CLIENT), SendPing(Side.ORIGIN)]
    m.on_pong(Side.ORIGIN)
    m.on_write_progress(Side.CLIENT, 11.0)  # the ping itself went out only now
    assert m.on_tick(14.0) == []
    assert m.next_deadline() == 15.0
    m.on_write_progress(Side.CLIENT, 14.5)  # a batch for the slow reader went out
    assert m.on_tick(15.0) == []
    m.on_write_progress(Side.ORIGIN, 16.0)  # no ping outstanding there: nothing changes
    assert m.on_tick(18.5)[0] == AbortHop(Side.CLIENT)  # no progress, no pong: dead
    assert m.pong_timeouts == 1


async def test_keepalive_spares_a_slow_but_live_reader() -> None:
    """The origin floods a client that reads slowly. The ping to the client queues behind
    megabytes of socket buffer, far longer than pong_timeout, yet the client is alive: it keeps
    reading, so the session must not be ended with 1011."""
    settings = SessionSettings(close_timeout=2.0, ping_interval=0.2, pong_timeout=1.0)
    frame = raw_frame(0x2, bytes(32 << 10))
    origin_lock = trio.Lock()  # the origin writes from two tasks
    stop = trio.Event()
    origin_closes: list[object] = []
    pings = 0
    with trio.fail_after(20):
        async with session(settings) as (relay, client, origin, done):
            # Big fixed buffers between the proxy and the client: ~2 MiB queue ahead of a ping,
            # while the proxy's writes still complete every ~170 KiB the client reads.
            proxy_side = relay._hops[Side.CLIENT].stream
            assert isinstance(proxy_side, trio.SocketStream)
            proxy_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 << 10)
            client.stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)

            async def flood() -> None:
                while not stop.is_set():
                    async with origin_lock:
                        await origin.stream.send_all(frame)

            async def origin_reader() -> None:
                while True:
                    got = await origin.next_frame()
                    if got is None:
                        return
                    if got.opcode is Opcode.PING:
                        async with origin_lock:
                            pong = origin.proto.pong(cast("bytes", got.payload))
                            await origin.stream.send_all(bytes(pong))
                    elif got.opcode is Opcode.CLOSE:
                        origin_closes.append(got.payload)
                        async with origin_lock:
                            await origin.stream.send_all(bytes(origin.proto.close(1000)))
                        return

            async def read_slowly(until: float, pause: float) -> None:
                nonlocal pings
                while trio.current_time() < until:
                    data = await client.stream.receive_some(16 << 10)
                    assert data, "the proxy ended the client hop"
                    client.proto.receive_bytes(data)
                    for got in client.proto.received_frames():
                        assert got.opcode is not Opcode.CLOSE, f"closed: {got.payload!r}"
                        if got.opcode is Opcode.PING:
                            pings += 1
                            pong = client.proto.pong(cast("bytes", got.payload))
                            await client.stream.send_all(bytes(pong))
                    await trio.sleep(pause)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood)
                nursery.start_soon(origin_reader)
                await read_slowly(trio.current_time() + 2.5, 0.02)  # ~800 KiB/s
                assert origin_closes == [], "the session was ended"
                assert relay._machine.pong_timeouts == 0
                stop.set()
                # Drain fast until the proxy's pings reach the client again, then close.
                with trio.fail_after(10):
                    while pings < 2:
                        await read_slowly(trio.current_time() + 0.05, 0)
                await client.close(1000)
                while (got := await client.next_frame()) is not None:
                    if got.opcode is Opcode.CLOSE:
                        break
                await client.stream.aclose()
                await origin.stream.send_eof()
            await done.wait()
    assert origin_closes == [(1000, "")]
    assert relay.stats.outcome is Outcome.CLEAN


# --- handshake: the origin's window bits ---------------------------------------------------------


def _origin_answer(extension: bytes) -> OriginAccept:
    key = b"dGhlIHNhbXBsZSBub25jZQ=="
    headers = [
        (b"Upgrade", b"websocket"),
        (b"Connection", b"Upgrade"),
        (b"Sec-WebSocket-Accept", accept_token(key)),
        (b"Sec-WebSocket-Extensions", extension),
    ]
    return check_origin_accept(
        headers, key, (), offered_deflate=True, max_message_size=1 << 20, via=None
    )


def test_window_bits_8_only_where_proxyd_inflates() -> None:
    accepted = _origin_answer(b"permessage-deflate; server_max_window_bits=8")
    assert accepted.deflate is not None
    assert accepted.deflate.server_max_window_bits == 15  # inflates any smaller window
    with pytest.raises(BadResponse):  # proxyd would have to compress with 8: zlib cannot
        _origin_answer(b"permessage-deflate; client_max_window_bits=8")
    # A client's offer that asks proxyd to compress with 8 bits stays refused.
    assert _canonical_deflate([("server_max_window_bits", "8")], offer=True) is None


@pytest.mark.parametrize("kind", KINDS)
async def test_origin_server_max_window_bits_8_is_accepted(
    kind: str, ws_proxy: RunningProxy, ws_origin: WsOrigin
) -> None:
    """RFC 7692 §7.1.2.1: server_max_window_bits may be 8 to 15; proxyd inflates with 15."""

    async def narrow(peer: Peer) -> None:
        extension = b"permessage-deflate; server_max_window_bits=8"
        await peer.accept(extra_headers=[(b"Sec-WebSocket-Extensions", extension)])
        compressor = zlib.compressobj(9, zlib.DEFLATED, -9)  # zlib's smallest raw window
        for _ in range(2):  # the second message refers back into the first (context kept)
            body = compressor.compress(b"through a narrow window")
            body += compressor.flush(zlib.Z_SYNC_FLUSH)
            await peer.send_raw(raw_frame(0x1, body[:-4], rsv1=True))  # RFC 7692 §7.2.1
        await peer.close(1000, "done")
        await peer.wait_close()
        await peer.finish()

    ws_origin.route("/narrow", narrow)
    with trio.fail_after(5):
        async with open_client(kind, ws_proxy.port, ws_origin.url("/narrow"), deflate=True) as c:
            assert await c.receive() == "through a narrow window"
            assert await c.receive() == "through a narrow window"
            assert await c.wait_close() == Closed(1000, "done")


# --- close codes on deflate hops ---------------------------------------------------------------


async def _raw_close(stream: trio.SocketStream) -> tuple[int | None, bytes]:
    """The first frame on ``stream``, which must be a Close, parsed by hand (wsproto's parser
    refuses 1014 itself)."""
    buffer = b""
    while True:
        if len(buffer) >= 2:
            size = buffer[1] & 0x7F
            masked = bool(buffer[1] & 0x80)
            end = 2 + (4 if masked else 0) + size
            if len(buffer) >= end:
                break
        data = await stream.receive_some(1024)
        assert data, f"EOF before a Close: {buffer!r}"
        buffer += data
    assert buffer[0] == 0x88, f"not a Close: {buffer!r}"
    payload = buffer[end - size : end]
    if masked:
        key = buffer[2:6]
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    if not payload:
        return None, b""
    return struct.unpack("!H", payload[:2])[0], payload[2:]


def _close(peer: WirePeer, code: int, reason: bytes) -> bytes:
    payload = struct.pack("!H", code) + reason
    return bytes(peer.proto._serialize_frame(Opcode.CLOSE, payload))


@pytest.mark.parametrize("closer", [Side.CLIENT, Side.ORIGIN])
async def test_close_code_1014_is_relayed_on_deflate_hops(closer: Side) -> None:
    """RFC 6455 §7.4.2, IANA: 1014 (Bad Gateway) is a valid code; plain hops relayed it, hops
    with permessage-deflate (wsproto's parser) answered it with 1002."""
    negotiated = negotiate_client_deflate(("permessage-deflate",), 1 << 20)
    assert negotiated is not None
    origin_deflate = BoundedDeflate(1 << 20)
    origin_deflate.finalize("permessage-deflate")
    settings = SessionSettings(close_timeout=1.0)
    with trio.fail_after(5):
        async with session(
            settings, client_deflate=negotiated[0], origin_deflate=origin_deflate
        ) as (relay, client, origin, _):
            first, second = (client, origin) if closer is Side.CLIENT else (origin, client)
            await first.stream.send_all(_close(first, 1014, b"bad gateway"))
            assert await _raw_close(second.stream) == (1014, b"bad gateway")
            await second.stream.send_all(_close(second, 1014, b"bad gateway"))
            assert await _raw_close(first.stream) == (1014, b"bad gateway")
            await client.stream.aclose()
            await origin.stream.send_eof()
    assert relay.stats.outcome is Outcome.CLEAN
    assert relay.stats.first_code == 1014


# --- client disconnects during the handshake ----------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("answer", ["accept", "reject"])
async def test_a_client_gone_before_its_answer_is_counted_and_logged_once(
    kind: str, answer: str, ws_proxy: RunningProxy, ws_origin: WsOrigin
) -> None:
    """The client resets while the origin thinks: writing the 101 (or the relayed 403) fails.
    That is a handshake failure (client_gone) with exactly one access-log line, the upgrade's."""
    asked = trio.Event()
    client_gone = trio.Event()

    async def late(peer: Peer) -> None:
        asked.set()
        await client_gone.wait()
        if answer == "accept":
            await peer.accept()
            await peer.wait_eof()
        else:
            await peer.reject(403, b"not you")

    ws_origin.route("/late", late)
    with trio.fail_after(5):
        stream = await raw_open(kind, ws_proxy.port, ws_origin.port)
        await stream.send_all(upgrade_request(kind, ws_origin.port, "/late"))
        await asked.wait()
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()  # RST: the proxy's next write to the client fails
        await trio.sleep(0.05)
        client_gone.set()
        await eventually(lambda: len(ws_proxy.access_lines()) >= 1)
        await trio.sleep(0.1)  # a second line would come now
    (line,) = ws_proxy.access_lines()
    assert f"GET ws://127.0.0.1:{ws_origin.port}/late " in line
    assert "error=client_gone" in line
    text = await metrics_text(ws_proxy)
    assert 'proxyd_websocket_handshake_failures_total{reason="client_gone"} 1.0' in text
    assert 'reason="origin_rejected"' not in text
    assert "proxyd_websocket_sessions_total{" not in text


# --- a trickling rejection ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_a_trickling_rejection_has_one_overall_deadline(
    kind: str, start_proxy: StartProxy, ws_origin: WsOrigin
) -> None:
    """Each read of the 403's body comes well within io_timeout, but the whole answer is bounded
    by handshake_timeout + io_timeout: the client gets what came, then the connection ends."""
    proxy = await start_proxy(
        **{
            "connect.allowed_ports": [ws_origin.port],
            "websocket.handshake_timeout": 0.3,
            "upstream.timeouts.idle_read": 0.3,
        }
    )

    async def trickle(peer: Peer) -> None:
        await peer.send_raw(b"HTTP/1.1 403 Nope\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(1000):  # 50 s at this pace
            await peer.send_raw(b"x")
            await trio.sleep(0.05)

    ws_origin.route("/trickle", trickle)
    with trio.fail_after(5):
        stream = await raw_open(kind, proxy.port, ws_origin.port)
        await stream.send_all(upgrade_request(kind, ws_origin.port, "/trickle"))
        head, rest = await read_head(stream)
        body = rest + await read_to_eof(stream)
        await stream.aclose()
        await eventually(lambda: len(proxy.access_lines()) == 1)
    assert head.startswith(b"HTTP/1.1 403")
    assert 0 < len(body) < 1000
    assert set(body) == {ord("x")}
    assert " 403 " in proxy.access_lines()[0]


# --- Close, then a half-close ------------------------------------------------------------------


async def test_a_client_that_half_closes_after_its_close_still_gets_the_reply() -> None:
    """RFC 6455 §5.5.1: the endpoint that receives a Close sends one in response. A client may
    send its Close and shut down its write side at once (EOF); it still reads the reply."""
    settings = SessionSettings(close_timeout=1.0)
    with trio.fail_after(5):
        async with session(settings) as (relay, client, origin, _):
            await client.close(4001, "bye")
            await client.stream.send_eof()  # shutdown(SHUT_WR)
            assert await origin.next_close() == (4001, "bye")
            # Let the proxy see the client's EOF before the origin's reply comes.
            await trio.testing.wait_all_tasks_blocked(0.05)
            await origin.close(4001, "bye")
            assert await client.next_close() == (4001, "bye")
            assert await client.next_frame() is None  # then the proxy's FIN
            await client.stream.aclose()
            await origin.stream.send_eof()
    assert relay.stats.outcome is Outcome.CLEAN

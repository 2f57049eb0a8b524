"""Regression tests from the review of the relay: each failed before its fix (RFC sections in
the docstrings)."""

from __future__ import annotations

import zlib

import trio
from wsproto.frame_protocol import FrameProtocol, Opcode

from proxyd.websocket import Session, SessionSettings
from proxyd.websocket.handshake import negotiate_client_deflate
from tests.conftest import StartProxy
from tests.websocket.clients import ABSOLUTE, open_client
from tests.websocket.test_session import WirePeer, session, stream_pair
from tests.websocket.ws_origin import Closed, Peer, WsOrigin


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

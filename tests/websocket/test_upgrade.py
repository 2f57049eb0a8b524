"""The opening handshake through the real daemon, on both entry paths where it applies:
``absolute`` (a wsproto client sending ``GET ws://...`` to the proxy) and ``connect`` (the
websockets library, which opens a CONNECT tunnel and upgrades inside it)."""

from __future__ import annotations

import base64
import hashlib

import httpx
import pytest
import trio
from websockets.exceptions import InvalidProxyStatus
from wsproto.frame_protocol import FrameProtocol, Opcode

from tests.conftest import RunningProxy, StartProxy, eventually
from tests.websocket.clients import (
    ABSOLUTE,
    CLIENT_KEY,
    CONNECT,
    KINDS,
    Rejected,
    WebsocketsClient,
    WsprotoClient,
    masked_frame,
    open_client,
    raw_open,
    read_head,
    read_to_eof,
    upgrade_request,
)
from tests.websocket.ws_origin import Peer, WsOrigin

pytestmark = pytest.mark.parametrize("kind", KINDS)


async def metrics_text(proxy: RunningProxy) -> str:
    async with httpx.AsyncClient(trust_env=False) as http:
        return (await http.get(proxy.admin_url + "/metrics")).text


async def test_echo_and_one_access_log_line_per_session(
    kind: str, ws_proxy: RunningProxy, ws_origin: WsOrigin
) -> None:
    with trio.fail_after(5):
        async with open_client(kind, ws_proxy.port, ws_origin.url("/echo")) as client:
            sent: list[str | bytes] = ["hello", b"\x00\xffbinary", "", b""]
            for message in sent:
                await client.send(message)
                assert await client.receive() == message
            await client.close(1000, "done")
        await eventually(lambda: len(ws_proxy.access_lines()) == 1)
    (line,) = ws_proxy.access_lines()
    assert f"GET ws://127.0.0.1:{ws_origin.port}/echo 101" in line
    assert "in=13 out=13" in line
    text = await metrics_text(ws_proxy)
    assert 'proxyd_websocket_sessions_total{outcome="clean"} 1.0' in text
    assert (
        'proxyd_requests_total{cache="none",method="GET",route_kind="direct",status_class="1xx"}'
        " 1.0" in text
    )
    assert 'proxyd_websocket_messages_total{direction="upload"} 4.0' in text
    assert 'proxyd_websocket_message_bytes_total{direction="download"} 13.0' in text
    assert 'proxyd_websocket_close_codes_total{code="1000",initiator="client"} 1.0' in text
    assert "proxyd_websocket_sessions_active 0.0" in text


async def test_client_fields_reach_the_origin_and_per_hop_fields_are_ours(
    kind: str, ws_proxy: RunningProxy, ws_origin: WsOrigin
) -> None:
    headers = [(b"Origin", b"http://app.test"), (b"Cookie", b"sid=42"), (b"X-Trace", b"t1")]
    with trio.fail_after(5):
        async with open_client(
            kind, ws_proxy.port, ws_origin.url("/h?q=1"), subprotocols=["chat"], headers=headers
        ) as client:
            await client.send("x")
            await client.receive()
    seen = ws_origin.peers[0]
    assert seen.target == b"/h?q=1"
    assert seen.header(b"host") == f"127.0.0.1:{ws_origin.port}".encode()
    assert seen.header(b"origin") == b"http://app.test"
    assert seen.header(b"cookie") == b"sid=42"
    assert seen.header(b"x-trace") == b"t1"
    assert seen.header(b"sec-websocket-protocol") == b"chat"
    assert seen.header(b"via") == b"1.1 proxyd-test"
    assert seen.header(b"proxy-authorization") is None
    key = seen.header(b"sec-websocket-key")
    assert key is not None and len(base64.b64decode(key)) == 16
    assert seen.header(b"sec-websocket-extensions") is None  # the client offered none


async def test_origin_chooses_the_subprotocol(
    kind: str, ws_proxy: RunningProxy, ws_origin: WsOrigin
) -> None:
    async def choose_second(peer: Peer) -> None:
        await peer.accept(subprotocol="superchat")
        await peer.echo_until_close()

    ws_origin.route("/sub", choose_second)
    with trio.fail_after(5):
        async with open_client(
            kind, ws_proxy.port, ws_origin.url("/sub"), subprotocols=["chat", "superchat"]
        ) as client:
            assert client.subprotocol == "superchat"
            await client.close()
    assert ws_origin.peers[0].header(b"sec-websocket-protocol") == b"chat, superchat"


@pytest.mark.parametrize(
    ("status", "body", "extra"),
    [
        (403, b"go away, you are not welcome", []),
        (426, b"", [(b"Sec-WebSocket-Version", b"13")]),
    ],
)
async def test_a_non_101_answer_reaches_the_client_with_its_body(
    kind: str,
    ws_proxy: RunningProxy,
    ws_origin: WsOrigin,
    status: int,
    body: bytes,
    extra: list[tuple[bytes, bytes]],
) -> None:
    async def reject(peer: Peer) -> None:
        await peer.reject(status, body, extra)

    ws_origin.route("/no", reject)
    with trio.fail_after(5), pytest.raises(Rejected) as caught:
        async with open_client(kind, ws_proxy.port, ws_origin.url("/no")):
            pass
    assert caught.value.status == status
    assert caught.value.body == body
    names = {name.lower(): value for name, value in caught.value.headers}
    for name, value in extra:
        assert names[name.lower()] == value
    await eventually(lambda: len(ws_proxy.access_lines()) == 1)
    assert f"/no {status} " in ws_proxy.access_lines()[0]
    text = await metrics_text(ws_proxy)
    assert 'proxyd_websocket_handshake_failures_total{reason="origin_rejected"} 1.0' in text
    assert "proxyd_websocket_sessions_total{" not in text  # no session was counted


async def test_a_redirect_reaches_the_client(
    kind: str, ws_proxy: RunningProxy, ws_origin: WsOrigin
) -> None:
    """302 with Location: the wsproto client reports it; the websockets library follows it
    (through the proxy again) to the echo path."""
    location = ws_origin.url("/echo").encode()

    async def redirect(peer: Peer) -> None:
        await peer.reject(302, b"moved", [(b"Location", location)])

    ws_origin.route("/old", redirect)
    with trio.fail_after(5):
        if kind == ABSOLUTE:
            with pytest.raises(Rejected) as caught:
                async with open_client(kind, ws_proxy.port, ws_origin.url("/old")):
                    pass
            assert caught.value.status == 302
            assert caught.value.body == b"moved"
            assert (b"location", location) in [(k.lower(), v) for k, v in caught.value.headers]
        else:
            async with open_client(kind, ws_proxy.port, ws_origin.url("/old")) as client:
                await client.send("followed")
                assert await client.receive() == "followed"
                await client.close()
            assert [peer.target for peer in ws_origin.peers] == [b"/old", b"/echo"]


@pytest.mark.parametrize(
    ("drop", "extra", "reason"),
    [
        ((b"sec-websocket-key",), [], b"exactly one Sec-WebSocket-Key"),
        ((b"sec-websocket-version",), [(b"Sec-WebSocket-Version", b"8")], b"must be 13"),
        ((b"connection",), [(b"Connection", b"keep-alive")], b"Connection: Upgrade"),
    ],
)
async def test_a_bad_upgrade_is_400_with_the_reason(
    kind: str,
    ws_proxy: RunningProxy,
    ws_origin: WsOrigin,
    drop: tuple[bytes, ...],
    extra: list[tuple[bytes, bytes]],
    reason: bytes,
) -> None:
    with trio.fail_after(5):
        stream = await raw_open(kind, ws_proxy.port, ws_origin.port)
        await stream.send_all(upgrade_request(kind, ws_origin.port, drop=drop, headers=extra))
        head, rest = await read_head(stream)
        body = rest + await read_to_eof(stream)
    assert head.startswith(b"HTTP/1.1 400")
    assert b"Proxy-Status: proxyd-test; error=http_request_error" in head
    assert reason in body
    assert ws_origin.peers == [] or ws_origin.peers[0].target == b""  # never upgraded
    text = await metrics_text(ws_proxy)
    assert 'proxyd_websocket_handshake_failures_total{reason="bad_request"} 1.0' in text


async def test_the_origin_has_handshake_timeout_to_answer(
    kind: str, start_proxy: StartProxy, ws_origin: WsOrigin
) -> None:
    async def silent(peer: Peer) -> None:
        await trio.sleep(10)

    ws_origin.route("/silent", silent)
    proxy = await start_proxy(
        **{"connect.allowed_ports": [ws_origin.port], "websocket.handshake_timeout": 0.3}
    )
    with trio.fail_after(5), pytest.raises(Rejected) as caught:
        async with open_client(kind, proxy.port, ws_origin.url("/silent")):
            pass
    assert caught.value.status == 504
    assert b"did not answer the WebSocket upgrade within 0.3s" in caught.value.body


async def test_an_unreachable_origin_is_502(
    kind: str, start_proxy: StartProxy, ws_origin: WsOrigin
) -> None:
    """Upstream first: nothing listens there, so the client gets 502 and no 101 (through
    CONNECT the tunnel itself is refused, before any upgrade)."""
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proxy = await start_proxy(**{"connect.allowed_ports": [port]})
    with trio.fail_after(5):
        if kind == CONNECT:
            with pytest.raises(InvalidProxyStatus) as refused:
                async with open_client(kind, proxy.port, f"ws://127.0.0.1:{port}/"):
                    pass
            assert refused.value.response.status_code == 502
            return
        with pytest.raises(Rejected) as caught:
            async with open_client(kind, proxy.port, f"ws://127.0.0.1:{port}/"):
                pass
    assert caught.value.status == 502
    assert b"connection_refused" in caught.value.body
    text = await metrics_text(proxy)
    assert 'proxyd_websocket_handshake_failures_total{reason="connect_failed"} 1.0' in text


async def test_bytes_right_after_the_101_in_the_same_write_are_not_lost(
    kind: str, ws_proxy: RunningProxy, ws_origin: WsOrigin
) -> None:
    """The origin writes its 101 and two frames with one send_all."""

    async def eager(peer: Peer) -> None:
        await peer.accept(then=peer.frame("first") + peer.frame(b"second"))
        await peer.echo_until_close()

    ws_origin.route("/eager", eager)
    with trio.fail_after(5):
        async with open_client(kind, ws_proxy.port, ws_origin.url("/eager")) as client:
            assert await client.receive() == "first"
            assert await client.receive() == b"second"
            await client.close()


async def test_client_frames_in_the_same_write_as_the_upgrade_are_not_lost(
    kind: str, ws_proxy: RunningProxy, ws_origin: WsOrigin
) -> None:
    with trio.fail_after(5):
        stream = await raw_open(kind, ws_proxy.port, ws_origin.port)
        request = upgrade_request(kind, ws_origin.port, "/echo")
        await stream.send_all(request + masked_frame(0x1, b"early bird"))
        head, rest = await read_head(stream)
        assert head.startswith(b"HTTP/1.1 101")
        accept = base64.b64encode(
            hashlib.sha1(CLIENT_KEY + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
        )
        assert b"Sec-WebSocket-Accept: " + accept in head
        decoder = FrameProtocol(client=True, extensions=[])
        decoder.receive_bytes(rest)
        frames = list(decoder.received_frames())
        while not frames:
            decoder.receive_bytes(await stream.receive_some(65536))
            frames = list(decoder.received_frames())
        assert frames[0].opcode is Opcode.TEXT
        assert frames[0].payload == "early bird"
        await stream.aclose()
    assert ws_origin.peers[0].messages[0] == "early bird"


async def test_deflate_on_the_client_hop_only(
    kind: str, ws_proxy: RunningProxy, ws_origin: WsOrigin
) -> None:
    """The client offers permessage-deflate, the origin accepts nothing: compressed frames on
    the client hop, plain ones on the origin hop."""

    async def plain(peer: Peer) -> None:
        await peer.accept(deflate=False)
        await peer.echo_until_close()

    ws_origin.route("/plain", plain)
    message = "compress me " * 1000
    with trio.fail_after(5):
        async with open_client(
            kind, ws_proxy.port, ws_origin.url("/plain"), deflate=True
        ) as client:
            if isinstance(client, WsprotoClient):
                assert [type(e).__name__ for e in client.extensions] == ["PerMessageDeflate"]
            else:
                assert isinstance(client, WebsocketsClient)
                assert "permessage-deflate" in client.response_headers["Sec-WebSocket-Extensions"]
            await client.send(message)
            assert await client.receive() == message
            await client.close()
    seen = ws_origin.peers[0]
    assert seen.header(b"sec-websocket-extensions") == b"permessage-deflate; client_max_window_bits"
    assert seen.messages == [message]


async def test_deflate_on_both_hops_with_different_parameters(
    kind: str, ws_proxy: RunningProxy, ws_origin: WsOrigin
) -> None:
    from wsproto.extensions import PerMessageDeflate

    async def compressing(peer: Peer) -> None:
        await peer.accept(deflate=PerMessageDeflate(server_no_context_takeover=True))
        await peer.echo_until_close()

    ws_origin.route("/z", compressing)
    messages = ["zzz" * 3000, "yyy" * 3000, "zzz" * 3000]
    with trio.fail_after(5):
        async with open_client(kind, ws_proxy.port, ws_origin.url("/z"), deflate=True) as client:
            for message in messages:
                await client.send(message)
                assert await client.receive() == message
            await client.close()
    assert ws_origin.peers[0].messages == messages


async def test_the_per_host_tunnel_limit_applies(
    kind: str, start_proxy: StartProxy, ws_origin: WsOrigin
) -> None:
    """WebSockets share the per-host tunnel limit (255 by default): with 1, a second session to
    the same host waits for a slot and gets 503 after pool.timeout."""
    proxy = await start_proxy(
        **{
            "connect.allowed_ports": [ws_origin.port],
            "pool.tunnels_per_host": 1,
            "pool.timeout": 0.3,
        }
    )
    with trio.fail_after(5):
        async with open_client(kind, proxy.port, ws_origin.url("/echo")) as first:
            with pytest.raises(Rejected) as caught:
                async with open_client(ABSOLUTE, proxy.port, ws_origin.url("/echo")):
                    pass
            assert caught.value.status == 503
            await first.send("still here")
            assert await first.receive() == "still here"
            await first.close()

"""What a CONNECT tunnel carries: a plaintext WebSocket upgrade becomes a session; TLS, protocols
where the server talks first, plain HTTP and anything else stay a byte tunnel, byte for byte."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import httpx
import trio

from tests.conftest import RunningProxy, StartProxy
from tests.websocket.clients import (
    CLIENT_KEY,
    CONNECT,
    raw_open,
    read_head,
    upgrade_request,
)
from tests.websocket.ws_origin import WsOrigin

TcpHandler = Callable[[trio.SocketStream], Awaitable[None]]


async def tcp_server(nursery: trio.Nursery, handler: TcpHandler) -> int:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, handler, listeners)
    return int(listeners[0].socket.getsockname()[1])


async def sessions_counted(proxy: RunningProxy) -> bool:
    async with httpx.AsyncClient(trust_env=False) as http:
        text = (await http.get(proxy.admin_url + "/metrics")).text
    return "proxyd_websocket_sessions_total{" in text


async def test_tls_bytes_pass_through_untouched(
    start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """A first byte of 0x16 (a TLS record) is a byte tunnel at once."""
    received: list[bytes] = []

    async def record(stream: trio.SocketStream) -> None:
        data = b""
        while len(data) < 8:
            data += await stream.receive_some(100)
        received.append(data)
        await stream.send_all(b"\x16\x03\x03reply")

    port = await tcp_server(nursery, record)
    proxy = await start_proxy(**{"connect.allowed_ports": [port]})
    with trio.fail_after(5):
        stream = await raw_open(CONNECT, proxy.port, port)
        await stream.send_all(b"\x16\x03\x01\x00\x05hello")
        assert await stream.receive_some(100) == b"\x16\x03\x03reply"
    assert received[0].startswith(b"\x16\x03\x01\x00\x05hel")
    assert not await sessions_counted(proxy)


async def test_a_server_that_talks_first_is_not_kept_waiting(
    start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """SMTP, SSH and friends: the banner comes before any client byte."""

    async def banner(stream: trio.SocketStream) -> None:
        await stream.send_all(b"220 mail.test ESMTP\r\n")
        assert await stream.receive_some(100) == b"EHLO me\r\n"
        await stream.send_all(b"250 ok\r\n")

    port = await tcp_server(nursery, banner)
    proxy = await start_proxy(**{"connect.allowed_ports": [port]})
    with trio.fail_after(1):
        stream = await raw_open(CONNECT, proxy.port, port)
        assert await stream.receive_some(100) == b"220 mail.test ESMTP\r\n"
        await stream.send_all(b"EHLO me\r\n")
        assert await stream.receive_some(100) == b"250 ok\r\n"


async def test_plain_http_inside_a_tunnel_passes_as_bytes(
    start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    request = b"GET /plain HTTP/1.1\r\nHost: x.test\r\nX-Odd:  spacing \r\n\r\n"
    received: list[bytes] = []

    async def http_origin(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(1000)
        received.append(data)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    port = await tcp_server(nursery, http_origin)
    proxy = await start_proxy(**{"connect.allowed_ports": [port]})
    with trio.fail_after(5):
        stream = await raw_open(CONNECT, proxy.port, port)
        await stream.send_all(request)
        head, _ = await read_head(stream)
    assert head.startswith(b"HTTP/1.1 200")
    assert received == [request]  # not a byte changed: no Via, no rewriting


async def test_an_upgrade_sent_byte_by_byte_is_still_a_session(
    ws_proxy: RunningProxy, ws_origin: WsOrigin
) -> None:
    request = upgrade_request(CONNECT, ws_origin.port, "/echo")
    with trio.fail_after(5):
        stream = await raw_open(CONNECT, ws_proxy.port, ws_origin.port)
        for index in range(len(request)):
            await stream.send_all(request[index : index + 1])
        head, _ = await read_head(stream)
        assert head.startswith(b"HTTP/1.1 101")
        assert b"Via: 1.1 proxyd-test" in head  # proxyd answered: it is a session
        await stream.aclose()
    assert ws_origin.peers[0].header(b"sec-websocket-key") != CLIENT_KEY


async def test_inspect_connect_off_leaves_upgrades_in_the_byte_tunnel(
    start_proxy: StartProxy, ws_origin: WsOrigin
) -> None:
    proxy = await start_proxy(
        **{"connect.allowed_ports": [ws_origin.port], "websocket.inspect_connect": False}
    )
    with trio.fail_after(5):
        stream = await raw_open(CONNECT, proxy.port, ws_origin.port)
        await stream.send_all(upgrade_request(CONNECT, ws_origin.port, "/echo"))
        head, _ = await read_head(stream)
        assert head.startswith(b"HTTP/1.1 101")
        assert b"Via:" not in head  # the origin's own answer, untouched
        await stream.aclose()
    seen = ws_origin.peers[0]
    assert seen.header(b"sec-websocket-key") == CLIENT_KEY  # our bytes, end to end
    assert seen.header(b"via") is None
    assert not await sessions_counted(proxy)


async def test_a_silent_tunnel_becomes_a_byte_tunnel_after_the_head_timeout(
    start_proxy: StartProxy, ws_origin: WsOrigin
) -> None:
    proxy = await start_proxy(
        **{"connect.allowed_ports": [ws_origin.port], "client.timeouts.head": 0.2}
    )
    with trio.fail_after(5):
        stream = await raw_open(CONNECT, proxy.port, ws_origin.port)
        await trio.sleep(0.4)
        await stream.send_all(upgrade_request(CONNECT, ws_origin.port, "/echo"))
        head, _ = await read_head(stream)
        assert head.startswith(b"HTTP/1.1 101")
        await stream.aclose()
    assert ws_origin.peers[0].header(b"sec-websocket-key") == CLIENT_KEY

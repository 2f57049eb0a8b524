"""What a CONNECT tunnel carries: a plaintext WebSocket upgrade becomes a session; TLS, protocols
where the server talks first, plain HTTP and anything else stay a byte tunnel, byte for byte."""

from __future__ import annotations

import os
import select
from collections.abc import Awaitable, Callable

import httpx
import pytest
import trio
import trio.testing

from proxyd.websocket.upgrade import Sniffed, sniff_tunnel
from tests.conftest import RunningProxy, StartProxy
from tests.websocket.clients import (
    CLIENT_KEY,
    CONNECT,
    raw_open,
    read_head,
    upgrade_request,
)
from tests.websocket.test_session import stream_pair, task_names
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
        stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        authority = f"127.0.0.1:{port}".encode()
        await stream.send_all(b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (authority, authority))
        # The banner may follow the 200 in the same read: the peek sends it on at once.
        head, banner_bytes = await read_head(stream)
        assert head.startswith(b"HTTP/1.1 200")
        while len(banner_bytes) < len(b"220 mail.test ESMTP\r\n"):
            banner_bytes += await stream.receive_some(100)
        assert banner_bytes == b"220 mail.test ESMTP\r\n"
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


# --- sniff_tunnel on its own ----------------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


UPGRADE = upgrade_request(CONNECT, 9, "/chat")


@pytest.mark.skipif(not hasattr(select, "epoll"), reason="the one-task peek needs epoll")
async def test_the_peek_waits_for_both_sides_in_one_task_and_leaks_nothing() -> None:
    """On plain sockets the peek is one wait in the tunnel's own task (an epoll descriptor
    holding both sockets): no reader task per side to start and cancel. The descriptor is
    gone afterwards."""
    client, client_far = await stream_pair()
    origin_far, origin = await stream_pair()
    before = open_fds()
    results: list[Sniffed] = []

    async def peek() -> None:
        results.append(await sniff_tunnel(client_far, origin, b"", timeout=5, max_head=65536))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peek, name="peek")
            await trio.sleep(0.05)
            await client.send_all(UPGRADE[:10])
            await trio.sleep(0.05)  # a partial head: still waiting
            assert not results
            assert not [name for name in task_names() if "read_client" in name]
            assert not [name for name in task_names() if "read_origin" in name]
            assert open_fds() == before + 1  # the epoll descriptor, while it waits
            await client.send_all(UPGRADE[10:])
    [sniffed] = results
    assert sniffed.request is not None and sniffed.request.target == b"/chat"
    assert sniffed.origin_bytes == b""
    assert open_fds() == before
    for stream in (client, client_far, origin_far, origin):
        await stream.aclose()


async def test_a_banner_wins_over_a_partial_request_and_no_byte_is_lost() -> None:
    """The origin speaks while the client's bytes are not a whole head: a byte tunnel, with the
    banner for the client and the client's bytes (read, or still in its socket) for the origin."""
    client, client_far = await stream_pair()
    origin_far, origin = await stream_pair()
    with trio.fail_after(5):
        await client.send_all(b"GE")
        await origin_far.send_all(b"SSH-2.0-test\r\n")
        await trio.sleep(0.05)
        sniffed = await sniff_tunnel(client_far, origin, b"", timeout=5, max_head=65536)
        assert sniffed.request is None and not sniffed.idle
        assert sniffed.origin_bytes == b"SSH-2.0-test\r\n"
        rest = b""
        if sniffed.client_bytes != b"GE":
            assert sniffed.client_bytes == b""
            rest = await client_far.receive_some(10)
        assert sniffed.client_bytes + rest == b"GE"
    for stream in (client, client_far, origin_far, origin):
        await stream.aclose()


async def test_an_origin_that_closes_first_leaves_a_byte_tunnel() -> None:
    client, client_far = await stream_pair()
    origin_far, origin = await stream_pair()
    with trio.fail_after(5):
        await client.send_all(b"GET / HT")
        await origin_far.aclose()
        sniffed = await sniff_tunnel(client_far, origin, b"", timeout=5, max_head=65536)
    assert sniffed.request is None and sniffed.origin_bytes == b"" and not sniffed.idle
    for stream in (client, client_far, origin):
        await stream.aclose()


async def test_a_silent_tunnel_is_idle_after_its_idle_timeout() -> None:
    client, client_far = await stream_pair()
    origin_far, origin = await stream_pair()
    before = open_fds()
    with trio.fail_after(5):
        sniffed = await sniff_tunnel(
            client_far, origin, b"", timeout=5, idle_timeout=0.1, max_head=65536
        )
    assert sniffed.idle and sniffed.request is None
    assert open_fds() == before
    for stream in (client, client_far, origin_far, origin):
        await stream.aclose()


async def test_the_peek_on_other_streams_takes_a_reader_per_side() -> None:
    """Streams that are not plain sockets (TLS to an upstream proxy, bytes read ahead): the same
    decisions, with a reader task per side."""
    client, client_far = trio.testing.memory_stream_pair()
    origin_far, origin = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            results: list[Sniffed] = []

            async def peek() -> None:
                results.append(
                    await sniff_tunnel(client_far, origin, b"", timeout=5, max_head=65536)
                )

            nursery.start_soon(peek)
            await client.send_all(UPGRADE[:5])
            await trio.sleep(0.01)
            await client.send_all(UPGRADE[5:])
        [sniffed] = results
        assert sniffed.request is not None and sniffed.request.target == b"/chat"
        await origin_far.send_all(b"220 hello\r\n")
        banner = await sniff_tunnel(client_far, origin, b"", timeout=5, max_head=65536)
        assert banner.origin_bytes == b"220 hello\r\n" and banner.request is None

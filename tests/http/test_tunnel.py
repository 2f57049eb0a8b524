"""CONNECT tunnels: bytes both ways, half-close, allowed ports, failures (RFC 9110 §9.3.6)."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable

import trio

from tests.conftest import StartProxy, eventually


async def read_head(stream: trio.SocketStream) -> tuple[bytes, bytes]:
    """Read up to the end of a response head; returns (head, bytes after it)."""
    buffer = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in buffer:
            chunk = await stream.receive_some(4096)
            assert chunk, f"closed before a head: {buffer!r}"
            buffer += chunk
    head, _, rest = buffer.partition(b"\r\n\r\n")
    return head, rest


async def start_tcp_server(
    nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Awaitable[None]]
) -> int:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, handler, listeners)
    return int(listeners[0].socket.getsockname()[1])


async def test_tunnel_relays_both_ways_with_half_close(
    start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """One side's FIN is passed on while the other direction keeps flowing: the server reads
    until EOF, then answers; the client gets the answer after shutting down its write side."""

    async def until_eof_then_answer(stream: trio.SocketStream) -> None:
        received = b""
        while chunk := await stream.receive_some(65536):
            received += chunk
        await stream.send_all(b"got %d bytes" % len(received))
        await stream.aclose()

    port = await start_tcp_server(nursery, until_eof_then_answer)
    proxy = await start_proxy(**{"connect.allowed_ports": [port]})
    client = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    # The first payload bytes ride in the same write as the CONNECT head.
    await client.send_all(
        f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode() + b"early"
    )
    head, rest = await read_head(client)
    assert head.startswith(b"HTTP/1.1 200")
    assert b"Via: 1.1 proxyd-test" in head
    assert rest == b""
    payload = b"z" * 3_000_000
    with trio.fail_after(10):
        await client.send_all(payload)
        await client.send_eof()
        answer = b""
        while chunk := await client.receive_some(65536):
            answer += chunk
    assert answer == b"got %d bytes" % (len(payload) + 5)
    await eventually(lambda: len(proxy.access_lines()) == 1)
    line = proxy.access_lines()[0]
    assert "CONNECT" in line and f"in={len(payload) + 5}" in line and " 200 " in line


async def test_tunnel_to_a_port_not_allowed_is_403(start_proxy: StartProxy) -> None:
    """connect.allowed_ports: anything else gets 403 with the reason, connection kept."""
    proxy = await start_proxy()
    client = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    await client.send_all(b"CONNECT 127.0.0.1:25 HTTP/1.1\r\nHost: 127.0.0.1:25\r\n\r\n")
    head, body = await read_head(client)
    assert head.startswith(b"HTTP/1.1 403")
    assert b"error=http_request_denied" in head
    assert b"port 25 is not allowed" in head + body


async def test_tunnel_ranges_and_refused(start_proxy: StartProxy) -> None:
    """A port inside an allowed range is tried; a refused connect is 502 connection_refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    proxy = await start_proxy(**{"connect.allowed_ports": [443, f"{closed - 1}-{closed + 1}"]})
    client = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    await client.send_all(f"CONNECT 127.0.0.1:{closed} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head, _ = await read_head(client)
    assert head.startswith(b"HTTP/1.1 502")
    assert b"error=connection_refused" in head


async def test_tunnel_to_the_admin_port_is_refused(start_proxy: StartProxy) -> None:
    """The admin listener is never reachable through the proxy port, even by CONNECT."""
    proxy = await start_proxy(**{"connect.allowed_ports": ["1-65535"]})
    client = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    await client.send_all(
        f"CONNECT 127.0.0.1:{proxy.admin_port} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    head, _ = await read_head(client)
    assert head.startswith(b"HTTP/1.1 403")


async def test_tunnel_idle_timeout(start_proxy: StartProxy, nursery: trio.Nursery) -> None:
    """tunnel.idle_timeout closes a tunnel in which no byte moved either way."""

    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep(5)

    port = await start_tcp_server(nursery, silent)
    proxy = await start_proxy(**{"connect.allowed_ports": [port], "tunnel.idle_timeout": 0.3})
    client = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    await client.send_all(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head, _ = await read_head(client)
    assert head.startswith(b"HTTP/1.1 200")
    with trio.fail_after(3):
        assert await client.receive_some(10) == b""

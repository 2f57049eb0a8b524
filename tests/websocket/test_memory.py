"""What an idle WebSocket session keeps alive (see tests/test_memory.py for how and why).

An idle session should cost under 20 KiB (bench/memory_bench.py). What a session needs while
idle is its two readers, its nursery and the per-hop state; everything of the handshake (the
upgrade request, the sniffed bytes, the CONNECT's h11 connection), the tunnel slot's generator,
an exception kept by a reader that awaits inside ``except``, and the per-hop lock and events
that only a write or a close uses are not kept (or not made).
"""

from __future__ import annotations

import types

import trio

from proxyd._h11 import h11
from proxyd.client import ClientConnection
from proxyd.upstream.pool import TunnelSlot
from proxyd.websocket.relay import Session
from proxyd.websocket.upgrade import Sniffed
from tests.conftest import RunningProxy, StartProxy, eventually
from tests.test_memory import of_type, stack_objects, tasks_running
from tests.websocket.clients import CONNECT, masked_frame, raw_open, read_head, upgrade_request
from tests.websocket.ws_origin import WsOrigin


def await_chain(task: trio.lowlevel.Task) -> list[object]:
    """The coroutines ``task`` is suspended in, outermost first."""
    chain: list[object] = []
    obj: object = task.coro
    while obj is not None:
        chain.append(obj)
        obj = getattr(obj, "cr_await", None) or getattr(obj, "gi_yieldfrom", None)
    return chain


async def open_tunnelled_session(proxy: RunningProxy, ws_origin: WsOrigin) -> trio.SocketStream:
    """CONNECT, then a plaintext upgrade inside (how browsers send ws://), 101 read."""
    stream = await raw_open(CONNECT, proxy.port, ws_origin.port)
    await stream.send_all(upgrade_request(CONNECT, ws_origin.port))
    head, _ = await read_head(stream)
    assert head.startswith(b"HTTP/1.1 101"), head
    return stream


async def test_an_idle_session_keeps_nothing_of_its_handshake(
    start_proxy: StartProxy, ws_origin: WsOrigin
) -> None:
    """An idle tunnelled session: its client connection's stack references no upgrade
    request (only the CONNECT's head), one h11 connection (the inner one: the CONNECT's is
    gone), no async generator (the tunnel slot is a plain object), no exception; its readers'
    stacks hold no exception (waiting outside a handler); no hop made a lock or an event."""
    proxy = await start_proxy(**{"connect.allowed_ports": [ws_origin.port]})
    services = proxy.server.services
    assert services is not None
    with trio.fail_after(5):
        stream = await open_tunnelled_session(proxy, ws_origin)
        await eventually(lambda: len(services.websocket_sessions) == 1)
        await trio.sleep(0.1)  # both readers are waiting
    [task] = tasks_running(ClientConnection.run)
    objects = stack_objects(task)
    requests = of_type(objects, h11.Request)
    assert all(r.method == b"CONNECT" for r in requests), requests  # type: ignore[attr-defined]
    assert len(of_type(objects, h11.Connection)) <= 1
    for sniffed in of_type(objects, Sniffed):
        assert sniffed.request is None and sniffed.conn is None  # type: ignore[attr-defined]
    assert not of_type(objects, types.AsyncGeneratorType)
    assert of_type(objects, TunnelSlot)
    assert not of_type(objects, BaseException)
    # The origin's reader is a task of the session; the client's reader is the connection's
    # own task (its stack, checked above, ends in it), so a session costs one task, not two.
    [reader] = tasks_running(Session._read_loop)
    assert not of_type(stack_objects(reader), BaseException)
    assert any(
        getattr(frame, "cr_code", None) is Session._read_loop.__code__
        for frame in await_chain(task)
    )
    [session] = services.websocket_sessions
    assert session._timer is None  # no deadline pending: no timer anywhere
    for hop in session._hops:
        assert hop._lock is None and hop._close_written is None and hop._reader_done is None
    await stream.aclose()


async def test_tunnel_slots_leave_no_limiter_behind(
    start_proxy: StartProxy, ws_origin: WsOrigin
) -> None:
    """A host's limiter exists only while one of its slots is held or awaited (tunnels to many
    distinct hosts must not pile up limiters), also after a refused wait for a slot."""
    proxy = await start_proxy(
        **{
            "connect.allowed_ports": [ws_origin.port],
            "pool.tunnels_per_host": 1,
            "pool.timeout": 0.2,
        }
    )
    pool = proxy.server.pool
    with trio.fail_after(5):
        held = await open_tunnelled_session(proxy, ws_origin)
        assert set(pool._tunnels) == {"127.0.0.1"}
        refused = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        authority = f"127.0.0.1:{ws_origin.port}".encode()
        await refused.send_all(b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (authority, authority))
        head, _ = await read_head(refused)
        assert head.startswith(b"HTTP/1.1 503"), head
        await held.aclose()
        await refused.aclose()
        await eventually(lambda: not pool._tunnels)


async def test_a_session_idle_after_traffic_keeps_no_read_buffer(
    start_proxy: StartProxy, ws_origin: WsOrigin
) -> None:
    """After a 32 KiB message was relayed both ways (the origin echoes it), the readers wait
    for the next bytes without keeping the last read (up to 64 KiB per hop) alive."""
    proxy = await start_proxy(**{"connect.allowed_ports": [ws_origin.port]})
    payload = bytes(range(256)) * 128
    with trio.fail_after(5):
        stream = await open_tunnelled_session(proxy, ws_origin)
        await stream.send_all(masked_frame(0x2, payload))
        echoed = b""
        while len(echoed) < 4 + len(payload):
            echoed += await stream.receive_some(65536)
        assert echoed == b"\x82\x7e\x80\x00" + payload
        await trio.sleep(0.1)  # both readers are waiting again
    # The origin's reader task, and the connection's task that runs the client's reader.
    readers = tasks_running(Session._read_loop) + tasks_running(ClientConnection.run)
    assert len(readers) == 2
    for reader in readers:
        objects = stack_objects(reader)
        assert not [o for o in objects if isinstance(o, (bytes, bytearray)) and len(o) > 4096]
    await stream.aclose()

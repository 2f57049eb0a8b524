"""What an idle client connection or WebSocket session keeps alive, and the idle sweeper.

Idle keep-alive connections and idle WebSocket sessions are what the daemon holds most of, so
their size is the daemon's memory (``bench/memory_bench.py`` measures the RSS: a few KiB per
connection, under 20 KiB per session). These tests pin the structure that keeps them small, and
do it deterministically, without measuring: while a connection waits, they walk its task's
coroutine stack (every coroutine's locals, cells and value stack, through ``gc.get_referents``)
and assert what is *not* referenced from it: the last request's parsed head, a cancel scope per
wait, an exception kept alive by a handler that awaits, the CONNECT's h11 connection once a
tunnelled WebSocket replaced it, a generator-based context manager for the tunnel slot, a
per-hop lock or event that nothing has used yet.

``IdleConnections`` (client.py), the sweeper that ends connections idle past
``client.timeouts.idle`` instead of a cancel scope per wait, is tested on its own (order,
deadlines, drain, a reload's new timeout) and end to end (a reload shortens the timeout of a
connection already waiting).
"""

from __future__ import annotations

import contextlib
import gc
import types
from collections.abc import Iterator
from typing import Any

import trio

from proxyd import client
from proxyd._h11 import h11
from proxyd.client import ClientConnection, IdleConnections
from tests.conftest import RunningProxy, eventually
from tests.origin import Origin
from tests.test_reload import StartFromFile, config_text, start_from_file
from tests.websocket.clients import read_head

__all__ = ["all_tasks", "of_type", "stack_objects", "start_from_file", "tasks_running"]

# --- walking a task's stack ---------------------------------------------------------------------


def all_tasks() -> Iterator[trio.lowlevel.Task]:
    def walk(task: trio.lowlevel.Task) -> Iterator[trio.lowlevel.Task]:
        yield task
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                yield from walk(child)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    yield from walk(root)


def tasks_running(function: Any) -> list[trio.lowlevel.Task]:
    """Tasks whose coroutine is ``function`` (a bound method's underlying function)."""
    code = function.__code__
    return [task for task in all_tasks() if getattr(task.coro, "cr_code", None) is code]


def stack_objects(task: trio.lowlevel.Task) -> list[object]:
    """Everything the coroutines of ``task``'s await chain reference right now: locals,
    arguments, closure cells' contents, and what their value stacks hold (a handled exception
    while awaiting inside ``except`` is there)."""
    found: list[object] = []
    obj: Any = task.coro
    while obj is not None:
        for ref in gc.get_referents(obj):
            if isinstance(ref, types.CellType):
                with contextlib.suppress(ValueError):  # an empty cell
                    found.append(ref.cell_contents)
            else:
                found.append(ref)
                if isinstance(ref, types.MethodType):  # ``async with x`` keeps x.__aexit__
                    found.append(ref.__self__)
        obj = getattr(obj, "cr_await", None) or getattr(obj, "gi_yieldfrom", None)
    return found


def of_type(objects: list[object], kind: type | tuple[type, ...]) -> list[object]:
    """The distinct objects of ``kind`` among ``objects``."""
    return list({id(o): o for o in objects if isinstance(o, kind)}.values())


# --- idle keep-alive connections ----------------------------------------------------------------


async def keepalive_request(port: int, origin: Origin) -> trio.SocketStream:
    """A client connection that made one request, read the whole answer, and stays open."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    authority = f"127.0.0.1:{origin.port}".encode()
    await stream.send_all(b"GET http://%s/ HTTP/1.1\r\nHost: %s\r\n\r\n" % (authority, authority))
    head, body = await read_head(stream)
    assert head.startswith(b"HTTP/1.1 200"), head
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += await stream.receive_some(65536)
    return stream


async def test_an_idle_connection_keeps_no_request_scope_or_exception(
    proxy: RunningProxy, origin: Origin
) -> None:
    """While waiting for its next request, a connection holds no h11 connection of its own
    (the shared placeholder until bytes arrive), and its stack references no parsed request
    (the last one's head), no cancel scope (the idle timeout is IdleConnections' job) and no
    exception."""
    services = proxy.server.services
    assert services is not None
    with trio.fail_after(5):
        clients = [await keepalive_request(proxy.port, origin) for _ in range(3)]
        await eventually(lambda: len(services.idle) == 3)
    tasks = tasks_running(ClientConnection.run)
    assert len(tasks) == 3
    for task in tasks:
        objects = stack_objects(task)
        assert not of_type(objects, h11.Request)
        assert not of_type(objects, trio.CancelScope)
        assert not of_type(objects, BaseException)
        assert of_type(objects, h11.Connection) in ([], [client._WAITING])
    assert all(conn.h11 is client._WAITING for conn in services.connections)
    for stream in clients:
        await stream.aclose()


async def test_a_reload_shortens_the_timeout_of_a_waiting_connection(
    start_from_file: StartFromFile, origin: Origin
) -> None:
    """client.timeouts.idle from a reload applies to connections already waiting (counted from
    when they started to wait): the sweeper is woken with the new timeout."""
    proxy = await start_from_file(config_text("client: {timeouts: {idle: 300}}\n"))
    with trio.fail_after(10):
        stream = await keepalive_request(proxy.port, origin)
        proxy.write(config_text("client: {timeouts: {idle: 0.2}}\n"))
        assert (await proxy.reload()).status_code == 200
        assert await stream.receive_some(10) == b""  # closed by the sweeper, not in 300 s
    await stream.aclose()


# --- IdleConnections on its own -----------------------------------------------------------------


class FakeConnection:
    def __init__(self, name: str, woken: list[str]) -> None:
        self.name = name
        self.woken = woken

    def wake_to_close(self) -> None:
        self.woken.append(self.name)


def idle_with(*names: str, since: float = 0.0) -> tuple[IdleConnections, list[Any], list[str]]:
    woken: list[str] = []
    idle = IdleConnections(10.0)
    conns: list[Any] = [FakeConnection(name, woken) for name in names]
    for offset, conn in enumerate(conns):
        idle.add(conn, since + offset)
    return idle, conns, woken


def test_idle_connections_expire_oldest_first_and_report_the_next_deadline() -> None:
    idle, _, woken = idle_with("a", "b", "c")  # waiting since 0, 1, 2; timeout 10
    assert idle.expire(9.5) == 10.0 and woken == []
    assert idle.expire(11.0) == 12.0 and woken == ["a", "b"]
    assert idle.expire(12.0) == 22.0 and woken == ["a", "b", "c"]  # empty: one timeout later
    assert len(idle) == 0


def test_a_connection_that_got_its_request_leaves_the_set() -> None:
    idle, conns, woken = idle_with("a", "b")
    idle.discard(conns[0])
    assert idle.expire(10.5) == 11.0 and woken == []  # "a" is busy, "b" has a second left
    idle.discard(conns[0])  # twice is fine


def test_drain_closes_only_waiting_connections() -> None:
    idle, conns, woken = idle_with("a")
    idle.close(conns[0])
    idle.close(conns[0])  # no longer waiting: nothing more
    busy = FakeConnection("busy", woken)
    idle.close(busy)  # type: ignore[arg-type]
    assert woken == ["a"] and len(idle) == 0


def test_a_new_timeout_applies_to_connections_already_waiting() -> None:
    idle, _, woken = idle_with("a", "b")
    idle.set_timeout(0.5)
    assert idle.expire(1.0) == 1.5 and woken == ["a"]


async def test_the_sweeper_ends_a_connection_added_to_an_empty_set_in_time() -> None:
    """While nothing waits, ``run`` looks again one timeout later (adding never wakes it), which
    is never later than the deadline of a connection added meanwhile."""
    idle = IdleConnections(0.05)
    woken: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(idle.run)
        await trio.sleep(0.05)
        idle.add(FakeConnection("a", woken), trio.current_time())  # type: ignore[arg-type]
        with trio.fail_after(5):
            while not woken:  # noqa: ASYNC110 (polling what the sweeper did)
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert woken == ["a"]


async def test_the_shared_placeholder_is_never_touched(proxy: RunningProxy, origin: Origin) -> None:
    """Malformed, oversized and pipelined requests all parse on the connection's own h11
    connection: the shared placeholder of idle connections stays pristine."""
    authority = f"127.0.0.1:{origin.port}".encode()
    get = b"GET http://%s/ HTTP/1.1\r\nHost: %s\r\n\r\n" % (authority, authority)
    for data, status in (
        (b"\x16\x03\x01 not http\r\n\r\n", b"400"),
        (b"GET http://%s/ HTTP/1.1\r\nX: %s\r\n\r\n" % (authority, b"y" * 70000), b"431"),
        (get + get, b"200"),
    ):
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
            await stream.send_all(data)
            head, _ = await read_head(stream)
            assert head.split(b" ", 2)[1] == status, head
            await stream.aclose()
    placeholder = client._WAITING
    assert placeholder.our_state is h11.IDLE and placeholder.their_state is h11.IDLE
    assert placeholder.trailing_data == (b"", False)


def test_holds_tells_whether_a_wait_was_ended() -> None:
    """A connection checks ``holds`` after yielding and before waiting: a ``close`` that came
    in between (its wake-up then reached no waiter) still ends the connection."""
    idle, conns, woken = idle_with("a", "b")
    idle.close(conns[0])
    assert not idle.holds(conns[0]) and idle.holds(conns[1])
    idle.discard(conns[1])
    assert not idle.holds(conns[1]) and woken == ["a"]

"""Socket pools through the real proxy: limits per group and in total, reuse, expiry,
eviction, waiting and its timeout, draining after a client left (REFERENCE.md: Chromium's pools).

Several distinct origins listen on 127.0.0.2, 127.0.0.3, ... (all loopback) and count their
concurrent connections.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable

import h11
import httpx
import pytest
import trio
import trio.testing

from proxyd import _h11 as proxyd_h11
from proxyd.config import PoolConfig
from proxyd.errors import ConnectionLimitReached, DestinationUnavailable
from proxyd.upstream.pool import Pool, UpstreamConnection
from tests.conftest import StartProxy, eventually
from tests.origin import Exchange, Origin


async def start_origin(nursery: trio.Nursery, host: str) -> Origin:
    origin: Origin = await nursery.start(Origin(host=host).serve)
    return origin


def slow(
    delay: float, concurrent: list[int] | None = None, peak: list[int] | None = None
) -> Callable[[Exchange], Awaitable[None]]:
    async def handler(exchange: Exchange) -> None:
        await exchange.read_body()
        if concurrent is not None and peak is not None:
            concurrent[0] += 1
            peak[0] = max(peak[0], concurrent[0])
        try:
            await trio.sleep(delay)
        finally:
            if concurrent is not None:
                concurrent[0] -= 1
        await exchange.respond(200, b"slow")

    return handler


async def test_twenty_concurrent_requests_open_at_most_six_connections(
    start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """pool.per_group (Chromium's 6): the other requests wait and reuse those sockets."""
    origin = await start_origin(nursery, "127.0.0.2")
    origin.route("/slow", slow(0.1))
    proxy = await start_proxy()
    async with httpx.AsyncClient(
        proxy=proxy.url, limits=httpx.Limits(max_connections=50)
    ) as client:
        statuses: list[int] = []

        async def one() -> None:
            statuses.append((await client.get(origin.url("/slow"))).status_code)

        with trio.fail_after(15):
            async with trio.open_nursery() as inner:
                for _ in range(20):
                    inner.start_soon(one)
    assert statuses == [200] * 20
    assert origin.max_active <= 6 and origin.connections <= 6
    assert len(origin.requests) == 20


async def test_total_limit_holds_across_groups(
    start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """pool.total caps upstream connections across all origins together."""
    concurrent, peak = [0], [0]
    origins = [await start_origin(nursery, f"127.0.0.{i}") for i in (2, 3, 4)]
    for origin in origins:
        origin.route("/slow", slow(0.1, concurrent, peak))
    proxy = await start_proxy(**{"pool.total": 4})
    async with httpx.AsyncClient(
        proxy=proxy.url, limits=httpx.Limits(max_connections=50)
    ) as client:

        async def one(origin: Origin) -> None:
            assert (await client.get(origin.url("/slow"))).status_code == 200

        with trio.fail_after(15):
            async with trio.open_nursery() as inner:
                for index in range(15):
                    inner.start_soon(one, origins[index % 3])
    assert peak[0] <= 4
    assert sum(origin.connections for origin in origins) <= 15
    assert sum(len(origin.requests) for origin in origins) == 15


async def test_waiting_beyond_the_pool_timeout_is_503(
    start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """A request that cannot get a slot within pool.timeout gets 503 connection_limit_reached."""
    origin = await start_origin(nursery, "127.0.0.2")
    origin.route("/slow", slow(1.0))
    proxy = await start_proxy(**{"pool.per_group": 1, "pool.timeout": 0.3})
    async with httpx.AsyncClient(
        proxy=proxy.url, limits=httpx.Limits(max_connections=10)
    ) as client:
        results: list[httpx.Response] = []

        async def one() -> None:
            results.append(await client.get(origin.url("/slow")))

        async with trio.open_nursery() as inner:
            inner.start_soon(one)
            await eventually(lambda: origin.active == 1)
            inner.start_soon(one)
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200, 503]
    refused = next(r for r in results if r.status_code == 503)
    assert "error=connection_limit_reached" in refused.headers["proxy-status"]


async def test_idle_sockets_expire_and_the_oldest_is_evicted_at_the_total_limit(
    start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """Used idle sockets live pool.idle_used seconds; at pool.total an idle socket of another
    group is closed to make room (the oldest first)."""
    a, b, c = [await start_origin(nursery, f"127.0.0.{i}") for i in (2, 3, 4)]
    proxy = await start_proxy(**{"pool.total": 2, "pool.idle_used": 0.6})
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        for origin in (a, b):
            assert (await client.get(origin.url("/"))).status_code == 200
        await eventually(lambda: a.active == 1 and b.active == 1)
        assert (await client.get(c.url("/"))).status_code == 200  # evicts a (the oldest idle)
        await eventually(lambda: a.active == 0)
        assert b.active == 1 and c.active == 1
        await eventually(lambda: b.active == 0 and c.active == 0, timeout=5)  # expired


async def test_client_leaving_mid_response_drains_and_reuses_the_socket(
    start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """Cancelling a request drains the rest of the body (bounded) so the socket returns to the
    pool instead of being closed."""
    origin = await start_origin(nursery, "127.0.0.2")

    async def body_in_two_parts(exchange: Exchange) -> None:
        await exchange.read_body()
        await exchange.send_event(
            h11.Response(status_code=200, headers=[(b"Content-Length", b"200000")])
        )
        await exchange.send_event(h11.Data(data=b"a" * 1000))
        await trio.sleep(0.3)
        await exchange.send_event(h11.Data(data=b"b" * 199_000))
        await exchange.send_event(h11.EndOfMessage())

    origin.route("/big", body_in_two_parts)
    proxy = await start_proxy()
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    await stream.send_all(f"GET {origin.url('/big')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    with trio.fail_after(5):
        assert (await stream.receive_some(100)).startswith(b"HTTP/1.1 200")
    await stream.aclose()  # leave mid-body
    await eventually(lambda: len(proxy.access_lines()) == 1)
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        assert (await client.get(origin.url("/"))).status_code == 200
    assert origin.connections == 1
    async with httpx.AsyncClient() as admin:
        metrics = (await admin.get(proxy.admin_url + "/metrics")).text
    assert 'proxyd_pool_drained_total{outcome="reused"} 1.0' in metrics


async def test_pool_gauges_are_exported(start_proxy: StartProxy, nursery: trio.Nursery) -> None:
    origin = await start_origin(nursery, "127.0.0.2")
    proxy = await start_proxy()
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        assert (await client.get(origin.url("/"))).status_code == 200
    async with httpx.AsyncClient() as admin:
        metrics = (await admin.get(proxy.admin_url + "/metrics")).text
    assert 'proxyd_pool_connections{route_kind="direct",state="idle"} 1.0' in metrics
    assert "proxyd_pool_groups 1.0" in metrics


# --- the pool shell on its own: waits ended by the reaper, not a cancel scope per wait ---------


async def _socket_connector(key: object) -> trio.abc.Stream:
    left, right = socket.socketpair()
    right.close()  # never read: the tests only hold the socket
    return trio.SocketStream(trio.socket.from_stdlib_socket(left))


async def test_a_waiter_past_the_pool_timeout_is_woken_by_the_reaper(nursery: trio.Nursery) -> None:
    """A request queued behind a full group gets ConnectionLimitReached once pool.timeout has
    passed, also for a timeout shorter than the reaper's one-second tick (the first waiter wakes
    the reaper to sleep until its deadline)."""
    pool = Pool(PoolConfig(per_group=1, timeout=0.2), connector=_socket_connector)
    await nursery.start(pool.run)
    with trio.fail_after(5):
        held = await pool.acquire("group", None)
        started = trio.current_time()
        with pytest.raises(ConnectionLimitReached):
            await pool.acquire("group", None)
        waited = trio.current_time() - started
    assert 0.2 <= waited < 0.9
    assert pool.state.stats()[0].waiting == 0  # the timed-out waiter left the queue
    pool.release(held, reusable=False)


async def test_a_waiter_gets_a_released_socket_at_once(nursery: trio.Nursery) -> None:
    """Late binding on the hand-over fast path: the socket released goes to the queued request
    (the very connection object), and the wait ends without the timeout."""
    pool = Pool(PoolConfig(per_group=1, timeout=30), connector=_socket_connector)
    await nursery.start(pool.run)
    got: list[object] = []

    async def second() -> None:
        got.append(await pool.acquire("group", None))

    with trio.fail_after(5):
        held = await pool.acquire("group", None)
        async with trio.open_nursery() as inner:
            inner.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()
            assert pool.state.stats()[0].waiting == 1
            _finish_exchange(held)
            pool.release(held, reusable=True)
    assert got == [held]


async def test_a_stopping_pool_fails_its_waiters_at_once() -> None:
    """Nothing ends a queued wait once the reaper is gone, so the pool fails its waiters when
    it stops instead of leaving them to hang until the client gives up."""
    pool = Pool(PoolConfig(per_group=1, timeout=30), connector=_socket_connector)
    errors: list[BaseException] = []

    async def waiter() -> None:
        try:
            await pool.acquire("group", None)
        except DestinationUnavailable as exc:
            errors.append(exc)

    with trio.fail_after(5):
        async with trio.open_nursery() as outer, trio.open_nursery() as pool_nursery:
            await pool_nursery.start(pool.run)
            await pool.acquire("group", None)  # the group's one socket, held
            outer.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            pool_nursery.cancel_scope.cancel()  # the pool stops
    assert len(errors) == 1


# --- writing ahead: the queued request's head goes out at the hand-over --------------------------


def _peer_connector(peers: list[socket.socket]) -> Callable[[object], Awaitable[trio.abc.Stream]]:
    async def connect(key: object) -> trio.abc.Stream:
        left, right = socket.socketpair()
        right.setblocking(False)
        peers.append(right)  # the "origin": the test reads what the pool wrote
        return trio.SocketStream(trio.socket.from_stdlib_socket(left))

    return connect


def _finish_exchange(conn: UpstreamConnection) -> None:
    """Make a held connection's exchange look finished to h11, as the relay's would be (the
    pool's connections use proxyd's h11 build, which may be the compiled one)."""
    ph11 = proxyd_h11.h11
    uc = conn.h11
    uc.send(ph11.Request(method="GET", target="/", headers=[("Host", "x")]))
    uc.send(ph11.EndOfMessage())
    uc.receive_data(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert type(uc.next_event()) is ph11.Response
    assert type(uc.next_event()) is ph11.EndOfMessage


HEAD = b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"


async def _queue_and_hand_over(
    pool: Pool,
    held: UpstreamConnection,
    ahead: bytes | None,
    before_it_runs: Callable[[], None] = lambda: None,
) -> UpstreamConnection:
    """Queue a second request of the group (with ``ahead``) behind ``held``, finish ``held``'s
    exchange and release it; the socket the waiter got. ``before_it_runs`` is called right
    after the release, before the waiter's task runs again."""
    got: list[UpstreamConnection] = []

    async def second() -> None:
        got.append(await pool.acquire("group", None, ahead=ahead))

    async with trio.open_nursery() as inner:
        inner.start_soon(second)
        await trio.testing.wait_all_tasks_blocked()
        _finish_exchange(held)
        pool.release(held, reusable=True)
        assert got == []  # the waiter has not run yet
        before_it_runs()
    assert len(got) == 1
    return got[0]


async def test_the_hand_over_writes_the_waiters_head_before_it_runs(nursery: trio.Nursery) -> None:
    """A request queued behind a full group with its head (``ahead``) finds it written when it
    gets the socket: the pool wrote it in ``release``, before the waiter's task ran again."""
    peers: list[socket.socket] = []
    pool = Pool(PoolConfig(per_group=1, timeout=30), connector=_peer_connector(peers))
    await nursery.start(pool.run)
    on_the_wire: list[bytes] = []
    with trio.fail_after(5):
        held = await pool.acquire("group", None)
        assert held.sent_ahead == 0
        got = await _queue_and_hand_over(
            pool, held, HEAD, lambda: on_the_wire.append(peers[0].recv(1000))
        )
    assert on_the_wire == [HEAD]  # written before the waiter ran
    assert got is held
    assert held.sent_ahead == len(HEAD)


async def test_no_write_ahead_without_a_wait_or_a_head(nursery: trio.Nursery) -> None:
    """A request that gets an idle socket at once sends its own head (nothing written ahead),
    and a waiter without a head gets a socket with nothing written on it."""
    peers: list[socket.socket] = []
    pool = Pool(PoolConfig(per_group=1, timeout=30), connector=_peer_connector(peers))
    await nursery.start(pool.run)
    with trio.fail_after(5):
        held = await pool.acquire("group", None, ahead=HEAD)
        assert held.sent_ahead == 0
        got = await _queue_and_hand_over(pool, held, None)
    assert got is held and held.sent_ahead == 0
    with pytest.raises(BlockingIOError):
        peers[0].recv(1000)


async def test_a_socket_with_a_head_written_ahead_is_closed_when_its_waiter_vanishes(
    nursery: trio.Nursery,
) -> None:
    """The waiter's wait is cancelled, and before its task runs to leave the queue the socket is
    handed to it with its head written: the answer to that request will come on this socket, so
    nobody else may get it: it is closed, and the group's slot freed."""
    peers: list[socket.socket] = []
    pool = Pool(PoolConfig(per_group=1, timeout=30), connector=_peer_connector(peers))
    await nursery.start(pool.run)
    with trio.fail_after(5):
        held = await pool.acquire("group", None)
        async with trio.open_nursery() as inner:
            cancel = trio.CancelScope()

            async def second() -> None:
                with cancel:
                    await pool.acquire("group", None, ahead=HEAD)

            inner.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()
            _finish_exchange(held)
            cancel.cancel()  # the wait is aborted; the waiter is still queued until it runs
            pool.release(held, reusable=True)  # handed to it, head written ahead
        assert peers[0].recv(1000) == HEAD
        stats = pool.state.stats()
        assert all(group.idle == 0 and group.active == 0 for group in stats), stats
        assert held.stream.socket.fileno() == -1  # type: ignore[attr-defined]
        # The group's slot came back: a new request gets a new socket.
        fresh = await pool.acquire("group", None)
        assert fresh is not held and len(peers) == 2
        pool.release(fresh, reusable=False)


async def test_queued_fast_requests_each_get_their_own_answer(
    start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """End to end with one socket per origin: forty plain GETs queue behind it, most get the
    socket by hand-over with their head written ahead, and each gets the answer to its own
    path (a request written for one client and read by another would show here)."""
    origin = await start_origin(nursery, "127.0.0.2")

    async def echo_path(exchange: Exchange) -> None:
        await exchange.read_body()
        await trio.sleep(0.001)
        await exchange.respond(200, exchange.request.target)

    for index in range(40):
        origin.route(f"/p{index}", echo_path)
    proxy = await start_proxy(**{"pool.per_group": 1})
    bodies: dict[int, bytes] = {}
    async with httpx.AsyncClient(
        proxy=proxy.url, limits=httpx.Limits(max_connections=40)
    ) as client:

        async def one(index: int) -> None:
            response = await client.get(origin.url(f"/p{index}"))
            assert response.status_code == 200
            bodies[index] = response.content

        with trio.fail_after(20):
            async with trio.open_nursery() as inner:
                for index in range(40):
                    inner.start_soon(one, index)
    assert bodies == {index: f"/p{index}".encode() for index in range(40)}
    assert origin.connections == 1  # all forty over the one pooled socket

"""Collapsed forwarding through the real daemon: one origin request per key, followers read along.

How these tests work: the origin handler for the contested URL is held at a chosen point by a
``trio.Event`` (before its head, before its last chunk, mid-body), so the test knows the leader's
fetch is still in the air while the other clients arrive. The test then waits (bounded) until the
proxy has counted every other client as a follower (``proxyd_cache_collapsed_total``) or until
every client has received body bytes, releases the origin, and checks what each client got and
how many requests reached the origin.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import h11
import httpx
import trio

from tests.cache.test_rfc9111 import FRESH, Reply, answer, cache_settings, field, is_hit, seen
from tests.conftest import RunningProxy, StartProxy, eventually
from tests.origin import Exchange, Origin

SIZE = 5 * 1024 * 1024
CHUNK = 64 * 1024
CLIENTS = 100


def collapsed(proxy: RunningProxy) -> float:
    value = proxy.server.metrics.registry.get_sample_value("proxyd_cache_collapsed_total")
    assert value is not None, "proxyd_cache_collapsed_total is not exposed"
    return value


def client(proxy: RunningProxy, connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(proxy=proxy.url, trust_env=False, timeout=30, limits=limits)


async def test_hundred_clients_share_one_slow_origin_fetch(
    start_proxy: StartProxy, tmp_path: Path, origin: Origin
) -> None:
    """100 clients ask for one uncached 5 MiB URL at once: the origin sees one request, every
    client gets identical bytes, and followers receive bytes while the origin is still sending
    (read-while-write): the origin holds its last chunk until every client has bytes."""
    proxy = await start_proxy(**cache_settings(tmp_path / "cache"))
    body = random.Random(5).randbytes(SIZE)
    last_chunk = trio.Event()
    origin_finished = False

    async def handler(exchange: Exchange) -> None:
        nonlocal origin_finished
        headers = [(b"Content-Length", b"%d" % SIZE), (b"Cache-Control", b"max-age=600")]
        await exchange.send_event(h11.Response(status_code=200, headers=headers))
        for offset in range(0, SIZE - CHUNK, CHUNK):
            await exchange.send_event(h11.Data(data=body[offset : offset + CHUNK]))
            await trio.sleep(0.001)  # a slow origin: the others arrive mid-body
        await last_chunk.wait()
        await exchange.send_event(h11.Data(data=body[SIZE - CHUNK :]))
        await exchange.send_event(h11.EndOfMessage())
        origin_finished = True

    origin.route("/big", handler)
    url = origin.url("/big")
    got_bytes = [False] * CLIENTS
    digests: list[str] = [""] * CLIENTS
    statuses = [0] * CLIENTS

    async with client(proxy, CLIENTS) as http:

        async def fetch(index: int) -> None:
            digest = hashlib.sha256()
            async with http.stream("GET", url) as response:
                statuses[index] = response.status_code
                async for chunk in response.aiter_raw():
                    if chunk:
                        got_bytes[index] = True
                    digest.update(chunk)
            digests[index] = digest.hexdigest()

        async with trio.open_nursery() as nursery:
            for index in range(CLIENTS):
                nursery.start_soon(fetch, index)
            with trio.move_on_after(30):
                while not all(got_bytes):  # noqa: ASYNC110 (polling the clients' progress)
                    await trio.sleep(0.01)
            early = sum(got_bytes)
            finished_early = origin_finished
            last_chunk.set()  # never leave the origin (and so the clients) hanging
            assert early == CLIENTS, f"only {early}/{CLIENTS} clients had bytes before the end"
            assert not finished_early

    assert statuses == [200] * CLIENTS
    assert set(digests) == {hashlib.sha256(body).hexdigest()}
    assert len(seen(origin, "/big")) == 1
    assert collapsed(proxy) == CLIENTS - 1
    async with client(proxy, 1) as http:
        stored = await http.head(url)
        again = await http.get(url)
    assert is_hit(stored)  # every follower finished after the commit: the entry is complete
    assert again.content == body
    assert len(seen(origin, "/big")) == 1


async def test_unstorable_response_sends_each_follower_to_the_origin(
    start_proxy: StartProxy, tmp_path: Path, origin: Origin
) -> None:
    """When the leader's response may not be stored (private), followers cannot share it: each
    fetches for itself and gets its own response."""
    proxy = await start_proxy(**cache_settings(tmp_path / "cache"))
    release = trio.Event()
    count = 0

    async def handler(exchange: Exchange) -> None:
        nonlocal count
        count += 1
        number = count
        await release.wait()
        cc = ("Cache-Control", "private, max-age=600")
        await answer(exchange, Reply(body=f"private {number}".encode(), headers=[cc]))

    origin.route("/p", handler)
    bodies: list[bytes] = []
    async with client(proxy, 5) as http:

        async def fetch() -> None:
            response = await http.get(origin.url("/p"))
            assert response.status_code == 200
            bodies.append(response.content)

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(fetch)
            try:
                # The leader's request may still be on its way to the origin: wait for both.
                await eventually(
                    lambda: collapsed(proxy) == 4 and len(seen(origin, "/p")) >= 1, timeout=15
                )
                await trio.sleep(0.2)
                assert len(seen(origin, "/p")) == 1  # followers wait for the leader's answer
            finally:
                release.set()

    assert sorted(bodies) == [f"private {n}".encode() for n in range(1, 6)]
    assert len(seen(origin, "/p")) == 5


async def test_leader_failing_mid_body_cuts_followers_and_later_requests_fetch_again(
    start_proxy: StartProxy, tmp_path: Path, origin: Origin
) -> None:
    """The origin breaks off mid-body: the leader and every follower are cut (never a short body
    presented as complete), nothing partial is stored, and the next request fetches afresh."""
    proxy = await start_proxy(**cache_settings(tmp_path / "cache"))
    size = 1 << 20
    body = random.Random(7).randbytes(size)
    cut = trio.Event()
    count = 0

    async def handler(exchange: Exchange) -> None:
        nonlocal count
        count += 1
        headers = [(b"Content-Length", b"%d" % size), (b"Cache-Control", b"max-age=600")]
        await exchange.send_event(h11.Response(status_code=200, headers=headers))
        if count == 1:
            await exchange.send_event(h11.Data(data=body[: size // 2]))
            await cut.wait()
            await exchange.abort()
            return
        await exchange.send_event(h11.Data(data=body))
        await exchange.send_event(h11.EndOfMessage())

    origin.route("/f", handler)
    clients = 5
    got_bytes = [False] * clients
    outcomes = [""] * clients
    async with client(proxy, clients) as http:

        async def fetch(index: int) -> None:
            received = 0
            try:
                async with http.stream("GET", origin.url("/f")) as response:
                    async for chunk in response.aiter_raw():
                        got_bytes[index] = got_bytes[index] or bool(chunk)
                        received += len(chunk)
            except httpx.TransportError:
                outcomes[index] = "cut"
                return
            outcomes[index] = f"complete with {received} bytes"

        async with trio.open_nursery() as nursery:
            for index in range(clients):
                nursery.start_soon(fetch, index)
            try:
                await eventually(lambda: all(got_bytes), timeout=15)
                assert collapsed(proxy) == clients - 1
            finally:
                cut.set()

        assert outcomes == ["cut"] * clients
        assert len(seen(origin, "/f")) == 1
        later = await http.get(origin.url("/f"))
    assert later.status_code == 200
    assert later.content == body
    assert not is_hit(later)
    assert len(seen(origin, "/f")) == 2


async def test_concurrent_revalidations_are_collapsed(
    start_proxy: StartProxy, tmp_path: Path, origin: Origin
) -> None:
    """Several requests for one stale entry at once send one conditional request; its 304
    serves them all (RFC 9111 §4.3 with Chromium's per-URL cache lock)."""
    proxy = await start_proxy(**cache_settings(tmp_path / "cache"))
    release = trio.Event()
    count = 0

    async def handler(exchange: Exchange) -> None:
        nonlocal count
        count += 1
        if count == 1:
            headers = [("Cache-Control", "max-age=1"), ("ETag", '"v1"')]
            await answer(exchange, Reply(headers=headers, date_ago=30))
            return
        await release.wait()
        await answer(exchange, Reply(304, b"", [FRESH, ("ETag", '"v1"')]))

    origin.route("/s", handler)
    url = origin.url("/s")
    bodies: list[bytes] = []
    async with client(proxy, 5) as http:
        await http.get(url)

        async def fetch() -> None:
            response = await http.get(url)
            assert response.status_code == 200
            bodies.append(response.content)

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(fetch)
            try:
                await eventually(lambda: collapsed(proxy) == 4, timeout=15)
            finally:
                release.set()

    assert bodies == [b"stored body"] * 5
    requests = seen(origin, "/s")
    assert len(requests) == 2
    assert field(requests[1], "If-None-Match") == '"v1"'

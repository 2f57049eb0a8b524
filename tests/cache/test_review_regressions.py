"""Regression tests from the review of the cache transaction: each failed before its fix."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import h11
import httpx
import trio

from tests.cache.test_rfc9111 import Reply, cache_settings, field, script, seen
from tests.conftest import StartProxy, eventually
from tests.origin import Exchange, Origin


async def test_304_selecting_nothing_retries_with_client_headers(
    start_proxy: StartProxy, tmp_path: Path, origin: Origin
) -> None:
    """§4.3.4: a 304 whose strong ETag matches no stored response -> the cache asks again."""
    proxy = await start_proxy(**cache_settings(tmp_path / "c"))
    script(
        origin,
        "/r",
        Reply(body=b"old", headers=[("ETag", '"a"'), ("Cache-Control", "max-age=1")], date_ago=10),
        Reply(status=304, headers=[("ETag", '"b"')]),
        Reply(body=b"new", headers=[("ETag", '"b"'), ("Cache-Control", "max-age=60")]),
    )
    async with httpx.AsyncClient(proxy=proxy.url, trust_env=False, timeout=5) as http:
        with trio.fail_after(10):
            r1 = await http.get(origin.url("/r"), headers={"X-Client": "yes"})
            assert r1.content == b"old"
            r2 = await http.get(origin.url("/r"), headers={"X-Client": "yes"})
            await http.get(origin.url("/other"))
    reqs = seen(origin, "/r")
    assert r2.status_code == 200 and r2.content == b"new"
    assert len(reqs) == 3
    assert field(reqs[2], "x-client") == "yes"
    assert origin.connections == 1, [
        r.connection_id for r in origin.requests
    ]  # the retry's upstream socket should stay reusable


def _rst_close(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def collapsed(proxy) -> float:  # type: ignore[no-untyped-def]
    return proxy.server.metrics.registry.get_sample_value("proxyd_cache_collapsed_total") or 0.0


async def test_leader_client_gone_small_body_does_not_fail_followers(
    start_proxy: StartProxy, tmp_path: Path, origin: Origin
) -> None:
    """The leader's client resets before a small response arrives (head+body in one read):
    followers still get the whole body and it is stored."""
    proxy = await start_proxy(**cache_settings(tmp_path / "c"))
    release = trio.Event()

    async def handler(exchange: Exchange) -> None:
        await exchange.read_body()
        await release.wait()
        # chunked (no Content-Length), head + body + end in one write
        await exchange.respond(
            200, b"small body", [(b"Cache-Control", b"max-age=600")], content_length=False
        )

    origin.route("/s", handler)
    leader = trio.socket.socket()
    await leader.connect(("127.0.0.1", proxy.port))
    await leader.send(
        f"GET {origin.url('/s')} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n".encode()
    )
    await eventually(lambda: len(seen(origin, "/s")) == 1)
    results: list[httpx.Response | BaseException] = []

    async def follow() -> None:
        async with httpx.AsyncClient(proxy=proxy.url, trust_env=False, timeout=5) as http:
            try:
                results.append(await http.get(origin.url("/s")))
            except Exception as exc:
                results.append(exc)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow)
            await eventually(lambda: collapsed(proxy) == 1)
            leader.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            leader.close()
            await trio.sleep(0.2)
            release.set()
    assert isinstance(results[0], httpx.Response), results
    assert results[0].content == b"small body"
    async with httpx.AsyncClient(proxy=proxy.url, trust_env=False, timeout=5) as http:
        again = await http.get(origin.url("/s"))
    assert again.content == b"small body"
    assert len(seen(origin, "/s")) == 1, "the complete response was not stored"


async def test_slow_leader_client_does_not_stall_followers(
    start_proxy: StartProxy, tmp_path: Path, origin: Origin
) -> None:
    """A leader client that stops reading: followers should still get the body."""
    proxy = await start_proxy(
        **cache_settings(tmp_path / "c"), **{"upstream.timeouts.idle_read": 1.0}
    )
    size = 16 * 1024 * 1024
    body = bytes(range(256)) * (size // 256)
    started = trio.Event()

    async def handler(exchange: Exchange) -> None:
        await exchange.read_body()
        await exchange.send_event(
            h11.Response(
                status_code=200,
                headers=[(b"Content-Length", b"%d" % size), (b"Cache-Control", b"max-age=600")],
            )
        )
        await started.wait()
        for off in range(0, size, 65536):
            await exchange.send_event(h11.Data(data=body[off : off + 65536]))
        await exchange.send_event(h11.EndOfMessage())

    origin.route("/big", handler)
    leader = trio.socket.socket()
    leader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await leader.connect(("127.0.0.1", proxy.port))
    await leader.send(
        f"GET {origin.url('/big')} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n".encode()
    )
    await eventually(lambda: len(seen(origin, "/big")) == 1)
    results: list[object] = []

    async def follow() -> None:
        async with httpx.AsyncClient(proxy=proxy.url, trust_env=False, timeout=10) as http:
            try:
                r = await http.get(origin.url("/big"))
                results.append(len(r.content))
            except Exception as exc:
                results.append(exc)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow)
            await eventually(lambda: collapsed(proxy) == 1)
            started.set()
    leader.close()
    assert results == [size]


async def test_background_revalidation_of_slow_body_completes(
    start_proxy: StartProxy, tmp_path: Path, origin: Origin
) -> None:
    """RFC 5861 §3: a background refresh whose body takes longer than head+idle in total
    (but never idles) should still complete and store the new response."""
    proxy = await start_proxy(
        **cache_settings(tmp_path / "c"),
        **{"upstream.timeouts.idle_read": 0.5, "upstream.timeouts.response_head": 0.5},
    )
    count = 0

    async def handler(exchange: Exchange) -> None:
        nonlocal count
        count += 1
        await exchange.read_body()
        if count == 1:
            await exchange.respond(
                200,
                b"v1",
                [
                    (b"Cache-Control", b"max-age=1, stale-while-revalidate=600"),
                    (b"Age", b"5"),
                ],
            )
            return
        chunks = [b"x" * 10] * 8
        await exchange.send_event(
            h11.Response(
                status_code=200,
                headers=[(b"Content-Length", b"80"), (b"Cache-Control", b"max-age=600")],
            )
        )
        for c in chunks:
            await trio.sleep(0.25)
            await exchange.send_event(h11.Data(data=c))
        await exchange.send_event(h11.EndOfMessage())

    origin.route("/swr", handler)
    async with httpx.AsyncClient(proxy=proxy.url, trust_env=False, timeout=5) as http:
        with trio.fail_after(15):
            assert (await http.get(origin.url("/swr"))).content == b"v1"
            r = await http.get(origin.url("/swr"))
            assert r.content == b"v1"  # stale served, background started
            await trio.sleep(3.5)
            r = await http.get(origin.url("/swr"))
    assert r.content == b"x" * 80
    assert count == 2


async def test_if_range_is_not_dropped_on_revalidation(
    start_proxy: StartProxy, tmp_path: Path, origin: Origin
) -> None:
    """RFC 9110 §13.1.5: the client's If-Range must not be lost while Range still goes up."""
    proxy = await start_proxy(**cache_settings(tmp_path / "c"))
    version = [b"v1"]

    async def handler(exchange: Exchange) -> None:
        await exchange.read_body()
        etag = b'"' + version[0] + b'"'
        body = version[0] * 50
        inm = exchange.header(b"if-none-match")
        if inm is not None and etag in inm:
            await exchange.respond(304, b"", [(b"ETag", etag)], content_length=False)
            return
        rng = exchange.header(b"range")
        if_range = exchange.header(b"if-range")
        headers = [(b"ETag", etag), (b"Cache-Control", b"max-age=1"), (b"Age", b"10")]
        if rng == b"bytes=0-9" and (if_range is None or if_range == etag):
            headers.append((b"Content-Range", b"bytes 0-9/%d" % len(body)))
            await exchange.respond(206, body[:10], headers)
            return
        await exchange.respond(200, body, headers)

    origin.route("/ir", handler)
    async with httpx.AsyncClient(proxy=proxy.url, trust_env=False, timeout=5) as http:
        with trio.fail_after(10):
            r1 = await http.get(origin.url("/ir"))
            assert r1.content == b"v1" * 50
            version[0] = b"v2"
            r2 = await http.get(
                origin.url("/ir"), headers={"Range": "bytes=0-9", "If-Range": '"v1"'}
            )
    # the client's validator v1 no longer matches: it must get the whole v2 (200), not a part
    assert r2.status_code == 200


async def test_error_responses_carry_cache_status(start_proxy: StartProxy, tmp_path: Path) -> None:
    """issue 4: every response says what the cache did (RFC 9211), errors included."""
    import socket as s

    sock = s.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    proxy = await start_proxy(**cache_settings(tmp_path / "c"))
    async with httpx.AsyncClient(proxy=proxy.url, trust_env=False, timeout=5) as http:
        with trio.fail_after(10):
            r = await http.get(f"http://127.0.0.1:{port}/x")
    assert r.status_code >= 500
    assert "cache-status" in r.headers

"""The daemon as a whole, in-process: access control, auth, drain, connection limit."""

from __future__ import annotations

import base64

import httpx
import trio

from proxyd.http.access import hash_password
from tests.conftest import StartProxy, eventually
from tests.origin import Exchange, Origin


async def test_clients_outside_the_acl_get_403_and_are_logged(
    start_proxy: StartProxy, origin: Origin
) -> None:
    """acl.allow_clients: a client address outside every listed network is refused."""
    proxy = await start_proxy(**{"acl.allow_clients": ["10.0.0.0/8"]})
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        response = await client.get(origin.url("/"))
    assert response.status_code == 403
    assert "error=http_request_denied" in response.headers["proxy-status"]
    assert origin.requests == []
    await eventually(lambda: len(proxy.access_lines()) == 1)
    assert " 403 " in proxy.access_lines()[0]
    async with httpx.AsyncClient() as admin:
        metrics = (await admin.get(proxy.admin_url + "/metrics")).text
    assert 'proxyd_client_connections_total{allowed="false"} 1.0' in metrics


async def test_proxy_authentication(start_proxy: StartProxy, origin: Origin) -> None:
    """RFC 9110 §11.7: 407 with Proxy-Authenticate: Basic without or with wrong credentials;
    the right ones pass and are never forwarded upstream nor logged."""
    stored = hash_password("s3cret-pw", scheme="pbkdf2_sha256")
    proxy = await start_proxy(**{"auth.users": {"alice": stored}})
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        missing = await client.get(origin.url("/"))
    assert missing.status_code == 407
    assert missing.headers["proxy-authenticate"].startswith('Basic realm="proxyd"')
    wrong_url = proxy.url.replace("http://", "http://alice:nope@")
    async with httpx.AsyncClient(proxy=wrong_url) as client:
        assert (await client.get(origin.url("/"))).status_code == 407
    good_url = proxy.url.replace("http://", "http://alice:s3cret-pw@")
    async with httpx.AsyncClient(proxy=good_url) as client:
        for _ in range(3):  # later ones hit the verified-credentials cache
            response = await client.get(origin.url("/"))
            assert response.status_code == 200
    assert len(origin.requests) == 3
    for seen in origin.requests:
        assert all(name.lower() != b"proxy-authorization" for name, _ in seen.headers)
    await eventually(lambda: len(proxy.access_lines()) == 5)
    log = "\n".join(proxy.access_lines())
    assert "s3cret-pw" not in log
    token = base64.b64encode(b"alice:s3cret-pw").decode()
    assert token not in log
    assert " alice GET " in proxy.access_lines()[-1]


async def test_drain_finishes_in_flight_requests_and_closes_idle_ones(
    start_proxy: StartProxy, origin: Origin
) -> None:
    """SIGTERM semantics (ProxyServer.drain): stop accepting, let an in-flight request finish,
    close idle keep-alive connections, turn /readyz to 503."""

    async def slow(exchange: Exchange) -> None:
        await exchange.read_body()
        await trio.sleep(0.5)
        await exchange.respond(200, b"finished")

    origin.route("/slow", slow)
    proxy = await start_proxy(shutdown_timeout=5)
    idle = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    results: list[httpx.Response] = []

    async def in_flight() -> None:
        async with httpx.AsyncClient(proxy=proxy.url) as client:
            results.append(await client.get(origin.url("/slow")))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(in_flight)
        await eventually(lambda: len(origin.requests) == 1)
        async with httpx.AsyncClient() as admin:
            assert (await admin.get(proxy.admin_url + "/readyz")).status_code == 200
            proxy.server.drain()
            await trio.sleep(0.05)
            assert (await admin.get(proxy.admin_url + "/readyz")).status_code == 503
        with trio.fail_after(2):
            assert await idle.receive_some(10) == b""  # idle keep-alive connection closed
    assert results[0].status_code == 200 and results[0].content == b"finished"
    assert results[0].headers.get("connection") == "close"
    with trio.fail_after(3):
        await proxy.server._stopped.wait()


async def test_connections_beyond_the_limit_wait(start_proxy: StartProxy, origin: Origin) -> None:
    """client.max_connections: an extra connection is not served until a slot frees up."""
    proxy = await start_proxy(**{"client.max_connections": 1})
    first = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    request = f"GET {origin.url('/')} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    await first.send_all(request)
    with trio.fail_after(3):
        assert (await first.receive_some(65536)).startswith(b"HTTP/1.1 200")
    second = await trio.open_tcp_stream("127.0.0.1", proxy.port)  # sits in the backlog
    await second.send_all(request)
    with trio.move_on_after(0.3) as waited:
        await second.receive_some(65536)
    assert waited.cancelled_caught, "served beyond client.max_connections"
    await first.aclose()
    with trio.fail_after(3):
        assert (await second.receive_some(65536)).startswith(b"HTTP/1.1 200")

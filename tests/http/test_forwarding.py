"""HTTP forwarding through the in-process proxy with real clients (httpx) and a real origin."""

from __future__ import annotations

import json

import httpx

from tests.conftest import RunningProxy, StartProxy
from tests.origin import Exchange, Origin


async def test_get_absolute_form_is_forwarded_in_origin_form(
    proxy: RunningProxy, origin: Origin
) -> None:
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        response = await client.get(origin.url("/hello?x=1"), headers={"X-Custom-Case": "Kept"})
    assert response.status_code == 200
    echo = response.json()
    assert echo["target"] == "/hello?x=1"
    names = [name for name, _ in echo["headers"]]
    assert names[0] == "Host"
    assert dict(echo["headers"])["Host"] == f"127.0.0.1:{origin.port}"
    assert "X-Custom-Case" in names
    assert dict(echo["headers"])["Via"] == "1.1 proxyd-test"
    assert response.headers["via"] == "1.1 proxyd-test"


async def test_sequential_requests_reuse_client_and_origin_connections(
    proxy: RunningProxy, origin: Origin
) -> None:
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        for _ in range(5):
            response = await client.get(origin.url("/"))
            assert response.status_code == 200
    assert origin.connections == 1
    assert len(origin.requests) == 5
    assert len(proxy.access_lines()) == 5


async def test_post_body_streams_up(proxy: RunningProxy, origin: Origin) -> None:
    async def handler(exchange: Exchange) -> None:
        body = await exchange.read_body()
        await exchange.respond(201, body[::-1])

    origin.route("/upload", handler)
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        response = await client.post(origin.url("/upload"), content=b"abcdef" * 1000)
    assert response.status_code == 201
    assert response.content == (b"abcdef" * 1000)[::-1]
    assert json.loads(b'{"ok": 1}')["ok"] == 1


async def test_dns_hosts_override_wins(start_proxy: StartProxy, origin: Origin) -> None:
    """dns.hosts maps a name to an address for the proxy only, like an /etc/hosts; the Host
    field still carries the name."""
    proxy = await start_proxy(**{"dns.hosts": {"intranet.example": "127.0.0.1"}})
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        response = await client.get(f"http://intranet.example:{origin.port}/via-override")
    assert response.status_code == 200
    echo = response.json()
    assert echo["target"] == "/via-override"
    assert dict(echo["headers"])["Host"] == f"intranet.example:{origin.port}"

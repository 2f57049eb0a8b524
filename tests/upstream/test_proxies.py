"""Upstream proxies for real: a second proxyd, tinyproxy (HTTP) and microsocks (SOCKS5), all on
loopback and started by the tests; chaining, credentials, failover and the bad-proxy list.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from proxyd.http.access import hash_password
from tests.conftest import BASE_CONFIG, StartProxy, eventually
from tests.origin import Origin


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_listening(port: int, timeout: float = 5.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


def run_daemon(argv: list[str], port: int) -> Iterator[int]:
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[int]:
    binary = shutil.which("tinyproxy")
    if binary is None:
        pytest.skip("tinyproxy is not installed (bash .ci/dev test installs it)")
    port = free_port()
    config = tmp_path / "tinyproxy.conf"
    config.write_text(
        f"Port {port}\nListen 127.0.0.1\nTimeout 30\nAllow 127.0.0.1\nMaxClients 50\n"
    )
    yield from run_daemon([binary, "-d", "-c", str(config)], port)


def microsocks(user: str | None = None, password: str | None = None) -> Iterator[int]:
    binary = shutil.which("microsocks")
    if binary is None:
        pytest.skip("microsocks is not installed (bash .ci/dev test installs it)")
    port = free_port()
    argv = [binary, "-i", "127.0.0.1", "-p", str(port)]
    if user is not None:
        argv += ["-u", user, "-P", password or ""]
    yield from run_daemon(argv, port)


@pytest.fixture
def socks5() -> Iterator[int]:
    yield from microsocks()


@pytest.fixture
def socks5_auth() -> Iterator[int]:
    yield from microsocks("bob", "socks-pw")


def second_proxyd_config(**extra: str) -> str:
    return BASE_CONFIG.replace("proxyd-test", "proxyd-upstream")


async def test_chaining_through_a_second_proxyd(start_proxy: StartProxy, origin: Origin) -> None:
    """PROXY route to another proxyd: requests go in absolute form over a pooled keep-alive
    connection; both proxies add their Via."""
    upstream = await start_proxy(second_proxyd_config())
    proxy = await start_proxy(**{"routing.default": [f"PROXY 127.0.0.1:{upstream.port}"]})
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        for _ in range(3):
            response = await client.get(origin.url("/chained"))
            assert response.status_code == 200
    seen = origin.requests[-1]
    vias = [value for name, value in seen.headers if name.lower() == b"via"]
    assert vias == [b"1.1 proxyd-test", b"1.1 proxyd-upstream"] or vias == [
        b"1.1 proxyd-test, 1.1 proxyd-upstream"
    ]
    await eventually(lambda: len(upstream.access_lines()) == 3)
    assert all(
        f"http://127.0.0.1:{origin.port}/chained" in line for line in upstream.access_lines()
    )
    assert "route=http://127.0.0.1" in proxy.access_lines()[-1]


async def test_connect_tunnels_through_an_upstream_proxyd(
    start_proxy: StartProxy, origin: Origin
) -> None:
    """CONNECT through an HTTP upstream proxy: our CONNECT becomes its CONNECT."""
    upstream = await start_proxy(second_proxyd_config(), **{"connect.allowed_ports": [origin.port]})
    proxy = await start_proxy(
        **{
            "routing.default": [f"PROXY 127.0.0.1:{upstream.port}"],
            "connect.allowed_ports": [origin.port],
        }
    )
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    await stream.send_all(f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    with trio.fail_after(5):
        head = await stream.receive_some(4096)
        assert head.startswith(b"HTTP/1.1 200")
        await stream.send_all(b"GET /inside HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := await stream.receive_some(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200") and b'"target": "/inside"' in answer


async def test_proxy_credentials_are_sent_to_that_proxy_only(
    start_proxy: StartProxy, origin: Origin
) -> None:
    """http://user:pass@proxy routes send Proxy-Authorization to the proxy, never beyond; a
    407 from the upstream proxy reaches the client as 502 naming that proxy."""
    stored = hash_password("up-pw", scheme="pbkdf2_sha256")
    upstream = await start_proxy(second_proxyd_config(), **{"auth.users": {"carol": stored}})
    good = await start_proxy(
        **{"routing.default": [f"http://carol:up-pw@127.0.0.1:{upstream.port}"]}
    )
    bad = await start_proxy(**{"routing.default": [f"PROXY 127.0.0.1:{upstream.port}"]})
    async with httpx.AsyncClient(proxy=good.url) as client:
        assert (await client.get(origin.url("/auth"))).status_code == 200
    assert all(name.lower() != b"proxy-authorization" for name, _ in origin.requests[-1].headers)
    async with httpx.AsyncClient(proxy=bad.url) as client:
        response = await client.get(origin.url("/noauth"))
    assert response.status_code == 502
    assert f'next-hop="http://127.0.0.1:{upstream.port}"' in response.headers["proxy-status"]
    assert len(origin.requests) == 1


async def test_failover_from_a_dead_proxy_to_a_live_one_to_direct(
    start_proxy: StartProxy, origin: Origin
) -> None:
    """A route list is tried in order; the dead proxy goes on the bad-proxy list and is skipped
    by later requests; when every proxy is gone, DIRECT serves."""
    dead = free_port()
    upstream = await start_proxy(second_proxyd_config())
    proxy = await start_proxy(
        **{
            "routing.default": [
                f"PROXY 127.0.0.1:{dead}",
                f"PROXY 127.0.0.1:{upstream.port}",
                "DIRECT",
            ]
        }
    )
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        for _ in range(3):
            assert (await client.get(origin.url("/f"))).status_code == 200
    await eventually(lambda: len(upstream.access_lines()) == 3)  # all went through the live one
    async with httpx.AsyncClient() as admin:
        metrics = (await admin.get(proxy.admin_url + "/metrics")).text
    assert 'proxyd_failovers_total{route_kind="http"} 1.0' in metrics  # only the first request
    assert "proxyd_bad_proxies 1.0" in metrics
    # the live upstream goes away too: DIRECT takes over
    upstream.server.drain()
    with trio.fail_after(5):
        await upstream.server._stopped.wait()
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        response = await client.get(origin.url("/direct"))
    assert response.status_code == 200
    await eventually(lambda: len(proxy.access_lines()) == 4)
    assert "route=DIRECT" in proxy.access_lines()[-1]


async def test_all_routes_failing_names_the_last_hop(
    start_proxy: StartProxy, origin: Origin
) -> None:
    """If every entry fails, the client gets 502 with Proxy-Status naming the last hop."""
    first, second = free_port(), free_port()
    proxy = await start_proxy(
        **{"routing.default": [f"PROXY 127.0.0.1:{first}", f"SOCKS5 127.0.0.1:{second}"]}
    )
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        response = await client.get(origin.url("/"))
    assert response.status_code == 502
    status = response.headers["proxy-status"]
    assert "error=connection_refused" in status
    assert f'next-hop="socks5://127.0.0.1:{second}"' in status


async def test_through_tinyproxy(start_proxy: StartProxy, origin: Origin, tinyproxy: int) -> None:
    """A real HTTP proxy from Debian: plain requests in absolute form and CONNECT tunnels."""
    proxy = await start_proxy(
        **{
            "routing.default": [f"PROXY 127.0.0.1:{tinyproxy}"],
            "connect.allowed_ports": [origin.port],
        }
    )
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        for _ in range(2):
            response = await client.get(origin.url("/tiny"))
            assert response.status_code == 200 and response.json()["target"] == "/tiny"
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    await stream.send_all(f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    with trio.fail_after(5):
        assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 200")
        await stream.send_all(b"GET /tunnelled HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := await stream.receive_some(65536):
            answer += chunk
    assert b'"target": "/tunnelled"' in answer


@pytest.mark.parametrize("scheme", ["socks5h", "socks5"])
async def test_through_microsocks(
    start_proxy: StartProxy, origin: Origin, socks5: int, scheme: str
) -> None:
    """A real SOCKS5 proxy: socks5h lets the proxy resolve the name, socks5 resolves it here."""
    proxy = await start_proxy(**{"routing.default": [f"{scheme}://127.0.0.1:{socks5}"]})
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        response = await client.get(f"http://localhost:{origin.port}/socks")
    assert response.status_code == 200 and response.json()["target"] == "/socks"


async def test_socks5_credentials(
    start_proxy: StartProxy, origin: Origin, socks5_auth: int
) -> None:
    """RFC 1929 username/password to the SOCKS5 proxy; wrong ones are a 502 naming it."""
    good = await start_proxy(
        **{"routing.default": [f"socks5h://bob:socks-pw@127.0.0.1:{socks5_auth}"]}
    )
    bad = await start_proxy(**{"routing.default": [f"socks5h://bob:nope@127.0.0.1:{socks5_auth}"]})
    async with httpx.AsyncClient(proxy=good.url) as client:
        assert (await client.get(origin.url("/s"))).status_code == 200
    async with httpx.AsyncClient(proxy=bad.url) as client:
        response = await client.get(origin.url("/s"))
    assert response.status_code == 502
    assert "next-hop=" in response.headers["proxy-status"]


@pytest.fixture
def proxyd_process(tmp_path: Path) -> Iterator[int]:
    """A second proxyd as its own process (the installed module), as an upstream proxy."""
    import sys

    port = free_port()
    config = tmp_path / "upstream.yaml"
    config.write_text(
        f'listen: ["127.0.0.1:{port}"]\nadmin: {{listen: "127.0.0.1:{free_port()}"}}\n'
        'via: {pseudonym: "proxyd-process"}\naccess_log: {enabled: false}\n'
    )
    yield from run_daemon([sys.executable, "-m", "proxyd", "--config", str(config)], port)


async def test_chaining_through_a_second_proxyd_process(
    start_proxy: StartProxy, origin: Origin, proxyd_process: int
) -> None:
    """The same chaining with the upstream proxyd in its own process."""
    proxy = await start_proxy(**{"routing.default": [f"PROXY 127.0.0.1:{proxyd_process}"]})
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        for _ in range(2):
            assert (await client.get(origin.url("/process"))).status_code == 200
    vias = b", ".join(
        value for name, value in origin.requests[-1].headers if name.lower() == b"via"
    )
    assert vias == b"1.1 proxyd-test, 1.1 proxyd-process"
    assert origin.connections == 1  # the upstream proxyd pools its origin connection too


async def test_failover_keeps_a_body_that_came_with_the_head(
    start_proxy: StartProxy, origin: Origin
) -> None:
    """A POST whose body arrived in the same read as its head, first routed to a dead proxy,
    reaches the origin whole over the next route (nothing of it was consumed before failover)."""
    proxy = await start_proxy(**{"routing.default": [f"PROXY 127.0.0.1:{free_port()}", "DIRECT"]})
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    await stream.send_all(
        f"POST {origin.url('/echo')} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        "Connection: close\r\n\r\nhello".encode()
    )
    answer = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200")
    assert b'"body_size": 5' in answer


async def test_bytes_after_an_upstream_proxys_connect_answer_are_kept(
    start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """A server-speaks-first protocol (an SSH banner) whose first bytes share a read with the
    upstream proxy's 200 to CONNECT still reaches the client."""

    async def fake_proxy(stream: trio.SocketStream) -> None:
        received = b""
        while b"\r\n\r\n" not in received:
            received += await stream.receive_some(4096)
        await stream.send_all(b"HTTP/1.1 200 Connection Established\r\n\r\nSSH-2.0-banner\r\n")
        await trio.sleep(2)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, fake_proxy, listeners)
    upstream_port = listeners[0].socket.getsockname()[1]
    proxy = await start_proxy(
        **{
            "routing.default": [f"PROXY 127.0.0.1:{upstream_port}"],
            "connect.allowed_ports": [22],
        }
    )
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    await stream.send_all(b"CONNECT ssh.example:22 HTTP/1.1\r\nHost: ssh.example:22\r\n\r\n")
    received = b""
    with trio.fail_after(5):
        while b"SSH-2.0-banner" not in received:
            chunk = await stream.receive_some(4096)
            assert chunk, received
            received += chunk
    assert received.startswith(b"HTTP/1.1 200")


async def test_socks4_with_local_dns_and_no_ipv4_is_not_a_proxy_failure(
    start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """socks4:// resolves locally and can only carry IPv4: a name with only IPv6 addresses is
    the destination's problem (502 destination_unavailable), not the proxy's (no failover)."""

    async def accept_only(stream: trio.SocketStream) -> None:
        await trio.sleep(2)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, accept_only, listeners)
    port = listeners[0].socket.getsockname()[1]
    proxy = await start_proxy(
        **{
            "routing.default": [f"socks4://127.0.0.1:{port}"],
            "dns.hosts": {"v6.test": "2001:db8::1"},
        }
    )
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        response = await client.get("http://v6.test:8080/")
    assert response.status_code == 502
    assert "error=destination_unavailable" in response.headers["proxy-status"]
    async with httpx.AsyncClient() as admin:
        metrics = (await admin.get(proxy.admin_url + "/metrics")).text
    assert "proxyd_bad_proxies 0.0" in metrics

"""Routing through the real daemon: static rules and bypass, a PAC file (with dnsResolve
answered from dns.hosts), /proxy.pac on the admin listener, SOCKS4/4a through dante, a PAC
script that does not parse, and the separate per-host tunnel limit."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from proxyd.cli import main
from tests.conftest import BASE_CONFIG, StartProxy, eventually
from tests.origin import Origin
from tests.upstream.test_proxies import free_port, run_daemon


def upstream_config() -> str:
    return BASE_CONFIG.replace("proxyd-test", "proxyd-upstream")


async def test_static_rules_and_bypass(start_proxy: StartProxy, origin: Origin) -> None:
    """routing.rules: the first matching rule decides; routing.bypass always goes DIRECT."""
    upstream = await start_proxy(upstream_config())
    proxy = await start_proxy(
        **{
            "routing.rules": [
                {"match": ["*.corp.example"], "route": [f"PROXY 127.0.0.1:{upstream.port}"]},
                {"match": [f":{origin.port}"], "route": [f"PROXY 127.0.0.1:{upstream.port}"]},
            ],
            "routing.bypass": ["127.0.0.0/8"],
            "dns.hosts": {"intranet.corp.example": "127.0.0.1"},
        }
    )
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        via_rule = await client.get(f"http://intranet.corp.example:{origin.port}/rule")
        bypassed = await client.get(origin.url("/bypass"))
    assert via_rule.status_code == 200 and bypassed.status_code == 200
    await eventually(lambda: len(proxy.access_lines()) == 2)
    first, second = proxy.access_lines()
    assert f"route=http://127.0.0.1:{upstream.port}" in first
    assert "route=DIRECT" in second  # the bypass wins over the port rule
    await eventually(lambda: len(upstream.access_lines()) == 1)


async def test_pac_file_routes_and_dns_resolve_uses_dns_hosts(
    start_proxy: StartProxy, origin: Origin, tmp_path: Path
) -> None:
    """PAC mode: FindProxyForURL decides; dnsResolve() is answered by proxyd's resolver, so a
    dns.hosts entry is what the script sees."""
    upstream = await start_proxy(upstream_config())
    dead = free_port()
    pac = tmp_path / "proxy.pac"
    pac.write_text(
        "function FindProxyForURL(url, host) {\n"
        '  if (dnsResolve(host) == "127.0.0.7") return "DIRECT";\n'
        '  if (shExpMatch(host, "*.via-upstream.example"))\n'
        f'    return "PROXY 127.0.0.1:{upstream.port}";\n'
        f'  return "PROXY 127.0.0.1:{dead}";\n'
        "}\n"
    )
    proxy = await start_proxy(
        **{
            "routing.pac.url": str(pac),
            "dns.hosts": {"pinned.example": "127.0.0.7", "a.via-upstream.example": "127.0.0.1"},
        }
    )
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        # dnsResolve("pinned.example") is 127.0.0.7 only through dns.hosts, and then the script
        # says DIRECT; nothing listens on 127.0.0.7, so that DIRECT attempt is refused (502).
        pinned = await client.get(f"http://pinned.example:{origin.port}/")
        routed = await client.get(f"http://a.via-upstream.example:{origin.port}/pac")
    assert routed.status_code == 200 and routed.json()["target"] == "/pac"
    await eventually(lambda: len(proxy.access_lines()) == 2)
    pinned_line, routed_line = proxy.access_lines()
    assert "route=DIRECT" in pinned_line, pinned_line
    assert pinned.status_code == 502  # nothing listens on 127.0.0.7:port: DIRECT was tried
    assert f"route=http://127.0.0.1:{upstream.port}" in routed_line


async def test_admin_serves_proxy_pac(start_proxy: StartProxy, tmp_path: Path) -> None:
    """GET /proxy.pac on the admin listener serves the configured PAC file to browsers."""
    pac = tmp_path / "served.pac"
    pac.write_text('function FindProxyForURL(url, host) { return "PROXY proxy.example:3128"; }\n')
    proxy = await start_proxy(**{"admin.proxy_pac": str(pac)})
    async with httpx.AsyncClient() as client:
        response = await client.get(proxy.admin_url + "/proxy.pac")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-ns-proxy-autoconfig"
    assert "FindProxyForURL" in response.text


def test_a_pac_script_that_does_not_parse_stops_the_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A PAC script that fails to parse at start-up is a start-up error with the engine's
    message and the line; the daemon does not run."""
    pac = tmp_path / "broken.pac"
    pac.write_text("function FindProxyForURL(url, host) {\n  return 'DIRECT'\n  }}}\n")
    config = tmp_path / "proxyd.yaml"
    config.write_text(
        'listen: ["127.0.0.1:0"]\nadmin: {listen: "127.0.0.1:0"}\n'
        f"routing: {{pac: {{url: {str(pac)!r}}}}}\n"
    )
    assert main(["--config", str(config)]) == 1
    error = capsys.readouterr().err
    assert "cannot load the PAC script" in error
    assert "line 3" in error


@pytest.fixture
def dante(tmp_path: Path) -> Iterator[int]:
    binary = shutil.which("danted")
    if binary is None:
        pytest.skip("dante-server is not installed (bash .ci/dev test installs it)")
    port = free_port()
    config = tmp_path / "danted.conf"
    config.write_text(
        "logoutput: stderr\n"
        f"internal: 127.0.0.1 port = {port}\n"
        "external: 127.0.0.1\n"
        "clientmethod: none\nsocksmethod: none\n"
        "user.privileged: root\nuser.unprivileged: nobody\n"
        "client pass { from: 127.0.0.0/8 to: 0.0.0.0/0 }\n"
        "socks pass { from: 127.0.0.0/8 to: 0.0.0.0/0 protocol: tcp }\n"
    )
    yield from run_daemon([binary, "-f", str(config)], port)


async def test_socks4_through_dante(start_proxy: StartProxy, origin: Origin, dante: int) -> None:
    """SOCKS4 through Debian's dante. (SOCKS4a is not exercised here: dante resolves localhost
    to ::1 first, and no test may use a name that needs real DNS.)"""
    proxy = await start_proxy(**{"routing.default": [f"socks4://127.0.0.1:{dante}"]})
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        response = await client.get(f"http://127.0.0.1:{origin.port}/socks4")
    assert response.status_code == 200, response.text
    assert response.json()["target"] == "/socks4"


async def test_tunnels_have_their_own_per_host_limit(
    start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """CONNECT tunnels are not pooled and count against pool.tunnels_per_host, not per_group."""

    async def hold(stream: trio.SocketStream) -> None:
        await trio.sleep(3)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, hold, listeners)
    port = listeners[0].socket.getsockname()[1]
    proxy = await start_proxy(
        **{"connect.allowed_ports": [port], "pool.tunnels_per_host": 1, "pool.timeout": 0.3}
    )
    request = f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    first = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    await first.send_all(request)
    with trio.fail_after(3):
        assert (await first.receive_some(4096)).startswith(b"HTTP/1.1 200")
    second = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    await second.send_all(request)
    with trio.fail_after(3):
        answer = await second.receive_some(4096)
    assert answer.startswith(b"HTTP/1.1 503") and b"connection_limit_reached" in answer


def test_tcp_nodelay_and_happy_eyeballs() -> None:
    """Every upstream socket has TCP_NODELAY; a name with a dead IPv6 address and a live IPv4
    one connects (RFC 8305 via trio.open_tcp_stream)."""
    from proxyd.upstream.connect import open_origin_stream

    async def scenario() -> None:
        class TwoAddresses(trio.abc.HostnameResolver):
            async def getaddrinfo(self, host, port, family=0, type=0, proto=0, flags=0):  # type: ignore[no-untyped-def]
                return [
                    (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", int(port), 0, 0)),
                    (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", int(port))),
                ]

            async def getnameinfo(self, sockaddr, flags):  # type: ignore[no-untyped-def]
                raise NotImplementedError

        trio.socket.set_custom_hostname_resolver(TwoAddresses())
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        stream = await open_origin_stream("dual.example", port, hosts={}, timeout=5)
        assert isinstance(stream, trio.SocketStream)
        assert stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        await stream.aclose()
        for listener in listeners:
            await listener.aclose()

    trio.run(scenario)

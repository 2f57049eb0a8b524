"""Configuration reload (SIGHUP, ``POST /reload``) through real daemons.

How these tests work: ``start_from_file`` runs an in-process ``ProxyServer`` from a real config
file (``ConfigSource``: the same file and overrides are re-read on reload), on ephemeral loopback
ports; a test rewrites the file and asks for a reload on the admin listener, as an operator
would with ``curl -X POST``. One test runs ``python -m proxyd`` as a subprocess and sends it a
real SIGHUP. Requests go through httpx or a small h11 client over raw sockets (to hold one
keep-alive connection or a CONNECT tunnel open across a reload). What is asserted is what a user
sees: which upstream a request took (the upstream proxyd's access log), status codes, the JSON
answer of ``/reload``, log lines, and the metrics on ``/metrics``.

Behaviour checked:

* a valid file is applied to the next request (routing rule, PAC source, ACL, auth users, pool
  limit, DNS overrides, Via, cache size, access log format and path) while a CONNECT tunnel or a
  keep-alive connection opened before keeps working;
* an invalid file (or a PAC script that cannot be loaded) is refused with every error as
  ``FILE:LINE: key.path: message`` (in the log and in the 400 answer); the old config stays;
* listen addresses, admin.listen and cache.dir are reported as needing a restart and ignored;
* ``proxyd_config_generation`` and ``proxyd_config_reloads_total{outcome}`` count it all.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
import trio

from proxyd.config import RoutingConfig, parse_config_text
from proxyd.http.access import hash_password
from proxyd.observe.accesslog import AccessLog
from proxyd.reload import ConfigSource, plan_reload
from proxyd.routing.router import Router
from proxyd.server import ProxyServer
from proxyd.upstream.pool_state import Limits, PoolState
from proxyd.upstream.route import RouteList
from tests.conftest import BASE_CONFIG, LoopbackResolver, RunningProxy, StartProxy, eventually
from tests.origin import Exchange, Origin

REPO = Path(__file__).resolve().parent.parent


def config_text(*extra: str) -> str:
    """Three fixed lines (ephemeral ports, a Via name) and then ``extra`` (line 4 onwards)."""
    head = (
        'listen: ["127.0.0.1:0"]\nadmin: {listen: "127.0.0.1:0"}\nvia: {pseudonym: "proxyd-test"}\n'
    )
    return head + "".join(extra)


def upstream_config() -> str:
    return BASE_CONFIG.replace("proxyd-test", "proxyd-upstream")


class FileProxy(RunningProxy):
    """A running in-process daemon started from ``path``."""

    def __init__(self, server: ProxyServer, log: io.StringIO, path: Path) -> None:
        super().__init__(server, log)
        self.path = path

    def write(self, text: str) -> None:
        self.path.write_text(text, "utf-8")

    async def reload(self) -> httpx.Response:
        """POST /reload on the admin listener."""
        async with httpx.AsyncClient(trust_env=False, timeout=20) as admin:
            return await admin.post(self.admin_url + "/reload")

    async def metrics(self) -> str:
        async with httpx.AsyncClient(trust_env=False) as admin:
            return (await admin.get(self.admin_url + "/metrics")).text


StartFromFile = Callable[..., Awaitable[FileProxy]]


@pytest.fixture
async def start_from_file(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[StartFromFile]:
    started: list[ProxyServer] = []
    trio.socket.set_custom_hostname_resolver(LoopbackResolver())  # no DNS off the machine

    async def start(text: str, *, capture_access_log: bool = True, **overrides: Any) -> FileProxy:
        path = tmp_path / "proxyd.yaml"
        path.write_text(text, "utf-8")
        source = ConfigSource(str(path), overrides)
        config = source.load()
        buffer = io.StringIO()
        access_log = None
        if capture_access_log:
            access_log = AccessLog(config.access_log.format, "-")
            access_log._stream = buffer  # capture lines in memory
        server = ProxyServer(config, access_log=access_log, config_source=source)
        await nursery.start(server.run)
        started.append(server)
        return FileProxy(server, buffer, path)

    yield start
    for server in started:
        server.drain()


class RawHttp:
    """HTTP/1.1 over one socket we hold (a keep-alive proxy connection, or a tunnel)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def get(self, target: str, host: str) -> tuple[int, bytes]:
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        request = h11.Request(method="GET", target=target, headers=[("Host", host)])
        await self.stream.send_all(self.conn.send(request) + self.conn.send(h11.EndOfMessage()))
        status, body = 0, b""
        with trio.fail_after(5):
            while True:
                event = self.conn.next_event()
                if event is h11.NEED_DATA:
                    self.conn.receive_data(await self.stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    return status, body
                else:
                    raise AssertionError(f"unexpected {event!r}")


async def open_tunnel(proxy_port: int, origin: Origin) -> RawHttp:
    """CONNECT 127.0.0.1:<origin> through the proxy; HTTP to the origin inside it."""
    stream = await trio.open_tcp_stream("127.0.0.1", proxy_port)
    authority = f"127.0.0.1:{origin.port}"
    await stream.send_all(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    head = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in head:
            chunk = await stream.receive_some(65536)
            assert chunk, head
            head += chunk
    assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n"), head
    return RawHttp(stream)


def sample(proxy: RunningProxy, name: str, **labels: str) -> float | None:
    return proxy.server.metrics.registry.get_sample_value(name, labels)


def reload_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage().removeprefix("reload: ")
        for record in caplog.records
        if record.name == "proxyd.server"
        and record.levelno == logging.ERROR
        and record.getMessage().startswith("reload: ")
    ]


# --- routing ---------------------------------------------------------------------------------


async def test_a_reloaded_rule_routes_the_next_request_while_an_open_tunnel_keeps_working(
    start_from_file: StartFromFile, start_proxy: StartProxy, origin: Origin
) -> None:
    """POST /reload with a new routing rule: the next request goes through the upstream proxy
    the rule names; a CONNECT tunnel opened before the reload keeps relaying, DIRECT."""
    upstream = await start_proxy(upstream_config())
    allow = f"connect: {{allowed_ports: [{origin.port}]}}\n"
    proxy = await start_from_file(config_text(allow))
    tunnel = await open_tunnel(proxy.port, origin)
    assert (await tunnel.get("/tunnel-before", "origin"))[0] == 200
    async with httpx.AsyncClient(proxy=proxy.url, trust_env=False) as client:
        assert (await client.get(origin.url("/direct"))).status_code == 200

    proxy.write(
        config_text(
            allow,
            "routing:\n",
            "  rules:\n",
            '    - match: ["127.0.0.0/8"]\n',
            f'      route: ["PROXY 127.0.0.1:{upstream.port}"]\n',
        )
    )
    response = await proxy.reload()
    assert response.status_code == 200
    assert response.json() == {
        "outcome": "ok",
        "generation": 2,
        "changed": ["routing.rules"],
        "restart_needed": [],
    }
    assert proxy.server.config_generation == 2

    async with httpx.AsyncClient(proxy=proxy.url, trust_env=False) as client:
        assert (await client.get(origin.url("/after-reload"))).status_code == 200
    await eventually(lambda: len(upstream.access_lines()) == 1)
    assert f"http://127.0.0.1:{origin.port}/after-reload" in upstream.access_lines()[0]

    # The tunnel from before the reload: still open, still direct (nothing new upstream).
    status, _ = await tunnel.get("/tunnel-after", "origin")
    assert status == 200
    assert [seen.target for seen in origin.requests] == [
        b"/tunnel-before",
        b"/direct",
        b"/after-reload",
        b"/tunnel-after",
    ]
    assert len(upstream.access_lines()) == 1
    await tunnel.stream.aclose()

    metrics = await proxy.metrics()
    assert "proxyd_config_generation 2.0" in metrics
    assert 'proxyd_config_reloads_total{outcome="ok"} 1.0' in metrics
    assert 'proxyd_config_reloads_total{outcome="error"} 0.0' in metrics


PAC = 'function FindProxyForURL(url, host) {{ return "{}"; }}\n'


async def test_a_new_pac_source_applies_and_one_that_cannot_load_is_refused(
    start_from_file: StartFromFile,
    start_proxy: StartProxy,
    origin: Origin,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """routing.pac.url changed: the new script is loaded before the switch, and decides the
    next request. A source that does not compile refuses the reload (file:line of the key) and
    the script in force stays. The same URL with edited content is fetched again on reload."""
    upstream = await start_proxy(upstream_config())
    direct_pac = tmp_path / "direct.pac"
    direct_pac.write_text(PAC.format("DIRECT"))
    upstream_pac = tmp_path / "upstream.pac"
    upstream_pac.write_text(PAC.format(f"PROXY 127.0.0.1:{upstream.port}"))
    broken_pac = tmp_path / "broken.pac"
    broken_pac.write_text("function FindProxyForURL(url, host) {\n  return 'a' +* 2;\n}\n")

    def pac_config(path: Path) -> str:
        return config_text("routing:\n", "  pac:\n", f'    url: "{path}"\n')

    proxy = await start_from_file(pac_config(direct_pac))
    async with httpx.AsyncClient(proxy=proxy.url, trust_env=False) as client:
        assert (await client.get(origin.url("/one"))).status_code == 200
        assert upstream.access_lines() == []

        proxy.write(pac_config(upstream_pac))
        response = await proxy.reload()
        assert response.status_code == 200, response.text
        assert response.json()["changed"] == ["routing.pac.url"]
        assert (await client.get(origin.url("/two"))).status_code == 200
        await eventually(lambda: len(upstream.access_lines()) == 1)

        proxy.write(pac_config(broken_pac))
        caplog.clear()
        refused = await proxy.reload()
        assert refused.status_code == 400
        body = refused.json()
        assert body["outcome"] == "error" and body["generation"] == 2
        [error] = body["errors"]
        assert error.startswith("proxyd.yaml:6: routing.pac.url: cannot load the PAC script: ")
        assert "SyntaxError" in error
        assert reload_errors(caplog) == [error]
        assert (await client.get(origin.url("/three"))).status_code == 200
        await eventually(lambda: len(upstream.access_lines()) == 2)  # the old script decided
        assert proxy.server.router.stats().pac_source == str(upstream_pac)

        # Same URL, new content: the reload fetches it again.
        proxy.write(pac_config(upstream_pac))
        upstream_pac.write_text(PAC.format("DIRECT"))
        response = await proxy.reload()
        assert response.status_code == 200
        assert response.json() == {
            "outcome": "ok",
            "generation": 3,
            "changed": [],
            "restart_needed": [],
        }
        assert (await client.get(origin.url("/four"))).status_code == 200
    assert len(upstream.access_lines()) == 2
    assert sample(proxy, "proxyd_config_reloads_total", outcome="error") == 1


# --- access: ACL and users -----------------------------------------------------------------------


async def test_acl_and_users_apply_to_new_requests_without_dropping_connections(
    start_from_file: StartFromFile, origin: Origin
) -> None:
    """acl.allow_clients narrowed: new connections are refused, one accepted before keeps its
    verdict and is served. auth.users added: every new request must authenticate."""
    proxy = await start_from_file(config_text())
    held = RawHttp(await trio.open_tcp_stream("127.0.0.1", proxy.port))
    assert (await held.get(origin.url("/held-1"), "origin"))[0] == 200

    proxy.write(config_text('acl: {allow_clients: ["10.0.0.0/8"]}\n'))
    response = await proxy.reload()
    assert response.json()["changed"] == ["acl.allow_clients"]
    async with httpx.AsyncClient(proxy=proxy.url, trust_env=False) as client:
        assert (await client.get(origin.url("/new"))).status_code == 403
    assert (await held.get(origin.url("/held-2"), "origin"))[0] == 200

    stored = hash_password("s3cret-pw", scheme="pbkdf2_sha256")
    proxy.write(config_text(f'auth:\n  users: {{alice: "{stored}"}}\n'))
    response = await proxy.reload()
    assert response.status_code == 200
    assert response.json()["changed"] == ["acl.allow_clients", "auth.users"]
    async with httpx.AsyncClient(proxy=proxy.url, trust_env=False) as client:
        assert (await client.get(origin.url("/anonymous"))).status_code == 407
    good = proxy.url.replace("http://", "http://alice:s3cret-pw@")
    async with httpx.AsyncClient(proxy=good, trust_env=False) as client:
        assert (await client.get(origin.url("/alice"))).status_code == 200
    assert (await held.get(origin.url("/held-3"), "origin"))[0] == 407
    await held.stream.aclose()
    assert [seen.target.rsplit(b"/", 1)[1] for seen in origin.requests] == [
        b"held-1",
        b"held-2",
        b"alice",
    ]


# --- limits ----------------------------------------------------------------------------------


async def test_a_lowered_head_limit_applies_to_the_next_request_of_an_open_connection(
    start_from_file: StartFromFile, origin: Origin
) -> None:
    """client.max_head_size lowered: the next request on a keep-alive connection opened before
    (a plain GET, which the fast parser takes) is held to the new limit (431), not the old."""
    proxy = await start_from_file(config_text())
    held = RawHttp(await trio.open_tcp_stream("127.0.0.1", proxy.port))
    long_path = "/held-" + "x" * 1500  # a head of ~1.6 KiB: under 64 KiB, over 1 KiB
    assert (await held.get(origin.url(long_path), "origin"))[0] == 200

    proxy.write(config_text("client: {max_head_size: 1024}\n"))
    response = await proxy.reload()
    assert response.json()["changed"] == ["client.max_head_size"]
    assert (await held.get(origin.url(long_path + "-2"), "origin"))[0] == 431
    await held.stream.aclose()
    assert len(origin.requests) == 1  # the refused request never reached the origin


async def test_a_raised_pool_limit_lets_a_waiting_request_connect(
    start_from_file: StartFromFile, origin: Origin
) -> None:
    """pool.per_group 1 -> 2: the request queued behind the limit gets its own connection at
    once; the one holding the first connection is not disturbed."""
    release = trio.Event()
    arrived = 0

    async def hold(exchange: Exchange) -> None:
        nonlocal arrived
        arrived += 1
        await release.wait()
        await exchange.respond(200, b"held")

    origin.route("/hold", hold)
    proxy = await start_from_file(config_text("pool: {per_group: 1}\n"))
    results: list[int] = []

    async def fetch() -> None:
        async with httpx.AsyncClient(proxy=proxy.url, trust_env=False, timeout=10) as client:
            results.append((await client.get(origin.url("/hold"))).status_code)

    def waiting() -> int:
        return sum(group.waiting for group in proxy.server.pool.stats().groups)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch)
            nursery.start_soon(fetch)
            await eventually(lambda: arrived == 1 and waiting() == 1)
            proxy.write(config_text("pool: {per_group: 2}\n"))
            response = await proxy.reload()
            assert response.json()["changed"] == ["pool.per_group"]
            await eventually(lambda: arrived == 2)
            assert waiting() == 0
            release.set()
    assert results == [200, 200]
    assert origin.connections == 2


def test_pool_state_set_limits_starts_starved_connects_and_closes_nothing() -> None:
    """Pure: raising per_group starts the queued waiter's connect; lowering closes nothing."""
    state = PoolState(Limits(per_group=1))
    first = state.request("g", None, 1, 0.0)
    assert first.connects == ["g"]
    assert state.request("g", None, 2, 0.0).connects == []  # waits: the group is full
    raised = state.set_limits(Limits(per_group=2), 1.0)
    assert raised.connects == ["g"] and not raised.close
    lowered = state.set_limits(Limits(per_group=1, total=1), 2.0)
    assert not lowered  # two sockets connecting above the new limits: left alone
    assert state.total == 2


# --- settings that need a restart; DNS and Via ---------------------------------------------------


async def test_restart_only_settings_are_reported_and_the_rest_applies(
    start_from_file: StartFromFile,
    origin: Origin,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """listen, admin.listen and cache.dir changed: logged as needing a restart, old values kept
    (still served on the old port, nothing on the new one); dns.hosts, the Via name and the
    WebSocket settings in the same file apply to what comes next."""
    caplog.set_level(logging.INFO, logger="proxyd.server")
    proxy = await start_from_file(config_text())
    async with httpx.AsyncClient(proxy=proxy.url, trust_env=False) as client:
        unknown = await client.get(f"http://app.internal:{origin.port}/")
    assert unknown.status_code == 502  # the name does not resolve (yet)

    new_port, new_admin = free_port(), free_port()
    proxy.write(
        f'listen: ["127.0.0.1:{new_port}"]\n'
        f'admin: {{listen: "127.0.0.1:{new_admin}"}}\n'
        'via: {pseudonym: "proxyd-renamed"}\n'
        'dns: {hosts: {app.internal: "127.0.0.1"}}\n'
        f'cache: {{dir: "{tmp_path / "elsewhere"}"}}\n'
        "websocket: {ping_interval: 25}\n"
    )
    response = await proxy.reload()
    assert response.status_code == 200
    assert response.json() == {
        "outcome": "ok",
        "generation": 2,
        "changed": ["dns.hosts", "via.pseudonym", "websocket.ping_interval"],
        "restart_needed": ["listen", "admin.listen", "cache.dir"],
    }
    messages = [record.getMessage() for record in caplog.records]
    for key in ("listen", "admin.listen", "cache.dir"):
        expected = (
            f"reload: {key} changed: needs a restart (the old value stays in force until then)"
        )
        assert expected in messages
    assert proxy.server.config.listen[0].port == 0  # the configured value stays the old one
    assert not (tmp_path / "elsewhere").exists()
    services = proxy.server.services
    assert services is not None  # the next WebSocket session gets the new keepalive
    assert services.websocket_context().config.ping_interval == 25

    async with httpx.AsyncClient(proxy=proxy.url, trust_env=False) as client:
        resolved = await client.get(f"http://app.internal:{origin.port}/")
    assert resolved.status_code == 200
    assert (b"via", b"1.1 proxyd-renamed") in [
        (name.lower(), value) for name, value in origin.requests[-1].headers
    ]
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", new_port)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_plan_reload_keeps_restart_only_values_and_names_changed_keys() -> None:
    """Pure: the applied config keeps listen/admin.listen/cache.enabled/cache.dir/workers; changed
    settings are dotted paths in declaration order, a mapping is one setting (no user names)."""
    old = parse_config_text(config_text(), "a.yaml")
    new = parse_config_text(
        'listen: ["127.0.0.1:8080"]\n'
        "cache: {enabled: true, dir: /x, max_size: 1000}\n"
        'auth: {users: {bob: "' + hash_password("pw", scheme="pbkdf2_sha256") + '"}}\n'
        "websocket: {ping_interval: 20}\n"
        "workers: 2\n",
        "b.yaml",
    )
    plan = plan_reload(old, new)
    assert [item.key for item in plan.restart_needed] == [
        "listen",
        "admin.listen",
        "cache.enabled",
        "cache.dir",
        "workers",
    ]
    assert plan.config.workers == 1
    assert plan.config.listen == old.listen and plan.config.admin.listen == old.admin.listen
    assert (plan.config.cache.enabled, plan.config.cache.dir) == (False, old.cache.dir)
    assert plan.config.cache.max_size == 1000
    assert plan.changed == (
        "cache.max_size",
        "auth.users",
        "via.pseudonym",
        "websocket.ping_interval",
    )


# --- refused configs ---------------------------------------------------------------------------

BAD = config_text(
    "pool:\n",  # 4
    "  per_group: 0\n",  # 5
    "routing:\n",  # 6
    '  default: ["PROXY"]\n',  # 7
    "log_level: loud\n",  # 8
)


async def test_an_invalid_file_is_refused_with_every_error_and_the_old_config_stays(
    start_from_file: StartFromFile, origin: Origin, caplog: pytest.LogCaptureFixture
) -> None:
    """Every error as FILE:LINE: key.path: message, in the log and in the 400 answer; the
    daemon keeps its generation and behaviour; a fixed file then applies."""
    proxy = await start_from_file(config_text("pool: {per_group: 3}\n"))
    proxy.write(BAD)
    response = await proxy.reload()
    assert response.status_code == 400
    body = response.json()
    assert body["outcome"] == "error" and body["generation"] == 1
    errors = body["errors"]
    assert [error.split(": ", 2)[:2] for error in errors] == [
        ["proxyd.yaml:5", "pool.per_group"],
        ["proxyd.yaml:7", "routing.default"],
        ["proxyd.yaml:8", "log_level"],
    ]
    assert errors[0] == "proxyd.yaml:5: pool.per_group: must be > 0"
    assert reload_errors(caplog) == errors
    assert any("reload refused: 3 error(s)" in r.getMessage() for r in caplog.records)
    assert proxy.server.config_generation == 1
    assert proxy.server.pool.config.per_group == 3
    async with httpx.AsyncClient(proxy=proxy.url, trust_env=False) as client:
        assert (await client.get(origin.url("/still-served"))).status_code == 200
    assert sample(proxy, "proxyd_config_reloads_total", outcome="error") == 1
    assert sample(proxy, "proxyd_config_reloads_total", outcome="ok") == 0
    assert sample(proxy, "proxyd_config_generation") == 1

    # An unreadable file is refused the same way.
    proxy.path.unlink()
    missing = await proxy.reload()
    assert missing.status_code == 400
    assert "cannot read the config file" in missing.json()["errors"][0]

    proxy.write(config_text("pool: {per_group: 4}\n"))
    fixed = await proxy.reload()
    assert fixed.status_code == 200 and fixed.json()["generation"] == 2
    assert proxy.server.pool.config.per_group == 4
    assert sample(proxy, "proxyd_config_generation") == 2
    assert sample(proxy, "proxyd_config_reloads_total", outcome="error") == 2

    async with httpx.AsyncClient(trust_env=False) as admin:
        assert (await admin.get(proxy.admin_url + "/reload")).status_code == 405


async def test_no_reload_while_draining(start_from_file: StartFromFile) -> None:
    """A reload asked for during a drain is refused (409 on the admin listener); nothing
    changes, and it is counted as an error."""
    proxy = await start_from_file(config_text("pool: {per_group: 3}\n"))
    proxy.write(config_text("pool: {per_group: 5}\n"))
    proxy.server.drain()
    result = await proxy.server.reload()
    assert (result.outcome, result.http_status, result.generation) == ("refused", 409, 1)
    assert result.errors == ("the server is draining",)
    assert proxy.server.pool.config.per_group == 3
    assert sample(proxy, "proxyd_config_reloads_total", outcome="error") == 1


# --- cache size and the access log -------------------------------------------------------------


async def test_cache_size_and_access_log_follow_a_reload(
    start_from_file: StartFromFile, origin: Origin, tmp_path: Path
) -> None:
    """cache.max_size lowered: the store evicts down to it at once. access_log.format changed
    after the log file was rotated away: the reload reopens the path and writes JSON there."""
    body = b"x" * 4000

    async def cacheable(exchange: Exchange) -> None:
        await exchange.respond(200, body, [(b"Cache-Control", b"max-age=600")])

    origin.route("/c1", cacheable)
    origin.route("/c2", cacheable)
    log_path = tmp_path / "access.log"
    settings = (
        f'cache: {{enabled: true, dir: "{tmp_path / "cache"}"}}\n',
        f'access_log: {{path: "{log_path}"}}\n',
    )
    proxy = await start_from_file(config_text(*settings), capture_access_log=False)
    cache = proxy.server.cache
    assert cache is not None
    async with httpx.AsyncClient(proxy=proxy.url, trust_env=False) as client:
        for path in ("/c1", "/c2"):
            assert (await client.get(origin.url(path))).content == body
        await eventually(lambda: cache.store.stats().entries == 2)
        await eventually(lambda: "/c2" in log_path.read_text())
        rotated = tmp_path / "access.log.1"
        log_path.rename(rotated)

        proxy.write(
            config_text(
                f'cache: {{enabled: true, dir: "{tmp_path / "cache"}", max_size: 6000}}\n',
                f'access_log: {{path: "{log_path}", format: json}}\n',
            )
        )
        response = await proxy.reload()
        assert response.json()["changed"] == ["cache.max_size", "access_log.format"]
        assert cache.store.stats().entries == 1  # evicted during the reload
        assert cache.store.stats().bytes <= 6000

        assert (await client.get(origin.url("/after"))).status_code == 200
    await eventually(lambda: log_path.exists() and "/after" in log_path.read_text())
    assert log_path.read_text().startswith('{"time":')
    assert "/after" not in rotated.read_text() and "/c2" in rotated.read_text()


# --- a real process, a real SIGHUP ---------------------------------------------------------------


async def test_sighup_reloads_a_running_daemon(
    tmp_path: Path, start_proxy: StartProxy, origin: Origin
) -> None:
    """``python -m proxyd --config FILE --log-level info``; SIGHUP after editing the file: the
    next request follows the new rule, a tunnel opened before keeps working, and the command-line
    override still wins over the file (the file's log_level: warning would hide the INFO line).
    A broken file then is refused (errors on stderr, metrics count it) and SIGTERM exits 0."""
    upstream = await start_proxy(upstream_config())
    port, admin_port = free_port(), free_port()
    head = (
        f'listen: ["127.0.0.1:{port}"]\n'
        f'admin: {{listen: "127.0.0.1:{admin_port}"}}\n'
        'via: {pseudonym: "proxyd-sighup"}\n'
        f"connect: {{allowed_ports: [{origin.port}]}}\n"
    )
    config = tmp_path / "proxyd.yaml"
    config.write_text(head)
    stderr_path = tmp_path / "stderr.log"
    argv = [sys.executable, "-m", "proxyd", "--config", str(config), "--log-level", "info"]
    with stderr_path.open("wb") as err:
        process = await trio.lowlevel.open_process(argv, stdout=err, stderr=err, cwd=str(REPO))
    try:

        def stderr() -> str:
            return stderr_path.read_text("utf-8", errors="replace")

        await eventually(lambda: "proxyd listening" in stderr(), timeout=15)
        proxy_url = f"http://127.0.0.1:{port}"
        tunnel = await open_tunnel(port, origin)
        assert (await tunnel.get("/tunnel-before", "origin"))[0] == 200

        config.write_text(
            head
            + "log_level: warning\n"
            + f'routing: {{default: ["PROXY 127.0.0.1:{upstream.port}"]}}\n'
        )
        process.send_signal(signal.SIGHUP)
        await eventually(lambda: "config reloaded" in stderr(), timeout=10)
        assert "generation 2; changed: routing.default" in stderr()
        async with httpx.AsyncClient(proxy=proxy_url, trust_env=False) as client:
            assert (await client.get(origin.url("/after-sighup"))).status_code == 200
        await eventually(lambda: len(upstream.access_lines()) == 1)
        assert (await tunnel.get("/tunnel-after", "origin"))[0] == 200
        assert len(upstream.access_lines()) == 1  # the old tunnel stayed direct
        await tunnel.stream.aclose()

        config.write_text(head + "pool: {per_group: 0}\n")
        process.send_signal(signal.SIGHUP)
        await eventually(lambda: "reload refused" in stderr(), timeout=10)
        assert "reload: proxyd.yaml:5: pool.per_group: must be > 0" in stderr()
        async with httpx.AsyncClient(trust_env=False) as admin:
            metrics = (await admin.get(f"http://127.0.0.1:{admin_port}/metrics")).text
        assert "proxyd_config_generation 2.0" in metrics
        assert 'proxyd_config_reloads_total{outcome="ok"} 1.0' in metrics
        assert 'proxyd_config_reloads_total{outcome="error"} 1.0' in metrics
        async with httpx.AsyncClient(proxy=proxy_url, trust_env=False) as client:
            assert (await client.get(origin.url("/still-upstream"))).status_code == 200
        await eventually(lambda: len(upstream.access_lines()) == 2)

        process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await process.wait() == 0
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await process.wait()


# --- the router on its own: a decision in flight during a reload -------------------------------


async def test_a_pac_decision_in_flight_finishes_on_the_script_it_started_with(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """reconfigure() to another PAC source while an evaluation waits for its DNS answer: the
    replaced engine is retired, not closed, so that decision ends with the old script's answer
    (not the fallback); the next one uses the new script."""
    lookup_started, answer = trio.Event(), trio.Event()

    async def slow_resolve(host: str) -> list[str]:
        lookup_started.set()
        await answer.wait()
        return ["127.0.0.1"]

    old = tmp_path / "old.pac"
    old.write_text(
        "function FindProxyForURL(url, host) {\n"
        '  return dnsResolve(host) ? "PROXY corp:3128" : "DIRECT";\n'
        "}\n"
    )
    new = tmp_path / "new.pac"
    new.write_text(PAC.format("PROXY backup:3128"))
    router = Router(RoutingConfig.model_validate({"pac": {"url": str(old)}}), resolve=slow_resolve)
    with trio.fail_after(10):
        await nursery.start(router.run)
        decided: list[RouteList] = []

        async def decide() -> None:
            decided.append(await router.decide("http", "app.example", 80, "http://app.example/"))

        async with trio.open_nursery() as inner:
            inner.start_soon(decide)
            await lookup_started.wait()
            await router.reconfigure(RoutingConfig.model_validate({"pac": {"url": str(new)}}))
            answer.set()
        assert [route.label for route in decided[0]] == ["http://corp:3128"]
        after = await router.decide("http", "app.example", 80, "http://app.example/")
        assert [route.label for route in after] == ["http://backup:3128"]

"""The Router, end to end: static and PAC modes, loading over HTTP, refresh, cache, fallback.

Real trio, real sockets on 127.0.0.1 (the PAC file is served by ``tests/origin.py``'s trio + h11
origin), real QuickJS; DNS only through injected resolvers. Every wait is bounded.

Behaviour checked, with its source:

* a PAC file that changes between refreshes is picked up; a refresh that fails (HTTP 500, a syntax
  error) keeps the last good script (Chromium's PacFileDecider / PollingProxyConfigService keep
  the old script when a re-fetch fails); the same text again counts ``unchanged``;
* a parse error at start-up raises ``PacLoadError`` with the line, before ``started()``;
* results are cached for a script without date/time helpers and evaluated every time for one
  that uses ``timeRange`` (its answer depends on the clock);
* a failed evaluation follows ``pac.fallback`` (DIRECT, or a 502 ``proxy_configuration_error``);
* for https URLs the script sees only ``https://host/`` (Chromium strips path and query);
* proxies reported as failed move to the end of later route lists (Chromium's bad-proxy list).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
import trio

from proxyd.config import RoutingConfig
from proxyd.observe.metrics import Metrics
from proxyd.routing.errors import PacFailed, PacLoadError
from proxyd.routing.pac.script import version_of
from proxyd.routing.router import Router
from proxyd.upstream.route import DIRECT, ProxyServer, RouteList, ViaProxy
from tests.conftest import eventually
from tests.origin import Exchange, Origin

CORP = ViaProxy(ProxyServer("http", "corp", 3128))
BACKUP = ViaProxy(ProxyServer("http", "backup", 3128))

STATIC_PAC = """
function FindProxyForURL(url, host) {
    if (isPlainHostName(host) || dnsDomainIs(host, ".internal.example")) return "DIRECT";
    if (shExpMatch(host, "*.backup.example")) return "PROXY backup:3128";
    return "PROXY corp:3128; DIRECT";
}
"""

TIMED_PAC = """
function FindProxyForURL(url, host) {
    if (timeRange(9, 17)) return "PROXY corp:3128";
    return "DIRECT";
}
"""


async def no_dns(host: str) -> list[str]:
    raise OSError(f"{host}: no DNS in this test")


def routing(**data: Any) -> RoutingConfig:
    return RoutingConfig.model_validate(data)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def decide(router: Router, scheme: str, host: str, port: int, url: str) -> RouteList:
    with trio.fail_after(5):
        return await router.decide(scheme, host, port, url)


async def start(nursery: trio.Nursery, router: Router) -> Router:
    with trio.fail_after(10):
        await nursery.start(router.run)
    return router


def write_pac(tmp_path: Path, text: str) -> str:
    path = tmp_path / "proxy.pac"
    path.write_text(text)
    return str(path)


# --- static mode ------------------------------------------------------------------------------


async def test_static_mode_decides_and_counts(nursery: trio.Nursery) -> None:
    """Static rules, counted as routing_decisions{source="static"}; bad proxies move last."""
    metrics = Metrics()
    config = routing(default=["PROXY corp:3128", "PROXY backup:3128", "DIRECT"], bypass=["<local>"])
    router = await start(nursery, Router(config, resolve=no_dns, metrics=metrics))
    assert await decide(router, "http", "intranet", 80, "http://intranet/") == (DIRECT,)
    assert await decide(router, "https", "a.example", 443, "") == (CORP, BACKUP, DIRECT)
    router.report_failure(CORP)
    router.report_failure(DIRECT)  # counted as a failover, never marked bad
    assert await decide(router, "https", "a.example", 443, "") == (BACKUP, DIRECT, CORP)
    assert (
        sample(metrics, "proxyd_routing_decisions_total", route_kind="http", source="static") == 2
    )
    assert sample(metrics, "proxyd_failovers_total", route_kind="http") == 1
    assert sample(metrics, "proxyd_failovers_total", route_kind="direct") == 1
    stats = router.stats()
    assert stats.mode == "static" and stats.pac_version is None
    assert [label for label, _ in stats.bad_proxies] == [CORP.label]


# --- PAC from a file: caching, fallback, URL stripping ----------------------------------------


async def test_pac_results_are_cached_for_a_static_script(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Without date/time helpers the answer depends on the host only: the second one is cached."""
    metrics = Metrics()
    config = routing(pac={"url": write_pac(tmp_path, STATIC_PAC)})
    router = await start(nursery, Router(config, resolve=no_dns, metrics=metrics))
    for _ in range(3):
        routes = await decide(router, "http", "www.example.org", 80, "http://www.example.org/a")
        assert routes == (CORP, DIRECT)
    assert await decide(router, "http", "x.backup.example", 80, "http://x.backup.example/") == (
        BACKUP,
    )
    assert await decide(router, "http", "intranet", 80, "http://intranet/") == (DIRECT,)
    assert sample(metrics, "proxyd_pac_evaluations_total", outcome="ok") == 3
    assert sample(metrics, "proxyd_pac_evaluations_total", outcome="cached") == 2
    assert sample(metrics, "proxyd_pac_evaluation_seconds_count") == 3
    assert sample(metrics, "proxyd_routing_decisions_total", route_kind="http", source="pac") == 4
    assert sample(metrics, "proxyd_pac_loads_total", outcome="ok") == 1
    stats = router.stats()
    assert stats.mode == "pac" and stats.pac_cacheable and stats.cache_entries == 3
    assert stats.pac_version == version_of(STATIC_PAC)
    assert stats.pac_entry == "FindProxyForURL"


async def test_time_dependent_script_is_evaluated_every_time(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """timeRange makes the answer depend on the clock: no caching, and the injected time rules."""
    metrics = Metrics()
    clock = {"now": dt.datetime(2024, 3, 13, 10, 0, tzinfo=dt.UTC).timestamp()}
    router = Router(
        routing(pac={"url": write_pac(tmp_path, TIMED_PAC)}),
        resolve=no_dns,
        metrics=metrics,
        wall_clock=lambda: clock["now"],
        timezone=dt.UTC,
    )
    await start(nursery, router)
    assert await decide(router, "http", "a.example", 80, "http://a.example/") == (CORP,)
    clock["now"] += 9 * 3600  # 19:00
    assert await decide(router, "http", "a.example", 80, "http://a.example/") == (DIRECT,)
    assert sample(metrics, "proxyd_pac_evaluations_total", outcome="ok") == 2
    assert sample(metrics, "proxyd_pac_evaluations_total", outcome="cached") == 0
    assert not router.stats().pac_cacheable and router.stats().cache_entries == 0


async def test_script_sees_https_urls_cut_to_the_origin(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Chromium strips the path and query of https:// URLs before FindProxyForURL sees them."""
    script = 'function FindProxyForURL(url, host) { return "PROXY " + encodeURIComponent(url); }'
    router = await start(
        nursery, Router(routing(pac={"url": write_pac(tmp_path, script)}), resolve=no_dns)
    )
    routes = await decide(router, "https", "Secure.Example", 443, "https://secure.example/p?q")
    assert routes[0].label == "http://https%3a%2f%2fsecure.example%2f:80"
    routes = await decide(router, "https", "secure.example", 8443, "")
    assert routes[0].label == "http://https%3a%2f%2fsecure.example%3a8443%2f:80"
    routes = await decide(router, "http", "plain.example", 80, "http://plain.example/p?q")
    assert routes[0].label == "http://http%3a%2f%2fplain.example%2fp%3fq:80"


RUNAWAY_PAC = """
function FindProxyForURL(url, host) {
    if (host === "spin.example") { while (true) {} }
    if (host === "bomb.example") { var a = []; while (true) { a.push(new Array(1e5).fill(1)); } }
    if (host === "garbage.example") { return "NONSENSE; PROXY"; }
    if (host === "mixed.example") { return "BOGUS x; PROXY corp:3128"; }
    return "PROXY corp:3128";
}
"""


async def test_runaway_and_memory_bomb_follow_fallback_direct(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The limits stop the script; the request goes DIRECT (pac.fallback) and it is counted."""
    metrics = Metrics()
    config = routing(
        pac={"url": write_pac(tmp_path, RUNAWAY_PAC), "timeout": 0.2, "memory_limit": 8 << 20}
    )
    router = await start(nursery, Router(config, resolve=no_dns, metrics=metrics))
    with trio.fail_after(5):
        assert await decide(router, "http", "spin.example", 80, "http://spin.example/") == (DIRECT,)
        assert await decide(router, "http", "bomb.example", 80, "http://bomb.example/") == (DIRECT,)
        assert await decide(router, "http", "garbage.example", 80, "") == (DIRECT,)
        assert await decide(router, "http", "mixed.example", 80, "") == (CORP,)  # bad entry skipped
        assert await decide(router, "http", "fine.example", 80, "") == (CORP,)
    assert sample(metrics, "proxyd_pac_evaluations_total", outcome="timeout") == 1
    assert sample(metrics, "proxyd_pac_evaluations_total", outcome="error") == 2
    assert (
        sample(metrics, "proxyd_routing_decisions_total", route_kind="direct", source="fallback")
        == 3
    )


async def test_fallback_error_raises_pac_failed(nursery: trio.Nursery, tmp_path: Path) -> None:
    """pac.fallback: error -> PacFailed, a 502 with Proxy-Status proxy_configuration_error."""
    config = routing(
        pac={"url": write_pac(tmp_path, RUNAWAY_PAC), "timeout": 0.2, "fallback": "error"}
    )
    router = await start(nursery, Router(config, resolve=no_dns))
    with trio.fail_after(5), pytest.raises(PacFailed) as caught:
        await decide(router, "http", "spin.example", 80, "http://spin.example/")
    assert caught.value.status == 502
    assert caught.value.error_type == "proxy_configuration_error"
    assert "time limit" in caught.value.detail


async def test_bypass_applies_before_pac(nursery: trio.Nursery, tmp_path: Path) -> None:
    config = routing(pac={"url": write_pac(tmp_path, STATIC_PAC)}, bypass=["*.example.org"])
    router = await start(nursery, Router(config, resolve=no_dns))
    assert await decide(router, "http", "www.example.org", 80, "") == (DIRECT,)
    assert await decide(router, "http", "www.example.com", 80, "") == (CORP, DIRECT)


async def test_dns_hosts_answers_reach_the_script(nursery: trio.Nursery, tmp_path: Path) -> None:
    """dnsResolve sees names that only proxyd's resolver knows (dns.hosts overrides)."""
    script = """
    function FindProxyForURL(url, host) {
        return isInNet(dnsResolve(host), "10.0.0.0", "255.0.0.0") ? "DIRECT" : "PROXY corp:3128";
    }
    """
    lookups: list[str] = []

    async def hosts_file(host: str) -> list[str]:
        lookups.append(host)
        if host == "build.corp":
            return ["10.1.2.3"]
        raise OSError("unknown")

    router = await start(
        nursery,
        Router(routing(pac={"url": write_pac(tmp_path, script)}), resolve=hosts_file),
    )
    assert await decide(router, "http", "build.corp", 80, "http://build.corp/") == (DIRECT,)
    assert await decide(router, "http", "other.corp", 80, "http://other.corp/") == (CORP,)
    assert await decide(router, "http", "build.corp", 80, "http://build.corp/") == (DIRECT,)
    assert lookups == ["build.corp", "other.corp"]  # the third answer came from the cache


async def test_parse_error_at_start_raises_with_the_line(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A broken script at start-up is a PacLoadError (the daemon refuses to start), with line."""
    broken = "function FindProxyForURL(url, host) {\n    return 'DIRECT'\n    if (\n}\n"
    metrics = Metrics()
    router = Router(
        routing(pac={"url": write_pac(tmp_path, broken)}), resolve=no_dns, metrics=metrics
    )
    with trio.fail_after(10), pytest.raises(PacLoadError) as caught:
        await nursery.start(router.run)
    assert caught.value.line == 4
    assert "line 4" in caught.value.message and "SyntaxError" in caught.value.message
    assert sample(metrics, "proxyd_pac_loads_total", outcome="error") == 1


async def test_missing_file_at_start_raises(nursery: trio.Nursery, tmp_path: Path) -> None:
    router = Router(routing(pac={"url": str(tmp_path / "absent.pac")}), resolve=no_dns)
    with trio.fail_after(10), pytest.raises(PacLoadError, match="cannot read"):
        await nursery.start(router.run)


# --- PAC over HTTP: refresh --------------------------------------------------------------------


class PacServer:
    """Serves /proxy.pac from the test origin; the test changes ``status`` and ``body``."""

    def __init__(self, origin: Origin, body: str) -> None:
        self.status = 200
        self.body = body
        self.fetches = 0
        origin.route("/proxy.pac", self.handle)
        origin.route("/old.pac", self.redirect)
        self.url = origin.url("/proxy.pac")

    async def handle(self, exchange: Exchange) -> None:
        self.fetches += 1
        await exchange.respond(
            self.status,
            self.body.encode(),
            [(b"Content-Type", b"application/x-ns-proxy-autoconfig; charset=utf-8")],
        )

    async def redirect(self, exchange: Exchange) -> None:
        await exchange.respond(302, b"", [(b"Location", b"/proxy.pac")])


def pac_returning(route: str) -> str:
    return f'function FindProxyForURL(url, host) {{ return "{route}"; }}'


async def test_refresh_picks_up_changes_and_survives_failures(
    nursery: trio.Nursery, origin: Origin
) -> None:
    """A changed script replaces the old one; a 500 or a syntax error keeps the last good one."""
    server = PacServer(origin, pac_returning("PROXY corp:3128"))
    metrics = Metrics()
    router = Router(
        routing(pac={"url": origin.url("/old.pac"), "refresh": 0.1}),  # redirected to /proxy.pac
        resolve=no_dns,
        metrics=metrics,
    )
    await start(nursery, router)
    assert await decide(router, "http", "a.example", 80, "") == (CORP,)
    first = router.stats().pac_version

    # Unchanged text: counted, nothing replaced.
    await eventually(lambda: sample(metrics, "proxyd_pac_loads_total", outcome="unchanged") >= 1)
    assert router.stats().pac_version == first

    # A new script: picked up, the cache is emptied.
    server.body = pac_returning("PROXY backup:3128")
    await eventually(lambda: router.stats().pac_version == version_of(server.body))
    assert await decide(router, "http", "a.example", 80, "") == (BACKUP,)
    good = router.stats().pac_version

    # HTTP 500: logged, counted, last good script kept.
    server.status = 500
    errors = sample(metrics, "proxyd_pac_loads_total", outcome="error")
    await eventually(lambda: sample(metrics, "proxyd_pac_loads_total", outcome="error") > errors)
    stats = router.stats()
    assert stats.pac_version == good and stats.pac_last_error is not None
    assert "HTTP status 500" in stats.pac_last_error
    assert await decide(router, "http", "b.example", 80, "") == (BACKUP,)

    # A syntax error: same, and the error names the line.
    server.status = 200
    server.body = "function FindProxyForURL(url, host) {\n  return 'a' +* 2;\n}"
    await eventually(lambda: "SyntaxError" in (router.stats().pac_last_error or ""))
    assert "line 2" in (router.stats().pac_last_error or "")
    assert router.stats().pac_version == good
    assert await decide(router, "http", "c.example", 80, "") == (BACKUP,)

    # Fixed again: the error clears.
    server.body = pac_returning("DIRECT")
    await eventually(lambda: router.stats().pac_version == version_of(server.body))
    assert router.stats().pac_last_error is None
    assert await decide(router, "http", "a.example", 80, "") == (DIRECT,)


async def test_http_load_failure_at_start_raises(nursery: trio.Nursery, origin: Origin) -> None:
    server = PacServer(origin, "")
    server.status = 404
    router = Router(routing(pac={"url": server.url}), resolve=no_dns)
    with trio.fail_after(10), pytest.raises(PacLoadError, match="HTTP status 404"):
        await nursery.start(router.run)


async def test_pac_server_host_is_resolved_with_the_injected_resolver(
    nursery: trio.Nursery, origin: Origin
) -> None:
    """The PAC URL's host name goes through proxyd's resolver (dns.hosts), not the system's."""
    PacServer(origin, pac_returning("PROXY corp:3128"))
    asked: list[str] = []

    async def resolve(host: str) -> list[str]:
        asked.append(host)
        return ["127.0.0.1"]

    url = f"http://wpad.corp.test:{origin.port}/proxy.pac"
    router = await start(nursery, Router(routing(pac={"url": url}), resolve=resolve))
    assert await decide(router, "http", "a.example", 80, "") == (CORP,)
    assert asked == ["wpad.corp.test"]
    assert origin.requests[-1].headers[0] == (b"Host", f"wpad.corp.test:{origin.port}".encode())


def test_redact_hides_proxy_credentials_in_logged_pac_results() -> None:
    """A PAC result is logged when it is unusable; user:password@ never reaches the log."""
    from proxyd.routing.router import redact

    assert redact("PROXY a:1; socks5://bob:s3cret@b:1080; BOGUS") == (
        "PROXY a:1; socks5://***@b:1080; BOGUS"
    )

"""The live status page (/status) and its JSON twin (/status.json) on the admin listener.

The integration tests drive a real in-process daemon with real traffic on loopback — a pooled idle
connection, a proxy that fails and lands on the bad-proxy list, a cached response served twice, a
request that fails, an open CONNECT tunnel with bytes both ways, a WebSocket session — and then
read both endpoints: the JSON by value, the page through ``html.parser`` (table cells by section).
The XSS tests put markup in request targets and check that it comes back as text, never as tags.
The unit tests feed ``observe.status`` plain values: row caps with "+N more", escaping in every
table, query and credential stripping, the refresh parameter.
"""

from __future__ import annotations

import io
import json
import socket
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import trio

from proxyd.client import Services
from proxyd.config import load_config
from proxyd.observe import status
from proxyd.reload import ConfigSource
from proxyd.server import ProxyServer
from tests.conftest import BASE_CONFIG, RunningProxy, StartProxy, eventually
from tests.origin import Exchange, Origin
from tests.websocket.clients import WsprotoClient
from tests.websocket.ws_origin import WsOrigin

TIMEOUT = 5.0
SECTIONS = ("pools", "routes", "bad-proxies", "dns", "cache", "tunnels", "websockets", "errors")

# --- reading the page ------------------------------------------------------------------------


@dataclass
class Section:
    heading: str = ""
    text: str = ""
    rows: list[list[str]] = field(default_factory=list)


class StatusPage(HTMLParser):
    """Collects the title, headings, meta tags, every start tag, and per <section id> its text
    and table rows (cell text, entities decoded)."""

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.title = ""
        self.facts = ""
        self.tags: list[str] = []
        self.attributes: list[str] = []
        self.meta: list[dict[str, str | None]] = []
        self.sections: dict[str, Section] = {}
        self._open: list[str] = []
        self._section: Section | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self.feed(page)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes.extend(name for name, _ in attrs)
        if tag == "meta":
            self.meta.append(dict(attrs))
            return
        self._open.append(tag)
        if tag == "section":
            self._section = self.sections.setdefault(str(dict(attrs)["id"]), Section())
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if self._open and self._open[-1] == tag:
            self._open.pop()
        if tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        elif tag == "tr" and self._section is not None and self._row is not None:
            self._section.rows.append(self._row)
            self._row = None
        elif tag == "section":
            self._section = None

    def handle_data(self, data: str) -> None:
        if self._open and self._open[-1] == "title":
            self.title += data
        if "p" in self._open and self._section is None:
            self.facts += data
        if self._section is not None:
            self._section.text += data
            if self._open and self._open[-1] in ("h2", "h3"):
                self._section.heading += data
        if self._cell is not None:
            self._cell.append(data)

    def row_with(self, section: str, text: str) -> list[str]:
        for row in self.sections[section].rows:
            if any(text in cell for cell in row):
                return row
        raise AssertionError(f"no row with {text!r} in {section}: {self.sections[section].rows}")


async def read_status(proxy: RunningProxy, path: str = "/status") -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False) as client:
        with trio.fail_after(TIMEOUT):
            response = await client.get(proxy.admin_url + path)
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    return response


async def status_json(proxy: RunningProxy) -> dict[str, Any]:
    response = await read_status(proxy, "/status.json")
    assert response.headers["content-type"] == "application/json"
    data: dict[str, Any] = response.json()
    return data


async def status_page(proxy: RunningProxy, query: str = "") -> tuple[str, StatusPage]:
    response = await read_status(proxy, "/status" + query)
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    return response.text, StatusPage(response.text)


def services(proxy: RunningProxy) -> Services:
    assert proxy.server.services is not None
    return proxy.server.services


def free_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def raw_request(proxy: RunningProxy, head: bytes) -> bytes:
    """Send one request head as bytes (targets httpx would refuse), return the status line."""
    with trio.fail_after(TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        async with stream:
            await stream.send_all(head)
            data = b""
            while b"\r\n" not in data:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                data += chunk
    return data.split(b"\r\n", 1)[0]


async def open_tunnel(proxy: RunningProxy, port: int) -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    authority = b"127.0.0.1:%d" % port
    await stream.send_all(b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (authority, authority))
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive_some(65536)
    assert data.startswith(b"HTTP/1.1 200"), data
    return stream


async def cacheable(exchange: Exchange) -> None:
    await exchange.respond(
        200, b"cached body", [(b"Cache-Control", b"max-age=600"), (b"Content-Type", b"text/plain")]
    )


# --- a daemon with real traffic ----------------------------------------------------------------


async def test_status_shows_pools_routes_dns_cache_tunnels_and_errors(
    start_proxy: StartProxy, origin: Origin, tmp_path: Path
) -> None:
    dead = free_port()
    proxy = await start_proxy(
        **{
            "cache.enabled": True,
            "cache.dir": str(tmp_path / "cache"),
            "connect.allowed_ports": [origin.port],
            "routing.rules": [
                {"match": ["*.bad.test"], "route": [f"PROXY 127.0.0.1:{dead}", "DIRECT"]}
            ],
        }
    )
    origin.route("/cached", cacheable)
    async with httpx.AsyncClient(proxy=proxy.url, trust_env=False) as client:
        with trio.fail_after(TIMEOUT):
            # A pooled connection to the origin, left idle; the same URL twice: miss, then hit.
            assert (await client.get(origin.url("/cached"))).text == "cached body"
            second = await client.get(origin.url("/cached"))
            assert second.text == "cached body"
            assert "hit" in second.headers["cache-status"]
            # The rule's proxy refuses: it goes on the bad-proxy list, the request fails over.
            failover = await client.get(f"http://a.bad.test:{origin.port}/failover")
            assert failover.status_code == 200
            # A request that fails: the name does not resolve (the query must not be shown).
            failed = await client.get("http://unresolvable.test/missing?token=s3cret")
            assert failed.status_code == 502
    tunnel = await open_tunnel(proxy, origin.port)
    async with tunnel:
        tunnelled = b"GET /in-tunnel HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        with trio.fail_after(TIMEOUT):
            await tunnel.send_all(tunnelled)
            answer = b""
            while b"in-tunnel" not in answer:
                answer += await tunnel.receive_some(65536)
        await eventually(lambda: any(t.bytes_down for t in services(proxy).tunnels))

        data = await status_json(proxy)
        raw, page = await status_page(proxy)

    # Facts.
    assert data["version"] and data["config_generation"] == 1
    assert data["uptime_seconds"] >= 0 and data["draining"] is False
    # Pools: the origin's group with an idle socket.
    group = f"http://127.0.0.1:{origin.port} via DIRECT"
    groups = {row["group"]: row for row in data["pools"]["groups"]["rows"]}
    assert groups[group]["idle"] >= 1
    assert groups[group]["active"] == 0
    row = page.row_with("pools", group)
    assert row[1] == "direct" and int(row[3]) == groups[group]["idle"]
    # Routes: the rule with its route list; the refusing proxy on the bad-proxy list.
    label = f"http://127.0.0.1:{dead}"
    routes = data["routing"]["routes"]["rows"]
    assert {"match": "*.bad.test", "route": [label, "DIRECT"]} in routes
    assert page.row_with("routes", "*.bad.test")[1] == f"{label}; DIRECT"
    bad = data["routing"]["bad_proxies"]["rows"]
    assert [entry["proxy"] for entry in bad] == [label]
    assert 0 < bad[0]["seconds_left"] <= 300
    assert page.row_with("bad-proxies", label)
    # DNS: the failover's name is cached with its answer.
    names = {row["host"]: row for row in data["dns"]["names"]["rows"]}
    assert names["a.bad.test"]["addresses"] == ["127.0.0.1"]
    assert names["a.bad.test"]["seconds_left"] > 0
    assert page.row_with("dns", "a.bad.test")[1] == "127.0.0.1"
    assert data["dns"]["misses"] >= 1
    # Cache: the stored response, and a hit ratio that counts the hit.
    cache = data["cache"]
    assert cache["entries"] >= 1 and cache["bytes"] >= len(b"cached body")
    assert cache["lookups"]["hit"] >= 1 and cache["lookups"]["miss"] >= 1
    served = sum(cache["lookups"].get(r, 0) for r in ("hit", "stale_served", "revalidated"))
    assert cache["hit_ratio"] == round(served / sum(cache["lookups"].values()), 4)
    assert 0 < cache["hit_ratio"] < 1
    assert page.row_with("cache", "hit ratio")[1] == f"{cache['hit_ratio'] * 100:.1f} %"
    # Tunnels: the open one, its target and bytes both ways.
    [open_tunnel_row] = data["tunnels"]["rows"]
    assert open_tunnel_row["target"] == f"127.0.0.1:{origin.port}"
    assert open_tunnel_row["bytes_up"] == len(tunnelled)
    assert open_tunnel_row["bytes_down"] >= len(answer)
    assert open_tunnel_row["age_seconds"] >= 0
    row = page.row_with("tunnels", f"127.0.0.1:{origin.port}")
    assert row[5] == f"{len(tunnelled)} B"
    # Errors: the failed request, without its query string.
    [error] = [e for e in data["errors"]["rows"] if "unresolvable" in e["url"]]
    assert error["url"] == "http://unresolvable.test/missing"
    assert error["status"] == 502 and error["method"] == "GET"
    assert error["error_type"].startswith("dns_")
    assert error["detail"]
    row = page.row_with("errors", "unresolvable.test")
    assert row[3] == "GET http://unresolvable.test/missing" and row[4] == "502"
    assert "s3cret" not in raw and "s3cret" not in json.dumps(data)
    # The page: every section, a title, self-refresh, no script and no outside resource.
    assert set(SECTIONS) <= set(page.sections)
    assert page.title.startswith("proxyd status")
    assert {"http-equiv": "refresh", "content": "2"} in page.meta
    assert "script" not in page.tags and "link" not in page.tags and "img" not in page.tags
    assert "src" not in page.attributes and "href" not in page.attributes


async def test_status_lists_websocket_sessions_with_age_and_bytes(
    start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    ws_origin: WsOrigin = await nursery.start(WsOrigin().serve)
    proxy = await start_proxy()
    url = ws_origin.url("/chat/<b>x</b>?token=s3cret")
    with trio.fail_after(TIMEOUT):
        client = await WsprotoClient.open(proxy.port, url)
    try:
        with trio.fail_after(TIMEOUT):
            await client.send("hello")
            assert await client.receive() == "hello"
        data = await status_json(proxy)
        raw, page = await status_page(proxy)
    finally:
        await client.aclose()
    [session] = data["websockets"]["rows"]
    assert session["target"] == f"127.0.0.1:{ws_origin.port}/chat/<b>x</b>"
    assert session["messages_up"] == 1 and session["messages_down"] == 1
    assert session["bytes_up"] == session["bytes_down"] == len("hello")
    assert session["age_seconds"] >= 0
    row = page.row_with("websockets", "/chat/<b>x</b>")
    assert row[3:] == ["1", "1", "5 B", "5 B"]
    assert "b" not in page.tags and "s3cret" not in raw
    # The session ends: it leaves the list.
    await eventually(lambda: not services(proxy).websocket_sessions)
    assert (await status_json(proxy))["websockets"] == {"total": 0, "rows": []}


async def test_markup_in_targets_is_escaped(proxy: RunningProxy) -> None:
    """Hosts and paths are attacker-controlled: they come back as text, never as markup."""
    closed = free_port()
    payloads = [
        b"GET http://127.0.0.1:%d/<script>window.pwned=1</script> HTTP/1.1\r\n"
        b"Host: 127.0.0.1\r\nConnection: close\r\n\r\n" % closed,
        b'GET http://"><svg/onload=alert(1)>/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n',
        b"CONNECT <script>alert(2)</script>:443 HTTP/1.1\r\nHost: x\r\n\r\n",
    ]
    for payload in payloads:
        line = await raw_request(proxy, payload)
        assert line.split(b" ")[1][:1] in (b"4", b"5"), line
    await eventually(lambda: len(services(proxy).recent_errors) == 3)
    raw, page = await status_page(proxy)
    assert "<script" not in raw and "<svg" not in raw
    assert "script" not in page.tags and "svg" not in page.tags
    assert "onload" not in page.attributes
    requests = [row[3] for row in page.sections["errors"].rows[1:]]
    assert f"GET http://127.0.0.1:{closed}/<script>window.pwned=1</script>" in requests
    assert any('"><svg/onload=alert(1)>' in request for request in requests)
    assert "CONNECT <script>alert(2)</script>:443" in requests
    assert "&lt;script&gt;window.pwned=1&lt;/script&gt;" in raw
    data = await status_json(proxy)
    assert any("<script>window.pwned=1</script>" in e["url"] for e in data["errors"]["rows"])


async def test_refresh_parameter_and_methods(proxy: RunningProxy) -> None:
    _, page = await status_page(proxy, "?refresh=0")
    assert not [m for m in page.meta if m.get("http-equiv") == "refresh"]
    _, page = await status_page(proxy, "?refresh=7")
    assert {"http-equiv": "refresh", "content": "7"} in page.meta
    async with httpx.AsyncClient(trust_env=False) as client:
        with trio.fail_after(TIMEOUT):
            response = await client.post(proxy.admin_url + "/status")
    assert response.status_code == 405
    # The cache is off here: the page says so, the JSON has null.
    assert (await status_json(proxy))["cache"] is None
    _, page = await status_page(proxy)
    assert "off" in page.sections["cache"].text


async def test_config_generation_follows_reloads(nursery: trio.Nursery, tmp_path: Path) -> None:
    """POST /reload applies the config file again: the page shows generation 2 afterwards."""
    path = tmp_path / "proxyd.yaml"
    path.write_text(BASE_CONFIG)
    server = ProxyServer(load_config(str(path)), config_source=ConfigSource(str(path)))
    await nursery.start(server.run)
    proxy = RunningProxy(server, io.StringIO())
    assert (await status_json(proxy))["config_generation"] == 1
    async with httpx.AsyncClient(trust_env=False) as client:
        with trio.fail_after(TIMEOUT):
            assert (await client.post(proxy.admin_url + "/reload")).status_code == 200
    assert (await status_json(proxy))["config_generation"] == 2
    _, page = await status_page(proxy)
    assert "config generation 2" in page.facts
    server.drain()


# --- the pure functions ------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    name: str
    route_kind: str = "direct"
    active: int = 0
    idle: int = 0
    connecting: int = 0
    waiting: int = 0


@dataclass(frozen=True)
class Pool:
    groups: list[Group]
    total: int = 0
    tunnels: int = 0


@dataclass(frozen=True)
class Router:
    mode: str = "static"
    pac_source: str | None = None
    pac_version: str | None = None
    pac_loaded_at: float | None = None
    pac_last_error: str | None = None
    cache_entries: int = 0
    bad_proxies: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Dns:
    entries: int = 0
    capacity: int = 1000
    hits: int = 0
    negative_hits: int = 0
    overrides: int = 0
    misses: int = 0
    queries: int = 0
    errors: int = 0
    timeouts: int = 0
    evictions: int = 0
    in_flight: int = 0


@dataclass(frozen=True)
class Store:
    entries: int = 3
    bytes: int = 4096
    evictions: int = 0
    errors: int = 0
    paused: bool = False


@dataclass(frozen=True)
class Tunnel:
    conn_id: int
    client: str
    target: str
    route: str
    started: float
    bytes_up: int = 0
    bytes_down: int = 0


@dataclass(frozen=True)
class Progress:
    messages_up: int = 0
    messages_down: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


@dataclass(frozen=True)
class Session:
    name: str
    target: str
    started_at: float
    progress: Progress = Progress()


@dataclass(frozen=True)
class Error:
    at: float
    conn_id: int
    client: str
    method: str
    url: str
    status: int
    error_type: str
    detail: str


def snapshot(**overrides: Any) -> status.Snapshot:
    values: dict[str, Any] = {
        "now": 1000.0,
        "wall": 1_700_000_000.0,
        "started": 10.0,
        "version": "9.9",
        "config_generation": 4,
        "draining": False,
        "connections": 2,
        "pool": Pool([]),
        "pool_limits": {"per_group": 6, "per_proxy": 32, "total": 256},
        "router": Router(),
        "routes": [("everything else (default)", ["DIRECT"])],
        "dns": Dns(),
        "dns_entries": [],
        "cache": None,
        "cache_max_bytes": 1 << 30,
        "cache_lookups": {},
        "tunnels": [],
        "sessions": [],
        "errors": [],
    }
    values.update(overrides)
    return status.build_snapshot(**values)


def test_every_table_is_capped_with_a_count_of_the_rest() -> None:
    n = status.ROW_LIMIT + 7
    data = snapshot(
        pool=Pool([Group(f"http://h{i}.test:80 via DIRECT", idle=1) for i in range(n)]),
        tunnels=[Tunnel(i, "10.0.0.1", f"h{i}.test:443", "DIRECT", float(i)) for i in range(n)],
        sessions=[Session(f"c{i}", f"h{i}.test/ws", float(i)) for i in range(n)],
        errors=[
            Error(1.0 * i, i, "10.0.0.1", "GET", f"http://h{i}.test/", 502, "x", "")
            for i in range(n)
        ],
        router=Router(bad_proxies=tuple((f"http://p{i}:1", 9.0) for i in range(n))),
        dns=Dns(entries=n),
        dns_entries=[(f"h{i}.test", ["127.0.0.1"], None, 5.0) for i in range(n)],
    )
    for table in (
        data["pools"]["groups"],
        data["tunnels"],
        data["websockets"],
        data["errors"],
        data["routing"]["bad_proxies"],
        data["dns"]["names"],
    ):
        assert table["total"] == n and len(table["rows"]) == status.ROW_LIMIT
    # The rows kept are the ones to look at first: oldest tunnels and sessions, newest errors.
    assert data["tunnels"]["rows"][0]["conn"] == 0
    assert data["websockets"]["rows"][0]["name"] == "c0"
    assert data["errors"]["rows"][0]["conn"] == n - 1
    page = StatusPage(status.render_html(data))
    for section in ("pools", "tunnels", "websockets", "errors", "bad-proxies", "dns"):
        assert "+7 more" in page.sections[section].text, section
        assert len(page.sections[section].rows) == status.ROW_LIMIT + 1  # and the header row


def test_pools_busiest_first_and_idle_counts() -> None:
    data = snapshot(
        pool=Pool(
            [Group("quiet", idle=3), Group("busy", active=5, waiting=2), Group("half", active=1)],
            total=9,
        )
    )
    assert [g["group"] for g in data["pools"]["groups"]["rows"]] == ["busy", "half", "quiet"]
    page = StatusPage(status.render_html(data))
    assert page.row_with("pools", "busy") == ["busy", "direct", "5", "0", "0", "2"]


def test_every_dynamic_value_is_escaped() -> None:
    evil = '<script>alert("x")</script>'
    data = snapshot(
        version=evil,
        pool=Pool([Group(f"http://{evil}:80 via DIRECT", route_kind=evil, active=1)]),
        router=Router(
            mode="pac",
            pac_source=f"http://user:pw@{evil}/p.pac",
            pac_last_error=evil,
            bad_proxies=((evil, 3.0),),
        ),
        routes=[(evil, [evil])],
        dns=Dns(entries=1),
        dns_entries=[(evil, [evil], None, 3.0)],
        cache=Store(),
        cache_lookups={evil: 1.0},
        tunnels=[Tunnel(1, evil, evil, evil, 0.0)],
        sessions=[Session(evil, evil, 0.0)],
        errors=[Error(0.0, 1, evil, evil, f"http://{evil}/", 502, evil, evil)],
    )
    html_text = status.render_html(data)
    page = StatusPage(html_text)
    assert "<script" not in html_text
    assert page.tags.count("script") == 0
    assert evil in page.title
    for section in ("pools", "routes", "bad-proxies", "dns", "cache", "tunnels", "websockets"):
        assert evil in page.sections[section].text, section
    assert evil in page.sections["errors"].text
    # Credentials in a PAC URL are not shown.
    assert "user:pw" not in html_text and "***@" in page.sections["routes"].text


def test_urls_lose_query_fragment_and_credentials_and_long_text_is_cut() -> None:
    data = snapshot(
        tunnels=[Tunnel(1, "::1", "h.test:443", "DIRECT", 0.0)],
        sessions=[Session("c1", "h.test/ws?key=s3cret#frag", 0.0)],
        errors=[
            Error(0.0, 1, "::1", "GET", "http://u:p@h.test/a?b=s3cret#c", 502, "t", "x" * 1000)
        ],
    )
    assert data["websockets"]["rows"][0]["target"] == "h.test/ws"
    error = data["errors"]["rows"][0]
    assert error["url"] == "http://***@h.test/a"
    assert len(error["detail"]) == status.TEXT_LIMIT and error["detail"].endswith("\u2026")
    assert "s3cret" not in json.dumps(data) and "s3cret" not in status.render_html(data)


def test_hit_ratio_counts_answers_from_stored_bodies() -> None:
    lookups = {"hit": 3.0, "stale_served": 1.0, "revalidated": 1.0, "miss": 4.0, "uncacheable": 1}
    data = snapshot(cache=Store(), cache_lookups=lookups)
    assert data["cache"]["hit_ratio"] == 0.5
    assert snapshot(cache=Store(), cache_lookups={})["cache"]["hit_ratio"] is None
    page = StatusPage(status.render_html(data))
    assert page.row_with("cache", "hit ratio")[1] == "50.0 %"
    assert page.row_with("cache", "stored")[1] == "4.0 KiB of 1.0 GiB"


def test_facts_and_json_round_trip() -> None:
    data = snapshot(draining=True)
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    assert data["uptime_seconds"] == 990.0 and data["config_generation"] == 4
    page = StatusPage(status.render_html(data, refresh=2))
    facts = status.render_html(data)
    assert "up 16 min 30 s" in facts and "config generation 4" in facts and "draining" in facts
    assert page.title == "proxyd status \u2014 9.9"


def test_refresh_seconds() -> None:
    assert status.refresh_seconds({}) == status.DEFAULT_REFRESH
    assert status.refresh_seconds({"refresh": ["0"]}) == 0
    assert status.refresh_seconds({"refresh": ["5"]}) == 5
    assert status.refresh_seconds({"refresh": ["-3"]}) == 0
    assert status.refresh_seconds({"refresh": ["999999"]}) == status.MAX_REFRESH
    assert status.refresh_seconds({"refresh": ["soon"]}) == status.DEFAULT_REFRESH

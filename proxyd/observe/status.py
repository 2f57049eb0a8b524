"""The live status page: one snapshot of the daemon as a dict, shown as HTML (``/status``) or JSON.

How it works: ``server.py`` gathers the ``stats()`` snapshots of the pool, router, resolver and
cache store, the open tunnels, WebSocket sessions and recent errors, synchronously (no await in
between, so it is one moment), and hands them to ``build_snapshot`` together with the clocks.
observe/ imports nothing from the rest of proxyd, so those objects are read through the small
``Protocol``s below (the frozen stats dataclasses satisfy them as they are). ``build_snapshot``
returns a JSON-ready dict (str, int, float, bool, None, lists, dicts): ``/status.json`` serialises
it as it is and ``render_html`` turns that same dict into the page, so the two never disagree.
Both functions are pure: no trio, no I/O, no clock (``now`` and ``wall`` come in as arguments).

The page follows chrome://net-internals#sockets: facts first (version, uptime, config generation),
then one section per room: socket pools per group (active, idle, connecting, waiting), routes and
the bad-proxy list, the DNS cache, the HTTP cache (size, hit ratio), open tunnels and WebSocket
sessions (age, bytes), recent errors.

Bounded: every table keeps at most ``ROW_LIMIT`` rows, the ones a person looks for first (busiest
pool groups, oldest tunnels and sessions, newest errors), picked with ``heapq`` in O(n log k), and
reports its total; the page prints "+N more". Strings that come from the network (hosts, URLs,
error details) are cut to ``TEXT_LIMIT`` characters, URLs lose their query and fragment (tokens
live there) and any ``user:password@``.

Safety: hosts and paths are attacker-controlled (any client can ask for
``http://<script>.test/``), so every dynamic value goes through ``html.escape(..., quote=True)``
on its way into the page, and nothing else builds markup from data. The page needs no network
resource: inline CSS, no script, and a Content-Security-Policy ``<meta>`` of ``default-src
'none'`` so that even an escaping mistake could neither run a script nor load anything. It
refreshes itself with ``<meta http-equiv="refresh">`` every ``refresh`` seconds (``?refresh=0``
stops it, for reading a moment at leisure).
"""

from __future__ import annotations

import heapq
import html
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, Protocol

from proxyd.observe.metrics import GroupView

ROW_LIMIT: Final = 200
TEXT_LIMIT: Final = 200
DEFAULT_REFRESH: Final = 2
MAX_REFRESH: Final = 3600
#: Cache lookup results that answered from stored bodies (fresh, stale, or after a 304).
CACHE_HIT_RESULTS: Final = ("hit", "stale_served", "revalidated")

Snapshot = dict[str, Any]

_USERINFO: Final = re.compile(r"(//)[^/@\s;?#]*@")


# --- what the snapshot reads (the stats dataclasses of pool, router, dns, store, client) --------


class PoolGroupView(GroupView, Protocol):
    """A pool group as the metrics read it, plus its name."""

    @property
    def name(self) -> str: ...


class PoolView(Protocol):
    @property
    def groups(self) -> Sequence[PoolGroupView]: ...
    @property
    def total(self) -> int: ...
    @property
    def tunnels(self) -> int: ...


class RouterView(Protocol):
    @property
    def mode(self) -> str: ...
    @property
    def pac_source(self) -> str | None: ...
    @property
    def pac_version(self) -> str | None: ...
    @property
    def pac_loaded_at(self) -> float | None: ...
    @property
    def pac_last_error(self) -> str | None: ...
    @property
    def cache_entries(self) -> int: ...
    @property
    def bad_proxies(self) -> Sequence[tuple[str, float]]: ...


class DnsView(Protocol):
    @property
    def entries(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def hits(self) -> int: ...
    @property
    def negative_hits(self) -> int: ...
    @property
    def overrides(self) -> int: ...
    @property
    def misses(self) -> int: ...
    @property
    def queries(self) -> int: ...
    @property
    def errors(self) -> int: ...
    @property
    def timeouts(self) -> int: ...
    @property
    def evictions(self) -> int: ...
    @property
    def in_flight(self) -> int: ...


class StoreView(Protocol):
    @property
    def entries(self) -> int: ...
    @property
    def bytes(self) -> int: ...
    @property
    def evictions(self) -> int: ...
    @property
    def errors(self) -> int: ...
    @property
    def paused(self) -> bool: ...


class TunnelView(Protocol):
    @property
    def conn_id(self) -> int: ...
    @property
    def client(self) -> str: ...
    @property
    def target(self) -> str: ...
    @property
    def route(self) -> str: ...
    @property
    def started(self) -> float: ...
    @property
    def bytes_up(self) -> int: ...
    @property
    def bytes_down(self) -> int: ...


class ProgressView(Protocol):
    @property
    def messages_up(self) -> int: ...
    @property
    def messages_down(self) -> int: ...
    @property
    def bytes_up(self) -> int: ...
    @property
    def bytes_down(self) -> int: ...


class SessionView(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def target(self) -> str: ...
    @property
    def started_at(self) -> float: ...
    @property
    def progress(self) -> ProgressView: ...


class ErrorView(Protocol):
    @property
    def at(self) -> float: ...
    @property
    def conn_id(self) -> int: ...
    @property
    def client(self) -> str: ...
    @property
    def method(self) -> str: ...
    @property
    def url(self) -> str: ...
    @property
    def status(self) -> int: ...
    @property
    def error_type(self) -> str: ...
    @property
    def detail(self) -> str: ...


# --- the snapshot ------------------------------------------------------------------------------


def build_snapshot(
    *,
    now: float,
    wall: float,
    started: float,
    version: str,
    config_generation: int,
    draining: bool,
    connections: int,
    pool: PoolView,
    pool_limits: Mapping[str, int],
    router: RouterView,
    routes: Sequence[tuple[str, Sequence[str]]],
    dns: DnsView,
    dns_entries: Sequence[tuple[str, Sequence[str], str | None, float]],
    cache: StoreView | None,
    cache_max_bytes: int,
    cache_lookups: Mapping[str, float],
    tunnels: Iterable[TunnelView],
    sessions: Iterable[SessionView],
    errors: Sequence[ErrorView],
    limit: int = ROW_LIMIT,
) -> Snapshot:
    """The status as JSON-ready data. ``now`` and ``started`` are monotonic (the clock tunnels and
    sessions were stamped with), ``wall`` is Unix time. ``routes`` are (match, route labels)
    pairs, ``dns_entries`` (host, addresses, error, seconds left), most recently used first."""
    groups = heapq.nsmallest(
        limit,
        pool.groups,
        key=lambda g: (-(g.active + g.connecting + g.waiting), -g.idle, g.name),
    )
    open_tunnels = list(tunnels)
    open_sessions = list(sessions)
    return {
        "version": version,
        "generated_at": round(wall, 3),
        "uptime_seconds": round(max(0.0, now - started), 3),
        "config_generation": config_generation,
        "draining": draining,
        "client_connections": connections,
        "pools": {
            "sockets": pool.total,
            "tunnels": pool.tunnels,
            "limits": dict(pool_limits),
            "groups": _table(
                len(pool.groups),
                [
                    {
                        "group": _text(g.name),
                        "route_kind": g.route_kind,
                        "active": g.active,
                        "idle": g.idle,
                        "connecting": g.connecting,
                        "waiting": g.waiting,
                    }
                    for g in groups
                ],
            ),
        },
        "routing": {
            "mode": router.mode,
            "pac_source": _maybe_url(router.pac_source),
            "pac_version": router.pac_version,
            "pac_loaded_at": router.pac_loaded_at,
            "pac_last_error": _maybe_text(router.pac_last_error),
            "pac_cache_entries": router.cache_entries,
            "routes": _table(
                len(routes),
                [
                    {"match": _text(match), "route": [_text(label) for label in labels]}
                    for match, labels in routes[:limit]
                ],
            ),
            "bad_proxies": _table(
                len(router.bad_proxies),
                [
                    {"proxy": _text(label), "seconds_left": round(left, 1)}
                    for label, left in router.bad_proxies[:limit]
                ],
            ),
        },
        "dns": {
            "entries": dns.entries,
            "capacity": dns.capacity,
            "hits": dns.hits,
            "negative_hits": dns.negative_hits,
            "overrides": dns.overrides,
            "misses": dns.misses,
            "queries": dns.queries,
            "errors": dns.errors,
            "timeouts": dns.timeouts,
            "evictions": dns.evictions,
            "in_flight": dns.in_flight,
            "names": _table(
                dns.entries,
                [
                    {
                        "host": _text(host),
                        "addresses": list(addresses),
                        "error": _maybe_text(error),
                        "seconds_left": round(left, 1),
                    }
                    for host, addresses, error, left in dns_entries[:limit]
                ],
            ),
        },
        "cache": None if cache is None else _cache(cache, cache_max_bytes, cache_lookups),
        "tunnels": _table(
            len(open_tunnels),
            [
                {
                    "conn": t.conn_id,
                    "client": t.client,
                    "target": _url(t.target),
                    "route": _text(t.route),
                    "age_seconds": round(max(0.0, now - t.started), 1),
                    "bytes_up": t.bytes_up,
                    "bytes_down": t.bytes_down,
                }
                for t in heapq.nsmallest(limit, open_tunnels, key=lambda t: t.started)
            ],
        ),
        "websockets": _table(
            len(open_sessions),
            [
                _session(s, now)
                for s in heapq.nsmallest(limit, open_sessions, key=lambda s: s.started_at)
            ],
        ),
        "errors": _table(
            len(errors),
            [
                {
                    "at": round(e.at, 3),
                    "conn": e.conn_id,
                    "client": e.client,
                    "method": _text(e.method),
                    "url": _url(e.url),
                    "status": e.status,
                    "error_type": e.error_type,
                    "detail": _text(e.detail),
                }
                for e in reversed(errors[-limit:])  # newest first
            ],
        ),
    }


def _table(total: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"total": total, "rows": rows}


def _cache(store: StoreView, max_bytes: int, lookups: Mapping[str, float]) -> dict[str, Any]:
    counts = {result: int(count) for result, count in sorted(lookups.items())}
    total = sum(counts.values())
    served = sum(counts.get(result, 0) for result in CACHE_HIT_RESULTS)
    return {
        "entries": store.entries,
        "bytes": store.bytes,
        "max_bytes": max_bytes,
        "evictions": store.evictions,
        "errors": store.errors,
        "paused": store.paused,
        "lookups": counts,
        # Share of lookups answered with a stored body (None before the first lookup).
        "hit_ratio": round(served / total, 4) if total else None,
    }


def _session(session: SessionView, now: float) -> dict[str, Any]:
    progress = session.progress
    return {
        "name": session.name,
        "target": _url(session.target),
        "age_seconds": round(max(0.0, now - session.started_at), 1),
        "messages_up": progress.messages_up,
        "messages_down": progress.messages_down,
        "bytes_up": progress.bytes_up,
        "bytes_down": progress.bytes_down,
    }


def _text(value: str) -> str:
    return value if len(value) <= TEXT_LIMIT else value[: TEXT_LIMIT - 1] + "\u2026"


def _maybe_text(value: str | None) -> str | None:
    return None if value is None else _text(_USERINFO.sub(r"\1***@", value))


def _url(value: str) -> str:
    """A URL fit to show: no query or fragment, no credentials, bounded length."""
    for mark in ("?", "#"):
        value = value.split(mark, 1)[0]
    return _text(_USERINFO.sub(r"\1***@", value))


def _maybe_url(value: str | None) -> str | None:
    return None if value is None else _url(value)


# --- the page ------------------------------------------------------------------------------------

_CSS: Final = """
body{font:13px/1.4 system-ui,sans-serif;margin:1em 2em;color:#222;background:#fff}
h1{font-size:1.4em;margin:.2em 0}h2{font-size:1.15em;margin:1.2em 0 .3em;
border-bottom:1px solid #ccc}h3{font-size:1em;margin:.8em 0 .2em}
table{border-collapse:collapse;margin:.2em 0}th,td{padding:2px 8px;text-align:left;
border-bottom:1px solid #eee;vertical-align:top}th{background:#f3f3f3}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
#errors td:first-child{white-space:nowrap}.facts span{margin-right:1.5em}
.muted,.more{color:#777}.bad{color:#b00;font-weight:bold}
"""


def refresh_seconds(query: Mapping[str, Sequence[str]]) -> int:
    """The ``refresh`` query parameter: seconds between reloads, 0 for none (bounded)."""
    values = query.get("refresh")
    if not values:
        return DEFAULT_REFRESH
    try:
        seconds = int(values[0])
    except ValueError:
        return DEFAULT_REFRESH
    return max(0, min(seconds, MAX_REFRESH))


def render_html(snapshot: Snapshot, *, refresh: int = DEFAULT_REFRESH) -> str:
    """The page for one snapshot (every dynamic value escaped here, in ``_e``)."""
    s = snapshot
    parts = [
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>",
        "<meta http-equiv='Content-Security-Policy' "
        "content=\"default-src 'none'; style-src 'unsafe-inline'\">",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
    ]
    if refresh > 0:
        parts.append(f"<meta http-equiv='refresh' content='{int(refresh)}'>")
    parts += [
        f"<title>proxyd status \u2014 {_e(s['version'])}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>proxyd {_e(s['version'])}</h1>",
        "<p class='facts'>",
        f"<span>up {_e(_duration(s['uptime_seconds']))}</span>",
        f"<span>config generation {_e(s['config_generation'])}</span>",
        f"<span>{_e(s['client_connections'])} client connection(s)</span>",
        "<span class='bad'>draining</span>" if s["draining"] else "",
        f"<span class='muted'>at {_e(_clock(s['generated_at']))} UTC, ",
        f"every {int(refresh)} s</span>" if refresh > 0 else "not refreshing</span>",
        "</p>",
    ]
    parts += _pools(s["pools"])
    parts += _routing(s["routing"])
    parts += _dns(s["dns"])
    parts += _http_cache(s["cache"])
    parts += _section(
        "tunnels",
        "Tunnels",
        ("conn", "client", "target", "route", "age", "bytes up", "bytes down"),
        s["tunnels"],
        lambda r: (
            f"c{r['conn']}",
            r["client"],
            r["target"],
            r["route"],
            _duration(r["age_seconds"]),
            _size(r["bytes_up"]),
            _size(r["bytes_down"]),
        ),
        numeric=(4, 5, 6),
    )
    parts += _section(
        "websockets",
        "WebSocket sessions",
        ("session", "target", "age", "messages up", "messages down", "bytes up", "bytes down"),
        s["websockets"],
        lambda r: (
            r["name"],
            r["target"],
            _duration(r["age_seconds"]),
            str(r["messages_up"]),
            str(r["messages_down"]),
            _size(r["bytes_up"]),
            _size(r["bytes_down"]),
        ),
        numeric=(2, 3, 4, 5, 6),
    )
    parts += _section(
        "errors",
        "Recent errors",
        ("time (UTC)", "conn", "client", "request", "status", "error", "detail"),
        s["errors"],
        lambda r: (
            _clock(r["at"]),
            f"c{r['conn']}",
            r["client"],
            f"{r['method']} {r['url']}",
            str(r["status"]),
            r["error_type"],
            r["detail"],
        ),
        numeric=(4,),
        note="newest first",
    )
    parts.append("</body></html>\n")
    return "\n".join(part for part in parts if part)


def _pools(pools: dict[str, Any]) -> list[str]:
    limits = pools["limits"]
    note = (
        f"{pools['sockets']} socket(s) of {limits.get('total', '?')} "
        f"(per group {limits.get('per_group', '?')}, per proxy {limits.get('per_proxy', '?')}); "
        f"{pools['tunnels']} tunnel slot(s) in use"
    )
    return _section(
        "pools",
        "Socket pools",
        ("group", "route", "active", "idle", "connecting", "waiting"),
        pools["groups"],
        lambda r: (
            r["group"],
            r["route_kind"],
            str(r["active"]),
            str(r["idle"]),
            str(r["connecting"]),
            str(r["waiting"]),
        ),
        numeric=(2, 3, 4, 5),
        note=note,
    )


def _routing(routing: dict[str, Any]) -> list[str]:
    if routing["mode"] == "pac":
        loaded = routing["pac_loaded_at"]
        note = (
            f"PAC {routing['pac_source']} (version {routing['pac_version'] or '?'}, loaded "
            f"{_clock(loaded) + ' UTC' if loaded is not None else 'never'}; "
            f"{routing['pac_cache_entries']} cached decision(s))"
        )
        if routing["pac_last_error"]:
            note += f"; last error: {routing['pac_last_error']}"
    else:
        note = "static rules, first match wins"
    parts = _section(
        "routes",
        "Routes",
        ("match", "route list"),
        routing["routes"],
        lambda r: (r["match"], "; ".join(r["route"])),
        note=note,
    )
    parts += _section(
        "bad-proxies",
        "Bad proxies",
        ("proxy", "tried last for"),
        routing["bad_proxies"],
        lambda r: (r["proxy"], _duration(r["seconds_left"])),
        numeric=(1,),
        level="h3",
    )
    return parts


def _dns(dns: dict[str, Any]) -> list[str]:
    note = (
        f"{dns['entries']} of {dns['capacity']} name(s) cached; {dns['hits']} hit(s), "
        f"{dns['negative_hits']} negative hit(s), {dns['overrides']} override(s), "
        f"{dns['misses']} miss(es), {dns['queries']} quer(ies), {dns['errors']} error(s), "
        f"{dns['timeouts']} timeout(s), {dns['evictions']} eviction(s), "
        f"{dns['in_flight']} in flight"
    )
    return _section(
        "dns",
        "DNS cache",
        ("host", "answer", "expires in"),
        dns["names"],
        lambda r: (
            r["host"],
            ", ".join(r["addresses"]) if r["error"] is None else f"error: {r['error']}",
            _duration(r["seconds_left"]) if r["seconds_left"] > 0 else "expired",
        ),
        numeric=(2,),
        note=note,
    )


def _http_cache(cache: dict[str, Any] | None) -> list[str]:
    if cache is None:
        return ["<section id='cache'><h2>HTTP cache</h2><p class='muted'>off</p></section>"]
    ratio = cache["hit_ratio"]
    rows = [
        ("entries", str(cache["entries"])),
        ("stored", f"{_size(cache['bytes'])} of {_size(cache['max_bytes'])}"),
        ("hit ratio", "-" if ratio is None else f"{ratio * 100:.1f} %"),
        ("evictions", str(cache["evictions"])),
        ("store errors", str(cache["errors"])),
        ("storing", "paused (disk error)" if cache["paused"] else "on"),
    ]
    rows += [(f"lookups: {result}", str(count)) for result, count in cache["lookups"].items()]
    body = "".join(
        f"<tr><th>{_e(name)}</th><td class='n'>{_e(value)}</td></tr>" for name, value in rows
    )
    return [f"<section id='cache'><h2>HTTP cache</h2><table>{body}</table></section>"]


def _section(
    anchor: str,
    title: str,
    headers: Sequence[str],
    table: dict[str, Any],
    cells: Callable[[dict[str, Any]], Sequence[str]],
    *,
    numeric: Sequence[int] = (),
    note: str | None = None,
    level: str = "h2",
) -> list[str]:
    """A heading, an optional note, a table of ``cells(row)`` (plain text, escaped here) and a
    "+N more" line when the table was cut."""
    rows: list[dict[str, Any]] = table["rows"]
    parts = [f"<section id='{anchor}'><{level}>{_e(title)} ({_e(table['total'])})</{level}>"]
    if note:
        parts.append(f"<p class='muted'>{_e(note)}</p>")
    if not rows:
        parts.append("<p class='muted'>none</p></section>")
        return parts

    def cls(index: int) -> str:
        return " class='n'" if index in numeric else ""

    head = "".join(f"<th{cls(i)}>{_e(h)}</th>" for i, h in enumerate(headers))
    parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>")
    for row in rows:
        parts.append(
            "<tr>"
            + "".join(f"<td{cls(i)}>{_e(cell)}</td>" for i, cell in enumerate(cells(row)))
            + "</tr>"
        )
    parts.append("</tbody></table>")
    more = table["total"] - len(rows)
    if more > 0:
        parts.append(f"<p class='more'>+{more} more</p>")
    parts.append("</section>")
    return parts


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    if whole < 86400:
        return f"{whole // 3600} h {whole % 3600 // 60} min"
    return f"{whole // 86400} d {whole % 86400 // 3600} h"


def _size(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def _clock(wall: float) -> str:
    """Unix time as ``YYYY-MM-DD HH:MM:SS`` in UTC (a formatting of the value given, no clock)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(wall))

"""Where the time of each request went, read from a NetLog capture (``proxyd netlog summarize``).

Pure: it reads JSON lines (from ``--netlog FILE`` or a saved ``GET /netlog`` stream, the format is
the same; see netlog.py for the schema) and returns text. No trio, no clock.

How it works: the events of each request (same ``req``, within one capture: a ``netlog_start``
begins a new one, since ids restart with the process) give milestones on one clock, ``t``:

    request --(queue/route)--> socket asked --(connect)--> socket ours --(wait)--> first byte
            --(body)--> completed | failed

- *queue/route*: from the request head to asking the pool for a socket: authentication, the
  cache lookup, routing (PAC), failover attempts.
- *connect*: the last ``socket`` (or ``socket_failed``) event's ``wait``: 0 for a reused socket;
  DNS, TCP and TLS, or a CONNECT through a proxy for a fresh one, plus waiting for a pool slot.
  Attempts on routes that failed before it (failover) count as queue/route.
- *wait*: from the socket to the final response head (sending the request, its body, the 1xx, the
  origin's think time): the time to first byte as the proxy sees it.
- *body*: from the final head to the end (for a CONNECT tunnel: the life of the tunnel).

A milestone that never happened takes the time of the one before it, so the four parts always add
up to the total and none is negative: a cache hit is all queue/route (lookup) then body (serving
from the store); a request that failed before a socket is all queue/route. A request whose end is
not in the capture (the capture stopped first) ends at its last event and shows status ``...``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

#: Milestone events, in the order a request passes them.
_END_EVENTS: Final = frozenset({"completed", "failed"})


@dataclass(slots=True)
class RequestTimes:
    """One request of a capture, with its time split (seconds)."""

    capture: int
    conn: int | None
    req: int
    method: str = "-"
    url: str = "-"
    status: str = "..."
    cache: str = "-"
    error: str = "-"
    reused: bool | None = None
    start: float = 0.0
    total: float = 0.0
    queue: float = 0.0
    connect: float = 0.0
    wait: float = 0.0
    body: float = 0.0
    events: list[dict[str, Any]] = field(default_factory=list)


@dataclass(slots=True)
class Summary:
    requests: list[RequestTimes]
    captures: int = 0
    connections: int = 0
    dropped: int = 0
    bad_lines: int = 0


def parse_lines(lines: Iterable[str]) -> tuple[list[dict[str, Any]], int]:
    """Events of a capture file, in order; lines that are not JSON objects are counted, skipped."""
    events: list[dict[str, Any]] = []
    bad = 0
    for line in lines:
        text = line.strip()
        if not text:
            continue
        try:
            event = json.loads(text)
        except ValueError:
            bad += 1
            continue
        if not isinstance(event, dict) or not isinstance(event.get("event"), str):
            bad += 1
            continue
        if not isinstance(event.get("t"), (int, float)):
            bad += 1
            continue
        events.append(event)
    return events, bad


def summarize(events: list[dict[str, Any]], bad_lines: int = 0) -> Summary:
    """Group events by request (per capture) and compute each request's time split."""
    by_request: dict[tuple[int, int], RequestTimes] = {}
    connections: set[tuple[int, int]] = set()
    capture = 0
    dropped = 0
    for event in events:
        kind = event["event"]
        if kind == "netlog_start":
            capture += 1
            continue
        if kind == "netlog_dropped":
            dropped += _int(event.get("count"))
            continue
        conn, req = event.get("conn"), event.get("req")
        if kind == "accepted" and isinstance(conn, int):
            connections.add((capture, conn))
        if not isinstance(req, int):
            continue
        key = (capture, req)
        times = by_request.get(key)
        if times is None:
            times = by_request[key] = RequestTimes(
                capture, conn if isinstance(conn, int) else None, req
            )
        times.events.append(event)
    requests = [_split(times) for times in by_request.values()]
    requests.sort(key=lambda r: (r.capture, r.start))
    return Summary(requests, max(capture, 1), len(connections), dropped, bad_lines)


def _split(times: RequestTimes) -> RequestTimes:
    events = sorted(times.events, key=lambda e: float(e["t"]))
    first: dict[str, dict[str, Any]] = {}
    last: dict[str, dict[str, Any]] = {}
    for event in events:
        first.setdefault(event["event"], event)
        last[event["event"]] = event
    request = first.get("request")
    start = float(request["t"]) if request else float(events[0]["t"])
    if request:
        times.method = str(request.get("method", "-"))
        times.url = str(request.get("url", "-"))
    end_event = next((e for e in events if e["event"] in _END_EVENTS), None)
    end = float(end_event["t"]) if end_event else float(events[-1]["t"])
    sockets = [e for e in events if e["event"] in ("socket", "socket_failed")]
    socket = sockets[-1] if sockets else None
    head = last.get("first_byte")
    if socket is not None:
        got = float(socket["t"])
        wait = socket.get("wait")
        asked = got - float(wait) if isinstance(wait, (int, float)) and wait >= 0 else got
        times.reused = bool(socket.get("reused")) if "reused" in socket else None
        head_at = float(head["t"]) if head else end
        if socket.get("tunnel"):
            head_at = got  # a tunnel has no response head of its own: the rest is its life
    elif head is not None:  # the capture began after the socket was taken
        asked = got = head_at = float(head["t"])
    elif "cache" in first:  # a cache hit: the lookup, then serving from the store
        asked = got = head_at = float(first["cache"]["t"])
    else:  # an error before any socket (routing, access, a failed connect): all queue/route
        asked = got = head_at = end
    # Milestones in order; a later one never precedes an earlier one (clock reads are racy
    # only across tasks, never backwards, but a missing one takes its predecessor's time).
    asked = min(max(asked, start), end)
    got = min(max(got, asked), end)
    head_at = min(max(head_at, got), end)
    times.start = start
    times.total = max(end - start, 0.0)
    times.queue = asked - start
    times.connect = got - asked
    times.wait = head_at - got
    times.body = end - head_at
    if end_event is not None:
        times.status = str(end_event.get("status", "?"))
        times.cache = str(end_event.get("cache", "-"))
        if end_event["event"] == "failed":
            times.error = str(end_event.get("error", "?"))
    elif head is not None:
        times.status = f"{head.get('status', '?')}..."
    return times


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


_COLUMNS: Final = ("req", "status", "total", "queue", "connect", "wait", "body", "sock", "url")


def _row(r: RequestTimes, url_width: int) -> list[str]:
    sock = "-" if r.reused is None else ("reused" if r.reused else "new")
    status = r.status if r.error == "-" else f"{r.status} {r.error}"
    url = f"{r.method} {r.url}"
    if len(url) > url_width:
        url = url[: url_width - 3] + "..."
    if r.cache not in ("-", ""):
        url = f"[{r.cache}] {url}"
    return [
        str(r.req),
        status,
        _ms(r.total),
        _ms(r.queue),
        _ms(r.connect),
        _ms(r.wait),
        _ms(r.body),
        sock,
        url,
    ]


def _table(rows: list[list[str]]) -> list[str]:
    header = list(_COLUMNS)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        cells = [
            cell.rjust(width) if index != 1 else cell.ljust(width)
            for index, (cell, width) in enumerate(zip(row[:-1], widths, strict=True))
        ]
        lines.append("  ".join([*cells, row[-1]]))
    return lines


def render(summary: Summary, *, slowest: int = 10, url_width: int = 80) -> str:
    """The per-request table (times in ms), then the slowest requests with their largest part."""
    requests = summary.requests
    out = [
        f"{len(requests)} request(s), {summary.connections} connection(s), "
        f"{summary.captures} capture(s); times in ms (queue/route, connect, wait for the first "
        "byte, body)"
    ]
    if summary.dropped:
        out.append(f"warning: {summary.dropped} event(s) were dropped (slow consumer)")
    if summary.bad_lines:
        out.append(f"warning: {summary.bad_lines} line(s) were not NetLog events")
    if not requests:
        out.append("no requests in this capture")
        return "\n".join(out) + "\n"
    out.append("")
    out.extend(_table([_row(r, url_width) for r in requests]))
    ranked = sorted(requests, key=lambda r: r.total, reverse=True)[: max(slowest, 0)]
    if ranked:
        out.append("")
        out.append(f"slowest {len(ranked)}:")
        for r in ranked:
            parts = {"queue/route": r.queue, "connect": r.connect, "wait": r.wait, "body": r.body}
            where = max(parts, key=lambda name: parts[name])
            share = parts[where] / r.total * 100 if r.total > 0 else 0.0
            out.append(
                f"  {_ms(r.total):>9} ms  req {r.req}  {r.method} {r.url}  "
                f"(status {r.status}; mostly {where}: {share:.0f}%)"
            )
    return "\n".join(out) + "\n"


__all__ = ["RequestTimes", "Summary", "parse_lines", "render", "summarize"]

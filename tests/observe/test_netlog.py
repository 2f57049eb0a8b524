"""NetLog: per-request timed events, captured over the admin listener or into a file.

Everything runs through a real proxyd (in-process, or a subprocess for ``--netlog FILE``) and the
scriptable origin on loopback; the viewer is run on the captures made that way.
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from proxyd.cli import main
from proxyd.observe.netlog import Capture, NetLog
from proxyd.observe.netlog_summary import parse_lines, render, summarize
from tests.conftest import RunningProxy, StartProxy, eventually
from tests.origin import Exchange, Origin

Event = dict[str, Any]

#: The milestones of a plain proxied request, in order (no cache, no 1xx).
PLAIN = ["request", "route", "socket", "sent", "first_byte", "completed"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def is_listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def by_request(events: list[Event]) -> dict[int, list[Event]]:
    grouped: dict[int, list[Event]] = {}
    for event in events:
        if isinstance(event["req"], int):
            grouped.setdefault(event["req"], []).append(event)
    return grouped


def names(events: list[Event]) -> list[str]:
    return [event["event"] for event in events]


def check_request(events: list[Event], accepted: dict[int, float]) -> None:
    """One request's events: one connection, times in order and after its accept, no negative
    duration anywhere."""
    conns = {event["conn"] for event in events}
    assert len(conns) == 1, events
    conn = conns.pop()
    assert conn in accepted, f"no accepted event for connection {conn}"
    times = [event["t"] for event in events]
    assert times == sorted(times), events
    assert accepted[conn] <= times[0]
    for event in events:
        for key in ("wait", "duration"):
            if event.get(key) is not None:
                assert event[key] >= 0, event


def accepted_times(events: list[Event]) -> dict[int, float]:
    return {e["conn"]: e["t"] for e in events if e["event"] == "accepted"}


async def early_hints(exchange: Exchange) -> None:
    await exchange.informational(103, [(b"Link", b"</style.css>; rel=preload")])
    await exchange.respond(200, b"hinted")


async def cacheable(exchange: Exchange) -> None:
    await exchange.respond(200, b"stored body", [(b"Cache-Control", b"max-age=300")])


async def read_capture(capture: Capture, until: str, req: int | None = None) -> list[Event]:
    """Events taken from an in-process capture until one named ``until`` (of ``req``) came."""
    events: list[Event] = []

    def arrived() -> bool:
        events.extend(capture.take())
        return any(e["event"] == until and (req is None or e["req"] == req) for e in events)

    await eventually(arrived)
    return events


# --- capture over the admin listener ----------------------------------------------------------


async def test_admin_capture_streams_each_step_of_each_request_in_order(
    proxy: RunningProxy, origin: Origin, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """GET /netlog?seconds=1 streams JSON lines while requests run: every request has its
    milestones in order on one connection id, a reused socket says so, a 1xx is an event, and
    the stream begins with netlog_start and ends with netlog_end (nothing dropped). The viewer
    reads the saved stream."""
    origin.route("/hints", early_hints)
    lines: list[str] = []
    with trio.fail_after(10):
        async with (
            httpx.AsyncClient(timeout=10) as admin,
            admin.stream("GET", proxy.admin_url + "/netlog?seconds=1") as stream,
        ):
            assert stream.status_code == 200
            assert stream.headers["content-type"] == "application/x-ndjson"
            assert stream.headers["transfer-encoding"] == "chunked"
            line_iter = stream.aiter_lines()
            lines.append(await line_iter.__anext__())  # subscribed: capture from here on
            async with httpx.AsyncClient(proxy=proxy.url) as client:
                assert (await client.get(origin.url("/one"))).status_code == 200
                assert (await client.get(origin.url("/two"))).status_code == 200
                hinted = await client.get(origin.url("/hints"))
                assert hinted.text == "hinted"
            lines.extend([line async for line in line_iter])
    events = [json.loads(line) for line in lines if line]
    assert events[0]["event"] == "netlog_start"
    assert isinstance(events[0]["epoch"], float)
    assert events[-1] == {**events[-1], "event": "netlog_end", "dropped": 0}
    accepted = accepted_times(events)
    requests = list(by_request(events).values())
    assert [r[0]["url"] for r in requests] == [origin.url(p) for p in ("/one", "/two", "/hints")]
    for events_of_one in requests:
        check_request(events_of_one, accepted)
    first, second, hinted_events = requests
    assert names(first) == PLAIN
    assert names(second) == PLAIN
    assert names(hinted_events) == [*PLAIN[:4], "informational", *PLAIN[4:]]
    assert hinted_events[4]["status"] == 103
    # One keep-alive connection to the origin: fresh for the first request, reused after.
    assert first[2]["reused"] is False and second[2]["reused"] is True
    assert first[2]["socket"] == second[2]["socket"]
    assert first[1]["routes"] == ["DIRECT"] and first[1]["source"] == "static"
    done = hinted_events[-1]
    assert done["status"] == 200 and done["bytes_out"] == len(b"hinted")
    assert done["duration"] >= done["t"] - hinted_events[0]["t"] - 1e-3
    # Every request rode the same client connection.
    assert len({e["conn"] for r in requests for e in r}) == 1
    assert proxy.server.netlog.active is False  # the capture unsubscribed at its end
    saved = tmp_path / "stream.jsonl"
    saved.write_text("\n".join(lines) + "\n", "utf-8")
    assert main(["netlog", "summarize", str(saved)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("3 request(s), 1 connection(s), 1 capture(s);")
    assert f"  reused  GET {origin.url('/two')}\n" in out
    assert "slowest 3:" in out


async def test_admin_capture_bounds_its_arguments(proxy: RunningProxy) -> None:
    """seconds must be in (0, 300]; only GET/HEAD."""
    async with httpx.AsyncClient() as admin:
        for bad in ("0", "-1", "301", "nan", "inf", "soon"):
            response = await admin.get(proxy.admin_url + f"/netlog?seconds={bad}")
            assert response.status_code == 400, bad
        assert (await admin.post(proxy.admin_url + "/netlog?seconds=1")).status_code == 405
        head = await admin.head(proxy.admin_url + "/netlog?seconds=1")
        assert head.status_code == 200 and head.content == b""
    assert proxy.server.netlog.active is False


# --- cost when nobody captures, bounded memory ---------------------------------------------


async def test_no_event_is_built_while_nobody_captures(proxy: RunningProxy, origin: Origin) -> None:
    """The emit sites check ``netlog.active`` before building anything: requests with no capture
    build no record; the same requests under a capture do."""
    netlog = proxy.server.netlog
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        for _ in range(3):
            assert (await client.get(origin.url("/"))).status_code == 200
        assert (await client.post(origin.url("/"), content=b"x" * 100)).status_code == 200
    await eventually(lambda: len(proxy.access_lines()) == 4)
    assert netlog.built == 0 and not netlog.active
    with netlog.capture() as capture:
        async with httpx.AsyncClient(proxy=proxy.url) as client:
            assert (await client.post(origin.url("/"), content=b"x" * 100)).status_code == 200
        events = await read_capture(capture, "closed")
    assert netlog.built == len(events) > 0
    request = next(iter(by_request(events).values()))
    # The body is pumped by its own task, so its end may be seen after the origin's answer.
    assert [name for name in names(request) if name != "body_sent"] == PLAIN
    (body_sent,) = [e for e in request if e["event"] == "body_sent"]
    assert body_sent["bytes"] == 100 and request.index(body_sent) > PLAIN.index("sent")


async def test_a_slow_consumer_loses_events_not_memory() -> None:
    """emit never waits: beyond its buffer a capture drops and counts, and reports the drops
    in-band; other captures are unaffected."""
    netlog = NetLog()
    with netlog.capture(max_queued=2) as small, netlog.capture(max_queued=100) as large:
        assert netlog.active
        for index in range(5):
            netlog.emit(1, index, "request", url=f"http://a.test/{index}")
        assert small.dropped == 3 and large.dropped == 0
        taken = small.take()
        assert names(taken) == ["request", "request", "netlog_dropped"]
        assert taken[-1]["count"] == 3
        assert small.take() == []  # reported once
        assert len(large.take()) == 5
        assert netlog.dropped == 3
    assert not netlog.active and netlog.dropped == 3
    assert netlog.stats() == {"captures": 0, "built": 5, "dropped": 3}


# --- events of the other paths ----------------------------------------------------------------


async def test_cache_decisions_are_events(
    start_proxy: StartProxy, origin: Origin, tmp_path: Path
) -> None:
    """A miss goes to the network after the cache's fetch decision; the hit after it is served
    with no socket at all, which the summary shows as no connect and no wait."""
    origin.route("/stored", cacheable)
    proxy = await start_proxy(**{"cache.enabled": True, "cache.dir": str(tmp_path / "cache")})
    with proxy.server.netlog.capture() as capture:
        async with httpx.AsyncClient(proxy=proxy.url) as client:
            for _ in range(2):
                response = await client.get(origin.url("/stored"))
                assert response.text == "stored body"
        events = await read_capture(capture, "closed")
    miss, hit = by_request(events).values()
    assert names(miss) == ["request", "cache", *PLAIN[1:]]
    assert miss[1]["action"] == "fetch" and miss[-1]["cache"] == "miss"
    assert names(hit) == ["request", "cache", "completed"]
    assert hit[1] == {**hit[1], "action": "serve", "stored": 1}
    assert hit[-1]["cache"] == "hit"
    times = {r.req: r for r in summarize(events).requests}
    hit_times = times[hit[0]["req"]]
    assert hit_times.connect == 0 and hit_times.wait == 0 and hit_times.reused is None
    assert hit_times.cache == "hit"


async def test_failover_and_failure_events(start_proxy: StartProxy, origin: Origin) -> None:
    """A proxy that refuses is a route_failed event before the next route's socket; a request
    that no route can carry ends with a failed event naming the RFC 9209 error type."""
    dead = free_port()
    proxy = await start_proxy(**{"routing.default": [f"PROXY 127.0.0.1:{dead}", "DIRECT"]})
    with proxy.server.netlog.capture() as capture:
        async with httpx.AsyncClient(proxy=proxy.url) as client:
            assert (await client.get(origin.url("/"))).status_code == 200
            refused = await client.get(f"http://127.0.0.1:{free_port()}/nothing")
            assert refused.status_code == 502
        events = await read_capture(capture, "failed")
    failover, failure = by_request(events).values()
    assert names(failover) == ["request", "route", "socket_failed", "route_failed", *PLAIN[2:]]
    assert failover[1]["routes"] == [f"http://127.0.0.1:{dead}", "DIRECT"]
    for failed_attempt in failover[2:4]:
        assert failed_attempt["route"] == f"http://127.0.0.1:{dead}"
        assert failed_attempt["error"] == "connection_refused"
    assert failover[2]["wait"] >= 0
    assert failover[4]["route"] == "DIRECT"
    assert names(failure) == ["request", "route", "socket_failed", "failed"]
    assert failure[-1]["error"] == "connection_refused" and failure[-1]["status"] == 502


async def test_connect_tunnel_events(start_proxy: StartProxy, origin: Origin) -> None:
    """A CONNECT tunnel: the socket event marks the tunnel up (with its connect wait); completed
    comes when the tunnel ends, with the bytes both ways."""
    proxy = await start_proxy(**{"connect.allowed_ports": [origin.port]})
    with proxy.server.netlog.capture() as capture:
        stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        authority = f"127.0.0.1:{origin.port}".encode()
        await stream.send_all(b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (authority, authority))
        inner = b"GET /x HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % authority
        received = b""
        with trio.fail_after(5):
            while b"200 Connection Established" not in received:
                received += await stream.receive_some(4096)
            await stream.send_all(inner)
            while chunk := await stream.receive_some(4096):
                received += chunk
        await stream.aclose()
        events = await read_capture(capture, "completed")
    assert b'"target": "/x"' in received
    (tunnel,) = by_request(events).values()
    assert names(tunnel) == ["request", "route", "socket", "completed"]
    assert tunnel[0] == {**tunnel[0], "method": "CONNECT", "url": authority.decode()}
    assert tunnel[2]["tunnel"] is True and tunnel[2]["wait"] >= 0
    assert tunnel[-1]["bytes_in"] == len(inner) and tunnel[-1]["bytes_out"] > 0
    split = summarize(events).requests[0]
    assert split.wait == 0 and split.body > 0  # the tunnel's life is its "body"


# --- --netlog FILE and the viewer -----------------------------------------------------------


@asynccontextmanager
async def daemon_with_netlog(workdir: Path, netlog: Path) -> AsyncIterator[tuple[int, int]]:
    """``python -m proxyd --netlog FILE`` on loopback; SIGTERM (a drain) on the way out."""
    port, admin_port = free_port(), free_port()
    argv = [
        sys.executable, "-m", "proxyd",
        "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin_port}",
        "--netlog", str(netlog),
    ]  # fmt: skip
    with (workdir / "stderr").open("wb") as err:
        process = await trio.lowlevel.open_process(argv, stdin=None, stdout=err, stderr=err)
        try:
            with trio.fail_after(15):
                while not (is_listening(port) and is_listening(admin_port)):
                    if process.poll() is not None:
                        pytest.fail((workdir / "stderr").read_text("utf-8", "replace"))
                    await trio.sleep(0.05)
            yield port, admin_port
        finally:
            process.terminate()  # by PID: SIGTERM drains, then the writer flushes
            with trio.CancelScope(shield=True), trio.move_on_after(10) as scope:
                await process.wait()
            if scope.cancelled_caught:
                process.kill()
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await process.wait()
    assert process.returncode == 0, (workdir / "stderr").read_text("utf-8", "replace")


async def test_netlog_file_from_start_up_and_its_summary(
    origin: Origin, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--netlog FILE captures from the first connection to the drain; `proxyd netlog summarize`
    prints each request with its time split, and the slowest first."""

    async def slow(exchange: Exchange) -> None:
        await trio.sleep(0.3)
        await exchange.respond(200, b"late")

    origin.route("/slow", slow)
    path = tmp_path / "trace.jsonl"
    unused = free_port()
    async with (
        daemon_with_netlog(tmp_path, path) as (port, _),
        httpx.AsyncClient(proxy=f"http://127.0.0.1:{port}", timeout=10) as client,
    ):
        assert (await client.get(origin.url("/fast"))).status_code == 200
        assert (await client.get(origin.url("/slow"))).text == "late"
        assert (await client.get(f"http://127.0.0.1:{unused}/down")).status_code == 502
    events, bad = parse_lines(path.read_text("utf-8").splitlines())
    assert bad == 0
    assert events[0]["event"] == "netlog_start" and events[-1]["event"] == "netlog_end"
    accepted = accepted_times(events)
    grouped = by_request(events)
    for events_of_one in grouped.values():
        check_request(events_of_one, accepted)
    fast, slow_events, down = grouped.values()
    assert names(fast) == PLAIN and names(slow_events) == PLAIN
    assert down[-1]["event"] == "failed"
    # The origin's 0.3 s shows as waiting for the first byte.
    assert slow_events[4]["t"] - slow_events[3]["t"] >= 0.3

    assert main(["netlog", "summarize", str(path), "--slowest", "2"]) == 0
    out = capsys.readouterr().out
    print(out, file=sys.stderr)  # shown when the test fails
    # (the start-up probes of daemon_with_netlog were connections too)
    assert out.startswith("3 request(s), ") and " 1 capture(s);" in out
    table = out.split("\n\n")[1].splitlines()
    columns = ["req", "status", "total", "queue", "connect", "wait", "body", "sock", "url"]
    assert table[0].split() == columns
    rows = {row.split()[-1]: row.split() for row in table[1:]}
    assert rows[origin.url("/fast")][1] == "200"
    assert rows[origin.url("/fast")][7] == "new"
    assert rows[origin.url("/slow")][7] == "reused"
    assert rows[f"http://127.0.0.1:{unused}/down"][1:3] == ["502", "connection_refused"]
    slowest = out.split("slowest 2:\n")[1].splitlines()
    assert origin.url("/slow") in slowest[0] and "mostly wait" in slowest[0]
    # The split adds up to the total for every request (times in ms, one decimal).
    for row in table[1:]:
        cells = row.split()
        numbers = cells[2:7] if cells[1] != "502" else cells[3:8]
        total, *parts = (float(n) for n in numbers)
        assert abs(sum(parts) - total) <= 0.25, row


def test_summary_splits_every_kind_of_request() -> None:
    """The viewer, on a hand-written capture: a fresh connection, a cache hit, a failure before
    any socket, and a request the capture cut off. Parts never go negative and add up."""
    lines = [
        '{"t":100.0,"conn":null,"req":null,"event":"netlog_start","epoch":1.0,"pid":1}',
        '{"t":100.0,"conn":1,"req":null,"event":"accepted","peer":"127.0.0.1"}',
        '{"t":100.0,"conn":1,"req":1,"event":"request","method":"GET","url":"http://a/"}',
        '{"t":100.01,"conn":1,"req":1,"event":"route","routes":["DIRECT"],"source":"static"}',
        '{"t":100.05,"conn":1,"req":1,"event":"socket","reused":false,"socket":1,"wait":0.04}',
        '{"t":100.06,"conn":1,"req":1,"event":"sent","body":false}',
        '{"t":100.25,"conn":1,"req":1,"event":"first_byte","status":200}',
        '{"t":100.5,"conn":1,"req":1,"event":"completed","status":200,"cache":"-"}',
        '{"t":101.0,"conn":1,"req":2,"event":"request","method":"GET","url":"http://a/c"}',
        '{"t":101.002,"conn":1,"req":2,"event":"cache","action":"serve","stored":1}',
        '{"t":101.003,"conn":1,"req":2,"event":"completed","status":200,"cache":"hit"}',
        "not json",
        '{"t":102.0,"conn":1,"req":3,"event":"request","method":"GET","url":"http://b/"}',
        '{"t":102.1,"conn":1,"req":3,"event":"failed","status":502,"error":"dns_error"}',
        '{"t":103.0,"conn":1,"req":4,"event":"request","method":"GET","url":"http://c/"}',
        '{"t":103.2,"conn":1,"req":4,"event":"socket","reused":true,"socket":1,"wait":0.0}',
        '{"t":103.4,"conn":null,"req":null,"event":"netlog_dropped","count":7}',
    ]
    events, bad = parse_lines(lines)
    assert bad == 1
    summary = summarize(events, bad)
    fresh, hit, failed, cut = summary.requests
    assert (fresh.queue, fresh.connect, fresh.wait, fresh.body) == pytest.approx(
        (0.01, 0.04, 0.2, 0.25)
    )
    assert fresh.total == pytest.approx(0.5) and fresh.reused is False
    assert (hit.queue, hit.connect, hit.wait, hit.body) == pytest.approx((0.002, 0, 0, 0.001))
    assert failed.queue == pytest.approx(0.1) and failed.total == pytest.approx(0.1)
    assert failed.error == "dns_error" and failed.connect == 0
    assert cut.status == "..." and cut.total == pytest.approx(0.2)
    for r in summary.requests:
        parts = (r.queue, r.connect, r.wait, r.body)
        assert min(parts) >= 0 and sum(parts) == pytest.approx(r.total)
    assert summary.dropped == 7 and summary.connections == 1
    text = render(summary, slowest=1)
    assert "warning: 7 event(s) were dropped" in text
    assert "warning: 1 line(s) were not NetLog events" in text
    assert "slowest 1:\n" in text and "req 1  GET http://a/" in text
    assert "[hit] GET http://a/c" in text and "502 dns_error" in text


def test_summarize_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["netlog", "summarize", str(tmp_path / "missing.jsonl")]) == 1
    assert "cannot read" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["netlog", "summarize", str(empty)]) == 0
    assert "no requests in this capture" in capsys.readouterr().out


async def test_a_malformed_head_is_a_failed_request_of_its_own(proxy: RunningProxy) -> None:
    """A head that never parses still gets a request id: its failed event, with the 400."""
    with proxy.server.netlog.capture() as capture:
        stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        await stream.send_all(b"GET http://a.test/ HTTP/1.1\r\nBad Header\r\n\r\n")
        with trio.fail_after(5):
            assert b" 400 " in await stream.receive_some(4096)
        await stream.aclose()
        events = await read_capture(capture, "failed")
    (failed,) = by_request(events).values()
    assert names(failed) == ["failed"]
    assert failed[0] == {**failed[0], "status": 400, "error": "http_request_error"}
    assert failed[0]["conn"] == events[0]["conn"] and events[0]["event"] == "accepted"

"""Relaying exchanges: framing, 1xx, Expect, trailers, failures and timeouts, with real sockets.

Most tests speak raw bytes to the proxy so they can see exactly what a client receives (each 1xx,
the framing, trailers, a cut connection); httpx is used where a real client's view is the point.
"""

from __future__ import annotations

import contextlib
import json
import socket

import h11
import httpx
import pytest
import trio

from tests.conftest import RunningProxy, StartProxy, eventually
from tests.origin import Exchange, Origin


async def raw_exchange(port: int, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send ``data`` and read until the proxy closes the connection."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    received = bytearray()
    with trio.fail_after(timeout):
        await stream.send_all(data)
        while chunk := await stream.receive_some(65536):
            received += chunk
    await stream.aclose()
    return bytes(received)


class RawClient:
    """A client that reads responses event by event with h11 (so 1xx are visible)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send(self, *events: h11.Event) -> None:
        await self.stream.send_all(b"".join(self.conn.send(e) or b"" for e in events))

    async def next_event(self, timeout: float = 5.0) -> h11.Event | type[h11.PAUSED]:
        with trio.fail_after(timeout):
            while True:
                event = self.conn.next_event()
                if event is h11.NEED_DATA:
                    self.conn.receive_data(await self.stream.receive_some(65536))
                    continue
                return event  # type: ignore[return-value]

    async def response(
        self,
    ) -> tuple[list[h11.InformationalResponse], h11.Response, bytes, list[tuple[bytes, bytes]]]:
        informational: list[h11.InformationalResponse] = []
        body = bytearray()
        while True:
            event = await self.next_event()
            if isinstance(event, h11.InformationalResponse):
                informational.append(event)
            elif isinstance(event, h11.Response):
                final = event
                break
            else:
                raise AssertionError(f"unexpected {event!r}")
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return informational, final, bytes(body), list(event.headers.raw_items())
            else:
                raise AssertionError(f"unexpected {event!r}")


def header(response: h11.Response | h11.InformationalResponse, name: bytes) -> bytes | None:
    for key, value in response.headers:
        if key == name:
            return bytes(value)
    return None


def get(origin: Origin, path: str, *extra: tuple[bytes, bytes]) -> h11.Request:
    return h11.Request(
        method="GET",
        target=origin.url(path),
        headers=[(b"Host", f"127.0.0.1:{origin.port}".encode()), *extra],
    )


# --- informational responses ------------------------------------------------------------------


async def test_every_1xx_is_forwarded_in_order_then_the_final_response(
    proxy: RunningProxy, origin: Origin
) -> None:
    """RFC 9110 §15.2: each 1xx reaches the client, in order, before the final response; the
    per-response bookkeeping (access log, requests_total) counts the final response once."""

    async def hints(exchange: Exchange) -> None:
        await exchange.read_body()
        await exchange.informational(103, [(b"Link", b"</a.css>; rel=preload")])
        await trio.sleep(0.05)
        await exchange.informational(103, [(b"Link", b"</b.js>; rel=preload")])
        await exchange.respond(200, b"done")

    origin.route("/hints", hints)
    client = await RawClient.connect(proxy.port)
    await client.send(get(origin, "/hints"), h11.EndOfMessage())
    informational, final, body, _ = await client.response()
    assert [r.status_code for r in informational] == [103, 103]
    assert [header(r, b"link") for r in informational] == [
        b"</a.css>; rel=preload",
        b"</b.js>; rel=preload",
    ]
    assert final.status_code == 200 and body == b"done"
    await eventually(lambda: len(proxy.access_lines()) >= 1)
    lines = proxy.access_lines()
    assert len(lines) == 1 and " 200 " in lines[0]
    metrics = await admin_metrics(proxy)
    assert (
        'proxyd_requests_total{cache="none",method="GET",route_kind="direct",status_class="2xx"}'
        " 1.0" in metrics
    )
    assert 'status_class="1xx"' not in metrics


async def test_expect_100_continue_waits_for_the_origin(
    proxy: RunningProxy, origin: Origin
) -> None:
    """RFC 9110 §10.1.1: the proxy must not answer 100 itself; the client's body goes up only
    after the origin's 100 is relayed."""
    seen_body: list[bytes] = []

    async def slow_continue(exchange: Exchange) -> None:
        assert exchange.header(b"expect") == b"100-continue"
        await trio.sleep(0.3)
        await exchange.informational(100)
        seen_body.append(await exchange.read_body())
        await exchange.respond(200, b"stored")

    origin.route("/upload", slow_continue)
    client = await RawClient.connect(proxy.port)
    request = h11.Request(
        method="POST",
        target=origin.url("/upload"),
        headers=[
            (b"Host", b"x"),
            (b"Content-Length", b"5"),
            (b"Expect", b"100-continue"),
        ],
    )
    started = trio.current_time()
    await client.send(request)
    event = await client.next_event()
    assert isinstance(event, h11.InformationalResponse) and event.status_code == 100
    assert trio.current_time() - started >= 0.25, "the 100 came from the proxy, not the origin"
    await client.send(h11.Data(data=b"hello"), h11.EndOfMessage())
    event = await client.next_event()
    assert isinstance(event, h11.Response) and event.status_code == 200
    assert seen_body == [b"hello"]


async def test_expect_100_continue_final_answer_without_body(
    proxy: RunningProxy, origin: Origin
) -> None:
    """RFC 9110 §10.1.1: a final status instead of 100 reaches the client, which then need not
    send the body; no 100 is invented on the way."""

    async def refuse(exchange: Exchange) -> None:
        await exchange.respond(413, b"too big", [(b"Connection", b"close")])
        exchange.closed = True

    origin.route("/upload", refuse)
    client = await RawClient.connect(proxy.port)
    await client.send(
        h11.Request(
            method="POST",
            target=origin.url("/upload"),
            headers=[(b"Host", b"x"), (b"Content-Length", b"100000"), (b"Expect", b"100-continue")],
        )
    )
    event = await client.next_event()
    assert isinstance(event, h11.Response) and event.status_code == 413


# --- framing ----------------------------------------------------------------------------------


async def test_chunked_trailers_reach_a_client_that_accepts_them(
    proxy: RunningProxy, origin: Origin
) -> None:
    """RFC 9112 §7.1.2 / RFC 9110 §6.5: trailers are relayed to a client that sent TE: trailers
    and dropped for one that did not."""

    async def with_trailers(exchange: Exchange) -> None:
        await exchange.read_body()
        await exchange.send_event(
            h11.Response(
                status_code=200,
                headers=[(b"Transfer-Encoding", b"chunked"), (b"Trailer", b"X-Digest")],
            )
        )
        await exchange.send_event(h11.Data(data=b"part1-"))
        await exchange.send_event(h11.Data(data=b"part2"))
        await exchange.send_event(h11.EndOfMessage(headers=[(b"X-Digest", b"abc123")]))

    origin.route("/t", with_trailers)
    client = await RawClient.connect(proxy.port)
    await client.send(get(origin, "/t", (b"TE", b"trailers")), h11.EndOfMessage())
    _, final, body, trailers = await client.response()
    assert body == b"part1-part2"
    assert trailers == [(b"X-Digest", b"abc123")]
    assert header(final, b"transfer-encoding") == b"chunked"
    assert origin.requests[0].headers[-3:-1] == [(b"TE", b"trailers"), (b"Connection", b"TE")]

    plain = await RawClient.connect(proxy.port)
    await plain.send(get(origin, "/t"), h11.EndOfMessage())
    _, _, body, trailers = await plain.response()
    assert body == b"part1-part2" and trailers == []


async def test_close_delimited_response_becomes_chunked_for_http11(
    proxy: RunningProxy, origin: Origin
) -> None:
    """RFC 9112 §6.3 item 8: a body delimited by close is relayed whole; the client hop gets
    chunked framing and keeps its connection."""

    async def close_delimited(exchange: Exchange) -> None:
        await exchange.read_body()
        await exchange.send_raw(
            b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + b"x" * 100_000
        )

    origin.route("/old", close_delimited)
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        response = await client.get(origin.url("/old"))
        assert response.status_code == 200
        assert response.content == b"x" * 100_000
        assert response.headers["transfer-encoding"] == "chunked"
        again = await client.get(origin.url("/"))
        assert again.status_code == 200


async def test_head_response_has_no_body(proxy: RunningProxy, origin: Origin) -> None:
    """RFC 9110 §9.3.2: HEAD responses carry Content-Length but no body; keep-alive survives."""

    async def head(exchange: Exchange) -> None:
        await exchange.read_body()
        data = exchange.conn.send(
            h11.Response(status_code=200, headers=[(b"Content-Length", b"1234")])
        )
        data += exchange.conn.send(h11.EndOfMessage())
        await exchange.stream.send_all(data)

    origin.route("/h", head)
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        response = await client.head(origin.url("/h"))
        assert response.status_code == 200 and response.headers["content-length"] == "1234"
        assert (await client.get(origin.url("/"))).status_code == 200


async def test_http10_client_gets_a_close_delimited_body(
    proxy: RunningProxy, origin: Origin
) -> None:
    """RFC 9112 §6.3: an HTTP/1.0 client cannot take chunked; the body ends with the close."""

    async def unknown_length(exchange: Exchange) -> None:
        await exchange.read_body()
        await exchange.send_event(
            h11.Response(status_code=200, headers=[(b"Transfer-Encoding", b"chunked")])
        )
        await exchange.send_event(h11.Data(data=b"streamed"))
        await exchange.send_event(h11.EndOfMessage())

    origin.route("/s", unknown_length)
    data = await raw_exchange(proxy.port, f"GET {origin.url('/s')} HTTP/1.0\r\n\r\n".encode())
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"chunked" not in head.lower()
    assert body == b"streamed"


# --- failures ---------------------------------------------------------------------------------


async def test_origin_dying_mid_body_cuts_the_client_connection(
    proxy: RunningProxy, origin: Origin
) -> None:
    """A truncated body must never look complete: the client connection is closed (RFC 9112 §8)."""

    async def dies(exchange: Exchange) -> None:
        await exchange.read_body()
        await exchange.stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"y" * 400
        )
        await trio.sleep(0.05)
        await exchange.abort()

    async def dies_chunked(exchange: Exchange) -> None:
        await exchange.read_body()
        await exchange.stream.send_all(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )
        await trio.sleep(0.05)
        await exchange.abort()

    origin.route("/dies", dies)
    origin.route("/dies-chunked", dies_chunked)
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        for path in ("/dies", "/dies-chunked"):
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get(origin.url(path))
    await eventually(lambda: len(proxy.access_lines()) == 2)
    assert all("error=http_response_incomplete" in line for line in proxy.access_lines())


@pytest.mark.parametrize(
    ("path", "status", "error_type"),
    [
        ("/refused", 502, "connection_refused"),
        ("/dns", 502, "dns_error"),
    ],
)
async def test_connect_failures_get_proxy_status(
    proxy: RunningProxy, origin: Origin, path: str, status: int, error_type: str
) -> None:
    """RFC 9209 §2.3: each failure names its error type in Proxy-Status."""
    if path == "/refused":
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            closed_port = probe.getsockname()[1]
        url = f"http://127.0.0.1:{closed_port}/"
    else:
        url = "http://unresolvable.test/"
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        response = await client.get(url)
    assert response.status_code == status
    assert f"error={error_type}" in response.headers["proxy-status"]
    assert response.headers["proxy-status"].startswith("proxyd-test;")
    assert error_type in response.text


async def test_connect_timeout_is_504(start_proxy: StartProxy) -> None:
    """RFC 9209 connection_timeout: a SYN that is never answered (full accept backlog)."""
    proxy = await start_proxy(**{"upstream.timeouts.connect": 0.5})
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        fillers = []
        for _ in range(4):  # fill the backlog so further SYNs are dropped
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        await trio.sleep(0.1)
        try:
            async with httpx.AsyncClient(proxy=proxy.url, timeout=10) as client:
                response = await client.get(f"http://127.0.0.1:{port}/")
        finally:
            for filler in fillers:
                filler.close()
    assert response.status_code == 504
    assert "error=connection_timeout" in response.headers["proxy-status"]


async def test_response_head_timeout_is_504(start_proxy: StartProxy, origin: Origin) -> None:
    """RFC 9209 http_response_timeout: no response head within upstream.timeouts.response_head."""
    proxy = await start_proxy(**{"upstream.timeouts.response_head": 0.3})

    async def silent(exchange: Exchange) -> None:
        await trio.sleep(2)

    origin.route("/silent", silent)
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        response = await client.get(origin.url("/silent"))
    assert response.status_code == 504
    assert "error=http_response_timeout" in response.headers["proxy-status"]


async def test_idle_body_read_timeout_cuts_the_response(
    start_proxy: StartProxy, origin: Origin
) -> None:
    """upstream.timeouts.idle_read bounds a stalled body; the client connection is cut."""
    proxy = await start_proxy(**{"upstream.timeouts.idle_read": 0.3})

    async def stalls(exchange: Exchange) -> None:
        await exchange.read_body()
        await exchange.stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await trio.sleep(2)

    origin.route("/stall", stalls)
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(origin.url("/stall"))
    await eventually(lambda: len(proxy.access_lines()) == 1)
    assert any("error=connection_read_timeout" in line for line in proxy.access_lines())


async def test_malformed_response_is_502(proxy: RunningProxy, origin: Origin) -> None:
    """A response that is not HTTP/1.1 gets 502 with a Proxy-Status error type."""

    async def garbage(exchange: Exchange) -> None:
        await exchange.read_body()
        await exchange.send_raw(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")

    origin.route("/garbage", garbage)
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        response = await client.get(origin.url("/garbage"))
    assert response.status_code == 502
    assert "error=http_protocol_error" in response.headers["proxy-status"]


async def test_origin_closing_without_response_is_502(proxy: RunningProxy, origin: Origin) -> None:
    """RFC 9209 http_response_incomplete: the origin accepted and closed without a byte."""

    async def hangs_up(exchange: Exchange) -> None:
        await exchange.abort()

    origin.route("/hangup", hangs_up)
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        response = await client.get(origin.url("/hangup"))
    assert response.status_code == 502
    assert "error=http_response_incomplete" in response.headers["proxy-status"]


async def test_stale_pooled_connection_never_reaches_the_client(
    proxy: RunningProxy, origin: Origin
) -> None:
    """An origin that closes an idle keep-alive connection (without saying so) must not cause
    an error: the idle socket is discarded, or the request retried once on a fresh socket."""

    async def closes_after(exchange: Exchange) -> None:
        await exchange.read_body()
        await exchange.respond(200, b"once")
        await trio.sleep(0.05)
        await exchange.abort()

    origin.route("/once", closes_after)
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        for _ in range(5):
            response = await client.get(origin.url("/once"))
            assert response.status_code == 200 and response.content == b"once"
            await trio.sleep(0.1)
    assert origin.connections == 5


async def test_stale_pooled_connection_race_is_retried(proxy: RunningProxy, origin: Origin) -> None:
    """The race the readability check cannot see: the origin closes right as the request is
    sent. A request without a body is retried once on a fresh socket (counted in metrics)."""

    async def closes_on_second(exchange: Exchange) -> None:
        await exchange.read_body()
        if exchange.connection_id == 1 and len(origin.requests) == 2:
            await exchange.abort()  # read the second request, then hang up without a byte
            return
        await exchange.respond(200, b"ok")

    origin.route("/r", closes_on_second)
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        assert (await client.get(origin.url("/r"))).status_code == 200
        response = await client.get(origin.url("/r"))
    assert response.status_code == 200 and response.content == b"ok"
    assert origin.connections == 2
    assert "proxyd_upstream_retries_total 1.0" in await admin_metrics(proxy)


# --- client-side timeouts ---------------------------------------------------------------------


async def test_slow_head_is_cut_with_408(start_proxy: StartProxy) -> None:
    """Slowloris: a head that trickles in past client.timeouts.head gets 408 and a close."""
    proxy = await start_proxy(**{"client.timeouts.head": 0.4})
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    received = bytearray()
    with trio.fail_after(5):
        for piece in (b"GET http://127.0.0.1/ HTTP/1.1\r\n", b"Host: a\r\n", b"X-Slow: 1\r\n"):
            try:
                await stream.send_all(piece)
            except trio.BrokenResourceError:
                break
            await trio.sleep(0.2)
        while chunk := await stream.receive_some(4096):
            received += chunk
    assert received.startswith(b"HTTP/1.1 408")


async def test_idle_keepalive_client_is_closed(start_proxy: StartProxy, origin: Origin) -> None:
    """client.timeouts.idle closes a keep-alive connection that sends no next request."""
    proxy = await start_proxy(**{"client.timeouts.idle": 0.3})
    client = await RawClient.connect(proxy.port)
    await client.send(get(origin, "/"), h11.EndOfMessage())
    _, final, _, _ = await client.response()
    assert final.status_code == 200
    with trio.fail_after(3):
        assert await client.stream.receive_some(10) == b""


# --- request rules end to end -----------------------------------------------------------------


async def test_origin_form_gets_a_400_that_says_proxy(proxy: RunningProxy) -> None:
    """A request sent to the proxy as if it were the server is told what this port is."""
    data = await raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400")
    assert b"forward proxy" in data


async def test_unsupported_scheme_is_501(proxy: RunningProxy) -> None:
    data = await raw_exchange(
        proxy.port, b"GET ftp://example.test/file HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert data.startswith(b"HTTP/1.1 501")


async def test_via_loop_is_508(proxy: RunningProxy, origin: Origin) -> None:
    """RFC 9110 §7.6.3 + RFC 9209 proxy_loop_detected: our own pseudonym in Via is a loop."""
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        response = await client.get(origin.url("/"), headers={"Via": "1.1 other, 1.1 proxyd-test"})
    assert response.status_code == 508
    assert "error=proxy_loop_detected" in response.headers["proxy-status"]
    assert origin.requests == []


async def test_max_forwards(proxy: RunningProxy, origin: Origin) -> None:
    """RFC 9110 §7.6.2: Max-Forwards 0 on OPTIONS/TRACE is answered by the proxy; otherwise the
    value is decremented; other methods leave it alone."""
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        options = await client.request("OPTIONS", origin.url("/"), headers={"Max-Forwards": "0"})
        assert options.status_code == 200 and "allow" in options.headers
        trace = await client.request(
            "TRACE", origin.url("/t"), headers={"Max-Forwards": "0", "Cookie": "secret=1"}
        )
        assert trace.status_code == 200
        assert trace.headers["content-type"] == "message/http"
        assert trace.content.startswith(f"TRACE {origin.url('/t')} HTTP/1.1".encode())
        assert b"secret" not in trace.content
        assert origin.requests == []
        forwarded = await client.request("OPTIONS", origin.url("/"), headers={"Max-Forwards": "3"})
        assert dict(json.loads(forwarded.content)["headers"])["Max-Forwards"] == "2"
        get_request = await client.get(origin.url("/"), headers={"Max-Forwards": "0"})
        assert dict(json.loads(get_request.content)["headers"])["Max-Forwards"] == "0"


async def test_hop_by_hop_fields_are_removed_both_ways(proxy: RunningProxy, origin: Origin) -> None:
    """RFC 9110 §7.6.1: Connection-named fields and fixed hop-by-hop fields never cross."""

    async def hop(exchange: Exchange) -> None:
        await exchange.read_body()
        await exchange.respond(
            200,
            b"ok",
            [
                (b"Connection", b"X-Secret-Hop"),
                (b"X-Secret-Hop", b"1"),
                (b"Keep-Alive", b"timeout=5"),
                (b"X-End", b"kept"),
            ],
        )

    origin.route("/hop", hop)
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        response = await client.get(
            origin.url("/hop"),
            headers={
                "Connection": "keep-alive, X-Private",
                "X-Private": "p",
                "Keep-Alive": "300",
                "Proxy-Connection": "keep-alive",
                "Upgrade": "h2c",
                "X-Visible": "v",
            },
        )
    assert response.status_code == 200
    assert "x-secret-hop" not in response.headers and "keep-alive" not in response.headers
    assert response.headers["x-end"] == "kept"
    sent = {name.lower() for name, _ in origin.requests[0].headers}
    assert {b"x-private", b"keep-alive", b"proxy-connection", b"upgrade", b"connection"}.isdisjoint(
        sent
    )
    assert b"x-visible" in sent


async def admin_metrics(proxy: RunningProxy) -> str:
    async with httpx.AsyncClient() as client:
        response = await client.get(proxy.admin_url + "/metrics")
    return response.text


# --- response heads split anywhere (the HttpStreamParser lesson) --------------------------------

RESPONSE_WITH_HINTS = (
    b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Order: 1\r\n\r\nhello"
)


async def test_response_split_at_every_byte(proxy: RunningProxy, origin: Origin) -> None:
    """A 1xx and the final head arriving in two pieces, cut at every byte position, give the
    same result: one 103, one 200 with its body; one access-log line and one time-to-first-byte
    observation per final response, never one per fragment or per 1xx."""
    cut_at: list[int] = []

    async def split(exchange: Exchange) -> None:
        await exchange.read_body()
        position = cut_at[-1]
        await exchange.stream.send_all(RESPONSE_WITH_HINTS[:position])
        await trio.sleep(0.002)
        await exchange.stream.send_all(RESPONSE_WITH_HINTS[position:])
        exchange.closed = True

    origin.route("/split", split)
    client = await RawClient.connect(proxy.port)
    positions = range(1, len(RESPONSE_WITH_HINTS))
    for position in positions:
        cut_at.append(position)
        await client.send(get(origin, "/split"), h11.EndOfMessage())
        informational, final, body, _ = await client.response()
        assert [r.status_code for r in informational] == [103], position
        assert final.status_code == 200 and body == b"hello", position
        assert header(final, b"x-order") == b"1"
        client.conn.start_next_cycle()
    await eventually(lambda: len(proxy.access_lines()) == len(positions))
    metrics = await admin_metrics(proxy)
    assert f"proxyd_upstream_time_to_first_byte_seconds_count {float(len(positions))}" in metrics
    assert (
        'proxyd_requests_total{cache="none",method="GET",route_kind="direct",status_class="2xx"}'
        f" {float(len(positions))}" in metrics
    )


async def test_response_trickled_one_byte_at_a_time(proxy: RunningProxy, origin: Origin) -> None:
    """The whole response, 1xx included, one byte per write."""

    async def trickle(exchange: Exchange) -> None:
        await exchange.read_body()
        for index in range(len(RESPONSE_WITH_HINTS)):
            await exchange.stream.send_all(RESPONSE_WITH_HINTS[index : index + 1])
            await trio.sleep(0.001)
        exchange.closed = True

    origin.route("/trickle", trickle)
    client = await RawClient.connect(proxy.port)
    await client.send(get(origin, "/trickle"), h11.EndOfMessage())
    informational, final, body, _ = await client.response()
    assert [r.status_code for r in informational] == [103]
    assert final.status_code == 200 and body == b"hello"


async def test_errors_while_a_body_is_pumped_still_get_an_error_response(
    start_proxy: StartProxy, origin: Origin
) -> None:
    """A request with a body that meets a response timeout gets the same 504 as one without."""
    proxy = await start_proxy(**{"upstream.timeouts.response_head": 0.3})

    async def reads_then_sleeps(exchange: Exchange) -> None:
        await exchange.read_body()
        await trio.sleep(2)

    origin.route("/sleepy", reads_then_sleeps)
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        response = await client.post(origin.url("/sleepy"), content=b"q" * 5000)
    assert response.status_code == 504
    assert "error=http_response_timeout" in response.headers["proxy-status"]


# --- regressions found in review -------------------------------------------------------------


def no_crash(caplog: pytest.LogCaptureFixture) -> bool:
    return not [r for r in caplog.records if "unexpected error" in r.getMessage()]


async def pooled_client(proxy: RunningProxy, origin: Origin) -> trio.SocketStream:
    """A client connection whose upstream socket to the origin is now pooled and idle."""
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    await stream.send_all(f"GET {origin.url('/')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    buffer = b""
    with trio.fail_after(5):
        while b"}" not in buffer:  # the JSON echo body ends with "}"
            buffer += await stream.receive_some(65536)
    return stream


async def read_until_closed(stream: trio.SocketStream, timeout: float = 5.0) -> bytes:
    received = b""
    with trio.fail_after(timeout):
        try:
            while chunk := await stream.receive_some(65536):
                received += chunk
        except trio.BrokenResourceError:
            pass
    return received


async def test_reused_socket_failing_under_a_request_body_is_a_502(
    proxy: RunningProxy, origin: Origin, caplog: pytest.LogCaptureFixture
) -> None:
    """A request with a body cannot be replayed: a pooled socket that dies under it gives the
    client a 502 (not a crashed connection), and the request is logged once."""

    async def hang_up(exchange: Exchange) -> None:
        await exchange.read_body()
        await exchange.abort()

    origin.route("/abort", hang_up)
    stream = await pooled_client(proxy, origin)
    await stream.send_all(
        f"POST {origin.url('/abort')} HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc".encode()
    )
    with trio.fail_after(5):
        answer = await stream.receive_some(65536)
    assert answer.startswith(b"HTTP/1.1 502")
    await eventually(lambda: len(proxy.access_lines()) == 2)
    assert no_crash(caplog)


async def test_non_idempotent_request_is_never_retried(proxy: RunningProxy, origin: Origin) -> None:
    """RFC 9112 §9.3.1: a POST (even without a body) that met a dead pooled socket is not
    replayed by the proxy: the origin sees it once, the client gets a 502."""

    async def hang_up(exchange: Exchange) -> None:
        await exchange.abort()

    origin.route("/abort", hang_up)
    stream = await pooled_client(proxy, origin)
    await stream.send_all(
        f"POST {origin.url('/abort')} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode()
    )
    with trio.fail_after(5):
        answer = await stream.receive_some(65536)
    assert answer.startswith(b"HTTP/1.1 502")
    assert len([r for r in origin.requests if r.method == b"POST"]) == 1


async def test_malformed_body_after_the_response_head_cuts_the_connection(
    proxy: RunningProxy, origin: Origin, caplog: pytest.LogCaptureFixture
) -> None:
    """A chunked upload that turns malformed once the response is under way can no longer get
    a 400: the connection is cut and the request logged with its error type."""

    async def answers_early(exchange: Exchange) -> None:
        await exchange.send_event(
            h11.Response(status_code=200, headers=[(b"Content-Length", b"10")])
        )
        await exchange.send_event(h11.Data(data=b"12345"))
        await trio.sleep(1.0)

    origin.route("/early", answers_early)
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    await stream.send_all(
        f"POST {origin.url('/early')} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        "3\r\nabc\r\n".encode()
    )
    with trio.fail_after(5):
        first = await stream.receive_some(65536)
    assert first.startswith(b"HTTP/1.1 200")
    await stream.send_all(b"zz-not-hex\r\n")
    await read_until_closed(stream)
    await eventually(lambda: len(proxy.access_lines()) == 1)
    assert "error=http_request_error" in proxy.access_lines()[0]
    assert no_crash(caplog)


async def test_http10_client_gets_no_trailers_and_no_1xx(
    proxy: RunningProxy, origin: Origin, caplog: pytest.LogCaptureFixture
) -> None:
    """RFC 9110 §15.2: no 1xx to an HTTP/1.0 client; RFC 9112 §7.1.2: trailers only exist in
    chunked framing, which a 1.0 client cannot take, so they are dropped."""

    async def hints_and_trailers(exchange: Exchange) -> None:
        await exchange.read_body()
        await exchange.informational(103, [(b"Link", b"</a>")])
        await exchange.send_event(
            h11.Response(status_code=200, headers=[(b"Transfer-Encoding", b"chunked")])
        )
        await exchange.send_event(h11.Data(data=b"hello"))
        await exchange.send_event(h11.EndOfMessage(headers=[(b"X-T", b"1")]))

    origin.route("/tr", hints_and_trailers)
    data = await raw_exchange(
        proxy.port, f"GET {origin.url('/tr')} HTTP/1.0\r\nTE: trailers\r\n\r\n".encode()
    )
    assert data.startswith(b"HTTP/1.1 200")
    assert b" 103 " not in data and b"X-T" not in data
    assert data.endswith(b"\r\n\r\nhello")
    assert no_crash(caplog)


async def test_options_without_a_path_is_forwarded_as_asterisk(
    proxy: RunningProxy, origin: Origin
) -> None:
    """RFC 9112 §3.2.4: OPTIONS http://host (no path) is forwarded as OPTIONS *."""
    data = await raw_exchange(
        proxy.port,
        f"OPTIONS {origin.base} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
    )
    assert data.startswith(b"HTTP/1.1 200")
    assert origin.requests[0].target == b"*"


async def test_a_request_is_logged_once_when_the_client_stops_reading(
    start_proxy: StartProxy, origin: Origin
) -> None:
    """A response the proxy writes itself (TRACE with Max-Forwards: 0) to a client that stopped
    reading is accounted once, as client_gone, not once as 200 and again as gone."""
    proxy = await start_proxy(**{"upstream.timeouts.idle_read": 0.3})
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", proxy.port))
    stream = trio.SocketStream(sock)
    request = (
        f"TRACE {origin.base}/ HTTP/1.1\r\nHost: x\r\nMax-Forwards: 0\r\n"
        f"X-Pad: {'a' * 6000}\r\n\r\n"
    ).encode()
    with trio.move_on_after(2):
        try:
            for _ in range(400):
                await stream.send_all(request)
        except trio.BrokenResourceError:
            pass
    await eventually(lambda: any("client_gone" in line for line in proxy.access_lines()))
    await trio.sleep(0.2)
    gone = [line for line in proxy.access_lines() if "client_gone" in line]
    assert len(gone) == 1
    statuses = [line.split()[6] for line in proxy.access_lines()]
    assert set(statuses) == {"200"}  # the one that never arrived says so in error=client_gone
    metrics = await admin_metrics(proxy)
    total = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("proxyd_requests_total{") and 'method="TRACE"' in line
    )
    assert total == len(statuses)
    await stream.aclose()

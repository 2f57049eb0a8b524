"""The fast path (``proxyd.http.fastpath`` and ``relay._forward_fast``): agreement with h11, and
real exchanges that take it, leave it halfway, and mix with h11's on one connection.

The pure part is checked against h11 itself: generated heads (valid ones and near misses: every
stopper field, obs-fold, bare CR/LF, NUL, odd whitespace, other versions and methods) must be
either refused by the fast parser or parsed by it exactly as h11 parses them, and the restated
grammar must accept exactly the field lines and reason phrases h11's expressions accept. The
relay part runs the in-process proxy in front of the scriptable origin (tests/origin.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import h11
import h11._abnf as abnf
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxyd.cache import transaction
from proxyd.http import fastpath, relay
from proxyd.http.rules import prepare_response
from tests.conftest import RunningProxy, StartProxy
from tests.http.test_relay import RawClient
from tests.origin import Exchange, Origin

MAX_HEAD = 65536
VIA = b"1.1 proxyd-test"

# --- the restated grammar against h11's own expressions ----------------------------------------

_h11_field = re.compile(abnf.header_field.encode("ascii")).fullmatch
_h11_status = re.compile(abnf.status_line.encode("ascii")).fullmatch
_ours_field = re.compile(fastpath._FIELD_LINE.encode("ascii")[4:]).fullmatch  # without \r\n

LINE_BYTES = st.lists(
    st.sampled_from(
        [
            b"a",
            b"Z",
            b"-",
            b"1",
            b":",
            b" ",
            b"\t",
            b"\x00",
            b"\r",
            b"\n",
            b"\x0b",
            b"\x0c",
            b"\x80",
            b"\xff",
            b"\x7f",
            b'"',
            b",",
            b"(",
            b"\x1f",
        ]
    ),
    max_size=12,
).map(b"".join)


@given(name=st.sampled_from([b"X", b"x-a", b"", b"a b", b"\x80"]), rest=LINE_BYTES)
def test_field_line_grammar_matches_h11(name: bytes, rest: bytes) -> None:
    line = name + b":" + rest
    assert (_ours_field(line) is not None) == (_h11_field(line) is not None), line


@given(reason=LINE_BYTES)
def test_status_line_grammar_matches_h11(reason: bytes) -> None:
    line = b"HTTP/1.1 200 " + reason
    ours = fastpath._response_head(line)
    assert (ours is not None) == (_h11_status(line) is not None), line


# --- requests ----------------------------------------------------------------------------------


def h11_request(data: bytes) -> h11.Request | None:
    """What h11 makes of ``data`` as one whole request without a body, or None."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    try:
        request = conn.next_event()
        end = conn.next_event()
        after = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    if not isinstance(request, h11.Request) or not isinstance(end, h11.EndOfMessage):
        return None
    assert after is h11.NEED_DATA or after is h11.PAUSED
    return request


def same_request(ours: fastpath.FastRequest, theirs: h11.Request) -> None:
    assert ours.method == theirs.method
    assert ours.target == theirs.target
    assert ours.http_version == theirs.http_version
    assert list(ours.headers.raw_items()) == list(theirs.headers.raw_items())
    assert list(ours.headers) == list(theirs.headers)  # lowercased names, as h11 iterates
    assert len(ours.headers) == len(theirs.headers)


def test_plain_get_is_taken_and_equals_h11s_request() -> None:
    data = (
        b"GET http://example.test/a?b=1 HTTP/1.1\r\nHost: example.test\r\n"
        b"User-Agent:  curl/8  \r\nAccept: */*\r\nConnection: keep-alive\r\n\r\n"
    )
    ours = fastpath.parse_request(data, MAX_HEAD)
    theirs = h11_request(data)
    assert ours is not None and theirs is not None
    same_request(ours, theirs)
    assert (b"User-Agent", b"curl/8") in list(ours.headers.raw_items())


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\nGET http://a/ HTTP/1.1\r\n", "pipelined"),
        (b"GET http://a/ HTTP/1.1\r\nHost: a\r\n", "incomplete"),
        (b"GET http://a/ HTTP/1.0\r\nHost: a\r\n\r\n", "HTTP/1.0"),
        (b"HEAD http://a/ HTTP/1.1\r\nHost: a\r\n\r\n", "not GET"),
        (b"POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n", "not GET"),
        (b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n", "origin form"),
        (b"GET https://a/ HTTP/1.1\r\nHost: a\r\n\r\n", "https target"),
        (b"GET http://a/ HTTP/1.1\r\n\r\n", "no Host"),
        (b"GET http://a/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "two Hosts"),
        (b"GET http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n", "Content-Length"),
        (b"GET http://a/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", "TE"),
        (b"GET http://a/ HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n", "Upgrade"),
        (b"GET http://a/ HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n", "Expect"),
        (b"GET http://a/ HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", "close"),
        (b"GET http://a/ HTTP/1.1\r\nHost: a\r\nConnection: x-foo\r\n\r\n", "named field"),
        (b"GET http://a/ HTTP/1.1\r\nHost: a\r\nX: 1\r\n  2\r\n\r\n", "obs-fold"),
        (b"GET http://a/ HTTP/1.1\r\nHost: a\nX: 1\r\n\r\n", "bare LF"),
        (b"GET http://a/ HTTP/1.1\r\nHost: a\rX: 1\r\n\r\n", "bare CR"),
        (b"GET http://a/ HTTP/1.1\r\nHost : a\r\n\r\n", "space before colon"),
        (b"\r\nGET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n", "leading CRLF"),
    ],
)
def test_requests_outside_the_simple_shape_are_left_to_h11(data: bytes, why: str) -> None:
    assert fastpath.parse_request(data, MAX_HEAD) is None, why


def test_request_longer_than_the_head_limit_is_left_to_h11() -> None:
    data = b"GET http://a/ HTTP/1.1\r\nHost: a\r\nX: " + b"x" * 100 + b"\r\n\r\n"
    assert fastpath.parse_request(data, len(data)) is not None
    assert fastpath.parse_request(data, len(data) - 1) is None


FIELD_NAMES = st.sampled_from(
    [b"Host", b"host", b"Accept", b"X-A", b"Connection", b"Content-Length", b"Transfer-Encoding",
     b"Upgrade", b"Expect", b"TE", b"Via", b"Proxy-Connection", b"Keep-Alive", b"X y", b""]
)  # fmt: skip
FIELD_VALUES = st.one_of(
    st.sampled_from([b"a", b"keep-alive", b"close", b"chunked", b"0", b"12", b" x ", b"", b"a, b"]),
    LINE_BYTES,
)
FIELDS = st.lists(st.tuples(FIELD_NAMES, FIELD_VALUES), max_size=5)
REQUEST_LINES = st.sampled_from(
    [b"GET http://a.test/x HTTP/1.1", b"GET http://a.test HTTP/1.0", b"GET  http://a/ HTTP/1.1",
     b"HEAD http://a/ HTTP/1.1", b"GET http://a/\x00 HTTP/1.1", b"get http://a/ HTTP/1.1",
     b"GET HTTP://A/ HTTP/1.1", b"GET http://a/ HTTP/2.0"]
)  # fmt: skip


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(line=REQUEST_LINES, fields=FIELDS, host_first=st.booleans())
def test_generated_requests_are_refused_or_parsed_as_h11_does(
    line: bytes, fields: list[tuple[bytes, bytes]], host_first: bool
) -> None:
    if host_first:
        fields = [(b"Host", b"a.test"), *fields]
    data = line + b"".join(b"\r\n" + n + b":" + v for n, v in fields) + b"\r\n\r\n"
    ours = fastpath.parse_request(data, MAX_HEAD)
    if ours is None:
        return
    theirs = h11_request(data)
    assert theirs is not None, data  # never accept what h11 refuses
    same_request(ours, theirs)


# --- responses ---------------------------------------------------------------------------------


def h11_response(data: bytes) -> tuple[h11.Response, int] | None:
    """h11's reading of ``data`` as the answer to a GET: the head and the body length."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "a")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    try:
        response = conn.next_event()
        size = 0
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Data):
                size += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                return None  # NEED_DATA: not a whole response
    except h11.RemoteProtocolError:
        return None
    if not isinstance(response, h11.Response):
        return None
    return response, size


def client_view(head: bytes) -> list[tuple[bytes, bytes]]:
    """The fields a client reads from a head we wrote (parsed by h11, lowercased names)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "a")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(head)
    response = conn.next_event()
    assert isinstance(response, h11.Response)
    return [(bytes(n), bytes(v)) for n, v in response.headers]


NGINX = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
    b'Connection: keep-alive\r\nKeep-Alive: timeout=5\r\nETag: "x"\r\n\r\nhello'
)


def test_simple_response_head_is_rewritten_as_the_general_path_does() -> None:
    parsed = fastpath.response_for_client(NGINX, MAX_HEAD, VIA, closing=False)
    assert parsed is not None
    status, head, length, start = parsed
    assert (status, length, NGINX[start:]) == (200, 5, b"hello")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
    fields = client_view(head)
    assert (b"connection", b"keep-alive") not in fields and not any(
        n == b"keep-alive" for n, _ in fields
    )
    assert fields[-1] == (b"via", VIA)
    theirs = h11_response(NGINX)
    assert theirs is not None
    expected = prepare_response(theirs[0].headers.raw_items(), via=VIA)
    assert fields == [(n.lower(), v) for n, v in expected]


def test_draining_adds_connection_close_and_via_can_be_off() -> None:
    parsed = fastpath.response_for_client(NGINX, MAX_HEAD, None, closing=True)
    assert parsed is not None
    fields = client_view(parsed[1])
    assert fields[-1] == (b"connection", b"close")
    assert not any(n == b"via" for n, _ in fields)


def test_status_line_without_reason_gets_its_space() -> None:
    parsed = fastpath.response_for_client(
        b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n", MAX_HEAD, None, closing=False
    )
    assert parsed is not None
    assert parsed[1] == b"HTTP/1.1 200 \r\nContent-Length: 0\r\n\r\n"


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n", "incomplete head"),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\n", "HTTP/1.0"),
        (b"HTTP/1.1 100 Continue\r\n\r\n", "1xx"),
        (b"HTTP/1.1 204 No Content\r\n\r\n", "204"),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n", "304"),
        (b"HTTP/1.1 407 Auth\r\nContent-Length: 0\r\n\r\n", "407"),
        (b"HTTP/1.1 200 OK\r\n\r\n", "close-delimited"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "chunked"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", "two CL"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n", "CL list"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "CL not a number"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 19 + b"\r\n\r\n", "CL too long"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\n", "close"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: x-a\r\nX-A: 1\r\n\r\n", "named"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX: 1\r\n 2\r\n\r\n", "obs-fold"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\nX: 1\r\n\r\n", "bare LF"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX: \x00\r\n\r\n", "NUL"),
        (b"HTTP/1.1 600 Odd\r\nContent-Length: 5\r\n\r\n", "status > 599"),
    ],
)
def test_responses_outside_the_simple_shape_are_left_to_h11(data: bytes, why: str) -> None:
    assert fastpath.response_for_client(data, MAX_HEAD, VIA, closing=False) is None, why


STATUS_LINES = st.sampled_from(
    [b"HTTP/1.1 200 OK", b"HTTP/1.1 404", b"HTTP/1.1 503 Busy now", b"HTTP/1.0 200 OK",
     b"HTTP/1.1 204 No", b"HTTP/1.1 2000 OK", b"HTTP/1.1 200 \x00", b"HTTP/1.1 301 Moved"]
)  # fmt: skip
RESPONSE_FIELD_NAMES = st.sampled_from(
    [b"Content-Length", b"content-length", b"Connection", b"Transfer-Encoding", b"Keep-Alive",
     b"Proxy-Connection", b"TE", b"Trailer", b"Upgrade", b"X-A", b"Set-Cookie", b"Te", b""]
)  # fmt: skip


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    line=STATUS_LINES,
    fields=st.lists(st.tuples(RESPONSE_FIELD_NAMES, FIELD_VALUES), max_size=5),
    length=st.sampled_from([None, 0, 3]),
    body=st.sampled_from([b"", b"abc", b"abcdef"]),
)
def test_generated_responses_are_refused_or_read_as_h11_does(
    line: bytes, fields: list[tuple[bytes, bytes]], length: int | None, body: bytes
) -> None:
    if length is not None:
        fields = [(b"Content-Length", str(length).encode()), *fields]
    head = line + b"".join(b"\r\n" + n + b":" + v for n, v in fields) + b"\r\n\r\n"
    data = head + body
    parsed = fastpath.response_for_client(data, MAX_HEAD, VIA, closing=False)
    if parsed is None:
        return
    status, client_head, content_length, start = parsed
    assert start == len(head)
    theirs = h11_response(head + body.ljust(content_length, b"z")[:content_length])
    assert theirs is not None, data  # never accept what h11 refuses
    response, size = theirs
    assert (status, content_length) == (response.status_code, size)
    expected = prepare_response(response.headers.raw_items(), via=VIA)
    assert client_view(client_head) == [(n.lower(), v) for n, v in expected]


def test_request_head_is_what_h11_writes() -> None:
    headers = [(b"Host", b"a.test"), (b"Accept", b"*/*"), (b"Via", VIA)]
    conn = h11.Connection(h11.CLIENT)
    expected = conn.send(h11.Request(method=b"GET", target=b"/x", headers=headers))
    assert fastpath.request_head(b"GET", b"/x", headers) == expected


# --- through the proxy -------------------------------------------------------------------------


async def get(client: RawClient, url: str) -> tuple[h11.Response, bytes]:
    """One GET over the client's keep-alive connection: the final response and its body."""
    await client.send(
        h11.Request(method="GET", target=url, headers=[("Host", "x")]), h11.EndOfMessage()
    )
    _, response, body, _ = await client.response()
    client.conn.start_next_cycle()
    return response, body


async def test_plain_get_goes_without_h11s_response_reader(
    proxy: RunningProxy, origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the general path's response reader broken, a plain GET still works: it took the fast
    path. (Without the fast path this answers 502.)"""

    async def broken(*args: object) -> None:
        raise AssertionError("the general path was taken")

    monkeypatch.setattr(relay, "_receive_response_head", broken)
    client = await RawClient.connect(proxy.port)
    for _ in range(3):
        response, body = await get(client, origin.url("/x"))
        assert response.status_code == 200
        assert b'"method": "GET"' in body
    assert origin.connections == 1  # one upstream socket, reused by the fast path


async def test_one_connection_mixes_fast_and_general_exchanges(
    proxy: RunningProxy, origin: Origin
) -> None:
    async def chunked(exchange: Exchange) -> None:
        await exchange.send_event(
            h11.Response(status_code=200, headers=[(b"Transfer-Encoding", b"chunked")])
        )
        await exchange.send_event(h11.Data(data=b"chunk"))
        await exchange.send_event(h11.EndOfMessage())

    async def early_hints(exchange: Exchange) -> None:
        await exchange.informational(103, [(b"Link", b"</a.css>; rel=preload")])
        await exchange.respond(200, b"after hints")

    origin.route("/chunked", chunked)
    origin.route("/hints", early_hints)
    client = await RawClient.connect(proxy.port)

    async def exchange(path: str, method: str = "GET", body: bytes = b"") -> tuple[int, bytes, int]:
        headers = [("Host", "x")] + ([("Content-Length", str(len(body)))] if body else [])
        events: list[h11.Event] = [
            h11.Request(method=method, target=origin.url(path), headers=headers)
        ]
        if body:
            events.append(h11.Data(data=body))
        await client.send(*events, h11.EndOfMessage())
        informational, response, got, _ = await client.response()
        client.conn.start_next_cycle()
        return response.status_code, got, len(informational)

    assert (await exchange("/x"))[0] == 200  # fast
    assert await exchange("/chunked") == (200, b"chunk", 0)  # fast request, h11 response
    assert await exchange("/hints") == (200, b"after hints", 1)  # a 1xx: h11 from the first byte
    status, echoed, _ = await exchange("/post", "POST", b"data")  # h11 both ways
    assert status == 200 and b'"body_size": 4' in echoed
    assert (await exchange("/y"))[0] == 200  # fast again
    assert origin.connections == 1
    assert [r.target for r in origin.requests] == [b"/x", b"/chunked", b"/hints", b"/post", b"/y"]


async def test_response_head_in_pieces_is_finished_by_h11(
    proxy: RunningProxy, origin: Origin
) -> None:
    async def slow_head(exchange: Exchange) -> None:
        exchange.conn.send(h11.Response(status_code=200, headers=[(b"Content-Length", b"2")]))
        await exchange.stream.send_all(b"HTTP/1.1 200 OK\r\nConte")
        await trio.sleep(0.05)
        await exchange.stream.send_all(b"nt-Length: 2\r\n\r\nok")
        exchange.conn.send(h11.Data(data=b"ok"))
        exchange.conn.send(h11.EndOfMessage())

    origin.route("/slow", slow_head)
    client = await RawClient.connect(proxy.port)
    for _ in range(2):
        response, body = await get(client, origin.url("/slow"))
        assert (response.status_code, body) == (200, b"ok")
    assert origin.connections == 1


async def test_bytes_past_the_content_length_are_dropped_and_the_socket_retired(
    proxy: RunningProxy, origin: Origin
) -> None:
    async def overlong(exchange: Exchange) -> None:
        await exchange.send_raw(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n"
        )

    origin.route("/overlong", overlong)
    client = await RawClient.connect(proxy.port)
    response, body = await get(client, origin.url("/overlong"))
    assert (response.status_code, body) == (200, b"ok")
    response, _ = await get(client, origin.url("/x"))
    assert response.status_code == 200
    assert origin.connections == 2  # the out-of-step socket was not reused


async def test_fast_request_that_fails_gets_an_error_response_and_the_connection_goes_on(
    proxy: RunningProxy, origin: Origin
) -> None:
    async def vanish(exchange: Exchange) -> None:
        await exchange.abort()

    origin.route("/vanish", vanish)
    client = await RawClient.connect(proxy.port)
    response, _ = await get(client, origin.url("/vanish"))
    assert response.status_code == 502
    assert b"error=http_response_incomplete" in dict(response.headers)[b"proxy-status"]
    response, _ = await get(client, origin.url("/x"))
    assert response.status_code == 200


async def test_body_cut_short_cuts_the_client_connection(
    proxy: RunningProxy, origin: Origin
) -> None:
    async def short(exchange: Exchange) -> None:
        await exchange.send_raw(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")

    origin.route("/short", short)
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    await stream.send_all(b"GET " + origin.url("/short").encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    received = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some(65536):
            received += chunk
    await stream.aclose()
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert received.endswith(b"\r\n\r\nabc")  # 3 of 10 bytes, then the connection is cut


async def test_hop_by_hop_fields_go_and_via_comes_on_the_fast_path(
    start_proxy: StartProxy, origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def hop(exchange: Exchange) -> None:
        await exchange.respond(
            200,
            b"x",
            [(b"Connection", b"keep-alive"), (b"Keep-Alive", b"timeout=5"),
             (b"Proxy-Connection", b"keep-alive"), (b"Upgrade", b"h2c"), (b"X-Kept", b"yes")],
        )  # fmt: skip

    async def broken(*args: object) -> None:
        raise AssertionError("the general path was taken")

    origin.route("/hop", hop)
    proxy = await start_proxy()
    monkeypatch.setattr(relay, "_receive_response_head", broken)
    client = await RawClient.connect(proxy.port)
    response, body = await get(client, origin.url("/hop"))
    names = [n for n, _ in response.headers]
    assert body == b"x"
    assert b"keep-alive" not in names and b"proxy-connection" not in names
    assert b"upgrade" not in names and b"connection" not in names
    assert (b"x-kept", b"yes") in list(response.headers)
    assert dict(response.headers)[b"via"].startswith(b"1.1 ")


async def test_a_memory_hit_for_a_fast_request_is_written_without_h11(
    start_proxy: StartProxy, origin: Origin, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With the cache on, a fast-path GET answered from the memory tier goes out as the bytes
    h11 would write, without h11 ever seeing the request; the connection goes on as usual."""

    async def cacheable(exchange: Exchange) -> None:
        await exchange.respond(200, b"stored body", [(b"Cache-Control", b"max-age=3600")])

    origin.route("/c", cacheable)
    proxy = await start_proxy(**{"cache.enabled": True, "cache.dir": str(tmp_path / "cache")})
    client = await RawClient.connect(proxy.port)
    response, body = await get(client, origin.url("/c"))  # a miss: stored
    assert (response.status_code, body) == (200, b"stored body")
    with trio.fail_after(5):
        while True:  # the store commits after the client has the response
            response, body = await get(client, origin.url("/c"))
            if b"hit" in dict(response.headers).get(b"cache-status", b""):
                break
            await trio.sleep(0.02)

    def h11_touched(*args: object) -> None:
        raise AssertionError("h11 was asked for the request")

    monkeypatch.setattr(transaction, "_consume_request_end", h11_touched)
    for _ in range(2):
        response, body = await get(client, origin.url("/c"))
        assert (response.status_code, body) == (200, b"stored body")
        assert b"hit" in dict(response.headers)[b"cache-status"]
        assert dict(response.headers)[b"content-length"] == b"11"
    assert len(origin.requests) == 1


def test_response_head_is_what_h11_writes() -> None:
    headers = [(b"Content-Length", b"3"), (b"Host", b"odd"), (b"Cache-Status", b"x; hit")]
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    conn.next_event()
    conn.next_event()
    expected = conn.send(h11.Response(status_code=200, reason=b"OK", headers=headers))
    assert fastpath.response_head(200, b"OK", headers) == expected

"""The origin hop's upgrade written and its 101 read without h11 (``upgrade.request_head``,
``upgrade.parse_switch``), checked against h11 itself: the same bytes out, the same fields and
trailing bytes in, and None (h11 takes over) for everything outside the shared subset. Then the
h11 fallback through the daemon: a 101 after a 100, in pieces."""

from __future__ import annotations

import base64
import hashlib

import h11
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from proxyd.websocket.upgrade import parse_switch, request_head
from tests.conftest import StartProxy
from tests.websocket.clients import CONNECT, raw_open, read_head, upgrade_request
from tests.websocket.test_tunnel_peek import tcp_server

TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
#: Field-value bytes (RFC 9110 §5.5: VCHAR and obs-text), no whitespace.
VCHARS = [bytes([b]) for b in range(0x21, 0x7F)] + [bytes([b]) for b in range(0x80, 0x100)]

names = st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=12).map(str.encode)
words = st.lists(st.sampled_from(VCHARS), min_size=1, max_size=6).map(b"".join)
values = st.lists(words, max_size=4).map(b" ".join)  # runs of VCHAR split by single spaces
others = st.lists(
    st.tuples(names, values).filter(
        lambda field: field[0].lower() not in (b"host", b"content-length", b"transfer-encoding")
    ),
    max_size=8,
)


def h11_request(path: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    conn = h11.Connection(h11.CLIENT)
    data = conn.send(h11.Request(method=b"GET", target=path, headers=headers))
    assert data is not None
    end = conn.send(h11.EndOfMessage())
    return data + (end or b"")


def h11_switch(data: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=b"GET", target=b"/", headers=[(b"Host", b"x"), *UPGRADE]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    event = conn.next_event()
    assert type(event) is h11.InformationalResponse and event.status_code == 101
    return list(event.headers.raw_items()), bytes(conn.trailing_data[0])


UPGRADE = [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")]


#: A request target is VCHAR only (no obs-text).
targets = st.text(alphabet=[chr(c) for c in range(0x21, 0x7F)], max_size=20).map(
    lambda path: b"/" + path.encode()
)


@given(before=others, after=others, host=values.filter(bool), target=targets)
def test_request_head_writes_what_h11_writes(
    before: list[tuple[bytes, bytes]],
    after: list[tuple[bytes, bytes]],
    host: bytes,
    target: bytes,
) -> None:
    headers = [*before, (b"Host", host), *after]  # h11 writes Host first wherever it is
    assert request_head(target, headers) == h11_request(target, headers)


@pytest.mark.parametrize(
    "headers",
    [
        [(b"X-A", b"1")],  # no Host: h11 refuses
        [(b"Host", b"a"), (b"host", b"b")],  # two
        [(b"Host", b"a"), (b"X-A", b" padded")],  # h11 refuses the whitespace
        [(b"Host", b"a"), (b"X-A", b"a\r\nX-B: b")],  # a field smuggled in a value
        [(b"Host", b"a"), (b"X A", b"1")],  # not a token
        [(b"Host", b"a"), (b"Content-Length", b"0")],  # framing: h11 decides
    ],
)
def test_request_head_leaves_to_h11_what_it_may_refuse(headers: list[tuple[bytes, bytes]]) -> None:
    assert request_head(b"/", headers) is None


@given(
    fields=st.lists(
        st.tuples(
            st.binary(max_size=6) | names,
            st.binary(max_size=8) | values | st.sampled_from([b"a\r\nX: b", b"a\n", b" a"]),
        ),
        max_size=5,
    )
)
def test_request_head_never_writes_what_h11_would_not(fields: list[tuple[bytes, bytes]]) -> None:
    """Any fields at all: either exactly h11's bytes, or None (h11's turn)."""
    headers = [(b"Host", b"example.test"), *fields]
    ours = request_head(b"/", headers)
    try:
        theirs: bytes | None = h11_request(b"/", headers)
    except h11.LocalProtocolError:
        theirs = None
    if ours is not None:
        assert ours == theirs


def test_request_head_refuses_a_target_h11_refuses() -> None:
    assert request_head(b"/a b", [(b"Host", b"a")]) is None
    with pytest.raises(h11.LocalProtocolError):
        h11_request(b"/a b", [(b"Host", b"a")])


ows = st.sampled_from([b"", b" ", b"\t", b"  \t"])


@given(
    fields=st.lists(st.tuples(names, ows, values, ows), max_size=8),
    reason=st.sampled_from([b"", b" Switching Protocols", b" ", b" \x01odd\tone"]),
    rest=st.binary(max_size=40),
)
def test_parse_switch_reads_what_h11_reads(
    fields: list[tuple[bytes, bytes, bytes, bytes]], reason: bytes, rest: bytes
) -> None:
    fields = [f for f in fields if f[0].lower() not in (b"content-length", b"transfer-encoding")]
    head = (
        b"HTTP/1.1 101"
        + reason
        + b"".join(
            b"\r\n" + name + b":" + left + value + right for name, left, value, right in fields
        )
    )
    data = head + b"\r\n\r\n" + rest
    assert parse_switch(data) == h11_switch(data)


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n",  # not complete yet
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 101 OK\r\n\r\n",  # an interim answer first
        b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n",  # a final answer
        b"HTTP/1.0 101 OK\r\n\r\n",
        b"HTTP/1.1 101 OK\r\nX-A: 1\r\n  folded\r\n\r\n",  # obs-fold: h11 joins the lines
        b"HTTP/1.1 101 OK\nUpgrade: websocket\n\n",  # bare LF: h11 reads it its own way
        b"HTTP/1.1 101 OK\r\nX-A: a\nb\r\n\r\n",
        b"HTTP/1.1 101 OK\r\nContent-Length: 5\r\n\r\n",  # framing: h11 checks it
        b"HTTP/1.1 101 OK\r\nBad Name: 1\r\n\r\n",
        b"HTTP/1.1 101 OK\r\nX-A: \x00\r\n\r\n",
    ],
)
def test_parse_switch_leaves_everything_else_to_h11(data: bytes) -> None:
    assert parse_switch(data) is None


def accept_for(request: bytes) -> bytes:
    key = next(
        line.split(b":", 1)[1].strip()
        for line in request.split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-key:")
    )
    digest = hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
    return base64.b64encode(digest)


async def test_a_101_after_a_100_and_in_pieces_goes_through_h11(
    start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """The origin answers ``100 Continue``, then the 101 a few bytes at a time, with a frame
    right behind it: h11 reads it all, and the frame reaches the client."""

    async def origin(stream: trio.SocketStream) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            request += await stream.receive_some(4096)
        answer = (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 101 Switching Protocols\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: "
            + accept_for(request)
            + b"\r\n\r\n\x81\x02hi"
        )
        for start in range(0, len(answer), 7):
            await stream.send_all(answer[start : start + 7])
            await trio.sleep(0.001)
        await stream.receive_some(4096)  # until the client's Close or EOF

    port = await tcp_server(nursery, origin)
    proxy = await start_proxy(**{"connect.allowed_ports": [port]})
    with trio.fail_after(5):
        stream = await raw_open(CONNECT, proxy.port, port)
        await stream.send_all(upgrade_request(CONNECT, port, "/ws"))
        head, rest = await read_head(stream)
        assert head.startswith(b"HTTP/1.1 101"), head
        while len(rest) < 4:
            rest += await stream.receive_some(100)
        assert rest == b"\x81\x02hi"  # relayed as a text frame (unmasked: proxyd is the server)
        await stream.aclose()

"""Request smuggling and bad framing, sent over raw sockets to the in-process proxy.

Each malformed request carries a second request aimed at ``/smuggled``; the proxy must answer the
first with a 4xx/5xx (RFC 9112 §6.3, §2.2, §5.2, RFC 9110 §5.5), close the connection, and the
origin must never see ``/smuggled``. Valid requests split at every byte and pipelined requests
check the other side: correct framing is never mistaken for an attack.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio

from tests.conftest import RunningProxy, StartProxy
from tests.origin import Origin

WAIT = 5.0


@dataclass
class RawResponse:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def json(self) -> Any:
        return json.loads(self.body)


class RawClient:
    """A raw TCP client: bytes go out as given; responses are parsed by hand (status line, fields,
    Content-Length / chunked / until-close body), every wait bounded by ``WAIT`` seconds."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.eof = False
        self.send_failed = False

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        with trio.fail_after(WAIT):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        return cls(stream)

    async def send(self, data: bytes) -> None:
        """Send ``data``; a peer that already closed is recorded (``send_failed``), not raised, so
        the response it sent before closing can still be read."""
        if self.send_failed:
            return
        try:
            with trio.fail_after(WAIT):
                await self.stream.send_all(data)
        except trio.BrokenResourceError:
            self.send_failed = True

    async def aclose(self) -> None:
        with trio.move_on_after(WAIT):
            await self.stream.aclose()

    async def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            with trio.fail_after(WAIT):
                data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:  # a reset is a close too
            data = b""
        if not data:
            self.eof = True
            return False
        self.buffer += data
        return True

    async def _read_until(self, marker: bytes) -> bytes:
        while (index := self.buffer.find(marker)) < 0:
            if not await self._fill():
                raise AssertionError(f"connection closed before {marker!r}: {bytes(self.buffer)!r}")
        out = bytes(self.buffer[: index + len(marker)])
        del self.buffer[: index + len(marker)]
        return out

    async def _read_exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not await self._fill():
                raise AssertionError(f"connection closed {size - len(self.buffer)} bytes short")
        out = bytes(self.buffer[:size])
        del self.buffer[:size]
        return out

    async def read_response(self, method: bytes = b"GET") -> RawResponse | None:
        """The next final response (1xx skipped), or None if the connection closed first."""
        while True:
            if not self.buffer and not await self._fill():
                return None
            head = await self._read_until(b"\r\n\r\n")
            lines = head[:-4].split(b"\r\n")
            version, status, reason = [*lines[0].split(b" ", 2), b""][:3]
            assert version == b"HTTP/1.1", lines[0]
            response = RawResponse(int(status), reason)
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                response.headers.append((name, value.strip()))
            if 100 <= response.status < 200:
                continue
            break
        length = response.header(b"content-length")
        chunked = (response.header(b"transfer-encoding") or b"").lower() == b"chunked"
        if method == b"HEAD" or response.status in (204, 304):
            return response
        if chunked:
            body = bytearray()
            while True:
                size_line = await self._read_until(b"\r\n")
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    while await self._read_until(b"\r\n") != b"\r\n":
                        pass  # trailer fields
                    break
                body += await self._read_exactly(size)
                await self._read_exactly(2)
            response.body = bytes(body)
        elif length is not None:
            response.body = await self._read_exactly(int(length))
        else:
            while await self._fill():
                pass
            response.body = bytes(self.buffer)
            self.buffer.clear()
        return response

    async def read_rest(self) -> bytes:
        """Everything the peer sends until it closes (fails after ``WAIT`` if it never does)."""
        while await self._fill():
            pass
        rest = bytes(self.buffer)
        self.buffer.clear()
        return rest


def fill(template: str, origin: Origin) -> bytes:
    return template.format(base=origin.base, host=f"127.0.0.1:{origin.port}").encode("latin-1")


SMUGGLED = "GET {base}/smuggled HTTP/1.1\r\nHost: {host}\r\n\r\n"
SMUGGLED_ORIGIN_FORM = "GET /smuggled HTTP/1.1\r\nHost: {host}\r\n\r\n"


async def settle() -> None:
    """Give a request the proxy might (wrongly) have forwarded time to reach the origin."""
    await trio.sleep(0.05)


def assert_not_smuggled(origin: Origin, max_requests: int) -> None:
    targets = [seen.target for seen in origin.requests]
    assert len(origin.requests) <= max_requests, targets
    assert not any(b"/smuggled" in target for target in targets), targets


async def send_and_read_one(port: int, data: bytes) -> tuple[RawResponse | None, bytes]:
    """Send ``data``, read one response, then whatever follows until the proxy closes."""
    client = await RawClient.connect(port)
    try:
        await client.send(data)
        response = await client.read_response()
        rest = await client.read_rest()
    finally:
        await client.aclose()
    return response, rest


@dataclass(frozen=True)
class Attack:
    id: str
    template: str
    statuses: frozenset[int]
    #: requests the origin may see: 0 when the head itself is refused, 1 when the head is valid
    #: and forwarded before the body turns out to be malformed
    max_origin_requests: int = 0


def attack(
    ident: str, template: str, statuses: set[int] | None = None, max_origin: int = 0
) -> Attack:
    return Attack(ident, template, frozenset(statuses or {400}), max_origin)


POST = "POST {base}/a HTTP/1.1\r\nHost: {host}\r\n"
_CHUNKED_THEN_SMUGGLED = "0\r\n\r\n" + SMUGGLED

ATTACKS: list[Attack] = [
    # RFC 9112 §6.1 / §6.3 item 3: Content-Length and Transfer-Encoding together (CL.TE / TE.CL)
    attack(
        "cl-te",
        POST + "Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n" + _CHUNKED_THEN_SMUGGLED,
    ),
    attack(
        "te-cl",
        POST + "Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n" + _CHUNKED_THEN_SMUGGLED,
    ),
    attack(
        "cl-te-origin-form-body",
        POST
        + "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        + "0\r\n\r\n"
        + SMUGGLED_ORIGIN_FORM,
    ),
    attack(
        "te-uppercase-cl",
        POST + "Content-Length: 0\r\nTransfer-Encoding: CHUNKED\r\n\r\n" + _CHUNKED_THEN_SMUGGLED,
    ),
    # RFC 9112 §6.3 item 5: differing Content-Length values are unrecoverable
    attack(
        "two-content-lengths",
        POST + "Content-Length: 0\r\nContent-Length: 48\r\n\r\n" + SMUGGLED,
    ),
    attack("content-length-list", POST + "Content-Length: 5, 6\r\n\r\nhello!" + SMUGGLED),
    attack("content-length-plus", POST + "Content-Length: +5\r\n\r\nhello" + SMUGGLED),
    attack("content-length-hex", POST + "Content-Length: 0x5\r\n\r\nhello" + SMUGGLED),
    # RFC 9112 §7.1: malformed chunk sizes (the head itself is valid and may be forwarded)
    attack(
        "bad-chunk-size",
        POST + "Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n" + _CHUNKED_THEN_SMUGGLED,
        max_origin=1,
    ),
    attack(
        "chunk-size-overflow",
        POST
        + "Transfer-Encoding: chunked\r\n\r\n"
        + "F" * 34
        + "\r\nhello\r\n"
        + _CHUNKED_THEN_SMUGGLED,
        max_origin=1,
    ),
    attack(
        "chunk-size-negative",
        POST + "Transfer-Encoding: chunked\r\n\r\n-1\r\nhello\r\n" + _CHUNKED_THEN_SMUGGLED,
        max_origin=1,
    ),
    # RFC 9112 §6.1: a transfer coding we do not implement is a 501 ...
    attack(
        "te-gzip-chunked",
        POST + "Transfer-Encoding: gzip, chunked\r\n\r\n" + _CHUNKED_THEN_SMUGGLED,
        {501},
    ),
    # ... and chunked that is not the final coding is a 400 (RFC 9112 §6.3 item 4)
    attack(
        "te-chunked-gzip",
        POST + "Transfer-Encoding: chunked, gzip\r\n\r\n" + _CHUNKED_THEN_SMUGGLED,
    ),
    # RFC 9112 §6.1: chunked MUST NOT be applied more than once
    attack(
        "te-chunked-twice-lines",
        POST
        + "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
        + _CHUNKED_THEN_SMUGGLED,
        {400, 501},
    ),
    attack(
        "te-chunked-chunked",
        POST + "Transfer-Encoding: chunked, chunked\r\n\r\n" + _CHUNKED_THEN_SMUGGLED,
        {400, 501},
    ),
    # RFC 9112 §2.2: bare LF line endings
    attack(
        "bare-lf-everywhere",
        "POST {base}/a HTTP/1.1\nHost: {host}\nContent-Length: 48\n\n" + SMUGGLED,
    ),
    attack(
        "bare-lf-hides-te",
        POST + "X-Pad: a\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
        "0\r\n\r\n" + SMUGGLED,
    ),
    attack("bare-lf-terminator", POST + "Content-Length: 48\r\n\n" + SMUGGLED),
    # RFC 9112 §2.2 / RFC 9110 §5.5: a bare CR is not a line ending and not field content
    attack(
        "bare-cr-in-field",
        POST + "X-Pad: a\rTransfer-Encoding: chunked\r\n\r\n" + _CHUNKED_THEN_SMUGGLED,
    ),
    attack("bare-cr-in-request-line", "GET {base}/a\r HTTP/1.1\r\nHost: {host}\r\n\r\n" + SMUGGLED),
    # RFC 9112 §5.2: obs-fold
    attack(
        "obs-fold-te",
        POST + "Transfer-Encoding:\r\n chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n" + SMUGGLED,
    ),
    attack("obs-fold-tab", POST + "X-Pad: a\r\n\tb\r\nContent-Length: 0\r\n\r\n" + SMUGGLED),
    attack("space-before-first-field", POST.replace("\r\nHost", "\r\n Host") + "\r\n" + SMUGGLED),
    # RFC 9110 §5.5: NUL (and other CTLs) in field values
    attack("nul-in-field", POST + "X-Pad: a\x00b\r\nContent-Length: 0\r\n\r\n" + SMUGGLED),
    attack("nul-in-name", POST + "X-P\x00ad: a\r\nContent-Length: 0\r\n\r\n" + SMUGGLED),
    # RFC 9112 §5.1: no whitespace between field name and colon
    attack(
        "space-before-colon-te",
        POST + "Transfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n" + SMUGGLED,
    ),
    attack(
        "space-before-colon-cl",
        POST + "Content-Length : 48\r\n\r\n" + SMUGGLED,
    ),
    attack("tab-before-colon", POST + "Content-Length\t: 48\r\n\r\n" + SMUGGLED),
    # RFC 9112 §3: request-line = method SP request-target SP HTTP-version
    attack("two-spaces-request-line", "GET  {base}/smuggled HTTP/1.1\r\nHost: {host}\r\n\r\n"),
    attack("two-spaces-before-version", "GET {base}/smuggled  HTTP/1.1\r\nHost: {host}\r\n\r\n"),
    attack("missing-version", "GET {base}/smuggled\r\nHost: {host}\r\n\r\n"),
    attack("tab-separator", "GET\t{base}/smuggled HTTP/1.1\r\nHost: {host}\r\n\r\n"),
    attack("space-in-target", "GET {base}/a /smuggled HTTP/1.1\r\nHost: {host}\r\n\r\n"),
]


@pytest.mark.parametrize("case", ATTACKS, ids=[a.id for a in ATTACKS])
async def test_smuggling_pattern_is_refused_and_connection_closed(
    proxy: RunningProxy, origin: Origin, case: Attack
) -> None:
    """RFC 9112 §6.3 (ambiguous or invalid framing: 400 and close), §6.1 (CL with TE; unknown or
    repeated transfer codings: 501/400), §7.1 (chunk-size), §2.2 (bare LF / CR), §5.2 (obs-fold),
    §5.1 (no whitespace before the colon), §3 (request-line syntax), RFC 9110 §5.5 (no NUL):
    the proxy answers once with an error, closes the connection (RFC 9112 §9.6), and the second
    request hidden behind the first never reaches the origin."""
    response, rest = await send_and_read_one(proxy.port, fill(case.template, origin))
    assert response is not None, "the proxy closed without answering"
    assert response.status in case.statuses, (response.status, response.body)
    assert rest == b"", f"bytes after the error response (a second response?): {rest!r}"
    await settle()
    assert_not_smuggled(origin, case.max_origin_requests)


async def test_oversized_head_is_431_and_closed(start_proxy: StartProxy, origin: Origin) -> None:
    """RFC 6585 §5 (431 Request Header Fields Too Large) and RFC 9112 §2.3 (a server that
    receives a head larger than it is willing to process answers 4xx): a head over
    ``client.max_head_size`` is refused, the connection closed, and nothing reaches the origin."""
    proxy = await start_proxy(**{"client.max_head_size": 2048})
    head = fill(POST + "X-Pad: " + "a" * 3000 + "\r\nContent-Length: 48\r\n\r\n" + SMUGGLED, origin)
    response, rest = await send_and_read_one(proxy.port, head)
    assert response is not None
    assert response.status == 431
    assert rest == b""
    await settle()
    assert_not_smuggled(origin, 0)


async def test_endless_head_is_431_without_waiting_for_its_end(
    start_proxy: StartProxy, origin: Origin
) -> None:
    """RFC 6585 §5, RFC 9112 §2.3: a head that has not ended within ``client.max_head_size``
    bytes is refused as soon as the limit is passed (the proxy does not wait for an end that may
    never come)."""
    proxy = await start_proxy(**{"client.max_head_size": 2048})
    client = await RawClient.connect(proxy.port)
    try:
        await client.send(fill(POST + "X-Pad: " + "a" * 3000, origin))
        response = await client.read_response()
        assert response is not None
        assert response.status == 431
        assert await client.read_rest() == b""
    finally:
        await client.aclose()
    assert origin.requests == []


async def test_head_exactly_at_the_limit_is_accepted(
    start_proxy: StartProxy, origin: Origin
) -> None:
    """RFC 9112 §2.3: the limit is inclusive: a head of exactly ``client.max_head_size`` bytes is
    a normal request."""
    proxy = await start_proxy(**{"client.max_head_size": 2048})
    start = fill("GET {base}/limit HTTP/1.1\r\nHost: {host}\r\nX-Pad: ", origin)
    head = start + b"a" * (2048 - len(start) - 4) + b"\r\n\r\n"
    assert len(head) == 2048
    client = await RawClient.connect(proxy.port)
    try:
        await client.send(head)
        response = await client.read_response()
    finally:
        await client.aclose()
    assert response is not None
    assert response.status == 200
    assert [seen.target for seen in origin.requests] == [b"/limit"]


async def test_pipelined_bare_lf_request_is_refused_after_a_valid_one(
    proxy: RunningProxy, origin: Origin
) -> None:
    """RFC 9112 §9.3.2 (pipelined requests are answered in order) and §2.2 (bare LF): the valid
    first request gets its 200, the second (bare LF) one a 400, then the connection closes and the
    origin sees only the first."""
    data = fill(
        "GET {base}/first HTTP/1.1\r\nHost: {host}\r\n\r\n"
        "GET {base}/smuggled HTTP/1.1\nHost: {host}\n\n",
        origin,
    )
    client = await RawClient.connect(proxy.port)
    try:
        await client.send(data)
        first = await client.read_response()
        second = await client.read_response()
        rest = await client.read_rest()
    finally:
        await client.aclose()
    assert first is not None and first.status == 200
    assert first.json()["target"] == "/first"
    assert second is not None and second.status == 400
    assert rest == b""
    await settle()
    assert [seen.target for seen in origin.requests] == [b"/first"]


async def test_body_that_looks_like_a_request_is_just_a_body(
    proxy: RunningProxy, origin: Origin
) -> None:
    """RFC 9112 §6.2 / §6.3 item 6: with only Content-Length, exactly that many bytes are the body,
    whatever they look like; they reach the origin as body, never as a request of their own."""
    body = fill(SMUGGLED, origin)
    data = fill(POST + f"Content-Length: {len(body)}\r\n\r\n", origin) + body
    client = await RawClient.connect(proxy.port)
    try:
        await client.send(data)
        response = await client.read_response()
    finally:
        await client.aclose()
    assert response is not None and response.status == 200
    assert response.json()["body_size"] == len(body)
    await settle()
    assert [seen.target for seen in origin.requests] == [b"/a"]


async def test_connection_naming_content_length_does_not_desync(
    proxy: RunningProxy, origin: Origin
) -> None:
    """RFC 9110 §7.6.1 (a Connection option must not name a field meant for all recipients) and
    RFC 9112 §6.3: listing Content-Length in Connection must not make the proxy forward the body
    unframed or treat it as a new request: either the body arrives intact (200) or the request is
    refused (400); ``/smuggled`` never reaches the origin and the proxy keeps serving."""
    body = fill(SMUGGLED_ORIGIN_FORM, origin)
    data = fill(POST + f"Connection: Content-Length\r\nContent-Length: {len(body)}\r\n\r\n", origin)
    client = await RawClient.connect(proxy.port)
    try:
        await client.send(data + body)
        response = await client.read_response()
    finally:
        await client.aclose()
    assert response is not None, "the proxy closed without answering"
    assert response.status in (200, 400), (response.status, response.body)
    if response.status == 200:
        assert response.json()["body_size"] == len(body)
    await settle()
    assert_not_smuggled(origin, 1)
    response, _ = await send_and_read_one(
        proxy.port,
        fill("GET {base}/after HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n", origin),
    )
    assert response is not None and response.status == 200


# --- valid requests however they are segmented -----------------------------------------------

GET_REQUEST = "GET {base}/split?q=1 HTTP/1.1\r\nHost: {host}\r\nX-A: b\r\n\r\n"
CHUNKED_POST = (
    "POST {base}/split HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n"
    "5;ext=1\r\nhello\r\n3\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n"
)
CL_POST = "POST {base}/split HTTP/1.1\r\nHost: {host}\r\nContent-Length: 8\r\n\r\nhelloabc"


@pytest.mark.parametrize(
    ("template", "body_size"),
    [(GET_REQUEST, 0), (CHUNKED_POST, 8), (CL_POST, 8)],
    ids=["get", "chunked-post", "content-length-post"],
)
async def test_valid_request_one_byte_at_a_time(
    proxy: RunningProxy, origin: Origin, template: str, body_size: int
) -> None:
    """RFC 9112 §2.1: message framing does not depend on TCP segmentation; a valid request sent
    one byte per write (well within ``client.timeouts.head``) is a normal request: 200."""
    data = fill(template, origin)
    client = await RawClient.connect(proxy.port)
    try:
        with trio.fail_after(WAIT):
            for index in range(len(data)):
                await client.send(data[index : index + 1])
                await trio.sleep(0.001)
        assert not client.send_failed, (
            "the proxy closed the connection in the middle of the request"
        )
        response = await client.read_response()
    finally:
        await client.aclose()
    assert response is not None and response.status == 200, response
    assert response.json()["body_size"] == body_size
    assert len(origin.requests) == 1


@pytest.mark.parametrize(
    ("template", "body_size"),
    [(GET_REQUEST, 0), (CHUNKED_POST, 8), (CL_POST, 8)],
    ids=["get", "chunked-post", "content-length-post"],
)
async def test_valid_request_split_at_every_position(
    proxy: RunningProxy, origin: Origin, template: str, body_size: int
) -> None:
    """RFC 9112 §2.1: for every split point of a valid request into two writes (a fresh
    connection each time), the proxy answers 200 and the origin sees exactly one request."""
    data = fill(template, origin)
    with trio.fail_after(60):
        for split in range(1, len(data)):
            client = await RawClient.connect(proxy.port)
            try:
                await client.send(data[:split])
                await trio.sleep(0.002)
                await client.send(data[split:])
                assert not client.send_failed, split
                response = await client.read_response()
            finally:
                await client.aclose()
            assert response is not None and response.status == 200, (split, response)
            assert response.json()["body_size"] == body_size, split
            assert len(origin.requests) == split, split


async def test_pipelined_requests_answered_in_order(proxy: RunningProxy, origin: Origin) -> None:
    """RFC 9112 §9.3.2: a server MAY process pipelined requests but MUST send the responses in the
    order the requests were received; a proxy must not lose or reorder them."""
    data = fill(
        "GET {base}/first HTTP/1.1\r\nHost: {host}\r\n\r\n"
        "POST {base}/second HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\n\r\nhello"
        "GET {base}/third HTTP/1.1\r\nHost: {host}\r\n\r\n",
        origin,
    )
    client = await RawClient.connect(proxy.port)
    try:
        await client.send(data)
        responses = [await client.read_response() for _ in range(3)]
    finally:
        await client.aclose()
    assert all(r is not None and r.status == 200 for r in responses), responses
    echoes = [r.json() for r in responses if r is not None]
    assert [e["target"] for e in echoes] == ["/first", "/second", "/third"]
    assert [e["body_size"] for e in echoes] == [0, 5, 0]
    assert [seen.target for seen in origin.requests] == [b"/first", b"/second", b"/third"]


async def test_pipelined_request_split_across_writes(proxy: RunningProxy, origin: Origin) -> None:
    """RFC 9112 §9.3.2 with §2.1: the second pipelined request may start in the same write as
    the end of the first and finish in a later one; both are answered in order."""
    data = fill(
        "GET {base}/first HTTP/1.1\r\nHost: {host}\r\n\r\n"
        "GET {base}/second HTTP/1.1\r\nHost: {host}\r\n\r\n",
        origin,
    )
    split = data.index(b"/second") + 3
    client = await RawClient.connect(proxy.port)
    try:
        await client.send(data[:split])
        first = await client.read_response()
        await client.send(data[split:])
        second = await client.read_response()
    finally:
        await client.aclose()
    assert first is not None and first.json()["target"] == "/first"
    assert second is not None and second.json()["target"] == "/second"

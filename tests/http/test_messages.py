"""Unit tests of ``proxyd.http.messages``: request targets, raw head checks, Proxy-Status values.

Table-driven: each row is one input and what RFC 9110 / RFC 9112 / RFC 9209 say the result must
be. Hypothesis properties check that arbitrary bytes only ever produce a ``Target`` or a
``ProxydError`` (never an unexpected exception the client loop would not turn into a response).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxyd.errors import (
    BadRequest,
    HeadTooLarge,
    NotAProxyRequest,
    ProxydError,
    SchemeNotSupported,
)
from proxyd.http.messages import (
    DEFAULT_PORTS,
    HEAD_INCOMPLETE,
    Target,
    check_head_bytes,
    parse_absolute_target,
    parse_authority,
    proxy_status_value,
)

# --- parse_absolute_target --------------------------------------------------------------------

# (target, scheme, host, port, authority, path)
VALID_ABSOLUTE: list[tuple[bytes, bytes, str, int, bytes, bytes]] = [
    (b"http://example.com/", b"http", "example.com", 80, b"example.com", b"/"),
    (b"http://example.com", b"http", "example.com", 80, b"example.com", b"/"),
    (b"http://example.com/a/b?c=d&e", b"http", "example.com", 80, b"example.com", b"/a/b?c=d&e"),
    (b"http://example.com:8080/x", b"http", "example.com", 8080, b"example.com:8080", b"/x"),
    (b"http://example.com:80/x", b"http", "example.com", 80, b"example.com", b"/x"),
    (b"http://example.com:/x", b"http", "example.com", 80, b"example.com", b"/x"),
    (b"http://example.com:00080/", b"http", "example.com", 80, b"example.com", b"/"),
    (b"http://example.com:1/", b"http", "example.com", 1, b"example.com:1", b"/"),
    (b"http://example.com:65535/", b"http", "example.com", 65535, b"example.com:65535", b"/"),
    (b"http://example.com:443/", b"http", "example.com", 443, b"example.com:443", b"/"),
    (b"https://example.com/", b"https", "example.com", 443, b"example.com", b"/"),
    (b"https://example.com:443/", b"https", "example.com", 443, b"example.com", b"/"),
    (b"https://example.com:80/", b"https", "example.com", 80, b"example.com:80", b"/"),
    (b"ws://example.com/chat", b"ws", "example.com", 80, b"example.com", b"/chat"),
    (b"wss://example.com", b"wss", "example.com", 443, b"example.com", b"/"),
    # Scheme and host are case-insensitive (RFC 9110 §4.2.3); the path is not.
    (b"HTTP://EXAMPLE.COM/Path?Q=A", b"http", "example.com", 80, b"example.com", b"/Path?Q=A"),
    (b"HtTpS://Example.Com:8443/", b"https", "example.com", 8443, b"example.com:8443", b"/"),
    (b"http://192.0.2.1:8080/", b"http", "192.0.2.1", 8080, b"192.0.2.1:8080", b"/"),
    (b"http://example.com./", b"http", "example.com.", 80, b"example.com.", b"/"),
    # IPv6 literals (RFC 3986 §3.2.2): brackets stripped in host, kept in Host.
    (b"http://[::1]:8080/x", b"http", "::1", 8080, b"[::1]:8080", b"/x"),
    (b"http://[::1]/", b"http", "::1", 80, b"[::1]", b"/"),
    (b"http://[::1]", b"http", "::1", 80, b"[::1]", b"/"),
    (b"http://[::1]:/", b"http", "::1", 80, b"[::1]", b"/"),
    (b"http://[2001:DB8::1]/", b"http", "2001:db8::1", 80, b"[2001:db8::1]", b"/"),
    (b"https://[2001:db8::1]:8443/p", b"https", "2001:db8::1", 8443, b"[2001:db8::1]:8443", b"/p"),
    # A query without a path: origin form needs the "/" (RFC 9112 §3.2.1).
    (b"http://example.com?q=1", b"http", "example.com", 80, b"example.com", b"/?q=1"),
    (b"http://example.com:81?q", b"http", "example.com", 81, b"example.com:81", b"/?q"),
    (b"http://[::1]?q", b"http", "::1", 80, b"[::1]", b"/?q"),
    # Fragments are never sent (RFC 9110 §4.2.5).
    (b"http://example.com/p#frag", b"http", "example.com", 80, b"example.com", b"/p"),
    (b"http://example.com#frag", b"http", "example.com", 80, b"example.com", b"/"),
    (b"http://example.com/p?q#f?g", b"http", "example.com", 80, b"example.com", b"/p?q"),
    (b"http://example.com?q#f", b"http", "example.com", 80, b"example.com", b"/?q"),
    (b"http://example.com:8080#f", b"http", "example.com", 8080, b"example.com:8080", b"/"),
    # "@" or "://" after the authority belong to the path/query, not to userinfo/scheme.
    (b"http://example.com/?a=b@c", b"http", "example.com", 80, b"example.com", b"/?a=b@c"),
    (
        b"http://example.com/r?u=http://other/x",
        b"http",
        "example.com",
        80,
        b"example.com",
        b"/r?u=http://other/x",
    ),
]


@pytest.mark.parametrize(
    ("target", "scheme", "host", "port", "authority", "path"),
    VALID_ABSOLUTE,
    ids=[row[0].decode() for row in VALID_ABSOLUTE],
)
def test_parse_absolute_target_valid(
    target: bytes, scheme: bytes, host: str, port: int, authority: bytes, path: bytes
) -> None:
    """RFC 9112 §3.2.2 absolute-form, RFC 9110 §4.2.1-§4.2.5: split into scheme, host, port,
    Host field value (RFC 9112 §3.2.2: default port omitted, IPv6 in brackets) and origin form."""
    parsed = parse_absolute_target(target)
    # "http://host" with neither path nor query: RFC 9112 §3.2.4 (OPTIONS is sent as "*").
    rest = target.split(b"://", 1)[1].split(b"#", 1)[0]
    has_path = b"/" in rest or b"?" in rest
    assert parsed == Target(scheme, host, port, authority, path, has_path)
    assert parsed.origin_key == (scheme, host, port)


INVALID_ABSOLUTE: list[tuple[bytes, type[ProxydError]]] = [
    # userinfo is deprecated and must be treated as an error (RFC 9110 §4.2.4)
    (b"http://user:pass@example.com/", BadRequest),
    (b"http://user@example.com/", BadRequest),
    (b"http://@example.com/", BadRequest),
    (b"https://u:p@[::1]:443/", BadRequest),
    # bad ports (RFC 3986 §3.2.3; TCP ports are 1-65535)
    (b"http://example.com:0/", BadRequest),
    (b"http://example.com:65536/", BadRequest),
    (b"http://example.com:99999/", BadRequest),
    (b"http://example.com:123456/", BadRequest),
    (b"http://example.com:-1/", BadRequest),
    (b"http://example.com:+80/", BadRequest),
    (b"http://example.com:8o/", BadRequest),
    (b"http://example.com: 80/", BadRequest),
    (b"http://example.com:80:80/", BadRequest),
    (b"http://example.com:http/", BadRequest),
    (b"http://[::1]:0/", BadRequest),
    (b"http://[::1]:70000/", BadRequest),
    # empty or malformed host (RFC 9110 §4.2.1: an http URI with an empty host is invalid)
    (b"http:///path", BadRequest),
    (b"http://", BadRequest),
    (b"http://?q", BadRequest),
    (b"http://#f", BadRequest),
    (b"http://:80/", BadRequest),
    (b"http://exa mple.com/", BadRequest),
    (b"http://exa<mple.com/", BadRequest),
    (b'http://exa"mple.com/', BadRequest),
    (b"http://exa\x00mple.com/", BadRequest),
    (b"http://ex\xc3\xa4mple.com/", BadRequest),
    (b"http://[::1/", BadRequest),
    (b"http://[::1", BadRequest),
    (b"http://[zz::1]/", BadRequest),
    (b"http://[127.0.0.1]/", BadRequest),
    (b"http://[]/", BadRequest),
    (b"http://[::1]x/", BadRequest),
    (b"http://[::1]:8o/", BadRequest),
    # not absolute form at all
    (b"", BadRequest),
    (b"example.com/path", BadRequest),
    (b"example.com:80", BadRequest),
    (b"://example.com/", BadRequest),
    (b"http:/example.com/", BadRequest),
    # origin form / asterisk form sent to a forward proxy (RFC 9112 §3.2.1, §3.2.4)
    (b"/", NotAProxyRequest),
    (b"/x", NotAProxyRequest),
    (b"/x?y=1", NotAProxyRequest),
    (b"*", NotAProxyRequest),
    (b"/redirect?to=http://example.com/", NotAProxyRequest),
    # schemes we do not proxy (RFC 9110 §4.2: only http(s); ws(s) for upgrades)
    (b"ftp://example.com/", SchemeNotSupported),
    (b"FTP://example.com/file", SchemeNotSupported),
    (b"file:///etc/passwd", SchemeNotSupported),
    (b"gopher://example.com:70/", SchemeNotSupported),
    (b"httpx://example.com/", SchemeNotSupported),
]


@pytest.mark.parametrize(
    ("target", "error"),
    INVALID_ABSOLUTE,
    ids=[repr(row[0]) for row in INVALID_ABSOLUTE],
)
def test_parse_absolute_target_invalid(target: bytes, error: type[ProxydError]) -> None:
    """RFC 9112 §3.2 request-target forms, RFC 9110 §4.2.4 (userinfo is an error), §4.2.1 (empty
    host), RFC 3986 §3.2.3 (port): each bad target raises exactly the documented error class."""
    with pytest.raises(ProxydError) as info:
        parse_absolute_target(target)
    assert type(info.value) is error


def test_not_a_proxy_request_and_scheme_errors_map_to_their_statuses() -> None:
    """RFC 9112 §3.2.1: origin form at a proxy is a client error (400); RFC 9110 §15.6.2: an
    unsupported scheme is "not implemented" (501)."""
    with pytest.raises(NotAProxyRequest) as origin_form:
        parse_absolute_target(b"/x")
    assert origin_form.value.status == 400
    with pytest.raises(SchemeNotSupported) as ftp:
        parse_absolute_target(b"ftp://example.com/")
    assert ftp.value.status == 501


# --- parse_authority (CONNECT) ----------------------------------------------------------------

VALID_AUTHORITY: list[tuple[bytes, str, int, bytes]] = [
    (b"example.com:443", "example.com", 443, b"example.com:443"),
    (b"EXAMPLE.com:8443", "example.com", 8443, b"example.com:8443"),
    (b"example.com:80", "example.com", 80, b"example.com:80"),
    (b"127.0.0.1:22", "127.0.0.1", 22, b"127.0.0.1:22"),
    (b"[::1]:443", "::1", 443, b"[::1]:443"),
    (b"[2001:DB8::1]:1", "2001:db8::1", 1, b"[2001:db8::1]:1"),
    (b"h:65535", "h", 65535, b"h:65535"),
]


@pytest.mark.parametrize(
    ("target", "host", "port", "authority"),
    VALID_AUTHORITY,
    ids=[row[0].decode() for row in VALID_AUTHORITY],
)
def test_parse_authority_valid(target: bytes, host: str, port: int, authority: bytes) -> None:
    """RFC 9112 §3.2.3 authority-form; RFC 9110 §9.3.6: CONNECT names host and port."""
    assert parse_authority(target) == Target(b"tcp", host, port, authority, b"")


INVALID_AUTHORITY: list[bytes] = [
    b"",
    b"example.com",
    b"example.com:",
    b"[::1]",
    b"[::1]:",
    b":443",
    b"user@example.com:443",
    b"user:pw@example.com:443",
    b"example.com:0",
    b"example.com:65536",
    b"example.com:https",
    b"example.com:443/path",
    b"http://example.com:443",
    b"/",
    b"[::1:443",
    b"[nope]:443",
    b"exa mple.com:443",
]


@pytest.mark.parametrize("target", INVALID_AUTHORITY, ids=[repr(t) for t in INVALID_AUTHORITY])
def test_parse_authority_invalid(target: bytes) -> None:
    """RFC 9110 §9.3.6: the CONNECT target is host and port (port required); RFC 9110 §4.2.4:
    no userinfo; anything else is a 400."""
    with pytest.raises(BadRequest):
        parse_authority(target)


_TARGET_PREFIXES = st.sampled_from(
    [b"", b"http://", b"HTTPS://", b"ws://", b"ftp://", b"/", b"http://[", b"http://h:"]
)
_TARGET_BYTES = st.binary(max_size=40) | st.text(
    alphabet="abcXYZ019:/?#@[].%-_~ \t\r\n\x00\u00e9", max_size=40
).map(lambda s: s.encode("utf-8"))


@given(prefix=_TARGET_PREFIXES, rest=_TARGET_BYTES)
def test_parse_absolute_target_total(prefix: bytes, rest: bytes) -> None:
    """RFC 9112 §3.2: any request-target either parses or is refused with a ProxydError (which the
    client loop turns into a response); a parsed one is a well-formed origin-form target that
    parses the same when rebuilt from its parts."""
    target = prefix + rest
    try:
        parsed = parse_absolute_target(target)
    except ProxydError:
        return
    assert parsed.scheme in DEFAULT_PORTS
    assert 0 < parsed.port < 65536
    assert parsed.host == parsed.host.lower()
    assert parsed.host
    assert parsed.path.startswith(b"/")
    assert b"#" not in parsed.path
    assert b"@" not in parsed.authority
    rebuilt = parse_absolute_target(parsed.scheme + b"://" + parsed.authority + parsed.path)
    assert rebuilt.path == parsed.path and rebuilt.authority == parsed.authority
    assert rebuilt.origin_key == parsed.origin_key


@given(target=_TARGET_BYTES)
def test_parse_authority_total(target: bytes) -> None:
    """RFC 9110 §9.3.6: any CONNECT target parses to host:port or raises a ProxydError."""
    try:
        parsed = parse_authority(target)
    except ProxydError:
        return
    assert 0 < parsed.port < 65536
    assert parsed.host
    assert b"@" not in parsed.authority


# --- check_head_bytes -------------------------------------------------------------------------

MAX = 8192

VALID_HEADS: list[bytes] = [
    b"GET http://h/ HTTP/1.1\r\n\r\n",
    b"GET http://h/ HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET http://h:8080/a?b HTTP/1.1\r\nHost: h:8080\r\nAccept: */*\r\nX-Empty:\r\n\r\n",
    b"POST http://h/ HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n",
    b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\nX-Tab:\ta\tb\r\n\r\n",
]


@pytest.mark.parametrize("head", VALID_HEADS)
@pytest.mark.parametrize(
    "trailing",
    [
        b"",
        b"hello",
        b"a\nb\n\nc\r\n d",  # body bytes with bare LF / fold-like bytes are not the head
        b"GET http://h/second HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET http://h/smuggled HTTP/1.1\nHost: h\n\n",  # a bad *second* head is not ours yet
        b"\r\n\r\n",
    ],
)
def test_check_head_bytes_valid_whole(head: bytes, trailing: bytes) -> None:
    """RFC 9112 §2.1: the head ends at the first empty line (CRLF CRLF); the index just past it is
    returned whatever follows (body or a pipelined request, RFC 9112 §9.3.2)."""
    assert check_head_bytes(head + trailing, MAX) == len(head)
    assert check_head_bytes(bytearray(head + trailing), MAX) == len(head)


@pytest.mark.parametrize("head", VALID_HEADS)
@pytest.mark.parametrize("trailing", [b"", b"0123456789\n\n", b"GET / HTTP/1.1\nX: y\n\n"])
def test_check_head_bytes_valid_split_at_every_byte(head: bytes, trailing: bytes) -> None:
    """RFC 9112 §2.1 / §2.2: fed as the client loop feeds it (an accumulating buffer that grows by
    one byte at a time), a valid head is "incomplete" until its last byte and then complete at
    exactly its length, never an error, whatever bytes follow it."""
    data = head + trailing
    for size in range(len(data) + 1):
        expected = HEAD_INCOMPLETE if size < len(head) else len(head)
        assert check_head_bytes(data[:size], MAX) == expected, size
        assert check_head_bytes(bytearray(data[:size]), MAX) == expected, size


@pytest.mark.parametrize("head", VALID_HEADS)
def test_check_head_bytes_valid_split_in_two(head: bytes) -> None:
    """RFC 9112 §2.1: the verdict does not depend on how the bytes were segmented: for every split
    point, the first part alone is incomplete and the accumulated buffer is complete."""
    for split in range(1, len(head)):
        buffer = bytearray(head[:split])
        assert check_head_bytes(buffer, MAX) == HEAD_INCOMPLETE
        buffer += head[split:]
        assert check_head_bytes(buffer, MAX) == len(head)


@dataclass(frozen=True)
class BadHead:
    id: str
    data: bytes
    error: type[ProxydError]
    #: the defect cannot be reported before this many bytes (the offending byte) arrived
    earliest: int
    #: and must be reported once this many bytes arrived (the head is complete under any reading)
    latest: int


def _bad(
    ident: str, data: bytes, marker: bytes, *, error: type[ProxydError] = BadRequest
) -> BadHead:
    """``marker`` is the defect; its last byte is the first one that makes the defect visible."""
    position = data.index(marker) + len(marker)
    ends = [i + len(t) for t in (b"\r\n\r\n", b"\n\n", b"\n\r\n") if (i := data.find(t)) >= 0]
    return BadHead(ident, data, error, position, min(ends))


BAD_HEADS: list[BadHead] = [
    _bad("bare-lf-everywhere", b"GET http://h/ HTTP/1.1\nHost: h\n\n", b"1.1\n"),
    _bad("bare-lf-request-line", b"GET http://h/ HTTP/1.1\nHost: h\r\n\r\n", b"1.1\n"),
    _bad("bare-lf-in-fields", b"GET http://h/ HTTP/1.1\r\nHost: h\nX: y\r\n\r\n", b"h\n"),
    _bad("bare-lf-terminator", b"GET http://h/ HTTP/1.1\r\nHost: h\r\n\n", b"\r\n\n"),
    _bad("lf-crlf-terminator", b"GET http://h/ HTTP/1.1\r\nHost: h\n\r\n", b"h\n"),
    _bad(
        "bare-lf-hides-te",
        b"POST http://h/ HTTP/1.1\r\nX: a\nTransfer-Encoding: chunked\r\nHost: h\r\n\r\n",
        b"a\n",
    ),
    _bad("obs-fold-space", b"GET http://h/ HTTP/1.1\r\nX: a\r\n b\r\nHost: h\r\n\r\n", b"\n "),
    _bad("obs-fold-tab", b"GET http://h/ HTTP/1.1\r\nX: a\r\n\tb\r\nHost: h\r\n\r\n", b"\n\t"),
    _bad(
        "obs-fold-te-value",
        b"POST http://h/ HTTP/1.1\r\nHost: h\r\nTransfer-Encoding:\r\n chunked\r\n\r\n",
        b"\n ",
    ),
    _bad("space-after-start-line", b"GET http://h/ HTTP/1.1\r\n Host: h\r\n\r\n", b"\n "),
    _bad("fold-line-before-end", b"GET http://h/ HTTP/1.1\r\nHost: h\r\n \r\n\r\n", b"\n "),
]


@pytest.mark.parametrize("bad", BAD_HEADS, ids=[b.id for b in BAD_HEADS])
@pytest.mark.parametrize("trailing", [b"", b"hello", b"GET http://h/smuggled HTTP/1.1\r\n\r\n"])
def test_check_head_bytes_rejects_bad_line_structure(bad: BadHead, trailing: bytes) -> None:
    """RFC 9112 §2.2 (a bare LF line terminator lets another parser frame the message
    differently: a proxy must not accept it) and §5.2 (obs-fold: a proxy MUST reject or replace
    it). Fed whole, with trailing bytes, and byte by byte (accumulating): never an error before
    the offending byte arrived, and an error at the latest once the head is complete."""
    data = bad.data + trailing
    with pytest.raises(bad.error):
        check_head_bytes(data, MAX)
    for size in range(len(data) + 1):
        prefix = data[:size]
        if size < bad.earliest:
            assert check_head_bytes(prefix, MAX) == HEAD_INCOMPLETE, size
        elif size >= bad.latest:
            with pytest.raises(bad.error):
                check_head_bytes(prefix, MAX)
            with pytest.raises(bad.error):
                check_head_bytes(bytearray(prefix), MAX)
        else:
            try:
                assert check_head_bytes(prefix, MAX) == HEAD_INCOMPLETE, size
            except ProxydError as exc:
                assert type(exc) is bad.error


def _head_of_size(size: int) -> bytes:
    start = b"GET http://h/ HTTP/1.1\r\nX-Pad: "
    end = b"\r\n\r\n"
    pad = size - len(start) - len(end)
    assert pad >= 0
    return start + b"a" * pad + end


@pytest.mark.parametrize("max_size", [64, 100, 1024])
def test_check_head_bytes_size_limit(max_size: int) -> None:
    """RFC 9110 §15.5.20 / RFC 6585 §5 (431): a head of exactly ``max_size`` bytes is accepted
    (with any body after it); one byte more is refused, and a head that has not ended within
    ``max_size`` bytes is refused as soon as byte ``max_size + 1`` arrives."""
    fits = _head_of_size(max_size)
    assert check_head_bytes(fits, max_size) == max_size
    assert check_head_bytes(fits + b"x" * (2 * max_size), max_size) == max_size
    too_big = _head_of_size(max_size + 1)
    with pytest.raises(HeadTooLarge):
        check_head_bytes(too_big, max_size)
    with pytest.raises(HeadTooLarge):
        check_head_bytes(too_big + b"body", max_size)
    endless = b"GET http://h/ HTTP/1.1\r\nX-Pad: " + b"a" * (3 * max_size)
    for size in range(len(endless) + 1):
        if size <= max_size:
            assert check_head_bytes(endless[:size], max_size) == HEAD_INCOMPLETE, size
        else:
            with pytest.raises(HeadTooLarge):
                check_head_bytes(endless[:size], max_size)


def test_check_head_bytes_errors_are_400_and_431() -> None:
    """RFC 9112 §2.2/§5.2 errors answer 400; an oversized head answers 431 (RFC 6585 §5); both
    close the connection (RFC 9112 §9.6: framing is no longer trustworthy)."""
    with pytest.raises(BadRequest) as bad:
        check_head_bytes(b"GET http://h/ HTTP/1.1\nHost: h\n\n", MAX)
    assert bad.value.status == 400
    assert bad.value.close_connection
    with pytest.raises(HeadTooLarge) as big:
        check_head_bytes(b"x" * 100, 64)
    assert big.value.status == 431
    assert big.value.close_connection


_HEAD_ALPHABET = st.sampled_from([b"\r", b"\n", b" ", b"\t", b":", b"G", b"x", b"\r\n", b"\x00"])
_HEADISH = st.lists(_HEAD_ALPHABET, max_size=40).map(b"".join)


@given(data=_HEADISH | st.binary(max_size=60), max_size=st.integers(8, 64))
def test_check_head_bytes_total_and_consistent(data: bytes, max_size: int) -> None:
    """RFC 9112 §2.1/§2.2/§5.2: on arbitrary bytes the check returns "incomplete", or the end of a
    CRLF-only, fold-free head within the limit, or raises BadRequest/HeadTooLarge; and its verdict
    is monotonic as bytes accumulate (a complete head stays complete at the same index, an error
    stays an error)."""
    previous: int | None = HEAD_INCOMPLETE
    for size in range(len(data) + 1):
        prefix = data[:size]
        try:
            result: int | None = check_head_bytes(prefix, max_size)
        except (BadRequest, HeadTooLarge):
            result = None
        if previous is None:
            assert result is None, size
        elif previous != HEAD_INCOMPLETE:
            assert result == previous, size
        if result is not None and result != HEAD_INCOMPLETE:
            head = prefix[:result]
            assert head.endswith(b"\r\n\r\n")
            assert b"\r\n\r\n" not in head[:-1]
            assert result <= max_size
            assert head.count(b"\n") == head.count(b"\r\n")
            assert b"\n " not in head
            assert b"\n\t" not in head
        elif result == HEAD_INCOMPLETE:
            assert len(prefix) <= max_size
            assert b"\n\n" not in prefix
        previous = result


# --- proxy_status_value -----------------------------------------------------------------------

# RFC 9209 §2 / RFC 8941 §3.3.3: Proxy-Status is an sf-list of sf-items; ``details`` is an
# sf-string: printable ASCII (%x20-7E) in double quotes, with only ``"`` and ``\`` escaped.
_PROXY_STATUS_RE = re.compile(
    rb"(?P<proxy>[!#$%&\'*+\-.^_`|~0-9A-Za-z:/]+); error=(?P<error>[a-z_]+)"
    rb'(?:; details="(?P<details>(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)")?'
)


def _unescape(value: bytes) -> bytes:
    return re.sub(rb'\\(["\\])', rb"\1", value)


PROXY_STATUS_CASES: list[tuple[str, str, str | None, bytes]] = [
    ("proxyd", "http_request_error", None, b"proxyd; error=http_request_error"),
    ("proxyd", "http_request_error", "", b"proxyd; error=http_request_error"),
    (
        "proxyd-test",
        "dns_error",
        "no such host",
        b'proxyd-test; error=dns_error; details="no such host"',
    ),
    (
        "proxyd",
        "http_request_error",
        'bad "quoted" value',
        b'proxyd; error=http_request_error; details="bad \\"quoted\\" value"',
    ),
    (
        "proxyd",
        "http_request_error",
        "back\\slash",
        b'proxyd; error=http_request_error; details="back\\\\slash"',
    ),
    (
        "proxyd",
        "proxy_loop_detected",
        '\\"',
        b'proxyd; error=proxy_loop_detected; details="\\\\\\""',
    ),
]


@pytest.mark.parametrize(("pseudonym", "error_type", "detail", "expected"), PROXY_STATUS_CASES)
def test_proxy_status_value(
    pseudonym: str, error_type: str, detail: str | None, expected: bytes
) -> None:
    """RFC 9209 §2: ``<proxy>; error=<type>`` plus an optional ``details`` sf-string parameter
    (RFC 9209 §2.1.5) with ``"`` and ``\\`` escaped (RFC 8941 §3.3.3)."""
    value = proxy_status_value(pseudonym, error_type, detail)
    assert value == expected
    match = _PROXY_STATUS_RE.fullmatch(value)
    assert match is not None
    if detail:
        assert _unescape(match["details"]) == detail.encode("ascii")


@pytest.mark.parametrize(
    "detail",
    [
        "line\r\nX-Injected: 1",
        "nul\x00byte",
        "tab\there",
        "caf\u00e9 \u2603",
    ],
)
def test_proxy_status_value_is_a_valid_field_value(detail: str) -> None:
    """RFC 9209 §2.1.5 (details is an sf-string), RFC 8941 §3.3.3 (sf-string characters are
    %x20-7E only) and RFC 9110 §5.5 (a field value never contains CR, LF or NUL): whatever text an
    error carries, the Proxy-Status value is printable ASCII and cannot split the response head."""
    value = proxy_status_value("proxyd", "http_request_error", detail)
    assert all(0x20 <= byte <= 0x7E for byte in value), value
    assert _PROXY_STATUS_RE.fullmatch(value) is not None, value


@given(detail=st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E)))
def test_proxy_status_value_round_trips_printable_details(detail: str) -> None:
    """RFC 8941 §3.3.3: any printable-ASCII detail is carried losslessly in the sf-string."""
    value = proxy_status_value("proxyd", "http_request_error", detail)
    match = _PROXY_STATUS_RE.fullmatch(value)
    assert match is not None
    if detail:
        assert _unescape(match["details"]) == detail.encode("ascii")
    else:
        assert match["details"] is None


@given(detail=st.text())
def test_proxy_status_value_any_text_is_printable(detail: str) -> None:
    """RFC 8941 §3.3.3 / RFC 9110 §5.5: for any detail text the value is printable ASCII."""
    value = proxy_status_value("proxyd", "http_request_error", detail)
    assert all(0x20 <= byte <= 0x7E for byte in value)

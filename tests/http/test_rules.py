"""Unit tests of ``proxyd.http.rules``: what a forward proxy changes between the two hops.

Table-driven tests for every rule in the module docstring, each citing its RFC text, and
hypothesis properties over arbitrary field lists (no hop-by-hop field ever leaves the proxy,
everything else keeps its order and spelling).
"""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from proxyd.errors import BadRequest, LoopDetected
from proxyd.http.rules import (
    HOP_BY_HOP,
    Header,
    RequestFacts,
    prepare_request,
    prepare_response,
    via_member,
)

AUTHORITY = b"origin.test:8080"
PSEUDONYM = b"proxyd-test"
VIA = b"1.1 proxyd-test"
HOST = (b"Host", AUTHORITY)
OUR_VIA = (b"Via", VIA)


def prepare(
    headers: list[Header],
    *,
    max_forwards_method: bool = False,
    via: bytes | None = VIA,
    pseudonym: bytes = PSEUDONYM,
) -> RequestFacts:
    return prepare_request(
        headers,
        authority=AUTHORITY,
        via=via,
        pseudonym=pseudonym,
        is_max_forwards_method=max_forwards_method,
    )


# --- hop-by-hop fields (request) --------------------------------------------------------------

HOP_FIELDS: list[Header] = [
    (b"Connection", b"keep-alive"),
    (b"connection", b"close"),
    (b"Keep-Alive", b"timeout=5, max=100"),
    (b"KEEP-ALIVE", b"timeout=5"),
    (b"Proxy-Connection", b"keep-alive"),
    (b"proxy-connection", b"close"),
    (b"Proxy-Authorization", b"Basic dXNlcjpwYXNz"),
    (b"PROXY-AUTHORIZATION", b"Bearer abc"),
    (b"TE", b"gzip"),
    (b"te", b"deflate;q=0.5"),
    (b"Trailer", b"X-Checksum"),
    (b"Transfer-Encoding", b"chunked"),
    (b"transfer-encoding", b"CHUNKED"),
    (b"Upgrade", b"websocket"),
    (b"UPGRADE", b"h2c"),
]


@pytest.mark.parametrize(
    "hop", HOP_FIELDS, ids=[f"{n.decode()}: {v.decode()}" for n, v in HOP_FIELDS]
)
def test_request_hop_by_hop_field_removed(hop: Header) -> None:
    """RFC 9110 §7.6.1: a proxy MUST remove Connection, the fields it names, and Proxy-Connection,
    Keep-Alive, TE, Transfer-Encoding, Upgrade (and Trailer, hop-by-hop with TE); RFC 9110 §11.7.2:
    Proxy-Authorization is consumed by the proxy it is meant for. The rest is untouched."""
    facts = prepare([(b"Accept", b"*/*"), hop, (b"X-After", b"1")])
    assert facts.headers == [HOST, (b"Accept", b"*/*"), (b"X-After", b"1"), OUR_VIA]


CONNECTION_OPTIONS: list[tuple[list[Header], list[Header]]] = [
    ([(b"Connection", b"X-Secret")], [(b"X-Kept", b"k")]),
    ([(b"Connection", b"x-secret, close")], [(b"X-Kept", b"k")]),
    ([(b"Connection", b" X-SECRET ,keep-alive ")], [(b"X-Kept", b"k")]),
    ([(b"Connection", b"close,,X-Secret,")], [(b"X-Kept", b"k")]),
    ([(b"Connection", b"x-other, X-Secret, X-Kept")], []),
    ([(b"Connection", b"close"), (b"connection", b"x-secret")], [(b"X-Kept", b"k")]),
    ([(b"Connection", b"X-Other\t,\tX-Secret")], [(b"X-Kept", b"k")]),
]


@pytest.mark.parametrize(("connection", "kept"), CONNECTION_OPTIONS)
def test_request_fields_named_by_connection_removed(
    connection: list[Header], kept: list[Header]
) -> None:
    """RFC 9110 §7.6.1: connection options are case-insensitive tokens in a comma-separated list
    (RFC 9110 §5.6.1, empty elements allowed), possibly over several Connection lines; every field
    they name is removed, whatever its spelling."""
    headers = [
        *connection,
        (b"x-secret", b"s1"),
        (b"X-Kept", b"k"),
        (b"X-SECRET", b"s2"),
        (b"X-Other", b"o"),
    ]
    facts = prepare(headers)
    names = [name.lower() for name, _ in facts.headers]
    assert b"x-secret" not in names
    assert b"connection" not in names
    assert facts.headers[0] == HOST
    assert facts.headers[-1] == OUR_VIA
    assert [h for h in facts.headers if h[0] == b"X-Kept"] == kept


def test_request_all_rules_together() -> None:
    """RFC 9110 §7.6.1 (hop-by-hop removed), RFC 9112 §3.2.2 (Host replaced by the target's
    authority), RFC 9110 §7.6.3 (Via appended), RFC 9110 §5.3 (order of the others kept, names
    kept as spelled): the exact outgoing field list for one busy request."""
    headers: list[Header] = [
        (b"host", b"wrong.example"),
        (b"User-Agent", b"ua/1"),
        (b"Connection", b"keep-alive, X-Hop, close"),
        (b"Keep-Alive", b"timeout=5"),
        (b"x-hop", b"gone"),
        (b"Proxy-Connection", b"keep-alive"),
        (b"Proxy-Authorization", b"Basic dXNlcjpwYXNz"),
        (b"accept", b"text/html"),
        (b"TE", b"trailers, deflate"),
        (b"Trailer", b"X-Sum"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Upgrade", b"websocket"),
        (b"Via", b"1.0 other-proxy"),
        (b"X-Dup", b"1"),
        (b"Cookie", b"a=1"),
        (b"X-Dup", b"2"),
    ]
    facts = prepare(headers)
    assert facts.headers == [
        HOST,
        (b"User-Agent", b"ua/1"),
        (b"accept", b"text/html"),
        (b"Via", b"1.0 other-proxy"),
        (b"X-Dup", b"1"),
        (b"Cookie", b"a=1"),
        (b"X-Dup", b"2"),
        (b"TE", b"trailers"),
        (b"Connection", b"TE"),  # RFC 9110 §10.1.4
        OUR_VIA,
    ]
    assert facts.proxy_authorization == b"Basic dXNlcjpwYXNz"
    assert facts.accepts_trailers
    assert facts.connection_close
    assert facts.has_transfer_encoding
    assert not facts.has_content_length
    assert facts.upgrade == b"websocket"


# --- Host ------------------------------------------------------------------------------------

HOST_CASES: list[list[Header]] = [
    [],
    [(b"Host", b"evil.example")],
    [(b"X-A", b"1"), (b"host", b"evil.example"), (b"X-B", b"2")],
    [(b"X-A", b"1"), (b"HOST", b"a"), (b"Host", b"b"), (b"X-B", b"2")],
    [(b"Host", AUTHORITY), (b"X-A", b"1"), (b"X-B", b"2")],
]


@pytest.mark.parametrize("headers", HOST_CASES)
def test_request_host_rewritten_and_first(headers: list[Header]) -> None:
    """RFC 9112 §3.2.2: a proxy MUST ignore the received Host and replace it with the target URI's
    authority; RFC 9110 §7.2 / RFC 9112 §3.2: Host is sent first (h11 and origins expect it); there
    is exactly one."""
    facts = prepare(headers)
    assert facts.headers[0] == HOST
    assert [name.lower() for name, _ in facts.headers].count(b"host") == 1
    others = [h for h in headers if h[0].lower() != b"host"]
    assert facts.headers[1:-1] == others


# --- Via -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "existing",
    [[], [(b"Via", b"1.0 other")], [(b"via", b"1.0 a, 1.1 b (comment)"), (b"Via", b"2 c")]],
)
def test_request_via_appended(existing: list[Header]) -> None:
    """RFC 9110 §7.6.3: a proxy MUST append its own Via member; received members are kept, in
    order, and ours comes last."""
    headers = [(b"X-A", b"1"), *existing, (b"X-B", b"2")]
    facts = prepare(headers)
    assert facts.headers == [HOST, *headers, OUR_VIA]


def test_request_via_disabled_adds_nothing() -> None:
    """RFC 9110 §7.6.3 allows a proxy configured not to add Via (``via=None``); the rest holds."""
    facts = prepare([(b"X-A", b"1"), (b"Via", b"1.0 other")], via=None)
    assert facts.headers == [HOST, (b"X-A", b"1"), (b"Via", b"1.0 other")]


@pytest.mark.parametrize(
    ("version", "member"),
    [(b"1.1", b"1.1 proxyd-test"), (b"1.0", b"1.0 proxyd-test")],
)
def test_via_member(version: bytes, member: bytes) -> None:
    """RFC 9110 §7.6.3: received-protocol is the version of the message as we received it, and
    the protocol name is omitted for HTTP."""
    assert via_member(version, PSEUDONYM) == member


# --- loop detection --------------------------------------------------------------------------

LOOPS: list[list[Header]] = [
    [(b"Via", b"1.1 proxyd-test")],
    [(b"Via", b"1.1 PROXYD-TEST")],
    [(b"via", b"1.1 Proxyd-Test")],
    [(b"Via", b"1.0 edge, 1.1 proxyd-test")],
    [(b"Via", b"1.1 proxyd-test, 1.0 edge")],
    [(b"Via", b"1.0 a,1.1 proxyd-test,1.1 b")],
    [(b"Via", b"1.1 proxyd-test (proxyd/0.1)")],
    [(b"Via", b"HTTP/1.1 proxyd-test")],
    [(b"Via", b"1.1  proxyd-test")],
    [(b"Via", b"1.0 edge"), (b"Via", b"1.1 proxyd-test")],
    [(b"X-A", b"1"), (b"VIA", b"1.1 other"), (b"Via", b"2 x, 1.1 proxyd-test")],
]


@pytest.mark.parametrize("headers", LOOPS)
def test_request_loop_detected(headers: list[Header]) -> None:
    """RFC 9110 §7.6.3 (Via lets a proxy detect forwarding loops) and RFC 9209 §2.3.16
    (proxy_loop_detected, answered 508): our pseudonym as the received-by of any member of any
    Via line, compared case-insensitively, is a loop."""
    with pytest.raises(LoopDetected) as info:
        prepare(headers)
    assert info.value.status == 508
    assert info.value.error_type == "proxy_loop_detected"


def test_request_loop_detected_with_via_disabled_and_mixed_case_pseudonym() -> None:
    """RFC 9110 §7.6.3: loop detection does not depend on whether we add Via ourselves, and
    pseudonyms compare case-insensitively (RFC 9110 §7.6.3: received-by is a host or pseudonym)."""
    with pytest.raises(LoopDetected):
        prepare([(b"Via", b"1.1 proxyd-test")], via=None)
    with pytest.raises(LoopDetected):
        prepare([(b"Via", b"1.1 proxyd-test")], pseudonym=b"ProxyD-Test")


NOT_LOOPS: list[bytes] = [
    b"1.1 other-proxy",
    b"1.1 proxyd-test-2",
    b"1.1 my-proxyd-test",
    b"1.1 proxyd-test.example.com",
    b"1.1 proxyd",
    b"1.1 other (behind proxyd-test)",
    b"1.0 a, 1.1 b (proxyd-test), 1.1 c",
]


@pytest.mark.parametrize("via", NOT_LOOPS)
def test_request_other_proxy_in_via_is_not_a_loop(via: bytes) -> None:
    """RFC 9110 §7.6.3: only a member whose received-by is our pseudonym is a loop; another proxy
    whose name merely contains ours, or a comment mentioning us, is forwarded normally."""
    facts = prepare([(b"Via", via)])
    assert facts.headers == [HOST, (b"Via", via), OUR_VIA]


# --- Max-Forwards ----------------------------------------------------------------------------

MAX_FORWARDS: list[tuple[bytes, int, bytes]] = [
    (b"5", 5, b"4"),
    (b"1", 1, b"0"),
    (b" 10 ", 10, b"9"),
    (b"007", 7, b"6"),
    (b"99999999999999999999", 99999999999999999999, b"99999999999999999998"),
]


@pytest.mark.parametrize(("value", "parsed", "forwarded"), MAX_FORWARDS)
def test_max_forwards_decremented_for_options_and_trace(
    value: bytes, parsed: int, forwarded: bytes
) -> None:
    """RFC 9110 §7.6.2: on TRACE and OPTIONS a recipient forwarding the request MUST decrement
    Max-Forwards by one (in place, the field keeps its position and spelling)."""
    facts = prepare(
        [(b"X-A", b"1"), (b"max-forwards", value), (b"X-B", b"2")], max_forwards_method=True
    )
    assert facts.max_forwards == parsed
    assert facts.headers == [
        HOST,
        (b"X-A", b"1"),
        (b"max-forwards", forwarded),
        (b"X-B", b"2"),
        OUR_VIA,
    ]


def test_max_forwards_zero_is_reported() -> None:
    """RFC 9110 §7.6.2: Max-Forwards 0 on OPTIONS/TRACE means this proxy must answer itself; the
    fact is reported so the caller does not forward."""
    facts = prepare([(b"Max-Forwards", b"0")], max_forwards_method=True)
    assert facts.max_forwards == 0


@pytest.mark.parametrize("value", [b"5", b"0", b"abc", b"-1", b""])
def test_max_forwards_ignored_for_other_methods(value: bytes) -> None:
    """RFC 9110 §7.6.2: a recipient MAY ignore Max-Forwards on methods other than TRACE and
    OPTIONS; it is forwarded as received (whatever its value)."""
    facts = prepare([(b"Max-Forwards", value)], max_forwards_method=False)
    assert facts.max_forwards is None
    assert facts.headers == [HOST, (b"Max-Forwards", value), OUR_VIA]


@pytest.mark.parametrize("value", [b"abc", b"-1", b"", b"+1", b"1.5", b"1, 2"])
def test_max_forwards_invalid_is_bad_request(value: bytes) -> None:
    """RFC 9110 §7.6.2: Max-Forwards = 1*DIGIT; a proxy cannot decrement anything else on
    TRACE/OPTIONS, so the request is refused (400)."""
    with pytest.raises(BadRequest):
        prepare([(b"Max-Forwards", value)], max_forwards_method=True)


# --- framing ---------------------------------------------------------------------------------

CL_AND_TE: list[list[Header]] = [
    [(b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")],
    [(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"5")],
    [(b"content-length", b"0"), (b"TRANSFER-ENCODING", b"chunked")],
    [(b"Transfer-Encoding", b"gzip, chunked"), (b"X-A", b"1"), (b"Content-Length", b"10")],
    [
        (b"Connection", b"Transfer-Encoding"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Content-Length", b"3"),
    ],
]


@pytest.mark.parametrize("headers", CL_AND_TE)
def test_request_content_length_and_transfer_encoding_is_rejected(headers: list[Header]) -> None:
    """RFC 9112 §6.1 / §6.3 (item 3): a request with both Content-Length and Transfer-Encoding is
    a smuggling attempt; a proxy forwarding it must not trust either; we refuse it (400, close)."""
    with pytest.raises(BadRequest) as info:
        prepare(headers)
    assert info.value.status == 400
    assert info.value.close_connection


def test_request_content_length_alone_is_forwarded() -> None:
    """RFC 9112 §6.2: Content-Length is end-to-end framing information; it is forwarded as is
    (only Transfer-Encoding is hop-by-hop, RFC 9112 §6.1)."""
    facts = prepare([(b"Content-Length", b"5")])
    assert facts.has_content_length and not facts.has_transfer_encoding
    assert facts.headers == [HOST, (b"Content-Length", b"5"), OUR_VIA]
    facts = prepare([(b"Transfer-Encoding", b"chunked")])
    assert facts.has_transfer_encoding and not facts.has_content_length
    assert facts.headers == [HOST, OUR_VIA]


TE_TRAILERS: list[tuple[list[Header], bool]] = [
    ([(b"TE", b"trailers")], True),
    ([(b"te", b"Trailers")], True),
    ([(b"TE", b"deflate;q=0.5, trailers")], True),
    ([(b"TE", b"trailers, gzip;q=0.2")], True),
    ([(b"TE", b"gzip")], False),
    ([(b"TE", b"")], False),
    ([], False),
    ([(b"TE", b"x-trailers-ext")], False),
    ([(b"TE", b"trailers"), (b"TE", b"deflate")], True),
    ([(b"TE", b"deflate"), (b"TE", b"trailers")], True),
]


@pytest.mark.parametrize(("headers", "accepts"), TE_TRAILERS)
def test_request_te_trailers_recorded(headers: list[Header], accepts: bool) -> None:
    """RFC 9110 §10.1.4: ``trailers`` among the TE members (a comma list, possibly over several
    lines, RFC 9110 §5.3) says the client accepts trailer fields. TE is hop-by-hop (RFC 9110
    §7.6.1): the client's value is dropped, and the proxy asks the origin for trailers with its
    own ``TE: trailers`` only when it can pass them on."""
    facts = prepare([(b"X-A", b"1"), *headers])
    assert facts.accepts_trailers is accepts
    te = [value for name, value in facts.headers if name.lower() == b"te"]
    assert te == ([b"trailers"] if accepts else [])


@pytest.mark.parametrize(
    ("value", "expects"),
    [(b"100-continue", True), (b"100-Continue ", True), (b"200-ok", False)],
)
def test_request_expect_continue_recorded(value: bytes, expects: bool) -> None:
    """RFC 9110 §10.1.1: ``Expect: 100-continue`` (case-insensitive) is recorded; Expect is
    end-to-end and forwarded."""
    facts = prepare([(b"Expect", value)])
    assert facts.expects_continue is expects
    assert (b"Expect", value) in facts.headers


# --- prepare_response ------------------------------------------------------------------------

RESPONSE_HOP_FIELDS: list[Header] = [
    (b"Connection", b"keep-alive"),
    (b"Connection", b"close"),
    (b"Keep-Alive", b"timeout=5"),
    (b"Proxy-Connection", b"keep-alive"),
    (b"TE", b"trailers"),
    (b"Trailer", b"X-Checksum"),
    (b"Transfer-Encoding", b"chunked"),
    (b"transfer-encoding", b"gzip, chunked"),
    (b"Upgrade", b"h2c"),
]


@pytest.mark.parametrize(
    "hop", RESPONSE_HOP_FIELDS, ids=[f"{n.decode()}: {v.decode()}" for n, v in RESPONSE_HOP_FIELDS]
)
def test_response_hop_by_hop_field_removed(hop: Header) -> None:
    """RFC 9110 §7.6.1: the same hop-by-hop fields are removed from responses; h11 re-derives the
    framing for the client hop (RFC 9112 §6.1)."""
    out = prepare_response([(b"Content-Type", b"text/plain"), hop, (b"ETag", b'"x"')], via=VIA)
    assert out == [(b"Content-Type", b"text/plain"), (b"ETag", b'"x"'), OUR_VIA]


def test_response_fields_named_by_connection_removed_order_kept() -> None:
    """RFC 9110 §7.6.1 (Connection options removed, case-insensitively), §5.3 (order of the
    remaining field lines, including repeated ones like Set-Cookie, is significant and kept),
    §7.6.3 (Via appended)."""
    headers: list[Header] = [
        (b"Set-Cookie", b"a=1"),
        (b"Connection", b"X-Internal, close"),
        (b"x-internal", b"secret"),
        (b"content-type", b"text/html"),
        (b"Set-Cookie", b"b=2"),
        (b"Via", b"1.1 origin-side"),
        (b"X-INTERNAL", b"again"),
        (b"Content-Length", b"12"),
    ]
    assert prepare_response(headers, via=VIA) == [
        (b"Set-Cookie", b"a=1"),
        (b"content-type", b"text/html"),
        (b"Set-Cookie", b"b=2"),
        (b"Via", b"1.1 origin-side"),
        (b"Content-Length", b"12"),
        OUR_VIA,
    ]
    assert prepare_response(headers[:1], via=None) == headers[:1]


@pytest.mark.parametrize(
    "headers",
    [
        [(b"Content-Length", b"10"), (b"Transfer-Encoding", b"chunked")],
        [(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"10")],
        [(b"content-length", b"10"), (b"X-A", b"1"), (b"TRANSFER-ENCODING", b"chunked")],
        [
            (b"Content-Length", b"10"),
            (b"Content-Length", b"10"),
            (b"Transfer-Encoding", b"chunked"),
        ],
    ],
)
def test_response_content_length_dropped_when_transfer_encoding(headers: list[Header]) -> None:
    """RFC 9112 §6.3 (item 3): with both, Transfer-Encoding overrides Content-Length, and an
    intermediary MUST remove the received Content-Length before forwarding."""
    out = prepare_response(headers, via=VIA)
    names = [name.lower() for name, _ in out]
    assert b"content-length" not in names
    assert b"transfer-encoding" not in names
    assert out[-1] == OUR_VIA


def test_response_content_length_kept_without_transfer_encoding() -> None:
    """RFC 9112 §6.2: without Transfer-Encoding, Content-Length frames the response and is kept."""
    assert prepare_response([(b"Content-Length", b"10")], via=VIA) == [
        (b"Content-Length", b"10"),
        OUR_VIA,
    ]


def test_response_proxy_authenticate_is_relayed() -> None:
    """RFC 9110 §11.7.1: an origin's Proxy-Authenticate is for the next client hop here (no proxy
    in between challenged), so it is relayed unchanged."""
    headers: list[Header] = [(b"Proxy-Authenticate", b'Basic realm="x"')]
    assert prepare_response(headers, via=None) == headers


# --- properties ------------------------------------------------------------------------------

_HOP_NAMES = sorted(HOP_BY_HOP)
_OTHER_NAMES = [
    b"accept",
    b"x-a",
    b"x-b",
    b"cookie",
    b"via",
    b"host",
    b"content-length",
    b"max-forwards",
]


@st.composite
def _field_name(draw: st.DrawFn) -> bytes:
    base = draw(
        st.sampled_from(_HOP_NAMES + _OTHER_NAMES)
        | st.from_regex(rb"\A[A-Za-z][A-Za-z0-9-]{0,8}\Z", fullmatch=True)
    )
    flips = draw(st.lists(st.booleans(), min_size=len(base), max_size=len(base)))
    return bytes(
        c ^ 0x20 if flip and 0x61 <= (c | 0x20) <= 0x7A else c
        for c, flip in zip(base, flips, strict=True)
    )


_FIELD_VALUE = st.from_regex(rb"\A[ !#-~]{0,12}\Z", fullmatch=True)
_CONNECTION_VALUE = st.lists(
    st.sampled_from(_HOP_NAMES + _OTHER_NAMES + [b"close", b"keep-alive", b"X-A", b" x-b "]),
    max_size=4,
).map(b",".join)


@st.composite
def _request_fields(draw: st.DrawFn) -> list[Header]:
    fields: list[Header] = []
    for _ in range(draw(st.integers(0, 12))):
        name = draw(_field_name())
        value = draw(_CONNECTION_VALUE if name.lower() == b"connection" else _FIELD_VALUE)
        fields.append((name, value))
    return fields


def _named_by_connection(fields: list[Header]) -> set[bytes]:
    named: set[bytes] = set()
    for name, value in fields:
        if name.lower() == b"connection":
            named.update(t.strip().lower() for t in value.split(b",") if t.strip())
    # "close" and "keep-alive" are connection options, not field names (RFC 9112 §9.3, §9.6)
    return named - {b"close", b"keep-alive"}


@given(fields=_request_fields(), via=st.sampled_from([VIA, None]))
def test_prepare_request_never_forwards_hop_by_hop_fields(
    fields: list[Header], via: bytes | None
) -> None:
    """RFC 9110 §7.6.1, §7.6.3, RFC 9112 §3.2.2, §6.1: for any field list, the outgoing list is
    Host first, then exactly the received end-to-end fields (no hop-by-hop name, nothing named by
    Connection, no received Host) in their order and spelling, then the proxy's own ``TE:
    trailers`` (only when the client accepts trailers) and Via."""
    lowered = {name.lower() for name, _ in fields}
    assume(not ({b"content-length", b"transfer-encoding"} <= lowered))
    try:
        facts = prepare(fields, via=via)
    except LoopDetected:
        return  # a random Via naming the pseudonym is impossible here (values lack "proxyd-test")
    out = facts.headers
    assert out[0] == HOST
    tail: list[Header] = []
    if facts.accepts_trailers:
        tail.append((b"TE", b"trailers"))
        tail.append((b"Connection", b"TE"))  # RFC 9110 §10.1.4
    if via is not None:
        tail.append((b"Via", via))
    assert out[len(out) - len(tail) :] == tail
    middle = out[1 : len(out) - len(tail)]
    # Connection can never name the framing away (a "Connection: Content-Length" desync).
    named = _named_by_connection(fields) - {b"content-length", b"transfer-encoding"}
    for name, _ in middle:
        assert name.lower() not in HOP_BY_HOP
        assert name.lower() not in named
        assert name.lower() != b"host"
    expected = [
        (name, value)
        for name, value in fields
        if name.lower() not in HOP_BY_HOP | named | {b"host"}
    ]
    assert middle == expected


@given(fields=_request_fields())
def test_prepare_request_only_raises_its_documented_errors(fields: list[Header]) -> None:
    """RFC 9112 §6.1 (CL+TE), RFC 9110 §7.6.2 (Max-Forwards), §7.6.3 (loops): the only failures
    are BadRequest and LoopDetected, and CL+TE always fails."""
    lowered = {name.lower() for name, _ in fields}
    try:
        prepare(fields, max_forwards_method=True)
    except (BadRequest, LoopDetected):
        return
    assert not ({b"content-length", b"transfer-encoding"} <= lowered)


@given(fields=_request_fields())
def test_prepare_response_never_forwards_hop_by_hop_fields(fields: list[Header]) -> None:
    """RFC 9110 §7.6.1 / RFC 9112 §6.3: a relayed response carries no hop-by-hop field (except
    Proxy-Authorization, not a response field), nothing Connection names, and no Content-Length
    next to a Transfer-Encoding; the rest keeps its order, and Via comes last."""
    out = prepare_response(fields, via=VIA)
    assert out[-1] == OUR_VIA
    # Connection can never name the framing away (rules._FRAMING): the body would desync.
    named = _named_by_connection(fields) - {b"content-length", b"transfer-encoding"}
    had_te = any(name.lower() == b"transfer-encoding" for name, _ in fields)
    drop = (HOP_BY_HOP - {b"proxy-authorization"}) | named
    if had_te:
        drop = drop | {b"content-length"}
    assert out[:-1] == [(n, v) for n, v in fields if n.lower() not in drop]


# --- names already lowercased (http.fastpath hands them over) ------------------------------------

FIELD_NAMES = st.sampled_from(
    [b"Host", b"Connection", b"TE", b"te", b"Via", b"X-Forwarded-For", b"Keep-Alive", b"Accept",
     b"Proxy-Authorization", b"Max-Forwards", b"Upgrade", b"Content-Length"]
)  # fmt: skip
FIELD_VALUES = st.sampled_from(
    [b"keep-alive", b"close", b"trailers", b"1.1 other", b"5", b"x", b"accept, te"]
)


@given(
    fields=st.lists(st.tuples(FIELD_NAMES, FIELD_VALUES), max_size=6), max_forwards=st.booleans()
)
def test_lowered_names_given_give_the_same_facts(fields: list[Header], max_forwards: bool) -> None:
    """``lowered_names`` only saves lowercasing again: the facts and the fields that go on are
    the same as without it (or the same error)."""

    def run(lowered: list[bytes] | None) -> RequestFacts | str:
        try:
            return prepare_request(
                fields,
                authority=AUTHORITY,
                via=VIA,
                pseudonym=PSEUDONYM,
                is_max_forwards_method=max_forwards,
                lowered_names=lowered,
            )
        except (BadRequest, LoopDetected) as exc:
            return repr(exc)

    assert run([name.lower() for name, _ in fields]) == run(None)

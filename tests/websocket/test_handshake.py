"""The opening handshake on both hops (pure): validation tables, headers, deflate per hop."""

from __future__ import annotations

import base64

import pytest

from proxyd.errors import BadRequest, BadResponse
from proxyd.websocket.handshake import (
    UPSTREAM_DEFLATE_OFFER,
    accept_token,
    check_client_upgrade,
    check_origin_accept,
    client_accept_head,
    is_websocket_upgrade,
    negotiate_client_deflate,
    new_key,
    parse_extensions,
    upstream_request_headers,
)

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 §1.3's example
GOOD = [
    (b"Host", b"example.test"),
    (b"Upgrade", b"websocket"),
    (b"Connection", b"keep-alive, Upgrade"),
    (b"Sec-WebSocket-Key", KEY),
    (b"Sec-WebSocket-Version", b"13"),
    (b"Origin", b"http://example.test"),
    (b"Sec-WebSocket-Protocol", b"chat, superchat"),
    (b"Sec-WebSocket-Protocol", b"v3"),
    (b"Sec-WebSocket-Extensions", b"permessage-deflate; client_max_window_bits, x-custom"),
]


def test_accept_token_matches_rfc_6455_example() -> None:
    assert accept_token(KEY) == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_new_key_is_16_bytes_in_base64() -> None:
    assert len(base64.b64decode(new_key(bytes(range(16))))) == 16
    with pytest.raises(ValueError):
        new_key(b"short")


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"upgrade", b"websocket")], True),
        ([(b"Upgrade", b"WebSocket")], True),
        ([(b"UPGRADE", b"h2c, websocket")], True),
        ([(b"upgrade", b"h2c")], False),
        ([(b"x-upgrade", b"websocket")], False),
        ([], False),
    ],
)
def test_is_websocket_upgrade(headers: list[tuple[bytes, bytes]], expected: bool) -> None:
    assert is_websocket_upgrade(headers) is expected


def test_a_good_upgrade_collects_protocols_and_deflate_offers() -> None:
    upgrade = check_client_upgrade(b"GET", b"1.1", GOOD)
    assert upgrade.key == KEY
    assert upgrade.protocols == (b"chat", b"superchat", b"v3")
    assert upgrade.deflate_offers == ("permessage-deflate; client_max_window_bits",)


def _without(name: bytes) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in GOOD if k.lower() != name]


def _replace(name: bytes, value: bytes) -> list[tuple[bytes, bytes]]:
    return [*_without(name), (name, value)]


@pytest.mark.parametrize(
    ("method", "version", "headers", "reason"),
    [
        (b"POST", b"1.1", GOOD, "must be a GET"),
        (b"GET", b"1.0", GOOD, "needs HTTP/1.1"),
        (b"GET", b"1.1", _replace(b"upgrade", b"h2c"), "Upgrade: websocket"),
        (b"GET", b"1.1", _without(b"connection"), "Connection: Upgrade"),
        (b"GET", b"1.1", _replace(b"connection", b"close"), "Connection: Upgrade"),
        (b"GET", b"1.1", _without(b"sec-websocket-version"), "Version must be 13"),
        (b"GET", b"1.1", _replace(b"sec-websocket-version", b"8"), "Version must be 13"),
        (b"GET", b"1.1", [*GOOD, (b"Sec-WebSocket-Version", b"13")], "Version must be 13"),
        (b"GET", b"1.1", _without(b"sec-websocket-key"), "exactly one Sec-WebSocket-Key"),
        (b"GET", b"1.1", [*GOOD, (b"Sec-WebSocket-Key", KEY)], "exactly one"),
        (b"GET", b"1.1", _replace(b"sec-websocket-key", b"short=="), "16 bytes"),
        (b"GET", b"1.1", _replace(b"sec-websocket-key", b"not base64!!"), "16 bytes"),
        (b"GET", b"1.1", [*GOOD, (b"Content-Length", b"5")], "no body"),
        (b"GET", b"1.1", [*GOOD, (b"Transfer-Encoding", b"chunked")], "no body"),
    ],
)
def test_bad_upgrades_are_400_with_the_reason(
    method: bytes, version: bytes, headers: list[tuple[bytes, bytes]], reason: str
) -> None:
    with pytest.raises(BadRequest) as caught:
        check_client_upgrade(method, version, headers)
    assert caught.value.status == 400
    assert reason in caught.value.detail


def test_content_length_zero_is_fine() -> None:
    check_client_upgrade(b"GET", b"1.1", [*GOOD, (b"Content-Length", b"0")])


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"permessage-deflate", ["permessage-deflate"]),
        (
            b"permessage-deflate; client_max_window_bits",
            ["permessage-deflate; client_max_window_bits"],
        ),
        (
            b'permessage-deflate; server_max_window_bits="10"; CLIENT_NO_CONTEXT_TAKEOVER',
            ["permessage-deflate; server_max_window_bits=10; client_no_context_takeover"],
        ),
        # unacceptable offers are dropped; a later fallback offer is kept (RFC 7692 §5)
        (
            b"permessage-deflate; server_max_window_bits=8, permessage-deflate",
            ["permessage-deflate"],
        ),
        (b"permessage-deflate; server_max_window_bits", []),
        (b"permessage-deflate; client_no_context_takeover=1", []),
        (b"permessage-deflate; mystery", []),
        (b"permessage-deflate; server_no_context_takeover; server_no_context_takeover", []),
        (b"x-webkit-deflate-frame", []),
    ],
)
def test_deflate_offers_are_validated(header: bytes, expected: list[str]) -> None:
    headers = _replace(b"sec-websocket-extensions", header)
    assert list(check_client_upgrade(b"GET", b"1.1", headers).deflate_offers) == expected


def test_parse_extensions_over_several_lines() -> None:
    assert parse_extensions([b"a; x=1, b", b"c; y"]) == [
        ("a", (("x", "1"),)),
        ("b", ()),
        ("c", (("y", None),)),
    ]


@pytest.mark.parametrize(
    ("offers", "answer"),
    [
        ((), None),
        (("permessage-deflate",), b"permessage-deflate"),
        (
            ("permessage-deflate; client_max_window_bits",),
            b"permessage-deflate; client_max_window_bits=15",
        ),
        (
            ("permessage-deflate; server_no_context_takeover; server_max_window_bits=10",),
            b"permessage-deflate; server_no_context_takeover; server_max_window_bits=10",
        ),
    ],
)
def test_client_hop_deflate_answer(offers: tuple[str, ...], answer: bytes | None) -> None:
    negotiated = negotiate_client_deflate(offers, 1 << 20)
    if answer is None:
        assert negotiated is None
        return
    assert negotiated is not None
    extension, value = negotiated
    assert value == answer
    assert extension.enabled()
    assert extension.max_message_size == 1 << 20


def test_upstream_request_has_our_key_and_the_client_end_to_end_fields() -> None:
    end_to_end = [
        (b"Host", b"example.test"),
        (b"Origin", b"http://example.test"),
        (b"Cookie", b"a=1"),
        (b"Sec-WebSocket-Protocol", b"chat, superchat"),
        (b"Sec-WebSocket-Key", KEY),
        (b"Sec-WebSocket-Version", b"13"),
        (b"Sec-WebSocket-Extensions", b"permessage-deflate"),
        (b"Via", b"1.1 proxyd"),
    ]
    ours = new_key(b"k" * 16)
    headers = upstream_request_headers(end_to_end, ours, offer_deflate=True)
    assert headers == [
        (b"Host", b"example.test"),
        (b"Origin", b"http://example.test"),
        (b"Cookie", b"a=1"),
        (b"Sec-WebSocket-Protocol", b"chat, superchat"),
        (b"Via", b"1.1 proxyd"),
        (b"Upgrade", b"websocket"),
        (b"Connection", b"Upgrade"),
        (b"Sec-WebSocket-Key", ours),
        (b"Sec-WebSocket-Version", b"13"),
        (b"Sec-WebSocket-Extensions", UPSTREAM_DEFLATE_OFFER),
    ]
    plain = upstream_request_headers(end_to_end, ours, offer_deflate=False)
    assert not any(name == b"Sec-WebSocket-Extensions" for name, _ in plain)


OURS = new_key(b"q" * 16)


def origin_101(**extra: bytes) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"Upgrade", b"websocket"),
        (b"Connection", b"Upgrade"),
        (b"Sec-WebSocket-Accept", accept_token(OURS)),
        (b"Set-Cookie", b"session=1"),
        (b"Keep-Alive", b"timeout=5"),
    ]
    headers += [(name.replace("_", "-").encode(), value) for name, value in extra.items()]
    return headers


def check(headers: list[tuple[bytes, bytes]], *, deflate: bool = False) -> object:
    return check_origin_accept(
        headers,
        OURS,
        (b"chat", b"superchat"),
        offered_deflate=deflate,
        max_message_size=1000,
        via=b"1.1 proxyd",
    )


def test_origin_101_is_accepted_and_its_end_to_end_fields_passed_on() -> None:
    accepted = check_origin_accept(
        origin_101(Sec_WebSocket_Protocol=b"superchat"),
        OURS,
        (b"chat", b"superchat"),
        offered_deflate=False,
        max_message_size=1000,
        via=b"1.1 proxyd",
    )
    assert accepted.subprotocol == b"superchat"
    assert accepted.deflate is None
    assert accepted.headers == [(b"Set-Cookie", b"session=1"), (b"Via", b"1.1 proxyd")]


def test_origin_deflate_answer_configures_the_origin_hop() -> None:
    accepted = check_origin_accept(
        origin_101(
            Sec_WebSocket_Extensions=b"permessage-deflate; server_no_context_takeover; "
            b"client_max_window_bits=10"
        ),
        OURS,
        (),
        offered_deflate=True,
        max_message_size=1000,
        via=None,
    )
    assert accepted.deflate is not None
    assert accepted.deflate.enabled()
    assert accepted.deflate.server_no_context_takeover
    assert accepted.deflate.client_max_window_bits == 10


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ([(k, v) for k, v in origin_101() if k != b"Upgrade"], "Upgrade: websocket"),
        ([(k, v) for k, v in origin_101() if k != b"Connection"], "Connection: Upgrade"),
        (
            [
                *[(k, v) for k, v in origin_101() if k != b"Sec-WebSocket-Accept"],
                (b"Sec-WebSocket-Accept", accept_token(KEY)),
            ],
            "does not match",
        ),
        (origin_101(Sec_WebSocket_Protocol=b"other"), "did not offer"),
        (origin_101(Sec_WebSocket_Extensions=b"permessage-deflate"), "did not offer"),
        (origin_101(Sec_WebSocket_Extensions=b"x-custom"), "did not offer"),
    ],
)
def test_bad_origin_101_is_502(headers: list[tuple[bytes, bytes]], reason: str) -> None:
    with pytest.raises(BadResponse) as caught:
        check(headers)
    assert caught.value.status == 502
    assert reason in caught.value.detail


def test_bad_origin_deflate_parameters_are_502() -> None:
    with pytest.raises(BadResponse):
        check(origin_101(Sec_WebSocket_Extensions=b"permessage-deflate; foo=1"), deflate=True)
    with pytest.raises(BadResponse):
        # client_max_window_bits needs a value in a response (RFC 7692 §7.1.2.2)
        check(
            origin_101(Sec_WebSocket_Extensions=b"permessage-deflate; client_max_window_bits"),
            deflate=True,
        )


def test_client_101_head() -> None:
    head = client_accept_head(
        KEY, b"chat", b"permessage-deflate", [(b"Set-Cookie", b"a=1"), (b"Via", b"1.1 proxyd")]
    )
    assert head == (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
        b"Sec-WebSocket-Protocol: chat\r\n"
        b"Sec-WebSocket-Extensions: permessage-deflate\r\n"
        b"Set-Cookie: a=1\r\n"
        b"Via: 1.1 proxyd\r\n\r\n"
    )
    bare = client_accept_head(KEY, None, None, [])
    assert b"Sec-WebSocket-Protocol" not in bare and b"Extensions" not in bare

"""The opening handshake on both hops (pure: no I/O, no clock, no randomness of its own).

How it works: proxyd terminates WebSocket framing on each hop, so the handshake is per hop too.

1. ``check_client_upgrade`` validates the client's request (RFC 6455 §4.2.1: GET, HTTP/1.1,
   ``Upgrade: websocket``, ``Connection: Upgrade``, a ``Sec-WebSocket-Key`` of 16 bytes in base64,
   ``Sec-WebSocket-Version: 13``, no body) and collects what the origin hop needs: the offered
   subprotocols and permessage-deflate offers. A bad one raises ``BadRequest`` (400, with the
   reason).
2. ``upstream_request_headers`` turns the client's end-to-end fields (already filtered by
   ``http.rules.prepare_request``: Origin, Cookie, Sec-WebSocket-Protocol, User-Agent, ... plus Host
   and Via) into the origin hop's upgrade with a key of proxyd's own and proxyd's own extension
   offer: permessage-deflate is offered upstream when the client offered it.
3. ``check_origin_accept`` validates the origin's 101 (RFC 6455 §4.1 client requirements: Upgrade,
   Connection, the Accept matching *our* key, a subprotocol the client offered, only extensions we
   offered) and configures the origin hop's deflate. A bad one raises ``BadResponse`` (502).
4. ``client_accept_head`` is the 101 for the client: the Accept computed from the client's key,
   the origin's subprotocol choice, the client hop's own deflate answer, the origin's other
   end-to-end fields (Set-Cookie, ...) and Via.

permessage-deflate (RFC 7692) per hop: the client hop compresses when the client offered it and
the offer is acceptable (``negotiate_client_deflate``, wsproto's ``PerMessageDeflate.accept``);
the origin hop when the origin accepted proxyd's offer (``PerMessageDeflate.finalize``). Either can
hold without the other: each hop's frames are decoded and re-encoded.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from proxyd.errors import BadRequest, BadResponse
from proxyd.http.rules import prepare_response
from proxyd.websocket.frames import BoundedDeflate

Header = tuple[bytes, bytes]

#: RFC 6455 §1.3: the GUID appended to the key for Sec-WebSocket-Accept.
_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
DEFLATE: Final = "permessage-deflate"
#: What proxyd offers an origin: the smallest useful offer (RFC 7692 §7.1.2.2: we accept any
#: client_max_window_bits the origin picks).
UPSTREAM_DEFLATE_OFFER: Final = b"permessage-deflate; client_max_window_bits"
#: Fields that belong to one hop's WebSocket handshake and are rebuilt for the other hop.
_PER_HOP: Final = frozenset(
    {
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-accept",
    }
)
_NOT_ON_101: Final = _PER_HOP | {b"sec-websocket-protocol", b"content-length"}
_FLAGS: Final = frozenset({"server_no_context_takeover", "client_no_context_takeover"})
_BITS: Final = frozenset({"server_max_window_bits", "client_max_window_bits"})


def accept_token(key: bytes) -> bytes:
    """RFC 6455 §4.2.2 item 5.4: base64(SHA-1(key + GUID))."""
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


def new_key(random16: bytes) -> bytes:
    """A Sec-WebSocket-Key from 16 random bytes (RFC 6455 §4.1 item 7)."""
    if len(random16) != 16:
        raise ValueError("a WebSocket key is 16 random bytes")
    return base64.b64encode(random16)


def _tokens(values: Iterable[bytes]) -> list[bytes]:
    return [token.strip().lower() for value in values for token in value.split(b",") if token]


_NONE: Final[list[bytes]] = []


def _fields(headers: Iterable[Header], names: frozenset[bytes]) -> dict[bytes, list[bytes]]:
    """The values of each of ``names`` (lowercase) in one pass over the fields, in order (a
    check reads several: one pass each lowercased every field name again and again)."""
    found: dict[bytes, list[bytes]] = {}
    for field, value in headers:
        name = field.lower()
        if name in names:
            values = found.get(name)
            if values is None:
                found[name] = [value]
            else:
                values.append(value)
    return found


_CLIENT_FIELDS: Final = frozenset(
    {
        b"upgrade",
        b"connection",
        b"sec-websocket-version",
        b"sec-websocket-key",
        b"content-length",
        b"transfer-encoding",
        b"sec-websocket-protocol",
        b"sec-websocket-extensions",
    }
)
_ORIGIN_FIELDS: Final = frozenset(
    {
        b"upgrade",
        b"connection",
        b"sec-websocket-accept",
        b"sec-websocket-protocol",
        b"sec-websocket-extensions",
    }
)


def is_websocket_upgrade(headers: Iterable[Header]) -> bool:
    """The request asks for ``Upgrade: websocket`` (RFC 9110 §7.8 tokens, any case). On the
    per-request path: a length test skips every other field before any lower-casing."""
    for name, value in headers:
        if len(name) == 7 and name.lower() == b"upgrade" and b"websocket" in _tokens((value,)):
            return True
    return False


# --- Sec-WebSocket-Extensions -----------------------------------------------------------------

Extension = tuple[str, tuple[tuple[str, str | None], ...]]


def parse_extensions(values: Iterable[bytes]) -> list[Extension]:
    """RFC 6455 §9.1: ``name; param; param=value, name2`` over any number of field lines.
    Quoted values lose their quotes (RFC 7692 §7.1: the window bits may be quoted)."""
    result: list[Extension] = []
    for value in values:
        text = value.decode("latin-1")
        for item in text.split(","):
            parts = [part.strip() for part in item.split(";")]
            if not parts[0]:
                continue
            params: list[tuple[str, str | None]] = []
            for part in parts[1:]:
                if not part:
                    continue
                key, sep, raw = part.partition("=")
                param_value = raw.strip().strip('"') if sep else None
                params.append((key.strip().lower(), param_value))
            result.append((parts[0].lower(), tuple(params)))
    return result


def _canonical_deflate(params: Sequence[tuple[str, str | None]], *, offer: bool) -> str | None:
    """The params as ``permessage-deflate; a; b=9`` for wsproto, or None when RFC 7692 §7 does
    not allow them (unknown or repeated params, flags with values, window bits outside 8..15).
    In an offer client_max_window_bits may have no value; in a response it needs one.

    Window bits 8 (RFC 7692 §7.1.2: legal) only where proxyd inflates: a response's
    server_max_window_bits=8 is the origin's promise to use a window of at most 256 bytes, and
    inflating with the full 15-bit window reads any smaller window's stream, so it is accepted
    and left out (wsproto's default, 15). Where proxyd would have to *compress* with 8 bits
    (client_max_window_bits=8 in a response, server_max_window_bits=8 in a client's offer), it
    refuses: zlib cannot produce a raw deflate stream with a 256-byte window. A client's
    client_max_window_bits=8 is refused too: wsproto cannot configure it."""
    seen: set[str] = set()
    out = [DEFLATE]
    for name, value in params:
        if name in seen:
            return None
        seen.add(name)
        if name in _FLAGS:
            if value is not None:
                return None
            out.append(name)
        elif name in _BITS:
            if value is None:
                if not (offer and name == "client_max_window_bits"):
                    return None
                out.append(name)
                continue
            if not value.isdigit() or not 8 <= int(value) <= 15:
                return None
            if int(value) == 8:
                if offer or name != "server_max_window_bits":
                    return None
                continue  # inflate with 15 bits (see above)
            out.append(f"{name}={int(value)}")
        else:
            return None
    return "; ".join(out)


def negotiate_client_deflate(
    offers: Sequence[str], max_message_size: int
) -> tuple[BoundedDeflate, bytes] | None:
    """The client hop's deflate: the first acceptable offer, accepted by wsproto. Returns the
    configured extension and the Sec-WebSocket-Extensions value for the 101, or None."""
    for offer in offers:
        extension = BoundedDeflate(max_message_size)
        answer = extension.accept(offer)
        if answer is None or answer is False:
            continue
        value = DEFLATE if answer is True or not answer else f"{DEFLATE}; {answer}"
        return extension, value.encode("ascii")
    return None


# --- the client's upgrade ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientUpgrade:
    key: bytes
    #: Offered subprotocols in order (RFC 6455 §4.1 item 10), as tokens.
    protocols: tuple[bytes, ...]
    #: Acceptable permessage-deflate offers, canonical, in the client's order of preference.
    deflate_offers: tuple[str, ...]


def check_client_upgrade(
    method: bytes, http_version: bytes, headers: Sequence[Header]
) -> ClientUpgrade:
    """Validate a client's upgrade (RFC 6455 §4.2.1); BadRequest names what is wrong."""
    if method != b"GET":
        raise BadRequest("a WebSocket upgrade must be a GET request (RFC 6455 §4.1)")
    if http_version != b"1.1":
        raise BadRequest("a WebSocket upgrade needs HTTP/1.1 (RFC 6455 §4.1)")
    fields = _fields(headers, _CLIENT_FIELDS)
    if b"websocket" not in _tokens(fields.get(b"upgrade", _NONE)):
        raise BadRequest("a WebSocket upgrade needs Upgrade: websocket")
    if b"upgrade" not in _tokens(fields.get(b"connection", _NONE)):
        raise BadRequest("a WebSocket upgrade needs Connection: Upgrade (RFC 6455 §4.2.1)")
    versions = fields.get(b"sec-websocket-version", _NONE)
    if [v.strip() for v in versions] != [b"13"]:
        raise BadRequest("Sec-WebSocket-Version must be 13 (RFC 6455 §4.2.1)")
    keys = fields.get(b"sec-websocket-key", _NONE)
    if len(keys) != 1:
        raise BadRequest("a WebSocket upgrade needs exactly one Sec-WebSocket-Key")
    key = keys[0].strip()
    try:
        decoded = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    if len(decoded) != 16:
        raise BadRequest("Sec-WebSocket-Key must be 16 bytes in base64 (RFC 6455 §4.1)")
    for length in fields.get(b"content-length", _NONE):
        if length.strip() != b"0":
            raise BadRequest("a WebSocket upgrade carries no body")
    if b"transfer-encoding" in fields:
        raise BadRequest("a WebSocket upgrade carries no body")
    protocols = tuple(
        token.strip()
        for value in fields.get(b"sec-websocket-protocol", _NONE)
        for token in value.split(b",")
        if token.strip()
    )
    offers = tuple(
        canonical
        for name, params in parse_extensions(fields.get(b"sec-websocket-extensions", _NONE))
        if name == DEFLATE and (canonical := _canonical_deflate(params, offer=True)) is not None
    )
    return ClientUpgrade(key=key, protocols=protocols, deflate_offers=offers)


def upstream_request_headers(
    end_to_end: Iterable[Header], key: bytes, *, offer_deflate: bool
) -> list[Header]:
    """The origin hop's upgrade fields: the client's end-to-end fields (Host first, Via last, as
    ``prepare_request`` made them) minus the per-hop WebSocket fields, plus ours."""
    out = [(name, value) for name, value in end_to_end if name.lower() not in _PER_HOP]
    out.append((b"Upgrade", b"websocket"))
    out.append((b"Connection", b"Upgrade"))
    out.append((b"Sec-WebSocket-Key", key))
    out.append((b"Sec-WebSocket-Version", b"13"))
    if offer_deflate:
        out.append((b"Sec-WebSocket-Extensions", UPSTREAM_DEFLATE_OFFER))
    return out


# --- the origin's answer ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OriginAccept:
    subprotocol: bytes | None
    #: The origin hop's deflate, configured from the origin's answer (None: plain frames).
    deflate: BoundedDeflate | None
    #: The origin's end-to-end fields to pass on in the client's 101 (Set-Cookie, ...), with Via.
    headers: list[Header]


def check_origin_accept(
    headers: Sequence[Header],
    key: bytes,
    offered_protocols: Sequence[bytes],
    *,
    offered_deflate: bool,
    max_message_size: int,
    via: bytes | None,
) -> OriginAccept:
    """Validate the origin's 101 for our ``key`` (RFC 6455 §4.1, the client's checks 1-6)."""
    fields = _fields(headers, _ORIGIN_FIELDS)
    if b"websocket" not in _tokens(fields.get(b"upgrade", _NONE)):
        raise BadResponse("the origin's 101 does not say Upgrade: websocket")
    if b"upgrade" not in _tokens(fields.get(b"connection", _NONE)):
        raise BadResponse("the origin's 101 does not say Connection: Upgrade")
    accepts = fields.get(b"sec-websocket-accept", _NONE)
    if [a.strip() for a in accepts] != [accept_token(key)]:
        raise BadResponse("the origin's Sec-WebSocket-Accept does not match the key")
    chosen = [p.strip() for p in fields.get(b"sec-websocket-protocol", _NONE)]
    subprotocol: bytes | None = None
    if chosen:
        if len(chosen) != 1 or chosen[0] not in offered_protocols:
            raise BadResponse("the origin chose a subprotocol the client did not offer")
        subprotocol = chosen[0]
    deflate: BoundedDeflate | None = None
    for name, params in parse_extensions(fields.get(b"sec-websocket-extensions", _NONE)):
        if name != DEFLATE or not offered_deflate or deflate is not None:
            raise BadResponse(f"the origin accepted an extension proxyd did not offer: {name}")
        canonical = _canonical_deflate(params, offer=False)
        if canonical is None:
            raise BadResponse("the origin's permessage-deflate parameters are not acceptable")
        deflate = BoundedDeflate(max_message_size)
        deflate.finalize(canonical)
    passed = [
        (name, value)
        for name, value in prepare_response(headers, via=via)
        if name.lower() not in _NOT_ON_101
    ]
    return OriginAccept(subprotocol=subprotocol, deflate=deflate, headers=passed)


def client_accept_head(
    client_key: bytes,
    subprotocol: bytes | None,
    extensions: bytes | None,
    passed: Iterable[Header],
) -> bytes:
    """The 101 for the client (RFC 6455 §4.2.2 item 5), as bytes ready for the wire."""
    lines = [
        b"HTTP/1.1 101 Switching Protocols",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Accept: " + accept_token(client_key),
    ]
    if subprotocol is not None:
        lines.append(b"Sec-WebSocket-Protocol: " + subprotocol)
    if extensions is not None:
        lines.append(b"Sec-WebSocket-Extensions: " + extensions)
    lines.extend(name + b": " + value for name, value in passed)
    return b"\r\n".join(lines) + b"\r\n\r\n"


__all__ = [
    "UPSTREAM_DEFLATE_OFFER",
    "ClientUpgrade",
    "OriginAccept",
    "accept_token",
    "check_client_upgrade",
    "check_origin_accept",
    "client_accept_head",
    "is_websocket_upgrade",
    "negotiate_client_deflate",
    "new_key",
    "parse_extensions",
    "upstream_request_headers",
]

"""Message rules a forward proxy applies between the two hops (pure: no I/O, no clock).

One pass over the client's header fields collects the facts the proxy acts on (``RequestFacts``)
and builds the field list sent upstream; one pass over the origin's fields builds the list sent
back. The rules, with the RFC text that asks for them:

- Hop-by-hop fields are removed (RFC 9110 §7.6.1): Connection and every field it names, Keep-Alive,
  Proxy-Connection, TE, Trailer, Transfer-Encoding, Upgrade, and the credentials meant for us
  (Proxy-Authorization, RFC 9110 §11.7.2). Framing is re-derived by h11 for each hop.
- Host is rewritten from the target URI (RFC 9112 §3.2.2: a proxy MUST ignore a received Host and
  replace it with the target's authority). It goes first, as h11 writes it.
- ``Via: <received-protocol> <pseudonym>`` is appended in both directions (RFC 9110 §7.6.3); a
  request whose Via already names our pseudonym has looped back to us (508, RFC 9209
  proxy_loop_detected).
- Max-Forwards on OPTIONS and TRACE (RFC 9110 §7.6.2): 0 means we answer, otherwise decrement.
- A response with both Transfer-Encoding and Content-Length loses Content-Length (RFC 9112 §6.3).
- Everything else keeps its order and spelling.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from proxyd.errors import BadRequest, LoopDetected

Header = tuple[bytes, bytes]

HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Response direction: Proxy-Authenticate is for the next client only when *we* challenge;
# an origin's is relayed as it is (RFC 9110 §11.7.1 applies it per hop, so strip a proxy's in
# upstream/ when there is an upstream proxy).
_RESPONSE_HOP_BY_HOP: Final = HOP_BY_HOP - {b"proxy-authorization"}
# Connection options can never remove the message framing: a "Connection: Content-Length" would
# otherwise turn a body into an empty message downstream (a desync). close/keep-alive are ours.
_FRAMING: Final = frozenset({b"content-length", b"transfer-encoding", b"close", b"keep-alive"})


@dataclass(slots=True)
class RequestFacts:
    """What the proxy needs to know about a request, gathered in the same pass."""

    headers: list[Header] = field(default_factory=list)
    proxy_authorization: bytes | None = None
    accepts_trailers: bool = False
    expects_continue: bool = False
    max_forwards: int | None = None
    has_content_length: bool = False
    has_transfer_encoding: bool = False
    upgrade: bytes | None = None
    connection_close: bool = False


def _connection_tokens(value: bytes) -> Iterable[bytes]:
    for token in value.split(b","):
        token = token.strip().lower()
        if token:
            yield token


def _via_names(value: bytes) -> Iterable[bytes]:
    """The received-by part of each Via member: ``1.1 name (comment), HTTP/1.0 other``."""
    for member in value.split(b","):
        parts = member.split()
        if len(parts) >= 2:
            yield parts[1].lower()


def prepare_request(
    raw_headers: Iterable[Header],
    *,
    authority: bytes,
    via: bytes | None,
    pseudonym: bytes,
    is_max_forwards_method: bool,
    lowered_names: Sequence[bytes] | None = None,
) -> RequestFacts:
    """Filter the client's fields for the upstream hop and collect the facts.

    ``via`` is our ``Via`` member to append (``b"1.1 name"``) or None when Via is turned off;
    ``pseudonym`` is always used for loop detection. ``lowered_names``: the field names already
    lowercased, in order, when the caller has them (http.fastpath). Raises LoopDetected and
    BadRequest.
    """
    facts = RequestFacts()
    items = list(raw_headers)
    named: set[bytes] = set()
    lowered = [name.lower() for name, _ in items] if lowered_names is None else lowered_names
    pseudonym_lower = pseudonym.lower()
    for (_, value), lower in zip(items, lowered, strict=True):
        if lower == b"connection":
            for token in _connection_tokens(value):
                if token == b"close":
                    facts.connection_close = True
                elif token not in _FRAMING:
                    named.add(token)
        elif lower == b"proxy-authorization":
            facts.proxy_authorization = value
        elif lower == b"te":
            # RFC 9110 §10.1.4: a comma list, possibly over several lines; "trailers" a token.
            if any(t.split(b";")[0].strip() == b"trailers" for t in _connection_tokens(value)):
                facts.accepts_trailers = True
        elif lower == b"expect":
            if value.strip().lower() == b"100-continue":
                facts.expects_continue = True
        elif lower == b"content-length":
            facts.has_content_length = True
        elif lower == b"transfer-encoding":
            facts.has_transfer_encoding = True
        elif lower == b"upgrade":
            facts.upgrade = value
        elif lower == b"via":
            if pseudonym_lower in value.lower() and pseudonym_lower in _via_names(value):
                raise LoopDetected("the request already passed through this proxy (Via)")
        elif lower == b"max-forwards" and is_max_forwards_method:
            text = value.strip()
            if not text.isdigit():
                raise BadRequest("Max-Forwards must be a number")
            facts.max_forwards = int(text)
    if facts.has_content_length and facts.has_transfer_encoding:
        # RFC 9112 §6.1: a request with both is ambiguous (a smuggling vector); reject it.
        raise BadRequest("both Content-Length and Transfer-Encoding (ambiguous framing)")
    out = facts.headers
    out.append((b"Host", authority))
    for (name, value), lower in zip(items, lowered, strict=True):
        if lower in HOP_BY_HOP or lower == b"host" or lower in named:
            continue
        if lower == b"max-forwards" and facts.max_forwards is not None:
            value = str(facts.max_forwards - 1).encode("ascii")
        out.append((name, value))
    if facts.accepts_trailers:
        # TE is hop-by-hop; we can pass trailers on, so we may ask the origin for them.
        out.append((b"TE", b"trailers"))
        out.append((b"Connection", b"TE"))  # RFC 9110 §10.1.4: a sender of TE must list it
    if via is not None:
        out.append((b"Via", via))
    return facts


def prepare_response(raw_headers: Iterable[Header], *, via: bytes | None) -> list[Header]:
    """Filter the origin's fields for the client hop (see the module docstring).

    One pass for the common response (a Connection field naming only ``keep-alive``/``close``,
    no Transfer-Encoding); a second one only when fields must go that the pass already kept: a
    field a Connection option names may come before that Connection field."""
    out: list[Header] = []
    named: set[bytes] | None = None
    has_te = False
    for item in raw_headers:
        lower = item[0].lower()
        if lower in _RESPONSE_HOP_BY_HOP:
            if lower == b"connection":
                for token in _connection_tokens(item[1]):
                    if token not in _FRAMING:
                        if named is None:
                            named = set()
                        named.add(token)
            elif lower == b"transfer-encoding":
                has_te = True
            continue
        out.append(item)
    if named is not None or has_te:
        drop = named or set()
        if has_te:
            drop = drop | {b"content-length"}  # RFC 9112 §6.3: Transfer-Encoding wins
        out = [item for item in out if item[0].lower() not in drop]
    if via is not None:
        out.append((b"Via", via))
    return out


def via_member(http_version: bytes, pseudonym: bytes) -> bytes:
    """RFC 9110 §7.6.3: received-protocol is the version the previous hop spoke to us."""
    return http_version + b" " + pseudonym


_SENSITIVE_FOR_TRACE: Final = frozenset({b"authorization", b"proxy-authorization", b"cookie"})


def trace_body(
    method: bytes, target: bytes, http_version: bytes, raw_headers: Iterable[Header]
) -> bytes:
    """The message/http echo a TRACE answered by us carries (RFC 9110 §9.3.8), minus credentials."""
    lines = [method + b" " + target + b" HTTP/" + http_version]
    lines.extend(
        name + b": " + value
        for name, value in raw_headers
        if name.lower() not in _SENSITIVE_FOR_TRACE
    )
    return b"\r\n".join(lines) + b"\r\n\r\n"

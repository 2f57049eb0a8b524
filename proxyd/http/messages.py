"""Request targets, raw head checks and the proxy's own short responses (pure, no I/O).

A forward proxy receives request targets in two forms (RFC 9112 §3.2): absolute form for every
method but CONNECT (``GET http://host:port/path HTTP/1.1``) and authority form for CONNECT
(``CONNECT host:port HTTP/1.1``). ``parse_absolute_target`` and ``parse_authority`` split them
into a ``Target`` without urllib (it is on the per-request path and urllib is several times slower).

``check_head_bytes`` rejects the framing tricks h11 tolerates but a proxy must not forward
(RFC 9112 §2.2 bare LF, §5.2 obs-fold); h11 itself rejects NUL, bare CR and bad field syntax.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final

from proxyd.errors import (
    BadRequest,
    HeadTooLarge,
    NotAProxyRequest,
    ProxydError,
    SchemeNotSupported,
)

DEFAULT_PORTS: Final = {b"http": 80, b"https": 443, b"ws": 80, b"wss": 443}
_SCHEME_CHARS: Final = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789+-.")
_HOST_CHARS: Final = frozenset(
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=%"
)


@dataclass(slots=True)
class Target:
    """A request target, split. Made for every request, so not ``frozen`` (a frozen dataclass
    sets each field through ``object.__setattr__``: four times the cost); never changed after
    it is made, and never a dict key (``origin_key`` is)."""

    scheme: bytes  # b"http", b"https", ... lower case
    host: str  # lower case; an IPv6 literal without brackets
    port: int
    authority: bytes  # what goes in Host: "host" or "host:port" (default port omitted)
    path: bytes  # origin form: "/path?query", never empty
    has_path: bool = True  # False for "http://host" (no path, no query): OPTIONS becomes "*"

    @property
    def origin_key(self) -> tuple[bytes, str, int]:
        return (self.scheme, self.host, self.port)


def _split_host_port(authority: bytes, default_port: int | None) -> tuple[str, int]:
    """Split ``host[:port]`` / ``[v6]:port``; raise BadRequest on anything malformed."""
    if not authority:
        raise BadRequest("the request target has no host")
    if b"@" in authority:
        # RFC 9110 §4.2.4: userinfo in an http(s) URI is deprecated and treated as an error.
        raise BadRequest("the request target carries user:password@ (not allowed)")
    if authority[0] == 0x5B:  # "[": an IPv6 literal
        end = authority.find(b"]")
        if end < 0:
            raise BadRequest("unterminated IPv6 literal in the request target")
        host_bytes = authority[1:end]
        rest = authority[end + 1 :]
        try:
            ipaddress.IPv6Address(host_bytes.decode("ascii"))
        except ValueError:
            raise BadRequest("invalid IPv6 literal in the request target") from None
        if rest and rest[:1] != b":":
            raise BadRequest("junk after the IPv6 literal in the request target")
        port_bytes = rest[1:] if rest else b""
    else:
        host_bytes, sep, port_bytes = authority.partition(b":")
        if sep and not port_bytes:
            port_bytes = b""
        if not host_bytes or not _HOST_CHARS.issuperset(host_bytes):
            raise BadRequest("invalid host in the request target")
    if port_bytes:
        if not port_bytes.isdigit() or len(port_bytes) > 5 or not 0 < int(port_bytes) < 65536:
            raise BadRequest("invalid port in the request target")
        port = int(port_bytes)
    elif default_port is None:
        raise BadRequest("CONNECT needs host:port")
    else:
        port = default_port
    return host_bytes.decode("ascii").lower(), port


# Authorities seen lately -> (host, port, Host field value): a proxy sees the same origins over
# and over, and splitting and checking an authority is most of the cost of parsing a target.
# Bounded (emptied when full: ~0.3 KiB an entry), and only well-formed authorities get in. The
# bound is above the 10,000 origins bench/memory_bench.py keeps busy at once, so the cost of a
# request does not grow with the number of origins in use (issue 7) up to there.
_AUTHORITIES: dict[tuple[int, bytes], tuple[str, int, bytes]] = {}
_AUTHORITIES_MAX: Final = 16384


def parse_absolute_target(target: bytes) -> Target:
    """``http://Host:8080/p?q`` -> Target; origin form gets a 400 that says this is a proxy."""
    if target[:1] == b"/" or target == b"*":
        raise NotAProxyRequest(
            "this is a forward proxy: send the full URL (GET http://host/path), "
            "or configure this address as your HTTP proxy"
        )
    sep = target.find(b"://")
    scheme = target[:sep].lower() if sep > 0 else b""
    default_port = DEFAULT_PORTS.get(scheme)
    if default_port is None:
        # RFC 3986 §3.1: scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )
        if not scheme or not scheme[:1].isalpha() or not _SCHEME_CHARS.issuperset(scheme):
            raise BadRequest("the request target is not an absolute URL")
        raise SchemeNotSupported(
            f"the URL scheme {scheme.decode('ascii', 'replace')!r} is not supported"
        )
    rest = target[sep + 3 :]
    end = len(rest)
    for delimiter in (b"/", b"?", b"#"):
        pos = rest.find(delimiter)
        if 0 <= pos < end:
            end = pos
    authority = rest[:end]
    path = rest[end:]
    fragment = path.find(b"#")
    if fragment >= 0:  # RFC 9110 §4.2.5: a fragment is never sent
        path = path[:fragment]
    has_path = bool(path)
    if not path:
        path = b"/"
    elif path[:1] == b"?":
        path = b"/" + path
    key = (default_port, authority)
    known = _AUTHORITIES.get(key)
    if known is None:
        host, port = _split_host_port(authority, default_port)
        known = (host, port, _host_header(host, port, default_port))
        if len(_AUTHORITIES) >= _AUTHORITIES_MAX:
            _AUTHORITIES.clear()
        _AUTHORITIES[key] = known
    host, port, host_field = known
    return Target(scheme, host, port, host_field, path, has_path)


def parse_authority(target: bytes) -> Target:
    """CONNECT's authority form ``host:port`` (RFC 9110 §9.3.6: the port is required)."""
    host, port = _split_host_port(target, None)
    return Target(b"tcp", host, port, _host_header(host, port, None), b"")


def _host_header(host: str, port: int, default_port: int | None) -> bytes:
    name = f"[{host}]" if ":" in host else host
    if port == default_port:
        return name.encode("ascii")
    return f"{name}:{port}".encode("ascii")


# --- raw head checks --------------------------------------------------------------------------

HEAD_INCOMPLETE: Final = -1


def check_head_bytes(buffer: bytes | bytearray, max_size: int) -> int:
    """Find the end of the first head in ``buffer`` and vet its line endings.

    Returns the index just past the blank line, or ``HEAD_INCOMPLETE``. Raises BadRequest for a
    bare LF line ending (RFC 9112 §2.2 lets a server accept it; a proxy that does lets a request be
    framed differently downstream) and for obs-fold (RFC 9112 §5.2: a proxy must reject or replace
    it; we reject), HeadTooLarge when no head ends within ``max_size``.
    """
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if b"\n\n" in buffer or b"\n\r\n" in buffer:
            raise BadRequest("bare LF line ending in the request head")
        if len(buffer) > max_size:
            raise HeadTooLarge(f"the request head is larger than {max_size} bytes")
        return HEAD_INCOMPLETE
    end += 4
    if end > max_size:
        raise HeadTooLarge(f"the request head is larger than {max_size} bytes")
    head = bytes(buffer[:end]) if isinstance(buffer, bytearray) else buffer[:end]
    if head.count(b"\n") != head.count(b"\r\n"):
        raise BadRequest("bare LF line ending in the request head")
    if b"\n " in head or b"\n\t" in head:
        raise BadRequest("obsolete line folding (obs-fold) in the request head")
    return end


def transfer_coding_error_status(head: bytes | bytearray) -> int:
    """Status for a request whose Transfer-Encoding h11 refused (RFC 9112 §6.1, §6.3 item 4).

    501 when the codings end with chunked but include one we do not implement (gzip, chunked);
    400 when chunked is not the final coding or is repeated: then the body length cannot be
    determined and the request must be rejected as malformed.
    """
    codings: list[bytes] = []
    for line in bytes(head).split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"transfer-encoding":
            codings.extend(c.strip().lower() for c in value.split(b",") if c.strip())
    if codings and codings[-1] == b"chunked" and codings.count(b"chunked") == 1:
        return 501
    return 400


# --- the proxy's own responses ----------------------------------------------------------------


def reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def proxy_status_value(
    pseudonym: str, error_type: str, detail: str | None = None, next_hop: str | None = None
) -> bytes:
    """RFC 9209 §2: ``Proxy-Status: <proxy>; error=<type>; next-hop="..."; details="..."``."""
    value = f"{pseudonym}; error={error_type}"
    if next_hop:
        printable_hop = "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in next_hop)
        value += f'; next-hop="{printable_hop}"'
    if detail:
        # RFC 8941 §3.3.3: an sf-string holds printable ASCII only (0x20-0x7E), with \ and "
        # escaped; anything else becomes "?" so no detail can ever break the field.
        printable = "".join(c if " " <= c <= "~" else "?" for c in detail)
        escaped = printable.replace("\\", "\\\\").replace('"', '\\"')
        value += f'; details="{escaped}"'
    return value.encode("ascii", "replace")


def error_body(error: ProxydError) -> bytes:
    status = error.status
    phrase = reason_phrase(status).decode("ascii")
    return f"proxyd: {status} {phrase}: {error.detail} ({error.error_type})\n".encode(
        "utf-8", "replace"
    )

"""The common exchange without h11's state machine: a plain GET and a Content-Length answer.

Why. A proxied 1 KiB GET costs about 55 µs in h11 alone, even compiled (h11-mypyc): about 10 µs
to parse the request, 19 µs to parse the response head, 8 µs to re-validate the response for
sending, and the rest in its per-event state machine. That is half of proxyd's CPU per request.
Almost every request a forward proxy relays is the same simple shape, so that shape is parsed
here with h11's own grammar (the regular expressions of ``h11._abnf``, compiled once) and framed
by hand; everything else goes to h11 exactly as before.

How it works. The module is pure (no I/O) and all-or-nothing: each parser returns None for
anything outside the simple shape, and the caller then hands the same bytes to h11, which accepts
or rejects them with its usual errors. The simple shape is deliberately narrower than what h11
accepts, so that the two can never frame a message differently (a difference in framing between
two parsers on one path is how request smuggling happens):

- **Request** (``parse_request``): exactly one complete head in the buffer and nothing after it
  (no body bytes, no pipelined request); CRLF line endings only, no obs-fold; ``GET`` with an
  ``http://`` absolute-form target, ``HTTP/1.1``; exactly one Host; no Content-Length,
  Transfer-Encoding, Upgrade or Expect; a Connection field (if any) naming only keep-alive. It
  returns a ``FastRequest``: what h11's parser would build (a test checks that on generated
  heads), in a plain slotted object that costs a fifth of an ``h11.Request`` to make (whose
  keyword-argument constructor re-walks the fields), with the fields read the way proxyd reads
  an ``h11.Request``'s.
- **Response** (``parse_response``): the status line and head complete in the first read, CRLF
  line endings, no obs-fold, ``HTTP/1.1``, a status 200-599 other than 204, 304 and 407 (no body,
  or meant for the proxy: h11 and the relay's general path handle them), exactly one
  Content-Length of at most 18 digits, no Transfer-Encoding, a Connection field (if any) without
  ``close``. Its framing is then the Content-Length, which the caller relays byte for byte.
- **Writing** (``request_head``, ``response_head``): the bytes h11's writer would produce for the
  same event (status line, the Host field first, ``name: value`` lines, the blank line).

Sections: RFC 9112 §2.2 (line endings), §3 and §4 (request and status lines), §5 (fields,
§5.2 obs-fold), §6.3 (message body length), §9.3 (persistence).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import ClassVar, Final

import h11._abnf as _abnf  # h11's grammar (its readers compile these same expressions)

Header = tuple[bytes, bytes]
#: status, the head for the client, Content-Length, index of the first body byte in the buffer.
SimpleResponse = tuple[int, bytes, int, int]

# h11's grammar (``h11._abnf``), restated so that one match checks a whole head. A field line is
# ``token ":" OWS field-value OWS`` where field-value is runs of bytes other than NUL and
# whitespace, separated by runs of SP/HTAB: every string of such bytes and SP/HTAB splits that
# way, so a line is ``token ":"`` and then any bytes but NUL, CR, LF, VT and FF. The reason
# phrase of a status line is the same class. (tests/http/test_fastpath.py checks that these
# accept exactly what h11's own expressions accept.) A leading SP or HTAB (obs-fold, RFC 9112
# §5.2) is no token; a bare CR or LF is in no class.
_FIELD_LINE: Final = r"\r\n" + _abnf.token + r":[^\x00\r\n\x0b\x0c]*"
_request_head: Final = re.compile(
    (_abnf.request_line + "(?:" + _FIELD_LINE + ")*").encode("ascii")
).fullmatch
_response_head: Final = re.compile(
    (
        r"HTTP/1\.1 (?P<status_code>[0-9]{3})(?: [^\x00\r\n\x0b\x0c]*)?(?:" + _FIELD_LINE + ")*"
    ).encode("ascii")
).fullmatch
#: The response fields the fast path acts on, found in the lowercased head: framing,
#: persistence, and the hop-by-hop fields it drops (RFC 9110 §7.6.1).
_response_special: Final = re.compile(
    rb"\r\n(content-length|connection|transfer-encoding|keep-alive|proxy-connection|te|trailer"
    rb"|upgrade):"
).finditer

#: Request fields that take the request off the fast path (framing, protocol switches, 100).
_REQUEST_STOPPERS: Final = frozenset(
    {b"content-length", b"transfer-encoding", b"upgrade", b"expect"}
)
#: Statuses left to h11 and the general relay: no body by definition (RFC 9110 §15.3.5,
#: §15.4.5), or an upstream proxy's authentication challenge (RFC 9110 §15.5.8).
_SLOW_STATUSES: Final = frozenset({204, 304, 407})


def _only_keep_alive(value: bytes) -> bool:
    """A Connection field value that names no option but keep-alive (RFC 9110 §7.6.1)."""
    for token in value.split(b","):
        token = token.strip().lower()
        if token and token != b"keep-alive":
            return False
    return True


class FastHeaders:
    """A fast-path request's fields, read as proxyd reads an ``h11.Request``'s ``headers``:
    iterating gives ``(lowercased name, value)`` pairs, ``raw_items()`` the names as received.
    The list ``raw_items`` returns is the one the parser made: callers only read it."""

    __slots__ = ("_lower", "_raw")

    def __init__(self, raw: list[Header], lower: list[bytes]) -> None:
        self._raw = raw
        self._lower = lower

    def raw_items(self) -> list[Header]:
        return self._raw

    def lowered_names(self) -> list[bytes]:
        """The names lowercased, in order (``rules.prepare_request`` needs them too)."""
        return self._lower

    def __iter__(self) -> Iterator[Header]:
        return iter([(lower, raw[1]) for lower, raw in zip(self._lower, self._raw, strict=True)])

    def __len__(self) -> int:
        return len(self._raw)


class FastRequest:
    """A request ``parse_request`` took: a GET in absolute form from an HTTP/1.1 client."""

    __slots__ = ("headers", "method", "target")
    http_version: ClassVar[bytes] = b"1.1"

    def __init__(self, method: bytes, target: bytes, headers: FastHeaders) -> None:
        self.method = method
        self.target = target
        self.headers = headers


def parse_request(data: bytes, max_head: int) -> FastRequest | None:
    """The request in ``data`` when it has the simple shape (module docstring), else None."""
    end = data.find(b"\r\n\r\n")
    if end < 0 or end + 4 != len(data) or end + 4 > max_head:
        return None
    head = data[:end]
    # One match checks the request line and every field line against h11's grammar.
    match = _request_head(head)
    if match is None:
        return None
    method, target, version = match.group("method", "target", "http_version")
    if method != b"GET" or version != b"1.1" or target[:7].lower() != b"http://":
        return None
    lines = head.split(b"\r\n")
    headers: list[Header] = []
    names: list[bytes] = []
    hosts = 0
    for line in lines[1:]:
        name, _, rest = line.partition(b":")
        lower = name.lower()
        if lower == b"host":
            hosts += 1
        elif lower in _REQUEST_STOPPERS or (lower == b"connection" and not _only_keep_alive(rest)):
            return None
        headers.append((name, rest.strip(b" \t")))
        names.append(lower)
    if hosts != 1:
        return None
    return FastRequest(method, target, FastHeaders(headers, names))


def response_for_client(
    data: bytes, max_head: int, via: bytes | None, closing: bool
) -> SimpleResponse | None:
    """When the response head at the start of ``data`` has the simple shape (module docstring):
    the status, the head to send the client, the Content-Length and where the body starts.

    The client's head is the origin's with the hop-by-hop fields cut out (RFC 9110 §7.6.1),
    ``Via: <via>`` appended (§7.6.3) and ``Connection: close`` when ``closing`` (the daemon is
    draining): what ``rules.prepare_response`` and h11 make of it, except that the remaining
    field lines go as received rather than re-spelt (RFC 9112 §5.1: the whitespace around a
    value is not part of it)."""
    end = data.find(b"\r\n\r\n")
    if end < 0 or end + 4 > max_head:
        return None
    head = data[:end]
    match = _response_head(head)
    if match is None:
        return None
    status = int(head[9:12])  # the match: "HTTP/1.1 " and three digits
    if status < 200 or status > 599 or status in _SLOW_STATUSES:
        return None
    first_end = head.find(b"\r\n")
    if first_end < 0:
        first_end = end
    # RFC 9112 §4: the SP after the status code is required even without a reason phrase.
    out = [head[:first_end] if first_end > 12 else head[:12] + b" "]
    position = first_end
    length = -1
    lowered = head.lower()
    for special in _response_special(lowered, first_end):
        value_at = special.end()
        line_end = head.find(b"\r\n", value_at)
        if line_end < 0:
            line_end = end
        name = special.group(1)
        if name == b"content-length":
            value = head[value_at:line_end].strip(b" \t")
            # ASCII digits only (bytes.isdigit), as h11's Content-Length grammar.
            if length >= 0 or not value.isdigit() or len(value) > 18:
                return None  # repeated, a list or not a number: h11 judges it
            length = int(value)
            continue  # kept
        if name == b"transfer-encoding":
            return None
        if name == b"connection":
            value = lowered[value_at:line_end].strip(b" \t")
            if value != b"keep-alive" and not _only_keep_alive(value):
                return None  # close (not reusable), or options naming fields: h11's way
        out.append(head[position : special.start()])  # cut the hop-by-hop line out
        position = line_end
    if length < 0:
        return None  # delimited by close (RFC 9112 §6.3 item 8): h11
    out.append(head[position:])
    if via is not None:
        out.append(b"\r\nVia: " + via)
    out.append(b"\r\nConnection: close\r\n\r\n" if closing else b"\r\n\r\n")
    return status, b"".join(out), length, end + 4


def response_head(status: int, reason: bytes, headers: Sequence[Header]) -> bytes:
    """The response head h11 would write to an HTTP/1.1 keep-alive client for a response whose
    framing its fields already give (a Content-Length, or a status without a body): the status
    line, Host first should there be one (as h11's writer does), the fields, the blank line."""
    fields = [b"%s: %s\r\n" % item for item in headers if item[0].lower() != b"host"]
    hosts = [b"%s: %s\r\n" % item for item in headers if item[0].lower() == b"host"]
    return b"HTTP/1.1 %d %s\r\n%s\r\n" % (status, reason, b"".join(hosts + fields))


def request_head(method: bytes, target: bytes, headers: Sequence[Header]) -> bytes:
    """The request head h11 would write for a request without a body. ``headers`` come from
    ``rules.prepare_request``, which puts Host first and only there, where h11 puts it."""
    fields = b"".join([b"%s: %s\r\n" % item for item in headers])
    return b"%s %s HTTP/1.1\r\n%s\r\n" % (method, target, fields)

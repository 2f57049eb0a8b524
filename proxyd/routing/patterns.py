"""Host patterns for ``routing.bypass`` and ``routing.rules[].match`` (pure: no I/O, no clock).

The syntax is the one administrators know from ``no_proxy`` and Chromium's proxy bypass rules
(``net/proxy_resolution/proxy_bypass_rules.cc``); every form is compiled once, at start-up, into a
``HostPattern`` whose ``matches()`` is a few comparisons::

    pattern             kind      matches (host, port)
    *                   any       every host
    corp.example        exact     corp.example only (case-insensitive, a trailing dot ignored)
    .corp.example       domain    corp.example and every name below it (no_proxy / curl)
    *.corp.example      subdomain names below corp.example, not corp.example itself (Chromium)
    web*.example        glob      ``*`` matches any run of characters, dots included
    10.0.0.0/8          network   IP-literal hosts inside the CIDR (IPv4 or IPv6, ``::1/128``)
    10.1.2.3, [::1]     address   that IP-literal host (compared as addresses, not text)
    <local>             local     plain host names without a dot (IE / Chromium), never an IP
    :8080               port      any host on port 8080
    host:8080           (any of the host forms above, also ``*.example:8443``, ``[::1]:8080``,
                                  restricted to that port)

Request hosts are compared lowercased, without IPv6 brackets and without a trailing dot; the IP
literal is parsed once per decision (``RequestHost``) and shared by every pattern. A pattern that
cannot be compiled raises ``PatternError`` (a ``ValueError``) naming the pattern, so a bad config
fails at start-up rather than on the first request.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
PatternKind = Literal["any", "exact", "domain", "subdomain", "glob", "network", "address", "local"]

_HOST_CHARS = re.compile(r"^[a-z0-9_\-.*\u0080-\U0010ffff]+$")


class PatternError(ValueError):
    """A bypass or rule pattern that is not one of the documented forms."""


@dataclass(frozen=True, slots=True)
class RequestHost:
    """A request's host, normalized once: lowercased, no brackets, no trailing dot, IP parsed."""

    name: str
    port: int
    ip: IPAddress | None

    @classmethod
    def parse(cls, host: str, port: int) -> RequestHost:
        name = normalize_host(host)
        return cls(name, port, maybe_ip(name))


def normalize_host(host: str) -> str:
    name = host.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    return name.rstrip(".") if name != "." else name


def maybe_ip(text: str) -> IPAddress | None:
    """The address if ``text`` is an IPv4 or IPv6 literal (no zone ids), else None."""
    if not text or not (text[0].isdigit() or ":" in text):
        return None  # fast path: an IP literal starts with a digit or contains a colon
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class HostPattern:
    """One compiled pattern; ``text`` is what the config said (for logs and errors)."""

    text: str
    kind: PatternKind
    host: str = ""
    port: int | None = None
    regex: re.Pattern[str] | None = None
    network: IPNetwork | None = None
    address: IPAddress | None = None

    def matches(self, request: RequestHost) -> bool:
        if self.port is not None and request.port != self.port:
            return False
        kind = self.kind
        if kind == "exact":
            return request.name == self.host
        if kind == "domain":
            # no_proxy semantics: ".corp.example" is the domain itself and everything below it.
            name = request.name
            return name.endswith(self.host) or name == self.host[1:]
        if kind == "subdomain":
            return request.name.endswith(self.host)  # self.host keeps the leading dot
        if kind == "any":
            return True
        if kind == "glob":
            assert self.regex is not None
            return self.regex.fullmatch(request.name) is not None
        if kind == "network":
            assert self.network is not None
            ip = request.ip
            return ip is not None and ip.version == self.network.version and ip in self.network
        if kind == "address":
            return request.ip is not None and request.ip == self.address
        # "<local>": Chromium's kBypassLocalNames, host names without a dot; IP literals never.
        return request.ip is None and "." not in request.name


def _split_port(text: str, original: str) -> tuple[str, int | None]:
    """``host:port`` / ``[v6]:port`` / bare IPv6 -> (host, port or None)."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise PatternError(f"{original!r}: unterminated IPv6 literal")
        host, rest = text[1:end], text[end + 1 :]
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise PatternError(f"{original!r}: junk after the IPv6 literal")
        return host, _port(rest[1:], original)
    if text.count(":") == 1:
        host, _, port_text = text.partition(":")
        return host, _port(port_text, original)
    return text, None  # no colon, or a bare IPv6 literal such as ::1


def _port(text: str, original: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise PatternError(f"{original!r}: invalid port {text!r}")
    return int(text)


def compile_pattern(text: str) -> HostPattern:
    """Compile one pattern (see the module docstring for the forms); raises PatternError."""
    original = text
    text = text.strip().lower()
    if not text:
        raise PatternError("empty pattern")
    if text == "<local>":
        return HostPattern(original, "local")
    if text.startswith(":") and text[1:].isdigit():
        return HostPattern(original, "any", port=_port(text[1:], original))
    if "/" in text:
        try:
            network = ipaddress.ip_network(text.strip("[]").replace("]/", "/"), strict=False)
        except ValueError as exc:
            raise PatternError(f"{original!r}: not a CIDR network: {exc}") from None
        return HostPattern(original, "network", network=network)
    host, port = _split_port(text, original)
    host = host.rstrip(".") if host not in ("", ".") else host
    address = maybe_ip(host)
    if address is not None:
        return HostPattern(original, "address", port=port, address=address)
    if not host or not _HOST_CHARS.match(host) or ".." in host.strip("."):
        raise PatternError(f"{original!r}: not a host pattern")
    if host == "*":
        return HostPattern(original, "any", port=port)
    if host.startswith("."):
        return HostPattern(original, "domain", host=host, port=port)
    if host.startswith("*.") and "*" not in host[2:]:
        return HostPattern(original, "subdomain", host=host[1:], port=port)
    if "*" in host:
        regex = re.compile(".*".join(re.escape(part) for part in host.split("*")))
        return HostPattern(original, "glob", host=host, port=port, regex=regex)
    return HostPattern(original, "exact", host=host, port=port)


@dataclass(frozen=True, slots=True)
class PatternSet:
    """Patterns tried in order; ``matches`` is true when any of them matches."""

    patterns: tuple[HostPattern, ...]

    @classmethod
    def compile(cls, texts: Iterable[str]) -> PatternSet:
        return cls(tuple(compile_pattern(text) for text in texts))

    def matches(self, request: RequestHost) -> bool:
        return any(pattern.matches(request) for pattern in self.patterns)

    def first_match(self, request: RequestHost) -> HostPattern | None:
        for pattern in self.patterns:
            if pattern.matches(request):
                return pattern
        return None

    def __bool__(self) -> bool:
        return bool(self.patterns)

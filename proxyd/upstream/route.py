"""The vocabulary routing speaks and upstream acts on (pure values, no I/O).

A request's *route list* is an ordered tuple of ``Route``s: ``Direct()`` or ``ViaProxy(proxy)``,
tried in order with failover (see routing/failover.py). ``ProxyServer`` names one upstream proxy:
its protocol (``http`` for PROXY/HTTP entries, ``https`` for HTTPS entries, ``socks5``, ``socks4``),
address and optional credentials. ``label`` is the bounded, credential-free name used in metric
labels, logs, the bad-proxy list and Proxy-Status: never a password, never the request's host.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ProxyKind = Literal["http", "https", "socks5", "socks4"]


@dataclass(frozen=True, slots=True)
class ProxyServer:
    kind: ProxyKind
    host: str
    port: int
    username: str | None = field(default=None, compare=True, repr=False)
    password: str | None = field(default=None, compare=True, repr=False)
    #: socks5h semantics: the proxy resolves the target name (False: resolve locally, send an IP).
    remote_dns: bool = True

    @property
    def label(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.kind}://{host}:{self.port}"

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)


@dataclass(frozen=True, slots=True)
class Direct:
    # A route is part of every pool group key, hashed several times per request: a constant
    # here (all Direct values are equal) rather than the generated hash of an empty tuple.
    def __hash__(self) -> int:
        return 0x2D1EC7

    @property
    def label(self) -> str:
        return "DIRECT"


@dataclass(frozen=True, slots=True)
class ViaProxy:
    proxy: ProxyServer
    #: The hash, computed once (a route is hashed several times per request: pool group keys).
    _hash: int = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((ViaProxy, self.proxy)))

    def __hash__(self) -> int:
        return self._hash

    @property
    def label(self) -> str:
        return self.proxy.label


Route = Direct | ViaProxy
RouteList = tuple[Route, ...]

DIRECT = Direct()
ALL_DIRECT: RouteList = (DIRECT,)


def route_kind(route: Route) -> str:
    """A bounded metric label: ``direct``, ``http``, ``https``, ``socks5`` or ``socks4``."""
    return "direct" if isinstance(route, Direct) else route.proxy.kind


# --- parsing route lists ----------------------------------------------------------------------

_PAC_KEYWORDS: dict[str, tuple[ProxyKind, bool]] = {
    "PROXY": ("http", True),
    "HTTP": ("http", True),
    "HTTPS": ("https", True),
    "SOCKS": ("socks5", True),
    "SOCKS5": ("socks5", True),
    "SOCKS4": ("socks4", True),
}
_URL_SCHEMES: dict[str, tuple[ProxyKind, bool]] = {
    "http": ("http", True),
    "https": ("https", True),
    "socks5": ("socks5", False),  # curl semantics: socks5:// resolves locally, socks5h:// remotely
    "socks5h": ("socks5", True),
    "socks4": ("socks4", False),
    "socks4a": ("socks4", True),
}
_DEFAULT_PORTS: dict[ProxyKind, int] = {"http": 80, "https": 443, "socks5": 1080, "socks4": 1080}


class RouteSyntaxError(ValueError):
    """A route entry that is not DIRECT, ``KEYWORD host:port`` or a proxy URL."""


def _host_port(text: str, kind: ProxyKind, entry: str) -> tuple[str, int]:
    text = text.strip().rstrip("/")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise RouteSyntaxError(f"{entry!r}: unterminated IPv6 literal")
        host, rest = text[1:end], text[end + 1 :]
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise RouteSyntaxError(f"{entry!r}: junk after the IPv6 literal")
    else:
        host, _, port_text = text.partition(":")
    if not host or any(c in host for c in " /@?#"):
        raise RouteSyntaxError(f"{entry!r}: missing or invalid proxy host")
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise RouteSyntaxError(f"{entry!r}: invalid port {port_text!r}")
        return host.lower(), int(port_text)
    return host.lower(), _DEFAULT_PORTS[kind]


def parse_route(entry: str) -> Route:
    """One entry: ``DIRECT``, ``PROXY host:port`` (PAC keywords), or ``socks5h://u:p@host:port``."""
    from urllib.parse import unquote

    text = entry.strip()
    if not text:
        raise RouteSyntaxError("empty route entry")
    if text.upper() == "DIRECT":
        return DIRECT
    if "://" in text:
        scheme, _, rest = text.partition("://")
        known = _URL_SCHEMES.get(scheme.lower())
        if known is None:
            raise RouteSyntaxError(f"{entry!r}: unknown proxy scheme {scheme!r}")
        kind, remote_dns = known
        username = password = None
        if "@" in rest:
            userinfo, _, rest = rest.rpartition("@")
            user_text, _, password_text = userinfo.partition(":")
            username, password = unquote(user_text), unquote(password_text)
        host, port = _host_port(rest, kind, entry)
        return ViaProxy(ProxyServer(kind, host, port, username, password, remote_dns))
    keyword, _, rest = text.partition(" ")
    known = _PAC_KEYWORDS.get(keyword.upper())
    if known is None or not rest.strip():
        raise RouteSyntaxError(
            f"{entry!r}: expected DIRECT, PROXY/HTTPS/SOCKS/SOCKS4/SOCKS5 host:port, or a proxy URL"
        )
    kind, remote_dns = known
    host, port = _host_port(rest, kind, entry)
    return ViaProxy(ProxyServer(kind, host, port, remote_dns=remote_dns))


def parse_route_list(text: str | list[str] | tuple[str, ...]) -> RouteList:
    """``"PROXY a:3128; SOCKS5 b:1080; DIRECT"`` (or a list of such strings) -> RouteList.

    Strict: any bad entry raises RouteSyntaxError (config files must be right).
    """
    items = [text] if isinstance(text, str) else list(text)
    routes: list[Route] = []
    for item in items:
        for entry in item.split(";"):
            if entry.strip():
                routes.append(parse_route(entry))
    if not routes:
        raise RouteSyntaxError("the route list is empty")
    return tuple(routes)


def parse_pac_result(text: str) -> tuple[RouteList, list[str]]:
    """A PAC result string, leniently: bad entries are skipped and returned as problems."""
    routes: list[Route] = []
    problems: list[str] = []
    for entry in text.split(";"):
        if not entry.strip():
            continue
        try:
            routes.append(parse_route(entry))
        except RouteSyntaxError as exc:
            problems.append(str(exc))
    return tuple(routes), problems

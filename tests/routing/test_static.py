"""Table tests of ``proxyd.routing.patterns`` and ``proxyd.routing.static`` (pure, no I/O).

Pattern semantics follow curl's ``no_proxy`` (a leading dot: the domain and its sub-domains) and
Chromium's proxy bypass rules (``net/proxy_resolution/proxy_bypass_rules.cc``: ``*.example`` is
sub-domains only, ``<local>`` is a host name without a dot, CIDR blocks match IP literals only,
``host:port`` restricts to a port). Static decisions are bypass first, then the first matching
rule, then the default.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from proxyd.config import RoutingConfig
from proxyd.routing.patterns import PatternError, PatternSet, RequestHost, compile_pattern
from proxyd.routing.static import StaticRouter
from proxyd.upstream.route import DIRECT, ProxyServer, RouteSyntaxError, ViaProxy

# (pattern, host, port, expected)
PATTERN_TABLE: list[tuple[str, str, int, bool]] = [
    # exact host, case-insensitive, trailing dot ignored
    ("corp.example", "corp.example", 80, True),
    ("corp.example", "CORP.Example", 443, True),
    ("corp.example", "corp.example.", 80, True),
    ("Corp.Example.", "corp.example", 80, True),
    ("corp.example", "www.corp.example", 80, False),
    ("corp.example", "notcorp.example", 80, False),
    # leading dot: the domain and its sub-domains (no_proxy)
    (".corp.example", "corp.example", 80, True),
    (".corp.example", "a.b.corp.example", 80, True),
    (".corp.example", "xcorp.example", 80, False),
    # *.domain: sub-domains only (Chromium)
    ("*.corp.example", "www.corp.example", 80, True),
    ("*.corp.example", "a.b.corp.example", 443, True),
    ("*.corp.example", "corp.example", 80, False),
    ("*.corp.example", "xcorp.example", 80, False),
    # other globs: * matches any run, dots included
    ("web*.example", "web01.example", 80, True),
    ("web*.example", "web.a.example", 80, True),
    ("web*.example", "www.example", 80, False),
    ("*", "anything.at.all", 1, True),
    ("*example*", "my-example-host", 1, True),
    # CIDR: IP literals only, both families
    ("10.0.0.0/8", "10.20.30.40", 80, True),
    ("10.0.0.0/8", "11.0.0.1", 80, False),
    ("10.0.0.0/8", "10.example", 80, False),
    ("192.168.1.7/16", "192.168.200.1", 80, True),  # host bits ignored (strict=False)
    ("::1/128", "::1", 80, True),
    ("::1/128", "[::1]", 80, True),
    ("[::1]/128", "::1", 80, True),
    ("fc00::/7", "fd12::1", 80, True),
    ("fc00::/7", "10.0.0.1", 80, False),
    ("10.0.0.0/8", "::ffff:10.0.0.1", 80, False),  # families are not mixed
    # single addresses, compared as addresses
    ("10.1.2.3", "10.1.2.3", 80, True),
    ("10.1.2.3", "10.1.2.4", 80, False),
    ("::1", "0:0:0:0:0:0:0:1", 80, True),
    ("[2001:db8::1]:8443", "2001:db8::1", 8443, True),
    ("[2001:db8::1]:8443", "2001:db8::1", 443, False),
    # <local>: no dot, never an IP literal (IE / Chromium)
    ("<local>", "intranet", 80, True),
    ("<LOCAL>", "localhost", 80, True),
    ("<local>", "intranet.corp", 80, False),
    ("<local>", "::1", 80, False),
    ("<local>", "10.0.0.1", 80, False),
    # port-only and host:port
    (":8080", "any.example", 8080, True),
    (":8080", "any.example", 80, False),
    ("corp.example:8080", "corp.example", 8080, True),
    ("corp.example:8080", "corp.example", 8081, False),
    ("*.example:8443", "a.example", 8443, True),
    ("*.example:8443", "a.example", 443, False),
    (".example:8443", "example", 8443, True),
    ("*:22", "host", 22, True),
    ("10.1.2.3:8080", "10.1.2.3", 8080, True),
]


@pytest.mark.parametrize(("pattern", "host", "port", "expected"), PATTERN_TABLE)
def test_pattern_table(pattern: str, host: str, port: int, expected: bool) -> None:
    """Each documented pattern form matches exactly the hosts and ports it names."""
    compiled = compile_pattern(pattern)
    assert compiled.matches(RequestHost.parse(host, port)) is expected


@pytest.mark.parametrize(
    "bad",
    ["", "   ", "10.0.0.0/33", "::1/200", "host:0", "host:65536", "host:http", "a..b", "a b",
     "[::1", "[::1]x", "x/y", "@host"],
)  # fmt: skip
def test_bad_patterns_are_rejected_at_compile_time(bad: str) -> None:
    """A pattern that is none of the forms fails when the config is loaded, naming itself."""
    with pytest.raises(PatternError):
        compile_pattern(bad)


def test_pattern_set_first_match_keeps_order() -> None:
    patterns = PatternSet.compile(["*.example", ".a.example", ":80"])
    request = RequestHost.parse("x.a.example", 80)
    first = patterns.first_match(request)
    assert first is not None and first.text == "*.example"
    assert PatternSet.compile([]).first_match(request) is None
    assert not PatternSet.compile([])


@given(st.from_regex(r"[a-z0-9]{1,10}(\.[a-z0-9]{1,10}){0,3}", fullmatch=True))
def test_domain_pattern_is_exact_or_subdomain(label: str) -> None:
    """``.d`` is the union of ``d`` and ``*.d`` (curl's no_proxy vs Chromium's wildcard)."""
    request_hosts = [label, f"x.{label}", f"a.b.{label}", f"x{label}"]
    for host in request_hosts:
        request = RequestHost.parse(host, 80)
        union = compile_pattern(label).matches(request) or compile_pattern(f"*.{label}").matches(
            request
        )
        assert compile_pattern(f".{label}").matches(request) is union


# --- static decisions -------------------------------------------------------------------------

CORP = ViaProxy(ProxyServer("http", "corp-proxy", 3128))
BACKUP = ViaProxy(ProxyServer("http", "backup", 8080))
SOCKS = ViaProxy(ProxyServer("socks5", "socks", 1080))


def router(**data: object) -> StaticRouter:
    return StaticRouter(RoutingConfig.model_validate(data))


ROUTER = router(
    default=["PROXY corp-proxy:3128", "PROXY backup:8080", "DIRECT"],
    bypass=["<local>", ".internal.example", "10.0.0.0/8", "::1/128", ":9999"],
    rules=[
        {"match": ["*.socks.example"], "route": "SOCKS5 socks:1080"},
        {"match": ["*.example:8443", "192.168.0.0/16"], "route": ["DIRECT"]},
        {"match": ["*.example"], "route": ["PROXY backup:8080"]},
    ],
)


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        ("intranet", 80, (DIRECT,)),  # bypass <local>
        ("app.internal.example", 443, (DIRECT,)),  # bypass beats the *.example rule
        ("10.9.8.7", 80, (DIRECT,)),
        ("::1", 443, (DIRECT,)),
        ("www.example.org", 9999, (DIRECT,)),  # bypass :9999
        ("a.socks.example", 443, (SOCKS,)),  # first matching rule
        ("a.example", 8443, (DIRECT,)),  # second rule, host:port
        ("192.168.4.4", 80, (DIRECT,)),  # second rule, CIDR
        ("a.example", 443, (BACKUP,)),  # third rule
        ("www.example.org", 443, (CORP, BACKUP, DIRECT)),  # default
        ("socks.example", 443, (BACKUP,)),  # "*.socks.example" is sub-domains only
    ],
)
def test_static_decisions(host: str, port: int, expected: tuple[object, ...]) -> None:
    """Bypass list first, then rules in order (first match wins), then the default."""
    assert ROUTER.decide("https", host, port) == expected


def test_defaults_route_everything_direct() -> None:
    assert router().decide("http", "example.org", 80) == (DIRECT,)


def test_invalid_rule_pattern_fails_at_construction() -> None:
    """A bad pattern is a config error (file:line from config.py), never a runtime surprise."""
    with pytest.raises((PatternError, ValidationError), match=r"10\.0\.0\.0/99"):
        router(rules=[{"match": ["10.0.0.0/99"], "route": "DIRECT"}])


def test_route_lists_are_parsed_once() -> None:
    """The rule's route list is a parsed RouteList, shared by every decision."""
    first = ROUTER.decide("http", "a.example", 80)
    assert first is ROUTER.decide("http", "b.example", 80)
    with pytest.raises(RouteSyntaxError):
        StaticRouter(RoutingConfig.model_construct(default=("BOGUS x",)))

"""Pure PAC pieces as tables: script facts, the URL the script sees, the result cache, myIpAddress.

* Caching is allowed only for scripts whose answer cannot depend on the clock: any mention of
  weekdayRange, dateRange, timeRange, Date or (Math.)random turns it off.
* The cache key is (scheme, host) when the entry point never reads its ``url`` parameter, else the
  whole URL the script was given.
* For https and wss the script sees only ``scheme://host[:port]/`` (Chromium strips path and query
  of secure URLs before PAC evaluation).
* ``myIpAddress`` answers the first IPv4 address of the default route, ``127.0.0.1`` without one.
"""

from __future__ import annotations

import ipaddress

import pytest

from proxyd.routing.pac.cache import LruCache
from proxyd.routing.pac.localaddr import my_ip_answers, probe_local_addresses
from proxyd.routing.pac.script import analyze, error_line, error_summary, script_url, version_of

HOST_ONLY = "function FindProxyForURL(url, host) { return host == 'a' ? 'DIRECT' : 'PROXY p:1'; }"


def entry(body: str, params: str = "url, host") -> str:
    return f"function FindProxyForURL({params}) {{ {body} }}"


@pytest.mark.parametrize(
    ("source", "time_dependent", "uses_url"),
    [
        (HOST_ONLY, False, False),
        (entry("return shExpMatch(u, '*/x/*') ? 'DIRECT' : '';", "u, h"), False, True),
        (entry("if (timeRange(8, 18)) return 'DIRECT';"), True, False),
        (entry("return weekdayRange('MON') ? 'A' : 'B';"), True, False),
        (entry("return dateRange('JAN') ? 'A' : 'B';"), True, False),
        (entry("return new Date().getHours() > 8 ? 'A' : 'B';"), True, False),
        (entry("return Math.random() < .5 ? 'A' : 'B';"), True, False),
        ("var FindProxyForURL = function (url, host) { return 'DIRECT'; };", False, False),
        ("var FindProxyForURL = function named(url, host) { return url; };", False, True),
        ("FindProxyForURL = (url, host) => 'DIRECT';", False, False),
        ("function FindProxyForURLEx(target, host) { return target; }", False, True),
        (entry("return arguments[0];"), False, True),
        ("function helper(url) { return url; }\n" + entry("return 'A';", "url, h"), False, True),
        (entry("return host.url;"), False, False),  # a property, not the parameter
        ("this['FindProxyForURL'] = function (u, h) { return 'DIRECT'; };", False, True),  # unknown
    ],
)
def test_analyze(source: str, time_dependent: bool, uses_url: bool) -> None:
    facts = analyze(source)
    assert (facts.time_dependent, facts.uses_url) == (time_dependent, uses_url)
    assert facts.cacheable is not time_dependent
    assert facts.version == version_of(source) and len(facts.version) == 16
    assert facts.size == len(source)


def test_versions_differ_per_text() -> None:
    assert version_of(HOST_ONLY) != version_of(HOST_ONLY + " ")


@pytest.mark.parametrize(
    ("scheme", "host", "port", "url", "expected"),
    [
        ("https", "a.example", 443, "https://a.example/secret?q=1", "https://a.example/"),
        ("https", "a.example", 8443, "", "https://a.example:8443/"),
        ("wss", "a.example", 443, "wss://a.example/chat", "wss://a.example/"),
        ("https", "2001:db8::1", 443, "", "https://[2001:db8::1]/"),
        ("HTTPS", "a.example", 443, "", "https://a.example/"),
        ("http", "a.example", 80, "http://a.example/p?q", "http://a.example/p?q"),
        ("http", "a.example", 8080, "", "http://a.example:8080/"),
        ("ws", "a.example", 80, "ws://a.example/x", "ws://a.example/x"),
    ],
)
def test_script_url(scheme: str, host: str, port: int, url: str, expected: str) -> None:
    """Secure URLs are cut to the origin; others pass through (an empty url is rebuilt)."""
    assert script_url(scheme, host, port, url) == expected


@pytest.mark.parametrize(
    ("message", "line", "summary"),
    [
        (
            "SyntaxError: unexpected token in expression: ';'\n    at <input>:3:10\n",
            3,
            "SyntaxError: unexpected token in expression: ';' (line 3, column 10)",
        ),
        ("Error: boom\n    at f (<input>:7:2)\n    at <eval> (<input>:9:1)\n", 7, None),
        ("plain string\nundefined", None, "plain string"),
        ("", None, "unknown error"),
    ],
)
def test_error_positions(message: str, line: int | None, summary: str | None) -> None:
    assert error_line(message) == line
    if summary is not None:
        assert error_summary(message) == summary


def test_lru_cache_evicts_least_recently_used_and_expires() -> None:
    cache: LruCache[str, int] = LruCache(2)
    cache.put("a", 1, now=0.0)
    cache.put("b", 2, now=0.0)
    assert cache.get("a", 1.0) == 1  # "a" is now the most recent
    cache.put("c", 3, now=1.0)  # evicts "b"
    assert cache.get("b", 1.0) is None
    assert (cache.get("a", 1.0), cache.get("c", 1.0), len(cache)) == (1, 3, 2)
    cache.put("d", 4, now=10.0, ttl=5.0)
    assert cache.get("d", 14.9) == 4
    assert cache.get("d", 15.0) is None and len(cache) == 1
    cache.clear()
    assert len(cache) == 0


def test_lru_cache_of_size_zero_stores_nothing() -> None:
    cache: LruCache[str, int] = LruCache(0)
    cache.put("a", 1, now=0.0)
    assert cache.get("a", 0.0) is None and len(cache) == 0


@pytest.mark.parametrize(
    ("addresses", "expected"),
    [
        ((), ("127.0.0.1", "127.0.0.1")),
        (("192.0.2.7",), ("192.0.2.7", "192.0.2.7")),
        (("2001:db8::7",), ("127.0.0.1", "2001:db8::7")),
        (("192.0.2.7", "2001:db8::7"), ("192.0.2.7", "192.0.2.7;2001:db8::7")),
    ],
)
def test_my_ip_answers(addresses: tuple[str, ...], expected: tuple[str, str]) -> None:
    """myIpAddress is IPv4-only (Chromium), myIpAddressEx lists every family (Microsoft)."""
    assert my_ip_answers(addresses) == expected


def test_probe_finds_routable_addresses_without_sending() -> None:
    """The UDP-connect probe returns real, non-loopback addresses (possibly none)."""
    for text in probe_local_addresses():
        address = ipaddress.ip_address(text)
        assert not address.is_loopback and not address.is_unspecified

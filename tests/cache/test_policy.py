"""RFC 9111 shared-cache policy as tables of input -> expected decision (pure, explicit time).

Every row's id starts with the RFC and section it checks: ``9111/4.2.1 ...`` is RFC 9111 §4.2.1,
``9110/14.1.1 ...`` RFC 9110, ``5861/3`` the stale-* extensions, ``8246/2`` immutable, ``9211/2``
Cache-Status.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest

from proxyd.cache import policy
from proxyd.cache.policy import (
    UNLIMITED,
    UNSATISFIABLE,
    Action,
    ByteRange,
    CacheControl,
    Header,
    Heuristics,
    LookupSettings,
    NotStorable,
    Stored,
)

NOW = 1_700_000_000.0
SETTINGS = LookupSettings()


def at(offset: float) -> str:
    """The HTTP-date ``offset`` seconds from NOW."""
    return policy.http_date(NOW + offset).decode()


def fields(*lines: str) -> list[Header]:
    """``"Name: value"`` lines as a header list."""
    out = []
    for line in lines:
        name, _, value = line.partition(":")
        out.append((name.strip().encode("latin-1"), value.strip().encode("latin-1")))
    return out


def entry(
    *lines: str,
    status: int = 200,
    age: float = 10.0,
    delay: float = 0.0,
    variant: bytes | None = None,
    size: int = 100,
    complete: bool = True,
    date: bool = True,
    request: Sequence[str] = (),
) -> Stored:
    """A stored response received ``age`` seconds before NOW, its request sent ``delay`` earlier.
    Date is the receipt time unless a Date line is given (or ``date=False``); the variant is
    computed from ``request`` as the transaction does."""
    response_time = NOW - age
    headers = fields(*lines)
    if date and not any(name.lower() == b"date" for name, _ in headers):
        headers.insert(0, (b"Date", policy.http_date(response_time)))
    if variant is None:
        variant = policy.vary_key(headers, fields(*request))
    return Stored(
        status=status,
        headers=tuple(headers),
        request_time=response_time - delay,
        response_time=response_time,
        variant=variant,
        body_size=size,
        complete=complete,
    )


# --- Cache-Control parsing (§5.2) -------------------------------------------------------------

CC_ROWS = [
    pytest.param([], CacheControl(), id="9111/5.2 no field"),
    pytest.param(["MAX-AGE=60, Public, No-Store"], CacheControl(60, no_store=True, public=True),
                 id="9111/5.2 directive names are case-insensitive"),
    pytest.param(['max-age="5"'], CacheControl(5), id="9111/5.2 quoted argument accepted"),
    pytest.param(["max-age = 5"], CacheControl(5), id="9111/5.2 robust: spaces around ="),
    pytest.param(["max-age=abc"], CacheControl(0), id="9111/4.2.1 invalid max-age: stale"),
    pytest.param(["max-age=-5"], CacheControl(0), id="9111/1.2.2 negative delta invalid"),
    pytest.param(["max-age=5.5"], CacheControl(0), id="9111/1.2.2 decimal delta invalid"),
    pytest.param(["max-age"], CacheControl(0), id="9111/4.2.1 max-age without value: stale"),
    pytest.param(['max-age="5'], CacheControl(0), id="9111/4.2.1 broken quoting: stale"),
    pytest.param(["max-age=60, max-age=120"], CacheControl(0),
                 id="9111/4.2.1 conflicting duplicates: stale"),
    pytest.param(["max-age=60", "max-age=60"], CacheControl(60),
                 id="9111/4.2.1 identical duplicate on two lines kept"),
    pytest.param(["s-maxage=abc, max-age=60"], CacheControl(60, s_maxage=0),
                 id="9111/4.2.1 invalid s-maxage: stale"),
    pytest.param(["max-age=99999999999999999999999"], CacheControl(2**31),
                 id="9111/1.2.2 huge delta capped at 2^31"),
    pytest.param(["max-age=2147483649"], CacheControl(2**31), id="9111/1.2.2 2^31+1 capped"),
    pytest.param(["foo, bar=baz, x=\"a,b\", max-age=1"], CacheControl(1),
                 id="9111/5.2.3 unknown extensions ignored"),
    pytest.param(["no-cache"], CacheControl(no_cache=frozenset()),
                 id="9111/5.2.2.4 unqualified no-cache"),
    pytest.param(['no-cache="Set-Cookie, X-Foo", max-age=5'],
                 CacheControl(5, no_cache=frozenset({b"set-cookie", b"x-foo"})),
                 id="9111/5.2.2.4 qualified no-cache keeps comma inside quotes"),
    pytest.param(["no-cache=set-cookie"], CacheControl(no_cache=frozenset({b"set-cookie"})),
                 id="9111/5.2 token form of a field-name argument"),
    pytest.param(['no-cache="a", no-cache'], CacheControl(no_cache=frozenset()),
                 id="9111/4.2.1 unqualified no-cache is the most restrictive"),
    pytest.param(['no-cache="a"', 'no-cache="B"'], CacheControl(no_cache=frozenset({b"a", b"b"})),
                 id="9111/5.2.2.4 qualified names accumulate"),
    pytest.param(['private="Set-Cookie"'], CacheControl(private=frozenset({b"set-cookie"})),
                 id="9111/5.2.2.7 qualified private"),
    pytest.param(['private="a'], CacheControl(private=frozenset()),
                 id="9111/5.2.2.7 broken argument: unqualified private"),
    pytest.param(["max-stale"], CacheControl(max_stale=UNLIMITED),
                 id="9111/5.2.1.2 max-stale without value: any staleness"),
    pytest.param(["max-stale=10, max-stale=5"], CacheControl(max_stale=5),
                 id="9111/5.2.1.2 repeated max-stale: smallest"),
    pytest.param(["max-stale, max-stale=30"], CacheControl(max_stale=30),
                 id="9111/5.2.1.2 a value beats a bare max-stale"),
    pytest.param(["max-stale=x"], CacheControl(), id="9111/5.2.1.2 invalid max-stale grants none"),
    pytest.param(["min-fresh=10, min-fresh=20"], CacheControl(min_fresh=20),
                 id="9111/5.2.1.3 repeated min-fresh: largest"),
    pytest.param(["stale-while-revalidate=30, stale-if-error=86400"],
                 CacheControl(stale_while_revalidate=30, stale_if_error=86400),
                 id="5861/3-4 stale-while-revalidate and stale-if-error"),
    pytest.param(["stale-while-revalidate=x, stale-if-error"], CacheControl(),
                 id="5861/3 invalid windows grant nothing"),
    pytest.param(["max-age=5", "public"], CacheControl(5, public=True),
                 id="9110/5.3 lines of the field combine"),
    pytest.param(["must-revalidate, proxy-revalidate, immutable, no-transform, must-understand,"
                  " only-if-cached, s-maxage=10"],
                 CacheControl(s_maxage=10, must_revalidate=True, proxy_revalidate=True,
                              immutable=True, no_transform=True, must_understand=True,
                              only_if_cached=True),
                 id="9111/5.2.2 every boolean directive"),
    pytest.param(['no-store="x"'], CacheControl(no_store=True),
                 id="9111/5.2 boolean directive with a stray argument still counts"),
    pytest.param([",, ,max-age=3,,"], CacheControl(3), id="9110/5.6.1 empty list elements"),
]  # fmt: skip


@pytest.mark.parametrize(("lines", "expected"), CC_ROWS)
def test_parse_cache_control(lines: list[str], expected: CacheControl) -> None:
    """RFC 9111 §5.2: each row is one message's Cache-Control lines and the directives read."""
    headers = [(b"Cache-Control", line.encode()) for line in lines]
    assert policy.parse_cache_control(headers) == expected


def test_parse_cache_control_ignores_other_fields_and_reads_any_name_case() -> None:
    """RFC 9110 §5.1: field names are case-insensitive."""
    headers = [(b"CACHE-control", b"max-age=7"), (b"X-Cache-Control", b"no-store")]
    assert policy.parse_cache_control(headers) == CacheControl(7)


# --- storing (§3) -----------------------------------------------------------------------------

STORABLE_ROWS = [
    pytest.param(b"GET", [], 200, ["Cache-Control: max-age=60"], None,
                 id="9111/3 GET 200 with max-age"),
    pytest.param(b"HEAD", [], 200, ["Cache-Control: max-age=60"], NotStorable.METHOD,
                 id="9111/3 HEAD is answered from a stored GET, not stored"),
    pytest.param(b"POST", [], 200, ["Cache-Control: max-age=60"], NotStorable.METHOD,
                 id="9111/3 POST not stored"),
    pytest.param(b"GET", [], 103, ["Cache-Control: max-age=60"], NotStorable.STATUS,
                 id="9111/3 status must be final"),
    pytest.param(b"GET", [], 206, ["Cache-Control: max-age=60"], NotStorable.PARTIAL,
                 id="9111/3 206 not stored here"),
    pytest.param(b"GET", [], 304, ["Cache-Control: max-age=60"], NotStorable.STATUS,
                 id="9111/3 304 only freshens"),
    pytest.param(b"GET", [], 304, ["Cache-Control: must-understand, max-age=60"],
                 NotStorable.STATUS, id="9111/5.2.2.3 a 304 is understood, but only freshens"),
    pytest.param(b"GET", [], 299, ["Cache-Control: max-age=60"], NotStorable.STATUS,
                 id="9110/15 unknown status not stored"),
    pytest.param(b"GET", [], 299, ["Cache-Control: must-understand, no-store, max-age=60"],
                 NotStorable.MUST_UNDERSTAND, id="9111/5.2.2.3 must-understand, unknown status"),
    pytest.param(b"GET", [], 200, ["Cache-Control: must-understand, no-store, max-age=60"], None,
                 id="9111/5.2.2.3 must-understand overrides no-store for a known status"),
    pytest.param(b"GET", ["Cache-Control: no-store"], 200, ["Cache-Control: max-age=60"],
                 NotStorable.REQUEST_NO_STORE, id="9111/5.2.1.5 request no-store"),
    pytest.param(b"GET", [], 200, ["Cache-Control: max-age=60, No-Store"], NotStorable.NO_STORE,
                 id="9111/5.2.2.5 response no-store"),
    pytest.param(b"GET", [], 200, ["Cache-Control: private, max-age=60"], NotStorable.PRIVATE,
                 id="9111/5.2.2.7 private never in a shared cache"),
    pytest.param(b"GET", [], 200, ['Cache-Control: private="Set-Cookie", max-age=60'], None,
                 id="9111/5.2.2.7 qualified private is storable without the fields"),
    pytest.param(b"GET", ["Authorization: Basic eA=="], 200, ["Cache-Control: max-age=60"],
                 NotStorable.AUTHORIZATION, id="9111/3.5 Authorization without permission"),
    pytest.param(b"GET", ["authorization: x"], 200, ["Cache-Control: max-age=60, public"], None,
                 id="9111/3.5 Authorization with public"),
    pytest.param(b"GET", ["authorization: x"], 200, ["Cache-Control: s-maxage=60"], None,
                 id="9111/3.5 Authorization with s-maxage"),
    pytest.param(b"GET", ["authorization: x"], 200, ["Cache-Control: max-age=60, must-revalidate"],
                 None, id="9111/3.5 Authorization with must-revalidate"),
    pytest.param(b"GET", ["authorization: x"], 200,
                 ["Cache-Control: max-age=60, proxy-revalidate"], NotStorable.AUTHORIZATION,
                 id="9111/3.5 proxy-revalidate is not a permission"),
    pytest.param(b"GET", [], 200, ["Cache-Control: max-age=60", "Vary: accept, *"],
                 NotStorable.VARY_STAR, id="9111/4.1 Vary * can never match: not stored"),
    pytest.param(b"GET", [], 302, ['ETag: "a"'], NotStorable.NO_FRESHNESS_INFO,
                 id="9111/3 302 is not heuristically cacheable"),
    pytest.param(b"GET", [], 302, ["Cache-Control: max-age=60"], None,
                 id="9111/3 explicit lifetime makes any understood status storable"),
    pytest.param(b"GET", [], 500, ["Cache-Control: max-age=60"], None,
                 id="9111/3 500 with explicit lifetime"),
    pytest.param(b"GET", [], 302, ["Cache-Control: public", f"Last-Modified: {at(-1000)}"], None,
                 id="9111/3 public makes a 302 storable"),
    pytest.param(b"GET", [], 404, [f"Last-Modified: {at(-1000)}"], None,
                 id="9111/4.2.2 404 heuristically cacheable"),
    pytest.param(b"GET", [], 200, ['ETag: "a"'], None,
                 id="9111/3 200 with a validator only: stored, revalidated each time"),
    pytest.param(b"GET", [], 200, [], NotStorable.NO_FRESHNESS_INFO,
                 id="9111/3 nothing to go by: never usable, not worth storing"),
    pytest.param(b"GET", [], 200, ["Cache-Control: max-age=0"], NotStorable.NO_FRESHNESS_INFO,
                 id="9111/3 max-age=0 without validator: not worth storing"),
    pytest.param(b"GET", [], 200, ["Expires: 0"], NotStorable.NO_FRESHNESS_INFO,
                 id="9111/5.3 invalid Expires without validator: not worth storing"),
    pytest.param(b"GET", [], 200, ["Cache-Control: max-age=0, stale-if-error=60"], None,
                 id="5861/4 max-age=0 with stale-if-error is worth storing"),
    pytest.param(b"GET", [], 200, ["Cache-Control: no-cache, max-age=60"],
                 NotStorable.NO_FRESHNESS_INFO,
                 id="9111/5.2.2.4 no-cache without validator: not worth storing"),
    pytest.param(b"GET", [], 200, ["Cache-Control: no-cache", 'ETag: "a"'], None,
                 id="9111/5.2.2.4 no-cache with validator stored"),
    pytest.param(b"GET", [], 200, [f"Expires: {at(60)}"], None,
                 id="9111/3 Expires without Date: stored"),
    pytest.param(b"GET", [], 200, [f"Date: {at(0)}", f"Expires: {at(-60)}"],
                 NotStorable.NO_FRESHNESS_INFO, id="9111/4.2.1 Expires before Date: expired"),
]  # fmt: skip


@pytest.mark.parametrize(("method", "request_lines", "status", "lines", "expected"), STORABLE_ROWS)
def test_storable(
    method: bytes,
    request_lines: list[str],
    status: int,
    lines: list[str],
    expected: NotStorable | None,
) -> None:
    """RFC 9111 §3: what a shared cache may store, and why not."""
    assert policy.storable(method, fields(*request_lines), status, fields(*lines)) is expected


HEADERS_TO_STORE_ROWS = [
    pytest.param(
        ["Connection: close, X-Hop", "X-Hop: 1", "Keep-Alive: timeout=5",
         "Transfer-Encoding: chunked",
         "Proxy-Authenticate: Basic", "Proxy-Authentication-Info: x", "Content-Type: text/plain"],
        ["Content-Type: text/plain"], id="9111/3.1 hop-by-hop and proxy fields are not stored"),
    pytest.param(
        ['Cache-Control: private="Set-Cookie", max-age=5', "set-cookie: a=1", "X-Other: y"],
        ['Cache-Control: private="Set-Cookie", max-age=5', "X-Other: y"],
        id="9111/5.2.2.7 private field names dropped (any case)"),
    pytest.param(
        ['Cache-Control: no-cache="X-Secret"', "X-Secret: s", "ETag: \"e\""],
        ['Cache-Control: no-cache="X-Secret"', "ETag: \"e\""],
        id="9111/5.2.2.4 no-cache field names dropped"),
    pytest.param(["Connection: content-length", "Content-Length: 5"], ["Content-Length: 5"],
                 id="9110/7.6.1 Connection cannot name the framing away"),
    pytest.param(["X-B: 2", "X-A: 1", "X-B: 3"], ["X-B: 2", "X-A: 1", "X-B: 3"],
                 id="9111/3.1 unknown fields kept, in order"),
]  # fmt: skip


@pytest.mark.parametrize(("lines", "expected"), HEADERS_TO_STORE_ROWS)
def test_headers_to_store(lines: list[str], expected: list[str]) -> None:
    """RFC 9111 §3.1: what is kept of a response's fields."""
    assert policy.headers_to_store(fields(*lines)) == fields(*expected)


def test_headers_to_store_adds_date_when_received_is_given() -> None:
    """RFC 9110 §6.6.1: a cache with a clock adds Date (its receipt time) when it is missing."""
    assert policy.headers_to_store(fields("X: 1"), received=NOW) == fields("X: 1", f"date: {at(0)}")
    kept = fields(f"Date: {at(-5)}")
    assert policy.headers_to_store(kept, received=NOW) == kept


# --- keys and Vary (§4.1) ---------------------------------------------------------------------

KEY_ROWS = [
    pytest.param(b"HTTP", b"Example.COM", b"/a", "http://example.com/a",
                 id="3986/6.2.2.1 scheme and host lower-cased"),
    pytest.param(b"http", b"example.com:80", b"", "http://example.com/",
                 id="3986/6.2.3 default port dropped, empty path is /"),
    pytest.param(b"https", b"example.com:443", b"?q=1", "https://example.com/?q=1",
                 id="3986/6.2.3 https default port, query-only path"),
    pytest.param(b"http", b"example.com:8080", b"/", "http://example.com:8080/",
                 id="3986/6.2.3 other port kept"),
    pytest.param(b"http", b"example.com:", b"/", "http://example.com/",
                 id="3986/6.2.3 empty port dropped"),
    pytest.param(b"http", b"[::1]:8080", b"/x", "http://[::1]:8080/x", id="3986/3.2.2 IPv6"),
    pytest.param(b"http", b"[::1]:80", b"/x", "http://[::1]/x", id="3986/3.2.2 IPv6 default port"),
    pytest.param(b"http", b"a", b"/%7e%2f%41?x#frag", "http://a/~%2FA?x",
                 id="3986/6.2.2.2 percent-encoding normalised, fragment dropped"),
    pytest.param(b"http", b"a", "/caf\u00e9".encode(), "http://a/caf%C3%A9",
                 id="3986/2.1 non-ASCII bytes percent-encoded: keys stay ASCII"),
]  # fmt: skip


@pytest.mark.parametrize(("scheme", "authority", "path", "expected"), KEY_ROWS)
def test_cache_key(scheme: bytes, authority: bytes, path: bytes, expected: str) -> None:
    """RFC 9111 §4.1 / RFC 3986 §6: the primary key is the normalised target URI."""
    assert policy.cache_key(scheme, authority, path) == expected


VARY_ROWS = [
    pytest.param([], ["Accept-Encoding: gzip"], b"", id="9111/4.1 no Vary: empty secondary key"),
    pytest.param(["Vary: *"], [], policy.VARY_STAR, id="9111/4.1 Vary *"),
    pytest.param(["Vary: Accept-Encoding"], ["accept-encoding: GZIP ,  br"],
                 b"accept-encoding:gzip,br",
                 id="9111/4.1 whitespace removed, case-insensitive values folded"),
    pytest.param(["Vary: accept-encoding"], ["Accept-Encoding: gzip", "Accept-Encoding: br"],
                 b"accept-encoding:gzip,br", id="9111/4.1 lines combined"),
    pytest.param(["Vary: Accept"], ["Accept: text/html ; q=0.9"], b"accept:text/html;q=0.9",
                 id="9110/5.6.6 OWS around parameters removed"),
    pytest.param(["Vary: User-Agent, accept-language", "Vary: user-agent"],
                 ["User-Agent: Foo/1 (X; Y)"], b"accept-language\nuser-agent:Foo/1 (X; Y)",
                 id="9111/4.1 names sorted and deduplicated; absent field marked"),
    pytest.param(["Vary: X-Flag"], ["X-Flag: "], b"x-flag:", id="9111/4.1 empty is not absent"),
]  # fmt: skip


@pytest.mark.parametrize(("response_lines", "request_lines", "expected"), VARY_ROWS)
def test_vary_key(response_lines: list[str], request_lines: list[str], expected: bytes) -> None:
    """RFC 9111 §4.1: the secondary key is the normalised values of the Vary-named fields."""
    assert policy.vary_key(fields(*response_lines), fields(*request_lines)) == expected


VARIANT_MATCH_ROWS = [
    pytest.param(["Accept-Encoding: gzip"], ["Accept-Encoding:  GZIP "], True,
                 id="9111/4.1 same value after normalisation"),
    pytest.param(["Accept-Encoding: gzip"], ["Accept-Encoding: br"], False,
                 id="9111/4.1 different value"),
    pytest.param([], ["Accept-Encoding: gzip"], False,
                 id="9111/4.1 absent field matches only absent"),
    pytest.param([], [], True, id="9111/4.1 both absent"),
    pytest.param(["Accept-Encoding: gzip, br"], ["Accept-Encoding: gzip", "accept-encoding: br"],
                 True, id="9111/4.1 combined lines match one line"),
]  # fmt: skip


@pytest.mark.parametrize(("stored_request", "request_lines", "expected"), VARIANT_MATCH_ROWS)
def test_variant_matches(
    stored_request: list[str], request_lines: list[str], expected: bool
) -> None:
    """RFC 9111 §4.1: a stored variant serves a request whose Vary-named fields match."""
    stored = entry("Cache-Control: max-age=60", "Vary: Accept-Encoding", request=stored_request)
    assert policy.variant_matches(stored, fields(*request_lines)) is expected


def test_vary_star_never_matches() -> None:
    """RFC 9111 §4.1: "A stored response with a Vary header field value containing "*" always
    fails to match"."""
    stored = entry("Cache-Control: max-age=60", "Vary: *")
    assert stored.variant == policy.VARY_STAR
    assert not policy.variant_matches(stored, [])


# --- freshness and age (§4.2) -----------------------------------------------------------------

LIFETIME_ROWS = [
    pytest.param(entry("Cache-Control: max-age=600, s-maxage=5"), 5,
                 id="9111/4.2.1 s-maxage over max-age"),
    pytest.param(entry("Cache-Control: max-age=600", f"Expires: {at(60)}"), 600,
                 id="9111/4.2.1 max-age over Expires"),
    pytest.param(entry(f"Date: {at(-100)}", f"Expires: {at(60)}"), 160,
                 id="9111/4.2.1 Expires minus Date"),
    pytest.param(entry(f"Expires: {at(60)}", date=False, age=40), 100,
                 id="9111/4.2.1 no Date: Expires minus the receipt time"),
    pytest.param(entry(f"Expires: {at(-60)}"), 0, id="9111/4.2.1 Expires in the past: 0"),
    pytest.param(entry("Expires: 0", f"Last-Modified: {at(-10000)}"), 0,
                 id="9111/5.3 invalid Expires: expired, no heuristic"),
    pytest.param(entry(f"Expires: {at(60)}", f"Expires: {at(90)}"), 0,
                 id="9111/4.2.1 conflicting Expires lines: stale"),
    pytest.param(entry(f"Date: {at(0)}", f"Last-Modified: {at(-1000)}"), 100,
                 id="9111/4.2.2 heuristic: 10 percent of Date - Last-Modified"),
    pytest.param(entry(f"Date: {at(0)}", f"Last-Modified: {at(-10**7)}"), 86400,
                 id="9111/4.2.2 heuristic capped"),
    pytest.param(entry(f"Date: {at(0)}", f"Last-Modified: {at(-1000)}", status=302), 0,
                 id="9111/4.2.2 no heuristic for a status that is not heuristically cacheable"),
    pytest.param(entry(f"Date: {at(0)}", f"Last-Modified: {at(-1000)}", "Cache-Control: public",
                       status=302), 100, id="9111/4.2.2 public allows the heuristic"),
    pytest.param(entry("Cache-Control: max-age=0", f"Last-Modified: {at(-1000)}"), 0,
                 id="9111/4.2.2 explicit expiration forbids the heuristic"),
    pytest.param(entry(f"Date: {at(0)}", f"Last-Modified: {at(10)}"), 0,
                 id="9111/4.2.2 Last-Modified after Date: no heuristic lifetime"),
    pytest.param(entry('ETag: "a"'), 0, id="9111/4.2.1 nothing to go by: 0"),
]  # fmt: skip


@pytest.mark.parametrize(("stored", "expected"), LIFETIME_ROWS)
def test_freshness_lifetime(stored: Stored, expected: float) -> None:
    """RFC 9111 §4.2.1/§4.2.2 for a shared cache."""
    assert policy.freshness_lifetime(stored, Heuristics()) == expected


def test_heuristic_fraction_and_no_cap_from_settings() -> None:
    """RFC 9111 §4.2.2: the fraction and the cap are configuration; None means no cap."""
    stored = entry(f"Date: {at(0)}", f"Last-Modified: {at(-(10**7))}")
    assert policy.freshness_lifetime(stored, Heuristics(0.5, None)) == 5 * 10**6
    assert policy.freshness_lifetime(stored, Heuristics(0.0, 100.0)) == 0


def _aged(*lines: str, date: float | None, request_time: float, response_time: float) -> Stored:
    headers = fields(*lines)
    if date is not None:
        headers.append((b"Date", policy.http_date(date)))
    return Stored(200, tuple(headers), request_time, response_time, b"", 0)


AGE_ROWS = [
    # response received at NOW-100 for a request sent at NOW-102: response_delay 2
    pytest.param(_aged(date=NOW - 100, request_time=NOW - 102, response_time=NOW - 100), 102,
                 id="9111/4.2.3 corrected_age_value = response_delay, plus resident time"),
    pytest.param(_aged("Age: 100", date=NOW - 100, request_time=NOW - 102,
                       response_time=NOW - 100), 202,
                 id="9111/4.2.3 Age header plus response_delay plus resident time"),
    pytest.param(_aged("Age: 10", date=NOW - 150, request_time=NOW - 102,
                       response_time=NOW - 100), 150,
                 id="9111/4.2.3 apparent_age wins when larger"),
    pytest.param(_aged(date=None, request_time=NOW - 100, response_time=NOW - 100), 100,
                 id="9111/4.2.3 no Date: date_value is the response time"),
    pytest.param(_aged(date=NOW + 500, request_time=NOW - 100, response_time=NOW - 100), 100,
                 id="9111/4.2.3 Date in the future: apparent_age 0"),
    pytest.param(_aged(date=None, request_time=NOW + 10, response_time=NOW + 5), 0,
                 id="9111/4.2.3 clock went backwards: never negative"),
    pytest.param(_aged("Age: abc", date=None, request_time=NOW, response_time=NOW), 0,
                 id="9111/5.1 invalid Age ignored"),
    pytest.param(_aged("Age: 5, 30", "Age: 7", date=None, request_time=NOW, response_time=NOW),
                 30, id="9111/5.1 several Age values: the largest"),
]  # fmt: skip


@pytest.mark.parametrize(("stored", "expected"), AGE_ROWS)
def test_current_age(stored: Stored, expected: float) -> None:
    """RFC 9111 §4.2.3: the age calculation, term by term."""
    assert policy.current_age(stored, NOW) == expected


AGE_VALUE_ROWS = [
    pytest.param(0.0, b"0", id="9111/5.1 zero"),
    pytest.param(1.99, b"1", id="9111/5.1 integer seconds, floored"),
    pytest.param(-5.0, b"0", id="9111/5.1 never negative"),
    pytest.param(float("nan"), b"0", id="9111/5.1 NaN is 0"),
    pytest.param(2.0**31 + 5, b"2147483648", id="9111/1.2.2 capped at 2^31"),
    pytest.param(math.inf, b"2147483648", id="9111/1.2.2 infinity capped"),
]  # fmt: skip


@pytest.mark.parametrize(("age", "expected"), AGE_VALUE_ROWS)
def test_age_value(age: float, expected: bytes) -> None:
    """RFC 9111 §5.1: Age is delta-seconds."""
    assert policy.age_value(age) == expected


def test_merge_age_into_headers_leaves_exactly_one_age() -> None:
    """RFC 9111 §5.1: a served response carries one Age, the cache's own."""
    merged = policy.merge_age_into_headers(fields("A: 1", "Age: 5", "B: 2", "age: 9"), 42.7)
    assert merged == fields("A: 1", "Age: 42", "B: 2")
    assert policy.merge_age_into_headers(fields("A: 1"), 3) == fields("A: 1", "Age: 3")


# --- dates (RFC 9110 §5.6.7) ------------------------------------------------------------------

DATE_ROWS = [
    pytest.param(b"Sun, 06 Nov 1994 08:49:37 GMT", 784111777.0, id="9110/5.6.7 IMF-fixdate"),
    pytest.param(b"Sunday, 06-Nov-94 08:49:37 GMT", 784111777.0, id="9110/5.6.7 rfc850-date"),
    pytest.param(b"Sun Nov  6 08:49:37 1994", 784111777.0, id="9110/5.6.7 asctime-date"),
    pytest.param(b"  sun, 06 nov 1994 08:49:37 utc ", 784111777.0,
                 id="9110/5.6.7 robust: case, UTC, spaces"),
    pytest.param(b"Thu, 01 Jan 1970 00:00:00 GMT", 0.0, id="9110/5.6.7 the epoch"),
    pytest.param(b"Tue, 29 Feb 2000 12:00:00 GMT", 951825600.0, id="9110/5.6.7 leap day"),
    pytest.param(b"Wed, 29 Feb 2001 12:00:00 GMT", None, id="9110/5.6.7 no such day"),
    pytest.param(b"Sun, 06 Nov 1994 24:00:00 GMT", None, id="9110/5.6.7 hour out of range"),
    pytest.param(b"Sun, 06 Nov 1994 08:49:37 +0100", None, id="9110/5.6.7 not GMT"),
    pytest.param(b"0", None, id="9111/5.3 Expires: 0 is not a date"),
    pytest.param(b"-1", None, id="9111/5.3 Expires: -1 is not a date"),
    pytest.param(b"", None, id="9110/5.6.7 empty"),
    pytest.param(b"Sun, 06 Foo 1994 08:49:37 GMT", None, id="9110/5.6.7 bad month"),
    pytest.param(b"Sun, 06 Nov 94 08:49:37 GMT", 784111777.0,
                 id="9110/5.6.7 robust: RFC 822 two-digit year"),
    pytest.param(b"Sun, 06 Nov 199 08:49:37 GMT", None, id="9110/5.6.7 three-digit year"),
]  # fmt: skip


@pytest.mark.parametrize(("value", "expected"), DATE_ROWS)
def test_parse_http_date(value: bytes, expected: float | None) -> None:
    """RFC 9110 §5.6.7: the three formats recipients accept; anything else is no date."""
    assert policy.parse_http_date(value) == expected


def test_two_digit_years_are_never_more_than_50_years_ahead() -> None:
    """RFC 9110 §5.6.7: a two-digit year more than 50 years in the future is the most recent
    past year with those digits, relative to when the message was received."""
    received_2024 = 1_704_067_200.0  # 2024-01-01
    assert policy.parse_http_date(b"Sunday, 06-Nov-94 08:49:37 GMT", received_2024) == 784111777
    in_2070 = policy.parse_http_date(b"Thursday, 01-Jan-70 00:00:00 GMT", received_2024)
    assert in_2070 == 3155760000.0  # 2070: 46 years ahead, within 50
    in_1975 = policy.parse_http_date(b"Wednesday, 01-Jan-75 00:00:00 GMT", received_2024)
    assert in_1975 == 157766400.0  # 2075 would be 51 years ahead: 1975


def test_http_date_formats_imf_fixdate() -> None:
    """RFC 9110 §5.6.7: senders generate IMF-fixdate."""
    assert policy.http_date(784111777.9) == b"Sun, 06 Nov 1994 08:49:37 GMT"


# --- the lookup decision (§4) -----------------------------------------------------------------

FRESH = "Cache-Control: max-age=60"
ETAG = 'ETag: "v1"'
LM = f"Last-Modified: {at(-100_000)}"

# (request lines, candidates, method) -> (action, fwd, index of the chosen candidate or None)
DECIDE_ROWS = [
    pytest.param([], [], b"GET", (Action.FETCH, "uri-miss", None),
                 id="9211/2.2 nothing stored: uri-miss"),
    pytest.param([], [entry(FRESH)], b"GET", (Action.SERVE, "", 0),
                 id="9111/4.2 fresh: served"),
    pytest.param([], [entry(FRESH)], b"HEAD", (Action.SERVE, "", 0),
                 id="9111/4 HEAD answered from a stored GET"),
    pytest.param([], [entry(FRESH)], b"POST", (Action.FETCH, "method", None),
                 id="9211/2.2 other methods go forward: method"),
    pytest.param([], [entry(FRESH, ETAG, age=100)], b"GET", (Action.REVALIDATE, "stale", 0),
                 id="9111/4.3.1 stale with ETag: revalidate"),
    pytest.param([], [entry(FRESH, LM, age=100)], b"GET", (Action.REVALIDATE, "stale", 0),
                 id="9111/4.3.1 stale with Last-Modified: revalidate"),
    pytest.param([], [entry(FRESH, age=100)], b"GET", (Action.FETCH, "stale", 0),
                 id="9111/4.3.1 stale without validator: fetch"),
    pytest.param([], [entry("Cache-Control: max-age=600, s-maxage=5", ETAG)], b"GET",
                 (Action.REVALIDATE, "stale", 0), id="9111/4.2.1 s-maxage over max-age"),
    pytest.param([], [entry(f"Expires: {at(60)}")], b"GET", (Action.SERVE, "", 0),
                 id="9111/4.2.1 Expires in the future: fresh"),
    pytest.param([], [entry("Expires: 0", ETAG)], b"GET", (Action.REVALIDATE, "stale", 0),
                 id="9111/5.3 invalid Expires: stale"),
    pytest.param([], [entry(LM)], b"GET", (Action.SERVE, "", 0),
                 id="9111/4.2.2 heuristic freshness"),
    pytest.param([], [entry("Cache-Control: max-age=60", "Age: 55", ETAG)], b"GET",
                 (Action.REVALIDATE, "stale", 0), id="9111/4.2.3 upstream Age counts"),
    # request directives
    pytest.param(["Cache-Control: no-cache"], [entry(FRESH, ETAG)], b"GET",
                 (Action.REVALIDATE, "request", 0), id="9111/5.2.1.4 request no-cache"),
    pytest.param(["Cache-Control: no-cache"], [entry(FRESH)], b"GET",
                 (Action.FETCH, "request", 0), id="9111/5.2.1.4 request no-cache, no validator"),
    pytest.param(["Cache-Control: no-cache"], [entry(FRESH, ETAG, age=100)], b"GET",
                 (Action.REVALIDATE, "stale", 0),
                 id="9211/2.2 stale response: fwd=stale even with request no-cache"),
    pytest.param(["Pragma: no-cache"], [entry(FRESH, ETAG)], b"GET",
                 (Action.REVALIDATE, "request", 0), id="9111/5.4 Pragma no-cache alone"),
    pytest.param(["Pragma: no-cache", "Cache-Control: max-stale=5"], [entry(FRESH)], b"GET",
                 (Action.SERVE, "", 0), id="9111/5.4 Pragma ignored with Cache-Control"),
    pytest.param(["Pragma: no-cache", "Cache-Control: x-ext"], [entry(FRESH, ETAG)], b"GET",
                 (Action.REVALIDATE, "request", 0),
                 id="9111/5.4 Cache-Control of unknown extensions only: Pragma applies"),
    pytest.param(["Cache-Control: max-age=0"], [entry(FRESH, ETAG)], b"GET",
                 (Action.REVALIDATE, "request", 0), id="9111/5.2.1.1 reload max-age=0"),
    pytest.param(["Cache-Control: max-age=0"], [entry(FRESH)], b"GET",
                 (Action.FETCH, "request", 0), id="9111/5.2.1.1 max-age=0 without validator"),
    pytest.param(["Cache-Control: max-age=30"], [entry(FRESH)], b"GET", (Action.SERVE, "", 0),
                 id="9111/5.2.1.1 age within request max-age"),
    pytest.param(["Cache-Control: max-age=5"], [entry(FRESH, ETAG)], b"GET",
                 (Action.REVALIDATE, "request", 0), id="9111/5.2.1.1 age over request max-age"),
    pytest.param(["Cache-Control: min-fresh=40"], [entry(FRESH)], b"GET", (Action.SERVE, "", 0),
                 id="9111/5.2.1.3 fresh for longer than min-fresh"),
    pytest.param(["Cache-Control: min-fresh=55"], [entry(FRESH, ETAG)], b"GET",
                 (Action.REVALIDATE, "request", 0), id="9111/5.2.1.3 not fresh enough"),
    pytest.param(["Cache-Control: max-stale=100"], [entry(FRESH, ETAG, age=100)], b"GET",
                 (Action.SERVE, "", 0), id="9111/5.2.1.2 stale within max-stale: served"),
    pytest.param(["Cache-Control: max-stale"], [entry(FRESH, age=10**6)], b"GET",
                 (Action.SERVE, "", 0), id="9111/5.2.1.2 bare max-stale: any staleness"),
    pytest.param(["Cache-Control: max-stale=10"], [entry(FRESH, ETAG, age=100)], b"GET",
                 (Action.REVALIDATE, "stale", 0), id="9111/5.2.1.2 staler than max-stale"),
    pytest.param(["Cache-Control: max-stale, max-age=50"], [entry(FRESH, ETAG, age=100)], b"GET",
                 (Action.REVALIDATE, "stale", 0), id="9111/5.2.1.1 max-age bounds max-stale"),
    pytest.param(["Cache-Control: max-stale"], [entry(FRESH, "Cache-Control: must-revalidate",
                                                      ETAG, age=100)], b"GET",
                 (Action.REVALIDATE, "stale", 0),
                 id="9111/5.2.2.2 must-revalidate: never stale, even with max-stale"),
    pytest.param(["Cache-Control: max-stale"], [entry(FRESH, "Cache-Control: proxy-revalidate",
                                                      age=100)], b"GET",
                 (Action.FETCH, "stale", 0), id="9111/5.2.2.8 proxy-revalidate in a shared cache"),
    pytest.param(["Cache-Control: max-stale"], [entry("Cache-Control: s-maxage=60", ETAG,
                                                      age=100)], b"GET",
                 (Action.REVALIDATE, "stale", 0),
                 id="9111/5.2.2.10 s-maxage implies proxy-revalidate"),
    pytest.param(["Cache-Control: no-store"], [entry(FRESH)], b"GET", (Action.SERVE, "", 0),
                 id="9111/5.2.1.5 request no-store may be served from cache"),
    # response directives
    pytest.param([], [entry(FRESH, "Cache-Control: no-cache", ETAG)], b"GET",
                 (Action.REVALIDATE, "stale", 0),
                 id="9111/5.2.2.4 response no-cache: always revalidated"),
    pytest.param([], [entry(FRESH, 'Cache-Control: no-cache="set-cookie"')], b"GET",
                 (Action.SERVE, "", 0), id="9111/5.2.2.4 qualified no-cache: served"),
    pytest.param(["Cache-Control: max-age=0"], [entry(FRESH, "Cache-Control: immutable", ETAG)],
                 b"GET", (Action.SERVE, "", 0), id="8246/2 fresh immutable survives a reload"),
    pytest.param(["Cache-Control: no-cache"], [entry(FRESH, "Cache-Control: immutable", ETAG)],
                 b"GET", (Action.REVALIDATE, "request", 0),
                 id="8246/2 forced reload (no-cache) revalidates immutable"),
    pytest.param(["Cache-Control: min-fresh=55"], [entry(FRESH, "Cache-Control: immutable")],
                 b"GET", (Action.FETCH, "request", 0),
                 id="8246/2 immutable does not lift min-fresh"),
    pytest.param([], [entry(FRESH, "Cache-Control: immutable", ETAG, age=100)], b"GET",
                 (Action.REVALIDATE, "stale", 0), id="8246/2 stale immutable is just stale"),
    pytest.param([], [entry(FRESH, "Cache-Control: stale-while-revalidate=60", ETAG, age=100)],
                 b"GET", (Action.SERVE_STALE_REVALIDATE, "stale", 0),
                 id="5861/3 stale within stale-while-revalidate"),
    pytest.param([], [entry(FRESH, "Cache-Control: stale-while-revalidate=60", age=100)],
                 b"GET", (Action.SERVE_STALE_REVALIDATE, "stale", 0),
                 id="5861/3 stale-while-revalidate without validator: background refresh"),
    pytest.param([], [entry(FRESH, "Cache-Control: stale-while-revalidate=30", ETAG, age=100)],
                 b"GET", (Action.REVALIDATE, "stale", 0),
                 id="5861/3 beyond the stale-while-revalidate window"),
    pytest.param([], [entry(FRESH, "Cache-Control: stale-while-revalidate=60, must-revalidate",
                            ETAG, age=100)], b"GET", (Action.REVALIDATE, "stale", 0),
                 id="9111/4.2.4 must-revalidate forbids stale-while-revalidate"),
    pytest.param([], [entry("Cache-Control: s-maxage=60, stale-while-revalidate=60", ETAG,
                            age=100)], b"GET", (Action.REVALIDATE, "stale", 0),
                 id="9111/5.2.2.10 s-maxage forbids stale-while-revalidate"),
    pytest.param(["Cache-Control: max-age=0"],
                 [entry(FRESH, "Cache-Control: stale-while-revalidate=60", ETAG, age=100)],
                 b"GET", (Action.REVALIDATE, "stale", 0),
                 id="9111/5.2.1.1 a client asking for max-age gets no stale response"),
    pytest.param(["Cache-Control: no-cache"],
                 [entry(FRESH, "Cache-Control: stale-while-revalidate=60", ETAG, age=100)],
                 b"GET", (Action.REVALIDATE, "stale", 0),
                 id="9111/5.2.1.4 request no-cache gets no stale response"),
    # only-if-cached
    pytest.param(["Cache-Control: only-if-cached"], [entry(FRESH)], b"GET",
                 (Action.SERVE, "", 0), id="9111/5.2.1.7 only-if-cached, fresh: served"),
    pytest.param(["Cache-Control: only-if-cached"], [entry(FRESH, ETAG, age=100)], b"GET",
                 (Action.GATEWAY_TIMEOUT, "stale", 0),
                 id="9111/5.2.1.7 only-if-cached, stale: 504"),
    pytest.param(["Cache-Control: only-if-cached"], [], b"GET",
                 (Action.GATEWAY_TIMEOUT, "uri-miss", None),
                 id="9111/5.2.1.7 only-if-cached, nothing stored: 504"),
    pytest.param(["Cache-Control: only-if-cached, max-stale"], [entry(FRESH, age=100)], b"GET",
                 (Action.SERVE, "", 0), id="9111/5.2.1.7 only-if-cached with allowed stale"),
    pytest.param(["Cache-Control: only-if-cached"],
                 [entry(FRESH, "Cache-Control: stale-while-revalidate=60", age=100)], b"GET",
                 (Action.SERVE_STALE_REVALIDATE, "stale", 0),
                 id="9111/5.2.1.7 only-if-cached with stale-while-revalidate: served"),
    pytest.param(["Cache-Control: only-if-cached"], [entry(FRESH)], b"POST",
                 (Action.GATEWAY_TIMEOUT, "method", None),
                 id="9111/5.2.1.7 only-if-cached for a method never served"),
    # Vary and candidates
    pytest.param(["Accept-Encoding: gzip"],
                 [entry(FRESH, "Vary: Accept-Encoding", request=["Accept-Encoding: gzip"])],
                 b"GET", (Action.SERVE, "", 0), id="9111/4.1 the variant matches"),
    pytest.param(["Accept-Encoding: br"],
                 [entry(FRESH, "Vary: Accept-Encoding", ETAG, request=["Accept-Encoding: gzip"])],
                 b"GET", (Action.REVALIDATE, "vary-miss", None),
                 id="9111/4.1 no variant matches: vary-miss, ETags offered"),
    pytest.param(["Accept-Encoding: br"],
                 [entry(FRESH, "Vary: Accept-Encoding", LM, request=["Accept-Encoding: gzip"])],
                 b"GET", (Action.FETCH, "vary-miss", None),
                 id="9111/4.3.1 vary-miss: a date cannot pick a variant"),
    pytest.param([], [entry(FRESH, "Vary: *", ETAG)], b"GET",
                 (Action.REVALIDATE, "vary-miss", None),
                 id="9111/4.1 Vary * never matches"),
    pytest.param([], [entry(FRESH, complete=False)], b"GET", (Action.FETCH, "miss", None),
                 id="9111/3.3 incomplete responses are not used"),
    pytest.param([], [entry(FRESH, 'ETag: "old"', age=50), entry(FRESH, 'ETag: "new"', age=20),
                      entry(FRESH, 'ETag: "mid"', age=30)], b"GET", (Action.SERVE, "", 1),
                 id="9111/4.1 several matches: the most recent Date"),
    pytest.param(["Accept-Encoding: br"],
                 [entry(FRESH, "Vary: Accept-Encoding", request=["Accept-Encoding: gzip"]),
                  entry(FRESH, "Vary: Accept-Encoding", request=["Accept-Encoding: br"])],
                 b"GET", (Action.SERVE, "", 1), id="9111/4.1 the matching variant of several"),
]  # fmt: skip


@pytest.mark.parametrize(("request_lines", "candidates", "method", "expected"), DECIDE_ROWS)
def test_decide(
    request_lines: list[str],
    candidates: list[Stored],
    method: bytes,
    expected: tuple[Action, str, int | None],
) -> None:
    """RFC 9111 §4 lookups: action, RFC 9211 fwd reason and the chosen stored response."""
    action, fwd, index = expected
    decision = policy.decide(method, fields(*request_lines), candidates, NOW, SETTINGS)
    assert (decision.action, decision.fwd) == (action, fwd)
    if index is None:
        assert decision.stored is None
    else:
        assert decision.stored is candidates[index]  # identity: the transaction relies on it
    if decision.action is Action.REVALIDATE:
        assert decision.conditional
    if decision.action is Action.FETCH:
        assert decision.conditional == ()


def test_decide_reports_age_and_ttl() -> None:
    """RFC 9111 §4.2.3 / RFC 9211 §2.5: age for the Age field, ttl = lifetime - age."""
    fresh = policy.decide(b"GET", [], [entry(FRESH, age=10, delay=2)], NOW, SETTINGS)
    assert (fresh.age, fresh.ttl) == (12, 48)
    stale = policy.decide(
        b"GET", fields("Cache-Control: max-stale"), [entry(FRESH, age=100)], NOW, SETTINGS
    )
    assert (stale.action, stale.age, stale.ttl) == (Action.SERVE, 100, -40)


def test_decide_revalidation_offers_every_stored_etag() -> None:
    """RFC 9111 §4.3.1: the ETags of all stored responses for the URI go in If-None-Match (the
    origin may pick any); If-Modified-Since only when a single response is being validated."""
    gzip = entry(
        FRESH, ETAG, LM, "Vary: Accept-Encoding", age=100, request=["Accept-Encoding: gzip"]
    )
    br = entry(FRESH, 'ETag: W/"v2"', "Vary: Accept-Encoding", request=["Accept-Encoding: br"])
    bare = entry(FRESH, "Vary: Accept-Encoding", request=["Accept-Encoding: zstd"])
    decision = policy.decide(
        b"GET", fields("Accept-Encoding: gzip"), [gzip, br, bare], NOW, SETTINGS
    )
    assert decision.action is Action.REVALIDATE and decision.stored is gzip
    assert decision.conditional == ((b"if-none-match", b'"v1", W/"v2"'),)
    assert decision.validated == (gzip, br)
    alone = policy.decide(b"GET", fields("Accept-Encoding: gzip"), [gzip], NOW, SETTINGS)
    assert alone.conditional == (
        (b"if-none-match", b'"v1"'),
        (b"if-modified-since", LM[15:].encode()),
    )


def test_decide_stale_while_revalidate_carries_the_conditional() -> None:
    """RFC 5861 §3: the background revalidation uses the stored validators (§4.3.1)."""
    stored = entry(FRESH, "Cache-Control: stale-while-revalidate=60", ETAG, age=100)
    decision = policy.decide(b"GET", [], [stored], NOW, SETTINGS)
    assert decision.action is Action.SERVE_STALE_REVALIDATE
    assert decision.conditional == ((b"if-none-match", b'"v1"'),)
    assert decision.ttl == -40


def test_decide_uses_the_configured_heuristics() -> None:
    """RFC 9111 §4.2.2: with no heuristic allowed (fraction 0) the response is stale."""
    stored = entry(LM)
    assert policy.decide(b"GET", [], [stored], NOW, SETTINGS).action is Action.SERVE
    none = LookupSettings(Heuristics(fraction=0.0))
    assert policy.decide(b"GET", [], [stored], NOW, none).action is Action.REVALIDATE


CONDITIONAL_ROWS = [
    pytest.param([entry(ETAG, LM)], [("if-none-match", '"v1"'), ("if-modified-since", LM[15:])],
                 id="9111/4.3.1 one response: ETag and Last-Modified"),
    pytest.param([entry(LM)], [("if-modified-since", LM[15:])],
                 id="9111/4.3.1 Last-Modified only"),
    pytest.param([entry(ETAG, LM), entry('ETag: "v2"', LM), entry(ETAG)],
                 [("if-none-match", '"v1", "v2"')],
                 id="9111/4.3.1 several: every ETag once, no date"),
    pytest.param([entry("Last-Modified: yesterday")], [],
                 id="9110/13.1.3 an invalid Last-Modified is not sent"),
    pytest.param([entry(FRESH)], [], id="9111/4.3.1 no validators: nothing"),
]  # fmt: skip


@pytest.mark.parametrize(("candidates", "expected"), CONDITIONAL_ROWS)
def test_conditional_for(candidates: list[Stored], expected: list[tuple[str, str]]) -> None:
    """RFC 9111 §4.3.1: the conditional fields of a revalidation."""
    assert policy.conditional_for(candidates) == tuple(
        (name.encode(), value.encode()) for name, value in expected
    )


# --- after the origin answered ------------------------------------------------------------------

V1, V1_WEAK, V2 = 'ETag: "v1"', 'ETag: W/"v1"', 'ETag: "v2"'
LM_A = f"Last-Modified: {at(-5000)}"
LM_B = f"Last-Modified: {at(-6000)}"

SELECT_ROWS = [
    pytest.param([entry(V1), entry(V2), entry(V1, age=5)], [V1], [0, 2],
                 id="9111/4.3.4 strong ETag selects every match"),
    pytest.param([entry(V1), entry(V2)], ['ETag: "v3"'], [],
                 id="9111/4.3.4 strong ETag matching nothing updates nothing"),
    pytest.param([entry(V1_WEAK)], [V1], [],
                 id="9111/4.3.4 strong ETag does not match a weak one"),
    pytest.param([entry(V1_WEAK, age=50), entry(V1_WEAK, age=20), entry(V2)], [V1_WEAK], [1],
                 id="9111/4.3.4 weak ETag: the most recent match"),
    pytest.param([entry(LM_A), entry(LM_B)], [LM_A], [0],
                 id="9111/4.3.4 Last-Modified match"),
    pytest.param([entry(LM_A, age=50), entry(LM_A, age=20)], [LM_A], [0, 1],
                 id="9110/8.8.2.2 strong Last-Modified selects every match"),
    pytest.param([entry(LM_A, age=50, date=False), entry(LM_A, age=20, date=False)], [LM_A], [1],
                 id="9110/8.8.2.2 weak Last-Modified (no Date): the most recent"),
    pytest.param([entry(V1)], [], [0], id="9111/4.3.4 no validator, one candidate"),
    pytest.param([entry(V1), entry(V2)], [], [], id="9111/4.3.4 no validator, several: none"),
    pytest.param([], [V1], [], id="9111/4.3.4 nothing stored"),
]  # fmt: skip


@pytest.mark.parametrize(("candidates", "lines", "expected"), SELECT_ROWS)
def test_select_for_304(candidates: list[Stored], lines: list[str], expected: list[int]) -> None:
    """RFC 9111 §4.3.4: which stored responses a 304 freshens."""
    assert policy.select_for_304(candidates, fields(*lines)) == expected


FRESHEN_ROWS = [
    pytest.param(["Cache-Control: max-age=10", "X-A: 1", f"Date: {at(-100)}"],
                 ["Cache-Control: max-age=60", f"Date: {at(0)}"],
                 ["Cache-Control: max-age=60", "X-A: 1", f"Date: {at(0)}"],
                 id="9111/3.2 fields replaced in place, others kept"),
    pytest.param(["X-A: 1", "X-A: 2", "X-B: 1"], ["x-a: 3", "X-C: 4"],
                 ["x-a: 3", "X-B: 1", "X-C: 4"],
                 id="9111/3.2 all lines of a name replaced, new names appended"),
    pytest.param(["Content-Length: 100", "Content-Type: text/html", "Content-Encoding: gzip"],
                 ["Content-Length: 0", "Content-Type: text/plain", "Content-Encoding: br",
                  "Content-Range: bytes 0-1/2"],
                 ["Content-Length: 100", "Content-Type: text/plain", "Content-Encoding: br"],
                 id="9111/3.2 Content-Length never updated; other content fields are"),
    pytest.param(["X-A: 1"], ["Connection: X-Hop", "X-Hop: 1", "Transfer-Encoding: chunked",
                              "Keep-Alive: 5", "Proxy-Authenticate: Basic"], ["X-A: 1"],
                 id="9111/3.1 fields excepted from storage are not taken"),
    pytest.param(["Set-Cookie: a", "Cache-Control: max-age=5"],
                 ['Cache-Control: private="set-cookie", max-age=60'],
                 ['Cache-Control: private="set-cookie", max-age=60'],
                 id="9111/5.2.2.7 the new private field names apply to the stored fields"),
    pytest.param(["Age: 500", f"Date: {at(-100)}", "X: 1"], ["ETag: \"e\""], ["X: 1", 'ETag: "e"'],
                 id="9111/4.2.3 Age and Date belong to the old exchange"),
    pytest.param(["Age: 500"], ["Age: 3"], ["Age: 3"], id="9111/3.2 a new Age replaces"),
]  # fmt: skip


@pytest.mark.parametrize(("stored_lines", "lines", "expected"), FRESHEN_ROWS)
def test_freshen_headers(stored_lines: list[str], lines: list[str], expected: list[str]) -> None:
    """RFC 9111 §3.2: updating stored fields from a 304."""
    assert policy.freshen_headers(fields(*stored_lines), fields(*lines)) == fields(*expected)


def test_freshen_restarts_the_age_from_the_304() -> None:
    """RFC 9111 §4.3.4 + §4.2.3: after a 304 the response is as old as the 304 exchange; a Date
    is supplied for a 304 without one (RFC 9110 §6.6.1)."""
    stored = entry(FRESH, "Age: 30", ETAG, age=1000)
    updated = policy.freshen(stored, fields(ETAG), NOW - 2, NOW - 1)
    assert (updated.request_time, updated.response_time) == (NOW - 2, NOW - 1)
    assert dict(updated.headers)[b"date"] == at(-1).encode()
    assert policy.current_age(updated, NOW) == 2
    assert policy.decide(b"GET", [], [updated], NOW, SETTINGS).action is Action.SERVE


STALE_IF_ERROR_ROWS = [
    pytest.param([], entry(FRESH, "Cache-Control: stale-if-error=300", age=200), True,
                 id="5861/4 within the response's stale-if-error"),
    pytest.param([], entry(FRESH, "Cache-Control: stale-if-error=100", age=200), False,
                 id="5861/4 beyond the response's stale-if-error"),
    pytest.param(["Cache-Control: stale-if-error=300"], entry(FRESH, age=200), True,
                 id="5861/4 the request's stale-if-error"),
    pytest.param([], entry(FRESH, age=200), False, id="9111/4.2.4 no permission: no stale"),
    pytest.param([], entry(FRESH, age=20), True, id="9111/4.2.4 a fresh response may cover"),
    pytest.param([], entry(FRESH, "Cache-Control: stale-if-error=300, must-revalidate", age=200),
                 False, id="9111/5.2.2.2 must-revalidate forbids stale-if-error"),
    pytest.param([], entry(FRESH, "Cache-Control: stale-if-error=300, proxy-revalidate", age=200),
                 False, id="9111/5.2.2.8 proxy-revalidate forbids stale-if-error"),
    pytest.param([], entry("Cache-Control: s-maxage=60, stale-if-error=300", age=200), False,
                 id="9111/5.2.2.10 s-maxage forbids stale-if-error"),
    pytest.param([], entry(FRESH, "Cache-Control: no-cache, stale-if-error=300", age=20), False,
                 id="9111/5.2.2.4 no-cache: never without validation"),
    pytest.param(["Cache-Control: no-cache"], entry(FRESH, "Cache-Control: stale-if-error=300",
                                                    age=200), False,
                 id="9111/5.2.1.4 forced reload without its own stale-if-error"),
    pytest.param(["Cache-Control: no-cache, stale-if-error=300"], entry(FRESH, age=200), True,
                 id="5861/4 forced reload that grants stale-if-error"),
    pytest.param(["Cache-Control: max-age=0"],
                 entry(FRESH, "Cache-Control: stale-if-error=300", age=200), True,
                 id="5861/4 regardless of other freshness information"),
    pytest.param(["Cache-Control: max-stale=200"], entry(FRESH, age=200), True,
                 id="9111/5.2.1.2 the client's max-stale is an allowance too"),
    pytest.param([], entry(FRESH, "Cache-Control: stale-if-error=300", age=20, complete=False),
                 False, id="9111/3.3 an incomplete response never"),
]  # fmt: skip


@pytest.mark.parametrize(("request_lines", "stored", "expected"), STALE_IF_ERROR_ROWS)
def test_stale_if_error_allows(request_lines: list[str], stored: Stored, expected: bool) -> None:
    """RFC 5861 §4 within RFC 9111 §4.2.4."""
    assert policy.stale_if_error_allows(stored, fields(*request_lines), NOW, SETTINGS) is expected


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        pytest.param(500, True, id="5861/4 500"),
        pytest.param(502, True, id="5861/4 502"),
        pytest.param(503, True, id="5861/4 503"),
        pytest.param(504, True, id="5861/4 504"),
        pytest.param(501, False, id="5861/4 501 is an answer"),
        pytest.param(404, False, id="5861/4 404 is an answer"),
    ],
)
def test_is_error_status_for_stale(status: int, expected: bool) -> None:
    """RFC 5861 §4: the error statuses stale-if-error covers."""
    assert policy.is_error_status_for_stale(status) is expected


INVALIDATES_ROWS = [
    pytest.param(b"POST", 200, True, id="9111/4.4 unsafe method, 2xx"),
    pytest.param(b"PUT", 303, True, id="9111/4.4 unsafe method, 3xx"),
    pytest.param(b"DELETE", 404, False, id="9111/4.4 error status does not"),
    pytest.param(b"PATCH", 500, False, id="9111/4.4 5xx does not"),
    pytest.param(b"PURGE", 200, True, id="9111/4.4 unknown method counts as unsafe"),
    pytest.param(b"get", 200, True, id="9110/9.1 method names are case-sensitive"),
    pytest.param(b"GET", 200, False, id="9111/4.4 GET is safe"),
    pytest.param(b"HEAD", 200, False, id="9111/4.4 HEAD is safe"),
    pytest.param(b"OPTIONS", 200, False, id="9111/4.4 OPTIONS is safe"),
    pytest.param(b"TRACE", 200, False, id="9111/4.4 TRACE is safe"),
]  # fmt: skip


@pytest.mark.parametrize(("method", "status", "expected"), INVALIDATES_ROWS)
def test_invalidates(method: bytes, status: int, expected: bool) -> None:
    """RFC 9111 §4.4: unsafe methods with non-error answers invalidate."""
    assert policy.invalidates(method, status) is expected


INVALIDATION_KEY_ROWS = [
    pytest.param([], ["http://a.test/p?x"], id="9111/4.4 the target URI"),
    pytest.param(["Location: /q", "Content-Location: r"],
                 ["http://a.test/p?x", "http://a.test/q", "http://a.test/r"],
                 id="9111/4.4 relative references resolved against the target"),
    pytest.param(["Location: HTTP://A.TEST:80/s"], ["http://a.test/p?x", "http://a.test/s"],
                 id="9111/4.4 same origin after normalisation"),
    pytest.param(["Location: http://b.test/s", "Content-Location: https://a.test/s",
                  "Location: http://a.test:8080/s", "Location: //evil.test/s"],
                 ["http://a.test/p?x"], id="9111/4.4 other origins are never invalidated"),
    pytest.param(["Location: http://a.test.evil/s"], ["http://a.test/p?x"],
                 id="9111/4.4 a host that only starts the same is another origin"),
    pytest.param(["Location: http://[bad/x"], ["http://a.test/p?x"],
                 id="9111/4.4 unparseable references skipped"),
    pytest.param(["Location: /p?x"], ["http://a.test/p?x"], id="9111/4.4 no duplicates"),
]  # fmt: skip


@pytest.mark.parametrize(("lines", "expected"), INVALIDATION_KEY_ROWS)
def test_invalidation_keys(lines: list[str], expected: list[str]) -> None:
    """RFC 9111 §4.4: what an unsafe request's answer invalidates."""
    key = policy.cache_key(b"http", b"a.test", b"/p?x")
    assert policy.invalidation_keys(key, b"http", b"a.test", fields(*lines)) == expected


# --- the client's conditionals and ranges ---------------------------------------------------------

NOT_MODIFIED_ROWS = [
    pytest.param(['If-None-Match: "v1"'], entry(V1), True, id="9110/13.1.2 matching ETag"),
    pytest.param(['If-None-Match: "x", W/"v1"'], entry(V1), True,
                 id="9110/13.1.2 weak comparison, one of a list"),
    pytest.param(['If-None-Match: "v1"'], entry(V1_WEAK), True,
                 id="9110/8.8.3.2 weak stored tag matches weakly"),
    pytest.param(['If-None-Match: "a,b", "v1"'], entry(V1), True,
                 id="9110/8.8.3 commas inside entity tags"),
    pytest.param(['If-None-Match: "x"', "If-None-Match: \"v1\""], entry(V1), True,
                 id="9110/5.3 list split across lines"),
    pytest.param(["If-None-Match: *"], entry(FRESH), True, id="9110/13.1.2 * matches"),
    pytest.param(['If-None-Match: "v2"'], entry(V1), False, id="9110/13.1.2 no match"),
    pytest.param(['If-None-Match: "v2"', f"If-Modified-Since: {at(0)}"], entry(V1, LM_A), False,
                 id="9110/13.1.3 If-Modified-Since ignored with If-None-Match"),
    pytest.param(['If-None-Match: "v1"'], entry(FRESH), False,
                 id="9110/13.1.2 nothing stored to compare"),
    pytest.param([f"If-Modified-Since: {at(-5000)}"], entry(LM_A), True,
                 id="9110/13.1.3 not modified since that date"),
    pytest.param([f"If-Modified-Since: {at(-5001)}"], entry(LM_A), False,
                 id="9110/13.1.3 modified after that date"),
    pytest.param(["If-Modified-Since: yesterday"], entry(LM_A), False,
                 id="9110/13.1.3 invalid date ignored"),
    pytest.param([f"If-Modified-Since: {at(0)}", f"If-Modified-Since: {at(0)}"], entry(LM_A),
                 False, id="9110/13.1.3 more than one member ignored"),
    pytest.param([f"If-Modified-Since: {at(-10)}"], entry(FRESH, age=10), True,
                 id="9111/4.3.2 no Last-Modified: the stored Date stands in"),
    pytest.param(['If-None-Match: "v1"'], entry(V1, status=404), False,
                 id="9110/13.2.1 preconditions only apply to 2xx"),
]  # fmt: skip


@pytest.mark.parametrize(("request_lines", "stored", "expected"), NOT_MODIFIED_ROWS)
def test_client_not_modified(request_lines: list[str], stored: Stored, expected: bool) -> None:
    """RFC 9111 §4.3.2 / RFC 9110 §13: answering the client's own conditional from the store."""
    assert policy.client_not_modified(fields(*request_lines), stored) is expected


def test_not_modified_headers() -> None:
    """RFC 9110 §15.4.5: a 304 carries the cache-relevant fields, Last-Modified only without an
    ETag, no content fields."""
    stored = fields(
        "Content-Type: text/html", "Cache-Control: max-age=5", "Content-Location: /x",
        f"Date: {at(0)}", V1, f"Expires: {at(5)}", "Vary: Accept", LM_A, "Content-Length: 9",
        "Set-Cookie: a=1",
    )  # fmt: skip
    assert policy.not_modified_headers(stored) == fields(
        "Cache-Control: max-age=5", "Content-Location: /x", f"Date: {at(0)}", V1,
        f"Expires: {at(5)}", "Vary: Accept",
    )  # fmt: skip
    assert policy.not_modified_headers(fields("Content-Type: a", LM_A)) == fields(LM_A)


LM_STRONG = entry(V1, LM_A)  # Date (NOW-10) is well after Last-Modified: strong (§8.8.2.2)

RANGE_ROWS = [
    pytest.param(["Range: bytes=0-99"], entry(size=1000), ByteRange(0, 99),
                 id="9110/14.1.2 first-last"),
    pytest.param(["Range: bytes=100-"], entry(size=1000), ByteRange(100, 999),
                 id="9110/14.1.2 open-ended"),
    pytest.param(["Range: bytes=-50"], entry(size=1000), ByteRange(950, 999),
                 id="9110/14.1.2 suffix"),
    pytest.param(["Range: bytes=-5000"], entry(size=1000), ByteRange(0, 999),
                 id="9110/14.1.2 suffix longer than the representation"),
    pytest.param(["Range: bytes=900-5000"], entry(size=1000), ByteRange(900, 999),
                 id="9110/14.1.2 last beyond the end is clipped"),
    pytest.param(["Range: BYTES = 1-2"], entry(size=1000), ByteRange(1, 2),
                 id="9110/14.1 units are case-insensitive"),
    pytest.param(["Range: bytes=1000-"], entry(size=1000), UNSATISFIABLE,
                 id="9110/14.1.1 first at the end: unsatisfiable"),
    pytest.param(["Range: bytes=-0"], entry(size=1000), UNSATISFIABLE,
                 id="9110/14.1.1 zero suffix: unsatisfiable"),
    pytest.param(["Range: bytes=99999999999999999999999-"], entry(size=1000), UNSATISFIABLE,
                 id="9110/14.1.1 huge first position"),
    pytest.param(["Range: bytes=0-1,5-6"], entry(size=1000), None,
                 id="9110/14.2 several ranges: serve the whole"),
    pytest.param(["Range: items=0-1"], entry(size=1000), None, id="9110/14.2 other unit"),
    pytest.param(["Range: bytes=5-1"], entry(size=1000), None, id="9110/14.1.1 invalid spec"),
    pytest.param(["Range: bytes=a-b"], entry(size=1000), None, id="9110/14.1.1 junk"),
    pytest.param(["Range: bytes=0-1", "Range: bytes=2-3"], entry(size=1000), None,
                 id="9110/14.2 several Range lines"),
    pytest.param([], entry(size=1000), None, id="9110/14.2 no Range"),
    pytest.param(["Range: bytes=0-1"], entry(size=0), None,
                 id="9110/14.1.1 empty representation: whole"),
    pytest.param(["Range: bytes=0-1"], entry(size=1000, status=404), None,
                 id="9110/14.2 only a 200 is ranged"),
    pytest.param(["Range: bytes=0-1"], entry(size=1000, complete=False), None,
                 id="9111/3.3 not from an incomplete response"),
    pytest.param(["Range: bytes=0-1", 'If-Range: "v1"'], LM_STRONG, ByteRange(0, 1),
                 id="9110/13.1.5 If-Range with the strong ETag"),
    pytest.param(["Range: bytes=0-1", 'If-Range: "v2"'], LM_STRONG, None,
                 id="9110/13.1.5 If-Range with another ETag: whole"),
    pytest.param(["Range: bytes=0-1", 'If-Range: W/"v1"'], LM_STRONG, None,
                 id="9110/13.1.5 a weak If-Range never matches"),
    pytest.param(["Range: bytes=0-1", 'If-Range: "v1"'], entry(V1_WEAK), None,
                 id="9110/13.1.5 strong comparison against a weak stored tag"),
    pytest.param(["Range: bytes=0-1", f"If-Range: {LM_A[15:]}"], LM_STRONG, ByteRange(0, 1),
                 id="9110/13.1.5 If-Range with the strong Last-Modified"),
    pytest.param(["Range: bytes=0-1", f"If-Range: {at(-4000)}"], LM_STRONG, None,
                 id="9110/13.1.5 If-Range with another date"),
    pytest.param(["Range: bytes=0-1", f"If-Range: {at(0)}"],
                 entry(f"Last-Modified: {at(0)}", age=0), None,
                 id="9110/8.8.2.2 Last-Modified equal to Date is weak"),
]  # fmt: skip


@pytest.mark.parametrize(("request_lines", "stored", "expected"), RANGE_ROWS)
def test_maybe_single_range(
    request_lines: list[str], stored: Stored, expected: ByteRange | None
) -> None:
    """RFC 9110 §14 on a stored response."""
    result = policy.maybe_single_range(fields(*request_lines), stored)
    assert result == expected
    if expected is UNSATISFIABLE:
        assert result is UNSATISFIABLE  # the transaction tests identity


def test_range_is_only_for_get() -> None:
    """RFC 9110 §14.2: range handling is defined for GET only."""
    stored = entry(size=1000)
    assert policy.maybe_single_range(fields("Range: bytes=0-1"), stored, method=b"HEAD") is None


# --- Cache-Status (RFC 9211) --------------------------------------------------------------------

CACHE_STATUS_ROWS = [
    pytest.param({"hit": True, "ttl": 120.7}, b"proxyd; hit; ttl=120", id="9211/2.1 hit with ttl"),
    pytest.param({"fwd": "miss", "fwd_status": 200, "stored": True},
                 b"proxyd; fwd=miss; fwd-status=200; stored", id="9211/2.2 miss stored"),
    pytest.param({"fwd": "stale", "fwd_status": 304, "ttl": -0.5},
                 b"proxyd; fwd=stale; fwd-status=304; ttl=-1",
                 id="9211/2.5 stale by half a second: negative ttl"),
    pytest.param({"hit": True, "fwd": "stale"}, b"proxyd; hit", id="9211/2.1 hit excludes fwd"),
    pytest.param({"fwd_status": 200}, b"proxyd", id="9211/2.3 fwd-status only with fwd"),
    pytest.param({"fwd": "not a token", "fwd_status": 200}, b"proxyd",
                 id="9211/2.2 fwd that is not a token is left out"),
    pytest.param({"fwd": "uri-miss", "collapsed": True}, b"proxyd; fwd=uri-miss; collapsed",
                 id="9211/2.7 collapsed"),
    pytest.param({"detail": "no-store"}, b"proxyd; detail=no-store", id="9211/2.8 token detail"),
    pytest.param({"detail": 'a "b" \\c'}, b'proxyd; detail="a \\"b\\" \\\\c"',
                 id="9211/2.8 string detail escaped"),
    pytest.param({"hit": True, "ttl": 1e30}, b"proxyd; hit; ttl=999999999999999",
                 id="8941/3.3.1 ttl kept within sf-integer range"),
    pytest.param({"fwd": "stale", "ttl": -math.inf}, b"proxyd; fwd=stale; ttl=-999999999999999",
                 id="8941/3.3.1 infinite ttl clamped"),
    pytest.param({"hit": True, "ttl": float("nan")}, b"proxyd; hit",
                 id="9211/2.5 NaN ttl left out"),
]  # fmt: skip


@pytest.mark.parametrize(("params", "expected"), CACHE_STATUS_ROWS)
def test_cache_status(params: dict[str, object], expected: bytes) -> None:
    """RFC 9211 §2: one Cache-Status member with its parameters."""
    assert policy.cache_status("proxyd", **params) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        pytest.param("proxyd", b"proxyd", id="9211/2 token name"),
        pytest.param(
            "edge-1.example:8080/c", b"edge-1.example:8080/c", id="8941/3.3.4 token chars"
        ),
        pytest.param("My Cache", b'"My Cache"', id="9211/2 name that is not a token: string"),
        pytest.param("1cache", b'"1cache"', id="8941/3.3.4 tokens start with a letter"),
        pytest.param("caf\u00e9", b'"caf?"', id="8941/3.3.3 non-ASCII cannot be in a string"),
    ],
)
def test_cache_status_name(name: str, expected: bytes) -> None:
    """RFC 9211 §2: the cache's name is an sf-token or an sf-string."""
    assert policy.cache_status(name) == expected

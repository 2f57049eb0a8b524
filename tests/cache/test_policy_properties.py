"""Properties of the cache policy's parsers and arithmetic (hypothesis).

The parsers get arbitrary bytes (they must never raise) and are checked for the invariances
RFC 9110 grants: directive and field names are case-insensitive (§5.1, RFC 9111 §5.2), a list
field may be split over several lines (§5.3) with optional whitespace around its commas (§5.6.1).
Cache-Status output is checked with a strict RFC 8941 list parser written from §4.2.
"""

from __future__ import annotations

import calendar
import email.utils
import math
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from proxyd.cache import policy
from proxyd.cache.policy import UNSATISFIABLE, Action, Header, Heuristics, LookupSettings, Stored

NOW = 1_700_000_000.0

# --- strategies -----------------------------------------------------------------------------------

OWS = st.sampled_from([b"", b" ", b"  ", b"\t", b" \t "])
DELTA = st.integers(0, 10**12).map(lambda n: b"%d" % n)
BARE_DIRECTIVES = (
    b"no-store public must-revalidate immutable proxy-revalidate no-transform must-understand"
    b" only-if-cached max-stale no-cache private"
).split()
FIELD_NAME = st.sampled_from([b"set-cookie", b"X-Foo", b"Authorization", b"vary"])


@st.composite
def directive(draw: st.DrawFn) -> bytes:
    """One well-formed Cache-Control directive (known or an extension)."""
    kind = draw(st.integers(0, 5))
    if kind == 0:
        name = draw(st.sampled_from([b"max-age", b"s-maxage", b"min-fresh", b"max-stale",
                                     b"stale-while-revalidate", b"stale-if-error"]))  # fmt: skip
        value = draw(DELTA)
        if draw(st.booleans()):
            value = b'"' + value + b'"'
        return name + b"=" + value
    if kind == 1:
        return draw(st.sampled_from(BARE_DIRECTIVES))
    if kind == 2:
        names = draw(st.lists(FIELD_NAME, min_size=1, max_size=3))
        return draw(st.sampled_from([b"no-cache", b"private"])) + b'="' + b", ".join(names) + b'"'
    if kind == 3:
        return b"x-ext=" + draw(st.sampled_from([b"1", b'"a, b"', b'"q\\"uote"', b"tok"]))
    if kind == 4:
        return b"max-age=" + draw(st.sampled_from([b"abc", b"-1", b"5.5", b""]))
    return b"Ext-" + draw(st.text("abcxyz", min_size=1, max_size=5)).encode()


DIRECTIVES = st.lists(directive(), min_size=0, max_size=8)


def cc(*lines: bytes) -> policy.CacheControl:
    return policy.parse_cache_control([(b"Cache-Control", line) for line in lines])


def join(elements: list[bytes], separators: list[bytes]) -> bytes:
    out = b""
    for i, element in enumerate(elements):
        out += element
        if i < len(elements) - 1:
            out += separators[i % len(separators)]
    return out


# --- Cache-Control ----------------------------------------------------------------------------


@given(st.binary(max_size=200), st.binary(max_size=50))
def test_cache_control_parser_never_raises(first: bytes, second: bytes) -> None:
    """RFC 9111 §5.2: whatever arrives, parsing yields directives (unknown ones ignored)."""
    assert isinstance(cc(first, second), policy.CacheControl)
    assert isinstance(cc(first), policy.CacheControl)


@given(st.binary(max_size=200))
def test_cache_control_is_case_insensitive(value: bytes) -> None:
    """RFC 9111 §5.2: directive names are case-insensitive; their arguments here are numbers or
    field names, case-insensitive too (RFC 9110 §5.1)."""
    assert cc(value) == cc(value.upper()) == cc(value.lower())


@given(DIRECTIVES, st.lists(OWS, min_size=2, max_size=4), st.data())
def test_cache_control_split_and_whitespace_invariance(
    elements: list[bytes], spaces: list[bytes], data: st.DataObject
) -> None:
    """RFC 9110 §5.3 / §5.6.1: one line, the same list over several lines, and optional
    whitespace or empty elements around the commas all mean the same."""
    plain = cc(b", ".join(elements))
    spaced = join(elements, [s + b"," + t for s, t in zip(spaces, reversed(spaces), strict=True)])
    assert cc(spaced) == plain
    assert cc(b" ,, " + spaced + b" ,") == plain
    if elements:
        cut = data.draw(st.integers(0, len(elements)))
        first, second = b",".join(elements[:cut]), b",".join(elements[cut:])
        assert cc(first, second) == plain


# --- age and freshness ------------------------------------------------------------------------

DATE_OR_JUNK = st.one_of(
    st.integers(-(10**6), 10**6).map(lambda d: policy.http_date(NOW + d)),
    st.sampled_from([b"0", b"-1", b"", b"yesterday"]),
)


@st.composite
def stored_responses(draw: st.DrawFn) -> Stored:
    headers: list[Header] = []
    for name, values in (
        (b"Date", DATE_OR_JUNK),
        (b"Expires", DATE_OR_JUNK),
        (b"Last-Modified", DATE_OR_JUNK),
        (b"Age", st.one_of(DELTA, st.sampled_from([b"-3", b"x", b"1, 2"]))),
        (b"Cache-Control", st.builds(b", ".join, DIRECTIVES)),
    ):
        if draw(st.booleans()):
            headers.append((name, draw(values)))
    response_time = NOW + draw(st.floats(-1e6, 1e6))
    request_time = response_time - draw(st.floats(-10, 100))
    status = draw(st.sampled_from([200, 203, 301, 302, 404, 500]))
    return Stored(status, tuple(headers), request_time, response_time, b"", 10)


@given(stored_responses(), st.floats(-1e7, 1e7), st.floats(0, 1e7))
def test_current_age_is_monotonic_and_never_negative(
    stored: Stored, offset: float, later: float
) -> None:
    """RFC 9111 §4.2.3: age only grows with time and is never negative."""
    now = NOW + offset
    age = policy.current_age(stored, now)
    assert age >= 0
    assert policy.current_age(stored, now + later) >= age


@given(stored_responses(), st.floats(0, 1), st.one_of(st.none(), st.floats(0, 1e9)))
def test_freshness_lifetime_is_never_negative(
    stored: Stored, fraction: float, maximum: float | None
) -> None:
    """RFC 9111 §4.2.1: a lifetime is a duration, 0 at least."""
    assert policy.freshness_lifetime(stored, Heuristics(fraction, maximum)) >= 0


@given(stored_responses(), st.floats(-1e6, 1e6))
def test_plain_request_is_served_exactly_when_fresh(stored: Stored, offset: float) -> None:
    """RFC 9111 §4.2: with no request directives, a stored response (that does not demand
    revalidation) is served when fresh and goes forward (or is served stale only by an explicit
    stale-while-revalidate) when not."""
    now = NOW + offset
    decision = policy.decide(b"GET", [], [stored], now, LookupSettings())
    lifetime = policy.freshness_lifetime(stored, Heuristics())
    age = policy.current_age(stored, now)
    no_cache = policy.parse_cache_control(stored.headers).no_cache == frozenset()
    assert decision.stored is stored
    assert (decision.action is Action.SERVE) == (lifetime > age and not no_cache)
    assert math.isclose(decision.ttl, lifetime - age)
    if decision.action is Action.REVALIDATE:
        assert decision.conditional


@given(st.binary(max_size=100), st.binary(max_size=60))
def test_decide_never_raises_on_request_fields(cache_control: bytes, pragma: bytes) -> None:
    """Arbitrary request fields never break a lookup, and the decision is well-formed."""
    stored = Stored(200, ((b"Cache-Control", b"max-age=60"), (b"ETag", b'"x"')), NOW, NOW, b"", 1)
    request = [(b"Cache-Control", cache_control), (b"Pragma", pragma)]
    decision = policy.decide(b"GET", request, [stored], NOW + 5, LookupSettings())
    assert decision.stored is stored
    assert (decision.action is Action.REVALIDATE) == bool(decision.conditional) or (
        decision.action is Action.SERVE_STALE_REVALIDATE
    )


@given(st.integers(0, 2**40))
def test_age_value_round_trips_integers(seconds: int) -> None:
    """RFC 9111 §5.1 / §1.2.2: an integer age is written as it is, capped at 2^31."""
    assert int(policy.age_value(seconds)) == min(seconds, 2**31)
    assert policy.age_value(seconds).isdigit()


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_age_value_of_any_float_is_delta_seconds(age: float) -> None:
    """RFC 9111 §5.1: Age is always 1*DIGIT within the 2^31 cap."""
    value = policy.age_value(age)
    assert value.isdigit() and 0 <= int(value) <= 2**31
    if 0 <= age < 2**31:
        assert int(value) == math.floor(age)


# --- dates ----------------------------------------------------------------------------------------

DATETIMES = st.datetimes(datetime(1900, 1, 1), datetime(9999, 12, 31)).map(
    lambda d: d.replace(microsecond=0, tzinfo=UTC)
)


@given(DATETIMES)
def test_three_date_formats_agree_with_the_standard_library(moment: datetime) -> None:
    """RFC 9110 §5.6.7: IMF-fixdate, rfc850-date and asctime-date give the same instant."""
    expected = float(calendar.timegm(moment.utctimetuple()))
    imf = email.utils.format_datetime(moment, usegmt=True).encode()
    asctime = moment.strftime("%a %b %e %H:%M:%S %Y").encode()
    assert policy.parse_http_date(imf) == expected
    assert policy.parse_http_date(asctime) == expected
    assert email.utils.parsedate_to_datetime(imf.decode()) == moment
    # rfc850-date (two-digit year): exact within 50 years of the reference
    rfc850 = moment.strftime("%A, %d-%b-%y %H:%M:%S GMT").encode()
    thirty_years_later = expected + 30 * 365 * 86400
    assert policy.parse_http_date(rfc850, thirty_years_later) == expected


@given(st.floats(0, 253402300799))
def test_http_date_round_trips(timestamp: float) -> None:
    """RFC 9110 §5.6.7: what we write we read back (to the second)."""
    assert policy.parse_http_date(policy.http_date(timestamp)) == math.floor(timestamp)


@given(st.integers(0, 253402300799))
def test_http_date_agrees_with_the_standard_library(timestamp: int) -> None:
    """RFC 9110 §5.6.7: IMF-fixdate as email.utils writes it (day names and all)."""
    assert policy.http_date(timestamp).decode() == email.utils.formatdate(timestamp, usegmt=True)


@given(st.binary(max_size=60))
def test_date_parser_never_raises(value: bytes) -> None:
    result = policy.parse_http_date(value, NOW)
    assert result is None or isinstance(result, float)


# --- Vary, conditionals, ranges, keys -------------------------------------------------------------

CODINGS = st.lists(
    st.sampled_from([b"gzip", b"br", b"deflate", b"identity", b"zstd;q=0.5", b"*;q=0"]),
    min_size=1,
    max_size=5,
)


@given(CODINGS, st.lists(OWS, min_size=2, max_size=3), st.data())
def test_vary_key_split_and_whitespace_invariance(
    codings: list[bytes], spaces: list[bytes], data: st.DataObject
) -> None:
    """RFC 9111 §4.1: field values match after combining lines, removing optional whitespace
    and folding case where the field is case-insensitive."""
    response = [(b"Vary", b"Accept-Encoding")]
    plain = policy.vary_key(response, [(b"Accept-Encoding", b",".join(codings))])
    spaced = join(codings, [s + b"," + t for s, t in zip(spaces, reversed(spaces), strict=True)])
    cut = data.draw(st.integers(1, len(codings)))
    split = [
        (b"accept-encoding", b", ".join(codings[:cut]).upper()),
        (b"ACCEPT-ENCODING", b" , ".join(codings[cut:]) or b""),
    ]
    if cut == len(codings):
        split.pop()
    assert policy.vary_key(response, [(b"Accept-Encoding", spaced)]) == plain
    assert policy.vary_key(response, split) == plain


ETAGS = st.lists(
    st.builds(
        lambda weak, text: (b"W/" if weak else b"") + b'"' + text.encode() + b'"',
        st.booleans(),
        st.text("ab,c ", max_size=4),
    ),
    min_size=1,
    max_size=4,
)


@given(ETAGS, st.data())
def test_if_none_match_split_invariance(tags: list[bytes], data: st.DataObject) -> None:
    """RFC 9110 §13.1.2 over §5.3: an If-None-Match list split over lines answers the same."""
    stored = Stored(200, ((b"ETag", data.draw(ETAGS)[0]),), NOW, NOW, b"", 1)
    whole = policy.client_not_modified([(b"If-None-Match", b" , ".join(tags))], stored)
    cut = data.draw(st.integers(1, len(tags)))
    split = [(b"If-None-Match", b",".join(tags[:cut]))]
    if tags[cut:]:
        split.append((b"if-none-match", b",".join(tags[cut:])))
    assert policy.client_not_modified(split, stored) == whole
    stored_opaque = stored.headers[0][1].removeprefix(b"W/")
    assert whole == any(t.removeprefix(b"W/") == stored_opaque for t in tags)


@given(st.binary(max_size=40), st.integers(0, 10**6))
def test_range_result_is_within_the_body(spec: bytes, size: int) -> None:
    """RFC 9110 §14.1.2: a served range lies inside the representation."""
    stored = Stored(200, (), NOW, NOW, b"", size)
    result = policy.maybe_single_range([(b"Range", b"bytes=" + spec)], stored)
    if result is not None and result is not UNSATISFIABLE:
        assert 0 <= result.first <= result.last < size


@given(
    st.sampled_from([b"http", b"HTTPS", b"Http"]),
    st.from_regex(rb"\A[a-zA-Z0-9.-]{1,20}(:[0-9]{1,5})?\Z"),
    st.binary(max_size=40),
)
def test_cache_key_is_ascii_and_idempotent(scheme: bytes, authority: bytes, path: bytes) -> None:
    """RFC 3986 §6: normalising a normalised key changes nothing; keys are ASCII."""
    key = policy.cache_key(scheme, authority, b"/" + path)
    assert key.isascii()
    rest = key.split("://", 1)[1]
    slash = rest.index("/")
    again = policy.cache_key(
        key.split("://", 1)[0].encode(), rest[:slash].encode(), rest[slash:].encode()
    )
    assert again == key


# --- Cache-Status is a valid sf-list (RFC 8941) -------------------------------------------------

_TCHAR = set("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_KEY_FIRST = set("abcdefghijklmnopqrstuvwxyz*")
_KEY_REST = _KEY_FIRST | set("0123456789_-.")


def _bare_item(s: str) -> tuple[object, str]:
    """RFC 8941 §4.2.3.1 (integers, strings, tokens, booleans: what Cache-Status uses)."""
    if s[:1] == "-" or s[:1].isdigit():
        sign, s = (-1, s[1:]) if s[0] == "-" else (1, s)
        digits = ""
        while s and s[0].isdigit():
            digits, s = digits + s[0], s[1:]
        assert 1 <= len(digits) <= 15 and s[:1] != "."
        return sign * int(digits), s
    if s[:1] == '"':
        out, s = "", s[1:]
        while True:
            assert s, "unterminated string"
            c, s = s[0], s[1:]
            if c == "\\":
                assert s[:1] in ('"', "\\")
                out, s = out + s[0], s[1:]
            elif c == '"':
                return out, s
            else:
                assert " " <= c <= "~"
                out += c
    if s[:1] == "?":
        assert s[1:2] in ("0", "1")
        return s[1] == "1", s[2:]
    assert s[:1].isascii() and (s[:1].isalpha() or s[:1] == "*"), f"bad item start {s!r}"
    token = s[0]
    s = s[1:]
    while s and (s[0] in _TCHAR or s[0] in ":/"):
        token, s = token + s[0], s[1:]
    return ("token", token), s


def _parameters(s: str) -> tuple[dict[str, object], str]:
    params: dict[str, object] = {}
    while s[:1] == ";":
        s = s[1:].lstrip(" ")
        assert s[:1] in _KEY_FIRST
        key = ""
        while s and s[0] in _KEY_REST:
            key, s = key + s[0], s[1:]
        value: object = True
        if s[:1] == "=":
            value, s = _bare_item(s[1:])
        params[key] = value
    return params, s


def parse_sf_list(text: str) -> list[tuple[object, dict[str, object]]]:
    """RFC 8941 §4.2.1 (items only; no inner lists)."""
    s = text.lstrip(" ")
    members = []
    while s:
        item, s = _bare_item(s)
        params, s = _parameters(s)
        members.append((item, params))
        s = s.lstrip(" \t")
        if not s:
            break
        assert s[0] == ",", f"expected a comma at {s!r}"
        s = s[1:].lstrip(" \t")
        assert s, "trailing comma"
    return members


@settings(max_examples=200)
@given(
    st.text(max_size=12),
    st.booleans(),
    st.sampled_from(["", "uri-miss", "vary-miss", "miss", "request", "stale", "method", "bad fwd"]),
    st.integers(0, 999),
    st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
    st.booleans(),
    st.booleans(),
    st.text(max_size=12),
)
def test_cache_status_is_a_valid_sf_list_member(
    name: str,
    hit: bool,
    fwd: str,
    fwd_status: int,
    ttl: float | None,
    stored: bool,
    collapsed: bool,
    detail: str,
) -> None:
    """RFC 9211 §2 / RFC 8941: every Cache-Status we write parses as a one-member sf-list whose
    parameters say what was asked."""
    value = policy.cache_status(
        name or "x", hit=hit, fwd=fwd, fwd_status=fwd_status, ttl=ttl, stored=stored,
        collapsed=collapsed, detail=detail,
    )  # fmt: skip
    [(item, params)] = parse_sf_list(value.decode("ascii"))
    if (name or "x").isascii() and (name or "x").isprintable():
        assert item in (("token", name or "x"), name or "x")
    assert params.get("hit", False) is hit
    assert params.get("stored", False) is stored
    assert params.get("collapsed", False) is collapsed
    if not hit and fwd and fwd != "bad fwd":
        assert params["fwd"] == ("token", fwd)
        assert params.get("fwd-status", 0) == fwd_status
    else:
        assert "fwd" not in params and "fwd-status" not in params
    if ttl is not None and not math.isnan(ttl):
        assert isinstance(params["ttl"], int)
        if abs(ttl) < 1e15:
            assert params["ttl"] == math.floor(ttl)
    if detail and detail.isascii() and detail.isprintable():
        assert params["detail"] in (("token", detail), detail)

"""RFC 9111 decisions for a shared cache (pure: no I/O, no clock; ``now`` is an argument).

The transaction (cache/transaction.py) is built against these names and shapes: change them
only together with it.

Times are wall-clock seconds since the epoch (floats). Header lists are sequences of
``(name, value)`` byte pairs in any letter case, in received order; functions must treat names
case-insensitively and must cope with a field repeated on several lines (RFC 9110 §5.3: lines of
a list field combine with commas).

Theory of operation
-------------------
A lookup is one call: ``decide(method, request_headers, candidates, now, settings)``. It walks the
steps of RFC 9111 §4 in order and returns an ``Action`` with everything the transaction needs to
act without asking again (the chosen ``Stored`` object itself — the transaction finds its entry
by identity —, its age and ttl for ``Age`` and ``Cache-Status``, the RFC 9211 ``fwd`` reason and
the conditional fields for a revalidation):

1. Only GET and HEAD are looked up (``fwd=method``); no stored response at all is ``uri-miss``.
2. §4.1 selects the candidates whose Vary-named request fields match (``vary-miss`` when none
   does; the other variants' ETags still go upstream, §4.3.1, so the origin can pick one). Of
   several matches the most recent (by Date) wins, §4.1.
3. §4.2: freshness lifetime (s-maxage > max-age > Expires - Date > heuristic, §4.2.1/§4.2.2) and
   current age (§4.2.3). Fresh responses are served unless the request's directives refuse them
   (no-cache / Pragma, max-age, min-fresh: ``fwd=request``) or the response says no-cache.
4. Stale responses are served only when explicitly allowed and nothing forbids it (§4.2.4):
   max-stale (``SERVE``) or stale-while-revalidate (``SERVE_STALE_REVALIDATE``), never with
   must-revalidate, proxy-revalidate or s-maxage (§5.2.2.2, §5.2.2.8, §5.2.2.10).
5. Everything else goes forward: ``REVALIDATE`` when there are validators to send, else
   ``FETCH``; with only-if-cached it becomes ``GATEWAY_TIMEOUT`` (§5.2.1.7).

Parsing is done once per message: the request's fields are indexed in one pass per ``decide``;
a stored response's facts (Cache-Control, dates, Age, validators, Vary) are parsed once and
memoised by (headers, response_time) in a bounded LRU — stored responses are immutable values and
the same ones are looked at by every request for their URI. Cache-Control values are memoised by
their bytes too (the same few dozen strings make up nearly all traffic). No regular expressions:
the grammars involved are small and bytes methods are faster.

Where the RFCs leave a choice, the choice and its reason are written next to the code; the final
list is in the docstrings of ``CacheControl``, ``storable``, ``decide`` and ``freshen_headers``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from functools import lru_cache
from typing import Final
from urllib.parse import urljoin, urlsplit

from proxyd.http.messages import DEFAULT_PORTS
from proxyd.http.rules import HOP_BY_HOP

Header = tuple[bytes, bytes]
Headers = Sequence[Header]

#: max-stale given without a value: any staleness is acceptable (RFC 9111 §5.2.1.2).
UNLIMITED: Final = float("inf")

#: RFC 9111 §1.2.2: a delta-seconds too large to represent is taken as 2**31.
DELTA_SECONDS_MAX: Final = 2**31


# --- small lexical helpers (RFC 9110 §5.6) ---------------------------------------------------


def _split_list(value: bytes, *, escapes: bool = True) -> list[bytes]:
    """The elements of a comma-separated list (RFC 9110 §5.6.1), stripped, empty ones dropped.

    Commas inside a quoted string do not split (``no-cache="a, b"``, ``"etag,with,commas"``).
    ``escapes``: a backslash inside quotes escapes the next byte (quoted-string, §5.6.4); entity
    tags have no escapes (§8.8.3), so their lists are split with ``escapes=False``.
    """
    if b'"' not in value:
        return [part for part in (e.strip() for e in value.split(b",")) if part]
    out: list[bytes] = []
    start = 0
    quoted = False
    i = 0
    n = len(value)
    while i < n:
        c = value[i]
        if quoted:
            if c == 0x5C and escapes:  # "\": quoted-pair
                i += 1
            elif c == 0x22:
                quoted = False
        elif c == 0x22:
            quoted = True
        elif c == 0x2C:
            part = value[start:i].strip()
            if part:
                out.append(part)
            start = i + 1
        i += 1
    part = value[start:].strip()
    if part:
        out.append(part)
    return out


def _unquote(arg: bytes) -> bytes | None:
    """A directive argument as token or quoted-string (§5.6.4); None when the quoting is broken
    (unterminated, or bytes after the closing quote)."""
    if arg[:1] != b'"':
        return arg
    if b"\\" not in arg:
        return arg[1:-1] if len(arg) >= 2 and arg.find(b'"', 1) == len(arg) - 1 else None
    out = bytearray()
    i = 1
    n = len(arg)
    while i < n:
        c = arg[i]
        if c == 0x5C:
            if i + 1 >= n:
                return None
            out.append(arg[i + 1])
            i += 2
            continue
        if c == 0x22:
            return bytes(out) if i == n - 1 else None
        out.append(c)
        i += 1
    return None


def _delta_seconds(arg: bytes | None) -> float | None:
    """delta-seconds = 1*DIGIT (§1.2.2), capped at 2**31; None when absent or invalid."""
    if not arg or not arg.isdigit():  # bytes.isdigit: ASCII digits only; "-5" and "5.0" fail
        return None
    if len(arg) > 10:  # longer than 2**31 has digits: also keeps int() off huge strings
        return float(DELTA_SECONDS_MAX)
    return float(min(int(arg), DELTA_SECONDS_MAX))


def _field_names(arg: bytes) -> frozenset[bytes]:
    return frozenset(name.lower() for name in _split_list(arg))


# --- Cache-Control parsing (RFC 9111 §5.2) --------------------------------------------------


@dataclass(frozen=True, slots=True)
class CacheControl:
    """Cache-Control directives of one message, parsed.

    Directive names are case-insensitive (§5.2); unknown directives and extensions are ignored
    (§5.2.3). A delta-seconds larger than 2**31 is capped at 2**31 (§1.2.2). Invalid values,
    quoted values and repeated directives (each decision follows the RFC sentence cited):

    - Quoted arguments are accepted for every directive: §5.2 "recipients ought to accept both
      forms, even if a specific form is required for generation". ``max-age="5"`` is 5.
    - max-age / s-maxage: invalid (``abc``, ``-5``, ``5.0``, no value, broken quoting) → 0.0, and
      a repeat with a different value → 0.0: §4.2.1 allows "either the first occurrence ... or
      the response should be considered stale" and encourages treating invalid freshness
      information as stale; we take the stale branch (the safe one for a shared cache). An
      identical repeat is harmless and keeps its value. In a request, 0.0 means "revalidate",
      which is the most restrictive reading there too.
    - min-fresh: repeats keep the largest; max-stale: repeats keep the smallest (a value beats a
      bare ``max-stale``); stale-while-revalidate / stale-if-error: the smallest. §4.2.1 "the
      most restrictive directive should be honored". An invalid value of these is ignored (it
      grants nothing, which is also the restrictive reading).
    - no-cache / private: a bare one, an empty or broken argument all count as unqualified (the
      most restrictive); qualified ones accumulate their field names (lower case). Token form
      (``no-cache=set-cookie``) is accepted like the quoted form (§5.2).
    - Boolean directives count when present, whatever argument they carry.
    """

    max_age: float | None = None  # None: absent; 0.0 also used for "invalid: treat as stale"
    s_maxage: float | None = None
    no_store: bool = False
    #: no-cache: None absent, empty frozenset = unqualified no-cache, else the field names
    no_cache: frozenset[bytes] | None = None
    #: private: None absent, empty frozenset = unqualified, else the field names (lower-case)
    private: frozenset[bytes] | None = None
    public: bool = False
    must_revalidate: bool = False
    proxy_revalidate: bool = False
    immutable: bool = False
    no_transform: bool = False
    must_understand: bool = False
    stale_while_revalidate: float | None = None
    stale_if_error: float | None = None
    # request directives (§5.2.1)
    max_stale: float | None = None  # UNLIMITED when given without a value
    min_fresh: float | None = None
    only_if_cached: bool = False


_NO_DIRECTIVES: Final = CacheControl()


def _freshness_merge(old: float | None, new: float | None) -> float:
    """max-age / s-maxage: invalid → 0; a repeat that disagrees → 0 (stale, §4.2.1)."""
    if new is None:
        return 0.0
    if old is None or old == new:
        return new
    return 0.0


def _names_merge(old: frozenset[bytes] | None, new: frozenset[bytes]) -> frozenset[bytes]:
    """no-cache / private: unqualified (empty) wins; qualified ones accumulate."""
    if old is None:
        return new
    if not old or not new:
        return frozenset()
    return old | new


def _min(old: float | None, new: float) -> float:
    return new if old is None else min(old, new)


@lru_cache(maxsize=1024)
def _parse_cc_value(value: bytes) -> CacheControl:
    """One (combined) Cache-Control field value; memoised: a handful of values make up most
    traffic, and ``CacheControl`` is immutable."""
    max_age: float | None = None
    s_maxage: float | None = None
    no_cache: frozenset[bytes] | None = None
    private: frozenset[bytes] | None = None
    swr: float | None = None
    sie: float | None = None
    max_stale: float | None = None
    min_fresh: float | None = None
    flags: set[bytes] = set()
    for element in _split_list(value):
        name, eq, raw = element.partition(b"=")
        name = name.rstrip().lower()
        arg = _unquote(raw.strip()) if eq else None  # None: no argument, or broken quoting
        if name == b"max-age":
            max_age = _freshness_merge(max_age, _delta_seconds(arg))
        elif name == b"s-maxage":
            s_maxage = _freshness_merge(s_maxage, _delta_seconds(arg))
        elif name == b"no-cache":
            names = frozenset() if arg is None else _field_names(arg)
            no_cache = _names_merge(no_cache, names)
        elif name == b"private":
            names = frozenset() if arg is None else _field_names(arg)
            private = _names_merge(private, names)
        elif name == b"max-stale":
            if not eq:
                max_stale = _min(max_stale, UNLIMITED)
            elif (seconds := _delta_seconds(arg)) is not None:
                max_stale = _min(max_stale, seconds)
        elif name == b"min-fresh":
            if (seconds := _delta_seconds(arg)) is not None:
                min_fresh = seconds if min_fresh is None else max(min_fresh, seconds)
        elif name == b"stale-while-revalidate":
            if (seconds := _delta_seconds(arg)) is not None:
                swr = _min(swr, seconds)
        elif name == b"stale-if-error":
            if (seconds := _delta_seconds(arg)) is not None:
                sie = _min(sie, seconds)
        elif name in _FLAG_DIRECTIVES:
            flags.add(name)
        # §5.2.3: anything else is an extension we do not understand: ignored.
    return CacheControl(
        max_age=max_age,
        s_maxage=s_maxage,
        no_store=b"no-store" in flags,
        no_cache=no_cache,
        private=private,
        public=b"public" in flags,
        must_revalidate=b"must-revalidate" in flags,
        proxy_revalidate=b"proxy-revalidate" in flags,
        immutable=b"immutable" in flags,
        no_transform=b"no-transform" in flags,
        must_understand=b"must-understand" in flags,
        stale_while_revalidate=swr,
        stale_if_error=sie,
        max_stale=max_stale,
        min_fresh=min_fresh,
        only_if_cached=b"only-if-cached" in flags,
    )


_FLAG_DIRECTIVES: Final = frozenset(
    {
        b"no-store",
        b"public",
        b"must-revalidate",
        b"proxy-revalidate",
        b"immutable",
        b"no-transform",
        b"must-understand",
        b"only-if-cached",
    }
)


def _cc_of_lines(lines: list[bytes] | None) -> CacheControl:
    if not lines:
        return _NO_DIRECTIVES
    # RFC 9110 §5.3: several lines of a list field mean the same as one joined with commas.
    return _parse_cc_value(lines[0] if len(lines) == 1 else b",".join(lines))


def parse_cache_control(headers: Headers) -> CacheControl:
    """All Cache-Control lines of ``headers`` parsed together (§5.2)."""
    return _cc_of_lines([value for name, value in headers if name.lower() == b"cache-control"])


# --- HTTP dates (RFC 9110 §5.6.7) -------------------------------------------------------------

_MONTH_NAMES: Final = b" Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split(b" ")
_MONTHS: Final = {name.lower(): number for number, name in enumerate(_MONTH_NAMES) if name}
_DAY_NAMES: Final = (b"Mon", b"Tue", b"Wed", b"Thu", b"Fri", b"Sat", b"Sun")
_DAYS_IN_MONTH: Final = (0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm)."""
    year -= month <= 2
    era = year // 400
    yoe = year - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _civil_from_days(days: int) -> tuple[int, int, int]:
    """(year, month, day) of a day count since 1970-01-01 (the inverse of the above)."""
    days += 719468
    era = days // 146097
    doe = days - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (month <= 2), month, day


def _small_int(digits: bytes, most: int) -> int | None:
    if not digits.isdigit() or len(digits) > most:
        return None
    return int(digits)


def _year_of(timestamp: float) -> int:
    if not -1e15 < timestamp < 1e15:  # also NaN
        return 1970
    return _civil_from_days(math.floor(timestamp / 86400))[0]


def parse_http_date(value: bytes, reference: float | None = None) -> float | None:
    """An HTTP-date in any of the three formats recipients must accept (RFC 9110 §5.6.7), as
    seconds since the epoch; None when it is not one (``Expires: 0``, garbage).

    IMF-fixdate ``Sun, 06 Nov 1994 08:49:37 GMT``; rfc850-date ``Sunday, 06-Nov-94 08:49:37
    GMT``; asctime ``Sun Nov  6 08:49:37 1994``. Robust as §5.6.7 encourages: the day name is not
    checked, month names and "GMT" are matched in any case, "UTC" is taken for "GMT", extra
    spaces are allowed. A two-digit year is "the most recent year in the past that had the same
    last two digits" when it would otherwise be more than 50 years after ``reference`` (§5.6.7;
    the caller passes the time the message was received; without one, 70-99 are 19xx).
    """
    text = value.strip()
    comma = text.find(b",")
    if comma >= 0:
        parts = text[comma + 1 :].split()
        if len(parts) == 5:  # IMF-fixdate: 06 Nov 1994 08:49:37 GMT
            day_b, month_b, year_b, clock, zone = parts
        elif len(parts) == 3:  # rfc850-date: 06-Nov-94 08:49:37 GMT
            dmy = parts[0].split(b"-")
            if len(dmy) != 3:
                return None
            day_b, month_b, year_b = dmy
            clock, zone = parts[1], parts[2]
        else:
            return None
        if zone.upper() not in (b"GMT", b"UTC"):
            return None
    else:  # asctime-date: Sun Nov  6 08:49:37 1994
        parts = text.split()
        if len(parts) != 5:
            return None
        _, month_b, day_b, clock, year_b = parts
    month = _MONTHS.get(month_b.lower())
    day = _small_int(day_b, 2)
    hms = clock.split(b":")
    if month is None or day is None or len(hms) != 3:
        return None
    hour, minute, second = (_small_int(p, 2) for p in hms)
    if hour is None or minute is None or second is None:
        return None
    if len(year_b) == 2 and year_b.isdigit():
        two = int(year_b)
        if reference is None:
            year = 1900 + two if two >= 70 else 2000 + two
        else:
            now_year = _year_of(reference)
            year = now_year - now_year % 100 + two
            if year > now_year + 50:
                year -= 100
    elif len(year_b) == 4 and year_b.isdigit():
        year = int(year_b)
    else:
        return None
    leap = month == 2 and year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    if not 1 <= day <= _DAYS_IN_MONTH[month] + leap:
        return None
    if hour > 23 or minute > 59 or second > 60:  # 60: a leap second (RFC 5322 §3.3)
        return None
    days = _days_from_civil(year, month, day)
    return float(days * 86400 + hour * 3600 + minute * 60 + second)


def http_date(timestamp: float) -> bytes:
    """IMF-fixdate (RFC 9110 §5.6.7) for a time, e.g. for the Date a cache must add (§6.6.1).
    Years are kept within 0001-9999 (4DIGIT); a non-finite time gives the epoch."""
    seconds = math.floor(timestamp) if math.isfinite(timestamp) else 0
    seconds = min(max(seconds, -62135596800), 253402300799)
    days, rest = divmod(seconds, 86400)
    year, month, day = _civil_from_days(days)
    return b"%s, %02d %s %04d %02d:%02d:%02d GMT" % (
        _DAY_NAMES[(days + 3) % 7],  # 1970-01-01 was a Thursday
        day,
        _MONTH_NAMES[month],
        year,
        rest // 3600,
        rest // 60 % 60,
        rest % 60,
    )


# --- what the store keeps and policy reads --------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stored:
    """One stored response (a variant), as policy sees it."""

    status: int
    headers: tuple[Header, ...]  # end-to-end fields as stored
    request_time: float  # when the request that produced it was sent (§4.2.3)
    response_time: float  # when its head arrived
    #: the request's values of the fields named by Vary (``vary_key``), b"" when no Vary
    variant: bytes
    body_size: int
    complete: bool = True
    #: What policy parsed from ``headers``, kept with them (``_facts``): not part of the value.
    parsed: _Facts | None = field(default=None, init=False, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class _Facts:
    """What policy reads from a response's fields, parsed once."""

    cc: CacheControl
    date: float | None
    has_expires: bool
    expires: float | None  # None with has_expires: invalid, i.e. already expired (§5.3)
    age: float  # Age (§5.1), 0 when absent or invalid
    last_modified: float | None
    last_modified_raw: bytes  # b"" when absent or not a valid date
    etag: bytes  # b"" when absent
    #: Vary field names, lower case, sorted, without duplicates; None for "Vary: *"
    vary: tuple[bytes, ...] | None


def _gather(headers: Iterable[Header], received: float | None) -> _Facts:
    cc_lines: list[bytes] = []
    vary_lines: list[bytes] = []
    age_lines: list[bytes] = []
    expires_lines: list[bytes] = []
    date_raw: bytes | None = None
    last_modified_raw: bytes | None = None
    etag = b""
    for name, value in headers:
        key = name.lower()
        if key == b"cache-control":
            cc_lines.append(value)
        elif key == b"date":
            if date_raw is None:
                date_raw = value
        elif key == b"expires":
            expires_lines.append(value.strip())
        elif key == b"age":
            age_lines.append(value)
        elif key == b"last-modified":
            if last_modified_raw is None:
                last_modified_raw = value.strip()
        elif key == b"etag":
            if not etag:  # ETag is a singleton field: the first line counts
                etag = value.strip()
        elif key == b"vary":
            vary_lines.append(value)
    date = parse_http_date(date_raw, received) if date_raw is not None else None
    expires: float | None = None
    # §4.2.1: several Expires lines: "the first occurrence" or "stale"; differing lines are
    # taken as invalid, i.e. stale (§5.3: an invalid Expires means "already expired").
    if expires_lines and all(line == expires_lines[0] for line in expires_lines):
        expires = parse_http_date(expires_lines[0], received)
    # Age (§5.1) is delta-seconds; an invalid member is ignored; of several the largest counts
    # (the conservative choice: the response is at least that old).
    age = 0.0
    for line in age_lines:
        for member in line.split(b","):
            seconds = _delta_seconds(member.strip())
            if seconds is not None and seconds > age:
                age = seconds
    last_modified = None
    if last_modified_raw is not None:
        last_modified = parse_http_date(last_modified_raw, received)
    vary: tuple[bytes, ...] | None = ()
    if vary_lines:
        names = {n.lower() for line in vary_lines for n in _split_list(line)}
        vary = None if VARY_STAR in names else tuple(sorted(names))
    return _Facts(
        cc=_cc_of_lines(cc_lines),
        date=date,
        has_expires=bool(expires_lines),
        expires=expires,
        age=age,
        last_modified=last_modified,
        last_modified_raw=(last_modified_raw or b"") if last_modified is not None else b"",
        etag=etag,
        vary=vary,
    )


def _facts(stored: Stored) -> _Facts:
    """Parsed once per stored response and kept on it (the store's memory copy of the index
    holds it as long as the row): a hit costs no parsing however many entries are stored. (A
    global cache keyed by the headers would be bounded below the number of entries, and every
    hit past its size would parse again: CPU per request growing with the cache.)"""
    facts = stored.parsed
    if facts is None:
        facts = _gather(stored.headers, stored.response_time)
        object.__setattr__(stored, "parsed", facts)  # a memo on a frozen value
    return facts


# --- storing (§3) ---------------------------------------------------------------------------


class NotStorable(Enum):
    """Why a response is not stored (the value is a short reason for Cache-Status detail)."""

    METHOD = "method"  # only GET is stored (HEAD is answered from a stored GET)
    STATUS = "status"  # not final, or a status code the cache does not understand (§3 (2)/(3))
    REQUEST_NO_STORE = "request-no-store"
    NO_STORE = "no-store"
    PRIVATE = "private"  # unqualified private: never in a shared cache (§5.2.2.7)
    AUTHORIZATION = "authorization"  # §3.5
    NO_FRESHNESS_INFO = "no-freshness-info"  # no lifetime, no validator, not heuristic (§3 (6))
    VARY_STAR = "vary-star"  # could be stored but can never be served: not worth storing
    PARTIAL = "partial"  # 206 / incomplete: not stored by this cache
    MUST_UNDERSTAND = "must-understand"  # must-understand with a status we do not understand


#: RFC 9110 §15.1: status codes that are heuristically cacheable (§4.2.2).
HEURISTICALLY_CACHEABLE: Final = frozenset(
    {200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501}
)

#: The final status codes whose caching requirements this cache implements: those RFC 9110 §15
#: defines, plus 429 (RFC 6585) and 451 (RFC 7725), which have no special caching rules. Any
#: other code is not stored: RFC 9110 §15 lets a recipient treat an unknown code as x00 for
#: handling, but storing one is a guess about semantics we do not know (and §3 requires
#: understanding whenever must-understand is present). 206 and 304 are understood but never
#: stored as new entries (206: no partial storage here; 304: it only freshens, §4.3.4).
UNDERSTOOD_STATUSES: Final = frozenset(
    {200, 201, 202, 203, 204, 205, 206, 300, 301, 302, 303, 304, 305, 307, 308}
    | set(range(400, 418))
    | {421, 422, 426, 429, 451}
    | set(range(500, 506))
)


def storable(
    method: bytes, request_headers: Headers, status: int, response_headers: Headers
) -> NotStorable | None:
    """None when the response may be stored by a shared cache (RFC 9111 §3), else the reason.

    §3: request method understood and cacheable (GET); final status understood; no no-store in
    request or response; no unqualified private; Authorization only with public / s-maxage /
    must-revalidate (§3.5); and one of: explicit lifetime (Expires, max-age, s-maxage), public,
    a validator-free heuristically cacheable status (§4.2.2: 200 203 204 206 300 301 308 404 405
    410 414 501). A validator alone does not make a response storable (§3's list), but a
    response with Last-Modified gets a heuristic lifetime when its status allows one.

    Decisions:

    - must-understand with a status we implement: no-store is ignored (§5.2.2.3 "the cache
      SHOULD ignore the no-store directive"); with any other status: ``MUST_UNDERSTAND``.
    - A request's no-store forbids storing the answer (§5.2.1.5).
    - qualified ``private="f"`` is storable (§5.2.2.7); ``headers_to_store`` drops the fields.
    - ``Vary: *`` is never stored: §4.1 says it always fails to match, so it could never be used.
    - Storing is never required, so on top of §3's "MUST NOT store unless" a response that could
      never be used without a full fetch is not stored (``NO_FRESHNESS_INFO``): no validator
      (ETag or a valid Last-Modified), no stale-while-revalidate / stale-if-error, and either an
      unqualified no-cache or no lifetime at all (explicit lifetime <= 0, e.g. ``max-age=0`` or
      ``Expires: 0``; a heuristic needs Last-Modified, which is a validator).
    """
    if method != b"GET":
        return NotStorable.METHOD
    if status < 200:  # §3: the status must be final (RFC 9110 §15)
        return NotStorable.STATUS
    if status == 206:
        return NotStorable.PARTIAL
    facts = _gather(response_headers, None)
    cc = facts.cc
    understood = status in UNDERSTOOD_STATUSES
    if cc.must_understand and not understood:
        return NotStorable.MUST_UNDERSTAND  # §3, §5.2.2.3
    if not understood or status == 304:
        return NotStorable.STATUS
    if parse_cache_control(request_headers).no_store:
        return NotStorable.REQUEST_NO_STORE
    if cc.no_store and not cc.must_understand:
        return NotStorable.NO_STORE
    if cc.private is not None and not cc.private:
        return NotStorable.PRIVATE
    if not (cc.public or cc.s_maxage is not None or cc.must_revalidate) and any(
        name.lower() == b"authorization" for name, _ in request_headers
    ):
        return NotStorable.AUTHORIZATION  # §3.5
    if facts.vary is None:
        return NotStorable.VARY_STAR
    explicit = cc.s_maxage is not None or cc.max_age is not None or facts.has_expires
    if not (explicit or cc.public or status in HEURISTICALLY_CACHEABLE):
        return NotStorable.NO_FRESHNESS_INFO  # §3, the last condition
    has_validator = bool(facts.etag) or facts.last_modified is not None
    if has_validator or cc.stale_while_revalidate or cc.stale_if_error:
        return None
    if cc.no_cache is not None and not cc.no_cache:
        return NotStorable.NO_FRESHNESS_INFO  # always revalidated, and nothing to revalidate
    if not explicit:
        return NotStorable.NO_FRESHNESS_INFO  # no lifetime: every use would be a full fetch
    lifetime = cc.s_maxage if cc.s_maxage is not None else cc.max_age
    if lifetime is None:  # Expires: measured against Date; unknown without Date (keep it)
        if facts.expires is None:
            lifetime = 0.0
        elif facts.date is not None:
            lifetime = facts.expires - facts.date
    if lifetime is not None and lifetime <= 0:
        return NotStorable.NO_FRESHNESS_INFO
    return None


#: §3.1: never stored: hop-by-hop fields (RFC 9110 §7.6.1) and the fields of the proxy we used
#: (Proxy-Authenticate, Proxy-Authentication-Info, Proxy-Authorization).
NEVER_STORED: Final = HOP_BY_HOP | {b"proxy-authenticate", b"proxy-authentication-info"}
# Connection can name options, but never the framing away (the same guard as http/rules.py).
_UNREMOVABLE: Final = frozenset({b"content-length"})


def _fields_not_stored(headers: Headers) -> frozenset[bytes]:
    connection: set[bytes] = set()
    cc_lines: list[bytes] = []
    for name, value in headers:
        key = name.lower()
        if key == b"connection":
            connection.update(t.lower() for t in _split_list(value))
        elif key == b"cache-control":
            cc_lines.append(value)
    cc = _cc_of_lines(cc_lines)
    named = (cc.private or frozenset()) | (cc.no_cache or frozenset())
    return NEVER_STORED | (connection - _UNREMOVABLE) | named


def headers_to_store(response_headers: Headers, *, received: float | None = None) -> list[Header]:
    """The fields kept in the store: drops the fields named by ``private="..."`` (§5.2.2.7) and
    ``no-cache="..."`` (§5.2.2.4) and anything hop-by-hop that slipped through (§3.1).

    Dropping the no-cache-named fields from the stored copy is how §5.2.2.4's "MUST NOT be sent
    in the response to a subsequent request without successful revalidation" is kept: a later
    304 that carries them puts them back (``freshen_headers``).

    ``received`` (an addition): when given and the response has no Date, a Date with that time
    is added, as RFC 9110 §6.6.1 requires of a recipient with a clock that caches a response.
    """
    drop = _fields_not_stored(response_headers)
    out = [(name, value) for name, value in response_headers if name.lower() not in drop]
    if received is not None and not any(name.lower() == b"date" for name, _ in out):
        out.append((b"date", http_date(received)))
    return out


# --- keys and Vary (§4.1) -------------------------------------------------------------------

_VISIBLE_ASCII: Final = bytes(range(0x21, 0x7F))
_HEX_VALUES: Final = {c: int(chr(c), 16) for c in b"0123456789abcdefABCDEF"}
# RFC 3986 §2.3: unreserved characters; their percent-encodings are equivalent to them.
_UNRESERVED: Final = frozenset(
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~"
)


def _normalise_path(path: bytes) -> bytes:
    """RFC 3986 §6.2.2.1-2: percent-encodings in upper case, unreserved characters decoded; bytes
    outside visible ASCII percent-encoded (the key stays ASCII)."""
    if b"%" not in path and not path.translate(None, _VISIBLE_ASCII):
        return path  # the common case: nothing to do
    out = bytearray()
    i = 0
    n = len(path)
    while i < n:
        c = path[i]
        if c == 0x25 and i + 2 < n and path[i + 1] in _HEX_VALUES and path[i + 2] in _HEX_VALUES:
            octet = _HEX_VALUES[path[i + 1]] * 16 + _HEX_VALUES[path[i + 2]]
            out += bytes((octet,)) if octet in _UNRESERVED else b"%%%02X" % octet
            i += 3
            continue
        out += bytes((c,)) if 0x20 < c < 0x7F else b"%%%02X" % c
        i += 1
    return bytes(out)


def cache_key(scheme: bytes, authority: bytes, path: bytes) -> str:
    """The primary key: the target URI, normalised (lower-case scheme and host, default port
    dropped, empty path as "/"). The method is not in the key: only GET is stored, HEAD and GET
    share the entry.

    Also (RFC 3986 §6.2.2-§6.2.3, RFC 9110 §4.2.3): an empty port is dropped, a port with leading
    zeros is written plainly, a fragment is dropped, ``?q`` becomes ``/?q``, percent-encodings are
    normalised (upper-case hex, unreserved characters decoded), and bytes outside visible ASCII
    are percent-encoded, so the key is always ASCII.
    """
    scheme = scheme.lower()
    authority = authority.strip().lower()
    if authority[:1] == b"[":  # an IPv6 literal
        end = authority.find(b"]") + 1
        rest = authority[end:] if end else b""
        host, port = (authority[:end], rest[1:]) if rest[:1] == b":" else (authority, b"")
    else:
        host, _, port = authority.partition(b":")
    if port.isdigit() and len(port) <= 5:
        number = int(port)
        port = b"" if number == DEFAULT_PORTS.get(scheme) else b"%d" % number
    hostport = host + b":" + port if port else host
    fragment = path.find(b"#")
    if fragment >= 0:
        path = path[:fragment]
    if not path:
        path = b"/"
    elif path[:1] == b"?":
        path = b"/" + path
    path = _normalise_path(path)
    return (scheme + b"://" + _normalise_path(hostport) + path).decode("ascii")


#: Vary: * — never matches a later request (§4.1).
VARY_STAR: Final = b"*"

# Request fields whose values are lists (RFC 9110 §12.5): whitespace around "," and ";" is
# optional there (§5.6.1, §5.6.6), so it is removed before comparing.
_LIST_FIELDS: Final = frozenset(
    {b"accept", b"accept-encoding", b"accept-language", b"accept-charset", b"te"}
)
# Their values are case-insensitive (codings §8.4.1, language tags §8.5.1, charsets §8.3.2).
_CASELESS_FIELDS: Final = frozenset(
    {b"accept-encoding", b"accept-language", b"accept-charset", b"te"}
)


def _normalised_field(name: bytes, lines: list[bytes]) -> bytes:
    """§4.1: a request field's value for comparison: lines combined, optional whitespace
    removed where the field's syntax allows it, case folded where values are case-insensitive.
    Fields with unknown syntax only lose the whitespace around the value and between lines."""
    if len(lines) == 1:
        return _normalised_value(name, lines[0])
    if name in _LIST_FIELDS:  # RFC 9110 §5.3: the lines of a list field join with commas
        return _normalised_value(name, b",".join(lines))
    return b",".join(line.strip() for line in lines)


@lru_cache(maxsize=1024)
def _normalised_value(name: bytes, value: bytes) -> bytes:
    # Memoised: clients send the same few Accept-* values with every request.
    if name not in _LIST_FIELDS:
        return value.strip()
    elements = [
        b";".join(p.strip() for p in element.split(b";")) if b";" in element else element
        for element in _split_list(value)
    ]
    value = b",".join(elements)
    return value.lower() if name in _CASELESS_FIELDS else value


def _variant_of(vary: tuple[bytes, ...], fields: dict[bytes, list[bytes]]) -> bytes:
    """The secondary key: ``name:value`` per Vary-named field, ``name`` alone when the request
    lacks it (§4.1: an absent field only matches an absent field), joined with newlines (which
    neither names nor values can contain)."""
    parts = []
    for name in vary:
        lines = fields.get(name)
        parts.append(name if lines is None else name + b":" + _normalised_field(name, lines))
    return b"\n".join(parts)


def _index(headers: Headers) -> dict[bytes, list[bytes]]:
    """Request fields by lower-case name, in one pass."""
    out: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        key = name.lower()
        lines = out.get(key)
        if lines is None:
            out[key] = [value]
        else:
            lines.append(value)
    return out


def vary_key(response_headers: Headers, request_headers: Headers) -> bytes:
    """The secondary key of a stored response: for each field named by the response's Vary (in
    sorted lower-case name order) the request's value, normalised (§4.1: combined lines, extra
    whitespace removed, case-insensitive values such as Accept-Encoding lower-cased). b"" when
    the response has no Vary; ``VARY_STAR`` when Vary contains "*"."""
    names: set[bytes] = set()
    for name, value in response_headers:
        if name.lower() == b"vary":
            names.update(n.lower() for n in _split_list(value))
    if not names:
        return b""
    if VARY_STAR in names:
        return VARY_STAR
    return _variant_of(tuple(sorted(names)), _index(request_headers))


def _matches(
    stored: Stored,
    facts: _Facts,
    fields: dict[bytes, list[bytes]],
    seen: dict[tuple[bytes, ...], bytes] | None = None,
) -> bool:
    vary = facts.vary
    if vary is None:
        return False
    if not vary:
        return stored.variant == b""
    if seen is None:
        return _variant_of(vary, fields) == stored.variant
    variant = seen.get(vary)
    if variant is None:  # variants of one URI mostly share their Vary: compute it once
        variant = seen[vary] = _variant_of(vary, fields)
    return variant == stored.variant


def variant_matches(stored: Stored, request_headers: Headers) -> bool:
    """§4.1: the stored response's Vary-selected request fields match this request (a stored
    ``Vary: *`` never matches)."""
    return _matches(stored, _facts(stored), _index(request_headers))


# --- age and freshness (§4.2) ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Heuristics:
    fraction: float = 0.1
    #: the cap of a heuristic lifetime; None (config ``heuristic_max: null``) for no cap
    maximum: float | None = 86400.0


def _lifetime(stored: Stored, facts: _Facts, heuristics: Heuristics) -> float:
    cc = facts.cc
    # §4.2.1, in this order for a shared cache.
    if cc.s_maxage is not None:
        return cc.s_maxage
    if cc.max_age is not None:
        return cc.max_age
    date = facts.date if facts.date is not None else stored.response_time  # RFC 9110 §6.6.1
    if facts.has_expires:
        if facts.expires is None:
            return 0.0  # §5.3: an invalid Expires ("0") means already expired
        return max(0.0, facts.expires - date)
    # §4.2.2: heuristics only without explicit expiration, for heuristically cacheable statuses
    # or responses marked public; based on Last-Modified ("no more than some fraction of the
    # interval since that time"), capped by configuration.
    if facts.last_modified is not None and (stored.status in HEURISTICALLY_CACHEABLE or cc.public):
        interval = date - facts.last_modified
        if interval > 0:
            maximum = heuristics.maximum
            lifetime = interval * heuristics.fraction
            return lifetime if maximum is None or lifetime < maximum else maximum
    return 0.0


def freshness_lifetime(stored: Stored, heuristics: Heuristics) -> float:
    """§4.2.1 for a shared cache: s-maxage, else max-age, else Expires - Date (an invalid Expires,
    or one in the past, gives 0), else a heuristic lifetime (§4.2.2: a fraction of Date -
    Last-Modified, capped) when allowed (no explicit expiry, status heuristically cacheable or
    public), else 0."""
    return _lifetime(stored, _facts(stored), heuristics)


def _age(stored: Stored, facts: _Facts, now: float) -> float:
    # §4.2.3, with each term kept >= 0 (a request_time after response_time, or a clock that
    # went backwards, must not make an age negative).
    response_time = stored.response_time
    date_value = facts.date if facts.date is not None else response_time
    apparent_age = max(0.0, response_time - date_value)
    response_delay = max(0.0, response_time - stored.request_time)
    corrected_age_value = facts.age + response_delay
    corrected_initial_age = max(apparent_age, corrected_age_value)
    resident_time = max(0.0, now - response_time)
    return corrected_initial_age + resident_time


def current_age(stored: Stored, now: float) -> float:
    """§4.2.3: apparent_age, corrected_age_value (Age + response_delay), resident time."""
    return _age(stored, _facts(stored), now)


def age_value(age: float) -> bytes:
    """The Age field value: integer seconds, capped at 2**31 (§5.1)."""
    if not age > 0:  # also NaN
        return b"0"
    if age >= DELTA_SECONDS_MAX:
        return b"%d" % DELTA_SECONDS_MAX
    return b"%d" % int(age)


def merge_age_into_headers(headers: Headers, age: float) -> list[Header]:
    """The headers with exactly one Age, ``age_value(age)`` (§5.1): the first Age line is
    replaced in place, any others dropped; appended when there was none."""
    value = age_value(age)
    out: list[Header] = []
    placed = False
    for name, field_value in headers:
        if name.lower() == b"age":
            if not placed:
                out.append((name, value))
                placed = True
            continue
        out.append((name, field_value))
    if not placed:
        out.append((b"Age", value))
    return out


# --- the lookup decision (§4) ---------------------------------------------------------------


class Action(Enum):
    SERVE = "serve"  # use the stored response as it is (fresh, or stale that is allowed)
    REVALIDATE = "revalidate"  # send a conditional request (§4.3.1) and wait for the answer
    SERVE_STALE_REVALIDATE = "serve-stale-revalidate"  # stale-while-revalidate (RFC 5861 §3)
    FETCH = "fetch"  # nothing usable stored: forward (and maybe store the answer)
    GATEWAY_TIMEOUT = "gateway-timeout"  # only-if-cached and nothing usable (§5.2.1.7)


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    #: the chosen stored response (SERVE, REVALIDATE, SERVE_STALE_REVALIDATE); for REVALIDATE
    #: with several variants the one that matched, if any. Also set for FETCH and
    #: GATEWAY_TIMEOUT when a variant matched (a stale one without validators), so that
    #: stale-if-error can still use it. Always one of the ``candidates`` objects (identity).
    stored: Stored | None
    age: float = 0.0
    ttl: float = 0.0  # freshness_lifetime - age (negative when stale), for Cache-Status ttl=
    #: RFC 9211 fwd= reason when going forward: "uri-miss", "vary-miss", "miss", "request"
    #: (the request forced it: no-cache, max-age), "stale", "method"
    fwd: str = ""
    #: the conditional fields to add to the forwarded request for REVALIDATE (§4.3.1): every
    #: stored ETag of the candidates in If-None-Match, Last-Modified in If-Modified-Since
    conditional: tuple[Header, ...] = ()
    #: (addition) the stored responses ``conditional`` was built from: the ones a 304 can
    #: select (pass them to ``select_for_304``).
    validated: tuple[Stored, ...] = ()


@dataclass(frozen=True, slots=True)
class LookupSettings:
    heuristics: Heuristics = Heuristics()


LOOKUP_METHODS: Final = frozenset({b"GET", b"HEAD"})


def _pragma_no_cache(lines: list[bytes] | None) -> bool:
    return bool(lines) and any(
        element.lower() == b"no-cache" for line in lines or () for element in _split_list(line)
    )


def _request_no_cache(cc: CacheControl, fields: dict[bytes, list[bytes]]) -> bool:
    # §5.4: Pragma: no-cache counts as Cache-Control: no-cache only when the request has no
    # Cache-Control that we understand ("present and understood": a Cache-Control made only of
    # extensions we ignore does not cancel the Pragma).
    if cc.no_cache is not None:
        return True
    return cc == _NO_DIRECTIVES and _pragma_no_cache(fields.get(b"pragma"))


def _most_recent(matches: list[tuple[Stored, _Facts]]) -> tuple[Stored, _Facts]:
    # §4.1: of several selected responses "the most recent response (as determined by the Date
    # header field) is used"; receipt time breaks ties and stands in for a missing Date.
    def recency(item: tuple[Stored, _Facts]) -> tuple[float, float]:
        stored, facts = item
        date = facts.date if facts.date is not None else stored.response_time
        return (date, stored.response_time)

    return max(matches, key=recency)


def _conditional(validated: Sequence[Stored], with_last_modified: bool) -> tuple[Header, ...]:
    """§4.3.1: the entity tags of every stored response being validated (MUST), and the
    Last-Modified of the first when ``with_last_modified`` (SHOULD, for a single response)."""
    etags: list[bytes] = []
    for stored in validated:
        etag = _facts(stored).etag
        # An unquoted tag with a comma would corrupt the list; every well-formed one is sent.
        if etag and etag not in etags and (etag[-1:] == b'"' or b"," not in etag):
            etags.append(etag)
    fields: list[Header] = []
    if etags:
        fields.append((b"if-none-match", b", ".join(etags)))
    if with_last_modified and validated:
        raw = _facts(validated[0]).last_modified_raw
        if raw:  # RFC 9110 §13.1.3: the stored Last-Modified value, exactly as received
            fields.append((b"if-modified-since", raw))
    return tuple(fields)


def _forward(
    fwd: str,
    chosen: Stored | None,
    age: float,
    ttl: float,
    validated: tuple[Stored, ...],
    with_last_modified: bool,
    only_if_cached: bool,
) -> Decision:
    if only_if_cached:
        # §5.2.1.7: "respond with either a stored response consistent with the other
        # constraints of the request or a 504"; fwd says why nothing stored could be used.
        return Decision(Action.GATEWAY_TIMEOUT, chosen, age, ttl, fwd)
    conditional = _conditional(validated, with_last_modified)
    if conditional:
        return Decision(Action.REVALIDATE, chosen, age, ttl, fwd, conditional, validated)
    return Decision(Action.FETCH, chosen, age, ttl, fwd)


def _forbids_stale(cc: CacheControl) -> bool:
    # §4.2.4 / §5.2.2.2 / §5.2.2.8 / §5.2.2.10: must-revalidate, proxy-revalidate and (for a
    # shared cache) s-maxage forbid serving the response stale, whatever the client accepts and
    # whatever stale-while-revalidate / stale-if-error say (RFC 9111 is later than RFC 5861 and
    # makes these MUST NOTs).
    return cc.must_revalidate or cc.proxy_revalidate or cc.s_maxage is not None


def decide(
    method: bytes,
    request_headers: Headers,
    candidates: Sequence[Stored],
    now: float,
    settings: LookupSettings,
) -> Decision:
    """Choose what to do with a GET or HEAD request given every stored variant of its URI.

    §4: select the variant (Vary); §4.2 freshness with the request's max-age, min-fresh,
    max-stale (§5.2.1), no-cache and Pragma: no-cache when there is no Cache-Control
    (§5.4); response no-cache (unqualified: always revalidate, §5.2.2.4), must-revalidate and
    proxy-revalidate (never served stale, even with max-stale, §5.2.2.2 / §5.2.2.8), s-maxage
    implies proxy-revalidate (§5.2.2.10); stale-while-revalidate (RFC 5861 §3) when stale within
    the window and nothing forbids it; only-if-cached (§5.2.1.7) gives GATEWAY_TIMEOUT when the
    result would need the network. A request with no-store may still be served (§5.2.1.5).

    Decisions:

    - ``fwd`` follows RFC 9211 §2.2 exactly: "request" only when the selected response was fresh
      and the request's directives refused it; a stale one is "stale" whatever the request said.
      A response with unqualified no-cache is "stale" too (it can never be used unvalidated).
    - Immutable (RFC 8246 §2): a fresh immutable response is served even when the request's
      max-age is exceeded (``max-age=0`` is what a browser's plain reload sends; §2 says
      clients should not revalidate immutable responses during their freshness lifetime, and a
      proxy that did so for them would undo the point). An explicit ``no-cache`` (or Pragma) is
      what a forced reload sends ("unless explicitly overridden by the user", §2) and still
      goes forward, as do min-fresh and the response's own no-cache.
    - Stale serving needs explicit permission and no prohibition (§4.2.4): max-stale (within
      its value) → SERVE; stale-while-revalidate (within its window) → SERVE_STALE_REVALIDATE
      unless the request asked for something fresh (no-cache, max-age — "the client does not
      wish to receive a stale response" §5.2.1.1 —, min-fresh). The background revalidation
      may have no validators (``conditional`` empty): then it is a plain refresh.
    - Incomplete stored responses are never used (§3.3) and are not validated.
    - A conditional request is built from the chosen response and, when the chosen one has an
      ETag, the ETags of every other stored response of the URI (§4.3.1: the origin may pick
      any of them). If-Modified-Since goes only when a single response is being validated
      (§4.3.1 "SHOULD send the Last-Modified value ... if a single stored response is being
      validated"). On a vary-miss only ETags are sent: a date cannot say which variant is meant.
    - REVALIDATE only when there is something to send; otherwise FETCH.
    - Methods other than GET/HEAD: FETCH with fwd "method" (GATEWAY_TIMEOUT with
      only-if-cached, which asks for a stored response or a 504).
    """
    fields = _index(request_headers)
    req = _cc_of_lines(fields.get(b"cache-control"))
    only = req.only_if_cached
    if method not in LOOKUP_METHODS:
        return _forward("method", None, 0.0, 0.0, (), False, only)
    if not candidates:
        return _forward("uri-miss", None, 0.0, 0.0, (), False, only)

    complete: list[tuple[Stored, _Facts]] = [(c, _facts(c)) for c in candidates if c.complete]
    seen: dict[tuple[bytes, ...], bytes] = {}
    matches = [(c, f) for c, f in complete if _matches(c, f, fields, seen)]
    if not matches:
        # §4.1: nothing selected; the stored ETags still let the origin choose one (§4.3.1).
        validated = tuple(c for c, f in complete if f.etag)
        return _forward("vary-miss" if complete else "miss", None, 0.0, 0.0, validated, False, only)

    chosen, facts = matches[0] if len(matches) == 1 else _most_recent(matches)
    cc = facts.cc
    lifetime = _lifetime(chosen, facts, settings.heuristics)
    age = _age(chosen, facts, now)
    ttl = lifetime - age
    fresh = lifetime > age  # §4.2: response_is_fresh = (freshness_lifetime > current_age)

    if facts.etag:
        validated = (chosen, *(c for c, f in complete if f.etag and c is not chosen))
    else:
        validated = (chosen,)
    single = len(validated) == 1

    def forward(fwd: str) -> Decision:
        return _forward(fwd, chosen, age, ttl, validated, single, only)

    if cc.no_cache is not None and not cc.no_cache:
        return forward("stale")  # §5.2.2.4: never used without successful validation
    no_cache = _request_no_cache(req, fields)
    if fresh:
        if no_cache:
            return forward("request")  # §5.2.1.4
        if req.max_age is not None and age > req.max_age and not cc.immutable:
            return forward("request")  # §5.2.1.1 (immutable: RFC 8246 §2, see above)
        if req.min_fresh is not None and ttl < req.min_fresh:
            return forward("request")  # §5.2.1.3
        return Decision(Action.SERVE, chosen, age, ttl)

    staleness = age - lifetime
    if not _forbids_stale(cc) and not no_cache:
        wants_fresh = req.max_age is not None or req.min_fresh is not None
        # §5.2.1.2; max-age still bounds the age when both are given (§5.2.1.1).
        if (
            req.max_stale is not None
            and staleness <= req.max_stale
            and (req.max_age is None or age <= req.max_age)
            and req.min_fresh is None
        ):
            return Decision(Action.SERVE, chosen, age, ttl)
        swr = cc.stale_while_revalidate
        if swr is not None and staleness <= swr and not wants_fresh:
            return Decision(
                Action.SERVE_STALE_REVALIDATE,
                chosen,
                age,
                ttl,
                "stale",
                _conditional(validated, single),
                validated,
            )
    return forward("stale")


def conditional_for(candidates: Sequence[Stored]) -> tuple[Header, ...]:
    """§4.3.1: If-None-Match with every stored ETag, If-Modified-Since with the Last-Modified of
    the chosen candidate (the first) when it has one.

    If-Modified-Since is sent only when a single candidate is given (§4.3.1: "SHOULD send the
    Last-Modified value ... if ... a single stored response is being validated"): with several
    variants a date cannot say which one a 304 is about. ``Decision.conditional`` already holds
    the right fields for a lookup.
    """
    return _conditional(candidates, len(candidates) == 1)


# --- after the origin answered (§4.3.3, §4.3.4, §3.2, §4.4) ---------------------------------


def _opaque(etag: bytes) -> bytes:
    return etag[2:] if etag[:2] == b"W/" else etag


def _is_weak(etag: bytes) -> bool:
    return etag[:2] == b"W/"


def _strong_last_modified(facts: _Facts) -> bool:
    # RFC 9110 §8.8.2.2: a cache may take a stored Last-Modified as strong when the entry has a
    # Date at least one second after it.
    return (
        facts.last_modified is not None
        and facts.date is not None
        and facts.date - facts.last_modified >= 1
    )


def select_for_304(candidates: Sequence[Stored], response_headers: Headers) -> list[int]:
    """§4.3.4: indexes of the stored responses a 304 updates: strong ETag match, else
    Last-Modified match, else the single candidate when the 304 has no validator.

    In detail: a strong ETag selects every candidate with the same strong ETag, and none when
    nothing matches ("MUST NOT use the new response to update any stored responses"); a weak
    ETag selects the most recent weakly matching candidate; without an ETag, a Last-Modified
    selects the candidates with that date (all of them when their Last-Modified is strong,
    RFC 9110 §8.8.2.2, else the most recent). A 304 with no validator selects the only
    candidate: §4.3.4 asks that it also lack validators, but our conditional request carried
    that one response's validators and nothing else, so the 304 can only be about it.
    """
    if not candidates:
        return []
    new = _gather(response_headers, candidates[0].response_time)
    facts = [_facts(c) for c in candidates]

    def most_recent(indexes: list[int]) -> list[int]:
        if len(indexes) <= 1:
            return indexes
        chosen = _most_recent([(candidates[i], facts[i]) for i in indexes])[0]
        return [next(i for i in indexes if candidates[i] is chosen)]

    if new.etag:
        if not _is_weak(new.etag):
            return [i for i, f in enumerate(facts) if f.etag == new.etag]
        opaque = _opaque(new.etag)
        return most_recent([i for i, f in enumerate(facts) if f.etag and _opaque(f.etag) == opaque])
    if new.last_modified is not None:
        same = [i for i, f in enumerate(facts) if f.last_modified == new.last_modified]
        strong = [i for i in same if _strong_last_modified(facts[i])]
        return strong or most_recent(same)
    return [0] if len(candidates) == 1 else []


#: §3.2: besides the §3.1 exclusions, "the Content-Length header field" is never updated;
#: Content-Range is "automatically processed" and MAY be ignored — it would describe a part,
#: and we store only whole responses, so it is ignored.
_NOT_FRESHENED: Final = frozenset({b"content-length", b"content-range"})


def freshen_headers(
    stored_headers: Headers, response_304_headers: Headers, *, received: float | None = None
) -> list[Header]:
    """§3.2: replace stored fields with the 304's fields of the same name, except those a cache
    must not update.

    §3.2: "the cache MUST add each header field in the provided response to the stored
    response, replacing field values that are already present, with the following exceptions:
    header fields excepted from storage in Section 3.1, [fields the stored response depends
    on / automatically processed], and the Content-Length header field." So, from the 304:

    - not taken: hop-by-hop fields and the ones its Connection names, Proxy-Authenticate,
      Proxy-Authentication-Info, Proxy-Authorization (§3.1), Content-Length (§3.2), and
      Content-Range (§3.2 MAY: it is processed per message; our stored body is whole);
    - taken: everything else, Content-Type and Content-Encoding included — §3.2 lets only
      caches that store a *processed* body (decoded, parsed) keep those, and we store the bytes
      as received, so the RFC's default (replace) applies;
    - a name present in the 304 replaces all stored lines of that name (at the first one's
      place); new names are appended;
    - afterwards the resulting Cache-Control's ``private="f"`` / ``no-cache="f"`` names are
      dropped again (§3.1).

    Age and Date describe the message, and after the update the stored response is the one
    just validated: the caller records the 304 exchange's request/response times (see
    ``freshen``), so a stored Age the 304 does not repeat is dropped (its age_value is 0,
    §4.2.3), and so is a stored Date the 304 lacks (RFC 9110 §6.6.1: the recipient supplies its
    receipt time: with ``received`` given a Date of that time is added, else date_value
    defaults to response_time).
    """
    incoming = headers_to_store(response_304_headers)
    updates: dict[bytes, list[Header]] = {}
    for name, value in incoming:
        key = name.lower()
        if key in _NOT_FRESHENED:
            continue
        updates.setdefault(key, []).append((name, value))
    if received is not None and b"date" not in updates:
        updates[b"date"] = [(b"date", http_date(received))]
    out: list[Header] = []
    placed: set[bytes] = set()
    for name, value in stored_headers:
        key = name.lower()
        replacement = updates.get(key)
        if replacement is not None:
            if key not in placed:
                out.extend(replacement)
                placed.add(key)
            continue
        if key == b"age" or key == b"date":
            continue  # the 304 lacks it: see the docstring
        out.append((name, value))
    for key, lines in updates.items():
        if key not in placed:
            out.extend(lines)
    drop = _fields_not_stored(out)
    return [(name, value) for name, value in out if name.lower() not in drop]


def freshen(
    stored: Stored, response_304_headers: Headers, request_time: float, response_time: float
) -> Stored:
    """(Addition) The stored response updated by a 304 (§3.2, §4.3.4): freshened fields and the
    validation exchange's times (the age now counts from the 304, §4.2.3)."""
    headers = freshen_headers(stored.headers, response_304_headers, received=response_time)
    return replace(
        stored, headers=tuple(headers), request_time=request_time, response_time=response_time
    )


def stale_if_error_allows(
    stored: Stored, request_headers: Headers, now: float, settings: LookupSettings
) -> bool:
    """RFC 5861 §4 / RFC 9111 §4.2.4: an error (no answer, or 500/502/503/504) may be answered with
    this stale response while within the stale-if-error window of the response or request, and
    never when must-revalidate / proxy-revalidate / s-maxage / no-cache forbid serving stale.

    Decisions: a response that is still fresh may always cover an error (nothing forbids
    serving a fresh response; the request went forward only because of the client's max-age
    or min-fresh, which stale-if-error overrides: "regardless of other freshness information",
    RFC 5861 §4) — except after a request no-cache / Pragma (a forced reload) that did not
    itself grant stale-if-error, and never for an unqualified no-cache response (§5.2.2.4: not
    used without successful validation). The allowance is the largest of the response's and
    the request's stale-if-error and the request's max-stale. Incomplete responses never.
    """
    if not stored.complete:
        return False
    facts = _facts(stored)
    cc = facts.cc
    if cc.no_cache is not None and not cc.no_cache:
        return False
    fields = _index(request_headers)
    req = _cc_of_lines(fields.get(b"cache-control"))
    if req.stale_if_error is None and _request_no_cache(req, fields):
        return False
    staleness = _age(stored, facts, now) - _lifetime(stored, facts, settings.heuristics)
    if staleness < 0:
        return True
    if _forbids_stale(cc):
        return False
    allowances = [
        a for a in (cc.stale_if_error, req.stale_if_error, req.max_stale) if a is not None
    ]
    return bool(allowances) and staleness <= max(allowances)


_STALE_IF_ERROR_STATUSES: Final = frozenset({500, 502, 503, 504})


def is_error_status_for_stale(status: int) -> bool:
    """The statuses stale-if-error covers: 500, 502, 503, 504 (RFC 5861 §4)."""
    return status in _STALE_IF_ERROR_STATUSES


#: RFC 9110 §9.2.1: the safe methods (method names are case-sensitive, §9.1).
SAFE_METHODS: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})


def invalidates(method: bytes, status: int) -> bool:
    """§4.4: an unsafe method (anything but GET, HEAD, OPTIONS, TRACE) with a non-error response
    (2xx or 3xx) invalidates."""
    return method not in SAFE_METHODS and 200 <= status < 400


def invalidation_keys(
    request_key: str, scheme: bytes, authority: bytes, response_headers: Headers
) -> list[str]:
    """§4.4: the target URI, plus Location and Content-Location when they are same-origin (relative
    references resolved against the target URI), each as ``cache_key`` gives it.

    §4.4: "a cache MUST NOT trigger an invalidation ... if the origin of the URI to be
    invalidated differs from that of the target URI" — origins are compared on the normalised
    keys (scheme, host, port); a reference that cannot be parsed is skipped.
    """
    keys = [request_key]
    origin = cache_key(scheme, authority, b"/")  # "scheme://host[:port]/"
    for name, value in response_headers:
        if name.lower() not in (b"location", b"content-location"):
            continue
        try:
            resolved = urlsplit(urljoin(request_key, value.strip().decode("latin-1")))
            path = resolved.path + ("?" + resolved.query if resolved.query else "")
            key = cache_key(
                resolved.scheme.encode("latin-1"),
                resolved.netloc.encode("latin-1"),
                path.encode("latin-1"),
            )
        except (ValueError, UnicodeError):
            continue
        if key.startswith(origin) and key not in keys:
            keys.append(key)
    return keys


# --- answering the client's own conditionals and ranges (§4.3.2, RFC 9110 §13, §14) ---------


def client_not_modified(request_headers: Headers, stored: Stored) -> bool:
    """RFC 9110 §13.2.2 order: If-None-Match (weak comparison, "*" matches) decides when present;
    otherwise If-Modified-Since against Last-Modified (GET/HEAD only). True: answer 304.

    Also: preconditions apply only to a 2xx stored response (RFC 9110 §13.2.1: a server ignores
    them when the unconditional answer would not be 2xx); If-Modified-Since is ignored unless it
    is one valid HTTP-date (§13.1.3); without a stored Last-Modified the stored Date (or the
    receipt time) stands in (RFC 9111 §4.3.2).
    """
    if not 200 <= stored.status < 300:
        return False
    fields = _index(request_headers)
    inm = fields.get(b"if-none-match")
    facts = _facts(stored)
    if inm is not None:
        tags = [tag for line in inm for tag in _split_list(line, escapes=False)]
        if b"*" in tags:
            return True  # a current representation exists (§13.1.2)
        if not facts.etag:
            return False
        opaque = _opaque(facts.etag)  # weak comparison (§8.8.3.2)
        return any(_opaque(tag) == opaque for tag in tags)
    ims = fields.get(b"if-modified-since")
    if ims is None or len(ims) != 1:
        return False
    since = parse_http_date(ims[0], stored.response_time)
    if since is None:
        return False
    modified = facts.last_modified
    if modified is None:
        modified = facts.date if facts.date is not None else stored.response_time
    return modified <= since


#: RFC 9110 §15.4.5: the fields a 304 carries (those a 200 would have); Last-Modified only when
#: there is no ETag ("might be useful if the response does not have an ETag field").
_NOT_MODIFIED_FIELDS: Final = frozenset(
    {b"cache-control", b"content-location", b"date", b"etag", b"expires", b"vary"}
)


def not_modified_headers(stored_headers: Headers) -> list[Header]:
    """RFC 9110 §15.4.5: the fields a 304 from cache carries (Cache-Control, Content-Location,
    Date, ETag, Expires, Vary, Last-Modified...).

    Last-Modified only when there is no ETag (§15.4.5: other representation metadata SHOULD NOT
    be sent unless it guides cache updates). Age is the caller's (``merge_age_into_headers``).
    """
    has_etag = any(name.lower() == b"etag" for name, _ in stored_headers)
    return [
        (name, value)
        for name, value in stored_headers
        if (key := name.lower()) in _NOT_MODIFIED_FIELDS
        or (key == b"last-modified" and not has_etag)
    ]


@dataclass(frozen=True, slots=True)
class ByteRange:
    first: int
    last: int  # inclusive


#: Range present but not satisfiable (416 with Content-Range: bytes */size).
UNSATISFIABLE: Final = ByteRange(-1, -1)

_HUGE: Final = 1 << 62


def _position(digits: bytes) -> int | None:
    if not digits.isdigit():
        return None
    return int(digits) if len(digits) <= 18 else _HUGE


def _if_range_holds(value: bytes, stored: Stored, facts: _Facts) -> bool:
    """RFC 9110 §13.1.5: an entity tag matches by strong comparison; a date only when it is
    exactly the stored Last-Modified and that is strong (§8.8.2.2)."""
    value = value.strip()
    if value[:1] == b'"':
        return bool(facts.etag) and not _is_weak(facts.etag) and facts.etag == value
    if value[:2] == b"W/":
        return False
    date = parse_http_date(value, stored.response_time)
    return date is not None and date == facts.last_modified and _strong_last_modified(facts)


def maybe_single_range(
    request_headers: Headers, stored: Stored, *, method: bytes = b"GET"
) -> ByteRange | None:
    """RFC 9110 §14.2: a single ``bytes=`` range on a complete stored 200 → the range to serve as
    206 (``UNSATISFIABLE`` → 416); None → serve the whole response (no Range, several ranges,
    another unit, an If-Range that does not match the stored validator).

    Also None (serve the whole, which §14.2 always allows): a method other than GET (§14.2:
    range handling is defined only for GET — pass ``method`` for HEAD), an invalid range-spec
    (``5-1``, junk: "MAY ignore"), several Range lines, and an empty representation (a 206 of
    zero bytes cannot be written). ``bytes=-0`` is unsatisfiable (§14.1.1).
    """
    if method != b"GET" or stored.status != 200 or not stored.complete:
        return None
    fields = _index(request_headers)
    ranges = fields.get(b"range")
    if ranges is None or len(ranges) != 1:
        return None
    unit, eq, spec_list = ranges[0].strip().partition(b"=")
    if not eq or unit.strip().lower() != b"bytes":  # §14.1: range units are case-insensitive
        return None
    specs = _split_list(spec_list)
    if len(specs) != 1:
        return None
    if_range = fields.get(b"if-range")
    if if_range is not None and (
        len(if_range) != 1 or not _if_range_holds(if_range[0], stored, _facts(stored))
    ):
        return None
    size = stored.body_size
    if size <= 0:
        return None
    first_b, dash, last_b = specs[0].partition(b"-")
    if not dash:
        return None
    if not first_b:  # suffix-range: the last N bytes
        suffix = _position(last_b)
        if suffix is None:
            return None
        if suffix == 0:
            return UNSATISFIABLE
        return ByteRange(max(0, size - suffix), size - 1)
    first = _position(first_b)
    if first is None:
        return None
    if last_b:
        last = _position(last_b)
        if last is None or last < first:
            return None  # §14.1.1: invalid
    else:
        last = size - 1
    if first >= size:
        return UNSATISFIABLE
    return ByteRange(first, min(last, size - 1))


# --- Cache-Status (RFC 9211) ----------------------------------------------------------------

# RFC 8941 §3.3.4: sf-token = ( ALPHA / "*" ) *( tchar / ":" / "/" )
_ALPHA: Final = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_TOKEN_REST: Final = _ALPHA | frozenset(b"0123456789!#$%&'*+-.^_`|~:/")
_SF_INTEGER_MAX: Final = 999_999_999_999_999  # RFC 8941 §3.3.1


def _is_sf_token(text: str) -> bool:
    if not text or not text.isascii():
        return False
    data = text.encode("ascii")
    return (data[0] in _ALPHA or data[0] == 0x2A) and _TOKEN_REST.issuperset(data)


def _sf_string(text: str) -> str:
    """RFC 8941 §3.3.3: printable ASCII in quotes, with \\ and " escaped; anything else (which an
    sf-string cannot hold) becomes "?"."""
    out = ['"']
    for ch in text:
        if ch == '"' or ch == "\\":
            out.append("\\" + ch)
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            out.append("?")
    out.append('"')
    return "".join(out)


def _token_or_string(text: str) -> str:
    return text if _is_sf_token(text) else _sf_string(text)


def _sf_integer(value: float) -> int:
    # clamp first: math.floor(inf) raises
    if value >= _SF_INTEGER_MAX:
        return _SF_INTEGER_MAX
    if value <= -_SF_INTEGER_MAX:
        return -_SF_INTEGER_MAX
    return math.floor(value)


def cache_status(
    cache_name: str,
    *,
    hit: bool = False,
    fwd: str = "",
    fwd_status: int = 0,
    ttl: float | None = None,
    stored: bool = False,
    collapsed: bool = False,
    detail: str = "",
) -> bytes:
    """One Cache-Status member (RFC 9211 §2): ``name; hit; ttl=12`` or
    ``name; fwd=miss; fwd-status=200; stored``. ttl is an integer (may be negative when stale).

    The name is an sf-token when it can be, else an sf-string (§2: "a String or Token"). Params
    follow in RFC 9211 order, separated by "; " as in its examples (RFC 8941 allows spaces after
    ";"). ``hit`` and ``fwd`` exclude each other (§2.1: hit means it did not go forward): with
    ``hit`` a ``fwd`` is left out; fwd-status only accompanies fwd (§2.3); fwd must be a token
    and is left out otherwise. ttl is floored to whole seconds (so a response stale by a
    fraction of a second shows a negative ttl) and kept within sf-integer range; a NaN ttl is
    left out. detail is a token or a string (§2.8).
    """
    parts = [_token_or_string(cache_name)]
    if hit:
        parts.append("hit")
    elif fwd and _is_sf_token(fwd):
        parts.append("fwd=" + fwd)
        if 0 < fwd_status <= _SF_INTEGER_MAX:
            parts.append(f"fwd-status={fwd_status}")
    if ttl is not None and not math.isnan(ttl):
        parts.append(f"ttl={_sf_integer(ttl)}")
    if stored:
        parts.append("stored")
    if collapsed:
        parts.append("collapsed")
    if detail:
        parts.append("detail=" + _token_or_string(detail))
    return "; ".join(parts).encode("ascii")

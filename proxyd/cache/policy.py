"""RFC 9111 decisions for a shared cache (pure: no I/O, no clock; ``now`` is an argument).

API CONTRACT (skeleton written first; the transaction in cache/transaction.py is built against
these names and shapes — keep them, add whatever else you need).

Times are wall-clock seconds since the epoch (floats). Header lists are sequences of
``(name, value)`` byte pairs in any letter case, in received order; functions must treat names
case-insensitively and must cope with a field repeated on several lines (RFC 9110 §5.3: lines of
a list field combine with commas).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Final

Header = tuple[bytes, bytes]
Headers = Sequence[Header]

#: max-stale given without a value: any staleness is acceptable (RFC 9111 §5.2.1.2).
UNLIMITED: Final = float("inf")


# --- Cache-Control parsing (RFC 9111 §5.2) --------------------------------------------------


@dataclass(frozen=True, slots=True)
class CacheControl:
    """Cache-Control directives of one message, parsed.

    Directive names are case-insensitive (§5.2); unknown directives and extensions are ignored
    (§5.2.3). Delta-seconds (§1.2.2) that are invalid (``max-age=abc``, negative) make the
    directive's value invalid: for max-age / s-maxage an invalid value means the response is
    treated as stale (lifetime 0, §4.2.1 "a cache ... SHOULD consider it stale"); a quoted value
    (``max-age="5"``) is accepted by recipients per §5.2 ("recipients SHOULD accept the quoted
    form") — decide and document; duplicates of a directive with different values: §4.2.1 says
    treat the response as stale when directives conflict — decide and document per directive.
    A delta-seconds larger than 2**31 is capped at 2**31 (§1.2.2).
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


def parse_cache_control(headers: Headers) -> CacheControl:
    """All Cache-Control lines of ``headers`` parsed together (§5.2)."""
    raise NotImplementedError


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


def storable(
    method: bytes, request_headers: Headers, status: int, response_headers: Headers
) -> NotStorable | None:
    """None when the response may be stored by a shared cache (RFC 9111 §3), else the reason.

    §3: request method understood and cacheable (GET); final status understood; no no-store in
    request or response; no unqualified private; Authorization only with public / s-maxage /
    must-revalidate (§3.5); and one of: explicit lifetime (Expires, max-age, s-maxage), public,
    a validator-free heuristically cacheable status (§4.2.2: 200 203 204 206 300 301 308 404 405
    410 414 501) — note a validator alone does not make it storable per §3 list, but a response
    with Last-Modified is heuristically cacheable when its status is.
    """
    raise NotImplementedError


def headers_to_store(response_headers: Headers) -> list[Header]:
    """The fields kept in the store: drops the fields named by ``private="..."`` (§5.2.2.7) and
    ``no-cache="..."`` (§5.2.2.4) and anything hop-by-hop that slipped through (§3.1)."""
    raise NotImplementedError


# --- keys and Vary (§4.1) -------------------------------------------------------------------


def cache_key(scheme: bytes, authority: bytes, path: bytes) -> str:
    """The primary key: the target URI, normalised (lower-case scheme and host, default port
    dropped, empty path as "/"). The method is not in the key: only GET is stored, HEAD and GET
    share the entry."""
    raise NotImplementedError


#: Vary: * — never matches a later request (§4.1).
VARY_STAR: Final = b"*"


def vary_key(response_headers: Headers, request_headers: Headers) -> bytes:
    """The secondary key of a stored response: for each field named by the response's Vary (in
    sorted lower-case name order) the request's value, normalised (§4.1: combined lines, extra
    whitespace removed, case-insensitive values such as Accept-Encoding lower-cased). b"" when
    the response has no Vary; ``VARY_STAR`` when Vary contains "*"."""
    raise NotImplementedError


def variant_matches(stored: Stored, request_headers: Headers) -> bool:
    """§4.1: the stored response's Vary-selected request fields match this request (a stored
    ``Vary: *`` never matches)."""
    raise NotImplementedError


# --- age and freshness (§4.2) ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Heuristics:
    fraction: float = 0.1
    maximum: float = 86400.0


def freshness_lifetime(stored: Stored, heuristics: Heuristics) -> float:
    """§4.2.1 for a shared cache: s-maxage, else max-age, else Expires - Date (an invalid Expires,
    or one in the past, gives 0), else a heuristic lifetime (§4.2.2: a fraction of Date -
    Last-Modified, capped) when allowed (no explicit expiry, status heuristically cacheable or
    public), else 0."""
    raise NotImplementedError


def current_age(stored: Stored, now: float) -> float:
    """§4.2.3: apparent_age, corrected_age_value (Age + response_delay), resident time."""
    raise NotImplementedError


def age_value(age: float) -> bytes:
    """The Age field value: integer seconds, capped at 2**31 (§5.1)."""
    raise NotImplementedError


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
    #: with several variants the one that matched, if any
    stored: Stored | None
    age: float = 0.0
    ttl: float = 0.0  # freshness_lifetime - age (negative when stale), for Cache-Status ttl=
    #: RFC 9211 fwd= reason when going forward: "uri-miss", "vary-miss", "miss", "request"
    #: (the request forced it: no-cache, max-age), "stale", "method"
    fwd: str = ""
    #: the conditional fields to add to the forwarded request for REVALIDATE (§4.3.1): every
    #: stored ETag of the candidates in If-None-Match, Last-Modified in If-Modified-Since
    conditional: tuple[Header, ...] = ()


@dataclass(frozen=True, slots=True)
class LookupSettings:
    heuristics: Heuristics = Heuristics()


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
    """
    raise NotImplementedError


def conditional_for(candidates: Sequence[Stored]) -> tuple[Header, ...]:
    """§4.3.1: If-None-Match with every stored ETag, If-Modified-Since with the Last-Modified of
    the chosen candidate (the first) when it has one."""
    raise NotImplementedError


# --- after the origin answered (§4.3.3, §4.3.4, §3.2, §4.4) ---------------------------------


def select_for_304(candidates: Sequence[Stored], response_headers: Headers) -> list[int]:
    """§4.3.4: indexes of the stored responses a 304 updates: strong ETag match, else
    Last-Modified match, else the single candidate when the 304 has no validator."""
    raise NotImplementedError


def freshen_headers(stored_headers: Headers, response_304_headers: Headers) -> list[Header]:
    """§3.2: replace stored fields with the 304's fields of the same name, except those a cache
    must not update (Content-Length and other framing/content fields of the stored body:
    Content-Length, Content-Encoding, Content-Range, Transfer-Encoding, Content-Type? — §3.2
    lists exceptions; follow the RFC text exactly and cite it)."""
    raise NotImplementedError


def stale_if_error_allows(
    stored: Stored, request_headers: Headers, now: float, settings: LookupSettings
) -> bool:
    """RFC 5861 §4 / RFC 9111 §4.2.4: an error (no answer, or 500/502/503/504) may be answered with
    this stale response while within the stale-if-error window of the response or request, and
    never when must-revalidate / proxy-revalidate / s-maxage / no-cache forbid serving stale."""
    raise NotImplementedError


def is_error_status_for_stale(status: int) -> bool:
    """The statuses stale-if-error covers: 500, 502, 503, 504 (RFC 5861 §4)."""
    raise NotImplementedError


def invalidates(method: bytes, status: int) -> bool:
    """§4.4: an unsafe method (anything but GET, HEAD, OPTIONS, TRACE) with a non-error response
    (2xx or 3xx) invalidates."""
    raise NotImplementedError


def invalidation_keys(
    request_key: str, scheme: bytes, authority: bytes, response_headers: Headers
) -> list[str]:
    """§4.4: the target URI, plus Location and Content-Location when they are same-origin (relative
    references resolved against the target URI), each as ``cache_key`` gives it."""
    raise NotImplementedError


# --- answering the client's own conditionals and ranges (§4.3.2, RFC 9110 §13, §14) ---------


def client_not_modified(request_headers: Headers, stored: Stored) -> bool:
    """RFC 9110 §13.2.2 order: If-None-Match (weak comparison, "*" matches) decides when present;
    otherwise If-Modified-Since against Last-Modified (GET/HEAD only). True: answer 304."""
    raise NotImplementedError


def not_modified_headers(stored_headers: Headers) -> list[Header]:
    """RFC 9110 §15.4.5: the fields a 304 from cache carries (Cache-Control, Content-Location,
    Date, ETag, Expires, Vary, Last-Modified...)."""
    raise NotImplementedError


@dataclass(frozen=True, slots=True)
class ByteRange:
    first: int
    last: int  # inclusive


#: Range present but not satisfiable (416 with Content-Range: bytes */size).
UNSATISFIABLE: Final = ByteRange(-1, -1)


def maybe_single_range(request_headers: Headers, stored: Stored) -> ByteRange | None:
    """RFC 9110 §14.2: a single ``bytes=`` range on a complete stored 200 → the range to serve as
    206 (``UNSATISFIABLE`` → 416); None → serve the whole response (no Range, several ranges,
    another unit, an If-Range that does not match the stored validator)."""
    raise NotImplementedError


# --- Cache-Status (RFC 9211) ----------------------------------------------------------------


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
    ``name; fwd=miss; fwd-status=200; stored``. ttl is an integer (may be negative when stale)."""
    raise NotImplementedError

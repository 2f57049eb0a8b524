"""RFC 9111 rule by rule, through the real daemon with a real origin, counting origin requests.

How these tests work: each test starts an in-process proxyd with the cache on a fresh directory
(``cache_proxy``), scripts an origin resource with a sequence of replies (``script``: the n-th
request to the path gets the n-th reply, the last one repeats), talks to the proxy with httpx and
then asserts three things: what the client got, what ``Cache-Status`` (RFC 9211) says the cache
did, and how many requests reached the origin (``seen``) with which conditional fields.

Time: nothing sleeps to make a response stale. A reply says how old it already is, either with a
``Date`` in the past (apparent age, RFC 9111 §4.2.3) or with an ``Age`` field, so a response with
``max-age=1`` and a Date ten seconds ago is stale on arrival. Lifetimes that must stay fresh during
a test are at least a minute. Date has one-second resolution, so age and ttl assertions allow a
second or two of slack.

Ordering: the proxy commits a stored response (and counts some metrics) just after its client has
the last byte, so a request on *another* connection can race that commit. Tests that need it done
use one keep-alive connection (the proxy reads a connection's next request only once the previous
exchange is over) or ``settle``. The one test that uses two connections on purpose checks that
§4.4 invalidation is not subject to that race.

Expected behaviour is the RFC's for a *shared* cache; each test's docstring cites the section.
The helpers at the top are also used by ``test_collapsed.py`` and ``test_cache_processes.py``.
"""

from __future__ import annotations

import email.utils
import gzip
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RunningProxy, StartProxy, eventually
from tests.origin import Exchange, Handler, Origin, SeenRequest

# --- helpers shared by the cache tests ----------------------------------------------------------

#: A body long enough for range tests, with every byte value so offsets are visible.
BODY_1000 = bytes(range(256)) * 3 + bytes(range(232))


def cache_settings(directory: Path, **more: Any) -> dict[str, Any]:
    """Config overrides that turn the cache on in ``directory``."""
    return {"cache.enabled": True, "cache.dir": str(directory), **more}


def http_date(when: float) -> str:
    """An IMF-fixdate (RFC 9110 §5.6.7)."""
    return email.utils.formatdate(when, usegmt=True)


@dataclass(frozen=True, slots=True)
class Reply:
    """One scripted origin answer."""

    status: int = 200
    body: bytes = b"stored body"
    headers: Sequence[tuple[str, str]] = ()
    #: Date is this many seconds in the past (None: no Date field at all).
    date_ago: float | None = 0.0


def script(origin: Origin, path: str, *replies: Reply) -> None:
    """Route ``path``: the n-th request gets ``replies[n]``, the last reply repeats."""
    count = 0

    async def handler(exchange: Exchange) -> None:
        nonlocal count
        reply = replies[min(count, len(replies) - 1)]
        count += 1
        await exchange.read_body()
        await answer(exchange, reply)

    origin.route(path, handler)


async def answer(exchange: Exchange, reply: Reply) -> None:
    """Send ``reply`` with a correct Content-Length (none for 304, the GET's length for HEAD)."""
    headers = [(name.encode(), value.encode()) for name, value in reply.headers]
    if reply.date_ago is not None:
        headers.append((b"Date", http_date(time.time() - reply.date_ago).encode()))
    bodyless = reply.status in (204, 304) or reply.status < 200
    if not bodyless and not any(name.lower() == b"content-length" for name, _ in headers):
        headers.append((b"Content-Length", str(len(reply.body)).encode()))
    send_body = not bodyless and exchange.request.method != b"HEAD"
    body = reply.body if send_body else b""
    await exchange.respond(reply.status, body, headers, content_length=False)


def seen(origin: Origin, path: str) -> list[SeenRequest]:
    """The requests for ``path`` (query ignored) that reached the origin."""
    wanted = path.encode()
    return [r for r in origin.requests if r.target.split(b"?", 1)[0] == wanted]


def field(request: SeenRequest, name: str) -> str | None:
    """A request field as the origin received it (lines combined with ", ")."""
    values = [v.decode() for k, v in request.headers if k.decode().lower() == name.lower()]
    return ", ".join(values) if values else None


_MEMBER = re.compile(r'(?:[^,"]|"(?:[^"\\]|\\.)*")+')
_PARAM = re.compile(r'(?:[^;"]|"(?:[^"\\]|\\.)*")+')


def cache_status(response: httpx.Response) -> dict[str, str | bool]:
    """Our Cache-Status member (the last one, RFC 9211 §2) as {"name": ..., param: value|True}."""
    value = response.headers.get("cache-status")
    assert value is not None, f"no Cache-Status on {response.status_code} {response.url}"
    members = [m.strip() for m in _MEMBER.findall(value) if m.strip()]
    parts = [p.strip() for p in _PARAM.findall(members[-1])]
    parsed: dict[str, str | bool] = {"name": parts[0]}
    for part in parts[1:]:
        key, eq, val = part.partition("=")
        parsed[key.strip()] = val.strip().strip('"') if eq else True
    return parsed


def is_hit(response: httpx.Response) -> bool:
    return cache_status(response).get("hit") is True


def ttl(response: httpx.Response) -> int:
    value = cache_status(response).get("ttl")
    assert isinstance(value, str), f"no ttl in {response.headers.get('cache-status')}"
    return int(value)


class Samples:
    """One scrape of /metrics: ``samples.value("name_total", result="hit")``."""

    def __init__(self, text: str) -> None:
        self.values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def value(self, name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        assert key in self.values, f"metric {name}{labels} is not exposed"
        return self.values[key]


async def scrape(admin_url: str) -> Samples:
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        response = await client.get(admin_url + "/metrics")
    assert response.status_code == 200
    return Samples(response.text)


async def settle(http: httpx.AsyncClient, origin: Origin) -> None:
    """Wait until every exchange this client made has finished inside the proxy (metrics counted,
    entries committed): the proxy reads a connection's next request only after the previous
    exchange is over, and a PURGE of an unknown URL touches no lookup counter."""
    await http.request("PURGE", origin.url("/settle-barrier"))


class StoppableOrigin:
    """An origin whose listener (and open connections) can be shut: the origin is down."""

    def __init__(self) -> None:
        self.origin = Origin()
        self.scope = trio.CancelScope()

    async def run(self, task_status: trio.TaskStatus[Origin] = trio.TASK_STATUS_IGNORED) -> None:
        with self.scope:
            await self.origin.serve(task_status=task_status)

    def stop(self) -> None:
        self.scope.cancel()


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
async def cache_proxy(start_proxy: StartProxy, tmp_path: Path) -> RunningProxy:
    return await start_proxy(**cache_settings(tmp_path / "cache"))


@pytest.fixture
async def http(cache_proxy: RunningProxy) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(proxy=cache_proxy.url, trust_env=False, timeout=10) as client:
        yield client


@pytest.fixture
async def stoppable(nursery: trio.Nursery) -> StoppableOrigin:
    handle = StoppableOrigin()
    await nursery.start(handle.run)
    return handle


FRESH = ("Cache-Control", "max-age=600")


async def twice(
    http: httpx.AsyncClient, url: str, **kwargs: Any
) -> tuple[httpx.Response, httpx.Response]:
    first = await http.get(url, **kwargs)
    second = await http.get(url, **kwargs)
    return first, second


# --- §3 storing responses -----------------------------------------------------------------------


async def test_fresh_response_is_stored_and_reused(http: httpx.AsyncClient, origin: Origin) -> None:
    """§3, §4: a storable fresh response is reused without contacting the origin."""
    script(origin, "/r", Reply(headers=[FRESH]))
    first, second = await twice(http, origin.url("/r"))
    assert first.status_code == second.status_code == 200
    assert second.content == first.content == b"stored body"
    assert is_hit(second)
    assert len(seen(origin, "/r")) == 1


async def test_response_no_store_is_not_stored(http: httpx.AsyncClient, origin: Origin) -> None:
    """§3, §5.2.2.5: no-store in the response: the cache MUST NOT store any part of it."""
    script(origin, "/r", Reply(headers=[("Cache-Control", "no-store, max-age=600")]))
    first, second = await twice(http, origin.url("/r"))
    assert first.status_code == second.status_code == 200
    assert not is_hit(second)
    assert len(seen(origin, "/r")) == 2


async def test_request_no_store_keeps_the_response_out(
    http: httpx.AsyncClient, origin: Origin
) -> None:
    """§3, §5.2.1.5: no-store in the request: the response to it MUST NOT be stored."""
    script(origin, "/r", Reply(headers=[FRESH]))
    await http.get(origin.url("/r"), headers={"Cache-Control": "no-store"})
    second = await http.get(origin.url("/r"))
    assert second.status_code == 200
    assert not is_hit(second)
    assert len(seen(origin, "/r")) == 2


async def test_private_response_is_not_stored(http: httpx.AsyncClient, origin: Origin) -> None:
    """§3, §5.2.2.7: unqualified private: a shared cache MUST NOT store the response."""
    script(origin, "/r", Reply(headers=[("Cache-Control", "private, max-age=600")]))
    _, second = await twice(http, origin.url("/r"))
    assert not is_hit(second)
    assert len(seen(origin, "/r")) == 2


async def test_private_with_field_names_stores_the_rest(
    http: httpx.AsyncClient, origin: Origin
) -> None:
    """§5.2.2.7: private="X-Secret": the named fields MUST NOT be stored; the rest may be."""
    headers = [("Cache-Control", 'private="X-Secret", max-age=600'), ("X-Secret", "s3cret")]
    script(origin, "/r", Reply(headers=headers))
    first, second = await twice(http, origin.url("/r"))
    assert first.headers["x-secret"] == "s3cret"  # relayed to the client that asked
    assert is_hit(second)
    assert "x-secret" not in second.headers
    assert second.content == b"stored body"
    assert len(seen(origin, "/r")) == 1


async def test_authorization_request_is_not_stored_without_permission(
    http: httpx.AsyncClient, origin: Origin
) -> None:
    """§3.5: a response to a request with Authorization is not stored by a shared cache unless a
    directive allows it (max-age alone does not)."""
    script(origin, "/r", Reply(headers=[FRESH]))
    auth = {"Authorization": "Bearer token"}
    _, second = await twice(http, origin.url("/r"), headers=auth)
    assert not is_hit(second)
    assert len(seen(origin, "/r")) == 2


@pytest.mark.parametrize(
    "directives", ["public, max-age=600", "s-maxage=600", "must-revalidate, max-age=600"]
)
async def test_authorization_with_explicit_permission_is_stored(
    http: httpx.AsyncClient, origin: Origin, directives: str
) -> None:
    """§3.5: public, s-maxage or must-revalidate allow a shared cache to store a response to a
    request with Authorization (and to reuse it for such requests)."""
    script(origin, "/r", Reply(headers=[("Cache-Control", directives)]))
    auth = {"Authorization": "Bearer token"}
    _, second = await twice(http, origin.url("/r"), headers=auth)
    assert is_hit(second)
    assert len(seen(origin, "/r")) == 1


async def test_status_not_heuristically_cacheable_is_not_reused_without_a_lifetime(
    http: httpx.AsyncClient, origin: Origin
) -> None:
    """§3, §4.2.2: a 302 is not heuristically cacheable: with only Last-Modified (no explicit
    lifetime) it has no freshness and is not reused."""
    lm = http_date(time.time() - 100_000)
    script(origin, "/r", Reply(302, b"", [("Location", "/x"), ("Last-Modified", lm)]))
    _, second = await twice(http, origin.url("/r"))
    assert second.status_code == 302
    assert not is_hit(second)
    assert len(seen(origin, "/r")) == 2


async def test_status_not_heuristically_cacheable_with_explicit_lifetime_is_stored(
    http: httpx.AsyncClient, origin: Origin
) -> None:
    """§3: any final status may be stored with an explicit lifetime (a 302 with max-age)."""
    script(origin, "/r", Reply(302, b"", [("Location", "/x"), FRESH]))
    _, second = await twice(http, origin.url("/r"))
    assert second.status_code == 302
    assert second.headers["location"] == "/x"
    assert is_hit(second)
    assert len(seen(origin, "/r")) == 1


async def test_heuristically_cacheable_error_status_is_stored(
    http: httpx.AsyncClient, origin: Origin
) -> None:
    """§3, §4.2.2: 404 is heuristically cacheable; with max-age it is stored and reused."""
    script(origin, "/r", Reply(404, b"gone fishing", [FRESH]))
    _, second = await twice(http, origin.url("/r"))
    assert second.status_code == 404
    assert second.content == b"gone fishing"
    assert is_hit(second)
    assert len(seen(origin, "/r")) == 1


async def test_response_without_freshness_or_validator_is_not_reused(
    http: httpx.AsyncClient, origin: Origin
) -> None:
    """§4.2, §4: no explicit lifetime, no Last-Modified, no validator: never fresh, so the next
    request goes to the origin."""
    script(origin, "/r", Reply())
    _, second = await twice(http, origin.url("/r"))
    assert not is_hit(second)
    assert len(seen(origin, "/r")) == 2


async def test_must_understand_overrides_no_store_for_an_understood_status(
    http: httpx.AsyncClient, origin: Origin
) -> None:
    """§5.2.2.3: a cache that understands the status SHOULD ignore no-store when must-understand
    is present."""
    script(
        origin, "/r", Reply(headers=[("Cache-Control", "must-understand, no-store, max-age=600")])
    )
    _, second = await twice(http, origin.url("/r"))
    assert is_hit(second)
    assert len(seen(origin, "/r")) == 1


async def test_must_understand_with_an_unknown_status_is_not_stored(
    http: httpx.AsyncClient, origin: Origin
) -> None:
    """§3, §5.2.2.3: must-understand with a status code the cache does not understand (299):
    MUST NOT store."""
    script(origin, "/r", Reply(299, b"odd", [("Cache-Control", "must-understand, max-age=600")]))
    _, second = await twice(http, origin.url("/r"))
    assert second.status_code == 299
    assert not is_hit(second)
    assert len(seen(origin, "/r")) == 2


async def test_directive_names_are_case_insensitive_and_unknown_ones_ignored(
    http: httpx.AsyncClient, origin: Origin
) -> None:
    """§5.2: directive names are case-insensitive; §5.2.3: unknown extensions are ignored."""
    script(origin, "/a", Reply(headers=[("Cache-Control", 'X-Ext, MAX-AGE=600, foo="a,b"')]))
    script(origin, "/b", Reply(headers=[("Cache-Control", "No-Store, Max-Age=600")]))
    _, second_a = await twice(http, origin.url("/a"))
    _, second_b = await twice(http, origin.url("/b"))
    assert is_hit(second_a)
    assert not is_hit(second_b)
    assert len(seen(origin, "/a")) == 1
    assert len(seen(origin, "/b")) == 2


async def test_quoted_max_age_is_accepted(http: httpx.AsyncClient, origin: Origin) -> None:
    """§5.2: recipients ought to accept both the token and the quoted-string argument forms."""
    script(origin, "/r", Reply(headers=[("Cache-Control", 'max-age="600"')]))
    _, second = await twice(http, origin.url("/r"))
    assert is_hit(second)
    assert len(seen(origin, "/r")) == 1


@pytest.mark.parametrize("value", ["max-age=abc", "max-age=-5", "max-age=0, max-age=600"])
async def test_invalid_or_conflicting_max_age_is_stale(
    http: httpx.AsyncClient, origin: Origin, value: str
) -> None:
    """§4.2.1, §1.2.2: an invalid max-age, or conflicting duplicates (the first occurrence, or
    treating the response as stale), never make the response fresh."""
    script(origin, "/r", Reply(headers=[("Cache-Control", value)]))
    _, second = await twice(http, origin.url("/r"))
    assert not is_hit(second)
    assert len(seen(origin, "/r")) == 2


# --- §4.1 keys and Vary -----------------------------------------------------------------------


async def test_query_is_part_of_the_key(http: httpx.AsyncClient, origin: Origin) -> None:
    """§4.1, §2: the key is the target URI, query included."""
    script(origin, "/r", Reply(headers=[FRESH]))
    await http.get(origin.url("/r?a=1"))
    other = await http.get(origin.url("/r?a=2"))
    again = await http.get(origin.url("/r?a=1"))
    assert not is_hit(other)
    assert is_hit(again)
    assert [r.target for r in seen(origin, "/r")] == [b"/r?a=1", b"/r?a=2"]


async def test_vary_selects_the_stored_variant(http: httpx.AsyncClient, origin: Origin) -> None:
    """§4.1: a stored response is used only when the fields named by Vary match the request;
    several variants of one URI are stored side by side."""
    count = 0

    async def handler(exchange: Exchange) -> None:
        nonlocal count
        count += 1
        lang = (exchange.header(b"x-lang") or b"none").decode()
        headers = [FRESH, ("Vary", "X-Lang")]
        await answer(exchange, Reply(body=f"{lang} #{count}".encode(), headers=headers))

    origin.route("/r", handler)
    url = origin.url("/r")
    en = await http.get(url, headers={"X-Lang": "en"})
    fr = await http.get(url, headers={"X-Lang": "fr"})
    en_again = await http.get(url, headers={"X-Lang": "en"})
    fr_again = await http.get(url, headers={"X-Lang": "fr"})
    assert not is_hit(fr)
    assert en_again.content == en.content == b"en #1"
    assert fr_again.content == fr.content == b"fr #2"
    assert is_hit(en_again) and is_hit(fr_again)
    assert len(seen(origin, "/r")) == 2


async def test_vary_matches_normalised_field_values(
    http: httpx.AsyncClient, origin: Origin
) -> None:
    """§4.1: selecting fields match after removing whitespace where the field's syntax allows
    it, combining field lines, and normalising values known to be equivalent (language tags are
    case-insensitive, RFC 9110 §8.5.1); a different value still misses."""
    script(origin, "/r", Reply(headers=[FRESH, ("Vary", "Accept-Language")]))
    url = origin.url("/r")
    await http.get(url, headers={"Accept-Language": "en,fr;q=0.5"})
    spaced = await http.get(url, headers={"Accept-Language": "en ,   fr ; q=0.5"})
    split = await http.get(
        url, headers=[("Accept-Language", "EN"), ("Accept-Language", "fr;q=0.5")]
    )
    other = await http.get(url, headers={"Accept-Language": "de"})
    assert is_hit(spaced)
    assert is_hit(split)
    assert not is_hit(other)
    assert len(seen(origin, "/r")) == 2


async def test_vary_star_never_matches(http: httpx.AsyncClient, origin: Origin) -> None:
    """§4.1: a stored response with Vary: * always fails to match."""
    script(origin, "/r", Reply(headers=[FRESH, ("Vary", "*")]))
    _, second = await twice(http, origin.url("/r"))
    assert not is_hit(second)
    assert len(seen(origin, "/r")) == 2


# --- §4.2 freshness ---------------------------------------------------------------------------


async def test_s_maxage_overrides_max_age(http: httpx.AsyncClient, origin: Origin) -> None:
    """§4.2.1, §5.2.2.10: in a shared cache s-maxage takes precedence over max-age (both ways)."""
    script(origin, "/fresh", Reply(headers=[("Cache-Control", "s-maxage=600, max-age=0")]))
    script(origin, "/stale", Reply(headers=[("Cache-Control", "s-maxage=0, max-age=600")]))
    _, fresh = await twice(http, origin.url("/fresh"))
    _, stale = await twice(http, origin.url("/stale"))
    assert is_hit(fresh)
    assert not is_hit(stale)
    assert len(seen(origin, "/fresh")) == 1
    assert len(seen(origin, "/stale")) == 2


async def test_max_age_overrides_expires(http: httpx.AsyncClient, origin: Origin) -> None:
    """§4.2.1, §5.3: max-age takes precedence over Expires (both ways)."""
    past, future = http_date(time.time() - 3600), http_date(time.time() + 3600)
    script(origin, "/fresh", Reply(headers=[("Cache-Control", "max-age=600"), ("Expires", past)]))
    script(origin, "/stale", Reply(headers=[("Cache-Control", "max-age=0"), ("Expires", future)]))
    _, fresh = await twice(http, origin.url("/fresh"))
    _, stale = await twice(http, origin.url("/stale"))
    assert is_hit(fresh)
    assert not is_hit(stale)
    assert len(seen(origin, "/fresh")) == 1
    assert len(seen(origin, "/stale")) == 2


async def test_expires_minus_date_is_the_lifetime(http: httpx.AsyncClient, origin: Origin) -> None:
    """§4.2.1: without max-age the lifetime is Expires - Date; age counts from Date (§4.2.3)."""
    now = time.time()
    headers = [("Expires", http_date(now - 30 + 60))]
    script(origin, "/r", Reply(headers=headers, date_ago=30))
    _, second = await twice(http, origin.url("/r"))
    assert is_hit(second)
    assert 24 <= ttl(second) <= 31
    assert 29 <= int(second.headers["age"]) <= 36
    assert len(seen(origin, "/r")) == 1


@pytest.mark.parametrize("expires", ["0", "not a date", "PAST"])
async def test_invalid_or_past_expires_is_stale(
    http: httpx.AsyncClient, origin: Origin, expires: str
) -> None:
    """§5.3: an invalid Expires (e.g. "0") means already expired; so does a date in the past."""
    value = http_date(time.time() - 60) if expires == "PAST" else expires
    script(origin, "/r", Reply(headers=[("Expires", value)]))
    _, second = await twice(http, origin.url("/r"))
    assert not is_hit(second)
    assert len(seen(origin, "/r")) == 2


async def test_heuristic_freshness_is_a_tenth_of_the_last_modified_age(
    http: httpx.AsyncClient, origin: Origin
) -> None:
    """§4.2.2: without an explicit lifetime a heuristically cacheable 200 may get a heuristic
    lifetime: 10% of (Date - Last-Modified) here, 100 s for a resource last modified 1000 s ago."""
    script(origin, "/r", Reply(headers=[("Last-Modified", http_date(time.time() - 1000))]))
    _, second = await twice(http, origin.url("/r"))
    assert is_hit(second)
    assert 92 <= ttl(second) <= 101
    assert len(seen(origin, "/r")) == 1


async def test_heuristic_lifetime_runs_out(http: httpx.AsyncClient, origin: Origin) -> None:
    """§4.2.2, §4.3.1: last modified 20 s before a Date 5 s ago: 2 s of heuristic freshness are
    over, so the next request revalidates with If-Modified-Since."""
    lm = http_date(time.time() - 25)
    script(
        origin,
        "/r",
        Reply(headers=[("Last-Modified", lm)], date_ago=5),
        Reply(304, b"", [("Last-Modified", lm)]),
    )
    _, second = await twice(http, origin.url("/r"))
    assert second.status_code == 200
    assert second.content == b"stored body"
    requests = seen(origin, "/r")
    assert len(requests) == 2
    assert field(requests[1], "If-Modified-Since") == lm


async def test_age_on_a_hit_counts_the_origin_age(http: httpx.AsyncClient, origin: Origin) -> None:
    """§4.2.3, §5.1: the Age sent with a stored response includes the Age the origin (or an
    upstream cache) already gave it."""
    script(origin, "/r", Reply(headers=[("Cache-Control", "max-age=1000"), ("Age", "100")]))
    first, second = await twice(http, origin.url("/r"))
    assert int(first.headers["age"]) == 100  # relayed as received
    assert is_hit(second)
    assert 100 <= int(second.headers["age"]) <= 105
    assert 894 <= ttl(second) <= 900


async def test_age_on_a_hit_counts_a_date_in_the_past(
    http: httpx.AsyncClient, origin: Origin
) -> None:
    """§4.2.3: apparent_age = response_time - date_value when positive."""
    script(origin, "/r", Reply(headers=[("Cache-Control", "max-age=1000")], date_ago=50))
    _, second = await twice(http, origin.url("/r"))
    assert is_hit(second)
    assert 49 <= int(second.headers["age"]) <= 56


async def test_every_hit_carries_age(http: httpx.AsyncClient, origin: Origin) -> None:
    """§5.1: a cache that serves a stored response sends Age (0 is a valid value)."""
    script(origin, "/r", Reply(headers=[FRESH]))
    _, second = await twice(http, origin.url("/r"))
    assert is_hit(second)
    assert 0 <= int(second.headers["age"]) <= 5


async def test_origin_age_beyond_the_lifetime_is_stale(
    http: httpx.AsyncClient, origin: Origin
) -> None:
    """§4.2.3: an Age of 100 makes a max-age=60 response stale on arrival."""
    script(origin, "/r", Reply(headers=[("Cache-Control", "max-age=60"), ("Age", "100")]))
    _, second = await twice(http, origin.url("/r"))
    assert not is_hit(second)
    assert len(seen(origin, "/r")) == 2


# --- §5.2.1 request directives ------------------------------------------------------------------


async def test_request_max_age_zero_revalidates(http: httpx.AsyncClient, origin: Origin) -> None:
    """§5.2.1.1, §4.3.1: a reload (max-age=0) of a fresh response is validated with the stored
    ETag; a 304 lets the cache answer 200 with the stored body."""
    script(
        origin,
        "/r",
        Reply(headers=[FRESH, ("ETag", '"v1"')]),
        Reply(304, b"", [FRESH, ("ETag", '"v1"')]),
    )
    await http.get(origin.url("/r"))
    reload = await http.get(origin.url("/r"), headers={"Cache-Control": "max-age=0"})
    assert reload.status_code == 200
    assert reload.content == b"stored body"
    requests = seen(origin, "/r")
    assert len(requests) == 2
    assert field(requests[1], "If-None-Match") == '"v1"'


async def test_request_max_age_limits_the_acceptable_age(
    http: httpx.AsyncClient, origin: Origin
) -> None:
    """§5.2.1.1: the client will not accept a response older than max-age."""
    script(origin, "/r", Reply(headers=[("Cache-Control", "max-age=1000"), ("Age", "30")]))
    url = origin.url("/r")
    await http.get(url)
    young_enough = await http.get(url, headers={"Cache-Control": "max-age=100"})
    too_old = await http.get(url, headers={"Cache-Control": "max-age=10"})
    assert is_hit(young_enough)
    assert not is_hit(too_old)
    assert len(seen(origin, "/r")) == 2


async def test_request_min_fresh(http: httpx.AsyncClient, origin: Origin) -> None:
    """§5.2.1.3: the response must stay fresh for at least min-fresh more seconds."""
    script(origin, "/r", Reply(headers=[("Cache-Control", "max-age=100")]))
    url = origin.url("/r")
    await http.get(url)
    enough = await http.get(url, headers={"Cache-Control": "min-fresh=50"})
    not_enough = await http.get(url, headers={"Cache-Control": "min-fresh=200"})
    assert is_hit(enough)
    assert not is_hit(not_enough)
    assert len(seen(origin, "/r")) == 2


async def test_request_max_stale(http: httpx.AsyncClient, origin: Origin) -> None:
    """§5.2.1.2: max-stale=N accepts a response stale by up to N seconds; without a value, any
    staleness."""
    script(origin, "/r", Reply(headers=[("Cache-Control", "max-age=10")], date_ago=20))
    url = origin.url("/r")
    await http.get(url)
    within = await http.get(url, headers={"Cache-Control": "max-stale=60"})
    unlimited = await http.get(url, headers={"Cache-Control": "max-stale"})
    assert is_hit(within) and is_hit(unlimited)
    assert within.content == b"stored body"
    assert len(seen(origin, "/r")) == 1
    beyond = await http.get(url, headers={"Cache-Control": "max-stale=5"})
    assert not is_hit(beyond)
    assert len(seen(origin, "/r")) == 2


async def test_request_no_cache_goes_to_the_origin(http: httpx.AsyncClient, origin: Origin) -> None:
    """§5.2.1.4: no-cache in the request: a stored response is not used without validation."""
    script(origin, "/r", Reply(headers=[FRESH]))
    url = origin.url("/r")
    await http.get(url)
    forced = await http.get(url, headers={"Cache-Control": "no-cache"})
    assert forced.status_code == 200
    assert not is_hit(forced)
    assert len(seen(origin, "/r")) == 2


async def test_only_if_cached_with_nothing_stored_is_504(
    http: httpx.AsyncClient, origin: Origin
) -> None:
    """§5.2.1.7: only-if-cached and no usable stored response: 504, nothing sent upstream."""
    script(origin, "/r", Reply(headers=[FRESH]))
    response = await http.get(origin.url("/r"), headers={"Cache-Control": "only-if-cached"})
    assert response.status_code == 504
    assert "cache-status" in response.headers
    assert seen(origin, "/r") == []


async def test_only_if_cached_serves_a_fresh_stored_response(
    http: httpx.AsyncClient, origin: Origin
) -> None:
    """§5.2.1.7: only-if-cached is answered from a fresh stored response."""
    script(origin, "/r", Reply(headers=[FRESH]))
    await http.get(origin.url("/r"))
    response = await http.get(origin.url("/r"), headers={"Cache-Control": "only-if-cached"})
    assert response.status_code == 200
    assert response.content == b"stored body"
    assert len(seen(origin, "/r")) == 1


async def test_only_if_cached_with_only_a_stale_response_is_504(
    http: httpx.AsyncClient, origin: Origin
) -> None:
    """§5.2.1.7, §4.2.4: a stale response is not usable without max-stale: 504, no request."""
    script(
        origin, "/r", Reply(headers=[("Cache-Control", "max-age=1"), ("ETag", '"a"')], date_ago=30)
    )
    await http.get(origin.url("/r"))
    response = await http.get(origin.url("/r"), headers={"Cache-Control": "only-if-cached"})
    assert response.status_code == 504
    assert len(seen(origin, "/r")) == 1


async def test_pragma_no_cache_without_cache_control(
    http: httpx.AsyncClient, origin: Origin
) -> None:
    """§5.4: Pragma: no-cache in a request without Cache-Control acts like no-cache."""
    script(origin, "/r", Reply(headers=[FRESH]))
    await http.get(origin.url("/r"))
    response = await http.get(origin.url("/r"), headers={"Pragma": "no-cache"})
    assert not is_hit(response)
    assert len(seen(origin, "/r")) == 2


async def test_pragma_is_ignored_when_cache_control_is_present(
    http: httpx.AsyncClient, origin: Origin
) -> None:
    """§5.4: when Cache-Control is present (and understood) in the request, Pragma is ignored."""
    script(origin, "/r", Reply(headers=[FRESH]))
    await http.get(origin.url("/r"))
    response = await http.get(
        origin.url("/r"), headers={"Pragma": "no-cache", "Cache-Control": "max-stale=10"}
    )
    assert is_hit(response)
    assert len(seen(origin, "/r")) == 1


# --- §5.2.2 response directives -----------------------------------------------------------------


@pytest.mark.parametrize(
    "directives",
    ["max-age=1, must-revalidate", "max-age=1, proxy-revalidate", "s-maxage=1, max-age=600"],
)
async def test_must_revalidate_is_never_served_stale(
    http: httpx.AsyncClient, origin: Origin, directives: str
) -> None:
    """§5.2.2.2, §5.2.2.8, §5.2.2.10 (s-maxage implies proxy-revalidate): once stale, the response
    is not served without revalidation, even to a request with max-stale."""
    script(
        origin,
        "/r",
        Reply(headers=[("Cache-Control", directives), ("ETag", '"v1"')], date_ago=30),
        Reply(304, b"", [("Cache-Control", directives), ("ETag", '"v1"')], date_ago=30),
    )
    await http.get(origin.url("/r"))
    response = await http.get(origin.url("/r"), headers={"Cache-Control": "max-stale=3600"})
    assert response.status_code == 200
    assert response.content == b"stored body"
    requests = seen(origin, "/r")
    assert len(requests) == 2
    assert field(requests[1], "If-None-Match") == '"v1"'


@pytest.mark.parametrize("directive", ["must-revalidate", "proxy-revalidate"])
async def test_must_revalidate_with_the_origin_down_is_504(
    start_proxy: StartProxy, tmp_path: Path, stoppable: StoppableOrigin, directive: str
) -> None:
    """§5.2.2.2: a cache that cannot reach the origin MUST NOT reuse the stale response; it
    SHOULD answer 504."""
    proxy = await start_proxy(**cache_settings(tmp_path / "cache"))
    origin = stoppable.origin
    headers = [("Cache-Control", f"max-age=1, {directive}"), ("ETag", '"v1"')]
    script(origin, "/r", Reply(headers=headers, date_ago=30))
    async with httpx.AsyncClient(proxy=proxy.url, trust_env=False, timeout=10) as http:
        await http.get(origin.url("/r"))
        stoppable.stop()
        response = await http.get(origin.url("/r"), headers={"Cache-Control": "max-stale"})
    assert response.status_code == 504
    assert response.content != b"stored body"


async def test_must_revalidate_overrides_stale_if_error(
    http: httpx.AsyncClient, origin: Origin
) -> None:
    """§5.2.2.2, RFC 5861 §4: must-revalidate forbids serving stale even when stale-if-error
    would allow it: the origin's 503 reaches the client."""
    cc = ("Cache-Control", "max-age=1, must-revalidate, stale-if-error=3600")
    script(
        origin,
        "/r",
        Reply(headers=[cc, ("ETag", '"v1"')], date_ago=30),
        Reply(503, b"down for maintenance"),
    )
    await http.get(origin.url("/r"))
    response = await http.get(origin.url("/r"))
    assert response.status_code == 503
    assert response.content == b"down for maintenance"


async def test_response_no_cache_always_revalidates(
    http: httpx.AsyncClient, origin: Origin
) -> None:
    """§5.2.2.4: unqualified no-cache: the stored response MUST NOT be used without successful
    validation, however fresh."""
    headers = [("Cache-Control", "no-cache, max-age=600"), ("ETag", '"v1"')]
    script(origin, "/r", Reply(headers=headers), Reply(304, b"", headers))
    _, second = await twice(http, origin.url("/r"))
    assert second.status_code == 200
    assert second.content == b"stored body"
    requests = seen(origin, "/r")
    assert len(requests) == 2
    assert field(requests[1], "If-None-Match") == '"v1"'


async def test_response_no_cache_with_field_names(http: httpx.AsyncClient, origin: Origin) -> None:
    """§5.2.2.4: no-cache="X-Token": the named field MUST NOT be sent in a response to a later
    request without revalidation; the rest of the response may be reused."""
    headers = [("Cache-Control", 'no-cache="X-Token", max-age=600'), ("X-Token", "t0k3n")]
    script(origin, "/r", Reply(headers=headers))
    first, second = await twice(http, origin.url("/r"))
    assert first.headers["x-token"] == "t0k3n"
    assert is_hit(second)
    assert "x-token" not in second.headers
    assert len(seen(origin, "/r")) == 1


async def test_immutable_is_not_revalidated_on_reload(
    http: httpx.AsyncClient, origin: Origin
) -> None:
    """RFC 8246 §2: a fresh immutable response is not revalidated on a reload (max-age=0); a
    forced reload (no-cache) still goes to the origin (RFC 9111 §5.2.1.4)."""
    script(origin, "/r", Reply(headers=[("Cache-Control", "max-age=600, immutable")]))
    url = origin.url("/r")
    await http.get(url)
    reload = await http.get(url, headers={"Cache-Control": "max-age=0"})
    assert is_hit(reload)
    assert len(seen(origin, "/r")) == 1
    forced = await http.get(url, headers={"Cache-Control": "no-cache"})
    assert not is_hit(forced)
    assert len(seen(origin, "/r")) == 2


async def test_stale_while_revalidate_serves_stale_and_revalidates_once(
    http: httpx.AsyncClient, origin: Origin
) -> None:
    """RFC 5861 §3: within the window the stale response is served at once and one background
    revalidation per key refreshes it; requests meanwhile start no other."""
    release = trio.Event()
    count = 0

    async def handler(exchange: Exchange) -> None:
        nonlocal count
        count += 1
        if count == 1:
            cc = ("Cache-Control", "max-age=1, stale-while-revalidate=600")
            await answer(exchange, Reply(body=b"old", headers=[cc, ("ETag", '"v1"')], date_ago=10))
            return
        await release.wait()
        await answer(exchange, Reply(body=b"new", headers=[FRESH, ("ETag", '"v2"')]))

    origin.route("/r", handler)
    url = origin.url("/r")
    await http.get(url)
    for _ in range(5):
        stale = await http.get(url)
        assert stale.status_code == 200
        assert stale.content == b"old"
        assert is_hit(stale)
    await eventually(lambda: len(seen(origin, "/r")) == 2, timeout=10)
    assert field(seen(origin, "/r")[1], "If-None-Match") == '"v1"'
    release.set()

    async def refreshed() -> httpx.Response:
        with trio.fail_after(5):
            while True:
                response = await http.get(url)
                if response.content == b"new":
                    return response
                await trio.sleep(0.02)

    response = await refreshed()
    assert is_hit(response)
    assert len(seen(origin, "/r")) == 2


async def test_stale_while_revalidate_beyond_the_window_revalidates_first(
    http: httpx.AsyncClient, origin: Origin
) -> None:
    """RFC 5861 §3: past the stale-while-revalidate window the client waits for the origin."""
    cc = ("Cache-Control", "max-age=1, stale-while-revalidate=5")
    script(
        origin,
        "/r",
        Reply(body=b"old", headers=[cc], date_ago=60),
        Reply(body=b"new", headers=[FRESH]),
    )
    _, second = await twice(http, origin.url("/r"))
    assert second.content == b"new"
    assert len(seen(origin, "/r")) == 2


async def test_stale_if_error_serves_stale_on_a_5xx(
    http: httpx.AsyncClient, origin: Origin
) -> None:
    """RFC 5861 §4, RFC 9111 §4.2.4: an origin 500/502/503/504 within the stale-if-error window is
    answered with the stale response."""
    cc = ("Cache-Control", "max-age=1, stale-if-error=600")
    script(origin, "/r", Reply(headers=[cc], date_ago=10), Reply(503, b"busy"))
    _, second = await twice(http, origin.url("/r"))
    assert second.status_code == 200
    assert second.content == b"stored body"
    assert len(seen(origin, "/r")) == 2


async def test_stale_if_error_serves_stale_when_the_origin_is_down(
    start_proxy: StartProxy, tmp_path: Path, stoppable: StoppableOrigin
) -> None:
    """RFC 5861 §4: no answer at all from the origin (connection refused) within the window is
    answered with the stale response."""
    proxy = await start_proxy(**cache_settings(tmp_path / "cache"))
    origin = stoppable.origin
    cc = ("Cache-Control", "max-age=1, stale-if-error=600")
    script(origin, "/r", Reply(headers=[cc, ("ETag", '"v1"')], date_ago=10))
    async with httpx.AsyncClient(proxy=proxy.url, trust_env=False, timeout=10) as http:
        await http.get(origin.url("/r"))
        stoppable.stop()
        response = await http.get(origin.url("/r"))
    assert response.status_code == 200
    assert response.content == b"stored body"


async def test_stale_if_error_window_passed_relays_the_error(
    http: httpx.AsyncClient, origin: Origin
) -> None:
    """RFC 5861 §4: beyond the stale-if-error allowance the error reaches the client."""
    cc = ("Cache-Control", "max-age=1, stale-if-error=5")
    script(origin, "/r", Reply(headers=[cc], date_ago=60), Reply(503, b"busy"))
    _, second = await twice(http, origin.url("/r"))
    assert second.status_code == 503
    assert second.content == b"busy"


# --- §4.3 validation ----------------------------------------------------------------------------


async def test_conditional_request_carries_every_stored_etag(
    http: httpx.AsyncClient, origin: Origin
) -> None:
    """§4.3.1: a cache revalidating several stored responses of one URI SHOULD send all their
    entity tags in If-None-Match; a 304 naming one selects it (§4.3.4)."""
    count = 0

    async def handler(exchange: Exchange) -> None:
        nonlocal count
        count += 1
        variant = (exchange.header(b"x-v") or b"-").decode()
        headers = [("Cache-Control", "max-age=1"), ("Vary", "X-V"), ("ETag", f'"{variant}"')]
        if count <= 2:
            await answer(exchange, Reply(body=variant.encode(), headers=headers, date_ago=30))
        else:
            await answer(exchange, Reply(304, b"", [FRESH, ("ETag", '"a"'), ("Vary", "X-V")]))

    origin.route("/r", handler)
    url = origin.url("/r")
    await http.get(url, headers={"X-V": "a"})
    await http.get(url, headers={"X-V": "b"})
    response = await http.get(url, headers={"X-V": "a"})
    assert response.status_code == 200
    assert response.content == b"a"
    requests = seen(origin, "/r")
    assert len(requests) == 3
    inm = field(requests[2], "If-None-Match") or ""
    assert sorted(tag.strip() for tag in inm.split(",")) == ['"a"', '"b"']


async def test_conditional_request_uses_last_modified(
    http: httpx.AsyncClient, origin: Origin
) -> None:
    """§4.3.1: a stored Last-Modified is sent as If-Modified-Since."""
    lm = http_date(time.time() - 86400 * 30)
    headers = [("Cache-Control", "max-age=1"), ("Last-Modified", lm)]
    script(origin, "/r", Reply(headers=headers, date_ago=30), Reply(304, b"", headers))
    _, second = await twice(http, origin.url("/r"))
    assert second.status_code == 200
    assert second.content == b"stored body"
    requests = seen(origin, "/r")
    assert len(requests) == 2
    assert field(requests[1], "If-Modified-Since") == lm
    assert field(requests[1], "If-None-Match") is None


async def test_304_updates_stored_headers_and_freshness(
    http: httpx.AsyncClient, origin: Origin
) -> None:
    """§4.3.4, §3.2: a 304 freshens the stored response: its fields replace the stored ones
    (Content-Length excepted) and the new lifetime applies to later requests."""
    script(
        origin,
        "/r",
        Reply(
            headers=[("Cache-Control", "max-age=1"), ("ETag", '"v1"'), ("X-Rev", "1")], date_ago=30
        ),
        Reply(304, b"", [FRESH, ("ETag", '"v1"'), ("X-Rev", "2"), ("Content-Length", "999")]),
    )
    url = origin.url("/r")
    await http.get(url)
    revalidated = await http.get(url)
    later = await http.get(url)
    assert revalidated.status_code == later.status_code == 200
    assert revalidated.headers["x-rev"] == later.headers["x-rev"] == "2"
    assert later.content == revalidated.content == b"stored body"
    assert later.headers["content-length"] == str(len(b"stored body"))
    assert is_hit(later)
    assert 590 <= ttl(later) <= 600
    assert len(seen(origin, "/r")) == 2


async def test_200_to_a_revalidation_replaces_the_stored_response(
    http: httpx.AsyncClient, origin: Origin
) -> None:
    """§4.3.3: a full response to a conditional request is used and replaces the stored one."""
    script(
        origin,
        "/r",
        Reply(body=b"v1", headers=[("Cache-Control", "max-age=1"), ("ETag", '"v1"')], date_ago=30),
        Reply(body=b"v2", headers=[FRESH, ("ETag", '"v2"')]),
    )
    url = origin.url("/r")
    await http.get(url)
    replaced = await http.get(url)
    later = await http.get(url)
    assert replaced.content == later.content == b"v2"
    assert later.headers["etag"] == '"v2"'
    assert is_hit(later)
    assert len(seen(origin, "/r")) == 2


async def test_client_conditional_is_answered_304_from_a_fresh_entry(
    http: httpx.AsyncClient, origin: Origin
) -> None:
    """§4.3.2: a cache evaluates the client's own conditional against a fresh stored response:
    If-None-Match (weak comparison) or If-Modified-Since; a mismatch gets the full response."""
    lm = http_date(time.time() - 86400)
    script(origin, "/r", Reply(headers=[FRESH, ("ETag", '"v1"'), ("Last-Modified", lm)]))
    url = origin.url("/r")
    await http.get(url)
    by_etag = await http.get(url, headers={"If-None-Match": '"x", W/"v1"'})
    by_date = await http.get(url, headers={"If-Modified-Since": http_date(time.time())})
    mismatch = await http.get(url, headers={"If-None-Match": '"other"'})
    assert by_etag.status_code == by_date.status_code == 304
    assert by_etag.content == b""
    assert by_etag.headers["etag"] == '"v1"'
    assert mismatch.status_code == 200
    assert mismatch.content == b"stored body"
    assert len(seen(origin, "/r")) == 1


async def test_client_conditional_on_a_stale_entry_after_revalidation(
    http: httpx.AsyncClient, origin: Origin
) -> None:
    """§4.3.2, §4.3.4: for a stale entry the cache revalidates with its own validators and then
    evaluates the client's condition against the freshened response: 304 to the client."""
    headers = [("Cache-Control", "max-age=1"), ("ETag", '"v1"')]
    script(
        origin,
        "/r",
        Reply(headers=headers, date_ago=30),
        Reply(304, b"", [FRESH, ("ETag", '"v1"')]),
    )
    await http.get(origin.url("/r"))
    response = await http.get(origin.url("/r"), headers={"If-None-Match": '"v1"'})
    assert response.status_code == 304
    requests = seen(origin, "/r")
    assert len(requests) == 2
    assert field(requests[1], "If-None-Match") == '"v1"'
    later = await http.get(origin.url("/r"))
    assert is_hit(later)
    assert later.content == b"stored body"


async def test_client_conditional_without_a_stored_entry_is_forwarded(
    http: httpx.AsyncClient, origin: Origin
) -> None:
    """§4.3.2 (nothing stored to evaluate it against): the client's conditional goes to the
    origin as it is; the origin's 304 reaches the client and is not stored (§3: a 304 is only
    used to freshen)."""
    script(origin, "/r", Reply(304, b"", [FRESH, ("ETag", '"v1"')]), Reply(headers=[FRESH]))
    response = await http.get(origin.url("/r"), headers={"If-None-Match": '"v1"'})
    assert response.status_code == 304
    assert field(seen(origin, "/r")[0], "If-None-Match") == '"v1"'
    plain = await http.get(origin.url("/r"))
    assert plain.status_code == 200
    assert plain.content == b"stored body"
    assert len(seen(origin, "/r")) == 2


# --- §4.4 invalidation --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
async def test_unsafe_method_invalidates_the_target(
    http: httpx.AsyncClient, origin: Origin, method: str
) -> None:
    """§4.4: a non-error response to an unsafe method invalidates the target URI."""
    origin.route("/r", unsafe_then(Reply(headers=[FRESH])))
    url = origin.url("/r")
    await http.get(url)
    assert is_hit(await http.get(url))
    unsafe = await http.request(method, url, content=b"x")
    assert unsafe.status_code == 204
    after = await http.get(url)
    assert not is_hit(after)
    assert [r.method for r in seen(origin, "/r")] == [b"GET", method.encode(), b"GET"]


def unsafe_then(
    get_reply: Reply, status: int = 204, headers: Sequence[tuple[str, str]] = ()
) -> Handler:
    """A handler: unsafe methods get ``status`` with ``headers``, GET gets ``get_reply``."""

    async def handler(exchange: Exchange) -> None:
        await exchange.read_body()
        if exchange.request.method in (b"GET", b"HEAD"):
            await answer(exchange, get_reply)
        else:
            await answer(exchange, Reply(status, b"", headers))

    return handler


async def test_unsafe_method_with_an_error_response_does_not_invalidate(
    http: httpx.AsyncClient, origin: Origin
) -> None:
    """§4.4: only a non-error (2xx/3xx) status invalidates."""
    origin.route("/r", unsafe_then(Reply(headers=[FRESH]), status=500))
    url = origin.url("/r")
    await http.get(url)
    failed = await http.post(url, content=b"x")
    assert failed.status_code == 500
    assert is_hit(await http.get(url))
    assert len(seen(origin, "/r")) == 2


@pytest.mark.parametrize("name", ["Location", "Content-Location"])
async def test_unsafe_method_invalidates_same_origin_location(
    http: httpx.AsyncClient, origin: Origin, name: str
) -> None:
    """§4.4: the URIs in Location and Content-Location are invalidated when same-origin
    (a relative reference and an absolute one are both same-origin here)."""
    script(origin, "/a", Reply(headers=[FRESH]))
    script(origin, "/b", Reply(headers=[FRESH]))
    pointers = [(name, "/a")]
    origin.route("/form", unsafe_then(Reply(), 201, pointers))
    absolute = [(name, origin.url("/b"))]
    origin.route("/form2", unsafe_then(Reply(), 201, absolute))
    for path in ("/a", "/b"):
        await http.get(origin.url(path))
        assert is_hit(await http.get(origin.url(path)))
    assert (await http.post(origin.url("/form"), content=b"x")).status_code == 201
    assert (await http.post(origin.url("/form2"), content=b"x")).status_code == 201
    assert not is_hit(await http.get(origin.url("/a")))
    assert not is_hit(await http.get(origin.url("/b")))
    assert len(seen(origin, "/a")) == len(seen(origin, "/b")) == 2


async def test_unsafe_method_does_not_invalidate_a_cross_origin_location(
    http: httpx.AsyncClient, origin: Origin
) -> None:
    """§4.4: a Location on another origin (another host name) MUST NOT be invalidated."""
    script(origin, "/r", Reply(headers=[FRESH]))
    other = f"http://localhost:{origin.port}/r"
    origin.route("/form", unsafe_then(Reply(), 201, [("Location", other)]))
    await http.get(other)
    assert is_hit(await http.get(other))
    assert (await http.post(origin.url("/form"), content=b"x")).status_code == 201
    # The POST's connection answers the next request only after the POST exchange is over, so
    # any invalidation it caused has happened by then.
    await http.get(origin.url("/sync"))
    assert is_hit(await http.get(other))
    assert len(seen(origin, "/r")) == 1


async def test_invalidation_is_visible_as_soon_as_the_unsafe_response_is(
    cache_proxy: RunningProxy, origin: Origin
) -> None:
    """§4.4: the cache MUST invalidate the target URI "when it receives" the non-error response:
    a client that has the POST's answer and asks (on another connection) for the target at once
    must not get the old stored response."""
    origin.route("/r", unsafe_then(Reply(headers=[FRESH])))
    url = origin.url("/r")
    settings: dict[str, Any] = {"proxy": cache_proxy.url, "trust_env": False, "timeout": 10}
    async with httpx.AsyncClient(**settings) as writer, httpx.AsyncClient(**settings) as reader:
        await reader.get(url)
        assert is_hit(await reader.get(url))
        for _ in range(5):
            assert (await writer.post(url, content=b"x")).status_code == 204
            after = await reader.get(url)
            assert not is_hit(after), "a stale hit right after the POST's response"


# --- ranges, HEAD -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "first", "last"),
    [("bytes=10-19", 10, 19), ("bytes=-10", 990, 999), ("bytes=990-", 990, 999)],
)
async def test_single_byte_range_is_served_from_the_store(
    http: httpx.AsyncClient, origin: Origin, spec: str, first: int, last: int
) -> None:
    """RFC 9110 §14.2, RFC 9111 §3.4 (ranges of a complete stored response): a single byte range
    is answered 206 from the store."""
    script(origin, "/r", Reply(body=BODY_1000, headers=[FRESH]))
    await http.get(origin.url("/r"))
    response = await http.get(origin.url("/r"), headers={"Range": spec})
    assert response.status_code == 206
    assert response.headers["content-range"] == f"bytes {first}-{last}/1000"
    assert response.content == BODY_1000[first : last + 1]
    assert is_hit(response)
    assert len(seen(origin, "/r")) == 1


async def test_unsatisfiable_range_is_416(http: httpx.AsyncClient, origin: Origin) -> None:
    """RFC 9110 §15.5.17: a range beyond the stored representation: 416 with bytes */1000."""
    script(origin, "/r", Reply(body=BODY_1000, headers=[FRESH]))
    await http.get(origin.url("/r"))
    response = await http.get(origin.url("/r"), headers={"Range": "bytes=5000-6000"})
    assert response.status_code == 416
    assert response.headers["content-range"] == "bytes */1000"
    assert len(seen(origin, "/r")) == 1


async def test_head_is_answered_from_a_stored_get(http: httpx.AsyncClient, origin: Origin) -> None:
    """§4 (HEAD can be satisfied from a stored GET response, RFC 9110 §9.3.2): same fields, no
    body, no request to the origin."""
    script(origin, "/r", Reply(body=BODY_1000, headers=[FRESH, ("ETag", '"v1"')]))
    await http.get(origin.url("/r"))
    response = await http.head(origin.url("/r"))
    assert response.status_code == 200
    assert response.content == b""
    assert response.headers["content-length"] == "1000"
    assert response.headers["etag"] == '"v1"'
    assert is_hit(response)
    assert len(seen(origin, "/r")) == 1


# --- Cache-Status (RFC 9211) ----------------------------------------------------------------------


async def test_cache_status_on_a_miss_that_is_stored_and_on_the_hit(
    http: httpx.AsyncClient, origin: Origin
) -> None:
    """RFC 9211 §2: the miss says fwd=uri-miss, fwd-status and stored; the hit says hit and ttl."""
    script(origin, "/r", Reply(headers=[FRESH]))
    first, second = await twice(http, origin.url("/r"))
    miss = cache_status(first)
    assert miss["name"] == "proxyd-test"
    assert miss.get("fwd") == "uri-miss"
    assert miss.get("fwd-status") == "200"
    assert miss.get("stored") is True
    assert "hit" not in miss
    hit = cache_status(second)
    assert hit["name"] == "proxyd-test"
    assert hit.get("hit") is True
    assert 594 <= ttl(second) <= 600
    assert "fwd" not in hit


async def test_cache_status_on_every_other_response(
    http: httpx.AsyncClient, origin: Origin
) -> None:
    """RFC 9211 §2: uncacheable answers, unsafe methods, revalidations and generated 504s say
    what the cache did too."""
    script(origin, "/nostore", Reply(headers=[("Cache-Control", "no-store")]))
    script(
        origin,
        "/stale",
        Reply(headers=[("Cache-Control", "max-age=1"), ("ETag", '"v"')], date_ago=30),
        Reply(304, b"", [FRESH, ("ETag", '"v"')]),
    )
    nostore = await http.get(origin.url("/nostore"))
    post = await http.post(origin.url("/post"), content=b"x")
    await http.get(origin.url("/stale"))
    revalidated = await http.get(origin.url("/stale"))
    gateway = await http.get(origin.url("/none"), headers={"Cache-Control": "only-if-cached"})
    assert "fwd" in cache_status(nostore) and "stored" not in cache_status(nostore)
    assert cache_status(post).get("fwd") == "method"
    assert cache_status(revalidated).get("fwd") == "stale"
    assert cache_status(revalidated).get("fwd-status") == "304"
    assert gateway.status_code == 504
    assert "hit" not in cache_status(gateway)


# --- purge ---------------------------------------------------------------------------------------


async def test_purge_from_an_allowed_client(http: httpx.AsyncClient, origin: Origin) -> None:
    """PURGE http://host/path from a client in cache.purge_clients removes every variant."""
    script(origin, "/r", Reply(headers=[FRESH, ("Vary", "X-V")]))
    url = origin.url("/r")
    for variant in ("a", "b"):
        await http.get(url, headers={"X-V": variant})
    purged = await http.request("PURGE", url)
    assert purged.status_code == 200
    missing = await http.request("PURGE", url)
    assert missing.status_code == 404
    for variant in ("a", "b"):
        assert not is_hit(await http.get(url, headers={"X-V": variant}))
    assert len(seen(origin, "/r")) == 4
    assert all(r.method == b"GET" for r in seen(origin, "/r"))


async def test_purge_from_another_client_is_403(
    start_proxy: StartProxy, tmp_path: Path, origin: Origin
) -> None:
    """PURGE from a client outside cache.purge_clients is refused and removes nothing."""
    proxy = await start_proxy(
        **cache_settings(tmp_path / "cache", **{"cache.purge_clients": ["10.0.0.0/8"]})
    )
    script(origin, "/r", Reply(headers=[FRESH]))
    url = origin.url("/r")
    async with httpx.AsyncClient(proxy=proxy.url, trust_env=False, timeout=10) as http:
        await http.get(url)
        refused = await http.request("PURGE", url)
        assert refused.status_code == 403
        assert is_hit(await http.get(url))
    assert len(seen(origin, "/r")) == 1


async def test_admin_purge_endpoint(
    http: httpx.AsyncClient, cache_proxy: RunningProxy, origin: Origin
) -> None:
    """POST /cache/purge?url=URL on the admin listener removes the URL; 404 when absent."""
    script(origin, "/r", Reply(headers=[FRESH]))
    url = origin.url("/r")
    await http.get(url)
    assert is_hit(await http.get(url)), "precondition: stored"
    async with httpx.AsyncClient(trust_env=False, timeout=10) as admin:
        purged = await admin.post(cache_proxy.admin_url + "/cache/purge", params={"url": url})
        again = await admin.post(cache_proxy.admin_url + "/cache/purge", params={"url": url})
        wrong_method = await admin.get(cache_proxy.admin_url + "/cache/purge", params={"url": url})
    assert purged.status_code == 200
    assert again.status_code == 404
    assert wrong_method.status_code == 405
    assert not is_hit(await http.get(url))
    assert len(seen(origin, "/r")) == 2


# --- metrics -------------------------------------------------------------------------------------


async def test_metrics_for_hits_misses_and_stored_bytes(
    http: httpx.AsyncClient, cache_proxy: RunningProxy, origin: Origin
) -> None:
    """proxyd_cache_lookups_total by result, bytes served from cache, entries and stored bytes."""
    script(origin, "/r", Reply(body=BODY_1000, headers=[FRESH]))
    await http.get(origin.url("/r"))
    for _ in range(2):
        assert is_hit(await http.get(origin.url("/r")))
    await settle(http, origin)
    samples = await scrape(cache_proxy.admin_url)
    assert samples.value("proxyd_cache_lookups_total", result="miss") == 1
    assert samples.value("proxyd_cache_lookups_total", result="hit") == 2
    assert samples.value("proxyd_cache_served_bytes_total") == 2000
    assert samples.value("proxyd_cache_entries") == 1
    assert samples.value("proxyd_cache_stored_bytes") == 1000
    assert samples.value("proxyd_cache_stored_total") == 1
    assert samples.value("proxyd_cache_store_errors_total") == 0
    assert samples.value("proxyd_cache_collapsed_total") == 0


async def test_metrics_for_the_other_lookup_results(
    http: httpx.AsyncClient, cache_proxy: RunningProxy, origin: Origin
) -> None:
    """Lookups counted as uncacheable, revalidated, stale_served and only_if_cached_miss;
    purges and invalidations counted by cause."""
    script(origin, "/nostore", Reply(headers=[("Cache-Control", "no-store")]))
    script(
        origin,
        "/reval",
        Reply(headers=[("Cache-Control", "max-age=1"), ("ETag", '"v"')], date_ago=30),
        Reply(304, b"", [FRESH, ("ETag", '"v"')]),
    )
    cc = ("Cache-Control", "max-age=1, stale-if-error=600")
    script(origin, "/stale", Reply(headers=[cc], date_ago=30), Reply(503, b"busy"))
    await http.get(origin.url("/nostore"))
    await twice(http, origin.url("/reval"))
    _, stale = await twice(http, origin.url("/stale"))
    assert stale.status_code == 200
    await http.get(origin.url("/none"), headers={"Cache-Control": "only-if-cached"})
    await http.request("PURGE", origin.url("/reval"))
    await settle(http, origin)
    samples = await scrape(cache_proxy.admin_url)
    lookups = "proxyd_cache_lookups_total"
    assert samples.value(lookups, result="uncacheable") == 1
    assert samples.value(lookups, result="revalidated") == 1
    assert samples.value(lookups, result="stale_served") == 1
    assert samples.value(lookups, result="only_if_cached_miss") == 1
    assert samples.value("proxyd_cache_invalidations_total", cause="purge") == 1
    assert samples.value("proxyd_cache_entries") == 1  # /stale; /reval purged


async def test_hit_is_served_with_h11_framing_intact(
    http: httpx.AsyncClient, origin: Origin
) -> None:
    """§3.1 / RFC 9112: a chunked response is stored and served with a Content-Length framing
    (no Transfer-Encoding from the store), on a keep-alive connection that stays usable."""

    async def handler(exchange: Exchange) -> None:
        await exchange.send_event(
            h11.Response(status_code=200, headers=[(b"Cache-Control", b"max-age=600")])
        )
        for part in (b"one ", b"two ", b"three"):
            await exchange.send_event(h11.Data(data=part))
        await exchange.send_event(h11.EndOfMessage())

    origin.route("/r", handler)
    first, second = await twice(http, origin.url("/r"))
    third = await http.get(origin.url("/r"))
    assert first.content == second.content == third.content == b"one two three"
    assert is_hit(second) and is_hit(third)
    assert "transfer-encoding" not in second.headers
    assert second.headers["content-length"] == "13"
    assert len(seen(origin, "/r")) == 1


async def test_compressed_body_is_stored_as_received(
    http: httpx.AsyncClient, origin: Origin
) -> None:
    """The cache sits below content coding: a gzip body is stored and served byte for byte with
    its Content-Encoding (§3.1 stores the representation as received)."""
    raw = gzip.compress(b"squeeze me " * 100)
    headers = [FRESH, ("Content-Encoding", "gzip"), ("Content-Type", "text/plain")]
    script(origin, "/r", Reply(body=raw, headers=headers))
    await http.get(origin.url("/r"))
    async with http.stream("GET", origin.url("/r")) as response:
        received = b"".join([chunk async for chunk in response.aiter_raw()])
        assert is_hit(response)
        assert response.headers["content-encoding"] == "gzip"
    assert received == raw
    assert len(seen(origin, "/r")) == 1

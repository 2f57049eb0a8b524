"""The cache transaction: the trio shell that drives one request through the shared cache.

How it works (``HttpCache.handle``), for a GET or HEAD without a body:

1. Look up every stored variant of the target URI and ask ``policy.decide`` what to do, with the
   wall clock as ``now`` (no await between the two: the decision is made on one snapshot).
2. ``SERVE``: answer from the store (``_serve_stored``): the stored fields with a correct ``Age``
   (RFC 9111 §5.1), our ``Via``, ``Cache-Status: proxyd; hit; ttl=N`` (RFC 9211), and the body
   streamed from the store, or a 304 when the client's own conditional matches (§4.3.2), or a 206
   for a single byte range (RFC 9110 §14). ``SERVE_STALE_REVALIDATE`` also starts one background
   revalidation for the key (RFC 5861 §3). ``GATEWAY_TIMEOUT``: only-if-cached found nothing usable
   (§5.2.1.7).
3. ``FETCH`` / ``REVALIDATE``: a GET joins the key's flight (cache/coalesce.py). Its leader forwards
   the request, with the stored validators for a revalidation (§4.3.1), and a ``_Tap`` looks at the
   final response head before the client sees it:
   - 304 to our revalidation: kept from the client; the stored headers are freshened (§3.2,
     §4.3.4) and the stored response is served (or a 304 if the client's condition matches);
   - 500/502/503/504 while a stale response may cover errors (stale-if-error, RFC 5861 §4): kept
     from the client, the stale response is served;
   - storable (§3): relayed to the client and copied into a store body writer at the same time;
     followers read the file while it is written; the index row is committed at the end;
   - anything else: relayed as it is.
   A failure before any response byte serves the stale response when stale-if-error allows it;
   a must-revalidate response that cannot be revalidated gives 504 (§5.2.2.2).
4. Unsafe methods go to the origin untouched; a non-error answer invalidates the target URI and
   same-origin Location / Content-Location (§4.4). ``PURGE`` removes a URI (all variants).

How a stored body leaves (``_serve_stored``): the answer (status, fields, which bytes) is decided
before the body is opened, so the store knows what to prepare.
- A body of the memory tier (``cache.memory_object_size``) goes out with the head in one write,
  with no thread hop and no await before that write (the 1 KiB hit path).
- From SENDFILE_MIN on (a full body or a range), to a client that offers ``sendfile`` (a plain
  TCP client; not the background revalidation's stand-in): the head goes through h11, then the
  bytes go from the page cache to the socket by ``os.sendfile`` (``sendfile_to_socket``), in a
  worker thread because it may read the disk, waiting on trio when the socket is full (the
  client's pace: nothing is buffered), each wait bounded by the idle timeout. h11 still
  frames the message: it is handed a placeholder whose ``len()`` is the byte count (its
  documented sendfile support, ``send_with_data_passthrough``), so Content-Length is checked
  and the connection's next request cycle starts as after any response. If the kernel refuses
  sendfile for the file, the rest is read and written as plain bytes.
- Anything else is read in pieces of READ_CHUNK (the first one in the hop that opens the file).

Every response this module writes carries ``Cache-Status``. Store failures never reach the client:
the copy is abandoned, the response goes on (the store pauses itself when the disk is full).
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Final, cast

import trio

from proxyd._h11 import h11
from proxyd.cache import policy
from proxyd.cache.coalesce import Coalescer, Flight, Outcome, SharedHead
from proxyd.cache.policy import Action, Decision, Header, Stored
from proxyd.cache.store import BodyReader, BodyWriter, CacheStore, Entry, StoreError
from proxyd.config import CacheConfig
from proxyd.errors import ProxydError
from proxyd.http import fastpath
from proxyd.http.messages import Target, reason_phrase
from proxyd.http.relay import (
    CONSUME,
    BodySink,
    ClientGone,
    ClientSide,
    Consume,
    ExchangeStats,
    ResponseAborted,
    ResponseTap,
)
from proxyd.http.rules import prepare_response
from proxyd.observe.metrics import Metrics

log = logging.getLogger(__name__)

#: fetch(headers, tap): route and forward the request with these fields, relaying to the client.
Fetch = Callable[[list[Header], ResponseTap | None], Awaitable[None]]
#: background_fetch(target, headers, tap): the same for a request of our own (no client).
BackgroundFetch = Callable[[Target, list[Header], ResponseTap], Awaitable[None]]
#: client.sendfile(fd, offset, count, timeout) -> bytes sent (see ``sendfile_to_socket``).
SendFile = Callable[[int, int, int, float], Awaitable[int]]

READ_CHUNK: Final = 1 << 20
#: A hit whose body is not in the memory tier goes by sendfile(2) from this many bytes on;
#: below it one hop that opens the file and reads the body, then one write of head and body,
#: is cheaper than sendfile's two hops (open; send). Measured with the memory tier off (wrk, 50
#: connections, proxyd on one core): at 128 KiB read-and-write served ~9% more hits per second,
#: at 192 KiB sendfile ~5-15% more, and from 1 MiB on twice as many. (The memory tier, up to
#: ``cache.memory_object_size``, beats both: no hop at all.)
SENDFILE_MIN: Final = 160 << 10
#: Most bytes one worker-thread hop moves by sendfile(2) (bounded: a hop cannot be cancelled).
SENDFILE_HOP: Final = 8 << 20
UNSHAREABLE_SECONDS: Final = 30.0
UNSHAREABLE_MEMORY: Final = 10_000
CACHEABLE_METHODS: Final = frozenset({b"GET", b"HEAD"})
SAFE_METHODS: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})
# RFC 9110 §13.1: the client's preconditions are evaluated by us when we revalidate with our own.
# Range goes too: a 206 of a changed representation would be spliced into the client's old
# bytes once If-Range is gone (RFC 9110 §13.1.5); the range is served from the store instead.
_CLIENT_VALIDATORS: Final = frozenset(
    {
        b"if-none-match",
        b"if-modified-since",
        b"if-match",
        b"if-unmodified-since",
        b"if-range",
        b"range",
    }
)
# A request with one of these can make the origin's answer unshareable by itself (206, 304,
# private to its credentials): it neither leads a flight nor marks a URL as unshareable.
_PERSONAL_FIELDS: Final = frozenset(
    {
        b"range",
        b"if-none-match",
        b"if-modified-since",
        b"if-match",
        b"if-unmodified-since",
        b"if-range",
        b"authorization",
    }
)
_FRAMING: Final = frozenset({b"content-length", b"transfer-encoding"})


class RevalidationFailed(ProxydError):
    """A stored response that must be revalidated could not be (RFC 9111 §5.2.2.2: 504)."""

    status = 504
    error_type = "destination_unavailable"


class HttpCache:
    """One per server: the store, the flights, the settings and the metrics."""

    def __init__(
        self,
        store: CacheStore,
        config: CacheConfig,
        metrics: Metrics,
        name: str,
        via: Callable[[bytes], bytes | None],
        idle_timeout: float,
        head_timeout: float,
    ) -> None:
        self.store = store
        self.config = config
        self.metrics = metrics
        self.name = name
        self.via = via
        self.idle_timeout = idle_timeout
        self.head_timeout = head_timeout
        self.coalescer = Coalescer()
        self.settings = policy.LookupSettings(
            heuristics=policy.Heuristics(config.heuristic_fraction, config.heuristic_max)
        )
        #: keys whose last answer could not be stored, until when (monotonic): requests for them
        #: do not queue behind each other's flights only to find nothing to share (Squid keeps
        #: the same hint for uncacheable URLs).
        self._unshareable: dict[str, float] = {}
        #: when each key was last invalidated (monotonic), for stores still in flight
        self._invalidated: dict[str, float] = {}
        self._background: trio.Nursery | None = None
        self._background_keys: set[str] = set()
        self.background_fetch: BackgroundFetch | None = None
        lookups = metrics.cache_lookups
        self._hit = lookups.labels("hit")
        self._miss = lookups.labels("miss")
        self._stale = lookups.labels("stale_served")
        self._revalidated = lookups.labels("revalidated")
        self._uncacheable = lookups.labels("uncacheable")
        self._only_if_cached = lookups.labels("only_if_cached_miss")
        #: responses whose body went (at least partly) by sendfile(2), and the bytes it sent
        self.sendfile_responses = 0
        self.sendfile_bytes = 0

    def reconfigure(
        self, config: CacheConfig, *, name: str, idle_timeout: float, head_timeout: float
    ) -> None:
        """A config reload: settings for lookups and stores from now on (the store's limits
        too; the caller runs ``store.shrink()`` when ``max_size`` went down)."""
        self.config = config
        self.name = name
        self.idle_timeout = idle_timeout
        self.head_timeout = head_timeout
        self.settings = policy.LookupSettings(
            heuristics=policy.Heuristics(config.heuristic_fraction, config.heuristic_max)
        )
        self.store.set_limits(
            max_size=config.max_size,
            max_object_size=config.max_object_size,
            memory_object_size=config.memory_object_size,
            memory_size=config.memory_size,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The nursery background revalidations run in (lives as long as the server)."""
        async with trio.open_nursery() as nursery:
            self._background = nursery
            task_status.started()
            await trio.sleep_forever()

    # --- the entry point -------------------------------------------------------------------

    async def handle(
        self,
        client: ClientSide,
        method: bytes,
        request_headers: list[Header],
        target: Target,
        upstream_headers: list[Header],
        stats: ExchangeStats,
        fetch: Fetch,
    ) -> None:
        """Answer a request through the cache (see the module docstring)."""
        if method not in CACHEABLE_METHODS:
            await self._unsafe(method, target, stats, upstream_headers, fetch)
            return
        key = policy.cache_key(target.scheme, target.authority, target.path)
        try:
            await self._lookup_and_answer(
                client, method, request_headers, key, target, upstream_headers, stats, fetch,
                coalesce=_is_plain(request_headers),
            )  # fmt: skip
        except ProxydError as exc:
            # RFC 9211: an error we generate says what the cache did, too.
            if exc.cache_status is None:
                exc.cache_status = policy.cache_status(self.name, fwd="miss", detail=exc.error_type)
            raise

    async def _lookup_and_answer(
        self,
        client: ClientSide,
        method: bytes,
        request_headers: list[Header],
        key: str,
        target: Target,
        upstream_headers: list[Header],
        stats: ExchangeStats,
        fetch: Fetch,
        *,
        coalesce: bool,
    ) -> None:
        entries = await self.store.lookup(key)
        decision = policy.decide(
            method, request_headers, [e.stored for e in entries], time.time(), self.settings
        )
        action = decision.action
        if stats.netlog.active:  # observe/netlog.py: the cache's decision, timed
            stats.emit("cache", action=action.value, stored=len(entries))
        entry = _entry_of(entries, decision.stored)
        if action is Action.SERVE and entry is not None:
            if await self._serve_stored(
                client, method, request_headers, entry, stats, _status_hit(self, decision)
            ):
                if decision.ttl < 0:  # stale, and the request's max-stale allowed it (§4.2.4)
                    self._stale.inc()
                    stats.cache = "stale"
                else:
                    self._hit.inc()
                    stats.cache = "hit"
                return
            action = Action.FETCH  # the body vanished (evicted or purged) since the lookup
        elif action is Action.SERVE_STALE_REVALIDATE and entry is not None:
            self._start_background_revalidation(
                key, target, entries, request_headers, upstream_headers
            )
            status = policy.cache_status(
                self.name, hit=True, ttl=decision.ttl, detail="stale-while-revalidate"
            )
            if await self._serve_stored(client, method, request_headers, entry, stats, status):
                self._stale.inc()
                stats.cache = "stale"
                return
            action = Action.FETCH
        elif action is Action.GATEWAY_TIMEOUT:
            self._only_if_cached.inc()
            stats.cache = "miss"
            await self._respond_simple(
                client,
                stats,
                504,
                b"only-if-cached: no stored response can be used\n",
                policy.cache_status(self.name, fwd="miss", detail="only-if-cached"),
                method,
            )
            return
        if action is Action.SERVE or action is Action.SERVE_STALE_REVALIDATE:
            action = Action.FETCH
        if coalesce and method == b"GET" and not self._recently_unshareable(key):
            flight, leader = self.coalescer.join(key)
            if leader:
                try:
                    await self._go_forward(
                        client, method, request_headers, key, entries, decision, action,
                        upstream_headers, stats, fetch, flight,
                    )  # fmt: skip
                finally:
                    with trio.CancelScope(shield=True):
                        await self.coalescer.land(flight)
                return
            self.metrics.cache_collapsed.inc()
            if await self._follow(client, method, request_headers, flight, stats):
                return
            if flight.outcome is Outcome.REVALIDATED:
                await self._lookup_and_answer(
                    client, method, request_headers, key, target, upstream_headers, stats, fetch,
                    coalesce=False,
                )  # fmt: skip
                return
        await self._go_forward(
            client, method, request_headers, key, entries, decision, action,
            upstream_headers, stats, fetch, None,
        )  # fmt: skip

    def _recently_unshareable(self, key: str) -> bool:
        until = self._unshareable.get(key)
        if until is None:
            return False
        if until > trio.current_time():
            return True
        del self._unshareable[key]
        return False

    def remember_shareable(self, key: str, shareable: bool) -> None:
        if shareable:
            self._unshareable.pop(key, None)
            return
        if len(self._unshareable) >= UNSHAREABLE_MEMORY:
            del self._unshareable[next(iter(self._unshareable))]  # the oldest hint goes
        self._unshareable[key] = trio.current_time() + UNSHAREABLE_SECONDS

    # --- going to the origin -----------------------------------------------------------------

    async def _go_forward(
        self,
        client: ClientSide,
        method: bytes,
        request_headers: list[Header],
        key: str,
        entries: list[Entry],
        decision: Decision,
        action: Action,
        upstream_headers: list[Header],
        stats: ExchangeStats,
        fetch: Fetch,
        flight: Flight | None,
    ) -> None:
        revalidating = action is Action.REVALIDATE and bool(decision.conditional)
        headers = upstream_headers
        if revalidating:
            # §4.3.1: our validators go upstream; the client's own preconditions are evaluated
            # here against whatever response results (§4.3.2).
            headers = [h for h in upstream_headers if h[0].lower() not in _CLIENT_VALIDATORS]
            headers.extend(decision.conditional)
        stale = _entry_of(entries, decision.stored)
        tap = _Tap(self, method, request_headers, key, entries, decision, revalidating, flight)
        tap.upstream_fields = upstream_headers
        try:
            await fetch(headers, tap)
        except ProxydError as exc:
            if tap.responded or stats.head_sent:
                raise
            if stale is not None and policy.stale_if_error_allows(
                stale.stored, request_headers, time.time(), self.settings
            ):
                log.info("serving a stale response for %s: %s", key, exc.detail)
                status = policy.cache_status(
                    self.name, fwd="stale", ttl=decision.ttl, detail="stale-if-error"
                )
                if await self._serve_stored(client, method, request_headers, stale, stats, status):
                    self._stale.inc()
                    stats.cache = "stale"
                    return
            if stale is not None and _must_revalidate(stale.stored):
                failure = RevalidationFailed(
                    f"cannot revalidate a response that must be revalidated: {exc.detail}",
                    next_hop=exc.next_hop,
                )
                failure.error_type = exc.error_type
                raise failure from exc
            raise
        finally:
            await tap.close()
        if tap.responded:
            stats.cache = "miss" if tap.sink is not None else "uncacheable"
        await self._after_forward(client, method, request_headers, key, tap, stats, fetch)

    async def _after_forward(
        self,
        client: ClientSide,
        method: bytes,
        request_headers: list[Header],
        key: str,
        tap: _Tap,
        stats: ExchangeStats,
        fetch: Fetch,
    ) -> None:
        if tap.verdict == "stale-error":
            stale = _entry_of(tap.entries, tap.decision.stored)
            assert stale is not None
            status = policy.cache_status(
                self.name,
                fwd="stale",
                fwd_status=tap.status,
                ttl=tap.decision.ttl,
                detail="stale-if-error",
            )
            if await self._serve_stored(client, method, request_headers, stale, stats, status):
                self._stale.inc()
                stats.cache = "stale"
                return
            raise RevalidationFailed(f"the origin answered {tap.status} and the stale copy is gone")
        if tap.method == b"HEAD" and tap.status == 200 and tap.entries:
            await self._after_head(tap)
            return
        if tap.verdict != "not-modified":
            return
        # §4.3.4: freshen every stored response the 304 selects, then serve the one that fits.
        chosen = await self._freshen(tap)
        if chosen is None:
            # §4.3.4: a 304 that selects nothing cannot satisfy the request: ask again, plainly.
            if tap.flight is not None:
                tap.flight.publish(Outcome.UNSHAREABLE)
            plain = [h for h in tap.upstream_fields if h[0].lower() not in _CONDITIONALS]
            retry = _Tap(self, method, request_headers, key, [], tap.decision, False, None)
            try:
                await fetch(plain, retry)
            finally:
                await retry.close()
            return
        self._revalidated.inc()
        stats.cache = "revalidated"
        if tap.flight is not None:
            tap.flight.publish(Outcome.REVALIDATED)
        status = policy.cache_status(self.name, fwd=tap.decision.fwd or "stale", fwd_status=304)
        if not await self._serve_stored(client, method, request_headers, chosen, stats, status):
            raise RevalidationFailed("the revalidated response vanished from the store")

    async def _after_head(self, tap: _Tap) -> None:
        """RFC 9111 §4.3.5: a 200 to a HEAD we forwarded freshens the stored GET response it
        validates, and invalidates the stored responses when its validators say they changed."""
        if not any(name.lower() in (b"etag", b"last-modified") for name, _ in tap.raw_headers):
            return  # nothing to compare: leave the stored responses as they are
        selected = policy.select_for_304([e.stored for e in tap.entries], tap.raw_headers)
        if not selected:
            await self._invalidate([tap.key], "head_mismatch")
            return
        for index in selected:
            entry = tap.entries[index]
            headers = policy.freshen_headers(
                entry.stored.headers, tap.raw_headers, received=tap.response_time
            )
            await self.store.update(entry, headers, tap.request_time, tap.response_time)

    async def _freshen(self, tap: _Tap) -> Entry | None:
        # The 304 answers the conditional built from decision.validated (§4.3.1), so those are
        # the stored responses it may select (§4.3.4).
        validated = tap.decision.validated or tuple(e.stored for e in tap.entries)
        candidates = [e for v in validated if (e := _entry_of(tap.entries, v)) is not None]
        selected = policy.select_for_304([e.stored for e in candidates], tap.raw_headers)
        chosen: Entry | None = None
        fallback: Entry | None = None
        for index in selected:
            entry = candidates[index]
            headers = policy.freshen_headers(
                entry.stored.headers, tap.raw_headers, received=tap.response_time
            )
            try:
                updated = await self.store.update(
                    entry, headers, tap.request_time, tap.response_time
                )
            except StoreError as exc:
                self.metrics.cache_store_errors.inc()
                log.warning("cannot update the stored response for %s: %s", entry.key, exc)
                updated = _with_stored(entry, headers, tap.request_time, tap.response_time)
            if chosen is None and policy.variant_matches(updated.stored, tap.request_headers):
                chosen = updated
            fallback = fallback or updated
        # §4.3.4: the origin selected that stored response for this very request (its validator
        # came back), so it satisfies the request even when it was stored under other Vary values.
        return chosen or fallback

    async def _unsafe(
        self,
        method: bytes,
        target: Target,
        stats: ExchangeStats,
        upstream_headers: list[Header],
        fetch: Fetch,
    ) -> None:
        """§4.4: forward untouched; a non-error response invalidates what it names, as soon as
        its head arrives (before the client can see it and ask again)."""
        tap = _UnsafeTap(self, method, target)
        stats.cache = "bypass"
        self._uncacheable.inc()
        await fetch(upstream_headers, tap)

    def invalidated_since(self, key: str, since: float) -> bool:
        """Whether ``key`` was invalidated after ``since`` (a store begun before then must not
        commit: it would bring back what the invalidation removed, §4.4)."""
        when = self._invalidated.get(key)
        return when is not None and when >= since

    async def _invalidate(self, keys: list[str], cause: str) -> int:
        removed = 0
        now = trio.current_time()
        for key in dict.fromkeys(keys):
            self._invalidated.pop(key, None)
            if len(self._invalidated) >= UNSHAREABLE_MEMORY:
                del self._invalidated[next(iter(self._invalidated))]
            self._invalidated[key] = now
            try:
                removed += await self.store.invalidate(key)
            except StoreError as exc:
                self.metrics.cache_store_errors.inc()
                log.warning("cannot invalidate %s: %s", key, exc)
        if removed:
            self.metrics.cache_invalidations.labels(cause).inc(removed)
        return removed

    async def purge(self, url: str) -> int:
        """Remove every stored variant of ``url`` (PURGE, POST /cache/purge)."""
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        key = policy.cache_key(
            parts.scheme.encode("ascii"), parts.netloc.encode("ascii"), path.encode("ascii")
        )
        return await self._invalidate([key], "purge")

    # --- stale-while-revalidate ------------------------------------------------------------

    def _start_background_revalidation(
        self,
        key: str,
        target: Target,
        entries: list[Entry],
        request_headers: list[Header],
        upstream_headers: list[Header],
    ) -> None:
        """RFC 5861 §3: one background revalidation per key at a time."""
        if (
            key in self._background_keys
            or self._background is None
            or self.background_fetch is None
            or self.coalescer.in_flight(key)
        ):
            return
        self._background_keys.add(key)
        self.metrics.cache_background_revalidations.inc()
        self._background.start_soon(
            self._revalidate_in_background, key, target, entries, request_headers, upstream_headers
        )

    async def _revalidate_in_background(
        self,
        key: str,
        target: Target,
        entries: list[Entry],
        request_headers: list[Header],
        upstream_headers: list[Header],
    ) -> None:
        assert self.background_fetch is not None
        flight, leader = self.coalescer.join(key)
        if not leader:
            self._background_keys.discard(key)
            return
        try:
            stored = [e.stored for e in entries]
            conditional = policy.conditional_for(stored)
            headers = [h for h in upstream_headers if h[0].lower() not in _CLIENT_VALIDATORS]
            headers.extend(conditional)
            decision = Decision(
                Action.REVALIDATE, stored[0] if stored else None, fwd="stale",
                conditional=conditional,
            )  # fmt: skip
            tap = _Tap(self, b"GET", request_headers, key, entries, decision, True, flight)
            tap.background = True
            try:
                await self.background_fetch(target, headers, tap)
                if tap.verdict == "not-modified":
                    await self._freshen(tap)
                    flight.publish(Outcome.REVALIDATED)
                    self._revalidated.inc()
            except (ProxydError, ResponseAborted, OSError, trio.BrokenResourceError) as exc:
                log.info("background revalidation of %s failed: %s", key, exc)
            except Exception:
                # Never let a background refresh take the daemon's nursery down with it.
                log.exception("background revalidation of %s failed", key)
            finally:
                await tap.close()
        finally:
            self._background_keys.discard(key)
            with trio.CancelScope(shield=True):
                await self.coalescer.land(flight)

    # --- following another request's fetch ---------------------------------------------------

    async def _follow(
        self,
        client: ClientSide,
        method: bytes,
        request_headers: list[Header],
        flight: Flight,
        stats: ExchangeStats,
    ) -> bool:
        """Answer from the flight's response; False when this request must go on by itself."""
        with trio.move_on_after(self.head_timeout):
            await flight.decided.wait()
        head = flight.head
        if flight.outcome is not Outcome.STREAMING or head is None:
            return False
        if policy.vary_key(head.headers, request_headers) != head.variant:
            return False  # §4.1: the flight's response is another variant
        reader = flight.acquire_reader()
        if reader is None:
            return False
        try:
            stored = Stored(
                status=head.status,
                headers=head.headers,
                request_time=head.request_time,
                response_time=head.response_time,
                variant=head.variant,
                body_size=0,
                complete=False,
            )
            age = policy.current_age(stored, time.time())
            headers = policy.merge_age_into_headers(
                [h for h in head.headers if h[0].lower() != b"transfer-encoding"], age
            )
            self._add_ours(
                headers,
                policy.cache_status(
                    self.name, fwd="uri-miss", fwd_status=head.status, collapsed=True
                ),
                client,
            )
            cc = client.h11
            _consume_request_end(cc)
            stats.status = head.status
            out = cc.send(
                h11.Response(
                    status_code=head.status, headers=headers, reason=head.reason, _parsed=True
                )
            )
            await client.send(out, self.idle_timeout)
            stats.head_sent = True
            self._miss.inc()
            stats.cache = "collapsed"
            if method == b"HEAD":
                await client.send(cc.send(h11.EndOfMessage()), self.idle_timeout)
                return True
            offset = 0
            while True:
                available = flight.written()
                if offset < available:
                    try:
                        data = await reader.read(offset, min(available - offset, READ_CHUNK))
                    except StoreError as exc:
                        raise ResponseAborted(
                            "http_response_incomplete", f"reading the followed body failed: {exc}"
                        ) from None
                    if not data:
                        raise ResponseAborted("http_response_incomplete", "the stored body shrank")
                    offset += len(data)
                    stats.bytes_out += len(data)
                    await client.send(cc.send(h11.Data(data=data)), self.idle_timeout)
                    continue
                if flight.body_complete and offset >= flight.written():
                    break
                if flight.body_failed:
                    raise ResponseAborted(
                        "http_response_incomplete", "the response being followed broke off"
                    )
                if not await flight.wait_progress(2 * self.idle_timeout):
                    raise ResponseAborted(
                        "connection_read_timeout", "the response being followed stalled"
                    )
            await client.send(cc.send(h11.EndOfMessage()), self.idle_timeout)
            return True
        finally:
            with trio.CancelScope(shield=True):
                await flight.release_reader()

    # --- answering from the store ----------------------------------------------------------

    async def _serve_stored(
        self,
        client: ClientSide,
        method: bytes,
        request_headers: list[Header],
        entry: Entry,
        stats: ExchangeStats,
        cache_status: bytes,
    ) -> bool:
        """Send a stored response; False (nothing sent) when its body is gone from the store.

        The answer (status, fields, which bytes) is decided first, with no await in between, so
        the body is opened knowing what will be sent: a body of the memory tier goes out with
        the head in one write; a larger one to a client that can take it goes by sendfile(2)
        (``_send_file``); anything else is read in pieces (one hop opens the file and reads the
        first piece at the range's start)."""
        stored = entry.stored
        age = policy.current_age(stored, time.time())
        status = stored.status
        reason = entry.reason
        size = stored.body_size
        first, last = 0, size - 1
        headers: list[Header]
        send_body = method != b"HEAD"
        if policy.client_not_modified(request_headers, stored):
            status, reason = 304, b"Not Modified"
            headers = policy.not_modified_headers(stored.headers)
            headers = policy.merge_age_into_headers(headers, age)
            send_body = False
        else:
            headers = policy.merge_age_into_headers(
                [h for h in stored.headers if h[0].lower() not in _FRAMING], age
            )
            byte_range = policy.maybe_single_range(request_headers, stored, method=method)
            length = size
            if byte_range is policy.UNSATISFIABLE:
                status, reason = 416, reason_phrase(416)
                headers = [(b"Content-Range", b"bytes */%d" % size)] + [
                    h for h in headers if h[0].lower() == b"date"
                ]
                send_body = False
                length = 0
            elif byte_range is not None and status == 200:
                first, last = byte_range.first, byte_range.last
                status, reason = 206, reason_phrase(206)
                headers.append((b"Content-Range", b"bytes %d-%d/%d" % (first, last, size)))
                length = last - first + 1
            headers.append((b"Content-Length", b"%d" % length))
        count = last + 1 - first
        sendfile: SendFile | None = None
        if send_body and count >= SENDFILE_MIN:
            sendfile = getattr(client, "sendfile", None)  # not on a background request's client
        reader: BodyReader | None = None
        if method != b"HEAD":
            # A GET opens the body even for a 304 or 416: a body gone from the store means
            # the entry is gone, and the request is fetched instead.
            reader = await self.store.open_body(
                entry, offset=first, length=count, read_ahead=send_body and sendfile is None
            )
            if reader is None:
                return False
        try:
            cached = reader.cached() if send_body and reader is not None else None
            self._add_ours(headers, cache_status, client)
            stats.status = status
            stats.upstream = "cache"
            if client.fast_head is not None and (cached is not None or not send_body):
                # A request http.fastpath parsed (a plain GET from an HTTP/1.1 keep-alive client)
                # answered in one write: the bytes h11 would write, without h11 (which has not
                # seen the request either; see client.ClientConnection.h11).
                body = b""
                if cached is not None:
                    body = cached[first : last + 1] if count != size else cached
                await client.send(
                    fastpath.response_head(status, reason, headers) + body, self.idle_timeout
                )
                client.fast_head = None
                stats.head_sent = True
                if body:
                    stats.bytes_out += len(body)
                    self.metrics.cache_served_bytes.inc(len(body))
                self.store.touch(entry)
                return True
            cc = client.h11
            _consume_request_end(cc)
            out = cc.send(
                h11.Response(status_code=status, headers=headers, reason=reason, _parsed=True)
            )
            if not send_body or reader is None:
                out += cc.send(h11.EndOfMessage())
                await client.send(out, self.idle_timeout)
                stats.head_sent = True
                self.store.touch(entry)
                return True
            if cached is not None:
                body = cached[first : last + 1] if count != size else cached
                out += cc.send(h11.Data(data=body)) if body else b""
                out += cc.send(h11.EndOfMessage())
                await client.send(out, self.idle_timeout)
                stats.head_sent = True
                stats.bytes_out += len(body)
                self.metrics.cache_served_bytes.inc(len(body))
                self.store.touch(entry)
                return True
            fd = reader.fileno()
            if sendfile is not None and fd >= 0:
                await self._send_file(client, sendfile, reader, fd, out, first, count, stats)
                self.store.touch(entry)
                return True
            await client.send(out, self.idle_timeout)
            stats.head_sent = True
            offset = first
            end = last + 1
            while offset < end:
                data = await _read_stored(reader, offset, end - offset)
                offset += len(data)
                stats.bytes_out += len(data)
                self.metrics.cache_served_bytes.inc(len(data))
                await client.send(cc.send(h11.Data(data=data)), self.idle_timeout)
            await client.send(cc.send(h11.EndOfMessage()), self.idle_timeout)
            self.store.touch(entry)
            return True
        finally:
            # Only a reader holding a descriptor has anything to release (a body from memory
            # has not): a hit from the memory tier pays for no cancel scope here.
            if reader is not None and reader.fileno() >= 0:
                with trio.CancelScope(shield=True):
                    await reader.aclose()

    async def _send_file(
        self,
        client: ClientSide,
        sendfile: SendFile,
        reader: BodyReader,
        fd: int,
        head: bytes,
        offset: int,
        count: int,
        stats: ExchangeStats,
    ) -> None:
        """The head, then ``count`` bytes of the body file from ``offset`` by sendfile(2).

        h11 frames the body without seeing it: a ``Data`` event whose data is a ``_FileSpan``
        (an object whose ``len()`` is ``count``) goes through ``send_with_data_passthrough``,
        which checks it against Content-Length, moves h11's state on and hands the very object
        back in the list of things to write (h11's documented sendfile support: its writers
        only ever call ``len()`` on such data and pass it on). So h11 stays right about the
        message -- EndOfMessage checks the count, and the connection's next cycle starts as
        after any response -- with no private h11 state touched. The span's bytes are then sent
        by sendfile(2); if the kernel refuses it for this file or socket (no error from the
        client's side: EINVAL, ENOSYS, a stream that is not a plain socket), the rest is read
        and written as plain bytes, which h11 has already counted."""
        cc = client.h11
        span = cast(bytes, _FileSpan(count))  # typed as h11 types Data.data; only len() is used
        parts = cc.send_with_data_passthrough(h11.Data(data=span))
        assert parts is not None
        pending = head
        timeout = self.idle_timeout
        served = self.metrics.cache_served_bytes
        end = offset + count
        for part in parts:
            if part is not span:  # framing around the data (none with Content-Length)
                pending += part
                continue
            await client.send(pending, timeout)
            stats.head_sent = True
            pending = b""
            self.sendfile_responses += 1
            while offset < end:
                try:
                    sent = await sendfile(fd, offset, end - offset, timeout)
                except OSError as exc:
                    log.debug("sendfile(2) refused (%s): the body is read and written instead", exc)
                    break
                if sent == 0:
                    raise ResponseAborted(
                        "http_response_incomplete", "the stored body is shorter than recorded"
                    )
                offset += sent
                self.sendfile_bytes += sent
                stats.bytes_out += sent
                served.inc(sent)
            while offset < end:  # the fallback: plain bytes, already counted by h11
                data = await _read_stored(reader, offset, end - offset)
                offset += len(data)
                stats.bytes_out += len(data)
                served.inc(len(data))
                await client.send(data, timeout)
        pending += cc.send(h11.EndOfMessage())  # b"" with Content-Length: h11 checks the count
        if pending:
            await client.send(pending, timeout)
        stats.head_sent = True

    def _add_ours(self, headers: list[Header], cache_status: bytes, client: ClientSide) -> None:
        via = self.via(b"1.1")
        if via is not None:
            headers.append((b"Via", via))
        headers.append((b"Cache-Status", cache_status))
        if client.is_closing():
            headers.append((b"Connection", b"close"))

    async def _respond_simple(
        self,
        client: ClientSide,
        stats: ExchangeStats,
        status: int,
        body: bytes,
        cache_status: bytes,
        method: bytes,
    ) -> None:
        cc = client.h11
        _consume_request_end(cc)
        headers: list[Header] = [
            (b"Content-Type", b"text/plain; charset=utf-8"),
            (b"Content-Length", b"%d" % len(body)),
            (b"Cache-Control", b"no-store"),
        ]
        self._add_ours(headers, cache_status, client)
        out = cc.send(
            h11.Response(
                status_code=status, headers=headers, reason=reason_phrase(status), _parsed=True
            )
        )
        if method != b"HEAD":
            out += cc.send(h11.Data(data=body))
        out += cc.send(h11.EndOfMessage())
        stats.status = status
        stats.upstream = "cache"
        await client.send(out, self.idle_timeout)
        stats.head_sent = True


_CONDITIONALS: Final = frozenset({b"if-none-match", b"if-modified-since"})


class _Tap:
    """Sees the origin's final response head for a GET/HEAD going through the cache."""

    def __init__(
        self,
        cache: HttpCache,
        method: bytes,
        request_headers: list[Header],
        key: str,
        entries: list[Entry],
        decision: Decision,
        revalidating: bool,
        flight: Flight | None,
    ) -> None:
        self.cache = cache
        self.method = method
        self.request_headers = request_headers
        self.key = key
        self.entries = entries
        self.decision = decision
        self.revalidating = revalidating
        self.flight = flight
        self.request_time = time.time()
        self.response_time = 0.0
        self.status = 0
        self.raw_headers: list[Header] = []
        self.upstream_fields: list[Header] = []
        self.verdict = ""
        self.responded = False
        self.background = False
        self.sink: _StoreSink | None = None

    async def on_response(
        self, response: h11.Response, client_headers: list[Header]
    ) -> BodySink | Consume | None:
        cache = self.cache
        self.response_time = now = time.time()
        status = self.status = response.status_code
        raw = self.raw_headers = list(response.headers.raw_items())
        decision = self.decision
        flight = self.flight
        if self.revalidating and status == 304:
            self.verdict = "not-modified"
            return CONSUME
        stale = _entry_of(self.entries, decision.stored)
        if (
            stale is not None
            and policy.is_error_status_for_stale(status)
            and policy.stale_if_error_allows(
                stale.stored, self.request_headers, now, cache.settings
            )
        ):
            self.verdict = "stale-error"
            if flight is not None:
                flight.publish(Outcome.UNSHAREABLE)
            return CONSUME
        self.responded = True
        if self.background:
            self.verdict = "background"
        fwd = decision.fwd or "miss"
        reason = (
            policy.storable(self.method, self.request_headers, status, raw)
            if self.method == b"GET"
            else policy.NotStorable.METHOD
        )
        writer: BodyWriter | None = None
        if reason is None:
            end_to_end = prepare_response(raw, via=None)
            stored_headers = policy.headers_to_store(end_to_end)
            variant = policy.vary_key(raw, self.request_headers)
            expected = _content_length(raw)
            try:
                writer = await cache.store.begin(
                    self.key,
                    variant,
                    status,
                    response.reason,
                    stored_headers,
                    self.request_time,
                    now,
                    expected,
                )
            except StoreError as exc:
                cache.metrics.cache_store_errors.inc()
                log.warning("cannot store %s: %s", self.key, exc)
                writer = None
            if writer is not None:
                self.sink = _StoreSink(cache, writer, flight, self.key)
                if flight is not None:
                    flight.writer = writer
                    flight.publish(
                        Outcome.STREAMING,
                        SharedHead(
                            status=status,
                            reason=response.reason,
                            headers=tuple(stored_headers),
                            variant=variant,
                            request_time=self.request_time,
                            response_time=now,
                        ),
                    )
        if writer is None and flight is not None:
            flight.publish(Outcome.UNSHAREABLE)
        if self.method == b"GET" and _is_plain(self.request_headers):
            cache.remember_shareable(self.key, writer is not None)
        if self.verdict != "background":
            if reason is None:
                cache._miss.inc()
            else:
                cache._uncacheable.inc()
        client_headers.append(
            (
                b"Cache-Status",
                policy.cache_status(
                    cache.name,
                    fwd=fwd,
                    fwd_status=status,
                    stored=writer is not None,
                    detail=reason.value if reason is not None else "",
                ),
            )
        )
        return self.sink

    async def close(self) -> None:
        if self.sink is not None:
            with trio.CancelScope(shield=True):
                await self.sink.close()


class _StoreSink:
    """Copies a response body into the store while it is relayed (and feeds followers)."""

    def __init__(
        self, cache: HttpCache, writer: BodyWriter, flight: Flight | None, key: str
    ) -> None:
        self.cache = cache
        self.writer = writer
        self.flight = flight
        self.key = key
        self.started = trio.current_time()
        self.failed = False
        self.finished = False

    async def write(self, data: bytes) -> None:
        if self.failed:
            return
        try:
            await self.writer.write(bytes(data))
        except StoreError as exc:
            await self._fail(exc)
            return
        if self.flight is not None:
            self.flight.progressed()

    async def end(self) -> None:
        if self.failed or self.finished:
            return
        self.finished = True
        if self.cache.invalidated_since(self.key, self.started):
            # An unsafe method or a PURGE invalidated the key while this body was on its way.
            with trio.CancelScope(shield=True):
                await self.writer.abort()
            if self.flight is not None:
                self.flight.end_body(complete=True)  # followers have every byte: let them finish
            return
        try:
            entry = await self.writer.commit()
        except StoreError as exc:
            await self._fail(exc)
            return
        if entry is not None:
            self.cache.metrics.cache_stored.inc()
        if self.flight is not None:
            self.flight.end_body(complete=True)

    def wants_body_without_client(self) -> bool:
        return not self.failed and self.flight is not None and self.flight.followers > 0

    async def _fail(self, exc: StoreError) -> None:
        self.failed = True
        self.cache.metrics.cache_store_errors.inc()
        log.warning("storing %s failed, relaying without storing: %s", self.writer, exc)
        with trio.CancelScope(shield=True):
            await self.writer.abort()
        if self.flight is not None:
            self.flight.end_body(complete=False)

    async def close(self) -> None:
        """The exchange ended: a body that did not end is not kept."""
        if not self.finished and not self.failed:
            self.failed = True
            await self.writer.abort()
            if self.flight is not None:
                self.flight.end_body(complete=False)


class _UnsafeTap:
    """Invalidates on the answer to an unsafe method (§4.4), before the client sees it."""

    def __init__(self, cache: HttpCache, method: bytes, target: Target) -> None:
        self.cache = cache
        self.method = method
        self.target = target

    async def on_response(
        self, response: h11.Response, client_headers: list[Header]
    ) -> BodySink | Consume | None:
        status = response.status_code
        cache = self.cache
        if policy.invalidates(self.method, status):
            target = self.target
            key = policy.cache_key(target.scheme, target.authority, target.path)
            keys = policy.invalidation_keys(
                key, target.scheme, target.authority, list(response.headers.raw_items())
            )
            with trio.CancelScope(shield=True):
                await cache._invalidate(keys, "unsafe_method")
        client_headers.append(
            (b"Cache-Status", policy.cache_status(cache.name, fwd="method", fwd_status=status))
        )
        return None


# --- small helpers ------------------------------------------------------------------------------


def _entry_of(entries: list[Entry], stored: Stored | None) -> Entry | None:
    if stored is None:
        return None
    for entry in entries:
        if entry.stored is stored:
            return entry
    return None


def _with_stored(
    entry: Entry, headers: list[Header], request_time: float, response_time: float
) -> Entry:
    from dataclasses import replace

    return replace(
        entry,
        stored=replace(
            entry.stored,
            headers=tuple(headers),
            request_time=request_time,
            response_time=response_time,
        ),
    )


def _must_revalidate(stored: Stored) -> bool:
    cc = policy.parse_cache_control(stored.headers)
    return cc.must_revalidate or cc.proxy_revalidate or cc.s_maxage is not None


def _status_hit(cache: HttpCache, decision: Decision) -> bytes:
    return policy.cache_status(cache.name, hit=True, ttl=decision.ttl)


def _content_length(headers: list[Header]) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _read_stored(reader: BodyReader, offset: int, remaining: int) -> bytes:
    """The next piece of a stored body (at most READ_CHUNK); never empty."""
    try:
        data = await reader.read(offset, min(remaining, READ_CHUNK))
    except StoreError as exc:
        raise ResponseAborted(
            "http_response_incomplete", f"reading the stored body failed: {exc}"
        ) from None
    if not data:
        raise ResponseAborted(
            "http_response_incomplete", "the stored body is shorter than recorded"
        )
    return data


class _FileSpan:
    """What h11 sees of a body sent by sendfile(2): only its length (see ``_send_file``)."""

    __slots__ = ("_length",)

    def __init__(self, length: int) -> None:
        self._length = length

    def __len__(self) -> int:
        return self._length


# --- zero-copy sending ---------------------------------------------------------------------------

#: errno values of sendfile(2) that say the client's end of the connection is gone.
_PEER_GONE: Final = frozenset(
    {
        errno.EPIPE,
        errno.ECONNRESET,
        errno.ENOTCONN,
        errno.ECONNABORTED,
        errno.ESHUTDOWN,
        errno.ETIMEDOUT,
    }
)


def _sendfile_some(out_fd: int, in_fd: int, offset: int, count: int) -> int:
    """In a worker thread: sendfile(2) until ``count`` bytes went, the (non-blocking) socket is
    full, or the file ends; how many bytes went (0: the file ends at ``offset``).

    An error (a full socket included) is raised only when nothing went; after some progress
    the progress is returned and the next call meets the error again, so every byte sent is
    counted exactly."""
    sent = 0
    while sent < count:
        try:
            n = os.sendfile(out_fd, in_fd, offset + sent, count - sent)
        except OSError:
            if sent:
                return sent
            raise
        if n == 0:
            break
        sent += n
    return sent


async def sendfile_to_socket(
    sock: trio.socket.SocketType, fd: int, offset: int, count: int, timeout: float
) -> int:
    """Send up to ``count`` bytes of file ``fd`` from ``offset`` to a connected trio socket with
    sendfile(2): page-cache pages go to the socket with no copy through Python. Returns how
    many bytes went (at least one; 0 when the file ends at ``offset``).

    The syscall runs in a worker thread, at most SENDFILE_HOP bytes per hop: it may have to
    read the disk, and the event loop never touches the disk (cache/store.py). The socket is
    trio's, non-blocking: when it is full (EAGAIN) the loop waits until it is writable, at most
    ``timeout`` in all (the client stopped reading: ClientGone, as ``ClientConnection.send``
    says it). A client that went away is ClientGone too; any other OSError (sendfile(2) not
    possible for this file, a read error) is raised as it is, for the caller to fall back."""
    with trio.CancelScope(deadline=trio.current_time() + timeout):
        while True:
            try:
                return await trio.to_thread.run_sync(
                    _sendfile_some, sock.fileno(), fd, offset, min(count, SENDFILE_HOP)
                )
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
            except OSError as exc:
                if exc.errno in _PEER_GONE:
                    raise ClientGone("the client went away") from exc
                raise
    raise ClientGone(f"the client did not read for {timeout:g}s")


def _consume_request_end(cc: h11.Connection) -> None:
    """The request (GET/HEAD without a body) is answered here: read its end from h11."""
    if cc.their_state is h11.SEND_BODY:
        event = cc.next_event()
        if type(event) is not h11.EndOfMessage:
            raise ProxydError("a cacheable request unexpectedly carried a body")


def _is_plain(request_headers: list[Header]) -> bool:
    """No range, precondition or credentials: any other plain GET would get the same answer."""
    for name, value in request_headers:
        lowered = name.lower()
        if lowered in _PERSONAL_FIELDS:
            return False
        if lowered == b"cache-control" and b"no-store" in value.lower():
            return False
    return True


__all__ = ["HttpCache", "RevalidationFailed", "sendfile_to_socket"]

"""The router the client asks for a route list: static rules or PAC, then the bad-proxy order.

``Router`` is the trio shell around the pure pieces (static.py, failover.py, pac/script.py,
pac/cache.py) and the PAC evaluator (pac/evaluator.py). Its life:

* ``Router(config.routing, resolve=resolver.resolve, metrics=metrics, ...)`` compiles the static
  rules (a bad pattern or route raises ``PatternError`` / ``RouteSyntaxError`` here, at start-up).
* ``await nursery.start(router.run)``: in static mode it reports started and sleeps. In PAC mode
  (``routing.pac.url`` set) it starts the PAC worker thread, fetches and compiles the script --
  raising ``PacLoadError`` *before* ``started()`` when that fails, so the daemon refuses to start
  on a broken script -- and then refreshes it every ``pac.refresh`` seconds until cancelled. A
  refresh that fails to fetch or compile is logged and counted (``pac_loads{outcome="error"}``)
  and the last good script stays; the same text again counts ``unchanged``; a new one replaces
  the script and empties the result cache. ``refresh()`` is public for a reload signal.
* ``await router.reconfigure(config.routing, dns_timeout=..., dns_ttl=...)`` applies a reloaded
  routing section to the decisions that start after it. The static rules, bypass list, fallback
  and bad-proxy TTL are swapped; a new PAC *loader* (another ``pac.url``, or another engine
  setting: ``timeout``, ``memory_limit``, the DNS timeout) is started and its script fetched and
  compiled *before* anything is swapped, so a source that cannot be loaded raises
  ``PacLoadError`` and the router keeps everything it had (the reload is refused). With the same
  loader the script is fetched again (``refresh``: a SIGHUP after editing the PAC file picks it
  up; a failure keeps the loaded script). The refresh loop restarts with the new ``pac.refresh``.
  An evaluator that is replaced while evaluations still run on it is retired: it is closed when
  the last of them ends, so no decision in flight falls back because of a reload.
* ``await router.decide(scheme, host, port, url)`` returns the route list for one request:

  1. static mode: ``StaticRouter.decide`` (bypass, rules, default) -- source ``static``;
  2. PAC mode: a ``bypass`` match is DIRECT (source ``static``); otherwise the cached result when
     the script is cacheable (pac/script.py), else an evaluation: ``FindProxyForURL(url, host)``
     with the URL cut to its origin for https/wss (Chromium), the wall-clock time and zone for the
     date helpers, and DNS answered through ``resolve``. The result string is parsed leniently
     (``parse_pac_result``: bad entries are skipped and logged) -- source ``pac``. An evaluation
     that fails (script error, ``pac.timeout``, ``pac.memory_limit``, a non-string or an empty
     result) follows ``pac.fallback``: ``DIRECT`` (source ``fallback``) or ``PacFailed`` (502
     ``proxy_configuration_error``);
  3. proxies on the bad-proxy list move to the end (``BadProxyList.order``).

* ``router.report_failure(route)`` is what the client calls when a hop failed and it moves on to
  the next route: it counts ``failovers{route_kind}`` and marks a proxy bad for
  ``bad_proxy_ttl`` (``bad_proxies.mark_bad`` directly works too). ``stats()`` is a snapshot for
  the admin status page.

Clocks: the bad-proxy list and the cache use ``trio.current_time()``; the PAC date helpers use
``wall_clock()`` (``time.time``) and ``timezone`` (None: the system's local zone), both injectable
for tests. Evaluation failures are logged at most once per ``LOG_INTERVAL`` per kind.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Literal

import trio
from prometheus_client import Counter

from proxyd.config import PacConfig, RoutingConfig
from proxyd.observe.metrics import Metrics, fast_inc
from proxyd.routing.errors import PacFailed, PacLoadError
from proxyd.routing.failover import BadProxyList
from proxyd.routing.pac.cache import LruCache
from proxyd.routing.pac.engine import PacEvalError
from proxyd.routing.pac.evaluator import PacEvaluator
from proxyd.routing.pac.fetch import PacFetchError, load_source
from proxyd.routing.pac.script import ScriptFacts, analyze, script_url
from proxyd.routing.patterns import normalize_host
from proxyd.routing.static import StaticRouter
from proxyd.upstream.route import ALL_DIRECT, Direct, Route, RouteList, parse_pac_result, route_kind

logger = logging.getLogger(__name__)

Resolve = Callable[[str], Awaitable[list[str]]]
RoutingMode = Literal["static", "pac"]
DecisionSource = Literal["static", "pac", "fallback"]
LOG_INTERVAL = 10.0
CacheKey = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RouterStats:
    mode: RoutingMode
    pac_source: str | None
    pac_version: str | None
    pac_entry: str | None
    pac_cacheable: bool
    pac_loaded_at: float | None  # wall-clock seconds of the last successful (re)load
    pac_last_error: str | None  # the last load or refresh failure, None after a good load
    cache_entries: int
    bad_proxies: tuple[tuple[str, float], ...]  # (label, seconds left)


class Router:
    def __init__(
        self,
        config: RoutingConfig,
        *,
        resolve: Resolve,
        metrics: Metrics | None = None,
        dns_timeout: float = 5.0,
        dns_ttl: float = 60.0,
        fetch_timeout: float = 30.0,
        wall_clock: Callable[[], float] = time.time,
        timezone: tzinfo | None = None,
        local_addresses: Sequence[str] | None = None,
    ) -> None:
        self.config = config
        self.static = StaticRouter(config)
        self.bad_proxies = BadProxyList(config.bad_proxy_ttl)
        self.mode: RoutingMode = "pac" if config.pac.url else "static"
        self._pac = config.pac
        self._resolve = resolve
        self._metrics = metrics
        self._dns_timeout = dns_timeout
        self._dns_ttl = dns_ttl
        self._fetch_timeout = fetch_timeout
        self._wall_clock = wall_clock
        self._timezone = timezone
        self._local_addresses = local_addresses
        self._cache: LruCache[CacheKey, RouteList] = LruCache(config.pac.cache_size)
        self._evaluator: PacEvaluator | None = None
        self._facts: ScriptFacts | None = None
        self._entry: str | None = None
        self._loaded_at: float | None = None
        self._last_error: str | None = None
        self._last_logged: dict[str, float] = {}
        self._decision_counters: dict[tuple[str, str], Counter] = {}
        # The counter of the last decision, by the identity of its route list (a static list
        # lives as long as its StaticRouter): most requests repeat it, and skip the key.
        self._last_counted: tuple[RouteList, str, Callable[[float], None]] | None = None
        # Reload support: the nursery of run(), the refresh loop's scope, and evaluators that
        # were replaced while evaluations still ran on them (closed when the last one ends).
        self._nursery: trio.Nursery | None = None
        self._refresh_scope: trio.CancelScope | None = None
        self._in_use: dict[PacEvaluator, int] = {}
        self._retiring: set[PacEvaluator] = set()

    # --- life ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            if self.mode == "pac":
                # Loaded before the nursery opens, so a PacLoadError reaches the caller as itself
                # (a nursery would wrap it in an exception group).
                evaluator = self._new_evaluator(self._pac, self._dns_timeout)
                try:
                    await evaluator.start()
                    self._evaluator = evaluator
                    await self._load()
                except BaseException:
                    self._evaluator = None
                    evaluator.close()
                    raise
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._restart_refresh_loop()
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            evaluator_now, self._evaluator = self._evaluator, None
            for retired in (evaluator_now, *self._retiring):
                if retired is not None:
                    retired.close()
            self._retiring.clear()

    def _new_evaluator(self, pac: PacConfig, dns_timeout: float) -> PacEvaluator:
        return PacEvaluator(
            timeout=pac.timeout,
            memory_limit=pac.memory_limit,
            resolve=self._resolve,
            dns_timeout=dns_timeout,
            local_addresses=self._local_addresses,
        )

    def _restart_refresh_loop(self) -> None:
        """Cancel the refresh loop (if any) and start one for the current PAC settings."""
        if self._refresh_scope is not None:
            self._refresh_scope.cancel()
            self._refresh_scope = None
        if self.mode == "pac" and self._nursery is not None:
            scope = self._refresh_scope = trio.CancelScope()
            self._nursery.start_soon(self._refresh_loop, scope, self._pac.refresh)

    async def _refresh_loop(self, scope: trio.CancelScope, interval: float) -> None:
        with scope:
            while True:
                await trio.sleep(interval)
                await self.refresh()

    async def reconfigure(
        self,
        config: RoutingConfig,
        *,
        dns_timeout: float | None = None,
        dns_ttl: float | None = None,
    ) -> None:
        """Apply a reloaded routing section (see the module docstring); call while ``run`` runs.

        Raises ``PacLoadError`` when a new PAC source cannot be loaded; nothing changes then."""
        if self._nursery is None:
            raise RuntimeError("the router is not running")
        static = StaticRouter(config)
        pac = config.pac
        new_dns_timeout = self._dns_timeout if dns_timeout is None else dns_timeout
        new_loader = pac.url is not None and (
            self._evaluator is None
            or _loader_key(pac, new_dns_timeout) != _loader_key(self._pac, self._dns_timeout)
        )
        evaluator: PacEvaluator | None = None
        loaded: tuple[ScriptFacts, str] | None = None
        if new_loader:
            evaluator = self._new_evaluator(pac, new_dns_timeout)
            try:
                await evaluator.start()
                loaded = await self._fetch_and_compile(pac, evaluator, None)
            except BaseException:
                evaluator.close()
                raise
        # From here on no await until the swap is complete: decide() sees old or new, never both.
        previous = self._evaluator
        same_loader = pac.url is not None and not new_loader
        self.config = config
        self.static = static
        self.bad_proxies.ttl = config.bad_proxy_ttl
        self._dns_timeout = new_dns_timeout
        if dns_ttl is not None:
            self._dns_ttl = dns_ttl
        if pac.cache_size != self._pac.cache_size:
            self._cache = LruCache(pac.cache_size)
        self._pac = pac
        self.mode = "pac" if pac.url else "static"
        if not same_loader:
            self._evaluator = evaluator
            self._facts = self._entry = None
            self._cache.clear()
            if previous is not None:
                self._retire(previous)
            if evaluator is not None and loaded is not None:
                self._install(pac, *loaded)
        self._restart_refresh_loop()
        if same_loader:
            await self.refresh()  # the same source, perhaps edited: fetch it again

    def _retire(self, evaluator: PacEvaluator) -> None:
        if self._in_use.get(evaluator):
            self._retiring.add(evaluator)
        else:
            evaluator.close()

    def _done_with(self, evaluator: PacEvaluator) -> None:
        left = self._in_use[evaluator] - 1
        if left:
            self._in_use[evaluator] = left
            return
        del self._in_use[evaluator]
        if evaluator in self._retiring:
            self._retiring.discard(evaluator)
            evaluator.close()

    async def refresh(self) -> bool:
        """Fetch the script again; True when a new version was installed. Never raises."""
        try:
            return await self._load()
        except PacLoadError as exc:
            logger.warning("PAC refresh failed, keeping version %s: %s", self._version, exc.message)
            return False

    @property
    def _version(self) -> str | None:
        return self._facts.version if self._facts is not None else None

    async def _load(self) -> bool:
        evaluator = self._evaluator
        if self._pac.url is None or evaluator is None:
            return False
        loaded = await self._fetch_and_compile(self._pac, evaluator, self._facts)
        if loaded is None:
            return False
        self._install(self._pac, *loaded)
        return True

    async def _fetch_and_compile(
        self, pac: PacConfig, evaluator: PacEvaluator, current: ScriptFacts | None
    ) -> tuple[ScriptFacts, str] | None:
        """Fetch ``pac.url`` and compile it on ``evaluator``: the script's facts and entry
        point, or None when the text is ``current``'s version (counted ``unchanged``). A failure
        is counted and remembered, and raised as ``PacLoadError``."""
        location = pac.url
        assert location is not None
        try:
            try:
                with trio.fail_after(self._fetch_timeout):
                    source = await load_source(location, resolve=self._resolve)
            except PacFetchError as exc:
                raise PacLoadError(f"PAC script {location}: {exc}") from None
            except trio.TooSlowError:
                raise PacLoadError(
                    f"PAC script {location}: not fetched within {self._fetch_timeout:g} s"
                ) from None
            facts = analyze(source)
            if current is not None and facts.version == current.version:
                self._count_load("unchanged")
                self._last_error = None
                return None
            entry = await evaluator.load(source, location)
        except PacLoadError as exc:
            # At start-up the caller (run) lets it propagate; refresh() logs it and carries on;
            # reconfigure() lets it propagate and the reload is refused.
            self._count_load("error")
            self._last_error = exc.message
            raise
        return facts, entry

    def _install(self, pac: PacConfig, facts: ScriptFacts, entry: str) -> None:
        self._facts, self._entry = facts, entry
        self._cache.clear()
        self._loaded_at = self._wall_clock()
        self._last_error = None
        self._count_load("ok")
        logger.info(
            "PAC script %s loaded: version %s, %d characters, %s, results %s",
            pac.url,
            facts.version,
            facts.size,
            entry,
            "cached" if facts.cacheable and pac.cache_size else "not cached",
        )

    # --- decisions -----------------------------------------------------------------------

    async def decide(self, scheme: str, host: str, port: int, url: str) -> RouteList:
        """The route list for one request, best first (see the module docstring)."""
        routes = self.decide_static(host, port)
        if routes is not None:
            return routes
        now = trio.current_time()
        source: DecisionSource
        if self.static.is_bypassed(host, port):
            routes, source = ALL_DIRECT, "static"
        else:
            routes, source = await self._decide_pac(scheme, host, port, url, now)
        self._count_decision(routes, source)
        return self.bad_proxies.order(routes, now)

    def decide_static(self, host: str, port: int) -> RouteList | None:
        """``decide`` in static mode, which needs no await (the client's per-request path calls
        it directly); None in PAC mode. Counted like ``decide``."""
        if self.mode != "static":
            return None
        static = self.static
        # No bypass list and no rules (the default): the default list, without parsing the host
        # (RequestHost.parse tries it as an IP literal, a cost on every request). The scheme is
        # not matched on (static.py).
        if not static.rules and not static.bypass:
            routes = static.default
        else:
            routes = static.decide("", host, port)
        self._count_decision(routes, "static")
        if len(routes) > 1:  # a single route is first whatever the bad-proxy list says
            routes = self.bad_proxies.order(routes, trio.current_time())
        return routes

    async def _decide_pac(
        self, scheme: str, host: str, port: int, url: str, now: float
    ) -> tuple[RouteList, DecisionSource]:
        facts, evaluator = self._facts, self._evaluator
        if facts is None or evaluator is None:
            return self._fallback("no PAC script is loaded")
        scheme = scheme.lower()
        name = normalize_host(host)
        given_url = script_url(scheme, name, port, url)
        key: CacheKey = (
            (facts.version, given_url) if facts.uses_url else (facts.version, scheme, name)
        )
        cacheable = facts.cacheable
        if cacheable:
            hit = self._cache.get(key, now)
            if hit is not None:
                self._count_evaluation("cached")
                return hit, "pac"
        wall = self._wall_clock()
        offset = self._utc_offset_minutes(wall) if facts.time_dependent else 0.0
        started = time.perf_counter()
        self._in_use[evaluator] = self._in_use.get(evaluator, 0) + 1  # see _retire
        try:
            answer = await evaluator.find_proxy(given_url, name, wall, offset)
        except PacEvalError as exc:
            self._observe_duration(started)
            self._count_evaluation(exc.kind)
            self._log_throttled(exc.kind, now, "PAC evaluation failed (%s): %s", exc.kind, exc)
            return self._fallback(f"PAC evaluation failed: {exc.message}")
        finally:
            self._done_with(evaluator)
        self._observe_duration(started)
        for alert in answer.alerts:
            logger.debug("PAC alert: %s", alert)
        routes, problems = parse_pac_result(answer.result)
        if problems:
            self._log_throttled("entry", now, "PAC result: skipped %s", redact("; ".join(problems)))
        if not routes:
            self._count_evaluation("error")
            shown = redact(answer.result)
            self._log_throttled("empty", now, "PAC result %r has no usable entry", shown)
            return self._fallback(f"the PAC result {shown!r} has no usable entry")
        self._count_evaluation("ok")
        if cacheable and self._facts is facts:
            self._cache.put(key, routes, now, self._dns_ttl if answer.used_dns else None)
        return routes, "pac"

    def _fallback(self, detail: str) -> tuple[RouteList, DecisionSource]:
        if self._pac.fallback == "error":
            raise PacFailed(detail)
        return ALL_DIRECT, "fallback"

    def _utc_offset_minutes(self, wall: float) -> float:
        moment = (
            datetime.fromtimestamp(wall, self._timezone)
            if self._timezone is not None
            else datetime.fromtimestamp(wall).astimezone()
        )
        offset = moment.utcoffset()
        return offset.total_seconds() / 60.0 if offset is not None else 0.0

    # --- failover ------------------------------------------------------------------------

    def report_failure(self, route: Route) -> None:
        """A hop through ``route`` failed and the request moves on: count it, mark the proxy."""
        if self._metrics is not None:
            self._metrics.failovers.labels(route_kind(route)).inc()
        if not isinstance(route, Direct):
            self.bad_proxies.mark_bad(route.label, trio.current_time())

    # --- observation ---------------------------------------------------------------------

    def stats(self) -> RouterStats:
        facts = self._facts
        return RouterStats(
            mode=self.mode,
            pac_source=self._pac.url,
            pac_version=facts.version if facts is not None else None,
            pac_entry=self._entry,
            pac_cacheable=bool(facts is not None and facts.cacheable and self._pac.cache_size),
            pac_loaded_at=self._loaded_at,
            pac_last_error=self._last_error,
            cache_entries=len(self._cache),
            bad_proxies=tuple(self.bad_proxies.snapshot(_now_or_zero())),
        )

    def _count_decision(self, routes: RouteList, source: str) -> None:
        if self._metrics is None:
            return
        last = self._last_counted
        if last is not None and last[0] is routes and last[1] == source:
            last[2](1)
            return
        key = (route_kind(routes[0]) if routes else "direct", source)
        counter = self._decision_counters.get(key)
        if counter is None:
            counter = self._metrics.routing_decisions.labels(*key)
            self._decision_counters[key] = counter
        inc = fast_inc(counter)
        self._last_counted = (routes, source, inc)
        inc(1)

    def _count_evaluation(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.pac_evaluations.labels(outcome).inc()

    def _count_load(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.pac_loads.labels(outcome).inc()

    def _observe_duration(self, started: float) -> None:
        if self._metrics is not None:
            self._metrics.pac_evaluation_duration.observe(time.perf_counter() - started)

    def _log_throttled(self, kind: str, now: float, message: str, *args: object) -> None:
        last = self._last_logged.get(kind)
        if last is not None and now - last < LOG_INTERVAL:
            logger.debug(message, *args)
            return
        self._last_logged[kind] = now
        logger.warning(message, *args)


def _loader_key(pac: PacConfig, dns_timeout: float) -> tuple[object, ...]:
    """What a PAC evaluator is built from: a change means a new evaluator and a fresh load."""
    return (pac.url, pac.timeout, pac.memory_limit, dns_timeout)


def _now_or_zero() -> float:
    """``trio.current_time()`` inside a trio run; 0 outside (stats() may be called from a test)."""
    try:
        return trio.current_time()
    except RuntimeError:
        return 0.0


_USERINFO = re.compile(r"(//)[^/@\s;]*@")


def redact(text: str) -> str:
    """Strip user:password@ from proxy URLs before a PAC result reaches a log or a response."""
    return _USERINFO.sub(r"\1***@", text)

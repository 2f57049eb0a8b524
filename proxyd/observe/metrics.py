"""Every Prometheus metric proxyd exports, defined here and only here.

Names follow ``proxyd_<thing>_<unit>[_total]``; labels are bounded sets (a method from a fixed list
or ``OTHER``, a status class, an RFC 9209 error type, an outcome word), never a host or URL.
Each ``Metrics`` owns its own ``CollectorRegistry`` so several daemons can run in one process (the
tests do). Label children used on the per-request path are resolved once and cached in dicts: a
``labels()`` call costs a lock and a tuple build, a dict lookup does not. The per-request updates
(about eight a request) go through ``fast_inc`` / ``fast_observe``: the child's own value objects,
without ``Counter.inc`` / ``Histogram.observe``'s per-call checks and linear bucket scan (a child
is always observable, our amounts are never negative, and no exemplars are used) -- half the
Python calls, the same samples in files and scrapes alike. A finished request's updates are one
call, ``observe_exchange``, which with in-process values (one worker) adds to the value objects
in place, without a call per update (measured: ~3 % of the CPU of a proxied 1 KiB request).
Gauges that describe state owned elsewhere (the upstream pool) are read from ``stats()`` snapshots
at scrape time through a custom collector, so nothing on the hot path updates them.

Several worker processes (``workers: N``, see proxyd/workers.py)
    The supervisor starts each worker with ``PROMETHEUS_MULTIPROC_DIR`` set before anything imports
    prometheus_client, so in a worker every counter, histogram and gauge above keeps its value in
    a per-process mmap file in that directory. ``SupervisorMetrics`` (the supervisor's registry,
    the only one scraped) adds them up with ``MultiProcessCollector``: counters and histograms are
    summed (a dead worker's files stay, so totals never go back), and each gauge says how with its
    ``multiprocess_mode``: ``livesum`` for things open now (connections, tunnels, sessions: the
    supervisor calls ``mark_process_dead`` when a worker exits, which drops its live gauges),
    ``livemax`` for the config generation. ``Info`` is not supported there, so the supervisor
    exports ``proxyd_build`` itself. The scrape-time families (``add_stats_provider``: pool, DNS,
    cache, bad proxies) are custom collectors that no file holds: at each scrape the supervisor
    asks every live worker for them (``stats_exposition``, the private ``GET /metrics/stats``) and
    ``aggregate_stats`` adds them up, per family as ``STATS_AGGREGATION`` says (sum by default;
    max where every worker reports the same shared fact). They are as fresh as the scrape; a
    worker that does not answer within a second is left out of that scrape. With ``workers: 1``
    none of this is used: the daemon's own registry is the one scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Final, Literal, Protocol, cast

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.values import MutexValue

from proxyd import __version__

KNOWN_METHODS: Final = (
    "GET",
    "HEAD",
    "POST",
    "PUT",
    "DELETE",
    "OPTIONS",
    "TRACE",
    "PATCH",
    "CONNECT",
)
STATUS_CLASSES: Final = ("1xx", "2xx", "3xx", "4xx", "5xx")
_KNOWN_METHOD_SET: Final = frozenset(KNOWN_METHODS)
# Latency buckets from 0.5 ms (a loopback hit) to a minute (a slow origin).
LATENCY_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class _StatsCollector(Collector):
    """Reads gauges from ``stats()`` providers when Prometheus scrapes."""

    def __init__(self) -> None:
        self.providers: list[Callable[[], Iterator[Metric]]] = []

    def collect(self) -> Iterator[Metric]:
        for provider in self.providers:
            yield from provider()


# The *_created series double the exposition for no use to a proxy's dashboards.
disable_created_metrics()  # type: ignore[no-untyped-call]


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        _build_info(registry)
        self.client_connections_active = Gauge(
            "proxyd_client_connections_active",
            "Client connections open now",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.client_connections = Counter(
            "proxyd_client_connections_total",
            "Client connections accepted, by whether the ACL allowed them",
            ["allowed"],
            registry=registry,
        )
        self.requests = Counter(
            "proxyd_requests_total",
            "Requests answered (final responses), by method, status class, the kind of route that"
            " served them (none: answered by proxyd or its cache) and the cache result",
            ["method", "status_class", "route_kind", "cache"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "proxyd_request_duration_seconds",
            "Time from the request head to the last response byte",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.time_to_first_byte = Histogram(
            "proxyd_upstream_time_to_first_byte_seconds",
            "Time from sending the request upstream to the final response head",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.bytes = Counter(
            "proxyd_body_bytes_total",
            "Body bytes relayed, by direction (upload: client to origin)",
            ["direction"],
            registry=registry,
        )
        self.errors = Counter(
            "proxyd_errors_total",
            "Requests that failed, by RFC 9209 Proxy-Status error type",
            ["error_type"],
            registry=registry,
        )
        self.tunnels_active = Gauge(
            "proxyd_tunnels_active",
            "CONNECT tunnels open now",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.tunnels = Counter("proxyd_tunnels_total", "CONNECT tunnels opened", registry=registry)
        self.tunnel_bytes = Counter(
            "proxyd_tunnel_bytes_total",
            "Bytes relayed through CONNECT tunnels, by direction",
            ["direction"],
            registry=registry,
        )
        self.upstream_connects = Counter(
            "proxyd_upstream_connects_total",
            "Upstream connection attempts, by outcome (ok or an RFC 9209 error type)",
            ["outcome"],
            registry=registry,
        )
        self.upstream_connect_duration = Histogram(
            "proxyd_upstream_connect_duration_seconds",
            "Time to open a new upstream connection (DNS, TCP, TLS)",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_reuses = Counter(
            "proxyd_upstream_reused_total",
            "Requests sent on a reused keep-alive upstream connection",
            registry=registry,
        )
        self.upstream_retries = Counter(
            "proxyd_upstream_retries_total",
            "Requests retried on a fresh connection after a reused one failed before any byte",
            registry=registry,
        )
        # --- pools (gauges of current state come from pool stats() at scrape time) ---
        self.pool_waits = Counter(
            "proxyd_pool_waits_total",
            "Requests that had to wait for a pool slot (a limit was reached)",
            registry=registry,
        )
        self.pool_wait_duration = Histogram(
            "proxyd_pool_wait_seconds",
            "Time requests waited for a pool slot",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.pool_wait_timeouts = Counter(
            "proxyd_pool_wait_timeouts_total",
            "Requests that gave up waiting for a pool slot (503 connection_limit_reached)",
            registry=registry,
        )
        self.pool_closed = Counter(
            "proxyd_pool_closed_total",
            "Pooled idle connections closed, by reason (expired, readable, total_limit, drain)",
            ["reason"],
            registry=registry,
        )
        self.pool_drained = Counter(
            "proxyd_pool_drained_total",
            "Responses drained after the client left, by outcome (reused, closed)",
            ["outcome"],
            registry=registry,
        )
        # --- DNS ---
        self.dns_lookups = Counter(
            "proxyd_dns_lookups_total",
            "Host name lookups, by outcome (hit, miss, negative_hit, override, error, timeout)",
            ["outcome"],
            registry=registry,
        )
        self.dns_lookup_duration = Histogram(
            "proxyd_dns_lookup_duration_seconds",
            "Time of host name lookups that reached the system resolver",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        # --- routing ---
        self.routing_decisions = Counter(
            "proxyd_routing_decisions_total",
            "Routing decisions, by the kind of the first route (direct, http, https, socks5, ...)"
            " and source (static, pac, fallback)",
            ["route_kind", "source"],
            registry=registry,
        )
        self.pac_evaluations = Counter(
            "proxyd_pac_evaluations_total",
            "PAC FindProxyForURL evaluations, by outcome (ok, cached, error, timeout)",
            ["outcome"],
            registry=registry,
        )
        self.pac_evaluation_duration = Histogram(
            "proxyd_pac_evaluation_seconds",
            "Time of one PAC evaluation (not cached)",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.pac_loads = Counter(
            "proxyd_pac_loads_total",
            "PAC script loads and refreshes, by outcome (ok, unchanged, error)",
            ["outcome"],
            registry=registry,
        )
        self.failovers = Counter(
            "proxyd_failovers_total",
            "Times a request moved on to the next route after a hop failed, by failed route kind",
            ["route_kind"],
            registry=registry,
        )
        # --- cache (entries, bytes, evictions come from the store's stats() at scrape time) ---
        self.cache_lookups = Counter(
            "proxyd_cache_lookups_total",
            "Cache lookups, by result (hit, miss, stale_served, revalidated, uncacheable,"
            " only_if_cached_miss)",
            ["result"],
            registry=registry,
        )
        self.cache_served_bytes = Counter(
            "proxyd_cache_served_bytes_total",
            "Body bytes sent to clients from the cache",
            registry=registry,
        )
        self.cache_stored = Counter(
            "proxyd_cache_stored_total", "Responses written to the cache", registry=registry
        )
        self.cache_collapsed = Counter(
            "proxyd_cache_collapsed_total",
            "Requests that followed another request's fetch instead of going to the origin",
            registry=registry,
        )
        self.cache_store_errors = Counter(
            "proxyd_cache_store_errors_total",
            "Failures while storing (disk full, I/O errors); the response still reached the client",
            registry=registry,
        )
        self.cache_invalidations = Counter(
            "proxyd_cache_invalidations_total",
            "Stored responses removed, by cause (unsafe_method, purge, head_mismatch)",
            ["cause"],
            registry=registry,
        )
        self.cache_background_revalidations = Counter(
            "proxyd_cache_background_revalidations_total",
            "stale-while-revalidate refreshes started in the background",
            registry=registry,
        )
        # --- process (config generation and reloads: server.py, see proxyd/reload.py) ---
        self.config_generation = Gauge(
            "proxyd_config_generation",
            "Generation of the config in force: 1 at start-up, one more per applied reload",
            registry=registry,
            multiprocess_mode="livemax",  # workers: N (see the module docstring)
        )
        self.config_generation.set(1)
        self.config_reloads = Counter(
            "proxyd_config_reloads_total",
            "Config reloads (SIGHUP, POST /reload), by outcome (ok: applied; error: refused,"
            " the old config stays)",
            ["outcome"],
            registry=registry,
        )
        self.config_reloads_ok = self.config_reloads.labels("ok")
        self.config_reloads_error = self.config_reloads.labels("error")
        self.config_last_reload = Gauge(
            "proxyd_config_last_reload_timestamp_seconds",
            "When the config in force was loaded (start-up or the last applied reload), Unix time",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.config_last_reload.set_to_current_time()
        # --- websocket (owned by the websocket work; keep cache metrics above) ---
        self.ws_sessions_active = Gauge(
            "proxyd_websocket_sessions_active",
            "WebSocket sessions open now",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.ws_sessions = Counter(
            "proxyd_websocket_sessions_total",
            "WebSocket sessions ended, by outcome (clean, peer_vanished, protocol_error, too_big,"
            " timeout, drained, aborted)",
            ["outcome"],
            registry=registry,
        )
        self.ws_handshake_failures = Counter(
            "proxyd_websocket_handshake_failures_total",
            "WebSocket upgrades that did not become sessions, by reason (bad_request,"
            " connect_failed, limit, origin_timeout, origin_rejected, bad_response, client_gone,"
            " other)",
            ["reason"],
            registry=registry,
        )
        self.ws_messages = Counter(
            "proxyd_websocket_messages_total",
            "WebSocket messages relayed, by direction (upload: client to origin)",
            ["direction"],
            registry=registry,
        )
        self.ws_bytes = Counter(
            "proxyd_websocket_message_bytes_total",
            "WebSocket message payload bytes relayed (decompressed), by direction",
            ["direction"],
            registry=registry,
        )
        self.ws_close_codes = Counter(
            "proxyd_websocket_close_codes_total",
            "The Close that began each session's closing, by initiator (client, origin, proxy)"
            " and code (1000-1015; 1005: no code; 3xxx, 4xxx, other)",
            ["initiator", "code"],
            registry=registry,
        )
        self.ws_pings = Counter(
            "proxyd_websocket_pings_total", "Keepalive pings sent to peers", registry=registry
        )
        self.ws_pong_timeouts = Counter(
            "proxyd_websocket_pong_timeouts_total",
            "Sessions ended because a peer did not answer a keepalive ping in time",
            registry=registry,
        )
        self.ws_messages_up = self.ws_messages.labels("upload")
        self.ws_messages_down = self.ws_messages.labels("download")
        self.ws_bytes_up = self.ws_bytes.labels("upload")
        self.ws_bytes_down = self.ws_bytes.labels("download")
        self.collector = _StatsCollector()
        registry.register(self.collector)
        # The scrape-time families alone: what a worker hands its supervisor (stats_exposition).
        self._stats_registry = CollectorRegistry(auto_describe=False)
        self._stats_registry.register(self.collector)

        self._requests_children: dict[tuple[str, str, str, str], Counter] = {}
        self._duration_children: dict[str, Histogram] = {}
        # (method, status, route kind, cache) -> both children's updates: one lookup per request.
        # Bounded: the method is one of KNOWN_METHODS or OTHER, the status three digits (h11).
        self._request_pairs: dict[
            tuple[str, int, str, str], tuple[Callable[[float], None], Callable[[float], None]]
        ] = {}
        self._error_children: dict[str, Counter] = {}
        self.bytes_up = self.bytes.labels("upload")
        self.bytes_down = self.bytes.labels("download")
        self.tunnel_bytes_up = self.tunnel_bytes.labels("upload")
        self.tunnel_bytes_down = self.tunnel_bytes.labels("download")
        self.connects_ok = self.upstream_connects.labels("ok")
        self.connections_allowed = self.client_connections.labels("true")
        self.connections_denied = self.client_connections.labels("false")
        # The per-request updates (see the module docstring): same children, fewer calls.
        self.inc_bytes_up = fast_inc(self.bytes_up)
        self.inc_bytes_down = fast_inc(self.bytes_down)
        self.inc_upstream_reuses = fast_inc(self.upstream_reuses)
        self.inc_pool_waits = fast_inc(self.pool_waits)
        self.observe_time_to_first_byte = fast_observe(self.time_to_first_byte)
        self.observe_pool_wait = fast_observe(self.pool_wait_duration)
        # observe_exchange: the value objects themselves, when they are in-process ones.
        self._exchange_series: dict[tuple[bytes, int, str, str], _ExchangeSeries] = {}
        self._inline = _inline_values(
            self.bytes_up, self.bytes_down, self.time_to_first_byte, self.request_duration
        )

    def observe_exchange(
        self,
        method: bytes,
        status: int,
        duration: float,
        route_kind: str,
        cache: str,
        bytes_in: int,
        bytes_out: int,
        time_to_first_byte: float | None,
    ) -> None:
        """Everything one finished request adds (``requests_total``, its duration, body bytes
        both ways, the time to the first byte): ``observe_request``, ``inc_bytes_up``,
        ``inc_bytes_down`` and ``observe_time_to_first_byte`` in one call. With in-process
        values (one worker) the additions are made here on the values themselves, without a
        call each: one per request where there were about ten (the module docstring's
        ``fast_inc`` without its call). ``method`` as received: the label is resolved once
        per distinct series."""
        series = self._exchange_series.get((method, status, route_kind, cache))
        if series is None:
            series = self._new_exchange_series(method, status, route_kind, cache)
        if not self._inline:
            self.observe_request(series.method, status, duration, route_kind, cache)
            if bytes_in:
                self.inc_bytes_up(bytes_in)
            if bytes_out:
                self.inc_bytes_down(bytes_out)
            if time_to_first_byte is not None:
                self.observe_time_to_first_byte(time_to_first_byte)
            return
        # Each target below is a MutexValue (``_inline_values`` checked), changed only by the
        # event loop's thread: as _UnlockedAdd.
        series.count._value += 1
        series.duration_sum._value += duration
        series.duration_buckets[bisect_left(LATENCY_BUCKETS, duration)]._value += 1
        if bytes_in:
            self.bytes_up._value._value += bytes_in
        if bytes_out:
            self.bytes_down._value._value += bytes_out
        if time_to_first_byte is not None:
            ttfb = self.time_to_first_byte
            ttfb._sum._value += time_to_first_byte
            ttfb._buckets[bisect_left(LATENCY_BUCKETS, time_to_first_byte)]._value += 1

    def _new_exchange_series(
        self, method: bytes, status: int, route_kind: str, cache: str
    ) -> _ExchangeSeries:
        text = _method_label(method.decode("ascii", "replace"))
        counter = self.requests.labels(text, _status_class(status), route_kind, cache)
        histogram = self.request_duration.labels(text)
        series = _ExchangeSeries(
            text,
            counter._value,
            histogram._sum,
            histogram._buckets,
        )
        if len(self._exchange_series) >= _EXCHANGE_SERIES_MAX:
            self._exchange_series.clear()  # bounded (statuses are three digits; kinds few)
        self._exchange_series[(method, status, route_kind, cache)] = series
        return series

    def observe_request(
        self,
        method: str,
        status: int,
        duration: float,
        route_kind: str = "none",
        cache: str = "none",
    ) -> None:
        method = _method_label(method)
        key = (method, status, route_kind, cache)
        pair = self._request_pairs.get(key)
        if pair is None:
            labels = (method, _status_class(status), route_kind, cache)
            counter = self._requests_children.get(labels)
            if counter is None:
                counter = self._requests_children[labels] = self.requests.labels(*labels)
            histogram = self._duration_children.get(method)
            if histogram is None:
                histogram = self._duration_children[method] = self.request_duration.labels(method)
            pair = self._request_pairs[key] = (fast_inc(counter), fast_observe(histogram))
        pair[0](1)
        pair[1](duration)

    def observe_error(self, error_type: str) -> None:
        child = self._error_children.get(error_type)
        if child is None:
            child = self._error_children[error_type] = self.errors.labels(error_type)
        child.inc()

    def observe_connect_failure(self, error_type: str) -> None:
        self.upstream_connects.labels(error_type).inc()

    def add_stats_provider(self, provider: Callable[[], Iterator[Metric]]) -> None:
        self.collector.providers.append(provider)

    def stats_exposition(self) -> bytes:
        """The scrape-time families (``add_stats_provider``) alone, in the text format."""
        return generate_latest(self._stats_registry)


def _method_label(method: str) -> str:
    """A method as its label: one of KNOWN_METHODS, or OTHER (labels stay a bounded set)."""
    return method if method in _KNOWN_METHOD_SET else "OTHER"


def _status_class(status: int) -> str:
    """``2xx`` and so on; anything outside 100-599 counts in the nearest class."""
    return STATUS_CLASSES[min(max(status // 100, 1), 5) - 1]


#: Bound of ``Metrics._exchange_series`` (method bytes as received may be anything).
_EXCHANGE_SERIES_MAX: Final = 4096


class _ExchangeSeries:
    """The value objects one request's ``observe_exchange`` adds to, for one (method, status,
    route kind, cache result): its ``requests_total`` child and its duration histogram child.
    They are ``MutexValue``s when ``Metrics._inline``; otherwise (a worker's mmap values) only
    ``method`` is read."""

    __slots__ = ("count", "duration_buckets", "duration_sum", "method")

    def __init__(
        self,
        method: str,
        count: MutexValue,
        duration_sum: MutexValue,
        duration_buckets: list[MutexValue],
    ) -> None:
        self.method = method  # the label: a known method or OTHER
        self.count = count
        self.duration_sum = duration_sum
        self.duration_buckets = duration_buckets


def _inline_values(
    bytes_up: Counter, bytes_down: Counter, ttfb: Histogram, duration: Histogram
) -> bool:
    """True when ``observe_exchange`` may add to the value objects directly: every value it
    touches is an in-process ``MutexValue`` (not a worker's mmap file), and the histograms'
    buckets are ``LATENCY_BUCKETS`` plus +Inf, as ``bisect_left`` on them assumes."""
    try:
        values = [bytes_up._value, bytes_down._value, ttfb._sum, *ttfb._buckets]
        bounds = [tuple(ttfb._upper_bounds), tuple(duration._upper_bounds)]
    except AttributeError:
        return False
    expected = (*LATENCY_BUCKETS, float("inf"))
    return (
        all(type(value) is MutexValue and hasattr(value, "_value") for value in values)
        and all(bound == expected for bound in bounds)
        and len(ttfb._buckets) == len(expected)
    )


class _UnlockedAdd:
    """``MutexValue.inc`` without its lock, for values only the event loop's thread changes.

    prometheus_client's in-process value (``MutexValue``) takes a ``threading.Lock`` on every
    ``inc`` so that threads may share it. The per-request counters and histograms are changed
    only by the trio thread (worker threads -- the cache's disk I/O, DNS -- never touch them),
    and a scrape reads them under the lock from that same thread, so the lock guards against
    nothing there; without it an update is one attribute add. Multiprocess values (mmap files,
    ``workers: N``) keep their own ``inc``."""

    __slots__ = ("_value",)

    def __init__(self, value: object) -> None:
        self._value = value

    def __call__(self, amount: float) -> None:
        self._value._value += amount  # type: ignore[attr-defined]


def _value_add(value: object) -> Callable[[float], None]:
    if type(value) is MutexValue and hasattr(value, "_value"):
        return _UnlockedAdd(value)
    inc = getattr(value, "inc", None)
    if not callable(inc):
        raise AttributeError("inc")
    return cast(Callable[[float], None], inc)


def fast_inc(counter: Counter) -> Callable[[float], None]:
    """``counter.inc`` for the per-request path: an add on its value (one call, not three, and
    no lock: ``_UnlockedAdd``). For a child (or a metric without labels), non-negative amounts
    and the event loop's thread only. Falls back to ``counter.inc`` should prometheus_client's
    internals ever change shape."""
    try:
        return _value_add(counter._value)
    except AttributeError:
        return counter.inc


def fast_observe(histogram: Histogram) -> Callable[[float], None]:
    """``histogram.observe`` for the per-request path: the sum and the one bucket the amount
    falls in (``bisect``, where ``observe`` scans the bounds), on the child's value objects
    (without their lock, like ``fast_inc``)."""
    try:
        add_sum = _value_add(histogram._sum)
        bounds = list(histogram._upper_bounds)
        add_bucket = [_value_add(bucket) for bucket in histogram._buckets]
    except AttributeError:
        return histogram.observe
    if len(bounds) != len(add_bucket) or not bounds or bounds[-1] != float("inf"):
        return histogram.observe

    def observe(amount: float) -> None:
        add_sum(amount)
        add_bucket[bisect_left(bounds, amount)](1)  # the first bound >= amount, as observe

    return observe


def _build_info(registry: CollectorRegistry) -> None:
    Info("proxyd_build", "proxyd build information", registry=registry).info(
        {"version": __version__}
    )


def pool_gauges(stats: PoolStatsView) -> Iterator[Metric]:
    """Scrape-time gauges for the socket pools (see upstream.pool.Pool.stats)."""
    connections = GaugeMetricFamily(
        "proxyd_pool_connections",
        "Upstream connections by route kind (direct or proxy protocol) and state",
        labels=["route_kind", "state"],
    )
    waiting = GaugeMetricFamily(
        "proxyd_pool_waiting", "Requests waiting for an upstream connection", labels=["route_kind"]
    )
    totals: dict[tuple[str, str], int] = {}
    waits: dict[str, int] = {}
    for group in stats.groups:
        kind = group.route_kind
        for state, value in (
            ("active", group.active),
            ("idle", group.idle),
            ("connecting", group.connecting),
        ):
            totals[(kind, state)] = totals.get((kind, state), 0) + value
        waits[kind] = waits.get(kind, 0) + group.waiting
    for (kind, state), value in sorted(totals.items()):
        connections.add_metric([kind, state], value)
    for kind, value in sorted(waits.items()):
        waiting.add_metric([kind], value)
    yield connections
    yield waiting
    groups = GaugeMetricFamily("proxyd_pool_groups", "Socket pool groups in use now")
    groups.add_metric([], len(stats.groups))
    yield groups
    tunnels = GaugeMetricFamily(
        "proxyd_pool_tunnels", "CONNECT tunnels and WebSocket sessions holding a per-host slot"
    )
    tunnels.add_metric([], stats.tunnels)
    yield tunnels


class GroupView(Protocol):
    @property
    def route_kind(self) -> str: ...
    @property
    def active(self) -> int: ...
    @property
    def idle(self) -> int: ...
    @property
    def connecting(self) -> int: ...
    @property
    def waiting(self) -> int: ...


class PoolStatsView(Protocol):
    @property
    def groups(self) -> Sequence[GroupView]: ...

    @property
    def tunnels(self) -> int: ...


def dns_gauges(entries: int) -> Iterator[Metric]:
    """Scrape-time gauges for the resolver cache (see upstream.dns.Resolver.stats)."""
    family = GaugeMetricFamily(
        "proxyd_dns_cache_entries", "Host names in the DNS cache now (answers and failures)"
    )
    family.add_metric([], entries)
    yield family


def cache_gauges(entries: int, size: int, evictions: int, paused: bool) -> Iterator[Metric]:
    """Scrape-time gauges for the cache store (see cache.store.CacheStore.stats)."""
    family = GaugeMetricFamily("proxyd_cache_entries", "Responses stored in the cache now")
    family.add_metric([], entries)
    yield family
    family = GaugeMetricFamily("proxyd_cache_stored_bytes", "Body bytes stored in the cache now")
    family.add_metric([], size)
    yield family
    family = GaugeMetricFamily(
        "proxyd_cache_evictions", "Entries evicted (least recently used) since start-up"
    )
    family.add_metric([], evictions)
    yield family
    family = GaugeMetricFamily(
        "proxyd_cache_paused", "1 while storing is paused after a disk error (disk full)"
    )
    family.add_metric([], 1 if paused else 0)
    yield family


# --- workers: N (the supervisor's registry; see the module docstring) ---------------------------

#: How ``aggregate_stats`` combines one scrape-time family across workers; unnamed ones are summed
#: (each worker's pool, DNS cache and evictions are its own, so the total is their sum).
STATS_AGGREGATION: Final[Mapping[str, Literal["sum", "max"]]] = {
    # Every worker learns the same bad proxies on its own: the longest list, not a sum.
    "proxyd_bad_proxies": "max",
    # The shared disk cache's totals, as each worker last read them from the index: the newest.
    "proxyd_cache_entries": "max",
    "proxyd_cache_stored_bytes": "max",
    "proxyd_cache_paused": "max",
}


def aggregate_stats(expositions: Sequence[str]) -> list[Metric]:
    """Add up the workers' scrape-time families (text format) sample by sample."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in expositions:
        for family in text_string_to_metric_families(text):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            table = values[family.name]
            use_max = STATS_AGGREGATION.get(family.name, "sum") == "max"
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                seen = table.get(key)
                if seen is None:
                    table[key] = sample.value
                else:
                    table[key] = max(seen, sample.value) if use_max else seen + sample.value
    for name, metric in families.items():
        for (sample_name, labels), value in values[name].items():
            metric.add_sample(sample_name, dict(labels), value)
    return list(families.values())


class _WorkerStatsCollector(Collector):
    """The workers' scrape-time families as last handed over (``aggregate_stats``)."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


class SupervisorMetrics:
    """The supervisor's registry: all workers added up, and the supervisor's own facts."""

    def __init__(self, multiproc_dir: str) -> None:
        # No auto_describe: the collectors below cannot name their families before workers run.
        self.registry = registry = CollectorRegistry(auto_describe=False)
        _build_info(registry)
        self.workers_ready = Gauge(
            "proxyd_workers", "Worker processes running and ready now", registry=registry
        )
        self.worker_restarts = Counter(
            "proxyd_worker_restarts_total",
            "Worker processes started again after one exited while not draining",
            registry=registry,
        )
        MultiProcessCollector(registry, path=multiproc_dir)  # type: ignore[no-untyped-call]
        self._worker_stats = _WorkerStatsCollector()
        registry.register(self._worker_stats)

    def exposition(self, worker_stats: Sequence[str]) -> bytes:
        """/metrics: everything, with the scrape-time families the workers just handed over."""
        self._worker_stats.families = aggregate_stats(worker_stats)
        return generate_latest(self.registry)

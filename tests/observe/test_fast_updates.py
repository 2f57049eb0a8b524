"""observe.metrics.fast_inc / fast_observe: the per-request updates must leave exactly the samples
the public ``inc`` / ``observe`` leave (counts, sums, every bucket including the bound itself
and +Inf), and fall back to the public methods when prometheus_client's internals differ."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram

from proxyd.observe.metrics import (
    LATENCY_BUCKETS,
    Metrics,
    _inline_values,
    fast_inc,
    fast_observe,
)

AMOUNTS = [0.0, 0.0004, 0.0005, 0.0005001, 0.004, 0.25, 1.0, 59.9, 60.0, 61.0, 1e9]


def _samples(registry: CollectorRegistry, prefix: str) -> dict[tuple[str, str], float]:
    return {
        (sample.name.removeprefix(prefix), str(sorted(sample.labels.items()))): sample.value
        for metric in registry.collect()
        for sample in metric.samples
        if sample.name.startswith(prefix) and not sample.name.endswith("_created")
    }


def test_fast_updates_leave_the_samples_the_public_methods_leave() -> None:
    registry = CollectorRegistry()
    public = Histogram("public", "x", ["m"], buckets=LATENCY_BUCKETS, registry=registry)
    fast = Histogram("fast", "x", ["m"], buckets=LATENCY_BUCKETS, registry=registry)
    count_public = Counter("cpublic", "x", ["m"], registry=registry)
    count_fast = Counter("cfast", "x", ["m"], registry=registry)
    observe = fast_observe(fast.labels("GET"))
    inc = fast_inc(count_fast.labels("GET"))
    assert observe != fast.labels("GET").observe  # the fast path is in use, not the fallback
    for amount in AMOUNTS:
        public.labels("GET").observe(amount)
        observe(amount)
        count_public.labels("GET").inc(amount)
        inc(amount)
    assert _samples(registry, "public") == _samples(registry, "fast")
    assert _samples(registry, "cpublic") == _samples(registry, "cfast")


def test_metrics_per_request_updates_reach_the_exposition() -> None:
    metrics = Metrics()
    metrics.observe_request("GET", 200, 0.002, "direct", "none")
    metrics.observe_request("GET", 204, 0.5, "direct", "none")  # same counter child, new pair
    metrics.observe_request("BREW", 418, 0.001)  # an unknown method is OTHER
    metrics.inc_bytes_down(1024)
    metrics.observe_time_to_first_byte(0.001)
    metrics.inc_upstream_reuses(1)
    get = metrics.registry.get_sample_value
    labels = {"method": "GET", "status_class": "2xx", "route_kind": "direct", "cache": "none"}
    assert get("proxyd_requests_total", labels) == 2
    assert get("proxyd_request_duration_seconds_count", {"method": "GET"}) == 2
    assert get("proxyd_request_duration_seconds_sum", {"method": "GET"}) == pytest.approx(0.502)
    assert get("proxyd_request_duration_seconds_count", {"method": "OTHER"}) == 1
    assert get("proxyd_upstream_time_to_first_byte_seconds_count") == 1
    assert get("proxyd_upstream_reused_total") == 1


class _Opaque:
    """A metric whose internals are not prometheus_client 0.2x's."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def inc(self, amount: float = 1) -> None:
        self.calls.append(amount)

    def observe(self, amount: float) -> None:
        self.calls.append(amount)


def test_other_internals_fall_back_to_the_public_methods() -> None:
    opaque = _Opaque()
    fast_inc(opaque)(2)  # type: ignore[arg-type]
    fast_observe(opaque)(0.5)  # type: ignore[arg-type]
    assert opaque.calls == [2, 0.5]


EXCHANGES = [
    (b"GET", 200, 0.002, "direct", "none", 0, 1024, 0.001),
    (b"GET", 204, 0.0005, "direct", "none", 0, 0, 0.0005),  # on a bucket bound
    (b"GET", 200, 61.0, "http", "miss", 10, 20, 60.0),  # past the last bound: +Inf
    (b"BREW", 418, 0.3, "none", "none", 7, 0, None),  # an unknown method is OTHER
    (b"POST", 502, 0.0, "direct", "none", 3, 0, None),
]


def _exchange_samples(metrics: Metrics) -> dict[tuple[str, str, str], float]:
    """The families ``observe_exchange`` adds to (the others, e.g. a load timestamp, differ
    between two Metrics by nature)."""
    families = (
        "proxyd_requests_total",
        "proxyd_request_duration_seconds",
        "proxyd_body_bytes_total",
        "proxyd_upstream_time_to_first_byte_seconds",
    )
    return {
        (family, *key): value
        for family in families
        for key, value in _samples(metrics.registry, family).items()
    }


@pytest.mark.parametrize("inline", [True, False])
def test_observe_exchange_leaves_the_samples_of_the_separate_updates(inline: bool) -> None:
    """One call per finished request (observe_exchange), with the values added in place or,
    where they are not in-process values (a worker's files), through the separate updates."""
    combined, separate = Metrics(), Metrics()
    assert combined._inline  # in-process values: the in-place additions are what runs
    combined._inline = inline
    for method, status, duration, kind, cache, up, down, ttfb in EXCHANGES * 3:
        combined.observe_exchange(method, status, duration, kind, cache, up, down, ttfb)
        separate.observe_request(method.decode(), status, duration, kind, cache)
        if up:
            separate.inc_bytes_up(up)
        if down:
            separate.inc_bytes_down(down)
        if ttfb is not None:
            separate.observe_time_to_first_byte(ttfb)
    samples = _exchange_samples(combined)
    assert samples == _exchange_samples(separate)
    get = combined.registry.get_sample_value
    labels = {"method": "GET", "status_class": "2xx", "route_kind": "direct", "cache": "none"}
    assert get("proxyd_requests_total", labels) == 6
    assert get("proxyd_request_duration_seconds_bucket", {"method": "GET", "le": "+Inf"}) == 9
    assert get("proxyd_request_duration_seconds_bucket", {"method": "GET", "le": "60.0"}) == 6
    assert get("proxyd_request_duration_seconds_count", {"method": "OTHER"}) == 3
    assert get("proxyd_body_bytes_total", {"direction": "upload"}) == 60
    assert get("proxyd_upstream_time_to_first_byte_seconds_count") == 9


def test_values_that_are_not_in_process_ones_are_not_added_in_place() -> None:
    metrics = Metrics()
    metrics.bytes_down._value = _Opaque()  # as a worker's mmap value
    assert not _inline_values(
        metrics.bytes_up, metrics.bytes_down, metrics.time_to_first_byte, metrics.request_duration
    )

"""observe.metrics.fast_inc / fast_observe: the per-request updates must leave exactly the samples
the public ``inc`` / ``observe`` leave (counts, sums, every bucket including the bound itself
and +Inf), and fall back to the public methods when prometheus_client's internals differ."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram

from proxyd.observe.metrics import LATENCY_BUCKETS, Metrics, fast_inc, fast_observe

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

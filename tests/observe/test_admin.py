"""The admin listener: health, readiness and Prometheus metrics."""

from __future__ import annotations

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RunningProxy, eventually
from tests.origin import Origin


async def test_health_and_readiness(proxy: RunningProxy) -> None:
    async with httpx.AsyncClient() as client:
        assert (await client.get(proxy.admin_url + "/healthz")).text == "ok\n"
        assert (await client.get(proxy.admin_url + "/readyz")).status_code == 200
        assert (await client.get(proxy.admin_url + "/nope")).status_code == 404


async def test_metrics_count_requests_connections_and_durations(
    proxy: RunningProxy, origin: Origin
) -> None:
    """/metrics is Prometheus text with requests by method and status class, active
    connections, upstream connects and duration histograms."""
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        for _ in range(3):
            assert (await client.get(origin.url("/"))).status_code == 200
        assert (await client.post(origin.url("/"), content=b"x" * 10)).status_code == 200
    await eventually(lambda: len(proxy.access_lines()) == 4)
    async with httpx.AsyncClient() as client:
        response = await client.get(proxy.admin_url + "/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }

    def requests(method: str) -> float:
        labels = (
            ("cache", "none"),
            ("method", method),
            ("route_kind", "direct"),
            ("status_class", "2xx"),
        )
        return samples[("proxyd_requests_total", labels)]

    assert requests("GET") == 3
    assert requests("POST") == 1
    assert samples[("proxyd_upstream_connects_total", (("outcome", "ok"),))] == 1
    assert samples[("proxyd_upstream_reused_total", ())] == 3
    assert samples[("proxyd_request_duration_seconds_count", (("method", "GET"),))] == 3
    assert samples[("proxyd_body_bytes_total", (("direction", "upload"),))] == 10
    assert ("proxyd_client_connections_active", ()) in samples
    assert samples[("proxyd_pool_connections", (("route_kind", "direct"), ("state", "idle")))] == 1


async def test_admin_port_is_not_reachable_through_the_proxy(proxy: RunningProxy) -> None:
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        response = await client.get(proxy.admin_url + "/metrics")
        assert response.status_code == 403
        by_name = await client.get(f"http://localhost:{proxy.admin_port}/metrics")
        assert by_name.status_code == 403


async def test_admin_answers_connection_close_requests(proxy: RunningProxy) -> None:
    """A one-shot client (curl -H 'Connection: close', urllib) still gets its answer."""
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.admin_port)
    await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    received = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some(4096):
            received += chunk
    assert received.startswith(b"HTTP/1.1 200") and received.endswith(b"ok\n")

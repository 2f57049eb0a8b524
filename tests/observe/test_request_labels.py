"""proxyd_requests_total carries the route kind and the cache result (issue 6's metric set)."""

from __future__ import annotations

from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import StartProxy, eventually
from tests.origin import Exchange, Origin


async def test_requests_are_labelled_by_route_kind_and_cache_result(
    start_proxy: StartProxy, origin: Origin, tmp_path: Path
) -> None:
    """A miss went DIRECT (route_kind=direct, cache=miss); the hit never left proxyd
    (route_kind=none, cache=hit)."""

    async def cacheable(exchange: Exchange) -> None:
        await exchange.respond(200, b"body", [(b"Cache-Control", b"max-age=600")])

    origin.route("/c", cacheable)
    proxy = await start_proxy(**{"cache.enabled": True, "cache.dir": str(tmp_path)})
    async with httpx.AsyncClient(proxy=proxy.url, trust_env=False) as client:
        assert (await client.get(origin.url("/c"))).status_code == 200
        assert (await client.get(origin.url("/c"))).status_code == 200
    await eventually(lambda: len(proxy.access_lines()) == 2)
    async with httpx.AsyncClient(trust_env=False) as client:
        text = (await client.get(proxy.admin_url + "/metrics")).text
    counts = {
        (sample.labels["route_kind"], sample.labels["cache"]): sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "proxyd_requests"
        for sample in family.samples
        if sample.name == "proxyd_requests_total"
    }
    assert counts == {("direct", "miss"): 1.0, ("none", "hit"): 1.0}

"""RFC 9111 §4.3.5: a 200 to a HEAD the cache forwarded updates or invalidates the stored GET."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.cache.test_rfc9111 import Reply, cache_settings, is_hit, script, seen
from tests.conftest import StartProxy
from tests.origin import Origin

FRESH = ("Cache-Control", "max-age=600")


async def test_head_with_changed_validator_invalidates_the_stored_get(
    start_proxy: StartProxy, tmp_path: Path, origin: Origin
) -> None:
    """§4.3.5: a HEAD 200 whose ETag differs from the stored GET's means the representation
    changed: the stored response is invalidated, the next GET goes to the origin."""
    proxy = await start_proxy(**cache_settings(tmp_path / "c"))
    script(
        origin,
        "/h",
        Reply(body=b"old", headers=[FRESH, ("ETag", '"a"')]),
        Reply(headers=[FRESH, ("ETag", '"b"')]),  # the HEAD
        Reply(body=b"new", headers=[FRESH, ("ETag", '"b"')]),
    )
    async with httpx.AsyncClient(proxy=proxy.url, trust_env=False, timeout=10) as http:
        assert (await http.get(origin.url("/h"))).content == b"old"
        assert is_hit(await http.get(origin.url("/h")))
        head = await http.head(origin.url("/h"), headers={"Cache-Control": "no-cache"})
        assert head.status_code == 200
        after = await http.get(origin.url("/h"))
    assert not is_hit(after)
    assert after.content == b"new"
    assert [r.method for r in seen(origin, "/h")] == [b"GET", b"HEAD", b"GET"]


async def test_head_with_same_validator_freshens_the_stored_get(
    start_proxy: StartProxy, tmp_path: Path, origin: Origin
) -> None:
    """§4.3.5: a HEAD 200 with the stored ETag freshens the stored GET's headers (as a 304
    would, §3.2); the body stays and the next GET is a hit carrying the new field."""
    proxy = await start_proxy(**cache_settings(tmp_path / "c"))
    script(
        origin,
        "/h",
        Reply(body=b"body", headers=[FRESH, ("ETag", '"a"'), ("X-Version", "1")]),
        Reply(headers=[FRESH, ("ETag", '"a"'), ("X-Version", "2")]),  # the HEAD
    )
    async with httpx.AsyncClient(proxy=proxy.url, trust_env=False, timeout=10) as http:
        await http.get(origin.url("/h"))
        await http.head(origin.url("/h"), headers={"Cache-Control": "no-cache"})
        after = await http.get(origin.url("/h"))
    assert is_hit(after)
    assert after.content == b"body"
    assert after.headers["x-version"] == "2"
    assert len(seen(origin, "/h")) == 2

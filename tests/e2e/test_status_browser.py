"""The status page in a real browser: Debian's headless Chromium loads /status from the admin port.

How it works: an in-process proxyd (``start_proxy``) gets some real traffic first — a request to
the scriptable origin (a pooled idle socket), an open CONNECT tunnel, and a request whose path
is a script (``<script>window.pwned=1</script>``, answered 502) so the page must show markup as
text. Chromium (``tests/e2e/cdp.py``) starts without a proxy (the page is the admin listener's,
on 127.0.0.1) and loads ``/status?refresh=1`` over the DevTools protocol.

What is asserted: the document title and the section headings (``Runtime.evaluate`` on the DOM),
the pooled group and the open tunnel in their tables, the injected script shown as text and never
run (no ``<script>`` element, ``window.pwned`` undefined); the page refreshes itself (a request
failing after the first load shows up after the next load, with no action from the test); and
``Page.captureScreenshot`` returns a PNG that is whole (every chunk's CRC, IHDR size equal to the
viewport, IDAT inflating to exactly the pixel rows) and not blank. The PNG is saved under
``tmp_path`` for a person to look at. Skipped only when ``/usr/bin/chromium`` is not installed.
"""

from __future__ import annotations

import base64
import struct
import zlib
from pathlib import Path
from typing import Any, Final

import httpx
import pytest
import trio

from tests.conftest import StartProxy, eventually
from tests.e2e.cdp import Page, chromium_available, launch_chromium
from tests.origin import Origin

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not chromium_available(),
        reason="/usr/bin/chromium is not installed (Debian package `chromium`; "
        "`bash .ci/dev test` installs it as root)",
    ),
]

TEST_TIMEOUT: Final = 20.0
WIDTH: Final = 1200
HEIGHT: Final = 900
PAYLOAD: Final = "<script>window.pwned=1</script>"
HEADINGS: Final = [
    "Socket pools",
    "Routes",
    "DNS cache",
    "HTTP cache",
    "Tunnels",
    "WebSocket sessions",
    "Recent errors",
]


def check_png(data: bytes) -> tuple[int, int]:
    """Walk a PNG's chunks (CRC of each), inflate its IDAT stream and check it is exactly the
    image's rows; return (width, height). Fails on anything truncated or corrupt, or blank."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:8]
    offset, chunks, idat = 8, [], b""
    width = height = channels = 0
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r}"
        chunks.append(kind)
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert depth == 8
            channels = {2: 3, 6: 4}[color]  # RGB or RGBA
        elif kind == b"IDAT":
            idat += body
        offset += 12 + length
    assert chunks[0] == b"IHDR" and chunks[-1] == b"IEND"
    pixels = zlib.decompress(idat)
    assert len(pixels) == height * (1 + width * channels)  # a filter byte, then the row
    assert len(set(pixels)) > 16, "the screenshot is blank"
    return width, height


async def dom(page: Page, expression: str) -> Any:
    return await page.evaluate(expression)


async def test_status_page_renders_refreshes_and_screenshots(
    start_proxy: StartProxy, origin: Origin, tmp_path: Path
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        proxy = await start_proxy(**{"connect.allowed_ports": [origin.port]})
        async with httpx.AsyncClient(proxy=proxy.url, trust_env=False) as client:
            assert (await client.get(origin.url("/pooled"))).status_code == 200
        # As raw bytes: httpx would percent-encode the markup, a hostile client does not.
        async with await trio.open_tcp_stream("127.0.0.1", proxy.port) as raw:
            await raw.send_all(
                f"GET http://unresolvable.test/{PAYLOAD} HTTP/1.1\r\nHost: unresolvable.test\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            assert (await raw.receive_some(65536)).startswith(b"HTTP/1.1 502")
        tunnel = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        async with tunnel:
            authority = b"127.0.0.1:%d" % origin.port
            await tunnel.send_all(
                b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (authority, authority)
            )
            assert (await tunnel.receive_some(65536)).startswith(b"HTTP/1.1 200")
            services = proxy.server.services
            assert services is not None
            await eventually(lambda: bool(services.tunnels))

            async with launch_chromium(None, tmp_path) as browser:
                page = await browser.new_page()
                await page.call(
                    "Emulation.setDeviceMetricsOverride",
                    {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
                )
                await page.navigate(f"{proxy.admin_url}/status?refresh=1")

                title = await dom(page, "document.title")
                headings = await dom(
                    page,
                    "Array.from(document.querySelectorAll('h2')).map(h => h.textContent)",
                )
                pools = await dom(page, "document.querySelector('#pools').textContent")
                tunnels = await dom(page, "document.querySelector('#tunnels').textContent")
                errors = await dom(page, "document.querySelector('#errors').textContent")
                scripts = await dom(page, "document.querySelectorAll('script').length")
                pwned = await dom(page, "typeof window.pwned")
                shot = await page.call("Page.captureScreenshot", {"format": "png"})

                # Something fails after the first load: the page shows it without being asked.
                async with httpx.AsyncClient(proxy=proxy.url, trust_env=False) as client:
                    later = await client.get("http://unresolvable.test/after-first-load")
                    assert later.status_code == 502
                await browser.cdp.wait_event("Page.loadEventFired", page.session_id)
                refreshed = await dom(page, "document.querySelector('#errors').textContent")

    assert title.startswith("proxyd status")
    assert [heading.split(" (")[0] for heading in headings] == HEADINGS
    assert f"http://127.0.0.1:{origin.port} via DIRECT" in pools
    assert f"127.0.0.1:{origin.port}" in tunnels
    assert f"GET http://unresolvable.test/{PAYLOAD}" in errors  # shown as text ...
    assert scripts == 0 and pwned == "undefined"  # ... and never run
    assert "after-first-load" not in errors and "after-first-load" in refreshed

    png = base64.b64decode(shot["data"])
    (tmp_path / "status.png").write_bytes(png)
    assert 5_000 < len(png) < 10_000_000, len(png)
    assert check_png(png) == (WIDTH, HEIGHT)

"""``proxyd.routing.pac.fetch``: the PAC file from disk or over HTTP (a real trio + h11 origin).

Redirects are followed at most three times with relative ``Location`` resolved against the
request URL (RFC 9110 §10.2.2, §15.4); only a final 200 is a script; bodies are capped; the
``charset`` of ``Content-Type`` decides the decoding (RFC 9110 §8.3.2), UTF-8 otherwise.
Everything on 127.0.0.1, every await bounded.
"""

from __future__ import annotations

from pathlib import Path

import h11
import pytest
import trio

from proxyd.routing.pac.fetch import PacFetchError, load_source
from tests.origin import Exchange, Handler, Origin

SCRIPT = 'function FindProxyForURL(u, h) { return "DIRECT"; } // é'


async def no_dns(host: str) -> list[str]:
    raise OSError("no DNS in this test")


async def load(location: str, max_bytes: int = 1 << 20) -> str:
    with trio.fail_after(5):
        return await load_source(location, resolve=no_dns, max_bytes=max_bytes)


async def test_file_path_and_file_url(tmp_path: Path) -> None:
    path = tmp_path / "proxy.pac"
    path.write_bytes(b"\xef\xbb\xbf" + SCRIPT.encode())  # a UTF-8 BOM is dropped
    assert await load(str(path)) == SCRIPT
    assert await load(path.as_uri()) == SCRIPT
    with pytest.raises(PacFetchError, match="larger than 10 bytes"):
        await load(str(path), max_bytes=10)


async def test_redirects_are_followed_up_to_three(origin: Origin) -> None:
    """301/302/307 chains with relative locations end at the script; a fourth hop is refused."""

    def redirect(status: int, location: bytes) -> Handler:
        async def handler(exchange: Exchange) -> None:
            await exchange.respond(status, b"", [(b"Location", location)])

        return handler

    async def script(exchange: Exchange) -> None:
        await exchange.respond(200, SCRIPT.encode("utf-8"), [(b"Content-Type", b"text/plain")])

    origin.route("/a", redirect(301, b"/b"))
    origin.route("/b", redirect(302, b"c"))
    origin.route("/c", redirect(307, origin.url("/proxy.pac").encode()))
    origin.route("/proxy.pac", script)
    origin.route("/z", redirect(308, b"/a"))
    assert await load(origin.url("/a")) == SCRIPT
    with pytest.raises(PacFetchError, match="more than 3 redirects"):
        await load(origin.url("/z"))


async def test_non_200_is_an_error(origin: Origin) -> None:
    async def gone(exchange: Exchange) -> None:
        await exchange.respond(410, b"gone")

    origin.route("/gone", gone)
    with pytest.raises(PacFetchError, match="HTTP status 410"):
        await load(origin.url("/gone"))


async def test_chunked_body_and_charset(origin: Origin) -> None:
    """A chunked response is reassembled; charset=iso-8859-1 is honoured."""

    async def chunked(exchange: Exchange) -> None:
        await exchange.send_event(
            h11.Response(
                status_code=200,
                headers=[
                    (b"Content-Type", b"application/x-ns-proxy-autoconfig; charset=iso-8859-1"),
                    (b"Transfer-Encoding", b"chunked"),
                ],
            )
        )
        data = SCRIPT.encode("latin-1")
        for start in range(0, len(data), 7):
            await exchange.send_event(h11.Data(data=data[start : start + 7]))
        await exchange.send_event(h11.EndOfMessage())

    origin.route("/chunked.pac", chunked)
    assert await load(origin.url("/chunked.pac")) == SCRIPT


async def test_oversized_body_is_refused(origin: Origin) -> None:
    async def big(exchange: Exchange) -> None:
        await exchange.respond(200, b"x" * 5000)

    origin.route("/big.pac", big)
    with pytest.raises(PacFetchError, match="larger than 1000 bytes"):
        await load(origin.url("/big.pac"), max_bytes=1000)


async def test_connection_refused_is_an_error() -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    with pytest.raises(PacFetchError, match="cannot connect"):
        await load(f"http://127.0.0.1:{port}/proxy.pac")


async def test_name_resolution_failure_is_an_error() -> None:
    with pytest.raises(PacFetchError, match=r"cannot resolve wpad\.example"):
        await load("http://wpad.example/proxy.pac")

"""SIGTERM to a real proxyd process with open WebSocket sessions on both entry paths: each side
of each session gets 1001 "proxy shutting down", the handshakes complete, the process exits 0."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import trio

from tests.e2e.test_daemon import daemon_with_config
from tests.websocket.clients import ABSOLUTE, CONNECT, open_client
from tests.websocket.ws_origin import Closed, WsOrigin

pytestmark = pytest.mark.e2e


async def test_sigterm_drains_sessions_with_1001(tmp_path: Path, ws_origin: WsOrigin) -> None:
    extra = f"connect: {{allowed_ports: [{ws_origin.port}]}}\nshutdown_timeout: 5\n"
    results: dict[str, Closed] = {}
    async with daemon_with_config(tmp_path, extra) as daemon:
        with trio.fail_after(10):
            async with (
                open_client(ABSOLUTE, daemon.port, ws_origin.url("/echo")) as first,
                open_client(CONNECT, daemon.port, ws_origin.url("/echo")) as second,
            ):
                for client in (first, second):
                    await client.send("up")
                    assert await client.receive() == "up"
                daemon.signal(signal.SIGTERM)
                async with trio.open_nursery() as nursery:

                    async def wait(name: str, client: object) -> None:
                        results[name] = await client.wait_close()  # type: ignore[attr-defined]

                    nursery.start_soon(wait, ABSOLUTE, first)
                    nursery.start_soon(wait, CONNECT, second)
            assert await daemon.wait_exit(5) == 0
    assert results == {
        ABSOLUTE: Closed(1001, "proxy shutting down"),
        CONNECT: Closed(1001, "proxy shutting down"),
    }
    assert [peer.close for peer in ws_origin.peers] == [Closed(1001, "proxy shutting down")] * 2
    assert "Traceback" not in daemon.stderr()

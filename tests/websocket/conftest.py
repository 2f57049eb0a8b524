"""Fixtures for the WebSocket tests: the scriptable origin and a proxy that may CONNECT to it."""

from __future__ import annotations

import pytest
import trio

from tests.conftest import RunningProxy, StartProxy
from tests.websocket.ws_origin import WsOrigin


@pytest.fixture
async def ws_origin(nursery: trio.Nursery) -> WsOrigin:
    origin: WsOrigin = await nursery.start(WsOrigin().serve)
    return origin


@pytest.fixture
async def ws_proxy(start_proxy: StartProxy, ws_origin: WsOrigin) -> RunningProxy:
    return await start_proxy(**{"connect.allowed_ports": [ws_origin.port]})

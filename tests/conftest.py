"""Shared fixtures: a scriptable origin and an in-process proxyd, both on loopback.

``proxy`` is a running ``ProxyServer`` on 127.0.0.1 with ephemeral proxy and admin ports and the
access log captured in memory; ``start_proxy(**overrides)`` starts another with config overrides
given as dotted keys (``start_proxy(**{"upstream.timeouts.connect": 0.5})``).
"""

from __future__ import annotations

import io
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trio

from proxyd.config import Config, parse_config_text
from proxyd.observe.accesslog import AccessLog
from proxyd.server import ProxyServer
from tests.origin import Origin

BASE_CONFIG = """
listen: ["127.0.0.1:0"]
admin: {listen: "127.0.0.1:0"}
via: {pseudonym: "proxyd-test"}
"""


def make_config(text: str = BASE_CONFIG, **overrides: Any) -> Config:
    return parse_config_text(text, "test.yaml", overrides)


class RunningProxy:
    def __init__(self, server: ProxyServer, log: io.StringIO) -> None:
        self.server = server
        self.log_buffer = log

    @property
    def port(self) -> int:
        return self.server.proxy_addresses[0][1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_port(self) -> int:
        return self.server.admin_addresses[0][1]

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def access_lines(self) -> list[str]:
        return [line for line in self.log_buffer.getvalue().splitlines() if line]


StartProxy = Callable[..., Awaitable[RunningProxy]]


class LoopbackResolver(trio.abc.HostnameResolver):
    """Answers names ending in ``.test`` with 127.0.0.1 and fails every other name.

    Installed for every test so no test can send a DNS query off the machine; numeric hosts never
    reach a resolver. ``unresolvable.test`` fails like a name with no records (EAI_NONAME).
    """

    async def getaddrinfo(
        self,
        host: bytes | None,
        port: bytes | str | int | None,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[tuple[Any, Any, Any, str, Any]]:
        name = (host or b"").decode("ascii", "replace").lower()
        if name in ("localhost", "127.0.0.1") or (
            name.endswith(".test") and name != "unresolvable.test"
        ):
            port_number = int(port) if port is not None else 0
            return [
                (
                    socket.AF_INET,
                    socket.SOCK_STREAM,
                    socket.IPPROTO_TCP,
                    "",
                    ("127.0.0.1", port_number),
                )
            ]
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async def getnameinfo(self, sockaddr: tuple[Any, ...], flags: int) -> tuple[str, str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


@pytest.fixture
async def origin(nursery: trio.Nursery) -> Origin:
    result: Origin = await nursery.start(Origin().serve)
    return result


@pytest.fixture
async def start_proxy(nursery: trio.Nursery) -> AsyncIterator[StartProxy]:
    started: list[ProxyServer] = []
    # No test may send a DNS query off the machine: the in-process proxy resolves through this.
    trio.socket.set_custom_hostname_resolver(LoopbackResolver())

    async def start(text: str = BASE_CONFIG, **overrides: Any) -> RunningProxy:
        config = make_config(text, **overrides)
        log = io.StringIO()
        access_log = AccessLog(config.access_log.format, "-")
        access_log._stream = log  # capture lines in memory
        server = ProxyServer(config, access_log=access_log)
        await nursery.start(server.run)
        started.append(server)
        return RunningProxy(server, log)

    yield start
    for server in started:
        server.drain()


@pytest.fixture
async def proxy(start_proxy: StartProxy) -> RunningProxy:
    return await start_proxy()


async def eventually(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    """Wait (bounded) until ``predicate()`` holds; the proxy logs after the client has its bytes."""
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 (polling a predicate is the point)
            await trio.sleep(0.01)

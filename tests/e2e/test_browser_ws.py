"""A real browser's ws:// session through proxyd: Debian's headless Chromium, driven over CDP.

How it works: each test starts three things on 127.0.0.1 and stops them in reverse order.

* ``WsOrigin``, a small trio + wsproto server of our own. One port serves both the HTML page (plain
  HTTP, ``Connection: close``) and the WebSocket endpoint ``/ws``: it echoes every message, and on
  the text message ``"close-me"`` it closes the session itself with 4002 "server bye". Per session
  it records the messages and the Close frames it received, whether permessage-deflate was
  negotiated, and whether the close handshake completed; after its Close exchange it closes TCP
  first (RFC 6455 §7.1.1).
* proxyd in-process (``start_proxy``), with CONNECT allowed to every port (the origin's port is
  ephemeral) and ``websocket.inspect_connect`` on, so the browser's plaintext upgrade inside the
  CONNECT tunnel is a WebSocket session for proxyd's relay, not a byte tunnel.
* Chromium headless (``tests/e2e/cdp.py``) with ``--proxy-server`` pointing at proxyd and
  ``--proxy-bypass-list=<-loopback>``. The page is fetched through proxyd as an absolute-form GET;
  the WebSocket goes through proxyd as ``CONNECT 127.0.0.1:PORT`` (Chromium tunnels every WebSocket,
  ws:// included). ``wsSession`` (defined by the page, so it only exists if the page loaded) opens
  the socket, sends text, unicode, a 70,000-character text and a binary message, collects the
  echoes, closes or asks the server to close, and resolves with the close event's code, reason and
  wasClean.

What is asserted: the echoes are exact and in order; the origin saw exactly the Close the page sent
(4001 "bye") or the page saw exactly the server's (4002 "server bye"), with ``wasClean`` true on the
page; the access log shows the page GET and the WebSocket to the origin; and proxyd's admin
``/metrics`` counted a WebSocket session (``proxyd_websocket_sessions_total`` > 0), which needs the
relay, not the byte tunnel. Skipped only when ``/usr/bin/chromium`` is not installed (``bash .ci/dev
test`` installs it).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Request,
    TextMessage,
)
from wsproto.extensions import Extension, PerMessageDeflate
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from tests.conftest import RunningProxy, StartProxy, eventually
from tests.e2e.cdp import Browser, chromium_available, launch_chromium

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not chromium_available(),
        reason="/usr/bin/chromium is not installed (Debian package `chromium`; "
        "`bash .ci/dev test` installs it as root)",
    ),
]

TEST_TIMEOUT: Final = 25.0
SESSION_TIMEOUT: Final = 10.0
LONG_TEXT_SIZE: Final = 70_000  # over 65,535: the 64-bit payload length form (RFC 6455 §5.2)
SERVER_CLOSE_TRIGGER: Final = "close-me"

# --- the origin ----------------------------------------------------------------------------------

PAGE_SCRIPT: Final = """
// Open ws, send each message and await its echo, then close (mode "client") or ask the server
// to close (mode "server"); resolve with the echoes and the close event.
async function wsSession(url, mode) {
  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  const inbox = [];
  let wake = null;
  let errors = 0;
  ws.onmessage = (e) => { inbox.push(e.data); if (wake) { wake(); wake = null; } };
  ws.onerror = () => { errors += 1; if (wake) { wake(); wake = null; } };
  const closed = new Promise((resolve) => {
    ws.onclose = (e) => {
      resolve({code: e.code, reason: e.reason, wasClean: e.wasClean});
      if (wake) { wake(); wake = null; }
    };
  });
  await new Promise((resolve, reject) => {
    ws.onopen = resolve;
    closed.then((c) => reject(new Error("closed before open: " + JSON.stringify(c))));
  });
  const next = async () => {
    while (!inbox.length) {
      if (ws.readyState !== WebSocket.OPEN) throw new Error("closed while waiting for an echo");
      await new Promise((r) => { wake = r; });
    }
    const data = inbox.shift();
    return typeof data === "string" ? data : Array.from(new Uint8Array(data));
  };
  const sent = ["hello", "h\\u00e9llo \\u2713 \\ud83d\\ude00", "x".repeat(LONG_TEXT_SIZE),
                new Uint8Array([0, 1, 2, 253, 254, 255])];
  const echoes = [];
  for (const message of sent) { ws.send(message); echoes.push(await next()); }
  if (mode === "client") {
    ws.close(4001, "bye");
  } else {
    ws.send("SERVER_CLOSE_TRIGGER");
  }
  const close = await closed;
  return {echoes: echoes, close: close, errors: errors, protocol: ws.protocol,
          extensions: ws.extensions};
}
""".replace("LONG_TEXT_SIZE", str(LONG_TEXT_SIZE)).replace(
    "SERVER_CLOSE_TRIGGER", SERVER_CLOSE_TRIGGER
)

PAGE: Final = (
    "<!doctype html><html><head><meta charset='utf-8'><title>proxyd ws test</title>"
    f"<script>{PAGE_SCRIPT}</script></head><body>proxyd ws test</body></html>"
).encode()

BINARY: Final = bytes([0, 1, 2, 253, 254, 255])
TEXTS: Final = ["hello", "h\u00e9llo \u2713 \U0001f600", "x" * LONG_TEXT_SIZE]
#: What the page collects (binary arrives as an ArrayBuffer, returned as a list of byte values).
EXPECTED_ECHOES: Final[list[object]] = [*TEXTS, list(BINARY)]
#: What the origin receives, in order.
EXPECTED_AT_ORIGIN: Final[list[str | bytes]] = [*TEXTS, BINARY]


@dataclass
class OriginSession:
    """What the origin saw on one WebSocket connection."""

    messages: list[str | bytes] = field(default_factory=list)
    closes_received: list[tuple[int, str]] = field(default_factory=list)
    deflate: bool = False
    handshake_completed: bool = False
    done: trio.Event = field(default_factory=trio.Event)


class WsOrigin:
    """HTTP page + WebSocket echo server on one loopback port."""

    def __init__(self, *, deflate: bool) -> None:
        self.deflate = deflate
        self.port = 0
        self.sessions: list[OriginSession] = []
        self.http_requests: list[str] = []

    async def serve(
        self, *, task_status: trio.TaskStatus[WsOrigin] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            with trio.move_on_after(SESSION_TIMEOUT):
                head = b""
                while b"\r\n\r\n" not in head:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    head += data
                request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
                if b"\r\nupgrade: websocket" in head.lower():
                    await self._websocket(stream, head)
                else:
                    await self._page(stream, request_line)

    async def _page(self, stream: trio.SocketStream, request_line: str) -> None:
        self.http_requests.append(request_line)
        if request_line.startswith("GET / "):
            status, body, kind = b"200 OK", PAGE, b"text/html; charset=utf-8"
        else:  # /favicon.ico and anything else
            status, body, kind = b"404 Not Found", b"not here\n", b"text/plain"
        await stream.send_all(
            b"HTTP/1.1 "
            + status
            + b"\r\nContent-Type: "
            + kind
            + b"\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
            + body
        )

    async def _websocket(self, stream: trio.SocketStream, head: bytes) -> None:
        session = OriginSession()
        self.sessions.append(session)
        ws = WSConnection(ConnectionType.SERVER)
        ws.receive_data(head)  # the upgrade and any frame bytes that came with it
        try:
            await self._websocket_events(stream, ws, session)
        except (RemoteProtocolError, LocalProtocolError, trio.BrokenResourceError):
            pass
        finally:
            session.done.set()

    async def _websocket_events(
        self, stream: trio.SocketStream, ws: WSConnection, session: OriginSession
    ) -> None:
        text: list[str] = []
        binary: list[bytes] = []
        while True:
            for event in ws.events():
                if isinstance(event, Request):
                    extensions: list[Extension] = [PerMessageDeflate()] if self.deflate else []
                    accept = ws.send(AcceptConnection(extensions=extensions))
                    session.deflate = b"permessage-deflate" in accept.lower()
                    await stream.send_all(accept)
                elif isinstance(event, TextMessage):
                    text.append(event.data)
                    if event.message_finished:
                        message = "".join(text)
                        text.clear()
                        session.messages.append(message)
                        if message == SERVER_CLOSE_TRIGGER:
                            await stream.send_all(
                                ws.send(CloseConnection(code=4002, reason="server bye"))
                            )
                        else:
                            await stream.send_all(ws.send(TextMessage(data=message)))
                elif isinstance(event, BytesMessage):
                    binary.append(bytes(event.data))
                    if event.message_finished:
                        message_bytes = b"".join(binary)
                        binary.clear()
                        session.messages.append(message_bytes)
                        await stream.send_all(ws.send(BytesMessage(data=message_bytes)))
                elif isinstance(event, Ping):
                    await stream.send_all(ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    session.closes_received.append((event.code, event.reason or ""))
                    if ws.state.name == "REMOTE_CLOSING":  # the peer closed first: answer it
                        await stream.send_all(ws.send(event.response()))
                    session.handshake_completed = True
                    return  # RFC 6455 §7.1.1: the server closes TCP first (async with does)
            data = await stream.receive_some(65536)
            if not data:
                return
            ws.receive_data(data)


# --- helpers -------------------------------------------------------------------------------------


async def start_all(
    nursery: trio.Nursery, start_proxy: StartProxy, *, deflate: bool
) -> tuple[WsOrigin, RunningProxy]:
    origin: WsOrigin = await nursery.start(WsOrigin(deflate=deflate).serve)
    proxy = await start_proxy(
        **{
            # The origin listens on an ephemeral port; the default allows only 443 and 80.
            "connect.allowed_ports": ["1-65535"],
            "websocket.inspect_connect": True,
        }
    )
    return origin, proxy


async def run_page_session(browser: Browser, origin: WsOrigin, mode: str) -> dict[str, Any]:
    page = await browser.new_page()
    await page.navigate(f"http://127.0.0.1:{origin.port}/")
    result = await page.evaluate(
        f"wsSession({json.dumps(f'ws://127.0.0.1:{origin.port}/ws')}, {json.dumps(mode)})"
    )
    assert isinstance(result, dict), result
    return result


def metric_sum(text: str, name: str) -> float | None:
    """Sum of every sample of ``name`` (any labels) in Prometheus text; None if absent."""
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", re.MULTILINE)
    values = [float(m.group(1)) for m in pattern.finditer(text)]
    return sum(values) if values else None


async def assert_went_through_proxyd(proxy: RunningProxy, origin: WsOrigin) -> None:
    """The page GET and the WebSocket both appear in proxyd's access log: the session as its
    CONNECT line (byte tunnel) or as the ``GET ws://...`` line of the upgrade proxyd relayed."""
    page_url = f"http://127.0.0.1:{origin.port}/"
    authority = f"127.0.0.1:{origin.port}"

    def seen() -> bool:
        lines = proxy.access_lines()
        return any(f"GET {page_url} 200" in line for line in lines) and any(
            f"CONNECT {authority} " in line or f" ws://{authority}/ws 101 " in line
            for line in lines
        )

    try:
        await eventually(seen, timeout=5.0)
    except trio.TooSlowError:
        raise AssertionError(
            "proxyd's access log lacks the page GET or the WebSocket to the origin:\n"
            + "\n".join(proxy.access_lines())
        ) from None


async def assert_websocket_session_counted(proxy: RunningProxy) -> None:
    """proxyd handled the upgrade inside CONNECT as a WebSocket session, not as a byte tunnel.

    The session is counted when it ends, which may be a moment after the browser saw its close
    event, so the metric is polled (bounded)."""
    sessions: float | None = None
    async with httpx.AsyncClient(trust_env=False, timeout=5.0) as client:
        with trio.move_on_after(3.0):
            while True:
                response = await client.get(proxy.admin_url + "/metrics")
                assert response.status_code == 200
                sessions = metric_sum(response.text, "proxyd_websocket_sessions_total")
                if sessions:
                    break
                await trio.sleep(0.05)
    assert sessions is not None and sessions > 0, (
        "proxyd counted no WebSocket session (proxyd_websocket_sessions_total missing or 0): "
        "the browser's ws:// went through the CONNECT byte tunnel, not the WebSocket relay"
    )


# --- the tests -----------------------------------------------------------------------------------


async def test_browser_closes_with_4001_bye_and_origin_sees_it_exactly(
    nursery: trio.Nursery, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """The page closes with 4001 "bye": the origin receives exactly that Close, echoes it, and
    the page's close event reports 4001 "bye" with wasClean true. The origin negotiates
    permessage-deflate whenever it is offered on its hop (Chromium always offers it)."""
    with trio.fail_after(TEST_TIMEOUT):
        origin, proxy = await start_all(nursery, start_proxy, deflate=True)
        async with launch_chromium(proxy.url, tmp_path) as browser:
            result = await run_page_session(browser, origin, "client")
        await assert_went_through_proxyd(proxy, origin)
        assert len(origin.sessions) == 1
        session = origin.sessions[0]
        with trio.fail_after(5):
            await session.done.wait()

    assert result["errors"] == 0, result
    assert result["echoes"] == EXPECTED_ECHOES
    assert session.messages == EXPECTED_AT_ORIGIN
    assert session.closes_received == [(4001, "bye")]
    assert session.handshake_completed
    assert result["close"] == {"code": 4001, "reason": "bye", "wasClean": True}
    await assert_websocket_session_counted(proxy)


async def test_origin_closes_with_4002_and_browser_sees_it_clean(
    nursery: trio.Nursery, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """The origin closes with 4002 "server bye" after a message: the page's close event reports
    exactly that with wasClean true, and the browser's answering Close reaches the origin (the
    handshake completes through proxyd). The origin declines permessage-deflate."""
    with trio.fail_after(TEST_TIMEOUT):
        origin, proxy = await start_all(nursery, start_proxy, deflate=False)
        async with launch_chromium(proxy.url, tmp_path) as browser:
            result = await run_page_session(browser, origin, "server")
        await assert_went_through_proxyd(proxy, origin)
        assert len(origin.sessions) == 1
        session = origin.sessions[0]
        with trio.fail_after(5):
            await session.done.wait()

    assert result["errors"] == 0, result
    assert result["echoes"] == EXPECTED_ECHOES
    assert session.messages == [*EXPECTED_AT_ORIGIN, SERVER_CLOSE_TRIGGER]
    assert result["close"] == {"code": 4002, "reason": "server bye", "wasClean": True}
    # The browser answered the server's Close (RFC 6455 §5.5.1) and the answer came back through.
    assert session.handshake_completed
    assert [code for code, _ in session.closes_received] == [4002]
    await assert_websocket_session_counted(proxy)

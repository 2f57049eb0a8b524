"""Headless Chromium driven over the DevTools protocol (CDP), for tests with a real browser.

How it works:

* ``launch_chromium`` starts Debian's ``/usr/bin/chromium`` headless as a child process with a fresh
  ``--user-data-dir``, every background service off, and ``--remote-debugging-port=0`` so the
  browser picks a free port itself and writes it to ``<user-data-dir>/DevToolsActivePort`` (line
  one: the port, line two: the browser target's path). The file is polled with a deadline;
  Chromium's stderr goes to a file in the profile directory and is quoted when startup fails.
* ``CdpConnection`` is a WebSocket client (wsproto over a trio TCP stream to 127.0.0.1) on the
  browser endpoint. Commands carry increasing ids; one reader task hands each answer to the caller
  waiting for that id and queues events. Pages are reached through flattened sessions
  (``Target.attachToTarget`` with ``flatten: true``): one socket, a ``sessionId`` per command.
* Shutdown: ``Browser.close`` over CDP first (Chromium then ends its own helper processes), then
  SIGTERM and finally SIGKILL to the browser's pid only, each step bounded and shielded so a
  cancelled or failed test still stops the browser it started.

Only loopback is used: the DevTools socket listens on 127.0.0.1, and the browser is told to use the
proxy under test for everything, loopback included (``--proxy-bypass-list=<-loopback>``; without it
Chromium never proxies 127.0.0.1). Even with every background service switched off, Debian's build
still asks the proxy for ``accounts.google.com`` and ``update.googleapis.com`` at startup; the
in-process proxyd of the tests resolves names only through the loopback resolver of
``tests/conftest.py``, so these get a 502 and nothing leaves the machine. Launched without a
proxy (``launch_chromium(None, ...)``, for the admin listener's own pages), the browser connects
directly (``--no-proxy-server``), and ``--host-resolver-rules`` still resolves no name at all.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)

CHROMIUM: Final = "/usr/bin/chromium"
START_TIMEOUT: Final = 15.0
STOP_TIMEOUT: Final = 5.0
COMMAND_TIMEOUT: Final = 10.0

#: Flags that keep a headless browser quiet and self-contained: no sandbox (we may run as root in
#: CI), no GPU, no QUIC (the proxy speaks TCP only), no first-run UI, no traffic of its own.
BASE_FLAGS: Final = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--disable-client-side-phishing-detection",
    "--disable-domain-reliability",
    "--disable-breakpad",
    "--no-pings",
    "--mute-audio",
    "--password-store=basic",
    # Navigations to http:// must stay http:// (no HTTPS-Upgrades/HTTPS-First probing); no
    # network time queries, translation or optimization-hint fetches of its own.
    "--disable-features=HttpsUpgrades,HttpsFirstBalancedModeAutoEnable,MediaRouter,"
    "NetworkTimeServiceQuerying,Translate,OptimizationHints,OptimizationHintsFetching,"
    "AutofillServerCommunication,CertificateTransparencyComponentUpdater",
    # Belt and braces: should anything bypass the proxy, no name resolves (loopback IPs need none).
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)


class CdpError(Exception):
    """A DevTools command answered with an error, or the browser could not be driven."""


def chromium_available() -> bool:
    return os.access(CHROMIUM, os.X_OK)


class CdpConnection:
    """One DevTools WebSocket: ``call`` sends a command and returns its result."""

    def __init__(self, stream: trio.SocketStream, ws: WSConnection) -> None:
        self._stream = stream
        self._ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        self._events_send, self._events = trio.open_memory_channel[dict[str, Any]](1000)
        self._send_lock = trio.Lock()
        self._closed = False

    async def _send(self, data: bytes) -> None:
        async with self._send_lock:
            await self._stream.send_all(data)

    async def call(
        self, method: str, params: dict[str, Any] | None = None, session_id: str | None = None
    ) -> dict[str, Any]:
        """Send one command and wait (bounded by the caller) for its answer."""
        command_id = next(self._ids)
        payload: dict[str, Any] = {"id": command_id, "method": method, "params": params or {}}
        if session_id is not None:
            payload["sessionId"] = session_id
        answer_send, answer_receive = trio.open_memory_channel[dict[str, Any]](1)
        self._waiting[command_id] = answer_send
        try:
            await self._send(self._ws.send(TextMessage(json.dumps(payload))))
            answer = await answer_receive.receive()
        except trio.EndOfChannel:
            raise CdpError(f"DevTools connection closed while waiting for {method}") from None
        finally:
            self._waiting.pop(command_id, None)
        if "error" in answer:
            raise CdpError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    async def wait_event(self, method: str, session_id: str | None = None) -> dict[str, Any]:
        """The parameters of the next event named ``method`` (earlier other events are dropped)."""
        async for event in self._events:
            if event.get("method") == method and event.get("sessionId") == session_id:
                params: dict[str, Any] = event.get("params", {})
                return params
        raise CdpError(f"DevTools connection closed while waiting for {method}")

    async def read_loop(self) -> None:
        """Feed received bytes to wsproto; route answers by id and queue events."""
        text_parts: list[str] = []
        try:
            while True:
                data = await self._stream.receive_some(1 << 16)
                self._ws.receive_data(data or None)
                for event in self._ws.events():
                    if isinstance(event, Message):
                        text_parts.append(str(event.data))
                        if not event.message_finished:
                            continue
                        message = json.loads("".join(text_parts))
                        text_parts.clear()
                        waiter = self._waiting.get(message.get("id", -1))
                        if waiter is not None:
                            waiter.send_nowait(message)
                        elif "method" in message:
                            # A test that never reads events must not block the reader: drop
                            # the oldest rather than stall (events are only hints here).
                            with suppress(trio.WouldBlock):
                                self._events_send.send_nowait(message)
                    elif isinstance(event, Ping):
                        await self._send(self._ws.send(event.response()))
                    elif isinstance(event, CloseConnection):
                        return
                if not data:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            self._closed = True
            for waiter in list(self._waiting.values()):
                waiter.close()
            self._events_send.close()


@asynccontextmanager
async def connect_cdp(port: int, path: str) -> AsyncIterator[CdpConnection]:
    """Open the DevTools WebSocket at ws://127.0.0.1:port/path and run its reader."""
    with trio.fail_after(COMMAND_TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(ws.send(Request(host=f"127.0.0.1:{port}", target=path)))
        while True:
            data = await stream.receive_some(1 << 16)
            if not data:
                raise CdpError("DevTools endpoint closed during the handshake")
            ws.receive_data(data)
            events = list(ws.events())
            if any(isinstance(e, RejectConnection) for e in events):
                raise CdpError(f"DevTools endpoint refused the WebSocket: {events}")
            if any(isinstance(e, AcceptConnection) for e in events):
                break
    connection = CdpConnection(stream, ws)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection.read_loop)
        try:
            yield connection
        finally:
            nursery.cancel_scope.cancel()
            with trio.move_on_after(1) as cleanup:
                cleanup.shield = True
                await stream.aclose()


@dataclass(frozen=True, slots=True)
class Page:
    """A page target attached with a flattened session."""

    cdp: CdpConnection
    session_id: str

    async def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.cdp.call(method, params, self.session_id)

    async def navigate(self, url: str) -> None:
        """Navigate and wait for the load event; a network error (for example the proxy refusing
        the request) fails with Chromium's error text."""
        await self.call("Page.enable")
        answer = await self.call("Page.navigate", {"url": url})
        if answer.get("errorText"):
            raise CdpError(f"navigating to {url}: {answer['errorText']}")
        await self.cdp.wait_event("Page.loadEventFired", self.session_id)

    async def evaluate(self, expression: str) -> Any:
        """Evaluate JavaScript in the page, await the promise it returns, give back its value."""
        answer = await self.call(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
        )
        if "exceptionDetails" in answer:
            details = answer["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CdpError(f"JavaScript threw: {text}")
        return answer["result"].get("value")


@dataclass(frozen=True, slots=True)
class Browser:
    pid: int
    devtools_port: int
    devtools_path: str
    cdp: CdpConnection
    stderr_path: Path

    async def new_page(self) -> Page:
        target = await self.cdp.call("Target.createTarget", {"url": "about:blank"})
        attached = await self.cdp.call(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        return Page(self.cdp, attached["sessionId"])

    def stderr_tail(self, lines: int = 30) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return "(no stderr)"
        return "\n".join(text.splitlines()[-lines:])


async def _read_devtools_port(
    profile: Path, process: trio.Process, stderr_path: Path
) -> tuple[int, str]:
    active = trio.Path(profile / "DevToolsActivePort")
    with trio.move_on_after(START_TIMEOUT):
        while True:
            if process.returncode is not None or process.poll() is not None:
                break
            try:
                lines = (await active.read_text()).split()
            except OSError:
                lines = []
            if len(lines) >= 2:
                return int(lines[0]), lines[1]
            await trio.sleep(0.05)
    try:
        stderr = await trio.Path(stderr_path).read_text(errors="replace")
    except OSError:
        stderr = "(no stderr)"
    raise CdpError(
        f"chromium (pid {process.pid}, exit status {process.returncode}) did not open its "
        f"DevTools port within {START_TIMEOUT:.0f}s; stderr:\n{stderr[-3000:]}"
    )


async def _stop(process: trio.Process) -> None:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT: to the browser's pid only."""
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            process.terminate()
            with trio.move_on_after(STOP_TIMEOUT):
                await process.wait()
        if process.returncode is None:
            process.kill()
            with trio.move_on_after(STOP_TIMEOUT):
                await process.wait()


@asynccontextmanager
async def launch_chromium(proxy_url: str | None, workdir: Path) -> AsyncIterator[Browser]:
    """Headless Chromium using ``proxy_url`` for every request, loopback included (None: no
    proxy, for pages the test serves itself, such as the admin listener's status page)."""
    profile = workdir / "chromium-profile"
    profile.mkdir(parents=True, exist_ok=False)  # a fresh profile every time
    stderr_path = workdir / "chromium-stderr.log"
    argv = [CHROMIUM, *BASE_FLAGS, f"--user-data-dir={profile}"]
    if proxy_url is not None:
        # Chromium bypasses the proxy for loopback unless told otherwise.
        argv += [f"--proxy-server={proxy_url}", "--proxy-bypass-list=<-loopback>"]
    else:
        argv.append("--no-proxy-server")
    argv.append("about:blank")
    with stderr_path.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
        )
    try:
        port, path = await _read_devtools_port(profile, process, stderr_path)
        async with connect_cdp(port, path) as cdp:
            browser = Browser(process.pid, port, path, cdp, stderr_path)
            try:
                yield browser
            finally:
                # Closing over CDP lets Chromium stop its renderer and helper processes itself.
                with trio.move_on_after(STOP_TIMEOUT) as closing:
                    closing.shield = True
                    # (It closes the socket as it goes: the answer may never come.)
                    with suppress(CdpError):
                        await cdp.call("Browser.close")
                    await process.wait()
    finally:
        await _stop(process)

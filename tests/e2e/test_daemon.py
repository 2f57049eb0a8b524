"""The installed ``proxyd`` command as a real process: proxying, admin, signals, bad configs.

Each test starts the daemon on free 127.0.0.1 ports with a temporary config, talks to it with curl
or httpx through a real origin (the ``origin`` fixture), and always kills it by PID at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
import pytest
import trio

from tests.origin import Exchange, Handler, Origin

pytestmark = pytest.mark.e2e

CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")

START_TIMEOUT = 10.0


def proxyd_command() -> list[str]:
    """The installed console script, or ``python -m proxyd`` when it is not on PATH."""
    installed = shutil.which("proxyd")
    if installed is not None:
        return [installed]
    return [sys.executable, "-m", "proxyd"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def is_listening(port: int) -> bool:
    """Whether a TCP connect to 127.0.0.1:port succeeds."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def config_text(port: int, admin_port: int, extra: str = "") -> str:
    return (
        f'listen: ["127.0.0.1:{port}"]\n'
        f'admin: {{listen: "127.0.0.1:{admin_port}"}}\n'
        'via: {pseudonym: "proxyd-e2e"}\n'
        "log_level: debug\n" + extra
    )


@dataclass
class Daemon:
    process: trio.Process
    port: int
    admin_port: int
    stdout_path: Path
    stderr_path: Path

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def stderr(self) -> str:
        return self.stderr_path.read_text("utf-8", errors="replace")

    def stdout(self) -> str:
        return self.stdout_path.read_text("utf-8", errors="replace")

    async def wait_ready(self) -> None:
        """Wait (bounded) until both listeners accept; fail early if the process died."""
        with trio.fail_after(START_TIMEOUT):
            while True:
                if self.process.poll() is not None:
                    pytest.fail(f"proxyd exited with {self.process.returncode}:\n{self.stderr()}")
                if is_listening(self.port) and is_listening(self.admin_port):
                    return
                await trio.sleep(0.05)

    def signal(self, signum: int) -> None:
        os.kill(self.process.pid, signum)

    async def wait_exit(self, timeout: float) -> int:
        """The exit code, failing the test if the process runs longer than ``timeout``."""
        with trio.move_on_after(timeout):
            return await self.process.wait()
        pytest.fail(f"proxyd still running after {timeout}s:\n{self.stderr()}")


@asynccontextmanager
async def run_daemon(
    tmp_path: Path, args: Sequence[str], port: int, admin_port: int, *, ready: bool = True
) -> AsyncIterator[Daemon]:
    """Start ``proxyd ARGS`` with output in files; kill it by PID on the way out."""
    stdout_path = tmp_path / "proxyd.stdout"
    stderr_path = tmp_path / "proxyd.stderr"
    out: IO[bytes]
    err: IO[bytes]
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        process = await trio.lowlevel.open_process(
            [*proxyd_command(), *args], stdin=None, stdout=out, stderr=err
        )
        daemon = Daemon(process, port, admin_port, stdout_path, stderr_path)
        try:
            if ready:
                await daemon.wait_ready()
            yield daemon
        finally:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await process.wait()


@asynccontextmanager
async def daemon_with_config(
    tmp_path: Path, extra: str = "", name: str = "proxyd.yaml"
) -> AsyncIterator[Daemon]:
    """A daemon on fresh free ports with a temporary config file (plus ``extra`` YAML)."""
    port, admin_port = free_port(), free_port()
    path = tmp_path / name
    path.write_text(config_text(port, admin_port, extra), "utf-8")
    async with run_daemon(tmp_path, ["--config", str(path)], port, admin_port) as daemon:
        yield daemon


async def curl(*args: str, timeout: float = 15.0) -> subprocess.CompletedProcess[bytes]:
    """Run curl (proxy settings from the environment ignored), bounded by ``timeout``."""
    assert CURL is not None
    with trio.fail_after(timeout + 5):
        return await trio.run_process(
            [CURL, "-sS", "--noproxy", "", "--max-time", str(timeout), *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


def client(proxy: str | None = None) -> httpx.AsyncClient:
    """An httpx client that ignores proxy environment variables."""
    return httpx.AsyncClient(proxy=proxy, trust_env=False, timeout=15.0)


def slow_handler(delay: float) -> tuple[trio.Event, Handler]:
    """An origin route that waits ``delay`` seconds before answering 200 ``slow done``."""
    seen = trio.Event()

    async def handler(exchange: Exchange) -> None:
        seen.set()
        await exchange.read_body()
        await trio.sleep(delay)
        await exchange.respond(200, b"slow done")

    return seen, handler


async def wait_for(seen: trio.Event, timeout: float = 5.0) -> None:
    """Wait (bounded) until the origin has received the request."""
    with trio.fail_after(timeout):
        await seen.wait()


# --- serving ------------------------------------------------------------------------------------


@needs_curl
async def test_curl_absolute_form_request(tmp_path: Path, origin: Origin) -> None:
    """curl -x sends an absolute-form GET; the origin gets origin-form with Via."""
    async with daemon_with_config(tmp_path) as daemon:
        result = await curl("--fail", "-x", daemon.proxy_url, origin.url("/hello?x=1"))
        assert result.returncode == 0, result.stderr.decode()
        echo = json.loads(result.stdout)
        assert echo["method"] == "GET"
        assert echo["target"] == "/hello?x=1"
        assert dict(echo["headers"])["Via"] == "1.1 proxyd-e2e"


@needs_curl
async def test_curl_connect_tunnel_to_an_allowed_port(tmp_path: Path, origin: Origin) -> None:
    """curl -p -x opens a CONNECT tunnel to an allowed port; bytes pass through untouched."""
    extra = f"connect: {{allowed_ports: [443, {origin.port}]}}\n"
    async with daemon_with_config(tmp_path, extra) as daemon:
        result = await curl("-v", "--fail", "-p", "-x", daemon.proxy_url, origin.url("/tunnel"))
        assert result.returncode == 0, result.stderr.decode()
        assert f"CONNECT 127.0.0.1:{origin.port}".encode() in result.stderr
        echo = json.loads(result.stdout)
        assert echo["target"] == "/tunnel"
        # Through a tunnel the proxy does not touch the HTTP inside: no Via added.
        assert "Via" not in dict(echo["headers"])


@needs_curl
async def test_curl_connect_to_a_port_not_allowed_is_refused(
    tmp_path: Path, origin: Origin
) -> None:
    """CONNECT to a port outside connect.allowed_ports is refused and reaches no origin."""
    async with daemon_with_config(tmp_path, "connect: {allowed_ports: [443]}\n") as daemon:
        result = await curl("-p", "-x", daemon.proxy_url, origin.url("/tunnel"))
        assert result.returncode != 0
        assert b"403" in result.stderr, result.stderr.decode()
        assert origin.requests == []


async def test_httpx_through_the_proxy(tmp_path: Path, origin: Origin) -> None:
    """An httpx client with proxy= gets the origin's answer through the daemon."""
    async with daemon_with_config(tmp_path) as daemon, client(daemon.proxy_url) as http:
        response = await http.post(origin.url("/post"), content=b"x" * 1000)
        assert response.status_code == 200
        assert response.json()["body_size"] == 1000


async def test_admin_endpoints_answer(tmp_path: Path) -> None:
    """/healthz, /readyz and /metrics answer on the admin port."""
    async with daemon_with_config(tmp_path) as daemon, client() as http:
        health = await http.get(daemon.admin_url + "/healthz")
        assert health.status_code == 200
        assert health.text == "ok\n"
        ready = await http.get(daemon.admin_url + "/readyz")
        assert ready.status_code == 200
        metrics = await http.get(daemon.admin_url + "/metrics")
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain")
        assert "# TYPE" in metrics.text


async def test_metrics_count_a_proxied_request(tmp_path: Path, origin: Origin) -> None:
    """After a request through the proxy, /metrics reports it (the counters move)."""
    async with daemon_with_config(tmp_path) as daemon, client() as admin:
        before = (await admin.get(daemon.admin_url + "/metrics")).text
        async with client(daemon.proxy_url) as http:
            assert (await http.get(origin.url("/counted"))).status_code == 200
        after = (await admin.get(daemon.admin_url + "/metrics")).text
        assert before != after


async def test_no_config_uses_the_embedded_default(tmp_path: Path, origin: Origin) -> None:
    """Without --config the embedded default runs; --listen/--admin-listen override its ports."""
    port, admin_port = free_port(), free_port()
    args = ["--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin_port}"]
    async with run_daemon(tmp_path, args, port, admin_port) as daemon:
        async with client() as http:
            assert (await http.get(daemon.admin_url + "/healthz")).status_code == 200
        async with client(daemon.proxy_url) as http:
            response = await http.get(origin.url("/default"))
            assert response.status_code == 200
            assert response.json()["target"] == "/default"
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait_exit(5) == 0


def test_check_config_with_the_installed_command(tmp_path: Path) -> None:
    """The installed command validates the example file (exit 0) and a bad one (exit 1)."""
    example = Path(__file__).resolve().parents[2] / "config" / "proxyd.example.yaml"
    good = subprocess.run(
        [*proxyd_command(), "--check-config", str(example)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert good.returncode == 0, good.stderr
    bad_path = tmp_path / "bad.yaml"
    bad_path.write_text("pool:\n  idle_used: soon\n", "utf-8")
    bad = subprocess.run(
        [*proxyd_command(), "--check-config", str(bad_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert bad.returncode == 1
    assert "bad.yaml:2: pool.idle_used: must be a number of seconds" in bad.stderr


# --- signals and drain --------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_exits_0_promptly(tmp_path: Path, signum: int) -> None:
    """An idle daemon exits 0 within a few seconds of SIGTERM or SIGINT and stops listening."""
    async with daemon_with_config(tmp_path) as daemon:
        daemon.signal(signum)
        assert await daemon.wait_exit(5) == 0
        assert not is_listening(daemon.port)
        assert not is_listening(daemon.admin_port)
        assert "Traceback" not in daemon.stderr()


async def test_sigterm_lets_an_in_flight_request_finish(tmp_path: Path, origin: Origin) -> None:
    """SIGTERM during a slow (~1 s) request: the request still gets its 200, then exit 0."""
    seen, handler = slow_handler(1.0)
    origin.route("/slow", handler)
    results: list[httpx.Response] = []
    async with daemon_with_config(tmp_path) as daemon:
        async with client(daemon.proxy_url) as http, trio.open_nursery() as nursery:

            async def fetch() -> None:
                results.append(await http.get(origin.url("/slow")))

            nursery.start_soon(fetch)
            await wait_for(seen)
            daemon.signal(signal.SIGTERM)
            await trio.sleep(0.2)
            assert daemon.process.poll() is None, "exited before the request completed"
        assert len(results) == 1
        response = results[0]
        assert response.status_code == 200
        assert response.content == b"slow done"
        assert response.headers.get("connection") == "close"
        assert await daemon.wait_exit(5) == 0


async def test_sigterm_lets_an_in_flight_curl_request_finish(
    tmp_path: Path, origin: Origin
) -> None:
    """The same drain check with curl as the client: 200 and the body, then exit 0."""
    if CURL is None:
        pytest.skip("curl is not installed")
    seen, handler = slow_handler(1.0)
    origin.route("/slow", handler)
    results: list[subprocess.CompletedProcess[bytes]] = []
    async with daemon_with_config(tmp_path) as daemon:
        async with trio.open_nursery() as nursery:

            async def fetch() -> None:
                results.append(
                    await curl("-w", "\n%{http_code}", "-x", daemon.proxy_url, origin.url("/slow"))
                )

            nursery.start_soon(fetch)
            await wait_for(seen)
            daemon.signal(signal.SIGTERM)
        assert results[0].returncode == 0, results[0].stderr.decode()
        assert results[0].stdout == b"slow done\n200"
        assert await daemon.wait_exit(5) == 0


async def test_drain_refuses_new_connections(tmp_path: Path, origin: Origin) -> None:
    """While draining (a request still in flight) the proxy port stops accepting connections."""
    seen, handler = slow_handler(1.5)
    origin.route("/slow", handler)
    async with daemon_with_config(tmp_path) as daemon:
        async with client(daemon.proxy_url) as http, trio.open_nursery() as nursery:

            async def fetch() -> None:
                assert (await http.get(origin.url("/slow"))).status_code == 200

            nursery.start_soon(fetch)
            await wait_for(seen)
            daemon.signal(signal.SIGTERM)
            await trio.sleep(0.3)
            assert daemon.process.poll() is None
            assert not is_listening(daemon.port), "the proxy port still accepts while draining"
        assert await daemon.wait_exit(5) == 0


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (signal.SIGTERM, signal.SIGTERM),
        (signal.SIGTERM, signal.SIGINT),
        (signal.SIGINT, signal.SIGTERM),
    ],
)
async def test_second_signal_during_drain_exits_1_at_once(
    tmp_path: Path, origin: Origin, first: int, second: int
) -> None:
    """A second signal while a request holds the drain open stops the daemon now, exit 1."""
    seen = trio.Event()
    release = trio.Event()

    async def stuck(exchange: Exchange) -> None:
        seen.set()
        with trio.move_on_after(30):
            await release.wait()
        await exchange.respond(200, b"late")

    origin.route("/stuck", stuck)
    extra = "shutdown_timeout: 60\n"
    try:
        async with (
            daemon_with_config(tmp_path, extra) as daemon,
            client(daemon.proxy_url) as http,
            trio.open_nursery() as nursery,
        ):

            async def fetch() -> None:
                # The daemon is stopped under this request: an error is expected.
                with contextlib.suppress(httpx.HTTPError):
                    await http.get(origin.url("/stuck"))

            nursery.start_soon(fetch)
            await wait_for(seen)
            daemon.signal(first)
            await trio.sleep(0.5)
            assert daemon.process.poll() is None, "the first signal did not drain"
            started = trio.current_time()
            daemon.signal(second)
            assert await daemon.wait_exit(3) == 1
            assert trio.current_time() - started < 3
            nursery.cancel_scope.cancel()
    finally:
        release.set()


# --- refusing to start --------------------------------------------------------------------------


async def test_invalid_config_exits_1_with_the_error_and_no_listener(tmp_path: Path) -> None:
    """An invalid config: exit 1, FILE:LINE: key on stderr, and nothing ever listens."""
    port, admin_port = free_port(), free_port()
    path = tmp_path / "broken.yaml"
    path.write_text(
        config_text(port, admin_port, "upstream:\n  timeouts:\n    conect: 5\n"), "utf-8"
    )
    async with run_daemon(
        tmp_path, ["--config", str(path)], port, admin_port, ready=False
    ) as daemon:
        with trio.fail_after(START_TIMEOUT):
            while daemon.process.poll() is None:
                assert not is_listening(port)
                assert not is_listening(admin_port)
                await trio.sleep(0.02)
        assert daemon.process.returncode == 1
        stderr = daemon.stderr()
        assert "broken.yaml:7: upstream.timeouts.conect: unknown key" in stderr.splitlines()
        assert "refusing to start" in stderr
        assert "Traceback" not in stderr
        assert not is_listening(port)
        assert not is_listening(admin_port)


async def test_missing_config_file_exits_1(tmp_path: Path) -> None:
    """A --config path that does not exist: exit 1 with a message naming it."""
    port, admin_port = free_port(), free_port()
    missing = tmp_path / "nope.yaml"
    async with run_daemon(
        tmp_path, ["--config", str(missing)], port, admin_port, ready=False
    ) as daemon:
        assert await daemon.wait_exit(START_TIMEOUT) == 1
        assert f"{missing}: cannot read the config file" in daemon.stderr()


async def test_port_in_use_exits_1_with_a_message(tmp_path: Path) -> None:
    """When the listen port is taken the daemon exits 1 saying it cannot start."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        admin_port = free_port()
        path = tmp_path / "proxyd.yaml"
        path.write_text(config_text(port, admin_port), "utf-8")
        async with run_daemon(
            tmp_path, ["--config", str(path)], port, admin_port, ready=False
        ) as daemon:
            assert await daemon.wait_exit(START_TIMEOUT) == 1
            stderr = daemon.stderr()
            assert "proxyd: cannot start:" in stderr
            assert "Traceback" not in stderr

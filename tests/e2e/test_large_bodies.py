"""1 GiB through the installed daemon, each way, with flat memory (bodies stream, never pile up).

proxyd runs as its own process so its RSS can be read from /proc while the origin (in this
process) and the client (raw socket, in this process) move a gibibyte through it.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.origin import Exchange, Origin

GIB = 1 << 30
CHUNK = b"\xa5" * (1 << 20)
RSS_GROWTH_LIMIT = 64 << 20

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Daemon:
    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        config = tmp_path / "proxyd.yaml"
        config.write_text(
            f'listen: ["127.0.0.1:{self.port}"]\nadmin: {{listen: "127.0.0.1:{free_port()}"}}\n'
            "access_log: {enabled: false}\n"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-m", "proxyd", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    async def wait_ready(self) -> None:
        with trio.fail_after(10):
            while True:
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", self.port)
                except OSError:
                    await trio.sleep(0.05)
                    continue
                await stream.aclose()
                return

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


async def sample_rss(pid: int, peak: list[int], done: trio.Event) -> None:
    while not done.is_set():
        peak[0] = max(peak[0], rss_bytes(pid))
        await trio.sleep(0.05)


async def test_one_gib_download_and_upload_with_flat_memory(
    tmp_path: Path, origin: Origin, nursery: trio.Nursery
) -> None:
    """A 1 GiB response and a 1 GiB request body pass intact; proxyd's RSS grows < 64 MiB."""

    async def download(exchange: Exchange) -> None:
        await exchange.read_body()
        await exchange.stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % GIB)
        for _ in range(GIB // len(CHUNK)):
            await exchange.stream.send_all(CHUNK)
        exchange.closed = True

    uploaded: list[int] = []

    async def upload(exchange: Exchange) -> None:
        uploaded.append(await exchange.count_body())
        await exchange.respond(200, b"%d" % uploaded[-1])

    origin.route("/download", download)
    origin.route("/upload", upload)
    daemon = Daemon(tmp_path)
    try:
        await daemon.wait_ready()
        baseline = rss_bytes(daemon.process.pid)
        peak = [baseline]
        done = trio.Event()
        nursery.start_soon(sample_rss, daemon.process.pid, peak, done)

        stream = await trio.open_tcp_stream("127.0.0.1", daemon.port)
        with trio.fail_after(120):
            await stream.send_all(
                f"GET {origin.url('/download')} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            )
            buffer = b""
            while b"\r\n\r\n" not in buffer:
                buffer += await stream.receive_some(65536)
            head, _, rest = buffer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: %d" % GIB in head
            received = len(rest)
            while received < GIB:
                chunk = await stream.receive_some(1 << 20)
                assert chunk, f"closed after {received} bytes"
                received += len(chunk)
            assert received == GIB

            await stream.send_all(
                f"POST {origin.url('/upload')} HTTP/1.1\r\nHost: x\r\n"
                f"Content-Length: {GIB}\r\n\r\n".encode()
            )
            for _ in range(GIB // len(CHUNK)):
                await stream.send_all(CHUNK)
            answer = b""
            while not answer.endswith(b"%d" % GIB):
                chunk = await stream.receive_some(65536)
                assert chunk, answer
                answer += chunk
        assert uploaded == [GIB]
        done.set()
        print(f"proxyd RSS: baseline {baseline >> 20} MiB, peak {peak[0] >> 20} MiB")
        assert peak[0] - baseline < RSS_GROWTH_LIMIT, (
            f"RSS grew by {(peak[0] - baseline) >> 20} MiB moving 2 GiB"
        )
        await stream.aclose()
    finally:
        daemon.stop()
    assert daemon.process.returncode == 0, (
        daemon.process.stderr.read() if daemon.process.stderr else ""
    )

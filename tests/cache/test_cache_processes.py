"""The cache in real proxyd processes: a crash mid-store, two daemons on one directory, disk full.

How these tests work: ``daemon()`` starts the installed ``proxyd`` (or ``python -m proxyd``) on
free loopback ports with a config file that turns the cache on in a given directory, waits until
both listeners accept, and on the way out kills the process by its PID (SIGKILL when the test did
not already). Its stderr goes to a file the test reads for log lines. The origin is the in-test
scriptable origin; requests go through httpx with ``proxy=``; metrics are scraped from the
daemon's admin listener.

What is asserted is what a user would see: intact bodies (sha256), which requests reached the
origin, Cache-Status, metrics and log lines. Store internals are used only as documented in
proxyd/cache/store.py (bodies being written live in ``tmp/*.part``) to prove the crash happened in
the middle of a store.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import h11
import httpx
import pytest
import trio

from tests.cache.test_rfc9111 import cache_status, is_hit, scrape, seen
from tests.conftest import eventually
from tests.origin import Exchange, Origin

pytestmark = pytest.mark.e2e

START_TIMEOUT = 10.0


def proxyd_command() -> list[str]:
    installed = shutil.which("proxyd")
    return [installed] if installed is not None else [sys.executable, "-m", "proxyd"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def is_listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Daemon:
    process: trio.Process
    port: int
    admin_port: int
    stderr_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def stderr(self) -> str:
        return self.stderr_path.read_text("utf-8", errors="replace")

    def kill(self) -> None:
        """SIGKILL, by PID: no shutdown code of the daemon runs."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)


@asynccontextmanager
async def daemon(workdir: Path, name: str, cache_dir: Path) -> AsyncIterator[Daemon]:
    """A proxyd process with the cache on in ``cache_dir``; killed by PID on the way out."""
    port, admin_port = free_port(), free_port()
    config = workdir / f"{name}.yaml"
    config.write_text(
        f'listen: ["127.0.0.1:{port}"]\n'
        f'admin: {{listen: "127.0.0.1:{admin_port}"}}\n'
        f'via: {{pseudonym: "proxyd-{name}"}}\n'
        "log_level: info\n"
        f'cache: {{enabled: true, dir: "{cache_dir}"}}\n',
        "utf-8",
    )
    stderr_path = workdir / f"{name}.stderr"
    err: IO[bytes]
    with (workdir / f"{name}.stdout").open("wb") as out, stderr_path.open("ab") as err:
        process = await trio.lowlevel.open_process(
            [*proxyd_command(), "--config", str(config)], stdin=None, stdout=out, stderr=err
        )
        running = Daemon(process, port, admin_port, stderr_path)
        try:
            with trio.fail_after(START_TIMEOUT):
                while not (is_listening(port) and is_listening(admin_port)):
                    if process.poll() is not None:
                        pytest.fail(f"proxyd {name} exited: {running.stderr()}")
                    await trio.sleep(0.05)
            yield running
        finally:
            running.kill()
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await process.wait()


def client(proxy: str | None = None, connections: int = 10) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(proxy=proxy, trust_env=False, timeout=20, limits=limits)


def part_files(cache_dir: Path) -> list[Path]:
    """Bodies being written (store.py: ``tmp/<token>.part``)."""
    return sorted((cache_dir / "tmp").glob("*.part"))


def clean_log(text: str) -> None:
    assert "database is locked" not in text.lower(), text
    assert "Traceback" not in text, text


# --- kill -9 in the middle of a store ------------------------------------------------------------


async def test_kill_during_a_store_leaves_no_partial_entry(tmp_path: Path, origin: Origin) -> None:
    """A daemon killed (SIGKILL) while storing a large body: after a restart on the same
    directory the partial body is never served; the next request goes to the origin and gets the
    whole body, which is then stored and served as a hit; the orphan temp file is swept."""
    cache_dir = tmp_path / "cache"
    size = 16 << 20
    body = random.Random(9).randbytes(size)
    release = trio.Event()
    count = 0

    async def handler(exchange: Exchange) -> None:
        nonlocal count
        count += 1
        headers = [(b"Content-Length", b"%d" % size), (b"Cache-Control", b"max-age=600")]
        await exchange.send_event(h11.Response(status_code=200, headers=headers))
        half = size // 2 if count == 1 else size
        for offset in range(0, half, 1 << 18):
            await exchange.send_event(h11.Data(data=body[offset : min(half, offset + (1 << 18))]))
        if count == 1:
            await release.wait()  # the daemon dies before the rest is sent
            await exchange.send_event(h11.Data(data=body[half:]))
        await exchange.send_event(h11.EndOfMessage())

    origin.route("/big", handler)
    url = origin.url("/big")
    async with daemon(tmp_path, "first", cache_dir) as first, client(first.url) as http:
        received = 0
        try:
            async with http.stream("GET", url) as response:
                async for chunk in response.aiter_raw():
                    received += len(chunk)
                    if received >= 4 << 20 and part_files(cache_dir):
                        break
        except httpx.TransportError:
            pass
        assert received >= 4 << 20
        partial = part_files(cache_dir)
        assert partial and partial[0].stat().st_size > 0, "precondition: a body is being stored"
        first.kill()
        with trio.fail_after(5):
            await first.process.wait()
    release.set()

    async with daemon(tmp_path, "second", cache_dir) as second, client(second.url) as http:
        with trio.fail_after(20):
            after = await http.get(url)
            again = await http.get(url)
        assert after.status_code == 200
        assert hashlib.sha256(after.content).digest() == hashlib.sha256(body).digest()
        assert not is_hit(after)
        assert cache_status(after).get("fwd") == "uri-miss"
        assert len(seen(origin, "/big")) == 2
        assert is_hit(again)
        assert again.content == body
        assert not [p for p in partial if p.exists()], "the orphan temp file was not swept"
        clean_log(second.stderr())


# --- two daemons on one directory ----------------------------------------------------------------


async def test_two_daemons_share_one_cache_directory(tmp_path: Path, origin: Origin) -> None:
    """Two proxyd processes on one cache.dir under a bounded concurrent load (stores, hits,
    invalidations from both at once): every answer is right, neither logs an error or "database
    is locked", and an entry stored by one is served as a hit by the other."""
    cache_dir = tmp_path / "cache"
    paths = 24

    def body_of(path: str) -> bytes:
        return (path.encode() + b" ") * 2000

    async def handler(exchange: Exchange) -> None:
        await exchange.read_body()
        path = exchange.request.target.decode()
        if exchange.request.method == b"GET":
            headers = [(b"Cache-Control", b"max-age=600")]
            await exchange.respond(200, body_of(path), headers)
        else:
            await exchange.respond(204, b"", [], content_length=False)

    for index in range(paths):
        origin.route(f"/load/{index}", handler)
    origin.route("/shared", handler)

    async with (
        daemon(tmp_path, "a", cache_dir) as a,
        daemon(tmp_path, "b", cache_dir) as b,
        client(a.url, 8) as via_a,
        client(b.url, 8) as via_b,
    ):
        failures: list[str] = []
        done = 0

        async def worker(number: int) -> None:
            nonlocal done
            for round_ in range(3):
                for index in range(number, paths, 8):
                    path = f"/load/{index}"
                    first, second = (via_a, via_b) if (index + round_) % 2 else (via_b, via_a)
                    for http in (first, second, first):
                        response = await http.get(origin.url(path))
                        if response.status_code != 200 or response.content != body_of(path):
                            failures.append(f"GET {path}: {response.status_code}")
                        done += 1
                    if round_ == 1:  # §4.4 invalidation: a write from one process
                        response = await second.post(origin.url(path), content=b"x")
                        if response.status_code != 204:
                            failures.append(f"POST {path}: {response.status_code}")
                        done += 1

        with trio.fail_after(40):
            async with trio.open_nursery() as nursery:
                for number in range(8):
                    nursery.start_soon(worker, number)
        assert failures == []
        assert done == paths * 3 * 3 + paths

        stored = (await scrape(a.admin_url)).value("proxyd_cache_stored_total")
        stored_by_a = await via_a.get(origin.url("/shared"))
        assert cache_status(stored_by_a).get("stored") is True
        # A commits the entry just after its client has the body: wait for that commit.
        with trio.fail_after(5):
            while (await scrape(a.admin_url)).value("proxyd_cache_stored_total") == stored:  # noqa: ASYNC110
                await trio.sleep(0.02)
        served_by_b = await via_b.get(origin.url("/shared"))
        assert is_hit(served_by_b)
        assert served_by_b.content == body_of("/shared")
        assert len(seen(origin, "/shared")) == 1
        for running in (a, b):
            samples = await scrape(running.admin_url)
            assert samples.value("proxyd_cache_store_errors_total") == 0
            assert samples.value("proxyd_cache_lookups_total", result="hit") > 0
            clean_log(running.stderr())


# --- disk full ---------------------------------------------------------------------------------


@asynccontextmanager
async def tiny_tmpfs(directory: Path) -> AsyncIterator[Path]:
    """A 1 MiB tmpfs mounted on ``directory`` (skips the test when mounting is not allowed)."""
    await trio.Path(directory).mkdir()
    mount = shutil.which("mount")
    if mount is None:
        pytest.skip("no mount command")
    result = await trio.run_process(
        [mount, "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(directory)],
        check=False,
        capture_stdout=True,
        capture_stderr=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield directory
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await trio.run_process(["umount", str(directory)], check=False)


async def test_disk_full_still_relays_the_whole_response(tmp_path: Path, origin: Origin) -> None:
    """cache.dir on a 1 MiB tmpfs and a 3 MiB response of unknown length: the store runs out of
    space mid-body, yet the client gets every byte; the failure is counted
    (proxyd_cache_store_errors_total), storing is paused (proxyd_cache_paused), no partial body
    is left on the disk, and later requests are still answered intact."""
    size = 3 << 20
    body = random.Random(3).randbytes(size)

    async def handler(exchange: Exchange) -> None:
        # No Content-Length: chunked, so nothing can tell the store the size up front.
        await exchange.send_event(
            h11.Response(status_code=200, headers=[(b"Cache-Control", b"max-age=600")])
        )
        for offset in range(0, size, 1 << 17):
            await exchange.send_event(h11.Data(data=body[offset : offset + (1 << 17)]))
        await exchange.send_event(h11.EndOfMessage())

    origin.route("/huge", handler)
    async with (
        tiny_tmpfs(tmp_path / "cache") as cache_dir,
        daemon(tmp_path, "full", cache_dir) as full,
        client(full.url) as http,
    ):
        with trio.fail_after(20):
            response = await http.get(origin.url("/huge"))
        assert response.status_code == 200
        assert len(response.content) == size
        assert hashlib.sha256(response.content).digest() == hashlib.sha256(body).digest()
        samples = await scrape(full.admin_url)
        assert samples.value("proxyd_cache_store_errors_total") > 0
        assert samples.value("proxyd_cache_paused") == 1
        assert samples.value("proxyd_cache_entries") == 0
        await eventually(lambda: part_files(cache_dir) == [], timeout=5)
        with trio.fail_after(20):
            later = await http.get(origin.url("/huge"))
        assert later.content == body
        assert not is_hit(later)
        assert len(seen(origin, "/huge")) == 2
        assert "Traceback" not in full.stderr()

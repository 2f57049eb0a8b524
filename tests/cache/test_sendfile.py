"""Cache hits sent with sendfile(2): byte-exact bodies, ranges, HEAD, backpressure, a client that
leaves mid-body, keep-alive, the idle bound, the fallback, and proof that sendfile is used.

How these tests work: an in-process proxyd (the real server, real loopback sockets) with the cache
on a fresh directory, and the scriptable origin serving pseudo-random bodies (seeded by size, so a
byte served from the wrong offset is caught) with ``Cache-Control: max-age=600``. The client is a
raw h11 client on one TCP connection (``Client``): several exchanges in a row prove that the
proxy's h11 state stays right after a body h11 never saw, and that the Content-Length it declared
is exactly what arrived (h11 on our side checks the framing). The first request for a URL fills
the cache; on the same connection the proxy reads the next request only after the previous
exchange is over, its commit included, so the next one is a hit.

``HttpCache.sendfile_responses`` / ``sendfile_bytes`` count what went by sendfile(2): hits of the
memory tier (``cache.memory_object_size``) and below ``SENDFILE_MIN`` never do; larger ones do.
"""

from __future__ import annotations

import errno
import importlib
import os
import random
import socket
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from types import ModuleType
from typing import Any

import h11
import pytest
import trio

from proxyd.cache.store import READ_CHUNK
from proxyd.cache.transaction import (
    SENDFILE_HOP,
    SENDFILE_MIN,
    HttpCache,
    _FileSpan,
    sendfile_to_socket,
)
from proxyd.http.relay import ClientGone
from tests.cache.test_rfc9111 import cache_settings, scrape
from tests.cache.test_store import (
    NOW,
    holds_bytes,
    open_store,
    pattern,
    put,
    read_all_from,
)
from tests.conftest import RunningProxy, StartProxy, eventually
from tests.origin import Exchange, Origin

KIB = 1024
MIB = 1 << 20
FRESH = (b"Cache-Control", b"max-age=600")


def body_of(size: int) -> bytes:
    return random.Random(size).randbytes(size)


def serve_blob(origin: Origin, path: str, body: bytes) -> None:
    async def handler(exchange: Exchange) -> None:
        await exchange.read_body()
        await exchange.respond(200, body, [FRESH, (b"Content-Type", b"application/octet-stream")])

    origin.route(path, handler)


def cache_of(proxy: RunningProxy) -> HttpCache:
    cache = proxy.server.cache
    assert cache is not None
    return cache


class Client:
    """One keep-alive connection to the proxy, spoken with h11's client role."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.cc = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, port: int, *, rcvbuf: int | None = None) -> Client:
        sock = trio.socket.socket()
        if rcvbuf is not None:  # before connect: the window is fixed (no receive autotuning)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect(("127.0.0.1", port))
        return cls(trio.SocketStream(sock))

    async def send_request(
        self, method: bytes, url: str, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        if self.cc.our_state is h11.DONE and self.cc.their_state is h11.DONE:
            self.cc.start_next_cycle()
        host = url.split("/")[2].encode()
        request = h11.Request(
            method=method, target=url.encode(), headers=[(b"Host", host), *(headers or [])]
        )
        await self.stream.send_all(self.cc.send(request) + self.cc.send(h11.EndOfMessage()))

    async def next_event(
        self, receive: int = MIB
    ) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        event = self.cc.next_event()
        if event is h11.NEED_DATA:
            self.cc.receive_data(await self.stream.receive_some(receive))
        return event

    async def read_response(self) -> tuple[h11.Response, bytes]:
        response: h11.Response | None = None
        chunks: list[bytes] = []
        with trio.fail_after(20):
            while True:
                event = await self.next_event()
                if type(event) is h11.Response:
                    response = event
                elif type(event) is h11.Data:
                    chunks.append(bytes(event.data))
                elif type(event) is h11.EndOfMessage:
                    break
                elif type(event) is h11.ConnectionClosed:
                    raise AssertionError("the proxy closed the connection mid-response")
        assert response is not None
        return response, b"".join(chunks)

    async def get(
        self, url: str, headers: list[tuple[bytes, bytes]] | None = None, method: bytes = b"GET"
    ) -> tuple[h11.Response, bytes]:
        await self.send_request(method, url, headers)
        return await self.read_response()


def field(response: h11.Response, name: bytes) -> bytes | None:
    for key, value in response.headers:
        if key == name:
            return bytes(value)
    return None


def is_hit(response: h11.Response) -> bool:
    status = field(response, b"cache-status") or b""
    return b"; hit" in status


async def fill(client: Client, url: str, body: bytes) -> None:
    """The first request (a miss, stored), then a HEAD on the same connection that must be a
    hit: from then on the entry is committed, for any connection."""
    response, got = await client.get(url)
    assert response.status_code == 200
    assert got == body
    await settle(client, url)


async def settle(client: Client, url: str) -> None:
    """A HEAD hit on this connection: the proxy reads it only once the previous exchange is
    over (counters updated), and it sends no body (no counter moves)."""
    response, got = await client.get(url, method=b"HEAD")
    assert is_hit(response)
    assert got == b""


@pytest.fixture
async def cache_proxy(start_proxy: StartProxy, tmp_path: Path) -> RunningProxy:
    return await start_proxy(**cache_settings(tmp_path / "cache"))


# --- the h11 contract the design rests on --------------------------------------------------------


def _builds() -> list[ModuleType]:
    """Every h11 build proxyd may run on here: the pure one, and the compiled one if installed."""
    builds = [h11]
    with suppress(ImportError):
        builds.append(importlib.import_module("h11_mypyc"))
    return builds


def _answering(build: ModuleType, length: int) -> Any:
    """A server connection that has read a GET and sent a head with Content-Length: length."""
    cc = build.Connection(build.SERVER)
    cc.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert type(cc.next_event()) is build.Request
    assert type(cc.next_event()) is build.EndOfMessage
    cc.send(build.Response(status_code=200, headers=[(b"Content-Length", b"%d" % length)]))
    return cc


@pytest.mark.parametrize("build", _builds(), ids=lambda m: m.__name__)
def test_h11_frames_a_placeholder_and_hands_it_back(build: ModuleType) -> None:
    """h11's documented sendfile support, which _send_file rests on (in each build proxyd may
    use, see proxyd/_h11.py): a Data whose data only has len() is counted against
    Content-Length and handed back as the very object; EndOfMessage then ends the message and
    the next cycle can start. Too many or too few bytes are refused, as with real bytes."""
    cc = _answering(build, 5)
    span = _FileSpan(5)
    parts = cc.send_with_data_passthrough(build.Data(data=span))
    assert parts is not None and len(parts) == 1 and parts[0] is span
    assert cc.send(build.EndOfMessage()) == b""
    assert cc.our_state is build.DONE
    cc.start_next_cycle()
    with pytest.raises(build.LocalProtocolError):
        _answering(build, 5).send_with_data_passthrough(build.Data(data=_FileSpan(6)))
    short = _answering(build, 5)
    short.send_with_data_passthrough(build.Data(data=_FileSpan(3)))
    with pytest.raises(build.LocalProtocolError):
        short.send(build.EndOfMessage())


# --- the store's side: a descriptor, no read-ahead ----------------------------------------------


@pytest.fixture
def thread_hops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the functions run in worker threads from now on (counted, then run for real)."""
    calls: list[str] = []
    real = trio.to_thread.run_sync

    async def counting(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        calls.append(getattr(fn, "__qualname__", repr(fn)))
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", counting)
    return calls


async def test_open_body_without_read_ahead_hands_out_the_descriptor(
    tmp_path: Path, thread_hops: list[str]
) -> None:
    """open_body(read_ahead=False): one hop opens the file and reads nothing; fileno() and size
    are what sendfile needs; read() still works. Bodies of the memory tier and followers have no
    descriptor to hand out."""
    store = await open_store(tmp_path, memory_object_size=1000)
    try:
        body = pattern(3 * READ_CHUNK + 5)
        entry = await put(store, "big", body)
        thread_hops.clear()
        reader = await store.open_body(entry, offset=READ_CHUNK, read_ahead=False)
        assert reader is not None
        assert len(thread_hops) == 1
        assert reader.cached() is None
        assert not holds_bytes(reader, 1)  # nothing was read ahead
        fd = reader.fileno()
        assert fd >= 0
        assert reader.size == len(body)
        assert os.pread(fd, 100, READ_CHUNK) == body[READ_CHUNK : READ_CHUNK + 100]
        assert await read_all_from(reader, 0) == body
        await reader.aclose()
        assert reader.fileno() == -1

        small = await put(store, "small", b"abc")
        memory = await store.open_body(small, read_ahead=False)
        assert memory is not None
        assert memory.cached() == b"abc"
        assert memory.fileno() == -1
        assert memory.size == 3

        writer = await store.begin("w", b"", 200, b"OK", [], NOW, NOW, None)
        assert writer is not None
        await writer.write(b"x" * 5000)
        follower = writer.open_follower()
        assert follower.fileno() == -1  # its file is still being written
        assert follower.size is None
        await follower.aclose()
        await writer.abort()
    finally:
        await store.aclose()


# --- byte-exact hits through the daemon ----------------------------------------------------------

SIZES = [
    0,
    1,
    64 * KIB - 1,
    64 * KIB,
    64 * KIB + 1,
    SENDFILE_MIN - 1,
    SENDFILE_MIN,
    SENDFILE_MIN + 1,
    MIB + 3,
    20 * MIB,
]


@pytest.mark.parametrize("size", SIZES)
async def test_hit_bodies_are_byte_exact(
    cache_proxy: RunningProxy, origin: Origin, size: int
) -> None:
    """Every size around the memory tier's bound and SENDFILE_MIN, and several sendfile hops
    (20 MiB > 2 x SENDFILE_HOP): the hit is the stored body, byte for byte, and sendfile carries
    exactly the bodies from SENDFILE_MIN on that the memory tier does not hold."""
    body = body_of(size)
    serve_blob(origin, "/blob", body)
    cache = cache_of(cache_proxy)
    client = await Client.connect(cache_proxy.port)
    await fill(client, origin.url("/blob"), body)
    before = cache.sendfile_responses, cache.sendfile_bytes
    response, got = await client.get(origin.url("/blob"))
    assert response.status_code == 200
    assert is_hit(response)
    assert field(response, b"content-length") == b"%d" % size
    assert got == body
    await settle(client, origin.url("/blob"))
    used = (cache.sendfile_responses - before[0], cache.sendfile_bytes - before[1])
    assert used == ((1, size) if size >= SENDFILE_MIN else (0, 0))
    assert len(origin.requests) == 1
    await client.stream.aclose()


async def test_the_read_path_serves_bodies_outside_the_memory_tier(
    start_proxy: StartProxy, origin: Origin, tmp_path: Path
) -> None:
    """With the memory tier off, bodies below SENDFILE_MIN are read (one hop) and written; from
    SENDFILE_MIN on they go by sendfile. Both byte-exact."""
    proxy = await start_proxy(**cache_settings(tmp_path / "cache", **{"cache.memory_size": 0}))
    cache = cache_of(proxy)
    client = await Client.connect(proxy.port)
    for size in (1, 64 * KIB + 1, SENDFILE_MIN - 1, SENDFILE_MIN, READ_CHUNK + 1):
        body = body_of(size)
        serve_blob(origin, f"/b{size}", body)
        await fill(client, origin.url(f"/b{size}"), body)
        before = cache.sendfile_responses
        response, got = await client.get(origin.url(f"/b{size}"))
        assert is_hit(response)
        assert got == body
        await settle(client, origin.url(f"/b{size}"))
        assert cache.sendfile_responses - before == (1 if size >= SENDFILE_MIN else 0)


# --- ranges and HEAD -----------------------------------------------------------------------------


async def test_ranges_of_a_large_body(cache_proxy: RunningProxy, origin: Origin) -> None:
    """RFC 9110 §14: single ranges of a stored body come as 206 with the exact bytes; a range
    of SENDFILE_MIN or more goes by sendfile from its offset, a small one is read."""
    size = 3 * MIB + 17
    body = body_of(size)
    serve_blob(origin, "/big", body)
    cache = cache_of(cache_proxy)
    client = await Client.connect(cache_proxy.port)
    await fill(client, origin.url("/big"), body)
    cases: list[tuple[bytes, int, int, bool]] = [
        (b"bytes=100-1048675", 100, 1048675, True),  # 1 MiB from an odd offset
        (b"bytes=-500000", size - 500000, size - 1, True),  # a suffix
        (b"bytes=2000000-", 2000000, size - 1, True),  # to the end
        (b"bytes=5-104", 5, 104, False),  # small: read, not sent by sendfile
        (b"bytes=%d-%d" % (READ_CHUNK - 1, READ_CHUNK), READ_CHUNK - 1, READ_CHUNK, False),
    ]
    for value, first, last, by_sendfile in cases:
        before = cache.sendfile_responses, cache.sendfile_bytes
        response, got = await client.get(origin.url("/big"), [(b"Range", value)])
        assert response.status_code == 206, value
        assert field(response, b"content-range") == b"bytes %d-%d/%d" % (first, last, size)
        assert field(response, b"content-length") == b"%d" % (last - first + 1)
        assert got == body[first : last + 1], value
        await settle(client, origin.url("/big"))
        sent = (cache.sendfile_responses - before[0], cache.sendfile_bytes - before[1])
        assert sent == ((1, last - first + 1) if by_sendfile else (0, 0)), value
    response, got = await client.get(origin.url("/big"), [(b"Range", b"bytes=%d-" % size)])
    assert response.status_code == 416
    assert got == b""
    assert len(origin.requests) == 1


async def test_head_of_a_large_stored_body(cache_proxy: RunningProxy, origin: Origin) -> None:
    """HEAD of a stored response: its fields with the body's Content-Length, no body, no
    sendfile; the GET after it on the same connection is still framed right."""
    body = body_of(2 * MIB)
    serve_blob(origin, "/big", body)
    cache = cache_of(cache_proxy)
    client = await Client.connect(cache_proxy.port)
    await fill(client, origin.url("/big"), body)
    before = cache.sendfile_responses
    response, got = await client.get(origin.url("/big"), method=b"HEAD")
    assert response.status_code == 200
    assert is_hit(response)
    assert field(response, b"content-length") == b"%d" % len(body)
    assert got == b""
    assert cache.sendfile_responses == before
    response, got = await client.get(origin.url("/big"))
    assert is_hit(response)
    assert got == body
    await settle(client, origin.url("/big"))
    assert cache.sendfile_responses == before + 1


# --- keep-alive ----------------------------------------------------------------------------------


async def test_many_hits_in_a_row_on_one_connection(
    cache_proxy: RunningProxy, origin: Origin
) -> None:
    """Sendfile hits, memory hits, ranges and HEADs alternate on one connection: h11 on both
    sides stays in step (each response exactly as long as it says, the next cycle starts)."""
    big, small = body_of(MIB + 3), body_of(3 * KIB)
    serve_blob(origin, "/big", big)
    serve_blob(origin, "/small", small)
    cache = cache_of(cache_proxy)
    client = await Client.connect(cache_proxy.port)
    await fill(client, origin.url("/big"), big)
    await fill(client, origin.url("/small"), small)
    before = cache.sendfile_responses
    for _ in range(3):
        response, got = await client.get(origin.url("/big"))
        assert is_hit(response) and got == big
        response, got = await client.get(origin.url("/small"))
        assert is_hit(response) and got == small
        response, got = await client.get(origin.url("/big"), [(b"Range", b"bytes=7-300006")])
        assert response.status_code == 206 and got == big[7:300007]
        response, got = await client.get(origin.url("/big"), method=b"HEAD")
        assert response.status_code == 200 and got == b""
    await settle(client, origin.url("/big"))
    assert cache.sendfile_responses == before + 6
    assert len(origin.requests) == 2


# --- a slow client, a client that leaves, one that stops reading ---------------------------------


async def _settled(read: Callable[[], int]) -> int:
    """Wait (bounded) until ``read()`` stops changing for a while; its value then."""
    with trio.fail_after(10):
        last = read()
        while True:
            await trio.sleep(0.2)
            now = read()
            if now == last:
                return now
            last = now


async def test_a_slow_client_sets_the_pace(cache_proxy: RunningProxy, origin: Origin) -> None:
    """Backpressure: while the client does not read, proxyd hands the kernel no more than the
    sockets hold (it keeps no copy of its own), and goes on when the client reads again; the
    body arrives whole."""
    size = 20 * MIB
    body = body_of(size)
    serve_blob(origin, "/big", body)
    cache = cache_of(cache_proxy)
    filler = await Client.connect(cache_proxy.port)
    await fill(filler, origin.url("/big"), body)
    await filler.stream.aclose()
    client = await Client.connect(cache_proxy.port, rcvbuf=64 * KIB)
    before = cache.sendfile_bytes
    await client.send_request(b"GET", origin.url("/big"))
    chunks: list[bytes] = []
    received = 0
    with trio.fail_after(20):
        while received < 256 * KIB:  # read a little, slowly
            event = await client.next_event(receive=16 * KIB)
            if type(event) is h11.Data:
                chunks.append(bytes(event.data))
                received += len(event.data)
            await trio.sleep(0.001)
    handed = await _settled(lambda: cache.sendfile_bytes - before)
    # The socket buffers (the proxy's send buffer, at most tcp_wmem's maximum, and our 64 KiB
    # window) bound what can be in flight; far below the 20 MiB body.
    assert 0 < handed < 8 * MIB, handed
    with trio.fail_after(20):
        while True:
            event = await client.next_event()
            if type(event) is h11.Data:
                chunks.append(bytes(event.data))
            elif type(event) is h11.EndOfMessage:
                break
    assert b"".join(chunks) == body
    await settle(client, origin.url("/big"))
    assert cache.sendfile_bytes - before == size
    await client.stream.aclose()


async def test_a_client_that_leaves_mid_body(cache_proxy: RunningProxy, origin: Origin) -> None:
    """The client resets the connection mid-body: the exchange ends as client_gone (logged once,
    no error escapes, the connection is closed), served bytes count only what went, and the
    proxy goes on serving."""
    size = 20 * MIB
    body = body_of(size)
    serve_blob(origin, "/big", body)
    filler = await Client.connect(cache_proxy.port)
    await fill(filler, origin.url("/big"), body)
    await filler.stream.aclose()
    served_before = (await scrape(cache_proxy.admin_url)).value("proxyd_cache_served_bytes_total")
    cache = cache_of(cache_proxy)
    by_sendfile = cache.sendfile_responses
    client = await Client.connect(cache_proxy.port, rcvbuf=64 * KIB)
    await client.send_request(b"GET", origin.url("/big"))
    received = 0
    with trio.fail_after(10):
        while received < 100 * KIB:
            event = await client.next_event(receive=16 * KIB)
            if type(event) is h11.Data:
                received += len(event.data)
    # RST rather than FIN: the proxy's next sendfile fails at once (ECONNRESET / EPIPE).
    client.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    await client.stream.aclose()
    await eventually(lambda: any("client_gone" in line for line in cache_proxy.access_lines()))
    samples = await scrape(cache_proxy.admin_url)
    services = cache_proxy.server.services
    assert services is not None
    await eventually(lambda: not services.connections)  # the connection was closed
    served = samples.value("proxyd_cache_served_bytes_total") - served_before
    assert received <= served < size
    assert cache.sendfile_bytes <= served  # the bytes sendfile moved, counted as served
    assert cache.sendfile_responses == by_sendfile + 1
    gone = [line for line in cache_proxy.access_lines() if "client_gone" in line]
    assert len(gone) == 1
    # The proxy is fine: a new connection gets the whole body from the cache.
    again = await Client.connect(cache_proxy.port)
    response, got = await again.get(origin.url("/big"))
    assert is_hit(response)
    assert got == body
    samples = await scrape(cache_proxy.admin_url)
    assert samples.value("proxyd_client_connections_active") == 1
    await again.stream.aclose()


async def test_a_client_that_stops_reading_is_cut_after_the_idle_timeout(
    start_proxy: StartProxy, origin: Origin, tmp_path: Path
) -> None:
    """A sendfile waiting for a full socket is bounded by the idle timeout (here
    upstream.timeouts.idle_read, 0.5 s): then the connection is closed as client_gone."""
    proxy = await start_proxy(
        **cache_settings(tmp_path / "cache", **{"upstream.timeouts.idle_read": 0.5})
    )
    body = body_of(20 * MIB)
    serve_blob(origin, "/big", body)
    filler = await Client.connect(proxy.port)
    await fill(filler, origin.url("/big"), body)
    await filler.stream.aclose()
    client = await Client.connect(proxy.port, rcvbuf=64 * KIB)
    await client.send_request(b"GET", origin.url("/big"))
    cache = cache_of(proxy)
    with trio.fail_after(10):
        await eventually(lambda: any("client_gone" in line for line in proxy.access_lines()), 10)
        # The proxy closed its end: what is buffered drains, then EOF (or a reset).
        try:
            while await client.stream.receive_some(MIB):
                pass
        except trio.BrokenResourceError:
            pass
    assert cache.sendfile_responses == 1
    assert 0 < cache.sendfile_bytes < len(body)
    await client.stream.aclose()


# --- the fallback --------------------------------------------------------------------------------


async def test_sendfile_refused_midway_falls_back_to_reading(
    cache_proxy: RunningProxy, origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system or socket that refuses sendfile(2) (EINVAL, ENOSYS): what went is kept,
    the rest is read and written; the client sees one whole, correctly framed body. (The
    refusal is simulated: this machine's file systems all support sendfile.)"""
    size = 3 * MIB + 5
    body = body_of(size)
    serve_blob(origin, "/big", body)
    client = await Client.connect(cache_proxy.port)
    await fill(client, origin.url("/big"), body)
    real = os.sendfile
    calls = 0

    def refuse_after_the_first(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            return real(out_fd, in_fd, offset, min(count, 100_000))
        raise OSError(errno.EINVAL, "sendfile refused")

    monkeypatch.setattr(os, "sendfile", refuse_after_the_first)
    response, got = await client.get(origin.url("/big"))
    assert is_hit(response)
    assert got == body
    # 1: 100,000 bytes went; 2: refused after progress, so that hop returns what went; 3: the
    # next hop meets the refusal first, and the rest is read and written.
    assert calls == 3
    monkeypatch.undo()
    response, got = await client.get(origin.url("/big"))  # the connection is still in step
    assert got == body


# --- sendfile_to_socket on its own ---------------------------------------------------------------


async def test_sendfile_to_socket_counts_ends_and_times_out(tmp_path: Path) -> None:
    """Returns the bytes that went (capped at SENDFILE_HOP per call), 0 at the file's end;
    a peer that does not read makes it raise ClientGone after the timeout, one that closed
    raises ClientGone at once."""
    path = tmp_path / "body"
    data = body_of(SENDFILE_HOP + 4 * MIB)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        a, b = trio.socket.socketpair()
        with a, b, trio.fail_after(10):
            assert await sendfile_to_socket(a, fd, len(data), 10, 1.0) == 0  # at the end
            # The peer does not read: once the buffers are full, ClientGone after the timeout.
            with pytest.raises(ClientGone, match="did not read"):
                while True:
                    assert await sendfile_to_socket(a, fd, 0, len(data), 0.3) > 0
        a, b = trio.socket.socketpair()
        with a, b, trio.fail_after(10):
            received = bytearray()

            async def reader() -> None:
                while len(received) < len(data):
                    piece = await b.recv(MIB)
                    assert piece
                    received.extend(piece)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                offset = 0
                while offset < len(data):
                    sent = await sendfile_to_socket(a, fd, offset, len(data) - offset, 5.0)
                    assert 0 < sent <= SENDFILE_HOP
                    offset += sent
            assert bytes(received) == data
        a, b = trio.socket.socketpair()
        with a, trio.fail_after(10):
            b.close()
            with pytest.raises(ClientGone, match="went away"):
                await sendfile_to_socket(a, fd, 0, 1000, 1.0)
    finally:
        os.close(fd)

"""http.sockio: the per-request socket I/O, on real socket pairs (and a memory stream for the
fallback). Writes that fit go out at once, partial writes wait and finish (bytes and writev
lists), timeouts without a cancel scope per wait end the wait and leave the socket usable, and a
socket closed by another task is still reported as closed, not as a timeout."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from proxyd.http import sockio


def _pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = socket.socketpair()
    return (
        trio.SocketStream(trio.socket.from_stdlib_socket(a)),
        trio.SocketStream(trio.socket.from_stdlib_socket(b)),
    )


async def _read_exactly(stream: trio.SocketStream, size: int) -> bytes:
    got = bytearray()
    while len(got) < size:
        chunk = await stream.receive_some(65536)
        assert chunk, "the writer closed early"
        got += chunk
    return bytes(got)


async def test_small_writes_complete_without_waiting() -> None:
    left, right = _pair()
    with trio.fail_after(5):
        assert await sockio.send_all(left, b"head", 5)
        assert await sockio.send_all(left, [b"one ", b"", b"two"], 5)
        assert await _read_exactly(right, 11) == b"headone two"


@pytest.mark.parametrize("as_list", [False, True])
async def test_a_write_larger_than_the_socket_buffer_waits_and_finishes(as_list: bool) -> None:
    left, right = _pair()
    big = bytes(range(256)) * 40_000  # ~10 MB: far more than a socket buffer holds
    parts = [b"HEAD", big[:3_000_001], big[3_000_001:]]
    expected = b"".join(parts)
    got = b""

    async def reader() -> None:
        nonlocal got
        got = await _read_exactly(right, len(expected))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            data: bytes | list[bytes] = parts if as_list else expected
            assert await sockio.send_all(left, data, 10)
    assert got == expected


async def test_a_peer_that_stops_reading_makes_the_write_time_out() -> None:
    left, _right = _pair()
    with trio.fail_after(5):
        assert not await sockio.send_all(left, b"x" * 20_000_000, 0.2)


async def test_receive_within_times_out_and_the_socket_stays_usable() -> None:
    left, right = _pair()
    with trio.fail_after(5):
        started = trio.current_time()
        assert await sockio.receive_within(left, 0.2, wait_first=True) is None
        assert trio.current_time() - started >= 0.2
        # The timed-out wait dropped the socket's registration; the next wait makes it again.
        await right.send_all(b"late")
        assert await sockio.receive_within(left, 5, wait_first=True) == b"late"
        await right.send_all(b"now")
        assert await sockio.receive_within(left, 5, wait_first=False) == b"now"


async def test_many_waits_on_one_timeout_end_in_time_and_leave_nothing_behind() -> None:
    pairs = [_pair() for _ in range(20)]
    results: list[bytes | None] = []

    async def waiter(stream: trio.SocketStream, timeout: float) -> None:
        results.append(await sockio.receive_within(stream, timeout, wait_first=True))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for index, (left, _) in enumerate(pairs):
                nursery.start_soon(waiter, left, 0.2 if index % 2 else 60)
            await trio.sleep(0.05)
            for index, (_, right) in enumerate(pairs):
                if index % 2 == 0:
                    await right.send_all(b"answer")
    assert sorted(results, key=lambda r: r or b"") == [None] * 10 + [b"answer"] * 10
    timers = sockio._timers()
    assert all(not waits for waits in timers._waits.values())


async def test_a_socket_closed_while_waiting_is_closed_not_timed_out() -> None:
    left, _right = _pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def close_soon() -> None:
                await trio.sleep(0.05)
                await left.aclose()

            nursery.start_soon(close_soon)
            with pytest.raises(trio.ClosedResourceError):
                await sockio.receive_within(left, 60, wait_first=True)


async def test_eof_and_a_reset_are_told_apart() -> None:
    left, right = _pair()
    with trio.fail_after(5):
        await right.aclose()
        assert await sockio.receive_within(left, 5, wait_first=True) == b""
    a, b = socket.socketpair()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    b.close()
    with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
        for _ in range(100):  # the first writes may still be buffered
            assert await sockio.send_all(stream, b"x" * 65536, 5)


async def test_receive_some_with_a_deadline() -> None:
    left, right = _pair()
    with trio.fail_after(5):
        assert await sockio.receive_some(left, trio.current_time() + 0.1, wait_first=True) is None
        await right.send_all(b"abc")
        assert await sockio.receive_some(left, trio.current_time() + 5, wait_first=False) == b"abc"


async def test_other_streams_take_trio_methods_under_the_same_rules() -> None:
    left, right = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        assert await sockio.send_all(left, [b"a", b"bc"], 5)
        assert await sockio.receive_within(right, 5, wait_first=True) == b"abc"
        assert await sockio.receive_within(right, 0.1, wait_first=True) is None
        assert await sockio.receive_some(right, trio.current_time() + 0.1, wait_first=False) is None


async def test_receive_after_others_reads_what_arrived_while_others_ran() -> None:
    """The answer sent while other tasks ran is read without a wait; with nothing there it
    waits like receive_within, and times out the same way."""
    left, right = _pair()
    order: list[str] = []

    async def peer() -> None:
        order.append("peer runs")
        await right.send_all(b"answer")

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer)
            data = await sockio.receive_after_others(left, 5)
            order.append("read")
        assert data == b"answer" and order == ["peer runs", "read"]
        assert await sockio.receive_after_others(left, 0.1) is None  # nothing came: timed out
        await right.send_all(b"later")
        assert await sockio.receive_after_others(left, 5) == b"later"


async def test_try_read_never_waits() -> None:
    left, right = _pair()
    assert sockio.try_read(left) is None
    await right.send_all(b"x")
    with trio.fail_after(5):
        await trio.lowlevel.wait_readable(left.socket)
    assert sockio.try_read(left) == b"x"
    await right.aclose()
    with trio.fail_after(5):
        await trio.lowlevel.wait_readable(left.socket)
    assert sockio.try_read(left) == b""  # EOF
    send, receive = trio.testing.memory_stream_pair()
    await send.send_all(b"y")
    assert sockio.try_read(receive) is None  # not a plain socket: never read here


def test_read_now_gives_each_read_its_own_bytes_of_its_own_size() -> None:
    """Reads share one scratch buffer (sockio.read_now): what a read returned must not change
    with the next read, and be exactly as long as what came (a bytes object, not a view)."""
    a, b = socket.socketpair()
    with a, b:
        b.setblocking(False)
        a.sendall(b"first" * 1000)
        first = sockio.read_now(b.fileno())
        a.sendall(b"2nd")
        second = sockio.read_now(b.fileno())
        assert type(first) is bytes and type(second) is bytes
        assert first == b"first" * 1000
        assert second == b"2nd"
        big = bytes(range(256)) * 320  # 80 KiB: more than one read's worth
        a.sendall(big)
        got = b""
        while len(got) < len(big):
            piece = sockio.read_now(b.fileno())
            assert 0 < len(piece) <= sockio.RECEIVE_SIZE
            got += piece
        assert got == big
        assert first == b"first" * 1000  # untouched by every later read
        with pytest.raises(BlockingIOError):
            sockio.read_now(b.fileno())
        a.close()
        assert sockio.read_now(b.fileno()) == b""  # EOF

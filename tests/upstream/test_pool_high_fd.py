"""A pooled socket whose descriptor is above FD_SETSIZE (1024) is checked like any other.

A daemon with a thousand client connections open hands out such descriptors to every new
upstream socket. ``UpstreamConnection.is_readable`` (an idle socket that turned readable was
closed by the origin and must not be reused) once used ``select()``, which refuses them: every
pooled socket then looked dead, and every request paid for a new connect
(bench/memory_bench.py's scaling check with 10,000 origins found it).
"""

from __future__ import annotations

import os
import resource
import socket

import pytest
import trio

from proxyd.upstream.pool import UpstreamConnection

HIGH_FD = 1500


@pytest.fixture
def high_fd_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair whose first socket has descriptor HIGH_FD."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= HIGH_FD:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low")
    if soft <= HIGH_FD:
        resource.setrlimit(resource.RLIMIT_NOFILE, (HIGH_FD + 1, hard))
    left, right = socket.socketpair()
    os.dup2(left.fileno(), HIGH_FD)
    left.close()
    return socket.socket(fileno=HIGH_FD), right


async def test_an_idle_socket_above_fd_setsize_is_reusable_until_the_peer_speaks(
    high_fd_pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, peer = high_fd_pair
    assert ours.fileno() > 1024
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
    conn = UpstreamConnection(stream, ("http", "origin.test", 80), 1, 0.0)
    try:
        assert not conn.is_readable()  # idle and silent: reusable
        peer.send(b"x")  # data on an idle HTTP/1.1 connection: junk, not reusable
        assert conn.is_readable()
    finally:
        peer.close()
        conn.close_now()


async def test_an_idle_socket_above_fd_setsize_closed_by_the_peer_is_readable(
    high_fd_pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, peer = high_fd_pair
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
    conn = UpstreamConnection(stream, ("http", "origin.test", 80), 1, 0.0)
    peer.close()  # EOF
    try:
        assert conn.is_readable()
    finally:
        conn.close_now()

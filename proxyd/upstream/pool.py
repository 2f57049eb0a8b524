"""Keep-alive upstream connections: idle sockets per origin, reused by the next request.

How it works: after a response completes cleanly on both sides (h11 DONE/DONE), the relay hands the
connection back with ``release``; it waits, most recently used first, in a per-origin list. The
next request to that origin takes it with ``take_idle``, which skips and closes any socket that
expired (``upstream.keepalive_idle``) or turned readable while idle: an idle HTTP/1.1 connection
has nothing to say, so readable means the origin closed it or sent junk, and reusing it would
produce a spurious error. A reaper task (``reap_forever``) closes expired sockets in the background.

This is deliberately a small pool (``upstream.max_idle_per_origin`` idle sockets kept per origin,
no limits on active ones): the limited per-group / per-proxy / global pools with waiters arrive in
their own issue with a pure ``pool_state`` module.
"""

from __future__ import annotations

import contextlib
import select
from dataclasses import dataclass

import h11
import trio

OriginKey = tuple[bytes, str, int]


class UpstreamConnection:
    """One socket to an origin and the h11 client-role state that speaks over it."""

    __slots__ = ("broken", "created_at", "h11", "idle_since", "origin", "requests", "stream")

    def __init__(self, stream: trio.abc.Stream, origin: OriginKey, now: float) -> None:
        self.stream = stream
        self.origin = origin
        self.h11 = h11.Connection(h11.CLIENT)
        self.created_at = now
        self.idle_since = now
        self.requests = 0
        #: Set when a write failed mid-exchange: whatever h11 believes, never reuse it.
        self.broken = False

    def _socket(self) -> trio.socket.SocketType:
        stream = self.stream
        if isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        assert isinstance(stream, trio.SocketStream)
        return stream.socket

    def is_readable(self) -> bool:
        """True when the idle socket has data or EOF pending (it must not be reused)."""
        try:
            fd = self._socket().fileno()
            if fd < 0:
                return True
            readable, _, _ = select.select((fd,), (), (), 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def close_now(self) -> None:
        """Close without awaiting (an idle or broken socket: no TLS close_notify owed)."""
        with contextlib.suppress(OSError):
            self._socket().close()


@dataclass(frozen=True, slots=True)
class PoolStats:
    idle: int
    origins: int
    reused: int
    expired: int
    discarded_readable: int


class OriginPool:
    def __init__(self, *, keepalive_idle: float, max_idle_per_origin: int) -> None:
        self._idle: dict[OriginKey, list[UpstreamConnection]] = {}
        self._keepalive_idle = keepalive_idle
        self._max_idle = max_idle_per_origin
        self._reused = 0
        self._expired = 0
        self._discarded_readable = 0

    def take_idle(self, origin: OriginKey, now: float) -> UpstreamConnection | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if now - conn.idle_since >= self._keepalive_idle:
                self._expired += 1
                conn.close_now()
                continue
            if conn.is_readable():
                self._discarded_readable += 1
                conn.close_now()
                continue
            self._reused += 1
            return conn
        return None

    def release(self, conn: UpstreamConnection, now: float) -> None:
        """Hand back a connection whose exchange finished cleanly; close it if it can't idle."""
        state = conn.h11
        if conn.broken or state.our_state is not h11.DONE or state.their_state is not h11.DONE:
            conn.close_now()
            return
        state.start_next_cycle()
        idle = self._idle.setdefault(conn.origin, [])
        if len(idle) >= self._max_idle:
            conn.close_now()
            return
        conn.idle_since = now
        idle.append(conn)

    def reap(self, now: float) -> int:
        """Close idle sockets past their keep-alive time; returns how many."""
        closed = 0
        for origin in list(self._idle):
            keep = []
            for conn in self._idle[origin]:
                if now - conn.idle_since >= self._keepalive_idle:
                    conn.close_now()
                    closed += 1
                else:
                    keep.append(conn)
            if keep:
                self._idle[origin] = keep
            else:
                del self._idle[origin]
        self._expired += closed
        return closed

    async def reap_forever(self, interval: float = 1.0) -> None:
        while True:
            await trio.sleep(interval)
            self.reap(trio.current_time())

    def close_all(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close_now()
        self._idle.clear()

    def stats(self) -> PoolStats:
        return PoolStats(
            idle=sum(len(v) for v in self._idle.values()),
            origins=len(self._idle),
            reused=self._reused,
            expired=self._expired,
            discarded_readable=self._discarded_readable,
        )

"""Upstream socket pools: the trio shell around ``pool_state.PoolState``.

How it works: ``acquire(key)`` registers a waiter and asks the pure state for a plan; ``_apply``
carries the plan out with no await in between: grants wake waiters, connects start as tasks in the
pool's own nursery (so a connect outlives the request that triggered it and, if nobody wants its
socket any more, the socket simply goes idle), closes close sockets. The waiter then sleeps until
it is granted a socket, gets a connect error, or ``pool.timeout`` passes (503
``connection_limit_reached``). A granted socket that sat idle is checked once more: an idle
HTTP/1.1 connection has nothing to say, so a readable one was closed by the origin (or sent junk)
and is discarded instead of handed out — the request asks again.

``release(conn, reusable)`` is synchronous: the exchange knows whether HTTP allows reuse (h11 states
DONE/DONE, nothing broken), and the state either hands the socket straight to the oldest waiter of
its group (late binding) or keeps it idle. A reaper task expires idle sockets every second.

CONNECT tunnels and WebSocket sessions are not pooled: ``tunnel_slot(host)`` bounds them per host
(``pool.tunnels_per_host``, Chromium's 255 for WebSockets), apart from the HTTP limits.

``reconfigure(config)`` (a config reload) applies new limits and timeouts to acquisitions from then
on: sockets and tunnels already open stay, even above a lowered limit (see ``pool_state``).
"""

from __future__ import annotations

import contextlib
import itertools
import select
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any

import h11
import trio

from proxyd.config import PoolConfig
from proxyd.errors import ConnectionLimitReached, DestinationUnavailable, ProxydError
from proxyd.observe.metrics import Metrics
from proxyd.upstream.pool_state import GroupStats, Limits, Plan, PoolState
from proxyd.upstream.route import Direct, ViaProxy, route_kind

GroupKey = Hashable
Connector = Callable[[Any], Awaitable[trio.abc.Stream]]


class UpstreamConnection:
    """One socket to an origin (or a proxy) and the h11 client-role state that speaks over it."""

    __slots__ = (
        "broken",
        "created_at",
        "h11",
        "idle_since",
        "key",
        "requests",
        "socket_id",
        "stream",
        "was_idle",
    )

    def __init__(self, stream: trio.abc.Stream, key: GroupKey, socket_id: int, now: float) -> None:
        self.stream = stream
        self.key = key
        self.socket_id = socket_id
        self.h11 = h11.Connection(h11.CLIENT)
        self.created_at = now
        self.idle_since = now
        self.requests = 0
        #: Set when a write failed mid-exchange: whatever h11 believes, never reuse it.
        self.broken = False
        #: The socket waited in the idle list (so it must be checked before use).
        self.was_idle = False

    def _socket(self) -> trio.socket.SocketType:
        stream: object = self.stream
        while not isinstance(stream, trio.SocketStream):
            inner = getattr(stream, "transport_stream", None) or getattr(stream, "inner", None)
            if inner is None:
                break
            stream = inner
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


@dataclass(slots=True)
class _Waiter:
    event: trio.Event
    conn: UpstreamConnection | None = None
    error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.conn is not None or self.error is not None


@dataclass(frozen=True, slots=True)
class GroupSnapshot:
    """One pool group as the status page and metrics see it (no credentials, no secrets)."""

    name: str  # "http://host:port via DIRECT"
    route_kind: str
    active: int
    idle: int
    connecting: int
    waiting: int


@dataclass(frozen=True, slots=True)
class PoolStats:
    groups: list[GroupSnapshot]
    total: int
    tunnels: int


def _limits(config: PoolConfig) -> Limits:
    return Limits(
        per_group=config.per_group,
        per_proxy=config.per_proxy,
        total=config.total,
        idle_unused=config.idle_unused,
        idle_used=config.idle_used,
    )


def _snapshot(group: GroupStats) -> GroupSnapshot:
    key = group.key
    if isinstance(key, tuple) and len(key) == 4:
        scheme, host, port, route = key
        scheme_text = scheme.decode() if isinstance(scheme, bytes) else str(scheme)
        name = f"{scheme_text}://{host}:{port} via {getattr(route, 'label', route)}"
        kind = route_kind(route) if isinstance(route, (Direct, ViaProxy)) else "direct"
    else:
        name, kind = str(key), "direct"
    return GroupSnapshot(name, kind, group.active, group.idle, group.connecting, group.waiting)


class Pool:
    def __init__(
        self,
        config: PoolConfig,
        *,
        connector: Connector,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.config = config
        self.state = PoolState(_limits(config))
        self._connector = connector
        self._metrics = metrics
        self._clock = clock
        self._conns: dict[int, UpstreamConnection] = {}
        self._waiters: dict[int, _Waiter] = {}
        self._ids = itertools.count(1)
        self._nursery: trio.Nursery | None = None
        self._tunnels: dict[str, trio.CapacityLimiter] = {}

    # --- lifecycle -------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Own the connect tasks and the idle reaper; runs until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                while True:
                    await trio.sleep(1.0)
                    self._apply(self.state.expire(self._clock()))
        finally:
            self._nursery = None
            self.close_all()

    def reconfigure(self, config: PoolConfig) -> None:
        """New limits and timeouts for acquisitions from now on (a config reload)."""
        self.config = config
        self._apply(self.state.set_limits(_limits(config), self._clock()))
        for limiter in self._tunnels.values():
            # Raising wakes waiters at once; lowering lets the tunnels open now finish.
            limiter.total_tokens = config.tunnels_per_host

    def close_all(self) -> None:
        self._apply(self.state.close_all_idle())
        for conn in list(self._conns.values()):
            conn.close_now()
        self._conns.clear()

    # --- acquiring and releasing -----------------------------------------------------------

    async def acquire(
        self, key: GroupKey, proxy: str | None, *, fresh: bool = False
    ) -> UpstreamConnection:
        """A socket of ``key`` (``proxy``: the label it counts against), reused or new."""
        while True:
            socket_id = None if fresh else self.state.take_idle(key, self._clock())
            if socket_id is not None:
                conn = self._conns[socket_id]
            else:
                conn = await self._acquire_once(key, proxy, fresh)
            if conn.was_idle and conn.is_readable():
                # The origin closed it while it idled: discard, and ask again.
                conn.close_now()
                self._conns.pop(conn.socket_id, None)
                if self._metrics is not None:
                    self._metrics.pool_closed.labels("readable").inc()
                self._apply(self.state.discard_idle(key, conn.socket_id, self._clock()))
                continue
            conn.was_idle = False
            return conn

    async def _acquire_once(
        self, key: GroupKey, proxy: str | None, fresh: bool
    ) -> UpstreamConnection:
        waiter_id = next(self._ids)
        waiter = _Waiter(trio.Event())
        self._waiters[waiter_id] = waiter
        try:
            plan = self.state.request(key, proxy, waiter_id, self._clock(), fresh=fresh)
            limited = not waiter.done and not plan.connects
            self._apply(plan)
            if not waiter.done:
                metrics = self._metrics
                started = self._clock()
                if limited and metrics is not None:
                    metrics.pool_waits.inc()
                with trio.move_on_after(self.config.timeout):
                    await waiter.event.wait()
                if limited and metrics is not None:
                    metrics.pool_wait_duration.observe(self._clock() - started)
                if not waiter.done:
                    if metrics is not None:
                        metrics.pool_wait_timeouts.inc()
                    raise ConnectionLimitReached(
                        f"no upstream connection became available within {self.config.timeout:g}s"
                    )
        except BaseException:
            # Cancelled (the client left) or timed out after all: a socket granted in the
            # meantime goes back untouched, or its slot would leak.
            if waiter.conn is not None:
                self._return_unused(waiter.conn)
            raise
        finally:
            del self._waiters[waiter_id]
            if not waiter.done:
                self._apply(self.state.cancel(key, waiter_id))
        if waiter.error is not None:
            raise waiter.error
        assert waiter.conn is not None
        return waiter.conn

    def release(self, conn: UpstreamConnection, *, reusable: bool) -> None:
        """The exchange is over. Reusable only when HTTP allows it and nothing broke."""
        if conn.socket_id not in self._conns:
            conn.close_now()  # the pool was closed meanwhile
            return
        state = conn.h11
        reusable = (
            reusable
            and not conn.broken
            and state.our_state is h11.DONE
            and state.their_state is h11.DONE
        )
        now = self._clock()
        if reusable:
            state.start_next_cycle()
            if self.state.release_idle(conn.key, conn.socket_id, now):
                conn.idle_since = now
                conn.was_idle = True
                return
        else:
            conn.close_now()
            del self._conns[conn.socket_id]
        self._settle(conn, self.state.release(conn.key, conn.socket_id, reusable, now), now)

    def _return_unused(self, conn: UpstreamConnection) -> None:
        """A socket granted to a request that vanished before using it: back to the pool."""
        now = self._clock()
        self._settle(conn, self.state.release(conn.key, conn.socket_id, True, now), now)

    def _settle(self, conn: UpstreamConnection, plan: Plan, now: float) -> None:
        handed_over = any(socket_id == conn.socket_id for _, socket_id in plan.grants)
        if not handed_over:
            conn.idle_since = now
            conn.was_idle = True  # it waits in the idle list: check it before the next use
        else:
            conn.was_idle = False
        self._apply(plan)

    # --- applying plans --------------------------------------------------------------------

    def _apply(self, plan: Plan) -> None:
        if not plan:
            return
        for waiter_id, socket_id in plan.grants:
            conn = self._conns[socket_id]
            waiter = self._waiters.get(waiter_id)
            if waiter is None:  # cannot happen: cancelled waiters leave the queue first
                self.release(conn, reusable=True)
                continue
            waiter.conn = conn
            waiter.event.set()
        for waiter_id, error in plan.failures:
            waiter = self._waiters.get(waiter_id)
            if waiter is not None:
                waiter.error = error if isinstance(error, BaseException) else RuntimeError(error)
                waiter.event.set()
        for socket_id, reason in zip(plan.close, plan.close_reasons, strict=True):
            closing = self._conns.pop(socket_id, None)
            if closing is not None:
                closing.close_now()
            if self._metrics is not None:
                self._metrics.pool_closed.labels(reason).inc()
        for key in plan.connects:
            if self._nursery is None:
                self._apply(
                    self.state.connect_failed(
                        key,
                        DestinationUnavailable("the upstream pool is not running"),
                        self._clock(),
                    )
                )
                continue
            self._nursery.start_soon(self._connect, key)

    async def _connect(self, key: GroupKey) -> None:
        try:
            stream = await self._connector(key)
        except ProxydError as exc:
            self._apply(self.state.connect_failed(key, exc, self._clock()))
            return
        except trio.Cancelled:
            self._apply(
                self.state.connect_failed(
                    key, DestinationUnavailable("the proxy is shutting down"), self._clock()
                )
            )
            raise
        except Exception as exc:  # an unexpected failure must still free the slot
            error = DestinationUnavailable(f"connect failed: {exc!r}")
            self._apply(self.state.connect_failed(key, error, self._clock()))
            return
        now = self._clock()
        socket_id = next(self._ids)
        conn = UpstreamConnection(stream, key, socket_id, now)
        self._conns[socket_id] = conn
        plan = self.state.connect_succeeded(key, socket_id, now)
        if not plan.grants:
            conn.was_idle = True
        self._apply(plan)

    # --- tunnels ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def tunnel_slot(self, host: str) -> AsyncIterator[None]:
        """Bound CONNECT tunnels / WebSocket sessions per host (not pooled, separate limit)."""
        limiter = self._tunnels.get(host)
        if limiter is None:
            limiter = self._tunnels[host] = trio.CapacityLimiter(self.config.tunnels_per_host)
        token = object()
        with trio.move_on_after(self.config.timeout) as scope:
            await limiter.acquire_on_behalf_of(token)
        if scope.cancelled_caught:
            raise ConnectionLimitReached(
                f"{self.config.tunnels_per_host} tunnels to {host} are open already"
            )
        try:
            yield
        finally:
            limiter.release_on_behalf_of(token)
            if limiter.borrowed_tokens == 0 and not limiter.statistics().tasks_waiting:
                self._tunnels.pop(host, None)

    # --- views -----------------------------------------------------------------------------

    def stats(self) -> PoolStats:
        return PoolStats(
            groups=[_snapshot(group) for group in self.state.stats()],
            total=self.state.total,
            tunnels=sum(int(limiter.borrowed_tokens) for limiter in self._tunnels.values()),
        )

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
DONE/DONE, or IDLE/IDLE after an exchange http.fastpath relayed without h11; nothing broken), and
the state either hands the socket straight to the oldest waiter of its group (late binding) or
keeps it idle. A reaper task expires idle sockets every second.

Writing ahead: a waiter may bring the request head it will send (``acquire(..., ahead=head)``,
the relay's fast path for a plain GET). When ``release`` hands a socket straight to that waiter,
it also writes the head on the socket, at once and without blocking (what the kernel takes, if
the socket is a plain TCP one whose h11 state is idle), and records how much went out in
``conn.sent_ahead``. The waiter's task, woken by the hand-over, then finds its request sent and
the answer coming: one scheduler pass per request fewer (the pass between writing the request and
reading the answer) for every request that queued behind ``pool.per_group``. A socket with a
request written ahead is never handed to anyone else: should its waiter vanish before using it,
the socket is closed (``_return_unused``).

The per-request path: with more clients of one origin than ``pool.per_group`` sockets, most
requests wait here, so waiting is kept cheap. The common cases skip the plan (``take_idle``,
``queue_if_full``, ``hand_over``, ``release_idle`` in pool_state), a waiter parks its task
directly (no ``trio.Event``), and ``pool.timeout`` is not a cancel scope per wait (~6 µs to enter
and leave): waiters are kept in arrival order and the reaper, which sleeps until the earliest
deadline among them (or its next one-second tick), wakes those past it. A pool that is not running
(no reaper) bounds each wait with a cancel scope instead.

CONNECT tunnels and WebSocket sessions are not pooled: ``tunnel_slot(host)`` bounds them per host
(``pool.tunnels_per_host``, Chromium's 255 for WebSockets), apart from the HTTP limits.

``reconfigure(config)`` (a config reload) applies new limits and timeouts to acquisitions from then
on: sockets and tunnels already open stay, even above a lowered limit (see ``pool_state``).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import select
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any

import trio

from proxyd._h11 import h11
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
        "_raw",
        "broken",
        "created_at",
        "fast_rest",
        "h11",
        "idle_since",
        "key",
        "requests",
        "sent_ahead",
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
        #: Body bytes still to come when a client left an exchange http.fastpath relayed (h11
        #: knows nothing of it): what the relay's drain reads so the socket can be reused.
        self.fast_rest = 0
        #: Set when a write failed mid-exchange: whatever h11 believes, never reuse it.
        self.broken = False
        #: The socket waited in the idle list (so it must be checked before use).
        self.was_idle = False
        #: Bytes of its waiter's request head written at the hand-over (module docstring); the
        #: relay takes it (and sets it back to 0) before it sends anything.
        self.sent_ahead = 0
        self._raw: trio.socket.SocketType | None = None

    def between_exchanges(self) -> bool:
        """h11 is idle both ways with nothing buffered: the next request may go out as bytes
        (a finished exchange leaves it so; the fast path and writing ahead rely on it)."""
        uc = self.h11
        return uc.our_state is h11.IDLE and uc.their_state is h11.IDLE and not uc.trailing_data[0]

    def _socket(self) -> trio.socket.SocketType:
        raw = self._raw
        if raw is not None:
            return raw
        stream: object = self.stream
        while not isinstance(stream, trio.SocketStream):
            inner = getattr(stream, "transport_stream", None) or getattr(stream, "inner", None)
            if inner is None:
                break
            stream = inner
        assert isinstance(stream, trio.SocketStream)
        self._raw = stream.socket  # found once: is_readable runs on every reuse
        return stream.socket

    def is_readable(self) -> bool:
        """True when the idle socket has data or EOF pending (it must not be reused).

        ``poll``, not ``select``: select() cannot take a descriptor above FD_SETSIZE (1024),
        and a daemon with a thousand connections open hands out such descriptors all the time;
        every pooled socket would then look dead and be replaced by a new connect."""
        try:
            fd = self._socket().fileno()
            if fd < 0:
                return True
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True

    def close_now(self) -> None:
        """Close without awaiting (an idle or broken socket: no TLS close_notify owed)."""
        with contextlib.suppress(OSError):
            self._socket().close()


class _Waiter:
    """A request waiting for a socket. It parks its task directly (trio.lowlevel) rather than on
    a ``trio.Event``: with more clients than ``per_group`` sockets most requests wait here, and an
    Event with its parking lot costs several microseconds more per request."""

    __slots__ = ("ahead", "conn", "deadline", "error", "task")

    def __init__(self, ahead: bytes | None) -> None:
        #: The request head to write at a hand-over (module docstring: writing ahead).
        self.ahead = ahead
        self.conn: UpstreamConnection | None = None
        self.error: BaseException | None = None
        self.task: trio.lowlevel.Task | None = None  # set while parked
        #: trio time at which ``Pool.run`` wakes it if it still waits (``pool.timeout``)
        self.deadline = math.inf

    @property
    def done(self) -> bool:
        return self.conn is not None or self.error is not None

    def abort(self, raise_cancel: object) -> trio.lowlevel.Abort:
        self.task = None
        return trio.lowlevel.Abort.SUCCEEDED

    def wake(self) -> None:
        task, self.task = self.task, None
        if task is not None:
            trio.lowlevel.reschedule(task)


def _write_ahead(conn: UpstreamConnection, head: bytes) -> int:
    """Write what the kernel takes now of ``head`` on ``conn`` (a plain TCP socket that h11 says
    is between exchanges); how much. 0 on any doubt or error: the waiter then sends it all and
    meets the error itself, as it would have."""
    stream = conn.stream
    if type(stream) is not trio.SocketStream or conn.broken or not conn.between_exchanges():
        return 0
    try:
        return os.write(stream.socket.fileno(), head)
    except OSError:  # would block, reset, closed (fileno -1): not written
        return 0


class TunnelSlot:
    """One tunnel's slot of its host's ``pool.tunnels_per_host`` limiter, held for the tunnel's
    life. A slotted object rather than a generator-based context manager: it lives as long as
    the tunnel or WebSocket session (idle ones for hours), and the generator, its frame and
    trio's async-generator bookkeeping cost ~0.5 KiB each. The slot is its own borrower token.
    A host's limiter exists only while some slot of it is held or awaited."""

    __slots__ = ("_host", "_limiter", "_pool")

    def __init__(self, pool: Pool, host: str) -> None:
        self._pool = pool
        self._host = host
        self._limiter: trio.CapacityLimiter | None = None

    async def __aenter__(self) -> None:
        pool = self._pool
        tunnels = pool._tunnels
        limiter = tunnels.get(self._host)
        if limiter is None:
            limiter = tunnels[self._host] = trio.CapacityLimiter(pool.config.tunnels_per_host)
        try:
            # A free slot (nobody queued before us) is taken without a timer or a pass of the
            # scheduler: the tunnel's next wait (for the origin or the client) yields anyway.
            limiter.acquire_on_behalf_of_nowait(self)
        except trio.WouldBlock:
            with trio.move_on_after(pool.config.timeout) as scope:
                await limiter.acquire_on_behalf_of(self)
            if scope.cancelled_caught:  # every slot is held: the limiter stays for its holders
                raise ConnectionLimitReached(
                    f"{pool.config.tunnels_per_host} tunnels to {self._host} are open already"
                ) from None
        self._limiter = limiter

    async def __aexit__(self, *exc_info: object) -> None:
        limiter, self._limiter = self._limiter, None
        if limiter is not None:
            limiter.release_on_behalf_of(self)
            self._forget_if_unused(limiter)

    def _forget_if_unused(self, limiter: trio.CapacityLimiter) -> None:
        if limiter.borrowed_tokens == 0 and not limiter.statistics().tasks_waiting:
            tunnels = self._pool._tunnels
            if tunnels.get(self._host) is limiter:
                del tunnels[self._host]


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
        self._trio_clock = clock is trio.current_time  # then pool times are trio deadlines too
        self._conns: dict[int, UpstreamConnection] = {}
        self._waiters: dict[int, _Waiter] = {}
        self._ids = itertools.count(1)
        self._nursery: trio.Nursery | None = None
        self._tunnels: dict[str, trio.CapacityLimiter] = {}
        # The reaper in ``run`` also ends waits past ``pool.timeout`` (cheaper than a cancel
        # scope per wait); it sleeps until ``_reaper_until`` unless unparked for an earlier one.
        self._reaper = trio.lowlevel.ParkingLot()
        self._reaper_until = math.inf

    # --- lifecycle -------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Own the connect tasks and the reaper: idle sockets expire every second, and a
        request still waiting for a socket after ``pool.timeout`` is woken (it raises
        ConnectionLimitReached). Runs until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self._trio_clock:
                    # The same clock, one call instead of trio.current_time's three.
                    self._clock = trio.lowlevel.current_clock().current_time
                task_status.started()
                tick = trio.current_time() + 1.0
                while True:
                    now = trio.current_time()
                    if now >= tick:
                        self._apply(self.state.expire(self._clock()))
                        tick = now + 1.0
                    until = self._reaper_until = min(tick, self._expire_waiters(now))
                    with trio.move_on_at(until):
                        await self._reaper.park()
        finally:
            self._nursery = None
            self._reaper_until = math.inf
            for waiter in self._waiters.values():  # nothing would end their waits any more
                if waiter.task is not None and waiter.error is None and waiter.conn is None:
                    waiter.error = DestinationUnavailable("the upstream pool is not running")
                    waiter.wake()
            self.close_all()

    def _expire_waiters(self, now: float) -> float:
        """Wake the waits past their deadline; the earliest deadline still ahead."""
        until = math.inf
        for waiter in self._waiters.values():
            if waiter.task is None:
                continue  # not parked (granted, or woken and about to leave)
            if waiter.deadline <= now:
                waiter.wake()  # still not done: it raises ConnectionLimitReached
            elif waiter.deadline < until:
                until = waiter.deadline
        return until

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
        self, key: GroupKey, proxy: str | None, *, fresh: bool = False, ahead: bytes | None = None
    ) -> UpstreamConnection:
        """A socket of ``key`` (``proxy``: the label it counts against), reused or new.
        ``ahead``: the request head, written at a hand-over when the request had to queue (then
        ``sent_ahead`` of the socket says how much of it went; module docstring).

        The wait is written out here rather than in a helper coroutine: with more clients than
        ``per_group`` sockets nearly every request parks here, and each coroutine frame between
        the task and its park is crossed twice per request (suspend and resume)."""
        while True:
            socket_id = None if fresh else self.state.take_idle(key, self._clock())
            if socket_id is not None:
                conn = self._conns[socket_id]
            else:
                waiter_id = next(self._ids)
                waiter = _Waiter(ahead)
                self._waiters[waiter_id] = waiter
                try:
                    if not fresh and self.state.queue_if_full(key, waiter_id):
                        limited = True  # the common wait: the group is at its limit
                    else:
                        plan = self.state.request(key, proxy, waiter_id, self._clock(), fresh=fresh)
                        limited = not waiter.done and not plan.connects
                        self._apply(plan)
                    # Written out (no helper calls, ``done`` spelt out): most requests wait here
                    # when clients outnumber ``per_group``, and each call is paid per request.
                    if waiter.conn is None and waiter.error is None:
                        metrics = self._metrics
                        started = self._clock()
                        if limited and metrics is not None:
                            metrics.inc_pool_waits(1)
                        timeout = self.config.timeout
                        deadline = (started if self._trio_clock else trio.current_time()) + timeout
                        waiter.task = trio.lowlevel.current_task()
                        if self._nursery is not None:
                            # The reaper (run) wakes it at the deadline; wake the reaper first
                            # if it sleeps past that (a first waiter, or a timeout shorter than
                            # its tick).
                            waiter.deadline = deadline
                            if deadline < self._reaper_until:
                                self._reaper.unpark_all()
                            await trio.lowlevel.wait_task_rescheduled(waiter.abort)
                        else:  # a pool that is not running (some tests): a scope bounds the wait
                            with trio.CancelScope(deadline=deadline):
                                await trio.lowlevel.wait_task_rescheduled(waiter.abort)
                        if limited and metrics is not None:
                            metrics.observe_pool_wait(self._clock() - started)
                        if waiter.conn is None and waiter.error is None:
                            if metrics is not None:
                                metrics.pool_wait_timeouts.inc()
                            raise ConnectionLimitReached(
                                f"no upstream connection became available within {timeout:g}s"
                            )
                except BaseException:
                    # Cancelled (the client left) or timed out after all: a socket granted in the
                    # meantime goes back untouched, or its slot would leak.
                    if waiter.conn is not None:
                        self._return_unused(waiter.conn)
                    raise
                finally:
                    del self._waiters[waiter_id]
                    if waiter.conn is None and waiter.error is None:
                        self._apply(self.state.cancel(key, waiter_id))
                if waiter.error is not None:
                    raise waiter.error
                assert waiter.conn is not None
                conn = waiter.conn
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

    def release(self, conn: UpstreamConnection, *, reusable: bool) -> None:
        """The exchange is over. Reusable only when HTTP allows it and nothing broke."""
        if conn.socket_id not in self._conns:
            conn.close_now()  # the pool was closed meanwhile
            return
        state = conn.h11
        ours, theirs = state.our_state, state.their_state
        # DONE/DONE: h11 relayed a whole exchange. IDLE/IDLE: http.fastpath did, without h11
        # (it marks the socket broken on any irregularity).
        reusable = (
            reusable
            and not conn.broken
            and ours is theirs
            and (ours is h11.DONE or ours is h11.IDLE)
        )
        if reusable and ours is h11.DONE:
            state.start_next_cycle()
        if reusable:
            waiter_id = self.state.hand_over(conn.key)
            if waiter_id is not None:
                # Straight to the oldest waiter of the group (late binding), no plan needed.
                waiter = self._waiters.get(waiter_id)
                if waiter is not None:  # always: a waiter leaves the queue before the dict
                    conn.was_idle = False
                    waiter.conn = conn
                    if waiter.ahead is not None:
                        conn.sent_ahead = _write_ahead(conn, waiter.ahead)
                    waiter.wake()
                    return
                now = self._clock()
                self._settle(conn, self.state.release(conn.key, conn.socket_id, True, now), now)
                return
            now = self._clock()
            if self.state.release_idle(conn.key, conn.socket_id, now):
                conn.idle_since = now
                conn.was_idle = True
                return
        else:
            now = self._clock()
            conn.close_now()
            del self._conns[conn.socket_id]
        self._settle(conn, self.state.release(conn.key, conn.socket_id, reusable, now), now)

    def _return_unused(self, conn: UpstreamConnection) -> None:
        """A socket granted to a request that vanished before using it: back to the pool (or
        closed, when that request's head was written ahead on it: its answer is on its way)."""
        if conn.sent_ahead:
            self.release(conn, reusable=False)
            return
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
            waiter.wake()
        for waiter_id, error in plan.failures:
            waiter = self._waiters.get(waiter_id)
            if waiter is not None:
                waiter.error = error if isinstance(error, BaseException) else RuntimeError(error)
                waiter.wake()
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

    def tunnel_slot(self, host: str) -> TunnelSlot:
        """Bound CONNECT tunnels / WebSocket sessions per host (not pooled, separate limit):
        ``async with pool.tunnel_slot(host):`` (ConnectionLimitReached after ``pool.timeout``)."""
        return TunnelSlot(self, host)

    # --- views -----------------------------------------------------------------------------

    def stats(self) -> PoolStats:
        return PoolStats(
            groups=[_snapshot(group) for group in self.state.stats()],
            total=self.state.total,
            tunnels=sum(int(limiter.borrowed_tokens) for limiter in self._tunnels.values()),
        )

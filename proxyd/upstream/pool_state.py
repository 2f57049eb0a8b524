"""Socket pool bookkeeping (pure): limits, idle sockets, waiters — Chromium's model.

Theory of operation. Upstream sockets belong to a *group*: one origin (scheme, host, port) over
one route (DIRECT or a proxy). Every socket counts against three limits from the moment its
connect starts until it is closed: ``per_group`` (6), ``per_proxy`` (32, all groups through the
same proxy) and ``total`` (256). A socket is in exactly one state:

    connecting --connect_succeeded--> active (granted to a waiter) | idle (nobody waiting)
    connecting --connect_failed-----> gone (the oldest waiter of the group gets the error)
    active --release(reusable)------> idle, or straight to the oldest waiter (late binding)
    active --release(not reusable)--> gone
    idle --request / grant----------> active
    idle --expire / evict / discard--> gone

A request is a *waiter* in its group's FIFO queue until it is granted a socket. When it arrives,
an idle socket is granted at once (if nobody queued before it); otherwise it queues and, while the
group has more waiters than connects in flight and the limits allow, a connect is started. Binding
is late: whichever socket of the group becomes usable first (a finished connect or a released idle
one) goes to the oldest waiter, not necessarily the one whose arrival started the connect
(Chromium's ClientSocketPool). A waiter marked ``fresh`` (a retry after a stale reused socket)
only accepts a newly connected socket.

When the total limit is reached and another group (with nobody waiting) holds an idle socket, the
oldest such idle socket is closed to make room. Idle sockets expire after ``idle_unused`` seconds if
they never carried a request and ``idle_used`` seconds otherwise (Chromium: 10 s / 300 s).

Every method returns a ``Plan``: grants to deliver, connects to start, sockets to close, failures
to deliver. The trio shell (pool.py) applies it with no await in between deciding and acting. The
per-request fast paths (``take_idle``, ``queue_if_full``, ``hand_over``, ``release_idle``) decide
the common cases -- an idle socket, a full group to queue in, a waiter to hand a socket to, nobody
waiting -- without a plan, and return None / False when the general method must decide.

A config reload swaps the limits (``set_limits``). Nothing already open is touched: sockets above
a lowered limit stay until they close or expire (new connects obey the new limit, and sockets
only ever go back under it); a raised limit lets starved groups connect at once.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable
from dataclasses import dataclass, field

GroupKey = Hashable


@dataclass(frozen=True, slots=True)
class Limits:
    per_group: int = 6
    per_proxy: int = 32
    total: int = 256
    idle_unused: float = 10.0
    idle_used: float = 300.0


@dataclass(slots=True)
class Plan:
    grants: list[tuple[int, int]] = field(default_factory=list)  # (waiter id, socket id)
    connects: list[GroupKey] = field(default_factory=list)  # one entry per connect to start
    close: list[int] = field(default_factory=list)  # socket ids to close
    close_reasons: list[str] = field(default_factory=list)  # parallel to close
    failures: list[tuple[int, object]] = field(default_factory=list)  # (waiter id, error)

    def __bool__(self) -> bool:
        return bool(self.grants or self.connects or self.close or self.failures)


@dataclass(slots=True)
class _Idle:
    socket_id: int
    since: float
    used: bool


@dataclass(slots=True)
class _Group:
    key: GroupKey
    proxy: str | None
    idle: list[_Idle] = field(default_factory=list)  # most recently released last
    active: int = 0
    connecting: int = 0
    waiters: deque[tuple[int, bool]] = field(default_factory=deque)  # (waiter id, fresh)

    @property
    def size(self) -> int:
        return self.active + self.connecting + len(self.idle)

    def is_empty(self) -> bool:
        return not (self.size or self.waiters)


@dataclass(frozen=True, slots=True)
class GroupStats:
    key: GroupKey
    proxy: str | None
    active: int
    idle: int
    connecting: int
    waiting: int


class PoolState:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._groups: dict[GroupKey, _Group] = {}
        self._per_proxy: dict[str, int] = {}
        self._total = 0
        # Groups with waiters that could not start a connect, oldest first (for rebalancing).
        self._starved: OrderedDict[GroupKey, None] = OrderedDict()

    # --- requests --------------------------------------------------------------------------

    def request(
        self, key: GroupKey, proxy: str | None, waiter: int, now: float, *, fresh: bool = False
    ) -> Plan:
        """A request wants a socket of ``key``; it is granted at once or queued."""
        plan = Plan()
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(key, proxy)
        self._expire_group(group, now, plan)
        # An idle socket goes to a newcomer unless a non-fresh waiter queued first (fresh
        # waiters only take new connections, so they do not hold the idle ones back).
        if not fresh and group.idle and all(waiting_fresh for _, waiting_fresh in group.waiters):
            idle = group.idle.pop()
            group.active += 1
            plan.grants.append((waiter, idle.socket_id))
            return plan
        group.waiters.append((waiter, fresh))
        self._start_connects(group, now, plan)
        return plan

    def take_idle(self, key: GroupKey, now: float) -> int | None:
        """Fast path of ``request`` for the common case (an idle socket, nobody queued): the
        socket id, or None to take the general path. Allocates nothing."""
        group = self._groups.get(key)
        if group is None or group.waiters or not group.idle:
            return None
        idle = group.idle[-1]
        limits = self.limits
        if now - idle.since >= (limits.idle_used if idle.used else limits.idle_unused):
            return None  # expired: the general path closes it
        group.idle.pop()
        group.active += 1
        return idle.socket_id

    def queue_if_full(self, key: GroupKey, waiter: int) -> bool:
        """Fast path of ``request`` (not fresh) when the group has nothing idle and no room for
        another socket -- with more clients than ``per_group``, most requests: the waiter queues
        for the next socket of the group released (late binding). False means: take the general
        path. Allocates nothing."""
        group = self._groups.get(key)
        if group is None or group.idle or group.active + group.connecting < self.limits.per_group:
            return False
        waiters = group.waiters
        waiters.append((waiter, False))
        if len(waiters) > group.connecting:
            self._starved[key] = None  # as _start_connects: it would find no room to connect
        return True

    def hand_over(self, key: GroupKey) -> int | None:
        """Fast path of ``release(reusable=True)`` when the group's oldest waiter takes any
        socket (not fresh): the socket stays active for it. The waiter's id, or None to take the
        general path. Allocates nothing."""
        waiters = self._groups[key].waiters
        if not waiters or waiters[0][1]:
            return None
        waiter = waiters.popleft()[0]
        if not waiters:
            self._starved.pop(key, None)
        return waiter

    def release_idle(self, key: GroupKey, socket_id: int, now: float) -> bool:
        """Fast path of ``release(reusable=True)`` when nobody anywhere waits: the socket goes
        idle and nothing else changes. False means: take the general path."""
        if self._starved:
            return False
        group = self._groups[key]
        if group.waiters:
            return False
        group.active -= 1
        group.idle.append(_Idle(socket_id, now, used=True))
        return True

    def cancel(self, key: GroupKey, waiter: int) -> Plan:
        """A queued request gave up (timeout or its client left)."""
        plan = Plan()
        group = self._groups.get(key)
        if group is None:
            return plan
        for entry in group.waiters:
            if entry[0] == waiter:
                group.waiters.remove(entry)
                break
        if not group.waiters:
            self._starved.pop(key, None)
        self._maybe_forget(group)
        return plan

    def set_limits(self, limits: Limits, now: float) -> Plan:
        """New limits from a reload; they apply to connects from now on (see the docstring)."""
        plan = Plan()
        self.limits = limits
        self._rebalance(now, plan)
        return plan

    # --- connects --------------------------------------------------------------------------

    def connect_succeeded(self, key: GroupKey, socket_id: int, now: float) -> Plan:
        plan = Plan()
        group = self._groups[key]
        group.connecting -= 1
        if group.waiters:
            waiter, _ = group.waiters.popleft()
            group.active += 1
            plan.grants.append((waiter, socket_id))
            if not group.waiters:
                self._starved.pop(key, None)
        else:
            group.idle.append(_Idle(socket_id, now, used=False))
        return plan

    def connect_failed(self, key: GroupKey, error: object, now: float) -> Plan:
        plan = Plan()
        group = self._groups[key]
        group.connecting -= 1
        self._forget_socket(group)
        if group.waiters:
            waiter, _ = group.waiters.popleft()
            plan.failures.append((waiter, error))
        if group.waiters:
            self._start_connects(group, now, plan)
        self._rebalance(now, plan)
        self._maybe_forget(group)
        return plan

    # --- returning sockets -------------------------------------------------------------------

    def release(self, key: GroupKey, socket_id: int, reusable: bool, now: float) -> Plan:
        """An exchange finished with the socket; ``reusable`` when HTTP says it may carry more."""
        plan = Plan()
        group = self._groups[key]
        group.active -= 1
        if reusable:
            for index, (waiter, fresh) in enumerate(group.waiters):
                if not fresh:
                    del group.waiters[index]
                    group.active += 1
                    plan.grants.append((waiter, socket_id))
                    if not group.waiters:
                        self._starved.pop(key, None)
                    return plan
            group.idle.append(_Idle(socket_id, now, used=True))
            self._rebalance(now, plan)  # an idle socket can be evicted for a starved group
            return plan
        self._slot_freed(group, now, plan)
        return plan

    def discard_idle(self, key: GroupKey, socket_id: int, now: float) -> Plan:
        """A granted idle socket turned out dead (readable): it is gone, its slot is free."""
        plan = Plan()
        group = self._groups[key]
        group.active -= 1
        self._slot_freed(group, now, plan)
        return plan

    def expire(self, now: float) -> Plan:
        """Close idle sockets past their keep-alive time (the reaper calls this)."""
        plan = Plan()
        for group in list(self._groups.values()):
            self._expire_group(group, now, plan)
            self._maybe_forget(group)
        if plan.close:
            self._rebalance(now, plan)
        return plan

    def close_all_idle(self) -> Plan:
        plan = Plan()
        for group in list(self._groups.values()):
            while group.idle:
                self._close_idle(group, group.idle.pop(), "drain", plan)
            self._maybe_forget(group)
        return plan

    # --- views -----------------------------------------------------------------------------

    def stats(self) -> list[GroupStats]:
        return [
            GroupStats(g.key, g.proxy, g.active, len(g.idle), g.connecting, len(g.waiters))
            for g in self._groups.values()
        ]

    @property
    def total(self) -> int:
        return self._total

    def proxy_count(self, proxy: str) -> int:
        return self._per_proxy.get(proxy, 0)

    # --- internals -------------------------------------------------------------------------

    def _slot_freed(self, group: _Group, now: float, plan: Plan) -> None:
        """A socket of ``group`` is gone: its waiters may connect, and so may starved groups."""
        self._forget_socket(group)
        if group.waiters:
            self._start_connects(group, now, plan)
        self._rebalance(now, plan)
        self._maybe_forget(group)

    def _close_idle(self, group: _Group, idle: _Idle, reason: str, plan: Plan) -> None:
        self._forget_socket(group)
        plan.close.append(idle.socket_id)
        plan.close_reasons.append(reason)

    def _start_connects(self, group: _Group, now: float, plan: Plan) -> None:
        limits = self.limits
        while len(group.waiters) > group.connecting:
            if group.size >= limits.per_group and group.idle:
                # Full, yet holding idle sockets nobody here can use (the waiters want fresh
                # ones): close the oldest to make room (Chromium's CloseOneIdleSocket).
                self._close_idle(group, group.idle.pop(0), "per_group_limit", plan)
            if group.size >= limits.per_group or (
                group.proxy is not None and self._per_proxy.get(group.proxy, 0) >= limits.per_proxy
            ):
                self._starved[group.key] = None
                return
            if self._total >= limits.total and not self._evict_oldest_idle(group, plan):
                self._starved[group.key] = None
                return
            group.connecting += 1
            self._total += 1
            if group.proxy is not None:
                self._per_proxy[group.proxy] = self._per_proxy.get(group.proxy, 0) + 1
            plan.connects.append(group.key)
        self._starved.pop(group.key, None)

    def _rebalance(self, now: float, plan: Plan) -> None:
        """Capacity was freed somewhere: let starved groups (oldest first) start connects."""
        for key in list(self._starved):
            group = self._groups.get(key)
            if group is None or not group.waiters:
                self._starved.pop(key, None)
                continue
            self._start_connects(group, now, plan)

    def _evict_oldest_idle(self, exclude: _Group, plan: Plan) -> bool:
        oldest: tuple[float, _Group, int] | None = None
        for group in self._groups.values():
            if group is exclude or group.waiters:
                continue
            for index, idle in enumerate(group.idle):
                if oldest is None or idle.since < oldest[0]:
                    oldest = (idle.since, group, index)
        if oldest is None:
            return False
        _, group, index = oldest
        self._close_idle(group, group.idle.pop(index), "total_limit", plan)
        self._maybe_forget(group)
        return True

    def _expire_group(self, group: _Group, now: float, plan: Plan) -> None:
        if not group.idle:
            return
        limits = self.limits
        keep: list[_Idle] = []
        for idle in group.idle:
            ttl = limits.idle_used if idle.used else limits.idle_unused
            if now - idle.since >= ttl:
                self._close_idle(group, idle, "expired", plan)
            else:
                keep.append(idle)
        group.idle = keep

    def _forget_socket(self, group: _Group) -> None:
        self._total -= 1
        if group.proxy is not None:
            left = self._per_proxy[group.proxy] - 1
            if left:
                self._per_proxy[group.proxy] = left
            else:
                del self._per_proxy[group.proxy]

    def _maybe_forget(self, group: _Group) -> None:
        if group.is_empty():
            self._groups.pop(group.key, None)
            self._starved.pop(group.key, None)

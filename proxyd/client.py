"""One task per client connection: the h11 server role, the request loop, dispatch.

How it works: ``ClientConnection.run`` loops over requests on one keep-alive connection.

- Reading a head: the first byte may take up to ``client.timeouts.idle`` (a keep-alive connection
  waiting for its next request: it is listed in ``IdleConnections``, whose one task ends those
  idle too long, so the wait itself carries no timer); once a byte arrived, the whole head must
  arrive within ``client.timeouts.head`` (slowloris). Raw bytes of the head are vetted by
  ``http.messages.check_head_bytes`` (bare LF, obs-fold, size) before h11 parses them.
- The fast path: a request whose whole head came in one read and has the simple shape of
  ``http.fastpath`` (a plain GET, nothing after the head) is parsed there and kept as
  ``fast_head``, and no h11 connection is made for it. The ``h11`` property gives h11 the head the
  first time anything needs h11's state (an error response, the cache, a response off the fast
  path); the fast relay (``http.relay._forward_fast``) clears ``fast_head`` when it has answered,
  and the connection goes back to waiting as if h11 had seen nothing.
- Dispatch: access checks (ACL verdict from accept time, proxy auth), then CONNECT goes to
  ``_serve_connect`` (http.tunnel), everything else through ``http.rules`` to
  ``http.relay.forward``.
- Every exit path of a request produces exactly one access-log line and one ``requests_total``
  increment, for the final response only.
- A ``ProxydError`` raised before the final response head reached the client becomes a short
  response with a ``Proxy-Status`` field (RFC 9209); after that the connection is closed instead.
- Draining (SIGTERM): a connection idle between requests is ended at once; one in the middle of
  a request finishes it, answers with ``Connection: close`` and ends.
- Memory: idle connections are what a proxy holds most of, so one keeps only what the next
  request needs (bench/memory_bench.py measures it, tests/test_memory.py pins it): the task is
  ``run`` itself (no wrapper coroutine), the last request and the frames of its exchange are
  gone, the wait is trio's bare ``wait_readable`` with no cancel scope, and the h11 connection
  is made when a request starts to arrive (``_WAITING`` until then).
"""

from __future__ import annotations

import errno
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, TypeVar

import trio

from proxyd._h11 import h11
from proxyd.cache.transaction import HttpCache, sendfile_to_socket
from proxyd.config import Config
from proxyd.errors import (
    BadRequest,
    ClientForbidden,
    DestinationForbidden,
    HeadTooLarge,
    ProxyAuthRequired,
    ProxydError,
    RequestHeadTimeout,
    TransferCodingNotImplemented,
)
from proxyd.http import access, fastpath, sockio
from proxyd.http.messages import (
    HEAD_INCOMPLETE,
    Target,
    check_head_bytes,
    error_body,
    parse_absolute_target,
    parse_authority,
    proxy_status_value,
    reason_phrase,
    transfer_coding_error_status,
)
from proxyd.http.relay import (
    RECEIVE_SIZE,
    TLS_SCHEMES,
    ClientGone,
    ExchangeStats,
    RelaySettings,
    ResponseAborted,
    ResponseTap,
    forward,
    open_checked,
)
from proxyd.http.rules import RequestFacts, prepare_request, trace_body, via_member
from proxyd.http.tunnel import TunnelStats, run_tunnel
from proxyd.observe.accesslog import AccessLog, AccessRecord
from proxyd.observe.metrics import Metrics
from proxyd.observe.netlog import NETLOG_OFF, NetLog
from proxyd.routing.router import Router
from proxyd.upstream.route import Route, RouteList, route_kind
from proxyd.websocket.handshake import check_client_upgrade, is_websocket_upgrade
from proxyd.websocket.relay import Session, close_stream
from proxyd.websocket.upgrade import (
    Sniffed,
    UpgradeContext,
    failure_reason,
    run_upgrade,
    sniff_tunnel,
)

# The module under a second name: inside ClientConnection, ``h11`` is the property.
_h11 = h11
#: A request head as the loop serves it: h11's, or http.fastpath's for the common plain GET.
AnyRequest = _h11.Request | fastpath.FastRequest
_T = TypeVar("_T")

log = logging.getLogger(__name__)

LINGER_SECONDS: Final = 2.0
LINGER_BYTES: Final = 1 << 20
_MAX_FORWARDS_METHODS: Final = frozenset({b"OPTIONS", b"TRACE"})
_ALLOW_ALL: Final = b"GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE, PATCH"
_connection_ids = itertools.count(1)
_request_ids = itertools.count(1)  # unique in the process: the NetLog's "req"
# GET and HEAD go through the cache only without a body (one with a body is relayed untouched).
_BODYLESS_CACHE_METHODS: Final = frozenset({b"GET", b"HEAD", b"PURGE"})
#: Errors kept for the status page (a bounded ring: memory stays flat under an error storm).
RECENT_ERRORS: Final = 50
#: The h11 connection of a client connection waiting for a request with nothing buffered (a new
#: connection, or one between requests): shared, and never used. A connection makes its own when
#: the first bytes of a request arrive, so an idle one holds no h11 state (~0.9 KiB each), and
#: between requests a fresh h11 connection costs less than h11's ``start_next_cycle`` (``run``).
_WAITING: Final = h11.Connection(h11.SERVER)


@dataclass(eq=False, slots=True)
class OpenTunnel:
    """A CONNECT tunnel while it relays bytes, as the status page lists it (counts are live)."""

    conn_id: int
    client: str
    target: str
    route: str
    started: float  # trio.current_time()
    stats: TunnelStats

    @property
    def bytes_up(self) -> int:
        return self.stats.bytes_up

    @property
    def bytes_down(self) -> int:
        return self.stats.bytes_down


@dataclass(frozen=True, slots=True)
class RecentError:
    """One failed request for the status page: no query string (tokens live there)."""

    at: float  # Unix time
    conn_id: int
    client: str
    method: str
    url: str
    status: int
    error_type: str
    detail: str


class IdleConnections:
    """Client connections waiting for their next request, oldest first, and the task that
    closes those idle for longer than ``client.timeouts.idle``.

    Why not a cancel scope with a deadline around each wait: an idle connection is what a proxy
    holds most of (thousands of keep-alive clients), and a scope costs ~0.8 KiB while it waits
    (the scope, its CancelStatus with two sets, an entry in trio's deadline heap) plus an
    enter/exit per request. Here a waiting connection is one dict entry: a dict keeps insertion
    order, and connections are added when they start to wait, so the oldest is first and its
    deadline (``since + timeout``) is the earliest. ``run`` sleeps until that deadline, or for one
    timeout when the set is empty (whatever is added meanwhile expires no earlier), so adding and
    removing never wake it: a request costs a dict insert and a delete. At its deadline it ends
    every connection whose time is up by waking its wait with ``trio.lowlevel.notify_closing``:
    the wait raises ``ClosedResourceError`` and the connection closes its socket itself. Draining
    ends idle connections the same way (``close``); a reload's new timeout wakes the sweeper. A
    connection that leaves the set by itself (its next request arrived) costs the sweeper nothing
    until its old deadline, when it finds a later one.
    """

    __slots__ = ("_since", "_wakeup", "timeout")

    def __init__(self, timeout: float) -> None:
        self._since: dict[ClientConnection, float] = {}
        self._wakeup = trio.lowlevel.ParkingLot()
        self.timeout = timeout

    def __len__(self) -> int:
        return len(self._since)

    def add(self, conn: ClientConnection, now: float) -> None:
        self._since[conn] = now

    def discard(self, conn: ClientConnection) -> None:
        self._since.pop(conn, None)

    def holds(self, conn: ClientConnection) -> bool:
        """``conn`` still waits here (``close`` has not ended its wait)."""
        return conn in self._since

    def close(self, conn: ClientConnection) -> None:
        """End ``conn`` now if it waits for a request (draining); otherwise nothing."""
        if self._since.pop(conn, None) is not None:
            conn.wake_to_close()

    def set_timeout(self, timeout: float) -> None:
        """A reload: connections already waiting get the new timeout too (counted from when
        they started to wait)."""
        self.timeout = timeout
        self._wakeup.unpark_all()

    def expire(self, now: float) -> float:
        """Close every connection idle past the timeout; when to look again."""
        since = self._since
        timeout = self.timeout
        while since:
            conn = next(iter(since))
            deadline = since[conn] + timeout
            if deadline > now:
                return deadline
            del since[conn]
            conn.wake_to_close()
        return now + timeout

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            with trio.move_on_at(self.expire(trio.current_time())):
                await self._wakeup.park()


@dataclass(slots=True)
class Services:
    """What every client connection of one server shares."""

    config: Config
    relay: RelaySettings
    metrics: Metrics
    access_log: AccessLog | None
    acl: access.ClientAcl
    auth: access.AuthCache | None
    pseudonym: bytes
    router: Router
    #: The shared HTTP cache (None when cache.enabled is false).
    cache: HttpCache | None = None
    draining: bool = False
    connections: set[ClientConnection] = field(default_factory=set)
    auth_limiter: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(2))
    #: Set when the last connection closes while draining (the server's drain waits on it).
    all_closed: trio.Event = field(default_factory=trio.Event)
    _via_cache: dict[bytes, bytes | None] = field(default_factory=dict)
    #: WebSocket sessions running now (drain sends each 1001, see server.py).
    websocket_sessions: set[Session] = field(default_factory=set)
    _websocket: UpgradeContext | None = None
    #: CONNECT tunnels relaying bytes now, and the last errors (the status page shows both).
    tunnels: set[OpenTunnel] = field(default_factory=set)
    recent_errors: deque[RecentError] = field(default_factory=lambda: deque(maxlen=RECENT_ERRORS))
    #: Per-request timed events (observe/netlog.py); emit only under ``if netlog.active:``.
    netlog: NetLog = NETLOG_OFF
    #: Connections waiting for their next request (the server runs its sweeper task).
    idle: IdleConnections = field(init=False)
    #: ``trio.current_time`` (the server passes its run's clock method: the same times).
    now: Callable[[], float] = trio.current_time

    def __post_init__(self) -> None:
        self.idle = IdleConnections(self.config.client.timeouts.idle)

    def websocket_context(self) -> UpgradeContext:
        context = self._websocket
        if context is None:
            context = self._websocket = UpgradeContext(
                config=self.config.websocket,
                metrics=self.metrics,
                pseudonym=self.pseudonym,
                via_for_version=self.via_for_version,
                io_timeout=self.config.upstream.timeouts.idle_read,
                sessions=self.websocket_sessions,
                is_draining=lambda: self.draining,
            )
        return context

    def via_for_version(self, version: bytes) -> bytes | None:
        """The Via member for a message received with HTTP ``version`` (cached: few versions)."""
        cached = self._via_cache.get(version, b"")
        if cached != b"":
            return cached
        value = via_member(version, self.pseudonym) if self.config.via.enabled else None
        self._via_cache[version] = value
        return value

    def reconfigure(
        self,
        config: Config,
        *,
        relay: RelaySettings,
        acl: access.ClientAcl,
        auth: access.AuthCache | None,
        pseudonym: bytes,
    ) -> None:
        """Swap the per-request settings (a config reload, server.py). Every request reads
        ``services.config`` / ``relay`` / ``auth`` when it starts, so the next one follows the
        new settings, while a request, tunnel or WebSocket session under way keeps what it
        read (a connection keeps the ACL verdict it was accepted with)."""
        self.config = config
        self.relay = relay
        self.acl = acl
        self.auth = auth
        self.pseudonym = pseudonym
        self._via_cache.clear()
        self._websocket = None  # rebuilt from config.websocket for the next session
        self.idle.set_timeout(config.client.timeouts.idle)


class ClientConnection:
    # Slots, and nothing made before it is needed: an idle keep-alive connection should cost a
    # few KiB (bench/memory_bench.py), and most of that is trio's task and socket objects.
    __slots__ = (
        "_error_detail",
        "_h11",
        "_limiter",
        "_linger",
        "_logged",
        "_token",
        "allowed",
        "client_address",
        "conn_id",
        "fast_head",
        "req_id",
        "services",
        "stream",
        "user",
    )

    def __init__(
        self,
        services: Services,
        stream: trio.SocketStream,
        client_address: str,
        allowed: bool,
        *,
        limiter: trio.CapacityLimiter | None = None,
        token: object = None,
    ) -> None:
        """``limiter``/``token``: the ``client.max_connections`` slot the server took for this
        connection before accepting it; released when the connection ends. The connection is
        its own task (``run``), with no wrapper coroutine kept alive under it."""
        self.services = services
        self.stream = stream
        self.client_address = client_address
        self.allowed = allowed
        self.conn_id = next(_connection_ids)
        self._h11 = _WAITING  # its own once a request starts to arrive (_read_request)
        #: The current request's head when http.fastpath parsed it and h11 has not seen it
        #: (the ``h11`` property hands it to h11 the first time anything needs h11's state).
        self.fast_head: bytes | None = None
        self.user = "-"
        self._limiter = limiter
        self._token = token
        self._linger = False
        self._logged = False
        self._error_detail = ""  # the failing request's error detail, for recent_errors
        self.req_id = 0  # the current request's NetLog id

    @property
    def h11(self) -> h11.Connection:
        """The h11 server connection of the current request. A request that http.fastpath
        parsed reaches h11 only here, when something needs h11 after all (an error response,
        the cache, a response off the fast path): h11 parses the same head (cheap next to
        what was saved) and stands where it would have stood, waiting to send the response."""
        head = self.fast_head
        if head is None:
            return self._h11
        self.fast_head = None
        cc = self._h11 = h11.Connection(
            h11.SERVER, max_incomplete_event_size=self.services.config.client.max_head_size
        )
        cc.receive_data(head)
        cc.next_event()  # the Request (http.fastpath accepts only what h11 accepts)
        cc.next_event()  # its EndOfMessage: fast-path requests have no body
        return cc

    @h11.setter
    def h11(self, conn: h11.Connection) -> None:
        self.fast_head = None
        self._h11 = conn

    # --- I/O helpers used by http.relay (the ClientSide protocol) ------------------------------

    # http.sockio, not the stream's own methods: a write the kernel takes at once returns
    # without a scheduler round trip, and a deadline scope is entered only when it must wait.

    async def send(self, data: bytes | list[bytes], timeout: float) -> None:
        try:
            done = await sockio.send_all(self.stream, data, timeout)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ClientGone("the client went away") from exc
        if not done:
            raise ClientGone(f"the client did not read for {timeout:g}s")

    async def receive(self, timeout: float) -> bytes:
        try:
            data = await sockio.receive_within(self.stream, timeout, wait_first=False)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ClientGone("the client went away") from exc
        if data is None:
            raise ClientGone(f"the client sent nothing for {timeout:g}s")
        return data

    async def sendfile(self, fd: int, offset: int, count: int, timeout: float) -> int:
        """Zero-copy send of part of a cache body file (cache.transaction: large hits); only on
        a plain TCP stream (an OSError otherwise, and the cache reads and sends instead)."""
        stream = self.stream
        if type(stream) is not trio.SocketStream:
            raise OSError(errno.ENOTSOCK, "not a plain TCP stream")
        return await sendfile_to_socket(stream.socket, fd, offset, count, timeout)

    def is_closing(self) -> bool:
        return self.services.draining

    def cancel_if_idle(self) -> None:
        self.services.idle.close(self)

    def wake_to_close(self) -> None:
        """End the wait for the next request (IdleConnections): it raises ClosedResourceError
        and the connection closes. The socket is not closed here: its task does that."""
        stream = self.stream
        if type(stream) is trio.SocketStream and stream.socket.fileno() >= 0:
            trio.lowlevel.notify_closing(stream.socket)

    # --- the request loop -------------------------------------------------------------------

    async def run(self) -> None:
        """The connection's task: its request loop, then the close. The loop is written out
        here, the wait for the next request included: every coroutine frame between the task
        and a wait is crossed twice per request (suspend and resume), and an idle connection
        keeps each one (see the module docstring, Memory)."""
        services = self.services
        services.connections.add(self)
        metrics = services.metrics
        metrics.client_connections_active.inc()
        if services.netlog.active:
            services.netlog.emit(self.conn_id, None, "accepted", peer=self.client_address)
        try:
            while True:
                self._logged = False
                try:
                    if self._h11 is _WAITING:
                        # Between requests with nothing buffered (the usual case). We just
                        # answered the previous request, so the next one cannot be here yet:
                        # wait, then read (http.sockio), rather than a read that fails first.
                        # The idle timeout and draining end the wait through IdleConnections.
                        if services.draining:
                            return
                        idle = services.idle
                        idle.add(self, services.now())
                        try:
                            # Let every other ready task run first, then read: under load the
                            # client has sent its next request by then, and the read needs no
                            # epoll registration.
                            await trio.lowlevel.cancel_shielded_checkpoint()
                            if not idle.holds(self):
                                return  # ended meanwhile (idle timeout, draining)
                            maybe = sockio.try_read(self.stream)
                            if maybe is None:
                                maybe = await sockio.read_after_wait(self.stream)
                        except trio.ClosedResourceError:
                            return  # keep-alive idle timeout, or draining
                        finally:
                            idle.discard(self)
                        if not maybe:
                            return
                        # The common request, whole in one read: no h11 connection at all
                        # unless something needs one later (the h11 property). With the cache
                        # on, a hit from its memory tier is answered without h11 too; a miss
                        # hands the head to h11 (parsed twice then, but the fast parse is a few
                        # microseconds of the tens h11 takes).
                        # The limit as configured now (a reload may change it between requests).
                        max_head = services.config.client.max_head_size
                        request: AnyRequest | None = fastpath.parse_request(maybe, max_head)
                        if request is not None:
                            self.fast_head = maybe
                        else:
                            request = await self._read_request(maybe)
                    else:
                        request = await self._read_request(None)
                except ProxydError as exc:
                    self.req_id = next(_request_ids)
                    await self._send_error(exc, b"-", "-", trio.current_time())
                    return
                if request is None:
                    return
                self.req_id = next(_request_ids)
                keep_alive = await self._serve(request)
                del request  # not kept alive (~0.5 KiB of head) while waiting for the next one
                if not keep_alive or services.draining:
                    return
                if self.fast_head is not None:
                    return  # never: the fast relay or h11 has taken the head (defensive)
                # Read after the exchange, and not kept across the next one: a tunnelled
                # WebSocket replaces self.h11, and the CONNECT's connection must not outlive it
                # (~0.9 KiB).
                cc = self._h11
                if cc is _WAITING:
                    continue  # relayed by http.fastpath: h11 never saw it, nothing is buffered
                if cc.our_state is not h11.DONE or cc.their_state is not h11.DONE:
                    # e.g. the origin answered before the whole body came: close in stages so
                    # the unread upload does not turn the close into a reset that destroys the
                    # answer.
                    self._linger = True
                    return
                if cc.trailing_data[0]:
                    cc.start_next_cycle()  # pipelined bytes are buffered: parse them next
                else:
                    self.h11 = _WAITING  # nothing to keep while idle (see _WAITING)
                del cc
        except ClientGone as exc:
            log.debug("c%d: %s", self.conn_id, exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.debug("c%d: connection broke", self.conn_id)
        except Exception:
            log.exception(
                "c%d: unexpected error on a client connection from %s",
                self.conn_id,
                self.client_address,
            )
        finally:
            services.connections.discard(self)
            if services.draining and not services.connections:
                services.all_closed.set()
            metrics.client_connections_active.dec()
            if services.netlog.active:
                services.netlog.emit(self.conn_id, None, "closed")
            try:
                with trio.CancelScope(shield=True):
                    if self._linger:
                        await self._lingering_close()
                    await close_stream(self.stream)  # a plain socket: closed without a pass
            finally:
                if self._limiter is not None:
                    self._limiter.release_on_behalf_of(self._token)

    async def _lingering_close(self) -> None:
        """After an error response, half-close and read what the client still sends (bounded) so
        closing does not reset the connection and destroy the response before it is read
        (RFC 9112 §9.6: a server closes in stages)."""
        with trio.move_on_after(LINGER_SECONDS):
            try:
                await self.stream.send_eof()
                drained = 0
                while drained < LINGER_BYTES:
                    data = await self.stream.receive_some(RECEIVE_SIZE)
                    if not data:
                        return
                    drained += len(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return

    async def _read_request(self, data: bytes | None) -> _h11.Request | None:
        """The next request head by h11, or None when the client closed: ``data`` is the first
        read of a request that is not of http.fastpath's shape (``run`` did the wait and the
        read), None when pipelined bytes are buffered in the h11 connection."""
        max_head = self.services.config.client.max_head_size
        if data is not None:
            # A request starts: its own h11 connection.
            cc = self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head)
            head_checked = check_head_bytes(data, max_head) != HEAD_INCOMPLETE
            cc.receive_data(data)
            return await self._read_request_head(cc, data, head_checked, waited=True)
        cc = self._h11
        pending = cc.trailing_data[0]
        # Pipelined bytes: their head is checked, and the head timeout starts now.
        head_checked = bool(pending) and check_head_bytes(pending, max_head) != HEAD_INCOMPLETE
        return await self._read_request_head(cc, pending, head_checked, waited=False)

    async def _read_request_head(
        self,
        cc: _h11.Connection,
        scan: bytes | bytearray,
        head_checked: bool,
        *,
        waited: bool,
    ) -> _h11.Request | None:
        """The rest of ``_read_request`` when h11 parses: ``cc`` holds ``scan`` (the head so
        far; empty only when nothing was buffered and the client closed its side), which has
        started the head timeout."""
        config = self.services.config.client
        max_head = config.max_head_size
        head_deadline: float | None = None
        while True:
            try:
                event = cc.next_event()
            except h11.RemoteProtocolError as exc:
                if exc.error_status_hint == 431:
                    raise HeadTooLarge(
                        f"the request head is larger than {max_head} bytes"
                    ) from None
                if exc.error_status_hint == 501 and transfer_coding_error_status(scan) == 501:
                    raise TransferCodingNotImplemented(
                        f"unsupported transfer coding: {exc}"
                    ) from None
                raise BadRequest(f"malformed request: {exc}") from None
            if event is h11.NEED_DATA:
                if head_deadline is None:
                    head_deadline = trio.current_time() + config.timeouts.head
                maybe_data = await sockio.receive_some(self.stream, head_deadline, wait_first=True)
                if maybe_data is None:
                    raise RequestHeadTimeout(
                        f"the request head did not arrive within {config.timeouts.head:g}s"
                    )
                data = maybe_data
                waited = True
                if not data:
                    if scan:
                        log.debug("c%d: client closed mid-head", self.conn_id)
                    return None
                if not head_checked:
                    scan = scan + data if scan else data
                    head_checked = check_head_bytes(scan, max_head) != HEAD_INCOMPLETE
                cc.receive_data(data)
                continue
            if type(event) is h11.Request:
                assert isinstance(event, h11.Request)
                if not waited:
                    # A pipelined request was buffered already: yield once anyway, so a client
                    # that keeps the buffer full cannot hold the event loop (http.sockio skips
                    # the checkpoint of writes that complete at once).
                    await trio.lowlevel.checkpoint()
                return event
            return None  # ConnectionClosed

    async def _serve(self, request: AnyRequest) -> bool:
        """Answer one request; True when the connection may carry another."""
        services = self.services
        started = services.now()
        method = request.method
        url = request.target
        netlog = services.netlog
        stats = ExchangeStats()
        # Set after: keyword arguments to a dataclass __init__ cost ~90 ns each on this path.
        stats.netlog, stats.conn_id, stats.req_id = netlog, self.conn_id, self.req_id
        if netlog.active:
            netlog.emit(
                self.conn_id,
                self.req_id,
                "request",
                method=method.decode("ascii", "replace"),
                url=url.decode("ascii", "replace"),
            )
        try:
            if not self.allowed:
                raise ClientForbidden(
                    f"client {self.client_address} is not allowed to use this proxy"
                )
            if services.auth is not None:
                await self._authenticate(request)
            if method == b"CONNECT":
                assert isinstance(request, h11.Request)  # http.fastpath takes GETs only
                return await self._serve_connect(request, started)
            # A fast-path request has no Upgrade field (http.fastpath): no need to look.
            if self.fast_head is None and is_websocket_upgrade(request.headers):
                # Before prepare_request: it strips Upgrade as hop-by-hop.
                assert isinstance(request, h11.Request)
                return await self._serve_websocket(request, started, stats)
            target = parse_absolute_target(url)
            fields = request.headers
            facts = prepare_request(
                fields.raw_items(),
                authority=target.authority,
                via=services.via_for_version(request.http_version),
                pseudonym=services.pseudonym,
                is_max_forwards_method=method in _MAX_FORWARDS_METHODS,
                lowered_names=(
                    fields.lowered_names() if type(fields) is fastpath.FastHeaders else None
                ),
            )
            if facts.max_forwards == 0:
                return await self._answer_max_forwards(request, started)
            cache = services.cache
            if cache is not None and (
                method not in _BODYLESS_CACHE_METHODS
                or not (facts.has_content_length or facts.has_transfer_encoding)
            ):
                if method == b"PURGE":
                    return await self._purge(request, started, cache)

                async def fetch(
                    headers: list[tuple[bytes, bytes]], tap: ResponseTap | None
                ) -> None:
                    await self._forward(request, target, facts, stats, tap, headers)

                await cache.handle(
                    self, method, list(request.headers), target, facts.headers, stats, fetch
                )
            else:
                routes = (
                    None
                    if netlog.active
                    else services.router.decide_static(target.host, target.port)
                )
                if routes is not None and len(routes) == 1:
                    # One static route (the usual case): relayed from here, one coroutine frame
                    # fewer under every wait of the exchange than through ``_forward``.
                    route = routes[0]
                    stats.route = route.label
                    stats.route_kind = route_kind(route)
                    try:
                        await forward(self, request, target, facts, services.relay, stats, route)
                    except ProxydError as exc:
                        self._route_failed(routes, 0, exc, stats)  # re-raises: no route left
                else:
                    await self._forward(request, target, facts, stats, None, None, routes)
        except ProxydError as exc:
            if stats.head_sent:  # too late for an error response: cut the connection
                log.info("c%d: %s", self.conn_id, exc.detail)
                self._error_detail = exc.detail
                self._finish(method, url, started, stats, error_type=exc.error_type)
                services.metrics.observe_error(exc.error_type)
                return False
            return await self._send_error(
                exc, method, url.decode("ascii", "replace"), started, stats
            )
        except h11.RemoteProtocolError as exc:
            return await self._send_error(
                BadRequest(f"malformed request: {exc}"),
                method,
                url.decode("ascii", "replace"),
                started,
            )
        except ResponseAborted as exc:
            log.info("c%d: %s", self.conn_id, exc)
            self._error_detail = str(exc)
            self._finish(method, url, started, stats, error_type=exc.error_type)
            services.metrics.observe_error(exc.error_type)
            return False
        except ClientGone:
            self._finish(method, url, started, stats, error_type="client_gone")
            raise
        self._finish(method, url, started, stats, route=stats.route)
        return not services.draining

    def _finish(
        self,
        method: bytes,
        url: bytes,
        started: float,
        stats: ExchangeStats,
        error_type: str = "-",
        route: str = "DIRECT",
    ) -> None:
        """Account for one request: exactly one access-log line and one requests_total count,
        however many paths try to (a response we wrote ourselves, then the client vanishing)."""
        detail, self._error_detail = self._error_detail, ""
        if self._logged:
            return
        self._logged = True
        services = self.services
        duration = services.now() - started
        status = stats.status or 499
        if services.netlog.active:
            self._emit_end(stats, status, duration, error_type)
        services.metrics.observe_exchange(
            method,
            status,
            duration,
            stats.route_kind,
            "none" if stats.cache == "-" else stats.cache,
            stats.bytes_in,
            stats.bytes_out,
            stats.first_byte_at - started if stats.first_byte_at else None,
        )
        if error_type == "-" and services.access_log is None:
            return  # the usual end: nothing more to note
        method_text = method.decode("ascii", "replace")
        if error_type not in ("-", "client_gone"):  # a client leaving is not the proxy's error
            services.recent_errors.append(
                RecentError(
                    at=time.time(),
                    conn_id=self.conn_id,
                    client=self.client_address,
                    method=method_text,
                    url=url.split(b"?", 1)[0].decode("ascii", "replace"),
                    status=status,
                    error_type=error_type,
                    detail=detail,
                )
            )
        if services.access_log is not None:
            services.access_log.write(
                AccessRecord(
                    conn_id=self.conn_id,
                    client=self.client_address,
                    user=self.user,
                    method=method_text,
                    url=url.decode("ascii", "replace"),
                    status=status,
                    bytes_in=stats.bytes_in,
                    bytes_out=stats.bytes_out,
                    duration=duration,
                    upstream=stats.upstream,
                    route=route,
                    cache=stats.cache,
                    error=error_type,
                )
            )

    async def _authenticate(self, request: AnyRequest) -> None:
        services = self.services
        auth = services.auth
        assert auth is not None
        header = None
        for field_name, value in request.headers:
            if field_name == b"proxy-authorization":
                header = value
                break
        if header is None:
            raise ProxyAuthRequired("proxy authentication required")
        user = auth.lookup(header)
        if user is not None:
            self.user = user
            return
        credentials = access.parse_basic_credentials(header)
        if credentials is None:
            raise ProxyAuthRequired("malformed Proxy-Authorization (Basic expected)")
        user_name, password = credentials
        stored = auth.users.get(user_name)
        if stored is None:
            raise ProxyAuthRequired("wrong user name or password")
        ok = await trio.to_thread.run_sync(
            access.verify_password, stored, password, limiter=services.auth_limiter
        )
        if not ok:
            log.warning("c%d: failed proxy authentication for user %r", self.conn_id, user_name)
            raise ProxyAuthRequired("wrong user name or password")
        auth.remember(header, user_name)
        self.user = user_name

    # --- NetLog events (observe/netlog.py); each is called under ``if netlog.active:`` ---------

    async def _decide(self, scheme: str, host: str, port: int, url: str) -> RouteList:
        """The router's route list for this request, and a ``route`` event."""
        router = self.services.router
        routes = await router.decide(scheme, host, port, url)
        netlog = self.services.netlog
        if netlog.active:
            pac = router.mode == "pac" and not router.static.is_bypassed(host, port)
            netlog.emit(
                self.conn_id,
                self.req_id,
                "route",
                routes=[route.label for route in routes],
                source="pac" if pac else "static",
            )
        return routes

    def _emit_tunnel_socket(self, stats: ExchangeStats, asked: float | None) -> None:
        wait = None if asked is None else trio.current_time() - asked
        self.services.netlog.emit(
            self.conn_id, self.req_id, "socket", tunnel=True, wait=wait, route=stats.route
        )

    def _emit_end(self, stats: ExchangeStats, status: int, duration: float, error: str) -> None:
        fields = {
            "status": status,
            "bytes_in": stats.bytes_in,
            "bytes_out": stats.bytes_out,
            "duration": duration,
            "route": stats.route,
            "cache": stats.cache,
        }
        if error == "-":
            self.services.netlog.emit(self.conn_id, self.req_id, "completed", **fields)
        else:
            self.services.netlog.emit(self.conn_id, self.req_id, "failed", error=error, **fields)

    async def _forward(
        self,
        request: AnyRequest,
        target: Target,
        facts: RequestFacts,
        stats: ExchangeStats,
        tap: ResponseTap | None,
        headers: list[tuple[bytes, bytes]] | None,
        routes: RouteList | None = None,
    ) -> None:
        """Route the request and relay it (http.relay.forward), failing over like
        ``_with_failover``; written out rather than through it, so the per-request path creates
        no closure and has one coroutine frame less under every await. ``routes``: the static
        decision when the caller made it already (None: decide here)."""
        services = self.services
        # Static routing needs no await (and no URL text); PAC and the NetLog take _decide.
        if routes is None and not services.netlog.active:
            routes = services.router.decide_static(target.host, target.port)
        if routes is None:
            routes = await self._decide(
                target.scheme.decode("ascii"),
                target.host,
                target.port,
                request.target.decode("ascii"),
            )
        relay = services.relay
        for index, route in enumerate(routes):
            stats.route = route.label
            stats.route_kind = route_kind(route)
            try:
                await forward(
                    self, request, target, facts, relay, stats, route, tap=tap, headers=headers
                )
                return
            except ProxydError as exc:
                self._route_failed(routes, index, exc, stats)

    async def _with_failover(
        self,
        routes: RouteList,
        attempt: Callable[[Route], Awaitable[_T]],
        stats: ExchangeStats,
    ) -> _T:
        """Try each route in order. A proxy that failed as a proxy goes on the bad-proxy list and
        the next route is tried — only while nothing has reached the client and no request body
        was consumed (a request is never replayed once it started to flow)."""
        for index, route in enumerate(routes):
            stats.route = route.label
            stats.route_kind = route_kind(route)
            try:
                return await attempt(route)
            except ProxydError as exc:
                self._route_failed(routes, index, exc, stats)
        raise AssertionError("unreachable: a route list is never empty")

    def _route_failed(
        self, routes: RouteList, index: int, exc: ProxydError, stats: ExchangeStats
    ) -> None:
        """``routes[index]`` failed with ``exc`` (being handled): re-raise it unless failing
        over to the next route is allowed (then mark the proxy bad and return)."""
        route = routes[index]
        if not exc.proxy_failure:
            raise exc
        services = self.services
        services.router.bad_proxies.mark_bad(exc.next_hop or route.label, trio.current_time())
        if services.netlog.active:
            services.netlog.emit(
                self.conn_id, self.req_id, "route_failed", route=route.label,
                error=exc.error_type,
            )  # fmt: skip
        if index == len(routes) - 1 or stats.head_sent or stats.informational or stats.bytes_in:
            raise exc
        services.metrics.failovers.labels(route_kind(route)).inc()
        log.warning(
            "c%d: %s; failing over to %s", self.conn_id, exc.detail, routes[index + 1].label
        )

    async def _serve_connect(self, request: _h11.Request, started: float) -> bool:
        services = self.services
        config = services.config
        target = parse_authority(request.target)
        if not any(low <= target.port <= high for low, high in config.connect.allowed_ports):
            raise DestinationForbidden(f"CONNECT to port {target.port} is not allowed")
        stats = ExchangeStats(upstream=f"{target.host}:{target.port}")
        # Static routing needs no await (and no URL text); PAC and the NetLog take _decide.
        routes = (
            None
            if services.netlog.active
            else services.router.decide_static(target.host, target.port)
        )
        if routes is None:
            scheme = "https" if target.port == 443 else "http"
            routes = await self._decide(
                scheme, target.host, target.port, f"{scheme}://{target.authority.decode()}/"
            )

        async def attempt(route: Route) -> trio.abc.Stream:
            return await open_checked(
                services.relay, target.host, target.port, route, tls=False, tunnel=True
            )

        asked = trio.current_time() if services.netlog.active else None
        async with services.relay.pool.tunnel_slot(target.host):
            upstream = await self._with_failover(routes, attempt, stats)
            if services.netlog.active:
                self._emit_tunnel_socket(stats, asked)
            return await self._run_connect_tunnel(request, started, upstream, stats)

    async def _run_connect_tunnel(
        self,
        request: _h11.Request,
        started: float,
        upstream: trio.abc.Stream,
        stats: ExchangeStats,
    ) -> bool:
        services = self.services
        config = services.config
        tunnel_stats = TunnelStats()
        target = request.target.decode("ascii", "replace")
        tunnel = OpenTunnel(
            self.conn_id,
            self.client_address,
            target,
            stats.route,
            trio.current_time(),
            tunnel_stats,
        )
        metrics = services.metrics
        metrics.tunnels.inc()
        metrics.tunnels_active.inc()
        services.tunnels.add(tunnel)
        try:
            headers = []
            via = services.via_for_version(request.http_version)
            if via is not None:
                headers.append((b"Via", via))
            data = self.h11.send(
                h11.Response(status_code=200, headers=headers, reason=b"Connection Established")
            )
            stats.status = 200
            await self.send(data, config.upstream.timeouts.idle_read)
            stats.head_sent = True
            trailing = bytes(self.h11.trailing_data[0])
            idle = False
            if config.websocket.inspect_connect:
                sniffed = await sniff_tunnel(
                    self.stream,
                    upstream,
                    trailing,
                    timeout=config.client.timeouts.head,
                    idle_timeout=config.tunnel.idle_timeout,
                    max_head=config.client.max_head_size,
                )
                if sniffed.request is not None:
                    services.tunnels.discard(tunnel)  # a WebSocket session now, listed as one
                    await self._tunneled_websocket(request, sniffed, upstream, stats)
                    return False
                trailing = sniffed.client_bytes
                idle = sniffed.idle
                if sniffed.origin_bytes:
                    await self.send(sniffed.origin_bytes, config.upstream.timeouts.idle_read)
                    tunnel_stats.bytes_down += len(sniffed.origin_bytes)
            if idle:  # nothing moved either way for tunnel.idle_timeout while peeking
                tunnel_stats.ended_by = "idle_timeout"
            else:
                if trailing:
                    with trio.move_on_after(config.upstream.timeouts.idle_read) as scope:
                        await upstream.send_all(trailing)
                    if scope.cancelled_caught:
                        raise trio.BrokenResourceError("the origin did not take the first bytes")
                    tunnel_stats.bytes_up += len(trailing)
                await run_tunnel(
                    self.stream,
                    upstream,
                    idle_timeout=config.tunnel.idle_timeout,
                    stats=tunnel_stats,
                    on_bytes=None,
                )
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            tunnel_stats.ended_by = "reset"
        finally:
            services.tunnels.discard(tunnel)
            metrics.tunnels_active.dec()
            if tunnel_stats.bytes_up:  # none when the tunnel became a WebSocket session
                metrics.tunnel_bytes_up.inc(tunnel_stats.bytes_up)
            if tunnel_stats.bytes_down:
                metrics.tunnel_bytes_down.inc(tunnel_stats.bytes_down)
            await close_stream(upstream)  # no checkpoint for a plain socket (websocket.relay)
        stats.bytes_in = tunnel_stats.bytes_up
        stats.bytes_out = tunnel_stats.bytes_down
        self._finish(request.method, request.target, started, stats, route=stats.route)
        return False

    # --- WebSocket sessions (proxyd/websocket) ----------------------------------------------

    async def _serve_websocket(
        self, request: _h11.Request, started: float, stats: ExchangeStats
    ) -> bool:
        """An absolute-form upgrade (``GET ws://host/path``): upstream leg first (routing,
        failover, the per-host tunnel limit), then the handshakes and the session."""
        services = self.services
        try:
            target = parse_absolute_target(request.target)
            stats.upstream = f"{target.host}:{target.port}"
            upgrade = check_client_upgrade(
                request.method, request.http_version, request.headers.raw_items()
            )
            secure = target.scheme in TLS_SCHEMES
            scheme = "https" if secure else "http"  # what PAC and rules see for wss / ws
            routes = await self._decide(
                scheme,
                target.host,
                target.port,
                f"{scheme}://{target.authority.decode()}{target.path.decode('ascii', 'replace')}",
            )

            async def attempt(route: Route) -> trio.abc.Stream:
                return await open_checked(
                    services.relay, target.host, target.port, route, tls=secure, tunnel=True
                )

            asked = trio.current_time() if services.netlog.active else None
            async with services.relay.pool.tunnel_slot(target.host):
                upstream = await self._with_failover(routes, attempt, stats)
                if services.netlog.active:
                    self._emit_tunnel_socket(stats, asked)
                try:
                    await run_upgrade(
                        services.websocket_context(),
                        self.stream,
                        self.h11,
                        request,
                        upgrade,
                        upstream,
                        authority=target.authority,
                        path=target.path,
                        stats=stats,
                        name=f"c{self.conn_id}",
                    )
                finally:
                    await close_stream(upstream)
        except ProxydError as exc:
            if not stats.head_sent:
                services.metrics.ws_handshake_failures.labels(failure_reason(exc)).inc()
            raise
        except ClientGone:
            # Left before its 101 or during a relayed rejection (a session never raises it):
            # not a ProxydError, so counted here; _serve re-raises after this one line.
            services.metrics.ws_handshake_failures.labels("client_gone").inc()
            self._finish(request.method, request.target, started, stats, error_type="client_gone")
            raise
        if stats.status != 101:
            self._linger = True  # a relayed rejection: unread client bytes must not reset it
        self._finish(request.method, request.target, started, stats, route=stats.route)
        return False

    async def _tunneled_websocket(
        self,
        connect: _h11.Request,
        sniffed: Sniffed,
        upstream: trio.abc.Stream,
        connect_stats: ExchangeStats,
    ) -> None:
        """A plaintext upgrade inside a CONNECT tunnel (how browsers send ws://): the upstream
        stream is open already. The tunnel now speaks the inner HTTP/1.1 connection, which gets
        the access-log line (one per session) and any error response."""
        services = self.services
        assert sniffed.conn is not None and sniffed.request is not None
        inner = sniffed.request
        self.h11 = sniffed.conn
        # Nothing of the handshake stays referenced while the session runs (memory per idle
        # session): the sniffed bytes and parsed request go now, and the request is handed to
        # run_upgrade through ``handed`` (no local keeps it), which drops it after the 101.
        sniffed.conn = sniffed.request = None
        sniffed.client_bytes = b""
        method = inner.method
        started = trio.current_time()
        authority = connect.target
        for name, value in inner.headers:
            if name == b"host":
                authority = value
        path = inner.target
        url = b"ws://" + authority + path
        stats = ExchangeStats(
            upstream=connect_stats.upstream,
            route=connect_stats.route,
            route_kind=connect_stats.route_kind,
        )
        handed = [inner]
        del inner
        try:
            upgrade = check_client_upgrade(
                method, handed[0].http_version, handed[0].headers.raw_items()
            )
            await run_upgrade(
                services.websocket_context(),
                self.stream,
                self.h11,
                handed.pop(),
                upgrade,
                upstream,
                authority=authority,
                path=path,
                stats=stats,
                name=f"c{self.conn_id}",
            )
        except ProxydError as exc:
            if stats.head_sent:
                self._finish(method, url, started, stats, error_type=exc.error_type)
                return
            services.metrics.ws_handshake_failures.labels(failure_reason(exc)).inc()
            text_url = url.decode("ascii", "replace")
            await self._send_error(exc, method, text_url, started, stats)
            return
        except ClientGone:
            # The line is the inner request's, like a session's; _serve's own for the CONNECT
            # is then a no-op (one line per request, _finish).
            services.metrics.ws_handshake_failures.labels("client_gone").inc()
            self._finish(method, url, started, stats, error_type="client_gone")
            raise
        if stats.status != 101:
            self._linger = True  # a relayed rejection: unread client bytes must not reset it
        self._finish(method, url, started, stats, route=stats.route)

    async def _purge(self, request: AnyRequest, started: float, cache: HttpCache) -> bool:
        """PURGE http://host/path: remove every stored variant, for clients in purge_clients."""
        if not access.ClientAcl(self.services.config.cache.purge_clients).allows(
            self.client_address
        ):
            raise ClientForbidden(f"client {self.client_address} may not PURGE")
        removed = await cache.purge(request.target.decode("ascii"))
        status = 200 if removed else 404
        body = f"purged {removed}\n".encode() if removed else b"not in the cache\n"
        headers = [
            (b"Content-Type", b"text/plain; charset=utf-8"),
            (b"Content-Length", b"%d" % len(body)),
        ]
        stats = ExchangeStats(status=status, upstream="cache", bytes_out=len(body))
        return await self._respond(
            status, headers, body, request.method, request.target, started, stats
        )

    async def _answer_max_forwards(self, request: AnyRequest, started: float) -> bool:
        """RFC 9110 §7.6.2: Max-Forwards 0 on OPTIONS/TRACE means this proxy is the recipient."""
        if request.method == b"TRACE":
            body = trace_body(
                request.method, request.target, request.http_version, request.headers.raw_items()
            )
            headers = [
                (b"Content-Type", b"message/http"),
                (b"Content-Length", str(len(body)).encode()),
            ]
        else:
            body = b""
            headers = [(b"Allow", _ALLOW_ALL), (b"Content-Length", b"0")]
        via = self.services.via_for_version(request.http_version)
        if via is not None:
            headers.append((b"Via", via))
        stats = ExchangeStats(status=200, upstream="-", bytes_out=len(body))
        return await self._respond(
            200, headers, body, request.method, request.target, started, stats
        )

    async def _respond(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        method: bytes,
        url: bytes,
        started: float,
        stats: ExchangeStats,
        error_type: str = "-",
    ) -> bool:
        """Send a complete response of our own; skip the request body if any is pending."""
        cc: h11.Connection | None = self.h11
        assert cc is not None
        try:
            data = cc.send(
                h11.Response(status_code=status, headers=headers, reason=reason_phrase(status))
            )
            if body and method != b"HEAD":
                data += cc.send(h11.Data(data=body))
            data += cc.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            # h11 cannot frame a response now (the request never parsed): raw bytes and close.
            data = _raw_response(status, headers, body)
            cc = None
        stats.status = status
        try:
            await self.send(data, self.services.config.upstream.timeouts.idle_read)
        except ClientGone:
            self._finish(method, url, started, stats, error_type="client_gone")
            raise
        self._finish(method, url, started, stats, error_type=error_type)
        if cc is not None:
            _consume_buffered_request(cc)
        keep = cc is not None and cc.their_state is h11.DONE
        if not keep:
            self._linger = True  # unread request bytes would turn our close into a reset
        return keep

    async def _send_error(
        self,
        error: ProxydError,
        method: bytes,
        url: str,
        started: float,
        stats: ExchangeStats | None = None,
    ) -> bool:
        services = self.services
        services.metrics.observe_error(error.error_type)
        self._error_detail = error.detail
        if error.status >= 500 or isinstance(error, (ClientForbidden, ProxyAuthRequired)):
            log.info(
                "c%d: %s %s: %s (%s)",
                self.conn_id,
                method.decode("ascii", "replace"),
                url,
                error.detail,
                error.error_type,
            )
        body = error_body(error)
        headers = [
            (b"Content-Type", b"text/plain; charset=utf-8"),
            (b"Content-Length", str(len(body)).encode("ascii")),
            (
                b"Proxy-Status",
                proxy_status_value(
                    services.pseudonym.decode(), error.error_type, error.detail, error.next_hop
                ),
            ),
            (b"Cache-Control", b"no-store"),
        ]
        if error.cache_status is not None:
            headers.append((b"Cache-Status", error.cache_status))
        if isinstance(error, ProxyAuthRequired) and services.auth is not None:
            realm = services.config.auth.realm
            headers.append(
                (b"Proxy-Authenticate", f'Basic realm="{realm}", charset="UTF-8"'.encode())
            )
        close = error.close_connection or services.draining
        if close:
            headers.append((b"Connection", b"close"))
            self._linger = True
        stats = stats or ExchangeStats()
        keep = await self._respond(
            error.status,
            headers,
            body,
            method,
            url.encode("ascii", "replace"),
            started,
            stats,
            error_type=error.error_type,
        )
        return keep and not close


class _NullClient:
    """The client side of a request the cache makes by itself (a background revalidation): a GET
    without a body whose response nobody reads."""

    def __init__(self) -> None:
        self.h11 = h11.Connection(h11.SERVER)
        self.h11.receive_data(b"GET / HTTP/1.1\r\nHost: cache\r\n\r\n")
        self.h11.next_event()
        self.fast_head: bytes | None = None

    async def send(self, data: bytes | list[bytes], timeout: float) -> None:
        return None

    def is_closing(self) -> bool:
        return False

    async def receive(self, timeout: float) -> bytes:
        return b""


def make_background_fetch(
    services: Services,
) -> Callable[[Target, list[tuple[bytes, bytes]], ResponseTap], Awaitable[None]]:
    """The cache's way to send a request of its own (routing, failover and pools apply)."""

    async def fetch(target: Target, headers: list[tuple[bytes, bytes]], tap: ResponseTap) -> None:
        url = b"%s://%s%s" % (target.scheme, target.authority, target.path)
        routes = await services.router.decide(
            target.scheme.decode("ascii"), target.host, target.port, url.decode("ascii")
        )
        request = h11.Request(method=b"GET", target=url, headers=[(b"host", target.authority)])
        stats = ExchangeStats()
        for index, route in enumerate(routes):
            try:
                await forward(
                    _NullClient(), request, target, RequestFacts(), services.relay, stats,
                    route, tap=tap, headers=headers,
                )  # fmt: skip
                return
            except ProxydError as exc:
                if not exc.proxy_failure or index == len(routes) - 1 or stats.head_sent:
                    raise
                services.router.bad_proxies.mark_bad(
                    exc.next_hop or route.label, trio.current_time()
                )

    return fetch


def _consume_buffered_request(cc: h11.Connection) -> None:
    """Read the rest of a request we answered ourselves, as far as it is already buffered (a
    body-less request ends right away), so the connection can stay open for the next one."""
    try:
        while cc.their_state is h11.SEND_BODY:
            event = cc.next_event()
            if event is h11.NEED_DATA or type(event) is h11.ConnectionClosed:
                return
    except h11.RemoteProtocolError:
        return


def _raw_response(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    lines = [b"HTTP/1.1 %d %s" % (status, reason_phrase(status))]
    lines.extend(name + b": " + value for name, value in headers if name.lower() != b"connection")
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


__all__ = ["ClientConnection", "Services"]

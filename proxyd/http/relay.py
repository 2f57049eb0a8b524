"""Relaying one HTTP exchange: the request up, every 1xx and the final response down.

How it works (``forward``):

1. Take an idle keep-alive socket for the origin, or connect (``open_checked``: Happy Eyeballs,
   TLS for https, and a refusal to reach the proxy's own admin listener).
2. Send the request head. A request without a body goes out as one write, head and end together,
   and is relayed without any extra task. A request with a body starts a pump task that streams it
   up (``_pump_request_body``) while this task reads the response: an origin may answer before it
   has read the body (RFC 9110 §15.5.14 413, or a final answer to ``Expect: 100-continue``).
3. Read the response head within ``upstream.timeouts.response_head``. Each informational response
   (100, 103, ...) is forwarded at once, in order (RFC 9110 §15.2); per-response bookkeeping (time
   to first byte, counters, the access-log line) belongs to the final response only.
4. Stream the body: every upstream read is parsed into events, their client-side bytes are joined
   and written with one ``send_all`` (so a small response costs one write), then the next read.
   Backpressure is natural: we do not read from the origin until the client took the last write.
5. Hand the socket back to the pool when both directions ended cleanly; otherwise close it.

Cost per request (a 1 KiB GET relayed on warm keep-alive sockets is the case to keep cheap): the
socket I/O goes through ``http.sockio`` (a write the kernel takes at once does not yield; the
response head is waited for, then read; timeouts need no cancel scope per wait), h11 is told
nothing it would answer with NEED_DATA anyway, request fields are copied only when fields are
added, and the head, body and end of a small response leave in one write.

The fast path (``_forward_fast``, ``http.fastpath``): a GET that ``http.fastpath`` parsed (the
client side never made an h11 connection for it), with no cache tap and no NetLog capture, goes
up as bytes ``fastpath.request_head`` writes; when the answer's head is whole in the first read and
has the simple shape (HTTP/1.1, a Content-Length, nothing that needs h11), its head is rewritten
for the client by ``fastpath.response_for_client`` and the body relayed by count, and neither h11
connection is touched: both stay IDLE, which the pool takes as reusable. Anything else hands the
bytes read so far to h11 (told of the request it did not write, so it stands where it would
have) and the general path finishes the exchange. The request's head is built before the wait for a
socket: should the request queue (more clients of an origin than ``pool.per_group``), the pool
writes it at the hand-over (pool.py, "writing ahead"), and the woken request reads its answer at
once, one scheduler pass sooner. Half of the CPU of a proxied small GET was h11's
state machine; this is most of why a 1 KiB request costs ~90 µs and not ~180.

Failure rules: before the client has seen a byte of the final response, a failure becomes a
``ProxydError`` (an error response with Proxy-Status). After that, the client connection is cut
(``ResponseAborted``) so a truncated body can never look complete. A reused socket that fails
before any response byte (the origin closed it while it idled) is retried once on a fresh socket
when the request has no body, the classic "stale keep-alive" race.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, cast

import trio

from proxyd._h11 import h11
from proxyd.errors import (
    BadRequest,
    BadResponse,
    DestinationForbidden,
    ProxydError,
    ReadTimeout,
    ResponseHeadTooLarge,
    ResponseIncomplete,
    ResponseTimeout,
    UpstreamProxyAuthFailed,
)
from proxyd.http import fastpath, sockio
from proxyd.http.messages import Target
from proxyd.http.rules import RequestFacts, prepare_response
from proxyd.observe.metrics import Metrics
from proxyd.observe.netlog import NETLOG_OFF, NetLog
from proxyd.upstream.connect import open_route_stream, proxy_authorization
from proxyd.upstream.pool import Pool, UpstreamConnection
from proxyd.upstream.route import DIRECT, Direct, Route, ViaProxy

GroupKey = tuple[bytes, str, int, Route]

RECEIVE_SIZE: Final = sockio.RECEIVE_SIZE
IDEMPOTENT_METHODS: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
MAX_RESPONSE_HEAD: Final = 65536
#: A body piece at least this large goes to the client with writev next to the head, not joined.
WRITEV_MIN: Final = 16384

_NEED_DATA = h11.NEED_DATA
_Data = h11.Data
_EndOfMessage = h11.EndOfMessage
_END = h11.EndOfMessage()  # events are immutable: one instance serves every response


class ClientGone(Exception):
    """The client closed or reset its connection (or stopped reading) mid-exchange."""


class ResponseAborted(Exception):
    """The final response head already reached the client; the connection must be cut."""

    def __init__(self, error_type: str, detail: str) -> None:
        super().__init__(detail)
        self.error_type = error_type


class _StaleConnection(Exception):
    """A reused upstream socket failed before any response byte: safe to retry once."""


class BodySink(Protocol):
    """Where a tapped response body also goes (the cache's body writer)."""

    async def write(self, data: bytes) -> None:
        """Take the next body bytes; never raises for its own failures (the client comes first)."""
        ...

    async def end(self) -> None:
        """The body is complete (called after the client has it)."""
        ...

    def wants_body_without_client(self) -> bool:
        """When the client leaves mid-body, keep reading the origin for this sink (followers of a
        collapsed fetch are waiting for the same body)."""
        ...


class Consume:
    """A tap's verdict: do not relay this response; read and discard it (the cache answers)."""


CONSUME: Final = Consume()


class ResponseTap(Protocol):
    """Looks at the final response head before the client sees it (the cache)."""

    async def on_response(
        self, response: h11.Response, client_headers: list[tuple[bytes, bytes]]
    ) -> BodySink | Consume | None:
        """``client_headers`` (the fields the client will get) may be edited in place; return a
        sink to copy the body into, ``CONSUME`` to keep the response from the client, or None."""
        ...


class ClientSide(Protocol):
    """What the relay needs of the client connection (implemented by client.ClientConnection)."""

    h11: h11.Connection
    #: The request head when http.fastpath parsed it and h11 has not seen it (reading ``h11``
    #: hands it to h11); the fast relay sets it to None once it has answered.
    fast_head: bytes | None

    async def send(self, data: bytes | list[bytes], timeout: float) -> None:
        """Write ``data`` (a list: its parts in order, in one system call where possible)."""
        ...

    def is_closing(self) -> bool:
        """True when this must be the connection's last response (the daemon is draining)."""
        ...

    async def receive(self, timeout: float) -> bytes: ...


@dataclass(frozen=True, slots=True)
class RelaySettings:
    pool: Pool
    metrics: Metrics
    hosts: Mapping[str, str]
    #: proxyd's resolver (cached); used for socks5:// routes that resolve locally.
    resolve: Callable[[str], Awaitable[list[str]]] | None
    connect_timeout: float
    response_head_timeout: float
    idle_read_timeout: float
    #: ``Via`` member for responses, by upstream HTTP version (None: Via turned off).
    via_for_version: Callable[[bytes], bytes | None]
    #: (ip, port) pairs the proxy must never connect to (its admin listener).
    forbidden_peers: frozenset[tuple[str, int]] = frozenset()
    #: ports forbidden on any local address (an admin listener bound to a wildcard address).
    forbidden_local_ports: frozenset[int] = frozenset()


@dataclass(slots=True)
class ExchangeStats:
    """Filled in as the exchange goes; read by the access log and metrics afterwards."""

    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    reused: bool = False
    upstream: str = "-"
    first_byte_at: float = 0.0
    head_sent: bool = False
    #: The upstream proxy label when the route goes through one.
    proxy: str | None = None
    #: The route taken (access log), DIRECT or a proxy label.
    route: str = "DIRECT"
    #: A stale reused socket may be retried: no body, and an idempotent method (RFC 9110 §9.2.2,
    #: RFC 9112 §9.3.1: a proxy must not retry a non-idempotent request on its own).
    retryable: bool = False
    informational: list[int] = field(default_factory=list)
    #: What the cache did (access log): hit, stale, revalidated, miss, collapsed, uncacheable.
    cache: str = "-"
    #: The kind of the route that answered (metrics): direct, http, socks5, ...; none: no route.
    route_kind: str = "none"
    #: Where this exchange's NetLog events go, tagged with the client connection and request ids.
    netlog: NetLog = NETLOG_OFF
    conn_id: int = 0
    req_id: int = 0

    def emit(self, event: str, **fields: Any) -> None:
        """One NetLog event of this exchange: call it under ``if stats.netlog.active:`` only."""
        self.netlog.emit(self.conn_id, self.req_id, event, **fields)


def _is_forbidden_peer(stream: trio.abc.Stream, settings: RelaySettings) -> bool:
    if not settings.forbidden_peers and not settings.forbidden_local_ports:
        return False
    raw = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    if not isinstance(raw, trio.SocketStream):
        return False
    try:
        peer = raw.socket.getpeername()
        local = raw.socket.getsockname()
    except OSError:
        return False
    peer_ip, peer_port = str(peer[0]), int(peer[1])
    if (peer_ip, peer_port) in settings.forbidden_peers:
        return True
    if peer_port in settings.forbidden_local_ports:
        ip = ipaddress.ip_address(peer_ip.split("%", 1)[0])
        return ip.is_loopback or peer_ip == str(local[0])
    return False


TLS_SCHEMES: Final = frozenset({b"https", b"wss"})


async def open_checked(
    settings: RelaySettings, host: str, port: int, route: Route, *, tls: bool, tunnel: bool
) -> trio.abc.Stream:
    """Connect over ``route``, refusing the proxy's own admin listener (whatever name led there)."""
    metrics = settings.metrics
    started = trio.current_time()
    try:
        stream = await open_route_stream(
            route,
            host,
            port,
            tls=tls,
            tunnel=tunnel,
            hosts=settings.hosts,
            timeout=settings.connect_timeout,
            resolve=settings.resolve,
        )
    except ProxydError as exc:
        metrics.observe_connect_failure(exc.error_type)
        raise
    if isinstance(route, Direct) and _is_forbidden_peer(stream, settings):
        await trio.aclose_forcefully(stream)
        raise DestinationForbidden("the proxy's admin listener is not reachable through the proxy")
    metrics.connects_ok.inc()
    metrics.upstream_connect_duration.observe(trio.current_time() - started)
    return stream


async def connect_group(settings: RelaySettings, key: GroupKey) -> trio.abc.Stream:
    """The pool's connector: a new socket for the group (scheme, host, port, route)."""
    scheme, host, port, route = key
    return await open_checked(settings, host, port, route, tls=scheme in TLS_SCHEMES, tunnel=False)


async def forward(
    client: ClientSide,
    request: h11.Request | fastpath.FastRequest,
    target: Target,
    facts: RequestFacts,
    settings: RelaySettings,
    stats: ExchangeStats,
    route: Route = DIRECT,
    *,
    tap: ResponseTap | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Relay one exchange over ``route``; see the module docstring. ``headers`` replaces the
    prepared request fields (the cache adds its validators); ``tap`` sees the final response."""
    pool = settings.pool
    key: GroupKey = (target.scheme, target.host, target.port, route)
    stats.upstream = f"{target.host}:{target.port}"
    # Copied only when fields are added: the prepared list may be forwarded again (failover,
    # the cache's retry), and h11 builds its own list from it anyway.
    headers = facts.headers if headers is None else headers
    proxy = route.proxy if isinstance(route, ViaProxy) else None
    absolute = proxy is not None and proxy.kind in ("http", "https") and target.scheme == b"http"
    if proxy is not None:
        stats.proxy = proxy.label
        if absolute:
            credentials = proxy_authorization(proxy)
            if credentials is not None:  # for that proxy only (RFC 9110 §11.7.2)
                headers = [*headers, (b"Proxy-Authorization", credentials)]
    if facts.has_transfer_encoding:
        # Framing is per hop (RFC 9112 §6.1): the client's chunked body is re-chunked by h11 on
        # the upstream hop, which must say so (h11 never adds request framing by itself).
        headers = [*headers, (b"Transfer-Encoding", b"chunked")]
    # _parsed=True: every field came out of h11's parser (already validated) or is ours; skipping
    # h11's per-field regexes is the single largest saving on the per-request path.
    path = target.path
    if not target.has_path and request.method == b"OPTIONS":
        path = b"*"  # RFC 9112 §3.2.4: OPTIONS http://host forwards as OPTIONS *
    elif absolute:
        path = b"http://" + target.authority + path  # RFC 9112 §3.2.2: absolute form to a proxy
    # The fast path (http.fastpath): a plain GET from an HTTP/1.1 client, nothing watching.
    fast = client.fast_head is not None and tap is None and not stats.netlog.active
    method = request.method
    up_request: h11.Request | None = None
    ahead: bytes | None = None
    if fast:
        # Built before the wait for a socket: should the request queue, the pool writes it at
        # the hand-over (pool.py, "writing ahead").
        ahead = fastpath.request_head(method, path, headers)
    else:
        up_request = h11.Request(method=method, target=path, headers=headers, _parsed=True)
    trailers = facts.accepts_trailers
    label = proxy.label if proxy is not None else None
    netlog = stats.netlog
    asked = trio.current_time() if netlog.active else None
    try:
        conn = await pool.acquire(key, label, ahead=ahead)
    except ProxydError as exc:
        if netlog.active:
            wait = None if asked is None else trio.current_time() - asked
            stats.emit("socket_failed", error=exc.error_type, wait=wait, route=route.label)
        raise
    # Only now touch the request body: a proxy failure above must leave the request intact
    # for failover to the next route (nothing of it has been consumed yet).
    try:
        # A second forward of the same request (the cache's retry after a 304 that selected
        # nothing) finds the request already read: it has no body to relay.
        if fast:
            first: object = _END  # a fast-path request has no body
        else:
            cc = client.h11
            first = cc.next_event() if cc.their_state is h11.SEND_BODY else _END
    except BaseException:
        pool.release(conn, reusable=False)
        raise
    has_body = type(first) is not _EndOfMessage
    stats.reused = conn.requests > 0
    stats.retryable = stats.reused and not has_body and method in IDEMPOTENT_METHODS
    if netlog.active:
        _emit_socket(stats, conn, route, asked, retry=False)
    try:
        if has_body:
            assert up_request is not None
            await _forward_with_body(
                client, conn, up_request, first, settings, stats, trailers, tap
            )
        else:
            for attempt in (1, 2):
                try:
                    if ahead is not None:
                        await _forward_fast(
                            client, conn, method, path, headers, ahead, settings, stats, trailers
                        )
                    else:
                        assert up_request is not None
                        await _forward_without_body(
                            client, conn, up_request, settings, stats, trailers, tap
                        )
                    break
                except _StaleConnection:
                    if attempt == 2:
                        raise ResponseIncomplete(
                            f"the origin {stats.upstream} closed the connection without a response"
                        ) from None
                    pool.release(conn, reusable=False)
                    settings.metrics.upstream_retries.inc()
                    asked = trio.current_time() if netlog.active else None
                    conn = await pool.acquire(key, label, fresh=True)
                    stats.reused = stats.retryable = False
                    if netlog.active:
                        _emit_socket(stats, conn, route, asked, retry=True)
    except ClientGone:
        await _drain_then_release(conn, settings)
        raise
    except BaseException:
        pool.release(conn, reusable=False)
        raise
    pool.release(conn, reusable=True)


def _emit_socket(
    stats: ExchangeStats, conn: UpstreamConnection, route: Route, asked: float | None, retry: bool
) -> None:
    wait = None if asked is None else trio.current_time() - asked  # None: capture began since
    stats.emit(
        "socket",
        reused=conn.requests > 0,
        socket=conn.socket_id,
        wait=wait,
        route=route.label,
        retry=retry,
    )


async def _drain_then_release(conn: UpstreamConnection, settings: RelaySettings) -> None:
    """The client left mid-response: read the rest of the body (bounded by pool.drain_bytes and
    pool.drain_timeout) so the socket can serve the next request; otherwise close it."""
    pool = settings.pool
    outcome = "closed"
    try:
        outcome = await _drain(conn, pool.config.drain_bytes, pool.config.drain_timeout)
    finally:
        settings.metrics.pool_drained.labels(outcome).inc()
        pool.release(conn, reusable=outcome == "reused")


async def _drain(conn: UpstreamConnection, budget: int, timeout: float) -> str:
    uc = conn.h11
    outcome = "closed"
    if uc.our_state is h11.IDLE and uc.their_state is h11.IDLE:
        # An exchange the fast path relayed: ``fast_rest`` body bytes are still to come.
        rest, conn.fast_rest = conn.fast_rest, 0
        if conn.broken or rest > budget:
            return outcome
        with trio.move_on_after(timeout):
            try:
                while rest > 0:
                    data = await conn.stream.receive_some(RECEIVE_SIZE)
                    if not data or len(data) > rest:
                        return outcome  # cut short, or bytes past the body: out of step
                    rest -= len(data)
                outcome = "reused"
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
    elif uc.our_state is h11.DONE and uc.their_state is h11.DONE:
        outcome = "reused"  # the whole response had arrived; only the client missed the end
    elif uc.our_state is h11.DONE and uc.their_state is h11.SEND_BODY and budget > 0:
        with trio.move_on_after(timeout):
            try:
                while budget > 0:
                    event = uc.next_event()
                    if event is _NEED_DATA:
                        data = bytes(await conn.stream.receive_some(RECEIVE_SIZE))
                        uc.receive_data(data)
                        budget -= len(data) or budget
                    elif type(event) is _EndOfMessage:
                        outcome = "reused"
                        break
                    elif type(event) is not _Data:
                        break
            except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
    return outcome


async def _forward_without_body(
    client: ClientSide,
    conn: UpstreamConnection,
    up_request: h11.Request,
    settings: RelaySettings,
    stats: ExchangeStats,
    accepts_trailers: bool,
    tap: ResponseTap | None,
) -> None:
    uc = conn.h11
    head = uc.send(up_request) + uc.send(_END)
    if stats.reused:
        settings.metrics.inc_upstream_reuses(1)
    conn.requests += 1
    try:
        sent = await sockio.send_all(conn.stream, head, settings.idle_read_timeout)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        if stats.retryable:
            raise _StaleConnection from exc
        raise ResponseIncomplete(f"the origin {stats.upstream} closed the connection") from None
    if not sent:
        raise ReadTimeout(f"sending the request to {stats.upstream} stalled")
    if stats.netlog.active:
        stats.emit("sent", body=False)
    response = await _receive_response_head(client, conn, settings, stats)
    await _relay_response(client, conn, response, settings, stats, accepts_trailers, tap)


async def _forward_fast(
    client: ClientSide,
    conn: UpstreamConnection,
    method: bytes,
    path: bytes,
    headers: list[tuple[bytes, bytes]],
    head: bytes,
    settings: RelaySettings,
    stats: ExchangeStats,
    accepts_trailers: bool,
) -> None:
    """``_forward_without_body`` for a request http.fastpath parsed: ``head`` (its bytes, from
    ``fastpath.request_head``) up, response head parsed by http.fastpath, body relayed by its
    Content-Length; neither h11 connection is touched. A response outside the simple shape goes
    to h11 with the bytes read so far: h11 is told the request it did not write (its own bytes
    for it are dropped), so it stands where it would have, and the general path takes over.
    When the pool wrote the head ahead at a hand-over (``conn.sent_ahead``), only the rest is
    sent, and the answer is read at once: other tasks ran since that write."""
    uc = conn.h11
    ahead, conn.sent_ahead = conn.sent_ahead, 0
    if not ahead and not conn.between_exchanges():
        # Never for a pooled socket (a finished exchange leaves h11 IDLE and empty): h11's way.
        up_request = h11.Request(method=method, target=path, headers=headers, _parsed=True)
        await _forward_without_body(
            client, conn, up_request, settings, stats, accepts_trailers, None
        )
        return
    if stats.reused:
        settings.metrics.inc_upstream_reuses(1)
    conn.requests += 1
    if ahead < len(head):
        try:
            sent = await sockio.send_all(conn.stream, head[ahead:], settings.idle_read_timeout)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if stats.retryable:
                raise _StaleConnection from exc
            raise ResponseIncomplete(f"the origin {stats.upstream} closed the connection") from None
        if not sent:
            conn.broken = True
            raise ReadTimeout(f"sending the request to {stats.upstream} stalled")
        ahead = 0
    timeout = settings.response_head_timeout
    try:
        if ahead:
            # The whole head went at the hand-over, and other tasks ran since: read now.
            maybe_data = sockio.try_read(conn.stream)
            if maybe_data is None:
                maybe_data = await sockio.receive_within(conn.stream, timeout, wait_first=True)
        else:
            maybe_data = await sockio.receive_after_others(conn.stream, timeout)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        conn.broken = True
        if stats.retryable:
            raise _StaleConnection from exc
        raise ResponseIncomplete(
            f"the connection to {stats.upstream} broke before a complete response"
        ) from None
    if maybe_data is None:
        conn.broken = True
        raise ResponseTimeout(f"no response from {stats.upstream} within {timeout:g}s")
    data = maybe_data
    if not data:
        conn.broken = True
        if stats.retryable:
            raise _StaleConnection
        raise ResponseIncomplete(
            f"the origin {stats.upstream} closed the connection without a response"
        )
    parsed = fastpath.response_for_client(
        data, MAX_RESPONSE_HEAD, settings.via_for_version(b"1.1"), client.is_closing()
    )
    if parsed is None:
        # Off the fast path (a 1xx, chunked, close-delimited, a head in pieces...): h11 from
        # here, as if it had written the request and received these bytes.
        stats.retryable = False  # bytes of a response came: never a stale socket
        uc.send(h11.Request(method=method, target=path, headers=headers, _parsed=True))
        uc.send(_END)
        uc.receive_data(data)
        response = await _receive_response_head(client, conn, settings, stats)
        await _relay_response(client, conn, response, settings, stats, accepts_trailers, None)
        return
    status, head, remaining, start = parsed
    stats.first_byte_at = trio.current_time()
    stats.status = status
    body = data[start:] if start < len(data) else b""
    if len(body) >= remaining:
        if len(body) > remaining:
            conn.broken = True  # bytes past the body: never reuse a socket out of step
            body = body[:remaining]
        remaining = 0
    else:
        remaining -= len(body)
    stats.bytes_out += len(body)
    idle = settings.idle_read_timeout
    out: bytes | list[bytes] = [head, body] if len(body) >= WRITEV_MIN else head + body
    conn.fast_rest = remaining  # for the drain, should the client leave (_drain)
    await client.send(out, idle)
    stats.head_sent = True
    while remaining:
        try:
            data = await _receive_upstream(conn, idle)
        except trio.TooSlowError:
            conn.broken = True
            raise ResponseAborted(
                "connection_read_timeout", f"the body from {stats.upstream} stalled"
            ) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            conn.broken = True
            raise ResponseAborted(
                "http_response_incomplete", f"the connection to {stats.upstream} broke"
            ) from None
        if not data:
            conn.broken = True
            raise ResponseAborted(
                "http_response_incomplete", f"{stats.upstream} closed the connection mid-response"
            )
        if len(data) > remaining:
            conn.broken = True
            data = data[:remaining]
        remaining -= len(data)
        stats.bytes_out += len(data)
        conn.fast_rest = remaining
        await client.send(data, idle)
    client.fast_head = None  # answered: h11 never needs this request


async def _forward_with_body(
    client: ClientSide,
    conn: UpstreamConnection,
    up_request: h11.Request,
    first: object,
    settings: RelaySettings,
    stats: ExchangeStats,
    accepts_trailers: bool,
    tap: ResponseTap | None,
) -> None:
    uc = conn.h11
    head = uc.send(up_request)
    if stats.reused:
        settings.metrics.inc_upstream_reuses(1)
    conn.requests += 1
    try:
        sent = await sockio.send_all(conn.stream, head, settings.idle_read_timeout)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        raise ResponseIncomplete(f"the origin {stats.upstream} closed the connection") from None
    if not sent:
        raise ReadTimeout(f"sending the request to {stats.upstream} stalled")
    if stats.netlog.active:
        stats.emit("sent", body=True)

    client_failure: list[BaseException] = []
    failure: Exception | None = None
    async with trio.open_nursery() as nursery:

        async def pump() -> None:
            try:
                await _pump_request_body(client, conn, first, settings, stats)
            except (ClientGone, h11.ProtocolError, trio.TooSlowError) as exc:
                client_failure.append(exc)
                nursery.cancel_scope.cancel()

        nursery.start_soon(pump)
        try:
            response = await _receive_response_head(client, conn, settings, stats)
            await _relay_response(client, conn, response, settings, stats, accepts_trailers, tap)
        except Exception as exc:
            # Kept out of the nursery so it is not wrapped in an ExceptionGroup on the way out.
            failure = exc
        finally:
            # The response is complete (or failed): a body still being pumped is abandoned; the
            # upstream socket is then not reusable (h11 state) and the client connection closes.
            nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    if client_failure:
        problem = client_failure[0]
        if isinstance(problem, h11.ProtocolError):
            if stats.head_sent:
                raise ResponseAborted("http_request_error", f"malformed request body: {problem}")
            raise BadRequest(f"malformed request body: {problem}") from None
        raise ClientGone(str(problem)) from None


async def _pump_request_body(
    client: ClientSide,
    conn: UpstreamConnection,
    event: object,
    settings: RelaySettings,
    stats: ExchangeStats,
) -> None:
    """Stream the client's body to the origin. An origin that stops reading ends the pump quietly:
    its response (if any) is still relayed by the other task."""
    cc = client.h11
    uc = conn.h11
    idle = settings.idle_read_timeout
    while True:
        if event is _NEED_DATA:
            data = await client.receive(idle)
            if not data:
                raise ClientGone(
                    "the client closed the connection in the middle of the request body"
                )
            cc.receive_data(data)
            event = cc.next_event()
            continue
        if type(event) is _Data:
            assert isinstance(event, h11.Data)
            stats.bytes_in += len(event.data)
            out = uc.send(event)
        elif type(event) is _EndOfMessage:
            assert isinstance(event, h11.EndOfMessage)
            out = uc.send(event)
        else:  # ConnectionClosed cannot precede the end of a body; treat as gone
            raise ClientGone("the client closed the connection in the middle of the request body")
        try:
            sent = await sockio.send_all(conn.stream, out, idle)
        except trio.Cancelled:
            conn.broken = True  # h11 counts these bytes as sent; the wire may not have them
            raise
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            sent = False
        if not sent:
            # The origin stopped reading; its answer (or its absence) decides the rest. h11 may
            # already count the body as sent, so the socket must never go back to the pool.
            conn.broken = True
            return
        if type(event) is _EndOfMessage:
            if stats.netlog.active:
                stats.emit("body_sent", bytes=stats.bytes_in)
            return
        event = cc.next_event()


async def _receive_upstream(conn: UpstreamConnection, timeout: float) -> bytes:
    # More of a body being relayed is usually in the socket already: read first (http.sockio).
    data = await sockio.receive_within(conn.stream, timeout, wait_first=False)
    if data is None:
        raise trio.TooSlowError
    return data


async def _receive_response_head(
    client: ClientSide, conn: UpstreamConnection, settings: RelaySettings, stats: ExchangeStats
) -> h11.Response:
    uc = conn.h11
    cc = client.h11
    # Nothing buffered (the usual case: the request has just gone up): h11 could only say
    # NEED_DATA, so go straight to the wait. Bytes already there (sent early, or read by the
    # fast path before it handed over) are parsed first.
    pending, closed = uc.trailing_data
    got_any = bool(pending)
    received = len(pending)
    deadline = 0.0  # set at the first wait: the whole head (and any 1xx) within the timeout
    first: object = _NEED_DATA if not pending and not closed else None
    while True:
        try:
            if first is not None:
                event, first = first, None
            else:
                event = uc.next_event()
        except h11.RemoteProtocolError as exc:
            if not got_any and stats.retryable:
                raise _StaleConnection from exc
            if not got_any:
                raise ResponseIncomplete(
                    f"the origin {stats.upstream} closed the connection without a response"
                ) from None
            raise BadResponse(f"malformed response from {stats.upstream}: {exc}") from None
        if event is _NEED_DATA:
            if received > MAX_RESPONSE_HEAD:
                raise ResponseHeadTooLarge(f"the response head from {stats.upstream} is too large")
            try:
                # The request has just gone up: the answer cannot be here yet (http.sockio).
                if not deadline:
                    timeout = settings.response_head_timeout
                    deadline = trio.current_time() + timeout
                    maybe_data = await sockio.receive_within(conn.stream, timeout, wait_first=True)
                else:  # the rest of a head that came in pieces: what is left of the deadline
                    maybe_data = await sockio.receive_some(conn.stream, deadline, wait_first=True)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                if not got_any and stats.retryable:
                    raise _StaleConnection from exc
                raise ResponseIncomplete(
                    f"the connection to {stats.upstream} broke before a complete response"
                ) from None
            if maybe_data is None:
                raise ResponseTimeout(
                    f"no response from {stats.upstream} within {settings.response_head_timeout:g}s"
                )
            data = maybe_data
            if data:
                got_any = True
                received += len(data)
            elif stats.retryable and not got_any:
                raise _StaleConnection
            uc.receive_data(data)
            continue
        if type(event) is h11.Response:
            assert isinstance(event, h11.Response)
            stats.first_byte_at = trio.current_time()
            if stats.netlog.active:
                stats.emit("first_byte", status=event.status_code)
            return event
        if type(event) is h11.InformationalResponse:
            assert isinstance(event, h11.InformationalResponse)
            if event.status_code == 101:
                raise BadResponse(f"{stats.upstream} switched protocols without being asked")
            got_any = True
            stats.informational.append(event.status_code)
            if stats.netlog.active:
                stats.emit("informational", status=event.status_code)
            if cc.their_http_version != b"1.1":
                continue  # RFC 9110 §15.2: never send a 1xx to an HTTP/1.0 client
            headers = prepare_response(
                event.headers.raw_items(), via=settings.via_for_version(event.http_version)
            )
            data = cc.send(
                h11.InformationalResponse(
                    status_code=event.status_code,
                    headers=headers,
                    reason=event.reason,
                    _parsed=True,
                )
            )
            await client.send(data, settings.idle_read_timeout)
            continue
        raise ResponseIncomplete(f"the origin {stats.upstream} closed the connection early")


async def _relay_response(
    client: ClientSide,
    conn: UpstreamConnection,
    response: h11.Response,
    settings: RelaySettings,
    stats: ExchangeStats,
    accepts_trailers: bool,
    tap: ResponseTap | None = None,
) -> None:
    cc = client.h11
    uc = conn.h11
    headers = prepare_response(
        response.headers.raw_items(), via=settings.via_for_version(response.http_version)
    )
    if response.status_code == 407 and stats.proxy is not None:
        # RFC 9110 §15.5.8: a 407 is meant for us, from the proxy we chose, not for the client.
        raise UpstreamProxyAuthFailed(
            f"upstream proxy {stats.proxy} wants authentication (407)", next_hop=stats.proxy
        )
    sink: BodySink | None = None
    if tap is not None:
        plan = await tap.on_response(response, headers)
        if plan is CONSUME:
            # The cache answers instead (a 304 to its revalidation, a 5xx it covers with a stale
            # response): read the rest so the socket may be reused, within the drain bounds.
            await _drain(conn, settings.pool.config.drain_bytes, settings.idle_read_timeout)
            return
        sink = cast("BodySink | None", plan)
    stats.status = response.status_code
    if client.is_closing():
        headers.append((b"Connection", b"close"))  # h11 then ends the connection after it
    out: list[bytes] = [
        cc.send(
            h11.Response(
                status_code=response.status_code,
                headers=headers,
                reason=response.reason,
                _parsed=True,
            )
        )
    ]
    idle = settings.idle_read_timeout
    client_gone: ClientGone | None = None
    large = False  # ``out`` holds a big body piece: written with writev rather than joined
    while True:
        try:
            event = uc.next_event()
        except h11.RemoteProtocolError as exc:
            if not stats.head_sent:
                raise BadResponse(f"malformed response from {stats.upstream}: {exc}") from None
            raise ResponseAborted(
                "http_response_incomplete", f"the response from {stats.upstream} broke off: {exc}"
            ) from None
        if event is _NEED_DATA:
            if out:
                if client_gone is None:
                    try:
                        await client.send(_for_client(out, large), idle)
                        stats.head_sent = True
                    except ClientGone as exc:
                        # Followers of a collapsed fetch still want this body: keep reading.
                        if sink is None or not sink.wants_body_without_client():
                            raise
                        client_gone = exc
                out.clear()
                large = False
            try:
                data = await _receive_upstream(conn, idle)
            except trio.TooSlowError:
                raise ResponseAborted(
                    "connection_read_timeout", f"the body from {stats.upstream} stalled"
                ) from None
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise ResponseAborted(
                    "http_response_incomplete", f"the connection to {stats.upstream} broke"
                ) from None
            uc.receive_data(data)
            continue
        kind = type(event)
        if kind is _Data:
            assert isinstance(event, h11.Data)
            size = len(event.data)
            stats.bytes_out += size
            if sink is not None:
                await sink.write(event.data)
            out.append(cc.send(event))
            large = large or size >= WRITEV_MIN
        elif kind is _EndOfMessage:
            assert isinstance(event, h11.EndOfMessage)
            trailers = event.headers
            if trailers and accepts_trailers and _client_chunked(cc, headers):
                out.append(cc.send(h11.EndOfMessage(headers=list(trailers.raw_items()))))
            else:
                out.append(cc.send(_END))
            if client_gone is None:
                try:
                    await client.send(_for_client(out, large), idle)
                    stats.head_sent = True
                except ClientGone as exc:
                    client_gone = exc  # the body is complete: still finish the sink
            if sink is not None:
                await sink.end()
            if client_gone is not None:
                raise client_gone
            return
        else:
            raise ResponseAborted(
                "http_response_incomplete", f"{stats.upstream} closed the connection mid-response"
            )


def _for_client(out: list[bytes], large: bool) -> bytes | list[bytes]:
    """One write's worth: a single piece as it is, small pieces joined (a copy is cheaper than a
    writev), pieces with a big body part as a list (``ClientSide.send`` writes it with writev)."""
    if len(out) == 1:
        return out[0]
    return out if large else b"".join(out)


def _client_chunked(cc: h11.Connection, headers: list[tuple[bytes, bytes]]) -> bool:
    """Trailers reach the client only over chunked framing, which h11 picks for an HTTP/1.1
    client when the response carries no Content-Length (RFC 9112 §7.1.2)."""
    return cc.their_http_version == b"1.1" and not any(
        name.lower() == b"content-length" for name, _ in headers
    )

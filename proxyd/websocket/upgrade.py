"""The trio shell of the opening handshake, and the peek into CONNECT tunnels.

How it works (``run_upgrade``; the caller has validated the client's upgrade with
``handshake.check_client_upgrade`` and opened the upstream stream — routing, failover and the
per-host tunnel limit are the caller's, see ``client.py``):

1. The client's request is consumed up to its end; whatever the client sent after it in the same
   read (an eager first frame) stays in h11's buffer and becomes the session's first input.
2. The origin hop's upgrade (``handshake.upstream_request_headers``) goes out through an h11
   client connection, and the answer is awaited within ``websocket.handshake_timeout``
   (``ResponseTimeout``, 504). Interim 1xx answers other than 101 are skipped. Writes and reads
   go through ``http.sockio``: a write the kernel takes at once does not yield, and the wait
   for the answer is timed without a cancel scope.
3. A final non-101 answer (403 with a body, 426, a redirect) is relayed to the client as that
   response, body streamed, and the connection ends after it (``origin_rejected``). Each read of
   the body is bounded by ``io_timeout`` and the whole relay by ``handshake_timeout +
   io_timeout``, so an origin that trickles its body cannot hold the connection forever.
4. A 101 is checked (``handshake.check_origin_accept``, ``BadResponse`` 502 when invalid); the
   bytes that came after it in the same read are kept for the session; the client gets its own 101
   and the ``relay.Session`` runs. The session is listed in ``sessions`` while it runs so the
   server's drain can reach it.

A client that goes away before its 101 (or during a relayed rejection) surfaces as
``ClientGone``; the caller counts it (``client_gone``) and writes the access-log line.

``sniff_tunnel`` decides what a CONNECT tunnel carries: it waits for the first bytes of either
side. The origin talking first (a banner) or a first byte that cannot begin ``GET`` (TLS begins
with 0x16) means a byte tunnel at once; otherwise client bytes are collected until the request
head is complete (bounded in time and size) and parsed: a ``GET`` with ``Upgrade: websocket``
becomes a session, anything else is handed back to be tunnelled as bytes, nothing lost. Every
tunnelled session opens through this wait, so on plain sockets it is one wait in the tunnel's
own task, on an epoll descriptor that holds both sockets (``_peek_sockets``; the origin's side
is read first, so a banner wins); other streams take a reader task per side.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import h11._abnf as _abnf  # h11's grammar (http.fastpath reads its expressions the same way)
import trio

from proxyd._h11 import h11
from proxyd.errors import (
    BadRequest,
    BadResponse,
    ProxydError,
    ProxyShuttingDown,
    ResponseIncomplete,
    ResponseTimeout,
)
from proxyd.http import sockio
from proxyd.http.relay import ClientGone, ExchangeStats
from proxyd.http.rules import prepare_request, prepare_response
from proxyd.websocket.handshake import (
    ClientUpgrade,
    check_origin_accept,
    client_accept_head,
    is_websocket_upgrade,
    negotiate_client_deflate,
    new_key,
    upstream_request_headers,
)
from proxyd.websocket.relay import Session, SessionSettings

if TYPE_CHECKING:
    from collections.abc import Callable

    from proxyd.config import WebSocketConfig
    from proxyd.observe.metrics import Metrics

log = logging.getLogger(__name__)

Header = tuple[bytes, bytes]

RECEIVE_SIZE: Final = 65536
_METHOD_PREFIX: Final = b"GET "
_NETWORK_ERRORS: Final = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
_SocketStream = trio.SocketStream
#: Linux's epoll (``_peek_sockets``); elsewhere the peek takes a reader task per side.
_EPOLL: Final = getattr(select, "epoll", None)

#: Metric labels of handshake failures, by RFC 9209 error type (a bounded set).
_FAILURE_REASONS: Final = {
    "http_request_error": "bad_request",
    "http_request_denied": "bad_request",
    "proxy_loop_detected": "bad_request",
    "dns_error": "connect_failed",
    "dns_timeout": "connect_failed",
    "connection_refused": "connect_failed",
    "connection_timeout": "connect_failed",
    "destination_unavailable": "connect_failed",
    "tls_protocol_error": "connect_failed",
    "connection_limit_reached": "limit",
    "http_response_timeout": "origin_timeout",
    "http_protocol_error": "bad_response",
    "http_response_incomplete": "bad_response",
    "http_response_header_section_size": "bad_response",
}


def failure_reason(error: ProxydError) -> str:
    """The ``proxyd_websocket_handshake_failures_total`` label for an error."""
    return _FAILURE_REASONS.get(error.error_type, "other")


@dataclass(slots=True)
class UpgradeContext:
    """What ``run_upgrade`` needs of the daemon (built once per server by client.py)."""

    config: WebSocketConfig
    metrics: Metrics
    pseudonym: bytes
    via_for_version: Callable[[bytes], bytes | None]
    #: Bounds each write to the client and each read of a rejection body.
    io_timeout: float
    #: Sessions running now (the server's drain sends them 1001).
    sessions: set[Session]
    is_draining: Callable[[], bool]


async def run_upgrade(
    context: UpgradeContext,
    client: trio.abc.Stream,
    cc: h11.Connection,
    request: h11.Request,
    upgrade: ClientUpgrade,
    upstream: trio.abc.Stream,
    *,
    authority: bytes,
    path: bytes,
    stats: ExchangeStats,
    name: str = "ws",
) -> None:
    """Run the upgrade on both hops, then the session (see the module docstring).

    Raises ``ProxydError`` while nothing has been sent to the client (``stats.head_sent`` is
    False); the caller answers with an error response. Does not close ``upstream``.
    """
    if context.is_draining():
        raise ProxyShuttingDown("the proxy is shutting down")
    config = context.config
    metrics = context.metrics
    client_pending = _rest_of_request(cc)
    via = context.via_for_version(request.http_version)
    facts = prepare_request(
        request.headers.raw_items(),
        authority=authority,
        via=via,
        pseudonym=context.pseudonym,
        is_max_forwards_method=False,
    )
    key = new_key(os.urandom(16))
    headers = upstream_request_headers(
        facts.headers, key, offer_deflate=bool(upgrade.deflate_offers)
    )
    head = request_head(path, headers)
    oc: h11.Connection | None = None
    if head is None:  # a field h11 may refuse: let it say why
        oc = _sent_by_h11(path, headers)
        try:
            head = oc.send(h11.Request(method=b"GET", target=path, headers=headers))
            head += oc.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            raise BadRequest(f"cannot forward this upgrade request: {exc}") from None
    started = trio.current_time()
    answer = await _exchange_head(
        oc, upstream, path, headers, head, config.handshake_timeout, started
    )
    if answer is None:
        raise ResponseTimeout(
            f"the origin did not answer the WebSocket upgrade within {config.handshake_timeout:g}s"
        )
    stats.first_byte_at = trio.current_time()
    stats.informational = []
    rejection = answer.rejection
    if rejection is not None:
        assert answer.conn is not None
        deadline = trio.current_time() + config.handshake_timeout + context.io_timeout
        complete = await _relay_rejection(
            context, client, cc, answer.conn, upstream, rejection, via, stats, deadline
        )
        metrics.ws_handshake_failures.labels("origin_rejected").inc()
        log.info(
            "%s: the origin answered the upgrade with %d%s",
            name,
            rejection.status_code,
            "" if complete else " (its body was cut short)",
        )
        return
    accepted = check_origin_accept(
        answer.headers,
        key,
        upgrade.protocols,
        offered_deflate=bool(upgrade.deflate_offers),
        max_message_size=config.max_message_size,
        via=via,
    )
    origin_pending = answer.pending
    client_hop = negotiate_client_deflate(upgrade.deflate_offers, config.max_message_size)
    client_deflate, client_extensions = client_hop if client_hop is not None else (None, None)
    response = client_accept_head(
        upgrade.key, accepted.subprotocol, client_extensions, accepted.headers
    )
    stats.status = 101
    await _send(client, response, context.io_timeout)
    stats.head_sent = True
    log.debug(
        "%s: session open after %.1f ms (deflate client=%s origin=%s)",
        name,
        (trio.current_time() - started) * 1000,
        client_deflate is not None,
        accepted.deflate is not None,
    )
    session = Session(
        client,
        upstream,
        SessionSettings.from_config(config),
        client_deflate=client_deflate,
        origin_deflate=accepted.deflate,
        client_pending=client_pending,
        origin_pending=origin_pending,
        metrics=metrics,
        name=name,
        target=(authority + path).decode("ascii", "replace"),
    )
    # The handshake's objects are not needed while the session runs (memory per idle session;
    # the client's request too: the caller hands it over without keeping a reference).
    del oc, head, headers, facts, answer, accepted, response, client_hop, request, upgrade
    del rejection
    context.sessions.add(session)
    if context.is_draining():
        session.drain()
    try:
        result = await session.run()
    finally:
        context.sessions.discard(session)
    stats.bytes_in = result.bytes_up
    stats.bytes_out = result.bytes_down


# --- the origin hop's head without h11's state machine --------------------------------------
#
# h11 costs ~19 µs to write the upgrade and read a 101 (half of the handshake's own work on
# the path every session opens through); both are simple. ``request_head`` writes the bytes
# h11 would write, and ``parse_switch`` reads what h11 would read, each only for a head inside
# a strict subset of h11's grammar (h11's own expressions, ``h11._abnf``); for anything else
# they return None and h11 does it as before, from the same bytes, with its usual errors. The
# two can never disagree on where a head ends: the subset has no bare CR or LF and no obs-fold.

#: A request head as h11 writes it: the request line, ``name: value`` lines, the blank line.
_REQUEST_HEAD: Final = re.compile(
    (
        _abnf.request_line
        + r"(?:\r\n"
        + _abnf.field_name
        + ": "
        + _abnf.field_value.replace("(", "(?:", 1)
        + r")*\r\n\r\n"
    ).encode("ascii")
).fullmatch
#: A 101 head (without its blank line) as h11 reads it, field lines without obs-fold: a line is
#: ``token ":"`` and bytes other than NUL, CR, LF, VT and FF, which always split into
#: ``OWS field-value OWS`` (h11's reason phrase is that class too).
_SWITCH_HEAD: Final = re.compile(
    (
        r"HTTP/1\.1 101(?: [^\x00\r\n\x0b\x0c]*)?(?:\r\n"
        + _abnf.field_name
        + r":[^\x00\r\n\x0b\x0c]*)*"
    ).encode("ascii")
).fullmatch
#: Fields h11 checks beyond the grammar (framing): their heads go to h11.
_FRAMING: Final = frozenset({b"content-length", b"transfer-encoding"})


def request_head(path: bytes, headers: Sequence[Header]) -> bytes | None:
    """``GET path`` with ``headers`` as h11 writes it (Host first, RFC 9110 §7.2), or None when
    h11 might refuse it or frame it otherwise (then h11 writes it, or says why not)."""
    hosts = [(name, value) for name, value in headers if name.lower() == b"host"]
    if len(hosts) != 1:
        return None
    lines = [b"GET " + path + b" HTTP/1.1"]
    lines.extend(name + b": " + value for name, value in hosts)
    for name, value in headers:
        lower = name.lower()
        if lower in _FRAMING:
            return None
        if lower != b"host":
            lines.append(name + b": " + value)
    head = b"\r\n".join(lines) + b"\r\n\r\n"
    # One line per field: a CR LF inside a name or value would make the joined bytes a valid
    # head with a field nobody asked for (each part is checked by counting the line breaks).
    if head.count(b"\r\n") != len(lines) + 1 or not _REQUEST_HEAD(head):
        return None
    return head


def parse_switch(data: bytes) -> tuple[list[Header], bytes] | None:
    """A 101 complete in ``data``: its fields as h11 gives them (``raw_items``) and the bytes
    after it; None for anything else (a 1xx before it, a final answer, a head cut short or
    outside the subset h11's grammar shares with this one)."""
    end = data.find(b"\r\n\r\n")
    if end < 0 or not _SWITCH_HEAD(data, 0, end):
        return None
    headers: list[Header] = []
    for line in data[:end].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.lower() in _FRAMING:
            return None
        headers.append((name, value.strip(b" \t")))
    return headers, data[end + 4 :]


def _sent_by_h11(path: bytes, headers: list[Header]) -> h11.Connection:
    """An h11 client connection that has sent the upgrade (its bytes are not used: they are
    the ones ``request_head`` wrote, or h11's own), ready to read the answer."""
    oc = h11.Connection(h11.CLIENT)
    oc.send(h11.Request(method=b"GET", target=path, headers=headers))
    oc.send(h11.EndOfMessage())
    return oc


def _rest_of_request(cc: h11.Connection) -> bytes:
    """Consume the (bodiless) upgrade request to its end; return what the client sent after
    it (RFC 6455 §4.1: a client may not send frames before the 101, but bytes are never lost)."""
    try:
        while cc.their_state is h11.SEND_BODY:
            event = cc.next_event()
            if event is h11.NEED_DATA:
                break
    except h11.RemoteProtocolError:
        pass
    return bytes(cc.trailing_data[0])


async def _send(stream: trio.abc.Stream, data: bytes, timeout: float) -> None:
    # http.sockio: a write the kernel takes at once (a 101, a rejection's head) returns without
    # a pass of the scheduler; only a write that must wait reads the clock and gets a deadline.
    try:
        done = await sockio.send_all(stream, data, timeout)
    except _NETWORK_ERRORS as exc:
        raise ClientGone("the client went away during the WebSocket handshake") from exc
    if not done:
        raise ClientGone(f"the client did not read for {timeout:g}s")


@dataclass(slots=True)
class _Answer:
    """The origin's answer to the upgrade: a 101 (its fields, and the bytes that came after it:
    the session's first input) or a final response (``rejection``; its body is read through
    ``conn``)."""

    headers: list[Header]
    pending: bytes = b""
    rejection: h11.Response | None = None
    conn: h11.Connection | None = None


async def _exchange_head(
    oc: h11.Connection | None,
    upstream: trio.abc.Stream,
    path: bytes,
    headers: list[Header],
    head: bytes,
    timeout: float,
    started: float,
) -> _Answer | None:
    """Send the upgrade (``head``: written by h11 through ``oc``, or by ``request_head``, then
    ``oc`` is None), return the origin's answer; None when it did not come within ``timeout``
    of ``started``. The write goes out without yielding when the kernel takes it, and each read
    waits first: the answer cannot be there yet (http.sockio; the first wait, right after the
    write, is timed without a cancel scope). A 101 whose head came whole in the first read is
    parsed by ``parse_switch``; anything else by h11, from the same bytes."""
    deadline = started + timeout
    first = True
    try:
        if not await sockio.send_all(upstream, head, timeout):
            return None
        while True:
            if oc is None:
                event: object = h11.NEED_DATA
            else:
                event = oc.next_event()
            if event is h11.NEED_DATA:
                if first:
                    first = False
                    data = await sockio.receive_within(upstream, timeout, wait_first=True)
                else:
                    data = await sockio.receive_some(upstream, deadline, wait_first=True)
                if data is None:
                    return None
                if not data:
                    raise ResponseIncomplete("the origin closed the connection during the upgrade")
                if oc is None:
                    switch = parse_switch(data)
                    if switch is not None:
                        return _Answer(headers=switch[0], pending=switch[1])
                    oc = _sent_by_h11(path, headers)  # h11 reads it (and what follows)
                oc.receive_data(bytes(data))
                continue
            if type(event) is h11.InformationalResponse:
                assert isinstance(event, h11.InformationalResponse)
                if event.status_code == 101:
                    return _Answer(
                        headers=list(event.headers.raw_items()),
                        pending=bytes(oc.trailing_data[0]),  # type: ignore[union-attr]
                    )
                continue  # 100, 103: nothing for a WebSocket client
            if type(event) is h11.Response:
                assert isinstance(event, h11.Response)
                return _Answer(headers=[], rejection=event, conn=oc)
            raise BadResponse(f"unexpected event from the origin: {type(event).__name__}")
    except h11.RemoteProtocolError as exc:
        raise BadResponse(f"the origin's answer to the upgrade is not HTTP/1.1: {exc}") from None
    except _NETWORK_ERRORS as exc:
        raise ResponseIncomplete(
            f"the origin connection failed during the upgrade: {exc}"
        ) from None


async def _relay_rejection(
    context: UpgradeContext,
    client: trio.abc.Stream,
    cc: h11.Connection,
    oc: h11.Connection,
    upstream: trio.abc.Stream,
    response: h11.Response,
    via: bytes | None,
    stats: ExchangeStats,
    deadline: float,
) -> bool:
    """The origin said no: relay its answer with the body, streamed (each read bounded by
    ``io_timeout``, the whole relay by ``deadline``). The connection ends after it, so a body
    the origin cuts short, or that is cut at a timeout, stays short (never complete-looking)
    for the client. Returns whether the whole answer was relayed (False: a timeout cut it)."""
    headers = prepare_response(response.headers.raw_items(), via=via)
    headers.append((b"Connection", b"close"))
    try:
        data = cc.send(
            h11.Response(status_code=response.status_code, headers=headers, reason=response.reason)
        )
    except h11.LocalProtocolError as exc:
        raise BadResponse(f"cannot relay the origin's answer: {exc}") from None
    stats.status = response.status_code
    timeout = context.io_timeout
    complete = True
    # One overall bound: each read is bounded by io_timeout, but an origin trickling a byte at
    # a time would otherwise stretch the answer without end. The head goes out on the first
    # pass (no await before it), within its own io_timeout: the deadline is later than that.
    with trio.move_on_at(deadline) as overall:
        while True:
            try:
                event = oc.next_event()
            except h11.RemoteProtocolError:
                break
            if event is h11.NEED_DATA:
                if data:
                    await _send(client, data, timeout)
                    stats.head_sent = True
                    data = b""
                chunk: bytes | bytearray | None = None
                with trio.move_on_after(timeout), contextlib.suppress(*_NETWORK_ERRORS):
                    chunk = await upstream.receive_some(RECEIVE_SIZE)
                if chunk is None:
                    complete = False
                    break
                oc.receive_data(bytes(chunk))
            elif type(event) is h11.Data:
                assert isinstance(event, h11.Data)
                stats.bytes_out += len(event.data)
                data += cc.send(h11.Data(data=event.data))
            elif type(event) is h11.EndOfMessage:
                data += cc.send(h11.EndOfMessage())
                break
            else:
                break
    if overall.cancelled_caught:
        complete = False
        data = b""  # an unsent piece may be half written: nothing more after it
    if data:
        await _send(client, data, timeout)
    stats.head_sent = True
    return complete


# --- CONNECT tunnels ---------------------------------------------------------------------------


@dataclass(slots=True)
class Sniffed:
    """What ``sniff_tunnel`` saw. ``request`` set: a WebSocket upgrade parsed into ``conn``;
    otherwise pass ``client_bytes`` upstream and ``origin_bytes`` to the client, then tunnel."""

    client_bytes: bytes = b""
    origin_bytes: bytes = b""
    conn: h11.Connection | None = None
    request: h11.Request | None = None
    #: Nothing came from either side within the tunnel's idle timeout: end the tunnel.
    idle: bool = False


def _could_be_get(data: bytes | bytearray) -> bool:
    return data[: len(_METHOD_PREFIX)] == _METHOD_PREFIX[: len(data)]


def _head_decided(buffer: bytearray, max_head: int) -> bool:
    """Enough client bytes to classify: not a ``GET``, a complete head, or too much."""
    if not _could_be_get(buffer[:4]):
        return True
    return b"\r\n\r\n" in buffer or len(buffer) > max_head


async def sniff_tunnel(
    client: trio.abc.Stream,
    upstream: trio.abc.Stream,
    initial: bytes,
    *,
    timeout: float,
    idle_timeout: float = 0.0,
    max_head: int,
) -> Sniffed:
    """Look at the first bytes of a fresh CONNECT tunnel (see the module docstring). The wait
    is bounded by ``timeout``, and by the tunnel's ``idle_timeout`` when it has one."""
    result = Sniffed(client_bytes=initial)
    buffer = bytearray(initial)
    if _head_decided(buffer, max_head):
        return _classify(result, initial, max_head)
    idle_bound = 0 < idle_timeout <= timeout
    deadline = trio.current_time() + (idle_timeout if idle_bound else timeout)
    if _EPOLL is not None and type(client) is _SocketStream and type(upstream) is _SocketStream:
        timed_out = await _peek_sockets(client, upstream, buffer, result, deadline, max_head)
    else:
        timed_out = await _peek_streams(client, upstream, buffer, result, deadline, max_head)
    result.client_bytes = bytes(buffer)
    if timed_out and idle_bound and not buffer:
        result.idle = True
    if result.origin_bytes:
        return result
    return _classify(result, result.client_bytes, max_head)


def _read_now(fd: int) -> bytes | None:
    """What the socket has now: None when nothing (yet); ``b""`` at EOF, and for a reset or a
    closed socket too (that side has nothing more to say, as for a trio stream error)."""
    try:
        return sockio.read_now(fd)
    except BlockingIOError:
        return None
    except OSError:
        return b""


async def _peek_sockets(
    client: trio.SocketStream,
    upstream: trio.SocketStream,
    buffer: bytearray,
    result: Sniffed,
    deadline: float,
    max_head: int,
) -> bool:
    """The peek on two plain TCP sockets, in this task: one wait for whichever side speaks
    first. An epoll instance holding both sockets is itself readable when either is (Linux
    epoll(7): an epoll descriptor can be polled), so the wait is trio's ``wait_readable`` on
    it: no nursery, no helper tasks, no cancelling the loser (each of those costs a pass of
    the scheduler on the path every tunnelled session opens through). Reads are non-blocking
    and the origin's side is read first: bytes from it (a banner) mean a byte tunnel whatever
    the client sent meanwhile. Returns True when ``deadline`` passed first."""
    client_fd = client.socket.fileno()
    origin_fd = upstream.socket.fileno()
    if client_fd < 0 or origin_fd < 0:
        return False  # closed: nothing to peek at (the tunnel ends at once)
    poller: select.epoll | None = None
    try:
        with trio.move_on_at(deadline):
            while True:
                data = _read_now(origin_fd)
                if data is not None:
                    result.origin_bytes = data
                    return False
                data = _read_now(client_fd)
                if data is not None:
                    if not data:
                        return False
                    buffer.extend(data)
                    if _head_decided(buffer, max_head):
                        return False
                    continue
                if poller is None:
                    assert _EPOLL is not None
                    poller = _EPOLL()
                    poller.register(client_fd, select.EPOLLIN)
                    poller.register(origin_fd, select.EPOLLIN)
                # Our epoll descriptor is ours alone and is closed below when no wait is on it:
                # the kernel then drops it from trio's epoll set (epoll(7)), as for a socket.
                await trio.lowlevel.wait_readable(poller.fileno())
        return True
    finally:
        if poller is not None:
            poller.close()


async def _peek_streams(
    client: trio.abc.Stream,
    upstream: trio.abc.Stream,
    buffer: bytearray,
    result: Sniffed,
    deadline: float,
    max_head: int,
) -> bool:
    """The peek on any streams (TLS to an upstream proxy, a stream with bytes already read, no
    epoll): a reader task per side, the first to finish cancels the other. Returns True when
    ``deadline`` passed first."""
    with trio.move_on_at(deadline) as waited:
        async with trio.open_nursery() as nursery:

            async def read_client() -> None:
                while True:
                    try:
                        data = await client.receive_some(RECEIVE_SIZE)
                    except _NETWORK_ERRORS:
                        data = b""
                    if not data:
                        break
                    buffer.extend(data)
                    if _head_decided(buffer, max_head):
                        break
                nursery.cancel_scope.cancel()

            async def read_origin() -> None:
                # Protocols where the server talks first never send an HTTP request.
                try:
                    data = await upstream.receive_some(RECEIVE_SIZE)
                except _NETWORK_ERRORS:
                    data = b""
                result.origin_bytes = bytes(data)
                nursery.cancel_scope.cancel()

            nursery.start_soon(read_client)
            nursery.start_soon(read_origin)
    return waited.cancelled_caught


def _classify(result: Sniffed, data: bytes, max_head: int) -> Sniffed:
    result.client_bytes = data
    if not data.startswith(_METHOD_PREFIX) or b"\r\n\r\n" not in data:
        return result
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head)
    conn.receive_data(data)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return result
    if type(event) is not h11.Request:
        return result
    assert isinstance(event, h11.Request)
    if not is_websocket_upgrade(event.headers.raw_items()):
        return result
    result.conn = conn
    result.request = event
    return result


__all__ = [
    "Sniffed",
    "UpgradeContext",
    "failure_reason",
    "run_upgrade",
    "sniff_tunnel",
]

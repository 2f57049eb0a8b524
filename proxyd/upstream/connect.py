"""Opening a socket to an origin: ``dns.hosts`` overrides, Happy Eyeballs, TLS, error translation.

``open_origin_stream`` is the one place where connect-time failures become ``ProxydError``s:
getaddrinfo errors are ``dns_error``, a refused connection is ``connection_refused``, the connect
deadline is ``connection_timeout``, anything else ``destination_unavailable`` (RFC 9209 §2.3).
trio's ``open_tcp_stream`` already does RFC 8305 Happy Eyeballs across every address of a name
and sets TCP_NODELAY; the resolver cache and the concurrency cap arrive with the routing issue.
An IP literal has one address and nothing to race: it is connected directly (``_connect_ip``),
without the racing machinery (a nursery, a task per attempt, an event), which costs several
passes of the scheduler: more than the connect itself on a LAN or loopback.
"""

from __future__ import annotations

import base64
import errno
import ipaddress
import os
import select
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping

import h11
import trio
from socksio import ProtocolError as SocksProtocolError
from socksio import SOCKSError, socks4, socks5

from proxyd.errors import (
    ConnectionRefused,
    ConnectionTimeout,
    DestinationUnavailable,
    DnsError,
    DnsTimeout,
    ProxydError,
    TlsError,
    UpstreamProxyAuthFailed,
    UpstreamProxyRefused,
)
from proxyd.upstream.route import Direct, ProxyServer, Route

HAPPY_EYEBALLS_DELAY = 0.25  # RFC 8305 §5: "Connection Attempt Delay", recommended 250 ms

_tls_context: ssl.SSLContext | None = None


def _default_tls_context() -> ssl.SSLContext:
    global _tls_context
    if _tls_context is None:
        _tls_context = ssl.create_default_context()
    return _tls_context


def _refused(exc: BaseException) -> bool:
    seen: list[BaseException] = [exc]
    while seen:
        current = seen.pop()
        if isinstance(current, ConnectionRefusedError) or (
            isinstance(current, OSError) and current.errno == errno.ECONNREFUSED
        ):
            return True
        if isinstance(current, BaseExceptionGroup):
            seen.extend(current.exceptions)
        if current.__cause__ is not None:
            seen.append(current.__cause__)
    return False


def _ip_family(address: str) -> int | None:
    """``AF_INET`` / ``AF_INET6`` for an IP literal, None for anything else (names, and literal
    forms ``inet_pton`` does not take, such as a scoped IPv6 address: trio resolves those)."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, address)
        except (OSError, ValueError):
            continue
        return family
    return None


async def _connect_ip(family: int, address: str, port: int, timeout: float) -> trio.SocketStream:
    """What ``open_tcp_stream`` does for a single address (TCP_NODELAY comes with
    ``SocketStream``), minus the Happy Eyeballs race there is no second address for. A
    non-blocking connect answers EINPROGRESS, but on loopback the handshake is already done
    by then: a zero-timeout poll sees that and skips the wait (a pass of the scheduler). Only
    a wait gets a timer (``trio.TooSlowError`` after ``timeout``)."""
    await trio.lowlevel.checkpoint_if_cancelled()  # a cancellation point, like trio's connect
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        error = sock.connect_ex((address, port))
        if error == errno.EINPROGRESS:
            poller = select.poll()
            poller.register(sock, select.POLLOUT)
            if not poller.poll(0):
                with trio.fail_after(timeout):
                    await trio.lowlevel.wait_writable(sock)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise OSError(error, f"Error connecting to {address}:{port}: {os.strerror(error)}")
        return trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    except BaseException:
        sock.close()
        raise


async def open_origin_stream(
    host: str,
    port: int,
    *,
    hosts: Mapping[str, str],
    timeout: float,
    tls: bool = False,
) -> trio.abc.Stream:
    """Connect to ``host:port`` within ``timeout`` seconds (TLS included when ``tls``)."""
    address = hosts.get(host, host)
    shown = f"{host}:{port}"
    family = _ip_family(address)
    try:
        if family is not None and not tls:
            return await _connect_ip(family, address, port, timeout)  # its only wait is timed
        with trio.fail_after(timeout):
            stream: trio.abc.Stream
            if family is not None:
                stream = await _connect_ip(family, address, port, timeout)
            else:
                stream = await trio.open_tcp_stream(
                    address, port, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY
                )
            if tls:
                tls_stream = trio.SSLStream(
                    stream, _default_tls_context(), server_hostname=host, https_compatible=True
                )
                try:
                    await tls_stream.do_handshake()
                except (trio.BrokenResourceError, ssl.SSLError) as exc:
                    await trio.aclose_forcefully(stream)
                    raise TlsError(f"TLS handshake with {shown} failed: {exc}") from exc
                stream = tls_stream
            return stream
    except UnicodeError:
        # getaddrinfo's IDNA step rejects names such as "a..b" before any lookup.
        raise DnsError(f"cannot resolve {host}: not a valid host name") from None
    except trio.TooSlowError:
        raise ConnectionTimeout(f"connecting to {shown} took longer than {timeout:g}s") from None
    except OSError as exc:
        if isinstance(exc.__cause__, (DnsError, DnsTimeout)):
            raise exc.__cause__ from None  # proxyd's resolver said it (dns_timeout stays 504)
        if isinstance(exc, socket.gaierror):
            raise DnsError(f"cannot resolve {host}: {exc.strerror}") from None
        if _refused(exc):
            raise ConnectionRefused(f"{shown} refused the connection") from None
        raise DestinationUnavailable(f"cannot connect to {shown}: {exc}") from None


# --- through upstream proxies -----------------------------------------------------------------

_CONNECT_HEAD_LIMIT = 65536


def _basic(proxy: ProxyServer) -> bytes | None:
    if proxy.username is None:
        return None
    token = f"{proxy.username}:{proxy.password or ''}".encode()
    return b"Basic " + base64.b64encode(token)


def proxy_authorization(proxy: ProxyServer) -> bytes | None:
    """``Proxy-Authorization`` for requests sent in absolute form to an HTTP proxy."""
    return _basic(proxy)


async def _open_proxy_socket(
    proxy: ProxyServer, *, hosts: Mapping[str, str], timeout: float
) -> trio.abc.Stream:
    """TCP (and TLS for an HTTPS proxy) to the proxy itself; failures are proxy failures."""
    try:
        return await open_origin_stream(
            proxy.host, proxy.port, hosts=hosts, timeout=timeout, tls=proxy.kind == "https"
        )
    except ProxydError as exc:
        raise exc.at_proxy(proxy.label) from None


class PrefixedStream(trio.abc.Stream):
    """A stream that first returns bytes already read from ``inner`` (e.g. what an upstream
    proxy sent right after its CONNECT answer, in the same read: an SSH or SMTP banner)."""

    def __init__(self, inner: trio.abc.Stream, prefix: bytes) -> None:
        self.inner = inner
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix, b""
            await trio.lowlevel.checkpoint()
            return data
        return bytes(await self.inner.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if isinstance(self.inner, trio.abc.HalfCloseableStream):
            await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def _http_connect(
    stream: trio.abc.Stream, proxy: ProxyServer, host: str, port: int, timeout: float
) -> bytes:
    """RFC 9110 §9.3.6 CONNECT through an HTTP proxy; returns once the tunnel is open."""
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    head = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    credentials = _basic(proxy)
    if credentials is not None:
        head.append("Proxy-Authorization: " + credentials.decode())
    request = ("\r\n".join(head) + "\r\n\r\n").encode()
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=_CONNECT_HEAD_LIMIT)
    try:
        with trio.fail_after(timeout):
            await stream.send_all(request)
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        raise ConnectionRefused("closed the connection during CONNECT")
                    conn.receive_data(bytes(data))
                    continue
                if isinstance(event, h11.InformationalResponse):
                    continue
                break
    except trio.TooSlowError:
        raise ConnectionTimeout(f"no answer to CONNECT within {timeout:g}s").at_proxy(
            proxy.label
        ) from None
    except (h11.RemoteProtocolError, trio.BrokenResourceError, ProxydError) as exc:
        detail = exc.detail if isinstance(exc, ProxydError) else str(exc)
        raise ConnectionRefused(f"not a working HTTP proxy: {detail}").at_proxy(
            proxy.label
        ) from None
    if not isinstance(event, h11.Response):
        raise ConnectionRefused("no response to CONNECT").at_proxy(proxy.label)
    if event.status_code == 407:
        raise UpstreamProxyAuthFailed(
            f"proxy {proxy.label} wants authentication (407)", next_hop=proxy.label
        )
    if not 200 <= event.status_code < 300:
        raise UpstreamProxyRefused(
            f"proxy {proxy.label} answered CONNECT {authority} with {event.status_code}",
            next_hop=proxy.label,
        )
    return bytes(conn.trailing_data[0])  # tunnel bytes that came with the 200


_SOCKS5_ERRORS = {
    socks5.SOCKS5ReplyCode.CONNECTION_REFUSED: (ConnectionRefused, "refused the connection"),
    socks5.SOCKS5ReplyCode.TTL_EXPIRED: (ConnectionTimeout, "timed out (TTL expired)"),
    socks5.SOCKS5ReplyCode.HOST_UNREACHABLE: (DestinationUnavailable, "host unreachable"),
    socks5.SOCKS5ReplyCode.NETWORK_UNREACHABLE: (DestinationUnavailable, "network unreachable"),
}


async def _receive(stream: trio.abc.Stream) -> bytes:
    data = await stream.receive_some(1024)
    if not data:
        raise trio.BrokenResourceError("the proxy closed the connection")
    return bytes(data)


async def _socks_connect(
    stream: trio.abc.Stream,
    proxy: ProxyServer,
    host: str,
    port: int,
    timeout: float,
    resolve: Callable[[str], Awaitable[list[str]]] | None,
) -> None:
    """SOCKS5 (RFC 1928, RFC 1929 credentials) or SOCKS4/4a through socksio's state machines."""
    address = host
    if not proxy.remote_dns and resolve is not None and not _is_ip(host):
        # socks5:// and socks4:// resolve locally; SOCKS4 carries IPv4 addresses only.
        addresses = await resolve(host)
        if proxy.kind == "socks4":
            addresses = [a for a in addresses if ":" not in a]
            if not addresses:
                raise DestinationUnavailable(f"{host} has no IPv4 address (SOCKS4 needs one)")
        address = addresses[0]
    try:
        with trio.fail_after(timeout):
            if proxy.kind == "socks4":
                await _socks4(stream, proxy, address, port)
            else:
                await _socks5(stream, proxy, address, port)
    except trio.TooSlowError:
        raise ConnectionTimeout(f"no SOCKS answer within {timeout:g}s").at_proxy(
            proxy.label
        ) from None
    except (SocksProtocolError, SOCKSError, trio.BrokenResourceError, ValueError) as exc:
        raise ConnectionRefused(f"not a working SOCKS proxy: {exc}").at_proxy(proxy.label) from None


async def _socks5(stream: trio.abc.Stream, proxy: ProxyServer, address: str, port: int) -> None:
    conn = socks5.SOCKS5Connection()
    method = (
        socks5.SOCKS5AuthMethod.USERNAME_PASSWORD
        if proxy.username is not None
        else socks5.SOCKS5AuthMethod.NO_AUTH_REQUIRED
    )
    conn.send(socks5.SOCKS5AuthMethodsRequest([method]))
    await stream.send_all(conn.data_to_send())
    reply = conn.receive_data(await _receive(stream))
    if not isinstance(reply, socks5.SOCKS5AuthReply) or reply.method != method:
        raise UpstreamProxyAuthFailed(
            f"proxy {proxy.label} refused our SOCKS5 authentication method", next_hop=proxy.label
        )
    if method == socks5.SOCKS5AuthMethod.USERNAME_PASSWORD:
        conn.send(
            socks5.SOCKS5UsernamePasswordRequest(
                (proxy.username or "").encode(), (proxy.password or "").encode()
            )
        )
        await stream.send_all(conn.data_to_send())
        auth = conn.receive_data(await _receive(stream))
        if not isinstance(auth, socks5.SOCKS5UsernamePasswordReply) or not auth.success:
            raise UpstreamProxyAuthFailed(
                f"proxy {proxy.label} rejected our SOCKS5 credentials", next_hop=proxy.label
            )
    conn.send(
        socks5.SOCKS5CommandRequest.from_address(socks5.SOCKS5Command.CONNECT, (address, port))
    )
    await stream.send_all(conn.data_to_send())
    answer = conn.receive_data(await _receive(stream))
    if not isinstance(answer, socks5.SOCKS5Reply):
        raise ValueError(f"unexpected SOCKS5 message {answer!r}")
    if answer.reply_code != socks5.SOCKS5ReplyCode.SUCCEEDED:
        kind, text = _SOCKS5_ERRORS.get(
            answer.reply_code, (UpstreamProxyRefused, answer.reply_code.name.lower())
        )
        raise kind(f"proxy {proxy.label}: {address}:{port} {text}", next_hop=proxy.label)


async def _socks4(stream: trio.abc.Stream, proxy: ProxyServer, address: str, port: int) -> None:
    user_id = (proxy.username or "proxyd").encode()  # SOCKS4 wants some USERID; it is informational
    conn = socks4.SOCKS4Connection(user_id=user_id)
    if _is_ip(address):
        conn.send(socks4.SOCKS4Request.from_address(socks4.SOCKS4Command.CONNECT, (address, port)))
    else:
        conn.send(socks4.SOCKS4ARequest.from_address(socks4.SOCKS4Command.CONNECT, (address, port)))
    await stream.send_all(conn.data_to_send())
    answer = conn.receive_data(await _receive(stream))
    if answer.reply_code != socks4.SOCKS4ReplyCode.REQUEST_GRANTED:
        raise UpstreamProxyRefused(
            f"proxy {proxy.label}: {address}:{port} {answer.reply_code.name.lower()}",
            next_hop=proxy.label,
        )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def open_route_stream(
    route: Route,
    host: str,
    port: int,
    *,
    tls: bool,
    tunnel: bool,
    hosts: Mapping[str, str],
    timeout: float,
    resolve: Callable[[str], Awaitable[list[str]]] | None = None,
) -> trio.abc.Stream:
    """A stream that reaches ``host:port`` over ``route``.

    ``tunnel``: the caller needs raw bytes to the origin (CONNECT, WebSocket, https). Without it,
    plain http through an HTTP proxy is a connection *to the proxy*, which then takes requests in
    absolute form. ``tls``: wrap the end-to-end stream in TLS to the origin (https).
    """
    if isinstance(route, Direct):
        return await open_origin_stream(host, port, hosts=hosts, timeout=timeout, tls=tls)
    proxy = route.proxy
    stream = await _open_proxy_socket(proxy, hosts=hosts, timeout=timeout)
    try:
        if proxy.kind in ("http", "https"):
            if not tunnel and not tls:
                return stream
            early = await _http_connect(stream, proxy, host, port, timeout)
            if early:
                stream = PrefixedStream(stream, early)
        else:
            await _socks_connect(stream, proxy, host, port, timeout, resolve)
        if tls:
            return await _start_tls(stream, host, timeout)
        return stream
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


async def _start_tls(stream: trio.abc.Stream, host: str, timeout: float) -> trio.abc.Stream:
    tls_stream = trio.SSLStream(
        stream, _default_tls_context(), server_hostname=host, https_compatible=True
    )
    try:
        with trio.fail_after(timeout):
            await tls_stream.do_handshake()
    except trio.TooSlowError:
        raise ConnectionTimeout(
            f"TLS handshake with {host} took longer than {timeout:g}s"
        ) from None
    except (trio.BrokenResourceError, ssl.SSLError) as exc:
        raise TlsError(f"TLS handshake with {host} failed: {exc}") from exc
    return tls_stream

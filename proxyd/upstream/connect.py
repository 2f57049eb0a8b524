"""Opening a socket to an origin: ``dns.hosts`` overrides, Happy Eyeballs, TLS, error translation.

``open_origin_stream`` is the one place where connect-time failures become ``ProxydError``s:
getaddrinfo errors are ``dns_error``, a refused connection is ``connection_refused``, the connect
deadline is ``connection_timeout``, anything else ``destination_unavailable`` (RFC 9209 §2.3).
trio's ``open_tcp_stream`` already does RFC 8305 Happy Eyeballs across every address of a name
and sets TCP_NODELAY; the resolver cache and the concurrency cap arrive with the routing issue.
"""

from __future__ import annotations

import errno
import socket
import ssl
from collections.abc import Mapping

import trio

from proxyd.errors import (
    ConnectionRefused,
    ConnectionTimeout,
    DestinationUnavailable,
    DnsError,
    TlsError,
)

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
    try:
        with trio.fail_after(timeout):
            stream: trio.abc.Stream = await trio.open_tcp_stream(
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
        if isinstance(exc, socket.gaierror):
            raise DnsError(f"cannot resolve {host}: {exc.strerror}") from None
        if _refused(exc):
            raise ConnectionRefused(f"{shown} refused the connection") from None
        raise DestinationUnavailable(f"cannot connect to {shown}: {exc}") from None

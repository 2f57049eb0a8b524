"""One error tree for everything that ends a request early.

Low-level failures (socket errors, h11 protocol errors, timeouts) are translated once, at the
edge where they happen, into a ``ProxydError`` subclass. Each class knows the HTTP status the
client gets and the RFC 9209 error type named in the ``Proxy-Status`` response field, so the code
that writes the error response (``client._send_error``) needs no table of its own.
"""

from __future__ import annotations


class ProxydError(Exception):
    """Base class: ``status`` and ``error_type`` (RFC 9209 §2.3) are class-level facts."""

    status: int = 500
    error_type: str = "proxy_internal_error"
    #: Whether the client connection must be closed after the error response.
    close_connection: bool = False
    #: RFC 9211 Cache-Status member when the error happened on the cache's path.
    cache_status: bytes | None = None

    def __init__(self, detail: str, *, next_hop: str | None = None, proxy_failure: bool = False):
        super().__init__(detail)
        self.detail = detail
        #: RFC 9209 §2.1.2 next-hop: the upstream proxy this failure happened at, if any.
        self.next_hop = next_hop
        #: The upstream proxy itself failed (unreachable, broken, not speaking its protocol):
        #: routing puts it on the bad-proxy list and fails over to the next route.
        self.proxy_failure = proxy_failure

    def at_proxy(self, label: str) -> ProxydError:
        """The same failure, seen while reaching the proxy ``label`` (a failover trigger)."""
        error = type(self)(f"proxy {label}: {self.detail}", next_hop=label, proxy_failure=True)
        return error


# --- the client's request is at fault (4xx) ---------------------------------------------------


class BadRequest(ProxydError):
    status = 400
    error_type = "http_request_error"
    close_connection = True


class NotAProxyRequest(ProxydError):
    """An origin-form request sent to the proxy as if it were the server."""

    status = 400
    error_type = "http_request_error"


class HeadTooLarge(ProxydError):
    status = 431
    error_type = "http_request_error"
    close_connection = True


class RequestHeadTimeout(ProxydError):
    """The request head did not arrive within ``client.timeouts.head`` (slowloris)."""

    status = 408
    error_type = "http_request_error"
    close_connection = True


class ClientForbidden(ProxydError):
    """The client address is not in ``acl.allow_clients``."""

    status = 403
    error_type = "http_request_denied"
    close_connection = True


class DestinationForbidden(ProxydError):
    """A CONNECT port that is not allowed, or the proxy's own admin listener."""

    status = 403
    error_type = "http_request_denied"


class ProxyAuthRequired(ProxydError):
    status = 407
    error_type = "http_request_denied"


class LoopDetected(ProxydError):
    status = 508
    error_type = "proxy_loop_detected"


class SchemeNotSupported(ProxydError):
    status = 501
    error_type = "http_request_error"


class TransferCodingNotImplemented(ProxydError):
    """RFC 9112 §6.1: a transfer coding we do not implement (only chunked is)."""

    status = 501
    error_type = "http_request_error"
    close_connection = True


# --- reaching the origin failed (5xx) ---------------------------------------------------------


class DnsError(ProxydError):
    status = 502
    error_type = "dns_error"


class DnsTimeout(ProxydError):
    status = 504
    error_type = "dns_timeout"


class ConnectionRefused(ProxydError):
    status = 502
    error_type = "connection_refused"


class ConnectionTimeout(ProxydError):
    status = 504
    error_type = "connection_timeout"


class DestinationUnavailable(ProxydError):
    status = 502
    error_type = "destination_unavailable"


class TlsError(ProxydError):
    status = 502
    error_type = "tls_protocol_error"


class ConnectionLimitReached(ProxydError):
    status = 503
    error_type = "connection_limit_reached"


# --- the origin's response failed (5xx) -------------------------------------------------------


class ResponseTimeout(ProxydError):
    """No (complete) response head within ``upstream.timeouts.response_head``."""

    status = 504
    error_type = "http_response_timeout"


class ReadTimeout(ProxydError):
    """An upstream body read stalled for ``upstream.timeouts.idle_read``."""

    status = 504
    error_type = "connection_read_timeout"


class ResponseIncomplete(ProxydError):
    """The origin closed the connection before a complete response."""

    status = 502
    error_type = "http_response_incomplete"


class BadResponse(ProxydError):
    """The origin sent something that is not valid HTTP/1.1."""

    status = 502
    error_type = "http_protocol_error"


class ResponseHeadTooLarge(ProxydError):
    status = 502
    error_type = "http_response_header_section_size"


class UpstreamProxyAuthFailed(ProxydError):
    """An upstream proxy answered 407: our credentials for it are missing or wrong."""

    status = 502
    error_type = "http_request_denied"


class UpstreamProxyRefused(ProxydError):
    """An upstream proxy could not reach the origin (a non-2xx answer to CONNECT, a SOCKS
    failure reply): the proxy works, the destination does not."""

    status = 502
    error_type = "destination_unavailable"


class ProxyShuttingDown(ProxydError):
    status = 503
    error_type = "proxy_internal_response"
    close_connection = True

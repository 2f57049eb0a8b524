"""Getting the PAC script's text: a file path, a ``file:`` URL, or an ``http(s)`` URL.

Files are read on a trio worker thread (``trio.Path``), at most ``MAX_PAC_BYTES``. HTTP uses a
small h11 client, because the runtime has no HTTP client library and needs none for one GET:

* the host is resolved with the injected ``resolve`` (so ``dns.hosts`` overrides and the DNS cache
  apply; IP literals skip it) and the addresses are tried in order with ``trio.open_tcp_stream``;
  ``https`` wraps the stream in ``trio.SSLStream`` with the system's default trust store and SNI;
* one ``GET`` with ``Connection: close`` and ``Accept-Encoding: identity`` (no decoding to do);
  the body is read as it arrives and refused past ``MAX_PAC_BYTES`` (h11 also caps the head);
* 301/302/303/307/308 with a ``Location`` are followed, at most ``MAX_REDIRECTS`` times, relative
  locations resolved against the current URL (RFC 9110 §15.4, §10.2.2); any final status other
  than 200 is an error;
* the body is decoded with the ``charset`` of ``Content-Type`` when given, else UTF-8 (a BOM is
  dropped), else Latin-1, which never fails: PAC files are JavaScript text, mostly ASCII.

Every failure is a ``PacFetchError`` whose message says what went wrong; the deadline for the whole
fetch (redirects included) is the caller's ``trio.fail_after``. Every stream is closed on the way
out, forcefully (``aclose_forcefully`` cannot block).
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Awaitable, Callable
from email.message import Message
from urllib.parse import unquote, urljoin, urlsplit

import h11
import trio

from proxyd import __version__

Resolve = Callable[[str], Awaitable[list[str]]]
MAX_PAC_BYTES = 8 << 20
MAX_REDIRECTS = 3
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
USER_AGENT = f"proxyd/{__version__}"

_tls_context: ssl.SSLContext | None = None


class PacFetchError(Exception):
    """The PAC script could not be fetched or read."""


def is_http_location(location: str) -> bool:
    return location.lower().startswith(("http://", "https://"))


async def load_source(location: str, *, resolve: Resolve, max_bytes: int = MAX_PAC_BYTES) -> str:
    """The text at ``location`` (a path, ``file:`` URL or ``http(s)`` URL)."""
    if is_http_location(location):
        return await fetch_http(location, resolve=resolve, max_bytes=max_bytes)
    path = unquote(urlsplit(location).path) if location.lower().startswith("file:") else location
    return await read_file(path, max_bytes=max_bytes)


async def read_file(path: str, *, max_bytes: int = MAX_PAC_BYTES) -> str:
    try:
        async with await trio.open_file(path, "rb") as file:
            data = await file.read(max_bytes + 1)
    except OSError as exc:
        raise PacFetchError(f"cannot read the file: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise PacFetchError(f"the file is larger than {max_bytes} bytes")
    return decode(data, None)


def decode(data: bytes, content_type: str | None) -> str:
    charset = None
    if content_type:
        message = Message()
        message["content-type"] = content_type
        charset = message.get_param("charset")
    if isinstance(charset, str):
        try:
            return data.decode(charset)
        except (LookupError, UnicodeDecodeError):
            pass
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _tls() -> ssl.SSLContext:
    global _tls_context
    if _tls_context is None:
        _tls_context = ssl.create_default_context()
    return _tls_context


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def _connect(host: str, port: int, resolve: Resolve) -> trio.SocketStream:
    addresses = [host] if _is_ip(host) else await resolve(host)
    if not addresses:
        raise PacFetchError(f"{host} has no address")
    errors: list[str] = []
    for address in addresses:
        try:
            return await trio.open_tcp_stream(address, port)
        except OSError as exc:
            errors.append(f"{address}: {exc.strerror or exc}")
    raise PacFetchError(f"cannot connect to {host}:{port} ({'; '.join(errors)})")


async def _get_once(url: str, resolve: Resolve, max_bytes: int) -> tuple[int, str | None, bytes]:
    """One GET: (status, Location or Content-Type, body)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = parts.hostname
    if not host:
        raise PacFetchError("the URL has no host")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise PacFetchError("the URL has an invalid port") from None
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = parts.netloc.rpartition("@")[2]
    try:
        stream: trio.abc.Stream = await _connect(host, port, resolve)
    except PacFetchError:
        raise
    except Exception as exc:  # the resolver's own errors (DnsError, gaierror, ...)
        raise PacFetchError(f"cannot resolve {host}: {exc}") from None
    try:
        if scheme == "https":
            tls_stream = trio.SSLStream(stream, _tls(), server_hostname=host)
            stream = tls_stream
            await tls_stream.do_handshake()
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(
            method="GET",
            target=target,
            headers=[
                ("Host", host_header),
                ("User-Agent", USER_AGENT),
                ("Accept", "application/x-ns-proxy-autoconfig, */*;q=0.5"),
                ("Accept-Encoding", "identity"),
                ("Connection", "close"),
            ],
        )
        await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
        status = 0
        extra: str | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(65536)))
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                wanted = b"location" if status in REDIRECT_STATUSES else b"content-type"
                for name, value in event.headers:
                    if name == wanted:
                        extra = value.decode("latin-1")
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > max_bytes:
                    raise PacFetchError(f"the script is larger than {max_bytes} bytes")
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                if status == 0:
                    raise PacFetchError("the server closed the connection without a response")
                return status, extra, bytes(body)
    except h11.ProtocolError as exc:
        raise PacFetchError(f"bad HTTP response: {exc}") from None
    except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
        raise PacFetchError(f"connection failed: {exc}") from None
    finally:
        await trio.aclose_forcefully(stream)


async def fetch_http(url: str, *, resolve: Resolve, max_bytes: int = MAX_PAC_BYTES) -> str:
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        where = "" if current == url else f" (redirected to {current})"
        if not is_http_location(current):
            raise PacFetchError(f"redirected to a URL that is not http(s): {current!r}")
        try:
            status, extra, body = await _get_once(current, resolve, max_bytes)
        except PacFetchError as exc:
            raise PacFetchError(f"{exc}{where}") from None
        if status in REDIRECT_STATUSES and extra:
            current = urljoin(current, extra)
            continue
        if status != 200:
            raise PacFetchError(f"HTTP status {status}{where}")
        return decode(body, extra)
    raise PacFetchError(f"more than {MAX_REDIRECTS} redirects")

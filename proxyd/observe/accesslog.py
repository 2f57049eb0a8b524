"""The access log: one line per request, text or JSON, to stderr or a file.

Fields: time (UTC, ms), connection id, client address, user (``-`` without proxy auth), method,
URL (credentials never appear: the proxy's own are stripped from the request and URLs with
userinfo are rejected), status, body bytes in (from the client) and out (to the client), duration,
upstream (``host:port``), route, cache result and the RFC 9209 error type when the request failed.

The line is written with one ``write`` call on a line-buffered stream; the timestamp text is cached
per second because formatting it is the most expensive part of a line.

``reopen(fmt, path)`` (a config reload, SIGHUP) switches the format and reopens the file, so a log
rotated away (``mv``, then SIGHUP, as logrotate does) is written afresh. The new file is opened
before the old one is closed: when it cannot be opened, lines keep going to the old one.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass
from typing import TextIO


@dataclass(slots=True)
class AccessRecord:
    conn_id: int
    client: str
    method: str
    url: str
    status: int
    bytes_in: int = 0
    bytes_out: int = 0
    duration: float = 0.0
    upstream: str = "-"
    route: str = "DIRECT"
    cache: str = "-"
    user: str = "-"
    error: str = "-"


class AccessLog:
    def __init__(self, fmt: str = "text", path: str = "-") -> None:
        self._json = fmt == "json"
        self._owned = path != "-"
        self._stream: TextIO = (
            open(path, "a", buffering=1, encoding="utf-8") if self._owned else sys.stderr  # noqa: SIM115
        )
        self._second = -1
        self._second_text = ""

    def _timestamp(self, now: float) -> str:
        second = int(now)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int((now - second) * 1000):03d}Z"

    def write(self, record: AccessRecord) -> None:
        stamp = self._timestamp(time.time())
        if self._json:
            line = json.dumps(
                {
                    "time": stamp,
                    "conn": record.conn_id,
                    "client": record.client,
                    "user": record.user,
                    "method": record.method,
                    "url": record.url,
                    "status": record.status,
                    "bytes_in": record.bytes_in,
                    "bytes_out": record.bytes_out,
                    "duration_ms": round(record.duration * 1000, 3),
                    "upstream": record.upstream,
                    "route": record.route,
                    "cache": record.cache,
                    "error": record.error,
                },
                separators=(",", ":"),
            )
        else:
            line = (
                f"{stamp} c{record.conn_id} {record.client} {record.user} {record.method} "
                f"{record.url} {record.status} in={record.bytes_in} out={record.bytes_out} "
                f"{record.duration * 1000:.1f}ms upstream={record.upstream} route={record.route} "
                f"cache={record.cache} error={record.error}"
            )
        # A full disk or a closed stderr must not take a request down.
        with contextlib.suppress(OSError, ValueError):
            self._stream.write(line + "\n")

    def reopen(self, fmt: str, path: str) -> None:
        """New format and path (``-``: keep the stream given at start, stderr by default).
        Raises OSError when the file cannot be opened; nothing changes then."""
        if path != "-":
            stream: TextIO = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
            if self._owned:
                self._stream.close()
            self._stream, self._owned = stream, True
        elif self._owned:
            self._stream.close()
            self._stream, self._owned = sys.stderr, False
        self._json = fmt == "json"

    def close(self) -> None:
        if self._owned:
            self._stream.close()

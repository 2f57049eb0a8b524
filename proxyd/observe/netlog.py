"""NetLog: timed per-transaction events, captured on demand as JSON lines.

Chromium's NetLog idea in proxyd's size: every step of every request is an event with a time, so a
capture shows where the time of each request went (``netlog_summary.py`` turns one into a table).

How it works:

- **Emitting.** One ``NetLog`` per server. Code on the request path holds it and writes
  ``if netlog.active: netlog.emit(conn, req, "event", field=value, ...)``. ``active`` is a plain
  attribute that is True only while somebody captures, so with no capture an emit site costs one
  attribute load and a branch: no dict, no clock read, no call (``built`` counts the records ever
  built; it stays 0 while nobody captures, which a test checks). ``emit`` builds one dict
  ``{"t", "conn", "req", "event", **fields}`` and offers the same dict to every capture; it is
  never mutated afterwards, so sharing it is safe.
- **Capturing.** ``capture()`` opens a ``Capture``: a trio memory channel with a bounded buffer
  (``MAX_QUEUED`` events). ``emit`` never waits: a full buffer means the consumer is too slow, and
  the event is dropped and counted (``Capture.dropped``, ``NetLog.dropped``). Memory is therefore
  bounded whatever the load: the captures queue the same records, so together they hold at most
  the last ``MAX_QUEUED`` events (a few hundred bytes each). The consumer takes whatever is queued
  in one batch (up to ``BATCH`` events), and reports drops in-band as a ``netlog_dropped`` event.
- **Consumers.** ``write_file(path)`` (``--netlog FILE``) runs as a task from start-up: it
  subscribes before the proxy accepts anything, and each batch is serialized *and* written by one
  ``trio.to_thread`` call, so neither JSON encoding nor disk writes run on the event loop. At
  shutdown the rest of the queue is written under a shielded, bounded scope. ``admin_route``
  (``GET /netlog?seconds=N`` on the admin listener, N <= ``MAX_SECONDS``) streams a capture of N
  seconds as chunked JSON lines; at most ``MAX_STREAMS`` of those run at once. A slow reader only
  loses events of its own capture.

Event schema, one JSON object per line (``t``: trio's monotonic clock in seconds, the same clock in
every event of a process; ``netlog_start`` gives ``epoch``, the wall clock at the same instant, to
map it to real time). ``conn`` is the client connection id, ``req`` the request id (unique in the
process); connection-level events have ``req: null``, capture events both null:

====================  =====================================================================
``netlog_start``      a capture begins: ``epoch``, ``pid``
``accepted``          a client connection was accepted: ``peer``
``request``           a request head was read: ``method``, ``url``
``cache``             the cache's decision (RFC 9111 lookup): ``action`` (serve, fetch,
                      revalidate, serve-stale-revalidate, gateway-timeout), ``stored`` variants
``route``             routes decided: ``routes`` (labels, in order), ``source``: static, or
                      pac (a bypass match in PAC mode is static; PAC's DIRECT fallback is pac)
``route_failed``      a route failed as a proxy and the next one is tried: ``route``, ``error``
``socket``            an upstream socket is ours: ``reused`` (from the pool) or fresh,
                      ``socket`` (pool id), ``wait`` (seconds waiting for it: the connect,
                      DNS included, when fresh), ``route``, ``retry`` (a stale keep-alive
                      retry); for CONNECT / WebSocket legs ``tunnel: true``
``socket_failed``     no socket: the connect (or the pool's wait) failed: ``error``, ``wait``,
                      ``route``
``sent``              the request head is written upstream: ``body`` (a body follows)
``body_sent``         the request body is written upstream: ``bytes``
``informational``     a 1xx arrived: ``status``
``first_byte``        the final response head arrived: ``status``
``completed``         the request ended: ``status``, ``bytes_in``, ``bytes_out``, ``duration``,
                      ``route``, ``cache``
``failed``            the request ended with an error: ``error`` (RFC 9209 type) and the
                      fields of ``completed``
``closed``            the client connection closed
``netlog_dropped``    ``count`` events were dropped since the last report (slow consumer)
``netlog_end``        the capture ends: ``dropped`` in total
====================  =====================================================================

DNS has no event of its own: lookups happen inside the pool's connect (and are cached), so a fresh
socket's ``wait`` covers them. Requests the cache makes by itself (background revalidations) are
not traced.

Cost, measured (2 shared cores, CPython 3.11): an emit site with no capture ~10 ns (about 8 per
request: well under 0.1% of a request's CPU time); with a capture, ~1 us to build and queue an
event and ~3 us to encode it in the writer's thread, about 6 events per request.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, Final
from urllib.parse import parse_qs

import h11
import trio

from proxyd.observe.admin import Send, Streamed

log = logging.getLogger(__name__)

Record = dict[str, Any]

#: Events one capture may hold before it drops (a few hundred bytes each: a few MB at most).
MAX_QUEUED: Final = 8192
#: Events taken from the queue, serialized and written in one go.
BATCH: Final = 1024
#: The longest ``GET /netlog?seconds=N`` capture, and the number that may run at once.
MAX_SECONDS: Final = 300.0
DEFAULT_SECONDS: Final = 10.0
MAX_STREAMS: Final = 4
#: Writing what is left at shutdown may take this long at most.
FLUSH_TIMEOUT: Final = 5.0
CONTENT_TYPE: Final = b"application/x-ndjson"
_TEXT: Final = b"text/plain; charset=utf-8"


class Capture:
    """One consumer's bounded queue, and the events it had to drop."""

    __slots__ = ("_send", "dropped", "receive", "reported")

    def __init__(self, max_queued: int) -> None:
        self._send, self.receive = trio.open_memory_channel[Record](max_queued)
        self.dropped = 0
        #: ``dropped`` as of the last ``netlog_dropped`` event.
        self.reported = 0

    def offer(self, record: Record) -> bool:
        try:
            self._send.send_nowait(record)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            self.dropped += 1
            return False
        return True

    def close(self) -> None:
        self._send.close()
        self.receive.close()

    def take(self, limit: int = BATCH) -> list[Record]:
        """Whatever is queued now (up to ``limit``), without waiting, plus a drop report."""
        batch: list[Record] = []
        while len(batch) < limit:
            try:
                batch.append(self.receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        self._report_drops(batch)
        return batch

    async def next_batch(self, limit: int = BATCH) -> list[Record]:
        """Wait for at least one event, then take what else is queued (up to ``limit``)."""
        first = await self.receive.receive()
        batch = [first]
        batch.extend(self.take(limit - 1))
        return batch

    def _report_drops(self, batch: list[Record]) -> None:
        if self.dropped > self.reported:
            batch.append(_capture_event("netlog_dropped", count=self.dropped - self.reported))
            self.reported = self.dropped


class NetLog:
    """The event source; see the module docstring."""

    __slots__ = ("_captures", "_dropped_before", "_streams", "active", "built")

    def __init__(self) -> None:
        #: True while at least one capture runs: the one attribute every emit site checks.
        self.active = False
        #: Records built since start-up (0 as long as nobody captured).
        self.built = 0
        self._captures: tuple[Capture, ...] = ()
        self._dropped_before = 0
        self._streams = 0

    def emit(self, conn: int | None, req: int | None, event: str, **fields: Any) -> None:
        """Record one event. Call only under ``if netlog.active:`` (the fields are built then)."""
        record = {"t": trio.current_time(), "conn": conn, "req": req, "event": event, **fields}
        self.built += 1
        for capture in self._captures:
            capture.offer(record)

    @property
    def dropped(self) -> int:
        """Events dropped by slow consumers since start-up (captures still open included)."""
        return self._dropped_before + sum(capture.dropped for capture in self._captures)

    def stats(self) -> dict[str, int]:
        return {
            "captures": len(self._captures),
            "built": self.built,
            "dropped": self.dropped,
        }

    @contextlib.contextmanager
    def capture(self, max_queued: int = MAX_QUEUED) -> Iterator[Capture]:
        """Subscribe for the duration of the block (``active`` is True while any block runs)."""
        capture = Capture(max_queued)
        self._captures = (*self._captures, capture)
        self.active = True
        try:
            yield capture
        finally:
            self._captures = tuple(other for other in self._captures if other is not capture)
            self.active = bool(self._captures)
            self._dropped_before += capture.dropped
            capture.close()

    # --- consumers --------------------------------------------------------------------------

    async def write_file(
        self,
        path: str,
        *,
        max_queued: int = MAX_QUEUED,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """``--netlog FILE``: capture from now until cancelled into ``path`` (truncated first).

        The file is opened before ``started()``, so a path that cannot be written stops the
        daemon's start-up with the OSError. A write error later only ends the capture (logged):
        a trace is never worth the proxy."""
        stream = await trio.to_thread.run_sync(_open_truncated, path)
        try:
            with self.capture(max_queued) as capture:
                task_status.started()
                pending = [_start_event()]
                try:
                    while True:
                        await trio.to_thread.run_sync(_write_records, stream, pending)
                        pending = await capture.next_batch()
                finally:
                    # Shutdown (or a write error): what is queued still goes out, within bounds.
                    with trio.move_on_after(FLUSH_TIMEOUT, shield=True):
                        rest = capture.take(MAX_QUEUED)
                        rest.append(_capture_event("netlog_end", dropped=capture.dropped))
                        await trio.to_thread.run_sync(_write_records, stream, rest)
        except OSError as exc:
            log.error("netlog: writing %s failed, the capture stops: %s", path, exc)
        finally:
            with trio.move_on_after(FLUSH_TIMEOUT, shield=True):
                await trio.to_thread.run_sync(_close_quietly, stream)

    async def stream_to(self, send: Send, seconds: float, max_queued: int = MAX_QUEUED) -> None:
        """Capture for ``seconds`` and hand each batch, as JSON lines, to ``send``."""
        with self.capture(max_queued) as capture:
            await send(_encode([_start_event()]))
            deadline = trio.current_time() + seconds
            while True:
                batch: list[Record] = []
                with trio.move_on_at(deadline):
                    batch = await capture.next_batch()
                if not batch:
                    break
                await send(_encode(batch))
            rest = capture.take(MAX_QUEUED)  # emitted before the deadline, not yet read
            rest.append(_capture_event("netlog_end", dropped=capture.dropped))
            await send(_encode(rest))

    async def admin_route(self, request: h11.Request) -> tuple[int, bytes, bytes] | Streamed:
        """``GET /netlog?seconds=N``: the events of the next N seconds as JSON lines."""
        if request.method not in (b"GET", b"HEAD"):
            return 405, _TEXT, b"use GET /netlog?seconds=N\n"
        query = request.target.split(b"?", 1)[1] if b"?" in request.target else b""
        values = parse_qs(query.decode("latin-1")).get("seconds")
        try:
            seconds = float(values[0]) if values else DEFAULT_SECONDS
        except ValueError:
            seconds = -1.0
        if not 0 < seconds <= MAX_SECONDS:  # also refuses nan and inf
            return 400, _TEXT, f"seconds must be in (0, {MAX_SECONDS:g}]\n".encode()
        if self._streams >= MAX_STREAMS:
            return 503, _TEXT, f"at most {MAX_STREAMS} captures at once\n".encode()

        async def produce(send: Send) -> None:
            self._streams += 1
            try:
                await self.stream_to(send, seconds)
            finally:
                self._streams -= 1

        return Streamed(200, CONTENT_TYPE, produce)


#: The NetLog of code that was given none (tests, background requests): never captured.
NETLOG_OFF: Final = NetLog()


def _capture_event(event: str, **fields: Any) -> Record:
    return {"t": trio.current_time(), "conn": None, "req": None, "event": event, **fields}


def _start_event() -> Record:
    # The same instant on both clocks: a viewer maps ``t`` to wall-clock time with it.
    return _capture_event("netlog_start", epoch=time.time(), pid=os.getpid())


def _encode(records: list[Record]) -> bytes:
    dumps = _DUMPS
    return "".join([dumps(record) + "\n" for record in records]).encode()


_DUMPS: Callable[[Record], str] = json.JSONEncoder(separators=(",", ":"), default=str).encode


def _open_truncated(path: str) -> BinaryIO:
    return open(path, "wb")  # closed by write_file's finally


def _write_records(stream: BinaryIO, records: list[Record]) -> None:
    """In a worker thread: encode, write and flush one batch (a reader sees whole lines)."""
    if records:
        stream.write(_encode(records))
        stream.flush()


def _close_quietly(stream: BinaryIO) -> None:
    with contextlib.suppress(OSError):
        stream.close()


__all__ = ["NETLOG_OFF", "Capture", "NetLog"]

"""One WebSocket session: two hops relayed frame by frame, graceful close forwarding, keepalive.

How it works: ``Session.run`` opens one nursery for the session, starts the origin hop's reader
in it and is itself the client hop's reader (one task less per session). Everything the session
owns lives and dies with that nursery (Chromium's WebSocket lifetime note: once the session
ends, no code path touches it again).

- A reader takes up to 64 KiB from its hop and decodes it: ``frames.PlainDecoder`` on a hop without
  extensions (one pass per read, checked against wsproto's parser in the tests), wsproto's
  ``FrameProtocol`` with ``frames.BoundedDeflate`` on a hop with permessage-deflate (compressed
  input is fed in 4 KiB slices so each step inflates a bounded amount). Every data frame is
  re-encoded for the other hop into one ``bytearray`` with ``FrameEncoder``; the whole batch goes
  out with one ``send_all`` before the next read (what the kernel takes at once is written
  directly, without trio's per-call overhead; a read that did not wait yields, so no session
  hogs the loop). That is the backpressure: a
  slow reader on one side stops us reading the other side, and memory stays at one read (plus at
  most ``_FLUSH_AT`` bytes of inflated output) per direction. Message boundaries and order are
  kept; fragment boundaries may change (RFC 6455 §5.4 lets an intermediary refragment, and each
  hop's extensions are its own). Pings are answered on the hop they came from.
- Every decision about closing is made by ``close.CloseMachine`` (pure); the session only turns
  its actions into I/O: ``SendClose`` (bounded by ``close_timeout``), ``SendPing``,
  ``FinishHop`` (FIN first where proxyd is the WebSocket server — the client hop, RFC 6455
  §7.1.1 — then read to EOF within ``close_timeout``, so closing never resets a connection with
  unread data), ``AbortHop``. The common close costs no task and no timer of its own: our Close
  is written at once when nothing else is writing, the FIN right after it, and the wait for the
  peer's FIN is the hop's reader plus a deadline. Only a write that has to wait gets a timer,
  and a FinishHop that has to wait (for our Close, for the lock) a task.
- Deadlines: ``CloseMachine.next_deadline()`` (close replies, pings, pong timeouts, the
  optional idle timeout), a drain, and the end of a finished hop's wait for its peer's FIN. All
  sessions of a trio run share one task for them (``_Deadlines``: a heap, and one cancel scope
  whose deadline is the earliest), which runs ``on_tick`` and starts the actions in the
  session's nursery. A session with nothing to time (idle, no keepalive) has no entry there:
  it costs one blocked reader task besides the connection's own task.
- Writes to one hop are serialized by a per-hop lock (a reader's batch, the other reader's pongs
  and closes, the timer's pings). A batch checks ``may_send`` after taking the lock, so no data
  frame ever follows our Close on a hop.
- With keepalive on, every completed write to a hop is reported to the machine
  (``on_write_progress``): a pong clock runs from when the ping was actually written, and a slow
  reader that is still draining what we send is not taken for dead (see ``close.py``). Large
  batches go out in ``_PROGRESS_SLICE`` pieces so that progress is seen often.
- A peer that sends its Close and then half-closes (EOF) still gets our reply: its reader stops
  reading but keeps the stream open (bounded by ``close_timeout``) until the reply is written.
- When both readers have seen their hop end, whatever still runs in the nursery (a close or a
  ping under way) is cancelled, both streams are closed (at once: trio's ``aclose`` would add
  passes of the scheduler, ``close_stream``), the deadline is dropped, and the outcome is
  counted once.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import logging
import math
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, cast

import trio
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason, ParseFailed

from proxyd.http import sockio
from proxyd.websocket.close import (
    AbortHop,
    Action,
    CloseMachine,
    Ending,
    FinishHop,
    HopState,
    Outcome,
    SendClose,
    SendPing,
    Side,
    code_label,
)
from proxyd.websocket.frames import (
    OP_BINARY,
    OP_BINARY_MASKED,
    OP_ERROR,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameEncoder,
    PlainDecoder,
    WsprotoDecoder,
)

if TYPE_CHECKING:
    from proxyd.config import WebSocketConfig
    from proxyd.observe.metrics import Metrics

log = logging.getLogger(__name__)

RECEIVE_SIZE: Final = 65536
#: A batch for the other hop is sent early once it is this large (inflated messages).
_FLUSH_AT: Final = 1 << 20
#: Compressed input is fed to the decoder in slices this large, so one step inflates at most
#: about 1,032 times as much (deflate's maximum ratio) before the batch can be flushed.
_DEFLATE_SLICE: Final = 4096
_PING_PAYLOAD: Final = b"proxyd"
#: With keepalive on, a batch is written in pieces this large, each one reported as progress.
_PROGRESS_SLICE: Final = 1 << 16
_NETWORK_ERRORS: Final = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
TOO_BIG: Final = CloseReason.MESSAGE_TOO_BIG


@dataclass(frozen=True, slots=True)
class SessionSettings:
    max_message_size: int = 64 << 20
    close_timeout: float = 5.0
    ping_interval: float = 0.0
    pong_timeout: float = 20.0
    idle_timeout: float = 0.0

    @classmethod
    def from_config(cls, config: WebSocketConfig) -> SessionSettings:
        return cls(
            max_message_size=config.max_message_size,
            close_timeout=config.close_timeout,
            ping_interval=config.ping_interval,
            pong_timeout=config.pong_timeout,
            idle_timeout=config.idle_timeout,
        )


@dataclass(slots=True)
class SessionStats:
    """What a finished session reports (access log, tests)."""

    messages_up: int = 0  # client -> origin
    messages_down: int = 0
    bytes_up: int = 0  # message payload bytes, after decompression
    bytes_down: int = 0
    outcome: Outcome = Outcome.CLEAN
    #: Who sent the session's first Close ("client", "origin", "proxy") and its code.
    initiator: str | None = None
    first_code: int | None = None


class _Hop:
    # An idle session is what a relay holds most of, so what only a write or the close needs
    # (the write lock, the two events: ~1.5 KiB for both hops) is made on first use.
    __slots__ = (
        "_close_written",
        "_lock",
        "_reader_done",
        "close_pending",
        "close_sent",
        "decoder",
        "encoder",
        "feed_step",
        "finish_by",
        "message_size",
        "messages",
        "out",
        "parsing",
        "payload_bytes",
        "pending",
        "reader_finished",
        "server",
        "side",
        "stalled",
        "stream",
    )

    def __init__(
        self,
        side: Side,
        stream: trio.abc.Stream,
        deflate: PerMessageDeflate | None,
        pending: bytes,
    ) -> None:
        self.side = side
        self.stream = stream
        #: proxyd is the WebSocket server on the client hop, the client on the origin hop.
        self.server = side is Side.CLIENT
        self.decoder: PlainDecoder | WsprotoDecoder
        if deflate is None:
            self.decoder = PlainDecoder(client=not self.server)
        else:
            self.decoder = WsprotoDecoder(client=not self.server, extensions=[deflate])
        self.encoder = FrameEncoder(client=not self.server, deflate=deflate)
        self.feed_step = _DEFLATE_SLICE if deflate is not None else 0
        self._lock: trio.Lock | None = None
        self.out = bytearray()  # the batch this hop's reader builds for the other hop
        self.pending = pending  # bytes that came with the handshake (same read as the 101)
        self.parsing = True
        self.message_size = 0
        self.messages = 0
        self.payload_bytes = 0
        self.stalled = False
        #: The machine has decided on our Close to this hop (it may not be written yet).
        self.close_pending = False
        #: Our Close to this hop was written (or could not be): ``close_written`` as a flag.
        self.close_sent = False
        #: The reader has finished and closed the stream: ``reader_done`` as a flag.
        self.reader_finished = False
        #: The closing handshake is over (FinishHop) and the peer has until then to close its
        #: side; the session's deadline closes the stream after it (inf: no such wait).
        self.finish_by = math.inf
        self._close_written: trio.Event | None = None
        self._reader_done: trio.Event | None = None

    @property
    def lock(self) -> trio.Lock:
        """Serializes writes to this hop (made by the first write)."""
        lock = self._lock
        if lock is None:
            lock = self._lock = trio.Lock()
        return lock

    @property
    def close_written(self) -> trio.Event:
        """Set once our Close to this hop was written (or could not be); made only for a task
        that has to wait for it (``close_sent`` is the flag)."""
        event = self._close_written
        if event is None:
            event = self._close_written = trio.Event()
            if self.close_sent:
                event.set()
        return event

    @property
    def reader_done(self) -> trio.Event:
        """Set when this hop's reader has finished (its stream is closed); made only for a
        task that has to wait for it (``reader_finished`` is the flag)."""
        event = self._reader_done
        if event is None:
            event = self._reader_done = trio.Event()
            if self.reader_finished:
                event.set()
        return event

    def mark_close_written(self) -> None:
        self.close_sent = True
        if self._close_written is not None:
            self._close_written.set()

    def mark_reader_done(self) -> None:
        self.reader_finished = True
        self.finish_by = math.inf
        if self._reader_done is not None:
            self._reader_done.set()


async def _receive(stream: trio.abc.Stream) -> bytes:
    """``stream.receive_some(RECEIVE_SIZE)`` with the same semantics (a checkpoint per call
    that brings bytes; ``ClosedResourceError`` once the stream is closed, also while waiting,
    since closing a trio socket wakes its waiters; ``BrokenResourceError`` for a reset), but on
    a plain TCP stream with the read done here: an idle session spends its life in this wait,
    and trio's own path (the stream, its error-translating context manager, the socket's
    non-blocking helper) keeps about 1.5 KiB of coroutine frames alive per hop meanwhile. Here
    it is this frame and trio's ``wait_readable``. EOF found without waiting (an origin closes
    right after its Close frame) returns without yielding: the reader ends there, so there is
    no loop to keep fair, and every session saves that pass of the scheduler."""
    if type(stream) is not trio.SocketStream:
        return cast(bytes, await stream.receive_some(RECEIVE_SIZE))
    await trio.lowlevel.checkpoint_if_cancelled()
    sock = stream.socket
    waited = False
    while True:
        fd = sock.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the stream was closed")
        data: bytes | None
        try:
            data = sockio.read_now(fd)
        except BlockingIOError:
            data = None  # wait outside the handler: it would keep the exception (~0.5 KiB)
        except OSError as exc:
            if exc.errno == errno.EBADF:
                raise trio.ClosedResourceError("the stream was closed") from None
            raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
        if data is None:
            await trio.lowlevel.wait_readable(fd)
            waited = True
            continue
        if not waited and data:
            # Like trio after a read that did not wait: yield, but the bytes are ours now, so
            # no cancellation may lose them.
            await trio.lowlevel.cancel_shielded_checkpoint()
        return data


async def _send_all(stream: trio.abc.Stream, data: bytearray) -> None:
    """``stream.send_all(data)``, but on a plain TCP stream whatever the kernel takes at once is
    written here, and only the rest goes through trio (http.sockio's reasoning: trio's call
    costs ~15 µs against ~1 µs for the system call, and yields to the scheduler even when it
    did not wait; a reader yields at every read anyway, so no task can hog the loop). The
    rest is a copy: no view of the caller's ``bytearray`` outlives the call (it is emptied
    and reused). Errors are trio's, as from ``send_all``."""
    if type(stream) is trio.SocketStream:
        fd = stream.socket.fileno()
        if fd >= 0:
            try:
                sent = os.write(fd, data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
            if sent == len(data):
                return
            data = data[sent:]
    await stream.send_all(data)


def _write_now(stream: trio.abc.Stream, data: bytearray) -> bytearray | None:
    """Write what the kernel takes at once on a plain TCP stream: None when that was all of it,
    else what is left (all of ``data`` for any other stream). Errors are trio's."""
    if type(stream) is not trio.SocketStream:
        return data
    fd = stream.socket.fileno()
    if fd < 0:
        raise trio.ClosedResourceError("the stream was closed")
    try:
        sent = os.write(fd, data)
    except BlockingIOError:
        return data
    except OSError as exc:
        raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
    return None if sent == len(data) else data[sent:]


async def _acquire(lock: trio.Lock) -> None:
    """``lock.acquire()`` without its pass of the scheduler when the lock is free (a reader
    yields at its next read anyway)."""
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()


def _shutdown_now(stream: trio.SocketStream) -> None:
    """``send_eof`` of a plain TCP stream, at once (no checkpoint: see ``close_stream``)."""
    sock = stream.socket
    if sock.fileno() < 0:
        raise trio.ClosedResourceError("the stream was closed")
    if not sock.did_shutdown_SHUT_WR:
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc


async def _send_eof(stream: trio.abc.HalfCloseableStream) -> None:
    """``stream.send_eof()``; a plain TCP stream is shut down for writing at once (no
    checkpoint: see ``close_stream``)."""
    if type(stream) is trio.SocketStream:
        _shutdown_now(stream)
        return
    await stream.send_eof()


async def close_stream(stream: trio.abc.Stream) -> None:
    """Close ``stream`` now, also inside a cancelled scope. A plain TCP stream is closed at once:
    trio's socket ``close`` wakes any task waiting on it (``notify_closing``), which is all that
    ``aclose`` adds besides a checkpoint, and under ``aclose_forcefully`` that checkpoint costs
    two passes of the scheduler (one to yield, one to deliver the forced cancel) at each of the
    several closes that end every session. Anything else (TLS) gets ``aclose_forcefully``,
    shielded like a cleanup."""
    if type(stream) is trio.SocketStream:
        stream.socket.close()
        return
    with trio.CancelScope(shield=True):
        await trio.aclose_forcefully(stream)


class Session:
    """A relayed WebSocket session; ``run()`` once, ``drain()`` from anywhere."""

    def __init__(
        self,
        client: trio.abc.Stream,
        origin: trio.abc.Stream,
        settings: SessionSettings,
        *,
        client_deflate: PerMessageDeflate | None = None,
        origin_deflate: PerMessageDeflate | None = None,
        client_pending: bytes = b"",
        origin_pending: bytes = b"",
        metrics: Metrics | None = None,
        name: str = "ws",
        target: str = "",
    ) -> None:
        self.settings = settings
        self.name = name
        #: What the status page shows: the origin's authority and path, and when it started.
        self.target = target
        self.started_at = trio.current_time()
        self.stats = SessionStats()
        self._metrics = metrics
        self._hops = (
            _Hop(Side.CLIENT, client, client_deflate, client_pending),
            _Hop(Side.ORIGIN, origin, origin_deflate, origin_pending),
        )
        decoder = self._hops[Side.CLIENT].decoder
        if isinstance(decoder, PlainDecoder) and origin_deflate is None:
            # Client binary frames are re-masked for the origin in one pass (frames.py).
            decoder.pass_masked = True
        self._machine = CloseMachine(
            now=trio.current_time(),
            close_timeout=settings.close_timeout,
            ping_interval=settings.ping_interval,
            pong_timeout=settings.pong_timeout,
            idle_timeout=settings.idle_timeout,
        )
        self._keepalive = settings.ping_interval > 0
        self._nursery: trio.Nursery | None = None
        #: This session's entry in the run's ``_Deadlines`` (None: no deadline pending).
        self._timer: _TimerEntry | None = None
        self._readers_left = 2
        self._drain_requested = False
        self._drained = False
        self._done = False
        self._started = False

    # --- public ------------------------------------------------------------------------------

    @property
    def is_done(self) -> bool:
        return self._done

    @property
    def progress(self) -> SessionStats:
        """Messages and payload bytes relayed so far (a fresh copy: for the status page)."""
        client, origin = self._hops
        return SessionStats(
            messages_up=client.messages,
            messages_down=origin.messages,
            bytes_up=client.payload_bytes,
            bytes_down=origin.payload_bytes,
        )

    def drain(self) -> None:
        """Close both sides with 1001 and let the handshakes finish (idempotent; a no-op once
        the session has ended)."""
        if self._done or self._drain_requested:
            return
        self._drain_requested = True
        self._rearm()  # due at once (run() arms it if the session has not started yet)

    async def run(self) -> SessionStats:
        if self._started:
            raise RuntimeError("a session runs once")
        self._started = True
        metrics = self._metrics
        if metrics is not None:
            metrics.ws_sessions_active.inc()
        finished = False
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._read_loop, self._hops[Side.ORIGIN])
                self._rearm()  # keepalive, idle timeout, a drain requested before the start
                # The client's reader is this task (one task less per session: its spawn, and
                # its memory while the session idles).
                await self._read_loop(self._hops[Side.CLIENT])
            finished = True
        finally:
            self._done = True
            self._nursery = None
            self._disarm()
            for hop in self._hops:
                await close_stream(hop.stream)
            self._account(finished)
        return self.stats

    # --- accounting --------------------------------------------------------------------------

    def _account(self, finished: bool) -> None:
        machine = self._machine
        stats = self.stats
        client, origin = self._hops
        stats.messages_up, stats.bytes_up = client.messages, client.payload_bytes
        stats.messages_down, stats.bytes_down = origin.messages, origin.payload_bytes
        outcome = machine.outcome
        if outcome is None:
            outcome = Outcome.CLEAN if finished else Outcome.ABORTED
        stats.outcome = outcome
        stats.initiator = machine.initiator
        stats.first_code = machine.first_code
        metrics = self._metrics
        log.debug(
            "%s: session ended (%s), first Close by %s (%s); %d/%d messages up/down",
            self.name,
            outcome,
            stats.initiator or "nobody",
            stats.first_code,
            stats.messages_up,
            stats.messages_down,
        )
        if metrics is None:
            return
        metrics.ws_sessions_active.dec()
        metrics.ws_sessions.labels(outcome.value).inc()
        if stats.initiator is not None:
            metrics.ws_close_codes.labels(stats.initiator, code_label(stats.first_code)).inc()
        if machine.pong_timeouts:
            metrics.ws_pong_timeouts.inc(machine.pong_timeouts)

    def _count(self, hop: _Hop, messages: int, size: int) -> None:
        if not (messages or size):
            return  # e.g. a read that brought only a Close: nothing to add
        hop.messages += messages
        hop.payload_bytes += size
        metrics = self._metrics
        if metrics is not None:
            if hop.side is Side.CLIENT:
                metrics.ws_messages_up.inc(messages)
                metrics.ws_bytes_up.inc(size)
            else:
                metrics.ws_messages_down.inc(messages)
                metrics.ws_bytes_down.inc(size)

    # --- readers -----------------------------------------------------------------------------

    async def _read_loop(self, hop: _Hop) -> None:
        machine = self._machine
        stream = hop.stream
        track_idle = self.settings.idle_timeout > 0
        ending: Ending | None = Ending.EOF
        data: bytes | bytearray
        try:
            if hop.pending:
                data, hop.pending = hop.pending, b""
                await self._process(hop, data)
            # ``data`` is emptied after each read is relayed: the wait for the next one must
            # not keep the last read alive (up to 64 KiB per hop of an idle session).
            data = b""
            while True:
                try:
                    data = await _receive(stream)
                except trio.ClosedResourceError:
                    ending = None  # we closed it ourselves (AbortHop)
                    break
                except (trio.BrokenResourceError, OSError):
                    ending = Ending.RESET
                    break
                if not data:
                    break
                if track_idle:
                    machine.last_activity = trio.current_time()
                if hop.parsing:
                    await self._process(hop, data)
                data = b""
            if ending is not None and machine.state(hop.side) < HopState.CLOSED:
                await self._execute(machine.on_vanished(hop.side, ending, trio.current_time()))
            state = machine.state(hop.side)
            if (
                ending is Ending.EOF
                and not hop.close_sent
                and (
                    state is HopState.CLOSE_RECEIVED
                    or (
                        hop.close_pending
                        and state is not HopState.GONE  # aborted: nothing more can be written
                    )
                )
            ):
                # The peer half-closed after its Close (the machine keeps the hop), or our
                # Close to it is on its way: keep the stream open until it is written (RFC 6455
                # §5.5.1: the endpoint that received a Close sends one back), then close it.
                with trio.move_on_after(self.settings.close_timeout):
                    await hop.close_written.wait()
        finally:
            # FIN after the peer's FIN (or after ours on the client hop): nothing unread is
            # left, so the kernel closes without a reset.
            await close_stream(stream)
            hop.mark_reader_done()
            self._readers_left -= 1
            nursery = self._nursery
            if self._readers_left == 0 and nursery is not None:
                # End what still runs for the session (a close or ping under way, a hop's
                # finish waiting for a lock). Nothing else, the common case: no cancel, which
                # would also take the nursery's owner through a cancelled wait.
                current = trio.lowlevel.current_task()
                if any(task is not current for task in nursery.child_tasks):
                    nursery.cancel_scope.cancel()

    async def _process(self, hop: _Hop, data: bytes | bytearray) -> None:
        """Decode what one read brought and relay it; see the module docstring."""
        machine = self._machine
        side = hop.side
        other = self._hops[side.other]
        feed = hop.decoder.feed
        encode_data = other.encoder.data
        encode_masked = other.encoder.binary_masked
        out = hop.out
        own: bytearray | None = None  # pongs for this hop
        limit = self.settings.max_message_size
        messages = 0
        size = 0
        step = hop.feed_step or len(data)
        position = 0
        while position < len(data):
            chunk = data if step >= len(data) else data[position : position + step]
            position += step
            for opcode, payload, fin in feed(chunk):
                if 0 < opcode <= OP_BINARY or opcode == OP_BINARY_MASKED:
                    masked = opcode == OP_BINARY_MASKED
                    length = len(payload[0] if masked else payload)
                    total = hop.message_size + length
                    if total > limit:
                        # RFC 6455 §7.4.1: 1009 to the side that sent it (1001 to the other).
                        error = ParseFailed(f"message larger than {limit} bytes", TOO_BIG)
                        await self._protocol_error(hop, other, own, messages, size, error)
                        return
                    size += length
                    if fin:
                        hop.message_size = 0
                        messages += 1
                    else:
                        hop.message_size = total
                    if length or fin:
                        if masked:
                            encode_masked(out, payload[0], payload[1], fin)
                        else:
                            encode_data(out, payload, opcode == OP_TEXT, fin)
                        if len(out) >= _FLUSH_AT:
                            await self._send_batch(hop, other)
                elif opcode == OP_PING:
                    if own is None:
                        own = bytearray()
                    hop.encoder.pong(own, payload)
                elif opcode == OP_PONG:
                    machine.on_pong(side)
                    self._rearm()  # the next ping may be due before the pong deadline
                elif opcode == OP_ERROR:
                    await self._protocol_error(hop, other, own, messages, size, payload)
                    return
                else:  # OP_CLOSE
                    code, reason = payload
                    self._count(hop, messages, size)
                    messages = size = 0
                    await self._flush(hop, other, own)
                    hop.parsing = False
                    await self._execute(
                        machine.on_close_received(side, code, reason, trio.current_time())
                    )
                    return
        if messages or size:
            self._count(hop, messages, size)
        await self._flush(hop, other, own)

    async def _protocol_error(
        self,
        hop: _Hop,
        other: _Hop,
        own: bytearray | None,
        messages: int,
        size: int,
        error: ParseFailed,
    ) -> None:
        """RFC 6455 §7.1.7: fail this hop with the parser's code (1002, 1007, 1009 from the
        bounded inflater) after relaying what came before the bad frame."""
        self._count(hop, messages, size)
        await self._flush(hop, other, own)
        hop.parsing = False
        await self._execute(
            self._machine.on_protocol_error(
                hop.side, int(error.code), str(error), trio.current_time()
            )
        )

    async def _flush(self, hop: _Hop, other: _Hop, own: bytearray | None) -> None:
        """The pongs for this hop, then the batch for the other hop (before any Close that
        follows it). Pongs first: they are small, and a peer that pinged before sending its
        Close gets its pong before the other side can react to the data (and close)."""
        if own:
            await self._send_control(hop, own)
        if hop.out:
            await self._send_batch(hop, other)

    async def _send_batch(self, hop: _Hop, other: _Hop) -> None:
        """Send ``hop.out`` to the other hop (dropped once we have sent that hop our Close)."""
        out = hop.out
        lock = other.lock
        failed = False
        await _acquire(lock)
        try:
            if self._machine.may_send(other.side):
                hop.stalled = True
                if not self._keepalive:
                    await _send_all(other.stream, out)
                else:
                    await self._send_in_slices(other, out)
        except _NETWORK_ERRORS:
            failed = True
        finally:
            hop.stalled = False
            lock.release()
            del out[:]
        if failed:
            await self._execute(self._machine.on_send_failed(other.side, trio.current_time()))

    async def _send_in_slices(self, hop: _Hop, out: bytearray) -> None:
        """Keepalive on: write ``out`` to ``hop`` reporting each completed piece as progress
        (the lock is held: the pieces cannot interleave with other writes)."""
        stream = hop.stream
        machine = self._machine
        side = hop.side
        if len(out) <= _PROGRESS_SLICE:
            await stream.send_all(out)
        else:
            # Copies, not memoryview slices: a view kept alive by a traceback would make the
            # caller's ``del out[:]`` fail. Only big batches (inflated messages) get here.
            for start in range(0, len(out), _PROGRESS_SLICE):
                await stream.send_all(out[start : start + _PROGRESS_SLICE])
                machine.on_write_progress(side, trio.current_time())
            return
        machine.on_write_progress(side, trio.current_time())

    async def _send_control(self, hop: _Hop, data: bytearray) -> None:
        failed = False
        lock = hop.lock
        await _acquire(lock)
        try:
            # RFC 6455 §5.5.2: pings are answered until the peer's Close, even after our own
            if self._machine.state(hop.side) > HopState.CLOSE_SENT:
                return
            try:
                await _send_all(hop.stream, data)
            except _NETWORK_ERRORS:
                failed = True
            else:
                if self._keepalive:
                    self._machine.on_write_progress(hop.side, trio.current_time())
        finally:
            lock.release()
        if failed:
            await self._execute(self._machine.on_send_failed(hop.side, trio.current_time()))

    # --- actions -----------------------------------------------------------------------------

    def _mark_closes(self, actions: list[Action]) -> None:
        """Note the Closes decided, before any await: a reader at EOF keeps its stream open
        for one that is not written yet."""
        for action in actions:
            if type(action) is SendClose:
                self._hops[action.side].close_pending = True

    async def _execute(self, actions: list[Action]) -> None:
        if not actions:
            return
        self._mark_closes(actions)
        self._rearm()
        for action in actions:
            hop = self._hops[action.side]
            if type(action) is SendClose:
                await self._send_close(hop, action.code, action.reason)
            elif type(action) is FinishHop:
                self._finish(hop)
            elif type(action) is AbortHop:
                await close_stream(hop.stream)
            elif type(action) is SendPing:
                self._spawn(self._send_ping, hop)

    def _spawn(self, function: Callable[[_Hop], Awaitable[None]], hop: _Hop) -> None:
        nursery = self._nursery
        if nursery is not None:
            nursery.start_soon(function, hop)

    async def _send_close(self, hop: _Hop, code: int | None, reason: str) -> None:
        frame = bytearray()
        hop.encoder.close(frame, code, reason)
        sent = False
        lock = hop.lock
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            # Another write is under way (a batch to a slow reader): wait for it, bounded.
            with trio.move_on_after(self.settings.close_timeout):
                async with lock:
                    try:
                        await _send_all(hop.stream, frame)
                        sent = True
                    except _NETWORK_ERRORS:
                        pass
        else:
            # The common case: nothing else is writing and the kernel takes the frame at once,
            # with no timer; only a write that has to wait gets one.
            try:
                rest = _write_now(hop.stream, frame)
                if rest is None:
                    sent = True
                else:
                    with trio.move_on_after(self.settings.close_timeout):
                        await hop.stream.send_all(rest)
                        sent = True
            except _NETWORK_ERRORS:
                pass
            finally:
                lock.release()
        hop.mark_close_written()
        if not sent:
            await self._execute(self._machine.on_send_failed(hop.side, trio.current_time()))

    async def _send_ping(self, hop: _Hop) -> None:
        frame = bytearray()
        hop.encoder.ping(frame, _PING_PAYLOAD)
        lock = hop.lock
        await _acquire(lock)
        try:
            if self._machine.state(hop.side) is not HopState.OPEN:
                return
            try:
                await _send_all(hop.stream, frame)
            except _NETWORK_ERRORS:
                return  # the reader sees the broken connection
            # The pong clock runs from now, not from when the ping was due: this write may have
            # waited for the lock behind a batch to a slow reader (close.py, keepalive).
            self._machine.on_write_progress(hop.side, trio.current_time())
        finally:
            lock.release()
        if self._metrics is not None:
            self._metrics.ws_pings.inc()

    def _finish(self, hop: _Hop) -> None:
        """FinishHop: TCP close after the hop's closing handshake (see the module docstring).
        Usually our Close is written already (it came first in the same actions) and nothing
        else is writing: then the FIN goes out now (where proxyd is the server) and the peer
        gets ``close_timeout`` to close its side (the reader closes the stream at its EOF; the
        session's deadline closes it after that). Otherwise a task does it as it comes."""
        if hop.reader_finished:
            return
        stream = hop.stream
        if hop.close_sent and type(stream) is trio.SocketStream:
            lock = hop.lock
            try:
                lock.acquire_nowait()
            except trio.WouldBlock:
                pass
            else:
                try:
                    if hop.server:
                        with contextlib.suppress(*_NETWORK_ERRORS):
                            _shutdown_now(stream)
                finally:
                    lock.release()
                hop.finish_by = trio.current_time() + self.settings.close_timeout
                self._rearm()
                return
        self._spawn(self._finish_hop, hop)

    async def _finish_hop(self, hop: _Hop) -> None:
        """``_finish`` when it has to wait: for our Close to be written, for the write lock."""
        with trio.move_on_after(self.settings.close_timeout):
            if not hop.close_sent:
                await hop.close_written.wait()
            stream = hop.stream
            if hop.server and isinstance(stream, trio.abc.HalfCloseableStream):
                lock = hop.lock
                await _acquire(lock)
                try:
                    with contextlib.suppress(*_NETWORK_ERRORS):
                        await _send_eof(stream)
                finally:
                    lock.release()
            if not hop.reader_finished:
                await hop.reader_done.wait()
        if not hop.reader_finished:
            await close_stream(hop.stream)

    # --- deadlines ---------------------------------------------------------------------------

    def _next_deadline(self) -> float:
        if self._drain_requested and not self._drained:
            return -math.inf  # now
        client, origin = self._hops
        return min(self._machine.next_deadline(), client.finish_by, origin.finish_by)

    def _rearm(self) -> None:
        """(Re)schedule this session in the run's ``_Deadlines`` for its next deadline: close
        replies, pings, pong and idle timeouts (the machine's), a drain, a finished hop's
        wait for its peer's FIN. An idle session without keepalive has none."""
        if self._nursery is None:
            return  # not started (run() arms it) or over
        deadline = self._next_deadline()
        timer = self._timer
        if timer is not None:
            if timer.deadline == deadline:
                return
            _deadlines().cancel(timer)  # superseded
            self._timer = None
        if deadline < math.inf:
            self._timer = _deadlines().schedule(self, deadline)

    def _disarm(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            _deadlines().cancel(timer)

    def _on_deadline(self, now: float) -> None:
        """A deadline of this session passed (called by the run's timer task: never raises,
        never blocks; the actions run in a task of the session's nursery)."""
        self._timer = None
        nursery = self._nursery
        if nursery is None:
            return
        machine = self._machine
        client, origin = self._hops
        actions: list[Action] = []
        if self._drain_requested and not self._drained:
            self._drained = True
            actions.extend(machine.on_drain(now))
        actions.extend(machine.on_tick(now, (client.stalled, origin.stalled)))
        for hop in self._hops:
            if hop.finish_by <= now:
                # The peer did not close its side within close_timeout of the handshake's end.
                hop.finish_by = math.inf
                if not hop.reader_finished and type(hop.stream) is trio.SocketStream:
                    hop.stream.socket.close()  # wakes the reader (close_stream, at once)
        if actions:
            # Never block the timer on a slow peer: the actions run in their own task.
            self._mark_closes(actions)
            nursery.start_soon(self._execute, actions)
        self._rearm()


class _TimerEntry:
    """A session's place in ``_Deadlines``; ``session`` is None once superseded or over (the
    entry then only waits in the heap for its time, holding nothing)."""

    __slots__ = ("deadline", "session")

    def __init__(self, session: Session, deadline: float) -> None:
        self.session: Session | None = session
        self.deadline = deadline


class _Deadlines:
    """The deadlines of every session of a trio run, served by one task (a system task started
    on first use) instead of a timer task per session: starting, parking and cancelling a task
    and its cancel scope at every close handshake cost more than the rest of the close.

    A heap of (deadline, sequence, entry). The task sleeps in a cancel scope whose deadline is
    the earliest entry's; an earlier entry moves that deadline (trio re-files it: the task is
    not woken for it). An entry superseded by a new deadline, or whose session ended, is
    cancelled: dropped at once when it is the earliest (the common case: the close handshake
    of a session that ends in time), else skipped when its time comes."""

    __slots__ = ("_heap", "_scope", "_sequence")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _TimerEntry]] = []
        self._scope: trio.CancelScope | None = None
        self._sequence = itertools.count()

    def schedule(self, session: Session, deadline: float) -> _TimerEntry:
        entry = _TimerEntry(session, deadline)
        heapq.heappush(self._heap, (deadline, next(self._sequence), entry))
        scope = self._scope
        if scope is not None and deadline < scope.deadline:
            scope.deadline = deadline
        return entry

    def cancel(self, entry: _TimerEntry) -> None:
        entry.session = None
        heap = self._heap
        if heap and heap[0][2] is entry:
            while heap and heap[0][2].session is None:
                heapq.heappop(heap)
            scope = self._scope
            if scope is not None:
                scope.deadline = heap[0][0] if heap else math.inf

    async def run(self) -> None:
        heap = self._heap
        while True:
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                entry = heapq.heappop(heap)[2]
                session = entry.session
                if session is not None:
                    entry.session = None
                    try:
                        session._on_deadline(now)
                    except Exception:  # a bug must not stop every session's timers
                        log.exception("%s: error at a session deadline", session.name)
            with trio.CancelScope(deadline=heap[0][0] if heap else math.inf) as scope:
                self._scope = scope
                await trio.sleep_forever()
            self._scope = None


_deadlines_var: trio.lowlevel.RunVar[_Deadlines] = trio.lowlevel.RunVar("proxyd_ws_deadlines")


def _deadlines() -> _Deadlines:
    try:
        return _deadlines_var.get()
    except LookupError:
        deadlines = _Deadlines()
        _deadlines_var.set(deadlines)
        trio.lowlevel.spawn_system_task(deadlines.run, name="proxyd WebSocket session deadlines")
        return deadlines


__all__ = ["RECEIVE_SIZE", "Session", "SessionSettings", "SessionStats", "close_stream"]

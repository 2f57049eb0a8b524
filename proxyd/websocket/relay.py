"""One WebSocket session: two hops relayed frame by frame, graceful close forwarding, keepalive.

How it works: ``Session.run`` opens one nursery for the session and starts a reader per hop in
it, and a timer when there is something to time. Everything the session owns lives and dies with
that nursery (Chromium's WebSocket lifetime note: once the session ends, no code path touches it
again).

- A reader takes up to 64 KiB from its hop and decodes it: ``frames.PlainDecoder`` on a hop without
  extensions (one pass per read, checked against wsproto's parser in the tests), wsproto's
  ``FrameProtocol`` with ``frames.BoundedDeflate`` on a hop with permessage-deflate (compressed
  input is fed in 4 KiB slices so each step inflates a bounded amount). Every data frame is
  re-encoded for the other hop into one ``bytearray`` with ``FrameEncoder``; the whole batch goes
  out with one ``send_all`` before the next read. That is the backpressure: a
  slow reader on one side stops us reading the other side, and memory stays at one read (plus at
  most ``_FLUSH_AT`` bytes of inflated output) per direction. Message boundaries and order are
  kept; fragment boundaries may change (RFC 6455 §5.4 lets an intermediary refragment, and each
  hop's extensions are its own). Pings are answered on the hop they came from.
- Every decision about closing is made by ``close.CloseMachine`` (pure); the session only turns
  its actions into I/O: ``SendClose`` (bounded by ``close_timeout``), ``SendPing``,
  ``FinishHop`` (FIN first where proxyd is the WebSocket server — the client hop, RFC 6455
  §7.1.1 — then read to EOF within ``close_timeout``, so closing never resets a connection with
  unread data), ``AbortHop``.
- The timer sleeps until ``CloseMachine.next_deadline()`` (close replies, pings, pong timeouts,
  the optional idle timeout) and runs whatever ``on_tick`` returns; ``drain()`` wakes it. It only
  exists while there is a deadline: an idle session without keepalive is two blocked readers.
- Writes to one hop are serialized by a per-hop lock (a reader's batch, the other reader's pongs
  and closes, the timer's pings). A batch checks ``may_send`` after taking the lock, so no data
  frame ever follows our Close on a hop.
- With keepalive on, every completed write to a hop is reported to the machine
  (``on_write_progress``): a pong clock runs from when the ping was actually written, and a slow
  reader that is still draining what we send is not taken for dead (see ``close.py``). Large
  batches go out in ``_PROGRESS_SLICE`` pieces so that progress is seen often.
- A peer that sends its Close and then half-closes (EOF) still gets our reply: its reader stops
  reading but keeps the stream open (bounded by ``close_timeout``) until the reply is written.
- When both readers have seen their hop end, the nursery is cancelled (timer, helpers), both
  streams are closed, and the outcome is counted once.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, cast

import trio
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason, ParseFailed

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
        "decoder",
        "encoder",
        "feed_step",
        "message_size",
        "messages",
        "out",
        "parsing",
        "payload_bytes",
        "pending",
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
        """Set once our Close to this hop was written (or could not be)."""
        event = self._close_written
        if event is None:
            event = self._close_written = trio.Event()
        return event

    @property
    def reader_done(self) -> trio.Event:
        """Set when this hop's reader has finished (its stream is closed)."""
        event = self._reader_done
        if event is None:
            event = self._reader_done = trio.Event()
        return event


async def _receive(stream: trio.abc.Stream) -> bytes:
    """``stream.receive_some(RECEIVE_SIZE)`` with the same semantics (a checkpoint per call;
    ``ClosedResourceError`` once the stream is closed, also while waiting, since closing a trio
    socket wakes its waiters; ``BrokenResourceError`` for a reset), but on a plain TCP stream
    with the read done here: an idle session spends its life in this wait, and trio's own path
    (the stream, its error-translating context manager, the socket's non-blocking helper) keeps
    about 1.5 KiB of coroutine frames alive per hop meanwhile. Here it is this frame and
    trio's ``wait_readable``."""
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
            data = os.read(fd, RECEIVE_SIZE)
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
        if not waited:
            # Like trio after a read that did not wait: yield, but the bytes are ours now, so
            # no cancellation may lose them.
            await trio.lowlevel.cancel_shielded_checkpoint()
        return data


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
        self._timer_scope: trio.CancelScope | None = None
        self._timer_running = False
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
        if self._timer_scope is not None:
            self._timer_scope.cancel()
        else:
            self._start_timer()

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
                nursery.start_soon(self._read_loop, self._hops[Side.CLIENT])
                nursery.start_soon(self._read_loop, self._hops[Side.ORIGIN])
                settings = self.settings
                if settings.ping_interval > 0 or settings.idle_timeout > 0 or self._drain_requested:
                    self._start_timer()
            finished = True
        finally:
            self._done = True
            self._nursery = None
            self._timer_scope = None
            with trio.CancelScope(shield=True):
                for hop in self._hops:
                    await trio.aclose_forcefully(hop.stream)
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
            if ending is Ending.EOF and (
                state is HopState.CLOSE_RECEIVED
                or (
                    hop.close_pending
                    and not hop.close_written.is_set()
                    and state is not HopState.GONE  # aborted: nothing more can be written
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
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
            hop.reader_done.set()
            self._readers_left -= 1
            if self._readers_left == 0 and self._nursery is not None:
                self._nursery.cancel_scope.cancel()

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
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            if self._machine.may_send(other.side):
                hop.stalled = True
                if not self._keepalive:
                    await other.stream.send_all(out)
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
        async with hop.lock:
            # RFC 6455 §5.5.2: pings are answered until the peer's Close, even after our own
            if self._machine.state(hop.side) > HopState.CLOSE_SENT:
                return
            try:
                await hop.stream.send_all(data)
            except _NETWORK_ERRORS:
                failed = True
            else:
                if self._keepalive:
                    self._machine.on_write_progress(hop.side, trio.current_time())
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
                self._spawn(self._finish_hop, hop)
            elif type(action) is AbortHop:
                await trio.aclose_forcefully(hop.stream)
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
        with trio.move_on_after(self.settings.close_timeout):
            async with hop.lock:
                try:
                    await hop.stream.send_all(frame)
                    sent = True
                except _NETWORK_ERRORS:
                    pass
        hop.close_written.set()
        if not sent:
            await self._execute(self._machine.on_send_failed(hop.side, trio.current_time()))

    async def _send_ping(self, hop: _Hop) -> None:
        frame = bytearray()
        hop.encoder.ping(frame, _PING_PAYLOAD)
        async with hop.lock:
            if self._machine.state(hop.side) is not HopState.OPEN:
                return
            try:
                await hop.stream.send_all(frame)
            except _NETWORK_ERRORS:
                return  # the reader sees the broken connection
            # The pong clock runs from now, not from when the ping was due: this write may have
            # waited for the lock behind a batch to a slow reader (close.py, keepalive).
            self._machine.on_write_progress(hop.side, trio.current_time())
        if self._metrics is not None:
            self._metrics.ws_pings.inc()

    async def _finish_hop(self, hop: _Hop) -> None:
        """TCP close after the hop's closing handshake (see the module docstring)."""
        with trio.move_on_after(self.settings.close_timeout):
            await hop.close_written.wait()
            stream = hop.stream
            if hop.server and isinstance(stream, trio.abc.HalfCloseableStream):
                async with hop.lock:
                    with contextlib.suppress(*_NETWORK_ERRORS):
                        await stream.send_eof()
            await hop.reader_done.wait()
        if not hop.reader_done.is_set():
            await trio.aclose_forcefully(hop.stream)

    # --- the timer ---------------------------------------------------------------------------

    def _rearm(self) -> None:
        scope = self._timer_scope
        if scope is not None:
            scope.deadline = self._machine.next_deadline()
        elif self._machine.next_deadline() < math.inf:
            self._start_timer()

    def _start_timer(self) -> None:
        """The timer task runs only while there is a deadline (or a drain) to serve: an idle
        session without keepalive is two blocked readers and nothing else."""
        if self._timer_running or self._nursery is None:
            return
        self._timer_running = True
        self._nursery.start_soon(self._timer_loop)

    async def _timer_loop(self) -> None:
        machine = self._machine
        client, origin = self._hops
        while True:
            if machine.next_deadline() == math.inf and (not self._drain_requested or self._drained):
                self._timer_running = False
                return
            with trio.move_on_at(machine.next_deadline()) as scope:
                self._timer_scope = scope
                if not self._drain_requested or self._drained:
                    await trio.sleep_forever()
            self._timer_scope = None
            now = trio.current_time()
            actions: list[Action] = []
            if self._drain_requested and not self._drained:
                self._drained = True
                actions.extend(machine.on_drain(now))
            actions.extend(machine.on_tick(now, (client.stalled, origin.stalled)))
            if actions:
                # Never block the timer on a slow peer: the actions run in their own task.
                assert self._nursery is not None
                self._mark_closes(actions)
                self._nursery.start_soon(self._execute, actions)


__all__ = ["RECEIVE_SIZE", "Session", "SessionSettings", "SessionStats"]

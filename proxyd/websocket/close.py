"""Close-code policy and the timing state machine of one WebSocket session (pure: no I/O, no
clock; ``now`` comes in as an argument).

A session has two hops: CLIENT (proxyd is the WebSocket server there) and ORIGIN (proxyd is the
client). The relay feeds ``CloseMachine`` what happened — a Close frame arrived, a side vanished,
a side broke the protocol, a send failed, the daemon drains, time passed — and gets back a list of
actions to carry out in order: ``SendClose``, ``SendPing``, ``FinishHop`` (the closing handshake on
that hop is over: close its TCP connection, the server side first) and ``AbortHop`` (close it now).
Data frames never go through the machine; the relay only asks ``may_send(side)`` before a batch.

States of one hop, as proxyd sees it::

    OPEN ──peer's Close──> CLOSE_RECEIVED ──we reply──> CLOSED ──> FinishHop
      │                                                   ^
      └──we send Close──> CLOSE_SENT ──peer's Close───────┘
    any open state ──EOF/reset/failed send──> GONE   (AbortHop: nothing can be sent any more)
    any open state ──protocol error/timeout──> FAILED (our Close if we owe one, then FinishHop)

Graceful close forwarding (RFC 6455 §5.5.1, §7.1.2; the gorilla/websocket discussion):

- A Close from side P while the other side Q is open is forwarded to Q with the same code and
  reason (no code when P sent none: RFC 6455 §7.1.5 reports that as 1005, which must never be
  sent, §7.4.1). P is now CLOSE_RECEIVED: proxyd owes P a reply, and Q may go on sending data to
  P (Q has not closed yet). Q's own Close is the reply: it completes Q's handshake and is forwarded
  to P, completing P's. Both hops are then CLOSED and their TCP connections end with FIN.
- Every wait for a reply is bounded by ``close_timeout``. A side that does not reply in time, or
  vanishes, or breaks the protocol while the other side waits for its reply, is answered for:
  the waiting side gets a Close that says what happened.

What the other side is told when one side ends without a clean Close (``policy`` functions):

============================  ==========  ================================================
how side P ended              to P        to the other side Q
============================  ==========  ================================================
Close (code, reason)          -           the same code and reason (none stays none)
EOF without Close             -           1001 "<P> went away"
connection reset              -           1011 "<P> connection was reset"
protocol error                1002/1007   1001 "<P> broke the WebSocket protocol"
message over the size limit   1009        1001 "<P> sent a message over N bytes"
no pong within pong_timeout   (aborted)   1011 "<P> did not answer a ping within Ns"
no Close reply in time        (aborted)   1011 "<P> did not complete the closing handshake"
daemon draining               1001        1001 "proxy shutting down"
session idle (idle_timeout)   1001        1001 "session idle for Ns"
============================  ==========  ================================================

The outcome of the session is its first cause (``Outcome``); a session where nothing went wrong
is ``clean``. EOF after a side sent its Close is not a vanishing: that side did its part.
EOF after a side's Close with our reply still owed is a half-close (the peer did
``shutdown(SHUT_WR)``): the hop stays CLOSE_RECEIVED, so the reply is still written (RFC 6455
§5.5.1: the endpoint that received a Close sends one back); the other side's reply deadline bounds
the wait. A reset there cannot be written to: the hop is GONE.

Keepalive (``ping_interval`` > 0): each open hop gets a ping every interval; a hop that does not
answer within ``pong_timeout`` is dead — with two excuses, each restarting the clock:

- its reader is stalled forwarding to the other side (its pong is queued behind data we are not
  reading);
- our writes to it make progress (``on_write_progress``: the ping itself was written, or a batch
  for it went out). A slow but live reader drains what we send; our ping to it may wait for the
  hop's write lock and then sit behind megabytes of socket buffer, so its pong can be late by far
  more than ``pong_timeout``. Progress is what a dead peer cannot fake: once it stops reading,
  the buffers fill, our writes block, and the clock runs out ``pong_timeout`` after the last one.
  (Excusing a *blocked* write instead would keep a dead peer alive forever.)
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Final


class Side(enum.IntEnum):
    CLIENT = 0
    ORIGIN = 1

    @property
    def other(self) -> Side:
        return Side.ORIGIN if self is Side.CLIENT else Side.CLIENT

    @property
    def label(self) -> str:
        return "client" if self is Side.CLIENT else "origin"


class HopState(enum.IntEnum):
    OPEN = 0
    #: The peer sent its Close; our reply is owed (data may still be sent to the peer).
    CLOSE_RECEIVED = 1
    #: We sent our Close; the peer's is awaited (no more data goes to the peer).
    CLOSE_SENT = 2
    #: Both Closes exchanged on this hop.
    CLOSED = 3
    #: Given up on the handshake (peer's protocol error, no reply in time); our Close was sent
    #: when we owed one.
    FAILED = 4
    #: The TCP connection is gone (EOF, reset, failed send): nothing more can be sent.
    GONE = 5


class Ending(enum.Enum):
    EOF = "eof"
    RESET = "reset"


class Outcome(enum.StrEnum):
    CLEAN = "clean"
    PEER_VANISHED = "peer_vanished"
    PROTOCOL_ERROR = "protocol_error"
    TOO_BIG = "too_big"
    TIMEOUT = "timeout"
    DRAINED = "drained"
    #: Cancelled from outside before it could end (the shutdown timeout ran out).
    ABORTED = "aborted"


# RFC 6455 §7.4.1
NORMAL: Final = 1000
GOING_AWAY: Final = 1001
PROTOCOL_ERROR: Final = 1002
NO_STATUS: Final = 1005
ABNORMAL: Final = 1006
INVALID_DATA: Final = 1007
TOO_BIG: Final = 1009
INTERNAL_ERROR: Final = 1011
TLS_FAILED: Final = 1015
#: Codes that only report a condition locally and are never put in a Close frame.
RESERVED_LOCAL: Final = frozenset({NO_STATUS, ABNORMAL, TLS_FAILED})


@dataclass(frozen=True, slots=True)
class SendClose:
    side: Side
    #: None: a Close frame without a code (and without a reason).
    code: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class SendPing:
    side: Side


@dataclass(frozen=True, slots=True)
class FinishHop:
    """The closing handshake on this hop is over: FIN (proxyd first where it is the server,
    RFC 6455 §7.1.1), read to EOF within ``close_timeout``, close."""

    side: Side


@dataclass(frozen=True, slots=True)
class AbortHop:
    """Close this hop's TCP connection now: its peer is gone or dead."""

    side: Side


Action = SendClose | SendPing | FinishHop | AbortHop


# --- policy: what goes on the wire -------------------------------------------------------------


def wire_close(code: int | None, reason: str) -> tuple[int | None, str]:
    """A received close status as it may be forwarded: no code (1005) stays no code and loses
    any reason; the other local-only codes never reach the wire (RFC 6455 §7.4.1)."""
    if code is None or code == NO_STATUS:
        return None, ""
    if code == ABNORMAL:
        return GOING_AWAY, reason
    if code == TLS_FAILED:
        return INTERNAL_ERROR, reason
    return int(code), reason


def vanished_close(side: Side, ending: Ending) -> tuple[int, str]:
    if ending is Ending.EOF:
        return GOING_AWAY, f"{side.label} went away"
    return INTERNAL_ERROR, f"{side.label} connection was reset"


def code_label(code: int | None) -> str:
    """A bounded metric label: each code of RFC 6455 §7.4.1 and the IANA registry (1000-1015),
    ``3xxx`` (libraries), ``4xxx`` (applications), ``other``. No code counts as 1005."""
    if code is None:
        return "1005"
    if 1000 <= code <= 1015:
        return str(code)
    if 3000 <= code <= 3999:
        return "3xxx"
    if 4000 <= code <= 4999:
        return "4xxx"
    return "other"


# --- the machine -------------------------------------------------------------------------------


class _Hop:
    __slots__ = ("ping_due", "ping_sent", "reply_deadline", "state")

    def __init__(self) -> None:
        self.state = HopState.OPEN
        #: When the peer's Close reply is due (CLOSE_SENT only).
        self.reply_deadline: float | None = None
        self.ping_due: float | None = None
        self.ping_sent: float | None = None


class CloseMachine:
    """The closing handshakes and timers of one session (see the module docstring)."""

    __slots__ = (
        "_hops",
        "close_timeout",
        "first_code",
        "idle_timeout",
        "initiator",
        "last_activity",
        "outcome",
        "ping_interval",
        "pong_timeout",
        "pong_timeouts",
    )

    def __init__(
        self,
        *,
        now: float,
        close_timeout: float,
        ping_interval: float = 0.0,
        pong_timeout: float = 20.0,
        idle_timeout: float = 0.0,
    ) -> None:
        self.close_timeout = close_timeout
        self.ping_interval = ping_interval
        self.pong_timeout = pong_timeout
        self.idle_timeout = idle_timeout
        self._hops = (_Hop(), _Hop())
        if ping_interval > 0:
            for hop in self._hops:
                hop.ping_due = now + ping_interval
        #: The relay sets this on traffic when idle_timeout is on.
        self.last_activity = now
        #: First cause of the session's end (None while nothing went wrong).
        self.outcome: Outcome | None = None
        #: Who sent the first Close of the session ("client", "origin", "proxy") and its code.
        self.initiator: str | None = None
        self.first_code: int | None = None
        self.pong_timeouts = 0

    # --- queries ----------------------------------------------------------------------------

    def state(self, side: Side) -> HopState:
        return self._hops[side].state

    def may_send(self, side: Side) -> bool:
        """Data (and pongs) may go to ``side``: we have not sent it our Close."""
        return self._hops[side].state <= HopState.CLOSE_RECEIVED

    def is_closing(self, side: Side) -> bool:
        """The hop's handshake is over or given up: its reader only waits for EOF now."""
        return self._hops[side].state >= HopState.CLOSED

    @property
    def final_outcome(self) -> Outcome:
        return self.outcome or Outcome.CLEAN

    def next_deadline(self) -> float:
        """The earliest time ``on_tick`` has something to do (inf: none)."""
        deadline = math.inf
        both_open = self._both_open()
        for hop in self._hops:
            if hop.reply_deadline is not None:
                deadline = min(deadline, hop.reply_deadline)
            if both_open:
                if hop.ping_sent is not None:
                    deadline = min(deadline, hop.ping_sent + self.pong_timeout)
                elif hop.ping_due is not None:
                    deadline = min(deadline, hop.ping_due)
        if self.idle_timeout > 0 and both_open:
            deadline = min(deadline, self.last_activity + self.idle_timeout)
        return deadline

    # --- events -----------------------------------------------------------------------------

    def on_close_received(
        self, side: Side, code: int | None, reason: str, now: float
    ) -> list[Action]:
        """``side`` sent a Close frame (``code`` None or 1005: it carried no code)."""
        code, reason = wire_close(code, reason)
        hop = self._hops[side]
        other = side.other
        peer = self._hops[other]
        actions: list[Action] = []
        if hop.state is HopState.OPEN:
            hop.state = HopState.CLOSE_RECEIVED
            self._note_first(side.label, code)
            if peer.state is HopState.OPEN:
                # Forward it; the other side's own Close will be the reply we owe.
                self._send_close(other, code, reason, now, actions)
            elif peer.state is not HopState.CLOSE_SENT:
                # Nobody left to reply for this side: echo its code (RFC 6455 §5.5.1).
                self._reply(side, code, reason, actions)
        elif hop.state is HopState.CLOSE_SENT:
            hop.state = HopState.CLOSED
            hop.reply_deadline = None
            actions.append(FinishHop(side))
            if peer.state is HopState.CLOSE_RECEIVED:
                self._reply(other, code, reason, actions)
        return actions

    def on_vanished(self, side: Side, ending: Ending, now: float) -> list[Action]:
        """``side``'s TCP connection ended (EOF or reset) before its handshake was complete."""
        hop = self._hops[side]
        prior = hop.state
        if prior >= HopState.CLOSED:
            return []
        hop.reply_deadline = None
        if prior is HopState.CLOSE_RECEIVED:
            # It sent its Close and left: its part is done. After EOF (a half-close) our reply
            # can still be written (RFC 6455 §5.5.1); the other side's reply deadline, or its
            # end, brings it. After a reset there is nobody to write to.
            if ending is Ending.EOF:
                return []
            hop.state = HopState.GONE
            return [AbortHop(side)]
        hop.state = HopState.GONE
        actions: list[Action] = [AbortHop(side)]
        self._note_outcome(Outcome.PEER_VANISHED)
        code, reason = vanished_close(side, ending)
        self._tell_other(side, code, reason, now, actions)
        return actions

    def on_send_failed(self, side: Side, now: float) -> list[Action]:
        """A write to ``side`` failed or timed out: the hop is unusable."""
        hop = self._hops[side]
        if hop.state is HopState.GONE:
            return []
        if hop.state >= HopState.CLOSED:
            hop.state = HopState.GONE
            return [AbortHop(side)]
        return self.on_vanished(side, Ending.RESET, now)

    def on_protocol_error(self, side: Side, code: int, reason: str, now: float) -> list[Action]:
        """``side`` broke RFC 6455 (``code`` 1002 or 1007) or sent a message over the size
        limit (1009): close it with that code, and the other side with 1001."""
        hop = self._hops[side]
        if hop.state >= HopState.CLOSED:
            return []
        code = wire_close(code, reason)[0] or PROTOCOL_ERROR  # never a local-only code
        too_big = code == TOO_BIG
        self._note_outcome(Outcome.TOO_BIG if too_big else Outcome.PROTOCOL_ERROR)
        actions: list[Action] = []
        if hop.state <= HopState.CLOSE_RECEIVED:
            self._note_first("proxy", code)
            actions.append(SendClose(side, code, reason))
        hop.state = HopState.FAILED
        hop.reply_deadline = None
        actions.append(FinishHop(side))
        if too_big:
            told = f"{side.label} sent a message larger than the limit"
        else:
            told = f"{side.label} broke the WebSocket protocol"
        self._tell_other(side, GOING_AWAY, told, now, actions)
        return actions

    def on_drain(self, now: float) -> list[Action]:
        """The daemon drains: 1001 to every hop still open; handshakes already under way go on."""
        actions: list[Action] = []
        for side in Side:
            if self._hops[side].state is HopState.OPEN:
                self._note_outcome(Outcome.DRAINED)
                self._note_first("proxy", GOING_AWAY)
                self._send_close(side, GOING_AWAY, "proxy shutting down", now, actions)
        return actions

    def on_pong(self, side: Side) -> None:
        self._hops[side].ping_sent = None

    def on_write_progress(self, side: Side, now: float) -> None:
        """A write to ``side`` completed (our ping, or a batch): a ping outstanding there gets
        ``pong_timeout`` from now (see the module docstring: slow but live readers)."""
        hop = self._hops[side]
        if hop.ping_sent is not None:
            hop.ping_sent = now

    def on_tick(self, now: float, stalled: tuple[bool, bool] = (False, False)) -> list[Action]:
        """Act on every deadline that has passed. ``stalled[side]``: that side's reader is
        blocked forwarding to the other side (its pong may be waiting unread behind data)."""
        actions: list[Action] = []
        for side in Side:
            hop = self._hops[side]
            if hop.reply_deadline is not None and now >= hop.reply_deadline:
                actions.extend(self._reply_timed_out(side, now))
        if not self._both_open():
            return actions
        if self.idle_timeout > 0 and now >= self.last_activity + self.idle_timeout:
            self._note_outcome(Outcome.TIMEOUT)
            self._note_first("proxy", GOING_AWAY)
            reason = f"session idle for {self.idle_timeout:g}s"
            for side in Side:
                self._send_close(side, GOING_AWAY, reason, now, actions)
            return actions
        for side in Side:
            hop = self._hops[side]
            if hop.ping_sent is not None:
                if now < hop.ping_sent + self.pong_timeout:
                    continue
                if stalled[side]:
                    hop.ping_sent = now  # not its fault: we are not reading it
                    continue
                self.pong_timeouts += 1
                actions.extend(self._dead(side, now))
                return actions
            if hop.ping_due is not None and now >= hop.ping_due:
                hop.ping_sent = now
                hop.ping_due = now + self.ping_interval
                actions.append(SendPing(side))
        return actions

    # --- helpers ----------------------------------------------------------------------------

    def _both_open(self) -> bool:
        return self._hops[0].state is HopState.OPEN and self._hops[1].state is HopState.OPEN

    def _note_outcome(self, outcome: Outcome) -> None:
        if self.outcome is None:
            self.outcome = outcome

    def _note_first(self, initiator: str, code: int | None) -> None:
        if self.initiator is None:
            self.initiator = initiator
            self.first_code = code

    def _send_close(
        self, side: Side, code: int | None, reason: str, now: float, actions: list[Action]
    ) -> None:
        """Our Close to an OPEN hop: now we wait (bounded) for its reply."""
        hop = self._hops[side]
        hop.state = HopState.CLOSE_SENT
        hop.reply_deadline = now + self.close_timeout
        actions.append(SendClose(side, code, reason))

    def _reply(self, side: Side, code: int | None, reason: str, actions: list[Action]) -> None:
        """The Close we owe a CLOSE_RECEIVED hop: its handshake is complete."""
        self._hops[side].state = HopState.CLOSED
        actions.append(SendClose(side, code, reason))
        actions.append(FinishHop(side))

    def _tell_other(
        self, side: Side, code: int, reason: str, now: float, actions: list[Action]
    ) -> None:
        """``side`` is finished without a clean Close: tell the other side, whether it is still
        open (our Close starts its handshake) or waiting for a reply from ``side``."""
        other = side.other
        state = self._hops[other].state
        if state is HopState.OPEN:
            self._note_first("proxy", code)
            self._send_close(other, code, reason, now, actions)
        elif state is HopState.CLOSE_RECEIVED:
            self._reply(other, code, reason, actions)

    def _reply_timed_out(self, side: Side, now: float) -> list[Action]:
        hop = self._hops[side]
        hop.state = HopState.FAILED
        hop.reply_deadline = None
        self._note_outcome(Outcome.TIMEOUT)
        actions: list[Action] = [AbortHop(side)]
        reason = (
            f"{side.label} did not complete the closing handshake within {self.close_timeout:g}s"
        )
        self._tell_other(side, INTERNAL_ERROR, reason, now, actions)
        return actions

    def _dead(self, side: Side, now: float) -> list[Action]:
        """No pong in time: the hop is dead; the live side hears 1011."""
        hop = self._hops[side]
        hop.state = HopState.GONE
        self._note_outcome(Outcome.TIMEOUT)
        actions: list[Action] = [AbortHop(side)]
        reason = f"{side.label} did not answer a ping within {self.pong_timeout:g}s"
        self._tell_other(side, INTERNAL_ERROR, reason, now, actions)
        return actions


__all__ = [
    "RESERVED_LOCAL",
    "AbortHop",
    "Action",
    "CloseMachine",
    "Ending",
    "FinishHop",
    "HopState",
    "Outcome",
    "SendClose",
    "SendPing",
    "Side",
    "code_label",
    "vanished_close",
    "wire_close",
]

"""The close policy and timing state machine (pure): tables of events -> expected actions.

Each scenario is a script of events fed to ``CloseMachine`` with explicit times; the actions it
returns are compared exactly, so the order matters too (a Close before the FIN of its hop).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
    vanished_close,
    wire_close,
)

C = Side.CLIENT
O = Side.ORIGIN  # noqa: E741


def machine(**kwargs: Any) -> CloseMachine:
    options: dict[str, Any] = {"now": 0.0, "close_timeout": 5.0}
    options.update(kwargs)
    return CloseMachine(**options)


# --- policy -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "reason", "expected"),
    [
        (1000, "done", (1000, "done")),
        (4001, "bye", (4001, "bye")),
        (3000, "", (3000, "")),
        (None, "", (None, "")),
        (1005, "", (None, "")),  # no code received: none forwarded
        (1006, "x", (1001, "x")),  # local-only codes never reach the wire
        (1015, "x", (1011, "x")),
    ],
)
def test_wire_close(code: int | None, reason: str, expected: tuple[int | None, str]) -> None:
    assert wire_close(code, reason) == expected


def test_vanished_codes_name_the_side() -> None:
    assert vanished_close(O, Ending.EOF) == (1001, "origin went away")
    assert vanished_close(C, Ending.RESET) == (1011, "client connection was reset")


@pytest.mark.parametrize(
    ("code", "label"),
    [
        (None, "1005"),
        (1000, "1000"),
        (1009, "1009"),
        (1015, "1015"),
        (1016, "other"),
        (2999, "other"),
        (3001, "3xxx"),
        (4001, "4xxx"),
        (4999, "4xxx"),
        (5000, "other"),
    ],
)
def test_code_labels_are_bounded(code: int | None, label: str) -> None:
    assert code_label(code) == label


# --- graceful close forwarding ----------------------------------------------------------------


@pytest.mark.parametrize("first", [C, O])
def test_clean_close_is_forwarded_both_ways(first: Side) -> None:
    """P's Close goes to Q with code and reason; Q's reply goes back to P; both hops finish."""
    m = machine()
    other = first.other
    assert m.on_close_received(first, 4001, "bye", 1.0) == [SendClose(other, 4001, "bye")]
    assert m.state(first) is HopState.CLOSE_RECEIVED
    assert m.state(other) is HopState.CLOSE_SENT
    # Q may still send data to P until Q's own Close; nothing more goes to Q.
    assert m.may_send(first)
    assert not m.may_send(other)
    assert m.next_deadline() == 6.0
    assert m.on_close_received(other, 4001, "bye", 2.0) == [
        FinishHop(other),
        SendClose(first, 4001, "bye"),
        FinishHop(first),
    ]
    assert m.state(C) is HopState.CLOSED and m.state(O) is HopState.CLOSED
    assert m.next_deadline() == math.inf
    assert m.final_outcome is Outcome.CLEAN
    assert (m.initiator, m.first_code) == (first.label, 4001)


def test_reply_with_another_code_is_forwarded_as_is() -> None:
    m = machine()
    m.on_close_received(O, 1001, "restart", 0.0)
    assert m.on_close_received(C, 1000, "ok", 0.5) == [
        FinishHop(C),
        SendClose(O, 1000, "ok"),
        FinishHop(O),
    ]


def test_close_without_code_is_forwarded_without_code() -> None:
    m = machine()
    assert m.on_close_received(C, 1005, "", 0.0) == [SendClose(O, None, "")]
    assert m.on_close_received(O, None, "", 0.1)[1] == SendClose(C, None, "")
    assert m.first_code is None


def test_crossing_closes_complete_both_handshakes() -> None:
    """Both sides close at once: each Close is the other's reply."""
    m = machine()
    assert m.on_close_received(C, 1000, "a", 0.0) == [SendClose(O, 1000, "a")]
    # The origin's own Close crossed ours on the wire: it completes its hop and is our reply.
    assert m.on_close_received(O, 1001, "b", 0.0) == [
        FinishHop(O),
        SendClose(C, 1001, "b"),
        FinishHop(C),
    ]
    assert m.final_outcome is Outcome.CLEAN


def test_close_reply_timeout_answers_the_waiting_side_with_1011() -> None:
    m = machine(close_timeout=2.0)
    m.on_close_received(C, 1000, "", 10.0)
    assert m.on_tick(11.9) == []
    assert m.on_tick(12.0) == [
        AbortHop(O),
        SendClose(C, 1011, "origin did not complete the closing handshake within 2s"),
        FinishHop(C),
    ]
    assert m.final_outcome is Outcome.TIMEOUT
    assert m.next_deadline() == math.inf


# --- vanished sides ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("side", "ending", "code", "reason"),
    [
        (C, Ending.EOF, 1001, "client went away"),
        (C, Ending.RESET, 1011, "client connection was reset"),
        (O, Ending.EOF, 1001, "origin went away"),
        (O, Ending.RESET, 1011, "origin connection was reset"),
    ],
)
def test_a_vanished_side_is_reported_to_the_other(
    side: Side, ending: Ending, code: int, reason: str
) -> None:
    m = machine()
    assert m.on_vanished(side, ending, 3.0) == [AbortHop(side), SendClose(side.other, code, reason)]
    assert m.state(side) is HopState.GONE
    assert m.final_outcome is Outcome.PEER_VANISHED
    assert (m.initiator, m.first_code) == ("proxy", code)
    # The live side's reply completes its handshake; nothing goes to the vanished side.
    assert m.on_close_received(side.other, code, reason, 3.1) == [FinishHop(side.other)]


def test_vanishing_while_the_other_waits_for_its_reply() -> None:
    """The origin closed; we forwarded to the client, which vanished instead of replying."""
    m = machine()
    m.on_close_received(O, 4000, "x", 0.0)
    assert m.on_vanished(C, Ending.EOF, 0.5) == [
        AbortHop(C),
        SendClose(O, 1001, "client went away"),
        FinishHop(O),
    ]
    assert m.final_outcome is Outcome.PEER_VANISHED


def test_eof_after_its_own_close_is_not_a_vanishing() -> None:
    """A client that sends Close and half-closes at once did its part: still clean, and it
    still gets the reply (RFC 6455 §5.5.1; EOF is only its write side ending)."""
    m = machine()
    m.on_close_received(C, 1000, "", 0.0)
    assert m.on_vanished(C, Ending.EOF, 0.1) == []
    assert m.state(C) is HopState.CLOSE_RECEIVED
    assert m.on_close_received(O, 1000, "", 0.2) == [
        FinishHop(O),
        SendClose(C, 1000, ""),
        FinishHop(C),
    ]
    assert m.final_outcome is Outcome.CLEAN


def test_reset_after_its_own_close_is_not_a_vanishing_but_gets_no_reply() -> None:
    m = machine()
    m.on_close_received(C, 1000, "", 0.0)
    assert m.on_vanished(C, Ending.RESET, 0.1) == [AbortHop(C)]
    assert m.on_close_received(O, 1000, "", 0.2) == [FinishHop(O)]
    assert m.final_outcome is Outcome.CLEAN


def test_eof_after_the_handshake_is_ignored() -> None:
    m = machine()
    m.on_close_received(C, 1000, "", 0.0)
    m.on_close_received(O, 1000, "", 0.0)
    assert m.on_vanished(O, Ending.EOF, 0.1) == []
    assert m.on_vanished(C, Ending.RESET, 0.1) == []


def test_a_failed_send_counts_as_a_reset() -> None:
    m = machine()
    assert m.on_send_failed(O, 1.0) == [
        AbortHop(O),
        SendClose(C, 1011, "origin connection was reset"),
    ]
    assert m.on_send_failed(O, 1.0) == []  # idempotent


def test_a_failed_send_after_the_handshake_only_aborts() -> None:
    m = machine()
    m.on_close_received(C, 1000, "", 0.0)
    m.on_close_received(O, 1000, "", 0.0)
    assert m.on_send_failed(C, 0.1) == [AbortHop(C)]
    assert m.final_outcome is Outcome.CLEAN


# --- protocol errors and size limits ----------------------------------------------------------


@pytest.mark.parametrize(("side", "code"), [(C, 1002), (O, 1002), (C, 1007), (O, 1007)])
def test_protocol_error_closes_that_side_with_its_code_and_the_other_with_1001(
    side: Side, code: int
) -> None:
    m = machine()
    assert m.on_protocol_error(side, code, "bad frame", 0.0) == [
        SendClose(side, code, "bad frame"),
        FinishHop(side),
        SendClose(side.other, 1001, f"{side.label} broke the WebSocket protocol"),
    ]
    assert m.final_outcome is Outcome.PROTOCOL_ERROR
    assert (m.initiator, m.first_code) == ("proxy", code)
    assert not m.may_send(side) and not m.may_send(side.other)


def test_oversized_message_closes_with_1009_and_1001() -> None:
    m = machine()
    assert m.on_protocol_error(O, 1009, "too big", 0.0) == [
        SendClose(O, 1009, "too big"),
        FinishHop(O),
        SendClose(C, 1001, "origin sent a message larger than the limit"),
    ]
    assert m.final_outcome is Outcome.TOO_BIG


def test_protocol_error_while_the_other_waits_for_a_reply() -> None:
    m = machine()
    m.on_close_received(C, 1000, "bye", 0.0)  # forwarded to the origin
    assert m.on_protocol_error(O, 1002, "junk", 0.1) == [
        FinishHop(O),  # we already sent it our Close: no second one
        SendClose(C, 1001, "origin broke the WebSocket protocol"),
        FinishHop(C),
    ]


# --- drain ------------------------------------------------------------------------------------


def test_drain_sends_1001_to_both_and_waits_for_the_replies() -> None:
    m = machine(close_timeout=3.0)
    assert m.on_drain(1.0) == [
        SendClose(C, 1001, "proxy shutting down"),
        SendClose(O, 1001, "proxy shutting down"),
    ]
    assert m.on_drain(1.5) == []  # idempotent
    assert m.next_deadline() == 4.0
    assert m.on_close_received(O, 1001, "", 2.0) == [FinishHop(O)]
    assert m.on_close_received(C, 1000, "", 2.0) == [FinishHop(C)]
    assert m.final_outcome is Outcome.DRAINED
    assert (m.initiator, m.first_code) == ("proxy", 1001)


def test_drain_leaves_a_closing_handshake_under_way_alone() -> None:
    m = machine()
    m.on_close_received(C, 4001, "bye", 0.0)
    assert m.on_drain(0.1) == []
    assert m.on_close_received(O, 4001, "bye", 0.2)[1] == SendClose(C, 4001, "bye")
    assert m.final_outcome is Outcome.CLEAN


# --- keepalive and idle -----------------------------------------------------------------------


def test_pings_go_to_both_sides_every_interval() -> None:
    m = machine(ping_interval=10.0, pong_timeout=4.0)
    assert m.next_deadline() == 10.0
    assert m.on_tick(9.0) == []
    assert m.on_tick(10.0) == [SendPing(C), SendPing(O)]
    assert m.next_deadline() == 14.0
    m.on_pong(C)
    m.on_pong(O)
    assert m.next_deadline() == 20.0
    assert m.on_tick(20.0) == [SendPing(C), SendPing(O)]


def test_no_pong_in_time_ends_the_dead_side_and_tells_the_live_one_1011() -> None:
    m = machine(ping_interval=10.0, pong_timeout=4.0)
    m.on_tick(10.0)
    m.on_pong(C)
    assert m.on_tick(14.0) == [
        AbortHop(O),
        SendClose(C, 1011, "origin did not answer a ping within 4s"),
    ]
    assert m.final_outcome is Outcome.TIMEOUT
    assert m.pong_timeouts == 1


def test_a_stalled_reader_is_not_blamed_for_a_late_pong() -> None:
    """Its pong may wait unread behind data we cannot forward: the clock restarts."""
    m = machine(ping_interval=10.0, pong_timeout=4.0)
    m.on_tick(10.0)
    m.on_pong(O)
    assert m.on_tick(14.0, stalled=(True, False)) == []
    assert m.next_deadline() == 18.0
    assert m.on_tick(18.0)[0] == AbortHop(C)


def test_no_pings_without_interval_and_none_while_closing() -> None:
    assert machine().next_deadline() == math.inf
    m = machine(ping_interval=1.0)
    m.on_close_received(C, 1000, "", 0.5)
    assert m.on_tick(5.0) == []  # no pings once a side is closing
    assert m.next_deadline() == 5.5  # only the close timeout is left
    assert m.on_tick(5.5)[0] == AbortHop(O)


def test_idle_timeout_closes_both_sides_with_1001() -> None:
    m = machine(idle_timeout=30.0)
    m.last_activity = 20.0
    assert m.next_deadline() == 50.0
    assert m.on_tick(40.0) == []
    assert m.on_tick(50.0) == [
        SendClose(C, 1001, "session idle for 30s"),
        SendClose(O, 1001, "session idle for 30s"),
    ]
    assert m.final_outcome is Outcome.TIMEOUT


def test_no_idle_timeout_by_default() -> None:
    m = machine()
    assert m.on_tick(1e9) == []


def test_the_first_cause_is_the_outcome() -> None:
    m = machine()
    m.on_drain(0.0)
    m.on_vanished(C, Ending.RESET, 0.1)
    actions: list[Action] = m.on_tick(10.0)
    assert actions == [AbortHop(O)]
    assert m.final_outcome is Outcome.DRAINED


# --- invariants over any sequence of events ---------------------------------------------------

_sides = st.sampled_from([C, O])
_events = st.one_of(
    st.tuples(st.just("close"), _sides, st.sampled_from([None, 1000, 1005, 1006, 1015, 4001])),
    st.tuples(st.just("vanish"), _sides, st.sampled_from([Ending.EOF, Ending.RESET])),
    st.tuples(st.just("error"), _sides, st.sampled_from([1002, 1007, 1009, 1006])),
    st.tuples(st.just("send_failed"), _sides, st.none()),
    st.tuples(st.just("drain"), st.none(), st.none()),
    st.tuples(st.just("pong"), _sides, st.none()),
    st.tuples(st.just("progress"), _sides, st.none()),
    st.tuples(st.just("tick"), st.none(), st.none()),
)


@settings(max_examples=500, deadline=None)
@given(events=st.lists(_events, max_size=12))
def test_machine_invariants(events: list[tuple[str, Any, Any]]) -> None:
    """Whatever happens: reserved codes never reach the wire, each hop gets at most one Close
    from us and only while it may still receive, and ticking long enough ends every handshake."""
    m = machine(close_timeout=1.0, ping_interval=2.0, pong_timeout=1.0)
    now = 0.0
    closes = {C: 0, O: 0}

    def apply(actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SendClose):
                assert action.code not in (1005, 1006, 1015)
                assert action.code is not None or action.reason == ""
                closes[action.side] += 1
                assert closes[action.side] == 1, f"a second Close to {action.side}"

    for kind, side, value in events:
        now += 0.4
        before = {s: m.may_send(s) for s in (C, O)}
        if kind == "close":
            actions = m.on_close_received(side, value, "r" if value else "", now)
        elif kind == "vanish":
            actions = m.on_vanished(side, value, now)
        elif kind == "error":
            actions = m.on_protocol_error(side, value, "bad", now)
        elif kind == "send_failed":
            actions = m.on_send_failed(side, now)
        elif kind == "drain":
            actions = m.on_drain(now)
        elif kind == "pong":
            m.on_pong(side)
            actions = []
        elif kind == "progress":
            m.on_write_progress(side, now)
            actions = []
        else:
            actions = m.on_tick(now)
        for action in actions:
            if isinstance(action, SendClose):
                assert before[action.side], "a Close to a hop we had already closed"
        apply(actions)
    # With nothing else happening, time alone ends every wait.
    for _ in range(10):
        now += 1.0
        apply(m.on_tick(now))
    if m.state(C) is not HopState.OPEN or m.state(O) is not HopState.OPEN:
        assert m.next_deadline() == math.inf
        assert all(m.state(side) is not HopState.CLOSE_SENT for side in (C, O))

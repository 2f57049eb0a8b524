"""Pool bookkeeping as tables of events -> decisions (pure, no sockets, explicit time)."""

from __future__ import annotations

from proxyd.upstream.pool_state import Limits, PoolState

A, B = ("http", "a.test", 80, "DIRECT"), ("http", "b.test", 80, "DIRECT")


def test_first_request_connects_and_gets_the_new_socket() -> None:
    """A request with nothing idle starts one connect and is granted its socket."""
    state = PoolState(Limits())
    plan = state.request(A, None, waiter=1, now=0)
    assert plan.connects == [A] and plan.grants == []
    assert state.connect_succeeded(A, socket_id=100, now=0.1).grants == [(1, 100)]
    assert state.stats()[0].active == 1


def test_released_socket_is_reused_by_the_next_request() -> None:
    """Keep-alive: a reusable socket goes idle and is granted at once to the next request."""
    state = PoolState(Limits())
    state.request(A, None, 1, 0)
    state.connect_succeeded(A, 100, 0)
    assert not state.release(A, 100, reusable=True, now=1)
    plan = state.request(A, None, 2, 2)
    assert plan.grants == [(2, 100)] and plan.connects == []


def test_per_group_limit_queues_and_late_binds() -> None:
    """Chromium: 6 per group; the 7th waits and takes the first socket released."""
    state = PoolState(Limits(per_group=6))
    connects = sum(len(state.request(A, None, w, 0).connects) for w in range(1, 8))
    assert connects == 6
    for socket_id, waiter in zip(range(100, 106), range(1, 7), strict=True):
        assert state.connect_succeeded(A, socket_id, 0).grants == [(waiter, socket_id)]
    assert state.stats()[0].waiting == 1
    assert state.release(A, 103, reusable=True, now=1).grants == [(7, 103)]


def test_late_binding_takes_whichever_socket_is_ready_first() -> None:
    """A released socket goes to the waiter whose own connect is still running; that connect's
    socket then lands idle for the next request."""
    state = PoolState(Limits())
    state.request(A, None, 1, 0)
    state.connect_succeeded(A, 100, 0)
    assert state.request(A, None, 2, 0).connects == [A]  # 100 is busy: connect for waiter 2
    assert state.release(A, 100, reusable=True, now=1).grants == [(2, 100)]
    assert state.connect_succeeded(A, 101, 1).grants == []
    assert state.request(A, None, 3, 2).grants == [(3, 101)]


def test_per_proxy_limit_spans_groups() -> None:
    """32 per proxy (here 3) counts every group that goes through that proxy."""
    state = PoolState(Limits(per_proxy=3))
    via = "http://p.test:3128"
    groups = [("http", f"o{i}.test", 80, via) for i in range(4)]
    started = [len(state.request(g, via, i, 0).connects) for i, g in enumerate(groups)]
    assert started == [1, 1, 1, 0]
    assert state.proxy_count(via) == 3
    state.connect_succeeded(groups[0], 100, 0)
    plan = state.release(groups[0], 100, reusable=False, now=1)
    assert plan.connects == [groups[3]]  # the freed proxy slot goes to the starved group


def test_total_limit_evicts_the_oldest_idle_socket_of_another_group() -> None:
    """At the total limit, an idle socket elsewhere is closed to make room."""
    state = PoolState(Limits(total=2))
    for waiter, socket_id, when in ((1, 100, 0.0), (2, 101, 1.0)):
        state.request(A, None, waiter, when)
        state.connect_succeeded(A, socket_id, when)
    state.release(A, 100, reusable=True, now=5)
    state.release(A, 101, reusable=True, now=6)
    plan = state.request(B, None, 3, 7)
    assert plan.close == [100] and plan.close_reasons == ["total_limit"]
    assert plan.connects == [B]
    assert state.total == 2


def test_total_limit_without_idle_sockets_waits() -> None:
    state = PoolState(Limits(total=1))
    state.request(A, None, 1, 0)
    state.connect_succeeded(A, 100, 0)
    assert not state.request(B, None, 2, 0).connects
    plan = state.release(A, 100, reusable=False, now=1)
    assert plan.connects == [B]


def test_idle_expiry_unused_10s_used_300s() -> None:
    """Chromium: a never-used idle socket lives ~10 s, a used one ~300 s."""
    state = PoolState(Limits(idle_unused=10, idle_used=300))
    state.request(A, None, 1, 0)
    state.request(A, None, 2, 0)
    state.connect_succeeded(A, 100, 0)  # -> waiter 1
    state.connect_succeeded(A, 101, 0)  # -> waiter 2
    state.release(A, 100, reusable=True, now=1)  # used
    state.request(B, None, 3, 0)
    state.connect_succeeded(B, 200, 1)  # -> waiter 3
    state.release(A, 101, reusable=True, now=1)
    assert state.expire(now=10).close == []
    state.request(B, None, 4, 2)  # B's socket busy: connect
    assert state.connect_succeeded(B, 201, 2).grants == [(4, 201)]
    state.release(B, 201, reusable=False, now=2)
    # an unused socket: connect completes with nobody waiting
    state.cancel(B, 5)
    state.request(B, None, 5, 3)
    state.cancel(B, 5)
    assert state.connect_succeeded(B, 202, 3).grants == []
    assert state.expire(now=12.9).close == []
    assert state.expire(now=13).close == [202]
    assert state.expire(now=300.9).close == []
    assert sorted(state.expire(now=301).close) == [100, 101]


def test_connect_failure_goes_to_the_oldest_waiter_and_others_retry() -> None:
    state = PoolState(Limits(per_group=1))
    state.request(A, None, 1, 0)
    state.request(A, None, 2, 0)
    plan = state.connect_failed(A, "refused", 1)
    assert plan.failures == [(1, "refused")]
    assert plan.connects == [A]  # waiter 2 gets a new attempt
    assert state.total == 1


def test_fresh_waiters_only_take_new_connections() -> None:
    """A retry after a stale reused socket must not be handed another reused socket."""
    state = PoolState(Limits())
    state.request(A, None, 1, 0)
    state.connect_succeeded(A, 100, 0)
    state.request(A, None, 2, 0)
    state.connect_succeeded(A, 101, 0)
    state.release(A, 100, reusable=True, now=1)
    plan = state.request(A, None, 3, 1, fresh=True)
    assert plan.grants == [] and plan.connects == [A]
    assert state.release(A, 101, reusable=True, now=2).grants == []
    assert state.connect_succeeded(A, 102, 2).grants == [(3, 102)]


def test_cancel_and_group_cleanup() -> None:
    state = PoolState(Limits(per_group=1))
    state.request(A, None, 1, 0)
    state.request(A, None, 2, 0)
    state.cancel(A, 2)
    state.connect_succeeded(A, 100, 0)
    state.release(A, 100, reusable=False, now=1)
    assert state.stats() == [] and state.total == 0


def test_discarded_idle_socket_frees_its_slot() -> None:
    state = PoolState(Limits(per_group=1))
    state.request(A, None, 1, 0)
    state.connect_succeeded(A, 100, 0)
    state.release(A, 100, reusable=True, now=1)
    assert state.request(A, None, 2, 2).grants == [(2, 100)]
    plan = state.discard_idle(A, 100, 2)  # it had turned readable: gone
    assert plan.connects == [] and state.total == 0
    assert state.request(A, None, 2, 2, fresh=True).connects == [A]


def test_fast_paths_agree_with_the_general_path() -> None:
    """take_idle / release_idle are the allocation-free common case of request / release."""
    state = PoolState(Limits(idle_used=300))
    state.request(A, None, 1, 0)
    state.connect_succeeded(A, 100, 0)
    assert state.take_idle(A, 1) is None  # nothing idle
    assert state.release_idle(A, 100, now=1)
    assert state.take_idle(A, 2) == 100
    assert state.stats()[0].active == 1
    state.request(A, None, 2, 2)  # queued behind the busy socket: a connect starts
    assert not state.release_idle(A, 100, now=3)  # somebody waits: general path needed
    assert state.release(A, 100, reusable=True, now=3).grants == [(2, 100)]
    assert state.connect_succeeded(A, 101, 3).grants == []
    assert state.take_idle(A, 400) is None  # expired: the general path must close it
    assert state.request(A, None, 3, 400).close == [101]


def test_fresh_waiters_never_starve_behind_idle_sockets() -> None:
    """A full group whose sockets went idle while only fresh (retry) waiters queue closes an
    idle socket to connect anew, and a newcomer may take an idle socket past fresh waiters."""
    state = PoolState(Limits(per_group=2))
    for waiter, socket_id in ((1, 102), (2, 103)):
        state.request(A, None, waiter, 0)
        state.connect_succeeded(A, socket_id, 0)
    assert state.request(A, None, 3, 1, fresh=True).connects == []  # full: starved
    plan = state.release(A, 102, reusable=True, now=2)
    assert plan.close == [102] and plan.connects == [A]  # room made for the fresh connect
    assert not state.release(A, 103, reusable=True, now=2).connects  # its connect is running
    assert state.request(A, None, 5, 3).grants == [(5, 103)]  # a newcomer takes the idle one
    assert state.connect_succeeded(A, 104, 3).grants == [(3, 104)]  # the retry gets a new one


def test_queueing_and_handing_over_without_a_plan() -> None:
    """queue_if_full / hand_over: the allocation-free path of a group at its limit (more clients
    than per_group sockets). They decide exactly what request / release would, and decline (False
    / None) whenever the general path has something else to do."""
    state = PoolState(Limits(per_group=2))
    assert not state.queue_if_full(A, 1)  # no group yet
    state.request(A, None, 1, 0)
    assert not state.queue_if_full(A, 2)  # room for another connect
    state.request(A, None, 2, 0)
    state.connect_succeeded(A, 100, 0)
    state.connect_succeeded(A, 101, 0)
    assert state.hand_over(A) is None  # nobody waits: release_idle / release decide
    assert state.queue_if_full(A, 3) and state.queue_if_full(A, 4)  # full: queued, in order
    assert state.stats()[0].waiting == 2
    assert state.hand_over(A) == 3  # the oldest waiter takes the released socket
    assert state.stats()[0].active == 2  # still active: now for waiter 3
    state.request(A, None, 5, 1, fresh=True)  # a retry only takes a new socket
    assert state.hand_over(A) == 4
    assert state.hand_over(A) is None  # a fresh waiter first: the general path scans past it
    assert state.release(A, 100, reusable=True, now=2).grants == []
    assert state.take_idle(A, 2) is None  # a fresh waiter queues: take_idle declines too
    assert not state.queue_if_full(B, 6)


def test_queued_waiters_starve_their_group_until_handed_a_socket() -> None:
    """A waiter queued by queue_if_full marks its group starved exactly as request does (so the
    release_idle fast path of any group declines while it waits), and the hand-over that serves
    the last waiter clears the mark."""
    for queue in ("request", "queue_if_full"):
        state = PoolState(Limits(per_group=1))
        state.request(A, None, 1, 0)
        state.connect_succeeded(A, 100, 0)
        state.request(B, None, 2, 0)
        state.connect_succeeded(B, 200, 0)
        assert state.release_idle(B, 200, now=1)  # nobody waits anywhere: the fast path
        assert state.take_idle(B, 1) == 200
        if queue == "request":
            assert state.request(A, None, 3, 1).connects == []
        else:
            assert state.queue_if_full(A, 3)
        assert not state.release_idle(B, 200, now=2), queue  # A starves: general path
        assert state.release(B, 200, reusable=True, now=2).grants == []
        assert state.hand_over(A) == 3
        assert state.take_idle(B, 3) == 200
        assert state.release_idle(B, 200, now=3), queue  # nobody starves any more

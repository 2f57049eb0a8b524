"""Table tests of ``proxyd.routing.failover.BadProxyList`` (pure: ``now`` is an argument).

Chromium's ``ProxyList::DeprioritizeBadProxyChains``: proxies on the bad list move after the good
entries, both groups keep their relative order, bad proxies are still tried when nothing else is
left, and entries expire after the retry delay (``bad_proxy_ttl``). DIRECT is never marked bad.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxyd.routing.failover import BadProxyList
from proxyd.upstream.route import DIRECT, ProxyServer, Route, RouteList, ViaProxy

A = ViaProxy(ProxyServer("http", "a", 3128))
B = ViaProxy(ProxyServer("http", "b", 3128))
C = ViaProxy(ProxyServer("socks5", "c", 1080))


@pytest.mark.parametrize(
    ("routes", "bad", "expected"),
    [
        ((A, B, DIRECT), [], (A, B, DIRECT)),
        ((A, B, DIRECT), [A], (B, DIRECT, A)),
        ((A, B, C, DIRECT), [A, C], (B, DIRECT, A, C)),  # bad ones keep their order too
        ((A, B), [A, B], (A, B)),  # all bad: tried anyway, unchanged
        ((A,), [A], (A,)),
        ((DIRECT, A), [A], (DIRECT, A)),
        ((C, A, B), [B], (C, A, B)),  # already last
        ((A, B), [C], (A, B)),  # unrelated bad proxy
    ],
)
def test_order(routes: RouteList, bad: list[ViaProxy], expected: RouteList) -> None:
    """Good first in order, then bad in order (a stable partition)."""
    proxies = BadProxyList(ttl=300)
    for route in bad:
        proxies.mark_bad(route.label, now=100.0)
    assert proxies.order(routes, now=150.0) == expected


def test_expiry_after_ttl() -> None:
    """An entry is bad for ttl seconds, then retried normally (Chromium's retry delay)."""
    proxies = BadProxyList(ttl=300)
    proxies.mark_bad(A.label, now=1000.0)
    assert proxies.is_bad(A.label, 1299.9)
    assert proxies.order((A, B), 1299.9) == (B, A)
    assert proxies.snapshot(1100.0) == [(A.label, 200.0)]
    assert proxies.size(1100.0) == 1
    assert not proxies.is_bad(A.label, 1300.0)
    assert proxies.order((A, B), 1300.0) == (A, B)
    assert proxies.size(1300.0) == 0
    assert proxies.snapshot(1300.0) == []


def test_marking_again_extends() -> None:
    proxies = BadProxyList(ttl=10)
    proxies.mark_bad(A.label, 0.0)
    proxies.mark_bad(A.label, 8.0)
    assert proxies.is_bad(A.label, 15.0)
    assert not proxies.is_bad(A.label, 18.0)


def test_direct_is_never_bad() -> None:
    proxies = BadProxyList()
    proxies.mark_bad(DIRECT.label, 0.0)
    assert proxies.size(0.0) == 0
    assert not proxies.is_bad("DIRECT", 0.0)


def test_mark_good_forgets() -> None:
    proxies = BadProxyList()
    proxies.mark_bad(A.label, 0.0)
    proxies.mark_good(A.label)
    assert proxies.order((A, B), 1.0) == (A, B)


def test_snapshot_sorted_by_time_left() -> None:
    proxies = BadProxyList(ttl=100)
    proxies.mark_bad(B.label, 10.0)
    proxies.mark_bad(A.label, 20.0)
    proxies.mark_bad(C.label, 5.0)
    assert proxies.snapshot(30.0) == [(C.label, 75.0), (B.label, 80.0), (A.label, 90.0)]


def test_bounded_size_drops_soonest_to_expire() -> None:
    proxies = BadProxyList(ttl=100, max_entries=2)
    proxies.mark_bad("http://a:1", 0.0)
    proxies.mark_bad("http://b:1", 1.0)
    proxies.mark_bad("http://c:1", 2.0)
    assert [label for label, _ in proxies.snapshot(3.0)] == ["http://b:1", "http://c:1"]


ROUTES = st.lists(st.sampled_from([A, B, C, DIRECT]), max_size=6).map(tuple)


@given(ROUTES, st.sets(st.sampled_from([A.label, B.label, C.label, "DIRECT"])))
def test_order_is_a_stable_partition(routes: tuple[Route, ...], bad: set[str]) -> None:
    """Property: same multiset, good entries (incl. DIRECT) before bad ones, orders kept."""
    proxies = BadProxyList(ttl=10)
    for label in bad:
        proxies.mark_bad(label, 0.0)
    ordered = proxies.order(routes, 5.0)
    assert sorted(map(repr, ordered)) == sorted(map(repr, routes))
    is_bad = [r.label in bad and r is not DIRECT for r in ordered]
    if not all(is_bad):
        assert is_bad == sorted(is_bad)  # False (good) first
        assert [r for r in ordered if r.label not in bad or r is DIRECT] == [
            r for r in routes if r.label not in bad or r is DIRECT
        ]

"""Routes as pool group keys (proxyd/upstream/route.py): hashing agrees with equality.

A route is part of every pool group key, so ``Direct`` hashes to a constant and ``ViaProxy``
computes its hash once; these tests pin that equal routes built apart still meet in one group
and that unequal ones (another port, other credentials) do not.
"""

from __future__ import annotations

import dataclasses

from proxyd.upstream.route import DIRECT, Direct, ProxyServer, ViaProxy, parse_route


def test_direct_routes_are_equal_and_hash_alike() -> None:
    assert Direct() == DIRECT
    assert hash(Direct()) == hash(DIRECT)
    assert len({Direct(), DIRECT}) == 1


def test_proxy_routes_built_apart_meet_in_one_key() -> None:
    first = parse_route("PROXY proxy.test:3128")
    second = ViaProxy(ProxyServer("http", "proxy.test", 3128))
    assert first == second
    assert hash(first) == hash(second)
    groups = {(b"http", "origin.test", 80, first): "group"}
    assert groups[(b"http", "origin.test", 80, second)] == "group"


def test_unequal_proxy_routes_are_separate_keys() -> None:
    base = ViaProxy(ProxyServer("http", "proxy.test", 3128))
    others = [
        ViaProxy(ProxyServer("http", "proxy.test", 3129)),
        ViaProxy(ProxyServer("socks5", "proxy.test", 3128)),
        ViaProxy(ProxyServer("http", "proxy.test", 3128, "user", "secret")),
        DIRECT,
    ]
    keys = {base, *others}
    assert len(keys) == 1 + len(others)


def test_replace_recomputes_the_cached_hash() -> None:
    route = ViaProxy(ProxyServer("http", "proxy.test", 3128))
    moved = dataclasses.replace(route, proxy=ProxyServer("http", "proxy.test", 8080))
    assert moved == ViaProxy(ProxyServer("http", "proxy.test", 8080))
    assert hash(moved) == hash(ViaProxy(ProxyServer("http", "proxy.test", 8080)))
    assert "_hash" not in repr(route)  # the cache is no part of the route's text

"""The DNS cache (pure, explicit ``now``) and the resolver shell over a fake system resolver.

No test sends a DNS query: each installs ``FakeInner`` with ``set_custom_hostname_resolver`` first
(the resolver chains to it), or replaces the module's thread-side ``getaddrinfo``. Timing tests
run on pytest-trio's ``autojump_clock``, so TTLs and timeouts pass without sleeping.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest
import trio
import trio.testing

from proxyd.config import DnsConfig
from proxyd.errors import DnsError, DnsTimeout
from proxyd.observe.metrics import Metrics
from proxyd.upstream import dns
from proxyd.upstream.dns import Resolver
from proxyd.upstream.dns_cache import MISS, DnsCache, Hit, Lookup, NegativeHit

# --- the pure cache ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stored_at", "read_at", "expected"),
    [
        (None, 0.0, MISS),
        (0.0, 0.0, Hit(("10.0.0.1",), 60.0)),
        (0.0, 59.999, Hit(("10.0.0.1",), 60.0)),
        (0.0, 60.0, MISS),
        (10.0, 65.0, Hit(("10.0.0.1",), 70.0)),
        (10.0, 80.0, MISS),
    ],
)
def test_cache_positive_ttl(stored_at: float | None, read_at: float, expected: Lookup) -> None:
    cache = DnsCache(capacity=10, ttl=60.0, negative_ttl=5.0)
    if stored_at is not None:
        cache.put("a.test", ["10.0.0.1"], stored_at)
    assert cache.get("a.test", read_at) == expected


@pytest.mark.parametrize(
    ("negative_ttl", "read_at", "expected"),
    [
        (5.0, 0.0, NegativeHit("no such name", 5.0)),
        (5.0, 4.9, NegativeHit("no such name", 5.0)),
        (5.0, 5.0, MISS),
        (0.0, 0.0, MISS),  # negative caching off
    ],
)
def test_cache_negative_ttl(negative_ttl: float, read_at: float, expected: Lookup) -> None:
    cache = DnsCache(capacity=10, ttl=60.0, negative_ttl=negative_ttl)
    cache.put_failure("a.test", "no such name", 0.0)
    assert cache.get("a.test", read_at) == expected


def test_cache_expired_entry_is_dropped_when_read() -> None:
    cache = DnsCache(capacity=10, ttl=1.0, negative_ttl=1.0)
    cache.put("a.test", ["10.0.0.1"], 0.0)
    assert cache.size == 1
    assert cache.get("a.test", 2.0) is MISS
    assert cache.size == 0


def test_cache_failure_replaces_answer_and_answer_replaces_failure() -> None:
    cache = DnsCache(capacity=10, ttl=60.0, negative_ttl=5.0)
    cache.put("a.test", ["10.0.0.1"], 0.0)
    cache.put_failure("a.test", "gone", 1.0)
    assert cache.get("a.test", 2.0) == NegativeHit("gone", 6.0)
    cache.put("a.test", ["10.0.0.2"], 3.0)
    assert cache.get("a.test", 4.0) == Hit(("10.0.0.2",), 63.0)
    # With negative caching off, a failure still removes the older answer.
    off = DnsCache(capacity=10, ttl=60.0, negative_ttl=0.0)
    off.put("a.test", ["10.0.0.1"], 0.0)
    off.put_failure("a.test", "gone", 1.0)
    assert off.get("a.test", 2.0) is MISS


@pytest.mark.parametrize(
    ("operations", "kept", "evicted"),
    [
        # put a, b, c into 2 slots: a (least recently used) goes
        (["put a", "put b", "put c"], {"b", "c"}, {"a"}),
        # reading a makes b the least recently used
        (["put a", "put b", "get a", "put c"], {"a", "c"}, {"b"}),
        # failures take slots too
        (["put a", "fail b", "put c"], {"b", "c"}, {"a"}),
        # re-putting a refreshes it
        (["put a", "put b", "put a", "put c"], {"a", "c"}, {"b"}),
    ],
)
def test_cache_lru_eviction(operations: list[str], kept: set[str], evicted: set[str]) -> None:
    cache = DnsCache(capacity=2, ttl=60.0, negative_ttl=60.0)
    for operation in operations:
        verb, host = operation.split()
        if verb == "put":
            cache.put(host, ["10.0.0.1"], 0.0)
        elif verb == "fail":
            cache.put_failure(host, "nope", 0.0)
        else:
            cache.get(host, 0.0)
    assert cache.size == 2
    assert cache.evictions == len(evicted)
    for host in kept:
        assert cache.get(host, 1.0) is not MISS
    for host in evicted:
        assert cache.get(host, 1.0) is MISS


def test_cache_capacity_zero_caches_nothing() -> None:
    cache = DnsCache(capacity=0, ttl=60.0, negative_ttl=5.0)
    cache.put("a.test", ["10.0.0.1"], 0.0)
    cache.put_failure("b.test", "nope", 0.0)
    assert cache.size == 0
    assert cache.get("a.test", 0.0) is MISS


# --- the resolver shell -----------------------------------------------------------------------


class FakeInner(trio.abc.HostnameResolver):
    """A fake system resolver: counts calls, can be slow, fails names in ``failing``."""

    def __init__(
        self,
        answers: dict[str, list[str]] | None = None,
        *,
        delay: float = 0.0,
        failing: tuple[str, ...] = ("unresolvable.test",),
    ) -> None:
        self.answers = answers or {}
        self.delay = delay
        self.failing = failing
        self.calls: list[str] = []
        self.running = 0
        self.max_running = 0

    async def getaddrinfo(
        self,
        host: bytes | None,
        port: bytes | str | int | None,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[tuple[Any, Any, Any, str, Any]]:
        name = (host or b"").decode("ascii")
        self.calls.append(name)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            await trio.sleep(self.delay)
            if name in self.failing:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            port_number = int(port or 0)
            result: list[tuple[Any, Any, Any, str, Any]] = []
            for address in self.answers.get(name, ["127.0.0.1"]):
                if ":" in address:
                    result.append(
                        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port_number, 0, 0))
                    )
                else:
                    result.append(
                        (socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port_number))
                    )
            return result
        finally:
            self.running -= 1

    async def getnameinfo(self, sockaddr: tuple[Any, ...], flags: int) -> tuple[str, str]:
        return ("fake-name.test", str(sockaddr[1]))


def install_fake(**kwargs: Any) -> FakeInner:
    fake = FakeInner(**kwargs)
    trio.socket.set_custom_hostname_resolver(fake)
    return fake


def make_resolver(metrics: Metrics | None = None, **settings: Any) -> Resolver:
    return Resolver(DnsConfig(**settings), metrics=metrics)


def outcome(metrics: Metrics, name: str) -> float:
    value = metrics.registry.get_sample_value("proxyd_dns_lookups_total", {"outcome": name})
    return value or 0.0


async def test_hit_miss_and_ttl_expiry(autojump_clock: trio.testing.MockClock) -> None:
    fake = install_fake(answers={"a.test": ["2001:db8::1", "192.0.2.1"]})
    metrics = Metrics()
    resolver = make_resolver(metrics, ttl=60.0)
    assert await resolver.resolve("a.test", 80) == ["2001:db8::1", "192.0.2.1"]
    await trio.sleep(59.0)
    assert await resolver.resolve("A.Test") == ["2001:db8::1", "192.0.2.1"]  # names ignore case
    assert fake.calls == ["a.test"]
    await trio.sleep(1.0)
    await resolver.resolve("a.test")
    assert fake.calls == ["a.test", "a.test"]
    assert (outcome(metrics, "miss"), outcome(metrics, "hit")) == (2, 1)
    stats = resolver.stats()
    assert (stats.entries, stats.hits, stats.misses, stats.queries) == (1, 1, 2, 2)
    assert stats.in_flight == 0
    histogram = metrics.registry.get_sample_value("proxyd_dns_lookup_duration_seconds_count")
    assert histogram == 2
    gauges = {family.name: family.samples[0].value for family in resolver.metric_families()}
    assert gauges == {"proxyd_dns_cache_entries": 1}


async def test_lru_eviction_at_cache_size(autojump_clock: trio.testing.MockClock) -> None:
    fake = install_fake()
    resolver = make_resolver(cache_size=2)
    for name in ("a.test", "b.test", "a.test", "c.test"):  # b is least recently used at c
        await resolver.resolve(name)
    assert resolver.stats().entries == 2
    await resolver.resolve("a.test")
    await resolver.resolve("c.test")
    assert fake.calls == ["a.test", "b.test", "c.test"]
    await resolver.resolve("b.test")
    assert fake.calls == ["a.test", "b.test", "c.test", "b.test"]
    assert resolver.stats().evictions == 2


async def test_concurrent_lookups_share_one_query(autojump_clock: trio.testing.MockClock) -> None:
    fake = install_fake(delay=1.0)
    resolver = make_resolver()
    results: list[list[str]] = []

    async def lookup() -> None:
        results.append(await resolver.resolve("shared.test", 443))

    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(lookup)
        await trio.sleep(0.5)
        assert resolver.stats().in_flight == 1
    assert fake.calls == ["shared.test"]
    assert results == [["127.0.0.1"]] * 50
    stats = resolver.stats()
    assert (stats.queries, stats.coalesced, stats.misses) == (1, 49, 50)


async def test_followers_share_a_failure(autojump_clock: trio.testing.MockClock) -> None:
    fake = install_fake(delay=1.0)
    resolver = make_resolver()
    errors: list[BaseException] = []

    async def lookup() -> None:
        try:
            await resolver.resolve("unresolvable.test")
        except DnsError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(lookup)
    assert fake.calls == ["unresolvable.test"]
    assert len(errors) == 5 and len({id(error) for error in errors}) == 5  # one each


async def test_cancelled_leader_hands_over_to_a_follower(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = install_fake(delay=1.0)
    resolver = make_resolver()
    results: list[list[str]] = []

    async def leader(scope_out: list[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            scope_out.append(scope)
            await resolver.resolve("slow.test")

    async def follower() -> None:
        results.append(await resolver.resolve("slow.test"))

    async with trio.open_nursery() as nursery:
        scopes: list[trio.CancelScope] = []
        nursery.start_soon(leader, scopes)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(follower)
        await trio.sleep(0.5)
        scopes[0].cancel()  # the leader's client went away mid-query
    assert results == [["127.0.0.1"]]
    assert fake.calls == ["slow.test", "slow.test"]
    assert resolver.stats().in_flight == 0


async def test_concurrency_cap(autojump_clock: trio.testing.MockClock) -> None:
    fake = install_fake(delay=1.0)
    resolver = make_resolver(max_concurrent=2)
    async with trio.open_nursery() as nursery:
        for index in range(5):
            nursery.start_soon(resolver.resolve, f"name{index}.test")
        await trio.sleep(0.5)
        stats = resolver.stats()
        assert (stats.running, stats.waiting, stats.in_flight) == (2, 3, 5)
    assert fake.max_running == 2
    assert len(fake.calls) == 5
    assert trio.current_time() == pytest.approx(3.0)  # three rounds of two


async def test_hosts_override_wins_and_never_queries() -> None:
    fake = install_fake()
    metrics = Metrics()
    resolver = make_resolver(metrics, hosts={"Pinned.test": "10.1.2.3", "127.0.0.1": "::1"})
    assert await resolver.resolve("pinned.test") == ["10.1.2.3"]
    assert await resolver.resolve("PINNED.TEST") == ["10.1.2.3"]
    assert await resolver.resolve("127.0.0.1") == ["::1"]  # even over an IP literal
    assert fake.calls == []
    assert resolver.stats().entries == 0
    assert outcome(metrics, "override") == 3


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("::1", "::1"),
        ("[::1]", "::1"),
        ("2001:DB8::1", "2001:db8::1"),
    ],
)
async def test_ip_literals_bypass_lookup_and_cache(host: str, expected: str) -> None:
    fake = install_fake()
    metrics = Metrics()
    resolver = make_resolver(metrics)
    assert await resolver.resolve(host) == [expected]
    assert fake.calls == []
    assert resolver.stats().entries == 0
    assert sum(outcome(metrics, name) for name in ("hit", "miss", "override")) == 0


async def test_timeout(autojump_clock: trio.testing.MockClock) -> None:
    fake = install_fake(delay=30.0)
    metrics = Metrics()
    resolver = make_resolver(metrics, timeout=5.0)
    with pytest.raises(DnsTimeout, match=r"slow\.test took longer than 5s"):
        await resolver.resolve("slow.test")
    assert trio.current_time() == pytest.approx(5.0)
    # A timeout is not cached: the next lookup asks again.
    with pytest.raises(DnsTimeout):
        await resolver.resolve("slow.test")
    assert fake.calls == ["slow.test", "slow.test"]
    assert outcome(metrics, "timeout") == 2 and resolver.stats().entries == 0


async def test_waiting_for_a_slot_counts_against_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = install_fake(delay=4.0)
    resolver = make_resolver(max_concurrent=1, timeout=5.0)
    outcomes: dict[str, str] = {}

    async def lookup(name: str) -> None:
        try:
            await resolver.resolve(name)
            outcomes[name] = "ok"
        except DnsTimeout:
            outcomes[name] = "timeout"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lookup, "first.test")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(lookup, "second.test")
    assert outcomes == {"first.test": "ok", "second.test": "timeout"}
    assert fake.calls == ["first.test", "second.test"]


async def test_failure_then_negative_hit(autojump_clock: trio.testing.MockClock) -> None:
    fake = install_fake()
    metrics = Metrics()
    resolver = make_resolver(metrics, negative_ttl=5.0)
    with pytest.raises(DnsError, match=r"cannot resolve unresolvable\.test: Name or service"):
        await resolver.resolve("unresolvable.test")
    await trio.sleep(4.0)
    with pytest.raises(DnsError, match=r"cannot resolve unresolvable\.test: Name or service"):
        await resolver.resolve("unresolvable.test")
    assert fake.calls == ["unresolvable.test"]
    assert (outcome(metrics, "error"), outcome(metrics, "negative_hit")) == (1, 1)
    await trio.sleep(1.0)
    with pytest.raises(DnsError):
        await resolver.resolve("unresolvable.test")
    assert fake.calls == ["unresolvable.test", "unresolvable.test"]


async def test_non_ascii_names_are_looked_up_as_a_labels() -> None:
    fake = install_fake()
    resolver = make_resolver()
    await resolver.resolve("café.test")
    assert fake.calls == ["xn--caf-dma.test"]
    with pytest.raises(DnsError, match="not a valid host name"):
        await resolver.resolve("é..test")


async def test_without_a_custom_resolver_the_system_call_runs_in_a_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trio.socket.set_custom_hostname_resolver(None)
    threads: list[threading.Thread] = []

    def fake_system(*args: Any) -> list[tuple[Any, ...]]:
        threads.append(threading.current_thread())
        assert args[0] == b"threaded.test" and args[3] == socket.SOCK_STREAM
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:db8::7", 0, 0, 0)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.7", 0)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.7", 0)),  # duplicate
        ]

    monkeypatch.setattr(dns, "_system_getaddrinfo", fake_system)
    resolver = make_resolver()
    assert await resolver.resolve("threaded.test") == ["2001:db8::7", "192.0.2.7"]
    assert len(threads) == 1 and threads[0] is not threading.main_thread()


# --- installed into trio ----------------------------------------------------------------------


async def test_installed_open_tcp_stream_connects_over_cached_answer() -> None:
    fake = install_fake()
    resolver = make_resolver()
    resolver.install()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    try:
        for _ in range(2):
            stream = await trio.open_tcp_stream("some-name.test", port)
            server = await listeners[0].accept()
            await stream.send_all(b"ping")
            assert await server.receive_some(4) == b"ping"
            await stream.aclose()
            await server.aclose()
    finally:
        await listeners[0].aclose()
    assert fake.calls == ["some-name.test"]  # the second connect used the cache
    assert resolver.stats().hits == 1


async def test_adapter_builds_getaddrinfo_tuples_by_family_and_type() -> None:
    install_fake(answers={"dual.test": ["2001:db8::1", "192.0.2.1"]})
    make_resolver().install()
    getaddrinfo = trio.socket.getaddrinfo
    both = await getaddrinfo("dual.test", 80)
    assert both == [
        (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("2001:db8::1", 80, 0, 0)),
        (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("192.0.2.1", 80)),
    ]
    v4 = await getaddrinfo("dual.test", "443", socket.AF_INET, socket.SOCK_STREAM)
    assert v4 == [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("192.0.2.1", 443))]
    v6 = await getaddrinfo("dual.test", None, socket.AF_INET6, socket.SOCK_DGRAM)
    assert v6 == [
        (socket.AF_INET6, socket.SOCK_DGRAM, socket.IPPROTO_UDP, "", ("2001:db8::1", 0, 0, 0))
    ]
    with pytest.raises(socket.gaierror):
        await getaddrinfo("unresolvable.test", 80)


async def test_adapter_passes_other_questions_to_the_inner_resolver() -> None:
    fake = install_fake()
    resolver = make_resolver()
    resolver.install()
    await trio.socket.getaddrinfo("flags.test", 80, flags=socket.AI_CANONNAME)
    await trio.socket.getaddrinfo("flags.test", 80, flags=socket.AI_CANONNAME)
    assert fake.calls == ["flags.test", "flags.test"]  # uncached
    assert resolver.stats().entries == 0
    assert await trio.socket.getnameinfo(("127.0.0.1", 80), 0) == ("fake-name.test", "80")


async def test_adapter_reports_timeouts_as_gaierror(autojump_clock: trio.testing.MockClock) -> None:
    install_fake(delay=30.0)
    make_resolver(timeout=2.0).install()
    with pytest.raises(socket.gaierror) as caught:
        await trio.socket.getaddrinfo("slow.test", 80)
    assert caught.value.errno == socket.EAI_AGAIN
    assert isinstance(caught.value.__cause__, DnsTimeout)


async def test_install_chains_without_recursion_or_double_caching() -> None:
    fake = install_fake()
    first = make_resolver()
    first.install()
    first.install()  # a second call does nothing
    second = make_resolver()
    second.install()  # e.g. after a reload: chains to the fake, not to `first`
    await trio.socket.getaddrinfo("chain.test", 80)
    await second.resolve("chain.test")
    await first.resolve("chain.test")
    assert fake.calls == ["chain.test", "chain.test"]  # one query per resolver
    assert first.stats().queries == second.stats().queries == 1


async def test_an_uninstalled_resolver_uses_the_installed_one_underneath() -> None:
    fake = install_fake()
    installed = make_resolver()
    installed.install()
    other = make_resolver()
    await other.resolve("under.test")
    assert fake.calls == ["under.test"] and installed.stats().queries == 0

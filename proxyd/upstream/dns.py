"""Host name resolution for upstream connects: overrides, a cache, one query per name, a cap.

How it works. ``Resolver.resolve(host)`` answers, in this order:

1. ``dns.hosts`` overrides: the configured address, always (outcome ``override``);
2. the cache (``dns_cache.DnsCache``, pure, LRU, ``dns.cache_size`` names): a fresh answer is
   returned with no await at all (``hit``); a cached failure re-raises ``DnsError`` at once
   (``negative_hit``, kept ``dns.negative_ttl`` seconds, answers ``dns.ttl`` seconds);
3. IP literals (``127.0.0.1``, ``::1``, ``[::1]``, anything ``getaddrinfo`` takes with
   ``AI_NUMERICHOST``, as trio does): returned as they are, never cached, never counted;
4. a query. Lookups of one name share one query (single flight): the first caller leads, records
   a ``_Flight`` and queries; later callers wait on the flight's event and take its result. The
   leader fills the cache before it wakes them. If the leader's caller goes away (cancelled)
   without a result, the followers wake to an empty flight and ask again — one of them leads.

Every lookup has one deadline, ``dns.timeout`` from its start (the wait for a query slot
included); a follower also gets the leader's timeout. Timeouts raise ``DnsTimeout`` and are not
cached (the name may well exist); failures raise ``DnsError`` and are cached. Outcomes of lookups
that missed the cache are ``miss`` (answered), ``error`` or ``timeout``, for followers too;
``dns_lookup_duration`` times each query (leaders only, slot wait included).

The query itself never blocks the event loop and holds one of ``dns.max_concurrent`` slots of a
``trio.CapacityLimiter``. It goes to the hostname resolver that was installed in trio before
``install()`` (the tests' ``LoopbackResolver``) or, if there was none, to the system
``getaddrinfo`` in a worker thread (``abandon_on_cancel``: a timed-out thread is left to finish,
and keeps its slot until it does, so a hung resolver cannot pile up threads).

``reconfigure(config)`` (a config reload) swaps the overrides, TTLs, cache size, query cap and
timeout in place: the cache and its counters survive a reload.

``install()`` puts ``_TrioAdapter`` in front of trio's own ``trio.socket.getaddrinfo``, so
``trio.open_tcp_stream(host, port)`` (Happy Eyeballs, RFC 8305) connects over cached addresses.
The adapter turns the cached strings back into getaddrinfo tuples filtered by family and socket
type, and raises ``socket.gaierror`` as the contract wants; anything that is not a plain
"addresses of this name" question (flags, service names, odd socket types) is passed to the inner
resolver uncached. The adapter never calls ``trio.socket.getaddrinfo``, and a resolver installed
over another one chains to the *inner* resolver, so nothing recurses or double-caches.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final, Protocol

import idna
import trio
from prometheus_client.core import Metric

from proxyd.config import DnsConfig
from proxyd.errors import DnsError, DnsTimeout
from proxyd.observe.metrics import Metrics, dns_gauges
from proxyd.upstream.dns_cache import DnsCache, Hit, NegativeHit

__all__ = ["DnsStats", "Resolver"]

log = logging.getLogger(__name__)

# The blocking system call, only ever run in a worker thread (a name the tests can replace).
_system_getaddrinfo = socket.getaddrinfo
_system_getnameinfo = socket.getnameinfo

_AddrInfo = tuple[Any, Any, Any, str, Any]
_Answer = tuple[str, ...] | DnsError | DnsTimeout

# getaddrinfo socket type -> the (type, proto) of the tuples we build; 0 means "a TCP connect".
_KINDS: Final = {
    0: (socket.SOCK_STREAM, socket.IPPROTO_TCP),
    socket.SOCK_STREAM: (socket.SOCK_STREAM, socket.IPPROTO_TCP),
    socket.SOCK_DGRAM: (socket.SOCK_DGRAM, socket.IPPROTO_UDP),
}
_FAMILIES: Final = (socket.AF_UNSPEC, socket.AF_INET, socket.AF_INET6)


@dataclass(frozen=True, slots=True)
class DnsStats:
    """A snapshot for the status page and scrape-time gauges (counts since start)."""

    entries: int  # cached names (answers and failures; expired ones until read or evicted)
    capacity: int
    hits: int
    negative_hits: int
    overrides: int
    misses: int  # lookups that needed a query: their own (queries) or another's (coalesced)
    queries: int
    coalesced: int
    errors: int
    timeouts: int
    evictions: int
    in_flight: int  # names being queried now
    running: int  # query slots in use (abandoned threads keep theirs until they finish)
    waiting: int  # queries waiting for a slot


class _Counter(Protocol):
    def inc(self) -> None: ...


class _Histogram(Protocol):
    def observe(self, amount: float) -> None: ...


class _Nothing:
    """Stands in for metric children when there are no metrics: the hot path never branches."""

    def inc(self) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass


class _Flight:
    """One query in progress; followers wait on ``done`` and read ``result`` (None: ask again)."""

    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: _Answer | None = None


class Resolver:
    def __init__(
        self,
        config: DnsConfig,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self._hosts = {name.lower(): address for name, address in config.hosts.items()}
        self._cache = DnsCache(config.cache_size, config.ttl, config.negative_ttl)
        self._limiter = trio.CapacityLimiter(config.max_concurrent)
        self._timeout = config.timeout
        self._clock = clock
        self._flights: dict[str, _Flight] = {}
        self._installed = False
        self._inner: trio.abc.HostnameResolver | None = None
        self.hits = self.negative_hits = self.overrides = self.misses = 0
        self.queries = self.coalesced = self.errors = self.timeouts = 0
        nothing = _Nothing()
        self._m_hit: _Counter = nothing
        self._m_negative_hit: _Counter = nothing
        self._m_override: _Counter = nothing
        self._m_miss: _Counter = nothing
        self._m_error: _Counter = nothing
        self._m_timeout: _Counter = nothing
        self._m_duration: _Histogram = nothing
        if metrics is not None:
            lookups = metrics.dns_lookups
            self._m_hit = lookups.labels("hit")
            self._m_negative_hit = lookups.labels("negative_hit")
            self._m_override = lookups.labels("override")
            self._m_miss = lookups.labels("miss")
            self._m_error = lookups.labels("error")
            self._m_timeout = lookups.labels("timeout")
            self._m_duration = metrics.dns_lookup_duration

    # --- the lookup ---------------------------------------------------------------------------

    async def resolve(self, host: str, port: int = 0) -> list[str]:
        """The IPv6 and IPv4 addresses of ``host`` in the resolver's order (RFC 6724)."""
        name = host.lower() if host.isascii() else _a_labels(host)
        address = self._hosts.get(name)
        if address is not None:
            self.overrides += 1
            self._m_override.inc()
            return [address]
        entry = self._cache.get(name, self._clock())
        if isinstance(entry, Hit):
            self.hits += 1
            self._m_hit.inc()
            return list(entry.addresses)
        if isinstance(entry, NegativeHit):
            self.negative_hits += 1
            self._m_negative_hit.inc()
            raise DnsError(entry.error)
        literal = _maybe_ip_literal(name)
        if literal is not None:
            return [literal]
        return await self._lookup(name, port)

    async def _lookup(self, name: str, port: int) -> list[str]:
        self.misses += 1
        deadline = trio.current_time() + self._timeout
        following = False
        while True:
            flight = self._flights.get(name)
            if flight is None:
                return await self._lead(name, port, deadline)
            if not following:
                following = True
                self.coalesced += 1
            with trio.move_on_at(deadline) as scope:
                await flight.done.wait()
            if scope.cancelled_caught:
                return self._finish(self._timed_out(name))
            if flight.result is not None:
                return self._finish(flight.result)
            # The leader's caller went away before an answer: ask again, perhaps as the leader.

    async def _lead(self, name: str, port: int, deadline: float) -> list[str]:
        flight = self._flights[name] = _Flight()
        self.queries += 1
        started = trio.current_time()
        try:
            result = await self._query(name, port, deadline)
            self._m_duration.observe(trio.current_time() - started)
            if isinstance(result, tuple):
                self._cache.put(name, result, self._clock())
            elif isinstance(result, DnsError):
                self._cache.put_failure(name, result.detail, self._clock())
            flight.result = result
        finally:
            # Answered, failed or cancelled: the flight ends and its followers wake up.
            del self._flights[name]
            flight.done.set()
        return self._finish(result)

    async def _query(self, name: str, port: int, deadline: float) -> _Answer:
        with trio.move_on_at(deadline):
            try:
                infos = await self._getaddrinfo(
                    name.encode("ascii"), port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, 0
                )
            except (OSError, UnicodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                log.debug("dns: %s failed: %s", name, reason)
                return DnsError(f"cannot resolve {name}: {reason}")
            addresses = tuple(
                dict.fromkeys(
                    _address_text(info[0], info[4])
                    for info in infos
                    if info[0] in (socket.AF_INET, socket.AF_INET6)
                )
            )
            if not addresses:
                return DnsError(f"cannot resolve {name}: no IPv4 or IPv6 address")
            return addresses
        log.debug("dns: %s timed out after %gs", name, self._timeout)
        return self._timed_out(name)

    def _timed_out(self, name: str) -> DnsTimeout:
        return DnsTimeout(f"looking up {name} took longer than {self._timeout:g}s")

    def _finish(self, result: _Answer) -> list[str]:
        """Count one missed lookup's outcome; a fresh exception per caller (tracebacks differ)."""
        if isinstance(result, tuple):
            self._m_miss.inc()
            return list(result)
        if isinstance(result, DnsTimeout):
            self.timeouts += 1
            self._m_timeout.inc()
            raise DnsTimeout(result.detail)
        self.errors += 1
        self._m_error.inc()
        raise DnsError(result.detail)

    # --- the system boundary ------------------------------------------------------------------

    def _inner_resolver(self) -> trio.abc.HostnameResolver | None:
        if self._installed:
            return self._inner
        # Not installed: whatever trio uses now (set-and-restore is trio's only public getter;
        # no checkpoint in between, so nothing else can see the swap).
        current = trio.socket.set_custom_hostname_resolver(None)
        trio.socket.set_custom_hostname_resolver(current)
        return _unwrap(current)

    async def _getaddrinfo(
        self,
        host: bytes | None,
        port: bytes | str | int | None,
        family: int,
        type: int,
        proto: int,
        flags: int,
    ) -> list[_AddrInfo]:
        inner = self._inner_resolver()
        if inner is not None:
            async with self._limiter:
                return await inner.getaddrinfo(host, port, family, type, proto, flags)
        return await trio.to_thread.run_sync(
            _blocking_getaddrinfo,
            host,
            port,
            family,
            type,
            proto,
            flags,
            abandon_on_cancel=True,
            limiter=self._limiter,
        )

    async def _getnameinfo(
        self, sockaddr: tuple[str, int] | tuple[str, int, int, int], flags: int
    ) -> tuple[str, str]:
        inner = self._inner_resolver()
        with trio.move_on_after(self._timeout):
            if inner is not None:
                async with self._limiter:
                    return await inner.getnameinfo(sockaddr, flags)
            return await trio.to_thread.run_sync(
                _system_getnameinfo, sockaddr, flags, abandon_on_cancel=True, limiter=self._limiter
            )
        raise socket.gaierror(socket.EAI_AGAIN, f"getnameinfo took longer than {self._timeout:g}s")

    async def _uncached(
        self,
        host: bytes | None,
        port: bytes | str | int | None,
        family: int,
        type: int,
        proto: int,
        flags: int,
    ) -> list[_AddrInfo]:
        with trio.move_on_after(self._timeout):
            return await self._getaddrinfo(host, port, family, type, proto, flags)
        raise socket.gaierror(socket.EAI_AGAIN, f"getaddrinfo took longer than {self._timeout:g}s")

    # --- wiring -------------------------------------------------------------------------------

    def install(self) -> None:
        """Make trio's ``getaddrinfo`` (and so ``open_tcp_stream``) use this resolver.

        Call inside ``trio.run`` (trio keeps the hook per run), once; a second call does nothing.
        """
        if self._installed:
            return
        previous = trio.socket.set_custom_hostname_resolver(_TrioAdapter(self))
        self._inner = _unwrap(previous)
        self._installed = True

    def reconfigure(self, config: DnsConfig) -> None:
        """A config reload: overrides, TTLs, cache size, the query cap and the timeout apply to
        lookups from now on (a lookup under way keeps its deadline; cached answers keep theirs)."""
        self._hosts = {name.lower(): address for name, address in config.hosts.items()}
        cache = self._cache
        cache.ttl = config.ttl
        cache.negative_ttl = config.negative_ttl
        cache.resize(config.cache_size)
        # Raising wakes queued queries at once; lowering lets the running ones finish.
        self._limiter.total_tokens = config.max_concurrent
        self._timeout = config.timeout

    def stats(self) -> DnsStats:
        limiter = self._limiter.statistics()
        return DnsStats(
            entries=self._cache.size,
            capacity=self._cache.capacity,
            hits=self.hits,
            negative_hits=self.negative_hits,
            overrides=self.overrides,
            misses=self.misses,
            queries=self.queries,
            coalesced=self.coalesced,
            errors=self.errors,
            timeouts=self.timeouts,
            evictions=self._cache.evictions,
            in_flight=len(self._flights),
            running=int(limiter.borrowed_tokens),
            waiting=limiter.tasks_waiting,
        )

    def cache_entries(self, limit: int) -> list[tuple[str, tuple[str, ...], str | None, float]]:
        """``(host, addresses, error, seconds left)`` of up to ``limit`` cached names, most
        recently used first (a negative ``seconds left``: expired, not yet dropped)."""
        now = self._clock()
        return [
            (host, entry.addresses, None, entry.expires - now)
            if isinstance(entry, Hit)
            else (host, (), entry.error, entry.expires - now)
            for host, entry in self._cache.newest(limit)
        ]

    def metric_families(self) -> Iterator[Metric]:
        """Scrape-time gauges: ``metrics.add_stats_provider(resolver.metric_families)``."""
        return dns_gauges(self._cache.size)


class _TrioAdapter(trio.abc.HostnameResolver):
    """trio's hostname-resolver hook, answered from ``Resolver`` (see the module docstring)."""

    __slots__ = ("resolver",)

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver

    async def getaddrinfo(
        self,
        host: bytes | None,
        port: bytes | str | int | None,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[_AddrInfo]:
        resolver = self.resolver
        port_number = _maybe_port_number(port)
        kind = _KINDS.get(type)
        name = _maybe_ascii(host)
        if (
            name is None
            or port_number is None
            or kind is None
            or flags
            or proto not in (0, kind[1])
            or family not in _FAMILIES
        ):
            # Not a plain "addresses of this name" question: the inner resolver answers, uncached.
            return await resolver._uncached(host, port, family, type, proto, flags)
        try:
            addresses = await resolver.resolve(name, port_number)
        except DnsTimeout as exc:
            raise socket.gaierror(socket.EAI_AGAIN, exc.detail) from exc
        except DnsError as exc:
            raise socket.gaierror(socket.EAI_NONAME, exc.detail) from exc
        sock_type, sock_proto = kind
        infos: list[_AddrInfo] = []
        for address in addresses:
            if ":" in address:
                if family != socket.AF_INET:
                    sockaddr = _sockaddr6(address, port_number)
                    infos.append((socket.AF_INET6, sock_type, sock_proto, "", sockaddr))
            elif family != socket.AF_INET6:
                infos.append((socket.AF_INET, sock_type, sock_proto, "", (address, port_number)))
        if not infos:
            raise socket.gaierror(socket.EAI_NONAME, f"{name} has no address of family {family}")
        return infos

    async def getnameinfo(
        self, sockaddr: tuple[str, int] | tuple[str, int, int, int], flags: int
    ) -> tuple[str, str]:
        return await self.resolver._getnameinfo(sockaddr, flags)


# --- small helpers ----------------------------------------------------------------------------


def _blocking_getaddrinfo(
    host: bytes | None,
    port: bytes | str | int | None,
    family: int,
    type: int,
    proto: int,
    flags: int,
) -> list[_AddrInfo]:
    """Runs in a worker thread; ``_system_getaddrinfo`` is looked up per call (tests fake it)."""
    infos: list[_AddrInfo] = list(_system_getaddrinfo(host, port, family, type, proto, flags))
    return infos


def _unwrap(resolver: trio.abc.HostnameResolver | None) -> trio.abc.HostnameResolver | None:
    """The resolver under an installed ``Resolver`` (one level: its ``_inner`` is unwrapped)."""
    if isinstance(resolver, _TrioAdapter):
        return resolver.resolver._inner
    return resolver


def _a_labels(host: str) -> str:
    """IDNA 2008 (UTS 46) as trio encodes names, so the cache key is what trio would look up."""
    try:
        return idna.encode(host, uts46=True).decode("ascii")
    except UnicodeError:
        raise DnsError(f"cannot resolve {host}: not a valid host name") from None


def _maybe_ip_literal(name: str) -> str | None:
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    try:
        # Never blocks: AI_NUMERICHOST forbids a query (trio's own numeric test).
        infos = socket.getaddrinfo(name, None, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
    except (OSError, UnicodeError, ValueError):
        return None
    return _address_text(infos[0][0], infos[0][4])


def _address_text(family: int, sockaddr: tuple[Any, ...]) -> str:
    """An address string; a scoped IPv6 address keeps its scope id (``fe80::1%2``)."""
    if family == socket.AF_INET6 and len(sockaddr) >= 4 and sockaddr[3]:
        return f"{sockaddr[0]}%{sockaddr[3]}"
    return str(sockaddr[0])


def _sockaddr6(address: str, port: int) -> tuple[str, int, int, int]:
    if "%" not in address:
        return (address, port, 0, 0)
    # socket.connect takes the scope from the tuple, not from the text.
    text, _, scope = address.partition("%")
    return (text, port, 0, int(scope) if scope.isdigit() else socket.if_nametoindex(scope))


def _maybe_port_number(port: bytes | str | int | None) -> int | None:
    if port is None:
        return 0
    if isinstance(port, int):
        number = port
    else:
        try:
            number = int(port)
        except ValueError:
            return None  # a service name ("http"): left to the inner resolver
    return number if 0 <= number <= 65535 else None


def _maybe_ascii(host: bytes | str | None) -> str | None:
    if host is None:
        return None
    if isinstance(host, str):
        return host
    try:
        return host.decode("ascii")
    except UnicodeDecodeError:
        return None

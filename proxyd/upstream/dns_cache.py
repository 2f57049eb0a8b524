"""The host name cache behind ``upstream.dns``: pure bookkeeping, no trio, no clock.

How it works: one ``OrderedDict`` maps a normalised host name (lower-case A-labels) to the entry
that answers it, oldest use first. An entry is either a ``Hit`` (the addresses of a lookup that
succeeded, kept ``ttl`` seconds) or a ``NegativeHit`` (the message of a lookup that failed, kept
``negative_ttl`` seconds, so a name that does not resolve does not cost a query per request).
Time comes in as ``now``; an entry answers while ``now < expires``.

``get`` returns the stored entry itself (no allocation on a hit) and moves it to the young end;
an expired entry is dropped when it is read and the answer is ``MISS``. ``put`` and
``put_failure`` insert at the young end and evict from the old end until at most ``capacity``
entries remain (LRU). Expired entries that are never read again stay until they are evicted, so
``size`` counts them too: it is bounded by ``capacity`` either way.

A capacity of 0 turns the cache off, a ``negative_ttl`` of 0 turns negative caching off. The TTLs
are fixed by config: ``getaddrinfo`` does not report the records' own TTLs. A reload may change
``ttl`` and ``negative_ttl`` (new entries get them) and ``resize`` the cache.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Final


@dataclass(frozen=True, slots=True)
class Hit:
    """A cached answer: the addresses in the order the resolver gave them (RFC 6724 sorted)."""

    addresses: tuple[str, ...]
    expires: float


@dataclass(frozen=True, slots=True)
class NegativeHit:
    """A cached failure: the message to repeat until ``expires``."""

    error: str
    expires: float


@dataclass(frozen=True, slots=True)
class Miss:
    """Nothing cached (or it expired): a query is needed."""


MISS: Final = Miss()

Lookup = Hit | NegativeHit | Miss


class DnsCache:
    """An LRU map of host name -> ``Hit`` | ``NegativeHit`` with per-entry expiry."""

    __slots__ = ("_entries", "capacity", "evictions", "negative_ttl", "ttl")

    def __init__(self, capacity: int, ttl: float, negative_ttl: float) -> None:
        self.capacity = capacity
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.evictions = 0
        self._entries: OrderedDict[str, Hit | NegativeHit] = OrderedDict()

    @property
    def size(self) -> int:
        return len(self._entries)

    def get(self, host: str, now: float) -> Lookup:
        entry = self._entries.get(host)
        if entry is None:
            return MISS
        if now >= entry.expires:
            del self._entries[host]
            return MISS
        self._entries.move_to_end(host)
        return entry

    def put(self, host: str, addresses: Sequence[str], now: float) -> None:
        if self.capacity <= 0:
            return
        self._store(host, Hit(tuple(addresses), now + self.ttl))

    def put_failure(self, host: str, error: str, now: float) -> None:
        if self.capacity <= 0:
            return
        if self.negative_ttl <= 0:
            # Not caching failures: an older answer must not outlive the failure either.
            self._entries.pop(host, None)
            return
        self._store(host, NegativeHit(error, now + self.negative_ttl))

    def newest(self, limit: int) -> list[tuple[str, Hit | NegativeHit]]:
        """Up to ``limit`` entries, most recently used first (read-only, for the status page)."""
        return list(islice(reversed(self._entries.items()), limit))

    def resize(self, capacity: int) -> None:
        """A new capacity (a config reload): the oldest entries go at once when it shrank."""
        self.capacity = capacity
        entries = self._entries
        while len(entries) > max(capacity, 0):
            entries.popitem(last=False)
            self.evictions += 1

    def _store(self, host: str, entry: Hit | NegativeHit) -> None:
        entries = self._entries
        entries[host] = entry
        entries.move_to_end(host)
        while len(entries) > self.capacity:
            entries.popitem(last=False)
            self.evictions += 1

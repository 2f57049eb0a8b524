"""A small LRU of PAC results with optional per-entry expiry (pure: time comes in as ``now``).

The router stores a parsed route list under ``(script version, scheme, host)`` (or the whole URL
when the script reads it; see pac/script.py) for scripts that do not depend on the time of day.
Results that needed DNS answers are stored with a time to live (``dns.ttl``): the script's answer
is only as fresh as the addresses it saw. Others live until they are the least recently used entry
when the cache is full (``pac.cache_size``; 0 turns the cache off) or until a new script version
clears it. ``get`` moves a hit to the most-recent end; an expired entry is dropped when looked up.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LruCache(Generic[K, V]):
    __slots__ = ("_entries", "capacity")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[K, tuple[V, float | None]] = OrderedDict()

    def get(self, key: K, now: float) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        value, expires = entry
        if expires is not None and expires <= now:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key: K, value: V, now: float, ttl: float | None = None) -> None:
        if self.capacity <= 0:
            return
        self._entries[key] = (value, None if ttl is None else now + ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

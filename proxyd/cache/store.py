"""The cache store: a SQLite (WAL) index and one body file per entry.

API CONTRACT (skeleton written first; cache/transaction.py and cache/coalesce.py are built against
these names and shapes — keep them, add what you need).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from proxyd.cache.policy import Header, Stored


class StoreError(Exception):
    """Storing failed (disk full, I/O error); the response still goes to the client."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored response (a variant of a key)."""

    entry_id: int
    key: str
    stored: Stored  # status, headers, times, variant, body_size
    reason: bytes
    body_name: str  # file name under bodies/


@dataclass(frozen=True, slots=True)
class StoreStats:
    entries: int
    bytes: int
    evictions: int
    errors: int
    paused: bool


class BodyWriter:
    """A body being stored: appended in order, then committed (or aborted)."""

    #: bytes written so far (followers may read up to here)
    written: int

    async def write(self, data: bytes) -> None:
        """Append; raises StoreError on I/O failure (the writer is then aborted)."""
        raise NotImplementedError

    def open_follower(self) -> BodyReader:
        """A reader of the bytes written so far and of those still to come (read-while-write);
        valid after commit or abort too (it keeps the file open)."""
        raise NotImplementedError

    async def commit(self) -> Entry | None:
        """Make the entry visible (file renamed, then the index row committed, replacing an entry
        of the same key and variant). None when it was not kept (too large, paused, error)."""
        raise NotImplementedError

    async def abort(self) -> None:
        raise NotImplementedError


class BodyReader:
    async def read(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset`` (b"" at the current end)."""
        raise NotImplementedError

    def cached(self) -> bytes | None:
        """The whole body when it is held in memory (small, hot entries), else None."""
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError


class CacheStore:
    @classmethod
    async def open(
        cls,
        directory: Path,
        *,
        max_size: int,
        max_object_size: int,
        memory_object_size: int,
        memory_size: int,
    ) -> CacheStore:
        raise NotImplementedError

    async def lookup(self, key: str) -> list[Entry]:
        raise NotImplementedError

    async def begin(
        self,
        key: str,
        variant: bytes,
        status: int,
        reason: bytes,
        headers: list[Header],
        request_time: float,
        response_time: float,
        expected_size: int | None,
    ) -> BodyWriter | None:
        """Start storing; None when storing is paused or the declared size is too large."""
        raise NotImplementedError

    async def open_body(self, entry: Entry) -> BodyReader | None:
        """None when the entry's file is gone (evicted or purged since the lookup)."""
        raise NotImplementedError

    async def update(
        self, entry: Entry, headers: list[Header], request_time: float, response_time: float
    ) -> Entry:
        """§3.2/§4.3.4: store freshened headers and times of an entry after a 304."""
        raise NotImplementedError

    async def invalidate(self, key: str) -> int:
        """Remove every variant of ``key`` (purge, §4.4 invalidation); returns how many."""
        raise NotImplementedError

    def touch(self, entry: Entry) -> None:
        """Record a use (LRU); written to the index in batches."""
        raise NotImplementedError

    def stats(self) -> StoreStats:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError

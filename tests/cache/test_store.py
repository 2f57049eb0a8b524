"""The cache store on real files and a real SQLite index in tmp_path.

Multi-process behaviour (kill -9 in the middle of a write, two processes sharing a directory)
runs tests/cache/store_child.py as child processes; disk full runs on a tiny tmpfs the test
mounts (root only, skipped otherwise).
"""

from __future__ import annotations

import fcntl
import gc
import hashlib
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from proxyd.cache import store as store_module
from proxyd.cache.policy import Header
from proxyd.cache.store import (
    READ_CHUNK,
    WRITE_CHUNK,
    BodyReader,
    CacheStore,
    Entry,
    StoreError,
    decode_headers,
    encode_headers,
)

_T = TypeVar("_T")

CHILD = Path(__file__).with_name("store_child.py")
REPO = Path(__file__).resolve().parents[2]

NOW = 1_700_000_000.0


async def open_store(
    directory: Path,
    *,
    max_size: int = 1 << 30,
    max_object_size: int = 64 << 20,
    memory_object_size: int = 64 << 10,
    memory_size: int = 32 << 20,
    **extra: Any,
) -> CacheStore:
    return await CacheStore.open(
        directory,
        max_size=max_size,
        max_object_size=max_object_size,
        memory_object_size=memory_object_size,
        memory_size=memory_size,
        **extra,
    )


async def put(
    store: CacheStore,
    key: str,
    body: bytes,
    *,
    variant: bytes = b"",
    headers: list[Header] | None = None,
    chunk: int = 64 << 10,
) -> Entry:
    writer = await store.begin(
        key,
        variant,
        200,
        b"OK",
        headers or [(b"Content-Type", b"text/plain")],
        NOW,
        NOW + 1,
        len(body),
    )
    assert writer is not None
    for offset in range(0, len(body), chunk):
        await writer.write(body[offset : offset + chunk])
    entry = await writer.commit()
    assert entry is not None
    return entry


async def read_all(reader: BodyReader, piece: int = 1 << 20) -> bytes:
    parts: list[bytes] = []
    offset = 0
    while True:
        data = await reader.read(offset, piece)
        assert len(data) <= min(piece, READ_CHUNK)
        if not data:
            return b"".join(parts)
        parts.append(data)
        offset += len(data)


async def read_all_from(reader: BodyReader, offset: int, piece: int = 1 << 20) -> bytes:
    parts: list[bytes] = []
    while data := await reader.read(offset, piece):
        parts.append(data)
        offset += len(data)
    return b"".join(parts)


async def body_of(store: CacheStore, entry: Entry) -> bytes:
    reader = await store.open_body(entry)
    assert reader is not None
    try:
        return await read_all(reader)
    finally:
        await reader.aclose()


def files(directory: Path, sub: str) -> list[Path]:
    return sorted(p for p in (directory / sub).rglob("*") if p.is_file())


def set_aside(directory: Path) -> list[Path]:
    """The index files set aside (without their -wal/-shm companions)."""
    return [p for p in directory.glob("index.sqlite.corrupt-*") if p.name[-1].isdigit()]


def pattern(size: int, seed: int = 0) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB, not all one byte
    return (block * (size // len(block) + 1))[:size]


# --- round trips ----------------------------------------------------------------------------

ODD_HEADERS: list[Header] = [
    (b"Content-Type", b"text/html; charset=utf-8"),
    (b"set-COOKIE", b"a=1"),
    (b"Set-Cookie", b"b=2"),
    (b"X-Latin1", bytes(range(0x80, 0x100))),
    (b"X-Empty", b""),
    (b"x-colon", b"a: b, c"),
    (b"ETag", b'"v1"'),
]


def test_headers_blob_round_trips_exactly() -> None:
    for headers in ([], ODD_HEADERS, [(b"A", b"x" * 70000)]):
        assert decode_headers(encode_headers(headers)) == tuple(headers)
    with pytest.raises(ValueError):
        decode_headers(encode_headers(ODD_HEADERS)[:-3])


async def test_round_trip_small_body_headers_and_reopen(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    body = b"hello, cache"
    entry = await put(store, "http://a/x", body, headers=ODD_HEADERS)
    assert entry.stored.headers == tuple(ODD_HEADERS)
    assert (entry.stored.status, entry.reason, entry.stored.body_size) == (200, b"OK", len(body))
    assert (entry.stored.request_time, entry.stored.response_time) == (NOW, NOW + 1)
    found = await store.lookup("http://a/x")
    assert found == [entry]
    reader = await store.open_body(entry)
    assert reader is not None and reader.cached() == body
    assert await reader.read(7, 100) == b"cache"
    # on disk: exactly the body, under bodies/xx/<token>, nothing left in tmp/
    (path,) = files(tmp_path, "bodies")
    assert path.read_bytes() == body
    assert f"{path.parent.name}/{path.name}" == entry.body_name
    assert files(tmp_path, "tmp") == []
    assert store.stats().entries == 1 and store.stats().bytes == len(body)
    await store.aclose()
    await store.aclose()  # idempotent

    again = await open_store(tmp_path)
    try:
        (reread,) = await again.lookup("http://a/x")  # decoded from SQLite this time
        assert reread == entry
        assert await body_of(again, reread) == body
        assert again.stats().entries == 1
    finally:
        await again.aclose()


async def test_round_trip_large_body_in_chunks(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    try:
        body = os.urandom(20 << 20)
        entry = await put(store, "big", body, chunk=60_000)
        (found,) = await store.lookup("big")
        reader = await store.open_body(found)
        assert reader is not None
        assert reader.cached() is None  # far beyond memory_object_size
        assert await read_all(reader, piece=4 << 20) == body  # read() caps at 1 MiB
        assert await reader.read(len(body), 10) == b""
        await reader.aclose()
        assert (tmp_path / "bodies" / entry.body_name).stat().st_size == len(body)
        assert files(tmp_path, "tmp") == []
    finally:
        await store.aclose()


async def test_empty_body(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    try:
        entry = await put(store, "empty", b"")
        assert entry.stored.body_size == 0
        reader = await store.open_body(entry)
        assert reader is not None and await read_all(reader) == b""
    finally:
        await store.aclose()


# --- replacing, variants, invalidation, update ----------------------------------------------


async def test_variant_replacement_and_several_variants(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    try:
        first = await put(store, "k", b"gzip one", variant=b"gzip")
        other = await put(store, "k", b"br body", variant=b"br")
        second = await put(store, "k", b"gzip two", variant=b"gzip")
        found = await store.lookup("k")
        assert sorted(e.stored.variant for e in found) == [b"br", b"gzip"]
        assert found[0] == second  # newest first
        by_variant = {e.stored.variant: e for e in found}
        assert await body_of(store, by_variant[b"gzip"]) == b"gzip two"
        assert await body_of(store, by_variant[b"br"]) == b"br body"
        # the replaced file is removed (after its row); the others stay
        names = {f"{p.parent.name}/{p.name}" for p in files(tmp_path, "bodies")}
        assert names == {other.body_name, second.body_name}
        assert first.body_name not in names
        assert await store.open_body(first) is None
        assert store.stats().entries == 2
    finally:
        await store.aclose()


async def test_invalidate_removes_every_variant(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    try:
        await put(store, "k", b"a" * 100, variant=b"a")
        await put(store, "k", b"b" * 100_000, variant=b"b")
        kept = await put(store, "other", b"keep")
        assert await store.invalidate("k") == 2
        assert await store.lookup("k") == []
        assert await store.invalidate("k") == 0
        names = {f"{p.parent.name}/{p.name}" for p in files(tmp_path, "bodies")}
        assert names == {kept.body_name}
        assert store.stats().entries == 1 and store.stats().bytes == 4
    finally:
        await store.aclose()


async def test_writer_begun_before_an_invalidation_is_not_kept(tmp_path: Path) -> None:
    # RFC 9111 §4.4: a response still on its way when its URI is invalidated must not bring the
    # old content back, however the commit and the invalidation interleave.
    store = await open_store(tmp_path)
    try:
        writer = await store.begin("k", b"", 200, b"OK", [], NOW, NOW, 3)
        assert writer is not None
        follower = writer.open_follower()
        await writer.write(b"old")
        assert await store.invalidate("k") == 0  # nothing stored yet
        assert await writer.commit() is None
        assert await read_all(follower) == b"old"  # a reader that had it keeps it
        await follower.aclose()
        assert await store.lookup("k") == []
        assert files(tmp_path, "tmp") == [] and files(tmp_path, "bodies") == []
        assert store.stats().errors == 0 and not store.stats().paused
        # ... while a writer begun after the invalidation, and other keys, are kept
        later = await put(store, "k", b"new")
        assert await store.lookup("k") == [later]
    finally:
        await store.aclose()


async def test_update_after_304_keeps_body_and_persists(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    entry = await put(store, "k", b"same body", headers=[(b"ETag", b'"1"'), (b"Age", b"5")])
    fresh: list[Header] = [(b"ETag", b'"1"'), (b"Cache-Control", b"max-age=60")]
    updated = await store.update(entry, fresh, NOW + 100, NOW + 101)
    assert updated.entry_id == entry.entry_id and updated.body_name == entry.body_name
    assert updated.stored.headers == tuple(fresh)
    assert (updated.stored.request_time, updated.stored.response_time) == (NOW + 100, NOW + 101)
    assert await store.lookup("k") == [updated]
    await store.aclose()
    again = await open_store(tmp_path)
    try:
        assert await again.lookup("k") == [updated]
        assert await body_of(again, updated) == b"same body"
    finally:
        await again.aclose()


# --- size limits ----------------------------------------------------------------------------


async def test_lru_eviction_follows_touch(tmp_path: Path) -> None:
    store = await open_store(tmp_path, max_size=3000, memory_size=0)
    try:
        a = await put(store, "a", b"a" * 1000)
        b = await put(store, "b", b"b" * 1000)
        c = await put(store, "c", b"c" * 1000)
        store.touch(a)  # a is now more recent than b and c
        d = await put(store, "d", b"d" * 1000)  # 4000 > 3000: one must go, the LRU: b
        assert await store.lookup("b") == []
        assert [e.key for k in "acd" for e in await store.lookup(k)] == ["a", "c", "d"]
        assert await store.open_body(b) is None
        stats = store.stats()
        assert (stats.entries, stats.bytes, stats.evictions) == (3, 3000, 1)
        names = {f"{p.parent.name}/{p.name}" for p in files(tmp_path, "bodies")}
        assert names == {a.body_name, c.body_name, d.body_name}
    finally:
        await store.aclose()


@pytest.mark.parametrize("granularity", [0.0, 3600.0])
async def test_a_use_is_recorded_once_per_touch_granularity(
    tmp_path: Path, granularity: float
) -> None:
    """An entry's use is recorded at most once per ``touch_granularity`` (the LRU's precision):
    within it, a later use of ``a`` does not make it more recent than ``b``, so a hot entry costs
    one index write per period, not one per hit."""
    store = await open_store(tmp_path, max_size=3000, memory_size=0, touch_granularity=granularity)
    try:
        a = await put(store, "a", b"a" * 1000)
        b = await put(store, "b", b"b" * 1000)
        c = await put(store, "c", b"c" * 1000)
        for entry in (a, b, c, a):  # the last use of a is the most recent one of all
            store.touch(entry)
        await put(store, "d", b"d" * 1000)  # one must go: the least recently recorded
        gone = [k for k in "abc" if not await store.lookup(k)]
        assert gone == (["b"] if granularity == 0 else ["a"])
    finally:
        await store.aclose()


async def test_touches_are_written_to_the_index(tmp_path: Path) -> None:
    # Another process (here: the next open) must evict by the access times this one recorded.
    store = await open_store(tmp_path, max_size=3000)
    a = await put(store, "a", b"a" * 1000)
    await put(store, "b", b"b" * 1000)
    await put(store, "c", b"c" * 1000)
    store.touch(a)
    await store.aclose()  # flushes the batch
    again = await open_store(tmp_path, max_size=3000)
    try:
        await put(again, "d", b"d" * 1000)
        assert await again.lookup("b") == []
        assert len(await again.lookup("a")) == 1
    finally:
        await again.aclose()


async def test_touch_batches_flush_in_the_background(tmp_path: Path) -> None:
    store = await open_store(tmp_path, touch_batch=3, touch_interval=3600)
    try:
        entries = [await put(store, k, k.encode()) for k in "abc"]
        db = sqlite3.connect(tmp_path / "index.sqlite")
        before = dict(db.execute("SELECT key, access_time FROM entries").fetchall())
        for entry in entries:
            store.touch(entry)  # the third one starts a flush
        with trio.fail_after(5):
            while True:
                now = dict(db.execute("SELECT key, access_time FROM entries").fetchall())
                if all(now[k] > before[k] for k in "abc"):
                    break
                await trio.sleep(0.01)
        db.close()
    finally:
        await store.aclose()


async def test_max_object_size_declared_and_discovered(tmp_path: Path) -> None:
    store = await open_store(tmp_path, max_object_size=100_000)
    try:
        assert await store.begin("k", b"", 200, b"OK", [], NOW, NOW, 100_001) is None
        writer = await store.begin("k", b"", 200, b"OK", [], NOW, NOW, None)
        assert writer is not None
        follower = writer.open_follower()
        body = pattern(600_000)
        for offset in range(0, len(body), 50_000):
            await writer.write(body[offset : offset + 50_000])
        assert writer.is_too_large
        assert await read_all(follower) == body  # followers still get every byte
        assert await writer.commit() is None
        assert await read_all(follower) == body  # ... also once it is dropped
        await follower.aclose()
        assert await store.lookup("k") == []
        assert files(tmp_path, "tmp") == [] and files(tmp_path, "bodies") == []
        assert store.stats().errors == 0 and not store.stats().paused
    finally:
        await store.aclose()


# --- read while write -----------------------------------------------------------------------


async def test_follower_reads_while_writing_and_after_commit(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    try:
        writer = await store.begin("k", b"", 200, b"OK", [], NOW, NOW, None)
        assert writer is not None
        follower = writer.open_follower()
        assert await follower.read(0, 100) == b""
        body = pattern(3 * WRITE_CHUNK + 12345)
        await writer.write(body[:1000])  # still in the writer's buffer
        assert writer.written == 1000
        assert await follower.read(0, 5000) == body[:1000]
        assert await follower.read(1000, 5000) == b""
        await writer.write(body[1000 : 2 * WRITE_CHUNK])  # now in the file
        assert len(files(tmp_path, "tmp")) == 1
        assert await read_all(follower) == body[: 2 * WRITE_CHUNK]
        await writer.write(body[2 * WRITE_CHUNK :])
        assert await follower.read(2 * WRITE_CHUNK, len(body)) == body[2 * WRITE_CHUNK :]
        entry = await writer.commit()
        assert entry is not None
        assert await read_all(follower) == body  # the file was renamed under it
        late = writer.open_follower()  # opened after the commit
        assert await read_all(late) == body
        await follower.aclose()
        await late.aclose()
        assert files(tmp_path, "tmp") == []
        await writer.abort()  # after commit: nothing
        assert await body_of(store, entry) == body
    finally:
        await store.aclose()


async def test_follower_survives_abort(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    try:
        writer = await store.begin("k", b"", 200, b"OK", [], NOW, NOW, None)
        assert writer is not None
        follower = writer.open_follower()
        body = pattern(WRITE_CHUNK + 5000)  # part in the file, part still buffered
        await writer.write(body)
        await writer.abort()
        assert files(tmp_path, "tmp") == []
        assert await read_all(follower) == body
        await follower.aclose()
        with pytest.raises(StoreError):
            writer.open_follower()
        with pytest.raises(StoreError):
            await writer.write(b"more")
        assert await writer.commit() is None
        assert await store.lookup("k") == []
    finally:
        await store.aclose()


# --- the memory copies ----------------------------------------------------------------------


async def test_memory_hit_does_not_leave_the_loop(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    try:
        entry = await put(store, "k", b"small body")
        assert await store.lookup("missing") == []
        # Any thread hop (or other checkpoint) inside an already-cancelled scope raises
        # Cancelled: so these complete only if they never leave the event loop.
        with trio.CancelScope() as scope:
            scope.cancel()
            found = await store.lookup("k")
            reader = await store.open_body(found[0])
            missing = await store.lookup("missing")
            store.touch(found[0])
        assert not scope.cancelled_caught
        assert found == [entry] and missing == []
        assert reader is not None and reader.cached() == b"small body"
        assert await reader.read(0, 5) == b"small"
    finally:
        await store.aclose()


async def held_in_memory(store: CacheStore, entry: Entry) -> bool:
    """Whether open_body answers without a thread hop (see the test above)."""
    with trio.CancelScope() as scope:
        scope.cancel()
        reader = await store.open_body(entry)
        assert reader is not None and reader.cached() is not None
    return not scope.cancelled_caught


async def test_memory_tier_is_bounded(tmp_path: Path) -> None:
    store = await open_store(tmp_path, memory_object_size=1000, memory_size=2500)
    try:
        a, b, c = [await put(store, k, k.encode() * 1000) for k in "abc"]
        big = await put(store, "big", b"x" * 1001)
        # 2500 bytes hold two bodies: c pushed a out; big was never eligible
        assert [await held_in_memory(store, e) for e in (a, b, c, big)] == [
            False,
            True,
            True,
            False,
        ]
        reader = await store.open_body(a)  # read from its file, and held from now on
        assert reader is not None and reader.cached() == b"a" * 1000
        assert await held_in_memory(store, a)
        big_reader = await store.open_body(big)
        assert big_reader is not None and big_reader.cached() is None
        await big_reader.aclose()
    finally:
        await store.aclose()


async def test_other_connection_changes_are_seen(tmp_path: Path) -> None:
    # version_check_interval=0: every lookup asks SQLite whether another connection committed
    # (by default, lookups in a burst may be up to 5 ms stale: see the key filter tests below).
    first = await open_store(tmp_path, version_check_interval=0)
    second = await open_store(tmp_path, version_check_interval=0)
    try:
        entry = await put(first, "k", b"v1", variant=b"a")
        assert await first.lookup("k") == [entry]  # in first's memory copy now
        assert await second.lookup("k") == [entry]
        assert await second.invalidate("k") == 1
        assert await first.lookup("k") == []
        newer = await put(second, "k", b"v2", variant=b"b")
        assert await first.lookup("k") == [newer]
        assert await body_of(first, newer) == b"v2"
        # first's own write replaces what second cached
        mine = await put(first, "k", b"v3", variant=b"b")
        assert await second.lookup("k") == [mine]
    finally:
        await first.aclose()
        await second.aclose()


async def test_open_body_is_none_when_the_file_is_gone(tmp_path: Path) -> None:
    store = await open_store(tmp_path, memory_object_size=10)
    try:
        entry = await put(store, "k", b"larger than the memory tier")
        (tmp_path / "bodies" / entry.body_name).unlink()
        assert await store.open_body(entry) is None
    finally:
        await store.aclose()


async def on_the_loop(call: Callable[..., Awaitable[_T]], *args: Any) -> _T:
    """``await call(*args)``, asserting that it never leaves the event loop: any thread hop (or
    other checkpoint) inside an already-cancelled scope raises Cancelled."""
    with trio.CancelScope() as scope:
        scope.cancel()
        result = await call(*args)
    assert not scope.cancelled_caught, "left the event loop"
    return result


def fds_on(path: Path) -> int:
    """How many of our descriptors are open on ``path`` (an unlinked file reads "(deleted)")."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") in (str(path), f"{path} (deleted)"):
                count += 1
    return count


@pytest.fixture
def thread_hops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the functions run in worker threads from now on (the real
    trio.to_thread.run_sync runs them; this only counts; also shielded hops, which
    ``on_the_loop`` cannot see)."""
    calls: list[str] = []
    real = trio.to_thread.run_sync

    async def counting(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        calls.append(getattr(fn, "__qualname__", repr(fn)))
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", counting)
    return calls


def holds_bytes(obj: object, size: int) -> bool:
    """Whether ``obj`` references a bytes object of at least ``size`` bytes."""
    return any(isinstance(o, bytes) and len(o) >= size for o in gc.get_referents(obj))


# --- the key filter: negative lookups without SQLite ----------------------------------------


async def test_unknown_keys_are_answered_without_a_thread_hop(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    try:
        entry = await put(store, "http://a/stored", b"x")
        for n in range(50):
            assert await on_the_loop(store.lookup, f"http://a/never-{n}") == []
        assert await on_the_loop(store.lookup, "http://a/stored") == [entry]
    finally:
        await store.aclose()
    # A new store fills the filter from the index at open: stored keys are found (SQLite read
    # in a thread, since the memory copy of rows starts empty), unknown ones answered at once.
    again = await open_store(tmp_path)
    try:
        assert await on_the_loop(again.lookup, "http://a/never-0") == []
        assert await again.lookup("http://a/stored") == [entry]
    finally:
        await again.aclose()


async def test_key_stored_by_another_instance_becomes_visible(tmp_path: Path) -> None:
    a = await open_store(tmp_path, version_check_interval=0)
    b = await open_store(tmp_path)
    try:
        assert await on_the_loop(a.lookup, "k") == []
        stored = [await put(b, key, key.encode()) for key in ("k", "l", "m")]
        for entry in stored:
            assert await a.lookup(entry.key) == [entry]
        assert await body_of(a, stored[0]) == b"k"
        assert a.stats().entries == 3  # the catch-up reads the other instance's totals too
        # SQLite hands out max(id) + 1 unless the table is AUTOINCREMENT: B deleting its newest
        # row and storing another key would reuse that id, and A (having seen it) would never
        # look at it again.
        assert await b.invalidate("m") == 1
        newer = await put(b, "n", b"n")
        assert newer.entry_id > stored[-1].entry_id
        assert await a.lookup("n") == [newer]
        assert await a.lookup("m") == []
    finally:
        await a.aclose()
        await b.aclose()


async def test_another_instance_commit_is_seen_within_the_check_interval(tmp_path: Path) -> None:
    a = await open_store(tmp_path)  # the default version_check_interval
    b = await open_store(tmp_path)
    try:
        assert await a.lookup("k") == []
        entry = await put(b, "k", b"v")
        with trio.fail_after(5):
            while not (found := await a.lookup("k")):  # noqa: ASYNC110 (polling is the point)
                await trio.sleep(0.002)
        assert found == [entry]
    finally:
        await a.aclose()
        await b.aclose()


async def test_lookups_in_a_burst_share_one_version_check(tmp_path: Path) -> None:
    # An hour-long interval: every lookup below is in one burst, so only the first one asks
    # SQLite whether another connection committed.
    mine = await open_store(tmp_path, version_check_interval=3600)
    other = await open_store(tmp_path)
    try:
        assert await mine.lookup("theirs") == []
        theirs = await put(other, "theirs", b"x")
        assert await on_the_loop(mine.lookup, "theirs") == []  # not checked: stale
        ours = await put(mine, "ours", b"y")
        assert await on_the_loop(mine.lookup, "ours") == [ours]  # own commits: at once
        # Our commit's transaction caught up with the other connection's commit on its way.
        assert await mine.lookup("theirs") == [theirs]
    finally:
        await mine.aclose()
        await other.aclose()


async def test_key_filter_forgets_deleted_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Keys of evicted rows stay in the filter until it holds more than twice the entries
    # plus KEY_FILTER_SLACK; then it is rebuilt from the index (memory stays bounded).
    monkeypatch.setattr(store_module, "KEY_FILTER_SLACK", 8)
    store = await open_store(tmp_path, max_size=5000, memory_size=0)
    try:
        last = [await put(store, f"k{n}", b"x" * 1000) for n in range(40)][-1]
        assert store.stats().entries == 5
        assert await on_the_loop(store.lookup, "k0") == []
        assert await store.lookup("k39") == [last]
    finally:
        await store.aclose()


async def test_version_1_index_is_upgraded_in_place(tmp_path: Path) -> None:
    # An index as version 1 wrote it (ids were not AUTOINCREMENT), with two live entries.
    index = tmp_path / "index.sqlite"
    db = sqlite3.connect(index, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.executescript(V1_SCHEMA)
    bodies = {"a": b"body of a", "b": b"b" * 70_000}
    for entry_id, (key, body) in enumerate(bodies.items(), start=1):
        name = f"0{entry_id}/0{entry_id}{key}"
        (tmp_path / "bodies" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "bodies" / name).write_bytes(body)
        db.execute(
            "INSERT INTO entries VALUES (?, ?, x'', 200, x'4f4b', ?, ?, ?, ?, ?, ?)",
            (entry_id, key, encode_headers([(b"ETag", b'"1"')]), NOW, NOW, name, len(body), NOW),
        )
    db.close()
    store = await open_store(tmp_path)
    try:
        for key, body in bodies.items():
            (entry,) = await store.lookup(key)
            assert entry.stored.headers == ((b"ETag", b'"1"'),)
            assert await body_of(store, entry) == body
        assert store.stats().entries == 2
        assert store.stats().bytes == sum(len(b) for b in bodies.values())
        assert set_aside(tmp_path) == []
        # ids are never reused now, also after the newest row is deleted
        newest = await put(store, "c", b"c")
        assert await store.invalidate("c") == 1
        assert (await put(store, "d", b"d")).entry_id > newest.entry_id
    finally:
        await store.aclose()
    db = sqlite3.connect(index)
    (version,) = db.execute("PRAGMA user_version").fetchone()
    (sql,) = db.execute("SELECT sql FROM sqlite_master WHERE name = 'entries'").fetchone()
    db.close()
    assert version == 2 and "AUTOINCREMENT" in sql


V1_SCHEMA = """
CREATE TABLE entries (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL,
    variant BLOB NOT NULL,
    status INTEGER NOT NULL,
    reason BLOB NOT NULL,
    headers BLOB NOT NULL,
    request_time REAL NOT NULL,
    response_time REAL NOT NULL,
    body_name TEXT NOT NULL,
    body_size INTEGER NOT NULL,
    access_time REAL NOT NULL
);
CREATE UNIQUE INDEX entries_key_variant ON entries (key, variant);
CREATE INDEX entries_lru ON entries (access_time);
CREATE TABLE totals (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    entries INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
INSERT INTO totals VALUES (0, 0, 0);
CREATE TRIGGER entries_added AFTER INSERT ON entries BEGIN
    UPDATE totals SET entries = entries + 1, bytes = bytes + NEW.body_size WHERE id = 0;
END;
CREATE TRIGGER entries_removed AFTER DELETE ON entries BEGIN
    UPDATE totals SET entries = entries - 1, bytes = bytes - OLD.body_size WHERE id = 0;
END;
PRAGMA user_version = 1;
"""


# --- reading bodies: read-ahead at open, close without a thread hop -------------------------


async def test_first_read_and_close_of_a_large_body_stay_on_the_loop(
    tmp_path: Path, thread_hops: list[str]
) -> None:
    store = await open_store(tmp_path, memory_object_size=1000)
    try:
        body = pattern(2 * READ_CHUNK + 1234)
        entry = await put(store, "big", body)
        path = tmp_path / "bodies" / entry.body_name
        thread_hops.clear()
        reader = await store.open_body(entry)  # one hop: open and read ahead READ_CHUNK
        assert reader is not None and reader.cached() is None
        assert len(thread_hops) == 1
        assert fds_on(path) == 1
        assert await on_the_loop(reader.read, 0, 1000) == body[:1000]
        assert holds_bytes(reader, READ_CHUNK)  # part of the read-ahead is still to come
        assert await on_the_loop(reader.read, 1000, READ_CHUNK) == body[1000:READ_CHUNK]
        assert not holds_bytes(reader, 1000)  # consumed: let go
        assert len(thread_hops) == 1
        rest = await read_all_from(reader, READ_CHUNK)  # beyond the read-ahead: pread in threads
        assert rest == body[READ_CHUNK:]
        hops = len(thread_hops)
        await on_the_loop(reader.aclose)
        assert len(thread_hops) == hops  # a linked file is closed on the loop
        assert fds_on(path) == 0

        # A read elsewhere lets the read-ahead go too. The last close of an unlinked file
        # (freeing its blocks) goes to a thread.
        reader = await store.open_body(entry)
        assert reader is not None
        assert await reader.read(READ_CHUNK, 10) == body[READ_CHUNK : READ_CHUNK + 10]
        assert not holds_bytes(reader, 1000)
        path.unlink()
        assert await reader.read(5, 10) == body[5:15]  # POSIX: the open file stays readable
        hops = len(thread_hops)
        await reader.aclose()
        assert len(thread_hops) == hops + 1
        assert fds_on(path) == 0
    finally:
        await store.aclose()


async def test_body_read_ahead_whole_closes_its_file_at_open(
    tmp_path: Path, thread_hops: list[str]
) -> None:
    store = await open_store(tmp_path, memory_object_size=1000)
    try:
        body = pattern(READ_CHUNK)  # beyond the memory tier, exactly one read-ahead
        entry = await put(store, "k", body)
        path = tmp_path / "bodies" / entry.body_name
        thread_hops.clear()
        reader = await store.open_body(entry)
        assert reader is not None and reader.cached() is None
        assert fds_on(path) == 0  # closed in the same hop as it was opened

        async def serve() -> tuple[bytes, bytes]:
            assert reader is not None
            data = await reader.read(0, READ_CHUNK), await reader.read(READ_CHUNK, 10)
            await reader.aclose()
            return data

        assert await on_the_loop(serve) == (body, b"")
        assert len(thread_hops) == 1  # the whole hit: open, read, close
        assert not holds_bytes(reader, 1000)
        # A read that comes back after the read-ahead was let go opens the file again.
        reader = await store.open_body(entry)
        assert reader is not None
        assert await reader.read(0, READ_CHUNK) == body
        assert await reader.read(100, 10) == body[100:110]
        assert fds_on(path) == 1
        await on_the_loop(reader.aclose)
        assert fds_on(path) == 0
    finally:
        await store.aclose()


async def test_read_ahead_starts_at_the_requested_range(tmp_path: Path) -> None:
    store = await open_store(tmp_path, memory_object_size=1000)
    try:
        body = pattern(3 * READ_CHUNK)
        entry = await put(store, "k", body)
        first = 2 * READ_CHUNK + 7
        reader = await store.open_body(entry, offset=first, length=100)
        assert reader is not None
        assert await on_the_loop(reader.read, first, 100) == body[first : first + 100]
        assert await reader.read(0, 10) == body[:10]
        await reader.aclose()
    finally:
        await store.aclose()


# --- several writers, locks, busy index -----------------------------------------------------


async def test_waiting_for_the_write_lock_does_not_block_lookups(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    await put(store, "known", b"x")
    blocker = sqlite3.connect(tmp_path / "index.sqlite", isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another process holding the write lock
        writer = await store.begin("k", b"", 200, b"OK", [], NOW, NOW, 3)
        assert writer is not None
        await writer.write(b"abc")
        result: list[Entry | None] = []

        async def commit() -> None:
            assert writer is not None
            result.append(await writer.commit())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(commit)
            await trio.sleep(0.3)
            assert result == []  # still waiting for the lock
            # A read of the index is not stuck behind the waiting writer (the lock is only
            # released below, so without the sliced waiting this would hang until busy_timeout).
            with trio.fail_after(2):
                assert await store.lookup("unknown-key") == []
            blocker.execute("ROLLBACK")
        assert result[0] is not None
        assert await store.lookup("k") == [result[0]]
        assert store.stats().errors == 0
    finally:
        blocker.close()
        await store.aclose()


async def test_write_lock_held_too_long_drops_the_entry(tmp_path: Path) -> None:
    store = await open_store(tmp_path, busy_timeout=0.3)
    blocker = sqlite3.connect(tmp_path / "index.sqlite", isolation_level=None)
    try:
        writer = await store.begin("k", b"", 200, b"OK", [], NOW, NOW, 3)
        assert writer is not None
        await writer.write(b"abc")
        blocker.execute("BEGIN IMMEDIATE")
        with trio.fail_after(5):
            assert await writer.commit() is None
        blocker.execute("ROLLBACK")
        assert store.stats().errors == 1 and not store.stats().paused
        assert files(tmp_path, "tmp") == [] and files(tmp_path, "bodies") == []
        assert await store.lookup("k") == []
    finally:
        blocker.close()
        await store.aclose()


async def test_open_sweeps_only_unlocked_orphans(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    kept = await put(store, "k", b"indexed")
    await store.aclose()
    tmp, bodies = tmp_path / "tmp", tmp_path / "bodies"
    (tmp / "dead.part").write_bytes(b"partial")
    (bodies / "ab" / "abdead").write_bytes(b"renamed, never indexed")
    (tmp / "live.part").write_bytes(b"being written")
    (bodies / "cd" / "cdlive").write_bytes(b"renamed, not yet indexed")
    # a live writer (in another process) holds LOCK_EX on its files
    locks = [os.open(p, os.O_RDONLY) for p in (tmp / "live.part", bodies / "cd" / "cdlive")]
    try:
        for fd in locks:
            fcntl.flock(fd, fcntl.LOCK_EX)
        again = await open_store(tmp_path)
        await again.aclose()
    finally:
        for fd in locks:
            os.close(fd)
    assert [p.name for p in files(tmp_path, "tmp")] == ["live.part"]
    names = {f"{p.parent.name}/{p.name}" for p in files(tmp_path, "bodies")}
    assert names == {kept.body_name, "cd/cdlive"}


# --- damaged index --------------------------------------------------------------------------


async def test_garbage_index_is_set_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = await open_store(tmp_path)
    old = await put(store, "k", b"orphaned by the reset")
    await store.aclose()
    garbage = os.urandom(8192)
    (tmp_path / "index.sqlite").write_bytes(garbage)
    caplog.set_level(logging.ERROR, logger="proxyd.cache.store")
    again = await open_store(tmp_path)
    try:
        assert await again.lookup("k") == []
        assert again.stats().entries == 0
        (aside,) = set_aside(tmp_path)
        assert aside.read_bytes() == garbage
        assert any("set aside" in r.getMessage() for r in caplog.records)
        assert not (tmp_path / "bodies" / old.body_name).exists()  # swept: no row names it
        fresh = await put(again, "k", b"works again")
        assert await again.lookup("k") == [fresh]
    finally:
        await again.aclose()


async def test_wrong_schema_is_set_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = sqlite3.connect(tmp_path / "index.sqlite")
    db.execute("CREATE TABLE entries (url TEXT, body BLOB)")
    db.commit()
    db.close()
    caplog.set_level(logging.ERROR, logger="proxyd.cache.store")
    store = await open_store(tmp_path)
    try:
        assert len(set_aside(tmp_path)) == 1
        assert any(r.levelno == logging.ERROR for r in caplog.records)
        entry = await put(store, "k", b"x")
        assert await store.lookup("k") == [entry]
    finally:
        await store.aclose()


async def test_corruption_found_later_is_a_miss(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = await open_store(tmp_path)
    try:
        await put(store, "k", b"x")
        # Another connection damages the schema (the entries table's root page points nowhere).
        db = sqlite3.connect(tmp_path / "index.sqlite", isolation_level=None)
        (version,) = db.execute("PRAGMA schema_version").fetchone()
        db.execute("PRAGMA writable_schema = ON")
        db.execute("UPDATE sqlite_master SET rootpage = 9999 WHERE name = 'entries'")
        db.execute(f"PRAGMA schema_version = {version + 1}")
        db.close()
        caplog.set_level(logging.ERROR, logger="proxyd.cache.store")
        assert await store.lookup("k") == []
        assert store.stats().errors == 1
        assert any("lookup failed" in r.getMessage() for r in caplog.records)
    finally:
        await store.aclose()


# --- disk full ------------------------------------------------------------------------------


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a 2 MiB tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(path: Path, size: int | None) -> None:
    """Write ``size`` bytes to ``path``, or (None) until the filesystem is full."""
    with path.open("wb", buffering=0) as out:
        piece = b"f" * 65536
        written = 0
        while size is None or written < size:
            try:
                written += out.write(piece[: (size - written) if size is not None else None])
            except OSError:
                return


async def test_disk_full_pauses_storing_and_resumes(tiny_fs: Path) -> None:
    directory = tiny_fs / "cache"
    store = await open_store(directory, pause_interval=0.3, memory_size=0)
    try:
        filler = tiny_fs / "filler"
        fill(filler, 1536 << 10)
        body = pattern(1 << 20)
        writer = await store.begin("big", b"", 200, b"OK", [], NOW, NOW, None)
        assert writer is not None
        with pytest.raises(StoreError):
            for offset in range(0, len(body), 65536):
                await writer.write(body[offset : offset + 65536])
        assert await writer.commit() is None
        stats = store.stats()
        assert stats.paused and stats.errors == 1
        assert files(directory, "tmp") == [] and files(directory, "bodies") == []
        assert await store.lookup("big") == []
        assert await store.begin("big", b"", 200, b"OK", [], NOW, NOW, None) is None  # paused

        filler.unlink()  # space returns
        await trio.sleep(0.35)
        entry = await put(store, "big", body)
        assert not store.stats().paused
        assert await body_of(store, entry) == body

        # full again, now with a body small enough to fail only at commit
        fill(filler, None)
        await trio.sleep(0.35)
        writer = await store.begin("small", b"", 200, b"OK", [], NOW, NOW, None)
        assert writer is not None
        await writer.write(pattern(100_000))  # buffered: the failure comes at commit
        assert await writer.commit() is None
        assert store.stats().paused
        assert files(directory, "tmp") == []
        assert await store.lookup("small") == []
        assert await body_of(store, entry) == body  # what was stored is intact
    finally:
        await store.aclose()


# --- other processes ------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


async def test_kill_9_mid_write_leaves_no_partial_entry(tmp_path: Path) -> None:
    process = await trio.lowlevel.open_process(
        [sys.executable, str(CHILD), "slow", str(tmp_path)],
        stdout=subprocess.PIPE,
        cwd=REPO,
        env=child_env(),
    )
    try:
        assert process.stdout is not None
        seen = b""
        with trio.fail_after(10):
            while b"flushed 1048576" not in seen:  # 1 MiB of the big body is in its temp file
                data = await process.stdout.receive_some()
                assert data, f"child ended early: {seen!r}"
                seen += data
        os.kill(process.pid, signal.SIGKILL)
        with trio.fail_after(5):
            assert await process.wait() == -signal.SIGKILL
    finally:
        if process.returncode is None:
            os.kill(process.pid, signal.SIGKILL)
            await process.wait()
    (partial,) = files(tmp_path, "tmp")
    assert partial.stat().st_size >= 1 << 20
    store = await open_store(tmp_path)
    try:
        assert await store.lookup("big") == []
        assert files(tmp_path, "tmp") == []
        (survivor,) = await store.lookup("survivor")
        assert await body_of(store, survivor) == b"alive"
        assert len(files(tmp_path, "bodies")) == 1
    finally:
        await store.aclose()


async def test_two_processes_share_one_directory(tmp_path: Path) -> None:
    processes = [
        await trio.lowlevel.open_process(
            [sys.executable, str(CHILD), "mixed", str(tmp_path), name, "40", str(seed)],
            stdout=subprocess.PIPE,
            cwd=REPO,
            env=child_env(),
        )
        for seed, name in enumerate(("one", "two"))
    ]
    outputs: list[bytes] = [b"", b""]
    try:

        async def collect(index: int, process: trio.Process) -> None:
            assert process.stdout is not None
            while data := await process.stdout.receive_some():
                outputs[index] += data
            await process.wait()

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for index, process in enumerate(processes):
                    nursery.start_soon(collect, index, process)
    finally:
        for process in processes:
            if process.returncode is None:
                os.kill(process.pid, signal.SIGKILL)
                await process.wait()
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output
    reports = [json.loads(out) for out in outputs]
    for report in reports:
        assert report["committed"] == 120 and report["problems"] == [] and report["errors"] == 0
    assert sum(r["verified"] for r in reports) > 0
    # Every replaced body was removed after its row: files and rows match one to one.
    on_disk = len(files(tmp_path, "bodies"))
    assert files(tmp_path, "tmp") == []
    store = await open_store(tmp_path)
    try:
        assert store.stats().entries == on_disk
        for key in (f"k{i}" for i in range(30)):
            for entry in await store.lookup(key):
                data = await body_of(store, entry)
                want = dict(entry.stored.headers)[b"X-Digest"]
                assert hashlib.sha256(data).hexdigest().encode() == want
    finally:
        await store.aclose()

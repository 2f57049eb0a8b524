"""The cache store: a SQLite (WAL) index and one body file per entry.

Theory of operation
===================

Layout of the cache directory (one directory may be shared by several proxyd processes)::

    index.sqlite          the index: one row per (key, variant), WAL mode, synchronous=NORMAL;
                          row ids are AUTOINCREMENT (never reused), schema version 2 (a version
                          1 index is upgraded in place at ``open``)
    bodies/xx/<token>     one file per entry, exactly the bytes received (still compressed)
    tmp/<token>.part      bodies being written

``token`` is a random uuid4 (hex), so two processes never pick the same file name.

Writing a body (``begin`` -> ``write``... -> ``commit``)
    ``begin`` creates ``tmp/<token>.part`` and takes ``flock(LOCK_EX)`` on it. The lock is held
    (by the writer's descriptor) from creation until the index row is committed: the orphan sweep
    of any process only deletes files it can lock, so it never deletes a body that a live writer
    is writing, or has renamed but not yet indexed. ``write`` appends to an in-memory buffer and
    hands it to a worker thread in chunks of at least ``WRITE_CHUNK`` (256 KiB). ``commit``
    writes the rest, ``fdatasync``s the file, renames it into ``bodies/`` (``os.replace``, atomic),
    fsyncs that directory (best effort), and only then commits the index row, in a
    ``BEGIN IMMEDIATE`` transaction that also deletes the row it replaces (same key and variant)
    and evicts least recently used rows while the total is above ``max_size``. Files of deleted
    rows are unlinked after that commit. So after a crash at any point the index never names a
    missing or partial file; what can be left over are unindexed files, swept at ``open``.

Removing (replace, evict, ``invalidate``)
    Always the row first (committed), then the file. A reader that already opened the file keeps
    reading it (POSIX unlink semantics). ``invalidate`` also stops writers of the key that began
    before it (RFC 9111 §4.4: a response on its way must not bring back what an unsafe method
    invalidated): it counts itself on the loop before any await, and ``commit`` checks that count
    in the same index operation as its insert, so no interleaving of the two lets the old
    content back in (within this process; other processes' invalidations are not seen).

Read-while-write
    ``BodyWriter.open_follower`` returns a reader holding a ``dup`` of the writer's descriptor, so
    it keeps working after the writer renames (commit) or unlinks (abort) the file. Bytes already
    in the file are read with ``pread``; bytes still in the writer's buffer are served from memory.
    A follower never waits: the coalescing layer tells it when there is more.

The event loop never touches the disk
    All SQLite work runs in worker threads under ``_db_limiter`` (one token: the store has one
    connection, ``check_same_thread=False``, used by one thread at a time), file work under
    ``_io_limiter``. Reads of a body go in pieces of up to ``READ_CHUNK`` (1 MiB). Two exceptions,
    both without disk access: ``PRAGMA data_version`` (below), and ``close(2)`` of a body file
    that is still linked (it only drops a reference; the last close of an *unlinked* file frees
    its blocks and pages, so that one goes to a thread).

Reading a body (``open_body`` -> ``read``... -> ``aclose``)
    A thread hop costs far more than reading 1 MiB from the page cache, so a body not held in
    memory is opened with one hop that also reads ahead the first piece the caller will ask for
    (``READ_CHUNK`` at ``offset``, bounded by ``length``); when that is the whole body the file
    is closed in the same hop. A ``read`` inside the read-ahead returns it without a hop (sliced,
    or the very object when asked for all of it); the reader lets it go once a read reaches its
    end or reads elsewhere, so one reader holds at most READ_CHUNK. A read that comes back to it
    later reads the file again (reopening it by path when it was closed at open). So a 1 MiB hit
    is one hop in all, instead of three (open, read, close).

Zero-copy reads (``open_body(read_ahead=False)`` -> ``fileno()``)
    A caller that sends the body with ``os.sendfile`` (cache/transaction.py, for hits larger
    than the memory tier) opens it without the read-ahead: the hop only opens the file and checks
    its size, and ``fileno()`` hands out the descriptor (``size`` the committed length). The
    bytes then go from the page cache to the socket without passing through Python; the caller
    runs sendfile itself (in a worker thread, since it may read the disk).

The memory copy of the index (``_rows``)
    A hit should cost far less than a proxied miss, so rows already read are kept in memory per
    key (also "no rows": a known miss). Our own writes (which do not change our data_version)
    update the memory copy directly, after their commit, while they still hold the connection.
    ``_rows`` and the key filter are only ever changed by whoever holds the connection (a thread
    under ``_db_limiter``; the loop only reads them), so updates apply in the order of the index
    operations. When the connection is busy, ``lookup`` answers from memory as of the in-flight
    operation's start (a staleness of one index operation, in practice milliseconds).

The key filter (a negative lookup costs no thread hop)
    ``_keys`` holds ``hash(key)`` of every key in the index, and maybe of some no longer in it:
    a superset, so a key not in it is not stored and ``lookup`` answers [] at once (a request for
    a new URL skips SQLite). A key in it that is not (a hash collision, a deleted row) costs one
    query, which also remembers the miss in ``_rows``. It is filled at ``open`` (every key, read
    after ``data_version``), gains the key of each of our commits, and catches up with other
    connections' commits by reading the rows with an id above the highest it has seen: rows never
    change key and ids only grow (AUTOINCREMENT: a plain INTEGER PRIMARY KEY would hand the id of
    a deleted newest row to the next insert, which the catch-up would then never see). Deletions
    need nothing. The keys of deleted rows accumulate until the filter holds more than twice the
    index's entries plus ``KEY_FILTER_SLACK``; then it is rebuilt from the index (in a thread,
    never inside a write transaction). Memory: about 80 bytes per key (an int in a set).

Other processes' commits (``PRAGMA data_version``)
    ``data_version`` changes when any *other* connection committed; it costs about 3-5 us and
    reads only the WAL index in shared memory, so ``lookup`` runs it on the loop when no thread
    holds the connection. When it changed, ``_behind`` is set and lookups go to a thread, where
    ``_sync_version`` drops the memory copy of rows, adds the new rows' keys to the filter (and
    refreshes the totals) before the query. Every operation in a thread does the same before
    touching the index; inside ``BEGIN IMMEDIATE`` that makes our commit's id the highest one
    seen. The check is shared by lookups in a burst: a lookup skips it when the previous lookup
    came less than ``version_check_interval / 5`` earlier and the last check is less than
    ``version_check_interval`` (``VERSION_CHECK_INTERVAL``, 5 ms) old. So under load a lookup
    may be up to 5 ms stale with respect to other processes' commits (as if the request had come
    5 ms earlier); a process that is not busy checks on every lookup, and our own commits are
    always visible at once. ``version_check_interval=0`` checks on every lookup.

The memory tier of bodies
    Bodies up to ``memory_object_size`` are kept in an LRU of at most ``memory_size`` bytes,
    filled on commit and on the first ``open_body``; ``BodyReader.cached()`` returns them, and a
    memory hit (``lookup`` + ``open_body`` + ``cached``) does no thread hop at all.

Limits on a config reload
    ``set_limits`` swaps ``max_size``, ``max_object_size`` and the memory tier's sizes for what
    is stored from then on (the memory tier is trimmed at once); ``shrink`` then evicts least
    recently used rows until the total fits a lowered ``max_size`` (rows first, then files, like
    any eviction) instead of waiting for the next commit to do it.

LRU bookkeeping
    ``touch`` records the access time in memory. The batch is written to the index by a small
    background task at most every ``TOUCH_INTERVAL`` seconds or every ``TOUCH_BATCH`` touches,
    and with every commit (whose eviction needs it), and at ``aclose``. A use is recorded at most
    once per ``TOUCH_GRANULARITY`` seconds per entry (Varnish's ``lru_interval``, for the same
    reason): the LRU is exact to that precision, and an entry in steady use costs one index write
    per period rather than one per hit, so the CPU of a hit does not grow with the number of
    entries in use (with 10,000 hot keys, per-hit writes were a fifth of it).

Several processes
    Writes use ``BEGIN IMMEDIATE`` (the write lock is taken up front, so no transaction ever has
    to upgrade and fail with SQLITE_BUSY mid-way). The lock is waited for in short slices
    (``BEGIN_SLICE_MS``) with jittered exponential backoff in between on the loop, bounded by
    ``busy_timeout`` (30 s) in all: a waiting writer does not hold the connection, so lookups of
    this process go on meanwhile. ``open`` serializes index validation and the sweep across
    processes with ``flock`` on the cache directory.

Failures
    An unreadable index (not a database, corrupt, wrong schema) found at ``open`` is renamed to
    ``index.sqlite.corrupt-<timestamp>`` (with its -wal/-shm) and rebuilt empty; the sweep then
    removes the bodies it no longer names. A database error during ``lookup`` is a miss (logged,
    counted). An I/O error while storing (ENOSPC, EIO...) removes the temp file, counts an error
    and *pauses* storing for ``pause_interval``; after it the next ``begin`` is a probe (it also
    checks ``statvfs`` for room) and the first successful commit ends the pause. The caller keeps
    relaying to the client in all cases.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import math
import os
import random
import sqlite3
import struct
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final, TypeVar

import trio

from proxyd.cache.policy import Header, Stored

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

#: 2: ``entries.id`` is AUTOINCREMENT (ids are never reused; the key filter depends on it).
#: An index of version 1 is upgraded in place at ``open``.
SCHEMA_VERSION: Final = 2
#: Writes are buffered to at least this much before a thread hop.
WRITE_CHUNK: Final = 256 << 10
#: Largest piece one ``BodyReader.read`` returns from a file.
READ_CHUNK: Final = 1 << 20
#: Total bound on waiting for the index's write lock (and SQLite's own busy_timeout).
BUSY_TIMEOUT: Final = 30.0
#: One attempt at BEGIN IMMEDIATE waits at most this long inside SQLite.
BEGIN_SLICE_MS: Final = 100
#: After a storing failure, how long storing stays paused before the next attempt.
PAUSE_INTERVAL: Final = 10.0
#: Access times are written to the index at most this often, or after this many touches.
TOUCH_INTERVAL: Final = 5.0
TOUCH_BATCH: Final = 1000
#: A use of an entry is recorded at most this often (see "LRU bookkeeping").
TOUCH_GRANULARITY: Final = 30.0
#: Bound on the entries whose last recorded use is remembered for that (emptied when full: it
#: also holds evicted entries, and a cache that stores all the time must not grow with them).
TOUCH_MEMORY: Final = 16_384
#: Bound on the keys held in the memory copy of the index (oldest inserted go first).
INDEX_MEMORY_KEYS: Final = 100_000
#: ``lookup`` asks SQLite whether another process committed at most this often while lookups
#: come in a burst (see "Other processes' commits" in the module docstring).
VERSION_CHECK_INTERVAL: Final = 0.005
#: The key filter is rebuilt from the index when it holds more than twice the index's entries
#: plus this many (keys of deleted rows stay in it until then).
KEY_FILTER_SLACK: Final = 4096
#: Keys whose latest invalidation is remembered for writers still on their way (beyond it,
#: writers begun before the oldest forgotten one are not kept).
INVALIDATED_MEMORY: Final = 10_000
#: Worker threads for body files (the index has its own single one).
IO_THREADS: Final = 4
_SWEEP_BATCH: Final = 256
_LOG_EVERY: Final = 60.0

_SQLITE_BUSY: Final = 5
_SQLITE_LOCKED: Final = 6
_SQLITE_CORRUPT: Final = 11
_SQLITE_NOTADB: Final = 26

_COLUMNS: Final = (
    "id",
    "key",
    "variant",
    "status",
    "reason",
    "headers",
    "request_time",
    "response_time",
    "body_name",
    "body_size",
    "access_time",
)

# totals is kept by triggers so the size check of every commit is one row read, not a scan;
# body_size never changes after insert (update() only rewrites headers and times).
# AUTOINCREMENT: a plain INTEGER PRIMARY KEY hands out max(id) + 1, so the id of a deleted newest
# row would be reused; the key filter's top-up ("rows with an id above the highest seen") needs ids
# that only ever grow.
_ENTRIES_TABLE: Final = """
CREATE TABLE {name} (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
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
"""
_ENTRIES_EXTRAS: Final = """
CREATE UNIQUE INDEX entries_key_variant ON entries (key, variant);
CREATE INDEX entries_lru ON entries (access_time);
CREATE TRIGGER entries_added AFTER INSERT ON entries BEGIN
    UPDATE totals SET entries = entries + 1, bytes = bytes + NEW.body_size WHERE id = 0;
END;
CREATE TRIGGER entries_removed AFTER DELETE ON entries BEGIN
    UPDATE totals SET entries = entries - 1, bytes = bytes - OLD.body_size WHERE id = 0;
END;
"""
_SCHEMA: Final = (
    _ENTRIES_TABLE.format(name="entries")
    + """
CREATE TABLE totals (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    entries INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
INSERT INTO totals VALUES (0, 0, 0);
"""
    + _ENTRIES_EXTRAS
    + f"PRAGMA user_version = {SCHEMA_VERSION};\n"
)
# Version 1 -> 2: the same rows in a table whose ids are AUTOINCREMENT (SQLite cannot alter a
# column, so the table is rebuilt; DROP TABLE fires no triggers, so totals stay right). Ids are
# kept, and sqlite_sequence starts at the highest of them.
_UPGRADE_FROM_1: Final = (
    "BEGIN IMMEDIATE;\n"
    + _ENTRIES_TABLE.format(name="entries_v2")
    + """
INSERT INTO entries_v2 SELECT * FROM entries;
DROP TABLE entries;
ALTER TABLE entries_v2 RENAME TO entries;
"""
    + _ENTRIES_EXTRAS
    + "PRAGMA user_version = 2;\nCOMMIT;\n"
)

_SELECT_KEY: Final = (
    "SELECT id, variant, status, reason, headers, request_time, response_time, body_name,"
    " body_size FROM entries WHERE key = ? ORDER BY id DESC"
)
_INSERT: Final = (
    "INSERT INTO entries (key, variant, status, reason, headers, request_time, response_time,"
    " body_name, body_size, access_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_TOUCH: Final = "UPDATE entries SET access_time = max(access_time, ?) WHERE id = ?"

_Row = tuple[int, bytes, int, bytes, bytes, float, float, str, int]


class StoreError(Exception):
    """Storing failed (disk full, I/O error); the response still goes to the client."""


class _Busy(Exception):
    """One slice of waiting for the index's write lock ran out."""


class _BusyTimeout(StoreError):
    """The index stayed write-locked by other processes for ``busy_timeout``."""


class _WrongSchema(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored response (a variant of a key)."""

    entry_id: int
    key: str
    stored: Stored  # status, headers, times, variant, body_size
    reason: bytes
    body_name: str  # file name under bodies/ ("xx/<token>")


@dataclass(frozen=True, slots=True)
class StoreStats:
    entries: int
    bytes: int
    evictions: int
    errors: int
    paused: bool


# --- headers blob ---------------------------------------------------------------------------

_PAIR: Final = struct.Struct(">II")


def encode_headers(headers: Sequence[Header]) -> bytes:
    """Length-prefixed (name, value) pairs: exact bytes, order and case survive."""
    parts: list[bytes] = []
    for name, value in headers:
        parts.append(_PAIR.pack(len(name), len(value)))
        parts.append(name)
        parts.append(value)
    return b"".join(parts)


def decode_headers(blob: bytes) -> tuple[Header, ...]:
    out: list[Header] = []
    pos, end = 0, len(blob)
    while pos < end:
        if pos + 8 > end:
            raise ValueError("truncated headers blob")
        name_len, value_len = _PAIR.unpack_from(blob, pos)
        pos += 8
        value_at = pos + name_len
        stop = value_at + value_len
        if stop > end:
            raise ValueError("truncated headers blob")
        out.append((blob[pos:value_at], blob[value_at:stop]))
        pos = stop
    return tuple(out)


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    return code in (_SQLITE_BUSY, _SQLITE_LOCKED)


def _is_corrupt(exc: BaseException) -> bool:
    """An index we should set aside rather than fail on (not: locked, I/O, permission)."""
    if isinstance(exc, _WrongSchema):
        return True
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    return code in (_SQLITE_CORRUPT, _SQLITE_NOTADB) or type(exc) is sqlite3.DatabaseError


# --- blocking helpers (run in worker threads) -----------------------------------------------


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view = view[done:]
        offset += done


def _pread_all(fd: int, size: int, start: int = 0) -> bytes:
    """``size`` bytes at ``start`` (fewer at the end of the file)."""
    parts: list[bytes] = []
    done = 0
    while done < size:
        piece = os.pread(fd, min(size - done, READ_CHUNK), start + done)
        if not piece:
            break
        parts.append(piece)
        done += len(piece)
    return b"".join(parts)  # one piece: returned as is, no copy


def _open_and_read(path: str, size: int, start: int, ahead: int, keep: bool) -> tuple[int, bytes]:
    """In a thread: open a body file, check its size, read ``ahead`` bytes at ``start``.

    Returns the descriptor (-1 when closed here: ``keep`` is false or the whole body was read,
    so nothing is left to read from the file) and the bytes read."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size != size:
            raise ValueError(f"body file {path} has the wrong size")
        data = _pread_all(fd, ahead, start) if ahead > 0 else b""
    except BaseException:
        os.close(fd)
        raise
    if keep and not (start == 0 and len(data) == size):
        return fd, data
    os.close(fd)
    return -1, data


def _fsync_dir(path: str) -> None:
    """Best effort: makes the rename durable; some filesystems refuse fsync on a directory."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("cache: could not remove %s: %s", path, exc)


def _unlink_and_close(path: str | None, fd: int) -> None:
    # Unlink while still holding the lock, then close: no moment where the file is both
    # reachable by name and unlocked.
    if path is not None:
        _unlink_quiet(path)
    if fd >= 0:
        os.close(fd)


def _close_quiet(fd: int) -> None:
    with suppress(OSError):
        os.close(fd)


def _try_lock(path: str) -> int:
    """An fd holding LOCK_EX on ``path``, -1 when another descriptor holds it or it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return -1
    return fd


def _body_names(conn: sqlite3.Connection) -> set[str]:
    return {name for (name,) in conn.execute("SELECT body_name FROM entries")}


def _read_keys(conn: sqlite3.Connection, above: int = 0) -> tuple[set[int], int]:
    """The key filter's content: hash() of the key of every row with an id above ``above``,
    and the highest id among them (``above`` when there are none)."""
    keys: set[int] = set()
    top = above
    for entry_id, key in conn.execute("SELECT id, key FROM entries WHERE id > ?", (above,)):
        keys.add(hash(key))
        if entry_id > top:
            top = entry_id
    return keys, top


def _connect(path: str, busy_ms: int) -> tuple[sqlite3.Connection, set[str]]:
    """Open, configure and validate the index (creating the schema in an empty file); returns
    the connection and the body names it holds. Raises on an unusable index."""
    conn = sqlite3.connect(
        path,
        timeout=busy_ms / 1000,
        isolation_level=None,  # we issue BEGIN IMMEDIATE / COMMIT ourselves
        check_same_thread=False,  # one thread at a time, serialized by _db_limiter
        cached_statements=64,
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
        (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if str(mode).lower() != "wal":
            logger.warning("cache: index %s is not in WAL mode (%s)", path, mode)
        conn.execute("PRAGMA synchronous = NORMAL")
        tables = {
            name
            for (name,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        }
        if not tables:
            conn.executescript("BEGIN IMMEDIATE;\n" + _SCHEMA + "\nCOMMIT;")
        else:
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            columns = tuple(row[1] for row in conn.execute("PRAGMA table_info(entries)"))
            if version == 1 and columns == _COLUMNS and "totals" in tables:
                # Another process may still be running version 1 code on this index: the
                # upgrade is one write transaction, and its statements re-prepare after it.
                conn.executescript(_UPGRADE_FROM_1)
                logger.info("cache: index %s upgraded to schema version 2", path)
                version = 2
            if version != SCHEMA_VERSION or columns != _COLUMNS or "totals" not in tables:
                raise _WrongSchema(f"schema version {version}, tables {sorted(tables)}")
        if conn.execute("SELECT entries, bytes FROM totals WHERE id = 0").fetchone() is None:
            raise _WrongSchema("no totals row")
        # Reading every row now makes a damaged table show up here (set aside) and gives the
        # sweep its list of live bodies.
        names = _body_names(conn)
    except BaseException:
        conn.close()
        raise
    return conn, names


def _set_aside(path: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = f"{path}.corrupt-{stamp}"
    n = 1
    while os.path.exists(aside):
        aside = f"{path}.corrupt-{stamp}-{n}"
        n += 1
    os.replace(path, aside)
    # A stale WAL must never be replayed into the new, empty index.
    for suffix in ("-wal", "-shm", "-journal"):
        with suppress(FileNotFoundError):
            os.replace(path + suffix, aside + suffix)
    return aside


def _sweep(conn: sqlite3.Connection, tmp: str, bodies: str, known: set[str]) -> int:
    """Remove orphans: tmp/ files and unindexed bodies/ files that no live writer holds.

    A live writer holds LOCK_EX on its file from creation until after its index commit, so a
    file we can lock is either an orphan or (bodies/) one committed since ``known`` was read:
    the index is read again *after* taking the locks to tell those apart.
    """
    removed = 0
    with os.scandir(tmp) as it:
        for dirent in it:
            fd = _try_lock(dirent.path)
            if fd >= 0:
                _unlink_and_close(dirent.path, fd)
                removed += 1
    locked: list[tuple[str, str, int]] = []

    def settle() -> int:
        live = _body_names(conn)
        count = 0
        for name, path, fd in locked:
            if name not in live:
                _unlink_quiet(path)
                count += 1
            os.close(fd)
        locked.clear()
        return count

    with os.scandir(bodies) as top:
        subdirs = [d.path for d in top if d.is_dir(follow_symlinks=False)]
    for sub in subdirs:
        prefix = os.path.basename(sub)
        with os.scandir(sub) as it:
            for dirent in it:
                name = f"{prefix}/{dirent.name}"
                if name in known:
                    continue
                fd = _try_lock(dirent.path)
                if fd < 0:
                    continue
                locked.append((name, dirent.path, fd))
                if len(locked) >= _SWEEP_BATCH:
                    removed += settle()
    removed += settle()
    return removed


@dataclass(frozen=True, slots=True)
class _Opened:
    directory: str
    conn: sqlite3.Connection
    data_version: int
    totals: tuple[int, int]
    swept: int
    keys: set[int]  # the key filter (hash() of every key in the index)
    max_id: int  # the highest entry id the filter has seen


def _open_sync(directory: str, busy_ms: int) -> _Opened:
    directory = os.path.expanduser(directory)
    tmp = os.path.join(directory, "tmp")
    bodies = os.path.join(directory, "bodies")
    os.makedirs(tmp, exist_ok=True)
    for i in range(256):
        os.makedirs(os.path.join(bodies, f"{i:02x}"), exist_ok=True)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        # One opener at a time across processes: two processes must not both set aside (the
        # second would set aside the first one's fresh index) nor race on creating the schema.
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        index = os.path.join(directory, "index.sqlite")
        try:
            conn, known = _connect(index, busy_ms)
        except (sqlite3.Error, _WrongSchema) as exc:
            if not _is_corrupt(exc):
                raise
            aside = _set_aside(index)
            logger.error(
                "cache: index %s is unreadable (%s); set aside as %s, starting empty",
                index,
                exc,
                aside,
            )
            conn, known = _connect(index, busy_ms)
        try:
            swept = _sweep(conn, tmp, bodies, known)
            # The version first: a commit after this read makes the next check see a change,
            # so the key filter read below can only miss rows that a top-up will bring.
            (version,) = conn.execute("PRAGMA data_version").fetchone()
            keys, max_id = _read_keys(conn)
            entries, size = conn.execute(
                "SELECT entries, bytes FROM totals WHERE id = 0"
            ).fetchone()
        except BaseException:
            conn.close()
            raise
        return _Opened(
            directory, conn, int(version), (int(entries), int(size)), swept, keys, max_id
        )
    finally:
        os.close(dir_fd)


# --- readers and writers --------------------------------------------------------------------


class BodyReader:
    """Reads one body: from memory (small, hot entries), a file, or a writer still writing.

    A reader from ``open_body`` starts with the bytes read ahead when the file was opened: a
    ``read`` inside them is answered at once, and they are let go as soon as a read reaches
    their end (or reads elsewhere), so a reader holds at most one read-ahead (READ_CHUNK).
    ``read`` raises StoreError when the file cannot be read (gone before it was opened, I/O).
    """

    __slots__ = ("_data", "_fd", "_head", "_head_at", "_path", "_size", "_store", "_writer")

    def __init__(
        self,
        store: CacheStore,
        *,
        data: bytes | None = None,
        fd: int = -1,
        path: str | None = None,
        size: int | None = None,
        writer: BodyWriter | None = None,
        head: bytes | None = None,
        head_at: int = 0,
    ) -> None:
        self._store = store
        self._data = data
        self._fd = fd
        self._path = path
        self._size = size
        self._writer = writer
        self._head = head or None
        self._head_at = head_at

    async def read(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset`` (b"" at the current end)."""
        data = self._data
        if data is not None:
            return data[offset : offset + size]
        size = min(size, READ_CHUNK)
        head = self._head
        if head is not None:
            at = offset - self._head_at
            if 0 <= at < len(head) and size > 0:
                piece = head[at : at + size]  # the whole head when asked for all of it: no copy
                if at + len(piece) >= len(head):
                    self._head = None  # consumed: do not hold it while the client is slow
                return piece
            if size > 0:
                self._head = None  # reading elsewhere: it will not be used
        writer = self._writer
        if writer is not None:
            in_file = writer._file_end
            if offset >= in_file:
                return writer._buffered(offset, size)
            size = min(size, in_file - offset)
        elif self._size is not None:
            size = min(size, self._size - offset)
        if size <= 0:
            return b""
        store = self._store
        if self._fd < 0:
            path = self._path
            if path is None:
                raise StoreError("body reader is closed")
            try:
                self._fd = await store._io(lambda: os.open(path, os.O_RDONLY | os.O_CLOEXEC))
            except OSError as exc:
                raise StoreError(f"cache body unavailable: {exc}") from exc
            self._path = None
        fd = self._fd
        try:
            return await store._io(lambda: os.pread(fd, size, offset))
        except OSError as exc:
            raise StoreError(f"cache body read failed: {exc}") from exc

    def cached(self) -> bytes | None:
        """The whole body when it is held in memory (small, hot entries), else None."""
        return self._data

    def fileno(self) -> int:
        """The open descriptor of a committed body file, for ``os.sendfile``; -1 when there is
        none (a body from memory, one read ahead whole and closed, a follower, a closed reader).
        Valid until ``aclose``; the file never changes once committed (replacing or removing an
        entry unlinks it, and an open descriptor keeps reading the same bytes)."""
        return self._fd if self._writer is None else -1

    @property
    def size(self) -> int | None:
        """The committed body's size (what ``fileno()`` holds); None for a follower."""
        if self._data is not None:
            return len(self._data)
        return self._size

    async def aclose(self) -> None:
        """Release the descriptor; no thread hop (and no checkpoint) for a body file that is
        still linked: close(2) then only drops a reference. Closing the last descriptor of an
        unlinked file frees its blocks and cached pages, which can take a while for a large
        one: that close runs in a worker thread."""
        fd, self._fd = self._fd, -1
        self._path = None
        self._head = None
        if fd < 0:
            return
        try:
            linked = os.fstat(fd).st_nlink > 0
        except OSError:
            linked = True
        if linked:
            _close_quiet(fd)
            return
        with trio.CancelScope(shield=True):
            await self._store._io(lambda: _close_quiet(fd))

    def __del__(self) -> None:
        # Safety net for a reader dropped without aclose(): never leak the descriptor.
        if getattr(self, "_fd", -1) >= 0:
            _close_quiet(self._fd)
            self._fd = -1


_WRITING: Final = "writing"
_COMMITTING: Final = "committing"
_COMMITTED: Final = "committed"
_ABORTED: Final = "aborted"


class BodyWriter:
    """A body being stored: appended in order, then committed (or aborted).

    Call ``commit`` or ``abort`` exactly once at the end (``abort`` in a ``finally`` is safe:
    after ``commit`` it does nothing). A ``write`` that raises StoreError has already aborted.
    Bytes beyond ``max_object_size`` are still written (followers may be reading them), but
    ``commit`` then drops the body and returns None; so it does when the key was invalidated
    since ``begin``.
    """

    #: bytes written so far (followers may read up to here)
    written: int

    def __init__(
        self,
        store: CacheStore,
        token: str,
        fd: int,
        key: str,
        variant: bytes,
        status: int,
        reason: bytes,
        headers: tuple[Header, ...],
        request_time: float,
        response_time: float,
        begun: int = 0,
    ) -> None:
        self.written = 0
        self._store = store
        #: the store's invalidation count when ``begin`` was called
        self._begun = begun
        self._token = token
        self._fd = fd
        self._tmp_path = os.path.join(store._tmp, token + ".part")
        self._name = f"{token[:2]}/{token}"
        self._final_path = os.path.join(store._bodies, self._name)
        self._renamed = False
        self._key = key
        self._variant = variant
        self._status = status
        self._reason = reason
        self._headers = headers
        self._request_time = request_time
        self._response_time = response_time
        self._state = _WRITING
        #: bytes confirmed in the file; [_file_end, +len(_inflight)) is being written by a
        #: thread; the buffer follows it
        self._file_end = 0
        self._inflight = b""
        self._pending = bytearray()
        #: the whole body while it is small enough for the memory tier
        self._whole: list[bytes] | None = [] if store._memory_object_size > 0 else None
        self._too_large = False

    @property
    def is_too_large(self) -> bool:
        """More than max_object_size was written: commit() will not keep it."""
        return self._too_large

    async def write(self, data: bytes) -> None:
        """Append; raises StoreError on I/O failure (the writer is then aborted)."""
        if self._state != _WRITING:
            raise StoreError(f"body writer is {self._state}")
        if not data:
            return
        if type(data) is not bytes:
            data = bytes(data)
        self._pending += data
        self.written += len(data)
        store = self._store
        if self._whole is not None:
            if self.written <= store._memory_object_size:
                self._whole.append(data)
            else:
                self._whole = None
        if self.written > store._max_object:
            self._too_large = True
        if len(self._pending) >= WRITE_CHUNK:
            await self._flush()

    def _take_pending(self) -> bytes:
        data = bytes(self._pending)
        self._pending = bytearray()
        self._inflight = data
        return data

    def _landed(self) -> None:
        self._file_end += len(self._inflight)
        self._inflight = b""

    async def _flush(self) -> None:
        data = self._take_pending()
        fd, offset = self._fd, self._file_end
        try:
            # Shielded (bounded file I/O): a cancellation between taking the buffer and its
            # landing in the file would leave a hole in the body.
            with trio.CancelScope(shield=True):
                await self._store._io(lambda: _pwrite_all(fd, data, offset))
        except OSError as exc:
            await self._fail(exc)
            raise StoreError(f"cache write failed: {exc}") from exc
        self._landed()

    def _buffered(self, offset: int, size: int) -> bytes:
        """Bytes at ``offset`` that are not in the file yet (for followers)."""
        rel = offset - self._file_end
        inflight = self._inflight
        if rel < len(inflight):
            return inflight[rel : rel + size]
        rel -= len(inflight)
        return bytes(self._pending[rel : rel + size])

    def open_follower(self) -> BodyReader:
        """A reader of the bytes written so far and of those still to come (read-while-write);
        valid after commit or abort too (it keeps the file open).

        Raises StoreError when called after the writer was aborted (its file is gone)."""
        if self._fd >= 0:
            return BodyReader(self._store, fd=os.dup(self._fd), writer=self)
        if self._renamed and self._state in (_COMMITTING, _COMMITTED):
            return BodyReader(self._store, path=self._final_path, writer=self)
        raise StoreError(f"body writer is {self._state}")

    def _finish_file(self, data: bytes, offset: int) -> None:
        """In a thread: the rest of the body, fdatasync, rename into bodies/, fsync the dir."""
        fd = self._fd
        if data:
            _pwrite_all(fd, data, offset)
        os.fdatasync(fd)
        try:
            os.replace(self._tmp_path, self._final_path)
        except FileNotFoundError:
            parent = os.path.dirname(self._final_path)
            if os.path.isdir(parent):
                raise
            os.makedirs(parent, exist_ok=True)
            os.replace(self._tmp_path, self._final_path)
        self._renamed = True
        _fsync_dir(os.path.dirname(self._final_path))

    async def commit(self) -> Entry | None:
        """Make the entry visible (file renamed, then the index row committed, replacing an entry
        of the same key and variant). None when it was not kept (too large, paused, error)."""
        if self._state != _WRITING:
            return None
        store = self._store
        # Shielded: a half-done commit would leave the file renamed but unindexed and the lock
        # held; each step is bounded (file I/O, and busy_timeout for the index).
        with trio.CancelScope(shield=True):
            if self._too_large or store._closed:
                await self.abort()
                return None
            self._state = _COMMITTING
            data = self._take_pending()
            offset = self._file_end
            try:
                await store._io(lambda: self._finish_file(data, offset))
            except OSError as exc:
                await self._fail(exc)
                return None
            self._landed()
            touches = store._take_touches()
            entry_values = self._entry_values()
            begun = self._begun
            try:
                committed = await store._write(
                    lambda: store._commit_sync(entry_values, touches, begun)
                )
            except (sqlite3.Error, StoreError) as exc:
                await self._fail(exc)
                return None
            if committed is None:
                await self._discard()  # invalidated on its way: not an error
                return None
            entry, doomed = committed
            # Committed: now the replaced and evicted files may go, and our lock with them.
            fd, self._fd = self._fd, -1
            doomed_paths = [os.path.join(store._bodies, name) for name in doomed]
            await store._io(lambda: _remove_files(doomed_paths, fd))
            self._state = _COMMITTED
            whole = self._whole
            self._whole = None
            store._after_commit(entry, doomed, None if whole is None else b"".join(whole))
            return entry
        return None  # only reached if the shielded scope swallowed a cancellation

    def _entry_values(
        self,
    ) -> tuple[str, bytes, int, bytes, tuple[Header, ...], float, float, str, int]:
        return (
            self._key,
            self._variant,
            self._status,
            self._reason,
            self._headers,
            self._request_time,
            self._response_time,
            self._name,
            self.written,
        )

    async def _fail(self, exc: BaseException) -> None:
        self._store._storing_failed(exc)
        await self._discard()

    async def _discard(self) -> None:
        self._state = _ABORTED
        self._whole = None
        fd, self._fd = self._fd, -1
        path = self._final_path if self._renamed else self._tmp_path
        with trio.CancelScope(shield=True):
            await self._store._io(lambda: _unlink_and_close(path, fd))

    async def abort(self) -> None:
        if self._state in (_WRITING, _COMMITTING):
            await self._discard()

    def __del__(self) -> None:
        # Dropped without commit/abort: release the lock; the temp file is swept at next open.
        if getattr(self, "_fd", -1) >= 0:
            _close_quiet(self._fd)
            self._fd = -1


def _remove_files(paths: list[str], fd: int) -> None:
    for path in paths:
        _unlink_quiet(path)
    if fd >= 0:
        os.close(fd)


# --- the store ------------------------------------------------------------------------------


class CacheStore:
    """The on-disk store (see the module docstring). Open with ``await CacheStore.open(...)``."""

    def __init__(
        self,
        directory: Path,
        opened: _Opened,
        db_limiter: trio.CapacityLimiter,
        *,
        max_size: int,
        max_object_size: int,
        memory_object_size: int,
        memory_size: int,
        pause_interval: float,
        busy_timeout: float,
        touch_interval: float,
        touch_batch: int,
        touch_granularity: float,
        version_check_interval: float,
    ) -> None:
        self.directory = directory
        self._dir = str(directory)
        self._tmp = os.path.join(self._dir, "tmp")
        self._bodies = os.path.join(self._dir, "bodies")
        self._conn = opened.conn
        self._data_version = opened.data_version
        self._totals = opened.totals
        self._db_limiter = db_limiter
        self._io_limiter = trio.CapacityLimiter(IO_THREADS)
        self._max_size = max_size
        # One object may never be larger than the whole cache.
        self._max_object = min(max_object_size, max_size)
        self._memory_object_size = memory_object_size if memory_size > 0 else 0
        self._memory_size = memory_size
        self._pause_interval = pause_interval
        self._busy_timeout = busy_timeout
        self._busy_ms = int(busy_timeout * 1000)
        self._touch_interval = touch_interval
        self._touch_batch = touch_batch
        self._touch_granularity = touch_granularity
        #: entry id -> when its last recorded use was (bounded like the index's memory copy)
        self._recorded_use: dict[int, float] = {}
        self._rows: dict[str, tuple[Entry, ...]] = {}
        #: the key filter: hash() of every key in the index (and of some no longer in it)
        self._keys = opened.keys
        self._max_id = opened.max_id
        #: another connection committed and no thread has caught up with it yet
        self._behind = False
        self._check_interval = version_check_interval
        self._burst_gap = version_check_interval / 5
        self._checked_at = -math.inf
        self._last_lookup = -math.inf
        self._mem: OrderedDict[str, bytes] = OrderedDict()
        self._mem_bytes = 0
        self._touches: dict[int, float] = {}
        self._last_flush = time.time()
        self._flushing: trio.Event | None = None
        #: invalidate() calls so far, and the count at each key's latest one (bounded; when
        #: one is forgotten, the floor rises to its count: see _invalidated_since)
        self._invalidations = 0
        self._invalidated: dict[str, int] = {}
        self._invalidated_floor = 0
        self._evictions = 0
        self._errors = 0
        self._paused = False
        self._paused_until = 0.0
        self._closed = False
        self._last_log = -_LOG_EVERY

    @classmethod
    async def open(
        cls,
        directory: Path,
        *,
        max_size: int,
        max_object_size: int,
        memory_object_size: int,
        memory_size: int,
        pause_interval: float = PAUSE_INTERVAL,
        busy_timeout: float = BUSY_TIMEOUT,
        touch_interval: float = TOUCH_INTERVAL,
        touch_batch: int = TOUCH_BATCH,
        touch_granularity: float = TOUCH_GRANULARITY,
        version_check_interval: float = VERSION_CHECK_INTERVAL,
    ) -> CacheStore:
        """Open (creating) the store in ``directory``; sweeps orphans. A corrupt index is set
        aside and rebuilt; raises StoreError only when the directory cannot be used at all
        (permissions, I/O errors, the index locked for ``busy_timeout``).

        ``version_check_interval``: how stale a lookup may be with respect to other processes'
        commits while lookups come in a burst (0: never; see the module docstring)."""
        limiter = trio.CapacityLimiter(1)
        busy_ms = int(busy_timeout * 1000)
        try:
            opened = await trio.to_thread.run_sync(
                _open_sync, str(directory), busy_ms, limiter=limiter
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the cache in {directory}: {exc}") from exc
        directory = Path(opened.directory)
        if opened.swept:
            logger.info("cache: removed %d orphaned body files in %s", opened.swept, directory)
        return cls(
            directory,
            opened,
            limiter,
            max_size=max_size,
            max_object_size=max_object_size,
            memory_object_size=memory_object_size,
            memory_size=memory_size,
            pause_interval=pause_interval,
            busy_timeout=busy_timeout,
            touch_interval=touch_interval,
            touch_batch=touch_batch,
            touch_granularity=touch_granularity,
            version_check_interval=version_check_interval,
        )

    # --- threads ----------------------------------------------------------------------------

    async def _db(self, fn: Callable[[], _T]) -> _T:
        return await trio.to_thread.run_sync(fn, limiter=self._db_limiter)

    async def _io(self, fn: Callable[[], _T]) -> _T:
        return await trio.to_thread.run_sync(fn, limiter=self._io_limiter)

    def _sync_version(self) -> None:
        """In a thread, holding the connection: catch up with other connections' commits (drop
        the memory copy of rows, add their new keys to the key filter); rebuild the key filter
        when it holds too many keys of deleted rows."""
        conn = self._conn
        (version,) = conn.execute("PRAGMA data_version").fetchone()
        if version != self._data_version:
            self._rows.clear()
            # Rows are never updated to another key and ids only grow (AUTOINCREMENT), so the
            # rows committed since the last look are exactly those above the highest id seen.
            # Deletions need nothing: a key left in the filter only costs one query.
            keys, top = _read_keys(conn, self._max_id)
            self._keys.update(keys)
            self._max_id = top
            self._totals = self._totals_sync(conn)
            self._data_version = version
        self._behind = False
        if (
            len(self._keys) > 2 * self._totals[0] + KEY_FILTER_SLACK
            and not conn.in_transaction  # never while holding the write lock
        ):
            # The version was read above: commits after this scan show up as a change.
            keys, top = _read_keys(conn)
            self._keys = keys
            self._max_id = max(self._max_id, top)

    def _remember(self, key: str, entries: tuple[Entry, ...]) -> None:
        rows = self._rows
        if key not in rows and len(rows) >= INDEX_MEMORY_KEYS:
            with suppress(StopIteration, KeyError, RuntimeError):
                del rows[next(iter(rows))]
        rows[key] = entries

    @contextmanager
    def _immediate(self) -> Iterator[sqlite3.Connection]:
        """In a thread: one write transaction (raises _Busy when the lock is not had in one
        slice, so the caller can back off without holding the connection)."""
        conn = self._conn
        self._sync_version()
        conn.execute(f"PRAGMA busy_timeout = {BEGIN_SLICE_MS}")
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if _is_busy(exc):
                raise _Busy from exc
            raise
        finally:
            conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
        try:
            self._sync_version()
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                with suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise

    async def _write(self, fn: Callable[[], _T]) -> _T:
        """Run a write transaction, retrying with jittered backoff while other processes hold
        the write lock, for at most busy_timeout in all."""
        deadline = trio.current_time() + self._busy_timeout
        delay = 0.002
        while True:
            try:
                return await self._db(fn)
            except _Busy:
                if trio.current_time() >= deadline:
                    raise _BusyTimeout("the cache index stayed locked by other processes") from None
                await trio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, 0.2)

    def _entries(self, key: str, rows: list[_Row]) -> tuple[Entry, ...]:
        out: list[Entry] = []
        for entry_id, variant, status, reason, blob, rq, rs, name, size in rows:
            try:
                headers = decode_headers(blob)
            except ValueError:
                logger.error("cache: entry %d of %r has damaged headers; skipped", entry_id, key)
                continue
            stored = Stored(status, headers, rq, rs, bytes(variant), size)
            out.append(Entry(entry_id, key, stored, bytes(reason), name))
        return tuple(out)

    def _read_sync(self, key: str) -> tuple[Entry, ...]:
        self._sync_version()
        entries = self._entries(key, self._conn.execute(_SELECT_KEY, (key,)).fetchall())
        self._remember(key, entries)
        return entries

    def _apply_touches(self, conn: sqlite3.Connection, touches: dict[int, float]) -> None:
        if touches:
            conn.executemany(_TOUCH, [(when, entry_id) for entry_id, when in touches.items()])

    def _totals_sync(self, conn: sqlite3.Connection) -> tuple[int, int]:
        entries, size = conn.execute("SELECT entries, bytes FROM totals WHERE id = 0").fetchone()
        return int(entries), int(size)

    def _invalidated_since(self, key: str, begun: int) -> bool:
        """Whether ``invalidate(key)`` was called after a writer that began at ``begun`` (or
        that can no longer be told: invalidations forgotten to bound memory count as such)."""
        return self._invalidated.get(key, 0) > begun or self._invalidated_floor > begun

    def _commit_sync(
        self,
        values: tuple[str, bytes, int, bytes, tuple[Header, ...], float, float, str, int],
        touches: dict[int, float],
        begun: int,
    ) -> tuple[Entry, list[str]] | None:
        """In a thread: index a finished body; None (nothing inserted) when its key was
        invalidated since the writer began."""
        key, variant, status, reason, headers, rq, rs, name, size = values
        doomed: list[tuple[str, str]] = []
        with self._immediate() as conn:
            self._apply_touches(conn, touches)
            # RFC 9111 §4.4: a response on its way when an unsafe method (or a purge) invalidated
            # its URI must not bring the old content back. Checked here, in the same
            # serialized index operation as the insert: an invalidate() called before this
            # point is seen, one called after deletes the row this inserts.
            if self._invalidated_since(key, begun):
                return None
            # One entry per (key, variant): the new row replaces the old one.
            for old_id, old_name in conn.execute(
                "SELECT id, body_name FROM entries WHERE key = ? AND variant = ?", (key, variant)
            ).fetchall():
                conn.execute("DELETE FROM entries WHERE id = ?", (old_id,))
                doomed.append((key, old_name))
            cursor = conn.execute(
                _INSERT,
                (
                    key,
                    variant,
                    status,
                    reason,
                    encode_headers(headers),
                    rq,
                    rs,
                    name,
                    size,
                    time.time(),
                ),
            )
            entry_id = cursor.lastrowid
            evicted = self._evict_sync(conn, entry_id, doomed)
            rows = self._entries(key, conn.execute(_SELECT_KEY, (key,)).fetchall())
            totals = self._totals_sync(conn)
        self._totals = totals
        self._evictions += evicted
        self._remember(key, rows)
        self._keys.add(hash(key))
        # _immediate caught up with every other commit inside this transaction, before our
        # insert: no unseen row has an id below ours.
        if entry_id is not None:
            self._max_id = max(self._max_id, entry_id)
        for doomed_key, _ in doomed:
            if doomed_key != key:
                self._rows.pop(doomed_key, None)
        entry = next(e for e in rows if e.entry_id == entry_id)
        return entry, [doomed_name for _, doomed_name in doomed]

    def _evict_sync(
        self, conn: sqlite3.Connection, keep: int | None, doomed: list[tuple[str, str]]
    ) -> int:
        """Delete least recently used rows (never ``keep``) until the total fits max_size."""
        (total,) = conn.execute("SELECT bytes FROM totals WHERE id = 0").fetchone()
        evicted = 0
        while total > self._max_size:
            victims = conn.execute(
                "SELECT id, key, body_name, body_size FROM entries WHERE id != ?"
                " ORDER BY access_time, id LIMIT 64",
                (-1 if keep is None else keep,),
            ).fetchall()
            if not victims:
                break
            for victim_id, victim_key, victim_name, victim_size in victims:
                if total <= self._max_size:
                    break
                conn.execute("DELETE FROM entries WHERE id = ?", (victim_id,))
                total -= victim_size
                evicted += 1
                doomed.append((victim_key, victim_name))
        return evicted

    def _after_commit(self, entry: Entry, doomed: list[str], whole: bytes | None) -> None:
        for name in doomed:
            self._mem_drop(name)
        if whole is not None:
            self._mem_put(entry.body_name, whole)
        if self._paused:
            self._paused = False
            logger.warning("cache: storing resumed")

    # --- memory tier ------------------------------------------------------------------------

    def _mem_put(self, name: str, data: bytes) -> None:
        if len(data) > self._memory_object_size or name in self._mem:
            return
        self._mem[name] = data
        self._mem_bytes += len(data)
        while self._mem_bytes > self._memory_size and self._mem:
            _, dropped = self._mem.popitem(last=False)
            self._mem_bytes -= len(dropped)

    def _mem_drop(self, name: str) -> None:
        data = self._mem.pop(name, None)
        if data is not None:
            self._mem_bytes -= len(data)

    # --- errors -----------------------------------------------------------------------------

    def _storing_failed(self, exc: BaseException) -> None:
        self._errors += 1
        if isinstance(exc, _BusyTimeout):
            self._log_limited("cache: entry not stored: %s", exc)
            return
        self._paused_until = trio.current_time() + self._pause_interval
        if not self._paused:
            self._paused = True
            logger.warning(
                "cache: storing paused after %s: %s (responses are still relayed; next try in"
                " %.0f s)",
                type(exc).__name__,
                exc,
                self._pause_interval,
            )

    def _index_failed(self, what: str, exc: BaseException) -> None:
        self._errors += 1
        self._log_limited("cache: %s failed: %s: %s", what, type(exc).__name__, exc)

    def _log_limited(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last_log >= _LOG_EVERY:
            self._last_log = now
            logger.error(message, *args)

    # --- public API -------------------------------------------------------------------------

    async def lookup(self, key: str) -> list[Entry]:
        """Every stored variant of ``key``, newest first. A database error is a miss.

        No thread hop for a key in the memory copy or not in the key filter; may be up to
        ``version_check_interval`` stale with respect to other processes' commits while
        lookups come in a burst (our own commits are always seen at once)."""
        if self._closed:
            return []
        try:
            now = time.monotonic()
            quiet = now - self._last_lookup >= self._burst_gap
            self._last_lookup = now
            if (
                not self._behind
                and (quiet or now - self._checked_at >= self._check_interval)
                and self._db_limiter.borrowed_tokens == 0
            ):
                # Nobody holds the connection, so the loop may use it for this one cheap
                # statement (WAL index in shared memory, no data pages). Catching up needs
                # data pages: a thread does it (_sync_version), on this lookup's way.
                self._checked_at = now
                (version,) = self._conn.execute("PRAGMA data_version").fetchone()
                if version != self._data_version:
                    self._behind = True
            if not self._behind:
                entries = self._rows.get(key)
                if entries is not None:
                    return list(entries)
                if hash(key) not in self._keys:
                    return []  # never stored (or long gone): no need to ask SQLite
            return list(await self._db(lambda: self._read_sync(key)))
        except sqlite3.Error as exc:
            self._index_failed("lookup", exc)
            return []

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
        if self._closed:
            return None
        if expected_size is not None and expected_size > self._max_object:
            return None
        probe = self._paused
        if probe and trio.current_time() < self._paused_until:
            return None
        need = max(expected_size or 0, WRITE_CHUNK)
        begun = self._invalidations  # before any await: see _invalidated_since
        try:
            token, fd = await self._io(lambda: self._create_temp(need if probe else 0))
        except OSError as exc:
            self._storing_failed(exc)
            return None
        return BodyWriter(
            self,
            token,
            fd,
            key,
            variant,
            status,
            reason,
            tuple(headers),
            request_time,
            response_time,
            begun,
        )

    def _create_temp(self, need: int) -> tuple[str, int]:
        """In a thread: a new locked tmp/<token>.part (after a pause: only if there is room)."""
        if need:
            st = os.statvfs(self._tmp)
            if st.f_bavail * st.f_frsize < need:
                raise OSError(errno.ENOSPC, "still no room for the cache")
        for _ in range(8):
            token = uuid.uuid4().hex
            path = os.path.join(self._tmp, token + ".part")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # A sweep may have locked and removed it between our create and our lock.
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    return token, fd
            except OSError:
                pass
            os.close(fd)
        raise OSError(errno.EAGAIN, "could not create a cache temp file")

    async def open_body(
        self,
        entry: Entry,
        *,
        offset: int = 0,
        length: int | None = None,
        read_ahead: bool = True,
    ) -> BodyReader | None:
        """None when the entry's file is gone (evicted or purged since the lookup).

        A body held in memory costs no thread hop. Otherwise one hop opens the file and reads
        the first piece the caller will ask for: up to READ_CHUNK bytes at ``offset`` (the
        start of a range; ``length`` bounds it), so ``read(offset, ...)`` right after answers
        without another hop. When that was the whole body the file is closed in the same hop.
        ``read_ahead=False`` (a caller that will ``sendfile(2)`` from ``fileno()``): the hop
        only opens the file and checks its size; a body of the memory tier is read as always.
        """
        if self._closed:
            return None
        name = entry.body_name
        data = self._mem.get(name)
        if data is not None:
            self._mem.move_to_end(name)
            return BodyReader(self, data=data)
        path = os.path.join(self._bodies, name)
        size = entry.stored.body_size
        small = size <= self._memory_object_size
        if small:
            start, ahead = 0, size
        else:
            start = min(max(offset, 0), size)
            ahead = min(READ_CHUNK, size - start) if read_ahead else 0
            if length is not None:
                ahead = max(0, min(ahead, length))
        try:
            fd, head = await self._io(
                lambda: _open_and_read(path, size, start, ahead, keep=not small)
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            self._index_failed("opening a body", exc)
            return None
        if small:
            if len(head) != size:
                return None
            self._mem_put(name, head)
            return BodyReader(self, data=head)
        # fd < 0: the whole body was read ahead; the path is kept only for a read that comes
        # back after the read-ahead was let go.
        return BodyReader(
            self,
            fd=fd,
            path=path if fd < 0 else None,
            size=size,
            head=head,
            head_at=start,
        )

    async def update(
        self, entry: Entry, headers: list[Header], request_time: float, response_time: float
    ) -> Entry:
        """§3.2/§4.3.4: store freshened headers and times of an entry after a 304.

        Returns the updated entry (also when its row has gone meanwhile or the index failed:
        the caller may still serve it)."""
        stored = replace(
            entry.stored,
            headers=tuple(headers),
            request_time=request_time,
            response_time=response_time,
        )
        new = replace(entry, stored=stored)
        if self._closed:
            return new
        blob = encode_headers(stored.headers)

        def update_sync() -> None:
            with self._immediate() as conn:
                conn.execute(
                    "UPDATE entries SET headers = ?, request_time = ?, response_time = ?,"
                    " access_time = max(access_time, ?) WHERE id = ?",
                    (blob, request_time, response_time, time.time(), entry.entry_id),
                )
                rows = self._entries(entry.key, conn.execute(_SELECT_KEY, (entry.key,)).fetchall())
            self._remember(entry.key, rows)

        try:
            await self._write(update_sync)
        except (sqlite3.Error, StoreError) as exc:
            self._index_failed("update", exc)
        return new

    def set_limits(
        self, *, max_size: int, max_object_size: int, memory_object_size: int, memory_size: int
    ) -> None:
        """New size limits (a config reload): they apply to what is stored from now on."""
        self._max_size = max_size
        self._max_object = min(max_object_size, max_size)
        self._memory_object_size = memory_object_size if memory_size > 0 else 0
        self._memory_size = memory_size
        for name in [n for n, data in self._mem.items() if len(data) > self._memory_object_size]:
            self._mem_drop(name)
        while self._mem_bytes > self._memory_size and self._mem:
            _, dropped = self._mem.popitem(last=False)
            self._mem_bytes -= len(dropped)

    async def shrink(self) -> int:
        """Evict least recently used entries until the total fits ``max_size``; how many."""
        if self._closed or self._totals[1] <= self._max_size:
            return 0
        touches = self._take_touches()

        def shrink_sync() -> list[tuple[str, str]]:
            doomed: list[tuple[str, str]] = []
            with self._immediate() as conn:
                self._apply_touches(conn, touches)
                evicted = self._evict_sync(conn, None, doomed)
                totals = self._totals_sync(conn)
            self._totals = totals
            self._evictions += evicted
            for key, _ in doomed:
                self._rows.pop(key, None)
            return doomed

        try:
            doomed = await self._write(shrink_sync)
        except (sqlite3.Error, StoreError) as exc:
            self._index_failed("shrink", exc)
            return 0
        for _, name in doomed:
            self._mem_drop(name)
        if doomed:
            paths = [os.path.join(self._bodies, name) for _, name in doomed]
            with trio.CancelScope(shield=True):
                await self._io(lambda: _remove_files(paths, -1))
        return len(doomed)

    async def invalidate(self, key: str) -> int:
        """Remove every variant of ``key`` (purge, §4.4 invalidation); returns how many.

        A writer of ``key`` begun before this call and not yet committed will not be kept: its
        ``commit`` returns None."""
        if self._closed:
            return 0
        # Recorded before any await, so a commit that reaches the index after this call sees it.
        self._invalidations += 1
        self._invalidated.pop(key, None)
        if len(self._invalidated) >= INVALIDATED_MEMORY:
            self._invalidated_floor = self._invalidated.pop(next(iter(self._invalidated)))
        self._invalidated[key] = self._invalidations

        def invalidate_sync() -> list[str]:
            with self._immediate() as conn:
                names = [
                    name
                    for (name,) in conn.execute(
                        "SELECT body_name FROM entries WHERE key = ?", (key,)
                    ).fetchall()
                ]
                if names:
                    conn.execute("DELETE FROM entries WHERE key = ?", (key,))
                totals = self._totals_sync(conn)
            self._totals = totals
            self._remember(key, ())
            return names

        try:
            names = await self._write(invalidate_sync)
        except (sqlite3.Error, StoreError) as exc:
            self._index_failed("invalidate", exc)
            return 0
        for name in names:
            self._mem_drop(name)
        if names:
            # Rows are committed; only now the files.
            paths = [os.path.join(self._bodies, name) for name in names]
            with trio.CancelScope(shield=True):
                await self._io(lambda: _remove_files(paths, -1))
        return len(names)

    def touch(self, entry: Entry) -> None:
        """Record a use (LRU); written to the index in batches."""
        if self._closed:
            return
        if entry.body_name in self._mem:
            self._mem.move_to_end(entry.body_name)
        now = time.time()
        entry_id = entry.entry_id
        recorded = self._recorded_use
        last = recorded.get(entry_id)
        if last is not None and now - last < self._touch_granularity:
            return  # recorded lately: the LRU is exact to TOUCH_GRANULARITY
        if last is None and len(recorded) >= TOUCH_MEMORY:
            recorded.clear()  # bounded; forgetting only means one more write per entry
        recorded[entry_id] = now
        self._touches[entry_id] = now
        if self._flushing is None and (
            len(self._touches) >= self._touch_batch
            or now - self._last_flush >= self._touch_interval
        ):
            self._flushing = trio.Event()
            trio.lowlevel.spawn_system_task(self._flush_task, name="cache touch flush")

    def _take_touches(self) -> dict[int, float]:
        touches, self._touches = self._touches, {}
        self._last_flush = time.time()
        return touches

    async def _flush_touches(self) -> None:
        touches = self._take_touches()
        if not touches:
            return

        def flush_sync() -> None:
            with self._immediate() as conn:
                self._apply_touches(conn, touches)
                totals = self._totals_sync(conn)
            self._totals = totals

        try:
            await self._write(flush_sync)
        except (sqlite3.Error, StoreError) as exc:
            self._index_failed("recording access times", exc)

    async def _flush_task(self) -> None:
        # A system task: nothing may escape it (it would crash the whole run).
        try:
            await self._flush_touches()
        except Exception:
            self._errors += 1
            logger.exception("cache: flushing access times failed")
        finally:
            done, self._flushing = self._flushing, None
            if done is not None:
                done.set()

    def stats(self) -> StoreStats:
        entries, size = self._totals
        return StoreStats(
            entries=entries,
            bytes=size,
            evictions=self._evictions,
            errors=self._errors,
            paused=self._paused,
        )

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            if self._flushing is not None:
                await self._flushing.wait()
            await self._flush_touches()
            await self._db(self._conn.close)
        self._rows.clear()
        self._keys = set()
        self._mem.clear()
        self._mem_bytes = 0

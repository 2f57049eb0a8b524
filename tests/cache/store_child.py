"""A child process that drives a CacheStore, for the multi-process tests in test_store.py.

Run as ``python tests/cache/store_child.py MODE DIR ...``:

``slow DIR``
    Commits a small entry under the key ``survivor``, prints ``ready``, then writes a large body
    under ``big`` in 256 KiB pieces (each one reaches the temp file), printing ``flushed N``
    after each and sleeping a little in between, for at most 30 s. The test kills it with
    SIGKILL in the middle.
``mixed DIR NAME COUNT SEED``
    Three tasks each store COUNT bodies of random sizes under 30 shared keys (so this process
    and its sibling replace each other's entries), read back random keys and check every body
    against the SHA-256 its entry carries, and now and then open and close a second store on
    the directory (its orphan sweep runs while the writers write). Prints one JSON line and
    exits 1 when anything went wrong.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from pathlib import Path

import trio

from proxyd.cache.store import CacheStore, Entry

PIECE = 256 << 10
KEYS = 30


async def open_store(directory: Path) -> CacheStore:
    return await CacheStore.open(
        directory,
        max_size=1 << 30,
        max_object_size=16 << 20,
        memory_object_size=16 << 10,
        memory_size=1 << 20,
    )


async def slow(directory: Path) -> None:
    store = await open_store(directory)
    now = time.time()
    writer = await store.begin("survivor", b"", 200, b"OK", [], now, now, 5)
    assert writer is not None
    await writer.write(b"alive")
    assert await writer.commit() is not None
    print("ready", flush=True)
    big = await store.begin("big", b"", 200, b"OK", [], now, now, None)
    assert big is not None
    piece = bytes(range(256)) * (PIECE // 256)
    with trio.move_on_after(30):
        while True:
            await big.write(piece)  # a full WRITE_CHUNK: goes to the file now
            print(f"flushed {big.written}", flush=True)
            await trio.sleep(0.01)


async def read_body(store: CacheStore, entry: Entry) -> bytes | None:
    reader = await store.open_body(entry)
    if reader is None:
        return None  # replaced or evicted since the lookup: allowed
    try:
        cached = reader.cached()
        if cached is not None:
            return cached
        parts: list[bytes] = []
        offset = 0
        while True:
            piece = await reader.read(offset, 1 << 20)
            if not piece:
                return b"".join(parts)
            parts.append(piece)
            offset += len(piece)
    finally:
        await reader.aclose()


async def mixed(directory: Path, name: str, count: int, seed: int) -> int:
    rng = random.Random(seed)
    store = await open_store(directory)
    problems: list[str] = []
    committed = 0
    verified = 0

    async def worker(number: int) -> None:
        nonlocal committed, verified
        for i in range(count):
            key = f"k{rng.randrange(KEYS)}"
            body = rng.randbytes(rng.choice([0, 100, 5000, 40_000, 300_000]))
            digest = hashlib.sha256(body).hexdigest().encode()
            now = time.time()
            headers = [(b"X-Digest", digest), (b"X-Writer", name.encode())]
            writer = await store.begin(key, b"", 200, b"OK", headers, now, now, len(body))
            if writer is None:
                problems.append(f"begin refused {key}")
                continue
            try:
                for offset in range(0, len(body), 65536):
                    await writer.write(body[offset : offset + 65536])
                entry = await writer.commit()
            finally:
                await writer.abort()
            if entry is None:
                problems.append(f"commit of {key} not kept")
            else:
                committed += 1
            for found in await store.lookup(f"k{rng.randrange(KEYS)}"):
                data = await read_body(store, found)
                if data is None:
                    continue
                want = dict(found.stored.headers)[b"X-Digest"]
                if (
                    len(data) != found.stored.body_size
                    or hashlib.sha256(data).hexdigest().encode() != want
                ):
                    problems.append(f"body of {found.key} does not match its entry")
                verified += 1
            if number == 0 and i % 8 == 4:
                # Another opener's sweep must leave live writers' files alone.
                other = await open_store(directory)
                await other.aclose()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for number in range(3):
                nursery.start_soon(worker, number)
    errors = store.stats().errors
    await store.aclose()
    print(
        json.dumps(
            {"committed": committed, "verified": verified, "errors": errors, "problems": problems}
        ),
        flush=True,
    )
    return 1 if problems or errors else 0


def main(argv: list[str]) -> int:
    mode, directory = argv[1], Path(argv[2])
    if mode == "slow":
        trio.run(slow, directory)
        return 0
    if mode == "mixed":
        return trio.run(mixed, directory, argv[3], int(argv[4]), int(argv[5]))
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    sys.exit(main(sys.argv))

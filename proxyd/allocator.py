"""The C allocator's settings for a long-running daemon (glibc only): one malloc arena and fixed
thresholds, so that the heap stays the size of what is in it.

Why. Under steady load proxyd's RSS kept growing while the objects in it did not (the soak of
``bench/memory_bench.py``: 10 minutes, the cache evicting all the time, WebSocket sessions and
idle clients churning; tracemalloc flat after the warm-up, RSS +7 %). ``malloc_info`` showed
where: memory that was free but kept.

- **Arenas.** glibc gives each thread that allocates an arena of its own (up to eight per
  core), and memory freed into an arena stays in that arena. proxyd's blocking work runs in
  trio's worker threads (the cache's SQLite index and body files, name resolution), a
  different cached thread each time, so SQLite's page cache and the bodies read there were
  spread over eight arenas of 0.5-1 MiB each, more than 90 % free. ``malloc_trim`` cannot give
  that back: it releases the free top of the main arena only, and whole free pages in bins.
  One arena (``M_ARENA_MAX``) costs a lock that the event loop's thread and the odd worker
  thread rarely contend for (Python's small objects do not use malloc at all: pymalloc).
- **Thresholds.** glibc raises its mmap threshold to the size of any mmapped block freed (up
  to 32 MiB) and its trim threshold to twice that, so after the first large transient buffer
  blocks of that size come from the heap and up to twice that stays at the heap's top,
  unreturned. Fixed at 128 KiB (glibc's starting values; setting them turns the adjustment
  off), a block of 128 KiB or more is mapped and unmapped by itself, and a free top beyond
  128 KiB goes back to the system. proxyd's per-request buffers are 64 KiB at most (socket
  reads, ``http.sockio``), below the threshold; the large ones (1 MiB reads of cached bodies
  without sendfile, 256 KiB cache writes) are rare and few per response.

Measured (360-s soaks, same machine): +7.9 % RSS as things were; +5.0 % with one arena; +3.1 %
with one arena, the fixed thresholds and ``http.sockio``'s scratch-buffer reads; the full
10-minute soak is in bench/RESULTS.md.

How. ``tune_malloc`` calls ``mallopt`` through ctypes. It runs before any thread starts (a
thread keeps the arena it was given), so ``cli.main`` calls it first. A setting whose glibc
variable is in the environment (``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``) is left alone: the operator's choice wins, and glibc reads it
itself. Nothing is done when the C library is not glibc (musl has a single heap; macOS another
allocator).
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Final

#: glibc's mallopt options (malloc.h).
M_TRIM_THRESHOLD: Final = -1
M_MMAP_THRESHOLD: Final = -3
M_ARENA_MAX: Final = -8
#: What proxyd sets, each with the environment variable that overrides it.
SETTINGS: Final = (
    (M_ARENA_MAX, 1, "MALLOC_ARENA_MAX"),
    (M_MMAP_THRESHOLD, 128 << 10, "MALLOC_MMAP_THRESHOLD_"),
    (M_TRIM_THRESHOLD, 128 << 10, "MALLOC_TRIM_THRESHOLD_"),
)


def tune_malloc() -> list[str]:
    """Apply ``SETTINGS`` to glibc's malloc; the environment variables of those applied."""
    if not sys.platform.startswith("linux"):
        return []
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        # gnu_get_libc_version exists only in glibc (musl's mallopt ignores every option).
        libc.gnu_get_libc_version  # noqa: B018 -- the lookup is the check
    except (OSError, AttributeError):
        return []
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return [
        variable
        for option, value, variable in SETTINGS
        if not os.environ.get(variable) and mallopt(option, value)
    ]

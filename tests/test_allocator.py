"""proxyd.allocator: one glibc malloc arena whatever the threads, and fixed mmap/trim thresholds
(checked in fresh processes with glibc's own report, ``malloc_info``)."""

from __future__ import annotations

import ctypes
import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _glibc() -> bool:
    try:
        ctypes.CDLL(None).gnu_get_libc_version  # noqa: B018
    except AttributeError:
        return False
    return sys.platform.startswith("linux")


pytestmark = pytest.mark.skipif(not _glibc(), reason="glibc malloc only")

# Run in a fresh interpreter: ``tune_malloc`` (or not), then
# - arenas: four threads allocate (above pymalloc's 512 bytes, below the mmap threshold) while the
#   others hold theirs: glibc gives each thread an arena of its own unless the count is capped;
# - thresholds: a 4 MiB block is mapped and freed (glibc's dynamic threshold then rises to
#   4 MiB), then a 300 KiB block is taken: mapped by itself only with a fixed threshold.
# Prints what tune_malloc applied, the arenas malloc_info reports (one <heap> per arena) and
# whether the 300 KiB block was mapped (malloc_info's count of mapped blocks went up).
_PROBE = textwrap.dedent(
    """
    import ctypes, os, re, sys, tempfile, threading
    from proxyd.allocator import tune_malloc
    applied = tune_malloc() if sys.argv[1] == "tune" else []
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = (ctypes.c_char_p, ctypes.c_char_p)
    libc.malloc_info.argtypes = (ctypes.c_int, ctypes.c_void_p)
    libc.fclose.argtypes = (ctypes.c_void_p,)

    def info():
        path = tempfile.mktemp()
        f = libc.fopen(path.encode(), b"w")
        libc.malloc_info(0, f)
        libc.fclose(f)
        with open(path) as r:
            text = r.read()
        os.unlink(path)
        return text

    def mapped():
        return int(re.findall(r'<total type="mmap" count="([0-9]+)"', info())[-1])

    barrier = threading.Barrier(4)
    kept = []
    def work():
        kept.append([bytearray(4000) for _ in range(50)])
        barrier.wait()
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    arenas = info().count("<heap nr=")

    libc.free(libc.malloc(4 << 20))
    before = mapped()
    block = libc.malloc(300 << 10)
    print(",".join(applied) or "-", arenas, mapped() > before)
    libc.free(block)
    """
)


def _probe(mode: str, **env: str) -> tuple[str, int, bool]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    environ.update(env, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,
        check=True,
    ).stdout.split()
    return out[0], int(out[1]), out[2] == "True"


def test_glibc_alone_makes_thread_arenas_and_raises_its_threshold() -> None:
    """The control: without tune_malloc the probe sees what the module is there to prevent."""
    applied, arenas, mapped = _probe("plain")
    assert applied == "-"
    assert arenas >= 4
    assert not mapped  # the threshold rose to 4 MiB: 300 KiB came from the heap


def test_tune_malloc_keeps_one_arena_and_fixed_thresholds() -> None:
    applied, arenas, mapped = _probe("tune")
    assert applied == "MALLOC_ARENA_MAX,MALLOC_MMAP_THRESHOLD_,MALLOC_TRIM_THRESHOLD_"
    assert arenas == 1
    assert mapped  # still 128 KiB: a block above it is mapped by itself, given back when freed


def test_the_environment_wins() -> None:
    applied, arenas, mapped = _probe("tune", MALLOC_ARENA_MAX="2")
    assert applied == "MALLOC_MMAP_THRESHOLD_,MALLOC_TRIM_THRESHOLD_"
    assert arenas == 2  # glibc read the variable itself
    assert mapped
    applied, _, mapped = _probe("tune", MALLOC_MMAP_THRESHOLD_="8388608")
    assert "MALLOC_MMAP_THRESHOLD_" not in applied
    assert not mapped  # the operator's 8 MiB threshold stands


def test_the_daemon_tunes_malloc_before_anything_else(monkeypatch: pytest.MonkeyPatch) -> None:
    """``cli.main`` applies the settings first (a check-config run is enough to see the call)."""
    from proxyd import cli

    calls: list[int] = []

    def tune_malloc() -> list[str]:
        calls.append(1)
        return []

    monkeypatch.setattr(cli, "tune_malloc", tune_malloc)
    assert cli.main(["--check-config", str(ROOT / "config" / "proxyd.yaml")]) == 0
    assert calls == [1]


def _thread_heaps(pid: int) -> int:
    """Thread arenas' heaps in a process's memory map: glibc reserves 64 MiB for each, aligned
    to 64 MiB, the used part read-write and the rest inaccessible right after it (a thread's
    stack is the other way round: its guard page comes first)."""
    rows = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) == 5:  # anonymous
            start, end = (int(x, 16) for x in fields[0].split("-"))
            rows.append((start, end, fields[1]))
    return sum(
        1
        for (start, end, mode), (next_start, next_end, next_mode) in itertools.pairwise(rows)
        if start % (64 << 20) == 0
        and mode.startswith("rw")
        and next_start == end
        and next_mode.startswith("---")
        and next_end - start == 64 << 20
    )


@pytest.mark.parametrize("arena_max", [None, "8"])
def test_the_daemon_process_has_one_arena(arena_max: str | None) -> None:
    """End to end: a running proxyd whose worker threads allocated (the cache's index, name
    resolution) has no thread heap; the control (glibc told by the environment to allow eight
    arenas, which tune_malloc leaves alone) shows the check would see them."""
    import signal
    import socket
    import tempfile
    import time

    ports = []
    for _ in range(2):  # the proxy's, and one nobody listens on (the origin: refused)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    port, closed = ports
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    environ["PYTHONPATH"] = str(ROOT)
    if arena_max is not None:
        environ["MALLOC_ARENA_MAX"] = arena_max
    with tempfile.TemporaryDirectory() as cache_dir:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "proxyd",
                "--listen",
                f"127.0.0.1:{port}",
                "--admin-listen",
                "127.0.0.1:0",
                "--cache-dir",
                cache_dir,
                "--log-level",
                "error",
            ],
            env=environ,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "proxyd did not start"
                    time.sleep(0.1)
            # Requests by name: the resolver and the cache work in worker threads.
            for _ in range(4):
                with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                    client.sendall(
                        b"GET http://localhost:%d/x HTTP/1.1\r\nHost: localhost\r\n\r\n" % (closed,)
                    )
                    client.settimeout(10)
                    assert client.recv(100).startswith(b"HTTP/1.1 ")
            heaps = _thread_heaps(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=20)
    if arena_max is None:
        assert heaps == 0
    else:
        assert heaps >= 1

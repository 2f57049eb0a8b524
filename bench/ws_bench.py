"""WebSocket messages per second and memory per idle session through proxyd, in one run.

Run it from the repository root with the project's virtualenv active::

    python bench/ws_bench.py                          # 2 rounds x 2 s per run, about 2.5 minutes
    python bench/ws_bench.py --rounds 1 --duration 1 --sessions 200 --json /tmp/ws.json
    python bench/ws_bench.py --only "echo 64 B" --sessions 0 --rounds 5   # one scenario

How it works:

* **Origin**: a WebSocket server in this process (asyncio protocols, a hand-written RFC 6455 §5.2
  frame parser; no library in the hot path). Binary messages are echoed; text messages are
  commands: ``SINK`` (count binary messages instead of echoing), ``COUNT`` (answer ``COUNT n``),
  ``DOWN size seconds`` (stream binary messages of ``size`` bytes for ``seconds``, honouring the
  transport's write flow control, then send ``END n``). A Close is answered and the server closes
  TCP first (RFC 6455 §7.1.1).
* **Clients**: asyncio streams in this process, raw frames built once (masked as RFC 6455 §5.3
  requires of clients) and reused; every echo is compared byte for byte, every count checked.
  The load generator runs in this process, never in proxyd's.
* **Targets**, all on 127.0.0.1:

  - ``direct``: straight to the origin (reference only; no proxyd CPU to show).
  - ``tunnel``: ``CONNECT`` through a proxyd started with ``websocket.inspect_connect: false``,
    then the WebSocket upgrade inside: proxyd sees a plain byte tunnel. This is the baseline.
  - ``session``: the same client bytes through a second proxyd with ``inspect_connect: true``: the
    plaintext upgrade inside CONNECT (how browsers send ws://) is a WebSocket session for proxyd's
    relay, frame by frame. Until the relay exists this is a byte tunnel too, and the script says
    so: after the runs it reads ``proxyd_websocket_sessions_total`` from each proxyd's /metrics.
  - ``absolute``: the absolute-form upgrade (``GET http://host/ws`` with ``Upgrade: websocket``
    sent to the session proxyd), measured only when a probe handshake gets a 101.

* **Scenarios**: 64-byte and 64 KiB binary messages, each as echo round trips (``--connections``
  connections, one message in flight on each) and one-way streaming on one connection, up
  (client to origin) and down (origin to client). Echo rows count round trips (two messages
  relayed each); stream rows count messages delivered.
* **proxyd** runs as ``python -m proxyd --config TMP/X.yaml`` daemons with the access log off,
  ``log_level: warning``, CONNECT allowed to every port (the origin's port is ephemeral), and limits
  raised for the memory test (``client.max_connections``, ``pool.tunnels_per_host``). With
  ``taskset`` and two usable CPUs, the proxyds run on the first CPU and this process (origin and
  clients) on the second.
* **CPU**: ``utime + stime`` of the proxyd process from ``/proc/PID/stat`` before and after each
  run, divided by the messages it relayed, in µs (clock-tick resolution: 10 ms per run at worst).
* **Memory per idle session**: per round, a fresh proxyd for each of ``tunnel`` and ``session``
  (a used process keeps its freed memory and would hide the growth) takes 20 warm-up sessions,
  then ``--sessions`` (default 1,000) sessions are opened, handshakes complete, nothing moves for a
  second; (VmRSS after - VmRSS before) / sessions from ``/proc/PID/status``. Then all are closed
  with a Close handshake and that proxyd is stopped. The file-descriptor limit
  is raised with ``resource.setrlimit`` (inherited by the proxyds).
* **Rounds**: each round runs every scenario against every target, interleaved; tables show medians.
  Every run is bounded by ``--duration`` plus a timeout and by ``--max-messages``.

Errors (failed handshakes, wrong echoes, counts that differ, timeouts) are never hidden: they are in
the table, and the exit status is 2 when there were any (1 when the benchmark could not run).
Everything started here is stopped by pid at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import http.client
import json
import os
import platform
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Final

from bench import http_bench as hb
from bench.http_bench import BenchError

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
LOOPBACK: Final = "127.0.0.1"
WS_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
SIZES: Final = {"64 B": 64, "64 KiB": 65536}
KINDS: Final = ("echo", "stream up", "stream down")
STARTUP_WAIT: Final = 10.0
STOP_WAIT: Final = 5.0
RUN_GRACE: Final = 15.0  # a run may take this long beyond --duration before it counts as stuck
HANDSHAKE_TIMEOUT: Final = 10.0
READ_SIZE: Final = 1 << 18
WRITE_HIGH_WATER: Final = 1 << 18
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


# --- frames (RFC 6455 §5.2) -----------------------------------------------------------------------


def apply_mask(payload: bytes, key: bytes) -> bytes:
    """XOR with the 4-byte key (RFC 6455 §5.3); one big-integer XOR instead of a byte loop."""
    n = len(payload)
    if n == 0:
        return b""
    keystream = (key * (n // 4 + 1))[:n]
    value = int.from_bytes(payload, "little") ^ int.from_bytes(keystream, "little")
    return value.to_bytes(n, "little")


def frame(opcode: int, payload: bytes, *, mask: bool) -> bytes:
    """One final frame. Clients mask with a fresh random key (RFC 6455 §5.3); servers never mask."""
    n = len(payload)
    head = bytearray([0x80 | opcode])
    mask_bit = 0x80 if mask else 0
    if n < 126:
        head.append(mask_bit | n)
    elif n < 1 << 16:
        head.append(mask_bit | 126)
        head += n.to_bytes(2, "big")
    else:
        head.append(mask_bit | 127)
        head += n.to_bytes(8, "big")
    if not mask:
        return bytes(head) + payload
    key = os.urandom(4)
    return bytes(head) + key + apply_mask(payload, key)


@dataclass(slots=True)
class WsMessage:
    opcode: int  # OP_TEXT, OP_BINARY or a control opcode
    size: int
    payload: bytes | None  # None when binary payloads are only counted


class FrameParser:
    """Incremental frame parser: bytes in, whole messages out (fragments joined).

    ``keep_binary = False`` counts binary messages without unmasking or copying them (a sink);
    text and control payloads are always kept.
    """

    __slots__ = ("_buffer", "_opcode", "_parts", "_size", "keep_binary")

    def __init__(self, keep_binary: bool = True) -> None:
        self._buffer = bytearray()
        self._opcode = -1  # opcode of the message being assembled from fragments
        self._parts: list[bytes] = []
        self._size = 0
        self.keep_binary = keep_binary

    def feed(self, data: bytes) -> list[WsMessage]:
        buffer = self._buffer
        buffer += data
        out: list[WsMessage] = []
        pos, end = 0, len(buffer)
        while end - pos >= 2:
            b0, b1 = buffer[pos], buffer[pos + 1]
            length = b1 & 0x7F
            head = 2
            if length == 126:
                if end - pos < 4:
                    break
                length = int.from_bytes(buffer[pos + 2 : pos + 4], "big")
                head = 4
            elif length == 127:
                if end - pos < 10:
                    break
                length = int.from_bytes(buffer[pos + 2 : pos + 10], "big")
                head = 10
            masked = b1 & 0x80
            if masked:
                head += 4
            if end - pos < head + length:
                break
            opcode, fin = b0 & 0x0F, b0 & 0x80
            start = pos + head
            keep = opcode != OP_BINARY or self.keep_binary
            if opcode == OP_CONT:
                keep = self._opcode != OP_BINARY or self.keep_binary
            payload: bytes | None = None
            if keep:
                payload = bytes(buffer[start : start + length])
                if masked:
                    payload = apply_mask(payload, bytes(buffer[start - 4 : start]))
            pos = start + length
            if opcode >= OP_CLOSE:  # control frames are never fragmented (§5.5)
                out.append(WsMessage(opcode, length, payload))
                continue
            if opcode != OP_CONT:
                self._opcode, self._parts, self._size = opcode, [], 0
            self._size += length
            if payload is not None:
                self._parts.append(payload)
            if fin:
                joined = b"".join(self._parts) if keep else None
                out.append(WsMessage(self._opcode, self._size, joined))
                self._parts, self._size = [], 0
        del buffer[:pos]
        return out


def accept_value(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest())  # RFC 6455 §4.2.2


def header_value(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        field_name, _, value = line.partition(b":")
        if field_name.strip().lower() == name:
            return value.strip()
    return None


# --- the origin -----------------------------------------------------------------------------------


class OriginProtocol(asyncio.Protocol):
    """One origin connection: the upgrade, then echo / sink / stream-down as commanded."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.parser: FrameParser | None = None
        self.sunk = 0
        self.writable = asyncio.Event()
        self.writable.set()
        self.streamer: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.origin.open += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.origin.open -= 1
        self.writable.set()
        if self.streamer is not None:
            self.streamer.cancel()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.parser is None:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            head, _, rest = self.head.partition(b"\r\n\r\n")
            key = header_value(head, b"sec-websocket-key")
            upgrade = (header_value(head, b"upgrade") or b"").lower()
            if key is None or upgrade != b"websocket":
                body = b"this origin only speaks WebSocket\n"
                self.transport.write(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Length: "
                    + str(len(body)).encode()
                    + b"\r\nConnection: close\r\n\r\n"
                    + body
                )
                self.transport.close()
                return
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept_value(key) + b"\r\n\r\n"
            )
            self.parser = FrameParser()
            data = rest  # frames that came with the upgrade are not lost
            if not data:
                return
        for message in self.parser.feed(data):
            self.on_message(message)

    def on_message(self, message: WsMessage) -> None:
        transport = self.transport
        assert transport is not None and self.parser is not None
        if message.opcode == OP_BINARY:
            if self.parser.keep_binary:
                assert message.payload is not None
                transport.write(frame(OP_BINARY, message.payload, mask=False))
            else:
                self.sunk += 1
        elif message.opcode == OP_TEXT:
            self.on_command((message.payload or b"").decode())
        elif message.opcode == OP_PING:
            transport.write(frame(OP_PONG, message.payload or b"", mask=False))
        elif message.opcode == OP_CLOSE:
            transport.write(frame(OP_CLOSE, (message.payload or b"")[:125], mask=False))
            transport.close()  # RFC 6455 §7.1.1: the server closes TCP first

    def on_command(self, command: str) -> None:
        assert self.transport is not None and self.parser is not None
        words = command.split()
        if words[:1] == ["SINK"]:
            self.parser.keep_binary = False
            self.sunk = 0
        elif words[:1] == ["COUNT"]:
            self.transport.write(frame(OP_TEXT, f"COUNT {self.sunk}".encode(), mask=False))
        elif words[:1] == ["DOWN"] and len(words) == 4:
            size, seconds, limit = int(words[1]), float(words[2]), int(words[3])
            self.streamer = asyncio.get_running_loop().create_task(
                self.stream_down(size, seconds, limit)
            )

    async def stream_down(self, size: int, seconds: float, limit: int) -> None:
        transport = self.transport
        assert transport is not None
        one = frame(OP_BINARY, bytes(size), mask=False)
        batch_count = max(1, 16384 // len(one))
        batch = one * batch_count
        sent = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and sent + batch_count <= limit:
            await self.writable.wait()
            if transport.is_closing():
                return
            transport.write(batch)
            sent += batch_count
        await self.writable.wait()
        transport.write(frame(OP_TEXT, f"END {sent}".encode(), mask=False))


class Origin:
    def __init__(self) -> None:
        self.open = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: OriginProtocol(self), LOOPBACK, 0, backlog=4096
        )
        self.port = self.server.sockets[0].getsockname()[1]


# --- clients --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    proxy_port: int | None  # None: direct to the origin
    absolute_form: bool = False
    proxy: subprocess.Popen[bytes] | None = None
    admin_port: int | None = None


class WsClient:
    """One client WebSocket (through a proxy or not), frames read into a FrameParser."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.parser = FrameParser()
        self.pending: list[WsMessage] = []

    @classmethod
    async def open(cls, target: Target, origin_port: int) -> WsClient:
        authority = f"{LOOPBACK}:{origin_port}".encode()
        port = target.proxy_port if target.proxy_port is not None else origin_port
        reader, writer = await asyncio.open_connection(LOOPBACK, port, limit=READ_SIZE * 2)
        try:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            path = b"/ws"
            if target.proxy_port is not None and not target.absolute_form:
                writer.write(
                    b"CONNECT " + authority + b" HTTP/1.1\r\nHost: " + authority + b"\r\n\r\n"
                )
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
                    raise BenchError(f"CONNECT refused: {head.splitlines()[0]!r}")
            elif target.absolute_form:
                path = b"http://" + authority + b"/ws"
            key = base64.b64encode(os.urandom(16))
            writer.write(
                b"GET " + path + b" HTTP/1.1\r\nHost: " + authority + b"\r\n"
                b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 101"):
                raise BenchError(f"upgrade refused: {head.splitlines()[0]!r}")
            if header_value(head, b"sec-websocket-accept") != accept_value(key):
                raise BenchError("wrong Sec-WebSocket-Accept")
        except BaseException:
            writer.close()
            raise
        return cls(reader, writer)

    async def next_message(self) -> WsMessage:
        while not self.pending:
            data = await self.reader.read(READ_SIZE)
            if not data:
                raise BenchError("connection closed while waiting for a message")
            self.pending.extend(self.parser.feed(data))
        return self.pending.pop(0)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def text_command(self, command: str) -> None:
        await self.send(frame(OP_TEXT, command.encode(), mask=True))

    async def close(self, timeout: float = 5.0) -> bool:
        """Close handshake (RFC 6455 §5.5.1), then wait for the server to close TCP."""
        try:
            async with asyncio.timeout(timeout):
                await self.send(frame(OP_CLOSE, (1000).to_bytes(2, "big"), mask=True))
                while True:
                    message = await self.next_message()
                    if message.opcode == OP_CLOSE:
                        break
                await self.reader.read()  # EOF
            return True
        except (BenchError, OSError, TimeoutError):
            return False
        finally:
            self.writer.close()


@dataclass
class RunResult:
    scenario: str
    target: str
    round: int
    messages: int  # round trips (echo) or messages delivered (stream)
    relayed: int  # messages that crossed proxyd (2 per echo round trip)
    seconds: float
    rate: float
    errors: int
    error_text: str = ""
    proxyd_cpu_s: float | None = None
    proxyd_cpu_us_per_message: float | None = None


def masked_batch(size: int, count: int) -> bytes:
    return b"".join(frame(OP_BINARY, os.urandom(size), mask=True) for _ in range(count))


async def run_echo(
    target: Target, origin_port: int, size: int, connections: int, seconds: float, limit: int
) -> tuple[int, int, str]:
    """Round trips on ``connections`` sockets, one message in flight on each."""
    payload = os.urandom(size)
    frames = [frame(OP_BINARY, payload, mask=True) for _ in range(16)]
    deadline = time.monotonic() + seconds
    errors: list[str] = []

    async def one() -> int:
        client = await WsClient.open(target, origin_port)
        done = 0
        try:
            while time.monotonic() < deadline and done < limit // connections:
                await client.send(frames[done % 16])
                message = await client.next_message()
                if message.opcode != OP_BINARY or message.payload != payload:
                    errors.append(f"bad echo ({message.opcode}, {message.size} bytes)")
                    break
                done += 1
        finally:
            await client.close()
        return done

    results = await asyncio.gather(*(one() for _ in range(connections)), return_exceptions=True)
    total = 0
    for result in results:
        if isinstance(result, BaseException):
            errors.append(f"{type(result).__name__}: {result}")
        else:
            total += result
    return total, len(errors), "; ".join(errors[:3])


async def run_stream_up(
    target: Target, origin_port: int, size: int, seconds: float, limit: int
) -> tuple[int, int, str]:
    per_write = max(1, 16384 // (size + 14))
    batch = masked_batch(size, per_write)
    client = await WsClient.open(target, origin_port)
    try:
        await client.text_command("SINK")
        sent = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and sent + per_write <= limit:
            await client.send(batch)
            sent += per_write
        await client.text_command("COUNT")
        message = await client.next_message()
        counted = int((message.payload or b"COUNT -1").split()[1])
    finally:
        await client.close()
    if counted != sent:
        return counted, 1, f"origin counted {counted} of {sent} messages"
    return counted, 0, ""


async def run_stream_down(
    target: Target, origin_port: int, size: int, seconds: float, limit: int
) -> tuple[int, int, str]:
    client = await WsClient.open(target, origin_port)
    client.parser.keep_binary = False
    received = 0
    error = ""
    try:
        await client.text_command(f"DOWN {size} {seconds} {limit}")
        while True:
            message = await client.next_message()
            if message.opcode == OP_BINARY:
                if message.size != size:
                    error = f"message of {message.size} bytes, expected {size}"
                received += 1
            elif message.opcode == OP_TEXT:
                sent = int((message.payload or b"END -1").split()[1])
                if sent != received:
                    error = f"origin sent {sent} messages, {received} arrived"
                break
    finally:
        await client.close()
    return received, 1 if error else 0, error


# --- processes ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) from /proc/PID/stat, in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the name (field 2) may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_percent(seconds: float = 1.0) -> float:
    """How busy all CPUs together were over ``seconds`` (from /proc/stat), in percent."""

    def sample() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(values[:8]), values[3] + values[4]  # total, idle + iowait

    total_a, idle_a = sample()
    time.sleep(seconds)
    total_b, idle_b = sample()
    total = total_b - total_a
    return 100.0 * (total - (idle_b - idle_a)) / total if total > 0 else 0.0


def process_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for pid {pid}")


def stop_process(proc: subprocess.Popen[bytes], name: str) -> None:
    """Terminate one process by pid, then kill it if it has not exited after STOP_WAIT."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=STOP_WAIT)
    except subprocess.TimeoutExpired:
        print(f"# {name} (pid {proc.pid}) did not stop within {STOP_WAIT:.0f}s: killing it")
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_WAIT)


def tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no output)"
    return "\n".join(text.splitlines()[-lines:]) or "(no output)"


def wait_for_port(port: int, proc: subprocess.Popen[bytes], name: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_WAIT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{name} exited with status {proc.returncode}:\n{tail(log)}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"{name} did not accept on {LOOPBACK}:{port} within {STARTUP_WAIT:.0f}s")


@dataclass(frozen=True)
class Pinning:
    proxy_prefix: tuple[str, ...]
    load_cpu: int | None
    description: str


def choose_pinning(enabled: bool) -> Pinning:
    if not enabled:
        return Pinning((), None, "none (--no-pin)")
    taskset = shutil.which("taskset")
    cpus = sorted(os.sched_getaffinity(0))
    if taskset is None or len(cpus) < 2:
        return Pinning(
            (), None, f"none (taskset {'missing' if taskset is None else 'found'}, CPUs {cpus})"
        )
    return Pinning(
        (taskset, "-c", str(cpus[0])),
        cpus[1],
        f"proxyd on CPU {cpus[0]}; origin and clients (this process) on CPU {cpus[1]}",
    )


def start_proxyd(
    tmp: Path, name: str, inspect: bool, pinning: Pinning, stack: contextlib.ExitStack
) -> tuple[subprocess.Popen[bytes], int, int]:
    port, admin_port = free_port(), free_port()
    config = tmp / f"proxyd-{name}.yaml"
    config.write_text(
        "# Generated by bench/ws_bench.py\n"
        f'listen: ["{LOOPBACK}:{port}"]\n'
        f'admin: {{listen: "{LOOPBACK}:{admin_port}"}}\n'
        "access_log: {enabled: false}\n"
        "log_level: warning\n"
        'connect: {allowed_ports: ["1-65535"]}\n'
        "client: {max_connections: 8192}\n"
        "pool: {tunnels_per_host: 8192}\n"
        f"websocket: {{inspect_connect: {'true' if inspect else 'false'}}}\n"
    )
    log = tmp / f"proxyd-{name}.log"
    out: IO[bytes] = stack.enter_context(log.open("wb"))
    proc = subprocess.Popen(
        [*pinning.proxy_prefix, sys.executable, "-m", "proxyd", "--config", str(config)],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    stack.callback(stop_process, proc, f"proxyd ({name})")
    wait_for_port(port, proc, f"proxyd ({name})", log)
    wait_for_port(admin_port, proc, f"proxyd ({name}) admin", log)
    return proc, port, admin_port


METRIC_LINE: Final = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{[^}]*\})? (?P<value>\S+)$")


def metric_sums(admin_port: int) -> dict[str, float]:
    conn = http.client.HTTPConnection(LOOPBACK, admin_port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    sums: dict[str, float] = {}
    for line in text.splitlines():
        match = METRIC_LINE.match(line)
        if match is not None:
            name = match["name"]
            sums[name] = sums.get(name, 0.0) + float(match["value"])
    return sums


# --- measuring ------------------------------------------------------------------------------------


SCENARIO_FILTER: list[str] = []  # --only: substrings; a scenario runs when it contains any


def scenarios() -> list[tuple[str, str, int]]:
    every = [(f"{kind} {label}", kind, size) for label, size in SIZES.items() for kind in KINDS]
    if not SCENARIO_FILTER:
        return every
    return [s for s in every if any(part in s[0] for part in SCENARIO_FILTER)]


async def measure(
    target: Target,
    origin: Origin,
    scenario: str,
    kind: str,
    size: int,
    args: argparse.Namespace,
    rnd: int,
) -> RunResult:
    limit = args.max_messages
    cpu_before = process_cpu_seconds(target.proxy.pid) if target.proxy else None
    started = time.monotonic()
    coro = (
        run_echo(target, origin.port, size, args.connections, args.duration, limit)
        if kind == "echo"
        else run_stream_up(target, origin.port, size, args.duration, limit)
        if kind == "stream up"
        else run_stream_down(target, origin.port, size, args.duration, limit)
    )
    try:
        async with asyncio.timeout(args.duration + RUN_GRACE):
            messages, errors, error_text = await coro
    except (BenchError, OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        messages, errors, error_text = 0, 1, f"{type(exc).__name__}: {exc}"
    seconds = time.monotonic() - started
    relayed = messages * 2 if kind == "echo" else messages
    result = RunResult(
        scenario,
        target.name,
        rnd,
        messages,
        relayed,
        seconds,
        messages / seconds if seconds > 0 else 0.0,
        errors,
        error_text,
    )
    if target.proxy is not None and cpu_before is not None:
        result.proxyd_cpu_s = process_cpu_seconds(target.proxy.pid) - cpu_before
        if relayed:
            result.proxyd_cpu_us_per_message = result.proxyd_cpu_s * 1e6 / relayed
    return result


@dataclass
class MemoryResult:
    target: str
    round: int
    sessions: int
    opened: int
    rss_before: int
    rss_after: int
    bytes_per_session: float | None
    closed_cleanly: int
    #: proxyd_websocket_sessions_active while the sessions were open (None: no relay metric)
    websocket_sessions_active: float | None
    errors: list[str] = field(default_factory=list)


async def open_sessions(
    target: Target, origin: Origin, count: int, errors: list[str]
) -> list[WsClient]:
    gate = asyncio.Semaphore(100)  # opening a thousand at once only overflows accept queues

    async def open_one() -> WsClient | None:
        async with gate:
            try:
                async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                    return await WsClient.open(target, origin.port)
            except (BenchError, OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                return None

    return [c for c in await asyncio.gather(*(open_one() for _ in range(count))) if c]


async def close_sessions(clients: Sequence[WsClient]) -> int:
    gate = asyncio.Semaphore(100)

    async def close_one(client: WsClient) -> bool:
        async with gate:
            return await client.close()

    return sum(await asyncio.gather(*(close_one(c) for c in clients)))


async def measure_memory(
    name: str,
    inspect: bool,
    origin: Origin,
    args: argparse.Namespace,
    rnd: int,
    tmp: Path,
    pinning: Pinning,
) -> MemoryResult:
    """Idle sessions through a fresh proxyd (RSS never shrinks, so a used one would hide growth)."""
    with contextlib.ExitStack() as stack:
        proc, port, admin = start_proxyd(tmp, f"memory-{name}-{rnd}", inspect, pinning, stack)
        target = Target(name, port, proxy=proc)
        errors: list[str] = []
        # Warm-up: the first sessions load code paths and grow allocator pools once.
        await close_sessions(await open_sessions(target, origin, 20, errors))
        await asyncio.sleep(0.5)
        rss_before = process_rss_bytes(proc.pid)
        clients = await open_sessions(target, origin, args.sessions, errors)
        await asyncio.sleep(1.0)  # idle: nothing moves
        rss_after = process_rss_bytes(proc.pid)
        # Relayed or tunnelled? The relay's gauge counts the sessions open right now.
        active = metric_sums(admin).get("proxyd_websocket_sessions_active")
        closed = await close_sessions(clients)
    per = (rss_after - rss_before) / len(clients) if clients else None
    return MemoryResult(
        name, rnd, args.sessions, len(clients), rss_before, rss_after, per, closed, active, errors
    )


# --- reporting ------------------------------------------------------------------------------------


def median_or_none(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def ratio(value: float | None, base: float | None) -> str:
    return "-" if value is None or not base else f"{value / base:.3f}"


def kib(value: float | None) -> str:
    return "-" if value is None else f"{value / 1024:,.1f}"


def print_tables(
    results: Sequence[RunResult], memory: Sequence[MemoryResult], targets: Sequence[str]
) -> None:
    proxied = [t for t in targets if t != "direct"]
    print()
    print(
        "Messages per second (echo: round trips/s, each two messages relayed; stream: "
        "messages delivered/s), median over rounds:"
    )
    print()
    header = " | ".join(f"{t} msg/s" for t in targets)
    ratios = " | ".join(f"{t}/tunnel" for t in proxied if t != "tunnel")
    cpu = " | ".join(f"{t} CPU µs/msg" for t in proxied)
    print(f"| scenario | {header} | {ratios} | {cpu} | errors |")
    print("|---|" + "---:|" * (len(targets) + len(proxied) - 1 + len(proxied)) + "---|")
    for scenario, _, _ in scenarios():
        runs = [r for r in results if r.scenario == scenario]
        rate = {t: median_or_none([r.rate for r in runs if r.target == t]) for t in targets}
        cpu_us = {
            t: median_or_none([r.proxyd_cpu_us_per_message for r in runs if r.target == t])
            for t in proxied
        }
        base = rate.get("tunnel")
        ratio_cells = [ratio(rate[t], base) for t in proxied if t != "tunnel"]
        errors = [f"{r.target}: {r.error_text or r.errors}" for r in runs if r.errors]
        cells = [fmt(rate[t]) for t in targets] + ratio_cells + [fmt(cpu_us[t], 1) for t in proxied]
        print(f"| {scenario} | " + " | ".join(cells) + f" | {'; '.join(errors) or 'none'} |")
    if memory:
        print()
        print(
            "Memory per idle session (proxyd VmRSS after opening the sessions minus before, "
            "divided by the sessions open):"
        )
        print()
        print(
            "| target | sessions open | proxyd RSS before MiB | after MiB "
            "| KiB per session (median) | per round | closed cleanly | relayed sessions open "
            "| errors |"
        )
        print("|---|---:|---:|---:|---:|---|---:|---:|---|")
        for t in proxied:
            rows = [m for m in memory if m.target == t]
            if not rows:
                continue
            per = median_or_none([m.bytes_per_session for m in rows])
            per_round = ", ".join(kib(m.bytes_per_session) for m in rows)
            errors = sorted({e for m in rows for e in m.errors})
            print(
                f"| {t} | {rows[-1].opened}/{rows[-1].sessions} "
                f"| {rows[-1].rss_before / 2**20:.1f} | {rows[-1].rss_after / 2**20:.1f} "
                f"| {kib(per)} | {per_round} "
                f"| {rows[-1].closed_cleanly} | {fmt(rows[-1].websocket_sessions_active)} "
                f"| {'; '.join(errors[:3]) or 'none'} |"
            )


# --- main -----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="WebSocket messages/s and memory per session through proxyd (session vs "
        "CONNECT byte tunnel); prints markdown tables."
    )
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per run (default 2)")
    parser.add_argument("--connections", type=int, default=8, help="echo connections (default 8)")
    parser.add_argument("--sessions", type=int, default=1000, help="idle sessions (default 1000)")
    parser.add_argument(
        "--max-messages", type=int, default=2_000_000, help="cap per run (default 2,000,000)"
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="TEXT",
        help='run only scenarios whose name contains TEXT (repeatable), e.g. --only "echo 64 B"',
    )
    parser.add_argument("--json", metavar="FILE", help="also write every run here")
    parser.add_argument("--no-pin", action="store_true", help="do not pin CPUs")
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= 20:
        parser.error("--rounds must be from 1 to 20")
    if not 0.2 <= args.duration <= 60:
        parser.error("--duration must be from 0.2 to 60 seconds")
    if not 1 <= args.connections <= 256:
        parser.error("--connections must be from 1 to 256")
    if not 0 <= args.sessions <= 10000:
        parser.error("--sessions must be from 0 (skip) to 10000")
    SCENARIO_FILTER[:] = args.only
    if not scenarios():
        parser.error(f"--only {args.only} matches no scenario")
    return args


def raise_fd_limit(needed: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft < needed:
        raise BenchError(f"need {needed} file descriptors, the hard limit allows {soft}")
    return soft


async def probe(target: Target, origin: Origin) -> str | None:
    """None when a session opens, echoes and closes through ``target``; else why not."""
    try:
        async with asyncio.timeout(HANDSHAKE_TIMEOUT):
            client = await WsClient.open(target, origin.port)
            await client.send(frame(OP_BINARY, b"probe", mask=True))
            message = await client.next_message()
            await client.close()
    except (BenchError, OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if message.payload == b"probe" else "wrong echo"


async def run_async(args: argparse.Namespace, stack: contextlib.ExitStack, tmp: Path) -> int:
    pinning = choose_pinning(not args.no_pin)
    if pinning.load_cpu is not None:
        os.sched_setaffinity(0, {pinning.load_cpu})
    fd_limit = raise_fd_limit(4 * args.sessions + 512)
    busy = machine_busy_percent()  # before anything of ours runs
    origin = Origin()
    await origin.start()
    tunnel_proc, tunnel_port, tunnel_admin = start_proxyd(tmp, "tunnel", False, pinning, stack)
    session_proc, session_port, session_admin = start_proxyd(tmp, "session", True, pinning, stack)
    env = {
        "machine": f"{os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "pinning": pinning.description,
        "fd limit": str(fd_limit),
        "machine busy before start": f"{busy:.0f}% (loadavg {os.getloadavg()[0]:.2f})",
        "plan": f"{args.rounds} round(s) x {len(scenarios())} scenarios x targets x "
        f"{args.duration}s; echo on {args.connections} connections; {args.sessions} idle sessions",
    }
    for key, value in env.items():
        print(f"# {key}: {value}")
    if busy > 10:
        print("# WARNING: something else is using the CPUs; the numbers will be noisy")
    print(
        f"# origin {LOOPBACK}:{origin.port}; proxyd tunnel pid {tunnel_proc.pid} port "
        f"{tunnel_port}; proxyd session pid {session_proc.pid} port {session_port}"
    )
    targets = [
        Target("direct", None),
        Target("tunnel", tunnel_port, proxy=tunnel_proc, admin_port=tunnel_admin),
        Target("session", session_port, proxy=session_proc, admin_port=session_admin),
    ]
    absolute = Target(
        "absolute", session_port, absolute_form=True, proxy=session_proc, admin_port=session_admin
    )
    for target in targets:
        problem = await probe(target, origin)
        if problem is not None:
            raise BenchError(f"a WebSocket through {target.name} does not work: {problem}")
    problem = await probe(absolute, origin)
    if problem is None:
        targets.append(absolute)
    else:
        print(f"# absolute-form upgrade through proxyd: not measured ({problem})")
    names = [t.name for t in targets]

    # Warm-up, then the idle-session memory, then throughput (interleaved by target).
    for target in targets:
        for _, kind, size in scenarios():
            await measure(
                target,
                origin,
                "warm-up",
                kind,
                size,
                argparse.Namespace(**{**vars(args), "duration": 0.2}),
                0,
            )
    results: list[RunResult] = []
    memory: list[MemoryResult] = []
    for rnd in range(1, args.rounds + 1):
        if args.sessions:
            for name, inspect in (("tunnel", False), ("session", True)):
                mem = await measure_memory(name, inspect, origin, args, rnd, tmp, pinning)
                memory.append(mem)
                print(
                    f"# round {rnd} memory {name:<8} {mem.opened} sessions "
                    f"{kib(mem.bytes_per_session)} KiB each"
                    + (f" ERRORS {mem.errors[:2]}" if mem.errors else ""),
                    flush=True,
                )
        for scenario, kind, size in scenarios():
            for target in targets:
                result = await measure(target, origin, scenario, kind, size, args, rnd)
                results.append(result)
                cpu = (
                    f" cpu={result.proxyd_cpu_us_per_message:.1f}µs/msg"
                    if result.proxyd_cpu_us_per_message is not None
                    else ""
                )
                print(
                    f"# round {rnd} {scenario:<18} {target.name:<8} {result.rate:>10,.0f} "
                    f"msg/s{cpu}" + (f" ERRORS {result.error_text}" if result.errors else ""),
                    flush=True,
                )
    counted = {
        "tunnel": metric_sums(tunnel_admin).get("proxyd_websocket_sessions_total"),
        "session": metric_sums(session_admin).get("proxyd_websocket_sessions_total"),
    }
    print_tables(results, memory, names)
    print()
    for name, count in counted.items():
        print(
            f"# proxyd ({name}) proxyd_websocket_sessions_total = "
            f"{'absent' if count is None else f'{count:.0f}'}"
        )
    if not counted["session"]:
        print(
            "# NOTE: the session proxyd counted no WebSocket session: its column measured the "
            "CONNECT byte tunnel, not the relay (inspect_connect has no effect yet)"
        )
    if counted["tunnel"]:
        print("# WARNING: the tunnel proxyd (inspect_connect: false) counted WebSocket sessions")
    if args.json:
        write_json(args.json, env, counted, results, memory)
    failed = any(r.errors for r in results) or any(m.errors for m in memory)
    return 2 if failed else 0


def write_json(
    path: str,
    env: dict[str, str],
    counted: dict[str, float | None],
    results: Sequence[RunResult],
    memory: Sequence[MemoryResult],
) -> None:
    document = {
        "environment": env,
        "websocket_sessions_counted": counted,
        "runs": [asdict(r) for r in results],
        "memory": [asdict(m) for m in memory],
    }
    Path(path).write_text(json.dumps(document, indent=2) + "\n")
    print(f"# wrote {path}")


def run(args: argparse.Namespace) -> int:
    if sys.platform != "linux":
        raise BenchError("this benchmark needs Linux (/proc)")
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="proxyd-ws-bench-")))
        status = asyncio.run(run_async(args, stack, tmp))
        for log in sorted(tmp.glob("proxyd-*.log")):
            if log.stat().st_size:
                print(f"# {log.stem} output (tail):\n{tail(log)}")
        return status


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return hb.run_main("ws_bench", lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())

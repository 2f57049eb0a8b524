"""Memory of proxyd: per idle client connection, per idle WebSocket session, over a soak, and
whether CPU and memory grow with the number of origins, cache keys, connections and sessions.

Run it from the repository root with the project's virtualenv active::

    python bench/memory_bench.py                    # everything, 10-minute soak (~16 minutes)
    python bench/memory_bench.py --quick            # everything, 60 s soak, 1 round (~5 minutes)
    python bench/memory_bench.py --only idle,ws     # the two per-connection footprints (~1 min)
    python bench/memory_bench.py --only scaling --dimensions groups,keys
    python bench/memory_bench.py --only idle --proxyd-root /tmp/proxyd-old   # another tree
    python bench/memory_bench.py --only scaling,soak --json /tmp/mb.json   # for compare.py

How it works:

* **Processes.** An nginx origin (its own config in a temp dir: ``/1k``, and ``/cached/1k``
  with ``Cache-Control: max-age=3600``; 20,000 connections allowed), and for every measurement a
  *fresh* ``python -m proxyd`` started from ``--proxyd-root`` (this tree by default) with the
  access log off. A used process keeps the memory it freed (the allocators rarely give it back),
  so a fresh one per measurement is the only way to see what one more connection costs. With
  ``taskset`` and two CPUs, proxyd runs on the first CPU; nginx, wrk and this process (clients
  and the WebSocket origin, asyncio) on the second. ``RLIMIT_NOFILE`` is raised to the hard limit
  (the children inherit it) and proxyd's ``client.max_connections`` and
  ``pool.tunnels_per_host`` to 30,000.
* **RSS** is ``VmRSS`` from ``/proc/PID/status``; **CPU** is ``utime + stime`` from
  ``/proc/PID/stat``, before and after a run, divided by the requests it served.
* **Idle client connections** (``idle``): 50 warm-up clients make a request and leave (the first
  connections load code and grow allocator pools once), then VmRSS; then ``--clients`` (5,000)
  keep-alive clients connect, each sends one ``GET http://127.0.0.1:PORT/1k`` through proxyd,
  reads the whole response and stays connected, idle; a second later VmRSS again, and
  ``proxyd_client_connections_active`` is checked. (after - before) / clients is the cost of one
  idle keep-alive connection. The same is done on another fresh proxyd with clients that
  connect and send nothing (a connection waiting for its first request).
* **Idle WebSocket sessions** (``ws``): the same with ``--sessions`` (1,000) WebSocket sessions
  through ``websocket.inspect_connect: true`` (CONNECT, then the plaintext upgrade relayed frame
  by frame, how browsers send ws://) to the asyncio origin of ``bench/ws_bench.py`` (whose
  client and origin this script imports), after 20 warm-up sessions;
  ``proxyd_websocket_sessions_active`` confirms they are relayed sessions. A session's cost
  includes its client connection and its upstream connection.
* **Soak** (``soak``): one proxyd with the cache on (``max_size`` 2 MiB and ``memory_size``
  1 MiB: it evicts all the time, and its memory is at its bounds within the warm-up) and 1,000
  origin names (``dns.hosts``), under ``wrk -c 50`` for ``--soak-seconds`` (600; 60 with
  ``--quick``). Every request goes to one of the 1,000 origins in turn (more groups than
  ``pool.total`` allows sockets, so groups and sockets come and go; no origin gets enough
  traffic to queue behind its ``pool.per_group`` sockets). Of ten requests, six relay ``/1k``
  (stored by heuristic freshness and revalidated), two store a new cache key each
  (``/cached/1k?k=N``: misses, stores, evictions), one is a hit on one of 500 hot keys, and one
  carries ``Connection: close`` (a new client connection per 10 requests). Meanwhile this process
  opens, echoes through and closes WebSocket sessions, and opens and drops batches of 200 idle
  clients. VmRSS is sampled every ``--sample-seconds``. The first ``--soak-warmup`` seconds
  (default: a sixth of the soak, at least 10 s) let the cache fill to its bound, pools and
  allocator arenas reach their working size; the growth is the median of the last three samples
  against the median of the first three after it, in percent (the target: within 5 %), with the
  least-squares slope over the same samples; the sample taken after the load ended is shown
  apart. CPU per request there includes the churn's.
* **Scaling** (``scaling``): the same load (``wrk -c 50``, 1 KiB through proxyd, keep-alive)
  with ``--scale-small`` (10) and ``--scale-large`` (10,000) of one thing, on two fresh proxyds
  measured in interleaved rounds (small, large, small, large...), medians:

  - ``groups``: distinct origins, each a pool group with an idle upstream socket. The names
    ``oN.bench.test`` resolve to 127.0.0.1 through ``dns.hosts`` overrides; ``pool.total`` is
    raised so each origin keeps its socket; wrk requests the origins round-robin. After the
    runs the idle timeouts are shortened by a config reload and the groups must all go
    (``proxyd_pool_groups`` back to 0): a group is dropped with its last socket.
  - ``keys``: distinct cache keys (``/cached/1k?k=N``, stored first, then only hits).
  - ``clients``: idle keep-alive client connections held open beside the load.
  - ``sessions``: idle WebSocket sessions held open beside the load (capped by the
    file-descriptor limit: this process holds both ends of each).

  The table shows req/s, proxyd CPU µs per request, their large/small ratios, and the RSS the
  population added (per item).

``--json FILE`` writes everything measured with what a report needs to say how, without this
file's source: the environment (machine, Python, proxyd version and source tree, nginx, wrk,
pinning, descriptor limit, how busy the machine was, the exact command, when it started and
finished, the wall time), the parsed arguments, every footprint, every scaling run (with each
population's counts asked and held and its RSS before, after populating and after the runs) and
the soak (every RSS sample, the sampling interval, the warm-up, how many samples the growth and
slope use, the load in words, the churn counts and every error). ``bench/compare.py
--memory-json FILE`` renders the soak and scaling parts into bench/RESULTS.md, with the two
targets of issue 7 they decide.

Errors are never hidden: wrk's socket errors and bad statuses, proxyd's non-2xx answers, failed
handshakes and clients that could not open are counted; the exit status is 2 when there were
any (1 when the benchmark could not run). Everything started here is stopped by pid.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import errno
import json
import os
import platform
import re
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from bench import http_bench as hb
from bench import ws_bench as wb
from bench.http_bench import BenchError

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
LOOPBACK: Final = "127.0.0.1"
FILE_SIZE: Final = 1024
WARMUP_CLIENTS: Final = 50
WARMUP_SESSIONS: Final = 20
OPEN_CONCURRENCY: Final = 200  # connections opened at once (more only overflows accept queues)
IO_TIMEOUT: Final = 15.0
STARTUP_WAIT: Final = 30.0
SETTLE_SECONDS: Final = 1.0
SOAK_ORIGINS: Final = 1000
SOAK_HOT_KEYS: Final = 500
SCALE_CONNECTIONS: Final = 50  # wrk -c
NOFILE_SLACK: Final = 1000  # descriptors left for everything but the measured connections
DIMENSIONS: Final = ("groups", "keys", "clients", "sessions")
PARTS: Final = ("idle", "ws", "soak", "scaling")
ORIGIN_NAME: Final = "o{}.bench.test"

NGINX_CONF: Final = """\
# Generated by bench/memory_bench.py: a throwaway static origin.
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{
    worker_connections {connections};
}}
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nodelay on;
    keepalive_requests 1000000000;
    keepalive_timeout 3600s;
{temp_paths}
    server {{
        listen {host}:{port} backlog=4096;
        server_name _;
        root {tmp}/www;
        location /cached/ {{ add_header Cache-Control "max-age=3600"; }}
        location / {{ }}
    }}
}}
"""

#: The soak's load in words (written into the JSON, so a report can say what ran).
SOAK_LOAD: Final = (
    f"wrk -t 1 -c {SCALE_CONNECTIONS} to {SOAK_ORIGINS:,} origin names; of 10 requests 6 relay"
    f" /1k, 2 store a new cache key, 1 hits one of {SOAK_HOT_KEYS} hot keys, 1 carries"
    " Connection: close; meanwhile 2 loops open, echo through and close WebSocket sessions and"
    " one opens and drops batches of 200 idle clients; cache on, 2 MiB (1 MiB in memory)"
)
#: The scaling runs' load in words (idem).
SCALE_LOAD: Final = (
    f"wrk -t 1 -c {SCALE_CONNECTIONS}, 1 KiB through proxyd over keep-alive connections; the"
    " small and the large population each on its own fresh proxyd, interleaved rounds, medians"
)

LUA_ROUND_ROBIN: Final = """\
-- Generated by bench/memory_bench.py: {count} distinct {what}, round-robin.
local count = {count}
local i = 0
request = function()
  i = i % count + 1
  local host = {host}
  return wrk.format("GET", "http://" .. host .. {path}, {{["Host"] = host}})
end
"""

LUA_SOAK: Final = """\
-- Generated by bench/memory_bench.py: the soak's request mix (see the module docstring).
local n = 0
request = function()
  n = n + 1
  local kind = n % 10
  local host = "o" .. (n % {origins}) .. ".bench.test:{port}"
  local path = "/1k"
  local headers = {{}}
  if kind == 6 or kind == 7 then
    path = "/cached/1k?k=" .. n
  elseif kind == 8 then
    local hot = math.floor(n / 10) % {hot}
    host = "o" .. hot .. ".bench.test:{port}"
    path = "/cached/1k?k=hot" .. hot
  elseif kind == 9 then
    headers["Connection"] = "close"
  end
  headers["Host"] = host
  return wrk.format("GET", "http://" .. host .. path, headers)
end
"""


# --- processes ------------------------------------------------------------------------------------


@dataclass
class Context:
    args: argparse.Namespace
    tmp: Path
    stack: contextlib.ExitStack
    pinning: hb.Pinning
    wrk: str
    origin_port: int
    nofile: int
    ws_origin: wb.Origin
    started: int = 0

    @property
    def origin(self) -> str:
        return f"{LOOPBACK}:{self.origin_port}"


@dataclass
class Proxyd:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    admin_port: int
    config_path: Path
    config: dict[str, Any]
    log: Path

    def rss(self) -> int:
        self.check_alive()
        return wb.process_rss_bytes(self.proc.pid)

    def cpu(self) -> float:
        return hb.process_cpu_seconds(self.proc.pid)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(
                f"proxyd ({self.name}) exited with status {self.proc.returncode}:\n"
                + hb.tail(self.log)
            )

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics, keyed ``name`` or ``name{labels}``; also the sum of each
        family's samples under its bare name."""
        return scrape(self.admin_port)

    def reload(self, changes: dict[str, Any]) -> None:
        """Rewrite the config file with ``changes`` merged in and POST /reload."""
        merge(self.config, changes)
        self.config_path.write_text(json.dumps(self.config, indent=1) + "\n")
        status, body = admin_request(self.admin_port, "POST", "/reload")
        if status != 200:
            raise BenchError(f"proxyd ({self.name}) refused the reload: {status} {body!r}")


METRIC_LINE: Final = re.compile(
    r"^(?P<name>[a-zA-Z_:][\w:]*)(?P<labels>\{[^}]*\})? (?P<value>\S+)$"
)


def admin_request(port: int, method: str, path: str) -> tuple[int, bytes]:
    import http.client

    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=10)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def scrape(admin_port: int) -> dict[str, float]:
    status, body = admin_request(admin_port, "GET", "/metrics")
    if status != 200:
        raise BenchError(f"proxyd /metrics answered {status}")
    values: dict[str, float] = {}
    for line in body.decode().splitlines():
        match = METRIC_LINE.match(line)
        if match is None:
            continue
        name, value = match["name"], float(match["value"])
        values[name + (match["labels"] or "")] = value
        if match["labels"]:
            values[name] = values.get(name, 0.0) + value
    return values


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def start_nginx(ctx: Context) -> None:
    nginx = hb.find_or_install("nginx", "nginx-light", "/usr/sbin/nginx")
    tmp = ctx.tmp
    www = tmp / "www"
    (www / "cached").mkdir(parents=True)
    body = bytes(i % 251 for i in range(FILE_SIZE))
    (www / "1k").write_bytes(body)
    (www / "cached" / "1k").write_bytes(body)
    conf = tmp / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            tmp=tmp,
            host=LOOPBACK,
            port=ctx.origin_port,
            nofile=ctx.nofile,
            connections=max(1024, ctx.nofile - 100),
            temp_paths=hb.nginx_temp_paths(nginx, tmp),
        )
    )
    log = tmp / "nginx-stderr.log"
    out = ctx.stack.enter_context(log.open("wb"))
    proc = subprocess.Popen(
        [
            *ctx.pinning.load_prefix,
            nginx,
            "-p",
            str(tmp),
            "-e",
            str(tmp / "nginx-error.log"),
            "-c",
            str(conf),
        ],
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    ctx.stack.callback(hb.stop_process, proc, "nginx")
    hb.wait_for_port(ctx.origin_port, proc, "nginx", tmp / "nginx-error.log")


def start_proxyd(
    ctx: Context, name: str, changes: dict[str, Any] | None = None
) -> tuple[Proxyd, contextlib.ExitStack]:
    """A fresh proxyd; stop it by closing the returned stack (the run's stack stops it too)."""
    ctx.started += 1
    port, admin_port = hb.free_port(), hb.free_port()
    config: dict[str, Any] = {
        "listen": [f"{LOOPBACK}:{port}"],
        "admin": {"listen": f"{LOOPBACK}:{admin_port}"},
        "access_log": {"enabled": False},
        "log_level": "warning",
        "connect": {"allowed_ports": ["1-65535"]},
        "client": {"max_connections": 30000},
        "pool": {"tunnels_per_host": 30000},
    }
    merge(config, changes or {})
    slug = f"{ctx.started:02d}-{name.replace(' ', '-')}"
    path = ctx.tmp / f"proxyd-{slug}.yaml"
    path.write_text(json.dumps(config, indent=1) + "\n")  # JSON is YAML
    log = ctx.tmp / f"proxyd-{slug}.log"
    own = contextlib.ExitStack()
    out: IO[bytes] = own.enter_context(log.open("wb"))
    root = Path(ctx.args.proxyd_root).resolve()
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen(
        [*ctx.pinning.proxy_prefix, sys.executable, "-m", "proxyd", "--config", str(path)],
        cwd=root,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    own.callback(hb.stop_process, proc, f"proxyd ({name})")
    ctx.stack.callback(hb.stop_process, proc, f"proxyd ({name})")
    wait_listening(port, proc, f"proxyd ({name})", log)
    wait_listening(admin_port, proc, f"proxyd ({name}) admin", log)
    return Proxyd(name, proc, port, admin_port, path, config, log), own


def wait_listening(port: int, proc: subprocess.Popen[bytes], name: str, log: Path) -> None:
    """``http_bench.wait_for_port`` with a longer bound (a config with 10,000 host overrides
    takes a while to validate on a busy machine) and a clear word when this process is out
    of descriptors rather than the daemon slow."""
    deadline = time.monotonic() + STARTUP_WAIT
    problem = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{name} exited with status {proc.returncode}:\n{hb.tail(log)}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise BenchError(f"out of file descriptors while waiting for {name}") from None
            problem = str(exc)
            time.sleep(0.05)
    raise BenchError(
        f"{name} did not accept on {LOOPBACK}:{port} within {STARTUP_WAIT:.0f}s ({problem})"
    )


# --- HTTP clients (asyncio) -----------------------------------------------------------------------


class HttpClient:
    """One keep-alive client connection to proxyd; requests in absolute form."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> HttpClient:
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        return cls(reader, writer)

    async def get(self, authority: str, path: str) -> int:
        """One GET through the proxy; the status (the body is read and checked)."""
        self.writer.write(
            f"GET http://{authority}{path} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = await self.reader.readexactly(length)
        if status == 200 and len(body) != FILE_SIZE:
            raise BenchError(f"GET {authority}{path}: {len(body)} body bytes, not {FILE_SIZE}")
        return status

    def close(self) -> None:
        self.writer.close()


async def gather_bounded(
    count: int, make: Callable[[int], Awaitable[Any]], errors: list[str], limit: int
) -> list[Any]:
    """``make(i)`` for i in range(count), ``limit`` at a time; failures go to ``errors``."""
    gate = asyncio.Semaphore(limit)

    async def one(index: int) -> Any:
        async with gate:
            try:
                async with asyncio.timeout(IO_TIMEOUT):
                    return await make(index)
            except (BenchError, OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                return None

    return [r for r in await asyncio.gather(*(one(i) for i in range(count))) if r is not None]


async def open_idle_clients(
    port: int, count: int, origin: str, errors: list[str], *, request: bool = True
) -> list[HttpClient]:
    async def make(_: int) -> HttpClient:
        client = await HttpClient.open(port)
        if request:
            try:
                status = await client.get(origin, "/1k")
            except BaseException:
                client.close()
                raise
            if status != 200:
                client.close()
                raise BenchError(f"status {status}")
        return client

    return await gather_bounded(count, make, errors, OPEN_CONCURRENCY)


def close_all(clients: Sequence[HttpClient]) -> None:
    for client in clients:
        client.close()


async def wait_for_metric(
    proxyd: Proxyd, name: str, predicate: Callable[[float], bool], timeout: float = 20.0
) -> float:
    """Poll /metrics until ``predicate(value)`` holds (bounded); the last value."""
    deadline = time.monotonic() + timeout
    value = 0.0
    while True:
        value = proxyd.metrics().get(name, 0.0)
        if predicate(value) or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.1)


# --- idle client connections and idle WebSocket sessions -----------------------------------------


@dataclass
class FootprintResult:
    what: str
    round: int
    wanted: int
    opened: int
    rss_before: int
    rss_after: int
    bytes_each: float | None
    active: float  # proxyd's own gauge while they were open
    errors: list[str] = field(default_factory=list)


async def measure_idle_clients(ctx: Context, rnd: int, *, request: bool) -> FootprintResult:
    what = "idle keep-alive client" if request else "connected, no request yet"
    count = ctx.args.clients
    proxyd, own = start_proxyd(ctx, f"idle-{'request' if request else 'connect'}-{rnd}")
    with own:
        errors: list[str] = []
        close_all(await open_idle_clients(proxyd.port, WARMUP_CLIENTS, ctx.origin, errors))
        await wait_for_metric(proxyd, "proxyd_client_connections_active", lambda v: v == 0)
        await asyncio.sleep(0.5)
        before = proxyd.rss()
        clients = await open_idle_clients(proxyd.port, count, ctx.origin, errors, request=request)
        active = await wait_for_metric(
            proxyd, "proxyd_client_connections_active", lambda v: v >= len(clients)
        )
        await asyncio.sleep(SETTLE_SECONDS)
        after = proxyd.rss()
        close_all(clients)
    if active < len(clients):
        errors.append(f"proxyd counted {active:.0f} connections of {len(clients)}")
    each = (after - before) / len(clients) if clients else None
    return FootprintResult(what, rnd, count, len(clients), before, after, each, active, errors)


async def measure_idle_sessions(ctx: Context, rnd: int) -> FootprintResult:
    count = ctx.args.sessions
    proxyd, own = start_proxyd(ctx, f"ws-{rnd}", {"websocket": {"inspect_connect": True}})
    target = wb.Target("session", proxyd.port, proxy=proxyd.proc)
    with own:
        errors: list[str] = []
        origin = ctx.ws_origin
        await wb.close_sessions(await wb.open_sessions(target, origin, WARMUP_SESSIONS, errors))
        await wait_for_metric(proxyd, "proxyd_websocket_sessions_active", lambda v: v == 0)
        await asyncio.sleep(0.5)
        before = proxyd.rss()
        clients = await wb.open_sessions(target, origin, count, errors)
        active = await wait_for_metric(
            proxyd, "proxyd_websocket_sessions_active", lambda v: v >= len(clients)
        )
        await asyncio.sleep(SETTLE_SECONDS)
        after = proxyd.rss()
        closed = await wb.close_sessions(clients)
    if active < len(clients):
        errors.append(f"proxyd counted {active:.0f} relayed sessions of {len(clients)}")
    if closed < len(clients):
        errors.append(f"{len(clients) - closed} sessions did not close cleanly")
    each = (after - before) / len(clients) if clients else None
    return FootprintResult(
        "idle WebSocket session", rnd, count, len(clients), before, after, each, active, errors
    )


# --- wrk ------------------------------------------------------------------------------------------


@dataclass
class LoadResult:
    requests: int
    seconds: float
    rps: float
    cpu_us_per_request: float | None
    errors: dict[str, int]


def write_lua(ctx: Context, name: str, text: str) -> Path:
    path = ctx.tmp / f"wrk-{name}.lua"
    path.write_text(text + hb.LUA_DONE)
    return path


async def run_wrk(
    ctx: Context, proxyd: Proxyd, lua: Path, seconds: float, connections: int = SCALE_CONNECTIONS
) -> LoadResult:
    """wrk against proxyd (asynchronously: this process keeps serving its own clients)."""
    cmd = [
        *ctx.pinning.load_prefix,
        ctx.wrk,
        "-t",
        "1",
        "-c",
        str(connections),
        "-d",
        f"{seconds:g}s",
        "--latency",
        "-s",
        str(lua),
        f"http://{LOOPBACK}:{proxyd.port}/",
    ]
    before_metrics = proxyd.metrics()
    cpu_before = proxyd.cpu()
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(seconds + 60):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise BenchError(f"wrk did not finish: {' '.join(cmd)}") from None
    cpu = proxyd.cpu() - cpu_before
    proxyd.check_alive()
    after_metrics = proxyd.metrics()
    match = hb.BENCH_LINE.search(out.decode())
    if proc.returncode != 0 or match is None:
        raise BenchError(f"wrk failed ({proc.returncode}): {out.decode()}{err.decode()}")
    values = {k: float(v) for k, _, v in (i.partition("=") for i in match.group(1).split())}
    requests = int(values["requests"])
    elapsed = values["duration_us"] / 1e6
    errors = {kind: int(values[kind]) for kind in hb.WRK_ERROR_KINDS if values[kind]}

    def delta(name: str) -> float:
        return after_metrics.get(name, 0.0) - before_metrics.get(name, 0.0)

    # Answers that were not 2xx (a WebSocket session's 101 is not an error: the soak runs them).
    failed = sum(
        delta(k)
        for k in after_metrics
        if k.startswith("proxyd_requests_total{")
        and 'status_class="2xx"' not in k
        and 'status_class="1xx"' not in k
    )
    if failed:
        errors["proxyd_non2xx"] = int(failed)
    if delta("proxyd_errors_total"):
        errors["proxyd_errors"] = int(delta("proxyd_errors_total"))
    return LoadResult(
        requests=requests,
        seconds=elapsed,
        rps=requests / elapsed if elapsed > 0 else 0.0,
        cpu_us_per_request=cpu * 1e6 / requests if requests else None,
        errors=errors,
    )


# --- soak -----------------------------------------------------------------------------------------


@dataclass
class SoakResult:
    seconds: float
    warmup: float
    samples: list[tuple[float, int]]  # (seconds since the load started, VmRSS)
    start_rss: int
    end_rss: int
    max_rss: int
    after_load_rss: int
    growth_percent: float
    slope_kib_per_minute: float
    load: LoadResult | None
    websocket_sessions: int
    client_batches: int
    sample_seconds: float
    samples_used: int  # samples at or after the warm-up: the growth and slope are over these
    load_description: str
    errors: list[str] = field(default_factory=list)


def soak_config(ctx: Context) -> dict[str, Any]:
    hosts = {ORIGIN_NAME.format(i): LOOPBACK for i in range(SOAK_ORIGINS)}
    return {
        "dns": {"hosts": hosts},
        "websocket": {"inspect_connect": True},
        "cache": {
            "enabled": True,
            "dir": str(ctx.tmp / f"cache-soak-{ctx.started}"),
            # Small bounds, reached within the warm-up: from then on every cache structure is
            # at its size (index rows and key filter by entries, bodies by memory_size), and
            # whatever still grows is a leak, not a cache filling up.
            "max_size": 2 << 20,
            "memory_size": 1 << 20,
        },
    }


async def soak(ctx: Context) -> SoakResult:
    args = ctx.args
    seconds = float(args.soak_seconds)
    warmup = float(args.soak_warmup) if args.soak_warmup is not None else max(10.0, seconds / 6)
    warmup = min(warmup, seconds / 2)
    proxyd, own = start_proxyd(ctx, "soak", soak_config(ctx))
    lua = write_lua(
        ctx,
        "soak",
        LUA_SOAK.format(origins=SOAK_ORIGINS, port=ctx.origin_port, hot=SOAK_HOT_KEYS),
    )
    errors: list[str] = []
    samples: list[tuple[float, int]] = []
    counts = {"sessions": 0, "batches": 0}
    with own:
        started = time.monotonic()
        stop = asyncio.Event()

        async def sample() -> None:
            while not stop.is_set():
                samples.append((time.monotonic() - started, proxyd.rss()))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(args.sample_seconds):
                        await stop.wait()

        async def websocket_churn() -> None:
            target = wb.Target("session", proxyd.port, proxy=proxyd.proc)
            while not stop.is_set():
                try:
                    async with asyncio.timeout(IO_TIMEOUT):
                        client = await wb.WsClient.open(target, ctx.ws_origin.port)
                        await client.send(wb.frame(wb.OP_BINARY, b"soak" * 16, mask=True))
                        message = await client.next_message()
                        if message.payload != b"soak" * 16:
                            errors.append("websocket: wrong echo")
                        if not await client.close():
                            errors.append("websocket: no clean close")
                    counts["sessions"] += 1
                except (BenchError, OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                    errors.append(f"websocket: {type(exc).__name__}: {exc}")
                await asyncio.sleep(0.02)

        async def idle_churn() -> None:
            while not stop.is_set():
                batch = await open_idle_clients(proxyd.port, 200, ctx.origin, errors)
                counts["batches"] += 1
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2.0):
                        await stop.wait()
                close_all(batch)

        async def load() -> LoadResult:
            try:
                return await run_wrk(ctx, proxyd, lua, seconds)
            finally:
                stop.set()

        tasks = [sample(), websocket_churn(), websocket_churn(), idle_churn()]
        outcome = await asyncio.gather(load(), *tasks, return_exceptions=True)
        after_load = proxyd.rss()  # reported, not part of the growth: the load is over
    result = outcome[0]
    for item in outcome:
        if isinstance(item, BaseException):
            errors.append(f"{type(item).__name__}: {item}")
    kept = [(t, rss) for t, rss in samples if t >= warmup] or samples
    first = statistics.median(rss for _, rss in kept[:3])
    last = statistics.median(rss for _, rss in kept[-3:])
    return SoakResult(
        seconds=seconds,
        warmup=warmup,
        samples=samples,
        start_rss=int(first),
        end_rss=int(last),
        max_rss=max(rss for _, rss in samples),
        after_load_rss=after_load,
        growth_percent=100.0 * (last - first) / first,
        slope_kib_per_minute=slope(kept) * 60 / 1024,
        load=result if isinstance(result, LoadResult) else None,
        websocket_sessions=counts["sessions"],
        client_batches=counts["batches"],
        sample_seconds=float(args.sample_seconds),
        samples_used=len(kept),
        load_description=SOAK_LOAD,
        errors=errors,
    )


def slope(points: Sequence[tuple[float, int]]) -> float:
    """Least-squares slope of RSS over time, bytes per second (0 with fewer than 2 points)."""
    if len(points) < 2:
        return 0.0
    xs = [float(t) for t, _ in points]
    ys = [float(v) for _, v in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


# --- scaling --------------------------------------------------------------------------------------


@dataclass
class ScaleRun:
    dimension: str
    count: int
    round: int
    load: LoadResult


@dataclass
class Population:
    """One proxyd holding ``count`` of a dimension, ready for load."""

    dimension: str
    count: int
    proxyd: Proxyd
    own: contextlib.ExitStack  # stops this proxyd
    lua: Path
    rss_before: int  # after a warm-up, before the population
    requested: int = 0  # --scale-small / --scale-large (count is less when capped)
    rss_after: int = 0
    rss_end: int = 0
    held: int = 0  # what proxyd reports holding (groups, entries, connections, sessions)
    extra: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    clients: list[HttpClient] = field(default_factory=list)
    sessions: list[wb.WsClient] = field(default_factory=list)


def round_robin_lua(ctx: Context, dimension: str, count: int) -> Path:
    if dimension == "groups":
        host = f'"o" .. (i - 1) .. ".bench.test:{ctx.origin_port}"'
        path = '"/1k"'
    elif dimension == "keys":
        host = f'"{ctx.origin}"'
        path = '"/cached/1k?k=" .. (i - 1)'
    else:
        host, path, count = f'"{ctx.origin}"', '"/1k"', 1
    text = LUA_ROUND_ROBIN.format(count=count, what=dimension, host=host, path=path)
    return write_lua(ctx, f"scale-{dimension}-{count}", text)


def dimension_config(ctx: Context, dimension: str, count: int) -> dict[str, Any]:
    if dimension == "groups":
        return {
            "dns": {"hosts": {ORIGIN_NAME.format(i): LOOPBACK for i in range(count)}},
            # Room for every origin's socket, kept idle for the whole run.
            "pool": {"total": 2 * count + 256, "idle_used": 3600, "idle_unused": 3600},
        }
    if dimension == "keys":
        return {
            "cache": {
                "enabled": True,
                "dir": str(ctx.tmp / f"cache-{dimension}-{count}-{ctx.started}"),
                "max_size": 1 << 30,
            }
        }
    if dimension == "sessions":
        return {"websocket": {"inspect_connect": True}}
    return {}


async def populate(ctx: Context, dimension: str, count: int) -> Population:
    proxyd, own = start_proxyd(
        ctx, f"scale-{dimension}-{count}", dimension_config(ctx, dimension, count)
    )
    errors: list[str] = []
    # The same warm-up for every dimension: the load itself, briefly.
    lua = round_robin_lua(ctx, dimension, count)
    plain = round_robin_lua(ctx, "plain", 1)
    await run_wrk(ctx, proxyd, plain, 1)
    await asyncio.sleep(0.5)
    pop = Population(dimension, count, proxyd, own, lua, rss_before=proxyd.rss(), errors=errors)
    if dimension in ("groups", "keys"):
        # One request per origin / key, SCALE_CONNECTIONS keep-alive clients in parallel.
        clients = await open_idle_clients(
            proxyd.port, SCALE_CONNECTIONS, ctx.origin, errors, request=False
        )
        try:

            async def walk(offset: int, client: HttpClient) -> None:
                for i in range(offset, count, len(clients)):
                    if dimension == "groups":
                        authority = f"{ORIGIN_NAME.format(i)}:{ctx.origin_port}"
                        status = await client.get(authority, "/1k")
                    else:
                        status = await client.get(ctx.origin, f"/cached/1k?k={i}")
                    if status != 200:
                        errors.append(f"populate {dimension} #{i}: status {status}")

            async with asyncio.timeout(IO_TIMEOUT + count / 50):
                await asyncio.gather(*(walk(n, c) for n, c in enumerate(clients)))
        finally:
            close_all(clients)
        await wait_for_metric(proxyd, "proxyd_client_connections_active", lambda v: v == 0)
        if dimension == "groups":
            pop.held = int(proxyd.metrics().get("proxyd_pool_groups", 0.0))
        else:
            pop.held = int(
                await wait_for_metric(proxyd, "proxyd_cache_entries", lambda v: v >= count)
            )
    elif dimension == "clients":
        pop.clients = await open_idle_clients(proxyd.port, count, ctx.origin, errors)
        pop.held = int(
            await wait_for_metric(
                proxyd, "proxyd_client_connections_active", lambda v: v >= len(pop.clients)
            )
        )
    elif dimension == "sessions":
        target = wb.Target("session", proxyd.port, proxy=proxyd.proc)
        pop.sessions = await wb.open_sessions(target, ctx.ws_origin, count, errors)
        pop.held = int(
            await wait_for_metric(
                proxyd, "proxyd_websocket_sessions_active", lambda v: v >= len(pop.sessions)
            )
        )
    if pop.held < count:
        errors.append(f"proxyd holds {pop.held} {dimension}, not {count}")
    await asyncio.sleep(SETTLE_SECONDS)
    pop.rss_after = proxyd.rss()
    return pop


async def release(ctx: Context, pop: Population) -> None:
    """End of the runs: drop what the population holds; for pool groups, shorten the idle
    timeouts with a reload and check that every group is dropped with its last socket."""
    proxyd = pop.proxyd
    pop.rss_end = proxyd.rss()
    close_all(pop.clients)
    if pop.sessions:
        await wb.close_sessions(pop.sessions)
    if pop.dimension == "groups":
        proxyd.reload({"pool": {"idle_used": 1, "idle_unused": 1}})
        left = await wait_for_metric(proxyd, "proxyd_pool_groups", lambda v: v == 0)
        pop.extra["groups_left_after_expiry"] = left
        if left:
            pop.errors.append(f"{left:.0f} pool groups left after their sockets expired")
    pop.own.close()


async def scaling(ctx: Context) -> tuple[list[ScaleRun], list[Population]]:
    args = ctx.args
    runs: list[ScaleRun] = []
    pops: list[Population] = []
    for dimension in args.dimensions:
        requested = [args.scale_small, args.scale_large]
        counts = list(requested)
        if dimension in ("clients", "sessions"):
            per = 2 if dimension == "sessions" else 1  # this process holds both ends of a session
            cap = (ctx.nofile - NOFILE_SLACK) // per
            if counts[1] > cap:
                print(f"# scaling {dimension}: {counts[1]} capped to {cap} (file descriptors)")
                counts[1] = cap
        pair = [await populate(ctx, dimension, count) for count in counts]
        for pop, asked in zip(pair, requested, strict=True):
            pop.requested = asked
        for pop in pair:
            print(
                f"# scaling {dimension} {pop.count}: holds {pop.held}, RSS "
                f"{kib(pop.rss_before)} -> {kib(pop.rss_after)} KiB"
                + (f" ERRORS {pop.errors[:2]}" if pop.errors else ""),
                flush=True,
            )
        for rnd in range(1, args.rounds + 1):
            for pop in pair:
                load = await run_wrk(ctx, pop.proxyd, pop.lua, args.duration)
                runs.append(ScaleRun(dimension, pop.count, rnd, load))
                print(
                    f"# round {rnd} {dimension:<8} {pop.count:>6}: {load.rps:>8,.0f} req/s "
                    f"{fmt(load.cpu_us_per_request, 1)} µs/req"
                    + (f" ERRORS {load.errors}" if load.errors else ""),
                    flush=True,
                )
        for pop in pair:
            await release(ctx, pop)
        pops.extend(pair)
    return runs, pops


# --- reporting ------------------------------------------------------------------------------------


def kib(value: float | None) -> str:
    return "-" if value is None else f"{value / 1024:,.1f}"


def fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def median_of(values: Iterator[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def print_footprints(results: Sequence[FootprintResult]) -> None:
    print()
    print("| what | count | RSS before (KiB) | RSS after (KiB) | KiB each (median) | errors |")
    print("|---|---:|---:|---:|---:|---|")
    for what in dict.fromkeys(r.what for r in results):
        rows = [r for r in results if r.what == what]
        each = median_of(r.bytes_each for r in rows)
        errors = sum(len(r.errors) for r in rows)
        last = rows[-1]
        print(
            f"| {what} | {last.opened:,} | {kib(last.rss_before)} | {kib(last.rss_after)} "
            f"| **{kib(each)}** | {errors or ''} |"
        )


def print_soak(result: SoakResult) -> None:
    print()
    load = result.load
    for error, count in collections.Counter(result.errors).most_common(5):
        print(f"# soak error x{count}: {error}")
    print(
        f"Soak: {result.seconds:.0f} s of load ({fmt(load.rps if load else None)} req/s, "
        f"{fmt(load.cpu_us_per_request if load else None, 1)} µs/req), "
        f"{result.websocket_sessions:,} WebSocket sessions and {result.client_batches} batches "
        f"of 200 idle clients opened and closed meanwhile; samples after {result.warmup:.0f} s."
    )
    print()
    print(
        "| RSS start (KiB) | RSS end (KiB) | RSS max (KiB) | growth | slope (KiB/min) "
        "| RSS after the load (KiB) | errors |"
    )
    print("|---:|---:|---:|---:|---:|---:|---|")
    errors = len(result.errors) + (sum(load.errors.values()) if load else 1)
    print(
        f"| {kib(result.start_rss)} | {kib(result.end_rss)} | {kib(result.max_rss)} "
        f"| **{result.growth_percent:+.2f} %** | {result.slope_kib_per_minute:+.1f} "
        f"| {kib(result.after_load_rss)} | {errors or ''} |"
    )


def print_scaling(runs: Sequence[ScaleRun], pops: Sequence[Population]) -> None:
    print()
    print(
        "| dimension | count | held | req/s | CPU µs/req | req/s ratio | CPU ratio "
        "| RSS added (KiB) | per item (B) | errors |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for dimension in dict.fromkeys(p.dimension for p in pops):
        pair = [p for p in pops if p.dimension == dimension]
        base_rps = base_cpu = None
        for pop in pair:
            mine = [r.load for r in runs if r.dimension == dimension and r.count == pop.count]
            rps = median_of(load.rps for load in mine)
            cpu = median_of(load.cpu_us_per_request for load in mine)
            if base_rps is None:
                base_rps, base_cpu = rps, cpu
            added = pop.rss_after - pop.rss_before
            errors = len(pop.errors) + sum(sum(load.errors.values()) for load in mine)
            print(
                f"| {dimension} | {pop.count:,} | {pop.held:,} | {fmt(rps)} | {fmt(cpu, 1)} "
                f"| {ratio(rps, base_rps)} | {ratio(cpu, base_cpu)} | {kib(added)} "
                f"| {fmt(added / pop.count if pop.count else None)} | {errors or ''} |"
            )


def ratio(value: float | None, base: float | None) -> str:
    return "-" if value is None or not base else f"{value / base:.3f}"


# --- main -----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="60 s soak, 1 round of 3 s runs")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma list of {PARTS}")
    parser.add_argument("--clients", type=int, default=5000, help="idle client connections")
    parser.add_argument("--sessions", type=int, default=1000, help="idle WebSocket sessions")
    parser.add_argument("--footprint-rounds", type=int, default=1, help="fresh proxyds each")
    parser.add_argument("--soak-seconds", type=float, default=None, help="600 (--quick: 60)")
    parser.add_argument("--soak-warmup", type=float, default=None, help="default: soak / 6")
    parser.add_argument("--sample-seconds", type=float, default=5.0)
    parser.add_argument("--scale-small", type=int, default=10)
    parser.add_argument("--scale-large", type=int, default=10000)
    parser.add_argument("--dimensions", default=",".join(DIMENSIONS), help=f"of {DIMENSIONS}")
    parser.add_argument("--duration", type=float, default=None, help="s per run (5; quick 3)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved (3; quick 1)")
    parser.add_argument("--proxyd-root", default=str(REPO_ROOT), help="the tree to run")
    parser.add_argument("--no-pin", action="store_true", help="do not use taskset")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    words = sys.argv[1:] if argv is None else list(argv)
    args.command = " ".join(["python bench/memory_bench.py", *words])
    args.only = [p.strip() for p in args.only.split(",") if p.strip()]
    args.dimensions = [d.strip() for d in args.dimensions.split(",") if d.strip()]
    for part in args.only:
        if part not in PARTS:
            parser.error(f"--only: unknown part {part!r} (of {', '.join(PARTS)})")
    for dimension in args.dimensions:
        if dimension not in DIMENSIONS:
            parser.error(f"--dimensions: unknown {dimension!r} (of {', '.join(DIMENSIONS)})")
    if args.soak_seconds is None:
        args.soak_seconds = 60.0 if args.quick else 600.0
    if args.duration is None:
        args.duration = 3.0 if args.quick else 5.0
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    return args


@dataclass
class Results:
    footprints: list[FootprintResult] = field(default_factory=list)
    runs: list[ScaleRun] = field(default_factory=list)
    populations: list[Population] = field(default_factory=list)
    soak: SoakResult | None = None

    def failed(self) -> bool:
        soak = self.soak
        return (
            any(r.errors for r in self.footprints)
            or any(p.errors for p in self.populations)
            or any(r.load.errors for r in self.runs)
            or (
                soak is not None
                and (bool(soak.errors) or soak.load is None or bool(soak.load.errors))
            )
        )

    def document(self, env: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
        """Everything measured, and what a report needs to say how (bench/compare.py's
        ``--memory-json`` renders the soak and scaling parts of it)."""
        return {
            "environment": env,
            "args": dict(vars(args)),
            "footprints": [asdict(r) for r in self.footprints],
            "scaling": {
                "load": SCALE_LOAD,
                "rounds": args.rounds,
                "seconds_per_run": args.duration,
                "runs": [asdict(r) for r in self.runs],
                "populations": [
                    {
                        "dimension": p.dimension,
                        "count": p.count,
                        "requested": p.requested,
                        "held": p.held,
                        "rss_before": p.rss_before,
                        "rss_after": p.rss_after,
                        "rss_end": p.rss_end,
                        "extra": p.extra,
                        "errors": p.errors,
                    }
                    for p in self.populations
                ],
            },
            "soak": asdict(self.soak) if self.soak is not None else None,
        }


def print_footprint(result: FootprintResult) -> None:
    print(
        f"# round {result.round} {result.what}: {result.opened:,} open, "
        f"{kib(result.bytes_each)} KiB each"
        + (f" ERRORS {result.errors[:2]}" if result.errors else ""),
        flush=True,
    )


async def run_async(ctx: Context, results: Results) -> None:
    args = ctx.args
    await ctx.ws_origin.start()
    for rnd in range(1, args.footprint_rounds + 1):
        if "idle" in args.only:
            for request in (True, False):
                result = await measure_idle_clients(ctx, rnd, request=request)
                results.footprints.append(result)
                print_footprint(result)
        if "ws" in args.only:
            result = await measure_idle_sessions(ctx, rnd)
            results.footprints.append(result)
            print_footprint(result)
    if "scaling" in args.only:
        results.runs, results.populations = await scaling(ctx)
    if "soak" in args.only:
        print(f"# soak: {args.soak_seconds:g} s", flush=True)
        results.soak = await soak(ctx)


def raise_nofile(args: argparse.Namespace) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the children
    nofile = min(resource.getrlimit(resource.RLIMIT_NOFILE)[0], 1 << 20)
    need = max(args.clients, 2 * args.sessions) + NOFILE_SLACK
    if nofile < need:
        raise BenchError(f"need {need} file descriptors, the hard limit allows {nofile}")
    return nofile


def utc_now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


def source_tree(root: Path) -> str:
    """The commit proxyd runs from, and whether proxyd/ has uncommitted changes."""
    if not (root / ".git").exists():
        return f"source tree {root}"
    commit = hb.run_text(["git", "-C", str(root), "rev-parse", "--short", "HEAD"]).strip()
    changed = hb.run_text(["git", "-C", str(root), "status", "--porcelain", "--", "proxyd"])
    state = f"uncommitted changes in {len(changed.splitlines())} file(s) under proxyd/"
    return f"{root} at {commit}, " + (state if changed.strip() else "clean")


def environment(
    args: argparse.Namespace, pinning: hb.Pinning, nofile: int, tools: dict[str, str]
) -> dict[str, str]:
    root = Path(args.proxyd_root).resolve()
    version = subprocess.run(
        [sys.executable, "-c", "import proxyd; print(proxyd.__version__, proxyd.__file__)"],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    ).stdout.strip()
    busy = hb.machine_busy_percent()
    env = {
        "machine": f"{os.cpu_count()} CPUs ({hb.cpu_model()}), {platform.system()} "
        f"{platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "proxyd": f"{version or '?'} ({source_tree(root)})",
        "nginx": hb.first_line(hb.run_text([tools["nginx"], "-v"])),
        "wrk": hb.first_line(hb.run_text([tools["wrk"], "-v"])),
        "pinning": pinning.description,
        "fd limit": str(nofile),
        "machine busy before start": f"{busy:.0f}% (loadavg {os.getloadavg()[0]:.2f})",
        "plan": f"{', '.join(args.only)}; {args.clients:,} idle clients, {args.sessions:,} "
        f"sessions, soak {args.soak_seconds:g} s, scaling {args.scale_small} vs "
        f"{args.scale_large} ({', '.join(args.dimensions)}), {args.rounds} x {args.duration:g} s",
        "command": args.command,
        "started": utc_now(),
    }
    for key, value in env.items():
        print(f"# {key}: {value}")
    if busy > 10:
        print("# WARNING: something else is using the CPUs; the numbers will be noisy")
    return env


def run(args: argparse.Namespace) -> int:
    if sys.platform != "linux":
        raise BenchError("this benchmark needs Linux (/proc)")
    pinning = hb.choose_pinning(not args.no_pin)
    cpus = sorted(os.sched_getaffinity(0))
    if pinning.load_prefix and len(cpus) >= 2:
        os.sched_setaffinity(0, {cpus[1]})  # this process: clients and the WebSocket origin
    nofile = raise_nofile(args)
    wrk = hb.find_or_install("wrk", "wrk", "/usr/bin/wrk")
    nginx = hb.find_or_install("nginx", "nginx-light", "/usr/sbin/nginx")
    started = time.monotonic()
    env = environment(args, pinning, nofile, {"nginx": nginx, "wrk": wrk})
    results = Results()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="proxyd-mem-bench-")))
        ctx = Context(args, tmp, stack, pinning, wrk, hb.free_port(), nofile, wb.Origin())
        start_nginx(ctx)
        try:
            asyncio.run(run_async(ctx, results))
        finally:
            for log in sorted(tmp.glob("proxyd-*.log")):
                if log.stat().st_size:
                    print(f"# {log.stem} output (tail):\n{hb.tail(log)}")
    if results.footprints:
        print_footprints(results.footprints)
    if results.populations:
        print_scaling(results.runs, results.populations)
    if results.soak is not None:
        print_soak(results.soak)
    env["finished"] = utc_now()
    env["wall time"] = f"{time.monotonic() - started:.0f}s"
    if args.json:
        document = results.document(env, args)
        Path(args.json).write_text(json.dumps(document, indent=1, default=str) + "\n")
        print(f"# wrote {args.json}")
    return 2 if results.failed() else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return hb.run_main("memory_bench", lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())

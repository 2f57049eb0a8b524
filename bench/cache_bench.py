"""Cache hits against misses through proxyd, and 100 MiB streamed from the cache, in one run.

Run it from the repository root with the project's virtualenv active::

    python bench/cache_bench.py                 # 3 rounds x 6 runs x 5 s + streaming, ~2.5 minutes
    python bench/cache_bench.py --quick         # smoke run: 1 round x 1 s, one download each, <30 s
    python bench/cache_bench.py --rounds 1 --duration 3 --downloads 2 --json /tmp/cache.json

The question it answers: how much cheaper is a request that proxyd answers from its shared cache
than one it has to forward (RFC 9111 says nothing about speed; the issue says "a hit should cost far
less than a miss"), and how fast does a large stored object stream out of the store.

How it works (the helpers -- nginx start-up pieces, wrk, CPU pinning, /proc CPU time, process
stopping -- are imported from ``bench/http_bench.py``, so both benchmarks measure the same way):

* **Origin**: nginx started in the foreground from a generated config in a temporary directory
  (one worker, access log off, loopback only). It serves the same three files under two prefixes
  that differ only in the ``Cache-Control`` they add: ``/cached/NAME`` with ``max-age=3600``
  (storable and fresh for an hour, RFC 9111 §4.2.1) and ``/nostore/NAME`` with ``no-store``
  (never stored, RFC 9111 §5.2.2.5). The files are ``1k`` (1024 bytes), ``1m`` (1 MiB) and
  ``100m`` (100 MiB).
* **Two proxyd processes** (``python -m proxyd``, access log off, everything else at its
  defaults): ``cache`` with ``cache.enabled: true``, ``cache.dir`` in the temporary directory and
  ``cache.max_object_size`` raised to 256 MiB so the 100 MiB object is stored; and ``no-cache``
  (``cache.enabled: false``), the plain relay, as a baseline. Both are pinned to the same CPU; only
  one is under load at a time.
* **Before any load** each ``/cached/`` object is requested once through ``cache`` and the script
  waits (bounded) until it is stored: for 1k and 1m until a request comes back with
  ``Cache-Status: ...; hit`` (RFC 9211); for 100m until ``proxyd_cache_stored_total`` counts it.
  If the cache never serves a hit, the script stops and says so.
* **Request scenarios** (wrk, ``-t 1 -c 50`` keep-alive by default), for 1 KiB and 1 MiB:

  - ``hit``: ``cache``, the same ``/cached/NAME`` URL on every request;
  - ``miss``: ``cache``, ``/nostore/NAME?u=RUN-N`` with a new query on every request (a wrk Lua
    ``request()`` function counts), so every request is a distinct key: it goes to the origin, is
    never stored, and never follows another request's fetch (collapsed forwarding would otherwise
    queue 50 concurrent requests for one no-store URL behind each other);
  - ``relay``: the same miss URLs through ``no-cache``: what forwarding costs without a cache.

  wrk has no proxy option: it connects to proxyd and the Lua script writes absolute-form requests
  (``GET http://127.0.0.1:PORT/... HTTP/1.1``), as ``http_bench.py`` does. Each round runs every
  scenario once (interleaved, so drift hits all alike); the tables show medians over ``--rounds``.
* **Streaming**: ``--downloads`` sequential downloads of the 100 MiB object with curl (pinned with
  wrk, ``--max-time 60`` each) for each of: ``cached`` (``/cached/100m`` through ``cache``, a hit),
  ``miss`` (``/nostore/100m?u=...`` through ``cache``), ``relay`` (the same through ``no-cache``)
  and ``direct`` (curl straight to nginx, for scale). MiB/s is bytes over curl's total time; the
  time to first byte and proxyd's CPU time per download are shown too, and proxyd's peak RSS
  (VmHWM) before and after streaming (bodies must stream, not pile up in memory).
* **Checks, never hidden**: every byte of each object is compared once through each proxyd before
  the load; every run counts wrk's socket errors and HTTP statuses >= 400, short responses, and
  from proxyd's ``/metrics`` (scraped around each run): non-2xx answers, ``proxyd_errors_total``
  and ``proxyd_cache_lookups_total`` by result. A ``hit`` run where fewer than 99 % of lookups were
  hits, or a ``miss`` run with any hit, counts as an error (``not_hit`` / ``unexpected_hit``).
* **CPU per request**: utime + stime of the proxyd under load from ``/proc/PID/stat`` before and
  after each run, divided by the requests proxyd answered in it (``proxyd_requests_total``; clock
  tick resolution: 10 ms per run). After wrk exits, the script waits (at most 5 s) until proxyd's
  open client connections are back to where they were, so requests still in flight when wrk
  stopped count in their own run, not in the next one.
* **Pinning**: with ``taskset`` and two usable CPUs, both proxyd run on the first CPU and nginx,
  wrk and curl on the second, so proxyd's number is one core's worth of work.

Everything started here (nginx, both proxyd, wrk, curl) is stopped by pid at the end, also on
Ctrl-C or an error; the temporary directory, cache included, is removed. Only loopback is used.
Every load is bounded: wrk by ``--duration`` (and a hard timeout), curl by ``--max-time``, the
number of downloads by ``--downloads``. Exit status: 0 clean, 2 if any run had errors, 1 when the
benchmark could not run.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Final

from bench import http_bench as hb
from bench.http_bench import LOOPBACK, REPO_ROOT, BenchError, Pinning, fmt, median_or_none

KIB: Final = 1024
MIB: Final = 1 << 20
#: Files the origin serves; the request scenarios use the first two, streaming the last.
FILES: Final[dict[str, int]] = {"1k": KIB, "1m": MIB, "100m": 100 * MIB}
REQUEST_FILES: Final = ("1k", "1m")
STREAM_FILE: Final = "100m"
LABELS: Final[dict[str, str]] = {"1k": "1 KiB", "1m": "1 MiB", "100m": "100 MiB"}
#: Request scenarios: (kind, proxyd, prefix). "hit" reuses one URL; the others add a unique query.
KINDS: Final[tuple[tuple[str, str, str], ...]] = (
    ("hit", "cache", "cached"),
    ("miss", "cache", "nostore"),
    ("relay", "no-cache", "nostore"),
)
STREAM_KINDS: Final[tuple[tuple[str, str | None, str], ...]] = (
    ("cached", "cache", "cached"),
    ("miss", "cache", "nostore"),
    ("relay", "no-cache", "nostore"),
    ("direct", None, "nostore"),
)
KIND_TEXT: Final[dict[str, str]] = {
    "hit": "hit (cache)",
    "miss": "miss (cache, no-store)",
    "relay": "relay (cache off)",
    "cached": "from the cache (hit)",
    "direct": "direct to nginx",
}
STORE_WAIT: Final = 30.0
SETTLE_WAIT: Final = 5.0
DOWNLOAD_MAX_TIME: Final = 60
WARMUP_SECONDS: Final = 1
#: A hit run must be at least this share of hits (wrk's last in-flight requests are not counted).
MIN_HIT_SHARE: Final = 0.99
WRK_ERROR_KINDS: Final = hb.WRK_ERROR_KINDS

# --- the origin --------------------------------------------------------------------------------

NGINX_CONF: Final = """\
# Generated by bench/cache_bench.py: a throwaway static origin for the cache benchmark.
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000000000;
    keepalive_timeout 300s;
{temp_paths}
    server {{
        listen {host}:{port} backlog=4096;
        server_name bench-origin;
        # RFC 9111 §5.2.2.1: fresh for an hour, so every later request is a hit.
        location /cached/ {{
            alias {tmp}/www/;
            add_header Cache-Control "max-age=3600" always;
        }}
        # RFC 9111 §5.2.2.5: never stored, so every request goes to the origin.
        location /nostore/ {{
            alias {tmp}/www/;
            add_header Cache-Control "no-store" always;
        }}
    }}
}}
"""


def file_content(size: int) -> bytes:
    """Deterministic, not all-equal bytes (a 251-byte cycle, as http_bench.py uses)."""
    block = bytes(i % 251 for i in range(min(size, MIB)))
    whole, rest = divmod(size, len(block))
    return block * whole + block[:rest]


def start_nginx(
    nginx: str, tmp: Path, port: int, pinning: Pinning, stack: contextlib.ExitStack
) -> dict[str, str]:
    """Write the files and the config, start nginx; returns each file's sha256."""
    www = tmp / "www"
    www.mkdir()
    digests: dict[str, str] = {}
    for name, size in FILES.items():
        content = file_content(size)
        (www / name).write_bytes(content)
        digests[name] = hashlib.sha256(content).hexdigest()
    conf = tmp / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            tmp=tmp, host=LOOPBACK, port=port, temp_paths=hb.nginx_temp_paths(nginx, tmp)
        )
    )
    out = stack.enter_context((tmp / "nginx-stderr.log").open("wb"))
    cmd = [*pinning.load_prefix, nginx, "-p", str(tmp), "-e", str(tmp / "nginx-error.log")]
    proc = subprocess.Popen(
        [*cmd, "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
    )
    stack.callback(hb.stop_process, proc, "nginx")
    hb.wait_for_port(port, proc, "nginx", tmp / "nginx-error.log")
    return digests


# --- proxyd ------------------------------------------------------------------------------------


@dataclass
class Proxyd:
    name: str
    port: int
    admin_port: int
    proc: subprocess.Popen[bytes]
    log: Path


def start_proxyd(
    name: str, tmp: Path, cache_dir: Path | None, pinning: Pinning, stack: contextlib.ExitStack
) -> Proxyd:
    port, admin_port = hb.free_port(), hb.free_port()
    lines = [
        "# Generated by bench/cache_bench.py",
        f'listen: ["{LOOPBACK}:{port}"]',
        f'admin: {{listen: "{LOOPBACK}:{admin_port}"}}',
        "access_log: {enabled: false}",
    ]
    if cache_dir is None:
        lines.append("cache: {enabled: false}")
    else:
        # max_object_size above 100 MiB so the streaming object is stored; the rest: defaults.
        lines.append(f'cache: {{enabled: true, dir: "{cache_dir}", max_object_size: {256 * MIB}}}')
    config = tmp / f"proxyd-{name}.yaml"
    config.write_text("\n".join(lines) + "\n")
    log = tmp / f"proxyd-{name}-stderr.log"
    out: IO[bytes] = stack.enter_context(log.open("wb"))
    proc = subprocess.Popen(
        [*pinning.proxy_prefix, sys.executable, "-m", "proxyd", "--config", str(config)],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    stack.callback(hb.stop_process, proc, f"proxyd {name}")
    hb.wait_for_port(port, proc, f"proxyd {name}", log)
    hb.wait_for_port(admin_port, proc, f"proxyd {name} admin", log)
    return Proxyd(name, port, admin_port, proc, log)


def check_alive(proxyd: Proxyd, during: str) -> None:
    if proxyd.proc.poll() is not None:
        raise BenchError(
            f"proxyd {proxyd.name} exited (status {proxyd.proc.returncode}) during {during}:\n"
            + hb.tail(proxyd.log)
        )


def peak_rss_mib(pid: int) -> float | None:
    """VmHWM (the peak resident set size) of a process, in MiB."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # the value is in kB
    return None


# --- proxyd's metrics --------------------------------------------------------------------------


@dataclass
class Counters:
    requests: float = 0.0
    non_2xx: float = 0.0
    errors: float = 0.0
    stored: float = 0.0
    lookups: dict[str, float] = field(default_factory=dict)
    #: a gauge (client connections open now); ``minus`` keeps the later value
    connections: float = 0.0

    def minus(self, other: Counters) -> Counters:
        results = self.lookups.keys() | other.lookups.keys()
        return Counters(
            self.requests - other.requests,
            self.non_2xx - other.non_2xx,
            self.errors - other.errors,
            self.stored - other.stored,
            {r: self.lookups.get(r, 0.0) - other.lookups.get(r, 0.0) for r in results},
            self.connections,
        )


def scrape(proxyd: Proxyd) -> Counters:
    # http.client, not urllib: see scrape_proxyd in http_bench.py.
    conn = http.client.HTTPConnection(LOOPBACK, proxyd.admin_port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        text = response.read().decode()
    except OSError as exc:
        raise BenchError(f"proxyd {proxyd.name} admin /metrics failed: {exc}") from None
    finally:
        conn.close()
    if response.status != 200:
        raise BenchError(f"proxyd {proxyd.name} admin /metrics answered {response.status}")
    counters = Counters()
    for line in text.splitlines():
        match = hb.METRIC_LINE.match(line)
        if match is None:
            continue
        name, labels, value = match["name"], match["labels"] or "", float(match["value"])
        if name == "proxyd_requests_total":
            counters.requests += value
            if 'status_class="2xx"' not in labels:
                counters.non_2xx += value
        elif name == "proxyd_client_connections_active":
            counters.connections += value
        elif name == "proxyd_errors_total":
            counters.errors += value
        elif name == "proxyd_cache_stored_total":
            counters.stored += value
        elif name == "proxyd_cache_lookups_total" and labels.startswith('result="'):
            result = labels[len('result="') :].split('"', 1)[0]
            counters.lookups[result] = counters.lookups.get(result, 0.0) + value
    return counters


def settle(proxyd: Proxyd, connections_before: float) -> Counters:
    """Scrape once wrk's connections are gone (bounded by SETTLE_WAIT).

    wrk stops counting at the end of its duration with up to ``-c`` requests still in flight;
    proxyd finishes them after wrk exits. Waiting until its open client connections are back to
    what they were keeps that work (CPU, lookups) in this run instead of leaking into the next.
    """
    deadline = time.monotonic() + SETTLE_WAIT
    counters = scrape(proxyd)
    while counters.connections > connections_before and time.monotonic() < deadline:
        time.sleep(0.02)
        counters = scrape(proxyd)
    return counters


def lookup_errors(kind: str, delta: Counters, requests: int) -> dict[str, int]:
    """Errors in what the cache did: a hit run must be hits; a miss run must never hit."""
    hits = int(delta.lookups.get("hit", 0.0))
    total = int(sum(delta.lookups.values()))
    errors: dict[str, int] = {}
    if kind in ("hit", "cached") and (requests == 0 or total == 0 or hits < MIN_HIT_SHARE * total):
        errors["not_hit"] = max(total - hits, 1)
    elif kind == "miss" and hits:
        errors["unexpected_hit"] = hits
    return errors


# --- one request by hand -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fetched:
    status: int
    cache_status: str
    body: bytes


def fetch(proxyd: Proxyd, origin_port: int, path: str) -> Fetched:
    """One GET of ``http://origin/path`` through proxyd (absolute form), whole body read."""
    conn = http.client.HTTPConnection(LOOPBACK, proxyd.port, timeout=30)
    try:
        # An absolute-form target and our own Host: http.client then talks to proxyd as a proxy.
        conn.request(
            "GET",
            f"http://{LOOPBACK}:{origin_port}{path}",
            headers={"Host": f"{LOOPBACK}:{origin_port}"},
        )
        response = conn.getresponse()
        body = response.read()
        return Fetched(response.status, response.getheader("Cache-Status", ""), body)
    except (OSError, http.client.HTTPException) as exc:
        raise BenchError(
            f"GET {path} through proxyd {proxyd.name} failed: {exc}\n"
            f"proxyd {proxyd.name} output (tail):\n{hb.tail(proxyd.log)}"
        ) from None
    finally:
        conn.close()


def is_hit(cache_status: str) -> bool:
    """RFC 9211 §2: the last member is the cache nearest the client (us); ``hit`` is a param."""
    if not cache_status:
        return False
    member = cache_status.rsplit(",", 1)[-1]
    return "hit" in (param.strip().lower() for param in member.split(";")[1:])


def check_body(got: Fetched, name: str, digests: dict[str, str], what: str) -> None:
    digest = hashlib.sha256(got.body).hexdigest()
    if got.status != 200 or digest != digests[name]:
        raise BenchError(
            f"{what}: status {got.status}, {len(got.body)} body bytes (expected 200 and "
            f"{FILES[name]} bytes with the file's sha256); Cache-Status {got.cache_status!r}"
        )


def prepare(ctx: Context, digests: dict[str, str]) -> None:
    """Every object correct through both proxyd; each /cached/ object stored before any load."""
    for name in FILES:
        for proxyd in ctx.proxyds.values():
            got = fetch(proxyd, ctx.origin_port, f"/nostore/{name}?u=check")
            check_body(got, name, digests, f"/nostore/{name} through proxyd {proxyd.name}")
    cache = ctx.proxyds.get("cache")
    if cache is None:
        return  # --skip-cache
    for name in REQUEST_FILES:
        # The first request fills the entry; poll (bounded) until one comes back as a hit.
        deadline = time.monotonic() + STORE_WAIT
        got = fetch(cache, ctx.origin_port, f"/cached/{name}")
        check_body(got, name, digests, f"first /cached/{name} through proxyd cache")
        while not is_hit(got.cache_status):
            if time.monotonic() > deadline:
                raise BenchError(
                    f"/cached/{name} (Cache-Control: max-age=3600) was never served as a hit "
                    f"within {STORE_WAIT:.0f}s; last Cache-Status {got.cache_status!r}. "
                    "Is the cache implemented (proxyd/cache/)?"
                )
            time.sleep(0.05)
            got = fetch(cache, ctx.origin_port, f"/cached/{name}")
            check_body(got, name, digests, f"/cached/{name} through proxyd cache")
        print(f"# /cached/{name} stored; a hit says Cache-Status: {got.cache_status}")
    # The big one: fill once (a timed download, shown as "fill"), then wait for the commit.
    before = scrape(cache)
    fill = download(ctx, "cache", f"/cached/{STREAM_FILE}", "fill")
    ctx.fill = fill
    deadline = time.monotonic() + STORE_WAIT
    while scrape(cache).minus(before).stored < 1:
        if time.monotonic() > deadline:
            raise BenchError(
                f"/cached/{STREAM_FILE} ({FILES[STREAM_FILE] // MIB} MiB, max-age=3600) was not "
                f"stored within {STORE_WAIT:.0f}s (proxyd_cache_stored_total did not grow)"
            )
        time.sleep(0.1)
    got = fetch(cache, ctx.origin_port, f"/cached/{STREAM_FILE}")
    check_body(got, STREAM_FILE, digests, f"/cached/{STREAM_FILE} through proxyd cache")
    if not is_hit(got.cache_status):
        raise BenchError(
            f"/cached/{STREAM_FILE} is stored but not served as a hit: {got.cache_status!r}"
        )
    print(
        f"# /cached/{STREAM_FILE} stored (fill: {fmt(fill.mib_per_s)} MiB/s); "
        f"a hit says Cache-Status: {got.cache_status}"
    )


# --- wrk ---------------------------------------------------------------------------------------


def write_lua(tmp: Path, kind: str, name: str, prefix: str, origin_port: int) -> Path:
    origin = f"{LOOPBACK}:{origin_port}"
    lines = [
        "-- Generated by bench/cache_bench.py: absolute-form requests, wrk talks to proxyd.",
        'wrk.method = "GET"',
        f'wrk.headers["Host"] = "{origin}"',
    ]
    if kind == "hit":
        lines.append(f'wrk.path = "http://{origin}/{prefix}/{name}"')
    else:
        # A new query per request: a distinct cache key each time (no collapsed forwarding).
        run_id = secrets.token_hex(4)
        lines += [
            f'local base = "http://{origin}/{prefix}/{name}?u={run_id}-"',
            "local n = 0",
            "function request()",
            "  n = n + 1",
            '  return wrk.format("GET", base .. n)',
            "end",
        ]
    path = tmp / f"wrk-{kind}-{name}.lua"
    path.write_text("\n".join(lines) + "\n" + hb.LUA_DONE)
    return path


@dataclass
class RunResult:
    size: str
    kind: str
    round: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_s: float
    cpu_us_per_request: float | None
    hit_share: float | None
    errors: dict[str, int]


@dataclass
class Download:
    kind: str
    round: int
    status: int
    size: int
    seconds: float
    ttfb_ms: float
    mib_per_s: float
    cpu_s: float | None
    errors: dict[str, int]


@dataclass
class Context:
    wrk: str
    curl: str
    pinning: Pinning
    tmp: Path
    origin_port: int
    proxyds: dict[str, Proxyd]
    connections: int
    kinds: tuple[tuple[str, str, str], ...] = KINDS
    stream_kinds: tuple[tuple[str, str | None, str], ...] = STREAM_KINDS
    fill: Download | None = None
    lua: dict[tuple[str, str], Path] = field(default_factory=dict)


def measure(
    ctx: Context, name: str, kind: str, proxyd_name: str, seconds: int, rnd: int
) -> RunResult:
    proxyd = ctx.proxyds[proxyd_name]
    before = scrape(proxyd)
    cpu_before = hb.process_cpu_seconds(proxyd.proc.pid)
    values = hb.run_wrk(
        ctx.wrk, ctx.pinning, proxyd.port, name, ctx.connections, seconds, ctx.lua[(kind, name)]
    )
    check_alive(proxyd, f"{LABELS[name]} {kind}")
    after = settle(proxyd, before.connections)
    cpu_s = hb.process_cpu_seconds(proxyd.proc.pid) - cpu_before
    delta = after.minus(before)
    requests = int(values["requests"])
    # CPU per request over what proxyd answered (wrk does not count its last in-flight ones).
    answered = int(delta.requests) or requests
    elapsed = values["duration_us"] / 1e6
    errors = {k: int(values[k]) for k in WRK_ERROR_KINDS}
    if values["bytes"] < requests * FILES[name]:
        errors["short"] = 1  # some responses carried less than the file
    errors["proxyd_non2xx"] = int(delta.non_2xx)
    errors["proxyd_errors"] = int(delta.errors)
    total_lookups = sum(delta.lookups.values())
    if proxyd_name == "cache":
        errors.update(lookup_errors(kind, delta, requests))
    return RunResult(
        size=name,
        kind=kind,
        round=rnd,
        requests=requests,
        seconds=elapsed,
        rps=requests / elapsed if elapsed > 0 else 0.0,
        p50_ms=values["p50_us"] / 1000,
        p99_ms=values["p99_us"] / 1000,
        cpu_s=cpu_s,
        cpu_us_per_request=cpu_s * 1e6 / answered if answered else None,
        hit_share=delta.lookups.get("hit", 0.0) / total_lookups if total_lookups else None,
        errors=errors,
    )


# --- curl --------------------------------------------------------------------------------------


def download(ctx: Context, proxyd_name: str | None, path: str, kind: str, rnd: int = 0) -> Download:
    """One bounded curl download of ``path`` (through proxyd ``proxyd_name``, or direct)."""
    url = f"http://{LOOPBACK}:{ctx.origin_port}{path}"
    proxyd = ctx.proxyds[proxyd_name] if proxyd_name else None
    route = ["-x", f"http://{LOOPBACK}:{proxyd.port}"] if proxyd else ["--noproxy", "*"]
    cmd = [
        *ctx.pinning.load_prefix,
        ctx.curl,
        "-sS",
        "-o",
        "/dev/null",
        "--max-time",
        str(DOWNLOAD_MAX_TIME),
        "-w",
        "%{http_code} %{size_download} %{time_total} %{time_starttransfer}",
        *route,
        url,
    ]
    before = scrape(proxyd) if proxyd else None
    cpu_before = hb.process_cpu_seconds(proxyd.proc.pid) if proxyd else 0.0
    # Only loopback: the proxy variables of the environment must not reroute anything.
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    try:
        done = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=DOWNLOAD_MAX_TIME + 10,
            check=False,
            env=env,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"curl did not finish in {DOWNLOAD_MAX_TIME + 10}s: {url}") from None
    cpu_s = hb.process_cpu_seconds(proxyd.proc.pid) - cpu_before if proxyd else None
    try:
        code, size, total, ttfb = done.stdout.split()
        status, got, seconds = int(code), int(size), float(total)
    except ValueError:
        raise BenchError(f"curl failed (status {done.returncode}): {done.stderr.strip()}") from None
    errors: dict[str, int] = {}
    if done.returncode != 0:
        errors["curl"] = done.returncode
    if status != 200:
        errors["status"] = 1
    if got != FILES[STREAM_FILE]:
        errors["short"] = 1
    if proxyd is not None and before is not None:
        check_alive(proxyd, f"{kind} download")
        delta = scrape(proxyd).minus(before)
        errors["proxyd_non2xx"] = int(delta.non_2xx)
        errors["proxyd_errors"] = int(delta.errors)
        if proxyd.name == "cache":
            errors.update(lookup_errors(kind, delta, 1))
    return Download(
        kind=kind,
        round=rnd,
        status=status,
        size=got,
        seconds=seconds,
        ttfb_ms=float(ttfb) * 1000,
        mib_per_s=got / MIB / seconds if seconds > 0 else 0.0,
        cpu_s=cpu_s,
        errors={k: v for k, v in errors.items() if v},
    )


# --- reporting ---------------------------------------------------------------------------------


def errors_text(error_dicts: Sequence[dict[str, int]]) -> str:
    totals: dict[str, int] = {}
    for errors in error_dicts:
        for kind, count in errors.items():
            totals[kind] = totals.get(kind, 0) + count
    return " ".join(f"{k}={v}" for k, v in totals.items() if v) or "none"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


@dataclass
class RequestRow:
    size: str
    kind: str
    rps: float | None
    p50_ms: float | None
    p99_ms: float | None
    cpu_us_per_request: float | None
    cpu_percent: float | None
    hit_share: float | None
    errors: str


NO_ROW: Final = RequestRow("", "", None, None, None, None, None, None, "")


def summarize_requests(
    results: Sequence[RunResult], kinds: Sequence[tuple[str, str, str]]
) -> list[RequestRow]:
    rows: list[RequestRow] = []
    for name in REQUEST_FILES:
        for kind, _, _ in kinds:
            runs = [r for r in results if r.size == name and r.kind == kind]
            rows.append(
                RequestRow(
                    size=name,
                    kind=kind,
                    rps=median_or_none([r.rps for r in runs]),
                    p50_ms=median_or_none([r.p50_ms for r in runs]),
                    p99_ms=median_or_none([r.p99_ms for r in runs]),
                    cpu_us_per_request=median_or_none([r.cpu_us_per_request for r in runs]),
                    cpu_percent=median_or_none(
                        [100 * r.cpu_s / r.seconds for r in runs if r.seconds]
                    ),
                    hit_share=median_or_none([r.hit_share for r in runs]),
                    errors=errors_text([r.errors for r in runs]),
                )
            )
    return rows


def print_request_tables(
    rows: Sequence[RequestRow], results: Sequence[RunResult], connections: int
) -> None:
    print()
    print(f"Requests (wrk -t 1 -c {connections}, keep-alive), medians over the rounds:")
    print()
    print(
        "| body | scenario | req/s | p50 ms | p99 ms | proxyd CPU µs/request | per round"
        " | proxyd CPU, % of one core | hits / lookups | errors |"
    )
    print("|---|---|---:|---:|---:|---:|---|---:|---:|---|")
    for row in rows:
        per_round = ", ".join(
            fmt(r.cpu_us_per_request, 1)
            for r in results
            if r.size == row.size and r.kind == row.kind
        )
        share = "-" if row.hit_share is None else f"{100 * row.hit_share:.1f}%"
        print(
            f"| {LABELS[row.size]} | {KIND_TEXT[row.kind]} | {fmt(row.rps)} | {fmt(row.p50_ms, 2)}"
            f" | {fmt(row.p99_ms, 2)} | {fmt(row.cpu_us_per_request, 1)} | {per_round}"
            f" | {fmt(row.cpu_percent)}% | {share} | {row.errors} |"
        )
    print()
    print("Ratios (same run):")
    print()
    print(
        "| body | hit/miss req/s | miss/hit CPU per request (times cheaper a hit is)"
        " | miss/relay req/s (a miss against no cache) | miss/relay CPU per request |"
    )
    print("|---|---:|---:|---:|---:|")
    by_key = {(row.size, row.kind): row for row in rows}
    for name in REQUEST_FILES:
        hit, miss, relay = (by_key.get((name, k), NO_ROW) for k in ("hit", "miss", "relay"))
        print(
            f"| {LABELS[name]} | {fmt(ratio(hit.rps, miss.rps), 2)}"
            f" | {fmt(ratio(miss.cpu_us_per_request, hit.cpu_us_per_request), 2)}"
            f" | {fmt(ratio(miss.rps, relay.rps), 2)}"
            f" | {fmt(ratio(miss.cpu_us_per_request, relay.cpu_us_per_request), 2)} |"
        )


@dataclass
class StreamRow:
    kind: str
    mib_per_s: float | None
    ttfb_ms: float | None
    cpu_s: float | None
    errors: str


def summarize_streams(
    downloads: Sequence[Download], kinds: Sequence[tuple[str, str | None, str]]
) -> list[StreamRow]:
    rows: list[StreamRow] = []
    for kind, _, _ in kinds:
        runs = [d for d in downloads if d.kind == kind]
        rows.append(
            StreamRow(
                kind=kind,
                mib_per_s=median_or_none([d.mib_per_s for d in runs]),
                ttfb_ms=median_or_none([d.ttfb_ms for d in runs]),
                cpu_s=median_or_none([d.cpu_s for d in runs]),
                errors=errors_text([d.errors for d in runs]),
            )
        )
    return rows


def print_stream_table(
    rows: Sequence[StreamRow], downloads: Sequence[Download], fill: Download | None
) -> None:
    mib = FILES[STREAM_FILE] // MIB
    print()
    print(f"Streaming one {mib} MiB object (curl, sequential downloads), medians:")
    print()
    print(
        "| download | MiB/s | per download | ÷ relayed uncached | first byte ms"
        " | proxyd CPU s per download | errors |"
    )
    print("|---|---:|---|---:|---:|---:|---|")
    # The uncached relay to compare with: a miss through the cache, or without one (--skip-cache).
    miss = next((row.mib_per_s for row in rows if row.kind in ("miss", "relay")), None)
    for row in rows:
        per = ", ".join(fmt(d.mib_per_s) for d in downloads if d.kind == row.kind)
        print(
            f"| {KIND_TEXT[row.kind]} | {fmt(row.mib_per_s)} | {per}"
            f" | {fmt(ratio(row.mib_per_s, miss), 2)} | {fmt(row.ttfb_ms, 1)}"
            f" | {fmt(row.cpu_s, 3)} | {row.errors} |"
        )
    if fill is not None:
        print(
            f"| (fill: the first request, a miss that is stored) | {fmt(fill.mib_per_s)} | |"
            f" {fmt(ratio(fill.mib_per_s, miss), 2)} | {fmt(fill.ttfb_ms, 1)}"
            f" | {fmt(fill.cpu_s, 3)} | {errors_text([fill.errors])} |"
        )


# --- main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="proxyd cache hits against misses (wrk) and 100 MiB streamed from the cache"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    parser.add_argument(
        "--connections", type=int, default=50, help="wrk keep-alive connections (default 50)"
    )
    parser.add_argument(
        "--downloads", type=int, default=3, help="100 MiB downloads per kind (default 3)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 1 round, 1 s runs, 1 download, no warm-up"
    )
    parser.add_argument(
        "--skip-cache",
        action="store_true",
        help="only the cache-off relay and direct runs (while the cache cannot run)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write every run and the medians here")
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.downloads = 1, 1, 1
    if not 1 <= args.rounds <= 50:
        parser.error("--rounds must be from 1 to 50")
    if not 1 <= args.duration <= 120:
        parser.error("--duration must be from 1 to 120 seconds")
    if not 1 <= args.connections <= 1000:
        parser.error("--connections must be from 1 to 1000")
    if not 0 <= args.downloads <= 20:
        parser.error("--downloads must be from 0 to 20")
    return args


def print_environment(pinning: Pinning, tools: dict[str, str]) -> dict[str, str]:
    env = {
        "machine": f"{os.cpu_count()} CPUs (nproc {hb.first_line(hb.run_text(['nproc']))}), "
        f"{hb.cpu_model()}, {platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "proxyd": hb.first_line(hb.run_text([sys.executable, "-m", "proxyd", "--version"])),
        "wrk": hb.first_line(hb.run_text([tools["wrk"], "-v"])),
        "nginx": hb.first_line(hb.run_text([tools["nginx"], "-v"])),
        "curl": hb.first_line(hb.run_text([tools["curl"], "--version"])),
        "pinning": pinning.description,
        "proxyd config": "defaults, access log off; cache: enabled, dir in a temp dir,"
        " max_object_size 256 MiB (no-cache: cache.enabled false)",
    }
    busy = hb.machine_busy_percent()
    env["machine busy before start"] = f"{busy:.0f}% (loadavg {os.getloadavg()[0]:.2f})"
    for key, value in env.items():
        print(f"# {key}: {value}")
    if busy > 10:
        print("# WARNING: something else is using the CPUs; the numbers will be noisy")
    return env


def print_log(proxyd: Proxyd, lines: Sequence[str]) -> None:
    print(
        f"# proxyd {proxyd.name} exit status {proxyd.proc.returncode}; "
        f"its output ({len(lines)} lines):"
    )
    shown = lines
    if len(lines) > 30:  # everything that is not INFO, then the last few
        shown = [*[ln for ln in lines[:-10] if " INFO " not in ln][:50], "...", *lines[-10:]]
    for line in shown:
        print(f"#   {line}")


def run_requests(ctx: Context, args: argparse.Namespace) -> list[RunResult]:
    results: list[RunResult] = []
    if not args.quick:
        for name in REQUEST_FILES:
            for kind, proxyd_name, _ in ctx.kinds:
                warm = measure(ctx, name, kind, proxyd_name, WARMUP_SECONDS, 0)
                bad = {k: v for k, v in warm.errors.items() if v}
                if bad:
                    print(f"# warm-up {kind} /{name} had errors: {bad}")
    for rnd in range(1, args.rounds + 1):
        for name in REQUEST_FILES:
            for kind, proxyd_name, _ in ctx.kinds:
                r = measure(ctx, name, kind, proxyd_name, args.duration, rnd)
                results.append(r)
                bad = {k: v for k, v in r.errors.items() if v}
                share = "" if r.hit_share is None else f" hits={100 * r.hit_share:.1f}%"
                print(
                    f"# round {rnd} {LABELS[name]:<6} {KIND_TEXT[kind]:<24} {r.rps:>9,.0f} req/s"
                    f" p50={r.p50_ms:.2f}ms p99={r.p99_ms:.2f}ms"
                    f" cpu={fmt(r.cpu_us_per_request, 1)}µs/req{share}"
                    + (f" ERRORS {bad}" if bad else ""),
                    flush=True,
                )
    return results


def run_streams(ctx: Context, args: argparse.Namespace) -> list[Download]:
    downloads: list[Download] = []
    for rnd in range(1, args.downloads + 1):
        for kind, proxyd_name, prefix in ctx.stream_kinds:
            query = "" if kind == "cached" else f"?u={secrets.token_hex(4)}"
            d = download(ctx, proxyd_name, f"/{prefix}/{STREAM_FILE}{query}", kind, rnd)
            downloads.append(d)
            cpu = "" if d.cpu_s is None else f" proxyd cpu={d.cpu_s:.3f}s"
            print(
                f"# download {rnd} {KIND_TEXT[kind]:<24} {d.mib_per_s:>8,.0f} MiB/s"
                f" first byte {d.ttfb_ms:.1f}ms{cpu}" + (f" ERRORS {d.errors}" if d.errors else ""),
                flush=True,
            )
    return downloads


def run(args: argparse.Namespace) -> int:
    if sys.platform != "linux":
        raise BenchError("this benchmark needs Linux (/proc, taskset)")
    tools = {
        "nginx": hb.find_or_install("nginx", "nginx-light", "/usr/sbin/nginx"),
        "wrk": hb.find_or_install("wrk", "wrk", "/usr/bin/wrk"),
        "curl": hb.find_or_install("curl", "curl", "/usr/bin/curl"),
    }
    pinning = hb.choose_pinning(not args.no_pin)
    env = print_environment(pinning, tools)
    active = ("no-cache",) if args.skip_cache else ("cache", "no-cache")
    kinds = tuple(k for k in KINDS if k[1] in active)
    stream_kinds = tuple(k for k in STREAM_KINDS if k[1] is None or k[1] in active)
    runs = args.rounds * len(REQUEST_FILES) * len(kinds)
    warm = 0 if args.quick else len(REQUEST_FILES) * len(kinds) * WARMUP_SECONDS
    print(
        f"# plan: {runs} wrk runs x {args.duration}s + {warm}s warm-up"
        f" = about {runs * args.duration + warm}s of load, then {args.downloads} x"
        f" {len(stream_kinds)} downloads of {FILES[STREAM_FILE] // MIB} MiB"
    )
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="proxyd-cache-bench-")))
        origin_port = hb.free_port()
        digests = start_nginx(tools["nginx"], tmp, origin_port, pinning, stack)
        proxyds: dict[str, Proxyd] = {}
        if "cache" in active:
            proxyds["cache"] = start_proxyd("cache", tmp, tmp / "cache", pinning, stack)
        proxyds["no-cache"] = start_proxyd("no-cache", tmp, None, pinning, stack)
        print(
            f"# origin nginx {LOOPBACK}:{origin_port}; "
            + "; ".join(
                f"proxyd {p.name} {LOOPBACK}:{p.port} (pid {p.proc.pid}, admin {p.admin_port})"
                for p in proxyds.values()
            )
        )
        ctx = Context(
            tools["wrk"],
            tools["curl"],
            pinning,
            tmp,
            origin_port,
            proxyds,
            args.connections,
            kinds,
            stream_kinds,
        )
        prepare(ctx, digests)
        for name in REQUEST_FILES:
            for kind, _, prefix in kinds:
                ctx.lua[(kind, name)] = write_lua(tmp, kind, name, prefix, origin_port)
        results = run_requests(ctx, args)
        rss = {p.name: peak_rss_mib(p.proc.pid) for p in proxyds.values()}
        downloads = run_streams(ctx, args)
        rss_after = {p.name: peak_rss_mib(p.proc.pid) for p in proxyds.values()}
        stored = scrape(proxyds["cache"]) if "cache" in proxyds else Counters()
        for proxyd in proxyds.values():
            hb.stop_process(proxyd.proc, f"proxyd {proxyd.name}")
        nginx_log = hb.tail(tmp / "nginx-error.log")
        logs = {p.name: p.log.read_text(errors="replace").splitlines() for p in proxyds.values()}
    request_rows = summarize_requests(results, kinds)
    stream_rows = summarize_streams(downloads, stream_kinds)
    print_request_tables(request_rows, results, args.connections)
    if downloads:
        print_stream_table(stream_rows, downloads, ctx.fill)
    print()
    for name in proxyds:
        print(
            f"# proxyd {name} peak RSS (VmHWM): {fmt(rss[name], 1)} MiB after the request runs,"
            f" {fmt(rss_after[name], 1)} MiB after streaming"
        )
    if "cache" in proxyds:
        print(
            "# cache lookups over the whole run: "
            + ", ".join(f"{k}={v:,.0f}" for k, v in sorted(stored.lookups.items()))
            + f"; responses stored: {stored.stored:,.0f}"
        )
    print(f"# wall time {time.monotonic() - started:.1f}s")
    for proxyd in proxyds.values():
        print_log(proxyd, logs[proxyd.name])
    if nginx_log != "(no output)":
        print(f"# nginx error log (tail):\n{nginx_log}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "environment": env,
                    "args": vars(args),
                    "requests": [asdict(row) for row in request_rows],
                    "streams": [asdict(row) for row in stream_rows],
                    "fill": asdict(ctx.fill) if ctx.fill else None,
                    "runs": [asdict(r) for r in results],
                    "downloads": [asdict(d) for d in downloads],
                    "peak_rss_mib": {"after_requests": rss, "after_streaming": rss_after},
                },
                indent=2,
            )
            + "\n"
        )
        print(f"# wrote {args.json}")
    failed = (
        any(any(r.errors.values()) for r in results)
        or any(d.errors for d in downloads)
        or bool(ctx.fill and ctx.fill.errors)
    )
    return 2 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return hb.run_main("cache_bench", lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())

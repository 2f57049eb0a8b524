"""HTTP throughput and latency through proxyd against direct to the same origin, in one run.

Run it from the repository root with the project's virtualenv active::

    python bench/http_bench.py                        # 3 rounds x 5 s per run, about 2.5 minutes
    python bench/http_bench.py --rounds 1 --duration 3 --json /tmp/bench.json

How it works:

* **Origin**: nginx (Debian's ``nginx-light``) started in the foreground by this script from a
  generated config in a temporary directory: one worker, no master process, access log off,
  keep-alive requests practically unlimited, listening on a free 127.0.0.1 port and serving the
  files ``1k`` (1024 bytes) and ``100k`` (102400 bytes). Its pid, error log and temp paths are in
  the temporary directory, so it runs as any user. If nginx is missing it is installed with
  ``apt-get install -y nginx-light`` when running as root; otherwise the script exits saying so.
* **proxyd**: ``python -m proxyd --config TMP/proxyd.yaml`` listening on a free 127.0.0.1 port, the
  admin listener on another, **the access log off** (``access_log: {enabled: false}``) and
  everything else at its defaults. The script waits (at most 10 s) for the port to accept.
* **Load**: ``wrk -t 1`` with ``-c 50`` (keep-alive, 50 connections) and ``-c 1`` (one
  connection), for the 1 KiB and the 100 KiB file, each direct to nginx and through proxyd. wrk has
  no proxy option, so the proxied runs connect wrk to proxyd and a generated Lua script sets
  ``wrk.path`` to the absolute-form URL of the origin (``http://127.0.0.1:PORT/1k``) and the
  ``Host`` header to the origin. Every Lua script has a ``done()`` function that prints one
  machine-readable ``BENCH ...`` line (requests, duration, bytes, p50/p99, socket and status
  errors), which is what gets parsed.
* **Pinning**: with ``taskset`` and at least two usable CPUs, proxyd runs on the first CPU and nginx
  and wrk share the second, so proxyd's number is one core's worth of work.
* **Rounds**: after a short warm-up, each round runs every scenario direct then through proxyd
  (interleaved, so drift hits both alike); the table shows the median over ``--rounds``.
* **Errors are never hidden**: the errors column adds up wrk's connect/read/write/timeout errors,
  wrk's status errors (HTTP status >= 400), responses shorter than the file (bytes read below
  requests x file size), and for proxyd the non-2xx answers and ``proxyd_errors_total`` counted
  from its own ``/metrics`` before and after each run.
* **CPU per request**: ``utime + stime`` of the proxyd process from ``/proc/PID/stat`` is read just
  before and just after each proxyd run; the CPU time divided by the requests wrk completed is the
  proxyd CPU cost per request in microseconds (clock-tick resolution, 10 ms per run at worst).

Everything started here is stopped by pid at the end (terminate, then kill after a timeout), also
on Ctrl-C or an error. Only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

REPO_ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
FILES: dict[str, int] = {"1k": 1024, "100k": 102400}
FILE_LABELS: dict[str, str] = {"1k": "1 KiB", "100k": "100 KiB"}
CONNECTIONS: dict[str, int] = {"keep-alive c50": 50, "one connection c1": 1}
TARGETS = ("direct", "proxyd")
STARTUP_WAIT = 10.0
STOP_WAIT = 5.0
WARMUP_SECONDS = 1
WRK_ERROR_KINDS = ("connect", "read", "write", "status", "timeout")

# --- small helpers -----------------------------------------------------------------------------


class BenchError(Exception):
    """A fatal problem: the message is printed and the script exits with status 1."""


def free_port() -> int:
    """A currently free TCP port on the loopback address (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def run_text(cmd: Sequence[str], timeout: float = 10.0) -> str:
    """Run a short command and return stdout + stderr (or an error text, never raising)."""
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False, stdin=None
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"({cmd[0]}: {exc})"
    return (done.stdout + done.stderr).strip()


def first_line(text: str) -> str:
    return text.splitlines()[0].strip() if text.strip() else "(nothing)"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_busy_percent(seconds: float = 1.0) -> float:
    """How busy all CPUs together were over ``seconds`` (from /proc/stat), in percent."""

    def sample() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = values[3] + values[4]  # idle + iowait
        return sum(values[:8]), idle

    total_a, idle_a = sample()
    time.sleep(seconds)
    total_b, idle_b = sample()
    total = total_b - total_a
    return 100.0 * (total - (idle_b - idle_a)) / total if total > 0 else 0.0


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) from /proc/PID/stat, in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) is in parentheses and may hold spaces: split after its end.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of the whole line
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def wait_for_port(port: int, proc: subprocess.Popen[bytes], name: str, log: Path) -> None:
    """Return once 127.0.0.1:port accepts a connection; raise if proc exits or time runs out."""
    deadline = time.monotonic() + STARTUP_WAIT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(
                f"{name} exited with status {proc.returncode} while starting:\n{tail(log)}"
            )
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"{name} did not accept on {LOOPBACK}:{port} within {STARTUP_WAIT:.0f}s")


def tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no output)"
    return "\n".join(text.splitlines()[-lines:]) or "(no output)"


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


def find_or_install(binary: str, package: str, fallback: str) -> str:
    """The path of ``binary``; installs ``package`` with apt-get when missing and root."""
    path = shutil.which(binary) or (fallback if os.access(fallback, os.X_OK) else None)
    if path:
        return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"# {binary} not found: apt-get install -y {package}")
        try:
            subprocess.run(
                ["apt-get", "install", "-y", package],
                check=True,
                timeout=300,
                stdout=subprocess.DEVNULL,
                env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise BenchError(f"installing {package} failed: {exc}") from None
        path = shutil.which(binary) or (fallback if os.access(fallback, os.X_OK) else None)
        if path:
            return path
    raise BenchError(
        f"{binary} is not installed; install it first (Debian: `sudo apt-get install {package}`)"
    )


# --- CPU pinning -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pinning:
    proxy_prefix: tuple[str, ...]
    load_prefix: tuple[str, ...]
    description: str


def choose_pinning(enabled: bool) -> Pinning:
    if not enabled:
        return Pinning((), (), "none (--no-pin)")
    taskset = shutil.which("taskset")
    if taskset is None:
        return Pinning((), (), "none (taskset not found)")
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return Pinning((), (), f"none (only CPU {cpus} usable)")
    proxy_cpu, load_cpu = str(cpus[0]), str(cpus[1])
    return Pinning(
        (taskset, "-c", proxy_cpu),
        (taskset, "-c", load_cpu),
        f"proxyd on CPU {proxy_cpu}; nginx and wrk on CPU {load_cpu} (taskset)",
    )


# --- the origin (nginx) and proxyd ---------------------------------------------------------------


NGINX_CONF = """\
# Generated by bench/http_bench.py: a throwaway static origin for benchmarks.
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
        root {tmp}/www;
        location / {{ }}
    }}
}}
"""


def nginx_temp_paths(nginx: str, tmp: Path) -> str:
    """``*_temp_path`` lines for the modules this nginx has, so it never needs /var/lib/nginx."""
    built = run_text([nginx, "-V"])
    lines = []
    for kind in ("client-body", "proxy", "fastcgi", "uwsgi", "scgi"):
        if f"--http-{kind}-temp-path" in built:
            directive = kind.replace("-", "_") + "_temp_path"
            (tmp / f"{kind}-temp").mkdir(exist_ok=True)
            lines.append(f"    {directive} {tmp}/{kind}-temp;")
    return "\n".join(lines)


def start_nginx(
    nginx: str, tmp: Path, port: int, pinning: Pinning, stack: contextlib.ExitStack
) -> subprocess.Popen[bytes]:
    www = tmp / "www"
    www.mkdir()
    for name, size in FILES.items():
        (www / name).write_bytes(bytes(i % 251 for i in range(size)))
    conf = tmp / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            tmp=tmp, host=LOOPBACK, port=port, temp_paths=nginx_temp_paths(nginx, tmp)
        )
    )
    log = tmp / "nginx-stderr.log"
    out = stack.enter_context(log.open("wb"))
    proc = subprocess.Popen(
        [
            *pinning.load_prefix,
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
    stack.callback(stop_process, proc, "nginx")
    wait_for_port(port, proc, "nginx", tmp / "nginx-error.log")
    return proc


def start_proxyd(
    tmp: Path, port: int, admin_port: int, pinning: Pinning, stack: contextlib.ExitStack
) -> subprocess.Popen[bytes]:
    config = tmp / "proxyd.yaml"
    config.write_text(
        "# Generated by bench/http_bench.py\n"
        f'listen: ["{LOOPBACK}:{port}"]\n'
        f'admin: {{listen: "{LOOPBACK}:{admin_port}"}}\n'
        "access_log: {enabled: false}\n"
    )
    log = tmp / "proxyd-stderr.log"
    out: IO[bytes] = stack.enter_context(log.open("wb"))
    proc = subprocess.Popen(
        [*pinning.proxy_prefix, sys.executable, "-m", "proxyd", "--config", str(config)],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    stack.callback(stop_process, proc, "proxyd")
    wait_for_port(port, proc, "proxyd", log)
    wait_for_port(admin_port, proc, "proxyd admin", log)
    return proc


def check_through_proxy(proxy_port: int, origin_port: int, name: str) -> None:
    """One request through proxyd by hand: it must be a 200 with exactly the file's bytes."""
    request = (
        f"GET http://{LOOPBACK}:{origin_port}/{name} HTTP/1.1\r\n"
        f"Host: {LOOPBACK}:{origin_port}\r\nConnection: close\r\n\r\n"
    ).encode()
    chunks: list[bytes] = []
    with socket.create_connection((LOOPBACK, proxy_port), timeout=5) as sock:
        sock.sendall(request)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    expected = bytes(i % 251 for i in range(FILES[name]))
    if not status_line.startswith("HTTP/1.1 200") or body != expected:
        raise BenchError(
            f"sanity check through proxyd failed for /{name}: {status_line!r}, "
            f"{len(body)} body bytes (expected 200 and {len(expected)} bytes)"
        )


# --- proxyd's own metrics ----------------------------------------------------------------------

METRIC_LINE = re.compile(r"^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


@dataclass
class ProxydCounters:
    non_2xx: float = 0.0
    errors: float = 0.0
    upstream_connects: float = 0.0
    upstream_reuses: float = 0.0

    def minus(self, other: ProxydCounters) -> ProxydCounters:
        return ProxydCounters(
            self.non_2xx - other.non_2xx,
            self.errors - other.errors,
            self.upstream_connects - other.upstream_connects,
            self.upstream_reuses - other.upstream_reuses,
        )


def scrape_proxyd(admin_port: int) -> ProxydCounters:
    # http.client rather than urllib: urllib sends "Connection: close", which proxyd's admin
    # listener (0.1.0) answers by closing the connection without a response.
    conn = http.client.HTTPConnection(LOOPBACK, admin_port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        text = response.read().decode()
    finally:
        conn.close()
    if response.status != 200:
        raise BenchError(f"proxyd admin /metrics answered {response.status}")
    counters = ProxydCounters()
    for line in text.splitlines():
        match = METRIC_LINE.match(line)
        if match is None:
            continue
        name, labels, value = match["name"], match["labels"] or "", float(match["value"])
        if name == "proxyd_requests_total" and 'status_class="2xx"' not in labels:
            counters.non_2xx += value
        elif name == "proxyd_errors_total":
            counters.errors += value
        elif name == "proxyd_upstream_connects_total":
            counters.upstream_connects += value
        elif name == "proxyd_upstream_reused_total":
            counters.upstream_reuses += value
    return counters


# --- wrk ---------------------------------------------------------------------------------------

LUA_DONE = """\
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d bytes=%d p50_us=%.1f p99_us=%.1f "
      .. "connect=%d read=%d write=%d status=%d timeout=%d\\n",
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def write_lua(tmp: Path, target: str, name: str, origin_port: int) -> Path:
    path = tmp / f"wrk-{target}-{name}.lua"
    lines = ["-- Generated by bench/http_bench.py", 'wrk.method = "GET"']
    if target == "proxyd":
        # Absolute form: wrk talks to proxyd, the request names the origin.
        lines.append(f'wrk.path = "http://{LOOPBACK}:{origin_port}/{name}"')
        lines.append(f'wrk.headers["Host"] = "{LOOPBACK}:{origin_port}"')
    path.write_text("\n".join(lines) + "\n" + LUA_DONE)
    return path


@dataclass
class RunResult:
    scenario: str
    target: str
    round: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: dict[str, int]
    proxyd_cpu_s: float | None = None
    proxyd_cpu_us_per_request: float | None = None
    upstream_connects: int | None = None
    upstream_reuses: int | None = None


BENCH_LINE = re.compile(r"^BENCH (.*)$", re.MULTILINE)


def run_wrk(
    wrk: str,
    pinning: Pinning,
    port: int,
    name: str,
    connections: int,
    seconds: int,
    lua: Path,
) -> dict[str, float]:
    cmd = [
        *pinning.load_prefix,
        wrk,
        "-t",
        "1",
        "-c",
        str(connections),
        "-d",
        f"{seconds}s",
        "--latency",
        "-s",
        str(lua),
        f"http://{LOOPBACK}:{port}/{name}",
    ]
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=seconds + 30, check=False
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk did not finish in {seconds + 30}s: {' '.join(cmd)}") from None
    match = BENCH_LINE.search(done.stdout)
    if done.returncode != 0 or match is None:
        raise BenchError(
            f"wrk failed (status {done.returncode}): {' '.join(cmd)}\n{done.stdout}{done.stderr}"
        )
    values: dict[str, float] = {}
    for item in match.group(1).split():
        key, _, value = item.partition("=")
        values[key] = float(value)
    return values


@dataclass
class Context:
    wrk: str
    pinning: Pinning
    tmp: Path
    origin_port: int
    proxy_port: int
    admin_port: int
    proxyd: subprocess.Popen[bytes]
    lua: dict[tuple[str, str], Path] = field(default_factory=dict)


def measure(
    ctx: Context, scenario: str, target: str, name: str, connections: int, seconds: int, rnd: int
) -> RunResult:
    port = ctx.origin_port if target == "direct" else ctx.proxy_port
    lua = ctx.lua[(target, name)]
    before_counters = scrape_proxyd(ctx.admin_port) if target == "proxyd" else None
    cpu_before = process_cpu_seconds(ctx.proxyd.pid)
    values = run_wrk(ctx.wrk, ctx.pinning, port, name, connections, seconds, lua)
    cpu_after = process_cpu_seconds(ctx.proxyd.pid)
    if ctx.proxyd.poll() is not None:
        raise BenchError(
            f"proxyd exited (status {ctx.proxyd.returncode}) during {scenario} {target}:\n"
            + tail(ctx.tmp / "proxyd-stderr.log")
        )
    requests = int(values["requests"])
    elapsed = values["duration_us"] / 1e6
    errors = {kind: int(values[kind]) for kind in WRK_ERROR_KINDS}
    if values["bytes"] < requests * FILES[name]:
        errors["short"] = 1  # some responses carried less than the file: not what was asked
    result = RunResult(
        scenario=scenario,
        target=target,
        round=rnd,
        requests=requests,
        seconds=elapsed,
        rps=requests / elapsed if elapsed > 0 else 0.0,
        p50_ms=values["p50_us"] / 1000,
        p99_ms=values["p99_us"] / 1000,
        errors=errors,
    )
    if before_counters is not None:
        delta = scrape_proxyd(ctx.admin_port).minus(before_counters)
        errors["proxyd_non2xx"] = int(delta.non_2xx)
        errors["proxyd_errors"] = int(delta.errors)
        result.proxyd_cpu_s = cpu_after - cpu_before
        if requests:
            result.proxyd_cpu_us_per_request = result.proxyd_cpu_s * 1e6 / requests
        result.upstream_connects = int(delta.upstream_connects)
        result.upstream_reuses = int(delta.upstream_reuses)
    return result


# --- reporting ---------------------------------------------------------------------------------


def median_or_none(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def errors_text(results: Sequence[RunResult]) -> str:
    parts: list[str] = []
    for target in TARGETS:
        totals: dict[str, int] = {}
        for result in results:
            if result.target == target:
                for kind, count in result.errors.items():
                    totals[kind] = totals.get(kind, 0) + count
        nonzero = [f"{kind}={count}" for kind, count in totals.items() if count]
        if nonzero:
            parts.append(f"{target}: {' '.join(nonzero)}")
    return "; ".join(parts) or "none"


def scenarios() -> Iterator[tuple[str, str, int]]:
    for name in FILES:
        for conn_label, connections in CONNECTIONS.items():
            yield f"{FILE_LABELS[name]} {conn_label}", name, connections


@dataclass
class Summary:
    scenario: str
    direct_rps: float | None
    proxyd_rps: float | None
    ratio: float | None
    direct_p50_ms: float | None
    proxyd_p50_ms: float | None
    direct_p99_ms: float | None
    proxyd_p99_ms: float | None
    errors: str
    proxyd_cpu_us_per_request: float | None
    proxyd_cpu_percent: float | None


def summarize(results: Sequence[RunResult]) -> list[Summary]:
    rows: list[Summary] = []
    for scenario, _, _ in scenarios():
        runs = [r for r in results if r.scenario == scenario]
        d = [r for r in runs if r.target == "direct"]
        p = [r for r in runs if r.target == "proxyd"]
        d_rps, p_rps = median_or_none([r.rps for r in d]), median_or_none([r.rps for r in p])
        busy = [100 * r.proxyd_cpu_s / r.seconds for r in p if r.proxyd_cpu_s and r.seconds]
        rows.append(
            Summary(
                scenario=scenario,
                direct_rps=d_rps,
                proxyd_rps=p_rps,
                ratio=p_rps / d_rps if d_rps and p_rps is not None else None,
                direct_p50_ms=median_or_none([r.p50_ms for r in d]),
                proxyd_p50_ms=median_or_none([r.p50_ms for r in p]),
                direct_p99_ms=median_or_none([r.p99_ms for r in d]),
                proxyd_p99_ms=median_or_none([r.p99_ms for r in p]),
                errors=errors_text(runs),
                proxyd_cpu_us_per_request=median_or_none([r.proxyd_cpu_us_per_request for r in p]),
                proxyd_cpu_percent=median_or_none(busy),
            )
        )
    return rows


def print_tables(rows: Sequence[Summary], results: Sequence[RunResult]) -> None:
    print()
    print(
        "| scenario | direct req/s | proxyd req/s | proxyd/direct | direct p50 ms | proxyd p50 ms"
        " | direct p99 ms | proxyd p99 ms | errors |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        print(
            f"| {row.scenario} | {fmt(row.direct_rps)} | {fmt(row.proxyd_rps)} "
            f"| {fmt(row.ratio, 3)} | {fmt(row.direct_p50_ms, 2)} | {fmt(row.proxyd_p50_ms, 2)} "
            f"| {fmt(row.direct_p99_ms, 2)} | {fmt(row.proxyd_p99_ms, 2)} | {row.errors} |"
        )
    print()
    print("proxyd CPU time per request (utime+stime of the proxyd process over each proxyd run):")
    print()
    print(
        "| scenario | proxyd CPU µs/request (median) | per round | proxyd CPU, % of one core"
        " | new upstream connections per run |"
    )
    print("|---|---:|---|---:|---|")
    for row in rows:
        p = [r for r in results if r.scenario == row.scenario and r.target == "proxyd"]
        per_round = ", ".join(fmt(r.proxyd_cpu_us_per_request, 1) for r in p)
        connects = ", ".join(str(r.upstream_connects) for r in p)
        print(
            f"| {row.scenario} | {fmt(row.proxyd_cpu_us_per_request, 1)} | {per_round} "
            f"| {fmt(row.proxyd_cpu_percent)}% | {connects} |"
        )


# --- main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="wrk through proxyd vs direct to one nginx origin; prints a markdown table."
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    parser.add_argument("--json", metavar="FILE", help="also write every run and the medians here")
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= 50:
        parser.error("--rounds must be from 1 to 50")
    if not 1 <= args.duration <= 120:
        parser.error("--duration must be from 1 to 120 seconds")
    return args


def print_environment(pinning: Pinning, nginx: str, wrk: str) -> dict[str, str]:
    env = {
        "machine": f"{os.cpu_count()} CPUs (nproc {first_line(run_text(['nproc']))}), "
        f"{cpu_model()}, {platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "proxyd": first_line(run_text([sys.executable, "-m", "proxyd", "--version"])),
        "wrk": first_line(run_text([wrk, "-v"])),
        "nginx": first_line(run_text([nginx, "-v"])),
        "pinning": pinning.description,
        "proxyd config": "defaults, access log OFF (access_log.enabled: false)",
    }
    busy = machine_busy_percent()
    env["machine busy before start"] = f"{busy:.0f}% (loadavg {os.getloadavg()[0]:.2f})"
    for key, value in env.items():
        print(f"# {key}: {value}")
    if busy > 10:
        print("# WARNING: something else is using the CPUs; the numbers will be noisy")
    return env


def run(args: argparse.Namespace) -> int:
    if sys.platform != "linux":
        raise BenchError("this benchmark needs Linux (/proc, taskset)")
    nginx = find_or_install("nginx", "nginx-light", "/usr/sbin/nginx")
    wrk = find_or_install("wrk", "wrk", "/usr/bin/wrk")
    pinning = choose_pinning(not args.no_pin)
    env = print_environment(pinning, nginx, wrk)
    runs_total = args.rounds * len(FILES) * len(CONNECTIONS) * len(TARGETS)
    warmups = len(FILES) * len(TARGETS)
    print(
        f"# plan: {args.rounds} round(s) x {runs_total // args.rounds} runs x {args.duration}s"
        f" + {warmups} warm-ups x {WARMUP_SECONDS}s"
        f" = about {runs_total * args.duration + warmups * WARMUP_SECONDS}s of load"
    )
    results: list[RunResult] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="proxyd-bench-")))
        origin_port, proxy_port, admin_port = free_port(), free_port(), free_port()
        start_nginx(nginx, tmp, origin_port, pinning, stack)
        proxyd = start_proxyd(tmp, proxy_port, admin_port, pinning, stack)
        print(
            f"# origin nginx {LOOPBACK}:{origin_port}, proxyd {LOOPBACK}:{proxy_port} "
            f"(pid {proxyd.pid}), admin {LOOPBACK}:{admin_port}"
        )
        ctx = Context(wrk, pinning, tmp, origin_port, proxy_port, admin_port, proxyd)
        for name in FILES:
            check_through_proxy(proxy_port, origin_port, name)
            for target in TARGETS:
                ctx.lua[(target, name)] = write_lua(tmp, target, name, origin_port)
        for name in FILES:
            for target in TARGETS:
                warm = measure(ctx, "warm-up", target, name, 50, WARMUP_SECONDS, 0)
                if any(warm.errors.values()):
                    print(f"# warm-up {target} /{name} had errors: {warm.errors}")
        for rnd in range(1, args.rounds + 1):
            for scenario, name, connections in scenarios():
                for target in TARGETS:
                    result = measure(ctx, scenario, target, name, connections, args.duration, rnd)
                    results.append(result)
                    cpu = (
                        f" cpu={fmt(result.proxyd_cpu_us_per_request, 1)}µs/req"
                        if result.proxyd_cpu_us_per_request is not None
                        else ""
                    )
                    bad = {k: v for k, v in result.errors.items() if v}
                    print(
                        f"# round {rnd} {scenario:<28} {target:<6} {result.rps:>10,.0f} req/s "
                        f"p50={result.p50_ms:.2f}ms p99={result.p99_ms:.2f}ms{cpu}"
                        + (f" ERRORS {bad}" if bad else ""),
                        flush=True,
                    )
        stop_process(proxyd, "proxyd")
        proxyd_log = (tmp / "proxyd-stderr.log").read_text(errors="replace").splitlines()
        nginx_log = tail(tmp / "nginx-error.log")
    summary = summarize(results)
    print_tables(summary, results)
    print()
    print(f"# proxyd exit status {proxyd.returncode}; its output ({len(proxyd_log)} lines):")
    # Everything if short; otherwise every line that is not INFO, then the last few.
    shown = proxyd_log
    if len(proxyd_log) > 30:
        notable = [line for line in proxyd_log[:-10] if " INFO " not in line][:50]
        shown = [*notable, "...", *proxyd_log[-10:]]
    for line in shown:
        print(f"#   {line}")
    if nginx_log != "(no output)":
        print(f"# nginx error log (tail):\n{nginx_log}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "environment": env,
                    "rounds": args.rounds,
                    "duration_s": args.duration,
                    "summary": [asdict(row) for row in summary],
                    "runs": [asdict(r) for r in results],
                },
                indent=2,
            )
            + "\n"
        )
        print(f"# wrote {args.json}")
    failed = any(any(r.errors.values()) for r in results)
    return 2 if failed else 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C, so everything started gets stopped


def run_main(name: str, run_once: Callable[[], int]) -> int:
    """The shared shape of a benchmark's main: SIGTERM unwinds like Ctrl-C, a ``BenchError``
    is a clear message and exit 1, an interruption exit 130 after everything was stopped."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run_once()
    except BenchError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted; everything started was stopped", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main("http_bench", lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())

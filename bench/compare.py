"""proxyd against direct-to-origin and its peers (Squid, tinyproxy, proxy.py, mitmproxy), one run.

Run it from the repository root with the project's virtualenv active::

    python bench/compare.py                          # the whole comparison, 7-9 minutes
    python bench/compare.py --quick                  # smoke run, about 2 minutes
    python bench/compare.py --report bench/RESULTS.md --json /tmp/compare.json
    python bench/compare.py --phases http,ws --peers squid   # a part of it
    python bench/compare.py --report bench/RESULTS.md --memory-json /tmp/mb.json

The question it answers: how does proxyd compare with the proxies users choose between, measured
on the same machine, in the same run, with the same origin and the same load generator -- and does
it meet the targets of issue 7 (``targets_of`` below, printed with PASS/FAIL)?

How it works (the helpers -- nginx, wrk and its Lua ``done()`` line, CPU pinning, /proc CPU time,
process stopping, the WebSocket origin and clients, the PAC and ``workers:`` benchmarks -- are
imported from the other modules of ``bench/``, so every benchmark measures the same way):

* **Peers, installed on demand**: ``squid`` and ``tinyproxy`` from Debian (``apt-get install``
  when missing and root; a temporary ``/usr/sbin/policy-rc.d`` keeps apt from starting Squid as a
  service), ``proxy.py`` and ``mitmproxy`` from PyPI, each into its own virtualenv under
  ``~/.cache/proxyd-bench/`` (created on first use and reused). A peer that cannot be installed or
  started is left out, and the tables say why.
* **Fair configurations**, all on 127.0.0.1, every log off or to a file nobody reads, keep-alive on,
  no authentication, CONNECT allowed to any port (the origin's port is ephemeral):

  - ``proxyd``: ``python -m proxyd``, access log off, ``log_level: warning``, the rest at its
    defaults (cache off, one worker); only capacity limits raised for the idle-connection tests
    (``client.max_connections``, ``pool.tunnels_per_host``). ``proxyd-cache`` adds
    ``cache.enabled: true`` with the cache directory in the temporary directory.
  - ``squid -N`` (one process, no daemon): ``access_log none``, ``cache deny all`` for the relay
    instance; ``squid-cache`` has a 256 MB memory cache (objects up to 4 MB in memory, no disk
    cache). ``dns_nameservers 127.0.0.1`` so nothing can leave the machine; pinger and cache
    digests off; ``shutdown_lifetime 1 seconds`` so it stops quickly.
  - ``tinyproxy -d``: ``LogLevel Critical``, ``MaxClients`` raised.
  - ``proxy.py``: its defaults plus ``--num-workers 1`` (the single-core comparison),
    ``--log-level WARNING`` (no access log lines), ``--open-file-limit`` raised and ``--timeout
    60`` (proxyd's client idle timeout; its 10 s would drop the memory test's idle clients).
  - ``mitmdump -q`` in regular mode with ``connection_strategy=lazy`` and
    ``stream_large_bodies=1m`` (without it mitmproxy holds every body in memory, and the 1 GiB
    tunnel download would measure its buffering).

* **Origin**: nginx (one worker, access log off, sendfile) serving ``1k``, ``100k`` and ``1m``
  at ``/``, the same under ``/cached/`` with ``Cache-Control: max-age=3600`` (RFC 9111 §5.2.2.1)
  and under ``/nostore/`` with ``no-store`` (§5.2.2.5), and a sparse file for the tunnel. The
  WebSocket origin is ``ws_bench.py``'s (an asyncio echo server in this process).
* **Pinning**: with ``taskset`` and two usable CPUs, every proxy runs on the first CPU; nginx,
  wrk and this process (the tunnel and WebSocket clients, the WebSocket origin) on the second. A
  proxy that forks (proxy.py) keeps its children on its CPU, and its CPU time and RSS are summed
  over its process tree. The ``workers:`` phase unpins everything (N workers need N cores).
* **Rounds**: after a warm-up, each round runs every scenario against every target in turn (A B C
  A B C ...), so drift on a shared machine hits all of them alike; tables show medians over
  ``--rounds`` and the ratio of each target to proxyd (``x`` = target ÷ proxyd).

The phases, in order (``--phases`` picks some):

1. ``http`` -- wrk ``-t 1``, 1 KiB and 100 KiB over 50 keep-alive connections (req/s and the
   proxy's CPU µs per request from ``/proc/PID/stat``), and 1 KiB over one connection (p50/p99).
2. ``cache`` -- wrk ``-c 50``: 1 KiB and 1 MiB hits (one ``/cached/`` URL, stored and verified
   as a hit before the load) against misses (``/nostore/...?u=N``, a new key per request) through
   ``proxyd-cache``, and Squid's hits (and its 1 KiB misses) through ``squid-cache``. proxyd's
   hit share comes from its ``/metrics``; Squid's hits are checked with ``X-Cache`` before and
   after each run.
3. ``tunnel`` -- one download of ``--tunnel-mib`` MiB (1 GiB) per target per round: CONNECT, then
   a plain GET inside the tunnel, read with ``recv_into`` a 1 MiB buffer by a small client in this
   process (curl reads 16 KiB at a time and would measure itself), bounded by
   ``--tunnel-max-time``: MB/s.
4. ``ws`` -- WebSocket echo with ``--ws-window`` (100) messages in flight on one connection, 64 B
   and 64 KiB, through proxyd's session relay (CONNECT + plaintext upgrade, relayed frame by
   frame), Squid's raw CONNECT tunnel and mitmproxy (frame-aware), plus direct; then the cost of
   opening a session (sequential CONNECT + upgrade until the 101, in ms) through every proxy.
5. ``memory`` -- for each proxy a fresh process (RSS never shrinks, so a used one would hide the
   growth): ``--idle-clients`` (5,000) keep-alive clients that each made one request and then sit
   idle, RSS delta / clients still open; then another fresh process and ``--idle-sessions``
   (1,000) idle WebSocket sessions. Opening stops after 20 s (a slow proxy is measured with what
   opened, and the table says how many). RLIMIT_NOFILE is raised (inherited by everything).
6. ``pac`` -- ``pac_bench.py``'s corporate PAC file: µs per decision (engine alone, the router
   uncached and cached), on the proxy's CPU.
7. ``workers`` -- ``workers_bench.py``: ``workers: 2`` against ``workers: 1`` (unpinned).

Two targets of issue 7 need runs far longer than a comparison: "RSS flat (within 5%) over a
10-minute soak at steady load" and "CPU per request and memory do not grow with the number of
pooled groups, cached entries or open sessions (10 and 10,000)". ``memory_bench.py`` measures
them (its ``soak`` and ``scaling`` parts) and writes a JSON file; ``--memory-json FILE``
(repeatable; a later file's soak or dimension replaces an earlier one's; read and checked before
anything runs, with any ``--phases``) puts them into the report: a "Soak" section (duration,
warm-up, load, RSS first/last medians, growth, slope, samples, CPU µs/request, errors), a
"Scaling" section (per dimension, 10 against 10,000: req/s, CPU µs/request, RSS, the large/small
ratios and the RSS per extra item against its budget, ``SCALE_RSS_BUDGET_KIB``), the command and
start time of each memory_bench run under "Machine and versions", and two rows in the targets
table. The soak passes when its growth is within ±5 % and it ran ≥ 600 s (shorter: n/a); the
scaling row when every dimension has CPU µs/request large/small ≤ 1.25 and RSS per extra item
within what one item holds. Those runs are their own: their errors are shown, not counted in
this run's exit status.

Every loop is bounded in count and time (wrk by ``--duration`` plus a hard timeout, tunnel
downloads by ``--tunnel-max-time``, WebSocket runs by their duration and a grace period, idle
opens by a deadline); only loopback addresses are used; everything started here is stopped by
pid (a proxy's children by the pids recorded from its process tree), also on Ctrl-C or an error,
and the temporary directory is removed. How busy the machine was before the start, and how much
CPU other processes used during the run, are printed: on a shared machine the numbers are noisy.
Exit status: 0 clean, 2 if any run had errors, 1 when the comparison could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import http.client
import itertools
import json
import os
import platform
import pwd
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
from typing import IO, Final

from bench import cache_bench as cb
from bench import http_bench as hb
from bench import pac_bench as pb
from bench import workers_bench as wkb
from bench import ws_bench as wb
from bench.http_bench import LOOPBACK, REPO_ROOT, BenchError, Pinning, fmt, median_or_none

KIB: Final = 1024
MIB: Final = 1 << 20
#: Where the PyPI peers' virtualenvs live (created on first use, reused afterwards).
CACHE_HOME: Final = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
PEERS: Final = ("squid", "tinyproxy", "proxy.py", "mitmproxy")
PHASES: Final = ("http", "cache", "tunnel", "ws", "memory", "pac", "workers")
#: Files the origin serves (at /, /cached/ and /nostore/); same bytes as http_bench.py's.
FILES: Final[dict[str, int]] = {"1k": KIB, "100k": 100 * KIB, "1m": MIB}
HTTP_SCENARIOS: Final[tuple[tuple[str, str, int], ...]] = (
    ("1 KiB keep-alive c50", "1k", 50),
    ("100 KiB keep-alive c50", "100k", 50),
    ("1 KiB one connection c1", "1k", 1),
)
#: (scenario, proxy instance, kind, file): kind "hit" repeats one /cached/ URL, "miss" is a new
#: /nostore/ key per request (cache_bench.write_lua).
CACHE_SCENARIOS: Final[tuple[tuple[str, str, str, str], ...]] = (
    ("1 KiB hit", "proxyd", "hit", "1k"),
    ("1 KiB miss", "proxyd", "miss", "1k"),
    ("1 KiB hit", "squid", "hit", "1k"),
    ("1 KiB miss", "squid", "miss", "1k"),
    ("1 MiB hit", "proxyd", "hit", "1m"),
    ("1 MiB miss", "proxyd", "miss", "1m"),
    ("1 MiB hit", "squid", "hit", "1m"),
)
CACHE_CONNECTIONS: Final = 50
WS_SIZES: Final[dict[str, int]] = {"64 B": 64, "64 KiB": 64 * KIB}
#: Targets of the WebSocket echo: proxyd's session relay, Squid's raw tunnel, mitmproxy's relay.
WS_ECHO_TARGETS: Final = ("direct", "proxyd", "squid", "mitmproxy")
WS_RUN_GRACE: Final = 15.0
WS_MAX_ROUND_TRIPS: Final = 5_000_000
STORE_WAIT: Final = 10.0
IDLE_OPEN_CONCURRENCY: Final = 50  # below proxy.py's default listen backlog (100)
#: Opening the idle clients of one proxy stops here (a slow proxy is measured with what opened).
IDLE_OPEN_DEADLINE: Final = 20.0
IDLE_SETTLE: Final = 1.0
TREE_STOP_WAIT: Final = 3.0
STARTUP_ATTEMPTS: Final = 3  # of http_bench.wait_for_port's 10 s each
INSTALL_TIMEOUT: Final = 900
POLICY_RC_D: Final = Path("/usr/sbin/policy-rc.d")


# --- processes: a proxy and its process tree --------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (after the parenthesised name), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (from the parent pids in /proc), root first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, queue = [root], [root]
    while queue:
        for child in children.get(queue.pop(), []):
            tree.append(child)
            queue.append(child)
    return tree


def tree_cpu_seconds(root: int) -> float:
    """utime + stime summed over a process tree (a forking proxy's children count too)."""
    total = 0.0
    for pid in process_tree(root):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += hb.process_cpu_seconds(pid)
    return total


def tree_rss_bytes(root: int) -> int:
    total = 0
    for pid in process_tree(root):
        with contextlib.suppress(OSError, BenchError, ValueError):
            total += wb.process_rss_bytes(pid)
    return total


def stop_tree(proc: subprocess.Popen[bytes], name: str) -> None:
    """Stop a proxy by pid, then any of its children still running (by the pids recorded now,
    each checked against its start time so a reused pid is never signalled)."""
    if proc.poll() is not None:
        return
    children = [(pid, (_stat_fields(pid) or ["?"] * 20)[19]) for pid in process_tree(proc.pid)[1:]]
    hb.stop_process(proc, name)
    deadline = time.monotonic() + TREE_STOP_WAIT
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, started in children:
            fields = _stat_fields(pid)
            if fields is not None and fields[19] == started and fields[0] != "Z":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        while time.monotonic() < deadline and any(
            (f := _stat_fields(pid)) is not None and f[19] == s and f[0] != "Z"
            for pid, s in children
        ):
            time.sleep(0.05)
        deadline = time.monotonic() + TREE_STOP_WAIT


@dataclass
class Proxy:
    """One running proxy under test (pinned to the proxy CPU)."""

    name: str  # the target name in the tables: proxyd, squid, tinyproxy, proxy.py, mitmproxy
    label: str  # this instance: proxyd-cache, squid-idle-http, ...
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    admin_port: int | None = None  # proxyd only

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.proc.pid)

    def rss_bytes(self) -> int:
        return tree_rss_bytes(self.proc.pid)

    def exited(self) -> str | None:
        if self.proc.poll() is None:
            return None
        return f"{self.label} exited with status {self.proc.returncode}: {hb.tail(self.log, 5)}"


# --- peers: found or installed on demand --------------------------------------------------------


@dataclass
class Tools:
    nginx: str
    wrk: str
    peers: dict[str, str] = field(default_factory=dict)  # peer -> its executable
    missing: dict[str, str] = field(default_factory=dict)  # peer -> why it is not measured


def install_debian(binary: str, package: str, fallback: str) -> str:
    """``hb.find_or_install``, with apt kept from starting the package as a service."""
    if shutil.which(binary) or os.access(fallback, os.X_OK) or os.geteuid() != 0:
        return hb.find_or_install(binary, package, fallback)
    # invoke-rc.d asks policy-rc.d; exit status 101 means "action forbidden": Squid's postinst
    # would otherwise start a daemon on port 3128 that nobody here started on purpose.
    placed = False
    if not POLICY_RC_D.exists():
        with contextlib.suppress(OSError):
            POLICY_RC_D.write_text(
                "#!/bin/sh\n# placed by bench/compare.py for one install\nexit 101\n"
            )
            POLICY_RC_D.chmod(0o755)
            placed = True
    try:
        return hb.find_or_install(binary, package, fallback)
    finally:
        if placed:
            POLICY_RC_D.unlink(missing_ok=True)


def install_pypi(cache_dir: Path, package: str, entry: str) -> str:
    """``entry`` from a virtualenv of its own under ``cache_dir``, created on first use."""
    venv = cache_dir / package
    binary = venv / "bin" / entry
    if os.access(binary, os.X_OK):
        return str(binary)
    cache_dir.mkdir(parents=True, exist_ok=True)
    log = cache_dir / f"{package}.install.log"
    print(f"# {package} not found: creating {venv} and pip install {package} (log: {log})")
    shutil.rmtree(venv, ignore_errors=True)  # a half-made one from an interrupted install
    try:
        with log.open("wb") as out:
            for cmd in (
                [sys.executable, "-m", "venv", str(venv)],
                [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", package],
            ):
                subprocess.run(
                    cmd, check=True, timeout=INSTALL_TIMEOUT, stdout=out, stderr=subprocess.STDOUT
                )
    except (OSError, subprocess.SubprocessError) as exc:
        shutil.rmtree(venv, ignore_errors=True)
        raise BenchError(f"installing {package} failed ({exc}); see {log}") from None
    if not os.access(binary, os.X_OK):
        raise BenchError(f"{package} installed but {binary} is missing")
    return str(binary)


def find_tools(peers: Sequence[str], cache_dir: Path) -> Tools:
    tools = Tools(
        nginx=hb.find_or_install("nginx", "nginx-light", "/usr/sbin/nginx"),
        wrk=hb.find_or_install("wrk", "wrk", "/usr/bin/wrk"),
    )
    finders: dict[str, Callable[[], str]] = {
        "squid": lambda: install_debian("squid", "squid", "/usr/sbin/squid"),
        "tinyproxy": lambda: install_debian("tinyproxy", "tinyproxy", "/usr/bin/tinyproxy"),
        "proxy.py": lambda: install_pypi(cache_dir, "proxy.py", "proxy"),
        "mitmproxy": lambda: install_pypi(cache_dir, "mitmproxy", "mitmdump"),
    }
    for peer in peers:
        try:
            tools.peers[peer] = finders[peer]()
        except BenchError as exc:
            tools.missing[peer] = str(exc)
            print(f"# {peer} left out: {exc}")
    return tools


def versions(tools: Tools, proxyd_root: Path) -> dict[str, str]:
    proxyd = subprocess.run(
        [sys.executable, "-m", "proxyd", "--version"],
        cwd=proxyd_root,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    out = {
        "proxyd": f"{hb.first_line(proxyd.stdout + proxyd.stderr)} ({describe_tree(proxyd_root)})",
        "nginx": hb.first_line(hb.run_text([tools.nginx, "-v"])),
        "wrk": hb.first_line(hb.run_text([tools.wrk, "-v"])),
    }
    flags = {"squid": "-v", "tinyproxy": "-v", "proxy.py": "--version", "mitmproxy": "--version"}
    for peer, binary in tools.peers.items():
        text = hb.run_text([binary, flags[peer]])
        if peer == "mitmproxy":  # "Mitmproxy: 11.0.2" then Python and OpenSSL lines
            text = " ".join(line.strip() for line in text.splitlines()[:2])
        elif peer == "proxy.py":
            text = f"proxy.py {hb.first_line(text)}"
        out[peer] = hb.first_line(text)
    return out


def describe_tree(root: Path) -> str:
    """Which source proxyd runs from: the commit, and whether proxyd/ has uncommitted changes."""
    if not (root / ".git").exists():
        return f"source tree {root}"
    commit = hb.run_text(["git", "-C", str(root), "rev-parse", "--short", "HEAD"])
    changed = hb.run_text(["git", "-C", str(root), "status", "--porcelain", "--", "proxyd"])
    state = f"uncommitted changes in {len(changed.splitlines())} file(s) under proxyd/"
    return f"{root} at {commit}" + (f", {state}" if changed else ", clean")


# --- configurations and start-up -----------------------------------------------------------------

NGINX_CONF: Final = """\
# Generated by bench/compare.py: a throwaway static origin for the comparison.
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


def start_nginx(
    nginx: str,
    tmp: Path,
    port: int,
    tunnel_bytes: int,
    pinning: Pinning,
    stack: contextlib.ExitStack,
) -> str:
    """The origin; returns the tunnel file's name (a sparse file: no disk, no write time)."""
    www = tmp / "www"
    www.mkdir()
    for name, size in FILES.items():
        (www / name).write_bytes(cb.file_content(size))
    tunnel_name = f"tunnel-{tunnel_bytes // MIB}m"
    with (www / tunnel_name).open("wb") as big:
        big.truncate(tunnel_bytes)
    nofile = hb.run_text(["sh", "-c", "ulimit -n"]) or "4096"
    conf = tmp / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            tmp=tmp,
            host=LOOPBACK,
            port=port,
            nofile=nofile,
            connections=max(1024, int(nofile) - 64) if nofile.isdigit() else 4096,
            temp_paths=hb.nginx_temp_paths(nginx, tmp),
        )
    )
    out = stack.enter_context((tmp / "nginx-stderr.log").open("wb"))
    cmd = [*pinning.load_prefix, nginx, "-p", str(tmp), "-e", str(tmp / "nginx-error.log")]
    proc = subprocess.Popen(
        [*cmd, "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
    )
    stack.callback(hb.stop_process, proc, "nginx")
    hb.wait_for_port(port, proc, "nginx", tmp / "nginx-error.log")
    return tunnel_name


def spawn(
    name: str,
    label: str,
    cmd: Sequence[str],
    port: int,
    tmp: Path,
    pinning: Pinning,
    stack: contextlib.ExitStack,
    admin_port: int | None = None,
    cwd: Path = REPO_ROOT,
) -> Proxy:
    log = tmp / f"{label}.log"
    out: IO[bytes] = stack.enter_context(log.open("wb"))
    proc = subprocess.Popen(
        [*pinning.proxy_prefix, *cmd],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")},
    )
    stack.callback(stop_tree, proc, label)  # registered after the log: stopped before it closes
    for attempt in range(STARTUP_ATTEMPTS):  # mitmproxy's imports alone take seconds when busy
        try:
            hb.wait_for_port(port, proc, label, log)
            if admin_port is not None:
                hb.wait_for_port(admin_port, proc, f"{label} admin", log)
            break
        except BenchError:
            if proc.poll() is not None or attempt == STARTUP_ATTEMPTS - 1:
                raise
    return Proxy(name, label, port, proc, log, admin_port)


def start_proxyd(
    label: str,
    tmp: Path,
    pinning: Pinning,
    stack: contextlib.ExitStack,
    root: Path,
    cache: bool = False,
) -> Proxy:
    port, admin_port = hb.free_port(), hb.free_port()
    lines = [
        "# Generated by bench/compare.py",
        f'listen: ["{LOOPBACK}:{port}"]',
        f'admin: {{listen: "{LOOPBACK}:{admin_port}"}}',
        "access_log: {enabled: false}",
        "log_level: warning",
        'connect: {allowed_ports: ["1-65535"]}',  # the origin's port is ephemeral
        "client: {max_connections: 10000}",  # capacity for the idle-connection tests
        "pool: {tunnels_per_host: 10000}",
    ]
    if cache:
        lines.append(f'cache: {{enabled: true, dir: "{tmp / (label + "-store")}"}}')
    config = tmp / f"{label}.yaml"
    config.write_text("\n".join(lines) + "\n")
    # ``-m`` puts the working directory first on sys.path: ``root``'s proxyd is the one that runs.
    cmd = [sys.executable, "-m", "proxyd", "--config", str(config)]
    return spawn("proxyd", label, cmd, port, tmp, pinning, stack, admin_port, cwd=root)


SQUID_CONF: Final = """\
# Generated by bench/compare.py
http_port {host}:{port}
pid_filename {dir}/squid.pid
cache_log {dir}/cache.log
coredump_dir {dir}
access_log none
cache_store_log none
logfile_rotate 0
visible_hostname bench-squid
# Loopback only: IP-literal URLs need no DNS, and if anything asked it could not leave the machine.
dns_nameservers 127.0.0.1
pinger_enable off
digest_generation off
shutdown_lifetime 1 seconds
max_filedescriptors {nofile}
acl bench_clients src 127.0.0.0/8
http_access allow bench_clients
http_access deny all
{cache}
"""
SQUID_RELAY: Final = "cache deny all\ncache_mem 8 MB"
SQUID_MEMORY_CACHE: Final = (
    "cache_mem 256 MB\nmaximum_object_size_in_memory 4 MB\nmaximum_object_size 4 MB"
)


def start_squid(
    binary: str, label: str, tmp: Path, pinning: Pinning, stack: contextlib.ExitStack, cache: bool
) -> Proxy:
    port = hb.free_port()
    work = tmp / label
    work.mkdir()
    if os.geteuid() == 0:
        # Squid will not run as root: it switches to cache_effective_user (Debian: "proxy"),
        # which must be able to write its log and pid file.
        with contextlib.suppress(KeyError):
            user = pwd.getpwnam("proxy")
            os.chown(work, user.pw_uid, user.pw_gid)
    nofile = hb.run_text(["sh", "-c", "ulimit -n"])
    conf = work / "squid.conf"
    conf.write_text(
        SQUID_CONF.format(
            host=LOOPBACK,
            port=port,
            dir=work,
            nofile=nofile if nofile.isdigit() else 4096,
            cache=SQUID_MEMORY_CACHE if cache else SQUID_RELAY,
        )
    )
    return spawn("squid", label, [binary, "-N", "-f", str(conf)], port, tmp, pinning, stack)


def start_tinyproxy(
    binary: str, label: str, tmp: Path, pinning: Pinning, stack: contextlib.ExitStack
) -> Proxy:
    port = hb.free_port()
    conf = tmp / f"{label}.conf"
    conf.write_text(
        "# Generated by bench/compare.py (no ConnectPort line: CONNECT to any port)\n"
        f"Port {port}\nListen {LOOPBACK}\nTimeout 600\nMaxClients 10000\n"
        f'LogLevel Critical\nLogFile "{tmp / (label + "-file.log")}"\n'
        f'PidFile "{tmp / (label + ".pid")}"\nAllow 127.0.0.1\n'
    )
    return spawn("tinyproxy", label, [binary, "-d", "-c", str(conf)], port, tmp, pinning, stack)


def start_proxy_py(
    binary: str, label: str, tmp: Path, pinning: Pinning, stack: contextlib.ExitStack
) -> Proxy:
    port = hb.free_port()
    nofile = hb.run_text(["sh", "-c", "ulimit -n"])
    cmd = [
        binary,
        "--hostname",
        LOOPBACK,
        "--port",
        str(port),
        "--num-workers",
        "1",
        "--log-level",
        "WARNING",
        "--open-file-limit",
        nofile if nofile.isdigit() else "4096",
        # Its inactivity timeout (default 10 s) as proxyd's client idle timeout (60 s): the
        # default would close the memory test's idle clients before all 5,000 are open.
        "--timeout",
        "60",
        "--data-dir",
        str(tmp / f"{label}-data"),
    ]
    return spawn("proxy.py", label, cmd, port, tmp, pinning, stack)


def start_mitmproxy(
    binary: str, label: str, tmp: Path, pinning: Pinning, stack: contextlib.ExitStack
) -> Proxy:
    port = hb.free_port()
    cmd = [
        binary,
        "-q",
        "--listen-host",
        LOOPBACK,
        "--listen-port",
        str(port),
        "--set",
        f"confdir={tmp / (label + '-conf')}",
        "--set",
        "connection_strategy=lazy",
        "--set",
        "stream_large_bodies=1m",
    ]
    return spawn("mitmproxy", label, cmd, port, tmp, pinning, stack)


@dataclass
class Context:
    tools: Tools
    pinning: Pinning
    tmp: Path
    origin_port: int
    tunnel_file: str
    args: argparse.Namespace
    proxies: dict[str, Proxy] = field(default_factory=dict)  # by label
    dead: dict[str, str] = field(default_factory=dict)  # label -> why it stopped being measured
    lua: dict[str, Path] = field(default_factory=dict)
    #: proxies that answer HTTP/1.0 and close after each response (wrk reconnects)
    closes: set[str] = field(default_factory=set)
    all_cpus: set[int] = field(default_factory=lambda: os.sched_getaffinity(0))
    phase_seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # for the report

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.phase_seconds[name] = time.monotonic() - started
            print(f"# phase {name} took {self.phase_seconds[name]:.0f}s", flush=True)

    def start(self, name: str, label: str, stack: contextlib.ExitStack) -> Proxy:
        """A new instance of proxy ``name`` (``proxyd``, a peer, or ``*-cache``)."""
        tmp, pinning = self.tmp, self.pinning
        binary = self.tools.peers.get(name.removesuffix("-cache"), "")
        root = self.args.proxyd_root
        if name == "proxyd":
            return start_proxyd(label, tmp, pinning, stack, root)
        if name == "proxyd-cache":
            return start_proxyd(label, tmp, pinning, stack, root, cache=True)
        if name in ("squid", "squid-cache"):
            return start_squid(binary, label, tmp, pinning, stack, cache=name == "squid-cache")
        if name == "tinyproxy":
            return start_tinyproxy(binary, label, tmp, pinning, stack)
        if name == "proxy.py":
            return start_proxy_py(binary, label, tmp, pinning, stack)
        if name == "mitmproxy":
            return start_mitmproxy(binary, label, tmp, pinning, stack)
        raise BenchError(f"unknown proxy {name}")

    def alive(self, label: str) -> Proxy | None:
        proxy = self.proxies.get(label)
        if proxy is None or label in self.dead:
            return None
        problem = proxy.exited()
        if problem is not None:
            self.dead[label] = problem
            print(f"# {problem}")
            return None
        return proxy


def start_all(ctx: Context, names: Sequence[str], stack: contextlib.ExitStack) -> None:
    """Start the long-lived instances; a peer that fails is left out with the reason."""
    for name in names:
        try:
            proxy = ctx.start(name, name, stack)
            for file in ("1k", "100k"):
                hb.check_through_proxy(proxy.port, ctx.origin_port, file)
            if not keeps_alive(proxy.port, ctx.origin_port):
                ctx.closes.add(proxy.name)
        except (BenchError, OSError) as exc:
            if name == "proxyd":
                raise BenchError(f"proxyd did not start or relay: {exc}") from None
            ctx.dead[name] = f"did not start or relay: {exc}"
            print(f"# {name} left out: {exc}")
            continue
        ctx.proxies[name] = proxy
        print(f"# {name}: {LOOPBACK}:{proxy.port} (pid {proxy.proc.pid})")


def keeps_alive(port: int, origin_port: int) -> bool:
    """Two requests on one connection; False when the proxy closes it after the first."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=5)
    try:
        for _ in range(2):
            conn.request(
                "GET",
                f"http://{LOOPBACK}:{origin_port}/1k",
                headers={"Host": f"{LOOPBACK}:{origin_port}"},
            )
            response = conn.getresponse()
            response.read()
            if response.will_close:  # HTTP/1.0 without keep-alive, or Connection: close
                return False
        return True
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


# --- phase 1 and 2: HTTP through wrk --------------------------------------------------------------


@dataclass
class HttpRun:
    scenario: str
    target: str
    round: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_request: float | None
    #: the proxy's CPU time over the run's wall time: well below 100 % under 50 connections
    #: means it was waiting, or another process had its CPU
    cpu_percent: float | None
    errors: dict[str, int]
    hit_share: float | None = None
    #: wrk "read" errors from a proxy that closes after every response: wrk reads EOF where the
    #: next response would start and reconnects; those are the proxy's design, not failures.
    closed_by_proxy: int = 0


def wrk_run(
    ctx: Context,
    proxy: Proxy | None,
    scenario: str,
    file: str,
    connections: int,
    lua: Path,
    seconds: int,
    rnd: int,
    cache_kind: str | None = None,
) -> HttpRun:
    target = proxy.name if proxy else "direct"
    port = proxy.port if proxy else ctx.origin_port
    before = maybe_scrape(proxy)
    cpu_before = proxy.cpu_seconds() if proxy else 0.0
    errors: dict[str, int] = {}
    try:
        values = hb.run_wrk(ctx.tools.wrk, ctx.pinning, port, file, connections, seconds, lua)
    except BenchError as exc:
        print(f"# {scenario} {target}: {exc}")
        values = {"requests": 0, "duration_us": seconds * 1e6, "bytes": 0, "p50_us": 0, "p99_us": 0}
        errors["wrk_failed"] = 1
    cpu_s = proxy.cpu_seconds() - cpu_before if proxy else None
    if proxy is not None and proxy.exited():
        errors["exited"] = 1
    requests = int(values["requests"])
    elapsed = values["duration_us"] / 1e6
    errors.update({k: int(values.get(k, 0)) for k in hb.WRK_ERROR_KINDS})
    if values["bytes"] < requests * FILES[file]:
        errors["short"] = 1
    closed = errors.pop("read", 0) if target in ctx.closes else 0
    hit_share = None
    answered = requests
    after = maybe_settle(proxy, before) if not errors.get("exited") else None
    if proxy is not None and before is not None and after is None:
        errors["metrics"] = 1  # proxyd's /metrics did not answer: nothing to check against
    if proxy is not None and before is not None and after is not None:
        delta = after.minus(before)
        cpu_s = proxy.cpu_seconds() - cpu_before  # including the requests wrk left in flight
        answered = int(delta.requests) or requests
        errors["proxyd_non2xx"] = int(delta.non_2xx)
        errors["proxyd_errors"] = int(delta.errors)
        if cache_kind is not None:
            errors.update(cb.lookup_errors(cache_kind, delta, requests))
            lookups = sum(delta.lookups.values())
            hit_share = delta.lookups.get("hit", 0.0) / lookups if lookups else None
    return HttpRun(
        scenario=scenario,
        target=target,
        round=rnd,
        requests=requests,
        seconds=elapsed,
        rps=requests / elapsed if elapsed > 0 else 0.0,
        p50_ms=values["p50_us"] / 1000,
        p99_ms=values["p99_us"] / 1000,
        cpu_us_per_request=cpu_s * 1e6 / answered if cpu_s is not None and answered else None,
        cpu_percent=100 * cpu_s / elapsed if cpu_s is not None and elapsed > 0 else None,
        errors={k: v for k, v in errors.items() if v},
        hit_share=hit_share,
        closed_by_proxy=closed,
    )


def maybe_scrape(proxy: Proxy | None) -> cb.Counters | None:
    """proxyd's counters from its /metrics (None for a peer, or when it does not answer)."""
    if proxy is None or proxy.admin_port is None:
        return None
    try:
        return cb.scrape(as_cb(proxy))
    except (BenchError, OSError) as exc:
        print(f"# {proxy.label} /metrics: {exc}")
        return None


def maybe_settle(proxy: Proxy | None, before: cb.Counters | None) -> cb.Counters | None:
    """The counters once the run's connections are closed (cache_bench.settle, bounded)."""
    if proxy is None or before is None:
        return None
    try:
        return cb.settle(as_cb(proxy), before.connections)
    except (BenchError, OSError) as exc:
        print(f"# {proxy.label} /metrics: {exc}")
        return None


def as_cb(proxy: Proxy) -> cb.Proxyd:
    """The view cache_bench's /metrics helpers take (proxyd instances only)."""
    assert proxy.admin_port is not None
    return cb.Proxyd(proxy.label, proxy.port, proxy.admin_port, proxy.proc, proxy.log)


def progress(prefix: str, run: HttpRun) -> None:
    share = "" if run.hit_share is None else f" hits={100 * run.hit_share:.1f}%"
    print(
        f"# {prefix} {run.scenario:<24} {run.target:<10} {run.rps:>9,.0f} req/s"
        f" p50={run.p50_ms:.2f}ms p99={run.p99_ms:.2f}ms"
        f" cpu={fmt(run.cpu_us_per_request, 1)}µs/req{share}"
        + (f" ERRORS {run.errors}" if run.errors else ""),
        flush=True,
    )


def http_targets(ctx: Context) -> list[str]:
    return ["direct", *(n for n in ("proxyd", *PEERS) if n in ctx.proxies)]


def run_http(ctx: Context) -> list[HttpRun]:
    args = ctx.args
    for file in ("1k", "100k"):
        ctx.lua[f"direct-{file}"] = hb.write_lua(ctx.tmp, "direct", file, ctx.origin_port)
        ctx.lua[f"proxied-{file}"] = hb.write_lua(ctx.tmp, "proxyd", file, ctx.origin_port)
    targets = http_targets(ctx)
    for target in targets:  # warm-up: connections, code paths, allocator pools
        proxy = None if target == "direct" else ctx.alive(target)
        if target == "direct" or proxy is not None:
            lua = ctx.lua[f"{'proxied' if proxy else 'direct'}-1k"]
            wrk_run(ctx, proxy, "warm-up", "1k", 50, lua, hb.WARMUP_SECONDS, 0)
    runs: list[HttpRun] = []
    for rnd in range(1, args.rounds + 1):
        for scenario, file, connections in HTTP_SCENARIOS:
            for target in targets:
                proxy = None if target == "direct" else ctx.alive(target)
                if target != "direct" and proxy is None:
                    continue
                lua = ctx.lua[f"{'proxied' if proxy else 'direct'}-{file}"]
                # One connection: a latency, thousands of samples in less time (time budget).
                seconds = args.duration if connections > 1 else max(1, args.duration - 1)
                run = wrk_run(ctx, proxy, scenario, file, connections, lua, seconds, rnd)
                runs.append(run)
                progress(f"round {rnd}", run)
    return runs


def fetch_with_headers(port: int, origin_port: int, path: str) -> tuple[int, dict[str, str], int]:
    """One absolute-form GET through a proxy: (status, lower-cased headers, body length)."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=10)
    try:
        conn.request(
            "GET",
            f"http://{LOOPBACK}:{origin_port}{path}",
            headers={"Host": f"{LOOPBACK}:{origin_port}"},
        )
        response = conn.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, len(body)
    except (OSError, http.client.HTTPException) as exc:
        raise BenchError(f"GET {path} through port {port} failed: {exc}") from None
    finally:
        conn.close()


def served_as_hit(proxy: Proxy, origin_port: int, path: str) -> bool:
    status, headers, _ = fetch_with_headers(proxy.port, origin_port, path)
    if proxy.name == "squid":
        return status == 200 and headers.get("x-cache", "").upper().startswith("HIT")
    return status == 200 and cb.is_hit(headers.get("cache-status", ""))


def fill_cache(ctx: Context, proxy: Proxy, file: str) -> None:
    """Request /cached/FILE until it comes back as a hit (bounded), or raise."""
    path = f"/cached/{file}"
    deadline = time.monotonic() + STORE_WAIT
    while not served_as_hit(proxy, ctx.origin_port, path):
        if time.monotonic() > deadline:
            raise BenchError(f"{proxy.label} never served {path} (max-age=3600) as a hit")
        time.sleep(0.05)


def run_cache(ctx: Context) -> list[HttpRun]:
    args = ctx.args
    for kind, prefix in (("hit", "cached"), ("miss", "nostore")):
        for file in ("1k", "1m"):
            ctx.lua[f"{kind}-{file}"] = cb.write_lua(ctx.tmp, kind, file, prefix, ctx.origin_port)
    usable: list[tuple[str, str, str, str]] = []
    for case in CACHE_SCENARIOS:
        label = f"{case[1]}-cache"
        proxy = ctx.alive(label)
        if proxy is None:
            continue
        if case[2] == "hit":
            try:
                fill_cache(ctx, proxy, case[3])
            except BenchError as exc:
                ctx.dead[label] = str(exc)
                print(f"# {exc}")
                continue
        usable.append(case)
    runs: list[HttpRun] = []
    for rnd in range(1, args.rounds + 1):
        for scenario, name, kind, file in usable:
            proxy = ctx.alive(f"{name}-cache")
            if proxy is None:
                continue
            lua = ctx.lua[f"{kind}-{file}"]
            run = wrk_run(
                ctx, proxy, scenario, file, CACHE_CONNECTIONS, lua, args.duration, rnd, kind
            )
            if (
                name == "squid"
                and kind == "hit"
                and not served_as_hit(proxy, ctx.origin_port, f"/cached/{file}")
            ):
                run.errors["not_hit"] = 1
            runs.append(run)
            progress(f"round {rnd} cache", run)
    return runs


# --- phase 3: CONNECT tunnel throughput ----------------------------------------------------------


@dataclass
class TunnelRun:
    target: str
    round: int
    bytes: int
    seconds: float
    mb_per_s: float
    capped: bool  # stopped by --tunnel-max-time: the rate is over what arrived
    cpu_s_per_gib: float | None
    errors: dict[str, int]


def read_head(sock: socket.socket, data: bytes, deadline: float) -> tuple[bytes, bytes]:
    """Read until the end of a response head; (head, the bytes after it)."""
    while b"\r\n\r\n" not in data:
        if time.monotonic() > deadline or len(data) > 65536:
            raise BenchError("no complete response head")
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            raise BenchError(f"closed before a response head ({data[:60]!r})")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def tunnel_download(
    proxy_port: int | None, origin_port: int, path: str, max_time: float
) -> tuple[int, int, float, bool]:
    """One GET of ``path`` inside a CONNECT tunnel (or direct): (status, body bytes, seconds,
    capped). A small client rather than curl, whose 16 KiB reads would be the bottleneck: the
    body is read with ``recv_into`` a 1 MiB buffer and thrown away."""
    authority = f"{LOOPBACK}:{origin_port}"
    started = time.monotonic()
    deadline = started + max_time
    with socket.create_connection((LOOPBACK, proxy_port or origin_port), timeout=10) as sock:
        rest = b""
        if proxy_port is not None:
            # RFC 9110 §9.3.6: CONNECT, a 2xx, then the bytes are the origin's.
            sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
            head, rest = read_head(sock, b"", deadline)
            if head.split(b" ", 2)[1:2] != [b"200"]:
                raise BenchError(f"CONNECT answered {head.splitlines()[0]!r}")
        request = f"GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
        sock.sendall(request.encode())
        head, rest = read_head(sock, rest, deadline)
        status = int(head.split(b" ", 2)[1])
        length = int(wb.header_value(head + b"\r\n", b"content-length") or b"-1")
        got, capped = len(rest), False
        buffer = memoryview(bytearray(1 << 20))
        while got < length:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                capped = True
                break
            sock.settimeout(remaining)
            try:
                n = sock.recv_into(buffer)
            except TimeoutError:
                capped = True
                break
            if n == 0:
                break
            got += n
    return status, got, time.monotonic() - started, capped


def tunnel_run(ctx: Context, proxy: Proxy | None, rnd: int) -> TunnelRun:
    args = ctx.args
    cpu_before = proxy.cpu_seconds() if proxy else 0.0
    errors: dict[str, int] = {}
    try:
        status, got, seconds, capped = tunnel_download(
            proxy.port if proxy else None,
            ctx.origin_port,
            f"/{ctx.tunnel_file}",
            args.tunnel_max_time,
        )
    except (BenchError, OSError, ValueError, IndexError) as exc:
        print(f"# tunnel {proxy.label if proxy else 'direct'}: {type(exc).__name__}: {exc}")
        return TunnelRun(
            proxy.name if proxy else "direct", rnd, 0, 0.0, 0.0, False, None, {"failed": 1}
        )
    cpu_s = proxy.cpu_seconds() - cpu_before if proxy else None
    if status != 200:
        errors["status"] = status or 1
    if not capped and got != args.tunnel_mib * MIB:
        errors["short"] = 1
    if proxy is not None and proxy.exited():
        errors["exited"] = 1
    return TunnelRun(
        target=proxy.name if proxy else "direct",
        round=rnd,
        bytes=got,
        seconds=seconds,
        mb_per_s=got / 1e6 / seconds if seconds > 0 else 0.0,
        capped=capped,
        cpu_s_per_gib=cpu_s * (1 << 30) / got if cpu_s is not None and got else None,
        errors=errors,
    )


def run_tunnel(ctx: Context) -> list[TunnelRun]:
    runs: list[TunnelRun] = []
    for rnd in range(1, ctx.args.rounds + 1):
        for target in http_targets(ctx):
            proxy = None if target == "direct" else ctx.alive(target)
            if target != "direct" and proxy is None:
                continue
            run = tunnel_run(ctx, proxy, rnd)
            runs.append(run)
            print(
                f"# round {rnd} tunnel {target:<10} {run.mb_per_s:>8,.0f} MB/s"
                f" ({run.bytes / MIB:,.0f} MiB in {run.seconds:.1f}s"
                f"{', capped by --tunnel-max-time' if run.capped else ''})"
                f" cpu={fmt(run.cpu_s_per_gib, 2)}s/GiB"
                + (f" ERRORS {run.errors}" if run.errors else ""),
                flush=True,
            )
    return runs


# --- phase 4: WebSocket echo and session opening ------------------------------------------------


@dataclass
class WsRun:
    scenario: str
    target: str
    round: int
    round_trips: int
    seconds: float
    rate: float  # round trips per second
    cpu_us_per_message: float | None  # the proxy's CPU per message relayed (2 per round trip)
    errors: str


async def window_echo(
    target: wb.Target, origin_port: int, size: int, window: int, seconds: float
) -> tuple[int, float]:
    """Echo round trips on one connection with ``window`` messages in flight; (count, seconds).

    Each echo is compared with what was sent; as each one comes back another goes out, so the
    window stays full until the deadline, then the last ones are collected.
    """
    payload = os.urandom(size)
    frames = [wb.frame(wb.OP_BINARY, payload, mask=True) for _ in range(8)]
    client = await wb.WsClient.open(target, origin_port)
    started = time.monotonic()
    deadline = started + seconds
    sent = received = 0
    try:
        client.writer.write(b"".join(frames[i % 8] for i in range(window)))
        sent = window
        await client.writer.drain()
        while received < sent:
            data = await client.reader.read(wb.READ_SIZE)
            if not data:
                raise BenchError(f"connection closed after {received} echoes")
            messages = client.parser.feed(data)
            for message in messages:
                if message.opcode != wb.OP_BINARY or message.payload != payload:
                    raise BenchError(f"bad echo ({message.opcode}, {message.size} bytes)")
            received += len(messages)
            more = min(len(messages), WS_MAX_ROUND_TRIPS - sent)
            if messages and more > 0 and time.monotonic() < deadline:
                client.writer.write(b"".join(frames[(sent + i) % 8] for i in range(more)))
                sent += more
                await client.writer.drain()
        elapsed = time.monotonic() - started
    finally:
        await client.close()
    return received, elapsed


async def ws_echo_run(
    target: wb.Target,
    proxy: Proxy | None,
    origin_port: int,
    scenario: str,
    size: int,
    args: argparse.Namespace,
    rnd: int,
) -> WsRun:
    cpu_before = proxy.cpu_seconds() if proxy else 0.0
    error = ""
    try:
        async with asyncio.timeout(args.ws_duration + WS_RUN_GRACE):
            count, seconds = await window_echo(
                target, origin_port, size, args.ws_window, args.ws_duration
            )
    except (BenchError, OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        count, seconds, error = 0, args.ws_duration, f"{type(exc).__name__}: {exc}"
    cpu_s = proxy.cpu_seconds() - cpu_before if proxy else None
    return WsRun(
        scenario=scenario,
        target=target.name,
        round=rnd,
        round_trips=count,
        seconds=seconds,
        rate=count / seconds if seconds > 0 else 0.0,
        cpu_us_per_message=cpu_s * 1e6 / (2 * count) if cpu_s is not None and count else None,
        errors=error,
    )


@dataclass
class OpenRun:
    target: str
    round: int
    opened: int
    ms_median: float | None
    ms_p90: float | None
    errors: str


async def session_open_run(target: wb.Target, origin_port: int, count: int, rnd: int) -> OpenRun:
    """Open ``count`` sessions one after another, each timed from connect to the 101."""
    times: list[float] = []
    error = ""
    deadline = time.monotonic() + 30.0
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        started = time.perf_counter()
        try:
            async with asyncio.timeout(wb.HANDSHAKE_TIMEOUT):
                client = await wb.WsClient.open(target, origin_port)
        except (BenchError, OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            error = f"{type(exc).__name__}: {exc}"
            break
        times.append((time.perf_counter() - started) * 1000)
        await client.close()
    ordered = sorted(times)
    return OpenRun(
        target.name,
        rnd,
        len(times),
        statistics.median(ordered) if ordered else None,
        ordered[int(0.9 * (len(ordered) - 1))] if ordered else None,
        error,
    )


def ws_target(proxy: Proxy | None) -> wb.Target:
    if proxy is None:
        return wb.Target("direct", None)
    return wb.Target(proxy.name, proxy.port, admin_port=proxy.admin_port)


async def run_ws(ctx: Context, origin: wb.Origin) -> tuple[list[WsRun], list[OpenRun]]:
    args = ctx.args
    targets: list[tuple[wb.Target, Proxy | None]] = []
    for name in http_targets(ctx):
        proxy = None if name == "direct" else ctx.alive(name)
        if name != "direct" and proxy is None:
            continue
        target = ws_target(proxy)
        problem = await wb.probe(target, origin)
        if problem is not None:
            ctx.dead[f"{name} (WebSocket)"] = problem
            print(f"# WebSocket through {name} does not work: {problem}")
            continue
        targets.append((target, proxy))
    echo = [(t, p) for t, p in targets if t.name in WS_ECHO_TARGETS]
    if not args.quick:
        for target, proxy in echo:
            await ws_echo_run(
                target,
                proxy,
                origin.port,
                "warm-up",
                64,
                argparse.Namespace(**{**vars(args), "ws_duration": 0.3}),
                0,
            )
    runs: list[WsRun] = []
    opens: list[OpenRun] = []
    for rnd in range(1, args.rounds + 1):
        for label, size in WS_SIZES.items():
            for target, proxy in echo:
                run = await ws_echo_run(
                    target, proxy, origin.port, f"echo {label}", size, args, rnd
                )
                runs.append(run)
                print(
                    f"# round {rnd} ws echo {label:<6} {target.name:<10} {run.rate:>9,.0f}"
                    f" round trips/s cpu={fmt(run.cpu_us_per_message, 1)}µs/msg"
                    + (f" ERRORS {run.errors}" if run.errors else ""),
                    flush=True,
                )
        for target, _ in targets:
            opened = await session_open_run(target, origin.port, args.session_opens, rnd)
            opens.append(opened)
            print(
                f"# round {rnd} ws open {target.name:<10} {fmt(opened.ms_median, 2)} ms"
                f" (p90 {fmt(opened.ms_p90, 2)}, {opened.opened} sessions)"
                + (f" ERRORS {opened.errors}" if opened.errors else ""),
                flush=True,
            )
    # Relayed frame by frame, or tunnelled? The relay counts its sessions (as ws_bench checks).
    proxyd = ctx.alive("proxyd")
    if proxyd is not None and proxyd.admin_port is not None:
        try:
            count = wb.metric_sums(proxyd.admin_port).get("proxyd_websocket_sessions_total")
        except (OSError, http.client.HTTPException) as exc:
            count, problem = None, f" (/metrics: {exc})"
        else:
            problem = ""
        note = (
            f"proxyd's WebSocket runs went through its session relay (frame by frame):"
            f" proxyd_websocket_sessions_total = {count:.0f}."
            if count
            else "WARNING: proxyd counted no WebSocket session: its WebSocket numbers measured"
            f" a CONNECT byte tunnel, not the relay{problem}."
        )
        ctx.notes.append(note)
        print(f"# {note}")
    return runs, opens


# --- phase 5: memory per idle connection and per idle WebSocket session --------------------------


@dataclass
class MemoryRun:
    kind: str  # "idle HTTP connection" or "idle WebSocket session"
    target: str
    requested: int
    opened: int
    still_open: int  # after the idle second: a proxy may close idle keep-alive connections
    rss_before: int
    rss_after: int
    bytes_per_connection: float | None
    errors: list[str] = field(default_factory=list)
    #: e.g. not all opened before the deadline: the proxy is slow to accept, not failing
    note: str = ""


async def open_idle_http(
    port: int, origin_port: int, count: int, errors: list[str]
) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """``count`` keep-alive clients that each made one request (1 KiB) and now sit idle."""
    request = (
        f"GET http://{LOOPBACK}:{origin_port}/1k HTTP/1.1\r\nHost: {LOOPBACK}:{origin_port}\r\n\r\n"
    ).encode()
    opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    gate = asyncio.Semaphore(IDLE_OPEN_CONCURRENCY)

    async def one() -> None:
        async with gate:
            try:
                async with asyncio.timeout(10):
                    reader, writer = await asyncio.open_connection(LOOPBACK, port)
                    opened.append((reader, writer))
                    writer.write(request)
                    head = await reader.readuntil(b"\r\n\r\n")
                    if not head.startswith(b"HTTP/1.1 200") and not head.startswith(
                        b"HTTP/1.0 200"
                    ):
                        raise BenchError(f"answered {head.splitlines()[0]!r}")
                    length = wb.header_value(head, b"content-length")
                    await reader.readexactly(int(length or b"0"))
            except (
                BenchError,
                OSError,
                TimeoutError,
                ValueError,
                asyncio.IncompleteReadError,
            ) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    tasks = [asyncio.ensure_future(one()) for _ in range(count)]
    try:
        async with asyncio.timeout(IDLE_OPEN_DEADLINE):
            await asyncio.gather(*tasks)
    except TimeoutError:  # a slow proxy: measured with what opened (the table says how many)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return opened


async def close_idle_http(
    conns: Sequence[tuple[asyncio.StreamReader, asyncio.StreamWriter]],
) -> None:
    for _, writer in conns:
        writer.close()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(10):
            await asyncio.gather(*(w.wait_closed() for _, w in conns), return_exceptions=True)


async def memory_idle_http(ctx: Context, name: str, count: int) -> MemoryRun:
    errors: list[str] = []
    with contextlib.ExitStack() as stack:
        proxy = ctx.start(name, f"{name}-idle-http", stack)
        # Warm-up: the first connections load code paths and grow allocator pools once.
        await close_idle_http(await open_idle_http(proxy.port, ctx.origin_port, 50, errors))
        await asyncio.sleep(0.5)
        before = proxy.rss_bytes()
        conns = await open_idle_http(proxy.port, ctx.origin_port, count, errors)
        await asyncio.sleep(IDLE_SETTLE)  # idle: nothing moves
        after = proxy.rss_bytes()
        still = sum(1 for r, w in conns if not r.at_eof() and not w.is_closing())
        await close_idle_http(conns)
        if problem := proxy.exited():
            errors.append(problem)
    # A proxy that closes idle keep-alive connections holds nothing for them: no per-connection
    # figure then (the table says how many stayed open).
    per = (after - before) / still if still >= count // 2 else None
    note = "" if len(conns) == count else f"opened {len(conns)} in {IDLE_OPEN_DEADLINE:.0f}s"
    return MemoryRun(
        "idle HTTP connection", name, count, len(conns), still, before, after, per, errors, note
    )


async def memory_idle_ws(ctx: Context, name: str, origin: wb.Origin, count: int) -> MemoryRun:
    errors: list[str] = []
    with contextlib.ExitStack() as stack:
        proxy = ctx.start(name, f"{name}-idle-ws", stack)
        target = ws_target(proxy)
        await wb.close_sessions(await wb.open_sessions(target, origin, 20, errors))
        await asyncio.sleep(0.5)
        before = proxy.rss_bytes()
        # In batches, each bounded by ws_bench's handshake timeout, until the deadline.
        clients: list[wb.WsClient] = []
        deadline = time.monotonic() + IDLE_OPEN_DEADLINE
        while len(clients) < count and time.monotonic() < deadline:
            batch = min(IDLE_OPEN_CONCURRENCY, count - len(clients))
            clients += await wb.open_sessions(target, origin, batch, errors)
        await asyncio.sleep(IDLE_SETTLE)
        after = proxy.rss_bytes()
        still = sum(1 for c in clients if not c.reader.at_eof())
        async with asyncio.timeout(60):
            await wb.close_sessions(clients)
        if problem := proxy.exited():
            errors.append(problem)
    per = (after - before) / still if still >= count // 2 else None
    note = "" if len(clients) == count else f"opened {len(clients)} in {IDLE_OPEN_DEADLINE:.0f}s"
    return MemoryRun(
        "idle WebSocket session",
        name,
        count,
        len(clients),
        still,
        before,
        after,
        per,
        errors,
        note,
    )


async def run_memory(ctx: Context, origin: wb.Origin) -> list[MemoryRun]:
    args = ctx.args
    names = ["proxyd", *(p for p in PEERS if p in ctx.tools.peers and p not in ctx.dead)]
    runs: list[MemoryRun] = []
    for kind in ("http", "ws"):
        for name in names:
            started = time.monotonic()
            try:
                if kind == "http":
                    run = await memory_idle_http(ctx, name, args.idle_clients)
                else:
                    run = await memory_idle_ws(ctx, name, origin, args.idle_sessions)
            except (BenchError, OSError, TimeoutError) as exc:
                print(f"# memory {kind} {name}: {type(exc).__name__}: {exc}")
                continue
            runs.append(run)
            print(
                f"# memory {run.kind:<24} {name:<10} {run.still_open}/{run.requested} open,"
                f" RSS {run.rss_before / MIB:.1f} -> {run.rss_after / MIB:.1f} MiB,"
                f" {kib(run.bytes_per_connection)} KiB each ({time.monotonic() - started:.0f}s)"
                + (f" ERRORS {len(run.errors)}: {run.errors[:2]}" if run.errors else ""),
                flush=True,
            )
    return runs


# --- phases 6 and 7: PAC and workers (the other benchmarks, imported) ---------------------------


def run_pac(ctx: Context) -> dict[str, float]:
    """pac_bench.py's scenarios, on the proxy's CPU (where proxyd would evaluate them)."""
    import trio

    from proxyd.config import RoutingConfig
    from proxyd.routing.pac.engine import PacEngine

    duration, rounds = (0.2, 1) if ctx.args.quick else (0.8, 3)
    cpus = ctx.pinning.proxy_prefix[-1:] if ctx.pinning.proxy_prefix else ()
    previous = os.sched_getaffinity(0)
    if cpus:
        os.sched_setaffinity(0, {int(cpus[0])})
    rows: dict[str, float] = {}
    try:
        engine = PacEngine(timeout=0.5, memory_limit=32 << 20)
        try:
            engine.load(pb.CORPORATE_PAC, "corporate.pac")
            pb.time_engine(engine, min(duration, 0.2))
            rows["engine (JS only, same thread)"] = statistics.median(
                pb.time_engine(engine, duration)[0] for _ in range(rounds)
            )
        finally:
            engine.dispose()
        pac_path = ctx.tmp / "corporate.pac"
        pac_path.write_text(pb.CORPORATE_PAC)
        for label, cache_size in (("router, uncached", 0), ("router, cached", 4096)):
            config = RoutingConfig.model_validate(
                {"pac": {"url": str(pac_path), "cache_size": cache_size}}
            )
            rows[label] = statistics.median(trio.run(pb.run_router, config, duration, rounds))
    finally:
        os.sched_setaffinity(0, previous)
    for label, micros in rows.items():
        print(f"# pac {label:<30} {micros:8.1f} µs/decision")
    return rows


def run_workers(ctx: Context) -> list[dict[str, object]]:
    """workers_bench.py with workers 1 and 2, unpinned (its output goes to a log file)."""
    out = ctx.tmp / "workers-bench.json"
    args = argparse.Namespace(
        workers="1,2",
        counts=[1, 2],
        rounds=ctx.args.rounds,
        duration=max(1, ctx.args.duration - 1),  # the time budget: 2 scenarios x 2 daemons
        json=str(out),
    )
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, ctx.all_cpus)  # inherited by everything workers_bench starts
    log = ctx.tmp / "workers-bench.log"
    try:
        with log.open("w") as sink, contextlib.redirect_stdout(sink):
            status = wkb.run(args)
    except BenchError as exc:
        print(f"# workers: {exc}")
        return []
    finally:
        os.sched_setaffinity(0, previous)
    rows: list[dict[str, object]] = json.loads(out.read_text())["summary"] if out.exists() else []
    for row in rows:
        print(
            f"# workers {row['scenario']!s:<38} workers={row['workers']} "
            f"{fmt(as_float(row['rps']))} req/s ({fmt(as_float(row['ratio']), 2)}x)"
            f" errors {row['errors']}"
        )
    if status != 0:
        print(f"# workers_bench exit status {status}; its output:\n{hb.tail(log, 40)}")
    return rows


def as_float(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None


# --- bench/memory_bench.py's soak and scaling, read from its JSON (--memory-json) --------------

#: Issue 7: "RSS flat (within 5%) over a 10-minute soak at steady load".
SOAK_GROWTH_LIMIT: Final = 5.0  # percent, either way
SOAK_MIN_SECONDS: Final = 600.0
#: Issue 7: "CPU per request and memory do not grow with the number of pooled groups, cached
#: entries or open sessions". CPU µs/request with 10,000 against 10 may be at most this (a
#: quarter: on a shared 2-core machine interleaved runs differ by 10-20 % from noise alone).
SCALE_CPU_LIMIT: Final = 1.25
#: What one more held item may add to RSS (KiB): what the item itself holds, and no more; a
#: cost per item that grew with the population (a linear scan's bookkeeping, a per-request
#: structure sized by the population) would show as more.
SCALE_RSS_BUDGET_KIB: Final[dict[str, tuple[float, str]]] = {
    "groups": (
        6.0,
        "an origin's pool group holds one idle upstream connection, which may cost what issue 7"
        " allows an idle client connection (6 KiB), the group's bookkeeping included",
    ),
    "keys": (
        4.0,
        "a key holds its 1 KiB body in the memory tier and the memory copy of its index row (key,"
        " about ten stored headers, dict and filter entries: about 2.5 KiB of Python objects with"
        " the body, measured with tracemalloc), rounded up for allocator slack",
    ),
    "clients": (6.0, "issue 7's target per idle keep-alive client connection"),
    "sessions": (
        20.0,
        "issue 7's target per idle WebSocket session (its client and upstream connections)",
    ),
}
SCALE_DIMENSIONS: Final = ("groups", "keys", "clients", "sessions")
SCALE_ITEM: Final[dict[str, str]] = {
    "groups": "origin",
    "keys": "key",
    "clients": "client",
    "sessions": "session",
}


@dataclass(frozen=True, slots=True, eq=False)  # one per file, compared by identity
class MemorySource:
    """One ``memory_bench.py --json`` file: where it is and how it was run."""

    path: str
    environment: dict[str, str]

    @property
    def command(self) -> str:
        return self.environment.get("command") or f"python bench/memory_bench.py (see {self.path})"

    def when(self) -> str:
        started = self.environment.get("started", "at an unrecorded time")
        wall = self.environment.get("wall time")
        return f"started {started}" + (f", {wall} wall" if wall else "")

    def busy(self) -> float:
        return _percent(self.environment.get("machine busy before start"))


@dataclass(frozen=True, slots=True)
class SoakData:
    source: MemorySource
    seconds: float  # asked of wrk (-d)
    warmup: float
    sample_seconds: float
    samples: tuple[tuple[float, int], ...]  # (s since the load started, VmRSS bytes)
    samples_used: int
    start_rss: int  # median of the first 3 samples after the warm-up
    end_rss: int  # median of the last 3
    max_rss: int
    after_load_rss: int
    growth_percent: float
    slope_kib_per_minute: float
    requests: int | None  # None: the load did not complete
    load_seconds: float | None
    rps: float | None
    cpu_us_per_request: float | None
    load_errors: dict[str, int]
    errors: tuple[str, ...]
    websocket_sessions: int
    client_batches: int
    load_description: str

    def error_count(self) -> int:
        return len(self.errors) + sum(self.load_errors.values()) + (self.requests is None)

    def verdict(self) -> str:
        if self.requests is None:
            return "n/a (the load did not complete)"
        if self.seconds < SOAK_MIN_SECONDS:
            return f"n/a (soak of {self.seconds:.0f} s)"
        return "PASS" if abs(self.growth_percent) <= SOAK_GROWTH_LIMIT else "FAIL"


@dataclass(frozen=True, slots=True)
class ScaleSide:
    """One population (the small or the large one) of a scaling dimension."""

    count: int
    requested: int
    held: int
    rss_before: int  # fresh proxyd after a warm-up
    rss_after: int  # with the population held, before the load runs
    rss_end: int  # after the load runs, population still held
    rps: list[float]  # per round
    cpu: list[float]  # CPU µs/request per round
    errors: list[str]

    @property
    def rps_median(self) -> float | None:
        return median_or_none(list(self.rps))

    @property
    def cpu_median(self) -> float | None:
        return median_or_none(list(self.cpu))

    @property
    def added(self) -> int:
        return self.rss_after - self.rss_before


@dataclass(frozen=True, slots=True)
class ScaleDimension:
    source: MemorySource
    dimension: str
    small: ScaleSide
    large: ScaleSide
    rounds: int
    seconds_per_run: float
    load_description: str

    @property
    def cpu_ratio(self) -> float | None:
        return ratio(self.large.cpu_median, self.small.cpu_median)

    @property
    def rps_ratio(self) -> float | None:
        return ratio(self.large.rps_median, self.small.rps_median)

    @property
    def budget_kib(self) -> float:
        return SCALE_RSS_BUDGET_KIB[self.dimension][0]

    @property
    def kib_per_extra_item(self) -> float | None:
        """(RSS added by the large population - by the small one) / the items between them."""
        extra = self.large.count - self.small.count
        return (self.large.added - self.small.added) / extra / KIB if extra > 0 else None

    def failures(self) -> list[str]:
        """Why this dimension fails the target ([] = passes); ``n/a`` when not measurable."""
        cpu, per = self.cpu_ratio, self.kib_per_extra_item
        if cpu is None or per is None:
            return ["n/a"]
        why = []
        if cpu > SCALE_CPU_LIMIT:
            why.append(f"CPU {cpu:.3f}x > {SCALE_CPU_LIMIT:g}x")
        if per > self.budget_kib:
            why.append(f"{per:.1f} KiB/{SCALE_ITEM[self.dimension]} > {self.budget_kib:g}")
        return why

    def verdict(self) -> str:
        why = self.failures()
        return "n/a" if why == ["n/a"] else "FAIL" if why else "PASS"


@dataclass(frozen=True, slots=True)
class MemoryBench:
    """The soak and the scaling dimensions of one or more memory_bench.py JSON files (a later
    file's soak, or dimension, replaces an earlier one's)."""

    sources: tuple[MemorySource, ...]
    soak: SoakData | None
    scaling: tuple[ScaleDimension, ...]

    def parts_of(self, source: MemorySource) -> str:
        parts = (["soak"] if self.soak is not None and self.soak.source is source else []) + [
            d.dimension for d in self.scaling if d.source is source
        ]
        return ", ".join(parts) or "nothing used"


def _int(value: object, default: int = 0) -> int:
    return int(value) if isinstance(value, int | float) else default


def _float(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _soak_of(source: MemorySource, soak: dict[str, object]) -> SoakData:
    raw_samples = soak.get("samples")
    samples = tuple(
        (float(t), int(rss))
        for t, rss in (raw_samples if isinstance(raw_samples, list) else [])
        if isinstance(t, int | float) and isinstance(rss, int | float)
    )
    warmup = _float(soak.get("warmup")) or 0.0
    # Older files lack the sampling interval and the count used: derive them.
    times = [t for t, _ in samples]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    raw_load = soak.get("load")
    load = raw_load if isinstance(raw_load, dict) else None
    load_errors = load.get("errors") if load is not None else None
    errors = soak.get("errors")
    return SoakData(
        source=source,
        seconds=_float(soak.get("seconds")) or 0.0,
        warmup=warmup,
        sample_seconds=_float(soak.get("sample_seconds")) or median_or_none(gaps) or 0.0,
        samples=samples,
        samples_used=_int(soak.get("samples_used"), sum(t >= warmup for t in times)),
        start_rss=_int(soak.get("start_rss")),
        end_rss=_int(soak.get("end_rss")),
        max_rss=_int(soak.get("max_rss")),
        after_load_rss=_int(soak.get("after_load_rss")),
        growth_percent=_float(soak.get("growth_percent")) or 0.0,
        slope_kib_per_minute=_float(soak.get("slope_kib_per_minute")) or 0.0,
        requests=_int(load.get("requests")) if load is not None else None,
        load_seconds=_float(load.get("seconds")) if load is not None else None,
        rps=_float(load.get("rps")) if load is not None else None,
        cpu_us_per_request=_float(load.get("cpu_us_per_request")) if load is not None else None,
        load_errors=(
            {str(k): _int(v) for k, v in load_errors.items()}
            if isinstance(load_errors, dict)
            else {}
        ),
        errors=tuple(str(e) for e in errors) if isinstance(errors, list) else (),
        websocket_sessions=_int(soak.get("websocket_sessions")),
        client_batches=_int(soak.get("client_batches")),
        load_description=str(soak.get("load_description") or ""),
    )


def _scaling_of(
    source: MemorySource, scaling: dict[str, object], args: dict[str, object]
) -> list[ScaleDimension]:
    pops = [p for p in _list(scaling.get("populations")) if isinstance(p, dict)]
    runs = [r for r in _list(scaling.get("runs")) if isinstance(r, dict)]
    dimensions = []
    for dimension in SCALE_DIMENSIONS:
        mine = sorted(
            (p for p in pops if p.get("dimension") == dimension), key=lambda p: _int(p["count"])
        )
        if len(mine) < 2:
            continue
        sides = []
        for pop in (mine[0], mine[-1]):
            count = _int(pop.get("count"))
            loads = [
                r["load"]
                for r in runs
                if r.get("dimension") == dimension
                and _int(r.get("count")) == count
                and isinstance(r.get("load"), dict)
            ]
            errors = [str(e) for e in _list(pop.get("errors"))]
            for load in loads:
                errors += [f"{k}={v}" for k, v in _dict(load.get("errors")).items() if v]
            sides.append(
                ScaleSide(
                    count=count,
                    requested=_int(pop.get("requested"), count),
                    held=_int(pop.get("held")),
                    rss_before=_int(pop.get("rss_before")),
                    rss_after=_int(pop.get("rss_after")),
                    rss_end=_int(pop.get("rss_end")),
                    rps=[v for v in (_float(load.get("rps")) for load in loads) if v is not None],
                    cpu=[
                        v
                        for v in (_float(load.get("cpu_us_per_request")) for load in loads)
                        if v is not None
                    ],
                    errors=errors,
                )
            )
        dimensions.append(
            ScaleDimension(
                source=source,
                dimension=dimension,
                small=sides[0],
                large=sides[1],
                rounds=max(
                    (_int(r.get("round")) for r in runs if r.get("dimension") == dimension),
                    default=0,
                ),
                seconds_per_run=_float(scaling.get("seconds_per_run"))
                or _float(args.get("duration"))
                or median_or_none(  # an older file: how long wrk ran
                    [
                        _float(_dict(r.get("load")).get("seconds"))
                        for r in runs
                        if r.get("dimension") == dimension
                    ]
                )
                or 0.0,
                load_description=str(
                    scaling.get("load")
                    or f"wrk -t 1 -c 50, 1 KiB through proxyd (see {source.path})"
                ),
            )
        )
    return dimensions


def _list(value: object) -> list[object]:
    return value if isinstance(value, list) else []


def _dict(value: object) -> dict[str, object]:
    return value if isinstance(value, dict) else {}


def load_memory_bench(paths: Sequence[str]) -> MemoryBench:
    """Read memory_bench.py's JSON files; a later file's soak or dimension replaces an earlier
    one's. BenchError when a file cannot be read or holds neither a soak nor scaling results."""
    sources: list[MemorySource] = []
    soak: SoakData | None = None
    scaling: dict[str, ScaleDimension] = {}
    for path in paths:
        try:
            document = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise BenchError(f"--memory-json {path}: {exc}") from None
        if not isinstance(document, dict):
            raise BenchError(f"--memory-json {path}: not a memory_bench.py --json file")
        env = {str(k): str(v) for k, v in _dict(document.get("environment")).items()}
        source = MemorySource(path, env)
        found = False
        if isinstance(document.get("soak"), dict):
            soak, found = _soak_of(source, document["soak"]), True
        args = _dict(document.get("args"))
        for dimension in _scaling_of(source, _dict(document.get("scaling")), args):
            scaling[dimension.dimension], found = dimension, True
        if not found:
            raise BenchError(
                f"--memory-json {path}: no soak and no scaling results in it (run"
                " memory_bench.py with --only soak,scaling)"
            )
        sources.append(source)
    ordered = tuple(scaling[d] for d in SCALE_DIMENSIONS if d in scaling)
    return MemoryBench(tuple(sources), soak, ordered)


# --- reporting ------------------------------------------------------------------------------------


def kib(value: float | None) -> str:
    return "-" if value is None else f"{value / KIB:,.1f}"


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def cell(value: float | None, base: float | None, digits: int = 0, show_ratio: bool = True) -> str:
    if value is None:
        return "-"
    r = ratio(value, base)
    return fmt(value, digits) + (f" ({r:.2f}x)" if show_ratio and r is not None else "")


def errors_text(error_dicts: Sequence[dict[str, int]]) -> str:
    totals: dict[str, int] = {}
    for errors in error_dicts:
        for kind, count in errors.items():
            totals[kind] = totals.get(kind, 0) + count
    return " ".join(f"{k}={v}" for k, v in totals.items() if v) or "none"


@dataclass
class Results:
    http: list[HttpRun] = field(default_factory=list)
    cache: list[HttpRun] = field(default_factory=list)
    tunnel: list[TunnelRun] = field(default_factory=list)
    ws: list[WsRun] = field(default_factory=list)
    opens: list[OpenRun] = field(default_factory=list)
    memory: list[MemoryRun] = field(default_factory=list)
    pac: dict[str, float] = field(default_factory=dict)
    workers: list[dict[str, object]] = field(default_factory=list)
    #: memory_bench.py's soak and scaling (--memory-json): another run, rendered but not
    #: counted in this run's exit status
    memory_bench: MemoryBench | None = None

    def http_median(self, scenario: str, target: str, attr: str) -> float | None:
        runs = self.cache if any(r.scenario == scenario for r in self.cache) else self.http
        return median_or_none(
            [getattr(r, attr) for r in runs if r.scenario == scenario and r.target == target]
        )

    def tunnel_median(self, target: str) -> float | None:
        return median_or_none([r.mb_per_s for r in self.tunnel if r.target == target])

    def ws_median(self, scenario: str, target: str) -> float | None:
        return median_or_none(
            [r.rate for r in self.ws if r.scenario == scenario and r.target == target and r.rate]
        )

    def open_median(self, target: str) -> float | None:
        return median_or_none([r.ms_median for r in self.opens if r.target == target])

    def memory_per(self, kind: str, target: str) -> float | None:
        return median_or_none(
            [m.bytes_per_connection for m in self.memory if m.kind == kind and m.target == target]
        )

    def failed(self) -> bool:
        return (
            any(r.errors for r in (*self.http, *self.cache))
            or any(r.errors for r in self.tunnel)
            or any(r.errors for r in self.ws)
            or any(r.errors for r in self.opens)
            or any(m.errors for m in self.memory)
        )


def matrix(results: Results, targets: Sequence[str], window: int) -> list[str]:
    """The one table: a row per measurement, a column per target, ``(Nx)`` = target ÷ proxyd."""
    lines = [
        "| measurement | " + " | ".join(targets) + " |",
        "|---|" + "---:|" * len(targets),
    ]

    def row(label: str, values: dict[str, float | None], digits: int = 0) -> None:
        base = values.get("proxyd")
        cells = [cell(values.get(t), base, digits, t != "proxyd") for t in targets]
        if any(c != "-" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")

    for scenario, _, connections in HTTP_SCENARIOS:
        if connections > 1:
            row(
                f"{scenario}: req/s",
                {t: results.http_median(scenario, t, "rps") for t in targets},
            )
            row(
                f"{scenario}: proxy CPU µs/request",
                {t: results.http_median(scenario, t, "cpu_us_per_request") for t in targets},
                1,
            )
        else:
            for attr, what in (("p50_ms", "p50"), ("p99_ms", "p99")):
                row(
                    f"{scenario}: {what} ms",
                    {t: results.http_median(scenario, t, attr) for t in targets},
                    3,
                )
    for scenario in dict.fromkeys(s for s, *_ in CACHE_SCENARIOS):
        row(
            f"cache {scenario} c50: req/s",
            {t: results.http_median(scenario, t, "rps") for t in targets},
        )
    row("CONNECT tunnel download: MB/s", {t: results.tunnel_median(t) for t in targets})
    for label in WS_SIZES:
        scenario = f"echo {label}"
        row(
            f"WebSocket echo {label}, {window} in flight: round trips/s",
            {t: results.ws_median(scenario, t) for t in targets},
        )
    row("WebSocket session open: ms", {t: results.open_median(t) for t in targets}, 2)
    for kind in ("idle HTTP connection", "idle WebSocket session"):
        per = {t: results.memory_per(kind, t) for t in targets}
        row(
            f"RSS per {kind}: KiB",
            {t: v / KIB if v is not None else None for t, v in per.items()},
            1,
        )
    return lines


def detail_tables(results: Results, targets: Sequence[str], args: argparse.Namespace) -> list[str]:
    lines: list[str] = []
    if results.http or results.cache:
        lines += [
            "",
            f"HTTP (wrk -t 1; medians of {args.rounds} round(s) x {args.duration}s, one"
            f" connection {max(1, args.duration - 1)}s; cache runs -c {CACHE_CONNECTIONS}):",
            "",
            "| scenario | target | req/s | x proxyd | per round | p50 ms | p99 ms"
            " | proxy CPU µs/req | proxy CPU % of a core | hits | errors |",
            "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---|",
        ]
        scenarios = [s for s, *_ in HTTP_SCENARIOS] + list(
            dict.fromkeys(s for s, *_ in CACHE_SCENARIOS)
        )
        for scenario in scenarios:
            runs = [r for r in (*results.http, *results.cache) if r.scenario == scenario]
            base = median_or_none([r.rps for r in runs if r.target == "proxyd"])
            for target in targets:
                http_runs = [r for r in runs if r.target == target]
                if not http_runs:
                    continue
                rps = median_or_none([r.rps for r in http_runs])
                share = median_or_none([r.hit_share for r in http_runs])
                lines.append(
                    f"| {scenario} | {target} | {fmt(rps)} | {fmt(ratio(rps, base), 2)}"
                    f" | {', '.join(fmt(r.rps) for r in http_runs)}"
                    f" | {fmt(median_or_none([r.p50_ms for r in http_runs]), 3)}"
                    f" | {fmt(median_or_none([r.p99_ms for r in http_runs]), 3)}"
                    f" | {fmt(median_or_none([r.cpu_us_per_request for r in http_runs]), 1)}"
                    f" | {percent(median_or_none([r.cpu_percent for r in http_runs]))}"
                    f" | {'-' if share is None else f'{100 * share:.1f}%'}"
                    f" | {errors_text([r.errors for r in http_runs])} |"
                )
        closers = sorted({r.target for r in (*results.http, *results.cache) if r.closed_by_proxy})
        if closers:
            lines += [
                "",
                f"{', '.join(closers)} answer(s) HTTP/1.0 and close the connection after every"
                " response, so wrk reconnects for each request; the EOF wrk reads there (its"
                ' "read" errors) is that close, not a failure, and is not counted as an error.',
            ]
    if results.tunnel:
        lines += [
            "",
            f"CONNECT tunnel (one {args.tunnel_mib} MiB download per round, at most"
            f" {args.tunnel_max_time}s each; a capped run's rate is over what arrived. The"
            " client shares its CPU with nginx, so direct is one core doing both ends):",
            "",
            "| target | MB/s | x proxyd | per round | proxy CPU s per GiB | capped runs | errors |",
            "|---|---:|---:|---|---:|---:|---|",
        ]
        base = results.tunnel_median("proxyd")
        for target in targets:
            tunnel_runs = [r for r in results.tunnel if r.target == target]
            if tunnel_runs:
                rate = results.tunnel_median(target)
                lines.append(
                    f"| {target} | {fmt(rate)} | {fmt(ratio(rate, base), 2)}"
                    f" | {', '.join(fmt(r.mb_per_s) for r in tunnel_runs)}"
                    f" | {fmt(median_or_none([r.cpu_s_per_gib for r in tunnel_runs]), 2)}"
                    f" | {sum(r.capped for r in tunnel_runs)}"
                    f" | {errors_text([r.errors for r in tunnel_runs])} |"
                )
    if results.ws:
        lines += [
            "",
            f"WebSocket echo (one connection, {args.ws_window} messages in flight,"
            f" {args.ws_duration}s per run; proxyd relays frames, Squid tunnels bytes,"
            " mitmproxy relays frames):",
            "",
            "| messages | target | round trips/s | x proxyd | MB/s each way | per round"
            " | proxy CPU µs/message | errors |",
            "|---|---|---:|---:|---:|---|---:|---|",
        ]
        for label, size in WS_SIZES.items():
            scenario = f"echo {label}"
            base = results.ws_median(scenario, "proxyd")
            for target in targets:
                ws_runs = [r for r in results.ws if r.scenario == scenario and r.target == target]
                if ws_runs:
                    rate = results.ws_median(scenario, target)
                    mbps = rate * size / 1e6 if rate is not None else None
                    errs = "; ".join(sorted({r.errors for r in ws_runs if r.errors})) or "none"
                    lines.append(
                        f"| {label} | {target} | {fmt(rate)} | {fmt(ratio(rate, base), 2)}"
                        f" | {fmt(mbps, 1)} | {', '.join(fmt(r.rate) for r in ws_runs)}"
                        f" | {fmt(median_or_none([r.cpu_us_per_message for r in ws_runs]), 1)}"
                        f" | {errs} |"
                    )
    if results.opens:
        lines += [
            "",
            f"Opening a WebSocket session (CONNECT + upgrade until the 101, {args.session_opens}"
            " sequential sessions per round):",
            "",
            "| target | ms (median) | x proxyd | p90 ms | sessions | errors |",
            "|---|---:|---:|---:|---:|---|",
        ]
        base = results.open_median("proxyd")
        for target in targets:
            open_runs = [r for r in results.opens if r.target == target]
            if open_runs:
                ms = results.open_median(target)
                errs = "; ".join(sorted({r.errors for r in open_runs if r.errors})) or "none"
                lines.append(
                    f"| {target} | {fmt(ms, 2)} | {fmt(ratio(ms, base), 2)}"
                    f" | {fmt(median_or_none([r.ms_p90 for r in open_runs]), 2)}"
                    f" | {sum(r.opened for r in open_runs)} | {errs} |"
                )
    if results.memory:
        lines += [
            "",
            "Memory (a fresh process per row; RSS of the proxy's process tree after the clients"
            " sat idle for a second, minus before, divided by the connections still open):",
            "",
            "| idle | target | open / asked | RSS before MiB | after MiB | KiB each | x proxyd"
            " | errors |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for kind in ("idle HTTP connection", "idle WebSocket session"):
            base = results.memory_per(kind, "proxyd")
            for m in results.memory:
                if m.kind == kind:
                    note = "" if m.bytes_per_connection is not None else " (closed by the proxy)"
                    note += f" ({m.note})" if m.note else ""
                    errs = (
                        f"{len(m.errors)}: {'; '.join(sorted(set(m.errors))[:2])}"
                        if m.errors
                        else "none"
                    )
                    lines.append(
                        f"| {kind} | {m.target} | {m.still_open}/{m.requested}{note}"
                        f" | {m.rss_before / MIB:.1f} | {m.rss_after / MIB:.1f}"
                        f" | {kib(m.bytes_per_connection)}"
                        f" | {fmt(ratio(m.bytes_per_connection, base), 2)} | {errs} |"
                    )
    if results.pac:
        lines += [
            "",
            "PAC decisions (pac_bench.py's corporate PAC file, 24 hosts round-robin, one at a"
            " time, on the proxy's CPU):",
            "",
            "| scenario | µs / decision | decisions / s |",
            "|---|---:|---:|",
        ]
        lines += [f"| {k} | {v:.1f} | {1e6 / v:,.0f} |" for k, v in results.pac.items()]
    if results.workers:
        lines += [
            "",
            "`workers: 2` against `workers: 1` (workers_bench.py: wrk -c 50, 1 KiB; nothing"
            " pinned, so nginx and wrk share the two cores with the workers):",
            "",
            "| scenario | workers | req/s | x workers: 1 | p50 ms | CPU µs/request | errors |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for row in results.workers:
            lines.append(
                f"| {row['scenario']} | {row['workers']} | {fmt(as_float(row['rps']))}"
                f" | {fmt(as_float(row['ratio']), 2)} | {fmt(as_float(row['p50_ms']), 2)}"
                f" | {fmt(as_float(row['cpu_us_per_request']), 1)} | {row['errors']} |"
            )
    return lines


@dataclass(frozen=True, slots=True)
class Target:
    """One target of issue 7: ``measured`` must compare with ``limit`` as ``op`` says."""

    text: str
    measured: float | None
    op: str  # ">=" or "<="
    limit: float
    unit: str
    detail: str
    #: for a target that is not one number against one limit: what the three columns say
    measured_text: str = ""
    required_text: str = ""
    verdict_text: str = ""

    def verdict(self) -> str:
        if self.verdict_text:
            return self.verdict_text
        if self.measured is None:
            return "n/a"
        ok = self.measured >= self.limit if self.op == ">=" else self.measured <= self.limit
        return "PASS" if ok else "FAIL"


def targets_of(results: Results) -> list[Target]:
    """Issue 7's targets, each from medians of the same run."""
    http, ws = results.http_median, results.ws_median
    one_kib, hundred, one_conn = (s for s, *_ in HTTP_SCENARIOS)

    def vs(scenario: str, peer: str, attr: str, digits: int = 0, unit: str = "") -> str:
        ours, theirs = http(scenario, "proxyd", attr), http(scenario, peer, attr)
        return f"proxyd {fmt(ours, digits)} vs {peer} {fmt(theirs, digits)}{unit}"

    def by_cpu(scenario: str, peer: str) -> str:
        """The same ratio from CPU per request: what each would do with the core to itself,
        steadier than req/s when other processes take turns on the proxy's CPU."""
        ours = http(scenario, "proxyd", "cpu_us_per_request")
        theirs = http(scenario, peer, "cpu_us_per_request")
        return f"; by CPU µs/request {fmt(ratio(theirs, ours), 2)}x"

    def ws_by_cpu(scenario: str, peer: str) -> str:
        ours = median_or_none(
            [
                r.cpu_us_per_message
                for r in results.ws
                if r.scenario == scenario and r.target == "proxyd"
            ]
        )
        theirs = median_or_none(
            [
                r.cpu_us_per_message
                for r in results.ws
                if r.scenario == scenario and r.target == peer
            ]
        )
        return f"; by CPU µs/message {fmt(ratio(theirs, ours), 2)}x"

    def kib_of(value: float | None) -> float | None:
        return value / KIB if value is not None else None

    rows = (
        (
            "1 KiB keep-alive req/s ≥ 1.2x proxy.py",
            ratio(http(one_kib, "proxyd", "rps"), http(one_kib, "proxy.py", "rps")),
            ">=",
            1.2,
            vs(one_kib, "proxy.py", "rps", unit=" req/s") + by_cpu(one_kib, "proxy.py"),
        ),
        (
            "100 KiB keep-alive req/s ≥ Squid",
            ratio(http(hundred, "proxyd", "rps"), http(hundred, "squid", "rps")),
            ">=",
            1.0,
            vs(hundred, "squid", "rps", unit=" req/s") + by_cpu(hundred, "squid"),
        ),
        (
            "one connection p50 ≤ Squid's",
            ratio(http(one_conn, "proxyd", "p50_ms"), http(one_conn, "squid", "p50_ms")),
            "<=",
            1.0,
            vs(one_conn, "squid", "p50_ms", 3, " ms"),
        ),
        (
            "1 KiB cache hits ≥ 2x misses",
            ratio(http("1 KiB hit", "proxyd", "rps"), http("1 KiB miss", "proxyd", "rps")),
            ">=",
            2.0,
            f"hit {fmt(http('1 KiB hit', 'proxyd', 'rps'))} vs miss"
            f" {fmt(http('1 KiB miss', 'proxyd', 'rps'))} req/s",
        ),
        (
            "1 MiB hits ≥ 2x Squid's hits",
            ratio(http("1 MiB hit", "proxyd", "rps"), http("1 MiB hit", "squid", "rps")),
            ">=",
            2.0,
            vs("1 MiB hit", "squid", "rps", unit=" req/s"),
        ),
        (
            "WebSocket 64 B echo ≥ 10x mitmproxy",
            ratio(ws("echo 64 B", "proxyd"), ws("echo 64 B", "mitmproxy")),
            ">=",
            10.0,
            f"proxyd {fmt(ws('echo 64 B', 'proxyd'))} vs mitmproxy"
            f" {fmt(ws('echo 64 B', 'mitmproxy'))} round trips/s"
            + ws_by_cpu("echo 64 B", "mitmproxy"),
        ),
        (
            "WebSocket 64 KiB echo ≥ ½ Squid's tunnel",
            ratio(ws("echo 64 KiB", "proxyd"), ws("echo 64 KiB", "squid")),
            ">=",
            0.5,
            f"proxyd {fmt(ws('echo 64 KiB', 'proxyd'))} vs squid"
            f" {fmt(ws('echo 64 KiB', 'squid'))} round trips/s" + ws_by_cpu("echo 64 KiB", "squid"),
        ),
    )
    targets = [
        Target(text, value, op, limit, "x", detail) for text, value, op, limit, detail in rows
    ]
    opened = results.open_median("proxyd")
    conn = kib_of(results.memory_per("idle HTTP connection", "proxyd"))
    sess = kib_of(results.memory_per("idle WebSocket session", "proxyd"))
    squid_open = results.open_median("squid")
    targets += [
        Target(
            "session open ≤ 1.5 ms",
            opened,
            "<=",
            1.5,
            " ms",
            f"proxyd {fmt(opened, 2)} ms vs squid {fmt(squid_open, 2)} ms",
        ),
        Target("≤ 6 KiB RSS per idle connection", conn, "<=", 6.0, " KiB", f"{fmt(conn, 1)} KiB"),
        Target(
            "≤ 20 KiB RSS per idle WebSocket session",
            sess,
            "<=",
            20.0,
            " KiB",
            f"{fmt(sess, 1)} KiB",
        ),
    ]
    memory = results.memory_bench
    return [
        *targets,
        soak_target(memory.soak if memory else None),
        scaling_target(memory.scaling if memory else ()),
    ]


def soak_target(soak: SoakData | None) -> Target:
    text = f"RSS flat within {SOAK_GROWTH_LIMIT:g}% over a 10-minute soak"
    required = f"\\|growth\\| ≤ {SOAK_GROWTH_LIMIT:g} % over ≥ {SOAK_MIN_SECONDS:.0f} s"
    if soak is None:
        return Target(
            text,
            None,
            "<=",
            SOAK_GROWTH_LIMIT,
            " %",
            "not given: `python bench/memory_bench.py --only soak --json FILE`, then"
            " `--memory-json FILE`",
            required_text=required,
            verdict_text="n/a (no soak)",
        )
    errors = soak.error_count()
    return Target(
        text,
        abs(soak.growth_percent),
        "<=",
        SOAK_GROWTH_LIMIT,
        " %",
        f"RSS {soak.start_rss / MIB:.1f} → {soak.end_rss / MIB:.1f} MiB (medians of 3 samples,"
        f" after a {soak.warmup:.0f} s warm-up), slope {soak.slope_kib_per_minute:+,.1f} KiB/min;"
        f" {fmt(soak.rps)} req/s, errors {errors or 'none'} (section Soak)",
        measured_text=f"{soak.growth_percent:+.2f} % in {soak.seconds:.0f} s",
        required_text=required,
        verdict_text=soak.verdict(),
    )


def scaling_target(dimensions: Sequence[ScaleDimension]) -> Target:
    text = "CPU/request and RSS do not grow 10 → 10,000"
    budgets = ", ".join(
        f"{d} {SCALE_RSS_BUDGET_KIB[d][0]:g}"
        for d in SCALE_DIMENSIONS
        if not dimensions or d in {x.dimension for x in dimensions}
    )
    required = (
        f"each dimension: CPU µs/req large/small ≤ {SCALE_CPU_LIMIT:g}x, RSS per extra item"
        f" ≤ what it holds ({budgets} KiB)"
    )
    if not dimensions:
        return Target(
            text,
            None,
            "<=",
            SCALE_CPU_LIMIT,
            "x",
            "not given: `python bench/memory_bench.py --only scaling --json FILE`, then"
            " `--memory-json FILE`",
            required_text=required,
            verdict_text="n/a (no scaling run)",
        )
    verdicts = [d.verdict() for d in dimensions]
    verdict = "FAIL" if "FAIL" in verdicts else "n/a" if "n/a" in verdicts else "PASS"
    worst_cpu = max((d.cpu_ratio for d in dimensions if d.cpu_ratio is not None), default=None)
    worst_rss = max(
        (d.kib_per_extra_item / d.budget_kib for d in dimensions if d.kib_per_extra_item),
        default=None,
    )
    parts = []
    for d in dimensions:
        why = d.failures()
        per = d.kib_per_extra_item
        errors = len(d.small.errors) + len(d.large.errors)
        parts.append(
            f"{d.dimension} {d.small.count:,} → {d.large.count:,}: CPU"
            f" {fmt(d.cpu_ratio, 3)}x, {fmt(per, 1)} KiB/{SCALE_ITEM[d.dimension]}"
            + (f", {errors} error(s)" if errors else "")
            + (f" ({d.verdict()}: {'; '.join(why)})" if why and why != ["n/a"] else "")
        )
    missing = [d for d in SCALE_DIMENSIONS if d not in {x.dimension for x in dimensions}]
    if missing:
        parts.append(f"not measured: {', '.join(missing)}")
    return Target(
        text,
        worst_cpu,
        "<=",
        SCALE_CPU_LIMIT,
        "x",
        "; ".join(parts) + " (section Scaling)",
        measured_text=f"CPU up to {fmt(worst_cpu, 3)}x; RSS/item up to"
        f" {fmt(None if worst_rss is None else 100 * worst_rss)} % of its budget",
        required_text=required,
        verdict_text=verdict,
    )


def targets_table(results: Results) -> list[str]:
    lines = [
        "| target (issue 7) | measured | required | result | numbers (medians, same run) |",
        "|---|---:|---:|---|---|",
    ]
    for t in targets_of(results):
        measured = t.measured_text or (
            f"{fmt(t.measured, 2)}{t.unit if t.measured is not None else ''}"
        )
        lines.append(
            f"| {t.text} | {measured} | {t.required_text or f'{t.op} {t.limit:g}{t.unit}'}"
            f" | **{t.verdict()}** | {t.detail} |"
        )
    return lines


def memory_bench_sections(memory: MemoryBench) -> list[str]:
    """The soak and the scaling check of memory_bench.py (its own run, given with
    --memory-json), each with the command and time of the run it comes from."""
    lines: list[str] = []
    if memory.soak is not None:
        lines += soak_section(memory.soak)
    if memory.scaling:
        lines += scaling_section(memory.scaling)
    return lines


def source_line(source: MemorySource) -> str:
    env = source.environment
    line = (
        f"From `{source.command}`, {source.when()}; proxyd {env.get('proxyd', '?')};"
        f" {env.get('machine', '?')}; {env.get('pinning', 'pinning unknown')}; machine busy"
        f" before start {env.get('machine busy before start', '?')}."
    )
    if source.busy() > 10:
        line += " **The machine was busy: the numbers are noisy.**"
    return line


def rss_samples_line(soak: SoakData, at_most: int = 24) -> str:
    """The RSS samples, thinned to ``at_most`` evenly spaced ones (the first, the last and the
    first after the warm-up always kept); ``|`` marks the end of the warm-up."""
    samples = soak.samples
    if not samples:
        return "no RSS samples"
    keep = {0, len(samples) - 1}
    keep |= {round(i * (len(samples) - 1) / (at_most - 1)) for i in range(at_most)}
    first_used = next((i for i, (t, _) in enumerate(samples) if t >= soak.warmup), None)
    if first_used is not None:
        keep.add(first_used)
    words = []
    for i in sorted(keep):
        t, rss = samples[i]
        mark = "| " if i == first_used and i > 0 else ""
        words.append(f"{mark}{t:.0f} s {rss / MIB:.1f}")
    thinned = "" if len(keep) == len(samples) else f", {len(keep)} of {len(samples)} shown"
    return (
        f"RSS samples (MiB at s since the load started, every {soak.sample_seconds:g} s{thinned};"
        f" `|` = end of the warm-up): " + ", ".join(words)
    )


def soak_section(soak: SoakData) -> list[str]:
    load = (
        f"{soak.requests:,} requests in {fmt(soak.load_seconds, 1)} s"
        if soak.requests is not None
        else "the load did not complete"
    )
    span = (soak.samples[-1][0] - soak.warmup) if soak.samples else 0.0
    over_span = (
        soak.slope_kib_per_minute * span / 60 * KIB / soak.start_rss * 100
        if soak.start_rss
        else None
    )
    lines = [
        "",
        "## Soak (bench/memory_bench.py)",
        "",
        source_line(soak.source),
        "",
        f"A fresh proxyd under steady load for {soak.seconds:.0f} s: {soak.load_description}."
        f" VmRSS every {soak.sample_seconds:g} s; the first {soak.warmup:.0f} s are warm-up (the"
        f" cache fills to its bounds, pools and allocator arenas reach their working size); the"
        f" growth is the median of the last 3 samples against the median of the first 3 after"
        f" the warm-up, the slope a least-squares fit over the same {soak.samples_used} samples."
        f" CPU per request includes the WebSocket and idle-client churn.",
        "",
        "| soak | warm-up | load | req/s | CPU µs/request | RSS first 3 (median) | RSS last 3"
        " (median) | growth | slope | RSS max | after the load | errors |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| {soak.seconds:.0f} s | {soak.warmup:.0f} s | {load} | {fmt(soak.rps)}"
        f" | {fmt(soak.cpu_us_per_request, 1)} | {soak.start_rss / MIB:.1f} MiB"
        f" | {soak.end_rss / MIB:.1f} MiB | **{soak.growth_percent:+.2f} %**"
        f" | {soak.slope_kib_per_minute:+,.1f} KiB/min"
        + (f" ({over_span:+.2f} % over {span:.0f} s)" if over_span is not None else "")
        + f" | {soak.max_rss / MIB:.1f} MiB | {soak.after_load_rss / MIB:.1f} MiB"
        f" | {soak.error_count() or 'none'} |",
        "",
        f"Meanwhile {soak.websocket_sessions:,} WebSocket sessions were opened, echoed through and"
        f" closed, and {soak.client_batches:,} batches of 200 idle clients opened and dropped.",
        "",
        rss_samples_line(soak),
    ]
    if soak.error_count():
        counted = collections.Counter(soak.errors)
        lines += ["", "Errors during the soak:", ""]
        lines += [f"- wrk/proxyd: {errors_text([soak.load_errors])}"] if soak.load_errors else []
        lines += [f"- x{n}: {text}" for text, n in counted.most_common(5)]
        if soak.requests is None:
            lines.append("- the load (wrk) did not complete")
    return lines


def scaling_section(dimensions: Sequence[ScaleDimension]) -> list[str]:
    first = dimensions[0]
    lines = [
        "",
        "## Scaling: 10 against 10,000 (bench/memory_bench.py)",
        "",
    ]
    for source in dict.fromkeys(d.source for d in dimensions):
        mine = ", ".join(d.dimension for d in dimensions if d.source is source)
        lines += [f"{mine}: {source_line(source)}", ""]
    plans = {d.dimension: f"{d.rounds} round(s) of {d.seconds_per_run:.3g} s" for d in dimensions}
    rounds = (
        next(iter(plans.values()))
        if len(set(plans.values())) == 1
        else ", ".join(f"{k} {v}" for k, v in plans.items())
    )
    lines += [
        f"Load: {first.load_description}; {rounds}. `groups`: distinct origins, each a pool group"
        " with an idle upstream socket, requested round-robin; `keys`: distinct stored cache"
        " keys, all hits; `clients`: idle keep-alive client connections held beside the load;"
        " `sessions`: idle WebSocket sessions held beside it. RSS before is the fresh proxyd"
        " after a warm-up (for `groups` it includes the config's `dns.hosts` entry per origin);"
        " added is what holding the population added; during the runs is the change while the"
        " load ran with the population held.",
        "",
        "| dimension | count (held) | req/s | per round | CPU µs/request | RSS before MiB"
        " | RSS added MiB | during the runs KiB | errors |",
        "|---|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for d in dimensions:
        for side in (d.small, d.large):
            capped = (
                f", {side.requested:,} asked (file descriptors)"
                if side.requested > side.count
                else ""
            )
            errs = (
                f"{len(side.errors)}: {'; '.join(sorted(set(side.errors))[:2])}"
                if side.errors
                else "none"
            )
            lines.append(
                f"| {d.dimension} | {side.count:,} ({side.held:,}{capped}) | {fmt(side.rps_median)}"
                f" | {', '.join(fmt(v) for v in side.rps)} | {fmt(side.cpu_median, 1)}"
                f" | {side.rss_before / MIB:.1f} | {side.added / MIB:.1f}"
                f" | {(side.rss_end - side.rss_after) / KIB:+,.0f} | {errs} |"
            )
    lines += [
        "",
        "| dimension | req/s large/small | CPU µs/request large/small"
        f" (≤ {SCALE_CPU_LIMIT:g}) | RSS per extra item KiB (≤ budget) | result |",
        "|---|---:|---:|---:|---|",
    ]
    for d in dimensions:
        why = d.failures()
        lines.append(
            f"| {d.dimension} | {fmt(d.rps_ratio, 3)}x | {fmt(d.cpu_ratio, 3)}x"
            f" | {fmt(d.kib_per_extra_item, 1)} (≤ {d.budget_kib:g})"
            f" | **{d.verdict()}**{': ' + '; '.join(why) if why and why != ['n/a'] else ''} |"
        )
    lines += [
        "",
        "RSS per extra item = (RSS added by the large population - by the small one) / (large -"
        " small count). The budget is what one item holds, so a larger figure means something"
        " grows with the population beyond the items themselves:",
        "",
        *(
            f"- {d.dimension}: {d.budget_kib:g} KiB per {SCALE_ITEM[d.dimension]}:"
            f" {SCALE_RSS_BUDGET_KIB[d.dimension][1]}."
            for d in dimensions
        ),
    ]
    return lines


# --- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="proxyd against direct and its peers (squid, tinyproxy, proxy.py, mitmproxy)"
        " in one run; prints markdown tables and the issue's targets."
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--duration", type=int, default=3, help="seconds per wrk run (default 3)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run (~2 min): 1 round, 1 s runs, fewer idle clients, 256 MiB tunnel",
    )
    parser.add_argument("--peers", default=",".join(PEERS), help=f"default {','.join(PEERS)}")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"default {','.join(PHASES)}")
    parser.add_argument("--ws-duration", type=float, default=2.0, help="s per WebSocket run")
    parser.add_argument("--ws-window", type=int, default=100, help="messages in flight (100)")
    parser.add_argument("--session-opens", type=int, default=50, help="per target per round")
    parser.add_argument("--idle-clients", type=int, default=5000, help="idle keep-alive clients")
    parser.add_argument("--idle-sessions", type=int, default=1000, help="idle WebSocket sessions")
    parser.add_argument("--tunnel-mib", type=int, default=1024, help="tunnel download (MiB)")
    parser.add_argument("--tunnel-max-time", type=int, default=8, help="s per download, at most")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=CACHE_HOME / "proxyd-bench",
        help="where the PyPI peers' virtualenvs live (default ~/.cache/proxyd-bench)",
    )
    parser.add_argument(
        "--proxyd-root",
        type=Path,
        default=REPO_ROOT,
        help="run the proxyd daemons from this source tree (default: this repository), e.g. an"
        " unpacked `git archive` of another commit; the pac and workers phases always use this one",
    )
    parser.add_argument("--report", metavar="FILE", help="also write the markdown report here")
    parser.add_argument("--json", metavar="FILE", help="also write every run here")
    parser.add_argument(
        "--memory-json",
        metavar="FILE",
        action="append",
        default=[],
        help="a `memory_bench.py --json` file whose soak and scaling results go into the report"
        " and the targets table (repeat it to combine files; a later file's soak or dimension"
        " replaces an earlier one's); works with any --phases",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.ws_duration = 1, 1, 0.5
        args.idle_clients = min(args.idle_clients, 1000)
        args.idle_sessions = min(args.idle_sessions, 200)
        args.tunnel_mib = min(args.tunnel_mib, 256)
        args.session_opens = min(args.session_opens, 20)
        args.tunnel_max_time = min(args.tunnel_max_time, 8)
    args.peer_list = [p for p in args.peers.split(",") if p]
    args.phase_list = [p for p in args.phases.split(",") if p]
    if unknown := set(args.peer_list) - set(PEERS):
        parser.error(f"--peers: unknown {sorted(unknown)}; choose from {','.join(PEERS)}")
    if unknown := set(args.phase_list) - set(PHASES):
        parser.error(f"--phases: unknown {sorted(unknown)}; choose from {','.join(PHASES)}")
    checks = (
        (1 <= args.rounds <= 20, "--rounds must be from 1 to 20"),
        (1 <= args.duration <= 60, "--duration must be from 1 to 60 seconds"),
        (0.2 <= args.ws_duration <= 30, "--ws-duration must be from 0.2 to 30 seconds"),
        (1 <= args.ws_window <= 1000, "--ws-window must be from 1 to 1000"),
        (1 <= args.session_opens <= 1000, "--session-opens must be from 1 to 1000"),
        (10 <= args.idle_clients <= 8000, "--idle-clients must be from 10 to 8000"),
        (10 <= args.idle_sessions <= 4000, "--idle-sessions must be from 10 to 4000"),
        (1 <= args.tunnel_mib <= 8192, "--tunnel-mib must be from 1 to 8192"),
        (1 <= args.tunnel_max_time <= 120, "--tunnel-max-time must be from 1 to 120 seconds"),
    )
    for ok, message in checks:
        if not ok:
            parser.error(message)
    # Read now, so a wrong file stops the comparison before it runs for minutes.
    try:
        args.memory_bench = load_memory_bench(args.memory_json) if args.memory_json else None
    except BenchError as exc:
        parser.error(str(exc))
    return args


def busy_jiffies() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat. Busy is user + nice +
    system only: interrupt time (the loopback traffic of the run itself) is nobody's process."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return values[0] + values[1] + values[2], sum(values[:8])


def own_cpu_seconds() -> float:
    """This process and its waited-for children (everything started here, once stopped)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def environment(tools: Tools, pinning: Pinning, args: argparse.Namespace) -> dict[str, str]:
    lscpu = hb.run_text(["lscpu"])
    model = next(
        (ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")),
        hb.cpu_model(),
    )
    env = {
        "machine": f"{model}; {os.cpu_count()} CPUs"
        f" (nproc {hb.first_line(hb.run_text(['nproc']))}),"
        f" {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB;"
        f" {platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        **versions(tools, args.proxyd_root),
        "pinning": pinning.description.replace("proxyd", "each proxy").replace(
            "nginx and wrk",
            "nginx, wrk and this process (tunnel and WebSocket clients, WebSocket origin)",
        ),
        "command": "python bench/compare.py " + " ".join(sys.argv[1:]),
    }
    for peer, why in tools.missing.items():
        env[peer] = f"NOT MEASURED: {why}"
    memory: MemoryBench | None = args.memory_bench
    if memory is not None:
        for source in memory.sources:
            env[f"memory_bench.py ({memory.parts_of(source)})"] = (
                f"`{source.command}`, {source.when()} (its own run; --memory-json {source.path})"
            )
    busy = hb.machine_busy_percent()
    env["machine busy before start"] = f"{busy:.0f}% of all CPUs (loadavg {os.getloadavg()[0]:.2f})"
    for key, value in env.items():
        print(f"# {key}: {value}")
    if busy > 10:
        print("# WARNING: something else is using the CPUs; the numbers will be noisy")
    return env


def run(args: argparse.Namespace) -> int:
    if sys.platform != "linux":
        raise BenchError("this comparison needs Linux (/proc, taskset)")
    started = time.monotonic()
    tools = find_tools(args.peer_list, args.cache_dir)
    pinning = hb.choose_pinning(not args.no_pin)
    fd_limit = wb.raise_fd_limit(2 * max(args.idle_clients, args.idle_sessions) + 1024)
    env = environment(tools, pinning, args)
    env["file descriptors"] = str(fd_limit)
    if pinning.load_prefix:
        os.sched_setaffinity(0, {int(pinning.load_prefix[-1])})  # this process is load, too
    busy_start, own_start = busy_jiffies(), own_cpu_seconds()
    results = Results(memory_bench=args.memory_bench)
    phases = args.phase_list
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="proxyd-compare-")))
        tmp.chmod(0o711)  # Squid runs as "proxy" and must reach its own directory in here
        origin_port = hb.free_port()
        tunnel_file = start_nginx(
            tools.nginx, tmp, origin_port, args.tunnel_mib * MIB, pinning, stack
        )
        ctx = Context(tools, pinning, tmp, origin_port, tunnel_file, args)
        ctx.dead.update(tools.missing)
        names = ["proxyd", *tools.peers]
        if "cache" in phases:
            names += ["proxyd-cache", *(["squid-cache"] if "squid" in tools.peers else [])]
        start_all(ctx, names, stack)
        print(f"# origin nginx {LOOPBACK}:{origin_port}; temporary directory {tmp}")
        if "http" in phases:
            with ctx.phase("http"):
                results.http = run_http(ctx)
        if "cache" in phases:
            with ctx.phase("cache"):
                results.cache = run_cache(ctx)
        if "tunnel" in phases:
            with ctx.phase("tunnel"):
                results.tunnel = run_tunnel(ctx)
        if "ws" in phases or "memory" in phases:
            results.ws, results.opens, results.memory = asyncio.run(run_async(ctx, phases))
        for proxy in ctx.proxies.values():
            stop_tree(proxy.proc, proxy.label)
        if "pac" in phases:
            with ctx.phase("pac"):
                results.pac = run_pac(ctx)
        if "workers" in phases:
            with ctx.phase("workers"):
                results.workers = run_workers(ctx)
        env["phases"] = ", ".join(f"{k} {v:.0f}s" for k, v in ctx.phase_seconds.items())
        logs = {
            label: [ln for ln in p.log.read_text(errors="replace").splitlines() if ln.strip()]
            for label, p in ctx.proxies.items()
        }
        dead = dict(ctx.dead)
        notes = list(ctx.notes)
    busy_end, own_end = busy_jiffies(), own_cpu_seconds()
    ticks = os.sysconf("SC_CLK_TCK")
    wall = time.monotonic() - started
    span = (busy_end[1] - busy_start[1]) / ticks  # CPU-seconds of all CPUs over the run
    others = (busy_end[0] - busy_start[0]) / ticks - (own_end - own_start)
    env["wall time"] = f"{wall:.0f}s"
    env["other processes during the run"] = (
        f"{max(0.0, 100 * others / span):.0f}% of all CPUs" if span > 0 else "unknown"
    )
    print(f"# wall time {wall:.0f}s; {env['other processes during the run']} used by others")
    report = build_report(env, results, args, dead, logs, tools, notes)
    print()
    print("\n".join(report))
    if args.report:
        Path(args.report).write_text("\n".join(report) + "\n")
        print(f"# wrote {args.report}")
    if args.json:
        document = {
            "environment": env,
            "args": {k: str(v) for k, v in vars(args).items() if k != "memory_bench"},
            "not_measured": dead,
            "http": [asdict(r) for r in results.http],
            "cache": [asdict(r) for r in results.cache],
            "tunnel": [asdict(r) for r in results.tunnel],
            "ws": [asdict(r) for r in results.ws],
            "session_open": [asdict(r) for r in results.opens],
            "memory": [asdict(m) for m in results.memory],
            "pac": results.pac,
            "workers": results.workers,
            "targets": [{**asdict(t), "verdict": t.verdict()} for t in targets_of(results)],
            "memory_bench": asdict(results.memory_bench) if results.memory_bench else None,
        }
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
        print(f"# wrote {args.json}")
    return 2 if results.failed() else 0


async def run_async(
    ctx: Context, phases: Sequence[str]
) -> tuple[list[WsRun], list[OpenRun], list[MemoryRun]]:
    origin = wb.Origin()
    await origin.start()
    ws: list[WsRun] = []
    opens: list[OpenRun] = []
    memory: list[MemoryRun] = []
    try:
        if "ws" in phases:
            with ctx.phase("ws"):
                ws, opens = await run_ws(ctx, origin)
        if "memory" in phases:
            with ctx.phase("memory"):
                memory = await run_memory(ctx, origin)
    finally:
        if origin.server is not None:
            origin.server.close()
    return ws, opens, memory


def build_report(
    env: dict[str, str],
    results: Results,
    args: argparse.Namespace,
    dead: dict[str, str],
    logs: dict[str, list[str]],
    tools: Tools,
    notes: Sequence[str] = (),
) -> list[str]:
    targets = ["direct", "proxyd", *(p for p in PEERS if p in tools.peers)]
    lines = [
        "# proxyd against its peers, one run",
        "",
        f"Written by `bench/compare.py` on {time.strftime('%Y-%m-%d %H:%M %Z')}"
        f" ({'a --quick smoke run' if args.quick else f'{args.rounds} interleaved rounds'});"
        " refresh it with `python bench/compare.py --report bench/RESULTS.md` after changing"
        " the hot path. How each number is measured: the docstring of bench/compare.py and"
        " bench/README.md.",
        "",
        "## Machine and versions",
        "",
    ]
    lines += [f"- **{k}**: {v}" for k, v in env.items()]
    noisy = (
        _percent(env.get("machine busy before start")) > 10
        or _percent(env.get("other processes during the run")) > 10
    )
    if noisy:
        lines += [
            "",
            "**This machine is shared and was busy with other work (see above): the numbers are"
            " noisy.** Other processes took turns on the proxies' CPU, so a proxy's req/s depends"
            " on how much of its core it got (the `proxy CPU % of a core` column below; the"
            " scheduler shares a contended core per thread, so a proxy with a thread per"
            " connection, tinyproxy, gets more of it than a single-threaded one). The"
            " rounds are interleaved, so drift hits every target alike; the ratios measured in"
            " the same run, and above all the CPU time per request (what each proxy costs, whoever"
            " else runs), are steadier than the absolute numbers. The targets table gives the"
            " throughput ratios both ways.",
        ]
    lines += [
        "",
        "## All targets, one table",
        "",
        "Medians over the rounds; `(Nx)` is the target's number divided by proxyd's (for req/s,"
        " MB/s and round trips/s higher is better; for CPU, latency, ms and KiB lower is better).",
        "",
        *matrix(results, targets, args.ws_window),
        "",
        "## Targets of issue 7",
        "",
        *targets_table(results),
        "",
        "## Details",
        *detail_tables(results, targets, args),
    ]
    if notes:
        lines += ["", "Notes:", "", *(f"- {note}" for note in notes)]
    if dead:
        lines += ["", "Not measured (or no longer, from the moment it failed):", ""]
        lines += [
            f"- {label}: {why.splitlines()[0] if why else why}" for label, why in dead.items()
        ]
    if results.memory_bench is not None:
        lines += memory_bench_sections(results.memory_bench)
    noisy_logs = {k: [ln for ln in v if "Pinger" not in ln][-5:] for k, v in logs.items() if v}
    if any(noisy_logs.values()) and not args.report:
        lines += ["", "Output of the proxies (last lines each):", ""]
        for label, tail in noisy_logs.items():
            lines += [f"    {label}: {ln}" for ln in tail]
    return lines


def _percent(text: str | None) -> float:
    try:
        return float((text or "0").split("%", 1)[0])
    except ValueError:
        return 0.0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return hb.run_main("compare", lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())

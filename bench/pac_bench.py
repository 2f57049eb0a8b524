"""Microseconds per PAC decision for a typical corporate PAC file, uncached and cached.

Run it from the repository root with the project's virtualenv active::

    python bench/pac_bench.py                  # about 10 s
    python bench/pac_bench.py --duration 0.2   # quicker, noisier

How it works:

* **The script** (``CORPORATE_PAC`` below) is what a corporate PAC file usually is: about thirty
  rules -- plain host names and intranet domains DIRECT (``isPlainHostName``, ``dnsDomainIs``),
  private networks DIRECT for IP-literal hosts (``isInNet``), ``shExpMatch`` lists for update
  servers, partner sites and media, per-scheme choices -- ending in a proxy chain. It calls no
  DNS helper on names, so nothing resolves (the injected resolver would refuse anyway).
* **The hosts**: 24 request hosts that stop at different rules, the default at the end (the
  longest walk) included, used round-robin.
* **Scenarios**, each timed for ``--duration`` seconds, ``--rounds`` times, median reported:

  - ``engine``: ``PacEngine.evaluate`` called directly on one thread: the JavaScript cost alone;
  - ``router, uncached``: ``Router.decide`` with ``pac.cache_size: 0``: the thread hop to the PAC
    worker and back (``JsThread``), the evaluation, ``parse_pac_result`` and the bad-proxy order;
  - ``router, cached``: ``Router.decide`` with the default cache: after the first round of hosts
    every decision is an LRU hit;
  - ``router, static``: ``Router.decide`` in static mode with an equivalent rule list, for scale.

  Each scenario runs sequentially (one decision at a time), so the numbers are latency per
  decision, not throughput under concurrency.

The output is a small markdown table (µs per decision, decisions per second) and the ratio of
uncached to cached. Only the local machine is involved: no sockets, no DNS.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import trio

from proxyd.config import RoutingConfig
from proxyd.routing.pac.engine import PacEngine
from proxyd.routing.router import Router

CORPORATE_PAC = r"""
// A typical corporate PAC file: ~30 rules, no DNS lookups of names.
function FindProxyForURL(url, host) {
    host = host.toLowerCase();
    // 1-4: local names and intranet domains go direct
    if (isPlainHostName(host)) return "DIRECT";
    if (shExpMatch(host, "localhost") || shExpMatch(host, "*.localhost")) return "DIRECT";
    if (dnsDomainIs(host, ".corp.example") || dnsDomainIs(host, ".internal.example"))
        return "DIRECT";
    if (dnsDomainIs(host, ".lab.example") || localHostOrDomainIs(host, "intranet.example"))
        return "DIRECT";
    // 5-10: private and link-local networks, for IP-literal hosts only (no DNS)
    if (/^\d+\.\d+\.\d+\.\d+$/.test(host)) {
        if (isInNet(host, "10.0.0.0", "255.0.0.0")) return "DIRECT";
        if (isInNet(host, "172.16.0.0", "255.240.0.0")) return "DIRECT";
        if (isInNet(host, "192.168.0.0", "255.255.0.0")) return "DIRECT";
        if (isInNet(host, "127.0.0.0", "255.0.0.0")) return "DIRECT";
        if (isInNet(host, "169.254.0.0", "255.255.0.0")) return "DIRECT";
        if (isInNet(host, "100.64.0.0", "255.192.0.0")) return "PROXY cgnat.proxy.example:3128";
    }
    // 11-16: update servers through the update proxy
    if (shExpMatch(host, "*.windowsupdate.com") || shExpMatch(host, "*.update.microsoft.com"))
        return "PROXY updates.proxy.example:8080; DIRECT";
    if (shExpMatch(host, "*.apple.com") && shExpMatch(url, "*swcdn*"))
        return "PROXY updates.proxy.example:8080; DIRECT";
    if (dnsDomainIs(host, ".ubuntu.com") || dnsDomainIs(host, ".debian.org"))
        return "PROXY updates.proxy.example:8080; DIRECT";
    // 17-22: partners over a dedicated proxy, media over another
    if (shExpMatch(host, "*.partner-one.example") || shExpMatch(host, "*.partner-two.example"))
        return "PROXY partners.proxy.example:3128";
    if (shExpMatch(host, "*.partner-three.example") || shExpMatch(host, "portal.partner-*.example"))
        return "PROXY partners.proxy.example:3128";
    if (shExpMatch(host, "*.video.example") || shExpMatch(host, "*.stream.example"))
        return "PROXY media.proxy.example:3128; PROXY proxy1.example:3128";
    if (shExpMatch(host, "cdn*.media.example")) return "PROXY media.proxy.example:3128";
    // 23-26: by scheme
    if (url.substring(0, 4) === "ftp:") return "PROXY ftp.proxy.example:2121";
    if (url.substring(0, 6) === "https:" && dnsDomainIs(host, ".bank.example")) return "DIRECT";
    if (url.substring(0, 3) === "ws:") return "PROXY ws.proxy.example:3128";
    if (dnsDomainLevels(host) > 6) return "PROXY proxy2.example:3128";
    // 27-30: blocked and special
    if (shExpMatch(host, "*.ads.example") || shExpMatch(host, "tracker.*"))
        return "PROXY 127.0.0.1:9";
    if (shExpMatch(host, "*.gov.example")) return "PROXY gov.proxy.example:3128";
    if (shExpMatch(host, "*.socks-only.example")) return "SOCKS5 socks.proxy.example:1080";
    return "PROXY proxy1.example:3128; PROXY proxy2.example:3128; DIRECT";
}
"""

HOSTS: tuple[tuple[str, str], ...] = (
    ("http", "intranet"),
    ("http", "wiki.corp.example"),
    ("https", "build.lab.example"),
    ("http", "10.20.30.40"),
    ("http", "192.168.1.10"),
    ("http", "100.64.1.1"),
    ("http", "8.8.8.8"),
    ("http", "download.windowsupdate.com"),
    ("http", "archive.ubuntu.com"),
    ("https", "app.partner-one.example"),
    ("https", "portal.partner-four.example"),
    ("https", "live.video.example"),
    ("https", "cdn7.media.example"),
    ("https", "online.bank.example"),
    ("http", "a.b.c.d.e.f.g.example"),
    ("http", "x.ads.example"),
    ("https", "www.gov.example"),
    ("https", "app.socks-only.example"),
    ("https", "www.example.com"),
    ("https", "news.example.org"),
    ("http", "shop.example.net"),
    ("https", "mail.example.com"),
    ("http", "api.example.io"),
    ("https", "static.example.dev"),
)

STATIC_RULES = [
    {"match": ["*.windowsupdate.com", ".ubuntu.com"], "route": ["PROXY updates.proxy:8080"]},
    {"match": ["*.partner-one.example", "*.partner-two.example"], "route": "PROXY partners:3128"},
    {"match": ["*.video.example", "*.stream.example"], "route": "PROXY media:3128"},
    {"match": ["*.ads.example"], "route": "PROXY 127.0.0.1:9"},
    {"match": ["*.socks-only.example"], "route": "SOCKS5 socks:1080"},
]
STATIC_BYPASS = ["<local>", ".corp.example", ".lab.example", "10.0.0.0/8", "192.168.0.0/16"]


async def refuse_dns(host: str) -> list[str]:
    raise OSError(f"{host}: the benchmark does no DNS")


def url_of(scheme: str, host: str) -> str:
    return f"{scheme}://{host}/index.html"


async def time_async(
    decide: Callable[[str, str], Awaitable[object]], duration: float
) -> tuple[float, int]:
    """Call ``decide`` over HOSTS round-robin for ``duration`` s; (µs per call, calls)."""
    calls = 0
    started = time.perf_counter()
    deadline = started + duration
    while True:
        for scheme, host in HOSTS:
            await decide(scheme, host)
        calls += len(HOSTS)
        now = time.perf_counter()
        if now >= deadline:
            return (now - started) / calls * 1e6, calls


def time_engine(engine: PacEngine, duration: float) -> tuple[float, int]:
    calls = 0
    started = time.perf_counter()
    deadline = started + duration
    while True:
        for scheme, host in HOSTS:
            result = engine.evaluate(url_of(scheme, host), host, 0.0, 0.0, "").result
            assert result is not None
        calls += len(HOSTS)
        now = time.perf_counter()
        if now >= deadline:
            return (now - started) / calls * 1e6, calls


async def run_router(config: RoutingConfig, duration: float, rounds: int) -> list[float]:
    router = Router(config, resolve=refuse_dns, local_addresses=("192.0.2.1",))

    async def decide(scheme: str, host: str) -> object:
        return await router.decide(
            scheme, host, 443 if scheme == "https" else 80, url_of(scheme, host)
        )

    results: list[float] = []
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(router.run)
        with trio.fail_after(duration * rounds * 3 + 10):
            await time_async(decide, min(duration, 0.2))  # warm-up (fills the cache if any)
            for _ in range(rounds):
                results.append((await time_async(decide, duration))[0])
        nursery.cancel_scope.cancel()
    return results


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=0.8, help="seconds per timed run")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs per scenario")
    args = parser.parse_args(argv)
    if not 0 < args.duration <= 3 or not 1 <= args.rounds <= 5:
        parser.error("--duration must be in (0, 3] and --rounds in [1, 5] (runtime < 30 s)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rows: dict[str, float] = {}

    engine = PacEngine(timeout=0.5, memory_limit=32 << 20)
    try:
        engine.load(CORPORATE_PAC, "corporate.pac")
        time_engine(engine, min(args.duration, 0.2))
        rows["engine (JS only, same thread)"] = statistics.median(
            time_engine(engine, args.duration)[0] for _ in range(args.rounds)
        )
    finally:
        engine.dispose()

    with tempfile.TemporaryDirectory() as directory:
        pac_path = Path(directory) / "corporate.pac"
        pac_path.write_text(CORPORATE_PAC)
        for label, cache_size in (("router, uncached", 0), ("router, cached", 4096)):
            config = RoutingConfig.model_validate(
                {"pac": {"url": str(pac_path), "cache_size": cache_size}}
            )
            rows[label] = statistics.median(
                trio.run(run_router, config, args.duration, args.rounds)
            )
    static = RoutingConfig.model_validate(
        {
            "default": ["PROXY proxy1:3128", "PROXY proxy2:3128", "DIRECT"],
            "rules": STATIC_RULES,
            "bypass": STATIC_BYPASS,
        }
    )
    rows["router, static rules"] = statistics.median(
        trio.run(run_router, static, args.duration, args.rounds)
    )

    print(
        f"PAC decisions: {len(HOSTS)} hosts round-robin, {CORPORATE_PAC.count('if (')} rules, "
        f"median of {args.rounds} x {args.duration:g} s, Python {sys.version.split()[0]}"
    )
    print()
    print("| scenario | µs / decision | decisions / s |")
    print("|---|---:|---:|")
    for label, micros in rows.items():
        print(f"| {label} | {micros:.1f} | {1e6 / micros:,.0f} |")
    print()
    uncached, cached = rows["router, uncached"], rows["router, cached"]
    print(
        f"uncached / cached: {uncached / cached:.1f}x; "
        f"thread hop + parse overhead: {uncached - rows['engine (JS only, same thread)']:.1f} µs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

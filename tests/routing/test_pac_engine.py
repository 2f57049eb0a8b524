"""The PAC engine and its trio side: limits, DNS rounds, entry points, the worker thread.

Real QuickJS, real threads, real trio; DNS only through injected resolvers (no lookups leave the
process). What is checked, and where the behaviour comes from:

* A runaway script (``while(true){}``) and a memory bomb are stopped by the engine's limits
  (``pac.timeout``, ``pac.memory_limit``) and the context is rebuilt from the last good script,
  so the next evaluation works (Chromium also treats a PAC failure per request, not per script).
* ``dnsResolve`` on a name known only to proxyd's resolver (``dns.hosts``) gets that address:
  the evaluation aborts on the miss, the name is resolved, and the script runs again with the
  answer (Chromium's non-blocking DNS mode, ProxyResolverV8Tracing); the rounds are bounded.
* ``FindProxyForURLEx`` is preferred when a script defines both (Microsoft's IPv6 extensions; pypac
  differs and calls ``FindProxyForURL``, which this test pins as a deliberate difference).
* A syntax error or a top-level exception is a ``PacLoadError`` naming the line.
* Every JavaScript call runs on one dedicated OS thread, and the trio loop keeps running while a
  script spins.
"""

from __future__ import annotations

import threading
import time

import pytest
import trio
from pypac.parser import PACFile  # type: ignore[import-untyped]

from proxyd.routing.errors import PacLoadError
from proxyd.routing.pac.engine import PacEngine, PacEvalError
from proxyd.routing.pac.evaluator import MAX_DNS_ROUNDS, PacEvaluator
from proxyd.routing.pac.thread import JsThread, JsThreadClosed

RUNAWAY = """
function FindProxyForURL(url, host) {
    if (host === "spin") { while (true) {} }
    if (host === "grow") { var a = []; while (true) { a.push(new Array(100000).fill(host)); } }
    if (host === "deep") { var f = function () { return f() + 1; }; return f(); }
    if (host === "throw") { throw new Error("nope"); }
    if (host === "number") { return 42; }
    return "PROXY ok:3128";
}
"""


def make_engine(timeout: float = 0.2, memory_limit: int = 8 << 20) -> PacEngine:
    return PacEngine(timeout=timeout, memory_limit=memory_limit)


def evaluate(engine: PacEngine, host: str, answers: str = "") -> str | None:
    return engine.evaluate(f"http://{host}/", host, 0.0, 0.0, answers).result


def test_runaway_script_is_stopped_within_the_time_limit() -> None:
    """``while(true){}`` ends with kind=timeout after about pac.timeout; the next call works."""
    engine = make_engine(timeout=0.2)
    try:
        engine.load(RUNAWAY)
        started = time.monotonic()
        with pytest.raises(PacEvalError) as caught:
            evaluate(engine, "spin")
        elapsed = time.monotonic() - started
        assert caught.value.kind == "timeout"
        assert "time limit" in caught.value.message
        assert elapsed < 1.5  # 0.2 s of CPU time, with generous slack for a loaded machine
        assert engine.rebuilds == 1
        assert evaluate(engine, "example.org") == "PROXY ok:3128"
    finally:
        engine.dispose()


@pytest.mark.parametrize("host", ["grow", "deep"])
def test_memory_bomb_and_deep_recursion_are_stopped(host: str) -> None:
    """An allocation loop hits pac.memory_limit, a recursion the stack limit: both are errors."""
    engine = make_engine(timeout=2.0, memory_limit=8 << 20)
    try:
        engine.load(RUNAWAY)
        with pytest.raises(PacEvalError) as caught:
            evaluate(engine, host)
        assert caught.value.kind == "error"
        assert engine.rebuilds == 1  # a fresh context: the bomb's garbage is gone
        assert evaluate(engine, "example.org") == "PROXY ok:3128"
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("host", "message"), [("throw", "Error: nope"), ("number", "returned number, not a string")]
)
def test_script_errors_and_non_string_results(host: str, message: str) -> None:
    """An exception, or a result that is not a string, is an error (Chromium: PAC_SCRIPT_FAILED)."""
    engine = make_engine()
    try:
        engine.load(RUNAWAY)
        with pytest.raises(PacEvalError, match=message) as caught:
            evaluate(engine, host)
        assert caught.value.kind == "error"
        assert engine.rebuilds == 0  # an ordinary exception leaves the context as it was
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("source", "line", "words"),
    [
        ("function FindProxyForURL(url, host) {\n  var x = 1;\n  return (;\n}\n", 3, "SyntaxError"),
        ("var ok = 1;\n\nnotDefined();\nfunction FindProxyForURL(u, h) {}", 3, "ReferenceError"),
        ("var x = 1;", None, "defines neither FindProxyForURL nor FindProxyForURLEx"),
    ],
)
def test_load_errors_name_the_line(source: str, line: int | None, words: str) -> None:
    """A script that does not compile or run is a PacLoadError with the engine's line number."""
    engine = make_engine()
    try:
        with pytest.raises(PacLoadError) as caught:
            engine.load(source, "/etc/proxy.pac")
        assert caught.value.line == line
        assert words in caught.value.message
        assert "/etc/proxy.pac" in caught.value.message
        if line is not None:
            assert f"line {line}" in caught.value.message
    finally:
        engine.dispose()


def test_failed_load_keeps_the_previous_script() -> None:
    engine = make_engine()
    try:
        engine.load(RUNAWAY)
        with pytest.raises(PacLoadError):
            engine.load("function FindProxyForURL( {")
        assert evaluate(engine, "example.org") == "PROXY ok:3128"
    finally:
        engine.dispose()


def test_top_level_runaway_fails_the_load() -> None:
    engine = PacEngine(timeout=0.05, memory_limit=8 << 20)  # load limit: max(10 x, 2 s)
    try:
        started = time.monotonic()
        with pytest.raises(PacLoadError, match="time limit"):
            engine.load("while (true) {}\nfunction FindProxyForURL(u, h) { return 'DIRECT'; }")
        assert time.monotonic() - started < 5
    finally:
        engine.dispose()


BOTH_ENTRY_POINTS = """
function FindProxyForURL(url, host) { return "PROXY plain:3128"; }
function FindProxyForURLEx(url, host) { return "PROXY ex:3128"; }
"""


def test_find_proxy_for_url_ex_is_preferred() -> None:
    """Microsoft's IPv6 extensions: when FindProxyForURLEx exists it is called, not the plain one.

    pypac calls FindProxyForURL whenever it exists; we follow Windows and Chromium instead.
    """
    engine = make_engine()
    try:
        assert engine.load(BOTH_ENTRY_POINTS) == "FindProxyForURLEx"
        assert evaluate(engine, "example.org") == "PROXY ex:3128"
        assert PACFile(BOTH_ENTRY_POINTS).find_proxy_for_url("/", "x") == "PROXY plain:3128"
        assert engine.load("function FindProxyForURLEx(u, h) { return 'DIRECT'; }") == (
            "FindProxyForURLEx"
        )
    finally:
        engine.dispose()


def test_alerts_are_collected_not_fatal() -> None:
    engine = make_engine()
    try:
        engine.load("function FindProxyForURL(u, h) { alert('checking ' + h); return 'DIRECT'; }")
        evaluation = engine.evaluate("http://a/", "a", 0.0, 0.0, "")
        assert evaluation.result == "DIRECT"
        assert evaluation.alerts == ("checking a",)
    finally:
        engine.dispose()


# --- the trio side: DNS rounds through an injected resolver -----------------------------------

DNS_SCRIPT = """
function FindProxyForURL(url, host) {
    if (!isResolvable(host)) return "PROXY unresolvable:3128";
    var ip = dnsResolve(host);
    if (isInNet(ip, "10.0.0.0", "255.0.0.0")) return "DIRECT";
    if (isInNetEx(dnsResolveEx(host), "2001:db8::/32")) return "PROXY v6:3128";
    return "PROXY outside:3128; DIRECT";
}
"""


class Hosts:
    """An injected resolver with fixed answers (like dns.hosts); records every lookup."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.lookups: list[str] = []

    async def resolve(self, host: str) -> list[str]:
        self.lookups.append(host)
        await trio.lowlevel.checkpoint()
        if host in self.table:
            return self.table[host]
        raise OSError(f"{host}: no such host (test resolver)")


async def test_dns_resolve_uses_the_injected_resolver() -> None:
    """A name known only to proxyd's resolver (dns.hosts) resolves inside the PAC script."""
    hosts = Hosts(
        {
            "intranet.corp": ["10.20.30.40"],
            "v6only.corp": ["2001:db8::7"],
            "public.example": ["2001:db9::1", "192.0.2.44"],
        }
    )
    evaluator = PacEvaluator(timeout=1.0, memory_limit=16 << 20, resolve=hosts.resolve)
    with trio.fail_after(10):
        await evaluator.start()
        try:
            await evaluator.load(DNS_SCRIPT, "dns.pac")
            answer = await evaluator.find_proxy("http://intranet.corp/", "intranet.corp", 0.0)
            assert (answer.result, answer.used_dns, answer.rounds) == ("DIRECT", True, 2)
            # An IPv6-only name: dnsResolve (IPv4-only) is null, so isResolvable is false.
            answer = await evaluator.find_proxy("http://v6only.corp/", "v6only.corp", 0.0)
            assert answer.result == "PROXY unresolvable:3128"
            answer = await evaluator.find_proxy("http://public.example/", "public.example", 0.0)
            assert answer.result == "PROXY outside:3128; DIRECT"
            answer = await evaluator.find_proxy("http://nowhere.test/", "nowhere.test", 0.0)
            assert answer.result == "PROXY unresolvable:3128"
            answer = await evaluator.find_proxy("http://10.1.1.1/", "10.1.1.1", 0.0)
            assert (answer.result, answer.used_dns, answer.rounds) == ("DIRECT", False, 1)
        finally:
            evaluator.close()
    # One lookup per name and evaluation, never one for an IP literal.
    assert hosts.lookups == ["intranet.corp", "v6only.corp", "public.example", "nowhere.test"]


async def test_dns_rounds_are_bounded() -> None:
    """A script that keeps asking for new names fails after MAX_DNS_ROUNDS evaluations."""
    script = """
    function FindProxyForURL(url, host) {
        for (var i = 0; i < 100; i++) { dnsResolve("h" + i + ".corp"); }
        return "DIRECT";
    }
    """
    hosts = Hosts({f"h{i}.corp": ["10.0.0.1"] for i in range(100)})
    evaluator = PacEvaluator(timeout=1.0, memory_limit=16 << 20, resolve=hosts.resolve)
    with trio.fail_after(10):
        await evaluator.start()
        try:
            await evaluator.load(script, "many.pac")
            with pytest.raises(PacEvalError, match="rounds of DNS"):
                await evaluator.find_proxy("http://x.corp/", "x.corp", 0.0)
        finally:
            evaluator.close()
    assert len(hosts.lookups) == MAX_DNS_ROUNDS


async def test_a_caught_dns_miss_still_restarts() -> None:
    """Even a script that swallows the miss is re-run with the answer (its result is discarded)."""
    script = """
    function FindProxyForURL(url, host) {
        var ip = null;
        try { ip = dnsResolve(host); } catch (e) { ip = "caught"; }
        return "PROXY " + ip + ":1";
    }
    """
    hosts = Hosts({"a.corp": ["10.0.0.9"]})
    evaluator = PacEvaluator(timeout=1.0, memory_limit=16 << 20, resolve=hosts.resolve)
    with trio.fail_after(10):
        await evaluator.start()
        try:
            await evaluator.load(script, "catch.pac")
            answer = await evaluator.find_proxy("http://a.corp/", "a.corp", 0.0)
            assert answer.result == "PROXY 10.0.0.9:1"
        finally:
            evaluator.close()


async def test_slow_resolver_is_bounded_by_dns_timeout() -> None:
    """A lookup that hangs is abandoned after dns_timeout and answers 'no address'."""

    async def hang(host: str) -> list[str]:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    evaluator = PacEvaluator(timeout=1.0, memory_limit=16 << 20, resolve=hang, dns_timeout=0.1)
    with trio.fail_after(10):
        await evaluator.start()
        try:
            await evaluator.load(DNS_SCRIPT, "dns.pac")
            answer = await evaluator.find_proxy("http://slow.corp/", "slow.corp", 0.0)
            assert answer.result == "PROXY unresolvable:3128"
        finally:
            evaluator.close()


# --- the worker thread ------------------------------------------------------------------------


async def test_every_job_runs_on_one_dedicated_thread() -> None:
    """QuickJS contexts must stay on one OS thread: all jobs share it, and it is not trio's."""
    worker = JsThread()
    try:
        with trio.fail_after(10):
            idents = {await worker.run(threading.get_ident) for _ in range(20)}

            async def one() -> None:
                idents.add(await worker.run(threading.get_ident))

            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(one)
            assert len(idents) == 1
            assert threading.get_ident() not in idents
            with pytest.raises(ZeroDivisionError):
                await worker.run(lambda: 1 / 0)
    finally:
        worker.close()
    worker.join(5)
    assert not worker.is_alive
    with trio.fail_after(1), pytest.raises(JsThreadClosed):
        await worker.run(threading.get_ident)


async def test_trio_keeps_running_while_a_script_spins() -> None:
    """A runaway evaluation occupies the PAC thread only; the event loop keeps ticking."""
    evaluator = PacEvaluator(timeout=0.3, memory_limit=16 << 20, resolve=Hosts({}).resolve)
    ticks = 0
    with trio.fail_after(10):
        await evaluator.start()
        try:
            await evaluator.load(RUNAWAY, "runaway.pac")

            async def tick() -> None:
                nonlocal ticks
                while True:
                    await trio.sleep(0.01)
                    ticks += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(tick)
                with pytest.raises(PacEvalError):
                    await evaluator.find_proxy("http://spin/", "spin", 0.0)
                nursery.cancel_scope.cancel()
            answer = await evaluator.find_proxy("http://ok/", "ok", 0.0)
            assert answer.result == "PROXY ok:3128"
        finally:
            evaluator.close()
    assert ticks >= 5

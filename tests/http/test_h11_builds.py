"""proxyd under both h11 builds: the pure h11 and the compiled h11-mypyc (the ``fast`` extra).

``proxyd._h11`` picks the build once per process, so each build runs in a daemon of its own
(``python -m proxyd``, ``PROXYD_PURE_H11=1`` forcing the pure one) in front of the in-process test
origin. The same table of exchanges -- keep-alive, Connection-named fields, chunked bodies both
ways with trailers, an early 1xx, HEAD, pipelining, a malformed head -- goes through each, every
answer is checked, and when both builds are installed their answers must be identical. The
compiled case is skipped where h11-mypyc is not installed (``pip install -e '.[fast]'``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import h11
import pytest
import trio

from tests.origin import Exchange, Origin

HAS_COMPILED = importlib.util.find_spec("h11_mypyc") is not None
REPO = Path(__file__).resolve().parents[2]
BUILDS = [
    pytest.param("pure", id="pure"),
    pytest.param(
        "compiled",
        id="compiled",
        marks=pytest.mark.skipif(not HAS_COMPILED, reason="h11-mypyc is not installed"),
    ),
]

Answer = tuple[int, list[tuple[bytes, bytes]], bytes, list[tuple[bytes, bytes]]]
# Fields that differ from run to run, not from build to build.
_VOLATILE = frozenset({b"date", b"proxy-status"})


def _env(build: str) -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO)}
    if build == "pure":
        env["PROXYD_PURE_H11"] = "1"
    else:
        env.pop("PROXYD_PURE_H11", None)
    return env


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("build", BUILDS)
def test_the_build_follows_the_environment(build: str) -> None:
    """PROXYD_PURE_H11=1 forces the pure h11; otherwise the compiled build is used when it is
    installed -- and every module that shares h11 objects uses that same module."""
    probe = (
        "from proxyd._h11 import h11, COMPILED\n"
        "import proxyd.client, proxyd.http.relay, proxyd.upstream.pool\n"
        "import proxyd.cache.transaction, proxyd.websocket.upgrade\n"
        "mods = [proxyd.client, proxyd.http.relay, proxyd.upstream.pool,\n"
        "        proxyd.cache.transaction, proxyd.websocket.upgrade]\n"
        "assert all(m.h11 is h11 for m in mods), [m.h11 for m in mods]\n"
        "print(h11.__name__, COMPILED)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        env=_env(build),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    expected = "h11_mypyc True" if build == "compiled" else "h11 False"
    assert done.stdout.strip() == expected


@pytest.fixture
async def routed_origin(nursery: trio.Nursery) -> Origin:
    origin: Origin = await nursery.start(Origin().serve)

    async def kept(exchange: Exchange) -> None:
        fields = [(b"X-Kept", b"1"), (b"Connection", b"keep-alive, X-Drop"), (b"X-Drop", b"1")]
        if exchange.request.method == b"HEAD":  # the length of what a GET would get, no body
            fields.append((b"Content-Length", b"5"))
            await exchange.respond(200, b"", fields, content_length=False)
        else:
            await exchange.respond(200, b"hello", fields)

    async def chunked(exchange: Exchange) -> None:
        await exchange.send_event(h11.Response(status_code=200, headers=[]))
        await exchange.send_event(h11.Data(data=b"part one, "))
        await exchange.send_event(h11.Data(data=b"part two"))
        await exchange.send_event(h11.EndOfMessage(headers=[(b"X-Checksum", b"abc")]))

    async def hinted(exchange: Exchange) -> None:
        await exchange.informational(103, [(b"Link", b"</style.css>; rel=preload")])
        await exchange.respond(200, b"after the hint")

    origin.route("/kept", kept)
    origin.route("/chunked", chunked)
    origin.route("/hinted", hinted)
    return origin


@pytest.fixture
async def daemon_for() -> AsyncIterator[list[trio.Process]]:
    started: list[trio.Process] = []
    yield started
    for process in started:  # stopped by pid, then killed if it lingers
        process.terminate()
        with trio.move_on_after(10):
            await process.wait()
        if process.returncode is None:
            process.kill()
            with trio.move_on_after(5):
                await process.wait()


async def _start_daemon(build: str, tmp_path: Path, started: list[trio.Process]) -> int:
    port, admin = _free_port(), _free_port()
    config = tmp_path / f"proxyd-{build}.yaml"
    config.write_text(
        f'listen: ["127.0.0.1:{port}"]\nadmin: {{listen: "127.0.0.1:{admin}"}}\n'
        'via: {pseudonym: "proxyd-test"}\naccess_log: {enabled: false}\n'
    )
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "proxyd", "--config", str(config)],
        env=_env(build),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    started.append(process)
    with trio.fail_after(20):
        while True:
            assert process.poll() is None, "proxyd exited while starting"
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return port


async def _exchange(port: int, raw: bytes, answers: int, head: bool = False) -> list[Answer]:
    """Send ``raw`` on one connection and parse ``answers`` responses (1xx count as answers)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    parser = h11.Connection(h11.CLIENT)
    out: list[Answer] = []
    with trio.fail_after(10):
        await stream.send_all(raw)
        while len(out) < answers:
            # The parser tracks a client: it must have "sent" each request the raw bytes hold.
            method = b"HEAD" if head else b"GET"
            parser.send(h11.Request(method=method, target=b"/", headers=[(b"Host", b"x")]))
            parser.send(h11.EndOfMessage())
            status = 0
            fields: list[tuple[bytes, bytes]] = []
            body = b""
            trailers: list[tuple[bytes, bytes]] = []
            while True:
                event = parser.next_event()
                if event is h11.NEED_DATA:
                    parser.receive_data(await stream.receive_some(65536))
                    continue
                if isinstance(event, h11.InformationalResponse):
                    out.append((event.status_code, _stable(event.headers.raw_items()), b"", []))
                    continue
                if isinstance(event, h11.Response):
                    status, fields = event.status_code, _stable(event.headers.raw_items())
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    trailers = list(event.headers.raw_items())
                    break
                else:
                    raise AssertionError(f"unexpected {event!r}")
            out.append((status, fields, body, trailers))
            if parser.our_state is h11.MUST_CLOSE or parser.their_state is h11.MUST_CLOSE:
                break
            parser.start_next_cycle()
    await stream.aclose()
    return out


def _stable(items: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(name, value) for name, value in items if name.lower() not in _VOLATILE]


async def _run_table(port: int, origin: Origin) -> dict[str, list[Answer]]:
    base = f"http://127.0.0.1:{origin.port}".encode()
    host = f"127.0.0.1:{origin.port}".encode()

    def get(path: bytes, extra: bytes = b"") -> bytes:
        return b"GET " + base + path + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + extra + b"\r\n"

    results: dict[str, list[Answer]] = {}
    results["keep-alive"] = await _exchange(port, get(b"/kept") + get(b"/kept"), 2)
    results["trailers"] = await _exchange(port, get(b"/chunked", b"TE: trailers\r\n"), 1)
    results["no-trailers"] = await _exchange(port, get(b"/chunked"), 1)
    results["early-hint"] = await _exchange(port, get(b"/hinted"), 2)
    post = b"POST " + base + b"/echo HTTP/1.1\r\nHost: " + host + b"\r\n"
    results["post-length"] = await _exchange(
        port, post + b"Content-Length: 11\r\n\r\nhello there", 1
    )
    results["post-chunked"] = await _exchange(
        port, post + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n there\r\n0\r\n\r\n", 1
    )
    for name in ("post-length", "post-chunked"):  # the origin's connection number varies
        results[name] = [
            (status, fields, re.sub(rb'"connection": \d+', b'"connection": N', body), trailers)
            for status, fields, body, trailers in results[name]
        ]
    results["head"] = await _exchange(
        port, b"HEAD " + base + b"/kept HTTP/1.1\r\nHost: " + host + b"\r\n\r\n", 1, head=True
    )
    results["bare-lf"] = await _exchange(port, b"GET " + base + b"/kept HTTP/1.1\nHost: x\n\n", 1)
    return results


def _check(results: dict[str, list[Answer]]) -> None:
    first, second = results["keep-alive"]
    for status, fields, body, _ in (first, second):
        names = [name.lower() for name, _ in fields]
        assert (status, body) == (200, b"hello")
        assert b"x-kept" in names and b"x-drop" not in names  # RFC 9110 §7.6.1
        assert (b"Via", b"1.1 proxyd-test") in fields
    [(status, fields, body, trailers)] = results["trailers"]
    assert (status, body, trailers) == (200, b"part one, part two", [(b"X-Checksum", b"abc")])
    [(status, fields, body, trailers)] = results["no-trailers"]
    assert (status, body, trailers) == (200, b"part one, part two", [])
    hint, final = results["early-hint"]
    assert hint[0] == 103 and (b"Link", b"</style.css>; rel=preload") in hint[1]
    assert (final[0], final[2]) == (200, b"after the hint")
    for name in ("post-length", "post-chunked"):
        [(status, fields, body, _)] = results[name]
        assert status == 200 and b'"body_size": 11' in body
    [(status, fields, body, _)] = results["head"]
    assert (status, body) == (200, b"") and (b"Content-Length", b"5") in fields
    [(status, fields, body, _)] = results["bare-lf"]
    assert status == 400


@pytest.mark.parametrize("build", BUILDS)
async def test_relaying_through_each_build(
    build: str,
    routed_origin: Origin,
    tmp_path: Path,
    daemon_for: list[trio.Process],
) -> None:
    port = await _start_daemon(build, tmp_path, daemon_for)
    _check(await _run_table(port, routed_origin))


@pytest.mark.skipif(not HAS_COMPILED, reason="h11-mypyc is not installed")
async def test_both_builds_answer_alike(
    routed_origin: Origin, tmp_path: Path, daemon_for: list[trio.Process]
) -> None:
    pure = await _run_table(await _start_daemon("pure", tmp_path, daemon_for), routed_origin)
    compiled = await _run_table(
        await _start_daemon("compiled", tmp_path, daemon_for), routed_origin
    )
    assert compiled == pure

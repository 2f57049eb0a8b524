"""``workers: N`` as real processes: a supervisor, its workers, SO_REUSEPORT, signals, metrics.

Each daemon test starts ``python -m proxyd`` with ``workers: 2`` on 127.0.0.1 (the admin port picked
free first), talks to it through the in-process ``origin``, and finds the workers' pids on the
supervisor's ``GET /workers``. At the end the supervisor is killed by pid if it still runs, and so
is every worker pid this test saw that still runs our config (they drain by themselves once their
supervisor is gone, but a test never leaves a process behind). The pure parts (restart back-off,
adding up the scrape-time families, combining the workers' answers) are tested with tables.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from proxyd.config import ConfigError, parse_config_text
from proxyd.observe.metrics import aggregate_stats
from proxyd.workers import (
    RESTART_CAP,
    RESTART_FIRST,
    WorkerSpec,
    _combine,
    _Slot,
    restart_delay,
)
from tests.origin import Exchange, Origin

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0


# --- a small HTTP client ----------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


async def exchange(
    stream: trio.abc.Stream,
    method: str,
    target: str,
    *,
    host: str = "proxyd",
    close: bool = True,
    timeout: float = 15.0,
) -> Answer:
    """One request on ``stream``; the whole answer."""
    conn = h11.Connection(h11.CLIENT)
    headers = [("Host", host)] + ([("Connection", "close")] if close else [])
    with trio.fail_after(timeout):
        await stream.send_all(
            conn.send(h11.Request(method=method, target=target, headers=headers))
            + conn.send(h11.EndOfMessage())
        )
        status, head, chunks = 0, {}, []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(65536)))
            elif isinstance(event, h11.Response):
                status, head = event.status_code, dict(event.headers)
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return Answer(status, head, b"".join(chunks))


async def http(port: int, method: str, target: str, **kwargs: Any) -> Answer:
    """One request on a new connection to 127.0.0.1:port."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        return await exchange(stream, method, target, **kwargs)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def metric_total(text: str, name: str, **labels: str) -> float:
    """The sum of every sample called ``name`` whose labels include ``labels``."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def is_running(pid: int) -> bool:
    """Whether pid exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


# --- the daemon ---------------------------------------------------------------------------------


@dataclass
class Supervised:
    process: trio.Process
    admin_port: int
    config_path: Path
    stderr_path: Path
    seen_pids: set[int] = field(default_factory=set)
    port: int = 0
    run_dir: str | None = None  # the supervisor's temporary directory (metrics files, sockets)

    def stderr(self) -> str:
        return self.stderr_path.read_text("utf-8", errors="replace")

    async def admin(self, method: str, target: str, **kwargs: Any) -> Answer:
        return await http(self.admin_port, method, target, **kwargs)

    async def workers(self) -> dict[str, Any]:
        answer = await self.admin("GET", "/workers")
        assert answer.status == 200, answer
        data: dict[str, Any] = json.loads(answer.body)
        self.seen_pids.update(w["pid"] for w in data["workers"] if w["pid"] is not None)
        return data

    async def metrics(self, target: str = "/metrics") -> str:
        answer = await self.admin("GET", target)
        assert answer.status == 200, answer
        return answer.body.decode()

    async def wait_metric(
        self, name: str, expected: float, target: str = "/metrics", **labels: str
    ) -> str:
        """Poll until the total of ``name`` is ``expected`` (a worker counts a request just
        after the client has its answer); returns that exposition."""
        text = ""
        with trio.move_on_after(5):
            while metric_total(text := await self.metrics(target), name, **labels) != expected:  # noqa: ASYNC110
                await trio.sleep(0.02)
            return text
        pytest.fail(f"{name}{labels} is {metric_total(text, name, **labels)}, not {expected}")

    async def wait_ready(self, timeout: float = START_TIMEOUT) -> list[int]:
        """Wait (bounded) until every worker is ready; their pids in slot order."""
        with trio.fail_after(timeout):
            while True:
                if self.process.poll() is not None:
                    pytest.fail(
                        f"the supervisor exited ({self.process.returncode}):\n{self.stderr()}"
                    )
                try:
                    data = await self.workers()
                except OSError:
                    data = None
                if data is not None and all(w["ready"] for w in data["workers"]):
                    self.port = int(data["listen"][0].rsplit(":", 1)[1])
                    pids = [w["pid"] for w in data["workers"]]
                    if self.run_dir is None:
                        self.run_dir = _environ(pids[0])["PROMETHEUS_MULTIPROC_DIR"]
                    return pids
                await trio.sleep(0.05)

    async def wait_exit(self, timeout: float) -> int:
        with trio.move_on_after(timeout):
            return await self.process.wait()
        pytest.fail(f"the supervisor still runs after {timeout}s:\n{self.stderr()}")

    async def get(self, origin: Origin, path: str) -> Answer:
        """GET origin/path through the proxy, on a new connection."""
        return await http(self.port, "GET", origin.url(path), host=f"127.0.0.1:{origin.port}")


def config_yaml(admin_port: int, port: int = 0, extra: str = "", workers: int = 2) -> str:
    return (
        f'listen: ["127.0.0.1:{port}"]\n'
        f'admin: {{listen: "127.0.0.1:{admin_port}"}}\n'
        f"workers: {workers}\n"
        "access_log: {enabled: false}\n" + extra
    )


@asynccontextmanager
async def supervised(
    tmp_path: Path, extra: str = "", *, port: int = 0, workers: int = 2, ready: bool = True
) -> AsyncIterator[Supervised]:
    admin_port = free_port()
    config_path = tmp_path / "proxyd.yaml"
    config_path.write_text(config_yaml(admin_port, port, extra, workers))
    stderr_path = tmp_path / "proxyd.stderr"
    with stderr_path.open("wb") as err:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "proxyd", "--config", str(config_path)],
            stdin=None,
            stdout=err,
            stderr=err,
            cwd=str(REPO),
        )
    daemon = Supervised(process, admin_port, config_path, stderr_path)
    try:
        if ready:
            await daemon.wait_ready()
        yield daemon
    finally:
        with trio.CancelScope(shield=True):
            if process.poll() is None:  # drain (the supervisor removes its directory), or kill
                process.send_signal(signal.SIGTERM)
                with trio.move_on_after(15):
                    await process.wait()
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
                with trio.move_on_after(5):
                    await process.wait()
            for pid in daemon.seen_pids:
                if is_running(pid) and str(config_path).encode() in _cmdline(pid):
                    os.kill(pid, signal.SIGKILL)
            with trio.move_on_after(5):
                while any(is_running(pid) for pid in daemon.seen_pids):  # noqa: ASYNC110
                    await trio.sleep(0.05)
            if daemon.run_dir is not None:  # left behind only when the supervisor was killed
                await trio.to_thread.run_sync(shutil.rmtree, daemon.run_dir, True)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.decode().partition("=") for item in raw.split(b"\0") if item)
    return {key: value for key, _, value in pairs}


# --- the daemon tests ----------------------------------------------------------------------------


async def test_connections_spread_over_workers_and_metrics_add_up(
    tmp_path: Path, origin: Origin
) -> None:
    """Two workers accept on one fixed port; /metrics is the sum of what each worker counted,
    counters (requests), live gauges (open connections) and scrape-time families (pool) alike."""
    port = free_port()
    async with supervised(tmp_path, port=port) as daemon:
        pids = await daemon.wait_ready()
        assert daemon.port == port
        assert len(set(pids)) == 2 and daemon.process.pid not in pids
        for pid in pids:  # real processes, children of the supervisor, with the metrics dir set
            assert "PROMETHEUS_MULTIPROC_DIR" in _environ(pid)
        for _ in range(40):
            answer = await daemon.get(origin, "/echo")
            assert answer.status == 200

        total = await daemon.wait_metric("proxyd_requests_total", 40)
        per_worker = []
        for index in range(2):
            text = await daemon.metrics(f"/workers/{index}/metrics")
            per_worker.append(metric_total(text, "proxyd_requests_total"))
        # The kernel spread 40 connections over both listeners (hash of the 4-tuple).
        assert all(count > 0 for count in per_worker), per_worker
        assert sum(per_worker) == 40
        assert metric_total(total, "proxyd_requests_total", status_class="2xx") == 40
        assert metric_total(total, "proxyd_request_duration_seconds_count") == 40
        assert metric_total(total, "proxyd_workers") == 2
        assert metric_total(total, "proxyd_build_info") == 1

        # Scrape-time families (the pool's idle upstream connections) come from each worker.
        idle = [
            metric_total(await daemon.metrics(f"/workers/{i}/metrics"), "proxyd_pool_connections")
            for i in range(2)
        ]
        assert all(count > 0 for count in idle), idle
        total = await daemon.metrics()
        assert metric_total(total, "proxyd_pool_connections") == sum(idle)

        # A live gauge: connections held open now, over both workers.
        streams = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(8)]
        try:
            for stream in streams:
                target = origin.url("/echo")
                answer = await exchange(stream, "GET", target, host="o", close=False)
                assert answer.status == 200
            await daemon.wait_metric("proxyd_client_connections_active", 8)
        finally:
            for stream in streams:
                await stream.aclose()
        await daemon.wait_metric("proxyd_client_connections_active", 0)
        await daemon.wait_metric("proxyd_requests_total", 48)


async def test_a_killed_worker_is_replaced_and_its_counts_stay(
    tmp_path: Path, origin: Origin
) -> None:
    """SIGKILL one worker: the other keeps serving, the supervisor starts a new one in the same
    slot, and the totals still include what the dead worker counted."""
    async with supervised(tmp_path) as daemon:
        pids = await daemon.wait_ready()
        for _ in range(10):
            assert (await daemon.get(origin, "/echo")).status == 200
        # Counted (just after each answer went out) before the kill, or the count dies with it.
        await daemon.wait_metric("proxyd_requests_total", 10)
        victim = pids[0]
        os.kill(victim, signal.SIGKILL)
        with trio.fail_after(10):
            while (await daemon.workers())["workers"][0]["pid"] == victim:  # noqa: ASYNC110
                await trio.sleep(0.02)
        assert not is_running(victim)  # reaped by the supervisor
        for _ in range(10):  # served while slot 0 restarts (by worker 1, or the new worker 0)
            assert (await daemon.get(origin, "/echo")).status == 200
        new_pids = await daemon.wait_ready()
        assert new_pids[0] not in (victim, pids[1]) and new_pids[1] == pids[1]
        slot = (await daemon.workers())["workers"][0]
        assert slot["restarts"] == 1 and slot["last_exit"] == -signal.SIGKILL
        for _ in range(10):
            assert (await daemon.get(origin, "/echo")).status == 200
        total = await daemon.wait_metric("proxyd_requests_total", 30)
        assert metric_total(total, "proxyd_worker_restarts_total") == 1
        assert "worker 0 exited with status -9; starting it again" in daemon.stderr()


async def test_sigterm_drains_every_worker_and_exits_0(tmp_path: Path, origin: Origin) -> None:
    """SIGTERM: every worker stops accepting, finishes its in-flight request, exits; the
    supervisor exits 0 with no worker left and its temporary directory gone."""
    arrived, release = trio.Event(), trio.Event()

    async def slow(exchange: Exchange) -> None:
        arrived.set()
        await release.wait()
        await exchange.respond(200, b"finished")

    origin.route("/slow", slow)
    async with supervised(tmp_path) as daemon:
        pids = await daemon.wait_ready()
        run_dir = Path(_environ(pids[0])["PROMETHEUS_MULTIPROC_DIR"])
        assert await trio.Path(run_dir).is_dir()
        answers: list[Answer] = []

        async def in_flight() -> None:
            answers.append(await daemon.get(origin, "/slow"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(in_flight)
            with trio.fail_after(5):
                await arrived.wait()
            daemon.process.send_signal(signal.SIGTERM)
            with trio.fail_after(5):
                while (await daemon.admin("GET", "/readyz")).status != 503:  # noqa: ASYNC110
                    await trio.sleep(0.02)
            with trio.fail_after(5):  # no worker accepts any more
                while True:
                    try:
                        await http(daemon.port, "GET", origin.url("/echo"))
                    except OSError:
                        break
                    await trio.sleep(0.02)
            release.set()
        assert [answer.status for answer in answers] == [200]
        assert answers[0].body == b"finished"
        assert await daemon.wait_exit(15) == 0
        assert not any(is_running(pid) for pid in pids)
        assert not await trio.Path(run_dir).exists()
        log = daemon.stderr()
        assert log.count("proxyd.server: SIGTERM: draining") == 2
        assert "supervisor stopped (exit status 0)" in log


async def test_a_second_sigterm_stops_at_once(tmp_path: Path, origin: Origin) -> None:
    """A request that would hold the drain for 60 s: the second SIGTERM stops everything now."""
    arrived, release = trio.Event(), trio.Event()

    async def hang(exchange: Exchange) -> None:
        arrived.set()
        await release.wait()

    origin.route("/hang", hang)
    try:
        async with supervised(tmp_path, "shutdown_timeout: 60\n") as daemon:
            pids = await daemon.wait_ready()
            async with trio.open_nursery() as nursery:

                async def in_flight() -> None:
                    with suppress(OSError, trio.BrokenResourceError, h11.RemoteProtocolError):
                        await daemon.get(origin, "/hang")

                nursery.start_soon(in_flight)
                with trio.fail_after(5):
                    await arrived.wait()
                daemon.process.send_signal(signal.SIGTERM)
                with trio.fail_after(5):
                    while (await daemon.admin("GET", "/readyz")).status != 503:  # noqa: ASYNC110
                        await trio.sleep(0.02)
                daemon.process.send_signal(signal.SIGTERM)
                assert await daemon.wait_exit(10) == 1
                nursery.cancel_scope.cancel()
            assert not any(is_running(pid) for pid in pids)
            assert "second SIGTERM: stopping the workers now" in daemon.stderr()
    finally:
        release.set()


async def test_workers_drain_by_themselves_when_the_supervisor_is_killed(
    tmp_path: Path, origin: Origin
) -> None:
    """SIGKILL leaves the supervisor no chance: its workers see their parent change, drain and
    exit on their own (no worker outlives it for long)."""
    async with supervised(tmp_path) as daemon:
        pids = await daemon.wait_ready()
        assert (await daemon.get(origin, "/echo")).status == 200
        daemon.process.kill()
        assert await daemon.wait_exit(5) == -signal.SIGKILL
        with trio.fail_after(10):
            while any(is_running(pid) for pid in pids):  # noqa: ASYNC110
                await trio.sleep(0.05)
        assert "the supervisor (pid" in daemon.stderr()


async def test_sighup_and_post_reload_reach_every_worker(tmp_path: Path, origin: Origin) -> None:
    """SIGHUP is forwarded to each worker (each re-reads the file; no worker restarts), and
    POST /reload on the admin listener goes to every worker; identical answers pass through."""
    async with supervised(tmp_path, 'via: {pseudonym: "before"}\n') as daemon:
        pids = await daemon.wait_ready()
        text = daemon.config_path.read_text().replace('"before"', '"after"')
        daemon.config_path.write_text(text)
        daemon.process.send_signal(signal.SIGHUP)
        total = await daemon.wait_metric("proxyd_config_reloads_total", 2, outcome="ok")
        assert metric_total(total, "proxyd_config_generation") == 2
        for _ in range(20):  # new connections, so both workers answer
            echo = json.loads((await daemon.get(origin, "/echo")).body)
            via = [value for name, value in echo["headers"] if name.lower() == "via"]
            assert via == ["1.1 after"], via
        answer = await daemon.admin("POST", "/reload")
        assert answer.status == 200
        assert json.loads(answer.body)["generation"] == 3
        await daemon.wait_metric("proxyd_config_reloads_total", 4, outcome="ok")
        assert await daemon.wait_ready() == pids


async def test_admin_requests_are_relayed_to_the_workers(tmp_path: Path, origin: Origin) -> None:
    """GETs the supervisor does not answer go to one worker (or the one named), streamed; a POST
    goes to every worker, and the shared cache makes one worker's purge everyone's."""
    cached = b"cached body"

    async def cacheable(exchange: Exchange) -> None:
        await exchange.respond(200, cached, [(b"Cache-Control", b"max-age=600")])

    origin.route("/cacheable", cacheable)
    extra = f'cache: {{enabled: true, dir: "{tmp_path / "cache"}"}}\n'
    async with supervised(tmp_path, extra) as daemon:
        await daemon.wait_ready()
        status = await daemon.admin("GET", "/status.json")
        assert status.status == 200 and json.loads(status.body)["config_generation"] == 1
        assert (await daemon.admin("GET", "/workers/1/status.json")).status == 200
        assert (await daemon.admin("GET", "/workers/7/status.json")).status == 404
        netlog = await daemon.admin("GET", "/netlog?seconds=0.3")  # a streamed answer
        assert netlog.status == 200

        first = await daemon.get(origin, "/cacheable")
        assert first.status == 200 and first.body == cached
        # The store commits just after the client has the body.
        await daemon.wait_metric("proxyd_cache_stored_total", 1)
        for _ in range(19):
            answer = await daemon.get(origin, "/cacheable")
            assert answer.status == 200 and answer.body == cached
        # Both workers served hits from the one disk cache the first miss filled.
        total = await daemon.wait_metric("proxyd_cache_lookups_total", 19, result="hit")
        hits = [
            metric_total(
                await daemon.metrics(f"/workers/{i}/metrics"),
                "proxyd_cache_lookups_total",
                result="hit",
            )
            for i in range(2)
        ]
        assert all(count > 0 for count in hits) and sum(hits) == 19, hits
        assert metric_total(total, "proxyd_cache_entries") == 1  # one store: max, not a sum

        purge = f"/cache/purge?url={origin.url('/cacheable')}"
        first = await daemon.admin("POST", purge)
        assert first.status == 200, first
        second = await daemon.admin("POST", purge)
        assert second.status == 404 and second.body == b"not in the cache\n"


async def test_a_worker_that_cannot_start_stops_the_supervisor(tmp_path: Path) -> None:
    """A PAC script that does not load: the workers fail at start, the supervisor exits 1."""
    pac = tmp_path / "broken.pac"
    pac.write_text("function FindProxyForURL(url, host) { return ; ")
    async with supervised(tmp_path, f'routing: {{pac: {{url: "{pac}"}}}}\n', ready=False) as d:
        assert await d.wait_exit(20) == 1
        log = d.stderr()
        assert "cannot load the PAC script" in log
        assert "while starting: stopping" in log


async def test_a_port_in_use_stops_the_supervisor(tmp_path: Path) -> None:
    """The supervisor reserves the listen port first: one taken by another program is an error
    before any worker starts."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        async with supervised(tmp_path, port=port, ready=False) as daemon:
            assert await daemon.wait_exit(10) == 1
            assert "proxyd: cannot start:" in daemon.stderr()
            assert "worker 0 started" not in daemon.stderr()


async def test_one_worker_is_the_plain_daemon(tmp_path: Path, origin: Origin) -> None:
    """workers: 1 changes nothing: one process, no supervisor routes."""
    admin_port = free_port()
    port = free_port()
    config_path = tmp_path / "proxyd.yaml"
    config_path.write_text(config_yaml(admin_port, port, workers=1))
    with (tmp_path / "err").open("wb") as err:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "proxyd", "--config", str(config_path)],
            stderr=err,
            cwd=str(REPO),
        )
    try:
        with trio.fail_after(START_TIMEOUT):
            while True:
                try:
                    if (await http(admin_port, "GET", "/readyz")).status == 200:
                        break
                except OSError:
                    pass
                await trio.sleep(0.05)
        answer = await http(port, "GET", origin.url("/echo"), host="o")
        assert answer.status == 200
        assert (await http(admin_port, "GET", "/workers")).status == 404
        children = await trio.Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text()
        assert children.split() == []
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await process.wait()
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0


# --- the pure parts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("quick_failures", "ran_for", "delay", "after"),
    [
        (0, 0.5, RESTART_FIRST, 1),  # the first failure: a short pause
        (1, 0.5, 2 * RESTART_FIRST, 2),  # a crash loop doubles it...
        (2, 0.5, 4 * RESTART_FIRST, 3),
        (9, 0.5, RESTART_CAP, 10),  # ...up to the cap
        (500, 0.5, RESTART_CAP, 501),
        (7, 10.0, RESTART_FIRST, 1),  # a worker that ran long enough starts the count again
        (7, 3600.0, RESTART_FIRST, 1),
    ],
)
def test_restart_delay_backs_off(
    quick_failures: int, ran_for: float, delay: float, after: int
) -> None:
    assert restart_delay(quick_failures, ran_for) == (delay, after)


def test_aggregate_stats_sums_or_takes_the_max() -> None:
    """Per-worker pools add up; the shared cache's totals and the bad-proxy list do not."""
    worker = (
        "# HELP proxyd_pool_connections Upstream connections\n"
        "# TYPE proxyd_pool_connections gauge\n"
        'proxyd_pool_connections{{route_kind="direct",state="idle"}} {idle}\n'
        "# HELP proxyd_cache_entries Responses stored in the cache now\n"
        "# TYPE proxyd_cache_entries gauge\n"
        "proxyd_cache_entries {entries}\n"
        "# HELP proxyd_bad_proxies Upstream proxies on the bad-proxy list now\n"
        "# TYPE proxyd_bad_proxies gauge\n"
        "proxyd_bad_proxies {bad}\n"
    )
    texts = [
        worker.format(idle=3, entries=10, bad=1),
        worker.format(idle=4, entries=12, bad=0),
    ]
    values = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in aggregate_stats(texts)
        for sample in family.samples
    }
    assert values == {
        ("proxyd_pool_connections", (("route_kind", "direct"), ("state", "idle"))): 7.0,
        ("proxyd_cache_entries", ()): 12.0,
        ("proxyd_bad_proxies", ()): 1.0,
    }
    assert aggregate_stats([]) == []


def _answers(*items: tuple[int, bytes]) -> Sequence[tuple[_Slot, int, bytes, bytes]]:
    return [
        (_Slot(index), status, b"text/plain", body) for index, (status, body) in enumerate(items)
    ]


@pytest.mark.parametrize(
    ("answers", "status", "body"),
    [
        # The same answer from every worker passes through as it is.
        (_answers((200, b'{"generation": 2}'), (200, b'{"generation": 2}')), 200, None),
        (_answers((404, b"not in the cache\n"), (404, b"not in the cache\n")), 404, None),
        # One worker purged it, the other found it gone: a success.
        (_answers((200, b"purged 1\n"), (404, b"not in the cache\n")), 200, b"worker 0: 200"),
        # Anything else: the worst status, each worker's answer listed.
        (_answers((200, b"ok\n"), (400, b"bad\n")), 400, b"worker 1: 400\nbad\n"),
        (_answers((409, b"draining\n"), (502, b"gone\n")), 502, b"worker 0: 409"),
    ],
)
def test_combine_answers_of_every_worker(
    answers: Sequence[tuple[_Slot, int, bytes, bytes]], status: int, body: bytes | None
) -> None:
    combined = _combine(answers)
    assert combined[0] == status
    if body is None:
        assert combined[1:] == answers[0][2:]
    else:
        assert body in combined[2]


def test_worker_spec_round_trips_through_the_environment() -> None:
    spec = WorkerSpec(
        index=1,
        parent=42,
        notify_fd=7,
        listen=("127.0.0.1:3128", "[::1]:3128"),
        admin_socket="/tmp/x/w1-1.sock",
        public_admin=(("127.0.0.1", 9180),),
    )
    assert WorkerSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_workers_must_be_a_positive_number(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config_text(f"workers: {value}\n", "w.yaml")
    assert caught.value.errors[0].startswith("w.yaml:1: workers: ")
    assert parse_config_text("workers: 3\n", "w.yaml").workers == 3

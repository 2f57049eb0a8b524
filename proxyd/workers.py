"""``workers: N``: a supervisor process and N worker processes sharing the listen ports.

Theory of operation
===================

Processes
    ``proxyd`` with ``workers`` above 1 becomes the supervisor (``supervise``). It serves no proxy
    traffic itself: it starts N workers, each ``sys.executable -m proxyd`` with the supervisor's
    own arguments and two environment variables: ``PROXYD_WORKER`` (a JSON ``WorkerSpec``: its
    index, the supervisor's pid, the readiness pipe, the concrete listen addresses, its private
    admin socket) and ``PROMETHEUS_MULTIPROC_DIR``. Fresh processes rather than ``fork``: the
    variable must be set before prometheus_client is first imported, and a forked trio process is
    no clean start. A worker runs ``serve_until_signalled`` like a single daemon, with
    ``server.WorkerBinding``; it writes one line to the readiness pipe once its listeners accept
    (``serve_worker``), and drains by itself if the supervisor vanishes (its parent pid changes).
    Workers run in their own process group, so a terminal's Ctrl-C or hang-up reaches only the
    supervisor, which forwards it: a worker never sees one signal twice.

Shared ports (SO_REUSEPORT)
    Before any worker starts, the supervisor binds (without listening) one socket per listen
    address with SO_REUSEPORT: this resolves port 0 to a concrete port that every worker is given,
    and holds the port while workers come and go, so no other program can take it in between.
    Each worker binds the same address with SO_REUSEPORT and listens; the kernel spreads new
    connections over the listening sockets of the group by a hash of the 4-tuple (a socket that
    only reserves the port gets none). Connections still in the backlog of a worker that dies
    are reset: the kernel does not move them to another listener.

The cache
    Workers open the same ``cache.dir``: the store is made for several processes (store.py,
    "Several processes"): SQLite WAL with ``BEGIN IMMEDIATE``, files locked while written.

Lifecycle of a worker slot (``_run_slot``)
    start -> ready (the pipe's line) -> exited. Until every slot has been ready once, a worker
    that exits before it is ready fails the start: the supervisor stops the others and exits 1
    (its stderr, which workers share, says why: a bad PAC script, a port in use). Later, a worker
    that exits while the supervisor is not draining is started again after ``restart_delay``:
    0.25 s doubling per quick failure up to 30 s, back to 0.25 s once a worker ran 10 s, so a
    crash loop (say, a config file edited into an invalid one: a new worker reads the file as it
    is then) never spins. A worker that is not ready within ``START_TIMEOUT`` is killed. After an
    exit the supervisor calls ``mark_process_dead`` (its live gauges go) and removes its socket.

Signals
    SIGTERM or SIGINT: drain. The supervisor forwards SIGTERM to every worker (each drains as a
    single daemon does: stops accepting, finishes in-flight requests within ``shutdown_timeout``,
    sends WebSocket 1001s) and waits for all of them; a worker still running ``shutdown_timeout``
    + ``DRAIN_MARGIN`` later is killed by pid (exit status 1). All exited in time: exit status 0.
    A second SIGTERM/SIGINT is forwarded too (a worker's second signal stops it at once); workers
    left after ``STOP_NOW_GRACE`` are killed; exit status 1. SIGHUP is forwarded to every ready
    worker (each reloads its config, see server.py); a worker still starting gets it once ready.
    ``workers`` itself, listen addresses and ``shutdown_timeout`` are read by the supervisor at
    start-up only.

The admin listener (``admin.listen``) belongs to the supervisor
    ``/healthz`` (200 while any worker process runs), ``/readyz`` (200 when not draining and any
    worker is ready), ``/metrics`` (all workers added up, see observe/metrics.py: counters and
    histograms from the multiprocess directory, the scrape-time pool/DNS/cache families asked from
    every ready worker at each scrape over ``GET /metrics/stats``, plus ``proxyd_workers`` and
    ``proxyd_worker_restarts_total``) and ``/workers`` (JSON: the listen addresses, and each
    worker's index, pid, readiness and restarts).
    Everything else is relayed to the workers' private admin listeners (a Unix socket each, in
    the supervisor's temporary directory, so the proxy itself can never be pointed at them):
    ``GET``/``HEAD`` to one worker, the first ready one (``/status``, ``/netlog``, ``/proxy.pac``:
    per-worker views), streamed as the worker sends it; ``/workers/<i>/<path>`` to worker ``i``
    (``/workers/1/status``, ``/workers/0/metrics`` for one worker's own numbers); any other method
    (``POST /reload``, ``POST /cache/purge``) to every ready worker, since it changes each one's
    state: identical answers pass through, different ones are listed per worker (status: the
    common one; 200 when some succeeded and the rest said 404, as a purge of an entry another
    worker already removed; else the highest).

The temporary directory (metrics files and sockets) is removed when the supervisor exits.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import mark_process_dead

from proxyd.config import Config, HostPort
from proxyd.observe.metrics import SupervisorMetrics

log = logging.getLogger(__name__)

WORKER_ENV: Final = "PROXYD_WORKER"
MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"

#: A worker must be ready (listening, signals watched) within this many seconds of its start.
START_TIMEOUT: Final = 60.0
#: Beyond shutdown_timeout, for a worker to close its cache and exit after draining.
DRAIN_MARGIN: Final = 5.0
#: After a second SIGTERM, workers get this long to stop before they are killed.
STOP_NOW_GRACE: Final = 3.0
#: How often a worker checks that its supervisor is still its parent.
PARENT_CHECK_INTERVAL: Final = 0.5
#: Restart back-off: the first delay, its cap, and the run time that counts as stable.
RESTART_FIRST: Final = 0.25
RESTART_CAP: Final = 30.0
RESTART_STABLE_AFTER: Final = 10.0

_ADMIN_TIMEOUT: Final = 30.0  # reading a request from an admin client, writing to it
_STATS_TIMEOUT: Final = 1.0  # a worker's scrape-time families, per scrape
_FAN_OUT_TIMEOUT: Final = 60.0  # a POST relayed to every worker (a reload may fetch a PAC script)
_RELAY_LIMIT: Final = 3600.0  # one relayed GET, streamed (GET /netlog?seconds=N) included
_MAX_BODY: Final = 64 << 10  # admin requests carry small bodies, if any
_MAX_ANSWER: Final = 16 << 20  # a worker's buffered answer (fan-out, stats)
_TEXT: Final = b"text/plain; charset=utf-8"
_HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
    }
)


# --- the worker's side ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What the supervisor tells a worker (JSON in ``PROXYD_WORKER``)."""

    index: int
    parent: int  # the supervisor's pid: a worker whose parent changes drains
    notify_fd: int  # write end of the readiness pipe (inherited)
    listen: tuple[str, ...]  # concrete HOST:PORT (port 0 resolved by the supervisor)
    admin_socket: str  # the private admin listener's Unix socket path
    public_admin: tuple[tuple[str, int], ...]  # the supervisor's admin addresses

    def to_json(self) -> str:
        return json.dumps(
            {
                "index": self.index,
                "parent": self.parent,
                "notify_fd": self.notify_fd,
                "listen": list(self.listen),
                "admin_socket": self.admin_socket,
                "public_admin": [list(address) for address in self.public_admin],
            }
        )

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        data = json.loads(text)
        return cls(
            index=int(data["index"]),
            parent=int(data["parent"]),
            notify_fd=int(data["notify_fd"]),
            listen=tuple(str(item) for item in data["listen"]),
            admin_socket=str(data["admin_socket"]),
            public_admin=tuple((str(host), int(port)) for host, port in data["public_admin"]),
        )


def worker_spec_from_environ() -> WorkerSpec | None:
    """This process's ``WorkerSpec`` when a supervisor started it, else None."""
    text = os.environ.get(WORKER_ENV)
    return None if not text else WorkerSpec.from_json(text)


async def serve_worker(spec: WorkerSpec, serve: Callable[..., Awaitable[int]]) -> int:
    """A worker's main: ``serve`` (``serve_until_signalled`` with the daemon's arguments bound)
    with this worker's binding; tells the supervisor once ready; drains if it vanishes."""
    from proxyd.server import ProxyServer, WorkerBinding

    def started(server: ProxyServer) -> None:
        # A line of a few bytes to a pipe nobody else writes: never blocks, never splits.
        try:
            os.write(spec.notify_fd, f"ready {os.getpid()}\n".encode("ascii"))
        except OSError as exc:  # the supervisor is gone: _watch_parent drains us
            log.warning("cannot tell the supervisor we are ready: %s", exc)
        finally:
            os.close(spec.notify_fd)
        log.info("worker %d (pid %d) ready", spec.index, os.getpid())

    binding = WorkerBinding(admin_socket=spec.admin_socket, public_admin=spec.public_admin)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_parent, spec.parent)
        code = await serve(worker=binding, on_started=started)
        nursery.cancel_scope.cancel()
    return code


async def _watch_parent(parent: int) -> None:
    # Polling is the only portable way: PR_SET_PDEATHSIG fires when the *thread* that started
    # us exits, and trio starts processes from a worker thread.
    while os.getppid() == parent:  # noqa: ASYNC110
        await trio.sleep(PARENT_CHECK_INTERVAL)
    log.warning("the supervisor (pid %d) is gone: draining", parent)
    # serve_until_signalled treats it as any SIGTERM: a graceful drain.
    os.kill(os.getpid(), signal.SIGTERM)


# --- restart policy (pure) -----------------------------------------------------------------------


def restart_delay(quick_failures: int, ran_for: float) -> tuple[float, int]:
    """Seconds to wait before starting a worker again, and the new count of quick failures.

    ``quick_failures`` counts the consecutive runs shorter than ``RESTART_STABLE_AFTER`` before
    this one; a run at least that long resets it. The delay doubles per quick failure.
    """
    if ran_for >= RESTART_STABLE_AFTER:
        quick_failures = 0
    delay = min(RESTART_CAP, RESTART_FIRST * 2 ** min(quick_failures, 16))
    return delay, quick_failures + 1


# --- the supervisor ------------------------------------------------------------------------------


def supervise(config: Config, argv: Sequence[str]) -> int:
    """Run the supervisor and ``config.workers`` workers (given ``argv``) until SIGTERM/SIGINT;
    returns the exit status."""
    try:
        reservations, listen = _reserve_ports(config.listen)
    except OSError as exc:
        print(f"proxyd: cannot start: {exc}", file=sys.stderr)
        return 1
    run_dir = tempfile.mkdtemp(prefix="proxyd-workers-")
    try:
        supervisor = Supervisor(config, argv, listen=listen, run_dir=run_dir)
        return trio.run(supervisor.run)
    except OSError as exc:  # the admin listener cannot be bound
        print(f"proxyd: cannot start: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 1
    finally:
        for sock in reservations:
            sock.close()
        shutil.rmtree(run_dir, ignore_errors=True)


def _reserve_ports(addresses: Sequence[HostPort]) -> tuple[list[socket.socket], tuple[str, ...]]:
    """Bind (without listening) each listen address with SO_REUSEPORT, as server._bind does for
    the workers; port 0 becomes one concrete port. Returns the sockets and the addresses."""
    sockets: list[socket.socket] = []
    listen: list[str] = []
    try:
        for address in addresses:
            host = None if address.host in ("0.0.0.0", "*", "") else address.host
            port = address.port
            for family, type_, proto, _, sockaddr in socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            ):
                sock = socket.socket(family, type_, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((sockaddr[0], port, *sockaddr[2:]))
                port = int(sock.getsockname()[1])  # port 0: every family gets the first one's
            listen.append(str(HostPort(address.host, port)))
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets, tuple(listen)


@dataclass(slots=True)
class _Slot:
    """One worker position: the process filling it now, and its history."""

    index: int
    process: trio.Process | None = None
    admin_socket: str = ""
    ready: bool = False
    ever_ready: bool = False
    reload_pending: bool = False
    started_wall: float = 0.0
    restarts: int = 0
    last_exit: int | None = None
    spawns: int = 0


class Supervisor:
    def __init__(
        self, config: Config, argv: Sequence[str], *, listen: tuple[str, ...], run_dir: str
    ) -> None:
        self.config = config
        self._argv = list(argv)
        self._listen = listen
        self._run_dir = run_dir
        self.metrics = SupervisorMetrics(run_dir)
        self.slots = [_Slot(index) for index in range(config.workers)]
        self.admin_addresses: list[tuple[str, int]] = []
        self._stopping = trio.Event()
        self._all_started = False
        self._exit_code = 0
        self._nursery: trio.Nursery | None = None

    @property
    def is_draining(self) -> bool:
        return self._stopping.is_set()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> int:
        config = self.config
        admin_listeners: list[trio.SocketListener] = []
        if config.admin.listen is not None:
            host: str | None = config.admin.listen.host
            if host in ("0.0.0.0", "*", ""):
                host = None
            admin_listeners = await trio.open_tcp_listeners(config.admin.listen.port, host=host)
        for listener in admin_listeners:
            name = listener.socket.getsockname()
            self.admin_addresses.append((str(name[0]), int(name[1])))
        log.info(
            "supervisor (pid %d): %d workers on %s, admin on %s",
            os.getpid(),
            len(self.slots),
            ", ".join(self._listen),
            ", ".join(f"{h}:{p}" for h, p in self.admin_addresses) or "(off)",
        )
        try:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._watch_signals, sigs)
                    if admin_listeners:
                        nursery.start_soon(
                            trio.serve_listeners, self._handle_admin, admin_listeners
                        )
                    async with trio.open_nursery() as workers:
                        for slot in self.slots:
                            workers.start_soon(self._run_slot, slot)
                        task_status.started(self)
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                for listener in admin_listeners:
                    await trio.aclose_forcefully(listener)
        log.info("supervisor stopped (exit status %d)", self._exit_code)
        return self._exit_code

    # --- signals and stopping ---------------------------------------------------------------------

    async def _watch_signals(self, signals: Any) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                self.reload_all()
            elif not self.is_draining:
                log.info("%s: draining %d workers", name, self._running())
                self.stop()
            else:
                log.warning("second %s: stopping the workers now", name)
                self._exit_code = 1
                self._signal_all(signal.SIGTERM)  # a worker's second signal: it stops at once
                self._kill_later(STOP_NOW_GRACE)

    def reload_all(self) -> None:
        """Forward SIGHUP to every ready worker; one still starting gets it once ready."""
        if self.is_draining:
            log.info("SIGHUP while draining: not forwarded")
            return
        forwarded = 0
        for slot in self.slots:
            if slot.process is None:
                continue
            if slot.ready:
                slot.process.send_signal(signal.SIGHUP)
                forwarded += 1
            else:
                slot.reload_pending = True
        log.info("SIGHUP: forwarded to %d worker(s)", forwarded)

    def stop(self) -> None:
        """Drain every worker (idempotent); kill those still running after the bound."""
        if self.is_draining:
            return
        self._stopping.set()
        self._signal_all(signal.SIGTERM)
        self._kill_later(self.config.shutdown_timeout + DRAIN_MARGIN)

    def _signal_all(self, signum: int) -> None:
        for slot in self.slots:
            if slot.process is not None:
                slot.process.send_signal(signum)  # does nothing once it has been reaped

    def _kill_later(self, delay: float) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._kill_after, delay)

    async def _kill_after(self, delay: float) -> None:
        await trio.sleep(delay)
        for slot in self.slots:
            process = slot.process
            if process is not None and process.returncode is None:
                log.error(
                    "worker %d (pid %d) did not exit within %gs: killing it",
                    slot.index,
                    process.pid,
                    delay,
                )
                self._exit_code = 1
                process.kill()

    def _running(self) -> int:
        return sum(1 for slot in self.slots if slot.process is not None)

    # --- worker slots -----------------------------------------------------------------------------

    async def _run_slot(self, slot: _Slot) -> None:
        quick_failures = 0
        while not self.is_draining:
            began = trio.current_time()
            code = await self._run_worker(slot)
            slot.last_exit = code
            if self.is_draining:
                return
            if not self._all_started and not slot.ever_ready:
                log.error(
                    "worker %d exited with status %d while starting: stopping", slot.index, code
                )
                self._exit_code = 1
                self.stop()
                return
            delay, quick_failures = restart_delay(quick_failures, trio.current_time() - began)
            slot.restarts += 1
            self.metrics.worker_restarts.inc()
            log.error(
                "worker %d exited with status %d; starting it again in %gs",
                slot.index,
                code,
                delay,
            )
            with trio.move_on_after(delay):
                await self._stopping.wait()

    async def _run_worker(self, slot: _Slot) -> int:
        """Start one worker in ``slot``, wait until it exits; returns its exit status."""
        slot.spawns += 1
        slot.admin_socket = os.path.join(self._run_dir, f"w{slot.index}-{slot.spawns}.sock")
        read_fd, write_fd = os.pipe()
        spec = WorkerSpec(
            index=slot.index,
            parent=os.getpid(),
            notify_fd=write_fd,
            listen=self._listen,
            admin_socket=slot.admin_socket,
            public_admin=tuple(self.admin_addresses),
        )
        env = {**os.environ, MULTIPROC_ENV: self._run_dir, WORKER_ENV: spec.to_json()}
        notify = trio.lowlevel.FdStream(read_fd)
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "proxyd", *self._argv],
                env=env,
                pass_fds=(write_fd,),
                process_group=0,  # a terminal's signals reach the supervisor only
            )
        except BaseException:
            await notify.aclose()
            raise
        finally:
            os.close(write_fd)  # the worker holds the only write end: EOF when it exits
        slot.process = process
        slot.started_wall = time.time()
        log.info("worker %d started (pid %d)", slot.index, process.pid)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._await_ready, slot, process, notify)
                code = await process.wait()
                nursery.cancel_scope.cancel()
        finally:
            slot.ready = False
            with trio.CancelScope(shield=True):
                if process.returncode is None:  # we are being cancelled: never leave a worker
                    process.kill()
                    with trio.move_on_after(5):
                        await process.wait()
                await notify.aclose()
            slot.process = None
            mark_process_dead(process.pid, self._run_dir)  # type: ignore[no-untyped-call]
            with contextlib.suppress(OSError):
                os.unlink(slot.admin_socket)
        log.log(
            logging.INFO if code == 0 else logging.WARNING,
            "worker %d (pid %d) exited with status %d",
            slot.index,
            process.pid,
            code,
        )
        return code

    async def _await_ready(
        self, slot: _Slot, process: trio.Process, notify: trio.lowlevel.FdStream
    ) -> None:
        line = b""
        with trio.move_on_after(START_TIMEOUT) as timer:
            while not line.endswith(b"\n"):
                data = await notify.receive_some(256)
                if not data:
                    return  # exited before it was ready: _run_slot decides
                line += data
        if timer.cancelled_caught:
            log.error(
                "worker %d (pid %d) not ready after %gs: killing it",
                slot.index,
                process.pid,
                START_TIMEOUT,
            )
            process.kill()
            return
        slot.ready = slot.ever_ready = True
        if self.is_draining:
            process.send_signal(signal.SIGTERM)  # its handler is in place now
            return
        if slot.reload_pending:
            slot.reload_pending = False
            process.send_signal(signal.SIGHUP)
        if not self._all_started and all(s.ever_ready for s in self.slots):
            self._all_started = True
            log.info(
                "all %d workers ready (pids %s)",
                len(self.slots),
                ", ".join(str(s.process.pid) for s in self.slots if s.process is not None),
            )

    def ready_slots(self) -> list[_Slot]:
        return [slot for slot in self.slots if slot.ready and slot.process is not None]

    def workers_json(self) -> bytes:
        workers = [
            {
                "index": slot.index,
                "pid": slot.process.pid if slot.process is not None else None,
                "ready": slot.ready,
                "restarts": slot.restarts,
                "started": slot.started_wall if slot.process is not None else None,
                "last_exit": slot.last_exit,
            }
            for slot in self.slots
        ]
        return json.dumps(
            {
                "supervisor": os.getpid(),
                "listen": list(self._listen),
                "draining": self.is_draining,
                "workers": workers,
            }
        ).encode()

    # --- the admin listener -----------------------------------------------------------------------

    async def _handle_admin(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 << 10)
        try:
            while True:
                received = None
                with trio.move_on_after(_ADMIN_TIMEOUT):
                    received = await _read_request(conn, stream)
                if received is None:
                    return
                request, body = received
                answer = await self._answer_local(request)
                if answer is None:
                    await self._relay(conn, stream, request, body)
                    return
                await _respond(conn, stream, request, *answer)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (
            h11.ProtocolError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            trio.TooSlowError,
        ) as exc:
            log.debug("admin connection ended: %s", exc)
        except Exception:  # one admin client must never take the supervisor down
            log.exception("unexpected error on an admin connection")
        finally:
            await trio.aclose_forcefully(stream)

    async def _answer_local(self, request: h11.Request) -> tuple[int, bytes, bytes] | None:
        path = request.target.split(b"?", 1)[0]
        if path not in (b"/healthz", b"/readyz", b"/metrics", b"/workers"):
            return None
        if request.method not in (b"GET", b"HEAD"):
            return 405, _TEXT, b"method not allowed\n"
        if path == b"/healthz":
            if self._running() or not self._all_started:
                return 200, _TEXT, b"ok\n"
            return 503, _TEXT, b"no worker running\n"
        if path == b"/readyz":
            if self.is_draining:
                return 503, _TEXT, b"draining\n"
            if not self.ready_slots():
                return 503, _TEXT, b"no worker ready\n"
            return 200, _TEXT, b"ready\n"
        if path == b"/workers":
            return 200, b"application/json", self.workers_json()
        ready = self.ready_slots()
        self.metrics.workers_ready.set(len(ready))
        stats: list[str] = []

        async def fetch(slot: _Slot) -> None:
            status, _, body = await _exchange(
                slot.admin_socket, _Outgoing(b"GET", b"/metrics/stats"), _STATS_TIMEOUT
            )
            if status == 200:
                stats.append(body.decode("utf-8", "replace"))
            else:
                log.warning("worker %d: no scrape-time metrics (%d)", slot.index, status)

        async with trio.open_nursery() as nursery:
            for slot in ready:
                nursery.start_soon(fetch, slot)
        return 200, CONTENT_TYPE_LATEST.encode("ascii"), self.metrics.exposition(stats)

    async def _relay(
        self, conn: h11.Connection, client: trio.SocketStream, request: h11.Request, body: bytes
    ) -> None:
        """Everything that is not the supervisor's own: to one worker, or to every worker."""
        target = request.target
        chosen: list[_Slot] | None = None
        if target.startswith(b"/workers/"):
            index_text, _, rest = target[len(b"/workers/") :].partition(b"/")
            slot = None
            if index_text.isdigit() and int(index_text) < len(self.slots):
                slot = self.slots[int(index_text)]
            if slot is None or not slot.ready:
                await _respond(conn, client, request, 404, _TEXT, b"no such worker ready\n")
                return
            chosen, target = [slot], b"/" + rest
        ready = chosen or self.ready_slots()
        if not ready:
            await _respond(conn, client, request, 503, _TEXT, b"no worker ready\n")
            return
        headers = [
            (name, value)
            for name, value in request.headers.raw_items()
            if name.lower() not in _HOP_BY_HOP
        ]
        outgoing = _Outgoing(request.method, target, headers, body)
        if request.method in (b"GET", b"HEAD") or chosen is not None:
            await self._relay_streamed(conn, client, request, ready[0], outgoing)
            return
        answers: list[tuple[_Slot, int, bytes, bytes]] = []

        async def ask(slot: _Slot) -> None:
            answers.append((slot, *await _exchange(slot.admin_socket, outgoing, _FAN_OUT_TIMEOUT)))

        async with trio.open_nursery() as nursery:
            for slot in ready:
                nursery.start_soon(ask, slot)
        answers.sort(key=lambda answer: answer[0].index)
        await _respond(conn, client, request, *_combine(answers))

    async def _relay_streamed(
        self,
        conn: h11.Connection,
        client: trio.SocketStream,
        request: h11.Request,
        slot: _Slot,
        outgoing: _Outgoing,
    ) -> None:
        try:
            with trio.fail_after(_ADMIN_TIMEOUT):
                worker = await trio.open_unix_socket(slot.admin_socket)
        except (OSError, trio.TooSlowError) as exc:
            body = f"worker {slot.index} cannot be reached: {exc}\n".encode()
            await _respond(conn, client, request, 502, _TEXT, body)
            return
        # The worker answers with Connection: close; its bytes go to the client as they come
        # (GET /netlog streams), and the client's connection closes after them.
        async with worker:
            with trio.move_on_after(_RELAY_LIMIT):
                await worker.send_all(outgoing.send(h11.Connection(h11.CLIENT)))
                while data := await worker.receive_some(65536):
                    with trio.fail_after(_ADMIN_TIMEOUT):
                        await client.send_all(data)


def _combine(answers: Sequence[tuple[_Slot, int, bytes, bytes]]) -> tuple[int, bytes, bytes]:
    """One answer for a request every worker answered (see the module docstring)."""
    first = answers[0]
    if all(answer[1:] == first[1:] for answer in answers):
        return first[1], first[2], first[3]
    statuses = [answer[1] for answer in answers]
    if any(200 <= status < 300 for status in statuses) and all(
        200 <= status < 300 or status == 404 for status in statuses
    ):
        status = 200
    else:
        status = max(statuses)
    lines = []
    for slot, each_status, _, body in answers:
        text = body.decode("utf-8", "replace").rstrip("\n")
        lines.append(f"worker {slot.index}: {each_status}\n{text}\n")
    return status, _TEXT, "".join(lines).encode()


@dataclass(frozen=True, slots=True)
class _Outgoing:
    """A request for a worker's admin listener (always ``Connection: close``)."""

    method: bytes
    target: bytes
    headers: Sequence[tuple[bytes, bytes]] = ()
    body: bytes = b""

    def send(self, conn: h11.Connection) -> bytes:
        """The request's bytes, as ``conn`` (a client connection) sends them."""
        return _send_request(conn, self.method, self.target, self.headers, self.body)


def _send_request(
    conn: h11.Connection,
    method: bytes,
    target: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    body: bytes,
) -> bytes:
    head = [(b"Host", b"proxyd-worker"), (b"Connection", b"close"), *headers]
    if body:
        head.append((b"Content-Length", str(len(body)).encode("ascii")))
    data = conn.send(h11.Request(method=method, target=target, headers=head)) or b""
    if body:
        data += conn.send(h11.Data(data=body)) or b""
    return data + (conn.send(h11.EndOfMessage()) or b"")


async def _exchange(path: str, request: _Outgoing, timeout: float) -> tuple[int, bytes, bytes]:
    """Send ``request`` to a worker's admin socket and read the whole answer (or a 502/504)."""
    conn = h11.Connection(h11.CLIENT)
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_unix_socket(path)
            async with stream:
                await stream.send_all(request.send(conn))
                status, content_type, chunks, size = 502, _TEXT, [], 0
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                    elif isinstance(event, h11.Response):
                        status = event.status_code
                        content_type = next(
                            (v for k, v in event.headers if k == b"content-type"), _TEXT
                        )
                    elif isinstance(event, h11.Data):
                        size += len(event.data)
                        if size > _MAX_ANSWER:
                            return 502, _TEXT, b"the worker's answer is too large\n"
                        chunks.append(bytes(event.data))
                    elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                        return status, bytes(content_type), b"".join(chunks)
    except trio.TooSlowError:
        return 504, _TEXT, b"the worker did not answer in time\n"
    except (OSError, h11.ProtocolError, trio.BrokenResourceError) as exc:
        return 502, _TEXT, f"the worker cannot be reached: {exc}\n".encode()


async def _read_request(
    conn: h11.Connection, stream: trio.SocketStream
) -> tuple[h11.Request, bytes] | None:
    """The next request and its body (up to _MAX_BODY), or None when the client is done."""
    event = conn.next_event()
    while event is h11.NEED_DATA:
        conn.receive_data(await stream.receive_some(65536))
        event = conn.next_event()
    if not isinstance(event, h11.Request):
        return None
    chunks: list[bytes] = []
    size = 0
    while not isinstance(body_event := conn.next_event(), h11.EndOfMessage):
        if body_event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(body_event, h11.Data):
            size += len(body_event.data)
            if size > _MAX_BODY:
                raise h11.RemoteProtocolError("admin request body too large", 413)
            chunks.append(bytes(body_event.data))
        elif isinstance(body_event, h11.ConnectionClosed):
            return None
    return event, b"".join(chunks)


async def _respond(
    conn: h11.Connection,
    stream: trio.SocketStream,
    request: h11.Request,
    status: int,
    content_type: bytes,
    body: bytes,
) -> None:
    headers = [
        (b"Content-Type", content_type),
        (b"Content-Length", str(len(body)).encode("ascii")),
        (b"Cache-Control", b"no-store"),
    ]
    data = conn.send(h11.Response(status_code=status, headers=headers)) or b""
    if request.method != b"HEAD":
        data += conn.send(h11.Data(data=body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    with trio.fail_after(_ADMIN_TIMEOUT):
        await stream.send_all(data)

"""The top nursery: proxy and admin listeners, the pool reaper, graceful drain.

How it works: ``ProxyServer.run`` binds every ``listen`` address and the admin address, builds the
shared ``Services`` and starts one accept loop per listener, the admin server and the keep-alive
reaper, then waits for ``drain()``. The accept loop takes a slot of ``client.max_connections``
*before* accepting, so beyond the limit new connections wait in the kernel's backlog instead of
being accepted and starved; EMFILE/ENFILE back off and retry (the daemon never falls over).

Drain (SIGTERM, SIGINT, or ``drain()``): stop accepting (listeners closed), mark the services
draining (``/readyz`` turns 503, responses carry ``Connection: close``), cancel connections idle
between requests, send 1001 to both sides of every WebSocket session, and wait up to
``shutdown_timeout`` for in-flight requests, tunnels and closing handshakes; whatever is left is
then cancelled. ``serve_until_signalled`` maps a second signal to an immediate stop.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import h11
import trio
from prometheus_client.core import GaugeMetricFamily, Metric

from proxyd.cache.store import CacheStore, StoreError
from proxyd.cache.transaction import HttpCache
from proxyd.client import ClientConnection, Services, make_background_fetch
from proxyd.config import Config, HostPort
from proxyd.http import access
from proxyd.http.relay import GroupKey, RelaySettings, connect_group
from proxyd.observe.accesslog import AccessLog
from proxyd.observe.admin import AdminServer
from proxyd.observe.metrics import Metrics, cache_gauges, pool_gauges
from proxyd.routing.router import Router
from proxyd.upstream.dns import Resolver
from proxyd.upstream.pool import Pool

log = logging.getLogger(__name__)

_ACCEPT_RETRY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


async def _bind(address: HostPort) -> list[trio.SocketListener]:
    host: str | None = address.host
    if host in ("0.0.0.0", "*", ""):
        host = None  # all addresses, IPv4 and IPv6
    return await trio.open_tcp_listeners(address.port, host=host)


def _sockname(listener: trio.SocketListener) -> tuple[str, int]:
    name = listener.socket.getsockname()
    return str(name[0]), int(name[1])


class ProxyServer:
    def __init__(self, config: Config, *, access_log: AccessLog | None = None) -> None:
        self.config = config
        self.metrics = Metrics()
        self.resolver = Resolver(config.dns, metrics=self.metrics)
        self.relay_settings: RelaySettings | None = None
        self.pool = Pool(config.pool, connector=self._connect_group, metrics=self.metrics)
        self.router = Router(
            config.routing,
            resolve=self.resolver.resolve,
            metrics=self.metrics,
            dns_timeout=config.dns.timeout,
            dns_ttl=config.dns.ttl,
        )
        self._access_log = access_log
        self.proxy_addresses: list[tuple[str, int]] = []
        self.admin_addresses: list[tuple[str, int]] = []
        self.services: Services | None = None
        self.cache: HttpCache | None = None
        self._drain = trio.Event()
        self._stopped = trio.Event()

    # --- lifecycle -----------------------------------------------------------------------------

    def drain(self) -> None:
        """Begin a graceful shutdown (idempotent)."""
        self._drain.set()

    @property
    def is_draining(self) -> bool:
        return self._drain.is_set()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        proxy_listeners: list[trio.SocketListener] = []
        for address in config.listen:
            proxy_listeners.extend(await _bind(address))
        admin_listeners: list[trio.SocketListener] = []
        if config.admin.listen is not None:
            admin_listeners = await _bind(config.admin.listen)
        self.proxy_addresses = [_sockname(listener) for listener in proxy_listeners]
        self.admin_addresses = [_sockname(listener) for listener in admin_listeners]

        forbidden_peers: set[tuple[str, int]] = set()
        forbidden_ports: set[int] = set()
        for host, port in self.admin_addresses:
            if ipaddress.ip_address(host.split("%", 1)[0]).is_unspecified:
                forbidden_ports.add(port)
            else:
                forbidden_peers.add((host, port))

        pseudonym = config.via.pseudonym or f"{socket.gethostname()}:{self.proxy_addresses[0][1]}"
        access_log = self._access_log
        if access_log is None and config.access_log.enabled:
            access_log = AccessLog(config.access_log.format, config.access_log.path)
        self.resolver.install()
        self.relay_settings = RelaySettings(
            pool=self.pool,
            metrics=self.metrics,
            resolve=self.resolver.resolve,
            hosts=dict(config.dns.hosts),
            connect_timeout=config.upstream.timeouts.connect,
            response_head_timeout=config.upstream.timeouts.response_head,
            idle_read_timeout=config.upstream.timeouts.idle_read,
            via_for_version=lambda version: services.via_for_version(version),
            forbidden_peers=frozenset(forbidden_peers),
            forbidden_local_ports=frozenset(forbidden_ports),
        )
        services = Services(
            config=config,
            relay=self.relay_settings,
            metrics=self.metrics,
            router=self.router,
            access_log=access_log,
            acl=access.ClientAcl(config.acl.allow_clients),
            auth=access.AuthCache(config.auth.users) if config.auth.users else None,
            pseudonym=pseudonym.lower().encode("ascii"),
        )
        self.services = services
        self.metrics.add_stats_provider(self._pool_metrics)
        self.metrics.add_stats_provider(self.resolver.metric_families)
        self.metrics.add_stats_provider(self._routing_metrics)
        admin_routes = {}
        if config.cache.enabled:
            await self._open_cache(services)
            if self.cache is not None:
                admin_routes[b"/cache/purge"] = self._serve_cache_purge
        if config.admin.proxy_pac is not None:
            admin_routes[b"/proxy.pac"] = self._serve_proxy_pac
        admin = AdminServer(
            self.metrics.registry, is_ready=lambda: not self.is_draining, routes=admin_routes
        )
        slots = trio.Semaphore(config.client.max_connections)
        log.info(
            "proxyd listening on %s, admin on %s",
            ", ".join(f"{h}:{p}" for h, p in self.proxy_addresses),
            ", ".join(f"{h}:{p}" for h, p in self.admin_addresses) or "(off)",
        )
        try:
            async with trio.open_nursery() as top:
                await top.start(self.pool.run)
                await top.start(self.router.run)  # a bad PAC script fails the start here
                if self.cache is not None:
                    await top.start(self.cache.run)
                if admin_listeners:
                    top.start_soon(admin.serve, admin_listeners)
                async with trio.open_nursery() as connections:
                    async with trio.open_nursery() as accepting:
                        for listener in proxy_listeners:
                            accepting.start_soon(
                                self._accept_loop, listener, services, slots, connections
                            )
                        task_status.started(self)
                        await self._drain.wait()
                        accepting.cancel_scope.cancel()
                    # Stop accepting for real: closed listeners refuse new connections at once
                    # instead of leaving them in the kernel backlog until we exit.
                    for listener in proxy_listeners:
                        await trio.aclose_forcefully(listener)
                    await self._shutdown(services, connections)
                top.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                for listener in proxy_listeners + admin_listeners:
                    await trio.aclose_forcefully(listener)
                if self.cache is not None:
                    with trio.move_on_after(5):
                        await self.cache.store.aclose()
            if access_log is not None and access_log is not self._access_log:
                access_log.close()
            self._stopped.set()
            log.info("proxyd stopped")

    async def _shutdown(self, services: Services, connections: trio.Nursery) -> None:
        services.draining = True
        log.info(
            "draining: %d connection(s) open, waiting up to %gs",
            len(services.connections),
            self.config.shutdown_timeout,
        )
        for conn in list(services.connections):
            conn.cancel_if_idle()
        # WebSocket sessions: 1001 to both sides; the wait below covers their closing handshakes.
        for session in list(services.websocket_sessions):
            session.drain()
        with trio.move_on_after(self.config.shutdown_timeout):
            if services.connections:
                await services.all_closed.wait()
        if services.connections:
            log.warning("shutdown timeout: closing %d connection(s)", len(services.connections))
        connections.cancel_scope.cancel()

    async def _accept_loop(
        self,
        listener: trio.SocketListener,
        services: Services,
        slots: trio.Semaphore,
        connections: trio.Nursery,
    ) -> None:
        metrics = self.metrics
        acl = services.acl
        while True:
            await slots.acquire()
            try:
                stream = await listener.accept()
            except OSError as exc:
                slots.release()
                if exc.errno in _ACCEPT_RETRY_ERRNOS:
                    log.error("accept failed (%s); retrying in 100 ms", exc)
                    await trio.sleep(0.1)
                    continue
                raise
            except BaseException:
                slots.release()
                raise
            try:
                peer = str(stream.socket.getpeername()[0])
            except OSError:
                slots.release()
                await trio.aclose_forcefully(stream)
                continue
            allowed = acl.allows(peer)
            if allowed:
                metrics.connections_allowed.inc()
            else:
                metrics.connections_denied.inc()
                log.warning("client %s is not in acl.allow_clients", peer)
            connections.start_soon(self._serve_client, services, stream, peer, allowed, slots)

    async def _serve_client(
        self,
        services: Services,
        stream: trio.SocketStream,
        peer: str,
        allowed: bool,
        slots: trio.Semaphore,
    ) -> None:
        try:
            await ClientConnection(services, stream, peer, allowed).run()
        except Exception:
            log.exception("unexpected error on a client connection from %s", peer)
        finally:
            slots.release()

    async def _connect_group(self, key: GroupKey) -> trio.abc.Stream:
        assert self.relay_settings is not None
        return await connect_group(self.relay_settings, key)

    def _pool_metrics(self) -> Iterator[Metric]:
        return pool_gauges(self.pool.stats())

    def _routing_metrics(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "proxyd_bad_proxies", "Upstream proxies on the bad-proxy list now"
        )
        family.add_metric([], self.router.bad_proxies.size(trio.current_time()))
        yield family

    async def _open_cache(self, services: Services) -> None:
        """Open the store (sweeping what a crash left) and the cache in front of it."""
        config = self.config.cache
        try:
            store = await CacheStore.open(
                _cache_dir(config.dir),
                max_size=config.max_size,
                max_object_size=config.max_object_size,
                memory_object_size=config.memory_object_size,
                memory_size=config.memory_size,
            )
        except StoreError as exc:
            # The proxy is more useful without a cache than not at all.
            log.error("cache.dir %s cannot be used, running without a cache: %s", config.dir, exc)
            return
        cache = HttpCache(
            store,
            config,
            self.metrics,
            name=services.pseudonym.decode("ascii"),
            via=services.via_for_version,
            idle_timeout=self.config.upstream.timeouts.idle_read,
            head_timeout=self.config.upstream.timeouts.response_head,
        )
        cache.background_fetch = make_background_fetch(services)
        services.cache = self.cache = cache
        self.metrics.add_stats_provider(self._cache_metrics)

    def _cache_metrics(self) -> Iterator[Metric]:
        assert self.cache is not None
        stats = self.cache.store.stats()
        return cache_gauges(stats.entries, stats.bytes, stats.evictions, stats.paused)

    async def _serve_cache_purge(self, request: h11.Request) -> tuple[int, bytes, bytes]:
        """POST /cache/purge?url=URL: remove every stored variant of URL."""
        text = b"text/plain; charset=utf-8"
        if request.method != b"POST":
            return 405, text, b"use POST /cache/purge?url=http://host/path\n"
        query = request.target.split(b"?", 1)[1] if b"?" in request.target else b""
        urls = parse_qs(query.decode("latin-1")).get("url")
        if not urls:
            return 400, text, b"missing url= parameter\n"
        assert self.cache is not None
        try:
            removed = await self.cache.purge(urls[0])
        except (ValueError, UnicodeError) as exc:
            return 400, text, f"bad url: {exc}\n".encode()
        if not removed:
            return 404, text, b"not in the cache\n"
        return 200, text, f"purged {removed}\n".encode()

    async def _serve_proxy_pac(self, request: h11.Request) -> tuple[int, bytes, bytes]:
        """GET /proxy.pac: the configured PAC file, read on each request (edits apply at once)."""
        path = self.config.admin.proxy_pac
        assert path is not None
        try:
            body = await trio.Path(path).read_bytes()
        except OSError as exc:
            log.error("cannot read admin.proxy_pac %s: %s", path, exc)
            return 503, b"text/plain; charset=utf-8", b"the PAC file cannot be read\n"
        return 200, b"application/x-ns-proxy-autoconfig", body


async def serve_until_signalled(config: Config) -> int:
    """Run until SIGTERM/SIGINT (drain) — a second signal stops at once. Returns the exit code."""
    server = ProxyServer(config)
    exit_code = 0
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)

            async def watch_signals() -> None:
                nonlocal exit_code
                async for signum in signals:
                    if not server.is_draining:
                        log.info("%s: draining", signal.Signals(signum).name)
                        server.drain()
                    else:
                        log.warning("second %s: stopping now", signal.Signals(signum).name)
                        exit_code = 1
                        nursery.cancel_scope.cancel()

            nursery.start_soon(watch_signals)
            await server._stopped.wait()
            nursery.cancel_scope.cancel()
    return exit_code


def _cache_dir(configured: str) -> Path:
    """cache.dir with ``~`` expanded (a string operation, no disk access)."""
    return Path(os.path.expanduser(configured))

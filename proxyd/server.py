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

Reload (SIGHUP, ``POST /reload`` on the admin listener, or ``reload()``): re-read the config the
daemon started from (``reload.ConfigSource``: same file, same command-line overrides) in a worker
thread and validate it; an invalid one is refused with every error logged (``FILE:LINE:
key.path: message``) and the old config stays. ``reload.plan_reload`` keeps the settings that need
a restart (listen addresses, admin listen, cache.enabled, cache.dir) at their old values and logs
each change to them. What can fail is done before anything is swapped: the access log file is
opened for a try, and the router loads a new PAC source (a script that cannot be loaded refuses the
reload). Then, with no await in between, every component takes the new settings: resolver, pool
limits, relay timeouts, the ``Services`` every request reads (config, ACL, auth users, Via,
WebSocket settings), the connection limit, the cache's limits, the access log (reopened: SIGHUP
after rotating it), the log level. Requests that start afterwards follow the new config;
connections, tunnels and WebSocket sessions already open keep what they started with.
``config_generation`` (1 at start) counts applied reloads; ``proxyd_config_reloads_total`` counts
both outcomes. Reloads run one at a time.

As a worker of ``workers: N`` (proxyd/workers.py, ``WorkerBinding``): the proxy listeners are bound
with SO_REUSEPORT, so the kernel spreads new connections over every worker's listener on the same
port; the admin listener is a private Unix socket that only the supervisor talks to (it serves the
public admin address and relays to it), with ``GET /metrics/stats`` for the scrape-time families;
the supervisor's public admin addresses are still refused as proxy destinations.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import h11
import trio
from prometheus_client.core import GaugeMetricFamily, Metric

from proxyd import __version__
from proxyd.cache.store import CacheStore, StoreError
from proxyd.cache.transaction import HttpCache
from proxyd.client import ClientConnection, Services, make_background_fetch
from proxyd.config import AccessLogConfig, Config, ConfigError, HostPort
from proxyd.http import access
from proxyd.http.relay import GroupKey, RelaySettings, connect_group
from proxyd.observe import status
from proxyd.observe.accesslog import AccessLog
from proxyd.observe.admin import AdminServer, Route
from proxyd.observe.metrics import Metrics, cache_gauges, pool_gauges
from proxyd.observe.netlog import NetLog
from proxyd.reload import ConfigSource, ReloadResult, plan_reload
from proxyd.routing.errors import PacLoadError
from proxyd.routing.router import Router
from proxyd.upstream.dns import Resolver
from proxyd.upstream.pool import Pool
from proxyd.upstream.route import parse_route_list

log = logging.getLogger(__name__)

_ACCEPT_RETRY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


async def _bind(address: HostPort, *, reuse_port: bool = False) -> list[trio.SocketListener]:
    host: str | None = address.host
    if host in ("0.0.0.0", "*", ""):
        host = None  # all addresses, IPv4 and IPv6
    if not reuse_port:
        return await trio.open_tcp_listeners(address.port, host=host)
    # trio.open_tcp_listeners with SO_REUSEPORT added (it takes no socket options): every worker
    # binds the same port and the kernel spreads connections over their listeners.
    listeners: list[trio.SocketListener] = []
    try:
        for family, type_, proto, _, sockaddr in await trio.socket.getaddrinfo(
            host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        ):
            sock = trio.socket.socket(family, type_, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                await sock.bind(sockaddr)
                sock.listen(0xFFFF)  # trio's default: the system's maximum backlog
            except BaseException:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    return listeners


async def _bind_unix(path: str) -> trio.SocketListener:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


@dataclass(frozen=True, slots=True)
class WorkerBinding:
    """How a worker process of a supervisor (proxyd/workers.py) binds its listeners."""

    #: The private admin listener: a Unix socket the supervisor relays admin requests to.
    admin_socket: str
    #: The supervisor's public admin addresses: refused as proxy destinations like our own.
    public_admin: tuple[tuple[str, int], ...] = ()


def _sockname(listener: trio.SocketListener) -> tuple[str, int]:
    name = listener.socket.getsockname()
    return str(name[0]), int(name[1])


class ProxyServer:
    def __init__(
        self,
        config: Config,
        *,
        access_log: AccessLog | None = None,
        netlog_path: str | None = None,
        config_source: ConfigSource | None = None,
        manage_log_level: bool = False,
        worker: WorkerBinding | None = None,
    ) -> None:
        self.config = config
        self._worker = worker
        #: 1 at start-up, one more per applied reload (the status page shows it).
        self.config_generation = 1
        self._config_source = config_source
        self._manage_log_level = manage_log_level
        self._reload_lock = trio.Lock()
        #: client.max_connections, a limiter so that a reload can change it.
        self._slots: trio.CapacityLimiter | None = None
        #: The access log this server opened (and closes), as opposed to one handed in.
        self._own_access_log: AccessLog | None = None
        #: Per-request events: GET /netlog on the admin listener, and --netlog FILE from start-up.
        self.netlog = NetLog()
        self._netlog_path = netlog_path
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
        self._started_at = 0.0  # trio.current_time() when run() began (the status page's uptime)

    # --- lifecycle -----------------------------------------------------------------------------

    def drain(self) -> None:
        """Begin a graceful shutdown (idempotent)."""
        self._drain.set()

    @property
    def is_draining(self) -> bool:
        return self._drain.is_set()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        self._started_at = trio.current_time()
        proxy_listeners: list[trio.SocketListener] = []
        worker = self._worker
        for address in config.listen:
            proxy_listeners.extend(await _bind(address, reuse_port=worker is not None))
        admin_listeners: list[trio.SocketListener] = []
        if worker is not None:
            admin_listeners = [await _bind_unix(worker.admin_socket)]
        elif config.admin.listen is not None:
            admin_listeners = await _bind(config.admin.listen)
        self.proxy_addresses = [_sockname(listener) for listener in proxy_listeners]
        if worker is not None:
            self.admin_addresses = list(worker.public_admin)
        else:
            self.admin_addresses = [_sockname(listener) for listener in admin_listeners]

        forbidden_peers: set[tuple[str, int]] = set()
        forbidden_ports: set[int] = set()
        for host, port in self.admin_addresses:
            if ipaddress.ip_address(host.split("%", 1)[0]).is_unspecified:
                forbidden_ports.add(port)
            else:
                forbidden_peers.add((host, port))

        access_log = self._access_log
        if access_log is None and config.access_log.enabled:
            access_log = self._own_access_log = AccessLog(
                config.access_log.format, config.access_log.path
            )
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
            pseudonym=self._pseudonym(config),
            netlog=self.netlog,
            # trio.current_time's clock, called directly (one call instead of three).
            now=trio.lowlevel.current_clock().current_time,
        )
        self.services = services
        self.metrics.add_stats_provider(self._pool_metrics)
        self.metrics.add_stats_provider(self.resolver.metric_families)
        self.metrics.add_stats_provider(self._routing_metrics)
        admin_routes: dict[bytes, Route] = {b"/netlog": self.netlog.admin_route}
        admin_routes[b"/status"] = admin_routes[b"/status.json"] = self._serve_status
        if config.cache.enabled:
            await self._open_cache(services)
            if self.cache is not None:
                admin_routes[b"/cache/purge"] = self._serve_cache_purge
        # Always routed: a reload may set or unset admin.proxy_pac (404 while unset).
        admin_routes[b"/proxy.pac"] = self._serve_proxy_pac
        admin_routes[b"/reload"] = self._serve_reload
        if worker is not None:
            admin_routes[b"/metrics/stats"] = self._serve_stats_metrics
        admin = AdminServer(
            self.metrics.registry, is_ready=lambda: not self.is_draining, routes=admin_routes
        )
        slots = self._slots = trio.CapacityLimiter(config.client.max_connections)
        log.info(
            "proxyd listening on %s, admin on %s",
            ", ".join(f"{h}:{p}" for h, p in self.proxy_addresses),
            ", ".join(f"{h}:{p}" for h, p in self.admin_addresses) or "(off)",
        )
        try:
            async with trio.open_nursery() as top:
                if self._netlog_path is not None:  # before anything is accepted
                    await top.start(self.netlog.write_file, self._netlog_path)
                await top.start(self.pool.run)
                await top.start(services.idle.run)  # client.timeouts.idle
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
            if self._own_access_log is not None:
                self._own_access_log.close()
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
        slots: trio.CapacityLimiter,
        connections: trio.Nursery,
    ) -> None:
        metrics = self.metrics
        while True:
            # A token per connection: the slot is released by the connection's own task.
            token = object()
            await slots.acquire_on_behalf_of(token)
            try:
                stream = await listener.accept()
            except OSError as exc:
                slots.release_on_behalf_of(token)
                if exc.errno in _ACCEPT_RETRY_ERRNOS:
                    log.error("accept failed (%s); retrying in 100 ms", exc)
                    await trio.sleep(0.1)
                    continue
                raise
            except BaseException:
                slots.release_on_behalf_of(token)
                raise
            try:
                peer = str(stream.socket.getpeername()[0])
            except OSError:
                slots.release_on_behalf_of(token)
                await trio.aclose_forcefully(stream)
                continue
            allowed = services.acl.allows(peer)  # read per accept: a reload may swap the ACL
            if allowed:
                metrics.connections_allowed.inc()
            else:
                metrics.connections_denied.inc()
                log.warning("client %s is not in acl.allow_clients", peer)
            # The connection's own ``run`` is the task (it logs unexpected errors and releases
            # the slot): no wrapper coroutine stays alive under every idle connection.
            try:
                conn = ClientConnection(services, stream, peer, allowed, limiter=slots, token=token)
            except BaseException:
                slots.release_on_behalf_of(token)
                await trio.aclose_forcefully(stream)
                raise
            connections.start_soon(conn.run)

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

    # --- the status page (observe/status.py) ----------------------------------------------------

    def status_snapshot(self) -> status.Snapshot:
        """What /status and /status.json show: the stats() snapshots of one moment (no await)."""
        services = self.services
        assert services is not None, "the status is read while the server runs"
        config = self.config
        cache = self.cache
        return status.build_snapshot(
            now=trio.current_time(),
            wall=time.time(),
            started=self._started_at,
            version=__version__,
            config_generation=self.config_generation,
            draining=self.is_draining,
            connections=len(services.connections),
            pool=self.pool.stats(),
            pool_limits={
                "per_group": config.pool.per_group,
                "per_proxy": config.pool.per_proxy,
                "total": config.pool.total,
                "tunnels_per_host": config.pool.tunnels_per_host,
            },
            router=self.router.stats(),
            routes=self._route_table(),
            dns=self.resolver.stats(),
            dns_entries=self.resolver.cache_entries(status.ROW_LIMIT),
            cache=None if cache is None else cache.store.stats(),
            cache_max_bytes=config.cache.max_size,
            cache_lookups=self._cache_lookup_counts() if cache is not None else {},
            tunnels=services.tunnels,
            sessions=services.websocket_sessions,
            errors=list(services.recent_errors),
        )

    def _route_table(self) -> list[tuple[str, list[str]]]:
        """(match, route labels) in the order the router tries them; labels carry no password."""
        router = self.router
        routing = router.config
        table: list[tuple[str, list[str]]] = []
        if routing.bypass:
            table.append((", ".join(routing.bypass) + " (bypass)", ["DIRECT"]))
        if router.mode == "pac":
            table.append(("everything else (PAC)", ["FindProxyForURL"]))
            return table
        for rule in routing.rules:
            table.append((", ".join(rule.match), [r.label for r in parse_route_list(rule.route)]))
        table.append(
            ("everything else (default)", [r.label for r in parse_route_list(routing.default)])
        )
        return table

    def _cache_lookup_counts(self) -> dict[str, float]:
        """proxyd_cache_lookups_total by result, read from the counter itself (one fact, one
        place): the status page's hit ratio."""
        counts: dict[str, float] = {}
        for family in self.metrics.cache_lookups.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counts[sample.labels["result"]] = sample.value
        return counts

    async def _serve_status(self, request: h11.Request) -> tuple[int, bytes, bytes]:
        """GET /status: the live page; GET /status.json: the same snapshot as JSON."""
        if request.method not in (b"GET", b"HEAD"):
            return 405, b"text/plain; charset=utf-8", b"method not allowed\n"
        path, _, query = request.target.partition(b"?")
        snapshot = self.status_snapshot()
        if path == b"/status.json":
            return 200, b"application/json", json.dumps(snapshot, allow_nan=False).encode()
        refresh = status.refresh_seconds(parse_qs(query.decode("latin-1")))
        page = status.render_html(snapshot, refresh=refresh)
        return 200, b"text/html; charset=utf-8", page.encode("utf-8")

    async def _serve_stats_metrics(self, request: h11.Request) -> tuple[int, bytes, bytes]:
        """GET /metrics/stats (worker only): the scrape-time families for the supervisor."""
        return 200, b"text/plain; version=0.0.4", self.metrics.stats_exposition()

    async def _serve_proxy_pac(self, request: h11.Request) -> tuple[int, bytes, bytes]:
        """GET /proxy.pac: the configured PAC file, read on each request (edits apply at once)."""
        path = self.config.admin.proxy_pac
        if path is None:
            return 404, b"text/plain; charset=utf-8", b"admin.proxy_pac is not set\n"
        try:
            body = await trio.Path(path).read_bytes()
        except OSError as exc:
            log.error("cannot read admin.proxy_pac %s: %s", path, exc)
            return 503, b"text/plain; charset=utf-8", b"the PAC file cannot be read\n"
        return 200, b"application/x-ns-proxy-autoconfig", body

    # --- reload (SIGHUP, POST /reload; see the module docstring and proxyd/reload.py) ------------

    async def reload(self) -> ReloadResult:
        """Re-read and validate the config; apply it to new requests, or refuse it."""
        async with self._reload_lock:
            try:
                return await self._reload()
            except Exception as exc:
                # A reload must never take the daemon down (it runs in the top nursery, or in
                # the admin listener's): whatever it is, it is logged and the reload refused.
                log.exception("reload failed unexpectedly")
                self.metrics.config_reloads_error.inc()
                detail = f"internal error: {exc!r}"
                return ReloadResult("error", self.config_generation, errors=(detail,))

    async def _reload(self) -> ReloadResult:
        source = self._config_source
        why = None
        if source is None:
            why = "no config source to reload from (the server was given a Config object)"
        elif self.services is None or self.relay_settings is None:
            why = "the server is not running"
        elif self.is_draining:
            why = "the server is draining"
        if why is not None or source is None:
            log.warning("reload refused: %s", why)
            self.metrics.config_reloads_error.inc()
            return ReloadResult("refused", self.config_generation, errors=(str(why),))
        try:
            new = await trio.to_thread.run_sync(source.load)
        except ConfigError as exc:
            return self._reload_failed(source, exc.errors)
        plan = plan_reload(self.config, new)
        config = plan.config
        # What can fail goes first, so a refusal leaves everything as it was.
        problem = await trio.to_thread.run_sync(_try_access_log, config.access_log)
        if problem is not None:
            line = await trio.to_thread.run_sync(source.line_of, ("access_log", "path"))
            return self._reload_failed(
                source, [f"{source.name}:{line}: access_log.path: {problem}"]
            )
        try:
            await self.router.reconfigure(
                config.routing, dns_timeout=config.dns.timeout, dns_ttl=config.dns.ttl
            )
        except PacLoadError as exc:
            line = await trio.to_thread.run_sync(source.line_of, ("routing", "pac", "url"))
            problem = f"cannot load the PAC script: {exc.message}"
            return self._reload_failed(
                source, [f"{source.name}:{line}: routing.pac.url: {problem}"]
            )
        self._apply_config(config)
        self.config_generation += 1
        self.metrics.config_generation.set(self.config_generation)
        self.metrics.config_last_reload.set_to_current_time()
        self.metrics.config_reloads_ok.inc()
        for item in plan.restart_needed:
            log.warning("reload: %s", item.message())
        log.info(
            "config reloaded from %s: generation %d; changed: %s",
            source.path or source.name,
            self.config_generation,
            ", ".join(plan.changed) or "nothing",
        )
        if self.cache is not None:
            evicted = await self.cache.store.shrink()  # cache.max_size may have gone down
            if evicted:
                log.info("reload: %d cache entries evicted to fit cache.max_size", evicted)
        return ReloadResult(
            "ok",
            self.config_generation,
            changed=plan.changed,
            restart_needed=tuple(item.key for item in plan.restart_needed),
        )

    def _reload_failed(self, source: ConfigSource, errors: list[str]) -> ReloadResult:
        for error in errors:
            log.error("reload: %s", error)
        log.error(
            "reload refused: %d error(s) in %s; generation %d stays in force",
            len(errors),
            source.path or source.name,
            self.config_generation,
        )
        self.metrics.config_reloads_error.inc()
        return ReloadResult("error", self.config_generation, errors=tuple(errors))

    def _apply_config(self, config: Config) -> None:
        """Swap every component to ``config`` (validated, planned): no await, nothing fails."""
        services, relay = self.services, self.relay_settings
        assert services is not None and relay is not None
        old = self.config
        self.config = config
        self.resolver.reconfigure(config.dns)
        self.pool.reconfigure(config.pool)
        timeouts = config.upstream.timeouts
        self.relay_settings = relay = replace(
            relay,
            hosts=dict(config.dns.hosts),
            connect_timeout=timeouts.connect,
            response_head_timeout=timeouts.response_head,
            idle_read_timeout=timeouts.idle_read,
        )
        auth = services.auth
        if auth is None or config.auth.users != old.auth.users:
            # New users or passwords: remembered credentials must be verified again.
            auth = access.AuthCache(config.auth.users) if config.auth.users else None
        pseudonym = self._pseudonym(config)
        services.reconfigure(
            config,
            relay=relay,
            acl=access.ClientAcl(config.acl.allow_clients),
            auth=auth,
            pseudonym=pseudonym,
        )
        if self._slots is not None:
            self._slots.total_tokens = config.client.max_connections
        if self.cache is not None:
            self.cache.reconfigure(
                config.cache,
                name=pseudonym.decode("ascii"),
                idle_timeout=timeouts.idle_read,
                head_timeout=timeouts.response_head,
            )
        self._reconfigure_access_log(config.access_log)
        if self._manage_log_level:
            logging.getLogger().setLevel(config.log_level.upper())

    def _reconfigure_access_log(self, config: AccessLogConfig) -> None:
        services = self.services
        assert services is not None
        if not config.enabled:
            services.access_log = None
            if self._own_access_log is not None:
                self._own_access_log.close()
                self._own_access_log = None
            return
        current = self._access_log or self._own_access_log
        try:
            if current is None:
                current = self._own_access_log = AccessLog(config.format, config.path)
            else:
                current.reopen(config.format, config.path)  # SIGHUP after log rotation
        except OSError as exc:  # tried a moment ago (_try_access_log); keep what we had
            log.error(
                "access_log.path %s cannot be opened, keeping the old one: %s", config.path, exc
            )
        services.access_log = current

    def _pseudonym(self, config: Config) -> bytes:
        """Our name in Via and Proxy-Status: via.pseudonym, else "<hostname>:<first port>"."""
        name = config.via.pseudonym or f"{socket.gethostname()}:{self.proxy_addresses[0][1]}"
        return name.lower().encode("ascii")

    async def _serve_reload(self, request: h11.Request) -> tuple[int, bytes, bytes]:
        """POST /reload: 200 with the new generation, 400 with every config error, 409 when no
        reload is possible now (draining); JSON either way."""
        if request.method != b"POST":
            return 405, b"text/plain; charset=utf-8", b"use POST /reload\n"
        result = await self.reload()
        return result.http_status, b"application/json", result.json_body()


def _try_access_log(config: AccessLogConfig) -> str | None:
    """Whether the access log file can be opened (blocking: run in a thread); the problem."""
    if not config.enabled or config.path == "-":
        return None
    try:
        with open(config.path, "a", encoding="utf-8"):
            return None
    except OSError as exc:
        return f"cannot open {config.path}: {exc.strerror or exc}"


async def serve_until_signalled(
    config: Config,
    *,
    netlog_path: str | None = None,
    source: ConfigSource | None = None,
    worker: WorkerBinding | None = None,
    on_started: Callable[[ProxyServer], None] | None = None,
) -> int:
    """Run until SIGTERM/SIGINT (drain) — a second signal stops at once; SIGHUP reloads the
    config from ``source``. ``on_started`` is called once the listeners accept and the signals
    are being watched (a worker tells its supervisor). Returns the exit code."""
    server = ProxyServer(
        config,
        netlog_path=netlog_path,
        config_source=source,
        manage_log_level=True,
        worker=worker,
    )
    exit_code = 0
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)

            async def watch_signals() -> None:
                nonlocal exit_code
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        if server.is_draining:
                            log.info("SIGHUP while draining: no reload")
                        else:
                            log.info("SIGHUP: reloading the config")
                            # In its own task: a reload may wait for a PAC fetch, and a
                            # SIGTERM must still be heard meanwhile.
                            nursery.start_soon(server.reload)
                        continue
                    if not server.is_draining:
                        log.info("%s: draining", signal.Signals(signum).name)
                        server.drain()
                    else:
                        log.warning("second %s: stopping now", signal.Signals(signum).name)
                        exit_code = 1
                        nursery.cancel_scope.cancel()

            nursery.start_soon(watch_signals)
            if on_started is not None:
                on_started(server)
            await server._stopped.wait()
            nursery.cancel_scope.cancel()
    return exit_code


def _cache_dir(configured: str) -> Path:
    """cache.dir with ``~`` expanded (a string operation, no disk access)."""
    return Path(os.path.expanduser(configured))

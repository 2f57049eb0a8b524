"""The bad-proxy list: proxies that just failed are tried last for a while (pure, time as ``now``).

Chromium's model (``ProxyList::DeprioritizeBadProxyChains`` and ``ProxyRetryInfoMap``): when a
connection through a proxy fails, the client marks the proxy bad until ``now + ttl``
(``routing.bad_proxy_ttl``, 300 s by default, Chromium's default retry delay). ``order(routes,
now)`` then keeps the good entries in their configured order and moves the bad ones after them,
keeping *their* relative order too, so a bad proxy is still retried when nothing else is left (a
route list made only of bad proxies is tried unchanged). ``DIRECT`` is never bad: a failed direct
connection says something about the origin, not about a proxy.

Entries are keyed by ``Route.label`` (credential-free, bounded by the configured and PAC-returned
proxies), expire lazily when looked at, and the list holds at most ``max_entries`` (the entry that
would expire first is dropped to make room). ``now`` is any monotonic clock, the same one for every
call (the router uses ``trio.current_time()``).
"""

from __future__ import annotations

from proxyd.upstream.route import Direct, Route, RouteList

DEFAULT_TTL = 300.0
DIRECT_LABEL = "DIRECT"


class BadProxyList:
    __slots__ = ("_until", "max_entries", "ttl")

    def __init__(self, ttl: float = DEFAULT_TTL, *, max_entries: int = 1024) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._until: dict[str, float] = {}

    def mark_bad(self, label: str, now: float) -> None:
        """Deprioritize the proxy ``label`` until ``now + ttl`` (DIRECT is ignored)."""
        if label == DIRECT_LABEL:
            return
        until = self._until
        until.pop(label, None)  # re-insert: the dict stays ordered by the time of marking
        if len(until) >= self.max_entries:
            self._purge(now)
            if len(until) >= self.max_entries:
                del until[min(until, key=until.__getitem__)]
        until[label] = now + self.ttl

    def mark_good(self, label: str) -> None:
        """Forget ``label`` (a connection through it worked again)."""
        self._until.pop(label, None)

    def is_bad(self, label: str, now: float) -> bool:
        deadline = self._until.get(label)
        if deadline is None:
            return False
        if deadline <= now:
            del self._until[label]
            return False
        return True

    def _route_is_bad(self, route: Route, now: float) -> bool:
        return not isinstance(route, Direct) and self.is_bad(route.label, now)

    def order(self, routes: RouteList, now: float) -> RouteList:
        """Good entries first (in order), then the bad ones (in order): a stable partition."""
        if not self._until:
            return routes  # the common case: nothing is bad, nothing to do
        good: list[Route] = []
        bad: list[Route] = []
        for route in routes:
            (bad if self._route_is_bad(route, now) else good).append(route)
        return routes if not bad or not good else (*good, *bad)

    def _purge(self, now: float) -> None:
        for label in [label for label, deadline in self._until.items() if deadline <= now]:
            del self._until[label]

    def size(self, now: float) -> int:
        self._purge(now)
        return len(self._until)

    def snapshot(self, now: float) -> list[tuple[str, float]]:
        """``(label, seconds left)`` for every bad proxy, soonest to expire first."""
        self._purge(now)
        return sorted(
            ((label, deadline - now) for label, deadline in self._until.items()),
            key=lambda item: (item[1], item[0]),
        )

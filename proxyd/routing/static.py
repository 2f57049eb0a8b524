"""Static routing: ``routing.bypass``, then ``routing.rules`` (first match wins), then ``default``.

Pure policy (no I/O, no clock). ``StaticRouter`` compiles every pattern and parses every route list
once, when it is built from ``RoutingConfig``, so ``decide`` is a walk over precompiled patterns:

1. the host matches a ``bypass`` pattern -> ``(DIRECT,)``, like ``no_proxy`` and Chromium's bypass
   list, which also win over every proxy rule;
2. otherwise the first rule with a matching ``match`` pattern gives its ``route`` list;
3. otherwise the ``default`` route list.

The pattern forms are documented in routing/patterns.py. The result is the configured order; the
router then moves proxies on the bad-proxy list to the end (routing/failover.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from proxyd.config import RoutingConfig
from proxyd.routing.patterns import PatternSet, RequestHost
from proxyd.upstream.route import ALL_DIRECT, RouteList, parse_route_list


@dataclass(frozen=True, slots=True)
class StaticRule:
    patterns: PatternSet
    routes: RouteList


class StaticRouter:
    """Decides a route list from the host and port alone (see the module docstring)."""

    __slots__ = ("bypass", "default", "rules")

    def __init__(self, config: RoutingConfig) -> None:
        self.bypass = PatternSet.compile(config.bypass)
        self.rules = tuple(
            StaticRule(PatternSet.compile(rule.match), parse_route_list(list(rule.route)))
            for rule in config.rules
        )
        self.default = parse_route_list(list(config.default))

    def is_bypassed(self, host: str, port: int) -> bool:
        return bool(self.bypass) and self.bypass.matches(RequestHost.parse(host, port))

    def decide(self, scheme: str, host: str, port: int) -> RouteList:
        """The configured route list for ``scheme://host:port`` (``scheme`` is not matched on)."""
        request = RequestHost.parse(host, port)
        if self.bypass and self.bypass.matches(request):
            return ALL_DIRECT
        for rule in self.rules:
            if rule.patterns.matches(request):
                return rule.routes
        return self.default

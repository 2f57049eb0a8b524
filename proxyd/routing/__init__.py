"""Routing: which upstream route(s) a request takes -- static rules or a PAC script, with failover.

    client.py --decide(scheme, host, port, url)--> router.Router --RouteList--> upstream/
                                                     |
          static mode: static.StaticRouter           |   PAC mode: pac/ (fetch, refresh, a
          (bypass -> rules -> default, patterns.py)  |   QuickJS engine on its own thread)
                                                     v
                              failover.BadProxyList.order (bad proxies last)

Pure policy: ``patterns.py`` (host/CIDR/port patterns), ``static.py``, ``failover.py``,
``pac/script.py`` and ``pac/cache.py`` take the time as an argument and do no I/O. The trio shells
are ``router.py`` (the one object the client and server use), ``pac/evaluator.py`` (DNS rounds),
``pac/fetch.py`` (file / h11 GET) and ``pac/thread.py`` (the JavaScript worker thread).
``errors.py`` holds ``PacFailed`` (a request error) and ``PacLoadError`` (a start-up error).

This package file imports nothing: config.py validates patterns with ``patterns.py`` (stdlib
only), and importing the router from here would make that a cycle.
"""

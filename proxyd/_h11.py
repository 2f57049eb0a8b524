"""h11 for the proxy's own connections: the compiled build when it is installed.

proxyd speaks HTTP/1.1 through h11 (a hard dependency). ``h11-mypyc`` is the same library
compiled with mypyc; it installs as its own package, ``h11_mypyc``, next to h11, and parses and
writes messages about twice as fast, which is a fifth of the CPU a proxied request costs. It is the
``fast`` extra (``pip install 'proxyd[fast]'``) and never required.

How it works: this module binds the name ``h11`` once, at import, to ``h11_mypyc`` when that
imports and ``PROXYD_PURE_H11`` is not set (to anything but ``""`` or ``0``), else to the pure h11.
Every module whose h11 objects meet another's (the client connection, the relay, the upstream pool,
the cache and the WebSocket upgrade share connections and events) imports it from here::

    from proxyd._h11 import h11

so one process uses one build throughout: an event of one build is not an event of the other
(``type(event) is h11.Request`` would be false, and a connection refuses the other's events).
Modules with connections of their own that never leave them (the admin listener, the PAC fetcher,
the upstream proxy handshake, the workers' supervisor) may keep plain ``import h11``.

Type checking always sees the pure h11: the compiled build has the same API (it is compiled from
the same annotated source). ``tests/http/test_h11_builds.py`` runs proxyd under both builds.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import h11 as h11
else:

    def _load():
        if os.environ.get("PROXYD_PURE_H11", "") in ("", "0"):
            try:
                import h11_mypyc

                return h11_mypyc
            except ImportError:
                pass
        import h11

        return h11

    h11 = _load()

#: True when the compiled build (h11-mypyc) is in use.
COMPILED: bool = h11.__name__ != "h11"

__all__ = ["COMPILED", "h11"]

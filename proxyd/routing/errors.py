"""The two ways routing fails: a request that cannot be routed, and a PAC script that cannot load.

``PacFailed`` is a ``ProxydError`` (RFC 9209 §2.3.1 ``proxy_configuration_error``, 502): with
``pac.fallback: error`` a request whose PAC evaluation failed (a script error, the time or memory
limit, a result with no usable entry) ends with it. ``PacLoadError`` is *not* a request error: it is
raised when the configured PAC script cannot be fetched, read or compiled when proxyd starts (from
``Router.run`` before ``task_status.started()``); its ``message`` names the script, the line (when
the engine reports one) and the engine's own words, ready to print as a start-up error. A refresh
that fails the same way is logged and counted, and the last good script stays in use.
"""

from __future__ import annotations

from proxyd.errors import ProxydError


class PacFailed(ProxydError):
    """No route for this request: the PAC evaluation failed and ``pac.fallback`` is ``error``."""

    status = 502
    error_type = "proxy_configuration_error"


class PacLoadError(Exception):
    """The PAC script could not be loaded: ``message`` says where and why, ``line`` when known."""

    def __init__(self, message: str, *, line: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line

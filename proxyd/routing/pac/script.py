"""What proxyd knows about a PAC script without running it (pure: text in, facts out).

``analyze(source)`` reads the source once, when it is loaded, and answers the questions the router
asks on every request:

* ``version``: a short SHA-256 of the text. A refresh that fetches the same text is ``unchanged``;
  cache keys carry the version, so a new script never answers from the old script's results.
* ``time_dependent``: the text names ``weekdayRange``, ``dateRange``, ``timeRange``, ``Date`` or
  ``random`` (``Math.random`` load balancing). The answer of such a script can change from one
  request to the next, so its results are never cached. The check is a word match on the whole
  text, comments included: it can only err towards not caching.
* ``uses_url``: whether ``FindProxyForURL(url, host)`` (or ``...Ex``) reads its first parameter.
  When every entry point's first parameter name appears nowhere else in the text (and the text does
  not use ``arguments``), the answer depends on the host alone and is cached per (scheme, host);
  otherwise the cache key is the whole URL given to the script. Again this can only err towards a
  narrower key.

It also holds the two text helpers the rest of the package shares: ``script_url`` (the URL handed
to the script: for ``https``/``wss`` only ``scheme://host[:port]/``, as Chromium strips the path and
query of secure URLs before PAC sees them) and ``error_line`` / ``error_summary``, which pull the
line number and the first line out of an engine message such as
``SyntaxError: unexpected token in expression: ';'\\n    at <input>:3:10``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

_TIME_DEPENDENT = re.compile(r"\b(?:weekdayRange|dateRange|timeRange|Date|random)\b")
_IDENT = r"[A-Za-z_$][\w$]*"
_ENTRY_DEFINITIONS = (
    # function FindProxyForURL(url, host) { ... }
    re.compile(rf"\bfunction\s+FindProxyForURL(?:Ex)?\s*\(\s*({_IDENT})"),
    # FindProxyForURL = function (url, host) / var FindProxyForURL = function name(url, host)
    re.compile(rf"\bFindProxyForURL(?:Ex)?\s*=\s*function\s*(?:{_IDENT})?\s*\(\s*({_IDENT})"),
    # FindProxyForURL = (url, host) => ...
    re.compile(rf"\bFindProxyForURL(?:Ex)?\s*=\s*(?:async\s*)?\(\s*({_IDENT})\s*,"),
)
_ERROR_POSITION = re.compile(r"<input>:(\d+)(?::(\d+))?")
SECURE_SCHEMES = frozenset({"https", "wss"})
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443, "ftp": 21}


@dataclass(frozen=True, slots=True)
class ScriptFacts:
    version: str
    size: int
    time_dependent: bool
    uses_url: bool

    @property
    def cacheable(self) -> bool:
        return not self.time_dependent


def version_of(source: str) -> str:
    return hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _uses_url(source: str) -> bool:
    names = {match.group(1) for regex in _ENTRY_DEFINITIONS for match in regex.finditer(source)}
    if not names or re.search(r"\barguments\b", source):
        return True  # cannot tell: assume the URL matters
    for name in names:
        # The definition itself is one occurrence; any other is (or may be) a use.
        if len(re.findall(rf"(?<![\w$.]){re.escape(name)}(?![\w$])", source)) > 1:
            return True
    return False


def analyze(source: str) -> ScriptFacts:
    return ScriptFacts(
        version=version_of(source),
        size=len(source),
        time_dependent=_TIME_DEPENDENT.search(source) is not None,
        uses_url=_uses_url(source),
    )


def script_url(scheme: str, host: str, port: int, url: str) -> str:
    """The ``url`` argument for FindProxyForURL; secure URLs are cut to their origin (Chromium)."""
    scheme = scheme.lower()
    if scheme not in SECURE_SCHEMES and url:
        return url
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    if DEFAULT_PORTS.get(scheme) != port:
        shown = f"{shown}:{port}"
    return f"{scheme}://{shown}/"


def error_line(message: str) -> int | None:
    """The line of the first ``<input>:LINE:COL`` position in an engine message, if any."""
    match = _ERROR_POSITION.search(message)
    return int(match.group(1)) if match else None


def error_summary(message: str) -> str:
    """The engine's first line, with ``(line L, column C)`` when the message has a position."""
    first = message.strip().splitlines()[0] if message.strip() else "unknown error"
    match = _ERROR_POSITION.search(message)
    if match is None:
        return first
    if match.group(2):
        return f"{first} (line {match.group(1)}, column {match.group(2)})"
    return f"{first} (line {match.group(1)})"

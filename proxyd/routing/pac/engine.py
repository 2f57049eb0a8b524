"""One PAC script in one QuickJS context: load it, evaluate it, survive its failures.

``PacEngine`` is synchronous and thread-confined: the router creates it, and calls every method,
on the PAC worker thread (pac/thread.py). It holds at most one *current* context, built by
``load(source)`` in four steps:

1. a fresh ``JsContext`` with ``pac.memory_limit`` and a load time limit (compiling a large PAC
   file takes longer than evaluating it: ``max(10 x pac.timeout, 2 s)``);
2. pac/helpers.js, called with the ``myIpAddress``/``myIpAddressEx`` answers, installs the helper
   functions and returns ``bind``;
3. the PAC source itself (its top level runs here: a syntax error, an exception or a runaway loop
   at the top level fails the load, with the engine's message and line);
4. the entry point: ``FindProxyForURLEx`` when the script defines it (Microsoft's IPv6-aware
   entry point takes precedence, as in Windows and Chromium), otherwise ``FindProxyForURL``;
   neither is a load error. ``bind(entry)`` gives the evaluate function, and the time limit drops
   to ``pac.timeout``.

Only when all four succeed does the new context replace the current one, so a bad refresh leaves
the last good script running. ``evaluate`` makes one call and returns either the script's result
string or the host names it needs resolved first (see helpers.js: the DNS answers are an argument,
because JS must not call into Python); the caller resolves them and calls again. A script error is
``PacEvalError(kind="error")``; the time limit is ``kind="timeout"``. After a timeout, an
out-of-memory or a stack overflow the context may hold half-built state (a runaway that filled a
global array), so it is rebuilt from the last good source before the error is raised.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from importlib import resources
from typing import Literal

from proxyd.routing.errors import PacLoadError
from proxyd.routing.pac.js import JsContext, JsError, JsObject

HELPERS_SOURCE = resources.files("proxyd.routing.pac").joinpath("helpers.js").read_text("utf-8")
ENTRY_POINTS = ("FindProxyForURLEx", "FindProxyForURL")
_FIND_ENTRY = (
    "typeof FindProxyForURLEx === 'function' ? 'FindProxyForURLEx' : "
    "typeof FindProxyForURL === 'function' ? 'FindProxyForURL' : ''"
)
EvalErrorKind = Literal["error", "timeout"]


class PacEvalError(Exception):
    """One evaluation failed: ``kind`` is ``timeout`` (the time limit) or ``error``."""

    def __init__(self, message: str, kind: EvalErrorKind = "error") -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Evaluation:
    """The script's answer (``result``), or the names it needs resolved first (``missing``)."""

    result: str | None
    missing: tuple[str, ...] = ()
    alerts: tuple[str, ...] = ()


@dataclass(slots=True)
class _Loaded:
    context: JsContext
    evaluate: JsObject
    entry: str


class PacEngine:
    def __init__(
        self, *, timeout: float, memory_limit: int, my_ip: str = "127.0.0.1", my_ip_ex: str = ""
    ) -> None:
        self.timeout = timeout
        self.load_timeout = max(10 * timeout, 2.0)
        self.memory_limit = memory_limit
        self.my_ip = my_ip
        self.my_ip_ex = my_ip_ex or my_ip
        self._source: str | None = None
        self._current: _Loaded | None = None
        self.rebuilds = 0

    @property
    def entry(self) -> str | None:
        return self._current.entry if self._current is not None else None

    def _build(self, source: str, name: str) -> _Loaded:
        context = JsContext(memory_limit=self.memory_limit, time_limit=self.load_timeout)
        try:
            installer = context.eval(HELPERS_SOURCE)
            if not isinstance(installer, JsObject):
                raise PacLoadError(f"PAC script {name}: internal error: helpers did not install")
            bind = installer(self.my_ip, self.my_ip_ex)
            try:
                context.eval(source)
            except JsError as exc:
                where = f"line {exc.line}: " if exc.line is not None else ""
                raise PacLoadError(
                    f"PAC script {name}: {where}{exc.text.strip().splitlines()[0]}"
                    + (" (time limit)" if exc.kind == "timeout" else ""),
                    line=exc.line,
                ) from None
            entry_name = context.eval(_FIND_ENTRY)
            if not isinstance(entry_name, str) or not entry_name:
                raise PacLoadError(
                    f"PAC script {name}: defines neither FindProxyForURL nor FindProxyForURLEx"
                )
            entry = context.eval(entry_name)
            if not isinstance(bind, JsObject) or not isinstance(entry, JsObject):
                raise PacLoadError(f"PAC script {name}: internal error: no entry point")
            evaluate = bind(entry)
            if not isinstance(evaluate, JsObject):
                raise PacLoadError(f"PAC script {name}: internal error: bind failed")
            context.set_time_limit(self.timeout)
            return _Loaded(context, evaluate, entry_name)
        except JsError as exc:  # the helpers or the entry lookup failed: out of memory, say
            context.close()
            raise PacLoadError(f"PAC script {name}: {exc.summary}", line=None) from None
        except BaseException:
            context.close()
            raise

    def load(self, source: str, name: str = "<pac>") -> str:
        """Compile ``source`` into a new context; it replaces the current one only on success.

        Returns the entry point's name; raises ``PacLoadError`` (message with the line number).
        """
        loaded = self._build(source, name)
        previous, self._current, self._source = self._current, loaded, source
        if previous is not None:
            previous.context.close()
        return loaded.entry

    def evaluate(
        self, url: str, host: str, now_ms: float, utc_offset_minutes: float, answers_json: str
    ) -> Evaluation:
        """One call of the entry point (see the module docstring); raises ``PacEvalError``."""
        current = self._current
        if current is None:
            raise PacEvalError("no PAC script is loaded")
        try:
            # Floats on purpose: the binding truncates Python ints to 32 bits (epoch ms overflow).
            text = current.evaluate(
                url, host, float(now_ms), float(utc_offset_minutes), answers_json
            )
        except JsError as exc:
            if exc.kind != "error":
                self._rebuild()
            kind: EvalErrorKind = "timeout" if exc.kind == "timeout" else "error"
            limit = {"timeout": " (time limit)", "memory": " (memory limit)"}.get(exc.kind, "")
            raise PacEvalError(f"{exc.summary}{limit}", kind) from None
        if not isinstance(text, str):
            raise PacEvalError("internal error: the evaluation returned no text")
        data = json.loads(text)
        alerts = tuple(str(a) for a in data.get("alerts", ()))
        if "missing" in data:
            return Evaluation(None, tuple(str(name) for name in data["missing"]), alerts)
        result = data.get("result")
        if not isinstance(result, str):
            raise PacEvalError(
                f"{current.entry} returned {data.get('type', 'nothing')}, not a string"
            )
        return Evaluation(result, (), alerts)

    def _rebuild(self) -> None:
        """Replace a context that hit a limit with a fresh one running the last good source."""
        current, source = self._current, self._source
        self._current = None
        if current is not None:
            current.context.close()
        if source is not None:
            self.rebuilds += 1
            # On failure, evaluations say "no PAC script is loaded" until the next good load.
            with contextlib.suppress(PacLoadError):
                self._current = self._build(source, "<rebuild after a limit>")

    def dispose(self) -> None:
        """Free the context (call on the worker thread, before stopping it)."""
        if self._current is not None:
            self._current.context.close()
        self._current = None

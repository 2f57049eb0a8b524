"""Typed access to QuickJS (PyPI ``quickjs-ng``, import name ``quickjs``); the only importer of it.

quickjs-ng ships no type information, so this module is the seam: ``JsContext`` (one QuickJS
runtime + context with a memory limit and a per-call time limit), ``JsObject`` (a JS value that
is not a primitive, callable when it is a function) and ``JsError`` (every engine exception,
classified). What the binding does and what we rely on:

* ``set_time_limit(s)`` arms QuickJS's interrupt handler for *each* ``eval`` or call from Python;
  a script still running after ``s`` seconds is stopped with ``InternalError: interrupted``
  (``kind == "timeout"``). The binding measures the limit with C ``clock()``, i.e. process CPU
  time: when other threads are busy the limit fires sooner in wall time, never later.
* ``set_memory_limit(b)`` caps the runtime's allocations: ``InternalError: out of memory``
  (``kind == "memory"``). A deep recursion is ``StackOverflow`` (``kind == "stack"``).
* While a time limit is set the binding refuses calls from JS into Python (``Can not call into
  Python with a time limit set``), so nothing here registers Python callables: the PAC helpers
  get what they need as arguments (see pac/helpers.js).
* A runtime must only ever be used, and freed, on one OS thread: contexts are created, called and
  ``close()``d on the PAC worker thread (pac/thread.py), never touched from the trio thread.

Values crossing the boundary are primitives (``str``, ``int``, ``float``, ``bool``, ``None``) or
``JsObject``; callers exchange structured data as JSON text.
"""

from __future__ import annotations

from typing import Any, Literal

import quickjs  # type: ignore[import-untyped]  # quickjs-ng has no type hints; wrapped here

from proxyd.routing.pac.script import error_line, error_summary

JsErrorKind = Literal["error", "timeout", "memory", "stack"]


class JsError(Exception):
    """A JavaScript exception or an engine limit; ``text`` is the engine's full message."""

    def __init__(self, text: str, kind: JsErrorKind) -> None:
        super().__init__(text)
        self.text = text
        self.kind = kind

    @property
    def summary(self) -> str:
        return error_summary(self.text)

    @property
    def line(self) -> int | None:
        return error_line(self.text)


def _classify(exc: BaseException) -> JsError:
    text = str(exc)
    kind: JsErrorKind = "error"
    if isinstance(exc, quickjs.StackOverflow):
        kind = "stack"
    elif text.startswith("InternalError: interrupted"):
        kind = "timeout"
    elif text.startswith("InternalError: out of memory"):
        kind = "memory"
    return JsError(text, kind)


def _wrap(value: Any) -> str | int | float | bool | JsObject | None:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return JsObject(value)


class JsObject:
    """A non-primitive JS value; call it when it is a function."""

    __slots__ = ("_raw",)

    def __init__(self, raw: Any) -> None:
        self._raw = raw

    def __call__(self, *args: str | int | float | bool | JsObject | None) -> object:
        raw_args = [arg._raw if isinstance(arg, JsObject) else arg for arg in args]
        try:
            return _wrap(self._raw(*raw_args))
        except quickjs.JSException as exc:
            raise _classify(exc) from None

    def json(self) -> str:
        return str(self._raw.json())


class JsContext:
    """One QuickJS runtime and context (see the module docstring for the limits)."""

    __slots__ = ("_ctx",)

    def __init__(self, *, memory_limit: int, time_limit: float) -> None:
        self._ctx: Any = quickjs.Context()
        self._ctx.set_memory_limit(memory_limit)
        self._ctx.set_time_limit(time_limit)

    def set_time_limit(self, seconds: float) -> None:
        self._ctx.set_time_limit(seconds)

    def eval(self, source: str) -> str | int | float | bool | JsObject | None:
        try:
            return _wrap(self._ctx.eval(source))
        except quickjs.JSException as exc:
            raise _classify(exc) from None

    def close(self) -> None:
        """Drop the runtime now (on the calling thread, which must be the owning thread)."""
        self._ctx = None

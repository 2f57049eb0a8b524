"""Configuration reload: where the config comes from, what a new one changes, what must wait.

How it works. ``ConfigSource`` remembers how the running config was made: the file path (None:
the embedded default) and the command-line overrides (``--listen``, ``--log-level``...). A reload
(SIGHUP or ``POST /reload``, see server.py) calls ``source.load()`` again, so the same file is
re-read and the same overrides win over it, exactly as at start-up; an invalid file raises
``ConfigError`` listing every problem as ``FILE:LINE: key.path: message``.

``plan_reload(old, new)`` is the pure step (no I/O, no clock): it compares two validated configs
and returns the config to apply, the keys that changed, and the changes that need a restart.
Settings bound into the process at start-up -- ``listen`` and ``admin.listen`` (sockets already
bound), ``cache.enabled`` and ``cache.dir`` (a store already open), ``workers`` (the supervisor's
process count) -- keep their old values in the applied config; each such change is reported (the
server logs "needs a restart") and otherwise ignored, so the rest of the file still applies.
Everything else is applied by the
server to requests that start after the reload; established connections, tunnels and WebSocket
sessions keep the settings they started with.

Changed settings are found by walking the models section by section and reported by dotted path
only, in declaration order: values never reach the log (``auth.users`` holds password hashes, so
a mapping counts as one setting and its keys are not named either).

``ReloadResult`` is what one reload did, for the log, the metrics and the admin endpoint's JSON
answer (200 applied, 400 the file is invalid, 409 no reload is possible now).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import yaml
from pydantic import BaseModel

from proxyd.config import EMBEDDED_NAME, Config, load_config

__all__ = [
    "RESTART_ONLY",
    "ConfigSource",
    "ReloadPlan",
    "ReloadResult",
    "RestartNeeded",
    "plan_reload",
]

#: Key paths that only take effect at start-up (see the module docstring).
RESTART_ONLY: Final = (
    ("listen",),
    ("admin", "listen"),
    ("cache", "enabled"),
    ("cache", "dir"),
    ("workers",),  # the supervisor's process count (workers.py)
)
_M = TypeVar("_M", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class ConfigSource:
    """The config file and the command-line overrides the daemon started with."""

    path: str | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The name config errors start with (the file's name, as ``load_config`` writes it)."""
        return Path(self.path).name if self.path is not None else EMBEDDED_NAME

    def load(self) -> Config:
        """Read and validate (blocking file I/O: the server runs it in a thread)."""
        return load_config(self.path, self.overrides)

    def line_of(self, key_path: tuple[str, ...]) -> int:
        """The line ``key_path`` is on in the file (1 when it cannot be told): for errors found
        after validation, such as a PAC script that cannot be loaded (blocking, like ``load``)."""
        if self.path is None:
            return 1
        try:
            node = yaml.compose(Path(self.path).read_text("utf-8"))
        except (OSError, UnicodeError, yaml.YAMLError):
            return 1
        line = 1
        for key in key_path:
            if not isinstance(node, yaml.MappingNode):
                return line
            for key_node, value_node in node.value:
                if key_node.value == key:
                    line, node = key_node.start_mark.line + 1, value_node
                    break
            else:
                return line
        return line


@dataclass(frozen=True, slots=True)
class RestartNeeded:
    """A changed setting that only a restart applies (the old value stays in force)."""

    key: str  # dotted key path

    def message(self) -> str:
        return f"{self.key} changed: needs a restart (the old value stays in force until then)"


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    #: The new config with every restart-only key at its old value: what the server applies.
    config: Config
    #: Dotted key paths whose values change (restart-only ones excluded).
    changed: tuple[str, ...]
    restart_needed: tuple[RestartNeeded, ...]


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    """Compare ``old`` (in force) with ``new`` (just loaded) — see the module docstring."""
    restart_needed = tuple(
        RestartNeeded(".".join(path)) for path in RESTART_ONLY if _get(old, path) != _get(new, path)
    )
    applied = new
    for path in RESTART_ONLY:
        applied = _keep(applied, old, path)
    return ReloadPlan(
        config=applied,
        changed=tuple(_changed_paths(old, applied, ())),
        restart_needed=restart_needed,
    )


def _get(model: BaseModel, path: tuple[str, ...]) -> object:
    value: object = model
    for key in path:
        value = getattr(value, key, None)
    return value


def _keep(new: _M, old: _M, path: tuple[str, ...]) -> _M:
    """``new`` with the setting at ``path`` taken from ``old`` (sections copied, not changed)."""
    name, rest = path[0], path[1:]
    if name not in type(new).model_fields:
        return new
    value = getattr(old, name)
    if rest:
        value = _keep(getattr(new, name), value, rest)
    return new.model_copy(update={name: value})


def _changed_paths(old: BaseModel, new: BaseModel, path: tuple[str, ...]) -> list[str]:
    """Dotted paths of the settings that differ, in declaration order. Sections are walked; any
    other value is one setting, mappings included (``auth.users``: no user names in the log)."""
    out: list[str] = []
    for name in type(old).model_fields:
        before, after = getattr(old, name), getattr(new, name)
        if isinstance(before, BaseModel) and isinstance(after, BaseModel):
            out.extend(_changed_paths(before, after, (*path, name)))
        elif before != after:
            out.append(".".join((*path, name)))
    return out


ReloadOutcome = Literal["ok", "error", "refused"]
_HTTP_STATUS: Final = {"ok": 200, "error": 400, "refused": 409}


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """What one reload did. ``error``: the new config was refused (invalid, or a PAC source
    that cannot be loaded), every problem in ``errors``; ``refused``: no reload is possible now
    (draining, not running, or no config source); the old config stays in force in both."""

    outcome: ReloadOutcome
    generation: int
    errors: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    restart_needed: tuple[str, ...] = ()

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS[self.outcome]

    def json_body(self) -> bytes:
        data: dict[str, object] = {"outcome": self.outcome, "generation": self.generation}
        if self.outcome == "ok":
            data["changed"] = list(self.changed)
            data["restart_needed"] = list(self.restart_needed)
        else:
            data["errors"] = list(self.errors)
        return json.dumps(data, indent=2).encode() + b"\n"

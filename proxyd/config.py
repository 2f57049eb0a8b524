"""YAML -> validated, frozen settings.

How it works: the YAML text is *composed* (not just loaded) so every mapping key and sequence item
keeps the line it came from; the composed tree becomes plain Python data plus a map from key path
(``("upstream", "timeouts", "connect")``) to line. Pydantic validates the data against the models
below (unknown keys are errors, everything is frozen); each validation error is turned into one line
``FILE:LINE: key.path: message``, all errors at once, and ``ConfigError`` carries them.

Defaults live here and only here: ``config/proxyd.example.yaml`` documents them and a test checks
that the example and these models agree.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

# The route vocabulary and the pattern compiler are leaf modules (stdlib only), so config can
# validate route lists and patterns with them and report file:line like any other error.
from proxyd.routing.patterns import PatternError, compile_pattern
from proxyd.upstream.route import RouteSyntaxError, parse_route_list

__all__ = [
    "Config",
    "ConfigError",
    "HostPort",
    "load_config",
    "parse_config_text",
]

EMBEDDED_NAME = "proxyd.yaml (embedded default)"


class ConfigError(Exception):
    """Raised with every problem found in a config file; each item names file:line: key."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


# --- value types -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_host_port(value: object) -> HostPort:
    """``"127.0.0.1:3128"``, ``"[::1]:3128"`` or ``":3128"`` (all addresses) -> HostPort."""
    if isinstance(value, HostPort):
        return value
    if not isinstance(value, str):
        raise ValueError("must be a string HOST:PORT")
    text = value.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError(f"{value!r} is not [IPV6]:PORT")
        host, port_text = text[1:end], text[end + 2 :]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"{value!r} is not HOST:PORT (write IPv6 as [::1]:3128)")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{value!r}: port must be a number from 0 to 65535")
    return HostPort(host or "0.0.0.0", int(port_text))


def _parse_port_range(value: object) -> tuple[int, int]:
    """``443`` or ``"8000-9000"`` -> an inclusive (low, high) range."""
    if isinstance(value, bool):
        raise ValueError('must be a port number or a range such as "8000-9000"')
    if isinstance(value, int):
        low = high = value
    elif isinstance(value, str):
        low_text, _, high_text = value.partition("-")
        if not low_text.strip().isdigit() or (high_text and not high_text.strip().isdigit()):
            raise ValueError(f'{value!r} is not a port or a range such as "8000-9000"')
        low = int(low_text)
        high = int(high_text) if high_text else low
    else:
        raise ValueError('must be a port number or a range such as "8000-9000"')
    if not (1 <= low <= 65535 and 1 <= high <= 65535):
        raise ValueError(f"{value!r}: ports go from 1 to 65535")
    if low > high:
        raise ValueError(f"{value!r}: the range is empty (low > high)")
    return (low, high)


def _parse_network(value: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not isinstance(value, str):
        raise ValueError('must be a CIDR string such as "10.0.0.0/8"')
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not an IP network: {exc}") from None


def _parse_ip(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("must be an IP address string")
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None


PASSWORD_SCHEMES = ("scrypt", "pbkdf2_sha256")


def _parse_password_hash(value: object) -> str:
    """Validate the stored form written by ``proxyd hash-password`` (see ``http.access``)."""
    if not isinstance(value, str):
        raise ValueError("must be a password hash string made by `proxyd hash-password`")
    parts = value.split("$")
    if parts[0] not in PASSWORD_SCHEMES:
        raise ValueError(
            "must be a salted hash made by `proxyd hash-password` "
            f"(scheme {' or '.join(PASSWORD_SCHEMES)}), never a plain password"
        )
    expected = 6 if parts[0] == "scrypt" else 4
    if len(parts) != expected or not all(p.isdigit() for p in parts[1:-2]):
        raise ValueError(f"malformed {parts[0]} hash")
    try:
        for part in parts[-2:]:
            base64.b64decode(part, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"malformed {parts[0]} hash (salt and hash must be base64)") from None
    return value


HostPortField = Annotated[HostPort, BeforeValidator(parse_host_port)]
PortRange = Annotated[tuple[int, int], BeforeValidator(_parse_port_range)]
Network = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, BeforeValidator(_parse_network)]
IPAddressText = Annotated[str, BeforeValidator(_parse_ip)]
PasswordHash = Annotated[str, BeforeValidator(_parse_password_hash)]
Seconds = Annotated[float, Field(gt=0)]
OptionalSeconds = Annotated[float, Field(ge=0)]  # 0 turns the timeout off


# --- the models (every default lives here) ----------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AdminConfig(_Section):
    listen: HostPortField | None = HostPort("127.0.0.1", 9180)
    #: A PAC file served to browsers at GET /proxy.pac (None: not served).
    proxy_pac: str | None = None


class DnsConfig(_Section):
    hosts: dict[str, IPAddressText] = Field(default_factory=dict)
    cache_size: Annotated[int, Field(ge=0)] = 1000
    max_concurrent: Annotated[int, Field(gt=0)] = 64
    ttl: Seconds = 60.0
    negative_ttl: OptionalSeconds = 5.0
    timeout: Seconds = 5.0


class CacheConfig(_Section):
    enabled: bool = False
    dir: str = "~/.cache/proxyd"
    #: Total bytes of stored bodies; least recently used entries are evicted beyond it.
    max_size: Annotated[int, Field(ge=0)] = 1 << 30
    #: Larger responses are relayed but not stored.
    max_object_size: Annotated[int, Field(ge=0)] = 64 << 20
    #: RFC 9111 §4.2.2: heuristic lifetime as a fraction of (Date - Last-Modified), and its cap.
    heuristic_fraction: Annotated[float, Field(ge=0, le=1)] = 0.1
    heuristic_max: OptionalSeconds = 86400.0
    #: Bodies up to this size are also kept in memory for fast hits (0: never).
    memory_object_size: Annotated[int, Field(ge=0)] = 64 << 10
    #: Bytes of bodies kept in memory in all.
    memory_size: Annotated[int, Field(ge=0)] = 32 << 20
    #: Clients allowed to send PURGE (the admin listener's POST /cache/purge is always allowed).
    purge_clients: tuple[Network, ...] = tuple(
        ipaddress.ip_network(n) for n in ("127.0.0.0/8", "::1/128")
    )


class ConnectConfig(_Section):
    allowed_ports: tuple[PortRange, ...] = ((443, 443), (80, 80))


DEFAULT_ALLOWED_CLIENTS = (
    "127.0.0.0/8",
    "::1/128",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "fc00::/7",
    "fe80::/10",
)


class AclConfig(_Section):
    allow_clients: tuple[Network, ...] = tuple(
        ipaddress.ip_network(n) for n in DEFAULT_ALLOWED_CLIENTS
    )


class AuthConfig(_Section):
    realm: Annotated[str, Field(min_length=1, pattern=r'^[^"\\\r\n]*$')] = "proxyd"
    users: dict[str, PasswordHash] = Field(default_factory=dict)


class ViaConfig(_Section):
    enabled: bool = True
    # None: "<hostname>:<first listen port>", unique enough that two chained proxyd differ.
    pseudonym: Annotated[str, Field(pattern=r"^[!#$%&'*+\-.^_`|~0-9A-Za-z:\[\]]+$")] | None = None


class ClientTimeouts(_Section):
    head: Seconds = 10.0
    idle: Seconds = 60.0


class ClientConfig(_Section):
    max_connections: Annotated[int, Field(gt=0)] = 1024
    max_head_size: Annotated[int, Field(ge=1024, le=1 << 20)] = 65536
    timeouts: ClientTimeouts = ClientTimeouts()


class UpstreamTimeouts(_Section):
    connect: Seconds = 10.0
    response_head: Seconds = 60.0
    idle_read: Seconds = 60.0


class UpstreamConfig(_Section):
    timeouts: UpstreamTimeouts = UpstreamTimeouts()


class PoolConfig(_Section):
    """Chromium's socket pool model (see upstream/pool_state.py)."""

    per_group: Annotated[int, Field(gt=0)] = 6
    per_proxy: Annotated[int, Field(gt=0)] = 32
    total: Annotated[int, Field(gt=0)] = 256
    timeout: Seconds = 30.0
    idle_unused: Seconds = 10.0
    idle_used: Seconds = 300.0
    tunnels_per_host: Annotated[int, Field(gt=0)] = 255
    drain_bytes: Annotated[int, Field(ge=0)] = 1 << 20
    drain_timeout: OptionalSeconds = 1.0


def _route_list(value: object) -> tuple[str, ...]:
    """A route list as given ("PROXY a:1; DIRECT" or a list of entries), checked entry by entry."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
        raise ValueError('must be a route list such as ["PROXY proxy:3128", "DIRECT"]')
    try:
        parse_route_list(list(items))
    except RouteSyntaxError as exc:
        raise ValueError(str(exc)) from None
    return tuple(items)


def _pattern_list(value: object) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) and i for i in items):
        raise ValueError('must be a list of patterns such as ["*.corp.example", "10.0.0.0/8"]')
    problems = []
    for item in items:
        try:
            compile_pattern(item)
        except PatternError as exc:
            problems.append(str(exc))
    if problems:
        raise ValueError("; ".join(problems))
    return tuple(items)


RouteListText = Annotated[tuple[str, ...], BeforeValidator(_route_list)]
Patterns = Annotated[tuple[str, ...], BeforeValidator(_pattern_list)]


class RoutingRule(_Section):
    #: host globs ("*.corp.example"), CIDRs ("10.0.0.0/8"), ":PORT" or "HOST:PORT" patterns
    match: Patterns
    route: RouteListText


class PacConfig(_Section):
    url: str | None = None  # a file path or an http(s) URL; setting it selects PAC mode
    refresh: Seconds = 300.0
    fallback: Literal["DIRECT", "error"] = "DIRECT"
    timeout: Seconds = 0.5
    memory_limit: Annotated[int, Field(ge=1 << 20)] = 32 << 20
    cache_size: Annotated[int, Field(ge=0)] = 4096


class RoutingConfig(_Section):
    default: RouteListText = ("DIRECT",)
    rules: tuple[RoutingRule, ...] = ()
    bypass: Patterns = ()
    pac: PacConfig = PacConfig()
    bad_proxy_ttl: Seconds = 300.0


class TunnelConfig(_Section):
    idle_timeout: OptionalSeconds = 0.0


class WebSocketConfig(_Section):
    #: Largest message relayed (after decompression); larger ones close with 1009.
    max_message_size: Annotated[int, Field(gt=0)] = 64 << 20
    #: Seconds every step of a closing handshake may take.
    close_timeout: Seconds = 5.0
    #: Seconds between keepalive pings to both sides; 0 turns keepalive off.
    ping_interval: OptionalSeconds = 0.0
    #: Seconds to wait for a pong before the session is ended as dead.
    pong_timeout: Seconds = 20.0
    #: Seconds the origin has to answer the upgrade.
    handshake_timeout: Seconds = 10.0
    #: Handle plaintext WebSocket upgrades inside CONNECT tunnels as sessions.
    inspect_connect: bool = True
    #: Seconds a session may be silent in both directions; 0: no limit (the default).
    idle_timeout: OptionalSeconds = 0.0


class AccessLogConfig(_Section):
    enabled: bool = True
    format: Literal["text", "json"] = "text"
    path: Annotated[str, Field(min_length=1)] = "-"


LogLevel = Literal["debug", "info", "warning", "error", "critical"]


class Config(_Section):
    listen: Annotated[tuple[HostPortField, ...], Field(min_length=1)] = (
        HostPort("127.0.0.1", 3128),
    )
    admin: AdminConfig = AdminConfig()
    dns: DnsConfig = DnsConfig()
    cache: CacheConfig = CacheConfig()
    connect: ConnectConfig = ConnectConfig()
    acl: AclConfig = AclConfig()
    auth: AuthConfig = AuthConfig()
    via: ViaConfig = ViaConfig()
    client: ClientConfig = ClientConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    pool: PoolConfig = PoolConfig()
    routing: RoutingConfig = RoutingConfig()
    tunnel: TunnelConfig = TunnelConfig()
    websocket: WebSocketConfig = WebSocketConfig()
    access_log: AccessLogConfig = AccessLogConfig()
    log_level: LogLevel = "info"
    shutdown_timeout: Seconds = 10.0
    # Worker processes sharing the listen ports (SO_REUSEPORT) under a supervisor (workers.py);
    # 1 runs the daemon in this one process. Read at start-up only (a reload does not change it).
    workers: Annotated[int, Field(ge=1)] = 1


# --- YAML with line numbers -------------------------------------------------------------------

KeyPath = tuple[str | int, ...]


def _to_python(node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int]) -> Any:
    """Turn a composed YAML node into plain data, recording the line of every key and item."""
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = (
                yaml.safe_load(yaml.serialize(key_node))
                if key_node.tag != "tag:yaml.org,2002:str"
                else key_node.value
            )
            if isinstance(key, (dict, list)):
                key = str(key)
            child: KeyPath = (*path, key)
            lines[child] = key_node.start_mark.line + 1
            result[key] = _to_python(value_node, child, lines)
        return result
    if isinstance(node, yaml.SequenceNode):
        items = []
        for index, item_node in enumerate(node.value):
            child = (*path, index)
            lines[child] = item_node.start_mark.line + 1
            items.append(_to_python(item_node, child, lines))
        return items
    # A scalar: let the safe loader resolve its tag (int, float, bool, null, str).
    return yaml.safe_load(yaml.serialize(node))


def _friendly(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind == "greater_than":
        return f"must be > {ctx.get('gt'):g}"
    if kind == "greater_than_equal":
        return f"must be >= {ctx.get('ge'):g}"
    if kind == "less_than_equal":
        return f"must be <= {ctx.get('le'):g}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"must be an integer, not {error.get('input')!r}"
    if kind in ("float_parsing", "float_type"):
        return f"must be a number of seconds, not {error.get('input')!r}"
    if kind in ("bool_parsing", "bool_type"):
        return f"must be true or false, not {error.get('input')!r}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}, not {error.get('input')!r}"
    if kind in ("dict_type", "model_type"):
        return "must be a mapping of keys to values"
    if kind in ("tuple_type", "list_type"):
        return "must be a list"
    if kind == "too_short":
        return "must not be empty"
    if kind == "string_pattern_mismatch":
        return f"{error.get('input')!r} has characters that are not allowed here"
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def _key_path_text(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def _line_for(loc: tuple[Any, ...], lines: Mapping[KeyPath, int]) -> int:
    for end in range(len(loc), -1, -1):
        line = lines.get(tuple(loc[:end]))
        if line is not None:
            return line
    return 1


def _clean_loc(loc: tuple[Any, ...], data: Any) -> tuple[Any, ...]:
    """Drop pydantic's union/validator branch names so the path is the user's key path."""
    cleaned: list[Any] = []
    node = data
    for item in loc:
        if (isinstance(node, dict) and item in node) or (
            isinstance(node, list) and isinstance(item, int) and item < len(node)
        ):
            cleaned.append(item)
            node = node[item]
        elif (isinstance(node, dict) and not cleaned) or isinstance(node, dict):
            # A missing or unknown key: keep it, it is the user's word.
            if isinstance(item, str) and not item.startswith(("function-", "tagged-union")):
                cleaned.append(item)
            node = None
        else:
            node = None
    return tuple(cleaned)


def parse_config_text(
    text: str, filename: str, overrides: Mapping[str, Any] | None = None
) -> Config:
    """Parse and validate one config file's text; raises ConfigError with every problem."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{filename}:{line}: invalid YAML: {problem}"]) from None
    lines: dict[KeyPath, int] = {}
    data: Any = {} if root is None else _to_python(root, (), lines)
    if not isinstance(data, dict):
        raise ConfigError([f"{filename}:1: the top level must be a mapping of keys to values"])
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[last] = value
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        errors = []
        raw_errors = exc.errors()
        item_error_parents = {
            tuple(error["loc"][:-1]) for error in raw_errors if isinstance(error["loc"][-1], int)
        }
        for error in raw_errors:
            if error["type"] == "too_short" and tuple(error["loc"]) in item_error_parents:
                continue  # pydantic counts only the valid items; the item errors say it all
            loc = _clean_loc(tuple(error["loc"]), data)
            where = _key_path_text(loc) or "(top level)"
            line = _line_for(loc, lines)
            errors.append(f"{filename}:{line}: {where}: {_friendly(error)}")
        raise ConfigError(sorted(set(errors), key=_error_sort_key)) from None


def _error_sort_key(text: str) -> tuple[int, str]:
    _, line, rest = [*text.split(":", 2), "", ""][:3]
    return (int(line) if line.isdigit() else 0, rest)


def embedded_default_text() -> str:
    """The default config shipped inside the package (config/proxyd.yaml in the repository)."""
    return resources.files("proxyd").joinpath("defaults/proxyd.yaml").read_text("utf-8")


def load_config(
    path: str | os.PathLike[str] | None, overrides: Mapping[str, Any] | None = None
) -> Config:
    """Load ``path`` (or the embedded default when None), apply CLI overrides, validate."""
    if path is None:
        return parse_config_text(embedded_default_text(), EMBEDDED_NAME, overrides)
    file = Path(path)
    try:
        text = file.read_text("utf-8")
    except OSError as exc:
        raise ConfigError([f"{file}: cannot read the config file: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{file}: the config file is not UTF-8 text: {exc.reason}"]) from None
    return parse_config_text(text, file.name, overrides)

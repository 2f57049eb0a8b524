"""Config loading: the embedded default, the example file, and FILE:LINE: key errors."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from proxyd.config import Config, ConfigError, HostPort, load_config, parse_config_text
from proxyd.http.access import hash_password

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config" / "proxyd.example.yaml"
EMBEDDED = REPO / "config" / "proxyd.yaml"


def errors_of(text: str, filename: str = "x.yaml") -> list[str]:
    """Every error line parse_config_text reports for ``text`` (fails if the text is valid)."""
    with pytest.raises(ConfigError) as info:
        parse_config_text(text, filename)
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


def model_key_paths(
    model: type[BaseModel], prefix: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    """Every dotted key path of the pydantic model tree, sections and leaves alike."""
    for name, field in model.model_fields.items():
        path = (*prefix, name)
        yield path
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from model_key_paths(annotation, path)


def yaml_key_paths(node: yaml.Node, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every mapping key path written in a composed YAML document (list items are skipped)."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = (*prefix, str(key_node.value))
            yield path
            yield from yaml_key_paths(value_node, path)


def leaf_key_lines(node: yaml.Node, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    """Key path -> 0-based line of every key whose value is not a mapping."""
    result: dict[tuple[str, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = (*prefix, str(key_node.value))
            if isinstance(value_node, yaml.MappingNode) and value_node.value:
                result.update(leaf_key_lines(value_node, path))
            else:
                result[path] = key_node.start_mark.line
    return result


# --- the shipped files ------------------------------------------------------------------------


def test_embedded_default_loads() -> None:
    """Without a path the embedded default is used: proxy on 127.0.0.1:3128, admin on :9180."""
    config = load_config(None)
    assert config.listen == (HostPort("127.0.0.1", 3128),)
    assert config.admin.listen == HostPort("127.0.0.1", 9180)
    assert str(config.listen[0]) == "127.0.0.1:3128"


def test_embedded_default_is_the_repository_file() -> None:
    """The packaged default and config/proxyd.yaml are the same file and parse alike."""
    from proxyd.config import embedded_default_text

    assert embedded_default_text() == EMBEDDED.read_text("utf-8")
    assert load_config(EMBEDDED) == load_config(None)


def test_example_equals_the_model_defaults() -> None:
    """config/proxyd.example.yaml parses into exactly the default Config()."""
    assert load_config(EXAMPLE) == Config()


def test_example_names_every_key_of_the_model() -> None:
    """Every key path in the pydantic model tree is written as YAML in the example file."""
    root = yaml.compose(EXAMPLE.read_text("utf-8"))
    assert root is not None
    written = set(yaml_key_paths(root))
    expected = set(model_key_paths(Config))
    missing = sorted(".".join(path) for path in expected - written)
    assert not missing, f"keys missing from {EXAMPLE.name}: {missing}"
    unknown = sorted(".".join(path) for path in written - expected)
    assert not unknown, f"keys in {EXAMPLE.name} that the model does not have: {unknown}"


def test_example_comments_every_setting() -> None:
    """Every leaf key of the example has a comment on the line above it."""
    text = EXAMPLE.read_text("utf-8")
    lines = text.splitlines()
    root = yaml.compose(text)
    assert root is not None
    uncommented = [
        ".".join(path)
        for path, line in leaf_key_lines(root).items()
        if line == 0 or not lines[line - 1].strip().startswith("#")
    ]
    assert not uncommented, f"settings without a comment: {uncommented}"


def test_example_shows_the_documented_examples() -> None:
    """Commented examples for port ranges and dns.hosts, with the defaults active."""
    text = EXAMPLE.read_text("utf-8")
    assert re.search(r'^\s*#.*\[443, 80, "8000-9000"\]', text, re.MULTILINE)
    assert re.search(r"^\s*#.*example\.test: 127\.0\.0\.1", text, re.MULTILINE)


def test_model_defaults() -> None:
    """Spot-check the defaults the example documents."""
    config = Config()
    assert config.connect.allowed_ports == ((443, 443), (80, 80))
    assert ipaddress.ip_network("10.0.0.0/8") in config.acl.allow_clients
    assert config.tunnel.idle_timeout == 0
    assert config.dns.hosts == {}
    assert config.auth.users == {}
    assert config.via.pseudonym is None


# --- values that parse -------------------------------------------------------------------------


def test_valid_values_parse() -> None:
    """Port ranges, CIDRs, dns.hosts, IPv6 listen addresses and hashes are accepted."""
    password_hash = hash_password("s3cret", scheme="pbkdf2_sha256")
    config = parse_config_text(
        f"""
listen: ["[::1]:3128", ":8080", "127.0.0.1:0"]
admin: {{listen: null}}
connect: {{allowed_ports: [443, "8000-9000", " 22 "]}}
acl: {{allow_clients: ["10.1.2.3/8", "::1/128"]}}
dns: {{hosts: {{example.test: 127.0.0.1, v6.example.test: "::1"}}}}
auth: {{users: {{alice: "{password_hash}"}}}}
""",
        "ok.yaml",
    )
    assert config.listen == (
        HostPort("::1", 3128),
        HostPort("0.0.0.0", 8080),
        HostPort("127.0.0.1", 0),
    )
    assert config.admin.listen is None
    assert config.connect.allowed_ports == ((443, 443), (8000, 9000), (22, 22))
    assert config.acl.allow_clients == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert config.dns.hosts == {"example.test": "127.0.0.1", "v6.example.test": "::1"}
    assert config.auth.users == {"alice": password_hash}


def test_empty_file_is_all_defaults() -> None:
    """An empty file (or only comments) means every default."""
    assert parse_config_text("", "empty.yaml") == Config()
    assert parse_config_text("# nothing here\n", "empty.yaml") == Config()


def test_config_is_frozen() -> None:
    """Settings cannot be changed after validation."""
    config = Config()
    with pytest.raises(ValueError):
        config.log_level = "debug"


# --- errors: file, line and key path -----------------------------------------------------------


def test_nested_key_error_names_file_line_and_path() -> None:
    """A bad nested value is reported as FILE:LINE: upstream.timeouts.connect: must be > 0."""
    text = "log_level: info\nupstream:\n  timeouts:\n    response_head: 5\n    connect: 0\n"
    assert errors_of(text) == ["x.yaml:5: upstream.timeouts.connect: must be > 0"]


def test_greater_or_equal_bound_message() -> None:
    """Lower bounds on integers name the bound and the line."""
    text = "client:\n  max_connections: 0\n  max_head_size: 10\n"
    assert errors_of(text) == [
        "x.yaml:2: client.max_connections: must be > 0",
        "x.yaml:3: client.max_head_size: must be >= 1024",
    ]


def test_list_item_error_names_the_index_and_its_line() -> None:
    """A bad second listen entry is reported as listen[1] on that item's own line."""
    text = 'listen:\n  - "127.0.0.1:3128"\n  - nope\n'
    assert errors_of(text) == [
        "x.yaml:3: listen[1]: 'nope' is not HOST:PORT (write IPv6 as [::1]:3128)"
    ]


def test_unknown_keys_are_errors_at_their_line() -> None:
    """Misspelled keys, nested or top level, are reported as unknown with their line."""
    text = "upstream:\n  timeouts:\n    conect: 5\nlisten_on: x\n"
    assert errors_of(text) == [
        "x.yaml:3: upstream.timeouts.conect: unknown key",
        "x.yaml:4: listen_on: unknown key",
    ]


def test_wrong_types_are_reported() -> None:
    """Strings for numbers, non-booleans, scalars for sections, unknown enum values."""
    text = (
        "client:\n"
        "  max_connections: lots\n"
        "via:\n"
        "  enabled: maybe\n"
        "upstream: 5\n"
        "log_level: verbose\n"
        "shutdown_timeout: soon\n"
        'listen: "127.0.0.1:3128"\n'
    )
    assert errors_of(text) == [
        "x.yaml:2: client.max_connections: must be an integer, not 'lots'",
        "x.yaml:4: via.enabled: must be true or false, not 'maybe'",
        "x.yaml:5: upstream: must be a mapping of keys to values",
        "x.yaml:6: log_level: must be one of 'debug', 'info', 'warning', 'error' or 'critical', "
        "not 'verbose'",
        "x.yaml:7: shutdown_timeout: must be a number of seconds, not 'soon'",
        "x.yaml:8: listen: must be a list",
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("localhost", "'localhost' is not HOST:PORT (write IPv6 as [::1]:3128)"),
        ('"127.0.0.1:99999"', "'127.0.0.1:99999': port must be a number from 0 to 65535"),
        ('"127.0.0.1:http"', "'127.0.0.1:http': port must be a number from 0 to 65535"),
        ('"[::1:80"', "'[::1:80' is not [IPV6]:PORT"),
        ('"::1:80"', "'::1:80' is not HOST:PORT (write IPv6 as [::1]:3128)"),
        ("3128", "must be a string HOST:PORT"),
    ],
)
def test_bad_host_port(value: str, message: str) -> None:
    """Malformed HOST:PORT values name the key and the value."""
    assert errors_of(f"admin:\n  listen: {value}\n") == [f"x.yaml:2: admin.listen: {message}"]


def test_only_bad_listen_entry_reports_just_that_entry() -> None:
    """A non-empty listen list with one bad entry is not also reported as empty."""
    text = "listen:\n  - nope\n"
    assert errors_of(text) == [
        "x.yaml:2: listen[0]: 'nope' is not HOST:PORT (write IPv6 as [::1]:3128)"
    ]


def test_empty_listen_list() -> None:
    """listen needs at least one address."""
    assert errors_of("\nlisten: []\n") == ["x.yaml:2: listen: must not be empty"]


def test_bad_port_ranges() -> None:
    """Empty ranges, words, out-of-range ports and booleans in connect.allowed_ports."""
    text = (
        "connect:\n"
        "  allowed_ports:\n"
        "    - 443\n"
        '    - "9000-8000"\n'
        "    - abc\n"
        "    - 70000\n"
        "    - true\n"
        '    - "0-10"\n'
    )
    assert errors_of(text) == [
        "x.yaml:4: connect.allowed_ports[1]: '9000-8000': the range is empty (low > high)",
        "x.yaml:5: connect.allowed_ports[2]: 'abc' is not a port or a range such as \"8000-9000\"",
        "x.yaml:6: connect.allowed_ports[3]: 70000: ports go from 1 to 65535",
        'x.yaml:7: connect.allowed_ports[4]: must be a port number or a range such as "8000-9000"',
        "x.yaml:8: connect.allowed_ports[5]: '0-10': ports go from 1 to 65535",
    ]


def test_bad_cidrs() -> None:
    """acl.allow_clients entries must be CIDR strings; each bad one is named by index."""
    text = "acl:\n  allow_clients:\n    - 10.0.0.0/8\n    - 10.0.0.0/33\n    - 12\n    - banana\n"
    errors = errors_of(text)
    assert len(errors) == 3
    assert errors[0].startswith(
        "x.yaml:4: acl.allow_clients[1]: '10.0.0.0/33' is not an IP network"
    )
    assert errors[1] == 'x.yaml:5: acl.allow_clients[2]: must be a CIDR string such as "10.0.0.0/8"'
    assert errors[2].startswith("x.yaml:6: acl.allow_clients[3]: 'banana' is not an IP network")


def test_bad_ips_in_dns_hosts() -> None:
    """Each dns.hosts value must be an IP address; the host name is part of the key path."""
    text = (
        "dns:\n"
        "  hosts:\n"
        "    example.test: 999.1.1.1\n"
        "    ok.test: 127.0.0.1\n"
        "    v6.test: '::1'\n"
        "    name.test: other.test\n"
        "    number.test: 5\n"
    )
    assert errors_of(text) == [
        "x.yaml:3: dns.hosts.example.test: '999.1.1.1' is not an IP address",
        "x.yaml:6: dns.hosts.name.test: 'other.test' is not an IP address",
        "x.yaml:7: dns.hosts.number.test: must be an IP address string",
    ]


def test_plain_text_password_is_refused() -> None:
    """auth.users takes only salted hashes; a plain password is an error, never accepted."""
    text = "auth:\n  realm: proxyd\n  users:\n    alice: hunter2\n    bob: 'scrypt$x'\n"
    assert errors_of(text) == [
        "x.yaml:4: auth.users.alice: must be a salted hash made by `proxyd hash-password` "
        "(scheme scrypt or pbkdf2_sha256), never a plain password",
        "x.yaml:5: auth.users.bob: malformed scrypt hash",
    ]


def test_bad_realm_is_refused() -> None:
    """The realm goes into a quoted header parameter: no quotes or backslashes."""
    assert errors_of("auth:\n  realm: 'a\"b'\n") == [
        "x.yaml:2: auth.realm: 'a\"b' has characters that are not allowed here"
    ]


def test_several_errors_are_all_reported_in_line_order() -> None:
    """Every problem in the file is reported at once, sorted by line."""
    text = (
        "listen:\n"
        '  - "127.0.0.1:3128"\n'
        "  - bad\n"
        "upstream:\n"
        "  timeouts:\n"
        "    connect: -1\n"
        "  bogus_key: 0\n"
        "tunnel:\n"
        "  idle_timeout: -1\n"
        "cache:\n"
        "  enabled: sometimes\n"
        "bogus: 1\n"
    )
    errors = errors_of(text)
    assert [error.split(": ", 2)[:2] for error in errors] == [
        ["x.yaml:3", "listen[1]"],
        ["x.yaml:6", "upstream.timeouts.connect"],
        ["x.yaml:7", "upstream.bogus_key"],
        ["x.yaml:9", "tunnel.idle_timeout"],
        ["x.yaml:11", "cache.enabled"],
        ["x.yaml:12", "bogus"],
    ]


def test_flow_style_keys_get_their_own_lines() -> None:
    """Keys inside flow mappings spread over lines still get the right line."""
    text = "client: {\n  max_connections: 1,\n  timeouts: {head: 1, idle: x}\n}\n"
    assert errors_of(text) == [
        "x.yaml:3: client.timeouts.idle: must be a number of seconds, not 'x'"
    ]


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("listen:\n  - a\n bad: x\n", 3),
        ("log_level: info\nacl:\n  allow_clients: [10.0.0.0/8\nvia: {}\n", 4),
        ("log_level: info\n\tvia: {}\n", 2),
        ("a: 1\na: [\n", 3),
    ],
)
def test_invalid_yaml_reports_the_line(text: str, line: int) -> None:
    """A YAML syntax error is one error naming the file and the line."""
    errors = errors_of(text, "broken.yaml")
    assert len(errors) == 1
    assert errors[0].startswith(f"broken.yaml:{line}: invalid YAML: ")


def test_top_level_must_be_a_mapping() -> None:
    """A list or scalar document is refused on line 1."""
    assert errors_of("- 1\n") == ["x.yaml:1: the top level must be a mapping of keys to values"]


def test_load_config_names_the_file(tmp_path: Path) -> None:
    """load_config reports errors with the file's name."""
    path = tmp_path / "proxyd.yaml"
    path.write_text("\n\nclient:\n  timeouts:\n    hed: 1\n", "utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == ["proxyd.yaml:5: client.timeouts.hed: unknown key"]


def test_load_config_unreadable_path(tmp_path: Path) -> None:
    """A missing file or a directory is one clear error naming the path."""
    for path in (tmp_path / "missing.yaml", tmp_path):
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert len(info.value.errors) == 1
        assert info.value.errors[0].startswith(f"{path}: cannot read the config file: ")


def test_load_config_refuses_non_utf8(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 are reported, not a traceback."""
    path = tmp_path / "latin1.yaml"
    path.write_bytes("log_level: 'd\xe9bug'\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors[0].startswith(f"{path}: the config file is not UTF-8 text")


# --- CLI overrides ------------------------------------------------------------------------------


def test_cli_overrides_win_over_the_file() -> None:
    """Dotted overrides replace the file's values, creating sections when missing."""
    text = 'listen: ["127.0.0.1:3128"]\nadmin:\n  listen: "127.0.0.1:9180"\nlog_level: info\n'
    overrides: dict[str, Any] = {
        "listen": ["127.0.0.1:4000", "[::1]:4000"],
        "admin.listen": "127.0.0.1:4001",
        "cache.dir": "/tmp/proxyd-cache",
        "log_level": "debug",
    }
    config = parse_config_text(text, "x.yaml", overrides)
    assert config.listen == (HostPort("127.0.0.1", 4000), HostPort("::1", 4000))
    assert config.admin.listen == HostPort("127.0.0.1", 4001)
    assert config.cache.dir == "/tmp/proxyd-cache"
    assert config.log_level == "debug"


def test_cli_overrides_apply_to_the_embedded_default() -> None:
    """Overrides work without a file too (proxyd --listen ... with no --config)."""
    config = load_config(None, {"listen": ["127.0.0.1:5000"], "admin.listen": "127.0.0.1:5001"})
    assert config.listen == (HostPort("127.0.0.1", 5000),)
    assert config.admin.listen == HostPort("127.0.0.1", 5001)


def test_bad_cli_override_is_reported() -> None:
    """An invalid override value is an error naming the key, like a file value."""
    with pytest.raises(ConfigError) as info:
        parse_config_text("log_level: info\n", "x.yaml", {"admin.listen": "nowhere"})
    assert len(info.value.errors) == 1
    assert "admin.listen: 'nowhere' is not HOST:PORT" in info.value.errors[0]


def test_the_readme_configuration_example_is_a_valid_config() -> None:
    """The YAML shown in README.md's Configuration section parses (documentation cannot drift)."""
    from pathlib import Path

    text = (Path(__file__).parent.parent / "README.md").read_text("utf-8")
    block = text.split("The main ones:\n\n```yaml\n", 1)[1].split("```", 1)[0]
    block = block.replace('"scrypt$16384$8$1$..."', '"scrypt$16384$8$1$c2FsdA==$aGFzaA=="')
    parse_config_text(block, "README.md")

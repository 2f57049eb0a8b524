"""The deploy files agree with each other and with the daemon (fast, static; no container).

How it works: every YAML and JSON file under deploy/ is parsed; the proxyd configs they carry
(deploy/proxyd.docker.yaml for the image, the ConfigMap's proxyd.yaml for Kubernetes) go through
``parse_config_text`` like any config, and their ports, paths and timeouts are the single source the
other files are checked against: the Dockerfile (EXPOSE, VOLUME, COPY targets, CMD, HEALTHCHECK),
.dockerignore (everything the build stage installs from is in the context), docker-compose.yml,
prometheus.yml, the Grafana provisioning, the systemd unit and the Kubernetes manifests.

Metric names: every ``proxyd_*`` name in a Prometheus alert expression or a Grafana panel query must
be exported by a real daemon. An in-process proxyd (the conftest ``start_proxy`` fixture, cache on)
answers one proxied request and its /metrics is scraped; labelled families with no sample yet are
still listed there by their HELP/TYPE lines, so metrics that only count after a WebSocket session
are known too. The reverse holds as well: every family the daemon exports is on the dashboard.

External tools are used when installed and skipped otherwise: ``promtool`` (Debian's prometheus
package) checks the Prometheus config, unit-tests the alert rules (tests/deploy/alerts_test.yml) and
parses every dashboard query; ``systemd-analyze`` verifies the unit and scores its sandbox.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from prometheus_client.parser import text_string_to_metric_families

from proxyd.config import Config, HostPort, parse_config_text
from proxyd.observe.metrics import SupervisorMetrics
from tests.conftest import StartProxy
from tests.origin import Origin

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCKERFILE = REPO / "Dockerfile"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "proxyd.json"
K8S = DEPLOY / "k8s"

#: What the daemon itself defaults to (config.py): the deploy files keep these ports.
DEFAULTS = Config()
PROXY_PORT = DEFAULTS.listen[0].port
assert DEFAULTS.admin.listen is not None
ADMIN_PORT = DEFAULTS.admin.listen.port

IMAGE_CONFIG_PATH = "/etc/proxyd/proxyd.yaml"
IMAGE_UID = 10001


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text("utf-8"))


def yaml_documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text("utf-8")) if doc is not None]


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))


def docker_config() -> Config:
    path = DEPLOY / "proxyd.docker.yaml"
    return parse_config_text(path.read_text("utf-8"), path.name)


def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> manifest, for every object of the kustomization's resources."""
    kustomization = load_yaml(K8S / "kustomization.yaml")
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for resource in kustomization["resources"]:
        for doc in yaml_documents(K8S / resource):
            objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def k8s_config() -> Config:
    data = k8s_objects()[("ConfigMap", "proxyd")]["data"]
    return parse_config_text(data["proxyd.yaml"], "configmap proxyd.yaml")


def seconds(text: str) -> float:
    """A Go/compose/systemd duration such as "15s", "1m30s" or "30" in seconds."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|min|s|m|h)", text)
    assert "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


# --- every file parses ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses(path: Path) -> None:
    documents = yaml_documents(path)
    assert documents, f"{path} is empty"
    assert all(isinstance(doc, dict) for doc in documents)


def test_the_dashboard_is_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text("utf-8"))
    assert dashboard["uid"] == "proxyd"
    assert len(list(dashboard_queries())) > 20


# --- the image ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Instruction:
    keyword: str
    arguments: str
    stage: int  # 0: before the first FROM, then 1, 2, ...

    def exec_form(self) -> list[str]:
        value = json.loads(self.arguments)
        assert isinstance(value, list), f"{self.keyword} is not in exec (JSON) form"
        return [str(item) for item in value]


def dockerfile() -> list[Instruction]:
    """The Dockerfile's instructions with continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    stage = 0
    pending = ""
    for raw in DOCKERFILE.read_text("utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, arguments = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, " ".join(arguments.split()), stage))
    return instructions


def final_stage() -> list[Instruction]:
    instructions = dockerfile()
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def test_dockerfile_arguments_base_and_pip() -> None:
    """BASE (a slim Python by default) comes before FROM so both stages use it; PIP_ARGS reaches the
    pip install of the build stage."""
    instructions = dockerfile()
    assert Instruction("ARG", "BASE=python:3.11-slim", 0) in instructions
    froms = [i.arguments.split()[0] for i in instructions if i.keyword == "FROM"]
    assert froms and all(base == "${BASE}" for base in froms)
    build = [i for i in instructions if i.stage == 1]
    assert any(i.keyword == "ARG" and i.arguments.startswith("PIP_ARGS") for i in build)
    install = [i for i in build if i.keyword == "RUN" and "pip install" in i.arguments]
    assert len(install) == 1
    assert "${PIP_ARGS}" in install[0].arguments
    assert "--constraint /src/deploy/requirements.txt" in install[0].arguments
    # The image gets the compiled h11 (the `fast` extra), pinned like everything else, and the
    # build checks that it imports.
    assert "'/src[fast]'" in install[0].arguments
    assert "import h11_mypyc" in install[0].arguments
    pins = (DEPLOY / "requirements.txt").read_text("utf-8").splitlines()
    assert any(line.startswith("h11-mypyc==") for line in pins)


def test_image_matches_its_config() -> None:
    """Ports, the cache volume, the config path and the PAC file agree with the image's config
    (deploy/proxyd.docker.yaml), which listens on all addresses at the daemon's default ports."""
    config = docker_config()
    assert config.listen == (HostPort("0.0.0.0", PROXY_PORT),)
    assert config.admin.listen == HostPort("0.0.0.0", ADMIN_PORT)
    assert config.cache.enabled
    stage = final_stage()
    exposed = {int(port) for i in stage if i.keyword == "EXPOSE" for port in i.arguments.split()}
    assert exposed == {PROXY_PORT, ADMIN_PORT}
    volumes = [v for i in stage if i.keyword == "VOLUME" for v in i.exec_form()]
    assert volumes == [config.cache.dir]
    copies = {
        tuple(i.arguments.split())
        for i in stage
        if i.keyword == "COPY" and "--from" not in i.arguments
    }
    assert ("deploy/proxyd.docker.yaml", IMAGE_CONFIG_PATH) in copies
    assert config.admin.proxy_pac is not None
    assert ("deploy/proxy.pac", config.admin.proxy_pac) in copies
    for source, _ in copies:
        assert (REPO / source).is_file(), source
    (cmd,) = [i.exec_form() for i in stage if i.keyword == "CMD"]
    assert cmd == ["--config", IMAGE_CONFIG_PATH]


def test_image_runs_proxyd_as_pid_1_without_root() -> None:
    """Exec-form ENTRYPOINT (no shell in between, so SIGTERM reaches proxyd and drains), a numeric
    non-root user whose uid the Kubernetes securityContext uses too."""
    stage = final_stage()
    (entrypoint,) = [i.exec_form() for i in stage if i.keyword == "ENTRYPOINT"]
    assert entrypoint == ["/opt/proxyd/bin/proxyd"]
    (user,) = [i.arguments for i in stage if i.keyword == "USER"]
    assert user.split(":")[0] not in ("root", "0")
    run = " ".join(i.arguments for i in stage if i.keyword == "RUN")
    assert f"--uid {IMAGE_UID}" in run
    signals = [i.arguments for i in stage if i.keyword == "STOPSIGNAL"]
    assert signals in ([], ["SIGTERM"])


def test_healthcheck_asks_healthz_on_the_admin_port_without_curl() -> None:
    stage = final_stage()
    (check,) = [i.arguments for i in stage if i.keyword == "HEALTHCHECK"]
    options, _, command = check.partition(" CMD ")
    assert "--interval=" in options
    argv = json.loads(command)
    assert argv[0] == "/opt/proxyd/bin/python"
    assert "urllib.request" in argv[-1] and "PROXYD_HEALTH_URL" in argv[-1]
    assert "ProxyHandler({})" in argv[-1], "an http_proxy in the environment must not apply"
    env = " ".join(i.arguments for i in stage if i.keyword == "ENV")
    match = re.search(r"PROXYD_HEALTH_URL=(\S+)", env)
    assert match is not None
    url = urlsplit(match.group(1))
    assert (url.hostname, url.port, url.path) == ("127.0.0.1", ADMIN_PORT, "/healthz")


def dockerignore_allows(path: str) -> bool:
    """Whether .dockerignore lets ``path`` into the build context (Docker's last-match-wins rules,
    for the pattern shapes this file uses: ``*``, ``!name``, ``!dir/`` and ``**/name``)."""
    allowed = True
    for raw in (REPO / ".dockerignore").read_text("utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        parts = path.split("/")
        if pattern == "*":
            matched = True
        elif pattern.startswith("**/"):
            tail = pattern[3:]
            matched = any(
                re.fullmatch(tail.replace(".", r"\.").replace("*", ".*"), p) for p in parts
            )
        else:
            matched = path == pattern or path.startswith(pattern + "/")
        if matched:
            allowed = negate
    return allowed


def test_dockerignore_keeps_the_context_to_what_the_build_installs() -> None:
    """The build stage installs from pyproject.toml, README.md (the package's readme), proxyd/ and
    the files its symlinks point at, plus deploy/; tests, benchmarks and local state stay out."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text("utf-8"))
    needed = {"pyproject.toml", pyproject["project"]["readme"], "proxyd/__init__.py"}
    needed |= {
        str(i.arguments.split()[0])
        for i in final_stage()
        if i.keyword == "COPY" and "--from" not in i.arguments
    }
    needed |= {"deploy/requirements.txt", "wheels/x.whl"}
    for link in (REPO / "proxyd").rglob("*"):
        if link.is_symlink():
            needed.add(str(link.resolve().relative_to(REPO)))
    for path in sorted(needed):
        assert dockerignore_allows(path), f"{path} is not in the build context"
    for path in (".git/HEAD", ".venv/bin/python", "tests/conftest.py", "bench/x.py"):
        assert not dockerignore_allows(path), f"{path} should be kept out of the build context"
    assert not dockerignore_allows("proxyd/__pycache__/cli.cpython-311.pyc")


def runtime_distributions() -> dict[str, set[Requirement]]:
    """Every distribution the image's proxyd needs at run time on this Python (the dependencies
    and the ``fast`` extra) -> the requirements naming it.

    The first level comes from pyproject.toml (the source of truth); deeper levels from the
    installed distributions' metadata, only where the installed version is the pinned one (the
    venv may hold newer versions than the pins, whose requirements can differ)."""
    pins = pinned_versions()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text("utf-8"))
    wanted: dict[str, set[Requirement]] = {}
    # The image installs the `fast` extra (see the Dockerfile) as well as the dependencies.
    todo = [
        Requirement(text)
        for text in [
            *pyproject["project"]["dependencies"],
            *pyproject["project"]["optional-dependencies"]["fast"],
        ]
    ]
    while todo:
        requirement = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(requirement.name)
        first_time = name not in wanted
        wanted.setdefault(name, set()).add(requirement)
        if not first_time:
            continue
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if pins.get(name) != distribution.version:
            requirements = []  # the pinned version's own requirements are not on this machine
        else:
            requirements = [Requirement(text) for text in distribution.requires or []]
        todo.extend(requirements)
    return wanted


def pinned_versions() -> dict[str, str]:
    pins: dict[str, str] = {}
    for raw in (DEPLOY / "requirements.txt").read_text("utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", f"{line}: pin with =="
        pins[canonicalize_name(requirement.name)] = specifier.version
    return pins


def test_requirements_pin_every_runtime_dependency() -> None:
    """deploy/requirements.txt (the image's pip constraints) pins each runtime dependency, each
    pin satisfies what pyproject.toml and the pinned packages ask for, nothing else is pinned."""
    pins = pinned_versions()
    wanted = runtime_distributions()
    assert set(wanted) == set(pins), (
        f"missing pins: {sorted(set(wanted) - set(pins))}, "
        f"pins nothing needs: {sorted(set(pins) - set(wanted))}"
    )
    for name, requirements in wanted.items():
        for requirement in requirements:
            assert requirement.specifier.contains(pins[name], prereleases=True), (
                f"{name}=={pins[name]} does not satisfy {requirement}"
            )


# --- docker compose, Prometheus, Grafana --------------------------------------------------------


def compose() -> dict[str, Any]:
    result: dict[str, Any] = load_yaml(DEPLOY / "docker-compose.yml")
    return result


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path (relative to deploy/) or volume name."""
    result: dict[str, str] = {}
    for volume in service.get("volumes", []):
        source, target = str(volume).split(":")[:2]
        result[target] = source
    return result


def test_compose_runs_the_image_with_its_ports_cache_and_grace_period() -> None:
    config = docker_config()
    proxyd = compose()["services"]["proxyd"]
    assert (DEPLOY / proxyd["build"]["context"] / proxyd["build"]["dockerfile"]).resolve() == (
        DOCKERFILE
    )
    published = {}
    for mapping in proxyd["ports"]:
        host_ip, host_port, container_port = str(mapping).split(":")
        assert host_ip == "127.0.0.1", "publish on loopback: an open proxy is an open relay"
        published[int(container_port)] = int(host_port)
    assert set(published) == {PROXY_PORT, ADMIN_PORT}
    assert mounts(proxyd)[config.cache.dir] == "proxyd-cache"
    assert "proxyd-cache" in compose()["volumes"]
    assert seconds(str(proxyd["stop_grace_period"])) > config.shutdown_timeout


def test_compose_bind_mounts_exist() -> None:
    for name, service in compose()["services"].items():
        for target, source in mounts(service).items():
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} -> {target} does not exist"


def test_prometheus_scrapes_the_admin_port_and_loads_the_rules() -> None:
    prometheus = load_yaml(DEPLOY / "prometheus.yml")
    (job,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "proxyd"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (target,) = job["static_configs"][0]["targets"]
    host, _, port = target.partition(":")
    assert host in compose()["services"]
    config = docker_config()
    assert config.admin.listen is not None
    assert int(port) == config.admin.listen.port
    service = compose()["services"]["prometheus"]
    container = mounts(service)
    assert container["/etc/prometheus/prometheus.yml"] == "./prometheus.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in service["command"]
    for rule_file in prometheus["rule_files"]:
        assert container[f"/etc/prometheus/{rule_file}"] == f"./{rule_file}"
    # The rules name the scrape job they watch.
    for expr in alert_expressions():
        for job_name in re.findall(r'job="([^"]+)"', expr):
            assert job_name == "proxyd"


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard() -> None:
    service = compose()["services"]["grafana"]
    container = mounts(service)
    assert container["/etc/grafana/provisioning"] == "./grafana/provisioning"
    datasources = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")
    (source,) = datasources["datasources"]
    url = urlsplit(source["url"])
    assert url.hostname in compose()["services"] and url.port == 9090
    providers = load_yaml(DEPLOY / "grafana/provisioning/dashboards/proxyd.yml")
    (provider,) = providers["providers"]
    dashboards_dir = provider["options"]["path"]
    assert (DEPLOY / container[dashboards_dir] / DASHBOARD.name).resolve() == DASHBOARD
    home = service["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_dir}/{DASHBOARD.name}"
    # Every panel and the instance variable use the provisioned datasource.
    dashboard = json.loads(DASHBOARD.read_text("utf-8"))
    uids = {
        target["datasource"]["uid"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    }
    uids |= {v["datasource"]["uid"] for v in dashboard["templating"]["list"]}
    assert uids == {source["uid"]}


# --- metric names ----------------------------------------------------------------------------


def alert_expressions() -> list[str]:
    rules = load_yaml(DEPLOY / "alerts.yml")
    return [str(rule["expr"]) for group in rules["groups"] for rule in group["rules"]]


def alert_names() -> set[str]:
    rules = load_yaml(DEPLOY / "alerts.yml")
    return {rule["alert"] for group in rules["groups"] for rule in group["rules"]}


def dashboard_queries() -> Iterator[str]:
    dashboard = json.loads(DASHBOARD.read_text("utf-8"))
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield str(target["expr"])
    for variable in dashboard["templating"]["list"]:
        yield str(variable["definition"])


METRIC_NAME = re.compile(r"\bproxyd_[a-zA-Z0-9_]+")


def metric_names(expressions: list[str]) -> set[str]:
    """Series names in PromQL: every name of ours starts with proxyd_, no label name does."""
    return {name for expr in expressions for name in METRIC_NAME.findall(expr)}


def exported_names(text: str) -> tuple[set[str], set[str]]:
    """(series names a query may use, family names) from a /metrics scrape."""
    series: set[str] = set()
    families: set[str] = set()
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        series.update(sample.name for sample in family.samples)
        if family.type == "counter":
            series.add(family.name + "_total")
        elif family.type in ("histogram", "summary"):
            series.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            series.add(family.name)
    return series, families


async def scrape_a_daemon(start_proxy: StartProxy, origin: Origin, tmp_path: Path) -> str:
    """/metrics of a daemon that proxied one request with its cache on, plus what only the
    supervisor of ``workers: N`` exports (its own registry, with no worker yet)."""
    proxy = await start_proxy(**{"cache.enabled": True, "cache.dir": str(tmp_path / "cache")})
    async with httpx.AsyncClient(proxy=proxy.url, timeout=5) as client:
        assert (await client.get(origin.url("/"))).status_code == 200
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(proxy.admin_url + "/metrics")
    assert response.status_code == 200
    multiproc_dir = tmp_path / "multiproc"
    multiproc_dir.mkdir()
    supervisor = SupervisorMetrics(str(multiproc_dir)).exposition([]).decode()
    return response.text + supervisor


async def test_every_metric_the_alerts_and_dashboard_query_is_exported(
    start_proxy: StartProxy, origin: Origin, tmp_path: Path
) -> None:
    series, _ = exported_names(await scrape_a_daemon(start_proxy, origin, tmp_path))
    used = metric_names(alert_expressions()) | metric_names(list(dashboard_queries()))
    assert len(used) > 30
    missing = sorted(used - series)
    assert not missing, f"queried but not exported by proxyd: {missing}"


async def test_the_dashboard_shows_every_exported_metric(
    start_proxy: StartProxy, origin: Origin, tmp_path: Path
) -> None:
    """A family added to observe/metrics.py needs a panel (this test names the ones without)."""
    _, families = exported_names(await scrape_a_daemon(start_proxy, origin, tmp_path))
    shown = metric_names(list(dashboard_queries()))
    shown_families = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in shown}
    shown_families |= shown
    missing = sorted(f for f in families if f.startswith("proxyd_") and f not in shown_families)
    assert not missing, f"exported but on no dashboard panel: {missing}"


def test_metric_name_extraction_sees_through_promql() -> None:
    """The extraction the two tests above rely on: names inside functions, by-clauses and label
    matchers are found; label names and values are not metric names."""
    expr = (
        'histogram_quantile(0.95, sum by (le) (rate(proxyd_a_seconds_bucket{instance=~"$i"}[5m])))'
        ' / on(instance) proxyd_b_total{job="proxyd"} and up{job="proxyd"}'
    )
    assert metric_names([expr]) == {"proxyd_a_seconds_bucket", "proxyd_b_total"}
    series, families = exported_names(
        "# HELP proxyd_x_total x\n# TYPE proxyd_x_total counter\n"
        "# HELP proxyd_h_seconds h\n# TYPE proxyd_h_seconds histogram\n"
    )
    assert {"proxyd_x_total", "proxyd_h_seconds_bucket", "proxyd_h_seconds_count"} <= series
    assert families == {"proxyd_x", "proxyd_h_seconds"}


# --- promtool (Debian's prometheus package) -------------------------------------------------------

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian package prometheus)"
)


def promtool(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


@needs_promtool
def test_promtool_accepts_the_prometheus_config_and_rules() -> None:
    result = promtool("check", "config", "prometheus.yml", cwd=DEPLOY)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(alert_names())} rules found" in result.stdout


@needs_promtool
def test_alert_rules_fire_when_they_should() -> None:
    """tests/deploy/alerts_test.yml: each alert fires on its condition after its `for:` and stays
    quiet on the near misses (too little traffic, a flapping gauge, another instance)."""
    result = promtool("test", "rules", "tests/deploy/alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(
        re.findall(r"alertname: (\w+)", (REPO / "tests/deploy/alerts_test.yml").read_text())
    )
    assert tested == alert_names(), "every alert has a unit test"


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """The panel queries, with Grafana's variables filled in, as recording rules promtool parses."""
    rules = []
    for index, expr in enumerate(
        q for q in dashboard_queries() if not q.startswith("label_values")
    ):
        filled = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
        rules.append({"record": f"dashboard:query{index}", "expr": filled})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# --- systemd ---------------------------------------------------------------------------------

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
UNIT = DEPLOY / "proxyd.service"


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for raw in UNIT.read_text("utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key, []).append(value)
    return settings


def test_systemd_unit_reloads_with_sighup_and_caches_under_var_cache() -> None:
    settings = unit_settings()
    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert settings["CacheDirectory"] == ["proxyd"]
    (start,) = settings["ExecStart"]
    argv = shlex.split(start)
    assert argv[argv.index("--cache-dir") + 1] == "/var/cache/proxyd"
    assert argv[argv.index("--config") + 1] == IMAGE_CONFIG_PATH
    # Stopping waits for the drain (SIGTERM, shutdown_timeout) before systemd kills.
    assert settings["KillSignal"] == ["SIGTERM"]
    assert seconds(settings["TimeoutStopSec"][0]) > DEFAULTS.shutdown_timeout
    for sandbox in (
        "DynamicUser",
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
    ):
        assert settings[sandbox] == ["yes"], sandbox
    assert settings["ProtectSystem"] == ["strict"]
    assert settings["CapabilityBoundingSet"] == [""]


def installed_unit(tmp_path: Path) -> Path:
    """The unit with its ExecStart binary pointed at this checkout's proxyd, which exists here
    (systemd-analyze verify checks that the command is executable)."""
    command = Path(sys.executable).with_name("proxyd")
    if not command.exists():
        pytest.skip("the proxyd console script is not installed next to this Python")
    path = tmp_path / "proxyd.service"
    path.write_text(UNIT.read_text("utf-8").replace("/opt/proxyd/bin/proxyd", str(command)))
    return path


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(installed_unit(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stdout + result.stderr


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_sandbox_exposure_is_low(tmp_path: Path) -> None:
    """systemd-analyze security scores 0 (locked down) to 10 (exposed); ours stays below 2."""
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", "--no-pager", str(installed_unit(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    if match is None and "--offline" in result.stderr:
        pytest.skip("this systemd-analyze has no --offline mode")
    assert match is not None, result.stdout + result.stderr
    assert float(match.group(1)) < 2.0, result.stdout


# --- Kubernetes ------------------------------------------------------------------------------


def proxyd_container() -> dict[str, Any]:
    statefulset = k8s_objects()[("StatefulSet", "proxyd")]
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    result: dict[str, Any] = container
    return result


def test_k8s_kustomization_lists_every_manifest() -> None:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == on_disk
    kinds = {kind for kind, _ in k8s_objects()}
    assert {"ConfigMap", "StatefulSet", "Service", "PodMonitor"} <= kinds


def test_k8s_ports_probes_and_paths_agree_with_the_configmap() -> None:
    config = k8s_config()
    assert config.listen == (HostPort("0.0.0.0", PROXY_PORT),)
    assert config.admin.listen == HostPort("0.0.0.0", ADMIN_PORT)
    container = proxyd_container()
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"proxy": PROXY_PORT, "admin": ADMIN_PORT}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    mount_paths = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    args = container["args"]
    config_path = args[args.index("--config") + 1]
    assert config_path == f"{mount_paths['config']}/proxyd.yaml" == IMAGE_CONFIG_PATH
    assert mount_paths["cache"] == config.cache.dir
    assert config.admin.proxy_pac is not None
    data = k8s_objects()[("ConfigMap", "proxyd")]["data"]
    assert config.admin.proxy_pac == f"{mount_paths['config']}/proxy.pac" and "proxy.pac" in data
    assert "FindProxyForURL" in data["proxy.pac"]


def test_k8s_prestop_and_grace_period_cover_the_drain() -> None:
    config = k8s_config()
    statefulset = k8s_objects()[("StatefulSet", "proxyd")]
    pod = statefulset["spec"]["template"]["spec"]
    command = proxyd_container()["lifecycle"]["preStop"]["exec"]["command"]
    sleep = re.search(r"sleep\((\d+(?:\.\d+)?)\)", " ".join(command))
    assert sleep is not None
    assert command[0].startswith("/opt/proxyd/bin/"), "the image has no shell tools to rely on"
    assert pod["terminationGracePeriodSeconds"] > float(sleep.group(1)) + config.shutdown_timeout


def test_k8s_security_context_matches_the_image_user() -> None:
    statefulset = k8s_objects()[("StatefulSet", "proxyd")]
    pod = statefulset["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == IMAGE_UID
    assert pod["securityContext"]["fsGroup"] == IMAGE_UID
    assert pod["securityContext"]["runAsNonRoot"] is True
    container = proxyd_container()["securityContext"]
    assert container["readOnlyRootFilesystem"] is True
    assert container["allowPrivilegeEscalation"] is False


def test_k8s_services_and_podmonitor_select_the_pods() -> None:
    objects = k8s_objects()
    statefulset = objects[("StatefulSet", "proxyd")]
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    port_names = {port["name"] for port in proxyd_container()["ports"]}
    assert statefulset["spec"]["serviceName"] in {
        name for kind, name in objects if kind == "Service"
    }
    for (kind, _), manifest in objects.items():
        if kind == "Service":
            assert manifest["spec"]["selector"].items() <= labels.items()
            assert {p["targetPort"] for p in manifest["spec"]["ports"]} <= port_names
    monitor = objects[("PodMonitor", "proxyd")]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "admin" and endpoint["path"] == "/metrics"
    # The alert rules and the dashboard expect job="proxyd".
    assert {"targetLabel": "job", "replacement": "proxyd"} in endpoint["relabelings"]

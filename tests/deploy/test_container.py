"""The Docker image, built and run for real with podman (no Docker daemon runs on our machines).

How it works (issue 6's recipe; each setting is needed here):

1. Base image, cached. ``debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,
   ca-certificates bookworm`` makes a root filesystem (apt's lists and downloaded packages are then
   removed: the image never runs apt), and ``tar | podman import`` turns it into
   ``localhost/debian-python:bookworm-<key>``. The key is a hash of that recipe. The image lives in
   a podman store of our own (``--root``, vfs driver) under the cache directory,
   ``$PROXYD_TEST_CACHE`` or /var/tmp/proxyd-test, so later runs on the same machine reuse it; a
   store of our own also means this test never meets (or removes) anyone else's images. A file
   lock serializes concurrent runs.
2. Wheelhouse, cached. A build cannot reach package registries from inside the container, so the
   host runs ``pip wheel`` for deploy/requirements.txt (the image's pins) and the build backend;
   keyed by those files and the Python version. The host's Python must be the base's (3.11).
3. Build. A temporary context holds what .dockerignore lets in (pyproject.toml, README.md,
   proxyd/, config/, deploy/) plus the wheelhouse as wheels/, and
   ``podman build --isolation chroot --format docker --layers=false --build-arg BASE=<base>
   --build-arg PIP_ARGS="--no-index --find-links /src/wheels"`` makes a uniquely tagged image
   (docker format keeps the HEALTHCHECK; no layer cache, so nothing but the tag is left behind).
4. Run. ``podman run --network host --ulimit nofile=1024:1024 --ulimit nproc=4096:4096`` with the
   runc runtime and the cgroupfs manager. With the host's network the image's own addresses
   (0.0.0.0:3128 and :9180) would bind every address of this machine, so the test passes free
   127.0.0.1 ports on the command line, after ``--config /etc/proxyd/proxyd.yaml``; the rest of the
   image's config (cache on in the volume, the PAC file, the JSON access log) applies as shipped.
   The test proxies to an origin on the host's loopback, reads /healthz, /metrics and /proxy.pac,
   runs the HEALTHCHECK, then ``podman stop`` sends SIGTERM while a request is in flight: the
   request completes, and the container exits 0 (podman inspect).
5. Cleanup: the container (and its anonymous cache volume) and the test image are removed; the base
   image and the wheelhouse stay as the cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.origin import Exchange, Origin

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("PROXYD_TEST_CACHE", "/var/tmp/proxyd-test"))
# Fixed paths: podman's database remembers them and refuses a store opened with others.
RUNROOT = Path("/run/proxyd-test")

SUITE = "bookworm"
BASE_PYTHON = (3, 11)  # bookworm's python3
DEBOOTSTRAP = [
    "--variant=minbase",
    "--include=python3,python3-venv,python3-pip,ca-certificates",
    SUITE,
]
TRIM = ("var/cache/apt/archives", "var/cache/apt/pkgcache.bin", "var/lib/apt/lists")
RECIPE_VERSION = 1

# The settings issue 6 lists for podman on our machines (see the module docstring).
STORAGE = [
    *("--root", str(CACHE / "storage"), "--runroot", str(RUNROOT)),
    *("--tmpdir", str(RUNROOT / "libpod"), "--storage-driver", "vfs"),
]
RUNTIME = ["--runtime", "runc", "--cgroup-manager", "cgroupfs", "--events-backend", "file"]
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]

IMAGE_CONFIG = "/etc/proxyd/proxyd.yaml"
IMAGE_UID = 10001
CONTEXT_PARTS = ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md", "proxyd", "config")


def _missing_requirements() -> str | None:
    if sys.platform != "linux":
        return "podman builds need Linux"
    if os.geteuid() != 0:
        return "podman with the vfs store and chroot isolation runs as root here"
    for tool in ("podman", "runc", "debootstrap", "tar"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (bash .ci/dev test installs podman, runc, debootstrap)"
    if sys.version_info[:2] != BASE_PYTHON:
        return "the host's pip builds the wheelhouse, so it must be the base image's Python 3.11"
    return None


_missing = _missing_requirements()
if _missing is not None:
    pytest.skip(_missing, allow_module_level=True)


def podman(*args: str, timeout: float, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["podman", *STORAGE, *RUNTIME, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {result.stderr[-4000:]}")
    return result


async def apodman(*args: str, timeout: float) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(timeout):
        return await trio.run_process(
            ["podman", *STORAGE, *RUNTIME, *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


def _digest(*parts: str | bytes) -> str:
    sha = hashlib.sha256()
    for part in parts:
        sha.update(part.encode() if isinstance(part, str) else part)
        sha.update(b"\0")
    return sha.hexdigest()[:16]


@contextlib.contextmanager
def cache_lock(timeout: float = 600) -> Iterator[None]:
    """One test run at a time per cache directory (another run may be building the base)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / "lock").open("w") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{CACHE}/lock is held by another run") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def base_image() -> str:
    """The debootstrap base in our podman store, made once per recipe."""
    key = _digest(str(RECIPE_VERSION), *DEBOOTSTRAP, *TRIM)
    tag = f"localhost/debian-python:{SUITE}-{key}"
    if podman("image", "exists", tag, timeout=60, check=False).returncode == 0:
        return tag
    # Older recipes' bases: only ever images of this test, in this test's own store.
    listed = podman("images", "--format", "{{.Repository}}:{{.Tag}}", timeout=60).stdout.split()
    for stale in listed:
        if stale.startswith("localhost/debian-python:"):
            podman("rmi", "--force", stale, timeout=120, check=False)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="rootfs-") as work:
        rootfs = Path(work) / "rootfs"
        result = subprocess.run(
            ["debootstrap", *DEBOOTSTRAP, str(rootfs)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if result.returncode != 0:
            log = (rootfs / "debootstrap" / "debootstrap.log").read_text(errors="replace")[-3000:]
            raise AssertionError(f"debootstrap failed: {result.stderr[-2000:]}\n{log}")
        for relative in TRIM:
            path = rootfs / relative
            if path.is_dir():
                shutil.rmtree(path)
                path.mkdir()
            else:
                path.unlink(missing_ok=True)
        (rootfs / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
        (rootfs / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
        with subprocess.Popen(
            ["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE
        ) as tar:
            imported = subprocess.run(
                ["podman", *STORAGE, *RUNTIME, "import", "-", tag],
                stdin=tar.stdout,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait(timeout=60)
        if imported.returncode != 0 or tar.returncode != 0:
            raise AssertionError(f"podman import failed: {imported.stderr[-2000:]}")
    return tag


def wheelhouse() -> Path:
    """Wheels of the pinned dependencies and the build backend, made once per requirements."""
    requirements = REPO / "deploy" / "requirements.txt"
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text("utf-8"))
    backend: list[str] = pyproject["build-system"]["requires"]
    key = _digest(requirements.read_bytes(), *backend, sys.implementation.cache_tag or "")
    target = CACHE / f"wheels-{key}"
    if (target / ".complete").exists():
        return target
    partial = CACHE / f"wheels-{key}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    command = [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check"]
    result = subprocess.run(
        [*command, "--wheel-dir", str(partial), "--requirement", str(requirements), *backend],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"pip wheel failed: {result.stderr[-3000:]}")
    (partial / ".complete").touch()
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def build_context(directory: Path, wheels: Path) -> None:
    for name in CONTEXT_PARTS:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(
                source,
                directory / name,
                symlinks=True,
                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
            )
        else:
            shutil.copy2(source, directory / name)
    shutil.copytree(REPO / "deploy", directory / "deploy", ignore=shutil.ignore_patterns("k8s"))
    shutil.copytree(wheels, directory / "wheels", ignore=shutil.ignore_patterns(".complete"))


@dataclass(frozen=True, slots=True)
class BuiltImage:
    tag: str
    base: str
    timings: dict[str, float]


@pytest.fixture(scope="module")
def image() -> Iterator[BuiltImage]:
    timings: dict[str, float] = {}
    with cache_lock():
        started = time.monotonic()
        base = base_image()
        timings["base"] = time.monotonic() - started
        started = time.monotonic()
        wheels = wheelhouse()
        timings["wheelhouse"] = time.monotonic() - started
        tag = f"localhost/proxyd-test:{uuid.uuid4().hex[:12]}"
        started = time.monotonic()
        with tempfile.TemporaryDirectory(dir=CACHE, prefix="context-") as context:
            build_context(Path(context), wheels)
            podman(
                "build",
                "--isolation",
                "chroot",
                "--format",
                "docker",
                "--layers=false",
                "--pull=never",
                "--build-arg",
                f"BASE={base}",
                "--build-arg",
                "PIP_ARGS=--no-index --find-links /src/wheels",
                "--tag",
                tag,
                context,
                timeout=300,
            )
        timings["build"] = time.monotonic() - started
        try:
            yield BuiltImage(tag, base, timings)
        finally:
            podman("rmi", "--force", tag, timeout=120, check=False)
    print(f"\ncontainer test timings (s): {json.dumps(timings)}")


def test_image_metadata(image: BuiltImage) -> None:
    """What `docker run` relies on: a non-root user, the cache volume, the two ports, the exec-form
    entrypoint and config path, a HEALTHCHECK without curl; and the build stage left nothing but
    the virtualenv behind (one layer over the base)."""
    (info,) = json.loads(podman("image", "inspect", image.tag, timeout=60).stdout)
    config = info["Config"]
    assert config["User"] == "proxyd:proxyd"
    assert set(config["ExposedPorts"]) == {"3128/tcp", "9180/tcp"}
    assert set(config["Volumes"]) == {"/var/cache/proxyd"}
    assert config["Entrypoint"] == ["/opt/proxyd/bin/proxyd"]
    assert config["Cmd"] == ["--config", IMAGE_CONFIG]
    assert config["StopSignal"] == "SIGTERM"
    health = info["Healthcheck"]  # kept because the build used --format docker
    assert health["Test"][:2] == ["CMD", "/opt/proxyd/bin/python"]
    assert "/healthz" not in health["Test"][-1], "the URL comes from PROXYD_HEALTH_URL"
    # Only the venv was added to the base: one more layer, far smaller than the base.
    (base,) = json.loads(podman("image", "inspect", image.base, timeout=60).stdout)
    assert len(info["RootFS"]["Layers"]) == len(base["RootFS"]["Layers"]) + 1
    assert info["Size"] - base["Size"] < 120 * 1024 * 1024


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def wait_status(url: str, status: int, timeout: float) -> None:
    """Poll ``url`` (bounded) until it answers ``status``; refused connections count as not yet."""
    async with httpx.AsyncClient(timeout=2, trust_env=False) as client:
        with trio.fail_after(timeout):
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(url)).status_code == status:
                        return
                await trio.sleep(0.05)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(
    scrape: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    wanted = set(labels.items())
    return sum(value for (n, got), value in scrape.items() if n == name and wanted <= set(got))


async def test_container_proxies_reports_and_drains_on_sigterm(
    image: BuiltImage, origin: Origin
) -> None:
    proxy_port, admin_port = free_port(), free_port()
    name = f"proxyd-test-{uuid.uuid4().hex[:12]}"
    admin = f"http://127.0.0.1:{admin_port}"

    reached, release = trio.Event(), trio.Event()

    async def slow(exchange: Exchange) -> None:
        reached.set()
        await release.wait()
        await exchange.respond(200, b"finished while draining")

    async def cacheable(exchange: Exchange) -> None:
        await exchange.respond(200, b"stored once", [(b"Cache-Control", b"max-age=300")])

    origin.route("/slow", slow)
    origin.route("/cacheable", cacheable)

    started = time.monotonic()
    run = await apodman(
        "run",
        "--detach",
        "--name",
        name,
        "--network",
        "host",
        *ULIMITS,
        "--env",
        f"PROXYD_HEALTH_URL={admin}/healthz",
        # No timer for the HEALTHCHECK (podman would ask systemd for one); run it by hand below.
        "--health-interval",
        "disable",
        image.tag,
        "--config",
        IMAGE_CONFIG,
        "--listen",
        f"127.0.0.1:{proxy_port}",
        "--admin-listen",
        f"127.0.0.1:{admin_port}",
        timeout=120,
    )
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    try:
        await wait_status(admin + "/readyz", 200, timeout=60)
        timing_start = time.monotonic() - started

        # The image's HEALTHCHECK command, inside the container.
        check = await apodman("healthcheck", "run", name, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        # The image's own config is valid for the code it ships; it runs as the proxyd user.
        checked = await apodman("exec", name, "proxyd", "--check-config", IMAGE_CONFIG, timeout=60)
        assert checked.returncode == 0, checked.stderr
        uid = await apodman("exec", name, "id", "-u", timeout=60)
        assert uid.stdout.decode().strip() == str(IMAGE_UID)
        (state,) = json.loads((await apodman("inspect", name, timeout=60)).stdout)
        hostname = state["Config"]["Hostname"]
        assert any(m["Destination"] == "/var/cache/proxyd" for m in state["Mounts"])

        async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{proxy_port}", timeout=10) as client:
            echo = await client.get(origin.url("/echo"))
            assert echo.status_code == 200
            via = {k.lower(): v for k, v in echo.json()["headers"]}["via"]
            assert via == f"1.1 {hostname}:{proxy_port}".lower()
            # The cache is on, in the volume, written by the unprivileged user: the second request
            # is a hit the origin never sees.
            for _ in range(2):
                cached = await client.get(origin.url("/cacheable"))
                assert cached.status_code == 200 and cached.content == b"stored once"
        assert [r.target for r in origin.requests].count(b"/cacheable") == 1

        async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
            assert (await client.get(admin + "/healthz")).text == "ok\n"
            scrape = samples((await client.get(admin + "/metrics")).text)
            pac = await client.get(admin + "/proxy.pac")
        assert total(scrape, "proxyd_requests_total") == 3
        assert total(scrape, "proxyd_cache_lookups_total", result="hit") == 1
        assert total(scrape, "proxyd_cache_stored_total") == 1
        assert total(scrape, "proxyd_cache_entries") == 1
        assert pac.status_code == 200
        assert pac.headers["content-type"] == "application/x-ns-proxy-autoconfig"
        assert pac.content == (REPO / "deploy" / "proxy.pac").read_bytes()

        # SIGTERM with a request in flight: /readyz turns 503, the request still completes (with
        # Connection: close), and proxyd exits 0 well before podman's 20 s SIGKILL.
        async with trio.open_nursery() as nursery:
            responses: list[httpx.Response] = []

            async def in_flight() -> None:
                async with httpx.AsyncClient(
                    proxy=f"http://127.0.0.1:{proxy_port}", timeout=30
                ) as client:
                    responses.append(await client.get(origin.url("/slow")))

            nursery.start_soon(in_flight)
            with trio.fail_after(10):
                await reached.wait()
            stops: list[subprocess.CompletedProcess[bytes]] = []

            async def stop() -> None:
                stops.append(await apodman("stop", "--time", "20", name, timeout=60))

            nursery.start_soon(stop)
            await wait_status(admin + "/readyz", 503, timeout=20)
            release.set()
        (response,) = responses
        assert response.status_code == 200 and response.content == b"finished while draining"
        assert response.headers["connection"] == "close"
        (stopped,) = stops
        assert stopped.returncode == 0, stopped.stderr
        (state,) = json.loads((await apodman("inspect", name, timeout=60)).stdout)
        assert state["State"]["Status"] == "exited"
        assert state["State"]["ExitCode"] == 0
        logs = await apodman("logs", name, timeout=60)
        assert b"SIGTERM: draining" in logs.stdout + logs.stderr
        image.timings["run"] = timing_start
        image.timings["test"] = time.monotonic() - started
    finally:
        with trio.CancelScope(shield=True):
            await apodman("rm", "--force", "--volumes", name, timeout=60)

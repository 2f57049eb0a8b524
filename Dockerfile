# proxyd in a container.
#
#   docker build -t proxyd .                      # from PyPI, on python:3.11-slim
#   docker run -p 127.0.0.1:3128:3128 -p 127.0.0.1:9180:9180 -v proxyd-cache:/var/cache/proxyd proxyd
#
# How it works: a build stage makes a virtualenv in /opt/proxyd and installs proxyd from the
# source tree with every dependency pinned by deploy/requirements.txt (a pip constraints file); the
# final stage copies only that virtualenv onto the same base, adds an unprivileged user and the
# container config, so the source tree, pip's caches and the build context never reach the image.
#
# Arguments:
#   BASE      the base image; anything Debian-like with python3 >= 3.11, venv and useradd
#             (tests/deploy/test_container.py uses a debootstrap-made bookworm imported into podman)
#   PIP_ARGS  extra pip arguments, e.g. "--no-index --find-links /src/wheels" to install from a
#             wheelhouse put into the build context (for builds that cannot reach an index)
#
# Files in the image:
#   /etc/proxyd/proxyd.yaml  the config (deploy/proxyd.docker.yaml: proxy 0.0.0.0:3128, admin
#                            0.0.0.0:9180, cache on); mount your own file over it
#   /etc/proxyd/proxy.pac    the PAC file served to browsers at admin /proxy.pac (deploy/proxy.pac)
#   /var/cache/proxyd        the disk cache, a volume
#
# Signals: proxyd is PID 1 (exec-form ENTRYPOINT, no shell in between) and handles SIGTERM itself:
# `docker stop` drains (listeners close, /readyz turns 503, in-flight requests get
# shutdown_timeout seconds) and the container exits 0. Give `docker stop -t` more than
# shutdown_timeout (default 10 s, the same as docker's default grace period).

ARG BASE=python:3.11-slim

FROM ${BASE} AS build
ARG PIP_ARGS=""
COPY . /src
# The interpreter that runs the venv is found by name so both python:*-slim (/usr/local/bin) and
# Debian's python3 (/usr/bin) work as bases; pip's cache is off so nothing is left behind.
# The `fast` extra is the compiled h11 (h11-mypyc): about half the CPU per proxied request; the
# build fails if it did not install, so an image never falls back to the pure h11 unnoticed.
RUN python3 -m venv /opt/proxyd \
 && /opt/proxyd/bin/python -m pip install --no-cache-dir --disable-pip-version-check \
        ${PIP_ARGS} --constraint /src/deploy/requirements.txt '/src[fast]' \
 && /opt/proxyd/bin/python -c 'import h11_mypyc' \
 && /opt/proxyd/bin/proxyd --version

FROM ${BASE}
# PYTHONDONTWRITEBYTECODE: the venv is compiled at install time and the root filesystem may be
# mounted read-only (deploy/k8s does); nothing needs to write next to the code.
ENV PATH=/opt/proxyd/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PROXYD_HEALTH_URL=http://127.0.0.1:9180/healthz
# A fixed uid/gid (10001) so volumes and k8s securityContext (runAsUser, fsGroup) can name it;
# --no-log-init: no sparse lastlog entry for a high uid.
RUN groupadd --gid 10001 proxyd \
 && useradd --uid 10001 --gid proxyd --no-create-home --no-log-init \
        --home-dir /var/cache/proxyd --shell /usr/sbin/nologin proxyd \
 && mkdir -p /etc/proxyd /var/cache/proxyd \
 && chown proxyd:proxyd /var/cache/proxyd
COPY --from=build /opt/proxyd /opt/proxyd
COPY deploy/proxyd.docker.yaml /etc/proxyd/proxyd.yaml
COPY deploy/proxy.pac /etc/proxyd/proxy.pac
USER proxyd:proxyd
WORKDIR /var/cache/proxyd
VOLUME ["/var/cache/proxyd"]
EXPOSE 3128 9180
# No curl in the image: the venv's Python asks the admin listener, ignoring any http_proxy in the
# environment (proxyd refuses to relay to its own admin port). Set PROXYD_HEALTH_URL when the config
# moves the admin listener. (podman keeps HEALTHCHECK only with `--format docker`.)
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/opt/proxyd/bin/python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open(os.environ['PROXYD_HEALTH_URL'], timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/proxyd/bin/proxyd"]
CMD ["--config", "/etc/proxyd/proxyd.yaml"]

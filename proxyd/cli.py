"""The ``proxyd`` command: arguments, logging, config, ``trio.run``.

``proxyd [--config PATH] [--listen HOST:PORT] [--admin-listen HOST:PORT] [--cache-dir DIR]
[--log-level LEVEL]`` runs the daemon (flags override the file; without ``--config`` the embedded
default is used; SIGHUP re-reads the same file with the same flags). ``proxyd --check-config
PATH`` validates a file and exits 0, or 1 listing every error. ``proxyd hash-password`` reads a
password and prints the salted hash ``auth.users`` expects.
``--netlog FILE`` writes every request's timed events (observe/netlog.py) to FILE from start-up;
``proxyd netlog summarize FILE`` prints where the time of each request in such a capture went.
With ``workers`` above 1 the process becomes the supervisor of that many workers
(proxyd/workers.py), each started as ``python -m proxyd`` with the same arguments and
``PROXYD_WORKER`` set; a worker writes ``--netlog FILE`` to ``FILE.<its pid>``.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
from collections.abc import Sequence
from functools import partial
from typing import Any, TypeVar

import trio

from proxyd import __version__
from proxyd.allocator import tune_malloc
from proxyd.config import ConfigError, load_config
from proxyd.routing.errors import PacLoadError

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="proxyd",
        description="A forward HTTP/WebSocket proxy daemon.",
        epilog="Other commands: `proxyd hash-password` prints a hash for auth.users; "
        "`proxyd netlog summarize FILE` shows where time went in a NetLog capture.",
    )
    parser.add_argument("--config", metavar="PATH", help="YAML config (default: the embedded one)")
    parser.add_argument(
        "--listen",
        metavar="HOST:PORT",
        action="append",
        help="proxy listen address (repeatable; replaces `listen`)",
    )
    parser.add_argument("--admin-listen", metavar="HOST:PORT", help="admin listen address")
    parser.add_argument("--cache-dir", metavar="DIR", help="cache directory (cache.dir)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, help="log level (log_level)")
    parser.add_argument(
        "--netlog",
        metavar="FILE",
        help="write per-request NetLog events (JSON lines) to FILE from start-up",
    )
    parser.add_argument(
        "--check-config",
        metavar="PATH",
        help="validate a config file, print every error, exit 0 or 1",
    )
    parser.add_argument("--version", action="version", version=f"proxyd {__version__}")
    return parser


def _hash_password_main(argv: Sequence[str]) -> int:
    from proxyd.http.access import hash_password

    parser = argparse.ArgumentParser(
        prog="proxyd hash-password", description="Print a salted hash for auth.users."
    )
    parser.add_argument("--scheme", choices=("scrypt", "pbkdf2_sha256"), default="scrypt")
    parser.add_argument("--stdin", action="store_true", help="read the password from stdin")
    args = parser.parse_args(argv)
    if args.stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("proxyd: the passwords differ", file=sys.stderr)
            return 1
    if not password:
        print("proxyd: empty password", file=sys.stderr)
        return 1
    print(hash_password(password, scheme=args.scheme))
    return 0


def _netlog_main(argv: Sequence[str]) -> int:
    from proxyd.observe.netlog_summary import parse_lines, render, summarize

    parser = argparse.ArgumentParser(prog="proxyd netlog", description="Read NetLog captures.")
    commands = parser.add_subparsers(dest="command", required=True)
    summary = commands.add_parser(
        "summarize",
        help="per-request time split and the slowest requests",
        description="Print each request of a capture (--netlog FILE, or a saved GET /netlog) "
        "with its time split (queue/route, connect, wait for the first byte, body), then the "
        "slowest requests.",
    )
    summary.add_argument("file", metavar="FILE", help="a NetLog capture (JSON lines; - for stdin)")
    summary.add_argument("--slowest", type=int, default=10, metavar="N", help="default 10")
    summary.add_argument("--url-width", type=int, default=80, metavar="N", help="default 80")
    args = parser.parse_args(argv)
    try:
        if args.file == "-":
            events, bad = parse_lines(sys.stdin)
        else:
            with open(args.file, encoding="utf-8", errors="replace") as lines:
                events, bad = parse_lines(lines)
    except OSError as exc:
        print(f"proxyd: cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    sys.stdout.write(
        render(summarize(events, bad), slowest=args.slowest, url_width=max(args.url_width, 10))
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    tune_malloc()  # before any thread exists (proxyd/allocator.py)
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["hash-password"]:
        return _hash_password_main(args_list[1:])
    if args_list[:1] == ["netlog"]:
        return _netlog_main(args_list[1:])
    args = _parser().parse_args(args_list)

    if args.check_config:
        try:
            load_config(args.check_config)
        except ConfigError as exc:
            for error in exc.errors:
                print(error, file=sys.stderr)
            print(f"proxyd: {len(exc.errors)} error(s) in {args.check_config}", file=sys.stderr)
            return 1
        print(f"{args.check_config}: OK")
        return 0

    overrides: dict[str, Any] = {}
    if args.listen:
        overrides["listen"] = args.listen
    if args.admin_listen:
        overrides["admin.listen"] = args.admin_listen
    if args.cache_dir:
        overrides["cache.dir"] = args.cache_dir
    if args.log_level:
        overrides["log_level"] = args.log_level
    from proxyd.workers import serve_worker, supervise, worker_spec_from_environ

    worker = worker_spec_from_environ()
    if worker is not None:  # listen where the supervisor reserved the ports (port 0 resolved)
        overrides["listen"] = list(worker.listen)
    try:
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        print("proxyd: refusing to start with an invalid config", file=sys.stderr)
        return 1

    several = worker is not None or config.workers > 1  # processes share stderr: name the pid
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s "
        + ("[%(process)d] " if several else "")
        + "%(name)s: %(message)s",
        stream=sys.stderr,
    )
    if worker is None and config.workers > 1:
        return supervise(config, args_list)
    from proxyd.reload import ConfigSource
    from proxyd.server import serve_until_signalled

    # SIGHUP re-reads the same file with the same flags (an absolute path: cwd may not matter).
    source = ConfigSource(os.path.abspath(args.config) if args.config else None, overrides)

    netlog_path = args.netlog
    if worker is not None and netlog_path is not None:
        # One file per worker process: each writer truncates its file at start.
        netlog_path = f"{netlog_path}.{os.getpid()}"
    serve = partial(serve_until_signalled, config, netlog_path=netlog_path, source=source)
    try:
        if worker is not None:
            return trio.run(serve_worker, worker, serve)
        return trio.run(serve)
    except (OSError, PacLoadError, BaseExceptionGroup) as exc:
        # A bind failure (port in use, no permission) or a PAC script that cannot be loaded
        # arrives wrapped in the nursery's exception group.
        pac_error = _first_of(exc, PacLoadError)
        if pac_error is not None:
            where = f" (line {pac_error.line})" if pac_error.line else ""
            print(
                f"proxyd: cannot load the PAC script: {pac_error.message}{where}", file=sys.stderr
            )
            return 1
        os_error = _first_of(exc, OSError)
        if os_error is None:
            raise
        print(f"proxyd: cannot start: {os_error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 1


_E = TypeVar("_E", bound=BaseException)


def _first_of(exc: BaseException, kind: type[_E]) -> _E | None:
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _first_of(inner, kind)
            if found is not None:
                return found
    return None

"""The command line: `uringserve [APP]` and `python -m uringserve [APP]`."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import logs
from .config import LOG_LEVELS, Config, options_from_env, parse_bind
from .loader import check_spec, load_app
from .metrics import MetricsBindError
from .policy import Unsupported, capabilities

if TYPE_CHECKING:
    from .server import Server


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="uringserve",
        description="Serve a WSGI app over HTTP/1.1 on io_uring (or epoll where it is missing). "
        "Every option can also be set as URINGSERVE_<OPTION>; the command line wins.",
    )
    p.add_argument("app", nargs="?", help="module:attribute of a WSGI app (default: a demo app)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to bind (default 8000)")
    p.add_argument("--bind", metavar="HOST:PORT", help="host and port in one")
    p.add_argument("--io-uring", choices=["off", "auto", "on"], help="io_uring policy")
    p.add_argument("--backlog", type=int, help="listen backlog (default 1024)")
    p.add_argument("--log-level", choices=LOG_LEVELS, help="error log level (default info)")
    p.add_argument(
        "--access-log", action=argparse.BooleanOptionalAction, default=None, help="access log"
    )
    limits = p.add_argument_group("timeouts and limits (defaults in the README)")
    for name, kind, text in (
        ("max_body_size", int, "largest request body in bytes"),
        ("max_request_line", int, "longest request line in bytes"),
        ("max_header_bytes", int, "largest request header section in bytes"),
        ("max_headers", int, "most header lines in a request"),
        ("max_connections", int, "open connections per worker; past it, accepting pauses"),
        ("header_timeout", float, "seconds to receive a whole request head"),
        ("keep_alive_timeout", float, "seconds an idle connection stays open"),
        ("body_timeout", float, "seconds without request body bytes before giving up"),
    ):
        limits.add_argument("--" + name.replace("_", "-"), type=kind, help=text)
    tls = p.add_argument_group("TLS")
    tls.add_argument("--certfile", help="PEM certificate chain: serve HTTPS")
    tls.add_argument("--keyfile", help="PEM private key of --certfile")
    tls.add_argument(
        "--ca-certs", help="PEM CA certificates: require client certificates signed by them"
    )
    p.add_argument(
        "--capabilities", action="store_true", help="print the io_uring capability report and exit"
    )
    # Process model: workers, recycling, graceful stop.
    p.add_argument(
        "--workers", type=int, help="pre-fork N workers under a master (default 0: none)"
    )
    p.add_argument(
        "--reuse-port", action="store_true", default=None, help="a SO_REUSEPORT socket per worker"
    )
    p.add_argument(
        "--threads",
        type=int,
        help="app threads per worker, for blocking apps (default 1: the app runs inline)",
    )
    p.add_argument("--max-requests", type=int, help="recycle a worker after N requests")
    p.add_argument("--max-requests-jitter", type=int, help="add 0..J to --max-requests per worker")
    p.add_argument(
        "--graceful-timeout", type=float, help="seconds a graceful stop waits (default 30)"
    )
    p.add_argument(
        "--timeout",
        type=float,
        help="with --workers: kill and replace a worker whose serve loop is stuck this many "
        "seconds, e.g. in an app call run inline (default 30; 0: never). Not enforced "
        "without --workers (no master); with --threads > 1 only a stuck loop counts",
    )
    # Logs and metrics (README: "Logs" and "Metrics").
    obs = p.add_argument_group("logs and metrics")
    obs.add_argument(
        "--access-log-format", metavar="FORMAT", help="gunicorn's atoms: '%%(h)s %%(r)s %%(s)s'"
    )
    obs.add_argument(
        "--log-config", metavar="FILE", help="logging config: dictConfig .json, fileConfig .ini"
    )
    obs.add_argument(
        "--metrics-bind", metavar="HOST:PORT", help="serve Prometheus metrics at /metrics there"
    )
    return p


def build_config(args: argparse.Namespace) -> Config:
    options = options_from_env()
    # Every option's argparse dest is its Config field name; a field without a flag
    # (queue_depth, n_bufs, buf_size) is set through its env var or Server(...) only.
    cli = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(Config)}
    if args.bind:
        cli.update(parse_bind(args.bind))
    options.update({k: v for k, v in cli.items() if v is not None})
    return Config().with_options(**options)


def _is_tls_error(exc: OSError) -> bool:
    # Imported here: TLS settings exist only when the native core loaded.
    from ._uringserve import TlsConfigError

    return isinstance(exc, TlsConfigError)


def make_server(app: Any, config: Config) -> Server:
    """A Server with every option of `config`, none reset to its default."""
    from .server import Server

    return Server(app, **dataclasses.asdict(config))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.capabilities:
        caps = capabilities()
        print(caps.report())
        print(f"supported() = {caps.supported}")
        print(f"hotpath_supported() = {caps.hotpath_supported}")
        return 0
    spec = args.app or "uringserve.demo:app"
    app: Any
    try:
        config = build_config(args)
        # Workers import the app themselves (so SIGHUP re-imports it); one process does now.
        if config.workers:
            check_spec(spec)
            app = spec
        else:
            app = load_app(spec)
    except (ValueError, TypeError, ImportError, AttributeError) as exc:
        parser.error(str(exc))
    try:
        logs.configure(config)
    except logs.LogConfigError as exc:
        parser.error(str(exc))
    error_log = logging.getLogger("uringserve.error")
    try:
        server = make_server(app, config)
    except Unsupported as exc:
        error_log.error("io_uring=on, but %s", exc)
        return 1
    except MetricsBindError as exc:
        error_log.error("%s", exc.strerror)
        return 1
    except OSError as exc:
        if config.tls and _is_tls_error(exc):
            error_log.error("TLS: %s", exc.strerror or exc)
            return 1
        error_log.error("cannot bind %s:%s: %s", config.host, config.port, exc)
        return 1

    if not config.workers:
        from .worker import install_stop_signals

        install_stop_signals(server)

        def no_workers(signum: int, frame: object) -> None:
            error_log.warning(
                "%s ignored: no workers to manage (start with --workers N)",
                signal.Signals(signum).name,
            )

        for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
            signal.signal(sig, no_workers)
    from .arbiter import WorkerBootError

    with server:
        try:
            server.serve_forever()
        except WorkerBootError as exc:
            error_log.error("%s", exc)
            return 1
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())

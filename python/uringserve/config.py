"""Config: every server option in one object, built from arguments, env vars and the CLI."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

ENV_PREFIX = "URINGSERVE_"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
# The limits and timeouts, each a --dashed-name CLI option and a URINGSERVE_ env var.
LIMIT_OPTIONS = (
    "max_body_size",
    "max_request_line",
    "max_header_bytes",
    "max_headers",
    "max_connections",
    "header_timeout",
    "keep_alive_timeout",
    "body_timeout",
)


@dataclass(frozen=True)
class Config:
    """Options of one server. The CLI, env vars and Server(...) keywords all land here."""

    host: str = "127.0.0.1"
    port: int = 8000
    io_uring: str | bool | None = None
    backlog: int = 1024
    log_level: str = "info"
    access_log: bool = True
    max_body_size: int = 1 << 30
    max_request_line: int = 8 * 1024
    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    # Timeouts in seconds and the per-worker connection cap (see README, "Timeouts and limits").
    header_timeout: float = 10.0
    keep_alive_timeout: float = 5.0
    body_timeout: float = 30.0
    max_connections: int = 1000
    queue_depth: int = 1024
    n_bufs: int = 512
    buf_size: int = 8192
    # TLS: a PEM certificate chain and its key; with ca_certs, clients must present a
    # certificate signed by one of those CAs.
    certfile: str | None = None
    keyfile: str | None = None
    ca_certs: str | None = None
    # Process model: 0 workers serves in this process; N >= 1 runs a master and N workers.
    workers: int = 0
    # App threads per worker (or per server without workers): 1 runs the app inline on the
    # loop's thread; N > 1 runs it on a pool of N, the loop doing only the I/O.
    threads: int = 1
    reuse_port: bool = False
    max_requests: int = 0
    max_requests_jitter: int = 0
    graceful_timeout: float = 30.0
    # Workers only: the master kills a worker whose serve loop has not moved for this many
    # seconds and starts another (gunicorn's --timeout); 0 disables it.
    timeout: float = 30.0
    # Logs and metrics: gunicorn's access log atoms (None: the combined log format); a
    # logging config file (.json dictConfig, .ini/.conf fileConfig); a Prometheus listener.
    access_log_format: str | None = None
    log_config: str | None = None
    metrics_bind: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be between 0 and 65535, not {self.port}")
        if self.backlog < 1:
            raise ValueError(f"backlog must be at least 1, not {self.backlog}")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        for name in LIMIT_OPTIONS:
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be positive and finite, not {getattr(self, name)!r}")
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("TLS needs both certfile and keyfile")
        if self.ca_certs is not None and self.certfile is None:
            raise ValueError("ca_certs (client certificates) needs certfile and keyfile")
        if self.threads < 1:
            raise ValueError(f"threads must be at least 1, not {self.threads}")
        for name in ("workers", "max_requests", "max_requests_jitter", "graceful_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, not {getattr(self, name)}")
        if not 0 <= self.timeout < math.inf:
            raise ValueError(f"timeout must be 0 (off) or a finite number, not {self.timeout!r}")
        self._check_observability()

    def _check_observability(self) -> None:
        if self.access_log_format is not None:
            from ._uringserve import check_access_log_format

            check_access_log_format(self.access_log_format)
        if self.log_config is not None:
            from .logs import check_log_config

            check_log_config(self.log_config)
        if self.metrics_bind is not None:
            parse_bind(self.metrics_bind)

    @property
    def tls(self) -> bool:
        return self.certfile is not None

    def with_options(self, **options: Any) -> Config:
        """A copy with the given options set; None values leave the default in place."""
        return replace(self, **{k: v for k, v in options.items() if v is not None})


def _coerce(name: str, kind: type, text: str) -> Any:
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{ENV_PREFIX}{name.upper()}={text!r}: expected true or false")
    if kind is str:
        return text
    try:
        return kind(text)
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise ValueError(f"{ENV_PREFIX}{name.upper()}={text!r}: expected {expected}") from None


# Env vars carry text; each option's annotation says what to turn it into. Options of other
# types (io_uring, read by the policy itself) have no env var of their own here.
_PARSERS: dict[str, type] = {
    "int": int,
    "str": str,
    "bool": bool,
    "float": float,
    "str | None": str,
}


def options_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Options set through URINGSERVE_* env vars (URINGSERVE_IO_URING is read by the policy)."""
    environ = os.environ if environ is None else environ
    found: dict[str, Any] = {}
    for field in fields(Config):
        key = ENV_PREFIX + field.name.upper()
        kind = _PARSERS.get(str(field.type))
        if kind is not None and environ.get(key, "") != "":
            found[field.name] = _coerce(field.name, kind, environ[key])
    if environ.get(ENV_PREFIX + "BIND"):
        found.update(parse_bind(environ[ENV_PREFIX + "BIND"]))
    return found


def parse_bind(text: str) -> dict[str, Any]:
    """HOST:PORT, [IPv6]:PORT, or :PORT."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"bind address must look like HOST:PORT, not {text!r}")
    host = host.strip("[]") or "0.0.0.0"
    return {"host": host, "port": int(port)}

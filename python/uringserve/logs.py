"""The error and access logs: stderr handlers by default, or a user's logging config file
(a dictConfig as JSON, or a fileConfig .ini/.conf), applied once per process."""

from __future__ import annotations

import codecs
import configparser
import json
import logging
import logging.config
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from .config import Config

ERROR_LOG = "uringserve.error"
ACCESS_LOG = "uringserve.access"
FORMAT = "[%(asctime)s] [%(name)s] %(levelname)s %(message)s"
# The access line carries its own time (the combined format's %(t)s), as in gunicorn.
ACCESS_FORMAT = "%(message)s"
JSON_SUFFIXES = (".json",)
INI_SUFFIXES = (".ini", ".conf", ".cfg")

# The config file applied in this process (a forked worker inherits it with the handlers).
_applied: tuple[int, str] | None = None


class AccessStreamHandler(logging.StreamHandler):
    """The default access log handler: each line bare, as gunicorn writes it.

    While it is the access logger's only handler, on fd 2, with its own formatter and nothing
    filtering, the server writes the lines to fd 2 itself, skipping `logging` (see
    `default_access_encoding` and src/wsgi/observe.rs); the lines are the same.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)
        self.default_formatter = logging.Formatter(ACCESS_FORMAT)
        self.setFormatter(self.default_formatter)


def default_access_encoding(logger: logging.Logger) -> str | None:
    """The codec of stderr when `logger` is as `default_handlers` leaves it (one unchanged
    `AccessStreamHandler` on fd 2, no filter, INFO enabled, no propagation, stock `Logger` and
    `LogRecord`), so that writing each message plus "\n" to fd 2 is exactly what `logging`
    would do; else None. The server asks at most every 100 ms, not per request."""
    if (
        type(logger) is not logging.Logger
        or logging.getLogRecordFactory() is not logging.LogRecord
        or logger.disabled
        or logger.propagate
        or logger.filters
        or len(logger.handlers) != 1
        or not logger.isEnabledFor(logging.INFO)
    ):
        return None
    handler = logger.handlers[0]
    if (
        type(handler) is not AccessStreamHandler
        or handler.formatter is not handler.default_formatter
        or handler.filters
        or handler.level > logging.INFO
        or handler.terminator != "\n"
    ):
        return None
    stream = handler.stream
    try:
        if stream.fileno() != 2:
            return None
        return codecs.lookup(stream.encoding).name
    except (AttributeError, OSError, ValueError, TypeError, LookupError):
        # Not a real file (a StringIO, a closed or replaced stream): logging decides.
        return None


class LogConfigError(ValueError):
    """A --log-config file that cannot be read or applied; the message names the file."""


def check_log_config(path: str) -> None:
    """Refuses a file whose kind cannot be told from its name."""
    if not path.lower().endswith(JSON_SUFFIXES + INI_SUFFIXES):
        raise LogConfigError(
            f"log config {path!r}: expected a .json file (logging dictConfig) "
            "or an .ini/.conf file (logging fileConfig)"
        )


def configure(config: Config) -> None:
    """What the CLI does before serving: the config file if there is one, else stderr."""
    if config.log_config is not None:
        apply_file(config.log_config)
    else:
        default_handlers(config.log_level)


def default_handlers(level: str) -> None:
    """Both loggers to stderr; the error log at `level` with time, logger and level before each
    message, the access log at INFO with its bare lines."""
    handlers: dict[str, logging.Handler] = {
        ERROR_LOG: logging.StreamHandler(sys.stderr),
        ACCESS_LOG: AccessStreamHandler(sys.stderr),
    }
    handlers[ERROR_LOG].setFormatter(logging.Formatter(FORMAT))
    for name, handler in handlers.items():
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(handler)
        logger.propagate = False
    logging.getLogger(ERROR_LOG).setLevel(level.upper())
    logging.getLogger(ACCESS_LOG).setLevel(logging.INFO)


def apply_file(path: str) -> None:
    """Applies a logging config file, unless this process already did; the file then decides
    everything about both loggers. Loggers it does not name stay enabled."""
    global _applied
    key = (os.getpid(), os.path.abspath(path))
    if _applied == key:
        return
    check_log_config(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
        if path.lower().endswith(JSON_SUFFIXES):
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("the JSON must be an object (a logging dictConfig)")
            data.setdefault("version", 1)
            data.setdefault("disable_existing_loggers", False)
            logging.config.dictConfig(data)
        else:
            parser = configparser.ConfigParser()
            parser.read_string(text, source=path)
            logging.config.fileConfig(parser, disable_existing_loggers=False)
    except OSError as exc:
        raise LogConfigError(f"log config {path!r}: {exc.strerror or exc}") from exc
    except (ValueError, TypeError, KeyError, AttributeError, configparser.Error) as exc:
        raise LogConfigError(f"log config {path!r}: {exc}") from exc
    _applied = key

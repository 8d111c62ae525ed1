"""The error and access logs: stderr handlers by default, or a user's logging config file
(a dictConfig as JSON, or a fileConfig .ini/.conf), applied once per process."""

from __future__ import annotations

import configparser
import json
import logging
import logging.config
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Config

ERROR_LOG = "uringserve.error"
ACCESS_LOG = "uringserve.access"
FORMAT = "[%(asctime)s] [%(name)s] %(levelname)s %(message)s"
JSON_SUFFIXES = (".json",)
INI_SUFFIXES = (".ini", ".conf", ".cfg")

# The config file applied in this process (a forked worker inherits it with the handlers).
_applied: tuple[int, str] | None = None


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
    """Both loggers to stderr; the error log at `level`, the access log at INFO."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    for name in (ERROR_LOG, ACCESS_LOG):
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

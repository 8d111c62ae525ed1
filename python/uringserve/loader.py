"""Importing a WSGI app named as "module:attribute"."""

from __future__ import annotations

import importlib
import sys
from typing import Any


def check_spec(spec: str) -> None:
    """Raises ValueError unless `spec` looks like module:attribute (nothing is imported)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"APP must look like module:attribute, not {spec!r}")


def load_app(spec: str) -> Any:
    """Imports `module:attribute` (the attribute may be dotted)."""
    check_spec(spec)
    module_name, _, attr = spec.partition(":")
    if "" not in sys.path:
        sys.path.insert(0, "")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{spec} is not callable")
    return obj

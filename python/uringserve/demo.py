"""The built-in demo app served when the CLI is given no APP."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Hello world, plus an echo of the request line so a curl shows what arrived."""
    body = (
        f"Hello from uringserve\n{environ['REQUEST_METHOD']} {environ['PATH_INFO']}"
        f"{'?' + environ['QUERY_STRING'] if environ['QUERY_STRING'] else ''}\n"
    ).encode()
    start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
    return [body]

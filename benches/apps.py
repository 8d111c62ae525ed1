"""The WSGI apps every server in the HTTP benchmark serves, imported as `apps:hello`, `apps:echo`.

They are kept minimal on purpose: the benchmark measures the servers, so the app's own share of
the cost per request must be small and the same for every server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

HELLO_BODY = b"Hello, World!"
# Built once: a server that copies or inspects header lists pays for that itself, not the app.
_HELLO_HEADERS = [("Content-Type", "text/plain"), ("Content-Length", str(len(HELLO_BODY)))]


def hello(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """`Hello, World!` with its Content-Length, so no server falls back to chunked encoding."""
    start_response("200 OK", _HELLO_HEADERS)
    return [HELLO_BODY]


def echo(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Echoes the request body: reads exactly CONTENT_LENGTH bytes from wsgi.input."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    # A read(n) may return less on some servers' streams, so read until n bytes or EOF.
    stream = environ["wsgi.input"]
    chunks = []
    remaining = length
    while remaining > 0:
        chunk = stream.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    body = b"".join(chunks)
    start_response(
        "200 OK",
        [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(body)))],
    )
    return [body]

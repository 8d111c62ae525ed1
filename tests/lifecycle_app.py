"""The app the worker and graceful-stop tests serve from a real `uringserve` process.

At import it reads the file named by LIFECYCLE_VERSION_FILE (so SIGHUP's fresh import shows);
with LIFECYCLE_LOG set, it appends each request's X-Id to that file before answering, so a
test can tell which requests the server really took.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

_version_file = os.environ.get("LIFECYCLE_VERSION_FILE")
VERSION = Path(_version_file).read_text().strip() if _version_file else "none"
_LOG = os.environ.get("LIFECYCLE_LOG")


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    query = {k: v[0] for k, v in parse_qs(environ["QUERY_STRING"]).items()}
    rid = environ.get("HTTP_X_ID")
    if rid is not None and _LOG:
        fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{rid}\n".encode())
        finally:
            os.close(fd)
    if path == "/exit":
        os._exit(int(query.get("code", "7")))
    if path == "/slow":
        time.sleep(min(float(query.get("s", "0.05")), 60.0))
    if path == "/version":
        body = VERSION.encode()
    elif path == "/multiprocess":
        body = str(environ["wsgi.multiprocess"]).encode()
    else:
        body = f"pid {os.getpid()}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]

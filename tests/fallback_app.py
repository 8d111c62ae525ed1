"""The app of the live-fallback tests: small answers naming the process, a large response
that stays in flight, and an echo that digests a request body."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from typing import Any

#: Names a file /echo creates just before it reads the request body.
READING_FLAG = "FALLBACK_APP_READING_FLAG"

#: /big's body: 8 MiB of a known pattern, far more than loopback socket buffers hold.
BIG = bytes(range(256)) * (32 * 1024)


def _poison() -> bytes:
    """Makes io_uring_enter fail with EPERM on the thread that runs the app, which is the
    serving thread: the ring's next enter fails as a real, unexpected error would."""
    import errno

    from seccomp_filter import SeccompUnavailable, install_io_uring_errno_filter

    try:
        install_io_uring_errno_filter(errno.EPERM)
    except SeccompUnavailable as exc:
        return f"unavailable: {exc}".encode()
    return b"poisoned"


def digest(body: bytes) -> bytes:
    return f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode()


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    if path == "/big":
        body = BIG
    elif path == "/poison":
        body = _poison()
    elif path == "/echo":
        flag = os.environ.get(READING_FLAG)
        if flag:  # tells the test that the app now waits for the body
            with open(flag, "w"):
                pass
        body = digest(environ["wsgi.input"].read())
    else:
        body = f"pid {os.getpid()} {path}".encode()
    start_response(
        "200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(body)))]
    )
    return [body]

"""Helpers for the HTTP server tests: run a Server in a thread, read raw HTTP/1.x responses."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import uringserve

DEFAULT_TIMEOUT = 5.0
MAX_READ_ROUNDS = 100_000


def get(path: str = "/", version: str = "HTTP/1.1", extra: str = "") -> bytes:
    """A GET request head, with Host and any extra header lines (each ending in CRLF)."""
    return f"GET {path} {version}\r\nHost: localhost\r\n{extra}\r\n".encode("latin-1")


def post(length: int | None, path: str = "/", extra: str = "") -> bytes:
    """A POST request head with Content-Length (none if length is None) and any extra header
    lines (each ending in CRLF); the body is the caller's to send."""
    framing = f"Content-Length: {length}\r\n" if length is not None else ""
    return f"POST {path} HTTP/1.1\r\nHost: localhost\r\n{framing}{extra}\r\n".encode()


def hello_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


def echo_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    body = environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return [body]


class ServerThread:
    """A uringserve.Server serving in a daemon thread, stopped by stop()."""

    def __init__(self, app: Callable[..., Iterable[bytes]], io_uring: str, **options: Any) -> None:
        options = {"access_log": False, **options}
        self.server = uringserve.Server(app, host="127.0.0.1", port=0, io_uring=io_uring, **options)
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, name="uringserve-test", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.server.serve_forever()
        except BaseException as exc:  # reported by the fixture at teardown
            self.errors.append(exc)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def connect(self, timeout: float = DEFAULT_TIMEOUT) -> socket.socket:
        return socket.create_connection(self.address, timeout=timeout)

    def stop(self, timeout: float = 5.0) -> None:
        stopper = threading.Thread(target=self.server.shutdown, daemon=True)
        stopper.start()
        stopper.join(timeout)
        self.thread.join(timeout)
        alive = self.thread.is_alive() or stopper.is_alive()
        self.server.close()
        assert not alive, "server thread did not stop within the timeout"


@dataclass
class Response:
    """A parsed HTTP response."""

    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    framing: str  # "length", "chunked", "close" or "none"
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for k, v in self.headers if k.lower() == lname]


class Reader:
    """Buffered reader over a socket, with an overall deadline per operation."""

    def __init__(self, sock: socket.socket, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.sock = sock
        self.timeout = timeout
        self.buf = b""
        self.eof = False

    def _fill(self, deadline: float) -> bool:
        """Read more bytes; False on EOF."""
        if self.eof:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("deadline passed while reading the response")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def read_line(self, deadline: float) -> bytes:
        for _ in range(MAX_READ_ROUNDS):
            idx = self.buf.find(b"\r\n")
            if idx >= 0:
                line, self.buf = self.buf[:idx], self.buf[idx + 2 :]
                return line
            if not self._fill(deadline):
                raise EOFError(f"connection closed mid-line: {self.buf!r}")
        raise AssertionError("too many reads for one line")

    def read_exact(self, n: int, deadline: float) -> bytes:
        for _ in range(MAX_READ_ROUNDS):
            if len(self.buf) >= n:
                data, self.buf = self.buf[:n], self.buf[n:]
                return data
            if not self._fill(deadline):
                raise EOFError(f"connection closed after {len(self.buf)} of {n} bytes")
        raise AssertionError("too many reads for one body")

    def read_to_eof(self, deadline: float) -> bytes:
        for _ in range(MAX_READ_ROUNDS):
            if not self._fill(deadline):
                data, self.buf = self.buf, b""
                return data
        raise AssertionError("too many reads before EOF")

    def at_eof(self, timeout: float | None = None) -> bool:
        """True if the peer closed with nothing more buffered."""
        if self.buf:
            return False
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        return not self._fill(deadline)

    def read_response(self, head: bool = False, timeout: float | None = None) -> Response:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        status_line = self.read_line(deadline).decode("latin-1")
        version, status, reason = [*status_line.split(" ", 2), ""][:3]
        headers = self._read_fields(deadline)
        resp = Response(version, int(status), reason, headers, b"", "none")
        if head or resp.status in (204, 304) or 100 <= resp.status < 200:
            return resp
        te = resp.header("Transfer-Encoding")
        cl = resp.header("Content-Length")
        if te is not None and te.lower().strip() == "chunked":
            resp.framing = "chunked"
            resp.body, resp.trailers = self._read_chunked(deadline)
        elif cl is not None:
            resp.framing = "length"
            resp.body = self.read_exact(int(cl), deadline)
        else:
            resp.framing = "close"
            resp.body = self.read_to_eof(deadline)
        return resp

    def _read_fields(self, deadline: float) -> list[tuple[str, str]]:
        fields: list[tuple[str, str]] = []
        for _ in range(10_000):
            line = self.read_line(deadline)
            if not line:
                return fields
            name, _, value = line.decode("latin-1").partition(":")
            fields.append((name, value.strip()))
        raise AssertionError("too many header lines")

    def _read_chunked(self, deadline: float) -> tuple[bytes, list[tuple[str, str]]]:
        parts: list[bytes] = []
        for _ in range(MAX_READ_ROUNDS):
            size = int(self.read_line(deadline).split(b";")[0].strip(), 16)
            if size == 0:
                return b"".join(parts), self._read_fields(deadline)
            parts.append(self.read_exact(size, deadline))
            if self.read_exact(2, deadline) != b"\r\n":
                raise AssertionError("chunk not followed by CRLF")
        raise AssertionError("too many chunks")


class LogRecords(logging.Handler):
    """Keeps every record at `level` or above that reaches it, for a test to look at."""

    def __init__(self, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def request(
    sock: socket.socket,
    raw: bytes,
    head: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> tuple[Response, Reader]:
    """Send raw bytes and read one response; returns the response and the reader."""
    sock.sendall(raw)
    reader = Reader(sock, timeout)
    return reader.read_response(head=head), reader


def count_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll predicate until it is true or the deadline passes; no fixed sleeps."""
    deadline = time.monotonic() + timeout
    for _ in range(1_000_000):
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return False

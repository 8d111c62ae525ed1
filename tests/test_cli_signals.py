"""The CLI stops cleanly on SIGTERM and SIGINT, also while it is busy serving, on both
backends: a signal that arrives between two waits in the kernel must not be lost."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from server_util import Reader

STARTUP = re.compile(rb"serving http://127\.0\.0\.1:(\d+) on (\w+)")


def start_cli(backend: str) -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uringserve",
            "--port",
            "0",
            "--io-uring",
            backend,
            "--no-access-log",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 20
    seen = b""
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen += line
        m = STARTUP.search(line)
        if m:
            return proc, int(m.group(1))
    proc.kill()
    raise AssertionError(f"no startup line from the CLI: {seen!r}")


def hammer(port: int, stop: threading.Event, served: list[int]) -> None:
    """Keep-alive requests until stopped or the server goes away (bounded in count)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            reader = Reader(s)
            for _ in range(200_000):
                if stop.is_set():
                    return
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                reader.read_response()
                served.append(1)
    except (OSError, EOFError):
        return


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("delay", [0.05, 0.2, 0.35])
def test_signal_under_load_stops_the_server(backend: str, signum: int, delay: float) -> None:
    proc, port = start_cli(backend)
    stop = threading.Event()
    served: list[int] = []
    clients = [
        threading.Thread(target=hammer, args=(port, stop, served), daemon=True) for _ in range(4)
    ]
    try:
        for c in clients:
            c.start()
        deadline = time.monotonic() + 10
        while len(served) < 50 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(served) >= 50, "the server did not serve before the signal"
        time.sleep(delay)  # lands the signal at a different point of the serve loop each run
        proc.send_signal(signum)
        assert proc.wait(timeout=10) == 0
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for c in clients:
            c.join(5)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("after_request", [False, True])
def test_signal_while_idle_stops_the_server(backend: str, signum: int, after_request: bool) -> None:
    """Idle, the loop waits in the kernel; the signal must wake it (Python's wakeup fd)."""
    for _ in range(5):
        proc, port = start_cli(backend)
        try:
            if after_request:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    Reader(s).read_response()
            proc.send_signal(signum)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

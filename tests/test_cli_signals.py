"""The CLI stops cleanly on SIGTERM and SIGINT, also while it is busy serving, on both
backends: a signal that arrives between two waits in the kernel must not be lost."""

from __future__ import annotations

import signal
import socket
import threading
import time

import pytest

from proc_util import ServerProcess
from server_util import Reader, wait_until


def start_cli(backend: str) -> ServerProcess:
    """The CLI serving its default demo app; stopped by the test's signal or by close()."""
    return ServerProcess(["--io-uring", backend], app="uringserve.demo:app")


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
    server = start_cli(backend)
    stop = threading.Event()
    served: list[int] = []
    clients = [
        threading.Thread(target=hammer, args=(server.port, stop, served), daemon=True)
        for _ in range(4)
    ]
    try:
        for c in clients:
            c.start()
        started = wait_until(lambda: len(served) >= 50, 10)
        assert started, "the server did not serve before the signal"
        # Not synchronisation: under load, this lands the signal at a different point of the
        # serve loop each run.
        time.sleep(delay)
        server.send(signum)
        assert server.wait(timeout=10) == 0, server.log()
    finally:
        stop.set()
        server.close()
        for c in clients:
            c.join(5)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("after_request", [False, True])
def test_signal_while_idle_stops_the_server(backend: str, signum: int, after_request: bool) -> None:
    """Idle, the loop waits in the kernel; the signal must wake it (Python's wakeup fd)."""
    for _ in range(5):
        server = start_cli(backend)
        try:
            if after_request:
                with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
                    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    Reader(s).read_response()
            server.send(signum)
            assert server.wait(timeout=10) == 0, server.log()
        finally:
            server.close()

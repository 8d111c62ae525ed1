"""`--timeout` (gunicorn's worker timeout), from a real `uringserve --workers N` process on
both backends: a worker whose serve loop is held by an app call is killed and replaced; an
idle one, or one whose app calls run long on app threads, is left alone; a worker's loop
still beats after a live move from io_uring to epoll."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

from proc_util import ServerProcess, alive, answered_by
from server_util import wait_until

TIMEOUT = 2
# /slow sleeps up to this many seconds (lifecycle_app caps it at 60): "forever" for a test.
HANG = "/slow?s=60"
KILLED = r"ERROR worker {n} \(pid {pid}\) timed out after 2 s: killing it"


def start(backend: str, *args: str, env: dict[str, str] | None = None) -> ServerProcess:
    return ServerProcess(
        ["--io-uring", backend, "--workers", "1", "--timeout", str(TIMEOUT), *args], env=env
    )


def hang(port: int) -> socket.socket:
    """A connection whose request holds the app for a minute; its response never comes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"GET {HANG} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return sock


def outlasting_call(server: ServerProcess, taken: Path) -> socket.socket:
    """A connection whose request (X-Id 1) runs the app past --timeout, returned once the app
    has taken it (lifecycle_app writes the id to `taken`, its LIFECYCLE_LOG)."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    try:
        sock.sendall(f"GET /slow?s={TIMEOUT + 2} HTTP/1.1\r\nHost: x\r\nX-Id: 1\r\n\r\n".encode())
        assert wait_until(lambda: taken.exists() and taken.read_text() == "1\n", 10)
    except BaseException:
        sock.close()
        raise
    return sock


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True


def stays_up(server: ServerProcess, pid: int, period: float) -> bool:
    """True if over `period` the worker was neither killed nor said to time out. This one
    watches for the absence of an event, so it must last its whole (bounded) period: it polls
    the log and the pid and returns early only on a failure."""
    failed = wait_until(
        lambda: not alive(pid) or bool(server.matches("timed out after")), timeout=period
    )
    return not failed


def test_a_worker_held_by_an_app_call_is_killed_and_replaced(backend: str) -> None:
    server = start(backend)
    try:
        (first,) = server.booted(1)
        with hang(server.port) as stuck:
            server.wait_for(KILLED.format(n=1, pid=first), timeout=TIMEOUT + 15)
            server.wait_for(
                rf"ERROR worker 1 \(pid {first}\) died \(killed by signal SIGKILL, silent past "
                r"the 2 s timeout\); starting a new one",
                timeout=15,
            )
            # The hanging client is not left waiting: its worker's end of the socket is gone.
            assert closed_by_peer(stuck), server.log()
        second = server.booted(2)[1]
        assert second != first
        assert answered_by(server.port) == second
        server.stop_cleanly()
    finally:
        server.close()


def test_an_idle_worker_is_not_killed(backend: str) -> None:
    server = start(backend)
    try:
        (first,) = server.booted(1)
        assert stays_up(server, first, period=3 * TIMEOUT), server.log()
        # Connected but idle (no request yet) is idle too.
        with socket.create_connection(("127.0.0.1", server.port), timeout=10):
            assert stays_up(server, first, period=TIMEOUT + 1), server.log()
        assert answered_by(server.port) == first
        server.stop_cleanly()
    finally:
        server.close()


def test_app_calls_longer_than_the_timeout_on_app_threads_are_not_killed(backend: str) -> None:
    server = start(backend, "--threads", "4")
    try:
        (first,) = server.booted(1)
        took = time.monotonic()
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        with sock:
            # Longer than the timeout: the app thread is busy, the loop still beats.
            sock.sendall(f"GET /slow?s={TIMEOUT + 2} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert sock.recv(4096).startswith(b"HTTP/1.1 200"), server.log()
        assert time.monotonic() - took >= TIMEOUT + 2
        assert alive(first) and not server.matches("timed out after"), server.log()
        assert answered_by(server.port) == first
        server.stop_cleanly()
    finally:
        server.close()


@pytest.mark.needs_hotpath
def test_the_heartbeat_carries_on_after_a_live_move_to_epoll() -> None:
    server = start("on", env={"URINGSERVE_TEST_HOOKS": "1"})
    try:
        (first,) = server.booted(1)
        os.kill(first, signal.SIGUSR2)
        server.wait_for(r"serving on epoll from now on", timeout=15)
        assert stays_up(server, first, period=2 * TIMEOUT), server.log()
        with hang(server.port) as stuck:
            server.wait_for(KILLED.format(n=1, pid=first), timeout=TIMEOUT + 15)
            assert closed_by_peer(stuck), server.log()
        server.booted(2)
        server.stop_cleanly()
    finally:
        server.close()


def test_a_graceful_stop_is_governed_by_the_graceful_timeout(backend: str, tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    server = start(backend, "--graceful-timeout", "20", env={"LIFECYCLE_LOG": str(taken)})
    try:
        server.booted(1)
        with outlasting_call(server, taken) as sock:
            # The stop comes before the timeout, while the app call holds the loop: from then
            # on only the graceful timeout counts, and the call outlasts --timeout.
            server.send(signal.SIGTERM)
            assert sock.recv(4096).startswith(b"HTTP/1.1 200"), server.log()
        assert server.wait(timeout=30) == 0, server.log()
        assert not server.matches("timed out after"), server.log()
    finally:
        server.close()


@pytest.mark.parametrize("value", ["-1", "inf"])
def test_bad_timeouts_are_refused(value: str) -> None:
    from uringserve.config import Config

    with pytest.raises(ValueError, match="timeout"):
        Config(timeout=float(value))


def test_a_worker_replaced_by_sighup_drains_under_the_graceful_timeout(
    backend: str, tmp_path: Path
) -> None:
    taken = tmp_path / "taken"
    server = start(backend, "--graceful-timeout", "20", env={"LIFECYCLE_LOG": str(taken)})
    try:
        (first,) = server.booted(1)
        with outlasting_call(server, taken) as sock:
            # The old worker drains its app call, longer than --timeout, while the master
            # carries on (and checks the new worker's heartbeat).
            server.send(signal.SIGHUP)
            assert sock.recv(4096).startswith(b"HTTP/1.1 200"), server.log()
        server.wait_for(rf"INFO worker 1 \(pid {first}\) stopped \(exit code 0\)", timeout=20)
        assert not server.matches("timed out after"), server.log()
        server.stop_cleanly()
    finally:
        server.close()


def test_a_heartbeat_from_a_forked_child_reaches_the_parent() -> None:
    from uringserve._uringserve import Heartbeats

    block = Heartbeats(4)
    pulse = block.pulse(3, 0.5)
    assert (pulse.index, pulse.interval, block.count(3)) == (3, 0.5, 0)
    pid = os.fork()
    if pid == 0:
        pulse.beat()
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    assert block.count(3) == 1 and block.count(2) == 0
    with pytest.raises(IndexError, match="slot 4"):
        block.count(4)
    with pytest.raises(ValueError, match="interval"):
        block.pulse(0, 0.0)
    with pytest.raises(ValueError, match="room"):
        Heartbeats(0)

"""Socket, thread and fork helpers shared by the native ring tests (loopback only)."""

from __future__ import annotations

import contextlib
import fcntl
import gc
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")

# Exit codes a forked child reports with (see run_in_child).
CHILD_RAISED_EXPECTED = 0
CHILD_RAISED_OTHER = 1
CHILD_RETURNED = 2
CHILD_CRASHED = 3


def assert_nonblocking_cloexec(fd: int) -> None:
    """Accepted fds must be non-blocking and close-on-exec, like accept4(SOCK_NONBLOCK|CLOEXEC)."""
    assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK, f"fd {fd} is not O_NONBLOCK"
    assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC, f"fd {fd} is not FD_CLOEXEC"


def connect(
    addr: tuple[str, int], timeout: float = 5.0, rcvbuf: int | None = None
) -> socket.socket:
    """A blocking loopback client; rcvbuf is set before connect so it shapes the TCP window."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.connect(addr)
    except BaseException:
        sock.close()
        raise
    return sock


def recv_exactly(sock: socket.socket, n: int, timeout: float, chunk: int = 65536) -> bytes:
    """Read until n bytes or EOF, within timeout seconds in all."""
    deadline = time.monotonic() + timeout
    out = bytearray()
    while len(out) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        sock.settimeout(remaining)
        try:
            data = sock.recv(min(chunk, n - len(out)))
        except TimeoutError:
            break
        if not data:
            break
        out += data
    return bytes(out)


def assert_nothing_to_read(sock: socket.socket) -> None:
    """The socket has no byte waiting (checked without blocking)."""
    readable, _, _ = select.select([sock], [], [], 0)
    if readable:
        sock.setblocking(False)
        try:
            data = sock.recv(65536)
        finally:
            sock.setblocking(True)
        raise AssertionError(f"unexpected bytes waiting on the socket: {data[:64]!r}")


def outcomes(calls: dict[str, Callable[[], object]]) -> dict[str, BaseException | None]:
    """Runs each call; maps its name to what it raised, or None if it returned."""
    outcome: dict[str, BaseException | None] = {}
    for name, call in calls.items():
        try:
            call()
        except BaseException as exc:
            outcome[name] = exc
        else:
            outcome[name] = None
    return outcome


class Background(Generic[T]):
    """Run a function on a daemon thread; join() re-raises its exception in the test."""

    def __init__(self, fn: Callable[[], T], name: str = "test-background") -> None:
        self._fn = fn
        self._result: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            self._result = self._fn()
        except BaseException as exc:
            self._error = exc

    def start(self) -> Background[T]:
        self._thread.start()
        return self

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> T:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"background thread still running after {timeout}s")
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]


def run_in_child(
    action: Callable[[], object], expected: type[BaseException], timeout: float = 10.0
) -> tuple[int, str]:
    """Fork; the child runs action and reports through its exit code and a pipe.

    Returns (exit code, what the child said). The child never returns into pytest: it leaves with
    os._exit whatever happens, and a child still running at the deadline is killed.
    """
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child only
        code = CHILD_CRASHED
        message = "child did not finish"
        try:
            os.close(rfd)
            try:
                result = action()
            except expected as exc:
                code, message = CHILD_RAISED_EXPECTED, f"{type(exc).__name__}: {exc}"
            except BaseException as exc:
                code, message = CHILD_RAISED_OTHER, f"{type(exc).__name__}: {exc}"
            else:
                code, message = CHILD_RETURNED, f"returned {result!r}"
            os.write(wfd, message.encode("utf-8", "replace")[:4000])
        finally:
            os._exit(code)
    os.close(wfd)
    try:
        code = wait_child(pid, timeout)
        chunks = []
        while True:
            data = os.read(rfd, 4096)  # the child has exited: this cannot block
            if not data:
                break
            chunks.append(data)
        return code, b"".join(chunks).decode("utf-8", "replace")
    finally:
        os.close(rfd)


def drop_in_child(box: list[Any]) -> None:
    """Forks a child that frees the objects in `box` (their Drop runs there, on inherited
    copies) and checks that it exited normally; the parent's objects are untouched."""

    def drop_copy() -> str:
        box.clear()
        gc.collect()
        return "dropped"

    code, said = run_in_child(drop_copy, Exception)
    assert code == CHILD_RETURNED, f"child exit code {code}: {said}"


def wait_child(pid: int, timeout: float) -> int:
    """Wait for a child with a deadline (pidfd + select, no sleeping); kill it if it hangs."""
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    if not ready:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise AssertionError(f"forked child {pid} still running after {timeout}s; killed")
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def run_while_blocked(action: Callable[[], object], blocking_call: Callable[[], object]) -> object:
    """Run blocking_call on this thread while another thread waits to run action.

    The switch interval is raised so this thread never hands the GIL over on its own between
    waking the helper and entering blocking_call: the helper can only run if blocking_call
    itself releases the GIL while it waits.
    """
    go = threading.Event()

    def helper() -> object:
        if not go.wait(20.0):
            raise AssertionError("never told to go")
        return action()

    background = Background(helper, name="gil-probe")
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(60.0)
    try:
        background.start()
        go.set()
        result = blocking_call()
    finally:
        sys.setswitchinterval(old_interval)
        go.set()
    background.join(20.0)
    return result


class Resources:
    """Rings, raw fds and sockets a test opened; all closed at teardown even when it fails."""

    def __init__(self) -> None:
        self._rings: list[Callable[[], None]] = []
        self._fds: set[int] = set()
        self._socks: list[socket.socket] = []

    def sock(self, sock: socket.socket) -> socket.socket:
        self._socks.append(sock)
        return sock

    def fd(self, fd: int) -> int:
        self._fds.add(fd)
        return fd

    def close_fd(self, fd: int) -> None:
        """Close a registered raw fd now; forgetting it first so teardown never closes a
        number that the kernel has since handed to someone else."""
        self._fds.discard(fd)
        os.close(fd)

    def ring(self, ring: object) -> object:
        self._rings.append(ring.close)  # type: ignore[attr-defined]
        return ring

    def close_all(self) -> None:
        # Rings first: closing one cancels what is armed on the fds and sockets below.
        for close in reversed(self._rings):
            with contextlib.suppress(Exception):
                close()
        for fd in sorted(self._fds):
            with contextlib.suppress(OSError):
                os.close(fd)
        for sock in self._socks:
            sock.close()
        self._rings.clear()
        self._fds.clear()
        self._socks.clear()

"""Tests for the basic io_uring Ring: accept, read, timeouts, lifecycle, threads, fork and GIL."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import pytest

import uringserve
from sockutil import (
    CHILD_RAISED_EXPECTED,
    Background,
    Resources,
    assert_nonblocking_cloexec,
    connect,
    drop_in_child,
    outcomes,
    recv_exactly,
    run_in_child,
    run_while_blocked,
)
from uringserve import _uringserve as native

pytestmark = pytest.mark.needs_ring

# Generous bound for calls that should return at once; a hang shows up as a failure, not a stall.
PROMPT = 5.0
SHORT_TIMEOUT = 0.3


def accepted_pair(
    ring: uringserve.Ring, lsock: socket.socket, resources: Resources
) -> tuple[int, socket.socket]:
    """A client connected to lsock and the server-side fd the ring accepted for it."""
    client = resources.sock(connect(lsock.getsockname()))
    fd = ring.accept(lsock, timeout=PROMPT)
    assert fd is not None, "a pending connection was not accepted"
    resources.fd(fd)
    return fd, client


def read_exactly(ring: uringserve.Ring, fd: int, n: int, timeout: float = PROMPT) -> bytes:
    """Read n bytes through the ring (a stream may deliver them in pieces)."""
    deadline = time.monotonic() + timeout
    out = b""
    for _ in range(10_000):
        if len(out) >= n or time.monotonic() > deadline:
            break
        chunk = ring.read(fd, n - len(out), timeout=max(deadline - time.monotonic(), 0.01))
        if not chunk:
            break
        out += chunk
    return out


# --- accept -------------------------------------------------------------------------------------


def test_accept_socket_object_gives_nonblocking_cloexec_fd(
    make_ring: Callable[..., uringserve.Ring], listener: socket.socket, resources: Resources
) -> None:
    ring = make_ring()
    client = resources.sock(connect(listener.getsockname()))
    fd = ring.accept(listener, timeout=PROMPT)
    assert isinstance(fd, int)
    # Wrapped at once, so the socket object owns (and will close) the fd.
    server = resources.sock(socket.socket(fileno=fd))
    assert_nonblocking_cloexec(fd)
    # The fd really is the server end of this client's connection.
    client.sendall(b"ping")
    assert recv_exactly(server, 4, PROMPT) == b"ping"
    server.sendall(b"pong")
    assert recv_exactly(client, 4, PROMPT) == b"pong"


def test_accept_raw_fd(
    make_ring: Callable[..., uringserve.Ring], listener: socket.socket, resources: Resources
) -> None:
    ring = make_ring()
    client = resources.sock(connect(listener.getsockname()))
    fd = ring.accept(listener.fileno(), timeout=PROMPT)
    assert isinstance(fd, int)
    resources.fd(fd)
    assert_nonblocking_cloexec(fd)
    client.sendall(b"raw")
    assert read_exactly(ring, fd, 3) == b"raw"


@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "nonblocking"])
def test_accept_pending_connection_without_timeout(
    make_ring: Callable[..., uringserve.Ring],
    make_listener: Callable[..., socket.socket],
    resources: Resources,
    blocking: bool,
) -> None:
    ring = make_ring()
    lsock = make_listener(blocking=blocking)
    resources.sock(connect(lsock.getsockname()))
    # timeout=None is safe here: the connection is already in the backlog.
    fd = ring.accept(lsock)
    assert isinstance(fd, int) and fd >= 0
    resources.fd(fd)
    assert_nonblocking_cloexec(fd)


@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "nonblocking"])
def test_accept_timeout_returns_none_and_leaks_nothing(
    make_ring: Callable[..., uringserve.Ring],
    make_listener: Callable[..., socket.socket],
    resources: Resources,
    blocking: bool,
) -> None:
    ring = make_ring()
    lsock = make_listener(blocking=blocking)
    start = time.monotonic()
    assert ring.accept(lsock, timeout=SHORT_TIMEOUT) is None
    elapsed = time.monotonic() - start
    assert SHORT_TIMEOUT * 0.9 <= elapsed < SHORT_TIMEOUT + 2.0
    # The timed-out accept must be gone, not still armed in the kernel: a connection made now
    # has to reach whoever accepts next, here plain Python.
    client = resources.sock(connect(lsock.getsockname()))
    lsock.settimeout(PROMPT)
    server, _ = lsock.accept()
    resources.sock(server)
    client.sendall(b"x")
    assert recv_exactly(server, 1, PROMPT) == b"x"


# --- read ---------------------------------------------------------------------------------------


def test_read_returns_bytes_from_fd_and_socket_object(
    make_ring: Callable[..., uringserve.Ring], listener: socket.socket, resources: Resources
) -> None:
    ring = make_ring()
    fd, client = accepted_pair(ring, listener, resources)
    client.sendall(b"hello uring")
    assert read_exactly(ring, fd, 11) == b"hello uring"
    # A socket object works wherever an fd does.
    client2 = resources.sock(connect(listener.getsockname()))
    listener.settimeout(PROMPT)
    server2, _ = listener.accept()
    resources.sock(server2)
    client2.sendall(b"via object")
    data = ring.read(server2, 64, timeout=PROMPT)
    assert isinstance(data, bytes)
    assert b"via object".startswith(data) and data


def test_read_respects_max_bytes(
    make_ring: Callable[..., uringserve.Ring], listener: socket.socket, resources: Resources
) -> None:
    ring = make_ring()
    fd, client = accepted_pair(ring, listener, resources)
    payload = bytes(range(100))
    client.sendall(payload)
    first = ring.read(fd, 10, timeout=PROMPT)
    assert 1 <= len(first) <= 10
    assert first == payload[: len(first)]
    # Nothing beyond max_bytes was consumed: the rest is still there, in order.
    assert first + read_exactly(ring, fd, 100 - len(first)) == payload


def test_read_eof_returns_empty_bytes(
    make_ring: Callable[..., uringserve.Ring], listener: socket.socket, resources: Resources
) -> None:
    ring = make_ring()
    fd, client = accepted_pair(ring, listener, resources)
    client.sendall(b"last words")
    client.shutdown(socket.SHUT_WR)
    assert read_exactly(ring, fd, 10) == b"last words"
    assert ring.read(fd, 64, timeout=PROMPT) == b""


def test_read_timeout_raises_timeouterror_and_keeps_later_data(
    make_ring: Callable[..., uringserve.Ring], listener: socket.socket, resources: Resources
) -> None:
    ring = make_ring()
    fd, client = accepted_pair(ring, listener, resources)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        ring.read(fd, 64, timeout=SHORT_TIMEOUT)
    elapsed = time.monotonic() - start
    assert SHORT_TIMEOUT * 0.9 <= elapsed < SHORT_TIMEOUT + 2.0
    # The timed-out read was cancelled, so it cannot have eaten bytes sent afterwards.
    client.sendall(b"after timeout")
    assert read_exactly(ring, fd, 13) == b"after timeout"


# --- lifecycle ----------------------------------------------------------------------------------


def test_context_manager_closes_and_closed_ring_raises(
    listener: socket.socket, resources: Resources
) -> None:
    with uringserve.Ring(64) as ring:
        assert ring.queue_depth >= 1
        assert not ring.closed
    assert ring.closed
    with pytest.raises(uringserve.RingClosedError):
        ring.accept(listener, timeout=SHORT_TIMEOUT)
    with pytest.raises(uringserve.RingClosedError):
        ring.read(listener.fileno(), 16, timeout=SHORT_TIMEOUT)
    ring.close()  # closing twice is harmless, like a file
    assert ring.closed


def test_error_classes_form_one_hierarchy() -> None:
    for cls in (
        uringserve.RingClosedError,
        uringserve.WrongThreadError,
        uringserve.ForkedRingError,
        uringserve.RingUnhealthyError,
        native.RingSetupError,
        native.InvalidBufferError,
    ):
        assert issubclass(cls, native.UringError), cls
    assert issubclass(native.UringError, OSError)


def test_close_explicitly(make_ring: Callable[..., uringserve.Ring]) -> None:
    ring = make_ring(32)
    assert ring.queue_depth == 32
    ring.close()
    assert ring.closed


# --- threads and fork ---------------------------------------------------------------------------


def test_use_from_another_thread_raises_wrong_thread(
    make_ring: Callable[..., uringserve.Ring], listener: socket.socket, resources: Resources
) -> None:
    ring = make_ring()
    fd, client = accepted_pair(ring, listener, resources)

    def use_elsewhere() -> dict[str, BaseException | None]:
        return outcomes(
            {
                "accept": lambda: ring.accept(listener, timeout=SHORT_TIMEOUT),
                "read": lambda: ring.read(fd, 16, timeout=SHORT_TIMEOUT),
            }
        )

    outcome = Background(use_elsewhere).start().join(PROMPT * 2)
    for name, exc in outcome.items():
        assert isinstance(exc, uringserve.WrongThreadError), (name, exc)
        assert isinstance(exc, native.UringError) and isinstance(exc, OSError)
    # The refused calls left the ring intact for its own thread.
    client.sendall(b"still mine")
    assert read_exactly(ring, fd, 10) == b"still mine"


def test_forked_child_gets_forked_ring_error_and_parent_ring_still_works(
    make_ring: Callable[..., uringserve.Ring], listener: socket.socket, resources: Resources
) -> None:
    ring = make_ring()
    fd, client = accepted_pair(ring, listener, resources)
    for action in (
        lambda: ring.accept(listener, timeout=SHORT_TIMEOUT),
        lambda: ring.read(fd, 16, timeout=SHORT_TIMEOUT),
    ):
        code, said = run_in_child(action, uringserve.ForkedRingError)
        assert code == CHILD_RAISED_EXPECTED, f"child exit code {code}: {said}"
    client.sendall(b"parent")
    assert read_exactly(ring, fd, 6) == b"parent"
    resources.sock(connect(listener.getsockname()))
    new_fd = ring.accept(listener, timeout=PROMPT)
    assert new_fd is not None
    resources.fd(new_fd)


def test_forked_child_dropping_its_copy_leaves_parent_ring_alone(
    listener: socket.socket, resources: Resources
) -> None:
    box = [uringserve.Ring(64)]
    try:
        fd, client = accepted_pair(box[0], listener, resources)

        drop_in_child(box)
        client.sendall(b"parent")
        assert read_exactly(box[0], fd, 6) == b"parent"
    finally:
        for ring in box:
            ring.close()


# --- the GIL ------------------------------------------------------------------------------------


@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "nonblocking"])
def test_accept_releases_gil(
    make_ring: Callable[..., uringserve.Ring],
    make_listener: Callable[..., socket.socket],
    resources: Resources,
    blocking: bool,
) -> None:
    ring = make_ring()
    lsock = make_listener(blocking=blocking)
    addr = lsock.getsockname()
    clients: list[socket.socket] = []

    def connect_client() -> None:
        clients.append(resources.sock(connect(addr)))

    wait = 10.0
    start = time.monotonic()
    fd = run_while_blocked(connect_client, lambda: ring.accept(lsock, timeout=wait))
    elapsed = time.monotonic() - start
    assert fd is not None, "accept timed out: the connecting thread never ran (GIL held?)"
    assert isinstance(fd, int)
    resources.fd(fd)
    assert elapsed < wait / 2
    assert len(clients) == 1


def test_read_releases_gil(
    make_ring: Callable[..., uringserve.Ring], listener: socket.socket, resources: Resources
) -> None:
    ring = make_ring()
    fd, client = accepted_pair(ring, listener, resources)
    wait = 10.0
    start = time.monotonic()
    try:
        data = run_while_blocked(
            lambda: client.sendall(b"woke you"), lambda: ring.read(fd, 64, timeout=wait)
        )
    except TimeoutError:
        pytest.fail("read timed out: the sending thread never ran (GIL held while waiting?)")
    assert time.monotonic() - start < wait / 2
    assert isinstance(data, bytes) and data and b"woke you".startswith(data)

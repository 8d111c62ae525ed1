"""Shared pytest setup: capability gating, the capability report, and cleaned-up resources."""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest

from server_util import LogRecords, ServerThread
from sockutil import Resources

try:
    import uringserve
except Exception as exc:  # pragma: no cover - only when the package itself is broken
    # A package that does not import is a broken build, not an unsupported environment:
    # skipping everything here would turn it into a green run that tested nothing.
    raise ImportError(f"`import uringserve` failed, so no test can run: {exc!r}") from exc


@functools.cache
def _capabilities() -> uringserve.Capabilities:
    # Probing creates real rings; once per session is enough and keeps every skip consistent.
    return uringserve.capabilities()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs_ring: needs the basic io_uring Ring (skips if not)")
    config.addinivalue_line("markers", "needs_hotpath: needs HotpathRing support (skips if not)")


def pytest_report_header(config: pytest.Config) -> list[str]:
    report = _capabilities().report()
    return report.splitlines() if isinstance(report, str) else [str(line) for line in report]


def skip_unless_ring() -> None:
    """Skip the running test when io_uring's basic Ring cannot work in this process."""
    caps = _capabilities()
    if not caps.supported:
        pytest.skip(f"io_uring Ring unsupported here: {caps.reason}")


def skip_unless_hotpath() -> None:
    """Skip the running test when the HotpathRing features cannot work in this process."""
    caps = _capabilities()
    if not caps.hotpath_supported:
        pytest.skip(f"io_uring HotpathRing unsupported here: {caps.hotpath_reason}")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("needs_ring") is not None:
        skip_unless_ring()
    if item.get_closest_marker("needs_hotpath") is not None:
        skip_unless_hotpath()


@pytest.fixture
def resources() -> Iterator[Resources]:
    res = Resources()
    try:
        yield res
    finally:
        res.close_all()


@pytest.fixture
def make_listener(resources: Resources) -> Callable[..., socket.socket]:
    """Factory for a loopback TCP listener on an ephemeral port."""

    def make(backlog: int = 128, blocking: bool = True) -> socket.socket:
        lsock = resources.sock(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(backlog)
        lsock.setblocking(blocking)
        return lsock

    return make


@pytest.fixture
def listener(make_listener: Callable[..., socket.socket]) -> socket.socket:
    return make_listener()


@pytest.fixture
def make_ring(resources: Resources) -> Callable[..., uringserve.Ring]:
    """Factory for a basic Ring, skipping when unsupported and closing it at teardown."""
    skip_unless_ring()

    def make(queue_depth: int = 256) -> uringserve.Ring:
        ring = uringserve.Ring(queue_depth)
        resources.ring(ring)
        return ring

    return make


@pytest.fixture
def make_hotpath(resources: Resources) -> Callable[..., uringserve.HotpathRing]:
    """Factory for a HotpathRing, skipping when unsupported and closing it at teardown."""
    skip_unless_hotpath()

    def make(
        queue_depth: int = 256, n_bufs: int = 256, buf_size: int = 8192
    ) -> uringserve.HotpathRing:
        ring = uringserve.HotpathRing(queue_depth=queue_depth, n_bufs=n_bufs, buf_size=buf_size)
        resources.ring(ring)
        return ring

    return make


@pytest.fixture(params=["on", "off"])
def backend(request: pytest.FixtureRequest) -> str:
    """The Server's io_uring policy: every server test runs on both backends."""
    if request.param == "on":
        skip_unless_hotpath()
    return str(request.param)


@pytest.fixture
def serve(backend: str) -> Iterator[Callable[..., ServerThread]]:
    """Factory for a ServerThread on the test's backend, stopped and checked at teardown."""
    started: list[ServerThread] = []

    def start(app: Callable[..., Iterable[bytes]], **options: Any) -> ServerThread:
        st = ServerThread(app, backend, **options)
        started.append(st)
        expected = "io_uring" if backend == "on" else "epoll"
        assert st.server.backend == expected
        return st

    yield start
    for st in started:
        st.stop()
        assert not st.errors, st.errors


@pytest.fixture
def server_errors() -> Iterator[list[logging.LogRecord]]:
    """Warnings and errors the server logs through "uringserve.error" during the test.

    A handler on the logger itself sees records from the server thread whatever the root
    logger's level or pytest's capture settings are.
    """
    logger = logging.getLogger("uringserve.error")
    handler = LogRecords(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)

"""A sick io_uring ring moves its server (or worker) to epoll live: under load, with a large
response in flight, a half-sent request body, pipelined requests, a half-sent request head
and TLS, `force_unhealthy` fails no request and resets no connection; later requests on the
same keep-alive connections are served by epoll; one WARNING names the reason; the counter
is 1; the ring fd is gone.

io_uring only by nature: the tests skip with the probe's reason where the hot path cannot
run (the epoll backend has no ring to lose)."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme

from fallback_app import BIG, READING_FLAG, app, digest
from proc_util import ServerProcess, ring_fds
from server_util import Reader, Response, ServerThread, get, request, wait_until
from test_metrics import backends, scrape, value
from test_tls import Pki, pki, tls_options

__all__ = ["pki"]  # the TLS fixture, used below

pytestmark = pytest.mark.needs_hotpath

TIMEOUT = 10.0
BODY = bytes(range(251)) * 1045  # about 256 KiB, sent in two halves around the switch
SWITCHED = re.compile(r"io_uring ring unhealthy \((.*)\): serving on epoll")

Connect = Callable[[], socket.socket]


@dataclass
class StrictLoad:
    """Keep-alive clients sending two pipelined requests per round, never retrying: a reset,
    an early close or a wrong answer is a failure. Bounded in requests and time."""

    connect: Connect
    clients: int = 4
    max_requests: int = 20_000
    # time.monotonic() of each answered request, and the pid that answered it.
    answered: list[tuple[float, bytes]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._client, daemon=True) for _ in range(self.clients)
        ]

    def start(self) -> StrictLoad:
        for t in self._threads:
            t.start()
        return self

    def count(self) -> int:
        with self._lock:
            return len(self.answered)

    def since(self, t: float) -> list[bytes]:
        with self._lock:
            return [who for at, who in self.answered if at >= t]

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(TIMEOUT * 2)
        assert not any(t.is_alive() for t in self._threads), "a load client did not finish"

    def _client(self) -> None:
        try:
            sock = self.connect()
        except OSError as exc:
            with self._lock:
                self.failures.append(f"connect: {exc!r}")
            return
        reader = Reader(sock, TIMEOUT)
        try:
            for n in range(self.max_requests // (2 * self.clients)):
                if self._stop.is_set():
                    return
                sock.sendall(get(f"/a{n}") + get(f"/b{n}"))
                for path in (f"/a{n}", f"/b{n}"):
                    resp = reader.read_response()
                    pid, _, tail = resp.body.partition(b" ")[2].partition(b" ")
                    if resp.status != 200 or tail != path.encode():
                        raise AssertionError(f"wrong answer to {path}: {resp}")
                    with self._lock:
                        self.answered.append((time.monotonic(), pid))
        except Exception as exc:  # every failure is reported by the test
            with self._lock:
                self.failures.append(repr(exc))
        finally:
            sock.close()


@dataclass
class InFlight:
    """Connections caught mid-exchange at the switch, each finished and reused after it."""

    connect: Connect
    reading_flag: Path
    big: socket.socket = field(init=False)
    big_reader: Reader = field(init=False)
    body: socket.socket = field(init=False)
    pipelined: socket.socket = field(init=False)
    head: socket.socket = field(init=False)

    def start(self) -> None:
        # A large response: only its first bytes are read, the rest waits in the server.
        self.big = self.connect()
        self.big.sendall(get("/big"))
        self.big_reader = Reader(self.big, TIMEOUT)
        self.big_reader._fill(time.monotonic() + TIMEOUT)
        # Five pipelined requests, sent at once and not read yet.
        self.pipelined = self.connect()
        self.pipelined.sendall(b"".join(get(f"/p{i}") for i in range(5)))
        # Half a request head.
        self.head = self.connect()
        self.head.sendall(b"GET /half HTTP/1.1\r\nHo")
        # A request body half-sent, last: the app is reading it when the ring goes (and the
        # loop, which runs the app inline, waits with it).
        self.body = self.connect()
        head = f"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {len(BODY)}\r\n\r\n"
        self.body.sendall(head.encode() + BODY[: len(BODY) // 2])
        assert wait_until(self.reading_flag.exists, TIMEOUT), "the app never read the body"

    def send_rest_of_body(self) -> None:
        self.body.sendall(BODY[len(BODY) // 2 :])

    def finish(self) -> None:
        resp = self.big_reader.read_response()
        assert resp.body == BIG, "the large response was corrupted across the switch"
        resp, reader = read_one(self.body)
        assert (resp.status, resp.body) == (200, digest(BODY))
        reader = Reader(self.pipelined, TIMEOUT)
        for i in range(5):
            resp = reader.read_response()
            assert resp.status == 200 and resp.body.endswith(f"/p{i}".encode()), resp
        resp, _ = request(self.head, b"st: x\r\n\r\n", timeout=TIMEOUT)
        assert resp.status == 200 and resp.body.endswith(b"/half"), resp
        # Each connection lives on, now served by epoll.
        for sock in (self.big, self.body, self.pipelined, self.head):
            resp, _ = request(sock, get("/again"), timeout=TIMEOUT)
            assert resp.status == 200 and resp.body.endswith(b"/again"), resp
            sock.close()


def idle_after_first(address: tuple[str, int]) -> tuple[socket.socket, Reader]:
    """A keep-alive connection that has had one request answered and now sits idle."""
    sock = socket.create_connection(address, timeout=TIMEOUT)
    resp, reader = request(sock, get("/first"), timeout=TIMEOUT)
    assert resp.status == 200
    return sock, reader


def read_one(sock: socket.socket) -> tuple[Response, Reader]:
    reader = Reader(sock, TIMEOUT)
    return reader.read_response(), reader


def own_ring_fds() -> int:
    return ring_fds(os.getpid())


def tls_connector(address: tuple[str, int], ca: trustme.CA) -> Connect:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)

    def connect() -> socket.socket:
        raw = socket.create_connection(address, timeout=TIMEOUT)
        return ctx.wrap_socket(raw, server_hostname="localhost")

    return connect


def run_switch(
    connect: Connect,
    reading_flag: Path,
    trigger: Callable[[], None],
    switched: Callable[[], bool],
) -> tuple[StrictLoad, int, int]:
    """Load, connections in flight, the switch, then everything finished and checked.
    Returns the load and how many requests were answered before and after the switch."""
    load = StrictLoad(connect).start()
    try:
        assert wait_until(lambda: load.count() >= 200 or bool(load.failures), TIMEOUT)
        assert not load.failures, load.failures
        inflight = InFlight(connect, reading_flag)
        inflight.start()
        before = load.count()
        trigger()
        inflight.send_rest_of_body()
        assert wait_until(switched, TIMEOUT), "the server did not move to epoll"
        at = time.monotonic()
        assert wait_until(lambda: len(load.since(at)) >= 500 or bool(load.failures), TIMEOUT)
        inflight.finish()
    finally:
        load.stop()
    assert not load.failures, load.failures
    return load, before, len(load.since(at))


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_force_unhealthy_in_process_moves_live_connections_to_epoll(
    tls: bool,
    pki: Pki,
    server_errors: list[logging.LogRecord],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    flag = tmp_path / "reading"
    monkeypatch.setenv(READING_FLAG, str(flag))
    baseline = own_ring_fds()
    options = tls_options(pki) if tls else {}
    st = ServerThread(app, "on", **options)
    try:
        assert wait_until(lambda: st.server._native is not None, TIMEOUT)
        assert own_ring_fds() == baseline + 1
        if tls:
            connect = tls_connector(st.address, pki.ca)
        else:

            def connect() -> socket.socket:
                return socket.create_connection(st.address, timeout=TIMEOUT)

        reason = f"test: sick ring ({'tls' if tls else 'plain'})"
        _, before, after = run_switch(
            connect,
            flag,
            lambda: st.server.force_unhealthy(reason),
            lambda: st.server.backend == "epoll",
        )
        print(f"answered {before} before the switch, {after} after; failures 0")
        assert own_ring_fds() == baseline, "the ring fd is still open"
        assert st.server.fallback_engaged == 1
    finally:
        st.stop()
    assert not st.errors, st.errors
    # The request count runs on across the switch: both loops count into the same app.
    assert st.server.requests >= before + after
    assert st.server.ring_stats is not None
    assert st.server.ring_stats["fallback_engaged"] == 1
    warnings = [r for r in server_errors if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert reason in warnings[0].getMessage()


def test_worker_moves_to_epoll_on_the_test_hook_signal(tmp_path: Path) -> None:
    flag = tmp_path / "reading"
    env = {"URINGSERVE_TEST_HOOKS": "1", READING_FLAG: str(flag)}
    # Each worker its own SO_REUSEPORT socket: the kernel spreads new connections over both,
    # so the test can pick connections that the sick worker serves.
    args = ["--io-uring", "on", "--workers", "2", "--reuse-port"]
    server = ServerProcess(args, env=env, app="fallback_app:app")
    try:
        pids = server.booted(2)
        sick, healthy = pids
        # A worker says it booted just before it opens its ring.
        assert wait_until(lambda: ring_fds(sick) >= 1 and ring_fds(healthy) >= 1, TIMEOUT)

        def connect_to(pid: int) -> socket.socket:
            """A connection that the given worker accepted (the shared listener decides)."""
            for _ in range(200):
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
                resp, _ = request(sock, get("/who"), timeout=TIMEOUT)
                if resp.body.startswith(f"pid {pid} ".encode()):
                    return sock
                sock.close()
            raise AssertionError(f"no connection reached worker {pid}")

        load, before, after = run_switch(
            lambda: connect_to(sick),
            flag,
            lambda: os.kill(sick, signal.SIGUSR2),
            lambda: bool(server.matches(SWITCHED)),
        )
        print(f"worker answered {before} before the switch, {after} after; failures 0")
        assert set(load.since(0.0)) == {str(sick).encode()}
        lines = server.matches(SWITCHED)
        assert len(lines) == 1, server.log()
        assert "SIGUSR2 test hook" in lines[0].group(1)
        assert "fallback_engaged=1" in server.log()
        assert ring_fds(sick) == 0, "the sick worker still holds its ring"
        assert ring_fds(healthy) >= 1
        assert server.proc.poll() is None, server.log()
        server.stop_cleanly()
    finally:
        server.close()


def test_a_ring_that_cannot_be_entered_never_repeats_or_skips_response_bytes(
    server_errors: list[logging.LogRecord],
) -> None:
    baseline = own_ring_fds()
    st = ServerThread(app, "on")
    try:
        assert wait_until(lambda: st.server._native is not None, TIMEOUT)
        idle, _ = idle_after_first(st.address)
        big = socket.create_connection(st.address, timeout=TIMEOUT)
        big.sendall(get("/big"))
        big_reader = Reader(big, TIMEOUT)
        big_reader._fill(time.monotonic() + TIMEOUT)
        assert st.server.force_unhealthy("test: dead ring", ring_usable=False)
        assert wait_until(lambda: st.server.backend == "epoll", TIMEOUT)
        # The idle connection carries on.
        resp, _ = request(idle, get("/after"), timeout=TIMEOUT)
        assert resp.status == 200 and resp.body.endswith(b"/after")
        # The large response: if the send in flight was one the kernel had taken, how much of
        # it went out is unknown, so the connection is closed after an exact prefix; if its
        # SQE was never taken, epoll sends the rest. Never a byte twice, never a hole.
        try:
            resp = big_reader.read_response()
            closed = False
        except EOFError:
            closed = True
        if closed:
            body = big_reader.buf  # the head was read; the body stopped short
            assert body == BIG[: len(body)], "the prefix sent before the close is corrupted"
        else:
            assert resp.body == BIG
            resp, _ = request(big, get("/again"), timeout=TIMEOUT)
            assert resp.status == 200
        assert own_ring_fds() == baseline
        idle.close()
        big.close()
    finally:
        st.stop()
    assert not st.errors, st.errors
    warnings = [r.getMessage() for r in server_errors if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "test: dead ring" in warnings[0]
    lost = "1 with a send the kernel never confirmed were closed"
    assert (lost in warnings[0]) == closed, warnings[0]


def test_a_real_enter_error_moves_the_server_to_epoll_without_losing_the_response() -> None:
    """The app installs a seccomp filter on the serving thread, so the ring's next enter fails
    with EPERM: the ring cannot be entered any more. The response it had just queued never
    reached the kernel, so epoll sends it; the other connections carry on."""
    server = ServerProcess(["--io-uring", "on"], app="fallback_app:app")
    try:
        assert server.backend == "io_uring"
        assert wait_until(lambda: ring_fds(server.pid) >= 1, TIMEOUT)
        address = ("127.0.0.1", server.port)
        idle, _ = idle_after_first(address)
        poisoner = socket.create_connection(address, timeout=TIMEOUT)
        resp, _ = request(poisoner, get("/poison"), timeout=TIMEOUT)
        if resp.body.startswith(b"unavailable"):
            pytest.skip(resp.body.decode())
        assert (resp.status, resp.body) == (200, b"poisoned")
        line = server.wait_for(SWITCHED, timeout=TIMEOUT)
        assert line.group(1).startswith("io_uring_enter failed: EPERM"), server.log()
        for sock in (idle, poisoner, socket.create_connection(address, timeout=TIMEOUT)):
            resp, _ = request(sock, get("/after"), timeout=TIMEOUT)
            assert resp.status == 200 and resp.body.endswith(b"/after"), resp
            sock.close()
        assert len(server.matches(SWITCHED)) == 1, server.log()
        assert ring_fds(server.pid) == 0, "the ring fd is still open"
        server.stop_cleanly()
    finally:
        server.close()


def test_a_deadline_runs_on_across_the_switch() -> None:
    """The keep-alive deadline of a connection handed over is the one it had, not a new one."""
    keep_alive = 1.5
    st = ServerThread(app, "on", keep_alive_timeout=keep_alive)
    try:
        assert wait_until(lambda: st.server._native is not None, TIMEOUT)
        sock = socket.create_connection(st.address, timeout=TIMEOUT)
        resp, reader = request(sock, get("/first"), timeout=TIMEOUT)
        idle_since = time.monotonic()
        assert resp.status == 200
        # A timing property, not synchronisation: the switch comes late in the idle spell.
        assert wait_until(lambda: time.monotonic() >= idle_since + 1.0, 2.0)
        assert st.server.force_unhealthy("test: late in the idle spell")
        assert wait_until(lambda: st.server.backend == "epoll", TIMEOUT)
        assert reader.at_eof(timeout=TIMEOUT), "the idle connection was never closed"
        closed_after = time.monotonic() - idle_since
        sock.close()
    finally:
        st.stop()
    assert not st.errors, st.errors
    # A fresh deadline at the switch would close it about 2.5 s after its response.
    assert keep_alive - 0.1 <= closed_after < keep_alive + 0.7, closed_after


def test_a_graceful_stop_asked_during_the_switch_completes_on_epoll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server_errors: list[logging.LogRecord]
) -> None:
    """SIGTERM's graceful stop and the sick ring land together, while the app reads a body:
    the request is answered, the idle connection closed, and serving ends by itself."""
    flag = tmp_path / "reading"
    monkeypatch.setenv(READING_FLAG, str(flag))
    # Far longer than the test waits: only the drain can close the idle connection in time.
    st = ServerThread(app, "on", keep_alive_timeout=60.0)
    try:
        assert wait_until(lambda: st.server._native is not None, TIMEOUT)
        idle, idle_reader = idle_after_first(st.address)
        body = socket.create_connection(st.address, timeout=TIMEOUT)
        head = f"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {len(BODY)}\r\n\r\n"
        body.sendall(head.encode() + BODY[: len(BODY) // 2])
        assert wait_until(flag.exists, TIMEOUT), "the app never read the body"
        st.server.shutdown(wait=False, graceful=True)
        assert st.server.force_unhealthy("test: sick while stopping")
        resp, body_reader = request(body, BODY[len(BODY) // 2 :], timeout=TIMEOUT)
        assert (resp.status, resp.body) == (200, digest(BODY))
        assert body_reader.at_eof(timeout=TIMEOUT), "the drain left a connection open"
        assert idle_reader.at_eof(timeout=TIMEOUT), "the drain left the idle connection open"
        st.thread.join(TIMEOUT)
        assert not st.thread.is_alive(), "serving did not end after the graceful stop"
        assert st.server.fallback_engaged == 1
        idle.close()
        body.close()
    finally:
        st.stop()
    assert not st.errors, st.errors
    warnings = [r.getMessage() for r in server_errors if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "test: sick while stopping" in warnings[0], warnings


def test_the_switch_shows_in_the_metrics() -> None:
    st = ServerThread(app, "on", metrics_bind="127.0.0.1:0")
    try:
        assert wait_until(lambda: st.server._native is not None, TIMEOUT)
        address = st.server.metrics_address
        assert address is not None
        assert value(scrape(address), "uringserve_fallback_engaged_total") == 0
        assert backends(scrape(address)) == {"0": "io_uring"}
        assert st.server.force_unhealthy("test: metrics")
        assert wait_until(lambda: st.server.backend == "epoll", TIMEOUT)
        sock = socket.create_connection(st.address, timeout=TIMEOUT)
        resp, _ = request(sock, get("/after"), timeout=TIMEOUT)
        assert resp.status == 200
        sock.close()
        samples = scrape(address)
        assert value(samples, "uringserve_fallback_engaged_total") == 1
        assert backends(samples) == {"0": "epoll"}
    finally:
        st.stop()
    assert not st.errors, st.errors


def test_app_calls_running_on_app_threads_finish_across_the_switch(
    server_errors: list[logging.LogRecord],
) -> None:
    """threads=2, both app threads busy when the ring goes: one app call blocked on an Event,
    with a request pipelined behind it and another sent after the switch; one that sends
    100 Continue and reads its body only after the switch. Every request is answered, and
    later requests on both connections are served by epoll; zero failures."""
    paths = ("/block", "/expect")
    entered = {p: threading.Event() for p in paths}
    release = {p: threading.Event() for p in paths}

    def blocking_app(
        environ: dict[str, object], start_response: Callable[..., object]
    ) -> list[bytes]:
        path = str(environ["PATH_INFO"])
        if path in entered:
            entered[path].set()
            if not release[path].wait(TIMEOUT * 3):
                start_response("503 Service Unavailable", [])
                return [b"never released"]
        body = environ["wsgi.input"].read()  # type: ignore[attr-defined]
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [path.encode(), b" ", digest(body)]

    st = ServerThread(blocking_app, "on", threads=2, body_timeout=TIMEOUT * 3)
    try:
        assert wait_until(lambda: st.server._native is not None, TIMEOUT)
        blocked = st.connect(timeout=TIMEOUT * 3)
        blocked.sendall(get("/block") + get("/behind"))
        expect = st.connect(timeout=TIMEOUT * 3)
        head = f"POST /expect HTTP/1.1\r\nHost: x\r\nContent-Length: {len(BODY)}\r\n"
        expect.sendall(head.encode() + b"Expect: 100-continue\r\n\r\n")
        assert all(entered[p].wait(TIMEOUT) for p in paths), "the app calls never started"
        assert st.server.force_unhealthy("test: sick with app calls on app threads")
        assert wait_until(lambda: st.server.backend == "epoll", TIMEOUT)
        blocked.sendall(get("/after-switch"))
        release["/block"].set()
        reader = Reader(blocked, TIMEOUT * 3)
        for path in ("/block", "/behind", "/after-switch"):
            resp = reader.read_response()
            assert (resp.status, resp.body) == (200, path.encode() + b" " + digest(b"")), resp
        # The 100 Continue goes out from the app thread straight to the socket, and the body
        # is read from it there.
        release["/expect"].set()
        expect_reader = Reader(expect, TIMEOUT * 3)
        assert expect_reader.read_response().status == 100
        expect.sendall(BODY)
        resp = expect_reader.read_response()
        assert (resp.status, resp.body) == (200, b"/expect " + digest(BODY)), resp
        # Both connections live on, served by epoll now.
        for sock, sock_reader in ((blocked, reader), (expect, expect_reader)):
            sock.sendall(get("/again"))
            resp = sock_reader.read_response()
            assert (resp.status, resp.body) == (200, b"/again " + digest(b"")), resp
            sock.close()
        with st.connect() as fresh:
            resp, _ = request(fresh, get("/fresh"), timeout=TIMEOUT)
            assert resp.status == 200
        assert st.server.fallback_engaged == 1
    finally:
        for event in release.values():
            event.set()
        st.stop()
    assert not st.errors, st.errors
    warnings = [r.getMessage() for r in server_errors if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "test: sick with app calls on app threads" in warnings[0]
    assert "never confirmed" not in warnings[0], warnings[0]


def test_a_stop_never_lets_a_running_app_call_read_a_reused_fd() -> None:
    """threads=2: an app call waits, its body not all sent, when the ring goes to epoll and
    the server then stops at once. The call carries on and reads its body after the stop.
    The numbers of the fds the stop freed are taken by new sockets holding a secret; the
    call must find its own peer gone, never read the secret."""
    # Enough for the 90 body bytes still to come, so a read of a reused fd completes.
    secret = b"bytes of another connection; " * 4
    entered, release, finished = threading.Event(), threading.Event(), threading.Event()
    got: list[bytes] = []

    def app(environ: dict[str, object], start_response: Callable[..., object]) -> list[bytes]:
        entered.set()
        release.wait(TIMEOUT * 3)
        try:
            got.append(environ["wsgi.input"].read())  # type: ignore[attr-defined]
        except Exception as exc:  # the peer is gone: the read fails, as it should
            got.append(repr(exc).encode())
        finally:
            finished.set()
        start_response("200 OK", [])
        return [b"too late"]

    st = ServerThread(app, "on", threads=2, body_timeout=TIMEOUT * 3)
    pairs: list[socket.socket] = []
    client = None
    try:
        assert wait_until(lambda: st.server._native is not None, TIMEOUT)
        client = st.connect(timeout=TIMEOUT)
        client.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"a" * 10)
        assert entered.wait(TIMEOUT), "the app call never started"
        assert st.server.force_unhealthy("test: sick with a body read to come")
        assert wait_until(lambda: st.server.backend == "epoll", TIMEOUT)
        st.stop(timeout=TIMEOUT)
        for _ in range(32):
            a, b = socket.socketpair()
            pairs += [a, b]
            a.sendall(secret)
            b.sendall(secret)
        release.set()
        assert finished.wait(TIMEOUT), "the app call never finished"
        assert got and b"another connection" not in got[0], got
    finally:
        release.set()
        for s in pairs:
            s.close()
        if client is not None:
            client.close()
        if st.thread.is_alive():
            st.stop()
    assert not st.errors, st.errors

"""Timeouts and limits on both backends: slowloris heads, idle keep-alive connections, stalled
bodies, the per-worker connection cap, and the options that set them (CLI and env vars).

Timeouts are set to fractions of a second here; each test bounds its waits in time. Where a
client must stay quiet for a while (the behaviour under test), it waits on its socket for the
server to close it, so the wait is also the check that nothing happens early.
"""

from __future__ import annotations

import resource
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from server_util import Reader, ServerThread, get, hello_app, post, request
from uringserve.cli import _parser, build_config, main, make_server

StartResponse = Callable[..., Any]
Environ = dict[str, Any]


def closed_within(sock: socket.socket, timeout: float) -> float | None:
    """Seconds until the server closed `sock` (EOF or reset), or None if it stayed open for
    `timeout`. Receiving data instead is a test failure."""
    start = time.monotonic()
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLHUP | select.POLLERR)
    if not poller.poll(timeout * 1000):
        return None
    try:
        data = sock.recv(65536)
    except ConnectionResetError:
        data = b""
    assert data == b"", f"expected the connection to close, got {data!r}"
    return time.monotonic() - start


# ---- header timeout --------------------------------------------------------------------


SLOW_CLIENTS = 500
DRIP = b"GET /slow HTTP/1.1\r\nHost: localhost\r\n"


@pytest.fixture
def many_fds() -> Iterator[None]:
    """Room for 500 client sockets plus the server's 500 in this one process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4 * SLOW_CLIENTS + 256
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below {want}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class Slowloris:
    """SLOW_CLIENTS connections that each send one byte of a request head every second, and
    note when the server closes each of them."""

    def __init__(self, address: tuple[str, int], count: int) -> None:
        self.socks: dict[int, socket.socket] = {}
        self.opened: dict[int, float] = {}
        self.closed: dict[int, float] = {}
        for _ in range(count):
            s = socket.create_connection(address, timeout=5)
            s.setblocking(False)
            self.socks[s.fileno()] = s
            self.opened[s.fileno()] = time.monotonic()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="slowloris", daemon=True)

    def _close(self, fd: int, poller: select.poll) -> None:
        self.closed[fd] = time.monotonic()
        poller.unregister(fd)

    def _run(self) -> None:
        poller = select.poll()
        for fd in self.socks:
            poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        sent = 0
        next_drip = time.monotonic()
        while not self.stop.is_set() and len(self.closed) < len(self.socks):
            now = time.monotonic()
            if now >= next_drip and sent < len(DRIP):
                for fd, s in self.socks.items():
                    if fd not in self.closed:
                        try:
                            s.send(DRIP[sent : sent + 1])
                        except OSError:
                            self._close(fd, poller)
                sent += 1
                next_drip += 1.0
            wait = max(0.0, next_drip - time.monotonic())
            for fd, _ in poller.poll(min(wait, 0.05) * 1000):
                if fd in self.closed:
                    continue
                try:
                    data = self.socks[fd].recv(4096)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                assert data == b"", f"a slow client got an answer: {data!r}"
                self._close(fd, poller)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        for s in self.socks.values():
            s.close()


def test_slowloris_heads_are_cut_off_while_others_are_served(
    serve: Callable[..., ServerThread], many_fds: None, backend: str
) -> None:
    header_timeout = 2.0
    st = serve(hello_app, header_timeout=header_timeout)
    slow = Slowloris(st.address, SLOW_CLIENTS)
    slow.thread.start()
    latencies: list[float] = []
    try:
        # Normal clients, one fresh connection per request, while every slow one still drips.
        first_cut = min(slow.opened.values()) + header_timeout * 0.9
        while time.monotonic() < first_cut and len(latencies) < 2000:
            start = time.monotonic()
            with st.connect() as s:
                resp, _ = request(s, get())
            latencies.append(time.monotonic() - start)
            assert resp.status == 200
        # The drip thread ends once the server has closed every slow connection.
        slow.thread.join(header_timeout + 5)
    finally:
        slow.close()
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    lifetimes = sorted(slow.closed[fd] - slow.opened[fd] for fd in slow.closed)
    print(
        f"\n[{backend}] {len(latencies)} normal requests during the drip: "
        f"p50 {latencies[len(latencies) // 2] * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms, "
        f"max {latencies[-1] * 1e3:.1f} ms; {len(lifetimes)}/{SLOW_CLIENTS} slow connections "
        f"closed {lifetimes[0]:.2f}..{lifetimes[-1]:.2f} s after connecting "
        f"(header timeout {header_timeout} s)"
    )
    assert len(latencies) >= 100
    assert p99 < 0.100, f"p99 {p99 * 1e3:.1f} ms"
    assert len(slow.closed) == SLOW_CLIENTS, "some slow connections were never closed"
    assert lifetimes[0] >= header_timeout * 0.95, "closed before the header timeout"
    assert lifetimes[-1] <= header_timeout + 1.5, "closed long after the header timeout"


def test_header_timeout_runs_from_accept_for_a_silent_connection(
    serve: Callable[..., ServerThread],
) -> None:
    st = serve(hello_app, header_timeout=0.5, keep_alive_timeout=30)
    with st.connect() as s:
        elapsed = closed_within(s, 5)
    assert elapsed is not None and 0.45 <= elapsed <= 2.0, elapsed


def test_header_timeout_runs_from_the_first_byte_after_an_idle_spell(
    serve: Callable[..., ServerThread],
) -> None:
    st = serve(hello_app, header_timeout=0.5, keep_alive_timeout=3.0)
    with st.connect() as s:
        resp, _ = request(s, get())
        assert resp.status == 200
        # Idle for a while, under the keep-alive timeout: still open.
        assert closed_within(s, 0.6) is None
        s.sendall(b"GET / HT")
        elapsed = closed_within(s, 5)
    # The head had 0.5 s from its first byte; the keep-alive timeout would have been 2.4 s.
    assert elapsed is not None and 0.45 <= elapsed <= 1.5, elapsed


# ---- keep-alive timeout ----------------------------------------------------------------


def test_idle_keep_alive_connection_is_closed_after_its_timeout(
    serve: Callable[..., ServerThread],
) -> None:
    st = serve(hello_app, keep_alive_timeout=0.5, header_timeout=30)
    with st.connect() as s:
        resp, _ = request(s, get())
        assert resp.status == 200
        elapsed = closed_within(s, 5)
    # Timed from when the server saw the response sent, a little before or after the client
    # read it: hence the slack below 0.5 s.
    assert elapsed is not None and 0.4 <= elapsed <= 2.0, elapsed


def test_connection_used_within_the_keep_alive_timeout_stays_open(
    serve: Callable[..., ServerThread],
) -> None:
    st = serve(hello_app, keep_alive_timeout=0.5, header_timeout=30)
    with st.connect() as s:
        # Five requests 0.3 s apart: 1.2 s in all, over twice the timeout, never idle 0.5 s.
        for _ in range(5):
            resp, _ = request(s, get())
            assert resp.status == 200
            assert closed_within(s, 0.3) is None, "closed while used within the timeout"


# ---- body timeout ----------------------------------------------------------------------


def test_stalled_body_fails_the_read_and_closes_the_connection(
    serve: Callable[..., ServerThread],
) -> None:
    seen: list[BaseException] = []

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        try:
            environ["wsgi.input"].read()
        except Exception as exc:
            seen.append(exc)
            raise
        start_response("200 OK", [])
        return [b"read it all"]

    st = serve(app, body_timeout=0.5)
    with st.connect() as s:
        s.sendall(post(100) + b"x" * 10)
        start = time.monotonic()
        resp = Reader(s).read_response()
        answered = time.monotonic() - start
        assert closed_within(s, 5) is not None
    # The app's read raised TimeoutError; the app did not catch it, so: 500, then close.
    assert len(seen) == 1 and isinstance(seen[0], TimeoutError), seen
    assert resp.status == 500
    assert 0.45 <= answered <= 2.5, answered


def test_stalled_unread_body_closes_the_connection(serve: Callable[..., ServerThread]) -> None:
    # The app answers without reading: the server discards the rest of the body as it comes,
    # and gives up when it stops coming.
    st = serve(hello_app, body_timeout=0.5, keep_alive_timeout=30)
    with st.connect() as s:
        s.sendall(post(1000) + b"x" * 10)
        resp = Reader(s).read_response()
        assert resp.status == 200
        # More body within the timeout: the gap starts again from there.
        assert closed_within(s, 0.3) is None, "a body still arriving was cut off"
        s.sendall(b"y" * 10)
        start = time.monotonic()
        assert closed_within(s, 0.3) is None, "closed before the body timeout"
        assert closed_within(s, 5) is not None
    assert 0.45 <= time.monotonic() - start <= 2.5


# ---- connection cap --------------------------------------------------------------------


def test_connections_past_the_cap_wait_in_the_backlog_and_are_served_later(
    serve: Callable[..., ServerThread], backend: str
) -> None:
    cap, extra = 3, 4
    st = serve(hello_app, max_connections=cap, keep_alive_timeout=30, header_timeout=30)
    first = [st.connect() for _ in range(cap)]
    later: list[socket.socket] = []
    try:
        for s in first:
            resp, _ = request(s, get())
            assert resp.status == 200
        later = [st.connect() for _ in range(extra)]
        for s in later:
            s.sendall(get())
        # At the cap nothing more is accepted: no answer, and no refusal or reset either.
        ready, _, _ = select.select(later, [], [], 0.3)
        assert ready == [], "a connection past the cap was served or closed"
        for s in first:
            s.close()
        # The backlog hands them over in order, as room frees up, never past the cap.
        for s in later[:cap]:
            assert Reader(s).read_response().status == 200
        ready, _, _ = select.select(later[cap:], [], [], 0.3)
        assert ready == [], "the cap was overshot"
        later[0].close()
        for s in later[cap:]:
            assert Reader(s).read_response().status == 200
    finally:
        for s in first + later:
            s.close()
    if backend == "on":
        st.stop()
        stats = st.server.ring_stats
        assert stats is not None and stats["accept_pauses"] >= 2, stats


# ---- options ---------------------------------------------------------------------------


def test_limit_and_timeout_options_from_flags_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("URINGSERVE_HEADER_TIMEOUT", "2.5")
    monkeypatch.setenv("URINGSERVE_MAX_CONNECTIONS", "7")
    monkeypatch.setenv("URINGSERVE_MAX_HEADERS", "20")
    flags = [
        "--bind=127.0.0.1:0",
        "--io-uring=off",
        "--keep-alive-timeout=1.5",
        "--body-timeout=4",
        "--max-connections=9",
        "--max-request-line=100",
        "--max-header-bytes=2000",
        "--max-body-size=5000",
    ]
    config = build_config(_parser().parse_args(flags))
    with make_server(hello_app, config) as server:
        c = server.config
        assert (c.header_timeout, c.keep_alive_timeout, c.body_timeout) == (2.5, 1.5, 4.0)
        assert c.max_connections == 9  # the flag wins over URINGSERVE_MAX_CONNECTIONS
        assert (c.max_request_line, c.max_header_bytes, c.max_headers) == (100, 2000, 20)
        assert c.max_body_size == 5000


@pytest.mark.parametrize(
    "flag", ["--header-timeout=0", "--body-timeout=-1", "--max-connections=0", "--max-headers=0"]
)
def test_out_of_range_options_are_refused(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--io-uring=off", flag])
    assert exc.value.code == 2
    name = flag.split("=")[0].lstrip("-").replace("-", "_")
    assert f"{name} must be positive" in capsys.readouterr().err


def test_bad_env_number_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("URINGSERVE_KEEP_ALIVE_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="URINGSERVE_KEEP_ALIVE_TIMEOUT='soon': expected a number"):
        build_config(_parser().parse_args([]))


def test_cli_options_reach_the_running_loop(backend: str) -> None:
    args = _parser().parse_args(
        [f"--io-uring={backend}", "--bind=127.0.0.1:0", "--header-timeout=0.5", "--max-headers=3"]
    )
    config = build_config(args)
    server = make_server(hello_app, config.with_options(access_log=False))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        address = server.server_address[:2]
        with socket.create_connection(address, timeout=5) as s:
            extra = "".join(f"X-{i}: {i}\r\n" for i in range(4))
            resp, _ = request(s, get(extra=extra))
            assert resp.status == 431  # --max-headers reached the HTTP core
        with socket.create_connection(address, timeout=5) as s:
            elapsed = closed_within(s, 5)  # --header-timeout reached the loop
            assert elapsed is not None and 0.45 <= elapsed <= 2.0, elapsed
    finally:
        server.shutdown()
        thread.join(5)
        server.close()
    assert not thread.is_alive()

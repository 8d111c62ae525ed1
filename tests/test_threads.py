"""--threads on both backends: the app runs on a pool while the loop keeps doing the I/O;
requests of one connection stay in order; body reads, timeouts, graceful stop and TLS work
from pool threads; with one thread the app runs inline on the loop's thread."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
import requests

import test_request_body
import test_server_http
import test_timeouts
from proc_util import fds_linking
from server_util import Reader, ServerThread, echo_app, get, hello_app, post, request, wait_until
from test_tls import Pki, client_context, connect_tls, pki, tls_options

__all__ = ["pki"]  # the TLS fixture, used below

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
BIG = 10 * 1024 * 1024
# How long a test app waits for its peers or for the test: far past what the test needs,
# so a failure shows as a broken barrier (or a timed-out wait), never as a hang.
APP_WAIT = 10.0
EVENTFD_LINK = "anon_inode:[eventfd]"


def test_four_requests_on_four_connections_run_at_once(
    serve: Callable[..., ServerThread],
) -> None:
    # Inline, the first app call would wait alone at the barrier until it broke.
    barrier = threading.Barrier(4, timeout=APP_WAIT)

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            start_response("503 Service Unavailable", [])
            return [b"alone at the barrier"]
        start_response("200 OK", [])
        return [b"met"]

    st = serve(app, threads=4)
    socks = [st.connect(timeout=APP_WAIT + 5) for _ in range(4)]
    try:
        for s in socks:
            s.sendall(get())
        for s in socks:
            resp = Reader(s, APP_WAIT + 5).read_response()
            assert (resp.status, resp.body) == (200, b"met")
    finally:
        for s in socks:
            s.close()


@pytest.mark.parametrize("threads", [1, 3])
def test_app_thread_and_wsgi_multithread(serve: Callable[..., ServerThread], threads: int) -> None:
    seen: list[tuple[int, bool, bool]] = []

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        seen.append(
            (threading.get_ident(), environ["wsgi.multithread"], environ["wsgi.multiprocess"])
        )
        start_response("200 OK", [])
        return [b"ok"]

    st = serve(app, threads=threads)
    with st.connect() as s:
        for _ in range(3):
            assert request(s, get())[0].status == 200
    assert len(seen) == 3
    for ident, multithread, multiprocess in seen:
        assert multithread is (threads > 1)
        assert multiprocess is False
        # One thread: inline on the loop's own thread (the fast path); more: on the pool.
        assert (ident == st.thread.ident) is (threads == 1)


def test_a_blocked_app_does_not_stop_other_connections(
    serve: Callable[..., ServerThread],
) -> None:
    entered = threading.Event()
    release = threading.Event()

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        if environ["PATH_INFO"] == "/block":
            entered.set()
            released = release.wait(APP_WAIT)
            start_response("200 OK", [])
            return [b"released" if released else b"timed out"]
        start_response("200 OK", [])
        return [b"fast"]

    st = serve(app, threads=2)
    with st.connect(timeout=APP_WAIT + 5) as blocked, st.connect() as other:
        blocked.sendall(get("/block"))
        assert entered.wait(5), "the blocking request never reached the app"
        # The loop still accepts, reads and answers while the first app call blocks.
        for _ in range(3):
            resp, _ = request(other, get("/fast"))
            assert (resp.status, resp.body) == (200, b"fast")
        assert not release.is_set()
        release.set()
        resp = Reader(blocked, APP_WAIT + 5).read_response()
        assert resp.body == b"released"


def test_10_mib_body_streamed_to_a_pool_thread(serve: Callable[..., ServerThread]) -> None:
    idents: list[int] = []

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        idents.append(threading.get_ident())
        return echo_app(environ, start_response)

    st = serve(app, threads=4)
    body = os.urandom(BIG)
    with st.connect(timeout=30) as s:
        s.sendall(post(BIG) + body)
        resp = Reader(s, 30).read_response()
        assert resp.status == 200 and len(resp.body) == BIG and resp.body == body
        # The same connection carries on, now with a body that waits for 100 Continue.
        s.sendall(post(5, extra="Expect: 100-continue\r\n"))
        reader = Reader(s)
        assert reader.read_response().status == 100
        s.sendall(b"after")
        assert reader.read_response().body == b"after"
    assert len(idents) == 2 and st.thread.ident not in idents


def test_pipelined_requests_on_one_connection_stay_in_order(
    serve: Callable[..., ServerThread],
) -> None:
    lock = threading.Lock()
    running = 0
    most = 0

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            body = environ["wsgi.input"].read()
            start_response("200 OK", [])
            return [environ["PATH_INFO"].encode(), b":", body]
        finally:
            with lock:
                running -= 1

    st = serve(app, threads=4)
    n = 50
    raw = b"".join(
        post(len(f"b{i}"), f"/{i}") + f"b{i}".encode() if i % 2 else get(f"/{i}") for i in range(n)
    )
    with st.connect(timeout=10) as s:
        s.sendall(raw)
        reader = Reader(s, 10)
        bodies = [reader.read_response().body for _ in range(n)]
    expected = [f"/{i}:b{i}".encode() if i % 2 else f"/{i}:".encode() for i in range(n)]
    assert bodies == expected
    # One connection's requests ran one at a time, though four threads were there.
    assert most == 1


def test_graceful_stop_waits_for_a_request_running_on_the_pool(backend: str) -> None:
    entered = threading.Event()
    release = threading.Event()

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        if environ["PATH_INFO"] == "/block":
            entered.set()
            release.wait(APP_WAIT)
        start_response("200 OK", [])
        return [b"finished"]

    st = ServerThread(app, backend, threads=2)
    try:
        idle = st.connect()
        assert request(idle, get())[0].status == 200  # keep-alive, now between requests
        busy = st.connect(timeout=APP_WAIT + 5)
        busy.sendall(get("/block"))
        assert entered.wait(5)
        st.server.shutdown(wait=False, graceful=True)
        # The drain has run (it closed the connection that held no request)...
        assert Reader(idle).at_eof(timeout=5), "the idle connection was not closed"
        # ...and still waits for the app call on the pool.
        assert st.thread.is_alive(), "the server stopped with a request running"
        release.set()
        resp = Reader(busy, APP_WAIT + 5).read_response()
        assert (resp.status, resp.body) == (200, b"finished")
        assert resp.header("Connection") == "close"
        st.thread.join(10)
        assert not st.thread.is_alive(), "serve_forever() did not return once drained"
        assert not st.errors, st.errors
        assert st.server.requests == 2
        busy.close()
        idle.close()
    finally:
        release.set()
        st.stop()


def test_hard_stop_with_an_app_blocked_on_the_pool(backend: str) -> None:
    entered = threading.Event()
    release = threading.Event()

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        entered.set()
        release.wait(APP_WAIT)
        start_response("200 OK", [])
        return [b"late"]

    st = ServerThread(app, backend, threads=2)
    try:
        with st.connect() as s:
            s.sendall(get())
            assert entered.wait(5)
            # Stops within the pool's bounded wait, though the app call has not returned.
            st.stop(timeout=8)
            assert Reader(s).at_eof(timeout=5)
    finally:
        release.set()


def test_stalled_body_times_out_on_a_pool_thread(serve: Callable[..., ServerThread]) -> None:
    seen: list[tuple[BaseException, int]] = []

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        try:
            environ["wsgi.input"].read()
        except Exception as exc:
            seen.append((exc, threading.get_ident()))
            raise
        start_response("200 OK", [])
        return [b"read it all"]

    st = serve(app, threads=2, body_timeout=0.5)
    with st.connect() as s:
        s.sendall(post(100) + b"x" * 10)
        resp = Reader(s).read_response()
        assert resp.status == 500
        assert Reader(s).at_eof(timeout=5)
    assert len(seen) == 1 and isinstance(seen[0][0], TimeoutError), seen
    assert seen[0][1] != st.thread.ident


def test_peer_gone_while_the_app_reads_on_a_pool_thread(
    serve: Callable[..., ServerThread],
) -> None:
    failed = threading.Event()

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        try:
            environ["wsgi.input"].read()
        except OSError:
            failed.set()
            raise
        start_response("200 OK", [])
        return [b"unexpected"]

    st = serve(app, threads=2, body_timeout=30)
    with st.connect() as s:
        s.sendall(post(1000) + b"x" * 10)
        s.shutdown(socket.SHUT_WR)
        # Answered (the body is incomplete) and closed.
        Reader(s).read_to_eof(time.monotonic() + 10)
    # Told at once that the body will not come, not after the 30 s body timeout.
    assert failed.wait(5)


def test_tls_with_threads(serve: Callable[..., ServerThread], pki: Pki) -> None:
    barrier = threading.Barrier(2, timeout=APP_WAIT)

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        digest = hashlib.sha256(environ["wsgi.input"].read()).hexdigest()
        if environ["PATH_INFO"] == "/meet":
            barrier.wait()
        start_response("200 OK", [])
        return [environ["wsgi.url_scheme"].encode(), b" ", digest.encode()]

    st = serve(app, threads=2, **tls_options(pki))
    body = os.urandom(BIG)
    url = f"https://localhost:{st.address[1]}"
    resp = requests.post(url + "/", data=body, verify=pki.ca_file, timeout=60)
    assert resp.content == b"https " + hashlib.sha256(body).hexdigest().encode()
    # Two TLS connections' apps at once; one with 100 Continue sent from its pool thread.
    with connect_tls(st, client_context(pki)) as a, connect_tls(st, client_context(pki)) as b:
        a.sendall(post(0, "/meet"))
        b.sendall(post(5, "/meet", "Expect: 100-continue\r\n"))
        rb = Reader(b, APP_WAIT + 5)
        assert rb.read_response().status == 100
        b.sendall(b"hello")
        assert rb.read_response().body == b"https " + hashlib.sha256(b"hello").hexdigest().encode()
        assert Reader(a, APP_WAIT + 5).read_response().status == 200


def test_threads_option_from_env_and_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    import uringserve
    from uringserve.cli import _parser, build_config

    monkeypatch.setenv("URINGSERVE_THREADS", "6")
    assert build_config(_parser().parse_args([])).threads == 6
    assert build_config(_parser().parse_args(["--threads", "3"])).threads == 3
    with pytest.raises(ValueError, match="threads must be at least 1"):
        uringserve.Server(echo_app, port=0, threads=0)


# Behaviour tests of the server without threads, run again with a pool of four.
KEPT = {
    test_request_body: [
        "test_app_starts_before_the_body_has_arrived",
        "test_10_mib_chunked_post_streams_through_read_n",
        "test_readline_and_iteration_stream_lines",
        "test_100_continue_is_sent_when_the_app_reads_the_body",
        "test_100_continue_follows_earlier_pipelined_responses",
        "test_bad_chunk_size_reaches_the_app_and_the_client_gets_400",
        "test_client_gone_mid_body_raises_client_disconnected",
        "test_unread_small_body_is_drained_for_the_next_request",
        "test_stream_kept_past_its_response_reads_nothing_of_the_next_request",
        "test_pipelined_requests_held_back_by_unread_responses_all_get_answered",
        "test_a_client_that_does_not_read_stops_getting_its_requests_answered",
    ],
    test_server_http: [
        "test_pipelining_64",
        "test_concurrent_clients",
        "test_app_exception_500_then_serves",
        "test_bad_request_isolated",
        "test_connection_reset_mid_request",
        "test_keep_alive_requests_reuse_their_peer_strings",
    ],
    test_timeouts: [
        "test_header_timeout_runs_from_accept_for_a_silent_connection",
        "test_header_timeout_runs_from_the_first_byte_after_an_idle_spell",
        "test_idle_keep_alive_connection_is_closed_after_its_timeout",
        "test_stalled_unread_body_closes_the_connection",
    ],
}


@pytest.mark.parametrize(
    ("module", "name"),
    [(module, name) for module, names in KEPT.items() for name in names],
    ids=[f"{module.__name__}.{name}" for module, names in KEPT.items() for name in names],
)
def test_behaviour_kept_with_threads(
    serve: Callable[..., ServerThread], module: ModuleType, name: str
) -> None:
    def threaded(app: Callable[..., Any], **options: Any) -> ServerThread:
        return serve(app, **{"threads": 4, **options})

    getattr(module, name)(threaded)


@pytest.mark.needs_hotpath
def test_connections_between_requests_give_back_their_working_state() -> None:
    """With app threads too, a connection at rest holds no working state (io_uring)."""
    st = ServerThread(hello_app, "on", threads=4)
    socks: list[socket.socket] = []
    try:
        for _ in range(100):
            s = st.connect()
            socks.append(s)
            assert request(s, get())[0].status == 200
        for s in socks:
            assert request(s, get("/again"))[0].status == 200
    finally:
        st.stop()
        for s in socks:
            s.close()
    stats = st.server.ring_stats
    assert stats is not None and stats["requests"] == 200
    # One request at a time: the turns reuse a few states, not one per connection.
    assert stats["working_states"] <= 4, stats


@pytest.mark.needs_hotpath
def test_a_sick_ring_moves_to_epoll_with_its_app_threads() -> None:
    """A ring turned unhealthy hands its connections to epoll, which keeps the pool; an app
    reading its body on an app thread at the switch reads the rest from the socket itself,
    and its connection carries on under epoll."""
    entered = threading.Event()
    failed = threading.Event()
    idents: list[int] = []

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        idents.append(threading.get_ident())
        body = b""
        if environ["PATH_INFO"] == "/read":
            entered.set()
            try:
                body = environ["wsgi.input"].read()
            except OSError:
                failed.set()
                raise
        start_response("200 OK", [])
        mode = b"threads" if environ["wsgi.multithread"] else b"inline"
        return [mode, b" ", hashlib.sha256(body).hexdigest().encode()]

    st = ServerThread(app, "on", threads=3, body_timeout=30)
    body = os.urandom(1000)
    empty = b"threads " + hashlib.sha256(b"").hexdigest().encode()
    try:
        resting = st.connect()
        assert request(resting, get())[0].body == empty
        reading = st.connect(timeout=10)
        reading.sendall(post(len(body), "/read") + body[:1])
        assert entered.wait(5)
        assert st.server.force_unhealthy("test: sick with app threads")
        assert wait_until(lambda: st.server.backend == "epoll", 5)
        reading.sendall(body[1:])
        resp = Reader(reading, 10).read_response()
        assert (resp.status, resp.body) == (
            200,
            b"threads " + hashlib.sha256(body).hexdigest().encode(),
        )
        assert not failed.is_set()
        # Both connections and new ones are served on epoll, still on app threads.
        assert request(reading, get())[0].body == empty
        assert request(resting, get())[0].body == empty
        with st.connect() as s:
            assert request(s, get())[0].body == empty
        resting.close()
        reading.close()
    finally:
        st.stop()
    assert not st.errors, st.errors
    assert st.thread.ident not in idents


FLOOD = 64 << 20
# No progress on the flood for this long: the server has stopped taking it in. Only a
# server that holds input back ever waits this long, so it cannot make the test flaky.
STALL = 2.0


def test_input_is_held_back_while_the_app_runs_on_an_app_thread(backend: str) -> None:
    """An app call blocked on an Event on an app thread while its client floods 64 MiB of
    request body: the server stops taking the bytes in (they wait in the kernel's socket
    buffers, which cannot hold them all), and after the release every byte is read and the
    request answered; the connection then carries on."""
    entered = threading.Event()
    release = threading.Event()

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        if environ["PATH_INFO"] == "/hold":
            entered.set()
            release.wait(APP_WAIT * 3)
        body = environ["wsgi.input"].read()
        start_response("200 OK", [])
        return [f"{len(body)} ".encode(), hashlib.sha256(body).hexdigest().encode()]

    flood = bytes(range(256)) * (FLOOD // 256)
    st = ServerThread(app, backend, threads=2, body_timeout=60)
    try:
        with st.connect(timeout=STALL) as s:
            s.sendall(post(FLOOD, "/hold"))
            assert entered.wait(5), "the app call never started"
            view = memoryview(flood)
            sent = 0
            try:
                while sent < FLOOD:
                    sent += s.send(view[sent : sent + (1 << 20)])
            except TimeoutError:
                pass
            assert sent < FLOOD, "the server took the whole flood in while the app was blocked"
            release.set()
            s.settimeout(60)
            s.sendall(view[sent:])
            resp = Reader(s, 60).read_response()
            assert resp.status == 200
            assert resp.body == f"{FLOOD} {hashlib.sha256(flood).hexdigest()}".encode()
            resp, _ = request(s, get("/after"))
            assert resp.body == f"0 {hashlib.sha256(b'').hexdigest()}".encode()
    finally:
        release.set()
        st.stop()
    assert not st.errors, st.errors
    if backend == "on":
        stats = st.server.ring_stats
        assert stats is not None and stats["input_pauses"] >= 1, stats


def _eventfd_count(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as info:
        for line in info:
            if line.startswith("eventfd-count:"):
                return int(line.split(":", 1)[1], 16)
    raise AssertionError(f"fd {fd} shows no eventfd-count")


@pytest.mark.needs_hotpath
def test_app_threads_wake_the_ring_through_an_eventfd() -> None:
    # The ring thread alone enters the ring (SINGLE_ISSUER); app threads only write the
    # eventfd the ring polls, and the ring never reads it, so its count is the wake-ups.
    threads_seen: set[int] = set()

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        threads_seen.add(threading.get_ident())
        start_response("200 OK", [])
        return [b"ok"]

    before = fds_linking(os.getpid(), EVENTFD_LINK)
    st = ServerThread(app, "on", threads=4)
    try:
        assert st.server.backend == "io_uring"
        requests_sent = 20
        with st.connect() as sock:
            reader = Reader(sock)
            for _ in range(requests_sent):
                sock.sendall(get())
                resp = reader.read_response()
                assert (resp.status, resp.body) == (200, b"ok")
        new = sorted(fds_linking(os.getpid(), EVENTFD_LINK) - before)
        assert len(new) == 1, f"expected the pool's one eventfd, found {new}"
        # One request at a time: each finished turn found nothing waiting, so rang once.
        assert _eventfd_count(new[0]) >= requests_sent
        assert threads_seen and st.thread.ident not in threads_seen, "ran on the ring thread"
    finally:
        st.stop()
    assert not st.errors, st.errors

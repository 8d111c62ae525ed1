"""The native io_uring serve loop: one enter per batch, buffers recycled at once, and the
ring's counters after serving. (Behaviour shared with epoll is tested on both backends.)"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Any

import pytest

import uringserve
from server_util import Reader, ServerThread, hello_app

pytestmark = pytest.mark.needs_hotpath


def test_pipelined_batch_costs_a_few_enters_not_one_per_request() -> None:
    st = ServerThread(hello_app, "on")
    try:
        with st.connect() as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 64)
            reader = Reader(s)
            for _ in range(64):
                assert reader.read_response().body == b"hello"
    finally:
        st.stop()
    stats = st.server.ring_stats
    assert stats is not None
    # accept, recv, send, wake-up and teardown: a handful of enters for 64 requests, and
    # the 64 responses leave in one or two sends.
    assert stats["enters"] <= 12, stats
    assert stats["sends"] <= 3, stats
    assert stats["accepts"] == 1
    # The GIL is taken per batch of ready connections, not per request.
    assert stats["gil_batches"] <= 4, stats


def test_ready_connections_share_one_gil_acquisition() -> None:
    """While one app call holds the loop, 63 other connections send requests; when it
    returns, they are all ready and run in one or two batches, not 63."""
    entered = threading.Event()
    release = threading.Event()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ["PATH_INFO"] == "/hold":
            entered.set()
            release.wait(10)
        return hello_app(environ, start_response)

    st = ServerThread(app, "on")
    try:
        socks = [st.connect() for _ in range(64)]
        try:
            socks[0].sendall(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
            assert entered.wait(10)
            for s in socks[1:]:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            release.set()
            for s in socks:
                assert Reader(s).read_response().body == b"hello"
        finally:
            release.set()
            # Stopped before the clients close, so their EOFs add no batches.
            st.stop()
            for s in socks:
                s.close()
    finally:
        release.set()
        if st.thread.is_alive():
            st.stop()
    stats = st.server.ring_stats
    assert stats is not None
    assert stats["batched_connections"] >= 64
    # One batch for /hold and a few for the 63 that queued behind it (the kernel may post
    # their completions over more than one enter).
    print("batches:", stats["gil_batches"], "for", stats["batched_connections"], "connections")
    assert stats["gil_batches"] <= 8, stats


def test_two_buffers_serve_many_connections() -> None:
    """With 2 receive buffers for 64 busy connections, buffers must be copied out and
    returned at once; the ENOBUFS re-arm path carries the rest without losing a byte."""
    st = ServerThread(hello_app, "on", n_bufs=2, buf_size=4096)
    errors: list[BaseException] = []

    def client() -> None:
        try:
            with st.connect() as s:
                reader = Reader(s)
                for _ in range(20):
                    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 4)
                    for _ in range(4):
                        assert reader.read_response().body == b"hello"
        except BaseException as exc:
            errors.append(exc)

    try:
        threads = [threading.Thread(target=client, daemon=True) for _ in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads), "clients did not finish"
    finally:
        st.stop()
    assert not errors, errors[:3]
    stats = st.server.ring_stats
    assert stats is not None
    assert stats["accepts"] == 64


def test_idle_connections_give_their_working_state_back() -> None:
    """200 keep-alive connections, each served one request at a time and then left idle, share
    a few working states (HTTP state, input buffer, session) instead of holding one each; a
    later request on each gets a state again, answering for its own peer."""

    def port_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        body = environ["REMOTE_PORT"].encode()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]

    st = ServerThread(port_app, "on")
    socks: list[socket.socket] = []
    try:
        for _ in range(200):
            s = st.connect()
            socks.append(s)
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert Reader(s).read_response().body == str(s.getsockname()[1]).encode()
        # Connections that never send anything take no working state either.
        silent = [st.connect() for _ in range(50)]
        socks.extend(silent)
        for s in reversed(socks[:200]):
            s.sendall(b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n")
            assert Reader(s).read_response().body == str(s.getsockname()[1]).encode()
    finally:
        st.stop()
        for s in socks:
            s.close()
    stats = st.server.ring_stats
    assert stats is not None
    assert stats["accepts"] == 250
    # One request at a time: every turn finds a state the last one gave back.
    assert stats["working_states"] <= 4, stats


def test_closed_connections_leave_their_working_state_to_the_next() -> None:
    """One connection after another, each closed after its request (by the server, by the
    client, or broken mid-request): each starts from the state the last one left."""
    st = ServerThread(hello_app, "on")
    try:
        for i in range(150):
            with st.connect() as s:
                reader = Reader(s)
                if i % 3 == 0:
                    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    assert reader.read_response().body == b"hello"
                    assert reader.at_eof()
                elif i % 3 == 1:
                    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    assert reader.read_response().body == b"hello"
                else:
                    s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    finally:
        st.stop()
    stats = st.server.ring_stats
    assert stats is not None
    assert stats["accepts"] == 150
    # A few at once at most (a close may still be under way when the next request comes),
    # where a state per connection would be 150.
    assert stats["working_states"] <= 8, stats


def test_the_serving_thread_releases_the_gil_while_idle() -> None:
    st = ServerThread(hello_app, "on")
    try:
        with st.connect() as s:
            Reader(s)  # connected and idle: the server now waits in the kernel
            counted = 0
            stop = threading.Event()
            timer = threading.Timer(0.2, stop.set)
            timer.start()
            for _ in range(100_000_000):
                if stop.is_set():
                    break
                counted += 1
            timer.join()
        # A server holding the GIL while waiting would starve this loop (and the timer).
        assert counted > 1000
    finally:
        st.stop()


def test_server_created_on_one_thread_refuses_to_serve_on_another() -> None:
    app = uringserve._uringserve.WsgiApp(hello_app, "127.0.0.1", 0)
    listener = socket.create_server(("127.0.0.1", 0))
    wake_r, wake_w = socket.socketpair()
    try:
        native = uringserve._uringserve.UringServer(app, listener, wake_r)
        failures: list[BaseException] = []

        def serve_elsewhere() -> None:
            try:
                native.serve(lambda: True)
            except BaseException as exc:
                failures.append(exc)

        t = threading.Thread(target=serve_elsewhere)
        t.start()
        t.join(10)
        assert len(failures) == 1
        assert isinstance(failures[0], uringserve.WrongThreadError)
    finally:
        listener.close()
        wake_r.close()
        wake_w.close()

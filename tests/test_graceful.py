"""Graceful stop on both backends: idle keep-alive connections close at once, requests in
flight finish (answered with Connection: close), the rest closes at the graceful timeout;
SIGTERM under load fails no request the server took; SIGQUIT stops at once."""

from __future__ import annotations

import signal
import socket
import time
from collections import Counter
from pathlib import Path

import pytest

from proc_util import Load, ServerProcess, taken_ids
from server_util import Reader, ServerThread, get, hello_app, request, wait_until


def _serving_in(st: ServerThread) -> None:
    """Waits until the server answers, so the stop meets a running loop."""
    with st.connect() as s:
        resp, _ = request(s, get(extra="Connection: close\r\n"))
        assert resp.status == 200


def _answered_last(st: ServerThread, sock: socket.socket) -> None:
    """The draining server answers sock's request (hello_app's) with Connection: close,
    closes it, and then serve_forever() returns."""
    reader = Reader(sock)
    resp = reader.read_response()
    assert resp.status == 200 and resp.body == b"hello"
    assert resp.header("Connection") == "close"
    assert reader.at_eof(timeout=5)
    st.thread.join(10)
    assert not st.thread.is_alive(), "serve_forever() did not return once drained"


def test_graceful_shutdown_closes_idle_and_finishes_requests_in_flight(backend: str) -> None:
    st = ServerThread(hello_app, backend)
    try:
        _serving_in(st)
        idle = st.connect()
        resp, idle_reader = request(idle, get())  # keep-alive, now idle between requests
        assert resp.status == 200 and resp.header("Connection") is None
        busy = st.connect()
        busy.sendall(b"GET /late HTTP/1.1\r\nHost: x\r\n")  # half a request head: in flight
        st.server.shutdown(wait=False, graceful=True)
        assert idle_reader.at_eof(timeout=5), "the idle keep-alive connection was not closed"
        assert st.thread.is_alive(), "the server stopped with a request in flight"
        # Not accepted any more: this one waits in the backlog and is reset when the listener
        # closes, however the connections closing meanwhile moved the accept regulation.
        newcomer = st.connect()
        newcomer.sendall(get())
        busy.sendall(b"\r\n")
        _answered_last(st, busy)
        assert not st.errors, st.errors
        idle.close()
        busy.close()
    finally:
        st.stop()
    assert Reader(newcomer).at_eof(timeout=5), "a connection was accepted during the stop"
    newcomer.close()


def test_first_request_sent_while_draining_is_answered_with_close(backend: str) -> None:
    """A connection accepted before the stop but silent until then is not idle (its first
    request may be on its way): that request is answered, with Connection: close. (On
    io_uring such a connection holds no working state until it sends: the one it is lent
    during the stop must refuse keep-alive too.)"""
    st = ServerThread(hello_app, backend)
    try:
        silent = st.connect()
        # Answered on a later connection, so the silent one (ahead in the backlog) was
        # accepted too.
        _serving_in(st)
        witness = st.connect()
        resp, witness_reader = request(witness, get())
        assert resp.status == 200
        st.server.shutdown(wait=False, graceful=True)
        # The idle keep-alive witness closing shows the stop has begun.
        assert witness_reader.at_eof(timeout=5)
        silent.sendall(get())
        _answered_last(st, silent)
        silent.close()
        witness.close()
    finally:
        st.stop()


def test_graceful_timeout_closes_what_is_left(backend: str) -> None:
    st = ServerThread(hello_app, backend, graceful_timeout=0.5)
    try:
        _serving_in(st)
        stuck = st.connect()
        stuck.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never completed
        started = time.monotonic()
        st.server.shutdown(wait=False, graceful=True)
        st.thread.join(10)
        took = time.monotonic() - started
        assert not st.thread.is_alive(), "the graceful timeout did not end the stop"
        assert took >= 0.45, f"stopped after {took:.2f} s, before the graceful timeout"
        assert Reader(stuck).at_eof(timeout=5)
        stuck.close()
        assert not st.errors, st.errors
    finally:
        st.stop()


def test_max_requests_stops_after_that_many(backend: str) -> None:
    st = ServerThread(hello_app, backend, max_requests=3)
    try:
        with st.connect() as s:
            reader = Reader(s)
            headers = []
            for _ in range(3):
                s.sendall(get())
                headers.append(reader.read_response().header("Connection"))
            # The third is the last: it says so, and the connection closes after it.
            assert headers == [None, None, "close"]
            assert reader.at_eof(timeout=5)
        st.thread.join(10)
        assert not st.thread.is_alive(), "serve_forever() did not return at max_requests"
        assert st.server.requests == 3
    finally:
        st.stop()


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_under_load_fails_no_request_it_took(
    backend: str, workers: int, tmp_path: Path
) -> None:
    log = tmp_path / "taken"
    args = ["--io-uring", backend, "--graceful-timeout", "10"]
    if workers:
        args += ["--workers", str(workers)]
    server = ServerProcess(args, env={"LIFECYCLE_LOG": str(log)})
    load = Load(server.port, path="/slow?s=0.02", clients=6, max_requests=5_000)
    try:
        if workers:
            server.booted(workers)
        load.start()
        load.wait_completed(60)
        sent_at = time.monotonic()
        server.send(signal.SIGTERM)
        code = server.wait(timeout=30)
        exit_time = time.monotonic() - sent_at
        load.stop()
    finally:
        load.stop()
        server.close()
    taken = taken_ids(log)
    twice = [rid for rid, n in Counter(taken).items() if n > 1]
    lost = sorted(set(taken) - set(load.completed))
    during_stop = sum(1 for t in load.completed.values() if t >= sent_at)
    print(
        f"\n[graceful-stop figures] backend={backend} workers={workers}: "
        f"completed={len(load.completed)} of which during the stop={during_stop}, "
        f"taken by the app={len(taken)}, failures={len(lost) + len(load.failures)}, "
        f"not taken (refused or closed before the server read them)={len(load.unanswered)}, "
        f"exit code={code}, time to exit={exit_time:.3f} s"
    )
    assert code == 0, server.log()
    assert not load.failures, load.failures
    assert not lost, f"requests the server took but never answered: {lost[:10]}"
    assert not twice, f"requests the app ran twice: {twice[:10]}"
    assert exit_time < 10, "the stop waited for the graceful timeout with nothing in flight"


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_answers_every_request_sent_on_accepted_connections(
    backend: str, workers: int, tmp_path: Path
) -> None:
    """Keep-alive connections the server accepted each carry a request when SIGTERM comes,
    while the app is busy with one of them: every one is answered, then closed."""
    log = tmp_path / "taken"
    args = ["--io-uring", backend]
    if workers:
        args += ["--workers", str(workers)]
    server = ServerProcess(args, env={"LIFECYCLE_LOG": str(log)})
    conns: list[socket.socket] = []
    try:
        if workers:
            server.booted(workers)
        for _ in range(6):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=20)
            conns.append(s)
            resp, _ = request(s, get())  # accepted and served once: a keep-alive connection
            assert resp.status == 200
        conns[0].sendall(b"GET /slow?s=0.5 HTTP/1.1\r\nHost: x\r\nX-Id: 1\r\n\r\n")
        assert wait_until(lambda: taken_ids(log) == [1], timeout=20), server.log()
        # The app is busy with request 1: the others arrive while it runs, then SIGTERM.
        for rid, s in enumerate(conns[1:], 2):
            s.sendall(f"GET /slow?s=0.01 HTTP/1.1\r\nHost: x\r\nX-Id: {rid}\r\n\r\n".encode())
        server.send(signal.SIGTERM)
        for rid, s in enumerate(conns, 1):
            reader = Reader(s, 20)
            resp = reader.read_response()
            assert resp.status == 200, (rid, resp)
            assert reader.at_eof(timeout=10)
        assert server.wait(timeout=30) == 0, server.log()
        assert sorted(taken_ids(log)) == list(range(1, len(conns) + 1))
    finally:
        for s in conns:
            s.close()
        server.close()


def _hanging_request(backend: str, workers: int, log: Path) -> tuple[ServerProcess, socket.socket]:
    """A server (with `workers`, or in one process) whose app is 30 s into a request."""
    args = ["--io-uring", backend, "--graceful-timeout", "60"]
    if workers:
        args += ["--workers", str(workers)]
    server = ServerProcess(args, env={"LIFECYCLE_LOG": str(log)})
    hanging = socket.create_connection(("127.0.0.1", server.port), timeout=40)
    try:
        hanging.sendall(b"GET /slow?s=30 HTTP/1.1\r\nHost: x\r\nX-Id: 1\r\n\r\n")
        assert wait_until(lambda: taken_ids(log) == [1], timeout=20), server.log()
    except BaseException:
        hanging.close()
        server.close()
        raise
    return server, hanging


@pytest.mark.parametrize("workers", [0, 1])
def test_sigquit_stops_at_once(backend: str, workers: int, tmp_path: Path) -> None:
    """A request that would take 30 s is in the app; SIGQUIT does not wait for it."""
    server, hanging = _hanging_request(backend, workers, tmp_path / "taken")
    try:
        started = time.monotonic()
        server.send(signal.SIGQUIT)
        code = server.wait(timeout=20)
        took = time.monotonic() - started
        assert code == 0, server.log()
        assert took < 10, f"SIGQUIT took {took:.1f} s"
        assert Reader(hanging).at_eof(timeout=5), "the request in flight was not cut off"
    finally:
        hanging.close()
        server.close()


@pytest.mark.parametrize("workers", [0, 1])
def test_sigquit_cuts_a_graceful_stop_short(backend: str, workers: int, tmp_path: Path) -> None:
    server, hanging = _hanging_request(backend, workers, tmp_path / "taken")
    try:
        server.send(signal.SIGTERM)
        server.wait_for(r"stopping gracefully")
        # The graceful stop waits for the 30 s request; SIGQUIT does not.
        assert server.proc.poll() is None
        started = time.monotonic()
        server.send(signal.SIGQUIT)
        assert server.wait(timeout=20) == 0, server.log()
        assert time.monotonic() - started < 10
    finally:
        hanging.close()
        server.close()

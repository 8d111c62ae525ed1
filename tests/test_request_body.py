"""Request bodies on both backends: streamed to the app as it reads, 100 Continue only when
the app asks for the body, and framing errors or disconnects surfaced to the app."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from typing import Any

import uringserve
from server_util import Reader, ServerThread, echo_app, hello_app, post, request, wait_until

StartResponse = Callable[..., Any]
Environ = dict[str, Any]

MIB = 1024 * 1024


def chunked(body: bytes, size: int = 65536) -> bytes:
    parts = [
        b"%x\r\n" % len(body[i : i + size]) + body[i : i + size] + b"\r\n"
        for i in range(0, len(body), size)
    ]
    return b"".join(parts) + b"0\r\n\r\n"


def digest_app(environ: Environ, start_response: StartResponse) -> list[bytes]:
    """Reads the body in 64 KiB pieces and answers with its length and SHA-256."""
    stream = environ["wsgi.input"]
    h = hashlib.sha256()
    total = 0
    for _ in range(1_000_000):
        piece = stream.read(65536)
        if not piece:
            break
        h.update(piece)
        total += len(piece)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"{total} {h.hexdigest()}".encode()]


def test_app_starts_before_the_body_has_arrived(serve: Callable[..., ServerThread]) -> None:
    first_read = threading.Event()
    seen: list[bytes] = []

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        stream = environ["wsgi.input"]
        seen.append(stream.read(5))
        first_read.set()
        rest = stream.read()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(5 + len(rest)).encode()]

    st = serve(app)
    body = os.urandom(MIB)
    with st.connect() as s:
        s.sendall(post(len(body)) + body[:1024])
        # Only a streaming server can run the app while most of the body is still unsent.
        assert wait_until(first_read.is_set), "the app did not run before the body was complete"
        s.sendall(body[1024:])
        resp = Reader(s).read_response()
    assert seen == [body[:5]]
    assert resp.status == 200
    assert resp.body == str(len(body)).encode()


def test_10_mib_post_echoes_intact(serve: Callable[..., ServerThread]) -> None:
    st = serve(echo_app)
    body = os.urandom(10 * MIB)
    with st.connect(timeout=30) as s:
        sender = threading.Thread(target=s.sendall, args=(post(len(body)) + body,), daemon=True)
        sender.start()
        resp = Reader(s, timeout=30).read_response()
        sender.join(30)
    assert resp.status == 200
    assert len(resp.body) == len(body)
    assert resp.body == body


def test_10_mib_chunked_post_streams_through_read_n(serve: Callable[..., ServerThread]) -> None:
    st = serve(digest_app)
    body = os.urandom(10 * MIB)
    wire = post(None, extra="Transfer-Encoding: chunked\r\n") + chunked(body, 100_000)
    with st.connect(timeout=30) as s:
        sender = threading.Thread(target=s.sendall, args=(wire,), daemon=True)
        sender.start()
        resp = Reader(s, timeout=30).read_response()
        sender.join(30)
    assert resp.status == 200
    assert resp.body == f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode()


def test_readline_and_iteration_stream_lines(serve: Callable[..., ServerThread]) -> None:
    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        stream = environ["wsgi.input"]
        first = stream.readline()
        limited = stream.readline(3)
        rest = list(stream)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [repr([first, limited, rest]).encode()]

    st = serve(app)
    lines = [b"first\n", b"abcdef\n"] + [b"x" * 5000 + b"\n"] * 40 + [b"tail"]
    body = b"".join(lines)
    with st.connect() as s:
        s.sendall(post(len(body)))
        for i in range(0, len(body), 7000):
            s.sendall(body[i : i + 7000])
        resp = Reader(s).read_response()
    expected = [b"first\n", b"abc", [b"def\n"] + [b"x" * 5000 + b"\n"] * 40 + [b"tail"]]
    assert resp.body == repr(expected).encode()


def test_100_continue_is_sent_when_the_app_reads_the_body(
    serve: Callable[..., ServerThread],
) -> None:
    st = serve(echo_app)
    with st.connect() as s:
        s.sendall(post(11, extra="Expect: 100-continue\r\n"))
        reader = Reader(s)
        interim = reader.read_response()
        assert interim.status == 100
        s.sendall(b"hello world")
        resp = reader.read_response()
        assert resp.status == 200
        assert resp.body == b"hello world"
        # The exchange completed, so the connection stays usable.
        again, _ = request(s, post(2) + b"ok")
        assert again.body == b"ok"


def test_no_100_continue_when_the_app_ignores_the_body(
    serve: Callable[..., ServerThread],
) -> None:
    st = serve(hello_app)
    with st.connect() as s:
        resp, reader = request(s, post(1000, extra="Expect: 100-continue\r\n"))
        assert resp.status == 200, "the first response must be the final one, not 100"
        assert resp.body == b"hello"
        # The body was never asked for, so the client may or may not send it: the server
        # cannot tell what follows and closes.
        assert resp.header("Connection") == "close"
        assert reader.at_eof(timeout=5.0)


def test_100_continue_follows_earlier_pipelined_responses(
    serve: Callable[..., ServerThread],
) -> None:
    st = serve(echo_app)
    with st.connect() as s:
        s.sendall(post(3) + b"one" + post(3, extra="Expect: 100-continue\r\n"))
        reader = Reader(s)
        first = reader.read_response()
        assert (first.status, first.body) == (200, b"one")
        interim = reader.read_response()
        assert interim.status == 100
        s.sendall(b"two")
        second = reader.read_response()
        assert (second.status, second.body) == (200, b"two")


def test_bad_chunk_size_reaches_the_app_and_the_client_gets_400(
    serve: Callable[..., ServerThread],
) -> None:
    raised: list[BaseException] = []

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        try:
            environ["wsgi.input"].read()
        except Exception as exc:
            raised.append(exc)
            raise
        start_response("200 OK", [])
        return [b"unexpected"]

    st = serve(app)
    with st.connect() as s:
        s.sendall(post(None, extra="Transfer-Encoding: chunked\r\n") + b"5\r\nhello\r\n")
        s.sendall(b"zz\r\n")
        reader = Reader(s)
        resp = reader.read_response()
        assert resp.status == 400
        assert reader.at_eof(timeout=5.0)
    assert len(raised) == 1
    assert isinstance(raised[0], uringserve.InvalidRequestBody)
    assert isinstance(raised[0], ValueError)
    with st.connect() as s:
        resp, _ = request(s, post(2) + b"ok")
    assert resp.status == 200


def test_client_gone_mid_body_raises_client_disconnected(
    serve: Callable[..., ServerThread],
) -> None:
    raised: list[BaseException] = []

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        try:
            body = environ["wsgi.input"].read()
        except Exception as exc:
            raised.append(exc)
            raise
        start_response("200 OK", [])
        return [body]

    st = serve(app)
    with st.connect() as s:
        s.sendall(post(100_000) + b"x" * 10)
        assert wait_until(lambda: st.server is not None)
    assert wait_until(lambda: bool(raised)), "the app's read did not fail"
    assert isinstance(raised[0], uringserve.ClientDisconnected)
    assert isinstance(raised[0], OSError)
    with st.connect() as s:
        resp, _ = request(s, post(2) + b"ok")
    assert (resp.status, resp.body) == (200, b"ok")


def test_unread_small_body_is_drained_for_the_next_request(
    serve: Callable[..., ServerThread],
) -> None:
    st = serve(hello_app)
    with st.connect() as s:
        s.sendall(post(5000))
        s.sendall(b"y" * 5000)
        reader = Reader(s)
        assert reader.read_response().status == 200
        s.sendall(post(2) + b"ok")
        assert reader.read_response().status == 200


def test_stream_kept_past_its_response_reads_nothing_of_the_next_request(
    serve: Callable[..., ServerThread],
) -> None:
    kept: list[Any] = []
    later: list[bytes] = []

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        if kept:
            later.append(kept[0].read())
        else:
            kept.append(environ["wsgi.input"])
        body = environ["wsgi.input"].read()
        start_response("200 OK", [])
        return [body]

    st = serve(app)
    with st.connect() as s:
        first, reader = request(s, post(3) + b"one")
        s.sendall(post(3) + b"two")
        second = reader.read_response()
    assert (first.body, second.body) == (b"one", b"two")
    assert later == [b""]


def test_pipelined_requests_held_back_by_unread_responses_all_get_answered(
    serve: Callable[..., ServerThread],
) -> None:
    """120 pipelined requests for 64 KiB each (7.5 MiB of responses) sent before reading any:
    the server holds requests back while output piles up, then resumes as the client reads."""
    payload = os.urandom(64 * 1024)

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        n = environ["PATH_INFO"].strip("/").encode()
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return [n + b":" + payload]

    st = serve(app)
    count = 120
    wire = b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(count))
    with st.connect(timeout=30) as s:
        s.sendall(wire)
        reader = Reader(s, timeout=30)
        for i in range(count):
            resp = reader.read_response()
            assert resp.status == 200
            assert resp.body == b"%d:" % i + payload


def test_a_client_that_does_not_read_stops_getting_its_requests_answered(
    serve: Callable[..., ServerThread],
) -> None:
    """Pipelined requests for 1 MiB each, none read: once the socket buffers and 1 MiB of
    pending output are full, the app is not called again until the client reads."""
    payload = b"z" * MIB
    calls: list[int] = []

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        calls.append(1)
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return [payload]

    st = serve(app)
    count = 40
    with st.connect(timeout=30) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * count)
        assert wait_until(lambda: len(calls) >= 2)
        # Loopback buffers hold a few MiB; without back-pressure all 40 answers (40 MiB)
        # would be built at once.
        assert not wait_until(lambda: len(calls) >= count, timeout=1.0)
        reader = Reader(s, timeout=30)
        for _ in range(count):
            assert reader.read_response().body == payload
    assert len(calls) == count

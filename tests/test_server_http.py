"""HTTP/1.1 behaviour of uringserve.Server over raw loopback sockets, on both backends."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from server_util import Reader, ServerThread, count_fds, echo_app, get, request, wait_until

StartResponse = Callable[..., Any]
Environ = dict[str, Any]


def hello_app(environ: Environ, start_response: StartResponse) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"Hello, world!"]


def path_app(environ: Environ, start_response: StartResponse) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [environ["PATH_INFO"].encode("latin-1")]


def assert_closed(reader: Reader) -> None:
    assert reader.at_eof(timeout=5.0), "server did not close the connection"


def test_hello_world(serve: Callable[..., ServerThread]) -> None:
    st = serve(hello_app)
    with st.connect() as s:
        resp, _ = request(s, get())
    assert resp.version == "HTTP/1.1"
    assert resp.status == 200
    assert resp.body == b"Hello, world!"
    assert resp.header_all("Content-Length") == ["13"]
    assert len(resp.header_all("Date")) == 1
    assert len(resp.header_all("Server")) == 1


def test_keep_alive_three_requests(serve: Callable[..., ServerThread]) -> None:
    st = serve(path_app)
    with st.connect() as s:
        reader = Reader(s)
        for i in range(3):
            s.sendall(get(f"/r{i}"))
            resp = reader.read_response()
            assert resp.status == 200
            assert resp.body == f"/r{i}".encode()


def test_http10_closes_by_default(serve: Callable[..., ServerThread]) -> None:
    st = serve(hello_app)
    with st.connect() as s:
        resp, reader = request(s, get(version="HTTP/1.0"))
        assert resp.status == 200
        assert resp.body == b"Hello, world!"
        assert_closed(reader)


def test_http10_keep_alive(serve: Callable[..., ServerThread]) -> None:
    st = serve(path_app)
    with st.connect() as s:
        reader = Reader(s)
        for i in range(2):
            s.sendall(get(f"/k{i}", "HTTP/1.0", "Connection: keep-alive\r\n"))
            resp = reader.read_response()
            assert resp.status == 200
            assert resp.body == f"/k{i}".encode()
            assert resp.framing == "length"


def test_connection_close_honoured(serve: Callable[..., ServerThread]) -> None:
    st = serve(hello_app)
    with st.connect() as s:
        resp, reader = request(s, get(extra="Connection: close\r\n"))
        assert resp.status == 200
        assert resp.body == b"Hello, world!"
        assert_closed(reader)


def test_pipelining_64(serve: Callable[..., ServerThread]) -> None:
    st = serve(path_app)
    with st.connect() as s:
        s.sendall(b"".join(get(f"/p{i}") for i in range(64)))
        reader = Reader(s)
        for i in range(64):
            resp = reader.read_response()
            assert resp.status == 200
            assert resp.body == f"/p{i}".encode()


def test_post_content_length_echo(serve: Callable[..., ServerThread]) -> None:
    st = serve(echo_app)
    body = b"x=1&y=" + b"z" * 5000
    raw = (
        b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    with st.connect() as s:
        resp, _ = request(s, raw)
    assert resp.status == 200
    assert resp.body == body


def test_chunked_request_body(serve: Callable[..., ServerThread]) -> None:
    st = serve(echo_app)
    raw = (
        b"POST /echo HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n"
        b'7;a=b;c="d"\r\n, world\r\n'
        b"0\r\nX-Trailer: yes\r\nY-Trailer: also\r\n\r\n"
    )
    with st.connect() as s:
        resp, reader = request(s, raw)
        assert resp.status == 200
        assert resp.body == b"hello, world"
        # The connection stays usable after the trailers.
        s.sendall(b"POST /again HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok")
        assert reader.read_response().body == b"ok"


def test_head_no_body(serve: Callable[..., ServerThread]) -> None:
    st = serve(hello_app)
    with st.connect() as s:
        s.sendall(b"HEAD / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        reader = Reader(s)
        resp = reader.read_response(head=True)
        assert resp.status == 200
        assert resp.header("Content-Length") == "13"
        # Next response must start right away: no body bytes were sent for HEAD.
        s.sendall(get("/"))
        nxt = reader.read_response()
        assert nxt.status == 200
        assert nxt.body == b"Hello, world!"


def test_app_content_length_used(serve: Callable[..., ServerThread]) -> None:
    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Length", "10")])
        return iter([b"01234", b"56789"])

    st = serve(app)
    with st.connect() as s:
        resp, _ = request(s, get())
    assert resp.header_all("Content-Length") == ["10"]
    assert resp.header("Transfer-Encoding") is None
    assert resp.body == b"0123456789"


def test_single_element_list_computes_length(serve: Callable[..., ServerThread]) -> None:
    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"abcdefg"]

    st = serve(app)
    with st.connect() as s:
        resp, _ = request(s, get())
    assert resp.header_all("Content-Length") == ["7"]
    assert resp.framing == "length"
    assert resp.body == b"abcdefg"


def gen_app(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    yield b"one,"
    yield b"two,"
    yield b"three"


def test_generator_chunked_on_11(serve: Callable[..., ServerThread]) -> None:
    st = serve(gen_app)
    with st.connect() as s:
        resp, reader = request(s, get())
        assert resp.header("Transfer-Encoding") == "chunked"
        assert resp.header("Content-Length") is None
        assert resp.framing == "chunked"
        assert resp.body == b"one,two,three"
        s.sendall(get())
        assert reader.read_response().body == b"one,two,three"


def test_generator_close_delimited_on_10(serve: Callable[..., ServerThread]) -> None:
    st = serve(gen_app)
    with st.connect() as s:
        resp, reader = request(s, get(version="HTTP/1.0"))
        assert resp.header("Transfer-Encoding") is None
        assert resp.header("Content-Length") is None
        assert resp.framing == "close"
        assert resp.body == b"one,two,three"
        assert_closed(reader)


def test_app_date_server_not_duplicated(serve: Callable[..., ServerThread]) -> None:
    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        start_response(
            "200 OK",
            [("Date", "Thu, 01 Jan 1970 00:00:00 GMT"), ("Server", "custom/1.0")],
        )
        return [b"ok"]

    st = serve(app)
    with st.connect() as s:
        resp, _ = request(s, get())
    assert resp.header_all("Date") == ["Thu, 01 Jan 1970 00:00:00 GMT"]
    assert resp.header_all("Server") == ["custom/1.0"]


def test_request_line_too_long_431(serve: Callable[..., ServerThread]) -> None:
    st = serve(hello_app)
    with st.connect() as s:
        resp, _ = request(s, get("/" + "a" * (9 * 1024)))
    assert resp.status == 431


def test_too_many_headers_431(serve: Callable[..., ServerThread]) -> None:
    st = serve(hello_app)
    extra = "".join(f"X-H{i}: v\r\n" for i in range(101))
    with st.connect() as s:
        resp, _ = request(s, get(extra=extra))
    assert resp.status == 431


def expect_400_and_close(st: ServerThread, raw: bytes) -> None:
    with st.connect() as s:
        resp, reader = request(s, raw)
        assert resp.status == 400
        assert_closed(reader)


def test_malformed_request_line_400(serve: Callable[..., ServerThread]) -> None:
    expect_400_and_close(serve(hello_app), b"THIS IS NOT HTTP\r\n\r\n")


def test_bare_lf_400(serve: Callable[..., ServerThread]) -> None:
    expect_400_and_close(serve(hello_app), b"GET / HTTP/1.1\nHost: localhost\n\n")


def test_obs_fold_400(serve: Callable[..., ServerThread]) -> None:
    raw = b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Folded: a\r\n  b\r\n\r\n"
    expect_400_and_close(serve(hello_app), raw)


def test_content_length_and_transfer_encoding_400(serve: Callable[..., ServerThread]) -> None:
    raw = (
        b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    expect_400_and_close(serve(echo_app), raw)


def test_disagreeing_content_length_400(serve: Callable[..., ServerThread]) -> None:
    raw = (
        b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n"
        b"Content-Length: 6\r\n\r\nhello!"
    )
    expect_400_and_close(serve(echo_app), raw)


def test_non_numeric_content_length_400(serve: Callable[..., ServerThread]) -> None:
    raw = b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: abc\r\n\r\n"
    expect_400_and_close(serve(echo_app), raw)


def test_invalid_chunk_size_400(serve: Callable[..., ServerThread]) -> None:
    raw = (
        b"POST / HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\nhello\r\n0\r\n\r\n"
    )
    expect_400_and_close(serve(echo_app), raw)


def test_transfer_encoding_gzip_400(serve: Callable[..., ServerThread]) -> None:
    raw = b"POST / HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: gzip\r\n\r\nabc"
    expect_400_and_close(serve(echo_app), raw)


def test_body_over_max_body_size_413(serve: Callable[..., ServerThread]) -> None:
    st = serve(echo_app, max_body_size=1024)
    body = b"b" * 2048
    raw = b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2048\r\n\r\n" + body
    with st.connect() as s:
        resp, _ = request(s, raw)
    assert resp.status == 413


def environ_app(seen: list[Environ]) -> Callable[[Environ, StartResponse], list[bytes]]:
    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        snapshot = dict(environ)
        snapshot["_body"] = environ["wsgi.input"].read()
        seen.append(snapshot)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    return app


def test_absolute_form_target(serve: Callable[..., ServerThread]) -> None:
    seen: list[Environ] = []
    st = serve(environ_app(seen))
    with st.connect() as s:
        resp, _ = request(s, b"GET http://example.com/abs/path?q=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert resp.status == 200
    assert seen[0]["PATH_INFO"] == "/abs/path"
    assert seen[0]["QUERY_STRING"] == "q=1"


def test_keep_alive_requests_reuse_their_peer_strings(serve: Callable[..., ServerThread]) -> None:
    """REMOTE_PORT is made once per connection, not per request, even though the connection
    rests between its requests (on io_uring its working state goes back to a pool)."""
    seen: dict[str, list[Any]] = {}

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        seen.setdefault(environ["PATH_INFO"], []).append(environ["REMOTE_PORT"])
        return hello_app(environ, start_response)

    st = serve(app)
    with st.connect() as a, st.connect() as b:
        for _ in range(3):
            for path, s in (("/a", a), ("/b", b)):
                resp, _ = request(s, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                assert resp.status == 200
        ports = {"/a": str(a.getsockname()[1]), "/b": str(b.getsockname()[1])}
    for path, strings in seen.items():
        assert strings[0] == ports[path]
        assert all(s is strings[0] for s in strings), path


def test_environ_keys_follow_each_request(serve: Callable[..., ServerThread]) -> None:
    """Requests that differ in method, query, version, body and headers, one after the other
    on the same server: each environ says what its own request said, nothing from another."""
    seen: list[dict[str, Any]] = []

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        keys = ("REQUEST_METHOD", "QUERY_STRING", "SERVER_PROTOCOL", "PATH_INFO", "RAW_URI")
        entry = {k: environ[k] for k in keys}
        entry["body"] = environ["wsgi.input"].read()
        entry["headers"] = sorted(k for k in environ if k.startswith("HTTP_"))
        seen.append(entry)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    st = serve(app)
    requests = [
        b"POST /a%20b?x=1 HTTP/1.1\r\nHost: h\r\nX-One: 1\r\nContent-Length: 3\r\n\r\nabc",
        b"GET /c HTTP/1.0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\n\r\n",
        b"DELETE /a%20b?x=1 HTTP/1.1\r\nHost: h\r\n\r\n",
    ]
    for raw in requests:
        with st.connect() as s:
            resp, _ = request(s, raw)
            assert resp.status == 200
    assert seen == [
        {
            "REQUEST_METHOD": "POST",
            "QUERY_STRING": "x=1",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "PATH_INFO": "/a b",
            "RAW_URI": "/a%20b?x=1",
            "body": b"abc",
            "headers": ["HTTP_HOST", "HTTP_X_ONE"],
        },
        {
            "REQUEST_METHOD": "GET",
            "QUERY_STRING": "",
            "SERVER_PROTOCOL": "HTTP/1.0",
            "PATH_INFO": "/c",
            "RAW_URI": "/c",
            "body": b"",
            "headers": [],
        },
        {
            "REQUEST_METHOD": "GET",
            "QUERY_STRING": "",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "PATH_INFO": "/",
            "RAW_URI": "/",
            "body": b"",
            "headers": ["HTTP_HOST"],
        },
        {
            "REQUEST_METHOD": "DELETE",
            "QUERY_STRING": "x=1",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "PATH_INFO": "/a b",
            "RAW_URI": "/a%20b?x=1",
            "body": b"",
            "headers": ["HTTP_HOST"],
        },
    ]


def test_environ_completeness(serve: Callable[..., ServerThread]) -> None:
    seen: list[Environ] = []
    st = serve(environ_app(seen))
    raw = (
        b"POST /caf%C3%A9/x?a=1&b=%20 HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: text/plain\r\nContent-Length: 4\r\n"
        b"X-Multi: one\r\nx-multi: two\r\nUser-Agent: test-agent\r\nX-MULTI: three\r\n\r\nbody"
    )
    with st.connect() as s:
        resp, _ = request(s, raw)
        local_port = s.getsockname()[1]
    assert resp.status == 200
    env = seen[0]
    _host, port = st.address
    assert env["REQUEST_METHOD"] == "POST"
    assert env["SCRIPT_NAME"] == ""
    assert env["PATH_INFO"] == "/caf\xc3\xa9/x"
    assert env["QUERY_STRING"] == "a=1&b=%20"
    assert env["CONTENT_TYPE"] == "text/plain"
    assert env["CONTENT_LENGTH"] == "4"
    assert isinstance(env["SERVER_NAME"], str) and env["SERVER_NAME"]
    assert env["SERVER_PORT"] == str(port)
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert env["REMOTE_ADDR"] == "127.0.0.1"
    assert str(env["REMOTE_PORT"]) == str(local_port)
    assert env["HTTP_X_MULTI"] == "one,two,three"
    assert env["HTTP_USER_AGENT"] == "test-agent"
    assert env["HTTP_HOST"] == "localhost"
    assert "HTTP_CONTENT_TYPE" not in env
    assert "HTTP_CONTENT_LENGTH" not in env
    assert env["wsgi.version"] == (1, 0)
    assert env["wsgi.url_scheme"] == "http"
    assert hasattr(env["wsgi.input"], "read")
    assert hasattr(env["wsgi.errors"], "write")
    assert env["_body"] == b"body"


def test_app_exception_500_then_serves(serve: Callable[..., ServerThread]) -> None:
    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        if environ["PATH_INFO"] == "/boom":
            raise RuntimeError("boom")
        return hello_app(environ, start_response)

    st = serve(app)
    with st.connect() as s:
        resp, _ = request(s, get("/boom"))
        assert resp.status == 500
    with st.connect() as s:
        resp, _ = request(s, get("/"))
        assert resp.status == 200
        assert resp.body == b"Hello, world!"


def test_no_start_response_500(serve: Callable[..., ServerThread]) -> None:
    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        return [b"never started"]

    st = serve(app)
    with st.connect() as s:
        resp, _ = request(s, get())
    assert resp.status == 500


def test_bad_request_isolated(serve: Callable[..., ServerThread]) -> None:
    st = serve(path_app)
    with st.connect() as good, st.connect() as bad:
        good_reader = Reader(good)
        good.sendall(get("/before"))
        assert good_reader.read_response().body == b"/before"
        resp, bad_reader = request(bad, b"BROKEN\r\n\r\n")
        assert resp.status == 400
        assert_closed(bad_reader)
        good.sendall(get("/after"))
        assert good_reader.read_response().body == b"/after"


def test_survives_garbage_connections(serve: Callable[..., ServerThread]) -> None:
    st = serve(hello_app)
    for i in range(50):
        with st.connect() as s:
            s.sendall(bytes((i * 7 + j) % 256 for j in range(64 + i)))
    with st.connect() as s:
        resp, _ = request(s, get())
    assert resp.status == 200
    assert resp.body == b"Hello, world!"


def test_no_fd_leak(serve: Callable[..., ServerThread]) -> None:
    st = serve(hello_app)
    with st.connect() as s:  # warm up: lazily created resources are not a leak
        request(s, get())
    before = count_fds()
    for _ in range(100):
        with st.connect() as s:
            resp, reader = request(s, get(extra="Connection: close\r\n"))
            assert resp.status == 200
            assert_closed(reader)
    slack = 3
    assert wait_until(lambda: count_fds() <= before + slack), (
        f"fds before={before}, after={count_fds()}"
    )


def test_concurrent_clients(serve: Callable[..., ServerThread]) -> None:
    st = serve(path_app)
    results: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def client(n: int) -> None:
        try:
            with st.connect() as s:
                resp, _ = request(s, get(f"/c{n}"))
                results[n] = resp.body
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 8
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not errors, errors
    assert results == {n: f"/c{n}".encode() for n in range(8)}


def test_connection_reset_mid_request(serve: Callable[..., ServerThread]) -> None:
    st = serve(echo_app)
    s = st.connect()
    s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\npartial")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()
    with st.connect() as s2:
        resp, _ = request(s2, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
    assert resp.body == b"hi"

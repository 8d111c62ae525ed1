"""PEP 3333 duties of the server on both backends: the environ's wsgi.* keys, close() on
every path, and what an app exception does before and after the response head."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from server_util import Reader, ServerThread, get, request, wait_until

StartResponse = Callable[..., Any]
Environ = dict[str, Any]


def test_environ_wsgi_keys(serve: Callable[..., ServerThread]) -> None:
    seen: list[Environ] = []

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        seen.append(environ)
        environ["wsgi.errors"].write("written to wsgi.errors\n")
        environ["wsgi.errors"].flush()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    st = serve(app)
    with st.connect() as s:
        resp, _ = request(s, get())
    assert resp.status == 200
    env = seen[0]
    assert env["wsgi.version"] == (1, 0)
    assert env["wsgi.url_scheme"] == "http"
    assert env["wsgi.multithread"] is False
    assert env["wsgi.multiprocess"] is False
    assert env["wsgi.run_once"] is False
    assert env["wsgi.input_terminated"] is True
    assert callable(env["wsgi.file_wrapper"])
    for key in ("REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "SERVER_NAME"):
        assert type(env[key]) is str, key


class Tracked:
    """A response iterable that records close() and can fail part-way."""

    def __init__(self, closed: list[str], name: str, fail_after: int | None = None) -> None:
        self.closed = closed
        self.name = name
        self.fail_after = fail_after

    def __iter__(self) -> Iterator[bytes]:
        for i in range(3):
            if self.fail_after is not None and i == self.fail_after:
                raise RuntimeError(f"{self.name} failed while iterating")
            yield b"part%d;" % i

    def close(self) -> None:
        self.closed.append(self.name)


def test_close_is_called_on_every_path(serve: Callable[..., ServerThread]) -> None:
    closed: list[str] = []

    def app(environ: Environ, start_response: StartResponse) -> Tracked:
        path = environ["PATH_INFO"]
        if path != "/no-start":
            start_response("200 OK", [("Content-Type", "text/plain")])
        fail_after = {"/fail-first": 0, "/fail-later": 1}.get(path)
        return Tracked(closed, path, fail_after)

    st = serve(app)
    for path in ("/ok", "/fail-first", "/fail-later", "/no-start"):
        with st.connect() as s:
            s.sendall(get(path))
            reader = Reader(s)
            if path == "/fail-later":
                # The head went out before the failure: all the server can do is close.
                reader.read_to_eof(deadline=reader.timeout + time.monotonic())
            else:
                resp = reader.read_response()
                assert resp.status == (200 if path == "/ok" else 500), path
    assert wait_until(lambda: len(closed) == 4)
    assert sorted(closed) == ["/fail-first", "/fail-later", "/no-start", "/ok"]


def test_exception_before_head_is_500_with_traceback_logged(
    serve: Callable[..., ServerThread], server_errors: list[logging.LogRecord]
) -> None:
    class Boom(Exception):
        pass

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        if environ["PATH_INFO"] == "/boom":
            raise Boom("kaboom")
        start_response("200 OK", [])
        return [b"fine"]

    st = serve(app)
    with st.connect() as s:
        resp, _ = request(s, get("/boom"))
        assert resp.status == 500
        assert b"kaboom" not in resp.body, "the traceback must not reach the client"
    assert wait_until(lambda: len(server_errors) == 1)
    record = server_errors[0]
    assert record.name == "uringserve.error"
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None and record.exc_info[0] is Boom
    assert "GET /boom" in record.getMessage()
    with st.connect() as s:
        resp, _ = request(s, get("/"))
    assert (resp.status, resp.body) == (200, b"fine")


def test_exception_after_head_closes_the_connection(
    serve: Callable[..., ServerThread], server_errors: list[logging.LogRecord]
) -> None:
    def app(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"first chunk"
        if environ["PATH_INFO"] == "/late":
            raise ValueError("late failure")
        yield b"second chunk"

    st = serve(app)
    with st.connect() as s:
        s.sendall(get("/late"))
        reader = Reader(s)
        data = reader.read_to_eof(deadline=time.monotonic() + reader.timeout)
    assert data.startswith(b"HTTP/1.1 200 OK")
    assert b"first chunk" in data
    # The chunked body never got its last chunk: the client can tell the response is cut.
    assert not data.endswith(b"0\r\n\r\n")
    assert wait_until(lambda: len(server_errors) == 1)
    exc_info = server_errors[0].exc_info
    assert exc_info is not None and exc_info[0] is ValueError
    with st.connect() as s:
        resp, _ = request(s, get("/"))
    assert resp.body == b"first chunksecond chunk"


def test_start_response_and_write_belong_to_their_request(
    serve: Callable[..., ServerThread],
) -> None:
    """An app may keep start_response and write() past its request (PEP 3333 does not forbid
    it); calling them later must not change the response of a later request."""
    kept: list[tuple[Callable[..., Any], Callable[[bytes], None]]] = []

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        path = environ["PATH_INFO"]
        if path == "/keep":
            write = start_response("200 OK", [("X-First", "1")])
            write(b"first-")
            kept.append((start_response, write))
            return [b"body"]
        if path == "/stale":
            old_start, old_write = kept[0]
            try:
                old_start("299 Stale", [("X-Stale", "1")])
            except AssertionError:
                pass  # that request had already started its response
            old_write(b"stale")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [path.encode()]

    st = serve(app)
    with st.connect() as s:
        reader = Reader(s)
        s.sendall(get("/keep"))
        first = reader.read_response()
        s.sendall(get("/stale") + get("/plain"))
        stale = reader.read_response()
        plain = reader.read_response()
    assert (first.status, first.header("X-First"), first.body) == (200, "1", b"first-body")
    for resp, body in ((stale, b"/stale"), (plain, b"/plain")):
        assert resp.status == 200, resp
        assert resp.body == body
        assert resp.header("X-First") is None and resp.header("X-Stale") is None

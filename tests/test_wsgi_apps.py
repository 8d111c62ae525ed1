"""Real WSGI apps over loopback on both backends: wsgiref's validator, Flask and Django."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import types
import wsgiref.validate
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import flask
import pytest
import requests

from server_util import Reader, ServerThread, request, wait_until
from uringserve._uringserve import FileWrapper

StartResponse = Callable[..., Any]
Environ = dict[str, Any]
App = Callable[[Environ, StartResponse], Iterable[bytes]]

# The validator reports some problems as warnings; here they fail the request like its asserts.
pytestmark = pytest.mark.filterwarnings("error::wsgiref.validate.WSGIWarning")

CURL = shutil.which("curl")
CURL_TIMEOUT = 20.0
HTTP_TIMEOUT = 10.0
MIB = 1024 * 1024


def _deadline(seconds: float = HTTP_TIMEOUT) -> float:
    return time.monotonic() + seconds


def assert_no_server_errors(records: list[logging.LogRecord]) -> None:
    assert not records, [r.getMessage() for r in records]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    data = os.urandom(MIB)
    path = tmp_path_factory.mktemp("files") / "data.bin"
    path.write_bytes(data)
    return path, data


# --- wsgiref.validate ---------------------------------------------------------------------------


def validated_app(data_path: Path, opened: list[BinaryIO]) -> App:
    """One app, wrapped in wsgiref's validator, with a route per way of using the WSGI API."""

    def text(start_response: StartResponse, body: bytes, status: str = "200 OK") -> list[bytes]:
        start_response(status, [("Content-Type", "text/plain"), ("X-Route", "yes")])
        return [body]

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        route = environ["PATH_INFO"]
        stream = environ["wsgi.input"]
        if route == "/query":
            return text(start_response, environ["QUERY_STRING"].encode("latin-1"))
        if route == "/read-n":
            # The validator insists on read(size); small sizes make many calls.
            parts = []
            for _ in range(100_000):
                part = stream.read(7)
                if not part:
                    break
                parts.append(part)
            return text(start_response, b"".join(parts))
        if route == "/readline":
            first = stream.readline(3)  # a limit shorter than the line
            rest = [stream.readline() for _ in range(3)]
            return text(start_response, b"|".join([first, *rest]))
        if route == "/readlines":
            return text(start_response, b"|".join(stream.readlines()))
        if route == "/iter":
            return text(start_response, b"|".join(line for line in stream))
        if route == "/write":
            environ["wsgi.errors"].write("write() route called\n")
            environ["wsgi.errors"].flush()
            write = start_response("200 OK", [("Content-Type", "text/plain")])
            write(b"written,")
            return [b"returned"]
        if route == "/file":
            f = open(data_path, "rb")  # closed by the server through the wrapper's close()
            opened.append(f)
            start_response("200 OK", [("Content-Type", "application/octet-stream")])
            wrapper: Iterable[bytes] = environ["wsgi.file_wrapper"](f, 4096)
            return wrapper
        if route == "/exc-info":
            # Started a response, then failed before any body went out: replace it.
            start_response("200 OK", [("Content-Type", "text/plain")])
            try:
                raise ValueError("the body could not be built")
            except ValueError:
                start_response(
                    "503 Service Unavailable", [("Content-Type", "text/plain")], sys.exc_info()
                )
            return [b"recovered"]
        if route == "/generator":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return (part for part in (b"gen", b"er", b"ated"))
        return text(start_response, b"not found", "404 Not Found")

    return wsgiref.validate.validator(app)


def post(path: str, body: bytes) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain\r\n"
    return head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body


def test_validator_request_set(
    serve: Callable[..., ServerThread],
    server_errors: list[logging.LogRecord],
    data_file: tuple[Path, bytes],
) -> None:
    path, data = data_file
    opened: list[BinaryIO] = []
    st = serve(validated_app(path, opened))
    lines = b"first line\nsecond line\nthird, without newline"
    body_1000 = bytes(range(256)) * 3 + b"tail" * 63
    with st.connect(timeout=HTTP_TIMEOUT) as s:
        reader = Reader(s, HTTP_TIMEOUT)

        def exchange(raw: bytes, head: bool = False) -> Any:
            s.sendall(raw)
            return reader.read_response(head=head)

        resp = exchange(b"GET /query?a=1&b=two%20words HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert (resp.status, resp.body) == (200, b"a=1&b=two%20words")
        assert resp.header("X-Route") == "yes"

        resp = exchange(post("/read-n", body_1000))
        assert (resp.status, resp.body) == (200, body_1000)

        resp = exchange(post("/readline", lines))
        assert resp.status == 200
        assert resp.body == b"fir|st line\n|second line\n|third, without newline"

        resp = exchange(post("/readlines", lines))
        assert resp.status == 200
        assert resp.body == b"first line\n|second line\n|third, without newline"

        chunked = (
            b"POST /iter HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            b"6\r\nline1\n\r\n8\r\nline2\nli\r\n3\r\nne3\r\n0\r\n\r\n"
        )
        resp = exchange(chunked)
        assert (resp.status, resp.body) == (200, b"line1\n|line2\n|line3")

        got = exchange(b"GET /query?x=yz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        resp = exchange(b"HEAD /query?x=yz HTTP/1.1\r\nHost: localhost\r\n\r\n", head=True)
        assert resp.status == 200
        # The same head as the GET (the validator hides the length, so both are chunked).
        framing = ("Content-Length", "Transfer-Encoding", "Content-Type", "X-Route")
        assert [resp.header(h) for h in framing] == [got.header(h) for h in framing]

        # Bytes left over from a HEAD body would be read as this response's status line.
        resp = exchange(b"GET /write HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert (resp.status, resp.body) == (200, b"written,returned")

        resp = exchange(b"GET /file HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert resp.status == 200
        assert hashlib.sha256(resp.body).digest() == hashlib.sha256(data).digest()

        resp = exchange(b"GET /exc-info HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert (resp.status, resp.body) == (503, b"recovered")

        resp = exchange(b"GET /generator HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert (resp.status, resp.body) == (200, b"generated")
        assert resp.framing == "chunked"

        resp = exchange(b"GET /nowhere HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert (resp.status, resp.body) == (404, b"not found")
    assert len(opened) == 1
    assert wait_until(lambda: opened[0].closed), "the file behind file_wrapper was not closed"
    assert_no_server_errors(server_errors)


def test_validator_catches_a_broken_app(
    serve: Callable[..., ServerThread], server_errors: list[logging.LogRecord]
) -> None:
    """The checks above can fail: a validator assert, or a warning, becomes a logged 500."""

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        start_response(
            "200 OK", [] if environ["PATH_INFO"] == "/untyped" else [("Content-Type", "text/plain")]
        )
        return [b"body"]

    st = serve(wsgiref.validate.validator(app))
    # No Content-Type: an assert in the validator.
    with st.connect() as s:
        resp, _ = request(s, b"GET /untyped HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert resp.status == 500
    # An unknown method: only a WSGIWarning, which this module turns into an error.
    with st.connect() as s:
        resp, _ = request(s, b"PROPFIND / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert resp.status == 500
    assert wait_until(lambda: len(server_errors) == 2)
    kinds = [r.exc_info[0] if r.exc_info else None for r in server_errors]
    assert kinds == [AssertionError, wsgiref.validate.WSGIWarning]


def test_validator_exc_info_after_head_reraises(
    serve: Callable[..., ServerThread], server_errors: list[logging.LogRecord]
) -> None:
    """exc_info once the head is out: start_response re-raises, and the connection closes."""

    class LateError(Exception):
        pass

    def app(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"first part"
        try:
            raise LateError("failed after the head")
        except LateError:
            start_response(
                "500 Internal Server Error", [("Content-Type", "text/plain")], sys.exc_info()
            )
        yield b"never sent"

    st = serve(wsgiref.validate.validator(app))
    with st.connect() as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        reader = Reader(s)
        status_line = reader.read_line(deadline=_deadline())
        assert status_line == b"HTTP/1.1 200 OK"
        rest = reader.read_to_eof(deadline=_deadline())
    assert b"first part" in rest
    assert b"never sent" not in rest
    # No last chunk: the truncated body is visible to the client as a framing error.
    assert not rest.endswith(b"0\r\n\r\n")
    assert wait_until(lambda: len(server_errors) == 1)
    exc_info = server_errors[0].exc_info
    assert exc_info is not None and exc_info[0] is LateError


# --- curl ---------------------------------------------------------------------------------------


@dataclass
class CurlReply:
    status: int
    headers: dict[str, str]
    body: bytes


def _last_header_block(raw: str) -> dict[str, str]:
    # A 100 Continue (or any interim response) comes first in the dump; the final one is last.
    blocks = [b for b in raw.replace("\r\n", "\n").split("\n\n") if b.strip()]
    headers: dict[str, str] = {}
    for line in blocks[-1].splitlines()[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers


def need_curl() -> str:
    if CURL is None:
        pytest.skip("curl is not installed (make test installs it): the curl checks did not run")
    return CURL


def run_curl(args: list[str], timeout: float, stdin: bytes | None = None) -> bytes:
    """Runs curl over HTTP/1.1 with a time limit; returns its stdout (the --write-out text)."""
    cmd = [need_curl(), "--silent", "--show-error", "--http1.1", "--max-time", str(timeout)]
    proc = subprocess.run(
        [*cmd, *args], input=stdin, capture_output=True, timeout=timeout + 5, check=False
    )
    assert proc.returncode == 0, f"curl exited {proc.returncode}: {proc.stderr!r}"
    return proc.stdout


def curl(
    workdir: Path, url: str, *args: str, stdin: bytes | None = None, timeout: float = CURL_TIMEOUT
) -> CurlReply:
    """One transfer with the curl binary, headers and body kept apart."""
    header_file, body_file = workdir / "curl-headers", workdir / "curl-body"
    out = run_curl(
        [
            "--dump-header",
            str(header_file),
            "--output",
            str(body_file),
            "--write-out",
            "%{http_code}",
            *args,
            url,
        ],
        timeout,
        stdin,
    )
    headers = _last_header_block(header_file.read_text("latin-1"))
    return CurlReply(int(out.decode()), headers, body_file.read_bytes())


def curl_reuses_connection(workdir: Path, url: str, timeout: float = CURL_TIMEOUT) -> list[str]:
    """Fetches url twice in one curl run; returns "status connects" per transfer."""
    out = run_curl(
        [
            "--write-out",
            "%{http_code} %{num_connects}\\n",
            "--output",
            str(workdir / "first"),
            "--output",
            str(workdir / "second"),
            url,
            url,
        ],
        timeout,
    )
    return out.decode().split("\n")[:2]


# --- Flask --------------------------------------------------------------------------------------


class Teapot(Exception):
    pass


def make_flask_app(data_path: Path, wrappers: list[object]) -> flask.Flask:
    app = flask.Flask("uringserve_test_flask")

    @app.get("/hello")
    def hello() -> str:
        return "Hello from Flask"

    @app.post("/echo")
    def echo() -> flask.Response:
        payload = flask.request.get_json()
        return flask.jsonify(received=payload, query=flask.request.args.get("q"))

    @app.post("/upload")
    def upload() -> flask.Response:
        blob = flask.request.get_data()
        return flask.jsonify(size=len(blob), sha256=hashlib.sha256(blob).hexdigest())

    @app.get("/file")
    def file() -> flask.Response:
        resp = flask.send_file(data_path, mimetype="application/octet-stream")
        wrappers.append(resp.response)
        return resp

    @app.get("/teapot")
    def teapot() -> str:
        raise Teapot("short and stout")

    @app.errorhandler(Teapot)
    def on_teapot(exc: Teapot) -> tuple[flask.Response, int]:
        return flask.jsonify(error=str(exc)), 418

    return app


@pytest.fixture
def flask_server(
    serve: Callable[..., ServerThread], data_file: tuple[Path, bytes]
) -> tuple[str, list[object]]:
    wrappers: list[object] = []
    st = serve(make_flask_app(data_file[0], wrappers))
    host, port = st.address
    return f"http://{host}:{port}", wrappers


def test_flask_with_requests(
    flask_server: tuple[str, list[object]],
    data_file: tuple[Path, bytes],
    server_errors: list[logging.LogRecord],
) -> None:
    base, wrappers = flask_server
    with requests.Session() as http:
        r = http.get(f"{base}/hello", timeout=HTTP_TIMEOUT)
        assert (r.status_code, r.text) == (200, "Hello from Flask")
        assert r.headers["Content-Type"].startswith("text/html")

        r = http.post(f"{base}/echo?q=x", json={"a": [1, 2], "b": "é"}, timeout=HTTP_TIMEOUT)
        assert r.status_code == 200
        assert r.json() == {"received": {"a": [1, 2], "b": "é"}, "query": "x"}

        blob = os.urandom(300_000)
        r = http.post(f"{base}/upload", data=blob, timeout=HTTP_TIMEOUT)
        assert r.json() == {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}

        r = http.get(f"{base}/missing", timeout=HTTP_TIMEOUT)
        assert r.status_code == 404

        r = http.get(f"{base}/teapot", timeout=HTTP_TIMEOUT)
        assert r.status_code == 418
        assert r.json() == {"error": "short and stout"}

        r = http.get(f"{base}/file", timeout=HTTP_TIMEOUT)
        assert r.status_code == 200
        assert r.headers["Content-Length"] == str(MIB)
        assert r.content == data_file[1]
    # send_file went through our wsgi.file_wrapper, not werkzeug's fallback.
    assert len(wrappers) == 1 and isinstance(wrappers[0], FileWrapper)
    assert_no_server_errors(server_errors)


def test_flask_with_curl(
    flask_server: tuple[str, list[object]],
    data_file: tuple[Path, bytes],
    server_errors: list[logging.LogRecord],
    tmp_path: Path,
) -> None:
    base, _ = flask_server
    r = curl(tmp_path, f"{base}/hello")
    assert (r.status, r.body) == (200, b"Hello from Flask")

    r = curl(
        tmp_path,
        f"{base}/echo?q=c",
        "--header",
        "Content-Type: application/json",
        "--data-binary",
        "@-",
        stdin=b'{"n": 42}',
    )
    assert r.status == 200
    assert json.loads(r.body) == {"received": {"n": 42}, "query": "c"}

    # Over 1 KiB, this curl asks "Expect: 100-continue" before sending the body.
    blob = os.urandom(2 * MIB)
    r = curl(tmp_path, f"{base}/upload", "--data-binary", "@-", stdin=blob)
    assert json.loads(r.body) == {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}

    assert curl(tmp_path, f"{base}/missing").status == 404
    r = curl(tmp_path, f"{base}/teapot")
    assert r.status == 418
    assert json.loads(r.body) == {"error": "short and stout"}

    r = curl(tmp_path, f"{base}/file")
    assert r.status == 200
    assert r.body == data_file[1]

    r = curl(tmp_path, f"{base}/hello", "--head")
    assert r.status == 200
    assert r.headers["content-length"] == str(len(b"Hello from Flask"))

    # The second transfer rides the first one's connection: keep-alive works for curl.
    assert curl_reuses_connection(tmp_path, f"{base}/hello") == ["200 1", "200 0"]
    assert_no_server_errors(server_errors)


# --- Django -------------------------------------------------------------------------------------

DJANGO_URLCONF = "uringserve_test_django_urls"


@pytest.fixture(scope="module")
def django_app(data_file: tuple[Path, bytes]) -> tuple[App, list[BinaryIO]]:
    """A Django project configured in-process: settings, a URLconf module, and the WSGI app."""
    from django.conf import settings
    from django.core.wsgi import get_wsgi_application
    from django.http import FileResponse, HttpRequest, HttpResponse, JsonResponse
    from django.urls import path

    opened: list[BinaryIO] = []

    def hello(request: HttpRequest) -> HttpResponse:
        return HttpResponse("Hello from Django", content_type="text/plain")

    def echo(request: HttpRequest) -> HttpResponse:
        if request.method != "POST":
            return HttpResponse(status=405)
        return JsonResponse({"received": json.loads(request.body), "q": request.GET.get("q")})

    def file(request: HttpRequest) -> FileResponse:
        f = open(data_file[0], "rb")  # FileResponse owns it; closing is checked by the test
        opened.append(f)
        return FileResponse(f, content_type="application/octet-stream")

    def boom(request: HttpRequest) -> HttpResponse:
        raise RuntimeError("a view that fails")

    urls = types.ModuleType(DJANGO_URLCONF)
    urls.urlpatterns = [  # type: ignore[attr-defined]
        path("hello", hello),
        path("echo", echo),
        path("file", file),
        path("boom", boom),
    ]
    sys.modules[DJANGO_URLCONF] = urls
    if not settings.configured:
        settings.configure(
            DEBUG=False,
            SECRET_KEY="uringserve-tests-only",
            ALLOWED_HOSTS=["127.0.0.1", "localhost"],
            ROOT_URLCONF=DJANGO_URLCONF,
            INSTALLED_APPS=[],
            MIDDLEWARE=[],
            USE_TZ=True,
        )
    return get_wsgi_application(), opened


@pytest.fixture
def django_server(
    serve: Callable[..., ServerThread], django_app: tuple[App, list[BinaryIO]]
) -> tuple[str, list[object], list[BinaryIO]]:
    application, opened = django_app
    returned: list[object] = []

    def recording(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        # Django swaps a FileResponse for wsgi.file_wrapper here; remember what it returned.
        result = application(environ, start_response)
        returned.append(result)
        return result

    st = serve(recording)
    host, port = st.address
    opened.clear()
    return f"http://{host}:{port}", returned, opened


def test_django_with_requests(
    django_server: tuple[str, list[object], list[BinaryIO]],
    data_file: tuple[Path, bytes],
    server_errors: list[logging.LogRecord],
) -> None:
    base, returned, opened = django_server
    with requests.Session() as http:
        r = http.get(f"{base}/hello", timeout=HTTP_TIMEOUT)
        assert (r.status_code, r.text) == (200, "Hello from Django")

        r = http.post(f"{base}/echo?q=d", json={"k": ["v", 1]}, timeout=HTTP_TIMEOUT)
        assert r.status_code == 200
        assert r.json() == {"received": {"k": ["v", 1]}, "q": "d"}

        assert http.get(f"{base}/echo", timeout=HTTP_TIMEOUT).status_code == 405
        assert http.get(f"{base}/missing", timeout=HTTP_TIMEOUT).status_code == 404

        r = http.get(f"{base}/boom", timeout=HTTP_TIMEOUT)
        assert r.status_code == 500
        assert "Server Error" in r.text

        returned.clear()
        r = http.get(f"{base}/file", timeout=HTTP_TIMEOUT)
        assert r.status_code == 200
        assert r.content == data_file[1]
    assert len(returned) == 1 and isinstance(returned[0], FileWrapper)
    assert len(opened) == 1
    assert wait_until(lambda: opened[0].closed), "Django's file was not closed"
    assert_no_server_errors(server_errors)


def test_django_with_curl(
    django_server: tuple[str, list[object], list[BinaryIO]],
    data_file: tuple[Path, bytes],
    server_errors: list[logging.LogRecord],
    tmp_path: Path,
) -> None:
    base, _, opened = django_server
    r = curl(tmp_path, f"{base}/hello")
    assert (r.status, r.body) == (200, b"Hello from Django")
    assert r.headers["content-type"] == "text/plain"

    r = curl(
        tmp_path,
        f"{base}/echo?q=curl",
        "--header",
        "Content-Type: application/json",
        "--data-binary",
        "@-",
        stdin=b'{"big": "' + b"y" * 5000 + b'"}',
    )
    assert r.status == 200
    assert json.loads(r.body) == {"received": {"big": "y" * 5000}, "q": "curl"}

    assert curl(tmp_path, f"{base}/missing").status == 404
    assert curl(tmp_path, f"{base}/boom").status == 500

    r = curl(tmp_path, f"{base}/file")
    assert r.status == 200
    assert r.body == data_file[1]
    assert wait_until(lambda: len(opened) == 1 and opened[0].closed)

    assert curl_reuses_connection(tmp_path, f"{base}/hello") == ["200 1", "200 0"]
    assert_no_server_errors(server_errors)

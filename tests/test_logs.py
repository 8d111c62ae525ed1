"""The access log in gunicorn's format language and the error log, on both backends; and
--log-config files (dictConfig JSON, fileConfig ini) routing them, in a real CLI process,
with workers."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import uringserve
from proc_util import TESTS_DIR, ServerProcess, answered_by
from server_util import ServerThread, get, request, wait_until

# [21/Nov/2026:09:13:24 +0000]
TIME = r"\[\d{2}/[A-Z][a-z]{2}/\d{4}:\d{2}:\d{2}:\d{2} [+-]\d{4}\]"


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def access_lines() -> Iterator[list[str]]:
    """Lines logged through "uringserve.access" during the test, from the serving thread."""
    logger = logging.getLogger("uringserve.access")
    handler = _Lines()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def routed_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    path = environ["PATH_INFO"]
    if path == "/missing":
        start_response("404 Not Found", [("Content-Type", "text/html")])
        return [b"<p>nope</p>"]
    if path == "/empty":
        start_response("204 No Content", [])
        return []
    if path == "/boom":
        raise ValueError("the app failed")
    body = environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/plain")])
    # Two chunks without a length: chunked on the wire, yet %(b)s counts the body only.
    return [b"hello", body]


def exchange(st: ServerThread, raw: bytes) -> int:
    with st.connect() as s:
        resp, _ = request(s, raw)
    return resp.status


def test_default_format_is_gunicorns_combined_format(
    serve: Callable[..., ServerThread], access_lines: list[str]
) -> None:
    st = serve(routed_app, access_log=True)
    extra = (
        "User-Agent: probe/1.0\r\nReferer: http://example.test/from\r\n"
        "Authorization: Basic YWxpY2U6c2VjcmV0\r\n"
    )
    assert exchange(st, get("/a%20b?x=1", extra=extra)) == 200
    assert exchange(st, get("/missing")) == 404
    assert wait_until(lambda: len(access_lines) >= 2), access_lines
    assert re.fullmatch(
        rf'127\.0\.0\.1 - alice {TIME} "GET /a%20b\?x=1 HTTP/1\.1" 200 5 '
        r'"http://example\.test/from" "probe/1\.0"',
        access_lines[0],
    ), access_lines[0]
    assert re.fullmatch(
        rf'127\.0\.0\.1 - - {TIME} "GET /missing HTTP/1\.1" 404 11 "-" "-"', access_lines[1]
    ), access_lines[1]


def test_custom_atoms(serve: Callable[..., ServerThread], access_lines: list[str]) -> None:
    fmt = "%(h)s|%(r)s|%(s)s|%(b)s|%(B)s|%(D)s|%({x-trace}i)s|%({content-type}o)s|%(m)s|%(U)s|%(q)s"
    st = serve(routed_app, access_log=True, access_log_format=fmt)
    post = b"POST /echo?k=v HTTP/1.1\r\nHost: x\r\nX-Trace: t-1\r\nContent-Length: 3\r\n\r\nabc"
    assert exchange(st, post) == 200
    assert exchange(st, get("/missing")) == 404
    assert exchange(st, get("/empty")) == 204
    assert wait_until(lambda: len(access_lines) >= 3), access_lines
    rows = [line.split("|") for line in access_lines]
    for row in rows:
        assert len(row) == 11, row
        assert row[0] == "127.0.0.1"
        assert int(row[5]) >= 0  # microseconds
    posted, missing, empty = rows
    assert posted[1:5] == ["POST /echo?k=v HTTP/1.1", "200", "8", "8"]
    assert posted[6:] == ["t-1", "text/plain", "POST", "/echo", "k=v"]
    assert missing[1:5] == ["GET /missing HTTP/1.1", "404", "11", "11"]
    assert missing[6:8] == ["-", "text/html"]
    # No body: %(b)s says "-" as in the common log format, %(B)s says 0.
    assert empty[2:5] == ["204", "-", "0"]


def test_an_app_failure_is_logged_with_the_500_it_got(
    serve: Callable[..., ServerThread],
    access_lines: list[str],
    server_errors: list[logging.LogRecord],
) -> None:
    st = serve(routed_app, access_log=True, access_log_format="%(r)s %(s)s")
    assert exchange(st, get("/boom")) == 500
    assert wait_until(lambda: access_lines == ["GET /boom HTTP/1.1 500"]), access_lines
    assert any("error in WSGI app for GET /boom" in r.getMessage() for r in server_errors)


def test_client_bytes_cannot_forge_a_line(
    serve: Callable[..., ServerThread], access_lines: list[str]
) -> None:
    st = serve(routed_app, access_log=True)
    assert exchange(st, get("/", extra='User-Agent: x" 200 1 "forged\r\n')) == 200
    assert wait_until(lambda: len(access_lines) == 1)
    assert access_lines[0].endswith('"-" "x\\" 200 1 \\"forged"'), access_lines[0]


def test_with_the_access_log_off_nothing_is_logged(
    serve: Callable[..., ServerThread], access_lines: list[str]
) -> None:
    st = serve(routed_app, access_log=False)
    for _ in range(3):
        assert exchange(st, get("/")) == 200
    # The responses are out, and a line is logged before its response is: none will come.
    assert access_lines == []


def test_a_bad_format_is_refused_before_serving() -> None:
    with pytest.raises(ValueError, match=r"unknown atom %\(zz\)s"):
        uringserve.Server(routed_app, port=0, access_log_format="%(h)s %(zz)s")
    done = cli("--access-log-format", "%(h)s 100% %(s)s")
    assert done.returncode == 2
    assert "access log format" in done.stderr and "%%" in done.stderr


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI run to completion (for arguments it refuses before serving)."""
    return subprocess.run(
        [sys.executable, "-m", "uringserve", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(TESTS_DIR),
    )


def test_a_bad_log_config_is_refused(tmp_path: Path) -> None:
    done = cli("--log-config", str(tmp_path / "absent.json"))
    assert done.returncode == 2
    assert "absent.json" in done.stderr and "No such file" in done.stderr
    broken = tmp_path / "broken.json"
    broken.write_text('{"version": 1, "handlers": {"h": {"class": "no.such.Handler"}}}')
    done = cli("--log-config", str(broken))
    assert done.returncode == 2 and "broken.json" in done.stderr, done.stderr
    done = cli("--log-config", str(tmp_path / "logging.yaml"))
    assert done.returncode == 2 and ".json" in done.stderr


def test_log_config_json_sends_every_workers_access_log_to_a_file(
    tmp_path: Path, backend: str
) -> None:
    access = tmp_path / "access.log"
    config = {
        "version": 1,
        "formatters": {"bare": {"format": "%(message)s"}},
        "handlers": {
            "access": {
                "class": "logging.FileHandler",
                "filename": str(access),
                "formatter": "bare",
            },
            "errors": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr"},
        },
        "loggers": {
            "uringserve.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
            "uringserve.error": {"handlers": ["errors"], "level": "INFO", "propagate": False},
        },
    }
    path = tmp_path / "logging.json"
    path.write_text(json.dumps(config))
    server = ServerProcess(
        [
            "--io-uring",
            backend,
            "--workers",
            "2",
            "--reuse-port",
            "--access-log",
            "--log-config",
            str(path),
        ]
    )
    try:
        server.wait_for(r"worker 2 \(pid \d+\) booted", timeout=30)
        server.wait_for(r"worker 1 \(pid \d+\) booted", timeout=30)
        # Until both workers have answered (SO_REUSEPORT spreads connections), bounded.
        pids: set[int] = set()
        sent = 0
        for sent in range(1, 201):
            pids.add(answered_by(server.port, f"/n{sent}"))
            if len(pids) == 2 and sent >= 10:
                break
        assert len(pids) == 2, f"one worker answered all {sent} requests"

        def logged() -> list[str]:
            return access.read_text().splitlines() if access.exists() else []

        assert wait_until(lambda: len(logged()) >= sent), logged()
        lines = logged()
        assert len(lines) == sent
        paths = sorted(int(m.group(1)) for line in lines if (m := re.search(r"GET /n(\d+) ", line)))
        assert paths == list(range(1, sent + 1))
        assert all(
            re.fullmatch(rf'127\.0\.0\.1 - - {TIME} "GET /n\d+ HTTP/1\.1" 200 \d+ "-" "-"', ln)
            for ln in lines
        ), lines
        # The access log went to the file only, not to stderr.
        assert not server.matches(r'"GET /n\d+ HTTP/1\.1"')
    finally:
        server.close()


def test_log_config_ini_routes_the_error_log(tmp_path: Path) -> None:
    errors = tmp_path / "error.log"
    path = tmp_path / "logging.ini"
    path.write_text(
        "[loggers]\nkeys=root,error\n\n"
        "[handlers]\nkeys=file\n\n"
        "[formatters]\nkeys=plain\n\n"
        "[logger_root]\nlevel=WARNING\nhandlers=\n\n"
        "[logger_error]\nlevel=INFO\nhandlers=file\npropagate=0\nqualname=uringserve.error\n\n"
        "[handler_file]\nclass=FileHandler\nformatter=plain\n"
        f"args=({str(errors)!r},)\n\n"
        "[formatter_plain]\nformat=%(levelname)s %(message)s\n"
    )
    server = ServerProcess(["--io-uring", "off", "--log-config", str(path)], expect_startup=False)
    try:

        def startup() -> re.Match[str] | None:
            text = errors.read_text() if errors.exists() else ""
            return re.search(
                r"INFO uringserve \S+ serving http://127\.0\.0\.1:(\d+) on epoll", text
            )

        assert wait_until(lambda: startup() is not None, timeout=30), server.log()
        match = startup()
        assert match is not None
        assert answered_by(int(match.group(1)), "/") == server.pid
        assert "serving" not in server.log()
    finally:
        server.close()

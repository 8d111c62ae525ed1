"""The access log in gunicorn's format language and the error log, on both backends; and
--log-config files (dictConfig JSON, fileConfig ini) routing them, in a real CLI process,
with workers."""

from __future__ import annotations

import codecs
import io
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import uringserve
from proc_util import TESTS_DIR, ServerProcess, answered_by, get_body
from server_util import LogRecords, ServerThread, get, request, wait_until
from uringserve import logs

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


def write_log_config(tmp_path: Path, access: dict[str, Any], access_format: str) -> Path:
    """A logging.json sending uringserve.access to the `access` handler in `access_format`
    and uringserve.error to stderr, neither propagating."""
    config = {
        "version": 1,
        "formatters": {"access": {"format": access_format}},
        "handlers": {
            "access": {**access, "formatter": "access"},
            "errors": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr"},
        },
        "loggers": {
            "uringserve.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
            "uringserve.error": {"handlers": ["errors"], "level": "INFO", "propagate": False},
        },
    }
    path = tmp_path / "logging.json"
    path.write_text(json.dumps(config))
    return path


def test_log_config_json_sends_every_workers_access_log_to_a_file(
    tmp_path: Path, backend: str
) -> None:
    access = tmp_path / "access.log"
    path = write_log_config(
        tmp_path, {"class": "logging.FileHandler", "filename": str(access)}, "%(message)s"
    )
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


# The default access log: the bare combined line, written to fd 2 by the server itself while
# the logger is as logs.default_handlers leaves it, and through logging in every other case.

BARE = re.compile(rf'127\.0\.0\.1 - - {TIME} "GET (/\S*) HTTP/1\.1" 200 2 "-" "-"')


def hello(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hi"]


@pytest.fixture
def default_access() -> Iterator[Callable[[], logging.Logger]]:
    """Puts the access logger as logs.default_handlers leaves it, its handler on fd 2 (which
    pytest captures: read it with capfd); put back as it was after the test.

    Called in the test's body: pytest's logging plugin adds its own handlers to loggers that do
    not propagate when each test phase starts, which would make the logger no longer default.
    """
    logger = logging.getLogger("uringserve.access")
    handlers = [h for h in logger.handlers if not type(h).__module__.startswith("_pytest")]
    filters = logger.filters[:]
    level, propagate, disabled = logger.level, logger.propagate, logger.disabled

    def clear() -> None:
        for h in logger.handlers[:]:
            logger.removeHandler(h)
        for f in logger.filters[:]:
            logger.removeFilter(f)

    def install() -> logging.Logger:
        clear()
        logger.addHandler(logs.AccessStreamHandler(sys.__stderr__))
        logger.setLevel(logging.INFO)
        logger.propagate = False
        logger.disabled = False
        return logger

    try:
        yield install
    finally:
        clear()
        for h in handlers:
            logger.addHandler(h)
        for f in filters:
            logger.addFilter(f)
        logger.setLevel(level)
        logger.propagate, logger.disabled = propagate, disabled


class Fd2:
    """Access lines written to fd 2 (captured by pytest), in order, kept across reads."""

    def __init__(self, capfd: pytest.CaptureFixture[str]) -> None:
        self.capfd = capfd
        self.lines: list[str] = []
        capfd.readouterr()

    def read(self) -> list[str]:
        err = self.capfd.readouterr().err
        self.lines += [ln for ln in err.splitlines() if '"GET /' in ln]
        return self.lines

    def paths(self) -> list[str]:
        """The path of each line; every line must be exactly the bare combined line."""
        found = []
        for line in self.read():
            m = BARE.fullmatch(line)
            assert m, line
            found.append(m.group(1))
        return found


def ask(st: ServerThread, path: str) -> None:
    """One request, answered: its access line, if any, is out before its response."""
    assert exchange(st, get(path)) == 200


def test_default_access_encoding_reads_the_whole_configuration(
    default_access: Callable[[], logging.Logger],
) -> None:
    logger = default_access()
    handler = logger.handlers[0]
    assert isinstance(handler, logs.AccessStreamHandler)
    codec = codecs.lookup(sys.__stderr__.encoding).name
    assert logs.default_access_encoding(logger) == codec
    other = logging.Formatter("%(message)s")
    drop = logging.Filter("nothing")
    changes: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
        ("logger filter", lambda: logger.addFilter(drop), lambda: logger.removeFilter(drop)),
        ("handler filter", lambda: handler.addFilter(drop), lambda: handler.removeFilter(drop)),
        ("logger level", lambda: logger.setLevel("WARNING"), lambda: logger.setLevel("INFO")),
        ("handler level", lambda: handler.setLevel("WARNING"), lambda: handler.setLevel(0)),
        ("disable()", lambda: logging.disable(logging.INFO), lambda: logging.disable(0)),
        ("disabled", lambda: setattr(logger, "disabled", True), lambda: None),
        ("propagate", lambda: setattr(logger, "propagate", True), lambda: None),
        ("formatter", lambda: handler.setFormatter(other), lambda: None),
        ("terminator", lambda: setattr(handler, "terminator", "\r\n"), lambda: None),
        ("stream", lambda: handler.setStream(io.StringIO()), lambda: None),
        ("stdout", lambda: handler.setStream(sys.__stdout__), lambda: None),
        ("second handler", lambda: logger.addHandler(LogRecords()), lambda: None),
        ("no handler", lambda: logger.removeHandler(handler), lambda: None),
        (
            "record factory",
            lambda: logging.setLogRecordFactory(lambda *a, **k: logging.LogRecord(*a, **k)),
            lambda: logging.setLogRecordFactory(logging.LogRecord),
        ),
    ]
    for what, change, undo in changes:
        change()
        try:
            assert logs.default_access_encoding(logger) is None, what
        finally:
            undo()
            # Back to exactly the default state for the next change.
            for h in logger.handlers[:]:
                logger.removeHandler(h)
            handler = logs.AccessStreamHandler(sys.__stderr__)
            logger.addHandler(handler)
            logger.propagate = logger.disabled = False
        assert logs.default_access_encoding(logger) == codec, what
    # A subclass may write differently: logging decides.
    logger.removeHandler(handler)
    logger.addHandler(type("Mine", (logs.AccessStreamHandler,), {})(sys.__stderr__))
    assert logs.default_access_encoding(logger) is None


def test_a_log_config_naming_the_default_handler_keeps_the_default_state(tmp_path: Path) -> None:
    handler = {"class": "uringserve.logs.AccessStreamHandler", "stream": "ext://sys.stderr"}
    config: dict[str, Any] = {
        "handlers": {"access": handler},
        "loggers": {
            "uringserve.access": {"handlers": ["access"], "level": "INFO", "propagate": False}
        },
    }
    probe = (
        "import logging, sys; from uringserve import logs; logs.apply_file(sys.argv[1]); "
        "print(logs.default_access_encoding(logging.getLogger('uringserve.access')))"
    )

    def verdict() -> str:
        path = tmp_path / "logging.json"
        path.write_text(json.dumps(config))
        done = subprocess.run(
            [sys.executable, "-c", probe, str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONIOENCODING": "utf-8"},
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert verdict() == "utf-8"
    handler["formatter"] = "tagged"
    config["formatters"] = {"tagged": {"format": "%(levelname)s %(message)s"}}
    assert verdict() == "None"


def test_the_default_handler_writes_the_bare_line(
    serve: Callable[..., ServerThread],
    default_access: Callable[[], logging.Logger],
    capfd: pytest.CaptureFixture[str],
) -> None:
    default_access()
    fd2 = Fd2(capfd)
    st = serve(hello, access_log=True)
    for path in ("/a", "/b?x=1", "/c"):
        ask(st, path)
    assert fd2.paths() == ["/a", "/b?x=1", "/c"]


@pytest.mark.parametrize("on", ["logger", "handler"])
def test_a_filter_still_decides(
    serve: Callable[..., ServerThread],
    default_access: Callable[[], logging.Logger],
    capfd: pytest.CaptureFixture[str],
    on: str,
) -> None:
    access = default_access()
    fd2 = Fd2(capfd)
    target = access if on == "logger" else access.handlers[0]
    target.addFilter(lambda record: "/drop" not in record.getMessage())
    st = serve(hello, access_log=True)
    for path in ("/keep1", "/drop", "/keep2"):
        ask(st, path)
    assert fd2.paths() == ["/keep1", "/keep2"]


def test_a_users_handler_gets_the_records(
    serve: Callable[..., ServerThread],
    default_access: Callable[[], logging.Logger],
    capfd: pytest.CaptureFixture[str],
) -> None:
    access = default_access()
    fd2 = Fd2(capfd)
    mine = LogRecords()
    access.addHandler(mine)
    st = serve(hello, access_log=True)
    before = time.time()
    for path in ("/one", "/two"):
        ask(st, path)
    after = time.time()
    # The default handler still writes its lines; the user's sees each record whole.
    assert fd2.paths() == ["/one", "/two"]
    assert [r.getMessage() for r in mine.records] == fd2.lines
    for record in mine.records:
        assert record.name == "uringserve.access"
        assert (record.levelno, record.levelname) == (logging.INFO, "INFO")
        assert record.msg == record.getMessage() and record.args == ()
        assert before <= record.created <= after


@pytest.mark.parametrize("how", ["logger level", "handler level", "disable()", "disabled"])
def test_above_info_nothing_is_written(
    serve: Callable[..., ServerThread],
    default_access: Callable[[], logging.Logger],
    capfd: pytest.CaptureFixture[str],
    how: str,
) -> None:
    access = default_access()
    fd2 = Fd2(capfd)
    if how == "logger level":
        access.setLevel(logging.WARNING)
    elif how == "handler level":
        access.handlers[0].setLevel(logging.WARNING)
    elif how == "disabled":
        access.disabled = True
    else:
        logging.disable(logging.INFO)
    try:
        st = serve(hello, access_log=True)
        for path in ("/a", "/b"):
            ask(st, path)
        assert fd2.read() == []
    finally:
        logging.disable(logging.NOTSET)


def test_a_changed_formatter_stream_or_propagation_is_honoured(
    serve: Callable[..., ServerThread],
    default_access: Callable[[], logging.Logger],
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    access = default_access()
    fd2 = Fd2(capfd)
    handler = access.handlers[0]
    assert isinstance(handler, logs.AccessStreamHandler)
    handler.setFormatter(logging.Formatter("A %(levelname)s %(message)s"))
    st = serve(hello, access_log=True)
    ask(st, "/formatted")
    (line,) = fd2.read()
    assert line.startswith("A INFO ") and BARE.fullmatch(line[len("A INFO ") :]), line
    st.stop()

    elsewhere = io.StringIO()
    handler.setFormatter(handler.default_formatter)
    handler.setStream(elsewhere)
    access.propagate = True
    caplog.set_level(logging.INFO)
    st = serve(hello, access_log=True)
    ask(st, "/moved")
    assert fd2.read() == [line]
    assert [BARE.fullmatch(ln) is not None for ln in elsewhere.getvalue().splitlines()] == [True]
    assert [r.getMessage() for r in caplog.records if r.name == "uringserve.access"] == [
        elsewhere.getvalue().rstrip("\n")
    ]


def test_a_change_made_while_serving_governs_later_lines(
    serve: Callable[..., ServerThread],
    default_access: Callable[[], logging.Logger],
    capfd: pytest.CaptureFixture[str],
) -> None:
    access = default_access()
    fd2 = Fd2(capfd)
    st = serve(hello, access_log=True)
    ask(st, "/before")
    assert fd2.paths() == ["/before"]
    mine = LogRecords()
    access.addHandler(mine)
    sent = iter(range(10_000))

    def reaches_mine() -> bool:
        ask(st, f"/after{next(sent)}")
        return bool(mine.records)

    # Within the documented 100 ms; bounded in time and count.
    assert wait_until(reaches_mine, timeout=10)
    ask(st, "/later")
    assert mine.records[-1].getMessage() == fd2.read()[-1]
    assert BARE.fullmatch(fd2.lines[-1]) and "/later " in fd2.lines[-1]

    access.setLevel(logging.WARNING)

    def silent() -> bool:
        n = len(fd2.read())
        ask(st, f"/quiet{next(sent)}")
        return len(fd2.read()) == n

    assert wait_until(silent, timeout=10)
    written, received = len(fd2.read()), len(mine.records)
    for _ in range(3):
        ask(st, "/still-quiet")
    assert (len(fd2.read()), len(mine.records)) == (written, received)


def _app_module(tmp_path: Path, body: str) -> dict[str, str]:
    """An app module `logapp` in tmp_path; the environment a ServerProcess imports it with."""
    (tmp_path / "logapp.py").write_text(body)
    return {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(TESTS_DIR)])}


LOGGING_APP = """
import logging

def app(environ, start_response):
    logging.getLogger("uringserve.error").warning("app saw %s", environ["PATH_INFO"])
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hi"]
"""


def test_cli_default_access_log_is_the_bare_line_after_the_apps_error_line(
    tmp_path: Path, backend: str
) -> None:
    env = _app_module(tmp_path, LOGGING_APP)
    server = ServerProcess(["--io-uring", backend, "--access-log"], env=env, app="logapp:app")
    try:
        paths = [f"/r{i}" for i in range(5)]
        for path in paths:
            assert get_body(server.port, path) == b"hi"
        server.wait_for(r'"GET /r4 ', timeout=10)
        ours = [ln for ln in server.lines if "app saw /r" in ln or '"GET /r' in ln]
        assert len(ours) == 2 * len(paths), server.log()
        for i, path in enumerate(paths):
            error, access = ours[2 * i], ours[2 * i + 1]
            assert re.fullmatch(
                rf"\[[^]]+\] \[uringserve\.error\] WARNING app saw {path}", error
            ), error
            m = BARE.fullmatch(access)
            assert m and m.group(1) == path, access
    finally:
        server.close()


def test_log_config_decides_the_default_handlers_format(tmp_path: Path, backend: str) -> None:
    path = write_log_config(
        tmp_path,
        {"class": "uringserve.logs.AccessStreamHandler", "stream": "ext://sys.stderr"},
        "ACCESS %(levelname)s %(name)s %(message)s",
    )
    env = _app_module(tmp_path, LOGGING_APP)
    server = ServerProcess(
        ["--io-uring", backend, "--access-log", "--log-config", str(path)],
        env=env,
        app="logapp:app",
    )
    try:
        assert get_body(server.port, "/tagged") == b"hi"
        m = server.wait_for(r'"GET /tagged ', timeout=10)
        line = m.string
        prefix = "ACCESS INFO uringserve.access "
        assert line.startswith(prefix) and BARE.fullmatch(line[len(prefix) :]), line
    finally:
        server.close()


def test_a_stderr_in_another_codec_gets_what_logging_would_write(
    tmp_path: Path, backend: str
) -> None:
    env = _app_module(tmp_path, LOGGING_APP)
    env["PYTHONIOENCODING"] = "ascii"
    server = ServerProcess(["--io-uring", backend, "--access-log"], env=env, app="logapp:app")
    try:
        assert get_body(server.port, "/plain") == b"hi"
        assert get_body(server.port, "/caf\u00e9") == b"hi"
        server.wait_for(r'"GET /caf', timeout=10)
        lines = [ln for ln in server.lines if '"GET /' in ln]
        # An ASCII line is written as is; another goes through logging, whose stream
        # escapes what ascii cannot say (errors="backslashreplace" on stderr).
        found = [m.group(1) if (m := BARE.fullmatch(ln)) else ln for ln in lines]
        assert found == ["/plain", "/caf\\xe9"], lines
    finally:
        server.close()


def test_a_filter_that_raises_is_reported_and_the_request_answered(
    serve: Callable[..., ServerThread],
    default_access: Callable[[], logging.Logger],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    access = default_access()
    seen: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)

    def broken(record: logging.LogRecord) -> bool:
        raise ArithmeticError("the filter broke")

    access.addFilter(broken)
    st = serve(hello, access_log=True)
    ask(st, "/x")
    assert wait_until(lambda: bool(seen))
    assert isinstance(seen[0].exc_value, ArithmeticError) and seen[0].object is access

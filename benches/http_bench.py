"""HTTP load comparison: uringserve (io_uring and epoll) against bjoern and granian, in one run.

Every server serves the same WSGI apps (benches/apps.py), alone, single process and single
worker, pinned to core 0 with `taskset -c 0` and bound to a free port on 127.0.0.1; `wrk -t1`
runs pinned to core 1. For each scenario the servers run one after the other, so the figures
of one scenario are taken minutes apart at most and are comparable; between runs they move by
10-20% (see shared/DESIGN.md). Reported for each server and scenario:

- req/s and the p99 latency from wrk's --latency output, with wrk's socket errors and non-2xx
  count, and a correctness check (status and body of pipelined requests) made before the load;
- server CPU time per request: utime+stime of /proc/PID/stat summed over the server's process
  tree, read before and after the wrk run, over the requests wrk completed;
- syscalls per request: a separate pass with `strace -c -f` attached to the server while a
  bounded keep-alive client makes a fixed number of requests of the scenario's shape;
- each figure's ratio to uringserve on io_uring in the same run.

Servers and scenarios are rows of two tables (SERVERS, SCENARIOS) and every result is a plain
dict, written to benches/results/http_bench.{json,md} (quick runs: http_bench_quick.*).

The script installs what it needs: wrk, strace and libev-dev with apt-get when missing, and a
bench venv (benches/.venv) holding pinned bjoern and granian. uringserve runs from the
project's .venv (`make develop`). A server that cannot be installed is reported and skipped.

    make bench                                          # full run, about 5 minutes
    make bench BENCH_ARGS=--quick                       # 2 s per scenario smoke run
    .venv/bin/python benches/http_bench.py --servers uringserve-io_uring,granian \\
        --scenarios hello-c64 --duration 5
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from apps import HELLO_BODY  # benches/ is sys.path[0] when this file runs as a script

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
PROJECT_PY = ROOT / ".venv" / "bin" / "python"
BENCH_VENV = BENCH_DIR / ".venv"
BENCH_PY = BENCH_VENV / "bin" / "python"
RESULTS_DIR = BENCH_DIR / "results"
WRK_SCRIPTS = BENCH_DIR / "wrk"

SERVER_CORE = 0
CLIENT_CORE = 1
HOST = "127.0.0.1"

# Pinned so that runs months apart measure the same peers; DESIGN.md's figures are for these.
BENCH_PACKAGES = {"bjoern": "3.2.2", "granian": "2.8.7"}
# (Debian package, command that proves it is there, or None to ask dpkg)
APT_PACKAGES = (("wrk", "wrk"), ("strace", "strace"), ("libev-dev", None))

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0


class BenchError(Exception):
    """A step of the benchmark failed; the message is what the report shows."""


class NoAnswer(BenchError):
    """The server closed the connection or went quiet: not (yet) serving, as opposed to
    serving wrongly."""


def log(message: str) -> None:
    print(f"[http_bench] {message}", file=sys.stderr, flush=True)


# --- the two tables ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """One load shape. `pipeline` requests go out in each write; `body_size` > 0 makes a POST."""

    name: str
    app: str
    connections: int
    pipeline: int = 1
    body_size: int = 0
    about: str = ""

    def wrk_args(self, url: str) -> list[str]:
        """wrk's script, URL and script arguments for this shape."""
        if self.pipeline > 1:
            return ["-s", str(WRK_SCRIPTS / "pipeline.lua"), url, "--", str(self.pipeline)]
        if self.body_size:
            return ["-s", str(WRK_SCRIPTS / "post.lua"), url, "--", str(self.body_size)]
        # No script at all for plain GETs: wrk then runs without Lua, at its fastest.
        return [url]

    def request(self, port: int) -> bytes:
        """One request as the strace-pass client and the correctness check send it."""
        host = f"Host: {HOST}:{port}\r\n"
        if not self.body_size:
            return f"GET / HTTP/1.1\r\n{host}\r\n".encode()
        head = (
            f"POST / HTTP/1.1\r\n{host}Content-Type: application/octet-stream\r\n"
            f"Content-Length: {self.body_size}\r\n\r\n"
        )
        return head.encode() + self.body()

    def body(self) -> bytes:
        return b"x" * self.body_size  # the same bytes post.lua sends

    def expected_body(self) -> bytes:
        return self.body() if self.body_size else HELLO_BODY


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("hello-c64", "hello", 64, about="hello world, 64 keep-alive connections"),
    Scenario("hello-c256", "hello", 256, about="hello world, 256 keep-alive connections"),
    Scenario("pipeline16-c64", "hello", 64, pipeline=16, about="hello world, 16 per write, c64"),
    Scenario("post4k-c64", "echo", 64, body_size=4096, about="4 KiB POST echoed back, c64"),
)


@dataclass(frozen=True)
class ServerSpec:
    """A server under test. `command(app, port)` is its argv, run with cwd=benches/."""

    name: str
    package: str  # whose version the report shows; a failed install of it skips the server
    command: Callable[[str, int], list[str]]
    about: str = ""


def uringserve_command(io_uring: str) -> Callable[[str, int], list[str]]:
    def command(app: str, port: int) -> list[str]:
        return [
            str(PROJECT_PY),
            "-m",
            "uringserve",
            f"apps:{app}",
            "--bind",
            f"{HOST}:{port}",
            "--io-uring",
            io_uring,
            "--no-access-log",
            "--log-level",
            "warning",
        ]

    return command


def bjoern_command(app: str, port: int) -> list[str]:
    # bjoern has no CLI; this script serves it in its own process (see serve_bjoern).
    return [str(BENCH_PY), str(Path(__file__).resolve()), "--serve-bjoern", app, str(port)]


def granian_command(app: str, port: int) -> list[str]:
    return [
        str(BENCH_VENV / "bin" / "granian"),
        "--interface",
        "wsgi",
        "--host",
        HOST,
        "--port",
        str(port),
        # One worker process, one Rust I/O thread and one Python thread: the same single core
        # budget the others have, so CPU per request compares like with like.
        "--workers",
        "1",
        "--runtime-mode",
        "st",
        "--runtime-threads",
        "1",
        "--runtime-blocking-threads",
        "1",
        "--blocking-threads",
        "1",
        "--http",
        "1",
        "--no-ws",
        "--log-level",
        "warning",
        f"apps:{app}",
    ]


SERVERS: tuple[ServerSpec, ...] = (
    ServerSpec("uringserve-io_uring", "uringserve", uringserve_command("on"), "--io-uring on"),
    ServerSpec("uringserve-epoll", "uringserve", uringserve_command("off"), "--io-uring off"),
    ServerSpec("bjoern", "bjoern", bjoern_command, "bjoern.run, libev"),
    ServerSpec(
        "granian",
        "granian",
        granian_command,
        "--interface wsgi, 1 worker, st runtime, 1 thread each",
    ),
)
BASELINE = "uringserve-io_uring"


# --- installing what the run needs ------------------------------------------------------------


def _dpkg_installed(package: str) -> bool:
    out = subprocess.run(["dpkg", "-s", package], capture_output=True, text=True, check=False)
    return out.returncode == 0 and "install ok installed" in out.stdout


def _run_logged(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    log("$ " + shlex.join(cmd))
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)


def _tail(text: str, lines: int = 4) -> str:
    return " / ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def ensure_system_packages() -> None:
    missing = [
        pkg
        for pkg, command in APT_PACKAGES
        if not (shutil.which(command) if command else _dpkg_installed(pkg))
    ]
    if missing:
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            raise BenchError(
                f"missing {', '.join(missing)}: apt-get install -y {' '.join(missing)}"
            )
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        _run_logged(["apt-get", "update", "-qq"], env=env)
        out = _run_logged(["apt-get", "install", "-y", "-qq", *missing], env=env)
        if out.returncode != 0:
            # Not fatal by itself: without libev-dev only bjoern is lost, and that is reported.
            log(f"apt-get install failed ({out.returncode}): {_tail(out.stderr or out.stdout)}")
    for tool in ("wrk", "taskset"):
        if not shutil.which(tool):
            raise BenchError(f"{tool} is required and could not be installed")


def ensure_project_venv() -> None:
    out = (
        subprocess.run(
            [str(PROJECT_PY), "-c", "import uringserve._uringserve"],
            capture_output=True,
            text=True,
            check=False,
        )
        if PROJECT_PY.exists()
        else None
    )
    if out is None or out.returncode != 0:
        raise BenchError(
            f"uringserve is not built into {PROJECT_PY.parent.parent}: run make develop"
        )


def _installed_version(python: Path, package: str) -> str | None:
    code = f"import importlib.metadata as m; print(m.version({package!r}))"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False)
    return out.stdout.strip() if out.returncode == 0 else None


def ensure_bench_venv() -> dict[str, str]:
    """Creates benches/.venv with the pinned peers; returns {package: error} for failures."""
    failures: dict[str, str] = {}
    which = [str(PROJECT_PY), "-c", "import sys; print(sys.version)"]
    if not BENCH_PY.exists() or _first_line([str(BENCH_PY), *which[1:]]) != _first_line(which):
        # From the project's interpreter, so every server runs on the same CPython build.
        out = _run_logged([str(PROJECT_PY), "-m", "venv", "--clear", str(BENCH_VENV)])
        if out.returncode != 0:
            reason = f"cannot create {BENCH_VENV}: {_tail(out.stderr)}"
            return dict.fromkeys(BENCH_PACKAGES, reason)
    for package, version in BENCH_PACKAGES.items():
        if _installed_version(BENCH_PY, package) == version:
            continue
        # One package per pip call, so a peer that fails to build costs only itself.
        out = _run_logged(
            [
                str(BENCH_PY),
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                f"{package}=={version}",
            ]
        )
        if out.returncode != 0:
            failures[package] = _tail(out.stderr or out.stdout, 12)
            log(f"{package} did not install: {failures[package]}")
    return failures


# --- processes --------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        # The command name may hold spaces and parentheses; the fields start after the last ')'.
        return f.read().rsplit(")", 1)[1].split()


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (granian runs its worker as a child process)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(_stat_fields(int(entry))[1])
            except (OSError, IndexError, ValueError):
                continue  # exited while we looked
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def cpu_ticks(pids: list[int]) -> int:
    """utime+stime (fields 14 and 15) of each process; a process's line covers all its threads."""
    total = 0
    for pid in pids:
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class RunningServer:
    spec: ServerSpec
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid)

    def log_tail(self) -> str:
        try:
            return _tail(self.log_path.read_text(errors="replace"))
        except OSError:
            return ""


def stop_process_group(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM to the group the server leads (its workers included), SIGKILL if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_TIMEOUT)
    # Workers can outlive their leader (crashed, or gone on SIGTERM), so the group is killed
    # either way; while any member lives, its id cannot have been reused.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(STOP_TIMEOUT)


@contextlib.contextmanager
def running_server(spec: ServerSpec, scenario: Scenario, log_dir: Path) -> Iterator[RunningServer]:
    port = free_port()
    log_path = log_dir / f"{spec.name}-{scenario.name}.log"
    cmd = ["taskset", "-c", str(SERVER_CORE), *spec.command(scenario.app, port)]
    with open(log_path, "wb") as log_file:
        # A session of its own, so stopping it reaches its workers and nothing else.
        proc = subprocess.Popen(
            cmd, cwd=BENCH_DIR, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = RunningServer(spec, proc, port, log_path)
    try:
        wait_ready(server, scenario)
        yield server
    finally:
        stop_process_group(proc)


def wait_ready(server: RunningServer, scenario: Scenario) -> None:
    """Polls with one real request until it is answered, the server dies, or the deadline."""
    deadline = time.monotonic() + READY_TIMEOUT
    single = replace(scenario, pipeline=1)
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise BenchError(
                f"exited with status {server.proc.returncode} before serving: {server.log_tail()}"
            )
        try:
            run_requests(server.port, single, 1, 1, timeout=max(0.1, deadline - time.monotonic()))
            return
        except (OSError, NoAnswer) as exc:
            last = exc
        except BenchError:
            return  # it answers, wrongly: the correctness check reports how
        time.sleep(0.05)  # between polls only; success is decided by the answered request
    raise BenchError(f"not answering after {READY_TIMEOUT:.0f} s ({last}): {server.log_tail()}")


# --- a bounded keep-alive client (correctness check and strace pass) -------------------------


@dataclass
class _Conn:
    sock: socket.socket
    left: int  # requests not yet sent
    pending: int = 0  # sent, not yet answered
    buf: bytearray = field(default_factory=bytearray)


def _take_responses(buf: bytearray, expected: bytes) -> int:
    """Removes the complete responses from buf, checking each; returns how many there were."""
    count = 0
    while True:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return count
        head = bytes(buf[:end]).decode("latin-1")
        status_line, *header_lines = head.split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise BenchError(f"bad status line {status_line[:80]!r}")
        length = None
        for line in header_lines:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
            elif name.strip().lower() == "transfer-encoding":
                raise BenchError(f"unexpected Transfer-Encoding: {value.strip()}")
        if length is None:
            raise BenchError("response without Content-Length")
        if len(buf) < end + 4 + length:
            return count
        body = bytes(buf[end + 4 : end + 4 + length])
        del buf[: end + 4 + length]
        if parts[1] != "200":
            raise BenchError(f"status {status_line[:80]!r}")
        if body != expected:
            raise BenchError(f"wrong body: {body[:40]!r} ({len(body)} bytes)")
        count += 1


class KeepAliveClient:
    """Keep-alive connections that make exact numbers of requests, `scenario.pipeline` per
    write, and check every response. Any deviation raises BenchError; a server that closes
    or goes quiet for `stall` seconds (one that cannot pipeline just stops) raises NoAnswer."""

    def __init__(self, port: int, scenario: Scenario, connections: int, stall: float = 5.0):
        self.request = scenario.request(port)
        self.expected = scenario.expected_body()
        self.pipeline = scenario.pipeline
        self.stall = stall
        self.sel = selectors.DefaultSelector()
        self.conns: list[_Conn] = []
        try:
            for _ in range(max(1, connections)):
                sock = socket.create_connection((HOST, port), timeout=stall)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.conns.append(_Conn(sock, 0))
                self.sel.register(sock, selectors.EVENT_READ, self.conns[-1])
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for c in self.conns:
            c.sock.close()
        self.sel.close()

    def __enter__(self) -> KeepAliveClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _send_batch(self, c: _Conn) -> None:
        n = min(self.pipeline, c.left)
        c.sock.sendall(self.request * n)
        c.left -= n
        c.pending += n

    def run(self, total: int, timeout: float) -> int:
        """Makes exactly `total` requests, spread evenly over the connections."""
        deadline = time.monotonic() + timeout
        busy = 0
        for i, c in enumerate(self.conns):
            c.left = total // len(self.conns) + (1 if i < total % len(self.conns) else 0)
            if c.left:
                self._send_batch(c)
                busy += 1
        done = 0
        progress = time.monotonic()
        while busy:
            now = time.monotonic()
            if now >= deadline:
                raise NoAnswer(f"timed out after {done} of {total} responses")
            if now - progress >= self.stall:
                raise NoAnswer(f"no response for {self.stall:.0f} s after {done} of {total}")
            for key, _ in self.sel.select(min(deadline - now, self.stall)):
                progress = time.monotonic()
                c = key.data
                data = c.sock.recv(262144)
                if not data:
                    raise NoAnswer(f"connection closed after {done} of {total} responses")
                c.buf += data
                n = _take_responses(c.buf, self.expected)
                c.pending -= n
                done += n
                if c.pending < 0:
                    raise BenchError("more responses than requests")
                if c.pending == 0 and c.left:
                    self._send_batch(c)
                elif c.pending == 0 and n:
                    busy -= 1
        return done


def run_requests(
    port: int, scenario: Scenario, total: int, connections: int, timeout: float
) -> int:
    """`total` checked requests over fresh connections; returns the number answered."""
    stall = min(timeout, 5.0)
    with KeepAliveClient(port, scenario, min(connections, total), stall=stall) as client:
        return client.run(total, timeout)


# --- wrk --------------------------------------------------------------------------------------

_TIME_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


def _micros(number: str, unit: str) -> float:
    return float(number) * _TIME_UNITS[unit]


def parse_wrk(text: str) -> dict[str, Any]:
    """req/s, latency percentiles (µs), request count and errors from `wrk --latency` output."""
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)\b", text)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not done or not rate:
        raise BenchError(f"cannot parse wrk output: {_tail(text)}")
    result: dict[str, Any] = {
        "requests": int(done.group(1)),
        "duration_s": _micros(done.group(2), done.group(3)) / 1e6,
        "req_per_s": float(rate.group(1)),
    }
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.MULTILINE)
        # wrk times a pipelined batch once but ranks percentiles over every response, so high
        # percentiles can run past its samples and print as 0: that is "unknown", not 0.
        value = _micros(m.group(1), m.group(2)) if m else 0.0
        result[f"p{pct}_us"] = value or None
    errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0, "non_2xx_3xx": 0}
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sock:
        errors.update(
            zip(("connect", "read", "write", "timeout"), map(int, sock.groups()), strict=True)
        )
    status = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if status:
        errors["non_2xx_3xx"] = int(status.group(1))
    result["errors"] = errors
    return result


def run_wrk(scenario: Scenario, port: int, seconds: int) -> dict[str, Any]:
    url = f"http://{HOST}:{port}/"
    cmd = [
        "taskset",
        "-c",
        str(CLIENT_CORE),
        "wrk",
        "-t1",
        f"-c{scenario.connections}",
        f"-d{seconds}s",
        "--latency",
        *scenario.wrk_args(url),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if out.returncode != 0:
        raise BenchError(f"wrk exited with {out.returncode}: {_tail(out.stderr or out.stdout)}")
    result = parse_wrk(out.stdout)
    result["command"] = shlex.join(cmd)
    result["wrk_output"] = out.stdout  # a few hundred bytes; what the figures were parsed from
    return result


# --- strace -----------------------------------------------------------------------------------

_STRACE_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\S+)\s*$")


def parse_strace_summary(text: str) -> dict[str, int]:
    """{syscall: calls} from `strace -c` output, with the "total" row."""
    calls = {}
    for line in text.splitlines():
        m = _STRACE_ROW.match(line)
        if m:
            calls[m.group(2)] = int(m.group(1))
    if "total" not in calls:
        raise BenchError(f"no strace summary: {_tail(text)}")
    return calls


def _all_traced(pids: list[int], tracer: int) -> bool:
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    if f.read().startswith("iou-"):
                        continue  # io_uring's kernel workers: not traceable, they make no syscalls
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    status = f.read()
            except OSError:
                continue
            m = re.search(r"^TracerPid:\s+(\d+)", status, re.MULTILINE)
            if not m or int(m.group(1)) != tracer:
                return False
    return True


def count_syscalls(
    server: RunningServer, scenario: Scenario, requests: int, log_dir: Path
) -> dict[str, Any]:
    """strace -c -f on every process of the server while exactly `requests` are answered."""
    pids = server.pids()
    out_path = log_dir / f"strace-{server.spec.name}-{scenario.name}.txt"
    cmd = ["taskset", "-c", str(CLIENT_CORE), "strace", "-c", "-f", "-o", str(out_path)]
    for pid in pids:
        cmd += ["-p", str(pid)]
    with KeepAliveClient(server.port, scenario, scenario.connections, stall=10) as client:
        # One request per connection first, untraced: the count is then of keep-alive traffic
        # alone, as in the wrk run, not of accepts and per-connection setup.
        client.run(scenario.connections, timeout=60)
        with open(log_dir / "strace.stderr", "ab") as err:
            tracer = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        try:
            # Requests made before every thread is attached would be answered uncounted.
            deadline = time.monotonic() + 10
            while not _all_traced(pids, tracer.pid):
                if tracer.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(
                        f"strace did not attach: {_tail(_read(log_dir / 'strace.stderr'))}"
                    )
                time.sleep(0.01)
            answered = client.run(requests, timeout=300)
        finally:
            if tracer.poll() is None:
                tracer.send_signal(signal.SIGINT)  # strace detaches and writes its summary
            try:
                tracer.wait(30)
            except subprocess.TimeoutExpired:
                tracer.kill()
                tracer.wait()
    calls = parse_strace_summary(_read(out_path))
    total = calls.pop("total")
    top = sorted(calls.items(), key=lambda kv: -kv[1])[:6]
    return {
        "requests": answered,
        "calls": total,
        "per_request": total / answered,
        "top_per_request": {name: round(n / answered, 3) for name, n in top},
    }


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


# --- one measurement --------------------------------------------------------------------------


def measure(
    spec: ServerSpec, scenario: Scenario, args: argparse.Namespace, log_dir: Path
) -> dict[str, Any]:
    row: dict[str, Any] = {"scenario": scenario.name, "server": spec.name}
    ticks = os.sysconf("SC_CLK_TCK")
    with running_server(spec, scenario, log_dir) as server:
        try:
            # Two connections, two batches each: framing across pipelined responses is checked.
            run_requests(server.port, scenario, 4 * scenario.pipeline, 2, timeout=10)
            row["check"] = "ok"
        except (OSError, BenchError) as exc:
            row["check"] = f"failed: {exc}"
        if args.warmup:
            run_wrk(scenario, server.port, args.warmup)
        pids = server.pids()
        before = cpu_ticks(pids)
        wrk = run_wrk(scenario, server.port, args.duration)
        # Workers started during the run would be missed by the first list, so re-list.
        cpu_s = (cpu_ticks(server.pids()) - before) / ticks
        row.update(wrk)
        row["processes"] = len(pids)
        row["cpu_s"] = cpu_s
        row["cpu_us_per_request"] = cpu_s * 1e6 / wrk["requests"] if wrk["requests"] else None
        if server.proc.poll() is not None:
            raise BenchError(f"exited with {server.proc.returncode} during the run")
        if args.strace_requests and row["check"] != "ok":
            # It would only wait out the stall timeout on a server that already failed.
            row["syscalls"] = {"error": "skipped: the correctness check failed"}
        elif args.strace_requests:
            try:
                row["syscalls"] = count_syscalls(server, scenario, args.strace_requests, log_dir)
            except (OSError, BenchError, subprocess.SubprocessError) as exc:
                row["syscalls"] = {"error": str(exc)}
    return row


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's req/s and CPU per request relative to the baseline's in the same scenario."""
    base = {r["scenario"]: r for r in rows if r["server"] == BASELINE and "error" not in r}
    for r in rows:
        b = base.get(r["scenario"])
        if not b or "error" in r:
            continue
        r["vs_baseline_req_per_s"] = r["req_per_s"] / b["req_per_s"] if b["req_per_s"] else None
        if r.get("cpu_us_per_request") and b.get("cpu_us_per_request"):
            r["vs_baseline_cpu"] = r["cpu_us_per_request"] / b["cpu_us_per_request"]
        mine, theirs = r.get("syscalls", {}), b.get("syscalls", {})
        if "per_request" in mine and "per_request" in theirs:
            r["vs_baseline_syscalls"] = mine["per_request"] / theirs["per_request"]


# --- report -----------------------------------------------------------------------------------


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    lines = (out.stdout + out.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def machine_info() -> dict[str, Any]:
    cpu = platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "kernel": platform.release(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "server_core": SERVER_CORE,
        "client_core": CLIENT_CORE,
    }


def versions() -> dict[str, str]:
    found = {
        "python": _first_line(
            [str(PROJECT_PY), "-c", "import platform as p; print(p.python_version())"]
        ),
        "uringserve": _first_line(
            [str(PROJECT_PY), "-c", "import uringserve; print(uringserve.__version__)"]
        ),
        "uringserve_commit": _first_line(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"]
        ),
        "wrk": _first_line(["wrk", "-v"]).split(" Copyright")[0],
        "strace": _first_line(["strace", "-V"]),
    }
    for package in BENCH_PACKAGES:
        found[package] = (BENCH_PY.exists() and _installed_version(BENCH_PY, package)) or "missing"
    return found


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _cell(text: str, limit: int) -> str:
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return text.replace("|", "\\|").replace("\n", " ")  # a bare | would end the table cell


def _errors_cell(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"**{_cell(row['error'], 240)}**"
    parts = [f"{k} {v}" for k, v in row["errors"].items() if v]
    if row.get("check") != "ok":
        parts.append(f"**check {row.get('check')}**")
    if "error" in row.get("syscalls", {}):
        parts.append(f"strace: {row['syscalls']['error']}")
    return _cell(", ".join(parts), 240) or "0"


def render_markdown(report: dict[str, Any]) -> str:
    m, v, s = report["machine"], report["versions"], report["settings"]
    lines = [
        "# HTTP benchmark: uringserve against peer WSGI servers",
        "",
        f"Run {report['started']} with `{report['command']}`.",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores, kernel {m['kernel']}; "
        f"server on core {m['server_core']}, `wrk -t1` on core {m['client_core']}, loopback.",
        f"- Versions: Python {v['python']}, "
        f"uringserve {v['uringserve']} ({v['uringserve_commit']}), bjoern {v['bjoern']}, "
        f"granian {v['granian']}, {v['wrk']}, {v['strace']}.",
        f"- {s['duration_s']} s per run after a {s['warmup_s']} s warm-up; syscalls from "
        f"`strace -c -f` over {s['strace_requests']} requests of the same shape. "
        "Ratios are against uringserve on io_uring in the same scenario of this run. "
        "Under pipelining wrk times each 16-request batch as one; a p99 it cannot rank is -.",
        "",
        "| scenario | server | req/s | vs io_uring | p99 | CPU µs/req | vs io_uring "
        "| syscalls/req | errors |",
        "|---|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in report["results"]:
        if "error" in r:
            lines.append(
                f"| {r['scenario']} | {r['server']} | - | - | - | - | - | - | {_errors_cell(r)} |"
            )
            continue
        p99 = r.get("p99_us")
        lines.append(
            f"| {r['scenario']} | {r['server']} | {r['req_per_s']:,.0f} "
            f"| {_fmt(r.get('vs_baseline_req_per_s'), '.2f', 'x')} "
            f"| {_fmt(p99 / 1000 if p99 is not None else None, '.2f', ' ms')} "
            f"| {_fmt(r.get('cpu_us_per_request'), '.1f')} "
            f"| {_fmt(r.get('vs_baseline_cpu'), '.2f', 'x')} "
            f"| {_fmt(r.get('syscalls', {}).get('per_request'), '.2f')} "
            f"| {_errors_cell(r)} |"
        )
    tops = [r for r in report["results"] if "top_per_request" in r.get("syscalls", {})]
    if tops:
        lines += ["", "Most frequent syscalls per request (strace pass):", ""]
        lines += ["| scenario | server | syscalls per request |", "|---|---|---|"]
        for r in tops:
            top = ", ".join(f"{k} {n:.2f}" for k, n in r["syscalls"]["top_per_request"].items())
            lines.append(f"| {r['scenario']} | {r['server']} | {top} |")
    if report["skipped"]:
        lines += ["", "Skipped servers:", ""]
        lines += [f"- {name}: {why}" for name, why in report["skipped"].items()]
    lines += [
        "",
        "Scenarios: "
        + "; ".join(f"{sc['name']}: {sc['about']}" for sc in report["scenarios"])
        + ".",
        "",
    ]
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------------


def serve_bjoern(app_name: str, port: int) -> None:
    """Runs in the bench venv: bjoern has no command line of its own."""
    import bjoern  # type: ignore[import-not-found]

    sys.path.insert(0, str(BENCH_DIR))
    import apps

    bjoern.run(getattr(apps, app_name), HOST, port)


def _pick(names: str | None, table: tuple[Any, ...], what: str) -> list[Any]:
    if not names:
        return list(table)
    by_name = {row.name: row for row in table}
    unknown = [n for n in names.split(",") if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(by_name)})")
    return [by_name[n] for n in names.split(",")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--duration", type=int, default=10, help="seconds of load per run (10)")
    p.add_argument("--warmup", type=int, default=1, help="seconds of unmeasured load first (1)")
    p.add_argument(
        "--strace-requests", type=int, default=20_000, help="requests in the strace pass; 0 skips"
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 2 s runs, short strace pass")
    p.add_argument(
        "--servers", help="comma-separated subset of: " + ", ".join(s.name for s in SERVERS)
    )
    p.add_argument(
        "--scenarios", help="comma-separated subset of: " + ", ".join(s.name for s in SCENARIOS)
    )
    p.add_argument(
        "--out", type=Path, help="output path without suffix (benches/results/http_bench)"
    )
    p.add_argument(
        "--no-install", action="store_true", help="use what is installed; install nothing"
    )
    p.add_argument("--serve-bjoern", nargs=2, metavar=("APP", "PORT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = 2, 1
        args.strace_requests = min(args.strace_requests, 2_000)
    if args.out is None:
        args.out = RESULTS_DIR / ("http_bench_quick" if args.quick else "http_bench")
    return args


def _raise_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the servers


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_bjoern:
        serve_bjoern(args.serve_bjoern[0], int(args.serve_bjoern[1]))
        return 0
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    servers = _pick(args.servers, SERVERS, "servers")
    scenarios = _pick(args.scenarios, SCENARIOS, "scenarios")
    started = time.monotonic()
    try:
        ensure_project_venv()
        failed: dict[str, str] = {}
        if not args.no_install:
            ensure_system_packages()
            if any(s.package in BENCH_PACKAGES for s in servers):
                failed = ensure_bench_venv()
    except BenchError as exc:
        log(str(exc))
        return 1
    skipped = {
        s.name: f"{s.package} not installed: {failed[s.package]}"
        for s in servers
        if s.package in failed
    }
    servers = [s for s in servers if s.name not in skipped]
    if (os.cpu_count() or 1) <= max(SERVER_CORE, CLIENT_CORE):
        log(f"needs cores {SERVER_CORE} and {CLIENT_CORE}: one for the server, one for wrk")
        return 1
    # The harness (checks, strace client) shares wrk's core, never the server's.
    os.sched_setaffinity(0, {CLIENT_CORE})
    report: dict[str, Any] = {
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "versions": versions(),
        "settings": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "strace_requests": args.strace_requests,
            "wrk_threads": 1,
            "baseline": BASELINE,
        },
        "servers": [{"name": s.name, "package": s.package, "about": s.about} for s in servers],
        "scenarios": [asdict(sc) for sc in scenarios],
        "skipped": skipped,
        "results": [],
    }
    rows: list[dict[str, Any]] = report["results"]
    with tempfile.TemporaryDirectory(prefix="http_bench-") as tmp:
        # Scenario-major order: the servers of one scenario run back to back, which is what the
        # ratios compare.
        for scenario in scenarios:
            for spec in servers:
                log(f"{scenario.name}: {spec.name}")
                t0 = time.monotonic()
                try:
                    row = measure(spec, scenario, args, Path(tmp))
                except (OSError, BenchError, subprocess.SubprocessError) as exc:
                    row = {"scenario": scenario.name, "server": spec.name, "error": str(exc)}
                    log(f"  failed: {exc}")
                else:
                    log(
                        f"  {row['req_per_s']:,.0f} req/s, "
                        f"{_fmt(row.get('cpu_us_per_request'), '.1f')} µs CPU/req, "
                        f"{_fmt(row.get('syscalls', {}).get('per_request'), '.2f')} syscalls/req "
                        f"({time.monotonic() - t0:.0f} s)"
                    )
                rows.append(row)
    add_ratios(rows)
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    markdown = render_markdown(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown)
    print(markdown)
    log(f"wrote {args.out}.json and .md in {report['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; the servers were stopped")  # by the finally blocks on the way out
        sys.exit(130)

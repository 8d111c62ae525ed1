"""HTTP load benchmark of uringserve against its peers and the io_uring limit, in one run (issue 4).

Servers (SERVERS): uringserve on io_uring and on epoll, bjoern, granian (--interface wsgi),
gunicorn (sync, 1 worker, 1 thread), and the limit: benches/limit/uring_limit.c, a raw io_uring
responder in C (fixed response, no parsing). Each runs alone, single process and single worker,
pinned to core 0 with `taskset -c 0`, on a free port of 127.0.0.1; `wrk -t1` runs pinned to core 1.

Scenarios (SCENARIOS): hello world at c64 (the main scenario, run twice, interleaved: every
server once, then every server again, so that the noise shows), c1 and c256; 16 pipelined
requests per write at c64; a 4 KiB POST echoed back at c64; a new connection per request
(Connection: close) at c64; and c64 while a helper process holds 10,000 idle keep-alive
connections. For each scenario the servers run one after the other: the figures of one scenario
are taken a minute or two apart and compare; between runs they move by 10-20%.

Figures, per server and scenario:
- req/s and p99 latency (wrk --latency), wrk's socket errors and non-2xx count, and a check of
  status, framing and body of real responses (pipelined ones included) before and after the load;
- server CPU-µs per request, user and sys: utime and stime of /proc/PID/stat, summed over the
  server's process tree, before and after the timed run, over the requests wrk completed;
- syscalls per request: `perf stat -e raw_syscalls:sys_enter -p PIDS` while wrk, running
  benches/wrk/count.lua, makes a fixed number of requests of the scenario's shape (perf counts
  in the kernel and leaves the server's batching alone, where strace would slow it down). When
  perf cannot count here, strace -c -f replaces it and the report says so. A per-syscall
  breakdown from `strace -c -f` is kept for the main scenario as an extra;
- server RSS (VmRSS of /proc/PID/status over the process tree) after the load; for the idle
  scenario before the idle connections open, while they are held, and after the load;
- each figure's ratio to uringserve on io_uring, and a targets section computing issue 4's
  targets from this run's numbers (met / not met).

Outputs: benches/results/http_bench.{md,json,png} (quick runs: http_bench_quick.*), and a full
run rewrites the README's block between its http_bench markers (chart, machine, targets, table).

The script installs what it needs: wrk, strace, linux-perf, gcc, libev-dev and liburing-dev with
apt-get when missing; a bench venv (benches/.venv) with pinned bjoern, granian, gunicorn and
matplotlib; and it builds the C responder with gcc. uringserve runs from the project's .venv
(`make develop`). A server that cannot be installed or built is reported and skipped.

    make bench                                   # the full run, about 13 minutes
    make bench-quick                             # smoke run: 2 s per run, 2,000 idle connections
    .venv/bin/python benches/http_bench.py --servers uringserve-io_uring,limit \\
        --scenarios hello-c64 --duration 5
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import json
import os
import platform
import re
import resource
import select
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
from typing import IO, Any

from apps import HELLO_BODY  # benches/ is sys.path[0] when this file runs as a script

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
PROJECT_PY = ROOT / ".venv" / "bin" / "python"
BENCH_VENV = BENCH_DIR / ".venv"
BENCH_PY = BENCH_VENV / "bin" / "python"
RESULTS_DIR = BENCH_DIR / "results"
WRK_SCRIPTS = BENCH_DIR / "wrk"
LIMIT_SRC = BENCH_DIR / "limit" / "uring_limit.c"
LIMIT_BIN = BENCH_DIR / "limit" / "uring_limit"
README = ROOT / "README.md"
README_BEGIN = "<!-- http_bench:begin -->"
README_END = "<!-- http_bench:end -->"

SERVER_CORE = 0
CLIENT_CORE = 1
HOST = "127.0.0.1"

# Pinned so that runs months apart measure the same peers; DESIGN.md's figures are for these.
BENCH_PACKAGES = {
    "bjoern": "3.2.2",
    "granian": "2.8.7",
    "gunicorn": "27.0.1",
    "matplotlib": "3.11.2",  # the chart only
}
# (Debian package, command that proves it is there, or None to ask dpkg)
APT_PACKAGES = (
    ("wrk", "wrk"),
    ("strace", "strace"),
    ("linux-perf", "perf"),
    ("gcc", "gcc"),
    ("libev-dev", None),  # bjoern builds against it
    ("liburing-dev", None),  # the C responder
)
LIMIT_BUILD = ["gcc", "-O2", "-Wall", "-Wextra", "-o", str(LIMIT_BIN), str(LIMIT_SRC), "-luring"]
SYSCALL_EVENT = "raw_syscalls:sys_enter"

OURS = "uringserve-io_uring"
EPOLL = "uringserve-epoll"
BJOERN = "bjoern"
LIMIT = "limit"
MAIN = "hello-c64"

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 2.0  # then SIGKILL: the figures are taken by then
# Bounds a count pass: a server too slow to make the fixed count in time still ends the pass
# (the row then says how many requests the count is over).
COUNT_PASS_LIMIT_S = 30
IDLE_OPEN_TIMEOUT = 20.0  # 10,000 connects take about a second where the server accepts them
# Connects in flight at once while opening idle connections: under every server's accept
# backlog (1024), so none is dropped and retried a second later.
IDLE_WAVE = 256
MIB = 1024.0


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
    """One load shape. `pipeline` requests go out in each write; `body_size` > 0 makes a POST;
    `close` sends Connection: close (a new connection per request); `idle` connections are held
    open, idle, while the load runs; `rounds` > 1 runs it again after every server ran it."""

    name: str
    app: str
    connections: int
    pipeline: int = 1
    body_size: int = 0
    close: bool = False
    idle: int = 0
    rounds: int = 1
    about: str = ""

    def wrk_args(self, url: str) -> list[str]:
        """wrk's script, URL and script arguments for this shape."""
        if self.pipeline > 1:
            return ["-s", str(WRK_SCRIPTS / "pipeline.lua"), url, "--", str(self.pipeline)]
        if self.body_size:
            return ["-s", str(WRK_SCRIPTS / "post.lua"), url, "--", str(self.body_size)]
        if self.close:
            return ["-H", "Connection: close", url]
        # No script at all for plain GETs: wrk then runs without Lua, at its fastest.
        return [url]

    def count_args(self, url: str, responses: int) -> list[str]:
        """wrk's arguments for the same shape, stopping after exactly `responses` responses."""
        return [
            "-s",
            str(WRK_SCRIPTS / "count.lua"),
            url,
            "--",
            str(responses),
            str(self.pipeline),
            str(self.body_size),
            "close" if self.close else "keep-alive",
        ]

    def request(self, port: int) -> bytes:
        """One request as the check and strace-pass client sends it."""
        host = f"Host: {HOST}:{port}\r\n"
        if self.close:
            host += "Connection: close\r\n"
        if not self.body_size:
            return f"GET / HTTP/1.1\r\n{host}\r\n".encode()
        head = (
            f"POST / HTTP/1.1\r\n{host}Content-Type: application/octet-stream\r\n"
            f"Content-Length: {self.body_size}\r\n\r\n"
        )
        return head.encode() + self.body()

    def body(self) -> bytes:
        return b"x" * self.body_size  # the same bytes post.lua and count.lua send

    def expected_body(self) -> bytes:
        return self.body() if self.body_size else HELLO_BODY


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        MAIN, "hello", 64, rounds=2, about="hello world, 64 keep-alive connections, two rounds"
    ),
    Scenario("hello-c1", "hello", 1, about="hello world, one connection"),
    Scenario("hello-c256", "hello", 256, about="hello world, 256 keep-alive connections"),
    Scenario("pipeline16-c64", "hello", 64, pipeline=16, about="hello world, 16 per write, c64"),
    Scenario("post4k-c64", "echo", 64, body_size=4096, about="4 KiB POST echoed back, c64"),
    Scenario(
        "close-c64",
        "hello",
        64,
        close=True,
        about="hello world with Connection: close, a new connection per request, c64",
    ),
    Scenario(
        "idle10k-c64",
        "hello",
        64,
        idle=10_000,
        about="hello world c64 while 10,000 idle keep-alive connections are held open",
    ),
)


CLOSE_SCENARIOS = {sc.name for sc in SCENARIOS if sc.close}


def _runs_everything(scenario: Scenario) -> str | None:
    return None


@dataclass(frozen=True)
class ServerSpec:
    """A server under test. `command(scenario, port)` is its argv, run with cwd=benches/;
    `cannot(scenario)` says why it cannot serve a scenario, or None."""

    name: str
    package: str  # whose version the report shows; a failed install of it skips the server
    command: Callable[[Scenario, int], list[str]]
    about: str = ""
    cannot: Callable[[Scenario], str | None] = _runs_everything


def uringserve_command(io_uring: str) -> Callable[[Scenario, int], list[str]]:
    def command(scenario: Scenario, port: int) -> list[str]:
        # The idle scenario holds its connections past the default cap (1,000) and keep-alive
        # timeout (5 s); like the peers, which have neither, it must not have them closed.
        idle = (
            ["--max-connections", str(scenario.idle + 1000), "--keep-alive-timeout", "3600"]
            if scenario.idle
            else []
        )
        return [
            str(PROJECT_PY),
            "-m",
            "uringserve",
            f"apps:{scenario.app}",
            "--bind",
            f"{HOST}:{port}",
            "--io-uring",
            io_uring,
            "--no-access-log",
            "--log-level",
            "warning",
            *idle,
        ]

    return command


def bjoern_command(scenario: Scenario, port: int) -> list[str]:
    # bjoern has no CLI; this script serves it in its own process (see serve_bjoern).
    return [
        str(BENCH_PY),
        str(Path(__file__).resolve()),
        "--serve-bjoern",
        scenario.app,
        str(port),
    ]


def granian_command(scenario: Scenario, port: int) -> list[str]:
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
        f"apps:{scenario.app}",
    ]


def gunicorn_command(scenario: Scenario, port: int) -> list[str]:
    return [
        str(BENCH_VENV / "bin" / "gunicorn"),
        "--worker-class",
        "sync",
        "--workers",
        "1",
        "--threads",
        "1",  # more than one would switch gunicorn to its gthread worker
        "--bind",
        f"{HOST}:{port}",
        "--log-level",
        "warning",
        f"apps:{scenario.app}",
    ]


def limit_command(scenario: Scenario, port: int) -> list[str]:
    return [str(LIMIT_BIN), str(port), *(["--close"] if scenario.close else [])]


def limit_cannot(scenario: Scenario) -> str | None:
    if scenario.body_size:
        return "a fixed response cannot echo a body"
    return None


SERVERS: tuple[ServerSpec, ...] = (
    ServerSpec(OURS, "uringserve", uringserve_command("on"), "--io-uring on"),
    ServerSpec(EPOLL, "uringserve", uringserve_command("off"), "--io-uring off"),
    ServerSpec(BJOERN, "bjoern", bjoern_command, "bjoern.run, libev"),
    ServerSpec(
        "granian",
        "granian",
        granian_command,
        "--interface wsgi, 1 worker, st runtime, 1 thread each; its defaults cap concurrent "
        "connections at backlog/workers = 1024 (--backpressure) and close a connection that "
        "sends no request head for 30 s",
    ),
    ServerSpec("gunicorn", "gunicorn", gunicorn_command, "sync worker, --workers 1 --threads 1"),
    ServerSpec(
        LIMIT,
        "liburing",
        limit_command,
        "benches/limit/uring_limit.c: raw io_uring, fixed response, no parsing",
        limit_cannot,
    ),
)


# --- installing and building what the run needs -----------------------------------------------


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
            # Not fatal by itself: each loss (bjoern, the limit, perf) is reported where it bites.
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


def build_limit() -> str | None:
    """Compiles the C responder when its binary is missing or older than its source; returns
    why it could not, or None."""
    if LIMIT_BIN.exists() and LIMIT_BIN.stat().st_mtime >= LIMIT_SRC.stat().st_mtime:
        return None
    if not shutil.which("gcc"):
        return "gcc is not installed"
    out = _run_logged(LIMIT_BUILD)
    if out.returncode != 0:
        return f"gcc failed ({out.returncode}): {_tail(out.stderr or out.stdout, 6)}"
    return None


def probe_perf() -> str | None:
    """None when `perf stat -e raw_syscalls:sys_enter -p PID` counts here, else the exact error."""
    if not shutil.which("perf"):
        return "perf is not installed (apt-get install linux-perf failed or was skipped)"
    busy = subprocess.Popen(
        [sys.executable, "-c", "import os\nfor _ in range(5_000_000): os.getppid()"]
    )
    try:
        time.sleep(0.05)
        cmd = ["perf", "stat", "-x,", "-e", SYSCALL_EVENT, "-p", str(busy.pid), "--"]
        out = subprocess.run(
            [*cmd, "sleep", "0.2"], capture_output=True, text=True, timeout=60, check=False
        )
    finally:
        busy.kill()
        busy.wait()
    try:
        calls = parse_perf(out.stderr)
    except BenchError as exc:
        return f"`{shlex.join(cmd)} sleep 0.2` exited {out.returncode}: {exc}"
    return None if calls > 0 else f"`{shlex.join(cmd)}` counted 0 syscalls of a busy process"


def parse_perf(text: str) -> int:
    """The event count from `perf stat -x,` output."""
    for line in text.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[2] == SYSCALL_EVENT:
            if fields[0].isdigit():
                return int(fields[0])
            # "<not counted>": the counter never ran; "<not supported>": no tracepoint access.
            raise BenchError(f"perf reported {fields[0]} for {SYSCALL_EVENT}")
    raise BenchError(f"no {SYSCALL_EVENT} line in perf's output: {_tail(text)}")


# --- processes --------------------------------------------------------------------------------


def _raise_nofile() -> None:
    """Soft RLIMIT_NOFILE up to the hard one: 10,000 idle connections need more than 1024 fds.
    Runs in the server and helper children (preexec_fn), and in this process."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        # The command name may hold spaces and parentheses; the fields start after the last ')'.
        return f.read().rsplit(")", 1)[1].split()


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (granian and gunicorn run their worker as a child)."""
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


def cpu_ticks(pids: list[int]) -> tuple[int, int]:
    """(utime, stime), fields 14 and 15, summed; a process's line covers all its threads."""
    user = system = 0
    for pid in pids:
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        user += int(fields[11])
        system += int(fields[12])
    return user, system


def _is_kernel_thread(pid: int) -> bool:
    # Kernel threads (ksoftirqd and friends) do our own loopback traffic's work, so they are
    # not the interference the "others" figure is after; they have an empty cmdline.
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return not f.read(1)
    except OSError:
        return True


def all_cpu_ticks() -> dict[int, int]:
    """utime+stime of every user-space process on the machine."""
    ticks = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and not _is_kernel_thread(int(entry)):
            try:
                fields = _stat_fields(int(entry))
                ticks[int(entry)] = int(fields[11]) + int(fields[12])
            except (OSError, IndexError, ValueError):
                continue
    return ticks


def others_cpu_s(before: dict[int, int], after: dict[int, int], ours: set[int]) -> float:
    """CPU seconds that processes other than the server, this harness and its children (wrk,
    perf, the idle helper) used between two all_cpu_ticks() snapshots: another workload on the
    machine shows here. Processes that exited in between are missed."""
    total = sum(t - before.get(pid, 0) for pid, t in after.items() if pid not in ours)
    return max(0, total) / os.sysconf("SC_CLK_TCK")


def rss_kib(pids: list[int]) -> int:
    """VmRSS summed over the processes, in KiB."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
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
    """SIGTERM to the group the process leads (its workers included), SIGKILL if it lingers."""
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
    cmd = ["taskset", "-c", str(SERVER_CORE), *spec.command(scenario, port)]
    with open(log_path, "wb") as log_file:
        # A session of its own, so stopping it reaches its workers and nothing else.
        proc = subprocess.Popen(
            cmd,
            cwd=BENCH_DIR,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_raise_nofile,
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


# --- a bounded keep-alive client (correctness check, strace pass, idle connections) -----------


@dataclass
class _Conn:
    sock: socket.socket
    left: int  # requests not yet sent
    pending: int = 0  # sent, not yet answered
    closing: bool = False  # the server said it closes: wait for its EOF, then reconnect
    buf: bytearray = field(default_factory=bytearray)


def _take_responses(buf: bytearray, expected: bytes) -> tuple[int, bool]:
    """Removes the complete responses from buf, checking each; returns how many there were and
    whether one of them said Connection: close."""
    count, closes = 0, False
    while True:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return count, closes
        head = bytes(buf[:end]).decode("latin-1")
        status_line, *header_lines = head.split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise BenchError(f"bad status line {status_line[:80]!r}")
        length = None
        closing = False
        for line in header_lines:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding":
                raise BenchError(f"unexpected Transfer-Encoding: {value.strip()}")
            elif name == "connection":
                closing = "close" in value.lower()
        if length is None:
            raise BenchError("response without Content-Length")
        if len(buf) < end + 4 + length:
            return count, closes
        body = bytes(buf[end + 4 : end + 4 + length])
        del buf[: end + 4 + length]
        if parts[1] != "200":
            raise BenchError(f"status {status_line[:80]!r}")
        if body != expected:
            raise BenchError(f"wrong body: {body[:40]!r} ({len(body)} bytes)")
        count += 1
        closes = closes or closing


class KeepAliveClient:
    """Keep-alive connections that make exact numbers of requests, `scenario.pipeline` per
    write, and check every response. A server that answers with Connection: close (gunicorn's
    sync worker does for every request) must then close; the client reconnects and sends the
    unanswered rest again. In the Connection: close scenario every response must be followed by
    the server's EOF. Any deviation raises BenchError; a server that closes early or goes quiet
    for `stall` seconds (one that cannot pipeline just stops) raises NoAnswer."""

    def __init__(self, port: int, scenario: Scenario, connections: int, stall: float = 5.0):
        self.port = port
        self.request = scenario.request(port)
        self.expected = scenario.expected_body()
        self.pipeline = scenario.pipeline
        self.close_each = scenario.close
        self.stall = stall
        self.reconnects = 0
        self.sel = selectors.DefaultSelector()
        self.conns: list[_Conn] = []
        try:
            for _ in range(max(1, connections)):
                self.conns.append(_Conn(self._connect(), 0))
                self.sel.register(self.conns[-1].sock, selectors.EVENT_READ, self.conns[-1])
        except BaseException:
            self.close()
            raise

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((HOST, self.port), timeout=self.stall)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

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

    def _reconnect(self, c: _Conn) -> None:
        self.sel.unregister(c.sock)
        c.sock.close()
        c.sock = self._connect()
        self.sel.register(c.sock, selectors.EVENT_READ, c)
        # Requests pipelined behind the response that closed were never answered: resend them.
        c.left += c.pending
        c.pending = 0
        c.closing = False
        c.buf.clear()
        self.reconnects += 1

    def run(self, total: int, timeout: float) -> int:
        """Makes exactly `total` requests, spread evenly over the connections."""
        deadline = time.monotonic() + timeout
        for i, c in enumerate(self.conns):
            c.left = total // len(self.conns) + (1 if i < total % len(self.conns) else 0)
            if c.left:
                self._send_batch(c)
        done = 0
        progress = time.monotonic()
        while done < total:
            now = time.monotonic()
            if now >= deadline:
                raise NoAnswer(f"timed out after {done} of {total} responses")
            if now - progress >= self.stall:
                waiting = (
                    "the server's EOF after Connection: close"
                    if any(c.closing for c in self.conns)
                    else "a response"
                )
                raise NoAnswer(f"waited {self.stall:.0f} s for {waiting} after {done} of {total}")
            for key, _ in self.sel.select(min(deadline - now, self.stall)):
                progress = time.monotonic()
                c = key.data
                data = c.sock.recv(262144)
                if not data:
                    if not c.closing and (c.pending or self.close_each):
                        raise NoAnswer(f"connection closed after {done} of {total} responses")
                    self._reconnect(c)
                    if c.left:
                        self._send_batch(c)
                    continue
                if c.closing:
                    raise BenchError("bytes after the response that closed the connection")
                c.buf += data
                n, closes = _take_responses(c.buf, self.expected)
                c.pending -= n
                done += n
                if c.pending < 0:
                    raise BenchError("more responses than requests")
                if closes or (self.close_each and n):
                    c.closing = True
                elif c.pending == 0 and c.left:
                    self._send_batch(c)
        return done


def run_requests(
    port: int, scenario: Scenario, total: int, connections: int, timeout: float
) -> int:
    """`total` checked requests over fresh connections; returns the number answered."""
    stall = min(timeout, 5.0)
    with KeepAliveClient(port, scenario, min(connections, total), stall=stall) as client:
        return client.run(total, timeout)


def check_responses(port: int, scenario: Scenario) -> tuple[str, int]:
    """("ok" or "failed: why", reconnects). Pipelined: every connection of the scenario sends
    four full batches, so framing across many back-to-back responses is checked."""
    if scenario.pipeline > 1:
        total, connections = 4 * scenario.pipeline * scenario.connections, scenario.connections
    else:
        total, connections = 8, 2
    try:
        with KeepAliveClient(port, scenario, connections, stall=5.0) as client:
            client.run(total, timeout=60)
            return "ok", client.reconnects
    except (OSError, BenchError) as exc:
        return f"failed: {exc}", 0


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


def _wrk_base(scenario: Scenario, seconds: int) -> list[str]:
    return [
        "wrk",
        "-t1",
        f"-c{scenario.connections}",
        f"-d{seconds}s",
    ]


def run_wrk(scenario: Scenario, port: int, seconds: int) -> dict[str, Any]:
    url = f"http://{HOST}:{port}/"
    cmd = [
        "taskset",
        "-c",
        str(CLIENT_CORE),
        *_wrk_base(scenario, seconds),
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


# --- syscalls per request ---------------------------------------------------------------------


def count_syscalls_perf(
    server: RunningServer, scenario: Scenario, requests: int, log_dir: Path
) -> dict[str, Any]:
    """`perf stat -e raw_syscalls:sys_enter` on every process of the server while wrk makes
    exactly `requests` requests of the scenario's shape (count.lua ends wrk at the last
    response, and perf stops counting when its workload, wrk, exits). The count includes the
    pass's own connects and closes: a few syscalls per connection, over `requests` requests."""
    pids = server.pids()
    out_path = log_dir / f"perf-{server.spec.name}-{scenario.name}.txt"
    url = f"http://{HOST}:{server.port}/"
    wrk = [*_wrk_base(scenario, COUNT_PASS_LIMIT_S), *scenario.count_args(url, requests)]
    cmd = [
        "taskset",
        "-c",
        str(CLIENT_CORE),
        "perf",
        "stat",
        "-x,",
        "-e",
        SYSCALL_EVENT,
        "-o",
        str(out_path),
        "-p",
        ",".join(map(str, pids)),
        "--",
        *wrk,
    ]
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=COUNT_PASS_LIMIT_S + 60, check=False
    )
    if out.returncode != 0:
        raise BenchError(
            f"perf stat exited with {out.returncode}: {_tail(out.stderr or out.stdout)}"
        )
    calls = parse_perf(_read(out_path))
    exact = re.search(r"^count-pass: (\d+) responses$", out.stdout, re.MULTILINE)
    if exact:
        answered, complete = int(exact.group(1)), True
    else:
        # The time bound ended wrk first: the count is over what it completed.
        answered, complete = parse_wrk(out.stdout)["requests"], False
    if not answered:
        raise BenchError("no request answered in the count pass")
    return {
        "method": "perf",
        "requests": answered,
        "complete": complete,
        "calls": calls,
        "per_request": calls / answered,
        "command": shlex.join(cmd),
    }


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


def count_syscalls_strace(
    server: RunningServer, scenario: Scenario, requests: int, log_dir: Path
) -> dict[str, Any]:
    """strace -c -f on every process of the server while exactly `requests` are answered by a
    Python keep-alive client. strace stops the server at every syscall, so its batching is not
    the timed run's: the breakdown is what this is for."""
    pids = server.pids()
    out_path = log_dir / f"strace-{server.spec.name}-{scenario.name}.txt"
    cmd = ["taskset", "-c", str(CLIENT_CORE), "strace", "-c", "-f", "-o", str(out_path)]
    for pid in pids:
        cmd += ["-p", str(pid)]
    with KeepAliveClient(server.port, scenario, scenario.connections, stall=10) as client:
        # One request per connection first, untraced: the count is then of keep-alive traffic
        # alone, not of accepts and per-connection setup.
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
        "method": "strace",
        "requests": answered,
        "complete": True,
        "calls": total,
        "per_request": total / answered,
        "top_per_request": {name: round(n / answered, 3) for name, n in top},
    }


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


# --- idle connections -------------------------------------------------------------------------


def hold_idle(port: int, count: int, hold_limit: float) -> int:
    """The helper process: opens `count` keep-alive connections (non-blocking connects, at most
    IDLE_WAVE in flight), makes one request on each, reports, then holds them idle until told
    "close" on stdin or `hold_limit` seconds pass. Prints one JSON line per phase."""
    _raise_nofile()
    started = time.monotonic()
    request = f"GET / HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode()
    ep = select.epoll()
    socks: dict[int, socket.socket] = {}
    connecting: set[int] = set()
    waiting: dict[int, bytearray] = {}  # request sent, response not complete
    held: set[int] = set()
    failures: dict[str, int] = {}
    closed_by_server = 0
    opened = 0

    def drop(fd: int, reason: str | None) -> None:
        ep.unregister(fd)
        socks.pop(fd).close()
        connecting.discard(fd)
        waiting.pop(fd, None)
        held.discard(fd)
        if reason:
            failures[reason] = failures.get(reason, 0) + 1

    def on_held(fd: int) -> None:
        nonlocal closed_by_server
        try:
            data = socks[fd].recv(65536)
        except OSError:
            data = b""
        if not data:  # stray bytes on a held connection are ignored; EOF or reset is counted
            closed_by_server += 1
            drop(fd, None)

    open_deadline = started + IDLE_OPEN_TIMEOUT
    while (opened < count or connecting or waiting) and time.monotonic() < open_deadline:
        while opened < count and len(connecting) + len(waiting) < IDLE_WAVE:
            opened += 1
            sock = socket.socket()
            sock.setblocking(False)
            err = sock.connect_ex((HOST, port))
            if err not in (0, errno.EINPROGRESS):
                sock.close()
                name = errno.errorcode.get(err, str(err))
                failures[name] = failures.get(name, 0) + 1
                continue
            socks[sock.fileno()] = sock
            connecting.add(sock.fileno())
            ep.register(sock.fileno(), select.EPOLLOUT)
        for fd, _events in ep.poll(0.2):
            if fd not in socks:
                continue
            sock = socks[fd]
            if fd in connecting:
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    drop(fd, errno.errorcode.get(err, str(err)))
                    continue
                connecting.discard(fd)
                if sock.send(request) != len(request):
                    drop(fd, "short send")
                    continue
                waiting[fd] = bytearray()
                ep.modify(fd, select.EPOLLIN)
            elif fd in waiting:
                try:
                    data = sock.recv(65536)
                except OSError as exc:
                    drop(fd, errno.errorcode.get(exc.errno or 0, str(exc)))
                    continue
                if not data:
                    drop(fd, "closed before answering")
                    continue
                waiting[fd] += data
                try:
                    answered, _closes = _take_responses(waiting[fd], HELLO_BODY)
                except BenchError as exc:
                    drop(fd, f"bad response: {exc}")
                    continue
                if answered:
                    del waiting[fd]
                    held.add(fd)  # a server that said Connection: close shows up as closed
            else:
                on_held(fd)
    for fd in [*connecting, *waiting]:
        drop(fd, f"no answer within {IDLE_OPEN_TIMEOUT:.0f} s")
    if opened < count:
        # The wave stayed full of connections the server never answered.
        failures[f"not tried within {IDLE_OPEN_TIMEOUT:.0f} s"] = count - opened
    answered_total = len(held) + closed_by_server
    print(
        json.dumps(
            {
                "event": "opened",
                "requested": count,
                "answered": answered_total,
                "held": len(held),
                "failures": failures,
                "seconds": round(time.monotonic() - started, 2),
            }
        ),
        flush=True,
    )
    ep.register(sys.stdin.fileno(), select.EPOLLIN)
    hold_deadline = started + hold_limit
    told = False
    while not told and time.monotonic() < hold_deadline:
        for fd, _events in ep.poll(1.0):
            if fd == sys.stdin.fileno():
                told = True  # "close", or EOF when the harness went away
            elif fd in socks:
                on_held(fd)
    result = {
        "event": "closed",
        "held_at_end": len(held),
        "closed_by_server": closed_by_server,
        "told": told,
        "seconds": round(time.monotonic() - started, 2),
    }
    for fd in list(socks):
        drop(fd, None)
    print(json.dumps(result), flush=True)
    return 0


class IdleConnections:
    """Runs hold_idle in a helper process pinned to the client core, and talks to it."""

    def __init__(self, port: int, count: int, hold_limit: float, log_dir: Path):
        cmd = [
            "taskset",
            "-c",
            str(CLIENT_CORE),
            sys.executable,
            str(Path(__file__).resolve()),
            "--hold-idle",
            str(port),
            str(count),
            str(int(hold_limit)),
        ]
        self.stderr_path = log_dir / "idle-helper.stderr"
        with open(self.stderr_path, "ab") as err:
            self.proc: subprocess.Popen[str] = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                start_new_session=True,
                preexec_fn=_raise_nofile,
            )

    def _line(self, timeout: float) -> dict[str, Any]:
        out: IO[str] = self.proc.stdout  # type: ignore[assignment]
        ready, _, _ = select.select([out], [], [], timeout)
        line = out.readline() if ready else ""
        if not line:
            status = self.proc.poll()
            state = "silent" if status is None else f"exited with {status}"
            raise BenchError(f"idle-connection helper {state}: {_tail(_read(self.stderr_path))}")
        result: dict[str, Any] = json.loads(line)
        return result

    def opened(self) -> dict[str, Any]:
        return self._line(IDLE_OPEN_TIMEOUT + 30)

    def close(self) -> dict[str, Any]:
        stdin: IO[str] = self.proc.stdin  # type: ignore[assignment]
        stdin.write("close\n")
        stdin.flush()
        return self._line(60)

    def __enter__(self) -> IdleConnections:
        return self

    def __exit__(self, *exc_info: object) -> None:
        stop_process_group(self.proc)


# --- one measurement --------------------------------------------------------------------------


def _timed_run(
    row: dict[str, Any], server: RunningServer, scenario: Scenario, seconds: int
) -> None:
    """The measured wrk run: wrk's figures, and the server's CPU and RSS over it."""
    ticks = os.sysconf("SC_CLK_TCK")
    pids = server.pids()
    everyone0 = all_cpu_ticks()
    user0, sys0 = cpu_ticks(pids)
    wrk = run_wrk(scenario, server.port, seconds)
    # Workers started during the run would be missed by the first list, so re-list.
    pids = server.pids()
    user1, sys1 = cpu_ticks(pids)
    ours = {*pids, *process_tree(os.getpid())}
    row["others_cores"] = others_cpu_s(everyone0, all_cpu_ticks(), ours) / wrk["duration_s"]
    row.update(wrk)
    row["processes"] = len(pids)
    row["cpu_user_s"] = (user1 - user0) / ticks
    row["cpu_sys_s"] = (sys1 - sys0) / ticks
    n = wrk["requests"]
    for key, seconds_used in (
        ("cpu_us_per_request", row["cpu_user_s"] + row["cpu_sys_s"]),
        ("cpu_user_us_per_request", row["cpu_user_s"]),
        ("cpu_sys_us_per_request", row["cpu_sys_s"]),
    ):
        row[key] = seconds_used * 1e6 / n if n else None
    row["rss_kib"] = rss_kib(pids)


def _syscall_passes(
    row: dict[str, Any],
    server: RunningServer,
    scenario: Scenario,
    round_no: int,
    args: argparse.Namespace,
    log_dir: Path,
) -> None:
    if row["check"] != "ok":
        # It would only wait out the stall timeout on a server that already failed.
        row["syscalls"] = {"error": "skipped: the correctness check failed"}
        return
    if args.count_requests:
        try:
            if args.perf_error is None:
                row["syscalls"] = count_syscalls_perf(
                    server, scenario, args.count_requests, log_dir
                )
            else:
                row["syscalls"] = count_syscalls_strace(
                    server, scenario, args.count_requests, log_dir
                )
        except (OSError, BenchError, subprocess.SubprocessError) as exc:
            row["syscalls"] = {"error": str(exc)}
    if scenario.name == MAIN and round_no == 1 and args.strace_requests:
        try:
            row["strace"] = count_syscalls_strace(server, scenario, args.strace_requests, log_dir)
        except (OSError, BenchError, subprocess.SubprocessError) as exc:
            row["strace"] = {"error": str(exc)}


def measure(
    spec: ServerSpec, scenario: Scenario, round_no: int, args: argparse.Namespace, log_dir: Path
) -> dict[str, Any]:
    row: dict[str, Any] = {"scenario": scenario.name, "round": round_no, "server": spec.name}
    with running_server(spec, scenario, log_dir) as server:
        row["check"], row["reconnects"] = check_responses(server.port, scenario)
        if args.warmup:
            run_wrk(scenario, server.port, args.warmup)
        if scenario.idle:
            before = run_wrk(scenario, server.port, args.duration)
            idle: dict[str, Any] = {
                "connections": scenario.idle,
                "before": {k: before[k] for k in ("req_per_s", "p99_us", "requests", "errors")},
                "rss_before_kib": rss_kib(server.pids()),
            }
            hold_limit = 3 * args.duration + COUNT_PASS_LIMIT_S + IDLE_OPEN_TIMEOUT + 120
            with IdleConnections(server.port, scenario.idle, hold_limit, log_dir) as helper:
                idle["opened"] = helper.opened()
                idle["rss_held_kib"] = rss_kib(server.pids())
                _timed_run(row, server, scenario, args.duration)
                idle["rss_held_after_load_kib"] = row["rss_kib"]
                _syscall_passes(row, server, scenario, round_no, args, log_dir)
                idle["closed"] = helper.close()
            held = max(idle["rss_held_kib"], idle["rss_held_after_load_kib"])
            idle["rss_growth_kib"] = held - idle["rss_before_kib"]
            base = idle["before"]["req_per_s"]
            idle["req_per_s_kept"] = row["req_per_s"] / base if base else None
            row["idle"] = idle
        else:
            _timed_run(row, server, scenario, args.duration)
            _syscall_passes(row, server, scenario, round_no, args, log_dir)
        row["check_after"], _ = check_responses(server.port, scenario)
        if server.proc.poll() is not None:
            raise BenchError(f"exited with {server.proc.returncode} during the run")
    return row


def _ok(row: dict[str, Any]) -> bool:
    return "error" not in row and "skipped" not in row


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's req/s, CPU and syscalls per request relative to uringserve on io_uring's in
    the same scenario and round."""
    base = {(r["scenario"], r["round"]): r for r in rows if r["server"] == OURS and _ok(r)}
    for r in rows:
        b = base.get((r["scenario"], r["round"]))
        if not b or not _ok(r):
            continue
        r["vs_ours_req_per_s"] = r["req_per_s"] / b["req_per_s"] if b["req_per_s"] else None
        if r.get("cpu_us_per_request") and b.get("cpu_us_per_request"):
            r["vs_ours_cpu"] = r["cpu_us_per_request"] / b["cpu_us_per_request"]
        mine, theirs = r.get("syscalls", {}), b.get("syscalls", {})
        if mine.get("per_request") and theirs.get("per_request"):
            r["vs_ours_syscalls"] = mine["per_request"] / theirs["per_request"]


# --- targets ----------------------------------------------------------------------------------


def _find(results: list[dict[str, Any]], scenario: str, server: str) -> list[dict[str, Any]]:
    """The measured rows of one server in one scenario, by round."""
    rows = [r for r in results if r["scenario"] == scenario and r["server"] == server]
    return sorted((r for r in rows if _ok(r)), key=lambda r: r["round"])


def _per_request_syscalls(row: dict[str, Any]) -> float | None:
    value = row.get("syscalls", {}).get("per_request")
    return float(value) if value is not None else None


def _correct_enough(row: dict[str, Any]) -> bool:
    """Both checks passed (wrk's socket errors aside: a server that closes shows some)."""
    return row.get("check") == "ok" and row.get("check_after") == "ok"


def _correct(row: dict[str, Any]) -> bool:
    return (
        row.get("check") == "ok"
        and row.get("check_after") == "ok"
        and not any(row.get("errors", {}).values())
    )


def _ratio_target(
    results: list[dict[str, Any]],
    scenario: str,
    other: str,
    metric: Callable[[dict[str, Any]], float | None],
    fmt: str,
    unit: str,
    limit: float,
    at_most: bool,
) -> list[dict[str, Any]]:
    """One check per round: ours / other's metric, against `limit`."""
    checks = []
    for mine in _find(results, scenario, OURS):
        theirs = [r for r in _find(results, scenario, other) if r["round"] == mine["round"]]
        a = metric(mine)
        b = metric(theirs[0]) if theirs else None
        if a is None or not b:
            checks.append({"round": mine["round"], "measured": f"{other}: not measured"})
            continue
        ratio = a / b
        checks.append(
            {
                "round": mine["round"],
                "value": ratio,
                "ok": ratio <= limit if at_most else ratio >= limit,
                "measured": f"{a:{fmt}} / {b:{fmt}}{unit} = {ratio:.2f}x",
            }
        )
    return checks


def compute_targets(results: list[dict[str, Any]], idle_connections: int) -> list[dict[str, Any]]:
    """Issue 4's targets, each checked from this run's numbers only."""

    def cpu(r: dict[str, Any]) -> float | None:
        value = r.get("cpu_us_per_request")
        return float(value) if value is not None else None

    def rate(r: dict[str, Any]) -> float | None:
        return float(r["req_per_s"])

    targets: list[dict[str, Any]] = []

    def add(name: str, requirement: str, checks: list[dict[str, Any]]) -> None:
        targets.append({"name": name, "requirement": requirement, "checks": checks})

    add(
        "CPU per request, c64, vs bjoern",
        "ours / bjoern ≤ 0.80",
        _ratio_target(results, MAIN, BJOERN, cpu, ".2f", " µs", 0.8, at_most=True),
    )
    add(
        "CPU per request, c64, vs the C limit",
        "ours / limit ≤ 1.20",
        _ratio_target(results, MAIN, LIMIT, cpu, ".2f", " µs", 1.2, at_most=True),
    )
    add(
        "req/s, c64, vs bjoern",
        "ours / bjoern ≥ 1.00",
        _ratio_target(results, MAIN, BJOERN, rate, ",.0f", " req/s", 1.0, at_most=False),
    )
    checks = []
    for r in _find(results, "pipeline16-c64", OURS):
        errors = sum(r.get("errors", {}).values())
        checks.append(
            {
                "round": r["round"],
                "value": r["req_per_s"],
                "ok": r["req_per_s"] >= 400_000 and _correct(r),
                "measured": f"{r['req_per_s']:,.0f} req/s; checks {r.get('check')} before and "
                f"{r.get('check_after')} after the load; wrk errors {errors}",
            }
        )
    add(
        "pipelined 16 deep, c64",
        "≥ 400,000 req/s, every checked response correct and no wrk error",
        checks,
    )
    checks = []
    for c256 in _find(results, "hello-c256", OURS):
        for c64 in _find(results, MAIN, OURS):
            ratio = c256["req_per_s"] / c64["req_per_s"]
            checks.append(
                {
                    "round": c64["round"],
                    "value": ratio,
                    "ok": ratio >= 0.95,
                    "measured": f"{c256['req_per_s']:,.0f} / {c64['req_per_s']:,.0f} req/s "
                    f"(c64 round {c64['round']}) = {ratio:.2f}x",
                }
            )
    add("req/s at c256 vs our own c64", "c256 / c64 ≥ 0.95", checks)
    checks = []
    for r in _find(results, "hello-c256", OURS):
        p99 = r.get("p99_us")
        checks.append(
            {
                "round": r["round"],
                "value": p99,
                "ok": p99 is not None and p99 <= 2000,
                "measured": f"{p99 / 1000:.2f} ms" if p99 is not None else "p99 unknown",
            }
        )
    add("p99 at c256", "≤ 2 ms", checks)
    checks = []
    for r in _find(results, MAIN, OURS):
        per = _per_request_syscalls(r)
        refs = []
        for other in (LIMIT, BJOERN):
            same = [o for o in _find(results, MAIN, other) if o["round"] == r["round"]]
            ref = _per_request_syscalls(same[0]) if same else None
            if ref is not None:
                refs.append(f"{other} {ref:.2f}")
        method = r.get("syscalls", {}).get("method", "-")
        extra = f" ({', '.join(refs)})" if refs else ""
        checks.append(
            {
                "round": r["round"],
                "value": per,
                "ok": per <= 0.6 if per is not None else None,
                "measured": (
                    f"{per:.3f} by {method}{extra}"
                    if per is not None
                    else f"not measured: {r.get('syscalls', {}).get('error', '-')}"
                ),
            }
        )
    add(
        "syscalls per request, c64",
        "≤ 0.6, counted by perf stat -e raw_syscalls:sys_enter",
        checks,
    )
    add(
        "CPU per request, Connection: close c64, vs bjoern",
        "ours / bjoern ≤ 0.67",
        _ratio_target(results, "close-c64", BJOERN, cpu, ".2f", " µs", 0.67, at_most=True),
    )
    checks = []
    kept_checks = []
    for r in _find(results, "idle10k-c64", OURS):
        idle = r.get("idle", {})
        opened = idle.get("opened", {})
        closed = idle.get("closed", {})
        held_all = (
            opened.get("held") == idle_connections and closed.get("held_at_end") == idle_connections
        )
        growth = idle.get("rss_growth_kib")
        held_text = (
            f"{closed.get('held_at_end', '?')} of {idle_connections} still held after the load"
        )
        if growth is not None:
            checks.append(
                {
                    "round": r["round"],
                    "value": growth / MIB,
                    "ok": held_all and growth <= 4 * MIB,
                    "measured": f"{growth / MIB:+.1f} MiB ({idle['rss_before_kib'] / MIB:.1f} "
                    f"before, {idle['rss_held_kib'] / MIB:.1f} held, "
                    f"{idle['rss_held_after_load_kib'] / MIB:.1f} after the load); {held_text}",
                }
            )
        kept = idle.get("req_per_s_kept")
        if kept is not None:
            kept_checks.append(
                {
                    "round": r["round"],
                    "value": kept,
                    "ok": held_all and kept >= 0.95,
                    "measured": f"{r['req_per_s']:,.0f} held / {idle['before']['req_per_s']:,.0f}"
                    f" before = {kept:.2f}x; {held_text}",
                }
            )
    add(
        f"{idle_connections:,} idle keep-alive connections: RSS",
        "grows by ≤ 4 MiB (all connections held)",
        checks,
    )
    add(
        f"{idle_connections:,} idle keep-alive connections: c64 traffic",
        "req/s while held / req/s just before ≥ 0.95 (same server process)",
        kept_checks,
    )
    checks = []
    for mine in _find(results, "hello-c256", OURS):
        for theirs in _find(results, "hello-c256", EPOLL):
            parts = [
                f"req/s {mine['req_per_s']:,.0f} vs {theirs['req_per_s']:,.0f} "
                f"({mine['req_per_s'] / theirs['req_per_s']:.2f}x)"
            ]
            if mine.get("cpu_us_per_request") and theirs.get("cpu_us_per_request"):
                parts.append(
                    f"CPU {mine['cpu_us_per_request']:.2f} vs "
                    f"{theirs['cpu_us_per_request']:.2f} µs/req "
                    f"({mine['cpu_us_per_request'] / theirs['cpu_us_per_request']:.2f}x)"
                )
            if mine.get("p99_us") and theirs.get("p99_us"):
                parts.append(f"p99 {mine['p99_us'] / 1000:.2f} vs {theirs['p99_us'] / 1000:.2f} ms")
            checks.append({"round": mine["round"], "measured": "; ".join(parts), "report": True})
    add("io_uring vs our epoll path, c256", "reported", checks)
    for t in targets:
        t["verdict"] = _verdict(t["checks"])
    return targets


def _verdict(checks: list[dict[str, Any]]) -> str:
    if checks and all(c.get("report") for c in checks):
        return "reported"
    known = [c["ok"] for c in checks if c.get("ok") is not None]
    if not known:
        return "not measured"
    if len(known) == len(checks) and all(known):
        return "met"
    if not any(known):
        return "not met"
    return f"met in {sum(known)} of {len(checks)}"


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
    memory = "unknown"
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        memory = f"{int(f.readline().split()[1]) / MIB / MIB:.0f} GiB"
    return {
        "kernel": platform.release(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": memory,
        "server_core": SERVER_CORE,
        "client_core": CLIENT_CORE,
        "loadavg_start": os.getloadavg(),
    }


def versions() -> dict[str, str]:
    dpkg = ["dpkg-query", "-W", "-f", "${Version}"]
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
        "perf": _first_line(["perf", "--version"]),
        "strace": _first_line(["strace", "-V"]),
        "gcc": _first_line(["gcc", "--version"]),
        "liburing": _first_line([*dpkg, "liburing-dev"]),
    }
    for package in BENCH_PACKAGES:
        found[package] = (BENCH_PY.exists() and _installed_version(BENCH_PY, package)) or "missing"
    return found


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _cell(text: str, limit: int) -> str:
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return text.replace("|", "\\|").replace("\n", " ")  # a bare | would end the table cell


def _label(row: dict[str, Any], rounds: dict[str, int]) -> str:
    return (
        f"{row['scenario']} #{row['round']}"
        if rounds.get(row["scenario"], 1) > 1
        else (row["scenario"])
    )


def _notes_cell(row: dict[str, Any]) -> str:
    if "skipped" in row:
        return f"n/a: {_cell(row['skipped'], 200)}"
    if "error" in row:
        return f"**{_cell(row['error'], 240)}**"
    parts = [f"{k} {v}" for k, v in row["errors"].items() if v]
    for key, when in (("check", "before"), ("check_after", "after")):
        if row.get(key) != "ok":
            parts.append(f"**check {when} {row.get(key)}**")
    if row.get("reconnects") and row["scenario"] not in CLOSE_SCENARIOS:
        parts.append("closes after each response")
    syscalls = row.get("syscalls", {})
    if "error" in syscalls:
        parts.append(f"syscalls: {syscalls['error']}")
    elif syscalls and not syscalls.get("complete", True):
        parts.append(f"count pass ended by its time bound at {syscalls['requests']} requests")
    return _cell(", ".join(parts), 240) or "0"


def _syscall_label(report: dict[str, Any]) -> str:
    return "perf" if report["settings"]["syscall_method"] == "perf" else "strace"


def render_header(report: dict[str, Any]) -> list[str]:
    m, v, s = report["machine"], report["versions"], report["settings"]
    load = ", ".join(f"{x:.2f}" for x in m["loadavg_start"])
    others = [r["others_cores"] for r in report["results"] if r.get("others_cores") is not None]
    others_text = (
        f"other processes used {sum(others) / len(others):.2f} cores on average during the "
        f"timed runs, {max(others):.2f} at most (the *others* column)"
        if others
        else "no timed run"
    )
    if s["syscall_method"] == "perf":
        syscalls = (
            f"syscalls/req from `perf stat -e {SYSCALL_EVENT} -p PIDS` while wrk (count.lua) "
            f"makes {s['count_requests']:,} requests of the scenario's shape"
        )
    else:
        syscalls = (
            f"syscalls/req from **strace -c -f, not perf** ({s['perf_error']}) over "
            f"{s['count_requests']:,} requests: strace slows the server and changes its batching"
        )
    return [
        f"Run {report['started']} with `{report['command']}`, {report.get('elapsed_s', '?')} s.",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory']}, kernel {m['kernel']}; "
        f"server on core {m['server_core']} (`taskset -c {m['server_core']}`), `wrk -t1` on "
        f"core {m['client_core']}, loopback. Load average before the run {load}; "
        f"{others_text}.",
        f"- Versions: Python {v['python']}, uringserve {v['uringserve']} "
        f"({v['uringserve_commit']}), bjoern {v['bjoern']}, granian {v['granian']}, gunicorn "
        f"{v['gunicorn']}, the limit built by {v['gcc']} -O2 against liburing {v['liburing']}; "
        f"{v['wrk']}, {v['perf']}, {v['strace']}, matplotlib {v['matplotlib']}.",
        f"- {s['duration_s']} s per timed run after a {s['warmup_s']} s warm-up; {syscalls}. "
        "CPU from utime/stime of /proc/PID/stat over the server's process tree; RSS is VmRSS "
        "summed over it, after the load. *others*: CPU cores that other processes on the "
        "machine (not the server, wrk or this harness) used during the timed run: where it is "
        "well above 0, another workload competed for the two cores and the row is noisy. "
        "Ratios are against uringserve on io_uring in the same "
        "scenario and round. Under pipelining wrk times each 16-request batch as one; a p99 it "
        "cannot rank is -.",
    ]


def render_targets(report: dict[str, Any]) -> list[str]:
    lines = [
        "| target | requirement | measured (ours = uringserve on io_uring) | verdict |",
        "|---|---|---|---|",
    ]
    for t in report["targets"]:
        if t["checks"]:
            measured = "<br>".join(
                (f"#{c['round']}: " if len(t["checks"]) > 1 else "") + c["measured"]
                for c in t["checks"]
            )
        else:
            measured = "not measured in this run"
        verdict = f"**{t['verdict']}**" if t["verdict"] == "met" else t["verdict"]
        lines.append(f"| {t['name']} | {t['requirement']} | {_cell(measured, 600)} | {verdict} |")
    lines += [
        "",
        "Each verdict is computed from the measured numbers above (`compute_targets` in "
        "benches/http_bench.py); a target with one check per round of the main scenario is met "
        "only when every round meets it.",
    ]
    return lines


def render_results(report: dict[str, Any]) -> list[str]:
    label = _syscall_label(report)
    rounds = {sc["name"]: sc["rounds"] for sc in report["scenarios"]}
    lines = [
        "| scenario | server | req/s | vs ours | p99 | CPU µs/req | user | sys | vs ours "
        f"| syscalls/req ({label}) | RSS MiB | others | errors, notes |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in report["results"]:
        if not _ok(r):
            dashes = "| - " * 10
            lines.append(f"| {_label(r, rounds)} | {r['server']} {dashes}| {_notes_cell(r)} |")
            continue
        p99 = r.get("p99_us")
        lines.append(
            f"| {_label(r, rounds)} | {r['server']} | {r['req_per_s']:,.0f} "
            f"| {_fmt(r.get('vs_ours_req_per_s'), '.2f', 'x')} "
            f"| {_fmt(p99 / 1000 if p99 is not None else None, '.2f', ' ms')} "
            f"| {_fmt(r.get('cpu_us_per_request'), '.2f')} "
            f"| {_fmt(r.get('cpu_user_us_per_request'), '.2f')} "
            f"| {_fmt(r.get('cpu_sys_us_per_request'), '.2f')} "
            f"| {_fmt(r.get('vs_ours_cpu'), '.2f', 'x')} "
            f"| {_fmt(r.get('syscalls', {}).get('per_request'), '.3f')} "
            f"| {_fmt(r.get('rss_kib', 0) / MIB, '.1f')} "
            f"| {_fmt(r.get('others_cores'), '.2f')} "
            f"| {_notes_cell(r)} |"
        )
    return lines


def render_noise(report: dict[str, Any]) -> list[str]:
    lines = [
        "| server | req/s #1 | req/s #2 | spread | CPU µs/req #1 | #2 | spread | syscalls/req #1 "
        "| #2 | others #1 | #2 |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for s in report["servers"]:
        rows = _find(report["results"], MAIN, s["name"])
        if len(rows) < 2:
            continue
        a, b = rows[0], rows[1]

        def spread(x: float | None, y: float | None) -> str:
            return "-" if not x or not y else f"{abs(x - y) / min(x, y) * 100:.1f}%"

        lines.append(
            f"| {s['name']} | {a['req_per_s']:,.0f} | {b['req_per_s']:,.0f} "
            f"| {spread(a['req_per_s'], b['req_per_s'])} "
            f"| {_fmt(a.get('cpu_us_per_request'), '.2f')} "
            f"| {_fmt(b.get('cpu_us_per_request'), '.2f')} "
            f"| {spread(a.get('cpu_us_per_request'), b.get('cpu_us_per_request'))} "
            f"| {_fmt(_per_request_syscalls(a), '.3f')} | {_fmt(_per_request_syscalls(b), '.3f')} "
            f"| {_fmt(a.get('others_cores'), '.2f')} | {_fmt(b.get('others_cores'), '.2f')} |"
        )
    return lines


def render_idle(report: dict[str, Any]) -> list[str]:
    lines = [
        "| server | answered / held / still held after the load | RSS before MiB | held "
        "| after the load | growth | req/s before | req/s held | kept | p99 held | helper "
        "failures |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in report["results"]:
        idle = r.get("idle")
        if not idle or not _ok(r):
            continue
        opened, closed = idle.get("opened", {}), idle.get("closed", {})
        failures = ", ".join(f"{k} {v}" for k, v in opened.get("failures", {}).items()) or "0"
        p99 = r.get("p99_us")
        lines.append(
            f"| {r['server']} | {opened.get('answered', '-')} / {opened.get('held', '-')} / "
            f"{closed.get('held_at_end', '-')} "
            f"| {idle['rss_before_kib'] / MIB:.1f} | {idle['rss_held_kib'] / MIB:.1f} "
            f"| {idle['rss_held_after_load_kib'] / MIB:.1f} "
            f"| {idle['rss_growth_kib'] / MIB:+.1f} "
            f"| {idle['before']['req_per_s']:,.0f} | {r['req_per_s']:,.0f} "
            f"| {_fmt(idle.get('req_per_s_kept'), '.2f', 'x')} "
            f"| {_fmt(p99 / 1000 if p99 is not None else None, '.2f', ' ms')} "
            f"| {_cell(failures, 120)} |"
        )
    return lines


def render_strace(report: dict[str, Any]) -> list[str]:
    lines = ["| server | syscalls/req under strace | most frequent per request |", "|---|--:|---|"]
    for r in report["results"]:
        st = r.get("strace")
        if not st:
            continue
        if "error" in st:
            lines.append(f"| {r['server']} | - | {_cell(st['error'], 200)} |")
            continue
        top = ", ".join(f"{k} {n:.2f}" for k, n in st["top_per_request"].items())
        lines.append(f"| {r['server']} | {st['per_request']:.2f} | {top} |")
    return lines


def render_markdown(report: dict[str, Any], chart: str | None) -> str:
    s = report["settings"]
    lines = [
        "# HTTP benchmark: uringserve against peer WSGI servers and the io_uring limit",
        "",
        *render_header(report),
        "",
    ]
    if chart:
        lines += [f"![req/s, CPU and syscalls per request]({chart})", ""]
    lines += [
        "## Targets (issue 4), computed from this run",
        "",
        *render_targets(report),
        "",
        "## Results",
        "",
        *render_results(report),
        "",
        f"## Noise: {MAIN} twice, interleaved (every server once, then every server again)",
        "",
        *render_noise(report),
        "",
        f"## {s['idle_connections']:,} idle keep-alive connections (idle10k-c64)",
        "",
        "A helper process on the client core opens the connections (non-blocking connects, "
        f"{IDLE_WAVE} in flight), makes one request on each and holds them idle. Before: a "
        f"{s['duration_s']} s c64 run and the RSS in the same server process just before the "
        "connections open. Growth is the larger of the two held RSS figures minus the one before.",
        "",
        *render_idle(report),
        "",
    ]
    if any("strace" in r for r in report["results"]):
        lines += [
            f"## Syscall breakdown: strace -c -f, {MAIN} round 1, {s['strace_requests']:,} "
            "requests (an extra)",
            "",
            "A Python keep-alive client drives the server while strace stops it at every "
            "syscall, so batching differs from the timed run: the syscalls/req column above "
            "comes from perf, this shows which calls they are.",
            "",
            *render_strace(report),
            "",
        ]
    if report["skipped"]:
        lines += ["## Skipped servers", ""]
        lines += [f"- {name}: {why}" for name, why in report["skipped"].items()]
        lines.append("")
    lines += [
        "Servers: " + "; ".join(f"{sv['name']}: {sv['about']}" for sv in report["servers"]) + ".",
        "",
        "Scenarios: "
        + "; ".join(f"{sc['name']}: {sc['about']}" for sc in report["scenarios"])
        + ".",
        "",
    ]
    return "\n".join(lines)


def render_readme_block(report: dict[str, Any], chart: str | None) -> str:
    lines = [README_BEGIN, ""]
    if chart:
        lines += [f"![HTTP benchmark: req/s, CPU and syscalls per request]({chart})", ""]
    lines += [
        *render_header(report),
        "",
        "#### Targets (issue 4), computed from this run",
        "",
        *render_targets(report),
        "",
        "#### Results",
        "",
        *render_results(report),
        "",
        "The noise (two rounds of the main scenario), idle-connection and strace-breakdown "
        "tables are in [benches/results/http_bench.md](benches/results/http_bench.md), every "
        "figure in [benches/results/http_bench.json](benches/results/http_bench.json).",
        "",
        README_END,
    ]
    return "\n".join(lines)


def update_readme(block: str) -> bool:
    text = README.read_text()
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        log(f"README.md has no {README_BEGIN} ... {README_END} block; not updated")
        return False
    README.write_text(text[:begin] + block + text[end + len(README_END) :])
    return True


# --- chart (runs in the bench venv, where matplotlib is) --------------------------------------


def render_chart(json_path: Path, png_path: Path) -> None:
    """A grid of bar charts: one column per scenario (and round), rows req/s, server CPU µs per
    request (user and sys stacked), syscalls per request; one colour per server."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a benchmark machine
    import matplotlib.pyplot as plt

    report = json.loads(json_path.read_text())
    rounds = {sc["name"]: sc["rounds"] for sc in report["scenarios"]}
    servers = [s["name"] for s in report["servers"]]
    rows = [r for r in report["results"] if _ok(r)]
    columns: list[str] = []
    for r in report["results"]:
        if _label(r, rounds) not in columns:
            columns.append(_label(r, rounds))
    colors = {name: plt.get_cmap("tab10")(i) for i, name in enumerate(servers)}
    metrics: list[tuple[str, Callable[[dict[str, Any]], float | None]]] = [
        ("req/s", lambda r: r["req_per_s"]),
        ("server CPU µs/req (dark: user, light: sys)", lambda r: r.get("cpu_us_per_request")),
        (f"syscalls/req ({_syscall_label(report)})", _per_request_syscalls),
    ]
    fig, axes = plt.subplots(
        len(metrics), len(columns), figsize=(2.6 * len(columns), 8.5), squeeze=False
    )
    for col, name in enumerate(columns):
        by_server = {r["server"]: r for r in rows if _label(r, rounds) == name}
        for row_i, (title, metric) in enumerate(metrics):
            ax = axes[row_i][col]
            names = [s for s in servers if s in by_server and metric(by_server[s]) is not None]
            values = [float(metric(by_server[s]) or 0.0) for s in names]
            xs = range(len(names))
            # A server that failed its correctness check is hatched: its bars are not results.
            hatches = ["" if _correct_enough(by_server[s]) else "///" for s in names]
            if row_i == 1:
                users = [by_server[s].get("cpu_user_us_per_request") or 0.0 for s in names]
                ax.bar(xs, users, color=[colors[s] for s in names], hatch=hatches)
                ax.bar(
                    xs,
                    [v - u for v, u in zip(values, users, strict=True)],
                    bottom=users,
                    color=[colors[s] for s in names],
                    alpha=0.45,
                    hatch=hatches,
                )
            else:
                ax.bar(xs, values, color=[colors[s] for s in names], hatch=hatches)
            for x, v in zip(xs, values, strict=True):
                ax.text(x, 0, f" {_short(v)}", ha="center", va="bottom", rotation=90, fontsize=6)
            # A slow outlier (gunicorn) would flatten every other bar: clip it and label it.
            positive = sorted(v for v in values if v > 0)
            if len(positive) >= 3 and positive[-1] > 4 * positive[len(positive) // 2]:
                top = 4 * positive[len(positive) // 2]
                ax.set_ylim(0, top * 1.1)
                for x, v in zip(xs, values, strict=True):
                    if v > top:
                        ax.text(x, top * 1.02, f"{v:,.0f}", ha="center", va="bottom", fontsize=7)
            ax.set_xticks([])
            ax.tick_params(axis="y", labelsize=7)
            ax.grid(axis="y", alpha=0.3)
            if row_i == 0:
                ax.set_title(name, fontsize=9)
            if col == 0:
                ax.set_ylabel(title, fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[s]) for s in servers]
    handles.append(plt.Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="black", hatch="///"))
    labels = [*servers, "correctness check failed"]
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9)
    m = report["machine"]
    fig.suptitle(
        f"uringserve HTTP benchmark, {report['started']}\n{m['cpu']}, {m['cores']} cores, "
        f"kernel {m['kernel']}; server on core {m['server_core']}, wrk -t1 on core "
        f"{m['client_core']}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    fig.savefig(png_path, dpi=90)


def _short(value: float) -> str:
    """A bar label: 102k, 9.6, 0.43."""
    if value >= 10_000:
        return f"{value / 1000:.0f}k"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.2g}" if value < 1 else f"{value:.1f}"


def make_chart(json_path: Path, png_path: Path) -> str | None:
    """Renders the chart with the bench venv's matplotlib; returns why it could not, or None."""
    if not BENCH_PY.exists():
        return f"no bench venv at {BENCH_VENV}"
    cmd = [str(BENCH_PY), str(Path(__file__).resolve()), "--render-chart", str(json_path)]
    out = subprocess.run(
        [*cmd, str(png_path)], capture_output=True, text=True, timeout=300, check=False
    )
    if out.returncode != 0:
        return f"chart failed ({out.returncode}): {_tail(out.stderr or out.stdout)}"
    return None


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
    # None: the full run's default, or --quick's (first number, then the second).
    p.add_argument("--duration", type=int, help="seconds of load per timed run (8; quick 2)")
    p.add_argument("--warmup", type=int, default=1, help="seconds of unmeasured load first (1)")
    p.add_argument(
        "--count-requests",
        type=int,
        help="requests in each syscall-count pass (20000; quick 5000); 0 skips the passes",
    )
    p.add_argument(
        "--strace-requests",
        type=int,
        help=f"requests in the strace breakdown pass of {MAIN} #1 (5000; quick 1000); 0 skips",
    )
    p.add_argument(
        "--idle-connections",
        type=int,
        help="idle keep-alive connections held in idle10k-c64 (10000; quick 2000)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 s runs, short count passes, 2,000 idle connections",
    )
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
    p.add_argument(
        "--readme",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="rewrite README.md's results block (default: only for a full, complete run)",
    )
    p.add_argument(
        "--build-limit", action="store_true", help="install and build the C responder, then exit"
    )
    p.add_argument("--serve-bjoern", nargs=2, metavar=("APP", "PORT"), help=argparse.SUPPRESS)
    p.add_argument("--hold-idle", nargs=3, metavar=("PORT", "N", "S"), help=argparse.SUPPRESS)
    p.add_argument("--render-chart", nargs=2, metavar=("JSON", "PNG"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name, full, quick in (
        ("duration", 8, 2),
        ("count_requests", 20_000, 5_000),
        ("strace_requests", 5_000, 1_000),
        ("idle_connections", 10_000, 2_000),
    ):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.readme is None:
        args.readme = not (args.quick or args.servers or args.scenarios or args.out)
    if args.out is None:
        args.out = RESULTS_DIR / ("http_bench_quick" if args.quick else "http_bench")
    return args


def _raise_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the servers


def _plan(
    scenarios: list[Scenario], servers: list[ServerSpec]
) -> list[tuple[Scenario, int, ServerSpec]]:
    """Scenario-major: the servers of one scenario run back to back, which is what the ratios
    compare; a scenario with rounds runs every server, then every server again."""
    return [
        (scenario, round_no, spec)
        for scenario in scenarios
        for round_no in range(1, scenario.rounds + 1)
        for spec in servers
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_bjoern:
        serve_bjoern(args.serve_bjoern[0], int(args.serve_bjoern[1]))
        return 0
    if args.hold_idle:
        port, count, hold_limit = args.hold_idle
        return hold_idle(int(port), int(count), float(hold_limit))
    if args.render_chart:
        render_chart(Path(args.render_chart[0]), Path(args.render_chart[1]))
        return 0
    signal.signal(signal.SIGTERM, _raise_on_signal)
    signal.signal(signal.SIGHUP, _raise_on_signal)
    if args.build_limit:
        try:
            if not args.no_install:
                ensure_system_packages()
        except BenchError as exc:
            log(str(exc))
        error = build_limit()
        log(error or f"built {LIMIT_BIN}")
        return 1 if error else 0
    servers = _pick(args.servers, SERVERS, "servers")
    scenarios = [
        replace(
            sc,
            idle=args.idle_connections,
            about=sc.about.replace(f"{sc.idle:,}", f"{args.idle_connections:,}"),
        )
        if sc.idle
        else sc
        for sc in _pick(args.scenarios, SCENARIOS, "scenarios")
    ]
    started = time.monotonic()
    try:
        ensure_project_venv()
        failed: dict[str, str] = {}
        if not args.no_install:
            ensure_system_packages()
            failed = ensure_bench_venv()
    except BenchError as exc:
        log(str(exc))
        return 1
    if any(s.name == LIMIT for s in servers):
        limit_error = build_limit()
        if limit_error:
            failed["liburing"] = limit_error
    skipped = {
        s.name: f"{s.package} not available: {failed[s.package]}"
        for s in servers
        if s.package in failed
    }
    servers = [s for s in servers if s.name not in skipped]
    if (os.cpu_count() or 1) <= max(SERVER_CORE, CLIENT_CORE):
        log(f"needs cores {SERVER_CORE} and {CLIENT_CORE}: one for the server, one for wrk")
        return 1
    # The harness (checks, strace client) shares wrk's core, never the server's.
    os.sched_setaffinity(0, {CLIENT_CORE})
    _raise_nofile()
    args.perf_error = probe_perf() if args.count_requests else None
    if args.perf_error:
        log(f"perf cannot count syscalls here, strace -c -f stands in: {args.perf_error}")
    plan = _plan(scenarios, servers)
    log(
        f"{len(plan)} runs of {args.duration} s (+ warm-up, checks and count passes); "
        f"about {len(plan) * (args.duration + args.warmup + 5) / 60:.0f} min"
    )
    report: dict[str, Any] = {
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "versions": versions(),
        "settings": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "count_requests": args.count_requests,
            "strace_requests": args.strace_requests,
            "idle_connections": args.idle_connections,
            "syscall_method": "strace" if args.perf_error else "perf",
            "perf_error": args.perf_error,
            "wrk_threads": 1,
            "ours": OURS,
        },
        "servers": [{"name": s.name, "package": s.package, "about": s.about} for s in servers],
        "scenarios": [asdict(sc) for sc in scenarios],
        "skipped": skipped,
        "results": [],
    }
    rows: list[dict[str, Any]] = report["results"]
    with tempfile.TemporaryDirectory(prefix="http_bench-") as tmp:
        for scenario, round_no, spec in plan:
            tag = f"{scenario.name}" + (f" #{round_no}" if scenario.rounds > 1 else "")
            why_not = spec.cannot(scenario)
            if why_not:
                rows.append(
                    {
                        "scenario": scenario.name,
                        "round": round_no,
                        "server": spec.name,
                        "skipped": why_not,
                    }
                )
                continue
            log(f"{tag}: {spec.name}")
            t0 = time.monotonic()
            try:
                row = measure(spec, scenario, round_no, args, Path(tmp))
            except (OSError, BenchError, subprocess.SubprocessError) as exc:
                row = {
                    "scenario": scenario.name,
                    "round": round_no,
                    "server": spec.name,
                    "error": str(exc),
                }
                log(f"  failed: {exc}")
            else:
                log(
                    f"  {row['req_per_s']:,.0f} req/s, "
                    f"{_fmt(row.get('cpu_us_per_request'), '.2f')} µs CPU/req, "
                    f"{_fmt(row.get('syscalls', {}).get('per_request'), '.3f')} syscalls/req, "
                    f"check {row['check']} ({time.monotonic() - t0:.0f} s)"
                )
            rows.append(row)
    add_ratios(rows)
    report["targets"] = compute_targets(rows, args.idle_connections)
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out.with_suffix(".json"), args.out.with_suffix(".png")
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    chart_error = make_chart(json_path, png_path)
    if chart_error:
        log(chart_error)
        report["chart_error"] = chart_error
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    markdown = render_markdown(report, None if chart_error else png_path.name)
    args.out.with_suffix(".md").write_text(markdown)
    if args.readme:
        chart = None if chart_error else os.path.relpath(png_path, ROOT)
        if update_readme(render_readme_block(report, chart)):
            log("README.md results block rewritten")
    print(markdown)
    log(f"wrote {args.out}.json, .md and .png in {report['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; the servers were stopped")  # by the finally blocks on the way out
        sys.exit(130)

"""A real `uringserve` process for the worker and graceful-stop tests: its error log read
line by line, its workers found in /proc, and a keep-alive load that tells requests the
server took (logged by tests/lifecycle_app.py) from ones it never saw."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from server_util import Reader, wait_until

TESTS_DIR = Path(__file__).resolve().parent
STARTUP = re.compile(r"serving (https?)://127\.0\.0\.1:(\d+) on (\w+)")
BOOTED = re.compile(r"worker (\d+) \(pid (\d+)\) booted on (\w+)")
RING_LINK = "anon_inode:[io_uring]"


class ServerProcess:
    """`python -m uringserve ARGS` (or `python -c LAUNCHER ARGS`), stderr collected."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str] | None = None,
        launcher: str | None = None,
        expect_startup: bool = True,
        app: str = "lifecycle_app:app",
    ) -> None:
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(TESTS_DIR), full_env.get("PYTHONPATH", "")) if p
        )
        full_env.pop("URINGSERVE_IO_URING", None)
        full_env.update(env or {})
        head = ["-c", launcher] if launcher else ["-m", "uringserve"]
        self.proc = subprocess.Popen(
            [sys.executable, *head, app, "--port", "0", "--no-access-log", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
            cwd=str(TESTS_DIR),
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.scheme = ""
        self.port = 0
        self.backend = ""
        if expect_startup:
            try:
                m = self.wait_for(STARTUP, timeout=30)
            except BaseException:
                self.close()  # a server that never said it serves is not left running
                raise
            self.scheme, self.port, self.backend = m.group(1), int(m.group(2)), m.group(3)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return "\n".join(self.lines)

    def matches(self, pattern: re.Pattern[str] | str) -> list[re.Match[str]]:
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        return [m for line in list(self.lines) if (m := rx.search(line))]

    def wait_for(
        self, pattern: re.Pattern[str] | str, count: int = 1, timeout: float = 20
    ) -> re.Match[str]:
        """The count-th line matching pattern, waiting for it."""
        found = wait_until(lambda: len(self.matches(pattern)) >= count, timeout)
        assert found, f"no {count} line(s) matching {pattern!r} in:\n{self.log()}"
        return self.matches(pattern)[count - 1]

    def booted(self, count: int, timeout: float = 30) -> list[int]:
        """Pids of the first `count` workers that booted, waiting for them."""
        self.wait_for(BOOTED, count=count, timeout=timeout)
        return [int(m.group(2)) for m in self.matches(BOOTED)][:count]

    def children(self) -> list[int]:
        """Live child processes of the server (its workers, in worker mode)."""
        path = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        try:
            pids = [int(p) for p in path.read_text().split()]
        except OSError:
            return []
        return [p for p in pids if alive(p)]

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop_cleanly(self, timeout: float = 30) -> None:
        """SIGTERM; the server must then exit with code 0 within `timeout`."""
        self.send(signal.SIGTERM)
        assert self.wait(timeout) == 0, self.log()

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def close(self) -> None:
        """Kills the server and its workers if the test left them running."""
        for pid in self.children():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(5)


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rpartition(")")[2].split()[0]


def alive(pid: int) -> bool:
    """The process exists and is neither a zombie nor dead."""
    return _state(pid) not in ("Z", "X", "")


def fds_linking(pid: int, target: str) -> set[int]:
    """The process's open fds whose /proc link reads `target` (e.g. "anon_inode:[eventfd]")."""
    found = set()
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(entry) == target:
                found.add(int(entry.name))
        except OSError:  # closed meanwhile (the listing's own fd among them)
            continue
    return found


def ring_fds(pid: int) -> int:
    """How many io_uring instances the process holds open."""
    return len(fds_linking(pid, RING_LINK))


def get_body(port: int, path: str = "/", timeout: float = 5.0) -> bytes:
    """One request on a new connection; the response body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        resp = Reader(s, timeout).read_response()
    assert resp.status == 200, resp
    return resp.body


def answered_by(port: int, path: str = "/") -> int:
    """One request on a new connection; the pid of the process that answered (lifecycle_app)."""
    return int(get_body(port, path).split()[1])


class _CountingReader(Reader):
    """Remembers whether any byte of a response arrived."""

    got_bytes = False

    def _fill(self, deadline: float) -> bool:
        more = super()._fill(deadline)
        self.got_bytes = self.got_bytes or more
        return more


@dataclass
class Load:
    """Keep-alive clients sending numbered requests until stopped or the server goes away.

    A request on a reused connection that ends before any response byte is retried once on
    a new connection, as HTTP clients do (RFC 9112 §9.3.1): the server may close an idle
    connection just as a request is sent on it. Anything else that goes wrong with a request
    the server took is a failure.
    """

    port: int
    path: str = "/"
    clients: int = 4
    max_requests: int = 2_000
    completed: dict[int, float] = field(default_factory=dict)  # id -> time answered
    unanswered: list[int] = field(default_factory=list)  # no response byte at all
    failures: list[str] = field(default_factory=list)
    refused: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._next = 0
        self._threads = [
            threading.Thread(target=self._client, daemon=True) for _ in range(self.clients)
        ]

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        assert not any(t.is_alive() for t in self._threads), "a client did not finish"

    def wait_completed(self, n: int, timeout: float = 20) -> None:
        assert wait_until(lambda: len(self.completed) >= n, timeout), (
            f"only {len(self.completed)} of {n} requests completed; failures {self.failures}"
        )

    def _take_id(self) -> int | None:
        with self._lock:
            if self._next >= self.max_requests:
                return None
            self._next += 1
            return self._next

    def _client(self) -> None:
        sock: socket.socket | None = None
        try:
            while not self._stop.is_set():
                rid = self._take_id()
                if rid is None:
                    return
                sock, done = self._one(sock, rid)
                if not done:
                    return
        finally:
            if sock is not None:
                sock.close()

    def _one(self, sock: socket.socket | None, rid: int) -> tuple[socket.socket | None, bool]:
        """Sends request rid (retried once on a new connection); False once the server is gone."""
        for attempt in range(2):
            reused = sock is not None
            if sock is None:
                try:
                    sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
                except OSError:
                    with self._lock:
                        self.refused += 1
                        self.unanswered.append(rid)
                    return None, False
            reader = _CountingReader(sock, 10)
            try:
                sock.sendall(f"GET {self.path} HTTP/1.1\r\nHost: x\r\nX-Id: {rid}\r\n\r\n".encode())
                resp = reader.read_response()
            except (OSError, EOFError) as exc:
                sock.close()
                sock = None
                if reader.got_bytes:
                    with self._lock:
                        self.failures.append(f"request {rid}: broken response: {exc!r}")
                    return None, True
                if reused and attempt == 0:
                    continue
                # A new connection that got nothing: the server stopped before taking it.
                with self._lock:
                    self.unanswered.append(rid)
                return None, False
            with self._lock:
                if resp.status != 200:
                    self.failures.append(f"request {rid}: status {resp.status}")
                else:
                    self.completed[rid] = time.monotonic()
            if (resp.header("Connection") or "").lower() == "close":
                sock.close()
                sock = None
            return sock, True
        return sock, True


def taken_ids(log: Path) -> list[int]:
    """The X-Ids the app saw, in order (tests/lifecycle_app.py with LIFECYCLE_LOG)."""
    if not log.exists():
        return []
    return [int(line) for line in log.read_text().split()]

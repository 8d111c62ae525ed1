"""Pre-forked workers from a real `uringserve --workers N` process, on both backends: each
worker opens its own rings and the master none; dead workers are restarted and their cause
logged; max-requests recycles workers without failing a request; SIGTTIN/SIGTTOU change the
count; SIGHUP re-imports the app; SIGQUIT stops at once; --reuse-port spreads connections."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest

import uringserve
from proc_util import Load, ServerProcess, get_body, ring_fds, taken_ids
from server_util import wait_until
from uringserve.cli import _parser, build_config
from uringserve.config import options_from_env

MAX_WORKER_WAIT = 30

# Runs the CLI with the native module's ring constructors and probe guarded: called in the
# master's own process, they exit with status 99 (workers are forked, so their pid differs).
GUARDED_LAUNCHER = r"""
import os, sys
import uringserve._uringserve as native

MASTER = os.getpid()

def guard(name, real):
    def guarded(*args, **kwargs):
        if os.getpid() == MASTER:
            os.write(2, f"io_uring touched in the master: {name}\n".encode())
            os._exit(99)
        return real(*args, **kwargs)
    return guarded

for name in ("probe", "Ring", "HotpathRing", "UringServer"):
    setattr(native, name, guard(name, getattr(native, name)))
sys.argv[0] = "uringserve"
from uringserve.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start(backend: str, *args: str, **kwargs: object) -> ServerProcess:
    server = ServerProcess(["--io-uring", backend, *args], **kwargs)  # type: ignore[arg-type]
    return server


def worker_count(server: ServerProcess, n: int) -> bool:
    return wait_until(lambda: len(server.children()) == n, timeout=MAX_WORKER_WAIT)


def test_workers_serve_and_only_they_open_rings(backend: str) -> None:
    server = start(backend, "--workers", "2", launcher=GUARDED_LAUNCHER)
    try:
        pids = server.booted(2)
        assert worker_count(server, 2), server.log()
        for _ in range(20):
            assert get_body(server.port).startswith(b"pid ")
        assert get_body(server.port, "/multiprocess") == b"True"
        assert ring_fds(server.pid) == 0, "the master holds an io_uring instance"
        want = 1 if backend == "on" else 0
        for pid in pids:
            assert ring_fds(pid) >= want, f"worker {pid} serves without its own ring"
            if backend == "off":
                assert ring_fds(pid) == 0
        assert server.proc.poll() is None, server.log()
        server.stop_cleanly()
        assert "io_uring touched in the master" not in server.log()
    finally:
        server.close()


def test_dead_worker_is_restarted_and_its_cause_logged(backend: str) -> None:
    server = start(backend, "--workers", "2")
    try:
        first = server.booted(2)
        os.kill(first[0], signal.SIGKILL)
        server.wait_for(rf"ERROR worker \d+ \(pid {first[0]}\) died \(killed by signal SIGKILL\)")
        server.booted(3)
        # A worker that exits on its own: its exit code is the cause.
        try:
            get_body(server.port, "/exit?code=7")
        except (OSError, EOFError, AssertionError):
            pass  # the worker died mid-request: that is the point
        server.wait_for(r"ERROR worker \d+ \(pid \d+\) died \(exit code 7\); starting a new one")
        server.booted(4)
        assert worker_count(server, 2), server.log()
        assert get_body(server.port).startswith(b"pid ")
        server.stop_cleanly()
    finally:
        server.close()


def test_max_requests_recycles_workers_without_failing_a_request(
    backend: str, tmp_path: Path
) -> None:
    log = tmp_path / "taken"
    server = start(
        backend,
        "--workers",
        "2",
        "--max-requests",
        "25",
        "--max-requests-jitter",
        "10",
        env={"LIFECYCLE_LOG": str(log)},
    )
    load = Load(server.port, clients=4, max_requests=400)
    try:
        server.booted(2)
        load.start()
        load.wait_completed(400, timeout=60)
        load.stop()
        # At most 35 requests per worker: 400 requests needed at least 12 workers in all.
        recycled = server.matches(r"exited after its max requests \(exit code 0\)")
        assert len(recycled) >= 400 // 35 - 2, server.log()
        assert not server.matches(r"ERROR"), server.log()
        taken = taken_ids(log)
        assert not load.failures, load.failures
        assert not load.unanswered, f"requests never answered: {load.unanswered[:10]}"
        assert sorted(taken) == sorted(load.completed), "a request ran twice or got lost"
        assert max(Counter(taken).values()) == 1
        server.stop_cleanly()
    finally:
        load.stop()
        server.close()


def test_ttin_and_ttou_change_the_worker_count(backend: str) -> None:
    server = start(backend, "--workers", "2")
    try:
        server.booted(2)
        assert worker_count(server, 2), server.log()
        server.send(signal.SIGTTIN)
        assert worker_count(server, 3), server.log()
        server.booted(3)
        for want in (2, 1):
            server.send(signal.SIGTTOU)
            assert worker_count(server, want), server.log()
        server.send(signal.SIGTTOU)  # the last worker stays
        server.wait_for(r"SIGTTOU ignored: keeping the last worker")
        assert worker_count(server, 1), server.log()
        assert get_body(server.port).startswith(b"pid ")
        server.stop_cleanly()
    finally:
        server.close()


def test_hup_restarts_workers_with_a_fresh_import(backend: str, tmp_path: Path) -> None:
    version = tmp_path / "version"
    version.write_text("v1")
    server = start(backend, "--workers", "2", env={"LIFECYCLE_VERSION_FILE": str(version)})
    try:
        old = set(server.booted(2))
        assert get_body(server.port, "/version") == b"v1"
        version.write_text("v2")
        server.send(signal.SIGHUP)
        new = set(server.booted(4)[2:])
        assert not new & old
        assert wait_until(lambda: set(server.children()) == new, timeout=MAX_WORKER_WAIT)
        for _ in range(10):
            assert get_body(server.port, "/version") == b"v2"
        server.stop_cleanly()
    finally:
        server.close()


def test_reuse_port_gives_each_worker_its_own_socket(backend: str) -> None:
    server = start(backend, "--workers", "2", "--reuse-port")
    try:
        pids = server.booted(2)
        # The kernel spreads connections over the workers' sockets by their 4-tuple hash.
        seen = {get_body(server.port) for _ in range(64)}
        assert seen == {f"pid {p}".encode() for p in pids}, seen
        server.stop_cleanly()
    finally:
        server.close()


def test_a_shared_socket_spreads_connections_over_the_workers(backend: str) -> None:
    # With one listening socket for all workers, an always-armed multishot accept would take
    # every connection in the first worker the kernel wakes (800 of 800 before this was fixed).
    server = start(backend, "--workers", "2")
    try:
        pids = server.booted(2)
        assert worker_count(server, 2), server.log()
        served: Counter[bytes] = Counter()
        lock = threading.Lock()

        def client() -> None:
            for _ in range(25):
                body = get_body(server.port)
                with lock:
                    served[body] += 1

        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert sum(served.values()) == 200, served
        assert set(served) == {f"pid {p}".encode() for p in pids}, served
        assert min(served.values()) >= 30, f"connections per worker: {dict(served)}"
        server.stop_cleanly()
    finally:
        server.close()


def test_a_worker_that_cannot_boot_stops_the_master() -> None:
    server = ServerProcess(
        ["--io-uring", "off", "--workers", "2"], app="no_such_module:app", expect_startup=False
    )
    try:
        assert server.wait(timeout=60) == 1, server.log()
        assert "failed to boot" in server.log()
        assert "ModuleNotFoundError" in server.log()
    finally:
        server.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="seccomp is Linux-only")
def test_on_without_io_uring_exits_1_and_auto_falls_back_with_workers() -> None:
    from test_unsupported_env import INSTALL_FILTER, run_child

    script = (
        INSTALL_FILTER
        + r"""
import subprocess, errno
base = [sys.executable, "-m", "uringserve", "--port", "0", "--workers", "2"]
on = subprocess.run(base + ["--io-uring", "on"], capture_output=True, text=True, timeout=30)
auto = subprocess.Popen(base + ["--io-uring", "auto"], stderr=subprocess.PIPE, text=True)
line = auto.stderr.readline()
auto.terminate()
rest = auto.communicate(timeout=30)[1]
print(json.dumps({"on_rc": on.returncode, "on_stderr": on.stderr, "auto_line": line,
                  "auto_rc": auto.returncode, "auto_rest": rest}))
"""
    )
    out = run_child(script, str(1))  # EPERM, as Docker's default profile
    assert out["on_rc"] == 1, out["on_stderr"]
    assert "Traceback" not in out["on_stderr"]
    assert "io_uring_setup failed: EPERM" in out["on_stderr"]
    assert " on epoll (io_uring unavailable: io_uring_setup failed: EPERM" in out["auto_line"]
    assert out["auto_rc"] == 0, out["auto_rest"]


def test_server_api_with_workers(backend: str) -> None:
    """Server(app, workers=N) from Python, stopped from another thread (no signals there)."""
    with uringserve.Server(
        "lifecycle_app:app", port=0, io_uring=backend, access_log=False, workers=2
    ) as server:
        port = int(server.server_address[1])
        runner = threading.Thread(target=server.serve_forever, daemon=True)
        runner.start()
        try:
            # The socket listens from the start: the request waits in the backlog for a worker.
            body = get_body(port, timeout=MAX_WORKER_WAIT)
            assert body.startswith(b"pid ") and body != f"pid {os.getpid()}".encode()
        finally:
            server.shutdown(graceful=True)
            runner.join(30)
        assert not runner.is_alive()


def test_cli_process_options_reach_the_config() -> None:
    args = _parser().parse_args(
        [
            "--workers",
            "3",
            "--reuse-port",
            "--max-requests",
            "100",
            "--max-requests-jitter",
            "7",
            "--graceful-timeout",
            "2.5",
        ]
    )
    c = build_config(args)
    assert (c.workers, c.reuse_port, c.max_requests, c.max_requests_jitter) == (3, True, 100, 7)
    assert c.graceful_timeout == 2.5
    assert options_from_env({"URINGSERVE_GRACEFUL_TIMEOUT": "0.5"}) == {"graceful_timeout": 0.5}
    with pytest.raises(ValueError, match="workers must not be negative"):
        uringserve.Config(workers=-1)


def test_sigterm_while_workers_boot_stops_promptly(backend: str) -> None:
    """A stop that reaches a worker before it can serve is kept, not lost to the master's
    inherited handlers (the master would then wait out the 30 s graceful timeout)."""
    for _ in range(3):
        server = start(backend, "--workers", "3")
        try:
            server.stop_cleanly(timeout=20)  # right after the startup line: workers are booting
            assert "SIGKILL" not in server.log()
        finally:
            server.close()

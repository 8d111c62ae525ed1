"""What `--timeout` costs a worker: `--workers 1 --timeout 30` against `--timeout 0` (no
heartbeat), on both backends, serving the demo app. Three figures per backend:

- idle: the worker's CPU time (utime + stime) and voluntary context switches (its wake-ups)
  over 20 s with no client;
- syscalls per request under `wrk -t1 -c8 -d3s` (strace -c -f on the worker);
- req/s under `wrk -t1 -c32 -d5s`, three rounds, interleaved (the machine's noise shows).

Needs wrk and strace. Usage: .venv/bin/python benches/timeout_cost.py [idle|syscalls|load]...
(default: all three).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

PY = sys.executable
BACKENDS = ("on", "off")
TIMEOUTS = (0, 30)
IDLE_SECONDS = 20
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(backend: str, timeout: int, port: int) -> tuple[subprocess.Popen[str], int]:
    """The server, and its worker's pid once it booted."""
    args = ["--port", str(port), "--no-access-log", "--workers", "1", "--io-uring", backend]
    proc = subprocess.Popen(
        [PY, "-m", "uringserve", "uringserve.demo:app", *args, "--timeout", str(timeout)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        m = re.search(r"worker \d+ \(pid (\d+)\) booted", line)
        if m:
            return proc, int(m.group(1))
    raise RuntimeError("the worker never booted")


@contextmanager
def serving(backend: str, timeout: int) -> Iterator[tuple[int, int]]:
    """A server on a free port while the block runs: its port and its worker's pid."""
    port = free_port()
    proc, pid = start(backend, timeout, port)
    try:
        yield port, pid
    finally:
        proc.terminate()
        proc.wait(30)


def cpu_and_wakeups(pid: int) -> tuple[float, int]:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    seconds = (int(fields[11]) + int(fields[12])) / CLK_TCK
    status = open(f"/proc/{pid}/status").read()
    m = re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M)
    assert m is not None
    return seconds, int(m.group(1))


def wrk(port: int, conns: int, seconds: int) -> tuple[int, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", f"http://127.0.0.1:{port}/"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    n = re.search(r"(\d+) requests in", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert n is not None and rps is not None, out
    return int(n.group(1)), float(rps.group(1))


def idle() -> None:
    for backend in BACKENDS:
        for timeout in TIMEOUTS:
            with serving(backend, timeout) as (_port, pid):
                c0, w0 = cpu_and_wakeups(pid)
                time.sleep(IDLE_SECONDS)  # measuring what an idle worker does meanwhile
                c1, w1 = cpu_and_wakeups(pid)
            print(
                f"idle {backend:3} --timeout {timeout:2}: {IDLE_SECONDS} s: "
                f"cpu {1000 * (c1 - c0):.0f} ms, wake-ups {w1 - w0}",
                flush=True,
            )


def syscalls() -> None:
    for backend in BACKENDS:
        for timeout in TIMEOUTS:
            with (
                serving(backend, timeout) as (port, pid),
                tempfile.NamedTemporaryFile("r", suffix=".strace") as report,
            ):
                tracer = subprocess.Popen(
                    ["strace", "-c", "-f", "-p", str(pid), "-o", report.name],
                    stderr=subprocess.DEVNULL,
                )
                try:
                    time.sleep(1)  # strace attaches
                    n, _ = wrk(port, 8, 3)
                finally:
                    tracer.terminate()
                    tracer.wait(30)
                total = [ln for ln in report.read().splitlines() if ln.rstrip().endswith("total")]
            calls = int(total[0].split()[3])
            print(
                f"syscalls {backend:3} --timeout {timeout:2}: {n} requests, {calls} syscalls, "
                f"{calls / n:.3f} per request",
                flush=True,
            )


def load() -> None:
    for backend in BACKENDS:
        rates: dict[int, list[float]] = {t: [] for t in TIMEOUTS}
        for _ in range(3):
            for timeout in TIMEOUTS:
                with serving(backend, timeout) as (port, _pid):
                    wrk(port, 32, 1)  # warm-up
                    rates[timeout].append(wrk(port, 32, 5)[1])
        for timeout, got in rates.items():
            shown = ", ".join(f"{r:.0f}" for r in got)
            print(
                f"load {backend:3} --timeout {timeout:2}: req/s {shown} "
                f"(median {sorted(got)[1]:.0f})",
                flush=True,
            )


if __name__ == "__main__":
    runs = {"idle": idle, "syscalls": syscalls, "load": load}
    for name in sys.argv[1:] or list(runs):
        runs[name]()

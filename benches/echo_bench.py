"""Echo micro-benchmark: a HotpathRing echo server against a selectors (epoll) one, in one run.

Each server runs in its own process (pinned to core 0 when taskset exists); one client process
(core 1) keeps `--conns` connections doing ping-pong of small messages for a bounded count and
time. Reported per server: round trips/s, server CPU-µs per round trip (utime+stime from
/proc/PID/stat), and for the ring its io_uring_enter calls per round trip.

    .venv/bin/python benches/echo_bench.py --conns 64 --seconds 5 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time

MSG = b"x" * 64


def serve_hotpath(listener: socket.socket) -> dict[str, int]:
    import uringserve

    ring = uringserve.HotpathRing(queue_depth=1024, n_bufs=512, buf_size=4096)
    ring.submit_accept_multishot(listener)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    while not stop:
        for c in ring.wait_completions(1, 0.2):
            if c.op == "accept" and c.result >= 0:
                ring.submit_recv_multishot(c.result)
            elif c.op == "recv" and c.result > 0:
                ring.submit_send(c.fd, ring.take_buffer(c.buf_id, c.result))
            elif c.op == "recv":
                ring.cancel_fd(c.fd)
                os.close(c.fd)
    stats = ring.stats()
    ring.close()
    return stats


def serve_selectors(listener: socket.socket) -> dict[str, int]:
    sel = selectors.DefaultSelector()
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    while not stop:
        for key, _ in sel.select(0.2):
            sock = key.fileobj
            if sock is listener:
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    continue
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ)
                continue
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                continue
            except ConnectionError:
                data = b""
            if data:
                sock.sendall(data)  # 64-byte echoes never fill a loopback send buffer
            else:
                sel.unregister(sock)
                sock.close()
    return {}


def server_main(backend: str, port_fd: int) -> None:
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    os.write(port_fd, f"{listener.getsockname()[1]}\n".encode())
    stats = serve_hotpath(listener) if backend == "io_uring" else serve_selectors(listener)
    print(json.dumps(stats), flush=True)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drive(port: int, conns: int, seconds: float, max_rounds: int) -> int:
    """Ping-pong on every connection until the time or the count runs out; returns round trips."""
    sel = selectors.DefaultSelector()
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(conns)]
    for s in socks:
        s.setblocking(False)
        s.sendall(MSG)
        sel.register(s, selectors.EVENT_READ, bytearray())
    done = 0
    deadline = time.monotonic() + seconds
    while done < max_rounds and time.monotonic() < deadline:
        for key, _ in sel.select(1.0):
            buf = key.data
            buf += key.fileobj.recv(4096)
            while len(buf) >= len(MSG):
                del buf[: len(MSG)]
                done += 1
                key.fileobj.sendall(MSG)
    for s in socks:
        s.close()
    return done


def run_one(backend: str, args: argparse.Namespace) -> dict[str, object]:
    rfd, wfd = os.pipe()
    cmd = [sys.executable, __file__, "--serve", backend, "--port-fd", str(wfd)]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", "0", *cmd]
    proc = subprocess.Popen(cmd, pass_fds=(wfd,), stdout=subprocess.PIPE, text=True)
    os.close(wfd)
    with os.fdopen(rfd) as r:
        port = int(r.readline())
    before = cpu_seconds(proc.pid)
    t0 = time.monotonic()
    rounds = drive(port, args.conns, args.seconds, args.max_rounds)
    elapsed = time.monotonic() - t0
    after = cpu_seconds(proc.pid)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    lines = out.strip().splitlines()
    stats = json.loads(lines[-1]) if lines else {}
    row: dict[str, object] = {
        "backend": backend,
        "round_trips": rounds,
        "rt_per_s": round(rounds / elapsed),
        "server_cpu_us_per_rt": round((after - before) * 1e6 / max(rounds, 1), 2),
    }
    if stats:
        row["enters_per_rt"] = round(stats["enters"] / max(rounds, 1), 3)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--conns", type=int, default=64)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--max-rounds", type=int, default=2_000_000)
    p.add_argument("--rounds", type=int, default=2, help="interleaved repetitions")
    p.add_argument("--serve", choices=["io_uring", "epoll"], help=argparse.SUPPRESS)
    p.add_argument("--port-fd", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        server_main(args.serve, args.port_fd)
        return
    if shutil.which("taskset"):
        os.sched_setaffinity(0, {1 % os.cpu_count()})
    for _ in range(args.rounds):
        for backend in ("io_uring", "epoll"):
            print(json.dumps(run_one(backend, args)), flush=True)


if __name__ == "__main__":
    main()

"""The io_uring backend: a HotpathRing loop driving the native HTTP core and WSGI bridge.

This loop is Python; the native serve loop that keeps Python off the I/O path is not done yet.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

from ._uringserve import HotpathRing, HttpProtocol, WsgiApp


@dataclass
class _Conn:
    proto: HttpProtocol
    sends: int = 0


def _peer(fd: int) -> tuple[str, int]:
    sock = socket.socket(fileno=fd)
    try:
        peer = sock.getpeername()
    except OSError:
        peer = ("", 0)
    finally:
        sock.detach()
    if isinstance(peer, tuple):
        return str(peer[0]), int(peer[1])
    return str(peer), 0


def serve_uring(
    listener: socket.socket,
    app: WsgiApp,
    wake: socket.socket,
    stopping: Callable[[], bool],
    ring: HotpathRing,
) -> None:
    """Serve until stopping() is true after a wake-up; returns with every connection closed."""
    conns: dict[int, _Conn] = {}
    wake_fd = wake.fileno()
    ring.submit_accept_multishot(listener)
    ring.submit_recv_multishot(wake_fd)

    def close(fd: int) -> None:
        conns.pop(fd, None)
        ring.cancel_fd(fd)
        os.close(fd)

    def send(fd: int, conn: _Conn, data: bytes) -> None:
        if data:
            conn.sends += 1
            ring.submit_send(fd, data)

    try:
        while not stopping():
            for c in ring.wait_completions(1, None, 512):
                if c.op == "accept":
                    if c.result >= 0:
                        conns[c.result] = _Conn(HttpProtocol(app, *_peer(c.result)))
                        ring.submit_recv_multishot(c.result)
                    continue
                if c.fd == wake_fd:
                    if c.result > 0 and c.buf_id is not None:
                        ring.release_buffer(c.buf_id)
                    continue
                conn = conns.get(c.fd)
                if conn is None:
                    if c.op == "recv" and c.result > 0 and c.buf_id is not None:
                        ring.release_buffer(c.buf_id)
                    continue
                if c.op == "recv":
                    if c.result > 0 and c.buf_id is not None:
                        data = ring.take_buffer(c.buf_id, c.result)
                        send(c.fd, conn, conn.proto.feed(data))
                    elif c.result == 0:
                        send(c.fd, conn, conn.proto.feed_eof())
                    else:
                        close(c.fd)
                        continue
                elif c.op == "send":
                    conn.sends -= 1
                    if c.result < 0:
                        close(c.fd)
                        continue
                if conn.proto.closing and conn.sends == 0:
                    close(c.fd)
    finally:
        for fd in list(conns):
            close(fd)

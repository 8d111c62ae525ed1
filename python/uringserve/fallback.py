"""The epoll backend: a selectors loop driving the native HTTP core and WSGI bridge."""

from __future__ import annotations

import selectors
import socket
from collections.abc import Callable

from ._uringserve import HttpProtocol, WsgiApp

READ_SIZE = 256 * 1024
# Stop reading from a peer while this much response data waits to be sent to it.
HIGH_WATER = 1 << 20
ACCEPT_BATCH = 64


class _Conn:
    __slots__ = ("out", "proto", "sock")

    def __init__(self, sock: socket.socket, proto: HttpProtocol) -> None:
        self.sock = sock
        self.proto = proto
        self.out = bytearray()


def serve_epoll(
    listener: socket.socket, app: WsgiApp, wake: socket.socket, stopping: Callable[[], bool]
) -> None:
    """Serve until stopping() is true after a wake-up; returns with every connection closed."""
    sel = selectors.DefaultSelector()
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ, None)
    sel.register(wake, selectors.EVENT_READ, None)
    conns: dict[int, _Conn] = {}

    def close(conn: _Conn) -> None:
        sel.unregister(conn.sock)
        del conns[conn.sock.fileno()]
        conn.sock.close()

    def update(conn: _Conn) -> None:
        if conn.proto.closing and not conn.out:
            close(conn)
            return
        events = selectors.EVENT_WRITE if conn.out else 0
        if not conn.proto.closing and len(conn.out) < HIGH_WATER:
            events |= selectors.EVENT_READ
        sel.modify(conn.sock, events, conn)

    def flush(conn: _Conn) -> bool:
        try:
            while conn.out:
                sent = conn.sock.send(conn.out)
                del conn.out[:sent]
        except BlockingIOError:
            pass
        except OSError:
            close(conn)
            return False
        return True

    try:
        while not stopping():
            for key, mask in sel.select():
                if key.fileobj is wake:
                    wake.recv(64)
                    continue
                if key.fileobj is listener:
                    for _ in range(ACCEPT_BATCH):
                        try:
                            sock, peer = listener.accept()
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError:
                            break  # EMFILE and the like: the backlog keeps the peer waiting
                        sock.setblocking(False)
                        conn = _Conn(sock, HttpProtocol(app, str(peer[0]), int(peer[1])))
                        conns[sock.fileno()] = conn
                        sel.register(sock, selectors.EVENT_READ, conn)
                    continue
                conn = key.data
                if mask & selectors.EVENT_READ:
                    try:
                        data = conn.sock.recv(READ_SIZE)
                    except (BlockingIOError, InterruptedError):
                        data = None
                    except OSError:
                        close(conn)
                        continue
                    if data is not None:
                        conn.out += conn.proto.feed(data) if data else conn.proto.feed_eof()
                if conn.out and not flush(conn):
                    continue
                update(conn)
    finally:
        for conn in list(conns.values()):
            close(conn)
        sel.close()

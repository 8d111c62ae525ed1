"""The epoll backend: a selectors loop driving the native HTTP core and WSGI bridge."""

from __future__ import annotations

import select
import selectors
import socket
from collections.abc import Callable

from ._uringserve import HttpProtocol, WsgiApp

# Below glibc's mmap threshold: a bigger recv() buffer costs an mmap/munmap pair per read.
READ_SIZE = 64 * 1024
# Stop reading from a peer while this much response data waits to be sent to it.
HIGH_WATER = 1 << 20
ACCEPT_BATCH = 64
# How long the app may wait for the next bytes of a request body (as on the io_uring loop).
BODY_WAIT = 30.0


def _send_some(sock: socket.socket, out: bytearray) -> None:
    """Sends from the front of `out` until it is empty or the socket would block."""
    try:
        while out:
            del out[: sock.send(out)]
    except (BlockingIOError, InterruptedError):
        pass


class _Transport:
    """What the app's wsgi.input uses while it runs: block on this one socket for body bytes,
    and send 100 Continue after any responses still queued ahead of it."""

    __slots__ = ("out", "sock")

    def __init__(self, sock: socket.socket, out: bytearray) -> None:
        self.sock = sock
        self.out = out

    def _wait(self, events: int) -> None:
        poller = select.poll()
        poller.register(self.sock, events)
        if not poller.poll(BODY_WAIT * 1000):
            raise TimeoutError(f"no progress on the connection for {BODY_WAIT:.0f} s")

    def pull(self) -> bytes:
        while True:
            try:
                return self.sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                self._wait(select.POLLIN)

    def send_now(self, data: bytes) -> None:
        self.out += data
        _send_some(self.sock, self.out)
        while self.out:
            self._wait(select.POLLOUT)
            _send_some(self.sock, self.out)


class _Conn:
    __slots__ = ("out", "proto", "sock")

    def __init__(self, sock: socket.socket, app: WsgiApp, peer: tuple[str, int]) -> None:
        self.sock = sock
        # Shared with the transport, so early sends queue behind what is already waiting.
        self.out = bytearray()
        self.proto = HttpProtocol(app, peer[0], peer[1], _Transport(sock, self.out))


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
            _send_some(conn.sock, conn.out)
        except OSError:
            close(conn)
            return False
        return True

    def pump(conn: _Conn) -> bool:
        """Sends what is queued; while the peer keeps up, answers requests that were held back
        for it. False if the connection closed."""
        while True:
            if conn.out and not flush(conn):
                return False
            if conn.out or not conn.proto.held_back:
                return True
            conn.out += conn.proto.resume()

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
                        conn = _Conn(sock, app, (str(peer[0]), int(peer[1])))
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
                if pump(conn):
                    update(conn)
    finally:
        for conn in list(conns.values()):
            close(conn)
        sel.close()

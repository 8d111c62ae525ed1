"""Server start and stop on both backends: a shutdown() that comes before serve_forever()
still stops it, and a server can serve again after a shutdown."""

from __future__ import annotations

import socket
import threading

import uringserve
from server_util import hello_app, request


def test_shutdown_before_serve_forever_still_stops_it(backend: str) -> None:
    with uringserve.Server(hello_app, port=0, io_uring=backend, access_log=False) as server:
        server.shutdown()
        done = threading.Event()

        def run() -> None:
            server.serve_forever()
            done.set()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        assert done.wait(10), "serve_forever() ignored the shutdown() that came before it"


def test_serves_again_after_shutdown(backend: str) -> None:
    with uringserve.Server(hello_app, port=0, io_uring=backend, access_log=False) as server:
        host, port = server.server_address[:2]
        for _ in range(2):
            t = threading.Thread(target=server.serve_forever, daemon=True)
            t.start()
            with socket.create_connection((host, port), timeout=5) as s:
                resp, _ = request(s, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert resp.body == b"hello"
            server.shutdown()
            t.join(10)
            assert not t.is_alive()

"""Load and abuse over loopback, on both backends: no cross-talk, no fd leaks, no crash."""

from __future__ import annotations

import random
import resource
import selectors
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from server_util import Reader, ServerThread, count_fds, wait_until

StartResponse = Callable[..., Any]
Environ = dict[str, Any]

N_CONCURRENT = 500
N_CYCLES = 5000
BIG_SIZE = 8 * 1024 * 1024
# A small, repeatable "random" body: any mix-up between connections shows as a mismatch.
BIG = random.Random(8).randbytes(BIG_SIZE)
LOAD_DEADLINE = 60.0
FD_SETTLE = 10.0


def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
    path = environ["PATH_INFO"]
    if path == "/echo":
        body = environ["wsgi.input"].read()
    elif path == "/big":
        body = BIG
    else:
        body = b"ok"
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return [body]


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n".encode()


def post(path: str, body: bytes) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


@pytest.fixture
def nofile_limit() -> Iterator[None]:
    """Room for both ends of N_CONCURRENT connections in this one process, plus slack."""
    needed = 2 * N_CONCURRENT + 512
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        raised = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        assert raised >= needed, f"RLIMIT_NOFILE hard limit {hard} < {needed} needed"
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def settled_fds(st: ServerThread) -> int:
    """The fd count once the server has served one request: lazily made fds are not leaks."""
    with st.connect() as s:
        s.sendall(get("/", "Connection: close\r\n"))
        reader = Reader(s)
        assert reader.read_response().status == 200
        # EOF means the server has closed its end: the count below has no connection in it.
        assert reader.at_eof()
    return count_fds()


def assert_fds_return(before: int) -> None:
    assert wait_until(lambda: count_fds() <= before, timeout=FD_SETTLE), (
        f"fds: {before} before, still {count_fds()} after {FD_SETTLE}s"
    )


def assert_still_serves(st: ServerThread) -> None:
    assert st.thread.is_alive(), f"the server thread died: {st.errors}"
    with st.connect() as s:
        s.sendall(post("/echo", b"still here"))
        resp = Reader(s).read_response()
    assert (resp.status, resp.body) == (200, b"still here")


@dataclass
class EchoClient:
    """One connection's POSTs, sent one after another over keep-alive."""

    index: int
    sock: socket.socket
    bodies: list[bytes]
    done: int = 0
    sent: int = 0
    received: bytearray = field(default_factory=bytearray)

    @property
    def request(self) -> bytes:
        return post("/echo", self.bodies[self.done])

    def response_complete(self) -> bool:
        end = self.received.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(self.received[:end]).decode("latin-1").split("\r\n")
        who = f"client {self.index}, request {self.done}"
        assert head[0] == "HTTP/1.1 200 OK", f"{who}: {head[0]!r}"
        lengths = [
            v for k, _, v in (h.partition(":") for h in head[1:]) if k.lower() == "content-length"
        ]
        assert len(lengths) == 1, f"{who}: {head!r}"
        total = end + 4 + int(lengths[0])
        if len(self.received) < total:
            return False
        assert len(self.received) == total, f"{who}: bytes past its response"
        assert bytes(self.received[end + 4 :]) == self.bodies[self.done], f"{who}: wrong body"
        self.done += 1
        self.sent = 0
        self.received.clear()
        return True


def test_no_cross_talk_500_concurrent_posts(
    serve: Callable[..., ServerThread], nofile_limit: None
) -> None:
    st = serve(app)
    rng = random.Random(500)
    clients: list[EchoClient] = []
    sel = selectors.DefaultSelector()
    try:
        for i in range(N_CONCURRENT):
            # The tag up front makes every body distinct even if the random parts collide.
            bodies = [
                f"{i:04d}/{n}:".encode() + rng.randbytes(rng.randint(1024, 16 * 1024))
                for n in range(2)
            ]
            sock = st.connect()
            sock.setblocking(False)
            clients.append(EchoClient(i, sock, bodies))
            sel.register(sock, selectors.EVENT_WRITE, clients[-1])
        # Every connection is open before any request goes out, and requests go out in
        # random-sized pieces, so the server sees all 500 interleaved.
        pending = len(clients)
        deadline = time.monotonic() + LOAD_DEADLINE
        for _ in range(1_000_000):
            if pending == 0:
                break
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{pending} of {N_CONCURRENT} clients still waiting"
            for key, mask in sel.select(timeout=min(remaining, 1.0)):
                c: EchoClient = key.data
                if mask & selectors.EVENT_WRITE:
                    request = c.request
                    piece = request[c.sent : c.sent + rng.randint(1, 4096)]
                    try:
                        c.sent += c.sock.send(piece)
                    except BlockingIOError:
                        continue
                    if c.sent == len(request):
                        sel.modify(c.sock, selectors.EVENT_READ, c)
                    continue
                try:
                    data = c.sock.recv(65536)
                except BlockingIOError:
                    continue
                assert data, f"client {c.index}: closed after {len(c.received)} bytes"
                c.received += data
                if not c.response_complete():
                    continue
                if c.done == len(c.bodies):
                    sel.unregister(c.sock)
                    pending -= 1
                else:
                    sel.modify(c.sock, selectors.EVENT_WRITE, c)
        assert pending == 0, f"{pending} clients unanswered after the round limit"
    finally:
        sel.close()
        for c in clients:
            c.sock.close()
    assert_still_serves(st)


def test_no_fd_leak_5000_cycles(serve: Callable[..., ServerThread]) -> None:
    st = serve(app)
    before = settled_fds(st)
    deadline = time.monotonic() + LOAD_DEADLINE
    for i in range(N_CYCLES):
        assert time.monotonic() < deadline, f"only {i} of {N_CYCLES} cycles in {LOAD_DEADLINE}s"
        with st.connect() as s:
            mode = i % 4
            if mode == 0:  # keep-alive request; the client closes after the response
                s.sendall(get(f"/{i}"))
                assert Reader(s).read_response().body == b"ok"
            elif mode == 1:  # the server closes first
                s.sendall(get(f"/{i}", "Connection: close\r\n"))
                reader = Reader(s)
                assert reader.read_response().body == b"ok"
                assert reader.at_eof()
            elif mode == 2:  # request sent, response never read
                s.sendall(get(f"/{i}"))
            # mode 3: connect and close without a byte
    assert_fds_return(before)
    assert_still_serves(st)


def read_at_least(sock: socket.socket, n: int, timeout: float = 10.0) -> int:
    got = 0
    deadline = time.monotonic() + timeout
    for _ in range(100_000):
        if got >= n:
            break
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        data = sock.recv(65536)
        assert data, f"closed after {got} of at least {n} bytes"
        got += len(data)
    return got


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_client_reset_mid_8mib_response(serve: Callable[..., ServerThread]) -> None:
    st = serve(app)
    before = settled_fds(st)
    for i in range(20):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # A small window keeps most of the 8 MiB on the server's side when the RST comes.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            sock.settimeout(5.0)
            sock.connect(st.address)
            sock.sendall(get("/big"))
            read_at_least(sock, 1 if i % 2 == 0 else 256 * 1024)
        finally:
            reset(sock)
        assert_still_serves(st)
    assert_fds_return(before)
    # After all that, a full 8 MiB response still arrives intact.
    with st.connect(timeout=20) as s:
        s.sendall(get("/big"))
        resp = Reader(s, 20).read_response()
    assert resp.status == 200
    assert resp.body == BIG


@pytest.mark.parametrize(
    ("raw", "bodies"),
    [
        pytest.param(get("/small"), [b"ok"], id="small"),
        pytest.param(get("/big"), [BIG], id="8mib"),
        pytest.param(post("/echo", BIG[:100_000]), [BIG[:100_000]], id="post"),
        pytest.param(
            get("/a") + post("/echo", b"two") + get("/c"), [b"ok", b"two", b"ok"], id="pipelined"
        ),
    ],
)
def test_half_close_after_request_gets_full_response(
    serve: Callable[..., ServerThread], raw: bytes, bodies: list[bytes]
) -> None:
    st = serve(app)
    before = settled_fds(st)
    for _ in range(5):
        with st.connect(timeout=20) as s:
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)
            reader = Reader(s, 20)
            for body in bodies:
                resp = reader.read_response()
                assert resp.status == 200
                assert resp.body == body
            # Nothing more is coming, so the server closes its side once it has answered.
            assert reader.at_eof(timeout=10), "the server kept a half-closed connection open"
    assert_fds_return(before)
    assert_still_serves(st)
